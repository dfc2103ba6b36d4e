//! `kubeshift install manifests`: the objects that put the agent on every node, as one
//! multi-document YAML on stdout (`| kubectl apply -f -`). The default rendering is
//! checked in as `deploy/kubeshift.yaml`; a unit test keeps the two equal.
//!
//! The agent starts in standby (overlay and node range only); the migration later makes
//! a node active. RBAC is what the agent reads or writes in either mode, no more.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kubeshift_datapath::overlay;
use serde_json::{json, Value};

pub const DEFAULT_IMAGE: &str = "docker.io/kubeshift/kubeshift:0.1.0";
const NAME: &str = "kubeshift-agent";
const NAMESPACE: &str = "kube-system";
/// `/readyz`, `/healthz`, `/metrics` on every node.
const METRICS_PORT: u16 = 9963;

#[derive(Args, Debug)]
pub struct InstallArgs {
    #[command(subcommand)]
    pub command: InstallCommand,
}

#[derive(Subcommand, Debug)]
pub enum InstallCommand {
    /// Print the agent's ServiceAccount, RBAC, CRDs and DaemonSet (standby) as YAML.
    Manifests(ManifestArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ManifestArgs {
    /// The agent's image.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// The pod CIDR node ranges are carved from (the plan's target.podCidr).
    #[arg(long, default_value = overlay::DEFAULT_POD_CIDR)]
    pub pod_cidr: String,
    /// UDP port of kubeshift's overlay (not the legacy's 8472).
    #[arg(long, default_value_t = overlay::DEFAULT_PORT)]
    pub tunnel_port: u16,
    /// VXLAN network identifier of kubeshift's overlay (not Flannel's 1).
    #[arg(long, default_value_t = overlay::DEFAULT_VNI)]
    pub vni: u32,
    /// The legacy pod networks (Flannel's Network, each Calico IPPool; repeat the flag):
    /// traffic between them and kubeshift's keeps its source address.
    #[arg(long = "legacy-pod-cidr")]
    pub legacy_pod_cidrs: Vec<String>,
}

impl Default for ManifestArgs {
    fn default() -> Self {
        ManifestArgs {
            image: DEFAULT_IMAGE.into(),
            pod_cidr: overlay::DEFAULT_POD_CIDR.into(),
            tunnel_port: overlay::DEFAULT_PORT,
            vni: overlay::DEFAULT_VNI,
            legacy_pod_cidrs: Vec::new(),
        }
    }
}

pub fn run(args: &InstallArgs) -> Result<()> {
    match &args.command {
        InstallCommand::Manifests(m) => {
            print!("{}", render(m)?);
            Ok(())
        }
    }
}

/// The manifests for `a`; refuses a pod CIDR, port or VNI the agent would refuse.
pub fn render(a: &ManifestArgs) -> Result<String> {
    let pod_cidr: overlay::Cidr = a.pod_cidr.parse().with_context(|| format!("--pod-cidr {}", a.pod_cidr))?;
    let mut check = overlay::OverlayConfig::new("check");
    check.port = a.tunnel_port;
    check.vni = a.vni;
    check.check()?;
    let mut docs: Vec<String> = Vec::new();
    let mut push = |v: Value| docs.push(serde_yaml::to_string(&v).expect("a JSON value serializes as YAML"));
    push(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
    }));
    push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": NAME},
        "rules": [
            // The overlay: every node's InternalIP. The IPAM claim lists them to free
            // the ranges of deleted nodes.
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            // The active datapath: services, endpoints, policy identities.
            {"apiGroups": [""], "resources": ["services", "endpoints", "pods", "namespaces"], "verbs": ["list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]},
            // The node's own NodeMigration: the agent reconciles it and reports status.
            {"apiGroups": ["kubeshift.io"], "resources": ["nodemigrations"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["kubeshift.io"], "resources": ["nodemigrations/status"], "verbs": ["get", "update", "patch"]},
        ],
    }));
    push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": NAME},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
    }));
    // The IPAM ConfigMap only, in kube-system only: a Role, get/update scoped by name.
    // `create` cannot be scoped by name (the object has none before it exists), so it
    // stands alone; the first agent creates the ConfigMap, the others update it.
    push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [overlay::ipam::IPAM_CONFIGMAP], "verbs": ["get", "update"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        ],
    }));
    push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
    }));
    let crds = kubeshift_node_migrator::crd::crds_yaml();
    // Paths are given even where they are the defaults: they name the mounts below,
    // and a runtime that maps hostPaths elsewhere (the lab) translates them.
    let mut args: Vec<String> = [
        "agent",
        "--node",
        "$(NODE_NAME)",
        "--mode",
        "auto",
        "--metrics",
        &format!("0.0.0.0:{METRICS_PORT}"),
        "--pod-cidr",
        &pod_cidr.to_string(),
        "--tunnel-port",
        &a.tunnel_port.to_string(),
        "--vni",
        &a.vni.to_string(),
        "--cgroup",
        "/sys/fs/cgroup",
        "--bpffs",
        "/sys/fs/bpf/kubeshift",
        "--cni-conf-dir",
        "/etc/cni/net.d",
        "--cni-socket",
        "/run/kubeshift/cni.sock",
        "--cni-data-dir",
        "/var/lib/cni/kubeshift",
        "--state-dir",
        "/var/lib/kubeshift",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for l in &a.legacy_pod_cidrs {
        let c: overlay::Cidr = l.parse().with_context(|| format!("--legacy-pod-cidr {l}"))?;
        anyhow::ensure!(!c.overlaps(&pod_cidr), "--legacy-pod-cidr {c} overlaps --pod-cidr {pod_cidr}");
        args.extend(["--legacy-pod-cidr".to_string(), c.to_string()]);
    }
    push(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {"k8s-app": NAME}},
        "spec": {
            "selector": {"matchLabels": {"k8s-app": NAME}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"k8s-app": NAME}},
                "spec": {
                    "serviceAccountName": NAME,
                    "hostNetwork": true,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    // Like kube-proxy's: the node's network must come up on every node,
                    // whatever its taints (NotReady, unschedulable, control plane).
                    "tolerations": [{"operator": "Exists"}],
                    "initContainers": [{
                        // The image carries the CNI plugin as /usr/local/bin/kubeshift-cni;
                        // a plain cp puts it where the runtime looks for type "kubeshift".
                        "name": "install-cni",
                        "image": a.image,
                        "command": ["cp", "/usr/local/bin/kubeshift-cni", "/host/opt/cni/bin/kubeshift"],
                        "securityContext": {"privileged": true},
                        "volumeMounts": [{"name": "cni-bin", "mountPath": "/host/opt/cni/bin"}],
                    }],
                    "containers": [{
                        "name": "agent",
                        "image": a.image,
                        "args": args,
                        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                        "securityContext": {"privileged": true},
                        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                        "readinessProbe": {
                            "httpGet": {"path": "/readyz", "port": METRICS_PORT},
                            "periodSeconds": 2,
                        },
                        "livenessProbe": {
                            "httpGet": {"path": "/healthz", "port": METRICS_PORT},
                            "initialDelaySeconds": 30,
                            "periodSeconds": 10,
                        },
                        "volumeMounts": [
                            {"name": "bpffs", "mountPath": "/sys/fs/bpf"},
                            {"name": "cni-conf", "mountPath": "/etc/cni/net.d"},
                            {"name": "run-kubeshift", "mountPath": "/run/kubeshift"},
                            {"name": "cni-data", "mountPath": "/var/lib/cni/kubeshift"},
                            {"name": "cgroup", "mountPath": "/sys/fs/cgroup"},
                            {"name": "state", "mountPath": "/var/lib/kubeshift"},
                        ],
                    }],
                    "volumes": [
                        {"name": "cni-bin", "hostPath": {"path": "/opt/cni/bin", "type": "DirectoryOrCreate"}},
                        {"name": "cni-conf", "hostPath": {"path": "/etc/cni/net.d", "type": "DirectoryOrCreate"}},
                        {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}},
                        {"name": "run-kubeshift", "hostPath": {"path": "/run/kubeshift", "type": "DirectoryOrCreate"}},
                        {"name": "cni-data", "hostPath": {"path": "/var/lib/cni/kubeshift", "type": "DirectoryOrCreate"}},
                        {"name": "cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}},
                        {"name": "state", "hostPath": {"path": "/var/lib/kubeshift", "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    }));
    let mut out = String::from(
        "# kubeshift agent: rendered by `kubeshift install manifests`; edit the command, not this file.\n",
    );
    let head = docs.len() - 1;
    for d in &docs[..head] {
        out.push_str("---\n");
        out.push_str(d);
    }
    out.push_str("---\n");
    out.push_str(&crds);
    if !crds.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("---\n");
    out.push_str(&docs[head]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubeshift.yaml");

    #[test]
    fn the_checked_in_manifests_are_the_default_rendering() {
        let want = render(&ManifestArgs::default()).unwrap();
        if std::env::var_os("KUBESHIFT_BLESS").is_some() {
            std::fs::write(CHECKED_IN, &want).unwrap();
        }
        let have = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
        assert!(have == want, "{CHECKED_IN} is stale: run `kubeshift install manifests > deploy/kubeshift.yaml`");
    }

    #[test]
    fn every_document_parses_and_the_daemonset_follows_the_node_label_with_the_flags() {
        let a = ManifestArgs {
            tunnel_port: 9000,
            vni: 7,
            pod_cidr: "10.50.0.0/16".into(),
            image: "reg/ks:dev".into(),
            legacy_pod_cidrs: vec!["10.244.0.0/16".into()],
        };
        let text = render(&a).unwrap();
        let docs: Vec<serde_yaml::Value> =
            serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        for k in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "CustomResourceDefinition",
            "DaemonSet",
        ] {
            assert!(kinds.contains(&k), "{k} missing: {kinds:?}");
        }
        let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        let c = &ds["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(
            args.join(" "),
            "agent --node $(NODE_NAME) --mode auto --metrics 0.0.0.0:9963 --pod-cidr 10.50.0.0/16 --tunnel-port 9000 \
             --vni 7 --cgroup /sys/fs/cgroup --bpffs /sys/fs/bpf/kubeshift --cni-conf-dir /etc/cni/net.d \
             --cni-socket /run/kubeshift/cni.sock --cni-data-dir /var/lib/cni/kubeshift --state-dir /var/lib/kubeshift \
             --legacy-pod-cidr 10.244.0.0/16"
        );
        // Every path flag names a mounted volume (a runtime translating hostPaths relies on it).
        let mounts: Vec<&str> =
            c["volumeMounts"].as_sequence().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
        for p in args.iter().filter(|a| a.starts_with('/')) {
            assert!(mounts.iter().any(|m| p.starts_with(m)), "{p} is on no volume: {mounts:?}");
        }
        assert_eq!(c["image"], "reg/ks:dev");
        assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
    }

    #[test]
    fn the_legacy_port_and_a_bad_cidr_are_refused_with_the_flag_named() {
        let e = render(&ManifestArgs { tunnel_port: 8472, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("8472"), "{e}");
        let e =
            format!("{:#}", render(&ManifestArgs { pod_cidr: "10.0.0.1/8".into(), ..Default::default() }).unwrap_err());
        assert!(e.contains("--pod-cidr 10.0.0.1/8"), "{e}");
        let e = render(&ManifestArgs { legacy_pod_cidrs: vec!["10.200.5.0/24".into()], ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("--legacy-pod-cidr 10.200.5.0/24 overlaps"), "{e}");
    }
}
