//! Conversions of API objects into the inventory, for the shapes the 1.20 lab
//! cannot serve (EndpointSlice v1, policy/v1, operator installs), and the
//! analysis rules on hand-written inventories.

use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use kubeshift_planner::analysis::*;
use kubeshift_planner::api::ApiService;
use kubeshift_planner::inventory::*;
use serde_json::json;
use std::collections::BTreeMap;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn endpoint_slice_v1_typed_and_v1beta1_topology() {
    // discovery.k8s.io/v1: nodeName, conditions.ready false kept as not ready.
    let v1: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.1.0.5"], "nodeName": "n1", "conditions": {"ready": true}},
            {"addresses": ["10.1.1.6"], "nodeName": "n2", "conditions": {"ready": false}},
            {"addresses": ["10.1.2.7"], "nodeName": "n3"}
        ]
    }))
    .unwrap();
    let (ns, svc, eps) = endpoints_from_slice(&serde_json::to_value(&v1).unwrap()).unwrap();
    assert_eq!((ns.as_str(), svc.as_str()), ("shop", "web"));
    assert_eq!(eps.len(), 3);
    assert_eq!(eps[0].node_name.as_deref(), Some("n1"));
    assert!(eps[0].ready && !eps[1].ready && eps[2].ready);
    assert_eq!(eps[0].ports[0].port, 8080);

    // v1beta1 keeps the node in topology.
    let beta = json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.1.0.5"], "topology": {"kubernetes.io/hostname": "n1"}}]
    });
    let (_, _, eps) = endpoints_from_slice(&beta).unwrap();
    assert_eq!(eps[0].node_name.as_deref(), Some("n1"));
    assert_eq!(eps[0].ports[0].protocol, "TCP");

    // Slices of several pieces add up on one service.
    let mut svcs = vec![ApiService { namespace: "shop".into(), name: "web".into(), ..Default::default() }];
    let a = endpoints_from_slice(&serde_json::to_value(&v1).unwrap()).unwrap();
    let b = endpoints_from_slice(&beta).unwrap();
    attach_endpoints(&mut svcs, vec![a, b]);
    assert_eq!(svcs[0].endpoints.len(), 4);
}

#[test]
fn core_endpoints_fallback() {
    let ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "subsets": [{"addresses": [{"ip": "10.1.0.5", "nodeName": "n1"}],
                     "notReadyAddresses": [{"ip": "10.1.0.9"}],
                     "ports": [{"name": "http", "port": 8080}]}]
    }))
    .unwrap();
    let eps = endpoints_from_core(&ep);
    assert_eq!(eps.len(), 2);
    assert!(eps[0].ready && !eps[1].ready);
}

