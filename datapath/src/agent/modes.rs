//! `kubeshift agent --mode auto`: one agent per node whose mode follows the node's
//! `kubeshift.io/agent-mode` label, switched without redeploying (DESIGN.md, "The pod
//! network during the migration").
//!
//! Always, whatever the mode: the overlay (so legacy nodes reach migrated pods), the
//! masquerade bridges (`overlay::bridge`) and the collection of leaked address
//! allocations (`agent::leaks`). **Active** adds, in this order: the CNI
//! attach socket, the datapath (socket LB, NodePort, policy), and last the CNI conf
//! written first in the node's conf dir by an atomic rename, so the first ADD that
//! reads it finds an agent to answer. **Standby** undoes it in the reverse order: the
//! conf goes first (new pods get the legacy network again), then the datapath is
//! stopped, detached and unpinned, then the socket closes. Pods already wired by
//! kubeshift keep their addresses and routes; moving them back is a drain's job.
//!
//! The decision is the pure [`wanted`]; the rest does one transition at a time and
//! retries a failed one on the next pass, so a restart in any state converges.

use super::desired::ObjKey;
use super::metrics::Metrics;
use super::policy::AttachAsk;
use super::AgentConfig;
use crate::cni::agent_proto::{self, AttachServer};
use crate::overlay::{bridge, ipam, Cidr, OverlayConfig};
use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The node label that picks the agent's mode (`active`; anything else: standby).
pub const MODE_LABEL: &str = "kubeshift.io/agent-mode";
/// Sorts before Flannel's `10-flannel.conflist` and Calico's `10-calico.conflist`.
pub const CONF_NAME: &str = "00-kubeshift.conflist";
/// The conf's network name, which is also the directory of its address allocations.
pub const NETWORK: &str = "kubeshift";
const RETRY: Duration = Duration::from_secs(5);
/// How long an ADD waits for the policy programs before the plugin reports an error.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Standby,
    Active,
}

/// The mode a node's labels ask for.
pub fn wanted(labels: Option<&BTreeMap<String, String>>) -> Mode {
    match labels.and_then(|l| l.get(MODE_LABEL)).map(String::as_str) {
        Some("active") => Mode::Active,
        _ => Mode::Standby,
    }
}

#[derive(Debug, Clone)]
pub struct CniConfig {
    /// The node's CNI conf dir (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The attach socket the plugin asks (`agentSocket` in the conf).
    pub socket: PathBuf,
    /// The plugin's allocation records (`dataDir` in the conf).
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AutoConfig {
    /// The active datapath (its `metrics` address serves both modes).
    pub active: AgentConfig,
    pub overlay: OverlayConfig,
    /// The legacy pod networks, bridged to kubeshift's without masquerade.
    pub legacy: Vec<Cidr>,
    pub cni: CniConfig,
    /// The node's network namespace (None: the agent's own), whatever halves are on.
    pub netns: Option<PathBuf>,
}

/// The conflist of an active node: kubeshift's plugin on the node's range, then
/// `portmap` for hostPort, as Flannel's and Calico's confs chain it.
pub fn conflist(range: Cidr, mtu: u32, cni: &CniConfig) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "kubeshift",
                "subnet": range.to_string(),
                "mtu": mtu,
                "agentSocket": cni.socket.display().to_string(),
                "dataDir": cni.data_dir.display().to_string(),
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
}

