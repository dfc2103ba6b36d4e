//! `kubeshift migrate apply`, `rollback` and `status`: the cluster-facing half of the
//! node-migrator (DESIGN.md, "Migration").

mod cluster;
mod gate;
mod phases;
mod streams;

use crate::kubeconfig::ClusterArgs;
use crate::migrate_cmd::{ApplyArgs, OnGateFailure, Output, RollbackArgs, StatusArgs};
use crate::output_format::narrow;
use anyhow::{anyhow, bail, Context, Result};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use kubeshift_connectivity_test::model::Matrix;
use kubeshift_datapath::overlay::Cidr;
use kubeshift_node_migrator::crd::{
    now, write_status, Condition, Direction, GateRecord, NodeMigration, NodeMigrationSpec, NodeMigrationStatus,
};
use kubeshift_node_migrator::lease::{identity, Lock};
use kubeshift_node_migrator::local::is_local;
use kubeshift_node_migrator::next::{self, entered, finished, Next};
use kubeshift_planner::analysis::analyze;
use kubeshift_planner::discovery::{discover, DiscoverOptions};
use kubeshift_planner::inventory::Inventory;
use kubeshift_planner::plan::{load_plan, Plan, StepAction};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The agent's metrics port (`install manifests`).
pub const AGENT_PORT: u16 = 9963;
/// How long apply waits for a node's agent to finish a node-local step.
const LOCAL_STEP_WAIT: Duration = Duration::from_secs(180);
/// The apply Lease's duration; renewed at a third of it.
const LEASE: Duration = Duration::from_secs(60);

/// A gate that judged the node broken.
#[derive(Debug)]
pub struct GateFailed(pub GateRecord);

impl std::fmt::Display for GateFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.0;
        write!(
            f,
            "gate on {:?} failed: {} failures, {} changed verdicts",
            g.nodes,
            g.failures.len(),
            g.changed_verdicts.len()
        )?;
        for l in g.failures.iter().chain(g.changed_verdicts.iter()).take(10) {
            write!(f, "\n  {l}")?;
        }
        Ok(())
    }
}

impl std::error::Error for GateFailed {}

/// Progress lines: on a terminal a spinner per phase, otherwise one plain line each.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress { bar }
    }

    pub fn line(&self, text: &str) {
        let stamped = format!("[{}] {text}", &now()[11..19]);
        match &self.bar {
            Some(b) => b.println(stamped),
            None => eprintln!("{stamped}"),
        }
    }

    fn working(&self, text: &str) {
        match &self.bar {
            Some(b) => b.set_message(text.to_string()),
            None => self.line(text),
        }
    }
}

/// What every part of a run needs.
pub struct Ctx {
    pub client: Client,
    pub plan: Plan,
    pub target_cidr: Cidr,
    pub legacy_cidrs: Vec<String>,
    /// kube-proxy's DaemonSet, when it runs as one.
    pub kube_proxy: Option<(String, String)>,
    pub image: String,
    pub drain_timeout: Duration,
    pub force: bool,
    pub baseline: Mutex<Option<Matrix>>,
    pub gates: Mutex<Vec<(String, GateRecord)>>,
    pub progress: Progress,
    stop: Arc<AtomicBool>,
    recorder: Recorder,
}

impl Ctx {
    /// Every node of the plan, in plan order.
    pub fn plan_nodes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (_, n, _) in self.plan.all_steps() {
            if !out.contains(&n.name) {
                out.push(n.name.clone());
            }
        }
        out
    }

    /// The nodes of the plan's wave `wave`, in order.
    pub fn wave_nodes(&self, wave: &str) -> Vec<String> {
        let w = self.plan.waves.iter().filter(|w| w.name == wave);
        w.flat_map(|w| w.batches.iter().flat_map(|b| b.nodes.iter().map(|n| n.name.clone()))).collect()
    }

    /// Whether apply runs a gate of its own after `wave`: the plan asks for one and the
    /// wave has more than one node (a one-node wave had it as that node's gate).
    pub fn has_wave_gate(&self, wave: &str) -> bool {
        self.plan.waves.iter().any(|w| w.name == wave && w.gate.is_some()) && self.wave_nodes(wave).len() > 1
    }

    async fn event(&self, nm: &NodeMigration, warning: bool, reason: &str, note: String) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: "Migrate".into(),
            secondary: None,
        };
        // Events are for the operator's eyes; a failure to publish one never stops a run.
        let node_ref = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(nm.spec.node.clone()),
            ..Default::default()
        };
        for r in [nm.object_ref(&()), node_ref] {
            if let Err(e) = self.recorder.publish(&ev, &r).await {
                tracing::debug!("publishing event {reason}: {e}");
            }
        }
    }
}

