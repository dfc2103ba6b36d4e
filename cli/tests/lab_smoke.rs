//! The lab, end to end, on real parts: `kubeshift lab up` starts a real apiserver,
//! controller-manager, scheduler and one real kube-proxy per node; pods are wired by
//! real CNI plugins; traffic is real packets between pod network namespaces.

mod common;

use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// A backend pinned to node-2, a client pinned to node-1, a ClusterIP Service.
async fn deploy_smoke(client: &kube::Client) {
    create(&Api::<Namespace>::all(client.clone()), json!({"metadata": {"name": "smoke"}})).await;
    let image = "registry.k8s.io/e2e-test-images/agnhost:2.39";
    create(
        &Api::<Deployment>::namespaced(client.clone(), "smoke"),
        json!({
            "metadata": {"name": "echo"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "echo"}},
                "template": {
                    "metadata": {"labels": {"app": "echo"}},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": "node-2"},
                        "containers": [{"name": "echo", "image": image, "args": ["netexec", "--http-port=8080"],
                                        "ports": [{"name": "http", "containerPort": 8080}],
                                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}}}]
                    }
                }
            }
        }),
    )
    .await;
    create(
        &Api::<Pod>::namespaced(client.clone(), "smoke"),
        json!({
            "metadata": {"name": "client", "labels": {"app": "client"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]}
        }),
    )
    .await;
    create(
        &Api::<Service>::namespaced(client.clone(), "smoke"),
        json!({
            "metadata": {"name": "echo"},
            "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
        }),
    )
    .await;
}

async fn smoke(lab: &Lab) {
    let client = lab.client().await;
    deploy_smoke(&client).await;

    let backend =
        eventually("the echo backend to be Ready", Duration::from_secs(60), || ready_pod(&client, "smoke", "app=echo"))
            .await;
    let client_pod =
        eventually("the client pod to be Ready", Duration::from_secs(60), || ready_pod(&client, "smoke", "app=client"))
            .await;
    assert_eq!(backend.spec.as_ref().unwrap().node_name.as_deref(), Some("node-2"));
    assert_eq!(client_pod.spec.as_ref().unwrap().node_name.as_deref(), Some("node-1"));
    let backend_ip = backend.status.as_ref().unwrap().pod_ip.clone().unwrap();

    let svc = Api::<Service>::namespaced(client.clone(), "smoke").get("echo").await.unwrap();
    let cluster_ip = svc.spec.unwrap().cluster_ip.unwrap();

    // Every node's real kube-proxy has written the Service's chains, pointing at the backend.
    let dnat = format!("--to-destination {backend_ip}:8080");
    for node in NODES {
        let rules =
            eventually(&format!("KUBE-SVC for smoke/echo in {node}'s iptables"), Duration::from_secs(60), || async {
                let s = lab.iptables_save(node);
                Ok((s.contains("smoke/echo:http") && s.contains(":KUBE-SVC-") && s.contains(&dnat)).then_some(s))
            })
            .await;
        assert!(rules.contains(&format!("-d {cluster_ip}/32")), "{node}: no KUBE-SERVICES match for {cluster_ip}");
    }

    // Pod on node-1 → ClusterIP → DNAT by node-1's kube-proxy rules → backend on node-2,
    // over the CNI's cross-node path.
    let client_ns = pod_netns(&lab.name, &client_pod);
    let addr: SocketAddr = format!("{cluster_ip}:80").parse().unwrap();
    let answer = eventually("an answer through the ClusterIP", Duration::from_secs(30), || {
        let ns = client_ns.clone();
        async move { Ok(http_get_from(&ns, addr, "/hostname").ok()) }
    })
    .await;
    assert_eq!(answer, backend.metadata.name.clone().unwrap(), "the ClusterIP answered from the wrong pod");

    // Delete the backend pod: its endpoint leaves every node's rules, the new one arrives.
    Api::<Pod>::namespaced(client.clone(), "smoke")
        .delete(backend.metadata.name.as_deref().unwrap(), &DeleteParams::default())
        .await
        .unwrap();
    let replacement = eventually("a replacement backend", Duration::from_secs(60), || async {
        Ok(ready_pod(&client, "smoke", "app=echo").await?.filter(|p| p.metadata.uid != backend.metadata.uid))
    })
    .await;
    let new_ip = replacement.status.as_ref().unwrap().pod_ip.clone().unwrap();
    // The kubelet stand-in tore the old sandbox down (CNI DEL, netns removed).
    let old_ns = pod_netns(&lab.name, &backend);
    eventually(&format!("netns {old_ns} of the deleted pod to be removed"), Duration::from_secs(30), || async {
        Ok((!kubeshift_lab::sys::netns_exists(&old_ns)).then_some(()))
    })
    .await;
    for node in NODES {
        eventually(
            &format!("{node}'s rules to drop {backend_ip} and add {new_ip}"),
            Duration::from_secs(60),
            || async {
                let s = lab.iptables_save(node);
                Ok((!s.contains(&dnat) && s.contains(&format!("--to-destination {new_ip}:8080"))).then_some(()))
            },
        )
        .await;
    }
    let answer = eventually("an answer from the replacement", Duration::from_secs(30), || {
        let ns = client_ns.clone();
        async move { Ok(http_get_from(&ns, addr, "/hostname").ok()) }
    })
    .await;
    assert_eq!(answer, replacement.metadata.name.clone().unwrap());
}

