//! `kubeshift agent` on a real lab: node-1's kube-proxy is taken out the way a migration
//! does it, and a pod on node-1 keeps reaching a ClusterIP Service whose backend runs on
//! node-2, now through the eBPF socket load balancer the agent keeps in sync.
//!
//! The client runs as a child process (curl, or bash for UDP) that joins the client
//! pod's cgroup and network namespace before exec: the socket hooks are attached to
//! node-1's cgroup, and cgroup membership is per process, so a thread of this test
//! could not be load-balanced without moving the whole test binary.

mod common;

use common::*;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const NS: &str = "dp";

/// Connected UDP (bash's /dev/udp connects the socket); dd reads one whole datagram.
fn udp(pod_cgroup: &Path, pod_netns: &str, vip: Ipv4Addr, port: u16) -> Reply {
    let script =
        format!("exec 3<>/dev/udp/{vip}/{port} && printf hostname >&3 && timeout 3 dd bs=1500 count=1 <&3 2>/dev/null");
    from_pod(pod_cgroup, pod_netns, &["bash", "-c", &script])
}

/// Service VIPs in the pinned ks_services map (first 4 key bytes, network order).
fn pinned_vips(pins: &Path) -> Vec<Ipv4Addr> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.join("maps/ks_services"))
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let k: Vec<u8> = e["key"].as_array().unwrap()[..4]
                .iter()
                .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
                .collect();
            Ipv4Addr::new(k[0], k[1], k[2], k[3])
        })
        .collect()
}

async fn deploy(client: &kube::Client) {
    create(&Api::<Namespace>::all(client.clone()), json!({"metadata": {"name": NS}})).await;
    create(
        &Api::<Deployment>::namespaced(client.clone(), NS),
        json!({
            "metadata": {"name": "echo"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "echo"}},
                "template": {
                    "metadata": {"labels": {"app": "echo"}},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": "node-2"},
                        "containers": [{"name": "echo", "image": "registry.k8s.io/e2e-test-images/agnhost:2.39",
                                        "args": ["netexec", "--http-port=8080", "--udp-port=8081"],
                                        "ports": [{"name": "http", "containerPort": 8080},
                                                  {"name": "udp", "containerPort": 8081, "protocol": "UDP"}],
                                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}}}]
                    }
                }
            }
        }),
    )
    .await;
    create(
        &Api::<Pod>::namespaced(client.clone(), NS),
        json!({
            "metadata": {"name": "client", "labels": {"app": "client"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]}
        }),
    )
    .await;
    let svcs = Api::<Service>::namespaced(client.clone(), NS);
    create(
        &svcs,
        json!({
            "metadata": {"name": "echo"},
            "spec": {"selector": {"app": "echo"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "udp", "port": 81, "targetPort": "udp", "protocol": "UDP"}]}
        }),
    )
    .await;
    create(
        &svcs,
        json!({
            "metadata": {"name": "empty"},
            "spec": {"selector": {"app": "nothing"}, "ports": [{"port": 80, "targetPort": 8080}]}
        }),
    )
    .await;
}

async fn cluster_ip(client: &kube::Client, name: &str) -> Ipv4Addr {
    let s = Api::<Service>::namespaced(client.clone(), NS).get(name).await.unwrap();
    s.spec.unwrap().cluster_ip.unwrap().parse().unwrap()
}

fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap()
}

