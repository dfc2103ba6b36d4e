//! `kubeshift sysdump` against a lab in the middle of a migration: kubeshift's CRDs with
//! a NodeMigration part-way through and the cluster migration carrying the plan, the
//! legacy DaemonSets (kube-proxy, Flannel) with their pods, and a Secret that must not
//! end up in the archive in any form.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, ObjectReference, Pod, Secret};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kubeshift_node_migrator::crd::{
    self, ClusterMigration, ClusterMigrationSpec, ClusterMigrationStatus, NodeMigration, NodeMigrationSpec,
    NodeMigrationStatus,
};
use kubeshift_planner::plan::StepAction;
use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

/// The Secret's value: recognisable, and in no other object of the cluster.
const SECRET_VALUE: &str = "ks-sysdump-canary-5e1f0c9a";

async fn install_crds(client: &kube::Client) {
    crd::install(client, Duration::from_secs(30)).await.expect("kubeshift's CRDs installed and established");
}

/// A migration stopped in the middle: the cluster prepared, node-1 cordoned and
/// draining, and an Event about it as the node-migrator writes them.
async fn mid_migration(client: &kube::Client, node: &str) {
    install_crds(client).await;
    let pp = PatchParams::apply(crd::MANAGER).force();

    let clusters: Api<ClusterMigration> = Api::all(client.clone());
    let spec = ClusterMigrationSpec {
        plan: "migration".into(),
        fingerprint: "sha1:0".into(),
        legacy_cni: "flannel".into(),
        kube_proxy_mode: "iptables".into(),
        plan_yaml: "apiVersion: kubeshift.io/v1alpha1\nkind: MigrationPlan\nmetadata:\n  name: migration\n".into(),
    };
    clusters.create(&PostParams::default(), &ClusterMigration::new("migration", spec)).await.expect("ClusterMigration");
    let status = ClusterMigrationStatus { phase: "Migrating".into(), ..Default::default() };
    clusters
        .patch_status(
            "migration",
            &pp,
            &Patch::Apply(
                &serde_json::json!({"apiVersion": "kubeshift.io/v1alpha1", "kind": "ClusterMigration", "status": status}),
            ),
        )
        .await
        .expect("ClusterMigration status");

    let nms: Api<NodeMigration> = Api::all(client.clone());
    let spec = NodeMigrationSpec {
        node: node.into(),
        wave: "canary".into(),
        plan: "migration".into(),
        fingerprint: "sha1:0".into(),
        steps: vec![StepAction::Cordon, StepAction::Drain],
        wanted: Some(StepAction::Drain),
        ..Default::default()
    };
    nms.create(&PostParams::default(), &NodeMigration::new(node, spec)).await.expect("NodeMigration");
    let status = NodeMigrationStatus {
        phase: "drain".into(),
        reached: Some(StepAction::Cordon),
        blocked: Some("PodDisruptionBudget shop/web allows no disruption".into()),
        ..Default::default()
    };
    nms.patch_status(
        node,
        &pp,
        &Patch::Apply(
            &serde_json::json!({"apiVersion": "kubeshift.io/v1alpha1", "kind": "NodeMigration", "status": status}),
        ),
    )
    .await
    .expect("NodeMigration status");

    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let event = Event {
        metadata: ObjectMeta { name: Some("ks-sysdump-drain-blocked".into()), ..Default::default() },
        involved_object: ObjectReference {
            api_version: Some("kubeshift.io/v1alpha1".into()),
            kind: Some("NodeMigration".into()),
            name: Some(node.into()),
            ..Default::default()
        },
        reason: Some("DrainBlocked".into()),
        message: Some("PodDisruptionBudget shop/web allows no disruption".into()),
        type_: Some("Warning".into()),
        ..Default::default()
    };
    events.create(&PostParams::default(), &event).await.expect("Event");
}

async fn secret(client: &kube::Client) {
    let ns: Api<Namespace> = Api::all(client.clone());
    let meta = ObjectMeta { name: Some("shop".into()), ..Default::default() };
    ns.create(&PostParams::default(), &Namespace { metadata: meta, ..Default::default() }).await.expect("namespace");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "shop");
    let s = Secret {
        metadata: ObjectMeta { name: Some("db-password".into()), ..Default::default() },
        string_data: Some(BTreeMap::from([("password".to_string(), SECRET_VALUE.to_string())])),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &s).await.expect("Secret");
}

/// The archive's files, by their path under the top directory.
fn unpack(path: &std::path::Path) -> BTreeMap<String, String> {
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(path).expect("the archive exists"));
    let mut tar = tar::Archive::new(gz);
    let mut files = BTreeMap::new();
    for entry in tar.entries().expect("a tar archive") {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let (top, rest) = name.split_once('/').unwrap_or_else(|| panic!("{name}: not under one top directory"));
        assert_eq!(top, "dump", "{name}: the top directory is named like the archive");
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        files.insert(rest.to_string(), text);
    }
    files
}

fn yaml_list(files: &BTreeMap<String, String>, path: &str) -> Vec<serde_yaml::Value> {
    let text = files.get(path).unwrap_or_else(|| panic!("no {path} in the dump: {:?}", files.keys()));
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{path}: not a YAML list: {e}"))
}

