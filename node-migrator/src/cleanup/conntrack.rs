//! Conntrack entries of service addresses. With kube-proxy's rules gone, a
//! flow already in conntrack keeps its DNAT to the old endpoint: UDP flows
//! (DNS) live as long as traffic keeps them warm and never reach the new
//! datapath (kube-proxy flushes UDP entries itself for that reason,
//! `pkg/proxy/conntrack`).

use super::PlanError;
use kubeshift_planner::iptables::parse_iptables_save;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Which entries of a service address go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConntrackScope {
    /// `conntrack -D -d IP`: every protocol. The phase runs on a drained node
    /// whose services the new datapath now answers, so a TCP flow still
    /// DNATed by a stale entry would reach an endpoint the datapath no longer
    /// tracks; dropping it makes the client reconnect through the new path.
    #[default]
    AllProtocols,
    /// `conntrack -D -p udp --orig-dst IP`: what kube-proxy itself flushes;
    /// established TCP connections keep their old DNAT until they close.
    Udp,
}

/// The service addresses whose entries to delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConntrackPlan {
    pub scope: ConntrackScope,
    /// Sorted, without duplicates.
    pub addresses: Vec<IpAddr>,
}

/// One address's flush, after the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackFlush {
    pub address: IpAddr,
    /// As conntrack counted it ("N flow entries have been deleted").
    pub deleted: u64,
}

impl ConntrackPlan {
    pub fn new(scope: ConntrackScope, addresses: impl IntoIterator<Item = IpAddr>) -> ConntrackPlan {
        let set: BTreeSet<IpAddr> = addresses.into_iter().collect();
        ConntrackPlan { scope, addresses: set.into_iter().collect() }
    }

    pub fn extend(&mut self, more: impl IntoIterator<Item = IpAddr>) {
        let set: BTreeSet<IpAddr> = self.addresses.drain(..).chain(more).collect();
        self.addresses = set.into_iter().collect();
    }

    /// Arguments to `conntrack` for one address. `-f ipv6` because conntrack
    /// reads the IPv4 table unless told otherwise.
    pub fn args(&self, address: IpAddr) -> Vec<String> {
        let mut a: Vec<String> = vec!["-D".into()];
        if address.is_ipv6() {
            a.extend(["-f".into(), "ipv6".into()]);
        }
        if self.scope == ConntrackScope::Udp {
            a.extend(["-p".into(), "udp".into()]);
        }
        a.extend(["--orig-dst".into(), address.to_string()]);
        a
    }
}

/// ClusterIPs of the services kube-proxy programmed in one `iptables-save`
/// dump (nat KUBE-SERVICES, and filter REJECTs of services without endpoints).
pub fn plan_conntrack(input_name: &str, dump: &str, scope: ConntrackScope) -> Result<ConntrackPlan, PlanError> {
    let model = parse_iptables_save(input_name, dump)?;
    let ips = model.services.iter().filter_map(|s| s.cluster_ip.as_deref()).filter_map(parse_ip);
    Ok(ConntrackPlan::new(scope, ips))
}

fn parse_ip(v: &str) -> Option<IpAddr> {
    v.split('/').next()?.parse().ok()
}

/// Reads conntrack's "N flow entries have been deleted." (stderr).
pub(crate) fn deleted_count(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let (head, _) = l.split_once(" flow entries have been deleted")?;
        head.rsplit(' ').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_per_family_and_scope() {
        let p = ConntrackPlan::new(ConntrackScope::Udp, []);
        assert_eq!(p.args("10.96.0.10".parse().unwrap()), ["-D", "-p", "udp", "--orig-dst", "10.96.0.10"]);
        let p = ConntrackPlan::new(ConntrackScope::AllProtocols, []);
        assert_eq!(p.args("fd00::a".parse().unwrap()), ["-D", "-f", "ipv6", "--orig-dst", "fd00::a"]);
    }

    #[test]
    fn counts_from_conntrack_stderr() {
        assert_eq!(deleted_count("conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"), Some(3));
        assert_eq!(deleted_count("conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"), Some(0));
        assert_eq!(deleted_count("garbage"), None);
    }
}
