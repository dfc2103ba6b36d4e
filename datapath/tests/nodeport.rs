//! Real packets through the NodePort tc programs. Every test builds its own small
//! cluster out of network namespaces:
//!
//! ```text
//!   client 192.168.77.100 ─┐
//!   node-1 192.168.77.1  ──┼── bridge (underlay netns)
//!   node-2 192.168.77.2  ──┘
//!   node-1 ── pod-1 10.244.1.10, 10.244.1.11   (node-1 routes 10.244.2.0/24 via node-2)
//!   node-2 ── pod-2 10.244.2.10                (node-2 routes 10.244.1.0/24 via node-1)
//! ```
//!
//! The datapath is attached to node-1's underlay interface. The client has no route to
//! the pod ranges, only to the external IP (via node-1), so everything it reaches, it
//! reaches through the programs. Needs root.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use kubeshift_datapath::{
    testenv::{unique_tag, Netns},
    Frontend, NodePortDatapath, NpBackend, NpReason, NpVerdict, Protocol, TrafficPolicy, DEFAULT_BPFFS_ROOT,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
const NODE1: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const P1A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const P1B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const P2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const NODE_PORT_TCP: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;
/// How long a client waits for an answer. Only the drop tests ever run into it: there
/// the silence is what is asserted.
const TIMEOUT: Duration = Duration::from_secs(3);
const DROP_TIMEOUT: Duration = Duration::from_millis(700);

fn ip(ns: &Netns, args: &[&str]) {
    ns.ip(args).unwrap_or_else(|e| panic!("ip -n {} {args:?}: {e}", ns.name));
}

