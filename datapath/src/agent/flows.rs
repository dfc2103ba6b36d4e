//! The flow stream: the datapath's flow events turned into plain [`FlowRecord`]s (who
//! talked to whom, through which Service, with what verdict), the last few thousand
//! kept in memory and fanned out to `GET /flows` readers.
//!
//! The record is the wire format of `kubeshift observe`, and every datapath part
//! (socket LB today; tc policy and NodePort later) emits the same shape: `kind` says
//! which part saw the flow, fields a part does not know stay empty, and readers ignore
//! fields they do not know, so adding a part or a field is not a format change.

use super::desired::ObjKey;
use super::pods::{resolve_cookies, PodIndex, PodInfo};
use crate::nodeport::{NpFlowEvent, NpReason, NpVerdict};
use crate::policy::loader::{DropReason, PolicyFlowEvent, PolicyVerdict};
use crate::policy::model::Direction;
use crate::{FlowEvent, Hook, Protocol, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};

/// Records kept for `GET /flows?last=N`.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Which datapath part saw the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowKind {
    /// Socket load balancer (cgroup connect/sendmsg): a pod's connection to a Service.
    SockLb,
    /// tc NetworkPolicy enforcement on a pod's interface: every drop, and each new
    /// connection allowed.
    Policy,
    /// tc NodePort / external-IP translation on the node's interface: every new
    /// connection and every drop.
    Nodeport,
    /// A kind this reader does not know (a newer agent).
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlowVerdict {
    Forwarded,
    /// Refused or dropped; `drop_reason` says why.
    Dropped,
    #[serde(other)]
    Unknown,
}

impl FlowVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Forwarded => "FORWARDED",
            FlowVerdict::Dropped => "DROPPED",
            FlowVerdict::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FlowProtocol {
    Tcp,
    Udp,
    #[serde(other)]
    Other,
}

impl FlowProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowProtocol::Tcp => "TCP",
            FlowProtocol::Udp => "UDP",
            FlowProtocol::Other => "OTHER",
        }
    }
}

/// `drop_reason` of a connection to a Service without ready endpoints: refused with
/// ECONNREFUSED, as kube-proxy's REJECT rule does. Counted as DROPPED because the
/// packet never reaches a backend, which is also what hubble shows for it.
pub const REASON_NO_ENDPOINTS: &str = "no-endpoints";

/// One side of a flow. Everything is optional: a part fills in what it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Security identity (policy datapath).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
}

/// The Service a flow was addressed to, as the client named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowService {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC.
    pub time: String,
    /// The node whose agent saw the flow.
    pub node: String,
    pub kind: FlowKind,
    pub verdict: FlowVerdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<FlowProtocol>,
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<FlowService>,
    /// Where in the datapath it was seen ("connect", "sendmsg"; tc parts: "ingress" …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observation_point: Option<String>,
    /// The socket's cookie (socket LB), to tell connections of one pod apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_cookie: Option<u64>,
}

/// ns since the epoch of a CLOCK_MONOTONIC timestamp, given both clocks read at one
/// moment. The two clocks differ by a constant (until the wall clock is set), so an
/// event's age on one is its age on the other.
pub fn wall_clock_ns(event_mono_ns: u64, mono_now_ns: u64, real_now_ns: u64) -> u64 {
    let age = mono_now_ns.saturating_sub(event_mono_ns);
    real_now_ns.saturating_sub(age)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Both clocks, read back to back.
pub fn clocks_now() -> (u64, u64) {
    (clock_ns(libc::CLOCK_MONOTONIC), clock_ns(libc::CLOCK_REALTIME))
}

pub fn rfc3339(unix_ns: u64) -> String {
    match k8s_openapi::jiff::Timestamp::from_nanosecond(unix_ns as i128) {
        Ok(t) => t.to_string(),
        Err(_) => unix_ns.to_string(),
    }
}

fn endpoint_of(p: &PodInfo) -> FlowEndpoint {
    FlowEndpoint {
        ip: p.ip,
        port: None,
        namespace: Some(p.namespace.clone()),
        pod: Some(p.name.clone()),
        labels: p.labels.clone(),
        identity: None,
    }
}

/// What the agent knows when it turns an event into a record.
pub struct Context<'a> {
    pub node: &'a str,
    pub pods: &'a PodIndex,
    /// netns cookie → pod UID (pods of this node).
    pub cookies: &'a HashMap<u64, String>,
    pub mono_now_ns: u64,
    pub real_now_ns: u64,
}

