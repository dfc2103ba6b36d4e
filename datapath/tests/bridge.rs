//! The pod network bridges (`overlay::bridge`) with real packets: a router namespace
//! carrying Flannel's masquerade rule (iptables, both backends) between a "legacy"
//! client and a "kubeshift" server. Without kubeshift's table the server sees the
//! router; with it, the client's own address; after `remove`, the router again. A
//! kubeshift pod's traffic to outside both networks leaves with the router's address.

use kubeshift_datapath::overlay::bridge::{self, Bridges};
use kubeshift_datapath::testenv::{unique_tag, Netns};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

const LEGACY_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const KS_SERVER: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);

struct Topology {
    client: Netns,
    router: Netns,
    server: Netns,
    outside: Netns,
}

fn topology() -> Topology {
    let t = unique_tag();
    let ns = |role: &str| Netns::create(&format!("ksbr-{role}-{t}")).expect("creating a netns");
    let topo = Topology { client: ns("c"), router: ns("r"), server: ns("s"), outside: ns("o") };
    let link = |a: &Netns, a_addr: &str, r_addr: &str, gw: &str, n: u32| {
        let (ra, aa) = (format!("ksbr{n}r"), format!("ksbr{n}a"));
        topo.router.ip(&["link", "add", &ra, "type", "veth", "peer", "name", &aa, "netns", &a.name]).unwrap();
        topo.router.ip(&["addr", "add", r_addr, "dev", &ra]).unwrap();
        topo.router.ip(&["link", "set", &ra, "up"]).unwrap();
        a.ip(&["addr", "add", a_addr, "dev", &aa]).unwrap();
        a.ip(&["link", "set", &aa, "up"]).unwrap();
        a.ip(&["route", "add", "default", "via", gw]).unwrap();
    };
    link(&topo.client, "10.244.1.2/24", "10.244.1.1/24", "10.244.1.1", 1);
    link(&topo.server, "10.200.1.2/24", "10.200.1.1/24", "10.200.1.1", 2);
    link(&topo.outside, "192.168.77.2/24", "192.168.77.1/24", "192.168.77.1", 3);
    topo.router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    topo
}

/// Flannel's masquerade rule for its network, written into the router namespace.
fn flannel_masquerade(router: &Netns, iptables: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", &router.name, iptables, "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16"])
        .args(["!", "-d", "224.0.0.0/4", "-j", "MASQUERADE", "--random-fully"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{iptables}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Connects from `from` to a listener in `to` at `addr`; returns the source address
/// the listener saw.
fn source_seen(from: &Netns, to: &Netns, addr: Ipv4Addr) -> Ipv4Addr {
    let listener = std::thread::scope(|s| {
        s.spawn(|| {
            to.enter_thread().unwrap();
            TcpListener::bind((addr, 0)).unwrap()
        })
        .join()
        .unwrap()
    });
    let port = listener.local_addr().unwrap().port();
    std::thread::scope(|s| {
        let accept = s.spawn(|| {
            let (mut c, peer) = listener.accept().unwrap();
            let _ = c.write_all(b"x");
            peer
        });
        s.spawn(|| {
            from.enter_thread().unwrap();
            let mut c =
                TcpStream::connect_timeout(&SocketAddr::from((addr, port)), Duration::from_secs(3)).expect("connect");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
        })
        .join()
        .unwrap();
        match accept.join().unwrap() {
            SocketAddr::V4(a) => *a.ip(),
            a => panic!("{a}"),
        }
    })
}

fn bridges() -> Bridges {
    Bridges { kubeshift: "10.200.0.0/16".parse().unwrap(), legacy: vec!["10.244.0.0/16".parse().unwrap()] }
}

fn both_backends(iptables: &str) {
    let t = topology();
    flannel_masquerade(&t.router, iptables);
    let router_side = Ipv4Addr::new(10, 200, 1, 1);
    assert_eq!(source_seen(&t.client, &t.server, KS_SERVER), router_side, "the legacy rule masquerades by itself");

    bridge::apply(&bridges(), Some(&t.router.path())).unwrap();
    // Applying twice replaces the table rather than adding a second copy.
    bridge::apply(&bridges(), Some(&t.router.path())).unwrap();
    assert_eq!(source_seen(&t.client, &t.server, KS_SERVER), LEGACY_CLIENT, "legacy -> kubeshift keeps the source");
    assert_eq!(source_seen(&t.server, &t.client, LEGACY_CLIENT), KS_SERVER, "kubeshift -> legacy keeps the source");
    assert_eq!(
        source_seen(&t.server, &t.outside, OUTSIDE),
        Ipv4Addr::new(192, 168, 77, 1),
        "kubeshift -> outside is masqueraded"
    );

    assert!(bridge::present(Some(&t.router.path())).unwrap());
    bridge::remove(Some(&t.router.path())).unwrap();
    bridge::remove(Some(&t.router.path())).unwrap();
    assert!(!bridge::present(Some(&t.router.path())).unwrap());
    assert_eq!(source_seen(&t.client, &t.server, KS_SERVER), router_side, "removed: the legacy rule applies again");
}

#[test]
fn bridges_keep_sources_past_iptables_legacy_masquerade() {
    both_backends("iptables-legacy");
}

#[test]
fn bridges_keep_sources_past_iptables_nft_masquerade() {
    both_backends("iptables-nft");
}
