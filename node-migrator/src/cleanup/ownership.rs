//! Who wrote a chain: kube-proxy (ours to remove), kubelet (stays), or
//! someone else (stays). Decided per table and name, never by the `KUBE-`
//! prefix alone: kube-router writes KUBE-ROUTER-* and KUBE-POD-FW-*, kubelet
//! writes KUBE-FIREWALL, and a blanket match deletes them (MIGRATION-FACTS §4
//! row 8).

use kubeshift_planner::iptables::save_rules::SavedRuleset;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Owner {
    KubeProxy,
    Kubelet,
    /// Built-in chains, CNI chains (FLANNEL-*, cali-*), and KUBE-* chains
    /// kube-proxy never wrote.
    Other,
}

/// Whether kubelet owns KUBE-MARK-DROP, KUBE-MARK-MASQ and KUBE-POSTROUTING.
///
/// Source: kubernetes `pkg/kubelet/kubelet_network_linux.go` up to 1.26
/// (`syncNetworkUtil` ensures nat KUBE-MARK-DROP, KUBE-MARK-MASQ,
/// KUBE-POSTROUTING with `POSTROUTING -j KUBE-POSTROUTING`, and filter
/// KUBE-FIREWALL with the "kubernetes firewall for dropping marked packets"
/// rule) and KEP-3178 "Cleaning up IPTables Chain Ownership"
/// (kubernetes/enhancements `keps/sig-network/3178-iptables-cleanup`): the
/// `IPTablesOwnershipCleanup` gate, alpha 1.25, on by default from 1.27, makes
/// kubelet stop creating those three chains; KUBE-FIREWALL stays with only
/// the localnet ("martian packet") rule, and KUBE-IPTABLES-HINT (1.24+) and
/// KUBE-KUBELET-CANARY stay. Current kube-proxy's `CleanupLeftovers`
/// (`pkg/proxy/iptables/cleanup.go`) accordingly removes KUBE-MARK-MASQ and
/// KUBE-POSTROUTING itself but never KUBE-MARK-DROP.
///
/// Decision: where kubelet owns them they stay (it recreates them within a
/// minute anyway, and without kube-proxy's jumps nothing marks packets);
/// otherwise they are kube-proxy leftovers and go, KUBE-MARK-DROP included
/// (only a pre-1.25 kube-proxy could have written it then).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubeletChains {
    /// From the dump: kubelet owns the mark chains iff filter KUBE-FIREWALL
    /// holds its drop-mark rule (`-m mark --mark ... -j DROP`), which only a
    /// kubelet that also writes the mark chains creates.
    #[default]
    Detect,
    /// kubelet < 1.27 (or the gate off): the mark chains are kubelet's.
    OwnsMarkChains,
    /// kubelet ≥ 1.27: only KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT.
    HintOnly,
}

impl KubeletChains {
    /// From `node.status.nodeInfo.kubeletVersion` (`v1.20.2`, `v1.31.0+k3s1`).
    pub fn from_kubelet_version(version: &str) -> KubeletChains {
        let v = version.trim_start_matches('v');
        let mut parts = v.split(|c: char| !c.is_ascii_digit());
        let major = parts.next().and_then(|p| p.parse::<u32>().ok());
        let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
        match (major, minor) {
            (Some(1), Some(m)) if m < 27 => KubeletChains::OwnsMarkChains,
            (Some(_), Some(_)) => KubeletChains::HintOnly,
            _ => KubeletChains::Detect,
        }
    }

    pub(crate) fn owns_mark_chains(self, rules: &SavedRuleset) -> bool {
        match self {
            KubeletChains::OwnsMarkChains => true,
            KubeletChains::HintOnly => false,
            KubeletChains::Detect => has_kubelet_drop_mark_rule(rules),
        }
    }
}

fn has_kubelet_drop_mark_rule(rules: &SavedRuleset) -> bool {
    let Some(chain) = rules.table("filter").and_then(|t| t.chain("KUBE-FIREWALL")) else {
        return false;
    };
    chain.rules.iter().any(|r| r.target.as_deref() == Some("DROP") && r.spec.contains("-m mark --mark"))
}

/// kube-proxy's per-service chain prefixes (iptables mode, all releases);
/// they only ever live in the nat table.
const SERVICE_PREFIXES: &[&str] = &["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-"];

