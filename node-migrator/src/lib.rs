//! The node-migrator: what `kubeshift migrate apply`, `rollback` and `status` stand on
//! (DESIGN.md, "Migration").
//!
//! - [`crd`]: the migration's state in the cluster (NodeMigration per node, one
//!   ClusterMigration), so a killed apply resumes from the cluster alone.
//! - [`lease`]: the apply lock (a coordination.k8s.io Lease).
//! - [`drain`]: cordon and drain through the eviction API, PDB-aware.
//!
//! What it may touch: its own custom resources, the apply Lease, Node
//! `spec.unschedulable`, and pods it evicts. Node-local changes (iptables, CNI conf) are
//! not made from here.

pub mod crd;
pub mod drain;
pub mod lease;
