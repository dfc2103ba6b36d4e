//! Who is behind a flow: pods as plain data, indexed by IP (for destinations) and, for
//! the pods of this node, by network namespace cookie (for sources).
//!
//! The socket hooks run before the kernel binds a connecting socket, so their events
//! carry the client's netns cookie instead of a source IP. A cookie is found the way
//! the kernel defines it: a socket created inside the pod's netns and asked for
//! `SO_NETNS_COOKIE`. The pod's netns is reached through one of its processes, found
//! in the cgroup tree under the agent's `--cgroup` (kubelets name a pod's cgroup after
//! its UID, with `_` for `-` under the systemd driver).

use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The part of a Pod a flow record shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ip: Option<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Shares the node's netns and IP, so neither identifies it.
    pub host_network: bool,
}

/// None for a pod without a UID (never the case for an object read from the API).
pub fn pod_info(p: &Pod) -> Option<PodInfo> {
    let m = &p.metadata;
    Some(PodInfo {
        uid: m.uid.clone()?,
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        ip: p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|s| s.parse().ok()),
        labels: m.labels.clone().unwrap_or_default(),
        host_network: p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
    })
}

/// Pods by namespace/name (the watch's key), by IP and by UID.
#[derive(Debug, Default)]
pub struct PodIndex {
    by_key: HashMap<(String, String), PodInfo>,
    by_ip: HashMap<IpAddr, (String, String)>,
    by_uid: HashMap<String, (String, String)>,
    pub listed: bool,
}

impl PodIndex {
    pub fn get(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.by_key.get(&(namespace.to_string(), name.to_string()))
    }

    /// Host-network pods are not indexed by IP: their IP is the node's.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.by_key.get(self.by_ip.get(&ip)?)
    }

    pub fn by_uid(&self, uid: &str) -> Option<&PodInfo> {
        self.by_key.get(self.by_uid.get(uid)?)
    }

    /// Pods of `node` that have a netns of their own.
    pub fn local<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PodInfo> + 'a {
        self.by_key.values().filter(move |p| !p.host_network && p.node.as_deref() == Some(node))
    }

    /// Returns the old value.
    pub fn set(&mut self, namespace: &str, name: &str, v: Option<PodInfo>) -> Option<PodInfo> {
        let key = (namespace.to_string(), name.to_string());
        let old = match v {
            Some(p) => self.by_key.insert(key.clone(), p),
            None => self.by_key.remove(&key),
        };
        if let Some(o) = &old {
            self.by_uid.remove(&o.uid);
        }
        if let Some(ip) = old.as_ref().and_then(|o| o.ip) {
            // A pod IP is reused after its pod is gone; only drop the entry if it is ours.
            if self.by_ip.get(&ip) == Some(&key) {
                self.by_ip.remove(&ip);
            }
        }
        if let Some(p) = self.by_key.get(&key) {
            self.by_uid.insert(p.uid.clone(), key.clone());
            if let (Some(ip), false) = (p.ip, p.host_network) {
                self.by_ip.insert(ip, key);
            }
        }
        old
    }

    pub fn replace_all(&mut self, all: Vec<PodInfo>) {
        self.by_key.clear();
        self.by_ip.clear();
        self.by_uid.clear();
        for p in all {
            let (ns, name) = (p.namespace.clone(), p.name.clone());
            self.set(&ns, &name, Some(p));
        }
        self.listed = true;
    }
}

/// cgroup directories under `root` that belong to each of `uids`, and the PIDs found in
/// them and their descendants (containers are child cgroups of the pod's).
pub fn pids_by_pod(root: &Path, uids: &[String]) -> HashMap<String, Vec<u32>> {
    let mut out: HashMap<String, Vec<u32>> = HashMap::new();
    // Kubelets put pods at most a few levels deep (kubepods/<qos>/pod<uid>/<container>).
    walk(root, uids, None, 8, &mut out);
    out
}

fn uid_in(name: &str, uids: &[String]) -> Option<String> {
    uids.iter().find(|u| name.contains(u.as_str()) || name.contains(&u.replace('-', "_"))).cloned()
}

fn walk(dir: &Path, uids: &[String], inherited: Option<String>, depth: u32, out: &mut HashMap<String, Vec<u32>>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = inherited.clone().or_else(|| uid_in(&name, uids));
        if let Some(uid) = &owner {
            if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
                out.entry(uid.clone()).or_default().extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        if depth > 0 {
            walk(&path, uids, owner, depth - 1, out);
        }
    }
}

/// The netns cookie of the namespace `nsfs` (an open `/proc/<pid>/ns/net`). Moves the
/// calling thread into that namespace: call it only on a thread that ends afterwards.
fn cookie_in(nsfs: &std::fs::File) -> std::io::Result<u64> {
    // SAFETY: plain syscalls on fds we own; the socket fd is wrapped to be closed.
    unsafe {
        if libc::setns(nsfs.as_raw_fd(), libc::CLONE_NEWNET) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        netns_cookie_of_socket(sock.as_raw_fd())
    }
}

