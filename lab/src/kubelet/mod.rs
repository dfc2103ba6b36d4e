//! The kubelet stand-in: one process per lab node, living in that node's network
//! namespace (and the host's mount namespace, so cgroups stay visible). It registers
//! the Node, keeps its Lease and status fresh, and runs the pods bound to it.
//!
//! What it may touch: its node's netns, the pod netns it creates (named by
//! `spec::pod_netns`), its node directory under the lab state dir, and its cgroup
//! under the lab's cgroup.

mod cni;
mod images;
pub mod node;
mod pod;
mod volumes;

pub use cni::{result_ipv4, Attachment, CniRuntime};
pub use node::is_ready as node_is_ready;

use crate::spec::LabSpec;
use crate::state::LabState;
use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Seconds after which the apiserver ends the kubelet's pod watch (default 50).
pub const POD_WATCH_TIMEOUT_ENV: &str = "KUBESHIFT_LAB_POD_WATCH_TIMEOUT";

/// Milliseconds between a pod's containers starting and its first status report
/// (default 0): how long the API does not know a running pod's IP.
pub const STATUS_DELAY_ENV: &str = "KUBESHIFT_LAB_POD_STATUS_DELAY_MS";

pub fn status_delay() -> Option<Duration> {
    let ms: u64 = std::env::var(STATUS_DELAY_ENV).ok()?.parse().ok()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

pub struct NodeCtx {
    pub lab: LabSpec,
    pub node: String,
    pub index: usize,
    pub node_ip: Ipv4Addr,
    /// `<state dir>/nodes/<node>`.
    pub dir: PathBuf,
    /// The node's "/" for hostPath volumes (/etc/cni/net.d, /opt/cni/bin, /run/flannel …).
    pub root: PathBuf,
    pub cgroup: PathBuf,
    pub client: Client,
    pub self_exe: PathBuf,
    pub ca_pem: String,
}

impl NodeCtx {
    pub fn cni(&self) -> CniRuntime {
        CniRuntime {
            bin_dirs: vec![self.root.join("opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            conf_dir: self.root.join("etc/cni/net.d"),
            node_root: self.root.clone(),
        }
    }
}

pub fn node_root(lab: &str, node: &str) -> PathBuf {
    crate::up::node_dir(lab, node).join("root")
}

pub async fn run(lab: &str, node: &str) -> Result<()> {
    let dir = crate::spec::state_dir(lab);
    let state = LabState::load(&dir)?.ok_or_else(|| anyhow!("lab {lab} has no state file in {}", dir.display()))?;
    let index = state
        .spec
        .node_names()
        .iter()
        .position(|n| n == node)
        .ok_or_else(|| anyhow!("lab {lab} has no node {node}"))?;
    let ndir = crate::up::node_dir(lab, node);
    let client = crate::api::client_from(&ndir.join("kubelet.kubeconfig")).await?;
    let root = node_root(lab, node);
    for d in ["etc/cni/net.d", "opt/cni/bin", "run", "var/lib/cni"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let cgroup = state.cgroup.join(node);
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    let ctx = Arc::new(NodeCtx {
        node_ip: state.spec.node_ip(index),
        lab: state.spec.clone(),
        node: node.to_string(),
        index,
        dir: ndir.clone(),
        root,
        cgroup,
        client,
        self_exe: std::env::current_exe()?,
        ca_pem: std::fs::read_to_string(dir.join("pki/ca.crt"))?,
    });

    crate::api::wait_for("node registration", Duration::from_secs(60), || {
        let ctx = ctx.clone();
        async move { node::register(&ctx).await.map(Some) }
    })
    .await?;

    let hb = ctx.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            if let Err(e) = node::renew_lease(&hb).await {
                tracing::warn!("lease: {e:#}");
            }
            // Status every 10 s, and every 1 s until the network is ready so the
            // node turns Ready promptly once the CNI config appears.
            if n.is_multiple_of(10) || !node::network_ready(&hb) || n < 30 {
                if let Err(e) = node::update_status(&hb).await {
                    tracing::warn!("node status: {e:#}");
                }
            }
            n += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    watch_pods(ctx).await
}

async fn watch_pods(ctx: Arc<NodeCtx>) -> Result<()> {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    // The apiserver ends every watch after its timeout and the watcher resumes from the
    // last resourceVersion it saw (a relist on 410 Gone), so no pod event is lost. The
    // timeout stays below the lab clients' 60 s read timeout so a quiet watch ends
    // cleanly instead of as a read error; tests shorten it to make watches end often.
    let timeout = std::env::var(POD_WATCH_TIMEOUT_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node)).timeout(timeout);
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut seen_in_init: Vec<String> = vec![];
    let mut stream = watcher(api, cfg).boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => seen_in_init.clear(),
            Ok(watcher::Event::InitApply(p)) => {
                seen_in_init.push(p.metadata.uid.clone().unwrap_or_default());
                upsert(&ctx, &mut workers, p);
            }
            Ok(watcher::Event::InitDone) => {
                // Pods deleted while the watch was down.
                workers.retain(|uid, _| seen_in_init.contains(uid));
            }
            Ok(watcher::Event::Apply(p)) => upsert(&ctx, &mut workers, p),
            Ok(watcher::Event::Delete(p)) => {
                if let Some(tx) = workers.remove(&p.metadata.uid.clone().unwrap_or_default()) {
                    let _ = tx.send(None);
                }
            }
            Err(e) => {
                tracing::warn!("pod watch: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        workers.retain(|_, tx| !tx.is_closed());
    }
    Ok(())
}

fn upsert(ctx: &Arc<NodeCtx>, workers: &mut HashMap<String, watch::Sender<Option<Pod>>>, p: Pod) {
    let uid = p.metadata.uid.clone().unwrap_or_default();
    match workers.get(&uid) {
        Some(tx) => {
            let _ = tx.send(Some(p));
        }
        None => {
            let (tx, rx) = watch::channel(Some(p));
            workers.insert(uid, tx);
            tokio::spawn(pod::run(ctx.clone(), rx));
        }
    }
}
