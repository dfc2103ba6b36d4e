//! Planning on real kube-proxy dumps, no kernel involved: what goes, what
//! stays, and the exact restore input.

use kubeshift_node_migrator::cleanup::{
    plan_conntrack, plan_iptables, plan_ipvs, Backend, ConntrackScope, Family, IptablesPlan, IpvsInputs, IpvsStep,
    KubeletChains, Owner, Report, RuleSource, TableReport,
};
use kubeshift_planner::iptables::save_rules::{parse_saved_rules, SavedRuleset};

const V120: &str = include_str!("../../planner/tests/fixtures/kube-proxy-1.20-flannel.txt");
const CALICO_NFT: &str = include_str!("../../planner/tests/fixtures/kube-proxy-current-calico-nft.txt");
const UPSTREAM: &str = include_str!("fixtures/kube-proxy-1.3x-upstream-cleanup-test.txt");
const IPVS_IPTABLES: &str = include_str!("fixtures/ipvs-upstream-readme/iptables-save.txt");
const IPVS_SAVE: &str = include_str!("fixtures/ipvs-upstream-readme/ipvsadm-Sn.txt");
const IPSET_SAVE: &str = include_str!("fixtures/ipvs-upstream-readme/ipset-save.txt");

fn plan(dump: &str, kubelet: KubeletChains) -> IptablesPlan {
    plan_iptables(Backend::Legacy, Family::Ipv4, "fixture", dump, kubelet).unwrap()
}

fn table<'p>(p: &'p IptablesPlan, name: &str) -> &'p TableReport {
    p.tables.iter().find(|t| t.table == name).unwrap_or_else(|| panic!("no {name} in plan"))
}

fn kept(t: &TableReport) -> Vec<(&str, Owner)> {
    t.kept.iter().map(|k| (k.chain.as_str(), k.owner)).collect()
}

fn jumps(t: &TableReport) -> Vec<(&str, &str)> {
    t.jumps_removed.iter().map(|j| (j.chain.as_str(), j.target.as_str())).collect()
}

fn applied(p: &IptablesPlan, dump: &str) -> SavedRuleset {
    p.apply_to(&parse_saved_rules("fixture", dump).unwrap())
}

fn chain_names(rs: &SavedRuleset, table: &str) -> Vec<String> {
    let mut v: Vec<String> = rs.table(table).unwrap().chains.iter().map(|c| c.name.clone()).collect();
    v.sort();
    v
}

fn specs(rs: &SavedRuleset, table: &str, chain: &str) -> Vec<String> {
    rs.table(table).unwrap().chain(chain).unwrap().rules.iter().map(|r| r.spec.clone()).collect()
}

#[test]
fn kube_proxy_120_keeps_kubelets_mark_chains_and_flannel() {
    let p = plan(V120, KubeletChains::Detect);
    assert!(p.kubelet_owns_mark_chains, "1.20 kubelet's KUBE-FIREWALL drop-mark rule must be detected");

    let filter = table(&p, "filter");
    assert_eq!(filter.chains_removed, ["KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-CANARY", "KUBE-SERVICES"]);
    assert_eq!(
        jumps(filter),
        [
            ("INPUT", "KUBE-SERVICES"),
            ("INPUT", "KUBE-EXTERNAL-SERVICES"),
            ("FORWARD", "KUBE-FORWARD"),
            ("FORWARD", "KUBE-SERVICES"),
            ("OUTPUT", "KUBE-SERVICES")
        ]
    );
    assert!(filter.jumps_removed.iter().all(|j| j.source == RuleSource::Builtin));
    assert_eq!(kept(filter), [("KUBE-FIREWALL", Owner::Kubelet), ("KUBE-KUBELET-CANARY", Owner::Kubelet)]);
    // 1 + 4 + 0 + 1 rules in the four chains, plus 5 jumps.
    assert_eq!(filter.rules_removed, 6 + 5);

    let nat = table(&p, "nat");
    assert_eq!(jumps(nat), [("PREROUTING", "KUBE-SERVICES"), ("OUTPUT", "KUBE-SERVICES")]);
    // KUBE-FW, NODEPORTS, PROXY-CANARY, SERVICES, XLB, 7 KUBE-SVC, 13 KUBE-SEP.
    assert_eq!(nat.chains_removed.len(), 25);
    assert!(nat.chains_removed.iter().any(|c| c == "KUBE-XLB-LBLOCAL4HASHAAAA"));
    assert!(nat.chains_removed.iter().any(|c| c == "KUBE-FW-LBLOCAL4HASHAAAA"));
    assert_eq!(
        kept(nat),
        [
            ("KUBE-KUBELET-CANARY", Owner::Kubelet),
            ("KUBE-MARK-DROP", Owner::Kubelet),
            ("KUBE-MARK-MASQ", Owner::Kubelet),
            ("KUBE-POSTROUTING", Owner::Kubelet)
        ]
    );
    assert_eq!(table(&p, "mangle").chains_removed, ["KUBE-PROXY-CANARY"]);

    let after = applied(&p, V120);
    assert_eq!(
        specs(&after, "nat", "POSTROUTING"),
        [
            "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "-m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"
        ]
    );
    assert_eq!(specs(&after, "filter", "FLANNEL-FWD").len(), 2);
    assert_eq!(specs(&after, "filter", "INPUT"), ["-j KUBE-FIREWALL"]);

    let input = p.restore_input();
    let filter_part: Vec<&str> = input.lines().skip_while(|l| *l != "*filter").take_while(|l| *l != "COMMIT").collect();
    assert_eq!(
        filter_part,
        [
            "*filter",
            "-D INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-D INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
            "-D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "-D FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-D OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-F KUBE-EXTERNAL-SERVICES",
            "-F KUBE-FORWARD",
            "-F KUBE-PROXY-CANARY",
            "-F KUBE-SERVICES",
            "-X KUBE-EXTERNAL-SERVICES",
            "-X KUBE-FORWARD",
            "-X KUBE-PROXY-CANARY",
            "-X KUBE-SERVICES",
        ]
    );
}

