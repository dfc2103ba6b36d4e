//! The Node object: registration, status and the heartbeat Lease, as a kubelet keeps
//! them. Ready follows the network: a node is Ready once its CNI config exists, as
//! the real kubelet reports NetworkReady.

use super::NodeCtx;
use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;

pub fn labels(ctx: &NodeCtx) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert("kubernetes.io/hostname".into(), ctx.node.clone());
    l.insert("kubernetes.io/os".into(), "linux".into());
    l.insert("kubernetes.io/arch".into(), "amd64".into());
    l.insert("beta.kubernetes.io/os".into(), "linux".into());
    l.insert("beta.kubernetes.io/arch".into(), "amd64".into());
    l.insert("node.kubernetes.io/instance-type".into(), "kubeshift-lab".into());
    if ctx.lab.is_control_plane(ctx.index) {
        // As kubeadm 1.20 labels its control-plane nodes (both role names).
        l.insert("node-role.kubernetes.io/control-plane".into(), String::new());
        l.insert("node-role.kubernetes.io/master".into(), String::new());
    } else {
        l.insert(ctx.lab.pool_label.clone(), ctx.lab.pool_of(ctx.index));
    }
    l
}

pub async fn register(ctx: &NodeCtx) -> Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    if api.get_opt(&ctx.node).await?.is_none() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": ctx.node, "labels": labels(ctx)},
            // kubeadm's control-plane taint: only pods that tolerate it (DaemonSets) run there.
            "spec": if ctx.lab.is_control_plane(ctx.index) {
                json!({"taints": [{"key": "node-role.kubernetes.io/master", "effect": "NoSchedule"}]})
            } else {
                json!({})
            },
        }))?;
        api.create(&PostParams::default(), &node).await?;
        tracing::info!("registered node {}", ctx.node);
    }
    Ok(())
}

fn kernel_version() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string())))
        .unwrap_or_else(|| "Linux".into())
}

pub fn network_ready(ctx: &NodeCtx) -> bool {
    ctx.cni().default_conf().ok().flatten().is_some()
}

pub async fn update_status(ctx: &NodeCtx) -> Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ready = network_ready(ctx);
    let (status, reason, message) = if ready {
        ("True", "KubeletReady", "kubelet stand-in is posting ready status")
    } else {
        ("False", "KubeletNotReady", "network plugin is not ready: cni config uninitialized")
    };
    let cond = |t: &str, s: &str, r: &str, m: &str| json!({"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": now, "lastTransitionTime": now});
    let patch = json!({
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": ctx.node_ip.to_string()},
                {"type": "Hostname", "address": ctx.node},
            ],
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": ctx.node, "systemUUID": ctx.node, "bootID": ctx.node,
                "kernelVersion": kernel_version(),
                "osImage": os_image(),
                "containerRuntimeVersion": "kubeshift-lab://0.1.0",
                "kubeletVersion": crate::spec::K8S_VERSION,
                "kubeProxyVersion": crate::spec::K8S_VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", status, reason, message),
            ],
        }
    });
    api.patch_status(&ctx.node, &PatchParams::default(), &Patch::Strategic(&patch)).await?;
    Ok(())
}

pub async fn renew_lease(ctx: &NodeCtx) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": ctx.node, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": ctx.node, "leaseDurationSeconds": 40, "renewTime": now},
    }))?;
    match api.get_opt(&ctx.node).await? {
        None => {
            api.create(&PostParams::default(), &lease).await?;
        }
        Some(mut cur) => {
            cur.spec = lease.spec;
            api.replace(&ctx.node, &PostParams::default(), &cur).await?;
        }
    }
    Ok(())
}

pub fn is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        .unwrap_or(false)
}
