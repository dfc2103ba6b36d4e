//! apply's half of a node's steps: the cluster-level ones, each with forward, inverse
//! and postcondition side by side. Every step tolerates "already done" (a re-run after
//! a kill) and its inverse tolerates "never done" (it reads what the forward recorded,
//! `Null` when it never ran). The node-local steps are the agent's
//! (`kubeshift_node_migrator::local`).
//!
//! | step | forward | inverse | postcondition |
//! |---|---|---|---|
//! | cordon | node unschedulable | schedulable again, if cordon made it so | `spec.unschedulable` |
//! | drain | kubeshift's connection pods deleted, the rest evicted (PDB-aware) | nothing: controllers recreated the pods elsewhere | no pod left to evict |
//! | install-datapath | (agent deployed in prepare) | nothing | the node's agent Ready |
//! | switch-pods | label active; legacy-addressed pods recreated | label standby; kubeshift-addressed pods recreated | agent reports active / standby |
//! | take-over-services | kube-proxy's pod leaves (node label) | label removed | kube-proxy's pod gone / Ready again |
//! | uncordon | schedulable | cordoned again, if uncordon changed it | `spec.unschedulable` |
//! | connectivity-gate | the suite on this node and another, verdicts vs the baseline | nothing | the suite passed |

use super::{gate, Ctx};
use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kubeshift_datapath::agent::modes::MODE_LABEL;
use kubeshift_node_migrator::crd::{Direction, NodeMigration};
use kubeshift_node_migrator::daemonsets::{self, NO_KUBE_PROXY};
use kubeshift_node_migrator::drain;
use kubeshift_node_migrator::next::forward_record;
use kubeshift_planner::plan::StepAction;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The agent DaemonSet prepare installs.
pub const AGENT_NS: &str = "kube-system";
pub const AGENT_DS: &str = "kubeshift-agent";
const AGENT_WAIT: Duration = Duration::from_secs(180);
const KUBE_PROXY_WAIT: Duration = Duration::from_secs(180);

/// Runs `step` of `nm`'s node in `direction`; what it changed and a line for status.
pub async fn run(cx: &Ctx, nm: &NodeMigration, step: StepAction, direction: Direction) -> Result<(Value, String)> {
    let node = nm.spec.node.as_str();
    let status = nm.status.clone().unwrap_or_default();
    let record = forward_record(&status, step);
    match (step, direction) {
        (StepAction::Cordon, Direction::Forward) => {
            let changed = drain::cordon(&cx.client, node, true).await?;
            Ok((json!({"cordoned": changed}), if changed { "cordoned" } else { "was cordoned already" }.into()))
        }
        (StepAction::Cordon, Direction::Rollback) => {
            if record["cordoned"] == json!(true) {
                drain::cordon(&cx.client, node, false).await?;
                return Ok((json!({"uncordoned": true}), "uncordoned".into()));
            }
            Ok((json!({}), "left as it was before the migration".into()))
        }
        (StepAction::Uncordon, Direction::Forward) => {
            let changed = drain::cordon(&cx.client, node, false).await?;
            Ok((json!({"uncordoned": changed}), "uncordoned".into()))
        }
        (StepAction::Uncordon, Direction::Rollback) => {
            if record["uncordoned"] == json!(true) {
                drain::cordon(&cx.client, node, true).await?;
            }
            Ok((json!({}), "cordoned again while the node goes back".into()))
        }
        (StepAction::Drain, Direction::Forward) => {
            let released = super::streams::release(cx, node).await?;
            let report = drain::drain(&cx.client, node, cx.drain_timeout, cx.force).await?;
            let summary = format!(
                "{} pods evicted, {} left (DaemonSet, mirror, host network), {} connection pods of kubeshift's deleted",
                report.evicted.len(),
                report.kept.len(),
                released.len()
            );
            let mut record = serde_json::to_value(&report)?;
            record["released"] = json!(released);
            Ok((record, summary))
        }
        (StepAction::InstallDatapath, Direction::Forward) => {
            daemonsets::wait_ready_on(&cx.client, AGENT_NS, AGENT_DS, node, AGENT_WAIT).await?;
            Ok((json!({}), "kubeshift's agent Ready on the node".into()))
        }
        (StepAction::SwitchPods, Direction::Forward) => switch(cx, node, true).await,
        (StepAction::SwitchPods, Direction::Rollback) => switch(cx, node, false).await,
        (StepAction::TakeOverServices, Direction::Forward) => {
            let Some((ns, name)) = &cx.kube_proxy else {
                return Ok((json!({}), "no kube-proxy DaemonSet in this cluster".into()));
            };
            let labelled = daemonsets::label_node(&cx.client, node, NO_KUBE_PROXY, true).await?;
            daemonsets::wait_gone_from(&cx.client, ns, name, node, KUBE_PROXY_WAIT).await?;
            Ok((json!({"labelled": labelled}), "kube-proxy left the node; kubeshift serves its Services".into()))
        }
        (StepAction::TakeOverServices, Direction::Rollback) => {
            daemonsets::label_node(&cx.client, node, NO_KUBE_PROXY, false).await?;
            let Some((ns, name)) = &cx.kube_proxy else { return Ok((json!({}), "no kube-proxy DaemonSet".into())) };
            daemonsets::wait_ready_on(&cx.client, ns, name, node, KUBE_PROXY_WAIT).await?;
            Ok((json!({}), "kube-proxy back and Ready on the node (it rewrites its chains)".into()))
        }
        (StepAction::ConnectivityGate, Direction::Forward) => {
            let g = gate::node_gate(cx, node).await?;
            let summary = format!("{} checks on {:?} in {:.0} s", g.checks, g.nodes, g.seconds);
            if !g.passed {
                return Err(super::GateFailed(g).into());
            }
            Ok((serde_json::to_value(&g)?, summary))
        }
        (_, Direction::Rollback) => Ok((json!({}), "nothing to undo".into())),
        (other, Direction::Forward) => {
            bail!("{} is not a step apply runs itself", kubeshift_node_migrator::next::name(other))
        }
    }
}

