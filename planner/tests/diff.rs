//! Rule model vs API: a matching API gives a clean diff, and each kind of
//! drift is found with a reason.

use kubeshift_planner::api::{ApiServices, SessionAffinity, TrafficPolicy};
use kubeshift_planner::diff::{diff_node, FindingKind, NodeDiff};
use kubeshift_planner::iptables::{parse_iptables_save, RuleModel};

const V120: &str = include_str!("fixtures/kube-proxy-1.20-flannel.txt");
const CURRENT: &str = include_str!("fixtures/kube-proxy-current-calico-nft.txt");

/// The API state the 1.20 fixture was written from (node-1 holds 10.244.1.x),
/// minus `old/gone`, which was deleted.
const API_120: &str = r#"
services:
- {namespace: default, name: kubernetes, clusterIP: 10.96.0.1, ports: [{name: https, port: 443}],
   endpoints: [{ip: 192.168.50.10, nodeName: cp-1, ports: [{name: https, port: 6443}]}]}
- namespace: kube-system
  name: kube-dns
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
  endpoints:
  - {ip: 10.244.1.2, nodeName: node-1, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}
  - {ip: 10.244.2.2, nodeName: node-2, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}
- namespace: default
  name: web
  type: NodePort
  clusterIP: 10.96.100.10
  externalIPs: [192.168.50.200]
  ports: [{name: http, port: 80, nodePort: 30080}]
  endpoints:
  - {ip: 10.244.1.5, nodeName: node-1, ports: [{name: http, port: 8080}]}
  - {ip: 10.244.2.5, nodeName: node-2, ports: [{name: http, port: 8080}]}
  - {ip: 10.244.3.5, nodeName: node-3, ports: [{name: http, port: 8080}]}
  - {ip: 10.244.3.99, nodeName: node-3, ready: false, ports: [{name: http, port: 8080}]}
- namespace: default
  name: sticky
  clusterIP: 10.96.100.20
  sessionAffinity: ClientIP
  ports: [{port: 9000}]
  endpoints:
  - {ip: 10.244.1.7, nodeName: node-1, ports: [{port: 9000}]}
  - {ip: 10.244.2.7, nodeName: node-2, ports: [{port: 9000}]}
- namespace: default
  name: lb-local
  type: LoadBalancer
  clusterIP: 10.96.100.30
  externalTrafficPolicy: Local
  lbIngressIPs: [203.0.113.10]
  lbSourceRanges: [198.51.100.0/24]
  ports: [{name: http, port: 80, nodePort: 31080}]
  endpoints:
  - {ip: 10.244.1.9, nodeName: node-1, ports: [{name: http, port: 8080}]}
  - {ip: 10.244.2.9, nodeName: node-2, ports: [{name: http, port: 8080}]}
- namespace: default
  name: empty
  type: NodePort
  clusterIP: 10.96.100.40
  ports: [{name: http, port: 80, nodePort: 30090}]
- {namespace: default, name: headless, clusterIP: None, ports: [{name: http, port: 80}]}
- {namespace: default, name: ext, type: ExternalName, ports: [{name: http, port: 80}]}
"#;

fn model() -> RuleModel {
    parse_iptables_save("node-1.txt", V120).unwrap()
}

fn api() -> ApiServices {
    serde_yaml::from_str(API_120).expect("API fixture")
}

fn kinds(d: &NodeDiff) -> Vec<(FindingKind, Option<String>)> {
    d.findings.iter().map(|f| (f.kind, f.service.clone())).collect()
}

#[test]
fn matching_api_only_reports_the_deleted_service() {
    let d = diff_node("node-1", &model(), &api());
    assert_eq!(d.services_checked, 7, "headless and ExternalName are not proxied");
    assert_eq!(
        kinds(&d),
        vec![
            (FindingKind::StaleService, Some("old/gone:http/tcp".to_string())),
            (FindingKind::StaleChain, None),
            (FindingKind::StaleChain, None),
        ],
        "{:#?}",
        d.findings
    );
    assert!(d.findings[0].reason.contains("old/gone:http"), "{}", d.findings[0].reason);
    assert_eq!(d.findings[0].chains, vec!["KUBE-SVC-GONEHASHAAAAAAAA"]);
}

fn only(d: &NodeDiff, kind: FindingKind) -> Vec<&kubeshift_planner::diff::Finding> {
    d.findings.iter().filter(|f| f.kind == kind).collect()
}

#[test]
fn endpoint_mismatch_both_directions() {
    let mut a = api();
    let web = a.services.iter_mut().find(|s| s.name == "web").unwrap();
    web.endpoints.retain(|e| e.ip != "10.244.2.5");
    web.endpoints[0].ip = "10.244.1.55".into();
    let d = diff_node("node-1", &model(), &a);
    let f = only(&d, FindingKind::EndpointMismatch);
    assert_eq!(f.len(), 1, "{:#?}", d.findings);
    assert_eq!(f[0].service.as_deref(), Some("default/web:http/tcp"));
    assert!(f[0].reason.contains("ready in the API but not in the rules: 10.244.1.55:8080"), "{}", f[0].reason);
    assert!(
        f[0].reason.contains("in the rules but not ready in the API: 10.244.1.5:8080, 10.244.2.5:8080"),
        "{}",
        f[0].reason
    );
}

#[test]
fn service_missing_rules() {
    let mut a = api();
    let mut new = a.services.iter().find(|s| s.name == "web").unwrap().clone();
    new.name = "web2".into();
    new.ports[0].node_port = None;
    new.external_ips.clear();
    a.services.push(new);
    let d = diff_node("node-1", &model(), &a);
    let f = only(&d, FindingKind::MissingRules);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].service.as_deref(), Some("default/web2:http/tcp"));
    assert!(f[0].reason.contains("3 ready endpoint(s)"), "{}", f[0].reason);
}

