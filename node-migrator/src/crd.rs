//! The migration's state in the cluster: one `NodeMigration` per node and one
//! `ClusterMigration` for the cluster's prepare/finish phases. The status is the
//! journal: a phase is written as entered before anything is changed, and as reached
//! (with what it changed) once its postcondition holds, so a killed apply resumes from
//! these objects alone and `migrate rollback` knows exactly what to undo.
//!
//! The CRDs are generated from these types (`crds()`), so the schema the apiserver
//! validates and the Rust code cannot drift apart. Both are cluster-scoped: a node is.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use kubeshift_planner::plan::StepAction;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "kubeshift.io";
/// The field manager of every server-side apply kubeshift makes.
pub const MANAGER: &str = "kubeshift";
/// Label on every object kubeshift creates, for `kubectl get -l` and for sysdump.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "kubeshift");

/// Which way a node is moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub enum Direction {
    #[default]
    Forward,
    Rollback,
}

/// One node's migration: what apply wants and what has been reached.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[kube(
    group = "kubeshift.io",
    version = "v1alpha1",
    kind = "NodeMigration",
    plural = "nodemigrations",
    shortname = "nm",
    status = "NodeMigrationStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Wave","type":"string","jsonPath":".spec.wave"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeMigrationSpec {
    pub node: String,
    pub wave: String,
    /// metadata.name of the plan and its cluster fingerprint.
    pub plan: String,
    pub fingerprint: String,
    /// The node's steps in the plan's order, as the plan names them.
    #[schemars(with = "Vec<String>")]
    pub steps: Vec<StepAction>,
    /// The last step apply wants done (`None`: nothing yet); rollback lowers it.
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub wanted: Option<StepAction>,
    #[serde(default)]
    pub direction: Direction,
    /// The legacy pod networks (Flannel's Network, Calico's IPv4 pools): the routes the
    /// finish phase removes on the node lie in them.
    #[serde(default)]
    pub legacy_pod_cidrs: Vec<String>,
    /// Set by the finish phase once the legacy CNI's DaemonSets are gone: the node's
    /// agent removes the legacy devices, routes and chains and records it in
    /// `status.legacyRemoved`. Rollback clears it.
    #[serde(default)]
    pub remove_legacy: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeMigrationStatus {
    /// `Pending`, a step's name while the node is between steps, or `Done`.
    #[serde(default)]
    pub phase: String,
    /// The last step whose postcondition held, going forward (`None`: none yet).
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub reached: Option<StepAction>,
    /// The step being run now; written before it changes anything.
    #[serde(default)]
    pub in_progress: Option<InProgress>,
    /// Ready for service: done and its last gate passed.
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Every step run, in order, with what it changed (the inverse undoes exactly that).
    #[serde(default)]
    pub history: Vec<StepRecord>,
    /// Why the node cannot go on, in words an operator can act on.
    #[serde(default)]
    pub blocked: Option<String>,
    /// The finish phase's removal of the legacy CNI's leftovers on this node.
    #[serde(default)]
    pub legacy_removed: Option<StepRecord>,
    /// The last gate run for this node (the connectivity suite's summary).
    #[serde(default)]
    pub last_gate: Option<GateRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateRecord {
    pub at: String,
    pub passed: bool,
    /// The nodes the suite ran on.
    pub nodes: Vec<String>,
    pub checks: usize,
    pub failures: Vec<String>,
    /// Verdicts that differ from the baseline taken in prepare.
    pub changed_verdicts: Vec<String>,
    pub seconds: f64,
    /// The long-lived connections opened in prepare, as this gate found them.
    #[serde(default)]
    pub connections: Option<ConnectionsRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsRecord {
    /// Judged, each still the same live connection unless listed in the failures.
    pub judged: usize,
    /// Not judged: their pod was drained and replaced, or they start on the node just
    /// migrated (its host's service connections lose kube-proxy's conntrack entries).
    pub ended_by_design: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InProgress {
    #[schemars(with = "String")]
    pub step: StepAction,
    pub direction: Direction,
    /// RFC 3339.
    pub started_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    #[schemars(with = "String")]
    pub step: StepAction,
    pub direction: Direction,
    pub started_at: String,
    pub finished_at: String,
    /// What the step changed, in the shape its inverse reads (e.g. `{"cordoned": true}`
    /// when cordon found the node schedulable; `{}` when it found it cordoned already,
    /// so the inverse leaves it cordoned).
    #[schemars(schema_with = "any_object")]
    #[serde(default)]
    pub changed: serde_json::Value,
    /// One line for `migrate status`.
    #[serde(default)]
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub last_transition_time: String,
}

/// The cluster's own phases (prepare, finish) and what they keep for rollback.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[kube(
    group = "kubeshift.io",
    version = "v1alpha1",
    kind = "ClusterMigration",
    plural = "clustermigrations",
    status = "ClusterMigrationStatus",
    printcolumn = r#"{"name":"Plan","type":"string","jsonPath":".spec.plan"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMigrationSpec {
    pub plan: String,
    pub fingerprint: String,
    pub legacy_cni: String,
    pub kube_proxy_mode: String,
    /// The plan as applied, so status, rollback and sysdump need no file.
    #[serde(default)]
    pub plan_yaml: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMigrationStatus {
    /// `Preparing`, `Prepared`, `Migrating`, `Finishing`, `Finished`, `RollingBack`.
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Objects changed or removed by prepare/finish, each with a backup reference.
    #[serde(default)]
    pub changed: Vec<ChangedObject>,
    /// The ConfigMap holding the baseline verdict matrix from prepare.
    #[serde(default)]
    pub baseline: Option<String>,
    /// The gate after each wave of more than one node, by wave name.
    #[serde(default)]
    pub wave_gates: std::collections::BTreeMap<String, GateRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangedObject {
    /// `apps/v1 DaemonSet kube-system/kube-proxy`.
    pub object: String,
    /// What was done: `node-affinity`, `deleted`, …
    pub change: String,
    /// ConfigMap `namespace/name` with the object as it was.
    #[serde(default)]
    pub backup: Option<String>,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// The CRDs as the apiserver gets them (apiextensions.k8s.io/v1, served since 1.16).
pub fn crds() -> Vec<CustomResourceDefinition> {
    [NodeMigration::crd(), ClusterMigration::crd()].into_iter().map(without_defaults).collect()
}

/// Drops the `default`s schemars derives from `#[serde(default)]`: a 1.20 apiserver
/// reads an empty-string default as null and refuses the CRD ("in body must be of type
/// string: null"), and serde fills in missing fields when kubeshift reads them anyway.
fn without_defaults(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("default");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(&crd).expect("a CRD serializes");
    for version in v["spec"]["versions"].as_array_mut().into_iter().flatten() {
        strip(&mut version["schema"]);
    }
    serde_json::from_value(v).expect("a CRD without defaults deserializes")
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("applying CRD {name}: {source}")]
    Apply { name: String, source: kube::Error },
    #[error("CRD {name} not Established after {timeout:?}: {state}")]
    NotEstablished { name: String, timeout: std::time::Duration, state: String },
}

/// Server-side applies [`crds`] and waits until the apiserver serves them (their
/// `Established` condition): prepare's first step, and idempotent.
pub async fn install(client: &kube::Client, timeout: std::time::Duration) -> Result<(), InstallError> {
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = std::time::Instant::now() + timeout;
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let applied = api
            .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
            .await
            .map_err(|source| InstallError::Apply { name: name.clone(), source })?;
        let mut current = applied;
        loop {
            let conditions = current.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
            if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                break;
            }
            if std::time::Instant::now() > deadline {
                let state: Vec<String> = conditions.iter().map(|c| format!("{}={}", c.type_, c.status)).collect();
                return Err(InstallError::NotEstablished { name, timeout, state: format!("conditions {state:?}") });
            }
            // Establishing is the apiserver's own work on its own time; there is no event
            // to wait on other than the condition itself.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            current = api.get(&name).await.map_err(|source| InstallError::Apply { name: name.clone(), source })?;
        }
    }
    Ok(())
}

/// Replaces the status of `nm` (its resourceVersion makes a concurrent writer's
/// change a 409 Conflict, so neither the driver nor the agent overwrites the other).
pub async fn write_status(
    api: &kube::Api<NodeMigration>,
    nm: &NodeMigration,
    status: NodeMigrationStatus,
) -> Result<NodeMigration, kube::Error> {
    let name = nm.metadata.name.clone().unwrap_or_default();
    let mut obj = nm.clone();
    obj.status = Some(status);
    api.replace_status(&name, &kube::api::PostParams::default(), &obj).await
}

/// RFC 3339, seconds, UTC: what the status's timestamps hold.
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Multi-document YAML of [`crds`], for `deploy/` and `kubeshift install manifests`.
pub fn crds_yaml() -> String {
    crds().iter().map(|c| serde_yaml::to_string(c).expect("a CRD serializes")).collect::<Vec<_>>().join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_are_cluster_scoped_with_the_status_subresource_and_columns() {
        for crd in crds() {
            assert_eq!(crd.spec.scope, "Cluster", "{}", crd.spec.names.kind);
            let v = &crd.spec.versions[0];
            assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
            let cols: Vec<&str> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
            assert!(cols.contains(&"Phase") && cols.contains(&"Age"), "{cols:?}");
        }
        let yaml = crds_yaml();
        assert!(!yaml.contains("default:"), "no schema defaults (a 1.20 apiserver refuses empty-string ones)");
        assert!(yaml.contains("nodemigrations.kubeshift.io") && yaml.contains("clustermigrations.kubeshift.io"));
    }

    #[test]
    fn step_names_in_the_status_are_the_plans() {
        let st = NodeMigrationStatus { reached: Some(StepAction::Drain), ..Default::default() };
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["reached"], "drain");
        let back: NodeMigrationStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back.reached, Some(StepAction::Drain));
    }
}
