//! `collect()` for real, inside a network namespace this test creates. Needs
//! root (as the lab does). Only the test's own namespace is changed: the
//! interface and the iptables rules are added with `ip netns exec`.

use kubeshift_planner::node_report::{collect_in_netns, CollectOptions, IptablesBackend, NodeReport};
use std::process::Command;

mod common;
use common::Netns;

trait Populate {
    fn populate(&self);
    fn opts(&self) -> CollectOptions;
}

impl Populate for Netns {
    /// A veth pair, an address and kube-proxy-shaped rules, all inside.
    fn populate(&self) {
        self.exec(&["ip", "link", "set", "lo", "up"]);
        // A veth pair with both ends inside (this kernel has no dummy driver).
        self.exec(&["ip", "link", "add", "ksdummy0", "type", "veth", "peer", "name", "ksdummy1"]);
        self.exec(&["ip", "addr", "add", "10.123.0.1/24", "dev", "ksdummy0"]);
        self.exec(&["ip", "link", "set", "ksdummy0", "up"]);
        for rule in [
            "-t nat -N KUBE-SERVICES",
            "-t nat -N KUBE-SVC-KSPLANTESTAAAAAA",
            "-t nat -N KUBE-SEP-KSPLANTESTEP0AAA",
            "-t nat -A OUTPUT -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
            "-t nat -A KUBE-SEP-KSPLANTESTEP0AAA -p tcp -m comment --comment test/echo:http -m tcp -j DNAT --to-destination 10.123.0.5:8080",
            "-t nat -A KUBE-SVC-KSPLANTESTAAAAAA -m comment --comment test/echo:http -j KUBE-SEP-KSPLANTESTEP0AAA",
            "-t nat -A KUBE-SERVICES -d 10.96.50.50/32 -p tcp -m comment --comment test/echo:http -m tcp --dport 80 -j KUBE-SVC-KSPLANTESTAAAAAA",
        ] {
            let mut a = vec!["iptables"];
            a.extend(rule.split(' '));
            self.exec(&a);
        }
        std::fs::write(
            self.tmp.join("10-bridge.conflist"),
            r#"{"cniVersion":"0.4.0","name":"lab","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap"}]}"#,
        )
        .unwrap();
    }

    fn opts(&self) -> CollectOptions {
        CollectOptions { node_name: Some("node-test".into()), cni_conf_dir: self.tmp.clone(), ..Default::default() }
    }
}

