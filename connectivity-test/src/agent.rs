//! The probe agent: runs inside every test pod (`kubeshift connectivity agent`), picks
//! up its assignment from the suite's ConfigMap, runs the probes from inside the pod's
//! own network, and writes the results back through the API. No `kubectl exec`, so it
//! works where exec is forbidden and on the lab, which has none.
//!
//! It reaches the apiserver at the address the suite passes (the `kubernetes`
//! endpoint, not its ClusterIP): the datapath under test must not be the agent's only
//! way to report that the datapath is broken.

use crate::model::{Assignment, Probe, ProbeResult, Proto, Report, StreamSet, StreamSpec, StreamStatus};
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const PROBES_CONFIGMAP: &str = "kubeshift-connectivity-probes";

pub fn result_configmap(pod: &str) -> String {
    format!("result-{pod}")
}

pub struct AgentArgs {
    pub namespace: String,
    pub pod: String,
    /// Directory holding the service-account `token` and `ca.crt`.
    pub sa_dir: PathBuf,
    pub server: String,
    /// Port of the line-echo server the long-lived connections end at.
    pub stream_port: u16,
}

async fn client(a: &AgentArgs) -> Result<Client> {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    tokenFile: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
        a.server,
        a.sa_dir.join("ca.crt").display(),
        a.sa_dir.join("token").display()
    );
    let kc = Kubeconfig::from_yaml(&yaml)?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    // A hung request must not freeze the probe or stream loops.
    cfg.connect_timeout = Some(Duration::from_secs(5));
    cfg.read_timeout = Some(Duration::from_secs(10));
    cfg.write_timeout = Some(Duration::from_secs(10));
    Ok(Client::try_from(cfg)?)
}

pub async fn run(a: AgentArgs) -> Result<()> {
    let client = client(&a).await.context("building the API client")?;
    let cms: Api<ConfigMap> = Api::namespaced(client, &a.namespace);
    let port = a.stream_port;
    tokio::spawn(async move {
        if let Err(e) = serve_stream_echo(port).await {
            tracing::error!("{e:#}");
        }
    });
    tokio::spawn(run_streams(cms.clone(), a.namespace.clone(), a.pod.clone()));
    let mut done = 0u64;
    loop {
        let assignment: Option<Assignment> = match cms.get_opt(PROBES_CONFIGMAP).await {
            Ok(Some(cm)) => cm.data.and_then(|d| d.get(&a.pod).cloned()).and_then(|s| serde_json::from_str(&s).ok()),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("reading {PROBES_CONFIGMAP}: {e}");
                None
            }
        };
        if let Some(asg) = assignment.filter(|x| x.round > done) {
            let results = futures::future::join_all(asg.probes.iter().map(run_probe)).await;
            let report = Report { round: asg.round, results };
            let cm = json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": result_configmap(&a.pod), "namespace": a.namespace},
                "data": {"report": serde_json::to_string(&report)?},
            });
            match cms
                .patch(&result_configmap(&a.pod), &PatchParams::apply("kubeshift-agent").force(), &Patch::Apply(&cm))
                .await
            {
                Ok(_) => done = asg.round,
                Err(e) => tracing::warn!("writing results: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run_probe(p: &Probe) -> ProbeResult {
    let start = Instant::now();
    let timeout = Duration::from_millis(p.timeout_ms);
    let r = match p.proto {
        Proto::Tcp => tokio::time::timeout(timeout, http_hostname(&p.addr, p.port)).await,
        Proto::Udp => tokio::time::timeout(timeout, udp_hostname(&p.addr, p.port)).await,
    };
    let (ok, detail) = match r {
        Ok(Ok(host)) => (true, host),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, format!("timeout after {timeout:?}")),
    };
    ProbeResult { id: p.id.clone(), ok, detail, micros: start.elapsed().as_micros() as u64 }
}

async fn http_hostname(addr: &str, port: u16) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect((addr, port)).await?;
    s.write_all(b"GET /hostname HTTP/1.0\r\nHost: probe\r\n\r\n").await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => {
            Ok(body.trim().to_string())
        }
        _ => Err(std::io::Error::other(format!("unexpected answer: {}", text.lines().next().unwrap_or("")))),
    }
}

