//! Pieces every loader (socket LB, NodePort, NetworkPolicy) needs in the same shape:
//! loading an object against its pinned maps, map errors that mean "not there", pin
//! removal, tcx link swap and detach, and running an attach inside another network
//! namespace.

use std::{fs, io, os::fd::AsFd, path::Path};

use aya::{
    maps::{Map, MapData, MapError},
    programs::{
        links::{FdLink, PinnedLink},
        ProgramError, SchedClassifier,
    },
};

use crate::{sys, Error};

/// Loads `obj` with each of `maps` bound to its pin under `maps_dir`: a pinned map is
/// reused (so counters, conntrack and programmed state survive a restart or upgrade),
/// a missing one is created and pinned. Nothing is attached yet; the verifier has run.
///
/// Without the kernel's BTF: kubeshift's programs read only UAPI context structs, which
/// the verifier rewrites, and have no CO-RE relocations to resolve (a test checks the
/// objects). aya's default parses all of /sys/kernel/btf/vmlinux for every load, tens of
/// MB of heap three times over at agent start, for nothing.
pub(crate) fn load_pinned(obj: &[u8], maps_dir: &Path, maps: &[&str]) -> Result<aya::Ebpf, Error> {
    let mut loader = aya::EbpfLoader::new();
    loader.btf(None);
    for m in maps {
        loader.map_pin_path(m, maps_dir.join(m));
    }
    Ok(loader.load(obj)?)
}

/// Loads one program, again when the kernel answers EAGAIN. The verifier gives up with
/// EAGAIN when a signal is pending on the loading thread (`do_check`), which says nothing
/// about the program; libbpf retries such loads (5 attempts), aya 0.14 does not. Seen in
/// CI: the socket LB's in-place upgrade under traffic failed once this way. A failed load
/// leaves the program unloaded, so loading it again is sound.
pub(crate) fn load_retrying(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
                tracing::debug!(attempt, "program load interrupted (EAGAIN), loading again");
            }
            r => return r,
        }
    }
}

/// Opens the map pinned at `maps_dir/name`; `try_into` a typed map then checks key and
/// value sizes, which refuses pins left by a build with another layout.
pub(crate) fn open_pinned(maps_dir: &Path, name: &str) -> Result<Map, Error> {
    Ok(Map::from_map_data(MapData::from_pin(maps_dir.join(name))?)?)
}

pub(crate) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Deletes ignoring "not there": a mirror may be ahead of a map someone else edited.
pub(crate) fn ignore_not_found(r: Result<(), MapError>) -> Result<(), Error> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn remove_if_exists(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Swaps `prog` into the tcx link pinned at `pin` when its code differs from what runs
/// there (or always, with `force`: after a map pin was recreated, the running program
/// still uses the old, unreachable map). Equal kernel tags mean equal instructions.
pub(crate) fn swap_if_different(prog: &SchedClassifier, pin: &Path, force: bool) -> Result<bool, Error> {
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

/// Runs `f` on a short-lived thread that has joined the network namespace at `netns`.
/// Only that thread moves: the process keeps the host mount namespace (so the bpffs pins
/// stay reachable), and the caller's thread, e.g. a tokio worker, never changes netns.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T, Error> + Send) -> Result<T, Error> {
    use nix::sched::{setns, CloneFlags};
    let target =
        fs::File::open(netns).map_err(|e| Error::Invalid(format!("network namespace {}: {e}", netns.display())))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::Invalid(format!("entering network namespace {}: {e}", netns.display())))?;
            f()
        })
        .join()
        .map_err(|_| Error::Invalid(format!("thread in {} panicked", netns.display())))?
    })
}

#[cfg(test)]
mod tests {
    /// The contents of section `name` of a little-endian ELF64 object.
    fn section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
        let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
        let header = |i: usize| shoff + i * shentsize;
        let names = u64_at(header(shstrndx) + 24);
        (0..shnum).find_map(|i| {
            let h = header(i);
            let start = names + u32_at(h);
            let end = start + elf[start..].iter().position(|b| *b == 0)?;
            let (off, size) = (u64_at(h + 24), u64_at(h + 32));
            (&elf[start..end] == name.as_bytes()).then(|| &elf[off..off + size])
        })
    }

    /// CO-RE relocation records in an object's `.BTF.ext` (the part after func and line
    /// info: a record size, then per program section its name, a count and the records).
    fn core_relocations(obj: &[u8]) -> usize {
        let ext = section(obj, ".BTF.ext").expect("a .BTF.ext section (objects are built with -g)");
        assert_eq!(u16::from_le_bytes([ext[0], ext[1]]), 0xeb9f, "BTF magic");
        let u32_at = |o: usize| u32::from_le_bytes(ext[o..o + 4].try_into().unwrap()) as usize;
        let header_len = u32_at(4);
        if header_len < 32 {
            return 0;
        }
        let (start, len) = (header_len + u32_at(24), u32_at(28));
        if len == 0 {
            return 0;
        }
        let record = u32_at(start);
        let (mut at, mut n) = (start + 4, 0);
        while at < start + len {
            let count = u32_at(at + 4);
            n += count;
            at += 8 + count * record;
        }
        n
    }

    #[test]
    fn objects_load_without_the_kernels_btf() {
        let objects =
            [("sock_lb", crate::SOCK_LB_OBJ), ("policy", crate::POLICY_OBJ), ("nodeport", crate::NODEPORT_OBJ)];
        for (name, obj) in objects {
            assert_eq!(
                core_relocations(obj),
                0,
                "{name}.o has CO-RE relocations: load_pinned must pass the kernel's BTF"
            );
        }
    }
}
