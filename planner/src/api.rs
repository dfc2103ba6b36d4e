//! What the Kubernetes API says about Services and their ready endpoints, in
//! plain data. Discovery fills it from core/v1 Services plus EndpointSlices (or
//! core/v1 Endpoints where slices are not served); tests build it by hand.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIP,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApiServicePort {
    /// Empty for a single unnamed port.
    #[serde(default)]
    pub name: String,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP` as the API spells it.
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(default)]
    pub node_port: Option<u16>,
}

fn tcp() -> String {
    "TCP".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApiEndpointPort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

/// One endpoint address with its ports (EndpointSlice shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApiEndpoint {
    pub ip: String,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default = "yes")]
    pub ready: bool,
    /// `conditions.serving`; absent means the same as `ready`.
    #[serde(default)]
    pub serving: Option<bool>,
    /// `conditions.terminating`: the pod is shutting down.
    #[serde(default)]
    pub terminating: bool,
    pub ports: Vec<ApiEndpointPort>,
}

impl ApiEndpoint {
    /// Serving but terminating: kube-proxy sends traffic here only when no
    /// ready endpoint is left (ProxyTerminatingEndpoints, GA in 1.28).
    pub fn serving_terminating(&self) -> bool {
        self.terminating && self.serving.unwrap_or(self.ready)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApiService {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type", default)]
    pub service_type: ServiceType,
    /// `None` or `"None"` for a headless service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// spec.clusterIPs: both families' ClusterIPs of a dual-stack service.
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    pub ports: Vec<ApiServicePort>,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Vec<String>,
    /// status.loadBalancer.ingress[].ip
    #[serde(default, rename = "lbIngressIPs")]
    pub lb_ingress_ips: Vec<String>,
    #[serde(default)]
    pub lb_source_ranges: Vec<String>,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    /// sessionAffinityConfig.clientIP.timeoutSeconds (API default 10800).
    #[serde(default)]
    pub session_affinity_timeout: Option<u32>,
    #[serde(default)]
    pub health_check_node_port: Option<u16>,
    #[serde(default)]
    pub endpoints: Vec<ApiEndpoint>,
}

impl ApiService {
    /// kube-proxy writes no rules for these.
    pub fn is_proxied(&self) -> bool {
        self.service_type != ServiceType::ExternalName
            && matches!(self.cluster_ip.as_deref(), Some(ip) if !ip.is_empty() && ip != "None")
    }

    /// Ready `ip:port` targets of one service port, optionally only those on `node`.
    pub fn ready_targets(&self, port: &ApiServicePort, node: Option<&str>) -> Vec<String> {
        self.targets_where(port, node, |e| e.ready)
    }

    /// The targets kube-proxy programs: the ready ones, or, when none is ready,
    /// the serving-and-terminating ones (its fallback, for Cluster and Local
    /// traffic alike). The flag says whether the fallback was taken.
    pub fn proxied_targets(&self, port: &ApiServicePort, node: Option<&str>) -> (Vec<String>, bool) {
        let ready = self.ready_targets(port, node);
        if !ready.is_empty() {
            return (ready, false);
        }
        let terminating = self.targets_where(port, node, ApiEndpoint::serving_terminating);
        let fell_back = !terminating.is_empty();
        (terminating, fell_back)
    }

    fn targets_where(
        &self,
        port: &ApiServicePort,
        node: Option<&str>,
        keep: impl Fn(&ApiEndpoint) -> bool,
    ) -> Vec<String> {
        let mut v: Vec<String> = self
            .endpoints
            .iter()
            .filter(|e| keep(e))
            .filter(|e| node.is_none() || e.node_name.as_deref() == node)
            .filter_map(|e| {
                e.ports
                    .iter()
                    .find(|p| p.name == port.name && p.protocol.eq_ignore_ascii_case(&port.protocol))
                    .map(|p| host_port(&e.ip, p.port))
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ApiServices {
    pub services: Vec<ApiService>,
}

/// `ip:port`, with an IPv6 address in brackets as kube-proxy's rules write it.
pub fn host_port(ip: &str, port: u16) -> String {
    if is_v6(ip) {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn is_v6(addr: &str) -> bool {
    addr.contains(':')
}

impl ApiService {
    /// The service as kube-proxy's proxier of one IP family sees it: that
    /// family's ClusterIP, endpoints and addresses. `None` when the service
    /// has no ClusterIP of that family.
    pub fn of_family(&self, v6: bool) -> Option<ApiService> {
        let ip = self.cluster_ips.iter().chain(self.cluster_ip.iter()).find(|ip| is_v6(ip) == v6).cloned();
        let headless = matches!(self.cluster_ip.as_deref(), Some("None") | Some(""));
        let keep = |v: &[String]| v.iter().filter(|a| is_v6(a) == v6).cloned().collect::<Vec<_>>();
        let cluster_ip = if headless { self.cluster_ip.clone() } else { Some(ip?) };
        Some(ApiService {
            cluster_ip,
            cluster_ips: Vec::new(),
            external_ips: keep(&self.external_ips),
            lb_ingress_ips: keep(&self.lb_ingress_ips),
            lb_source_ranges: keep(&self.lb_source_ranges),
            endpoints: self.endpoints.iter().filter(|e| is_v6(&e.ip) == v6).cloned().collect(),
            ..self.clone()
        })
    }
}

impl ApiServices {
    /// The services of one IP family, for the rules of that family's proxier
    /// (`iptables-save` for IPv4, `ip6tables-save` for IPv6).
    pub fn of_family(&self, v6: bool) -> ApiServices {
        ApiServices { services: self.services.iter().filter_map(|s| s.of_family(v6)).collect() }
    }
}
