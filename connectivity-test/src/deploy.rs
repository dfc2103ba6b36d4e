//! The suite's own namespace: echo servers and probe agents pinned to nodes (two pod
//! endpoints and one host-network endpoint per node), a Service and a NodePort per
//! pod endpoint, and the RBAC the agents need to report. Everything lives in one
//! namespace, so clean-up is one delete.

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const PART_OF: &str = "kubeshift-connectivity";
pub const POD_PORTS: (u16, u16) = (8080, 8081);
/// The host-network endpoints' ports unless configured otherwise: TCP, UDP, then the
/// stream echo.
pub const HOST_PORT_BASE: u16 = 40080;
/// The agents' line-echo port, end of the conn-disrupt connections.
pub const STREAM_PORT: u16 = 8082;

#[derive(Debug, Clone)]
pub struct DeployConfig {
    pub namespace: String,
    pub echo_image: String,
    pub agent_image: String,
    /// Command that starts kubeshift in the agent image.
    pub agent_command: Vec<String>,
    /// Nodes to place endpoints on; empty = the first two Ready nodes.
    pub nodes: Vec<String>,
    /// The host-network endpoints' TCP port; UDP and the stream echo take the next two.
    /// Two suites on one node at once (a migration's gate beside its long-lived
    /// connections) need different ones.
    pub host_port_base: u16,
}

impl DeployConfig {
    /// (TCP, UDP, stream) ports of an endpoint.
    pub fn ports(&self, host: bool) -> (u16, u16, u16) {
        if host {
            (self.host_port_base, self.host_port_base + 1, self.host_port_base + 2)
        } else {
            (POD_PORTS.0, POD_PORTS.1, STREAM_PORT)
        }
    }
}

/// One test endpoint as deployed: a pod (or host-network pod) that echoes and probes.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub pod: String,
    /// Stable name for matrices: "node-1/pod-1", "node-1/host".
    pub key: String,
    pub node: String,
    pub node_ip: String,
    pub ip: String,
    pub host: bool,
    pub tcp: u16,
    pub udp: u16,
    pub service_ip: Option<String>,
    pub node_port: Option<u16>,
}

pub async fn pick_nodes(client: &Client, wanted: &[String]) -> Result<Vec<(String, String)>> {
    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await.context("listing nodes")?;
    let mut ready: Vec<(String, String)> = nodes
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .map(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                .unwrap_or(false)
                && !n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false)
        })
        .filter_map(|n| {
            let ip = n.status.as_ref()?.addresses.as_ref()?.iter().find(|a| a.type_ == "InternalIP")?.address.clone();
            Some((n.metadata.name.clone()?, ip))
        })
        .collect();
    ready.sort();
    if !wanted.is_empty() {
        let picked: Vec<(String, String)> = wanted
            .iter()
            .map(|w| {
                ready
                    .iter()
                    .find(|(n, _)| n == w)
                    .cloned()
                    .ok_or_else(|| anyhow!("node {w} is not a Ready, schedulable node"))
            })
            .collect::<Result<_>>()?;
        return Ok(picked);
    }
    if ready.len() < 2 {
        bail!(
            "the connectivity suite needs two Ready, schedulable nodes (same-node and cross-node checks); found {}",
            ready.len()
        );
    }
    ready.truncate(2);
    Ok(ready)
}

/// Where the agents report to: the apiserver's own endpoint, not its ClusterIP.
pub async fn api_server_endpoint(client: &Client) -> Result<String> {
    let ep = Api::<Endpoints>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .context("reading default/kubernetes Endpoints")?;
    let s = ep
        .subsets
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("default/kubernetes has no endpoints"))?;
    let ip = s
        .addresses
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("default/kubernetes has no address"))?
        .ip;
    let port = s
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("https"))
        .map(|p| p.port)
        .unwrap_or(443);
    Ok(format!("https://{ip}:{port}"))
}

