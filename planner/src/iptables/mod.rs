//! kube-proxy rule model, read from `iptables-save` output.
//!
//! The parser covers the chain sets kube-proxy has written in iptables mode from
//! 1.20 (KUBE-XLB-*, KUBE-FW-* → KUBE-SVC-*, REJECT in filter KUBE-SERVICES /
//! KUBE-EXTERNAL-SERVICES) through the current layout (1.28+: KUBE-SVL-*,
//! KUBE-EXT-*, KUBE-PROXY-FIREWALL, filter KUBE-NODEPORTS health checks). The
//! per-service chains all share one hash suffix (`portProtoHash` in kube-proxy),
//! so services are keyed by that suffix and named from the rule comments.
//!
//! Entry point: [`parse_iptables_save`].

mod build;
pub(crate) mod dump;
pub(crate) mod lexer;
pub mod save_rules;
#[doc(hidden)]
pub mod synth;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use build::service_port_key;

/// A parse failure, printed as `input:line: what`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{input}:{line}: {kind}")]
pub struct ParseError {
    /// Name of the input (file path, or e.g. `node-a:iptables-save`).
    pub input: String,
    /// 1-based line number.
    pub line: usize,
    pub kind: ParseErrorKind,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseErrorKind {
    /// Tables, chains, COMMIT: the dump's shape is broken.
    #[error("{0}")]
    Structure(String),
    /// A rule line whose options cannot be read.
    #[error("malformed rule: {0}")]
    Rule(String),
}

/// Which kube-proxy chain layout the dump was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ChainLayout {
    /// No per-service chains found (no kube-proxy, or IPVS/nftables mode).
    #[default]
    None,
    /// KUBE-XLB-* and KUBE-FW-* → KUBE-SVC-*: kube-proxy before 1.24.
    Legacy,
    /// KUBE-SVL-*, KUBE-EXT-*, KUBE-PROXY-FIREWALL: kube-proxy 1.24+.
    Current,
    /// Only KUBE-SVC/SEP chains: both layouts write these identically.
    Ambiguous,
    /// kube-proxy's nftables mode (`table ip kube-proxy`), read from `nft -j`.
    Nftables,
    /// kube-proxy's ipvs mode, read from `ipvsadm -Sn` and matched to the API.
    Ipvs,
}

/// One endpoint as the DNAT rules route to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointRule {
    pub ip: String,
    pub port: u16,
    /// The `--probability` on the jump rule, 1.0 for the last (unconditional) one.
    pub probability: f64,
    /// The fraction of new connections this endpoint actually receives once
    /// the earlier rules have taken theirs (what a user means by "weight").
    pub share: f64,
    /// The KUBE-SEP-* chain.
    pub chain: String,
}

/// The rules kube-proxy wrote for one service port (one `ns/name:port` and protocol).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ServiceRules {
    pub namespace: String,
    pub name: String,
    /// Empty for an unnamed port.
    pub port_name: String,
    /// `tcp`, `udp` or `sctp` as iptables prints it.
    pub protocol: String,
    pub cluster_ip: Option<String>,
    pub port: Option<u16>,
    /// The hash suffix shared by KUBE-SVC/SVL/EXT/FW/XLB chains of this port;
    /// `None` when only no-endpoint REJECT rules exist.
    pub chain_hash: Option<String>,
    /// Endpoints from KUBE-SVC-* (all ready endpoints, cluster-wide).
    pub endpoints: Vec<EndpointRule>,
    /// Endpoints from KUBE-SVL-* / KUBE-XLB-* (the ones on this node).
    pub local_endpoints: Vec<EndpointRule>,
    /// ClientIP affinity timeout (`-m recent --rcheck --seconds N`).
    pub affinity_seconds: Option<u32>,
    pub node_ports: Vec<u16>,
    pub health_check_node_port: Option<u16>,
    pub external_ips: Vec<String>,
    pub lb_ips: Vec<String>,
    /// `loadBalancerSourceRanges` as accepted by KUBE-FW-*, normalized
    /// ([`normalize_cidr`]), without the LB IPs below.
    pub lb_source_ranges: Vec<String>,
    /// LB IPs KUBE-FW-* accepts as sources: kube-proxy adds them when a
    /// source range contains the node, because a node's own connection to its
    /// LB IP arrives SNATed to that IP. Not part of the spec's ranges.
    #[serde(default)]
    pub lb_source_lb_ips: Vec<String>,
    /// externalTrafficPolicy: Local (KUBE-XLB-*, or KUBE-EXT-* → KUBE-SVL-*).
    pub local_only: bool,
    /// internalTrafficPolicy: Local (cluster IP jumps straight to KUBE-SVL-*).
    pub internal_local: bool,
    /// Cluster-IP traffic is masqueraded for every source (`--masquerade-all`).
    pub masquerade_all: bool,
    /// Cluster-IP traffic from outside this CIDR is masqueraded (`! -s CIDR`).
    pub masquerade_unless_from: Option<String>,
    /// A REJECT rule answers for this port because it has no endpoints.
    pub reject_no_endpoints: bool,
    /// A DROP rule because it has no endpoints on this node (Local policy).
    pub drop_no_local_endpoints: bool,
}

impl ServiceRules {
    /// Moves the LB IPs kube-proxy added as allowed sources (when a source
    /// range holds the node) out of the source ranges, into `lb_source_lb_ips`.
    pub(crate) fn split_lb_self_sources(&mut self) {
        let lb: Vec<String> = self.lb_ips.iter().map(|ip| normalize_cidr(ip)).collect();
        let (own, ranges): (Vec<String>, Vec<String>) = self.lb_source_ranges.drain(..).partition(|r| lb.contains(r));
        self.lb_source_ranges = ranges;
        self.lb_source_lb_ips = own;
    }