/// Runs `f` on a thread inside `ns` (sockets stay in the netns they were made in, so a
/// stream returned from here can be used from any thread).
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_thread().expect("enter netns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

enum Sock {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// A server thread in some netns, stopped on drop (before the namespaces go).
struct Server {
    sock: Arc<Sock>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let fd = match &*self.sock {
            Sock::Tcp(l) => l.as_raw_fd(),
            Sock::Udp(u) => u.as_raw_fd(),
        };
        // shutdown() wakes the thread blocked on the socket.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_no_check(s: &UdpSocket) {
    // SO_NO_CHECK: send UDP with a zero checksum ("none"), which the NAT must keep zero.
    let one: libc::c_int = 1;
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_NO_CHECK: {}", io::Error::last_os_error());
}

/// TCP: greets each connection with `id=<id> peer=<what the server sees>` and then
/// echoes lines. UDP: answers each datagram with the same greeting, with zero checksums
/// when `no_check`.
fn start_server(ns: &Netns, addr: SocketAddrV4, proto: Protocol, id: &str, no_check: bool) -> Server {
    let sock = Arc::new(in_ns(ns, || match proto {
        Protocol::Tcp => Sock::Tcp(TcpListener::bind(addr).expect("bind tcp")),
        Protocol::Udp => {
            let u = UdpSocket::bind(addr).expect("bind udp");
            // Safety net in case shutdown() does not wake recv_from.
            u.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
            if no_check {
                set_no_check(&u);
            }
            Sock::Udp(u)
        }
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let conns = Arc::new(Mutex::new(Vec::new()));
    let (sock2, stop2, conns2, id) = (sock.clone(), stop.clone(), conns.clone(), id.to_string());
    let thread = std::thread::spawn(move || match &*sock2 {
        Sock::Tcp(l) => {
            let mut handlers = Vec::new();
            for c in l.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = c else { continue };
                conns2.lock().unwrap().push(c.try_clone().expect("clone"));
                let id = id.clone();
                handlers.push(std::thread::spawn(move || {
                    let peer = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                    // One write per message: several small ones would wait on each
                    // other's ACK (Nagle against delayed ACK, 40 ms each).
                    if c.write_all(format!("id={id} peer={peer}\n").as_bytes()).is_err() {
                        return;
                    }
                    let mut r = BufReader::new(c.try_clone().expect("clone"));
                    let mut line = String::new();
                    while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                        if c.write_all(line.as_bytes()).is_err() {
                            break;
                        }
                        line.clear();
                    }
                }));
            }
            for h in handlers {
                let _ = h.join();
            }
        }
        Sock::Udp(u) => {
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((_, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(format!("id={id} peer={from}").as_bytes(), from);
                }
            }
        }
    });
    Server { sock, conns, stop, thread: Some(thread) }
}

/// The namespaces of the picture at the top. Field order is drop order: servers stop
/// before their namespaces go.
struct Cluster {
    tag: String,
    servers: Vec<Server>,
    client: Netns,
    node1: Netns,
    node2: Netns,
    pod1: Netns,
    pod2: Netns,
    _underlay: Netns,
}

fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    let out = std::process::Command::new("ip")
        .args(["link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name, "netns", &b.name])
        .output()
        .expect("ip");
    assert!(out.status.success(), "veth {a_name}/{b_name}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Cluster {
    fn new() -> Cluster {
        let tag = unique_tag();
        let ns = |n: &str| Netns::create(&format!("ksnp-{tag}-{n}")).expect("netns");
        let c = Cluster {
            servers: Vec::new(),
            client: ns("c"),
            node1: ns("n1"),
            node2: ns("n2"),
            pod1: ns("p1"),
            pod2: ns("p2"),
            _underlay: ns("u"),
            tag,
        };
        let u = &c._underlay;
        ip(u, &["link", "add", "br0", "type", "bridge"]);
        ip(u, &["link", "set", "br0", "up"]);
        for (ns, port, addr) in [(&c.client, "vc", CLIENT), (&c.node1, "v1", NODE1), (&c.node2, "v2", NODE2)] {
            veth(ns, "eth0", u, port);
            ip(u, &["link", "set", port, "master", "br0", "up"]);
            ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(ns, &["link", "set", "eth0", "up"]);
        }
        for (node, pod, gw, pod_ips, other_range, other_node) in [
            (&c.node1, &c.pod1, "10.244.1.1", &[P1A, P1B][..], "10.244.2.0/24", NODE2),
            (&c.node2, &c.pod2, "10.244.2.1", &[P2][..], "10.244.1.0/24", NODE1),
        ] {
            node.sysctl("net.ipv4.ip_forward", "1").expect("ip_forward");
            veth(node, "pod0", pod, "eth0");
            ip(node, &["addr", "add", &format!("{gw}/24"), "dev", "pod0"]);
            ip(node, &["link", "set", "pod0", "up"]);
            for p in pod_ips {
                ip(pod, &["addr", "add", &format!("{p}/24"), "dev", "eth0"]);
            }
            ip(pod, &["link", "set", "eth0", "up"]);
            ip(pod, &["route", "add", "default", "via", gw]);
            ip(node, &["route", "add", other_range, "via", &other_node.to_string()]);
        }
        // External IPs are routed to a node by whoever owns them (a router, MetalLB…).
        ip(&c.client, &["route", "add", &format!("{EXTERNAL_IP}/32"), "via", &NODE1.to_string()]);
        c
    }

    fn serve(&mut self, pod: u8, addr: Ipv4Addr, proto: Protocol, port: u16, id: &str, no_check: bool) {
        let ns = if pod == 1 { &self.pod1 } else { &self.pod2 };
        let s = start_server(ns, SocketAddrV4::new(addr, port), proto, id, no_check);
        self.servers.push(s);
    }

    /// The three pod servers of every test: p1a and p1b on node-1, p2 on node-2, each
    /// with TCP 8080 and UDP 5353.
    fn with_pods() -> Cluster {
        let mut c = Cluster::new();
        for (pod, addr, id) in [(1, P1A, "p1a"), (1, P1B, "p1b"), (2, P2, "p2")] {
            c.serve(pod, addr, Protocol::Tcp, TCP_PORT, id, false);
            c.serve(pod, addr, Protocol::Udp, UDP_PORT, id, false);
        }
        c
    }
}

/// The datapath on node-1's eth0 plus the cluster; Drop unpins first (also on panic).
struct Ctx {
    dp: Option<NodePortDatapath>,
    pin_dir: PathBuf,
    c: Cluster,
}

impl Ctx {
    fn new() -> Ctx {
        let c = Cluster::with_pods();
        let pin_dir = Path::new(DEFAULT_BPFFS_ROOT).join(format!("nptest-{}", c.tag));
        let mut ctx = Ctx { dp: None, pin_dir, c };
        ctx.load();
        ctx.attach();
        ctx
    }

    fn load(&mut self) {
        self.dp = Some(NodePortDatapath::load(&self.pin_dir).expect("load nodeport datapath"));
    }

    fn attach(&mut self) {
        let node1 = self.c.node1.path();
        self.dp().attach_in_netns(&node1, "eth0", NODE1).expect("attach");
    }

    fn dp(&mut self) -> &mut NodePortDatapath {
        self.dp.as_mut().expect("loaded")
    }

    fn set(&mut self, fe: Frontend, backends: &[NpBackend], policy: TrafficPolicy) {
        self.dp().upsert_frontend(fe, backends.to_vec(), policy).expect("upsert_frontend");
    }

    fn tcp(&self, to: SocketAddrV4) -> io::Result<Hello> {
        tcp_hello(&self.c.client, to, TIMEOUT)
    }

    fn udp(&self, to: SocketAddrV4, no_check: bool) -> io::Result<UdpHello> {
        udp_hello(&self.c.client, to, no_check, TIMEOUT)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            if let Err(e) = dp.detach_and_unpin() {
                eprintln!("detach_and_unpin: {e}");
            }
        }
        let _ = NodePortDatapath::purge(&self.pin_dir);
    }
}

struct Hello {
    id: String,
    /// The client address as the backend saw it.
    seen: SocketAddrV4,
    stream: TcpStream,
}

impl Hello {
    /// One line out and back over the established connection.
    fn echo(&mut self, text: &str) -> io::Result<()> {
        self.stream.set_read_timeout(Some(TIMEOUT))?;
        self.stream.write_all(format!("{text}\n").as_bytes())?;
        let mut r = BufReader::new(self.stream.try_clone()?);
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        if line.trim_end() != text {
            return Err(io::Error::other(format!("echo {text:?} came back as {line:?}")));
        }
        Ok(())
    }
}

fn parse_greeting(s: &str) -> io::Result<(String, SocketAddrV4)> {
    let f: BTreeMap<&str, &str> = s.split_whitespace().filter_map(|kv| kv.split_once('=')).collect();
    let id = f.get("id").ok_or_else(|| io::Error::other(format!("greeting {s:?}")))?;
    let seen = f.get("peer").and_then(|p| p.parse().ok()).ok_or_else(|| io::Error::other(format!("greeting {s:?}")))?;
    Ok((id.to_string(), seen))
}

fn tcp_hello(client: &Netns, to: SocketAddrV4, timeout: Duration) -> io::Result<Hello> {
    in_ns(client, || {
        let s = TcpStream::connect_timeout(&SocketAddr::V4(to), timeout)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        // One byte at a time so nothing after the greeting is swallowed by a buffer.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            if io::Read::read(&mut &s, &mut b)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"));
            }
            line.push(b[0]);
        }
        let (id, seen) = parse_greeting(&String::from_utf8_lossy(&line))?;
        Ok(Hello { id, seen, stream: s })
    })
}

struct UdpHello {
    id: String,
    seen: SocketAddrV4,
    /// Where the reply came from, as the client's recvfrom() reports it.
    from: SocketAddr,
}

fn udp_hello(client: &Netns, to: SocketAddrV4, no_check: bool, timeout: Duration) -> io::Result<UdpHello> {
    in_ns(client, || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        if no_check {
            set_no_check(&s);
        }
        s.set_read_timeout(Some(timeout))?;
        s.send_to(b"ping", to)?;
        let mut buf = [0u8; 1500];
        let (n, from) = s.recv_from(&mut buf)?;
        let (id, seen) = parse_greeting(&String::from_utf8_lossy(&buf[..n]))?;
        Ok(UdpHello { id, seen, from })
    })
}

fn fe(ip: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend { ip, port, protocol }
}

fn be(ip: Ipv4Addr, port: u16, local: bool) -> NpBackend {
    NpBackend { ip, port, local }
}

fn np_tcp() -> Frontend {
    fe(NODE1, NODE_PORT_TCP, Protocol::Tcp)
}

fn np_udp() -> Frontend {
    fe(NODE1, NODE_PORT_UDP, Protocol::Udp)
}

fn addr(f: Frontend) -> SocketAddrV4 {
    SocketAddrV4::new(f.ip, f.port)
}

/// Polls `cond` (a state the kernel reaches asynchronously) for up to 5 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn is_snat_port(p: u16) -> bool {
    kubeshift_datapath::nodeport::DEFAULT_SNAT_PORTS.contains(&p)
}

