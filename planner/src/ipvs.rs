//! kube-proxy's ipvs mode, read from `ipvsadm -Sn` (what `kubeshift node
//! report` saves) or `ipvsadm -Ln` (what operators paste).
//!
//! IPVS virtual servers carry no service names: kube-proxy makes one per
//! service address (ClusterIP, external IP, LB IP, every node IP for a node
//! port) with the ready endpoints as real servers. So the model is matched to
//! the API's services by address, port and protocol ([`to_rule_model`]), and
//! the result is the same [`RuleModel`] the diff reads.

use crate::api::ApiServices;
use crate::iptables::{ChainCount, ChainLayout, EndpointRule, RuleModel, ServiceRules};
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RealServer {
    pub ip: String,
    pub port: u16,
    /// 0 while kube-proxy drains a terminating endpoint (graceful termination).
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    pub ip: String,
    pub port: u16,
    pub scheduler: String,
    /// `persistent N` / `-p N`: ClientIP session affinity of N seconds.
    pub persistent: Option<u32>,
    pub reals: Vec<RealServer>,
}

/// Splits `ip:port` or `[ip6]:port`.
fn addr(v: &str) -> Option<(String, u16)> {
    crate::iptables::lexer::split_host_port(v).map(|(h, p)| (h.to_string(), p))
}

fn proto_of(flag_or_name: &str) -> Option<&'static str> {
    match flag_or_name {
        "-t" | "--tcp-service" | "TCP" => Some("tcp"),
        "-u" | "--udp-service" | "UDP" => Some("udp"),
        "--sctp-service" | "SCTP" => Some("sctp"),
        _ => None,
    }
}

/// Parses `ipvsadm -Sn` or `ipvsadm -Ln` output. `input` names it in errors,
/// which give the line.
pub fn parse_ipvsadm(input: &str, text: &str) -> Result<Vec<VirtualServer>, String> {
    let mut out: Vec<VirtualServer> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |what: &str| format!("{input}:{}: {what}: `{line}`", n + 1);
        if line.is_empty() || line.starts_with('#') || is_list_header(line) {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "-A" => out.push(save_virtual(&words).ok_or_else(|| err("malformed virtual server"))?),
            "-a" => {
                let (key, real) = save_real(&words).ok_or_else(|| err("malformed real server"))?;
                let vs = out.iter_mut().find(|v| v.protocol == key.0 && v.ip == key.1 && v.port == key.2);
                vs.ok_or_else(|| err("real server of an unknown virtual server"))?.reals.push(real);
            }
            "->" => {
                let real = list_real(&words).ok_or_else(|| err("malformed real server"))?;
                out.last_mut().ok_or_else(|| err("real server before any virtual server"))?.reals.push(real);
            }
            "FWM" => return Err(err("firewall-mark virtual servers are not kube-proxy's")),
            w if proto_of(w).is_some() => {
                out.push(list_virtual(&words).ok_or_else(|| err("malformed virtual server"))?)
            }
            _ => return Err(err("not ipvsadm -Sn or -Ln output")),
        }
    }
    Ok(out)
}

fn is_list_header(line: &str) -> bool {
    line.starts_with("IP Virtual Server") || line.starts_with("Prot ") || line.starts_with("-> RemoteAddress")
}

/// `-A -t 10.96.0.1:443 -s rr [-p 10800]`
fn save_virtual(w: &[&str]) -> Option<VirtualServer> {
    let protocol = proto_of(w.get(1)?)?.to_string();
    let (ip, port) = addr(w.get(2)?)?;
    let opt = |f: &str| w.iter().position(|x| *x == f).and_then(|i| w.get(i + 1)).copied();
    Some(VirtualServer {
        protocol,
        ip,
        port,
        scheduler: opt("-s").unwrap_or("wlc").to_string(),
        persistent: opt("-p").and_then(|p| p.parse().ok()),
        reals: Vec::new(),
    })
}

