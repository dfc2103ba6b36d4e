//! Which NodePort / external frontends a node should program, computed from plain copies
//! of Services, EndpointSlices and the Node. Pure: no I/O, every rule is unit-tested.
//!
//! Frontends of one Service (kube-proxy's set, IPv4 only, TCP and UDP):
//! - `type: NodePort` and `LoadBalancer`: every port's `nodePort` on the node's
//!   InternalIP;
//! - `spec.externalIPs` (any type): the service port on each address;
//! - `LoadBalancer`: the service port on each `status.loadBalancer.ingress[].ip`, unless
//!   its `ipMode` is `Proxy` (the load balancer then sends to the node, not to that IP).
//!
//! All of them carry `externalTrafficPolicy`. Backends are the endpoints whose port has
//! the service port's name and protocol; `local` when the endpoint's `nodeName` is this
//! node. Ready endpoints are used; under `Local`, a node whose local endpoints are all
//! terminating uses the ones still serving (KEP-1669, kube-proxy ≥ 1.26) rather than
//! dropping.

use crate::nodeport::{Frontend, NpBackend, TrafficPolicy};
use crate::Protocol;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// What this node is: its name (matched against endpoints' `nodeName`) and the address
/// NodePorts are served on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub ip: Ipv4Addr,
}

/// The part of a Service that decides its NodePort / external frontends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpServiceSpec {
    /// `namespace/name`, for messages.
    pub service: String,
    pub ports: Vec<NpPort>,
    /// Only for `type: NodePort` / `LoadBalancer`.
    pub node_ports: bool,
    pub external_ips: Vec<Ipv4Addr>,
    pub lb_ips: Vec<Ipv4Addr>,
    pub policy: TrafficPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// One EndpointSlice, reduced to what NodePort needs (readiness states and node names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpEndpointSet {
    /// `(name, protocol, target port)`.
    pub ports: Vec<(String, Protocol, u16)>,
    pub endpoints: Vec<NpEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpEndpoint {
    pub ip: Ipv4Addr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Map contents: frontend → (backends, policy).
pub type NpWanted = BTreeMap<Frontend, (Vec<NpBackend>, TrafficPolicy)>;

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn port16(p: Option<i32>) -> Option<u16> {
    u16::try_from(p?).ok().filter(|p| *p != 0)
}

/// The node's InternalIP (the first IPv4 one), where kube-proxy serves NodePorts.
pub fn node_info(node: &Node) -> Result<NodeInfo, String> {
    let name = node.metadata.name.clone().ok_or_else(|| "Node without metadata.name".to_string())?;
    let ip = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| format!("Node {name}: no IPv4 InternalIP in status.addresses"))?;
    Ok(NodeInfo { name, ip })
}

/// Reads a Service. Returns None when it has no NodePort / external frontend at all,
/// and a message for every address that is skipped (naming the field and the value).
pub fn np_service(svc: &Service) -> (Option<NpServiceSpec>, Vec<String>) {
    let mut warnings = Vec::new();
    let service = format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or("")
    );
    let Some(spec) = svc.spec.as_ref() else {
        return (None, warnings);
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return (None, warnings);
    }
    let mut ipv4_list = |field: &str, values: &mut dyn Iterator<Item = (usize, &str)>| {
        let mut out = Vec::new();
        for (i, v) in values {
            match v.parse::<Ipv4Addr>() {
                Ok(ip) => out.push(ip),
                // IPv6 addresses are legal but not served yet; anything else is garbage.
                Err(_) if v.parse::<std::net::Ipv6Addr>().is_ok() => {}
                Err(_) => warnings.push(format!("Service {service}: {field}[{i}] {v:?} is not an IP address, skipped")),
            }
        }
        out
    };
    let external_ips =
        ipv4_list("spec.externalIPs", &mut spec.external_ips.iter().flatten().map(String::as_str).enumerate());
    let lb_ips = if kind == "LoadBalancer" {
        let ingress: Vec<_> = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, i)| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|(n, i)| Some((n, i.ip.as_deref()?)))
            .collect();
        ipv4_list("status.loadBalancer.ingress", &mut ingress.into_iter())
    } else {
        Vec::new()
    };
    let node_ports = kind == "NodePort" || kind == "LoadBalancer";
    let ports: Vec<NpPort> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(NpPort {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(p.protocol.as_deref())?,
                port: port16(Some(p.port))?,
                node_port: if node_ports { port16(p.node_port) } else { None },
            })
        })
        .collect();
    let policy = match spec.external_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let has_frontends = !external_ips.is_empty() || !lb_ips.is_empty() || ports.iter().any(|p| p.node_port.is_some());
    if !has_frontends {
        return (None, warnings);
    }
    (Some(NpServiceSpec { service, ports, node_ports, external_ips, lb_ips, policy }), warnings)
}

