//! The migration's long-lived connections: prepare opens them between pods on every
//! node (and from each node's host) through ClusterIPs, in a namespace of their own;
//! every gate checks them and opens them afresh, so pods already on kubeshift's network
//! keep connections through the next node's step.
//!
//! Which connections end by design, and are not judged:
//! - those of a pod that was drained and replaced (its pod UID changed since they were
//!   opened): the drained node's pods, and whoever talked to them;
//! - those that start on the node just migrated: its pods were drained, and its host's
//!   service connections lose kube-proxy's conntrack entries, which clean-kube-proxy
//!   deletes on purpose (a stale DNAT entry would outlive the rules it came from).
//!
//! Every other connection must still be the same live connection.

use super::Ctx;
use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kubeshift_connectivity_test::deploy::{self, DeployConfig, Endpoint, PART_OF};
use kubeshift_connectivity_test::disrupt;
use kubeshift_node_migrator::crd::{ConnectionsRecord, MANAGER};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

pub const NAMESPACE: &str = "kubeshift-conn";
/// The UID of every endpoint pod when its connections were opened.
const PODS_CONFIGMAP: &str = "kubeshift-conn-pods";
const WAIT: Duration = Duration::from_secs(180);
/// Beside the gate's host-network endpoints (40080-40082) on the same nodes.
const HOST_PORT_BASE: u16 = 40180;

fn config(nodes: Vec<String>) -> DeployConfig {
    super::gate::deploy_config(NAMESPACE, nodes, HOST_PORT_BASE)
}

/// (Re)creates the endpoint pods that are missing and waits until all are Ready.
async fn endpoints(cx: &Ctx, nodes: &[String]) -> Result<Vec<Endpoint>> {
    let cfg = config(nodes.to_vec());
    deploy::check_namespaces_are_ours(&cx.client, &cfg).await?;
    let picked = deploy::pick_nodes(&cx.client, &cfg.nodes).await?;
    deploy::deploy(&cx.client, &cfg, &picked).await?;
    deploy::wait_endpoints(&cx.client, &cfg, &picked, WAIT, |_, _| {})
        .await
        .with_context(|| format!("the long-lived connections' pods in namespace {NAMESPACE}"))
}

async fn pod_uids(cx: &Ctx) -> Result<BTreeMap<String, String>> {
    let pods: Api<Pod> = Api::namespaced(cx.client.clone(), NAMESPACE);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/part-of={PART_OF}"));
    Ok(pods
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.metadata.name?, p.metadata.uid?)))
        .collect())
}

/// Opens a new generation of connections on `nodes` and records the pods they run in.
pub async fn open(cx: &Ctx, nodes: &[String]) -> Result<usize> {
    let (n, failures) = try_open(cx, nodes).await?;
    ensure!(
        failures.is_empty(),
        "long-lived connections between {nodes:?} could not be opened: {}",
        failures.join("; ")
    );
    Ok(n)
}

/// [`open`], the connections that could not be opened returned as failures (a gate's).
async fn try_open(cx: &Ctx, nodes: &[String]) -> Result<(usize, Vec<String>)> {
    let eps = endpoints(cx, nodes).await?;
    let setup = disrupt::setup(&cx.client, NAMESPACE, &eps, Duration::from_secs(60)).await?;
    if !setup.failures.is_empty() {
        let failures = setup
            .failures
            .iter()
            .map(|f| format!("long-lived connection {} -> {} could not be opened: {}", f.from, f.to, f.detail))
            .collect();
        return Ok((setup.checks, failures));
    }
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": PODS_CONFIGMAP, "namespace": NAMESPACE},
        "data": pod_uids(cx).await?,
    });
    Api::<ConfigMap>::namespaced(cx.client.clone(), NAMESPACE)
        .patch(PODS_CONFIGMAP, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&cm))
        .await
        .with_context(|| format!("recording the connections' pods in ConfigMap {NAMESPACE}/{PODS_CONFIGMAP}"))?;
    Ok((setup.checks, vec![]))
}

/// Pure: whether a connection opened when the pods had `opened` UIDs is still judged,
/// after `migrated`'s step, with the pods now at `current`.
pub fn judged(
    s: &disrupt::Stream,
    opened: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
    migrated: Option<&str>,
) -> bool {
    let same = |pod: &str| opened.get(pod).is_some_and(|u| current.get(pod) == Some(u));
    migrated != Some(s.from_node.as_str()) && same(&s.from_pod) && same(&s.to_pod)
}

