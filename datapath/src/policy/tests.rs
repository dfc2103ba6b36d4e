//! Compiler tests: a simulator of the kernel's lookups over [`Compiled`] (bit-level LPM
//! on the documented key layouts), hand-written cases, and a randomised comparison of
//! the simulator with [`oracle::allowed`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::compile::{port_blocks, Compiler};
use super::model::*;
use super::oracle;
use crate::Protocol;

// ---------- the kernel's view ----------

/// What the tc programs see, built from one `Compiled`: the ipcache and policy map as
/// longest-prefix-match tables over the documented key bits.
struct Kernel<'a> {
    c: &'a Compiled,
    /// (local, direction) → `(key bits, prefixlen)` of its entries, 96-bit keys in the
    /// low bits of a u128, most significant key bit first.
    policy: HashMap<(Identity, u8), Vec<(u128, u32)>>,
    /// Addresses looked up before (the tests probe the same few over and over).
    known: HashMap<Ipv4Addr, Identity>,
}

fn dir_byte(d: Direction) -> u8 {
    match d {
        Direction::Ingress => 1,
        Direction::Egress => 2,
    }
}

fn proto_byte(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

fn policy_key(local: Identity, peer: Identity, dir: u8, proto: u8, port: u16) -> u128 {
    (u128::from(local) << 64)
        | (u128::from(peer) << 32)
        | (u128::from(dir) << 24)
        | (u128::from(proto) << 16)
        | u128::from(port)
}

fn prefix_matches(key: u128, entry: u128, prefixlen: u32) -> bool {
    let drop = 96 - prefixlen;
    key >> drop == entry >> drop
}

impl<'a> Kernel<'a> {
    fn new(c: &'a Compiled) -> Self {
        let mut policy: HashMap<(Identity, u8), Vec<(u128, u32)>> = HashMap::new();
        for e in &c.entries {
            let (proto, prefixlen) = match e.protocol {
                None => (0, 72),
                Some(p) => (proto_byte(p), 96 - u32::from(e.port_wildcard_bits)),
            };
            assert!(e.port_wildcard_bits <= 16, "{e:?}");
            if e.protocol.is_some() {
                // A block that is not aligned would cover other ports than it claims.
                assert_eq!(u32::from(e.port) % (1 << e.port_wildcard_bits), 0, "unaligned {e:?}");
            }
            let key = policy_key(
                e.local,
                e.peer,
                dir_byte(e.direction),
                proto,
                if e.protocol.is_some() { e.port } else { 0 },
            );
            policy.entry((e.local, dir_byte(e.direction))).or_default().push((key, prefixlen));
        }
        Kernel { c, policy, known: HashMap::new() }
    }

    /// Remembers the identities of `addrs`.
    fn knowing(mut self, addrs: &[Ipv4Addr]) -> Self {
        self.known = addrs.iter().map(|a| (*a, self.identity(*a))).collect();
        self
    }

    fn identity(&self, ip: Ipv4Addr) -> Identity {
        if let Some(id) = self.known.get(&ip) {
            return *id;
        }
        self.c
            .ipcache
            .iter()
            .filter(|(cidr, _)| cidr.contains_ip(ip))
            .max_by_key(|(cidr, _)| cidr.prefix)
            .map(|(_, id)| *id)
            .expect("0.0.0.0/0 is always in the ipcache")
    }

    fn isolated(&self, id: Identity, dir: Direction) -> bool {
        self.c.isolation.get(&id).is_some_and(|i| match dir {
            Direction::Ingress => i.ingress,
            Direction::Egress => i.egress,
        })
    }

    fn lookup(&self, local: Identity, peer: Identity, dir: Direction, proto: Protocol, port: u16) -> bool {
        let Some(list) = self.policy.get(&(local, dir_byte(dir))) else {
            return false;
        };
        [peer, ANY_PEER].iter().any(|p| {
            let key = policy_key(local, *p, dir_byte(dir), proto_byte(proto), port);
            list.iter().any(|(e, len)| prefix_matches(key, *e, *len))
        })
    }

    fn egress_ok(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: Protocol, port: u16) -> bool {
        let (s, d) = (self.identity(src), self.identity(dst));
        !self.isolated(s, Direction::Egress) || self.lookup(s, d, Direction::Egress, proto, port)
    }

    fn ingress_ok(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: Protocol, port: u16) -> bool {
        let (s, d) = (self.identity(src), self.identity(dst));
        !self.isolated(d, Direction::Ingress) || self.lookup(d, s, Direction::Ingress, proto, port)
    }

    fn allowed(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: Protocol, port: u16) -> bool {
        self.egress_ok(src, dst, proto, port) && self.ingress_ok(src, dst, proto, port)
    }
}

/// Traffic between addresses of one pod stays in its network namespace: no program
/// sees it.
fn within_one_pod(input: &PolicyInput, a: Ipv4Addr, b: Ipv4Addr) -> bool {
    let owner = |ip: Ipv4Addr| input.pods.iter().position(|p| p.ips.contains(&ip));
    owner(a).is_some() && owner(a) == owner(b)
}

/// The output invariants model.rs promises.
fn check_shape(c: &Compiled) {
    assert!(c.ipcache.windows(2).all(|w| w[0].0 < w[1].0), "ipcache sorted, one entry per prefix");
    assert!(c.ipcache.iter().any(|(p, _)| p.prefix == 0), "0.0.0.0/0 present");
    assert!(c.entries.windows(2).all(|w| w[0] < w[1]), "entries sorted and deduplicated");
    assert!(!c.identities.contains_key(&ANY_PEER));
    for (_, id) in &c.ipcache {
        assert!(c.identities.contains_key(id));
    }
    for e in &c.entries {
        assert!(c.identities.contains_key(&e.local) && (e.peer == ANY_PEER || c.identities.contains_key(&e.peer)));
        assert!(matches!(c.identities[&e.local].kind, IdentityKind::Pod { .. }));
    }
    for id in c.isolation.keys() {
        assert!(matches!(c.identities[id].kind, IdentityKind::Pod { .. }));
    }
}

// ---------- building inputs by hand ----------

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector { match_labels: labels(pairs), match_expressions: vec![] }
}