/// Reads a discovery.k8s.io/v1 EndpointSlice (the v1beta1 shape converts to it, see
/// `source::slice_v1beta1`). None for other address families.
pub fn np_endpoints(s: &EndpointSlice) -> Option<NpEndpointSet> {
    if s.address_type != "IPv4" {
        return None;
    }
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), protocol(p.protocol.as_deref())?, port16(p.port)?)))
        .collect();
    let endpoints = s
        .endpoints
        .iter()
        .flat_map(|e| {
            let c = e.conditions.as_ref();
            // Unknown readiness counts as ready (kube-proxy); serving defaults to ready.
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            // kube-proxy uses the first address only.
            e.addresses.first().and_then(|a| {
                Some(NpEndpoint { ip: a.parse().ok()?, node: e.node_name.clone(), ready, serving, terminating })
            })
        })
        .collect();
    Some(NpEndpointSet { ports, endpoints })
}

/// The frontends of one Service on `node`.
pub fn desired_frontends(node: &NodeInfo, svc: &NpServiceSpec, sets: &[&NpEndpointSet]) -> NpWanted {
    let mut out = NpWanted::new();
    for sp in &svc.ports {
        let mut ready = BTreeSet::new();
        let mut serving_local = BTreeSet::new();
        for set in sets {
            let Some((_, _, target)) = set.ports.iter().find(|(n, p, _)| *n == sp.name && *p == sp.protocol) else {
                continue;
            };
            for e in &set.endpoints {
                let b = NpBackend { ip: e.ip, port: *target, local: e.node.as_deref() == Some(node.name.as_str()) };
                if e.ready {
                    ready.insert(b);
                } else if b.local && e.serving && e.terminating {
                    serving_local.insert(b);
                }
            }
        }
        let mut backends: Vec<NpBackend> = ready.into_iter().collect();
        if svc.policy == TrafficPolicy::Local && !backends.iter().any(|b| b.local) {
            backends.extend(serving_local);
        }
        let mut add = |ip: Ipv4Addr, port: u16| {
            out.insert(Frontend { ip, port, protocol: sp.protocol }, (backends.clone(), svc.policy));
        };
        if let Some(np) = sp.node_port {
            add(node.ip, np);
        }
        for ip in svc.external_ips.iter().chain(&svc.lb_ips) {
            add(*ip, sp.port);
        }
    }
    out
}

/// All Services' frontends. Two Services claiming one frontend (e.g. the same external
/// IP and port) cannot both be served: the first by `namespace/name` wins and the
/// other is reported.
pub fn desired_all(node: &NodeInfo, services: &[(NpServiceSpec, Vec<&NpEndpointSet>)]) -> (NpWanted, Vec<String>) {
    let mut order: Vec<_> = services.iter().collect();
    order.sort_by(|a, b| a.0.service.cmp(&b.0.service));
    let mut owner: BTreeMap<Frontend, &str> = BTreeMap::new();
    let mut out = NpWanted::new();
    let mut conflicts = Vec::new();
    for (svc, sets) in order {
        for (fe, v) in desired_frontends(node, svc, sets) {
            if let Some(first) = owner.get(&fe) {
                conflicts.push(format!(
                    "Service {}: {}:{} {:?} is already served for Service {first}, skipped",
                    svc.service, fe.ip, fe.port, fe.protocol
                ));
                continue;
            }
            owner.insert(fe, &svc.service);
            out.insert(fe, v);
        }
    }
    (out, conflicts)
}

