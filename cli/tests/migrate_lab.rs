//! The node-migrator's cluster-facing parts against the lab's real apiserver and
//! controllers: its CRDs and how `kubectl` shows them, the apply Lease, cordon, and a
//! drain through the real eviction API with a real PodDisruptionBudget.

mod common;

use common::*;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kubeshift_node_migrator::crd::{self, NodeMigration, NodeMigrationSpec, NodeMigrationStatus};
use kubeshift_node_migrator::daemonsets::{self, NO_KUBE_PROXY};
use kubeshift_node_migrator::drain::{self, DrainError};
use kubeshift_node_migrator::lease::{LeaseError, Lock};
use kubeshift_planner::plan::StepAction;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn kubectl(lab: &Lab, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn install_crds(client: &kube::Client) {
    crd::install(client, Duration::from_secs(30)).await.expect("kubeshift's CRDs installed and established");
}

async fn state_in_the_cluster(lab: &Lab, client: &kube::Client) {
    install_crds(client).await;
    let nms: Api<NodeMigration> = Api::all(client.clone());
    let spec = NodeMigrationSpec {
        node: "node-1".into(),
        wave: "canary".into(),
        plan: "migration".into(),
        fingerprint: "sha1:0".into(),
        steps: vec![StepAction::Cordon, StepAction::Drain],
        wanted: Some(StepAction::Drain),
        ..Default::default()
    };
    let nm = NodeMigration::new("node-1", spec);
    nms.create(&PostParams::default(), &nm).await.expect("create NodeMigration");
    let status = NodeMigrationStatus { phase: "drain".into(), reached: Some(StepAction::Cordon), ..Default::default() };
    nms.patch_status(
        "node-1",
        &PatchParams::apply(crd::MANAGER).force(),
        &Patch::Apply(
            &serde_json::json!({"apiVersion": "kubeshift.io/v1alpha1", "kind": "NodeMigration", "status": status}),
        ),
    )
    .await
    .expect("status through the status subresource");
    let back = nms.get("node-1").await.unwrap();
    assert_eq!(back.status.unwrap().reached, Some(StepAction::Cordon));
    let table = kubectl(lab, &["get", "nodemigrations"], "");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "NODE", "WAVE", "PHASE", "READY", "AGE"], "{table}");
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["node-1", "node-1", "canary", "drain", "false"], "{table}");
}

async fn one_apply_at_a_time(client: &kube::Client) {
    let first = Lock::acquire(client, "first pid 1", Duration::from_secs(3)).await.expect("first takes the lease");
    match Lock::acquire(client, "second pid 2", Duration::from_secs(3)).await {
        Err(LeaseError::Held { holder, .. }) => assert_eq!(holder, "first pid 1"),
        other => panic!("a second holder must be refused while the first is live, got {:?}", other.err()),
    }
    // The first holder stops renewing (as after kill -9): once it expires, it is taken over.
    let second = eventually("the expired lease to be taken over", Duration::from_secs(20), || async {
        match Lock::acquire(client, "second pid 2", Duration::from_secs(3)).await {
            Ok(l) => Ok(Some(l)),
            Err(LeaseError::Held { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await;
    let mut first = first;
    assert!(matches!(first.renew().await, Err(LeaseError::Lost { holder }) if holder == "second pid 2"));
    second.release().await.unwrap();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), "kube-system");
    assert!(leases.get_opt("kubeshift-migrate").await.unwrap().is_none(), "release deletes the lease");
}

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: drain}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: drain}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node-1}
      terminationGracePeriodSeconds: 1
      containers: [{name: c, image: "registry.k8s.io/pause:3.9"}]
---
apiVersion: policy/v1beta1
kind: PodDisruptionBudget
metadata: {name: web, namespace: drain}
spec:
  minAvailable: 2
  selector: {matchLabels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: lonely, namespace: drain}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: "registry.k8s.io/pause:3.9"}]
"#;

async fn running_web_pods(client: &kube::Client) -> anyhow::Result<Option<Vec<Pod>>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "drain");
    let list = pods.list(&ListParams::default().labels("app=web")).await?;
    let running: Vec<Pod> = list
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect();
    Ok((running.len() == 2).then_some(running))
}

