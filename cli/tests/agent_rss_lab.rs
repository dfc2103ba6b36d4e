//! Agent resident memory at scale (issue 13): `kubeshift agent` in active mode, every
//! half on (services, NetworkPolicy, NodePort, flows), as datapath_lab's bench runs it,
//! on node-1 of a lab whose API holds 10,000 Services × 4 endpoints (EndpointSlices) and
//! 1,000 Pods. VmRSS, VmHWM and RssAnon are read from /proc/<pid>/status once the agent's
//! /metrics say it is ready with every service port and backend written.
//!
//! ```sh
//! export CARGO_TARGET_DIR=...
//! cargo build --release -p kubeshift          # the agent under test
//! KS_RSS_AGENTS=release=$CARGO_TARGET_DIR/release/kubeshift \
//!   cargo test -p kubeshift --test agent_rss_lab -- --ignored --nocapture
//! ```
//!
//! - `KS_RSS_AGENTS`: `label=path,...`, kubeshift binaries to measure against the same
//!   lab, e.g. `before=/tmp/kubeshift-old,after=target/release/kubeshift`. Default: the
//!   binary cargo built for this test (debug unless `--release`).
//! - `KS_RSS_ROUNDS` (2): each round starts every agent once, in the order given, so two
//!   builds are measured interleaved on the same machine load.
//! - `KS_RSS_SERVICES` (10000), `KS_RSS_ENDPOINTS` (4), `KS_RSS_PODS` (1000),
//!   `KS_RSS_SAMPLES` (10, one a second after ready).
//! - `KS_RSS_LAB`: measure on a lab that is already up (`kubeshift lab up --name memb
//!   --nodes 1 --cni flannel --no-demo`) and leave it up, to measure several builds
//!   without creating the objects again (they are created only where missing). Without
//!   it the test brings up its own lab `mem` and tears it down.
//! - `KS_RSS_CSV`: where the rows go (default `bench/agent-rss.csv`, rewritten per run).
//!
//! Each agent starts from empty pins (the previous run's are purged), so every run does
//! the full first reconcile: listing everything and writing 10,001 services.

mod common;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NS: &str = "rss";
/// Where the API's pods are bound: a Node object without a kubelet, so the pods exist
/// with addresses but nothing runs them (the lab's kubelets only run their own node's).
const VIRTUAL_NODE: &str = "rss-virtual";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
        .unwrap_or(default)
}

fn pod_ip(i: usize) -> String {
    format!("10.250.{}.{}", i / 250, i % 250 + 1)
}

/// The page of names present in the namespace, to create only what is missing.
async fn names<K>(api: &Api<K>) -> std::collections::HashSet<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = std::collections::HashSet::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let l = api.list_metadata(&lp).await.expect("listing");
        out.extend(l.items.into_iter().filter_map(|o| o.metadata.name));
        match l.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return out,
        }
    }
}

/// What a Deployment's pod looks like in the API once a kubelet ran it: labels, an owner,
/// a container with ports, env and resources, and a Running status with conditions.
fn pod_json(i: usize) -> serde_json::Value {
    json!({
        "metadata": {"name": format!("p{i}"), "labels": {"app": format!("app-{}", i % 100), "pod-template-hash": "5d4f8b7c9"},
                     "annotations": {"kubeshift.test/rss": "synthetic"}},
        "spec": {
            "nodeName": VIRTUAL_NODE,
            // The node lifecycle controller taints a node without a kubelet; without
            // this the taint manager would evict the pods after 300 s.
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "app", "image": "registry.k8s.io/e2e-test-images/agnhost:2.39",
                "args": ["netexec", "--http-port=8080"],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "serve"}],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
            }],
        }
    })
}

fn pod_status_json(i: usize) -> serde_json::Value {
    let t = "2026-01-01T00:00:00Z";
    let conditions: Vec<_> = ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
        .iter()
        .map(|c| json!({"type": c, "status": "True", "lastTransitionTime": t}))
        .collect();
    json!({"status": {
        "phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}], "hostIP": "10.99.0.250", "startTime": t,
        "conditions": conditions,
        "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "started": true,
            "image": "registry.k8s.io/e2e-test-images/agnhost:2.39", "imageID": "", "containerID": format!("lab://p{i}"),
            "state": {"running": {"startedAt": t}}}],
    }})
}