#[test]
fn pdb_policy_v1_and_v1beta1() {
    let v1 = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "db", "namespace": "data"},
        "spec": {"maxUnavailable": "25%", "selector": {"matchLabels": {"app": "db"}}},
        "status": {"disruptionsAllowed": 1, "expectedPods": 4, "currentHealthy": 4, "desiredHealthy": 3}});
    let p = pdb_from_json("policy/v1", &v1);
    assert_eq!(p.api_version, "policy/v1");
    assert_eq!(p.max_unavailable.as_deref(), Some("25%"));
    assert_eq!(p.disruptions_allowed, Some(1));
    assert_eq!(p.selector, labels(&[("app", "db")]));
    let beta = json!({"metadata": {"name": "db", "namespace": "data"}, "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "db"}}}});
    let p = pdb_from_json("policy/v1beta1", &beta);
    assert_eq!(p.min_available.as_deref(), Some("2"));
    assert_eq!(p.disruptions_allowed, None);
}

#[test]
fn pools_from_managed_offerings_and_override() {
    assert_eq!(pool_of(&labels(&[("cloud.google.com/gke-nodepool", "default-pool")]), None).0, "default-pool");
    assert_eq!(pool_of(&labels(&[("eks.amazonaws.com/nodegroup", "ng-1")]), None).0, "ng-1");
    assert_eq!(pool_of(&labels(&[("kubernetes.azure.com/agentpool", "np1"), ("agentpool", "old")]), None).0, "np1");
    assert_eq!(pool_of(&labels(&[("agentpool", "old")]), None).0, "old");
    let (p, l) = pool_of(&labels(&[("node.kubernetes.io/pool", "a"), ("team", "x")]), Some("team"));
    assert_eq!((p.as_str(), l.as_deref()), ("x", Some("team")));
    assert_eq!(pool_of(&labels(&[]), Some("team")), (DEFAULT_POOL.to_string(), None));
    assert!(is_control_plane(&labels(&[("node-role.kubernetes.io/control-plane", "")])));
    assert!(is_control_plane(&labels(&[("node-role.kubernetes.io/master", "")])));
}

#[test]
fn flannel_net_conf_backends_and_errors() {
    let c = parse_flannel_net_conf(
        "cm",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"DirectRouting":true}}"#,
    )
    .unwrap();
    assert_eq!(c.network.as_deref(), Some("10.244.0.0/16"));
    assert_eq!(
        (c.backend_type.as_deref(), c.vni, c.port, c.direct_routing),
        (Some("vxlan"), Some(4096), Some(4789), Some(true))
    );
    let c = parse_flannel_net_conf("cm", r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
    assert_eq!(c.backend_type.as_deref(), Some("host-gw"));
    let e = parse_flannel_net_conf(
        "ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json",
        "{\n \"Network\": \"10.244.0.0/16\",\n",
    )
    .unwrap_err();
    assert!(e.starts_with("ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json:3:"), "{e}");
    assert!(parse_flannel_net_conf("x", r#"{"Network": 5}"#).unwrap_err().contains("Network must be a string"));
    assert!(parse_flannel_net_conf("x", r#"[1]"#).unwrap_err().contains("object"));
}

#[test]
fn kube_proxy_config_and_flags() {
    let (m, c) = parse_kube_proxy_config("cm", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: \"\"\nclusterCIDR: 10.244.0.0/16\n").unwrap();
    assert_eq!((m.as_str(), c.as_deref()), ("iptables", Some("10.244.0.0/16")));
    let (m, _) = parse_kube_proxy_config("cm", "mode: ipvs\n").unwrap();
    assert_eq!(m, "ipvs");
    let (m, _) = parse_kube_proxy_config("cm", "mode: nftables\n").unwrap();
    assert_eq!(m, "nftables");
    let e = parse_kube_proxy_config("ConfigMap kube-system/kube-proxy key config.conf", "mode: [\n").unwrap_err();
    assert!(e.starts_with("ConfigMap kube-system/kube-proxy key config.conf:"), "{e}");
    let args: Vec<String> =
        ["kube-proxy", "--proxy-mode=ipvs", "--cluster-cidr", "10.0.0.0/8"].iter().map(|s| s.to_string()).collect();
    assert_eq!(kube_proxy_flags(&args), (Some("ipvs".into()), Some("10.0.0.0/8".into())));
}

fn np(ns: &str, name: &str, spec: serde_json::Value) -> PolicyInfo {
    PolicyInfo {
        namespace: ns.into(),
        name: name.into(),
        spec: serde_json::from_value::<NetworkPolicySpec>(spec).unwrap(),
    }
}

#[test]
fn network_policy_classes_and_reasons() {
    let pods = [
        PodInfo {
            namespace: "mon".into(),
            name: "node-exporter-1".into(),
            labels: labels(&[("app", "ne")]),
            host_network: true,
            ..Default::default()
        },
        PodInfo {
            namespace: "shop".into(),
            name: "web-1".into(),
            labels: labels(&[("app", "web")]),
            ..Default::default()
        },
    ];
    let pod_refs: Vec<&PodInfo> = pods.iter().collect();
    let api = vec!["10.96.0.1".to_string(), "192.168.1.10:6443".to_string()];
    let ctx = PolicyContext {
        legacy_pod_cidrs: vec!["10.244.0.0/16".into()],
        new_pod_cidr: Some("10.200.0.0/16".into()),
        apiserver_addresses: &api,
        pods: &pod_refs,
    };

    let plain = np(
        "shop",
        "allow-web",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    let v = classify_policy(&plain, &ctx);
    assert_eq!(v.class, PolicyClass::CarriedOver, "{:?}", v.reasons);

    let named = np("shop", "named", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}));
    let v = classify_policy(&named, &ctx);
    assert_eq!(v.class, PolicyClass::NeedsAttention);
    assert!(v.reasons[0].contains("named port \"http\""));

    let range = np(
        "shop",
        "range",
        json!({"podSelector": {}, "egress": [{"ports": [{"port": 9000, "endPort": 9100, "protocol": "UDP"}]}]}),
    );
    let v = classify_policy(&range, &ctx);
    assert!(v.reasons[0].contains("9000-9100"), "{:?}", v.reasons);

    let api_egress = np(
        "shop",
        "to-api",
        json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "192.168.1.0/24"}}], "ports": [{"port": 443}]}]}),
    );
    let v = classify_policy(&api_egress, &ctx);
    assert!(v.reasons.iter().any(|r| r.contains("API server (192.168.1.10:6443)")), "{:?}", v.reasons);

    let except = np(
        "shop",
        "except",
        json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16", "192.168.1.10/32"]}}]}]}),
    );
    let v = classify_policy(&except, &ctx);
    assert_eq!(v.class, PolicyClass::NeedsAttention);
    assert!(v.reasons.iter().any(|r| r.contains("except 10.244.0.0/16")));
    assert!(v.reasons.iter().any(|r| r.contains("legacy pod CIDR 10.244.0.0/16") && r.contains("10.200.0.0/16")));
    // The apiserver endpoint is excepted, only the ClusterIP is still in the block.
    assert!(v.reasons.iter().any(|r| r.contains("API server (10.96.0.1)")), "{:?}", v.reasons);

    let host = np(
        "mon",
        "exporter",
        json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["ne"]}]}}),
    );
    let v = classify_policy(&host, &ctx);
    assert!(v.reasons.iter().any(|r| r.contains("hostNetwork pods (node-exporter-1)")), "{:?}", v.reasons);

    let sctp =
        np("shop", "sctp", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 7777, "protocol": "SCTP"}]}]}));
    assert_eq!(classify_policy(&sctp, &ctx).class, PolicyClass::Blocker);
}

