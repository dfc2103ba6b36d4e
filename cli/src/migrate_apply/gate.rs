//! Gates: the connectivity suite run by apply itself, the baseline it is compared with,
//! and the JUnit file of every gate of a run.

use super::Ctx;
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kubeshift_connectivity_test::deploy::DeployConfig;
use kubeshift_connectivity_test::model::Matrix;
use kubeshift_connectivity_test::suite::{self, SuiteOptions, SuiteReport};
use kubeshift_node_migrator::crd::{now, GateRecord, NodeMigration, MANAGER};
use serde_json::json;
use std::time::Duration;

const BASELINE_KEY: &str = "matrix.json";
/// The baseline's endpoints: every node up to this many (the suite's pods grow with the
/// square of the nodes); gates of nodes beyond it compare the pairs both runs share.
const BASELINE_NODES: usize = 8;

/// The suite's pods in `namespace`: the gates', and the long-lived connections'.
pub fn deploy_config(namespace: &str, nodes: Vec<String>, host_port_base: u16) -> DeployConfig {
    DeployConfig {
        host_port_base,
        namespace: namespace.into(),
        echo_image: "registry.k8s.io/e2e-test-images/agnhost:2.39".into(),
        agent_image: crate::install_cmd::DEFAULT_IMAGE.into(),
        agent_command: vec!["kubeshift".into()],
        nodes,
    }
}

/// The nodes the baseline and the long-lived connections span.
pub fn baseline_nodes(cx: &Ctx) -> Vec<String> {
    cx.plan_nodes().into_iter().take(BASELINE_NODES).collect()
}

fn options(nodes: Vec<String>) -> SuiteOptions {
    SuiteOptions {
        deploy: deploy_config("kubeshift-gate", nodes, kubeshift_connectivity_test::deploy::HOST_PORT_BASE),
        probe_timeout: Duration::from_secs(2),
        filter: None,
        keep: false,
        compare: None,
        progress: false,
        settle: Duration::from_secs(10),
        conn_disrupt_setup: false,
        include_conn_disrupt: false,
    }
}

pub fn baseline_name(plan: &str) -> String {
    format!("kubeshift-baseline-{plan}")
}

/// prepare's baseline: the suite across the plan's nodes on the legacy datapath, its
/// verdict matrix kept in a ConfigMap so a resumed run (or another machine) has it.
pub async fn take_baseline(cx: &Ctx) -> Result<(String, Matrix)> {
    let nodes = baseline_nodes(cx);
    let opts = options(nodes.clone());
    kubeshift_connectivity_test::deploy::cleanup(&cx.client, &opts.deploy, Duration::from_secs(120)).await?;
    let report = suite::run(&cx.client, &opts).await.context("baseline connectivity suite")?;
    anyhow::ensure!(
        report.passed(),
        "the baseline connectivity suite fails before anything changed (nodes {nodes:?}):\n{}\nFix the cluster first; nothing was migrated",
        kubeshift_connectivity_test::report::text(&report)
    );
    let matrix = judged(&report);
    let name = baseline_name(&cx.plan.metadata.name);
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": super::phases::AGENT_NS, "labels": {"app.kubernetes.io/part-of": "kubeshift"}},
        "data": {BASELINE_KEY: serde_json::to_string(&matrix)?},
    });
    Api::<ConfigMap>::namespaced(cx.client.clone(), super::phases::AGENT_NS)
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&cm))
        .await
        .with_context(|| format!("saving the baseline in ConfigMap kube-system/{name}"))?;
    Ok((name, matrix))
}

/// The report's matrix without the verdicts of scenarios it could not judge: on Flannel
/// every policy scenario "allows" everything because nothing enforces policy, and
/// kubeshift enforcing them later is the point, not a changed verdict.
fn judged(report: &SuiteReport) -> Matrix {
    let mut m = report.matrix.clone();
    for s in report.scenarios.iter().filter(|s| s.skipped.is_some()) {
        let prefix = format!("{}: ", s.name);
        m.entries.retain(|k, _| !k.starts_with(&prefix));
    }
    m
}

