//! Parser tests on hand-written dumps in the shape of kube-proxy 1.20 (legacy
//! backend, Flannel) and current kube-proxy (nft backend, Calico).

use kubeshift_planner::iptables::{parse_iptables_save, ChainLayout, ParseErrorKind, RuleModel, ServiceRules};

const V120: &str = include_str!("fixtures/kube-proxy-1.20-flannel.txt");
const CURRENT: &str = include_str!("fixtures/kube-proxy-current-calico-nft.txt");

fn v120() -> RuleModel {
    parse_iptables_save("kube-proxy-1.20-flannel.txt", V120).expect("1.20 fixture parses")
}

fn current() -> RuleModel {
    parse_iptables_save("kube-proxy-current-calico-nft.txt", CURRENT).expect("current fixture parses")
}

fn svc<'m>(m: &'m RuleModel, ns: &str, name: &str, port: &str, proto: &str) -> &'m ServiceRules {
    m.service(ns, name, port, proto).unwrap_or_else(|| {
        panic!(
            "{ns}/{name}:{port}/{proto} missing; have {:?}",
            m.services.iter().map(|s| s.display_name()).collect::<Vec<_>>()
        )
    })
}

fn ips(s: &ServiceRules) -> Vec<String> {
    s.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()
}

// ---------- kube-proxy 1.20 ----------

#[test]
fn v120_layout_and_service_set() {
    let m = v120();
    assert_eq!(m.layout, ChainLayout::Legacy);
    let names: Vec<String> = m.services.iter().map(|s| format!("{}/{}", s.display_name(), s.protocol)).collect();
    assert_eq!(
        names,
        vec![
            "default/empty:http/tcp",
            "default/kubernetes:https/tcp",
            "default/lb-local:http/tcp",
            "default/sticky/tcp",
            "default/web:http/tcp",
            "kube-system/kube-dns:dns/udp",
            "kube-system/kube-dns:dns-tcp/tcp",
            "old/gone:http/tcp",
        ]
    );
}

#[test]
fn v120_cluster_ip_endpoints_and_probabilities() {
    let m = v120();
    let web = svc(&m, "default", "web", "http", "tcp");
    assert_eq!(web.cluster_ip.as_deref(), Some("10.96.100.10"));
    assert_eq!(web.port, Some(80));
    assert_eq!(ips(web), vec!["10.244.1.5:8080", "10.244.2.5:8080", "10.244.3.5:8080"]);
    let probs: Vec<f64> = web.endpoints.iter().map(|e| e.probability).collect();
    assert_eq!(probs, vec![0.33333333349, 0.5, 1.0]);
    // Each of three endpoints gets a third of new connections.
    for e in &web.endpoints {
        assert!((e.share - 1.0 / 3.0).abs() < 1e-6, "share {}", e.share);
    }
    assert_eq!(web.endpoints[0].chain, "KUBE-SEP-WEB0AAAAAAAAAAAA");
    assert_eq!(web.chain_hash.as_deref(), Some("WEBHASHAAAAAAAAA"));
    let dns = svc(&m, "kube-system", "kube-dns", "dns", "udp");
    assert_eq!(ips(dns), vec!["10.244.1.2:53", "10.244.2.2:53"]);
}

#[test]
fn v120_nodeport_and_external_ip() {
    let m = v120();
    let web = svc(&m, "default", "web", "http", "tcp");
    assert_eq!(web.node_ports, vec![30080]);
    // Three rules mention the external IP; it is one IP.
    assert_eq!(web.external_ips, vec!["192.168.50.200"]);
    assert!(!web.local_only);
}

#[test]
fn v120_client_ip_affinity_does_not_duplicate_endpoints() {
    let m = v120();
    let s = svc(&m, "default", "sticky", "", "tcp");
    assert_eq!(s.affinity_seconds, Some(10800));
    assert_eq!(ips(s), vec!["10.244.1.7:9000", "10.244.2.7:9000"]);
    let web = svc(&m, "default", "web", "http", "tcp");
    assert_eq!(web.affinity_seconds, None);
}