fn check(r: &NodeReport) {
    assert_eq!(r.node_name.as_deref(), Some("node-test"));
    let save = r.iptables.save.as_deref().expect("iptables-save output");
    assert!(save.contains("-A KUBE-SVC-KSPLANTESTAAAAAA"), "{save}");
    assert_eq!(r.iptables.parse_error, None);
    let rules = r.iptables.rules.as_ref().unwrap();
    assert_eq!(rules.services, 1);
    assert_eq!(rules.endpoints, 1);
    assert_ne!(r.iptables.backend, IptablesBackend::Unknown, "{}", r.iptables.version);
    let dummy = r.interfaces.iter().find(|i| i.ifname == "ksdummy0").expect("interface from inside the netns");
    assert_eq!(dummy.kind.as_deref(), Some("veth"));
    assert!(dummy.addresses.iter().any(|a| a.local == "10.123.0.1" && a.prefixlen == 24));
    // Only lo and the veth pair: proof that the host's interfaces were not read.
    assert_eq!(r.interfaces.len(), 3, "{:?}", r.interfaces.iter().map(|i| &i.ifname).collect::<Vec<_>>());
    assert!(r.routes.iter().any(|rt| rt.dst == "10.123.0.0/24" && rt.dev.as_deref() == Some("ksdummy0")));
    assert_eq!(r.cni.files.len(), 1);
    assert_eq!(r.cni.files[0].plugin_types.as_deref(), Some(&["bridge".to_string(), "portmap".to_string()][..]));
    assert!(r.kernel.major > 0);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

fn host_has_test_rules() -> bool {
    let out = Command::new("iptables-save").output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("KSPLANTEST")
}

#[test]
fn collect_inside_a_netns_via_setns() {
    let ns = Netns::new("setns");
    ns.populate();
    // A legacy-backend table beside the nft one, as on a node where two
    // components disagree on the backend: the report must flag it.
    ns.exec(&["iptables-legacy", "-t", "mangle", "-N", "KSPLAN-LEGACY"]);
    let r = collect_in_netns(&ns.name, &ns.opts()).expect("collect");
    check(&r);
    assert_eq!(r.iptables.backend, IptablesBackend::Nft, "this machine's default iptables is nft");
    assert!(r.iptables.legacy_tables_present, "{:?}", r.iptables.save_warnings);
    // On this machine BTF and cgroup v2 exist; the report must see them.
    assert!(r.btf.present);
    assert!(r.cgroup.v2_mounted, "{:?}", r.cgroup);
    assert!(!host_has_test_rules(), "test rules leaked into the host namespace");
    let json = serde_json::to_string(&r).unwrap();
    let back = NodeReport::from_json(&json, "report.json").unwrap();
    assert_eq!(back, r);
}

/// The way the lab runs it: `ip netns exec NODE kubeshift node report`. The
/// test binary re-runs itself under `ip netns exec` (a fresh mount namespace
/// with its own /sys) and the child writes the report as JSON.
#[test]
fn collect_under_ip_netns_exec() {
    if let Ok(out) = std::env::var("KUBESHIFT_TEST_REPORT_OUT") {
        // Child side.
        let cni = std::env::var("KUBESHIFT_TEST_CNI_DIR").unwrap();
        let opts =
            CollectOptions { node_name: Some("node-test".into()), cni_conf_dir: cni.into(), ..Default::default() };
        let r = kubeshift_planner::node_report::collect(&opts);
        std::fs::write(out, serde_json::to_string(&r).unwrap()).unwrap();
        return;
    }
    let ns = Netns::new("exec");
    ns.populate();
    let out = ns.tmp.join("report.json");
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&exe)
        .args(["--exact", "collect_under_ip_netns_exec", "--test-threads=1"])
        .env("KUBESHIFT_TEST_REPORT_OUT", &out)
        .env("KUBESHIFT_TEST_CNI_DIR", &ns.tmp)
        .output()
        .unwrap();
    // Captured, not inherited: the child's own "test result" line would
    // otherwise be mistaken for this binary's summary.
    assert!(
        status.status.success(),
        "child failed: {}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    let text = std::fs::read_to_string(&out).expect("child wrote the report");
    let r = NodeReport::from_json(&text, "report.json").unwrap();
    check(&r);
    // `ip netns exec` remounts /sys, hiding /sys/fs/cgroup/unified: the report
    // must still find cgroup v2 (through PID 1's mounts).
    assert!(r.cgroup.v2_mounted, "{:?}", r.cgroup);
}

#[test]
fn bad_report_json_names_the_place() {
    let e = NodeReport::from_json("{\n \"report_version\": \"x\"\n}", "n1.json").unwrap_err();
    assert!(e.starts_with("n1.json:2:"), "{e}");
    let e = NodeReport::from_json(
        &serde_json::to_string(&NodeReport { report_version: 99, ..Default::default() }).unwrap(),
        "n1.json",
    )
    .unwrap_err();
    assert!(e.contains("newer"), "{e}");
}

/// kube-proxy's IPv6 proxier writes ip6tables: the report collects it, and an
/// IPv6 service is diffed against those rules, not reported as unsynced. The
/// rules follow the shape of kube-proxy's ClusterIP rules (as in its proxier
/// tests' expected output) with IPv6 addresses; loaded with ip6tables-restore
/// inside the test's namespace and read back with the real ip6tables-save.
#[test]
fn ip6tables_rules_are_collected_and_diffed() {
    use kubeshift_planner::analysis::analyze;
    use kubeshift_planner::api::{ApiEndpoint, ApiEndpointPort, ApiService, ApiServicePort};
    use kubeshift_planner::inventory::{Inventory, NodeInfo};

    let ns = Netns::new("ip6");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let rules = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-KSPLANV6AAAAAAAA - [0:0]
:KUBE-SEP-KSPLANV6EP0AAAAA - [0:0]
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns6/web:http cluster IP" -m tcp -p tcp -d fd00:10:96::a --dport 80 -j KUBE-SVC-KSPLANV6AAAAAAAA
-A KUBE-SVC-KSPLANV6AAAAAAAA -m comment --comment "ns6/web:http -> [fd00:10:244::5]:8080" -j KUBE-SEP-KSPLANV6EP0AAAAA
-A KUBE-SEP-KSPLANV6EP0AAAAA -m comment --comment ns6/web:http -s fd00:10:244::5 -j KUBE-MARK-MASQ
-A KUBE-SEP-KSPLANV6EP0AAAAA -m comment --comment ns6/web:http -m tcp -p tcp -j DNAT --to-destination [fd00:10:244::5]:8080
COMMIT
"#;
    ns.exec_stdin(&["ip6tables-restore", "--noflush"], rules);
    let r = collect_in_netns(&ns.name, &CollectOptions { node_name: Some("node-test".into()), ..ns.opts() }).unwrap();
    let v6 = r.ip6tables.as_ref().expect("ip6tables collected");
    assert!(v6.save.as_deref().unwrap().contains("KUBE-SVC-KSPLANV6AAAAAAAA"), "{:?}", v6.save);
    assert_eq!(v6.rules.as_ref().unwrap().services, 1);
    let model = r.rule_model_v6().unwrap().unwrap();
    let s = model.service("ns6", "web", "http", "tcp").unwrap();
    assert_eq!(s.cluster_ip.as_deref(), Some("fd00:10:96::a"));
    assert_eq!(s.endpoints[0].ip, "fd00:10:244::5");

    let mut inv = Inventory::default();
    inv.nodes.push(NodeInfo { name: "node-test".into(), kernel_version: "6.1.0".into(), ..Default::default() });
    let web = |ready_ip: &str| ApiService {
        namespace: "ns6".into(),
        name: "web".into(),
        cluster_ip: Some("fd00:10:96::a".into()),
        cluster_ips: vec!["fd00:10:96::a".into()],
        ports: vec![ApiServicePort { name: "http".into(), port: 80, protocol: "TCP".into(), node_port: None }],
        endpoints: vec![ApiEndpoint {
            ip: ready_ip.into(),
            node_name: Some("node-test".into()),
            ready: true,
            ports: vec![ApiEndpointPort { name: "http".into(), port: 8080, protocol: "TCP".into() }],
            ..Default::default()
        }],
        ..Default::default()
    };
    inv.services.services.push(web("fd00:10:244::5"));
    let a = analyze(&inv, std::slice::from_ref(&r), None);
    assert_eq!(a.rule_diffs.len(), 2, "one diff per family");
    for d in &a.rule_diffs {
        assert!(d.is_clean(), "{}: {:?}", d.input, d.findings);
    }
    assert!(a.rule_diffs[1].input.ends_with(":ip6tables-save"));

    // A real difference in the IPv6 rules is found in the IPv6 diff.
    inv.services.services[0] = web("fd00:10:244::9");
    let a = analyze(&inv, &[r], None);
    assert!(a.rule_diffs[0].is_clean());
    let f = &a.rule_diffs[1].findings;
    assert!(
        f.iter().any(|f| f.reason.contains("ready in the API but not in the rules: [fd00:10:244::9]:8080")),
        "{f:?}"
    );
}
