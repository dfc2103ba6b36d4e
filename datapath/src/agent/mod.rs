//! The service half of `kubeshift agent`: watches Services and endpoint objects, keeps
//! the node's socket load balancer maps equal to what they say, and serves metrics.
//!
//! Every watch runs in its own task and sends plain data (never API objects) to one
//! loop that owns the [`Datapath`]; a kind several halves need (Pods, Services,
//! EndpointSlices) is watched once and converted for each of them. Nothing is written
//! before every watch has listed once: a restarted agent that wrote a Service before its
//! endpoints arrived would refuse that Service's traffic for a moment. After that first full reconcile (which
//! also removes services left in the pins by an earlier run), an event marks only its
//! Service dirty and only that Service's map entries are recomputed and rewritten.
//!
//! The same loop drains the datapath's flow ring buffer when the kernel says it holds
//! events (no polling), tags each event with the Service its VIP:port belongs to and
//! hands it to the flows task ([`flows`]), which knows the pods and serves `/flows`.

pub mod desired;
pub mod driver;
pub mod flows;
pub mod frontends;
pub mod http;
pub mod leaks;
pub mod memory;
pub mod metrics;
pub mod modes;
pub mod nodeport;
pub mod podnet;
pub mod pods;
pub mod policy;
pub mod source;

use crate::{Affinity, Backend, Datapath, DatapathConfig, ServiceKey};
use anyhow::{Context, Result};
use desired::{desired_for_service, diff, ObjKey, Plan, ServiceSpec, Wanted};
use flows::FlowMsg;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::{Client, Resource};
use metrics::Metrics;
use source::EndpointsOf;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// Where endpoints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointsApi {
    SliceV1,
    SliceV1beta1,
    CoreEndpoints,
}

impl EndpointsApi {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointsApi::SliceV1 => "discovery.k8s.io/v1",
            EndpointsApi::SliceV1beta1 => "discovery.k8s.io/v1beta1",
            EndpointsApi::CoreEndpoints => "v1/Endpoints",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub datapath: DatapathConfig,
    pub metrics: Option<SocketAddr>,
    /// None: discover what the apiserver serves.
    pub endpoints_api: Option<EndpointsApi>,
    /// NetworkPolicy enforcement on this node's pods (None: off).
    pub policy: Option<policy::PolicyConfig>,
    /// NodePort / external-IP frontends on the node's interface (None: off).
    pub nodeport: Option<frontends::NodePortConfig>,
}

/// `kubeshift agent --mode standby`: only the node's range and the overlay (no eBPF
/// programs, no CNI conf, no service takeover), with `/readyz` answering for the
/// overlay alone. The legacy network keeps serving this node's pods; the overlay lets
/// them reach pods on nodes already moved to kubeshift's network.
pub async fn run_standby(
    client: Client,
    cfg: crate::overlay::OverlayConfig,
    metrics_addr: Option<SocketAddr>,
) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    metrics.node.lock().unwrap().clone_from(&cfg.node);
    metrics.standby.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(addr) = metrics_addr {
        http::start(addr, metrics.clone()).await?;
    }
    crate::overlay::standby::run(client, cfg, metrics.overlay.clone()).await
}

/// The newest endpoints API the apiserver serves.
pub async fn discover_endpoints_api(client: &Client) -> Result<EndpointsApi> {
    let groups = client.list_api_groups().await.context("listing API groups")?;
    let served: Vec<String> = groups
        .groups
        .iter()
        .filter(|g| g.name == "discovery.k8s.io")
        .flat_map(|g| g.versions.iter().map(|v| v.version.clone()))
        .collect();
    Ok(if served.iter().any(|v| v == "v1") {
        EndpointsApi::SliceV1
    } else if served.iter().any(|v| v == "v1beta1") {
        EndpointsApi::SliceV1beta1
    } else {
        EndpointsApi::CoreEndpoints
    })
}

