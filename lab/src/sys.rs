//! The ways the lab touches the machine: commands, network namespaces, cgroups and
//! processes. Every mutation the lab makes goes through here, so this file is the list
//! of what `lab down` has to undo.
//!
//! Network setup shells out to iproute2 on purpose: the lab imitates what flanneld,
//! calico-node and the kubelet do on a node, and `ip` commands are what an operator
//! reads and types when debugging those; errors carry the exact command.

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs a command to completion; a non-zero exit is an error that names the command
/// and carries its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("could not start {}", describe(cmd)))?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", describe(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// `ip -n NS args...`; `ns = None` runs in the caller's namespace.
pub fn ip(ns: Option<&str>, args: &str) -> Result<String> {
    let mut c = Command::new("ip");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    c.args(args.split_whitespace());
    run(&mut c)
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

pub fn netns_add(name: &str) -> Result<()> {
    if !netns_exists(name) {
        ip(None, &format!("netns add {name}"))?;
    }
    ip(Some(name), "link set lo up")?;
    Ok(())
}

/// Deletes a netns after killing every process still inside it. Only processes whose
/// network namespace is this lab-created one are touched.
pub fn netns_delete(name: &str) -> Result<()> {
    if !netns_exists(name) {
        return Ok(());
    }
    kill_netns_processes(name);
    ip(None, &format!("netns delete {name}"))?;
    Ok(())
}

pub fn list_netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/run/netns") else { return vec![] };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

fn inode_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// PIDs of the processes whose network namespace is `name`.
pub fn netns_pids(name: &str) -> Vec<i32> {
    let Some(want) = inode_of(&netns_path(name)) else { return vec![] };
    let mut pids = vec![];
    let Ok(rd) = std::fs::read_dir("/proc") else { return pids };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == std::process::id() as i32 {
            continue;
        }
        if inode_of(&e.path().join("ns/net")) == Some(want) {
            pids.push(pid);
        }
    }
    pids
}

fn kill_netns_processes(name: &str) {
    let pids = netns_pids(name);
    for &p in &pids {
        terminate(p);
    }
    wait_gone(&pids, std::time::Duration::from_secs(5));
    for p in netns_pids(name) {
        kill(p);
    }
}

pub fn terminate(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
}

pub fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}

pub fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); it counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Polls until every pid has exited or the deadline passes.
pub fn wait_gone(pids: &[i32], timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| !alive(p)) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Moves the calling thread into a network namespace. Threads created afterwards
/// inherit it; the mount namespace stays the host's, so /sys/fs/cgroup and
/// /sys/fs/bpf stay visible (`ip netns exec` would hide them).
pub fn enter_netns(name: &str) -> Result<()> {
    let f = File::open(netns_path(name)).with_context(|| format!("network namespace {name} does not exist"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {name}"))?;
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `name` and returns its result.
/// The caller's own thread never changes namespace.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || -> Result<T> {
        enter_netns(&name)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread inside netns panicked"))?
}

/// Prepares `cmd` so that the child enters `netns` (if given) and joins the cgroup
/// whose `cgroup.procs` is `cgroup` (if given) before exec. Files are opened here, in
/// the parent, because only async-signal-safe calls may run between fork and exec.
pub fn confine(cmd: &mut Command, netns: Option<&str>, cgroup: Option<&Path>) -> Result<()> {
    let ns_file = match netns {
        Some(n) => Some(File::open(netns_path(n)).with_context(|| format!("network namespace {n}"))?),
        None => None,
    };
    let cg_file = match cgroup {
        Some(c) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .with_context(|| format!("cgroup {}", c.display()))?,
        ),
        None => None,
    };
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &cg_file {
                // "0" means "the writing process".
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(f) = &ns_file {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Own session: a daemon outlives `lab up` and is not hit by its ^C.
            libc::setsid();
            Ok(())
        });
    }
    Ok(())
}

// --- cgroups ------------------------------------------------------------------------

/// Where cgroup v2 is mounted (this machine: /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[2] == "cgroup2" {
            return Ok(PathBuf::from(f[1]));
        }
    }
    bail!("no cgroup2 filesystem is mounted (see /proc/mounts); the lab puts each pod in a cgroup v2")
}

/// Kills every process in a cgroup subtree and removes it, leaves first.
pub fn cgroup_remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        let _ = std::fs::write(&kill, "1");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    remove_cgroup_dirs(dir, deadline)
}

fn remove_cgroup_dirs(dir: &Path, deadline: std::time::Instant) -> Result<()> {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_dirs(&e.path(), deadline)?;
            }
        }
    }
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while killed processes are still exiting.
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!("waiting for cgroup {} to empty: {e}", dir.display());
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", dir.display())),
        }
    }
}

// --- processes the lab started ------------------------------------------------------

/// A process the lab started, identified by PID *and* start time so that a PID reused
/// by an unrelated process after a reboot or crash is never signalled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub name: String,
    pub pid: i32,
    pub start_time: u64,
    pub log: PathBuf,
}

pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), counted after the ")" that closes the command name.
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

impl ProcessRecord {
    pub fn is_running(&self) -> bool {
        alive(self.pid) && start_time(self.pid) == Some(self.start_time)
    }

    pub fn stop(&self) {
        if self.is_running() {
            terminate(self.pid);
            if !wait_gone(&[self.pid], std::time::Duration::from_secs(5)) && self.is_running() {
                kill(self.pid);
                wait_gone(&[self.pid], std::time::Duration::from_secs(2));
            }
        }
    }
}

/// Starts a long-running process with stdout and stderr appended to `log`.
pub fn spawn_daemon(name: &str, mut cmd: Command, log: &Path) -> Result<ProcessRecord> {
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d)?;
    }
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let child = cmd.spawn().with_context(|| format!("starting {name}: {}", describe(&cmd)))?;
    let pid = child.id() as i32;
    // The child is reaped by init once we exit; dropping the handle does not kill it.
    std::mem::forget(child);
    let start_time =
        start_time(pid).ok_or_else(|| anyhow!("{name} (pid {pid}) exited at once; see {}", log.display()))?;
    Ok(ProcessRecord { name: name.to_string(), pid, start_time, log: log.to_path_buf() })
}

pub fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<String> = s.lines().map(|l| l.chars().take(300).collect()).collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