/// One socket-LB event as a record. `service` is the Service the VIP:port belongs to.
pub fn sock_lb_record(ev: &FlowEvent, service: Option<&ObjKey>, cx: &Context) -> FlowRecord {
    let (verdict, reason) = match ev.verdict {
        Verdict::Forwarded => (FlowVerdict::Forwarded, None),
        Verdict::RefusedNoBackends => (FlowVerdict::Dropped, Some(REASON_NO_ENDPOINTS.to_string())),
        Verdict::Unknown(v) => (FlowVerdict::Unknown, Some(format!("verdict-{v}"))),
    };
    let mut source =
        cx.cookies.get(&ev.netns_cookie).and_then(|uid| cx.pods.by_uid(uid)).map(endpoint_of).unwrap_or_default();
    // Bound sockets (sendmsg on a bound UDP socket) know their source; connect() does not.
    if !ev.source.ip().is_unspecified() {
        source.ip = Some(IpAddr::V4(*ev.source.ip()));
    }
    if ev.source.port() != 0 {
        source.port = Some(ev.source.port());
    }
    let destination = match ev.backend {
        Some(b) => {
            let ip = IpAddr::V4(*b.ip());
            let mut d = cx.pods.by_ip(ip).map(endpoint_of).unwrap_or_default();
            d.ip = Some(ip);
            d.port = Some(b.port());
            d
        }
        // Nothing was picked: the client's destination is the service address itself.
        None => {
            FlowEndpoint { ip: Some(IpAddr::V4(*ev.service.ip())), port: Some(ev.service.port()), ..Default::default() }
        }
    };
    FlowRecord {
        time: rfc3339(wall_clock_ns(ev.timestamp_ns, cx.mono_now_ns, cx.real_now_ns)),
        node: cx.node.to_string(),
        kind: FlowKind::SockLb,
        verdict,
        drop_reason: reason,
        protocol: ev.protocol.map(|p| match p {
            Protocol::Tcp => FlowProtocol::Tcp,
            Protocol::Udp => FlowProtocol::Udp,
        }),
        source,
        destination,
        service: service.map(|k| FlowService {
            namespace: k.namespace.clone(),
            name: k.name.clone(),
            ip: IpAddr::V4(*ev.service.ip()),
            port: ev.service.port(),
        }),
        observation_point: Some(match ev.hook {
            Hook::Connect => "connect".to_string(),
            Hook::SendMsg => "sendmsg".to_string(),
            Hook::Unknown(h) => format!("hook-{h}"),
        }),
        socket_cookie: Some(ev.socket_cookie),
    }
}

