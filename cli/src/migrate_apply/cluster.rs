//! The cluster's own phases, recorded in the `ClusterMigration` (named after the plan):
//!
//! - **prepare** (forward): CRDs; the agent DaemonSet in standby on every node with the
//!   plan's pod CIDR, tunnel and the legacy pod networks to bridge; kube-proxy's
//!   DaemonSet excluded from nodes labelled `kubeshift.io/no-kube-proxy` (its affinity as
//!   it was kept in a backup ConfigMap); the baseline verdict matrix.
//!   Inverse (`rollback --all`): kube-proxy's affinity restored from the backup. The
//!   agent stays, in standby.
//! - **finish** (forward): kube-proxy's and the legacy CNI's DaemonSets and the
//!   ConfigMaps their pods mount backed up and deleted; every node's agent removes the
//!   legacy devices, routes and chains; the agent re-rendered without the legacy pod
//!   networks (the bridges go); a last gate.
//!   Inverse: the DaemonSets and ConfigMaps re-created from their backups, the agent
//!   with the bridges again.
//!
//! Each part checks the recorded phase first, so a resumed run skips what is done.

use super::phases::{AGENT_DS, AGENT_NS};
use super::{gate, Ctx};
use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{pinned_kind, Scope};
use kubeshift_node_migrator::crd::{
    self, ChangedObject, ClusterMigration, ClusterMigrationSpec, ClusterMigrationStatus, NodeMigration, MANAGER,
};
use kubeshift_node_migrator::daemonsets::{self, NO_KUBE_PROXY};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const ROLLOUT_WAIT: Duration = Duration::from_secs(300);
const LEGACY_REMOVAL_WAIT: Duration = Duration::from_secs(180);

pub async fn get_or_create(cx: &Ctx) -> Result<ClusterMigration> {
    let api: Api<ClusterMigration> = Api::all(cx.client.clone());
    let name = &cx.plan.metadata.name;
    if let Some(cm) = api.get_opt(name).await? {
        anyhow::ensure!(
            cm.spec.fingerprint == cx.plan.cluster.fingerprint,
            "ClusterMigration {name} was started from a plan for another cluster state ({}); this plan's is {}",
            cm.spec.fingerprint,
            cx.plan.cluster.fingerprint
        );
        return Ok(cm);
    }
    let mut cm = ClusterMigration::new(
        name,
        ClusterMigrationSpec {
            plan: name.clone(),
            fingerprint: cx.plan.cluster.fingerprint.clone(),
            legacy_cni: cx.plan.cluster.legacy_cni.clone().unwrap_or_default(),
            kube_proxy_mode: cx.plan.cluster.kube_proxy_mode.clone().unwrap_or_default(),
            plan_yaml: cx.plan.to_yaml(),
        },
    );
    cm.metadata.labels = Some([(crd::PART_OF.0.to_string(), crd::PART_OF.1.to_string())].into());
    api.create(&PostParams::default(), &cm).await.with_context(|| format!("creating ClusterMigration {name}"))
}

pub async fn set_status(cx: &Ctx, status: &ClusterMigrationStatus) -> Result<()> {
    let api: Api<ClusterMigration> = Api::all(cx.client.clone());
    api.patch_status(&cx.plan.metadata.name, &PatchParams::default(), &Patch::Merge(&json!({"status": status})))
        .await
        .with_context(|| format!("writing ClusterMigration {}'s status", cx.plan.metadata.name))?;
    Ok(())
}

pub fn status_of(cm: &ClusterMigration) -> ClusterMigrationStatus {
    cm.status.clone().unwrap_or_default()
}

/// Server-side applies every document of `yaml` (kinds resolved through discovery, so
/// whatever the apiserver serves is used).
pub async fn apply_manifests(cx: &Ctx, yaml: &str) -> Result<()> {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(v.clone())?;
        let tm = obj.types.clone().context("a manifest without apiVersion/kind")?;
        let gvk = GroupVersionKind::try_from(&tm)?;
        let (ar, caps) =
            pinned_kind(&cx.client, &gvk).await.with_context(|| format!("the apiserver does not serve {gvk:?}"))?;
        let name = obj.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                Api::namespaced_with(cx.client.clone(), obj.metadata.namespace.as_deref().unwrap_or("default"), &ar)
            }
            Scope::Cluster => Api::all_with(cx.client.clone(), &ar),
        };
        api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&v))
            .await
            .with_context(|| format!("applying {} {name}", tm.kind))?;
    }
    Ok(())
}

