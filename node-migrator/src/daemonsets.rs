//! Taking a DaemonSet (kube-proxy, the legacy CNI's agent) off one node at a time.
//!
//! Prepare gives the DaemonSet a node-affinity expression "label `L` does not exist";
//! from then on, moving a node is a label change: label the node and the DaemonSet
//! controller deletes its pod there; remove the label and the pod comes back. This is
//! how Cilium's and Calico's migrations do it (MIGRATION-FACTS §1, §2).
//!
//! Forward / inverse / postcondition, per step:
//! - `exclude`: adds the expression to every nodeSelectorTerm (terms are ORed, so it must
//!   be in each) and returns the DaemonSet's affinity as it was; `restore` puts exactly
//!   that back. Editing the pod template rolls the DaemonSet's pods once, on every node.
//! - `label_node`: sets or removes the label, reporting whether it changed anything, so
//!   the inverse of "already labelled" is "leave it".
//! - `wait_gone_from` / `wait_ready_on`: the DaemonSet's pod on the node is gone / Ready.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use std::time::{Duration, Instant};

/// On a node whose kube-proxy has been taken off.
pub const NO_KUBE_PROXY: &str = "kubeshift.io/no-kube-proxy";
/// On a node whose legacy CNI agent has been taken off.
pub const NO_LEGACY_CNI: &str = "kubeshift.io/no-legacy-cni";

#[derive(Debug, thiserror::Error)]
pub enum DaemonSetError {
    #[error("DaemonSet {0}: {1}")]
    Api(String, #[source] kube::Error),
    #[error("node {node}: {what} did not happen within {timeout:?}; {state}")]
    Timeout { node: String, what: String, timeout: Duration, state: String },
}

fn excludes(term: &NodeSelectorTerm, label: &str) -> bool {
    term.match_expressions.iter().flatten().any(|e| e.key == label && e.operator == "DoesNotExist")
}

/// Pure: `affinity` with "`label` does not exist" required in every node selector term.
pub fn with_exclusion(affinity: Option<Affinity>, label: &str) -> Affinity {
    let mut a = affinity.unwrap_or_default();
    let na = a.node_affinity.get_or_insert_with(NodeAffinity::default);
    let required = na.required_during_scheduling_ignored_during_execution.get_or_insert_with(NodeSelector::default);
    if required.node_selector_terms.is_empty() {
        required.node_selector_terms.push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        if !excludes(term, label) {
            term.match_expressions.get_or_insert_with(Vec::new).push(NodeSelectorRequirement {
                key: label.to_string(),
                operator: "DoesNotExist".into(),
                values: None,
            });
        }
    }
    a
}

/// Pure: whether every term of `affinity` already carries the exclusion.
pub fn is_excluded(affinity: Option<&Affinity>, label: &str) -> bool {
    affinity
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .is_some_and(|r| !r.node_selector_terms.is_empty() && r.node_selector_terms.iter().all(|t| excludes(t, label)))
}

fn ds_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn template_affinity(ds: &DaemonSet) -> Option<Affinity> {
    ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).and_then(|p| p.affinity.clone())
}

/// Adds the exclusion to the DaemonSet; returns its affinity as it was before (what
/// [`restore`] takes), or `None` when it already had the exclusion and nothing changed.
pub async fn exclude(
    client: &Client,
    ns: &str,
    name: &str,
    label: &str,
) -> Result<Option<Option<Affinity>>, DaemonSetError> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let err = |e| DaemonSetError::Api(ds_key(ns, name), e);
    let ds = api.get(name).await.map_err(err)?;
    let before = template_affinity(&ds);
    if is_excluded(before.as_ref(), label) {
        return Ok(None);
    }
    set_affinity(&api, name, Some(with_exclusion(before.clone(), label))).await.map_err(err)?;
    Ok(Some(before))
}

/// Puts back the affinity [`exclude`] found.
pub async fn restore(client: &Client, ns: &str, name: &str, before: Option<Affinity>) -> Result<(), DaemonSetError> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    set_affinity(&api, name, before).await.map_err(|e| DaemonSetError::Api(ds_key(ns, name), e))
}

