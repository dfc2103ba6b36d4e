//! NetworkPolicy through real packets: the upstream netpol model (namespaces x, y, z ×
//! pods a, b, c; TCP/UDP ports 80/81) in network namespaces on two nodes, each node with
//! its own pin dir and `PolicyDatapath`, every pod's host-side veth carrying the tc
//! programs. Run as root:
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target-policy-dp cargo test -p kubeshift-datapath --test netpol
//! ```

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use kubeshift_datapath::{
    policy::{
        loader::{CtState, DropReason, PolicyDatapath, PolicyVerdict},
        model::*,
    },
    testenv::netpol::{Cell, NetpolLab, PORTS, PROTOCOLS},
    Protocol,
};

/// The labs share two cores with whatever else runs; one matrix at a time keeps probe
/// timeouts meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

const TIMEOUT: Duration = Duration::from_millis(400);
/// A cell that should be reachable but was not gets one more, slower chance: a loaded
/// machine can delay an answer, while a real drop fails again.
const RETRY_TIMEOUT: Duration = Duration::from_millis(2000);

/// Removes a node's pin dir on drop (also after a panic).
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(e) = PolicyDatapath::purge(&self.0) {
            eprintln!("cleanup of {}: {e}", self.0.display());
        }
    }
}

/// The lab plus one loaded, attached datapath per node. Field order = drop order: the
/// handles close, the pins go (detaching), then the namespaces.
struct Setup {
    dps: Vec<Option<PolicyDatapath>>,
    pins: Vec<PinGuard>,
    lab: NetpolLab,
}

impl Setup {
    fn new() -> Self {
        let lab = NetpolLab::new().expect("netpol lab");
        let mut pins = Vec::new();
        let mut dps = Vec::new();
        for n in &lab.nodes {
            let dir = Path::new("/sys/fs/bpf/kubeshift").join(format!("test-{}-{}", lab.tag, n.name));
            pins.push(PinGuard(dir.clone()));
            dps.push(Some(PolicyDatapath::load(&dir).expect("load policy datapath")));
        }
        let mut s = Self { dps, pins, lab };
        s.attach_all();
        s
    }

    fn pin_dir(&self, node: usize) -> &Path {
        &self.pins[node].0
    }

    fn dp(&mut self, node: usize) -> &mut PolicyDatapath {
        self.dps[node].as_mut().expect("datapath loaded")
    }

    fn attach_all(&mut self) {
        for i in 0..self.lab.pods.len() {
            let node = self.lab.pods[i].node;
            let ns = self.lab.nodes[node].netns.path();
            let ifname = self.lab.pods[i].host_if.clone();
            self.dps[node]
                .as_mut()
                .unwrap()
                .attach_in_netns(&ns, &ifname)
                .expect("attach");
        }
    }

    /// Applies one `Compiled` per node.
    fn apply(&mut self, compiled: &[Compiled]) {
        for (i, c) in compiled.iter().enumerate() {
            self.dp(i).apply(c).expect("apply");
        }
    }

    /// Probes `cells`; cells expected reachable that were not get retried once.
    fn observe(&self, cells: &[Cell], expected: &[bool]) -> Vec<bool> {
        let mut got = self.lab.probe(cells, TIMEOUT).expect("probe");
        let retry: Vec<usize> = (0..cells.len())
            .filter(|&i| expected[i] && !got[i])
            .collect();
        if !retry.is_empty() {
            let again: Vec<Cell> = retry.iter().map(|&i| cells[i]).collect();
            let r = self.lab.probe(&again, RETRY_TIMEOUT).expect("probe");
            for (&i, ok) in retry.iter().zip(r) {
                got[i] = ok;
            }
        }
        got
    }

    /// Probes every cell and compares against `expect`; returns a readable report of
    /// the differences (empty when all match).
    fn check(&self, name: &str, expect: &dyn Fn(&Cell) -> bool) -> String {
        let cells = self.lab.all_cells();
        let expected: Vec<bool> = cells.iter().map(expect).collect();
        let got = self.observe(&cells, &expected);
        truth_table_diff(&self.lab, name, &cells, &expected, &got)
    }
}