#[test]
fn v120_load_balancer_local_policy_xlb() {
    let m = v120();
    let lb = svc(&m, "default", "lb-local", "http", "tcp");
    assert!(lb.local_only, "KUBE-XLB means externalTrafficPolicy Local");
    assert_eq!(lb.lb_ips, vec!["203.0.113.10"]);
    assert_eq!(lb.lb_source_ranges, vec!["198.51.100.0/24"]);
    assert_eq!(lb.node_ports, vec![31080]);
    assert_eq!(ips(lb), vec!["10.244.1.9:8080", "10.244.2.9:8080"]);
    let local: Vec<_> = lb.local_endpoints.iter().map(|e| e.ip.as_str()).collect();
    assert_eq!(local, vec!["10.244.1.9"]);
}

#[test]
fn v120_masquerade() {
    let m = v120();
    assert_eq!(m.masquerade.masq_mark.as_deref(), Some("0x4000/0x4000"));
    assert_eq!(m.masquerade.drop_mark.as_deref(), Some("0x8000/0x8000"));
    assert!(m.masquerade.postrouting_masquerade);
    assert!(m.masquerade.random_fully);
    let web = svc(&m, "default", "web", "http", "tcp");
    assert_eq!(web.masquerade_unless_from.as_deref(), Some("10.244.0.0/16"));
    assert!(!web.masquerade_all);
}

#[test]
fn v120_reject_for_service_without_endpoints() {
    let m = v120();
    let e = svc(&m, "default", "empty", "http", "tcp");
    assert!(e.reject_no_endpoints);
    assert!(e.endpoints.is_empty());
    assert_eq!(e.cluster_ip.as_deref(), Some("10.96.100.40"));
    assert_eq!(e.port, Some(80));
    assert_eq!(e.node_ports, vec![30090]);
    assert_eq!(e.chain_hash, None);
    assert!(!svc(&m, "default", "web", "http", "tcp").reject_no_endpoints);
}

#[test]
fn v120_stale_chains_and_canaries_and_foreign() {
    let m = v120();
    assert_eq!(m.unreferenced_chains, vec!["KUBE-SEP-GONE0AAAAAAAAAAA", "KUBE-SVC-GONEHASHAAAAAAAA"]);
    assert_eq!(m.kube_proxy_canary, vec!["filter", "mangle", "nat"]);
    assert_eq!(m.kubelet_canary, vec!["filter", "mangle", "nat"]);
    let flannel = &m.foreign["flannel"];
    assert_eq!((flannel.chains, flannel.rules), (2, 5));
    assert!(m.warnings.is_empty());
    assert_eq!(m.generated_by.as_deref(), Some("iptables-save v1.8.9"));
}

// ---------- current kube-proxy ----------

#[test]
fn current_layout_and_nft_warning() {
    let m = current();
    assert_eq!(m.layout, ChainLayout::Current);
    assert_eq!(m.warnings, vec!["iptables-legacy tables present, use iptables-legacy-save to see them"]);
    assert_eq!(m.generated_by.as_deref(), Some("iptables-nft-save v1.8.9 (nf_tables)"));
    assert!(m.unreferenced_chains.is_empty(), "{:?}", m.unreferenced_chains);
}

#[test]
fn current_svl_ext_fw_and_firewall() {
    let m = current();
    let f = svc(&m, "shop", "front", "http", "tcp");
    assert!(f.local_only);
    assert_eq!(f.cluster_ip.as_deref(), Some("10.96.200.10"));
    assert_eq!(f.node_ports, vec![31000]);
    assert_eq!(f.health_check_node_port, Some(32100));
    assert_eq!(f.lb_ips, vec!["203.0.113.50"]);
    assert_eq!(f.lb_source_ranges, vec!["198.51.100.0/24"]);
    assert_eq!(f.affinity_seconds, Some(3600));
    assert_eq!(ips(f), vec!["192.168.1.10:8080", "192.168.2.10:8080", "192.168.3.10:8080"]);
    assert_eq!(f.local_endpoints.len(), 1);
    assert_eq!(f.local_endpoints[0].ip, "192.168.1.10");
    assert_eq!(f.masquerade_unless_from.as_deref(), Some("192.168.0.0/16"));
}

