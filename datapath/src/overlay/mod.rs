//! kubeshift's own overlay: a kernel VXLAN device on a UDP port and VNI distinct from
//! the legacy network's (Flannel: 8472 / VNI 1), plus, for every other node that has a
//! kubeshift range, a route to that range via the node's gateway address, a permanent
//! neighbour for that gateway and an FDB entry sending its MAC to the node's IP.
//!
//! Reconciling is pure where it can be: [`wanted`] computes the routes, neighbours and
//! FDB entries from the Nodes and the IPAM ranges, [`diff`] compares them with what the
//! kernel has (read by [`kernel`]), and only the difference is applied. Running it again
//! with nothing changed does nothing, which makes agent restarts harmless.
//!
//! VTEP MACs are derived from the node IP ([`vtep_mac`]) instead of published as a Node
//! annotation: every agent already watches the Nodes' InternalIPs, so it can compute any
//! peer's MAC without an extra API write per node (and without `nodes/patch` in the
//! agent's RBAC), and a restarted node gets the same MAC, so peers' entries stay valid.

pub mod bridge;
pub mod ipam;
pub mod kernel;

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

pub const DEFAULT_DEVICE: &str = "kubeshift.vx";
/// Not Flannel's VNI 1 (nor Calico's VXLAN VNI 4096).
pub const DEFAULT_VNI: u32 = 2;
/// Not 8472 (Flannel's and Calico's VXLAN port, the kernel's legacy default) nor 4789
/// (IANA's, which Calico may use): both networks run side by side on one node.
pub const DEFAULT_PORT: u16 = 8473;
pub const DEFAULT_POD_CIDR: &str = "10.200.0.0/16";
pub const DEFAULT_NODE_PREFIX: u8 = 24;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The legacy networks' VXLAN: never ours.
pub const LEGACY_PORT: u16 = 8472;
pub const LEGACY_VNI: u32 = 1;

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }
    pub fn network(&self) -> Ipv4Addr {
        (u32::from(self.addr) & self.mask()).into()
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
    pub fn contains_cidr(&self, o: &Cidr) -> bool {
        o.len >= self.len && self.contains(o.network())
    }
    pub fn overlaps(&self, o: &Cidr) -> bool {
        self.contains_cidr(o) || o.contains_cidr(self)
    }
    /// The range's first usable address: the node's gateway (the overlay device's own).
    pub fn first(&self) -> Ipv4Addr {
        (u32::from(self.network()) + 1).into()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (a, l) = s.split_once('/').with_context(|| format!("{s:?} is not a CIDR (ADDRESS/LENGTH)"))?;
        let addr: Ipv4Addr = a.parse().with_context(|| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let len: u8 = l.parse().ok().filter(|l| *l <= 32).with_context(|| format!("{s:?}: bad prefix length {l:?}"))?;
        let c = Cidr { addr, len };
        if c.network() != addr {
            bail!("{s:?}: host bits set (the network is {c})");
        }
        Ok(c)
    }
}

/// The overlay's settings (flags of `kubeshift agent`).
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    pub node: String,
    pub device: String,
    pub vni: u32,
    pub port: u16,
    pub pod_cidr: Cidr,
    pub node_prefix: u8,
    /// The legacy network's MTU: ours never exceeds it (a pod on either network must
    /// be able to send a full-size packet to the other).
    pub legacy_mtu: Option<u32>,
}

impl OverlayConfig {
    pub fn new(node: &str) -> Self {
        OverlayConfig {
            node: node.to_string(),
            device: DEFAULT_DEVICE.into(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            pod_cidr: DEFAULT_POD_CIDR.parse().expect("the default pod CIDR parses"),
            node_prefix: DEFAULT_NODE_PREFIX,
            legacy_mtu: None,
        }
    }

    /// Refuses settings that would collide with the legacy network's VXLAN.
    pub fn check(&self) -> Result<()> {
        if self.port == LEGACY_PORT {
            bail!(
                "--tunnel-port {}: that is the legacy network's VXLAN port; kubeshift's overlay needs its own",
                self.port
            );
        }
        if self.vni == LEGACY_VNI || self.vni == 0 || self.vni >= 1 << 24 {
            bail!("--vni {}: must be 2..16777215 (1 is Flannel's)", self.vni);
        }
        if self.device.is_empty() || self.device.len() > 15 {
            bail!("overlay device name {:?}: must be 1..15 characters", self.device);
        }
        Ok(())
    }

    /// The device MTU for an underlay of `underlay` bytes.
    pub fn mtu(&self, underlay: u32) -> u32 {
        let m = underlay.saturating_sub(VXLAN_OVERHEAD);
        self.legacy_mtu.map_or(m, |l| m.min(l))
    }
}

/// The VTEP MAC of the node whose underlay address is `ip`: locally administered
/// (0x0e), "ks" (6b:73), then the IP's last three bytes. Unique while the nodes'
/// addresses differ in their last three bytes (true within any /8 underlay).
pub fn vtep_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0e, 0x6b, 0x73, o[1], o[2], o[3]]
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// What the overlay device should (or does) carry: routes (range → gateway), permanent
/// neighbours (gateway → MAC) and FDB entries (MAC → node IP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    pub routes: BTreeMap<Cidr, Ipv4Addr>,
    pub neighbours: BTreeMap<Ipv4Addr, [u8; 6]>,
    pub fdb: BTreeMap<[u8; 6], Ipv4Addr>,
}