/// Writes `CONF_NAME` by rename: a runtime listing the dir mid-write sees the old
/// state or the new, never half a file (the temporary name's suffix is not one a
/// runtime reads).
pub fn write_conf(dir: &Path, conf: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{CONF_NAME}.tmp"));
    let text = serde_json::to_vec_pretty(conf).expect("a JSON value serializes");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    let to = dir.join(CONF_NAME);
    std::fs::rename(&tmp, &to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

pub fn remove_conf(dir: &Path) -> Result<()> {
    let p = dir.join(CONF_NAME);
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// What an active node runs beside the overlay.
struct Active {
    task: tokio::task::JoinHandle<()>,
    _server: AttachServer,
}

/// Runs until SIGINT/SIGTERM, which leave the node as it is (an active node's pods
/// keep their datapath; its ADDs fail until the agent is back, and the runtime retries).
pub async fn run(client: Client, cfg: AutoConfig) -> Result<()> {
    cfg.overlay.check()?;
    let metrics = Arc::new(Metrics::default());
    metrics.node.lock().unwrap().clone_from(&cfg.active.node);
    metrics.standby.store(true, Relaxed);
    metrics.policy_enabled.store(cfg.active.policy.is_some(), Relaxed);
    metrics.nodeport_enabled.store(cfg.active.nodeport.is_some(), Relaxed);
    if let Some(addr) = cfg.active.metrics {
        super::http::start(addr, metrics.clone()).await?;
    }
    tokio::spawn({
        let (client, ocfg, ready) = (client.clone(), cfg.overlay.clone(), metrics.overlay.clone());
        async move {
            if let Err(e) = crate::overlay::standby::run(client, ocfg, ready.clone()).await {
                tracing::error!("overlay stopped: {e:#}");
                *ready.lock().unwrap() = vec![format!("overlay stopped: {e:#}")];
            }
        }
    });

    tokio::spawn(super::leaks::run(
        client.clone(),
        super::leaks::LeakConfig {
            node: cfg.active.node.clone(),
            data_dir: cfg.cni.data_dir.clone(),
            network: NETWORK.into(),
            netns: cfg.netns.clone(),
        },
        metrics.clone(),
    ));

    let nodes: Api<Node> = Api::all(client.clone());
    let selector = format!("metadata.name={}", cfg.active.node);
    let (label_tx, mut label_rx) = tokio::sync::watch::channel(None::<Mode>);
    tokio::spawn(async move {
        let stream = watcher(nodes, watcher::Config::default().fields(&selector)).default_backoff().applied_objects();
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(n) => {
                    let _ = label_tx.send(Some(wanted(n.metadata.labels.as_ref())));
                }
                Err(e) => tracing::warn!("watching this node's labels: {e}"),
            }
        }
    });

    let mut active: Option<Active> = None;
    let mut bridged = false;
    let mut retry = tokio::time::interval(RETRY);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            r = label_rx.changed() => {
                if r.is_err() { anyhow::bail!("the node watch ended") }
            }
            _ = retry.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        let mut why = Vec::new();
        // Checked on every pass, like the overlay's entries: a flushed ruleset is repaired.
        if let Err(e) = ensure_bridges(&cfg, &mut bridged) {
            why.push(format!("bridges: {e:#}"));
        }
        // Until the node has been read once, nothing changes (a restart must not tear
        // down an active node because its label is not known yet).
        let Some(want) = *label_rx.borrow_and_update() else {
            *metrics.mode.lock().unwrap() = vec!["mode: this node's labels not read yet".into()];
            continue;
        };
        if let Some(a) = &active {
            if a.task.is_finished() {
                why.push("active: the datapath stopped (see the log); restarting it".into());
                deactivate(&cfg, active.take(), &metrics).await;
            }
        }
        match (want, active.is_some()) {
            (Mode::Active, false) => match activate(&client, &cfg, &metrics).await {
                Ok(a) => {
                    tracing::info!("mode active: kubeshift's CNI conf is first on this node");
                    active = Some(a);
                }
                Err(e) => {
                    tracing::warn!("activating: {e:#}");
                    why.push(format!("activating: {e:#}"));
                }
            },
            (Mode::Standby, true) => {
                deactivate(&cfg, active.take(), &metrics).await;
                tracing::info!("mode standby: the legacy CNI wires new pods again");
            }
            (Mode::Standby, false) => {
                // A conf left by a run that stopped while active, with the label
                // changed since: standby means no kubeshift conf.
                if cfg.cni.conf_dir.join(CONF_NAME).exists() {
                    deactivate(&cfg, None, &metrics).await;
                }
            }
            (Mode::Active, true) => {}
        }
        *metrics.mode.lock().unwrap() = why;
    }
    tracing::info!("stopping; the node stays in its mode");
    if let Some(a) = active {
        a.task.abort();
    }
    Ok(())
}

/// Writes the table on the first pass (a table of an earlier run may name other
/// networks), and again whenever it has gone.
fn ensure_bridges(cfg: &AutoConfig, written: &mut bool) -> Result<()> {
    let netns = cfg.netns.as_deref();
    if *written && bridge::present(netns)? {
        return Ok(());
    }
    bridge::apply(&bridge::Bridges { kubeshift: cfg.overlay.pod_cidr, legacy: cfg.legacy.clone() }, netns)?;
    *written = true;
    tracing::info!(kubeshift = %cfg.overlay.pod_cidr, legacy = ?cfg.legacy, "pod network bridges in place");
    Ok(())
}

/// The overlay device's MTU: pods get the same, so nothing they send is fragmented
/// or dropped on the way to another node.
fn device_mtu(cfg: &AutoConfig) -> Result<u32> {
    let links = super::podnet::ip_json(cfg.netns.as_deref(), &["link", "show", &cfg.overlay.device])
        .with_context(|| format!("the overlay device {} is not there yet", cfg.overlay.device))?;
    links
        .get(0)
        .and_then(|l| l.get("mtu"))
        .and_then(|m| m.as_u64())
        .map(|m| m as u32)
        .with_context(|| format!("no MTU in ip -j link show {}", cfg.overlay.device))
}