#[test]
fn current_local_policy_without_local_endpoints() {
    let m = current();
    let c = svc(&m, "shop", "cart", "http", "tcp");
    assert!(c.local_only);
    assert!(c.drop_no_local_endpoints);
    assert!(!c.reject_no_endpoints);
    assert!(c.local_endpoints.is_empty());
    assert_eq!(ips(c).len(), 2);
    assert_eq!(c.external_ips, vec!["192.168.60.200"]);
    assert_eq!(c.node_ports, vec![31500]);
}

#[test]
fn current_cluster_policy_ext_chain() {
    let m = current();
    let a = svc(&m, "shop", "api", "grpc", "tcp");
    assert!(!a.local_only, "cluster policy EXT chain masquerades and jumps to SVC");
    // The localhost nodeport rule and the plain one carry the same port.
    assert_eq!(a.node_ports, vec![30500]);
}

#[test]
fn current_internal_traffic_policy_local() {
    let m = current();
    let c = svc(&m, "shop", "cache", "redis", "tcp");
    assert!(c.internal_local);
    assert!(!c.local_only);
    assert_eq!(c.cluster_ip.as_deref(), Some("10.96.200.40"));
    assert!(c.endpoints.is_empty());
    assert_eq!(c.local_endpoints[0].ip, "192.168.1.40");
}

#[test]
fn current_no_endpoints_reject() {
    let m = current();
    let e = svc(&m, "shop", "empty", "grpc", "tcp");
    assert!(e.reject_no_endpoints);
    assert_eq!(e.cluster_ip.as_deref(), Some("10.96.200.60"));
    assert_eq!(e.port, Some(9090));
    assert_eq!(e.node_ports, vec![30900]);
}

#[test]
fn current_masquerade_mark() {
    let m = current();
    assert_eq!(m.masquerade.masq_mark.as_deref(), Some("0x4000/0x4000"));
    assert_eq!(m.masquerade.drop_mark, None);
    assert!(m.masquerade.random_fully);
}

#[test]
fn or_mark_as_written_by_kube_proxy_is_normalized() {
    // kube-proxy writes --or-mark; iptables-save prints --set-xmark v/v.
    let dump = "*nat\n:KUBE-MARK-MASQ - [0:0]\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\nCOMMIT\n";
    let m = parse_iptables_save("inline", dump).unwrap();
    assert_eq!(m.masquerade.masq_mark.as_deref(), Some("0x4000/0x4000"));
}

#[test]
fn current_calico_chains_are_counted_not_parsed() {
    let m = current();
    let cali = &m.foreign["calico"];
    assert_eq!(cali.chains, 8);
    assert_eq!(cali.rules, 9);
    assert!(m.kube.chains > 30);
    let nat = m.tables.iter().find(|t| t.name == "nat").unwrap();
    assert_eq!(nat.chains, 34);
}

#[test]
fn masquerade_all_and_unnamed_comment_forms() {
    let dump =
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n:KUBE-SEP-BBBB - [0:0]\n\
-A KUBE-SERVICES -d 10.96.0.5/32 -p tcp -m comment --comment \"a/b:c cluster IP\" -m tcp --dport 80 -j KUBE-SVC-AAAA\n\
-A KUBE-SVC-AAAA -d 10.96.0.5/32 -p tcp -m comment --comment \"a/b:c cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ\n\
-A KUBE-SVC-AAAA -m comment --comment \"a/b:c -> 10.0.0.9:80\" -j KUBE-SEP-BBBB\n\
-A KUBE-SEP-BBBB -p tcp -m comment --comment a/b:c -m tcp -j DNAT --to-destination 10.0.0.9:80\n\
COMMIT\n";
    let m = parse_iptables_save("inline", dump).unwrap();
    let s = svc(&m, "a", "b", "c", "tcp");
    assert!(s.masquerade_all);
    assert_eq!(ips(s), vec!["10.0.0.9:80"]);
    assert_eq!(m.layout, ChainLayout::Ambiguous);
}