/// discovery.k8s.io/v1beta1, the only EndpointSlice version a 1.20 apiserver serves.
fn slice_api(client: &kube::Client) -> Api<kube::api::DynamicObject> {
    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
        "endpointslices",
    );
    Api::namespaced_with(client.clone(), NS, &ar)
}

/// Service i's slice: `eps` of the pods, as the EndpointSlice controller writes them.
fn slice_json(i: usize, eps: usize, pods: usize) -> serde_json::Value {
    let endpoints: Vec<_> = (0..eps)
        .map(|k| {
            let p = (i * eps + k) % pods;
            json!({"addresses": [pod_ip(p)], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "namespace": NS, "name": format!("p{p}")},
                   "topology": {"kubernetes.io/hostname": VIRTUAL_NODE}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}"), "labels": {"kubernetes.io/service-name": format!("s{i}"),
                     "endpointslice.kubernetes.io/managed-by": "rss-test"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// Runs `f` over `items` 32 requests at a time (the apiserver's and etcd's pace, not ours).
async fn all<I, F, Fut>(items: I, f: F)
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures::stream::iter(items).map(f).buffer_unordered(32).collect::<Vec<()>>().await;
}

/// The objects of the measurement, created where missing.
async fn populate(client: &kube::Client, services: usize, eps: usize, pods: usize) {
    let t = Instant::now();
    let nss = Api::<Namespace>::all(client.clone());
    if nss.get_opt(NS).await.unwrap().is_none() {
        create(&nss, json!({"metadata": {"name": NS}})).await;
    }
    let nodes = Api::<Node>::all(client.clone());
    if nodes.get_opt(VIRTUAL_NODE).await.unwrap().is_none() {
        create(&nodes, json!({"metadata": {"name": VIRTUAL_NODE, "labels": {"kubernetes.io/hostname": VIRTUAL_NODE}}}))
            .await;
    }
    let pod_api = Api::<Pod>::namespaced(client.clone(), NS);
    let have = names(&pod_api).await;
    all((0..pods).filter(|i| !have.contains(&format!("p{i}"))), |i| {
        let api = pod_api.clone();
        async move {
            let p: Pod = serde_json::from_value(pod_json(i)).unwrap();
            api.create(&PostParams::default(), &p).await.expect("create pod");
        }
    })
    .await;
    // A pod's address is status, written through the status subresource as a kubelet does.
    let mut without_ip = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let l = pod_api.list(&lp).await.unwrap();
        for p in &l.items {
            if p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_none() {
                let name = p.metadata.name.clone().unwrap();
                without_ip.push(name.trim_start_matches('p').parse::<usize>().unwrap());
            }
        }
        match l.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    all(without_ip, |i| {
        let api = pod_api.clone();
        async move {
            api.patch_status(&format!("p{i}"), &PatchParams::default(), &Patch::Merge(pod_status_json(i)))
                .await
                .expect("pod status");
        }
    })
    .await;
    let svc_api = Api::<Service>::namespaced(client.clone(), NS);
    let have = names(&svc_api).await;
    all((0..services).filter(|i| !have.contains(&format!("s{i}"))), |i| {
        let api = svc_api.clone();
        async move {
            let s: Service = serde_json::from_value(json!({
                "metadata": {"name": format!("s{i}"), "labels": {"app": format!("app-{}", i % 100)}},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
            }))
            .unwrap();
            api.create(&PostParams::default(), &s).await.expect("create service");
        }
    })
    .await;
    let slices = slice_api(client);
    let have = names(&slices).await;
    all((0..services).filter(|i| !have.contains(&format!("s{i}"))), |i| {
        let api = slices.clone();
        async move {
            let o: kube::api::DynamicObject = serde_json::from_value(slice_json(i, eps, pods)).unwrap();
            api.create(&PostParams::default(), &o).await.expect("create slice");
        }
    })
    .await;
    eprintln!("objects in place after {:.0} s", t.elapsed().as_secs_f64());
}

/// Service ports and backends the agent must have written: every Service with an IPv4
/// cluster IP, one entry per port, and the bench slices' endpoints.
async fn expected_ports(client: &kube::Client) -> usize {
    let mut n = 0;
    let mut lp = ListParams::default().limit(500);
    let api = Api::<Service>::all(client.clone());
    loop {
        let l = api.list(&lp).await.unwrap();
        for s in &l.items {
            let spec = s.spec.as_ref().unwrap();
            if spec.cluster_ip.as_deref().is_some_and(|ip| ip != "None" && !ip.is_empty()) {
                n += spec.ports.as_ref().map_or(0, |p| p.len());
            }
        }
        match l.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return n,
        }
    }
}

/// The agent process under test; SIGTERM by its PID when dropped.
struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// kB values of /proc/<pid>/status.
fn proc_status(pid: u32) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent exited");
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let n = v.split_whitespace().next()?.parse().ok()?;
            Some((k.to_string(), n))
        })
        .collect()
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s[s.len() / 2]
}