    /// `ns/name:port` (or `ns/name` for an unnamed port), as in the comments.
    pub fn display_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// A source or destination as written in a rule or in the API, in one form:
/// spaces trimmed, a bare address as a host route (`1.2.3.4` and `1.2.3.4/32`
/// are the same match), host bits cleared (iptables prints the network).
/// Text that is not an address is returned trimmed.
pub fn normalize_cidr(text: &str) -> String {
    let t = text.trim();
    let (ip, len) = match t.split_once('/') {
        Some((ip, len)) => (ip, len.parse::<u8>().ok()),
        None => (t, None),
    };
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        Ok(std::net::IpAddr::V6(a)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
        Err(_) => t.to_string(),
    }
}

/// The node-wide masquerade and drop marks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MasqueradeRules {
    /// The mark KUBE-MARK-MASQ sets, as `value/mask` the way iptables-save
    /// prints it (`0x4000/0x4000`; current kube-proxy's `--or-mark 0x4000` is
    /// normalized to that).
    pub masq_mark: Option<String>,
    /// The mark KUBE-MARK-DROP sets (1.20 only; current kube-proxy has no drop mark).
    pub drop_mark: Option<String>,
    /// KUBE-POSTROUTING MASQUERADEs marked packets.
    pub postrouting_masquerade: bool,
    pub random_fully: bool,
}

/// Rules of chains kube-proxy does not own, grouped by who writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ChainCount {
    pub chains: usize,
    pub rules: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TableSummary {
    pub name: String,
    pub chains: usize,
    pub rules: usize,
}

/// Everything kube-proxy's iptables rules say about services on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RuleModel {
    /// Name of the input, as errors print it.
    pub input: String,
    pub layout: ChainLayout,
    /// `# Generated by …` header, e.g. `iptables-save v1.8.9 (nf_tables)`.
    pub generated_by: Option<String>,
    /// Backend warnings from the dump (nft backend: legacy tables present).
    pub warnings: Vec<String>,
    pub services: Vec<ServiceRules>,
    pub masquerade: MasqueradeRules,
    /// Tables holding KUBE-PROXY-CANARY / KUBE-KUBELET-CANARY: kube-proxy and
    /// kubelet recreate these to detect a flushed ruleset.
    pub kube_proxy_canary: Vec<String>,
    pub kubelet_canary: Vec<String>,
    /// KUBE-SVC/SVL/EXT/FW/XLB/SEP chains nothing jumps to: left over from
    /// deleted services or a kube-proxy that died mid-sync.
    pub unreferenced_chains: Vec<String>,
    /// IPVS-mode chains seen (KUBE-NODE-PORT, KUBE-LOAD-BALANCER …): the
    /// iptables model is incomplete for such a node.
    pub ipvs_chains: Vec<String>,
    /// KUBE-* chain and rule totals (all tables).
    pub kube: ChainCount,
    /// Non-kube chains by family: `calico`, `flannel`, `docker`, `cni`,
    /// `builtin`, `other`.
    pub foreign: BTreeMap<String, ChainCount>,
    pub tables: Vec<TableSummary>,
}

impl RuleModel {
    pub fn service(&self, ns: &str, name: &str, port_name: &str, protocol: &str) -> Option<&ServiceRules> {
        self.services
            .iter()
            .find(|s| s.namespace == ns && s.name == name && s.port_name == port_name && s.protocol == protocol)
    }

    /// A short summary for reports (counts only).
    pub fn summary(&self) -> RuleSummary {
        RuleSummary {
            layout: self.layout,
            services: self.services.len(),
            endpoints: self.services.iter().map(|s| s.endpoints.len()).sum(),
            node_ports: self.services.iter().map(|s| s.node_ports.len()).sum(),
            services_without_endpoints: self.services.iter().filter(|s| s.reject_no_endpoints).count(),
            local_only_services: self.services.iter().filter(|s| s.local_only).count(),
            unreferenced_chains: self.unreferenced_chains.len(),
            kube: self.kube.clone(),
            foreign: self.foreign.clone(),
            warnings: self.warnings.clone(),
        }
    }
}

/// Counts from a [`RuleModel`], small enough to print or embed in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RuleSummary {
    pub layout: ChainLayout,
    pub services: usize,
    pub endpoints: usize,
    pub node_ports: usize,
    pub services_without_endpoints: usize,
    pub local_only_services: usize,
    pub unreferenced_chains: usize,
    pub kube: ChainCount,
    pub foreign: BTreeMap<String, ChainCount>,
    pub warnings: Vec<String>,
}

/// Parses `iptables-save` output (legacy or nft backend) into a [`RuleModel`].
///
/// `input_name` is only used in error messages and in `RuleModel::input`.
/// Tables other than `nat` and `filter` are checked for structure and counted.
pub fn parse_iptables_save(input_name: &str, text: &str) -> Result<RuleModel, ParseError> {
    let dump = dump::parse_dump(input_name, text)?;
    Ok(build::build_model(input_name, &dump))
}

/// Reads and parses a file; I/O errors are reported as line 0.
pub fn parse_iptables_save_file(path: &std::path::Path) -> Result<RuleModel, ParseError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ParseError {
        input: name.clone(),
        line: 0,
        kind: ParseErrorKind::Structure(format!("cannot read: {e}")),
    })?;
    parse_iptables_save(&name, &text)
}
