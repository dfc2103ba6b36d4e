//! One run of the suite: deploy, wait, hand out probes, collect reports, judge, clean up.

use crate::agent::{result_configmap, PROBES_CONFIGMAP};
use crate::deploy::{self, DeployConfig, Endpoint};
use crate::model::{pair_key, Assignment, Change, Matrix, ProbeResult, Report, Verdict};
use crate::scenarios::{self, Check};
use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SuiteOptions {
    pub deploy: DeployConfig,
    pub probe_timeout: Duration,
    pub filter: Option<regex::Regex>,
    pub keep: bool,
    pub compare: Option<PathBuf>,
    pub progress: bool,
    /// Failed probes are repeated until they pass or this much time has passed since
    /// the first round: a datapath programs new Services a moment after the API has
    /// them, and the gate must not fail on that lag.
    pub settle: Duration,
    /// Start long-lived connections and keep the namespace for a later check.
    pub conn_disrupt_setup: bool,
    /// Check that the connections of an earlier setup are unbroken.
    pub include_conn_disrupt: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub from: String,
    pub to: String,
    pub address: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioOutcome {
    pub name: String,
    pub description: String,
    pub checks: usize,
    pub failures: Vec<Failure>,
    /// Why the scenario was not judged (e.g. the cluster enforces no NetworkPolicy).
    pub skipped: Option<String>,
    /// Slowest probe of the scenario.
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    pub nodes: Vec<String>,
    pub scenarios: Vec<ScenarioOutcome>,
    pub matrix: Matrix,
    pub changes: Option<Vec<Change>>,
    pub seconds: f64,
}

impl SuiteReport {
    pub fn passed(&self) -> bool {
        self.scenarios.iter().all(|s| s.failures.is_empty())
            && self.changes.as_ref().map(|c| c.is_empty()).unwrap_or(true)
    }
}

pub async fn run(client: &Client, opts: &SuiteOptions) -> Result<SuiteReport> {
    // Bad input is refused before anything is created.
    let before = match &opts.compare {
        Some(p) => Some(Matrix::load(p)?),
        None => None,
    };
    deploy::check_namespaces_are_ours(client, &opts.deploy).await?;
    let nodes = deploy::pick_nodes(client, &opts.deploy.nodes).await?;
    let started = Instant::now();
    let r = run_deployed(client, opts, &nodes, before).await;
    if !opts.keep && !opts.conn_disrupt_setup {
        if let Err(e) = deploy::cleanup(client, &opts.deploy, Duration::from_secs(120)).await {
            tracing::warn!("clean-up: {e:#}");
            if r.is_ok() {
                return Err(e);
            }
        }
    }
    let mut report = r?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn bar(show: bool, len: u64, msg: &str) -> indicatif::ProgressBar {
    let b = if show { indicatif::ProgressBar::new(len) } else { indicatif::ProgressBar::hidden() };
    b.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg:<28} [{bar:30}] {pos}/{len}")
            .unwrap()
            .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

async fn run_deployed(
    client: &Client,
    opts: &SuiteOptions,
    nodes: &[(String, String)],
    before: Option<Matrix>,
) -> Result<SuiteReport> {
    deploy::deploy(client, &opts.deploy, nodes).await?;
    let pb = bar(opts.progress, (nodes.len() * 3) as u64, "test pods ready");
    let eps =
        deploy::wait_endpoints(client, &opts.deploy, nodes, Duration::from_secs(180), |n, _| pb.set_position(n as u64))
            .await?;
    pb.finish_and_clear();

    // The conn-disrupt check comes first: it judges what happened before this run.
    let mut early = vec![];
    if opts.include_conn_disrupt {
        early.push(crate::disrupt::check(client, &opts.deploy.namespace, &eps).await?);
    }
    let timeout_ms = opts.probe_timeout.as_millis() as u64;
    let scen: Vec<scenarios::Scenario> = scenarios::all(&eps, timeout_ms)
        .into_iter()
        .filter(|s| opts.filter.as_ref().map(|f| f.is_match(s.name)).unwrap_or(true))
        .collect();
    let matrix_checks = scenarios::matrix_checks(&eps, timeout_ms);
    let mut checks: Vec<&Check> = scen.iter().flat_map(|s| s.checks.iter()).collect();
    checks.extend(matrix_checks.iter());

    let results = settle_round(client, opts, &eps, &checks).await?;
    let mut scenarios: Vec<ScenarioOutcome> = early;
    scenarios.extend(scen.iter().map(|s| outcome(s.name, s.description, &s.checks, &results)));
    let mut matrix = Matrix::new();
    for c in &matrix_checks {
        let allowed = results.get(&c.probe.id).map(|r| r.ok).unwrap_or(false);
        matrix.entries.insert(
            pair_key(&c.from_key, &c.target, c.probe.port, c.probe.proto),
            if allowed { Verdict::Allowed } else { Verdict::Denied },
        );
    }

    // Policy scenarios, one at a time. Their verdicts join the matrix, so a migration
    // that changes what policies allow shows up in --compare.
    let api = deploy::api_server_endpoint(client).await?;
    let mut enforcing: Option<bool> = None;
    for ps in crate::policy::all(&eps, &opts.deploy.namespace, &api, timeout_ms) {
        if !opts.filter.as_ref().map(|f| f.is_match(ps.name)).unwrap_or(true) {
            continue;
        }
        apply_policies(client, &ps.policies, false).await?;
        let refs: Vec<&Check> = ps.checks.iter().collect();
        let r = settle_round(client, opts, &eps, &refs).await;
        apply_policies(client, &ps.policies, true).await?;
        let r = r?;
        let mut o = outcome(ps.name, ps.description, &ps.checks, &r);
        for c in &ps.checks {
            let allowed = r.get(&c.probe.id).map(|r| r.ok).unwrap_or(false);
            matrix.entries.insert(
                format!("{}: {}", ps.name, pair_key(&c.from_key, &c.target, c.probe.port, c.probe.proto)),
                if allowed { Verdict::Allowed } else { Verdict::Denied },
            );
        }
        // A deny-all that denies nothing means the cluster enforces no policy at all
        // (Flannel): say so instead of failing every policy scenario.
        if enforcing.is_none() && ps.name == "policy-all-ingress-deny" {
            enforcing = Some(ps.checks.iter().any(|c| r.get(&c.probe.id).map(|r| !r.ok).unwrap_or(false)));
        }
        if enforcing == Some(false) {
            o.skipped = Some(
                "this cluster does not enforce NetworkPolicy: a deny-all ingress policy left every probe allowed"
                    .into(),
            );
            o.failures.clear();
        }
        scenarios.push(o);
    }
    if opts.conn_disrupt_setup {
        scenarios.push(crate::disrupt::setup(client, &opts.deploy.namespace, &eps, Duration::from_secs(60)).await?);
    }
    let changes = before.map(|mut b| {
        // A run narrowed with --test measured only some pairs; only those compare.
        if opts.filter.is_some() {
            b.entries.retain(|k, _| matrix.entries.contains_key(k));
        }
        Matrix::compare(&b, &matrix)
    });
    Ok(SuiteReport { nodes: nodes.iter().map(|n| n.0.clone()).collect(), scenarios, matrix, changes, seconds: 0.0 })
}

/// An empty expectation means the probe must be refused or time out.
fn passes(c: &Check, r: Option<&ProbeResult>) -> bool {
    match r {
        None => false,
        Some(r) if c.expect.is_empty() => !r.ok,
        Some(r) => r.ok && c.expect.contains(&r.detail),
    }
}

/// Runs `checks` and repeats the failing ones until they pass or `settle` has passed.
async fn settle_round(
    client: &Client,
    opts: &SuiteOptions,
    eps: &[Endpoint],
    checks: &[&Check],
) -> Result<HashMap<String, ProbeResult>> {
    let mut results = run_round(client, opts, eps, checks).await?;
    let until = Instant::now() + opts.settle;
    loop {
        let failed: Vec<&Check> = checks.iter().copied().filter(|c| !passes(c, results.get(&c.probe.id))).collect();
        if failed.is_empty() || Instant::now() > until {
            return Ok(results);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        results.extend(run_round(client, opts, eps, &failed).await?);
    }
}

fn failure(c: &Check, r: Option<&ProbeResult>) -> Failure {
    Failure {
        from: c.from_key.clone(),
        to: c.target.clone(),
        address: format!("{}:{}/{:?}", c.probe.addr, c.probe.port, c.probe.proto).to_lowercase(),
        detail: match r {
            Some(r) if r.ok && c.expect.is_empty() => format!("allowed (answered by {:?}), expected denied", r.detail),
            Some(r) if r.ok => format!("answered by {:?}, expected {:?}", r.detail, c.expect),
            Some(r) => r.detail.clone(),
            None => "no result".into(),
        },
    }
}

fn outcome(name: &str, description: &str, checks: &[Check], results: &HashMap<String, ProbeResult>) -> ScenarioOutcome {
    ScenarioOutcome {
        name: name.to_string(),
        description: description.to_string(),
        checks: checks.len(),
        failures: checks
            .iter()
            .filter(|c| !passes(c, results.get(&c.probe.id)))
            .map(|c| failure(c, results.get(&c.probe.id)))
            .collect(),
        skipped: None,
        max_ms: checks
            .iter()
            .filter_map(|c| results.get(&c.probe.id))
            .map(|r| r.micros as f64 / 1000.0)
            .fold(0.0, f64::max),
    }
}

async fn apply_policies(client: &Client, policies: &[serde_json::Value], delete: bool) -> Result<()> {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    for p in policies {
        let ns = p["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
        if delete {
            api.delete(name, &Default::default())
                .await
                .with_context(|| format!("deleting NetworkPolicy {ns}/{name}"))?;
        } else {
            api.patch(name, &PatchParams::apply("kubeshift-connectivity").force(), &Patch::Apply(p))
                .await
                .with_context(|| format!("creating NetworkPolicy {ns}/{name}"))?;
        }
    }
    Ok(())
}

/// Hands every agent its probes in one ConfigMap write and waits for all reports of
/// this round. An agent that does not report is an error naming it and its node.
async fn run_round(
    client: &Client,
    opts: &SuiteOptions,
    eps: &[Endpoint],
    checks: &[&Check],
) -> Result<HashMap<String, ProbeResult>> {
    let ns = &opts.deploy.namespace;
    let round = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let mut per_agent: BTreeMap<String, Assignment> = BTreeMap::new();
    for c in checks {
        per_agent
            .entry(c.from.clone())
            .or_insert_with(|| Assignment { round, probes: vec![] })
            .probes
            .push(c.probe.clone());
    }
    let mut data = serde_json::Map::new();
    for (pod, a) in &per_agent {
        data.insert(pod.clone(), json!(serde_json::to_string(a)?));
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": PROBES_CONFIGMAP, "namespace": ns}, "data": data});
    cms.patch(PROBES_CONFIGMAP, &PatchParams::apply("kubeshift-connectivity").force(), &Patch::Apply(&cm))
        .await
        .context("writing the probe assignments")?;

    let pb = bar(opts.progress, per_agent.len() as u64, "agents reported");
    let deadline = Instant::now() + opts.probe_timeout * 4 + Duration::from_secs(60);
    let mut results = HashMap::new();
    let mut pending: Vec<String> = per_agent.keys().cloned().collect();
    while !pending.is_empty() {
        let mut still = vec![];
        for pod in pending {
            let report: Option<Report> = cms
                .get_opt(&result_configmap(&pod))
                .await?
                .and_then(|c| c.data)
                .and_then(|d| d.get("report").cloned())
                .and_then(|s| serde_json::from_str(&s).ok());
            match report {
                Some(r) if r.round == round => {
                    for x in r.results {
                        results.insert(x.id.clone(), x);
                    }
                    pb.inc(1);
                }
                _ => still.push(pod),
            }
        }
        pending = still;
        if !pending.is_empty() {
            if Instant::now() > deadline {
                pb.finish_and_clear();
                let who: Vec<String> = pending
                    .iter()
                    .map(|p| {
                        format!("{p} on {}", eps.iter().find(|e| &e.pod == p).map(|e| e.node.as_str()).unwrap_or("?"))
                    })
                    .collect();
                bail!("probe agents did not report: {} (can they reach the apiserver?)", who.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    pb.finish_and_clear();
    Ok(results)
}
