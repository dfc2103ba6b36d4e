//! What the agent says about itself: the counters its halves keep, why it is not ready
//! yet (`/readyz`), and their OpenMetrics encoding (`/metrics`, through the
//! `prometheus-client` crate). [`super::http`] serves them.

use super::flows::FlowStore;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

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
    /// Address allocations of vanished sandboxes freed by the agent (see `agent::leaks`).
    pub ipam_leaks_freed: AtomicU64,
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

    /// The OpenMetrics text of `/metrics`: every sample carries the node's name.
    pub fn render(self: &Arc<Self>) -> String {
        let node = self.node.lock().unwrap().clone();
        let mut registry = Registry::with_labels(std::iter::once((Cow::Borrowed("node"), Cow::Owned(node))));
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The agent's counters as they are at one scrape. The halves keep plain atomics (they
/// are written on hot paths and read by `/readyz` too); this reads them when asked.
struct Scrape(Arc<Metrics>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

fn gauge<N: EncodeGaugeValue + std::fmt::Debug>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// `name` without `_total`: OpenMetrics adds it to every counter sample.
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.0;
        let n = |a: &AtomicU64| a.load(Relaxed);
        let api = m.endpoints_api.lock().unwrap().clone();
        Info::new(vec![("endpoints_api", api)]).encode(e.encode_descriptor(
            "kubeshift_agent",
            "Agent node and the endpoints API it watches.",
            None,
            MetricType::Info,
        )?)?;
        gauge(
            &mut e,
            "kubeshift_agent_ready",
            "1 when GET /readyz answers 200: every enabled half is synced and every local pod has the policy programs.",
            i64::from(m.not_ready().is_empty()),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_active",
            "1 when the node is active (kubeshift's CNI conf first, the datapath attached); 0 in standby.",
            i64::from(!m.standby.load(Relaxed)),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_synced",
            "1 once the maps were reconciled with a full list of the API.",
            n(&m.synced),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_service_ports",
            "Service ports (VIP, port, protocol) in the maps.",
            n(&m.service_ports),
        )?;
        gauge(&mut e, "kubeshift_agent_backends", "Backends in the maps, summed over service ports.", n(&m.backends))?;
        counter(&mut e, "kubeshift_agent_syncs", "Sync passes (one per burst of API events).", n(&m.syncs))?;
        counter(&mut e, "kubeshift_agent_map_writes", "Service-port upserts and removals written.", n(&m.map_writes))?;
        counter(&mut e, "kubeshift_agent_sync_errors", "Failed map writes (retried).", n(&m.sync_errors))?;
        counter(&mut e, "kubeshift_agent_watch_errors", "Watch errors (retried with backoff).", n(&m.watch_errors))?;
        counter(
            &mut e,
            "kubeshift_agent_ipam_leaks_freed",
            "Address allocations freed because no veth on the node and no pod in the API held them.",
            n(&m.ipam_leaks_freed),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_last_sync_seconds",
            "From receiving an API event to its map writes done, last sync pass.",
            n(&m.last_sync_ns) as f64 / 1e9,
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_policy_synced",
            "1 once the policy maps were written from a full list of Pods, Namespaces and NetworkPolicies.",
            n(&m.policy_synced),
        )?;
        gauge(&mut e, "kubeshift_agent_policy_identities", "Identities in the last compile.", n(&m.policy_identities))?;
        gauge(
            &mut e,
            "kubeshift_agent_policy_entries",
            "Policy map allow entries for this node's identities.",
            n(&m.policy_entries),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_policy_rejected",
            "NetworkPolicies that could not be read (see the log): enforced as deny-all for their pods, or left out if their pod selector is unreadable.",
            n(&m.policy_rejected),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_policy_local_pods",
            "This node's pods with their own network interface (each needs the policy programs).",
            n(&m.policy_local_pods),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_policy_interfaces",
            "Pod interfaces with the policy programs attached.",
            n(&m.policy_interfaces),
        )?;
        counter(
            &mut e,
            "kubeshift_agent_policy_attach_errors",
            "Attach attempts that failed (retried every second; a pod's interface may not exist yet).",
            n(&m.policy_attach_errors),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_policy_last_sync_seconds",
            "Last policy pass: compile plus map writes.",
            n(&m.policy_last_sync_ns) as f64 / 1e9,
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_nodeport_synced",
            "1 once the NodePort frontends were written from a full list of Services and EndpointSlices.",
            n(&m.nodeport_synced),
        )?;
        gauge(
            &mut e,
            "kubeshift_agent_nodeport_frontends",
            "NodePort, externalIP and load-balancer IP frontends in the maps.",
            n(&m.nodeport_frontends),
        )?;
        let (counts, kept) = m.flows.with_counts(|c, kept| (c.clone(), kept));
        let mut flows = e.encode_descriptor(
            "kubeshift_agent_flows",
            "Flow records made from datapath events, by verdict.",
            None,
            MetricType::Counter,
        )?;
        for (verdict, v) in [("FORWARDED", counts.forwarded), ("DROPPED", counts.dropped), ("UNKNOWN", counts.other)] {
            ConstCounter::new(v).encode(flows.encode_family(&[("verdict", verdict)])?)?;
        }
        counter(
            &mut e,
            "kubeshift_agent_flows_unknown_source",
            "Flow records whose source pod was not found (netns cookie of no known pod).",
            counts.unknown_source,
        )?;
        counter(
            &mut e,
            "kubeshift_agent_flows_follower_missed",
            "Records a slow /flows?follow reader did not get (it fell behind by more than 1024).",
            counts.follower_missed,
        )?;
        gauge(&mut e, "kubeshift_agent_flows_kept", "Flow records kept in memory for /flows?last=N.", kept as u64)?;
        counter(&mut e, "kubeshift_agent_flow_reads", "Ring buffer wakeups that returned events.", n(&m.flow_reads))
    }
}
