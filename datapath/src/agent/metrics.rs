//! Prometheus text exposition and the flow stream on a plain TCP listener: a handful
//! of gauges and one NDJSON endpoint do not justify an HTTP framework.
//!
//! - `GET /metrics`, `GET /healthz` (the process answers)
//! - `GET /readyz`: 200 once the node's datapath is fully in force (every enabled half
//!   wrote its maps from a full list, and every local pod has the policy programs);
//!   503 with one line per reason until then. What a rollout waits for before it takes
//!   the node's old datapath away.
//! - `GET /flows?last=N`: the newest N flow records (default: all kept), one JSON
//!   object per line, oldest first.
//! - `GET /flows?follow=true[&last=N]`: the same, then every new record as it comes;
//!   the response stays open until the client closes it.

use super::flows::{parse_query, FlowStore};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
pub struct Metrics {
    pub node: Mutex<String>,
    pub endpoints_api: Mutex<String>,
    pub synced: AtomicU64,
    pub service_ports: AtomicU64,
    pub backends: AtomicU64,
    pub syncs: AtomicU64,
    pub map_writes: AtomicU64,
    pub sync_errors: AtomicU64,
    pub watch_errors: AtomicU64,
    pub last_sync_ns: AtomicU64,
    pub flows: Arc<FlowStore>,
    /// Ring buffer reads (wakeups) that returned events.
    pub flow_reads: AtomicU64,
    // The policy half (see `agent::policy`).
    pub policy_enabled: AtomicBool,
    pub policy_synced: AtomicU64,
    /// This node's pods with their own network: each needs the policy programs.
    pub policy_local_pods: AtomicU64,
    pub policy_identities: AtomicU64,
    pub policy_entries: AtomicU64,
    pub policy_rejected: AtomicU64,
    pub policy_interfaces: AtomicU64,
    pub policy_attach_errors: AtomicU64,
    pub policy_last_sync_ns: AtomicU64,
    // The NodePort half (see `agent::frontends`).
    pub nodeport_enabled: AtomicBool,
    pub nodeport_synced: AtomicU64,
    pub nodeport_frontends: AtomicU64,
    /// Standby mode: only the overlay runs, and only it decides readiness.
    pub standby: AtomicBool,
    /// Why the overlay is not programmed yet (see `overlay::standby`).
    pub overlay: crate::overlay::standby::Readiness,
    /// Why the mode wanted by the node's label is not in force (see `agent::modes`).
    pub mode: crate::overlay::standby::Readiness,
}

impl Metrics {
    /// Why the node's datapath is not fully in force yet; empty when it is.
    pub fn not_ready(&self) -> Vec<String> {
        let mut why = self.mode.lock().unwrap().clone();
        why.extend(self.overlay.lock().unwrap().iter().cloned());
        if self.standby.load(Relaxed) {
            return why;
        }
        if self.synced.load(Relaxed) != 1 {
            why.push("services: maps not yet written from a full list of Services and endpoints".to_string());
        }
        if self.policy_enabled.load(Relaxed) {
            if self.policy_synced.load(Relaxed) != 1 {
                why.push(
                    "policy: maps not yet written from a full list of Pods, Namespaces and NetworkPolicies".to_string(),
                );
            }
            let (attached, local) = (self.policy_interfaces.load(Relaxed), self.policy_local_pods.load(Relaxed));
            if attached < local {
                why.push(format!("policy: {attached} of {local} local pods have the programs attached"));
            }
        }
        if self.nodeport_enabled.load(Relaxed) && self.nodeport_synced.load(Relaxed) != 1 {
            why.push("nodeport: frontends not yet written from a full list of Services and EndpointSlices".to_string());
        }
        why
    }