enum Change<T> {
    Apply(ObjKey, T),
    Delete(ObjKey),
    /// The complete set after a (re)list: objects missing from it are gone.
    Relist(HashMap<ObjKey, T>),
}

enum Msg {
    Service(Change<Option<ServiceSpec>>),
    Endpoints(Change<Option<EndpointsOf>>),
}

impl<T> Change<T> {
    fn is_relist(&self) -> bool {
        matches!(self, Change::Relist(_))
    }
}

impl<T> Change<Option<T>> {
    /// [`Change::apply_to`] for a mirror that keeps only the objects its consumer serves:
    /// one that converted to None (most Services, for the NodePort half) is not kept,
    /// rather than kept as a key with nothing.
    fn apply_some_to(self, map: &mut HashMap<ObjKey, T>, listed: &mut bool) {
        match self {
            Change::Apply(k, Some(v)) => {
                map.insert(k, v);
            }
            Change::Apply(k, None) | Change::Delete(k) => {
                map.remove(&k);
            }
            Change::Relist(all) => {
                *map = all.into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
                *listed = true;
            }
        }
    }
}

impl Msg {
    fn is_relist(&self) -> bool {
        match self {
            Msg::Service(c) => c.is_relist(),
            Msg::Endpoints(c) => c.is_relist(),
        }
    }
}

fn obj_key<K: Resource>(o: &K) -> ObjKey {
    let m = o.meta();
    ObjKey::new(m.namespace.as_deref().unwrap_or(""), m.name.as_deref().unwrap_or(""))
}

/// One consumer of a watch: how it converts an object to its plain data, how that is
/// wrapped into its loop's message, its channel, and the plain data of a (re)list in
/// progress.
struct Tap<K, T, M> {
    convert: Box<dyn Fn(&K) -> T + Send>,
    wrap: fn(Change<T>) -> M,
    tx: mpsc::UnboundedSender<M>,
    buffer: HashMap<ObjKey, T>,
}

/// A [`Tap`] with its plain-data type erased, so one watch can feed consumers that keep
/// different data (the service half's `ServiceSpec`, the NodePort half's frontends …).
trait Sink<K>: Send {
    /// False once the consumer's loop is gone (it stopped, or never started).
    fn event(&mut self, ev: &watcher::Event<K>) -> bool;
}

impl<K: Resource, T: Send, M: Send> Sink<K> for Tap<K, T, M> {
    fn event(&mut self, ev: &watcher::Event<K>) -> bool {
        let msg = match ev {
            watcher::Event::Apply(o) => Change::Apply(obj_key(o), (self.convert)(o)),
            watcher::Event::Delete(o) => Change::Delete(obj_key(o)),
            watcher::Event::Init => {
                self.buffer.clear();
                return true;
            }
            watcher::Event::InitApply(o) => {
                self.buffer.insert(obj_key(o), (self.convert)(o));
                return true;
            }
            watcher::Event::InitDone => Change::Relist(std::mem::take(&mut self.buffer)),
        };
        self.tx.send((self.wrap)(msg)).is_ok()
    }
}

fn tap<K, T, M>(
    convert: impl Fn(&K) -> T + Send + 'static,
    wrap: fn(Change<T>) -> M,
    tx: mpsc::UnboundedSender<M>,
) -> Box<dyn Sink<K>>
where
    K: Resource + 'static,
    T: Send + 'static,
    M: Send + 'static,
{
    Box::new(Tap { convert: Box::new(convert), wrap, tx, buffer: HashMap::new() })
}

/// Objects per list request of a (re)list. kube-runtime holds a whole page of decoded
/// objects while it hands them out one by one, and the plain data made from them is
/// allocated in between; once the page is freed, its memory is spread over pages that
/// still hold plain data and cannot be given back. Its default of 500 (three watches at
/// once, Pods and slices several KB decoded each) left ~10 MB so at 10,000 Services.
/// 100 costs 100 list requests for 10,000 objects at start, each a small read.
const LIST_PAGE: u32 = 100;

