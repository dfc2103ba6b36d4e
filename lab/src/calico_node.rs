//! The calico-node stand-in: the part of Felix and BIRD that shapes a node's data
//! plane in IPIP mode (or VXLAN when the IPPool says so). It runs as the calico-node
//! DaemonSet's pod, in the node's network namespace.
//!
//! Per-pod /32 routes on `cali*` veths come from the `calico` CNI plugin; this
//! process adds the tunnel device, one route per other node's pod block through it
//! (what BIRD would learn over BGP), the Node annotations calico-node writes, and the
//! natOutgoing masquerade rule of the IPPool.

use crate::flanneld::{ensure_jump, iptables_restore};
use crate::peers::{self, PeerBackend};
use crate::sys::ip;
use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use serde_json::{json, Value};
use std::path::Path;

pub struct CalicoArgs<'a> {
    pub root: &'a Path,
    pub node: &'a str,
    pub kubeconfig: &'a Path,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub cidr: String,
    pub ipip: bool,
    pub vxlan: bool,
    pub nat_outgoing: bool,
}

pub fn pool_from(obj: &Value) -> Result<Pool> {
    let spec = obj.get("spec").ok_or_else(|| anyhow!("IPPool has no spec"))?;
    let mode = |k: &str| spec.get(k).and_then(|m| m.as_str()).map(|m| m != "Never").unwrap_or(false);
    Ok(Pool {
        cidr: spec.get("cidr").and_then(|c| c.as_str()).ok_or_else(|| anyhow!("IPPool has no spec.cidr"))?.to_string(),
        ipip: mode("ipipMode"),
        vxlan: mode("vxlanMode"),
        nat_outgoing: spec.get("natOutgoing").and_then(|n| n.as_bool()).unwrap_or(false),
    })
}

pub async fn run_calico_node(a: CalicoArgs<'_>) -> Result<()> {
    let client = crate::api::client_from(a.kubeconfig).await?;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("crd.projectcalico.org", "v1", "IPPool"));
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let pool = pools.get("default-ipv4-ippool").await.context("reading IPPool default-ipv4-ippool")?;
    let pool = pool_from(&serde_json::to_value(&pool)?)?;
    let cidr = peers::own_pod_cidr(&client, a.node).await?;
    let calico_dir = a.root.join("var/lib/calico");
    std::fs::create_dir_all(&calico_dir)?;
    std::fs::write(calico_dir.join("nodename"), a.node)?;
    std::fs::write(calico_dir.join("pod-cidr"), &cidr)?;

    let node_ip = {
        let v: Value = serde_json::from_str(&ip(None, "-j -4 addr show dev eth0")?)?;
        format!("{}/{}", v[0]["addr_info"][0]["local"].as_str().unwrap_or(""), v[0]["addr_info"][0]["prefixlen"])
    };
    let (net, _) = cidr.split_once('/').ok_or_else(|| anyhow!("bad podCIDR {cidr}"))?;
    let tunnel_ip = std::net::Ipv4Addr::from(u32::from(net.parse::<std::net::Ipv4Addr>()?) + 1);
    let mut ann = serde_json::Map::new();
    ann.insert("projectcalico.org/IPv4Address".into(), json!(node_ip));
    if pool.vxlan {
        if ip(None, "link show vxlan.calico").is_err() {
            let local = node_ip.split('/').next().unwrap_or("");
            ip(
                None,
                &format!("link add vxlan.calico type vxlan id 4096 local {local} dev eth0 dstport 4789 nolearning"),
            )?;
        }
        ip(None, "link set vxlan.calico mtu 1450 up")?;
        ip(None, &format!("addr replace {tunnel_ip}/32 dev vxlan.calico"))?;
        let v: Value = serde_json::from_str(&ip(None, "-j link show vxlan.calico")?)?;
        ann.insert("projectcalico.org/IPv4VXLANTunnelAddr".into(), json!(tunnel_ip.to_string()));
        ann.insert("projectcalico.org/VXLANTunnelMACAddr".into(), json!(v[0]["address"]));
    } else if pool.ipip {
        // tunl0 is the ipip module's fallback device, present in every netns once
        // the module is loaded; adding it by name loads the module.
        if ip(None, "link show tunl0").is_err() {
            ip(None, "link add name tunl0 type ipip").context(
                "the IPPool asks for IPIP but this kernel has no IPIP device (CONFIG_NET_IPIP); use vxlanMode: Always",
            )?;
        }
        ip(None, "link set tunl0 mtu 1480 up")?;
        ip(None, &format!("addr replace {tunnel_ip}/32 dev tunl0"))?;
        ann.insert("projectcalico.org/IPv4IPIPTunnelAddr".into(), json!(tunnel_ip.to_string()));
    }
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        // Through nodes/status, as the real daemons do: their RBAC allows only that.
        .patch_status(a.node, &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"annotations": ann}})))
        .await
        .context("annotating the node")?;
    if pool.nat_outgoing {
        iptables_restore(&format!(
            "*nat\n:cali-nat-outgoing - [0:0]\n-F cali-nat-outgoing\n-A cali-nat-outgoing -s {0} ! -d {0} -m comment --comment \"cali:natOutgoing\" -j MASQUERADE --random-fully\nCOMMIT\n*filter\n:cali-FORWARD - [0:0]\n-F cali-FORWARD\n-A cali-FORWARD -s {0} -m comment --comment \"cali:pool\" -j ACCEPT\n-A cali-FORWARD -d {0} -m comment --comment \"cali:pool\" -j ACCEPT\nCOMMIT\n",
            pool.cidr
        ))?;
        ensure_jump("nat", "POSTROUTING", "cali-nat-outgoing")?;
        ensure_jump("filter", "FORWARD", "cali-FORWARD")?;
    }
    tracing::info!("calico-node: block {cidr}, pool {:?}", pool);
    let policy = tokio::spawn(crate::calico_policy::enforce(client.clone(), a.node.to_string()));
    let mut backend = CalicoPeers { vxlan: pool.vxlan };
    let r = peers::sync_peers(&client, a.node, &mut backend).await;
    policy.abort();
    r
}

