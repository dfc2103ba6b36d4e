//! kube-proxy's nftables mode on real `nft`: kube-proxy's own expected
//! transaction (tests/fixtures/upstream/kube-proxy-upstream-nft-TestOverallNFTablesRules.nft)
//! is loaded with `nft -f` in a network namespace this test creates, read back
//! with `nft -j list ruleset`, modelled and diffed against the API objects of
//! that upstream test. Needs root, like the other namespace tests.

use kubeshift_planner::api::{
    ApiEndpoint, ApiEndpointPort, ApiService, ApiServicePort, ApiServices, ServiceType, SessionAffinity, TrafficPolicy,
};
use kubeshift_planner::diff::diff_node;
use kubeshift_planner::iptables::ChainLayout;
use kubeshift_planner::nftables::parse_nft_json;
use std::path::Path;
use std::process::Command;

/// A namespace named `ks-pl-<pid>-<n>`, deleted on drop (also when an assertion fails).
struct Ns(String);

impl Ns {
    fn new() -> Ns {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ks-pl-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Ns(name)
    }

    fn nft(&self, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", &self.0, "nft"];
        a.extend_from_slice(args);
        run("ip", &a)
    }
}

impl Ns {
    /// `nft -f -` with the script on stdin.
    fn nft_stdin(&self, script: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft -f -: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "`{cmd} {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn ruleset_json() -> String {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream/kube-proxy-upstream-nft-TestOverallNFTablesRules.nft");
    let ns = Ns::new();
    ns.nft(&["-f", fixture.to_str().unwrap()]);
    ns.nft(&["-j", "list", "ruleset"])
}

fn port(node_port: Option<u16>) -> Vec<ApiServicePort> {
    vec![ApiServicePort { name: "p80".into(), port: 80, protocol: "TCP".into(), node_port }]
}

fn ep(ip: &str, node: Option<&str>) -> ApiEndpoint {
    ApiEndpoint {
        ip: ip.into(),
        node_name: node.map(str::to_string),
        ready: true,
        ports: vec![ApiEndpointPort { name: "p80".into(), port: 80, protocol: "TCP".into() }],
        ..Default::default()
    }
}

/// The services and endpoint slices TestOverallNFTablesRules creates.
fn api() -> ApiServices {
    let svc = |ns: &str, name: &str, ip: &str| ApiService {
        namespace: ns.into(),
        name: name.into(),
        cluster_ip: Some(ip.into()),
        ports: port(None),
        ..Default::default()
    };
    let mut s1 = svc("ns1", "svc1", "172.30.0.41");
    s1.endpoints = vec![ep("10.180.0.1", None)];
    let mut s2 = svc("ns2", "svc2", "172.30.0.42");
    s2.service_type = ServiceType::LoadBalancer;
    s2.external_traffic_policy = TrafficPolicy::Local;
    s2.ports = port(Some(3001));
    s2.lb_ingress_ips = vec!["1.2.3.4".into()];
    s2.external_ips = vec!["192.168.99.22".into()];
    s2.health_check_node_port = Some(30000);
    s2.endpoints = vec![ep("10.180.0.2", None)];
    let mut s3 = svc("ns3", "svc3", "172.30.0.43");
    s3.service_type = ServiceType::NodePort;
    s3.ports = port(Some(3003));
    s3.endpoints = vec![ep("10.180.0.3", None)];
    let mut s4 = svc("ns4", "svc4", "172.30.0.44");
    s4.service_type = ServiceType::NodePort;
    s4.external_ips = vec!["192.168.99.33".into()];
    s4.endpoints = vec![ep("10.180.0.4", None), ep("10.180.0.5", Some("test-node"))];
    let mut s5 = svc("ns5", "svc5", "172.30.0.45");
    s5.service_type = ServiceType::LoadBalancer;
    s5.ports = port(Some(3002));
    s5.lb_ingress_ips = vec!["5.6.7.8".into()];
    s5.health_check_node_port = Some(30000);
    s5.lb_source_ranges = vec![" 203.0.113.0/25".into()];
    s5.session_affinity = SessionAffinity::ClientIP;
    s5.session_affinity_timeout = Some(10800);
    s5.endpoints = vec![ep("10.180.0.3", None)];
    let s6 = svc("ns6", "svc6", "172.30.0.46");
    ApiServices { services: vec![s1, s2, s3, s4, s5, s6] }
}

