//! The agent's HTTP surface, served with axum on hyper. Once the agent runs on every
//! node it is reachable by anything on the node network, so it is bounded: a request
//! head must arrive within [`Limits::head`] and fit in [`Limits::head_bytes`], a
//! request may not carry a body, and answers other than the flow stream must be made
//! within [`Limits::answer`]. At most [`Limits::connections`] connections are served at
//! once; more wait in the kernel's accept queue.
//!
//! - `GET /metrics`: OpenMetrics text (see [`super::metrics`]).
//! - `GET /healthz`: 200 while the process answers.
//! - `GET /readyz`: 200 once the node's datapath is fully in force (every enabled half
//!   wrote its maps from a full list, and every local pod has the policy programs);
//!   503 with one line per reason until then. What a rollout waits for before it takes
//!   the node's old datapath away.
//! - `GET /flows?last=N`: the newest N flow records (default: all kept), one JSON
//!   object per line, oldest first.
//! - `GET /flows?follow=true[&last=N]`: the same, then every new record as it comes;
//!   the response stays open until the client closes it.

use super::flows::{parse_query, FlowStore};
use super::metrics::Metrics;
use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub head: Duration,
    /// hyper's read buffer: a head that does not fit is answered 431. hyper's minimum
    /// is 8 KiB.
    pub head_bytes: usize,
    pub answer: Duration,
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { head: Duration::from_secs(5), head_bytes: 8192, answer: Duration::from_secs(10), connections: 64 }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const NDJSON: &str = "application/x-ndjson";

/// Binds `addr` and serves there until the process ends. Returns the bound address
/// (port 0 picks one).
pub async fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!("/metrics, /healthz, /readyz and /flows on http://{bound}");
    tokio::spawn(serve(listener, metrics, Limits::default()));
    Ok(bound)
}

pub fn router(metrics: Arc<Metrics>, limits: Limits) -> Router {
    let answered = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { ([(header::CONTENT_TYPE, TEXT)], "ok\n") }))
        .route("/readyz", get(readyz))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, limits.answer));
    // The flow stream lasts as long as its reader wants; only its head is bounded.
    Router::new().route("/flows", get(flows)).merge(answered).layer(RequestBodyLimitLayer::new(0)).with_state(metrics)
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    let app = router(metrics, limits);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of descriptors, typically: the next accept would fail the same way
                // at once, so give the system a moment instead of spinning.
                tracing::warn!("metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut conn = hyper::server::conn::http1::Builder::new();
            conn.timer(TokioTimer::new()).header_read_timeout(limits.head).max_buf_size(limits.head_bytes);
            let _ = conn.serve_connection(TokioIo::new(sock), svc).await;
            drop(slot);
        });
    }
}

async fn metrics_text(State(m): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, OPENMETRICS)], m.render()).into_response()
}

async fn readyz(State(m): State<Arc<Metrics>>) -> Response {
    match m.not_ready() {
        why if why.is_empty() => ([(header::CONTENT_TYPE, TEXT)], "ok\n".to_string()).into_response(),
        why => (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, TEXT)], why.join("\n") + "\n").into_response(),
    }
}

async fn flows(State(m): State<Arc<Metrics>>, RawQuery(q): RawQuery) -> Response {
    let q = match parse_query(q.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, TEXT)], format!("{e}\n")).into_response(),
    };
    if !q.follow {
        let lines = m.flows.last(q.last.unwrap_or(usize::MAX));
        let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            body.push_str(&l);
            body.push('\n');
        }
        return ([(header::CONTENT_TYPE, NDJSON)], body).into_response();
    }
    (
        [(header::CONTENT_TYPE, NDJSON), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(follow(m.flows.clone(), q.last.unwrap_or(0))),
    )
        .into_response()
}

/// The newest `last` records, then every new one. Subscribed before the response head
/// goes out: a client that has the head sees every record made after that. hyper drops
/// the stream when the client goes away.
fn follow(
    store: Arc<FlowStore>,
    last: usize,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    let (snapshot, rx) = store.last_and_follow(last);
    let line = |l: &str| {
        let mut b = Vec::with_capacity(l.len() + 1);
        b.extend_from_slice(l.as_bytes());
        b.push(b'\n');
        Ok(Bytes::from(b))
    };
    let history = futures::stream::iter(snapshot.into_iter().map(move |l| line(&l)));
    let new = futures::stream::unfold((store, rx), move |(store, mut rx)| async move {
        loop {
            match rx.recv().await {
                Ok(l) => return Some((line(&l), (store, rx))),
                Err(RecvError::Lagged(n)) => store.missed(n),
                Err(RecvError::Closed) => return None,
            }
        }
    });
    history.chain(new)
}

#[cfg(test)]
mod tests {
    use super::super::flows::{sample as rec, FlowRecord, FlowVerdict};
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    async fn get(addr: SocketAddr, path: &str) -> BufReader<tokio::net::TcpStream> {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        BufReader::new(s)
    }

