//! The scenarios: each a name, what it checks, and checks with the expected answer.
//! Built from the deployed endpoints, so a check names real nodes and addresses.

use crate::deploy::Endpoint;
use crate::model::{Probe, Proto};

#[derive(Debug, Clone)]
pub struct Check {
    /// The agent (pod name) that runs the probe.
    pub from: String,
    pub from_key: String,
    pub target: String,
    pub probe: Probe,
    /// Acceptable answers (echo hostnames); empty = the probe must fail.
    pub expect: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    pub checks: Vec<Check>,
}

/// Host-network echo servers answer with the node's hostname on a real cluster and
/// with the pod name on the lab; both mean "the right endpoint answered".
fn answers(e: &Endpoint) -> Vec<String> {
    if e.host {
        vec![e.pod.clone(), e.node.clone()]
    } else {
        vec![e.pod.clone()]
    }
}

struct Builder<'a> {
    eps: &'a [Endpoint],
    timeout_ms: u64,
    n: usize,
}

impl Builder<'_> {
    fn check(
        &mut self,
        from: &Endpoint,
        target: String,
        addr: &str,
        port: u16,
        proto: Proto,
        expect: Vec<String>,
    ) -> Check {
        self.n += 1;
        Check {
            from: from.pod.clone(),
            from_key: from.key.clone(),
            target,
            probe: Probe {
                id: format!("c{}", self.n),
                addr: addr.to_string(),
                port,
                proto,
                timeout_ms: self.timeout_ms,
            },
            expect,
        }
    }

    fn find(&self, node: &str, key_suffix: &str) -> Option<&Endpoint> {
        let key = format!("{node}/{key_suffix}");
        self.eps.iter().find(|e| e.key == key)
    }
}

