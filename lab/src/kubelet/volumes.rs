//! A pod's volumes and environment, materialised on the host. The lab runs no mount
//! namespace per pod, so each mount path is mapped to a host directory and every path
//! a container is given (arguments, config files) is translated through that map.

use super::NodeCtx;
use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// mount path in the container → directory or file on the host, longest first.
#[derive(Debug, Clone, Default)]
pub struct PathMap(pub Vec<(String, PathBuf)>);

impl PathMap {
    pub fn add(&mut self, mount: &str, host: PathBuf) {
        self.0.push((mount.trim_end_matches('/').to_string(), host));
        self.0.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
    }

    /// Translates a container path, or any `--flag=/path` argument, to the host.
    pub fn translate(&self, s: &str) -> String {
        let (head, path) = match s.find("=/") {
            Some(i) if s.starts_with('-') => (&s[..=i], &s[i + 1..]),
            _ => ("", s),
        };
        for (m, h) in &self.0 {
            if path == m || path.starts_with(&format!("{m}/")) {
                return format!("{head}{}{}", h.display(), &path[m.len()..]);
            }
        }
        s.to_string()
    }

    /// Translates every mount path that occurs inside a text (a config file).
    pub fn translate_text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (m, h) in &self.0 {
            out = out.replace(&format!("{m}/"), &format!("{}/", h.display()));
        }
        out
    }
}

pub struct PodFiles {
    /// Per volume name: its host directory.
    pub volumes: BTreeMap<String, PathBuf>,
    /// Service-account directory (token, ca.crt, namespace) if mounted.
    pub service_account: Option<PathBuf>,
}

fn write_keys(dir: &Path, data: &BTreeMap<String, String>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (k, v) in data {
        std::fs::write(dir.join(k), v).with_context(|| format!("writing {}", dir.join(k).display()))?;
    }
    Ok(())
}

async fn configmap_data(ctx: &NodeCtx, ns: &str, name: &str) -> Result<BTreeMap<String, String>> {
    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("ConfigMap {ns}/{name}"))?;
    Ok(cm.data.unwrap_or_default())
}

async fn secret_data(ctx: &NodeCtx, ns: &str, name: &str) -> Result<BTreeMap<String, String>> {
    let s = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("Secret {ns}/{name}"))?;
    Ok(s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned())).collect())
}

/// A bound service-account token from the TokenRequest API, as the kubelet projects.
pub async fn sa_token(ctx: &NodeCtx, pod: &Pod) -> Result<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let tr: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
            "expirationSeconds": 86400,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid},
        }
    }))?;
    let out: TokenRequest = api
        .create_subresource("token", &sa, &PostParams::default(), &tr)
        .await
        .with_context(|| format!("TokenRequest for service account {ns}/{sa}"))?;
    out.status.map(|s| s.token).ok_or_else(|| anyhow!("TokenRequest for {ns}/{sa} returned no token"))
}

pub async fn materialise(ctx: &NodeCtx, pod: &Pod, dir: &Path) -> Result<PodFiles> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref().ok_or_else(|| anyhow!("pod has no spec"))?;
    let mut files = PodFiles { volumes: BTreeMap::new(), service_account: None };
    for v in spec.volumes.iter().flatten() {
        let host = if let Some(hp) = &v.host_path {
            // hostPath means the *node's* filesystem: each lab node has its own root,
            // its own directory on the lab's bpffs and its own cgroup (so an agent
            // pod's pins and cgroup attachments stay on its lab node).
            let p = match hp.path.trim_end_matches('/') {
                "/sys/fs/bpf" => {
                    // Made by the pod itself when bpffs is not mounted yet: the agent
                    // mounts it at /sys/fs/bpf (as on a real node) before pinning.
                    let d = crate::down::bpffs_dir(&ctx.lab.name).join(&ctx.node);
                    let _ = std::fs::create_dir_all(&d);
                    files.volumes.insert(v.name.clone(), d);
                    continue;
                }
                "/sys/fs/cgroup" => {
                    files.volumes.insert(v.name.clone(), ctx.cgroup.clone());
                    continue;
                }
                path => ctx.root.join(path.trim_start_matches('/')),
            };
            match hp.type_.as_deref() {
                Some("FileOrCreate") | Some("File") => {
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    if !p.exists() {
                        std::fs::write(&p, "")?;
                    }
                }
                _ => std::fs::create_dir_all(&p)?,
            }
            p
        } else {
            let p = dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&p)?;
            if let Some(cm) = &v.config_map {
                let data = configmap_data(ctx, ns, &cm.name).await?;
                write_keys(
                    &p,
                    &select_items(
                        data,
                        cm.items.as_deref().unwrap_or(&[]).iter().map(|i| (i.key.clone(), i.path.clone())),
                    ),
                )?;
            } else if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                let data = secret_data(ctx, ns, &name).await?;
                write_keys(
                    &p,
                    &select_items(
                        data,
                        s.items.as_deref().unwrap_or(&[]).iter().map(|i| (i.key.clone(), i.path.clone())),
                    ),
                )?;
            } else if let Some(pr) = &v.projected {
                for src in pr.sources.iter().flatten() {
                    if let Some(t) = &src.service_account_token {
                        std::fs::write(p.join(&t.path), sa_token(ctx, pod).await?)?;
                    }
                    if let Some(cm) = &src.config_map {
                        if cm.name == "kube-root-ca.crt" {
                            std::fs::write(p.join("ca.crt"), &ctx.ca_pem)?;
                        } else {
                            let data = configmap_data(ctx, ns, &cm.name).await?;
                            write_keys(
                                &p,
                                &select_items(
                                    data,
                                    cm.items.as_deref().unwrap_or(&[]).iter().map(|i| (i.key.clone(), i.path.clone())),
                                ),
                            )?;
                        }
                    }
                    if src.downward_api.is_some() {
                        std::fs::write(p.join("namespace"), ns)?;
                    }
                }
            }
            p
        };
        files.volumes.insert(v.name.clone(), host);
    }
    if spec.automount_service_account_token != Some(false) {
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa)?;
        std::fs::write(sa.join("ca.crt"), &ctx.ca_pem)?;
        std::fs::write(sa.join("namespace"), ns)?;
        match sa_token(ctx, pod).await {
            Ok(t) => std::fs::write(sa.join("token"), t)?,
            Err(e) => tracing::warn!(
                "no service-account token for {ns}/{}: {e:#}",
                pod.metadata.name.as_deref().unwrap_or("")
            ),
        }
        files.service_account = Some(sa);
    }
    Ok(files)
}