async fn cordon_and_drain(lab: &Lab, client: &kube::Client) {
    kubectl(lab, &["apply", "-f", "-"], WORKLOAD);
    eventually("2 web pods running on node-1", Duration::from_secs(90), || running_web_pods(client)).await;
    // The PDB's status must have counted the pods, or the eviction API refuses for that reason.
    eventually("the PDB to count 2 healthy pods", Duration::from_secs(60), || async {
        let out = kubectl(lab, &["get", "pdb", "-n", "drain", "web", "-o", "jsonpath={.status.currentHealthy}"], "");
        Ok((out.trim() == "2").then_some(()))
    })
    .await;

    assert!(drain::cordon(client, "node-1", true).await.unwrap(), "cordon changes a schedulable node");
    assert!(!drain::cordon(client, "node-1", true).await.unwrap(), "cordon again changes nothing");

    match drain::drain(client, "node-1", Duration::from_secs(10), false).await {
        Err(DrainError::Unmanaged { pods, .. }) => assert_eq!(pods, ["drain/lonely"]),
        other => panic!("a pod without a controller must stop the drain, got {other:?}"),
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "drain");
    pods.delete("lonely", &DeleteParams::default()).await.unwrap();

    match drain::drain(client, "node-1", Duration::from_secs(6), false).await {
        Err(e @ DrainError::Timeout { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("PodDisruptionBudget") && msg.contains("drain/web-"), "{msg}");
        }
        other => panic!("a PDB allowing no disruption must block the drain, got {other:?}"),
    }
    kubectl(lab, &["delete", "pdb", "-n", "drain", "web"], "");
    let report = drain::drain(client, "node-1", Duration::from_secs(60), false).await.expect("drain");
    assert_eq!(report.evicted.len(), 2, "{report:?}");
    assert!(report.evicted.iter().all(|p| p.starts_with("drain/web-")), "{report:?}");
    assert!(report.kept.iter().any(|p| p.starts_with("kube-system/kube-proxy-")), "DaemonSet pods stay: {report:?}");
    let left: Vec<String> = drain::pods_on(client, "node-1")
        .await
        .unwrap()
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some("drain"))
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(left.is_empty(), "evicted pods are gone from the node: {left:?}");

    assert!(drain::cordon(client, "node-1", false).await.unwrap(), "uncordon");
    eventually("the web pods back on node-1", Duration::from_secs(90), || running_web_pods(client)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_state_lease_cordon_and_drain_on_the_lab() {
    let lab = Lab::up("tmig", &["--nodes", "2", "--no-demo"]);
    let client = lab.client().await;
    let t0 = std::time::Instant::now();
    state_in_the_cluster(&lab, &client).await;
    eprintln!("state in the cluster checked after {:?}", t0.elapsed());
    one_apply_at_a_time(&client).await;
    eprintln!("lease checked after {:?}", t0.elapsed());
    cordon_and_drain(&lab, &client).await;
    eprintln!("drain checked after {:?}", t0.elapsed());
}

/// kube-proxy's chain declarations (and only kube-proxy's: kubelet's KUBE-FIREWALL,
/// KUBE-MARK-DROP and friends are not in this list) on both iptables backends.
fn kube_proxy_chains(lab: &Lab, node: &str) -> Vec<String> {
    let mut out = vec![];
    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let o = Command::new("ip").args(["netns", "exec", &lab.node_netns(node), save]).output().unwrap();
        assert!(o.status.success(), "{save} in {node}");
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| {
                    ["KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-NODEPORTS", "KUBE-FORWARD", "KUBE-PROXY-CANARY"]
                        .iter()
                        .any(|c| l.starts_with(&format!(":{c}")))
                })
                .map(|l| format!("{save}: {}", l.split_whitespace().next().unwrap_or("")))
                .collect::<Vec<_>>(),
        );
    }
    out
}

