//! What the inventory means for the migration: every NetworkPolicy classified,
//! node readiness, cluster-level findings, and the [`PlanInput`] for planning.

use crate::api::TrafficPolicy;
use crate::diff::{diff_node, NodeDiff};
use crate::inventory::{Inventory, PodInfo, PolicyInfo};
use crate::node_report::NodeReport;
use crate::planning::{cidrs_overlap, parse_cidr, PlanInput, PlanNodeInput};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Blocker,
    Attention,
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub severity: Severity,
    /// What it is about: `node/node-1`, `networkpolicy/ns/name`, `cni`, …
    pub subject: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyClass {
    CarriedOver,
    NeedsAttention,
    Blocker,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVerdict {
    /// `networking.k8s.io`, `crd.projectcalico.org/NetworkPolicy` or `…/GlobalNetworkPolicy`.
    pub api: String,
    pub namespace: String,
    pub name: String,
    pub class: PolicyClass,
    pub reasons: Vec<String>,
}

/// Context a policy is judged in.
pub struct PolicyContext<'a> {
    pub legacy_pod_cidrs: Vec<String>,
    pub new_pod_cidr: Option<String>,
    /// `ip` or `ip:port` of the API server (ClusterIP and real endpoints).
    pub apiserver_addresses: &'a [String],
    /// Pods of the policy's namespace (callers index by namespace: thousands of
    /// policies over a cluster's pods must not be a product).
    pub pods: &'a [&'a PodInfo],
}

pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    for (k, v) in sel.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let val = labels.get(&e.key);
        let values = e.values.clone().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => val.is_some_and(|v| values.contains(v)),
            "NotIn" => !val.is_some_and(|v| values.contains(v)),
            "Exists" => val.is_some(),
            "DoesNotExist" => val.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn ip_in(cidr: &str, ip: &str) -> bool {
    let Ok(Some(net)) = parse_cidr(cidr) else { return false };
    let Ok(Some(host)) = parse_cidr(&format!("{ip}/32")) else { return false };
    cidrs_overlap(net, host)
}

fn overlaps(a: &str, b: &str) -> bool {
    matches!((parse_cidr(a), parse_cidr(b)), (Ok(Some(x)), Ok(Some(y))) if cidrs_overlap(x, y))
}

