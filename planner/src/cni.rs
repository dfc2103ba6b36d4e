//! Which legacy CNI a cluster runs and how it is set up, from the objects
//! discovery read. Kept apart from the API calls so that the manifests people
//! really apply (Flannel's and Calico's own, of several releases) can be fed in
//! by tests exactly as the API would return them.

use crate::inventory::{
    calico_policy_from_json, parse_flannel_net_conf, CalicoConfig, CalicoIpPool, CalicoPolicyInfo, CniFound,
    CniInventory, FlannelConfig,
};
use crate::planning::LegacyTunnel;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// Calico's two API groups: CRDs of the manifest/operator installs, and the
/// native v3 CRDs (or the Calico API server, which serves the same objects).
pub const CALICO_GROUPS: &[(&str, &str)] = &[("crd.projectcalico.org", "v1"), ("projectcalico.org", "v3")];

/// Calico kinds discovery lists in each group.
pub const CALICO_KINDS: &[&str] =
    &["IPPool", "FelixConfiguration", "BGPConfiguration", "BGPPeer", "NetworkPolicy", "GlobalNetworkPolicy"];

/// The pool calico-node creates when `CALICO_IPV4POOL_CIDR` is unset and
/// nothing else names one.
pub const CALICO_DEFAULT_IPV4_POOL: &str = "192.168.0.0/16";

/// The node label Calico's flannel-migration controller moves node by node.
const CALICO_MIGRATION_LABEL: &str = "projectcalico.org/node-network-during-migration";

/// What CNI discovery reads, as JSON objects with `apiVersion` and `kind`.
#[derive(Debug, Clone, Default)]
pub struct CniObjects {
    pub daemonsets: Vec<Value>,
    pub config_maps: Vec<Value>,
    /// Calico resources of either group, operator Installations, Jobs.
    pub resources: Vec<Value>,
}

/// The CNI part of the inventory, and what it brings along.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniDiscovery {
    pub cni: CniInventory,
    pub calico_policies: Vec<CalicoPolicyInfo>,
    pub problems: Vec<String>,
}

impl CniObjects {
    /// Adds every document of a multi-document YAML manifest. `input` names
    /// the manifest in errors.
    pub fn add_manifest(&mut self, input: &str, text: &str) -> Result<(), String> {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let v = serde_yaml::Value::deserialize(doc).map_err(|e| yaml_error(input, i, &e))?;
            if v.is_null() {
                continue;
            }
            let json = serde_json::to_value(&v).map_err(|e| format!("{input}: document {}: {e}", i + 1))?;
            self.add(json);
        }
        Ok(())
    }

    pub fn add(&mut self, v: Value) {
        match kind(&v) {
            "DaemonSet" => self.daemonsets.push(v),
            "ConfigMap" => self.config_maps.push(v),
            _ => self.resources.push(v),
        }
    }

    fn config_map(&self, ns: &str, name: &str) -> Option<&Value> {
        self.config_maps.iter().find(|c| namespace(c) == ns && self::name(c) == name)
    }

    fn resources_of<'a>(&'a self, kind_: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.resources.iter().filter(move |r| kind(r) == kind_ && is_calico(r))
    }
}

fn yaml_error(input: &str, doc: usize, e: &serde_yaml::Error) -> String {
    match e.location() {
        Some(l) => format!("{input}:{}:{}: {e}", l.line(), l.column()),
        None => format!("{input}: document {}: {e}", doc + 1),
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(|x| x.as_str()).unwrap_or("")
}

fn kind(v: &Value) -> &str {
    str_at(v, "/kind")
}

fn name(v: &Value) -> &str {
    str_at(v, "/metadata/name")
}

fn namespace(v: &Value) -> &str {
    str_at(v, "/metadata/namespace")
}

fn api_version(v: &Value) -> &str {
    str_at(v, "/apiVersion")
}

fn is_calico(v: &Value) -> bool {
    CALICO_GROUPS.iter().any(|(g, ver)| api_version(v) == format!("{g}/{ver}"))
}

fn id(v: &Value) -> String {
    format!("{}/{}", namespace(v), name(v))
}

fn label<'a>(v: &'a Value, key: &str) -> &'a str {
    v.pointer("/metadata/labels").and_then(|l| l.get(key)).and_then(|x| x.as_str()).unwrap_or("")
}

