//! [`PolicyInput`] → [`Compiled`]: identities, ipcache, isolation and policy entries.
//!
//! # Identities
//!
//! An identity stands for a set of addresses that every policy treats alike, so that the
//! kernel's two lookups (ipcache LPM: address → identity; policy LPM: (local, peer,
//! direction, protocol, port), exact peer first, then [`ANY_PEER`]) give exactly the
//! verdict the policies mean. Its key is therefore everything a policy can look at:
//!
//! - pod addresses (`/32`): namespace, namespace labels, pod labels, named ports, the
//!   set of ipBlocks the address is in, and whether it is also one of `host_ips`;
//! - node addresses (`host_ips`, `/32`): the set of ipBlocks they are in;
//! - everything else: the ipcache holds `0.0.0.0/0` and every ipBlock `cidr` and `except`
//!   as a prefix; an address whose longest match is prefix `p` is in block B exactly when
//!   `p` lies inside B's cidr and inside none of its excepts (any longer prefix of the set
//!   inside `p` has its own entry, so the answer cannot change within `p`'s region).
//!   Prefixes with the same set of blocks share an identity.
//!
//! The same key keeps its number across compiles ([`Compiler`]); new keys get numbers
//! that were not handed out before (a counter that only grows, wrapping past `u32::MAX`
//! and skipping numbers still in use), so a stale kernel entry of a vanished key never
//! applies to a new one.
//!
//! # Entries
//!
//! For every policy, every pod identity it selects (only those with a pod on
//! `local_node`, if given) is isolated in the policy's directions, and for each rule,
//! each peer identity (or [`ANY_PEER`] for a rule without peers) gets the rule's ports.
//! Named ports resolve against the destination: the selected identity for ingress, the
//! peer for egress (for an egress rule without peers, every pod identity that has the
//! name becomes an exact peer). Per (local, peer, direction) the allowed ports are merged
//! into intervals, what the [`ANY_PEER`] entry of the same (local, direction) already
//! allows is removed from the exact peers, and the rest is cut into aligned power-of-two
//! blocks (an interval costs at most 2·16 blocks). Every ingress-isolated identity also
//! allows everything from the node's own addresses.
//!
//! # Cost
//!
//! With N pods, B distinct ipBlocks, E prefixes (≤ 1 + cidrs + excepts), P policies with
//! R rules of K peers each and I identities: identities take O((N + E)·B) containment
//! tests; selecting takes O(P·I) selector matches (only identities of the policy's
//! namespace are tried), peers O(P·R·K·I); the output is the sum over rules of
//! |selected| × |peers| × port blocks, which is also the size of the kernel map. That
//! product is inherent to a (local, peer) map: a policy that selects every pod of a
//! namespace and allows every pod of the cluster costs namespace identities × cluster
//! identities entries. Accumulating per (local, peer, direction) before expanding keeps
//! duplicates from ever reaching the output.
//!
//! Measured (`tests::compile_time_at_scale`, `cargo test --release -p kubeshift-datapath
//! --lib policy::tests::compile_time -- --ignored --nocapture`, 2 shared cores, load ~8):
//! 10,000 pods, 500 namespaces, 1,000 policies (default deny + one allow per namespace,
//! named ports, namespaceSelector, an egress ipBlock with a 443–8443 range): 2,553
//! identities, 393,500 entries, 0.31 s for all nodes, 0.09 s for one node (19,650
//! entries). With a different `except` in every namespace's ipBlock (256 extra world
//! identities): 1,726,000 entries, 0.70 s, one node 0.12 s. Entries there are dominated
//! by (selected identities × world identities inside the block × port blocks of the range).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use super::model::{
    Cidr, Compiled, Direction, Identity, IdentityInfo, IdentityKind, IpBlock, NamedPort, Peer, PolicyEntry,
    PolicyInput, PortRef, PortRule, ANY_PEER,
};
use crate::Protocol;