fn agent_manifests(cx: &Ctx, with_legacy: bool) -> Result<String> {
    let t = &cx.plan.target;
    crate::install_cmd::render(&crate::install_cmd::ManifestArgs {
        image: cx.image.clone(),
        pod_cidr: t.pod_cidr.clone(),
        tunnel_port: t.tunnel.port,
        vni: t.tunnel.vni.unwrap_or(kubeshift_datapath::overlay::DEFAULT_VNI),
        legacy_pod_cidrs: if with_legacy { cx.legacy_cidrs.clone() } else { Vec::new() },
    })
}

/// Waits until the DaemonSet has rolled out its current template to every node it
/// wants and every pod is Ready (none wanted is rolled out: kube-proxy restored while
/// every node still carries the no-kube-proxy label).
async fn wait_rolled_out(cx: &Ctx, ns: &str, name: &str) -> Result<()> {
    let api: Api<DaemonSet> = Api::namespaced(cx.client.clone(), ns);
    let deadline = Instant::now() + ROLLOUT_WAIT;
    loop {
        let ds = api.get(name).await?;
        let generation = ds.metadata.generation.unwrap_or(0);
        if let Some(s) = &ds.status {
            let updated = s.updated_number_scheduled.unwrap_or(0);
            if s.observed_generation.unwrap_or(0) >= generation
                && updated == s.desired_number_scheduled
                && s.number_ready == s.desired_number_scheduled
                && s.number_unavailable.unwrap_or(0) == 0
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "DaemonSet {ns}/{name} not rolled out within {ROLLOUT_WAIT:?}: desired {}, updated {updated}, ready {}",
                    s.desired_number_scheduled,
                    s.number_ready
                );
            }
        } else if Instant::now() > deadline {
            bail!("DaemonSet {ns}/{name} has no status after {ROLLOUT_WAIT:?}");
        }
        // The DaemonSet controller's status is the condition; it has no event to await.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `ns/name` → (ns, name).
pub fn split_key(key: &str) -> (String, String) {
    match key.split_once('/') {
        Some((n, d)) => (n.to_string(), d.to_string()),
        None => ("kube-system".to_string(), key.to_string()),
    }
}

fn backup_name(kind: &str, ns: &str, name: &str) -> String {
    format!("kubeshift-backup-{}-{ns}-{name}", kind.to_lowercase())
}

/// Keeps `object` (as the API returned it, minus what the server owns) in a ConfigMap
/// in kube-system; returns `kube-system/<name>`.
async fn backup(cx: &Ctx, kind: &str, ns: &str, name: &str, mut object: Value) -> Result<String> {
    if let Some(m) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        for k in ["resourceVersion", "uid", "creationTimestamp", "generation", "managedFields", "selfLink"] {
            m.remove(k);
        }
    }
    if let Some(o) = object.as_object_mut() {
        o.remove("status");
    }
    let cm_name = backup_name(kind, ns, name);
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": cm_name, "namespace": AGENT_NS, "labels": {crd::PART_OF.0: crd::PART_OF.1}},
        "data": {"object.json": serde_json::to_string_pretty(&object)?},
    });
    Api::<ConfigMap>::namespaced(cx.client.clone(), AGENT_NS)
        .patch(&cm_name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&cm))
        .await
        .with_context(|| format!("backing up {kind} {ns}/{name} into ConfigMap {AGENT_NS}/{cm_name}"))?;
    Ok(format!("{AGENT_NS}/{cm_name}"))
}

pub async fn prepare(cx: &Ctx) -> Result<()> {
    crd::install(&cx.client, Duration::from_secs(60)).await?;
    let cm = get_or_create(cx).await?;
    let mut status = status_of(&cm);
    if !status.phase.is_empty() && status.phase != "Preparing" && status.phase != "RolledBack" {
        if let Some(b) = &status.baseline {
            *cx.baseline.lock().unwrap() = Some(gate::load_baseline(cx, b).await?);
        }
        cx.progress.line(&format!("prepare: already done ({})", status.phase));
        return Ok(());
    }
    status.phase = "Preparing".into();
    set_status(cx, &status).await?;

    cx.progress.line("prepare: kubeshift's agent DaemonSet (standby) on every node");
    apply_manifests(cx, &agent_manifests(cx, true)?).await?;
    wait_rolled_out(cx, AGENT_NS, AGENT_DS).await?;

    if let Some((ns, name)) = &cx.kube_proxy {
        let object = serde_json::to_value(Api::<DaemonSet>::namespaced(cx.client.clone(), ns).get(name).await?)?;
        if let Some(before) = daemonsets::exclude(&cx.client, ns, name, NO_KUBE_PROXY).await? {
            let b = backup(cx, "affinity", ns, name, json!({"affinity": before, "object": object})).await?;
            status.changed.retain(|c| c.change != "node-affinity");
            status.changed.push(ChangedObject {
                object: format!("apps/v1 DaemonSet {ns}/{name}"),
                change: "node-affinity".into(),
                backup: Some(b),
            });
            set_status(cx, &status).await?;
        }
        wait_rolled_out(cx, ns, name).await?;
    }

    cx.progress.line("prepare: baseline connectivity suite on the legacy datapath");
    let (name, matrix) = gate::take_baseline(cx).await?;
    let nodes = gate::baseline_nodes(cx);
    let n = super::streams::open(cx, &nodes).await?;
    cx.progress.line(&format!("prepare: {n} long-lived connections opened between pods on {nodes:?}"));
    *cx.baseline.lock().unwrap() = Some(matrix);
    status.baseline = Some(name);
    status.phase = "Prepared".into();
    set_status(cx, &status).await?;
    Ok(())
}