fn pod_spec(ds: &Value) -> Option<&Value> {
    ds.pointer("/spec/template/spec")
}

fn is_canal(ds: &Value) -> bool {
    name(ds) == "canal" || label(ds, "k8s-app") == "canal"
}

fn is_calico_node(ds: &Value) -> bool {
    name(ds) == "calico-node" || label(ds, "k8s-app") == "calico-node" || label(ds, "app") == "calico-node"
}

fn is_flannel(ds: &Value) -> bool {
    !is_canal(ds)
        && (name(ds).contains("flannel") || label(ds, "app") == "flannel" || label(ds, "k8s-app") == "flannel")
}

/// A DaemonSet of one of the CNIs discovery knows: only their ConfigMaps are read.
pub fn is_cni_daemonset(ds: &Value) -> bool {
    is_canal(ds) || is_calico_node(ds) || is_flannel(ds)
}

/// ConfigMaps a DaemonSet mounts, so a renamed kube-flannel-cfg is still found.
fn mounted_config_maps(ds: &Value) -> Vec<String> {
    pod_spec(ds)
        .and_then(|s| s.get("volumes"))
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|v| v.pointer("/configMap/name").and_then(|n| n.as_str()).map(str::to_string))
        .collect()
}

/// The environment of a DaemonSet's containers as the kubelet would set it:
/// literal values, and `configMapKeyRef`s resolved from the ConfigMaps read.
/// Variables from Secrets or fields are not known before the pod runs and are left out.
pub fn container_env(ds: &Value, objs: &CniObjects) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let containers = pod_spec(ds).and_then(|s| s.get("containers")).and_then(|c| c.as_array());
    for e in containers.into_iter().flatten().filter_map(|c| c.get("env")?.as_array()).flatten() {
        let key = str_at(e, "/name").to_string();
        if key.is_empty() || env.contains_key(&key) {
            continue;
        }
        if let Some(v) = e.get("value").and_then(|v| v.as_str()) {
            env.insert(key, v.to_string());
        } else if let Some(r) = e.pointer("/valueFrom/configMapKeyRef") {
            let cm = objs.config_map(namespace(ds), str_at(r, "/name"));
            if let Some(v) =
                cm.and_then(|c| c.pointer(&format!("/data/{}", str_at(r, "/key")))).and_then(|v| v.as_str())
            {
                env.insert(key, v.to_string());
            }
        }
    }
    env
}

fn flannel_config(ds: &Value, default_cm: &str, objs: &CniObjects) -> Result<Option<FlannelConfig>, String> {
    let ns = namespace(ds);
    let mut names = mounted_config_maps(ds);
    names.push(default_cm.to_string());
    for n in &names {
        let Some(text) = objs.config_map(ns, n).and_then(|c| c.pointer("/data/net-conf.json")).and_then(|t| t.as_str())
        else {
            continue;
        };
        return parse_flannel_net_conf(&format!("ConfigMap {ns}/{n} key net-conf.json"), text).map(Some);
    }
    Ok(None)
}

