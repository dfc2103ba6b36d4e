//! kube-proxy's iptables leftovers in one backend and family: what to
//! delete, as `iptables-restore --noflush` input, and the report of it.
//!
//! Targeted, like kube-proxy's own `CleanupLeftovers`
//! (`pkg/proxy/iptables/cleanup.go`), not `iptables-save | grep -v KUBE |
//! iptables-restore`: that drops kubelet's chains, aborts on dangling
//! references, and rewrites every other owner's rules (MIGRATION-FACTS §4
//! rows 6–8).

use super::ipvs::is_kube_proxy_set;
use super::ownership::{owner, KubeletChains, Owner};
use super::{Backend, Family, PlanError};
use kubeshift_planner::iptables::save_rules::{parse_saved_rules, SavedRuleset, SavedTable};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Where a deleted jump rule lived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleSource {
    /// INPUT, FORWARD, PREROUTING …: the hooks kube-proxy links its chains from.
    Builtin,
    /// A kubelet chain that jumps into a kube-proxy chain.
    Kubelet,
    /// Another owner's chain (CNI portmap's KUBE-MARK-MASQ use, a hand-made
    /// rule): deleted too, since the chain it jumps to goes, and reported so
    /// the operator can see whose rule it was.
    Foreign,
}

/// One rule deleted by its exact spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedRule {
    pub chain: String,
    /// As `iptables-save` printed it after `-A CHAIN `.
    pub spec: String,
    pub target: String,
    pub source: RuleSource,
}

/// A KUBE-* (or other) chain left in place, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptChain {
    pub chain: String,
    pub owner: Owner,
    pub reason: String,
}

/// One table's part of the plan; after the run, what was done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TableReport {
    pub table: String,
    /// kube-proxy chains flushed and deleted.
    pub chains_removed: Vec<String>,
    /// Rules that went: those inside the removed chains plus the jumps.
    pub rules_removed: usize,
    /// Rules in chains that stay which jumped to a removed chain or matched
    /// one of kube-proxy's IPVS ipsets.
    pub jumps_removed: Vec<RemovedRule>,
    /// KUBE-* chains that stay (kubelet's, or unknown owners'). Non-KUBE
    /// chains are not listed: they are never candidates.
    pub kept: Vec<KeptChain>,
}

impl TableReport {
    fn is_empty(&self) -> bool {
        self.chains_removed.is_empty() && self.jumps_removed.is_empty()
    }
}

/// The cleanup of one `iptables-save` dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IptablesPlan {
    pub backend: Backend,
    pub family: Family,
    /// Whether the nat mark chains were judged kubelet's (see [`KubeletChains`]).
    pub kubelet_owns_mark_chains: bool,
    /// Tables with something to remove or keep, in dump order.
    pub tables: Vec<TableReport>,
}

