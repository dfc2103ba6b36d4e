//! Talks to agents: `GET /flows` on their metrics address, NDJSON back. One plain HTTP/1.1
//! request per call over a TCP connection; errors name the agent's address.

use anyhow::{bail, Context, Result};
use kubeshift_datapath::agent::flows::FlowRecord;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One record as an agent sent it.
#[derive(Debug, Clone)]
pub struct Flow {
    pub record: FlowRecord,
    /// The JSON line as received.
    pub raw: String,
}

/// The body of a `GET` whose header was read and was `200`.
pub struct Body {
    server: String,
    lines: Lines<BufReader<TcpStream>>,
    n: usize,
}

async fn get(server: &str, path: &str) -> Result<Body> {
    let what = || format!("agent at {server}");
    let mut sock = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| anyhow::anyhow!("{}: no answer within {CONNECT_TIMEOUT:?}", what()))?
        .with_context(|| {
            format!("{}: cannot connect (is `kubeshift agent --metrics {server}` running there?)", what())
        })?;
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nAccept: application/x-ndjson\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .with_context(what)?;
    let mut rd = BufReader::new(sock);
    let mut status = String::new();
    rd.read_line(&mut status).await.with_context(what)?;
    loop {
        let mut h = String::new();
        if rd.read_line(&mut h).await.with_context(what)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        let mut body = String::new();
        let _ = rd.read_to_string(&mut body).await;
        let hint = if code == "404" { " (an agent without the flow stream?)" } else { "" };
        bail!("{}: GET {path}: {} {}{hint}", what(), status.trim(), body.trim());
    }
    Ok(Body { server: server.to_string(), lines: rd.lines(), n: 0 })
}

impl Body {
    /// The next record; None at the end of the body.
    pub async fn next(&mut self) -> Result<Option<Flow>> {
        let Some(raw) =
            self.lines.next_line().await.with_context(|| format!("agent at {}: reading /flows", self.server))?
        else {
            return Ok(None);
        };
        self.n += 1;
        let record = serde_json::from_str(&raw)
            .with_context(|| format!("agent at {}: /flows line {}: not a flow record: {raw}", self.server, self.n))?;
        Ok(Some(Flow { record, raw }))
    }
}

/// The newest `n` records the agent keeps (all of them with None), oldest first.
pub async fn last(server: &str, n: Option<usize>) -> Result<Vec<Flow>> {
    let path = match n {
        Some(n) => format!("/flows?last={n}"),
        None => "/flows".to_string(),
    };
    let mut body = get(server, &path).await?;
    let mut out = Vec::new();
    while let Some(f) = body.next().await? {
        out.push(f);
    }
    Ok(out)
}

/// A stream of records made from now on. When this returns, the agent has subscribed
/// this reader: nothing made afterwards is missed.
pub async fn follow(server: &str) -> Result<Body> {
    get(server, "/flows?follow=true").await
}
