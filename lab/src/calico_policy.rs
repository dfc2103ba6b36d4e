//! NetworkPolicy enforcement in the lab's calico-node, shaped like Felix's iptables
//! data plane: per-workload chains `cali-tw-<veth>` (to workload = ingress) and
//! `cali-fw-<veth>` (from workload = egress), dispatched from a chain at the top of
//! FORWARD, with conntrack letting replies through. Peers are listed by address (Felix
//! uses ipsets; at lab scale a rule per peer set is enough).
//!
//! It implements Kubernetes NetworkPolicy v1 (networking.k8s.io): podSelector,
//! namespaceSelector and both together, ipBlock with except, ports by number and
//! name, endPort, policyTypes, several policies OR'ed. Calico's own NetworkPolicy and
//! GlobalNetworkPolicy CRDs are not enforced by the lab. Traffic from a node to its own
//! pods is always allowed, as the Kubernetes API documents.
//!
//! Peers are selected the way Felix selects them with the Kubernetes datastore: among
//! the WorkloadEndpoints libcalico-go derives from Pods ([`pod_info`]), so pods on
//! kubeshift's network during a migration are matched by their labels like Calico's own.

use crate::cni_plugins::calico_veth_name;
use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::watcher;
use kube::Client;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// One policy rule: its peers (absent: everyone) and ports.
type Rule = (Option<Vec<NetworkPolicyPeer>>, Option<Vec<NetworkPolicyPort>>);

const MARK: &str = "0x100000/0x100000";
const TOP: &str = "cali-pol-FORWARD";

#[derive(Debug, Clone)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: String,
    pub node: String,
    /// (name, port, protocol) of every container port.
    pub ports: Vec<(String, i32, String)>,
}

/// Calico CNI's annotations, read when the status has no address yet.
const ANNOTATION_POD_IP: &str = "cni.projectcalico.org/podIP";
const ANNOTATION_POD_IPS: &str = "cni.projectcalico.org/podIPs";

/// A pod as Felix sees it with the Kubernetes datastore: the WorkloadEndpoint that
/// libcalico-go derives from it (lib/backend/k8s/conversion, v3.32.1: `IsReadyCalicoPod`,
/// `IsFinished`, `getPodIPs`). Every scheduled, not host-networked, unfinished pod with
/// an address gets one, whichever CNI plugin wired it: that is why a policy Calico
/// enforces matches pods on kubeshift's network by their labels, and no bridge is
/// needed. (With the etcd datastore only Calico's CNI plugin writes endpoints; the
/// planner refuses that case.)
fn pod_info(p: &Pod) -> Option<PodInfo> {
    let spec = p.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let annotations = p.metadata.annotations.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    // Finished: its phase says so, or Calico's CNI has taken the address of a pod in
    // its termination grace period (the annotation set to ""). A terminating pod keeps
    // its endpoint until then.
    let released =
        p.metadata.deletion_timestamp.is_some() && annotations.get(ANNOTATION_POD_IP).is_some_and(|ip| ip.is_empty());
    if released || matches!(status.phase.as_deref(), Some("Failed" | "Succeeded" | "Completed")) {
        return None;
    }
    // The status first, then Calico's annotations; the lab's networks are IPv4.
    let from_status = status.pod_ips.iter().flatten().map(|a| a.ip.clone()).chain(status.pod_ip.clone());
    let from_annotations = [ANNOTATION_POD_IPS, ANNOTATION_POD_IP]
        .into_iter()
        .filter_map(|k| annotations.get(k))
        .flat_map(|v| v.split(',').map(|a| a.split('/').next().unwrap_or(a).trim().to_string()));
    let ip = from_status.chain(from_annotations).find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())?;
    Some(PodInfo {
        namespace: p.metadata.namespace.clone()?,
        name: p.metadata.name.clone()?,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ip,
        node,
        ports: spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .map(|cp| {
                (
                    cp.name.clone().unwrap_or_default(),
                    cp.container_port,
                    cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                )
            })
            .collect(),
    })
}

fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    match Selector::try_from(sel.clone()) {
        Ok(s) => s.matches(labels),
        // A selector the apiserver accepted but we cannot parse selects nothing.
        Err(_) => false,
    }
}

pub struct Cluster {
    pub pods: Vec<PodInfo>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub policies: Vec<NetworkPolicy>,
}

