//! The kubeshift CNI plugin against real netlink, as root, entirely inside network
//! namespaces these tests create: a "node" namespace where the plugin process runs (so
//! its host-side veths and routes land there, never in the host's own namespace) and one
//! "pod" namespace per container. Names are `ks-cni-<pid>-<n>-…`; every namespace, file
//! and fake agent is owned by a guard removed on drop, a panicking test included.

use std::{
    collections::HashSet,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kubeshift_datapath::{
    cni::agent_proto::{serve_attach, AttachRequest, AttachServer},
    testenv::{unique_tag, Netns},
};
use serde_json::{json, Value};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubeshift-cni");
const DEBIAN_CNI: &str = "/usr/lib/cni";
/// An address of the node (on lo in the node netns) that pods connect to.
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

/// A temp directory removed on drop.
struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One node: its netns, IPAM dir, agent socket path and (optionally) a fake agent.
/// Field order is drop order: the agent stops before its directory goes.
struct Node {
    tag: String,
    agent: Option<AttachServer>,
    pods: Vec<Netns>,
    node: Netns,
    dir: TmpDir,
    subnet: String,
}

impl Node {
    fn new() -> Self {
        let tag = unique_tag();
        let node = Netns::create(&format!("ks-cni-{tag}-node")).unwrap();
        // On lo: the kernel here has no dummy driver, and a local address is all it takes.
        node.ip(&["addr", "add", &format!("{NODE_ADDR}/32"), "dev", "lo"]).unwrap();
        let dir = PathBuf::from(format!("/tmp/ks-cni-{tag}"));
        fs::create_dir_all(&dir).unwrap();
        Self { tag, agent: None, pods: Vec::new(), node, dir: TmpDir(dir), subnet: "10.244.7.0/24".into() }
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("agent.sock")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.0.join("ipam")
    }

    /// A fake agent that records requests (and checks the host interface already
    /// exists in the node netns when asked), after `delay`.
    fn start_agent(&mut self, delay: Duration) -> Arc<Mutex<Vec<AttachRequest>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        self.agent = Some(
            serve_attach(&self.socket(), move |req| {
                std::thread::sleep(delay);
                s.lock().unwrap().push(req);
                Ok(())
            })
            .unwrap(),
        );
        seen
    }

    fn pod(&mut self) -> PathBuf {
        let n = self.pods.len();
        let ns = Netns::create(&format!("ks-cni-{}-pod{n}", self.tag)).unwrap();
        let p = ns.path();
        self.pods.push(ns);
        p
    }

    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "kubeshift",
            "type": "kubeshift",
            "subnet": self.subnet,
            "mtu": 1400,
            "agentSocket": self.socket(),
            "dataDir": self.data_dir(),
        })
    }

    /// Runs a plugin binary as a process inside the node netns.
    fn run(&self, bin: &str, cmd: &str, id: &str, netns: Option<&Path>, conf: &Value) -> (i32, Value) {
        let f = fs::File::open(self.node.path()).unwrap();
        let fd = f.as_raw_fd();
        let mut c = Command::new(bin);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", DEBIAN_CNI)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            c.env("CNI_NETNS", ns);
        }
        // SAFETY: setns only, in the child before exec.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        drop(f);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{bin} {cmd} printed non-JSON ({e}): {stdout}"))
        };
        if !out.stderr.is_empty() {
            eprintln!("{bin} {cmd} stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        (out.status.code().unwrap_or(-1), v)
    }

    fn ks(&self, cmd: &str, id: &str, netns: Option<&Path>, conf: &Value) -> (i32, Value) {
        self.run(PLUGIN, cmd, id, netns, conf)
    }

    fn add_ok(&self, id: &str, netns: &Path) -> Value {
        let (rc, v) = self.ks("ADD", id, Some(netns), &self.conf("1.1.0"));
        assert_eq!(rc, 0, "ADD {id}: {v}");
        v
    }

    /// `ip -j` output in the node netns.
    fn node_links(&self) -> Vec<String> {
        ip_json(&self.node.path(), &["link", "show"])
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(String::from))
            .collect()
    }

    fn allocations(&self) -> Vec<String> {
        match fs::read_dir(self.data_dir().join("kubeshift")) {
            Ok(d) => d
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn ip_json(netns: &Path, args: &[&str]) -> Vec<Value> {
    let out = Command::new("ip").arg("-n").arg(netns.file_name().unwrap()).arg("-j").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().cloned().unwrap_or_default()
}

/// Runs `f` on a thread inside the namespace at `path`.
fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = fs::File::open(path).unwrap();
    std::thread::spawn(move || {
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        f()
    })
    .join()
    .unwrap()
}

fn pod_ip(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").parse().unwrap()
}

#[test]
fn add_wires_the_pod_traffic_flows_check_passes_del_is_idempotent() {
    let mut n = Node::new();
    let seen = n.start_agent(Duration::ZERO);
    let pod = n.pod();
    let r = n.add_ok("c1", &pod);
    let ip = pod_ip(&r);
    assert!(ip.to_string().starts_with("10.244.7."), "{r}");
    assert_eq!(r["routes"][0]["gw"], "169.254.1.1");
    assert_eq!(r["interfaces"][1]["sandbox"], pod.to_str().unwrap());

    // The pod netns: eth0 with the address, MTU, and a default route.
    let link = &ip_json(&pod, &["addr", "show", "dev", "eth0"])[0];
    assert_eq!(link["mtu"], 1400);
    assert!(link["addr_info"].as_array().unwrap().iter().any(|a| a["local"] == ip.to_string() && a["prefixlen"] == 32));
    let routes = ip_json(&pod, &["route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "169.254.1.1", "{routes:?}");

    // A packet flows: TCP from the pod to a node address, which sees the pod's IP.
    let listener = in_netns(&n.node.path(), || TcpListener::bind(SocketAddrV4::new(NODE_ADDR, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"pong").unwrap();
        peer
    });
    let answer = in_netns(&pod, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddrV4::new(NODE_ADDR, port).into(), Duration::from_secs(5)).unwrap();
        s.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        b
    });
    assert_eq!(&answer, b"pong");
    assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(ip), "source address kept");

    // The agent was asked about the interface ADD reported.
    let reqs = seen.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].host_ifname, r["interfaces"][0]["name"].as_str().unwrap());
    assert_eq!(reqs[0].ip, ip);

    let mut check = n.conf("1.1.0");
    check["prevResult"] = r.clone();
    let (rc, v) = n.ks("CHECK", "c1", Some(&pod), &check);
    assert_eq!(rc, 0, "CHECK: {v}");

    // DEL twice, the second without a netns (as after a node reboot): both succeed.
    let host_if = r["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(n.ks("DEL", "c1", Some(&pod), &n.conf("1.1.0")).0, 0);
    assert!(!n.node_links().contains(&host_if));
    assert!(n.allocations().is_empty());
    n.agent = None; // DEL works without the agent.
    let (rc, v) = n.ks("DEL", "c1", None, &n.conf("1.1.0"));
    assert_eq!(rc, 0, "second DEL: {v}");
}