async fn set_replicas(client: &kube::Client, n: i32) {
    Api::<Deployment>::namespaced(client.clone(), NS)
        .patch("echo", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": n}})))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_replaces_kube_proxy_on_node_1() {
    let lab = Lab::up("dpl", &["--nodes", "2", "--cni", "flannel", "--no-demo"]);
    let client = lab.client().await;
    deploy(&client).await;

    let backend = eventually("the echo backend", Duration::from_secs(60), || ready_pod(&client, NS, "app=echo")).await;
    let client_pod =
        eventually("the client pod", Duration::from_secs(60), || ready_pod(&client, NS, "app=client")).await;
    let echo_ip = cluster_ip(&client, "echo").await;
    let empty_ip = cluster_ip(&client, "empty").await;
    let lab_cgroup = kubeshift_lab::down::cgroup_dir(&lab.name).unwrap();
    let node_cgroup = lab_cgroup.join("node-1");
    let pod_cgroup = node_cgroup.join(format!("pod-{}", client_pod.metadata.uid.as_deref().unwrap()));
    assert!(pod_cgroup.join("cgroup.procs").exists(), "no cgroup {}", pod_cgroup.display());
    let pod_ns = pod_netns(&lab.name, &client_pod);
    let (cg, ns) = (pod_cgroup.clone(), pod_ns.clone());
    let get = move || http(&cg, &ns, echo_ip, 80);
    let (cg, ns) = (pod_cgroup.clone(), pod_ns.clone());
    let connect = move || tcp_connect(&cg, &ns, echo_ip, 80);

    // Before anything changes, kube-proxy serves the Service.
    let r = await_reply("kube-proxy to serve echo", &get, |r| matches!(r, Reply::Ok(_))).await;
    assert_eq!(r, Reply::Ok(pod_name(&backend)));

    let pins_dir = kubeshift_lab::down::bpffs_dir(&lab.name).join("node-1");
    let _pins = Pins(pins_dir.clone());
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let agent = Agent::start(&lab, &node_cgroup, &pins_dir, &metrics_addr);
    let m = eventually("the agent's first reconcile", Duration::from_secs(60), || {
        let a = metrics_addr.clone();
        async move { Ok(metrics(&a).ok().filter(|m| metric(m, "kubeshift_agent_synced") == Some(1.0))) }
    })
    .await;
    // default/kubernetes, echo tcp + udp, empty.
    assert!(metric(&m, "kubeshift_agent_service_ports").unwrap() >= 4.0, "{m}");
    assert!(m.contains("endpoints_api=\"discovery.k8s.io/v1beta1\""), "1.20 serves EndpointSlice v1beta1 only: {m}");
    let vips = pinned_vips(&pins_dir);
    assert!(vips.contains(&echo_ip) && vips.contains(&empty_ip), "{vips:?}");

    // Migration step: no kube-proxy on node-1, and its service rules gone.
    take_kube_proxy_off(&lab, &client, "node-1").await;
    let rules = lab.iptables_save("node-1");
    assert!(!rules.contains("-A KUBE-SERVICES"), "KUBE-SERVICES still has rules:\n{rules}");

    // TCP and UDP through the agent's datapath.
    let want = Reply::Ok(pod_name(&backend));
    await_reply("TCP without kube-proxy", &get, |r| *r == want).await;
    await_reply("UDP without kube-proxy", || udp(&pod_cgroup, &pod_ns, echo_ip, 81), |r| *r == want).await;
    // No endpoints: refused, like kube-proxy's REJECT.
    assert_eq!(tcp_connect(&pod_cgroup, &pod_ns, empty_ip, 80), Reply::Refused);

    // Endpoint change: the backend pod is replaced (new pod IP).
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    pods.delete(&pod_name(&backend), &DeleteParams::default()).await.unwrap();
    let second = eventually("a replacement backend", Duration::from_secs(60), || async {
        Ok(ready_pod(&client, NS, "app=echo").await?.filter(|p| p.metadata.uid != backend.metadata.uid))
    })
    .await;
    let want = Reply::Ok(pod_name(&second));
    await_reply("the replacement to serve", &get, |r| *r == want).await;

    // Scaled to zero: refused; back to one: served by the new pod.
    set_replicas(&client, 0).await;
    await_reply("echo without endpoints to be refused", &connect, |r| *r == Reply::Refused).await;
    set_replicas(&client, 1).await;
    let third = eventually("a new backend", Duration::from_secs(60), || async {
        Ok(ready_pod(&client, NS, "app=echo").await?.filter(|p| p.metadata.uid != second.metadata.uid))
    })
    .await;
    let want = Reply::Ok(pod_name(&third));
    await_reply("the scaled-up backend to serve", &get, |r| *r == want).await;

    // Agent restart: the pinned datapath serves while no agent runs; a Service deleted
    // meanwhile is removed from the maps by the restarted agent's reconcile.
    let before = metric(&metrics(&metrics_addr).unwrap(), "kubeshift_agent_service_ports").unwrap();
    agent.stop();
    for _ in 0..20 {
        assert_eq!(get(), want, "traffic while the agent is stopped");
    }
    Api::<Service>::namespaced(client.clone(), NS).delete("empty", &DeleteParams::default()).await.unwrap();
    let agent = Agent::start(&lab, &node_cgroup, &pins_dir, &metrics_addr);
    let m = eventually("the restarted agent's reconcile", Duration::from_secs(60), || {
        let a = metrics_addr.clone();
        async move { Ok(metrics(&a).ok().filter(|m| metric(m, "kubeshift_agent_synced") == Some(1.0))) }
    })
    .await;
    assert_eq!(metric(&m, "kubeshift_agent_service_ports"), Some(before - 1.0), "{m}");
    let vips = pinned_vips(&pins_dir);
    assert!(!vips.contains(&empty_ip) && vips.contains(&echo_ip), "stale service left in the maps: {vips:?}");
    // Awaited rather than asserted once: on a loaded machine the lab's readiness probe can
    // time out, and a not-ready backend rightly leaves the maps (writes=2 seen once).
    await_reply("an answer after the restart", &get, |r| *r == want).await;

    // And the restarted agent follows endpoint changes.
    pods.delete(&pod_name(&third), &DeleteParams::default()).await.unwrap();
    let fourth = eventually("another replacement", Duration::from_secs(60), || async {
        Ok(ready_pod(&client, NS, "app=echo").await?.filter(|p| p.metadata.uid != third.metadata.uid))
    })
    .await;
    let want = Reply::Ok(pod_name(&fourth));
    await_reply("the restarted agent to follow", &get, |r| *r == want).await;
    let m = metrics(&metrics_addr).unwrap();
    assert_eq!(metric(&m, "kubeshift_agent_sync_errors_total"), Some(0.0), "{m}");

    agent.stop();
    drop(_pins);
    assert!(!pins_dir.exists(), "pins left at {}", pins_dir.display());
    let left = lab.down();
    assert!(left.is_empty(), "lab left {left:?}");
}

// --- Benchmark: kube-proxy (iptables) vs the agent's datapath, same lab, same run ---------
//
// `cargo test -p kubeshift --test datapath_lab bench -- --ignored --nocapture`
// (KS_BENCH_SIZES=10,1000,5000,10000,10000x4, KS_BENCH_COUNT=2000,
// KS_BENCH_IPTABLES=nft|legacy, KS_BENCH_CSV=path; needs `cargo build -p
// kubeshift-datapath` for kubeshift-dp-probe). Method in BENCHMARKS.md.

const BENCH_NS: &str = "bench";
/// Backends b1..b4 serve the rows (b1 alone, or all four); b5 is what one endpoint
/// change swaps in, so "served" means an answer from a pod that was not a backend before.
const BACKENDS: [&str; 5] = ["b1", "b2", "b3", "b4", "b5"];

/// One row: `n` services with `eps` endpoints each.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Size {
    n: usize,
    eps: usize,
}

