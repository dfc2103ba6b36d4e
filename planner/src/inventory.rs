//! What discovery found in the cluster, as plain data, and the pure conversions
//! from API objects into it. The conversions live here (not in `discovery`) so
//! that the shapes a 1.20 lab cannot serve (EndpointSlice v1, policy/v1) are
//! unit-tested with fixtures.

use crate::api::{
    ApiEndpoint, ApiEndpointPort, ApiService, ApiServicePort, ApiServices, ServiceType, SessionAffinity, TrafficPolicy,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Endpoints, PodSpec, Service};
use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Pool labels of the managed offerings and of kubeadm-less setups, in the
/// order they are tried when no `--pool-label` is given.
pub const POOL_LABELS: &[&str] = &[
    "node.kubernetes.io/pool",
    "cloud.google.com/gke-nodepool",
    "eks.amazonaws.com/nodegroup",
    "kubernetes.azure.com/agentpool",
    "agentpool",
];

/// Nodes with none of the pool labels land here.
pub const DEFAULT_POOL: &str = "default";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    pub pool: String,
    /// Which label gave the pool (`None`: no pool label, [`DEFAULT_POOL`]).
    pub pool_label: Option<String>,
    pub control_plane: bool,
    pub kernel_version: String,
    pub pod_cidrs: Vec<String>,
    pub internal_ips: Vec<String>,
    pub unschedulable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlannelConfig {
    pub network: Option<String>,
    pub backend_type: Option<String>,
    pub vni: Option<u32>,
    /// `Port` (vxlan, udp) or `ListenPort` (wireguard).
    pub port: Option<u16>,
    pub direct_routing: Option<bool>,
    #[serde(default)]
    pub ipv6_network: Option<String>,
    /// `EnableIPv6`; Flannel hands out IPv6 pod addresses only when it is true.
    #[serde(default)]
    pub enable_ipv6: bool,
    /// `EnableIPv4: false`: an IPv6-only Flannel.
    #[serde(default)]
    pub ipv4_disabled: bool,
    /// `EnableNFTables`: Flannel writes its masquerade and forward rules as nftables.
    #[serde(default)]
    pub enable_nftables: bool,
    /// Where it was read, e.g. `ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json`.
    #[serde(default)]
    pub source: String,
}

impl FlannelConfig {
    /// Flannel's backend when net-conf.json names none is udp.
    pub fn backend(&self) -> &str {
        self.backend_type.as_deref().unwrap_or("udp")
    }

    /// The UDP port the backend listens on, and whether it was read or is Flannel's default.
    pub fn effective_port(&self) -> Option<(u16, bool)> {
        let default = match self.backend() {
            "vxlan" => 8472,
            "udp" => 8285,
            "wireguard" => 51820,
            _ => return self.port.map(|p| (p, true)),
        };
        Some(self.port.filter(|p| *p != 0).map(|p| (p, true)).unwrap_or((default, false)))
    }

