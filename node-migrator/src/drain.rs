//! Cordon and drain, as `kubectl drain --ignore-daemonsets` does, through the eviction
//! API so PodDisruptionBudgets are honoured. Pods that keep their network through the
//! migration stay: DaemonSet pods (their DaemonSet recreates them anyway), mirror pods
//! (the kubelet owns them) and hostNetwork pods. A pod that no controller would
//! recreate stops the drain with its name unless the caller forces it.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(
        "node {node}: {pods:?} have no controller that would recreate them; evicting them loses them. Move them off the node, or pass --force"
    )]
    Unmanaged { node: String, pods: Vec<String> },
    #[error("node {node}: drain did not finish in {timeout:?}: {why}")]
    Timeout { node: String, timeout: Duration, why: String },
    #[error("node {node}: evicting {pod}: {message}")]
    Evict { node: String, pod: String, message: String },
    #[error("node {node}: {0}", node = .1)]
    Api(#[source] kube::Error, String),
}

/// Why a pod is left on a draining node, or that it must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Evict,
    /// No controller owns it: evicting it deletes it for good.
    EvictUnmanaged,
    KeepDaemonSet,
    KeepMirror,
    KeepHostNetwork,
    /// Succeeded or Failed: nothing runs, nothing to move.
    KeepFinished,
    /// Already being deleted: waited for, not evicted.
    Leaving,
}

/// Pure: what draining does with `pod`.
pub fn disposition(pod: &Pod) -> Disposition {
    let annotations = pod.metadata.annotations.as_ref();
    if annotations.is_some_and(|a| a.contains_key("kubernetes.io/config.mirror")) {
        return Disposition::KeepMirror;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Disposition::Leaving;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    if phase == "Succeeded" || phase == "Failed" {
        return Disposition::KeepFinished;
    }
    let controller = pod.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    if controller.is_some_and(|o| o.kind == "DaemonSet") {
        return Disposition::KeepDaemonSet;
    }
    if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
        return Disposition::KeepHostNetwork;
    }
    if controller.is_none() {
        return Disposition::EvictUnmanaged;
    }
    Disposition::Evict
}

fn key(p: &Pod) -> String {
    format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or(""), p.metadata.name.as_deref().unwrap_or(""))
}

/// Marks the node unschedulable. Returns whether this call changed it, which is what
/// cordon's inverse needs: a node an operator had cordoned stays cordoned on rollback.
pub async fn cordon(client: &Client, node: &str, unschedulable: bool) -> Result<bool, DrainError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let api_err = |e| DrainError::Api(e, node.to_string());
    let cur = nodes.get(node).await.map_err(api_err)?;
    let was = cur.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    if was == unschedulable {
        return Ok(false);
    }
    let patch = json!({"spec": {"unschedulable": unschedulable}});
    nodes.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(api_err)?;
    Ok(true)
}

pub async fn is_cordoned(client: &Client, node: &str) -> Result<bool, DrainError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let cur = nodes.get(node).await.map_err(|e| DrainError::Api(e, node.to_string()))?;
    Ok(cur.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false))
}

pub async fn pods_on(client: &Client, node: &str) -> Result<Vec<Pod>, DrainError> {
    let pods: Api<Pod> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    Ok(pods.list(&lp).await.map_err(|e| DrainError::Api(e, node.to_string()))?.items)
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DrainReport {
    pub evicted: Vec<String>,
    pub kept: Vec<String>,
}

/// The eviction body's API version: policy/v1 where served (1.22+), else v1beta1 (the
/// only one a 1.20 apiserver accepts on the eviction subresource).
async fn eviction_version(client: &Client) -> String {
    match client.list_api_group_resources("policy/v1").await {
        Ok(r) if r.resources.iter().any(|r| r.name == "poddisruptionbudgets") => "policy/v1".into(),
        _ => "policy/v1beta1".into(),
    }
}

enum Evicted {
    Yes,
    /// A PodDisruptionBudget says not now (429); try again later.
    NotNow(String),
}

async fn evict(client: &Client, version: &str, pod: &Pod) -> Result<Evicted, kube::Error> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let body = json!({"apiVersion": version, "kind": "Eviction", "metadata": {"name": name, "namespace": ns}});
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{name}/eviction"))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&body).expect("eviction body"))
        .expect("eviction request");
    match client.request_text(req).await {
        Ok(_) => Ok(Evicted::Yes),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Evicted::Yes),
        Err(kube::Error::Api(s)) if s.code == 429 => Ok(Evicted::NotNow(s.message)),
        Err(e) => Err(e),
    }
}

