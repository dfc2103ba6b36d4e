//! How `kubeshift observe` prints a flow. Pure: record → line.

use kubeshift_datapath::agent::flows::{FlowEndpoint, FlowKind, FlowRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One readable line per flow: time, node, source -> destination, service, verdict.
    Compact,
    /// One JSON record per line, exactly as the agent sent it.
    Json,
}

/// `ns/pod:port` when the pod is known, else `ip:port`.
fn endpoint(e: &FlowEndpoint) -> String {
    let base = match (&e.namespace, &e.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => e.ip.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
    };
    match e.port {
        Some(p) => format!("{base}:{p}"),
        None => base,
    }
}

/// `Nov 22 18:02:11.532` in UTC; the agent's string as it is if it does not parse.
fn time(s: &str) -> String {
    match s.parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(t) => t.strftime("%b %d %H:%M:%S%.3f").to_string(),
        Err(_) => s.to_string(),
    }
}

pub fn compact(r: &FlowRecord) -> String {
    // Which part saw it: one connection can show up as a sock-lb and a policy record.
    let kind = match r.kind {
        FlowKind::SockLb => "sock-lb",
        FlowKind::Policy => "policy",
        FlowKind::Nodeport => "nodeport",
        FlowKind::Unknown => "?",
    };
    let mut s =
        format!("{} [{} {kind}] {} -> {}", time(&r.time), r.node, endpoint(&r.source), endpoint(&r.destination));
    if let Some(svc) = &r.service {
        s.push_str(&format!(" service {}/{} ({}:{})", svc.namespace, svc.name, svc.ip, svc.port));
    }
    if let Some(p) = r.protocol {
        s.push(' ');
        s.push_str(p.as_str());
    }
    s.push(' ');
    s.push_str(r.verdict.as_str());
    if let Some(reason) = &r.drop_reason {
        s.push_str(&format!(" ({reason})"));
    }
    s
}

/// `raw` is the agent's JSON line: passed through, so fields this build does not know
/// (from a newer agent) are not lost.
pub fn line(format: Format, r: &FlowRecord, raw: &str) -> String {
    match format {
        Format::Compact => compact(r),
        Format::Json => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_lines() {
        let fwd: FlowRecord = serde_json::from_str(
            r#"{"time":"2026-11-22T18:02:11.532123456Z","node":"node-1","kind":"sock-lb","verdict":"FORWARDED","protocol":"TCP",
                "source":{"ip":"10.244.1.4","namespace":"obs","pod":"client"},
                "destination":{"ip":"10.244.2.9","port":8080,"namespace":"obs","pod":"echo-5f7d8-x2x1p"},
                "service":{"namespace":"obs","name":"echo","ip":"10.96.12.7","port":80}}"#,
        )
        .unwrap();
        assert_eq!(
            compact(&fwd),
            "Nov 22 18:02:11.532 [node-1 sock-lb] obs/client -> obs/echo-5f7d8-x2x1p:8080 service obs/echo (10.96.12.7:80) TCP FORWARDED"
        );
        let drop: FlowRecord = serde_json::from_str(
            r#"{"time":"bad","node":"node-1","kind":"sock-lb","verdict":"DROPPED","drop_reason":"no-endpoints",
                "source":{},"destination":{"ip":"10.96.3.3","port":80}}"#,
        )
        .unwrap();
        assert_eq!(compact(&drop), "bad [node-1 sock-lb] ? -> 10.96.3.3:80 DROPPED (no-endpoints)");
        assert_eq!(line(Format::Json, &drop, "{raw}"), "{raw}");
    }
}