fn pod(ns: &str, name: &str, l: &[(&str, &str)], addr: &str, node: &str) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(l),
        ips: vec![ip(addr)],
        node: node.into(),
        named_ports: vec![],
    }
}

fn tcp(port: u16) -> PortRule {
    PortRule { protocol: Protocol::Tcp, port: Some(PortRef::Number(port)), end_port: None }
}

fn named(proto: Protocol, name: &str) -> PortRule {
    PortRule { protocol: proto, port: Some(PortRef::Name(name.into())), end_port: None }
}

fn np(name: &str, proto: Protocol, port: u16) -> NamedPort {
    NamedPort { name: name.into(), protocol: proto, port }
}

fn policy(ns: &str, name: &str, selector: LabelSelector, types: &[Direction]) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: selector,
        policy_types: types.to_vec(),
        ingress: vec![],
        egress: vec![],
    }
}

fn pods_peer(pod_selector: Option<LabelSelector>, namespace_selector: Option<LabelSelector>) -> Peer {
    Peer::Pods { pod_selector, namespace_selector }
}

fn block(c: &str, except: &[&str]) -> Peer {
    Peer::IpBlock(IpBlock { cidr: cidr(c), except: except.iter().map(|e| cidr(e)).collect() })
}

fn compile(input: &PolicyInput) -> Compiled {
    let c = Compiler::new().compile(input, None);
    check_shape(&c);
    c
}

/// Asserts kernel and oracle agree on every listed case, and that both give `want`.
fn expect(input: &PolicyInput, c: &Compiled, cases: &[(&str, &str, Protocol, u16, bool)]) {
    let k = Kernel::new(c);
    for &(src, dst, proto, port, want) in cases {
        let (s, d) = (ip(src), ip(dst));
        assert_eq!(oracle::allowed(input, s, d, proto, port), want, "oracle {src} → {dst} {proto:?}/{port}");
        assert_eq!(
            within_one_pod(input, s, d) || k.allowed(s, d, proto, port),
            want,
            "compiled {src} → {dst} {proto:?}/{port}\n{c:#?}"
        );
    }
}

use Protocol::{Tcp, Udp};

// ---------- hand-written cases ----------

#[test]
fn port_blocks_cover_exactly() {
    assert_eq!(port_blocks(80, 81), vec![(80, 1)]);
    assert_eq!(port_blocks(80, 80), vec![(80, 0)]);
    assert_eq!(port_blocks(0, 65535), vec![(0, 16)]);
    assert_eq!(port_blocks(32768, 65535), vec![(32768, 15)]);
    let one_up = port_blocks(1, 65535);
    assert_eq!(one_up.len(), 16, "{one_up:?}");
    assert_eq!(port_blocks(32000, 32768), vec![(32000, 8), (32256, 9), (32768, 0)]);
    for (lo, hi) in
        [(1u16, 65535u16), (32000, 32768), (80, 81), (81, 1000), (0, 0), (65535, 65535), (1023, 1025), (30000, 32767)]
    {
        let mut covered = Vec::new();
        for (start, k) in port_blocks(lo, hi) {
            assert_eq!(u32::from(start) % (1 << k), 0, "aligned");
            covered.extend((0..1u32 << k).map(|i| u32::from(start) + i));
        }
        let want: Vec<u32> = (u32::from(lo)..=u32::from(hi)).collect();
        assert_eq!(covered, want, "{lo}..={hi}");
    }
}

#[test]
fn end_port_ranges_reach_the_map() {
    let mut p = policy("a", "range", sel(&[]), &[Direction::Ingress]);
    p.ingress.push(Rule {
        ports: vec![
            PortRule { protocol: Tcp, port: Some(PortRef::Number(32000)), end_port: Some(32768) },
            PortRule { protocol: Udp, port: Some(PortRef::Number(80)), end_port: Some(81) },
        ],
        peers: vec![],
    });
    let input = PolicyInput {
        pods: vec![pod("a", "p", &[], "10.0.0.1", "n1"), pod("a", "q", &[("x", "y")], "10.0.0.2", "n1")],
        policies: vec![p],
        ..Default::default()
    };
    let c = compile(&input);
    let local = Kernel::new(&c).identity(ip("10.0.0.1"));
    let mine: Vec<_> =
        c.entries.iter().filter(|e| e.local == local).map(|e| (e.protocol, e.port, e.port_wildcard_bits)).collect();
    assert_eq!(mine, vec![(Some(Tcp), 32000, 8), (Some(Tcp), 32256, 9), (Some(Tcp), 32768, 0), (Some(Udp), 80, 1)]);
    expect(
        &input,
        &c,
        &[
            ("10.0.0.2", "10.0.0.1", Tcp, 31999, false),
            ("10.0.0.2", "10.0.0.1", Tcp, 32000, true),
            ("10.0.0.2", "10.0.0.1", Tcp, 32500, true),
            ("10.0.0.2", "10.0.0.1", Tcp, 32768, true),
            ("10.0.0.2", "10.0.0.1", Tcp, 32769, false),
            ("10.0.0.2", "10.0.0.1", Udp, 81, true),
            ("10.0.0.2", "10.0.0.1", Udp, 82, false),
            ("10.0.0.2", "10.0.0.1", Tcp, 80, false),
        ],
    );
}