/// One policy event as a record. The tc programs see real addresses on the wire, so
/// both pods are found by IP.
pub fn policy_record(ev: &PolicyFlowEvent, cx: &Context) -> FlowRecord {
    let side = |ip: std::net::Ipv4Addr, port: u16, identity: u32| {
        let ip = IpAddr::V4(ip);
        let mut e = cx.pods.by_ip(ip).map(endpoint_of).unwrap_or_default();
        e.ip = Some(ip);
        e.port = (port != 0).then_some(port);
        e.identity = Some(identity);
        e
    };
    let (verdict, reason) = match ev.verdict {
        PolicyVerdict::Forwarded => (FlowVerdict::Forwarded, None),
        PolicyVerdict::Dropped => (FlowVerdict::Dropped, Some(policy_reason(ev.drop_reason))),
        PolicyVerdict::Unknown(v) => (FlowVerdict::Unknown, Some(format!("verdict-{v}"))),
    };
    FlowRecord {
        time: rfc3339(wall_clock_ns(ev.timestamp_ns, cx.mono_now_ns, cx.real_now_ns)),
        node: cx.node.to_string(),
        kind: FlowKind::Policy,
        verdict,
        drop_reason: reason,
        protocol: Some(match ev.protocol() {
            Some(Protocol::Tcp) => FlowProtocol::Tcp,
            Some(Protocol::Udp) => FlowProtocol::Udp,
            None => FlowProtocol::Other,
        }),
        source: side(ev.src, ev.src_port, ev.src_identity),
        destination: side(ev.dst, ev.dst_port, ev.dst_identity),
        service: None,
        // From the policed pod's point of view, as NetworkPolicy names directions.
        observation_point: Some(
            match ev.direction {
                Some(Direction::Ingress) => "to-pod",
                Some(Direction::Egress) => "from-pod",
                None => "pod-interface",
            }
            .to_string(),
        ),
        socket_cookie: None,
    }
}

/// One NodePort event as a record: the client as it arrived, the backend it was sent
/// to (found by IP among the pods), the frontend it asked for as the observation point.
pub fn nodeport_record(ev: &NpFlowEvent, cx: &Context) -> FlowRecord {
    let source =
        FlowEndpoint { ip: Some(IpAddr::V4(*ev.client.ip())), port: Some(ev.client.port()), ..Default::default() };
    let destination = match ev.backend {
        Some(b) => {
            let ip = IpAddr::V4(*b.ip());
            let mut d = cx.pods.by_ip(ip).map(endpoint_of).unwrap_or_default();
            d.ip = Some(ip);
            d.port = Some(b.port());
            d
        }
        None => FlowEndpoint {
            ip: Some(IpAddr::V4(*ev.frontend.ip())),
            port: Some(ev.frontend.port()),
            ..Default::default()
        },
    };
    let (verdict, reason) = match (ev.verdict, ev.reason) {
        (NpVerdict::Forwarded, _) => (FlowVerdict::Forwarded, None),
        // Refused with ICMP port unreachable, as kube-proxy's REJECT does.
        (NpVerdict::Rejected, _) | (NpVerdict::Dropped, NpReason::NoBackends) => {
            (FlowVerdict::Dropped, Some(REASON_NO_ENDPOINTS.to_string()))
        }
        (NpVerdict::Dropped, NpReason::NoLocalBackends) => {
            (FlowVerdict::Dropped, Some("no-local-endpoints".to_string()))
        }
        (NpVerdict::Dropped, NpReason::NoRoute) => (FlowVerdict::Dropped, Some("no-route".to_string())),
        (NpVerdict::Dropped, NpReason::SnatPortsExhausted) => {
            (FlowVerdict::Dropped, Some("snat-ports-exhausted".to_string()))
        }
        (NpVerdict::Dropped, NpReason::TtlExceeded) => (FlowVerdict::Dropped, Some("ttl-exceeded".to_string())),
        (NpVerdict::Dropped, r) => (FlowVerdict::Dropped, Some(format!("{r:?}"))),
        (NpVerdict::Unknown(v), _) => (FlowVerdict::Unknown, Some(format!("verdict-{v}"))),
    };
    FlowRecord {
        time: rfc3339(wall_clock_ns(ev.timestamp_ns, cx.mono_now_ns, cx.real_now_ns)),
        node: cx.node.to_string(),
        kind: FlowKind::Nodeport,
        verdict,
        drop_reason: reason,
        protocol: ev.protocol.map(|p| match p {
            Protocol::Tcp => FlowProtocol::Tcp,
            Protocol::Udp => FlowProtocol::Udp,
        }),
        source,
        destination,
        service: None,
        observation_point: Some(format!("nodeport {}{}", ev.frontend, if ev.snat.is_some() { " snat" } else { "" })),
        socket_cookie: None,
    }
}

