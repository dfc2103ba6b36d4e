//! `lab down`: removes everything a lab made. It works from the state file when there
//! is one and also by name prefix, so a crashed `lab up` (or a crashed test) is
//! cleaned up too; running it twice is fine.

use crate::spec::{self, LabSpec};
use crate::state::LabState;
use crate::sys;
use anyhow::Result;
use std::path::PathBuf;

pub fn cgroup_dir(lab: &str) -> Option<PathBuf> {
    sys::cgroup2_root().ok().map(|r| r.join(format!("kubeshift-lab-{lab}")))
}

pub fn bpffs_dir(lab: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(format!("kubeshift-lab-{lab}"))
}

fn prefix(lab: &str) -> String {
    format!("ks-{lab}-")
}

/// What of a lab is still on the machine, one line per thing. Empty means clean.
pub fn leftovers(lab: &str) -> Vec<String> {
    let mut v: Vec<String> =
        sys::list_netns_with_prefix(&prefix(lab)).into_iter().map(|n| format!("netns {n}")).collect();
    if let Some(c) = cgroup_dir(lab).filter(|c| c.exists()) {
        v.push(format!("cgroup {}", c.display()));
    }
    let b = bpffs_dir(lab);
    if b.exists() {
        v.push(format!("bpffs {}", b.display()));
    }
    let d = spec::state_dir(lab);
    if let Ok(Some(st)) = LabState::load(&d) {
        for p in st.processes.iter().filter(|p| p.is_running()) {
            v.push(format!("process {} (pid {})", p.name, p.pid));
        }
    }
    if d.exists() {
        v.push(format!("state dir {}", d.display()));
    }
    v
}

pub fn down(lab: &str) -> Result<Vec<String>> {
    let mut removed = vec![];
    let dir = spec::state_dir(lab);
    let state = LabState::load(&dir).ok().flatten();

    // Processes outside the lab's namespaces (the forwarder) are stopped by PID and
    // start time; processes inside die with their namespace below.
    if let Some(st) = &state {
        for p in st.processes.iter().rev() {
            if p.is_running() {
                p.stop();
                removed.push(format!("process {} (pid {})", p.name, p.pid));
            }
        }
    }

    // Pods first (their CNI plumbing hangs off the nodes), then nodes, then the
    // control plane, then the underlay.
    let mut all = sys::list_netns_with_prefix(&prefix(lab));
    let rank = |n: &str| {
        if n.contains("-pod-") {
            0
        } else if n.ends_with("-underlay") {
            3
        } else if n.ends_with("-cp") {
            2
        } else {
            1
        }
    };
    all.sort_by_key(|n| rank(n));
    let mut errors = vec![];
    for n in all {
        match sys::netns_delete(&n) {
            Ok(()) => removed.push(format!("netns {n}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }

    if let Some(c) = cgroup_dir(lab).filter(|c| c.exists()) {
        match sys::cgroup_remove_tree(&c) {
            Ok(()) => removed.push(format!("cgroup {}", c.display())),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let b = bpffs_dir(lab);
    if b.exists() {
        match std::fs::remove_dir_all(&b) {
            Ok(()) => removed.push(format!("bpffs {}", b.display())),
            Err(e) => errors.push(format!("{}: {e}", b.display())),
        }
    }
    if dir.exists() {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(format!("state dir {}", dir.display())),
            Err(e) => errors.push(format!("{}: {e}", dir.display())),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("lab {lab}: could not remove everything:\n  {}", errors.join("\n  "));
    }
    Ok(removed)
}

/// Used by `lab up` to refuse a name that is in use by a different lab spec.
pub fn exists(spec: &LabSpec) -> bool {
    !leftovers(&spec.name).is_empty()
}
