//! Node ranges: each node gets one range (default /24) of the target pod CIDR, recorded
//! in the ConfigMap `kube-system/kubeshift-ipam` (data: node name → range).
//!
//! Many agents start at once (a DaemonSet rollout), so a claim is an optimistic update:
//! read the ConfigMap, compute the new data with the pure [`allocate`], and write it back
//! with the resourceVersion that was read. The apiserver answers 409 Conflict when
//! someone else wrote in between; the claim then re-reads and tries again, so no range
//! is ever handed out twice. A ConfigMap rather than a CRD: it needs no schema
//! installed before the first agent runs, and one object makes the check-and-set
//! cover every node's range at once.

use super::Cidr;
use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, ListParams, PostParams};
use kube::Client;
use std::collections::{BTreeMap, BTreeSet};

pub const IPAM_NAMESPACE: &str = "kube-system";
pub const IPAM_CONFIGMAP: &str = "kubeshift-ipam";

/// The outcome of one allocation on the recorded ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// This node's range.
    pub range: Cidr,
    /// The ranges to write back: this node's added, those of nodes no longer in the
    /// API removed. Equal to the input when nothing changed.
    pub ranges: BTreeMap<String, Cidr>,
}

/// Picks `node`'s range of size `/prefix` in `pool`. A node that already has a range
/// in `pool` keeps it (agent restarts); ranges of nodes missing from `live_nodes` are
/// freed first (a deleted node gives its range back). The lowest free range is taken,
/// so the result depends only on the inputs.
pub fn allocate(
    pool: Cidr,
    prefix: u8,
    recorded: &BTreeMap<String, Cidr>,
    node: &str,
    live_nodes: &BTreeSet<String>,
) -> Result<Allocation> {
    if prefix < pool.len || prefix > 32 {
        bail!("node range size /{prefix} does not fit in the pod CIDR {pool}");
    }
    let mut ranges: BTreeMap<String, Cidr> =
        recorded.iter().filter(|(n, _)| live_nodes.contains(*n) || *n == node).map(|(n, c)| (n.clone(), *c)).collect();
    if let Some(c) = ranges.get(node) {
        if c.len == prefix && pool.contains_cidr(c) {
            return Ok(Allocation { range: *c, ranges });
        }
        // Recorded under another pool or size (the pod CIDR was changed): take a new one.
        ranges.remove(node);
    }
    let count = 1u64 << (prefix - pool.len);
    let step = 1u64 << (32 - prefix);
    let base = u32::from(pool.network()) as u64;
    for i in 0..count {
        let cand = Cidr { addr: ((base + i * step) as u32).into(), len: prefix };
        if !ranges.values().any(|c| c.overlaps(&cand)) {
            ranges.insert(node.to_string(), cand);
            return Ok(Allocation { range: cand, ranges });
        }
    }
    bail!(
        "pod CIDR {pool} is exhausted: all {count} /{prefix} node ranges are taken ({} nodes recorded in {IPAM_NAMESPACE}/{IPAM_CONFIGMAP}); node {node} gets none",
        ranges.len()
    )
}

/// Parses the ConfigMap's data; an entry that is not a CIDR is an error naming it, not
/// skipped (skipping would hand its range out again).
pub fn parse_ranges(data: &BTreeMap<String, String>) -> Result<BTreeMap<String, Cidr>> {
    data.iter()
        .map(|(n, v)| {
            let c: Cidr = v.parse().with_context(|| format!("{IPAM_NAMESPACE}/{IPAM_CONFIGMAP}: entry {n}"))?;
            Ok((n.clone(), c))
        })
        .collect()
}