pub async fn load_baseline(cx: &Ctx, name: &str) -> Result<Matrix> {
    let cm = Api::<ConfigMap>::namespaced(cx.client.clone(), super::phases::AGENT_NS)
        .get(name)
        .await
        .with_context(|| format!("reading the baseline ConfigMap kube-system/{name}"))?;
    let text = cm.data.and_then(|d| d.get(BASELINE_KEY).cloned()).unwrap_or_default();
    serde_json::from_str(&text).with_context(|| format!("ConfigMap kube-system/{name} {BASELINE_KEY}"))
}

/// Pure: pairs both matrices judged, whose verdict differs. A pair only one of them
/// has (a scenario the legacy CNI could not judge, a node outside the baseline) is not
/// a change.
pub fn changed_verdicts(baseline: &Matrix, now: &Matrix) -> Vec<String> {
    Matrix::compare(baseline, now)
        .into_iter()
        .filter(|c| c.before.is_some() && c.after.is_some())
        .map(|c| format!("{}: {:?} -> {:?}", c.pair, c.before.unwrap(), c.after.unwrap()))
        .collect()
}

fn record(report: &SuiteReport, baseline: Option<&Matrix>) -> GateRecord {
    let changed = baseline.map(|b| changed_verdicts(b, &report.matrix)).unwrap_or_default();
    let failures: Vec<String> = report
        .scenarios
        .iter()
        .flat_map(|s| {
            s.failures.iter().map(move |f| format!("{}: {} -> {} ({}): {}", s.name, f.from, f.to, f.address, f.detail))
        })
        .collect();
    GateRecord {
        at: now(),
        passed: failures.is_empty() && changed.is_empty(),
        nodes: report.nodes.clone(),
        checks: report.scenarios.iter().map(|s| s.checks).sum(),
        failures,
        changed_verdicts: changed,
        seconds: report.seconds,
        connections: None,
    }
}

/// The plan's nodes, in order, that no step has touched yet.
async fn untouched(cx: &Ctx) -> Result<Vec<String>> {
    let nms = Api::<NodeMigration>::all(cx.client.clone()).list(&ListParams::default()).await?.items;
    let touched = |n: &str| {
        nms.iter().find(|m| m.spec.node == n).and_then(|m| m.status.as_ref()).and_then(|s| s.reached).is_some()
    };
    Ok(cx.plan_nodes().into_iter().filter(|n| !touched(n)).collect())
}

/// The node after its migration and a node not migrated yet (else the one before it):
/// both directions between the two networks, and the node's own pods.
pub async fn peer_for(cx: &Ctx, node: &str) -> Result<String> {
    if let Some(p) = untouched(cx).await?.into_iter().find(|n| n != node) {
        return Ok(p);
    }
    let order = cx.plan_nodes();
    let i = order.iter().position(|n| n == node).unwrap_or(0);
    order[..i]
        .last()
        .or_else(|| order.iter().find(|n| n.as_str() != node))
        .cloned()
        .with_context(|| format!("no other node to run node {node}'s gate with"))
}

/// One node's gate: the suite on it and its peer, compared with the baseline, and the
/// long-lived connections elsewhere unbroken.
pub async fn node_gate(cx: &Ctx, node: &str) -> Result<GateRecord> {
    let peer = peer_for(cx, node).await?;
    run_gate(cx, vec![node.to_string(), peer], Some(node)).await
}

/// The plan's gate after a wave of more than one node (one node's wave had it as that
/// node's gate): the suite across the wave's nodes and a node not migrated yet, against
/// the baseline, the long-lived connections all unbroken (nothing changed since the
/// last node's gate). None when there is none to run.
pub async fn wave_gate(cx: &Ctx, wave: &str) -> Result<Option<GateRecord>> {
    if !cx.has_wave_gate(wave) {
        return Ok(None);
    }
    let mut on: Vec<String> = cx.wave_nodes(wave).into_iter().take(BASELINE_NODES - 1).collect();
    on.extend(untouched(cx).await?.into_iter().next());
    Ok(Some(run_gate(cx, on, None).await?))
}

