//! The flanneld stand-in: what `flanneld --kube-subnet-mgr` does on a node, for the
//! vxlan and host-gw backends. It runs as the kube-flannel DaemonSet's pod, in the
//! node's network namespace.
//!
//! It writes /run/flannel/subnet.env, creates flannel.1 (VXLAN, UDP 8472 unless
//! net-conf.json says otherwise), annotates the Node as flanneld does, programs one
//! route + ARP + FDB entry per other node, and with --ip-masq adds the FLANNEL-POSTRTG
//! masquerade rules.

use crate::peers::{self, PeerBackend};
use crate::sys::{ip, run};
use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};
use std::path::Path;

pub struct FlannelArgs<'a> {
    pub root: &'a Path,
    pub node: &'a str,
    pub kubeconfig: &'a Path,
    pub net_conf: &'a Path,
    pub ip_masq: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub network: String,
    pub backend: String,
    pub vni: u32,
    pub port: u16,
}

pub fn parse_net_conf(name: &str, text: &str) -> Result<NetConf> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| anyhow!("{name}:{}:{}: net-conf.json is not JSON: {e}", e.line(), e.column()))?;
    let network = v
        .get("Network")
        .and_then(|n| n.as_str())
        .ok_or_else(|| anyhow!("{name}: net-conf.json has no \"Network\""))?
        .to_string();
    let b = v.get("Backend").cloned().unwrap_or(json!({}));
    let backend = b.get("Type").and_then(|t| t.as_str()).unwrap_or("udp").to_string();
    Ok(NetConf {
        network,
        backend,
        vni: b.get("VNI").and_then(|x| x.as_u64()).unwrap_or(1) as u32,
        port: b.get("Port").and_then(|x| x.as_u64()).unwrap_or(8472) as u16,
    })
}

fn first_host(cidr: &str) -> Result<(String, u8)> {
    let (addr, len) = cidr.split_once('/').ok_or_else(|| anyhow!("{cidr} is not a CIDR"))?;
    let a: std::net::Ipv4Addr = addr.parse()?;
    Ok((a.to_string(), len.parse()?))
}

pub async fn run_flanneld(a: FlannelArgs<'_>) -> Result<()> {
    let text = std::fs::read_to_string(a.net_conf).with_context(|| format!("reading {}", a.net_conf.display()))?;
    let conf = parse_net_conf(&a.net_conf.display().to_string(), &text)?;
    if conf.backend != "vxlan" && conf.backend != "host-gw" {
        bail!("backend {:?}: the lab's flanneld supports vxlan and host-gw", conf.backend);
    }
    let client = crate::api::client_from(a.kubeconfig).await?;
    let cidr = peers::own_pod_cidr(&client, a.node).await?;
    let (net_addr, len) = first_host(&cidr)?;
    let gw = {
        let mut o: std::net::Ipv4Addr = net_addr.parse()?;
        o = std::net::Ipv4Addr::from(u32::from(o) + 1);
        o
    };
    let node_ip = own_ip()?;
    let mtu = if conf.backend == "vxlan" { 1450 } else { 1500 };
    let run_dir = a.root.join("run/flannel");
    std::fs::create_dir_all(&run_dir)?;
    std::fs::write(
        run_dir.join("subnet.env"),
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={gw}/{len}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={}\n",
            conf.network, a.ip_masq
        ),
    )?;

    let mut annotations = serde_json::Map::new();
    annotations.insert("flannel.alpha.coreos.com/backend-type".into(), json!(conf.backend));
    annotations.insert("flannel.alpha.coreos.com/kube-subnet-manager".into(), json!("true"));
    annotations.insert("flannel.alpha.coreos.com/public-ip".into(), json!(node_ip));
    if conf.backend == "vxlan" {
        if ip(None, "link show flannel.1").is_err() {
            ip(
                None,
                &format!(
                    "link add flannel.1 type vxlan id {} local {node_ip} dev eth0 dstport {} nolearning",
                    conf.vni, conf.port
                ),
            )?;
        }
        ip(None, &format!("link set flannel.1 mtu {mtu} up"))?;
        ip(None, &format!("addr replace {net_addr}/32 dev flannel.1"))?;
        let mac = link_mac("flannel.1")?;
        annotations.insert(
            "flannel.alpha.coreos.com/backend-data".into(),
            json!(json!({"VNI": conf.vni, "VtepMAC": mac}).to_string()),
        );
    } else {
        annotations.insert("flannel.alpha.coreos.com/backend-data".into(), json!("null"));
    }
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        // Through nodes/status, as the real daemons do: their RBAC allows only that.
        .patch_status(
            a.node,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .context("annotating the node")?;
    if a.ip_masq {
        masquerade(&conf.network, &cidr)?;
    }
    tracing::info!("flanneld: subnet {cidr} on {node_ip}, backend {}", conf.backend);
    let mut backend = FlannelPeers { backend: conf.backend.clone() };
    peers::sync_peers(&client, a.node, &mut backend).await
}

fn own_ip() -> Result<String> {
    let out = ip(None, "-j -4 addr show dev eth0")?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["addr_info"][0]["local"].as_str().map(str::to_string).ok_or_else(|| anyhow!("eth0 has no IPv4 address"))
}

