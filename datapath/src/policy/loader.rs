//! Loads `bpf/policy.c`, attaches it to pods' host-side interfaces with tcx, pins
//! everything under `<pin_dir>/policy/`, and writes [`Compiled`] into the maps as a diff.
//!
//! Like the socket LB's [`crate::Datapath`], dropping the handle leaves the programs
//! attached and the maps pinned: the datapath keeps enforcing while the agent restarts.
//! [`PolicyDatapath::load`] on an existing pin dir reopens the maps, reads back what they
//! hold (so the next [`PolicyDatapath::apply`] writes only differences and removes what
//! a previous agent left that is no longer wanted), and swaps changed program code into
//! the existing links in place.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, RingBuf,
    },
    programs::{
        links::{FdLink, LinkOrder},
        tc::TcAttachOptions,
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};

use super::model::{Cidr, Compiled, Direction, Identity, Isolation, PolicyEntry};
use crate::loader_util::{ignore_not_found, in_netns, load_pinned, load_retrying, open_pinned, swap_if_different};
use crate::{sys, Error, Protocol};

const MAPS: [&str; 7] =
    ["ks_ipcache", "ks_isolation", "ks_policy", "ks_pol_ct", "ks_pol_frags", "ks_pol_config", "ks_pol_flows"];

/// The two programs and where each goes on the host-side interface.
const HOOKS: [Hook; 2] = [
    Hook {
        program: "ks_pol_egress",
        attach: TcAttachType::Ingress,
        pin_prefix: "tcx-ingress",
        kernel_attach_type: BPF_TCX_INGRESS,
    },
    Hook {
        program: "ks_pol_ingress",
        attach: TcAttachType::Egress,
        pin_prefix: "tcx-egress",
        kernel_attach_type: BPF_TCX_EGRESS,
    },
];

const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

struct Hook {
    program: &'static str,
    attach: TcAttachType,
    /// Link pins are `<pin_prefix>:<ifname>` (':' cannot occur in an interface name;
    /// '.' can, but bpffs refuses it in pin names, so it is escaped).
    pin_prefix: &'static str,
    kernel_attach_type: u32,
}

const DIR_INGRESS: u8 = 1;
const DIR_EGRESS: u8 = 2;
const POLICY_F_ALLOW: u32 = 0x1;
const CFG_F_NO_FLOW_EVENTS: u32 = 0x1;

