//! Planning: wave order, batch sizes, target settings, and that the result is
//! a valid plan file.

use kubeshift_planner::plan::{parse_plan, StepAction};
use kubeshift_planner::planning::{build_plan, synthetic_input, PlanInput, PlanNodeInput, PlanningError};

fn node(name: &str, pool: &str, pods: usize) -> PlanNodeInput {
    PlanNodeInput { name: name.into(), pool: pool.into(), control_plane: pool == "control-plane", evictable_pods: pods }
}

fn input() -> PlanInput {
    PlanInput {
        name: "test".into(),
        fingerprint: "sha1:abc".into(),
        nodes: vec![
            node("big-1", "big", 50),
            node("big-2", "big", 40),
            node("small-1", "small", 5),
            node("small-2", "small", 3),
            node("small-3", "small", 9),
            node("cp-1", "control-plane", 0),
            node("cp-2", "control-plane", 0),
        ],
        used_cidrs: vec!["10.244.0.0/16".into(), "10.200.0.0/16".into()],
        service_cidr: Some("10.96.0.0/12".into()),
        max_unavailable: 2,
        pool_disruption_limit: [("big".to_string(), 1)].into_iter().collect(),
        ..Default::default()
    }
}

fn wave_nodes(p: &kubeshift_planner::plan::Plan, w: usize) -> Vec<Vec<String>> {
    p.waves[w].batches.iter().map(|b| b.nodes.iter().map(|n| n.name.clone()).collect()).collect()
}

#[test]
fn canary_then_pools_by_risk_then_control_plane() {
    let p = build_plan(&input()).unwrap();
    let names: Vec<&str> = p.waves.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, vec!["canary", "pool-small", "pool-big", "control-plane"]);
    assert_eq!(wave_nodes(&p, 0), vec![vec!["small-2"]], "quietest node of the least risky pool");
    assert_eq!(wave_nodes(&p, 1), vec![vec!["small-1", "small-3"]], "max-unavailable 2");
    assert_eq!(wave_nodes(&p, 2), vec![vec!["big-2"], vec!["big-1"]], "PDB limit 1 on pool big");
    assert_eq!(wave_nodes(&p, 3), vec![vec!["cp-1"], vec!["cp-2"]], "control plane one at a time");
    assert_eq!(p.estimates.nodes, 7);
    assert_eq!(p.estimates.max_parallel_nodes, 2);
    assert!(p.estimates.total_seconds > 0);
}

#[test]
fn every_node_has_gated_rollbackable_steps() {
    let p = build_plan(&input()).unwrap();
    for (_, n, _) in p.all_steps() {
        let last = n.steps.last().unwrap();
        assert_eq!(last.action, StepAction::ConnectivityGate, "{}", n.name);
        assert!(last.gate.is_some());
        assert!(n.steps.iter().any(|s| s.rollback_point && s.action == StepAction::InstallDatapath));
    }
}

#[test]
fn target_settings_avoid_used_ranges() {
    let p = build_plan(&input()).unwrap();
    assert_eq!(p.target.pod_cidr, "10.201.0.0/16", "10.200/16 is taken");
    assert_eq!(p.target.tunnel.port, 8473);
    let mut i = input();
    i.pod_cidr = Some("10.100.0.0/16".into());
    assert_eq!(
        build_plan(&i).unwrap_err(),
        PlanningError::Overlap { wanted: "10.100.0.0/16".into(), used: "10.96.0.0/12".into() }
    );
    let mut i = input();
    i.tunnel_port = Some(8472);
    assert_eq!(build_plan(&i).unwrap_err(), PlanningError::FlannelPort);
    let mut i = input();
    i.nodes.clear();
    assert_eq!(build_plan(&i).unwrap_err(), PlanningError::NoNodes);
}

#[test]
fn generated_plan_is_a_valid_file_for_its_cluster() {
    let p = build_plan(&input()).unwrap();
    let yaml = p.to_yaml();
    let back = parse_plan("generated.yaml", &yaml, Some("sha1:abc")).unwrap();
    assert_eq!(back, p);
    assert!(parse_plan("generated.yaml", &yaml, Some("sha1:other")).is_err());
    // Deterministic: same input, same file.
    assert_eq!(build_plan(&input()).unwrap().to_yaml(), yaml);
}

#[test]
fn control_plane_only_cluster() {
    let mut i = input();
    i.nodes.retain(|n| n.control_plane);
    let p = build_plan(&i).unwrap();
    assert_eq!(wave_nodes(&p, 0), vec![vec!["cp-1"]]);
    assert_eq!(p.waves.last().unwrap().name, "control-plane");
    assert_eq!(wave_nodes(&p, 1), vec![vec!["cp-2"]]);
}

#[test]
fn synthetic_large_input_plans() {
    let i = synthetic_input(600, 18_000);
    let p = build_plan(&i).unwrap();
    assert_eq!(p.all_steps().map(|(_, n, _)| n.name.clone()).collect::<std::collections::BTreeSet<_>>().len(), 600);
    assert_eq!(p.waves.last().unwrap().name, "control-plane");
    let g = p.graph().unwrap();
    assert_eq!(g.graph.node_count(), 600 * 10 + p.waves.len(), "10 steps per node and one gate per wave");
}
