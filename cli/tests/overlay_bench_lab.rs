//! Pod-to-pod over kubeshift's overlay against Flannel's VXLAN (issue 13): cross-node
//! TCP request/response latency and bulk throughput, both networks on the same two
//! lab nodes in the same run. Goal: kubeshift at least as good, within 5 %.
//!
//! ```sh
//! cargo build --release -p kubeshift-datapath --bin kubeshift-cni
//! cargo test --release -p kubeshift --test overlay_bench_lab -- --ignored --nocapture
//! ```
//!
//! A 2-node Flannel lab `ovb`: a Flannel pod on each node; the agent DaemonSet installed
//! and both nodes made active; then a pod on each node gets a kubeshift address. The
//! Flannel pods keep theirs, so both pairs exist side by side and their runs can be
//! interleaved. The server and client are this test's own threads with sockets made
//! inside the pods' network namespaces (a socket stays in the namespace it was created
//! in), so no tool has to exist on the machine and both networks get the same code.
//!
//! - `KS_OVB_ROUNDS` (5): each round measures both pairs, the order flipping every round
//!   (F K K F F …) so a drift in machine load falls on both alike.
//! - `KS_OVB_RR` (20000): 1-byte request/response round trips per run, after 1000 of warm-up.
//! - `KS_OVB_BULK_SECS` (5): seconds of bulk sending per run.
//! - `KS_OVB_BASELINE` (1): first measure the Flannel pair before the agent is installed
//!   (no kubeshift tc programs on its veths); 0 skips it.
//! - `KS_OVB_CSV`: a file to write every run to.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kubeshift_datapath::agent::modes::{CONF_NAME, MODE_LABEL};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const PORT: u16 = 5201;
const WARMUP: usize = 1000;
const CHUNK: usize = 128 << 10;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
        .unwrap_or(default)
}

fn ip_json(netns: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new("ip").args(["-n", netns, "-j"]).args(args).output().expect("running ip");
    assert!(out.status.success(), "ip -n {netns} -j {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ip -j output")
}

/// (tx packets, tx bytes) of a device in a namespace.
fn tx(netns: &str, dev: &str) -> (u64, u64) {
    let v = ip_json(netns, &["-s", "link", "show", "dev", dev]);
    let t = &v[0]["stats64"]["tx"];
    (t["packets"].as_u64().unwrap(), t["bytes"].as_u64().unwrap())
}