/// `-a -t 10.96.0.1:443 -r 192.168.0.5:6443 -m -w 1`: the virtual server's
/// (protocol, address, port) and the real server.
fn save_real(w: &[&str]) -> Option<((&'static str, String, u16), RealServer)> {
    let proto = proto_of(w.get(1)?)?;
    let (vip, vport) = addr(w.get(2)?)?;
    let opt = |f: &str| w.iter().position(|x| *x == f).and_then(|i| w.get(i + 1)).copied();
    let (ip, port) = addr(opt("-r")?)?;
    let weight = opt("-w").and_then(|x| x.parse().ok()).unwrap_or(1);
    Some(((proto, vip, vport), RealServer { ip, port, weight }))
}

/// `TCP  10.254.0.1:443 rr persistent 10800`
fn list_virtual(w: &[&str]) -> Option<VirtualServer> {
    let protocol = proto_of(w.first()?)?.to_string();
    let (ip, port) = addr(w.get(1)?)?;
    let persistent = w.iter().position(|x| *x == "persistent").and_then(|i| w.get(i + 1)).and_then(|p| p.parse().ok());
    Some(VirtualServer {
        protocol,
        ip,
        port,
        scheduler: w.get(2).unwrap_or(&"").to_string(),
        persistent,
        reals: Vec::new(),
    })
}

/// `-> 10.253.7.7:80   Masq  1  0  0`
fn list_real(w: &[&str]) -> Option<RealServer> {
    let (ip, port) = addr(w.get(1)?)?;
    Some(RealServer { ip, port, weight: w.get(3).and_then(|x| x.parse().ok()).unwrap_or(1) })
}

/// kube-proxy's ipvs virtual servers matched to the API's services: each
/// service port's ClusterIP, external and LB IP virtual servers, and its node
/// port on any address. Virtual servers that match nothing are stale.
pub fn to_rule_model(input: &str, vss: &[VirtualServer], api: &ApiServices) -> RuleModel {
    let mut used: BTreeSet<usize> = BTreeSet::new();
    let mut services = Vec::new();
    for svc in api.services.iter().filter(|s| s.is_proxied()) {
        for port in &svc.ports {
            let proto = port.protocol.to_ascii_lowercase();
            let find = |ip: &str, p: u16| vss.iter().position(|v| v.protocol == proto && v.ip == ip && v.port == p);
            let cluster_ip = svc.cluster_ip.clone().unwrap_or_default();
            let Some(ci) = find(&cluster_ip, port.port) else { continue };
            used.insert(ci);
            let vs = &vss[ci];
            let mut s = ServiceRules {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                port_name: port.name.clone(),
                protocol: proto.clone(),
                cluster_ip: Some(cluster_ip),
                port: Some(port.port),
                endpoints: endpoints(vs),
                affinity_seconds: vs.persistent,
                // IPVS answers a virtual server without real servers itself
                // (ICMP port unreachable): there is no REJECT rule to look for.
                reject_no_endpoints: vs.reals.iter().all(|r| r.weight == 0),
                ..Default::default()
            };
            for (ips, dst) in [(&svc.external_ips, 0), (&svc.lb_ingress_ips, 1)] {
                for ip in ips {
                    if let Some(i) = find(ip, port.port) {
                        used.insert(i);
                        if dst == 0 {
                            s.external_ips.push(ip.clone())
                        } else {
                            s.lb_ips.push(ip.clone())
                        }
                    }
                }
            }
            if let Some(np) = port.node_port {
                let on_nodes: Vec<usize> = (0..vss.len())
                    .filter(|i| vss[*i].protocol == proto && vss[*i].port == np && !used.contains(i))
                    .collect();
                if !on_nodes.is_empty() {
                    s.node_ports.push(np);
                    used.extend(on_nodes);
                }
            }
            services.push(s);
        }
    }
    for vs in vss.iter().enumerate().filter(|(i, _)| !used.contains(i)).map(|(_, v)| v) {
        services.push(ServiceRules {
            protocol: vs.protocol.clone(),
            cluster_ip: Some(vs.ip.clone()),
            port: Some(vs.port),
            chain_hash: Some(format!(
                "{} {}",
                vs.protocol.to_ascii_uppercase(),
                crate::api::host_port(&vs.ip, vs.port)
            )),
            endpoints: endpoints(vs),
            ..Default::default()
        });
    }
    RuleModel {
        input: input.to_string(),
        layout: ChainLayout::Ipvs,
        services,
        kube: ChainCount { chains: vss.len(), rules: vss.iter().map(|v| v.reals.len()).sum() },
        ..Default::default()
    }
}

/// Real servers that take new connections (weight 0 is a draining one).
fn endpoints(vs: &VirtualServer) -> Vec<EndpointRule> {
    let live: Vec<&RealServer> = vs.reals.iter().filter(|r| r.weight > 0).collect();
    let total: u32 = live.iter().map(|r| r.weight).sum();
    live.iter()
        .map(|r| {
            let share = f64::from(r.weight) / f64::from(total.max(1));
            EndpointRule { ip: r.ip.clone(), port: r.port, probability: share, share, chain: String::new() }
        })
        .collect()
}
