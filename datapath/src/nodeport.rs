//! Loader and map sync for `bpf/nodeport.c`: NodePort and external-IP load balancing for
//! traffic that arrives on the node's external interface.
//!
//! Everything lives under `<pin_dir>/nodeport/{maps,links}`, next to the socket load
//! balancer's `maps/` and `links/` in the same pin dir, so the programs keep forwarding
//! (and the connection-tracking table keeps its connections) while no agent runs.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs, io,
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf,
};

pub use crate::loader_util::in_netns;
use crate::loader_util::{
    ignore_not_found, is_not_found, load_pinned, load_retrying, open_pinned, remove_if_exists, swap_if_different,
};
use crate::{sys, Error, Protocol};

const MAPS: [&str; 6] =
    ["ks_np_frontends", "ks_np_backends", "ks_np_members", "ks_np_ct", "ks_np_config", "ks_np_flows"];
const INGRESS: &str = "ks_np_ingress";
const EGRESS: &str = "ks_np_egress";
const PROGRAMS: [&str; 2] = [INGRESS, EGRESS];

/// A frontend's backends occupy one of two slot ranges of this size (see `SLOT_HALF`).
pub const MAX_NP_BACKENDS: usize = 65_535;
const SLOT_HALF: u32 = 1 << 16;

/// Above Linux's default `ip_local_port_range` (32768–60999), so a translated connection
/// never takes the 4-tuple of a socket of the node's own.
pub const DEFAULT_SNAT_PORTS: RangeInclusive<u16> = 61_000..=65_535;

