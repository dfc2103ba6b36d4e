//! `lab status`: what is running, what the API says about the nodes.

use crate::state::LabState;
use anyhow::{anyhow, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct LabStatus {
    pub name: String,
    pub cni: String,
    pub kubeconfig: String,
    pub api: String,
    pub processes: Vec<(String, i32, bool)>,
    pub nodes: Vec<NodeLine>,
    pub leftovers_if_down: usize,
}

#[derive(Debug, Serialize)]
pub struct NodeLine {
    pub name: String,
    pub ready: bool,
    pub pool: String,
    pub pod_cidr: String,
    pub ip: String,
}

pub async fn status(lab: &str) -> Result<LabStatus> {
    let dir = crate::spec::state_dir(lab);
    let st =
        LabState::load(&dir)?.ok_or_else(|| anyhow!("lab {lab} is not up (no {})", LabState::path(&dir).display()))?;
    let processes = st.processes.iter().map(|p| (p.name.clone(), p.pid, p.is_running())).collect();
    let mut nodes = vec![];
    let api = match crate::api::client_from(&st.kubeconfig).await {
        Ok(c) => match Api::<Node>::all(c).list(&ListParams::default()).await {
            Ok(list) => {
                for n in list.items {
                    let labels = n.metadata.labels.clone().unwrap_or_default();
                    nodes.push(NodeLine {
                        name: n.metadata.name.clone().unwrap_or_default(),
                        ready: crate::kubelet::node_is_ready(&n),
                        pool: labels.get(&st.spec.pool_label).cloned().unwrap_or_default(),
                        pod_cidr: n.spec.as_ref().and_then(|s| s.pod_cidr.clone()).unwrap_or_default(),
                        ip: n
                            .status
                            .as_ref()
                            .and_then(|s| s.addresses.as_ref())
                            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                            .map(|a| a.address.clone())
                            .unwrap_or_default(),
                    });
                }
                format!("https://127.0.0.1:{} (reachable)", st.api_port)
            }
            Err(e) => format!("https://127.0.0.1:{} (unreachable: {e})", st.api_port),
        },
        Err(e) => format!("no client: {e:#}"),
    };
    Ok(LabStatus {
        name: lab.to_string(),
        cni: format!("{:?}", st.spec.cni).to_lowercase(),
        kubeconfig: st.kubeconfig.display().to_string(),
        api,
        processes,
        nodes,
        leftovers_if_down: crate::down::leftovers(lab).len(),
    })
}

impl std::fmt::Display for LabStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "lab {} ({}), API {}", self.name, self.cni, self.api)?;
        writeln!(f, "kubeconfig: {}", self.kubeconfig)?;
        writeln!(f, "{:<12} {:<7} {:<8} {:<16} IP", "NODE", "READY", "POOL", "POD CIDR")?;
        for n in &self.nodes {
            writeln!(f, "{:<12} {:<7} {:<8} {:<16} {}", n.name, n.ready, n.pool, n.pod_cidr, n.ip)?;
        }
        let down: Vec<&str> = self.processes.iter().filter(|p| !p.2).map(|p| p.0.as_str()).collect();
        if down.is_empty() {
            writeln!(f, "{} lab processes running", self.processes.len())
        } else {
            writeln!(f, "NOT running: {}", down.join(", "))
        }
    }
}
