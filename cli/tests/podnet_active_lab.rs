//! A node switched to kubeshift's pod network by its label, on a real 3-node Flannel
//! lab and a real 3-node Calico lab: the agent DaemonSet (`--mode auto`) in standby everywhere; node-1 labelled
//! active gets kubeshift's CNI conf first, and a pod created there gets a kubeshift
//! address. Legacy pods (same node and another node) and the kubeshift pod reach each
//! other both ways by pod IP, and each server sees the client's pod IP (Flannel's
//! FLANNEL-POSTRTG and Calico's natOutgoing would masquerade it without the bridges). Labelled standby again,
//! node-1's conf and datapath pins are gone and its next pod is on the legacy network.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kubeshift_datapath::agent::modes::{CONF_NAME, MODE_LABEL, NETWORK};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const NS: &str = "default";

async fn set_mode(client: &kube::Client, node: &str, mode: &str) {
    let patch = json!({"metadata": {"labels": {MODE_LABEL: mode}}});
    Api::<Node>::all(client.clone()).patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

fn ready_now(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// GET /clientip on `to` from inside `from`'s netns: the address the server saw.
fn client_ip_seen(lab: &Lab, from: &Pod, to: Ipv4Addr) -> anyhow::Result<Ipv4Addr> {
    let body = http_get_from(&pod_netns(&lab.name, from), SocketAddr::from((to, 8080)), "/clientip")?;
    let host = body.trim().rsplit_once(':').map(|(h, _)| h).unwrap_or(body.trim());
    Ok(host.parse()?)
}

/// Two records in the plugin's format at the top of node-1's range, held by containers
/// that have no veth: one written an hour ago (a sandbox gone without a DEL), one just
/// now (an ADD in flight). Returns their paths.
fn plant_allocations(
    range: kubeshift_datapath::overlay::Cidr,
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let broadcast = u32::from(range.addr) | (u32::MAX >> range.len);
    let (leaked, fresh) =
        (dir.join(Ipv4Addr::from(broadcast - 1).to_string()), dir.join(Ipv4Addr::from(broadcast - 2).to_string()));
    for (path, id) in [(&leaked, "leaked-by-a-lost-sandbox"), (&fresh, "add-in-flight")] {
        assert!(!path.exists(), "{} is allocated already", path.display());
        std::fs::write(path, format!("{id}\r\neth0")).unwrap();
    }
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&leaked).unwrap().set_modified(hour_ago).unwrap();
    (leaked, fresh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_node_labelled_active_wires_new_pods_on_kubeshifts_network_with_sources_kept() {
    active_node_scenario("tpa", "flannel", "10.244.0.0/16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calico_node_labelled_active_wires_new_pods_on_kubeshifts_network_with_sources_kept() {
    active_node_scenario("tpc", "calico", "192.168.0.0/16").await;
}

async fn active_node_scenario(name: &str, cni: &str, legacy: &str) {
    assert_cni_plugin_built();
    // Pods run for 1.5 s before the API has their IP (a real kubelet's PLEG relist
    // takes up to 1 s): the window in which only the CNI plugin knows the address.
    let lab = Lab::up_with_env(
        name,
        &["--nodes", "3", "--cni", cni, "--no-demo"],
        &[(kubeshift_lab::kubelet::STATUS_DELAY_ENV, "1500")],
    );
    let client = lab.client().await;
    let legacy_net: kubeshift_datapath::overlay::Cidr = legacy.parse().unwrap();
    let ks_net: kubeshift_datapath::overlay::Cidr = "10.200.0.0/16".parse().unwrap();

    install_agent(&lab, &["--legacy-pod-cidr", legacy]);
    netexec_on(&client, "legacy-1", "node-1").await;
    netexec_on(&client, "legacy-2", "node-2").await;
    let (l1, l1_ip) = ready_ip(&client, "legacy-1").await;
    let (l2, l2_ip) = ready_ip(&client, "legacy-2").await;
    assert!(legacy_net.contains(l1_ip) && legacy_net.contains(l2_ip), "{l1_ip} {l2_ip}");

    // Standby everywhere: no kubeshift conf on any node.
    let conf = |n: &str| kubeshift_lab::kubelet::node_root(&lab.name, n).join("etc/cni/net.d").join(CONF_NAME);
    for n in ["node-1", "node-2", "node-3"] {
        assert!(!conf(n).exists(), "{n} has {CONF_NAME} in standby");
    }

    // 1. node-1 active: the conf comes first in its dir, with node-1's range.
    set_mode(&client, "node-1", "active").await;
    let text = eventually("node-1's kubeshift CNI conf", Duration::from_secs(60), || async {
        Ok(std::fs::read_to_string(conf("node-1")).ok())
    })
    .await;
    let written: serde_json::Value = serde_json::from_str(&text).expect("the conf is whole JSON");
    assert_eq!(written["plugins"][0]["type"], "kubeshift", "{text}");
    assert!(!conf("node-2").exists(), "node-2 stays on the legacy network");

    // 2. A new pod on node-1 gets a kubeshift address.
    netexec_on(&client, "ks-1", "node-1").await;
    let (k1, k1_ip) = ready_ip(&client, "ks-1").await;
    assert!(ks_net.contains(k1_ip), "ks-1 got {k1_ip}, not an address of {ks_net}");
    let subnet: kubeshift_datapath::overlay::Cidr = written["plugins"][0]["subnet"].as_str().unwrap().parse().unwrap();
    assert!(subnet.contains(k1_ip), "{k1_ip} is outside node-1's range {subnet}");
    assert_ne!(k1_ip, subnet.first(), "a pod got the node's own overlay address");

    let pins = kubeshift_lab::down::bpffs_dir(&lab.name).join("node-1").join("kubeshift");
    assert!(pins.is_dir(), "node-1 is active but its datapath is not pinned at {}", pins.display());

    // 3. Both networks, both ways, same node and cross node: the server sees the
    // client's pod IP.
    for (from, from_ip, to, to_ip, what) in [
        (&l2, l2_ip, "ks-1", k1_ip, "legacy pod on node-2 -> kubeshift pod on node-1"),
        (&k1, k1_ip, "legacy-2", l2_ip, "kubeshift pod on node-1 -> legacy pod on node-2"),
        (&l1, l1_ip, "ks-1", k1_ip, "legacy pod on node-1 -> kubeshift pod on node-1"),
        (&k1, k1_ip, "legacy-1", l1_ip, "kubeshift pod on node-1 -> legacy pod on node-1"),
    ] {
        let seen =
            eventually(what, Duration::from_secs(20), || async { client_ip_seen(&lab, from, to_ip).map(Some) }).await;
        assert_eq!(seen, from_ip, "{what}: {to} saw {seen}, not the client's pod IP {from_ip}");
    }

    // 4. The connectivity suite across the two networks: its pods on node-1 get
    // kubeshift's network, those on node-2 the legacy one.
    let out = kubeshift()
        .args(["connectivity", "test", "--node", "node-1", "--node", "node-2", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "connectivity suite on (active node-1, legacy node-2):\n{report}\n{err}");

    // 4b. Calico: a policy Calico enforces on the legacy node selects kubeshift pods by
    // their labels (its WorkloadEndpoints come from Pods, whichever CNI wired them), so
    // verdicts do not change when a client moves to kubeshift's network.
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> = Api::namespaced(client.clone(), NS);
    if cni == "calico" {
        calico_selects_kubeshift_pods(&lab, &client, &policies, &k1, l2_ip).await;
    }

    // 5. A pod isolated by a deny-all egress policy has its very first packet dropped:
    // it tries legacy-2 from its first instant, and no try gets through until the
    // policy is deleted (which proves the path itself works).
    create(
        &policies,
        json!({"metadata": {"name": "locked-egress"},
               "spec": {"podSelector": {"matchLabels": {"locked": "yes"}}, "policyTypes": ["Egress"]}}),
    )
    .await;
    let script = format!(
        "import socket, sys, time\n\
         while True:\n\
         \x20   try:\n\
         \x20       socket.create_connection(('{l2_ip}', 8080), timeout=0.3).close(); print('connected', flush=True)\n\
         \x20   except OSError as e:\n\
         \x20       print('blocked', e, flush=True)\n\
         \x20   time.sleep(0.1)\n"
    );
    create(
        &Api::<Pod>::namespaced(client.clone(), NS),
        json!({"metadata": {"name": "locked", "labels": {"t": "locked", "locked": "yes"}},
               "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "busybox",
                        "command": ["sh", "-c", format!("exec python3 -c \"{script}\"")]}]}}),
    )
    .await;
    let (locked, _) = ready_ip(&client, "locked").await;
    let log = kubeshift_lab::up::node_dir(&lab.name, "node-1")
        .join("pods")
        .join(locked.metadata.uid.as_deref().unwrap())
        .join("c.log");
    let tries = eventually("ten tries of the locked pod", Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok((text.lines().count() >= 10).then_some(text))
    })
    .await;
    assert!(!tries.contains("connected"), "a packet of the isolated pod got through:\n{tries}");
    assert!(tries.lines().next().is_some_and(|l| l.starts_with("blocked")), "{tries}");
    // The drops are in node-1's flows, read the way a user without a route to the
    // nodes would: `observe` with no --server finds the agents through the apiserver.
    let locked_ip = ready_ip(&client, "locked").await.1.to_string();
    let flows = eventually("the locked pod's drops through the API", Duration::from_secs(30), || async {
        let out = kubeshift()
            .args(["observe", "--last", "50", "--verdict", "DROPPED", "--from-pod", "default/locked", "-o", "json"])
            .arg("--kubeconfig")
            .arg(lab.kubeconfig())
            .output()?;
        anyhow::ensure!(out.status.success(), "observe: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((!text.trim().is_empty()).then_some(text))
    })
    .await;
    assert!(flows.contains(&locked_ip) && flows.contains(&l2_ip.to_string()), "{flows}");
    policies.delete("locked-egress", &Default::default()).await.unwrap();
    eventually("the locked pod connects once the policy is gone", Duration::from_secs(30), || async {
        Ok(std::fs::read_to_string(&log).unwrap_or_default().contains("connected").then_some(()))
    })
    .await;

    // 6. The agent restarts: traffic between the networks keeps flowing while it is
    // away, and the node is still active when it is back. Allocations of sandboxes that
    // went away without a DEL are freed when it starts; those of live pods and one an
    // ADD may still be wiring (written just now) are kept.
    let allocs = kubeshift_lab::kubelet::node_root(&lab.name, "node-1").join("var/lib/cni/kubeshift").join(NETWORK);
    assert!(allocs.join(k1_ip.to_string()).exists(), "no allocation of ks-1 under {}", allocs.display());
    let (leaked, fresh) = plant_allocations(subnet, &allocs);
    let agents: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let old = agents
        .list(&kube::api::ListParams::default().labels("k8s-app=kubeshift-agent").fields("spec.nodeName=node-1"))
        .await
        .unwrap()
        .items
        .remove(0);
    agents.delete(old.metadata.name.as_deref().unwrap(), &Default::default()).await.unwrap();
    let old_uid = old.metadata.uid.clone();
    let mut probes = 0;
    loop {
        assert_eq!(client_ip_seen(&lab, &l2, k1_ip).expect("legacy -> kubeshift during the agent's restart"), l2_ip);
        assert_eq!(client_ip_seen(&lab, &k1, l2_ip).expect("kubeshift -> legacy during the agent's restart"), k1_ip);
        probes += 1;
        let back = agents
            .list(&kube::api::ListParams::default().labels("k8s-app=kubeshift-agent").fields("spec.nodeName=node-1"))
            .await
            .unwrap()
            .items
            .iter()
            .any(|p| p.metadata.uid != old_uid && ready_now(p));
        if back {
            break;
        }
        assert!(probes < 2000, "node-1's agent did not come back Ready");
    }
    assert!(conf("node-1").exists(), "the restarted agent left node-1's conf");
    eventually("the restarted agent frees the leaked allocation", Duration::from_secs(30), || async {
        Ok((!leaked.exists()).then_some(()))
    })
    .await;
    assert!(fresh.exists(), "an allocation younger than the grace was freed");
    std::fs::remove_file(&fresh).unwrap();
    assert!(allocs.join(k1_ip.to_string()).exists(), "the allocation of ks-1, alive all along, was freed");
    netexec_on(&client, "ks-1b", "node-1").await;
    let (_, ip) = ready_ip(&client, "ks-1b").await;
    assert!(ks_net.contains(ip), "after the agent's restart, a new pod on node-1 got {ip}");

    // 7. Standby again: the conf and the active datapath's pins leave; the next pod on
    // node-1 is on the legacy network again, and the kubeshift pod keeps its address and routes.
    set_mode(&client, "node-1", "standby").await;
    eventually("node-1's conf and pins removed", Duration::from_secs(60), || async {
        Ok((!conf("node-1").exists() && !pins.exists()).then_some(()))
    })
    .await;
    netexec_on(&client, "legacy-1b", "node-1").await;
    let (_, ip) = ready_ip(&client, "legacy-1b").await;
    assert!(legacy_net.contains(ip), "after standby, a new pod on node-1 got {ip}");
    assert_eq!(client_ip_seen(&lab, &l2, k1_ip).unwrap(), l2_ip, "the kubeshift pod still answers, sources kept");
}

/// legacy-2 (node-2, Calico's network, Calico's policy) admits only `role=frontend`:
/// a frontend on kubeshift's network gets in, another kubeshift pod (`ks`) is dropped.
async fn calico_selects_kubeshift_pods(
    lab: &Lab,
    client: &kube::Client,
    policies: &Api<k8s_openapi::api::networking::v1::NetworkPolicy>,
    ks: &Pod,
    legacy_ip: Ipv4Addr,
) {
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    netexec_on(client, "ks-front", "node-1").await;
    let label = json!({"metadata": {"labels": {"role": "frontend"}}});
    pods.patch("ks-front", &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    let (front, front_ip) = ready_ip(client, "ks-front").await;
    create(
        policies,
        json!({"metadata": {"name": "legacy-2-frontends-only"},
               "spec": {"podSelector": {"matchLabels": {"t": "legacy-2"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                                     "ports": [{"port": 8080}]}]}}),
    )
    .await;
    // Once the other kubeshift pod is dropped, Calico's rules for the policy are in place.
    eventually("Calico drops the kubeshift pod without the label", Duration::from_secs(30), || async {
        Ok(client_ip_seen(lab, ks, legacy_ip).is_err().then_some(()))
    })
    .await;
    let seen = client_ip_seen(lab, &front, legacy_ip)
        .expect("Calico's policy dropped a frontend on kubeshift's network: its selector did not match it");
    assert_eq!(seen, front_ip, "the frontend's source was not kept");
    policies.delete("legacy-2-frontends-only", &Default::default()).await.unwrap();
    eventually("the other kubeshift pod reaches legacy-2 again", Duration::from_secs(30), || async {
        Ok(client_ip_seen(lab, ks, legacy_ip).ok())
    })
    .await;
}