fn names(items: &[serde_yaml::Value]) -> Vec<String> {
    items.iter().filter_map(|v| v["metadata"]["name"].as_str().map(String::from)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysdump_of_a_lab_mid_migration_has_every_part_and_no_secret() {
    let lab = Lab::up("tsd", &["--nodes", "2"]);
    let client = lab.client().await;
    let nodes: Vec<String> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    mid_migration(&client, &nodes[0]).await;
    secret(&client).await;
    // The legacy DaemonSets' pods, one per node each, as the dump should show them.
    let legacy = eventually("kube-proxy and flannel pods on both nodes", Duration::from_secs(120), || async {
        let pods = Api::<Pod>::all(client.clone()).list(&ListParams::default()).await?.items;
        let of = |prefix: &str| {
            pods.iter().filter(|p| p.metadata.name.as_deref().is_some_and(|n| n.starts_with(prefix))).count()
        };
        Ok((of("kube-proxy-") == 2 && of("kube-flannel-ds-") == 2).then_some(pods))
    })
    .await;

    let dir = std::env::temp_dir().join(format!("ks-sysdump-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("dump.tar.gz");
    let run = run_ok(kubeshift().args(["sysdump", "--kubeconfig"]).arg(lab.kubeconfig()).arg("--out").arg(&out));
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let files = unpack(&out);
    let _ = std::fs::remove_dir_all(&dir);
    let failures = files.get("failures.txt").expect("failures.txt, even when nothing failed").clone();
    eprintln!("sysdump: {stderr}\nfiles: {:?}\nfailures:\n{failures}", files.keys());

    // kubeshift's objects: the NodeMigration with its status, the cluster migration with the plan.
    let nms = yaml_list(&files, "kubeshift/nodemigrations.yaml");
    assert_eq!(names(&nms), [nodes[0].clone()]);
    assert_eq!(nms[0]["status"]["phase"].as_str(), Some("drain"));
    assert!(nms[0]["status"]["blocked"].as_str().unwrap().contains("PodDisruptionBudget"), "{:?}", nms[0]);
    let cms = yaml_list(&files, "kubeshift/clustermigrations.yaml");
    assert_eq!(names(&cms), ["migration"]);
    assert_eq!(cms[0]["status"]["phase"].as_str(), Some("Migrating"));
    assert!(cms[0]["spec"]["planYaml"].as_str().unwrap().contains("kind: MigrationPlan"), "the plan in the cluster");

    // The legacy datapath: DaemonSets, their pods, their configuration.
    let ds = names(&yaml_list(&files, "workloads/daemonsets.yaml"));
    for want in ["kube-proxy", "kube-flannel-ds"] {
        assert!(ds.iter().any(|d| d == want), "no {want} DaemonSet in {ds:?}");
    }
    let pods = yaml_list(&files, "workloads/pods.yaml");
    let pod_names = names(&pods);
    for p in legacy.iter().filter_map(|p| p.metadata.name.as_deref()) {
        if p.starts_with("kube-proxy-") || p.starts_with("kube-flannel-ds-") {
            assert!(pod_names.iter().any(|n| n == p), "pod {p} missing from {pod_names:?}");
        }
    }
    assert!(
        pod_names.iter().all(|n| n.starts_with("kube-proxy-") || n.starts_with("kube-flannel-ds-")),
        "{pod_names:?}"
    );
    let cms = names(&yaml_list(&files, "config/configmaps.yaml"));
    for want in ["kube-proxy", "kube-flannel-cfg"] {
        assert!(cms.iter().any(|c| c == want), "no {want} ConfigMap in {cms:?}");
    }

    // The cluster: nodes, version, Events (ours among them).
    assert_eq!(names(&yaml_list(&files, "cluster/nodes.yaml")).len(), 2);
    assert!(files.get("cluster/version.json").is_some_and(|v| v.contains("gitVersion")));
    let events = yaml_list(&files, "cluster/events.yaml");
    assert!(
        events.iter().any(|e| e["reason"].as_str() == Some("DrainBlocked")),
        "the migration's Event is in cluster/events.yaml"
    );

    // Each container's log is either in the dump or listed as failed, by the same path.
    for pod in &pods {
        let ns = pod["metadata"]["namespace"].as_str().unwrap();
        let name = pod["metadata"]["name"].as_str().unwrap();
        for c in pod["spec"]["containers"].as_sequence().unwrap() {
            let path = format!("logs/{ns}/{name}/{}.log", c["name"].as_str().unwrap());
            assert!(
                files.contains_key(&path) || failures.lines().any(|l| l.starts_with(&format!("{path}: "))),
                "{path}: neither in the dump nor in failures.txt"
            );
        }
    }
    // Only parts fail, never the whole dump: every failure names a part and why.
    for line in failures.lines() {
        let (part, why) = line.split_once(": ").unwrap_or_else(|| panic!("failures.txt line {line:?}"));
        assert!(!part.is_empty() && !why.trim().is_empty(), "{line:?}");
        assert!(!why.contains("Status {"), "a reason, not a Debug dump: {line:?}");
    }
    let index = files.get("index.txt").expect("index.txt");
    for path in files.keys().filter(|p| *p != "index.txt" && *p != "failures.txt") {
        assert!(index.lines().any(|l| l.starts_with(&format!("{path}\t"))), "{path} not in index.txt");
    }

    // No Secret, in any form, anywhere.
    let encoded = k8s_openapi::ByteString(SECRET_VALUE.as_bytes().to_vec());
    let b64 = serde_json::to_value(&encoded).unwrap().as_str().unwrap().to_string();
    for (path, text) in &files {
        assert!(!text.contains(SECRET_VALUE), "{path} holds the Secret's value");
        assert!(!text.contains(&b64), "{path} holds the Secret's value, base64");
        assert!(!text.contains("kind: Secret") && !text.contains("\"kind\": \"Secret\""), "{path} holds a Secret");
    }
}
