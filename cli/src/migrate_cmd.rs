//! `kubeshift migrate plan` and `kubeshift migrate check`: discover the live
//! cluster, analyze it, and write (or verify) the plan a human signs off.

use crate::kubeconfig::ClusterArgs;
use crate::output_format::{formats, narrow, OutputFormat};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use kubeshift_planner::analysis::{analyze, plan_input, Analysis, PolicyClass, Severity};
use kubeshift_planner::discovery::{discover, DiscoverOptions};
use kubeshift_planner::inventory::Inventory;
use kubeshift_planner::node_report::NodeReport;
use kubeshift_planner::plan::{load_plan, Plan};
use kubeshift_planner::planning::build_plan;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Args)]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub command: MigrateCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
}

#[derive(Args)]
pub struct PlanArgs {
    /// What goes to stdout: a summary, the plan YAML, or inventory + analysis + plan as JSON.
    #[arg(short = 'o', long, value_parser = formats::<Output>(), default_value = "table")]
    pub output: OutputFormat,
    /// Write the plan YAML here (not written when there are blockers, unless --allow-blockers).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the step graph instead (the -o output then goes to stderr).
    #[arg(long, value_enum)]
    pub graph: Option<GraphFormat>,
    /// The node label that names pools (default: the well-known ones of kubeadm setups, GKE, EKS, AKS).
    #[arg(long)]
    pub pool_label: Option<String>,
    /// Nodes migrated at once, cluster-wide (PDBs may lower it per pool).
    #[arg(long, default_value_t = 1)]
    pub max_unavailable: u32,
    /// `kubeshift node report` outputs, one file per node.
    #[arg(long = "node-report", num_args = 1..)]
    pub node_reports: Vec<PathBuf>,
    /// Exit 0 and write the plan even when there are blockers.
    #[arg(long)]
    pub allow_blockers: bool,
    /// metadata.name of the plan.
    #[arg(long, default_value = "migration")]
    pub name: String,
}

