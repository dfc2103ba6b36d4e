//! The overlay kept by the agent: claim the node's range, create the device, then keep
//! routes, neighbours and FDB entries equal to [`super::wanted`] as Nodes come, go or
//! change address.
//!
//! Nodes are watched (a reflector); the IPAM ConfigMap is re-read on every pass and at
//! least every [`RESYNC`], because a new node claims its range only after its Node
//! appears. A get of one named object rather than a watch: RBAC can scope `get` to the
//! ConfigMap's name on every apiserver version, a watch only with a field selector
//! newer apiservers honour. The periodic pass also repairs entries removed by hand.

use super::{ipam, kernel, Cidr, OverlayConfig, PeerNode};
use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::Api;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const RESYNC: Duration = Duration::from_secs(5);

/// Why the overlay is not fully programmed yet (empty: ready), shared with `/readyz`.
pub type Readiness = Arc<Mutex<Vec<String>>>;

pub fn internal_ip(n: &Node) -> Option<Ipv4Addr> {
    n.status.as_ref()?.addresses.as_ref()?.iter().find(|a| a.type_ == "InternalIP").and_then(|a| a.address.parse().ok())
}

fn set_status(r: &Readiness, why: Vec<String>) {
    let mut g = r.lock().unwrap();
    if *g != why {
        if why.is_empty() {
            tracing::info!("overlay ready: every other node with a range is programmed");
        } else {
            tracing::info!(reasons = ?why, "overlay not ready");
        }
        *g = why;
    }
}

/// Runs forever (errors of one pass are reported in `ready` and retried).
pub async fn run(client: Client, cfg: OverlayConfig, ready: Readiness) -> Result<()> {
    cfg.check()?;
    set_status(&ready, vec![format!("overlay: node {} has no range claimed yet", cfg.node)]);
    let nodes: Api<Node> = Api::all(client.clone());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ipam::IPAM_NAMESPACE);
    let (reader, writer) = reflector::store();
    let notify = Arc::new(tokio::sync::Notify::new());
    {
        let notify = notify.clone();
        let stream =
            reflector(writer, watcher(nodes.clone(), watcher::Config::default())).default_backoff().touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!("watching Nodes: {e}");
                }
                notify.notify_one();
            }
        });
    }
    reader.wait_until_ready().await.context("the Node watch ended before its first list")?;
    let h = kernel::connect()?;
    // (node IP, range, ifindex) the device was last set up for.
    let mut device: Option<(Ipv4Addr, Cidr, u32)> = None;
    loop {
        match pass(&client, &cfg, &reader, &cms, &h, &mut device).await {
            Ok(why) => set_status(&ready, why),
            Err(e) => {
                tracing::warn!("overlay: {e:#}");
                set_status(&ready, vec![format!("overlay: {e:#}")]);
            }
        }
        let _ = tokio::time::timeout(RESYNC, notify.notified()).await;
    }
}

async fn pass(
    client: &Client,
    cfg: &OverlayConfig,
    reader: &reflector::Store<Node>,
    cms: &Api<ConfigMap>,
    h: &rtnetlink::Handle,
    device: &mut Option<(Ipv4Addr, Cidr, u32)>,
) -> Result<Vec<String>> {
    let peers: Vec<PeerNode> = reader
        .state()
        .iter()
        .map(|n| PeerNode { name: n.metadata.name.clone().unwrap_or_default(), ip: internal_ip(n) })
        .collect();
    let me =
        peers.iter().find(|p| p.name == cfg.node).with_context(|| format!("node {} is not in the API", cfg.node))?;
    let my_ip = me.ip.with_context(|| format!("node {} has no InternalIP", cfg.node))?;
    let cm = cms
        .get_opt(ipam::IPAM_CONFIGMAP)
        .await
        .with_context(|| format!("reading ConfigMap {}/{}", ipam::IPAM_NAMESPACE, ipam::IPAM_CONFIGMAP))?;
    let mut ranges = ipam::parse_ranges(&cm.and_then(|c| c.data).unwrap_or_default())?;
    // First pass, or our entry vanished (the ConfigMap was deleted or edited): claim.
    // A claim finds the node's recorded range again, so restarts keep it.
    let mine = match ranges.get(&cfg.node) {
        Some(r) if cfg.pod_cidr.contains_cidr(r) && r.len == cfg.node_prefix => *r,
        _ => {
            let r = ipam::claim(client, &cfg.node, cfg.pod_cidr, cfg.node_prefix).await?;
            ranges.insert(cfg.node.clone(), r);
            r
        }
    };
    let idx = match *device {
        Some((ip, r, idx)) if ip == my_ip && r == mine => idx,
        _ => {
            let (under, under_name, under_mtu) = kernel::underlay(h, my_ip).await?;
            let mtu = cfg.mtu(under_mtu);
            let idx = kernel::ensure_device(h, cfg, my_ip, under, mtu, super::vtep_mac(my_ip), mine).await?;
            tracing::info!(
                device = %cfg.device, vni = cfg.vni, port = cfg.port, local = %my_ip, underlay = %under_name,
                mtu, range = %mine, "overlay device ready"
            );
            *device = Some((my_ip, mine, idx));
            idx
        }
    };
    let want = super::wanted(&cfg.node, &peers, &ranges);
    let have = kernel::read(h, idx).await?;
    let changes = super::diff(&want, &have);
    if !changes.delete.is_empty() {
        tracing::info!(routes = ?changes.delete.routes, "overlay: removing entries of nodes gone or changed");
        kernel::delete(h, idx, &changes.delete).await?;
    }
    if !changes.set.is_empty() {
        tracing::info!(routes = ?changes.set.routes, "overlay: programming entries");
        kernel::set(h, idx, &changes.set).await?;
    }
    Ok(super::missing(&cfg.node, &peers, &ranges))
}