#[test]
fn kubelet_version_decides_over_the_dump() {
    let p = plan(V120, KubeletChains::from_kubelet_version("v1.30.2"));
    assert!(!p.kubelet_owns_mark_chains);
    let nat = table(&p, "nat");
    for c in ["KUBE-MARK-DROP", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"] {
        assert!(nat.chains_removed.iter().any(|r| r == c), "{c} must go when kubelet does not own it");
    }
    assert!(jumps(nat).contains(&("POSTROUTING", "KUBE-POSTROUTING")));
    // KUBE-FIREWALL stays whatever the version: it is kubelet's in every release.
    assert_eq!(kept(table(&p, "filter"))[0], ("KUBE-FIREWALL", Owner::Kubelet));
}

#[test]
fn kube_proxy_current_on_calico_leaves_calico_alone() {
    let p = plan(CALICO_NFT, KubeletChains::Detect);
    assert!(!p.kubelet_owns_mark_chains, "current kubelet's KUBE-FIREWALL has only the localnet rule");
    for t in &p.tables {
        assert!(t.chains_removed.iter().all(|c| c.starts_with("KUBE-")), "{:?}", t.chains_removed);
        assert!(t.jumps_removed.iter().all(|j| !j.chain.starts_with("cali-")), "{:?}", t.jumps_removed);
    }
    let filter = table(&p, "filter");
    assert!(filter.chains_removed.iter().any(|c| c == "KUBE-PROXY-FIREWALL"));
    let nat = table(&p, "nat");
    assert!(
        nat.chains_removed.iter().any(|c| c.starts_with("KUBE-SVL-"))
            || nat.chains_removed.iter().any(|c| c.starts_with("KUBE-EXT-"))
    );
    assert!(nat.chains_removed.iter().any(|c| c == "KUBE-MARK-MASQ"));
    assert!(nat.chains_removed.iter().any(|c| c == "KUBE-POSTROUTING"));

    let before = parse_saved_rules("fixture", CALICO_NFT).unwrap();
    let after = p.apply_to(&before);
    for t in &before.tables {
        for c in t.chains.iter().filter(|c| c.name.starts_with("cali-")) {
            assert_eq!(after.table(&t.name).unwrap().chain(&c.name), Some(c), "{} changed", c.name);
        }
    }
    let left = plan_iptables(Backend::Nft, Family::Ipv4, "after", &render(&after), KubeletChains::HintOnly).unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// Upstream's own expected result for its TestCleanupLeftovers input.
#[test]
fn upstream_cleanup_test_expected_state() {
    let p = plan(UPSTREAM, KubeletChains::Detect);
    assert!(!p.kubelet_owns_mark_chains);
    let after = applied(&p, UPSTREAM);
    assert_eq!(chain_names(&after, "filter"), ["FORWARD", "INPUT", "KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "OUTPUT"]);
    assert_eq!(chain_names(&after, "nat"), ["INPUT", "KUBE-KUBELET-CANARY", "OUTPUT", "POSTROUTING", "PREROUTING"]);
    assert_eq!(
        chain_names(&after, "mangle"),
        ["FORWARD", "INPUT", "KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY", "OUTPUT", "POSTROUTING", "PREROUTING"]
    );
    assert_eq!(
        specs(&after, "filter", "INPUT"),
        ["-j KUBE-FIREWALL", "-s 1.2.3.4/32 -m comment --comment \"someone else\\'s input rule\" -j DROP"]
    );
    assert_eq!(
        specs(&after, "filter", "FORWARD"),
        ["-s 1.2.3.4/32 -m comment --comment \"someone else\\'s forward rule\" -j DROP"]
    );
    assert_eq!(
        specs(&after, "filter", "OUTPUT"),
        ["-j KUBE-FIREWALL", "-s 1.2.3.4/32 -m comment --comment \"someone else\\'s output rule\" -j DROP"]
    );
    for chain in ["PREROUTING", "OUTPUT", "POSTROUTING"] {
        assert!(specs(&after, "nat", chain).is_empty(), "nat {chain}");
    }
    assert_eq!(specs(&after, "filter", "KUBE-FIREWALL").len(), 1);
    assert!(table(&p, "nat").chains_removed.iter().any(|c| c == "KUBE-SVL-GNZBNJ2PO5MGZ6GT"));
}

#[test]
fn conntrack_addresses_are_the_cluster_ips() {
    let c = plan_conntrack("v120", V120, ConntrackScope::Udp).unwrap();
    let ips: Vec<String> = c.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(ips, ["10.96.0.1", "10.96.0.10", "10.96.100.10", "10.96.100.20", "10.96.100.30", "10.96.100.40"]);
    let c = plan_conntrack("upstream", UPSTREAM, ConntrackScope::AllProtocols).unwrap();
    assert_eq!(c.addresses.len(), 6, "{:?}", c.addresses);
    assert_eq!(c.args(c.addresses[0]), ["-D", "--orig-dst", "172.30.0.41"]);
}

#[test]
fn ipvs_sets_go_last_and_only_when_nothing_matches_them() {
    let p = plan(IPVS_IPTABLES, KubeletChains::Detect);
    assert!(p.kubelet_owns_mark_chains);
    let nat = table(&p, "nat");
    assert_eq!(nat.chains_removed, ["KUBE-NODE-PORT", "KUBE-SERVICES"]);
    // kube-proxy's hairpin rule inside kubelet's KUBE-POSTROUTING goes by spec.
    let loopback = nat.jumps_removed.iter().find(|j| j.chain == "KUBE-POSTROUTING").expect("loop-back rule");
    assert!(loopback.spec.contains("--match-set KUBE-LOOP-BACK"));
    assert_eq!(loopback.source, RuleSource::Kubelet);
    assert_eq!(table(&p, "filter").chains_removed, ["KUBE-FORWARD"]);

    let before = parse_saved_rules("ipvs", IPVS_IPTABLES).unwrap();
    let links = vec!["lo".to_string(), "eth0".to_string(), "kube-ipvs0".to_string()];
    let inputs = |remaining: &[SavedRuleset]| {
        plan_ipvs(&IpvsInputs {
            ipvsadm_save: IPVS_SAVE,
            ipset_save: IPSET_SAVE,
            links: &links,
            remaining_rules: remaining,
        })
        .unwrap()
    };

    // Planned against the rules as they are now: every set is still matched.
    let early = inputs(std::slice::from_ref(&before));
    assert!(!early.steps.iter().any(|s| matches!(s, IpvsStep::DestroySet { .. })));
    assert_eq!(early.kept_sets.len(), 3);

    let after = p.apply_to(&before);
    let ipvs = inputs(std::slice::from_ref(&after));
    let commands: Vec<String> = ipvs.steps.iter().map(|s| s.command().join(" ")).collect();
    assert_eq!(
        commands,
        [
            "ipvsadm -D -t 10.0.0.1:443",
            "ipvsadm -D -t 10.0.0.10:53",
            "ipvsadm -D -u 10.0.0.10:53",
            "ipvsadm -D -t 192.168.50.11:30080",
            "ip link del kube-ipvs0",
            "ipset destroy KUBE-CLUSTER-IP",
            "ipset destroy KUBE-LOOP-BACK",
            "ipset destroy KUBE-NODE-PORT-TCP",
        ]
    );
    assert_eq!(ipvs.kept_virtual_servers.len(), 1);
    assert!(ipvs.kept_virtual_servers[0].service.starts_with("-t 192.168.50.100:80"));
}

#[test]
fn report_serialises_for_the_status() {
    let report = Report { iptables: vec![plan(V120, KubeletChains::Detect)], ..Default::default() };
    let json = report.to_json();
    let filter = &json["iptables"][0]["tables"][0];
    assert_eq!(json["iptables"][0]["backend"], "legacy");
    assert_eq!(filter["table"], "mangle");
    assert_eq!(json["iptables"][0]["tables"][1]["kept"][0]["owner"], "kubelet");
    let back: Report = serde_json::from_value(json).unwrap();
    assert_eq!(back, report);
    assert!(!report.removed_nothing());

    let summary = report.summary();
    let nat = summary.iptables.iter().find(|t| t.table == "nat").unwrap();
    assert_eq!((nat.chains_removed, nat.jumps_removed.len(), nat.kept.len()), (25, 2, 4));
    assert_eq!(summary.iptables.iter().map(|t| t.chains_removed).sum::<usize>(), report.chains_removed());
}

/// iptables-save text of a parsed ruleset, to feed a plan back to the planner.
fn render(rs: &SavedRuleset) -> String {
    let mut out = String::new();
    for t in &rs.tables {
        out.push_str(&format!("*{}\n", t.name));
        for c in &t.chains {
            out.push_str(&format!(":{} {} [0:0]\n", c.name, if c.builtin { "ACCEPT" } else { "-" }));
        }
        for c in &t.chains {
            for r in &c.rules {
                out.push_str(&format!("-A {} {}\n", c.name, r.spec));
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}