async fn apply(client: &Client, ns: &str, v: Value) -> Result<()> {
    let kind = v["kind"].as_str().unwrap_or("").to_string();
    let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
    let pp = PatchParams::apply("kubeshift-connectivity").force();
    let r = match kind.as_str() {
        "Namespace" => Api::<Namespace>::all(client.clone()).patch(&name, &pp, &Patch::Apply(&v)).await.map(|_| ()),
        "Pod" => Api::<Pod>::namespaced(client.clone(), ns).patch(&name, &pp, &Patch::Apply(&v)).await.map(|_| ()),
        "Service" => {
            Api::<Service>::namespaced(client.clone(), ns).patch(&name, &pp, &Patch::Apply(&v)).await.map(|_| ())
        }
        _ => {
            let (group, version) = match v["apiVersion"].as_str().unwrap_or("").split_once('/') {
                Some((g, v)) => (g.to_string(), v.to_string()),
                None => (String::new(), v["apiVersion"].as_str().unwrap_or("v1").to_string()),
            };
            let ar = kube::api::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(&group, &version, &kind));
            Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), ns, &ar)
                .patch(&name, &pp, &Patch::Apply(&v))
                .await
                .map(|_| ())
        }
    };
    r.with_context(|| format!("creating {kind} {ns}/{name}"))
}

/// The second namespace: one endpoint there lets policy scenarios select by namespace.
pub fn peer_namespace(cfg: &DeployConfig) -> String {
    format!("{}-peer", cfg.namespace)
}

fn pod_manifest(cfg: &DeployConfig, pod_ns: &str, server: &str, name: &str, node: &str, host: bool) -> Value {
    let (tcp, udp, stream) = cfg.ports(host);
    let mut agent_args = vec![
        "connectivity".to_string(),
        "agent".into(),
        "--namespace".into(),
        cfg.namespace.clone(),
        "--pod".into(),
        "$(POD_NAME)".into(),
        "--sa-dir".into(),
        "/var/run/secrets/kubernetes.io/serviceaccount".into(),
        "--server".into(),
        server.to_string(),
        "--stream-port".into(),
        stream.to_string(),
    ];
    let mut command = cfg.agent_command.clone();
    command.append(&mut agent_args);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": pod_ns, "labels": {
            "app.kubernetes.io/part-of": PART_OF, "kubeshift.io/endpoint": name}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "hostNetwork": host,
            "serviceAccountName": "kubeshift-connectivity",
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {"name": "echo", "image": cfg.echo_image,
                 "args": ["netexec", format!("--http-port={tcp}"), format!("--udp-port={udp}")],
                 "ports": [{"name": "http", "containerPort": tcp}, {"name": "udp", "containerPort": udp, "protocol": "UDP"}],
                 "readinessProbe": {"httpGet": {"path": "/healthz", "port": tcp}, "periodSeconds": 1}},
                {"name": "agent", "image": cfg.agent_image, "command": command,
                 "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
            ]
        }
    })
}

