//! The eBPF datapath: C programs under `bpf/`, their loader and map sync.
//!
//! [`Datapath::load`] either attaches the socket load balancer to a cgroup v2 directory
//! and pins everything under a bpffs directory, or, when that directory already holds
//! the pins of an earlier run, reopens the pinned maps without detaching anything (and
//! swaps in changed program code in place). That is what lets the agent restart, upgrade
//! or roll back while traffic keeps flowing.

pub mod agent;
pub mod cni;
mod datapath;
mod loader_util;
pub mod nodeport;
pub mod overlay;
pub mod policy;
mod raw;
pub mod sys;
pub mod testenv;

pub use nodeport::{
    Frontend, NodePortDatapath, NpBackend, NpConnection, NpFlowEvent, NpReason, NpVerdict, TrafficPolicy,
};

pub use datapath::{
    Affinity, Backend, Datapath, DatapathConfig, Error, FlowEvent, Hook, ProgramStats, Protocol, ServiceKey, Verdict,
    DEFAULT_AFFINITY_TIMEOUT, DEFAULT_BPFFS_ROOT, MAX_BACKENDS_PER_SERVICE,
};

/// The compiled object, embedded so the agent is a single file.
/// (Aligned because the ELF parser reads headers in place.)
pub static SOCK_LB_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.o"));

/// The NetworkPolicy tc programs (`bpf/policy.c`), loaded by [`policy::loader`].
pub static POLICY_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy.o"));

/// The NodePort / external-IP tc programs (`bpf/nodeport.c`).
pub static NODEPORT_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport.o"));

/// The same programs with build id 2, for upgrade tests.
#[cfg(ks_upgrade_variant)]
#[doc(hidden)]
pub static SOCK_LB_OBJ_BUILD2: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb_build2.o"));

/// The NodePort programs with build id 2, for upgrade tests.
#[cfg(ks_upgrade_variant)]
#[doc(hidden)]
pub static NODEPORT_OBJ_BUILD2: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport_build2.o"));

/// Removes everything a node's datapath pinned under `pin_dir` (socket LB, NetworkPolicy,
/// NodePort), which detaches their programs: the rollback of a node, or cleanup after a
/// crashed agent. Parts that were never loaded are skipped.
pub fn purge_node(pin_dir: &std::path::Path) -> Result<(), Error> {
    policy::loader::PolicyDatapath::purge(pin_dir)?;
    nodeport::NodePortDatapath::purge(pin_dir)?;
    Datapath::purge(pin_dir)
}
