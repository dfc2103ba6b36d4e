//! Node-local IPAM, host-local style: one file per allocated address under
//! `<dataDir>/<network name>/`, named by the address, holding `<container id>\r\n<ifname>`
//! (host-local's own format, so its tooling and habits carry over).
//!
//! A file is created with O_CREAT|O_EXCL, so two concurrent ADDs can never both win one
//! address: the kernel picks the winner, no lock file is needed. The files are the state,
//! so allocations survive plugin, agent and node restarts (dataDir should be on disk,
//! not tmpfs, for the last one).

use std::{
    collections::HashSet,
    fs::{self, OpenOptions},
    io::{self, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// An IPv4 range `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = s.split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok()?;
        if prefix > 32 {
            return None;
        }
        Some(Self { addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix)), prefix })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }

    /// The usable host addresses: without the network and broadcast addresses (except
    /// for /31 and /32, which have none).
    pub fn hosts(&self) -> (u32, u32) {
        let first = u32::from(self.addr);
        let last = first | !Self::mask(self.prefix);
        if self.prefix >= 31 {
            (first, last)
        } else {
            (first + 1, last - 1)
        }
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("range {range} of network {network} is exhausted: all {size} addresses are allocated (under {dir})")]
    Exhausted { range: Ipv4Net, network: String, size: u32, dir: PathBuf },
    #[error("IPAM state {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Name of the file host-local keeps its round-robin cursor in.
const LAST_RESERVED: &str = "last_reserved_ip.0";

pub struct Ipam {
    pub records: Records,
    network: String,
    range: Ipv4Net,
    /// Never handed out (the gateway, when it lies inside the range).
    reserved: Vec<Ipv4Addr>,
}

/// The allocation records of one network, without its range: all it takes to read and
/// free them (the agent's leak collection has no range at hand on a standby node).
pub struct Records {
    dir: PathBuf,
}

/// `<container id>\r\n<ifname>`.
fn parse_record(content: &str) -> (String, String) {
    let mut lines = content.lines().map(str::trim);
    let id = lines.next().unwrap_or("").to_string();
    (id, lines.next().unwrap_or("").to_string())
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> IpamError + '_ {
    move |source| IpamError::Io { path: path.to_path_buf(), source }
}

impl Ipam {
    pub fn new(data_dir: &Path, network: &str, range: Ipv4Net, reserved: Vec<Ipv4Addr>) -> Self {
        Self { records: Records::new(data_dir, network), network: network.to_string(), range, reserved }
    }

    /// Allocates one address for (container, ifname). Starts after the last handed-out
    /// address, as host-local does, so a just-released address is not reused at once
    /// (a stale conntrack entry or a peer's ARP cache may still point at it).
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<Ipv4Addr, IpamError> {
        fs::create_dir_all(&self.records.dir).map_err(io_err(&self.records.dir))?;
        let (first, last) = self.range.hosts();
        let size = last - first + 1;
        let cursor = fs::read_to_string(self.records.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|c| (first..=last).contains(c));
        let start = cursor.map(|c| if c == last { first } else { c + 1 }).unwrap_or(first);
        for i in 0..size {
            let ip = Ipv4Addr::from(first + (start - first + i) % size);
            if self.reserved.contains(&ip) {
                continue;
            }
            let path = self.records.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{container_id}\r\n{ifname}").as_bytes()).map_err(io_err(&path))?;
                    // The cursor is a hint only: losing a race on it costs a retry, never
                    // a duplicate (create_new above is the arbiter).
                    let _ = fs::write(self.records.dir.join(LAST_RESERVED), ip.to_string());
                    return Ok(ip);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(IpamError::Io { path, source: e }),
            }
        }
        Err(IpamError::Exhausted {
            range: self.range,
            network: self.network.clone(),
            size,
            dir: self.records.dir.clone(),
        })
    }
}

