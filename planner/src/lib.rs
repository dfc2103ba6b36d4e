//! Discovery, kube-proxy rule model, policy analysis and the node-pool plan.
//!
//! What the CLI calls:
//! - `kubeshift node report`: [`node_report::collect`] (or
//!   [`node_report::collect_in_netns`]) and `serde_json` on the result.
//! - parsing a node's rules: [`iptables::parse_iptables_save`] /
//!   [`iptables::parse_iptables_save_file`].
//! - comparing them with the API: [`diff::diff_node`] with [`api::ApiServices`].
//! - plan files: [`plan::load_plan`], [`plan::Plan::to_yaml`], [`plan::StepGraph`].

pub mod analysis;
pub mod api;
pub mod cni;
pub mod diff;
pub mod discovery;
pub mod inventory;
pub mod iptables;
pub mod ipvs;
pub mod legacy_findings;
pub mod nftables;
pub mod node_report;
pub mod plan;
pub mod planning;