/// Writes that turn `current` (e.g. `NodePortDatapath::frontends()`) into `wanted`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NpPlan {
    pub upserts: Vec<(Frontend, Vec<NpBackend>, TrafficPolicy)>,
    pub removes: Vec<Frontend>,
}

pub fn diff_frontends(current: &NpWanted, wanted: &NpWanted) -> NpPlan {
    let set = |v: &[NpBackend]| v.iter().copied().collect::<BTreeSet<_>>();
    let mut plan = NpPlan::default();
    for (fe, (b, p)) in wanted {
        let same = current.get(fe).is_some_and(|(cb, cp)| cp == p && cb.len() == b.len() && set(cb) == set(b));
        if !same {
            plan.upserts.push((*fe, b.clone(), *p));
        }
    }
    plan.removes = current.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn node() -> NodeInfo {
        NodeInfo { name: "n1".into(), ip: ip("192.168.77.1") }
    }

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(endpoints: serde_json::Value) -> NpEndpointSet {
        let s: EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-x", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}]
        }))
        .unwrap();
        np_endpoints(&s).unwrap()
    }

    fn two_endpoints() -> NpEndpointSet {
        slice(json!([
            {"addresses": ["10.244.1.10"], "nodeName": "n1", "conditions": {"ready": true}},
            {"addresses": ["10.244.2.10"], "nodeName": "n2"}
        ]))
    }

    fn fe(i: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend { ip: ip(i), port, protocol }
    }

    fn be(i: &str, port: u16, local: bool) -> NpBackend {
        NpBackend { ip: ip(i), port, local }
    }

    #[test]
    fn load_balancer_service_gives_node_port_external_and_ingress_frontends() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.5",
                     "externalIPs": ["203.0.113.10", "2001:db8::1", "bogus"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"},
                               {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"},
                               {"name": "sctp", "port": 99, "nodePort": 30099, "protocol": "SCTP"}]},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.7"}, {"hostname": "lb.example"},
                {"ip": "198.51.100.8", "ipMode": "Proxy"}]}}
        }));
        let (spec, warnings) = np_service(&s);
        let spec = spec.unwrap();
        assert_eq!(
            warnings,
            vec!["Service shop/web: spec.externalIPs[2] \"bogus\" is not an IP address, skipped".to_string()]
        );
        assert_eq!(spec.policy, TrafficPolicy::Cluster);
        let eps = two_endpoints();
        let w = desired_frontends(&node(), &spec, &[&eps]);
        let keys: Vec<_> = w.keys().copied().collect();
        assert_eq!(
            keys,
            vec![
                fe("192.168.77.1", 30053, Protocol::Udp),
                fe("192.168.77.1", 30080, Protocol::Tcp),
                fe("198.51.100.7", 53, Protocol::Udp),
                fe("198.51.100.7", 80, Protocol::Tcp),
                fe("203.0.113.10", 53, Protocol::Udp),
                fe("203.0.113.10", 80, Protocol::Tcp),
            ]
        );
        let (b, p) = &w[&fe("192.168.77.1", 30080, Protocol::Tcp)];
        assert_eq!(p, &TrafficPolicy::Cluster);
        assert_eq!(b, &vec![be("10.244.1.10", 8080, true), be("10.244.2.10", 8080, false)]);
        assert_eq!(w[&fe("203.0.113.10", 53, Protocol::Udp)].0[0].port, 5353);
    }

    #[test]
    fn cluster_ip_services_only_get_external_ips_and_plain_ones_nothing() {
        let plain = svc(json!({"metadata": {"name": "a"},
            "spec": {"type": "ClusterIP", "ports": [{"port": 80, "nodePort": 30000}]}}));
        assert_eq!(np_service(&plain).0, None, "a nodePort on a ClusterIP service is ignored");
        let ext = svc(json!({"metadata": {"name": "b", "namespace": "x"},
            "spec": {"externalIPs": ["203.0.113.1"], "ports": [{"name": "http", "port": 80}]}}));
        let spec = np_service(&ext).0.unwrap();
        let w = desired_frontends(&node(), &spec, &[&two_endpoints()]);
        assert_eq!(w.keys().copied().collect::<Vec<_>>(), vec![fe("203.0.113.1", 80, Protocol::Tcp)]);
        let lb_pending = svc(json!({"metadata": {"name": "c"},
            "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                     "ports": [{"port": 80}]}}));
        assert_eq!(np_service(&lb_pending).0, None, "no nodePort, no ingress IP yet");
        let external_name = svc(json!({"metadata": {"name": "d"},
            "spec": {"type": "ExternalName", "externalName": "x.example", "externalIPs": ["1.2.3.4"]}}));
        assert_eq!(np_service(&external_name).0, None);
    }

    #[test]
    fn local_policy_and_terminating_fallback() {
        let s = svc(json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "NodePort", "externalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}));
        let spec = np_service(&s).0.unwrap();
        assert_eq!(spec.policy, TrafficPolicy::Local);
        let w = desired_frontends(&node(), &spec, &[&two_endpoints()]);
        let (b, p) = &w[&fe("192.168.77.1", 30080, Protocol::Tcp)];
        assert_eq!(*p, TrafficPolicy::Local);
        assert_eq!(b.len(), 2, "all endpoints go to the map; the loader uses only local ones");

        // The only local pod is terminating but still serving: used rather than dropping.
        let eps = slice(json!([
            {"addresses": ["10.244.1.10"], "nodeName": "n1",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.1.11"], "nodeName": "n1",
             "conditions": {"ready": false, "serving": false, "terminating": true}},
            {"addresses": ["10.244.2.10"], "nodeName": "n2", "conditions": {"ready": true}}
        ]));
        let w = desired_frontends(&node(), &spec, &[&eps]);
        assert_eq!(
            w[&fe("192.168.77.1", 30080, Protocol::Tcp)].0,
            vec![be("10.244.2.10", 8080, false), be("10.244.1.10", 8080, true)]
        );
        // Under Cluster the terminating one is not used: a ready endpoint exists.
        let cluster = NpServiceSpec { policy: TrafficPolicy::Cluster, ..spec };
        let w = desired_frontends(&node(), &cluster, &[&eps]);
        assert_eq!(w[&fe("192.168.77.1", 30080, Protocol::Tcp)].0, vec![be("10.244.2.10", 8080, false)]);
    }

    #[test]
    fn node_internal_ip_and_conflicts_and_diff() {
        let n: Node = serde_json::from_value(json!({"metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                     {"type": "InternalIP", "address": "fd00::1"},
                                     {"type": "InternalIP", "address": "192.168.77.1"}]}}))
        .unwrap();
        assert_eq!(node_info(&n).unwrap(), node());
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n9"}})).unwrap();
        assert!(node_info(&bare).unwrap_err().contains("Node n9"));

        let mk = |name: &str| {
            let s = svc(json!({"metadata": {"name": name, "namespace": "x"},
                "spec": {"externalIPs": ["203.0.113.1"], "ports": [{"name": "http", "port": 80}]}}));
            np_service(&s).0.unwrap()
        };
        let eps = two_endpoints();
        let (w, conflicts) = desired_all(&node(), &[(mk("b"), vec![&eps]), (mk("a"), vec![])]);
        assert_eq!(w.len(), 1);
        assert!(w.values().next().unwrap().0.is_empty(), "x/a wins (name order)");
        assert_eq!(conflicts.len(), 1);
        assert!(conflicts[0].contains("Service x/b") && conflicts[0].contains("x/a"));

        let (w2, _) = desired_all(&node(), &[(mk("a"), vec![&eps])]);
        let plan = diff_frontends(&w, &w2);
        assert_eq!(plan.upserts.len(), 1);
        assert!(plan.removes.is_empty());
        assert!(diff_frontends(&w2, &w2).upserts.is_empty());
        let plan = diff_frontends(&w2, &NpWanted::new());
        assert_eq!(plan.removes, vec![fe("203.0.113.1", 80, Protocol::Tcp)]);
    }
}
