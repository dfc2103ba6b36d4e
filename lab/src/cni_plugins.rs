//! The two CNI plugins Debian does not ship, written the way upstream's work: thin
//! meta-plugins that compute a configuration and delegate the real work to Debian's
//! `bridge`, `ptp` and `host-local` plugins.
//!
//! - `flannel`: reads the node's /run/flannel/subnet.env (written by flanneld) and
//!   delegates to `bridge` on cni0 with host-local IPAM over the node's subnet.
//! - `calico`: delegates to `ptp` with host-local IPAM over the node's podCIDR
//!   (Calico's `usePodCidr`), then renames the host veth to `cali<hash>` as Calico does.
//!
//! Both run as `kubeshift lab cni-plugin NAME`, installed on each node by the DaemonSet
//! init containers (`install-cni`), and keep their state under the node's root.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sha1::{Digest, Sha1};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn node_root() -> Result<PathBuf> {
    std::env::var_os("KUBESHIFT_LAB_NODE_ROOT")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("KUBESHIFT_LAB_NODE_ROOT is not set: this plugin only runs on lab nodes"))
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

fn cni_arg(name: &str) -> String {
    env("CNI_ARGS").split(';').find_map(|kv| kv.strip_prefix(&format!("{name}="))).unwrap_or("").to_string()
}

fn find_in_cni_path(ty: &str) -> Result<PathBuf> {
    for d in std::env::split_paths(&std::env::var_os("CNI_PATH").unwrap_or_default()) {
        if d.join(ty).exists() {
            return Ok(d.join(ty));
        }
    }
    bail!("delegate plugin {ty} not found in CNI_PATH")
}

/// Runs a delegate plugin with the same CNI_* environment and returns its stdout.
fn delegate(ty: &str, conf: &Value) -> Result<String> {
    let mut child = Command::new(find_in_cni_path(ty)?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    child.stdin.take().unwrap().write_all(serde_json::to_string(conf)?.as_bytes())?;
    let out = child.wait_with_output()?;
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{ty} {}: {}", env("CNI_COMMAND"), s.trim());
    }
    Ok(s)
}

/// DEL with the exact delegate config ADD used (saved in `state`); a DEL for a
/// container this plugin never added succeeds, as the CNI spec asks.
fn delegate_del(ty: &str, state: &Path) -> Result<String> {
    match std::fs::read(state) {
        Ok(b) => {
            let d: Value = serde_json::from_slice(&b)?;
            let out = delegate(ty, &d)?;
            let _ = std::fs::remove_file(state);
            Ok(out)
        }
        Err(_) => Ok(String::new()),
    }
}

fn state_file(root: &Path, plugin: &str) -> PathBuf {
    root.join("var/lib/cni").join(plugin).join(env("CNI_CONTAINERID"))
}

