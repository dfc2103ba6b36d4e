//! Address allocations the CNI plugin made for sandboxes that went away without a DEL
//! (the node rebooted, the runtime lost a sandbox, the plugin was killed mid-ADD): found
//! and freed when the agent starts, and every [`EVERY`] after, against the pods that
//! exist. Without it a node's range fills up with addresses nothing uses, and ADD ends
//! in "range exhausted".
//!
//! The runtime's own GC (CNI 1.1, `cni.dev/valid-attachments`, see `cni::gc`) frees what
//! it knows is gone; this pass covers runtimes that never call GC and reboots, after
//! which no DEL comes for the old sandboxes. It runs in both modes: a node that went
//! back to standby still holds the allocations of the pods kubeshift wired.
//!
//! An allocation is freed only when all of these hold ([`leaked`]):
//! - it is older than [`GRACE`]: an ADD holds its address a moment before its veth
//!   exists;
//! - its host-side veth (named from container id and ifname) is not on the node: the
//!   sandbox's network namespace is gone, and the veth with it;
//! - no pod of this node in the API has the address. After a reboot the API still shows
//!   the old address until the kubelet has a new sandbox; handing it to another pod then
//!   would give two pods one address, and Services would send the stale pod's traffic
//!   to the new one. A later pass frees it once the status has moved on.

use super::metrics::Metrics;
use crate::cni::{host_ifname, ipam::Records};
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::Client;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Far longer than an ADD takes from allocating to creating the veth (milliseconds).
pub const GRACE: Duration = Duration::from_secs(120);
/// The pass after the first; cheap (a directory, a link list and a list of this node's pods).
pub const EVERY: Duration = Duration::from_secs(300);
/// After a failed pass (API or `ip` unavailable).
const RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct LeakConfig {
    pub node: String,
    /// The plugin's `dataDir` and network name: allocations live in `<dir>/<network>/`.
    pub data_dir: PathBuf,
    pub network: String,
    /// The node's network namespace (None: the agent's own), where the host veths are.
    pub netns: Option<PathBuf>,
}

/// One allocation as the plugin recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
    /// Since the record was written.
    pub age: Duration,
}

/// The allocations nothing on the node or in the API holds (see the module doc).
pub fn leaked<'a>(
    allocations: &'a [Allocation],
    host_links: &HashSet<String>,
    pod_ips: &HashSet<Ipv4Addr>,
) -> Vec<&'a Allocation> {
    allocations
        .iter()
        .filter(|a| a.age >= GRACE)
        .filter(|a| !host_links.contains(&host_ifname(&a.container_id, &a.ifname)))
        .filter(|a| !pod_ips.contains(&a.ip))
        .collect()
}

