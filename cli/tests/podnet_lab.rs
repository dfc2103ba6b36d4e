//! kubeshift's pod network in standby, on a real 3-node Flannel lab: many agents claim
//! node ranges at once without a range handed out twice, `kubeshift install manifests`
//! applied with kubectl puts a Ready agent on every node, each node gets kubeshift's own
//! VXLAN device (not Flannel's port) with routes to the other nodes' ranges, a packet
//! crosses it, and a restarted agent keeps its node's range.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kubeshift_datapath::overlay::{ipam, Cidr};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

async fn ranges(client: &kube::Client) -> anyhow::Result<BTreeMap<String, Cidr>> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ipam::IPAM_NAMESPACE).get(ipam::IPAM_CONFIGMAP).await?;
    ipam::parse_ranges(&cm.data.unwrap_or_default())
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn agents_ready(client: &kube::Client) -> anyhow::Result<Option<BTreeMap<String, String>>> {
    let pods = Api::<Pod>::namespaced(client.clone(), "kube-system")
        .list(&ListParams::default().labels("k8s-app=kubeshift-agent"))
        .await?;
    let by_node: BTreeMap<String, String> = pods
        .items
        .iter()
        .filter(|p| ready(p) && p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p.metadata.name.clone()?)))
        .collect();
    Ok((by_node.len() == NODES.len()).then_some(by_node))
}