/// Byte-for-byte mirrors of the structs in `bpf/nodeport.c` (network byte order inside).
mod raw {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FeKey {
        pub ip: u32,
        pub port: u16,
        pub proto: u8,
        pub pad: u8,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FeVal {
        pub fe_id: u32,
        pub slot_base: u32,
        pub count: u16,
        pub flags: u8,
        pub pad: u8,
        /// Slots written; with externalTrafficPolicy Local the remote backends follow the
        /// `count` local ones, unused by the programs but kept so a restarted loader
        /// knows the whole endpoint set.
        pub total: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct BeKey {
        pub fe_id: u32,
        pub slot: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BeVal {
        pub ip: u32,
        pub port: u16,
        pub flags: u8,
        pub pad: u8,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct MemberKey {
        pub fe_id: u32,
        pub ip: u32,
        pub port: u16,
        pub pad: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CtKey {
        pub saddr: u32,
        pub daddr: u32,
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
        pub dir: u8,
        pub pad: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CtVal {
        pub last_seen_ns: u64,
        pub fe_id: u32,
        pub fe_ip: u32,
        pub backend_ip: u32,
        pub client_ip: u32,
        pub snat_ip: u32,
        pub fe_port: u16,
        pub backend_port: u16,
        pub client_port: u16,
        pub snat_port: u16,
        pub flags: u8,
        pub pad: [u8; 3],
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config {
        pub node_ip: u32,
        pub ifindex: u32,
        pub snat_min: u16,
        pub snat_max: u16,
        pub flags: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Flow {
        pub ts_ns: u64,
        pub saddr: u32,
        pub daddr: u32,
        pub backend_ip: u32,
        pub snat_ip: u32,
        pub sport: u16,
        pub dport: u16,
        pub backend_port: u16,
        pub snat_port: u16,
        pub fe_id: u32,
        pub proto: u8,
        pub verdict: u8,
        pub reason: u8,
        pub flags: u8,
        pub build: u8,
        pub pad: [u8; 7],
    }

    pub const FE_F_LOCAL_ONLY: u8 = 0x1;
    pub const BE_F_LOCAL: u8 = 0x1;
    pub const CT_FWD: u8 = 1;
    pub const CT_REV_LOCAL: u8 = 2;
    pub const CT_REV_SNAT: u8 = 3;
    pub const CT_F_SNAT: u8 = 0x1;
    pub const CT_F_CLOSING: u8 = 0x2;
    pub const CFG_F_NO_FLOW_EVENTS: u32 = 0x1;
    pub const FLOW_F_SNAT: u8 = 0x1;
    pub const FLOW_F_LOCAL: u8 = 0x2;

    // SAFETY: repr(C), Copy, integers only, explicit padding: every byte is initialised.
    unsafe impl aya::Pod for FeKey {}
    unsafe impl aya::Pod for FeVal {}
    unsafe impl aya::Pod for BeKey {}
    unsafe impl aya::Pod for BeVal {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtVal {}
    unsafe impl aya::Pod for Config {}

    const _: () = assert!(std::mem::size_of::<FeKey>() == 8);
    const _: () = assert!(std::mem::size_of::<FeVal>() == 16);
    const _: () = assert!(std::mem::size_of::<BeKey>() == 8);
    const _: () = assert!(std::mem::size_of::<BeVal>() == 8);
    const _: () = assert!(std::mem::size_of::<MemberKey>() == 12);
    const _: () = assert!(std::mem::size_of::<CtKey>() == 16);
    const _: () = assert!(std::mem::size_of::<CtVal>() == 40);
    const _: () = assert!(std::mem::size_of::<Config>() == 16);
    const _: () = assert!(std::mem::size_of::<Flow>() == 48);
}
use raw::*;

/// Where clients send NodePort / external-IP traffic: a node IP with a nodePort, an
/// `externalIPs` entry or a load balancer ingress IP with the service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One endpoint of a frontend; `local` when the pod runs on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NpBackend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub local: bool,
}

/// `spec.externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    /// Any endpoint; remote ones are reached with SNAT to the node IP.
    #[default]
    Cluster,
    /// Only endpoints on this node, client IP preserved; none: dropped.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpVerdict {
    /// A new connection was translated (or an established one re-picked its backend).
    Forwarded,
    Dropped,
    /// Answered with ICMP port unreachable (a frontend without endpoints).
    Rejected,
    Unknown(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpReason {
    NewConnection,
    NoBackends,
    /// externalTrafficPolicy Local and no endpoint on this node.
    NoLocalBackends,
    /// bpf_fib_lookup found no usable route to the remote backend.
    NoRoute,
    /// No free port in the SNAT range for this backend.
    SnatPortsExhausted,
    /// An established connection's backend was removed; a new one was picked.
    BackendGone,
    TtlExceeded,
    Unknown(u8),
}

/// One NodePort decision: a new connection or a drop. Established packets emit nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpFlowEvent {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns).
    pub timestamp_ns: u64,
    pub client: SocketAddrV4,
    /// The destination the client used, i.e. the frontend.
    pub frontend: SocketAddrV4,
    pub protocol: Option<Protocol>,
    pub backend: Option<SocketAddrV4>,
    /// The node address and port the backend saw instead of the client, when SNATed.
    pub snat: Option<SocketAddrV4>,
    pub backend_local: bool,
    pub verdict: NpVerdict,
    pub reason: NpReason,
    pub frontend_id: u32,
    /// KS_BUILD_ID of the program that emitted the event.
    pub program_build: u8,
}

/// One connection as the connection-tracking map holds it (the forward entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpConnection {
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub protocol: Option<Protocol>,
    pub backend: SocketAddrV4,
    pub snat: Option<SocketAddrV4>,
    /// A FIN or RST was seen (forward entry).
    pub closing: bool,
    /// The reply-direction entry is marked closing too (it holds the SNAT port); None
    /// when the LRU already evicted it.
    pub reverse_closing: Option<bool>,
}

#[derive(Debug, Clone)]
struct FrontendState {
    id: u32,
    slot_base: u32,
    /// In slot order: the eligible (`count`) ones first.
    backends: Vec<NpBackend>,
    count: usize,
    policy: TrafficPolicy,
}

/// A handle on the NodePort programs and their maps. Dropping it leaves them running.
pub struct NodePortDatapath {
    pin_dir: PathBuf,
    reopened: bool,
    upgraded: usize,
    ebpf: Ebpf,
    frontends: HashMap<MapData, FeKey, FeVal>,
    backends: HashMap<MapData, BeKey, BeVal>,
    members: HashMap<MapData, MemberKey, u32>,
    ct: HashMap<MapData, CtKey, CtVal>,
    config: Array<MapData, Config>,
    flows: RingBuf<MapData>,
    state: StdHashMap<Frontend, FrontendState>,
    next_id: u32,
}

fn ip_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn ip_from_raw(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

fn sock(ip: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip_from_raw(ip), u16::from_be(port))
}

fn fe_key_raw(f: &Frontend) -> FeKey {
    FeKey { ip: ip_raw(f.ip), port: f.port.to_be(), proto: f.protocol.number(), pad: 0 }
}

fn member_key(id: u32, b: &NpBackend) -> MemberKey {
    MemberKey { fe_id: id, ip: ip_raw(b.ip), port: b.port.to_be(), pad: 0 }
}

/// Slot order for a frontend: duplicates removed (they would skew the random pick), and
/// for externalTrafficPolicy Local the local endpoints first, since only the first
/// `count` slots are eligible. Returns the order and `count`.
fn slot_order(backends: &[NpBackend], policy: TrafficPolicy) -> (Vec<NpBackend>, usize) {
    let mut seen = HashSet::new();
    let unique: Vec<NpBackend> = backends.iter().copied().filter(|b| seen.insert((b.ip, b.port))).collect();
    match policy {
        TrafficPolicy::Cluster => {
            let n = unique.len();
            (unique, n)
        }
        TrafficPolicy::Local => {
            let (mut local, remote): (Vec<_>, Vec<_>) = unique.into_iter().partition(|b| b.local);
            let n = local.len();
            local.extend(remote);
            (local, n)
        }
    }
}

impl NodePortDatapath {
    /// Loads the NodePort programs and their maps pinned under `<pin_dir>/nodeport/`, or
    /// reopens the pins of an earlier run (frontends and connections survive). Running
    /// programs whose code differs from this build are swapped in place. Attaching is a
    /// separate step, [`NodePortDatapath::attach`].
    pub fn load(pin_dir: &Path) -> Result<Self, Error> {
        Self::load_object(pin_dir, crate::NODEPORT_OBJ)
    }

    pub fn load_object(pin_dir: &Path, obj: &[u8]) -> Result<Self, Error> {
        sys::ensure_bpffs(pin_dir)?;
        let root = pin_dir.join("nodeport");
        let maps_dir = root.join("maps");
        let links_dir = root.join("links");
        fs::create_dir_all(&maps_dir)?;
        fs::create_dir_all(&links_dir)?;
        let all_maps = MAPS.iter().all(|m| maps_dir.join(m).exists());
        let all_links = PROGRAMS.iter().all(|p| links_dir.join(p).exists());

        let mut ebpf = load_pinned(obj, &maps_dir, &MAPS)?;
        let open = |name: &str| open_pinned(&maps_dir, name);
        // try_into checks key and value sizes against pins of another build.
        let frontends: HashMap<MapData, FeKey, FeVal> = open("ks_np_frontends")?.try_into()?;
        let backends: HashMap<MapData, BeKey, BeVal> = open("ks_np_backends")?.try_into()?;
        let members: HashMap<MapData, MemberKey, u32> = open("ks_np_members")?.try_into()?;
        let ct: HashMap<MapData, CtKey, CtVal> = open("ks_np_ct")?.try_into()?;
        let config: Array<MapData, Config> = open("ks_np_config")?.try_into()?;
        let flows: RingBuf<MapData> = open("ks_np_flows")?.try_into()?;
        for p in PROGRAMS {
            let prog = program(&mut ebpf, p)?;
            load_retrying(|| prog.load())?;
        }

        let mut upgraded = 0;
        for p in PROGRAMS {
            let pin = links_dir.join(p);
            if pin.exists() && swap_if_different(program(&mut ebpf, p)?, &pin, !all_maps)? {
                upgraded += 1;
            }
        }

        let mut dp = Self {
            pin_dir: pin_dir.to_path_buf(),
            reopened: all_maps && all_links,
            upgraded,
            ebpf,
            frontends,
            backends,
            members,
            ct,
            config,
            flows,
            state: StdHashMap::new(),
            next_id: 1,
        };
        dp.rebuild_state()?;
        Ok(dp)
    }

    /// Reads the frontends back from the maps and removes slots and membership entries
    /// that no frontend points at (left by a loader that died mid-change).
    fn rebuild_state(&mut self) -> Result<(), Error> {
        let mut max_id = 0;
        for entry in self.frontends.iter() {
            let (k, v) = entry?;
            let Some(protocol) = Protocol::from_number(k.proto) else {
                continue;
            };
            let fe = Frontend { ip: ip_from_raw(k.ip), port: u16::from_be(k.port), protocol };
            let mut list = Vec::with_capacity(v.total as usize);
            for i in 0..v.total {
                let b = self.backends.get(&BeKey { fe_id: v.fe_id, slot: v.slot_base + i }, 0)?;
                list.push(NpBackend {
                    ip: ip_from_raw(b.ip),
                    port: u16::from_be(b.port),
                    local: b.flags & BE_F_LOCAL != 0,
                });
            }
            max_id = max_id.max(v.fe_id);
            self.state.insert(
                fe,
                FrontendState {
                    id: v.fe_id,
                    slot_base: v.slot_base,
                    backends: list,
                    count: usize::from(v.count),
                    policy: if v.flags & FE_F_LOCAL_ONLY != 0 { TrafficPolicy::Local } else { TrafficPolicy::Cluster },
                },
            );
        }
        // Ids are not reused while connections may still name them.
        self.next_id = max_id + 1;

        let live: StdHashMap<u32, &FrontendState> = self.state.values().map(|s| (s.id, s)).collect();
        let mut stale_slots = Vec::new();
        for k in self.backends.keys() {
            let k = k?;
            let used = live
                .get(&k.fe_id)
                .is_some_and(|s| k.slot >= s.slot_base && k.slot < s.slot_base + s.backends.len() as u32);
            if !used {
                stale_slots.push(k);
            }
        }
        let wanted: HashSet<MemberKey> =
            live.values().flat_map(|s| s.backends[..s.count].iter().map(|b| member_key(s.id, b))).collect();
        let mut stale_members = Vec::new();
        for k in self.members.keys() {
            let k = k?;
            if !wanted.contains(&k) {
                stale_members.push(k);
            }
        }
        for k in stale_slots {
            ignore_not_found(self.backends.remove(&k))?;
        }
        for k in stale_members {
            ignore_not_found(self.members.remove(&k))?;
        }
        Ok(())
    }

    /// True when everything (maps and links) was already pinned: an agent restart.
    pub fn reopened(&self) -> bool {
        self.reopened
    }

    /// Programs replaced in place by `load` (a different build was running).
    pub fn upgraded_programs(&self) -> usize {
        self.upgraded
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("nodeport").join("links")
    }

    /// Attaches ingress and egress to `ifname` in the calling thread's network namespace
    /// and makes `node_ip` the SNAT source. Idempotent: if this datapath is attached
    /// already to the same interface, only the node IP is (re)written.
    pub fn attach(&mut self, ifname: &str, node_ip: Ipv4Addr) -> Result<(), Error> {
        if node_ip.is_unspecified() {
            return Err(Error::Invalid(format!("node IP for {ifname}: 0.0.0.0 is not an address")));
        }
        let c = std::ffi::CString::new(ifname).map_err(|_| Error::Invalid(format!("interface name {ifname:?}")))?;
        // SAFETY: c is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            return Err(Error::Invalid(format!("interface {ifname:?}: {}", io::Error::last_os_error())));
        }
        let mut cfg = self.config.get(&0, 0)?;
        let links = self.links_dir();
        let pinned: Vec<bool> = PROGRAMS.iter().map(|p| links.join(p).exists()).collect();
        if pinned.iter().all(|p| *p) {
            if cfg.ifindex != 0 && cfg.ifindex != ifindex {
                return Err(Error::Invalid(format!(
                    "{}: attached to ifindex {} already, not {ifname} ({ifindex}); detach first",
                    self.pin_dir.display(),
                    cfg.ifindex
                )));
            }
        } else {
            for (p, attach_type, order) in [
                // Services first on the way in (a policy program after us sees the
                // backend), last on the way out (it sees the pod before we hide it).
                (INGRESS, TcAttachType::Ingress, LinkOrder::first()),
                (EGRESS, TcAttachType::Egress, LinkOrder::last()),
            ] {
                let pin = links.join(p);
                if pin.exists() {
                    continue;
                }
                let prog = program(&mut self.ebpf, p)?;
                let attached = prog
                    .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(order))
                    .and_then(|id| prog.take_link(id));
                let link = match attached {
                    Ok(l) => l,
                    Err(e) => {
                        // Half an attachment would DNAT without reverse NAT.
                        for q in PROGRAMS {
                            let _ = fs::remove_file(links.join(q));
                        }
                        return Err(Error::Invalid(format!("attaching {p} to {ifname}: {e}")));
                    }
                };
                let fd: FdLink =
                    link.try_into().map_err(|e: aya::programs::links::LinkError| Error::Invalid(e.to_string()))?;
                fd.pin(&pin)?;
            }
        }
        cfg.node_ip = ip_raw(node_ip);
        cfg.ifindex = ifindex;
        if cfg.snat_min == 0 && cfg.snat_max == 0 {
            cfg.snat_min = *DEFAULT_SNAT_PORTS.start();
            cfg.snat_max = *DEFAULT_SNAT_PORTS.end();
        }
        self.config.set(0, cfg, 0)?;
        Ok(())
    }

    /// [`NodePortDatapath::attach`] from inside the network namespace at `netns` (e.g.
    /// `/run/netns/<name>`), leaving the calling thread where it was.
    pub fn attach_in_netns(&mut self, netns: &Path, ifname: &str, node_ip: Ipv4Addr) -> Result<(), Error> {
        in_netns(netns, || self.attach(ifname, node_ip))
    }

    /// The node IP the programs SNAT to (None before the first attach).
    pub fn node_ip(&self) -> Result<Option<Ipv4Addr>, Error> {
        let c = self.config.get(&0, 0)?;
        Ok((c.node_ip != 0).then(|| ip_from_raw(c.node_ip)))
    }

    /// Source ports used for SNAT towards remote backends. Keep it clear of the node's
    /// `net.ipv4.ip_local_port_range`.
    pub fn set_snat_ports(&mut self, ports: RangeInclusive<u16>) -> Result<(), Error> {
        if ports.is_empty() || *ports.start() == 0 {
            return Err(Error::Invalid(format!("SNAT port range {ports:?} is empty")));
        }
        let mut c = self.config.get(&0, 0)?;
        c.snat_min = *ports.start();
        c.snat_max = *ports.end();
        self.config.set(0, c, 0)?;
        Ok(())
    }

    pub fn set_flow_events(&mut self, on: bool) -> Result<(), Error> {
        let mut c = self.config.get(&0, 0)?;
        if on {
            c.flags &= !CFG_F_NO_FLOW_EVENTS;
        } else {
            c.flags |= CFG_F_NO_FLOW_EVENTS;
        }
        self.config.set(0, c, 0)?;
        Ok(())
    }

    /// Creates or replaces one frontend. Only its entries are written: the new backend
    /// set goes to the unused half of its slot range, new (frontend, backend) pairs are
    /// marked live, the frontend entry flips to the new half in one update, then the old
    /// half and the pairs that left are deleted. Established connections to a backend
    /// that stays keep going; those to a removed one pick a new backend on their next
    /// packet.
    pub fn upsert_frontend(
        &mut self,
        fe: Frontend,
        backends: Vec<NpBackend>,
        policy: TrafficPolicy,
    ) -> Result<(), Error> {
        if fe.ip.is_unspecified() || fe.port == 0 {
            return Err(Error::Invalid(format!(
                "frontend {}:{} {:?}: address and port must be set",
                fe.ip, fe.port, fe.protocol
            )));
        }
        if backends.len() > MAX_NP_BACKENDS {
            return Err(Error::Invalid(format!(
                "{} backends for frontend {fe:?}, at most {MAX_NP_BACKENDS} supported",
                backends.len()
            )));
        }
        if let Some(b) = backends.iter().find(|b| b.ip.is_unspecified() || b.port == 0) {
            return Err(Error::Invalid(format!("frontend {fe:?}: backend {}:{} has no address or port", b.ip, b.port)));
        }
        let (ordered, count) = slot_order(&backends, policy);
        let old = self.state.get(&fe).cloned();
        if let Some(o) = &old {
            if o.backends == ordered && o.policy == policy {
                return Ok(());
            }
        }
        let id = old.as_ref().map_or(self.next_id, |o| o.id);
        let new_base = match old.as_ref().map(|o| o.slot_base) {
            Some(0) => SLOT_HALF,
            _ => 0,
        };
        let old_members: HashSet<MemberKey> =
            old.as_ref().map(|o| o.backends[..o.count].iter().map(|b| member_key(id, b)).collect()).unwrap_or_default();
        let new_members: Vec<MemberKey> = ordered[..count].iter().map(|b| member_key(id, b)).collect();

        let mut written = 0;
        let mut added = Vec::new();
        let result = (|| -> Result<(), Error> {
            for (i, b) in ordered.iter().enumerate() {
                let v = BeVal {
                    ip: ip_raw(b.ip),
                    port: b.port.to_be(),
                    flags: if b.local { BE_F_LOCAL } else { 0 },
                    pad: 0,
                };
                self.backends.insert(BeKey { fe_id: id, slot: new_base + i as u32 }, v, 0)?;
                written += 1;
            }
            for m in &new_members {
                if !old_members.contains(m) {
                    self.members.insert(*m, 1, 0)?;
                    added.push(*m);
                }
            }
            let val = FeVal {
                fe_id: id,
                slot_base: new_base,
                count: count as u16,
                flags: match policy {
                    TrafficPolicy::Local => FE_F_LOCAL_ONLY,
                    TrafficPolicy::Cluster => 0,
                },
                pad: 0,
                total: ordered.len() as u32,
            };
            self.frontends.insert(fe_key_raw(&fe), val, 0)?;
            Ok(())
        })();
        if let Err(e) = result {
            // The live half and the frontend entry are as before; undo what we added.
            for i in 0..written {
                let _ = self.backends.remove(&BeKey { fe_id: id, slot: new_base + i as u32 });
            }
            for m in added {
                let _ = self.members.remove(&m);
            }
            return Err(e);
        }
        if let Some(o) = &old {
            for i in 0..o.backends.len() {
                ignore_not_found(self.backends.remove(&BeKey { fe_id: id, slot: o.slot_base + i as u32 }))?;
            }
            let keep: HashSet<MemberKey> = new_members.iter().copied().collect();
            for m in old_members.difference(&keep) {
                ignore_not_found(self.members.remove(m))?;
            }
        } else {
            self.next_id += 1;
        }
        self.state.insert(fe, FrontendState { id, slot_base: new_base, backends: ordered, count, policy });
        Ok(())
    }

    /// Removes a frontend; its packets then pass untranslated. Returns false if absent.
    pub fn remove_frontend(&mut self, fe: &Frontend) -> Result<bool, Error> {
        let Some(s) = self.state.remove(fe) else {
            return Ok(false);
        };
        // Entry first, so no new connection lands on a half-deleted slot range.
        ignore_not_found(self.frontends.remove(&fe_key_raw(fe)))?;
        for i in 0..s.backends.len() {
            ignore_not_found(self.backends.remove(&BeKey { fe_id: s.id, slot: s.slot_base + i as u32 }))?;
        }
        for b in &s.backends[..s.count] {
            ignore_not_found(self.members.remove(&member_key(s.id, b)))?;
        }
        Ok(true)
    }

    /// What is programmed, sorted, for reconciling: each frontend with the backend set
    /// it was given (eligible ones first) and its policy.
    pub fn frontends(&self) -> Vec<(Frontend, Vec<NpBackend>, TrafficPolicy)> {
        let mut v: Vec<_> = self.state.iter().map(|(k, s)| (*k, s.backends.clone(), s.policy)).collect();
        v.sort_by_key(|(k, _, _)| *k);
        v
    }

    /// The connections in the conntrack map (one per connection, from its forward
    /// entry). Walks the whole map: for tests and debugging, not the packet path.
    pub fn connections(&self) -> Result<Vec<NpConnection>, Error> {
        let mut out = Vec::new();
        for entry in self.ct.iter() {
            let (k, v) = match entry {
                Ok(e) => e,
                // An LRU entry can vanish between the key walk and the lookup.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            if k.dir != CT_FWD {
                continue;
            }
            let snat = v.flags & CT_F_SNAT != 0;
            let rk = CtKey {
                saddr: v.backend_ip,
                daddr: if snat { v.snat_ip } else { v.client_ip },
                sport: v.backend_port,
                dport: if snat { v.snat_port } else { v.client_port },
                proto: k.proto,
                dir: if snat { CT_REV_SNAT } else { CT_REV_LOCAL },
                pad: 0,
            };
            let reverse_closing = match self.ct.get(&rk, 0) {
                Ok(r) => Some(r.flags & CT_F_CLOSING != 0),
                Err(e) if is_not_found(&e) => None,
                Err(e) => return Err(e.into()),
            };
            out.push(NpConnection {
                client: sock(k.saddr, k.sport),
                frontend: sock(k.daddr, k.dport),
                protocol: Protocol::from_number(k.proto),
                backend: sock(v.backend_ip, v.backend_port),
                snat: (v.flags & CT_F_SNAT != 0).then(|| sock(v.snat_ip, v.snat_port)),
                closing: v.flags & CT_F_CLOSING != 0,
                reverse_closing,
            });
        }
        Ok(out)
    }

    /// Number of entries of each kind in the conntrack map: (forward, reverse-local,
    /// reverse-SNAT).
    pub fn conntrack_counts(&self) -> Result<(usize, usize, usize), Error> {
        let mut n = (0, 0, 0);
        for k in self.ct.keys() {
            let k = match k {
                Ok(k) => k,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            match k.dir {
                CT_FWD => n.0 += 1,
                CT_REV_LOCAL => n.1 += 1,
                CT_REV_SNAT => n.2 += 1,
                _ => {}
            }
        }
        Ok(n)
    }

    /// Run counts and times of the attached programs (they only move while BPF stats
    /// are enabled, `aya::sys::enable_stats`).
    pub fn program_stats(&self) -> Result<Vec<crate::ProgramStats>, Error> {
        let mut out = Vec::new();
        for name in PROGRAMS {
            let link = PinnedLink::from_pin(self.links_dir().join(name))
                .map_err(|e| Error::Invalid(format!("link pin {name}: {e}")))?;
            let prog_id =
                FdLink::from(link).info().map_err(|e| Error::Invalid(format!("link info {name}: {e}")))?.program_id();
            for info in aya::programs::loaded_programs() {
                let info = info?;
                if info.id() == prog_id {
                    out.push(crate::ProgramStats { name, run_count: info.run_count(), run_time: info.run_time() });
                }
            }
        }
        Ok(out)
    }

    /// Drains the flow events currently in the ring buffer (non-blocking).
    pub fn read_flows(&mut self) -> Vec<NpFlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.flows.next() {
            if item.len() < std::mem::size_of::<Flow>() {
                continue;
            }
            // SAFETY: length checked; read unaligned since the ring only aligns to 8.
            let r: Flow = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Flow) };
            out.push(NpFlowEvent {
                timestamp_ns: r.ts_ns,
                client: sock(r.saddr, r.sport),
                frontend: sock(r.daddr, r.dport),
                protocol: Protocol::from_number(r.proto),
                backend: (r.backend_ip != 0).then(|| sock(r.backend_ip, r.backend_port)),
                snat: (r.flags & FLOW_F_SNAT != 0 && r.snat_port != 0).then(|| sock(r.snat_ip, r.snat_port)),
                backend_local: r.flags & FLOW_F_LOCAL != 0,
                verdict: match r.verdict {
                    1 => NpVerdict::Forwarded,
                    2 => NpVerdict::Dropped,
                    3 => NpVerdict::Rejected,
                    v => NpVerdict::Unknown(v),
                },
                reason: match r.reason {
                    0 => NpReason::NewConnection,
                    1 => NpReason::NoBackends,
                    2 => NpReason::NoLocalBackends,
                    3 => NpReason::NoRoute,
                    4 => NpReason::SnatPortsExhausted,
                    5 => NpReason::BackendGone,
                    6 => NpReason::TtlExceeded,
                    r => NpReason::Unknown(r),
                },
                frontend_id: r.fe_id,
                program_build: r.build,
            });
        }
        out
    }

    /// The ring buffer's fd, readable when events are waiting (for epoll/AsyncFd).
    pub fn flows_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.flows.as_fd()
    }

    /// Detaches both programs and removes every pin under `<pin_dir>/nodeport`.
    pub fn detach_and_unpin(self) -> Result<(), Error> {
        let dir = self.pin_dir.clone();
        drop(self);
        Self::purge(&dir)
    }

    /// Removes `<pin_dir>/nodeport` when no handle exists (a crashed agent, a rollback).
    /// Unpinning a link detaches its program since no process holds the link open.
    /// `pin_dir` itself goes too if nothing else (e.g. the socket LB) lives in it.
    pub fn purge(pin_dir: &Path) -> Result<(), Error> {
        let root = pin_dir.join("nodeport");
        for p in PROGRAMS {
            let pin = root.join("links").join(p);
            // The kernel drops an unpinned object only after an RCU grace period, so
            // the programs would stay on the interface for a moment after the unlink;
            // an explicit detach makes "returned" mean "gone".
            if let Ok(fd) = sys::bpf_obj_get(&pin) {
                sys::bpf_link_detach(fd.as_fd())
                    .map_err(|e| Error::Invalid(format!("detaching {}: {e}", pin.display())))?;
            }
            remove_if_exists(&pin)?;
        }
        for m in MAPS {
            remove_if_exists(&root.join("maps").join(m))?;
        }
        for d in [root.join("links"), root.join("maps"), root.clone()] {
            match fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(parent) = pin_dir.parent() {
            sys::remove_empty_dirs(pin_dir, parent.parent().unwrap_or(parent));
        }
        Ok(())
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, Error> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Invalid(format!("program {name} missing from object")))?
        .try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(last: u8, local: bool) -> NpBackend {
        NpBackend { ip: Ipv4Addr::new(10, 0, 0, last), port: 80, local }
    }

    #[test]
    fn local_policy_puts_local_backends_first_and_counts_only_them() {
        let (o, n) = slot_order(&[b(1, false), b(2, true), b(3, false), b(4, true)], TrafficPolicy::Local);
        assert_eq!(o, vec![b(2, true), b(4, true), b(1, false), b(3, false)]);
        assert_eq!(n, 2);
        let (o, n) = slot_order(&[b(1, false), b(2, true), b(1, false)], TrafficPolicy::Cluster);
        assert_eq!(o, vec![b(1, false), b(2, true)]);
        assert_eq!(n, 2);
        assert_eq!(slot_order(&[b(1, false)], TrafficPolicy::Local), (vec![b(1, false)], 0));
    }
}