#[test]
fn nft_ruleset_models_every_service_and_matches_the_api() {
    let json = ruleset_json();
    let nft = parse_nft_json("test-node:nft", &json).unwrap();
    assert!(nft.v6.is_none());
    let m = nft.v4.expect("table ip kube-proxy");
    assert_eq!(m.layout, ChainLayout::Nftables);
    assert_eq!(m.services.len(), 6, "{:#?}", m.services.iter().map(|s| s.display_name()).collect::<Vec<_>>());

    let s4 = m.service("ns4", "svc4", "p80", "tcp").unwrap();
    assert_eq!(s4.cluster_ip.as_deref(), Some("172.30.0.44"));
    let eps: Vec<String> = s4.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect();
    assert_eq!(eps, vec!["10.180.0.4:80", "10.180.0.5:80"]);
    assert!((s4.endpoints[0].probability - 0.5).abs() < 1e-9);
    assert_eq!(s4.masquerade_unless_from.as_deref(), Some("10.0.0.0/8"));

    let s2 = m.service("ns2", "svc2", "p80", "tcp").unwrap();
    assert!(s2.local_only, "external chain short-circuits local traffic: Local policy");
    assert!(s2.drop_no_local_endpoints);
    assert_eq!(s2.node_ports, vec![3001]);

    let s5 = m.service("ns5", "svc5", "p80", "tcp").unwrap();
    assert_eq!(s5.lb_ips, vec!["5.6.7.8"]);
    assert_eq!(s5.lb_source_ranges, vec!["203.0.113.0/25"]);
    assert_eq!(s5.affinity_seconds, Some(10800));

    let s6 = m.service("ns6", "svc6", "p80", "tcp").unwrap();
    assert!(s6.reject_no_endpoints);
    assert_eq!(s6.cluster_ip.as_deref(), Some("172.30.0.46"));
    assert!(m.unreferenced_chains.is_empty(), "{:?}", m.unreferenced_chains);

    let d = diff_node("test-node", &m, &api());
    assert_eq!(d.services_checked, 6);
    assert!(d.is_clean(), "{:#?}", d.findings);
}

#[test]
fn nft_differences_are_found() {
    let m = parse_nft_json("test-node:nft", &ruleset_json()).unwrap().v4.unwrap();
    let mut api = api();
    // A new endpoint kube-proxy has not programmed, and a service it still has.
    api.services[0].endpoints.push(ep("10.180.0.9", None));
    api.services.retain(|s| s.name != "svc3");
    let d = diff_node("test-node", &m, &api);
    let reasons: Vec<&str> = d.findings.iter().map(|f| f.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("ready in the API but not in the rules: 10.180.0.9:80")), "{reasons:#?}");
    assert!(
        reasons.iter().any(|r| r.contains("ns3/svc3:p80") && r.contains("which the API does not have")),
        "{reasons:#?}"
    );
}

/// `kubeshift node report` on a node in nftables mode: the ruleset is
/// collected, and analysis diffs kube-proxy's nftables services (not the empty
/// iptables tables) against the API.
#[test]
fn node_report_collects_nft_and_analysis_uses_it() {
    use kubeshift_planner::analysis::analyze;
    use kubeshift_planner::inventory::{Inventory, NodeInfo};
    use kubeshift_planner::node_report::{collect_in_netns, CollectOptions};

    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream/kube-proxy-upstream-nft-TestOverallNFTablesRules.nft");
    let ns = Ns::new();
    ns.nft(&["-f", fixture.to_str().unwrap()]);
    let opts = CollectOptions {
        node_name: Some("test-node".into()),
        cni_conf_dir: std::env::temp_dir().join("ks-pl-no-cni-dir"),
        ..Default::default()
    };
    let r = collect_in_netns(&ns.0, &opts).unwrap();
    assert!(r.nft_ruleset.as_deref().is_some_and(|t| t.contains("kube-proxy")), "{:?}", r.problems);

    let mut inv = Inventory::default();
    inv.nodes.push(NodeInfo { name: "test-node".into(), kernel_version: "6.1.0".into(), ..Default::default() });
    inv.services = api();
    let a = analyze(&inv, std::slice::from_ref(&r), None);
    let d = &a.rule_diffs[0];
    assert!(d.input.contains("nft -j list ruleset"), "{}", d.input);
    assert_eq!(d.services_checked, 6);
    assert!(d.is_clean(), "{:#?}", d.findings);
}

