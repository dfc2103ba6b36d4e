//! The finish phase's node-local half: once the legacy CNI's DaemonSet is gone from the
//! cluster, remove what it left in a node's kernel, without a reboot.
//!
//! - iptables (both backends, both families): Flannel's `FLANNEL-*` and Calico's
//!   `cali-*` chains and the jumps into them ([`plan_legacy_ruleset`]), verified by
//!   reading the rules again like the kube-proxy cleanup.
//! - links: `flannel.1`, `flannel-wg`, `cni0`, `vxlan.calico`, leftover `cali*` veths
//!   are deleted; `tunl0` is the kernel's IPIP fallback device and cannot be deleted,
//!   so it is set down and its addresses flushed.
//! - routes into the legacy pod CIDRs that remain (Calico's blackhole routes for its
//!   blocks; the devices' own routes go with them).
//!
//! Tolerates "never there" and "already removed": a second run removes nothing and
//! succeeds. There is no inverse on the node: rollback restores the legacy DaemonSet,
//! whose agent recreates its devices, routes and chains on start.

use super::exec::{apply_and_verify, read_rules, Ns};
use super::iptables::plan_legacy_ruleset;
use super::{Backend, CleanupError, Family, IptablesPlan, Netns};
use kubeshift_planner::planning::{cidrs_overlap, parse_cidr};
use serde::{Deserialize, Serialize};

/// Devices only a legacy CNI creates, deleted by name.
const LEGACY_LINKS: [&str; 4] = ["flannel.1", "flannel-wg", "cni0", "vxlan.calico"];
/// Calico's IPIP device is the kernel's `ipip` fallback device: it cannot be deleted.
const FALLBACK_LINK: &str = "tunl0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LegacyReport {
    pub iptables: Vec<IptablesPlan>,
    pub links_removed: Vec<String>,
    /// Set down with addresses flushed (not deletable).
    pub links_downed: Vec<String>,
    pub routes_removed: Vec<String>,
    pub warnings: Vec<String>,
}

impl LegacyReport {
    pub fn chains_removed(&self) -> usize {
        self.iptables.iter().map(IptablesPlan::chains_removed).sum()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} legacy chains, {} links ({} downed), {} routes removed",
            self.chains_removed(),
            self.links_removed.len(),
            self.links_downed.len(),
            self.routes_removed.len()
        )
    }
}

/// Pure: which links of `ip -j link show` go, and which are only set down.
pub fn legacy_links(links: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    let mut delete = Vec::new();
    let mut down = Vec::new();
    for l in links.as_array().into_iter().flatten() {
        let Some(name) = l.get("ifname").and_then(|n| n.as_str()) else { continue };
        if LEGACY_LINKS.contains(&name) || (name.starts_with("cali") && name != "calico") {
            delete.push(name.to_string());
        } else if name == FALLBACK_LINK {
            let up = l.get("flags").and_then(|f| f.as_array()).is_some_and(|f| f.iter().any(|f| f == "UP"));
            let addressed = l.get("addr_info").and_then(|a| a.as_array()).is_some_and(|a| !a.is_empty());
            if up || addressed {
                down.push(name.to_string());
            }
        }
    }
    (delete, down)
}

/// Pure: the destinations of `ip -j route show` that lie in one of `legacy` (IPv4 CIDRs).
pub fn legacy_routes(routes: &serde_json::Value, legacy: &[String]) -> Vec<String> {
    let nets: Vec<(u32, u8)> = legacy.iter().filter_map(|c| parse_cidr(c).ok().flatten()).collect();
    routes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("dst").and_then(|d| d.as_str()))
        .filter(|dst| {
            let cidr = if dst.contains('/') { dst.to_string() } else { format!("{dst}/32") };
            parse_cidr(&cidr)
                .ok()
                .flatten()
                .is_some_and(|d| d.1 >= 1 && nets.iter().any(|n| n.1 <= d.1 && cidrs_overlap(*n, d)))
        })
        .map(String::from)
        .collect()
}

fn ip_json(ns: &Ns, args: &[&str], warnings: &mut Vec<String>) -> Result<serde_json::Value, CleanupError> {
    let mut all = vec!["-j".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let (command, stdout) = ns.read("ip", &all, warnings)?;
    serde_json::from_str(&stdout).map_err(|e| CleanupError::Postcondition {
        command,
        netns: ns.label.clone(),
        what: format!("output is not JSON: {e}"),
    })
}

fn ip(ns: &Ns, args: &[&str]) -> Result<(), CleanupError> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let ran = ns.run("ip", &args, None)?;
    if ran.status.success() || ran.stderr.contains("Cannot find device") || ran.stderr.contains("No such process") {
        return Ok(());
    }
    Err(CleanupError::Restore {
        command: ran.command,
        netns: ns.label.clone(),
        status: ran.status.to_string(),
        stderr: ran.stderr,
        input: String::new(),
    })
}

