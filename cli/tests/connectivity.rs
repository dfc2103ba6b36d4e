//! `kubeshift connectivity test` on the lab: probe agents in real pods report through
//! the real apiserver; a healthy cluster passes every scenario, a broken one is caught
//! and the broken node is named, and a saved verdict matrix detects a changed verdict.

mod common;

use common::*;
use std::process::Command;

fn connectivity(lab: &Lab, extra: &[&str]) -> std::process::Output {
    kubeshift()
        .args(["connectivity", "test", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .args(["--namespace", "ks-conn"])
        .args(extra)
        .output()
        .expect("running connectivity test")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn in_node(lab: &Lab, node: &str, args: &[&str]) {
    let out = Command::new("ip").args(["netns", "exec", &lab.node_netns(node)]).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?} in {node}: {}", String::from_utf8_lossy(&out.stderr));
}

const POLICY_SCENARIOS: [&str; 6] = [
    "policy-all-ingress-deny",
    "policy-all-egress-deny",
    "policy-allow-from-label",
    "policy-allow-from-namespace",
    "policy-port-restricted",
    "policy-ip-block",
];

const SCENARIOS: [&str; 10] = [
    "pod-to-pod-same-node",
    "pod-to-pod-cross-node",
    "pod-to-service-local",
    "pod-to-service-remote",
    "pod-to-nodeport-local",
    "pod-to-nodeport-remote",
    "host-to-pod",
    "host-to-service",
    "pod-to-host",
    "pod-to-itself-via-service",
];

#[test]
fn flannel_healthy_passes_broken_is_caught_and_matrix_changes_are_listed() {
    let lab = Lab::up("tconnf", &["--nodes", "2", "--no-demo"]);
    let dir = std::env::temp_dir().join(format!("ks-conn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let before = dir.join("before.json");
    let junit = dir.join("junit.xml");

    // Healthy: every scenario passes; the matrix and JUnit are written.
    let o = connectivity(&lab, &["--save", before.to_str().unwrap(), "--junit", junit.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for s in SCENARIOS {
        assert!(t.contains(&format!("PASS {s}")), "{s} did not pass:\n{t}");
    }
    // Flannel enforces no NetworkPolicy: the suite detects it and says so.
    for s in POLICY_SCENARIOS {
        assert!(t.contains(&format!("SKIP {s}")), "{s} was not skipped:\n{t}");
    }
    assert!(t.contains("does not enforce NetworkPolicy"), "{t}");
    assert!(t.contains("10 passed, 0 failed, 6 skipped"), "{t}");
    let j = std::fs::read_to_string(&junit).unwrap();
    assert!(j.contains("tests=\"16\" failures=\"0\" skipped=\"6\""), "{j}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&before).unwrap()).unwrap();
    assert_eq!(m["entries"]["node-1/pod-1 -> node-2/pod-1 8080/tcp"], "allowed");

    // Long-lived connections: a kube-proxy restart on node-1 is hitless; a node that
    // resets forwarded connections breaks exactly the ones through it.
    let o = connectivity(&lab, &["--conn-disrupt-setup", "--test", "^pod-to-pod-same-node$"]);
    assert!(o.status.success() && text(&o).contains("PASS conn-disrupt-setup"), "{}", text(&o));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let c = lab.client().await;
        let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c, "kube-system");
        let lp = kube::api::ListParams::default().labels("k8s-app=kube-proxy").fields("spec.nodeName=node-1");
        let old = pods.list(&lp).await.unwrap().items.remove(0);
        pods.delete(old.metadata.name.as_deref().unwrap(), &Default::default()).await.unwrap();
        eventually("a new kube-proxy on node-1", std::time::Duration::from_secs(60), || async {
            let l = pods.list(&lp).await?;
            Ok(l.items
                .iter()
                .any(|p| {
                    p.metadata.uid != old.metadata.uid
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .then_some(()))
        })
        .await;
    });
    let o = connectivity(&lab, &["--include-conn-disrupt", "--keep", "--test", "^pod-to-pod-same-node$"]);
    assert!(o.status.success() && text(&o).contains("PASS no-interrupted-connections"), "{}", text(&o));
    in_node(
        &lab,
        "node-2",
        &["iptables", "-I", "FORWARD", "-p", "tcp", "--dport", "8082", "-j", "REJECT", "--reject-with", "tcp-reset"],
    );
    let o = connectivity(&lab, &["--include-conn-disrupt", "--test", "^pod-to-pod-same-node$"]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("FAIL no-interrupted-connections"), "{t}");
    let broken: Vec<&str> = t.lines().filter(|l| l.contains(":8082)")).collect();
    assert_eq!(broken.len(), 4, "the four connections forwarded by node-2 break, no others:\n{t}");
    assert!(!t.contains("node-1/pod-1 -> svc-pod-2-node-1"), "a node-1-only connection was reported broken:\n{t}");
    in_node(
        &lab,
        "node-2",
        &["iptables", "-D", "FORWARD", "-p", "tcp", "--dport", "8082", "-j", "REJECT", "--reject-with", "tcp-reset"],
    );

    // A verdict change: node-2 drops TCP 8080 coming from node-1's pods.
    let client = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let c = lab.client().await;
        kube::Api::<k8s_openapi::api::core::v1::Node>::all(c).get("node-1").await.unwrap()
    });
    let cidr = client.spec.unwrap().pod_cidr.unwrap();
    in_node(&lab, "node-2", &["iptables", "-I", "FORWARD", "-s", &cidr, "-p", "tcp", "--dport", "8080", "-j", "DROP"]);
    let o = connectivity(&lab, &["--compare", before.to_str().unwrap(), "--test", "pod-to-pod"]);
    let t = text(&o);
    assert!(!o.status.success(), "a changed verdict must fail the run:\n{t}");
    assert!(t.contains("node-1/pod-1 -> node-2/pod-1 8080/tcp: allowed -> denied"), "{t}");
    assert!(!t.contains("node-2/pod-1 -> node-1/pod-1 8080/tcp: allowed"), "only node-1 → node-2 changed:\n{t}");
    assert!(t.contains("FAIL pod-to-pod-cross-node"), "{t}");
    in_node(&lab, "node-2", &["iptables", "-D", "FORWARD", "-s", &cidr, "-p", "tcp", "--dport", "8080", "-j", "DROP"]);

    // A broken node, as a half-done migration leaves one: kube-proxy is gone from
    // node-1 (the DaemonSet excludes it) and its KUBE-SERVICES chain is flushed, so
    // node-1's pods lose every ClusterIP. The suite must fail and name node-1 only.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let c = lab.client().await;
        let ds = kube::Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(c.clone(), "kube-system");
        let patch = serde_json::json!({"spec": {"template": {"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-1"]}]}]}}}}}}});
        ds.patch("kube-proxy", &kube::api::PatchParams::default(), &kube::api::Patch::Strategic(&patch)).await.unwrap();
        let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c, "kube-system");
        eventually("kube-proxy to leave node-1", std::time::Duration::from_secs(60), || async {
            let l = pods.list(&kube::api::ListParams::default().labels("k8s-app=kube-proxy")).await?;
            let on1 = l.items.iter().filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-1")).count();
            Ok((on1 == 0 && l.items.len() == 1).then_some(()))
        })
        .await;
    });
    in_node(&lab, "node-1", &["iptables", "-t", "nat", "-F", "KUBE-SERVICES"]);
    let o = connectivity(&lab, &["--test", "pod-to-service", "--probe-timeout", "1s", "--settle", "3s"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("FAIL pod-to-service-remote") && t.contains("FAIL pod-to-service-local"), "{t}");
    let failing: Vec<&str> = t.lines().filter(|l| l.contains(" -> svc-")).collect();
    assert!(
        !failing.is_empty() && failing.iter().all(|l| l.trim_start().starts_with("node-1/")),
        "failures must name node-1 only:\n{t}"
    );

    std::fs::remove_dir_all(&dir).unwrap();
    let left = lab.down();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn calico_healthy_cluster_passes_every_scenario_policies_included() {
    let lab = Lab::up("tconnc", &["--nodes", "2", "--cni", "calico", "--no-demo"]);
    let dir = std::env::temp_dir().join(format!("ks-connc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let before = dir.join("before.json");
    let o = connectivity(&lab, &["--save", before.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for s in SCENARIOS.iter().chain(POLICY_SCENARIOS.iter()) {
        assert!(t.contains(&format!("PASS {s}")), "{s} did not pass:\n{t}");
    }
    assert!(t.contains("16 passed, 0 failed, 0 skipped"), "{t}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&before).unwrap()).unwrap();
    let e = &m["entries"];
    assert_eq!(e["policy-allow-from-label: node-1/pod-1 -> node-2/pod-1 8080/tcp"], "allowed", "{e}");
    assert_eq!(e["policy-allow-from-label: node-1/pod-2 -> node-2/pod-1 8080/tcp"], "denied", "{e}");

    // A policy edit changes verdicts; --compare lists exactly the changed pairs. The
    // demo namespace's kind of policy is applied here to the suite's own pods: every
    // ingress to the suite namespace is denied while the matrix is taken.
    let deny = serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "edit-deny-all", "namespace": "ks-conn"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
    let f = dir.join("deny.json");
    std::fs::write(&f, deny.to_string()).unwrap();
    // The suite deletes its namespace at the end; the policy goes with it. It is
    // applied while the suite's pods run, via --keep and a second pass.
    let o = connectivity(&lab, &["--keep", "--test", "^pod-to-pod-cross-node$"]);
    assert!(o.status.success(), "{}", text(&o));
    let k = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .args(["apply", "-f"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
    let o = connectivity(&lab, &["--compare", before.to_str().unwrap(), "--test", "^pod-to-pod-cross-node$"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("node-1/pod-1 -> node-2/pod-1 8080/tcp: allowed -> denied"), "{t}");
    assert!(t.contains("node-2/host -> node-1/pod-1 8080/tcp: allowed -> denied"), "{t}");
    std::fs::remove_dir_all(&dir).unwrap();
    // The suite cleaned up its namespace.
    let ns = tokio::runtime::Runtime::new().unwrap().block_on(async {
        kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(lab.client().await).get_opt("ks-conn").await.unwrap()
    });
    assert!(ns.is_none(), "the test namespace was left behind");
}

#[test]
fn bad_inputs_are_refused_before_touching_the_cluster() {
    // A broken matrix file is refused before anything is deployed (no cluster needed
    // to get that far would be wrong: it is checked first, then the cluster).
    let dir = std::env::temp_dir().join(format!("ks-conn-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kc = dir.join("kubeconfig");
    std::fs::write(&kc, "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\nusers:\n- name: u\n  user: {}\ncurrent-context: c\n").unwrap();
    let o = kubeshift().args(["connectivity", "test", "--kubeconfig"]).arg(&kc).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("the API server at https://127.0.0.1:1/ is not reachable"), "{}", text(&o));
    let o = kubeshift().args(["connectivity", "test", "--kubeconfig"]).arg(&kc).args(["--test", "("]).output().unwrap();
    assert!(text(&o).contains("--test \"(\" is not a valid regex"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A cluster in mid-migration: node-1 runs kubeshift's datapath (agent + socket load
/// balancing on its cgroup, kube-proxy gone, its KUBE-SERVICES flushed), node-2 still
/// runs kube-proxy. Connections set up before the step survive it; every pod, service
/// and host scenario passes across the two datapaths, NodePorts on both nodes'
/// addresses too (on node-1 the socket load balancer serves them, its NodePort program
/// on eth0 is not attached in this test).
#[test]
fn a_cluster_with_one_node_on_kubeshifts_datapath_is_checked_across_both() {
    let lab = Lab::up("tconnm", &["--nodes", "2", "--no-demo"]);
    let o = connectivity(&lab, &["--conn-disrupt-setup", "--test", "^pod-to-pod-same-node$"]);
    assert!(o.status.success(), "{}", text(&o));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (agent, _pins, _metrics) = rt.block_on(async {
        let c = lab.client().await;
        let started = start_agent(&lab, "node-1").await;
        take_kube_proxy_off(&lab, &c, "node-1").await;
        started
    });
    let o = connectivity(
        &lab,
        &["--include-conn-disrupt", "--test", "^(pod-to-pod|pod-to-service|pod-to-itself|host-to|pod-to-host)"],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("PASS no-interrupted-connections")
            && t.contains("PASS pod-to-service-remote")
            && t.contains("PASS host-to-service"),
        "{t}"
    );

    let o = connectivity(&lab, &["--test", "nodeport", "--settle", "2s"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("PASS pod-to-nodeport-local") && t.contains("PASS pod-to-nodeport-remote"),
        "NodePorts on both nodes' addresses pass:\n{t}"
    );
    agent.stop();
}
