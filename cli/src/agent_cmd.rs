//! `kubeshift agent`: the node daemon's datapath half. Loads (or reopens) the node's
//! socket load balancer and keeps its maps in step with the cluster's Services.

use crate::kubeconfig::ClusterArgs;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use kubeshift_datapath::agent::{self, frontends::NodePortConfig, policy::PolicyConfig, AgentConfig, EndpointsApi};
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
}

pub async fn run(args: AgentArgs, cluster: &ClusterArgs) -> Result<()> {
    // Local flags first: a typo should fail before anything talks to the cluster.
    let mut dp = DatapathConfig::new(&args.node).context("finding the cgroup v2 mount")?;
    if let Some(c) = args.cgroup {
        anyhow::ensure!(c.join("cgroup.procs").exists(), "--cgroup {}: not a cgroup v2 directory", c.display());
        dp.cgroup = c;
    }
    if let Some(p) = args.bpffs {
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
    let client = cluster.client().await?;
    agent::run(
        client,
        AgentConfig { node: args.node, datapath: dp, metrics: args.metrics, endpoints_api, policy, nodeport },
    )
    .await
}
