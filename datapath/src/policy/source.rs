//! API objects (k8s-openapi NetworkPolicy, Pod, Namespace) → the plain data of
//! [`super::model`], with the API server's defaults applied:
//!
//! - `policyTypes` absent or empty: Ingress, plus Egress if the policy has egress rules;
//! - a port without protocol is TCP; `port` is a number or a container port name;
//!   `endPort` widens a numeric port to a range;
//! - absent `from`/`to`/`ports` (or empty lists) mean "everything".
//!
//! What the IPv4 TCP/UDP datapath cannot enforce is left out without widening anything:
//! an SCTP port is skipped with a warning, and a rule whose ports were all SCTP is
//! dropped (it would otherwise read as "all ports"); an IPv6 ipBlock matches no IPv4
//! address, so it is skipped, and a rule whose peers were all IPv6 blocks is dropped.
//!
//! Malformed policies are errors naming the object, the field path and the value.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use k8s_openapi::api::networking::v1 as api;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as ApiSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::cidr::CidrError;
use super::model::{
    Cidr, Direction, IpBlock, LabelSelector, NamedPort, NamespaceInfo, NetworkPolicy, Peer, PodInfo, PortRef, PortRule,
    Rule, SelectorOp, SelectorRequirement,
};
use crate::Protocol;

/// A NetworkPolicy the API should not have accepted, or that this code cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NetworkPolicy {object}: {field} = {value:?}: {problem}")]
pub struct SourceError {
    /// `namespace/name`.
    pub object: String,
    /// e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
    pub value: String,
    pub problem: String,
}

pub fn namespace(ns: &Namespace) -> NamespaceInfo {
    NamespaceInfo {
        name: ns.metadata.name.clone().unwrap_or_default(),
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    }
}

/// None for pods that have no address of their own to police: host-network pods (they
/// are the node), finished pods (Succeeded/Failed; their IP may already be reused), and
/// pods without an IPv4 address yet.
pub fn pod(pod: &Pod) -> Option<PodInfo> {
    pod_any_ip(pod).filter(|p| !p.ips.is_empty())
}

/// [`pod`], also for a pod whose IP the kubelet has not reported yet (`ips` empty):
/// what its identity will be once it has an address.
pub fn pod_any_ip(pod: &Pod) -> Option<PodInfo> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: Vec<Ipv4Addr> =
        status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<Ipv4Addr>().ok()));
    }
    // Sidecars (init containers that keep running) serve their ports like containers.
    let containers = spec.into_iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten().filter(|c| c.restart_policy.as_deref() == Some("Always")))
    });
    Some(PodInfo {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        named_ports: containers.flat_map(named_ports).collect(),
    })
}

fn named_ports(c: &Container) -> impl Iterator<Item = NamedPort> + '_ {
    c.ports.iter().flatten().filter_map(|p| {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => return None,
        };
        Some(NamedPort {
            name: p.name.clone().filter(|n| !n.is_empty())?,
            protocol,
            port: u16::try_from(p.container_port).ok().filter(|p| *p != 0)?,
        })
    })
}

struct Ctx {
    object: String,
}

impl Ctx {
    fn err(&self, field: &str, value: impl ToString, problem: &str) -> SourceError {
        SourceError {
            object: self.object.clone(),
            field: field.to_string(),
            value: value.to_string(),
            problem: problem.to_string(),
        }
    }
}

/// What to enforce for a policy [`network_policy`] rejects: its pods isolated in the
/// directions it declares, with no allow rules. Failing closed keeps a policy that is
/// broken in one rule from opening its pods to everything; None when not even its pod
/// selector can be read (then nobody can tell which pods it was meant for).
pub fn deny_all_fallback(np: &api::NetworkPolicy) -> Option<NetworkPolicy> {
    let namespace = np.metadata.namespace.clone().filter(|n| !n.is_empty())?;
    let name = np.metadata.name.clone().unwrap_or_default();
    let cx = Ctx { object: format!("{namespace}/{name}") };
    let default_spec = api::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let pod_selector = match &spec.pod_selector {
        Some(s) => selector(&cx, "spec.podSelector", s).ok()?,
        None => LabelSelector::default(),
    };
    let mut policy_types: Vec<Direction> = spec
        .policy_types
        .iter()
        .flatten()
        .filter_map(|t| match t.as_str() {
            "Ingress" => Some(Direction::Ingress),
            "Egress" => Some(Direction::Egress),
            _ => None,
        })
        .collect();
    if policy_types.is_empty() {
        policy_types.push(Direction::Ingress);
        if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
            policy_types.push(Direction::Egress);
        }
    }
    policy_types.sort();
    policy_types.dedup();
    Some(NetworkPolicy { namespace, name, pod_selector, policy_types, ingress: Vec::new(), egress: Vec::new() })
}

