//! `kubeshift migrate apply`, `rollback` and `status`: the cluster-facing half of the
//! node-migrator (DESIGN.md, "Migration").

use crate::kubeconfig::ClusterArgs;
use crate::migrate_cmd::{ApplyArgs, Output, RollbackArgs, StatusArgs};
use crate::output_format::narrow;
use anyhow::{bail, Context, Result};
use kube::api::{Api, ListParams};
use kubeshift_node_migrator::crd::{ClusterMigration, NodeMigration};
use std::fmt::Write as _;

pub async fn apply(a: ApplyArgs, cluster: &ClusterArgs) -> Result<()> {
    let _ = (a, cluster);
    bail!("`migrate apply` is not built yet: kubeshift's own pod network (CNI plugin, overlay, agent DaemonSet) it switches nodes to does not exist yet; nothing was changed")
}

pub async fn rollback(a: RollbackArgs, cluster: &ClusterArgs) -> Result<()> {
    let _ = (a, cluster);
    bail!("`migrate rollback` is not built yet (there is no `migrate apply` to undo); nothing was changed")
}

/// One node's line in `migrate status`, also its JSON/YAML shape.
#[derive(serde::Serialize)]
struct NodeLine {
    node: String,
    wave: String,
    phase: String,
    ready: bool,
    reached: Option<String>,
    in_progress: Option<String>,
    started: Option<String>,
    last_step: Option<String>,
    blocked: Option<String>,
}

fn node_line(nm: &NodeMigration) -> NodeLine {
    let st = nm.status.clone().unwrap_or_default();
    let name = |s: &kubeshift_planner::plan::StepAction| Some(kubeshift_node_migrator::next::name(*s));
    NodeLine {
        node: nm.spec.node.clone(),
        wave: nm.spec.wave.clone(),
        phase: if st.phase.is_empty() { "Pending".into() } else { st.phase.clone() },
        ready: st.ready,
        reached: st.reached.as_ref().and_then(name),
        in_progress: st.in_progress.as_ref().and_then(|p| name(&p.step)),
        started: st.history.first().map(|h| h.started_at.clone()),
        last_step: st.history.last().map(|h| format!("{} {}", kubeshift_node_migrator::next::name(h.step), h.summary)),
        blocked: st.blocked.clone(),
    }
}

pub async fn status(a: StatusArgs, cluster: &ClusterArgs) -> Result<()> {
    let output: Output = narrow(a.output, "migrate status")?;
    let client = cluster.client().await?;
    let nms: Api<NodeMigration> = Api::all(client.clone());
    let list = match nms.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            println!("no migration has started on this cluster (the nodemigrations.kubeshift.io CRD is not installed)");
            return Ok(());
        }
        Err(e) => return Err(e).context("listing nodemigrations.kubeshift.io"),
    };
    let clusters: Api<ClusterMigration> = Api::all(client);
    let cluster = clusters.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    let lines: Vec<NodeLine> = list.iter().map(node_line).collect();
    let doc = serde_json::json!({
        "cluster": cluster.first().map(|c| serde_json::json!({
            "plan": c.spec.plan, "phase": c.status.as_ref().map(|s| s.phase.clone()).unwrap_or_default(),
        })),
        "nodes": lines,
    });
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&doc)?),
        Output::Table => print!("{}", table(&lines)),
    }
    Ok(())
}

fn table(lines: &[NodeLine]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:<16} {:<14} {:<20} {:<6} LAST STEP / BLOCKED", "NODE", "WAVE", "PHASE", "READY");
    for l in lines {
        let last = l.blocked.clone().map(|b| format!("BLOCKED: {b}")).or(l.last_step.clone()).unwrap_or_default();
        let _ = writeln!(s, "{:<16} {:<14} {:<20} {:<6} {last}", l.node, l.wave, l.phase, l.ready);
    }
    if lines.is_empty() {
        let _ = writeln!(s, "(no NodeMigrations: `kubeshift migrate apply` has not started any node)");
    }
    s
}
