//! From a cluster description to a [`Plan`]: canary first, then pools from
//! the smallest risk up, control plane last; batch sizes bounded by
//! `--max-unavailable` and by what PodDisruptionBudgets allow per pool.
//!
//! `PlanInput` is the part of the future `Inventory` that planning needs;
//! discovery will fill it.

use crate::plan::{
    Batch, ClusterInfo, Estimates, Gate, NodePlan, Plan, PlanMetadata, Step, StepAction, TargetDatapath, Tunnel, Wave,
    API_VERSION, KIND,
};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq)]
pub struct PlanNodeInput {
    pub name: String,
    pub pool: String,
    pub control_plane: bool,
    /// Pods that drain will evict (not DaemonSet or static pods).
    pub evictable_pods: usize,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlanInput {
    pub name: String,
    pub fingerprint: String,
    pub cluster_name: Option<String>,
    pub legacy_cni: Option<String>,
    pub kube_proxy_mode: Option<String>,
    pub nodes: Vec<PlanNodeInput>,
    /// Every CIDR in use: pod CIDRs, service CIDR, node subnets, LB ranges.
    pub used_cidrs: Vec<String>,
    pub service_cidr: Option<String>,
    /// `--max-unavailable`, cluster-wide.
    pub max_unavailable: u32,
    /// Per pool, how many nodes may drain at once without violating a PDB
    /// (computed by discovery from the PDBs of the pods on that pool).
    pub pool_disruption_limit: BTreeMap<String, u32>,
    /// Forced tunnel port; default the first of 8473, 8474, … that no legacy tunnel uses.
    pub tunnel_port: Option<u16>,
    /// Forced VNI; default the first of 2, 3, … that no legacy tunnel uses.
    pub tunnel_vni: Option<u32>,
    /// UDP ports and VNIs of the legacy CNI's tunnels, as discovery read them.
    pub legacy_tunnels: Vec<LegacyTunnel>,
    /// Every DaemonSet of the legacy CNI, carried into the plan for apply.
    pub legacy_daemon_sets: Vec<String>,
    /// Forced pod CIDR; default: the first free /16 of the candidates.
    pub pod_cidr: Option<String>,
}

/// A UDP tunnel the legacy CNI runs: the new overlay must use another port and VNI.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LegacyTunnel {
    pub port: u16,
    pub vni: Option<u32>,
    /// What it is and where the values came from, e.g.
    /// `Flannel vxlan port 8472 (default), VNI 1 (default), ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json`.
    pub what: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanningError {
    #[error("the cluster has no nodes")]
    NoNodes,
    #[error("tunnel port 8472 is Flannel's VXLAN port; both datapaths run side by side during the migration")]
    FlannelPort,
    #[error("tunnel port {port} is taken by the legacy CNI: {what}")]
    PortTaken { port: u16, what: String },
    #[error("tunnel VNI {vni} is taken by the legacy CNI: {what}")]
    VniTaken { vni: u32, what: String },
    #[error("malformed CIDR {0:?}")]
    BadCidr(String),
    #[error("pod CIDR {wanted} overlaps {used}, which is in use")]
    Overlap { wanted: String, used: String },
    #[error("no free /16 for the new pod CIDR among the candidates (10.200-255.0.0, 172.16-31.0.0, 100.64-127.0.0)")]
    NoFreeCidr,
}

/// Parses an IPv4 CIDR into (network, prefix). IPv6 CIDRs are returned as
/// `None` and never overlap an IPv4 candidate.
pub fn parse_cidr(c: &str) -> Result<Option<(u32, u8)>, PlanningError> {
    let bad = || PlanningError::BadCidr(c.to_string());
    let (ip, len) = c.split_once('/').ok_or_else(bad)?;
    if ip.contains(':') {
        return Ok(None);
    }
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > 32 {
        return Err(bad());
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok(Some((u32::from(ip) & mask, len)))
}

pub fn cidrs_overlap(a: (u32, u8), b: (u32, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a.0 & mask == b.0 & mask
}

fn pick_pod_cidr(input: &PlanInput) -> Result<String, PlanningError> {
    let used: Vec<((u32, u8), &String)> = input
        .used_cidrs
        .iter()
        .chain(input.service_cidr.iter())
        .map(|c| parse_cidr(c).map(|p| p.map(|p| (p, c))))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    if let Some(want) = &input.pod_cidr {
        let w = parse_cidr(want)?.ok_or_else(|| PlanningError::BadCidr(want.clone()))?;
        if let Some((_, u)) = used.iter().find(|(u, _)| cidrs_overlap(w, *u)) {
            return Err(PlanningError::Overlap { wanted: want.clone(), used: (*u).clone() });
        }
        return Ok(want.clone());
    }
    let candidates = (200..=255u32)
        .map(|b| (10u32 << 24) | (b << 16))
        .chain((16..=31u32).map(|b| (172u32 << 24) | (b << 16)))
        .chain((64..=127u32).map(|b| (100u32 << 24) | (b << 16)));
    for net in candidates {
        if !used.iter().any(|(u, _)| cidrs_overlap((net, 16), *u)) {
            return Ok(format!("{}/16", Ipv4Addr::from(net)));
        }
    }
    Err(PlanningError::NoFreeCidr)
}

/// Default and first candidate for the tunnel port: one above Flannel's.
pub const DEFAULT_TUNNEL_PORT: u16 = 8473;
/// Default and first candidate for the VNI: Flannel uses 1, Calico 4096.
pub const DEFAULT_TUNNEL_VNI: u32 = 2;

/// The tunnel port and VNI: the forced ones if free, else the first free
/// candidates. 8472 is never used: Flannel may be deployed after discovery ran.
fn pick_tunnel(input: &PlanInput) -> Result<(u16, u32), PlanningError> {
    let port_user = |p: u16| input.legacy_tunnels.iter().find(|t| t.port == p);
    let vni_user = |v: u32| input.legacy_tunnels.iter().find(|t| t.vni == Some(v));
    let port = match input.tunnel_port {
        Some(8472) => return Err(PlanningError::FlannelPort),
        Some(p) => match port_user(p) {
            Some(t) => return Err(PlanningError::PortTaken { port: p, what: t.what.clone() }),
            None => p,
        },
        None => (DEFAULT_TUNNEL_PORT..=u16::MAX).find(|p| port_user(*p).is_none()).unwrap_or(DEFAULT_TUNNEL_PORT),
    };
    let vni = match input.tunnel_vni {
        Some(v) => match vni_user(v) {
            Some(t) => return Err(PlanningError::VniTaken { vni: v, what: t.what.clone() }),
            None => v,
        },
        None => (DEFAULT_TUNNEL_VNI..).find(|v| vni_user(*v).is_none()).unwrap_or(DEFAULT_TUNNEL_VNI),
    };
    Ok((port, vni))
}

fn steps_for(node: &PlanNodeInput) -> Vec<Step> {
    let n = &node.name;
    let step = |action: StepAction, secs: u32, rollback_point: bool| {
        let suffix = serde_yaml::to_string(&action).unwrap_or_default().trim().to_string();
        Step {
            id: format!("{n}/{suffix}"),
            action,
            after: Vec::new(),
            gate: (action == StepAction::ConnectivityGate).then(|| Gate { suite: "node".into(), timeout_seconds: 300 }),
            rollback_point,
            estimate_seconds: secs,
        }
    };
    // Drain time grows with the pods to evict; the rest is per-node work.
    let drain = 30 + 2 * node.evictable_pods.min(5_000) as u32;
    vec![
        step(StepAction::Snapshot, 5, false),
        step(StepAction::Cordon, 2, false),
        step(StepAction::Drain, drain, false),
        step(StepAction::InstallDatapath, 60, true),
        step(StepAction::SwitchPods, 30, true),
        step(StepAction::TakeOverServices, 20, true),
        step(StepAction::CleanKubeProxy, 10, false),
        step(StepAction::CleanLegacy, 10, false),
        step(StepAction::Uncordon, 2, false),
        step(StepAction::ConnectivityGate, 60, true),
    ]
}

fn batches(nodes: &[&PlanNodeInput], size: usize) -> Vec<Batch> {
    nodes
        .chunks(size.max(1))
        .map(|c| Batch {
            nodes: c
                .iter()
                .map(|n| NodePlan { name: n.name.clone(), pool: Some(n.pool.clone()), steps: steps_for(n) })
                .collect(),
        })
        .collect()
}

/// Every step names what it waits for, as `migrate apply` runs them: the node's
/// previous step; a node's first step, the gates of the batch before it, or the
/// gate of the wave before it.
fn link_steps(waves: &mut [Wave]) {
    let mut frontier: Vec<String> = Vec::new();
    for w in waves.iter_mut() {
        for b in w.batches.iter_mut() {
            let mut next = Vec::new();
            for n in b.nodes.iter_mut() {
                let mut prev: Option<String> = None;
                for s in n.steps.iter_mut() {
                    s.after = prev.iter().cloned().collect();
                    if prev.is_none() {
                        s.after = frontier.clone();
                    }
                    prev = Some(s.id.clone());
                }
                next.extend(prev);
            }
            frontier = next;
        }
        if w.gate.is_some() {
            frontier = vec![format!("wave/{}/gate", w.name)];
        }
    }
}

/// Builds the plan. Deterministic: the same input gives the same file, so
/// two runs can be diffed.
pub fn build_plan(input: &PlanInput) -> Result<Plan, PlanningError> {
    if input.nodes.is_empty() {
        return Err(PlanningError::NoNodes);
    }
    let (port, vni) = pick_tunnel(input)?;
    let pod_cidr = pick_pod_cidr(input)?;
    let global = input.max_unavailable.max(1) as usize;

    let mut workers: BTreeMap<&str, Vec<&PlanNodeInput>> = BTreeMap::new();
    let mut control: Vec<&PlanNodeInput> = Vec::new();
    for n in &input.nodes {
        if n.control_plane {
            control.push(n);
        } else {
            workers.entry(n.pool.as_str()).or_default().push(n);
        }
    }
    for v in workers.values_mut() {
        v.sort_by(|a, b| (a.evictable_pods, &a.name).cmp(&(b.evictable_pods, &b.name)));
    }
    control.sort_by(|a, b| a.name.cmp(&b.name));

    // Smallest risk first: fewest pods to move, then fewest nodes.
    let mut pools: Vec<(&str, Vec<&PlanNodeInput>)> = workers.into_iter().collect();
    pools.sort_by_key(|(name, nodes)| {
        (nodes.iter().map(|n| n.evictable_pods).sum::<usize>(), nodes.len(), name.to_string())
    });

    let mut waves = Vec::new();
    let mut max_parallel = 1;
    // The canary is the quietest node of the least risky pool; with only a
    // control plane, the first control-plane node.
    let canary: &PlanNodeInput = match pools.first_mut() {
        Some((_, nodes)) => nodes.remove(0),
        None => control.remove(0),
    };
    waves.push(Wave {
        name: "canary".into(),
        pools: vec![canary.pool.clone()],
        batches: batches(&[canary], 1),
        gate: Some(Gate { suite: "full".into(), timeout_seconds: 600 }),
    });
    for (pool, nodes) in pools.iter().filter(|(_, n)| !n.is_empty()) {
        let pdb = input.pool_disruption_limit.get(*pool).copied().map(|v| v.max(1) as usize).unwrap_or(usize::MAX);
        let size = global.min(pdb).min(nodes.len());
        max_parallel = max_parallel.max(size);
        waves.push(Wave {
            name: format!("pool-{pool}"),
            pools: vec![pool.to_string()],
            batches: batches(nodes, size),
            gate: Some(Gate { suite: "full".into(), timeout_seconds: 600 }),
        });
    }
    if !control.is_empty() {
        let mut pools: Vec<String> = control.iter().map(|n| n.pool.clone()).collect();
        pools.dedup();
        waves.push(Wave {
            name: "control-plane".into(),
            pools,
            // One at a time: the control plane keeps quorum.
            batches: batches(&control, 1),
            gate: Some(Gate { suite: "full".into(), timeout_seconds: 600 }),
        });
    }

    link_steps(&mut waves);

    let mut plan = Plan {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: PlanMetadata {
            name: input.name.clone(),
            created_at: None,
            kubeshift_version: Some(env!("CARGO_PKG_VERSION").into()),
        },
        cluster: ClusterInfo {
            fingerprint: input.fingerprint.clone(),
            name: input.cluster_name.clone(),
            node_count: input.nodes.len(),
            legacy_cni: input.legacy_cni.clone(),
            kube_proxy_mode: input.kube_proxy_mode.clone(),
            legacy_daemon_sets: input.legacy_daemon_sets.clone(),
        },
        target: TargetDatapath {
            pod_cidr,
            service_cidr: input.service_cidr.clone(),
            tunnel: Tunnel {
                protocol: "vxlan".into(),
                port,
                vni: Some(vni),
                avoids: input.legacy_tunnels.iter().map(|t| t.what.clone()).collect(),
            },
            max_unavailable: global as u32,
        },
        waves,
        estimates: Estimates::default(),
    };
    let graph = plan.graph().expect("generated plans are acyclic with unique ids");
    plan.estimates = Estimates {
        total_seconds: graph.critical_path_seconds(),
        nodes: input.nodes.len(),
        max_parallel_nodes: max_parallel,
    };
    Ok(plan)
}

/// A synthetic cluster for the planning benchmark and tests: `nodes` nodes in
/// pools of about 200 (3 control-plane nodes), pods spread unevenly.
#[doc(hidden)]
pub fn synthetic_input(nodes: usize, pods: usize) -> PlanInput {
    let cp = 3.min(nodes);
    let mut v = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let control_plane = i < cp;
        v.push(PlanNodeInput {
            name: format!("node-{i:05}"),
            pool: if control_plane { "control-plane".into() } else { format!("pool-{:02}", (i - cp) / 200) },
            control_plane,
            evictable_pods: if control_plane { 0 } else { (pods / nodes.max(1)) + (i * 7919) % 11 },
        });
    }
    let pools = (nodes.saturating_sub(cp)).div_ceil(200);
    PlanInput {
        name: "synthetic".into(),
        fingerprint: crate::plan::fingerprint(&["synthetic", &nodes.to_string()]),
        nodes: v,
        used_cidrs: vec!["10.244.0.0/16".into(), "192.168.0.0/16".into()],
        service_cidr: Some("10.96.0.0/12".into()),
        max_unavailable: 10,
        pool_disruption_limit: (0..pools).map(|p| (format!("pool-{p:02}"), 2 + (p as u32 % 5))).collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_math() {
        assert_eq!(parse_cidr("10.244.1.7/16").unwrap(), Some((u32::from(Ipv4Addr::new(10, 244, 0, 0)), 16)));
        assert_eq!(parse_cidr("fd00::/64").unwrap(), None);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0").is_err());
        let a = parse_cidr("10.96.0.0/12").unwrap().unwrap();
        assert!(cidrs_overlap(a, parse_cidr("10.100.0.0/16").unwrap().unwrap()));
        assert!(!cidrs_overlap(a, parse_cidr("10.200.0.0/16").unwrap().unwrap()));
        assert!(cidrs_overlap(parse_cidr("0.0.0.0/0").unwrap().unwrap(), a));
    }

    /// The plan file says what each step waits for: the node's previous step, and for
    /// a node's first step the wave before it (its gate) or the batch before it.
    #[test]
    fn every_step_names_what_it_waits_for() {
        let plan = build_plan(&synthetic_input(30, 300)).unwrap();
        let first = &plan.waves[0].batches[0].nodes[0].steps;
        assert!(first[0].after.is_empty(), "the canary's snapshot starts the plan: {:?}", first[0].after);
        for pair in first.windows(2) {
            assert_eq!(pair[1].after, vec![pair[0].id.clone()]);
        }
        let second_wave = &plan.waves[1];
        for n in &second_wave.batches[0].nodes {
            assert_eq!(n.steps[0].after, vec!["wave/canary/gate".to_string()], "{}", n.name);
        }
        if let Some(b) = second_wave.batches.get(1) {
            let gates: Vec<String> =
                second_wave.batches[0].nodes.iter().map(|n| n.steps.last().unwrap().id.clone()).collect();
            assert_eq!(b.nodes[0].steps[0].after, gates);
        }
        assert!(plan.graph().is_ok());
    }
}