#[test]
fn add_twice_for_one_container_is_an_error_and_keeps_the_first() {
    let mut n = Node::new();
    n.start_agent(Duration::ZERO);
    let pod = n.pod();
    let r = n.add_ok("c1", &pod);
    let (rc, v) = n.ks("ADD", "c1", Some(&pod), &n.conf("1.1.0"));
    assert_ne!(rc, 0);
    assert_eq!(v["code"], 100, "{v}");
    assert!(v["msg"].as_str().unwrap().contains("eth0 already exists"), "{v}");
    assert_eq!(v["cniVersion"], "1.1.0");
    assert!(n.node_links().contains(&r["interfaces"][0]["name"].as_str().unwrap().to_string()));
    assert_eq!(n.allocations(), vec![pod_ip(&r).to_string()]);
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    let mut n = Node::new();
    n.start_agent(Duration::ZERO);
    let pods: Vec<PathBuf> = (0..8).map(|_| n.pod()).collect();
    let n = &n;
    let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
        let hs: Vec<_> =
            pods.iter().enumerate().map(|(i, p)| s.spawn(move || pod_ip(&n.add_ok(&format!("c{i}"), p)))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ips.iter().collect::<HashSet<_>>().len(), 8, "{ips:?}");
    assert_eq!(n.allocations().len(), 8);
}

