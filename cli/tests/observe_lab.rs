//! `kubeshift observe` against a real agent on a real lab: a pod on node-1 connects to
//! ClusterIP Services through the agent's socket load balancer (kube-proxy taken off
//! node-1), and the flows come back through the agent's `/flows` with the Service, the
//! source pod (found from the event's netns cookie) and the destination pod.

mod common;

use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::Api;
use kubeshift_datapath::agent::flows::{FlowKind, FlowProtocol, FlowRecord, FlowVerdict};
use serde_json::json;
use std::io::BufRead;
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const NS: &str = "obs";

/// `kubeshift observe -o json …` once; the records it printed.
fn observe(addr: &str, args: &[&str]) -> Vec<FlowRecord> {
    let out = run_ok(kubeshift().args(["observe", "--server", addr, "-o", "json"]).args(args));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a flow record ({e}): {l}")))
        .collect()
}

/// A `kubeshift observe --follow` child; killed by its PID when dropped.
struct Follower {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

fn lines_of(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

impl Follower {
    fn spawn(addr: &str, args: &[&str]) -> Follower {
        let mut child = kubeshift()
            .args(["observe", "--server", addr, "--follow", "-o", "json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kubeshift observe --follow");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Follower { child, stdout, stderr }
    }

    /// Until it says it follows: from then on the agent sends it every new flow.
    fn await_following(&self) {
        loop {
            match self.stderr.recv_timeout(Duration::from_secs(30)) {
                Ok(l) if l.contains("observe: following") => return,
                Ok(_) => {}
                Err(e) => panic!("observe --follow never said it follows: {e}"),
            }
        }
    }

    fn next(&self) -> FlowRecord {
        let l = self.stdout.recv_timeout(Duration::from_secs(30)).expect("a line from observe --follow");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not a flow record ({e}): {l}"))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
                                        "args": ["netexec", "--http-port=8080"],
                                        "ports": [{"name": "http", "containerPort": 8080}],
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
    create(&svcs, json!({"metadata": {"name": "echo"}, "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})).await;
    create(&svcs, json!({"metadata": {"name": "empty"}, "spec": {"selector": {"app": "nothing"}, "ports": [{"port": 80, "targetPort": 8080}]}})).await;
}

async fn cluster_ip(client: &kube::Client, name: &str) -> Ipv4Addr {
    let s = Api::<Service>::namespaced(client.clone(), NS).get(name).await.unwrap();
    s.spec.unwrap().cluster_ip.unwrap().parse().unwrap()
}

fn free_addr() -> String {
    // Bound and released: nothing listens there afterwards.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn unreachable_agent_and_bad_flags_fail_clearly() {
    let addr = free_addr();
    let out = kubeshift().args(["observe", "--server", &addr, "--last", "5"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("agent at {addr}")) && err.contains("cannot connect"), "{err}");

    let out = kubeshift().args(["observe", "--server", &addr, "--follow"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(&addr));

    for (flag, bad) in [("--from-pod", "a/b/c"), ("--verdict", "DENIED"), ("--to-label", "app"), ("--protocol", "sctp")]
    {
        let out = kubeshift().args(["observe", "--server", &addr, flag, bad]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(flag) && err.contains(bad), "{flag} {bad}: {err}");
    }
}

fn time_of(r: &FlowRecord) -> k8s_openapi::jiff::Timestamp {
    r.time.parse().unwrap_or_else(|e| panic!("time {:?}: {e}", r.time))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_flows_of_a_pod_on_the_lab() {
    let lab = Lab::up("obs", &["--nodes", "2", "--cni", "flannel", "--no-demo"]);
    let client = lab.client().await;
    deploy(&client).await;
    let backend = eventually("the echo backend", Duration::from_secs(60), || ready_pod(&client, NS, "app=echo")).await;
    let client_pod =
        eventually("the client pod", Duration::from_secs(60), || ready_pod(&client, NS, "app=client")).await;
    let backend_name = backend.metadata.name.clone().unwrap();
    let backend_ip: std::net::IpAddr = backend.status.as_ref().unwrap().pod_ip.as_ref().unwrap().parse().unwrap();
    let client_ip: std::net::IpAddr = client_pod.status.as_ref().unwrap().pod_ip.as_ref().unwrap().parse().unwrap();
    let echo_ip = cluster_ip(&client, "echo").await;
    let empty_ip = cluster_ip(&client, "empty").await;
    let pod_cgroup = kubeshift_lab::down::cgroup_dir(&lab.name)
        .unwrap()
        .join("node-1")
        .join(format!("pod-{}", client_pod.metadata.uid.as_deref().unwrap()));
    let pod_ns = pod_netns(&lab.name, &client_pod);

    let (agent, pins, addr) = start_agent(&lab, "node-1").await;
    take_kube_proxy_off(&lab, &client, "node-1").await;
    let (cg, ns) = (pod_cgroup.clone(), pod_ns.clone());
    let get = move || http(&cg, &ns, echo_ip, 80);
    let want = Reply::Ok(backend_name.clone());
    await_reply("echo through the agent's datapath", &get, |r| *r == want).await;

    // The connection's flow, found by its source pod.
    let flow = eventually("the echo flow in observe", Duration::from_secs(30), || async {
        let flows = observe(&addr, &["--last", "50", "--from-pod", "obs/client"]);
        Ok(flows
            .into_iter()
            .rev()
            .find(|r| r.verdict == FlowVerdict::Forwarded && r.service.as_ref().is_some_and(|s| s.name == "echo")))
    })
    .await;
    assert_eq!(flow.kind, FlowKind::SockLb);
    assert_eq!(flow.node, "node-1");
    assert_eq!(flow.protocol, Some(FlowProtocol::Tcp));
    let svc = flow.service.as_ref().unwrap();
    assert_eq!((svc.namespace.as_str(), svc.ip, svc.port), (NS, std::net::IpAddr::V4(echo_ip), 80));
    assert_eq!((flow.source.namespace.as_deref(), flow.source.pod.as_deref()), (Some(NS), Some("client")));
    assert_eq!(flow.source.ip, Some(client_ip));
    assert_eq!(flow.source.labels.get("app").map(String::as_str), Some("client"));
    assert_eq!(
        (flow.destination.namespace.as_deref(), flow.destination.pod.as_deref()),
        (Some(NS), Some(backend_name.as_str()))
    );
    assert_eq!((flow.destination.ip, flow.destination.port), (Some(backend_ip), Some(8080)));
    assert_eq!(flow.destination.labels.get("app").map(String::as_str), Some("echo"));
    let id = flow.socket_cookie;

    // The same flow as a readable line.
    let out = run_ok(kubeshift().args([
        "observe",
        "--server",
        &addr,
        "--last",
        "1",
        "--type",
        "sock-lb",
        "--from-pod",
        "obs/client",
        "--to-pod",
        "obs/echo",
    ]));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("compact: {line}");
    assert!(
        line.contains(&format!(
            "[node-1 sock-lb] obs/client -> obs/{backend_name}:8080 service obs/echo ({echo_ip}:80) TCP FORWARDED"
        )),
        "{line}"
    );

    // Each filter keeps the flow when it should and drops it when it should not.
    let has = |args: &[&str]| {
        let mut a = vec!["--last", "4096"];
        a.extend_from_slice(args);
        observe(&addr, &a).iter().any(|r| r.socket_cookie == id)
    };
    for args in [
        &["--verdict", "FORWARDED"][..],
        &["--from-pod", "obs/cli"],
        &["--to-pod", "obs/echo"],
        &["--from-label", "app=client", "--to-label", "app=echo"],
        &["--port", "8080"],
        &["--port", "80"],
        &["--protocol", "tcp"],
        &["--type", "sock-lb"],
    ] {
        assert!(has(args), "{args:?} should show the flow");
    }
    for args in [
        &["--verdict", "DROPPED"][..],
        &["--from-pod", "obs/echo"],
        &["--from-pod", "default/client"],
        &["--to-pod", "obs/client"],
        &["--from-label", "app=client", "--from-label", "tier=web"],
        &["--to-label", "app=client"],
        &["--port", "9"],
        &["--protocol", "udp"],
        &["--type", "policy"],
    ] {
        assert!(!has(args), "{args:?} should not show the flow");
    }

    // The same connection as the NetworkPolicy programs on the client's veth saw it
    // (no policy here, so allowed): pod IPs on the wire, both identities.
    let p = eventually("a policy flow of the client's connection", Duration::from_secs(30), || async {
        Ok(observe(
            &addr,
            &[
                "--last",
                "4096",
                "--type",
                "policy",
                "--from-pod",
                "obs/client",
                "--to-pod",
                "obs/echo",
                "--port",
                "8080",
            ],
        )
        .pop())
    })
    .await;
    assert_eq!((p.kind, p.verdict), (FlowKind::Policy, FlowVerdict::Forwarded), "{p:?}");
    assert!(p.source.identity.is_some() && p.destination.identity.is_some(), "{p:?}");

    // A Service without endpoints: refused, and DROPPED with the reason.
    assert_eq!(tcp_connect(&pod_cgroup, &pod_ns, empty_ip, 80), Reply::Refused);
    let dropped = eventually("the refused flow in observe", Duration::from_secs(30), || async {
        let flows = observe(&addr, &["--last", "50", "--verdict", "DROPPED"]);
        Ok(flows.into_iter().rev().find(|r| r.service.as_ref().is_some_and(|s| s.name == "empty")))
    })
    .await;
    assert_eq!(dropped.drop_reason.as_deref(), Some("no-endpoints"));
    assert_eq!(dropped.source.pod.as_deref(), Some("client"));
    assert_eq!(
        (dropped.destination.ip, dropped.destination.port, dropped.destination.pod.as_ref()),
        (Some(std::net::IpAddr::V4(empty_ip)), Some(80), None)
    );

    // --follow prints flows made after it started, filtered: the DROPPED follower's first
    // line is the refusal even though the forwarded flow was made before it.
    let forwarded = Follower::spawn(&addr, &["--type", "sock-lb", "--from-pod", "obs/client", "--to-pod", "obs/echo"]);
    let drops = Follower::spawn(&addr, &["--type", "sock-lb", "--verdict", "DROPPED", "--from-pod", "obs/client"]);
    forwarded.await_following();
    drops.await_following();
    let started = k8s_openapi::jiff::Timestamp::now();
    assert_eq!(get(), Reply::Ok(backend_name.clone()));
    assert_eq!(tcp_connect(&pod_cgroup, &pod_ns, empty_ip, 80), Reply::Refused);
    let f = forwarded.next();
    assert!(f.socket_cookie != id && f.service.as_ref().unwrap().name == "echo", "{f:?}");
    assert!(
        time_of(&f) >= started - Duration::from_millis(50),
        "{} is before the follower started ({started})",
        f.time
    );
    let d = drops.next();
    assert_eq!((d.verdict, d.service.as_ref().unwrap().name.as_str()), (FlowVerdict::Dropped, "empty"), "{d:?}");
    assert!(time_of(&d) > time_of(&f));
    drop((forwarded, drops));

    // What a user sees (the README's example comes from here).
    let out = run_ok(kubeshift().args(["observe", "--server", &addr, "--last", "4", "--from-pod", "obs/client"]));
    eprintln!("example, compact:\n{}", String::from_utf8_lossy(&out.stdout));
    let out =
        run_ok(kubeshift().args(["observe", "--server", &addr, "--last", "1", "--verdict", "DROPPED", "-o", "json"]));
    eprintln!("example, json:\n{}", String::from_utf8_lossy(&out.stdout));

    let m = metrics(&addr).unwrap();
    let count = |v: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with("kubeshift_agent_flows_total{") && l.contains(&format!("verdict=\"{v}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no kubeshift_agent_flows_total{{verdict={v}}}: {m}"))
    };
    assert!(count("FORWARDED") >= 2.0 && count("DROPPED") >= 2.0, "{m}");

    agent.stop();
    let dir = pins.0.clone();
    drop(pins);
    assert!(!dir.exists(), "pins left at {}", dir.display());
    let left = lab.down();
    assert!(left.is_empty(), "lab left {left:?}");
}