/// Runs one watch forever, converting each object to plain data for every consumer as
/// soon as it arrives and dropping the object: only the consumers' plain data outlives an
/// event. Several halves that need the same kind share one watch, so each object is
/// received and decoded once (a full API object is many times its plain data, and a
/// relist decodes all of them). Watch errors are retried with kube-runtime's backoff;
/// they are logged and counted, never fatal. Ends when every consumer is gone.
async fn pump_to<K>(api: Api<K>, mut sinks: Vec<Box<dyn Sink<K>>>, metrics: Arc<Metrics>)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    use kube::runtime::WatchStreamExt;
    let config = watcher::Config::default().page_size(LIST_PAGE);
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                sinks.retain_mut(|s| s.event(&ev));
                if sinks.is_empty() {
                    return;
                }
            }
            Err(e) => {
                metrics.watch_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!("watch: {e}");
            }
        }
    }
}

/// A watch with one consumer.
async fn pump<K, T, M>(
    api: Api<K>,
    convert: impl Fn(&K) -> T + Send + 'static,
    wrap: fn(Change<T>) -> M,
    tx: mpsc::UnboundedSender<M>,
    metrics: Arc<Metrics>,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    T: Send + 'static,
    M: Send + 'static,
{
    pump_to(api, vec![tap(convert, wrap, tx)], metrics).await
}

/// The API's view, kept as plain data, and what was written for each Service.
#[derive(Default)]
struct State {
    services: HashMap<ObjKey, ServiceSpec>,
    endpoints: HashMap<ObjKey, EndpointsOf>,
    /// Service → the endpoint objects that name it. A Vec, not a set: a Service has one
    /// slice or a few, and an ordered set's node is ~500 bytes even for one (×10,000).
    endpoints_of: HashMap<ObjKey, Vec<ObjKey>>,
    services_listed: bool,
    endpoints_listed: bool,
    programmed: HashMap<ObjKey, Written>,
    /// Service port → its Service, to name the Service of a flow event.
    by_vip: HashMap<ServiceKey, ObjKey>,
    /// This node's own addresses: NodePorts are served on them to local clients.
    local_ips: Vec<std::net::Ipv4Addr>,
}

/// What was written for one Service, stored compactly: a `Wanted` (BTreeMap) allocates
/// a node of 11 slots, ~550 bytes, for the usual one or two entries, per Service.
#[derive(Debug, Default)]
struct Written(Box<[WrittenEntry]>);

/// One entry of a [`Wanted`], as its iterator yields it.
type WrittenEntry = (ServiceKey, (Vec<Backend>, Affinity));

impl Written {
    fn of(w: Wanted) -> Written {
        Written(w.into_iter().collect())
    }

    fn wanted(&self) -> Wanted {
        self.0.iter().cloned().collect()
    }
}

fn service_keys(spec: &ServiceSpec) -> impl Iterator<Item = ServiceKey> + '_ {
    spec.cluster_ips.iter().flat_map(move |vip| {
        spec.ports.iter().map(move |p| ServiceKey { vip: *vip, port: p.port, protocol: p.protocol })
    })
}

impl State {
    fn wanted(&self, svc: &ObjKey) -> Wanted {
        let Some(spec) = self.services.get(svc) else {
            return Wanted::new();
        };
        let sets: Vec<_> = self
            .endpoints_of
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(|k| self.endpoints.get(k))
            .flat_map(|e| e.sets.iter())
            .collect();
        desired_for_service(spec, &sets, &self.local_ips)
    }

    fn set_service(&mut self, k: ObjKey, v: Option<ServiceSpec>, dirty: &mut BTreeSet<ObjKey>) {
        let old = match &v {
            Some(s) => self.services.insert(k.clone(), s.clone()),
            None => self.services.remove(&k),
        };
        if old == v {
            return;
        }
        for sk in old.iter().flat_map(service_keys) {
            if self.by_vip.get(&sk) == Some(&k) {
                self.by_vip.remove(&sk);
            }
        }
        for sk in v.iter().flat_map(service_keys) {
            self.by_vip.insert(sk, k.clone());
        }
        dirty.insert(k);
    }