#[test]
fn ip_blocks_with_nested_excepts() {
    // 10/8 minus 10.1/16, while another block allows 10.1.2/24 inside that except, and
    // a third allows the world minus 10/8.
    let mut p = policy("a", "blocks", sel(&[("app", "web")]), &[Direction::Ingress]);
    p.ingress.push(Rule { ports: vec![tcp(80)], peers: vec![block("10.0.0.0/8", &["10.1.0.0/16"])] });
    p.ingress.push(Rule { ports: vec![tcp(81)], peers: vec![block("10.1.2.0/24", &[])] });
    p.ingress.push(Rule { ports: vec![tcp(82)], peers: vec![block("0.0.0.0/0", &["10.0.0.0/8"])] });
    let input = PolicyInput {
        pods: vec![
            pod("a", "web", &[("app", "web")], "10.9.0.1", "n1"),
            // Pods are matched by ipBlocks too: this one is inside the except.
            pod("b", "in-except", &[], "10.1.5.5", "n1"),
            pod("b", "in-nested", &[], "10.1.2.7", "n1"),
        ],
        policies: vec![p],
        ..Default::default()
    };
    let c = compile(&input);
    let prefixes: Vec<String> = c.ipcache.iter().map(|(p, _)| p.to_string()).collect();
    for want in ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.9.0.1/32", "10.1.5.5/32", "10.1.2.7/32"] {
        assert!(prefixes.contains(&want.to_string()), "{want} in {prefixes:?}");
    }
    assert_eq!(prefixes.len(), 7);
    let k = Kernel::new(&c);
    // 10.1.0.0/16 (only in the world block? no: inside 10/8 → in the except of the
    // world block too) is in no block, same as a pod in it.
    assert_ne!(k.identity(ip("10.1.0.9")), k.identity(ip("10.2.0.9")));
    let web = "10.9.0.1";
    expect(
        &input,
        &c,
        &[
            ("10.2.3.4", web, Tcp, 80, true),
            ("10.2.3.4", web, Tcp, 81, false),
            ("10.2.3.4", web, Tcp, 82, false),
            ("10.1.0.9", web, Tcp, 80, false),
            ("10.1.0.9", web, Tcp, 81, false),
            ("10.1.0.9", web, Tcp, 82, false),
            ("10.1.2.9", web, Tcp, 80, false),
            ("10.1.2.9", web, Tcp, 81, true),
            ("10.1.5.5", web, Tcp, 80, false),
            ("10.1.2.7", web, Tcp, 81, true),
            ("10.1.2.7", web, Tcp, 80, false),
            ("8.8.8.8", web, Tcp, 82, true),
            ("8.8.8.8", web, Tcp, 80, false),
            ("11.0.0.0", web, Tcp, 82, true),
            ("9.255.255.255", web, Tcp, 82, true),
        ],
    );
    // The world outside 10/8 (0/0 prefix region) and 10/8's own region differ; the
    // whole 11/8 shares the 0/0 identity.
    assert_eq!(k.identity(ip("11.0.0.0")), k.identity(ip("8.8.8.8")));
}

#[test]
fn selectors_namespaces_and_both_together() {
    let mut p = policy("a", "mix", sel(&[("app", "db")]), &[Direction::Ingress]);
    p.ingress.push(Rule {
        ports: vec![],
        peers: vec![
            // Same namespace, app=web.
            pods_peer(Some(sel(&[("app", "web")])), None),
            // Any pod in team=x namespaces that is role=admin.
            pods_peer(Some(sel(&[("role", "admin")])), Some(sel(&[("team", "x")]))),
        ],
    });
    let mut q = policy("a", "all-of-ns-c", sel(&[("app", "db")]), &[Direction::Ingress]);
    q.ingress.push(Rule {
        ports: vec![tcp(5432)],
        peers: vec![pods_peer(None, Some(sel(&[("kubernetes.io/metadata.name", "c")])))],
    });
    let input = PolicyInput {
        namespaces: vec![
            NamespaceInfo { name: "a".into(), labels: labels(&[("kubernetes.io/metadata.name", "a")]) },
            NamespaceInfo { name: "b".into(), labels: labels(&[("team", "x"), ("kubernetes.io/metadata.name", "b")]) },
            NamespaceInfo { name: "c".into(), labels: labels(&[("kubernetes.io/metadata.name", "c")]) },
        ],
        pods: vec![
            pod("a", "db", &[("app", "db")], "10.0.0.1", "n1"),
            pod("a", "web", &[("app", "web")], "10.0.0.2", "n1"),
            pod("b", "web", &[("app", "web")], "10.0.0.3", "n1"),
            pod("b", "admin", &[("role", "admin")], "10.0.0.4", "n2"),
            pod("a", "admin", &[("role", "admin")], "10.0.0.5", "n2"),
            pod("c", "any", &[("role", "admin")], "10.0.0.6", "n2"),
        ],
        policies: vec![p, q],
        ..Default::default()
    };
    let c = compile(&input);
    let db = "10.0.0.1";
    expect(
        &input,
        &c,
        &[
            ("10.0.0.2", db, Udp, 9, true),
            ("10.0.0.3", db, Tcp, 9, false),
            ("10.0.0.4", db, Tcp, 9, true),
            ("10.0.0.5", db, Tcp, 9, false),
            ("10.0.0.6", db, Tcp, 5432, true),
            ("10.0.0.6", db, Tcp, 5433, false),
            ("192.168.0.1", db, Tcp, 5432, false),
            // Not isolated: everything goes.
            (db, "10.0.0.2", Tcp, 1, true),
        ],
    );
}

