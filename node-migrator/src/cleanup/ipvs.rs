//! IPVS mode: virtual servers, the `kube-ipvs0` dummy holding every service
//! address, and the ipsets kube-proxy's iptables rules match on
//! (`pkg/proxy/ipvs/cleanup.go`). Planned from saved `ipvsadm -Sn`, `ipset
//! save` and link names: this is pure planning, the executor does not apply it.
//!
//! Differences from kube-proxy's `CleanupLeftovers`, on purpose:
//! - it calls `ipvs.Flush()`, deleting every virtual server on the node
//!   (keepalived's, kube-vip's too); here only those whose address and port
//!   are in kube-proxy's ipsets go, the rest are reported as kept;
//! - it destroys its sets after its own chains, and fails when another rule
//!   still matches a set (kubernetes#109286, kubernetes/kube-proxy#13); here a
//!   set still referenced by a remaining iptables rule is kept and reported,
//!   and set destruction is the last step, after the iptables cleanup.
//!
//! Keeping `kube-ipvs0` while dropping the chains would leave every ClusterIP
//! answering on host services (kubernetes#72236), so the link always goes.

use super::PlanError;
use kubeshift_planner::iptables::save_rules::SavedRuleset;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The dummy interface kube-proxy binds service addresses to.
pub const DUMMY_LINK: &str = "kube-ipvs0";

/// Set names from `pkg/proxy/ipvs/proxier.go` (`ipsetInfo`), IPv4 spelling;
/// IPv6 sets carry a `KUBE-6-` prefix instead of `KUBE-` in dual-stack
/// releases. The SCTP node-port sets were renamed `-HASH` at one point, so
/// both spellings are listed.
const KUBE_PROXY_SETS: &[&str] = &[
    "LOOP-BACK",
    "CLUSTER-IP",
    "EXTERNAL-IP",
    "EXTERNAL-IP-LOCAL",
    "LOAD-BALANCER",
    "LOAD-BALANCER-LOCAL",
    "LOAD-BALANCER-FW",
    "LOAD-BALANCER-SOURCE-IP",
    "LOAD-BALANCER-SOURCE-CIDR",
    "NODE-PORT-TCP",
    "NODE-PORT-LOCAL-TCP",
    "NODE-PORT-UDP",
    "NODE-PORT-LOCAL-UDP",
    "NODE-PORT-SCTP",
    "NODE-PORT-LOCAL-SCTP",
    "NODE-PORT-SCTP-HASH",
    "NODE-PORT-LOCAL-SCTP-HASH",
    "HEALTH-CHECK-NODE-PORT",
    "IPVS-IPS",
];

pub(crate) fn is_kube_proxy_set(name: &str) -> bool {
    let suffix = name.strip_prefix("KUBE-6-").or_else(|| name.strip_prefix("KUBE-"));
    suffix.is_some_and(|s| KUBE_PROXY_SETS.contains(&s))
}

/// Saved state of the node, as the commands print it.
#[derive(Debug, Clone, Copy)]
pub struct IpvsInputs<'a> {
    /// `ipvsadm -Sn`.
    pub ipvsadm_save: &'a str,
    /// `ipset save`.
    pub ipset_save: &'a str,
    /// Interface names (`ip -o link show`, names only).
    pub links: &'a [String],
    /// The iptables rules left after the iptables cleanup (every backend
    /// and family): a set one of them matches on cannot be destroyed.
    pub remaining_rules: &'a [SavedRuleset],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum IpvsStep {
    /// `ipvsadm -D <flag> <address>`; flag `-t`, `-u` or `--sctp-service`.
    DeleteVirtualServer {
        flag: String,
        address: String,
    },
    DeleteLink {
        name: String,
    },
    DestroySet {
        name: String,
    },
}