fn assert_clean(lab: &Lab) {
    let left = lab.down();
    assert!(left.is_empty(), "lab down left: {left:?}");
    let netns = kubeshift_lab::sys::list_netns_with_prefix(&format!("ks-{}-", lab.name));
    assert!(netns.is_empty(), "namespaces left: {netns:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_lab_routes_a_service_across_nodes_through_real_kube_proxy() {
    let lab = Lab::up("tflannel", &["--nodes", "3", "--pools", "2", "--cni", "flannel"]);
    let client = lab.client().await;

    // Flannel's data plane and API objects are as flanneld and the upstream manifest make them.
    let cfg = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), "kube-flannel")
        .get("kube-flannel-cfg")
        .await
        .unwrap();
    assert!(cfg.data.unwrap()["net-conf.json"].contains("10.244.0.0/16"));
    let links = kubeshift_lab::sys::ip(Some(&lab.node_netns("node-1")), "-d link show flannel.1").unwrap();
    assert!(links.contains("vxlan id 1") && links.contains("dstport 8472"), "{links}");
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()).get("node-2").await.unwrap();
    let ann = node.metadata.annotations.unwrap();
    assert!(ann["flannel.alpha.coreos.com/backend-data"].contains("VtepMAC"), "{ann:?}");
    assert_eq!(node.metadata.labels.unwrap()["node.kubernetes.io/pool"], "pool-2");

    // The demo workload's Services reach every node's rules (kube-proxy syncs a moment
    // after the Deployments are available).
    for n in NODES {
        eventually(&format!("demo Services in {n}'s iptables"), Duration::from_secs(60), || async {
            let s = lab.iptables_save(n);
            Ok((s.contains("demo-backend/backend:http") && s.contains("demo-frontend/frontend")).then_some(()))
        })
        .await;
    }

    smoke(&lab).await;
    assert_clean(&lab);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calico_lab_routes_a_service_across_nodes_through_real_kube_proxy() {
    let lab = Lab::up("tcalico", &["--nodes", "3", "--cni", "calico", "--no-demo"]);
    let client = lab.client().await;
    let pools = Api::<kube::api::DynamicObject>::all_with(
        client.clone(),
        &kube::api::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk("crd.projectcalico.org", "v1", "IPPool")),
    );
    let pool = pools.get("default-ipv4-ippool").await.unwrap();
    assert_eq!(pool.data["spec"]["cidr"], "192.168.0.0/16");
    smoke(&lab).await;

    // Calico's shape: the client pod sits behind a cali* veth with a /32 route.
    let routes = kubeshift_lab::sys::ip(Some(&lab.node_netns("node-1")), "route").unwrap();
    assert!(routes.lines().any(|l| l.contains("dev cali") && l.contains("scope host")), "{routes}");
    assert!(routes.contains("dev vxlan.calico"), "{routes}");
    assert_clean(&lab);
}