    pub fn render(&self) -> String {
        let node = self.node.lock().unwrap().clone();
        let api = self.endpoints_api.lock().unwrap().clone();
        let l = format!("node=\"{node}\"");
        let mut s = String::new();
        let mut m = |name: &str, kind: &str, help: &str, labels: &str, v: String| {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}\n"));
        };
        m(
            "kubeshift_agent_info",
            "gauge",
            "Agent node and the endpoints API it watches.",
            &format!("{l},endpoints_api=\"{api}\""),
            "1".into(),
        );
        m(
            "kubeshift_agent_ready",
            "gauge",
            "1 when GET /readyz answers 200: every enabled half is synced and every local pod has the policy programs.",
            &l,
            u64::from(self.not_ready().is_empty()).to_string(),
        );
        m(
            "kubeshift_agent_active",
            "gauge",
            "1 when the node is active (kubeshift's CNI conf first, the datapath attached); 0 in standby.",
            &l,
            u64::from(!self.standby.load(Relaxed)).to_string(),
        );
        m(
            "kubeshift_agent_synced",
            "gauge",
            "1 once the maps were reconciled with a full list of the API.",
            &l,
            self.synced.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_service_ports",
            "gauge",
            "Service ports (VIP, port, protocol) in the maps.",
            &l,
            self.service_ports.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_backends",
            "gauge",
            "Backends in the maps, summed over service ports.",
            &l,
            self.backends.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_syncs_total",
            "counter",
            "Sync passes (one per burst of API events).",
            &l,
            self.syncs.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_map_writes_total",
            "counter",
            "Service-port upserts and removals written.",
            &l,
            self.map_writes.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_sync_errors_total",
            "counter",
            "Failed map writes (retried).",
            &l,
            self.sync_errors.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_watch_errors_total",
            "counter",
            "Watch errors (retried with backoff).",
            &l,
            self.watch_errors.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_last_sync_seconds",
            "gauge",
            "From receiving an API event to its map writes done, last sync pass.",
            &l,
            format!("{:.6}", self.last_sync_ns.load(Relaxed) as f64 / 1e9),
        );
        m(
            "kubeshift_agent_policy_synced",
            "gauge",
            "1 once the policy maps were written from a full list of Pods, Namespaces and NetworkPolicies.",
            &l,
            self.policy_synced.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_policy_identities",
            "gauge",
            "Identities in the last compile.",
            &l,
            self.policy_identities.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_policy_entries",
            "gauge",
            "Policy map allow entries for this node's identities.",
            &l,
            self.policy_entries.load(Relaxed).to_string(),
        );
        m("kubeshift_agent_policy_rejected", "gauge", "NetworkPolicies that could not be read (see the log): enforced as deny-all for their pods, or left out if their pod selector is unreadable.", &l, self.policy_rejected.load(Relaxed).to_string());
        m(
            "kubeshift_agent_policy_local_pods",
            "gauge",
            "This node's pods with their own network interface (each needs the policy programs).",
            &l,
            self.policy_local_pods.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_policy_interfaces",
            "gauge",
            "Pod interfaces with the policy programs attached.",
            &l,
            self.policy_interfaces.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_policy_attach_errors_total",
            "counter",
            "Attach attempts that failed (retried every second; a pod's interface may not exist yet).",
            &l,
            self.policy_attach_errors.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_policy_last_sync_seconds",
            "gauge",
            "Last policy pass: compile plus map writes.",
            &l,
            format!("{:.6}", self.policy_last_sync_ns.load(Relaxed) as f64 / 1e9),
        );
        m(
            "kubeshift_agent_nodeport_synced",
            "gauge",
            "1 once the NodePort frontends were written from a full list of Services and EndpointSlices.",
            &l,
            self.nodeport_synced.load(Relaxed).to_string(),
        );
        m(
            "kubeshift_agent_nodeport_frontends",
            "gauge",
            "NodePort, externalIP and load-balancer IP frontends in the maps.",
            &l,
            self.nodeport_frontends.load(Relaxed).to_string(),
        );
        self.flows.with_counts(|c, kept| {
            s.push_str("# HELP kubeshift_agent_flows_total Flow records made from datapath events, by verdict.\n# TYPE kubeshift_agent_flows_total counter\n");
            for (v, n) in [("FORWARDED", c.forwarded), ("DROPPED", c.dropped), ("UNKNOWN", c.other)] {
                s.push_str(&format!("kubeshift_agent_flows_total{{{l},verdict=\"{v}\"}} {n}\n"));
            }
            let mut m = |name: &str, kind: &str, help: &str, v: u64| {
                s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{l}}} {v}\n"));
            };
            m("kubeshift_agent_flows_unknown_source_total", "counter", "Flow records whose source pod was not found (netns cookie of no known pod).", c.unknown_source);
            m("kubeshift_agent_flows_follower_missed_total", "counter", "Records a slow /flows?follow reader did not get (it fell behind by more than 1024).", c.follower_missed);
            m("kubeshift_agent_flows_kept", "gauge", "Flow records kept in memory for /flows?last=N.", kept as u64);
            m("kubeshift_agent_flow_reads_total", "counter", "Ring buffer wakeups that returned events.", self.flow_reads.load(Relaxed));
        });
        s
    }
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(handle(sock, metrics));
    }
}