fn link_mac(dev: &str) -> Result<String> {
    let v: Value = serde_json::from_str(&ip(None, &format!("-j link show {dev}"))?)?;
    v[0]["address"].as_str().map(str::to_string).ok_or_else(|| anyhow!("{dev} has no MAC"))
}

/// The rules `flanneld --ip-masq` keeps in nat POSTROUTING (in the node's netns).
fn masquerade(network: &str, subnet: &str) -> Result<()> {
    let rules = format!(
        "*nat\n:FLANNEL-POSTRTG - [0:0]\n-F FLANNEL-POSTRTG\n-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n-A FLANNEL-POSTRTG -s {subnet} -d {network} -m comment --comment \"flanneld masq\" -j RETURN\n-A FLANNEL-POSTRTG -s {network} -d {subnet} -m comment --comment \"flanneld masq\" -j RETURN\n-A FLANNEL-POSTRTG ! -s {network} -d {subnet} -m comment --comment \"flanneld masq\" -j RETURN\n-A FLANNEL-POSTRTG -s {network} ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n-A FLANNEL-POSTRTG ! -s {network} -d {network} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\nCOMMIT\n*filter\n:FLANNEL-FWD - [0:0]\n-F FLANNEL-FWD\n-A FLANNEL-FWD -s {network} -m comment --comment \"flanneld forward\" -j ACCEPT\n-A FLANNEL-FWD -d {network} -m comment --comment \"flanneld forward\" -j ACCEPT\nCOMMIT\n"
    );
    iptables_restore(&rules)?;
    ensure_jump("nat", "POSTROUTING", "FLANNEL-POSTRTG")?;
    ensure_jump("filter", "FORWARD", "FLANNEL-FWD")?;
    Ok(())
}

pub fn iptables_restore(rules: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting iptables-restore")?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("iptables-restore failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub fn ensure_jump(table: &str, chain: &str, target: &str) -> Result<()> {
    let check = run(std::process::Command::new("iptables").args(["-w", "-t", table, "-C", chain, "-j", target]));
    if check.is_err() {
        run(std::process::Command::new("iptables").args(["-w", "-t", table, "-I", chain, "1", "-j", target]))?;
    }
    Ok(())
}

struct FlannelPeers {
    backend: String,
}

#[derive(Debug, Clone, PartialEq)]
struct FlannelPeer {
    cidr: String,
    public_ip: String,
    vtep_mac: Option<String>,
}

impl PeerBackend for FlannelPeers {
    type Peer = FlannelPeer;

    fn read(&self, n: &Node) -> Option<FlannelPeer> {
        let ann = n.metadata.annotations.as_ref()?;
        let public_ip = ann.get("flannel.alpha.coreos.com/public-ip")?.clone();
        let cidr = n.spec.as_ref()?.pod_cidr.clone()?;
        let vtep_mac = if self.backend == "vxlan" {
            let data: Value = serde_json::from_str(ann.get("flannel.alpha.coreos.com/backend-data")?).ok()?;
            Some(data.get("VtepMAC")?.as_str()?.to_string())
        } else {
            None
        };
        Some(FlannelPeer { cidr, public_ip, vtep_mac })
    }

    fn add(&mut self, p: &FlannelPeer) -> Result<()> {
        let (net, _) = first_host(&p.cidr)?;
        match &p.vtep_mac {
            Some(mac) => {
                ip(None, &format!("neigh replace {net} lladdr {mac} dev flannel.1 nud permanent"))?;
                run(std::process::Command::new("bridge").args([
                    "fdb",
                    "replace",
                    mac,
                    "dev",
                    "flannel.1",
                    "dst",
                    &p.public_ip,
                    "self",
                    "permanent",
                ]))?;
                ip(None, &format!("route replace {} via {net} dev flannel.1 onlink", p.cidr))?;
            }
            None => {
                ip(None, &format!("route replace {} via {} dev eth0", p.cidr, p.public_ip))?;
            }
        }
        Ok(())
    }

    fn remove(&mut self, p: &FlannelPeer) -> Result<()> {
        let (net, _) = first_host(&p.cidr)?;
        let _ = ip(None, &format!("route del {}", p.cidr));
        if let Some(mac) = &p.vtep_mac {
            let _ = ip(None, &format!("neigh del {net} dev flannel.1"));
            let _ = run(std::process::Command::new("bridge").args([
                "fdb",
                "del",
                mac,
                "dev",
                "flannel.1",
                "dst",
                &p.public_ip,
                "self",
            ]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_conf_defaults_and_errors() {
        let c = parse_net_conf("cfg", r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#).unwrap();
        assert_eq!(c, NetConf { network: "10.244.0.0/16".into(), backend: "vxlan".into(), vni: 1, port: 8472 });
        let e = parse_net_conf("kube-flannel-cfg/net-conf.json", "{\n \"Network\": ").unwrap_err().to_string();
        assert!(e.starts_with("kube-flannel-cfg/net-conf.json:2:"), "{e}");
        assert!(parse_net_conf("x", "{}").unwrap_err().to_string().contains("Network"));
    }
}