#[test]
fn named_ports_resolve_against_the_destination() {
    let mut web = pod("a", "web", &[("app", "web")], "10.0.0.1", "n1");
    web.named_ports = vec![np("http", Tcp, 8080), np("dns", Udp, 53)];
    let mut web2 = pod("a", "web2", &[("app", "web")], "10.0.0.2", "n1");
    web2.named_ports = vec![np("http", Tcp, 9000)];
    let client = pod("a", "client", &[("app", "client")], "10.0.0.3", "n1");
    let mut ingress = policy("a", "in", sel(&[("app", "web")]), &[Direction::Ingress]);
    ingress
        .ingress
        .push(Rule { ports: vec![named(Tcp, "http"), named(Tcp, "dns"), named(Tcp, "nope")], peers: vec![] });
    let mut egress = policy("a", "out", sel(&[("app", "client")]), &[Direction::Egress]);
    // No peers: the name resolves on every pod that has it.
    egress.egress.push(Rule { ports: vec![named(Tcp, "http")], peers: vec![] });
    egress
        .egress
        .push(Rule { ports: vec![named(Udp, "dns")], peers: vec![pods_peer(Some(sel(&[("app", "web")])), None)] });
    let input = PolicyInput { pods: vec![web, web2, client], policies: vec![ingress, egress], ..Default::default() };
    let c = compile(&input);
    assert_ne!(
        Kernel::new(&c).identity(ip("10.0.0.1")),
        Kernel::new(&c).identity(ip("10.0.0.2")),
        "named ports split identities"
    );
    expect(
        &input,
        &c,
        &[
            ("10.0.0.3", "10.0.0.1", Tcp, 8080, true),
            ("10.0.0.3", "10.0.0.1", Tcp, 9000, false),
            ("10.0.0.3", "10.0.0.2", Tcp, 9000, true),
            ("10.0.0.3", "10.0.0.2", Tcp, 8080, false),
            // "dns" is UDP on the pod, the ingress rule asks for TCP: nothing.
            ("10.0.0.3", "10.0.0.1", Tcp, 53, false),
            // Egress allows UDP dns to web, but web's ingress policy does not.
            ("10.0.0.3", "10.0.0.1", Udp, 53, false),
            // Egress by name to a non-pod: never.
            ("10.0.0.3", "8.8.8.8", Tcp, 8080, false),
            // web → client: web is not egress-isolated, client not ingress-isolated.
            ("10.0.0.1", "10.0.0.3", Tcp, 8080, true),
        ],
    );
}

#[test]
fn default_deny_host_traffic_and_or_of_policies() {
    let deny = policy("a", "deny", sel(&[]), &[Direction::Ingress, Direction::Egress]);
    let mut allow = policy("a", "allow-web", sel(&[("app", "web")]), &[Direction::Ingress]);
    allow.ingress.push(Rule { ports: vec![tcp(80)], peers: vec![] });
    // Egress rules in a policy whose types say Ingress only are ignored.
    allow.egress.push(Rule { ports: vec![], peers: vec![] });
    let input = PolicyInput {
        pods: vec![pod("a", "web", &[("app", "web")], "10.0.0.1", "n1"), pod("b", "other", &[], "10.0.0.2", "n1")],
        policies: vec![deny, allow],
        host_ips: vec![ip("192.168.1.10")],
        ..Default::default()
    };
    let c = compile(&input);
    expect(
        &input,
        &c,
        &[
            ("10.0.0.2", "10.0.0.1", Tcp, 80, true),
            ("10.0.0.2", "10.0.0.1", Tcp, 81, false),
            ("192.168.1.10", "10.0.0.1", Udp, 9999, true),
            ("10.0.0.1", "10.0.0.2", Tcp, 80, false),
            ("10.0.0.1", "192.168.1.10", Tcp, 10250, false),
            ("10.0.0.2", "8.8.8.8", Tcp, 443, true),
            // A pod isolated both ways still reaches itself.
            ("10.0.0.1", "10.0.0.1", Tcp, 81, true),
        ],
    );
    let host = Kernel::new(&c).identity(ip("192.168.1.10"));
    assert_eq!(c.identities[&host].kind, IdentityKind::Host);
}

