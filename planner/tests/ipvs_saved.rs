//! kube-proxy's ipvs mode from saved `ipvsadm -Ln` output of real nodes
//! (tests/fixtures/upstream/ipvsadm-Ln-*.txt, each naming the thread it was
//! posted in), matched to API services reconstructed from that output: the
//! addresses and ports are the node's, the service names are the well-known
//! ones those addresses belong to (default/kubernetes, kube-system/kube-dns …).
//! This kernel has no IPVS, so live IPVS is not tested.

use kubeshift_planner::api::{
    ApiEndpoint, ApiEndpointPort, ApiService, ApiServicePort, ApiServices, ServiceType, SessionAffinity,
};
use kubeshift_planner::diff::{diff_node, FindingKind};
use kubeshift_planner::ipvs::{parse_ipvsadm, to_rule_model};
use std::path::Path;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream").join(name)).unwrap()
}

/// A service with ready endpoints at `eps`; their ports are set by [`with_target_ports`].
fn service(ns: &str, name: &str, ip: &str, ports: &[(&str, u16, &str, Option<u16>)], eps: &[&str]) -> ApiService {
    let svc_ports: Vec<ApiServicePort> = ports
        .iter()
        .map(|(n, p, proto, np)| ApiServicePort {
            name: n.to_string(),
            port: *p,
            protocol: proto.to_string(),
            node_port: *np,
        })
        .collect();
    let ep_ports: Vec<ApiEndpointPort> = svc_ports
        .iter()
        .map(|p| ApiEndpointPort { name: p.name.clone(), port: 0, protocol: p.protocol.clone() })
        .collect();
    ApiService {
        namespace: ns.into(),
        name: name.into(),
        cluster_ip: Some(ip.into()),
        ports: svc_ports,
        endpoints: eps
            .iter()
            .map(|ip| ApiEndpoint { ip: ip.to_string(), ready: true, ports: ep_ports.clone(), ..Default::default() })
            .collect(),
        ..Default::default()
    }
}

/// Endpoint ports per service port name.
fn with_target_ports(mut s: ApiService, targets: &[(&str, u16)]) -> ApiService {
    for e in &mut s.endpoints {
        for p in &mut e.ports {
            p.port = targets.iter().find(|(n, _)| *n == p.name).map(|(_, t)| *t).unwrap_or(p.port);
        }
    }
    s
}

#[test]
fn both_ipvsadm_formats_parse() {
    let vss = parse_ipvsadm("kmaster", &fixture("ipvsadm-Ln-kubernetes-pr81477-kmaster.txt")).unwrap();
    assert_eq!(vss.len(), 6);
    assert_eq!((vss[4].protocol.as_str(), vss[4].ip.as_str(), vss[4].port), ("udp", "10.96.0.10", 53));
    assert_eq!(vss[5].protocol, "sctp");
    assert_eq!(vss[5].reals.len(), 3);

    // The same table as `ipvsadm -Sn` writes it (the format the node report saves).
    let save = "-A -t 10.96.0.1:443 -s rr\n-a -t 10.96.0.1:443 -r 192.168.56.105:6443 -m -w 1\n-A -u [fd00::a]:53 -s rr -p 10800\n-a -u [fd00::a]:53 -r [fd00:1::3]:53 -m -w 0\n";
    let vss = parse_ipvsadm("n", save).unwrap();
    assert_eq!(vss[0].reals[0].ip, "192.168.56.105");
    assert_eq!((vss[1].ip.as_str(), vss[1].persistent, vss[1].reals[0].weight), ("fd00::a", Some(10800), 0));

    let e =
        parse_ipvsadm("node-a:ipvsadm -Sn", "-A -t 10.96.0.1:443 -s rr\n-a -t 10.96.0.9:443 -r 1.2.3.4:1 -m -w 1\n")
            .unwrap_err();
    assert!(e.starts_with("node-a:ipvsadm -Sn:2: real server of an unknown virtual server"), "{e}");
}

fn kmaster_api() -> ApiServices {
    let kubernetes = with_target_ports(
        service("default", "kubernetes", "10.96.0.1", &[("https", 443, "TCP", None)], &["192.168.56.105"]),
        &[("https", 6443)],
    );
    let dns = with_target_ports(
        service(
            "kube-system",
            "kube-dns",
            "10.96.0.10",
            &[("dns", 53, "UDP", None), ("dns-tcp", 53, "TCP", None), ("metrics", 9153, "TCP", None)],
            &["20.20.210.3", "20.20.210.4"],
        ),
        &[("dns", 53), ("dns-tcp", 53), ("metrics", 9153)],
    );
    let app = with_target_ports(
        service("default", "svc-6666", "10.96.232.136", &[("", 6666, "TCP", None)], &["192.168.56.105"]),
        &[("", 6666)],
    );
    ApiServices { services: vec![kubernetes, dns, app] }
}

