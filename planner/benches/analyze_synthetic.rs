//! `cargo bench -p kubeshift-planner --bench analyze_synthetic`
//!
//! The planning benchmark with every input discovery produces: a
//! synthetic 5,000-node / 150,000-pod / 10,000-service / 5,000-policy
//! inventory, through `plan_input` + `build_plan` + `analyze` (policy
//! classification, readiness, PDB limits) + the plan's YAML.

use kubeshift_planner::api::{ApiEndpoint, ApiEndpointPort, ApiService, ApiServicePort};
use kubeshift_planner::inventory::*;
use std::collections::BTreeMap;
use std::time::Instant;

fn synthetic(nodes: usize, pods: usize, services: usize, policies: usize) -> Inventory {
    let mut inv = Inventory { kube_system_uid: "uid".into(), ..Default::default() };
    inv.cni.kind = Some("flannel".into());
    inv.cni.flannel = Some(FlannelConfig {
        network: Some("10.244.0.0/16".into()),
        backend_type: Some("vxlan".into()),
        ..Default::default()
    });
    inv.kube_proxy.mode = Some("iptables".into());
    inv.apiserver_addresses = vec!["10.96.0.1".into(), "192.168.0.10:6443".into()];
    for i in 0..nodes {
        inv.nodes.push(NodeInfo {
            name: format!("node-{i:05}"),
            pool: if i < 3 { "control-plane".into() } else { format!("pool-{:02}", (i - 3) / 200) },
            control_plane: i < 3,
            kernel_version: "6.1.0-18-amd64".into(),
            pod_cidrs: vec![format!("10.244.{}.0/24", i % 256)],
            ..Default::default()
        });
    }
    let namespaces = 500;
    for i in 0..pods {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), format!("app-{}", i % 2_000));
        inv.pods.push(PodInfo {
            namespace: format!("ns-{}", i % namespaces),
            name: format!("pod-{i}"),
            node: Some(format!("node-{:05}", 3 + i % (nodes - 3))),
            labels,
            host_network: i % 1_000 == 0,
            evictable: true,
            ip: Some(format!("10.244.{}.{}", (i / 250) % 256, i % 250 + 2)),
            ..Default::default()
        });
    }
    for i in 0..services {
        inv.services.services.push(ApiService {
            namespace: format!("ns-{}", i % namespaces),
            name: format!("svc-{i}"),
            cluster_ip: Some(format!("10.{}.{}.{}", 96 + i / 65_536, (i / 256) % 256, i % 256)),
            ports: vec![ApiServicePort { name: "http".into(), port: 80, protocol: "TCP".into(), node_port: None }],
            endpoints: (0..3)
                .map(|e| ApiEndpoint {
                    ip: format!("10.244.{}.{}", e, i % 250 + 2),
                    node_name: None,
                    ready: true,
                    ports: vec![ApiEndpointPort { name: "http".into(), port: 8080, protocol: "TCP".into() }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    for i in 0..policies {
        let spec = match i % 4 {
            0 => {
                serde_json::json!({"podSelector": {"matchLabels": {"app": format!("app-{}", i % 2_000)}}, "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 8080}]}]})
            }
            1 => serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
            2 => {
                serde_json::json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}]}]})
            }
            _ => {
                serde_json::json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app-1", "app-2"]}]}, "policyTypes": ["Ingress"]})
            }
        };
        inv.network_policies.push(PolicyInfo {
            namespace: format!("ns-{}", i % namespaces),
            name: format!("np-{i}"),
            spec: serde_json::from_value(spec).unwrap(),
        });
    }
    for i in 0..namespaces {
        let mut sel = BTreeMap::new();
        sel.insert("app".to_string(), format!("app-{i}"));
        inv.pdbs.push(PdbInfo {
            namespace: format!("ns-{i}"),
            name: format!("pdb-{i}"),
            selector: sel,
            min_available: Some("50%".into()),
            ..Default::default()
        });
    }
    inv
}

fn main() {
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let inv = synthetic(5_000, 150_000, 10_000, 5_000);
    let mut times = Vec::new();
    for run in 0..runs {
        let t = Instant::now();
        let input = kubeshift_planner::analysis::plan_input(&inv, "synthetic", 10);
        let plan = kubeshift_planner::planning::build_plan(&input).expect("plans");
        let analysis = kubeshift_planner::analysis::analyze(&inv, &[], Some(&plan.target.pod_cidr));
        let yaml = plan.to_yaml();
        let el = t.elapsed().as_secs_f64();
        println!(
            "run {run}: {el:.3} s ({} waves, {} findings, {} policies classified, {} bytes of YAML)",
            plan.waves.len(),
            analysis.findings.len(),
            analysis.policies.len(),
            yaml.len()
        );
        times.push(el);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    println!(
        "median {:.3} s over {runs} runs; peak RSS {:.1} MiB",
        times[times.len() / 2],
        ru.ru_maxrss as f64 / 1024.0
    );
}