    fn set_endpoints(&mut self, k: ObjKey, v: Option<EndpointsOf>, dirty: &mut BTreeSet<ObjKey>) {
        let old = match &v {
            Some(e) => self.endpoints.insert(k.clone(), e.clone()),
            None => self.endpoints.remove(&k),
        };
        if old == v {
            return;
        }
        if let Some(o) = old {
            if let Some(set) = self.endpoints_of.get_mut(&o.service) {
                set.retain(|e| *e != k);
                if set.is_empty() {
                    self.endpoints_of.remove(&o.service);
                }
            }
            dirty.insert(o.service);
        }
        if let Some(n) = v {
            let of = self.endpoints_of.entry(n.service.clone()).or_default();
            if !of.contains(&k) {
                // Room for exactly this one: a first push would reserve four.
                of.reserve_exact(1);
                of.push(k);
            }
            dirty.insert(n.service);
        }
    }

    fn apply(&mut self, msg: Msg, dirty: &mut BTreeSet<ObjKey>) {
        match msg {
            Msg::Service(Change::Apply(k, v)) => self.set_service(k, v, dirty),
            Msg::Service(Change::Delete(k)) => self.set_service(k, None, dirty),
            Msg::Service(Change::Relist(all)) => {
                let gone: Vec<ObjKey> = self.services.keys().filter(|k| !all.contains_key(*k)).cloned().collect();
                for k in gone {
                    self.set_service(k, None, dirty);
                }
                for (k, v) in all {
                    self.set_service(k, v, dirty);
                }
                self.services_listed = true;
            }
            Msg::Endpoints(Change::Apply(k, v)) => self.set_endpoints(k, v, dirty),
            Msg::Endpoints(Change::Delete(k)) => self.set_endpoints(k, None, dirty),
            Msg::Endpoints(Change::Relist(all)) => {
                let gone: Vec<ObjKey> = self.endpoints.keys().filter(|k| !all.contains_key(*k)).cloned().collect();
                for k in gone {
                    self.set_endpoints(k, None, dirty);
                }
                for (k, v) in all {
                    self.set_endpoints(k, v, dirty);
                }
                self.endpoints_listed = true;
            }
        }
    }
}

/// Writes a plan; returns the number of failed writes (each failed key is retried on
/// the next pass because `programmed` then disagrees with the maps' wanted state).
fn execute(dp: &mut Datapath, plan: &Plan, metrics: &Metrics) -> usize {
    let mut failed = 0;
    for k in &plan.removes {
        if let Err(e) = dp.remove_service(k) {
            tracing::warn!("removing {k:?}: {e}");
            failed += 1;
        }
    }
    for (k, b, a) in &plan.upserts {
        if let Err(e) = dp.upsert_service(*k, b.clone(), *a) {
            tracing::warn!("programming {k:?}: {e}");
            failed += 1;
        }
    }
    metrics
        .map_writes
        .fetch_add((plan.removes.len() + plan.upserts.len()) as u64, std::sync::atomic::Ordering::Relaxed);
    failed
}

fn programmed_now(dp: &Datapath) -> Wanted {
    dp.services().into_iter().map(|(k, b, a)| (k, (b, a))).collect()
}

/// A duplicate of a ring buffer's fd, registered with the runtime's epoll: it turns
/// readable when the programs submit events to a drained ring. None (logged) if that
/// fails; the datapath works on without its events.
fn register_ring(fd: std::os::fd::BorrowedFd<'_>, what: &str) -> Option<AsyncFd<std::os::fd::OwnedFd>> {
    let registered = fd.try_clone_to_owned().and_then(|fd| {
        // SAFETY: the OwnedFd keeps this fd open and unchanged for as long as the AsyncFd
        // that owns it lives.
        unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(std::io::Error::from)
    });
    registered.map_err(|e| tracing::warn!("{what} flow events unavailable: {e}")).ok()
}