struct Run {
    label: String,
    ready_s: f64,
    rss: Vec<u64>,
    anon: Vec<u64>,
    hwm: u64,
    threads: u64,
}

#[allow(clippy::too_many_arguments)] // one measurement's knobs, each named at the one call site
async fn measure(
    lab: &str,
    label: &str,
    bin: &Path,
    round: usize,
    services: usize,
    eps: usize,
    ports: usize,
    samples: usize,
) -> Run {
    let node_cgroup = kubeshift_lab::down::cgroup_dir(lab).unwrap().join("node-1");
    let pins = Pins(kubeshift_lab::down::bpffs_dir(lab).join("node-1"));
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let log = std::env::temp_dir().join(format!("kubeshift-rss-{label}-{round}.log"));
    let started = Instant::now();
    let agent = AgentProc(
        Command::new(bin)
            .args(["agent", "--node", "node-1", "--metrics", &addr])
            .arg("--kubeconfig")
            .arg(kubeshift_lab::up::kubeconfig_path(lab))
            .arg("--netns")
            .arg(Path::new("/run/netns").join(format!("ks-{lab}-node-1")))
            .arg("--cgroup")
            .arg(&node_cgroup)
            .arg("--bpffs")
            .arg(&pins.0)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the agent"),
    );
    let pid = agent.0.id();
    let want_backends = services * eps;
    eventually(
        &format!("{label}: agent ready with {ports} ports (log {})", log.display()),
        Duration::from_secs(900),
        || {
            let a = addr.clone();
            async move {
                Ok(metrics(&a).ok().filter(|m| {
                    metric(m, "kubeshift_agent_ready") == Some(1.0)
                        && metric(m, "kubeshift_agent_service_ports").is_some_and(|v| v as usize == ports)
                        && metric(m, "kubeshift_agent_backends").is_some_and(|v| v as usize >= want_backends)
                }))
            }
        },
    )
    .await;
    let ready_s = started.elapsed().as_secs_f64();
    let (mut rss, mut anon) = (Vec::new(), Vec::new());
    let mut last = BTreeMap::new();
    for k in 0..samples {
        if k > 0 {
            // Sampling period, not synchronisation: the agent is ready, this watches it idle.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        last = proc_status(pid);
        rss.push(last["VmRSS"]);
        anon.push(last["RssAnon"]);
    }
    drop(agent);
    drop(pins);
    let run = Run { label: label.to_string(), ready_s, rss, anon, hwm: last["VmHWM"], threads: last["Threads"] };
    eprintln!(
        "{label} round {round}: ready after {ready_s:.1} s; VmRSS median {} KiB (min {}, max {}), RssAnon median {} KiB, VmHWM {} KiB, {} threads",
        median(&run.rss),
        run.rss.iter().min().unwrap(),
        run.rss.iter().max().unwrap(),
        median(&run.anon),
        run.hwm,
        run.threads
    );
    run
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: 10-20 minutes, prints a table"]
async fn agent_rss_at_10k_services() {
    let services = env_or("KS_RSS_SERVICES", 10_000usize);
    let eps = env_or("KS_RSS_ENDPOINTS", 4usize);
    let pods = env_or("KS_RSS_PODS", 1_000usize);
    let samples = env_or("KS_RSS_SAMPLES", 10usize);
    let rounds = env_or("KS_RSS_ROUNDS", 2usize);
    let agents: Vec<(String, PathBuf)> = match std::env::var("KS_RSS_AGENTS") {
        Ok(v) => v
            .split(',')
            .map(|a| {
                let (l, p) = a.split_once('=').unwrap_or_else(|| panic!("KS_RSS_AGENTS: {a}: want label=path"));
                assert!(Path::new(p).exists(), "KS_RSS_AGENTS: {p} does not exist");
                (l.to_string(), PathBuf::from(p))
            })
            .collect(),
        Err(_) => vec![("test".into(), PathBuf::from(env!("CARGO_BIN_EXE_kubeshift")))],
    };
    // Our own lab is torn down by its guard, also when this test fails.
    let (name, _guard) = match std::env::var("KS_RSS_LAB") {
        Ok(n) => (n, None),
        Err(_) => ("mem".to_string(), Some(Lab::up("mem", &["--nodes", "1", "--cni", "flannel", "--no-demo"]))),
    };
    let client = kubeshift_lab::api::client_from(&kubeshift_lab::up::kubeconfig_path(&name)).await.expect("lab client");
    // The measured node is a migrated one. With kube-proxy still on it, every write below
    // would start an iptables sync of ~10 minutes at 10,000 × 4 (BASELINE.md), on the
    // cores the agent is measured on.
    // A handle for the helpers only: a lab given by KS_RSS_LAB is not ours to tear down.
    let handle = std::mem::ManuallyDrop::new(Lab::named(&name));
    take_kube_proxy_off(&handle, &client, "node-1").await;
    populate(&client, services, eps, pods).await;
    let ports = expected_ports(&client).await;
    eprintln!(
        "{} load average {}: {services} services × {eps} endpoints, {pods} pods, {ports} service ports in the API",
        utc_now(),
        loadavg()
    );

    let csv = std::env::var("KS_RSS_CSV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/agent-rss.csv"));
    let mut out = String::from(
        "utc,label,round,services,endpoints_per_service,pods,ready_s,vmrss_median_kib,vmrss_min_kib,vmrss_max_kib,rssanon_median_kib,vmhwm_kib,threads,loadavg_1m,loadavg_5m,loadavg_15m\n",
    );
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for (label, bin) in &agents {
            let r = measure(&name, label, bin, round, services, eps, ports, samples).await;
            out.push_str(&format!(
                "{},{label},{round},{services},{eps},{pods},{:.1},{},{},{},{},{},{},{}\n",
                utc_now(),
                r.ready_s,
                median(&r.rss),
                r.rss.iter().min().unwrap(),
                r.rss.iter().max().unwrap(),
                median(&r.anon),
                r.hwm,
                r.threads,
                loadavg().replace(' ', ",")
            ));
            std::fs::write(&csv, &out).unwrap();
            runs.push(r);
        }
    }
    println!("| agent build | runs | ready after (s) | VmRSS median MiB (all samples) | RssAnon median MiB | VmHWM MiB (median of runs) |");
    println!("|---|---|---|---|---|---|");
    for (label, _) in &agents {
        let mine: Vec<&Run> = runs.iter().filter(|r| &r.label == label).collect();
        let rss: Vec<u64> = mine.iter().flat_map(|r| r.rss.iter().copied()).collect();
        let anon: Vec<u64> = mine.iter().flat_map(|r| r.anon.iter().copied()).collect();
        let hwm: Vec<u64> = mine.iter().map(|r| r.hwm).collect();
        let ready: Vec<String> = mine.iter().map(|r| format!("{:.0}", r.ready_s)).collect();
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            mine.len(),
            ready.join(", "),
            mib(median(&rss)),
            mib(median(&anon)),
            mib(median(&hwm))
        );
    }
    eprintln!("rows in {}", csv.display());
}

fn utc_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