#[test]
fn calico_policies_deny_with_order_is_a_blocker() {
    let gnp = calico_policy_from_json(
        "GlobalNetworkPolicy",
        &json!({
            "metadata": {"name": "deny-meta"},
            "spec": {"order": 10, "selector": "all()", "egress": [{"action": "Deny"}, {"action": "Allow"}]}
        }),
    );
    let v = classify_calico(&gnp);
    assert_eq!(v.class, PolicyClass::Blocker);
    assert!(v.reasons[0].contains("Deny rules at order 10"), "{:?}", v.reasons);
    let allow = calico_policy_from_json(
        "NetworkPolicy",
        &json!({
            "metadata": {"name": "allow", "namespace": "shop"},
            "spec": {"selector": "app == 'web'", "ingress": [{"action": "Allow"}]}
        }),
    );
    let v = classify_calico(&allow);
    assert_eq!(v.class, PolicyClass::NeedsAttention);
    assert!(v.reasons[0].contains("app == 'web'"));
}

fn node(name: &str, pool: &str, kernel: &str) -> NodeInfo {
    NodeInfo { name: name.into(), pool: pool.into(), kernel_version: kernel.into(), ..Default::default() }
}

#[test]
fn unknown_cni_old_kernel_and_pdb_limits() {
    let mut inv = Inventory {
        nodes: vec![node("a1", "a", "4.19.0-27-amd64"), node("a2", "a", "6.1.0"), node("b1", "b", "5.10.0")],
        ..Default::default()
    };
    inv.pods = (0..3)
        .map(|i| PodInfo {
            namespace: "data".into(),
            name: format!("db-{i}"),
            node: Some(if i < 2 { "a2" } else { "b1" }.into()),
            labels: labels(&[("app", "db")]),
            evictable: true,
            ..Default::default()
        })
        .collect();
    inv.pdbs = vec![PdbInfo {
        namespace: "data".into(),
        name: "db".into(),
        selector: labels(&[("app", "db")]),
        min_available: Some("2".into()),
        ..Default::default()
    }];
    let a = analyze(&inv, &[], None);
    let blockers: Vec<&Finding> = a.blockers().collect();
    assert_eq!(blockers.len(), 2, "{blockers:?}");
    assert!(blockers.iter().any(|f| f.subject == "cni" && f.message.contains("no known legacy CNI")));
    assert!(blockers.iter().any(|f| f.message.contains("a1 (kernel 4.19.0-27-amd64 is older than 5.10)")));
    assert_eq!(a.findings[0].severity, Severity::Blocker);
    let limits = pool_disruption_limits(&inv);
    assert_eq!(limits.get("a"), Some(&1));
    assert_eq!(limits.get("b"), Some(&1));
    let input = plan_input(&inv, "t", 3);
    assert_eq!(input.nodes.iter().find(|n| n.name == "a2").unwrap().evictable_pods, 2);
    // The fingerprint does not depend on node order.
    let fp = inv.fingerprint();
    inv.nodes.reverse();
    assert_eq!(inv.fingerprint(), fp);
    inv.kube_system_uid = "other".into();
    assert_ne!(inv.fingerprint(), fp);
}

#[test]
fn policies_under_plain_flannel_are_flagged_as_not_enforced_today() {
    let mut inv = Inventory::default();
    inv.cni.kind = Some("flannel".into());
    inv.network_policies = (0..7)
        .map(|i| PolicyInfo { namespace: "shop".into(), name: format!("p{i}"), spec: NetworkPolicySpec::default() })
        .collect();
    let a = analyze(&inv, &[], None);
    let hit = a.findings.iter().find(|f| f.subject == "networkpolicy").expect("a finding about unenforced policies");
    assert_eq!(hit.severity, Severity::Attention);
    assert!(
        hit.message.contains(
            "7 NetworkPolicies (shop/p0, shop/p1, shop/p2, shop/p3, shop/p4 and 2 more) are not enforced today"
        ),
        "{}",
        hit.message
    );

    // Canal enforces them with Calico's engine; no policies, nothing to say.
    inv.cni.kind = Some("canal".into());
    assert!(!analyze(&inv, &[], None).findings.iter().any(|f| f.subject == "networkpolicy"));
    inv.cni.kind = Some("flannel".into());
    inv.network_policies.clear();
    assert!(!analyze(&inv, &[], None).findings.iter().any(|f| f.subject == "networkpolicy"));
}
