//! NetworkPolicy through real packets: the upstream netpol model (namespaces x, y, z ×
//! pods a, b, c; TCP/UDP ports 80/81) in network namespaces on two nodes, each node with
//! its own pin dir and `PolicyDatapath`, every pod's host-side veth carrying the tc
//! programs. Run as root:
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target-policy-dp cargo test -p kubeshift-datapath --test netpol
//! ```

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use kubeshift_datapath::{
    policy::{
        compile::Compiler,
        loader::{CtState, DropReason, PolicyDatapath, PolicyVerdict},
        model::*,
        oracle,
    },
    testenv::netpol::{Cell, NetpolLab, PORTS, PROTOCOLS},
    Protocol,
};

/// The labs share two cores with whatever else runs; one matrix at a time keeps probe
/// timeouts meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

const TIMEOUT: Duration = Duration::from_millis(400);
/// A cell that should be reachable but was not gets one more, slower chance: a loaded
/// machine can delay an answer, while a real drop fails again.
const RETRY_TIMEOUT: Duration = Duration::from_millis(2000);

/// Removes a node's pin dir on drop (also after a panic).
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(e) = PolicyDatapath::purge(&self.0) {
            eprintln!("cleanup of {}: {e}", self.0.display());
        }
    }
}

/// The lab plus one loaded, attached datapath per node. Field order = drop order: the
/// handles close, the pins go (detaching), then the namespaces.
struct Setup {
    dps: Vec<Option<PolicyDatapath>>,
    pins: Vec<PinGuard>,
    lab: NetpolLab,
}

impl Setup {
    fn new() -> Self {
        let lab = NetpolLab::new().expect("netpol lab");
        let mut pins = Vec::new();
        let mut dps = Vec::new();
        for n in &lab.nodes {
            let dir = Path::new("/sys/fs/bpf/kubeshift").join(format!("test-{}-{}", lab.tag, n.name));
            pins.push(PinGuard(dir.clone()));
            dps.push(Some(PolicyDatapath::load(&dir).expect("load policy datapath")));
        }
        let mut s = Self { dps, pins, lab };
        s.attach_all();
        s
    }

    fn pin_dir(&self, node: usize) -> &Path {
        &self.pins[node].0
    }

    fn dp(&mut self, node: usize) -> &mut PolicyDatapath {
        self.dps[node].as_mut().expect("datapath loaded")
    }

    fn attach_all(&mut self) {
        for i in 0..self.lab.pods.len() {
            let node = self.lab.pods[i].node;
            let ns = self.lab.nodes[node].netns.path();
            let ifname = self.lab.pods[i].host_if.clone();
            self.dps[node].as_mut().unwrap().attach_in_netns(&ns, &ifname).expect("attach");
        }
    }

    /// Applies one `Compiled` per node.
    fn apply(&mut self, compiled: &[Compiled]) {
        for (i, c) in compiled.iter().enumerate() {
            self.dp(i).apply(c).expect("apply");
        }
    }

    /// Probes `cells`; cells expected reachable that were not get retried once.
    fn observe(&self, cells: &[Cell], expected: &[bool]) -> Vec<bool> {
        let mut got = self.lab.probe(cells, TIMEOUT).expect("probe");
        let retry: Vec<usize> = (0..cells.len()).filter(|&i| expected[i] && !got[i]).collect();
        if !retry.is_empty() {
            let again: Vec<Cell> = retry.iter().map(|&i| cells[i]).collect();
            let r = self.lab.probe(&again, RETRY_TIMEOUT).expect("probe");
            for (&i, ok) in retry.iter().zip(r) {
                got[i] = ok;
            }
        }
        got
    }

    /// Probes every cell and compares against `expect`; returns a readable report of
    /// the differences (empty when all match).
    fn check(&self, name: &str, expect: &dyn Fn(&Cell) -> bool) -> String {
        let cells = self.lab.all_cells();
        let expected: Vec<bool> = cells.iter().map(expect).collect();
        let got = self.observe(&cells, &expected);
        truth_table_diff(&self.lab, name, &cells, &expected, &got)
    }
}

/// Upstream-style tables (`.` reachable, `X` blocked) of expected and observed, per
/// protocol/port that has a difference, and a third table marking the wrong cells.
fn truth_table_diff(lab: &NetpolLab, name: &str, cells: &[Cell], expected: &[bool], got: &[bool]) -> String {
    let mut out = String::new();
    let ids: Vec<String> = lab.pods.iter().map(|p| p.id()).collect();
    for proto in PROTOCOLS {
        for port in PORTS {
            let mut exp = BTreeMap::new();
            let mut obs = BTreeMap::new();
            for (i, c) in cells.iter().enumerate() {
                if c.protocol == proto && c.port == port {
                    exp.insert((c.from, c.to), expected[i]);
                    obs.insert((c.from, c.to), got[i]);
                }
            }
            if exp == obs {
                continue;
            }
            let table = |title: &str, f: &dyn Fn(usize, usize) -> char| {
                let mut t = format!("{title}\n      ");
                for id in &ids {
                    t += &format!("{id:>4}");
                }
                t += "\n";
                for (a, ida) in ids.iter().enumerate() {
                    t += &format!("{ida:>5} ");
                    for b in 0..ids.len() {
                        t += &format!("{:>4}", f(a, b));
                    }
                    t += "\n";
                }
                t
            };
            let mark = |m: &BTreeMap<(usize, usize), bool>, a, b| match m.get(&(a, b)) {
                Some(true) => '.',
                Some(false) => 'X',
                None => ' ',
            };
            out += &format!("case {name}: {proto:?}/{port} differs (rows = from, columns = to)\n");
            out += &table("expected:", &|a, b| mark(&exp, a, b));
            out += &table("observed:", &|a, b| mark(&obs, a, b));
            out += &table("comparison (X = wrong):", &|a, b| {
                if exp.get(&(a, b)) == obs.get(&(a, b)) {
                    '.'
                } else {
                    'X'
                }
            });
        }
    }
    out
}

fn cidr(s: &str) -> Cidr {
    let (a, p) = s.split_once('/').unwrap();
    Cidr { addr: a.parse().unwrap(), prefix: p.parse().unwrap() }
}