async fn respond(sock: &mut tokio::net::TcpStream, status: &str, content_type: &str, body: &str) {
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
}

/// The request head, read until its blank line: a client may send it in several
/// segments, and answering the first one alone would cut the rest off. Bounded in size
/// and time so a silent or endless client cannot hold a task.
async fn read_head(sock: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
    head
}

async fn handle(mut sock: tokio::net::TcpStream, metrics: Arc<Metrics>) {
    let head = read_head(&mut sock).await;
    let req = String::from_utf8_lossy(&head);
    let target = req.split_whitespace().nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    const TEXT: &str = "text/plain; version=0.0.4";
    match path {
        "/metrics" => respond(&mut sock, "200 OK", TEXT, &metrics.render()).await,
        "/healthz" => respond(&mut sock, "200 OK", TEXT, "ok\n").await,
        "/readyz" => match metrics.not_ready() {
            why if why.is_empty() => respond(&mut sock, "200 OK", TEXT, "ok\n").await,
            why => respond(&mut sock, "503 Service Unavailable", TEXT, &(why.join("\n") + "\n")).await,
        },
        "/flows" => match parse_query(query) {
            Err(e) => respond(&mut sock, "400 Bad Request", "text/plain", &format!("{e}\n")).await,
            Ok(q) if !q.follow => {
                let lines = metrics.flows.last(q.last.unwrap_or(usize::MAX));
                let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
                for l in lines {
                    body.push_str(&l);
                    body.push('\n');
                }
                respond(&mut sock, "200 OK", NDJSON, &body).await
            }
            Ok(q) => follow(sock, &metrics.flows, q.last.unwrap_or(0)).await,
        },
        _ => respond(&mut sock, "404 Not Found", "text/plain", "").await,
    }
}

const NDJSON: &str = "application/x-ndjson";