/// A firewall chain with several allowed sources, the LB IPs among them, in
/// the shape kube-proxy's nftables proxier writes for TestLoadBalancer's
/// service (source ranges 192.168.0.0/24 and " 203.0.113.0/25", LB IPs
/// 1.2.3.4 and 5.6.7.8, the node inside a range), through real `nft`: the
/// anonymous set comes back as a JSON set, the LB IPs are kept apart.
#[test]
fn firewall_set_with_lb_ips_as_sources() {
    let script = r#"add table ip kube-proxy
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add chain ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80
add chain ip kube-proxy firewall-ULMVA6XW-ns1/svc1/tcp/p80
add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 goto service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
add rule ip kube-proxy firewall-ULMVA6XW-ns1/svc1/tcp/p80 ip saddr != { 192.168.0.0/24, 203.0.113.0/25, 1.2.3.4, 5.6.7.8 } drop
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy firewall-ips { 1.2.3.4 . tcp . 80 : goto firewall-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy firewall-ips { 5.6.7.8 . tcp . 80 : goto firewall-ULMVA6XW-ns1/svc1/tcp/p80 }
"#;
    let ns = Ns::new();
    ns.nft_stdin(script);
    let json = ns.nft(&["-j", "list", "ruleset"]);
    let m = parse_nft_json("fw", &json).unwrap().v4.unwrap();
    let s = m.service("ns1", "svc1", "p80", "tcp").unwrap();
    assert_eq!(s.lb_source_ranges, vec!["192.168.0.0/24", "203.0.113.0/25"]);
    assert_eq!(s.lb_source_lb_ips, vec!["1.2.3.4/32", "5.6.7.8/32"]);
    assert_eq!(s.lb_ips, vec!["1.2.3.4", "5.6.7.8"]);

    let api = ApiServices {
        services: vec![ApiService {
            namespace: "ns1".into(),
            name: "svc1".into(),
            service_type: ServiceType::LoadBalancer,
            cluster_ip: Some("172.30.0.41".into()),
            ports: port(None),
            lb_ingress_ips: vec!["1.2.3.4".into(), "5.6.7.8".into()],
            lb_source_ranges: vec!["192.168.0.0/24".into(), " 203.0.113.0/25".into()],
            endpoints: vec![ep("10.180.0.1", None)],
            ..Default::default()
        }],
    };
    let d = diff_node("test-node", &m, &api);
    assert!(d.is_clean(), "{:#?}", d.findings);
}

/// kube-proxy's IPv6 proxier in nftables mode writes `table ip6 kube-proxy`:
/// it is modelled as the node's IPv6 rules (same chain shapes as the IPv4
/// upstream fixture, IPv6 addresses), loaded and read back with real nft. nft
/// 1.0.6 takes no `:` in a chain name, so the endpoint chain's suffix here is a
/// placeholder: the model takes the endpoint from the chain's `dnat to`.
#[test]
fn ip6_kube_proxy_table_is_the_ipv6_model() {
    let script = r#"add table ip6 kube-proxy
add set ip6 kube-proxy cluster-ips { type ipv6_addr ; }
add map ip6 kube-proxy service-ips { type ipv6_addr . inet_proto . inet_service : verdict ; }
add chain ip6 kube-proxy mark-for-masquerade
add chain ip6 kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add chain ip6 kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__ep0
add rule ip6 kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip6 daddr fd00:10:96::41 ip6 saddr != fd00:10::/64 jump mark-for-masquerade
add rule ip6 kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__ep0 }
add rule ip6 kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__ep0 meta l4proto tcp dnat to [fd00:10::1]:80
add element ip6 kube-proxy cluster-ips { fd00:10:96::41 }
add element ip6 kube-proxy service-ips { fd00:10:96::41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
"#;
    let ns = Ns::new();
    ns.nft_stdin(script);
    let nft = parse_nft_json("v6", &ns.nft(&["-j", "list", "ruleset"])).unwrap();
    assert!(nft.v4.is_none());
    let m = nft.v6.expect("table ip6 kube-proxy");
    let s = m.service("ns1", "svc1", "p80", "tcp").unwrap();
    assert_eq!(s.cluster_ip.as_deref(), Some("fd00:10:96::41"));
    assert_eq!((s.endpoints[0].ip.as_str(), s.endpoints[0].port), ("fd00:10::1", 80));
    assert_eq!(s.masquerade_unless_from.as_deref(), Some("fd00:10::/64"));
    let api = ApiServices {
        services: vec![ApiService {
            namespace: "ns1".into(),
            name: "svc1".into(),
            cluster_ip: Some("fd00:10:96::41".into()),
            ports: port(None),
            endpoints: vec![ep("fd00:10::1", None)],
            ..Default::default()
        }],
    };
    assert!(diff_node("n", &m, &api.of_family(true)).is_clean());
}
