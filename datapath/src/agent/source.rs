//! API objects → the plain data of [`super::desired`]. Each served shape has its own
//! converter: Service (core/v1), EndpointSlice (discovery.k8s.io/v1, what modern
//! clusters serve, and v1beta1, what 1.20 serves), and core/v1 Endpoints for clusters
//! that serve neither.

use super::desired::{EndpointAddr, EndpointSet, ObjKey, PortSpec, ServiceSpec};
use crate::{Affinity, Protocol, DEFAULT_AFFINITY_TIMEOUT};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::net::Ipv4Addr;
use std::time::Duration;

/// The label that ties an EndpointSlice to its Service (both API versions).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The endpoints of one API object, and the Service they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointsOf {
    pub service: ObjKey,
    pub sets: Vec<EndpointSet>,
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    // SCTP is not load-balanced by the socket programs.
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn port_spec(name: Option<&String>, port: Option<i32>, proto: Option<&String>) -> Option<PortSpec> {
    Some(PortSpec {
        name: name.cloned().unwrap_or_default(),
        port: u16::try_from(port?).ok().filter(|p| *p != 0)?,
        protocol: protocol(proto.map(String::as_str))?,
    })
}

fn ipv4(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

/// None for Services the socket load balancer does not serve: headless, ExternalName,
/// or without an IPv4 cluster IP.
pub fn service(svc: &Service) -> Option<ServiceSpec> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.clone());
    }
    let cluster_ips: Vec<Ipv4Addr> = ips.iter().filter_map(|s| ipv4(s)).collect();
    if cluster_ips.is_empty() {
        return None;
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| port_spec(p.name.as_ref(), Some(p.port), p.protocol.as_ref()))
        .collect();
    let node_ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let np = u16::try_from(p.node_port?).ok().filter(|n| *n != 0)?;
            Some((port_spec(p.name.as_ref(), Some(p.port), p.protocol.as_ref())?, np))
        })
        .collect();
    let affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
        Affinity::ClientIp { timeout: t }
    } else {
        Affinity::None
    };
    Some(ServiceSpec { cluster_ips, ports, affinity, node_ports })
}

/// kube-proxy's rule: an endpoint whose readiness is unknown counts as ready.
fn ready(r: Option<bool>) -> bool {
    r.unwrap_or(true)
}