pub fn classify_policy(p: &PolicyInfo, ctx: &PolicyContext) -> PolicyVerdict {
    let mut attention = Vec::new();
    let mut blockers = Vec::new();
    let spec = &p.spec;
    let mut rules: Vec<(&str, Option<&Vec<_>>, Option<&Vec<_>>)> = Vec::new();
    for r in spec.ingress.iter().flatten() {
        rules.push(("ingress", r.from.as_ref(), r.ports.as_ref()));
    }
    for r in spec.egress.iter().flatten() {
        rules.push(("egress", r.to.as_ref(), r.ports.as_ref()));
    }
    for (dir, peers, ports) in &rules {
        for port in ports.iter().copied().flatten() {
            if let Some(IntOrString::String(name)) = &port.port {
                attention.push(format!(
                    "{dir} uses named port \"{name}\": it is resolved per pod; pods whose containers do not declare \"{name}\" get no allow rule, check that every selected pod names its port"
                ));
            }
            if let Some(end) = port.end_port {
                attention.push(format!(
                    "{dir} port range {}-{end}: apiservers before 1.22 drop endPort silently, so the legacy CNI may enforce only the first port while the eBPF datapath enforces the whole range",
                    match &port.port { Some(IntOrString::Int(n)) => n.to_string(), Some(IntOrString::String(s)) => s.clone(), None => "?".into() }
                ));
            }
            if port.protocol.as_deref() == Some("SCTP") {
                blockers.push(format!("{dir} allows SCTP: the eBPF datapath enforces TCP and UDP only; remove the SCTP port or keep this namespace on the legacy CNI"));
            }
        }
        for peer in peers.iter().copied().flatten() {
            let Some(b) = &peer.ip_block else { continue };
            let except = b.except.clone().unwrap_or_default();
            if !except.is_empty() {
                attention.push(format!(
                    "{dir} ipBlock {} except {}: except ranges become deny entries ahead of the allow; verify the verdicts for the excepted ranges after the migration",
                    b.cidr,
                    except.join(", ")
                ));
            }
            let named_legacy: Vec<&String> =
                ctx.legacy_pod_cidrs.iter().filter(|c| *c == &b.cidr || except.iter().any(|e| e == *c)).collect();
            if !named_legacy.is_empty() {
                attention.push(format!(
                    "{dir} ipBlock names the legacy pod CIDR {}: pods move to {} during the migration, add that range next to it or the policy's verdicts change",
                    named_legacy.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                    ctx.new_pod_cidr.as_deref().unwrap_or("the new pod CIDR")
                ));
            }
            if *dir == "egress" {
                let hits: Vec<&String> = ctx
                    .apiserver_addresses
                    .iter()
                    .filter(|a| {
                        let ip = a.split(':').next().unwrap_or(a);
                        ip_in(&b.cidr, ip) && !except.iter().any(|e| ip_in(e, ip))
                    })
                    .collect();
                if !hits.is_empty() {
                    attention.push(format!(
                        "egress to the API server ({}) through ipBlock {}: with socket-level load balancing the policy sees the apiserver's endpoint address and port, not the ClusterIP and 443; allow the endpoint addresses and ports explicitly",
                        hits.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                        b.cidr
                    ));
                }
            }
        }
    }
    let selected: Vec<&PodInfo> = ctx
        .pods
        .iter()
        .copied()
        .filter(|pod| {
            pod.namespace == p.namespace && spec.pod_selector.as_ref().is_none_or(|s| selector_matches(s, &pod.labels))
        })
        .collect();
    let host_net: Vec<String> = selected.iter().filter(|p| p.host_network).map(|p| p.name.clone()).collect();
    if !host_net.is_empty() {
        attention.push(format!(
            "selects hostNetwork pods ({}): NetworkPolicy does not apply to them on either datapath, but the legacy CNI's host rules may have; check what they may reach",
            host_net.join(", ")
        ));
    }
    attention.dedup();
    let class = if !blockers.is_empty() {
        PolicyClass::Blocker
    } else if !attention.is_empty() {
        PolicyClass::NeedsAttention
    } else {
        PolicyClass::CarriedOver
    };
    blockers.extend(attention);
    PolicyVerdict {
        api: "networking.k8s.io".into(),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        class,
        reasons: blockers,
    }
}

pub fn classify_calico(p: &crate::inventory::CalicoPolicyInfo) -> PolicyVerdict {
    let order = p.order.map(|o| o.to_string()).unwrap_or_else(|| "unset".into());
    let denies: Vec<&str> = p
        .actions
        .iter()
        .map(|a| a.split(' ').next().unwrap_or(""))
        .filter(|a| matches!(*a, "Deny" | "Pass" | "Log"))
        .collect();
    let (class, reason) = if !denies.is_empty() {
        (
            PolicyClass::Blocker,
            format!(
                "Calico {} with {} rules at order {order}: Kubernetes NetworkPolicy, which the eBPF datapath enforces, has no deny, pass or order; rewrite it as default-deny plus allow NetworkPolicies before migrating",
                p.kind,
                denies.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>().join("/")
            ),
        )
    } else {
        (
            PolicyClass::NeedsAttention,
            format!(
                "Calico {} (allow rules only, order {order}, selector {}): not read by the eBPF datapath; translate it to a networking.k8s.io NetworkPolicy",
                p.kind,
                p.selector.as_deref().unwrap_or("all()")
            ),
        )
    };
    PolicyVerdict {
        api: format!("{}/{}", calico_group(&p.api_group), p.kind),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        class,
        reasons: vec![reason],
    }
}

/// The group of a Calico apiVersion; policies read before the group was recorded are v1 CRDs.
fn calico_group(api_version: &str) -> &str {
    match api_version.split_once('/') {
        Some((g, _)) if !g.is_empty() => g,
        _ => "crd.projectcalico.org",
    }
}