/// Identities for a hand-written `Compiled`: pod k → 100 + k, everything else → 2.
fn handwritten_base(lab: &NetpolLab) -> Compiled {
    let mut c = Compiled::default();
    c.ipcache.push((cidr("0.0.0.0/0"), 2));
    for (k, p) in lab.pods.iter().enumerate() {
        c.ipcache.push((Cidr { addr: p.ip, prefix: 32 }, 100 + k as u32));
    }
    c.ipcache.sort();
    c
}

fn entry(local: u32, peer: u32, direction: Direction, protocol: Option<Protocol>, port: u16, bits: u8) -> PolicyEntry {
    PolicyEntry { local, peer, direction, protocol, port, port_wildcard_bits: bits }
}

/// The datapath alone, with a `Compiled` written by hand (no compiler involved): x/a only
/// admits z/c on TCP 80, y/b may only send UDP (to anyone); everything else is open.
/// Replies of allowed flows pass although x/a may not send and y/b may not receive
/// unsolicited traffic.
#[test]
fn handwritten_compiled_is_enforced() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new();
    let xa = s.lab.pod_index("x/a");
    let yb = s.lab.pod_index("y/b");
    let zc = s.lab.pod_index("z/c");
    let mut c = handwritten_base(&s.lab);
    let id = |k: usize| 100 + k as u32;
    c.isolation.insert(id(xa), Isolation { ingress: true, egress: false });
    c.isolation.insert(id(yb), Isolation { ingress: false, egress: true });
    c.entries.push(entry(id(xa), id(zc), Direction::Ingress, Some(Protocol::Tcp), 80, 0));
    c.entries.push(entry(id(yb), ANY_PEER, Direction::Egress, Some(Protocol::Udp), 0, 16));
    c.entries.sort();
    s.apply(&[c.clone(), c]);
    let report = s.check("handwritten", &|cell| {
        if cell.from == cell.to {
            return true; // loopback inside the pod, never crosses the veth
        }
        let to_xa_ok = cell.to != xa || (cell.from == zc && cell.protocol == Protocol::Tcp && cell.port == 80);
        let from_yb_ok = cell.from != yb || cell.protocol == Protocol::Udp;
        to_xa_ok && from_yb_ok
    });
    assert!(report.is_empty(), "{report}");
}

// ---------------------------------------------------------------------------------------
// The Kubernetes model: input builders and the policy cases.
// ---------------------------------------------------------------------------------------

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector { match_labels: labels(pairs), match_expressions: vec![] }
}

fn expr(key: &str, operator: SelectorOp, values: &[&str]) -> LabelSelector {
    LabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![SelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }],
    }
}

fn all() -> LabelSelector {
    LabelSelector::default()
}

fn pods(pod: Option<LabelSelector>, ns: Option<LabelSelector>) -> Peer {
    Peer::Pods { pod_selector: pod, namespace_selector: ns }
}

fn block(c: &str, except: &[&str]) -> Peer {
    Peer::IpBlock(IpBlock { cidr: cidr(c), except: except.iter().map(|e| cidr(e)).collect() })
}

fn port(protocol: Protocol, n: u16) -> PortRule {
    PortRule { protocol, port: Some(PortRef::Number(n)), end_port: None }
}

fn named(protocol: Protocol, name: &str) -> PortRule {
    PortRule { protocol, port: Some(PortRef::Name(name.into())), end_port: None }
}

fn range(protocol: Protocol, from: u16, to: u16) -> PortRule {
    PortRule { protocol, port: Some(PortRef::Number(from)), end_port: Some(to) }
}

fn every_port(protocol: Protocol) -> PortRule {
    PortRule { protocol, port: None, end_port: None }
}

fn rule(ports: Vec<PortRule>, peers: Vec<Peer>) -> Rule {
    Rule { ports, peers }
}

const IN: &[Direction] = &[Direction::Ingress];
const EG: &[Direction] = &[Direction::Egress];
const BOTH: &[Direction] = &[Direction::Ingress, Direction::Egress];

fn policy(
    ns: &str,
    name: &str,
    selector: LabelSelector,
    types: &[Direction],
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: selector,
        policy_types: types.to_vec(),
        ingress,
        egress,
    }
}

use Protocol::{Tcp, Udp};

/// The lab's pods and namespaces as the API would describe them: namespaces labelled
/// `ns` (and `kubernetes.io/metadata.name`), pods labelled `pod`, the b pods also
/// `tier: back`; named container ports like upstream's (`serve-80-tcp` …).
fn base_input(lab: &NetpolLab) -> PolicyInput {
    let namespaces = ["x", "y", "z"]
        .iter()
        .map(|n| NamespaceInfo {
            name: n.to_string(),
            labels: labels(&[("ns", n), ("kubernetes.io/metadata.name", n)]),
        })
        .collect();
    let pods = lab
        .pods
        .iter()
        .map(|p| {
            let mut l = labels(&[("pod", &p.name)]);
            if p.name == "b" {
                l.insert("tier".into(), "back".into());
            }
            let mut named_ports = Vec::new();
            for port in PORTS {
                for (proto, pname) in [(Tcp, "tcp"), (Udp, "udp")] {
                    named_ports.push(NamedPort { name: format!("serve-{port}-{pname}"), protocol: proto, port });
                }
            }
            PodInfo {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                labels: l,
                ips: vec![p.ip],
                node: lab.nodes[p.node].name.clone(),
                named_ports,
            }
        })
        .collect();
    PolicyInput { namespaces, pods, policies: vec![], host_ips: vec![] }
}

