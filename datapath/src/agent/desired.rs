//! What the maps should hold, computed from plain copies of the API objects. Pure: no
//! I/O, so every rule (ClusterIP only, ready endpoints only, port matching by name,
//! affinity, refusal for no endpoints) is unit-tested without a cluster.

use crate::{Affinity, Backend, Protocol, ServiceKey};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// namespace/name of an API object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self { namespace: namespace.to_string(), name: name.to_string() }
    }
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The part of a Service the socket load balancer serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// IPv4 cluster IPs (dual-stack services have one of each family).
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<PortSpec>,
    pub affinity: Affinity,
    /// The nodePort of each service port that has one: a connect() to this node's own
    /// address and that port is balanced like the cluster IP (kube-proxy serves it so
    /// too, and nothing else does once kube-proxy has left the node).
    pub node_ports: Vec<(PortSpec, u16)>,
}

/// A named port, as both Services and endpoint objects list them. For a service port
/// `port` is the service port; for an endpoint port it is the target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// One EndpointSlice, or one subset of a core/v1 Endpoints: addresses × ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSet {
    pub ports: Vec<PortSpec>,
    pub addresses: Vec<EndpointAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointAddr {
    pub ip: Ipv4Addr,
    pub ready: bool,
}

/// Map contents: service port → (backends, affinity). An empty backend list is a
/// service without endpoints, which the programs refuse with ECONNREFUSED.
pub type Wanted = BTreeMap<ServiceKey, (Vec<Backend>, Affinity)>;

/// The entries one Service needs, given the endpoint sets that belong to it.
pub fn desired_for_service(svc: &ServiceSpec, sets: &[&EndpointSet], local_ips: &[Ipv4Addr]) -> Wanted {
    let mut out = Wanted::new();
    for sp in &svc.ports {
        // Several slices may list the same address while pods move between them.
        let mut backends = BTreeSet::new();
        for set in sets {
            let Some(ep) = set.ports.iter().find(|p| p.name == sp.name && p.protocol == sp.protocol) else {
                continue;
            };
            for a in set.addresses.iter().filter(|a| a.ready) {
                backends.insert(Backend { ip: a.ip, port: ep.port });
            }
        }
        let backends: Vec<Backend> = backends.into_iter().collect();
        for vip in &svc.cluster_ips {
            let key = ServiceKey { vip: *vip, port: sp.port, protocol: sp.protocol };
            out.insert(key, (backends.clone(), svc.affinity));
        }
        for (_, node_port) in svc.node_ports.iter().filter(|(p, _)| p == sp) {
            for ip in local_ips {
                let key = ServiceKey { vip: *ip, port: *node_port, protocol: sp.protocol };
                out.insert(key, (backends.clone(), svc.affinity));
            }
        }
    }
    out
}

/// Map writes that turn `current` into `wanted`; keys whose entry is already right are
/// not touched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub upserts: Vec<(ServiceKey, Vec<Backend>, Affinity)>,
    pub removes: Vec<ServiceKey>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty()
    }
}