#[test]
fn nodeport_to_a_local_backend_keeps_the_client_ip() {
    let mut ctx = Ctx::new();
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
    ctx.set(np_udp(), &[be(P1A, UDP_PORT, true)], TrafficPolicy::Cluster);
    // Something of the node's own on the same address: must be left alone.
    let node_own = start_server(&ctx.c.node1, SocketAddrV4::new(NODE1, 9000), Protocol::Tcp, "node1", false);

    let mut h = ctx.tcp(addr(np_tcp())).expect("tcp via nodePort");
    assert_eq!(h.id, "p1a");
    assert_eq!(*h.seen.ip(), CLIENT, "the pod must see the real client IP");
    // The handshake itself proves the reverse NAT (a SYN-ACK from the pod IP would be
    // reset by the client); data both ways proves it for every later packet.
    h.echo("hello").expect("echo over the nodePort connection");
    assert_eq!(h.stream.peer_addr().unwrap(), SocketAddr::V4(addr(np_tcp())));

    for no_check in [false, true] {
        let u = ctx.udp(addr(np_udp()), no_check).expect("udp via nodePort");
        assert_eq!(u.id, "p1a");
        assert_eq!(*u.seen.ip(), CLIENT);
        assert_eq!(
            u.from,
            SocketAddr::V4(addr(np_udp())),
            "reply must come from nodeIP:nodePort (no_check={no_check})"
        );
    }

    let own = ctx.tcp(SocketAddrV4::new(NODE1, 9000)).expect("node's own server");
    assert_eq!(own.id, "node1");
    assert_eq!(*own.seen.ip(), CLIENT);
    drop(node_own);

    let flows = ctx.dp().read_flows();
    let tcp_flow = flows
        .iter()
        .find(|f| f.protocol == Some(Protocol::Tcp) && f.frontend == addr(np_tcp()))
        .unwrap_or_else(|| panic!("no TCP flow event: {flows:?}"));
    assert_eq!(tcp_flow.verdict, NpVerdict::Forwarded);
    assert_eq!(tcp_flow.reason, NpReason::NewConnection);
    assert_eq!(tcp_flow.client, h.seen);
    assert_eq!(tcp_flow.backend, Some(SocketAddrV4::new(P1A, TCP_PORT)));
    assert!(tcp_flow.backend_local);
    assert_eq!(tcp_flow.snat, None);
    assert_eq!(
        flows.iter().filter(|f| f.protocol == Some(Protocol::Udp)).count(),
        2,
        "one event per new UDP flow: {flows:?}"
    );
    assert_eq!(flows.len(), 3, "no events for the node's own traffic or established packets: {flows:?}");
}

