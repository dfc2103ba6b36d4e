//! Turns the structural dump into the per-service model.

use super::dump::{is_kube_chain, ChainRef, Dump, FastMap, FastSet, Table};
use super::lexer::{host_ip, split_host_port, Rule};
use super::{ChainCount, ChainLayout, EndpointRule, RuleModel, ServiceRules, TableSummary};
use std::collections::BTreeMap;

const PER_SERVICE_PREFIXES: &[&str] = &["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-XLB-"];
const IPVS_CHAINS: &[&str] = &[
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    "KUBE-SOURCE-RANGES-FIREWALL",
];

/// Splits a per-service chain name into (prefix, hash).
fn per_service(chain: &str) -> Option<(&'static str, &str)> {
    PER_SERVICE_PREFIXES.iter().find_map(|p| chain.strip_prefix(p).map(|h| (*p, h)))
}

/// The `ns/name:port` of a comment: the first word that contains a `/`.
/// Covers "ns/svc:p cluster IP", "ns/svc:p -> 10.0.0.1:80", "Balancing rule 0
/// for ns/svc:p" and "masquerade LOCAL traffic for ns/svc:p LB IP".
fn comment_service(comment: &str) -> Option<(&str, &str, &str)> {
    let word = comment.split(' ').find(|w| w.contains('/') && !w.starts_with('/'))?;
    let (ns, rest) = word.split_once('/')?;
    let (name, port) = match rest.split_once(':') {
        Some((n, p)) => (n, p),
        None => (rest, ""),
    };
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some((ns, name, port))
}

/// Key used to join rules, API objects and diffs: `ns/name:port/proto`.
pub fn service_port_key(namespace: &str, name: &str, port_name: &str, protocol: &str) -> String {
    format!("{namespace}/{name}:{port_name}/{}", protocol.to_ascii_lowercase())
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

struct Builder<'d> {
    services: Vec<ServiceRules>,
    by_hash: FastMap<&'d str, usize>,
    by_key: FastMap<String, usize>,
}

impl<'d> Builder<'d> {
    fn get(&mut self, hash: Option<&'d str>, name: Option<(&str, &str, &str)>, proto: Option<&str>) -> Option<usize> {
        if let Some(h) = hash {
            if let Some(&i) = self.by_hash.get(h) {
                let s = &mut self.services[i];
                let mut learned = false;
                if s.name.is_empty() {
                    if let Some((ns, n, p)) = name {
                        s.namespace = ns.into();
                        s.name = n.into();
                        s.port_name = p.into();
                        learned = true;
                    }
                }
                if s.protocol.is_empty() {
                    if let Some(p) = proto {
                        s.protocol = p.to_ascii_lowercase();
                        learned = true;
                    }
                }
                // Only re-key when the identity just became known: the key is
                // a formatted string and this runs for every entry rule.
                if learned {
                    self.index_key(i);
                }
                return Some(i);
            }
        }
        if let (Some((ns, n, p)), Some(pr)) = (name, proto) {
            if let Some(&i) = self.by_key.get(&service_port_key(ns, n, p, pr)) {
                if let Some(h) = hash {
                    self.services[i].chain_hash.get_or_insert_with(|| h.to_string());
                    self.by_hash.insert(h, i);
                }
                return Some(i);
            }
        }
        if hash.is_none() && name.is_none() {
            return None;
        }
        let mut s = ServiceRules::default();
        if let Some((ns, n, p)) = name {
            s.namespace = ns.into();
            s.name = n.into();
            s.port_name = p.into();
        }
        if let Some(p) = proto {
            s.protocol = p.to_ascii_lowercase();
        }
        s.chain_hash = hash.map(str::to_string);
        let i = self.services.len();
        self.services.push(s);
        if let Some(h) = hash {
            self.by_hash.insert(h, i);
        }
        self.index_key(i);
        Some(i)
    }

    fn index_key(&mut self, i: usize) {
        let s = &self.services[i];
        if !s.name.is_empty() && !s.protocol.is_empty() {
            let k = service_port_key(&s.namespace, &s.name, &s.port_name, &s.protocol);
            self.by_key.entry(k).or_insert(i);
        }
    }