fn policy_reason(r: Option<DropReason>) -> String {
    match r {
        Some(DropReason::PolicyDeniedIngress) => "policy-denied-ingress".into(),
        Some(DropReason::PolicyDeniedEgress) => "policy-denied-egress".into(),
        Some(DropReason::UnsupportedL3) => "unsupported-l3".into(),
        Some(DropReason::Malformed) => "malformed".into(),
        Some(DropReason::Unknown(n)) => format!("reason-{n}"),
        None => "unknown".into(),
    }
}

// --- the store ---------------------------------------------------------------------

/// Counters the store keeps for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct FlowCounts {
    pub forwarded: u64,
    pub dropped: u64,
    pub other: u64,
    /// Records whose source pod could not be found (netns cookie unknown).
    pub unknown_source: u64,
    /// Records a slow `follow` reader missed.
    pub follower_missed: u64,
}

struct Inner {
    ring: VecDeque<Arc<str>>,
    counts: FlowCounts,
}

/// The last `capacity` records as JSON lines, and a broadcast of new ones. Pushing and
/// subscribing take the same lock, so a reader that asks for "the last N, then follow"
/// gets every record exactly once.
pub struct FlowStore {
    capacity: usize,
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<str>>,
}

impl Default for FlowStore {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl FlowStore {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            capacity,
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(capacity.min(4096)),
                counts: FlowCounts::default(),
            }),
            tx,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn push(&self, r: &FlowRecord) {
        let line: Arc<str> = match serde_json::to_string(r) {
            Ok(s) => s.into(),
            Err(_) => return,
        };
        let mut g = self.inner.lock().unwrap();
        match r.verdict {
            FlowVerdict::Forwarded => g.counts.forwarded += 1,
            FlowVerdict::Dropped => g.counts.dropped += 1,
            FlowVerdict::Unknown => g.counts.other += 1,
        }
        if r.kind == FlowKind::SockLb && r.source.pod.is_none() {
            g.counts.unknown_source += 1;
        }
        if g.ring.len() == self.capacity {
            g.ring.pop_front();
        }
        g.ring.push_back(line.clone());
        // No receiver is fine: nobody follows.
        let _ = self.tx.send(line);
    }

    /// The newest `n` records, oldest first.
    pub fn last(&self, n: usize) -> Vec<Arc<str>> {
        let g = self.inner.lock().unwrap();
        g.ring.iter().skip(g.ring.len().saturating_sub(n)).cloned().collect()
    }

    /// [`FlowStore::last`], and every record pushed after it.
    pub fn last_and_follow(&self, n: usize) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        let g = self.inner.lock().unwrap();
        let rx = self.tx.subscribe();
        (g.ring.iter().skip(g.ring.len().saturating_sub(n)).cloned().collect(), rx)
    }

    pub fn missed(&self, n: u64) {
        self.inner.lock().unwrap().counts.follower_missed += n;
    }

    pub fn with_counts<T>(&self, f: impl FnOnce(&FlowCounts, usize) -> T) -> T {
        let g = self.inner.lock().unwrap();
        f(&g.counts, g.ring.len())
    }
}

// --- the task ----------------------------------------------------------------------

/// What the flows task is told.
pub(super) enum FlowMsg {
    Pods(super::Change<Option<PodInfo>>),
    /// Events read from the ring buffer, each with the Service its VIP:port belongs to.
    SockLb(Vec<(FlowEvent, Option<ObjKey>)>),
    Policy(Vec<PolicyFlowEvent>),
    NodePort(Vec<NpFlowEvent>),
}