/// Evicts every pod that must leave `node` and waits until they are gone. The node
/// must be cordoned first, or the scheduler puts the pods straight back. `client` must
/// not retry 429s itself (`Config::default_retry = false`): the eviction API answers
/// 429 while a PodDisruptionBudget forbids the eviction, and kube's default retry policy
/// would sit on it for minutes past `timeout`.
pub async fn drain(client: &Client, node: &str, timeout: Duration, force: bool) -> Result<DrainReport, DrainError> {
    let deadline = Instant::now() + timeout;
    let pods = pods_on(client, node).await?;
    let mut report = DrainReport::default();
    let mut to_evict = vec![];
    let mut unmanaged = vec![];
    let mut leaving: BTreeSet<String> = BTreeSet::new();
    for p in pods {
        match disposition(&p) {
            Disposition::Evict => to_evict.push(p),
            Disposition::EvictUnmanaged if force => to_evict.push(p),
            Disposition::EvictUnmanaged => unmanaged.push(key(&p)),
            Disposition::Leaving => {
                leaving.insert(p.metadata.uid.clone().unwrap_or_default());
            }
            _ => report.kept.push(key(&p)),
        }
    }
    if !unmanaged.is_empty() {
        return Err(DrainError::Unmanaged { node: node.into(), pods: unmanaged });
    }
    let version = eviction_version(client).await;
    let mut waiting: Vec<Pod> = to_evict;
    let mut evicted_uids: BTreeSet<String> = leaving;
    let mut last_refusal = String::new();
    loop {
        let mut still = vec![];
        for p in waiting {
            match evict(client, &version, &p).await {
                Ok(Evicted::Yes) => {
                    evicted_uids.insert(p.metadata.uid.clone().unwrap_or_default());
                    report.evicted.push(key(&p));
                }
                Ok(Evicted::NotNow(why)) => {
                    last_refusal = format!("{}: {why}", key(&p));
                    still.push(p);
                }
                Err(e) => return Err(DrainError::Evict { node: node.into(), pod: key(&p), message: e.to_string() }),
            }
        }
        waiting = still;
        let left = pods_on(client, node).await?;
        let gone = !left.iter().any(|p| evicted_uids.contains(p.metadata.uid.as_deref().unwrap_or("")));
        if waiting.is_empty() && gone {
            return Ok(report);
        }
        if Instant::now() > deadline {
            let why = if !waiting.is_empty() {
                format!("a PodDisruptionBudget keeps refusing the eviction of {last_refusal}")
            } else {
                let stuck: Vec<String> = left
                    .iter()
                    .filter(|p| evicted_uids.contains(p.metadata.uid.as_deref().unwrap_or("")))
                    .map(key)
                    .collect();
                format!("evicted pods still terminating: {stuck:?}")
            };
            return Err(DrainError::Timeout { node: node.into(), timeout, why });
        }
        // PDB refusals and pod termination are both waited out by polling: neither has an
        // event to await that says "now it would be allowed".
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn daemonset_mirror_hostnetwork_and_finished_pods_stay() {
        let owned =
            |kind: &str| json!([{"apiVersion": "apps/v1", "kind": kind, "name": "x", "uid": "u", "controller": true}]);
        let cases = [
            (json!({"metadata": {"name": "a", "ownerReferences": owned("ReplicaSet")}}), Disposition::Evict),
            (json!({"metadata": {"name": "b", "ownerReferences": owned("DaemonSet")}}), Disposition::KeepDaemonSet),
            (
                json!({"metadata": {"name": "c", "annotations": {"kubernetes.io/config.mirror": "h"}}}),
                Disposition::KeepMirror,
            ),
            (
                json!({"metadata": {"name": "d", "ownerReferences": owned("ReplicaSet")}, "spec": {"hostNetwork": true, "containers": []}}),
                Disposition::KeepHostNetwork,
            ),
            (json!({"metadata": {"name": "e"}}), Disposition::EvictUnmanaged),
            (json!({"metadata": {"name": "f"}, "status": {"phase": "Succeeded"}}), Disposition::KeepFinished),
            (json!({"metadata": {"name": "h", "deletionTimestamp": "2026-12-02T00:00:00Z"}}), Disposition::Leaving),
            // An owner that is not the controller (e.g. a garbage-collection parent) recreates nothing.
            (
                json!({"metadata": {"name": "g", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}]}}),
                Disposition::EvictUnmanaged,
            ),
        ];
        for (p, want) in cases {
            let p = pod(p);
            assert_eq!(disposition(&p), want, "{}", key(&p));
        }
    }
}