/// Entry point of `kubeshift lab cni-plugin NAME`. Prints the result (or a CNI error
/// object) on stdout as the spec wants, and returns whether it succeeded.
pub fn main(plugin: &str) -> bool {
    let mut input = String::new();
    let r = std::io::stdin().read_to_string(&mut input).map_err(anyhow::Error::from).and_then(|_| {
        if env("CNI_COMMAND") == "VERSION" {
            return Ok(json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0"]}).to_string());
        }
        let conf: Value = serde_json::from_str(&input).context("network configuration on stdin is not JSON")?;
        match plugin {
            "flannel" => flannel(&conf),
            "calico" => calico(&conf),
            other => bail!("unknown lab CNI plugin {other}"),
        }
    });
    match r {
        Ok(out) => {
            print!("{out}");
            true
        }
        Err(e) => {
            print!("{}", json!({"cniVersion": "0.4.0", "code": 100, "msg": format!("{e:#}")}));
            false
        }
    }
}

fn subnet_env(root: &Path) -> Result<std::collections::HashMap<String, String>> {
    let p = root.join("run/flannel/subnet.env");
    let s = std::fs::read_to_string(&p).with_context(|| format!("{}: flanneld has not written it yet", p.display()))?;
    Ok(s.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

fn flannel(conf: &Value) -> Result<String> {
    let root = node_root()?;
    let state = state_file(&root, "flannel");
    match env("CNI_COMMAND").as_str() {
        "ADD" => {
            let se = subnet_env(&root)?;
            let get = |k: &str| se.get(k).cloned().ok_or_else(|| anyhow!("subnet.env has no {k}"));
            let mut d = conf.get("delegate").cloned().unwrap_or(json!({}));
            d["name"] = conf["name"].clone();
            d["cniVersion"] = conf["cniVersion"].clone();
            if d.get("type").is_none() {
                d["type"] = json!("bridge");
            }
            if d.get("bridge").is_none() {
                d["bridge"] = json!("cni0");
            }
            d["isGateway"] = json!(true);
            // flanneld masquerades itself when --ip-masq is on.
            d["ipMasq"] = json!(get("FLANNEL_IPMASQ")? != "true");
            d["mtu"] = json!(get("FLANNEL_MTU")?.parse::<u32>()?);
            d["ipam"] = json!({
                "type": "host-local",
                "ranges": [[{"subnet": network_of(&get("FLANNEL_SUBNET")?)?}]],
                "routes": [{"dst": get("FLANNEL_NETWORK")?}],
                "dataDir": root.join("var/lib/cni/networks").display().to_string(),
            });
            std::fs::create_dir_all(state.parent().unwrap())?;
            std::fs::write(&state, serde_json::to_vec(&d)?)?;
            delegate("bridge", &d)
        }
        "DEL" => delegate_del("bridge", &state),
        _ => Ok(String::new()),
    }
}

/// "10.244.1.1/24" (flanneld's gateway form) → "10.244.1.0/24" (what host-local wants).
fn network_of(cidr: &str) -> Result<String> {
    let (a, l) = cidr.split_once('/').ok_or_else(|| anyhow!("{cidr} is not a CIDR"))?;
    let len: u32 = l.parse()?;
    let ip: u32 = a.parse::<std::net::Ipv4Addr>()?.into();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok(format!("{}/{len}", std::net::Ipv4Addr::from(ip & mask)))
}

pub fn calico_veth_name(namespace: &str, pod: &str) -> String {
    let h = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    format!("cali{}", &hex::encode(h)[..11])
}

fn calico(conf: &Value) -> Result<String> {
    let root = node_root()?;
    let state = state_file(&root, "calico");
    match env("CNI_COMMAND").as_str() {
        "ADD" => {
            let cidr_file = root.join("var/lib/calico/pod-cidr");
            let cidr = std::fs::read_to_string(&cidr_file)
                .with_context(|| format!("{}: calico-node has not started on this node", cidr_file.display()))?;
            let d = json!({
                "name": conf["name"], "cniVersion": conf["cniVersion"], "type": "ptp",
                "mtu": conf.get("mtu").cloned().unwrap_or(json!(1480)),
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": cidr.trim()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": root.join("var/lib/cni/networks").display().to_string(),
                },
            });
            std::fs::create_dir_all(state.parent().unwrap())?;
            std::fs::write(&state, serde_json::to_vec(&d)?)?;
            let out = delegate("ptp", &d)?;
            let mut result: Value = serde_json::from_str(&out)?;
            let want = calico_veth_name(&cni_arg("K8S_POD_NAMESPACE"), &cni_arg("K8S_POD_NAME"));
            if let Some(ifaces) = result.get_mut("interfaces").and_then(|i| i.as_array_mut()) {
                if let Some(host) = ifaces
                    .iter_mut()
                    .find(|i| i.get("sandbox").map(|s| s.as_str().unwrap_or("").is_empty()).unwrap_or(true))
                {
                    let cur = host["name"].as_str().unwrap_or("").to_string();
                    if !cur.is_empty() && cur != want {
                        crate::sys::ip(None, &format!("link set {cur} down"))?;
                        crate::sys::ip(None, &format!("link set {cur} name {want}"))?;
                        crate::sys::ip(None, &format!("link set {want} up"))?;
                        host["name"] = json!(want);
                    }
                }
            }
            // ptp put the /32 route on the renamed device already (routes follow
            // the ifindex, not the name).
            Ok(result.to_string())
        }
        "DEL" => delegate_del("ptp", &state),
        _ => Ok(String::new()),
    }
}

/// What the DaemonSets' `install-cni` init containers do: put the plugin on the node,
/// and for Calico render 10-calico.conflist from the ConfigMap template.
pub fn install(
    root: &Path,
    plugin: &str,
    conf_name: Option<&str>,
    template: Option<&Path>,
    node: Option<&str>,
) -> Result<()> {
    let exe = std::env::current_exe()?;
    let bin = root.join("opt/cni/bin");
    std::fs::create_dir_all(&bin)?;
    let wrapper = bin.join(plugin);
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec '{}' lab cni-plugin {plugin} \"$@\"\n", exe.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    if let (Some(name), Some(t)) = (conf_name, template) {
        let text = std::fs::read_to_string(t).with_context(|| format!("CNI config template {}", t.display()))?;
        let text = text
            .replace("__KUBERNETES_NODE_NAME__", node.unwrap_or(""))
            .replace("__CNI_MTU__", "1480")
            .replace("__KUBECONFIG_FILEPATH__", "/etc/cni/net.d/calico-kubeconfig");
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: rendered CNI config is not JSON", t.display()))?;
        let dir = root.join("etc/cni/net.d");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_subnet_becomes_a_network() {
        assert_eq!(network_of("10.244.1.1/24").unwrap(), "10.244.1.0/24");
        assert!(network_of("10.244.1.1").is_err());
    }

    #[test]
    fn calico_veth_names_fit_an_interface_name() {
        let n = calico_veth_name("demo", "backend-5d8f-abcde");
        assert!(n.starts_with("cali") && n.len() == 15, "{n}");
        assert_eq!(n, calico_veth_name("demo", "backend-5d8f-abcde"));
        assert_ne!(n, calico_veth_name("demo2", "backend-5d8f-abcde"));
    }
}
