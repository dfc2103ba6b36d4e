//! Findings about what the legacy network is, beyond "Flannel or Calico":
//! two CNIs at once, dataplanes that are not iptables, encryption, IPv6.
//! Each names the object and field it was read from, because the operator has
//! to go and change exactly that before a migration can start.

use crate::analysis::{Finding, Severity};
use crate::inventory::{CalicoConfig, CniInventory, FlannelConfig, Inventory};

fn finding(severity: Severity, subject: &str, message: String) -> Finding {
    Finding { severity, subject: subject.to_string(), message }
}

/// Every finding of this module, for [`crate::analysis::analyze`].
pub fn legacy_findings(inv: &Inventory) -> Vec<Finding> {
    let mut v = Vec::new();
    v.extend(two_cnis(&inv.cni));
    v.extend(dataplanes(inv));
    v.extend(encryption(&inv.cni));
    v.extend(ipv6(inv));
    v.extend(inv.cni.calico.as_ref().and_then(calico_etcd));
    v
}

/// Calico on etcd. Felix matches policy selectors against WorkloadEndpoints; with the
/// Kubernetes datastore those are derived from every Pod with an address, so a pod on
/// kubeshift's network is selected by its labels like any other. With etcd only Calico's
/// CNI plugin writes them: a policy Calico still enforces on a node not yet migrated
/// would drop clients that moved to kubeshift's network, and kubeshift does not write
/// into Calico's etcd to bridge that.
fn calico_etcd(c: &CalicoConfig) -> Option<Finding> {
    (c.datastore == "etcdv3").then(|| {
        finding(
            Severity::Blocker,
            "cni",
            format!(
                "Calico keeps its data in etcd ({}): Felix selects policy peers only among the WorkloadEndpoints Calico's CNI plugin wrote there, so pods moved to kubeshift's network would match no Calico selector and a policy Calico still enforces on a node not yet migrated would drop them. Move Calico to the Kubernetes datastore (Calico's etcd-to-KDD migration) first, then plan again",
                c.datastore_from
            ),
        )
    })
}

fn describe_found(f: &crate::inventory::CniFound) -> String {
    format!(
        "{} ({}; network {})",
        f.kind,
        f.workloads.join(", "),
        if f.networks.is_empty() { "unknown".to_string() } else { f.networks.join(", ") }
    )
}

/// Flannel and Calico side by side: pods of one network cannot be moved by a
/// plan that knows only the other, and Calico's own migration controller may
/// be moving nodes at the same time as kubeshift.
pub fn two_cnis(cni: &CniInventory) -> Vec<Finding> {
    let mut v = Vec::new();
    if cni.found.len() > 1 {
        let each: Vec<String> = cni.found.iter().map(describe_found).collect();
        let traces = if cni.migration_traces.is_empty() {
            String::new()
        } else {
            format!(" Traces of Calico's flannel-migration: {}.", cni.migration_traces.join("; "))
        };
        v.push(finding(
            Severity::Blocker,
            "cni",
            format!(
                "two CNIs at once: {}. This is a half-done migration between them: some nodes' pods are on one network and some on the other, and kubeshift would move only one. Finish or undo that migration (one CNI's DaemonSets and config left) and plan again.{traces}",
                each.join(" and ")
            ),
        ));
    } else if !cni.migration_traces.is_empty() {
        v.push(finding(
            Severity::Attention,
            "cni",
            format!(
                "leftovers of Calico's flannel-migration although only {} runs: {}; remove them before apply so no controller moves nodes behind kubeshift",
                cni.kind.as_deref().unwrap_or("one CNI"),
                cni.migration_traces.join("; ")
            ),
        ));
    }
    v
}

fn is_true(v: &str) -> bool {
    v.trim_matches('"').eq_ignore_ascii_case("true")
}

/// Calico's eBPF dataplane, from Felix's env, FelixConfiguration or the Installation.
fn calico_bpf(c: &CalicoConfig) -> Option<String> {
    if c.installation_network("linuxDataplane") == Some("BPF") {
        return Some("Installation spec.calicoNetwork.linuxDataplane BPF".into());
    }
    c.felix_setting("bpfEnabled").filter(|(v, _)| is_true(v)).map(|(v, from)| format!("bpfEnabled {v} ({from})"))
}

/// Calico's nftables dataplane. `Auto` follows kube-proxy's mode and is reported apart.
fn calico_nftables(c: &CalicoConfig) -> Option<(String, bool)> {
    if c.installation_network("linuxDataplane") == Some("Nftables") {
        return Some(("Installation spec.calicoNetwork.linuxDataplane Nftables".into(), true));
    }
    let (v, from) = c.felix_setting("nftablesMode")?;
    let v = v.trim_matches('"').to_string();
    match v.as_str() {
        "Enabled" => Some((format!("nftablesMode Enabled ({from})"), true)),
        "Auto" => Some((format!("nftablesMode Auto ({from})"), false)),
        _ => None,
    }
}

fn dataplanes(inv: &Inventory) -> Vec<Finding> {
    let mut v = Vec::new();
    if let Some(c) = &inv.cni.calico {
        v.extend(calico_dataplane(c, inv));
    }
    if let Some(f) = inv.cni.flannel.as_ref().filter(|f| f.enable_nftables) {
        v.push(flannel_nftables(f));
    }
    if let Some(why) = &inv.kube_proxy.disabled_by {
        v.push(finding(
            Severity::Attention,
            "kube-proxy",
            format!("kube-proxy is installed but runs on no node: {why}. Services are served by something else today (Calico's eBPF dataplane does this); kubeshift takes over from that, not from kube-proxy"),
        ));
    }
    v
}

