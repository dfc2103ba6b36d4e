//! The lab has no container images, so each image a pod names is mapped to a local
//! program. The table is deliberately small and explicit; an image not in it makes the
//! pod fail with a message that names the image.
//!
//! | image (contains)                 | runs                                             |
//! |----------------------------------|--------------------------------------------------|
//! | `kube-proxy`                     | the real kube-proxy v1.20.2, config from its ConfigMap |
//! | `flannel/flannel-cni-plugin`     | installs the lab's `flannel` CNI plugin on the node |
//! | `flannel/flannel` + `flanneld`   | the flanneld stand-in (`kubeshift lab flanneld`) |
//! | `calico/cni` + `install`         | installs the `calico` CNI plugin and 10-calico.conflist |
//! | `calico/node`                    | the calico-node stand-in (`kubeshift lab calico-node`) |
//! | `agnhost` `netexec`              | kubeshift's echo server (`kubeshift lab netexec`)  |
//! | `kubeshift`                      | this kubeshift binary with the container's args (KUBECONFIG: the pod's token); with a host-tool command (`cp`), that tool, the image's `/usr/local/bin/kubeshift*` being the binaries next to this one |
//! | `pause`, `calico/kube-controllers` | sleeps                                         |
//! | any image whose command is `sh`, `sleep`, `cp`, `cat`, `echo`, `true` | that host program, paths translated |

use super::volumes::PathMap;
use super::NodeCtx;
use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Container;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Program {
    pub argv: Vec<String>,
    /// Added to the container's environment.
    pub env: Vec<(String, String)>,
}

/// Host programs a container may name directly.
const HOST_TOOLS: &[&str] = &["sh", "sleep", "cp", "cat", "echo", "true", "ls", "mkdir"];

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

pub struct ResolveInput<'a> {
    pub container: &'a Container,
    /// command + args after $(VAR) expansion.
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: &'a [(String, String)],
    pub paths: &'a PathMap,
    pub pod_dir: &'a Path,
    /// A kubeconfig carrying the pod's service-account token, for kubeshift's own
    /// stand-ins (they reach the apiserver directly, as kube-proxy does).
    pub pod_kubeconfig: &'a Path,
}