#[test]
fn check_notices_a_removed_veth() {
    let mut n = Node::new();
    n.start_agent(Duration::ZERO);
    let pod = n.pod();
    let r = n.add_ok("c1", &pod);
    // With the agent down the attachment is not healthy either: try again later.
    n.agent = None;
    let mut check = n.conf("1.1.0");
    check["prevResult"] = r.clone();
    let (rc, v) = n.ks("CHECK", "c1", Some(&pod), &check);
    assert_eq!((rc, &v["code"]), (1, &json!(11)), "{v}");
    n.node.ip(&["link", "del", r["interfaces"][0]["name"].as_str().unwrap()]).unwrap();
    let mut check = n.conf("1.1.0");
    check["prevResult"] = r;
    let (rc, v) = n.ks("CHECK", "c1", Some(&pod), &check);
    assert_ne!(rc, 0);
    assert!(v["msg"].as_str().unwrap().contains("missing"), "{v}");
}

/// A host end left by a crashed ADD of the same container is replaced, not an error.
#[test]
fn add_replaces_a_leftover_host_end() {
    let mut n = Node::new();
    n.start_agent(Duration::ZERO);
    let pod = n.pod();
    let host_if = kubeshift_datapath::cni::host_ifname("c1", "eth0");
    n.node.ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "leftover0"]).unwrap();
    let r = n.add_ok("c1", &pod);
    assert_eq!(r["interfaces"][0]["name"], host_if.as_str());
    assert!(!n.node_links().contains(&"leftover0".to_string()), "the old pair is gone");
}

#[test]
fn gc_frees_allocations_of_vanished_containers() {
    let mut n = Node::new();
    n.start_agent(Duration::ZERO);
    let (p1, p2) = (n.pod(), n.pod());
    let r1 = n.add_ok("keep", &p1);
    let r2 = n.add_ok("gone", &p2);
    let mut gc = n.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let (rc, v) = n.ks("GC", "", None, &gc);
    assert_eq!(rc, 0, "GC: {v}");
    assert_eq!(n.allocations(), vec![pod_ip(&r1).to_string()]);
    let links = n.node_links();
    assert!(links.contains(&r1["interfaces"][0]["name"].as_str().unwrap().to_string()));
    assert!(!links.contains(&r2["interfaces"][0]["name"].as_str().unwrap().to_string()), "GC removes the host end too");
}

#[test]
fn version_lists_1_0_0_and_1_1_0() {
    let n = Node::new();
    let (rc, v) = n.ks("VERSION", "", None, &json!({"cniVersion": "1.1.0"}));
    assert_eq!(rc, 0);
    assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]));
    // An unsupported config version is code 1 naming the field.
    let mut c = n.conf("0.4.0");
    c["cniVersion"] = json!("0.4.0");
    let (rc, v) = n.ks("DEL", "x", None, &c);
    assert_ne!(rc, 0);
    assert_eq!(v["code"], 1);
    assert!(v["msg"].as_str().unwrap().contains("cniVersion"), "{v}");
}

#[test]
fn a_bad_config_names_the_field() {
    let n = Node::new();
    let cases: &[(&str, Value, &str)] = &[
        ("subnet", Value::Null, "subnet"),
        ("subnet", json!("10.1.0.0/40"), "subnet"),
        ("subnet", json!("not-a-cidr"), "subnet"),
        ("mtu", json!("big"), "mtu"),
        ("mtu", json!(9), "mtu"),
        ("gateway", json!("1.2.3"), "gateway"),
        ("agentSocket", Value::Null, "agentSocket"),
        ("type", json!("bridge"), "type"),
    ];
    for (field, value, want) in cases {
        let mut c = n.conf("1.1.0");
        if value.is_null() {
            c.as_object_mut().unwrap().remove(*field);
        } else {
            c[*field] = value.clone();
        }
        let pod = PathBuf::from("/nonexistent");
        let (rc, v) = n.ks("ADD", "c1", Some(&pod), &c);
        assert_ne!(rc, 0, "{field}={value}");
        assert_eq!(v["code"], 7, "{field}={value}: {v}");
        assert!(v["msg"].as_str().unwrap().contains(want), "{field}={value}: {v}");
    }
    let (rc, v) = n.ks("ADD", "c1", None, &n.conf("1.1.0"));
    assert_eq!((rc, &v["code"]), (1, &json!(4)), "{v}");
    assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"), "{v}");
}

