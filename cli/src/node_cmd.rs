//! `kubeshift node report`: what the planner needs to know about one node, as
//! JSON on stdout. Run on the node (or, in the lab, in the node's namespace).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kubeshift_planner::node_report::{collect, collect_in_netns, CollectOptions};
use std::path::PathBuf;

#[derive(Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Kernel, BTF, cgroup v2, iptables backend and full iptables-save, CNI conf files,
    /// interfaces and routes of this node, as JSON.
    Report {
        /// Where the CNI conf files are.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// Collect inside this network namespace (/run/netns/NAME) instead of the current one.
        #[arg(long)]
        netns: Option<String>,
        /// The node's name in the API (default: derived from --netns `ks-LAB-NODE`, else none).
        #[arg(long)]
        node_name: Option<String>,
        /// Write the JSON here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Remove what kube-proxy left on this node (its iptables chains and jumps on both
    /// backends and families, its nftables tables, service conntrack entries), keeping
    /// kubelet's and other owners' rules. Run it once kube-proxy no longer runs on the
    /// node; safe to run again. Prints what was removed as JSON.
    CleanupKubeProxy {
        /// Work inside this network namespace (/run/netns/NAME) instead of the current one.
        #[arg(long)]
        netns: Option<String>,
        /// The node's kubelet version (e.g. v1.20.2): before 1.27 kubelet owns
        /// KUBE-MARK-DROP/-MASQ and KUBE-POSTROUTING, which then stay. Default: decided
        /// from the rules themselves.
        #[arg(long)]
        kubelet_version: Option<String>,
        /// Print every removed chain and rule instead of counts per table.
        #[arg(long)]
        full: bool,
    },
}

pub async fn run(args: NodeArgs) -> Result<()> {
    match args.command {
        NodeCommand::CleanupKubeProxy { netns, kubelet_version, full } => {
            use kubeshift_node_migrator::cleanup::{run_cleanup, CleanupOptions, KubeletChains, Netns};
            let target = match &netns {
                Some(ns) => Netns::named(ns),
                None => Netns::at("/proc/self/ns/net"),
            };
            let opts = CleanupOptions {
                kubelet: kubelet_version
                    .as_deref()
                    .map(KubeletChains::from_kubelet_version)
                    .unwrap_or(KubeletChains::Detect),
                ..Default::default()
            };
            let where_ = netns.map(|n| format!("--netns {n}")).unwrap_or_else(|| "this node".into());
            let report = tokio::task::spawn_blocking(move || run_cleanup(&target, &opts))
                .await?
                .with_context(|| format!("cleaning kube-proxy's rules in {where_}"))?;
            let json = if full { report.to_json() } else { serde_json::to_value(report.summary())? };
            println!("{}", serde_json::to_string_pretty(&json)?);
            eprintln!(
                "{where_}: {} kube-proxy chains and {} rules removed, {} nftables tables, conntrack of {} service addresses flushed",
                report.chains_removed(),
                report.rules_removed(),
                report.nftables_removed.len(),
                report.conntrack.len()
            );
            Ok(())
        }
        NodeCommand::Report { cni_conf_dir, netns, node_name, out } => {
            if !cni_conf_dir.is_dir() {
                bail!("--cni-conf-dir {}: not a directory", cni_conf_dir.display());
            }
            if let Some(ns) = &netns {
                if !std::path::Path::new("/run/netns").join(ns).exists() {
                    bail!("--netns {ns}: no such network namespace (/run/netns/{ns})");
                }
            }
            // The lab names node namespaces ks-<lab>-<node>; the node name is the tail.
            let node_name = node_name.or_else(|| {
                netns
                    .as_deref()
                    .and_then(|n| n.strip_prefix("ks-"))
                    .and_then(|rest| rest.find("-node-").map(|i| rest[i + 1..].to_string()))
            });
            let opts = CollectOptions { node_name, cni_conf_dir, ..Default::default() };
            let report = tokio::task::spawn_blocking(move || match netns {
                Some(ns) => collect_in_netns(&ns, &opts).map_err(|e| anyhow::anyhow!("--netns {ns}: {e}")),
                None => Ok(collect(&opts)),
            })
            .await??;
            let json = serde_json::to_string_pretty(&report)?;
            match out {
                Some(p) => std::fs::write(&p, json + "\n").with_context(|| format!("writing {}", p.display()))?,
                None => println!("{json}"),
            }
            Ok(())
        }
    }
}