async fn udp_hostname(addr: &str, port: u16) -> std::io::Result<String> {
    let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    s.connect((addr, port)).await?;
    let mut buf = [0u8; 512];
    // UDP may lose the first datagram while ARP resolves: resend until answered.
    loop {
        s.send(b"hostname").await?;
        match tokio::time::timeout(Duration::from_millis(300), s.recv(&mut buf)).await {
            Ok(Ok(n)) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            Ok(Err(e)) => return Err(e),
            Err(_) => continue,
        }
    }
}

pub fn streams_key(pod: &str) -> String {
    format!("{pod}.streams")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Echoes every line back: the far end of the long-lived connections.
pub async fn serve_stream_echo(port: u16) -> Result<()> {
    let l =
        tokio::net::TcpListener::bind(("0.0.0.0", port)).await.with_context(|| format!("stream echo port {port}"))?;
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// One long-lived connection: a numbered line every 100 ms, each echoed back in order.
/// Any reset, timeout or wrong echo marks it broken for good: the check is whether the
/// *same* connection survived, not whether a new one would work.
async fn run_stream(spec: StreamSpec, generation: u64, status: std::sync::Arc<std::sync::Mutex<StreamStatus>>) {
    use tokio::io::AsyncBufReadExt;
    let set = |f: &dyn Fn(&mut StreamStatus)| {
        if let Ok(mut s) = status.lock() {
            f(&mut s)
        }
    };
    // Until it is established, a connection may be retried: a datapath programs a new
    // Service port a moment after the API has it. After that, any failure is final.
    let give_up = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let conn = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect((spec.addr.as_str(), spec.port)),
        )
        .await;
        let err = match conn {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => format!("connect: {e}"),
            Err(_) => "connect: timeout".to_string(),
        };
        if Instant::now() > give_up {
            return set(&|st| st.broken = Some(err.clone()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = s.set_nodelay(true);
    set(&|st| {
        st.established = true;
        st.generation = generation;
    });
    let (r, mut w) = s.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    let mut n: u64 = 0;
    loop {
        n += 1;
        if let Err(e) = w.write_all(format!("{n}\n").as_bytes()).await {
            return set(&|st| st.broken = Some(format!("write: {e}")));
        }
        set(&|st| st.sent = n);
        match tokio::time::timeout(Duration::from_secs(3), lines.next_line()).await {
            Ok(Ok(Some(l))) if l == n.to_string() => set(&|st| {
                st.received = n;
                st.last_ok_ms = now_ms();
            }),
            Ok(Ok(Some(l))) => return set(&|st| st.broken = Some(format!("echo {l:?}, expected {n}"))),
            Ok(Ok(None)) => return set(&|st| st.broken = Some("closed by peer".into())),
            Ok(Err(e)) => return set(&|st| st.broken = Some(format!("read: {e}"))),
            Err(_) => return set(&|st| st.broken = Some("no echo for 3s".into())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps this agent's long-lived connections as the suite asks and reports on them
/// every second under the result ConfigMap's `streams` key.
pub async fn run_streams(cms: Api<ConfigMap>, namespace: String, pod: String) {
    let mut generation = 0u64;
    let mut running: Vec<(std::sync::Arc<std::sync::Mutex<StreamStatus>>, tokio::task::JoinHandle<()>)> = vec![];
    loop {
        let wanted: Option<StreamSet> = cms
            .get_opt(PROBES_CONFIGMAP)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.data)
            .and_then(|d| d.get(&streams_key(&pod)).cloned())
            .and_then(|s| serde_json::from_str(&s).ok());
        if let Some(set) = wanted.filter(|s| s.generation != generation) {
            for (_, h) in running.drain(..) {
                h.abort();
            }
            generation = set.generation;
            for spec in set.streams {
                let st = std::sync::Arc::new(std::sync::Mutex::new(StreamStatus {
                    id: spec.id.clone(),
                    generation,
                    ..Default::default()
                }));
                running.push((st.clone(), tokio::spawn(run_stream(spec, generation, st))));
            }
        }
        if generation != 0 {
            let statuses: Vec<StreamStatus> =
                running.iter().filter_map(|(s, _)| s.lock().ok().map(|s| s.clone())).collect();
            let cm = json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": result_configmap(&pod), "namespace": namespace},
                "data": {"streams": serde_json::to_string(&statuses).unwrap_or_default()},
            });
            if let Err(e) = cms
                .patch(
                    &result_configmap(&pod),
                    &PatchParams::apply("kubeshift-agent-streams").force(),
                    &Patch::Apply(&cm),
                )
                .await
            {
                tracing::warn!("writing stream status: {e}");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