impl Forwarding {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty()
    }
}

/// A node as the overlay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
}

/// Every other node with both an InternalIP and a range. Nodes without one of the two
/// are left out (and named by [`missing`] for readiness).
pub fn wanted(me: &str, nodes: &[PeerNode], ranges: &BTreeMap<String, Cidr>) -> Forwarding {
    let mut f = Forwarding::default();
    for n in nodes.iter().filter(|n| n.name != me) {
        let (Some(ip), Some(range)) = (n.ip, ranges.get(&n.name)) else { continue };
        let mac = vtep_mac(ip);
        f.routes.insert(*range, range.first());
        f.neighbours.insert(range.first(), mac);
        f.fdb.insert(mac, ip);
    }
    f
}

/// Other nodes the overlay cannot reach yet, with why.
pub fn missing(me: &str, nodes: &[PeerNode], ranges: &BTreeMap<String, Cidr>) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.name != me && ranges.contains_key(&n.name) && n.ip.is_none())
        .map(|n| format!("overlay: node {} has a range but no InternalIP", n.name))
        .collect()
}

/// The changes that turn `have` into `want`: entries to add or replace (missing or
/// different) and entries to delete (present, not wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub set: Forwarding,
    pub delete: Forwarding,
}

pub fn diff(want: &Forwarding, have: &Forwarding) -> Changes {
    fn half<K: Ord + Clone, V: PartialEq + Clone>(
        want: &BTreeMap<K, V>,
        have: &BTreeMap<K, V>,
    ) -> (BTreeMap<K, V>, BTreeMap<K, V>) {
        let set = want.iter().filter(|(k, v)| have.get(k) != Some(v)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let del = have.iter().filter(|(k, _)| !want.contains_key(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        (set, del)
    }
    let (rs, rd) = half(&want.routes, &have.routes);
    let (ns, nd) = half(&want.neighbours, &have.neighbours);
    let (fs, fd) = half(&want.fdb, &have.fdb);
    Changes {
        set: Forwarding { routes: rs, neighbours: ns, fdb: fs },
        delete: Forwarding { routes: rd, neighbours: nd, fdb: fd },
    }
}

/// Names of the peers in `f` (for readiness: which nodes are programmed).
pub fn programmed_ranges(f: &Forwarding) -> BTreeSet<Cidr> {
    f.routes.keys().copied().collect()
}

pub mod standby;

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn node(n: &str, a: Option<&str>) -> PeerNode {
        PeerNode { name: n.into(), ip: a.map(ip) }
    }

    #[test]
    fn cidr_parses_prints_and_refuses_bad_input() {
        assert_eq!(c("10.200.3.0/24").to_string(), "10.200.3.0/24");
        assert_eq!(c("10.200.3.0/24").first(), ip("10.200.3.1"));
        assert!("10.200.3.1/24".parse::<Cidr>().unwrap_err().to_string().contains("host bits"));
        assert!("10.200.0.0".parse::<Cidr>().is_err());
        assert!("10.200.0.0/40".parse::<Cidr>().is_err());
        assert!(c("10.200.0.0/16").contains_cidr(&c("10.200.9.0/24")));
        assert!(!c("10.200.0.0/16").overlaps(&c("10.201.0.0/24")));
    }

    #[test]
    fn mac_is_derived_from_the_node_ip() {
        assert_eq!(fmt_mac(&vtep_mac(ip("172.18.0.12"))), "0e:6b:73:12:00:0c");
    }

    #[test]
    fn mtu_is_underlay_minus_overhead_capped_by_the_legacy() {
        let mut cfg = OverlayConfig::new("n1");
        assert_eq!(cfg.mtu(1500), 1450);
        cfg.legacy_mtu = Some(1400);
        assert_eq!(cfg.mtu(1500), 1400);
        cfg.legacy_mtu = Some(9000);
        assert_eq!(cfg.mtu(1500), 1450);
    }

    #[test]
    fn legacy_port_and_vni_are_refused() {
        let mut cfg = OverlayConfig::new("n1");
        cfg.check().unwrap();
        cfg.port = 8472;
        assert!(cfg.check().unwrap_err().to_string().contains("8472"));
        cfg.port = 8473;
        cfg.vni = 1;
        assert!(cfg.check().unwrap_err().to_string().contains("--vni 1"));
    }

    #[test]
    fn wanted_covers_every_other_node_with_an_ip_and_a_range() {
        let nodes = [
            node("n1", Some("172.18.0.11")),
            node("n2", Some("172.18.0.12")),
            node("n3", None),
            node("n4", Some("172.18.0.14")),
        ];
        let ranges: BTreeMap<String, Cidr> =
            [("n1", "10.200.0.0/24"), ("n2", "10.200.1.0/24"), ("n3", "10.200.2.0/24")]
                .iter()
                .map(|(n, r)| (n.to_string(), c(r)))
                .collect();
        let f = wanted("n1", &nodes, &ranges);
        assert_eq!(f.routes, [(c("10.200.1.0/24"), ip("10.200.1.1"))].into());
        assert_eq!(f.neighbours, [(ip("10.200.1.1"), vtep_mac(ip("172.18.0.12")))].into());
        assert_eq!(f.fdb, [(vtep_mac(ip("172.18.0.12")), ip("172.18.0.12"))].into());
        assert_eq!(missing("n1", &nodes, &ranges), vec!["overlay: node n3 has a range but no InternalIP".to_string()]);
    }

    /// Table: (what the kernel has, what is wanted) → what is set and deleted.
    #[test]
    fn diff_table() {
        let m2 = vtep_mac(ip("172.18.0.12"));
        let m3 = vtep_mac(ip("172.18.0.13"));
        let fw = |peers: &[(&str, &str, [u8; 6], &str)]| {
            let mut f = Forwarding::default();
            for (r, gw, mac, node) in peers {
                f.routes.insert(c(r), ip(gw));
                f.neighbours.insert(ip(gw), *mac);
                f.fdb.insert(*mac, ip(node));
            }
            f
        };
        let two = fw(&[
            ("10.200.1.0/24", "10.200.1.1", m2, "172.18.0.12"),
            ("10.200.2.0/24", "10.200.2.1", m3, "172.18.0.13"),
        ]);
        let only2 = fw(&[("10.200.1.0/24", "10.200.1.1", m2, "172.18.0.12")]);
        let only3 = fw(&[("10.200.2.0/24", "10.200.2.1", m3, "172.18.0.13")]);
        // Node 2's address changed: same MAC? No: the MAC follows the IP, so all three change.
        let moved = fw(&[
            ("10.200.1.0/24", "10.200.1.1", vtep_mac(ip("172.18.0.22")), "172.18.0.22"),
            ("10.200.2.0/24", "10.200.2.1", m3, "172.18.0.13"),
        ]);
        let cases: Vec<(&str, Forwarding, Forwarding, Forwarding, Forwarding)> = vec![
            ("empty kernel: everything set", Forwarding::default(), two.clone(), two.clone(), Forwarding::default()),
            ("in step: nothing", two.clone(), two.clone(), Forwarding::default(), Forwarding::default()),
            ("node removed: its entries deleted", two.clone(), only2.clone(), Forwarding::default(), only3.clone()),
            ("node added", only2.clone(), two.clone(), only3.clone(), Forwarding::default()),
            ("everything gone", two.clone(), Forwarding::default(), Forwarding::default(), two.clone()),
        ];
        for (name, have, want, set, del) in cases {
            let d = diff(&want, &have);
            assert_eq!(d.set, set, "{name}: set");
            assert_eq!(d.delete, del, "{name}: delete");
        }
        let d = diff(&moved, &two);
        assert_eq!(d.set.routes, BTreeMap::new(), "address change: the route (range → gateway) is unchanged");
        assert_eq!(d.set.neighbours.len(), 1, "address change: the gateway's MAC is replaced");
        assert_eq!(d.set.fdb.len(), 1);
        assert_eq!(d.delete.fdb, [(m2, ip("172.18.0.12"))].into(), "address change: the old MAC's FDB entry goes");
        assert!(d.delete.neighbours.is_empty(), "the gateway neighbour is replaced, not deleted");
    }
}