pub fn resolve(ctx: &NodeCtx, r: &ResolveInput) -> Result<Program> {
    let image = r.container.image.clone().unwrap_or_default();
    let exe = ctx.self_exe.display().to_string();
    let root = ctx.root.display().to_string();
    let all: Vec<String> = r.command.iter().chain(r.args.iter()).cloned().collect();
    let first = all.first().map(|s| basename(s).to_string()).unwrap_or_default();
    let lab = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![exe.clone(), "lab".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let mut extra_env = Vec::new();
    let argv: Vec<String> = if image.contains("kubeshift") && HOST_TOOLS.contains(&first.as_str()) {
        // e.g. the agent's init container copying the CNI plugin out of the image.
        let mut v = vec![first.clone()];
        v.extend(all[1..].iter().map(|a| kubeshift_image_path(ctx, &r.paths.translate(a))));
        v
    } else if image.contains("kube-proxy") {
        kube_proxy(ctx, r)?
    } else if image.contains("flannel/flannel-cni-plugin") {
        lab(&["install-cni", "--root", &root, "--plugin", "flannel"])
    } else if image.contains("flannel/flannel") && all.iter().any(|a| a.contains("flanneld")) {
        let net_conf = r.paths.translate("/etc/kube-flannel/net-conf.json");
        let mut v = lab(&["flanneld", "--root", &root, "--node", &ctx.node, "--kubeconfig"]);
        v.push(r.pod_kubeconfig.display().to_string());
        v.extend(["--net-conf".into(), net_conf]);
        if all.iter().any(|a| a == "--ip-masq") {
            v.push("--ip-masq".into());
        }
        v
    } else if image.contains("calico/cni") && all.iter().any(|a| a.contains("install")) {
        let conf_name = env(r, "CNI_CONF_NAME").unwrap_or_else(|| "10-calico.conflist".into());
        let template = r.pod_dir.join("cni-network-config.json");
        std::fs::write(&template, env(r, "CNI_NETWORK_CONFIG").unwrap_or_default())?;
        let t = template.display().to_string();
        lab(&[
            "install-cni",
            "--root",
            &root,
            "--plugin",
            "calico",
            "--conf-name",
            &conf_name,
            "--conf-template",
            &t,
            "--node",
            &ctx.node,
        ])
    } else if image.contains("calico/cni") {
        vec!["true".into()]
    } else if image.contains("calico/node") {
        let mut v = lab(&["calico-node", "--root", &root, "--node", &ctx.node, "--kubeconfig"]);
        v.push(r.pod_kubeconfig.display().to_string());
        v
    } else if image.contains("agnhost") && r.args.first().map(String::as_str) == Some("netexec") {
        let mut v = lab(&["netexec"]);
        v.extend(r.args[1..].iter().cloned());
        v
    } else if image.contains("kubeshift") {
        // The agent reaches the apiserver as its service account, as in-cluster config
        // would (the token path of a real pod does not exist on the lab's host).
        extra_env.push(("KUBECONFIG".to_string(), r.pod_kubeconfig.display().to_string()));
        let mut v = vec![exe.clone()];
        let rest: Vec<String> = if first == "kubeshift" { all[1..].to_vec() } else { all.clone() };
        v.extend(rest.iter().map(|a| r.paths.translate(a)));
        v
    } else if image.contains("pause") || image.contains("calico/kube-controllers") {
        vec!["sleep".into(), "infinity".into()]
    } else if HOST_TOOLS.contains(&first.as_str()) {
        let mut v = vec![first.clone()];
        v.extend(all[1..].iter().map(|a| r.paths.translate(a)));
        v
    } else {
        bail!("image {image:?} (command {all:?}) has no local stand-in in the lab's image table (lab/src/kubelet/images.rs)");
    };
    Ok(Program { argv, env: extra_env })
}

/// The kubeshift image's own binaries (`/usr/local/bin/kubeshift*`, see Containerfile)
/// are the ones built next to this binary. The CNI plugin (`kubeshift-cni`) is another
/// cargo target: when it was not built, this binary stands in for it (run with no
/// arguments and CNI_COMMAND set, `kubeshift` is the plugin), and the kubelet log says so.
fn kubeshift_image_path(ctx: &NodeCtx, a: &str) -> String {
    let Some(name) = a.strip_prefix("/usr/local/bin/").filter(|n| n.starts_with("kubeshift")) else {
        return a.to_string();
    };
    let dir = ctx.self_exe.parent().unwrap_or(Path::new("/"));
    let built = dir.join(name);
    if built.exists() {
        return built.display().to_string();
    }
    tracing::warn!(
        "{name} is not built next to {}; the lab copies kubeshift itself in its place",
        ctx.self_exe.display()
    );
    ctx.self_exe.display().to_string()
}

fn env(r: &ResolveInput, name: &str) -> Option<String> {
    r.env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// Runs the real kube-proxy with the KubeProxyConfiguration from its ConfigMap, with
/// three lab adjustments: paths translated to the pod's volumes, the hostname
/// override, and conntrack sizing/timeouts zeroed so kube-proxy never writes the
/// machine-wide nf_conntrack sysctls (the lab shares the host kernel).
fn kube_proxy(ctx: &NodeCtx, r: &ResolveInput) -> Result<Vec<String>> {
    let bin = crate::control_plane::binary("kube-proxy")?;
    let all: Vec<&String> = r.command.iter().chain(r.args.iter()).collect();
    let config = all
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .map(|p| PathBuf::from(r.paths.translate(p)))
        .context("kube-proxy container has no --config= argument")?;
    let text = std::fs::read_to_string(&config).with_context(|| format!("kube-proxy config {}", config.display()))?;
    let mut cfg: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}: not YAML", config.display()))?;
    cfg["hostnameOverride"] = ctx.node.clone().into();
    let mut conntrack = serde_yaml::Mapping::new();
    conntrack.insert("maxPerCore".into(), 0.into());
    conntrack.insert("min".into(), 0.into());
    conntrack.insert("tcpEstablishedTimeout".into(), "0s".into());
    conntrack.insert("tcpCloseWaitTimeout".into(), "0s".into());
    cfg["conntrack"] = serde_yaml::Value::Mapping(conntrack);
    if let Some(kc) = cfg["clientConnection"]["kubeconfig"].as_str().map(str::to_string) {
        let kc_path = PathBuf::from(r.paths.translate(&kc));
        let kc_text = std::fs::read_to_string(&kc_path)
            .with_context(|| format!("kube-proxy kubeconfig {}", kc_path.display()))?;
        let local = r.pod_dir.join("kube-proxy.kubeconfig");
        std::fs::write(&local, r.paths.translate_text(&kc_text))?;
        cfg["clientConnection"]["kubeconfig"] = local.display().to_string().into();
    }
    // Health and metrics listen inside the node's own netns.
    let out = r.pod_dir.join("kube-proxy-config.yaml");
    std::fs::write(&out, serde_yaml::to_string(&cfg)?)?;
    let mut argv = vec![bin.display().to_string(), format!("--config={}", out.display())];
    for a in all.iter().filter(|a| a.starts_with("--v=")) {
        argv.push(a.to_string());
    }
    Ok(argv)
}
