//! The executor against the real tools and kernel: each test loads real
//! kube-proxy dumps into its own network namespace (never the host's rules),
//! adds other owners' chains, runs the cleanup, and checks with
//! iptables-save / nft what is left. Needs root.

use kubeshift_node_migrator::cleanup::{
    plan_iptables, run_cleanup, Backend, CleanupError, CleanupOptions, ConntrackSource, Family, KubeletChains, Netns,
    Report, RuleSource,
};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

const V120: &str = include_str!("../../planner/tests/fixtures/kube-proxy-1.20-flannel.txt");
const CALICO_NFT: &str = include_str!("../../planner/tests/fixtures/kube-proxy-current-calico-nft.txt");
const UPSTREAM: &str = include_str!("fixtures/kube-proxy-1.3x-upstream-cleanup-test.txt");

/// Other owners' chains for dumps that have none: flannel's, and a custom
/// chain that jumps into kube-proxy's KUBE-SERVICES (a foreign reference the
/// cleanup must delete by spec).
const FOREIGN: &str = "*filter
:FLANNEL-FWD - [0:0]
:CUSTOM-PORTALS - [0:0]
-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT
-A INPUT -j CUSTOM-PORTALS
-A CUSTOM-PORTALS -d 10.96.0.0/12 -m comment --comment \"hand-made shortcut\" -j KUBE-SERVICES
-A CUSTOM-PORTALS -j RETURN
COMMIT
*nat
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully
COMMIT
";

/// A namespace owned by one test, deleted on drop (also when the test
/// panics). Failing to delete it is a test failure unless the test already
/// failed.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new() -> TestNetns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ks-clean-{}-{n}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("ip netns add");
        assert!(out.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
        // Only now does the guard exist: a failed add must not delete a
        // namespace someone else owns.
        TestNetns { name }
    }

    fn netns(&self) -> Netns {
        Netns::named(&self.name)
    }

    /// Runs `args` inside the namespace with `input` on stdin; returns stdout.
    fn exec(&self, args: &[&str], input: &str) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec");
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "`{}` in {} failed: {}\n--- input ---\n{input}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let out = Command::new("ip").args(["netns", "del", &self.name]).output();
        let ok = matches!(&out, Ok(o) if o.status.success());
        if !ok && !std::thread::panicking() {
            panic!("could not delete test namespace {}: {out:?}", self.name);
        }
    }
}

fn tool(backend: Backend, suffix: &str) -> String {
    format!("iptables-{backend}-{suffix}")
}

/// Calico's ipset matches and kube-proxy's nfacct counters need kernel
/// objects a fresh namespace does not have (as in the planner's tests).
fn restorable(dump: &str) -> String {
    dump.lines().filter(|l| !l.contains("--match-set") && !l.contains("nfacct")).map(|l| format!("{l}\n")).collect()
}

/// The `:NAME` and `-A NAME` lines of the chains that must survive, exactly
/// as iptables-save prints them (declaration counters cut off).
fn lines_of(save: &str, keep: &dyn Fn(&str) -> bool) -> Vec<String> {
    save.lines()
        .filter_map(|l| {
            let chain = l.strip_prefix("-A ").or_else(|| l.strip_prefix(':'))?.split(' ').next()?;
            keep(chain).then(|| if l.starts_with(':') { format!(":{chain}") } else { l.to_string() })
        })
        .collect()
}

fn survivor(chain: &str) -> bool {
    chain.starts_with("FLANNEL-")
        || chain.starts_with("cali-")
        || matches!(chain, "KUBE-FIREWALL" | "KUBE-KUBELET-CANARY" | "KUBE-IPTABLES-HINT")
}

fn only(backend: Backend) -> CleanupOptions {
    CleanupOptions { backends: vec![backend], ..Default::default() }
}