#[test]
fn kmaster_ipvs_matches_the_api_and_finds_the_stale_virtual_server() {
    let vss = parse_ipvsadm("kmaster", &fixture("ipvsadm-Ln-kubernetes-pr81477-kmaster.txt")).unwrap();
    let api = kmaster_api();
    let model = to_rule_model("kmaster:ipvsadm", &vss, &api);
    let d = diff_node("kmaster", &model, &api);
    assert_eq!(d.services_checked, 5);
    // The SCTP node port's service is not in this API: its virtual server is stale.
    assert_eq!(d.findings.len(), 1, "{:#?}", d.findings);
    assert_eq!(d.findings[0].kind, FindingKind::StaleService);
    assert!(
        d.findings[0].reason.starts_with("IPVS still has rules for virtual server SCTP 10.0.2.15:31514"),
        "{}",
        d.findings[0].reason
    );

    // An endpoint kube-proxy has not programmed yet.
    let mut api2 = api.clone();
    let mut extra = api2.services[1].endpoints[0].clone();
    extra.ip = "20.20.210.9".into();
    api2.services[1].endpoints.push(extra);
    let d = diff_node("kmaster", &to_rule_model("kmaster:ipvsadm", &vss, &api2), &api2);
    assert!(
        d.findings.iter().any(|f| f.kind == FindingKind::EndpointMismatch && f.reason.contains("20.20.210.9:53")),
        "{:#?}",
        d.findings
    );
}

#[test]
fn vm01_persistence_is_session_affinity_and_node_ports_are_matched() {
    let vss = parse_ipvsadm("vm01", &fixture("ipvsadm-Ln-opsnull-issue251-vm01.txt")).unwrap();
    let mut kubernetes = with_target_ports(
        service(
            "default",
            "kubernetes",
            "10.254.0.1",
            &[("https", 443, "TCP", None)],
            &["172.16.16.81", "172.16.16.82"],
        ),
        &[("https", 6443)],
    );
    kubernetes.session_affinity = SessionAffinity::ClientIP;
    kubernetes.session_affinity_timeout = Some(10800);
    let dns = with_target_ports(
        service(
            "kube-system",
            "kube-dns",
            "10.254.0.2",
            &[("dns-tcp", 53, "TCP", None)],
            &["10.253.7.5", "10.253.35.5"],
        ),
        &[("dns-tcp", 53)],
    );
    let mut dashboard = with_target_ports(
        service(
            "kube-system",
            "kubernetes-dashboard",
            "10.254.9.36",
            &[("", 443, "TCP", Some(32767))],
            &["10.253.35.2"],
        ),
        &[("", 8443)],
    );
    dashboard.service_type = ServiceType::NodePort;
    let api = ApiServices { services: vec![kubernetes, dns, dashboard] };
    let model = to_rule_model("vm01:ipvsadm", &vss, &api);
    let dash = model.service("kube-system", "kubernetes-dashboard", "", "tcp").unwrap();
    assert_eq!(dash.node_ports, vec![32767], "the virtual servers on both node IPs are its node port");
    let d = diff_node("vm01", &model, &api);
    let stale: Vec<&str> =
        d.findings.iter().filter(|f| f.kind == FindingKind::StaleService).map(|f| f.reason.as_str()).collect();
    assert_eq!(stale.len(), 1, "{:#?}", d.findings);
    assert!(stale[0].contains("virtual server TCP 10.253.102.0:32429"), "{}", stale[0]);
    assert_eq!(d.findings.len(), 1, "{:#?}", d.findings);

    // Without the affinity in the API, the persistence is a difference.
    let mut api2 = api.clone();
    api2.services[0].session_affinity = SessionAffinity::None;
    let d = diff_node("vm01", &to_rule_model("vm01:ipvsadm", &vss, &api2), &api2);
    assert!(d.findings.iter().any(|f| f.kind == FindingKind::AffinityMismatch), "{:#?}", d.findings);
}

#[test]
fn analysis_uses_the_ipvs_table_of_a_node_report() {
    use kubeshift_planner::analysis::analyze;
    use kubeshift_planner::inventory::{Inventory, NodeInfo};
    use kubeshift_planner::node_report::NodeReport;

    // kmaster's table as the node report saves it (`ipvsadm -Sn`), without the SCTP node port.
    let save = "-A -t 10.96.0.1:443 -s rr\n-a -t 10.96.0.1:443 -r 192.168.56.105:6443 -m -w 1\n";
    let mut api = kmaster_api();
    api.services.truncate(1);
    let r = NodeReport {
        node_name: Some("kmaster".into()),
        ipvs: Some(save.into()),
        // In ipvs mode iptables only marks and masquerades: no KUBE-SVC chains.
        iptables: kubeshift_planner::node_report::IptablesInfo {
            save: Some("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut inv = Inventory { services: api, ..Default::default() };
    inv.nodes.push(NodeInfo { name: "kmaster".into(), kernel_version: "5.15.0".into(), ..Default::default() });
    inv.kube_proxy.mode = Some("ipvs".into());
    let a = analyze(&inv, &[r], None);
    assert!(a.rule_diffs[0].input.ends_with("ipvsadm -Sn"), "{}", a.rule_diffs[0].input);
    assert!(a.rule_diffs[0].is_clean(), "{:#?}", a.rule_diffs[0].findings);
    assert!(a.findings.iter().any(|f| f.subject == "kube-proxy" && f.message.contains("kube-ipvs0")));
}