/// Removes the legacy CNI's chains, devices and routes in `netns`, then checks that
/// none is left. `legacy_cidrs`: the legacy pod networks (Flannel's Network, Calico's pools).
pub fn run_legacy_removal(netns: &Netns, legacy_cidrs: &[String]) -> Result<LegacyReport, CleanupError> {
    let ns = Ns::open(netns)?;
    let mut report = LegacyReport::default();
    for backend in Backend::ALL {
        for family in Family::ALL {
            let (_, before) = read_rules(&ns, backend, family, &mut report.warnings)?;
            let plan = plan_legacy_ruleset(backend, family, &before);
            let done = apply_and_verify(&ns, plan, &before, &mut report.warnings, "the legacy CNI", |after| {
                plan_legacy_ruleset(backend, family, after)
            })?;
            report.iptables.push(done);
        }
    }
    let (delete, down) = legacy_links(&ip_json(&ns, &["link", "show"], &mut report.warnings)?);
    for name in &delete {
        ip(&ns, &["link", "del", name])?;
    }
    for name in &down {
        ip(&ns, &["link", "set", name, "down"])?;
        ip(&ns, &["addr", "flush", "dev", name])?;
    }
    report.links_removed = delete;
    report.links_downed = down;
    let routes = legacy_routes(&ip_json(&ns, &["route", "show", "table", "main"], &mut report.warnings)?, legacy_cidrs);
    for dst in &routes {
        ip(&ns, &["route", "del", dst, "table", "main"])?;
    }
    report.routes_removed = routes;

    let fail = |command: &str, what: String| CleanupError::Postcondition {
        command: command.to_string(),
        netns: ns.label.clone(),
        what,
    };
    let (links_left, _) = legacy_links(&ip_json(&ns, &["link", "show"], &mut report.warnings)?);
    if !links_left.is_empty() {
        return Err(fail("ip link show", format!("legacy links still present: {links_left:?}")));
    }
    let routes_left =
        legacy_routes(&ip_json(&ns, &["route", "show", "table", "main"], &mut report.warnings)?, legacy_cidrs);
    if !routes_left.is_empty() {
        return Err(fail(
            "ip route show",
            format!("routes into the legacy pod network still present: {routes_left:?}"),
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::iptables::is_legacy_cni_chain;
    use kubeshift_planner::iptables::save_rules::parse_saved_rules;
    use serde_json::json;

    // Shaped like flanneld v0.22 `--ip-masq` rules plus kubelet's and kube-proxy's
    // chains, which must stay.
    const FLANNEL: &str = "*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully
-A KUBE-POSTROUTING -j RETURN
COMMIT
*filter
:FORWARD ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
:cali-FORWARD - [0:0]
-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD
-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD
-A FLANNEL-FWD -s 10.244.0.0/16 -j ACCEPT
COMMIT
";

    #[test]
    fn legacy_chains_and_the_jumps_into_them_go_everything_else_stays() {
        let rules = parse_saved_rules("fixture", FLANNEL).unwrap();
        let plan = plan_legacy_ruleset(Backend::Legacy, Family::Ipv4, &rules);
        assert_eq!(plan.chains_removed(), 3);
        let input = plan.restore_input();
        assert!(
            input.contains("-X FLANNEL-POSTRTG")
                && input.contains("-X FLANNEL-FWD")
                && input.contains("-X cali-FORWARD")
        );
        assert!(input.contains("-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"));
        assert!(
            !input.contains("KUBE-POSTROUTING"),
            "kube-proxy's and kubelet's chains are not the legacy CNI's:\n{input}"
        );
        let after = plan.apply_to(&rules);
        assert!(plan_legacy_ruleset(Backend::Legacy, Family::Ipv4, &after).is_empty(), "nothing left to remove");
        assert!(is_legacy_cni_chain("cali-tw-cali1234") && !is_legacy_cni_chain("KUBE-FIREWALL"));
    }

    #[test]
    fn links_and_routes_are_picked_by_name_and_by_legacy_network() {
        let links = json!([
            {"ifname": "lo", "flags": ["LOOPBACK", "UP"]},
            {"ifname": "flannel.1", "flags": ["UP"]},
            {"ifname": "cni0", "flags": ["UP"]},
            {"ifname": "cali12ab", "flags": ["UP"]},
            {"ifname": "kubeshift.vx", "flags": ["UP"]},
            {"ifname": "tunl0", "flags": ["NOARP", "UP"], "addr_info": [{"local": "192.168.1.1"}]},
        ]);
        let (delete, down) = legacy_links(&links);
        assert_eq!(delete, ["flannel.1", "cni0", "cali12ab"]);
        assert_eq!(down, ["tunl0"]);
        let quiet = json!([{"ifname": "tunl0", "flags": ["NOARP"], "addr_info": []}]);
        assert_eq!(legacy_links(&quiet), (vec![], vec![]), "a down, unaddressed tunl0 is already clean");

        let routes = json!([
            {"dst": "default"},
            {"dst": "10.244.2.0/24", "dev": "flannel.1"},
            {"dst": "192.168.7.0/26", "type": "blackhole"},
            {"dst": "10.245.1.0/24", "dev": "kubeshift.vx"},
            {"dst": "10.0.0.0/8"},
        ]);
        let legacy = vec!["10.244.0.0/16".to_string(), "192.168.0.0/16".to_string()];
        assert_eq!(
            legacy_routes(&routes, &legacy),
            ["10.244.2.0/24", "192.168.7.0/26"],
            "a wider route is not the CNI's"
        );
    }
}
