//! kube-proxy's nftables mode, read from `nft -j list ruleset`.
//!
//! kube-proxy keeps one table per family (`ip kube-proxy`, `ip6 kube-proxy`).
//! Services are elements of verdict maps (`service-ips`, `service-nodeports`,
//! `firewall-ips`, `no-endpoint-services`, `no-endpoint-nodeports`) that jump
//! to per-service-port chains named `<kind>-<HASH>-<ns>/<name>/<proto>/<port>`
//! (kinds `service`, `local`, `external`, `firewall`; endpoints
//! `endpoint-<HASH>-…__<ip>/<port>`). The result is the same [`RuleModel`] the
//! iptables parser builds, so [`crate::diff::diff_node`] compares it with the API.

use crate::iptables::{normalize_cidr, ChainCount, ChainLayout, EndpointRule, RuleModel, ServiceRules};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The table kube-proxy's nftables mode writes in each family.
pub const KUBE_PROXY_TABLE: &str = "kube-proxy";

/// kube-proxy's nftables rules of one node, per family.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NftKubeProxy {
    pub v4: Option<RuleModel>,
    pub v6: Option<RuleModel>,
}

/// A per-service-port chain name, split.
#[derive(Debug, Clone, PartialEq)]
struct ChainName<'a> {
    kind: &'a str,
    hash: &'a str,
    namespace: &'a str,
    name: &'a str,
    protocol: &'a str,
    port_name: &'a str,
}

fn split_chain(chain: &str) -> Option<ChainName<'_>> {
    let (kind, rest) = chain.split_once('-')?;
    if !matches!(kind, "service" | "local" | "external" | "firewall" | "endpoint") {
        return None;
    }
    let (hash, rest) = rest.split_once('-')?;
    let svc = rest.split_once("__").map(|(s, _)| s).unwrap_or(rest);
    let mut it = svc.splitn(4, '/');
    let (namespace, name, protocol, port_name) = (it.next()?, it.next()?, it.next()?, it.next().unwrap_or(""));
    Some(ChainName { kind, hash, namespace, name, protocol, port_name })
}

type Key = (String, String, String, String);

fn key_of(c: &ChainName) -> Key {
    (c.namespace.to_string(), c.name.to_string(), c.port_name.to_string(), c.protocol.to_string())
}

/// The table's objects, by kind.
#[derive(Default)]
struct Table<'v> {
    chains: BTreeMap<&'v str, Vec<&'v Value>>,
    sets: BTreeMap<&'v str, &'v Value>,
}

/// Parses `nft -j list ruleset` output. `input` names it in errors.
pub fn parse_nft_json(input: &str, text: &str) -> Result<NftKubeProxy, String> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| format!("{input}:{}:{}: not valid JSON: {e}", e.line(), e.column()))?;
    let items = doc
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or_else(|| format!("{input}: no \"nftables\" array (is this `nft -j list ruleset` output?)"))?;
    let mut out = NftKubeProxy::default();
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let Some(table) = collect_table(items, family) else { continue };
        let model = build(&format!("{input} ({family} {KUBE_PROXY_TABLE})"), &table);
        if v6 {
            out.v6 = Some(model);
        } else {
            out.v4 = Some(model);
        }
    }
    Ok(out)
}

fn collect_table<'v>(items: &'v [Value], family: &str) -> Option<Table<'v>> {
    let mut t = Table::default();
    let mut found = false;
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else { continue };
        if body.get("family").and_then(|f| f.as_str()) != Some(family) {
            continue;
        }
        let in_table = body.get("table").and_then(|t| t.as_str()) == Some(KUBE_PROXY_TABLE);
        let name = body.get("name").and_then(|n| n.as_str()).unwrap_or("");
        match kind.as_str() {
            "table" if name == KUBE_PROXY_TABLE => found = true,
            "chain" if in_table => {
                t.chains.entry(name).or_default();
            }
            "rule" if in_table => {
                let chain = body.get("chain").and_then(|c| c.as_str()).unwrap_or("");
                t.chains.entry(chain).or_default().push(body);
            }
            "set" | "map" if in_table => {
                t.sets.insert(name, body);
            }
            _ => {}
        }
    }
    found.then_some(t)
}