/// The ConfigMaps a DaemonSet's pods mount (the CNI's net-conf, kube-proxy's config).
fn mounted_configmaps(ds: &DaemonSet) -> Vec<String> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.volumes.iter().flatten().filter_map(|v| v.config_map.as_ref().map(|c| c.name.clone())).collect())
        .unwrap_or_default()
}

pub async fn finish(cx: &Ctx) -> Result<()> {
    let cm = get_or_create(cx).await?;
    let mut status = status_of(&cm);
    if status.phase == "Finished" {
        cx.progress.line("finish: already done");
        return Ok(());
    }
    status.phase = "Finishing".into();
    set_status(cx, &status).await?;

    let mut daemonsets: Vec<(String, String)> = cx.kube_proxy.iter().cloned().collect();
    daemonsets.extend(cx.plan.cluster.legacy_daemon_sets.iter().map(|k| split_key(k)));
    for (ns, name) in &daemonsets {
        let api: Api<DaemonSet> = Api::namespaced(cx.client.clone(), ns);
        let Some(ds) = api.get_opt(name).await? else { continue };
        cx.progress.line(&format!("finish: DaemonSet {ns}/{name} backed up and deleted"));
        for cm_name in mounted_configmaps(&ds) {
            let cms: Api<ConfigMap> = Api::namespaced(cx.client.clone(), ns);
            let Some(obj) = cms.get_opt(&cm_name).await? else { continue };
            let b = backup(cx, "configmap", ns, &cm_name, serde_json::to_value(&obj)?).await?;
            status.changed.push(ChangedObject {
                object: format!("v1 ConfigMap {ns}/{cm_name}"),
                change: "deleted".into(),
                backup: Some(b),
            });
            set_status(cx, &status).await?;
            cms.delete(&cm_name, &DeleteParams::default()).await?;
        }
        let b = backup(cx, "daemonset", ns, name, serde_json::to_value(&ds)?).await?;
        status.changed.push(ChangedObject {
            object: format!("apps/v1 DaemonSet {ns}/{name}"),
            change: "deleted".into(),
            backup: Some(b),
        });
        set_status(cx, &status).await?;
        api.delete(name, &DeleteParams::foreground()).await?;
    }
    for (ns, name) in &daemonsets {
        wait_gone(cx, ns, name).await?;
    }

    cx.progress.line("finish: every node's agent removes the legacy devices, routes and chains");
    let nms: Api<NodeMigration> = Api::all(cx.client.clone());
    for node in cx.plan_nodes() {
        nms.patch(&node, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"removeLegacy": true}}))).await?;
    }
    for node in cx.plan_nodes() {
        wait_legacy_removed(cx, &node).await?;
    }

    cx.progress.line("finish: the agent without the legacy pod networks (bridges removed)");
    apply_manifests(cx, &agent_manifests(cx, false)?).await?;
    wait_rolled_out(cx, AGENT_NS, AGENT_DS).await?;

    let nodes: Vec<String> = cx.plan_nodes().into_iter().take(2).collect();
    cx.progress.line(&format!("finish: last gate on {nodes:?}"));
    let g = gate::run_gate(cx, nodes, None).await?;
    if !g.passed {
        return Err(super::GateFailed(g).into());
    }
    super::streams::close(cx).await?;
    status.phase = "Finished".into();
    set_status(cx, &status).await?;
    Ok(())
}