#[derive(Subcommand)]
pub enum MigrateCommand {
    /// Discover the cluster, classify what will break, and write the node-pool plan.
    Plan(PlanArgs),
    /// Check that a plan file is valid and was made for this cluster (fingerprint).
    Check {
        #[arg(long)]
        plan: PathBuf,
    },
    /// Run the plan: prepare, the nodes wave by wave with a gate after each, finish. Resumable.
    Apply(ApplyArgs),
    /// Undo migrated nodes (the recorded inverses, in reverse order), or all of them.
    Rollback(RollbackArgs),
    /// Where the migration stands: per node phase, timings, last gate, what blocks it.
    Status(StatusArgs),
    /// The maintenance-window runbook for a plan (Markdown or HTML), from the templates in playbooks/.
    Runbook(crate::runbook::RunbookArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnGateFailure {
    /// Roll the node back, then stop.
    Rollback,
    /// Stop and leave the node as it is, for a human to look at.
    Stop,
}

#[derive(Args)]
pub struct ApplyArgs {
    /// The plan file written by `migrate plan`.
    #[arg(short = 'f', long = "filename")]
    pub plan: PathBuf,
    /// Do not ask for confirmation (for CI).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print every API change and node change it would make, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Only these nodes (comma separated), in plan order.
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Only this wave.
    #[arg(long)]
    pub wave: Option<String>,
    /// Stop after this wave (`--until-wave canary` is the canary-only run).
    #[arg(long)]
    pub until_wave: Option<String>,
    /// How long one node's drain may take (e.g. 300s, 5m).
    #[arg(long, default_value = "300s")]
    pub drain_timeout: String,
    /// What a failed gate does to the node it judged. Either way apply stops there.
    #[arg(long, value_enum, default_value = "rollback")]
    pub on_gate_failure: OnGateFailure,
    /// Evict pods that no controller will recreate (they are lost).
    #[arg(long)]
    pub force: bool,
    /// Write every gate's result as JUnit XML here.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// The agent's image (prepare installs its DaemonSet).
    #[arg(long, default_value = crate::install_cmd::DEFAULT_IMAGE)]
    pub image: String,
}

#[derive(Args)]
pub struct RollbackArgs {
    /// Nodes to roll back (repeatable).
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// Every node, and the cluster's prepare/finish phases.
    #[arg(long, conflicts_with = "nodes")]
    pub all: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print what it would undo, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// A table of the nodes, or the cluster and the nodes as YAML or JSON.
    #[arg(short = 'o', long, value_parser = formats::<Output>(), default_value = "table")]
    pub output: OutputFormat,
}

pub async fn run(args: MigrateArgs, cluster: &ClusterArgs) -> Result<()> {
    match args.command {
        MigrateCommand::Plan(a) => plan(a, cluster).await,
        MigrateCommand::Apply(a) => crate::migrate_apply::apply(a, cluster).await,
        MigrateCommand::Rollback(a) => crate::migrate_apply::rollback(a, cluster).await,
        MigrateCommand::Status(a) => crate::migrate_apply::status(a, cluster).await,
        MigrateCommand::Runbook(a) => crate::runbook::run(a),
        MigrateCommand::Check { plan } => {
            // Read the file before touching the cluster so a bad file fails fast.
            kubeshift_planner::plan::load_plan(&plan, None).map_err(|e| anyhow!("{e}"))?;
            let client = cluster.client().await?;
            let inv = discover(&client, &DiscoverOptions::default()).await?;
            let fp = inv.fingerprint();
            let p = load_plan(&plan, Some(&fp)).map_err(|e| anyhow!("{e}"))?;
            println!("{}: plan {} matches this cluster ({fp})", plan.display(), p.metadata.name);
            Ok(())
        }
    }
}

fn read_reports(paths: &[PathBuf]) -> Result<Vec<NodeReport>> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading node report {}", p.display()))?;
            NodeReport::from_json(&text, &p.display().to_string()).map_err(|e| anyhow!("node report {e}"))
        })
        .collect()
}

