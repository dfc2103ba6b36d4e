//! Which flows `kubeshift observe` shows. Pure: flags → [`Filter`] → `matches(record)`.
//!
//! Filtering happens here, in the client, not in the agent: the agent keeps at most a
//! few thousand records per node, so fetching them all is cheap; one implementation
//! then serves every agent version, and `--last N` means "the newest N that match
//! across all nodes", which only the client (merging several agents) can compute.

use kubeshift_datapath::agent::flows::{FlowEndpoint, FlowKind, FlowProtocol, FlowRecord, FlowVerdict};
use std::collections::BTreeMap;

/// `--from-pod/--to-pod ns/name`: namespace exact, pod name as a prefix (as hubble
/// does, so a Deployment's pods match by its name). Without `ns/`, `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMatch {
    pub namespace: String,
    pub name_prefix: String,
}

pub fn parse_pod(s: &str) -> Result<PodMatch, String> {
    let (ns, name) = s.split_once('/').unwrap_or(("default", s));
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return Err(format!("{s:?}: want NAMESPACE/POD (the pod name may be a prefix)"));
    }
    Ok(PodMatch { namespace: ns.to_string(), name_prefix: name.to_string() })
}

/// `key=value`; all given labels must be on the pod.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: want KEY=VALUE")),
    }
}

pub fn parse_verdict(s: &str) -> Result<FlowVerdict, String> {
    match s.to_ascii_uppercase().as_str() {
        "FORWARDED" => Ok(FlowVerdict::Forwarded),
        "DROPPED" => Ok(FlowVerdict::Dropped),
        _ => Err(format!("{s:?}: want FORWARDED or DROPPED")),
    }
}

pub fn parse_protocol(s: &str) -> Result<FlowProtocol, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(FlowProtocol::Tcp),
        "udp" => Ok(FlowProtocol::Udp),
        _ => Err(format!("{s:?}: want tcp or udp")),
    }
}

/// `--type`: which part of the datapath saw the flow.
pub fn parse_kind(s: &str) -> Result<FlowKind, String> {
    match s.to_ascii_lowercase().as_str() {
        "sock-lb" => Ok(FlowKind::SockLb),
        "policy" => Ok(FlowKind::Policy),
        "nodeport" => Ok(FlowKind::Nodeport),
        _ => Err(format!("{s:?}: want sock-lb, policy or nodeport")),
    }
}

/// Every given condition must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub verdict: Option<FlowVerdict>,
    pub from_pod: Option<PodMatch>,
    pub to_pod: Option<PodMatch>,
    pub from_labels: Vec<(String, String)>,
    pub to_labels: Vec<(String, String)>,
    /// Source, destination or service port.
    pub port: Option<u16>,
    pub protocol: Option<FlowProtocol>,
    /// Any of these kinds (empty: all).
    pub kinds: Vec<FlowKind>,
}

fn pod_matches(m: &PodMatch, e: &FlowEndpoint) -> bool {
    e.namespace.as_deref() == Some(m.namespace.as_str())
        && e.pod.as_deref().is_some_and(|p| p.starts_with(&m.name_prefix))
}