#[test]
fn nodeport_to_a_backend_on_another_node_is_snated_and_answered_through_node1() {
    let mut ctx = Ctx::new();
    ctx.set(np_tcp(), &[be(P2, TCP_PORT, false)], TrafficPolicy::Cluster);
    ctx.set(np_udp(), &[be(P2, UDP_PORT, false)], TrafficPolicy::Cluster);

    let mut h = ctx.tcp(addr(np_tcp())).expect("tcp via nodePort to node-2");
    assert_eq!(h.id, "p2");
    assert_eq!(*h.seen.ip(), NODE1, "the remote pod sees node-1's IP");
    assert!(is_snat_port(h.seen.port()), "SNAT port {}", h.seen.port());
    for i in 0..5 {
        h.echo(&format!("line {i}")).expect("echo through node-1");
    }
    for no_check in [false, true] {
        let u = ctx.udp(addr(np_udp()), no_check).expect("udp via nodePort to node-2");
        assert_eq!(u.id, "p2");
        assert_eq!(*u.seen.ip(), NODE1);
        assert_eq!(u.from, SocketAddr::V4(addr(np_udp())), "no_check={no_check}");
    }

    let conns = ctx.dp().connections().unwrap();
    let c = conns.iter().find(|c| c.protocol == Some(Protocol::Tcp)).expect("tcp connection tracked");
    assert_eq!((c.closing, c.reverse_closing), (false, Some(false)));
    assert_eq!(c.snat, Some(h.seen), "CT entry names the SNAT address the pod saw");
    assert_eq!(c.backend, SocketAddrV4::new(P2, TCP_PORT));
    assert_eq!(*c.client.ip(), CLIENT);

    let flows = ctx.dp().read_flows();
    let f = flows.iter().find(|f| f.protocol == Some(Protocol::Tcp)).unwrap_or_else(|| panic!("{flows:?}"));
    assert_eq!(f.snat, Some(h.seen));
    assert!(!f.backend_local);
    assert_eq!(*f.client.ip(), CLIENT);

    // A client that aborts with RST: the backend sends nothing back, yet the entry that
    // holds the SNAT port must be marked closing too, or the port stays taken for the
    // full TCP lifetime.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let r = unsafe {
        libc::setsockopt(
            h.stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    let seen = h.seen;
    drop(h);
    wait_for("both conntrack entries closing after the RST", || {
        ctx.dp
            .as_ref()
            .unwrap()
            .connections()
            .unwrap()
            .iter()
            .any(|c| c.snat == Some(seen) && c.closing && c.reverse_closing == Some(true))
    });
}

#[test]
fn external_ips_are_translated_like_node_ports() {
    let mut ctx = Ctx::new();
    let ext_tcp = fe(EXTERNAL_IP, 80, Protocol::Tcp);
    let ext_udp = fe(EXTERNAL_IP, 53, Protocol::Udp);
    ctx.set(ext_tcp, &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
    ctx.set(ext_udp, &[be(P2, UDP_PORT, false)], TrafficPolicy::Cluster);
    let mut h = ctx.tcp(addr(ext_tcp)).expect("tcp to external IP");
    assert_eq!(h.id, "p1a");
    assert_eq!(*h.seen.ip(), CLIENT);
    h.echo("ext").unwrap();
    let u = ctx.udp(addr(ext_udp), false).expect("udp to external IP");
    assert_eq!(u.id, "p2");
    assert_eq!(*u.seen.ip(), NODE1, "remote backend: SNAT to the node IP, not the external IP");
    assert_eq!(u.from, SocketAddr::V4(addr(ext_udp)));
    // The same port on the node IP is not a frontend.
    let not_fe = ctx.tcp(SocketAddrV4::new(NODE1, 80));
    assert!(not_fe.is_err(), "node IP:80 is no frontend and nothing listens there");
}

#[test]
fn external_traffic_policy_local_uses_only_local_backends_and_drops_without_one() {
    let mut ctx = Ctx::new();
    // Local: the remote endpoint is never picked, the client IP is kept.
    ctx.set(
        np_tcp(),
        &[be(P2, TCP_PORT, false), be(P1A, TCP_PORT, true), be(P1B, TCP_PORT, true)],
        TrafficPolicy::Local,
    );
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        let h = ctx.tcp(addr(np_tcp())).expect("local policy, local backends");
        assert_eq!(*h.seen.ip(), CLIENT);
        *seen.entry(h.id).or_insert(0) += 1;
    }
    assert!(!seen.contains_key("p2"), "remote backend picked under Local: {seen:?}");
    assert_eq!(seen.len(), 2, "both local backends used: {seen:?}");
    let (_, programmed, policy) = ctx.dp().frontends().into_iter().next().unwrap();
    assert_eq!(policy, TrafficPolicy::Local);
    assert_eq!(programmed.len(), 3, "the remote endpoint is remembered, just not used");

    // Local with only a remote endpoint: dropped, like kube-proxy's KUBE-XLB drop.
    ctx.set(np_udp(), &[be(P2, UDP_PORT, false)], TrafficPolicy::Local);
    let e = udp_hello(&ctx.c.client, addr(np_udp()), false, DROP_TIMEOUT).err().expect("must be dropped");
    assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "silence, not a rejection: {e}");
    // A frontend with no endpoints at all is rejected like kube-proxy's REJECT rule:
    // ICMP port unreachable, so TCP connect() and a connected UDP socket fail at once.
    let empty = fe(NODE1, 30099, Protocol::Tcp);
    let empty_udp = fe(NODE1, 30099, Protocol::Udp);
    ctx.set(empty, &[], TrafficPolicy::Cluster);
    ctx.set(empty_udp, &[], TrafficPolicy::Cluster);
    let e = tcp_hello(&ctx.c.client, addr(empty), TIMEOUT).err().expect("refused");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    let e = in_ns(&ctx.c.client, || -> io::Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.connect(addr(empty_udp))?;
        s.send(b"ping")?;
        s.recv(&mut [0u8; 64])?;
        Ok(())
    })
    .expect_err("refused");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    let flows = ctx.dp().read_flows();
    assert!(
        flows.iter().any(|f| f.verdict == NpVerdict::Dropped
            && f.reason == NpReason::NoLocalBackends
            && f.frontend == addr(np_udp())
            && *f.client.ip() == CLIENT),
        "{flows:?}"
    );
    let rejected: Vec<_> = flows
        .iter()
        .filter(|f| f.verdict == NpVerdict::Rejected && f.reason == NpReason::NoBackends)
        .map(|f| (f.frontend, f.protocol))
        .collect();
    assert_eq!(rejected, [(addr(empty), Some(Protocol::Tcp)), (addr(empty_udp), Some(Protocol::Udp))], "{flows:?}");
    // Switching the UDP frontend to Cluster makes the remote endpoint usable again.
    ctx.set(np_udp(), &[be(P2, UDP_PORT, false)], TrafficPolicy::Cluster);
    let u = ctx.udp(addr(np_udp()), false).expect("cluster policy reaches node-2");
    assert_eq!(u.id, "p2");
}