#[test]
fn identities_stay_stable_across_compiles() {
    let mut input = PolicyInput {
        pods: vec![
            pod("a", "web-1", &[("app", "web")], "10.0.0.1", "n1"),
            pod("a", "web-2", &[("app", "web")], "10.0.0.2", "n2"),
            pod("a", "db", &[("app", "db")], "10.0.0.3", "n1"),
        ],
        policies: vec![policy("a", "deny", sel(&[("app", "db")]), &[Direction::Ingress])],
        host_ips: vec![ip("192.168.1.10")],
        ..Default::default()
    };
    let mut compiler = Compiler::new();
    let first = compiler.compile(&input, None);
    assert_eq!(compiler.compile(&input, None), first, "same input, same output");
    let id_of = |c: &Compiled, a: &str| Kernel::new(c).identity(ip(a));
    let (web, db, host) = (id_of(&first, "10.0.0.1"), id_of(&first, "10.0.0.3"), id_of(&first, "192.168.1.10"));
    assert_eq!(web, id_of(&first, "10.0.0.2"), "same labels, same identity");
    assert_eq!(first.identities[&web].members, vec!["a/web-1", "a/web-2"]);
    let max_first = *first.identities.keys().max().unwrap();

    // db goes away, a pod with new labels arrives, web-2 moves.
    input.pods.retain(|p| p.name != "db");
    input.pods.push(pod("a", "cache", &[("app", "cache")], "10.0.0.4", "n1"));
    input.pods[1].ips = vec![ip("10.0.0.9")];
    let second = compiler.compile(&input, None);
    assert_eq!(id_of(&second, "10.0.0.1"), web);
    assert_eq!(id_of(&second, "10.0.0.9"), web);
    assert_eq!(id_of(&second, "192.168.1.10"), host);
    assert!(!second.identities.contains_key(&db));
    let cache = id_of(&second, "10.0.0.4");
    assert!(cache > max_first, "a new key gets a number never handed out before ({cache} vs {max_first})");

    // db comes back: a new number, not its old one (the kernel may still hold stale
    // entries under the old one on other nodes).
    input.pods.push(pod("a", "db", &[("app", "db")], "10.0.0.3", "n1"));
    let third = compiler.compile(&input, None);
    assert!(id_of(&third, "10.0.0.3") > cache);

    // Wrapping skips 0 and numbers in use.
    let mut wrapping = Compiler::starting_at(u32::MAX);
    let c = wrapping.compile(&input, None);
    assert!(c.identities.contains_key(&u32::MAX));
    assert!(!c.identities.contains_key(&0));
}

#[test]
fn local_node_limits_isolation_and_entries() {
    let mut p = policy("a", "p", sel(&[]), &[Direction::Ingress]);
    p.ingress.push(Rule { ports: vec![tcp(80)], peers: vec![pods_peer(None, None)] });
    let input = PolicyInput {
        pods: vec![pod("a", "x", &[("app", "x")], "10.0.0.1", "n1"), pod("a", "y", &[("app", "y")], "10.0.0.2", "n2")],
        policies: vec![p],
        ..Default::default()
    };
    let mut compiler = Compiler::new();
    let all = compiler.compile(&input, None);
    let n1 = compiler.compile(&input, Some("n1"));
    let n2 = compiler.compile(&input, Some("n2"));
    for c in [&n1, &n2] {
        check_shape(c);
        assert_eq!(c.ipcache, all.ipcache, "every node knows every pod");
        assert_eq!(c.identities, all.identities);
    }
    let x = Kernel::new(&all).identity(ip("10.0.0.1"));
    let y = Kernel::new(&all).identity(ip("10.0.0.2"));
    assert_eq!(n1.isolation.keys().copied().collect::<Vec<_>>(), vec![x]);
    assert_eq!(n2.isolation.keys().copied().collect::<Vec<_>>(), vec![y]);
    assert!(n1.entries.iter().all(|e| e.local == x) && !n1.entries.is_empty());
    let mut union: Vec<_> = n1.entries.iter().chain(&n2.entries).copied().collect();
    union.sort();
    assert_eq!(union, all.entries);
}

#[test]
fn redundant_entries_are_folded() {
    // Two policies allowing overlapping ranges to the same peer, plus an any-peer rule
    // that already covers part of it.
    let mut p = policy("a", "p", sel(&[("app", "x")]), &[Direction::Ingress]);
    let peer = vec![pods_peer(Some(sel(&[("app", "y")])), None)];
    p.ingress.push(Rule { ports: vec![tcp(80), tcp(81)], peers: peer.clone() });
    p.ingress.push(Rule {
        ports: vec![PortRule { protocol: Tcp, port: Some(PortRef::Number(82)), end_port: Some(83) }],
        peers: peer.clone(),
    });
    let mut q = policy("a", "q", sel(&[("app", "x")]), &[Direction::Ingress]);
    q.ingress.push(Rule { ports: vec![tcp(80), tcp(81)], peers: peer });
    q.ingress.push(Rule { ports: vec![tcp(82)], peers: vec![] });
    let input = PolicyInput {
        pods: vec![pod("a", "x", &[("app", "x")], "10.0.0.1", "n1"), pod("a", "y", &[("app", "y")], "10.0.0.2", "n1")],
        policies: vec![p, q],
        ..Default::default()
    };
    let c = compile(&input);
    let (x, y) = (Kernel::new(&c).identity(ip("10.0.0.1")), Kernel::new(&c).identity(ip("10.0.0.2")));
    let got: Vec<_> = c.entries.iter().map(|e| (e.local, e.peer, e.port, e.port_wildcard_bits)).collect();
    // 80..=83 to y minus 82 (any peer) = 80..=81 and 83.
    assert_eq!(got, vec![(x, ANY_PEER, 82, 0), (x, y, 80, 1), (x, y, 83, 0)]);
}

// ---------- randomised equivalence with the oracle ----------