/// `(major, minor)` of a kernel release string such as `6.18.0-1-amd64`.
pub fn kernel_major_minor(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReadiness {
    pub node: String,
    pub ready: bool,
    /// Reasons it is not ready, or what could not be checked.
    pub reasons: Vec<String>,
    pub report: bool,
}

pub fn node_readiness(inv: &Inventory, reports: &[NodeReport]) -> Vec<NodeReadiness> {
    inv.nodes
        .iter()
        .map(|n| {
            let report =
                reports.iter().find(|r| r.node_name.as_deref().or(Some(r.hostname.as_str())) == Some(n.name.as_str()));
            let mut reasons = Vec::new();
            match report {
                Some(r) => reasons.extend(r.readiness_blockers()),
                None => {
                    if let Some((a, b)) = kernel_major_minor(&n.kernel_version) {
                        if (a, b) < crate::node_report::MIN_KERNEL {
                            reasons.push(format!("kernel {} is older than 5.10", n.kernel_version));
                        }
                    }
                }
            }
            NodeReadiness { node: n.name.clone(), ready: reasons.is_empty(), reasons, report: report.is_some() }
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    pub findings: Vec<Finding>,
    pub policies: Vec<PolicyVerdict>,
    pub readiness: Vec<NodeReadiness>,
    /// Rules vs API per node with a report.
    pub rule_diffs: Vec<NodeDiff>,
}

impl Analysis {
    pub fn blockers(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.severity == Severity::Blocker)
    }
}

/// The legacy pod CIDRs: Flannel Network / Calico IPPools / kube-proxy clusterCIDR / node podCIDRs.
pub fn legacy_pod_cidrs(inv: &Inventory) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(n) = inv.cni.flannel.as_ref().and_then(|f| f.network.clone()) {
        v.push(n);
    }
    for p in inv.cni.calico.iter().flat_map(|c| c.ip_pools.iter()) {
        v.push(p.cidr.clone());
    }
    if let Some(c) = &inv.kube_proxy.cluster_cidr {
        v.push(c.clone());
    }
    v.sort();
    v.dedup();
    v
}

pub fn analyze(inv: &Inventory, reports: &[NodeReport], new_pod_cidr: Option<&str>) -> Analysis {
    let mut a = Analysis::default();
    let f = |sev, subject: &str, message: String| Finding { severity: sev, subject: subject.to_string(), message };
    match inv.cni.kind.as_deref() {
        None => a.findings.push(f(
            Severity::Blocker,
            "cni",
            "no known legacy CNI found (no Flannel, Calico or Canal DaemonSet, no Calico Installation): kubeshift cannot tell how pods are wired today; migrate this cluster by hand or install one of the supported CNIs' objects".into(),
        )),
        Some(k) => {
            let detail = match (&inv.cni.flannel, &inv.cni.calico) {
                (Some(fl), _) => format!(
                    "network {} backend {}{}{}",
                    fl.network.as_deref().unwrap_or("?"),
                    fl.backend_type.as_deref().unwrap_or("udp"),
                    fl.vni.map(|v| format!(" VNI {v}")).unwrap_or_default(),
                    fl.port.map(|v| format!(" port {v}")).unwrap_or_default()
                ),
                (None, Some(c)) => c
                    .ip_pools
                    .iter()
                    .map(|p| format!("pool {} ipip {} vxlan {} natOutgoing {} from {}", p.cidr, p.ipip_mode.as_deref().unwrap_or("Never"), p.vxlan_mode.as_deref().unwrap_or("Never"), p.nat_outgoing, if p.source.is_empty() { "an IPPool" } else { &p.source }))
                    .collect::<Vec<_>>()
                    .join("; "),
                _ => String::new(),
            };
            a.findings.push(f(Severity::Info, "cni", format!("legacy CNI {k} ({}) {detail}", if inv.cni.daemonsets.len() > 1 { inv.cni.daemonsets.join(", ") } else { inv.cni.workload.clone().unwrap_or_else(|| "?".into()) })));
            // Plain Flannel has no policy engine: the objects exist, nothing enforces them.
            // The eBPF datapath enforces them from the moment a node moves, so traffic that
            // works today can start being dropped mid-migration. (Canal = Flannel + Calico's
            // policy engine, which does enforce them.)
            if k == "flannel" && !inv.network_policies.is_empty() {
                let names: Vec<String> = inv.network_policies.iter().take(5).map(|p| format!("{}/{}", p.namespace, p.name)).collect();
                let more = inv.network_policies.len().saturating_sub(names.len());
                a.findings.push(f(
                    Severity::Attention,
                    "networkpolicy",
                    format!(
                        "Flannel does not enforce NetworkPolicy: {} NetworkPolicies ({}{}) are not enforced today and will be enforced by the eBPF datapath on every migrated node; traffic they do not allow will start being dropped. Check them with `kubeshift connectivity test` on a canary node first",
                        inv.network_policies.len(),
                        names.join(", "),
                        if more > 0 { format!(" and {more} more") } else { String::new() }
                    ),
                ));
            }
            if let Some(c) = &inv.cni.calico {
                if !c.bgp_peers.is_empty() {
                    a.findings.push(f(Severity::Attention, "cni", format!("Calico BGP peers {}: routes to pods are announced to the network today; the new pod CIDR must be announced too", c.bgp_peers.join(", "))));
                }
            }
        }
    }
    a.findings.extend(crate::legacy_findings::legacy_findings(inv));
    match inv.kube_proxy.mode.as_deref() {
        None => a.findings.push(f(Severity::Attention, "kube-proxy", "kube-proxy not found (no DaemonSet, no static pods): service routing today is by something else; take-over-services steps will have nothing to clean".into())),
        Some("iptables") => a.findings.push(f(Severity::Info, "kube-proxy", format!("kube-proxy {} in iptables mode, clusterCIDR {}", inv.kube_proxy.deployed_as.as_deref().unwrap_or("?"), inv.kube_proxy.cluster_cidr.as_deref().unwrap_or("unset")))),
        Some(m) => a.findings.push(f(Severity::Attention, "kube-proxy", kube_proxy_mode_note(m))),
    }
    for p in &inv.problems {
        a.findings.push(f(Severity::Attention, "discovery", p.clone()));
    }

    let readiness = node_readiness(inv, reports);
    let failing: Vec<String> =
        readiness.iter().filter(|r| !r.ready).map(|r| format!("{} ({})", r.node, r.reasons.join("; "))).collect();
    if !failing.is_empty() {
        a.findings.push(f(
            Severity::Blocker,
            "nodes",
            format!(
                "nodes not ready for the eBPF datapath (needs kernel >= 5.10, BTF, cgroup v2): {}",
                failing.join(", ")
            ),
        ));
    }
    let unreported: Vec<&str> = readiness.iter().filter(|r| !r.report).map(|r| r.node.as_str()).collect();
    if !unreported.is_empty() {
        a.findings.push(f(Severity::Attention, "nodes", format!("no node report for {}: BTF and cgroup v2 unchecked (run `kubeshift node report` there and pass --node-report)", unreported.join(", "))));
    }
    a.readiness = readiness;

    for r in reports {
        diff_report(inv, r, &mut a);
    }

    let by_ns = pods_by_namespace(inv);
    let legacy = legacy_pod_cidrs(inv);
    for p in &inv.network_policies {
        let ctx = PolicyContext {
            legacy_pod_cidrs: legacy.clone(),
            new_pod_cidr: new_pod_cidr.map(str::to_string),
            apiserver_addresses: &inv.apiserver_addresses,
            pods: by_ns.get(p.namespace.as_str()).map(|v| v.as_slice()).unwrap_or(&[]),
        };
        a.policies.push(classify_policy(p, &ctx));
    }
    for p in &inv.calico_policies {
        a.policies.push(classify_calico(p));
    }
    for v in &a.policies {
        let sev = match v.class {
            PolicyClass::CarriedOver => continue,
            PolicyClass::NeedsAttention => Severity::Attention,
            PolicyClass::Blocker => Severity::Blocker,
        };
        let subject = if v.namespace.is_empty() {
            format!("{}/{}", v.api, v.name)
        } else {
            format!("{}/{}/{}", v.api, v.namespace, v.name)
        };
        for r in &v.reasons {
            a.findings.push(f(sev, &subject, r.clone()));
        }
    }

    let host_ports: Vec<String> = inv
        .pods
        .iter()
        .filter(|p| !p.host_ports.is_empty() && !p.host_network)
        .map(|p| format!("{}/{} ({})", p.namespace, p.name, p.host_ports.join(", ")))
        .collect();
    if !host_ports.is_empty() {
        a.findings.push(f(
            Severity::Attention,
            "pods",
            format!(
                "pods with hostPorts, served by the portmap plugin today, must be re-wired by the datapath: {}",
                host_ports.join("; ")
            ),
        ));
    }
    let host_net = inv.pods.iter().filter(|p| p.host_network).count();
    if host_net > 0 {
        a.findings.push(f(
            Severity::Info,
            "pods",
            format!("{host_net} hostNetwork pods keep the node's network during the migration"),
        ));
    }
    let local: Vec<String> = inv
        .services
        .services
        .iter()
        .filter(|s| {
            s.external_traffic_policy == TrafficPolicy::Local && s.service_type != crate::api::ServiceType::ClusterIP
        })
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    if !local.is_empty() {
        a.findings.push(f(Severity::Attention, "services", format!("externalTrafficPolicy Local (client source IP kept, only local endpoints): {}; check health check node ports after take-over", local.join(", "))));
    }
    for pdb in &inv.pdbs {
        if pdb.disruptions_allowed == Some(0) {
            a.findings.push(f(
                Severity::Attention,
                &format!("pdb/{}/{}", pdb.namespace, pdb.name),
                "allows no disruption now: drains of nodes with its pods will wait".into(),
            ));
        }
    }
    a.findings.sort_by_key(|x| x.severity);
    a
}

/// What a kube-proxy mode other than iptables means for the rules check and
/// for cleanup on each node.
fn kube_proxy_mode_note(mode: &str) -> String {
    let (collected, state) = match mode {
        "nftables" => ("`nft -j list ruleset`", "the tables `ip kube-proxy` and `ip6 kube-proxy`"),
        "ipvs" => (
            "`ipvsadm -Sn` and `ipset save`",
            "its IPVS virtual servers, the kube-ipvs0 device and the KUBE-* ipsets, besides its KUBE-* iptables chains",
        ),
        _ => return format!("kube-proxy in {mode} mode, which kubeshift does not model: the rules-vs-API check is skipped and cleanup must be done by hand"),
    };
    format!("kube-proxy in {mode} mode: node reports collect {collected} and its services are diffed against the API; on each node the cleanup must remove {state}")
}

/// kube-proxy's rules of one node report against the API, per IP family.
/// Each family's proxier writes its own table: IPv4 services to iptables,
/// IPv6 ones to ip6tables; in nftables mode to `ip kube-proxy` and
/// `ip6 kube-proxy`, which then stand in for the iptables models.
fn diff_report(inv: &Inventory, r: &NodeReport, a: &mut Analysis) {
    let node = r.node_name.clone().unwrap_or_else(|| r.hostname.clone());
    let finding = |message: String| Finding { severity: Severity::Attention, subject: format!("node/{node}"), message };
    let nft = match r.nft_models() {
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            a.findings.push(finding(format!("its nft ruleset does not parse: {e}")));
            Default::default()
        }
        None => Default::default(),
    };
    let ipvs = match r.ipvs_virtual_servers() {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            a.findings.push(finding(format!("its IPVS table does not parse: {e}")));
            Vec::new()
        }
        None => Vec::new(),
    };
    // In ipvs mode the services are IPVS virtual servers; the iptables rules
    // beside them only mark and masquerade.
    let ipvs_model = |v6: bool| {
        let vss: Vec<_> = ipvs.iter().filter(|v| v.ip.contains(':') == v6).cloned().collect();
        (!vss.is_empty())
            .then(|| crate::ipvs::to_rule_model(&format!("{node}:ipvsadm -Sn"), &vss, &inv.services.of_family(v6)))
    };
    let v4 =
        nft.v4.or_else(|| ipvs_model(false)).map(Ok).or_else(|| r.rule_model().map(|m| m.map_err(|e| e.to_string())));
    let v6 =
        nft.v6.or_else(|| ipvs_model(true)).map(Ok).or_else(|| r.rule_model_v6().map(|m| m.map_err(|e| e.to_string())));
    for (is_v6, model) in [(false, v4), (true, v6)] {
        match model {
            Some(Ok(model)) => {
                let d = diff_node(&node, &model, &inv.services.of_family(is_v6));
                if let Some(first) = d.findings.first() {
                    a.findings.push(finding(format!(
                        "{} differences between kube-proxy's rules and the API (first: {})",
                        d.findings.len(),
                        first.reason
                    )));
                }
                a.rule_diffs.push(d);
            }
            Some(Err(e)) => {
                a.findings.push(finding(format!("its {} rules do not parse: {e}", if is_v6 { "IPv6" } else { "IPv4" })))
            }
            None => {}
        }
    }
}