/// Runs the pass at start and every [`EVERY`]; never returns.
pub async fn run(client: Client, cfg: LeakConfig, metrics: Arc<Metrics>) {
    loop {
        let wait = match pass(&client, &cfg).await {
            Ok(freed) => {
                metrics.ipam_leaks_freed.fetch_add(freed, Relaxed);
                EVERY
            }
            Err(e) => {
                tracing::warn!("collecting leaked address allocations: {e:#}");
                RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One pass; returns how many allocations it freed.
pub async fn pass(client: &Client, cfg: &LeakConfig) -> Result<u64> {
    let records = Records::new(&cfg.data_dir, &cfg.network);
    let allocations = read_allocations(&records)?;
    if allocations.is_empty() {
        return Ok(0);
    }
    let links = host_links(cfg)?;
    // The API is asked only when the node alone finds candidates (most passes find none).
    if leaked(&allocations, &links, &HashSet::new()).is_empty() {
        return Ok(0);
    }
    // Listed after the allocations were read: each of them was made for a pod that
    // existed before this list, so a pod missing from it is gone.
    let pods: Api<Pod> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={}", cfg.node));
    let pod_ips: HashSet<Ipv4Addr> = pods
        .list(&lp)
        .await
        .with_context(|| format!("listing the pods of node {}", cfg.node))?
        .items
        .iter()
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| s.pod_ips.iter().flatten().map(|i| i.ip.as_str()).chain(s.pod_ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mut freed = 0;
    for a in leaked(&allocations, &links, &pod_ips) {
        // Judged from a read a moment ago: if the address was freed by a DEL and taken
        // by a new ADD since, the record is now young or names another container.
        let now = records.record(a.ip)?;
        if now.is_none_or(|(id, ifn, age)| id != a.container_id || ifn != a.ifname || age < GRACE) {
            continue;
        }
        records.remove(a.ip)?;
        freed += 1;
        tracing::info!(
            ip = %a.ip, container = %a.container_id, ifname = %a.ifname,
            "freed a leaked address allocation: no veth on the node, no pod in the API has it"
        );
    }
    Ok(freed)
}

fn read_allocations(records: &Records) -> Result<Vec<Allocation>> {
    let mut out = Vec::new();
    for ip in records.addresses()? {
        // Gone since the listing: freed by a DEL meanwhile.
        if let Some((container_id, ifname, age)) = records.record(ip)? {
            out.push(Allocation { ip, container_id, ifname, age });
        }
    }
    Ok(out)
}

/// The names of every interface in the node's namespace.
fn host_links(cfg: &LeakConfig) -> Result<HashSet<String>> {
    let links = super::podnet::ip_json(cfg.netns.as_deref(), &["link", "show"])?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.get("ifname").and_then(|n| n.as_str()).map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(ip: &str, id: &str, age_s: u64) -> Allocation {
        Allocation {
            ip: ip.parse().unwrap(),
            container_id: id.into(),
            ifname: "eth0".into(),
            age: Duration::from_secs(age_s),
        }
    }

    #[test]
    fn only_old_allocations_without_a_veth_or_a_pod_are_leaked() {
        let allocations = [
            alloc("10.200.1.2", "gone", 3600),
            alloc("10.200.1.3", "live", 3600),
            alloc("10.200.1.4", "in-flight", 5),
            alloc("10.200.1.5", "stale-status", 3600),
        ];
        let links: HashSet<String> = ["lo".to_string(), host_ifname("live", "eth0")].into();
        let pod_ips: HashSet<Ipv4Addr> = ["10.200.1.5".parse().unwrap()].into();
        let ids: Vec<&str> = leaked(&allocations, &links, &pod_ips).iter().map(|a| a.container_id.as_str()).collect();
        assert_eq!(ids, ["gone"]);
        // The same allocation with its veth back, or a pod holding its address, is kept.
        let links: HashSet<String> = [host_ifname("gone", "eth0")].into();
        assert!(leaked(&allocations[..1], &links, &HashSet::new()).is_empty());
        let pod_ips: HashSet<Ipv4Addr> = ["10.200.1.2".parse().unwrap()].into();
        assert!(leaked(&allocations[..1], &HashSet::new(), &pod_ips).is_empty());
        // Another ifname of the same container has its own veth.
        let links: HashSet<String> = [host_ifname("gone", "net1")].into();
        assert_eq!(leaked(&allocations[..1], &links, &HashSet::new()).len(), 1);
    }

    #[test]
    fn records_are_read_with_their_age() {
        let d = std::env::temp_dir().join(format!("ks-leaks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let range = crate::cni::ipam::Ipv4Net::parse("10.201.0.0/29").unwrap();
        let ipam = crate::cni::ipam::Ipam::new(&d, "kubeshift", range, vec![]);
        let ip = ipam.allocate("c1", "eth0").unwrap();
        let all = read_allocations(&Records::new(&d, "kubeshift")).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].ip, all[0].container_id.as_str(), all[0].ifname.as_str()), (ip, "c1", "eth0"));
        assert!(all[0].age < GRACE, "{:?}", all[0].age);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