fn legacy_cidrs(inv: &Inventory) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(f) = &inv.cni.flannel {
        out.extend(f.network.clone());
    }
    if let Some(c) = &inv.cni.calico {
        out.extend(c.ip_pools.iter().filter(|p| !p.is_ipv6() && !p.disabled).map(|p| p.cidr.clone()));
    }
    out
}

/// kube-proxy's DaemonSet: discovery says it runs as one; kubeadm names it kube-proxy
/// and labels it `k8s-app=kube-proxy`.
async fn kube_proxy_ds(client: &Client) -> Result<Option<(String, String)>> {
    let all: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::all(client.clone());
    let list = all.list(&ListParams::default()).await.context("listing DaemonSets for kube-proxy's")?.items;
    let is_kp = |d: &k8s_openapi::api::apps::v1::DaemonSet| {
        d.metadata.name.as_deref() == Some("kube-proxy")
            || d.metadata.labels.as_ref().and_then(|l| l.get("k8s-app")).map(String::as_str) == Some("kube-proxy")
    };
    Ok(list
        .iter()
        .find(|d| is_kp(d))
        .map(|d| (d.metadata.namespace.clone().unwrap_or_default(), d.metadata.name.clone().unwrap_or_default())))
}

/// Loads the plan (the file first: a broken file fails before anything talks to the
/// cluster), re-discovers the cluster and checks the plan was made for it.
async fn context(
    plan_path: &std::path::Path,
    cluster: &ClusterArgs,
    image: String,
    check_fingerprint: bool,
) -> Result<(Ctx, Inventory)> {
    load_plan(plan_path, None).map_err(|e| anyhow!("{e}"))?;
    let client = cluster.client().await?;
    let inv = discover(&client, &DiscoverOptions::default()).await.context("discovering the cluster")?;
    let fingerprint = check_fingerprint.then(|| inv.fingerprint());
    let plan = load_plan(plan_path, fingerprint.as_deref()).map_err(|e| anyhow!("{e}"))?;
    let target_cidr: Cidr =
        plan.target.pod_cidr.parse().with_context(|| format!("{}: target.podCidr", plan_path.display()))?;
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "kubeshift".into(), instance: Some(identity()) });
    let kube_proxy = kube_proxy_ds(&client).await?;
    let cx = Ctx {
        client,
        legacy_cidrs: legacy_cidrs(&inv),
        kube_proxy,
        target_cidr,
        plan,
        image,
        drain_timeout: Duration::from_secs(300),
        force: false,
        baseline: Mutex::new(None),
        gates: Mutex::new(Vec::new()),
        progress: Progress::new(),
        stop: Arc::new(AtomicBool::new(false)),
        recorder,
    };
    Ok((cx, inv))
}

/// The nodes this run moves, in plan order, by wave.
fn selection(plan: &Plan, a: &ApplyArgs) -> Result<Vec<(String, Vec<String>)>> {
    let names: Vec<&str> = plan.waves.iter().map(|w| w.name.as_str()).collect();
    for w in a.wave.iter().chain(a.until_wave.iter()) {
        anyhow::ensure!(names.contains(&w.as_str()), "the plan has no wave {w:?} (waves: {names:?})");
    }
    let all: Vec<&str> = plan.all_steps().map(|(_, n, _)| n.name.as_str()).collect();
    for n in &a.nodes {
        anyhow::ensure!(all.contains(&n.as_str()), "node {n} is not in the plan");
    }
    let mut out = Vec::new();
    for w in &plan.waves {
        if a.wave.as_ref().is_none_or(|x| *x == w.name) {
            let nodes: Vec<String> = w
                .batches
                .iter()
                .flat_map(|b| b.nodes.iter().map(|n| n.name.clone()))
                .filter(|n| a.nodes.is_empty() || a.nodes.contains(n))
                .collect();
            if !nodes.is_empty() {
                out.push((w.name.clone(), nodes));
            }
        }
        if a.until_wave.as_ref() == Some(&w.name) {
            break;
        }
    }
    Ok(out)
}

fn is_partial(plan: &Plan, a: &ApplyArgs) -> bool {
    !a.nodes.is_empty()
        || a.wave.is_some()
        || a.until_wave.as_ref().is_some_and(|u| plan.waves.last().map(|w| &w.name) != Some(u))
}