async fn activate(client: &Client, cfg: &AutoConfig, metrics: &Arc<Metrics>) -> Result<Active> {
    // The range the overlay claimed (a claim finds the recorded one again).
    let range = ipam::claim(client, &cfg.overlay.node, cfg.overlay.pod_cidr, cfg.overlay.node_prefix)
        .await
        .context("reading this node's kubeshift range")?;
    let mtu = device_mtu(cfg)?;
    if let Some(d) = cfg.cni.socket.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let (ask_tx, ask_rx) = mpsc::unbounded_channel::<AttachAsk>();
    let policing = cfg.active.policy.is_some();
    let server = agent_proto::serve_attach(&cfg.cni.socket, move |req| {
        if !policing {
            return Ok(());
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        ask_tx
            .send(AttachAsk {
                ifname: req.host_ifname.clone(),
                pod: req.pod_namespace.clone().zip(req.pod_name.clone()).map(|(ns, n)| (ObjKey::new(&ns, &n), req.ip)),
                reply,
            })
            .map_err(|_| "the policy half is not running".to_string())?;
        // A plain thread per connection (agent_proto): blocking here holds no runtime worker.
        match answer.recv_timeout(ATTACH_TIMEOUT) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("policy programs not attached within {ATTACH_TIMEOUT:?}"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err("the policy half stopped before attaching".into())
            }
        }
    })
    .with_context(|| format!("serving the CNI attach socket {}", cfg.cni.socket.display()))?;
    metrics.standby.store(false, Relaxed);
    let task = tokio::spawn({
        let (client, acfg, metrics) = (client.clone(), cfg.active.clone(), metrics.clone());
        async move {
            if let Err(e) = super::run_with(client, acfg, metrics, Some(ask_rx)).await {
                tracing::error!("active datapath stopped: {e:#}");
            }
        }
    });
    let conf = conflist(range, mtu, &cfg.cni);
    if let Err(e) = write_conf(&cfg.cni.conf_dir, &conf) {
        task.abort();
        metrics.standby.store(true, Relaxed);
        return Err(e);
    }
    Ok(Active { task, _server: server })
}

/// Standby again: conf first, then the datapath, then the socket. Errors are logged:
/// each piece is removed independently, and a leftover pin is removed on the next
/// deactivation or by `kubeshift node` cleanup.
async fn deactivate(cfg: &AutoConfig, active: Option<Active>, metrics: &Metrics) {
    if let Err(e) = remove_conf(&cfg.cni.conf_dir) {
        tracing::error!("{e:#}");
    }
    if let Some(a) = active {
        a.task.abort();
        let _ = a.task.await;
        // Dropping `a._server` here closes the socket and removes its file.
    }
    metrics.standby.store(true, Relaxed);
    for s in [&metrics.synced, &metrics.policy_synced, &metrics.nodeport_synced] {
        s.store(0, Relaxed);
    }
    let pins = cfg.active.datapath.pin_dir.clone();
    let dp_cfg = cfg.active.datapath.clone();
    let r = tokio::task::spawn_blocking(move || {
        let mut errs = Vec::new();
        if pins.exists() {
            if let Err(e) = crate::Datapath::load(dp_cfg).and_then(|d| d.detach_and_unpin()) {
                errs.push(format!("socket LB: {e}"));
            }
            if let Err(e) = crate::policy::loader::PolicyDatapath::load(&pins).and_then(|d| d.detach_and_unpin()) {
                errs.push(format!("policy: {e}"));
            }
            if let Err(e) = crate::nodeport::NodePortDatapath::load(&pins).and_then(|d| d.detach_and_unpin()) {
                errs.push(format!("nodeport: {e}"));
            }
            prune_empty(&pins);
        }
        errs
    })
    .await
    .unwrap_or_default();
    if !r.is_empty() {
        tracing::error!(errors = ?r, "removing the active datapath");
    }
}

/// Removes the empty directories under and at `dir`, bottom up; a directory with a
/// file left in it (a pin that could not be removed) stays, so it can be found.
fn prune_empty(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                prune_empty(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_active_label_makes_a_node_active() {
        let l = |v: &str| BTreeMap::from([(MODE_LABEL.to_string(), v.to_string())]);
        assert_eq!(wanted(None), Mode::Standby);
        assert_eq!(wanted(Some(&BTreeMap::new())), Mode::Standby);
        assert_eq!(wanted(Some(&l("active"))), Mode::Active);
        assert_eq!(wanted(Some(&l("standby"))), Mode::Standby);
        assert_eq!(wanted(Some(&l("Active"))), Mode::Standby, "values are exact");
    }

    #[test]
    fn the_conf_is_written_whole_and_removed() {
        let dir = std::env::temp_dir().join(format!("ks-modes-{}", std::process::id()));
        let cni = CniConfig {
            conf_dir: dir.clone(),
            socket: "/run/kubeshift/cni.sock".into(),
            data_dir: "/var/lib/cni/kubeshift".into(),
        };
        let conf = conflist("10.200.3.0/24".parse().unwrap(), 1400, &cni);
        write_conf(&dir, &conf).unwrap();
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec![CONF_NAME.to_string()], "no temporary file left");
        let back: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(CONF_NAME)).unwrap()).unwrap();
        assert_eq!(back["plugins"][0]["subnet"], "10.200.3.0/24");
        assert_eq!(back["plugins"][0]["agentSocket"], "/run/kubeshift/cni.sock");
        assert_eq!(back["plugins"][1]["type"], "portmap");
        remove_conf(&dir).unwrap();
        remove_conf(&dir).unwrap();
        assert!(!dir.join(CONF_NAME).exists());
        std::fs::remove_dir(&dir).unwrap();
    }
}