impl Records {
    pub fn new(data_dir: &Path, network: &str) -> Self {
        Self { dir: data_dir.join(network) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The addresses that have a record, from the file names alone (nothing is read).
    pub fn addresses(&self) -> Result<Vec<Ipv4Addr>, IpamError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(IpamError::Io { path: self.dir.clone(), source: e }),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io_err(&self.dir))?;
            out.extend(e.file_name().to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()));
        }
        out.sort();
        Ok(out)
    }

    /// All allocations: (address, container id, ifname).
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, String, String)>, IpamError> {
        let mut out = Vec::new();
        for ip in self.addresses()? {
            // A file can vanish between readdir and read (a concurrent DEL): skip it.
            let Ok(content) = fs::read_to_string(self.dir.join(ip.to_string())) else { continue };
            let (id, ifname) = parse_record(&content);
            out.push((ip, id, ifname));
        }
        Ok(out)
    }

    /// The address held by (container, ifname), if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self.list()?.into_iter().find(|(_, id, ifn)| id == container_id && ifn == ifname).map(|(ip, ..)| ip))
    }

    /// Frees whatever (container, ifname) holds; nothing held is not an error (DEL is
    /// idempotent). Returns the freed addresses.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Ipv4Addr>, IpamError> {
        let mut freed = Vec::new();
        for (ip, id, ifn) in self.list()? {
            if id == container_id && ifn == ifname {
                self.remove(ip)?;
                freed.push(ip);
            }
        }
        Ok(freed)
    }

    /// Frees a single address (the undo of an allocate).
    pub fn remove(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(IpamError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    /// GC: frees every allocation whose (container, ifname) is not in `valid`. Returns
    /// what was freed, so the caller can remove the matching host interfaces too.
    pub fn gc(&self, valid: &HashSet<(String, String)>) -> Result<Vec<(Ipv4Addr, String, String)>, IpamError> {
        let mut freed = Vec::new();
        for (ip, id, ifn) in self.list()? {
            if !valid.contains(&(id.clone(), ifn.clone())) {
                self.remove(ip)?;
                freed.push((ip, id, ifn));
            }
        }
        Ok(freed)
    }

    /// The record of `ip`: container id, ifname and time since it was written; None
    /// when the address is free.
    pub fn record(&self, ip: Ipv4Addr) -> Result<Option<(String, String, std::time::Duration)>, IpamError> {
        let path = self.dir.join(ip.to_string());
        let read = fs::read_to_string(&path).and_then(|c| Ok((c, fs::metadata(&path)?.modified()?)));
        let (content, written) = match read {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(IpamError::Io { path, source: e }),
        };
        let (id, ifname) = parse_record(&content);
        // A clock stepped back makes a record look new: it is then kept, never freed early.
        let age = written.elapsed().unwrap_or_default();
        Ok(Some((id, ifname, age)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ks-cni-ipam-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn concurrent_allocations_never_share_an_address() {
        let d = tmp("conc");
        let range = Ipv4Net::parse("10.77.0.0/24").unwrap();
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let ipam = Ipam::new(&d, "net", range, vec![]);
                    (0..15).map(|i| ipam.allocate(&format!("c{t}-{i}"), "eth0").unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Ipv4Addr> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert_eq!(all.len(), 240);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 240, "an address was handed out twice");
        // Survives a "restart": a fresh Ipam sees the same allocations.
        assert_eq!(Ipam::new(&d, "net", range, vec![]).records.list().unwrap().len(), 240);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exhaustion_names_the_range_and_gateway_is_skipped() {
        let d = tmp("exh");
        let range = Ipv4Net::parse("10.78.0.0/30").unwrap();
        let ipam = Ipam::new(&d, "net", range, vec![Ipv4Addr::new(10, 78, 0, 1)]);
        assert_eq!(ipam.allocate("a", "eth0").unwrap(), Ipv4Addr::new(10, 78, 0, 2));
        let e = ipam.allocate("b", "eth0").unwrap_err().to_string();
        assert!(e.contains("10.78.0.0/30") && e.contains("exhausted"), "{e}");
        assert_eq!(ipam.records.release("a", "eth0").unwrap(), vec![Ipv4Addr::new(10, 78, 0, 2)]);
        assert!(ipam.records.release("a", "eth0").unwrap().is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn gc_frees_only_vanished_containers() {
        let d = tmp("gc");
        let ipam = Ipam::new(&d, "net", Ipv4Net::parse("10.79.0.0/24").unwrap(), vec![]);
        ipam.allocate("keep", "eth0").unwrap();
        ipam.allocate("gone", "eth0").unwrap();
        let valid = HashSet::from([("keep".to_string(), "eth0".to_string())]);
        let freed = ipam.records.gc(&valid).unwrap();
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0].1, "gone");
        assert_eq!(ipam.records.list().unwrap().len(), 1);
        fs::remove_dir_all(&d).unwrap();
    }
}