struct Case {
    name: &'static str,
    policies: Vec<NetworkPolicy>,
    /// (pod id, label key, new value or None to remove) applied to the base input.
    relabel: Vec<(&'static str, &'static str, Option<&'static str>)>,
}

fn case(name: &'static str, policies: Vec<NetworkPolicy>) -> Case {
    Case { name, policies, relabel: vec![] }
}

/// Node-1 pods are 10.244.1.0/24 (x/a x/c y/b z/a z/c), node-2 pods 10.244.2.0/24
/// (x/b y/a y/c z/b); x/a is 10.244.1.10, y/b 10.244.1.14, z/b 10.244.2.17.
fn cases() -> Vec<Case> {
    let deny_in = |ns: &str, s: LabelSelector| policy(ns, "deny-in", s, IN, vec![], vec![]);
    let pa = || sel(&[("pod", "a")]);
    vec![
        case("no policy: everything reachable", vec![]),
        case("default deny ingress in x", vec![deny_in("x", all())]),
        case("default deny egress in x", vec![policy("x", "deny-eg", all(), EG, vec![], vec![])]),
        case("default deny both directions in y", vec![policy("y", "deny-all", all(), BOTH, vec![], vec![])]),
        case(
            "allow all ingress in x (empty rule)",
            vec![policy("x", "allow-all", all(), IN, vec![rule(vec![], vec![])], vec![])],
        ),
        case(
            "allow all egress in x (empty rule)",
            vec![policy("x", "allow-all-eg", all(), EG, vec![], vec![rule(vec![], vec![])])],
        ),
        case(
            "podSelector matchLabels: x/a from x pods with pod=b",
            vec![policy(
                "x",
                "a-from-b",
                pa(),
                IN,
                vec![rule(vec![], vec![pods(Some(sel(&[("pod", "b")])), None)])],
                vec![],
            )],
        ),
        case(
            "matchExpressions In: x/a from pod in (b, c)",
            vec![policy(
                "x",
                "in",
                pa(),
                IN,
                vec![rule(vec![], vec![pods(Some(expr("pod", SelectorOp::In, &["b", "c"])), None)])],
                vec![],
            )],
        ),
        case(
            "matchExpressions NotIn: x/a from pod notin (b), all namespaces",
            vec![policy(
                "x",
                "notin",
                pa(),
                IN,
                vec![rule(vec![], vec![pods(Some(expr("pod", SelectorOp::NotIn, &["b"])), Some(all()))])],
                vec![],
            )],
        ),
        case(
            "matchExpressions Exists: x/a from pods with a tier label, all namespaces",
            vec![policy(
                "x",
                "exists",
                pa(),
                IN,
                vec![rule(vec![], vec![pods(Some(expr("tier", SelectorOp::Exists, &[])), Some(all()))])],
                vec![],
            )],
        ),
        case(
            "matchExpressions DoesNotExist: pods without tier in y, from y",
            vec![policy(
                "y",
                "dne",
                expr("tier", SelectorOp::DoesNotExist, &[]),
                IN,
                vec![rule(vec![], vec![pods(Some(all()), None)])],
                vec![],
            )],
        ),
        case(
            "namespaceSelector: x/a from namespace y",
            vec![policy(
                "x",
                "from-y",
                pa(),
                IN,
                vec![rule(vec![], vec![pods(None, Some(sel(&[("ns", "y")])))])],
                vec![],
            )],
        ),
        case(
            "namespaceSelector matchExpressions: x from ns notin (x, y)",
            vec![policy(
                "x",
                "from-not-xy",
                all(),
                IN,
                vec![rule(vec![], vec![pods(None, Some(expr("ns", SelectorOp::NotIn, &["x", "y"])))])],
                vec![],
            )],
        ),
        case(
            "pod AND namespace selector in one peer: x/a from y/b only",
            vec![policy(
                "x",
                "and",
                pa(),
                IN,
                vec![rule(vec![], vec![pods(Some(sel(&[("pod", "b")])), Some(sel(&[("ns", "y")])))])],
                vec![],
            )],
        ),
        case(
            "pod OR namespace selector as two peers: x/a from ns y or x/b",
            vec![policy(
                "x",
                "or",
                pa(),
                IN,
                vec![rule(vec![], vec![pods(Some(sel(&[("pod", "b")])), None), pods(None, Some(sel(&[("ns", "y")])))])],
                vec![],
            )],
        ),
        case(
            "empty from with a port: x/a from anyone on TCP 80",
            vec![policy("x", "port80", pa(), IN, vec![rule(vec![port(Tcp, 80)], vec![])], vec![])],
        ),
        case(
            "empty namespaceSelector: x/a from b pods of every namespace",
            vec![policy(
                "x",
                "b-anywhere",
                pa(),
                IN,
                vec![rule(vec![], vec![pods(Some(sel(&[("pod", "b")])), Some(all()))])],
                vec![],
            )],
        ),
        case("policy in another namespace does not apply: y denies pod=a", vec![deny_in("y", pa())]),
        case(
            "ipBlock with except: x/a from 10.244.0.0/16 except node-1's /24",
            vec![policy(
                "x",
                "ipblock",
                pa(),
                IN,
                vec![rule(vec![], vec![block("10.244.0.0/16", &["10.244.1.0/24"])])],
                vec![],
            )],
        ),
        case(
            "ipBlock except one pod: x from node-2's /24 except z/b",
            vec![policy(
                "x",
                "ipblock-pod",
                all(),
                IN,
                vec![rule(vec![], vec![block("10.244.2.0/24", &["10.244.2.17/32"])])],
                vec![],
            )],
        ),
        case(
            "egress ipBlock: y/b may only reach node-2's pods, UDP",
            vec![policy(
                "y",
                "eg-block",
                sel(&[("pod", "b")]),
                EG,
                vec![],
                vec![rule(vec![every_port(Udp)], vec![block("10.244.2.0/24", &[])])],
            )],
        ),
        case(
            "port by number: x from anyone on TCP 81 only",
            vec![policy("x", "tcp81", all(), IN, vec![rule(vec![port(Tcp, 81)], vec![])], vec![])],
        ),
        case(
            "port by name: x/a serve-80-tcp from namespace z",
            vec![policy(
                "x",
                "named",
                pa(),
                IN,
                vec![rule(vec![named(Tcp, "serve-80-tcp")], vec![pods(None, Some(sel(&[("ns", "z")])))])],
                vec![],
            )],
        ),
        case(
            "named UDP port: x serve-81-udp; a TCP rule naming a UDP port matches nothing",
            vec![policy(
                "x",
                "named-udp",
                all(),
                IN,
                vec![rule(vec![named(Udp, "serve-81-udp"), named(Tcp, "serve-80-udp")], vec![])],
                vec![],
            )],
        ),
        case(
            "egress named port: z may send to serve-81-tcp of any pod",
            vec![policy(
                "z",
                "eg-named",
                all(),
                EG,
                vec![],
                vec![rule(vec![named(Tcp, "serve-81-tcp")], vec![pods(Some(all()), Some(all()))])],
            )],
        ),
        case(
            "endPort: x from anyone on TCP 80-81 and UDP 81-90",
            vec![policy(
                "x",
                "range",
                all(),
                IN,
                vec![rule(vec![range(Tcp, 80, 81), range(Udp, 81, 90)], vec![])],
                vec![],
            )],
        ),
        case(
            "endPort range ending below: y/c from anyone on UDP 60-80",
            vec![policy(
                "y",
                "range-low",
                sel(&[("pod", "c")]),
                IN,
                vec![rule(vec![range(Udp, 60, 80)], vec![])],
                vec![],
            )],
        ),
        case(
            "UDP only, every port: z ingress",
            vec![policy("z", "udp", all(), IN, vec![rule(vec![every_port(Udp)], vec![])], vec![])],
        ),
        case(
            "TCP only, every port: z egress",
            vec![policy("z", "tcp", all(), EG, vec![], vec![rule(vec![every_port(Tcp)], vec![])])],
        ),
        case(
            "ingress and egress together: x/a from y, to z on port 80",
            vec![policy(
                "x",
                "both",
                pa(),
                BOTH,
                vec![rule(vec![], vec![pods(None, Some(sel(&[("ns", "y")])))])],
                vec![rule(vec![port(Tcp, 80), port(Udp, 80)], vec![pods(None, Some(sel(&[("ns", "z")])))])],
            )],
        ),
        case(
            "policyTypes Egress only: its ingress rules are ignored",
            vec![policy(
                "x",
                "egress-only",
                pa(),
                EG,
                vec![rule(vec![port(Tcp, 80)], vec![pods(Some(sel(&[("pod", "b")])), None)])],
                vec![rule(vec![], vec![pods(None, Some(sel(&[("ns", "y")])))])],
            )],
        ),
        case(
            "multiple policies are OR'ed: x/a from y/b TCP 80, from z/c UDP 81",
            vec![
                policy(
                    "x",
                    "p1",
                    pa(),
                    IN,
                    vec![rule(vec![port(Tcp, 80)], vec![pods(Some(sel(&[("pod", "b")])), Some(sel(&[("ns", "y")])))])],
                    vec![],
                ),
                policy(
                    "x",
                    "p2",
                    pa(),
                    IN,
                    vec![rule(vec![port(Udp, 81)], vec![pods(Some(sel(&[("pod", "c")])), Some(sel(&[("ns", "z")])))])],
                    vec![],
                ),
            ],
        ),
        case(
            "deny all then allow one pod: x closed, x/a open to z/b",
            vec![
                deny_in("x", all()),
                policy(
                    "x",
                    "allow-zb",
                    pa(),
                    IN,
                    vec![rule(vec![], vec![pods(Some(sel(&[("pod", "b")])), Some(sel(&[("ns", "z")])))])],
                    vec![],
                ),
            ],
        ),
        case(
            "policy changed (same name): x/a from namespace y on port 80",
            vec![policy(
                "x",
                "changing",
                pa(),
                IN,
                vec![rule(vec![port(Tcp, 80), port(Udp, 80)], vec![pods(None, Some(sel(&[("ns", "y")])))])],
                vec![],
            )],
        ),
        case(
            "policy changed (same name): now namespace z on port 81",
            vec![policy(
                "x",
                "changing",
                pa(),
                IN,
                vec![rule(vec![port(Tcp, 81), port(Udp, 81)], vec![pods(None, Some(sel(&[("ns", "z")])))])],
                vec![],
            )],
        ),
        case(
            "label change, before: x/c admits only pod=b of x",
            vec![policy(
                "x",
                "c-from-b",
                sel(&[("pod", "c")]),
                IN,
                vec![rule(vec![], vec![pods(Some(sel(&[("pod", "b")])), None)])],
                vec![],
            )],
        ),
        Case {
            name: "label change, after: x/a relabelled pod=b (new identity) reaches x/c",
            policies: vec![policy(
                "x",
                "c-from-b",
                sel(&[("pod", "c")]),
                IN,
                vec![rule(vec![], vec![pods(Some(sel(&[("pod", "b")])), None)])],
                vec![],
            )],
            relabel: vec![("x/a", "pod", Some("b"))],
        },
        case("one-way allow: x/a -> y/b only; replies must pass", one_way()),
    ]
}

/// x/a may only send to y/b and receive nothing; y/b receives only from x/a.
fn one_way() -> Vec<NetworkPolicy> {
    vec![
        policy(
            "x",
            "a-out",
            sel(&[("pod", "a")]),
            BOTH,
            vec![],
            vec![rule(vec![], vec![pods(Some(sel(&[("pod", "b")])), Some(sel(&[("ns", "y")])))])],
        ),
        policy(
            "y",
            "b-in",
            sel(&[("pod", "b")]),
            IN,
            vec![rule(vec![], vec![pods(Some(sel(&[("pod", "a")])), Some(sel(&[("ns", "x")])))])],
            vec![],
        ),
    ]
}

fn input_for(lab: &NetpolLab, c: &Case) -> PolicyInput {
    let mut input = base_input(lab);
    input.policies = c.policies.clone();
    for (id, key, value) in &c.relabel {
        let (ns, name) = id.split_once('/').unwrap();
        let p = input.pods.iter_mut().find(|p| p.namespace == ns && p.name == name).unwrap();
        match value {
            Some(v) => p.labels.insert(key.to_string(), v.to_string()),
            None => p.labels.remove(*key),
        };
    }
    input
}

/// One `Compiled` per node, each from that node's compiler (stable identities across
/// cases, like a running agent) with the node's own address as host IP.
fn compile_nodes(lab: &NetpolLab, compilers: &mut [Compiler], input: &PolicyInput) -> Vec<Compiled> {
    lab.nodes
        .iter()
        .zip(compilers.iter_mut())
        .map(|(n, c)| {
            let mut i = input.clone();
            i.host_ips = vec![n.ip];
            c.compile(&i, Some(&n.name))
        })
        .collect()
}

/// What Kubernetes says, from the oracle (which, like every CNI, allows a pod's traffic
/// to its own address: it stays on the pod's loopback).
fn expected(lab: &NetpolLab, input: &PolicyInput, c: &Cell) -> bool {
    oracle::allowed(input, lab.pods[c.from].ip, lab.pods[c.to].ip, c.protocol, c.port)
}

/// The upstream-style matrix: every case applied over the previous one (so every case
/// is also a policy update), all 324 probes per case compared with the oracle.
#[test]
fn netpol_matrix() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut s = Setup::new();
    let setup_time = started.elapsed();
    let mut compilers = vec![Compiler::new(), Compiler::new()];
    let cases = cases();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let mut failures = String::new();
    let mut probes = 0;
    for c in &cases {
        let t = Instant::now();
        let input = input_for(&s.lab, c);
        let compiled = compile_nodes(&s.lab, &mut compilers, &input);
        s.apply(&compiled);
        let lab = &s.lab;
        let report = s.check(c.name, &|cell| expected(lab, &input, cell));
        probes += 324;
        eprintln!("{:>5} ms  {}{}", t.elapsed().as_millis(), c.name, if report.is_empty() { "" } else { "  MISMATCH" });
        failures += &report;
    }
    // The reply case, spelled out: the connection from x/a works in full (TCP greeting
    // read back, UDP reply received) although x/a admits nothing and y/b sends nothing
    // unsolicited; the reverse direction is dropped.
    let xa = s.lab.pod_index("x/a");
    let yb = s.lab.pod_index("y/b");
    let cells: Vec<Cell> = [Tcp, Udp]
        .iter()
        .flat_map(|&protocol| [(xa, yb), (yb, xa)].map(|(from, to)| Cell { from, to, protocol, port: 80 }))
        .collect();
    let got = s.observe(&cells, &[true, false, true, false]);
    assert_eq!(got, vec![true, false, true, false], "one-way allow {cells:?}");
    eprintln!(
        "{} cases, {probes} probes, lab setup {} ms, total {} ms",
        cases.len(),
        setup_time.as_millis(),
        started.elapsed().as_millis()
    );
    assert!(failures.is_empty(), "{failures}");
}