    /// Service for a rule that names it only by comment (filter table, or a
    /// KUBE-MARK-MASQ rule in nat KUBE-SERVICES).
    fn by_comment(&mut self, r: &Rule<'_>) -> Option<usize> {
        let name = r.comment.as_deref().and_then(comment_service)?;
        let proto = r.proto?;
        // The borrow of the comment ends here: names are copied into owned strings.
        let (ns, n, p) = (name.0.to_string(), name.1.to_string(), name.2.to_string());
        self.get(None, Some((&ns, &n, &p)), Some(proto))
    }
}

/// Reads the endpoint list of a KUBE-SVC/SVL/XLB chain.
/// Returns (endpoints, affinity seconds); fills `proto` from the DNAT rules
/// because SVC-chain rules carry no `-p` and a stale service has nothing else.
fn read_endpoints<'d>(
    nat: &Table<'d>,
    rules: &[Rule<'d>],
    proto: &mut Option<&'d str>,
) -> (Vec<EndpointRule>, Option<u32>) {
    let mut eps: Vec<EndpointRule> = Vec::new();
    let mut affinity = None;
    let mut remaining = 1.0f64;
    for r in rules {
        let Some(target) = r.target else { continue };
        if !target.starts_with("KUBE-SEP-") {
            continue;
        }
        // ClientIP affinity rules come first and repeat every endpoint; they
        // carry the timeout but are not extra endpoints.
        if let Some(rec) = r.recent() {
            if rec.rcheck {
                affinity = rec.seconds.or(affinity);
                continue;
            }
        }
        let dnat = nat.chain(target).and_then(|sep| sep.rules.iter().find(|sr| sr.to_destination.is_some()));
        if proto.is_none() {
            *proto = dnat.and_then(|d| d.proto);
        }
        let (ip, port) = dnat
            .and_then(|d| d.to_destination.and_then(split_host_port))
            .map(|(ip, port)| (ip.to_string(), port))
            .unwrap_or_default();
        let p = r.probability.unwrap_or(1.0);
        let share = remaining * p;
        remaining -= share;
        eps.push(EndpointRule { ip, port, probability: p, share, chain: target.to_string() });
    }
    (eps, affinity)
}

fn foreign_family(name: &str, builtin: bool) -> &'static str {
    if builtin {
        "builtin"
    } else if name.starts_with("cali-") {
        "calico"
    } else if name.starts_with("FLANNEL") {
        "flannel"
    } else if name.starts_with("DOCKER") {
        "docker"
    } else if name.starts_with("CNI-") {
        "cni"
    } else if name.starts_with("CILIUM") {
        "cilium"
    } else {
        "other"
    }
}