/// The next batch of a ring's events, read with `read` once the kernel says it holds
/// some (no polling). Pending forever without a ring, or once waiting on it failed
/// (logged; the datapath works on without its events).
async fn ring_events<E>(
    fd: &mut Option<AsyncFd<std::os::fd::OwnedFd>>,
    read: impl FnOnce() -> Vec<E>,
    metrics: &Metrics,
    what: &str,
) -> Vec<E> {
    let Some(ring) = fd.as_ref() else { return std::future::pending().await };
    let e = match ring.readable().await {
        Ok(mut ready) => {
            let events = read();
            // After draining: tokio keeps the fd ready if the kernel signalled again
            // meanwhile, so no wakeup is lost.
            ready.clear_ready();
            if !events.is_empty() {
                metrics.flow_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return events;
        }
        Err(e) => e,
    };
    tracing::warn!("{what} flow ring buffer: {e}; no more {what} flow events");
    *fd = None;
    Vec::new()
}

impl<T> Change<T> {
    /// Applies the change to a watch's plain-data mirror; a relist replaces it and marks
    /// the watch as listed.
    fn apply_to(self, map: &mut HashMap<ObjKey, T>, listed: &mut bool) {
        match self {
            Change::Apply(k, v) => {
                map.insert(k, v);
            }
            Change::Delete(k) => {
                map.remove(&k);
            }
            Change::Relist(all) => {
                *map = all;
                *listed = true;
            }
        }
    }
}

fn update_gauges(dp: &Datapath, metrics: &Metrics) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = dp.services();
    metrics.service_ports.store(s.len() as u64, Relaxed);
    metrics.backends.store(s.iter().map(|(_, b, _)| b.len() as u64).sum(), Relaxed);
}

/// Runs until SIGINT/SIGTERM. The datapath stays attached and pinned when it returns.
pub async fn run(client: Client, cfg: AgentConfig) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = cfg.metrics {
        http::start(addr, metrics.clone()).await?;
    }
    run_with(client, cfg, metrics, None).await
}

