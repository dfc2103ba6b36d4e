//! `kubeshift migrate plan` and `kubeshift node report` against the lab's real
//! apiserver and real kube-proxy: one Flannel lab, one Calico lab.

mod common;

use common::{eventually, kubeshift, run_ok, Lab};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kubeshift_planner::diff::{diff_node, FindingKind};
use kubeshift_planner::discovery::{discover, DiscoverOptions};
use kubeshift_planner::node_report::NodeReport;
use kubeshift_planner::plan::load_plan;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kubeshift-planner-lab-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn node_report(lab: &Lab, node: &str, out: &Path) -> NodeReport {
    let cni = format!("/var/lib/kubeshift/lab/{}/nodes/{node}/root/etc/cni/net.d", lab.name);
    run_ok(
        kubeshift()
            .args(["node", "report", "--netns", &lab.node_netns(node), "--cni-conf-dir", &cni, "--out"])
            .arg(out),
    );
    let text = std::fs::read_to_string(out).unwrap();
    NodeReport::from_json(&text, &out.display().to_string()).unwrap()
}

/// Reports of every node, taken once kube-proxy has rules for every service the
/// API has (kube-proxy programs them asynchronously after `lab up`).
async fn clean_reports(lab: &Lab, nodes: &[&str], dir: &Path) -> Vec<PathBuf> {
    let client = lab.client().await;
    let mut files = Vec::new();
    for node in nodes {
        let file = dir.join(format!("{node}.json"));
        eventually(&format!("kube-proxy rules on {node} matching the API"), Duration::from_secs(60), || {
            let client = client.clone();
            let file = file.clone();
            async move {
                let inv = discover(&client, &DiscoverOptions::default()).await?;
                let report = node_report(lab, node, &file);
                assert_eq!(report.node_name.as_deref(), Some(*node));
                let save = report.iptables.save.as_deref().expect("iptables-save in the report");
                assert!(save.contains(":KUBE-SERVICES"), "no KUBE-SERVICES in {node}'s report");
                let model = report.rule_model().unwrap()?;
                let d = diff_node(node, &model, &inv.services);
                let missing: Vec<_> = d.findings.iter().filter(|f| f.kind == FindingKind::MissingRules).collect();
                let svcs = model.summary();
                // Demo pods may still be starting: wait for all of them to be ready endpoints.
                let ready = |ns: &str, name: &str| {
                    inv.services
                        .services
                        .iter()
                        .find(|s| s.namespace == ns && s.name == name)
                        .map_or(0, |s| s.endpoints.iter().filter(|e| e.ready).count())
                };
                let demo_ready = ready("demo-frontend", "frontend") == 2
                    && ready("demo-backend", "backend") == 3
                    && ready("demo-backend", "backend-sticky") == 3;
                Ok((demo_ready && missing.is_empty() && d.is_clean()).then_some(()).map(|_| {
                    eprintln!("{node}: {} services checked, {svcs:?}", d.services_checked);
                }))
            }
        })
        .await;
        // The KUBE-SVC chains of the demo services are there, by the part-1 parser.
        let save = std::fs::read_to_string(&file).unwrap();
        let report = NodeReport::from_json(&save, "report").unwrap();
        let text = report.iptables.save.unwrap();
        let model = kubeshift_planner::iptables::parse_iptables_save(node, &text).unwrap();
        for (ns, name, port, eps) in [
            ("demo-frontend", "frontend", "http", 2),
            ("demo-frontend", "frontend-nodeport", "http", 2),
            ("demo-backend", "backend", "http", 3),
            ("demo-backend", "backend", "udp", 3),
            ("demo-backend", "backend-sticky", "http", 3),
        ] {
            let s = model
                .services
                .iter()
                .find(|s| s.namespace == ns && s.name == name && s.port_name == port)
                .unwrap_or_else(|| panic!("{node}: no rules for {ns}/{name}:{port}"));
            assert!(s.chain_hash.is_some(), "{node}: {ns}/{name}:{port} has no KUBE-SVC chain");
            assert_eq!(s.endpoints.len(), eps, "{node}: {ns}/{name}:{port} endpoints");
            if name == "backend-sticky" {
                assert_eq!(s.affinity_seconds, Some(600));
            }
            if name == "frontend-nodeport" {
                assert_eq!(s.node_ports, vec![30080]);
            }
        }
        assert!(text.contains("KUBE-SVC-"), "{node}: no KUBE-SVC chains");
        files.push(file);
    }
    files
}