pub fn network_policy(np: &api::NetworkPolicy) -> Result<NetworkPolicy, SourceError> {
    let namespace = np.metadata.namespace.clone().unwrap_or_default();
    let name = np.metadata.name.clone().unwrap_or_default();
    let cx = Ctx { object: format!("{namespace}/{name}") };
    if namespace.is_empty() {
        return Err(cx.err("metadata.namespace", "", "a NetworkPolicy must have a namespace"));
    }
    let default_spec = api::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);

    let pod_selector = match &spec.pod_selector {
        Some(s) => selector(&cx, "spec.podSelector", s)?,
        None => LabelSelector::default(),
    };

    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.extend(rule(&cx, &path, "from", r.from.as_deref(), r.ports.as_deref())?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.extend(rule(&cx, &path, "to", r.to.as_deref(), r.ports.as_deref())?);
    }

    // Decided on the rules as written, before any were dropped: dropping an all-SCTP
    // egress rule must not turn an egress policy into an ingress-only one.
    let policy_types = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let mut out = Vec::new();
            for (i, t) in types.iter().enumerate() {
                out.push(match t.as_str() {
                    "Ingress" => Direction::Ingress,
                    "Egress" => Direction::Egress,
                    _ => return Err(cx.err(&format!("spec.policyTypes[{i}]"), t, "must be Ingress or Egress")),
                });
            }
            out.sort();
            out.dedup();
            out
        }
        _ => {
            let mut out = vec![Direction::Ingress];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                out.push(Direction::Egress);
            }
            out
        }
    };

    Ok(NetworkPolicy { namespace, name, pod_selector, policy_types, ingress, egress })
}

/// None when nothing of the rule is left to enforce (see the module docs).
fn rule(
    cx: &Ctx,
    path: &str,
    peers_field: &str,
    peers: Option<&[api::NetworkPolicyPeer]>,
    ports: Option<&[api::NetworkPolicyPort]>,
) -> Result<Option<Rule>, SourceError> {
    let ports_in = ports.unwrap_or_default();
    let mut ports_out = Vec::new();
    for (k, p) in ports_in.iter().enumerate() {
        ports_out.extend(port_rule(cx, &format!("{path}.ports[{k}]"), p)?);
    }
    let peers_in = peers.unwrap_or_default();
    let mut peers_out = Vec::new();
    for (j, p) in peers_in.iter().enumerate() {
        peers_out.extend(peer(cx, &format!("{path}.{peers_field}[{j}]"), p)?);
    }
    if !ports_in.is_empty() && ports_out.is_empty() {
        tracing::warn!(policy = %cx.object, rule = path, "rule dropped: all its ports are SCTP");
        return Ok(None);
    }
    if !peers_in.is_empty() && peers_out.is_empty() {
        tracing::debug!(policy = %cx.object, rule = path, "rule dropped: all its peers are IPv6 blocks");
        return Ok(None);
    }
    Ok(Some(Rule { ports: ports_out, peers: peers_out }))
}

fn port_rule(cx: &Ctx, path: &str, p: &api::NetworkPolicyPort) -> Result<Option<PortRule>, SourceError> {
    let port = match &p.port {
        None => None,
        Some(IntOrString::Int(n)) => Some(PortRef::Number(port_number(cx, &format!("{path}.port"), *n)?)),
        Some(IntOrString::String(s)) if s.is_empty() => {
            return Err(cx.err(&format!("{path}.port"), s, "empty port name"))
        }
        Some(IntOrString::String(s)) => Some(PortRef::Name(s.clone())),
    };
    let end_port = match (p.end_port, &port) {
        (None, _) => None,
        (Some(end), Some(PortRef::Number(start))) => {
            let end = port_number(cx, &format!("{path}.endPort"), end)?;
            if end < *start {
                return Err(cx.err(&format!("{path}.endPort"), end, "must not be below port"));
            }
            Some(end)
        }
        (Some(end), _) => {
            return Err(cx.err(&format!("{path}.endPort"), end, "needs a numeric port"));
        }
    };
    let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => {
            tracing::warn!(policy = %cx.object, field = path, "SCTP port skipped: the datapath does not carry SCTP");
            return Ok(None);
        }
        other => return Err(cx.err(&format!("{path}.protocol"), other, "must be TCP, UDP or SCTP")),
    };
    Ok(Some(PortRule { protocol, port, end_port }))
}