fn spread(ctx: &Ctx, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let h = ctx.tcp(addr(np_tcp())).expect("connect");
        *seen.entry(h.id).or_insert(0) += 1;
    }
    seen
}

#[test]
fn endpoint_changes_apply_to_new_connections_and_established_ones_to_kept_backends_go_on() {
    let mut ctx = Ctx::new();
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
    let mut kept = ctx.tcp(addr(np_tcp())).unwrap();
    assert_eq!(kept.id, "p1a");

    // Add: both are used, the established connection is untouched.
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true), be(P2, TCP_PORT, false)], TrafficPolicy::Cluster);
    let s = spread(&ctx, 30);
    assert_eq!(s.len(), 2, "{s:?}");
    kept.echo("after add").unwrap();
    let mut to_p2 = loop {
        let h = ctx.tcp(addr(np_tcp())).unwrap();
        if h.id == "p2" {
            break h;
        }
    };

    // Remove p2: new connections only reach p1a; the p1a connection goes on.
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
    assert_eq!(spread(&ctx, 15).keys().collect::<Vec<_>>(), ["p1a"]);
    kept.echo("after remove").unwrap();
    // The connection to the removed backend picks a new one on its next packet, which
    // knows nothing of it and resets it (kube-proxy flushes such conntrack entries).
    assert!(to_p2.echo("to a removed backend").is_err());

    // Replace p1a by p1b: new connections go to p1b; the p1a connection is cut off.
    ctx.set(np_tcp(), &[be(P1B, TCP_PORT, true)], TrafficPolicy::Cluster);
    assert_eq!(spread(&ctx, 15).keys().collect::<Vec<_>>(), ["p1b"]);
    assert!(kept.echo("after replace").is_err());
    let flows = ctx.dp().read_flows();
    assert!(flows.iter().any(|f| f.reason == NpReason::BackendGone), "re-picks are reported: {flows:?}");
    // Only this frontend was touched.
    assert_eq!(ctx.dp().frontends().len(), 1);
}

