//! Compares a node's kube-proxy rule model with what the API says.
//!
//! The point for a migration: whatever the eBPF datapath takes over must match
//! the API, not the node's (possibly stale) iptables. Differences are listed per
//! node with a reason a human can act on.

use crate::api::{ApiService, ApiServices, ServiceType, SessionAffinity, TrafficPolicy};
use crate::iptables::{normalize_cidr, service_port_key, ChainLayout, RuleModel, ServiceRules};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// Rules for a service port the API no longer has.
    StaleService,
    /// A KUBE-SVC/SEP/... chain nothing jumps to.
    StaleChain,
    /// The API has the service port, the node has no rule for it.
    MissingRules,
    ClusterIpMismatch,
    EndpointMismatch,
    NodePortMismatch,
    AffinityMismatch,
    TrafficPolicyMismatch,
    ExternalAddressMismatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// `ns/name:port/proto`, when the finding is about one service port.
    pub service: Option<String>,
    /// Chains involved, so that an operator can look them up with iptables -S.
    pub chains: Vec<String>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NodeDiff {
    pub node: String,
    /// Name of the iptables-save input.
    pub input: String,
    pub services_checked: usize,
    pub findings: Vec<Finding>,
}

impl NodeDiff {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

fn show(list: &[String]) -> String {
    const MAX: usize = 5;
    if list.len() <= MAX {
        list.join(", ")
    } else {
        format!("{} and {} more", list[..MAX].join(", "), list.len() - MAX)
    }
}

fn rule_chains(s: &ServiceRules) -> Vec<String> {
    match &s.chain_hash {
        Some(h) => vec![format!("KUBE-SVC-{h}")],
        None => Vec::new(),
    }
}

fn targets(eps: &[crate::iptables::EndpointRule]) -> Vec<String> {
    let mut v: Vec<String> = eps.iter().map(|e| crate::api::host_port(&e.ip, e.port)).collect();
    v.sort();
    v.dedup();
    v
}

fn set_diff(want: &[String], have: &[String]) -> (Vec<String>, Vec<String>) {
    let w: BTreeSet<&String> = want.iter().collect();
    let h: BTreeSet<&String> = have.iter().collect();
    (w.difference(&h).map(|s| s.to_string()).collect(), h.difference(&w).map(|s| s.to_string()).collect())
}

/// Diffs one node's rules against the API. `node` is the node's name as in
/// the API, used to pick its local endpoints for Local traffic policies.
pub fn diff_node(node: &str, model: &RuleModel, api: &ApiServices) -> NodeDiff {
    let mut out = NodeDiff { node: node.to_string(), input: model.input.clone(), ..Default::default() };
    let by_key: HashMap<String, &ServiceRules> = model
        .services
        .iter()
        .map(|s| (service_port_key(&s.namespace, &s.name, &s.port_name, &s.protocol), s))
        .collect();
    let mut api_keys = BTreeSet::new();

    for svc in api.services.iter().filter(|s| s.is_proxied()) {
        for port in &svc.ports {
            let key = service_port_key(&svc.namespace, &svc.name, &port.name, &port.protocol);
            api_keys.insert(key.clone());
            out.services_checked += 1;
            match by_key.get(&key) {
                None => out.findings.push(missing(svc, port, &key)),
                Some(rules) => compare(node, svc, port, &key, rules, model.layout, &mut out.findings),
            }
        }
    }

    for s in &model.services {
        let key = service_port_key(&s.namespace, &s.name, &s.port_name, &s.protocol);
        if api_keys.contains(&key) {
            continue;
        }
        let what = if s.name.is_empty() {
            match model.layout {
                ChainLayout::Ipvs => format!("virtual server {}", s.chain_hash.as_deref().unwrap_or("?")),
                _ => format!("chain hash {}", s.chain_hash.as_deref().unwrap_or("?")),
            }
        } else {
            s.display_name()
        };
        out.findings.push(Finding {
            kind: FindingKind::StaleService,
            service: (!s.name.is_empty()).then(|| key.clone()),
            chains: rule_chains(s),
            reason: format!(
                "{} still has rules for {what} ({}), which the API does not have: the service or port was deleted and kube-proxy has not synced",
                match model.layout {
                    ChainLayout::Nftables => "nftables",
                    ChainLayout::Ipvs => "IPVS",
                    _ => "iptables",
                },
                s.protocol
            ),
        });
    }
    for c in &model.unreferenced_chains {
        out.findings.push(Finding {
            kind: FindingKind::StaleChain,
            service: None,
            chains: vec![c.clone()],
            reason: format!("chain {c} exists but no rule jumps to it; it is left over and can be removed with the other KUBE-* chains"),
        });
    }
    out.findings.sort_by(|a, b| (a.kind, &a.service).cmp(&(b.kind, &b.service)));
    out
}

fn missing(svc: &ApiService, port: &crate::api::ApiServicePort, key: &str) -> Finding {
    let (ready, _) = svc.proxied_targets(port, None);
    let ip = svc.cluster_ip.as_deref().unwrap_or("");
    let reason = if ready.is_empty() {
        format!(
            "no rule for {}:{} {}: the API lists no ready endpoint, so kube-proxy should have written a REJECT rule, and did not",
            ip, port.port, port.protocol
        )
    } else {
        format!(
            "no rule for {}:{} {} although the API lists {} ready endpoint(s) ({}): kube-proxy on this node has not synced this service",
            ip,
            port.port,
            port.protocol,
            ready.len(),
            show(&ready)
        )
    };
    Finding { kind: FindingKind::MissingRules, service: Some(key.to_string()), chains: Vec::new(), reason }
}

fn compare(
    node: &str,
    svc: &ApiService,
    port: &crate::api::ApiServicePort,
    key: &str,
    s: &ServiceRules,
    layout: ChainLayout,
    f: &mut Vec<Finding>,
) {
    let mut push =
        |kind, reason: String| f.push(Finding { kind, service: Some(key.to_string()), chains: rule_chains(s), reason });
    let api_ip = svc.cluster_ip.as_deref().unwrap_or("");
    if s.cluster_ip.as_deref() != Some(api_ip) || s.port.is_some_and(|p| p != port.port) {
        push(
            FindingKind::ClusterIpMismatch,
            format!(
                "rules capture {}:{}, the API says {}:{}",
                s.cluster_ip.as_deref().unwrap_or("nothing"),
                s.port.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                api_ip,
                port.port
            ),
        );
    }

    // kube-proxy's targets: ready endpoints, else serving-terminating ones.
    let (all_ready, fell_back) = svc.proxied_targets(port, None);
    // With internalTrafficPolicy Local the cluster IP only reaches this node's
    // endpoints (KUBE-SVL), and there is no cluster-wide list to compare.
    let internal_local = svc.internal_traffic_policy == TrafficPolicy::Local;
    let (want, have, which) = if internal_local {
        (
            svc.proxied_targets(port, Some(node)).0,
            targets(&s.local_endpoints),
            "local endpoints (internalTrafficPolicy Local)",
        )
    } else {
        let which = if fell_back {
            "endpoints (no ready one: kube-proxy falls back to the serving-terminating ones)"
        } else {
            "endpoints"
        };
        (all_ready.clone(), targets(&s.endpoints), which)
    };
    if all_ready.is_empty() {
        if !have.is_empty() {
            push(
                FindingKind::EndpointMismatch,
                format!("the API lists no ready endpoint but the rules still send traffic to {}", show(&have)),
            );
        } else if !s.reject_no_endpoints {
            push(
                FindingKind::EndpointMismatch,
                "the API lists no ready endpoint and there is no REJECT rule: clients will hang instead of being refused".into(),
            );
        }
    } else {
        let (missing, extra) = set_diff(&want, &have);
        if !missing.is_empty() || !extra.is_empty() {
            let mut parts = Vec::new();
            if !missing.is_empty() {
                parts.push(format!("ready in the API but not in the rules: {}", show(&missing)));
            }
            if !extra.is_empty() {
                parts.push(format!("in the rules but not ready in the API: {}", show(&extra)));
            }
            push(FindingKind::EndpointMismatch, format!("{which} differ; {}", parts.join("; ")));
        }
        if s.reject_no_endpoints {
            push(
                FindingKind::EndpointMismatch,
                "a REJECT \"has no endpoints\" rule is present although the API lists ready endpoints".into(),
            );
        }
    }

    let external = svc.service_type == ServiceType::NodePort
        || svc.service_type == ServiceType::LoadBalancer
        || !svc.external_ips.is_empty();
    if let (Some(api), Some(rules)) = (svc.health_check_node_port, s.health_check_node_port) {
        if api != rules {
            push(
                FindingKind::TrafficPolicyMismatch,
                format!("health check node port is {api} in the API, the rules accept {rules}"),
            );
        }
    }
    // Without endpoints only the health check port still shows Local; when
    // the rules show nothing local either, there is nothing to compare.
    if external && (!all_ready.is_empty() || s.local_only) {
        let api_local = svc.external_traffic_policy == TrafficPolicy::Local;
        if api_local != s.local_only {
            push(
                FindingKind::TrafficPolicyMismatch,
                format!(
                    "externalTrafficPolicy is {} in the API but the rules implement {}",
                    if api_local { "Local" } else { "Cluster" },
                    if s.local_only { "Local" } else { "Cluster" }
                ),
            );
        } else if api_local && !all_ready.is_empty() {
            let want_local = svc.proxied_targets(port, Some(node)).0;
            let (missing, extra) = set_diff(&want_local, &targets(&s.local_endpoints));
            if !missing.is_empty() || !extra.is_empty() {
                push(
                    FindingKind::EndpointMismatch,
                    format!(
                        "local endpoints on node {node} differ; in the API: [{}], in the rules: [{}]",
                        show(&want_local),
                        show(&targets(&s.local_endpoints))
                    ),
                );
            }
        }
    }

    if let Some(np) = port.node_port {
        if !s.node_ports.contains(&np) {
            push(
                FindingKind::NodePortMismatch,
                format!("the API allocates node port {np}; the rules have {:?}", s.node_ports),
            );
        }
    }
    for np in &s.node_ports {
        if port.node_port != Some(*np) {
            push(
                FindingKind::NodePortMismatch,
                format!("the rules open node port {np}, which the API does not allocate to this port"),
            );
        }
    }

    if !all_ready.is_empty() && !s.endpoints.is_empty() {
        let want = match svc.session_affinity {
            SessionAffinity::ClientIP => Some(svc.session_affinity_timeout.unwrap_or(10800)),
            SessionAffinity::None => None,
        };
        if want != s.affinity_seconds {
            let fmt = |v: Option<u32>| v.map(|s| format!("ClientIP for {s} s")).unwrap_or_else(|| "none".into());
            push(
                FindingKind::AffinityMismatch,
                format!("session affinity in the API: {}; in the rules: {}", fmt(want), fmt(s.affinity_seconds)),
            );
        }
    }

    if !all_ready.is_empty() && !svc.lb_source_ranges.is_empty() && !svc.lb_ingress_ips.is_empty() {
        if let Some(reason) = source_range_mismatch(svc, s) {
            push(FindingKind::ExternalAddressMismatch, reason);
        }
    }
    // Without endpoints kube-proxy writes one REJECT per external address and
    // the rule no longer says whether it is an external or an LB IP; in
    // nftables mode only LB IPs with source ranges are told apart at all.
    if all_ready.is_empty() || layout == ChainLayout::Nftables {
        let mut want: Vec<String> = svc.external_ips.iter().chain(&svc.lb_ingress_ips).cloned().collect();
        let mut have: Vec<String> = s.external_ips.iter().chain(&s.lb_ips).cloned().collect();
        want.sort();
        want.dedup();
        have.sort();
        have.dedup();
        if want != have {
            push(
                FindingKind::ExternalAddressMismatch,
                format!("external and load balancer IPs: API has [{}], rules have [{}]", show(&want), show(&have)),
            );
        }
        return;
    }
    let (miss_ext, extra_ext) = set_diff(&svc.external_ips, &s.external_ips);
    if !miss_ext.is_empty() || !extra_ext.is_empty() {
        push(
            FindingKind::ExternalAddressMismatch,
            format!("external IPs: API has [{}], rules have [{}]", show(&svc.external_ips), show(&s.external_ips)),
        );
    }
    let (miss_lb, extra_lb) = set_diff(&svc.lb_ingress_ips, &s.lb_ips);
    if !miss_lb.is_empty() || !extra_lb.is_empty() {
        push(
            FindingKind::ExternalAddressMismatch,
            format!("load balancer IPs: API has [{}], rules have [{}]", show(&svc.lb_ingress_ips), show(&s.lb_ips)),
        );
    }
}

/// loadBalancerSourceRanges against KUBE-FW-*'s sources, both normalized. The
/// LB IPs kube-proxy adds as sources (when a range holds the node) are allowed
/// extras; a range of the spec that equals an LB IP is found among them.
fn source_range_mismatch(svc: &ApiService, s: &ServiceRules) -> Option<String> {
    let norm = |v: &[String]| -> Vec<String> { v.iter().map(|r| normalize_cidr(r)).collect() };
    let want = norm(&svc.lb_source_ranges);
    let lb_ips = norm(&svc.lb_ingress_ips);
    let have: Vec<String> = s.lb_source_ranges.iter().chain(&s.lb_source_lb_ips).cloned().collect();
    let (missing, extra) = set_diff(&want, &have);
    let extra: Vec<String> = extra.into_iter().filter(|e| !lb_ips.contains(e)).collect();
    if missing.is_empty() && extra.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("in the API but not accepted by the firewall chain: {}", show(&missing)));
    }
    if !extra.is_empty() {
        parts.push(format!("accepted by the firewall chain but not in the API: {}", show(&extra)));
    }
    Some(format!("loadBalancerSourceRanges differ; {}", parts.join("; ")))
}

/// Diffs every node; `models` pairs node names with their parsed rules.
pub fn diff_nodes<'a>(models: impl IntoIterator<Item = (&'a str, &'a RuleModel)>, api: &ApiServices) -> Vec<NodeDiff> {
    models.into_iter().map(|(n, m)| diff_node(n, m, api)).collect()
}