    /// Status line and body lines of a `Connection: close` answer (hyper sends a
    /// streamed body chunked, so the follower test reads its lines itself).
    async fn body_lines(r: &mut BufReader<tokio::net::TcpStream>) -> (String, Vec<String>) {
        let mut status = String::new();
        r.read_line(&mut status).await.unwrap();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await.unwrap();
            if h == "\r\n" || h.is_empty() {
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

    async fn serving_with(limits: Limits) -> (SocketAddr, Arc<Metrics>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        m.node.lock().unwrap().push_str("n1");
        tokio::spawn(serve(listener, m.clone(), limits));
        (addr, m)
    }

    async fn serving() -> (SocketAddr, Arc<Metrics>) {
        serving_with(Limits::default()).await
    }

    #[tokio::test]
    async fn a_request_head_in_several_segments_is_read_whole() {
        let (addr, m) = serving().await;
        m.synced.store(1, Relaxed);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        for part in ["GET ", "/metrics", " HTTP/1.1\r\n", "Host: x\r\n", "Connection: close\r\n", "\r\n"] {
            s.write_all(part.as_bytes()).await.unwrap();
            s.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let (status, lines) = body_lines(&mut BufReader::new(s)).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(lines.iter().any(|l| l == "kubeshift_agent_synced{node=\"n1\"} 1\n"), "{lines:?}");
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_with_the_node_on_every_sample() {
        let (_, m) = serving().await;
        m.syncs.store(3, Relaxed);
        m.last_sync_ns.store(1_500_000, Relaxed);
        *m.endpoints_api.lock().unwrap() = "discovery.k8s.io/v1".into();
        let text = m.render();
        for want in [
            "# TYPE kubeshift_agent_syncs counter\n",
            "kubeshift_agent_syncs_total{node=\"n1\"} 3\n",
            "kubeshift_agent_last_sync_seconds{node=\"n1\"} 0.0015\n",
            "kubeshift_agent_info{node=\"n1\",endpoints_api=\"discovery.k8s.io/v1\"} 1\n",
            "kubeshift_agent_active{node=\"n1\"} 1\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(sample.contains("{node=\"n1\""), "{sample}");
        }
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

    /// Reads a chunked body's next line (chunk sizes are interleaved with the data).
    async fn next_chunk_line(r: &mut BufReader<tokio::net::TcpStream>) -> String {
        loop {
            let mut l = String::new();
            r.read_line(&mut l).await.unwrap();
            let is_size = l.trim_end().chars().all(|c| c.is_ascii_hexdigit()) || l == "\r\n";
            if !is_size {
                return l.trim_end_matches("\r\n").to_string();
            }
        }
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
            let line = next_chunk_line(&mut f).await;
            assert_eq!(serde_json::from_str::<FlowRecord>(&line).unwrap().socket_cookie, Some(want), "{line}");
        }

        let m = metrics.render();
        assert!(m.contains("kubeshift_agent_flows_total{node=\"n1\",verdict=\"FORWARDED\"} 3\n"), "{m}");
        assert!(m.contains("kubeshift_agent_flows_total{node=\"n1\",verdict=\"DROPPED\"} 1\n"), "{m}");
        assert!(m.contains("kubeshift_agent_flows_kept{node=\"n1\"} 4\n"), "{m}");
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_off_and_an_oversized_head_refused() {
        let limits = Limits { head: Duration::from_millis(300), ..Limits::default() };
        let (addr, _) = serving_with(limits).await;

        // Half a head, then nothing: the server closes within the head timeout (the
        // test's own bound is far above it).
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the connection stayed open past the head timeout");
        assert!(!String::from_utf8_lossy(&rest).contains(" 200 "), "{}", String::from_utf8_lossy(&rest));

        // A head larger than the buffer.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let big = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Fill: {}\r\n\r\n", "a".repeat(64 * 1024));
        let _ = s.write_all(big.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

        // A body on a GET.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let (status, _) = body_lines(&mut BufReader::new(s)).await;
        assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    }

    #[tokio::test]
    async fn connections_over_the_limit_wait_for_a_slot() {
        let limits = Limits { connections: 1, ..Limits::default() };
        let (addr, m) = serving_with(limits).await;
        m.flows.push(&rec(1, FlowVerdict::Forwarded));
        // A follower holds the only slot.
        let mut f = get(addr, "/flows?follow=true").await;
        let mut l = String::new();
        f.read_line(&mut l).await.unwrap();
        assert!(l.starts_with("HTTP/1.1 200"), "{l}");
        let mut waiting = tokio::spawn(async move { body_lines(&mut get(addr, "/healthz").await).await });
        // The second is accepted by the kernel but not served while the follower stays
        // (an absence: the bound is how long it is given to show up).
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), &mut waiting).await {
            panic!("served while the only slot was taken: {r:?}");
        }
        drop(f);
        let (status, _) = waiting.await.unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
}