fn peer_ips(c: &Cluster, policy_ns: &str, peer: &NetworkPolicyPeer) -> Vec<(String, Vec<String>)> {
    if let Some(b) = &peer.ip_block {
        return vec![(b.cidr.clone(), b.except.clone().unwrap_or_default())];
    }
    c.pods
        .iter()
        .filter(|p| match (&peer.namespace_selector, &peer.pod_selector) {
            (Some(ns), pod) => {
                c.namespaces.get(&p.namespace).map(|l| selects(ns, l)).unwrap_or(false)
                    && pod.as_ref().map(|s| selects(s, &p.labels)).unwrap_or(true)
            }
            (None, Some(pod)) => p.namespace == policy_ns && selects(pod, &p.labels),
            (None, None) => false,
        })
        .map(|p| (format!("{}/32", p.ip), vec![]))
        .collect()
}

/// `-p proto --dport N[:M]` for one port entry; named ports resolve against `target`'s
/// container ports (None when the target has no such port: the entry matches nothing).
fn port_match(p: &NetworkPolicyPort, target: &PodInfo) -> Option<String> {
    let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
    let port = match &p.port {
        None => return Some(format!("-p {}", proto.to_lowercase())),
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            target.ports.iter().find(|(n, _, pr)| n == name && *pr == proto).map(|x| x.1)?
        }
    };
    Some(match p.end_port {
        Some(end) if end > port => format!("-p {} --dport {port}:{end}", proto.to_lowercase()),
        _ => format!("-p {} --dport {port}", proto.to_lowercase()),
    })
}

fn policy_types(p: &NetworkPolicy) -> (bool, bool) {
    let spec = p.spec.clone().unwrap_or_default();
    match &spec.policy_types {
        Some(t) => (t.iter().any(|x| x == "Ingress"), t.iter().any(|x| x == "Egress")),
        None => (true, spec.egress.is_some()),
    }
}

/// The filter-table rules for the pods of `node`, as iptables-restore input.
pub fn render(c: &Cluster, node: &str) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let _ = writeln!(rules, "-A {TOP} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
    let _ = writeln!(rules, "-A {TOP} -m conntrack --ctstate INVALID -j DROP");
    let mut sub = 0usize;
    for pod in c.pods.iter().filter(|p| p.node == node) {
        let veth = calico_veth_name(&pod.namespace, &pod.name);
        for ingress in [false, true] {
            let chain = format!("cali-{}-{veth}", if ingress { "tw" } else { "fw" });
            let _ = writeln!(chains, ":{chain} - [0:0]");
            let _ = writeln!(rules, "-A {TOP} -{} {veth} -j {chain}", if ingress { "o" } else { "i" });
            let _ = writeln!(rules, "-A {chain} -j MARK --set-xmark 0x0/0x100000");
            let applying: Vec<&NetworkPolicy> = c
                .policies
                .iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(pod.namespace.as_str()))
                .filter(|p| {
                    p.spec
                        .as_ref()
                        .map(|s| s.pod_selector.as_ref().map(|sel| selects(sel, &pod.labels)).unwrap_or(true))
                        .unwrap_or(false)
                })
                .filter(|p| if ingress { policy_types(p).0 } else { policy_types(p).1 })
                .collect();
            if applying.is_empty() {
                let _ = writeln!(rules, "-A {chain} -j RETURN");
                continue;
            }
            for pol in applying {
                let ns = pol.metadata.namespace.clone().unwrap_or_default();
                let spec = pol.spec.clone().unwrap_or_default();
                // Each rule: (peers, ports). An absent peer list means everyone.
                let entries: Vec<Rule> = if ingress {
                    spec.ingress.unwrap_or_default().into_iter().map(|r| (r.from, r.ports)).collect()
                } else {
                    spec.egress.unwrap_or_default().into_iter().map(|r| (r.to, r.ports)).collect()
                };
                for (peers, ports) in entries {
                    let dir = if ingress { "-s" } else { "-d" };
                    let peer_sets: Vec<(String, Vec<String>)> = match &peers {
                        None => vec![("0.0.0.0/0".into(), vec![])],
                        Some(list) if list.is_empty() => vec![("0.0.0.0/0".into(), vec![])],
                        Some(list) => list.iter().flat_map(|p| peer_ips(c, &ns, p)).collect(),
                    };
                    for (cidr, except) in peer_sets {
                        // Ports resolve on the destination: the local pod for ingress,
                        // the peer pod for egress.
                        let target =
                            if ingress { Some(pod) } else { c.pods.iter().find(|p| format!("{}/32", p.ip) == cidr) };
                        let matches: Vec<String> = match &ports {
                            None => vec![String::new()],
                            Some(ps) if ps.is_empty() => vec![String::new()],
                            Some(ps) => ps
                                .iter()
                                .filter_map(|p| match target {
                                    Some(t) => port_match(p, t),
                                    None if matches!(p.port, Some(IntOrString::String(_))) => None,
                                    None => port_match(p, pod),
                                })
                                .collect(),
                        };
                        let jump = if except.is_empty() {
                            "MARK --set-xmark 0x100000/0x100000".to_string()
                        } else {
                            sub += 1;
                            let sc = format!("cali-pi-{node}-{sub}");
                            let _ = writeln!(chains, ":{sc} - [0:0]");
                            for e in &except {
                                let _ = writeln!(rules, "-A {sc} {dir} {e} -j RETURN");
                            }
                            let _ = writeln!(rules, "-A {sc} -j MARK --set-xmark 0x100000/0x100000");
                            sc
                        };
                        for m in matches {
                            let _ = writeln!(rules, "-A {chain} {dir} {cidr} {m} -j {jump}");
                        }
                    }
                }
            }
            let _ = writeln!(rules, "-A {chain} -m mark --mark {MARK} -j RETURN");
            let _ = writeln!(rules, "-A {chain} -m comment --comment \"cali:policy-drop\" -j DROP");
        }
    }
    format!("*filter\n:{TOP} - [0:0]\n{chains}{rules}COMMIT\n")
}