#[test]
fn crlf_and_blank_lines_are_accepted() {
    let crlf = V120.replace('\n', "\r\n\r\n");
    let m = parse_iptables_save("crlf", &crlf).unwrap();
    assert_eq!(m.services.len(), v120().services.len());
}

#[test]
fn model_serializes_to_json() {
    let m = current();
    let j = serde_json::to_value(&m).unwrap();
    assert_eq!(j["layout"], "current");
    assert!(j["services"].as_array().unwrap().iter().any(|s| s["name"] == "front" && s["local_only"] == true));
    let back: RuleModel = serde_json::from_value(j).unwrap();
    assert_eq!(back, m);
}

#[test]
fn empty_input_is_an_empty_model() {
    let m = parse_iptables_save("empty", "").unwrap();
    assert!(m.services.is_empty());
    assert_eq!(m.layout, ChainLayout::None);
}

// ---------- errors ----------

fn err(input: &str) -> kubeshift_planner::iptables::ParseError {
    parse_iptables_save("node-a.txt", input).expect_err("should fail")
}

#[test]
fn error_rule_before_table() {
    let e = err("# hi\n-A KUBE-SERVICES -j ACCEPT\n");
    assert_eq!(e.line, 2);
    assert_eq!(e.to_string(), "node-a.txt:2: rule before any `*table` line");
}

#[test]
fn error_chain_before_table() {
    let e = err(":KUBE-SERVICES - [0:0]\n");
    assert_eq!((e.line, e.input.as_str()), (1, "node-a.txt"));
}

#[test]
fn error_undeclared_chain() {
    let e = err("*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SVC-X -j KUBE-SERVICES\nCOMMIT\n");
    assert_eq!(e.line, 3);
    assert!(
        e.to_string()
            .starts_with("node-a.txt:3: rule appended to chain KUBE-SVC-X, which is not declared in table nat"),
        "{e}"
    );
}

#[test]
fn error_jump_to_undeclared_kube_chain() {
    let e = err("*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-MISSING\nCOMMIT\n");
    assert_eq!(e.line, 3);
    assert!(e.to_string().contains("KUBE-SVC-MISSING"), "{e}");
}

#[test]
fn error_truncated_dump_names_the_open_table() {
    let cut: String = V120.lines().take(120).collect::<Vec<_>>().join("\n");
    let e = err(&cut);
    // The nat table opens at line 47 of the fixture and is never committed.
    let nat_line = V120.lines().position(|l| l == "*nat").unwrap() + 1;
    assert_eq!(e.line, nat_line);
    assert!(e.to_string().contains("table nat is not closed by COMMIT"), "{e}");
}

#[test]
fn error_table_opened_while_another_is_open() {
    let e = err("*filter\n:INPUT ACCEPT [0:0]\n*nat\nCOMMIT\n");
    assert_eq!(e.line, 3);
    assert!(e.to_string().contains("table filter (opened at line 1)"), "{e}");
}

#[test]
fn error_duplicate_table_and_chain() {
    let e = err("*nat\nCOMMIT\n*nat\nCOMMIT\n");
    assert_eq!(e.line, 3);
    let e = err("*nat\n:A - [0:0]\n:A - [0:0]\nCOMMIT\n");
    assert_eq!(e.line, 3);
    assert!(e.to_string().contains("declared twice"));
}

#[test]
fn error_commit_without_table() {
    let e = err("COMMIT\n");
    assert_eq!(e.line, 1);
}

