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