fn pods_by_namespace(inv: &Inventory) -> BTreeMap<&str, Vec<&PodInfo>> {
    let mut m: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
    for p in &inv.pods {
        m.entry(p.namespace.as_str()).or_default().push(p);
    }
    m
}

fn int_or_percent(v: &str, total: i32) -> Option<i32> {
    if let Some(p) = v.strip_suffix('%') {
        let p: f64 = p.parse().ok()?;
        return Some(((p / 100.0) * total as f64).ceil() as i32);
    }
    v.parse().ok()
}

/// How many nodes of each pool may drain at once so that no PDB is violated:
/// a PDB's allowed disruptions bound the nodes of a pool that run its pods.
pub fn pool_disruption_limits(inv: &Inventory) -> BTreeMap<String, u32> {
    let pool_of: BTreeMap<&str, &str> = inv.nodes.iter().map(|n| (n.name.as_str(), n.pool.as_str())).collect();
    let by_ns = pods_by_namespace(inv);
    let mut out: BTreeMap<String, u32> = BTreeMap::new();
    for pdb in &inv.pdbs {
        let pods: Vec<&PodInfo> = by_ns
            .get(pdb.namespace.as_str())
            .into_iter()
            .flatten()
            .copied()
            .filter(|p| {
                p.namespace == pdb.namespace
                    && !pdb.selector.is_empty()
                    && pdb.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .collect();
        if pods.is_empty() {
            continue;
        }
        let total = pdb.expected_pods.unwrap_or(pods.len() as i32);
        let allowed = pdb.disruptions_allowed.or_else(|| {
            if let Some(m) = &pdb.min_available {
                int_or_percent(m, total).map(|m| total - m)
            } else {
                pdb.max_unavailable.as_deref().and_then(|m| int_or_percent(m, total))
            }
        });
        // A PDB that allows nothing now still lets one node at a time wait on it.
        let allowed = allowed.unwrap_or(1).max(1) as u32;
        for p in pods {
            if let Some(pool) = p.node.as_deref().and_then(|n| pool_of.get(n)) {
                let e = out.entry(pool.to_string()).or_insert(u32::MAX);
                *e = (*e).min(allowed);
            }
        }
    }
    out
}

pub fn plan_input(inv: &Inventory, name: &str, max_unavailable: u32) -> PlanInput {
    let mut used = legacy_pod_cidrs(inv);
    for n in &inv.nodes {
        used.extend(n.pod_cidrs.iter().cloned());
        used.extend(n.internal_ips.iter().filter(|i| !i.contains(':')).map(|i| format!("{i}/32")));
    }
    if let Some(s) = &inv.service_cidr {
        used.push(s.clone());
    }
    for s in &inv.services.services {
        if let Some(ip) = s.cluster_ip.as_deref().filter(|ip| ip.contains('.')) {
            used.push(format!("{ip}/32"));
        }
    }
    used.sort();
    used.dedup();
    used.retain(|c| !inv.service_cidr.as_deref().is_some_and(|s| s != c && overlaps(s, c) && c.ends_with("/32")));
    let mut evictable: BTreeMap<&str, usize> = BTreeMap::new();
    for p in inv.pods.iter().filter(|p| p.evictable) {
        if let Some(n) = p.node.as_deref() {
            *evictable.entry(n).or_default() += 1;
        }
    }
    PlanInput {
        name: name.to_string(),
        fingerprint: inv.fingerprint(),
        cluster_name: None,
        legacy_cni: inv.cni.kind.clone(),
        kube_proxy_mode: inv.kube_proxy.mode.clone(),
        nodes: inv
            .nodes
            .iter()
            .map(|n| PlanNodeInput {
                name: n.name.clone(),
                pool: n.pool.clone(),
                control_plane: n.control_plane,
                evictable_pods: evictable.get(n.name.as_str()).copied().unwrap_or(0),
            })
            .collect(),
        used_cidrs: used,
        service_cidr: inv.service_cidr.clone(),
        max_unavailable: max_unavailable.max(1),
        pool_disruption_limit: pool_disruption_limits(inv),
        tunnel_port: None,
        tunnel_vni: None,
        legacy_tunnels: crate::cni::legacy_tunnels(&inv.cni),
        legacy_daemon_sets: inv.cni.daemonsets.clone(),
        pod_cidr: None,
    }
}
