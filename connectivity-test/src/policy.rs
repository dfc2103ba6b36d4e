//! Policy scenarios: each applies NetworkPolicies to the suite's own pods, expects some
//! probes allowed and some denied, and removes its policies afterwards. The target is
//! always `pod-1` on the second node, so the checks cross nodes (and, during a
//! migration, cross datapaths when one node is migrated and the other is not).

use crate::deploy::Endpoint;
use crate::model::{Probe, Proto};
use crate::scenarios::Check;
use serde_json::{json, Value};

pub struct PolicyScenario {
    pub name: &'static str,
    pub description: &'static str,
    pub policies: Vec<Value>,
    pub checks: Vec<Check>,
}

fn check(n: &mut usize, from: &Endpoint, to: &Endpoint, proto: Proto, allowed: bool, timeout_ms: u64) -> Check {
    *n += 1;
    Check {
        from: from.pod.clone(),
        from_key: from.key.clone(),
        target: to.key.clone(),
        probe: Probe {
            id: format!("p{n}"),
            addr: to.ip.clone(),
            port: if proto == Proto::Tcp { to.tcp } else { to.udp },
            proto,
            timeout_ms,
        },
        expect: if allowed { vec![to.pod.clone()] } else { vec![] },
    }
}

fn policy(name: &str, ns: &str, select: Value, spec: Value) -> Value {
    let mut s = spec;
    s["podSelector"] = select;
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": format!("kubeshift-{name}"), "namespace": ns, "labels": {"app.kubernetes.io/part-of": crate::deploy::PART_OF}},
           "spec": s})
}

fn endpoint(name: &str) -> Value {
    json!({"matchLabels": {"kubeshift.io/endpoint": name}})
}

/// `api` is the apiserver endpoint ("https://ip:port"): egress policies keep it open,
/// or the agents could not report their own results.
pub fn all(eps: &[Endpoint], ns: &str, api: &str, timeout_ms: u64) -> Vec<PolicyScenario> {
    // In deployment order (the first node first), each once.
    let mut nodes: Vec<&str> = vec![];
    for e in eps {
        if !nodes.contains(&e.node.as_str()) {
            nodes.push(e.node.as_str());
        }
    }
    if nodes.len() < 2 {
        return vec![];
    }
    let find = |node: &str, k: &str| eps.iter().find(|e| e.key == format!("{node}/{k}"));
    let (Some(l1), Some(l2), Some(t), Some(s), Some(p)) = (
        find(nodes[0], "pod-1"),
        find(nodes[0], "pod-2"),
        find(nodes[1], "pod-1"),
        find(nodes[1], "pod-2"),
        find(nodes[0], "peer"),
    ) else {
        return vec![];
    };
    let (api_ip, api_port) = api
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.parse::<u16>().unwrap_or(443)))
        .unwrap_or_default();
    let net16 = {
        let o: Vec<&str> = l1.ip.split('.').collect();
        format!("{}.{}.0.0/16", o[0], o.get(1).unwrap_or(&"0"))
    };
    let mut n = 0;
    let mut c = |f: &Endpoint, to: &Endpoint, pr: Proto, ok: bool| check(&mut n, f, to, pr, ok, timeout_ms);
    vec![
        PolicyScenario {
            name: "policy-all-ingress-deny",
            description: "a deny-all ingress policy blocks pods of every node and namespace",
            policies: vec![policy("deny-ingress", ns, json!({}), json!({"policyTypes": ["Ingress"]}))],
            checks: vec![
                c(l1, t, Proto::Tcp, false),
                c(l1, t, Proto::Udp, false),
                c(s, t, Proto::Tcp, false),
                c(p, t, Proto::Tcp, false),
            ],
        },
        PolicyScenario {
            name: "policy-all-egress-deny",
            description: "a deny-all egress policy (the apiserver excepted) stops a pod's new connections",
            policies: vec![policy(
                "deny-egress",
                ns,
                endpoint(&l1.pod),
                json!({"policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": format!("{api_ip}/32")}}], "ports": [{"port": api_port, "protocol": "TCP"}]}]}),
            )],
            checks: vec![
                c(l1, t, Proto::Tcp, false),
                c(l1, t, Proto::Udp, false),
                c(l1, l2, Proto::Tcp, false),
                c(l2, t, Proto::Tcp, true),
            ],
        },
        PolicyScenario {
            name: "policy-allow-from-label",
            description: "ingress allowed only from pods with a given label",
            policies: vec![policy(
                "from-label",
                ns,
                endpoint(&t.pod),
                json!({"policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": endpoint(&l1.pod)}]}]}),
            )],
            checks: vec![c(l1, t, Proto::Tcp, true), c(l2, t, Proto::Tcp, false), c(p, t, Proto::Tcp, false)],
        },
        PolicyScenario {
            name: "policy-allow-from-namespace",
            description: "ingress allowed only from another namespace, by namespace label",
            policies: vec![policy(
                "from-namespace",
                ns,
                endpoint(&t.pod),
                json!({"policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubeshift.io/connectivity": "peer"}}}]}]}),
            )],
            checks: vec![c(p, t, Proto::Tcp, true), c(l1, t, Proto::Tcp, false)],
        },
        PolicyScenario {
            name: "policy-port-restricted",
            description: "ingress allowed on the named TCP port only; UDP is denied",
            policies: vec![policy(
                "port",
                ns,
                endpoint(&t.pod),
                json!({"policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"port": "http", "protocol": "TCP"}]}]}),
            )],
            checks: vec![c(l1, t, Proto::Tcp, true), c(l1, t, Proto::Udp, false)],
        },
        PolicyScenario {
            name: "policy-ip-block",
            description: "ingress allowed from an ipBlock with an except",
            policies: vec![policy(
                "ip-block",
                ns,
                endpoint(&t.pod),
                json!({"policyTypes": ["Ingress"],
                "ingress": [{"from": [{"ipBlock": {"cidr": net16, "except": [format!("{}/32", l2.ip)]}}]}]}),
            )],
            checks: vec![c(l1, t, Proto::Tcp, true), c(l2, t, Proto::Tcp, false)],
        },
    ]
}