/// The suite on `nodes` and, beside it, the check of the long-lived connections after
/// `migrated`'s step (None: after finish).
pub async fn run_gate(cx: &Ctx, nodes: Vec<String>, migrated: Option<&str>) -> Result<GateRecord> {
    let opts = options(nodes.clone());
    // A run killed during a gate leaves the suite's namespaces: its bare pods would
    // block the next drain, and the next gate starts clean.
    kubeshift_connectivity_test::deploy::cleanup(&cx.client, &opts.deploy, Duration::from_secs(120)).await?;
    let conn_nodes = baseline_nodes(cx);
    let (report, conns) = tokio::join!(
        async { suite::run(&cx.client, &opts).await.with_context(|| format!("gate on {nodes:?}")) },
        super::streams::check_and_reopen(cx, &conn_nodes, migrated)
    );
    let baseline = cx.baseline.lock().unwrap().clone();
    let mut rec = record(&report?, baseline.as_ref());
    let (conns, broken) = conns?;
    rec.passed &= broken.is_empty();
    rec.checks += conns.judged;
    rec.failures.extend(broken);
    rec.connections = Some(conns);
    cx.gates.lock().unwrap().push((nodes.join("+"), rec.clone()));
    Ok(rec)
}

/// JUnit XML of every gate of this run: one testcase per gate.
pub fn junit(gates: &[(String, GateRecord)]) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let failed = gates.iter().filter(|(_, g)| !g.passed).count();
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"kubeshift migrate apply gates\" tests=\"{}\" failures=\"{failed}\">\n",
        gates.len()
    );
    for (name, g) in gates {
        out.push_str(&format!("  <testcase classname=\"gate\" name=\"{}\" time=\"{:.1}\">\n", esc(name), g.seconds));
        if !g.passed {
            let mut text = g.failures.clone();
            text.extend(g.changed_verdicts.iter().map(|c| format!("changed verdict {c}")));
            out.push_str(&format!(
                "    <failure message=\"{} problems\">{}</failure>\n",
                text.len(),
                esc(&text.join("\n"))
            ));
        }
        out.push_str("  </testcase>\n");
    }
    out.push_str("</testsuite>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeshift_connectivity_test::model::{pair_key, Proto, Verdict};

    #[test]
    fn only_pairs_both_runs_judged_count_as_changed() {
        let mut before = Matrix::new();
        let mut after = Matrix::new();
        let k1 = pair_key("node-1/pod-1", "node-2/pod-1", 8080, Proto::Tcp);
        let k2 = pair_key("node-1/pod-1", "node-3/pod-1", 8080, Proto::Tcp);
        before.entries.insert(k1.clone(), Verdict::Allowed);
        after.entries.insert(k1.clone(), Verdict::Denied);
        after.entries.insert(k2, Verdict::Allowed);
        let c = changed_verdicts(&before, &after);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].contains("node-2"));
        assert!(changed_verdicts(&before, &before).is_empty());
    }

    #[test]
    fn junit_has_one_case_per_gate_and_escapes_failures() {
        let ok = GateRecord {
            at: "t".into(),
            passed: true,
            nodes: vec!["a".into(), "b".into()],
            checks: 3,
            failures: vec![],
            changed_verdicts: vec![],
            seconds: 1.0,
            connections: None,
        };
        let bad = GateRecord { passed: false, failures: vec!["x -> <y>".into()], ..ok.clone() };
        let x = junit(&[("a+b".into(), ok), ("a+c".into(), bad)]);
        assert!(x.contains("tests=\"2\" failures=\"1\""), "{x}");
        assert!(x.contains("x -&gt; &lt;y&gt;"), "{x}");
    }
}
