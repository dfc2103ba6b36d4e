//! Reads the live cluster into an [`Inventory`] through the API server. What is
//! served is discovered first: a 1.20 cluster has EndpointSlice only as v1beta1
//! and PodDisruptionBudget only as policy/v1beta1, current ones only the v1s,
//! so every versioned kind is resolved through discovery, never assumed.

use crate::inventory::*;
use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use kube::discovery::Discovery;
use kube::Client;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default)]
pub struct DiscoverOptions {
    /// `--pool-label`: the one label that names a node's pool.
    pub pool_label: Option<String>,
}

const GROUPS: &[&str] = &["discovery.k8s.io", "policy", "crd.projectcalico.org", "operator.tigera.io"];

struct Served {
    disc: Discovery,
}

impl Served {
    fn resource(&self, group: &str, version: &str, kind: &str) -> Option<kube::discovery::ApiResource> {
        self.disc.resolve_gvk(&GroupVersionKind::gvk(group, version, kind)).map(|(ar, _)| ar)
    }

    /// The first of `versions` that serves `kind`.
    fn first(&self, group: &str, versions: &[&str], kind: &str) -> Option<(String, kube::discovery::ApiResource)> {
        versions.iter().find_map(|v| self.resource(group, v, kind).map(|ar| (v.to_string(), ar)))
    }

    fn list_versions(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .disc
            .groups()
            .flat_map(|g| g.versions().map(|ver| format!("{}/{ver}", g.name())).collect::<Vec<_>>())
            .collect();
        v.sort();
        v
    }
}

async fn list_dynamic(
    client: &Client,
    ar: &kube::discovery::ApiResource,
    what: &str,
) -> Result<Vec<serde_json::Value>> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    let list = api.list(&ListParams::default()).await.with_context(|| format!("listing {what}"))?;
    list.items.into_iter().map(|o| serde_json::to_value(o).with_context(|| format!("reading {what}"))).collect()
}

fn labels(meta: &kube::api::ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

pub async fn discover(client: &Client, opts: &DiscoverOptions) -> Result<Inventory> {
    let mut inv = Inventory::default();
    let version = client.apiserver_version().await.context("asking the API server for its version")?;
    inv.server_version = version.git_version;
    let ks = Api::<Namespace>::all(client.clone()).get("kube-system").await.context("reading namespace kube-system")?;
    inv.kube_system_uid = ks.metadata.uid.unwrap_or_default();

    let disc = Discovery::new(client.clone()).filter(GROUPS).run().await.context("API discovery")?;
    let served = Served { disc };
    inv.served = served.list_versions();

    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await.context("listing nodes")?;
    for n in nodes.items {
        let l = labels(&n.metadata);
        let (pool, pool_label) = pool_of(&l, opts.pool_label.as_deref());
        let status = n.status.clone().unwrap_or_default();
        let spec = n.spec.clone().unwrap_or_default();
        inv.nodes.push(NodeInfo {
            name: n.metadata.name.clone().unwrap_or_default(),
            pool,
            pool_label,
            control_plane: is_control_plane(&l),
            kernel_version: status.node_info.map(|i| i.kernel_version).unwrap_or_default(),
            pod_cidrs: spec.pod_cidrs.or_else(|| spec.pod_cidr.map(|c| vec![c])).unwrap_or_default(),
            internal_ips: status
                .addresses
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a.type_ == "InternalIP")
                .map(|a| a.address)
                .collect(),
            unschedulable: spec.unschedulable.unwrap_or(false),
        });
    }
    inv.nodes.sort_by(|a, b| a.name.cmp(&b.name));

    let pods = Api::<Pod>::all(client.clone()).list(&ListParams::default()).await.context("listing pods")?;
    for p in &pods.items {
        let spec = p.spec.clone().unwrap_or_default();
        let owned_by_ds = p.metadata.owner_references.iter().flatten().any(|o| o.kind == "DaemonSet");
        let mirror = p.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
        let mut host_ports = Vec::new();
        for c in &spec.containers {
            for port in c.ports.iter().flatten() {
                if let Some(hp) = port.host_port.filter(|hp| *hp != 0) {
                    host_ports.push(format!(
                        "{}/{}->{hp}",
                        port.container_port,
                        port.protocol.as_deref().unwrap_or("TCP")
                    ));
                }
            }
        }
        inv.pods.push(PodInfo {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            node: spec.node_name.clone(),
            labels: labels(&p.metadata),
            host_network: spec.host_network.unwrap_or(false),
            host_ports,
            evictable: !owned_by_ds && !mirror,
            ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        });
    }

    let daemonsets =
        Api::<DaemonSet>::all(client.clone()).list(&ListParams::default()).await.context("listing DaemonSets")?;
    discover_cni(client, &served, &daemonsets.items, &mut inv).await?;
    discover_kube_proxy(client, &daemonsets.items, &pods.items, &mut inv).await?;
    discover_services(client, &served, &mut inv).await?;
    inv.service_cidr = pods.items.iter().find_map(|p| {
        let name = p.metadata.name.as_deref()?;
        if p.metadata.namespace.as_deref() != Some("kube-system") || !name.starts_with("kube-apiserver") {
            return None;
        }
        p.spec.as_ref()?.containers.iter().find_map(|c| {
            c.command
                .iter()
                .flatten()
                .chain(c.args.iter().flatten())
                .find_map(|a| a.strip_prefix("--service-cluster-ip-range=").map(str::to_string))
        })
    });

    let nps = Api::<NetworkPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing NetworkPolicies")?;
    for np in nps.items {
        inv.network_policies.push(PolicyInfo {
            namespace: np.metadata.namespace.unwrap_or_default(),
            name: np.metadata.name.unwrap_or_default(),
            spec: np.spec.unwrap_or_default(),
        });
    }
    for kind in ["NetworkPolicy", "GlobalNetworkPolicy"] {
        if let Some(ar) = served.resource("crd.projectcalico.org", "v1", kind) {
            for v in list_dynamic(client, &ar, &format!("Calico {kind}s")).await? {
                inv.calico_policies.push(calico_policy_from_json(kind, &v));
            }
        }
    }

    match served.first("policy", &["v1", "v1beta1"], "PodDisruptionBudget") {
        Some((ver, ar)) => {
            for v in list_dynamic(client, &ar, &format!("PodDisruptionBudgets (policy/{ver})")).await? {
                inv.pdbs.push(pdb_from_json(&format!("policy/{ver}"), &v));
            }
        }
        None => inv.problems.push(
            "the API server serves no PodDisruptionBudget version (policy/v1 or v1beta1): batches ignore PDBs".into(),
        ),
    }
    Ok(inv)
}