/// Lines of other owners' chains (Flannel's), which cleanup must leave as they are.
fn flannel_lines(lab: &Lab, node: &str) -> Vec<String> {
    lab.iptables_save(node)
        .lines()
        .filter(|l| l.contains("FLANNEL"))
        .map(|l| l.split(" [").next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxy_leaves_one_node_its_rules_are_cleaned_and_it_comes_back() {
    let lab = Lab::up("tkpx", &["--nodes", "2", "--no-demo"]);
    let client = lab.client().await;
    let wait = Duration::from_secs(120);
    eventually("kube-proxy's chains on both nodes", wait, || async {
        Ok((!kube_proxy_chains(&lab, "node-1").is_empty() && !kube_proxy_chains(&lab, "node-2").is_empty())
            .then_some(()))
    })
    .await;
    let flannel_before = flannel_lines(&lab, "node-1");
    assert!(!flannel_before.is_empty(), "the lab's flanneld writes FLANNEL chains");

    // Prepare: the exclusion, once. The template change rolls kube-proxy everywhere.
    let before = daemonsets::exclude(&client, "kube-system", "kube-proxy", NO_KUBE_PROXY).await.unwrap();
    let before = before.expect("the lab's kube-proxy DaemonSet has no exclusion yet");
    assert!(daemonsets::exclude(&client, "kube-system", "kube-proxy", NO_KUBE_PROXY).await.unwrap().is_none());
    for node in ["node-1", "node-2"] {
        daemonsets::wait_ready_on(&client, "kube-system", "kube-proxy", node, wait).await.unwrap();
    }

    // Forward: kube-proxy leaves node-1, then its rules go.
    assert!(daemonsets::label_node(&client, "node-1", NO_KUBE_PROXY, true).await.unwrap());
    daemonsets::wait_gone_from(&client, "kube-system", "kube-proxy", "node-1", wait).await.unwrap();
    assert!(!kube_proxy_chains(&lab, "node-1").is_empty(), "deleting kube-proxy leaves its rules (kubernetes#119265)");
    let clean = |full: bool| {
        let mut c = kubeshift();
        c.args(["node", "cleanup-kube-proxy", "--netns", &lab.node_netns("node-1"), "--kubelet-version", "v1.20.2"]);
        if full {
            c.arg("--full");
        }
        let out = run_ok(&mut c);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let report = clean(true);
    let removed: usize = report["iptables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["tables"].as_array().unwrap())
        .map(|t| t["chains_removed"].as_array().map(|a| a.len()).unwrap_or(0))
        .sum();
    assert!(removed >= 5, "the report lists the removed chains: {report}");
    assert_eq!(kube_proxy_chains(&lab, "node-1"), Vec::<String>::new(), "no kube-proxy chain left on node-1");
    assert_eq!(flannel_lines(&lab, "node-1"), flannel_before, "Flannel's rules are untouched");
    assert!(!kube_proxy_chains(&lab, "node-2").is_empty(), "node-2 keeps kube-proxy and its rules");
    let again = clean(false);
    let again_removed: u64 =
        again["iptables"].as_array().unwrap().iter().map(|t| t["chains_removed"].as_u64().unwrap_or(0)).sum();
    assert_eq!(again_removed, 0, "a second run removes nothing: {again}");

    // Inverse: the label goes, kube-proxy returns and writes its rules again; then the
    // DaemonSet's affinity is put back exactly as it was.
    assert!(daemonsets::label_node(&client, "node-1", NO_KUBE_PROXY, false).await.unwrap());
    daemonsets::wait_ready_on(&client, "kube-system", "kube-proxy", "node-1", wait).await.unwrap();
    eventually("kube-proxy's chains back on node-1", wait, || async {
        Ok((!kube_proxy_chains(&lab, "node-1").is_empty()).then_some(()))
    })
    .await;
    daemonsets::restore(&client, "kube-system", "kube-proxy", before.clone()).await.unwrap();
    let ds = Api::<DaemonSet>::namespaced(client.clone(), "kube-system").get("kube-proxy").await.unwrap();
    assert_eq!(ds.spec.unwrap().template.spec.unwrap().affinity, before, "affinity restored as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_node_is_migrated_last() {
    let lab = Lab::up("tcpl", &["--nodes", "3", "--pools", "2", "--control-plane-nodes", "1", "--no-demo"]);
    let out = run_ok(
        kubeshift().args(["migrate", "plan", "-o", "yaml", "--allow-blockers", "--kubeconfig"]).arg(lab.kubeconfig()),
    );
    let plan: serde_json::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let waves = plan["waves"].as_array().unwrap();
    let nodes_of = |w: &serde_json::Value| -> Vec<String> {
        w["batches"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|b| b["nodes"].as_array().unwrap())
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(nodes_of(waves.last().unwrap()), ["node-1"], "the control-plane node is the last wave: {waves:?}");
    for w in &waves[..waves.len() - 1] {
        assert!(!nodes_of(w).contains(&"node-1".to_string()), "node-1 only in the last wave");
    }
}