/// switch-pods and its inverse: the mode label, the agent's confirmation, then the
/// node's pods on the other network recreated (after a drain only DaemonSet pods are
/// left; their controller recreates them on the node, on the network now first).
async fn switch(cx: &Ctx, node: &str, active: bool) -> Result<(Value, String)> {
    let mode = if active { "active" } else { "standby" };
    let patch = json!({"metadata": {"labels": {MODE_LABEL: mode}}});
    Api::<Node>::all(cx.client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("labelling node {node} {MODE_LABEL}={mode}"))?;
    wait_agent_mode(cx, node, active).await?;
    let mut recreated = vec![];
    if !active {
        // Bare pods of kubeshift's own, which recreate_pods would leave alone: the next
        // gate brings them back on the legacy network.
        recreated.extend(super::streams::release(cx, node).await?);
    }
    recreated.extend(recreate_pods(cx, node, active).await?);
    let summary = format!(
        "agent {mode}; {} pods recreated on the {} network",
        recreated.len(),
        if active { "kubeshift" } else { "legacy" }
    );
    Ok((json!({"mode": mode, "recreated": recreated}), summary))
}

async fn agent_pod(cx: &Ctx, node: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(cx.client.clone(), AGENT_NS);
    let lp = ListParams::default().labels(&format!("k8s-app={AGENT_DS}")).fields(&format!("spec.nodeName={node}"));
    pods.list(&lp)
        .await?
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .and_then(|p| p.metadata.name)
        .with_context(|| format!("no {AGENT_NS}/{AGENT_DS} pod on node {node}"))
}