#[test]
fn agent_unreachable_add_fails_naming_the_socket_and_leaves_nothing() {
    let mut n = Node::new();
    let pod = n.pod();
    let before = n.node_links();
    let (rc, v) = n.ks("ADD", "c1", Some(&pod), &n.conf("1.1.0"));
    assert_ne!(rc, 0);
    assert_eq!(v["code"], 11, "{v}");
    assert!(v["msg"].as_str().unwrap().contains(n.socket().to_str().unwrap()), "{v}");
    assert_eq!(n.node_links(), before, "host veth removed");
    assert!(ip_json(&pod, &["link", "show"]).iter().all(|l| l["ifname"] != "eth0"), "pod end removed");
    assert!(n.allocations().is_empty(), "address released");
    // STATUS says the same, with its own code.
    let (rc, v) = n.ks("STATUS", "", None, &n.conf("1.1.0"));
    assert_ne!(rc, 0);
    assert_eq!(v["code"], 50, "{v}");
    // And once the agent is up, the runtime's retry succeeds.
    n.start_agent(Duration::ZERO);
    assert_eq!(n.ks("STATUS", "", None, &n.conf("1.1.0")).0, 0);
    n.add_ok("c1", &pod);
}

#[test]
fn add_waits_for_the_agent() {
    let mut n = Node::new();
    let seen = n.start_agent(Duration::from_millis(400));
    let pod = n.pod();
    let t = Instant::now();
    let r = n.add_ok("c1", &pod);
    assert!(t.elapsed() >= Duration::from_millis(400), "ADD returned before the agent answered");
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert!(seen.lock().unwrap()[0].host_ifindex > 0);
    // An agent that refuses: ADD fails (try again later) and undoes everything.
    drop(n.agent.take());
    n.agent = Some(serve_attach(&n.socket(), |_| Err("policy maps full".into())).unwrap());
    let pod2 = n.pod();
    let (rc, v) = n.ks("ADD", "c2", Some(&pod2), &n.conf("1.1.0"));
    assert_ne!(rc, 0);
    assert_eq!(v["code"], 11);
    assert!(v["msg"].as_str().unwrap().contains("policy maps full"), "{v}");
    assert_eq!(n.allocations(), vec![pod_ip(&r).to_string()]);
}

#[test]
fn prev_result_on_add_is_refused() {
    let mut n = Node::new();
    n.start_agent(Duration::ZERO);
    let pod = n.pod();
    let mut c = n.conf("1.1.0");
    c["prevResult"] = json!({"cniVersion": "1.1.0", "interfaces": []});
    let (rc, v) = n.ks("ADD", "c1", Some(&pod), &c);
    assert_ne!(rc, 0);
    assert!(v["msg"].as_str().unwrap().contains("prevResult"), "{v}");
}