fn calico_dataplane(c: &CalicoConfig, inv: &Inventory) -> Vec<Finding> {
    let mut v = Vec::new();
    if let Some(src) = calico_bpf(c) {
        let kp = match (&inv.kube_proxy.mode, &inv.kube_proxy.disabled_by) {
            (None, _) => "kube-proxy is absent, Calico serves the Services".to_string(),
            (Some(_), Some(_)) => "kube-proxy is disabled, Calico serves the Services".to_string(),
            (Some(m), None) => format!("kube-proxy ({m} mode) still runs beside it"),
        };
        let kp = match c.installation_network("kubeProxyManagement") {
            Some("Enabled") => format!("{kp}; the operator manages kube-proxy (Installation spec.calicoNetwork.kubeProxyManagement Enabled) and would undo changes to it"),
            _ => kp,
        };
        v.push(finding(
            Severity::Blocker,
            "cni",
            format!(
                "Calico runs its eBPF dataplane ({src}; {kp}): its programs hold Services, policy and conntrack on the same tc and cgroup hooks kubeshift's datapath attaches to, and kubeshift cannot hand over from them node by node. Switch Calico back to its iptables dataplane (and restore kube-proxy) first, then plan again"
            ),
        ));
    }
    if let Some((src, on)) = calico_nftables(c) {
        v.push(if on {
            finding(
                Severity::Blocker,
                "cni",
                format!("Calico programs its rules with nftables ({src}): kubeshift's legacy cleanup removes Calico's iptables chains only, so its nftables table would stay and keep filtering pod traffic after the move. Switch Felix to iptables (nftablesMode Disabled) first"),
            )
        } else {
            finding(
                Severity::Attention,
                "cni",
                format!("Calico's {src}: Felix uses nftables when kube-proxy does; check which it chose on a node (`nft list table ip calico`) before apply"),
            )
        });
    }
    if c.installation_network("linuxDataplane") == Some("VPP") {
        v.push(finding(
            Severity::Blocker,
            "cni",
            "Calico runs its VPP dataplane (Installation spec.calicoNetwork.linuxDataplane VPP): pod interfaces belong to VPP, not to the kernel; kubeshift cannot move them".into(),
        ));
    }
    v
}

fn flannel_nftables(f: &FlannelConfig) -> Finding {
    finding(
        Severity::Blocker,
        "cni",
        format!("Flannel writes its masquerade and forward rules with nftables (EnableNFTables true in {}): kubeshift's legacy cleanup removes Flannel's iptables chains only, so the flannel nftables tables would keep masquerading pod traffic after the move. Set EnableNFTables false and restart Flannel first", f.source),
    )
}

fn encryption(cni: &CniInventory) -> Vec<Finding> {
    let mut what = Vec::new();
    if let Some(c) = &cni.calico {
        for key in ["wireguardEnabled", "wireguardEnabledV6"] {
            if let Some((val, from)) = c.felix_setting(key).filter(|(val, _)| is_true(val)) {
                what.push(format!("Calico WireGuard ({key} {val}, {from})"));
            }
        }
    }
    if let Some(f) = &cni.flannel {
        if matches!(f.backend(), "wireguard" | "ipsec") {
            what.push(format!("Flannel's {} backend (Backend.Type in {})", f.backend(), f.source));
        }
    }
    if what.is_empty() {
        return Vec::new();
    }
    vec![finding(
        Severity::Blocker,
        "cni",
        format!(
            "pod traffic between nodes is encrypted today by {}; kubeshift's overlay does not encrypt, so the migration would send it in clear. Not supported until kubeshift offers encryption",
            what.join(" and ")
        ),
    )]
}

fn ipv6(inv: &Inventory) -> Vec<Finding> {
    let mut what = Vec::new();
    if let Some(f) = &inv.cni.flannel {
        if f.enable_ipv6 || f.ipv4_disabled {
            what.push(format!(
                "Flannel hands out IPv6 pod addresses (EnableIPv6 {}, IPv6Network {}{} in {})",
                f.enable_ipv6,
                f.ipv6_network.as_deref().unwrap_or("unset"),
                if f.ipv4_disabled { ", EnableIPv4 false" } else { "" },
                f.source
            ));
        }
    }
    for p in inv.cni.calico.iter().flat_map(|c| c.ip_pools.iter()).filter(|p| p.is_ipv6() && !p.disabled) {
        what.push(format!("Calico IPv6 pool {} {} ({})", p.name, p.cidr, p.source));
    }
    let v6_nodes: Vec<String> = inv
        .nodes
        .iter()
        .filter_map(|n| {
            let v6: Vec<&String> = n.pod_cidrs.iter().filter(|c| c.contains(':')).collect();
            (!v6.is_empty())
                .then(|| format!("{} ({})", n.name, v6.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")))
        })
        .collect();
    if !v6_nodes.is_empty() {
        what.push(format!("nodes with IPv6 podCIDRs: {}", v6_nodes.join(", ")));
    }
    if !inv.ipv6_services.is_empty() {
        what.push(format!("Services with an IPv6 family: {}", inv.ipv6_services.join(", ")));
    }
    if what.is_empty() {
        return Vec::new();
    }
    vec![finding(
        Severity::Blocker,
        "ipv6",
        format!(
            "the cluster carries IPv6: {}. kubeshift's datapath and plan are IPv4 only; an IPv4-only plan would leave these without a network. Not supported yet",
            what.join("; ")
        ),
    )]
}