#[test]
fn endpoints_gone_but_rules_still_route() {
    let mut a = api();
    a.services.iter_mut().find(|s| s.name == "sticky").unwrap().endpoints.clear();
    let d = diff_node("node-1", &model(), &a);
    let f = only(&d, FindingKind::EndpointMismatch);
    assert_eq!(f.len(), 1, "{:#?}", d.findings);
    assert!(f[0].reason.contains("still send traffic to 10.244.1.7:9000, 10.244.2.7:9000"), "{}", f[0].reason);
}

#[test]
fn node_port_affinity_cluster_ip_and_policy_drift() {
    let mut a = api();
    {
        let web = a.services.iter_mut().find(|s| s.name == "web").unwrap();
        web.ports[0].node_port = Some(30081);
        web.session_affinity = SessionAffinity::ClientIP;
        web.session_affinity_timeout = Some(60);
    }
    {
        let s = a.services.iter_mut().find(|s| s.name == "sticky").unwrap();
        s.cluster_ip = Some("10.96.100.21".into());
    }
    {
        let s = a.services.iter_mut().find(|s| s.name == "lb-local").unwrap();
        s.external_traffic_policy = TrafficPolicy::Cluster;
    }
    let d = diff_node("node-1", &model(), &a);
    let np = only(&d, FindingKind::NodePortMismatch);
    assert_eq!(np.len(), 2, "{:#?}", d.findings);
    assert!(np.iter().any(|f| f.reason.contains("allocates node port 30081")));
    assert!(np.iter().any(|f| f.reason.contains("open node port 30080")));
    let aff = only(&d, FindingKind::AffinityMismatch);
    assert_eq!(aff.len(), 1);
    assert_eq!(aff[0].reason, "session affinity in the API: ClientIP for 60 s; in the rules: none");
    let cip = only(&d, FindingKind::ClusterIpMismatch);
    assert_eq!(cip[0].reason, "rules capture 10.96.100.20:9000, the API says 10.96.100.21:9000");
    let pol = only(&d, FindingKind::TrafficPolicyMismatch);
    assert_eq!(pol.len(), 1);
    assert_eq!(pol[0].service.as_deref(), Some("default/lb-local:http/tcp"));
}

#[test]
fn local_endpoints_are_checked_per_node() {
    // On node-2 the same rules are wrong: its local endpoint is 10.244.2.9.
    let d = diff_node("node-2", &model(), &api());
    let f = only(&d, FindingKind::EndpointMismatch);
    assert_eq!(f.len(), 1, "{:#?}", d.findings);
    assert!(f[0].reason.contains("local endpoints on node node-2 differ"), "{}", f[0].reason);
}

#[test]
fn missing_reject_for_service_without_endpoints() {
    let mut m = model();
    m.services.iter_mut().find(|s| s.name == "empty").unwrap().reject_no_endpoints = false;
    let d = diff_node("node-1", &m, &api());
    let f = only(&d, FindingKind::EndpointMismatch);
    assert_eq!(f.len(), 1);
    assert!(f[0].reason.contains("no REJECT rule"));
}

#[test]
fn current_layout_diff_with_external_addresses() {
    let m = parse_iptables_save("node-1.txt", CURRENT).unwrap();
    let a: ApiServices = serde_yaml::from_str(
        r#"
services:
- namespace: shop
  name: cart
  type: NodePort
  clusterIP: 10.96.200.20
  externalTrafficPolicy: Local
  externalIPs: [192.168.60.201]
  ports: [{name: http, port: 80, nodePort: 31500}]
  endpoints:
  - {ip: 192.168.2.20, nodeName: node-2, ports: [{name: http, port: 8080}]}
  - {ip: 192.168.3.20, nodeName: node-3, ports: [{name: http, port: 8080}]}
"#,
    )
    .unwrap();
    let d = diff_node("node-1", &m, &a);
    let ext = only(&d, FindingKind::ExternalAddressMismatch);
    assert_eq!(ext.len(), 1, "{:#?}", d.findings);
    assert_eq!(ext[0].reason, "external IPs: API has [192.168.60.201], rules have [192.168.60.200]");
    // Everything else in the dump is stale relative to this one-service API.
    assert_eq!(only(&d, FindingKind::StaleService).len(), m.services.len() - 1);
    assert!(only(&d, FindingKind::EndpointMismatch).is_empty(), "{:#?}", d.findings);
    let json = serde_json::to_string(&d).unwrap();
    assert!(json.contains("\"kind\":\"external-address-mismatch\""));
}

#[test]
fn internal_traffic_policy_local_compares_this_nodes_endpoints() {
    let m = parse_iptables_save("node-1.txt", CURRENT).unwrap();
    let a: ApiServices = serde_yaml::from_str(
        r#"
services:
- namespace: shop
  name: cache
  clusterIP: 10.96.200.40
  internalTrafficPolicy: Local
  ports: [{name: redis, port: 6379}]
  endpoints:
  - {ip: 192.168.1.40, nodeName: node-1, ports: [{name: redis, port: 6379}]}
  - {ip: 192.168.2.40, nodeName: node-2, ports: [{name: redis, port: 6379}]}
"#,
    )
    .unwrap();
    let on = |node: &str| {
        diff_node(node, &m, &a)
            .findings
            .into_iter()
            .filter(|f| f.service.as_deref() == Some("shop/cache:redis/tcp"))
            .collect::<Vec<_>>()
    };
    assert!(on("node-1").is_empty(), "{:#?}", on("node-1"));
    let f = on("node-2");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].kind, FindingKind::EndpointMismatch);
    assert!(f[0].reason.starts_with("local endpoints (internalTrafficPolicy Local) differ"), "{}", f[0].reason);
}
