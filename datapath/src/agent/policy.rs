//! The policy half of `kubeshift agent`: follows Pods (the agent's one Pod watch, shared
//! with the flows task), Namespaces and NetworkPolicies,
//! compiles them into identities, ipcache and policy entries for this node, writes the
//! difference into the pinned policy maps, and attaches the tc programs to the
//! host-side interface of every pod on this node.
//!
//! Like the service half, nothing is written before all three watches have listed once
//! (a half-listed cluster would isolate pods without their allow rules). After that,
//! every burst of events is one recompile and one diff. The compile covers the whole
//! cluster each time (pods of every node go into the ipcache; see `policy::compile` for
//! its cost), but the kernel only sees what changed, and identities keep their numbers.
//!
//! Attachment runs after each pass and on a one-second tick: a pod's veth exists a
//! little before its IP reaches the API, and a pod whose interface cannot be found yet
//! is retried. Until its programs are attached, a new pod's traffic is not policed;
//! attaching from the CNI plugin at interface creation would close that window.

use super::desired::ObjKey;
use super::flows::FlowMsg;
use super::{podnet, pump, Change, Metrics};
use crate::policy::compile::Compiler;
use crate::policy::loader::PolicyDatapath;
use crate::policy::model::{NamespaceInfo, NetworkPolicy, PodInfo, PolicyInput};
use crate::policy::source;
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1 as net;
use kube::api::Api;
use kube::Client;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub node: String,
    /// bpffs directory; the policy datapath pins under `<pin_dir>/policy`.
    pub pin_dir: PathBuf,
    /// The node's network namespace (None: the agent's own, as on a real node).
    pub netns: Option<PathBuf>,
    /// Where pods' cgroups are found (the agent's `--cgroup`).
    pub cgroup: PathBuf,
}

/// A pod as the policy half needs it: the model's view plus where it runs.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PodRec {
    uid: String,
    node: String,
    /// None: no address to police (host network, finished, no IP yet).
    info: Option<PodInfo>,
    /// A pod that will have an address but has none in the API yet (`ips` empty): the
    /// CNI plugin may tell its address first.
    unaddressed: Option<PodInfo>,
}

pub(super) enum PolicyMsg {
    Pod(Change<PodRec>),
    Namespace(Change<NamespaceInfo>),
    Policy(Change<PolicyRead>),
}

impl PolicyMsg {
    fn is_relist(&self) -> bool {
        match self {
            PolicyMsg::Pod(c) => c.is_relist(),
            PolicyMsg::Namespace(c) => c.is_relist(),
            PolicyMsg::Policy(c) => c.is_relist(),
        }
    }
}

/// A NetworkPolicy as this agent could read it. One it cannot read is enforced as
/// deny-all for the pods it selects (`source::deny_all_fallback`: failing closed), or left
/// out when not even its pod selector is readable; either way `error` says why.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PolicyRead {
    enforced: Option<NetworkPolicy>,
    error: Option<String>,
}

fn policy_read(p: &net::NetworkPolicy) -> PolicyRead {
    match source::network_policy(p) {
        Ok(np) => PolicyRead { enforced: Some(np), error: None },
        Err(e) => PolicyRead { enforced: source::deny_all_fallback(p), error: Some(e.to_string()) },
    }
}

pub(super) fn pod_rec(p: &Pod) -> PodRec {
    PodRec {
        uid: p.metadata.uid.clone().unwrap_or_default(),
        node: p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        info: source::pod(p),
        unaddressed: source::pod_any_ip(p).filter(|i| i.ips.is_empty()),
    }
}

#[derive(Default)]
struct State {
    pods: HashMap<ObjKey, PodRec>,
    namespaces: HashMap<ObjKey, NamespaceInfo>,
    policies: HashMap<ObjKey, PolicyRead>,
    listed: [bool; 3],
    /// Addresses the CNI plugin gave local pods whose IP is not in the API yet.
    cni_ips: HashMap<ObjKey, std::net::Ipv4Addr>,
}