/// `getsockopt(SO_NETNS_COOKIE)`: the cookie of the netns the socket was created in.
pub fn netns_cookie_of_socket(fd: i32) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len outlive the call and len is v's size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut v as *mut u64).cast(), &mut len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Netns cookie → pod UID for `uids`, found under cgroup `root`. Runs on a thread of its
/// own, which ends afterwards: it enters other network namespaces.
///
/// Each namespace is entered on every scan (tens of µs each) rather than remembered by
/// its nsfs inode: inode numbers are reused once a netns is gone, and a remembered one
/// could give a new pod a dead pod's cookie.
pub fn resolve_cookies(root: PathBuf, uids: Vec<String>) -> HashMap<u64, String> {
    let worker = std::thread::spawn(move || {
        let mut found = HashMap::new();
        for (uid, pids) in pids_by_pod(&root, &uids) {
            for pid in pids {
                let Ok(f) = std::fs::File::open(format!("/proc/{pid}/ns/net")) else {
                    continue;
                };
                match cookie_in(&f) {
                    Ok(c) => {
                        found.insert(c, uid.clone());
                        break;
                    }
                    Err(e) => tracing::debug!("netns of pid {pid} (pod {uid}): {e}"),
                }
            }
        }
        found
    });
    worker.join().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str, node: &str, host: bool) -> PodInfo {
        PodInfo {
            uid: format!("uid-{name}"),
            namespace: "ns".into(),
            name: name.into(),
            node: Some(node.into()),
            ip: ip.parse().ok(),
            labels: BTreeMap::new(),
            host_network: host,
        }
    }

    #[test]
    fn from_api_object() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "1234-ab", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"podIP": "10.244.1.7"}
        }))
        .unwrap();
        let i = pod_info(&p).unwrap();
        assert_eq!((i.namespace.as_str(), i.name.as_str(), i.uid.as_str()), ("shop", "web-1", "1234-ab"));
        assert_eq!(i.ip, Some("10.244.1.7".parse().unwrap()));
        assert_eq!(i.labels["app"], "web");
        assert!(!i.host_network);
    }

    #[test]
    fn ip_index_survives_reuse_and_skips_host_network() {
        let mut idx = PodIndex::default();
        idx.set("ns", "a", Some(pod("a", "10.0.0.1", "n1", false)));
        idx.set("ns", "h", Some(pod("h", "192.168.0.1", "n1", true)));
        assert_eq!(idx.by_ip("10.0.0.1".parse().unwrap()).unwrap().name, "a");
        assert!(idx.by_ip("192.168.0.1".parse().unwrap()).is_none());
        // b gets a's IP before a's deletion arrives: deleting a must not unmap b.
        idx.set("ns", "b", Some(pod("b", "10.0.0.1", "n2", false)));
        idx.set("ns", "a", None);
        assert_eq!(idx.by_ip("10.0.0.1".parse().unwrap()).unwrap().name, "b");
        assert_eq!(idx.local("n1").map(|p| p.name.clone()).collect::<Vec<_>>(), Vec::<String>::new());
        assert_eq!(idx.by_uid("uid-b").unwrap().name, "b");
    }

    #[test]
    fn cgroup_dirs_found_by_uid_in_both_driver_spellings() {
        let dir = std::env::temp_dir().join(format!("ks-pods-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let systemd = dir.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12ab_34cd.slice");
        std::fs::create_dir_all(systemd.join("cri-containerd-aaa.scope")).unwrap();
        std::fs::write(systemd.join("cri-containerd-aaa.scope/cgroup.procs"), "101\n102\n").unwrap();
        std::fs::write(systemd.join("cgroup.procs"), "").unwrap();
        let cgroupfs = dir.join("pod-56ef-78ab");
        std::fs::create_dir_all(&cgroupfs).unwrap();
        std::fs::write(cgroupfs.join("cgroup.procs"), "201\n").unwrap();
        std::fs::create_dir_all(dir.join("other")).unwrap();
        std::fs::write(dir.join("other/cgroup.procs"), "301\n").unwrap();

        let got = pids_by_pod(&dir, &["12ab-34cd".into(), "56ef-78ab".into(), "99".into()]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got["12ab-34cd"], vec![101, 102]);
        assert_eq!(got["56ef-78ab"], vec![201]);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn cookie_of_a_process_is_its_netns_cookie() {
        // This process in a fake pod cgroup: the resolved cookie must be the one the
        // kernel reports for a socket of this very netns.
        let dir = std::env::temp_dir().join(format!("ks-cookie-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pod-u1")).unwrap();
        std::fs::write(dir.join("pod-u1/cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
        let found = resolve_cookies(dir.clone(), vec!["u1".into()]);
        std::fs::remove_dir_all(&dir).unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mine = netns_cookie_of_socket(sock.as_raw_fd()).unwrap();
        assert_eq!(found.get(&mine).map(String::as_str), Some("u1"), "{found:?}");
    }
}