const LABEL_KEYS: [&str; 3] = ["app", "tier", "env"];
const LABEL_VALUES: [&str; 3] = ["a", "b", "c"];
const PORT_NAMES: [&str; 4] = ["http", "dns", "metrics", "nope"];
const CIDRS: [&str; 10] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.0/28",
    "10.2.0.0/16",
    "192.168.0.0/16",
    "192.168.1.0/24",
    "10.1.2.5/32",
    "8.0.0.0/7",
];
/// Addresses pods, hosts and outsiders are drawn from: inside and around the CIDRs.
const ADDRS: [&str; 22] = [
    "10.1.2.1",
    "10.1.2.5",
    "10.1.2.17",
    "10.1.3.1",
    "10.1.200.9",
    "10.2.0.1",
    "10.2.9.9",
    "10.3.0.1",
    "10.0.0.1",
    "10.0.0.2",
    "192.168.1.1",
    "192.168.1.2",
    "192.168.2.1",
    "192.168.0.10",
    "8.8.8.8",
    "9.9.9.9",
    "11.0.0.1",
    "172.16.0.1",
    "10.1.2.2",
    "10.1.2.3",
    "10.2.0.2",
    "10.255.255.255",
];
const PROBE_PORTS: [u16; 12] = [1, 53, 79, 80, 81, 82, 443, 1024, 8080, 9090, 32768, 65535];

fn random_labels(rng: &mut StdRng) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for k in LABEL_KEYS {
        if rng.gen_bool(0.6) {
            let v = if rng.gen_bool(0.8) { &LABEL_VALUES[..2] } else { &LABEL_VALUES[2..] };
            out.insert(k.to_string(), v.choose(rng).unwrap().to_string());
        }
    }
    out
}

/// Mostly small selectors, so that a fair share of pods is selected: empty, one label,
/// or one or two expressions.
fn random_selector(rng: &mut StdRng) -> LabelSelector {
    let mut s = LabelSelector::default();
    match rng.gen_range(0..10) {
        0..=2 => {}
        3..=5 => {
            let k = LABEL_KEYS.choose(rng).unwrap();
            s.match_labels.insert(k.to_string(), LABEL_VALUES[..2].choose(rng).unwrap().to_string());
        }
        _ => {
            for _ in 0..rng.gen_range(1..=2) {
                let operator = *[SelectorOp::In, SelectorOp::NotIn, SelectorOp::Exists, SelectorOp::DoesNotExist]
                    .choose(rng)
                    .unwrap();
                let values = match operator {
                    SelectorOp::In | SelectorOp::NotIn => {
                        LABEL_VALUES.iter().filter(|_| rng.gen_bool(0.5)).map(|v| v.to_string()).collect()
                    }
                    _ => vec![],
                };
                let key = LABEL_KEYS.choose(rng).unwrap().to_string();
                s.match_expressions.push(SelectorRequirement { key, operator, values });
            }
        }
    }
    s
}

fn random_port_rule(rng: &mut StdRng) -> PortRule {
    let protocol = if rng.gen_bool(0.7) { Tcp } else { Udp };
    let (port, end_port) = match rng.gen_range(0..10) {
        0 => (None, None),
        1..=2 => (Some(PortRef::Name(PORT_NAMES.choose(rng).unwrap().to_string())), None),
        3..=4 => {
            let start = *PROBE_PORTS.choose(rng).unwrap();
            let end = start.saturating_add(*[0u16, 1, 2, 500, 40000].choose(rng).unwrap());
            (Some(PortRef::Number(start)), Some(end))
        }
        _ => (Some(PortRef::Number(*PROBE_PORTS.choose(rng).unwrap())), None),
    };
    PortRule { protocol, port, end_port }
}

fn random_peer(rng: &mut StdRng) -> Peer {
    if rng.gen_bool(0.4) {
        let c: Cidr = CIDRS.choose(rng).unwrap().parse().unwrap();
        // Excepts: strictly inside the cidr, possibly nested in each other.
        let inside: Vec<Cidr> =
            CIDRS.iter().map(|s| s.parse::<Cidr>().unwrap()).filter(|e| c.covers(e) && e.prefix > c.prefix).collect();
        let except = inside.into_iter().filter(|_| rng.gen_bool(0.4)).collect();
        Peer::IpBlock(IpBlock { cidr: c, except })
    } else {
        let (ps, ns) = match rng.gen_range(0..3) {
            0 => (Some(random_selector(rng)), None),
            1 => (None, Some(random_selector(rng))),
            _ => (Some(random_selector(rng)), Some(random_selector(rng))),
        };
        Peer::Pods { pod_selector: ps, namespace_selector: ns }
    }
}

fn random_rule(rng: &mut StdRng) -> Rule {
    Rule {
        ports: (0..rng.gen_range(0..3)).map(|_| random_port_rule(rng)).collect(),
        peers: (0..rng.gen_range(0..3)).map(|_| random_peer(rng)).collect(),
    }
}

/// Now and then none (deny all), mostly a few.
fn rule_count(rng: &mut StdRng) -> usize {
    if rng.gen_bool(0.15) {
        0
    } else {
        rng.gen_range(1..=3)
    }
}