/// The active datapath with metrics served by the caller (`cfg.metrics` is not bound
/// here). `attach`: the CNI plugin's attach requests, handed to the policy half.
pub async fn run_with(
    client: Client,
    cfg: AgentConfig,
    metrics: Arc<Metrics>,
    attach: Option<mpsc::UnboundedReceiver<policy::AttachAsk>>,
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let ep_api = match cfg.endpoints_api {
        Some(a) => a,
        None => discover_endpoints_api(&client).await?,
    };
    let mut dp = Datapath::load(cfg.datapath.clone()).with_context(|| {
        format!(
            "loading the datapath (pins {}, cgroup {})",
            cfg.datapath.pin_dir.display(),
            cfg.datapath.cgroup.display()
        )
    })?;
    tracing::info!(
        node = %cfg.node, pins = %cfg.datapath.pin_dir.display(), cgroup = %cfg.datapath.cgroup.display(),
        reopened = dp.reopened(), upgraded = dp.upgraded_programs(), programmed = dp.services().len(),
        endpoints = ep_api.as_str(), "datapath loaded"
    );
    *metrics.endpoints_api.lock().unwrap() = ep_api.as_str().to_string();
    // An earlier run (or an operator) may have switched events off; this agent reads them.
    if let Err(e) = dp.set_flow_events(true) {
        tracing::warn!("turning flow events on: {e}");
    }
    let flow_fd = register_ring(dp.flows_fd(), "socket LB");
    metrics.node.lock().unwrap().clone_from(&cfg.node);
    metrics.policy_enabled.store(cfg.policy.is_some(), Relaxed);
    metrics.nodeport_enabled.store(cfg.nodeport.is_some(), Relaxed);
    update_gauges(&dp, &metrics);

    let (tx, rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    // Pods cluster-wide, not only this node's: a destination can be any pod, and its
    // labels are only in the Pod (an EndpointSlice's targetRef names it without them).
    let (flow_tx, flow_rx) = mpsc::unbounded_channel();
    tasks.spawn(flows::run(cfg.node.clone(), cfg.datapath.cgroup.clone(), flow_rx, metrics.flows.clone()));
    let mut pod_sinks = vec![tap(pods::pod_info, FlowMsg::Pods, flow_tx.clone())];
    let mut service_sinks = vec![tap(|s: &Service| source::service(s), Msg::Service, tx.clone())];
    if let Some(pc) = cfg.policy.clone() {
        let (policy_tx, policy_rx) = mpsc::unbounded_channel();
        pod_sinks.push(tap(policy::pod_rec, policy::PolicyMsg::Pod, policy_tx.clone()));
        let (client, metrics, flow_tx) = (client.clone(), metrics.clone(), flow_tx.clone());
        tasks.spawn(async move {
            // The service half keeps serving if the policy half cannot start (e.g. a
            // pinned map of another layout); the log and `_policy_synced 0` say so.
            if let Err(e) = policy::run(client, pc, metrics, flow_tx, policy_tx, policy_rx, attach).await {
                tracing::error!("NetworkPolicy enforcement stopped: {e:#}");
            }
        });
    }
    let mut nodeport_tx = None;
    if let Some(nc) = cfg.nodeport.clone() {
        let (np_tx, np_rx) = mpsc::unbounded_channel();
        service_sinks.push(tap(frontends::service, frontends::NpMsg::Service, np_tx.clone()));
        nodeport_tx = Some(np_tx);
        let (client, metrics, flow_tx) = (client.clone(), metrics.clone(), flow_tx.clone());
        tasks.spawn(async move {
            if let Err(e) = frontends::run(client, nc, ep_api, metrics, flow_tx, np_rx).await {
                tracing::error!("NodePort frontends stopped: {e:#}");
            }
        });
    }
    tasks.spawn(pump_to(Api::<Pod>::all(client.clone()), pod_sinks, metrics.clone()));
    tasks.spawn(pump_to(Api::<Service>::all(client.clone()), service_sinks, metrics.clone()));
    match ep_api {
        EndpointsApi::SliceV1 => {
            let mut sinks = vec![tap(source::slice_v1, Msg::Endpoints, tx.clone())];
            sinks.extend(nodeport_tx.map(|np| tap(frontends::slice, frontends::NpMsg::Slice, np)));
            tasks.spawn(pump_to(Api::<EndpointSlice>::all(client.clone()), sinks, metrics.clone()));
        }
        EndpointsApi::SliceV1beta1 => {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
                "endpointslices",
            );
            let mut sinks = vec![tap(source::slice_v1beta1, Msg::Endpoints, tx.clone())];
            let np_slice = |o: &DynamicObject| source::v1beta1_as_v1(o).as_ref().and_then(frontends::slice);
            sinks.extend(nodeport_tx.map(|np| tap(np_slice, frontends::NpMsg::Slice, np)));
            tasks.spawn(pump_to(Api::<DynamicObject>::all_with(client.clone(), &ar), sinks, metrics.clone()));
        }
        EndpointsApi::CoreEndpoints => {
            // The NodePort half needs slices (node names of endpoints) and stops on its own.
            #[allow(deprecated)]
            let api = Api::<k8s_openapi::api::core::v1::Endpoints>::all(client.clone());
            #[allow(deprecated)]
            tasks.spawn(pump(
                api,
                |e: &k8s_openapi::api::core::v1::Endpoints| source::endpoints(e),
                Msg::Endpoints,
                tx.clone(),
                metrics.clone(),
            ));
        }
    }
    drop(tx);

    let mut state = State::default();
    // kube-proxy serves NodePorts on the node's InternalIP to the node's own pods and
    // processes too; with kube-proxy gone, only the socket LB can.
    match Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()).get(&cfg.node).await {
        Ok(n) => match nodeport::node_info(&n) {
            Ok(info) => state.local_ips = vec![info.ip],
            Err(e) => tracing::warn!("NodePorts for local clients not served: {e}"),
        },
        Err(e) => tracing::warn!("NodePorts for local clients not served: reading Node {}: {e}", cfg.node),
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    let half =
        Services { dp, state, dirty: BTreeSet::new(), reconciled: false, metrics: metrics.clone(), flow_fd, flow_tx };
    let r = driver::drive(half, rx, &metrics, stop).await;
    tasks.abort_all();
    r?;
    tracing::info!("stopping; the datapath stays attached and pinned");
    Ok(())
}