/// Claims (or finds again) `node`'s range in the API, retrying on conflicts.
pub async fn claim(client: &Client, node: &str, pool: Cidr, prefix: u8) -> Result<Cidr> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), IPAM_NAMESPACE);
    let nodes: Api<Node> = Api::all(client.clone());
    for attempt in 0..50u32 {
        let live: BTreeSet<String> = nodes
            .list(&ListParams::default())
            .await
            .context("listing Nodes (to free the ranges of deleted ones)")?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let existing = cms
            .get_opt(IPAM_CONFIGMAP)
            .await
            .with_context(|| format!("reading ConfigMap {IPAM_NAMESPACE}/{IPAM_CONFIGMAP}"))?;
        let recorded = parse_ranges(&existing.as_ref().and_then(|c| c.data.clone()).unwrap_or_default())?;
        let a = allocate(pool, prefix, &recorded, node, &live)?;
        if a.ranges == recorded && existing.is_some() {
            return Ok(a.range);
        }
        let data: BTreeMap<String, String> = a.ranges.iter().map(|(n, c)| (n.clone(), c.to_string())).collect();
        let res = match existing {
            Some(mut cm) => {
                // resourceVersion stays as read: the apiserver refuses the update (409)
                // if anyone wrote since.
                cm.data = Some(data);
                cms.replace(IPAM_CONFIGMAP, &PostParams::default(), &cm).await.map(|_| ())
            }
            None => {
                let mut cm = ConfigMap::default();
                cm.metadata.name = Some(IPAM_CONFIGMAP.into());
                cm.metadata.namespace = Some(IPAM_NAMESPACE.into());
                cm.data = Some(data);
                cms.create(&PostParams::default(), &cm).await.map(|_| ())
            }
        };
        match res {
            Ok(()) => {
                tracing::info!(node, range = %a.range, pool = %pool, "node range claimed");
                return Ok(a.range);
            }
            // 409: another agent wrote first (update), or created the ConfigMap first.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!(node, attempt, "IPAM ConfigMap changed under us; re-reading");
                // A little jitter so agents that collided do not collide again in step.
                let ms = 20 + (std::process::id() as u64 + attempt as u64 * 37) % 80;
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("writing ConfigMap {IPAM_NAMESPACE}/{IPAM_CONFIGMAP}"));
            }
        }
    }
    bail!("claiming a range for node {node} in {IPAM_NAMESPACE}/{IPAM_CONFIGMAP}: still conflicting after 50 attempts")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }
    fn live(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }
    fn rec(e: &[(&str, &str)]) -> BTreeMap<String, Cidr> {
        e.iter().map(|(n, r)| (n.to_string(), c(r))).collect()
    }

    #[test]
    fn first_node_gets_the_first_range() {
        let a = allocate(c("10.200.0.0/16"), 24, &BTreeMap::new(), "n1", &live(&["n1"])).unwrap();
        assert_eq!(a.range, c("10.200.0.0/24"));
        assert_eq!(a.ranges, rec(&[("n1", "10.200.0.0/24")]));
    }

    #[test]
    fn a_node_keeps_its_range_and_nothing_is_rewritten() {
        let r = rec(&[("n1", "10.200.0.0/24"), ("n2", "10.200.1.0/24")]);
        let a = allocate(c("10.200.0.0/16"), 24, &r, "n2", &live(&["n1", "n2"])).unwrap();
        assert_eq!(a.range, c("10.200.1.0/24"));
        assert_eq!(a.ranges, r);
    }

    #[test]
    fn the_lowest_free_range_is_taken_and_a_deleted_node_frees_its_range() {
        let r = rec(&[("n1", "10.200.0.0/24"), ("gone", "10.200.1.0/24"), ("n3", "10.200.2.0/24")]);
        let a = allocate(c("10.200.0.0/16"), 24, &r, "n4", &live(&["n1", "n3", "n4"])).unwrap();
        assert_eq!(a.range, c("10.200.1.0/24"));
        assert!(!a.ranges.contains_key("gone"));
    }

    #[test]
    fn a_range_from_another_pool_is_replaced() {
        let r = rec(&[("n1", "10.244.0.0/24")]);
        let a = allocate(c("10.200.0.0/16"), 24, &r, "n1", &live(&["n1"])).unwrap();
        assert_eq!(a.range, c("10.200.0.0/24"));
    }

    #[test]
    fn exhaustion_names_the_cidr() {
        let r = rec(&[("n1", "10.200.0.0/25"), ("n2", "10.200.0.128/25")]);
        let e = allocate(c("10.200.0.0/24"), 25, &r, "n3", &live(&["n1", "n2", "n3"])).unwrap_err().to_string();
        assert!(e.contains("10.200.0.0/24") && e.contains("exhausted") && e.contains("n3"), "{e}");
    }

    #[test]
    fn a_range_size_larger_than_the_pool_is_refused() {
        let e = allocate(c("10.200.0.0/16"), 8, &BTreeMap::new(), "n1", &live(&["n1"])).unwrap_err().to_string();
        assert!(e.contains("/8") && e.contains("10.200.0.0/16"), "{e}");
    }

    #[test]
    fn a_bad_entry_is_an_error_naming_it() {
        let d: BTreeMap<String, String> = [("n1".to_string(), "10.200.0.0/33".to_string())].into();
        let e = format!("{:#}", parse_ranges(&d).unwrap_err());
        assert!(e.contains("n1") && e.contains("10.200.0.0/33"), "{e}");
    }

    #[test]
    fn many_nodes_never_share_a_range() {
        let mut r = BTreeMap::new();
        let names: Vec<String> = (0..256).map(|i| format!("n{i}")).collect();
        let all: BTreeSet<String> = names.iter().cloned().collect();
        for n in &names {
            r = allocate(c("10.200.0.0/16"), 24, &r, n, &all).unwrap().ranges;
        }
        let distinct: BTreeSet<Cidr> = r.values().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