/// Entries as the loader stores them: "every protocol" has no port.
type Programmed = (Vec<(Cidr, Identity)>, BTreeMap<Identity, Isolation>, Vec<PolicyEntry>);

fn normalized(c: &Compiled) -> Programmed {
    let mut entries: Vec<PolicyEntry> = c
        .entries
        .iter()
        .map(|e| {
            let mut e = *e;
            if e.protocol.is_none() {
                e.port = 0;
                e.port_wildcard_bits = 16;
            }
            e
        })
        .collect();
    entries.sort();
    entries.dedup();
    (c.ipcache.clone(), c.isolation.clone(), entries)
}

/// The agent goes away and comes back: verdicts hold without it, the reloaded loader
/// reopens the pins without re-attaching, and one apply of a changed input converges
/// the maps to exactly the new `Compiled` (stale identities' entries removed).
#[test]
fn loader_restart_keeps_verdicts_and_converges() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new();
    let mut compilers = vec![Compiler::new(), Compiler::new()];
    let cases = cases();
    let first = cases.iter().find(|c| c.name.starts_with("pod AND namespace")).unwrap();
    let input = input_for(&s.lab, first);
    let compiled = compile_nodes(&s.lab, &mut compilers, &input);
    s.apply(&compiled);
    let lab = &s.lab;
    let r = s.check("before restart", &|c| expected(lab, &input, c));
    assert!(r.is_empty(), "{r}");

    // No agent at all: the pinned links keep enforcing the pinned maps.
    s.dps = vec![None, None];
    let lab = &s.lab;
    let r = s.check("no agent running", &|c| expected(lab, &input, c));
    assert!(r.is_empty(), "{r}");

    for (node, want) in compiled.iter().enumerate() {
        let dp = PolicyDatapath::load(s.pin_dir(node)).expect("reload");
        assert!(dp.reopened(), "node {node}: pins not reopened");
        assert_eq!(dp.upgraded_programs(), 0, "same build replaced programs");
        assert_eq!(
            normalized(&dp.programmed()),
            normalized(want),
            "node {node}: maps read back differ from what was applied"
        );
        s.dps[node] = Some(dp);
    }
    // Attaching again is a no-op for interfaces that are still attached.
    for i in 0..s.lab.pods.len() {
        let node = s.lab.pods[i].node;
        let ns = s.lab.nodes[node].netns.path();
        let ifname = s.lab.pods[i].host_if.clone();
        assert_eq!(s.dp(node).attach_in_netns(&ns, &ifname).unwrap(), 0, "{ifname}");
    }

    // A restarted agent's compiler hands out new numbers above what the maps hold, so
    // every old identity's entries are stale and must go.
    let changed = cases.iter().find(|c| c.name.starts_with("egress ipBlock")).unwrap();
    let input2 = input_for(&s.lab, changed);
    let mut fresh: Vec<Compiler> = (0..2)
        .map(|n| {
            let p = s.dps[n].as_ref().unwrap().programmed();
            let max = p.ipcache.iter().map(|(_, id)| *id).max().unwrap_or(0);
            Compiler::starting_at(max + 1)
        })
        .collect();
    let compiled2 = compile_nodes(&s.lab, &mut fresh, &input2);
    for (node, want) in compiled2.iter().enumerate() {
        let st = s.dp(node).apply(want).unwrap();
        eprintln!("node {node} converge: {st:?}");
        assert!(st.ipcache_written > 0 && st.ipcache_removed == 0, "{st:?}");
        // Both cases police only node-1 pods (x/a, y/b), so only node-1 held entries of
        // the old identities; node-2 only gets its ipcache renumbered.
        if node == 0 {
            assert!(st.policy_removed > 0 && st.isolation_removed > 0, "node-1: nothing stale removed: {st:?}");
        }
        assert_eq!(normalized(&s.dps[node].as_ref().unwrap().programmed()), normalized(want));
        // Re-applying the same input writes nothing.
        assert_eq!(s.dp(node).apply(want).unwrap().changes(), 0);
    }
    let lab = &s.lab;
    let r = s.check("after restart with a changed input", &|c| expected(lab, &input2, c));
    assert!(r.is_empty(), "{r}");
    // And the kernel's maps really hold only that: a third loader reads the same back.
    for (node, want) in compiled2.iter().enumerate() {
        s.dps[node] = None;
        let dp = PolicyDatapath::load(s.pin_dir(node)).unwrap();
        assert_eq!(normalized(&dp.programmed()), normalized(want));
        s.dps[node] = Some(dp);
    }
}

