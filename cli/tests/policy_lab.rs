//! `kubeshift agent` enforcing NetworkPolicy on a real lab: Flannel (which enforces no
//! policy itself), an agent per node attached to the pods' veths in the node's network
//! namespace, real pods talking HTTP across nodes and on one node.
//!
//! The matrix of NetworkPolicy semantics is proven in netns by
//! `datapath/tests/netpol.rs`; this test proves the agent's half: that it watches the
//! API, finds the pods' interfaces, follows policy and pod changes, and keeps enforcing
//! while it is stopped.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

const NS: &str = "pol";

async fn pod(client: &kube::Client, name: &str, node: &str, labels: serde_json::Value, server: bool) {
    let container = if server {
        json!({"name": "s", "image": "registry.k8s.io/e2e-test-images/agnhost:2.39",
               "args": ["netexec", "--http-port=8080", "--udp-port=8081"],
               "ports": [{"name": "http", "containerPort": 8080}]})
    } else {
        json!({"name": "c", "image": "registry.k8s.io/pause:3.9"})
    };
    create(
        &Api::<Pod>::namespaced(client.clone(), NS),
        json!({"metadata": {"name": name, "labels": labels}, "spec": {"nodeName": node, "containers": [container]}}),
    )
    .await;
}

async fn running(client: &kube::Client, lab: &Lab, name: &str) -> (String, String) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let p = eventually(&format!("pod {name} running with an IP"), Duration::from_secs(90), || {
        let pods = pods.clone();
        async move {
            let p = pods.get(name).await?;
            let ok = p.status.as_ref().is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some());
            Ok(ok.then_some(p))
        }
    })
    .await;
    (pod_netns(&lab.name, &p), p.status.unwrap().pod_ip.unwrap())
}

/// One HTTP GET from `from_netns` to the server; Ok(hostname) or the error text.
fn get(from_netns: &str, server_ip: &str) -> Result<String, String> {
    let addr: SocketAddr = format!("{server_ip}:8080").parse().unwrap();
    http_get_from(from_netns, addr, "/hostname").map_err(|e| format!("{e:#}"))
}

