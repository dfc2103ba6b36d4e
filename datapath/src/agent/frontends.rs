//! The NodePort half of `kubeshift agent`: keeps the tc NodePort datapath on the node's
//! external interface serving every NodePort, externalIP and load-balancer IP frontend
//! the API asks this node to serve (what kube-proxy's KUBE-NODEPORTS and
//! KUBE-EXT-* rules do).
//!
//! It follows Services and EndpointSlices through the watches it shares with the service
//! half (v1, or v1beta1 read as v1 on older servers; the node names in the slices say
//! which backends are local, which core/v1 Endpoints would too but no supported server
//! lacks slices), and reads the node's own Node object for its InternalIP. The wanted
//! frontends are computed by the pure `agent::nodeport` and diffed against what the
//! pinned maps hold, so a restarted agent writes nothing when nothing changed and
//! removes frontends deleted meanwhile.

use super::flows::FlowMsg;
use super::nodeport::{
    desired_all, diff_frontends, node_info, np_endpoints, np_service, NpEndpointSet, NpServiceSpec, NpWanted,
};
use super::{desired::ObjKey, Change, EndpointsApi, Metrics};
use crate::nodeport::NodePortDatapath;
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::Client;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct NodePortConfig {
    pub node: String,
    /// bpffs directory; the NodePort datapath pins under `<pin_dir>/nodeport`.
    pub pin_dir: PathBuf,
    /// The node's network namespace (None: the agent's own).
    pub netns: Option<PathBuf>,
    /// The interface external traffic arrives on (e.g. `eth0`); None: the one that
    /// carries the node's InternalIP.
    pub device: Option<String>,
}

pub(super) enum NpMsg {
    Service(Change<Option<NpServiceSpec>>),
    Slice(Change<Option<(ObjKey, NpEndpointSet)>>),
}

impl NpMsg {
    fn is_relist(&self) -> bool {
        match self {
            NpMsg::Service(c) => c.is_relist(),
            NpMsg::Slice(c) => c.is_relist(),
        }
    }
}

/// The Service a slice belongs to, with the slice reduced to what NodePort needs.
pub(super) fn slice(s: &EndpointSlice) -> Option<(ObjKey, NpEndpointSet)> {
    let svc = s.metadata.labels.as_ref()?.get("kubernetes.io/service-name")?;
    Some((ObjKey::new(s.metadata.namespace.as_deref().unwrap_or("default"), svc), np_endpoints(s)?))
}

pub(super) fn service(s: &Service) -> Option<NpServiceSpec> {
    let (spec, warnings) = np_service(s);
    for w in warnings {
        tracing::warn!("{w}");
    }
    spec
}

#[derive(Default)]
struct State {
    /// Only Services with a NodePort or external frontend (ClusterIP-only ones are most).
    services: HashMap<ObjKey, NpServiceSpec>,
    /// Every slice: a Service may turn into a NodePort one without its slices changing.
    slices: HashMap<ObjKey, (ObjKey, NpEndpointSet)>,
    listed: [bool; 2],
}

impl State {
    fn apply(&mut self, m: NpMsg) {
        match m {
            NpMsg::Service(c) => c.apply_some_to(&mut self.services, &mut self.listed[0]),
            NpMsg::Slice(c) => c.apply_some_to(&mut self.slices, &mut self.listed[1]),
        }
    }

    fn wanted(&self, node: &super::nodeport::NodeInfo) -> NpWanted {
        let mut by_service: HashMap<&ObjKey, Vec<&NpEndpointSet>> = HashMap::new();
        for (svc, set) in self.slices.values() {
            by_service.entry(svc).or_default().push(set);
        }
        let services: Vec<(NpServiceSpec, Vec<&NpEndpointSet>)> =
            self.services.iter().map(|(k, s)| (s.clone(), by_service.get(k).cloned().unwrap_or_default())).collect();
        let (wanted, conflicts) = desired_all(node, &services);
        for c in conflicts {
            tracing::warn!("{c}");
        }
        wanted
    }
}

