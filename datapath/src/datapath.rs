use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs, io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr,
    },
};

use crate::loader_util::{is_not_found, load_pinned, load_retrying, open_pinned, remove_if_exists};
use crate::{raw::*, sys};

/// Where per-node pin directories go unless configured otherwise.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/kubeshift";

/// Kubernetes' default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// A service's backends occupy one of two slot ranges of this size, see `SvcVal::slot_base`.
pub const MAX_BACKENDS_PER_SERVICE: usize = 65_535;
const SLOT_HALF: u32 = 1 << 16;

const MAPS: [&str; 6] = ["ks_services", "ks_backends", "ks_affinity", "ks_revnat", "ks_flows", "ks_config"];
const PROGRAMS: [&str; 8] = [
    "ks_connect4",
    "ks_sendmsg4",
    "ks_recvmsg4",
    "ks_getpeername4",
    "ks_connect6",
    "ks_sendmsg6",
    "ks_recvmsg6",
    "ks_getpeername6",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub(crate) fn number(self) -> u8 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    pub(crate) fn from_number(n: u8) -> Option<Self> {
        match i32::from(n) {
            libc::IPPROTO_TCP => Some(Protocol::Tcp),
            libc::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// A ClusterIP service port as the client addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One endpoint (pod IP and target port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// `spec.sessionAffinity` of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Affinity {
    #[default]
    None,
    /// Connections from the same client stick to one backend until the client has been
    /// idle for `timeout`. The client is identified by its network namespace, which for
    /// a pod is the same thing as its IP.
    ClientIp { timeout: Duration },
}

#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// bpffs directory holding this datapath's pins (`maps/`, `links/`). One per node in
    /// the lab, so several datapaths can coexist on one machine.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the socket hooks attach to; every process below it is
    /// load-balanced.
    pub cgroup: PathBuf,
}

impl DatapathConfig {
    /// `DEFAULT_BPFFS_ROOT/<name>`, attached to the root of the cgroup v2 hierarchy.
    pub fn new(name: &str) -> io::Result<Self> {
        Ok(Self { pin_dir: Path::new(DEFAULT_BPFFS_ROOT).join(name), cgroup: sys::cgroup2_mount()? })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("loading eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] MapError),
    #[error("pinning: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forwarded,
    /// The service has no endpoints; the socket call failed with ECONNREFUSED.
    RefusedNoBackends,
    Unknown(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    SendMsg,
    Unknown(u8),
}

/// One service translation (or refusal) as seen by the socket hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowEvent {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns).
    pub timestamp_ns: u64,
    pub socket_cookie: u64,
    pub netns_cookie: u64,
    /// Unspecified when the socket was not bound yet, which is usual for connect().
    pub source: SocketAddrV4,
    pub service: SocketAddrV4,
    pub backend: Option<SocketAddrV4>,
    pub protocol: Option<Protocol>,
    pub verdict: Verdict,
    pub hook: Hook,
    /// The socket was IPv6 and addressed the service as ::ffff:<vip>.
    pub v4mapped: bool,
    /// KS_BUILD_ID of the program that emitted the event.
    pub program_build: u8,
    pub service_id: u32,
}

/// Kernel-side run statistics of one attached program. Counters only move while BPF
/// stats are enabled (`aya::sys::enable_stats`), which costs a little per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_count: u64,
    pub run_time: Duration,
}

#[derive(Debug, Clone)]
struct ServiceState {
    id: u32,
    slot_base: u32,
    backends: Vec<Backend>,
    affinity: Affinity,
}

/// A handle on one attached socket load balancer and its maps.
///
/// Dropping it leaves the datapath running (that is the point of pinning); use
/// [`Datapath::detach_and_unpin`] to remove it.
pub struct Datapath {
    cfg: DatapathConfig,
    reopened: bool,
    upgraded: usize,
    services: HashMap<MapData, SvcKey, SvcVal>,
    backends: HashMap<MapData, BackendKey, BackendVal>,
    flows: RingBuf<MapData>,
    config: Array<MapData, u32>,
    // Mirror of the service map, so an endpoint change can be computed without reading
    // the kernel's maps back. Rebuilt from the maps on reopen.
    state: StdHashMap<ServiceKey, ServiceState>,
    next_id: u32,
}

fn ip_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn ip_from_raw(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

fn svc_key_raw(k: &ServiceKey) -> SvcKey {
    SvcKey { vip: ip_raw(k.vip), port: k.port.to_be(), proto: k.protocol.number(), pad: 0 }
}

fn backend_raw(b: &Backend) -> BackendVal {
    BackendVal { ip: ip_raw(b.ip), port: b.port.to_be(), pad: 0 }
}

fn backend_from_raw(b: &BackendVal) -> Backend {
    Backend { ip: ip_from_raw(b.ip), port: u16::from_be(b.port) }
}

/// Orders the new backend set so that backends that stay keep their slot index.
/// Affinity entries remember a slot index, so stable slots keep clients on their
/// backend across unrelated endpoint changes.
fn stable_order(old: &[Backend], new: &[Backend]) -> Vec<Backend> {
    let wanted: HashSet<Backend> = new.iter().copied().collect();
    let kept: HashSet<Backend> = old.iter().copied().filter(|b| wanted.contains(b)).collect();
    let mut slots: Vec<Option<Backend>> = old.iter().map(|b| wanted.contains(b).then_some(*b)).collect();
    let mut seen = HashSet::new();
    let mut added = new.iter().copied().filter(|b| !kept.contains(b) && seen.insert(*b));
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match added.next() {
            Some(b) => *slot = Some(b),
            None => break,
        }
    }
    slots.extend(added.map(Some));
    // Holes left by removals are filled from the tail: only the moved backends lose
    // their affinity, not everyone after the hole.
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_none() {
            slots.swap_remove(i);
        } else {
            i += 1;
        }
    }
    slots.into_iter().flatten().collect()
}

impl Datapath {
    /// Attaches the socket load balancer to `cfg.cgroup` and pins it under
    /// `cfg.pin_dir`, or reopens an earlier run's pins without detaching anything.
    ///
    /// When reopening, programs whose code differs from the embedded object (a newer
    /// agent) are swapped in place with BPF_LINK_UPDATE: the maps, their contents and the
    /// attachment stay, and no connect() ever runs without a program.
    pub fn load(cfg: DatapathConfig) -> Result<Self, Error> {
        Self::load_object(cfg, crate::SOCK_LB_OBJ)
    }

    /// [`Datapath::load`] with a given build of `bpf/sock_lb.c` (the upgrade tests use a
    /// second build).
    pub fn load_object(cfg: DatapathConfig, obj: &[u8]) -> Result<Self, Error> {
        sys::ensure_bpffs(&cfg.pin_dir)?;
        let maps_dir = cfg.pin_dir.join("maps");
        let links_dir = cfg.pin_dir.join("links");
        fs::create_dir_all(&maps_dir)?;
        fs::create_dir_all(&links_dir)?;

        let all_maps = MAPS.iter().all(|m| maps_dir.join(m).exists());
        let all_links = PROGRAMS.iter().all(|p| links_dir.join(p).exists());
        let reopened = all_maps && all_links;

        // Order matters: nothing attached is touched until this build's maps are known to
        // match the pinned ones and all its programs have passed the verifier.
        let mut ebpf = load_pinned(obj, &maps_dir, &MAPS)?;
        let mut dp = Self::open_pinned(cfg, reopened)?;
        Self::check_layouts(&maps_dir)?;
        for p in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(p)
                .ok_or_else(|| Error::Invalid(format!("program {p} missing from object")))?
                .try_into()?;
            load_retrying(|| prog.load())?;
        }

        let cgroup = fs::File::open(&dp.cfg.cgroup)?;
        for p in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(p)
                .ok_or_else(|| Error::Invalid(format!("program {p} missing from object")))?
                .try_into()?;
            let pin = links_dir.join(p);
            if pin.exists() {
                // A map pin was missing (a build that added a map, or a pin removed by
                // hand): the running program still uses a map nobody can reach, and
                // equal tags would not reveal it, so swap unconditionally.
                if Self::swap_if_different(prog, &pin, !all_maps)? {
                    dp.upgraded += 1;
                }
                continue;
            }
            // With bpf_link (always used on kernels >= 5.7) "Single" means flags=0, which
            // the kernel treats as multi-attach anyway; passing BPF_F_ALLOW_MULTI to
            // link_create is rejected with EINVAL. Other programs on the cgroup (a CNI's,
            // another lab node's) keep running alongside ours.
            let id = prog.attach(&cgroup, CgroupAttachMode::Single)?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| Error::Invalid(e.to_string()))?;
            // The pin, not this process, now owns the attachment.
            link.pin(&pin)?;
        }
        Ok(dp)
    }

    /// The maps the loader does not open typed are checked here too, so a build with a
    /// different layout is refused before it can replace a running program.
    fn check_layouts(maps_dir: &Path) -> Result<(), Error> {
        let open = |name: &str| open_pinned(maps_dir, name);
        let _: HashMap<MapData, AffinityKey, AffinityVal> = open("ks_affinity")?.try_into()?;
        let _: HashMap<MapData, RevnatKey, RevnatVal> = open("ks_revnat")?.try_into()?;
        Ok(())
    }

    /// Swaps the loaded `prog` into the pinned link at `pin` if its code differs from
    /// what runs there (or always, with `force`). The kernel's program tag hashes the
    /// instructions with map references zeroed, so equal tags mean equal programs.
    fn swap_if_different(prog: &CgroupSockAddr, pin: &Path, force: bool) -> Result<bool, Error> {
        let link = PinnedLink::from_pin(pin).map_err(|e| Error::Invalid(format!("link pin {}: {e}", pin.display())))?;
        let running_id = FdLink::from(link)
            .info()
            .map_err(|e| Error::Invalid(format!("link info {}: {e}", pin.display())))?
            .program_id();
        let running = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|i| i.id() == running_id)
            .ok_or_else(|| Error::Invalid(format!("program {running_id} vanished")))?;
        if !force && prog.info()?.tag() == running.tag() {
            return Ok(false);
        }
        let link_fd = sys::bpf_obj_get(pin)?;
        let old_fd = running.fd()?;
        sys::bpf_link_update(link_fd.as_fd(), prog.fd()?.as_fd(), old_fd.as_fd())?;
        Ok(true)
    }

    /// How many programs [`Datapath::load`] replaced in place (0 unless it reopened pins
    /// left by a different build).
    pub fn upgraded_programs(&self) -> usize {
        self.upgraded
    }

    fn open_pinned(cfg: DatapathConfig, reopened: bool) -> Result<Self, Error> {
        let maps_dir = cfg.pin_dir.join("maps");
        let open = |name: &str| open_pinned(&maps_dir, name);
        // try_from checks key and value sizes, which catches pins left by an
        // incompatible version of the programs.
        let services: HashMap<MapData, SvcKey, SvcVal> = open("ks_services")?.try_into()?;
        let backends: HashMap<MapData, BackendKey, BackendVal> = open("ks_backends")?.try_into()?;
        let flows: RingBuf<MapData> = open("ks_flows")?.try_into()?;
        let config: Array<MapData, u32> = open("ks_config")?.try_into()?;

        let mut state = StdHashMap::new();
        let mut max_id = 0;
        for entry in services.iter() {
            let (k, v) = entry?;
            let Some(protocol) = Protocol::from_number(k.proto) else {
                continue;
            };
            let key = ServiceKey { vip: ip_from_raw(k.vip), port: u16::from_be(k.port), protocol };
            let mut list = Vec::with_capacity(v.count as usize);
            for i in 0..u32::from(v.count) {
                let bk = BackendKey { svc_id: v.svc_id, slot: v.slot_base + i };
                list.push(backend_from_raw(&backends.get(&bk, 0)?));
            }
            let affinity = if v.flags & SVC_F_AFFINITY_CLIENTIP != 0 {
                Affinity::ClientIp { timeout: Duration::from_secs(u64::from(v.affinity_timeout_s)) }
            } else {
                Affinity::None
            };
            max_id = max_id.max(v.svc_id);
            state.insert(key, ServiceState { id: v.svc_id, slot_base: v.slot_base, backends: list, affinity });
        }
        let mut dp = Self {
            cfg,
            reopened,
            upgraded: 0,
            services,
            backends,
            flows,
            config,
            state,
            // Ids are never reused within a map's lifetime, so stale affinity entries of
            // a removed service cannot leak into a new one.
            next_id: max_id + 1,
        };
        dp.collect_orphan_slots()?;
        Ok(dp)
    }

    /// A loader that died between writing a new slot range and flipping the service
    /// entry (or between flipping and deleting the old range) leaves slots no service
    /// points at. They would never be overwritten if the service is gone, so drop them.
    fn collect_orphan_slots(&mut self) -> Result<(), Error> {
        let live: StdHashMap<u32, (u32, u32)> =
            self.state.values().map(|s| (s.id, (s.slot_base, s.backends.len() as u32))).collect();
        let mut orphans = Vec::new();
        for key in self.backends.keys() {
            let key = key?;
            let used = live.get(&key.svc_id).is_some_and(|&(base, n)| key.slot >= base && key.slot < base + n);
            if !used {
                orphans.push(key);
            }
        }
        for k in orphans {
            match self.backends.remove(&k) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// True when [`Datapath::load`] found everything pinned and only reopened it.
    pub fn reopened(&self) -> bool {
        self.reopened
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.cfg
    }

    /// Creates or replaces one service port. Only this service's entries are written:
    /// its backends go to the unused half of its slot range, then the service entry
    /// flips to them in one map update, then the old half is deleted.
    pub fn upsert_service(&mut self, key: ServiceKey, backends: Vec<Backend>, affinity: Affinity) -> Result<(), Error> {
        if backends.len() > MAX_BACKENDS_PER_SERVICE {
            return Err(Error::Invalid(format!(
                "{} backends for {key:?}, at most {MAX_BACKENDS_PER_SERVICE} supported",
                backends.len()
            )));
        }
        let timeout_s = match affinity {
            Affinity::None => 0,
            Affinity::ClientIp { timeout } => {
                let s = timeout.as_secs();
                if s == 0 || s > u64::from(u32::MAX) {
                    return Err(Error::Invalid(format!("affinity timeout {timeout:?} out of range")));
                }
                s as u32
            }
        };
        let (id, old_base, old_backends) = match self.state.get(&key) {
            Some(s) => (s.id, Some(s.slot_base), s.backends.clone()),
            None => (self.next_id, None, Vec::new()),
        };
        let ordered = stable_order(&old_backends, &backends);
        if old_base.is_some() && ordered == old_backends && self.state.get(&key).map(|s| s.affinity) == Some(affinity) {
            return Ok(());
        }
        let new_base = match old_base {
            Some(0) => SLOT_HALF,
            _ => 0,
        };

        for (i, b) in ordered.iter().enumerate() {
            let bk = BackendKey { svc_id: id, slot: new_base + i as u32 };
            if let Err(e) = self.backends.insert(bk, backend_raw(b), 0) {
                // Leave the service exactly as it was: the live half is untouched.
                for j in 0..i {
                    let _ = self.backends.remove(&BackendKey { svc_id: id, slot: new_base + j as u32 });
                }
                return Err(e.into());
            }
        }
        let val = SvcVal {
            svc_id: id,
            slot_base: new_base,
            count: ordered.len() as u16,
            flags: if timeout_s > 0 { SVC_F_AFFINITY_CLIENTIP } else { 0 },
            pad: 0,
            affinity_timeout_s: timeout_s,
        };
        if let Err(e) = self.services.insert(svc_key_raw(&key), val, 0) {
            // The service map is full (or the kernel refused): the new range is unused.
            let _ = self.remove_slots(id, new_base, ordered.len());
            return Err(e.into());
        }
        if let Some(ob) = old_base {
            self.remove_slots(id, ob, old_backends.len())?;
        } else {
            self.next_id += 1;
        }
        self.state.insert(key, ServiceState { id, slot_base: new_base, backends: ordered, affinity });
        Ok(())
    }

    /// An endpoint change: replaces the backends of one existing service and keeps its
    /// affinity setting.
    pub fn set_backends(&mut self, key: ServiceKey, backends: Vec<Backend>) -> Result<(), Error> {
        let affinity =
            self.state.get(&key).map(|s| s.affinity).ok_or_else(|| Error::Invalid(format!("no service {key:?}")))?;
        self.upsert_service(key, backends, affinity)
    }

    /// Removes a service port; returns false if it was not there.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<bool, Error> {
        let Some(s) = self.state.remove(key) else {
            return Ok(false);
        };
        // Service entry first, so no new lookup can land on a half-deleted slot range.
        match self.services.remove(&svc_key_raw(key)) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        self.remove_slots(s.id, s.slot_base, s.backends.len())?;
        Ok(true)
    }

    fn remove_slots(&mut self, id: u32, base: u32, count: usize) -> Result<(), Error> {
        for i in 0..count {
            match self.backends.remove(&BackendKey { svc_id: id, slot: base + i as u32 }) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The services currently programmed, sorted, for reconciling against the API.
    pub fn services(&self) -> Vec<(ServiceKey, Vec<Backend>, Affinity)> {
        let mut v: Vec<_> = self.state.iter().map(|(k, s)| (*k, s.backends.clone(), s.affinity)).collect();
        v.sort_by_key(|(k, _, _)| *k);
        v
    }

    /// Run counts and times of the attached programs, found through the link pins.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, Error> {
        let mut out = Vec::new();
        for name in PROGRAMS {
            let link = PinnedLink::from_pin(self.cfg.pin_dir.join("links").join(name))
                .map_err(|e| Error::Invalid(format!("link pin {name}: {e}")))?;
            let fd: FdLink = link.into();
            let prog_id = fd.info().map_err(|e| Error::Invalid(format!("link info {name}: {e}")))?.program_id();
            for info in aya::programs::loaded_programs() {
                let info = info?;
                if info.id() == prog_id {
                    out.push(ProgramStats { name, run_count: info.run_count(), run_time: info.run_time() });
                }
            }
        }
        Ok(out)
    }

    /// Turns flow events on or off for all programs at once (on after a fresh load).
    /// For when nobody observes; the saving per connect is small (< 0.1 us measured).
    pub fn set_flow_events(&mut self, on: bool) -> Result<(), Error> {
        let mut flags = self.config.get(&0, 0)?;
        if on {
            flags &= !CFG_F_NO_FLOW_EVENTS;
        } else {
            flags |= CFG_F_NO_FLOW_EVENTS;
        }
        self.config.set(0, flags, 0)?;
        Ok(())
    }

    pub fn flow_events_enabled(&self) -> Result<bool, Error> {
        Ok(self.config.get(&0, 0)? & CFG_F_NO_FLOW_EVENTS == 0)
    }

    /// The ring buffer's fd: becomes readable when events arrive, for epoll/AsyncFd.
    pub fn flows_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.flows.as_fd()
    }

    /// Drains the flow events currently in the ring buffer (non-blocking).
    pub fn read_flows(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.flows.next() {
            if item.len() < std::mem::size_of::<FlowEventRaw>() {
                continue;
            }
            // SAFETY: length checked above; the ring buffer gives no alignment guarantee
            // beyond 8 bytes, so read unaligned anyway.
            let r: FlowEventRaw = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEventRaw) };
            out.push(FlowEvent {
                timestamp_ns: r.ts_ns,
                socket_cookie: r.cookie,
                netns_cookie: r.netns_cookie,
                source: SocketAddrV4::new(ip_from_raw(r.src_ip), u16::from_be(r.src_port)),
                service: SocketAddrV4::new(ip_from_raw(r.dst_ip), u16::from_be(r.dst_port)),
                backend: (r.verdict == VERDICT_FORWARDED)
                    .then(|| SocketAddrV4::new(ip_from_raw(r.backend_ip), u16::from_be(r.backend_port))),
                protocol: Protocol::from_number(r.proto),
                verdict: match r.verdict {
                    VERDICT_FORWARDED => Verdict::Forwarded,
                    VERDICT_REFUSED_NO_BACKENDS => Verdict::RefusedNoBackends,
                    v => Verdict::Unknown(v),
                },
                hook: match r.hook {
                    HOOK_CONNECT => Hook::Connect,
                    HOOK_SENDMSG => Hook::SendMsg,
                    h => Hook::Unknown(h),
                },
                v4mapped: r.v4mapped != 0,
                program_build: r.build,
                service_id: r.svc_id,
            });
        }
        out
    }

    /// Detaches the programs and removes every pin, leaving nothing in the kernel.
    pub fn detach_and_unpin(self) -> Result<(), Error> {
        let dir = self.cfg.pin_dir.clone();
        drop(self);
        Self::purge(&dir)
    }

    /// Removes a pin directory left by a datapath nobody holds a handle on (a crashed
    /// agent, a rollback). Unlinking a link pin detaches its program because no process
    /// keeps the link open.
    pub fn purge(pin_dir: &Path) -> Result<(), Error> {
        for p in PROGRAMS {
            remove_if_exists(&pin_dir.join("links").join(p))?;
        }
        for m in MAPS {
            remove_if_exists(&pin_dir.join("maps").join(m))?;
        }
        for d in ["links", "maps"] {
            match fs::remove_dir(pin_dir.join(d)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn b(last: u8) -> Backend {
        Backend { ip: Ipv4Addr::new(10, 0, 0, last), port: 80 }
    }

    #[test]
    fn stable_order_keeps_slots_of_remaining_backends() {
        assert_eq!(stable_order(&[], &[b(1), b(2)]), vec![b(1), b(2)]);
        // b(2) removed, b(4) added: b(4) takes b(2)'s slot, b(1) and b(3) stay put.
        assert_eq!(stable_order(&[b(1), b(2), b(3)], &[b(3), b(4), b(1)]), vec![b(1), b(4), b(3)]);
        // A removal without replacement moves only the last backend into the hole.
        assert_eq!(stable_order(&[b(1), b(2), b(3), b(4)], &[b(1), b(3), b(4)]), vec![b(1), b(4), b(3)]);
        assert_eq!(stable_order(&[b(1)], &[]), vec![]);
        // Duplicates would skew the random pick.
        assert_eq!(stable_order(&[], &[b(1), b(1)]), vec![b(1)]);
    }

    #[test]
    fn raw_encoding_is_network_order() {
        let k = svc_key_raw(&ServiceKey { vip: Ipv4Addr::new(10, 96, 0, 1), port: 80, protocol: Protocol::Tcp });
        assert_eq!(k.vip.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.proto, 6);
    }
}
