//! kubeshift's lab: a real Kubernetes cluster on one Linux machine, without Docker.
//!
//! - A real control plane (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler v1.20.2, built from Debian's source by
//!   `scripts/build-control-plane.sh`) in one network namespace.
//! - Nodes as network namespaces on an underlay bridge, each with a kubelet stand-in
//!   ([`kubelet`]) that runs its pods with real CNI plugins, a real kube-proxy
//!   (iptables mode) from the kube-proxy DaemonSet, and the legacy CNI's daemon from
//!   its DaemonSet ([`flanneld`], [`calico_node`]).
//! - The API objects of a real install (lab/manifests), so discovery code cannot tell
//!   the lab from a kubeadm cluster.
//!
//! What the lab may touch on the machine: network namespaces named `ks-<lab>-*`, the
//! cgroup `<cgroup2>/kubeshift-lab-<lab>`, `/sys/fs/bpf/kubeshift-lab-<lab>`, the state
//! directory `/var/lib/kubeshift/lab/<lab>`, and the processes it starts. It never
//! changes the host's own interfaces, routes or iptables. [`down::down`] removes all
//! of it.

pub mod api;
pub mod calico_node;
pub mod calico_policy;
pub mod cni_plugins;
pub mod control_plane;
pub mod down;
pub mod flanneld;
pub mod forward;
pub mod kubelet;
pub mod netexec;
mod peers;
pub mod pki;
pub mod spec;
pub mod state;
pub mod status;
pub mod sys;
pub mod topology;
pub mod up;

pub use spec::{Cni, LabSpec};
pub use state::LabState;