async fn set_affinity(api: &Api<DaemonSet>, name: &str, affinity: Option<Affinity>) -> Result<(), kube::Error> {
    // A JSON merge patch replaces the whole affinity object (null removes it), which is
    // what restoring "exactly as it was" needs; a strategic merge would merge the terms.
    let patch = json!({"spec": {"template": {"spec": {"affinity": affinity}}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
}

/// Sets (`present`) or removes the label on the node; whether it changed anything.
pub async fn label_node(client: &Client, node: &str, label: &str, present: bool) -> Result<bool, DaemonSetError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let err = |e| DaemonSetError::Api(format!("(node {node} label {label})"), e);
    let cur = nodes.get(node).await.map_err(err)?;
    let has = cur.metadata.labels.as_ref().is_some_and(|l| l.contains_key(label));
    if has == present {
        return Ok(false);
    }
    let value = present.then_some("true");
    let patch = json!({"metadata": {"labels": {label: value}}});
    nodes.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(err)?;
    Ok(true)
}

fn owned_by(p: &Pod, ds: &DaemonSet) -> bool {
    p.metadata.owner_references.iter().flatten().any(|o| Some(&o.uid) == ds.metadata.uid.as_ref())
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn pods_of_on(client: &Client, ns: &str, name: &str, node: &str) -> Result<Vec<Pod>, DaemonSetError> {
    let err = |e| DaemonSetError::Api(ds_key(ns, name), e);
    let ds = Api::<DaemonSet>::namespaced(client.clone(), ns).get(name).await.map_err(err)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default().fields(&format!("spec.nodeName={node}"))).await.map_err(err)?;
    Ok(list.items.into_iter().filter(|p| owned_by(p, &ds)).collect())
}

async fn wait_until(
    client: &Client,
    ns: &str,
    name: &str,
    node: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[Pod]) -> bool,
) -> Result<(), DaemonSetError> {
    let deadline = Instant::now() + timeout;
    loop {
        let pods = pods_of_on(client, ns, name, node).await?;
        if done(&pods) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let state: Vec<String> = pods
                .iter()
                .map(|p| format!("{} ready={}", p.metadata.name.as_deref().unwrap_or(""), is_ready(p)))
                .collect();
            return Err(DaemonSetError::Timeout {
                node: node.into(),
                what: format!("{what} ({})", ds_key(ns, name)),
                timeout,
                state: format!("its pods there: {state:?}"),
            });
        }
        // The DaemonSet controller and the kubelet act on their own time; polling the
        // node's pods is the condition itself.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn wait_gone_from(
    client: &Client,
    ns: &str,
    name: &str,
    node: &str,
    timeout: Duration,
) -> Result<(), DaemonSetError> {
    wait_until(client, ns, name, node, timeout, "its pod leaving the node", |p| p.is_empty()).await
}

pub async fn wait_ready_on(
    client: &Client,
    ns: &str,
    name: &str,
    node: &str,
    timeout: Duration,
) -> Result<(), DaemonSetError> {
    let ready = |p: &[Pod]| p.iter().any(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none());
    wait_until(client, ns, name, node, timeout, "its pod Ready on the node", ready).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affinity(v: serde_json::Value) -> Affinity {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_exclusion_goes_into_every_term_once() {
        // Flannel's upstream DaemonSet: one term, kubernetes.io/os In [linux].
        let flannel = affinity(json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]},
            {"matchExpressions": [{"key": "beta.kubernetes.io/os", "operator": "In", "values": ["linux"]}]},
        ]}}}));
        let out = with_exclusion(Some(flannel.clone()), NO_LEGACY_CNI);
        let terms = &out
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 2);
        for t in terms {
            let e = t.match_expressions.as_ref().unwrap();
            assert_eq!(e.len(), 2, "the original expression stays and ours is added: {e:?}");
            assert!(excludes(t, NO_LEGACY_CNI));
        }
        assert!(is_excluded(Some(&out), NO_LEGACY_CNI));
        assert!(!is_excluded(Some(&flannel), NO_LEGACY_CNI));
        assert_eq!(with_exclusion(Some(out.clone()), NO_LEGACY_CNI), out, "twice is once");
    }

    #[test]
    fn no_affinity_gets_one_term_and_other_affinities_stay() {
        let out = with_exclusion(None, NO_KUBE_PROXY);
        assert!(is_excluded(Some(&out), NO_KUBE_PROXY));
        let with_pod_affinity =
            affinity(json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}));
        let out = with_exclusion(Some(with_pod_affinity), NO_KUBE_PROXY);
        assert!(out.pod_anti_affinity.is_some());
        assert!(is_excluded(Some(&out), NO_KUBE_PROXY));
    }
}