/// Streams records until the client goes away. The body has no length and ends with the
/// connection, which HTTP/1.1 allows with `Connection: close`.
async fn follow(mut sock: tokio::net::TcpStream, store: &FlowStore, last: usize) {
    // Subscribed before the header goes out: a client that has the header sees every
    // record made after that.
    let (snapshot, mut rx) = store.last_and_follow(last);
    let (mut rd, mut wr) = sock.split();
    let head =
        format!("HTTP/1.1 200 OK\r\nContent-Type: {NDJSON}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n");
    let mut out = head.into_bytes();
    for l in snapshot {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    }
    if wr.write_all(&out).await.is_err() {
        return;
    }
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(line) => {
                    let mut b = Vec::with_capacity(line.len() + 1);
                    b.extend_from_slice(line.as_bytes());
                    b.push(b'\n');
                    if wr.write_all(&b).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => store.missed(n),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            // Without this a closed follower would only be noticed at the next record.
            r = rd.read(&mut scratch) => if matches!(r, Ok(0) | Err(_)) { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::flows::{FlowEndpoint, FlowKind, FlowRecord, FlowVerdict};
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    fn rec(cookie: u64, verdict: FlowVerdict) -> FlowRecord {
        FlowRecord {
            time: "2026-11-22T18:00:00Z".into(),
            node: "n1".into(),
            kind: FlowKind::SockLb,
            verdict,
            drop_reason: None,
            protocol: None,
            source: FlowEndpoint::default(),
            destination: FlowEndpoint::default(),
            service: None,
            observation_point: None,
            socket_cookie: Some(cookie),
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> BufReader<tokio::net::TcpStream> {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        BufReader::new(s)
    }

    async fn body_lines(r: &mut BufReader<tokio::net::TcpStream>) -> (String, Vec<String>) {
        let mut status = String::new();
        r.read_line(&mut status).await.unwrap();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await.unwrap();
            if h == "\r\n" {
                break;
            }
        }
        let mut lines = Vec::new();
        let mut l = String::new();
        while r.read_line(&mut l).await.unwrap() > 0 {
            lines.push(std::mem::take(&mut l));
        }
        (status, lines)
    }

    /// Fresh metrics served on a loopback port.
    async fn serving() -> (std::net::SocketAddr, Arc<Metrics>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        tokio::spawn(serve(listener, m.clone()));
        (addr, m)
    }

    #[tokio::test]
    async fn a_request_head_in_several_segments_is_read_whole() {
        let (addr, m) = serving().await;
        m.synced.store(1, Relaxed);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        for part in ["GET ", "/metrics", " HTTP/1.1\r\n", "Host: x\r\n", "\r\n"] {
            s.write_all(part.as_bytes()).await.unwrap();
            s.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let (status, lines) = body_lines(&mut BufReader::new(s)).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(
            lines.iter().any(|l| l.starts_with("kubeshift_agent_synced{") && l.trim_end().ends_with(" 1")),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn readyz_in_standby_answers_for_the_overlay_alone() {
        let (addr, m) = serving().await;
        m.standby.store(true, Relaxed);
        *m.overlay.lock().unwrap() = vec!["overlay: node n1 has no range claimed yet".into()];
        let (status, lines) = body_lines(&mut get(addr, "/readyz").await).await;
        assert!(status.starts_with("HTTP/1.1 503"), "{status}");
        assert_eq!(lines.concat(), "overlay: node n1 has no range claimed yet\n");
        // The services half never syncs in standby, and is not waited for.
        m.overlay.lock().unwrap().clear();
        let (status, lines) = body_lines(&mut get(addr, "/readyz").await).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert_eq!(lines.concat(), "ok\n");
        let (status, _) = body_lines(&mut get(addr, "/healthz").await).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }

    #[tokio::test]
    async fn readyz_waits_for_every_enabled_half_and_every_local_pod() {
        let (addr, m) = serving().await;
        m.policy_enabled.store(true, Relaxed);
        m.nodeport_enabled.store(true, Relaxed);
        let ready = || async {
            let (status, lines) = body_lines(&mut get(addr, "/readyz").await).await;
            let gauge = m.render().lines().find(|l| l.starts_with("kubeshift_agent_ready{")).map(|l| l.ends_with(" 1"));
            assert_eq!(gauge, Some(status.starts_with("HTTP/1.1 200")), "{status}");
            (status.starts_with("HTTP/1.1 200"), lines.concat())
        };

        let (ok, why) = ready().await;
        assert!(!ok && why.contains("services:") && why.contains("policy: maps") && why.contains("nodeport:"), "{why}");
        m.synced.store(1, Relaxed);
        m.policy_synced.store(1, Relaxed);
        m.nodeport_synced.store(1, Relaxed);
        m.policy_local_pods.store(3, Relaxed);
        m.policy_interfaces.store(2, Relaxed);
        let (ok, why) = ready().await;
        assert_eq!((ok, why.as_str()), (false, "policy: 2 of 3 local pods have the programs attached\n"));
        m.policy_interfaces.store(3, Relaxed);
        assert_eq!(ready().await, (true, "ok\n".to_string()));

        // A half that is switched off is not waited for.
        m.nodeport_synced.store(0, Relaxed);
        assert!(!ready().await.0);
        m.nodeport_enabled.store(false, Relaxed);
        assert!(ready().await.0);
    }

    #[tokio::test]
    async fn flows_endpoint_serves_last_n_follow_and_counts() {
        let (addr, metrics) = serving().await;
        for i in 0..3 {
            metrics.flows.push(&rec(i, if i == 2 { FlowVerdict::Dropped } else { FlowVerdict::Forwarded }));
        }

        let (status, lines) = body_lines(&mut get(addr, "/flows?last=2").await).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let cookies: Vec<_> =
            lines.iter().map(|l| serde_json::from_str::<FlowRecord>(l).unwrap().socket_cookie.unwrap()).collect();
        assert_eq!(cookies, vec![1, 2]);

        let (status, lines) = body_lines(&mut get(addr, "/flows?last=many").await).await;
        assert!(status.starts_with("HTTP/1.1 400") && lines.concat().contains("last=\"many\""), "{status} {lines:?}");

        // A follower gets the one it asked for from history, then what comes after, and
        // nothing from before its header.
        let mut f = get(addr, "/flows?follow=true&last=1").await;
        let mut l = String::new();
        while l != "\r\n" {
            l.clear();
            f.read_line(&mut l).await.unwrap();
        }
        metrics.flows.push(&rec(7, FlowVerdict::Forwarded));
        for want in [2, 7] {
            l.clear();
            f.read_line(&mut l).await.unwrap();
            assert_eq!(serde_json::from_str::<FlowRecord>(&l).unwrap().socket_cookie, Some(want));
        }

        let m = metrics.render();
        assert!(m.contains("kubeshift_agent_flows_total{node=\"\",verdict=\"FORWARDED\"} 3\n"), "{m}");
        assert!(m.contains("kubeshift_agent_flows_total{node=\"\",verdict=\"DROPPED\"} 1\n"), "{m}");
        assert!(m.contains("kubeshift_agent_flows_kept{node=\"\"} 4\n"), "{m}");
    }
}
