//! The node-local "kube-proxy cleanup" phase: remove what kube-proxy left in
//! the kernel once it no longer runs on the node, for each of its modes
//! (MIGRATION-FACTS §3), keep what kubelet and other owners wrote, and say
//! exactly what went.
//!
//! Planning is pure and works on saved command output ([`plan_iptables`],
//! [`plan_nftables`], [`plan_ipvs`], [`plan_conntrack`]); [`run_cleanup`]
//! reads, applies and verifies inside a network namespace.
//!
//! Order, and why: iptables first (every backend and family), because
//! kube-proxy's rules are what reference its ipsets and keep DNATing new
//! flows; then nftables tables; then conntrack, so no rule re-creates a
//! flushed entry's DNAT. IPVS (planned only: [`plan_ipvs`] with the rules
//! [`IptablesPlan::apply_to`] leaves) deletes virtual servers and
//! `kube-ipvs0`, then its ipsets last (kubernetes#109286).
//!
//! [`Report`] (or the smaller [`Report::summary`]) serialises to JSON for
//! the NodeMigration status.

mod conntrack;
pub(crate) mod exec;
mod iptables;
mod ipvs;
mod legacy;
mod nftables;
mod ownership;

pub use conntrack::{plan_conntrack, ConntrackFlush, ConntrackPlan, ConntrackScope};
pub use exec::{run_cleanup, CleanupOptions, ConntrackSource, Netns};
pub use iptables::{
    is_legacy_cni_chain, plan_iptables, plan_legacy_ruleset, plan_ruleset, IptablesPlan, KeptChain, RemovedRule,
    RuleSource, TableReport,
};
pub use ipvs::{plan_ipvs, IpvsInputs, IpvsPlan, IpvsStep, KeptSet, KeptVirtualServer, DUMMY_LINK};
pub use legacy::{legacy_links, legacy_routes, run_legacy_removal, LegacyReport};
pub use nftables::{plan_nftables, set_addresses, NftPlan, NftTable, CLUSTER_IPS_SET};
pub use ownership::{KubeletChains, Owner};

use kubeshift_planner::iptables::ParseError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which iptables binary set wrote the rules. A node can hold rules in both
/// (a kube-proxy image that picked the other backend than kubelet), so both
/// are cleaned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Legacy,
    Nft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];
}

/// `iptables-legacy`, `ip6tables-nft` …
pub(crate) fn iptables_binary(backend: Backend, family: Family, suffix: &str) -> String {
    let base = match family {
        Family::Ipv4 => "iptables",
        Family::Ipv6 => "ip6tables",
    };
    let b = match backend {
        Backend::Legacy => "legacy",
        Backend::Nft => "nft",
    };
    format!("{base}-{b}{suffix}")
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        })
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// Saved output that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Iptables(#[from] ParseError),
    #[error("{input}:{line}: {what}")]
    Saved { input: String, line: usize, what: String },
}

/// A failed step of [`run_cleanup`]; each names the command, the namespace
/// and what the command said.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("cannot open network namespace {netns}: {source}")]
    OpenNetns { netns: String, source: std::io::Error },
    #[error("`{command}` in {netns} could not start: {source}")]
    Spawn { command: String, netns: String, source: std::io::Error },
    #[error("reading rules: `{command}` in {netns} failed ({status}): {stderr}")]
    Read { command: String, netns: String, status: String, stderr: String },
    #[error("reading rules: output of `{command}` in {netns} does not parse: {source}")]
    Parse { command: String, netns: String, source: PlanError },
    #[error("removing kube-proxy rules: `{command}` in {netns} failed ({status}): {stderr}\n--- input ---\n{input}")]
    Restore { command: String, netns: String, status: String, stderr: String, input: String },
    #[error("deleting nftables table: `{command}` in {netns} failed ({status}): {stderr}")]
    NftDelete { command: String, netns: String, status: String, stderr: String },
    #[error("flushing conntrack: `{command}` in {netns} failed ({status}): {stderr}")]
    Conntrack { command: String, netns: String, status: String, stderr: String },
    #[error("after cleanup in {netns}, `{command}` shows: {what}")]
    Postcondition { command: String, netns: String, what: String },
}

/// What the phase removed and kept, for the NodeMigration status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Report {
    /// One entry per backend and family that was read.
    pub iptables: Vec<IptablesPlan>,
    /// `ip kube-proxy` / `ip6 kube-proxy` tables deleted.
    pub nftables_removed: Vec<NftTable>,
    pub conntrack: Vec<ConntrackFlush>,
    /// Messages a command wrote to stderr while succeeding.
    pub warnings: Vec<String>,
}

impl Report {
    /// Nothing was removed: what a second run reports.
    pub fn removed_nothing(&self) -> bool {
        self.iptables.iter().all(IptablesPlan::is_empty)
            && self.nftables_removed.is_empty()
            && self.conntrack.iter().all(|c| c.deleted == 0)
    }

    pub fn chains_removed(&self) -> usize {
        self.iptables.iter().map(IptablesPlan::chains_removed).sum()
    }

    pub fn rules_removed(&self) -> usize {
        self.iptables.iter().map(IptablesPlan::rules_removed).sum()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("report is plain data")
    }

    /// Counts per table instead of chain names: a node of a large cluster
    /// has tens of thousands of KUBE-SEP chains, too many names for a
    /// NodeMigration status (etcd objects stop at about 1.5 MB). Jumps and
    /// kept chains are few and stay listed.
    pub fn summary(&self) -> ReportSummary {
        let iptables = self
            .iptables
            .iter()
            .flat_map(|p| {
                p.tables.iter().map(move |t| TableSummary {
                    backend: p.backend,
                    family: p.family,
                    table: t.table.clone(),
                    chains_removed: t.chains_removed.len(),
                    rules_removed: t.rules_removed,
                    jumps_removed: t.jumps_removed.clone(),
                    kept: t.kept.clone(),
                })
            })
            .collect();
        ReportSummary {
            iptables,
            nftables_removed: self.nftables_removed.clone(),
            conntrack_addresses: self.conntrack.len(),
            conntrack_entries_deleted: self.conntrack.iter().map(|c| c.deleted).sum(),
            warnings: self.warnings.clone(),
        }
    }
}

/// [`Report::summary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReportSummary {
    pub iptables: Vec<TableSummary>,
    pub nftables_removed: Vec<NftTable>,
    pub conntrack_addresses: usize,
    pub conntrack_entries_deleted: u64,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSummary {
    pub backend: Backend,
    pub family: Family,
    pub table: String,
    pub chains_removed: usize,
    pub rules_removed: usize,
    pub jumps_removed: Vec<RemovedRule>,
    pub kept: Vec<KeptChain>,
}
