//! `kubeshift agent`: the node daemon's datapath half. Loads (or reopens) the node's
//! socket load balancer and keeps its maps in step with the cluster's Services.

use crate::kubeconfig::ClusterArgs;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use kubeshift_datapath::agent::modes::{self, AutoConfig, CniConfig};
use kubeshift_datapath::agent::{self, frontends::NodePortConfig, policy::PolicyConfig, AgentConfig, EndpointsApi};
use kubeshift_datapath::overlay::{self, OverlayConfig};
use kubeshift_datapath::DatapathConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EndpointsSource {
    /// The newest one the apiserver serves: EndpointSlice v1, then v1beta1, then Endpoints.
    Auto,
    SliceV1,
    SliceV1beta1,
    Endpoints,
}

/// What the agent does on this node (see DESIGN.md, "The pod network during the
/// migration").
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The overlay and the node's range only: no eBPF programs, no CNI conf, no service takeover.
    Standby,
    /// Socket LB, NodePort and policy only (no overlay, no CNI conf): the datapath on
    /// a node whose pods stay on the legacy network.
    Active,
    /// Follow the node's `kubeshift.io/agent-mode` label (`active`, else standby): the
    /// overlay and bridges always, and when active also kubeshift's CNI conf and the
    /// datapath. What the DaemonSet runs.
    Auto,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This node's name (labels metrics and logs).
    #[arg(long)]
    pub node: String,
    /// cgroup v2 directory whose processes get service load balancing
    /// (default: the cgroup v2 root, i.e. the whole machine).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for this node's pins (default: /sys/fs/bpf/kubeshift/<node>).
    /// The datapath keeps running from them while the agent is stopped.
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9963).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Which endpoints API to watch.
    #[arg(long, value_enum, default_value = "auto")]
    pub endpoints_api: EndpointsSource,
    /// The node's network namespace, where the pods' host-side interfaces are
    /// (default: the agent's own, as on a real node; the lab's nodes are namespaces).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Do not enforce NetworkPolicy (no tc programs on pod interfaces).
    #[arg(long)]
    pub no_policy: bool,
    /// Interface NodePort / external-IP traffic arrives on (default: the one carrying
    /// the node's InternalIP).
    #[arg(long)]
    pub device: Option<String>,
    /// Do not serve NodePorts / external IPs (no tc program on the node's interface).
    #[arg(long)]
    pub no_nodeport: bool,
    /// standby: only kubeshift's overlay and this node's range; active: the datapath.
    #[arg(long, value_enum, default_value = "active")]
    pub mode: Mode,
    /// The pod CIDR node ranges are carved from (standby; in a migration, the plan's
    /// target.podCidr).
    #[arg(long, default_value = overlay::DEFAULT_POD_CIDR)]
    pub pod_cidr: String,
    /// Prefix length of each node's range.
    #[arg(long, default_value_t = overlay::DEFAULT_NODE_PREFIX)]
    pub node_cidr_size: u8,
    /// UDP port of kubeshift's VXLAN overlay (never the legacy's 8472).
    #[arg(long, default_value_t = overlay::DEFAULT_PORT)]
    pub tunnel_port: u16,
    /// VXLAN network identifier of kubeshift's overlay (never Flannel's 1).
    #[arg(long, default_value_t = overlay::DEFAULT_VNI)]
    pub vni: u32,
    /// The legacy pod network's MTU: the overlay's never exceeds it.
    #[arg(long)]
    pub legacy_mtu: Option<u32>,
    /// A legacy pod network (Flannel's Network, each Calico IPPool; repeat the flag):
    /// traffic between it and kubeshift's keeps its source address (auto).
    #[arg(long = "legacy-pod-cidr")]
    pub legacy_pod_cidrs: Vec<String>,
    /// The node's CNI conf dir, where an active node's conf goes first (auto).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The socket the CNI plugin asks to attach policy programs during ADD (auto).
    #[arg(long, default_value = "/run/kubeshift/cni.sock")]
    pub cni_socket: PathBuf,
    /// Where the CNI plugin records this node's address allocations (auto).
    #[arg(long, default_value = "/var/lib/cni/kubeshift")]
    pub cni_data_dir: PathBuf,
    /// Where the migration's node-local steps keep the node's snapshot and the legacy CNI
    /// conf files they moved aside (auto).
    #[arg(long, default_value = "/var/lib/kubeshift")]
    pub state_dir: PathBuf,
}