fn identity_of(c: &Compiled, ip: Ipv4Addr) -> Identity {
    c.ipcache
        .iter()
        .filter(|(cidr, _)| {
            let m = if cidr.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(cidr.prefix)) };
            u32::from(ip) & m == u32::from(cidr.addr)
        })
        .max_by_key(|(cidr, _)| cidr.prefix)
        .map(|(_, id)| *id)
        .unwrap()
}

/// Drops are reported with both identities, the 5-tuple, the direction and the reason;
/// an allowed connection is reported once per check point (new), not per packet; events
/// can be switched off.
#[test]
fn flow_events_report_drops_and_new_connections() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new();
    let mut compilers = vec![Compiler::new(), Compiler::new()];
    let mut input = base_input(&s.lab);
    input.policies = vec![
        policy("x", "deny-a", sel(&[("pod", "a")]), IN, vec![], vec![]),
        policy("x", "deny-b-out", sel(&[("pod", "b")]), EG, vec![], vec![]),
    ];
    let compiled = compile_nodes(&s.lab, &mut compilers, &input);
    s.apply(&compiled);
    let xa = s.lab.pod_index("x/a"); // node-1
    let xb = s.lab.pod_index("x/b"); // node-2
    let yb = s.lab.pod_index("y/b"); // node-1
    let za = s.lab.pod_index("z/a"); // node-1
    let ya = s.lab.pod_index("y/a"); // node-2
    for dp in s.dps.iter_mut().flatten() {
        dp.read_flows();
    }
    let cell = |from, to, protocol| Cell { from, to, protocol, port: 80 };
    let got = s.lab.probe(&[cell(yb, xa, Tcp), cell(xb, za, Udp), cell(za, ya, Tcp)], TIMEOUT).unwrap();
    assert_eq!(got, vec![false, false, true]);

    let n1 = s.dp(0).read_flows();
    let n2 = s.dp(1).read_flows();
    let ip = |k: usize| s.lab.pods[k].ip;
    // y/b -> x/a TCP 80, dropped at x/a's ingress on node-1 (the SYN and its retries).
    let drop_in: Vec<_> =
        n1.iter().filter(|e| e.src == ip(yb) && e.dst == ip(xa) && e.verdict == PolicyVerdict::Dropped).collect();
    assert!(!drop_in.is_empty(), "no drop event on node-1: {n1:#?}");
    for e in &drop_in {
        assert_eq!(e.drop_reason, Some(DropReason::PolicyDeniedIngress));
        assert_eq!(e.direction, Some(Direction::Ingress));
        assert_eq!((e.ip_proto, e.dst_port), (6, 80));
        assert_ne!(e.src_port, 0);
        assert_eq!(e.src_identity, identity_of(&compiled[0], ip(yb)));
        assert_eq!(e.dst_identity, identity_of(&compiled[0], ip(xa)));
        assert_ne!(e.src_identity, e.dst_identity);
        assert_eq!(e.ct_state, CtState::New);
        assert_ne!(e.ifindex, 0);
    }
    // The sender's egress check on node-1 let it out: one New event, not one per packet.
    let out: Vec<_> =
        n1.iter().filter(|e| e.src == ip(yb) && e.dst == ip(xa) && e.verdict == PolicyVerdict::Forwarded).collect();
    assert_eq!(out.len(), 1, "{out:#?}");
    assert_eq!(out[0].direction, Some(Direction::Egress));

    // x/b -> z/a UDP 80, dropped at x/b's egress on node-2.
    let drop_eg: Vec<_> = n2.iter().filter(|e| e.src == ip(xb) && e.dst == ip(za)).collect();
    assert_eq!(drop_eg.len(), 1, "{n2:#?}");
    let e = drop_eg[0];
    assert_eq!(e.verdict, PolicyVerdict::Dropped);
    assert_eq!(e.drop_reason, Some(DropReason::PolicyDeniedEgress));
    assert_eq!(e.direction, Some(Direction::Egress));
    assert_eq!((e.ip_proto, e.dst_port), (17, 80));
    assert_eq!(e.src_identity, identity_of(&compiled[1], ip(xb)));
    assert_eq!(e.dst_identity, identity_of(&compiled[1], ip(za)));

    // z/a -> y/a TCP: allowed; SYN, ACK, greeting, FINs cross both nodes, yet each check
    // point reports the connection once, and replies not at all.
    let fwd = |evs: &[kubeshift_datapath::policy::loader::PolicyFlowEvent], dir| {
        evs.iter()
            .filter(|e| {
                e.src == ip(za) && e.dst == ip(ya) && e.verdict == PolicyVerdict::Forwarded && e.direction == Some(dir)
            })
            .count()
    };
    assert_eq!(fwd(&n1, Direction::Egress), 1, "{n1:#?}");
    assert_eq!(fwd(&n2, Direction::Ingress), 1, "{n2:#?}");
    assert!(!n1.iter().chain(&n2).any(|e| e.src == ip(ya)), "replies must not be reported");

    // Off: the same drop reports nothing.
    s.dp(0).set_flow_events(false).unwrap();
    let got = s.lab.probe(&[cell(yb, xa, Udp)], TIMEOUT).unwrap();
    assert_eq!(got, vec![false]);
    assert!(s.dp(0).read_flows().is_empty());
}