pub fn all(eps: &[Endpoint], timeout_ms: u64) -> Vec<Scenario> {
    // In deployment order (the first node first), each once.
    let mut nodes: Vec<&str> = vec![];
    for e in eps {
        if !nodes.contains(&e.node.as_str()) {
            nodes.push(e.node.as_str());
        }
    }
    let mut b = Builder { eps, timeout_ms, n: 0 };
    let mut out = vec![];
    let pairs: Vec<(&str, &str)> = nodes.iter().zip(nodes.iter().cycle().skip(1)).map(|(a, b)| (*a, *b)).collect();

    macro_rules! scenario {
        ($name:expr, $desc:expr, |$b:ident, $a:ident, $r:ident| $body:block) => {{
            let mut checks = vec![];
            for (an, rn) in &pairs {
                let ($a, $r) = (*an, *rn);
                let $b = &mut b;
                if let Some(c) = (|| -> Option<Vec<Check>> { $body })() {
                    checks.extend(c);
                }
            }
            out.push(Scenario { name: $name, description: $desc, checks });
        }};
    }

    scenario!("pod-to-pod-same-node", "a pod reaches another pod on its node (TCP and UDP)", |b, a, _r| {
        let (s, d) = (b.find(a, "pod-1")?.clone(), b.find(a, "pod-2")?.clone());
        Some(vec![
            b.check(&s, d.key.clone(), &d.ip, d.tcp, Proto::Tcp, answers(&d)),
            b.check(&s, d.key.clone(), &d.ip, d.udp, Proto::Udp, answers(&d)),
        ])
    });
    scenario!("pod-to-pod-cross-node", "a pod reaches a pod on another node (TCP and UDP)", |b, a, r| {
        let (s, d) = (b.find(a, "pod-1")?.clone(), b.find(r, "pod-1")?.clone());
        Some(vec![
            b.check(&s, d.key.clone(), &d.ip, d.tcp, Proto::Tcp, answers(&d)),
            b.check(&s, d.key.clone(), &d.ip, d.udp, Proto::Udp, answers(&d)),
        ])
    });
    scenario!("pod-to-service-local", "a pod reaches a ClusterIP whose backend is on its own node", |b, a, _r| {
        let (s, d) = (b.find(a, "pod-1")?.clone(), b.find(a, "pod-2")?.clone());
        let vip = d.service_ip.clone()?;
        Some(vec![
            b.check(&s, format!("svc-{}", d.pod), &vip, 80, Proto::Tcp, answers(&d)),
            b.check(&s, format!("svc-{}", d.pod), &vip, d.udp, Proto::Udp, answers(&d)),
        ])
    });
    scenario!("pod-to-service-remote", "a pod reaches a ClusterIP whose backend is on another node", |b, a, r| {
        let (s, d) = (b.find(a, "pod-1")?.clone(), b.find(r, "pod-1")?.clone());
        let vip = d.service_ip.clone()?;
        Some(vec![
            b.check(&s, format!("svc-{}", d.pod), &vip, 80, Proto::Tcp, answers(&d)),
            b.check(&s, format!("svc-{}", d.pod), &vip, d.udp, Proto::Udp, answers(&d)),
        ])
    });
    scenario!(
        "pod-to-nodeport-local",
        "a pod reaches a NodePort on its own node's address, backend on another node",
        |b, a, r| {
            let (s, d) = (b.find(a, "pod-1")?.clone(), b.find(r, "pod-2")?.clone());
            let np = d.node_port?;
            Some(vec![b.check(&s, format!("np-{}@{}", d.pod, s.node), &s.node_ip, np, Proto::Tcp, answers(&d))])
        }
    );
    scenario!("pod-to-nodeport-remote", "a pod reaches a NodePort on another node's address", |b, a, r| {
        let (s, d) = (b.find(a, "pod-1")?.clone(), b.find(a, "pod-2")?.clone());
        let np = d.node_port?;
        let remote_ip = b.find(r, "host")?.node_ip.clone();
        Some(vec![b.check(&s, format!("np-{}@{r}", d.pod), &remote_ip, np, Proto::Tcp, answers(&d))])
    });
    scenario!("host-to-pod", "a node (host network) reaches a pod on another node", |b, a, r| {
        let (s, d) = (b.find(a, "host")?.clone(), b.find(r, "pod-1")?.clone());
        Some(vec![b.check(&s, d.key.clone(), &d.ip, d.tcp, Proto::Tcp, answers(&d))])
    });
    scenario!("host-to-service", "a node (host network) reaches a ClusterIP", |b, a, r| {
        let (s, d) = (b.find(a, "host")?.clone(), b.find(r, "pod-2")?.clone());
        let vip = d.service_ip.clone()?;
        Some(vec![b.check(&s, format!("svc-{}", d.pod), &vip, 80, Proto::Tcp, answers(&d))])
    });
    scenario!("pod-to-host", "a pod reaches the host network of its own and of another node", |b, a, r| {
        let s = b.find(a, "pod-1")?.clone();
        let (l, h) = (b.find(a, "host")?.clone(), b.find(r, "host")?.clone());
        Some(vec![
            b.check(&s, l.key.clone(), &l.ip, l.tcp, Proto::Tcp, answers(&l)),
            b.check(&s, h.key.clone(), &h.ip, h.tcp, Proto::Tcp, answers(&h)),
        ])
    });
    scenario!(
        "pod-to-itself-via-service",
        "a pod reaches its own ClusterIP and is answered by itself (hairpin)",
        |b, a, _r| {
            let s = b.find(a, "pod-1")?.clone();
            let vip = s.service_ip.clone()?;
            Some(vec![b.check(&s, format!("svc-{}", s.pod), &vip, 80, Proto::Tcp, answers(&s))])
        }
    );
    out
}

/// Every endpoint probes every other endpoint's echo ports: the verdict matrix.
pub fn matrix_checks(eps: &[Endpoint], timeout_ms: u64) -> Vec<Check> {
    let mut b = Builder { eps, timeout_ms, n: 100_000 };
    let mut v = vec![];
    for s in eps {
        for d in eps {
            if s.key == d.key {
                continue;
            }
            v.push(b.check(s, d.key.clone(), &d.ip, d.tcp, Proto::Tcp, answers(d)));
            v.push(b.check(s, d.key.clone(), &d.ip, d.udp, Proto::Udp, answers(d)));
        }
    }
    v
}