async fn await_verdicts(what: &str, clients: &[(&str, &str, bool)], server_ip: &str) {
    eventually(what, Duration::from_secs(60), || async move {
        let observed: Vec<(&str, bool)> =
            clients.iter().map(|(name, ns, _)| (*name, get(ns, server_ip).is_ok())).collect();
        let want: Vec<(&str, bool)> = clients.iter().map(|(name, _, ok)| (*name, *ok)).collect();
        if observed == want {
            Ok(Some(()))
        } else {
            anyhow::bail!("observed {observed:?}, want {want:?}")
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enforces_network_policy_on_a_flannel_lab() {
    let lab = Lab::up("pol", &["--nodes", "2", "--cni", "flannel", "--no-demo"]);
    let client = lab.client().await;
    create(&Api::<Namespace>::all(client.clone()), json!({"metadata": {"name": NS, "labels": {"team": "pol"}}})).await;
    pod(&client, "server", "node-2", json!({"app": "server"}), true).await;
    pod(&client, "front-1", "node-1", json!({"role": "frontend"}), false).await;
    pod(&client, "other-1", "node-1", json!({"role": "other"}), false).await;
    pod(&client, "front-2", "node-2", json!({"role": "frontend"}), false).await;
    let (_, server_ip) = running(&client, &lab, "server").await;
    let (front1, _) = running(&client, &lab, "front-1").await;
    let (other1, _) = running(&client, &lab, "other-1").await;
    let (front2, _) = running(&client, &lab, "front-2").await;

    let (agent1, _pins1, m1) = start_agent(&lab, "node-1").await;
    let (agent2, pins2, m2) = start_agent(&lab, "node-2").await;
    // start_agent awaited every local pod's veth having the programs: node-1 runs
    // front-1 and other-1 (plus the flannel and kube-proxy pods, host-network, none).
    for addr in [&m1, &m2] {
        assert_eq!(metric(&metrics(addr).unwrap(), "kubeshift_agent_policy_interfaces"), Some(2.0), "{addr}");
    }

    // No policy: everyone reaches the server (Flannel never enforced anything).
    let all_ok =
        [("front-1", front1.as_str(), true), ("other-1", other1.as_str(), true), ("front-2", front2.as_str(), true)];
    await_verdicts("no policy: all allowed", &all_ok, &server_ip).await;

    // Only frontends may reach the server on its named port.
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), NS);
    create(
        &nps,
        json!({"metadata": {"name": "server-from-frontend"},
               "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                                     "ports": [{"port": "http"}]}]}}),
    )
    .await;
    let policy_on =
        [("front-1", front1.as_str(), true), ("other-1", other1.as_str(), false), ("front-2", front2.as_str(), true)];
    await_verdicts("frontends allowed across nodes and on the node, other-1 dropped", &policy_on, &server_ip).await;

    // The drop is visible in the flow stream of the server's node, with both pods,
    // their identities and the reason; the allowed connection from front-1 too.
    let out = run_ok(kubeshift().args([
        "observe",
        "--server",
        &m2,
        "--last",
        "4096",
        "-o",
        "json",
        "--verdict",
        "DROPPED",
        "--from-pod",
        "pol/other-1",
        "--to-pod",
        "pol/server",
    ]));
    let drops: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let drop = drops
        .iter()
        .find(|r| r["kind"] == "policy")
        .unwrap_or_else(|| panic!("no policy drop of other-1 → server in {drops:?}"));
    assert_eq!(drop["drop_reason"], "policy-denied-ingress", "{drop}");
    assert_eq!(drop["destination"]["port"], 8080, "{drop}");
    assert_eq!(drop["protocol"], "TCP", "{drop}");
    assert!(
        drop["source"]["identity"].as_u64().is_some() && drop["destination"]["identity"].as_u64().is_some(),
        "{drop}"
    );
    assert_eq!(drop["source"]["labels"]["role"], "other", "{drop}");
    let out = run_ok(kubeshift().args([
        "observe",
        "--server",
        &m2,
        "--last",
        "4096",
        "-o",
        "json",
        "--verdict",
        "FORWARDED",
        "--from-pod",
        "pol/front-1",
        "--to-pod",
        "pol/server",
        "--port",
        "8080",
    ]));
    assert!(
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l.contains("\"kind\":\"policy\"")),
        "no forwarded policy flow front-1 → server"
    );

    // A label change is an identity change: other-1 becomes a frontend.
    Api::<Pod>::namespaced(client.clone(), NS)
        .patch("other-1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"role": "frontend"}}})))
        .await
        .unwrap();
    await_verdicts("relabelled other-1 allowed", &all_ok, &server_ip).await;
    Api::<Pod>::namespaced(client.clone(), NS)
        .patch("other-1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"role": "other"}}})))
        .await
        .unwrap();
    await_verdicts("other-1 dropped again", &policy_on, &server_ip).await;

    // The enforcing agent (node-2, the server's node) stops: the pinned programs and
    // maps keep enforcing the same verdicts without it.
    agent2.stop();
    for _ in 0..3 {
        assert!(get(&front1, &server_ip).is_ok(), "front-1 while the agent is stopped");
        assert!(get(&other1, &server_ip).is_err(), "other-1 while the agent is stopped");
    }
    // Deleted while no agent runs: the restarted agent's first sync removes the isolation.
    nps.delete("server-from-frontend", &DeleteParams::default()).await.unwrap();
    let agent2 = Agent::start_on(&lab, "node-2", &pins2.0, &m2);
    await_verdicts("policy deleted while stopped: all allowed after the restart", &all_ok, &server_ip).await;

    nodeport_through_the_agents(&client, &lab, &m1, &m2).await;
    agent1.stop();
    agent2.stop();
}

async fn internal_ip(client: &kube::Client, node: &str) -> String {
    let n = Api::<Node>::all(client.clone()).get(node).await.unwrap();
    n.status.unwrap().addresses.unwrap().into_iter().find(|a| a.type_ == "InternalIP").unwrap().address
}

/// NodePort Services served by the agents' tc programs on the nodes' eth0. kube-proxy
/// still runs here, but tc ingress runs before netfilter: its NodePort rules only ever
/// see packets already translated, and the flow records show who translated them.
async fn nodeport_through_the_agents(client: &kube::Client, lab: &Lab, m1: &str, m2: &str) {
    let svcs: Api<Service> = Api::namespaced(client.clone(), NS);
    for (name, port, policy) in [("np", 30090, "Cluster"), ("np-local", 30091, "Local")] {
        create(
            &svcs,
            json!({"metadata": {"name": name},
                   "spec": {"type": "NodePort", "externalTrafficPolicy": policy, "selector": {"app": "server"},
                            "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": port}]}}),
        )
        .await;
    }
    for addr in [m1, m2] {
        eventually(&format!("agent {addr} serving both NodePorts"), Duration::from_secs(60), || async move {
            let m = metrics(addr)?;
            Ok((metric(&m, "kubeshift_agent_nodeport_frontends") == Some(2.0)).then_some(()))
        })
        .await;
    }
    let (ip1, ip2) = (internal_ip(client, "node-1").await, internal_ip(client, "node-2").await);
    let (from1, from2) = (lab.node_netns("node-1"), lab.node_netns("node-2"));
    let get = |netns: &str, ip: &str, port: u16| {
        http_get_from(netns, format!("{ip}:{port}").parse().unwrap(), "/clientip").map_err(|e| format!("{e:#}"))
    };

    // Cluster policy, no endpoint on node-1: node-1 forwards to the server on node-2 with
    // its own address as the source, so the reply comes back through it.
    let seen = get(&from2, &ip1, 30090).expect("NodePort on node-1 to the server on node-2");
    assert!(seen.starts_with(&format!("{ip1}:")), "server saw {seen}, want node-1's address");
    // Local policy: node-1 has no endpoint, so it drops; node-2 has one and keeps the
    // client's address.
    assert!(get(&from2, &ip1, 30091).is_err(), "eTP Local on a node without endpoints must drop");
    let seen = get(&from1, &ip2, 30091).expect("eTP Local on the server's node");
    assert!(seen.starts_with(&format!("{ip1}:")), "server saw {seen}, want the client's (node-1's) address");

    let out = run_ok(kubeshift().args([
        "observe",
        "--server",
        m1,
        "--last",
        "4096",
        "-o",
        "json",
        "--to-pod",
        "pol/server",
        "--verdict",
        "FORWARDED",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("\"kind\":\"nodeport\"") && l.contains(":30090 snat")), "{text}");
    let out = run_ok(kubeshift().args([
        "observe",
        "--server",
        m1,
        "--last",
        "4096",
        "-o",
        "json",
        "--verdict",
        "DROPPED",
        "--port",
        "30091",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("no-local-endpoints")), "{text}");
}
