//! The plan file: a versioned YAML document a human reviews before `migrate
//! apply` runs it. Schema documented in planner/README.md.
//!
//! Loading checks, in this order: YAML syntax (with `path:line:col`), the
//! apiVersion and kind (before the body, so a plan from a newer kubeshift is
//! reported as such rather than as a pile of unknown fields), the body
//! (unknown fields are errors: a typo in a reviewed file must not be
//! silently ignored), the step graph (ids unique, references known, no
//! cycle), and the cluster fingerprint when the caller knows the cluster.

use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

pub const API_VERSION: &str = "kubeshift.io/v1alpha1";
pub const KIND: &str = "Plan";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: cannot read: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax { path: String, line: usize, column: usize, message: String },
    #[error("{path}: apiVersion is {found:?}, this kubeshift reads {API_VERSION:?} (was the plan written by another kubeshift version?)")]
    ApiVersion { path: String, found: String },
    #[error("{path}: kind is {found:?}, expected {KIND:?}")]
    Kind { path: String, found: String },
    #[error("{path}: the plan was made for cluster {plan}, but this cluster's fingerprint is {cluster}; re-run `kubeshift migrate plan` against this cluster")]
    FingerprintMismatch { path: String, plan: String, cluster: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Plan {
    pub api_version: String,
    pub kind: String,
    pub metadata: PlanMetadata,
    pub cluster: ClusterInfo,
    pub target: TargetDatapath,
    pub waves: Vec<Wave>,
    #[serde(default)]
    pub estimates: Estimates,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlanMetadata {
    pub name: String,
    /// RFC 3339.
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub kubeshift_version: Option<String>,
}

/// Identifies the cluster the plan was computed for; apply refuses to run a
/// plan on another cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterInfo {
    /// `sha1:<hex>` of the inputs listed in [`fingerprint`].
    pub fingerprint: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub node_count: usize,
    /// `flannel`, `calico`, `canal`.
    #[serde(default)]
    pub legacy_cni: Option<String>,
    #[serde(default)]
    pub kube_proxy_mode: Option<String>,
    /// Every DaemonSet of the legacy CNI (`namespace/name`): apply pins and removes each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub legacy_daemon_sets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetDatapath {
    /// New pod CIDR; must overlap no existing pod, service or node range.
    pub pod_cidr: String,
    #[serde(default)]
    pub service_cidr: Option<String>,
    pub tunnel: Tunnel,
    /// Nodes out of service at once, cluster-wide.
    #[serde(default = "one")]
    pub max_unavailable: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tunnel {
    /// `vxlan` or `geneve`.
    pub protocol: String,
    /// Never 8472 (Flannel's VXLAN port) nor a port the legacy CNI uses, so both can run side by side.
    pub port: u16,
    /// VXLAN network identifier, distinct from the legacy CNI's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// The legacy tunnels the port and VNI were chosen to avoid, and where each was read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Wave {
    pub name: String,
    #[serde(default)]
    pub pools: Vec<String>,
    pub batches: Vec<Batch>,
    /// Run after the last batch, before the next wave starts.
    #[serde(default)]
    pub gate: Option<Gate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Batch {
    pub nodes: Vec<NodePlan>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePlan {
    pub name: String,
    #[serde(default)]
    pub pool: Option<String>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepAction {
    /// Record the node's networking as it is (iptables of both backends, nftables, IPVS,
    /// links and routes, CNI conf files with hashes) before anything changes.
    Snapshot,
    Cordon,
    Drain,
    InstallDatapath,
    SwitchPods,
    TakeOverServices,
    CleanKubeProxy,
    CleanLegacy,
    Uncordon,
    ConnectivityGate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// Unique in the plan, e.g. `node-a1/drain`.
    pub id: String,
    pub action: StepAction,
    /// Extra dependencies beyond the implicit order (previous step of the
    /// node, previous batch, previous wave).
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub gate: Option<Gate>,
    /// Apply records state here so that rollback can return to this point.
    #[serde(default)]
    pub rollback_point: bool,
    #[serde(default)]
    pub estimate_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gate {
    /// Connectivity-test suite name.
    pub suite: String,
    #[serde(default = "default_gate_timeout")]
    pub timeout_seconds: u32,
}

fn default_gate_timeout() -> u32 {
    300
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Estimates {
    #[serde(default)]
    pub total_seconds: u64,
    #[serde(default)]
    pub nodes: usize,
    #[serde(default)]
    pub max_parallel_nodes: usize,
}

/// `sha1:<hex>` over the given parts (sorted by the caller where order is
/// not meaningful). Discovery feeds it the kube-system namespace UID, the
/// sorted node names, the service CIDR and the legacy CNI, so a plan
/// computed for one cluster (or before nodes were added) is refused elsewhere.
pub fn fingerprint(parts: &[&str]) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    format!("sha1:{}", hex::encode(h.finalize()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

fn syntax(path: &str, e: serde_yaml::Error) -> PlanError {
    let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
    // serde_yaml appends " at line X column Y"; the prefix already says it.
    let mut message = e.to_string();
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    PlanError::Syntax { path: path.to_string(), line, column, message }
}

/// Parses and validates a plan. `cluster_fingerprint` is the live cluster's,
/// when known (apply always knows it; `plan show` may not).
pub fn parse_plan(path: &str, text: &str, cluster_fingerprint: Option<&str>) -> Result<Plan, PlanError> {
    let header: Header = serde_yaml::from_str(text).map_err(|e| syntax(path, e))?;
    match header.api_version.as_deref() {
        Some(API_VERSION) => {}
        other => return Err(PlanError::ApiVersion { path: path.into(), found: other.unwrap_or("").into() }),
    }
    if header.kind.as_deref() != Some(KIND) {
        return Err(PlanError::Kind { path: path.into(), found: header.kind.unwrap_or_default() });
    }
    let plan: Plan = serde_yaml::from_str(text).map_err(|e| syntax(path, e))?;
    plan.validate().map_err(|message| PlanError::Invalid { path: path.into(), message })?;
    if let Some(fp) = cluster_fingerprint {
        if plan.cluster.fingerprint != fp {
            return Err(PlanError::FingerprintMismatch {
                path: path.into(),
                plan: plan.cluster.fingerprint.clone(),
                cluster: fp.to_string(),
            });
        }
    }
    Ok(plan)
}

/// Reads, parses and validates a plan file.
pub fn load_plan(path: &Path, cluster_fingerprint: Option<&str>) -> Result<Plan, PlanError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PlanError::Io { path: name.clone(), source })?;
    parse_plan(&name, &text, cluster_fingerprint)
}

impl Plan {
    /// The YAML a human reviews, with a header saying what it is.
    pub fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).expect("plan serializes");
        format!(
            "# kubeshift migration plan. Review it, then run `kubeshift migrate apply -f <this file>`.\n# Schema: planner/README.md. apply refuses it on a cluster with another fingerprint.\n{body}"
        )
    }

    pub fn all_steps(&self) -> impl Iterator<Item = (&Wave, &NodePlan, &Step)> {
        self.waves.iter().flat_map(|w| {
            w.batches.iter().flat_map(move |b| b.nodes.iter().flat_map(move |n| n.steps.iter().map(move |s| (w, n, s))))
        })
    }

    /// Structural checks beyond what serde enforces.
    pub fn validate(&self) -> Result<(), String> {
        if self.target.tunnel.port == 8472 {
            return Err("target.tunnel.port is 8472, Flannel's VXLAN port: both datapaths run side by side during the migration, pick another port".into());
        }
        if self.waves.is_empty() {
            return Err("the plan has no waves".into());
        }
        let mut seen_nodes: HashMap<&str, &str> = HashMap::new();
        for w in &self.waves {
            if w.batches.is_empty() {
                return Err(format!("wave {} has no batches", w.name));
            }
            for b in &w.batches {
                if b.nodes.is_empty() {
                    return Err(format!("wave {} has an empty batch", w.name));
                }
                for n in &b.nodes {
                    if let Some(prev) = seen_nodes.insert(&n.name, &w.name) {
                        return Err(format!("node {} appears twice (waves {prev} and {})", n.name, w.name));
                    }
                    if n.steps.is_empty() {
                        return Err(format!("node {} has no steps", n.name));
                    }
                }
            }
        }
        StepGraph::build(self).map(|_| ())
    }

    pub fn graph(&self) -> Result<StepGraph, String> {
        StepGraph::build(self)
    }
}

/// One vertex of the step graph.
#[derive(Debug, Clone, PartialEq)]
pub struct StepNode {
    pub id: String,
    /// `None` for wave gates.
    pub node: Option<String>,
    pub wave: String,
    pub action: StepAction,
    pub rollback_point: bool,
    pub estimate_seconds: u32,
}

/// The plan's steps as a DAG: a node's steps in order, every node of a batch
/// after the whole previous batch, a wave after the previous wave's gate.
pub struct StepGraph {
    pub graph: DiGraph<StepNode, ()>,
    pub index: HashMap<String, NodeIndex>,
}

impl StepGraph {
    pub fn build(plan: &Plan) -> Result<StepGraph, String> {
        let mut g: DiGraph<StepNode, ()> = DiGraph::new();
        let mut index: HashMap<String, NodeIndex> = HashMap::new();
        let add = |g: &mut DiGraph<StepNode, ()>,
                   index: &mut HashMap<String, NodeIndex>,
                   n: StepNode|
         -> Result<NodeIndex, String> {
            if index.contains_key(&n.id) {
                return Err(format!("step id {} is used twice", n.id));
            }
            let id = n.id.clone();
            let i = g.add_node(n);
            index.insert(id, i);
            Ok(i)
        };
        // The vertices everything next must wait for.
        let mut frontier: Vec<NodeIndex> = Vec::new();
        let mut explicit: Vec<(NodeIndex, String, String)> = Vec::new();
        for w in &plan.waves {
            for b in &w.batches {
                let mut next_frontier = Vec::new();
                for n in &b.nodes {
                    let mut prev: Option<NodeIndex> = None;
                    for s in &n.steps {
                        let i = add(
                            &mut g,
                            &mut index,
                            StepNode {
                                id: s.id.clone(),
                                node: Some(n.name.clone()),
                                wave: w.name.clone(),
                                action: s.action,
                                rollback_point: s.rollback_point,
                                estimate_seconds: s.estimate_seconds,
                            },
                        )?;
                        match prev {
                            Some(p) => {
                                g.add_edge(p, i, ());
                            }
                            None => {
                                for &f in &frontier {
                                    g.add_edge(f, i, ());
                                }
                            }
                        }
                        for a in &s.after {
                            explicit.push((i, a.clone(), s.id.clone()));
                        }
                        prev = Some(i);
                    }
                    next_frontier.extend(prev);
                }
                frontier = next_frontier;
            }
            if let Some(gate) = &w.gate {
                let i = add(
                    &mut g,
                    &mut index,
                    StepNode {
                        id: format!("wave/{}/gate", w.name),
                        node: None,
                        wave: w.name.clone(),
                        action: StepAction::ConnectivityGate,
                        rollback_point: true,
                        estimate_seconds: gate.timeout_seconds.min(120),
                    },
                )?;
                for &f in &frontier {
                    g.add_edge(f, i, ());
                }
                frontier = vec![i];
            }
        }
        for (i, dep, owner) in explicit {
            let Some(&d) = index.get(&dep) else {
                return Err(format!("step {owner}: `after` names unknown step {dep}"));
            };
            g.add_edge(d, i, ());
        }
        if let Err(cycle) = petgraph::algo::toposort(&g, None) {
            return Err(format!("the steps form a cycle through {}", g[cycle.node_id()].id));
        }
        Ok(StepGraph { graph: g, index })
    }

    /// Steps in an order apply can run them.
    pub fn order(&self) -> Vec<&StepNode> {
        petgraph::algo::toposort(&self.graph, None)
            .expect("validated acyclic")
            .into_iter()
            .map(|i| &self.graph[i])
            .collect()
    }

    /// Longest path by estimates: the wall-clock time with unlimited parallelism inside batches.
    pub fn critical_path_seconds(&self) -> u64 {
        let mut best: HashMap<NodeIndex, u64> = HashMap::new();
        let order = petgraph::algo::toposort(&self.graph, None).expect("validated acyclic");
        let mut max = 0;
        for i in order {
            let start =
                self.graph.neighbors_directed(i, petgraph::Direction::Incoming).map(|p| best[&p]).max().unwrap_or(0);
            let end = start + self.graph[i].estimate_seconds as u64;
            best.insert(i, end);
            max = max.max(end);
        }
        max
    }

    fn label(n: &StepNode) -> String {
        let action = serde_yaml::to_string(&n.action).unwrap_or_default().trim().to_string();
        match &n.node {
            Some(node) => format!("{node}: {action}"),
            None => format!("wave {}: {action}", n.wave),
        }
    }

    /// Graphviz DOT. Gates are diamonds, rollback points have a double border.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph plan {\n  rankdir=TB;\n  node [shape=box, fontname=\"sans-serif\"];\n");
        for i in self.graph.node_indices() {
            let n = &self.graph[i];
            let mut attrs = format!("label=\"{}\"", Self::label(n).replace('"', "\\\""));
            if n.action == StepAction::ConnectivityGate {
                attrs.push_str(", shape=diamond");
            }
            if n.rollback_point {
                attrs.push_str(", peripheries=2");
            }
            writeln!(s, "  s{} [{attrs}];", i.index()).unwrap();
        }
        for e in self.graph.raw_edges() {
            writeln!(s, "  s{} -> s{};", e.source().index(), e.target().index()).unwrap();
        }
        s.push_str("}\n");
        s
    }

    /// Mermaid flowchart (renders in GitHub and GitLab markdown).
    pub fn to_mermaid(&self) -> String {
        let mut s = String::from("flowchart TD\n");
        for i in self.graph.node_indices() {
            let n = &self.graph[i];
            let label = Self::label(n).replace('"', "#quot;");
            let (open, close) = if n.action == StepAction::ConnectivityGate {
                ("{", "}")
            } else if n.rollback_point {
                ("[[", "]]")
            } else {
                ("[", "]")
            };
            writeln!(s, "  s{}{open}\"{label}\"{close}", i.index()).unwrap();
        }
        for e in self.graph.raw_edges() {
            writeln!(s, "  s{} --> s{}", e.source().index(), e.target().index()).unwrap();
        }
        s
    }
}
