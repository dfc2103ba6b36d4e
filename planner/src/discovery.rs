//! Reads the live cluster into an [`Inventory`] through the API server. What is
//! served is discovered first: a 1.20 cluster has EndpointSlice only as v1beta1
//! and PodDisruptionBudget only as policy/v1beta1, current ones only the v1s,
//! so every versioned kind is resolved through discovery, never assumed.

use crate::cni::{CniObjects, CALICO_GROUPS, CALICO_KINDS};
use crate::inventory::*;
use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
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

const GROUPS: &[&str] =
    &["discovery.k8s.io", "policy", "crd.projectcalico.org", "projectcalico.org", "operator.tigera.io"];

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
        let host_ports = host_ports(&spec);
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

fn ds_is(ds: &DaemonSet, name: &str) -> bool {
    ds.metadata.name.as_deref() == Some(name)
        || ds.metadata.name.as_deref().is_some_and(|n| n.starts_with(&format!("{name}-")))
        || labels(&ds.metadata).get("k8s-app").is_some_and(|v| v == name)
        || labels(&ds.metadata).get("app").is_some_and(|v| v == name)
}

async fn config_map(client: &Client, ns: &str, name: &str) -> Result<Option<ConfigMap>> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .with_context(|| format!("reading ConfigMap {ns}/{name}"))
}

/// ConfigMaps CNI discovery may read: the ones each CNI DaemonSet mounts, and
/// the names the upstream manifests use, in that DaemonSet's namespace.
fn wanted_config_maps(dss: &[serde_json::Value]) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for ds in dss.iter().filter(|d| crate::cni::is_cni_daemonset(d)) {
        let ns = ds.pointer("/metadata/namespace").and_then(|n| n.as_str()).unwrap_or("").to_string();
        let volumes = ds.pointer("/spec/template/spec/volumes").and_then(|v| v.as_array()).cloned().unwrap_or_default();
        let mounted = volumes.iter().filter_map(|v| v.pointer("/configMap/name").and_then(|n| n.as_str()));
        let known = ["kube-flannel-cfg", "canal-config", "calico-config", "flannel-migration-config"];
        for name in mounted.chain(known) {
            v.push((ns.clone(), name.to_string()));
        }
    }
    v.sort();
    v.dedup();
    v
}

async fn cni_objects(client: &Client, served: &Served, dss: &[DaemonSet]) -> Result<CniObjects> {
    let mut objs = CniObjects::default();
    for ds in dss {
        let mut v = serde_json::to_value(ds).context("reading a DaemonSet")?;
        v["apiVersion"] = "apps/v1".into();
        v["kind"] = "DaemonSet".into();
        objs.add(v);
    }
    for (ns, name) in wanted_config_maps(&objs.daemonsets) {
        if let Some(cm) = config_map(client, &ns, &name).await? {
            let mut v = serde_json::to_value(&cm).with_context(|| format!("reading ConfigMap {ns}/{name}"))?;
            v["apiVersion"] = "v1".into();
            v["kind"] = "ConfigMap".into();
            objs.add(v);
        }
    }
    for (group, version) in CALICO_GROUPS {
        for kind in CALICO_KINDS {
            if let Some(ar) = served.resource(group, version, kind) {
                for mut v in list_dynamic(client, &ar, &format!("Calico {kind}s ({group}/{version})")).await? {
                    v["apiVersion"] = format!("{group}/{version}").into();
                    v["kind"] = (*kind).into();
                    objs.add(v);
                }
            }
        }
    }
    if let Some(ar) = served.resource("operator.tigera.io", "v1", "Installation") {
        for mut v in list_dynamic(client, &ar, "operator.tigera.io Installations").await? {
            v["apiVersion"] = "operator.tigera.io/v1".into();
            v["kind"] = "Installation".into();
            objs.add(v);
        }
    }
    let jobs = Api::<Job>::namespaced(client.clone(), "kube-system");
    if let Some(job) = jobs.get_opt("flannel-migration").await.context("reading Job kube-system/flannel-migration")? {
        let mut v = serde_json::to_value(&job).context("reading Job kube-system/flannel-migration")?;
        v["apiVersion"] = "batch/v1".into();
        v["kind"] = "Job".into();
        objs.add(v);
    }
    Ok(objs)
}

async fn discover_cni(client: &Client, served: &Served, dss: &[DaemonSet], inv: &mut Inventory) -> Result<()> {
    let objs = cni_objects(client, served, dss).await?;
    let found = crate::cni::discover_cni(&objs).map_err(anyhow::Error::msg)?;
    inv.cni = found.cni;
    inv.calico_policies = found.calico_policies;
    inv.problems.extend(found.problems);
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
    inv.kube_proxy.disabled_by = ds.and_then(|d| kube_proxy_disabled(d, inv.nodes.len()));
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
    inv.ipv6_services = svcs.items.iter().filter_map(ipv6_service).collect();
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
