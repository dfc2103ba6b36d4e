//! Finding and preparing the kernel filesystems the datapath lives on.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// One line of /proc/mounts.
#[derive(Debug, Clone)]
pub struct Mount {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
}

pub fn mounts() -> io::Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let source = f.next()?.to_string();
            let target = unescape_mount_path(f.next()?);
            let fstype = f.next()?.to_string();
            Some(Mount { source, target: PathBuf::from(target), fstype })
        })
        .collect())
}

// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the cgroup v2 hierarchy is mounted. Hosts differ (/sys/fs/cgroup on unified
/// systems, /sys/fs/cgroup/unified on hybrid ones like the lab machine), so it is read
/// from the mount table rather than assumed.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.target)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount in /proc/self/mounts"))
}

/// Makes sure `dir` can hold pins: it must sit on a bpffs. If nothing covers it and it
/// is under /sys/fs/bpf, bpffs is mounted there (fresh machines and minimal images
/// often lack the mount).
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let covered = mounts()?
        .iter()
        .filter(|m| dir.starts_with(&m.target))
        .max_by_key(|m| m.target.as_os_str().len())
        .map(|m| m.fstype == "bpf")
        .unwrap_or(false);
    if covered {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !dir.starts_with(default) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not on a bpf filesystem", dir.display()),
        ));
    }
    fs::create_dir_all(default)?;
    nix::mount::mount(Some("bpf"), default, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(io::Error::from)
}

/// Removes `dir` and its parents up to (not including) `stop` while they are empty.
/// Other nodes of the lab may share a parent, so a non-empty directory is left alone.
pub fn remove_empty_dirs(dir: &Path, stop: &Path) {
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d == stop || !d.starts_with(stop) || fs::remove_dir(d).is_err() {
            break;
        }
        cur = d.parent();
    }
}

/// BPF_OBJ_GET: opens a pinned object. aya keeps the fd of a pinned link private, and
/// replacing a link's program needs it.
pub fn bpf_obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, pad: 0 };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: attr lives across the call; the kernel reads at most size_of bytes.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr as *const ObjGet, std::mem::size_of::<ObjGet>() as u32)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE with BPF_F_REPLACE: atomically swaps the program behind an attached
/// link, but only if it still runs `old_prog` (a concurrent upgrader loses cleanly with
/// EPERM instead of overwriting). There is no moment without a program attached.
pub fn bpf_link_update(
    link: std::os::fd::BorrowedFd<'_>,
    new_prog: std::os::fd::BorrowedFd<'_>,
    old_prog: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    const BPF_F_REPLACE: u32 = 1 << 2;
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old_prog.as_raw_fd() as u32,
    };
    // SAFETY: as above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdate,
            std::mem::size_of::<LinkUpdate>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// BPF_LINK_DETACH: takes a link's program off its hook now, whoever else holds the link.
/// (Unpinning alone detaches only when the kernel frees the link, a moment later.)
pub fn bpf_link_detach(link: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    const BPF_LINK_DETACH: libc::c_long = 34;
    let attr = LinkDetach { link_fd: link.as_raw_fd() as u32 };
    // SAFETY: attr lives across the call; the kernel reads at most size_of bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &attr as *const LinkDetach,
            std::mem::size_of::<LinkDetach>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