/// Upstream-style tables (`.` reachable, `X` blocked) of expected and observed, per
/// protocol/port that has a difference, and a third table marking the wrong cells.
fn truth_table_diff(
    lab: &NetpolLab,
    name: &str,
    cells: &[Cell],
    expected: &[bool],
    got: &[bool],
) -> String {
    let mut out = String::new();
    let ids: Vec<String> = lab.pods.iter().map(|p| p.id()).collect();
    for proto in PROTOCOLS {
        for port in PORTS {
            let mut exp = BTreeMap::new();
            let mut obs = BTreeMap::new();
            for (i, c) in cells.iter().enumerate() {
                if c.protocol == proto && c.port == port {
                    exp.insert((c.from, c.to), expected[i]);
                    obs.insert((c.from, c.to), got[i]);
                }
            }
            if exp == obs {
                continue;
            }
            let table = |title: &str, f: &dyn Fn(usize, usize) -> char| {
                let mut t = format!("{title}\n      ");
                for id in &ids {
                    t += &format!("{id:>4}");
                }
                t += "\n";
                for (a, ida) in ids.iter().enumerate() {
                    t += &format!("{ida:>5} ");
                    for b in 0..ids.len() {
                        t += &format!("{:>4}", f(a, b));
                    }
                    t += "\n";
                }
                t
            };
            let mark = |m: &BTreeMap<(usize, usize), bool>, a, b| match m.get(&(a, b)) {
                Some(true) => '.',
                Some(false) => 'X',
                None => ' ',
            };
            out += &format!("case {name}: {proto:?}/{port} differs (rows = from, columns = to)\n");
            out += &table("expected:", &|a, b| mark(&exp, a, b));
            out += &table("observed:", &|a, b| mark(&obs, a, b));
            out += &table("comparison (X = wrong):", &|a, b| {
                if exp.get(&(a, b)) == obs.get(&(a, b)) {
                    '.'
                } else {
                    'X'
                }
            });
        }
    }
    out
}

fn cidr(s: &str) -> Cidr {
    let (a, p) = s.split_once('/').unwrap();
    Cidr {
        addr: a.parse().unwrap(),
        prefix: p.parse().unwrap(),
    }
}

/// Identities for a hand-written `Compiled`: pod k → 100 + k, everything else → 2.
fn handwritten_base(lab: &NetpolLab) -> Compiled {
    let mut c = Compiled::default();
    c.ipcache.push((cidr("0.0.0.0/0"), 2));
    for (k, p) in lab.pods.iter().enumerate() {
        c.ipcache.push((
            Cidr {
                addr: p.ip,
                prefix: 32,
            },
            100 + k as u32,
        ));
    }
    c.ipcache.sort();
    c
}

fn entry(
    local: u32,
    peer: u32,
    direction: Direction,
    protocol: Option<Protocol>,
    port: u16,
    bits: u8,
) -> PolicyEntry {
    PolicyEntry {
        local,
        peer,
        direction,
        protocol,
        port,
        port_wildcard_bits: bits,
    }
}

/// The datapath alone, with a `Compiled` written by hand (no compiler involved): x/a only
/// admits z/c on TCP 80, y/b may only send UDP (to anyone); everything else is open.
/// Replies of allowed flows pass although x/a may not send and y/b may not receive
/// unsolicited traffic.
#[test]
fn handwritten_compiled_is_enforced() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new();
    let xa = s.lab.pod_index("x/a");
    let yb = s.lab.pod_index("y/b");
    let zc = s.lab.pod_index("z/c");
    let mut c = handwritten_base(&s.lab);
    let id = |k: usize| 100 + k as u32;
    c.isolation.insert(
        id(xa),
        Isolation {
            ingress: true,
            egress: false,
        },
    );
    c.isolation.insert(
        id(yb),
        Isolation {
            ingress: false,
            egress: true,
        },
    );
    c.entries.push(entry(id(xa), id(zc), Direction::Ingress, Some(Protocol::Tcp), 80, 0));
    c.entries.push(entry(id(yb), ANY_PEER, Direction::Egress, Some(Protocol::Udp), 0, 16));
    c.entries.sort();
    s.apply(&[c.clone(), c]);
    let report = s.check("handwritten", &|cell| {
        if cell.from == cell.to {
            return true; // loopback inside the pod, never crosses the veth
        }
        let to_xa_ok = cell.to != xa
            || (cell.from == zc && cell.protocol == Protocol::Tcp && cell.port == 80);
        let from_yb_ok = cell.from != yb || cell.protocol == Protocol::Udp;
        to_xa_ok && from_yb_ok
    });
    assert!(report.is_empty(), "{report}");
}