/// An ipBlock as the compiler compares it: excepts sorted and deduplicated.
type BlockKey = (Cidr, Vec<Cidr>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum IdentityKey {
    Pod {
        namespace: String,
        namespace_labels: BTreeMap<String, String>,
        labels: BTreeMap<String, String>,
        named_ports: Vec<NamedPort>,
        blocks: Vec<BlockKey>,
        host: bool,
    },
    Host {
        blocks: Vec<BlockKey>,
    },
    World {
        blocks: Vec<BlockKey>,
    },
}

/// Keeps identity numbers stable across compiles.
#[derive(Debug, Clone)]
pub struct Compiler {
    ids: HashMap<IdentityKey, Identity>,
    next: Identity,
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

impl Compiler {
    pub fn new() -> Self {
        Self::starting_at(1)
    }

    /// For a restarted agent: hand out numbers from `next` on (e.g. one above the
    /// highest identity found in the pinned maps), so numbers the kernel still holds
    /// are not given to other keys.
    pub fn starting_at(next: Identity) -> Self {
        Compiler { ids: HashMap::new(), next: next.max(1) }
    }

    fn allocate(&mut self, in_use: &HashSet<Identity>) -> Identity {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if id != ANY_PEER && !in_use.contains(&id) {
                return id;
            }
        }
    }

    /// `local_node`: emit isolation and entries only for identities with a pod on that
    /// node (the ipcache always covers every pod and prefix).
    pub fn compile(&mut self, input: &PolicyInput, local_node: Option<&str>) -> Compiled {
        let blocks = collect_blocks(input);
        let views = build_views(input, &blocks);

        // Numbers: known keys keep theirs; new keys, in key order so that the result does
        // not depend on hash order, get fresh ones.
        self.ids.retain(|k, _| views.by_key.contains_key(k));
        let mut in_use: HashSet<Identity> = self.ids.values().copied().collect();
        let mut ids = Vec::with_capacity(views.list.len());
        let mut fresh: Vec<usize> = Vec::new();
        for (i, v) in views.list.iter().enumerate() {
            match self.ids.get(&v.key) {
                Some(id) => ids.push(*id),
                None => {
                    ids.push(ANY_PEER);
                    fresh.push(i);
                }
            }
        }
        fresh.sort_by(|a, b| views.list[*a].key.cmp(&views.list[*b].key));
        for i in fresh {
            let id = self.allocate(&in_use);
            in_use.insert(id);
            self.ids.insert(views.list[i].key.clone(), id);
            ids[i] = id;
        }

        let mut out = Compiled::default();
        for (v, id) in views.list.iter().zip(&ids) {
            out.identities.insert(*id, v.info());
        }
        out.ipcache = views.prefixes.iter().map(|(c, i)| (*c, ids[*i])).collect();
        out.ipcache.sort();

        let mut acc = Accumulator::default();
        for policy in &input.policies {
            let selected: Vec<usize> = views
                .pods_in(&policy.namespace)
                .filter(|i| {
                    let v = &views.list[*i];
                    local_node.is_none_or(|n| v.nodes.contains(n)) && policy.pod_selector.matches(v.labels())
                })
                .collect();
            if selected.is_empty() {
                continue;
            }
            let mut directions = policy.policy_types.clone();
            directions.sort();
            directions.dedup();
            for dir in directions {
                for &l in &selected {
                    let iso = out.isolation.entry(ids[l]).or_default();
                    match dir {
                        Direction::Ingress => iso.ingress = true,
                        Direction::Egress => iso.egress = true,
                    }
                }
                let rules = match dir {
                    Direction::Ingress => &policy.ingress,
                    Direction::Egress => &policy.egress,
                };
                for rule in rules {
                    let peers: Option<BTreeSet<usize>> = if rule.peers.is_empty() {
                        None
                    } else {
                        let mut set = BTreeSet::new();
                        for peer in &rule.peers {
                            views.matching(peer, &policy.namespace, &blocks, &mut set);
                        }
                        Some(set)
                    };
                    let ports = PortSpec::new(&rule.ports);
                    let mut add = |local: usize, peer: Identity, cov: &Coverage| {
                        if !cov.is_empty() {
                            acc.add((ids[local], peer, dir), cov);
                        }
                    };
                    match (dir, &peers) {
                        (Direction::Ingress, _) => {
                            for &l in &selected {
                                let cov = ports.resolve(views.list[l].named_ports());
                                match &peers {
                                    None => add(l, ANY_PEER, &cov),
                                    Some(ps) => ps.iter().for_each(|p| add(l, ids[*p], &cov)),
                                }
                            }
                        }
                        (Direction::Egress, None) => {
                            let cov = ports.resolve(&[]);
                            selected.iter().for_each(|l| add(*l, ANY_PEER, &cov));
                            if !ports.named.is_empty() {
                                for (p, v) in views.list.iter().enumerate() {
                                    let cov = ports.resolve_named_only(v.named_ports());
                                    selected.iter().for_each(|l| add(*l, ids[p], &cov));
                                }
                            }
                        }
                        (Direction::Egress, Some(ps)) => {
                            for &p in ps {
                                let cov = ports.resolve(views.list[p].named_ports());
                                selected.iter().for_each(|l| add(*l, ids[p], &cov));
                            }
                        }
                    }
                }
            }
        }

        // The node may always reach its pods (kubelet probes).
        let from_node: Vec<Identity> =
            views.list.iter().zip(&ids).filter(|(v, _)| v.is_host()).map(|(_, id)| *id).collect();
        let all = Coverage::all();
        for (local, iso) in &out.isolation {
            if iso.ingress {
                for h in &from_node {
                    acc.add((*local, *h, Direction::Ingress), &all);
                }
            }
        }

        out.entries = acc.finish();
        out
    }
}

/// Every ipBlock of every rule that takes effect, deduplicated, in a fixed order.
fn collect_blocks(input: &PolicyInput) -> Vec<BlockKey> {
    let mut set = BTreeSet::new();
    for p in &input.policies {
        for dir in &p.policy_types {
            let rules = match dir {
                Direction::Ingress => &p.ingress,
                Direction::Egress => &p.egress,
            };
            for peer in rules.iter().flat_map(|r| &r.peers) {
                if let Peer::IpBlock(b) = peer {
                    set.insert(block_key(b));
                }
            }
        }
    }
    set.into_iter().collect()
}

fn block_key(b: &IpBlock) -> BlockKey {
    let mut except: Vec<Cidr> = b.except.iter().map(|e| Cidr::new(e.addr, e.prefix)).collect();
    except.sort();
    except.dedup();
    (Cidr::new(b.cidr.addr, b.cidr.prefix), except)
}

/// Indices into `blocks` of the blocks that contain every address of `p`, for a `p`
/// that no cidr or except of `blocks` cuts in two (see the module docs).
fn membership(p: &Cidr, blocks: &[BlockKey]) -> Vec<usize> {
    blocks
        .iter()
        .enumerate()
        .filter(|(_, (cidr, except))| cidr.covers(p) && !except.iter().any(|e| e.covers(p)))
        .map(|(i, _)| i)
        .collect()
}

struct View {
    key: IdentityKey,
    /// Block indices, sorted (the key holds the blocks themselves).
    blocks: Vec<usize>,
    members: BTreeSet<String>,
    nodes: HashSet<String>,
    prefixes: Vec<Cidr>,
}

impl View {
    fn is_host(&self) -> bool {
        matches!(self.key, IdentityKey::Host { .. } | IdentityKey::Pod { host: true, .. })
    }

    fn labels(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        match &self.key {
            IdentityKey::Pod { labels, .. } => labels,
            _ => &EMPTY,
        }
    }

    fn named_ports(&self) -> &[NamedPort] {
        match &self.key {
            IdentityKey::Pod { named_ports, .. } => named_ports,
            _ => &[],
        }
    }

    fn info(&self) -> IdentityInfo {
        match &self.key {
            IdentityKey::Pod { namespace, labels, .. } => IdentityInfo {
                kind: IdentityKind::Pod { namespace: namespace.clone(), labels: labels.clone() },
                members: self.members.iter().cloned().collect(),
            },
            IdentityKey::Host { .. } => {
                IdentityInfo { kind: IdentityKind::Host, members: self.members.iter().cloned().collect() }
            }
            // One identity may cover several prefixes: `cidr` is the widest (first in
            // order), `members` lists them all.
            IdentityKey::World { .. } => IdentityInfo {
                kind: IdentityKind::World {
                    cidr: self
                        .prefixes
                        .iter()
                        .min_by_key(|c| (c.prefix, c.addr))
                        .copied()
                        .unwrap_or(Cidr::new(Ipv4Addr::UNSPECIFIED, 0)),
                },
                members: self.members.iter().cloned().collect(),
            },
        }
    }
}

struct Views {
    list: Vec<View>,
    by_key: HashMap<IdentityKey, usize>,
    /// Pod views per namespace.
    by_namespace: HashMap<String, Vec<usize>>,
    /// Namespace name → its labels (as the pods' keys saw them).
    namespace_labels: HashMap<String, BTreeMap<String, String>>,
    /// Block index → views whose addresses are in it.
    in_block: Vec<Vec<usize>>,
    prefixes: Vec<(Cidr, usize)>,
}

fn build_views(input: &PolicyInput, blocks: &[BlockKey]) -> Views {
    // A name listed twice: the first entry counts (the oracle reads it the same way).
    let mut namespace_labels: HashMap<&str, &BTreeMap<String, String>> = HashMap::new();
    for n in &input.namespaces {
        namespace_labels.entry(&n.name).or_insert(&n.labels);
    }
    let no_labels = BTreeMap::new();
    let hosts: HashSet<Ipv4Addr> = input.host_ips.iter().copied().collect();
    let block_keys = |idx: &[usize]| idx.iter().map(|i| blocks[*i].clone()).collect::<Vec<_>>();

    let mut views = Views {
        list: Vec::new(),
        by_key: HashMap::new(),
        by_namespace: HashMap::new(),
        namespace_labels: HashMap::new(),
        in_block: vec![Vec::new(); blocks.len()],
        prefixes: Vec::new(),
    };
    let mut claimed: HashSet<Cidr> = HashSet::new();

    // Pods first: an address that is both a pod's and a prefix's is the pod's. Two pods
    // claiming one address: the first wins (the oracle looks pods up in the same order).
    for pod in &input.pods {
        for ip in &pod.ips {
            let prefix = Cidr::host(*ip);
            if !claimed.insert(prefix) {
                continue;
            }
            let idx = membership(&prefix, blocks);
            let mut named_ports = pod.named_ports.clone();
            named_ports.sort();
            named_ports.dedup();
            let key = IdentityKey::Pod {
                namespace: pod.namespace.clone(),
                namespace_labels: (*namespace_labels.get(pod.namespace.as_str()).unwrap_or(&&no_labels)).clone(),
                labels: pod.labels.clone(),
                named_ports,
                blocks: block_keys(&idx),
                host: hosts.contains(ip),
            };
            let member = format!("{}/{}", pod.namespace, pod.name);
            views.add(key, idx, prefix, member, Some(&pod.node));
        }
    }
    for ip in &input.host_ips {
        let prefix = Cidr::host(*ip);
        if !claimed.insert(prefix) {
            continue;
        }
        let idx = membership(&prefix, blocks);
        let key = IdentityKey::Host { blocks: block_keys(&idx) };
        views.add(key, idx, prefix, ip.to_string(), None);
    }
    let mut world: BTreeSet<Cidr> = BTreeSet::new();
    world.insert(Cidr::new(Ipv4Addr::UNSPECIFIED, 0));
    for (cidr, except) in blocks {
        world.insert(*cidr);
        world.extend(except.iter().copied());
    }
    for prefix in world {
        if !claimed.insert(prefix) {
            continue;
        }
        let idx = membership(&prefix, blocks);
        let key = IdentityKey::World { blocks: block_keys(&idx) };
        views.add(key, idx, prefix, prefix.to_string(), None);
    }

    for (i, v) in views.list.iter().enumerate() {
        for b in &v.blocks {
            views.in_block[*b].push(i);
        }
        if let IdentityKey::Pod { namespace, namespace_labels, .. } = &v.key {
            views.by_namespace.entry(namespace.clone()).or_default().push(i);
            views.namespace_labels.entry(namespace.clone()).or_insert_with(|| namespace_labels.clone());
        }
    }
    views
}

impl Views {
    fn add(&mut self, key: IdentityKey, blocks: Vec<usize>, prefix: Cidr, member: String, node: Option<&str>) {
        let i = match self.by_key.get(&key) {
            Some(i) => *i,
            None => {
                self.by_key.insert(key.clone(), self.list.len());
                self.list.push(View {
                    key,
                    blocks,
                    members: BTreeSet::new(),
                    nodes: HashSet::new(),
                    prefixes: Vec::new(),
                });
                self.list.len() - 1
            }
        };
        let v = &mut self.list[i];
        v.members.insert(member);
        v.nodes.extend(node.map(str::to_string));
        v.prefixes.push(prefix);
        self.prefixes.push((prefix, i));
    }

    fn pods_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = usize> + 'a {
        self.by_namespace.get(namespace).into_iter().flatten().copied()
    }

    /// Adds to `out` the views `peer` (of a policy in `namespace`) matches.
    fn matching(&self, peer: &Peer, namespace: &str, blocks: &[BlockKey], out: &mut BTreeSet<usize>) {
        match peer {
            Peer::IpBlock(b) => {
                let key = block_key(b);
                if let Ok(i) = blocks.binary_search(&key) {
                    out.extend(self.in_block[i].iter().copied());
                }
            }
            Peer::Pods { pod_selector, namespace_selector } => {
                let namespaces: Vec<&str> = match namespace_selector {
                    None => vec![namespace],
                    Some(sel) => self
                        .namespace_labels
                        .iter()
                        .filter(|(_, labels)| sel.matches(labels))
                        .map(|(n, _)| n.as_str())
                        .collect(),
                };
                for ns in namespaces {
                    for i in self.pods_in(ns) {
                        if pod_selector.as_ref().is_none_or(|s| s.matches(self.list[i].labels())) {
                            out.insert(i);
                        }
                    }
                }
            }
        }
    }
}