fn plan_json(lab: &Lab, extra: &[&str], reports: &[PathBuf]) -> Value {
    let mut c = kubeshift();
    c.args(["migrate", "plan", "-o", "json", "--kubeconfig"]).arg(lab.kubeconfig()).args(extra);
    if !reports.is_empty() {
        c.arg("--node-report").args(reports);
    }
    let out = run_ok(&mut c);
    serde_json::from_slice(&out.stdout).expect("migrate plan -o json prints JSON")
}

fn policy<'a>(v: &'a Value, ns: &str, name: &str) -> &'a Value {
    v["analysis"]["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["namespace"] == ns && p["name"] == name)
        .unwrap_or_else(|| panic!("policy {ns}/{name} not classified"))
}

fn demo_checks(v: &Value) {
    let inv = &v["inventory"];
    assert_eq!(inv["kubeProxy"]["mode"], "iptables");
    assert_eq!(inv["kubeProxy"]["deployedAs"], "daemonset");
    assert_eq!(inv["kubeProxy"]["configSource"], "ConfigMap kube-system/kube-proxy key config.conf");
    // The 1.20 apiserver serves slices only as v1beta1 and PDBs only as policy/v1beta1.
    assert_eq!(inv["endpointsSource"], "discovery.k8s.io/v1beta1");
    let nodes = inv["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let pools: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n["pool"].as_str().unwrap()).collect();
    assert_eq!(pools, ["pool-1", "pool-2"].into_iter().collect());
    for n in nodes {
        assert_eq!(n["poolLabel"], "node.kubernetes.io/pool");
        assert!(!n["podCidrs"].as_array().unwrap().is_empty(), "{n}: no podCIDR");
    }
    let svcs = inv["services"]["services"].as_array().unwrap();
    let backend = svcs.iter().find(|s| s["namespace"] == "demo-backend" && s["name"] == "backend").unwrap();
    assert_eq!(backend["endpoints"].as_array().unwrap().len(), 3, "backend endpoints: {backend}");
    let sticky = svcs.iter().find(|s| s["name"] == "backend-sticky").unwrap();
    assert_eq!(sticky["sessionAffinity"], "ClientIP");
    let np = svcs.iter().find(|s| s["name"] == "frontend-nodeport").unwrap();
    assert_eq!(np["ports"][0]["nodePort"], 30080);
    let pdb = inv["pdbs"].as_array().unwrap().iter().find(|p| p["name"] == "backend").expect("demo PDB");
    assert_eq!(pdb["apiVersion"], "policy/v1beta1");
    assert_eq!(pdb["minAvailable"], "2");

    for name in ["default-deny-ingress", "allow-frontend", "allow-udp-from-frontend-ns"] {
        assert_eq!(policy(v, "demo-backend", name)["class"], "carried-over", "{name}");
    }
    let egress = policy(v, "demo-frontend", "frontend-egress");
    assert_eq!(egress["class"], "needs-attention");
    let reasons = egress["reasons"].to_string();
    assert!(reasons.contains("except"), "{reasons}");
    assert!(reasons.contains("legacy pod CIDR"), "{reasons}");
    assert!(reasons.contains("API server"), "{reasons}");

    let plan = &v["plan"];
    let waves = plan["waves"].as_array().unwrap();
    assert_eq!(waves[0]["name"], "canary");
    let planned: usize =
        waves.iter().flat_map(|w| w["batches"].as_array().unwrap()).map(|b| b["nodes"].as_array().unwrap().len()).sum();
    assert_eq!(planned, 3);
    let readiness = v["analysis"]["readiness"].as_array().unwrap();
    assert!(readiness.iter().all(|r| r["ready"] == true && r["report"] == true), "{readiness:?}");
    for d in v["analysis"]["ruleDiffs"].as_array().unwrap() {
        assert!(d["findings"].as_array().unwrap().is_empty(), "rules vs API on {}: {}", d["node"], d["findings"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_lab_plan_node_reports_and_bad_input() {
    let lab = Lab::up("plnf", &["--nodes", "3", "--pools", "2", "--cni", "flannel"]);
    let dir = tmpdir("flannel");
    let reports = clean_reports(&lab, &["node-1", "node-2", "node-3"], &dir).await;

    let v = plan_json(&lab, &[], &reports);
    let cni = &v["inventory"]["cni"];
    assert_eq!(cni["kind"], "flannel");
    assert_eq!(cni["workload"], "kube-flannel/kube-flannel-ds");
    assert_eq!(cni["flannel"]["network"], "10.244.0.0/16");
    assert_eq!(cni["flannel"]["backendType"], "vxlan");
    assert_eq!(v["inventory"]["kubeProxy"]["clusterCidr"], "10.244.0.0/16");
    demo_checks(&v);
    // Flannel does not enforce the demo's four policies; the migration will.
    let unenforced = v["analysis"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["subject"] == "networkpolicy")
        .expect("finding: policies not enforced under Flannel");
    assert!(unenforced["message"].as_str().unwrap().contains("4 NetworkPolicies"), "{unenforced}");
    let fp = v["plan"]["cluster"]["fingerprint"].as_str().unwrap().to_string();

    // The plan file loads back, for this cluster, and its graph exports.
    let plan_file = dir.join("plan.yaml");
    let out = run_ok(
        kubeshift()
            .args(["migrate", "plan", "--kubeconfig"])
            .arg(lab.kubeconfig())
            .args(["--graph", "dot", "--max-unavailable", "2", "--out"])
            .arg(&plan_file),
    );
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph"), "{dot}");
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("legacy CNI  flannel"), "{summary}");
    assert!(summary.contains("needs-attention demo-frontend/frontend-egress"), "{summary}");
    let plan = load_plan(&plan_file, Some(&fp)).expect("plan loads back");
    plan.graph().expect("plan graph");
    assert_eq!(plan.cluster.legacy_cni.as_deref(), Some("flannel"));
    assert_eq!(plan.target.max_unavailable, 2);
    run_ok(kubeshift().args(["migrate", "check", "--kubeconfig"]).arg(lab.kubeconfig()).arg("--plan").arg(&plan_file));

    // A plan made for another cluster is refused, naming the file and both fingerprints.
    let other = dir.join("other-cluster.yaml");
    let text =
        std::fs::read_to_string(&plan_file).unwrap().replace(&fp, "sha1:00000000000000000000000000000000deadbeef");
    std::fs::write(&other, text).unwrap();
    let out = kubeshift()
        .args(["migrate", "check", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .arg("--plan")
        .arg(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("other-cluster.yaml") && err.contains("deadbeef") && err.contains(&fp), "{err}");

    // A net-conf.json that is not JSON: the error names the ConfigMap, key, line
    // and column; no plan is written; the cluster is left as it was.
    let client = lab.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-flannel");
    let bad = "{\n  \"Network\": \"10.244.0.0/16\",\n  \"Backend\": {\"Type\": vxlan}\n}\n";
    cms.patch(
        "kube-flannel-cfg",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"net-conf.json": bad}})),
    )
    .await
    .unwrap();
    let before = cms.get("kube-flannel-cfg").await.unwrap().metadata.resource_version;
    let bad_out = dir.join("bad-plan.yaml");
    let out = kubeshift()
        .args(["migrate", "plan", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .arg("--out")
        .arg(&bad_out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json:3:"), "{err}");
    assert!(!bad_out.exists());
    assert_eq!(cms.get("kube-flannel-cfg").await.unwrap().metadata.resource_version, before);

    let _ = std::fs::remove_dir_all(&dir);
    drop(lab);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calico_lab_plan_and_calico_deny_policy_blocks() {
    let lab = Lab::up("plnc", &["--nodes", "3", "--pools", "2", "--cni", "calico"]);
    let dir = tmpdir("calico");
    let reports = clean_reports(&lab, &["node-1", "node-2", "node-3"], &dir).await;

    let v = plan_json(&lab, &[], &reports);
    let cni = &v["inventory"]["cni"];
    assert_eq!(cni["kind"], "calico");
    assert_eq!(cni["workload"], "DaemonSet kube-system/calico-node");
    let calico = &cni["calico"];
    assert_eq!(calico["backend"], "vxlan");
    let pool = &calico["ipPools"][0];
    assert_eq!(pool["name"], "default-ipv4-ippool");
    assert_eq!(pool["vxlanMode"], "Always");
    assert_eq!(pool["ipipMode"], "Never");
    assert_eq!(pool["natOutgoing"], true);
    assert_eq!(calico["felix"]["vxlanEnabled"], true);
    assert_eq!(calico["bgp"]["asNumber"], 64512);
    assert!(v["inventory"]["pdbs"].as_array().unwrap().iter().any(|p| p["name"] == "calico-kube-controllers"));
    // Calico enforces the policies today: nothing changes for them at migration.
    assert!(!v["analysis"]["findings"].as_array().unwrap().iter().any(|f| f["subject"] == "networkpolicy"));
    demo_checks(&v);

    // The pool label override: every node carries kubernetes.io/os, so one pool.
    let o = plan_json(&lab, &["--pool-label", "kubernetes.io/os"], &[]);
    let pools: std::collections::BTreeSet<&str> =
        o["inventory"]["nodes"].as_array().unwrap().iter().map(|n| n["pool"].as_str().unwrap()).collect();
    assert_eq!(pools.len(), 1, "{pools:?}");

    // A Calico GlobalNetworkPolicy with an ordered Deny is a blocker: non-zero exit
    // unless --allow-blockers.
    let client = lab.client().await;
    let ar = ApiResource {
        group: "crd.projectcalico.org".into(),
        version: "v1".into(),
        api_version: "crd.projectcalico.org/v1".into(),
        kind: "GlobalNetworkPolicy".into(),
        plural: "globalnetworkpolicies".into(),
    };
    let gnp: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let obj: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "deny-metadata"},
        "spec": {"order": 10, "selector": "all()", "types": ["Egress"],
                 "egress": [{"action": "Deny", "destination": {"nets": ["169.254.169.254/32"]}}, {"action": "Allow"}]}
    }))
    .unwrap();
    gnp.create(&PostParams::default(), &obj).await.unwrap();
    let plan_file = dir.join("plan.yaml");
    let out = kubeshift()
        .args(["migrate", "plan", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .arg("--out")
        .arg(&plan_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(err.contains("1 blocker(s)") && err.contains("--allow-blockers"), "{err}");
    let first = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("BLOCKER") || l.trim_start().starts_with("ATTENTION"))
        .unwrap();
    assert!(first.contains("BLOCKER") && first.contains("deny-metadata"), "{stdout}");
    let flat = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("Deny rules at order 10"), "{stdout}");
    assert!(
        stdout.lines().all(|l| l.chars().count() <= 100 || !l.starts_with("  ")),
        "summary lines wider than 100 columns:\n{stdout}"
    );
    assert!(!plan_file.exists());
    let out = run_ok(
        kubeshift()
            .args(["migrate", "plan", "--allow-blockers", "-o", "yaml", "--kubeconfig"])
            .arg(lab.kubeconfig())
            .arg("--out")
            .arg(&plan_file),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("kind: Plan"));
    let plan = load_plan(&plan_file, None).unwrap();
    assert_eq!(plan.cluster.legacy_cni.as_deref(), Some("calico"));

    let _ = std::fs::remove_dir_all(&dir);
    drop(lab);
}

#[test]
fn unreachable_apiserver_is_named() {
    let dir = tmpdir("unreachable");
    let kc = dir.join("kubeconfig");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(
        &kc,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: x\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
    )
    .unwrap();
    let out_file = dir.join("plan.yaml");
    let out =
        kubeshift().args(["migrate", "plan", "--kubeconfig"]).arg(&kc).arg("--out").arg(&out_file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("https://127.0.0.1:1") && err.contains("not reachable"), "{err}");
    assert!(!out_file.exists());

    // A node report that is not JSON is named with file:line:col before the cluster is asked.
    let bad = dir.join("node-9.json");
    std::fs::write(&bad, "{\"report_version\": 1,\n oops}").unwrap();
    let out =
        kubeshift().args(["migrate", "plan", "--kubeconfig"]).arg(&kc).arg("--node-report").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("node-9.json:2:"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