/// `detach` removes an interface's enforcement (a denied flow passes again), and
/// `detach_and_unpin` leaves no link and no pin.
#[test]
fn detach_and_unpin_leave_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new();
    let mut compilers = vec![Compiler::new(), Compiler::new()];
    let mut input = base_input(&s.lab);
    input.policies = vec![policy("x", "deny", all(), BOTH, vec![], vec![])];
    let compiled = compile_nodes(&s.lab, &mut compilers, &input);
    s.apply(&compiled);
    let xa = s.lab.pod_index("x/a");
    let yb = s.lab.pod_index("y/b");
    let cell = Cell { from: yb, to: xa, protocol: Tcp, port: 80 };
    assert_eq!(s.lab.probe(&[cell], TIMEOUT).unwrap(), vec![false]);
    assert_eq!(s.dp(0).interfaces().unwrap().len(), 5, "node-1 has 5 pods attached");
    let ifname = s.lab.pods[xa].host_if.clone();
    assert_eq!(s.dp(0).detach(&ifname).unwrap(), 2);
    assert!(!s.dp(0).interfaces().unwrap().contains(&ifname));
    // One UDP datagram, no retransmission: the program must be gone when detach returns.
    let udp = Cell { protocol: Udp, ..cell };
    assert_eq!(s.lab.probe(&[udp], RETRY_TIMEOUT).unwrap(), vec![true], "detached x/a still enforced");

    for node in 0..2 {
        let dp = s.dps[node].take().unwrap();
        dp.detach_and_unpin().unwrap();
        assert!(!s.pin_dir(node).exists(), "pin dir left behind");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &s.lab.nodes[node].netns.name, "bpftool", "net", "show"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "bpftool: {out:?}");
        assert!(!text.contains("ks_pol"), "programs still attached:\n{text}");
    }
    // Nothing enforces any more: x/b (still in x, denied before) is reachable.
    let xb = s.lab.pod_index("x/b");
    let c2 = Cell { from: yb, to: xb, protocol: Udp, port: 81 };
    assert_eq!(s.lab.probe(&[c2], RETRY_TIMEOUT).unwrap(), vec![true]);
}