/// A rule's ports, split into what does not depend on the destination and the names
/// that must be resolved against it.
struct PortSpec {
    fixed: Coverage,
    named: Vec<(String, Protocol)>,
}

impl PortSpec {
    fn new(ports: &[PortRule]) -> Self {
        let mut fixed = Coverage::default();
        let mut named = Vec::new();
        if ports.is_empty() {
            fixed.all = true;
        }
        for p in ports {
            match &p.port {
                None => fixed.add(p.protocol, 0, u16::MAX),
                Some(PortRef::Number(n)) => {
                    let end = p.end_port.unwrap_or(*n);
                    // endPort below port is rejected by the API; it allows nothing here.
                    if end >= *n {
                        fixed.add(p.protocol, *n, end);
                    }
                }
                Some(PortRef::Name(name)) => named.push((name.clone(), p.protocol)),
            }
        }
        PortSpec { fixed, named }
    }

    fn resolve(&self, dst_ports: &[NamedPort]) -> Coverage {
        let mut c = self.fixed.clone();
        c.extend(&self.resolve_named_only(dst_ports));
        c
    }

    /// A name the destination does not have allows nothing.
    fn resolve_named_only(&self, dst_ports: &[NamedPort]) -> Coverage {
        let mut c = Coverage::default();
        for (name, proto) in &self.named {
            for np in dst_ports {
                if &np.name == name && np.protocol == *proto {
                    c.add(*proto, np.port, np.port);
                }
            }
        }
        c
    }
}