#[test]
fn error_malformed_options_name_the_line() {
    let base = "*nat\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-B - [0:0]\n";
    let cases = [
        ("-A KUBE-SVC-A -m statistic --mode random --probability abc -j KUBE-SEP-B", "--probability"),
        ("-A KUBE-SVC-A -m recent --rcheck --seconds soon --reap --name KUBE-SEP-B -j KUBE-SEP-B", "--seconds"),
        ("-A KUBE-SEP-B -p tcp -m tcp -j DNAT --to-destination 10.0.0.1", "--to-destination"),
        ("-A KUBE-SEP-B -p tcp -m tcp --dport 99999 -j ACCEPT", "--dport"),
        ("-A KUBE-SEP-B -m comment --comment \"unterminated -j ACCEPT", "unterminated"),
        ("-A KUBE-SEP-B -j", "-j needs a value"),
    ];
    for (rule, what) in cases {
        let text = format!("{base}{rule}\nCOMMIT\n");
        let e = err(&text);
        assert_eq!(e.line, 4, "{rule}");
        assert!(matches!(e.kind, ParseErrorKind::Rule(_)), "{rule}: {e}");
        assert!(e.to_string().contains(what), "{rule}: {e}");
        assert!(e.to_string().starts_with("node-a.txt:4: malformed rule: "), "{e}");
    }
}

#[test]
fn error_unrecognised_line() {
    let e = err("*nat\nhello world\nCOMMIT\n");
    assert_eq!(e.line, 2);
    let e = err("*nat\n:A - [0:0]\n-I A -j ACCEPT\nCOMMIT\n");
    assert!(e.to_string().contains("-I"), "{e}");
}

#[test]
fn parse_file_reports_io_errors_with_the_path() {
    let e = kubeshift_planner::iptables::parse_iptables_save_file(std::path::Path::new("/nonexistent/dump.txt"))
        .unwrap_err();
    assert!(e.to_string().starts_with("/nonexistent/dump.txt:0: cannot read"), "{e}");
}

#[test]
fn interleaved_chains_keep_rule_order() {
    // iptables-save never interleaves chains, but an edited dump may: each
    // chain's rules must still be read in their own order.
    let dump = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n:KUBE-SEP-B1 - [0:0]\n:KUBE-SEP-B2 - [0:0]\n\
-A KUBE-SVC-AAAA -m comment --comment a/b:c -m statistic --mode random --probability 0.25 -j KUBE-SEP-B1\n\
-A KUBE-SEP-B1 -p tcp -m comment --comment a/b:c -m tcp -j DNAT --to-destination 10.0.0.1:80\n\
-A KUBE-SERVICES -d 10.96.0.5/32 -p tcp -m comment --comment \"a/b:c cluster IP\" -m tcp --dport 80 -j KUBE-SVC-AAAA\n\
-A KUBE-SVC-AAAA -m comment --comment a/b:c -j KUBE-SEP-B2\n\
-A KUBE-SEP-B2 -p tcp -m comment --comment a/b:c -m tcp -j DNAT --to-destination 10.0.0.2:80\n\
COMMIT\n";
    let m = parse_iptables_save("inline", dump).unwrap();
    let s = svc(&m, "a", "b", "c", "tcp");
    assert_eq!(ips(s), vec!["10.0.0.1:80", "10.0.0.2:80"]);
    assert_eq!(s.endpoints[0].probability, 0.25);
    assert!((s.endpoints[1].share - 0.75).abs() < 1e-9);
    assert_eq!(s.cluster_ip.as_deref(), Some("10.96.0.5"));
}

#[test]
fn synthetic_benchmark_dump_parses_with_expected_shape() {
    let dump = kubeshift_planner::iptables::synth::synthetic_dump(20_000);
    let m = parse_iptables_save("synthetic", &dump).unwrap();
    assert!(dump.lines().count() >= 20_000);
    assert_eq!(m.layout, ChainLayout::Current);
    assert!(m.unreferenced_chains.is_empty());
    let no_ep = m.services.iter().filter(|s| s.reject_no_endpoints).count();
    let with_ep = m.services.iter().filter(|s| !s.endpoints.is_empty()).count();
    assert_eq!(no_ep + with_ep, m.services.len());
    assert!(m.services.iter().any(|s| s.affinity_seconds == Some(10800)));
    for s in m.services.iter().filter(|s| !s.endpoints.is_empty()) {
        let total: f64 = s.endpoints.iter().map(|e| e.share).sum();
        assert!((total - 1.0).abs() < 1e-6, "{}: shares sum to {total}", s.display_name());
    }
}