#[test]
fn many_connections_spread_over_two_backends() {
    let mut ctx = Ctx::new();
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true), be(P2, TCP_PORT, false)], TrafficPolicy::Cluster);
    let n = 120;
    let s = spread(&ctx, n);
    // Binomial(120, 0.5): fewer than 30 on either side has probability < 1e-7.
    assert!(s.values().all(|&k| k >= 30) && s.len() == 2, "{s:?}");
    let conns = ctx.dp().connections().unwrap();
    let snat: Vec<_> = conns.iter().filter_map(|c| c.snat).collect();
    assert_eq!(conns.len(), n, "one CT connection per client connection");
    assert_eq!(snat.len(), s["p2"]);
    let distinct: std::collections::HashSet<_> = snat.iter().collect();
    assert_eq!(distinct.len(), snat.len(), "every SNATed connection has its own port");
    // The client's last FIN may still be on its way through the veths.
    wait_for("every connection seen closing", || {
        ctx.dp.as_ref().unwrap().connections().unwrap().iter().all(|c| c.closing)
    });
    let (fwd, rev_local, rev_snat) = ctx.dp().conntrack_counts().unwrap();
    assert_eq!((fwd, rev_local, rev_snat), (n, s["p1a"], s["p2"]));
}

#[test]
fn reload_from_pins_keeps_established_connections_and_serves_new_ones() {
    let mut ctx = Ctx::new();
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
    let remote = fe(NODE1, 30081, Protocol::Tcp);
    ctx.set(remote, &[be(P2, TCP_PORT, false)], TrafficPolicy::Cluster);
    ctx.set(np_udp(), &[be(P1A, UDP_PORT, true)], TrafficPolicy::Local);
    let before = ctx.dp().frontends();
    let local_conn = ctx.tcp(addr(np_tcp())).unwrap();
    let remote_conn = ctx.tcp(addr(remote)).unwrap();
    assert_eq!((local_conn.id.as_str(), remote_conn.id.as_str()), ("p1a", "p2"));

    // Both connections talk continuously while the loader goes away and comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicUsize::new(0));
    let talkers: Vec<_> = [local_conn, remote_conn]
        .into_iter()
        .map(|mut h| {
            let (stop, echoes) = (stop.clone(), echoes.clone());
            std::thread::spawn(move || -> io::Result<usize> {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    h.echo(&format!("msg {n}"))?;
                    n += 1;
                    echoes.fetch_add(1, Ordering::SeqCst);
                }
                Ok(n)
            })
        })
        .collect();

    for round in 0..3 {
        let at = echoes.load(Ordering::SeqCst);
        drop(ctx.dp.take());
        // No loader at all: new connections still work from the pinned state.
        let h = ctx.tcp(addr(remote)).expect("new connection with no loader");
        assert_eq!(h.id, "p2");
        ctx.load();
        assert!(ctx.dp().reopened(), "round {round}");
        assert_eq!(ctx.dp().upgraded_programs(), 0, "same build: nothing swapped");
        assert_eq!(ctx.dp().frontends(), before, "frontends rebuilt from the pins");
        // The agent's usual start-up: attach again, which must be a no-op.
        ctx.attach();
        // Wait for traffic to have moved on during this round (bounded by the
        // talkers' own 3 s timeouts, which fail the test).
        wait_for("20 more echoes", || {
            assert!(!talkers.iter().all(|t| t.is_finished()), "talkers died");
            echoes.load(Ordering::SeqCst) >= at + 20
        });
    }
    stop.store(true, Ordering::SeqCst);
    for t in talkers {
        let n = t.join().unwrap().expect("an established connection broke across a reload");
        assert!(n > 0);
    }
    // The reloaded handle programs as usual.
    ctx.set(np_tcp(), &[be(P1B, TCP_PORT, true)], TrafficPolicy::Cluster);
    assert_eq!(ctx.tcp(addr(np_tcp())).unwrap().id, "p1b");
    let u = ctx.udp(addr(np_udp()), false).unwrap();
    assert_eq!(u.from, SocketAddr::V4(addr(np_udp())));
}

fn tcx_programs(ctx: &Ctx) -> (usize, usize) {
    use aya::programs::{SchedClassifier, TcAttachType};
    in_ns(&ctx.c.node1, || {
        let i = SchedClassifier::query_tcx("eth0", TcAttachType::Ingress).unwrap().1.len();
        let e = SchedClassifier::query_tcx("eth0", TcAttachType::Egress).unwrap().1.len();
        (i, e)
    })
}

