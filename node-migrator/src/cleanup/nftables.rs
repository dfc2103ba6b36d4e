//! nftables mode: kube-proxy keeps everything in its own tables, `ip
//! kube-proxy` and `ip6 kube-proxy` (`pkg/proxy/nftables`), so deleting them
//! is the whole cleanup. Tables of the iptables-nft backend (`ip nat`, `ip
//! filter` …) and everyone else's are not touched here.

use serde::{Deserialize, Serialize};

/// kube-proxy's nftables table name in both families.
const TABLE: &str = "kube-proxy";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kube_proxys_tables() {
        let p = plan_nftables(
            "table ip filter\ntable ip kube-proxy\ntable ip6 kube-proxy\ntable inet kube-proxy\ntable ip kube-proxy-x\ntable inet cilium\n",
        );
        let names: Vec<String> = p.remove.iter().map(|t| format!("{} {}", t.family, t.name)).collect();
        assert_eq!(names, ["ip kube-proxy", "ip6 kube-proxy"]);
    }
}