impl State {
    fn apply(&mut self, m: PolicyMsg) {
        match m {
            PolicyMsg::Pod(c) => {
                c.apply_to(&mut self.pods, &mut self.listed[0]);
                // Once the API has the pod's address (or the pod is gone), the plugin's
                // word is no longer needed.
                let pods = &self.pods;
                self.cni_ips.retain(|k, _| pods.get(k).is_some_and(|p| p.info.is_none() && p.unaddressed.is_some()));
            }
            PolicyMsg::Namespace(c) => c.apply_to(&mut self.namespaces, &mut self.listed[1]),
            PolicyMsg::Policy(c) => c.apply_to(&mut self.policies, &mut self.listed[2]),
        }
    }

    fn listed(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    fn input(&self, host_ips: Vec<std::net::Ipv4Addr>) -> PolicyInput {
        let mut namespaces: Vec<NamespaceInfo> = self.namespaces.values().cloned().collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pods: Vec<PodInfo> = self
            .pods
            .iter()
            .filter_map(|(k, p)| {
                p.info.clone().or_else(|| {
                    let ip = self.cni_ips.get(k)?;
                    p.unaddressed.clone().map(|i| PodInfo { ips: vec![*ip], ..i })
                })
            })
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut policies: Vec<NetworkPolicy> = self.policies.values().filter_map(|p| p.enforced.clone()).collect();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        PolicyInput { namespaces, pods, policies, host_ips }
    }

    /// uid → pod key of the pods on `node` that have an address.
    fn local_pods(&self, node: &str) -> BTreeMap<String, ObjKey> {
        self.pods
            .iter()
            .filter(|(_, p)| p.node == node && p.info.is_some() && !p.uid.is_empty())
            .map(|(k, p)| (p.uid.clone(), k.clone()))
            .collect()
    }
}

/// Interfaces the programs are attached to, by pod UID.
#[derive(Default)]
struct Attachments {
    by_uid: BTreeMap<String, String>,
}

impl Attachments {
    fn reconcile(
        &mut self,
        dp: &mut PolicyDatapath,
        cfg: &PolicyConfig,
        local: &BTreeMap<String, ObjKey>,
        metrics: &Metrics,
    ) {
        let gone: Vec<String> = self.by_uid.keys().filter(|u| !local.contains_key(*u)).cloned().collect();
        for uid in gone {
            let ifname = self.by_uid.remove(&uid).unwrap_or_default();
            // The veth usually left with the pod, which detached the programs; this
            // removes the link pins (and detaches if the interface is still there).
            if let Err(e) = dp.detach(&ifname) {
                tracing::debug!("detaching from {ifname} (pod {uid} gone): {e}");
            }
        }
        for (uid, key) in local {
            if self.by_uid.contains_key(uid) {
                continue;
            }
            match attach_pod(dp, cfg, uid) {
                Ok(ifname) => {
                    tracing::info!(pod = %format!("{}/{}", key.namespace, key.name), %ifname, "policy programs attached");
                    self.by_uid.insert(uid.clone(), ifname);
                }
                Err(e) => {
                    metrics.policy_attach_errors.fetch_add(1, Relaxed);
                    tracing::debug!(pod = %format!("{}/{}", key.namespace, key.name), "not attached yet: {e:#}");
                }
            }
        }
        metrics.policy_interfaces.store(self.by_uid.len() as u64, Relaxed);
        metrics.policy_local_pods.store(local.len() as u64, Relaxed);
    }
}

fn attach_pod(dp: &mut PolicyDatapath, cfg: &PolicyConfig, uid: &str) -> Result<String> {
    let pids = super::pods::pids_by_pod(&cfg.cgroup, &[uid.to_string()]);
    let pid = pids
        .get(uid)
        .and_then(|p| p.first().copied())
        .with_context(|| format!("no process of pod {uid} under {}", cfg.cgroup.display()))?;
    let ifname = podnet::host_interface(cfg.netns.as_deref(), pid)?;
    match &cfg.netns {
        Some(ns) => dp.attach_in_netns(ns, &ifname),
        None => dp.attach(&ifname),
    }
    .with_context(|| format!("attaching to {ifname}"))?;
    Ok(ifname)
}

/// The CNI plugin's request, during ADD, to attach the programs to a new pod's
/// host-side interface; answered once they are attached.
pub struct AttachAsk {
    pub ifname: String,
    /// The pod and the address the plugin gave it (None: not told by the runtime).
    pub pod: Option<(ObjKey, std::net::Ipv4Addr)>,
    pub reply: std::sync::mpsc::SyncSender<Result<(), String>>,
}

/// How long an ask waits for its pod to show up in the watch before it is refused
/// (the plugin's runtime retries the ADD).
const ASK_WAIT: Duration = Duration::from_secs(5);

async fn next_ask(rx: &mut Option<mpsc::UnboundedReceiver<AttachAsk>>) -> Option<AttachAsk> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Starts the Namespace and NetworkPolicy watches and runs the policy loop until the
/// agent stops. Pods arrive on `rx` from the agent's one Pod watch (shared with the flows
/// task); `tx` is the sender the other two watches use. `attach`: the CNI plugin's asks.
pub(super) async fn run(
    client: Client,
    cfg: PolicyConfig,
    metrics: Arc<Metrics>,
    flow_tx: mpsc::UnboundedSender<FlowMsg>,
    tx: mpsc::UnboundedSender<PolicyMsg>,
    rx: mpsc::UnboundedReceiver<PolicyMsg>,
    attach: Option<mpsc::UnboundedReceiver<AttachAsk>>,
) -> Result<()> {
    let mut dp = PolicyDatapath::load(&cfg.pin_dir)
        .with_context(|| format!("loading the policy datapath (pins {})", cfg.pin_dir.display()))?;
    // Numbers the kernel still holds must not be handed to other identities before the
    // first apply replaces them.
    let highest = dp.programmed().identities.keys().max().copied().unwrap_or(0);
    let compiler = Compiler::starting_at(highest + 1);
    tracing::info!(pins = %cfg.pin_dir.display(), reopened = dp.reopened(), "policy datapath loaded");
    if let Err(e) = dp.set_flow_events(true) {
        tracing::warn!("turning policy flow events on: {e}");
    }
    let flow_fd = super::register_ring(dp.flows_fd(), "policy");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(pump(
        Api::<Namespace>::all(client.clone()),
        source::namespace,
        PolicyMsg::Namespace,
        tx.clone(),
        metrics.clone(),
    ));
    tasks.spawn(pump(
        Api::<net::NetworkPolicy>::all(client.clone()),
        policy_read,
        PolicyMsg::Policy,
        tx.clone(),
        metrics.clone(),
    ));
    drop(tx);

    let half = Policy {
        dp,
        compiler,
        state: State::default(),
        attachments: Attachments::default(),
        cfg,
        metrics: metrics.clone(),
        attach,
        asks: Vec::new(),
        ready: Vec::new(),
        flow_fd,
        flow_tx,
    };
    let r = super::driver::drive(half, rx, &metrics, std::future::pending()).await;
    tasks.abort_all();
    r
}

/// The policy half as the [`super::driver`] runs it.
struct Policy {
    dp: PolicyDatapath,
    compiler: Compiler,
    state: State,
    attachments: Attachments,
    cfg: PolicyConfig,
    metrics: Arc<Metrics>,
    attach: Option<mpsc::UnboundedReceiver<AttachAsk>>,
    /// Asks waiting for their pod to show up in the watch.
    asks: Vec<(AttachAsk, Instant)>,
    /// Asks to answer at the end of this pass.
    ready: Vec<AttachAsk>,
    flow_fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    flow_tx: mpsc::UnboundedSender<FlowMsg>,
}

impl super::driver::Half for Policy {
    type Msg = PolicyMsg;