#[test]
fn detach_leaves_no_pins_and_no_programs() {
    let mut ctx = Ctx::new();
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
    assert_eq!(ctx.tcp(addr(np_tcp())).unwrap().id, "p1a");
    assert_eq!(tcx_programs(&ctx), (1, 1));
    assert!(ctx.pin_dir.join("nodeport/links/ks_np_ingress").exists());
    ctx.dp.take().unwrap().detach_and_unpin().unwrap();
    assert!(!ctx.pin_dir.exists(), "{} left behind", ctx.pin_dir.display());
    assert_eq!(tcx_programs(&ctx), (0, 0));
    // Untranslated now: nothing listens on node-1's nodePort, the node resets.
    let e = ctx.tcp(addr(np_tcp())).err().expect("no longer translated");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
}

#[test]
fn bad_input_is_refused_with_the_culprit_named() {
    let mut ctx = Ctx::new();
    let node1 = ctx.c.node1.path();
    let e = ctx.dp().attach_in_netns(&node1, "nosuch0", NODE1).unwrap_err();
    assert!(e.to_string().contains("nosuch0"), "{e}");
    let e = ctx.dp().attach_in_netns(&node1, "pod0", NODE1).unwrap_err();
    assert!(e.to_string().contains("pod0") && e.to_string().contains("detach first"), "{e}");
    let e = ctx.dp().upsert_frontend(fe(NODE1, 0, Protocol::Tcp), vec![], TrafficPolicy::Cluster).unwrap_err();
    assert!(e.to_string().contains("192.168.77.1:0"), "{e}");
    let e = ctx
        .dp()
        .upsert_frontend(np_tcp(), vec![be(Ipv4Addr::UNSPECIFIED, 80, true)], TrafficPolicy::Cluster)
        .unwrap_err();
    assert!(e.to_string().contains("0.0.0.0:80"), "{e}");
    assert!(ctx.dp().frontends().is_empty(), "nothing written on bad input");
    let e = NodePortDatapath::load(Path::new("/tmp/not-bpffs-kubeshift")).err().unwrap();
    assert!(e.to_string().contains("/tmp/not-bpffs-kubeshift"), "{e}");
    let _ = fs::remove_dir("/tmp/not-bpffs-kubeshift");
}

/// Not a pass/fail test: prints the programs' own per-packet cost (kernel BPF stats) for
/// new connections and for established traffic, local and SNATed. Run with
/// `cargo test -p kubeshift-datapath --test nodeport -- --ignored --nocapture`.
#[test]
#[ignore = "measurement: prints per-packet program cost, asserts nothing about it"]
fn measure_per_packet_cost() {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF stats");
    let mut ctx = Ctx::new();
    let remote = fe(NODE1, 30081, Protocol::Tcp);
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
    ctx.set(remote, &[be(P2, TCP_PORT, false)], TrafficPolicy::Cluster);
    let snapshot = |ctx: &Ctx| -> Vec<(u64, Duration)> {
        ctx.dp.as_ref().unwrap().program_stats().unwrap().iter().map(|s| (s.run_count, s.run_time)).collect()
    };
    let report = |what: &str, a: &[(u64, Duration)], b: &[(u64, Duration)]| {
        for (i, name) in ["ingress", "egress"].iter().enumerate() {
            let n = b[i].0 - a[i].0;
            let t = b[i].1 - a[i].1;
            println!("{what:<28} {name:<8} {n:>7} runs  {:>6.0} ns/run", t.as_nanos() as f64 / n.max(1) as f64);
        }
    };
    for (label, f) in [("local", np_tcp()), ("remote (SNAT)", remote)] {
        let a = snapshot(&ctx);
        for _ in 0..200 {
            ctx.tcp(addr(f)).unwrap();
        }
        let b = snapshot(&ctx);
        report(&format!("{label}: 200 new conns"), &a, &b);
        let mut h = ctx.tcp(addr(f)).unwrap();
        let a = snapshot(&ctx);
        for i in 0..2000 {
            h.echo(&format!("{i}")).unwrap();
        }
        let b = snapshot(&ctx);
        report(&format!("{label}: 2000 echoes"), &a, &b);
    }
}

/// A second datapath (node-2's), unpinned on drop like `Ctx`'s.
struct SecondNode {
    dp: Option<NodePortDatapath>,
    pin_dir: PathBuf,
}

impl Drop for SecondNode {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            let _ = dp.detach_and_unpin();
        }
        let _ = NodePortDatapath::purge(&self.pin_dir);
    }
}