impl IpvsStep {
    /// The command line, program first.
    pub fn command(&self) -> Vec<String> {
        match self {
            IpvsStep::DeleteVirtualServer { flag, address } => {
                vec!["ipvsadm".into(), "-D".into(), flag.clone(), address.clone()]
            }
            IpvsStep::DeleteLink { name } => vec!["ip".into(), "link".into(), "del".into(), name.clone()],
            IpvsStep::DestroySet { name } => vec!["ipset".into(), "destroy".into(), name.clone()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptVirtualServer {
    /// As in `ipvsadm -Sn` after `-A `.
    pub service: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptSet {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IpvsPlan {
    /// In order: virtual servers, then the dummy link, then the sets.
    pub steps: Vec<IpvsStep>,
    pub kept_virtual_servers: Vec<KeptVirtualServer>,
    pub kept_sets: Vec<KeptSet>,
}

/// (protocol, address without brackets, port) a virtual server listens on.
type Endpoint = (String, String, u16);

/// What kube-proxy's sets say its services are.
#[derive(Default)]
struct ServiceKeys {
    /// From hash:ip,port entries: `10.0.0.1,tcp:443`.
    addresses: BTreeSet<Endpoint>,
    /// From bitmap:port node-port sets: (protocol, port) on any address.
    node_ports: BTreeSet<(String, u16)>,
    sets: Vec<String>,
}

pub fn plan_ipvs(inputs: &IpvsInputs<'_>) -> Result<IpvsPlan, PlanError> {
    let keys = read_sets(inputs.ipset_save)?;
    let mut plan = IpvsPlan::default();
    for (line, service) in virtual_services(inputs.ipvsadm_save) {
        let Some((flag, ep)) = parse_service(service) else {
            return Err(saved_error("ipvsadm -Sn", line, format!("unreadable virtual service `{service}`")));
        };
        let ours = keys.addresses.contains(&ep) || keys.node_ports.contains(&(ep.0.clone(), ep.2));
        if ours {
            let address = service.split_whitespace().nth(1).unwrap_or_default().to_string();
            plan.steps.push(IpvsStep::DeleteVirtualServer { flag: flag.to_string(), address });
        } else {
            plan.kept_virtual_servers.push(KeptVirtualServer {
                service: service.to_string(),
                reason: "address and port are in no kube-proxy ipset".into(),
            });
        }
    }
    if inputs.links.iter().any(|l| l == DUMMY_LINK) {
        plan.steps.push(IpvsStep::DeleteLink { name: DUMMY_LINK.into() });
    }
    for name in keys.sets {
        match referencing_chain(inputs.remaining_rules, &name) {
            Some(chain) => plan
                .kept_sets
                .push(KeptSet { reason: format!("still matched by a rule in {chain} (kubernetes#109286)"), name }),
            None => plan.steps.push(IpvsStep::DestroySet { name }),
        }
    }
    Ok(plan)
}

fn saved_error(input: &str, line: usize, what: String) -> PlanError {
    PlanError::Saved { input: input.into(), line, what }
}

/// `-A` lines (virtual services) with their 1-based line numbers, `-A ` stripped.
fn virtual_services(save: &str) -> impl Iterator<Item = (usize, &str)> {
    save.lines().enumerate().filter_map(|(i, l)| l.trim().strip_prefix("-A ").map(|s| (i + 1, s)))
}

/// `-t 10.0.0.1:443 -s rr` → ("-t", (tcp, 10.0.0.1, 443)). Fwmark services
/// (`-f`) are never kube-proxy's and give `None` upstream of this as kept.
fn parse_service(service: &str) -> Option<(&'static str, Endpoint)> {
    let mut w = service.split_whitespace();
    let (flag, proto) = match w.next()? {
        "-t" | "--tcp-service" => ("-t", "tcp"),
        "-u" | "--udp-service" => ("-u", "udp"),
        "--sctp-service" => ("--sctp-service", "sctp"),
        "-f" | "--fwmark-service" => return Some(("-f", ("fwmark".into(), String::new(), 0))),
        _ => return None,
    };
    let (addr, port) = split_addr_port(w.next()?)?;
    Some((flag, (proto.to_string(), addr.to_string(), port)))
}

fn split_addr_port(v: &str) -> Option<(&str, u16)> {
    let (addr, port) = match v.strip_prefix('[') {
        Some(rest) => {
            let (a, p) = rest.split_once("]:")?;
            (a, p)
        }
        None => v.rsplit_once(':')?,
    };
    Some((addr, port.parse().ok()?))
}

fn read_sets(save: &str) -> Result<ServiceKeys, PlanError> {
    let mut keys = ServiceKeys::default();
    for (i, line) in save.lines().enumerate() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("create"), Some(name), _) if is_kube_proxy_set(name) => keys.sets.push(name.to_string()),
            (Some("add"), Some(name), Some(entry)) if is_kube_proxy_set(name) => add_entry(&mut keys, name, entry)
                .ok_or_else(|| saved_error("ipset save", i + 1, format!("unreadable entry `{entry}` of {name}")))?,
            _ => {}
        }
    }
    Ok(keys)
}

/// Records a service address or node port; entries of the sets that hold
/// neither (loop-back, source ranges) are ignored.
fn add_entry(keys: &mut ServiceKeys, set: &str, entry: &str) -> Option<()> {
    if set.contains("NODE-PORT-TCP") || set.contains("NODE-PORT-UDP") || set.contains("NODE-PORT-LOCAL-TCP") {
        let proto = if set.ends_with("UDP") { "udp" } else { "tcp" };
        keys.node_ports.insert((proto.to_string(), entry.parse().ok()?));
        return Some(());
    }
    let parts: Vec<&str> = entry.split(',').collect();
    if parts.len() != 2 || set.contains("SOURCE") || set.contains("LOOP-BACK") || set.contains("HEALTH-CHECK") {
        return Some(());
    }
    let (proto, port) = parts[1].split_once(':')?;
    keys.addresses.insert((proto.to_string(), parts[0].to_string(), port.parse().ok()?));
    Some(())
}

fn referencing_chain(rules: &[SavedRuleset], set: &str) -> Option<String> {
    let needle = format!("--match-set {set} ");
    rules
        .iter()
        .flat_map(|r| &r.tables)
        .flat_map(|t| t.chains.iter().map(move |c| (t, c)))
        .find_map(|(t, c)| c.rules.iter().any(|r| r.spec.contains(&needle)).then(|| format!("{} {}", t.name, c.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names() {
        assert!(is_kube_proxy_set("KUBE-CLUSTER-IP"));
        assert!(is_kube_proxy_set("KUBE-6-NODE-PORT-TCP"));
        assert!(!is_kube_proxy_set("KUBE-ROUTER-SERVICES"));
        assert!(!is_kube_proxy_set("cali40all-ipam-pools"));
    }

    #[test]
    fn services() {
        assert_eq!(parse_service("-t 10.0.0.1:443 -s rr -p 10800").unwrap().1, ("tcp".into(), "10.0.0.1".into(), 443));
        assert_eq!(parse_service("-u [fd00::a]:53 -s rr").unwrap().1, ("udp".into(), "fd00::a".into(), 53));
        assert_eq!(parse_service("-f 100 -s rr").unwrap().0, "-f");
        assert!(parse_service("-x nonsense").is_none());
    }
}
