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
    let script = format!("exec 3<>/dev/udp/{vip}/{port} && printf hostname >&3 && timeout 3 dd bs=1500 count=1 <&3 2>/dev/null");
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
    let client_pod = eventually("the client pod", Duration::from_secs(60), || ready_pod(&client, NS, "app=client")).await;
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
// (KS_BENCH_SIZES=10,1000,5000, KS_BENCH_COUNT=2000; needs `cargo build -p
// kubeshift-datapath` for kubeshift-dp-probe). Method in BENCHMARKS.md.

const BENCH_NS: &str = "bench";

fn slice_api(client: &kube::Client) -> Api<kube::api::DynamicObject> {
    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
        "endpointslices",
    );
    Api::namespaced_with(client.clone(), BENCH_NS, &ar)
}

fn slice_json(i: usize, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}"), "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// Services s{from}..s{to} without selector, each with a hand-written slice to `ip`.
async fn create_services(client: &kube::Client, from: usize, to: usize, ip: &str) {
    use futures::StreamExt;
    let svcs = Api::<Service>::namespaced(client.clone(), BENCH_NS);
    let slices = slice_api(client);
    futures::stream::iter(from..to)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            let ip = ip.to_string();
            async move {
                let s: Service = serde_json::from_value(json!({"metadata": {"name": format!("s{i}")},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
                .unwrap();
                svcs.create(&PostParams::default(), &s).await.expect("create service");
                let o: kube::api::DynamicObject = serde_json::from_value(slice_json(i, &ip)).unwrap();
                slices.create(&PostParams::default(), &o).await.expect("create slice");
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

/// Bench services in node-1's KUBE-SERVICES, in rule order: (service, VIP).
fn kube_services_order(lab: &Lab) -> Vec<(String, Ipv4Addr)> {
    lab.iptables_save("node-1")
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES -d ") && l.contains(&format!("{BENCH_NS}/s")))
        .filter_map(|l| {
            let vip = l.split_whitespace().nth(3)?.trim_end_matches("/32").parse().ok()?;
            let name = l.split(&format!("{BENCH_NS}/")).nth(1)?.split(':').next()?.to_string();
            Some((name, vip))
        })
        .collect()
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// connect-mix from the client pod: p50/p99 in µs per address, round-robin interleaved.
fn connect_mix(cg: &Path, ns: &str, addrs: &[String], count: usize) -> Vec<(f64, f64)> {
    let probe = Path::new(env!("CARGO_BIN_EXE_kubeshift")).with_file_name("kubeshift-dp-probe");
    assert!(probe.exists(), "build it first: cargo build -p kubeshift-datapath");
    let mut cmd = Command::new(probe);
    cmd.args(["connect-mix", &addrs.join(","), &count.to_string()]);
    kubeshift_lab::sys::confine(&mut cmd, Some(ns), Some(cg)).unwrap();
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut per: Vec<Vec<u64>> = vec![Vec::new(); addrs.len()];
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 3 && f[0] == "T" {
            let (i, t): (usize, u64) = (f[1].parse().unwrap(), f[2].parse().unwrap_or_else(|_| panic!("connect failed: {l}")));
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

/// Seconds from patching service `i`'s slice to `to_ip` until the client pod gets an
/// answer from `want` through `vip`. The client polls with curl (about 5 ms a round).
async fn time_endpoint_change(client: &kube::Client, cg: &Path, ns: &str, i: usize, vip: Ipv4Addr, to_ip: &str, want: &str) -> f64 {
    use std::io::BufRead;
    let script = format!(
        "end=$((SECONDS+60)); while [ $SECONDS -lt $end ]; do r=$(curl -s --noproxy '*' --max-time 1 http://{vip}:80/hostname); \
         echo \"$EPOCHREALTIME $r\"; [ \"$r\" = \"{want}\" ] && break; done"
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]).stdout(std::process::Stdio::piped());
    kubeshift_lab::sys::confine(&mut cmd, Some(ns), Some(cg)).unwrap();
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // The poller answers once before the change, so it is running when the clock starts.
    let first = lines.next().unwrap().unwrap();
    assert!(!first.ends_with(want), "already at {want}: {first}");
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let mut o: kube::api::DynamicObject = serde_json::from_value(slice_json(i, to_ip)).unwrap();
    let cur = slice_api(client).get(&format!("s{i}")).await.unwrap();
    o.metadata.resource_version = cur.metadata.resource_version;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: minutes, prints a table"]
async fn bench_datapath_vs_kube_proxy() {
    let sizes: Vec<usize> = std::env::var("KS_BENCH_SIZES").unwrap_or("10,1000".into()).split(',').map(|s| s.parse().unwrap()).collect();
    let count: usize = std::env::var("KS_BENCH_COUNT").ok().map(|s| s.parse().unwrap()).unwrap_or(2000);
    let lab = Lab::up("dpb", &["--nodes", "2", "--cni", "flannel", "--no-demo"]);
    let client = lab.client().await;
    create(&Api::<Namespace>::all(client.clone()), json!({"metadata": {"name": BENCH_NS}})).await;
    // Backends on the client's node: a backend on node-2 would add node-2's kube-proxy
    // rule walk (its PREROUTING sees every SYN) to both datapaths' numbers.
    for (name, node) in [("b1", "node-1"), ("b2", "node-1"), ("client", "node-1")] {
        let spec = if name == "client" {
            json!({"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]})
        } else {
            json!({"nodeName": node, "containers": [{"name": "e", "image": "registry.k8s.io/e2e-test-images/agnhost:2.39",
                "args": ["netexec", "--http-port=8080"], "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]})
        };
        create(&Api::<Pod>::namespaced(client.clone(), BENCH_NS), json!({"metadata": {"name": name, "labels": {"b": name}}, "spec": spec})).await;
    }
    let mut ips = std::collections::HashMap::new();
    for name in ["b1", "b2", "client"] {
        let sel = format!("b={name}");
        let p = eventually(name, Duration::from_secs(60), || ready_pod(&client, BENCH_NS, &sel)).await;
        ips.insert(name, (p.status.as_ref().unwrap().pod_ip.clone().unwrap(), p));
    }
    let (b1, b2) = (ips["b1"].0.clone(), ips["b2"].0.clone());
    let cpod = &ips["client"].1;
    let cg = kubeshift_lab::down::cgroup_dir(&lab.name).unwrap().join("node-1").join(format!("pod-{}", cpod.metadata.uid.as_deref().unwrap()));
    let ns = pod_netns(&lab.name, cpod);
    let pod_addr = format!("{b1}:8080");
    let mut rows: Vec<String> = Vec::new();

    // Phase 1: kube-proxy, growing the service count.
    let mut have = 0;
    for &n in &sizes {
        let t = std::time::Instant::now();
        create_services(&client, have, n, &b1).await;
        have = n;
        let created = t.elapsed();
        let order = eventually(&format!("kube-proxy to sync {n} services"), Duration::from_secs(600), || async {
            let o = kube_services_order(&lab);
            Ok((o.len() >= n).then_some(o))
        })
        .await;
        let synced = t.elapsed();
        let (first, last) = (order[0].clone(), order[order.len() - 1].clone());
        let r = connect_mix(&cg, &ns, &[format!("{}:80", last.1), format!("{}:80", first.1), pod_addr.clone()], count);
        let li: usize = last.0.trim_start_matches('s').parse().unwrap();
        let mut ch = Vec::new();
        for (to, want) in [(&b2, "b2"), (&b1, "b1"), (&b2, "b2")] {
            ch.push(time_endpoint_change(&client, &cg, &ns, li, last.1, to, want).await);
        }
        time_endpoint_change(&client, &cg, &ns, li, last.1, &b1, "b1").await;
        let row = format!(
            "| kube-proxy | {n} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} (rules present) | {} | create {:.0} s, synced {:.0} s |",
            r[0].0, r[0].1, r[1].0, r[1].1, r[2].0, r[2].1,
            ch.iter().map(|s| format!("{:.0} ms", s * 1e3)).collect::<Vec<_>>().join(", "),
            created.as_secs_f64(), synced.as_secs_f64()
        );
        eprintln!("{row}");
        rows.push(row);
    }

    // Phase 2: kube-proxy out of node-1, the agent in; shrinking the service count.
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
        let pods = Api::<Pod>::namespaced(client.clone(), "kube-system").list(&ListParams::default().labels("k8s-app=kube-proxy")).await?;
        Ok(pods.items.iter().all(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some("node-1")).then_some(()))
    })
    .await;
    for table in ["nat", "filter"] {
        let out = Command::new("ip").args(["netns", "exec", &lab.node_netns("node-1"), "iptables", "-t", table, "-F", "KUBE-SERVICES"]).output().unwrap();
        assert!(out.status.success());
    }
    let node_cgroup = kubeshift_lab::down::cgroup_dir(&lab.name).unwrap().join("node-1");
    let pins_dir = kubeshift_lab::down::bpffs_dir(&lab.name).join("node-1");
    let _pins = Pins(pins_dir.clone());
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let t = std::time::Instant::now();
    let agent = Agent::start(&lab, &node_cgroup, &pins_dir, &metrics_addr);
    let mut sizes_desc = sizes.clone();
    sizes_desc.sort_unstable_by(|a, b| b.cmp(a));
    for &n in &sizes_desc {
        let t = if n < have {
            delete_services(&client, n, have).await;
            have = n;
            std::time::Instant::now()
        } else {
            t
        };
        let a = metrics_addr.clone();
        eventually(&format!("the agent to program {n} services"), Duration::from_secs(600), || {
            let a = a.clone();
            async move {
                Ok(metrics(&a).ok().filter(|m| {
                    metric(m, "kubeshift_agent_synced") == Some(1.0) && metric(m, "kubeshift_agent_service_ports").is_some_and(|v| v as usize == n + 1)
                }))
            }
        })
        .await;
        let synced = t.elapsed();
        let vips: Vec<Ipv4Addr> = {
            let mut v = Vec::new();
            for i in [n - 1, 0] {
                v.push(cluster_ip_in(&client, &format!("s{i}")).await);
            }
            v
        };
        let r = connect_mix(&cg, &ns, &[format!("{}:80", vips[0]), format!("{}:80", vips[1]), pod_addr.clone()], count);
        let mut ch = Vec::new();
        let mut agent_sync = Vec::new();
        for (to, want) in [(&b2, "b2"), (&b1, "b1"), (&b2, "b2")] {
            ch.push(time_endpoint_change(&client, &cg, &ns, n - 1, vips[0], to, want).await);
            agent_sync.push(metric(&metrics(&metrics_addr).unwrap(), "kubeshift_agent_last_sync_seconds").unwrap());
        }
        time_endpoint_change(&client, &cg, &ns, n - 1, vips[0], &b1, "b1").await;
        let row = format!(
            "| kubeshift | {n} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} (agent event→maps: {}) | programmed {:.1} s after agent start / last delete |",
            r[0].0, r[0].1, r[1].0, r[1].1, r[2].0, r[2].1,
            ch.iter().map(|s| format!("{:.0} ms", s * 1e3)).collect::<Vec<_>>().join(", "),
            agent_sync.iter().map(|s| format!("{:.2} ms", s * 1e3)).collect::<Vec<_>>().join(", "),
            synced.as_secs_f64()
        );
        eprintln!("{row}");
        rows.push(row);
    }
    agent.stop();
    println!("| datapath | services | ClusterIP, last rule p50 / p99 µs | ClusterIP, first rule p50 / p99 µs | pod IP p50 / p99 µs | one endpoint change, patch → served (3 tries) | notes |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}

async fn cluster_ip_in(client: &kube::Client, name: &str) -> Ipv4Addr {
    let s = Api::<Service>::namespaced(client.clone(), BENCH_NS).get(name).await.unwrap();
    s.spec.unwrap().cluster_ip.unwrap().parse().unwrap()
}