fn random_input(rng: &mut StdRng) -> (PolicyInput, Vec<Ipv4Addr>) {
    let mut addrs: Vec<Ipv4Addr> = ADDRS.iter().map(|a| ip(a)).collect();
    addrs.shuffle(rng);
    let mut next_addr = addrs.into_iter();
    let ns_count = rng.gen_range(3..=4);
    let namespaces: Vec<NamespaceInfo> =
        (0..ns_count).map(|i| NamespaceInfo { name: format!("ns{i}"), labels: random_labels(rng) }).collect();
    let mut pods = Vec::new();
    for i in 0..rng.gen_range(6..=11) {
        let mut ips: Vec<Ipv4Addr> = next_addr.by_ref().take(1).collect();
        if rng.gen_bool(0.1) {
            ips.extend(next_addr.next());
        }
        if rng.gen_bool(0.05) {
            ips.clear();
        }
        // Rarely, an address an earlier pod already has (a stale pod object).
        if rng.gen_bool(0.03) {
            if let Some(taken) = pods.iter().flat_map(|p: &PodInfo| p.ips.clone()).next() {
                ips = vec![taken];
            }
        }
        let named_ports = [
            np("http", Tcp, 80),
            np("http", Tcp, 8080),
            np("dns", Udp, 53),
            np("dns", Tcp, 53),
            np("metrics", Tcp, 9090),
        ]
        .into_iter()
        .filter(|_| rng.gen_bool(0.3))
        .collect();
        // Now and then a namespace the input does not list.
        let unlisted = usize::from(rng.gen_bool(0.1));
        pods.push(PodInfo {
            namespace: format!("ns{}", rng.gen_range(0..ns_count + unlisted)),
            name: format!("pod{i}"),
            labels: random_labels(rng),
            ips,
            node: format!("n{}", rng.gen_range(1..=2)),
            named_ports,
        });
    }
    let mut host_ips: Vec<Ipv4Addr> = next_addr.by_ref().take(rng.gen_range(1..=2)).collect();
    // Rarely, a node address that is also a pod's (a misreported host-network pod).
    if rng.gen_bool(0.05) {
        host_ips.extend(pods.iter().flat_map(|p| p.ips.first().copied()).last());
    }
    let mut policies = Vec::new();
    for i in 0..rng.gen_range(1..=6) {
        let types = match rng.gen_range(0..3) {
            0 => vec![Direction::Ingress],
            1 => vec![Direction::Egress],
            _ => vec![Direction::Ingress, Direction::Egress],
        };
        policies.push(NetworkPolicy {
            namespace: format!("ns{}", rng.gen_range(0..ns_count)),
            name: format!("pol{i}"),
            pod_selector: random_selector(rng),
            policy_types: types,
            ingress: (0..rule_count(rng)).map(|_| random_rule(rng)).collect(),
            egress: (0..rule_count(rng)).map(|_| random_rule(rng)).collect(),
        });
    }
    // Probed: every pod and host address and a few outsiders (the unused rest of ADDRS).
    let mut probe: Vec<Ipv4Addr> = pods.iter().flat_map(|p| p.ips.iter().copied()).collect();
    probe.extend(&host_ips);
    probe.extend(next_addr.take(5));
    probe.sort();
    probe.dedup();
    (PolicyInput { namespaces, pods, policies, host_ips }, probe)
}