/// The agent's own word, through the apiserver's pod proxy: `/readyz` answers 200 and
/// its `kubeshift_agent_active` gauge is what was asked.
async fn wait_agent_mode(cx: &Ctx, node: &str, active: bool) -> Result<()> {
    let want = if active { " 1" } else { " 0" };
    let deadline = Instant::now() + AGENT_WAIT;
    let mut last;
    loop {
        match agent_get(cx, node, "/metrics").await {
            Ok(body) => {
                let gauge = body.lines().find(|l| l.starts_with("kubeshift_agent_active{"));
                let ready = body.lines().find(|l| l.starts_with("kubeshift_agent_ready{"));
                if gauge.is_some_and(|g| g.ends_with(want)) && ready.is_some_and(|r| r.ends_with(" 1")) {
                    return Ok(());
                }
                last = format!("{gauge:?}, {ready:?}");
                if let Ok(why) = agent_get(cx, node, "/readyz").await {
                    last.push_str(&format!("; /readyz: {}", why.trim()));
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "node {node}: the agent did not report {} and Ready within {AGENT_WAIT:?}; last: {last}",
                if active { "active" } else { "standby" }
            );
        }
        // The agent acts on the label on its own time; its metrics are the condition.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn agent_get(cx: &Ctx, node: &str, path: &str) -> Result<String> {
    let pod = agent_pod(cx, node).await?;
    let uri = format!("/api/v1/namespaces/{AGENT_NS}/pods/{pod}:{}/proxy{path}", super::AGENT_PORT);
    let req = http::Request::get(uri).body(Vec::new()).expect("a GET request builds");
    // /readyz answers 503 with its reasons while not ready: read the body either way.
    match cx.client.request_text(req).await {
        Ok(t) => Ok(t),
        Err(kube::Error::Api(s)) => Ok(s.message),
        Err(e) => Err(e).with_context(|| format!("GET {path} of {AGENT_NS}/{pod}")),
    }
}

/// Deletes the node's non-host pods whose address is on the wrong network (legacy
/// when going active, kubeshift's when going back). Only pods a controller recreates
/// are left on a drained node; a bare pod found here is named and left alone.
async fn recreate_pods(cx: &Ctx, node: &str, active: bool) -> Result<Vec<String>> {
    let target = cx.target_cidr;
    let pods: Api<Pod> = Api::all(cx.client.clone());
    let list = pods.list(&ListParams::default().fields(&format!("spec.nodeName={node}"))).await?;
    let mut deleted = Vec::new();
    for p in list.items {
        let host = p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|i| i.parse().ok());
        let managed = p.metadata.owner_references.as_ref().is_some_and(|o| !o.is_empty());
        let Some(ip) = ip else { continue };
        if host || p.metadata.deletion_timestamp.is_some() || target.contains(ip) == active {
            continue;
        }
        let (ns, name) =
            (p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default());
        if !managed {
            tracing::warn!("node {node}: bare pod {ns}/{name} stays on its network (no controller recreates it)");
            continue;
        }
        Api::<Pod>::namespaced(cx.client.clone(), &ns)
            .delete(&name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting {ns}/{name} so its controller recreates it"))?;
        deleted.push(format!("{ns}/{name}"));
    }
    Ok(deleted)
}

/// What each step will change, for `--dry-run` and the confirmation.
pub fn describe(step: StepAction, node: &str, cx: &Ctx) -> String {
    let kp = cx.kube_proxy.as_ref().map(|(n, d)| format!("{n}/{d}")).unwrap_or_else(|| "(none)".into());
    match step {
        StepAction::Snapshot => format!("agent on {node}: save iptables (both backends), nft, IPVS, links, routes, CNI conf files under /var/lib/kubeshift/snapshots"),
        StepAction::Cordon => format!("PATCH Node {node} spec.unschedulable=true"),
        StepAction::Drain => format!("POST pods/eviction for every pod on {node} but DaemonSet, mirror and host-network pods (PDBs honoured, --drain-timeout {:?})", cx.drain_timeout),
        StepAction::InstallDatapath => format!("wait for {AGENT_NS}/{AGENT_DS} Ready on {node}"),
        StepAction::SwitchPods => format!("PATCH Node {node} label {MODE_LABEL}=active (agent writes 00-kubeshift.conflist, attaches the datapath); DELETE DaemonSet pods on {node} still on the legacy network"),
        StepAction::TakeOverServices => format!("PATCH Node {node} label {NO_KUBE_PROXY}=true; kube-proxy DaemonSet {kp} leaves the node"),
        StepAction::CleanKubeProxy => format!("agent on {node}: delete kube-proxy's KUBE-* chains and jumps (both backends), its nftables tables, service conntrack entries"),
        StepAction::CleanLegacy => format!("agent on {node}: move the legacy CNI conf files out of /etc/cni/net.d"),
        StepAction::Uncordon => format!("PATCH Node {node} spec.unschedulable=false"),
        StepAction::ConnectivityGate => format!("connectivity suite on {node} and another node, verdicts compared with the baseline"),
    }
}