fn select_items(
    data: BTreeMap<String, String>,
    items: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    let items: Vec<(String, String)> = items.collect();
    if items.is_empty() {
        return data;
    }
    items.into_iter().filter_map(|(k, path)| data.get(&k).map(|v| (path, v.clone()))).collect()
}

pub fn path_map(files: &PodFiles, c: &Container) -> PathMap {
    let mut m = PathMap::default();
    if let Some(sa) = &files.service_account {
        m.add(SA_MOUNT, sa.clone());
    }
    for vm in c.volume_mounts.iter().flatten() {
        if let Some(h) = files.volumes.get(&vm.name) {
            let host = match &vm.sub_path {
                Some(sp) if !sp.is_empty() => h.join(sp),
                _ => h.clone(),
            };
            m.add(&vm.mount_path, host);
        }
    }
    m
}

/// The container's environment as the kubelet computes it (literal values, the
/// downward API, ConfigMap and Secret keys), plus the KUBERNETES_SERVICE_* variables.
pub async fn environment(ctx: &NodeCtx, pod: &Pod, c: &Container, pod_ip: &str) -> Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut env: Vec<(String, String)> = vec![
        ("KUBERNETES_SERVICE_HOST".into(), crate::spec::KUBERNETES_SERVICE_IP.into()),
        ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
        ("HOSTNAME".into(), pod.metadata.name.clone().unwrap_or_default()),
        ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
    ];
    for ef in c.env_from.iter().flatten() {
        if let Some(r) = &ef.config_map_ref {
            let data = match configmap_data(ctx, ns, &r.name).await {
                Ok(d) => d,
                Err(_) if r.optional == Some(true) => continue,
                Err(e) => return Err(e),
            };
            for (k, v) in data {
                env.push((format!("{}{k}", ef.prefix.clone().unwrap_or_default()), v));
            }
        }
    }
    for e in c.env.iter().flatten() {
        let v = if let Some(v) = &e.value {
            expand(v, &env)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                    "metadata.namespace" => ns.to_string(),
                    "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                    "spec.nodeName" => ctx.node.clone(),
                    "spec.serviceAccountName" => {
                        pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default()
                    }
                    "status.podIP" => pod_ip.to_string(),
                    "status.hostIP" => ctx.node_ip.to_string(),
                    other => {
                        tracing::warn!("env {}: fieldRef {other} is not supported by the lab", e.name);
                        String::new()
                    }
                }
            } else if let Some(k) = &from.config_map_key_ref {
                configmap_data(ctx, ns, &k.name).await?.get(&k.key).cloned().unwrap_or_default()
            } else if let Some(k) = &from.secret_key_ref {
                secret_data(ctx, ns, &k.name).await?.get(&k.key).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        env.push((e.name.clone(), v));
    }
    Ok(env)
}

/// `$(VAR)` expansion of command and args, as the kubelet does; unknown references
/// are left as they are, `$$` escapes.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let (Some(body), true) = (after.strip_prefix('('), after.contains(')')) {
            let end = body.find(')').unwrap();
            let name = &body[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_follows_kubelet_rules() {
        let env = vec![("NODE_NAME".to_string(), "node-1".to_string())];
        assert_eq!(expand("--hostname-override=$(NODE_NAME)", &env), "--hostname-override=node-1");
        assert_eq!(expand("$(MISSING) $$(NODE_NAME) $5", &env), "$(MISSING) $(NODE_NAME) $5");
    }

    #[test]
    fn path_map_translates_args_and_text_longest_first() {
        let mut m = PathMap::default();
        m.add("/var/lib/kube-proxy", PathBuf::from("/lab/p/volumes/kube-proxy"));
        m.add("/var/lib", PathBuf::from("/lab/p/varlib"));
        assert_eq!(
            m.translate("--config=/var/lib/kube-proxy/config.conf"),
            "--config=/lab/p/volumes/kube-proxy/config.conf"
        );
        assert_eq!(m.translate("/var/lib/x"), "/lab/p/varlib/x");
        assert_eq!(m.translate("/etc/other"), "/etc/other");
        assert_eq!(m.translate("--v=2"), "--v=2");
        assert_eq!(
            m.translate_text("kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n"),
            "kubeconfig: /lab/p/volumes/kube-proxy/kubeconfig.conf\n"
        );
    }
}