fn port_number(cx: &Ctx, path: &str, n: i32) -> Result<u16, SourceError> {
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| cx.err(path, n, "must be between 1 and 65535"))
}

/// None for an IPv6 ipBlock.
fn peer(cx: &Ctx, path: &str, p: &api::NetworkPolicyPeer) -> Result<Option<Peer>, SourceError> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(cx.err(
                &format!("{path}.ipBlock"),
                &b.cidr,
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            ));
        }
        let cidr_path = format!("{path}.ipBlock.cidr");
        let cidr = match b.cidr.parse::<Cidr>() {
            Ok(c) => Some(c),
            Err(CidrError::Ipv6) => None,
            Err(e) => return Err(cx.err(&cidr_path, &b.cidr, &e.to_string())),
        };
        let mut except = Vec::new();
        for (k, e) in b.except.iter().flatten().enumerate() {
            let e_path = format!("{path}.ipBlock.except[{k}]");
            match (e.parse::<Cidr>(), cidr) {
                (Ok(ec), Some(c)) if c.covers(&ec) && ec.prefix > c.prefix => except.push(ec),
                (Err(CidrError::Ipv6), None) => {}
                (Err(CidrError::Invalid), _) => return Err(cx.err(&e_path, e, &CidrError::Invalid.to_string())),
                _ => return Err(cx.err(&e_path, e, &format!("must be a strict subset of cidr {}", b.cidr))),
            }
        }
        return Ok(cidr.map(|cidr| Peer::IpBlock(IpBlock { cidr, except })));
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Err(cx.err(path, "{}", "a peer needs podSelector, namespaceSelector or ipBlock"));
    }
    Ok(Some(Peer::Pods {
        pod_selector: p.pod_selector.as_ref().map(|s| selector(cx, &format!("{path}.podSelector"), s)).transpose()?,
        namespace_selector: p
            .namespace_selector
            .as_ref()
            .map(|s| selector(cx, &format!("{path}.namespaceSelector"), s))
            .transpose()?,
    }))
}