impl IptablesPlan {
    /// Nothing of kube-proxy's is left: the postcondition, and what a second
    /// run sees.
    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(TableReport::is_empty)
    }

    /// `iptables-restore --noflush` input: per table, the jumps deleted by
    /// spec, then every kube-proxy chain flushed, then deleted. Flushing all
    /// before deleting any means no chain is still referenced by another
    /// kube-proxy chain when `-X` runs. Empty when there is nothing to do.
    pub fn restore_input(&self) -> String {
        let mut out = String::new();
        for t in self.tables.iter().filter(|t| !t.is_empty()) {
            out.push_str(&format!("*{}\n", t.table));
            for j in &t.jumps_removed {
                out.push_str(&format!("-D {} {}\n", j.chain, j.spec));
            }
            for c in &t.chains_removed {
                out.push_str(&format!("-F {c}\n"));
            }
            for c in &t.chains_removed {
                out.push_str(&format!("-X {c}\n"));
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// The ruleset as it will be after the plan ran: removed chains gone,
    /// removed rules taken out of the chains that stay. For dry runs, for
    /// planning what depends on the iptables cleanup (IPVS ipsets), and for
    /// the executor's postcondition.
    pub fn apply_to(&self, rules: &SavedRuleset) -> SavedRuleset {
        let mut out = rules.clone();
        for table in &mut out.tables {
            let Some(report) = self.tables.iter().find(|t| t.table == table.name) else { continue };
            table.chains.retain(|c| !report.chains_removed.contains(&c.name));
            for chain in &mut table.chains {
                let mut doomed: Vec<&str> =
                    report.jumps_removed.iter().filter(|j| j.chain == chain.name).map(|j| j.spec.as_str()).collect();
                // One removal per listed rule: identical rules are listed once each.
                chain.rules.retain(|r| match doomed.iter().position(|d| *d == r.spec) {
                    Some(i) => {
                        doomed.swap_remove(i);
                        false
                    }
                    None => true,
                });
            }
        }
        out
    }

    pub fn chains_removed(&self) -> usize {
        self.tables.iter().map(|t| t.chains_removed.len()).sum()
    }

    pub fn rules_removed(&self) -> usize {
        self.tables.iter().map(|t| t.rules_removed).sum()
    }
}

/// Plans the cleanup of one dump (`iptables-legacy-save`, `ip6tables-nft-save` …).
pub fn plan_iptables(
    backend: Backend,
    family: Family,
    input_name: &str,
    dump: &str,
    kubelet: KubeletChains,
) -> Result<IptablesPlan, PlanError> {
    let rules = parse_saved_rules(input_name, dump)?;
    Ok(plan_ruleset(backend, family, &rules, kubelet))
}

/// [`plan_iptables`] on an already parsed dump.
/// Chains a legacy CNI wrote: Flannel's `FLANNEL-*` (FLANNEL-POSTRTG, FLANNEL-FWD) and
/// Calico's `cali-*` (Felix prefixes every chain it owns so; MIGRATION-FACTS §2).
pub fn is_legacy_cni_chain(name: &str) -> bool {
    name.starts_with("FLANNEL-") || name.starts_with("cali-")
}

/// The finish phase's plan for one backend and family: every legacy CNI chain (flushed,
/// then deleted) and every rule elsewhere that jumps into one. Nothing of kube-proxy's,
/// kubelet's or kubeshift's is touched (kubeshift writes no iptables rules at all).
pub fn plan_legacy_ruleset(backend: Backend, family: Family, rules: &SavedRuleset) -> IptablesPlan {
    let tables = rules
        .tables
        .iter()
        .map(|table| {
            let owned: BTreeSet<&str> = table
                .chains
                .iter()
                .filter(|c| !c.builtin && is_legacy_cni_chain(&c.name))
                .map(|c| c.name.as_str())
                .collect();
            let mut report = TableReport { table: table.name.clone(), ..Default::default() };
            for chain in &table.chains {
                if owned.contains(chain.name.as_str()) {
                    report.chains_removed.push(chain.name.clone());
                    report.rules_removed += chain.rules.len();
                    continue;
                }
                for rule in &chain.rules {
                    let Some(target) = rule.target.as_deref().filter(|t| owned.contains(t)) else { continue };
                    report.jumps_removed.push(RemovedRule {
                        chain: chain.name.clone(),
                        spec: rule.spec.clone(),
                        target: target.to_string(),
                        source: if chain.builtin { RuleSource::Builtin } else { RuleSource::Foreign },
                    });
                    report.rules_removed += 1;
                }
            }
            report
        })
        .filter(|t| !t.is_empty())
        .collect();
    IptablesPlan { backend, family, kubelet_owns_mark_chains: false, tables }
}

pub fn plan_ruleset(backend: Backend, family: Family, rules: &SavedRuleset, kubelet: KubeletChains) -> IptablesPlan {
    let kubelet_marks = kubelet.owns_mark_chains(rules);
    let tables = rules
        .tables
        .iter()
        .map(|t| plan_table(t, kubelet_marks))
        .filter(|t| !t.is_empty() || !t.kept.is_empty())
        .collect();
    IptablesPlan { backend, family, kubelet_owns_mark_chains: kubelet_marks, tables }
}

fn plan_table(table: &SavedTable, kubelet_marks: bool) -> TableReport {
    let owned: BTreeSet<&str> = table
        .chains
        .iter()
        .filter(|c| !c.builtin && owner(&table.name, &c.name, kubelet_marks).0 == Owner::KubeProxy)
        .map(|c| c.name.as_str())
        .collect();
    let mut report = TableReport { table: table.name.clone(), ..Default::default() };
    for chain in &table.chains {
        if owned.contains(chain.name.as_str()) {
            report.chains_removed.push(chain.name.clone());
            report.rules_removed += chain.rules.len();
            continue;
        }
        let (who, reason) = owner(&table.name, &chain.name, kubelet_marks);
        if !chain.builtin && chain.name.starts_with("KUBE-") {
            report.kept.push(KeptChain { chain: chain.name.clone(), owner: who, reason: reason.to_string() });
        }
        let source = match (chain.builtin, who) {
            (true, _) => RuleSource::Builtin,
            (false, Owner::Kubelet) => RuleSource::Kubelet,
            _ => RuleSource::Foreign,
        };
        for rule in &chain.rules {
            let jump = rule.target.as_deref().filter(|t| owned.contains(t));
            // IPVS-mode kube-proxy also appends rules to chains it does not
            // own (KUBE-LOOP-BACK masquerade in kubelet's KUBE-POSTROUTING);
            // left behind, they keep its ipsets from being destroyed
            // (kubernetes#109286).
            let set = matched_kube_proxy_set(&rule.spec);
            if jump.is_none() && set.is_none() {
                continue;
            }
            report.jumps_removed.push(RemovedRule {
                chain: chain.name.clone(),
                spec: rule.spec.clone(),
                target: rule.target.clone().unwrap_or_default(),
                source,
            });
        }
    }
    report.rules_removed += report.jumps_removed.len();
    report
}

/// The kube-proxy ipset a rule matches on (`-m set --match-set NAME dst`).
fn matched_kube_proxy_set(spec: &str) -> Option<&str> {
    let mut words = spec.split_whitespace();
    while let Some(w) = words.next() {
        if w == "--match-set" {
            let name = words.next()?;
            if is_kube_proxy_set(name) {
                return Some(name);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(dump: &str) -> IptablesPlan {
        plan_iptables(Backend::Legacy, Family::Ipv4, "t", dump, KubeletChains::Detect).unwrap()
    }

    #[test]
    fn foreign_rule_into_a_kube_proxy_chain_is_deleted_and_reported() {
        let p = plan(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:CNI-HOSTPORT-SETMARK - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
             -A CNI-HOSTPORT-SETMARK -m comment --comment \"CNI portfwd masquerade mark\" -j KUBE-MARK-MASQ\n\
             -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n",
        );
        let nat = &p.tables[0];
        assert_eq!(nat.chains_removed, ["KUBE-MARK-MASQ"]);
        assert_eq!(nat.jumps_removed.len(), 1);
        assert_eq!(nat.jumps_removed[0].source, RuleSource::Foreign);
        assert_eq!(nat.rules_removed, 2);
        assert_eq!(
            p.restore_input(),
            "*nat\n-D CNI-HOSTPORT-SETMARK -m comment --comment \"CNI portfwd masquerade mark\" -j KUBE-MARK-MASQ\n\
             -F KUBE-MARK-MASQ\n-X KUBE-MARK-MASQ\nCOMMIT\n"
        );
    }

    #[test]
    fn nothing_to_do_gives_empty_input() {
        let p = plan("*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n");
        assert!(p.is_empty());
        assert_eq!(p.restore_input(), "");
        assert_eq!(p.tables[0].kept[0].owner, Owner::Kubelet);
    }
}