pub async fn deploy(client: &Client, cfg: &DeployConfig, nodes: &[(String, String)]) -> Result<()> {
    let ns = &cfg.namespace;
    let server = api_server_endpoint(client).await?;
    let peer = peer_namespace(cfg);
    for (n, role) in [(ns, "main"), (&peer, "peer")] {
        apply(client, n, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {"app.kubernetes.io/part-of": PART_OF, "kubeshift.io/connectivity": role}}})).await?;
        apply(client, n, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kubeshift-connectivity", "namespace": n}})).await?;
    }
    apply(client, ns, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "kubeshift-connectivity-agent", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "update", "patch"]}]})).await?;
    apply(client, ns, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "kubeshift-connectivity-agent", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubeshift-connectivity-agent"},
        "subjects": [{"kind": "ServiceAccount", "name": "kubeshift-connectivity", "namespace": ns},
                     {"kind": "ServiceAccount", "name": "kubeshift-connectivity", "namespace": peer}]})).await?;
    let (first, _) = &nodes[0];
    apply(client, &peer, pod_manifest(cfg, &peer, &server, &format!("peer-{first}"), first, false)).await?;
    for (node, _) in nodes {
        for (i, host) in [(1, false), (2, false), (0, true)] {
            let name = endpoint_pod_name(node, i, host);
            apply(client, ns, pod_manifest(cfg, ns, &server, &name, node, host)).await?;
            if !host {
                apply(client, ns, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc-{name}"), "namespace": ns},
                    "spec": {"selector": {"kubeshift.io/endpoint": name}, "ports": [
                        {"name": "http", "port": 80, "targetPort": POD_PORTS.0, "protocol": "TCP"},
                        {"name": "udp", "port": POD_PORTS.1, "targetPort": POD_PORTS.1, "protocol": "UDP"},
                        {"name": "stream", "port": STREAM_PORT, "targetPort": STREAM_PORT, "protocol": "TCP"}]}})).await?;
                apply(client, ns, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("np-{name}"), "namespace": ns},
                    "spec": {"type": "NodePort", "selector": {"kubeshift.io/endpoint": name}, "ports": [
                        {"name": "http", "port": 80, "targetPort": POD_PORTS.0, "protocol": "TCP"}]}})).await?;
            }
        }
    }
    Ok(())
}

pub fn endpoint_pod_name(node: &str, i: u8, host: bool) -> String {
    if host {
        format!("host-{node}")
    } else {
        format!("pod-{i}-{node}")
    }
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        .unwrap_or(false)
}

/// Waits for every endpoint to be Ready and returns them with their addresses.
pub async fn wait_endpoints(
    client: &Client,
    cfg: &DeployConfig,
    nodes: &[(String, String)],
    timeout: Duration,
    progress: impl Fn(usize, usize),
) -> Result<Vec<Endpoint>> {
    let pods: Api<Pod> = Api::all(client.clone());
    let svcs: Api<Service> = Api::namespaced(client.clone(), &cfg.namespace);
    let peer = peer_namespace(cfg);
    let want = nodes.len() * 3 + 1;
    let deadline = Instant::now() + timeout;
    loop {
        let mut list =
            pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/part-of={PART_OF}"))).await?;
        let ours = [cfg.namespace.as_str(), peer.as_str()];
        list.items.retain(|p| ours.contains(&p.metadata.namespace.as_deref().unwrap_or("")));
        let n_ready = list.items.iter().filter(|p| ready(p)).count();
        progress(n_ready, want);
        if n_ready >= want {
            let mut out = vec![];
            for (node, node_ip) in nodes {
                for (i, host) in [(1, false), (2, false), (0, true)] {
                    let name = endpoint_pod_name(node, i, host);
                    let p = list
                        .items
                        .iter()
                        .find(|p| p.metadata.name.as_deref() == Some(&name))
                        .ok_or_else(|| anyhow!("pod {name} vanished"))?;
                    let ip = p
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.clone())
                        .ok_or_else(|| anyhow!("pod {name} has no IP"))?;
                    let (service_ip, node_port) = if host {
                        (None, None)
                    } else {
                        let s = svcs.get(&format!("svc-{name}")).await?;
                        let np = svcs.get(&format!("np-{name}")).await?;
                        (
                            s.spec.and_then(|s| s.cluster_ip),
                            np.spec
                                .and_then(|s| s.ports)
                                .and_then(|p| p.first().and_then(|p| p.node_port))
                                .map(|p| p as u16),
                        )
                    };
                    let (tcp, udp, _) = cfg.ports(host);
                    out.push(Endpoint {
                        key: if host { format!("{node}/host") } else { format!("{node}/pod-{i}") },
                        pod: name,
                        node: node.clone(),
                        node_ip: node_ip.clone(),
                        ip,
                        host,
                        tcp,
                        udp,
                        service_ip,
                        node_port,
                    });
                }
            }
            let (first, first_ip) = &nodes[0];
            let name = format!("peer-{first}");
            let p = list
                .items
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(&name))
                .ok_or_else(|| anyhow!("pod {name} vanished"))?;
            out.push(Endpoint {
                key: format!("{first}/peer"),
                ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()).ok_or_else(|| anyhow!("pod {name} has no IP"))?,
                pod: name,
                node: first.clone(),
                node_ip: first_ip.clone(),
                host: false,
                tcp: POD_PORTS.0,
                udp: POD_PORTS.1,
                service_ip: None,
                node_port: None,
            });
            return Ok(out);
        }
        if Instant::now() > deadline {
            let not_ready: Vec<String> = list
                .items
                .iter()
                .filter(|p| !ready(p))
                .map(|p| {
                    let why = p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| {
                        c.iter().find_map(|c| {
                            c.state.as_ref()?.waiting.as_ref().and_then(|w| w.message.clone().or(w.reason.clone()))
                        })
                    });
                    format!(
                        "{} ({})",
                        p.metadata.name.as_deref().unwrap_or(""),
                        why.unwrap_or_else(|| "not ready".into())
                    )
                })
                .collect();
            bail!("test pods not Ready after {timeout:?}: {}", not_ready.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Refuses namespaces the suite did not make: it creates its two namespaces and deletes
/// them when done, so a name that already exists without the suite's label (`-n prod`
/// typed out of kubectl habit) must stop the run before anything is created or deleted.
pub async fn check_namespaces_are_ours(client: &Client, cfg: &DeployConfig) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    for ns in [cfg.namespace.clone(), peer_namespace(cfg)] {
        let found = api.get_opt(&ns).await.with_context(|| format!("reading namespace {ns}"))?;
        if let Some(found) = found {
            ensure_ours(&found, &ns)?;
        }
    }
    Ok(())
}

