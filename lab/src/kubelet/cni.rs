//! Runs a node's CNI configuration through the real plugin binaries, as the kubelet's
//! container runtime does (CNI spec 0.4/1.0 conflist semantics: ADD in order with
//! prevResult chained, DEL in reverse). Written here because no maintained Rust crate
//! implements the runtime side of CNI; the plugins themselves are Debian's
//! containernetworking-plugins.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct CniRuntime {
    /// Directories searched for plugin binaries, first match wins.
    pub bin_dirs: Vec<PathBuf>,
    /// The node's /etc/cni/net.d.
    pub conf_dir: PathBuf,
    /// The node's root directory, passed to the lab's own meta-plugins.
    pub node_root: PathBuf,
}

pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns_path: &'a Path,
    pub ifname: &'a str,
    /// K8S_POD_NAMESPACE etc., as the kubelet passes them in CNI_ARGS.
    pub pod_namespace: &'a str,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
}

impl CniRuntime {
    /// The first config file in lexical order, as the kubelet picks it.
    pub fn default_conf(&self) -> Result<Option<(PathBuf, Value)>> {
        let Ok(rd) = std::fs::read_dir(&self.conf_dir) else { return Ok(None) };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
            .collect();
        files.sort();
        let Some(p) = files.into_iter().next() else { return Ok(None) };
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
        Ok(Some((p, v)))
    }

    fn plugins(conf: &Value) -> Vec<Value> {
        if let Some(list) = conf.get("plugins").and_then(|p| p.as_array()) {
            list.clone()
        } else {
            vec![conf.clone()]
        }
    }

    fn find_plugin(&self, ty: &str) -> Result<PathBuf> {
        for d in &self.bin_dirs {
            let p = d.join(ty);
            if p.exists() {
                return Ok(p);
            }
        }
        bail!("CNI plugin {ty:?} not found in {:?}", self.bin_dirs)
    }

    fn invoke(&self, command: &str, conf: &Value, a: &Attachment, plugin_conf: &Value) -> Result<Value> {
        let ty = plugin_conf
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("CNI plugin config without \"type\""))?;
        let mut input = plugin_conf.clone();
        input["name"] = conf.get("name").cloned().unwrap_or(json!("lab"));
        input["cniVersion"] = conf.get("cniVersion").cloned().unwrap_or(json!("0.3.1"));
        let bin = self.find_plugin(ty)?;
        let path = std::env::join_paths(&self.bin_dirs)?;
        let mut child = Command::new(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", a.container_id)
            .env("CNI_NETNS", a.netns_path)
            .env("CNI_IFNAME", a.ifname)
            .env("CNI_PATH", &path)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    a.pod_namespace, a.pod_name, a.container_id, a.pod_uid
                ),
            )
            .env("KUBESHIFT_LAB_NODE_ROOT", &self.node_root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting CNI plugin {}", bin.display()))?;
        child.stdin.take().unwrap().write_all(serde_json::to_string(&input)?.as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "CNI {command} with plugin {ty} failed ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("CNI plugin {ty} printed a result that is not JSON: {stdout}"))
    }

    pub fn add(&self, conf: &Value, a: &Attachment) -> Result<Value> {
        let mut prev = Value::Null;
        for p in Self::plugins(conf) {
            let mut p = p.clone();
            if !prev.is_null() {
                p["prevResult"] = prev.clone();
            }
            let r = self.invoke("ADD", conf, a, &p)?;
            if !r.is_null() {
                prev = r;
            }
        }
        Ok(prev)
    }

    /// DEL is best effort per plugin, as in the runtime: one failing plugin must not
    /// leave the others' state behind. The errors are returned together.
    pub fn del(&self, conf: &Value, a: &Attachment, prev: &Value) -> Result<()> {
        let mut errs = vec![];
        for p in Self::plugins(conf).into_iter().rev() {
            let mut p = p.clone();
            if !prev.is_null() {
                p["prevResult"] = prev.clone();
            }
            if let Err(e) = self.invoke("DEL", conf, a, &p) {
                errs.push(format!("{e:#}"));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            bail!(errs.join("; "))
        }
    }
}

/// The first IPv4 address of a CNI result (`ips[].address`, "10.244.1.5/24").
pub fn result_ipv4(result: &Value) -> Option<String> {
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        let a = ip.get("address")?.as_str()?;
        let addr = a.split('/').next()?;
        addr.parse::<std::net::Ipv4Addr>().ok().map(|_| addr.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_ipv4_reads_the_spec_shape() {
        let r = json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1"}]});
        assert_eq!(result_ipv4(&r).as_deref(), Some("10.244.1.5"));
        assert_eq!(result_ipv4(&json!({})), None);
    }

    #[test]
    fn a_single_conf_is_a_one_plugin_list() {
        let c = json!({"type": "bridge", "name": "x"});
        assert_eq!(CniRuntime::plugins(&c).len(), 1);
        let l = json!({"name": "x", "plugins": [{"type": "a"}, {"type": "b"}]});
        assert_eq!(CniRuntime::plugins(&l).len(), 2);
    }
}
