//! nftables mode: kube-proxy keeps everything in its own tables, `ip
//! kube-proxy` and `ip6 kube-proxy` (`pkg/proxy/nftables`), so deleting them
//! is the whole cleanup. Tables of the iptables-nft backend (`ip nat`, `ip
//! filter` …) and everyone else's are not touched here.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// kube-proxy's nftables table name in both families.
const TABLE: &str = "kube-proxy";

/// The set of active ClusterIPs in that table (`clusterIPsSet` in
/// `pkg/proxy/nftables/proxier.go`): the conntrack flush's addresses in
/// nftables mode, where there is no KUBE-SERVICES to read them from.
pub const CLUSTER_IPS_SET: &str = "cluster-ips";

/// One nftables table (`family name`, as `nft list tables` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftTable {
    pub family: String,
    pub name: String,
}

impl NftTable {
    /// Arguments to `nft` that delete it.
    pub fn delete_args(&self) -> [&str; 4] {
        ["delete", "table", &self.family, &self.name]
    }

    /// Arguments to `nft` that print its ClusterIP set.
    pub fn list_cluster_ips_args(&self) -> [&str; 5] {
        ["list", "set", &self.family, &self.name, CLUSTER_IPS_SET]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NftPlan {
    /// kube-proxy's tables present now.
    pub remove: Vec<NftTable>,
}

/// From `nft list tables` output (`table ip kube-proxy` per line).
pub fn plan_nftables(list_tables: &str) -> NftPlan {
    let remove = list_tables
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("table"), Some(family @ ("ip" | "ip6")), Some(TABLE)) => {
                    Some(NftTable { family: family.to_string(), name: TABLE.to_string() })
                }
                _ => None,
            }
        })
        .collect();
    NftPlan { remove }
}

/// The elements of a set as `nft list set` prints them (`elements = { a,
/// b }`, wrapped over lines); what is not an address is skipped.
pub fn set_addresses(list_set: &str) -> Vec<IpAddr> {
    let Some((_, rest)) = list_set.split_once("elements = {") else { return Vec::new() };
    let body = rest.split('}').next().unwrap_or_default();
    body.split([',', ' ', '\t', '\n']).filter_map(|w| w.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_a_wrapped_set() {
        let out = "table ip6 kube-proxy {\n\tset cluster-ips {\n\t\ttype ipv6_addr\n\t\tcomment \"Active ClusterIPs\"\n\t\telements = { fd00::1,\n\t\t\t     fd00::a }\n\t}\n}\n";
        let ips: Vec<String> = set_addresses(out).iter().map(|a| a.to_string()).collect();
        assert_eq!(ips, ["fd00::1", "fd00::a"]);
        assert!(set_addresses("table ip kube-proxy {\n\tset cluster-ips {\n\t\ttype ipv4_addr\n\t}\n}\n").is_empty());
    }

    #[test]
    fn only_kube_proxys_tables() {
        let p = plan_nftables(
            "table ip filter\ntable ip kube-proxy\ntable ip6 kube-proxy\ntable inet kube-proxy\ntable ip kube-proxy-x\ntable inet cilium\n",
        );
        let names: Vec<String> = p.remove.iter().map(|t| format!("{} {}", t.family, t.name)).collect();
        assert_eq!(names, ["ip kube-proxy", "ip6 kube-proxy"]);
    }
}