struct CalicoPeers {
    vxlan: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct CalicoPeer {
    cidr: String,
    node_ip: String,
    vxlan: Option<(String, String)>,
}

impl PeerBackend for CalicoPeers {
    type Peer = CalicoPeer;

    fn read(&self, n: &Node) -> Option<CalicoPeer> {
        let ann = n.metadata.annotations.as_ref()?;
        let node_ip = ann.get("projectcalico.org/IPv4Address")?.split('/').next()?.to_string();
        let cidr = n.spec.as_ref()?.pod_cidr.clone()?;
        let vxlan = if self.vxlan {
            Some((
                ann.get("projectcalico.org/IPv4VXLANTunnelAddr")?.clone(),
                ann.get("projectcalico.org/VXLANTunnelMACAddr")?.clone(),
            ))
        } else {
            None
        };
        Some(CalicoPeer { cidr, node_ip, vxlan })
    }

    fn add(&mut self, p: &CalicoPeer) -> Result<()> {
        match &p.vxlan {
            Some((tip, mac)) => {
                ip(None, &format!("neigh replace {tip} lladdr {mac} dev vxlan.calico nud permanent"))?;
                crate::sys::run(std::process::Command::new("bridge").args([
                    "fdb",
                    "replace",
                    mac,
                    "dev",
                    "vxlan.calico",
                    "dst",
                    &p.node_ip,
                    "self",
                    "permanent",
                ]))?;
                ip(None, &format!("route replace {} via {tip} dev vxlan.calico onlink", p.cidr))?;
            }
            None => ip(None, &format!("route replace {} via {} dev tunl0 onlink", p.cidr, p.node_ip)).map(|_| ())?,
        }
        Ok(())
    }

    fn remove(&mut self, p: &CalicoPeer) -> Result<()> {
        let _ = ip(None, &format!("route del {}", p.cidr));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_modes() {
        let p = pool_from(&json!({"spec": {"cidr": "192.168.0.0/16", "ipipMode": "Always", "vxlanMode": "Never", "natOutgoing": true}})).unwrap();
        assert_eq!(p, Pool { cidr: "192.168.0.0/16".into(), ipip: true, vxlan: false, nat_outgoing: true });
        assert!(pool_from(&json!({"spec": {}})).unwrap_err().to_string().contains("cidr"));
    }
}