fn parse_sizes(s: &str) -> Vec<Size> {
    s.split(',')
        .map(|t| match t.split_once(['x', '×']) {
            Some((n, e)) => Size { n: n.trim().parse().unwrap(), eps: e.trim().parse().unwrap() },
            None => Size { n: t.trim().parse().unwrap(), eps: 1 },
        })
        .collect()
}

/// Which iptables node-1's kube-proxy runs. kube-proxy 1.20 uses whatever
/// `iptables-restore` is first on its PATH; the machine's default is the nft backend.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
    fn bin(self, tool: &str) -> String {
        match self {
            Backend::Nft => tool.to_string(),
            Backend::Legacy => tool.replacen("tables", "tables-legacy", 1),
        }
    }
}

fn iptables_save_with(lab: &Lab, backend: Backend) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.node_netns("node-1")])
        .arg(backend.bin("iptables-save"))
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables-save: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tolerates a missing chain (`flush_chain` says why): after the switch to the legacy
/// backend the nft chains are those of kube-proxies that may have been replaced before
/// their first sync.
fn flush_kube_services(lab: &Lab, node: &str, backend: Backend) {
    for table in ["nat", "filter"] {
        flush_chain(&lab.node_netns(node), &backend.bin("iptables"), table, "KUBE-SERVICES");
    }
}

/// A PATH directory whose iptables tools are the legacy ones; removed when dropped
/// (after the lab, whose kube-proxy pods point at it).
struct LegacyPath(std::path::PathBuf);

impl LegacyPath {
    fn new() -> LegacyPath {
        let dir = std::env::temp_dir().join("kubeshift-dpb-legacy-iptables");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for t in ["iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"] {
            std::os::unix::fs::symlink(format!("/usr/sbin/{}", Backend::Legacy.bin(t)), dir.join(t)).unwrap();
        }
        LegacyPath(dir)
    }
}