pub(super) async fn run(
    client: Client,
    cfg: NodePortConfig,
    ep_api: EndpointsApi,
    metrics: Arc<Metrics>,
    flow_tx: mpsc::UnboundedSender<FlowMsg>,
    rx: mpsc::UnboundedReceiver<NpMsg>,
) -> Result<()> {
    let node_obj =
        Api::<Node>::all(client.clone()).get(&cfg.node).await.with_context(|| format!("reading Node {}", cfg.node))?;
    let node = node_info(&node_obj).map_err(anyhow::Error::msg)?;
    let device = match &cfg.device {
        Some(d) => d.clone(),
        None => super::podnet::interface_with_address(cfg.netns.as_deref(), node.ip)?,
    };
    let mut dp = NodePortDatapath::load(&cfg.pin_dir)
        .with_context(|| format!("loading the NodePort datapath (pins {})", cfg.pin_dir.display()))?;
    match &cfg.netns {
        Some(ns) => dp.attach_in_netns(ns, &device, node.ip),
        None => dp.attach(&device, node.ip),
    }
    .with_context(|| format!("attaching the NodePort programs to {device} (node IP {})", node.ip))?;
    tracing::info!(%device, node_ip = %node.ip, reopened = dp.reopened(), frontends = dp.frontends().len(), "NodePort datapath attached");
    if let Err(e) = dp.set_flow_events(true) {
        tracing::warn!("turning NodePort flow events on: {e}");
    }
    let flow_fd = super::register_ring(dp.flows_fd(), "NodePort");

    if ep_api == EndpointsApi::CoreEndpoints {
        anyhow::bail!("NodePort frontends need EndpointSlices (node names of endpoints); this API server serves none");
    }
    let half = NodePorts { dp, state: State::default(), node, metrics: metrics.clone(), flow_fd, flow_tx };
    super::driver::drive(half, rx, &metrics, std::future::pending()).await
}

/// The NodePort half as the [`super::driver`] runs it.
struct NodePorts {
    dp: NodePortDatapath,
    state: State,
    node: super::nodeport::NodeInfo,
    metrics: Arc<Metrics>,
    flow_fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    flow_tx: mpsc::UnboundedSender<FlowMsg>,
}

impl super::driver::Half for NodePorts {
    type Msg = NpMsg;

    fn name(&self) -> &'static str {
        "NodePort frontends"
    }

    fn apply(&mut self, m: NpMsg) -> bool {
        let relist = m.is_relist();
        self.state.apply(m);
        relist
    }

    fn listed(&self) -> bool {
        self.state.listed.iter().all(|l| *l)
    }

    /// Diffed against what the maps hold, so a failed write is retried as it stands.
    fn write(&mut self) -> u64 {
        let dp = &mut self.dp;
        let current: NpWanted = dp.frontends().into_iter().map(|(f, b, p)| (f, (b, p))).collect();
        let plan = diff_frontends(&current, &self.state.wanted(&self.node));
        let mut failed = 0;
        for fe in &plan.removes {
            if let Err(e) = dp.remove_frontend(fe) {
                tracing::warn!("removing frontend {fe:?}: {e}");
                failed += 1;
            }
        }
        for (fe, backends, policy) in &plan.upserts {
            if let Err(e) = dp.upsert_frontend(*fe, backends.clone(), *policy) {
                tracing::warn!("programming frontend {fe:?}: {e}");
                failed += 1;
            }
        }
        self.metrics.map_writes.fetch_add((plan.removes.len() + plan.upserts.len()) as u64, Relaxed);
        self.metrics.nodeport_frontends.store(dp.frontends().len() as u64, Relaxed);
        failed
    }

    async fn side(&mut self) -> super::driver::Woke {
        let events = super::ring_events(&mut self.flow_fd, || self.dp.read_flows(), &self.metrics, "NodePort").await;
        if !events.is_empty() {
            let _ = self.flow_tx.send(FlowMsg::NodePort(events));
        }
        super::driver::Woke::Handled
    }

    fn synced<'m>(&self, m: &'m Metrics) -> &'m std::sync::atomic::AtomicU64 {
        &m.nodeport_synced
    }
}