/// The service half as the [`driver`] runs it.
struct Services {
    dp: Datapath,
    state: State,
    /// Services whose entries are not written as wanted yet.
    dirty: BTreeSet<ObjKey>,
    /// The first write compared everything in the maps (the pins may hold anything an
    /// earlier run wrote); after that, only dirty Services are.
    reconciled: bool,
    metrics: Arc<Metrics>,
    flow_fd: Option<AsyncFd<std::os::fd::OwnedFd>>,
    flow_tx: mpsc::UnboundedSender<FlowMsg>,
}

impl Services {
    fn reconcile_all(&mut self) -> usize {
        let state = &mut self.state;
        let mut wanted = Wanted::new();
        state.programmed.clear();
        for svc in state.services.keys() {
            let w = state.wanted(svc);
            wanted.extend(w.iter().map(|(k, v)| (*k, v.clone())));
            state.programmed.insert(svc.clone(), Written::of(w));
        }
        let plan = diff(&programmed_now(&self.dp), &wanted);
        tracing::info!(
            services = state.services.len(),
            writes = plan.upserts.len(),
            stale = plan.removes.len(),
            "initial reconcile"
        );
        let failed = execute(&mut self.dp, &plan, &self.metrics);
        self.dirty.clear();
        if failed > 0 {
            // Not reconciled yet: the retry compares everything again.
            self.dirty.extend(state.services.keys().cloned());
        } else {
            self.reconciled = true;
        }
        failed
    }

    fn write_dirty(&mut self) -> usize {
        let mut failed = 0;
        for svc in std::mem::take(&mut self.dirty) {
            let wanted = self.state.wanted(&svc);
            let current = self.state.programmed.remove(&svc).map(|w| w.wanted()).unwrap_or_default();
            let plan = diff(&current, &wanted);
            let f = execute(&mut self.dp, &plan, &self.metrics);
            if f > 0 {
                failed += f;
                self.dirty.insert(svc.clone());
                // What is in the maps for this service is now partly unknown: take it
                // from the datapath's own mirror.
                let now = programmed_now(&self.dp);
                let keys: BTreeSet<_> = current.keys().chain(wanted.keys()).collect();
                let actual: Wanted = now.into_iter().filter(|(k, _)| keys.contains(k)).collect();
                self.state.programmed.insert(svc, Written::of(actual));
            } else if !wanted.is_empty() {
                self.state.programmed.insert(svc, Written::of(wanted));
            }
        }
        failed
    }
}

impl driver::Half for Services {
    type Msg = Msg;