/// Loads `dumps` with `backend`'s restore, runs the cleanup twice and checks
/// both runs. Returns the first run's report.
fn clean_and_check(backend: Backend, dumps: &[&str], opts: &CleanupOptions) -> Report {
    let ns = TestNetns::new();
    for d in dumps {
        ns.exec(&[&tool(backend, "restore"), "--noflush"], d);
    }
    let before = ns.exec(&[&tool(backend, "save")], "");
    let first = run_cleanup(&ns.netns(), opts).unwrap_or_else(|e| panic!("{e}"));
    let after = ns.exec(&[&tool(backend, "save")], "");

    let left = plan_iptables(backend, Family::Ipv4, "after", &after, KubeletChains::HintOnly).unwrap();
    let left_chains: Vec<&String> = left.tables.iter().flat_map(|t| &t.chains_removed).collect();
    let allowed_marks = ["KUBE-MARK-DROP", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"];
    assert!(
        left_chains.iter().all(|c| first.iptables[0].kubelet_owns_mark_chains && allowed_marks.contains(&c.as_str())),
        "kube-proxy chains left: {left_chains:?}\n{after}"
    );
    for gone in ["KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-NODEPORTS", "KUBE-PROXY-CANARY", "KUBE-FORWARD"] {
        assert!(!after.contains(gone), "{gone} still in\n{after}");
    }
    let kept = lines_of(&before, &survivor);
    assert!(kept.iter().any(|l| l.starts_with("-A KUBE-FIREWALL")), "fixture lacks kubelet's rules: {kept:?}");
    assert!(kept.iter().any(|l| l.starts_with("-A FLANNEL-") || l.starts_with("-A cali-")), "{kept:?}");
    assert_eq!(kept, lines_of(&after, &survivor), "kept chains changed");
    assert!(first.chains_removed() > 0);

    let second = run_cleanup(&ns.netns(), opts).unwrap_or_else(|e| panic!("second run: {e}"));
    assert!(second.removed_nothing(), "second run removed something: {second:#?}");
    assert_eq!(
        ns.exec(&[&tool(backend, "save")], "").lines().filter(|l| !l.starts_with('#')).count(),
        after.lines().filter(|l| !l.starts_with('#')).count()
    );
    first
}

#[test]
fn kube_proxy_120_flannel_legacy() {
    let r = clean_and_check(Backend::Legacy, &[V120], &only(Backend::Legacy));
    assert!(r.iptables[0].kubelet_owns_mark_chains);
    // The ClusterIPs were flushed (nothing to delete in a fresh namespace).
    assert_eq!(r.conntrack.len(), 6);
    assert!(r.conntrack.iter().all(|c| c.deleted == 0));
}

#[test]
fn kube_proxy_120_flannel_nft() {
    clean_and_check(Backend::Nft, &[V120], &only(Backend::Nft));
}

#[test]
fn kube_proxy_upstream_legacy_with_foreign_reference() {
    let r = clean_and_check(Backend::Legacy, &[UPSTREAM, FOREIGN], &only(Backend::Legacy));
    let filter = r.iptables[0].tables.iter().find(|t| t.table == "filter").unwrap();
    let foreign: Vec<_> = filter.jumps_removed.iter().filter(|j| j.source == RuleSource::Foreign).collect();
    assert_eq!(foreign.len(), 1, "{foreign:?}");
    assert_eq!(foreign[0].chain, "CUSTOM-PORTALS");
}

#[test]
fn kube_proxy_upstream_nft_with_foreign_reference() {
    clean_and_check(Backend::Nft, &[UPSTREAM, FOREIGN], &only(Backend::Nft));
}

#[test]
fn kube_proxy_current_calico_nft() {
    let r = clean_and_check(Backend::Nft, &[&restorable(CALICO_NFT)], &only(Backend::Nft));
    assert!(!r.iptables[0].kubelet_owns_mark_chains);
}

/// Both backends and both families in one run, with rules in each backend:
/// the default options read all four.
#[test]
fn both_backends_in_one_run() {
    let ns = TestNetns::new();
    ns.exec(&["iptables-legacy-restore", "--noflush"], V120);
    ns.exec(&["iptables-nft-restore", "--noflush"], UPSTREAM);
    let opts = CleanupOptions { conntrack: ConntrackSource::Skip, ..Default::default() };
    let r = run_cleanup(&ns.netns(), &opts).unwrap_or_else(|e| panic!("{e}"));
    let removed: Vec<(Backend, Family, usize)> =
        r.iptables.iter().map(|p| (p.backend, p.family, p.chains_removed())).collect();
    assert_eq!(removed.len(), 4);
    assert!(removed.iter().all(|(_, f, n)| (*f == Family::Ipv4) == (*n > 0)), "{removed:?}");
    assert!(r.conntrack.is_empty());
    assert!(run_cleanup(&ns.netns(), &opts).unwrap().removed_nothing());
}

#[test]
fn nftables_mode_tables_go_others_stay() {
    let ns = TestNetns::new();
    ns.exec(
        &["nft", "-f", "-"],
        "table ip kube-proxy {
  set cluster-ips {
    type ipv4_addr
    elements = { 10.96.0.1, 10.96.0.10 }
  }
  chain services {
    ip daddr 10.96.0.10 udp dport 53 counter
  }
  chain nat-prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }
}
table ip6 kube-proxy {
  chain services {
  }
}
table inet keep-me {
  chain input {
    type filter hook input priority 0; policy accept;
    counter
  }
}
",
    );
    let keep_before = ns.exec(&["nft", "list", "table", "inet", "keep-me"], "");
    let opts = CleanupOptions::default();
    let r = run_cleanup(&ns.netns(), &opts).unwrap_or_else(|e| panic!("{e}"));
    let flushed: Vec<String> = r.conntrack.iter().map(|c| c.address.to_string()).collect();
    assert_eq!(flushed, ["10.96.0.1", "10.96.0.10"], "the cluster-ips set is read before the table goes");
    let removed: Vec<String> = r.nftables_removed.iter().map(|t| format!("{} {}", t.family, t.name)).collect();
    assert_eq!(removed, ["ip kube-proxy", "ip6 kube-proxy"]);
    let tables = ns.exec(&["nft", "list", "tables"], "");
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert_eq!(ns.exec(&["nft", "list", "table", "inet", "keep-me"], ""), keep_before);
    let again = run_cleanup(&ns.netns(), &opts).unwrap();
    assert!(again.removed_nothing(), "{again:#?}");
}

