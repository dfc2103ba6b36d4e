//! The kubelet stand-in against the real apiserver and controller-manager: pod events
//! survive watches that end (the apiserver ends every watch after its timeout), and a
//! pod status that another writer changed is written again, as the real kubelet's
//! status manager does.

mod common;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use std::time::Duration;

fn pod(name: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "labels": {"app": "watch-test"}},
        "spec": {"nodeName": "node-1", "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]}
    })
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// WATCH requests on pods the apiserver has served: it grows each time a watch ends and
/// a client resumes it.
async fn pod_watches(client: &kube::Client) -> anyhow::Result<f64> {
    let text = client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{") && l.contains("verb=\"WATCH\"") && l.contains("resource=\"pods\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Waits until the pod watches have been resumed `n` more times than `since`: with a
/// 2 s watch timeout on each kubelet, every kubelet has then had its watch end.
async fn watches_ended(client: &kube::Client, since: f64, n: f64) -> f64 {
    eventually(&format!("{n} more pod WATCH requests"), Duration::from_secs(60), || async {
        let now = pod_watches(client).await?;
        Ok((now >= since + n).then_some(now))
    })
    .await
}

async fn ready_names(pods: &Api<Pod>) -> anyhow::Result<Vec<String>> {
    let list = pods.list(&ListParams::default().labels("app=watch-test")).await?;
    let mut names: Vec<String> =
        list.items.iter().filter(|p| is_ready(p)).filter_map(|p| p.metadata.name.clone()).collect();
    names.sort();
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_keeps_pod_events_across_ended_watches_and_restores_a_changed_status() {
    let lab = Lab::up_with_env(
        "tkwatch",
        &["--nodes", "2", "--no-demo"],
        &[(kubeshift_lab::kubelet::POD_WATCH_TIMEOUT_ENV, "2")],
    );
    let client = lab.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // Pod events on both sides of many ended watches.
    let mut seen = pod_watches(&client).await.expect("apiserver metrics");
    for name in ["w1", "w2", "w3"] {
        create(&pods, pod(name)).await;
        seen = watches_ended(&client, seen, 4.0).await;
    }
    pods.delete("w2", &DeleteParams::default()).await.expect("delete w2");
    seen = watches_ended(&client, seen, 4.0).await;
    create(&pods, pod("w4")).await;
    watches_ended(&client, seen, 4.0).await;
    let want = vec!["w1".to_string(), "w3".to_string(), "w4".to_string()];
    eventually("w1, w3 and w4 Ready and w2 gone", Duration::from_secs(60), || async {
        let ready = ready_names(&pods).await?;
        let w2_gone = pods.get_opt("w2").await?.is_none();
        Ok((ready == want && w2_gone).then_some(()))
    })
    .await;

    // What kube-controller-manager's node lifecycle controller does to the pods of a node
    // it sees NotReady: the Ready condition set False, the containers left as they are.
    let w1 = pods.get("w1").await.unwrap();
    let mut status = serde_json::to_value(w1.status.clone().unwrap()).unwrap();
    for c in status["conditions"].as_array_mut().unwrap() {
        if c["type"] == "Ready" {
            c["status"] = json!("False");
        }
    }
    pods.patch_status("w1", &PatchParams::default(), &Patch::Merge(&json!({"status": status}))).await.unwrap();
    eventually("the kubelet to set w1 Ready again", Duration::from_secs(30), || async {
        Ok(is_ready(&pods.get("w1").await?).then_some(()))
    })
    .await;
}