    fn name(&self) -> &'static str {
        "NetworkPolicy"
    }

    fn apply(&mut self, m: PolicyMsg) -> bool {
        let relist = m.is_relist();
        self.state.apply(m);
        relist
    }

    fn listed(&self) -> bool {
        self.state.listed()
    }

    /// The plugin's asks: the pod's address goes into this pass's compile, so the
    /// answer (and the host end coming up) waits for maps that police it.
    fn prepare(&mut self) -> bool {
        self.ready = take_ready_asks(&mut self.asks, &mut self.state);
        self.ready.iter().any(|a| a.pod.is_some())
    }

    fn write(&mut self) -> u64 {
        match sync(&mut self.dp, &mut self.compiler, &self.state, &self.cfg, &self.metrics) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!("policy sync: {e:#}");
                1
            }
        }
    }

    fn finish(&mut self, written: bool) {
        for ask in std::mem::take(&mut self.ready) {
            let r = if !written {
                Err("the policy maps could not be written (see the agent's log)".to_string())
            } else {
                match &self.cfg.netns {
                    Some(ns) => self.dp.attach_in_netns(ns, &ask.ifname),
                    None => self.dp.attach(&ask.ifname),
                }
                .map(|_| ())
                .map_err(|e| format!("attaching the policy programs to {}: {e}", ask.ifname))
            };
            match &r {
                Ok(()) => tracing::info!(ifname = %ask.ifname, pod = ?ask.pod, "policy programs attached at CNI ADD"),
                Err(e) => tracing::warn!("{e}"),
            }
            let _ = ask.reply.send(r);
        }
        let local = self.state.local_pods(&self.cfg.node);
        self.attachments.reconcile(&mut self.dp, &self.cfg, &local, &self.metrics);
    }

    async fn side(&mut self) -> super::driver::Woke {
        use super::driver::Woke;
        tokio::select! {
            ask = next_ask(&mut self.attach) => match ask {
                Some(ask) => {
                    self.asks.push((ask, Instant::now()));
                    Woke::Pass
                }
                None => {
                    self.attach = None;
                    Woke::Handled
                }
            },
            events = super::ring_events(&mut self.flow_fd, || self.dp.read_flows(), &self.metrics, "policy") => {
                if !events.is_empty() {
                    let _ = self.flow_tx.send(FlowMsg::Policy(events));
                }
                Woke::Handled
            }
        }
    }

    fn synced<'m>(&self, m: &'m Metrics) -> &'m std::sync::atomic::AtomicU64 {
        &m.policy_synced
    }

    fn last_write<'m>(&self, m: &'m Metrics) -> Option<&'m std::sync::atomic::AtomicU64> {
        Some(&m.policy_last_sync_ns)
    }
}