fn labels_match(want: &[(String, String)], have: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.verdict.is_none_or(|v| r.verdict == v)
            && (self.kinds.is_empty() || self.kinds.contains(&r.kind))
            && self.protocol.is_none_or(|p| r.protocol == Some(p))
            && self.from_pod.as_ref().is_none_or(|m| pod_matches(m, &r.source))
            && self.to_pod.as_ref().is_none_or(|m| pod_matches(m, &r.destination))
            && labels_match(&self.from_labels, &r.source.labels)
            && labels_match(&self.to_labels, &r.destination.labels)
            && self.port.is_none_or(|p| {
                r.source.port == Some(p)
                    || r.destination.port == Some(p)
                    || r.service.as_ref().is_some_and(|s| s.port == p)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeshift_datapath::agent::flows::{FlowKind, FlowService};

    fn ep(ns: &str, pod: &str, port: Option<u16>, labels: &[(&str, &str)]) -> FlowEndpoint {
        FlowEndpoint {
            ip: Some("10.244.1.5".parse().unwrap()),
            port,
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            identity: None,
        }
    }

    fn flow() -> FlowRecord {
        FlowRecord {
            time: "2026-11-22T18:00:00Z".into(),
            node: "node-1".into(),
            kind: FlowKind::SockLb,
            verdict: FlowVerdict::Forwarded,
            drop_reason: None,
            protocol: Some(FlowProtocol::Tcp),
            source: ep("shop", "client", None, &[("app", "client"), ("tier", "fe")]),
            destination: ep("shop", "web-7d9f-abcde", Some(8080), &[("app", "web")]),
            service: Some(FlowService {
                namespace: "shop".into(),
                name: "web".into(),
                ip: "10.96.0.10".parse().unwrap(),
                port: 80,
            }),
            observation_point: None,
            socket_cookie: None,
        }
    }

    fn f(args: impl FnOnce(&mut Filter)) -> Filter {
        let mut x = Filter::default();
        args(&mut x);
        x
    }

    #[test]
    fn each_condition_includes_and_excludes() {
        let r = flow();
        let pod = |s: &str| Some(parse_pod(s).unwrap());
        let lab = |s: &str| vec![parse_label(s).unwrap()];
        let yes = [
            Filter::default(),
            f(|x| x.verdict = Some(FlowVerdict::Forwarded)),
            f(|x| x.from_pod = pod("shop/client")),
            f(|x| x.to_pod = pod("shop/web")),
            f(|x| x.to_pod = pod("shop/web-7d9f-abcde")),
            f(|x| x.from_labels = vec![parse_label("app=client").unwrap(), parse_label("tier=fe").unwrap()]),
            f(|x| x.to_labels = lab("app=web")),
            f(|x| x.port = Some(8080)),
            f(|x| x.port = Some(80)),
            f(|x| x.protocol = Some(FlowProtocol::Tcp)),
            f(|x| x.kinds = vec![r.kind]),
            f(|x| x.kinds = vec![FlowKind::Policy, r.kind]),
        ];
        for y in &yes {
            assert!(y.matches(&r), "{y:?} should match");
        }
        let no = [
            f(|x| x.verdict = Some(FlowVerdict::Dropped)),
            f(|x| x.from_pod = pod("shop/web")),
            f(|x| x.from_pod = pod("other/client")),
            f(|x| x.from_pod = pod("client")),
            f(|x| x.to_pod = pod("shop/client")),
            f(|x| x.from_labels = vec![parse_label("app=client").unwrap(), parse_label("tier=be").unwrap()]),
            f(|x| x.to_labels = lab("app=client")),
            f(|x| x.port = Some(443)),
            f(|x| x.protocol = Some(FlowProtocol::Udp)),
            f(|x| x.kinds = vec![FlowKind::Policy, FlowKind::Nodeport]),
        ];
        for n in &no {
            assert!(!n.matches(&r), "{n:?} should not match");
        }
    }

    #[test]
    fn unknown_endpoints_match_no_pod_or_label_filter() {
        let mut r = flow();
        r.source = FlowEndpoint::default();
        r.protocol = None;
        assert!(!f(|x| x.from_pod = Some(parse_pod("shop/c").unwrap())).matches(&r));
        assert!(!f(|x| x.from_labels = vec![("app".into(), "client".into())]).matches(&r));
        assert!(!f(|x| x.protocol = Some(FlowProtocol::Tcp)).matches(&r));
        assert!(f(|x| x.to_pod = Some(parse_pod("shop/web").unwrap())).matches(&r));
    }

    #[test]
    fn flag_values() {
        assert_eq!(parse_pod("web").unwrap(), PodMatch { namespace: "default".into(), name_prefix: "web".into() });
        for bad in ["shop/", "/web", "a/b/c", ""] {
            assert!(parse_pod(bad).unwrap_err().contains("NAMESPACE/POD"), "{bad}");
        }
        assert_eq!(parse_label("k=").unwrap(), ("k".into(), "".into()));
        assert!(parse_label("k").is_err() && parse_label("=v").is_err());
        assert_eq!(parse_verdict("dropped").unwrap(), FlowVerdict::Dropped);
        assert!(parse_verdict("DENIED").unwrap_err().contains("FORWARDED or DROPPED"));
        assert_eq!(parse_protocol("UDP").unwrap(), FlowProtocol::Udp);
        assert!(parse_protocol("sctp").is_err());
        assert!(Filter::default().is_empty() && !f(|x| x.port = Some(1)).is_empty());
    }
}