fn service_of(
    namespace: Option<&String>,
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<ObjKey> {
    let name = labels?.get(SERVICE_NAME_LABEL)?;
    Some(ObjKey::new(namespace.map(String::as_str).unwrap_or("default"), name))
}

/// discovery.k8s.io/v1. None for slices of no Service, or of another address family.
pub fn slice_v1(s: &EndpointSlice) -> Option<EndpointsOf> {
    if s.address_type != "IPv4" {
        return None;
    }
    let service = service_of(s.metadata.namespace.as_ref(), s.metadata.labels.as_ref())?;
    let ports =
        s.ports.iter().flatten().filter_map(|p| port_spec(p.name.as_ref(), p.port, p.protocol.as_ref())).collect();
    let addresses = s
        .endpoints
        .iter()
        .flat_map(|e| {
            let r = ready(e.conditions.as_ref().and_then(|c| c.ready));
            e.addresses.iter().filter_map(move |a| Some(EndpointAddr { ip: ipv4(a)?, ready: r }))
        })
        .collect();
    Some(EndpointsOf { service, sets: vec![EndpointSet { ports, addresses }] })
}

/// A discovery.k8s.io/v1beta1 slice (what 1.20 serves; k8s-openapi no longer has the
/// type) as kube's DynamicObject holds it. Every field read here kept its name and
/// shape in v1, so the object is read as a v1 slice and converted once, by `slice_v1`.
pub fn slice_v1beta1(obj: &kube::api::DynamicObject) -> Option<EndpointsOf> {
    slice_v1(&v1beta1_as_v1(obj)?)
}

/// A v1beta1 slice as the v1 type. v1beta1 endpoints name their node in
/// `topology["kubernetes.io/hostname"]` (`nodeName` came later), which becomes `nodeName`.
pub fn v1beta1_as_v1(obj: &kube::api::DynamicObject) -> Option<EndpointSlice> {
    let mut v = obj.data.clone();
    let fields = v.as_object_mut()?;
    fields.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
    fields.insert("kind".into(), "EndpointSlice".into());
    fields.insert("metadata".into(), serde_json::to_value(&obj.metadata).ok()?);
    for e in fields.get_mut("endpoints").and_then(|e| e.as_array_mut()).into_iter().flatten() {
        let host = e.pointer("/topology/kubernetes.io~1hostname").cloned();
        if let (Some(h), Some(o)) = (host, e.as_object_mut()) {
            o.entry("nodeName").or_insert(h);
        }
    }
    serde_json::from_value(v).ok()
}

/// core/v1 Endpoints (deprecated upstream since 1.33, still the only source on old
/// clusters without EndpointSlices). Its name is the Service's name.
#[allow(deprecated)]
pub fn endpoints(e: &k8s_openapi::api::core::v1::Endpoints) -> Option<EndpointsOf> {
    let service = ObjKey::new(e.metadata.namespace.as_deref().unwrap_or("default"), e.metadata.name.as_deref()?);
    let sets = e
        .subsets
        .iter()
        .flatten()
        .map(|sub| {
            let ports = sub
                .ports
                .iter()
                .flatten()
                .filter_map(|p| port_spec(p.name.as_ref(), Some(p.port), p.protocol.as_ref()))
                .collect();
            let ready_addrs = sub.addresses.iter().flatten().map(|a| (a, true));
            let not_ready = sub.not_ready_addresses.iter().flatten().map(|a| (a, false));
            let addresses = ready_addrs
                .chain(not_ready)
                .filter_map(|(a, r)| Some(EndpointAddr { ip: ipv4(&a.ip)?, ready: r }))
                .collect();
            EndpointSet { ports, addresses }
        })
        .collect();
    Some(EndpointsOf { service, sets })
}

#[cfg(test)]
mod tests {
    use super::super::desired::desired_for_service;
    use super::*;
    use crate::{Backend, ServiceKey};
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn modern_service_and_v1_slice() {
        // A 1.34-style dual-stack Service with clusterIPs and ipFamilies, and a v1 slice
        // with serving/terminating conditions: only ready endpoints count.
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.5.5", "clusterIPs": ["10.96.5.5", "fd00::5"],
                     "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                     "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                               {"name": "sctp", "port": 90, "protocol": "SCTP"}],
                     "trafficDistribution": "PreferClose"}
        }));
        let spec = service(&s).unwrap();
        assert_eq!(spec.cluster_ips, vec!["10.96.5.5".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(spec.ports.len(), 1, "SCTP is not served");
        assert_eq!(spec.affinity, Affinity::ClientIp { timeout: Duration::from_secs(60) });

        let slice: EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.7"], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "n1", "zone": "a",
                 "hints": {"forZones": [{"name": "a"}]}},
                {"addresses": ["10.244.2.7"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.3.7"]}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .unwrap();
        let eps = slice_v1(&slice).unwrap();
        assert_eq!(eps.service, ObjKey::new("shop", "web"));
        let w = desired_for_service(&spec, &eps.sets.iter().collect::<Vec<_>>(), &[]);
        let key = ServiceKey { vip: "10.96.5.5".parse().unwrap(), port: 80, protocol: Protocol::Tcp };
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            w[&key].0,
            vec![Backend { ip: ip("10.244.1.7"), port: 8080 }, Backend { ip: ip("10.244.3.7"), port: 8080 }]
        );

        let v6: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-v6", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6", "endpoints": [{"addresses": ["fd00::7"]}], "ports": [{"name": "http", "port": 8080}]
        }))
        .unwrap();
        assert!(slice_v1(&v6).is_none());
    }

    #[test]
    fn services_not_served() {
        for spec in [
            json!({"type": "ExternalName", "externalName": "example.com"}),
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            json!({"clusterIPs": ["fd00::1"], "ports": [{"port": 80}]}),
        ] {
            assert!(service(&svc(json!({"metadata": {"name": "x"}, "spec": spec}))).is_none());
        }
        // NodePort and LoadBalancer services have a cluster IP, which is served.
        let np =
            service(&svc(json!({"metadata": {"name": "x"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.9",
            "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}], "sessionAffinity": "ClientIP"}})))
            .unwrap();
        assert_eq!(np.ports[0].protocol, Protocol::Udp);
        assert_eq!(np.affinity, Affinity::ClientIp { timeout: DEFAULT_AFFINITY_TIMEOUT });
    }

    #[test]
    fn v1beta1_slice_as_served_by_1_20() {
        let obj: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "echo-x", "namespace": "lab", "labels": {"kubernetes.io/service-name": "echo",
                         "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.2.3"], "conditions": {"ready": true}, "topology": {"kubernetes.io/hostname": "node-2"},
                           "targetRef": {"kind": "Pod", "name": "echo-1"}},
                          {"addresses": ["10.244.2.4"], "conditions": {"ready": false}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .unwrap();
        let eps = slice_v1beta1(&obj).unwrap();
        assert_eq!(eps.service, ObjKey::new("lab", "echo"));
        assert_eq!(eps.sets[0].addresses.iter().filter(|a| a.ready).count(), 1);
        assert_eq!(eps.sets[0].ports[0].port, 8080);
    }

    #[test]
    #[allow(deprecated)]
    fn core_v1_endpoints() {
        let e: k8s_openapi::api::core::v1::Endpoints = serde_json::from_value(json!({
            "metadata": {"name": "echo", "namespace": "lab"},
            "subsets": [{"addresses": [{"ip": "10.244.1.3"}], "notReadyAddresses": [{"ip": "10.244.1.4"}],
                         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
                        {"addresses": [{"ip": "10.244.2.3"}], "ports": [{"name": "http", "port": 9090}]}]
        }))
        .unwrap();
        let eps = endpoints(&e).unwrap();
        assert_eq!(eps.service, ObjKey::new("lab", "echo"));
        let spec = ServiceSpec {
            cluster_ips: vec!["10.96.0.50".parse().unwrap()],
            ports: vec![PortSpec { name: "http".into(), port: 80, protocol: Protocol::Tcp }],
            affinity: Affinity::None,
            node_ports: vec![],
        };
        let w = desired_for_service(&spec, &eps.sets.iter().collect::<Vec<_>>(), &[]);
        let b = &w.values().next().unwrap().0;
        assert_eq!(b.len(), 2);
        assert!(b.contains(&Backend { ip: "10.244.2.3".parse().unwrap(), port: 9090 }));
    }
}