fn proto_index(p: Protocol) -> usize {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    }
}

const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

/// Allowed ports of one (local, peer, direction): every protocol, or intervals per
/// protocol (inclusive, in u32 so `end + 1` cannot overflow).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Coverage {
    all: bool,
    ranges: [Vec<(u32, u32)>; 2],
}

impl Coverage {
    fn all() -> Self {
        Coverage { all: true, ..Default::default() }
    }

    fn add(&mut self, proto: Protocol, lo: u16, hi: u16) {
        if !self.all {
            self.ranges[proto_index(proto)].push((lo.into(), hi.into()));
        }
    }

    fn extend(&mut self, other: &Coverage) {
        if other.all {
            *self = Coverage::all();
        } else if !self.all {
            for (mine, theirs) in self.ranges.iter_mut().zip(&other.ranges) {
                mine.extend_from_slice(theirs);
            }
        }
    }

    fn is_empty(&self) -> bool {
        !self.all && self.ranges.iter().all(Vec::is_empty)
    }

    fn normalize(&mut self) {
        if self.all {
            self.ranges = Default::default();
            return;
        }
        for r in &mut self.ranges {
            r.sort_unstable();
            let mut merged: Vec<(u32, u32)> = Vec::with_capacity(r.len());
            for &(lo, hi) in r.iter() {
                match merged.last_mut() {
                    Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
                    _ => merged.push((lo, hi)),
                }
            }
            *r = merged;
        }
    }