#[test]
fn given_conntrack_addresses_are_flushed_per_family() {
    let ns = TestNetns::new();
    let opts = CleanupOptions {
        conntrack: ConntrackSource::Given(vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()]),
        ..Default::default()
    };
    let r = run_cleanup(&ns.netns(), &opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.conntrack.len(), 2);
}

#[test]
fn a_missing_namespace_is_a_typed_error() {
    let err = run_cleanup(&Netns::named("ks-clean-does-not-exist"), &CleanupOptions::default()).unwrap_err();
    assert!(matches!(err, CleanupError::OpenNetns { .. }), "{err}");
}

/// A namespace file of another kind: setns(CLONE_NEWNET) refuses it, so the
/// command never runs at all, let alone in this process's own namespace.
#[test]
fn a_file_that_is_no_network_namespace_runs_nothing() {
    let err = run_cleanup(&Netns::at("/proc/self/ns/uts"), &CleanupOptions::default()).unwrap_err();
    assert!(matches!(err, CleanupError::Spawn { .. }), "{err}");
    assert!(err.to_string().contains("iptables-legacy-save"), "{err}");
}

/// ip6tables: hand-written in kube-proxy's current IPv6 rule shapes (no v6
/// capture exists in the project); exercises the ip6tables binaries and the
/// `-f ipv6` conntrack flush.
const V6: &str = "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-V6DNS0AAAAAAAAAA - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-V6DNSHASHAAAAAAA - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE
-A KUBE-SEP-V6DNS0AAAAAAAAAA -s fd00:10:244:1::2/128 -m comment --comment \"kube-system/kube-dns:dns\" -j KUBE-MARK-MASQ
-A KUBE-SEP-V6DNS0AAAAAAAAAA -p udp -m comment --comment \"kube-system/kube-dns:dns\" -m udp -j DNAT --to-destination [fd00:10:244:1::2]:53
-A KUBE-SERVICES -d fd00:10:96::a/128 -p udp -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp --dport 53 -j KUBE-SVC-V6DNSHASHAAAAAAA
-A KUBE-SVC-V6DNSHASHAAAAAAA ! -s fd00:10:244::/56 -d fd00:10:96::a/128 -p udp -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp --dport 53 -j KUBE-MARK-MASQ
-A KUBE-SVC-V6DNSHASHAAAAAAA -m comment --comment \"kube-system/kube-dns:dns -> [fd00:10:244:1::2]:53\" -j KUBE-SEP-V6DNS0AAAAAAAAAA
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL -m comment --comment \"kubelet placeholder\" -j RETURN
COMMIT
";

#[test]
fn ipv6_rules_through_both_backends() {
    for backend in Backend::ALL {
        let ns = TestNetns::new();
        let restore = format!("ip6tables-{backend}-restore");
        ns.exec(&[&restore, "--noflush"], V6);
        let opts = CleanupOptions { backends: vec![backend], families: vec![Family::Ipv6], ..Default::default() };
        let r = run_cleanup(&ns.netns(), &opts).unwrap_or_else(|e| panic!("{backend}: {e}"));
        assert_eq!(r.iptables[0].family, Family::Ipv6);
        assert_eq!(r.chains_removed(), 6, "{backend}: {:#?}", r.iptables);
        let flushed: Vec<String> = r.conntrack.iter().map(|c| c.address.to_string()).collect();
        assert_eq!(flushed, ["fd00:10:96::a"]);
        let after = ns.exec(&[&format!("ip6tables-{backend}-save")], "");
        assert!(!after.contains("KUBE-SERVICES") && !after.contains("KUBE-PROXY-FIREWALL"), "{after}");
        assert!(after.contains("-A INPUT -j KUBE-FIREWALL") && after.contains(":KUBE-KUBELET-CANARY"), "{after}");
        assert!(run_cleanup(&ns.netns(), &opts).unwrap().removed_nothing());
    }
}
