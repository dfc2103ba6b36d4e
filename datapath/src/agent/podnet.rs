//! Where a pod's network lives on this node: its host-side interface (where the policy
//! programs attach) and the node's own addresses (traffic from them is always allowed).
//!
//! A pod is found through one of its processes (`pods::pids_by_pod`, from the cgroup
//! tree), whose `/proc/<pid>/ns/net` is the pod's network namespace. Inside it the pod's
//! `eth0` is one end of a veth; its `link_index` is the ifindex of the other end in the
//! node's namespace.
//!
//! The lookups shell out to iproute2's `ip -j` inside the target namespace (`nsenter`):
//! both are on every node, and the JSON output is stable, whereas a netlink client per
//! namespace would need a thread that switches namespaces for each query.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `ip -j ARGS` inside the network namespace at `netns` (None: the agent's own).
pub(crate) fn ip_json(netns: Option<&Path>, args: &[&str]) -> Result<serde_json::Value> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    cmd.arg("-j").args(args);
    let out = cmd.output().with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} in {}: {}",
            args.join(" "),
            netns.map_or("the agent's namespace".into(), |p| p.display().to_string()),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing the output of ip -j {}", args.join(" ")))
}

/// The node-side interface name of the pod whose process is `pid`.
pub fn host_interface(node_netns: Option<&Path>, pid: u32) -> Result<String> {
    let pod_ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let links = ip_json(Some(&pod_ns), &["link", "show", "eth0"])?;
    let peer = links
        .get(0)
        .and_then(|l| l.get("link_index"))
        .and_then(|v| v.as_u64())
        .with_context(|| format!("eth0 of pid {pid}'s network namespace is not one end of a veth"))?;
    interface_name(node_netns, peer)
}

fn interface_name(netns: Option<&Path>, ifindex: u64) -> Result<String> {
    let links = ip_json(netns, &["link", "show"])?;
    links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l.get("ifindex").and_then(|v| v.as_u64()) == Some(ifindex))
        .and_then(|l| l.get("ifname").and_then(|v| v.as_str()).map(str::to_string))
        .with_context(|| format!("no interface with index {ifindex} in the node's network namespace"))
}

/// Every IPv4 address of the node's namespace: pods see the node as any of them (a
/// bridge CNI's probes come from the bridge address, not the node's InternalIP).
pub fn node_addresses(node_netns: Option<&Path>) -> Result<Vec<Ipv4Addr>> {
    let addrs = ip_json(node_netns, &["-4", "addr", "show"])?;
    let mut out: Vec<Ipv4Addr> = addrs
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l.get("addr_info").and_then(|a| a.as_array()).cloned().unwrap_or_default())
        .filter_map(|a| a.get("local").and_then(|v| v.as_str()).and_then(|s| s.parse().ok()))
        .filter(|ip: &Ipv4Addr| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The interface of the node's namespace that carries `ip` (where NodePort traffic for
/// the node's InternalIP arrives).
pub fn interface_with_address(node_netns: Option<&Path>, ip: Ipv4Addr) -> Result<String> {
    let addrs = ip_json(node_netns, &["-4", "addr", "show"])?;
    addrs
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| {
            l.get("addr_info").and_then(|a| a.as_array()).is_some_and(|a| {
                a.iter().any(|a| a.get("local").and_then(|v| v.as_str()) == Some(ip.to_string().as_str()))
            })
        })
        .and_then(|l| l.get("ifname").and_then(|v| v.as_str()).map(str::to_string))
        .with_context(|| format!("no interface carries the node IP {ip}; pass --device"))
}