/// Unknown cookies trigger a rescan of the cgroup tree at most this often: a process
/// outside any pod (a node daemon in the node's cgroup) would otherwise cost a scan per
/// connection.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Owns the pod view and the cookie map; turns events into records for `store`.
pub(super) async fn run(
    node: String,
    cgroup: PathBuf,
    mut rx: mpsc::UnboundedReceiver<FlowMsg>,
    store: Arc<FlowStore>,
) {
    let mut pods = PodIndex::default();
    let mut cookies: HashMap<u64, String> = HashMap::new();
    let mut last_scan: Option<Instant> = None;
    while let Some(msg) = rx.recv().await {
        match msg {
            FlowMsg::Pods(change) => {
                let mut rescan = false;
                match change {
                    super::Change::Apply(k, v) => {
                        // A local pod with an IP has its sandbox and processes.
                        rescan = v.as_ref().is_some_and(|p| {
                            !p.host_network
                                && p.node.as_deref() == Some(node.as_str())
                                && p.ip.is_some()
                                && !cookies.values().any(|u| *u == p.uid)
                        });
                        pods.set(&k.namespace, &k.name, v);
                    }
                    super::Change::Delete(k) => {
                        if let Some(o) = pods.set(&k.namespace, &k.name, None) {
                            cookies.retain(|_, u| *u != o.uid);
                        }
                    }
                    super::Change::Relist(all) => {
                        pods.replace_all(all.into_values().flatten().collect());
                        rescan = true;
                    }
                }
                if rescan {
                    cookies = scan(&node, &cgroup, &pods, cookies).await;
                    last_scan = Some(Instant::now());
                }
            }
            FlowMsg::SockLb(events) => {
                let unknown = events.iter().any(|(e, _)| !cookies.contains_key(&e.netns_cookie));
                if unknown && pods.listed && last_scan.is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL) {
                    cookies = scan(&node, &cgroup, &pods, cookies).await;
                    last_scan = Some(Instant::now());
                }
                let (mono_now_ns, real_now_ns) = clocks_now();
                let cx = Context { node: &node, pods: &pods, cookies: &cookies, mono_now_ns, real_now_ns };
                for (e, svc) in &events {
                    store.push(&sock_lb_record(e, svc.as_ref(), &cx));
                }
            }
            FlowMsg::Policy(events) => {
                let (mono_now_ns, real_now_ns) = clocks_now();
                let cx = Context { node: &node, pods: &pods, cookies: &cookies, mono_now_ns, real_now_ns };
                for e in &events {
                    store.push(&policy_record(e, &cx));
                }
            }
            FlowMsg::NodePort(events) => {
                let (mono_now_ns, real_now_ns) = clocks_now();
                let cx = Context { node: &node, pods: &pods, cookies: &cookies, mono_now_ns, real_now_ns };
                for e in &events {
                    store.push(&nodeport_record(e, &cx));
                }
            }
        }
    }
}

/// The cookie map after a scan of the node's pods. A pod found before keeps its entry
/// while it exists even if no process of it is seen now (a container restarting): its
/// netns, and so its cookie, outlives its processes.
async fn scan(
    node: &str,
    cgroup: &std::path::Path,
    pods: &PodIndex,
    old: HashMap<u64, String>,
) -> HashMap<u64, String> {
    let uids: Vec<String> = pods.local(node).map(|p| p.uid.clone()).collect();
    let root = cgroup.to_path_buf();
    let mut found = tokio::task::spawn_blocking(move || resolve_cookies(root, uids)).await.unwrap_or_default();
    for (c, uid) in old {
        if pods.by_uid(&uid).is_some() {
            found.entry(c).or_insert(uid);
        }
    }
    found
}

// --- GET /flows ----------------------------------------------------------------------

/// `GET /flows` query: `last=N` (default: all kept), `follow=true|false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowQuery {
    pub last: Option<usize>,
    pub follow: bool,
}