pub fn diff(current: &Wanted, wanted: &Wanted) -> Plan {
    let mut plan = Plan::default();
    for (k, (b, a)) in wanted {
        let same = current.get(k).is_some_and(|(cb, ca)| {
            ca == a && cb.len() == b.len() && cb.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
        });
        if !same {
            plan.upserts.push((*k, b.clone(), *a));
        }
    }
    plan.removes = current.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn port(name: &str, port: u16, protocol: Protocol) -> PortSpec {
        PortSpec { name: name.into(), port, protocol }
    }
    fn addr(s: &str, ready: bool) -> EndpointAddr {
        EndpointAddr { ip: ip(s), ready }
    }

    #[test]
    fn ready_endpoints_matched_by_port_name_and_protocol() {
        let svc = ServiceSpec {
            cluster_ips: vec![ip("10.96.0.10")],
            ports: vec![port("dns", 53, Protocol::Udp), port("dns-tcp", 53, Protocol::Tcp)],
            affinity: Affinity::None,
            node_ports: vec![],
        };
        let a = EndpointSet {
            ports: vec![port("dns", 1053, Protocol::Udp), port("dns-tcp", 1054, Protocol::Tcp)],
            addresses: vec![addr("10.244.1.5", true), addr("10.244.2.5", false)],
        };
        // The same pod again in a second slice, plus a new one.
        let b = EndpointSet {
            ports: vec![port("dns", 1053, Protocol::Udp)],
            addresses: vec![addr("10.244.1.5", true), addr("10.244.3.5", true)],
        };
        let w = desired_for_service(&svc, &[&a, &b], &[]);
        let udp = ServiceKey { vip: ip("10.96.0.10"), port: 53, protocol: Protocol::Udp };
        let tcp = ServiceKey { protocol: Protocol::Tcp, ..udp };
        assert_eq!(
            w[&udp].0,
            vec![Backend { ip: ip("10.244.1.5"), port: 1053 }, Backend { ip: ip("10.244.3.5"), port: 1053 }]
        );
        assert_eq!(w[&tcp].0, vec![Backend { ip: ip("10.244.1.5"), port: 1054 }]);
    }

    #[test]
    fn no_endpoints_is_an_entry_with_no_backends() {
        let svc = ServiceSpec {
            cluster_ips: vec![ip("10.96.0.20")],
            ports: vec![port("", 80, Protocol::Tcp)],
            affinity: Affinity::ClientIp { timeout: Duration::from_secs(30) },
            node_ports: vec![],
        };
        let not_ready =
            EndpointSet { ports: vec![port("", 8080, Protocol::Tcp)], addresses: vec![addr("10.244.1.9", false)] };
        for sets in [vec![], vec![&not_ready]] {
            let w = desired_for_service(&svc, &sets, &[]);
            assert_eq!(w.len(), 1);
            let (b, a) = w.values().next().unwrap();
            assert!(b.is_empty());
            assert_eq!(*a, Affinity::ClientIp { timeout: Duration::from_secs(30) });
        }
    }

    #[test]
    fn a_node_port_is_served_on_the_nodes_own_addresses_with_the_cluster_ips_backends() {
        let svc = ServiceSpec {
            cluster_ips: vec![ip("10.96.0.40")],
            ports: vec![port("web", 80, Protocol::Tcp), port("dns", 53, Protocol::Udp)],
            affinity: Affinity::None,
            node_ports: vec![(port("web", 80, Protocol::Tcp), 30080)],
        };
        let set =
            EndpointSet { ports: vec![port("web", 8080, Protocol::Tcp)], addresses: vec![addr("10.244.1.2", true)] };
        let w = desired_for_service(&svc, &[&set], &[ip("172.30.0.21")]);
        let np = ServiceKey { vip: ip("172.30.0.21"), port: 30080, protocol: Protocol::Tcp };
        assert_eq!(w[&np].0, vec![Backend { ip: ip("10.244.1.2"), port: 8080 }]);
        assert_eq!(w.len(), 3, "cluster IP × 2 ports, and the one NodePort: {w:?}");
        assert_eq!(desired_for_service(&svc, &[&set], &[]).len(), 2, "no local address known: no NodePort entry");
    }

    #[test]
    fn dual_stack_service_programs_its_ipv4_cluster_ip_only_once_per_port() {
        let svc = ServiceSpec {
            cluster_ips: vec![ip("10.96.0.30")],
            ports: vec![port("a", 80, Protocol::Tcp), port("b", 81, Protocol::Tcp)],
            affinity: Affinity::None,
            node_ports: vec![],
        };
        let set = EndpointSet {
            ports: vec![port("a", 8080, Protocol::Tcp), port("b", 8081, Protocol::Tcp)],
            addresses: vec![addr("10.244.1.2", true)],
        };
        let w = desired_for_service(&svc, &[&set], &[]);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn diff_touches_only_changed_keys() {
        let k = |p| ServiceKey { vip: ip("10.96.0.1"), port: p, protocol: Protocol::Tcp };
        let b = |s: &str| Backend { ip: ip(s), port: 80 };
        let mut cur = Wanted::new();
        cur.insert(k(1), (vec![b("10.0.0.1"), b("10.0.0.2")], Affinity::None));
        cur.insert(k(2), (vec![b("10.0.0.1")], Affinity::None));
        cur.insert(k(3), (vec![], Affinity::None));
        let mut want = Wanted::new();
        // Same set in another order: nothing to write (the datapath keeps slots stable).
        want.insert(k(1), (vec![b("10.0.0.2"), b("10.0.0.1")], Affinity::None));
        want.insert(k(2), (vec![b("10.0.0.3")], Affinity::None));
        want.insert(k(4), (vec![], Affinity::None));
        let plan = diff(&cur, &want);
        assert_eq!(plan.upserts.iter().map(|u| u.0).collect::<Vec<_>>(), vec![k(2), k(4)]);
        assert_eq!(plan.removes, vec![k(3)]);
        assert!(diff(&want, &want).is_empty());
        // An affinity change alone is a write.
        let mut aff = want.clone();
        aff.get_mut(&k(1)).unwrap().1 = Affinity::ClientIp { timeout: Duration::from_secs(5) };
        assert_eq!(diff(&want, &aff).upserts.len(), 1);
    }
}