/// The asks that can be answered now: their pod is known (its address recorded for
/// the compile) or they name none; asks whose pod has not shown up within
/// [`ASK_WAIT`] are refused here.
fn take_ready_asks(asks: &mut Vec<(AttachAsk, Instant)>, state: &mut State) -> Vec<AttachAsk> {
    let mut ready = Vec::new();
    for (ask, since) in std::mem::take(asks) {
        match &ask.pod {
            None => ready.push(ask),
            Some((key, ip)) => match state.pods.get(key) {
                Some(p) => {
                    if p.info.is_none() && p.unaddressed.is_some() {
                        state.cni_ips.insert(key.clone(), *ip);
                    }
                    ready.push(ask);
                }
                None if since.elapsed() < ASK_WAIT => asks.push((ask, since)),
                None => {
                    let _ = ask.reply.send(Err(format!(
                        "pod {}/{} is not in the API as this agent sees it (after {ASK_WAIT:?})",
                        key.namespace, key.name
                    )));
                }
            },
        }
    }
    ready
}

fn sync(
    dp: &mut PolicyDatapath,
    compiler: &mut Compiler,
    state: &State,
    cfg: &PolicyConfig,
    metrics: &Metrics,
) -> Result<()> {
    for (k, p) in &state.policies {
        if let Some(e) = &p.error {
            let what = if p.enforced.is_some() {
                "enforced as deny-all for its pods"
            } else {
                "left out (its pod selector is unreadable)"
            };
            tracing::warn!(policy = %format!("{}/{}", k.namespace, k.name), "{what}: {e}");
        }
    }
    let host_ips = podnet::node_addresses(cfg.netns.as_deref()).context("reading the node's addresses")?;
    let input = state.input(host_ips);
    let compiled = compiler.compile(&input, Some(&cfg.node));
    let stats = dp.apply(&compiled).context("writing the policy maps")?;
    tracing::debug!(?stats, identities = compiled.identities.len(), entries = compiled.entries.len(), "policy applied");
    metrics.policy_identities.store(compiled.identities.len() as u64, Relaxed);
    metrics.policy_entries.store(compiled.entries.len() as u64, Relaxed);
    metrics.policy_rejected.store(state.policies.values().filter(|p| p.error.is_some()).count() as u64, Relaxed);
    metrics.map_writes.fetch_add(stats.changes() as u64, Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn pod(ns: &str, name: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": ip.map(|ip| serde_json::json!({"podIP": ip})).unwrap_or(serde_json::json!({})),
        }))
        .unwrap()
    }

    fn listed_with(pods: &[Pod]) -> State {
        let mut s = State::default();
        let all =
            pods.iter().map(|p| (ObjKey::new("default", p.metadata.name.as_deref().unwrap()), pod_rec(p))).collect();
        s.apply(PolicyMsg::Pod(Change::Relist(all)));
        s.apply(PolicyMsg::Namespace(Change::Relist(HashMap::new())));
        s.apply(PolicyMsg::Policy(Change::Relist(HashMap::new())));
        s
    }

    fn ask(name: &str, ip: [u8; 4]) -> (AttachAsk, std::sync::mpsc::Receiver<Result<(), String>>) {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        let pod = Some((ObjKey::new("default", name), Ipv4Addr::from(ip)));
        (AttachAsk { ifname: format!("ks-{name}"), pod, reply }, rx)
    }

    #[test]
    fn the_plugins_address_gives_a_pod_without_an_api_ip_its_identity() {
        let mut state = listed_with(&[pod("default", "new", None), pod("default", "old", Some("10.200.0.5"))]);
        assert!(state.input(vec![]).pods.iter().all(|p| p.name != "new"), "no address yet: not in the ipcache");
        let (a, _rx) = ask("new", [10, 200, 0, 9]);
        let mut asks = vec![(a, Instant::now())];
        let ready = take_ready_asks(&mut asks, &mut state);
        assert_eq!(ready.len(), 1);
        assert!(asks.is_empty());
        let input = state.input(vec![]);
        let new = input.pods.iter().find(|p| p.name == "new").expect("the new pod is compiled");
        assert_eq!(new.ips, vec![Ipv4Addr::new(10, 200, 0, 9)]);
        assert_eq!(new.labels["app"], "new");
        // Once the API has the address, the plugin's word is dropped.
        state.apply(PolicyMsg::Pod(Change::Apply(
            ObjKey::new("default", "new"),
            pod_rec(&pod("default", "new", Some("10.200.0.9"))),
        )));
        assert!(state.cni_ips.is_empty());
        // A pod that already has an API address keeps it (the plugin cannot override it).
        let (a, _rx) = ask("old", [10, 200, 0, 77]);
        take_ready_asks(&mut vec![(a, Instant::now())], &mut state);
        let input = state.input(vec![]);
        assert_eq!(input.pods.iter().find(|p| p.name == "old").unwrap().ips, vec![Ipv4Addr::new(10, 200, 0, 5)]);
    }

    #[test]
    fn an_ask_for_a_pod_the_watch_has_not_shown_waits_then_is_refused() {
        let mut state = listed_with(&[]);
        let (a, rx) = ask("unseen", [10, 200, 0, 9]);
        let mut asks = vec![(a, Instant::now())];
        assert!(take_ready_asks(&mut asks, &mut state).is_empty());
        assert_eq!(asks.len(), 1, "kept while the watch may still deliver the pod");
        asks[0].1 = Instant::now() - ASK_WAIT - Duration::from_millis(1);
        assert!(take_ready_asks(&mut asks, &mut state).is_empty());
        assert!(asks.is_empty());
        let refused = rx.try_recv().unwrap().unwrap_err();
        assert!(refused.contains("default/unseen"), "{refused}");
    }
}