fn selector(cx: &Ctx, path: &str, s: &ApiSelector) -> Result<LabelSelector, SourceError> {
    let mut match_expressions = Vec::new();
    for (i, r) in s.match_expressions.iter().flatten().enumerate() {
        let operator = match r.operator.as_str() {
            "In" => SelectorOp::In,
            "NotIn" => SelectorOp::NotIn,
            "Exists" => SelectorOp::Exists,
            "DoesNotExist" => SelectorOp::DoesNotExist,
            other => {
                return Err(cx.err(
                    &format!("{path}.matchExpressions[{i}].operator"),
                    other,
                    "must be In, NotIn, Exists or DoesNotExist",
                ))
            }
        };
        match_expressions.push(SelectorRequirement {
            key: r.key.clone(),
            operator,
            values: r.values.clone().unwrap_or_default(),
        });
    }
    Ok(LabelSelector { match_labels: s.match_labels.clone().unwrap_or_default(), match_expressions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn np(spec: serde_json::Value) -> api::NetworkPolicy {
        serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn convert(spec: serde_json::Value) -> NetworkPolicy {
        network_policy(&np(spec)).unwrap()
    }

    fn error(spec: serde_json::Value) -> SourceError {
        network_policy(&np(spec)).unwrap_err()
    }

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn policy_types_default_from_the_rules() {
        let p = convert(json!({"podSelector": {}}));
        assert_eq!(p.policy_types, vec![Direction::Ingress]);
        assert!(p.ingress.is_empty() && p.egress.is_empty());

        let p = convert(json!({"podSelector": {}, "egress": [{}]}));
        assert_eq!(p.policy_types, vec![Direction::Ingress, Direction::Egress]);
        assert_eq!(p.egress, vec![Rule::default()], "an empty rule allows everything");

        let p = convert(json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}));
        assert_eq!(p.policy_types, vec![Direction::Egress]);

        // An empty egress list is no egress section.
        let p = convert(json!({"podSelector": {}, "egress": []}));
        assert_eq!(p.policy_types, vec![Direction::Ingress]);
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "web"));
    }

    #[test]
    fn ports_default_to_tcp_and_take_numbers_names_and_ranges() {
        let p = convert(json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"ports": [
                {"port": 80},
                {"port": "http", "protocol": "TCP"},
                {"protocol": "UDP"},
                {"port": 32000, "endPort": 32768, "protocol": "UDP"},
            ]}],
        }));
        assert_eq!(p.pod_selector.match_labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            p.ingress[0].ports,
            vec![
                PortRule { protocol: Protocol::Tcp, port: Some(PortRef::Number(80)), end_port: None },
                PortRule { protocol: Protocol::Tcp, port: Some(PortRef::Name("http".into())), end_port: None },
                PortRule { protocol: Protocol::Udp, port: None, end_port: None },
                PortRule { protocol: Protocol::Udp, port: Some(PortRef::Number(32000)), end_port: Some(32768) },
            ]
        );
        assert!(p.ingress[0].peers.is_empty());
    }

    #[test]
    fn sctp_ports_are_skipped_and_an_all_sctp_rule_allows_nothing() {
        let p = convert(json!({
            "podSelector": {},
            "ingress": [
                {"ports": [{"port": 7777, "protocol": "SCTP"}]},
                {"ports": [{"port": 7777, "protocol": "SCTP"}, {"port": 80}]},
            ],
            "egress": [{"ports": [{"protocol": "SCTP"}]}],
        }));
        assert_eq!(p.ingress.len(), 1, "the all-SCTP rule is gone, not turned into 'all ports'");
        assert_eq!(
            p.ingress[0].ports,
            vec![PortRule { protocol: Protocol::Tcp, port: Some(PortRef::Number(80)), end_port: None }]
        );
        assert!(p.egress.is_empty());
        // Still an egress policy: its pods stay egress-isolated.
        assert_eq!(p.policy_types, vec![Direction::Ingress, Direction::Egress]);
    }

    #[test]
    fn peers_selectors_and_ip_blocks() {
        let p = convert(json!({
            "podSelector": {},
            "ingress": [{"from": [
                {"podSelector": {"matchLabels": {"role": "client"}}},
                {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]}},
                {"podSelector": {}, "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}},
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.3.4/32"]}},
                {"ipBlock": {"cidr": "fd00::/8", "except": ["fd00:1::/32"]}},
            ]}],
        }));
        let peers = &p.ingress[0].peers;
        assert_eq!(peers.len(), 4, "the IPv6 block is skipped");
        assert!(
            matches!(&peers[0], Peer::Pods { pod_selector: Some(s), namespace_selector: None } if s.match_labels["role"] == "client")
        );
        match &peers[1] {
            Peer::Pods { pod_selector: None, namespace_selector: Some(s) } => {
                assert_eq!(
                    s.match_expressions,
                    vec![SelectorRequirement {
                        key: "team".into(),
                        operator: SelectorOp::In,
                        values: vec!["a".into(), "b".into()]
                    }]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&peers[2], Peer::Pods { pod_selector: Some(_), namespace_selector: Some(s) } if s.match_expressions[0].operator == SelectorOp::DoesNotExist)
        );
        assert_eq!(
            peers[3],
            Peer::IpBlock(IpBlock { cidr: c("10.0.0.0/8"), except: vec![c("10.1.0.0/16"), c("10.2.3.4/32")] })
        );

        // Only IPv6 peers: the rule must not become "from anywhere".
        let p = convert(json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}]}));
        assert!(p.ingress.is_empty());
    }

    #[test]
    fn bad_policies_name_object_field_and_value() {
        let e = error(json!({"podSelector": {}, "ingress": [{"from": [
            {"podSelector": {}},
            {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}},
        ]}]}));
        assert_eq!(e.object, "shop/web");
        assert_eq!(e.field, "spec.ingress[0].from[1].ipBlock.except[0]");
        assert_eq!(e.value, "10.1.0.0/24");
        let msg = e.to_string();
        assert!(
            msg.contains("shop/web")
                && msg.contains("spec.ingress[0].from[1].ipBlock.except[0]")
                && msg.contains("10.1.0.0/24"),
            "{msg}"
        );

        let cases = [
            (
                json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
                "spec.egress[0].to[0].ipBlock.cidr",
                "10.0.0.0/33",
            ),
            (
                json!({"egress": [{"to": [{"ipBlock": {"cidr": "banana"}}]}]}),
                "spec.egress[0].to[0].ipBlock.cidr",
                "banana",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]}),
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "10.0.0.0/8",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["x"]}}]}]}),
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "x",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/8"]}}]}]}),
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "fd00::/8",
            ),
            (json!({"ingress": [{}, {"ports": [{"port": 70000}]}]}), "spec.ingress[1].ports[0].port", "70000"),
            (json!({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}), "spec.ingress[0].ports[0].endPort", "80"),
            (
                json!({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "80",
            ),
            (
                json!({"ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}),
                "spec.ingress[0].ports[0].protocol",
                "ICMP",
            ),
            (json!({"policyTypes": ["Ingress", "Sideways"]}), "spec.policyTypes[1]", "Sideways"),
            (
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]}}),
                "spec.podSelector.matchExpressions[0].operator",
                "Maybe",
            ),
            (json!({"ingress": [{"from": [{}]}]}), "spec.ingress[0].from[0]", "{}"),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
                "spec.ingress[0].from[0].ipBlock",
                "10.0.0.0/8",
            ),
        ];
        for (spec, field, value) in cases {
            let e = error(spec.clone());
            assert_eq!((e.field.as_str(), e.value.as_str()), (field, value), "{spec}");
            assert_eq!(e.object, "shop/web");
        }
    }

    #[test]
    fn an_unreadable_policy_fails_closed_for_its_pods() {
        let bad = np(json!({"podSelector": {"matchLabels": {"app": "web"}},
                            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/40"}}]}]}));
        assert!(network_policy(&bad).is_err());
        let f = deny_all_fallback(&bad).unwrap();
        assert_eq!((f.namespace.as_str(), f.name.as_str()), ("shop", "web"));
        assert_eq!(f.pod_selector.match_labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(f.policy_types, vec![Direction::Ingress, Direction::Egress]);
        assert!(f.ingress.is_empty() && f.egress.is_empty());
        // Declared types are kept as declared; an unreadable selector gives nothing.
        let ingress_only = np(json!({"policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 70000}]}]}));
        assert_eq!(deny_all_fallback(&ingress_only).unwrap().policy_types, vec![Direction::Ingress]);
        let bad_selector = np(json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}));
        assert!(network_policy(&bad_selector).is_err() && deny_all_fallback(&bad_selector).is_none());
    }

    #[test]
    fn host_bits_of_a_cidr_are_cleared() {
        let p = convert(json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.9.8.7/8"}}]}]}));
        assert_eq!(p.ingress[0].peers, vec![Peer::IpBlock(IpBlock { cidr: c("10.0.0.0/8"), except: vec![] })]);
    }

    fn pod_json(extra_spec: serde_json::Value, status: serde_json::Value) -> Pod {
        let mut spec = json!({
            "nodeName": "node-1",
            "containers": [{"name": "app", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"containerPort": 9999},
                {"name": "assoc", "containerPort": 7777, "protocol": "SCTP"},
            ]}],
        });
        spec.as_object_mut().unwrap().extend(extra_spec.as_object().unwrap().clone());
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "web-1", "labels": {"app": "web"}},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn pods_ipv4_addresses_and_named_ports() {
        let p = pod(&pod_json(
            json!({"initContainers": [
                {"name": "side", "restartPolicy": "Always", "ports": [{"name": "metrics", "containerPort": 9090}]},
                {"name": "init", "ports": [{"name": "setup", "containerPort": 1234}]},
            ]}),
            json!({"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.0.0.5"}]}),
        ))
        .unwrap();
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.name, "web-1");
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(p.ips, vec!["10.0.0.5".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(p.node, "node-1");
        let ports: Vec<(&str, Protocol, u16)> =
            p.named_ports.iter().map(|n| (n.name.as_str(), n.protocol, n.port)).collect();
        assert_eq!(
            ports,
            vec![("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 53), ("metrics", Protocol::Tcp, 9090)]
        );

        // Only podIP set (older clusters).
        let p = pod(&pod_json(json!({}), json!({"phase": "Running", "podIP": "10.0.0.6"}))).unwrap();
        assert_eq!(p.ips, vec!["10.0.0.6".parse::<Ipv4Addr>().unwrap()]);
    }

    #[test]
    fn pods_without_an_address_of_their_own_are_left_out() {
        let running = json!({"phase": "Running", "podIP": "10.0.0.5"});
        assert!(pod(&pod_json(json!({"hostNetwork": true}), running.clone())).is_none());
        assert!(pod(&pod_json(json!({}), json!({"phase": "Succeeded", "podIP": "10.0.0.5"}))).is_none());
        assert!(pod(&pod_json(json!({}), json!({"phase": "Failed", "podIP": "10.0.0.5"}))).is_none());
        assert!(pod(&pod_json(json!({}), json!({"phase": "Pending"}))).is_none());
        assert!(pod(&pod_json(json!({}), json!({"phase": "Running", "podIPs": [{"ip": "fd00::5"}]}))).is_none());
        assert!(pod(&pod_json(json!({}), running)).is_some());
    }

    #[test]
    fn namespaces_keep_their_labels() {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "shop", "labels": {"team": "a"}}})).unwrap();
        let n = namespace(&ns);
        assert_eq!(n.name, "shop");
        assert_eq!(n.labels.get("team").map(String::as_str), Some("a"));
    }
}
