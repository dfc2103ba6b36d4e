//! `kubeshift migrate runbook`: the maintenance-window runbook, rendered from a plan
//! through the minijinja templates in `playbooks/`. The plan decides the content (nodes,
//! phases, rollback points, times); the templates decide the words and the layout, so a
//! team can rewrite them (`--templates DIR`) without touching kubeshift.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use kubeshift_planner::analysis::{Finding, Severity};
use kubeshift_planner::plan::{load_plan, Gate, Plan};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The templates kubeshift ships, by the names templates include each other with.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("runbook.md.j2", include_str!("../../playbooks/runbook.md.j2")),
    ("runbook.html.j2", include_str!("../../playbooks/runbook.html.j2")),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Markdown,
    /// One self-contained page.
    Html,
}

#[derive(Args)]
pub struct RunbookArgs {
    /// The plan file written by `migrate plan`.
    #[arg(short = 'f', long = "filename")]
    pub plan: PathBuf,
    /// The runbook's format.
    #[arg(short = 'o', long, value_parser = crate::output_format::formats::<Format>(), default_value = "markdown")]
    pub output: crate::output_format::OutputFormat,
    /// Write the runbook here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A directory with your own runbook.md.j2 and/or runbook.html.j2 (the others stay
    /// kubeshift's own); start from a copy of playbooks/.
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// The findings to list (blockers first): the JSON of `kubeshift migrate plan -o json`.
    /// The plan file itself does not carry them.
    #[arg(long)]
    pub findings: Option<PathBuf>,
}

pub fn run(a: RunbookArgs) -> Result<()> {
    let plan = load_plan(&a.plan, None).map_err(|e| anyhow!("{e}"))?;
    let findings = a.findings.as_deref().map(|p| read_findings(p, &plan)).transpose()?;
    let templates = load_templates(a.templates.as_deref())?;
    let input = RunbookInput { plan_file: a.plan.display().to_string(), findings, findings_file: a.findings.clone() };
    let format: Format = crate::output_format::narrow(a.output, "migrate runbook")?;
    let text = render(&plan, &input, format, &templates)?;
    match &a.out {
        Some(out) => {
            std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("runbook written to {}", out.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// The findings out of `migrate plan -o json` (`{inventory, analysis, plan}`), or out of
/// a bare analysis (`{findings, ...}`). A file made for another cluster is refused, as a
/// runbook that lists another cluster's blockers is worse than none.
pub fn read_findings(path: &Path, plan: &Plan) -> Result<Vec<Finding>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading findings {name}"))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{name}: not the JSON of `kubeshift migrate plan -o json`"))?;
    if let Some(fp) = v.pointer("/plan/cluster/fingerprint").and_then(|f| f.as_str()) {
        if fp != plan.cluster.fingerprint {
            bail!(
                "{name}: made for cluster {fp}, but the plan is for {}; run `kubeshift migrate plan -o json` again",
                plan.cluster.fingerprint
            );
        }
    }
    let findings = v.pointer("/analysis/findings").or_else(|| v.get("findings")).ok_or_else(|| {
        anyhow!("{name}: has no analysis.findings (expected `kubeshift migrate plan -o json` output)")
    })?;
    serde_json::from_value(findings.clone()).with_context(|| format!("{name}: analysis.findings"))
}

/// Template sources by name: kubeshift's, with those found in `dir` put in their place.
pub fn load_templates(dir: Option<&Path>) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = TEMPLATES.iter().map(|(n, s)| (n.to_string(), s.to_string())).collect();
    let Some(dir) = dir else { return Ok(out) };
    if !dir.is_dir() {
        bail!("--templates {}: not a directory", dir.display());
    }
    let mut replaced = 0;
    for (name, source) in &mut out {
        let p = dir.join(&*name);
        if p.exists() {
            *source = std::fs::read_to_string(&p).with_context(|| format!("reading template {}", p.display()))?;
            replaced += 1;
        }
    }
    if replaced == 0 {
        let names: Vec<&str> = TEMPLATES.iter().map(|(n, _)| *n).collect();
        bail!("--templates {}: none of {} in it", dir.display(), names.join(", "));
    }
    Ok(out)
}