/// Discovers the legacy CNI from the objects read. Errors only for a
/// net-conf.json that does not parse (the plan would be built on a guess).
pub fn discover_cni(objs: &CniObjects) -> Result<CniDiscovery, String> {
    let mut out = CniDiscovery::default();
    let canal: Vec<&Value> = objs.daemonsets.iter().filter(|d| is_canal(d)).collect();
    let flannel: Vec<&Value> = objs.daemonsets.iter().filter(|d| is_flannel(d)).collect();
    let calico_node: Vec<&Value> = objs.daemonsets.iter().filter(|d| is_calico_node(d)).collect();
    let installation = objs.resources.iter().find(|r| kind(r) == "Installation");

    if let Some(ds) = canal.first() {
        let cfg = flannel_config(ds, "canal-config", objs)?;
        out.cni.found.push(found("canal", &canal, flannel_networks(cfg.as_ref())));
        out.cni.flannel = cfg;
    }
    if let Some(ds) = flannel.first() {
        let cfg = flannel_config(ds, "kube-flannel-cfg", objs)?;
        if cfg.is_none() {
            out.problems.push(format!(
                "Flannel DaemonSet {} found but no ConfigMap with net-conf.json ({}, kube-flannel-cfg)",
                id(ds),
                mounted_config_maps(ds).join(", ")
            ));
        }
        out.cni.found.push(found("flannel", &flannel, flannel_networks(cfg.as_ref())));
        if out.cni.flannel.is_none() {
            out.cni.flannel = cfg;
        }
    }
    if !calico_node.is_empty() || installation.is_some() || !canal.is_empty() {
        // Canal's pods take Flannel's subnets (host-local IPAM): its calico-node
        // environment names no pool to read.
        let ds = calico_node.first().or(canal.first()).copied();
        let mut calico = calico_config(ds, installation, canal.is_empty(), objs);
        if !migration_traces(objs, &calico_node).is_empty() {
            if let Some(pools) = flannel_migration_pools(&calico.ip_pools, out.cni.flannel.as_ref()) {
                calico.ip_pools = pools;
            }
        }
        if canal.is_empty() {
            let mut f = found("calico", &calico_node, calico.ip_pools.iter().map(|p| p.cidr.clone()).collect());
            if f.workloads.is_empty() {
                f.workloads.push(calico.installed_by.clone());
            }
            out.cni.found.push(f);
        }
        out.cni.calico = Some(calico);
    }
    out.calico_policies = calico_policies(objs);
    out.cni.migration_traces = migration_traces(objs, &calico_node);
    if let Some(first) = out.cni.found.first() {
        out.cni.kind = Some(first.kind.clone());
        // Calico's workload says how it is installed (`DaemonSet ns/name` or
        // `Installation name`): an operator-managed calico-node is not ours to edit.
        out.cni.workload = match (first.kind.as_str(), &out.cni.calico) {
            ("calico", Some(c)) => Some(c.installed_by.clone()),
            _ => first.workloads.first().cloned(),
        };
        out.cni.daemonsets = first.workloads.iter().filter(|w| !w.starts_with("Installation ")).cloned().collect();
    }
    Ok(out)
}

fn found(kind_: &str, dss: &[&Value], networks: Vec<String>) -> CniFound {
    CniFound { kind: kind_.into(), workloads: dss.iter().map(|d| id(d)).collect(), networks }
}

fn flannel_networks(cfg: Option<&FlannelConfig>) -> Vec<String> {
    let Some(c) = cfg else { return Vec::new() };
    let v4 = c.network.clone().filter(|_| !c.ipv4_disabled);
    let v6 = c.ipv6_network.clone().filter(|_| c.enable_ipv6);
    v4.into_iter().chain(v6).collect()
}