#[test]
fn both_nodes_serve_the_node_port_each_with_its_own_pins() {
    let mut ctx = Ctx::new();
    let mut n2 =
        SecondNode { dp: None, pin_dir: Path::new(DEFAULT_BPFFS_ROOT).join(format!("nptest-{}-node2", ctx.c.tag)) };
    let dp2 = n2.dp.insert(NodePortDatapath::load(&n2.pin_dir).expect("load node-2"));
    dp2.attach_in_netns(&ctx.c.node2.path(), "eth0", NODE2).expect("attach node-2");
    // The same Service as each node sees it: p1a is local on node-1, p2 on node-2.
    let backends = |on_node1: bool| vec![be(P1A, TCP_PORT, on_node1), be(P2, TCP_PORT, !on_node1)];
    ctx.set(np_tcp(), &backends(true), TrafficPolicy::Cluster);
    let fe2 = fe(NODE2, NODE_PORT_TCP, Protocol::Tcp);
    dp2.upsert_frontend(fe2, backends(false), TrafficPolicy::Cluster).unwrap();
    for (node_ip, fe) in [(NODE1, np_tcp()), (NODE2, fe2)] {
        let mut ids = BTreeMap::new();
        for _ in 0..30 {
            let mut h = ctx.tcp(addr(fe)).expect("connect");
            // Local backend: the client's IP; the other node's: this node's IP.
            let local = (h.id == "p1a") == (node_ip == NODE1);
            let want = if local { CLIENT } else { node_ip };
            assert_eq!(*h.seen.ip(), want, "{} via {node_ip}", h.id);
            h.echo("x").unwrap();
            *ids.entry(h.id).or_insert(0) += 1;
        }
        assert_eq!(ids.len(), 2, "via {node_ip}: {ids:?}");
    }
    // Each node's conntrack holds only its own connections.
    let c1 = ctx.dp().connections().unwrap();
    let c2 = n2.dp.as_ref().unwrap().connections().unwrap();
    assert!(c1.iter().all(|c| *c.frontend.ip() == NODE1) && c1.len() == 30);
    assert!(c2.iter().all(|c| *c.frontend.ip() == NODE2) && c2.len() == 30);
}

#[test]
fn a_test_that_panics_leaves_nothing_behind() {
    let names = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut ctx = Ctx::new();
        ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
        let mut h = ctx.tcp(addr(np_tcp())).unwrap();
        h.echo("before the panic").unwrap();
        *names.lock().unwrap() = Some((ctx.pin_dir.clone(), ctx.c.tag.clone()));
        panic!("on purpose");
    }));
    assert!(r.is_err());
    let (pin_dir, tag) = names.lock().unwrap().take().unwrap();
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
    let out = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(!list.contains(&format!("ksnp-{tag}-")), "{list}");
}

#[cfg(ks_upgrade_variant)]
fn tcx_program_ids(ctx: &Ctx) -> Vec<u32> {
    use aya::programs::{SchedClassifier, TcAttachType};
    in_ns(&ctx.c.node1, || {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .flat_map(|t| SchedClassifier::query_tcx("eth0", t).unwrap().1)
            .map(|p| p.id())
            .collect()
    })
}

#[cfg(ks_upgrade_variant)]
#[test]
fn a_new_build_is_swapped_in_place_and_connections_survive_upgrade_and_rollback() {
    let mut ctx = Ctx::new();
    let remote = fe(NODE1, 30081, Protocol::Tcp);
    ctx.set(np_tcp(), &[be(P1A, TCP_PORT, true)], TrafficPolicy::Cluster);
    ctx.set(remote, &[be(P2, TCP_PORT, false)], TrafficPolicy::Cluster);
    let mut conns = [ctx.tcp(addr(np_tcp())).unwrap(), ctx.tcp(addr(remote)).unwrap()];
    let builds = |ctx: &mut Ctx| -> Vec<u8> { ctx.dp().read_flows().iter().map(|f| f.program_build).collect() };
    assert_eq!(builds(&mut ctx), [1, 1]);
    let ids1 = tcx_program_ids(&ctx);
    assert_eq!(ids1.len(), 2);

    for (obj, build) in [(kubeshift_datapath::NODEPORT_OBJ_BUILD2, 2u8), (kubeshift_datapath::NODEPORT_OBJ, 1u8)] {
        drop(ctx.dp.take());
        let dp = NodePortDatapath::load_object(&ctx.pin_dir, obj).expect("load other build");
        ctx.dp = Some(dp);
        assert!(ctx.dp().reopened());
        // Only the ingress program emits events, so only its code differs between
        // the builds; the egress program's tag is equal and it is left in place.
        assert_eq!(ctx.dp().upgraded_programs(), 1, "build {build}");
        let ids = tcx_program_ids(&ctx);
        assert_eq!(ids.len(), 2, "still exactly one program per direction");
        assert_eq!(ids[1], ids1[1], "egress untouched");
        assert_ne!(ids[0], ids1[0], "ingress replaced");
        for (i, c) in conns.iter_mut().enumerate() {
            c.echo(&format!("after swap to build {build}"))
                .unwrap_or_else(|e| panic!("connection {i} across the swap: {e}"));
        }
        ctx.tcp(addr(remote)).unwrap();
        assert_eq!(builds(&mut ctx), [build], "new connections served by build {build}");
    }
}
