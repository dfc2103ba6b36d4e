//! Prometheus text exposition on a plain TCP listener: a handful of gauges and
//! counters do not justify an HTTP framework.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
}

impl Metrics {
    pub fn render(&self) -> String {
        let node = self.node.lock().unwrap().clone();
        let api = self.endpoints_api.lock().unwrap().clone();
        let l = format!("node=\"{node}\"");
        let mut s = String::new();
        let mut m = |name: &str, kind: &str, help: &str, labels: &str, v: String| {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}\n"));
        };
        m("kubeshift_agent_info", "gauge", "Agent node and the endpoints API it watches.", &format!("{l},endpoints_api=\"{api}\""), "1".into());
        m("kubeshift_agent_synced", "gauge", "1 once the maps were reconciled with a full list of the API.", &l, self.synced.load(Relaxed).to_string());
        m("kubeshift_agent_service_ports", "gauge", "Service ports (VIP, port, protocol) in the maps.", &l, self.service_ports.load(Relaxed).to_string());
        m("kubeshift_agent_backends", "gauge", "Backends in the maps, summed over service ports.", &l, self.backends.load(Relaxed).to_string());
        m("kubeshift_agent_syncs_total", "counter", "Sync passes (one per burst of API events).", &l, self.syncs.load(Relaxed).to_string());
        m("kubeshift_agent_map_writes_total", "counter", "Service-port upserts and removals written.", &l, self.map_writes.load(Relaxed).to_string());
        m("kubeshift_agent_sync_errors_total", "counter", "Failed map writes (retried).", &l, self.sync_errors.load(Relaxed).to_string());
        m("kubeshift_agent_watch_errors_total", "counter", "Watch errors (retried with backoff).", &l, self.watch_errors.load(Relaxed).to_string());
        m(
            "kubeshift_agent_last_sync_seconds",
            "gauge",
            "From receiving an API event to its map writes done, last sync pass.",
            &l,
            format!("{:.6}", self.last_sync_ns.load(Relaxed) as f64 / 1e9),
        );
        s
    }
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                _ => ("404 Not Found", String::new()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