    /// The VXLAN VNI and whether it was read (only the vxlan backend has one).
    pub fn effective_vni(&self) -> Option<(u32, bool)> {
        (self.backend() == "vxlan").then(|| self.vni.filter(|v| *v != 0).map(|v| (v, true)).unwrap_or((1, false)))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CalicoIpPool {
    pub name: String,
    pub cidr: String,
    pub ipip_mode: Option<String>,
    pub vxlan_mode: Option<String>,
    pub nat_outgoing: bool,
    pub disabled: bool,
    /// Where the pool was read: an IPPool of one API group, the operator's
    /// Installation, or the calico-node DaemonSet's environment before the pool exists.
    #[serde(default)]
    pub source: String,
}

impl CalicoIpPool {
    pub fn is_ipv6(&self) -> bool {
        self.cidr.contains(':')
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CalicoConfig {
    /// `calico-node` DaemonSet (manifest install) or `Installation` (operator).
    pub installed_by: String,
    pub ip_pools: Vec<CalicoIpPool>,
    /// FelixConfiguration `default` spec, as the cluster has it.
    pub felix: Option<serde_json::Value>,
    /// BGPConfiguration `default` spec.
    pub bgp: Option<serde_json::Value>,
    pub bgp_peers: Vec<String>,
    /// `calico_backend` of the calico-config ConfigMap (bird / vxlan / none).
    pub backend: Option<String>,
    /// API groups the Calico resources were read from (`crd.projectcalico.org/v1`,
    /// `projectcalico.org/v3`): a v3-CRD install has only the second.
    #[serde(default)]
    pub api_groups: Vec<String>,
    /// Which FelixConfiguration `default` was read (`FelixConfiguration default (projectcalico.org/v3)`).
    #[serde(default)]
    pub felix_source: Option<String>,
    /// `FELIX_*` variables of the calico-node container: they override FelixConfiguration.
    #[serde(default)]
    pub felix_env: BTreeMap<String, String>,
    /// The operator's `Installation` spec, when Calico is operator-managed.
    #[serde(default)]
    pub installation: Option<serde_json::Value>,
    /// Where Calico keeps its data, `kubernetes` or `etcdv3`, and what says so. Empty
    /// in plans made before kubeshift read it.
    #[serde(default)]
    pub datastore: String,
    #[serde(default)]
    pub datastore_from: String,
}

impl CalicoConfig {
    /// A Felix setting as Felix resolves it: the container's environment first, then
    /// FelixConfiguration `default`. Returns the value and where it came from.
    pub fn felix_setting(&self, key: &str) -> Option<(String, String)> {
        let env = format!("FELIX_{}", key.to_ascii_uppercase());
        if let Some(v) = self.felix_env.get(&env) {
            return Some((v.clone(), format!("{} env {env}", self.installed_by)));
        }
        let v = self.felix.as_ref()?.get(key)?;
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some((text, format!("{} spec.{key}", self.felix_source.as_deref().unwrap_or("FelixConfiguration default"))))
    }

    /// `spec.calicoNetwork.<key>` of the operator's Installation.
    pub fn installation_network(&self, key: &str) -> Option<&str> {
        self.installation.as_ref()?.pointer(&format!("/calicoNetwork/{key}"))?.as_str()
    }
}

/// One CNI whose objects were found. Two of them at once is a half-done migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CniFound {
    /// `flannel`, `calico` or `canal`.
    pub kind: String,
    /// `namespace/name` of each of its DaemonSets (or its Installation).
    pub workloads: Vec<String>,
    /// The pod networks it hands out addresses from.
    pub networks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CniInventory {
    /// `flannel`, `calico`, `canal`, or `None` when nothing known was found.
    pub kind: Option<String>,
    /// `namespace/name` of the DaemonSet (or the operator's Installation).
    pub workload: Option<String>,
    /// Every DaemonSet of the legacy CNI, `namespace/name`: old Flannel manifests
    /// run one per architecture (`kube-flannel-ds-amd64`, `-arm64`, …) and apply
    /// must pin and remove all of them.
    #[serde(default)]
    pub daemonsets: Vec<String>,
    /// Every CNI whose objects are present; more than one is a half-done migration.
    #[serde(default)]
    pub found: Vec<CniFound>,
    /// Traces of Calico's flannel-migration controller (Job, ConfigMap, node selector).
    #[serde(default)]
    pub migration_traces: Vec<String>,
    pub flannel: Option<FlannelConfig>,
    pub calico: Option<CalicoConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyInventory {
    /// `daemonset` or `static-pods`; `None` when kube-proxy was not found.
    pub deployed_as: Option<String>,
    /// `iptables` (also for an empty mode, kube-proxy's default on Linux), `ipvs`, `nftables`.
    pub mode: Option<String>,
    pub cluster_cidr: Option<String>,
    /// Where the configuration was read from (`kube-system/kube-proxy config.conf`).
    pub config_source: Option<String>,
    /// Why the kube-proxy DaemonSet runs on no node although it exists (a node
    /// selector no node has, as Calico's eBPF guide sets), in words.
    #[serde(default)]
    pub disabled_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInfo {
    pub namespace: String,
    pub name: String,
    pub spec: NetworkPolicySpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CalicoPolicyInfo {
    /// `NetworkPolicy` or `GlobalNetworkPolicy`.
    pub kind: String,
    /// Empty for a GlobalNetworkPolicy.
    pub namespace: String,
    pub name: String,
    pub order: Option<f64>,
    pub selector: Option<String>,
    /// Actions of all ingress and egress rules, in order. A direction listed in
    /// `types` without rules denies everything (Calico drops at the end of the
    /// tier), and is recorded as `Deny (no ingress rules)`.
    pub actions: Vec<String>,
    /// `crd.projectcalico.org/v1` or `projectcalico.org/v3`.
    #[serde(default)]
    pub api_group: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PdbInfo {
    pub namespace: String,
    pub name: String,
    /// Which API version it was read through (policy/v1 or policy/v1beta1).
    pub api_version: String,
    pub selector: BTreeMap<String, String>,
    pub min_available: Option<String>,
    pub max_unavailable: Option<String>,
    /// status.disruptionsAllowed as the disruption controller computed it.
    pub disruptions_allowed: Option<i32>,
    pub expected_pods: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    /// `containerPort/proto -> hostPort`
    pub host_ports: Vec<String>,
    /// DaemonSet pods and mirror (static) pods stay during a drain.
    pub evictable: bool,
    pub ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    pub server_version: String,
    pub kube_system_uid: String,
    /// Group versions discovery found served, e.g. `discovery.k8s.io/v1beta1`.
    pub served: Vec<String>,
    /// Where service endpoints came from: `discovery.k8s.io/v1`, `…/v1beta1` or `v1/Endpoints`.
    pub endpoints_source: String,
    pub nodes: Vec<NodeInfo>,
    pub cni: CniInventory,
    pub kube_proxy: KubeProxyInventory,
    pub services: ApiServices,
    pub service_cidr: Option<String>,
    /// Addresses the API server answers on (endpoints of default/kubernetes) and its ClusterIP.
    pub apiserver_addresses: Vec<String>,
    pub network_policies: Vec<PolicyInfo>,
    pub calico_policies: Vec<CalicoPolicyInfo>,
    /// Services with an IPv6 family (`ns/name (IPv4,IPv6)`): dual-stack or IPv6-only.
    #[serde(default)]
    pub ipv6_services: Vec<String>,
    pub pdbs: Vec<PdbInfo>,
    pub pods: Vec<PodInfo>,
    /// Things discovery could not read, in words (a missing CRD is not one of them).
    pub problems: Vec<String>,
}

impl Inventory {
    /// `sha1:` over the kube-system UID, the sorted node names, the service CIDR
    /// (or the kubernetes ClusterIP) and the legacy CNI: what changes when the
    /// plan is pointed at another cluster, and not with every pod restart.
    pub fn fingerprint(&self) -> String {
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort();
        let joined = names.join(",");
        let svc = self.service_cidr.clone().or_else(|| self.apiserver_addresses.first().cloned()).unwrap_or_default();
        let cni = self.cni.kind.clone().unwrap_or_default();
        crate::plan::fingerprint(&[&self.kube_system_uid, &joined, &svc, &cni])
    }
}

/// The pool of a node from its labels: the `--pool-label` override when given
/// (a node without it is in [`DEFAULT_POOL`]), else the first well-known label.
pub fn pool_of(labels: &BTreeMap<String, String>, override_label: Option<&str>) -> (String, Option<String>) {
    let candidates: Vec<&str> = match override_label {
        Some(l) => vec![l],
        None => POOL_LABELS.to_vec(),
    };
    for l in candidates {
        if let Some(v) = labels.get(l).filter(|v| !v.is_empty()) {
            return (v.clone(), Some(l.to_string()));
        }
    }
    (DEFAULT_POOL.to_string(), None)
}

pub fn is_control_plane(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key("node-role.kubernetes.io/control-plane")
        || labels.contains_key("node-role.kubernetes.io/master")
}

/// Flannel's `net-conf.json`. `input` names the ConfigMap key in errors.
pub fn parse_flannel_net_conf(input: &str, text: &str) -> Result<FlannelConfig, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{input}:{}:{}: not valid JSON: {e}", e.line(), e.column()))?;
    let obj = v.as_object().ok_or_else(|| format!("{input}: expected a JSON object"))?;
    let backend = obj.get("Backend");
    if let Some(b) = backend {
        if !b.is_object() {
            return Err(format!("{input}: Backend must be an object"));
        }
    }
    let b = |k: &str| backend.and_then(|b| b.get(k));
    let string = |k: &str| match obj.get(k) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{input}: {k} must be a string")),
    };
    let flag = |k: &str, default: bool| match obj.get(k) {
        None => Ok(default),
        Some(serde_json::Value::Bool(v)) => Ok(*v),
        Some(_) => Err(format!("{input}: {k} must be true or false")),
    };
    Ok(FlannelConfig {
        network: string("Network")?,
        // Flannel's default backend when none is given is udp; vxlan is the manifest's.
        backend_type: b("Type").and_then(|t| t.as_str()).map(|s| s.to_ascii_lowercase()),
        vni: b("VNI").and_then(|t| t.as_u64()).map(|n| n as u32),
        port: b("Port").or_else(|| b("ListenPort")).and_then(|t| t.as_u64()).map(|n| n as u16),
        direct_routing: b("DirectRouting").and_then(|t| t.as_bool()),
        ipv6_network: string("IPv6Network")?,
        enable_ipv6: flag("EnableIPv6", false)?,
        ipv4_disabled: !flag("EnableIPv4", true)?,
        enable_nftables: flag("EnableNFTables", false)?,
        source: input.to_string(),
    })
}

/// kube-proxy's `config.conf` (a KubeProxyConfiguration in YAML): mode and clusterCIDR.
pub fn parse_kube_proxy_config(input: &str, text: &str) -> Result<(String, Option<String>), String> {
    let v: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| match e.location() {
        Some(l) => format!("{input}:{}:{}: {e}", l.line(), l.column()),
        None => format!("{input}: {e}"),
    })?;
    let mode = v.get("mode").and_then(|m| m.as_str()).unwrap_or("").trim().to_string();
    let mode = if mode.is_empty() { "iptables".to_string() } else { mode };
    let cidr = v.get("clusterCIDR").and_then(|m| m.as_str()).map(str::to_string).filter(|s| !s.is_empty());
    Ok((mode, cidr))
}

/// kube-proxy's flags (`--proxy-mode=ipvs`, `--cluster-cidr=…`) of a static pod or
/// a DaemonSet that does not use a config file.
pub fn kube_proxy_flags(args: &[String]) -> (Option<String>, Option<String>) {
    let mut mode = None;
    let mut cidr = None;
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let val = || v.clone();
        match k.as_str() {
            "--proxy-mode" => mode = val().or_else(|| it.peek().map(|s| s.to_string())),
            "--cluster-cidr" => cidr = val().or_else(|| it.peek().map(|s| s.to_string())),
            _ => {}
        }
    }
    (mode, cidr)
}

/// A pod's hostPorts as `containerPort/proto->hostPort`. A hostNetwork pod's
/// ports carry hostPort = containerPort because the apiserver fills it in:
/// they bind on the node directly, no portmap rule is involved, and they are
/// not hostPorts to re-wire.
pub fn host_ports(spec: &PodSpec) -> Vec<String> {
    if spec.host_network.unwrap_or(false) {
        return Vec::new();
    }
    let mut v = Vec::new();
    for c in &spec.containers {
        for port in c.ports.iter().flatten() {
            if let Some(hp) = port.host_port.filter(|hp| *hp != 0) {
                v.push(format!("{}/{}->{hp}", port.container_port, port.protocol.as_deref().unwrap_or("TCP")));
            }
        }
    }
    v
}

/// `ns/name (families)` of a Service that has an IPv6 family or ClusterIP.
pub fn ipv6_service(s: &Service) -> Option<String> {
    let spec = s.spec.as_ref()?;
    let mut families: Vec<String> = spec.ip_families.clone().unwrap_or_default();
    for ip in spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()) {
        let f = if ip.contains(':') {
            "IPv6"
        } else if ip.contains('.') {
            "IPv4"
        } else {
            continue;
        };
        if !families.iter().any(|x| x == f) {
            families.push(f.into());
        }
    }
    families.iter().any(|f| f == "IPv6").then(|| {
        let ns = s.metadata.namespace.as_deref().unwrap_or("");
        let name = s.metadata.name.as_deref().unwrap_or("");
        format!("{ns}/{name} ({})", families.join(","))
    })
}

/// Why an existing kube-proxy DaemonSet runs nowhere: it schedules no pod
/// although the cluster has nodes (Calico's eBPF guide sets a node selector
/// `non-calico: "true"` that no node carries).
pub fn kube_proxy_disabled(ds: &DaemonSet, nodes: usize) -> Option<String> {
    let desired = ds.status.as_ref().map(|s| s.desired_number_scheduled)?;
    if desired > 0 || nodes == 0 {
        return None;
    }
    let sel = ds.spec.as_ref()?.template.spec.as_ref()?.node_selector.clone().unwrap_or_default();
    let sel: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let ns = ds.metadata.namespace.as_deref().unwrap_or("");
    let name = ds.metadata.name.as_deref().unwrap_or("");
    Some(format!(
        "DaemonSet {ns}/{name} schedules no pod on the {nodes} nodes (status.desiredNumberScheduled 0; nodeSelector {})",
        if sel.is_empty() { "none".to_string() } else { sel.join(", ") }
    ))
}

pub fn service_from_api(s: &Service) -> ApiService {
    let spec = s.spec.clone().unwrap_or_default();
    let service_type = match spec.type_.as_deref() {
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        _ => ServiceType::ClusterIP,
    };
    let policy = |p: Option<&str>| if p == Some("Local") { TrafficPolicy::Local } else { TrafficPolicy::Cluster };
    ApiService {
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        name: s.metadata.name.clone().unwrap_or_default(),
        service_type,
        cluster_ip: spec.cluster_ip.clone(),
        cluster_ips: spec.cluster_ips.clone().unwrap_or_default(),
        ports: spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| ApiServicePort {
                name: p.name.unwrap_or_default(),
                port: p.port as u16,
                protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                node_port: p.node_port.map(|n| n as u16),
            })
            .collect(),
        external_ips: spec.external_ips.unwrap_or_default(),
        lb_ingress_ips: s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .map(|i| i.iter().filter_map(|i| i.ip.clone()).collect())
            .unwrap_or_default(),
        // The API accepts " 203.0.113.0/25"; kube-proxy trims it, so must we.
        lb_source_ranges: spec
            .load_balancer_source_ranges
            .unwrap_or_default()
            .iter()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect(),
        external_traffic_policy: policy(spec.external_traffic_policy.as_deref()),
        internal_traffic_policy: policy(spec.internal_traffic_policy.as_deref()),
        session_affinity: if spec.session_affinity.as_deref() == Some("ClientIP") {
            SessionAffinity::ClientIP
        } else {
            SessionAffinity::None
        },
        session_affinity_timeout: spec
            .session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds)
            .map(|t| t as u32),
        health_check_node_port: spec.health_check_node_port.map(|n| n as u16),
        endpoints: Vec::new(),
    }
}

/// Endpoints of one EndpointSlice. v1 and v1beta1 differ in where the node name
/// is (`nodeName` vs `topology["kubernetes.io/hostname"]`), so the slice is read as
/// JSON and both are understood. Returns the owning service (`kubernetes.io/service-name`).
pub fn endpoints_from_slice(slice: &serde_json::Value) -> Option<(String, String, Vec<ApiEndpoint>)> {
    let ns = slice.pointer("/metadata/namespace")?.as_str()?.to_string();
    let svc = slice.pointer("/metadata/labels/kubernetes.io~1service-name")?.as_str()?.to_string();
    if slice.get("addressType").and_then(|t| t.as_str()).is_some_and(|t| t == "FQDN") {
        return Some((ns, svc, Vec::new()));
    }
    let ports: Vec<ApiEndpointPort> = slice
        .get("ports")
        .and_then(|p| p.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some(ApiEndpointPort {
                        name: p.get("name").and_then(|n| n.as_str()).unwrap_or("").to_string(),
                        port: p.get("port")?.as_u64()? as u16,
                        protocol: p.get("protocol").and_then(|n| n.as_str()).unwrap_or("TCP").to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for e in slice.get("endpoints").and_then(|e| e.as_array()).into_iter().flatten() {
        let node = e
            .get("nodeName")
            .and_then(|n| n.as_str())
            .or_else(|| e.pointer("/topology/kubernetes.io~1hostname").and_then(|n| n.as_str()))
            .map(str::to_string);
        // An absent `ready` means ready (API contract for both versions).
        let ready = e.pointer("/conditions/ready").and_then(|r| r.as_bool()).unwrap_or(true);
        let serving = e.pointer("/conditions/serving").and_then(|r| r.as_bool());
        let terminating = e.pointer("/conditions/terminating").and_then(|r| r.as_bool()).unwrap_or(false);
        for ip in e.get("addresses").and_then(|a| a.as_array()).into_iter().flatten() {
            if let Some(ip) = ip.as_str() {
                out.push(ApiEndpoint {
                    ip: ip.to_string(),
                    node_name: node.clone(),
                    ready,
                    serving,
                    terminating,
                    ports: ports.clone(),
                });
            }
        }
    }
    Some((ns, svc, out))
}

pub fn endpoints_from_core(ep: &Endpoints) -> Vec<ApiEndpoint> {
    let mut out = Vec::new();
    for s in ep.subsets.iter().flatten() {
        let ports: Vec<ApiEndpointPort> = s
            .ports
            .iter()
            .flatten()
            .map(|p| ApiEndpointPort {
                name: p.name.clone().unwrap_or_default(),
                port: p.port as u16,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            })
            .collect();
        for (list, ready) in [(&s.addresses, true), (&s.not_ready_addresses, false)] {
            for a in list.iter().flatten() {
                out.push(ApiEndpoint {
                    ip: a.ip.clone(),
                    node_name: a.node_name.clone(),
                    ready,
                    ports: ports.clone(),
                    ..Default::default()
                });
            }
        }
    }
    out
}

/// A PodDisruptionBudget of either policy/v1 or policy/v1beta1 (same fields
/// for what the planner needs), read as JSON.
pub fn pdb_from_json(api_version: &str, v: &serde_json::Value) -> PdbInfo {
    let s = |p: &str| {
        v.pointer(p).map(|x| match x {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    let selector = v
        .pointer("/spec/selector/matchLabels")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    PdbInfo {
        namespace: s("/metadata/namespace").unwrap_or_default(),
        name: s("/metadata/name").unwrap_or_default(),
        api_version: api_version.to_string(),
        selector,
        min_available: s("/spec/minAvailable"),
        max_unavailable: s("/spec/maxUnavailable"),
        disruptions_allowed: v.pointer("/status/disruptionsAllowed").and_then(|x| x.as_i64()).map(|x| x as i32),
        expected_pods: v.pointer("/status/expectedPods").and_then(|x| x.as_i64()).map(|x| x as i32),
    }
}

/// A Calico NetworkPolicy or GlobalNetworkPolicy (crd.projectcalico.org/v1) as JSON.
pub fn calico_policy_from_json(kind: &str, v: &serde_json::Value) -> CalicoPolicyInfo {
    let mut actions = Vec::new();
    let types: Vec<&str> =
        v.pointer("/spec/types").and_then(|t| t.as_array()).into_iter().flatten().filter_map(|t| t.as_str()).collect();
    for (dir, ty) in [("ingress", "Ingress"), ("egress", "Egress")] {
        let rules = v.pointer(&format!("/spec/{dir}")).and_then(|r| r.as_array()).cloned().unwrap_or_default();
        for r in &rules {
            actions.push(r.get("action").and_then(|a| a.as_str()).unwrap_or("Allow").to_string());
        }
        if rules.is_empty() && types.contains(&ty) {
            actions.push(format!("Deny (no {dir} rules)"));
        }
    }
    CalicoPolicyInfo {
        api_group: v.get("apiVersion").and_then(|a| a.as_str()).unwrap_or("").to_string(),
        kind: kind.to_string(),
        namespace: v.pointer("/metadata/namespace").and_then(|x| x.as_str()).unwrap_or("").to_string(),
        name: v.pointer("/metadata/name").and_then(|x| x.as_str()).unwrap_or("").to_string(),
        order: v.pointer("/spec/order").and_then(|x| x.as_f64()),
        selector: v.pointer("/spec/selector").and_then(|x| x.as_str()).map(str::to_string),
        actions,
    }
}

pub fn calico_pool_from_json(v: &serde_json::Value) -> CalicoIpPool {
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_string);
    CalicoIpPool {
        name: s("/metadata/name").unwrap_or_default(),
        cidr: s("/spec/cidr").unwrap_or_default(),
        ipip_mode: s("/spec/ipipMode"),
        vxlan_mode: s("/spec/vxlanMode"),
        nat_outgoing: v.pointer("/spec/natOutgoing").and_then(|x| x.as_bool()).unwrap_or(false),
        disabled: v.pointer("/spec/disabled").and_then(|x| x.as_bool()).unwrap_or(false),
        source: String::new(),
    }
}

/// Attach endpoints to services by `namespace/name`.
pub fn attach_endpoints(services: &mut [ApiService], eps: Vec<(String, String, Vec<ApiEndpoint>)>) {
    let mut by: BTreeMap<(String, String), Vec<ApiEndpoint>> = BTreeMap::new();
    for (ns, name, list) in eps {
        by.entry((ns, name)).or_default().extend(list);
    }
    for s in services.iter_mut() {
        if let Some(list) = by.remove(&(s.namespace.clone(), s.name.clone())) {
            s.endpoints = list;
        }
    }
}
