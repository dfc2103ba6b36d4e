//! What a lab is: its name, its nodes and pools, its CNI, and the address plan derived
//! from them. Everything here is plain data; nothing touches the machine.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The legacy CNI the lab imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cni {
    Flannel,
    Calico,
}

impl Cni {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "flannel" => Ok(Cni::Flannel),
            "calico" => Ok(Cni::Calico),
            other => bail!("unknown CNI {other:?}: the lab can imitate \"flannel\" or \"calico\""),
        }
    }

    /// The pod network each CNI's upstream manifest defaults to.
    pub fn cluster_cidr(self) -> &'static str {
        match self {
            Cni::Flannel => "10.244.0.0/16",
            Cni::Calico => "192.168.0.0/16",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabSpec {
    /// Short name; every netns, cgroup, pin and state directory carries it.
    pub name: String,
    pub nodes: usize,
    pub pools: usize,
    /// The node label that names a node's pool.
    pub pool_label: String,
    pub cni: Cni,
    /// Loopback port on the host that forwards to the apiserver (0 = pick a free one).
    pub api_port: u16,
    /// Deploy the demo workload after the cluster is up.
    pub demo: bool,
    /// The first N nodes are control-plane nodes (kubeadm's role labels and NoSchedule
    /// taint, no pool), so a plan's "control plane last" runs for real.
    #[serde(default)]
    pub control_plane_nodes: usize,
}

pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// The underlay all nodes hang off. It exists only inside the lab's namespaces.
pub const UNDERLAY_PREFIX: [u8; 3] = [172, 30, 0];
pub const UNDERLAY_LEN: u8 = 24;
pub const APISERVER_PORT: u16 = 6443;
pub const K8S_VERSION: &str = "v1.20.2";

impl LabSpec {
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || self.name.len() > 12
            || !self.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            bail!(
                "lab name {:?}: use 1-12 lowercase letters or digits (it prefixes netns and cgroup names)",
                self.name
            );
        }
        if self.nodes == 0 || self.nodes > 50 {
            bail!("--nodes {}: the lab runs 1 to 50 nodes", self.nodes);
        }
        if self.control_plane_nodes >= self.nodes {
            bail!(
                "--control-plane-nodes {}: at least one of the {} nodes must be a worker",
                self.control_plane_nodes,
                self.nodes
            );
        }
        if self.pools == 0 || self.pools > self.nodes - self.control_plane_nodes {
            bail!(
                "--pools {}: must be between 1 and the number of worker nodes ({})",
                self.pools,
                self.nodes - self.control_plane_nodes
            );
        }
        Ok(())
    }

    pub fn node_names(&self) -> Vec<String> {
        (1..=self.nodes).map(|i| format!("node-{i}")).collect()
    }

    /// Pools are filled round-robin so that every pool has nodes.
    pub fn is_control_plane(&self, node_index: usize) -> bool {
        node_index < self.control_plane_nodes
    }

    pub fn pool_of(&self, node_index: usize) -> String {
        format!("pool-{}", (node_index % self.pools) + 1)
    }

    pub fn apiserver_ip(&self) -> Ipv4Addr {
        underlay_ip(10)
    }

    pub fn node_ip(&self, node_index: usize) -> Ipv4Addr {
        underlay_ip(20 + node_index as u8)
    }

    pub fn apiserver_url(&self) -> String {
        format!("https://{}:{}", self.apiserver_ip(), APISERVER_PORT)
    }

    // --- names on the machine -------------------------------------------------

    pub fn prefix(&self) -> String {
        format!("ks-{}", self.name)
    }
    pub fn netns_underlay(&self) -> String {
        format!("{}-underlay", self.prefix())
    }
    pub fn netns_control_plane(&self) -> String {
        format!("{}-cp", self.prefix())
    }
    pub fn netns_node(&self, node: &str) -> String {
        format!("{}-{}", self.prefix(), node)
    }
    pub fn state_dir(&self) -> PathBuf {
        state_dir(&self.name)
    }
}

pub fn underlay_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY_PREFIX[0], UNDERLAY_PREFIX[1], UNDERLAY_PREFIX[2], host)
}

pub fn state_root() -> PathBuf {
    std::env::var_os("KUBESHIFT_LAB_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/kubeshift/lab"))
}

pub fn state_dir(name: &str) -> PathBuf {
    state_root().join(name)
}

/// Name of the netns a pod of this lab lives in. Derived from the pod UID so the
/// kubelet stand-in, `lab down` and tests all agree without a lookup.
pub fn pod_netns(lab: &str, pod_uid: &str) -> String {
    let short: String = pod_uid.chars().filter(|c| *c != '-').take(12).collect();
    format!("ks-{lab}-pod-{short}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LabSpec {
        LabSpec {
            name: "t1".into(),
            nodes: 3,
            pools: 2,
            pool_label: "node.kubernetes.io/pool".into(),
            cni: Cni::Flannel,
            api_port: 0,
            demo: false,
            control_plane_nodes: 0,
        }
    }

    #[test]
    fn control_plane_nodes_come_first_and_leave_a_worker() {
        let s = LabSpec { control_plane_nodes: 1, ..spec() };
        assert!(s.is_control_plane(0) && !s.is_control_plane(1));
        assert!(s.validate().is_ok());
        let err = LabSpec { control_plane_nodes: 3, ..spec() }.validate().unwrap_err().to_string();
        assert!(err.contains("--control-plane-nodes 3"), "{err}");
    }

    #[test]
    fn pools_are_round_robin_and_all_used() {
        let s = spec();
        let pools: Vec<_> = (0..3).map(|i| s.pool_of(i)).collect();
        assert_eq!(pools, ["pool-1", "pool-2", "pool-1"]);
    }

    #[test]
    fn bad_specs_are_refused_with_the_field_named() {
        let mut s = spec();
        s.name = "Bad_Name".into();
        assert!(s.validate().unwrap_err().to_string().contains("lab name"));
        let mut s = spec();
        s.pools = 4;
        assert!(s.validate().unwrap_err().to_string().contains("--pools 4"));
        assert!(Cni::parse("weave").unwrap_err().to_string().contains("weave"));
    }

    #[test]
    fn pod_netns_is_stable_and_short() {
        let n = pod_netns("lab", "0b5c3f7e-1111-2222-3333-444455556666");
        assert_eq!(n, "ks-lab-pod-0b5c3f7e1111");
    }
}