#[test]
fn compiled_maps_agree_with_the_oracle_on_random_inputs() {
    let mut rng = StdRng::seed_from_u64(0x6b75_6265_7368_6966);
    let iterations = 300;
    let (mut checks, mut policed, mut allowed) = (0usize, 0usize, 0usize);
    let (mut ids, mut entries) = (0usize, 0usize);
    for iteration in 0..iterations {
        let (input, addrs) = random_input(&mut rng);
        let mut compiler = Compiler::new();
        let all = compiler.compile(&input, None);
        check_shape(&all);
        assert_eq!(compiler.compile(&input, None), all, "recompiling the same input changes nothing");
        let n1 = compiler.compile(&input, Some("n1"));
        let n2 = compiler.compile(&input, Some("n2"));
        ids += all.identities.len();
        entries += all.entries.len();
        let (k_all, k1, k2) =
            (Kernel::new(&all).knowing(&addrs), Kernel::new(&n1).knowing(&addrs), Kernel::new(&n2).knowing(&addrs));
        let node_of: HashMap<Ipv4Addr, &str> = {
            let mut m = HashMap::new();
            for p in &input.pods {
                for a in &p.ips {
                    m.entry(*a).or_insert(p.node.as_str());
                }
            }
            m
        };
        let on_node = |a: &Ipv4Addr| match node_of.get(a) {
            Some(&"n1") => &k1,
            Some(_) => &k2,
            None => &k_all,
        };
        for src in &addrs {
            for dst in &addrs {
                for proto in [Tcp, Udp] {
                    for port in PROBE_PORTS {
                        let want = oracle::allowed(&input, *src, *dst, proto, port);
                        let inside = within_one_pod(&input, *src, *dst);
                        let got = inside || k_all.allowed(*src, *dst, proto, port);
                        // Each node enforces its own pods: egress where src lives,
                        // ingress where dst lives.
                        let per_node = inside
                            || on_node(src).egress_ok(*src, *dst, proto, port)
                                && on_node(dst).ingress_ok(*src, *dst, proto, port);
                        if want != got || want != per_node {
                            panic!(
                                "iteration {iteration}: {src} → {dst} {proto:?}/{port}: oracle {want}, compiled {got}, per node {per_node}\n\
                                 input: {input:#?}\ncompiled: {all:#?}"
                            );
                        }
                        checks += 1;
                        if k_all.isolated(k_all.identity(*src), Direction::Egress)
                            || k_all.isolated(k_all.identity(*dst), Direction::Ingress)
                        {
                            policed += 1;
                            allowed += usize::from(want);
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "{iterations} random inputs, {checks} connections compared, {policed} of them to or from \
         an isolated pod ({allowed} of those allowed); {:.1} identities and {:.1} entries per input",
        ids as f64 / iterations as f64,
        entries as f64 / iterations as f64
    );
    // Both verdicts must be well represented where policies apply, or the comparison
    // proves little.
    assert!(policed > checks / 4, "{policed} of {checks}");
    assert!(allowed > policed / 5 && allowed < policed * 4 / 5, "{allowed} of {policed}");
}

// ---------- size and speed ----------

/// 10,000 pods in 500 namespaces, 1,000 policies (run with `--ignored --nocapture`,
/// preferably `--release`).
#[test]
#[ignore = "measurement: compiles 10,000 pods / 1,000 policies, prints timings; run with --release"]
fn compile_time_at_scale() {
    measure("shared egress ipBlock", &scale_input(false));
    measure("ipBlock except differs per namespace", &scale_input(true));
}

/// `distinct_excepts`: every namespace's egress ipBlock has its own except, the worst
/// case for world identities (each prefix in a different set of blocks). Otherwise all
/// share one "internet but not the cluster" block and every 10th namespace adds a /24.
fn scale_input(distinct_excepts: bool) -> PolicyInput {
    let mut rng = StdRng::seed_from_u64(7);
    let mut input = PolicyInput { host_ips: vec![ip("192.168.0.1"), ip("192.168.0.2")], ..Default::default() };
    for n in 0..500u32 {
        let ns = format!("ns{n}");
        input.namespaces.push(NamespaceInfo {
            name: ns.clone(),
            labels: labels(&[
                ("kubernetes.io/metadata.name", &ns),
                ("team", ["a", "b", "c", "d", "e"][(n % 5) as usize]),
            ]),
        });
        // 5 apps × 4 replicas per namespace.
        for p in 0..20u32 {
            let app = format!("app{}", p % 5);
            let i = n * 20 + p;
            let mut pod = pod(
                &ns,
                &format!("{app}-{p}"),
                &[("app", &app), ("tier", if p % 5 == 0 { "front" } else { "back" })],
                "0.0.0.0",
                &format!("node{}", i % 100),
            );
            pod.ips = vec![Ipv4Addr::from(0x0a00_0000 + i + 1)];
            pod.named_ports = vec![np("http", Tcp, 8080), np("metrics", Tcp, 9090)];
            input.pods.push(pod);
        }
        // Per namespace: default deny both ways, and one allow policy of a random shape.
        input.policies.push(policy(&ns, "default-deny", sel(&[]), &[Direction::Ingress, Direction::Egress]));
        let mut allow = policy(
            &ns,
            "allow",
            sel(&[("app", &format!("app{}", rng.gen_range(0..5)))]),
            &[Direction::Ingress, Direction::Egress],
        );
        allow.ingress.push(Rule {
            ports: vec![named(Tcp, "http")],
            peers: vec![pods_peer(Some(sel(&[("tier", "front")])), None)],
        });
        allow.ingress.push(Rule {
            ports: vec![tcp(9090)],
            peers: vec![pods_peer(Some(sel(&[("app", "app0")])), Some(sel(&[("team", "a")])))],
        });
        allow.egress.push(Rule {
            ports: vec![PortRule { protocol: Udp, port: Some(PortRef::Number(53)), end_port: None }],
            peers: vec![pods_peer(None, Some(sel(&[("kubernetes.io/metadata.name", "ns0")])))],
        });
        allow.egress.push(Rule {
            ports: vec![PortRule { protocol: Tcp, port: Some(PortRef::Number(443)), end_port: Some(8443) }],
            peers: vec![if distinct_excepts {
                block("0.0.0.0/0", &["10.0.0.0/8", &format!("172.16.{}.0/24", n % 256)])
            } else {
                block("0.0.0.0/0", &["10.0.0.0/8"])
            }],
        });
        if !distinct_excepts && n % 10 == 0 {
            allow
                .egress
                .push(Rule { ports: vec![tcp(5432)], peers: vec![block(&format!("172.16.{}.0/24", n / 10), &[])] });
        }
        input.policies.push(allow);
    }
    input
}

fn measure(what: &str, input: &PolicyInput) {
    let nodes: HashSet<&str> = input.pods.iter().map(|p| p.node.as_str()).collect();
    let mut compiler = Compiler::new();
    let t = Instant::now();
    let c = compiler.compile(input, None);
    let full = t.elapsed();
    let t = Instant::now();
    let again = compiler.compile(input, None);
    let recompile = t.elapsed();
    let t = Instant::now();
    let one_node = compiler.compile(input, Some("node7"));
    let node = t.elapsed();
    assert_eq!(again, c);
    eprintln!(
        "{what}: {} pods, {} namespaces, {} policies, {} nodes: {} identities, {} ipcache, {} isolated, \
         {} entries; compile {:?}, recompile {:?}; one node: {} entries in {:?}",
        input.pods.len(),
        input.namespaces.len(),
        input.policies.len(),
        nodes.len(),
        c.identities.len(),
        c.ipcache.len(),
        c.isolation.len(),
        c.entries.len(),
        full,
        recompile,
        one_node.entries.len(),
        node
    );
}