fn ds_name(ds: &DaemonSet) -> String {
    format!("{}/{}", ds.metadata.namespace.as_deref().unwrap_or(""), ds.metadata.name.as_deref().unwrap_or(""))
}

fn ds_is(ds: &DaemonSet, name: &str) -> bool {
    ds.metadata.name.as_deref() == Some(name)
        || ds.metadata.name.as_deref().is_some_and(|n| n.starts_with(&format!("{name}-")))
        || labels(&ds.metadata).get("k8s-app").is_some_and(|v| v == name)
        || labels(&ds.metadata).get("app").is_some_and(|v| v == name)
}

/// ConfigMaps the DaemonSet mounts, so a renamed kube-flannel-cfg is still found.
fn mounted_config_maps(ds: &DaemonSet) -> Vec<String> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.volumes.as_ref())
        .map(|v| v.iter().filter_map(|v| v.config_map.as_ref().map(|c| c.name.clone())).collect())
        .unwrap_or_default()
}

async fn config_map(client: &Client, ns: &str, name: &str) -> Result<Option<ConfigMap>> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .with_context(|| format!("reading ConfigMap {ns}/{name}"))
}

async fn flannel_config(client: &Client, ns: &str, candidates: &[String]) -> Result<Option<FlannelConfig>> {
    for name in candidates {
        let Some(cm) = config_map(client, ns, name).await? else { continue };
        if let Some(text) = cm.data.as_ref().and_then(|d| d.get("net-conf.json")) {
            let input = format!("ConfigMap {ns}/{name} key net-conf.json");
            return parse_flannel_net_conf(&input, text).map(Some).map_err(anyhow::Error::msg);
        }
    }
    Ok(None)
}

