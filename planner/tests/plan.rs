//! Plan file: loading, errors with locations, fingerprint, step graph export.

use kubeshift_planner::plan::{fingerprint, load_plan, parse_plan, PlanError, StepAction};

const PLAN: &str = include_str!("fixtures/plan.yaml");
const FP: &str = "sha1:0123456789abcdef0123456789abcdef01234567";

#[test]
fn loads_the_example_plan() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/plan.yaml");
    let p = load_plan(std::path::Path::new(path), Some(FP)).unwrap();
    assert_eq!(p.waves.len(), 3);
    assert_eq!(p.target.tunnel.port, 8473);
    assert_eq!(p.waves[1].batches[0].nodes.len(), 2);
    assert_eq!(p.all_steps().count(), 10);
}

#[test]
fn yaml_round_trip() {
    let p = parse_plan("plan.yaml", PLAN, None).unwrap();
    let again = parse_plan("out.yaml", &p.to_yaml(), None).unwrap();
    assert_eq!(p, again);
    assert!(p.to_yaml().starts_with("# kubeshift migration plan"));
}

#[test]
fn broken_yaml_names_line_and_column() {
    let bad = PLAN.replace("  podCidr: 10.200.0.0/16", "  podCidr: [10.200.0.0/16");
    let e = parse_plan("plan.yaml", &bad, None).unwrap_err();
    let PlanError::Syntax { line, .. } = &e else { panic!("{e}") };
    assert!(*line >= 17, "{e}");
    assert!(e.to_string().starts_with(&format!("plan.yaml:{line}:")), "{e}");
}

#[test]
fn unknown_field_is_an_error_with_location() {
    let bad = PLAN.replace("  maxUnavailable: 2", "  maxUnavailabel: 2");
    let e = parse_plan("plan.yaml", &bad, None).unwrap_err();
    let line = PLAN.lines().position(|l| l == "  maxUnavailable: 2").unwrap() + 1;
    assert!(e.to_string().starts_with(&format!("plan.yaml:{line}:")), "{e}");
    assert!(e.to_string().contains("unknown field `maxUnavailabel`"), "{e}");
}

#[test]
fn wrong_step_action_is_an_error_with_location() {
    let bad = PLAN.replace("action: drain, estimateSeconds: 100", "action: drian, estimateSeconds: 100");
    let e = parse_plan("plan.yaml", &bad, None).unwrap_err();
    let line = PLAN.lines().position(|l| l.contains("node-2/drain")).unwrap() + 1;
    assert!(e.to_string().starts_with(&format!("plan.yaml:{line}:")), "{e}");
}

#[test]
fn wrong_api_version_and_kind() {
    let e = parse_plan("plan.yaml", &PLAN.replace("kubeshift.io/v1alpha1", "kubeshift.io/v2"), None).unwrap_err();
    assert!(matches!(e, PlanError::ApiVersion { .. }));
    assert!(e.to_string().contains("apiVersion is \"kubeshift.io/v2\""), "{e}");
    let e = parse_plan("plan.yaml", &PLAN.replace("kind: Plan", "kind: Inventory"), None).unwrap_err();
    assert!(matches!(e, PlanError::Kind { .. }), "{e}");
    let e = parse_plan("plan.yaml", "kind: Plan\n", None).unwrap_err();
    assert!(matches!(e, PlanError::ApiVersion { .. }), "{e}");
}

#[test]
fn fingerprint_mismatch_is_refused() {
    let other = fingerprint(&["another-cluster"]);
    let e = parse_plan("plan.yaml", PLAN, Some(&other)).unwrap_err();
    let PlanError::FingerprintMismatch { plan, cluster, .. } = &e else { panic!("{e}") };
    assert_eq!(plan, FP);
    assert_eq!(cluster, &other);
    assert!(e.to_string().contains("re-run `kubeshift migrate plan`"));
    assert!(parse_plan("plan.yaml", PLAN, Some(FP)).is_ok());
}

#[test]
fn fingerprint_is_stable_and_unambiguous() {
    assert_eq!(fingerprint(&["a", "b"]), fingerprint(&["a", "b"]));
    assert_ne!(fingerprint(&["ab", ""]), fingerprint(&["a", "b"]));
    assert!(fingerprint(&["x"]).starts_with("sha1:"));
    assert_eq!(fingerprint(&["x"]).len(), 5 + 40);
}

#[test]
fn semantic_errors() {
    let cases = [
        (PLAN.replace("port: 8473", "port: 8472"), "8472"),
        (PLAN.replace("id: node-2/install", "id: node-2/drain"), "step id node-2/drain is used twice"),
        (
            PLAN.replace("after: [node-1/uncordon]", "after: [node-9/uncordon]"),
            "step cp-1/install: `after` names unknown step node-9/uncordon",
        ),
        (PLAN.replace("after: [node-1/uncordon]", "after: [cp-1/install]"), "cycle"),
        (PLAN.replace("- name: node-3", "- name: node-2"), "node node-2 appears twice"),
    ];
    for (text, want) in cases {
        let e = parse_plan("plan.yaml", &text, None).unwrap_err();
        assert!(matches!(e, PlanError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains(want), "{e} should contain {want}");
        assert!(e.to_string().starts_with("plan.yaml: "), "{e}");
    }
}

#[test]
fn graph_order_and_exports() {
    let p = parse_plan("plan.yaml", PLAN, None).unwrap();
    let g = p.graph().unwrap();
    // 10 steps + 1 wave gate.
    assert_eq!(g.graph.node_count(), 11);
    let order: Vec<&str> = g.order().iter().map(|n| n.id.as_str()).collect();
    let pos = |id: &str| order.iter().position(|x| *x == id).unwrap();
    assert!(pos("node-1/uncordon") < pos("wave/canary/gate"));
    assert!(pos("wave/canary/gate") < pos("node-2/drain"));
    assert!(pos("wave/canary/gate") < pos("node-3/drain"));
    assert!(pos("node-2/install") < pos("cp-1/install"));
    assert!(pos("node-3/install") < pos("cp-1/install"));
    // Critical path: canary 250 s + gate 120 + slower worker 210 + cp 60.
    assert_eq!(g.critical_path_seconds(), 250 + 120 + 210 + 60);
    let dot = g.to_dot();
    assert!(dot.starts_with("digraph plan {"));
    assert!(dot.contains("label=\"node-1: drain\""));
    assert!(dot.contains("label=\"wave canary: connectivity-gate\", shape=diamond, peripheries=2"));
    assert_eq!(dot.matches("->").count(), g.graph.edge_count());
    let mm = g.to_mermaid();
    assert!(mm.starts_with("flowchart TD\n"));
    assert!(mm.contains("[[\"node-1: install-datapath\"]]"));
    assert_eq!(mm.matches("-->").count(), g.graph.edge_count());
    assert_eq!(g.graph[g.index["node-1/gate"]].action, StepAction::ConnectivityGate);
}