impl Drop for LegacyPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Restarts the lab's kube-proxies with the legacy iptables tools first on PATH (as
/// iptables-wrapper would choose on a legacy host) and removes the service rules the nft
/// kube-proxy left: with both, every packet would walk two rule sets.
async fn kube_proxy_to_legacy(lab: &Lab, client: &kube::Client, dir: &Path) {
    let path = format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", dir.display());
    Api::<DaemonSet>::namespaced(client.clone(), "kube-system")
        .patch(
            "kube-proxy",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "kube-proxy", "env": [{"name": "PATH", "value": path}]}]}}}})),
        )
        .await
        .unwrap();
    let p = path.clone();
    eventually("kube-proxy on node-1 restarted with legacy iptables", Duration::from_secs(180), || {
        let p = p.clone();
        async move {
            let pods = Api::<Pod>::namespaced(client.clone(), "kube-system")
                .list(&ListParams::default().labels("k8s-app=kube-proxy"))
                .await?;
            let on_new = pods.items.iter().all(|pod| {
                let env =
                    pod.spec.as_ref().map(|s| s.containers[0].env.clone().unwrap_or_default()).unwrap_or_default();
                env.iter().any(|e| e.name == "PATH" && e.value.as_deref() == Some(&p))
                    && pod.metadata.deletion_timestamp.is_none()
            });
            let ready = iptables_save_with(lab, Backend::Legacy).contains("-j KUBE-NODEPORTS");
            Ok((on_new && pods.items.len() == 2 && ready).then_some(()))
        }
    })
    .await;
    for node in ["node-1", "node-2"] {
        flush_kube_services(lab, node, Backend::Nft);
    }
}

fn slice_api(client: &kube::Client) -> Api<kube::api::DynamicObject> {
    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
        "endpointslices",
    );
    Api::namespaced_with(client.clone(), BENCH_NS, &ar)
}

fn endpoints_json(ips: &[String]) -> serde_json::Value {
    ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect()
}