async fn discover_cni(client: &Client, served: &Served, dss: &[DaemonSet], inv: &mut Inventory) -> Result<()> {
    let canal = dss.iter().find(|d| ds_is(d, "canal"));
    let flannel =
        dss.iter().find(|d| ds_is(d, "flannel") || d.metadata.name.as_deref().is_some_and(|n| n.contains("flannel")));
    let calico = dss.iter().find(|d| ds_is(d, "calico-node"));
    let installation = match served.resource("operator.tigera.io", "v1", "Installation") {
        Some(ar) => list_dynamic(client, &ar, "operator.tigera.io Installations").await?.into_iter().next(),
        None => None,
    };

    if let Some(ds) = canal {
        let ns = ds.metadata.namespace.clone().unwrap_or_default();
        let mut names = mounted_config_maps(ds);
        names.push("canal-config".into());
        inv.cni.kind = Some("canal".into());
        inv.cni.workload = Some(ds_name(ds));
        inv.cni.flannel = flannel_config(client, &ns, &names).await?;
    } else if let Some(ds) = flannel {
        let ns = ds.metadata.namespace.clone().unwrap_or_default();
        let mut names = mounted_config_maps(ds);
        names.push("kube-flannel-cfg".into());
        inv.cni.kind = Some("flannel".into());
        inv.cni.workload = Some(ds_name(ds));
        inv.cni.flannel = flannel_config(client, &ns, &names).await?;
        if inv.cni.flannel.is_none() {
            inv.problems.push(format!(
                "Flannel DaemonSet {} found but no ConfigMap with net-conf.json ({})",
                ds_name(ds),
                names.join(", ")
            ));
        }
    }
    if calico.is_some() || installation.is_some() {
        let mut cfg = CalicoConfig::default();
        if let Some(ds) = calico {
            cfg.installed_by = format!("DaemonSet {}", ds_name(ds));
            let ns = ds.metadata.namespace.clone().unwrap_or_default();
            if let Some(cm) = config_map(client, &ns, "calico-config").await? {
                cfg.backend = cm.data.as_ref().and_then(|d| d.get("calico_backend")).cloned();
            }
        } else if let Some(i) = &installation {
            cfg.installed_by =
                format!("Installation {}", i.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or("default"));
        }
        if let Some(ar) = served.resource("crd.projectcalico.org", "v1", "IPPool") {
            cfg.ip_pools =
                list_dynamic(client, &ar, "Calico IPPools").await?.iter().map(calico_pool_from_json).collect();
        }
        if cfg.ip_pools.is_empty() {
            // The operator writes its pools into the Installation before calico-node creates IPPools.
            for p in installation.iter().flat_map(|i| {
                i.pointer("/spec/calicoNetwork/ipPools").and_then(|p| p.as_array()).cloned().unwrap_or_default()
            }) {
                let enc = p.get("encapsulation").and_then(|e| e.as_str()).unwrap_or("");
                cfg.ip_pools.push(CalicoIpPool {
                    name: "installation".into(),
                    cidr: p.get("cidr").and_then(|c| c.as_str()).unwrap_or("").into(),
                    ipip_mode: enc
                        .starts_with("IPIP")
                        .then(|| if enc.ends_with("CrossSubnet") { "CrossSubnet" } else { "Always" }.into()),
                    vxlan_mode: enc
                        .starts_with("VXLAN")
                        .then(|| if enc.ends_with("CrossSubnet") { "CrossSubnet" } else { "Always" }.into()),
                    nat_outgoing: p.get("natOutgoing").and_then(|n| n.as_str()) != Some("Disabled"),
                    disabled: false,
                });
            }
        }
        for (kind, slot) in [("FelixConfiguration", 0), ("BGPConfiguration", 1)] {
            if let Some(ar) = served.resource("crd.projectcalico.org", "v1", kind) {
                let all = list_dynamic(client, &ar, &format!("Calico {kind}s")).await?;
                let spec = all
                    .iter()
                    .find(|o| o.pointer("/metadata/name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|o| o.get("spec").cloned());
                if slot == 0 {
                    cfg.felix = spec
                } else {
                    cfg.bgp = spec
                }
            }
        }
        if let Some(ar) = served.resource("crd.projectcalico.org", "v1", "BGPPeer") {
            for p in list_dynamic(client, &ar, "Calico BGPPeers").await? {
                let name = p.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or("");
                let ip = p.pointer("/spec/peerIP").and_then(|n| n.as_str()).unwrap_or("");
                cfg.bgp_peers.push(format!("{name} ({ip})"));
            }
        }
        if inv.cni.kind.as_deref() != Some("canal") {
            inv.cni.kind = Some("calico".into());
            inv.cni.workload = Some(cfg.installed_by.clone());
        }
        inv.cni.calico = Some(cfg);
    }
    Ok(())
}

async fn discover_kube_proxy(client: &Client, dss: &[DaemonSet], pods: &[Pod], inv: &mut Inventory) -> Result<()> {
    let ds = dss.iter().find(|d| ds_is(d, "kube-proxy"));
    let static_pod = pods.iter().find(|p| {
        p.metadata.namespace.as_deref() == Some("kube-system")
            && p.metadata.name.as_deref().is_some_and(|n| n.starts_with("kube-proxy"))
            && p.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
    });
    let (pod_spec, ns) = match (ds, static_pod) {
        (Some(d), _) => {
            inv.kube_proxy.deployed_as = Some("daemonset".into());
            (d.spec.as_ref().and_then(|s| s.template.spec.clone()), d.metadata.namespace.clone().unwrap_or_default())
        }
        (None, Some(p)) => {
            inv.kube_proxy.deployed_as = Some("static-pods".into());
            (p.spec.clone(), "kube-system".to_string())
        }
        (None, None) => return Ok(()),
    };
    let args: Vec<String> = pod_spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.command.iter().flatten().chain(c.args.iter().flatten()).cloned())
        .collect();
    let (flag_mode, flag_cidr) = kube_proxy_flags(&args);
    let mut cms: Vec<String> = pod_spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
        .collect();
    cms.push("kube-proxy".into());
    for name in cms {
        let Some(cm) = config_map(client, &ns, &name).await? else { continue };
        let Some((key, text)) = cm.data.as_ref().and_then(|d| {
            d.iter().find(|(k, _)| k.as_str() == "config.conf" || k.ends_with(".conf") && !k.starts_with("kubeconfig"))
        }) else {
            continue;
        };
        let input = format!("ConfigMap {ns}/{name} key {key}");
        let (mode, cidr) = parse_kube_proxy_config(&input, text).map_err(anyhow::Error::msg)?;
        inv.kube_proxy.mode = Some(mode);
        inv.kube_proxy.cluster_cidr = cidr;
        inv.kube_proxy.config_source = Some(input);
        break;
    }
    // Flags override the config file in kube-proxy.
    if flag_mode.is_some() {
        inv.kube_proxy.mode = flag_mode;
    }
    if flag_cidr.is_some() {
        inv.kube_proxy.cluster_cidr = flag_cidr;
    }
    if inv.kube_proxy.mode.is_none() {
        inv.kube_proxy.mode = Some("iptables".into());
    }
    Ok(())
}

async fn discover_services(client: &Client, served: &Served, inv: &mut Inventory) -> Result<()> {
    let svcs = Api::<Service>::all(client.clone()).list(&ListParams::default()).await.context("listing Services")?;
    let mut services: Vec<_> = svcs.items.iter().map(service_from_api).collect();
    let mut eps = Vec::new();
    if served.resource("discovery.k8s.io", "v1", "EndpointSlice").is_some() {
        inv.endpoints_source = "discovery.k8s.io/v1".into();
        let list = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default())
            .await
            .context("listing EndpointSlices (discovery.k8s.io/v1)")?;
        for s in list.items {
            let v = serde_json::to_value(&s).context("reading an EndpointSlice")?;
            eps.extend(endpoints_from_slice(&v));
        }
    } else if let Some(ar) = served.resource("discovery.k8s.io", "v1beta1", "EndpointSlice") {
        inv.endpoints_source = "discovery.k8s.io/v1beta1".into();
        for v in list_dynamic(client, &ar, "EndpointSlices (discovery.k8s.io/v1beta1)").await? {
            eps.extend(endpoints_from_slice(&v));
        }
    } else {
        inv.endpoints_source = "v1/Endpoints".into();
        let list =
            Api::<Endpoints>::all(client.clone()).list(&ListParams::default()).await.context("listing Endpoints")?;
        for e in list.items {
            eps.push((
                e.metadata.namespace.clone().unwrap_or_default(),
                e.metadata.name.clone().unwrap_or_default(),
                endpoints_from_core(&e),
            ));
        }
    }
    attach_endpoints(&mut services, eps);
    // The apiserver's own endpoints are often not mirrored into a slice on small
    // clusters; core Endpoints is where they always are.
    if let Some(k) = services.iter().find(|s| s.namespace == "default" && s.name == "kubernetes") {
        if let Some(ip) = k.cluster_ip.clone() {
            inv.apiserver_addresses.push(ip);
        }
    }
    if let Some(e) = Api::<Endpoints>::namespaced(client.clone(), "default")
        .get_opt("kubernetes")
        .await
        .context("reading Endpoints default/kubernetes")?
    {
        for ep in endpoints_from_core(&e) {
            for p in &ep.ports {
                inv.apiserver_addresses.push(format!("{}:{}", ep.ip, p.port));
            }
        }
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    inv.services.services = services;
    Ok(())
}
