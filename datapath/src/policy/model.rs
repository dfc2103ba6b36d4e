//! Plain data for NetworkPolicy enforcement: what goes into the compiler and what comes out.
//!
//! Input types mirror NetworkPolicy v1 closely, with the API's defaults already applied
//! by whoever builds them (`source` does that for API objects): a port without protocol is
//! TCP, `policyTypes` is filled in, absent lists are empty lists.
//!
//! Only TCP and UDP are enforced per port; SCTP ports are dropped by `source` with a
//! warning (the lab kernel and the socket LB carry no SCTP).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::Protocol;

/// Everything the compiler needs to know about the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyInput {
    pub namespaces: Vec<NamespaceInfo>,
    /// Pods of every node (also pods still on the legacy CNI): their IPs go into the
    /// ipcache so remote peers get the right identity.
    pub pods: Vec<PodInfo>,
    pub policies: Vec<NetworkPolicy>,
    /// This node's own addresses. Traffic from the node to its pods is always allowed
    /// (kubelet probes), as the NetworkPolicy documentation requires.
    pub host_ips: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// IPv4 pod IPs; host-network pods are left out by `source` (they are the node).
    pub ips: Vec<Ipv4Addr>,
    pub node: String,
    /// Container ports that have a name, for rules that name their port.
    pub named_ports: Vec<NamedPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic to the selected pod.
    Ingress,
    /// Traffic from the selected pod.
    Egress,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    /// Selects pods in `namespace`; an empty selector selects all of them.
    pub pod_selector: LabelSelector,
    /// Already defaulted: Ingress always, Egress when egress rules exist, unless the
    /// object says otherwise.
    pub policy_types: Vec<Direction>,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// One ingress or egress rule. Empty `ports` = all ports and protocols; empty `peers` =
/// every source/destination (any IP, in or out of the cluster).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub ports: Vec<PortRule>,
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    pub protocol: Protocol,
    /// None = every port of `protocol`.
    pub port: Option<PortRef>,
    /// Only with a numeric `port`: the range `port..=end_port`.
    pub end_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    /// A container port name, resolved against the pod the traffic goes **to**
    /// (the selected pod for ingress, the peer for egress).
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`. `None` means the field was absent:
    /// only `pod_selector` → pods in the policy's namespace; only `namespace_selector` →
    /// all pods in the selected namespaces; both → the selected pods in the selected
    /// namespaces.
    Pods {
        pod_selector: Option<LabelSelector>,
        namespace_selector: Option<LabelSelector>,
    },
    IpBlock(IpBlock),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// Host bits are zero (the constructor of whoever parses masks them).
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOp,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Identity numbers. 0 never names an identity: in a policy entry's `peer` it means
/// "any peer".
pub type Identity = u32;
pub const ANY_PEER: Identity = 0;

/// What the loader writes into the kernel. Identities are stable across compiles for the
/// same identity key, so writing a new `Compiled` over an old one changes few entries.
///
/// Map layouts (C in `bpf/policy.c`, Rust mirrors in the loader):
///
/// - `ks_ipcache` (LPM trie): `{prefixlen u32, addr be32}` → `{identity u32, flags u32}`.
///   Always holds `0.0.0.0/0`, so every address has an identity.
/// - `ks_isolation` (hash): `identity u32` → `{ingress u8, egress u8, pad u16}`: the pods of
///   this identity are selected by some policy of that type. Absent = not isolated.
/// - `ks_policy` (LPM trie, 96 bits after `prefixlen`):
///   `{prefixlen u32, local_id u32, peer_id u32, direction u8 (1 ingress, 2 egress),
///   proto u8, port be16}` → `{flags u32}` (bit 0 = allow). `prefixlen` 72 = any protocol
///   and port; 80 = any port of `proto`; 96 − k = a block of 2^k ports. The programs look up
///   the real peer identity first and then `ANY_PEER`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub identities: BTreeMap<Identity, IdentityInfo>,
    /// Sorted, no duplicate prefixes.
    pub ipcache: Vec<(Cidr, Identity)>,
    pub isolation: BTreeMap<Identity, Isolation>,
    /// Sorted, deduplicated.
    pub entries: Vec<PolicyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub kind: IdentityKind,
    /// For pods: namespace/name of the pods that have it (for flow output).
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentityKind {
    /// Pods with these labels in this namespace (plus whatever else makes policies
    /// treat them differently, e.g. which ipBlocks their IPs fall in).
    Pod { namespace: String, labels: BTreeMap<String, String> },
    /// One of this node's addresses.
    Host,
    /// Addresses outside the cluster's pods, per distinct set of ipBlocks they fall in.
    World { cidr: Cidr },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Isolation {
    pub ingress: bool,
    pub egress: bool,
}

/// One allow entry of `ks_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    pub local: Identity,
    /// `ANY_PEER` = every peer.
    pub peer: Identity,
    pub direction: Direction,
    /// None = every protocol (and every port).
    pub protocol: Option<Protocol>,
    /// First port of the block (ignored when `protocol` is None).
    pub port: u16,
    /// The block is `port .. port + 2^port_wildcard_bits`; 16 = every port.
    pub port_wildcard_bits: u8,
}
