//! The upstream Kubernetes netpol e2e model as network namespaces: namespaces x, y, z ×
//! pods a, b, c, each pod a netns serving TCP and UDP on ports 80 and 81, spread over two
//! node namespaces joined by a veth. Plus a prober that runs every (source, destination,
//! protocol, port) probe of a case concurrently and returns the observed matrix.
//!
//! Wiring is Calico-like rather than a bridge, because that is what the policy programs
//! are made for: one host-side veth per pod, so a program on that interface sees exactly
//! one pod's traffic, and same-node pod-to-pod traffic is routed through the node (and so
//! crosses both pods' programs) instead of being switched past them. Each pod has its
//! IP as /32 on `eth0` and a default route via the link-local gateway 169.254.1.1; the
//! node has a /32 route per pod on its veth. Calico answers the pod's ARP for the gateway
//! with proxy ARP; here the pod gets a permanent neighbour entry for the gateway with the
//! host-side veth's fixed MAC instead, so no probe waits on ARP resolution (the node still
//! resolves pods by ARP, which the programs must let through).
//!
//! Node i (1, 2) is `10.250.0.i/24` on the inter-node veth and routes
//! `10.244.j.0/24` (the other node's pods) via the other node. Pod k of the 9 lives on
//! node `k % 2 + 1` with address `10.244.<node>.<10 + k>`.

use std::{
    fs,
    io::{self, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{setns, CloneFlags};

use super::{run, unique_tag, Netns};
use crate::Protocol;

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
pub const PORTS: [u16; 2] = [80, 81];
pub const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];
pub const NODES: [&str; 2] = ["node-1", "node-2"];
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";

pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Index into [`NetpolLab::nodes`].
    pub node: usize,
    /// The host-side veth, in the node's netns.
    pub host_if: String,
    pub netns: Netns,
}

impl LabPod {
    /// `ns/name`, as the servers greet.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

pub struct LabNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: Netns,
}

struct PodServer {
    stop: Arc<AtomicBool>,
    fds: Vec<i32>,
    thread: Option<JoinHandle<()>>,
}

/// Field order is drop order: servers stop, then pod namespaces go, then the nodes.
pub struct NetpolLab {
    pub tag: String,
    servers: Vec<PodServer>,
    pub pods: Vec<LabPod>,
    pub nodes: Vec<LabNode>,
}

/// One probe: pod index → pod index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    pub from: usize,
    pub to: usize,
    pub protocol: Protocol,
    pub port: u16,
}

impl NetpolLab {
    pub fn new() -> io::Result<Self> {
        let tag = unique_tag();
        let mut lab = Self { tag: tag.clone(), servers: Vec::new(), pods: Vec::new(), nodes: Vec::new() };
        for (i, name) in NODES.iter().enumerate() {
            let netns = Netns::create(&format!("kspd-{tag}-n{}", i + 1))?;
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            lab.nodes.push(LabNode { name: name.to_string(), ip: Ipv4Addr::new(10, 250, 0, i as u8 + 1), netns });
        }
        run(
            "ip",
            &[
                "link",
                "add",
                "ksn0",
                "netns",
                &lab.nodes[0].netns.name,
                "type",
                "veth",
                "peer",
                "name",
                "ksn0",
                "netns",
                &lab.nodes[1].netns.name,
            ],
        )?;
        for (i, n) in lab.nodes.iter().enumerate() {
            n.netns.ip(&["addr", "add", &format!("{}/24", n.ip), "dev", "ksn0"])?;
            n.netns.ip(&["link", "set", "ksn0", "up"])?;
            let other = &lab.nodes[1 - i];
            n.netns.ip(&["route", "add", &format!("10.244.{}.0/24", 2 - i), "via", &other.ip.to_string()])?;
        }
        let mut k = 0u8;
        for ns in NAMESPACES {
            for pod in POD_NAMES {
                let node = usize::from(k % 2);
                let ip = Ipv4Addr::new(10, 244, node as u8 + 1, 10 + k);
                let netns = Netns::create(&format!("kspd-{tag}-{ns}-{pod}"))?;
                let host_if = format!("ksp-{ns}-{pod}");
                let node_ns = &lab.nodes[node].netns;
                run(
                    "ip",
                    &[
                        "link",
                        "add",
                        &host_if,
                        "netns",
                        &node_ns.name,
                        "address",
                        GATEWAY_MAC,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "eth0",
                        "netns",
                        &netns.name,
                    ],
                )?;
                netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
                netns.ip(&["link", "set", "eth0", "up"])?;
                netns.ip(&["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
                netns.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
                netns.ip(&["neigh", "add", "169.254.1.1", "lladdr", GATEWAY_MAC, "dev", "eth0", "nud", "permanent"])?;
                node_ns.ip(&["link", "set", &host_if, "up"])?;
                node_ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if, "scope", "link"])?;
                lab.pods.push(LabPod { namespace: ns.to_string(), name: pod.to_string(), ip, node, host_if, netns });
                k += 1;
            }
        }
        for i in 0..lab.pods.len() {
            let s = serve(&lab.pods[i])?;
            lab.servers.push(s);
        }
        Ok(lab)
    }

