//! Talks to agents: `GET /flows`, NDJSON back, either on an agent's metrics address
//! (reqwest) or through the apiserver's proxy to an agent pod (kube's client), for a
//! user with no route to the nodes. Errors name the agent.

use anyhow::{bail, Context, Result};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::Client;
use kubeshift_datapath::agent::flows::FlowRecord;
use std::pin::Pin;
use std::time::Duration;

/// Where an agent is reached.
#[derive(Clone)]
pub enum Agent {
    /// Its metrics address (`kubeshift agent --metrics`).
    Addr(String),
    /// Its pod in kube-system, through `pods/<name>:<port>/proxy`.
    Pod { client: Client, name: String, port: u16 },
}

impl std::fmt::Display for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Agent::Addr(a) => write!(f, "agent at {a}"),
            Agent::Pod { name, .. } => write!(f, "agent pod {AGENT_NAMESPACE}/{name}"),
        }
    }
}

pub const AGENT_NAMESPACE: &str = "kube-system";
const AGENT_SELECTOR: &str = "k8s-app=kubeshift-agent";

/// Every running agent pod (`kubeshift install manifests`), reached through the API.
pub async fn discover(client: &Client, port: u16) -> Result<Vec<Agent>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
        .with_context(|| format!("listing the agent pods ({AGENT_SELECTOR} in {AGENT_NAMESPACE})"))?;
    let agents: Vec<Agent> = list
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| p.metadata.name)
        .map(|name| Agent::Pod { client: client.clone(), name, port })
        .collect();
    if agents.is_empty() {
        bail!(
            "no running agent pod ({AGENT_SELECTOR} in {AGENT_NAMESPACE}): install the agent \
             (`kubeshift install manifests`) or name agents with --server"
        );
    }
    Ok(agents)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One record as an agent sent it.
#[derive(Debug, Clone)]
pub struct Flow {
    pub record: FlowRecord,
    /// The JSON line as received.
    pub raw: String,
}

type LineStream = Pin<Box<dyn Stream<Item = std::io::Result<String>> + Send>>;

/// The body of a `GET` whose header was read and was `200`.
pub struct Body {
    agent: String,
    lines: LineStream,
    n: usize,
}

async fn get(agent: &Agent, path: &str) -> Result<Body> {
    let lines = match agent {
        Agent::Addr(server) => get_direct(server, path).await?,
        Agent::Pod { client, name, port } => {
            let uri = format!("/api/v1/namespaces/{AGENT_NAMESPACE}/pods/{name}:{port}/proxy{path}");
            let req = http::Request::get(uri).body(Vec::new()).expect("a GET request builds");
            let rd = client
                .request_stream(req)
                .await
                .with_context(|| format!("{agent}: GET {path} through the apiserver's pod proxy"))?;
            Box::pin(futures::io::AsyncBufReadExt::lines(rd)) as LineStream
        }
    };
    Ok(Body { agent: agent.to_string(), lines, n: 0 })
}

/// `--server` takes `HOST:PORT` (what `kubeshift agent --metrics` binds) or a URL.
fn url(server: &str, path: &str) -> String {
    if server.starts_with("http://") || server.starts_with("https://") {
        format!("{}{path}", server.trim_end_matches('/'))
    } else {
        format!("http://{server}{path}")
    }
}

async fn get_direct(server: &str, path: &str) -> Result<LineStream> {
    let what = || format!("agent at {server}");
    // No overall timeout: a follower's body is meant to stay open.
    let http = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).build().context("an HTTP client")?;
    let resp = http.get(url(server, path)).header("Accept", "application/x-ndjson").send().await.map_err(|e| {
        let why = if e.is_connect() {
            format!("cannot connect (is `kubeshift agent --metrics {server}` running there?)")
        } else if e.is_timeout() {
            format!("no answer within {CONNECT_TIMEOUT:?}")
        } else {
            format!("GET {path}")
        };
        anyhow::Error::new(e).context(format!("{}: {why}", what()))
    })?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let hint = if status == reqwest::StatusCode::NOT_FOUND { " (an agent without the flow stream?)" } else { "" };
        bail!("{}: GET {path}: {status} {}{hint}", what(), body.trim());
    }
    let body = resp.bytes_stream().map(|r| r.map_err(std::io::Error::other));
    Ok(Box::pin(futures::io::AsyncBufReadExt::lines(futures::TryStreamExt::into_async_read(body))) as LineStream)
}

impl Body {
    /// The next record; None at the end of the body.
    pub async fn next(&mut self) -> Result<Option<Flow>> {
        let Some(raw) =
            self.lines.next().await.transpose().with_context(|| format!("{}: reading /flows", self.agent))?
        else {
            return Ok(None);
        };
        self.n += 1;
        let record = serde_json::from_str(&raw)
            .with_context(|| format!("{}: /flows line {}: not a flow record: {raw}", self.agent, self.n))?;
        Ok(Some(Flow { record, raw }))
    }
}

/// The newest `n` records the agent keeps (all of them with None), oldest first.
pub async fn last(agent: &Agent, n: Option<usize>) -> Result<Vec<Flow>> {
    let path = match n {
        Some(n) => format!("/flows?last={n}"),
        None => "/flows".to_string(),
    };
    let mut body = get(agent, &path).await?;
    let mut out = Vec::new();
    while let Some(f) = body.next().await? {
        out.push(f);
    }
    Ok(out)
}

/// A stream of records made from now on. When this returns, the agent has subscribed
/// this reader: nothing made afterwards is missed.
pub async fn follow(agent: &Agent) -> Result<Body> {
    get(agent, "/flows?follow=true").await
}
