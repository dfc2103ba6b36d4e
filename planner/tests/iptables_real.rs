//! The fixtures loaded into the kernel with the real iptables-restore (legacy
//! and nft backends) inside a private network namespace, dumped again with
//! the real iptables-save, and parsed: the model must be the same as from the
//! hand-written file. This checks the parser against the formatting iptables
//! 1.8.9 actually prints (quoting, option order), not only against our own.

mod common;
use common::Netns;
use kubeshift_planner::iptables::{parse_iptables_save, RuleModel};

const V120: &str = include_str!("fixtures/kube-proxy-1.20-flannel.txt");
const CURRENT: &str = include_str!("fixtures/kube-proxy-current-calico-nft.txt");

/// Calico's ipset matches and kube-proxy's nfacct counters need kernel
/// objects this namespace does not have; those lines carry no service data
/// except one duplicate node-port rule.
fn restorable(dump: &str) -> String {
    dump.lines().filter(|l| !l.contains("--match-set") && !l.contains("nfacct")).map(|l| format!("{l}\n")).collect()
}

fn same_services(a: &RuleModel, b: &RuleModel) {
    assert_eq!(a.services, b.services);
    assert_eq!(a.layout, b.layout);
    assert_eq!(a.masquerade, b.masquerade);
    assert_eq!(a.unreferenced_chains, b.unreferenced_chains);
    assert_eq!(a.kube, b.kube);
    assert_eq!(a.kube_proxy_canary, b.kube_proxy_canary);
}

fn round_trip(backend: &str, fixture: &str) {
    let ns = Netns::new(&format!("real-{backend}"));
    let input = restorable(fixture);
    ns.exec_stdin(&[&format!("iptables-{backend}-restore")], &input);
    let saved = ns.exec_stdin(&[&format!("iptables-{backend}-save")], "");
    let from_kernel =
        parse_iptables_save(&format!("iptables-{backend}-save"), &saved).unwrap_or_else(|e| panic!("{e}\n{saved}"));
    let from_file = parse_iptables_save("fixture", &input).unwrap();
    assert!(!from_file.services.is_empty());
    same_services(&from_file, &from_kernel);
    assert!(from_kernel
        .generated_by
        .as_deref()
        .is_some_and(|g| g.starts_with(&format!("iptables-{backend}-save")) || g.starts_with("iptables-save")));
}

#[test]
fn kube_proxy_120_through_legacy_backend() {
    round_trip("legacy", V120);
}

#[test]
fn kube_proxy_120_through_nft_backend() {
    round_trip("nft", V120);
}

#[test]
fn kube_proxy_current_through_nft_backend() {
    round_trip("nft", CURRENT);
}

#[test]
fn kube_proxy_current_through_legacy_backend() {
    round_trip("legacy", CURRENT);
}