pub struct RunbookInput {
    /// The plan path as the user gave it: it goes into the commands.
    pub plan_file: String,
    pub findings: Option<Vec<Finding>>,
    pub findings_file: Option<PathBuf>,
}

#[derive(Serialize)]
struct RunbookContext<'a> {
    plan: &'a Plan,
    plan_file: String,
    findings_file: Option<String>,
    kubeshift_version: &'static str,
    waves: Vec<WaveCtx>,
    nodes_total: usize,
    rollback_points: usize,
    /// None: the plan file carries no findings and none were given.
    findings: Option<Vec<FindingCtx>>,
    blockers: usize,
}

#[derive(Serialize)]
struct WaveCtx {
    number: usize,
    name: String,
    pools: Vec<String>,
    nodes: Vec<String>,
    seconds: u64,
    gate: Option<Gate>,
    batches: Vec<BatchCtx>,
}

#[derive(Serialize)]
struct BatchCtx {
    number: usize,
    nodes: Vec<NodeCtx>,
}

#[derive(Serialize)]
struct NodeCtx {
    name: String,
    pool: Option<String>,
    /// The other node for a gate run by hand: the next one in the plan (still on the
    /// legacy network), or for the last node the first one; none in a one-node plan.
    peer: Option<String>,
    seconds: u64,
    steps: Vec<StepCtx>,
}

#[derive(Serialize)]
struct StepCtx {
    number: usize,
    id: String,
    action: String,
    seconds: u32,
    rollback_point: bool,
    gate: Option<Gate>,
}

#[derive(Serialize)]
struct FindingCtx {
    severity: &'static str,
    subject: String,
    message: String,
}

