//! `kubeshift observe`: flows seen by the node agents, like `hubble observe`.
//!
//! [`client`] fetches records from each agent's `/flows`, [`filter`] decides which to
//! show, [`output`] prints them; this file wires the flags to those three.

pub mod client;
pub mod filter;
pub mod output;

use anyhow::Result;
use clap::Args;
use client::Flow;
use filter::{Filter, PodMatch};
use kubeshift_datapath::agent::flows::{FlowProtocol, FlowVerdict};
use std::collections::HashSet;
use std::io::Write;

#[derive(Args, Debug)]
pub struct ObserveArgs {
    /// An agent's metrics address (`kubeshift agent --metrics`). Repeat it for each
    /// node. Without it: every agent pod of the DaemonSet, through the apiserver.
    #[arg(long = "server", value_name = "ADDR")]
    pub servers: Vec<String>,
    /// The agents' metrics port, for agents found through the apiserver.
    #[arg(long, default_value_t = 9963)]
    pub agent_port: u16,
    /// Show the newest N matching flows (default 20; with --follow, first show N).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Keep running and print flows as they happen.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// FORWARDED or DROPPED.
    #[arg(long, value_parser = filter::parse_verdict)]
    pub verdict: Option<FlowVerdict>,
    /// Flows from this pod: NAMESPACE/NAME, the name matched as a prefix.
    #[arg(long, value_name = "NS/NAME", value_parser = filter::parse_pod)]
    pub from_pod: Option<PodMatch>,
    /// Flows to this pod: NAMESPACE/NAME, the name matched as a prefix.
    #[arg(long, value_name = "NS/NAME", value_parser = filter::parse_pod)]
    pub to_pod: Option<PodMatch>,
    /// Flows from pods with this label (repeatable: all must match).
    #[arg(long, value_name = "KEY=VALUE", value_parser = filter::parse_label)]
    pub from_label: Vec<(String, String)>,
    /// Flows to pods with this label (repeatable: all must match).
    #[arg(long, value_name = "KEY=VALUE", value_parser = filter::parse_label)]
    pub to_label: Vec<(String, String)>,
    /// Flows with this port on either side (source, destination or service port).
    #[arg(long)]
    pub port: Option<u16>,
    /// tcp or udp.
    #[arg(long, value_parser = filter::parse_protocol)]
    pub protocol: Option<FlowProtocol>,
    /// Which datapath part saw the flow: sock-lb (a pod's connection to a Service),
    /// policy (NetworkPolicy on a pod's interface), nodeport (traffic from outside).
    /// Repeatable.
    #[arg(long = "type", value_name = "KIND", value_parser = filter::parse_kind)]
    pub kinds: Vec<kubeshift_datapath::agent::flows::FlowKind>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_parser = crate::output_format::formats::<output::Format>(), default_value = "compact")]
    pub output: crate::output_format::OutputFormat,
}

impl ObserveArgs {
    fn filter(&self) -> Filter {
        Filter {
            verdict: self.verdict,
            from_pod: self.from_pod.clone(),
            to_pod: self.to_pod.clone(),
            from_labels: self.from_label.clone(),
            to_labels: self.to_label.clone(),
            port: self.port,
            protocol: self.protocol,
            kinds: self.kinds.clone(),
        }
    }
}

/// Sort key across agents: records carry RFC 3339 times, which sort as instants only
/// once parsed (precision varies).
fn instant(f: &Flow) -> i128 {
    f.record.time.parse::<k8s_openapi::jiff::Timestamp>().map(|t| t.as_nanosecond()).unwrap_or(0)
}

/// The newest `n` matching flows of all `servers`, oldest first.
async fn newest(servers: &[client::Agent], filter: &Filter, n: usize) -> Result<Vec<Flow>> {
    // Unfiltered, each agent's own newest n are enough; filtered, any kept record may be
    // among the newest n that match.
    let ask = filter.is_empty().then_some(n);
    let all = futures::future::join_all(servers.iter().map(|s| client::last(s, ask))).await;
    let mut flows = Vec::new();
    for r in all {
        flows.extend(r?.into_iter().filter(|f| filter.matches(&f.record)));
    }
    flows.sort_by_key(instant);
    let skip = flows.len().saturating_sub(n);
    Ok(flows.split_off(skip))
}

fn print(out: &mut impl Write, format: output::Format, f: &Flow) -> Result<()> {
    writeln!(out, "{}", output::line(format, &f.record, &f.raw))?;
    out.flush()?;
    Ok(())
}

pub async fn run(args: ObserveArgs, cluster: &crate::kubeconfig::ClusterArgs) -> Result<()> {
    let format: output::Format = crate::output_format::narrow(args.output, "observe")?;
    let filter = args.filter();
    let agents: Vec<client::Agent> = if args.servers.is_empty() {
        client::discover(&cluster.client().await?, args.agent_port).await?
    } else {
        args.servers.iter().cloned().map(client::Agent::Addr).collect()
    };
    let mut out = std::io::stdout().lock();
    if !args.follow {
        for f in newest(&agents, &filter, args.last.unwrap_or(20)).await? {
            print(&mut out, format, &f)?;
        }
        return Ok(());
    }

    // Subscribe first, then read the history: a flow made in between is in both, and
    // shown once; none falls in a gap.
    let mut streams = Vec::new();
    for a in &agents {
        streams.push(client::follow(a).await?);
    }
    let names: Vec<String> = agents.iter().map(|a| a.to_string()).collect();
    eprintln!("observe: following {} (Ctrl-C to stop)", names.join(", "));
    let mut shown: HashSet<String> = HashSet::new();
    if let Some(n) = args.last {
        for f in newest(&agents, &filter, n).await? {
            print(&mut out, format, &f)?;
            shown.insert(f.raw);
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Flow>>(1024);
    for (mut body, agent) in streams.into_iter().zip(names) {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let item = match body.next().await {
                    Ok(Some(f)) => Ok(f),
                    Ok(None) => Err(anyhow::anyhow!("{agent}: the flow stream ended (agent stopped?)")),
                    Err(e) => Err(e),
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
    }
    drop(tx);
    while let Some(item) = rx.recv().await {
        let f = item?;
        if shown.remove(&f.raw) || !filter.matches(&f.record) {
            continue;
        }
        print(&mut out, format, &f)?;
    }
    Ok(())
}