fn slice_json(i: usize, ips: &[String]) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}"), "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "endpoints": endpoints_json(ips),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// Services s{from}..s{to} without selector, each with a hand-written slice to `ips`.
async fn create_services(client: &kube::Client, from: usize, to: usize, ips: &[String]) {
    use futures::StreamExt;
    let svcs = Api::<Service>::namespaced(client.clone(), BENCH_NS);
    let slices = slice_api(client);
    futures::stream::iter(from..to)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            async move {
                let s: Service = serde_json::from_value(json!({"metadata": {"name": format!("s{i}")},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
                .unwrap();
                svcs.create(&PostParams::default(), &s).await.expect("create service");
                let o: kube::api::DynamicObject = serde_json::from_value(slice_json(i, ips)).unwrap();
                slices.create(&PostParams::default(), &o).await.expect("create slice");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// Points the slices of s{from}..s{to} at `ips` (a merge patch replaces the list).
async fn set_endpoints(client: &kube::Client, from: usize, to: usize, ips: &[String]) {
    use futures::StreamExt;
    let slices = slice_api(client);
    let patch = Patch::Merge(json!({"endpoints": endpoints_json(ips)}));
    futures::stream::iter(from..to)
        .map(|i| {
            let (slices, patch) = (slices.clone(), &patch);
            async move {
                slices.patch(&format!("s{i}"), &PatchParams::default(), patch).await.expect("patch slice");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

async fn delete_services(client: &kube::Client, from: usize, to: usize) {
    use futures::StreamExt;
    let svcs = Api::<Service>::namespaced(client.clone(), BENCH_NS);
    let slices = slice_api(client);
    futures::stream::iter(from..to)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            async move {
                let _ = slices.delete(&format!("s{i}"), &DeleteParams::default()).await;
                svcs.delete(&format!("s{i}"), &DeleteParams::default()).await.expect("delete service");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// From node-1's rules: bench services in KUBE-SERVICES in rule order (service, VIP),
/// and the number of KUBE-SVC → KUBE-SEP jumps in their chains (endpoints programmed).
/// The jumps are found by chain name: above 1,000 endpoints kube-proxy 1.20 drops the
/// comments from KUBE-SVC and KUBE-SEP rules.
fn kube_proxy_state(save: &str) -> (Vec<(String, Ipv4Addr)>, usize) {
    let tag = format!("\"{BENCH_NS}/s");
    let mut order = Vec::new();
    let mut chains = std::collections::HashSet::new();
    for l in save.lines().filter(|l| l.starts_with("-A KUBE-SERVICES -d ") && l.contains(&tag)) {
        let Some(vip) = l.split_whitespace().nth(3).and_then(|v| v.trim_end_matches("/32").parse().ok()) else {
            continue;
        };
        let Some(name) = l.split(&format!("{BENCH_NS}/")).nth(1).and_then(|s| s.split(':').next()) else {
            continue;
        };
        let Some(chain) = l.split(" -j ").nth(1).filter(|c| c.starts_with("KUBE-SVC-")) else {
            continue;
        };
        order.push((name.to_string(), vip));
        chains.insert(chain.trim().to_string());
    }
    let seps = save
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("-j KUBE-SEP-"))
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|c| chains.contains(c)))
        .count();
    (order, seps)
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// connect-mix from the client pod: p50/p99 in µs per variant, round-robin interleaved.
/// A variant may be several addresses joined by '+' (the probe rotates through them).
fn connect_mix(cg: &Path, ns: &str, variants: &[String], count: usize) -> Vec<(f64, f64)> {
    let probe = Path::new(env!("CARGO_BIN_EXE_kubeshift")).with_file_name("kubeshift-dp-probe");
    assert!(probe.exists(), "build it first: cargo build -p kubeshift-datapath");
    let mut cmd = Command::new(probe);
    cmd.args(["connect-mix", &variants.join(","), &count.to_string()]);
    kubeshift_lab::sys::confine(&mut cmd, Some(ns), Some(cg)).unwrap();
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut per: Vec<Vec<u64>> = vec![Vec::new(); variants.len()];
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 3 && f[0] == "T" {
            let (i, t): (usize, u64) =
                (f[1].parse().unwrap(), f[2].parse().unwrap_or_else(|_| panic!("connect failed: {l}")));
            per[i].push(t);
        }
    }
    per.iter_mut()
        .map(|v| {
            assert_eq!(v.len(), count, "probe output: {text} {}", String::from_utf8_lossy(&out.stderr));
            (percentile(v, 0.5) as f64 / 1e3, percentile(v, 0.99) as f64 / 1e3)
        })
        .collect()
}

/// Seconds from the PUT of service `i`'s slice with `to` until the client pod gets
/// its first answer from `want` (a pod that was not a backend before) through `vip`.
/// The poller is bash without a fork per round (/dev/tcp, builtins, a 2 ms `read -t`
/// as sleep): about 3–6 ms a round here, and it leaves CPU to kube-proxy's restore.
async fn time_endpoint_change(
    client: &kube::Client,
    cg: &Path,
    ns: &str,
    i: usize,
    vip: Ipv4Addr,
    to: &[String],
    want: &str,
) -> f64 {
    use std::io::BufRead;
    let script = format!(
        "exec 9<> <(:); end=$((SECONDS+900)); while [ $SECONDS -lt $end ]; do r=; \
         if exec 3<>/dev/tcp/{vip}/80; then printf 'GET /hostname HTTP/1.0\\r\\n\\r\\n' >&3; IFS= read -r -d '' -t 3 r <&3; exec 3<&-; fi; \
         r=${{r##*$'\\n'}}; echo \"$EPOCHREALTIME $r\"; [ \"$r\" = \"{want}\" ] && break; read -t 0.002 -u 9; done"
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
    kubeshift_lab::sys::confine(&mut cmd, Some(ns), Some(cg)).unwrap();
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // The poller answers once before the change, so it is running when the clock starts.
    let first = lines.next().unwrap().unwrap();
    assert!(!first.ends_with(want), "already at {want}: {first}");
    let mut o: kube::api::DynamicObject = serde_json::from_value(slice_json(i, to)).unwrap();
    let cur = slice_api(client).get(&format!("s{i}")).await.unwrap();
    o.metadata.resource_version = cur.metadata.resource_version;
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    slice_api(client).replace(&format!("s{i}"), &PostParams::default(), &o).await.unwrap();
    let mut t1 = None;
    for l in lines {
        let l = l.unwrap();
        if l.ends_with(want) {
            t1 = Some(l.split_whitespace().next().unwrap().parse::<f64>().unwrap());
            break;
        }
    }
    let _ = child.wait();
    t1.expect("the change never served") - t0
}

/// The three timed changes of one row (base → spare, back, → spare) and an untimed
/// one back to `base`, so every row starts from the same slices. The closure reads
/// the agent's own sync time after each (None for kube-proxy).
#[allow(clippy::too_many_arguments)] // a bench step's knobs, each named at the one call site
async fn endpoint_changes(
    client: &kube::Client,
    cg: &Path,
    ns: &str,
    i: usize,
    vip: Ipv4Addr,
    base: &[String],
    spare: (&str, &str),
    agent_sync: impl Fn() -> Option<f64>,
) -> (Vec<f64>, Vec<f64>) {
    let mut swapped = base.to_vec();
    *swapped.last_mut().unwrap() = spare.1.to_string();
    let last = BACKENDS[base.len() - 1];
    let (mut e2e, mut agent) = (Vec::new(), Vec::new());
    for (to, want) in [(&swapped, spare.0), (&base.to_vec(), last), (&swapped, spare.0)] {
        e2e.push(time_endpoint_change(client, cg, ns, i, vip, to, want).await);
        agent.extend(agent_sync());
    }
    time_endpoint_change(client, cg, ns, i, vip, base, last).await;
    (e2e, agent)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn utc_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const CSV_HEADER: &str = "utc,datapath,iptables,services,endpoints_per_service,\
clusterip_last_p50_us,clusterip_last_p99_us,clusterip_first_p50_us,clusterip_first_p99_us,pod_ip_p50_us,pod_ip_p99_us,\
change1_ms,change2_ms,change3_ms,agent_sync1_ms,agent_sync2_ms,agent_sync3_ms,setup_s,ready_s,loadavg_1m,loadavg_5m,loadavg_15m";

/// Appends one CSV row as soon as it is measured, so a run cut short keeps its rows.
struct Csv(std::path::PathBuf);

impl Csv {
    fn new() -> Csv {
        let p = std::env::var("KS_BENCH_CSV")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/datapath-vs-kube-proxy.csv"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("{CSV_HEADER}\n")).unwrap();
        eprintln!("writing {}", p.display());
        Csv(p)
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        datapath: &str,
        backend: Backend,
        s: Size,
        r: &[(f64, f64)],
        e2e: &[f64],
        agent: &[f64],
        setup: f64,
        ready: f64,
    ) {
        use std::io::Write;
        let ms = |v: &[f64], k: usize| v.get(k).map(|x| format!("{:.3}", x * 1e3)).unwrap_or_default();
        let line = format!(
            "{},{datapath},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{},{},{},{},{},{setup:.1},{ready:.1},{}",
            utc_now(),
            backend.name(),
            s.n,
            s.eps,
            r[0].0,
            r[0].1,
            r[1].0,
            r[1].1,
            r[2].0,
            r[2].1,
            ms(e2e, 0),
            ms(e2e, 1),
            ms(e2e, 2),
            ms(agent, 0),
            ms(agent, 1),
            ms(agent, 2),
            loadavg().replace(' ', ",")
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(&self.0).unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

fn fmt_changes(v: &[f64]) -> String {
    v.iter()
        .map(|s| if *s >= 1.0 { format!("{s:.1} s") } else { format!("{:.0} ms", s * 1e3) })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: minutes, prints a table"]
async fn bench_datapath_vs_kube_proxy() {
    let sizes = parse_sizes(&std::env::var("KS_BENCH_SIZES").unwrap_or("10,1000".into()));
    let count: usize = std::env::var("KS_BENCH_COUNT").ok().map(|s| s.parse().unwrap()).unwrap_or(2000);
    let backend = match std::env::var("KS_BENCH_IPTABLES").as_deref() {
        Ok("legacy") => Backend::Legacy,
        Ok("nft") | Err(_) => Backend::Nft,
        Ok(o) => panic!("KS_BENCH_IPTABLES={o}: nft or legacy"),
    };
    let csv = Csv::new();
    // Declared before the lab so it outlives the lab's kube-proxies.
    let legacy = (backend == Backend::Legacy).then(LegacyPath::new);
    let lab = Lab::up("dpb", &["--nodes", "2", "--cni", "flannel", "--no-demo"]);
    let client = lab.client().await;
    if let Some(l) = &legacy {
        kube_proxy_to_legacy(&lab, &client, &l.0).await;
    }
    create(&Api::<Namespace>::all(client.clone()), json!({"metadata": {"name": BENCH_NS}})).await;
    // Backends on the client's node: a backend on node-2 would add node-2's kube-proxy
    // rule walk (its PREROUTING sees every SYN) to both datapaths' numbers.
    for name in BACKENDS.iter().copied().chain(["client"]) {
        let spec = if name == "client" {
            json!({"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]})
        } else {
            json!({"nodeName": "node-1", "containers": [{"name": "e", "image": "registry.k8s.io/e2e-test-images/agnhost:2.39",
                "args": ["netexec", "--http-port=8080"], "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]})
        };
        create(
            &Api::<Pod>::namespaced(client.clone(), BENCH_NS),
            json!({"metadata": {"name": name, "labels": {"b": name}}, "spec": spec}),
        )
        .await;
    }
    let mut ips = std::collections::HashMap::new();
    for name in BACKENDS.iter().copied().chain(["client"]) {
        let sel = format!("b={name}");
        let p = eventually(name, Duration::from_secs(60), || ready_pod(&client, BENCH_NS, &sel)).await;
        ips.insert(name, (p.status.as_ref().unwrap().pod_ip.clone().unwrap(), p));
    }
    let ip = |b: &str| ips[b].0.clone();
    let base = |eps: usize| -> Vec<String> { BACKENDS[..eps].iter().map(|b| ip(b)).collect() };
    let spare = (BACKENDS[4], ip(BACKENDS[4]));
    let pod_variant = |eps: usize| base(eps).iter().map(|a| format!("{a}:8080")).collect::<Vec<_>>().join("+");
    let cpod = &ips["client"].1;
    let cg = kubeshift_lab::down::cgroup_dir(&lab.name)
        .unwrap()
        .join("node-1")
        .join(format!("pod-{}", cpod.metadata.uid.as_deref().unwrap()));
    let ns = pod_netns(&lab.name, cpod);
    let mut rows: Vec<String> = Vec::new();
    eprintln!("{} load average {}, kube-proxy iptables backend {}", utc_now(), loadavg(), backend.name());

    // Phase 1: kube-proxy, growing the service count (then the endpoints per service).
    let mut have = Size { n: 0, eps: 1 };
    for &s in &sizes {
        assert!(s.n >= have.n && s.eps >= have.eps, "sizes must grow: {sizes:?}");
        let t = std::time::Instant::now();
        if s.eps != have.eps {
            set_endpoints(&client, 0, have.n, &base(s.eps)).await;
        }
        create_services(&client, have.n, s.n, &base(s.eps)).await;
        have = s;
        let setup = t.elapsed().as_secs_f64();
        // Complete when every bench service has its rule and all its endpoints' jumps;
        // polled every 2 s: iptables-save of 100k+ lines is not free on 2 cores.
        let order = loop {
            let (o, seps) = kube_proxy_state(&iptables_save_with(&lab, backend));
            if o.len() == s.n && seps == s.n * s.eps {
                break o;
            }
            assert!(
                t.elapsed() < Duration::from_secs(3600),
                "kube-proxy never synced {s:?}: {} rules, {seps} endpoint jumps",
                o.len()
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        let ready = t.elapsed().as_secs_f64();
        let (first, last) = (order[0].clone(), order[order.len() - 1].clone());
        let r =
            connect_mix(&cg, &ns, &[format!("{}:80", last.1), format!("{}:80", first.1), pod_variant(s.eps)], count);
        let li: usize = last.0.trim_start_matches('s').parse().unwrap();
        let (ch, _) = endpoint_changes(&client, &cg, &ns, li, last.1, &base(s.eps), (spare.0, &spare.1), || None).await;
        csv.row("kube-proxy", backend, s, &r, &ch, &[], setup, ready);
        let row = format!(
            "| kube-proxy ({}) | {} × {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} (rules present) | {} | set up {setup:.0} s, rules complete {ready:.0} s; load {} |",
            backend.name(),
            s.n,
            s.eps,
            r[0].0,
            r[0].1,
            r[1].0,
            r[1].1,
            r[2].0,
            r[2].1,
            fmt_changes(&ch),
            loadavg()
        );
        eprintln!("{row}");
        rows.push(row);
    }

    // Phase 2: kube-proxy out of node-1, the agent in; shrinking.
    Api::<DaemonSet>::namespaced(client.clone(), "kube-system")
        .patch(
            "kube-proxy",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-1"]}]}]}}}}}}})),
        )
        .await
        .unwrap();
    eventually("kube-proxy to leave node-1", Duration::from_secs(90), || async {
        let pods = Api::<Pod>::namespaced(client.clone(), "kube-system")
            .list(&ListParams::default().labels("k8s-app=kube-proxy"))
            .await?;
        Ok(pods
            .items
            .iter()
            .all(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some("node-1"))
            .then_some(()))
    })
    .await;
    flush_kube_services(&lab, "node-1", backend);
    let node_cgroup = kubeshift_lab::down::cgroup_dir(&lab.name).unwrap().join("node-1");
    let pins_dir = kubeshift_lab::down::bpffs_dir(&lab.name).join("node-1");
    let _pins = Pins(pins_dir.clone());
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let started = std::time::Instant::now();
    let agent = Agent::start(&lab, &node_cgroup, &pins_dir, &metrics_addr);
    let mut sizes_desc = sizes.clone();
    sizes_desc.sort_unstable_by_key(|s| std::cmp::Reverse((s.n, s.eps)));
    for &s in &sizes_desc {
        let t = if s != have {
            let t = std::time::Instant::now();
            if s.n < have.n {
                delete_services(&client, s.n, have.n).await;
            }
            if s.eps != have.eps {
                set_endpoints(&client, 0, s.n, &base(s.eps)).await;
            }
            have = s;
            t
        } else {
            started
        };
        let setup = t.elapsed().as_secs_f64();
        // default/kubernetes is one more port with at most one backend.
        let a = metrics_addr.clone();
        eventually(&format!("the agent to program {s:?}"), Duration::from_secs(1200), || {
            let a = a.clone();
            async move {
                Ok(metrics(&a).ok().filter(|m| {
                    let backends = metric(m, "kubeshift_agent_backends").unwrap_or(0.0) as usize;
                    metric(m, "kubeshift_agent_synced") == Some(1.0)
                        && metric(m, "kubeshift_agent_service_ports").is_some_and(|v| v as usize == s.n + 1)
                        && (backends == s.n * s.eps || backends == s.n * s.eps + 1)
                }))
            }
        })
        .await;
        let ready = t.elapsed().as_secs_f64();
        let vips = [cluster_ip_in(&client, &format!("s{}", s.n - 1)).await, cluster_ip_in(&client, "s0").await];
        let r =
            connect_mix(&cg, &ns, &[format!("{}:80", vips[0]), format!("{}:80", vips[1]), pod_variant(s.eps)], count);
        let m_addr = metrics_addr.clone();
        let agent_sync = move || Some(metric(&metrics(&m_addr).unwrap(), "kubeshift_agent_last_sync_seconds").unwrap());
        let (ch, agent_s) =
            endpoint_changes(&client, &cg, &ns, s.n - 1, vips[0], &base(s.eps), (spare.0, &spare.1), agent_sync).await;
        csv.row("kubeshift", backend, s, &r, &ch, &agent_s, setup, ready);
        let row = format!(
            "| kubeshift | {} × {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} (agent event→maps: {}) | maps complete {ready:.1} s after {}; load {} |",
            s.n,
            s.eps,
            r[0].0,
            r[0].1,
            r[1].0,
            r[1].1,
            r[2].0,
            r[2].1,
            fmt_changes(&ch),
            agent_s.iter().map(|s| format!("{:.2} ms", s * 1e3)).collect::<Vec<_>>().join(", "),
            if t == started { "agent start" } else { "the first API write" },
            loadavg()
        );
        eprintln!("{row}");
        rows.push(row);
    }
    agent.stop();
    println!("| datapath | services × endpoints | ClusterIP, last rule p50 / p99 µs | ClusterIP, first rule p50 / p99 µs | pod IP p50 / p99 µs | one endpoint change, PUT → first answer from the new backend (3 tries) | notes |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}

async fn cluster_ip_in(client: &kube::Client, name: &str) -> Ipv4Addr {
    let s = Api::<Service>::namespaced(client.clone(), BENCH_NS).get(name).await.unwrap();
    s.spec.unwrap().cluster_ip.unwrap().parse().unwrap()
}
