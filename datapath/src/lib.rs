//! The eBPF datapath: C programs under `bpf/`, their loader and map sync.
//!
//! [`Datapath::load`] either attaches the socket load balancer to a cgroup v2 directory
//! and pins everything under a bpffs directory, or, when that directory already holds
//! the pins of an earlier run, reopens the pinned maps without touching the kernel's
//! programs. That is what lets the agent restart while traffic keeps flowing.

mod datapath;
mod raw;
pub mod sys;
pub mod testenv;

pub use datapath::{
    Affinity, Backend, Datapath, DatapathConfig, Error, FlowEvent, Hook, ProgramStats, Protocol,
    ServiceKey,
    Verdict, DEFAULT_AFFINITY_TIMEOUT, DEFAULT_BPFFS_ROOT, MAX_BACKENDS_PER_SERVICE,
};

/// The compiled object, embedded so the agent is a single file.
/// (Aligned because the ELF parser reads headers in place.)
pub(crate) static SOCK_LB_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.o"));