    /// Removes what `other` allows. Both normalized. "Every protocol" cannot be split
    /// into per-protocol intervals (it also covers ICMP and the rest), so it stays
    /// unless `other` is also "every protocol".
    fn subtract(&mut self, other: &Coverage) {
        if other.all {
            *self = Coverage::default();
            return;
        }
        if self.all {
            return;
        }
        for (mine, theirs) in self.ranges.iter_mut().zip(&other.ranges) {
            let mut out = Vec::new();
            for &(lo, hi) in mine.iter() {
                let mut lo = lo;
                for &(tlo, thi) in theirs {
                    if thi < lo || tlo > hi {
                        continue;
                    }
                    if tlo > lo {
                        out.push((lo, tlo - 1));
                    }
                    lo = thi + 1;
                    if lo > hi {
                        break;
                    }
                }
                if lo <= hi {
                    out.push((lo, hi));
                }
            }
            *mine = out;
        }
    }

    fn entries(&self, local: Identity, peer: Identity, direction: Direction, out: &mut Vec<PolicyEntry>) {
        let entry = |protocol, port, port_wildcard_bits| PolicyEntry {
            local,
            peer,
            direction,
            protocol,
            port,
            port_wildcard_bits,
        };
        if self.all {
            out.push(entry(None, 0, 16));
            return;
        }
        for (proto, ranges) in PROTOCOLS.iter().zip(&self.ranges) {
            for &(lo, hi) in ranges {
                for (port, bits) in port_blocks(lo as u16, hi as u16) {
                    out.push(entry(Some(*proto), port, bits));
                }
            }
        }
    }
}