    fn name(&self) -> &'static str {
        "services"
    }

    fn apply(&mut self, m: Msg) -> bool {
        let relist = m.is_relist();
        self.state.apply(m, &mut self.dirty);
        relist
    }

    fn listed(&self) -> bool {
        self.state.services_listed && self.state.endpoints_listed
    }

    fn write(&mut self) -> u64 {
        let failed = if self.reconciled { self.write_dirty() } else { self.reconcile_all() };
        update_gauges(&self.dp, &self.metrics);
        failed as u64
    }

    /// Flow events, tagged with the Service their VIP:port belongs to.
    async fn side(&mut self) -> driver::Woke {
        let events = ring_events(&mut self.flow_fd, || self.dp.read_flows(), &self.metrics, "socket LB").await;
        if !events.is_empty() {
            let tagged = events
                .into_iter()
                .map(|e| {
                    let svc = e.protocol.and_then(|protocol| {
                        self.state
                            .by_vip
                            .get(&ServiceKey { vip: *e.service.ip(), port: e.service.port(), protocol })
                            .cloned()
                    });
                    (e, svc)
                })
                .collect();
            let _ = self.flow_tx.send(FlowMsg::SockLb(tagged));
        }
        driver::Woke::Handled
    }

    fn synced<'m>(&self, m: &'m Metrics) -> &'m std::sync::atomic::AtomicU64 {
        &m.synced
    }

    fn last_write<'m>(&self, m: &'m Metrics) -> Option<&'m std::sync::atomic::AtomicU64> {
        Some(&m.last_sync_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::desired::{EndpointAddr, EndpointSet, PortSpec};
    use super::*;
    use crate::{Affinity, Protocol};

    fn svc(vip: &str) -> ServiceSpec {
        ServiceSpec {
            cluster_ips: vec![vip.parse().unwrap()],
            ports: vec![PortSpec { name: "http".into(), port: 80, protocol: Protocol::Tcp }],
            affinity: Affinity::None,
            node_ports: vec![],
        }
    }
    fn eps(svc: &str, ip: &str) -> EndpointsOf {
        EndpointsOf {
            service: ObjKey::new("ns", svc),
            sets: vec![EndpointSet {
                ports: vec![PortSpec { name: "http".into(), port: 8080, protocol: Protocol::Tcp }],
                addresses: vec![EndpointAddr { ip: ip.parse().unwrap(), ready: true }],
            }],
        }
    }

    #[test]
    fn an_endpoint_change_dirties_only_its_service() {
        let mut st = State::default();
        let mut dirty = BTreeSet::new();
        let all: HashMap<_, _> =
            (0..100).map(|i| (ObjKey::new("ns", &format!("s{i}")), Some(svc(&format!("10.96.0.{i}"))))).collect();
        st.apply(Msg::Service(Change::Relist(all)), &mut dirty);
        let slices: HashMap<_, _> = (0..100)
            .map(|i| (ObjKey::new("ns", &format!("s{i}-x")), Some(eps(&format!("s{i}"), "10.244.0.1"))))
            .collect();
        st.apply(Msg::Endpoints(Change::Relist(slices.clone())), &mut dirty);
        assert!(st.services_listed && st.endpoints_listed);
        for k in st.services.keys() {
            let w = st.wanted(k);
            st.programmed.insert(k.clone(), Written::of(w));
        }
        dirty.clear();

        // A relist with nothing changed (a watch restart) dirties nothing.
        st.apply(Msg::Endpoints(Change::Relist(slices)), &mut dirty);
        assert!(dirty.is_empty());

        let s7 = ObjKey::new("ns", "s7");
        st.apply(Msg::Endpoints(Change::Apply(ObjKey::new("ns", "s7-x"), Some(eps("s7", "10.244.0.2")))), &mut dirty);
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![&s7]);
        let plan = diff(&st.programmed[&s7].wanted(), &st.wanted(&s7));
        assert_eq!(plan.upserts.len(), 1);
        assert!(plan.removes.is_empty());

        // A slice moving to another service dirties both; a deleted service wants nothing.
        dirty.clear();
        st.apply(Msg::Endpoints(Change::Apply(ObjKey::new("ns", "s7-x"), Some(eps("s8", "10.244.0.2")))), &mut dirty);
        assert_eq!(dirty.len(), 2);
        st.apply(Msg::Service(Change::Delete(s7.clone())), &mut dirty);
        assert!(st.wanted(&s7).is_empty());
        assert_eq!(diff(&st.programmed[&s7].wanted(), &st.wanted(&s7)).removes.len(), 1);
    }
}