fn calico_config(ds: Option<&Value>, installation: Option<&Value>, env_pools: bool, objs: &CniObjects) -> CalicoConfig {
    let mut cfg = CalicoConfig::default();
    let env = ds.map(|d| container_env(d, objs)).unwrap_or_default();
    cfg.installed_by = match (ds, installation) {
        (Some(d), _) => format!("DaemonSet {}", id(d)),
        (None, Some(i)) => format!("Installation {}", name(i)),
        (None, None) => String::new(),
    };
    cfg.installation = installation.and_then(|i| i.get("spec").cloned());
    (cfg.datastore, cfg.datastore_from) = calico_datastore(ds, &env);
    cfg.backend = ds
        .and_then(|d| objs.config_map(namespace(d), "calico-config"))
        .and_then(|c| c.pointer("/data/calico_backend"))
        .and_then(|b| b.as_str())
        .map(str::to_string)
        .or_else(|| env.get("CALICO_NETWORKING_BACKEND").cloned());
    cfg.felix_env = env.iter().filter(|(k, _)| k.starts_with("FELIX_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    cfg.api_groups = calico_groups_seen(objs);
    cfg.ip_pools = pools_from_resources(objs);
    if cfg.ip_pools.is_empty() {
        cfg.ip_pools = pools_from_installation(installation);
    }
    if cfg.ip_pools.is_empty() && env_pools {
        if let Some(d) = ds {
            cfg.ip_pools = pools_from_env(&format!("DaemonSet {}", id(d)), &env);
        }
    }
    if let Some(fc) = calico_default(objs, "FelixConfiguration", &env) {
        cfg.felix = fc.get("spec").cloned();
        cfg.felix_source = Some(format!("FelixConfiguration default ({})", api_version(fc)));
    }
    cfg.bgp = calico_default(objs, "BGPConfiguration", &env).and_then(|o| o.get("spec").cloned());
    let mut peers: Vec<String> =
        objs.resources_of("BGPPeer").map(|p| format!("{} ({})", name(p), str_at(p, "/spec/peerIP"))).collect();
    peers.sort();
    peers.dedup();
    cfg.bgp_peers = peers;
    cfg
}

/// Calico's datastore as calico-node decides it (libcalico-go apiconfig `applyConfigDefaults`,
/// v3.32.1): `DATASTORE_TYPE` when set, else etcd when `ETCD_ENDPOINTS` names one, else the
/// Kubernetes API. The operator always runs the Kubernetes datastore.
fn calico_datastore(ds: Option<&Value>, env: &BTreeMap<String, String>) -> (String, String) {
    let Some(d) = ds else { return ("kubernetes".into(), "operator-managed (Installation)".into()) };
    let at = format!("DaemonSet {}", id(d));
    match (env.get("DATASTORE_TYPE").map(|v| v.trim()), env.get("ETCD_ENDPOINTS").map(|v| v.trim())) {
        (Some(t), _) if !t.is_empty() => (t.to_string(), format!("{at} env DATASTORE_TYPE")),
        (_, Some(e)) if !e.is_empty() => {
            ("etcdv3".into(), format!("{at} env ETCD_ENDPOINTS {e}, DATASTORE_TYPE unset"))
        }
        _ => ("kubernetes".into(), format!("{at}: neither DATASTORE_TYPE nor ETCD_ENDPOINTS set")),
    }
}

/// The `default` object of a Calico config kind, from the group calico-node reads,
/// as libcalico-go decides it (`UsingV3CRDs`): the group its `CALICO_API_GROUP`
/// names (set by Calico's v1-to-v3 datastore migration, which leaves the v1 objects
/// behind, stale), else crd.projectcalico.org/v1 when both groups hold one (then v3
/// is Calico's API server over the v1 CRDs), else the one there is.
fn calico_default<'a>(objs: &'a CniObjects, kind_: &'a str, env: &BTreeMap<String, String>) -> Option<&'a Value> {
    let defaults: Vec<&Value> = objs.resources_of(kind_).filter(|o| name(o) == "default").collect();
    let group = env.get("CALICO_API_GROUP").map(|g| g.trim()).unwrap_or("crd.projectcalico.org/v1");
    defaults.iter().find(|o| api_version(o).eq_ignore_ascii_case(group)).or(defaults.first()).copied()
}

fn calico_groups_seen(objs: &CniObjects) -> Vec<String> {
    let mut v: Vec<String> =
        objs.resources.iter().filter(|r| is_calico(r)).map(|r| api_version(r).to_string()).collect();
    v.sort();
    v.dedup();
    v
}

/// IPPools of both groups. With Calico's API server both groups show the same
/// pools, so a pool is kept once per name.
fn pools_from_resources(objs: &CniObjects) -> Vec<CalicoIpPool> {
    let mut pools: Vec<CalicoIpPool> = Vec::new();
    for p in objs.resources_of("IPPool") {
        let mut pool = crate::inventory::calico_pool_from_json(p);
        if pools.iter().any(|q| q.name == pool.name) {
            continue;
        }
        pool.source = format!("IPPool {} ({})", pool.name, api_version(p));
        pools.push(pool);
    }
    pools
}

/// The operator writes its pools into the Installation before calico-node creates IPPools.
fn pools_from_installation(installation: Option<&Value>) -> Vec<CalicoIpPool> {
    let Some(i) = installation else { return Vec::new() };
    let pools = i.pointer("/spec/calicoNetwork/ipPools").and_then(|p| p.as_array()).cloned().unwrap_or_default();
    pools
        .iter()
        .enumerate()
        .map(|(n, p)| {
            let enc = str_at(p, "/encapsulation");
            let mode = |prefix: &str| {
                enc.starts_with(prefix)
                    .then(|| if enc.ends_with("CrossSubnet") { "CrossSubnet" } else { "Always" }.into())
            };
            CalicoIpPool {
                name: p.get("name").and_then(|x| x.as_str()).unwrap_or("installation").into(),
                cidr: str_at(p, "/cidr").into(),
                ipip_mode: mode("IPIP"),
                vxlan_mode: mode("VXLAN"),
                nat_outgoing: str_at(p, "/natOutgoing") != "Disabled",
                disabled: false,
                source: format!("Installation {} spec.calicoNetwork.ipPools[{n}]", name(i)),
            }
        })
        .collect()
}

/// The pools calico-node creates at its first start, from its environment.
/// `CALICO_IPV4POOL_CIDR` is commented out in Calico's manifests, and then the
/// pool is Calico's default range.
pub fn pools_from_env(workload: &str, env: &BTreeMap<String, String>) -> Vec<CalicoIpPool> {
    let mode = |k: &str, default: &str| {
        let v = env.get(k).map(String::as_str).unwrap_or(default);
        (!v.eq_ignore_ascii_case("never") && !v.eq_ignore_ascii_case("off")).then(|| v.to_string())
    };
    let nat = |k: &str| env.get(k).is_none_or(|v| v.eq_ignore_ascii_case("true"));
    let mut pools = Vec::new();
    let (cidr, how) = match env.get("CALICO_IPV4POOL_CIDR") {
        Some(c) => (c.clone(), "env CALICO_IPV4POOL_CIDR".to_string()),
        None => {
            (CALICO_DEFAULT_IPV4_POOL.to_string(), "calico-node's default (CALICO_IPV4POOL_CIDR unset)".to_string())
        }
    };
    pools.push(CalicoIpPool {
        name: "default-ipv4-ippool".into(),
        cidr,
        ipip_mode: mode("CALICO_IPV4POOL_IPIP", "Always"),
        vxlan_mode: mode("CALICO_IPV4POOL_VXLAN", "Never"),
        nat_outgoing: nat("CALICO_IPV4POOL_NAT_OUTGOING"),
        disabled: false,
        source: format!("{workload} {how}, before the first IPPool exists"),
    });
    if let Some(c) = env.get("CALICO_IPV6POOL_CIDR") {
        pools.push(CalicoIpPool {
            name: "default-ipv6-ippool".into(),
            cidr: c.clone(),
            ipip_mode: None,
            vxlan_mode: mode("CALICO_IPV6POOL_VXLAN", "Never"),
            nat_outgoing: env.get("CALICO_IPV6POOL_NAT_OUTGOING").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            disabled: false,
            source: format!("{workload} env CALICO_IPV6POOL_CIDR, before the first IPPool exists"),
        });
    }
    pools
}

/// Calico policies of both groups. The API server stores a default-tier
/// policy `x` in the v1 CRD as `default.x`, so that prefix is ignored when the
/// same policy shows in both groups.
fn calico_policies(objs: &CniObjects) -> Vec<CalicoPolicyInfo> {
    let mut out: Vec<CalicoPolicyInfo> = Vec::new();
    for kind_ in ["NetworkPolicy", "GlobalNetworkPolicy"] {
        for p in objs.resources_of(kind_) {
            let info = calico_policy_from_json(kind_, p);
            let key = |i: &CalicoPolicyInfo| {
                (i.kind.clone(), i.namespace.clone(), i.name.strip_prefix("default.").unwrap_or(&i.name).to_string())
            };
            if !out.iter().any(|o| key(o) == key(&info)) {
                out.push(info);
            }
        }
    }
    out
}

/// Calico's flannel-migration controller creates `default-ipv4-ippool` on Flannel's
/// network (VXLAN, natOutgoing as flanneld's --ip-masq), not calico-node's
/// environment; until it has, the pools guessed from that environment are replaced.
fn flannel_migration_pools(pools: &[CalicoIpPool], flannel: Option<&FlannelConfig>) -> Option<Vec<CalicoIpPool>> {
    let f = flannel?;
    if pools.is_empty() || pools.iter().any(|p| !p.source.ends_with("before the first IPPool exists")) {
        return None;
    }
    let pool = |name: &str, cidr: &str, key: &str| {
        CalicoIpPool {
        name: name.into(),
        cidr: cidr.into(),
        ipip_mode: None,
        vxlan_mode: Some("Always".into()),
        nat_outgoing: true,
        disabled: false,
        source: format!(
            "Calico's flannel-migration controller creates it from Flannel's {key} ({}), before the first IPPool exists",
            f.source
        ),
    }
    };
    let v4 = f.network.as_deref().filter(|_| !f.ipv4_disabled).map(|n| pool("default-ipv4-ippool", n, "Network"));
    let v6 = f.ipv6_network.as_deref().filter(|_| f.enable_ipv6).map(|n| pool("default-ipv6-ippool", n, "IPv6Network"));
    let v: Vec<CalicoIpPool> = v4.into_iter().chain(v6).collect();
    (!v.is_empty()).then_some(v)
}

fn migration_traces(objs: &CniObjects, calico_node: &[&Value]) -> Vec<String> {
    let mut v = Vec::new();
    for ds in calico_node {
        let sel = pod_spec(ds).and_then(|s| s.pointer("/nodeSelector")).and_then(|s| s.get(CALICO_MIGRATION_LABEL));
        if let Some(val) = sel.and_then(|s| s.as_str()) {
            v.push(format!(
                "DaemonSet {} spec.template.spec.nodeSelector {CALICO_MIGRATION_LABEL}={val}: Calico runs only on nodes already moved off Flannel",
                id(ds)
            ));
        }
    }
    for r in objs.resources.iter().filter(|r| kind(r) == "Job" && name(r) == "flannel-migration") {
        v.push(format!("Job {} (Calico's flannel-migration controller)", id(r)));
    }
    if let Some(cm) = objs.config_maps.iter().find(|c| name(c) == "flannel-migration-config") {
        v.push(format!("ConfigMap {} (flannel-migration controller state)", id(cm)));
    }
    v
}

/// The UDP tunnels the legacy CNI runs, with where each value came from, so
/// the new overlay's port and VNI clash with none of them.
pub fn legacy_tunnels(cni: &CniInventory) -> Vec<LegacyTunnel> {
    let mut v = Vec::new();
    if let Some(f) = &cni.flannel {
        if let Some((port, read)) = f.effective_port() {
            let vni = f.effective_vni();
            v.push(LegacyTunnel {
                port,
                vni: vni.map(|(n, _)| n),
                what: format!(
                    "Flannel {} port {port} ({}){}, {}",
                    f.backend(),
                    if read { "read" } else { "Flannel's default" },
                    vni.map(|(n, r)| format!(", VNI {n} ({})", if r { "read" } else { "Flannel's default" }))
                        .unwrap_or_default(),
                    f.source
                ),
            });
        }
    }
    if let Some(c) = &cni.calico {
        v.push(calico_vxlan(c));
    }
    v
}

/// Felix's VXLAN port and VNI (defaults 4789 and 4096). Felix only opens the
/// port with a VXLAN pool, but a pool can be switched to VXLAN at any time.
fn calico_vxlan(c: &CalicoConfig) -> LegacyTunnel {
    let read = |key: &str, default: u32| match c.felix_setting(key) {
        Some((val, from)) => match val.trim_matches('"').parse::<u32>() {
            Ok(n) if n != 0 => (n, format!("{key} {n} from {from}")),
            _ => (default, format!("{key} {default} (Felix's default; {from} is {val})")),
        },
        None => (default, format!("{key} {default} (Felix's default)")),
    };
    let (port, port_what) = read("vxlanPort", 4789);
    let (vni, vni_what) = read("vxlanVNI", 4096);
    LegacyTunnel { port: port as u16, vni: Some(vni), what: format!("Calico VXLAN: {port_what}, {vni_what}") }
}
