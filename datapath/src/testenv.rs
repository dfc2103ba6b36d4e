//! A throwaway two-namespace network with a client cgroup, for the datapath's tests and
//! benchmark. Not used by the agent.
//!
//! Layout: a client netns and a backend netns joined by a veth pair on 10.200.0.0/24.
//! The client is 10.200.0.1; backends are addresses on the backend side. Clients run as
//! child processes (the `kubeshift-dp-probe` binary) that join the test cgroup and the
//! client netns before exec. A child process is needed because cgroup v2 membership is
//! per process: moving a test thread would move the whole test binary, and parallel
//! tests would steal each other's threads. Servers are threads of the test process that
//! switch only their network namespace, so the process keeps the host mount namespace
//! (and with it /sys/fs/bpf and the cgroup tree).
//!
//! Every resource is owned by a guard whose Drop removes it, so a panicking test cleans
//! up too.

use std::{
    fs,
    io::{self, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::{
        fd::{AsFd, AsRawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::sched::{setns, CloneFlags};

use crate::sys;

pub mod netpol;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const SUBNET_PREFIX: u8 = 24;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<pid>-<n>`: unique across parallel tests in one binary and across binaries.
pub fn unique_tag() -> String {
    format!("{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn run(cmd: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> io::Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> …`
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Sets a per-namespace sysctl (the host's value is untouched).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        run("ip", &["netns", "exec", &self.name, "sysctl", "-qw", &format!("{key}={value}")])
    }

    /// Moves the calling thread (only) into this namespace.
    pub fn enter_thread(&self) -> io::Result<()> {
        let f = fs::File::open(self.path())?;
        setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also removes the veth ends inside it.
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("testenv: cleanup of netns {}: {e}", self.name);
        }
    }
}

/// A cgroup v2 directory, emptied and removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> io::Result<Self> {
        let path = sys::cgroup2_mount()?.join(name);
        fs::create_dir(&path)?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Probes are waited for, but a panic mid-probe could leave one behind.
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        // rmdir fails with EBUSY until the killed processes are reaped by their parent;
        // poll the kernel's own "populated" flag rather than guessing a delay.
        for _ in 0..200 {
            let populated =
                fs::read_to_string(self.path.join("cgroup.events")).map(|s| s.contains("populated 1")).unwrap_or(false);
            if !populated {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("testenv: cleanup of cgroup {}: {e}", self.path.display());
        }
    }
}

enum ServerSock {
    Tcp(Vec<Arc<TcpListener>>),
    Udp(Arc<UdpSocket>),
}

struct Server {
    sock: ServerSock,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown() wakes a thread blocked in accept()/recv() on the same socket.
        let fds: Vec<i32> = match &self.sock {
            ServerSock::Tcp(ls) => ls.iter().map(|l| l.as_raw_fd()).collect(),
            ServerSock::Udp(s) => vec![s.as_raw_fd()],
        };
        for fd in fds {
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client/backend namespace pair plus the client cgroup. Field order is drop order:
/// servers stop before the namespaces they live in disappear.
pub struct Lab {
    pub tag: String,
    servers: Vec<Server>,
    pub cgroup: Cgroup,
    pub client: Netns,
    pub backend: Netns,
}

impl Lab {
    /// `backend_ips` are added to the backend side of the veth.
    pub fn new(backend_ips: &[Ipv4Addr]) -> io::Result<Self> {
        let tag = unique_tag();
        let client = Netns::create(&format!("ksdp-{tag}-c"))?;
        let backend = Netns::create(&format!("ksdp-{tag}-b"))?;
        // Created directly inside the namespaces, so the host never sees the names.
        run(
            "ip",
            &[
                "link",
                "add",
                "ksc0",
                "netns",
                &client.name,
                "type",
                "veth",
                "peer",
                "name",
                "ksb0",
                "netns",
                &backend.name,
            ],
        )?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/{SUBNET_PREFIX}"), "dev", "ksc0"])?;
        client.ip(&["link", "set", "ksc0", "up"])?;
        for ip in backend_ips {
            backend.ip(&["addr", "add", &format!("{ip}/{SUBNET_PREFIX}"), "dev", "ksb0"])?;
        }
        backend.ip(&["link", "set", "ksb0", "up"])?;
        let cgroup = Cgroup::create(&format!("kubeshift-dptest-{tag}"))?;
        Ok(Self { tag, servers: Vec::new(), cgroup, client, backend })
    }

    /// A TCP server in the backend netns that greets every connection with `id\n` and
    /// closes it, so a client learns which backend it reached.
    pub fn tcp_server(&mut self, addr: SocketAddrV4, id: &str) -> io::Result<()> {
        self.tcp_server_multi(&[addr], id)
    }

    /// One server thread for several listening addresses. The benchmark uses it so that
    /// a service with four endpoints and a direct connect to one of them wake the same
    /// thread: four server threads competing for two cores would be measured instead of
    /// the datapath.
    pub fn tcp_server_multi(&mut self, addrs: &[SocketAddrV4], id: &str) -> io::Result<()> {
        let ns = self.backend.path();
        self.tcp_server_in(ns, addrs, id)
    }

    /// A TCP server on the client's side, for a client that is its own backend
    /// (hairpin). `addr` must be the client's address or loopback.
    pub fn client_tcp_server(&mut self, addr: SocketAddrV4, id: &str) -> io::Result<()> {
        let ns = self.client.path();
        self.tcp_server_in(ns, &[addr], id)
    }

    fn tcp_server_in(&mut self, ns: PathBuf, addrs: &[SocketAddrV4], id: &str) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = format!("{id}\n");
        let stop2 = stop.clone();
        let addrs = addrs.to_vec();
        let thread = std::thread::spawn(move || {
            let bound = (|| -> io::Result<Vec<Arc<TcpListener>>> {
                let f = fs::File::open(&ns)?;
                setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                addrs
                    .iter()
                    .map(|a| {
                        let l = TcpListener::bind(a)?;
                        l.set_nonblocking(true)?;
                        Ok(Arc::new(l))
                    })
                    .collect()
            })();
            let listeners = match bound {
                Ok(l) => {
                    let _ = tx.send(Ok(l.clone()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop2.load(Ordering::SeqCst) {
                let mut fds: Vec<libc::pollfd> = listeners
                    .iter()
                    .map(|l| libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 })
                    .collect();
                // The timeout is only a safety net for stop(); shutdown() wakes poll.
                let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 500) };
                if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
                for (l, p) in listeners.iter().zip(&fds) {
                    if p.revents == 0 {
                        continue;
                    }
                    // Accepted sockets are blocking again (no O_NONBLOCK inheritance).
                    while let Ok((mut c, _)) = l.accept() {
                        // The client may already have closed (benchmark); ignore errors.
                        let _ = c.write_all(greeting.as_bytes());
                    }
                }
            }
        });
        let listeners = rx.recv().map_err(|_| io::Error::other("server thread died"))??;
        self.servers.push(Server { sock: ServerSock::Tcp(listeners), stop, thread: Some(thread) });
        Ok(())
    }

    /// A UDP server in the backend netns answering every datagram with `id <payload>`.
    pub fn udp_server(&mut self, addr: SocketAddrV4, id: &str) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let ns = self.backend.path();
        let id = id.to_string();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let bound = (|| -> io::Result<Arc<UdpSocket>> {
                let f = fs::File::open(&ns)?;
                setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                let s = UdpSocket::bind(addr)?;
                // Safety net in case shutdown() does not wake recv on some kernel.
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                Ok(Arc::new(s))
            })();
            let sock = match bound {
                Ok(s) => {
                    let _ = tx.send(Ok(s.clone()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if n == 0 && stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut reply = format!("{id} ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        let sock = rx.recv().map_err(|_| io::Error::other("server thread died"))??;
        self.servers.push(Server { sock: ServerSock::Udp(sock), stop, thread: Some(thread) });
        Ok(())
    }

    /// Runs `probe args…` inside the client netns and the test cgroup; returns its stdout
    /// lines. The child joins both before exec, so the hooks see its very first socket.
    pub fn probe(&self, probe: &Path, args: &[&str]) -> io::Result<Vec<String>> {
        self.probe_in(&self.cgroup.path, probe, args, &[])
    }

    /// Like [`Lab::probe`] but in another cgroup (e.g. one without programs, for a
    /// baseline measured side by side).
    pub fn probe_in(
        &self,
        cgroup: &Path,
        probe: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> io::Result<Vec<String>> {
        let procs = fs::OpenOptions::new().write(true).open(cgroup.join("cgroup.procs"))?;
        let ns = fs::File::open(self.client.path())?;
        let procs_fd = procs.as_raw_fd();
        let ns_fd = ns.as_raw_fd();
        let mut cmd = Command::new(probe);
        cmd.args(args);
        cmd.envs(env.iter().copied());
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // "0" means the writing process itself.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output()?;
        drop((procs, ns));
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "probe {args:?} failed: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.stop();
        }
    }
}

/// Path of a binary built alongside the current executable (tests live in `deps/`, one
/// level below the binaries).
pub fn sibling_binary(name: &str) -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} next to {}", exe.display())))
}