/// The elements of a set or map as (key parts, verdict target or verdict, comment).
fn elements<'v>(set: Option<&&'v Value>) -> Vec<(Vec<&'v Value>, Option<&'v Value>, Option<&'v str>)> {
    let Some(set) = set else { return Vec::new() };
    let mut out = Vec::new();
    for e in set.get("elem").and_then(|e| e.as_array()).into_iter().flatten() {
        let (key, verdict) = match e.as_array() {
            Some(pair) if pair.len() == 2 => (&pair[0], Some(&pair[1])),
            _ => (e, None),
        };
        let (key, comment) = match key.get("elem") {
            Some(inner) => (inner.get("val").unwrap_or(inner), inner.get("comment").and_then(|c| c.as_str())),
            None => (key, None),
        };
        let parts = match key.get("concat").and_then(|c| c.as_array()) {
            Some(c) => c.iter().collect(),
            None => vec![key],
        };
        out.push((parts, verdict, comment));
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn target(verdict: &Value) -> Option<&str> {
    verdict.get("goto").or_else(|| verdict.get("jump")).and_then(|g| g.get("target")).and_then(|t| t.as_str())
}

/// Every chain some map element or rule sends packets to.
fn referenced(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(o) => {
            if let Some(t) = o.get("target").and_then(|t| t.as_str()) {
                out.insert(t.to_string());
            }
            o.values().for_each(|v| referenced(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| referenced(v, out)),
        _ => {}
    }
}

struct Builder<'v> {
    table: &'v Table<'v>,
    services: BTreeMap<Key, ServiceRules>,
}

impl<'v> Builder<'v> {
    fn service(&mut self, c: &ChainName) -> &mut ServiceRules {
        self.services.entry(key_of(c)).or_insert_with(|| ServiceRules {
            namespace: c.namespace.into(),
            name: c.name.into(),
            port_name: c.port_name.into(),
            protocol: c.protocol.into(),
            chain_hash: Some(c.hash.into()),
            ..Default::default()
        })
    }

    /// Endpoints of a `numgen random mod N vmap { i : goto endpoint-… }` rule.
    fn endpoints(&self, chain: &str) -> Vec<EndpointRule> {
        let mut eps = Vec::new();
        for r in self.table.chains.get(chain).into_iter().flatten() {
            for e in r.get("expr").and_then(|e| e.as_array()).into_iter().flatten() {
                let Some(vmap) = e.get("vmap") else { continue };
                if vmap.pointer("/key/numgen").is_none() {
                    continue;
                }
                let entries = vmap.pointer("/data/set").and_then(|s| s.as_array()).cloned().unwrap_or_default();
                let n = entries.len().max(1) as f64;
                for entry in &entries {
                    let Some(t) = entry.as_array().and_then(|p| p.get(1)).and_then(target) else { continue };
                    let (ip, port) = self.dnat_of(t);
                    eps.push(EndpointRule { ip, port, probability: 1.0 / n, share: 1.0 / n, chain: t.to_string() });
                }
            }
        }
        eps
    }

    /// The DNAT destination of an endpoint chain, else the one its name carries.
    fn dnat_of(&self, chain: &str) -> (String, u16) {
        for r in self.table.chains.get(chain).into_iter().flatten() {
            for e in r.get("expr").and_then(|e| e.as_array()).into_iter().flatten() {
                if let Some(d) = e.get("dnat") {
                    let ip = d.get("addr").map(scalar).unwrap_or_default();
                    let port = d.get("port").and_then(|p| p.as_u64()).unwrap_or(0) as u16;
                    return (ip, port);
                }
            }
        }
        let tail = chain.rsplit_once("__").map(|(_, t)| t).unwrap_or("");
        let (ip, port) = tail.rsplit_once('/').unwrap_or((tail, "0"));
        (ip.to_string(), port.parse().unwrap_or(0))
    }

    fn rules_of(&self, chain: &str) -> impl Iterator<Item = &'v Value> + '_ {
        let table: &'v Table<'v> = self.table;
        table.chains.get(chain).into_iter().flatten().filter_map(|r: &&'v Value| r.get("expr"))
    }
}

fn has_masq_jump(expr: &Value) -> bool {
    expr.as_array().is_some_and(|a| a.iter().any(|e| target(e) == Some("mark-for-masquerade")))
}

/// `ip saddr != PREFIX`, the "not from the pod network" masquerade condition.
fn saddr_not(expr: &Value) -> Option<String> {
    expr.as_array()?.iter().find_map(|e| {
        let m = e.get("match")?;
        let field = m.pointer("/left/payload/field")?.as_str()?;
        (m.get("op")?.as_str()? == "!=" && field == "saddr").then(|| prefix_text(m.get("right")?))?
    })
}

fn prefix_text(v: &Value) -> Option<String> {
    match v.get("prefix") {
        Some(p) => Some(format!("{}/{}", scalar(p.get("addr")?), p.get("len")?.as_u64()?)),
        None => v.as_str().map(str::to_string),
    }
}

/// `ip saddr != { ranges } drop` of a firewall chain: the allowed sources.
fn firewall_sources(expr: &Value) -> Vec<String> {
    let Some(right) = expr.as_array().and_then(|a| {
        a.iter()
            .find_map(|e| e.get("match").filter(|m| m.get("op").and_then(|o| o.as_str()) == Some("!="))?.get("right"))
    }) else {
        return Vec::new();
    };
    let items: Vec<&Value> = match right.get("set").and_then(|s| s.as_array()) {
        Some(s) => s.iter().collect(),
        None => vec![right],
    };
    items.into_iter().filter_map(prefix_text).map(|t| normalize_cidr(&t)).collect()
}

fn is_fib_saddr_local(expr: &Value) -> bool {
    expr.as_array().is_some_and(|a| {
        a.iter().any(|e| e.pointer("/match/left/fib/flags").is_some_and(|f| f.to_string().contains("saddr")))
    })
}

fn affinity_seconds(b: &Builder, chain: &str) -> Option<u32> {
    b.rules_of(chain).find_map(|expr| {
        let set = expr.as_array()?.iter().find_map(|e| e.pointer("/match/right")?.as_str()?.strip_prefix('@'))?;
        b.table.sets.get(set)?.get("timeout")?.as_u64().map(|t| t as u32)
    })
}

fn build(input: &str, table: &Table) -> RuleModel {
    let mut b = Builder { table, services: BTreeMap::new() };
    let cluster_ips: BTreeSet<String> =
        elements(table.sets.get("cluster-ips")).iter().filter_map(|(k, _, _)| k.first().map(|v| scalar(v))).collect();
    read_service_ips(&mut b);
    read_node_ports(&mut b);
    read_firewall(&mut b);
    read_no_endpoints(&mut b, &cluster_ips);
    read_chains(&mut b);

    let mut refs = BTreeSet::new();
    for v in table.sets.values() {
        referenced(v, &mut refs);
    }
    for rules in table.chains.values() {
        for r in rules {
            referenced(r, &mut refs);
        }
    }
    let unreferenced: Vec<String> = table
        .chains
        .keys()
        .filter(|c| split_chain(c).is_some() && !refs.contains(**c))
        .map(|c| c.to_string())
        .collect();
    let mut services: Vec<ServiceRules> = b.services.into_values().collect();
    for s in &mut services {
        s.node_ports.sort_unstable();
        s.split_lb_self_sources();
    }
    RuleModel {
        input: input.to_string(),
        layout: ChainLayout::Nftables,
        services,
        unreferenced_chains: unreferenced,
        kube: ChainCount { chains: table.chains.len(), rules: table.chains.values().map(|r| r.len()).sum() },
        ..Default::default()
    }
}

fn read_service_ips(b: &mut Builder) {
    for (key, verdict, _) in elements(b.table.sets.get("service-ips")) {
        let (Some(t), [ip, _proto, port]) = (verdict.and_then(target), key.as_slice()) else { continue };
        let Some(c) = split_chain(t) else { continue };
        let (ip, port) = (scalar(ip), port.as_u64().map(|p| p as u16));
        let s = b.service(&c);
        match c.kind {
            "service" | "local" => {
                s.cluster_ip = Some(ip);
                s.port = port;
                s.internal_local |= c.kind == "local";
            }
            _ => {
                if !s.external_ips.contains(&ip) {
                    s.external_ips.push(ip);
                }
            }
        }
    }
}

fn read_node_ports(b: &mut Builder) {
    for (key, verdict, _) in elements(b.table.sets.get("service-nodeports")) {
        let (Some(c), [_proto, port]) = (verdict.and_then(target).and_then(split_chain), key.as_slice()) else {
            continue;
        };
        if let Some(p) = port.as_u64() {
            let s = b.service(&c);
            if !s.node_ports.contains(&(p as u16)) {
                s.node_ports.push(p as u16);
            }
        }
    }
}

/// LB IPs with source ranges go through `firewall-ips`; that is what tells
/// them apart from external IPs in this mode.
fn read_firewall(b: &mut Builder) {
    for (key, verdict, _) in elements(b.table.sets.get("firewall-ips")) {
        let Some(t) = verdict.and_then(target) else { continue };
        let Some(c) = split_chain(t) else { continue };
        let ip = key.first().map(|v| scalar(v)).unwrap_or_default();
        let ranges: Vec<String> = b.rules_of(t).flat_map(firewall_sources).collect();
        let s = b.service(&c);
        s.external_ips.retain(|e| *e != ip);
        if !s.lb_ips.contains(&ip) {
            s.lb_ips.push(ip);
        }
        for r in ranges {
            if !s.lb_source_ranges.contains(&r) {
                s.lb_source_ranges.push(r);
            }
        }
    }
}

/// `no-endpoint-services` / `-nodeports`: the element comment names the
/// service port (`ns/name:port`); reject means no endpoint at all, drop no
/// local endpoint (Local policy).
fn read_no_endpoints(b: &mut Builder, cluster_ips: &BTreeSet<String>) {
    for (map, node_port) in [("no-endpoint-services", false), ("no-endpoint-nodeports", true)] {
        for (key, verdict, comment) in elements(b.table.sets.get(map)) {
            let Some((svc, port_name)) = comment.map(|c| c.split_once(':').unwrap_or((c, ""))) else { continue };
            let Some((ns, name)) = svc.split_once('/') else { continue };
            let proto = key.iter().rev().nth(1).map(|v| scalar(v)).unwrap_or_default();
            let c = ChainName { kind: "service", hash: "", namespace: ns, name, protocol: &proto, port_name };
            let drop = verdict.is_some_and(|v| v.get("drop").is_some());
            let s = b.service(&c);
            if s.chain_hash.as_deref() == Some("") {
                s.chain_hash = None;
            }
            if drop {
                s.drop_no_local_endpoints = true;
                s.local_only = true;
            } else {
                s.reject_no_endpoints = true;
            }
            let port = key.last().and_then(|p| p.as_u64()).map(|p| p as u16);
            if node_port {
                if let Some(p) = port.filter(|p| !s.node_ports.contains(p)) {
                    s.node_ports.push(p);
                }
                continue;
            }
            let ip = key.first().map(|v| scalar(v)).unwrap_or_default();
            if cluster_ips.contains(&ip) {
                s.cluster_ip = Some(ip);
                s.port = port;
            } else if !s.external_ips.contains(&ip) && !s.lb_ips.contains(&ip) {
                s.external_ips.push(ip);
            }
        }
    }
}

fn read_chains(b: &mut Builder) {
    let names: Vec<&str> = b.table.chains.keys().copied().collect();
    for chain in names {
        let Some(c) = split_chain(chain) else { continue };
        match c.kind {
            "service" => {
                let eps = b.endpoints(chain);
                let aff = affinity_seconds(b, chain);
                let masq: Vec<&Value> = b.rules_of(chain).filter(|e| has_masq_jump(e)).collect();
                let unless = masq.iter().find_map(|e| saddr_not(e));
                let all = !masq.is_empty() && unless.is_none();
                let s = b.service(&c);
                s.endpoints = eps;
                s.affinity_seconds = aff;
                s.masquerade_unless_from = unless;
                s.masquerade_all = all;
            }
            "local" => {
                let eps = b.endpoints(chain);
                b.service(&c).local_endpoints = eps;
            }
            "external" => {
                // Only Local policy short-circuits node-local sources, or sends
                // the rest to the local-only chain.
                let local = b.rules_of(chain).any(|e| {
                    is_fib_saddr_local(e)
                        || e.as_array()
                            .is_some_and(|a| a.iter().any(|x| target(x).is_some_and(|t| t.starts_with("local-"))))
                });
                if local {
                    b.service(&c).local_only = true;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names() {
        let c = split_chain("endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80").unwrap();
        assert_eq!(
            (c.kind, c.hash, c.namespace, c.name, c.protocol, c.port_name),
            ("endpoint", "5OJB2KTY", "ns1", "svc1", "tcp", "p80")
        );
        let c = split_chain("service-ULMVA6XW-kube-system/kube-dns/udp/dns").unwrap();
        assert_eq!((c.namespace, c.name, c.port_name), ("kube-system", "kube-dns", "dns"));
        assert!(split_chain("services").is_none());
        assert!(split_chain("nat-prerouting").is_none());
    }

    #[test]
    fn bad_input_names_the_place() {
        let e = parse_nft_json("node-a:nft", "{\n  \"nftables\": [\n").unwrap_err();
        assert!(e.starts_with("node-a:nft:3:"), "{e}");
        let e = parse_nft_json("node-a:nft", "{}").unwrap_err();
        assert!(e.contains("no \"nftables\" array"), "{e}");
    }
}
