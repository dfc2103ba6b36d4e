//! The probe agent: runs inside every test pod (`kubeshift connectivity agent`), picks
//! up its assignment from the suite's ConfigMap, runs the probes from inside the pod's
//! own network, and writes the results back through the API. No `kubectl exec`, so it
//! works where exec is forbidden and on the lab, which has none.
//!
//! It reaches the apiserver at the address the suite passes (the `kubernetes`
//! endpoint, not its ClusterIP): the datapath under test must not be the agent's only
//! way to report that the datapath is broken.

use crate::model::{Assignment, Probe, ProbeResult, Proto, Report};
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
}

async fn client(a: &AgentArgs) -> Result<Client> {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    tokenFile: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
        a.server,
        a.sa_dir.join("ca.crt").display(),
        a.sa_dir.join("token").display()
    );
    let kc = Kubeconfig::from_yaml(&yaml)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

pub async fn run(a: AgentArgs) -> Result<()> {
    let client = client(&a).await.context("building the API client")?;
    let cms: Api<ConfigMap> = Api::namespaced(client, &a.namespace);
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
            match cms.patch(&result_configmap(&a.pod), &PatchParams::apply("kubeshift-agent").force(), &Patch::Apply(&cm)).await {
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
        Some((head, body)) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => Ok(body.trim().to_string()),
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