fn mtu(netns: &str, dev: &str) -> u64 {
    ip_json(netns, &["link", "show", "dev", dev])[0]["mtu"].as_u64().unwrap()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One side of the comparison: a client pod on node-1, a server pod on node-2, and
/// the VXLAN device their packets must cross.
struct Pair {
    label: &'static str,
    dev: &'static str,
    /// The other network's device, which must stay quiet during this pair's runs.
    other_dev: &'static str,
    client_ns: String,
    server: SocketAddr,
    server_thread: Option<std::thread::JoinHandle<()>>,
}

impl Pair {
    fn new(lab: &Lab, label: &'static str, dev: &'static str, other_dev: &'static str, from: &Pod, to: &Pod) -> Pair {
        let to_ip: Ipv4Addr = to.status.as_ref().and_then(|s| s.pod_ip.as_deref()).unwrap().parse().unwrap();
        let listener = kubeshift_lab::sys::in_netns(&pod_netns(&lab.name, to), || TcpListener::bind(("0.0.0.0", PORT)))
            .unwrap()
            .expect("binding the server in the server pod");
        Pair {
            label,
            dev,
            other_dev,
            client_ns: pod_netns(&lab.name, from),
            server: SocketAddr::from((to_ip, PORT)),
            server_thread: Some(std::thread::spawn(move || serve(listener))),
        }
    }

    fn connect(&self, mode: u8) -> TcpStream {
        let addr = self.server;
        let mut s = kubeshift_lab::sys::in_netns(&self.client_ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{}: connect {addr}: {e}", self.label));
        s.set_nodelay(true).unwrap();
        s.write_all(&[mode]).unwrap();
        s
    }

    /// Round trips of one byte each way over one connection, warm-up excluded.
    fn rr(&self, n: usize) -> Vec<Duration> {
        let mut s = self.connect(b'r');
        let mut b = [0u8; 1];
        let mut out = Vec::with_capacity(n);
        for i in 0..WARMUP + n {
            let t = Instant::now();
            s.write_all(&[1]).unwrap();
            s.read_exact(&mut b).unwrap();
            if i >= WARMUP {
                out.push(t.elapsed());
            }
        }
        out
    }

    /// Bytes the server received and the time from the first write to the server's
    /// acknowledgement of the last byte: data still in the sender's buffers is not counted.
    fn bulk(&self, secs: f64) -> (u64, Duration) {
        let mut s = self.connect(b's');
        let buf = vec![0x5au8; CHUNK];
        let t0 = Instant::now();
        let mut sent = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            s.write_all(&buf).unwrap();
            sent += CHUNK as u64;
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut n = [0u8; 8];
        s.read_exact(&mut n).unwrap();
        let took = t0.elapsed();
        let got = u64::from_le_bytes(n);
        assert_eq!(got, sent, "{}: the server received {got} of {sent} bytes", self.label);
        (got, took)
    }
}

impl Drop for Pair {
    /// Stops the server so its listener does not keep the pod's namespace alive past
    /// `lab down`. Best effort: after a failure the path may be what broke.
    fn drop(&mut self) {
        let addr = self.server;
        let quit = kubeshift_lab::sys::in_netns(&self.client_ns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.write_all(b"q")
        });
        if let (Ok(Ok(())), Some(t)) = (quit, self.server_thread.take()) {
            let _ = t.join();
        }
    }
}

/// One connection at a time, as the client makes them; the first byte says what for.
fn serve(listener: TcpListener) {
    for conn in listener.incoming() {
        let mut s = conn.expect("accept");
        s.set_nodelay(true).unwrap();
        let mut mode = [0u8; 1];
        if s.read_exact(&mut mode).is_err() {
            continue;
        }
        match mode[0] {
            b'r' => {
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).is_ok() {
                    if s.write_all(&b).is_err() {
                        break;
                    }
                }
            }
            b's' => {
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => total += k as u64,
                        Err(e) => panic!("sink: {e}"),
                    }
                }
                s.write_all(&total.to_le_bytes()).unwrap();
            }
            _ => return,
        }
    }
}