/// Pure: what apply cannot do yet on this cluster, though `migrate plan` plans it.
/// kube-proxy's IPVS leftovers (virtual servers, `kube-ipvs0` holding every ClusterIP,
/// its ipsets) are planned by the node-migrator's cleanup but not executed: this
/// project's machines have no IPVS in their kernel to prove it on, and a half-cleaned
/// IPVS node answers every ClusterIP on its host (kubernetes#72236).
fn not_applicable(inv: &kubeshift_planner::inventory::Inventory) -> Option<String> {
    (inv.kube_proxy.mode.as_deref() == Some("ipvs")).then(|| {
        "kube-proxy runs in ipvs mode: `migrate apply` does not remove IPVS leftovers yet (virtual servers, \
         kube-ipvs0, ipsets); switch kube-proxy to iptables mode first, or migrate by the runbook"
            .to_string()
    })
}

fn confirm(what: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        bail!("no terminal to confirm on: pass --yes to run without a prompt (nothing was changed)");
    }
    let ok = dialoguer::Confirm::new().with_prompt(what).default(false).interact()?;
    if !ok {
        bail!("not confirmed; nothing was changed");
    }
    Ok(())
}

pub async fn apply(a: ApplyArgs, cluster: &ClusterArgs) -> Result<()> {
    let drain_timeout =
        crate::connectivity_cmd::parse_duration(&a.drain_timeout).map_err(|e| anyhow!("--drain-timeout {e}"))?;
    let (mut cx, inv) = context(&a.plan, cluster, a.image.clone(), true).await?;
    cx.drain_timeout = drain_timeout;
    cx.force = a.force;
    let analysis = analyze(&inv, &[], Some(&cx.plan.target.pod_cidr));
    let blockers: Vec<String> = analysis.blockers().map(|f| format!("{}: {}", f.subject, f.message)).collect();
    if !blockers.is_empty() {
        bail!("the cluster has blockers now (re-analyzed): {blockers:?}; nothing was changed. `kubeshift migrate plan` explains each");
    }
    if let Some(why) = not_applicable(&inv) {
        bail!("{why}; nothing was changed");
    }
    let waves = selection(&cx.plan, &a)?;
    let partial = is_partial(&cx.plan, &a);
    let mut intro = format!(
        "plan {} on cluster {} ({} legacy, kube-proxy {}): pod CIDR {}, VXLAN port {}\n",
        cx.plan.metadata.name,
        cx.plan.cluster.fingerprint,
        cx.plan.cluster.legacy_cni.clone().unwrap_or_default(),
        cx.plan.cluster.kube_proxy_mode.clone().unwrap_or_default(),
        cx.plan.target.pod_cidr,
        cx.plan.target.tunnel.port
    );
    for (w, nodes) in &waves {
        let _ = writeln!(intro, "  wave {w}: {}", nodes.join(", "));
    }
    let _ = writeln!(intro, "  finish: {}", if partial { "not in this run (partial)" } else { "after the last wave" });
    if a.dry_run {
        print!("{}", dry_run(&cx, &waves, partial));
        return Ok(());
    }
    eprint!("{intro}");
    confirm("Migrate these nodes?", a.yes)?;

    let mut lock = Lock::acquire(&cx.client, &identity(), LEASE).await?;
    let stop = cx.stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nCtrl-C: finishing the current phase, then stopping (Ctrl-C again does not hurry it)");
            stop.store(true, Ordering::SeqCst);
        }
    });
    let cx = Arc::new(cx);
    let started = Instant::now();
    let result = {
        let run = run_apply(&cx, &waves, partial, a.on_gate_failure);
        tokio::pin!(run);
        let mut renew = tokio::time::interval(lock.renew_every());
        loop {
            tokio::select! {
                r = &mut run => break r,
                _ = renew.tick() => {
                    if let Err(e) = lock.renew().await {
                        break Err(anyhow!("{e}"));
                    }
                }
            }
        }
    };
    if let Some(p) = &a.junit {
        std::fs::write(p, gate::junit(&cx.gates.lock().unwrap()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    lock.release().await?;
    match result {
        Ok(Outcome::Done) => {
            println!("{}", summary(&cx, started.elapsed()).await?);
            Ok(())
        }
        Ok(Outcome::Stopped(at)) => {
            bail!("stopped on request after {at}; the Lease is released. Resume with `kubeshift migrate apply -f {}`", a.plan.display())
        }
        Err(e) => Err(e.context(format!(
            "apply stopped; see `kubeshift migrate status`. Resume with `kubeshift migrate apply -f {}` or undo with `kubeshift migrate rollback`",
            a.plan.display()
        ))),
    }
}

enum Outcome {
    Done,
    Stopped(String),
}

async fn run_apply(
    cx: &Ctx,
    waves: &[(String, Vec<String>)],
    partial: bool,
    on_fail: OnGateFailure,
) -> Result<Outcome> {
    cluster::prepare(cx).await?;
    ensure_node_migrations(cx).await?;
    for (wave, nodes) in waves {
        cx.progress.line(&format!("wave {wave}: {}", nodes.join(", ")));
        for node in nodes {
            if cx.stop.load(Ordering::SeqCst) {
                return Ok(Outcome::Stopped(format!("wave {wave}, before node {node}")));
            }
            set_wanted(cx, node, Direction::Forward, Some(StepAction::ConnectivityGate)).await?;
            match drive(cx, node).await {
                Ok(Some(at)) => return Ok(Outcome::Stopped(at)),
                Ok(None) => {}
                Err(e) => {
                    cx.progress.line(&format!("{node}: {e:#}"));
                    if on_fail == OnGateFailure::Rollback {
                        cx.progress.line(&format!("{node}: rolling the node back (--on-gate-failure rollback)"));
                        set_wanted(cx, node, Direction::Rollback, None).await?;
                        drive(cx, node).await.context("rolling the node back after its failure")?;
                        bail!("node {node} failed and was rolled back; apply stopped before any other node: {e:#}");
                    }
                    bail!("node {node} failed and was left as it is (--on-gate-failure stop): {e:#}");
                }
            }
        }
        run_wave_gate(cx, wave).await?;
    }
    if partial {
        cx.progress.line("partial run: finish is left for a full run");
        return Ok(Outcome::Done);
    }
    let nms = Api::<NodeMigration>::all(cx.client.clone()).list(&ListParams::default()).await?.items;
    let undone: Vec<&str> = nms
        .iter()
        .filter(|m| m.status.as_ref().is_none_or(|s| s.phase != "Done"))
        .map(|m| m.spec.node.as_str())
        .collect();
    if !undone.is_empty() {
        bail!("finish needs every node Done; not yet: {undone:?}");
    }
    cluster::finish(cx).await?;
    Ok(Outcome::Done)
}

/// The wave's gate, once every node of the wave is Done; kept on the ClusterMigration so
/// a resumed run does not repeat a passed one. A failed one stops apply with the wave's
/// nodes migrated: they passed their own gates, and which of them to undo is the
/// operator's call.
async fn run_wave_gate(cx: &Ctx, wave: &str) -> Result<()> {
    let status = cluster::status_of(&cluster::get_or_create(cx).await?);
    if status.wave_gates.get(wave).is_some_and(|g| g.passed) {
        return Ok(());
    }
    if !cx.has_wave_gate(wave) {
        return Ok(());
    }
    let in_wave = cx.wave_nodes(wave);
    let nms = Api::<NodeMigration>::all(cx.client.clone()).list(&ListParams::default()).await?.items;
    let done =
        |n: &String| nms.iter().any(|m| &m.spec.node == n && m.status.as_ref().is_some_and(|s| s.phase == "Done"));
    if !in_wave.iter().all(done) {
        return Ok(());
    }
    cx.progress.working(&format!("wave {wave}: gate …"));
    let Some(g) = gate::wave_gate(cx, wave).await? else { return Ok(()) };
    let mut status = cluster::status_of(&cluster::get_or_create(cx).await?);
    status.wave_gates.insert(wave.to_string(), g.clone());
    cluster::set_status(cx, &status).await?;
    cx.progress.line(&format!(
        "wave {wave}: gate on {:?} {} ({} checks, {:.0} s)",
        g.nodes,
        if g.passed { "passed" } else { "FAILED" },
        g.checks,
        g.seconds
    ));
    if !g.passed {
        let undo: Vec<String> = in_wave.iter().map(|n| format!("--node {n}")).collect();
        return Err(anyhow::Error::new(GateFailed(g)).context(format!(
            "wave {wave}'s gate failed; its nodes stay migrated (each passed its own gate). Undo the wave with `kubeshift migrate rollback {} --yes`",
            undo.join(" ")
        )));
    }
    Ok(())
}

/// One NodeMigration per node of the plan, created once (a resumed run finds them).
async fn ensure_node_migrations(cx: &Ctx) -> Result<()> {
    let api: Api<NodeMigration> = Api::all(cx.client.clone());
    for w in &cx.plan.waves {
        for n in w.batches.iter().flat_map(|b| b.nodes.iter()) {
            if api.get_opt(&n.name).await?.is_some() {
                continue;
            }
            let mut nm = NodeMigration::new(
                &n.name,
                NodeMigrationSpec {
                    node: n.name.clone(),
                    wave: w.name.clone(),
                    plan: cx.plan.metadata.name.clone(),
                    fingerprint: cx.plan.cluster.fingerprint.clone(),
                    steps: n.steps.iter().map(|s| s.action).collect(),
                    wanted: None,
                    direction: Direction::Forward,
                    legacy_pod_cidrs: cx.legacy_cidrs.clone(),
                    remove_legacy: false,
                },
            );
            nm.metadata.labels = Some(
                [(
                    kubeshift_node_migrator::crd::PART_OF.0.to_string(),
                    kubeshift_node_migrator::crd::PART_OF.1.to_string(),
                )]
                .into(),
            );
            api.create(&PostParams::default(), &nm)
                .await
                .with_context(|| format!("creating NodeMigration {}", n.name))?;
        }
    }
    Ok(())
}

async fn set_wanted(cx: &Ctx, node: &str, direction: Direction, wanted: Option<StepAction>) -> Result<()> {
    let api: Api<NodeMigration> = Api::all(cx.client.clone());
    let patch = serde_json::json!({"spec": {"direction": direction, "wanted": wanted}});
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("NodeMigration {node}"))?;
    Ok(())
}

/// Drives one node to where its NodeMigration's spec wants it, one step at a time, the
/// journal written around each. `Some(where)` when stopped on request between steps.
async fn drive(cx: &Ctx, node: &str) -> Result<Option<String>> {
    let api: Api<NodeMigration> = Api::all(cx.client.clone());
    loop {
        let nm = api.get(node).await?;
        let status = nm.status.clone().unwrap_or_default();
        let (step, direction) = match next::next(&nm.spec, &status) {
            Next::Done => return Ok(None),
            Next::Stuck(why) => bail!("node {node} is stuck: {why}"),
            Next::Act { step, direction } => (step, direction),
        };
        if cx.stop.load(Ordering::SeqCst) && status.in_progress.is_none() {
            return Ok(Some(format!("node {node} before {}", next::name(step))));
        }
        let label =
            format!("{node}: {}{}", if direction == Direction::Rollback { "undo " } else { "" }, next::name(step));
        cx.progress.working(&format!("{label} …"));
        let t0 = Instant::now();
        let nm = if status.in_progress.is_none() {
            let fresh = write_status(&api, &nm, entered(status, step, direction, &now())).await?;
            cx.event(&fresh, false, "StepStarted", label.clone()).await;
            fresh
        } else {
            nm
        };
        let done = if is_local(step) {
            wait_local(cx, node).await?
        } else {
            match phases::run(cx, &nm, step, direction).await {
                Ok((changed, summary)) => {
                    let fresh = api.get(node).await?;
                    let mut st = finished(
                        &fresh.spec,
                        fresh.status.clone().unwrap_or_default(),
                        changed.clone(),
                        &summary,
                        &now(),
                    );
                    if step == StepAction::ConnectivityGate {
                        st.last_gate = serde_json::from_value(changed).ok();
                    }
                    write_status(&api, &fresh, st).await?
                }
                Err(e) => {
                    record_failure(cx, node, step, &e).await?;
                    return Err(e.context(label));
                }
            }
        };
        let summary =
            done.status.as_ref().and_then(|s| s.history.last()).map(|h| h.summary.clone()).unwrap_or_default();
        cx.progress.line(&format!("{label}: {summary} ({:.1} s)", t0.elapsed().as_secs_f64()));
        cx.event(&done, false, "StepDone", format!("{label}: {summary}")).await;
    }
}

/// A failed step: the journal entry is closed as failed (not reached), with a condition
/// and the gate record when it was a gate, so the node can be rolled back or resumed.
async fn record_failure(cx: &Ctx, node: &str, step: StepAction, e: &anyhow::Error) -> Result<()> {
    let api: Api<NodeMigration> = Api::all(cx.client.clone());
    let fresh = api.get(node).await?;
    let mut st = fresh.status.clone().unwrap_or_default();
    st.in_progress = None;
    st.phase = format!("Failed-{}", next::name(step));
    st.conditions.retain(|c| c.type_ != "Failed");
    st.conditions.push(Condition {
        type_: "Failed".into(),
        status: "True".into(),
        reason: next::name(step),
        message: format!("{e:#}"),
        last_transition_time: now(),
    });
    if let Some(g) = e.downcast_ref::<GateFailed>() {
        st.last_gate = Some(g.0.clone());
    }
    let fresh = write_status(&api, &fresh, st).await?;
    cx.event(&fresh, true, "StepFailed", format!("{}: {e:#}", next::name(step))).await;
    Ok(())
}

/// Waits until the node's agent closed the entered node-local step.
async fn wait_local(cx: &Ctx, node: &str) -> Result<NodeMigration> {
    let api: Api<NodeMigration> = Api::all(cx.client.clone());
    let deadline = Instant::now() + LOCAL_STEP_WAIT;
    loop {
        let nm = api.get(node).await?;
        if nm.status.as_ref().is_some_and(|s| s.in_progress.is_none()) {
            return Ok(nm);
        }
        if Instant::now() > deadline {
            bail!(
                "node {node}: its agent did not finish {} within {LOCAL_STEP_WAIT:?}; is {}/{} running there? (kubectl -n {} logs -l k8s-app={} --field-selector spec.nodeName={node})",
                nm.status.and_then(|s| s.in_progress).map(|p| next::name(p.step)).unwrap_or_default(),
                phases::AGENT_NS, phases::AGENT_DS, phases::AGENT_NS, phases::AGENT_DS
            );
        }
        // The agent writes the status on the node's own time; the object is the condition.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn dry_run(cx: &Ctx, waves: &[(String, Vec<String>)], partial: bool) -> String {
    let mut s = String::from("# dry run: nothing is changed. apply would:\n");
    let _ =
        writeln!(s, "prepare:\n  server-side apply CRDs nodemigrations.kubeshift.io, clustermigrations.kubeshift.io");
    let _ = writeln!(s, "  create ClusterMigration {}", cx.plan.metadata.name);
    let _ = writeln!(
        s,
        "  server-side apply ServiceAccount, RBAC and DaemonSet {}/{} (standby; pod CIDR {}, VXLAN port {}, legacy {:?})",
        phases::AGENT_NS, phases::AGENT_DS, cx.plan.target.pod_cidr, cx.plan.target.tunnel.port, cx.legacy_cidrs
    );
    if let Some((ns, name)) = &cx.kube_proxy {
        let _ = writeln!(
            s,
            "  PATCH DaemonSet {ns}/{name} node affinity: {} DoesNotExist (backup ConfigMap kept)",
            kubeshift_node_migrator::daemonsets::NO_KUBE_PROXY
        );
    }
    let _ = writeln!(
        s,
        "  baseline connectivity suite on {:?}, matrix in ConfigMap kube-system/{}",
        cx.plan_nodes(),
        gate::baseline_name(&cx.plan.metadata.name)
    );
    for (w, nodes) in waves {
        let _ = writeln!(s, "wave {w}:");
        for n in nodes {
            let _ = writeln!(s, "  node {n}: create NodeMigration {n}");
            let steps = cx.plan.all_steps().filter(|(_, p, _)| &p.name == n).map(|(_, _, st)| st.action);
            for st in steps {
                let _ = writeln!(s, "    {:<20} {}", next::name(st), phases::describe(st, n, cx));
            }
        }
        if cx.has_wave_gate(w) {
            let _ = writeln!(
                s,
                "  wave gate: connectivity suite on the wave's nodes and a node not migrated yet, once all are Done"
            );
        }
    }
    if partial {
        let _ = writeln!(s, "finish: not in this run (partial)");
    } else {
        let mut ds: Vec<String> = cx.kube_proxy.iter().map(|(n, d)| format!("{n}/{d}")).collect();
        ds.extend(cx.plan.cluster.legacy_daemon_sets.iter().cloned());
        let _ = writeln!(s, "finish:\n  back up (ConfigMaps kube-system/kubeshift-backup-*) and DELETE DaemonSets {ds:?} and the ConfigMaps their pods mount");
        let _ = writeln!(s, "  every node's agent: delete flannel.1/cni0/vxlan.calico/cali*, tunl0 down, legacy routes, FLANNEL-*/cali-* chains");
        let _ = writeln!(s, "  server-side apply the agent DaemonSet without legacy pod networks (bridges removed)");
        let _ = writeln!(s, "  last connectivity gate");
    }
    s
}

async fn summary(cx: &Ctx, took: Duration) -> Result<String> {
    let nms = Api::<NodeMigration>::all(cx.client.clone()).list(&ListParams::default()).await?.items;
    let mut s =
        format!("migration {}: {} nodes, {:.0} s in all\n", cx.plan.metadata.name, nms.len(), took.as_secs_f64());
    for nm in &nms {
        let st = nm.status.clone().unwrap_or_default();
        let chains: u64 = st
            .history
            .iter()
            .rev()
            .filter(|h| h.step == StepAction::CleanKubeProxy && h.direction == Direction::Forward)
            .take(1)
            .filter_map(|h| {
                h.changed
                    .get("iptables")
                    .and_then(|t| t.as_array())
                    .map(|t| t.iter().filter_map(|x| x["chains_removed"].as_u64()).sum::<u64>())
            })
            .sum();
        let _ = writeln!(
            s,
            "  {:<14} {:<10} {} chains of kube-proxy removed; {}",
            nm.spec.node,
            st.phase,
            chains,
            node_seconds(&st)
        );
    }
    Ok(s)
}

/// Time per step of the node's latest forward run, from the journal, and the total
/// without the drain (the part kubeshift controls).
fn node_seconds(st: &NodeMigrationStatus) -> String {
    let secs = |a: &str, b: &str| -> f64 {
        let p = |t: &str| t.parse::<k8s_openapi::jiff::Timestamp>().ok();
        match (p(a), p(b)) {
            (Some(x), Some(y)) => (y.as_second() - x.as_second()) as f64,
            _ => 0.0,
        }
    };
    let from = st.history.iter().rposition(|h| h.direction == Direction::Rollback).map_or(0, |i| i + 1);
    let fwd: Vec<_> = st.history[from..].iter().filter(|h| h.direction == Direction::Forward).collect();
    let total: f64 =
        fwd.iter().filter(|h| h.step != StepAction::Drain).map(|h| secs(&h.started_at, &h.finished_at)).sum();
    let parts: Vec<String> =
        fwd.iter().map(|h| format!("{} {:.0}s", next::name(h.step), secs(&h.started_at, &h.finished_at))).collect();
    format!("{total:.0} s without the drain ({})", parts.join(", "))
}

pub async fn rollback(a: RollbackArgs, cluster: &ClusterArgs) -> Result<()> {
    let client = cluster.client().await?;
    let cms = Api::<kubeshift_node_migrator::crd::ClusterMigration>::all(client.clone());
    let list = match cms.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            println!("no migration has started on this cluster: nothing to roll back");
            return Ok(());
        }
        Err(e) => return Err(e).context("listing clustermigrations.kubeshift.io"),
    };
    let Some(cm) = list.into_iter().next() else {
        println!("no migration has started on this cluster: nothing to roll back");
        return Ok(());
    };
    // The plan as applied is in the cluster: rollback needs no file.
    let dir = std::env::temp_dir().join(format!("kubeshift-rollback-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("plan.yaml");
    std::fs::write(&path, &cm.spec.plan_yaml)?;
    // The plan is the cluster's own record, so no fingerprint check: finish changed what
    // the fingerprint covers (the legacy CNI is gone).
    let ctx = context(&path, cluster, crate::install_cmd::DEFAULT_IMAGE.into(), false).await;
    let _ = std::fs::remove_dir_all(&dir);
    let (mut cx, _) = ctx?;
    if a.nodes.is_empty() && !a.all {
        bail!("say which nodes (--node N, repeatable) or --all");
    }
    let api: Api<NodeMigration> = Api::all(cx.client.clone());
    let known = api.list(&ListParams::default()).await?.items;
    // After finish, discovery no longer sees the legacy CNI: its networks are recorded.
    if let Some(nm) = known.iter().find(|m| !m.spec.legacy_pod_cidrs.is_empty()) {
        cx.legacy_cidrs = nm.spec.legacy_pod_cidrs.clone();
    }
    let mut nodes: Vec<String> = if a.all { cx.plan_nodes() } else { a.nodes.clone() };
    nodes.reverse();
    let mut todo = Vec::new();
    for n in &nodes {
        match known.iter().find(|m| &m.spec.node == n) {
            None if !cx.plan_nodes().contains(n) => bail!("node {n} is not in the migration's plan"),
            None => println!("{n}: never started; nothing to undo"),
            Some(m)
                if m.status.as_ref().and_then(|s| s.reached).is_none()
                    && m.status.as_ref().and_then(|s| s.in_progress.as_ref()).is_none() =>
            {
                println!("{n}: never started; nothing to undo")
            }
            Some(_) => todo.push(n.clone()),
        }
    }
    let finished = cm.status.as_ref().is_some_and(|s| s.changed.iter().any(|c| c.change == "deleted"));
    if a.dry_run {
        if finished {
            println!("would re-create the DaemonSets and ConfigMaps finish deleted, from their backups");
        }
        for n in &todo {
            let nm = known.iter().find(|m| &m.spec.node == n).unwrap();
            let st = nm.status.clone().unwrap_or_default();
            let spec = NodeMigrationSpec { direction: Direction::Rollback, wanted: None, ..nm.spec.clone() };
            let mut sim = st.clone();
            let mut steps = Vec::new();
            while let Next::Act { step, direction } = next::next(&spec, &sim) {
                steps.push(next::name(step));
                sim = finished_sim(&spec, entered(sim, step, direction, "t"));
            }
            println!("{n}: undo {}", steps.join(" → "));
        }
        return Ok(());
    }
    confirm(&format!("Roll back {todo:?}?"), a.yes)?;
    let mut lock = Lock::acquire(&cx.client, &identity(), LEASE).await?;
    let result = async {
        if finished {
            cluster::unfinish(&cx).await?;
            cx.kube_proxy = kube_proxy_ds(&cx.client).await?;
        }
        for n in &todo {
            set_wanted(&cx, n, Direction::Rollback, None).await?;
            // Clear a failure left by apply: rollback is the answer to it.
            let fresh = api.get(n).await?;
            if let Some(mut st) = fresh.status.clone() {
                st.blocked = None;
                write_status(&api, &fresh, st).await?;
            }
            drive(&cx, n).await?;
        }
        // The rolled-back nodes with the suite, against prepare's baseline: the cluster
        // is where it was, or the operator hears it now.
        if let Some(last) = todo.last() {
            if let Some(b) = cm.status.as_ref().and_then(|s| s.baseline.clone()) {
                *cx.baseline.lock().unwrap() = Some(gate::load_baseline(&cx, &b).await?);
            }
            let g = gate::node_gate(&cx, last).await?;
            cx.progress.line(&format!(
                "rollback gate on {:?}: {} ({} checks, {} changed verdicts)",
                g.nodes,
                if g.passed { "passed" } else { "FAILED" },
                g.checks,
                g.changed_verdicts.len()
            ));
            if !g.passed {
                return Err(GateFailed(g).into());
            }
        }
        if a.all {
            cluster::unprepare(&cx).await?;
        }
        anyhow::Ok(())
    };
    let r = {
        tokio::pin!(result);
        let mut renew = tokio::time::interval(lock.renew_every());
        loop {
            tokio::select! {
                r = &mut result => break r,
                _ = renew.tick() => { lock.renew().await?; }
            }
        }
    };
    lock.release().await?;
    r?;
    println!("rolled back: {todo:?} are on the legacy CNI and kube-proxy again");
    Ok(())
}

fn finished_sim(spec: &NodeMigrationSpec, st: NodeMigrationStatus) -> NodeMigrationStatus {
    finished(spec, st, serde_json::Value::Null, "", "t")
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
    /// The failure apply recorded (the step and what it said), until a rollback or a
    /// resumed run clears it by getting past it.
    failed: Option<String>,
    /// `passed`/`FAILED`, when and where.
    last_gate: Option<String>,
    /// Per step of the latest forward run, and the total without the drain.
    timings: String,
}

/// A gate in `migrate status`: `passed`/`FAILED`, when and where, and its long-lived
/// connections.
fn gate_line(g: &GateRecord) -> String {
    let conns = g
        .connections
        .as_ref()
        .map(|c| format!("; {} long-lived connections judged, {} ended by design", c.judged, c.ended_by_design))
        .unwrap_or_default();
    let verdict = if g.passed { "passed" } else { "FAILED" };
    format!("{verdict} at {} on {:?} ({} checks{conns})", g.at, g.nodes, g.checks)
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
        failed: st
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed" && c.status == "True")
            .filter(|_| st.phase.starts_with("Failed"))
            .map(|c| format!("{}: {}", c.reason, c.message)),
        last_gate: st.last_gate.as_ref().map(gate_line),
        timings: node_seconds(&st),
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
    let clusters: Api<kubeshift_node_migrator::crd::ClusterMigration> = Api::all(client);
    let cluster = clusters.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    let lines: Vec<NodeLine> = list.iter().map(node_line).collect();
    let doc = serde_json::json!({
        "cluster": cluster.first().map(|c| serde_json::json!({
            "plan": c.spec.plan, "phase": c.status.as_ref().map(|s| s.phase.clone()).unwrap_or_default(),
            "waveGates": c.status.as_ref().map(|s| s.wave_gates.iter().map(|(w, g)| (w.clone(), gate_line(g)))
                .collect::<std::collections::BTreeMap<_, _>>()).unwrap_or_default(),
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
        let last = l
            .blocked
            .clone()
            .map(|b| format!("BLOCKED: {b}"))
            .or(l.failed.clone().map(|f| format!("FAILED: {}", f.lines().next().unwrap_or(""))))
            .or(l.last_step.clone())
            .unwrap_or_default();
        let _ = writeln!(s, "{:<16} {:<14} {:<20} {:<6} {last}", l.node, l.wave, l.phase, l.ready);
    }
    if lines.is_empty() {
        let _ = writeln!(s, "(no NodeMigrations: `kubeshift migrate apply` has not started any node)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipvs_cluster_is_refused_an_iptables_one_is_not() {
        let mut inv = kubeshift_planner::inventory::Inventory::default();
        inv.kube_proxy.mode = Some("iptables".into());
        assert_eq!(not_applicable(&inv), None);
        inv.kube_proxy.mode = Some("ipvs".into());
        assert!(not_applicable(&inv).is_some_and(|w| w.contains("ipvs mode") && w.contains("kube-ipvs0")));
    }
}
