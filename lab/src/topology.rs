//! The lab's wires: an underlay netns holding a bridge, and one veth from it into the
//! control-plane netns and into every node netns. Nothing is added to the host's
//! own namespace.

use crate::spec::{LabSpec, UNDERLAY_LEN};
use crate::sys::{self, ip};
use anyhow::Result;
use std::net::Ipv4Addr;

pub fn create_underlay(spec: &LabSpec) -> Result<()> {
    let u = spec.netns_underlay();
    sys::netns_add(&u)?;
    if ip(Some(&u), "link show br0").is_err() {
        ip(Some(&u), "link add br0 type bridge")?;
    }
    ip(Some(&u), "link set br0 up")?;
    Ok(())
}

/// Plugs netns `member` into the underlay as `eth0` with `addr`. `port` names the
/// bridge side (at most 15 characters).
pub fn plug(spec: &LabSpec, member: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
    let u = spec.netns_underlay();
    sys::netns_add(member)?;
    if ip(Some(member), "link show eth0").is_err() {
        ip(Some(&u), &format!("link add {port} type veth peer name eth0 netns {member}"))?;
    }
    ip(Some(&u), &format!("link set {port} master br0 up"))?;
    ip(Some(member), &format!("addr replace {addr}/{UNDERLAY_LEN} dev eth0"))?;
    ip(Some(member), "link set eth0 up")?;
    Ok(())
}

/// Per-netns sysctls are written from a thread inside that netns: /proc/sys/net
/// follows the writing thread's namespace.
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_string();
    sys::in_netns(netns, move || std::fs::write(&path, value).map_err(|e| anyhow::anyhow!("{path}: {e}")))??;
    Ok(())
}

pub fn setup_node(spec: &LabSpec, index: usize, node: &str) -> Result<()> {
    let ns = spec.netns_node(node);
    plug(spec, &ns, &format!("v-{node}"), spec.node_ip(index))?;
    // A real node has a default route; without one, a connect() from the node to a
    // ClusterIP fails before kube-proxy's DNAT in OUTPUT can rewrite it. Nothing
    // beyond the underlay bridge exists, so no packet can leave the lab.
    ip(Some(&ns), "route replace default dev eth0")?;
    sysctl(&ns, "net.ipv4.ip_forward", "1")?;
    Ok(())
}

pub fn setup_control_plane(spec: &LabSpec) -> Result<()> {
    plug(spec, &spec.netns_control_plane(), "v-cp", spec.apiserver_ip())
}
