//! Per-new-connection cost through the socket load balancer vs. a direct pod-IP connect,
//! at several service counts, plus the time one endpoint change takes to apply.
//!
//! Method (as in shared/BASELINE.md): a client netns and a backend netns on a veth; the
//! client makes COUNT sequential new TCP connections (blocking connect + close) to each of
//!   (a) the ClusterIP inserted last, (b) the ClusterIP inserted first,
//!   (c) the backend's pod IP directly (hooks attached, lookup misses),
//!   (d) the pod IP from a sibling cgroup with no program at all (the floor);
//! (a)–(c) round-robin one connection at a time, (d) in blocks of 50 between them (see
//! the probe's `connect-mix`), so the noise of a shared 2-core machine hits all variants
//! alike. p50 and p99 per variant per repeat; REPEATS repeats. Endpoint change: wall time
//! of `set_backends` on one service (all its map syscalls), checked by a connect that must
//! reach the new backend.
//!
//! Usage: kubeshift-dp-bench [--sizes 10,1000,10000] [--count 2000] [--repeats 3]
//!        [--wide 10000]   (also run N services x 4 endpoints; 0 to skip)
//!        [--no-flow-events]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Instant,
};

use kubeshift_datapath::{
    testenv::{sibling_binary, Cgroup, Lab},
    Affinity, Backend, Datapath, DatapathConfig, Protocol, ServiceKey, DEFAULT_BPFFS_ROOT,
};

const B1: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const B2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const PORT: u16 = 8080;

struct Args {
    sizes: Vec<usize>,
    count: usize,
    repeats: usize,
    wide: usize,
    flow_events: bool,
}

fn parse_args() -> Args {
    let mut a = Args { sizes: vec![10, 1000, 10_000], count: 2000, repeats: 3, wide: 10_000, flow_events: true };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == "--no-flow-events" {
            a.flow_events = false;
            i += 1;
            continue;
        }
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--sizes" => a.sizes = v.split(',').map(|s| s.parse().expect("size")).collect(),
            "--count" => a.count = v.parse().expect("count"),
            "--repeats" => a.repeats = v.parse().expect("repeats"),
            "--wide" => a.wide = v.parse().expect("wide"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

/// The i-th service VIP: 10.96.0.0/12 like the lab's service CIDR.
fn vip(i: usize) -> Ipv4Addr {
    let n = (10u32 << 24) | (96 << 16) | (i as u32 + 1);
    Ipv4Addr::from(n)
}

fn svc(i: usize) -> ServiceKey {
    ServiceKey { vip: vip(i), port: 80, protocol: Protocol::Tcp }
}

struct Stats {
    p50_us: f64,
    p99_us: f64,
}

fn stats(mut ns: Vec<u64>) -> Stats {
    ns.sort_unstable();
    let pct = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    Stats { p50_us: pct(0.50), p99_us: pct(0.99) }
}

/// One repeat: returns stats for [last, first, direct, floor].
fn measure_mix(lab: &Lab, floor_cg: &Path, probe: &Path, targets: [String; 3], count: usize) -> Vec<Stats> {
    let list = targets.join(",");
    let floor_env = format!("{}|{}|{}", floor_cg.display(), lab.cgroup.path.display(), targets[2]);
    let lines = lab
        .probe_in(
            &lab.cgroup.path,
            probe,
            &["connect-mix", &list, &count.to_string()],
            &[("KS_PROBE_FLOOR", &floor_env)],
        )
        .expect("probe");
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); 4];
    for l in &lines {
        let mut f = l.split_whitespace();
        let (Some("T"), Some(i), Some(ns)) = (f.next(), f.next(), f.next()) else {
            panic!("bad probe line {l}");
        };
        let ns: u64 = ns.parse().unwrap_or_else(|_| panic!("connect failed: {l}"));
        samples[i.parse::<usize>().unwrap()].push(ns);
    }
    samples.into_iter().map(stats).collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if (hi - lo).abs() < 0.5 {
        format!("{lo:.0}")
    } else {
        format!("{lo:.0}–{hi:.0}")
    }
}

struct Row {
    label: String,
    last: Vec<Stats>,
    first: Vec<Stats>,
    direct: Vec<Stats>,
    floor: Vec<Stats>,
    change_us: Vec<f64>,
    prog_hit_ns: f64,
    prog_miss_ns: f64,
}

/// Removes pins even if a measurement panics.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = Datapath::purge(&self.0);
    }
}