// Byte-for-byte mirrors of the structs in bpf/policy.c (without the LPM prefixlen, which
// aya's `Key` adds in front).

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct IpcacheVal {
    identity: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct IsolationVal {
    ingress: u8,
    egress: u8,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PolicyKeyData {
    local_id: u32,
    peer_id: u32,
    direction: u8,
    proto: u8,
    /// Network order.
    port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PolicyVal {
    flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CtKey {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    direction: u8,
    pad: u16,
    ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CtVal {
    created_ns: u64,
    gen: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FragKey {
    saddr: u32,
    daddr: u32,
    id: u16,
    proto: u8,
    direction: u8,
    ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FragVal {
    sport: u16,
    dport: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PolConfig {
    flags: u32,
    gen: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PolFlowRaw {
    ts_ns: u64,
    saddr: u32,
    daddr: u32,
    src_id: u32,
    dst_id: u32,
    ifindex: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    verdict: u8,
    reason: u8,
    direction: u8,
    ct_state: u8,
    pad: [u8; 3],
}

// SAFETY: repr(C), Copy, integers only, explicit padding so every byte is initialised.
unsafe impl aya::Pod for IpcacheVal {}
unsafe impl aya::Pod for IsolationVal {}
unsafe impl aya::Pod for PolicyKeyData {}
unsafe impl aya::Pod for PolicyVal {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtVal {}
unsafe impl aya::Pod for FragKey {}
unsafe impl aya::Pod for FragVal {}
unsafe impl aya::Pod for PolConfig {}

const _: () = assert!(std::mem::size_of::<Key<u32>>() == 8);
const _: () = assert!(std::mem::size_of::<Key<PolicyKeyData>>() == 16);
const _: () = assert!(std::mem::size_of::<IsolationVal>() == 4);
const _: () = assert!(std::mem::size_of::<CtKey>() == 20);
const _: () = assert!(std::mem::size_of::<CtVal>() == 16);
const _: () = assert!(std::mem::size_of::<FragKey>() == 16);
const _: () = assert!(std::mem::size_of::<PolConfig>() == 8);
const _: () = assert!(std::mem::size_of::<PolFlowRaw>() == 40);

/// What one [`PolicyDatapath::apply`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub ipcache_written: usize,
    pub ipcache_removed: usize,
    pub isolation_written: usize,
    pub isolation_removed: usize,
    pub policy_written: usize,
    pub policy_removed: usize,
}

impl ApplyStats {
    /// Map writes and deletes in total; 0 when the maps already held the input.
    pub fn changes(&self) -> usize {
        self.ipcache_written
            + self.ipcache_removed
            + self.isolation_written
            + self.isolation_removed
            + self.policy_written
            + self.policy_removed
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyVerdict {
    Forwarded,
    Dropped,
    Unknown(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    PolicyDeniedIngress,
    PolicyDeniedEgress,
    /// IPv6 (other than neighbour discovery) or another non-IPv4, non-ARP ethertype.
    UnsupportedL3,
    /// Too short to hold the headers it claims.
    Malformed,
    Unknown(u8),
}

/// Where the packet stood in its connection when it was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtState {
    /// No entry: the first packet of a flow in this direction.
    New,
    /// An entry existed but was checked under an older policy and is denied now.
    Established,
    Reply,
    /// Not an IPv4 packet (dropped before tracking).
    None,
    Unknown(u8),
}

/// One policy decision as the tc programs report it: every drop, and every new
/// connection allowed (not every packet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFlowEvent {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns).
    pub timestamp_ns: u64,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// 0 for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP …).
    pub ip_proto: u8,
    pub src_identity: Identity,
    pub dst_identity: Identity,
    pub verdict: PolicyVerdict,
    pub drop_reason: Option<DropReason>,
    /// From the pod's point of view: Ingress = to the pod, Egress = from it.
    pub direction: Option<Direction>,
    /// The host-side interface (in the netns it lives in).
    pub ifindex: u32,
    pub ct_state: CtState,
}

impl PolicyFlowEvent {
    pub fn protocol(&self) -> Option<Protocol> {
        Protocol::from_number(self.ip_proto)
    }
}

fn dir_number(d: Direction) -> u8 {
    match d {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

fn ip_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The `ks_policy` key of one entry, normalised so that equal meaning gives equal keys
/// (what the mirror compares).
fn policy_key(e: &PolicyEntry) -> Result<(u32, PolicyKeyData), Error> {
    let mut data =
        PolicyKeyData { local_id: e.local, peer_id: e.peer, direction: dir_number(e.direction), proto: 0, port: 0 };
    let prefix = match e.protocol {
        None => 72,
        Some(p) => {
            data.proto = p.number();
            let bits = u32::from(e.port_wildcard_bits);
            if bits > 16 {
                return Err(Error::Invalid(format!("policy entry {e:?}: port_wildcard_bits {bits} > 16")));
            }
            let mask = if bits == 16 { 0 } else { u16::MAX << bits };
            if e.port & !mask != 0 {
                return Err(Error::Invalid(format!(
                    "policy entry {e:?}: port {} is not aligned to a block of 2^{bits} ports",
                    e.port
                )));
            }
            data.port = (e.port & mask).to_be();
            96 - bits
        }
    };
    Ok((prefix, data))
}

/// NetworkPolicy tc programs and their maps for one node.
///
/// Dropping it leaves everything attached and pinned; see
/// [`PolicyDatapath::detach_and_unpin`].
pub struct PolicyDatapath {
    root: PathBuf,
    pin_dir: PathBuf,
    reopened: bool,
    upgraded: usize,
    ebpf: Ebpf,
    ipcache: LpmTrie<MapData, u32, IpcacheVal>,
    isolation: HashMap<MapData, u32, IsolationVal>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyVal>,
    config: Array<MapData, PolConfig>,
    flows: RingBuf<MapData>,
    // What the maps hold, read back on load, so apply() computes a diff without
    // scanning the kernel's maps each time.
    m_ipcache: BTreeMap<Cidr, Identity>,
    m_isolation: BTreeMap<Identity, Isolation>,
    m_policy: BTreeSet<(u32, PolicyKeyData)>,
}

impl PolicyDatapath {
    /// Loads the programs and opens (or creates and pins) the maps under
    /// `<pin_dir>/policy/maps`. Links already pinned under `<pin_dir>/policy/links` stay
    /// attached; one whose program code differs from this build's is switched to it in
    /// place (BPF_LINK_UPDATE), so an agent upgrade never leaves an interface without
    /// enforcement.
    pub fn load(pin_dir: impl AsRef<Path>) -> Result<Self, Error> {
        Self::load_object(pin_dir, crate::POLICY_OBJ)
    }

    #[doc(hidden)]
    pub fn load_object(pin_dir: impl AsRef<Path>, obj: &[u8]) -> Result<Self, Error> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        sys::ensure_bpffs(&pin_dir)?;
        let root = pin_dir.join("policy");
        let maps_dir = root.join("maps");
        let links_dir = root.join("links");
        fs::create_dir_all(&maps_dir)?;
        fs::create_dir_all(&links_dir)?;
        let all_maps = MAPS.iter().all(|m| maps_dir.join(m).exists());
        let link_pins = Self::link_pins(&links_dir)?;
        let reopened = all_maps && !link_pins.is_empty();

        let mut ebpf = load_pinned(obj, &maps_dir, &MAPS)?;
        let open = |name: &str| open_pinned(&maps_dir, name);
        // try_into checks key and value sizes: pins of an incompatible build are refused
        // before anything attached is touched.
        let ipcache: LpmTrie<MapData, u32, IpcacheVal> = open("ks_ipcache")?.try_into()?;
        let isolation: HashMap<MapData, u32, IsolationVal> = open("ks_isolation")?.try_into()?;
        let policy: LpmTrie<MapData, PolicyKeyData, PolicyVal> = open("ks_policy")?.try_into()?;
        let _: HashMap<MapData, CtKey, CtVal> = open("ks_pol_ct")?.try_into()?;
        let _: HashMap<MapData, FragKey, FragVal> = open("ks_pol_frags")?.try_into()?;
        let config: Array<MapData, PolConfig> = open("ks_pol_config")?.try_into()?;
        let flows: RingBuf<MapData> = open("ks_pol_flows")?.try_into()?;

        for h in &HOOKS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(h.program)
                .ok_or_else(|| Error::Invalid(format!("program {} missing from object", h.program)))?
                .try_into()?;
            load_retrying(|| prog.load())?;
        }

        let mut upgraded = 0;
        for (_, hook, pin) in &link_pins {
            let prog: &SchedClassifier = ebpf.program(HOOKS[*hook].program).expect("loaded above").try_into()?;
            if swap_if_different(prog, pin, !all_maps)? {
                upgraded += 1;
            }
        }

        let mut m_ipcache = BTreeMap::new();
        for item in ipcache.iter() {
            let (k, v) = item?;
            let addr = Ipv4Addr::from(k.data().to_ne_bytes());
            m_ipcache.insert(Cidr { addr, prefix: k.prefix_len() as u8 }, v.identity);
        }
        let mut m_isolation = BTreeMap::new();
        for item in isolation.iter() {
            let (k, v) = item?;
            m_isolation.insert(k, Isolation { ingress: v.ingress != 0, egress: v.egress != 0 });
        }
        let mut m_policy = BTreeSet::new();
        for item in policy.iter() {
            let (k, _) = item?;
            m_policy.insert((k.prefix_len(), k.data()));
        }

        Ok(Self {
            root,
            pin_dir,
            reopened,
            upgraded,
            ebpf,
            ipcache,
            isolation,
            policy,
            config,
            flows,
            m_ipcache,
            m_isolation,
            m_policy,
        })
    }

    /// `(ifname, hook index, pin path)` of every link pin.
    fn link_pins(links_dir: &Path) -> Result<Vec<(String, usize, PathBuf)>, Error> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(links_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for entry in rd {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((prefix, encoded)) = name.split_once(':') else {
                continue;
            };
            if let Some(i) = HOOKS.iter().position(|h| h.pin_prefix == prefix) {
                out.push((decode_ifname(encoded), i, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// True when `load` found maps and links of an earlier run and only reopened them.
    pub fn reopened(&self) -> bool {
        self.reopened
    }

    /// How many attached programs `load` replaced in place (different code).
    pub fn upgraded_programs(&self) -> usize {
        self.upgraded
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Interfaces with at least one pinned link, sorted.
    pub fn interfaces(&self) -> Result<Vec<String>, Error> {
        let mut v: Vec<String> = Self::link_pins(&self.root.join("links"))?.into_iter().map(|(i, _, _)| i).collect();
        v.dedup();
        Ok(v)
    }

    fn link_pin(&self, ifname: &str, hook: &Hook) -> Result<PathBuf, Error> {
        if ifname.is_empty()
            || ifname.len() > 15
            || ifname.contains(['/', ':', '\0'])
            || ifname.contains(char::is_whitespace)
        {
            return Err(Error::Invalid(format!("interface name {ifname:?} is not valid")));
        }
        Ok(self.root.join("links").join(format!("{}:{}", hook.pin_prefix, encode_ifname(ifname))))
    }

    /// Attaches both programs to `ifname` (tcx ingress: the pod's egress policy; tcx
    /// egress: its ingress policy) in the **calling thread's** network namespace and pins
    /// the links. Returns how many links were created: 0 when both were already attached
    /// to this interface (a link pinned for an interface that has since gone or been
    /// recreated is replaced).
    pub fn attach(&mut self, ifname: &str) -> Result<usize, Error> {
        let ifindex = ifindex_of(ifname).map_err(|e| Error::Invalid(format!("interface {ifname}: {e}")))?;
        let mut created = 0;
        for hook in &HOOKS {
            let pin = self.link_pin(ifname, hook)?;
            if pin.exists() {
                let fd = sys::bpf_obj_get(&pin)?;
                let (at_if, at_type) = tcx_link_target(fd.as_fd())?;
                if at_if == ifindex && at_type == hook.kernel_attach_type {
                    continue;
                }
                fs::remove_file(&pin)?;
            }
            let prog: &mut SchedClassifier =
                self.ebpf.program_mut(hook.program).expect("loaded in load()").try_into()?;
            // Last in the tcx chain, and the programs return TCX_NEXT for what they
            // allow, so whatever else is attached (a CNI's programs) still runs.
            let id = prog.attach_with_options(ifname, hook.attach, TcAttachOptions::TcxOrder(LinkOrder::default()))?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| Error::Invalid(e.to_string()))?;
            link.pin(&pin)?;
            created += 1;
        }
        Ok(created)
    }

    /// [`PolicyDatapath::attach`] from inside the network namespace at `netns` (e.g.
    /// `/run/netns/<name>` or `/proc/<pid>/ns/net`). Only a helper thread switches
    /// namespace, so the caller and its mount namespace (bpffs) are untouched.
    pub fn attach_in_netns(&mut self, netns: &Path, ifname: &str) -> Result<usize, Error> {
        in_netns(netns, || self.attach(ifname))
    }

    /// Detaches both links of `ifname` and removes their pins. Returns how many were
    /// there.
    pub fn detach(&mut self, ifname: &str) -> Result<usize, Error> {
        let mut n = 0;
        for hook in &HOOKS {
            let pin = self.link_pin(ifname, hook)?;
            if detach_pinned_link(&pin)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Writes `c` into the maps, touching only entries that differ from what they hold.
    /// Allow entries go in before isolation is switched on and come out after stale
    /// isolation is gone, so an update does not drop traffic that both the old and new
    /// policy allow. Then the policy generation is bumped: tracked connections are
    /// checked again on their next packet, so verdicts follow the new policy also for
    /// flows that were already established.
    pub fn apply(&mut self, c: &Compiled) -> Result<ApplyStats, Error> {
        let mut st = ApplyStats::default();

        let mut want_policy = BTreeSet::new();
        for e in &c.entries {
            want_policy.insert(policy_key(e)?);
        }
        let mut want_ipcache = BTreeMap::new();
        for (cidr, id) in &c.ipcache {
            if cidr.prefix > 32 {
                return Err(Error::Invalid(format!(
                    "ipcache entry {}/{}: prefix longer than 32",
                    cidr.addr, cidr.prefix
                )));
            }
            let cidr = &Cidr { addr: mask(cidr), prefix: cidr.prefix };
            if let Some(prev) = want_ipcache.insert(*cidr, *id) {
                if prev != *id {
                    return Err(Error::Invalid(format!(
                        "ipcache entry {}/{} given twice (identities {prev} and {id})",
                        cidr.addr, cidr.prefix
                    )));
                }
            }
        }

        for k in want_policy.difference(&self.m_policy).copied().collect::<Vec<_>>() {
            self.policy.insert(&Key::new(k.0, k.1), PolicyVal { flags: POLICY_F_ALLOW }, 0)?;
            self.m_policy.insert(k);
            st.policy_written += 1;
        }
        for (cidr, id) in &want_ipcache {
            if self.m_ipcache.get(cidr) == Some(id) {
                continue;
            }
            let key = Key::new(u32::from(cidr.prefix), ip_be(mask(cidr)));
            self.ipcache.insert(&key, IpcacheVal { identity: *id, flags: 0 }, 0)?;
            self.m_ipcache.insert(*cidr, *id);
            st.ipcache_written += 1;
        }
        for (id, iso) in &c.isolation {
            if self.m_isolation.get(id) == Some(iso) {
                continue;
            }
            self.isolation.insert(
                id,
                IsolationVal { ingress: iso.ingress.into(), egress: iso.egress.into(), pad: 0 },
                0,
            )?;
            self.m_isolation.insert(*id, *iso);
            st.isolation_written += 1;
        }
        let stale_iso: Vec<Identity> =
            self.m_isolation.keys().filter(|id| !c.isolation.contains_key(id)).copied().collect();
        for id in stale_iso {
            ignore_not_found(self.isolation.remove(&id))?;
            self.m_isolation.remove(&id);
            st.isolation_removed += 1;
        }
        let stale_policy: Vec<_> = self.m_policy.difference(&want_policy).copied().collect();
        for k in stale_policy {
            ignore_not_found(self.policy.remove(&Key::new(k.0, k.1)))?;
            self.m_policy.remove(&k);
            st.policy_removed += 1;
        }
        let stale_ip: Vec<Cidr> = self.m_ipcache.keys().filter(|c| !want_ipcache.contains_key(c)).copied().collect();
        for cidr in stale_ip {
            let key = Key::new(u32::from(cidr.prefix), ip_be(mask(&cidr)));
            ignore_not_found(self.ipcache.remove(&key))?;
            self.m_ipcache.remove(&cidr);
            st.ipcache_removed += 1;
        }
        if st.changes() > 0 {
            let mut cfg = self.config.get(&0, 0)?;
            cfg.gen = cfg.gen.wrapping_add(1);
            self.config.set(0, cfg, 0)?;
        }
        Ok(st)
    }

    /// What the maps hold, as a [`Compiled`] without identity descriptions (entries in
    /// their normalised form). For reconciling and for tests.
    pub fn programmed(&self) -> Compiled {
        let entries = self
            .m_policy
            .iter()
            .map(|(prefix, d)| {
                let direction = if d.direction == DIR_INGRESS { Direction::Ingress } else { Direction::Egress };
                let protocol = if *prefix == 72 { None } else { Protocol::from_number(d.proto) };
                PolicyEntry {
                    local: d.local_id,
                    peer: d.peer_id,
                    direction,
                    protocol,
                    port: u16::from_be(d.port),
                    port_wildcard_bits: if protocol.is_none() { 16 } else { (96 - *prefix) as u8 },
                }
            })
            .collect();
        Compiled {
            identities: BTreeMap::new(),
            ipcache: self.m_ipcache.iter().map(|(c, i)| (*c, *i)).collect(),
            isolation: self.m_isolation.clone(),
            entries,
        }
    }

    /// The policy generation (bumped by every `apply` that changed something).
    pub fn generation(&self) -> Result<u32, Error> {
        Ok(self.config.get(&0, 0)?.gen)
    }

    /// Turns flow events on or off (on after a fresh load).
    pub fn set_flow_events(&mut self, on: bool) -> Result<(), Error> {
        let mut cfg = self.config.get(&0, 0)?;
        if on {
            cfg.flags &= !CFG_F_NO_FLOW_EVENTS;
        } else {
            cfg.flags |= CFG_F_NO_FLOW_EVENTS;
        }
        self.config.set(0, cfg, 0)?;
        Ok(())
    }

    /// The ring buffer's fd: readable when events arrive, for epoll/AsyncFd.
    pub fn flows_fd(&self) -> BorrowedFd<'_> {
        self.flows.as_fd()
    }

    /// Drains the flow events currently in the ring buffer (non-blocking).
    pub fn read_flows(&mut self) -> Vec<PolicyFlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.flows.next() {
            if item.len() < std::mem::size_of::<PolFlowRaw>() {
                continue;
            }
            // SAFETY: length checked; read unaligned since the ring only aligns to 8.
            let r: PolFlowRaw = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const PolFlowRaw) };
            out.push(PolicyFlowEvent {
                timestamp_ns: r.ts_ns,
                src: Ipv4Addr::from(r.saddr.to_ne_bytes()),
                dst: Ipv4Addr::from(r.daddr.to_ne_bytes()),
                src_port: u16::from_be(r.sport),
                dst_port: u16::from_be(r.dport),
                ip_proto: r.proto,
                src_identity: r.src_id,
                dst_identity: r.dst_id,
                verdict: match r.verdict {
                    1 => PolicyVerdict::Forwarded,
                    2 => PolicyVerdict::Dropped,
                    v => PolicyVerdict::Unknown(v),
                },
                drop_reason: match r.reason {
                    0 => None,
                    1 => Some(DropReason::PolicyDeniedIngress),
                    2 => Some(DropReason::PolicyDeniedEgress),
                    3 => Some(DropReason::UnsupportedL3),
                    4 => Some(DropReason::Malformed),
                    v => Some(DropReason::Unknown(v)),
                },
                direction: match r.direction {
                    DIR_INGRESS => Some(Direction::Ingress),
                    DIR_EGRESS => Some(Direction::Egress),
                    _ => None,
                },
                ifindex: r.ifindex,
                ct_state: match r.ct_state {
                    0 => CtState::None,
                    1 => CtState::New,
                    2 => CtState::Established,
                    3 => CtState::Reply,
                    v => CtState::Unknown(v),
                },
            });
        }
        out
    }

    /// Detaches every interface and removes all pins of the policy datapath.
    pub fn detach_and_unpin(self) -> Result<(), Error> {
        let dir = self.pin_dir.clone();
        drop(self);
        Self::purge(&dir)
    }

    /// Removes `<pin_dir>/policy` left by a datapath nobody holds a handle on (a crashed
    /// agent, a rollback): unpinning the links detaches them, unpinning the maps frees
    /// them. Empty parent directories go too, up to the bpffs root's child, like
    /// [`crate::Datapath::purge`].
    pub fn purge(pin_dir: &Path) -> Result<(), Error> {
        let root = pin_dir.join("policy");
        for d in ["links", "maps"] {
            let dir = root.join(d);
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for entry in rd {
                let p = entry?.path();
                if d == "links" {
                    detach_pinned_link(&p)?;
                    continue;
                }
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        match fs::remove_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(parent) = pin_dir.parent() {
            sys::remove_empty_dirs(pin_dir, parent.parent().unwrap_or(parent));
        }
        Ok(())
    }
}

/// Detaches the link pinned at `pin` right away, then removes the pin. Unpinning alone
/// would detach too, but only when the kernel gets round to freeing the link (deferred
/// work), so traffic could still meet the program for a moment after `detach` returned.
/// Returns false if there was no pin.
fn detach_pinned_link(pin: &Path) -> Result<bool, Error> {
    let fd = match sys::bpf_obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let r = sys::bpf_link_detach(fd.as_fd());
    // A link whose device is gone is already detached (ENOLINK/EINVAL): just unpin.
    if let Err(e) = r {
        if !matches!(e.raw_os_error(), Some(libc::ENOLINK) | Some(libc::EINVAL)) {
            return Err(Error::Invalid(format!("detach {}: {e}", pin.display())));
        }
    }
    match fs::remove_file(pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e.into()),
    }
}

fn encode_ifname(ifname: &str) -> String {
    ifname.replace('%', "%25").replace('.', "%2e")
}

fn decode_ifname(encoded: &str) -> String {
    encoded.replace("%2e", ".").replace("%25", "%")
}

fn mask(c: &Cidr) -> Ipv4Addr {
    let bits = u32::from(c.addr);
    let m = if c.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(c.prefix.min(32))) };
    Ipv4Addr::from(bits & m)
}

fn ifindex_of(ifname: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain libc call on a valid C string; uses the calling thread's netns.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i)
}

/// `(ifindex, attach_type)` of a tcx link (ifindex 0 once its device is gone). aya 0.14's
/// `LinkInfo` does not expose the tcx part of `struct bpf_link_info`.
fn tcx_link_target(link: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8 whose tcx
    // member is {ifindex u32, attach_type u32}. A larger zeroed buffer is accepted.
    let mut buf = [0u64; 32];
    let attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&buf) as u32,
        info: buf.as_mut_ptr() as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: attr and buf outlive the call; the kernel writes at most info_len bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFd,
            std::mem::size_of::<InfoByFd>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let ifindex = buf[2] as u32;
    let attach_type = (buf[2] >> 32) as u32;
    Ok((ifindex, attach_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(protocol: Option<Protocol>, port: u16, bits: u8) -> PolicyEntry {
        PolicyEntry { local: 5, peer: 7, direction: Direction::Ingress, protocol, port, port_wildcard_bits: bits }
    }

    #[test]
    fn policy_keys_are_bit_prefixes() {
        let (p, d) = policy_key(&entry(Some(Protocol::Tcp), 80, 0)).unwrap();
        assert_eq!((p, d.proto, d.port.to_ne_bytes()), (96, 6, [0, 80]));
        let (p, d) = policy_key(&entry(Some(Protocol::Udp), 0, 16)).unwrap();
        assert_eq!((p, d.proto, d.port), (80, 17, 0));
        let (p, d) = policy_key(&entry(None, 1234, 3)).unwrap();
        assert_eq!((p, d.proto, d.port), (72, 0, 0));
        let (p, d) = policy_key(&entry(Some(Protocol::Tcp), 1024, 10)).unwrap();
        assert_eq!((p, d.port.to_ne_bytes()), (86, [4, 0]));
        assert!(policy_key(&entry(Some(Protocol::Tcp), 81, 1)).is_err());
    }

    #[test]
    fn interface_names_survive_pin_names() {
        for n in ["eth0", "eth0.100", "a%2e.b", "%"] {
            let e = encode_ifname(n);
            assert!(!e.contains('.'), "{e}");
            assert_eq!(decode_ifname(&e), n);
        }
    }

    #[test]
    fn ipcache_keys_are_masked() {
        let c = Cidr { addr: Ipv4Addr::new(10, 1, 2, 3), prefix: 16 };
        assert_eq!(mask(&c), Ipv4Addr::new(10, 1, 0, 0));
        let c = Cidr { addr: Ipv4Addr::new(10, 1, 2, 3), prefix: 0 };
        assert_eq!(mask(&c), Ipv4Addr::UNSPECIFIED);
    }
}