    pub fn pod_index(&self, id: &str) -> usize {
        self.pods.iter().position(|p| p.id() == id).unwrap_or_else(|| panic!("no pod {id} in the lab"))
    }

    /// Every probe of the model: 9 × 9 × 2 protocols × 2 ports = 324.
    pub fn all_cells(&self) -> Vec<Cell> {
        let mut v = Vec::new();
        for from in 0..self.pods.len() {
            for to in 0..self.pods.len() {
                for protocol in PROTOCOLS {
                    for port in PORTS {
                        v.push(Cell { from, to, protocol, port });
                    }
                }
            }
        }
        v
    }

    /// Runs `cells` concurrently (one thread per source pod, all of its probes in flight
    /// at once) and says for each whether the destination answered: TCP = connected and
    /// read the server's greeting (so data flowed both ways), UDP = the request got the
    /// destination's reply. A probe that gets no answer within `timeout` is blocked.
    pub fn probe(&self, cells: &[Cell], timeout: Duration) -> io::Result<Vec<bool>> {
        let mut results = vec![false; cells.len()];
        std::thread::scope(|s| -> io::Result<()> {
            let mut handles = Vec::new();
            for (from, pod) in self.pods.iter().enumerate() {
                let mine: Vec<(usize, Cell)> =
                    cells.iter().copied().enumerate().filter(|(_, c)| c.from == from).collect();
                if mine.is_empty() {
                    continue;
                }
                let targets: Vec<(SocketAddrV4, String)> = mine
                    .iter()
                    .map(|(_, c)| {
                        let p = &self.pods[c.to];
                        (SocketAddrV4::new(p.ip, c.port), p.id())
                    })
                    .collect();
                let protos: Vec<Protocol> = mine.iter().map(|(_, c)| c.protocol).collect();
                let ns = pod.netns.path();
                handles.push((mine, s.spawn(move || probe_from(ns, &targets, &protos, timeout))));
            }
            for (mine, h) in handles {
                let r = h.join().map_err(|_| io::Error::other("probe thread panicked"))??;
                for ((i, _), ok) in mine.iter().zip(r) {
                    results[*i] = ok;
                }
            }
            Ok(())
        })?;
        Ok(results)
    }
}

impl Drop for NetpolLab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.stop.store(true, Ordering::SeqCst);
            for fd in &s.fds {
                // Wakes the server's poll().
                unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            }
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn enter(ns: &PathBuf) -> io::Result<()> {
    let f = fs::File::open(ns)?;
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// TCP and UDP servers on ports 80 and 81 in one thread that lives in the pod's netns.
/// TCP greets with `ns/pod\n` and closes; UDP answers each datagram with `ns/pod`.
fn serve(pod: &LabPod) -> io::Result<PodServer> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = pod.netns.path();
    let id = pod.id();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let bound = (|| -> io::Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
            enter(&ns)?;
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            for port in PORTS {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                l.set_nonblocking(true)?;
                tcp.push(l);
                let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                u.set_nonblocking(true)?;
                udp.push(u);
            }
            Ok((tcp, udp))
        })();
        let (tcp, udp) = match bound {
            Ok(b) => {
                let fds: Vec<i32> =
                    b.0.iter().map(|l| l.as_raw_fd()).chain(b.1.iter().map(|u| u.as_raw_fd())).collect();
                let _ = tx.send(Ok(fds));
                b
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let greeting = format!("{id}\n");
        let mut buf = [0u8; 1500];
        while !stop2.load(Ordering::SeqCst) {
            let mut fds: Vec<libc::pollfd> = tcp
                .iter()
                .map(|l| l.as_raw_fd())
                .chain(udp.iter().map(|u| u.as_raw_fd()))
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                .collect();
            // The timeout is only a safety net; shutdown() wakes poll for stop.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 500) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
            for l in &tcp {
                while let Ok((mut c, _)) = l.accept() {
                    let _ = c.write_all(greeting.as_bytes());
                }
            }
            for u in &udp {
                while let Ok((n, from)) = u.recv_from(&mut buf) {
                    if n == 0 && stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = u.send_to(id.as_bytes(), from);
                }
            }
        }
    });
    let fds = rx.recv().map_err(|_| io::Error::other("server thread died"))??;
    Ok(PodServer { stop, fds, thread: Some(thread) })
}