/// `lo..=hi` as the fewest aligned blocks `(start, k)` = `start .. start + 2^k`.
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut k = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        while lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push((lo as u16, k as u8));
        lo += 1 << k;
    }
    out
}

#[derive(Default)]
struct Accumulator {
    map: HashMap<(Identity, Identity, Direction), Coverage>,
}

impl Accumulator {
    fn add(&mut self, key: (Identity, Identity, Direction), cov: &Coverage) {
        let c = self.map.entry(key).or_default();
        c.extend(cov);
        // Keeps a hot key's interval list short.
        if c.ranges.iter().any(|r| r.len() > 64) {
            c.normalize();
        }
    }

    fn finish(mut self) -> Vec<PolicyEntry> {
        self.map.values_mut().for_each(Coverage::normalize);
        let any: HashMap<(Identity, Direction), Coverage> = self
            .map
            .iter()
            .filter(|((_, peer, _), _)| *peer == ANY_PEER)
            .map(|((local, _, dir), c)| ((*local, *dir), c.clone()))
            .collect();
        let mut out = Vec::new();
        for ((local, peer, dir), mut cov) in self.map {
            if peer != ANY_PEER {
                if let Some(a) = any.get(&(local, dir)) {
                    cov.subtract(a);
                }
            }
            cov.entries(local, peer, dir, &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}