/// A conflist `[kubeshift, portmap]` driven as the runtime does: ADD in order with
/// prevResult, DEL in reverse. Debian's portmap speaks up to 1.0.0, so the list does too.
#[test]
fn works_in_a_conflist_followed_by_debian_portmap() {
    let portmap = format!("{DEBIAN_CNI}/portmap");
    if !Path::new(&portmap).exists() {
        panic!("{portmap} missing (Debian package containernetworking-plugins)");
    }
    let mut n = Node::new();
    n.start_agent(Duration::ZERO);
    let pod = n.pod();
    let (rc, r) = n.ks("ADD", "c1", Some(&pod), &n.conf("1.0.0"));
    assert_eq!(rc, 0, "{r}");
    let pm = |prev: &Value| {
        json!({
            "cniVersion": "1.0.0",
            "name": "kubeshift",
            "type": "portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]},
            "prevResult": prev,
        })
    };
    let (rc, final_result) = n.run(&portmap, "ADD", "c1", Some(&pod), &pm(&r));
    assert_eq!(rc, 0, "portmap ADD: {final_result}");
    assert_eq!(final_result["ips"], r["ips"], "portmap passes kubeshift's result through");
    let rules =
        Command::new("ip").args(["netns", "exec", &n.node.name, "iptables-save", "-t", "nat"]).output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("18080") && rules.contains(&pod_ip(&r).to_string()),
        "portmap DNAT in the node netns: {rules}"
    );
    // CHECK through the chain, then DEL in reverse order.
    let mut check = n.conf("1.0.0");
    check["prevResult"] = final_result.clone();
    assert_eq!(n.ks("CHECK", "c1", Some(&pod), &check).0, 0);
    let (rc, v) = n.run(&portmap, "DEL", "c1", Some(&pod), &pm(&final_result));
    assert_eq!(rc, 0, "portmap DEL: {v}");
    let mut del = n.conf("1.0.0");
    del["prevResult"] = final_result;
    assert_eq!(n.ks("DEL", "c1", Some(&pod), &del).0, 0);
    assert!(n.allocations().is_empty());
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `cargo test -p kubeshift-datapath --release --test cni -- --ignored --nocapture cni_latency`
/// ADD and DEL of one pod, each measured as the runtime sees it (exec to exit), the pod
/// netns created and removed outside the timed part; kubeshift with an agent that answers
/// at once, against Debian's bridge + host-local as the Flannel lab runs them.
#[test]
#[ignore = "benchmark: 200 ADD and DEL runs per plugin, prints p50/p99 (BENCHMARKS.md); run with --release"]
fn cni_latency() {
    let runs: usize = std::env::var("KS_CNI_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let mut n = Node::new();
    n.start_agent(Duration::ZERO);
    let bridge_conf = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "bridge",
        "bridge": "ksb0",
        "mtu": 1400,
        "hairpinMode": true,
        "isDefaultGateway": true,
        "ipam": {"type": "host-local", "subnet": "10.98.0.0/16", "dataDir": n.data_dir().join("host-local")},
    });
    let bridge = format!("{DEBIAN_CNI}/bridge");
    let mut report = Vec::new();
    for (label, bin, conf) in
        [("kubeshift", PLUGIN.to_string(), n.conf("1.0.0")), ("bridge+host-local", bridge, bridge_conf)]
    {
        let (mut adds, mut dels) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let ns = Netns::create(&format!("ks-cni-{}-b{i}", n.tag)).unwrap();
            let id = format!("bench{i}");
            let t = Instant::now();
            let (rc, v) = n.run(&bin, "ADD", &id, Some(&ns.path()), &conf);
            adds.push(t.elapsed());
            assert_eq!(rc, 0, "{label} ADD: {v}");
            let t = Instant::now();
            let (rc, v) = n.run(&bin, "DEL", &id, Some(&ns.path()), &conf);
            dels.push(t.elapsed());
            assert_eq!(rc, 0, "{label} DEL: {v}");
        }
        let line = format!(
            "{label:18} ADD p50 {:>6.2} ms p99 {:>6.2} ms | DEL p50 {:>6.2} ms p99 {:>6.2} ms ({runs} runs)",
            percentile(&mut adds, 0.5).as_secs_f64() * 1e3,
            percentile(&mut adds, 0.99).as_secs_f64() * 1e3,
            percentile(&mut dels, 0.5).as_secs_f64() * 1e3,
            percentile(&mut dels, 0.99).as_secs_f64() * 1e3,
        );
        println!("{line}");
        report.push(line);
    }
    let leftovers: HashSet<String> =
        n.node_links().into_iter().filter(|l| l.starts_with("ks") && l != "ksb0").collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    eprintln!("{}", report.join("\n"));
}