pub(crate) fn build_model<'d>(input: &str, dump: &Dump<'d>) -> RuleModel {
    let mut m = RuleModel {
        input: input.to_string(),
        generated_by: dump.generated_by.map(str::to_string),
        warnings: dump.warnings.clone(),
        ..Default::default()
    };

    let mut foreign: BTreeMap<String, ChainCount> = BTreeMap::new();
    let mut saw_legacy = false;
    let mut saw_current = false;
    for t in &dump.tables {
        let mut ts = TableSummary { name: t.name.to_string(), chains: t.chains.len(), rules: 0 };
        for c in &t.chains {
            ts.rules += c.rule_count;
            if is_kube_chain(c.name) && !c.builtin {
                m.kube.chains += 1;
                m.kube.rules += c.rule_count;
                match c.name {
                    "KUBE-PROXY-CANARY" => m.kube_proxy_canary.push(t.name.to_string()),
                    "KUBE-KUBELET-CANARY" => m.kubelet_canary.push(t.name.to_string()),
                    "KUBE-PROXY-FIREWALL" => saw_current = true,
                    n if IPVS_CHAINS.contains(&n) => push_unique(&mut m.ipvs_chains, n.to_string()),
                    n if n.starts_with("KUBE-XLB-") => saw_legacy = true,
                    n if n.starts_with("KUBE-SVL-") || n.starts_with("KUBE-EXT-") => saw_current = true,
                    _ => {}
                }
            } else {
                let f = foreign.entry(foreign_family(c.name, c.builtin).to_string()).or_default();
                f.chains += 1;
                f.rules += c.rule_count;
            }
        }
        m.tables.push(ts);
    }
    m.foreign = foreign;

    let empty_nat;
    let nat = match dump.table("nat") {
        Some(t) => t,
        None => {
            empty_nat = Table::empty("nat");
            &empty_nat
        }
    };

    let per_service_chains = nat.chains.iter().filter(|c| c.name.starts_with("KUBE-SVC-")).count();
    let mut b = Builder {
        services: Vec::with_capacity(per_service_chains),
        by_hash: FastMap::with_capacity_and_hasher(per_service_chains, Default::default()),
        by_key: FastMap::with_capacity_and_hasher(per_service_chains, Default::default()),
    };

    // Marks and postrouting.
    if let Some(c) = nat.chain("KUBE-MARK-MASQ") {
        m.masquerade.masq_mark = c.rules.iter().find_map(|r| r.set_mark());
    }
    if let Some(c) = nat.chain("KUBE-MARK-DROP") {
        m.masquerade.drop_mark = c.rules.iter().find_map(|r| r.set_mark());
    }
    if let Some(c) = nat.chain("KUBE-POSTROUTING") {
        for r in c.rules {
            if r.target == Some("MASQUERADE") {
                m.masquerade.postrouting_masquerade = true;
                m.masquerade.random_fully |= r.random_fully();
            }
        }
    }

    // Every per-service chain gets a service entry, even when nothing jumps to
    // it, so that stale chains still show up with their names.
    for c in nat.chain_refs() {
        if let Some((_, hash)) = per_service(c.name) {
            let name = c.rules.iter().find_map(|r| r.comment.as_deref().and_then(comment_service));
            let owned = name.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
            let proto = c.rules.iter().find_map(|r| r.proto);
            b.get(Some(hash), owned.as_ref().map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())), proto);
        }
    }

    // nat KUBE-SERVICES: the entry points (cluster IP, external IP, LB IP).
    let mut deferred_masq: Vec<&Rule<'d>> = Vec::new();
    let mut svc_entry_rules = Vec::new();
    if let Some(c) = nat.chain("KUBE-SERVICES") {
        for r in c.rules {
            match r.target {
                Some(t) if per_service(t).is_some() => svc_entry_rules.push(r),
                Some("KUBE-MARK-MASQ") => deferred_masq.push(r),
                _ => {}
            }
        }
    }
    for r in svc_entry_rules {
        let target = r.target.unwrap();
        let (prefix, hash) = per_service(target).unwrap();
        let comment = r.comment.as_deref().unwrap_or("");
        let name = comment_service(comment);
        let Some(i) = b.get(Some(hash), name, r.proto) else {
            continue;
        };
        let s = &mut b.services[i];
        let dst = r.dst.map(|d| host_ip(d.value).to_string());
        let port = r.dport.and_then(|p| p.parse().ok());
        if comment.ends_with(" external IP") {
            if let Some(d) = dst {
                push_unique(&mut s.external_ips, d);
            }
        } else if comment.ends_with(" loadbalancer IP") {
            if let Some(d) = dst {
                push_unique(&mut s.lb_ips, d);
            }
        } else {
            // "cluster IP" (and, defensively, anything else that targets the
            // service chain with a destination).
            s.cluster_ip = dst.or(s.cluster_ip.take());
            s.port = port.or(s.port);
            if prefix == "KUBE-SVL-" {
                s.internal_local = true;
            }
        }
        if s.port.is_none() {
            s.port = port;
        }
    }
    for r in deferred_masq {
        let comment = r.comment.as_deref().unwrap_or("");
        if !comment.ends_with(" cluster IP") {
            continue;
        }
        if let Some(i) = b.by_comment(r) {
            apply_cluster_masq(&mut b.services[i], r);
        }
    }

    // nat KUBE-NODEPORTS.
    if let Some(c) = nat.chain("KUBE-NODEPORTS") {
        for r in c.rules {
            let Some(t) = r.target else { continue };
            if let Some((_, hash)) = per_service(t) {
                let name = r.comment.as_deref().and_then(comment_service);
                if let Some(i) = b.get(Some(hash), name, r.proto) {
                    if let Some(p) = r.dport.and_then(|p| p.parse().ok()) {
                        push_unique(&mut b.services[i].node_ports, p);
                    }
                }
            }
        }
    }

    // Per-service chains.
    let hashes: Vec<(&'d str, usize)> = b.by_hash.iter().map(|(h, i)| (*h, *i)).collect();
    let mut chain_name = String::with_capacity(64);
    for (hash, i) in hashes {
        let mut lookup = |prefix: &str| {
            chain_name.clear();
            chain_name.push_str(prefix);
            chain_name.push_str(hash);
            nat.chain(&chain_name)
        };
        if let Some(c) = lookup("KUBE-SVC-") {
            let mut proto = None;
            let (eps, aff) = read_endpoints(nat, c.rules, &mut proto);
            let s = &mut b.services[i];
            if s.protocol.is_empty() {
                s.protocol = proto.unwrap_or_default().to_ascii_lowercase();
            }
            s.endpoints = eps;
            s.affinity_seconds = aff.or(s.affinity_seconds);
            for r in c.rules {
                if r.target == Some("KUBE-MARK-MASQ") {
                    apply_cluster_masq(s, r);
                    if s.cluster_ip.is_none() {
                        s.cluster_ip = r.dst.map(|d| host_ip(d.value).to_string());
                    }
                }
            }
        }
        if let Some(c) = lookup("KUBE-SVL-") {
            let mut proto = None;
            let (eps, aff) = read_endpoints(nat, c.rules, &mut proto);
            let s = &mut b.services[i];
            if s.protocol.is_empty() {
                s.protocol = proto.unwrap_or_default().to_ascii_lowercase();
            }
            s.local_endpoints = eps;
            s.affinity_seconds = s.affinity_seconds.or(aff);
            // internalTrafficPolicy: Local puts the cluster-IP masquerade rule here.
            for r in c.rules {
                if r.target == Some("KUBE-MARK-MASQ") {
                    apply_cluster_masq(s, r);
                }
            }
        }
        if let Some(c) = lookup("KUBE-XLB-") {
            let mut proto = None;
            let (eps, aff) = read_endpoints(nat, c.rules, &mut proto);
            let s = &mut b.services[i];
            if s.protocol.is_empty() {
                s.protocol = proto.unwrap_or_default().to_ascii_lowercase();
            }
            s.local_only = true;
            s.local_endpoints = eps;
            s.affinity_seconds = s.affinity_seconds.or(aff);
            for r in c.rules {
                if let Some(t) = r.target {
                    if t == "KUBE-MARK-DROP"
                        && r.comment.as_deref().is_some_and(|c| c.ends_with("has no local endpoints"))
                    {
                        s.drop_no_local_endpoints = true;
                    }
                }
            }
        }
        if let Some(c) = lookup("KUBE-EXT-") {
            let s = &mut b.services[i];
            for r in c.rules {
                // Local policy shows as a jump to SVL, or, when this node has
                // no local endpoint and the SVL jump is left out, as the
                // src-type LOCAL special cases that only Local policy writes.
                if r.src_type().is_some_and(|t| !t.negated && t.value == "LOCAL") {
                    s.local_only = true;
                }
                if r.target.is_some_and(|t| t.starts_with("KUBE-SVL-")) {
                    s.local_only = true;
                }
            }
        }
        if let Some(c) = lookup("KUBE-FW-") {
            let s = &mut b.services[i];
            for r in c.rules {
                if let Some(t) = r.target {
                    if per_service(t).is_some() {
                        if let Some(src) = r.src.filter(|s| !s.negated) {
                            push_unique(&mut s.lb_source_ranges, super::normalize_cidr(src.value));
                        }
                    }
                }
            }
        }
    }

    // filter table: no-endpoint REJECTs, Local-policy DROPs, firewall, health checks.
    if let Some(filter) = dump.table("filter") {
        for chain in
            ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS", "KUBE-NODE-PORT"]
        {
            let Some(c) = filter.chain(chain) else {
                continue;
            };
            for r in c.rules {
                let comment = r.comment.as_deref().unwrap_or("");
                let Some(i) = b.by_comment(r) else { continue };
                let s = &mut b.services[i];
                let dst = r.dst.filter(|d| !d.negated).map(|d| host_ip(d.value).to_string());
                let port: Option<u16> = r.dport.and_then(|p| p.parse().ok());
                let to_local = r.dst_type().is_some_and(|d| !d.negated && d.value == "LOCAL");
                match (chain, r.target) {
                    ("KUBE-NODEPORTS", Some("ACCEPT")) if comment.ends_with("health check node port") => {
                        // Only externalTrafficPolicy Local services get a health
                        // check port, so this shows Local even with no endpoint.
                        s.health_check_node_port = port;
                        s.local_only = true;
                    }
                    ("KUBE-PROXY-FIREWALL", Some("DROP")) => {
                        if let Some(d) = dst {
                            push_unique(&mut s.lb_ips, d);
                        }
                    }
                    (_, Some("REJECT")) | (_, Some("DROP"))
                        if comment.ends_with("has no endpoints") || comment.ends_with("has no local endpoints") =>
                    {
                        if comment.ends_with("has no local endpoints") {
                            s.drop_no_local_endpoints = true;
                            if chain == "KUBE-EXTERNAL-SERVICES" {
                                s.local_only = true;
                            } else {
                                s.internal_local = true;
                            }
                        } else {
                            s.reject_no_endpoints = true;
                        }
                        if chain == "KUBE-SERVICES" {
                            if s.cluster_ip.is_none() {
                                s.cluster_ip = dst;
                            }
                            if s.port.is_none() {
                                s.port = port;
                            }
                        } else if to_local {
                            if let Some(p) = port {
                                push_unique(&mut s.node_ports, p);
                            }
                        } else if let Some(d) = dst {
                            if !s.lb_ips.contains(&d) {
                                push_unique(&mut s.external_ips, d);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    // Per-service chains not reachable from the hooks are stale. Reachability
    // rather than "has a referrer" so that a stale SVC chain does not keep its
    // stale SEP chains looking alive.
    let is_service_chain = |n: &str| per_service(n).is_some() || n.starts_with("KUBE-SEP-");
    let mut reached: FastSet<&str> = FastSet::with_capacity_and_hasher(nat.chains.len(), Default::default());
    let mut stack: Vec<ChainRef<'_, 'd>> = nat.chain_refs().filter(|c| !is_service_chain(c.name)).collect();
    while let Some(c) = stack.pop() {
        for r in c.rules {
            if let Some(t) = r.target {
                if is_service_chain(t) && reached.insert(t) {
                    if let Some(tc) = nat.chain(t) {
                        stack.push(tc);
                    }
                }
            }
        }
    }
    let mut unreferenced: Vec<String> = nat
        .chains
        .iter()
        .filter(|c| is_service_chain(c.name) && !reached.contains(c.name))
        .map(|c| c.name.to_string())
        .collect();
    unreferenced.sort();
    m.unreferenced_chains = unreferenced;

    // Table order differs between backends (legacy-save prints nat first).
    m.kube_proxy_canary.sort();
    m.kubelet_canary.sort();
    m.layout = if saw_current {
        ChainLayout::Current
    } else if saw_legacy {
        ChainLayout::Legacy
    } else if b.by_hash.is_empty() {
        ChainLayout::None
    } else {
        ChainLayout::Ambiguous
    };
    for s in &mut b.services {
        s.node_ports.sort_unstable();
        s.split_lb_self_sources();
    }
    b.services.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.port_name, &a.protocol).cmp(&(&b.namespace, &b.name, &b.port_name, &b.protocol))
    });
    m.services = b.services;
    m
}

fn apply_cluster_masq(s: &mut ServiceRules, r: &Rule<'_>) {
    match r.src {
        Some(src) if src.negated => s.masquerade_unless_from = Some(src.value.to_string()),
        Some(_) => {}
        None => s.masquerade_all = true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_names() {
        assert_eq!(comment_service("ns/svc:p80 cluster IP"), Some(("ns", "svc", "p80")));
        assert_eq!(comment_service("ns/svc:p80 -> 10.0.0.1:80"), Some(("ns", "svc", "p80")));
        assert_eq!(comment_service("Balancing rule 0 for default/web:http"), Some(("default", "web", "http")));
        assert_eq!(comment_service("default/noname"), Some(("default", "noname", "")));
        assert_eq!(
            comment_service("kubernetes service nodeports; NOTE: this must be the last rule in this chain"),
            None
        );
    }
}