/// Fixed-name kube-proxy chains per table: iptables mode
/// (`pkg/proxy/iptables/cleanup.go`) plus IPVS mode (`pkg/proxy/ipvs`:
/// KUBE-NODE-PORT, KUBE-LOAD-BALANCER, KUBE-SOURCE-RANGES-FIREWALL,
/// KUBE-IPVS-FILTER, KUBE-IPVS-OUT-FILTER; before 1.25 IPVS mode also had
/// nat KUBE-FIREWALL for source ranges — a different chain from kubelet's
/// filter KUBE-FIREWALL).
fn fixed_kube_proxy_chain(table: &str, chain: &str) -> bool {
    let list: &[&str] = match table {
        "nat" => &[
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-CANARY",
            "KUBE-NODE-PORT",
            "KUBE-LOAD-BALANCER",
            "KUBE-FIREWALL",
        ],
        "filter" => &[
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-PROXY-CANARY",
            "KUBE-NODE-PORT",
            "KUBE-SOURCE-RANGES-FIREWALL",
            "KUBE-IPVS-FILTER",
            "KUBE-IPVS-OUT-FILTER",
        ],
        "mangle" => &["KUBE-PROXY-CANARY"],
        _ => &[],
    };
    list.contains(&chain)
}

const MARK_CHAINS: &[&str] = &["KUBE-MARK-DROP", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"];

/// The owner of `chain` in `table`, with the reason a kept chain stays.
pub(crate) fn owner(table: &str, chain: &str, kubelet_marks: bool) -> (Owner, &'static str) {
    if table == "nat" && MARK_CHAINS.contains(&chain) {
        return if kubelet_marks {
            (Owner::Kubelet, "kubelet < 1.27 writes the nat mark chains (kubelet_network_linux.go, KEP-3178)")
        } else {
            (Owner::KubeProxy, "")
        };
    }
    let service_chain = table == "nat" && SERVICE_PREFIXES.iter().any(|p| chain.starts_with(p));
    if fixed_kube_proxy_chain(table, chain) || service_chain {
        return (Owner::KubeProxy, "");
    }
    match (table, chain) {
        ("filter", "KUBE-FIREWALL") => (Owner::Kubelet, "kubelet's localnet/drop-mark firewall"),
        (_, "KUBE-KUBELET-CANARY") => (Owner::Kubelet, "kubelet's flush canary"),
        ("mangle", "KUBE-IPTABLES-HINT") => (Owner::Kubelet, "kubelet's iptables-backend hint"),
        _ if chain.starts_with("KUBE-") => (Owner::Other, "KUBE- chain kube-proxy does not write"),
        _ => (Owner::Other, "not a kube-proxy chain"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_versions() {
        assert_eq!(KubeletChains::from_kubelet_version("v1.20.2"), KubeletChains::OwnsMarkChains);
        assert_eq!(KubeletChains::from_kubelet_version("v1.26.9"), KubeletChains::OwnsMarkChains);
        assert_eq!(KubeletChains::from_kubelet_version("v1.27.0"), KubeletChains::HintOnly);
        assert_eq!(KubeletChains::from_kubelet_version("v1.31.0+k3s1"), KubeletChains::HintOnly);
        assert_eq!(KubeletChains::from_kubelet_version("garbage"), KubeletChains::Detect);
    }

    #[test]
    fn names_decide_per_table() {
        assert_eq!(owner("filter", "KUBE-FIREWALL", false).0, Owner::Kubelet);
        assert_eq!(owner("nat", "KUBE-FIREWALL", false).0, Owner::KubeProxy);
        assert_eq!(owner("nat", "KUBE-MARK-DROP", true).0, Owner::Kubelet);
        assert_eq!(owner("nat", "KUBE-MARK-DROP", false).0, Owner::KubeProxy);
        assert_eq!(owner("nat", "KUBE-SVL-ABC", true).0, Owner::KubeProxy);
        assert_eq!(owner("raw", "KUBE-SVC-ABC", true).0, Owner::Other);
        assert_eq!(owner("filter", "KUBE-ROUTER-INPUT", false).0, Owner::Other);
        assert_eq!(owner("filter", "KUBE-POD-FW-X", false).0, Owner::Other);
        assert_eq!(owner("mangle", "KUBE-IPTABLES-HINT", false).0, Owner::Kubelet);
        assert_eq!(owner("nat", "FLANNEL-POSTRTG", false).0, Owner::Other);
    }
}