pub fn parse_query(q: &str) -> Result<FlowQuery, String> {
    let mut out = FlowQuery { last: None, follow: false };
    for kv in q.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "last" => out.last = Some(v.parse().map_err(|_| format!("query parameter last={v:?}: not a number"))?),
            "follow" => {
                out.follow = match v {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("query parameter follow={v:?}: want true or false")),
                }
            }
            _ => return Err(format!("unknown query parameter {k:?} (known: last, follow)")),
        }
    }
    Ok(out)
}

/// A record for tests: a socket-LB flow with nothing but its cookie and verdict.
#[cfg(test)]
pub(crate) fn sample(cookie: u64, verdict: FlowVerdict) -> FlowRecord {
    FlowRecord {
        time: "2026-11-22T18:00:00Z".into(),
        node: "n1".into(),
        kind: FlowKind::SockLb,
        verdict,
        drop_reason: None,
        protocol: None,
        source: FlowEndpoint::default(),
        destination: FlowEndpoint::default(),
        service: None,
        observation_point: None,
        socket_cookie: Some(cookie),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn ev(verdict: Verdict, backend: Option<&str>, cookie: u64) -> FlowEvent {
        FlowEvent {
            timestamp_ns: 5_000_000_000,
            socket_cookie: 77,
            netns_cookie: cookie,
            source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            service: "10.96.0.10:80".parse().unwrap(),
            backend: backend.map(|b| b.parse().unwrap()),
            protocol: Some(Protocol::Tcp),
            verdict,
            hook: Hook::Connect,
            v4mapped: false,
            program_build: 1,
            service_id: 3,
        }
    }

    fn pods() -> PodIndex {
        let mut idx = PodIndex::default();
        let p = |uid: &str, name: &str, ip: &str, node: &str, app: &str| PodInfo {
            uid: uid.into(),
            namespace: "shop".into(),
            name: name.into(),
            node: Some(node.into()),
            ip: ip.parse().ok(),
            labels: [("app".to_string(), app.to_string())].into(),
            host_network: false,
        };
        idx.replace_all(vec![
            p("u-c", "client", "10.244.1.5", "n1", "client"),
            p("u-b", "web-1", "10.244.2.7", "n2", "web"),
        ]);
        idx
    }

    #[test]
    fn monotonic_to_wall_clock() {
        // An event 2 s old on the monotonic clock happened 2 s before "now" on the wall clock.
        assert_eq!(wall_clock_ns(8_000_000_000, 10_000_000_000, 1_700_000_000_000_000_000), 1_699_999_998_000_000_000);
        // A timestamp from the future (clock read after the event) does not underflow.
        assert_eq!(wall_clock_ns(11, 10, 100), 100);
        assert_eq!(rfc3339(1_700_000_000_123_000_000), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn forwarded_with_source_and_destination_pods() {
        let pods = pods();
        let cookies: HashMap<u64, String> = [(42, "u-c".to_string())].into();
        let cx = Context {
            node: "n1",
            pods: &pods,
            cookies: &cookies,
            mono_now_ns: 6_000_000_000,
            real_now_ns: 1_700_000_001_000_000_000,
        };
        let svc = ObjKey::new("shop", "web");
        let r = sock_lb_record(&ev(Verdict::Forwarded, Some("10.244.2.7:8080"), 42), Some(&svc), &cx);
        assert_eq!(r.verdict, FlowVerdict::Forwarded);
        assert_eq!(r.time, "2023-11-14T22:13:20Z");
        assert_eq!(r.source.pod.as_deref(), Some("client"));
        assert_eq!(r.source.ip, Some("10.244.1.5".parse().unwrap()));
        assert_eq!(r.source.port, None);
        assert_eq!(r.destination.pod.as_deref(), Some("web-1"));
        assert_eq!(r.destination.labels["app"], "web");
        assert_eq!(r.destination.port, Some(8080));
        let s = r.service.as_ref().unwrap();
        assert_eq!((s.name.as_str(), s.port), ("web", 80));
        // The JSON shape readers depend on.
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["kind"], "sock-lb");
        assert_eq!(j["verdict"], "FORWARDED");
        assert_eq!(j["protocol"], "TCP");
        assert_eq!(j["source"]["namespace"], "shop");
        assert!(j.get("drop_reason").is_none());
        assert_eq!(serde_json::from_value::<FlowRecord>(j).unwrap(), r);
    }

    #[test]
    fn no_endpoints_is_dropped_and_unknown_cookie_leaves_source_empty() {
        let pods = pods();
        let cookies = HashMap::new();
        let cx = Context { node: "n1", pods: &pods, cookies: &cookies, mono_now_ns: 5_000_000_000, real_now_ns: 1_000 };
        let r = sock_lb_record(&ev(Verdict::RefusedNoBackends, None, 42), Some(&ObjKey::new("shop", "empty")), &cx);
        assert_eq!(r.verdict, FlowVerdict::Dropped);
        assert_eq!(r.drop_reason.as_deref(), Some(REASON_NO_ENDPOINTS));
        assert_eq!(r.source, FlowEndpoint::default());
        assert_eq!(r.destination.ip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(r.destination.pod, None);
    }

    #[test]
    fn records_from_later_parts_still_parse() {
        // A policy record from a future agent, with a kind, fields and a verdict this
        // build does not know.
        let line = r#"{"time":"2026-01-01T00:00:00Z","node":"n1","kind":"policy-v2","verdict":"AUDIT","drop_reason":"policy-denied",
            "protocol":"SCTP","source":{"ip":"10.0.0.1","identity":1234,"tcp_flags":"SYN"},"destination":{"ip":"10.0.0.2","port":5432},"new_field":1}"#;
        let r: FlowRecord = serde_json::from_str(line).unwrap();
        assert_eq!(r.kind, FlowKind::Unknown);
        assert_eq!(r.verdict, FlowVerdict::Unknown);
        assert_eq!(r.protocol, Some(FlowProtocol::Other));
        assert_eq!(r.source.identity, Some(1234));
    }

    #[test]
    fn store_keeps_the_last_n_and_follow_misses_nothing() {
        let store = FlowStore::new(3);
        let rec = |i: u64| FlowRecord {
            time: rfc3339(i),
            node: "n".into(),
            ..sample(i, if i.is_multiple_of(2) { FlowVerdict::Forwarded } else { FlowVerdict::Dropped })
        };
        for i in 0..5 {
            store.push(&rec(i));
        }
        let cookies = |v: &[Arc<str>]| {
            v.iter().map(|l| serde_json::from_str::<FlowRecord>(l).unwrap().socket_cookie.unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(cookies(&store.last(10)), vec![2, 3, 4]);
        assert_eq!(cookies(&store.last(1)), vec![4]);
        let (snap, mut rx) = store.last_and_follow(2);
        assert_eq!(cookies(&snap), vec![3, 4]);
        store.push(&rec(5));
        assert_eq!(cookies(&[rx.try_recv().unwrap()]), vec![5]);
        store.with_counts(|c, n| {
            assert_eq!((c.forwarded, c.dropped, c.unknown_source, n), (3, 3, 6, 3));
        });
    }

    #[test]
    fn query() {
        assert_eq!(parse_query("").unwrap(), FlowQuery { last: None, follow: false });
        assert_eq!(parse_query("last=50").unwrap(), FlowQuery { last: Some(50), follow: false });
        assert_eq!(parse_query("follow=true&last=0").unwrap(), FlowQuery { last: Some(0), follow: true });
        assert!(parse_query("last=x").unwrap_err().contains("last=\"x\""));
        assert!(parse_query("follow=maybe").unwrap_err().contains("follow"));
        assert!(parse_query("verdict=DROPPED").unwrap_err().contains("verdict"));
    }
}
