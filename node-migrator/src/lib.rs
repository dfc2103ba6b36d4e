//! The node-migrator: what `kubeshift migrate apply`, `rollback` and `status` stand on
//! (DESIGN.md, "Migration").
//!
//! - [`crd`]: the migration's state in the cluster (NodeMigration per node, one
//!   ClusterMigration), so a killed apply resumes from the cluster alone.
//! - [`lease`]: the apply lock (a coordination.k8s.io Lease).
//! - [`next`]: what a node's migration does next, decided purely from its NodeMigration,
//!   and the status transitions that journal each step.
//! - [`drain`]: cordon and drain through the eviction API, PDB-aware.
//! - [`daemonsets`]: kube-proxy and the legacy CNI agent leave a node by a node label.
//! - [`cleanup`]: the node-local removal of kube-proxy's rules for its mode (iptables on
//!   both backends, nftables, IPVS planning, service conntrack), run in a node's netns.
//!
//! What it may touch: its own custom resources, the apply Lease, Node
//! `spec.unschedulable` and its own node labels, the node affinity of the kube-proxy and
//! legacy CNI DaemonSets, pods it evicts, and (cleanup only, in the network namespace it
//! is given) kube-proxy's own chains, rules, tables and conntrack entries.

pub mod cleanup;
pub mod crd;
pub mod daemonsets;
pub mod drain;
pub mod lease;
pub mod local;
pub mod next;