/// Pods of a deleted DaemonSet are gone (foreground deletion ends with the object).
async fn wait_gone(cx: &Ctx, ns: &str, name: &str) -> Result<()> {
    let api: Api<DaemonSet> = Api::namespaced(cx.client.clone(), ns);
    let deadline = Instant::now() + ROLLOUT_WAIT;
    while api.get_opt(name).await?.is_some() {
        if Instant::now() > deadline {
            bail!("DaemonSet {ns}/{name} still there {ROLLOUT_WAIT:?} after its deletion");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

async fn wait_legacy_removed(cx: &Ctx, node: &str) -> Result<()> {
    let nms: Api<NodeMigration> = Api::all(cx.client.clone());
    let deadline = Instant::now() + LEGACY_REMOVAL_WAIT;
    loop {
        let nm = nms.get(node).await?;
        if let Some(r) = nm.status.as_ref().and_then(|s| s.legacy_removed.as_ref()) {
            cx.progress.line(&format!("  {node}: {}", r.summary));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node {node}: its agent did not report the legacy CNI's leftovers removed within {LEGACY_REMOVAL_WAIT:?}; see the agent's log (kubectl -n {AGENT_NS} logs -l k8s-app={AGENT_DS})");
        }
        // The agent writes the status; polling it is the condition.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// finish's inverse: every deleted object back from its backup, and the bridges.
pub async fn unfinish(cx: &Ctx) -> Result<()> {
    let api: Api<ClusterMigration> = Api::all(cx.client.clone());
    let Some(cm) = api.get_opt(&cx.plan.metadata.name).await? else { return Ok(()) };
    let mut status = status_of(&cm);
    let deleted: Vec<ChangedObject> = status.changed.iter().filter(|c| c.change == "deleted").cloned().collect();
    if deleted.is_empty() {
        return Ok(());
    }
    cx.progress.line("rollback: the deleted DaemonSets and ConfigMaps re-created from their backups");
    // ConfigMaps first: the DaemonSets' pods mount them.
    let mut ordered = deleted.clone();
    ordered.sort_by_key(|c| !c.object.contains("ConfigMap"));
    for c in &ordered {
        let Some(b) = &c.backup else { continue };
        let (ns, name) = split_key(b);
        let data = Api::<ConfigMap>::namespaced(cx.client.clone(), &ns).get(&name).await?.data.unwrap_or_default();
        let object: Value = serde_json::from_str(data.get("object.json").map(String::as_str).unwrap_or("null"))?;
        apply_manifests(cx, &serde_yaml::to_string(&object)?)
            .await
            .with_context(|| format!("restoring {}", c.object))?;
    }
    apply_manifests(cx, &agent_manifests(cx, true)?).await?;
    let nms: Api<NodeMigration> = Api::all(cx.client.clone());
    for nm in nms.list(&ListParams::default()).await?.items {
        let name = nm.metadata.name.clone().unwrap_or_default();
        nms.patch(&name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"removeLegacy": false}}))).await?;
        let mut st = nm.status.clone().unwrap_or_default();
        if st.legacy_removed.take().is_some() {
            let fresh = nms.get(&name).await?;
            crd::write_status(&nms, &fresh, st).await?;
        }
    }
    status.changed.retain(|c| c.change != "deleted");
    status.phase = "Migrating".into();
    set_status(cx, &status).await?;
    for c in deleted.iter().filter(|c| c.object.contains("DaemonSet")) {
        let key = c.object.rsplit(' ').next().unwrap_or_default();
        let (ns, name) = split_key(key);
        wait_rolled_out(cx, &ns, &name).await?;
    }
    Ok(())
}

/// prepare's inverse, once no node is migrated: kube-proxy's affinity as it was.
pub async fn unprepare(cx: &Ctx) -> Result<()> {
    let api: Api<ClusterMigration> = Api::all(cx.client.clone());
    let Some(cm) = api.get_opt(&cx.plan.metadata.name).await? else { return Ok(()) };
    let mut status = status_of(&cm);
    for c in status.changed.iter().filter(|c| c.change == "node-affinity") {
        let (Some(b), Some((ns, name))) = (&c.backup, cx.kube_proxy.as_ref()) else { continue };
        let (bns, bname) = split_key(b);
        let data = Api::<ConfigMap>::namespaced(cx.client.clone(), &bns).get(&bname).await?.data.unwrap_or_default();
        let saved: Value = serde_json::from_str(data.get("object.json").map(String::as_str).unwrap_or("{}"))?;
        let before = serde_json::from_value(saved["affinity"].clone()).ok();
        daemonsets::restore(&cx.client, ns, name, before).await?;
    }
    status.changed.retain(|c| c.change != "node-affinity");
    super::streams::close(cx).await?;
    status.phase = "RolledBack".into();
    set_status(cx, &status).await?;
    Ok(())
}
