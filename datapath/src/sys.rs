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
            Some(Mount {
                source,
                target: PathBuf::from(target),
                fstype,
            })
        })
        .collect())
}

// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
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
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 mount in /proc/self/mounts",
            )
        })
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
    nix::mount::mount(
        Some("bpf"),
        default,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
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