#[derive(Debug, Clone)]
struct Run {
    label: &'static str,
    round: usize,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    gbit_s: f64,
    dev_tx_packets: u64,
    dev_tx_bytes: u64,
    reply_tx_packets: u64,
    other_tx_bytes: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One run of a pair, with the proof that its packets crossed the pair's own VXLAN
/// device both ways and not the other network's.
fn measure(lab: &Lab, pair: &Pair, round: usize, rr_n: usize, bulk_secs: f64, other_exists: bool) -> Run {
    let (n1, n2) = (lab.node_netns("node-1"), lab.node_netns("node-2"));
    let snap = || (tx(&n1, pair.dev), tx(&n2, pair.dev), other_exists.then(|| tx(&n1, pair.other_dev)));
    let (req0, rep0, other0) = snap();
    let mut lat = pair.rr(rr_n);
    let (bytes, took) = pair.bulk(bulk_secs);
    let (req1, rep1, other1) = snap();
    lat.sort();
    let run = Run {
        label: pair.label,
        round,
        p50_us: percentile(&lat, 50.0),
        p99_us: percentile(&lat, 99.0),
        mean_us: lat.iter().map(Duration::as_secs_f64).sum::<f64>() / lat.len() as f64 * 1e6,
        gbit_s: bytes as f64 * 8.0 / took.as_secs_f64() / 1e9,
        dev_tx_packets: req1.0 - req0.0,
        dev_tx_bytes: req1.1 - req0.1,
        reply_tx_packets: rep1.0 - rep0.0,
        other_tx_bytes: other1.zip(other0).map_or(0, |(a, b)| a.1 - b.1),
    };
    let why = format!("{} round {round}: {run:?}", pair.label);
    // Every request leaves node-1 through the device and every reply node-2; a GSO
    // packet counts once, so bytes (inner frames) are the check for the bulk part.
    assert!(run.dev_tx_packets >= (WARMUP + rr_n) as u64, "requests did not cross node-1's {}: {why}", pair.dev);
    assert!(run.reply_tx_packets >= (WARMUP + rr_n) as u64, "replies did not cross node-2's {}: {why}", pair.dev);
    assert!(run.dev_tx_bytes >= bytes, "the bulk data did not cross node-1's {}: {why}", pair.dev);
    assert!(run.other_tx_bytes < bytes / 100, "traffic went over {} too: {why}", pair.other_dev);
    eprintln!(
        "{:<17} round {round}: rr p50 {:7.1} µs  p99 {:7.1} µs  mean {:7.1} µs | bulk {:6.2} Gbit/s | {} tx {} pkts {} MB | load {}",
        pair.label,
        run.p50_us,
        run.p99_us,
        run.mean_us,
        run.gbit_s,
        pair.dev,
        run.dev_tx_packets,
        run.dev_tx_bytes >> 20,
        loadavg()
    );
    run
}

fn summary(runs: &[Run], label: &str) -> (f64, f64, f64) {
    let of: Vec<&Run> = runs.iter().filter(|r| r.label == label).collect();
    (
        median(of.iter().map(|r| r.p50_us).collect()),
        median(of.iter().map(|r| r.p99_us).collect()),
        median(of.iter().map(|r| r.gbit_s).collect()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: brings up a 2-node lab and measures for a few minutes; run with --ignored --nocapture"]
async fn overlay_vs_flannel_vxlan_pod_to_pod() {
    let rounds: usize = env_or("KS_OVB_ROUNDS", 5);
    let rr_n: usize = env_or("KS_OVB_RR", 20000);
    let bulk_secs: f64 = env_or("KS_OVB_BULK_SECS", 5.0);
    let baseline = env_or("KS_OVB_BASELINE", 1u8) != 0;
    assert_cni_plugin_built();

    let lab = Lab::up("ovb", &["--nodes", "2", "--cni", "flannel", "--no-demo"]);
    let client = lab.client().await;
    let (n1, n2) = (lab.node_netns("node-1"), lab.node_netns("node-2"));
    let flannel_net: kubeshift_datapath::overlay::Cidr = "10.244.0.0/16".parse().unwrap();
    let ks_net: kubeshift_datapath::overlay::Cidr = "10.200.0.0/16".parse().unwrap();

    netexec_on(&client, "fl-1", "node-1").await;
    netexec_on(&client, "fl-2", "node-2").await;
    let (fl1, fl1_ip) = ready_ip(&client, "fl-1").await;
    let (fl2, fl2_ip) = ready_ip(&client, "fl-2").await;
    assert!(flannel_net.contains(fl1_ip) && flannel_net.contains(fl2_ip), "{fl1_ip} {fl2_ip}");

    let started = Command::new("date").arg("-u").output().unwrap();
    eprintln!("start {} load {}", String::from_utf8_lossy(&started.stdout).trim(), loadavg());
    let mut runs = Vec::new();
    if baseline {
        let pair = Pair::new(&lab, "flannel (no agent)", "flannel.1", "kubeshift.vx", &fl1, &fl2);
        for round in 0..rounds {
            runs.push(measure(&lab, &pair, round, rr_n, bulk_secs, false));
        }
    }

    install_agent(&lab, &["--legacy-pod-cidr", "10.244.0.0/16"]);
    let conf = |n: &str| kubeshift_lab::kubelet::node_root(&lab.name, n).join("etc/cni/net.d").join(CONF_NAME);
    for node in ["node-1", "node-2"] {
        let patch = json!({"metadata": {"labels": {MODE_LABEL: "active"}}});
        Api::<Node>::all(client.clone()).patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    for node in ["node-1", "node-2"] {
        eventually(&format!("{node}'s kubeshift CNI conf"), Duration::from_secs(120), || async {
            Ok(conf(node).exists().then_some(()))
        })
        .await;
    }
    netexec_on(&client, "ks-1", "node-1").await;
    netexec_on(&client, "ks-2", "node-2").await;
    let (ks1, ks1_ip) = ready_ip(&client, "ks-1").await;
    let (ks2, ks2_ip) = ready_ip(&client, "ks-2").await;
    assert!(ks_net.contains(ks1_ip) && ks_net.contains(ks2_ip), "{ks1_ip} {ks2_ip}");

    // Measure only once each agent polices every pod: an attach in the middle of a run
    // would change one network's path between its rounds.
    for (node, netns) in [("node-1", &n1), ("node-2", &n2)] {
        eventually(&format!("{node}'s agent attached to every pod"), Duration::from_secs(90), || async {
            let m = kubeshift_lab::sys::in_netns(netns, || metrics("127.0.0.1:9963"))??;
            let pods = pod_network_pods(&client, node).await;
            Ok((metric(&m, "kubeshift_agent_policy_interfaces") == Some(pods as f64)).then_some(()))
        })
        .await;
    }

    let flannel = Pair::new(&lab, "flannel", "flannel.1", "kubeshift.vx", &fl1, &fl2);
    let ks = Pair::new(&lab, "kubeshift", "kubeshift.vx", "flannel.1", &ks1, &ks2);
    for (what, p, dev) in [("flannel", &fl1, "flannel.1"), ("kubeshift", &ks1, "kubeshift.vx")] {
        let pod_mtu = mtu(&pod_netns(&lab.name, p), "eth0");
        eprintln!("{what}: pod eth0 MTU {pod_mtu}, node-1 {dev} MTU {}", mtu(&n1, dev));
        // The devices' own settings (checksums, learning, port) go into the record too:
        // a difference there explains a difference in the numbers.
        let d = Command::new("ip").args(["-n", &n1, "-d", "link", "show", "dev", dev]).output().unwrap();
        eprint!("{}", String::from_utf8_lossy(&d.stdout));
    }
    for round in 0..rounds {
        let order = if round % 2 == 0 { [&flannel, &ks] } else { [&ks, &flannel] };
        for pair in order {
            runs.push(measure(&lab, pair, round, rr_n, bulk_secs, true));
        }
    }
    drop((flannel, ks));
    let ended = Command::new("date").arg("-u").output().unwrap();
    eprintln!("end {} load {}", String::from_utf8_lossy(&ended.stdout).trim(), loadavg());

    if let Ok(path) = std::env::var("KS_OVB_CSV") {
        let mut csv = String::from(
            "network,round,rr_p50_us,rr_p99_us,rr_mean_us,bulk_gbit_s,dev_tx_packets,dev_tx_bytes,reply_tx_packets\n",
        );
        for r in &runs {
            csv += &format!(
                "{},{},{:.1},{:.1},{:.1},{:.3},{},{},{}\n",
                r.label,
                r.round,
                r.p50_us,
                r.p99_us,
                r.mean_us,
                r.gbit_s,
                r.dev_tx_packets,
                r.dev_tx_bytes,
                r.reply_tx_packets
            );
        }
        std::fs::write(&path, csv).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }

    let (fp50, fp99, fbw) = summary(&runs, "flannel");
    let (kp50, kp99, kbw) = summary(&runs, "kubeshift");
    eprintln!("\n| network | runs | rr p50 (µs) | rr p99 (µs) | bulk (Gbit/s) |\n|---|---|---|---|---|");
    if baseline {
        let (b50, b99, bbw) = summary(&runs, "flannel (no agent)");
        eprintln!("| Flannel, before the agent | {rounds} | {b50:.1} | {b99:.1} | {bbw:.2} |");
    }
    eprintln!("| Flannel (flannel.1) | {rounds} | {fp50:.1} | {fp99:.1} | {fbw:.2} |");
    eprintln!("| kubeshift (kubeshift.vx) | {rounds} | {kp50:.1} | {kp99:.1} | {kbw:.2} |");
    eprintln!(
        "| ratio kubeshift/Flannel | | {:.3} | {:.3} | {:.3} (Flannel/kubeshift {:.3}) |",
        kp50 / fp50,
        kp99 / fp99,
        kbw / fbw,
        fbw / kbw
    );
    // Not asserted against the 1.05 goal: on a shared 2-core machine the ratio is a
    // number to report, and a bench that fails on load would be rerun until it passes.
}
