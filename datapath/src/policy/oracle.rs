//! Kubernetes NetworkPolicy semantics, evaluated straight from the policies for one
//! connection attempt. No identities, no maps: this is the reference the compiled maps
//! (and the real programs) are compared against, so it is kept deliberately plain and
//! shares nothing with `compile` but label selector matching.
//!
//! A connection from `src` to `dst:port` is allowed when
//! - `src` is not a pod, or no policy of type Egress selects it, or some egress rule of
//!   such a policy allows `dst` and the port; and
//! - `dst` is not a pod, or no policy of type Ingress selects it, or `src` is one of the
//!   node's own addresses, or some ingress rule of such a policy allows `src` and the
//!   port.
//!
//! Traffic from a pod to itself (to any of its own addresses) is always allowed: it never
//! leaves the pod's network namespace, so no program sees it, and the upstream
//! NetworkPolicy conformance tests expect it allowed too.
//!
//! Pods are found by address (the first one in input order if two claim the same
//! address), on any node. An ipBlock matches any address, pod or not. A named port is
//! looked up on the destination pod, with the rule's protocol; an address that is not a
//! pod has no names.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::model::{Direction, NetworkPolicy, Peer, PodInfo, PolicyInput, PortRef, Rule};
use crate::Protocol;

pub fn allowed(input: &PolicyInput, src: Ipv4Addr, dst: Ipv4Addr, protocol: Protocol, port: u16) -> bool {
    let src_pod = pod_by_ip(input, src);
    let dst_pod = pod_by_ip(input, dst);
    if let (Some(a), Some(b)) = (src_pod, dst_pod) {
        if std::ptr::eq(a, b) {
            return true;
        }
    }

    let egress_ok = match src_pod {
        None => true,
        Some(me) => {
            let policies = selecting(input, me, Direction::Egress);
            policies.is_empty()
                || policies
                    .iter()
                    .any(|p| p.egress.iter().any(|r| rule_allows(input, p, r, dst, dst_pod, dst_pod, protocol, port)))
        }
    };
    let ingress_ok = match dst_pod {
        None => true,
        Some(me) => {
            let policies = selecting(input, me, Direction::Ingress);
            policies.is_empty()
                || input.host_ips.contains(&src)
                || policies
                    .iter()
                    .any(|p| p.ingress.iter().any(|r| rule_allows(input, p, r, src, src_pod, Some(me), protocol, port)))
        }
    };
    egress_ok && ingress_ok
}

fn pod_by_ip(input: &PolicyInput, ip: Ipv4Addr) -> Option<&PodInfo> {
    input.pods.iter().find(|p| p.ips.contains(&ip))
}

fn selecting<'a>(input: &'a PolicyInput, pod: &PodInfo, dir: Direction) -> Vec<&'a NetworkPolicy> {
    input
        .policies
        .iter()
        .filter(|p| {
            p.policy_types.contains(&dir) && p.namespace == pod.namespace && p.pod_selector.matches(&pod.labels)
        })
        .collect()
}

/// `peer_ip`/`peer_pod`: the other end (source for ingress, destination for egress);
/// `dst_pod`: the pod the traffic goes to, whose names named ports refer to.
#[allow(clippy::too_many_arguments)]
fn rule_allows(
    input: &PolicyInput,
    policy: &NetworkPolicy,
    rule: &Rule,
    peer_ip: Ipv4Addr,
    peer_pod: Option<&PodInfo>,
    dst_pod: Option<&PodInfo>,
    protocol: Protocol,
    port: u16,
) -> bool {
    let peer_ok =
        rule.peers.is_empty() || rule.peers.iter().any(|peer| peer_matches(input, policy, peer, peer_ip, peer_pod));
    let port_ok = rule.ports.is_empty()
        || rule.ports.iter().any(|pr| {
            pr.protocol == protocol
                && match &pr.port {
                    None => true,
                    Some(PortRef::Number(n)) => match pr.end_port {
                        None => port == *n,
                        Some(end) => *n <= port && port <= end,
                    },
                    Some(PortRef::Name(name)) => dst_pod.is_some_and(|d| {
                        d.named_ports.iter().any(|np| &np.name == name && np.protocol == protocol && np.port == port)
                    }),
                }
        });
    peer_ok && port_ok
}

fn peer_matches(input: &PolicyInput, policy: &NetworkPolicy, peer: &Peer, ip: Ipv4Addr, pod: Option<&PodInfo>) -> bool {
    match peer {
        Peer::IpBlock(block) => {
            in_cidr(ip, block.cidr.addr, block.cidr.prefix)
                && !block.except.iter().any(|e| in_cidr(ip, e.addr, e.prefix))
        }
        Peer::Pods { pod_selector, namespace_selector } => {
            let Some(pod) = pod else { return false };
            let namespace_ok = match namespace_selector {
                None => pod.namespace == policy.namespace,
                Some(sel) => {
                    let none = BTreeMap::new();
                    let labels = input.namespaces.iter().find(|n| n.name == pod.namespace).map_or(&none, |n| &n.labels);
                    sel.matches(labels)
                }
            };
            namespace_ok && pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels))
        }
    }
}

fn in_cidr(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let bits = 32 - u32::from(prefix.min(32));
    // checked_shr: a shift by 32 (prefix 0) compares nothing.
    u32::from(ip).checked_shr(bits).unwrap_or(0) == u32::from(net).checked_shr(bits).unwrap_or(0)
}