/// A test that panics with everything loaded, attached and applied leaves no netns and
/// no pins behind.
#[test]
fn panic_midway_cleans_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut names = Vec::new();
    let mut pin_dirs = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut s = Setup::new();
        let mut compilers = vec![Compiler::new(), Compiler::new()];
        let mut input = base_input(&s.lab);
        input.policies = vec![policy("x", "deny", all(), BOTH, vec![], vec![])];
        let compiled = compile_nodes(&s.lab, &mut compilers, &input);
        s.apply(&compiled);
        names.extend(s.lab.pods.iter().map(|p| p.netns.name.clone()));
        names.extend(s.lab.nodes.iter().map(|n| n.netns.name.clone()));
        pin_dirs.extend((0..2).map(|n| s.pin_dir(n).to_path_buf()));
        panic!("on purpose");
    }));
    assert!(r.is_err());
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in &names {
        assert!(!list.contains(n.as_str()), "netns {n} left behind");
    }
    for d in &pin_dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

/// Sends one UDP datagram of `size` bytes from pod `from` to `to:port` and says whether
/// the server's reply came back.
fn udp_roundtrip(lab: &NetpolLab, from: usize, to: usize, port: u16, size: usize) -> bool {
    let dst = std::net::SocketAddrV4::new(lab.pods[to].ip, port);
    std::thread::scope(|s| {
        s.spawn(|| {
            lab.pods[from].netns.enter_thread().unwrap();
            let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            sock.set_read_timeout(Some(RETRY_TIMEOUT)).unwrap();
            sock.send_to(&vec![b'f'; size], dst).unwrap();
            let mut buf = [0u8; 64];
            matches!(sock.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == lab.pods[to].id().as_bytes())
        })
        .join()
        .unwrap()
    })
}

/// A 4,000-byte datagram leaves the pod as three IP fragments; only the first carries
/// the ports. Allowed on UDP 80: all fragments pass (the later ones are checked with the
/// first one's ports) and the server replies. To UDP 81, the first fragment is dropped.
#[test]
fn fragmented_udp_follows_its_first_fragment() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new();
    let mut compilers = vec![Compiler::new(), Compiler::new()];
    let mut input = base_input(&s.lab);
    input.policies =
        vec![policy("x", "udp80", sel(&[("pod", "a")]), IN, vec![rule(vec![port(Udp, 80)], vec![])], vec![])];
    let compiled = compile_nodes(&s.lab, &mut compilers, &input);
    s.apply(&compiled);
    let xa = s.lab.pod_index("x/a"); // node-1
    let yb = s.lab.pod_index("y/b"); // node-1
    let ya = s.lab.pod_index("y/a"); // node-2
    for from in [yb, ya] {
        assert!(udp_roundtrip(&s.lab, from, xa, 80, 4000), "fragmented, allowed port");
        assert!(udp_roundtrip(&s.lab, from, xa, 80, 100), "small, allowed port");
        assert!(!udp_roundtrip(&s.lab, from, xa, 81, 4000), "fragmented, denied port");
    }
}