pub async fn run(args: AgentArgs, cluster: &ClusterArgs) -> Result<()> {
    match args.mode {
        Mode::Standby => run_standby(args, cluster).await,
        Mode::Active => {
            let cfg = active_config(&args)?;
            agent::run(cluster.client().await?, cfg).await
        }
        Mode::Auto => {
            let overlay = overlay_config(&args)?;
            let legacy = args
                .legacy_pod_cidrs
                .iter()
                .map(|c| c.parse().with_context(|| format!("--legacy-pod-cidr {c}")))
                .collect::<Result<Vec<overlay::Cidr>>>()?;
            if let Some(l) = legacy.iter().find(|l| l.overlaps(&overlay.pod_cidr)) {
                anyhow::bail!(
                    "--legacy-pod-cidr {l} overlaps --pod-cidr {}: the two networks must be apart",
                    overlay.pod_cidr
                );
            }
            let cfg = AutoConfig {
                active: active_config(&args)?,
                overlay,
                legacy,
                cni: CniConfig {
                    conf_dir: args.cni_conf_dir.clone(),
                    socket: args.cni_socket.clone(),
                    data_dir: args.cni_data_dir.clone(),
                },
                netns: args.netns.clone(),
            };
            let client = cluster.client().await?;
            // The node-local steps of this node's migration (snapshot, cleanups) run
            // beside the datapath, on the same node, whatever the mode.
            tokio::spawn(kubeshift_node_migrator::local::run(
                client.clone(),
                kubeshift_node_migrator::local::LocalConfig {
                    node: args.node.clone(),
                    netns: args.netns.clone().unwrap_or_else(|| "/proc/self/ns/net".into()),
                    state_dir: args.state_dir.clone(),
                    cni_conf_dir: args.cni_conf_dir.clone(),
                },
            ));
            modes::run(client, cfg).await
        }
    }
}

/// The active datapath's settings from the flags (nothing talks to the cluster yet,
/// so a typo fails first).
fn active_config(args: &AgentArgs) -> Result<AgentConfig> {
    // Local flags first: a typo should fail before anything talks to the cluster.
    let mut dp = DatapathConfig::new(&args.node).context("finding the cgroup v2 mount")?;
    if let Some(c) = args.cgroup.clone() {
        anyhow::ensure!(c.join("cgroup.procs").exists(), "--cgroup {}: not a cgroup v2 directory", c.display());
        dp.cgroup = c;
    }
    if let Some(p) = args.bpffs.clone() {
        dp.pin_dir = p;
    }
    let endpoints_api = match args.endpoints_api {
        EndpointsSource::Auto => None,
        EndpointsSource::SliceV1 => Some(EndpointsApi::SliceV1),
        EndpointsSource::SliceV1beta1 => Some(EndpointsApi::SliceV1beta1),
        EndpointsSource::Endpoints => Some(EndpointsApi::CoreEndpoints),
    };
    if let Some(ns) = &args.netns {
        anyhow::ensure!(ns.exists(), "--netns {}: no such network namespace file", ns.display());
    }
    let policy = (!args.no_policy).then(|| PolicyConfig {
        node: args.node.clone(),
        pin_dir: dp.pin_dir.clone(),
        netns: args.netns.clone(),
        cgroup: dp.cgroup.clone(),
    });
    let nodeport = (!args.no_nodeport).then(|| NodePortConfig {
        node: args.node.clone(),
        pin_dir: dp.pin_dir.clone(),
        netns: args.netns.clone(),
        device: args.device.clone(),
    });
    Ok(AgentConfig { node: args.node.clone(), datapath: dp, metrics: args.metrics, endpoints_api, policy, nodeport })
}

/// Standby: the overlay only, so nothing of the active datapath (cgroup, bpffs) is
/// looked at.
async fn run_standby(args: AgentArgs, cluster: &ClusterArgs) -> Result<()> {
    let cfg = overlay_config(&args)?;
    let client = cluster.client().await?;
    agent::run_standby(client, cfg, args.metrics).await
}

fn overlay_config(args: &AgentArgs) -> Result<OverlayConfig> {
    let mut cfg = OverlayConfig::new(&args.node);
    cfg.pod_cidr = args.pod_cidr.parse().with_context(|| format!("--pod-cidr {}", args.pod_cidr))?;
    cfg.node_prefix = args.node_cidr_size;
    anyhow::ensure!(
        (cfg.pod_cidr.len..=30).contains(&cfg.node_prefix),
        "--node-cidr-size {}: must be between the pod CIDR's /{} and /30",
        cfg.node_prefix,
        cfg.pod_cidr.len
    );
    cfg.port = args.tunnel_port;
    cfg.vni = args.vni;
    cfg.legacy_mtu = args.legacy_mtu;
    cfg.check()?;
    Ok(cfg)
}