enum ProbeState {
    Connecting,
    Reading(Vec<u8>),
    Done(bool),
}

/// Runs in its own thread: enters the source pod's netns and runs all probes at once.
fn probe_from(
    ns: PathBuf,
    targets: &[(SocketAddrV4, String)],
    protos: &[Protocol],
    timeout: Duration,
) -> io::Result<Vec<bool>> {
    enter(&ns)?;
    let mut socks: Vec<OwnedFd> = Vec::with_capacity(targets.len());
    let mut states = Vec::with_capacity(targets.len());
    for ((addr, _), proto) in targets.iter().zip(protos) {
        let (ty, state) = match proto {
            Protocol::Tcp => (libc::SOCK_STREAM, ProbeState::Connecting),
            Protocol::Udp => (libc::SOCK_DGRAM, ProbeState::Reading(Vec::new())),
        };
        // SAFETY: plain socket syscall; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.ip().octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: sa is a valid sockaddr_in for the call's duration.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        let state = if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
            ProbeState::Done(false)
        } else if matches!(proto, Protocol::Udp) {
            // SAFETY: writing a constant buffer to our own socket.
            let n = unsafe { libc::send(fd.as_raw_fd(), b"ping".as_ptr().cast(), 4, 0) };
            if n == 4 {
                state
            } else {
                ProbeState::Done(false)
            }
        } else {
            state
        };
        socks.push(fd);
        states.push(state);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let pending: Vec<usize> = (0..states.len()).filter(|i| !matches!(states[*i], ProbeState::Done(_))).collect();
        let now = Instant::now();
        if pending.is_empty() || now >= deadline {
            break;
        }
        let mut pfds: Vec<libc::pollfd> = pending
            .iter()
            .map(|&i| libc::pollfd {
                fd: socks[i].as_raw_fd(),
                events: match states[i] {
                    ProbeState::Connecting => libc::POLLOUT,
                    _ => libc::POLLIN,
                },
                revents: 0,
            })
            .collect();
        let ms = (deadline - now).as_millis().max(1) as i32;
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (p, &i) in pfds.iter().zip(&pending) {
            if p.revents == 0 {
                continue;
            }
            let fd = socks[i].as_raw_fd();
            let expected = targets[i].1.as_bytes();
            states[i] = match std::mem::replace(&mut states[i], ProbeState::Done(false)) {
                ProbeState::Connecting => {
                    let mut err: libc::c_int = 0;
                    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    // SAFETY: err/len are valid out-pointers.
                    unsafe {
                        libc::getsockopt(
                            fd,
                            libc::SOL_SOCKET,
                            libc::SO_ERROR,
                            (&mut err as *mut libc::c_int).cast(),
                            &mut len,
                        )
                    };
                    if err == 0 {
                        ProbeState::Reading(Vec::new())
                    } else {
                        ProbeState::Done(false)
                    }
                }
                ProbeState::Reading(mut got) => {
                    let mut buf = [0u8; 256];
                    // SAFETY: reading into our own buffer.
                    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                    let blocked = n < 0 && would_block();
                    if n > 0 {
                        got.extend_from_slice(&buf[..n as usize]);
                    }
                    let text = String::from_utf8_lossy(&got);
                    let line = text.trim_end_matches('\n');
                    if line.as_bytes() == expected && (protos[i] == Protocol::Udp || text.ends_with('\n')) {
                        ProbeState::Done(true)
                    } else if n == 0 || (n < 0 && !blocked) || got.len() > 200 {
                        ProbeState::Done(false)
                    } else {
                        ProbeState::Reading(got)
                    }
                }
                done => done,
            };
        }
    }
    Ok(states.into_iter().map(|s| matches!(s, ProbeState::Done(true))).collect())
}

fn would_block() -> bool {
    io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}