/// Tracked flows are checked again after a policy change (the loader bumps the policy
/// generation): one UDP socket pair keeps its 5-tuple throughout, answers while
/// allowed, stops when a new policy denies it, answers again when allowed again.
#[test]
fn established_flow_follows_policy_change() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new();
    let mut compilers = vec![Compiler::new(), Compiler::new()];
    let xa = s.lab.pod_index("x/a"); // node-1
    let ya = s.lab.pod_index("y/a"); // node-2
    let dst = std::net::SocketAddrV4::new(s.lab.pods[xa].ip, 80);
    let expect_id = s.lab.pods[xa].id();
    let (to_prober, jobs) = std::sync::mpsc::channel::<Duration>();
    let (results, from_prober) = std::sync::mpsc::channel::<bool>();
    let ns = std::fs::File::open(s.lab.pods[ya].netns.path()).unwrap();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            sock.connect(dst).unwrap();
            while let Ok(timeout) = jobs.recv() {
                sock.set_read_timeout(Some(timeout)).unwrap();
                let mut buf = [0u8; 64];
                // Late answers of an earlier round must not count for this one.
                sock.set_nonblocking(true).unwrap();
                while sock.recv(&mut buf).is_ok() {}
                sock.set_nonblocking(false).unwrap();
                sock.send(b"again").unwrap();
                let ok = matches!(sock.recv(&mut buf), Ok(n) if &buf[..n] == expect_id.as_bytes());
                results.send(ok).unwrap();
            }
        });
        let round = |timeout| {
            to_prober.send(timeout).unwrap();
            from_prober.recv().unwrap()
        };
        let allow = base_input(&s.lab);
        s.apply(&compile_nodes(&s.lab, &mut compilers, &allow));
        assert!(round(RETRY_TIMEOUT), "no policy: reply expected");
        let mut deny = base_input(&s.lab);
        deny.policies = vec![policy("x", "deny", all(), IN, vec![], vec![])];
        s.apply(&compile_nodes(&s.lab, &mut compilers, &deny));
        assert!(!round(TIMEOUT), "tracked flow still passes after deny");
        s.apply(&compile_nodes(&s.lab, &mut compilers, &allow));
        assert!(round(RETRY_TIMEOUT), "allowed again: reply expected");
        drop(to_prober);
    });
}

fn ip_output(args: &[&str]) -> String {
    let out = std::process::Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` every 20 ms until it returns Some or `limit` passes.
fn await_some<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The model is IPv4-only: IPv6 to or from a pod is dropped (reported as unsupported
/// L3), but neighbour discovery passes both programs, so the node still resolves the
/// pod's link-local address.
#[test]
fn ipv6_is_dropped_but_neighbour_discovery_passes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new();
    let xa = s.lab.pod_index("x/a"); // node-1
    let pod_ns = s.lab.pods[xa].netns.name.clone();
    let node_ns = s.lab.nodes[0].netns.name.clone();
    let host_if = s.lab.pods[xa].host_if.clone();
    // The pod answers neighbour solicitations for its link-local address only once
    // duplicate address detection has finished.
    let ll: std::net::Ipv6Addr = await_some(Duration::from_secs(10), || {
        let out = ip_output(&["-n", &pod_ns, "-6", "addr", "show", "dev", "eth0"]);
        let line = out.lines().find(|l| l.contains("inet6 fe80"))?;
        if line.contains("tentative") {
            return None;
        }
        line.split_whitespace().nth(1)?.split('/').next()?.parse().ok()
    })
    .expect("pod link-local address");
    // The node sends from its own link-local address on the veth, usable (not
    // EADDRNOTAVAIL) only once its duplicate address detection has finished too.
    await_some(Duration::from_secs(10), || {
        let out = ip_output(&["-n", &node_ns, "-6", "addr", "show", "dev", &host_if]);
        let line = out.lines().find(|l| l.contains("inet6 fe80"))?;
        (!line.contains("tentative")).then_some(())
    })
    .expect("node link-local address on the pod's veth");
    s.dp(0).read_flows();

    let node_path = s.lab.nodes[0].netns.path();
    let pod_path = s.lab.pods[xa].netns.path();
    assert!(!v6_delivered(&node_path, &pod_path, &host_if, ll, TIMEOUT), "IPv6 datagram reached the pod");
    // NS out through the pod's ingress program, NA back through its egress program.
    let neigh = await_some(Duration::from_secs(3), || {
        let out = ip_output(&["-n", &node_ns, "-6", "neigh", "show", "dev", &host_if]);
        out.lines().find(|l| l.starts_with(&ll.to_string()) && l.contains("lladdr")).map(str::to_string)
    });
    assert!(neigh.is_some(), "neighbour discovery did not complete");
    // The datagram itself, sent once the neighbour resolved, is dropped.
    let mut seen = Vec::new();
    let dropped = await_some(Duration::from_secs(3), || {
        seen.extend(s.dp(0).read_flows());
        seen.iter()
            .find(|e| e.drop_reason == Some(DropReason::UnsupportedL3) && e.direction == Some(Direction::Ingress))
            .cloned()
    });
    let e = dropped.unwrap_or_else(|| panic!("no unsupported-L3 drop: {seen:#?}"));
    assert_eq!(e.verdict, PolicyVerdict::Dropped);
    assert_eq!(e.ct_state, CtState::None);
    // Control: without the programs the same datagram arrives.
    assert_eq!(s.dp(0).detach(&host_if).unwrap(), 2);
    assert!(
        v6_delivered(&node_path, &pod_path, &host_if, ll, RETRY_TIMEOUT),
        "IPv6 datagram lost even without the programs"
    );
}

/// Sends one UDP datagram from the node to the pod's link-local address (port 9999) and
/// says whether a socket in the pod received it within `timeout`.
fn v6_delivered(node: &Path, pod: &Path, host_if: &str, ll: std::net::Ipv6Addr, timeout: Duration) -> bool {
    let enter = |p: &Path| {
        let f = std::fs::File::open(p).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    };
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let rx = scope.spawn(|| {
            enter(pod);
            let sock = std::net::UdpSocket::bind("[::]:9999").unwrap();
            sock.set_read_timeout(Some(timeout)).unwrap();
            bound_tx.send(()).unwrap();
            let mut buf = [0u8; 16];
            matches!(sock.recv_from(&mut buf), Ok((2, _)))
        });
        bound_rx.recv().unwrap();
        scope
            .spawn(|| {
                enter(node);
                let c = std::ffi::CString::new(host_if).unwrap();
                let scope_id = unsafe { libc::if_nametoindex(c.as_ptr()) };
                assert_ne!(scope_id, 0);
                let sock = std::net::UdpSocket::bind("[::]:0").unwrap();
                sock.send_to(b"v6", std::net::SocketAddrV6::new(ll, 9999, 0, scope_id)).unwrap();
            })
            .join()
            .unwrap();
        rx.join().unwrap()
    })
}