async fn snapshot(client: &Client) -> Result<Cluster> {
    let lp = ListParams::default();
    let pods = Api::<Pod>::all(client.clone()).list(&lp).await?.items.iter().filter_map(pod_info).collect();
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&lp)
        .await?
        .items
        .into_iter()
        .map(|n| (n.metadata.name.unwrap_or_default(), n.metadata.labels.unwrap_or_default()))
        .collect();
    let policies = Api::<NetworkPolicy>::all(client.clone()).list(&lp).await?.items;
    Ok(Cluster { pods, namespaces, policies })
}

/// Removes chains of pods that are gone: a chain no longer in the rendered set.
fn stale_chains(rendered: &str) -> Result<Vec<String>> {
    let out = crate::sys::run(std::process::Command::new("iptables-save").args(["-t", "filter"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("cali-tw-") || c.starts_with("cali-fw-") || c.starts_with("cali-pi-"))
        .filter(|c| !rendered.contains(&format!(":{c} ")))
        .map(str::to_string)
        .collect())
}

fn apply(rendered: &str) -> Result<()> {
    crate::flanneld::iptables_restore(rendered)?;
    // Ours must come before kube-proxy's KUBE-FORWARD, which accepts pod traffic.
    let first = crate::sys::run(std::process::Command::new("iptables").args(["-w", "-S", "FORWARD", "1"]))?;
    if !first.contains(TOP) {
        let _ = crate::sys::run(std::process::Command::new("iptables").args(["-w", "-D", "FORWARD", "-j", TOP]));
        crate::sys::run(std::process::Command::new("iptables").args(["-w", "-I", "FORWARD", "1", "-j", TOP]))?;
    }
    let stale = stale_chains(rendered)?;
    if !stale.is_empty() {
        let mut s = String::from("*filter\n");
        for c in &stale {
            let _ = writeln!(s, ":{c} - [0:0]");
        }
        for c in &stale {
            let _ = writeln!(s, "-X {c}");
        }
        s.push_str("COMMIT\n");
        crate::flanneld::iptables_restore(&s)?;
    }
    Ok(())
}

/// Keeps the node's policy chains in step with the API, like Felix.
pub async fn enforce(client: Client, node: String) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(64);
    macro_rules! trigger {
        ($ty:ty) => {{
            let tx = tx.clone();
            let api: Api<$ty> = Api::all(client.clone());
            tokio::spawn(async move {
                let mut s = watcher(api, watcher::Config::default()).boxed();
                while let Some(ev) = s.next().await {
                    if ev.is_ok() {
                        let _ = tx.try_send(());
                    }
                }
            });
        }};
    }
    trigger!(Pod);
    trigger!(Namespace);
    trigger!(NetworkPolicy);
    let mut last = String::new();
    loop {
        // Wake on a change, or every few seconds to re-assert our place in FORWARD.
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        while rx.try_recv().is_ok() {}
        match snapshot(&client).await {
            Ok(c) => {
                let rendered = render(&c, &node);
                if let Err(e) = apply(&rendered) {
                    tracing::warn!("policy rules: {e:#}");
                } else if rendered != last {
                    tracing::info!(
                        "policy rules for {} local pods applied",
                        c.pods.iter().filter(|p| p.node == node).count()
                    );
                    last = rendered;
                }
            }
            Err(e) => tracing::warn!("policy snapshot: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, ip: &str, node: &str, labels: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ip: ip.into(),
            node: node.into(),
            ports: vec![("http".into(), 8080, "TCP".into())],
        }
    }

    fn cluster(policies: Vec<serde_json::Value>) -> Cluster {
        Cluster {
            pods: vec![
                pod("a", "web", "10.0.0.2", "n1", &[("app", "web")]),
                pod("a", "cli", "10.0.1.3", "n2", &[("app", "cli")]),
                pod("b", "other", "10.0.1.4", "n2", &[("app", "cli")]),
            ],
            namespaces: [
                ("a".to_string(), BTreeMap::new()),
                ("b".to_string(), [("team".to_string(), "b".to_string())].into()),
            ]
            .into(),
            policies: policies.into_iter().map(|p| serde_json::from_value(p).unwrap()).collect(),
        }
    }

    fn api_pod(v: serde_json::Value) -> Pod {
        let mut base = json!({"metadata": {"name": "p", "namespace": "a", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "10.200.1.5", "podIPs": [{"ip": "10.200.1.5"}]}});
        json_patch(&mut base, v);
        serde_json::from_value(base).unwrap()
    }

    fn json_patch(base: &mut serde_json::Value, v: serde_json::Value) {
        match (base, v) {
            (serde_json::Value::Object(b), serde_json::Value::Object(v)) => {
                for (k, val) in v {
                    json_patch(b.entry(k).or_insert(serde_json::Value::Null), val);
                }
            }
            (b, v) => *b = v,
        }
    }

    #[test]
    fn endpoints_come_from_every_pod_with_an_address_like_calicos_kdd_converter() {
        // A pod another CNI plugin wired (no Calico annotation) is an endpoint: policies
        // Calico enforces select it by its labels.
        let e = pod_info(&api_pod(json!({}))).expect("a running pod on kubeshift's network is an endpoint");
        assert_eq!((e.ip.as_str(), e.node.as_str()), ("10.200.1.5", "n1"));
        assert_eq!(e.labels["app"], "web");
        // No status address yet: Calico's CNI annotations give it.
        let p = api_pod(json!({"metadata": {"annotations": {ANNOTATION_POD_IPS: "10.244.3.4/32"}},
            "status": {"podIP": null, "podIPs": null}}));
        assert_eq!(pod_info(&p).unwrap().ip, "10.244.3.4");
        // A terminating pod keeps its endpoint until Calico's CNI empties the annotation.
        let p = api_pod(json!({"metadata": {"deletionTimestamp": "2026-12-03T10:00:00Z"}}));
        assert!(pod_info(&p).is_some());
        let p = api_pod(
            json!({"metadata": {"deletionTimestamp": "2026-12-03T10:00:00Z", "annotations": {ANNOTATION_POD_IP: ""}}}),
        );
        assert!(pod_info(&p).is_none(), "the address was released");
        for (why, patch) in [
            ("finished", json!({"status": {"phase": "Succeeded"}})),
            ("failed", json!({"status": {"phase": "Failed"}})),
            ("host network", json!({"spec": {"hostNetwork": true}})),
            ("not scheduled", json!({"spec": {"nodeName": null}})),
            ("no address", json!({"status": {"podIP": null, "podIPs": null}})),
        ] {
            assert!(pod_info(&api_pod(patch)).is_none(), "{why}: not an endpoint");
        }
    }

    #[test]
    fn unselected_pods_return_and_selected_pods_drop_by_default() {
        let r = render(&cluster(vec![]), "n1");
        let web = calico_veth_name("a", "web");
        assert!(r.contains(&format!("-A cali-tw-{web} -j RETURN")));
        let r = render(
            &cluster(vec![json!({"metadata": {"name": "deny", "namespace": "a"}, "spec": {"podSelector": {}}})]),
            "n1",
        );
        assert!(r.contains(&format!("-A cali-tw-{web} -m comment --comment \"cali:policy-drop\" -j DROP")), "{r}");
        // Egress is not isolated by an ingress-only policy.
        assert!(r.contains(&format!("-A cali-fw-{web} -j RETURN")), "{r}");
    }

    #[test]
    fn peers_ports_and_except_become_rules() {
        let r = render(
            &cluster(vec![json!({"metadata": {"name": "p", "namespace": "a"}, "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}], "ports": [{"port": "http"}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}], "ports": [{"port": 9000, "endPort": 9100, "protocol": "UDP"}]},
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.1.0/24"]}}]}
            ]}})]),
            "n1",
        );
        let web = calico_veth_name("a", "web");
        // Same-namespace pod selector picks a/cli, not b/other.
        assert!(r.contains(&format!("-A cali-tw-{web} -s 10.0.1.3/32 -p tcp --dport 8080 -j MARK")), "{r}");
        assert!(!r.contains("-s 10.0.1.4/32 -p tcp --dport 8080"), "{r}");
        assert!(r.contains(&format!("-A cali-tw-{web} -s 10.0.1.4/32 -p udp --dport 9000:9100 -j MARK")), "{r}");
        assert!(
            r.contains("-s 10.0.1.0/24 -j RETURN")
                && r.contains(&format!("-A cali-tw-{web} -s 10.0.0.0/8  -j cali-pi-n1-1")),
            "{r}"
        );
    }
}