/// After `migrated`'s step (None: after finish): every connection that should have
/// survived did, then a new generation is opened for the next step. Prepare by an
/// older kubeshift opened none: nothing is judged, they are opened now.
pub async fn check_and_reopen(
    cx: &Ctx,
    nodes: &[String],
    migrated: Option<&str>,
) -> Result<(ConnectionsRecord, Vec<String>)> {
    let cms: Api<ConfigMap> = Api::namespaced(cx.client.clone(), NAMESPACE);
    let opened = cms.get_opt(PODS_CONFIGMAP).await?.and_then(|c| c.data);
    let mut failures = vec![];
    let mut record = ConnectionsRecord::default();
    if let Some(opened) = opened {
        // Drained pods come back (on the node's new network) before the check: it reads
        // the endpoints' Services, and the next generation needs them.
        let eps = endpoints(cx, nodes).await?;
        let current = pod_uids(cx).await?;
        let all = disrupt::streams(&eps).len();
        let outcome =
            disrupt::check_where(&cx.client, NAMESPACE, &eps, |s| judged(s, &opened, &current, migrated)).await?;
        record.judged = outcome.checks;
        record.ended_by_design = all - outcome.checks;
        failures.extend(
            outcome.failures.iter().map(|f| format!("long-lived connection {} -> {}: {}", f.from, f.to, f.detail)),
        );
    }
    // After finish nothing follows to open them for.
    if failures.is_empty() && migrated.is_some() {
        failures.extend(try_open(cx, nodes).await?.1);
    }
    Ok((record, failures))
}

/// Before a drain: the node's connection pods go (they are bare pods, ours; their
/// connections end by design) so the drain does not stop on them.
pub async fn release(cx: &Ctx, node: &str) -> Result<Vec<String>> {
    let cfg = config(vec![]);
    let mut gone = vec![];
    for ns in [NAMESPACE.to_string(), deploy::peer_namespace(&cfg)] {
        let pods: Api<Pod> = Api::namespaced(cx.client.clone(), &ns);
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        for p in pods.list(&lp).await?.items {
            let host = p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
            let Some(name) = p.metadata.name else { continue };
            if host || p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            match pods.delete(&name, &DeleteParams::default()).await {
                Ok(_) => gone.push(format!("{ns}/{name}")),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {ns}/{name} before the drain")),
            }
        }
    }
    Ok(gone)
}

/// After finish, or when the migration is rolled back whole: the namespaces go.
pub async fn close(cx: &Ctx) -> Result<()> {
    deploy::cleanup(&cx.client, &config(vec![]), Duration::from_secs(120)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeshift_connectivity_test::model::StreamSpec;

    fn stream(from_pod: &str, from_node: &str, to_pod: &str) -> disrupt::Stream {
        disrupt::Stream {
            from_pod: from_pod.into(),
            from_node: from_node.into(),
            to_pod: to_pod.into(),
            spec: StreamSpec { id: format!("{from_pod} -> {to_pod}"), addr: "10.96.0.10".into(), port: 8082 },
        }
    }

    #[test]
    fn replaced_pods_and_the_migrated_nodes_own_connections_are_not_judged() {
        let opened: BTreeMap<String, String> =
            [("pod-1-node-1", "a"), ("pod-1-node-2", "b"), ("pod-1-node-3", "c"), ("host-node-2", "h")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let mut current = opened.clone();
        current.insert("pod-1-node-2".into(), "b2".into());
        // node-3 -> node-1: neither end touched.
        assert!(judged(&stream("pod-1-node-3", "node-3", "pod-1-node-1"), &opened, &current, Some("node-2")));
        // node-1 -> node-2's replaced pod, and that pod's own connection.
        assert!(!judged(&stream("pod-1-node-1", "node-1", "pod-1-node-2"), &opened, &current, Some("node-2")));
        assert!(!judged(&stream("pod-1-node-2", "node-2", "pod-1-node-3"), &opened, &current, Some("node-2")));
        // The migrated node's host keeps its pod but loses kube-proxy's conntrack entries.
        assert!(!judged(&stream("host-node-2", "node-2", "pod-1-node-3"), &opened, &current, Some("node-2")));
        // After finish (no node migrated), the host's connection is judged.
        assert!(judged(&stream("host-node-2", "node-2", "pod-1-node-3"), &opened, &current, None));
        // A pod gone without a replacement ends its connections too.
        current.remove("pod-1-node-3");
        assert!(!judged(&stream("pod-1-node-1", "node-1", "pod-1-node-3"), &opened, &current, None));
    }
}
