//! Byte-for-byte mirrors of the structs in `bpf/sock_lb.c`.
//!
//! Addresses and ports stay in network byte order here, as the kernel presents them to
//! the programs; conversion to host types happens only at the public API boundary.
//! The size assertions at the bottom catch a C/Rust layout drift at compile time.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcVal {
    pub svc_id: u32,
    pub slot_base: u32,
    pub count: u16,
    pub flags: u8,
    pub pad: u8,
    pub affinity_timeout_s: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendKey {
    pub svc_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendVal {
    pub ip: u32,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub client: u64,
    pub svc_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityVal {
    pub last_used_ns: u64,
    pub backend: BackendVal,
    pub slot: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevnatKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevnatVal {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
    pub svc_id: u32,
    pub pad2: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEventRaw {
    pub ts_ns: u64,
    pub cookie: u64,
    pub netns_cookie: u64,
    pub src_ip: u32,
    pub dst_ip: u32,
    pub backend_ip: u32,
    pub svc_id: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub backend_port: u16,
    pub proto: u8,
    pub verdict: u8,
    pub hook: u8,
    pub v4mapped: u8,
    pub build: u8,
    pub pad: [u8; 5],
}

pub const SVC_F_AFFINITY_CLIENTIP: u8 = 0x1;

/// `ks_config[0]` is a u32 of these (struct ks_config in C).
pub const CFG_F_NO_FLOW_EVENTS: u32 = 0x1;

pub const VERDICT_FORWARDED: u8 = 1;
pub const VERDICT_REFUSED_NO_BACKENDS: u8 = 2;

pub const HOOK_CONNECT: u8 = 1;
pub const HOOK_SENDMSG: u8 = 2;

// SAFETY: all of these are repr(C), Copy, contain only integers, and have explicit
// padding fields so every byte is initialised when handed to the kernel.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcVal {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for BackendVal {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityVal {}
unsafe impl aya::Pod for RevnatKey {}
unsafe impl aya::Pod for RevnatVal {}

const _: () = assert!(std::mem::size_of::<SvcKey>() == 8);
const _: () = assert!(std::mem::size_of::<SvcVal>() == 16);
const _: () = assert!(std::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(std::mem::size_of::<BackendVal>() == 8);
const _: () = assert!(std::mem::size_of::<AffinityKey>() == 16);
const _: () = assert!(std::mem::size_of::<AffinityVal>() == 24);
const _: () = assert!(std::mem::size_of::<RevnatKey>() == 16);
const _: () = assert!(std::mem::size_of::<RevnatVal>() == 16);
const _: () = assert!(std::mem::size_of::<FlowEventRaw>() == 56);