fn ensure_ours(ns: &Namespace, name: &str) -> Result<()> {
    let part_of = ns.metadata.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/part-of"));
    if part_of.map(String::as_str) != Some(PART_OF) {
        bail!(
            "namespace {name} exists and is not the connectivity test's own (no app.kubernetes.io/part-of={PART_OF} label); \
             the test creates its namespace and deletes it afterwards: name one that does not exist"
        );
    }
    Ok(())
}

/// Deletes the suite's namespaces and waits until they are gone.
pub async fn cleanup(client: &Client, cfg: &DeployConfig, timeout: Duration) -> Result<()> {
    delete_namespace(client, &peer_namespace(cfg), timeout).await?;
    delete_namespace(client, &cfg.namespace, timeout).await
}

async fn delete_namespace(client: &Client, ns: &str, timeout: Duration) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    match api.get_opt(ns).await.with_context(|| format!("reading namespace {ns}"))? {
        Some(found) => ensure_ours(&found, ns)?,
        None => return Ok(()),
    }
    match api.delete(ns, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e).context(format!("deleting namespace {ns}")),
    }
    let deadline = Instant::now() + timeout;
    while api.get_opt(ns).await?.is_some() {
        if Instant::now() > deadline {
            bail!("namespace {ns} still terminating after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn ns(labels: &[(&str, &str)]) -> Namespace {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Namespace {
            metadata: ObjectMeta { name: Some("x".into()), labels: Some(labels), ..Default::default() },
            ..Default::default()
        }
    }

    /// The suite takes (and later deletes) only namespaces it labelled as its own.
    #[test]
    fn only_the_suites_own_namespace_is_taken() {
        assert!(ensure_ours(&ns(&[("app.kubernetes.io/part-of", PART_OF)]), "ks-conn").is_ok());
        let e = ensure_ours(&ns(&[]), "prod").unwrap_err().to_string();
        assert!(e.starts_with("namespace prod exists and is not the connectivity test's own"), "{e}");
        assert!(ensure_ours(&ns(&[("app.kubernetes.io/part-of", "shop")]), "shop").is_err());
    }
}