fn ip_in(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["-n", netns]).args(args).output().expect("running ip");
    assert!(out.status.success(), "ip -n {netns} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_agents_build_the_overlay_on_every_node() {
    let lab = Lab::up("tpn", &["--nodes", "3", "--no-demo"]);
    let client = lab.client().await;

    // 1. Twelve claims at once against the real apiserver: twelve distinct ranges.
    // The claimers must be Nodes, or each claim would free the others' ranges.
    let nodes: Api<Node> = Api::all(client.clone());
    let fakes: Vec<String> = (0..12).map(|i| format!("ipam-fake-{i}")).collect();
    for f in &fakes {
        let n: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": f}})).unwrap();
        nodes.create(&PostParams::default(), &n).await.expect("creating a fake Node");
    }
    let pool: Cidr = "10.200.0.0/16".parse().unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for f in fakes.clone() {
        let c = client.clone();
        tasks.spawn(async move { (f.clone(), ipam::claim(&c, &f, pool, 24).await.expect("claim")) });
    }
    let mut got = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (n, r) = r.unwrap();
        got.insert(n, r);
    }
    let distinct: BTreeSet<Cidr> = got.values().copied().collect();
    assert_eq!(distinct.len(), fakes.len(), "a range was handed out twice: {got:?}");
    assert_eq!(ranges(&client).await.unwrap(), got, "the ConfigMap records every claim");
    // A second claim finds the same range again (what a restarted agent does).
    assert_eq!(ipam::claim(&client, &fakes[3], pool, 24).await.unwrap(), got[&fakes[3]]);
    for f in &fakes {
        nodes.delete(f, &DeleteParams::default()).await.expect("deleting a fake Node");
    }

    // 2. The manifests, applied as a user would.
    install_agent(&lab, &[]);

    let pods = eventually("an agent pod Ready on every node", Duration::from_secs(120), || agents_ready(&client)).await;

    // 3. Three distinct ranges; the fake nodes' ranges were freed (they are gone).
    let r = eventually("three ranges in the IPAM ConfigMap", Duration::from_secs(30), || async {
        let r = ranges(&client).await?;
        Ok((r.len() == 3).then_some(r))
    })
    .await;
    assert_eq!(r.keys().map(String::as_str).collect::<Vec<_>>(), NODES.to_vec(), "{r:?}");
    assert_eq!(r.values().collect::<BTreeSet<_>>().len(), 3, "{r:?}");

    // 4. Each node: kubeshift's device on its own port and VNI, routes to the others.
    for n in NODES {
        let ns = lab.node_netns(n);
        let dev = ip_in(&ns, &["-d", "link", "show", "kubeshift.vx"]);
        assert!(dev.contains("vxlan id 2 ") && dev.contains("dstport 8473 "), "{n}: {dev}");
        assert!(dev.contains("nolearning"), "{n}: {dev}");
        // An agent is Ready once it has programmed the ranges it has seen; a peer that
        // claimed later is programmed on its next pass, so await the full set.
        let routes = eventually(&format!("{n}: routes to every other node's range"), Duration::from_secs(30), || {
            let (ns, r) = (ns.clone(), r.clone());
            async move {
                let routes = ip_in(&ns, &["route", "show", "dev", "kubeshift.vx"]);
                // (`show dev` leaves the device out of each line.)
                let all = r
                    .iter()
                    .filter(|(o, _)| *o != n)
                    .all(|(_, range)| routes.contains(&format!("{range} via {} ", range.first())));
                if all && routes.contains("onlink") {
                    Ok(Some(routes))
                } else {
                    Err(anyhow::anyhow!("(last seen on dev kubeshift.vx: {routes:?}; ranges {r:?})"))
                }
            }
        })
        .await;
        assert!(!routes.contains(&r[n].to_string()), "{n}: a route to its own range:\n{routes}");
        // Flannel's device is untouched.
        assert!(ip_in(&ns, &["-d", "link", "show", "flannel.1"]).contains("dstport 8472"));
    }

    // 5. A packet crosses the overlay: node-1 reaches node-2's agent on node-2's
    // gateway address, which only exists on node-2's kubeshift.vx.
    let gw2 = r["node-2"].first();
    let body = http_get_from(&lab.node_netns("node-1"), (gw2, 9963).into(), "/readyz").expect("GET over the overlay");
    assert!(body.contains("ok"), "{body}");

    // 6. A restarted agent comes back Ready with the same range.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    pods_api.delete(&pods["node-1"], &DeleteParams::default()).await.unwrap();
    eventually("node-1's agent replaced and Ready", Duration::from_secs(90), || async {
        Ok(agents_ready(&client).await?.filter(|p| p["node-1"] != pods["node-1"]))
    })
    .await;
    assert_eq!(ranges(&client).await.unwrap(), r, "a restart changed the ranges");
    let routes = ip_in(&lab.node_netns("node-2"), &["route", "show", "dev", "kubeshift.vx"]);
    assert!(routes.contains(&r["node-1"].to_string()), "{routes}");
    http_get_from(&lab.node_netns("node-1"), (gw2, 9963).into(), "/readyz")
        .expect("GET over the overlay after the restart");

    // 7. A node added, its address changed, then removed: the other nodes' routes,
    // neighbours and FDB entries follow. (A Node with no kubelet: its own agent never
    // runs, which does not matter to the others.)
    let fake: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tpn-extra"},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.99"}]},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &fake).await.expect("creating Node tpn-extra");
    let extra = ipam::claim(&client, "tpn-extra", pool, 24).await.expect("claim for tpn-extra");
    let ns1 = lab.node_netns("node-1");
    let fdb = |ns: &str| {
        let out = Command::new("bridge").args(["-n", ns, "fdb", "show", "dev", "kubeshift.vx"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    eventually("node-1 programs tpn-extra", Duration::from_secs(30), || async {
        let routes = ip_in(&ns1, &["route", "show", "dev", "kubeshift.vx"]);
        let neigh = ip_in(&ns1, &["neigh", "show", "dev", "kubeshift.vx"]);
        Ok((routes.contains(&format!("{extra} via {} ", extra.first()))
            && neigh.contains(&format!("{} lladdr 0e:6b:73:1e:00:63 PERMANENT", extra.first()))
            && fdb(&ns1).contains("0e:6b:73:1e:00:63 dst 172.30.0.99 self permanent"))
        .then_some(()))
    })
    .await;
    let mut n = nodes.get_status("tpn-extra").await.unwrap();
    n.status.as_mut().unwrap().addresses.as_mut().unwrap()[0].address = "172.30.0.98".into();
    nodes.replace_status("tpn-extra", &PostParams::default(), &n).await.unwrap();
    eventually("node-1 follows tpn-extra's new address", Duration::from_secs(30), || async {
        let f = fdb(&ns1);
        let neigh = ip_in(&ns1, &["neigh", "show", "dev", "kubeshift.vx"]);
        Ok((f.contains("0e:6b:73:1e:00:62 dst 172.30.0.98")
            && !f.contains("172.30.0.99")
            && neigh.contains(&format!("{} lladdr 0e:6b:73:1e:00:62 PERMANENT", extra.first())))
        .then_some(()))
    })
    .await;
    nodes.delete("tpn-extra", &DeleteParams::default()).await.unwrap();
    eventually("node-1 forgets tpn-extra", Duration::from_secs(30), || async {
        let routes = ip_in(&ns1, &["route", "show", "dev", "kubeshift.vx"]);
        let neigh = ip_in(&ns1, &["neigh", "show", "dev", "kubeshift.vx"]);
        Ok((!routes.contains(&extra.to_string())
            && !neigh.contains(&extra.first().to_string())
            && !fdb(&ns1).contains("172.30.0.98"))
        .then_some(()))
    })
    .await;
    // Every other node is still programmed, and every agent still Ready.
    eventually("agents Ready after tpn-extra left", Duration::from_secs(30), || agents_ready(&client)).await;
}