async fn plan(a: PlanArgs, cluster: &ClusterArgs) -> Result<()> {
    let output: Output = narrow(a.output, "migrate plan")?;
    if a.max_unavailable == 0 {
        bail!("--max-unavailable must be at least 1");
    }
    let reports = read_reports(&a.node_reports)?;
    let client = cluster.client().await?;
    let inv = discover(&client, &DiscoverOptions { pool_label: a.pool_label.clone() }).await?;
    for r in &reports {
        let name = r.node_name.as_deref().unwrap_or(&r.hostname);
        if !inv.nodes.iter().any(|n| n.name == name) {
            bail!("node report for {name}: the cluster has no node of that name");
        }
    }
    let plan = build_plan(&plan_input(&inv, &a.name, a.max_unavailable)).map_err(|e| anyhow!("planning: {e}"))?;
    let analysis = analyze(&inv, &reports, Some(&plan.target.pod_cidr));
    let blockers = analysis.blockers().count();

    let rendered = match output {
        Output::Table => summary(&inv, &analysis, &plan),
        Output::Yaml => plan.to_yaml(),
        Output::Json => {
            serde_json::to_string_pretty(&serde_json::json!({
                "inventory": inv, "analysis": analysis, "plan": plan,
            }))? + "\n"
        }
    };
    match a.graph {
        Some(g) => {
            let graph = plan.graph().map_err(|e| anyhow!("plan step graph: {e}"))?;
            eprint!("{rendered}");
            print!(
                "{}",
                match g {
                    GraphFormat::Dot => graph.to_dot(),
                    GraphFormat::Mermaid => graph.to_mermaid(),
                }
            );
        }
        None => print!("{rendered}"),
    }
    if blockers > 0 && !a.allow_blockers {
        let out = a.out.as_ref().map(|p| format!("; {} not written", p.display())).unwrap_or_default();
        bail!("{blockers} blocker(s) found (listed above){out}; fix them or pass --allow-blockers");
    }
    if let Some(out) = &a.out {
        let tmp = out.with_extension("yaml.tmp");
        std::fs::write(&tmp, plan.to_yaml()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
        // What apply will load must load.
        load_plan(out, Some(&inv.fingerprint())).map_err(|e| anyhow!("the written plan does not load back: {e}"))?;
        eprintln!("plan written to {}", out.display());
    }
    Ok(())
}

fn summary(inv: &Inventory, an: &Analysis, plan: &Plan) -> String {
    let mut s = String::new();
    let mut pools: std::collections::BTreeMap<&str, usize> = Default::default();
    for n in &inv.nodes {
        *pools.entry(n.pool.as_str()).or_default() += 1;
    }
    let cp = inv.nodes.iter().filter(|n| n.control_plane).count();
    let _ = writeln!(
        s,
        "cluster     {} ({} nodes, {cp} control plane) fingerprint {}",
        inv.server_version,
        inv.nodes.len(),
        plan.cluster.fingerprint
    );
    let _ = writeln!(s, "pools       {}", pools.iter().map(|(p, n)| format!("{p}={n}")).collect::<Vec<_>>().join(" "));
    let _ = writeln!(s, "legacy CNI  {}", inv.cni.kind.as_deref().unwrap_or("none found"));
    let _ = writeln!(
        s,
        "kube-proxy  {} {}",
        inv.kube_proxy.mode.as_deref().unwrap_or("not found"),
        inv.kube_proxy.deployed_as.as_deref().unwrap_or("")
    );
    let _ = writeln!(s, "services    {} (endpoints from {})", inv.services.services.len(), inv.endpoints_source);
    let count = |c| an.policies.iter().filter(|p| p.class == c).count();
    let _ = writeln!(
        s,
        "policies    {} carried over, {} need attention, {} blockers",
        count(PolicyClass::CarriedOver),
        count(PolicyClass::NeedsAttention),
        count(PolicyClass::Blocker)
    );
    let _ = writeln!(s, "PDBs        {}", inv.pdbs.len());
    let _ = writeln!(
        s,
        "target      pod CIDR {}, {} port {}, {} waves, about {} min",
        plan.target.pod_cidr,
        plan.target.tunnel.protocol,
        plan.target.tunnel.port,
        plan.waves.len(),
        plan.estimates.total_seconds.div_ceil(60)
    );
    let _ = writeln!(s, "\nfindings (blockers first):");
    for f in &an.findings {
        let tag = match f.severity {
            Severity::Blocker => "BLOCKER",
            Severity::Attention => "ATTENTION",
            Severity::Info => "info",
        };
        let text = format!("{}: {}", f.subject, f.message);
        for (i, line) in wrap(&text, 88).iter().enumerate() {
            let _ = writeln!(s, "  {:<9} {line}", if i == 0 { tag } else { "" });
        }
    }
    let _ = writeln!(s, "\npolicies:");
    for p in &an.policies {
        let cls = match p.class {
            PolicyClass::CarriedOver => "carried-over",
            PolicyClass::NeedsAttention => "needs-attention",
            PolicyClass::Blocker => "blocker",
        };
        let _ = writeln!(s, "  {cls:<15} {}/{} ({})", p.namespace, p.name, p.api);
    }
    let _ = writeln!(s, "\nwaves:");
    for w in &plan.waves {
        let nodes: Vec<String> =
            w.batches.iter().map(|b| b.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>().join("+")).collect();
        let _ = writeln!(s, "  {:<12} {}", w.name, nodes.join(" -> "));
    }
    s
}

/// Greedy word wrap so that findings fit an 100-column terminal.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let cur = lines.last_mut().unwrap();
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(word.to_string());
        } else {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
    }
    lines
}