fn context<'a>(plan: &'a Plan, input: &RunbookInput) -> RunbookContext<'a> {
    let order: Vec<&str> = plan.all_steps().map(|(_, n, _)| n.name.as_str()).fold(Vec::new(), |mut v, n| {
        if v.last() != Some(&n) {
            v.push(n);
        }
        v
    });
    let peer = |name: &str| -> Option<String> {
        let i = order.iter().position(|n| *n == name)?;
        order.get(i + 1).or_else(|| order.first().filter(|f| **f != name)).map(|s| s.to_string())
    };
    let waves: Vec<WaveCtx> = plan
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let batches: Vec<BatchCtx> = w
                .batches
                .iter()
                .enumerate()
                .map(|(j, b)| BatchCtx {
                    number: j + 1,
                    nodes: b
                        .nodes
                        .iter()
                        .map(|n| NodeCtx {
                            name: n.name.clone(),
                            pool: n.pool.clone(),
                            peer: peer(&n.name),
                            seconds: n.steps.iter().map(|s| s.estimate_seconds as u64).sum(),
                            steps: n
                                .steps
                                .iter()
                                .enumerate()
                                .map(|(k, s)| StepCtx {
                                    number: k + 1,
                                    id: s.id.clone(),
                                    // The plan file's spelling, so the runbook and the plan read alike.
                                    action: serde_yaml::to_string(&s.action).unwrap_or_default().trim().to_string(),
                                    seconds: s.estimate_seconds,
                                    rollback_point: s.rollback_point,
                                    gate: s.gate.clone(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect();
            // The nodes of a batch move at once, so a batch takes as long as its slowest.
            let seconds = batches.iter().map(|b| b.nodes.iter().map(|n| n.seconds).max().unwrap_or(0)).sum::<u64>();
            WaveCtx {
                number: i + 1,
                name: w.name.clone(),
                pools: w.pools.clone(),
                nodes: batches.iter().flat_map(|b| b.nodes.iter().map(|n| n.name.clone())).collect(),
                seconds,
                gate: w.gate.clone(),
                batches,
            }
        })
        .collect();
    let findings = input.findings.as_ref().map(|fs| {
        let mut fs: Vec<&Finding> = fs.iter().collect();
        // Blockers first, then what needs attention; stable within a severity.
        fs.sort_by_key(|f| f.severity);
        fs.into_iter()
            .map(|f| FindingCtx {
                severity: match f.severity {
                    Severity::Blocker => "blocker",
                    Severity::Attention => "attention",
                    Severity::Info => "info",
                },
                subject: f.subject.clone(),
                message: f.message.clone(),
            })
            .collect::<Vec<_>>()
    });
    RunbookContext {
        plan,
        plan_file: shell_quote(&input.plan_file),
        findings_file: input.findings_file.as_ref().map(|p| shell_quote(&p.display().to_string())),
        kubeshift_version: env!("CARGO_PKG_VERSION"),
        nodes_total: waves.iter().map(|w| w.nodes.len()).sum(),
        rollback_points: plan.all_steps().filter(|(_, _, s)| s.rollback_point).count(),
        blockers: input
            .findings
            .as_ref()
            .map(|f| f.iter().filter(|f| f.severity == Severity::Blocker).count())
            .unwrap_or(0),
        findings,
        waves,
    }
}

/// Renders the runbook as Markdown or as a standalone HTML page.
pub fn render(plan: &Plan, input: &RunbookInput, format: Format, templates: &[(String, String)]) -> Result<String> {
    let mut env = Environment::new();
    // A misspelt variable in a template must fail the render, not print an empty cell
    // into a document people act on.
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
            .expect("the default delimiters are valid"),
    );
    env.add_filter("slug", |s: String| slug(&s));
    env.add_filter("duration", |secs: u64| duration(secs));
    for (name, source) in templates {
        env.add_template_owned(name.clone(), source.clone()).map_err(|e| template_error(name, e))?;
    }
    let ctx = context(plan, input);
    let markdown = env
        .get_template("runbook.md.j2")
        .and_then(|t| t.render(minijinja::value::Serde(&ctx)))
        .map_err(|e| template_error("runbook.md.j2", e))?;
    match format {
        Format::Markdown => Ok(markdown),
        Format::Html => {
            let body = markdown_to_html(&markdown);
            env.get_template("runbook.html.j2")
                .and_then(|t| {
                    t.render(minijinja::context! { title => format!("Runbook: {}", plan.metadata.name), body => minijinja::Value::from_safe_string(body) })
                })
                .map_err(|e| template_error("runbook.html.j2", e))
        }
    }
}

fn template_error(name: &str, e: minijinja::Error) -> anyhow::Error {
    // minijinja's alternate form names the template, the line and shows the source.
    anyhow!("template {name}: {e:#}")
}

/// The Markdown extensions the runbook uses (GitHub's tables and task lists), for
/// rendering and for checking.
pub fn markdown_options() -> pulldown_cmark::Options {
    use pulldown_cmark::Options;
    Options::ENABLE_TABLES | Options::ENABLE_TASKLISTS | Options::ENABLE_STRIKETHROUGH
}

/// HTML whose heading ids are the GitHub slugs of the headings, so the `#anchor` links
/// that work on a rendered Markdown file work in the HTML page too.
pub fn markdown_to_html(markdown: &str) -> String {
    use pulldown_cmark::{Event, Parser, Tag, TagEnd};
    let mut events: Vec<Event> = Parser::new_ext(markdown, markdown_options()).collect();
    let mut seen = std::collections::HashMap::new();
    let mut i = 0;
    while i < events.len() {
        if let Event::Start(Tag::Heading { .. }) = &events[i] {
            let mut text = String::new();
            let mut j = i + 1;
            while !matches!(events[j], Event::End(TagEnd::Heading(_))) {
                if let Event::Text(t) | Event::Code(t) = &events[j] {
                    text.push_str(t);
                }
                j += 1;
            }
            let id = unique_slug(&text, &mut seen);
            if let Event::Start(Tag::Heading { id: slot, .. }) = &mut events[i] {
                *slot = Some(id.into());
            }
            i = j;
        }
        i += 1;
    }
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, events.into_iter());
    html
}

/// GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens.
pub fn slug(text: &str) -> String {
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// A repeated heading gets `-1`, `-2`, ... as on GitHub.
pub fn unique_slug(text: &str, seen: &mut std::collections::HashMap<String, usize>) -> String {
    let base = slug(text);
    let n = seen.entry(base.clone()).or_insert(0);
    let id = if *n == 0 { base.clone() } else { format!("{base}-{n}") };
    *n += 1;
    id
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s.div_ceil(60)),
        s => format!("{} h {} min", s / 3600, (s % 3600).div_ceil(60)),
    }
}

/// Quotes a path for a POSIX shell only when it needs it, so that ordinary paths stay
/// readable in the commands.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
pub(crate) mod tests;