fn run_size(probe: &Path, n: usize, backends_per_svc: usize, a: &Args) -> Row {
    let mut lab = Lab::new(&[B1, B2]).expect("lab");
    // 2,000 x variants x repeats connections per size: widen the client's ephemeral
    // range and allow TIME_WAIT reuse so port exhaustion does not become the benchmark.
    lab.client.sysctl("net.ipv4.ip_local_port_range", "1024 65535").unwrap();
    lab.client.sysctl("net.ipv4.tcp_tw_reuse", "1").unwrap();
    let b1_addrs: Vec<SocketAddrV4> = (0..backends_per_svc as u16).map(|p| SocketAddrV4::new(B1, PORT + p)).collect();
    lab.tcp_server_multi(&b1_addrs, "b1").unwrap();
    lab.tcp_server(SocketAddrV4::new(B2, PORT), "b2").unwrap();
    let direct = SocketAddrV4::new(B1, PORT);

    // The floor: a sibling cgroup that never gets a program, measured in the same
    // rounds as the rest.
    let floor_cg = Cgroup::create(&format!("kubeshift-dpbench-floor-{}", lab.tag)).unwrap();

    let pin_dir = Path::new(DEFAULT_BPFFS_ROOT).join(format!("bench-{}", lab.tag));
    let _guard = PinGuard(pin_dir.clone());
    let mut dp = Datapath::load(DatapathConfig { pin_dir, cgroup: lab.cgroup.path.clone() }).expect("load");
    dp.set_flow_events(a.flow_events).expect("set_flow_events");
    let backends: Vec<Backend> = (0..backends_per_svc as u16).map(|p| Backend { ip: B1, port: PORT + p }).collect();
    let t = Instant::now();
    for i in 0..n {
        dp.upsert_service(svc(i), backends.clone(), Affinity::None).expect("upsert");
    }
    eprintln!("{n} services x {backends_per_svc}: programmed in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);

    let last = SocketAddrV4::new(vip(n - 1), 80);
    let first = SocketAddrV4::new(vip(0), 80);
    let mut row = Row {
        label: if backends_per_svc == 1 { format!("{n}") } else { format!("{n} × {backends_per_svc} endpoints") },
        last: vec![],
        first: vec![],
        direct: vec![],
        floor: vec![],
        change_us: vec![],
        prog_hit_ns: 0.0,
        prog_miss_ns: 0.0,
    };
    // The pod-IP variants rotate through the same endpoints the service picks from, so
    // a 4-endpoint service is compared with connects spread over the same 4 sockets.
    let pods = b1_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join("+");
    let targets = [last.to_string(), first.to_string(), pods];
    for r in 0..a.repeats {
        let mut m = measure_mix(&lab, &floor_cg.path, probe, targets.clone(), a.count).into_iter();
        row.last.push(m.next().unwrap());
        row.first.push(m.next().unwrap());
        row.direct.push(m.next().unwrap());
        row.floor.push(m.next().unwrap());
        // Keep the ring buffer drained, as the agent would.
        dp.read_flows();

        // One endpoint change on the middle service: replace one backend by B2.
        let target = svc(n / 2);
        let mut changed = backends.clone();
        changed[0] = Backend { ip: B2, port: PORT };
        // Alternate between the changed and the original set, one change per round.
        let to = if r.is_multiple_of(2) { changed } else { backends.clone() };
        let t = Instant::now();
        dp.set_backends(target, to.clone()).expect("set_backends");
        row.change_us.push(t.elapsed().as_secs_f64() * 1e6);
        // The change must be live on the very next connect.
        if to.len() == 1 {
            let want = if to[0].ip == B2 { "b2" } else { "b1" };
            let got = lab.probe(probe, &["tcp", &SocketAddrV4::new(vip(n / 2), 80).to_string(), "1"]).unwrap();
            assert!(got[0].contains(&format!("id={want}")), "{got:?}");
        }
    }
    // The program's own cost, from the kernel's BPF run-time statistics: a block of
    // service connects (lookup hit, translation, revnat and flow event), then a block of
    // direct connects (lookup miss).
    let connect4 = |dp: &Datapath| {
        dp.program_stats()
            .expect("program stats")
            .into_iter()
            .find(|s| s.name == "ks_connect4")
            .expect("ks_connect4 stats")
    };
    let per_run = |a: kubeshift_datapath::ProgramStats, b: kubeshift_datapath::ProgramStats| {
        (b.run_time - a.run_time).as_nanos() as f64 / (b.run_count - a.run_count).max(1) as f64
    };
    let n_str = a.count.to_string();
    let s0 = connect4(&dp);
    lab.probe(probe, &["connect-bench", &last.to_string(), &n_str]).expect("probe");
    let s1 = connect4(&dp);
    lab.probe(probe, &["connect-bench", &direct.to_string(), &n_str]).expect("probe");
    let s2 = connect4(&dp);
    row.prog_hit_ns = per_run(s0, s1);
    row.prog_miss_ns = per_run(s1, s2);
    dp.detach_and_unpin().expect("unpin");
    drop(floor_cg);
    row
}

fn main() {
    let a = parse_args();
    let probe = sibling_binary("kubeshift-dp-probe").expect("kubeshift-dp-probe binary");
    // Counts program run time while held; the kernel turns it off when this fd closes.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let mut rows = Vec::new();
    for &n in &a.sizes {
        rows.push(run_size(&probe, n, 1, &a));
    }
    if a.wide > 0 {
        rows.push(run_size(&probe, a.wide, 4, &a));
    }
    println!(
        "| services | ClusterIP (last inserted) p50 / p99 µs | ClusterIP (first inserted) p50 / p99 µs | pod IP, hooks attached p50 / p99 µs | pod IP, no program (floor) p50 / p99 µs | ClusterIP last ÷ floor, p50 | ClusterIP last ÷ pod IP (hooks), p50 | one endpoint change applied | connect4 run time per call: service / non-service |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        // median of the repeats, then the range over repeats in brackets
        let cell = |s: &[Stats]| {
            let p50: Vec<f64> = s.iter().map(|x| x.p50_us).collect();
            let p99: Vec<f64> = s.iter().map(|x| x.p99_us).collect();
            format!("{:.0} [{}] / {:.0} [{}]", median(&p50), range(&p50), median(&p99), range(&p99))
        };
        let ratio = |base: &[Stats]| {
            let v: Vec<f64> = r.last.iter().zip(base).map(|(l, f)| l.p50_us / f.p50_us).collect();
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.2} [{lo:.2}–{hi:.2}]", median(&v))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} [{}] µs | {:.0} ns / {:.0} ns |",
            r.label,
            cell(&r.last),
            cell(&r.first),
            cell(&r.direct),
            cell(&r.floor),
            ratio(&r.floor),
            ratio(&r.direct),
            median(&r.change_us),
            range(&r.change_us),
            r.prog_hit_ns,
            r.prog_miss_ns
        );
    }
}
