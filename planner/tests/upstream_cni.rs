//! CNI discovery and its findings on the manifests people really apply: copies
//! of Flannel's and Calico's own files under tests/fixtures/upstream/, each
//! naming its source repository, path and release in its first lines.

use kubeshift_planner::analysis::{analyze, plan_input, Analysis};
use kubeshift_planner::cni::{discover_cni, CniDiscovery, CniObjects};
use kubeshift_planner::inventory::{Inventory, NodeInfo};
use kubeshift_planner::planning::{build_plan, PlanningError};
use serde_json::json;
use std::path::Path;

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn objects(files: &[&str]) -> CniObjects {
    let mut objs = CniObjects::default();
    for f in files {
        objs.add_manifest(f, &fixture(f)).unwrap_or_else(|e| panic!("{e}"));
    }
    objs
}

fn discover(files: &[&str]) -> CniDiscovery {
    discover_cni(&objects(files)).unwrap_or_else(|e| panic!("{e}"))
}

/// An inventory of two worker nodes around the discovered CNI, with kube-proxy
/// in iptables mode, as discovery would return it.
fn inventory(d: CniDiscovery) -> Inventory {
    let mut inv = Inventory { kube_system_uid: "uid".into(), ..Default::default() };
    for (i, name) in ["node-a", "node-b"].iter().enumerate() {
        inv.nodes.push(NodeInfo {
            name: name.to_string(),
            pool: "default".into(),
            kernel_version: "6.1.0".into(),
            internal_ips: vec![format!("192.0.2.{}", 10 + i)],
            ..Default::default()
        });
    }
    inv.kube_proxy.mode = Some("iptables".into());
    inv.kube_proxy.deployed_as = Some("daemonset".into());
    inv.cni = d.cni;
    inv.calico_policies = d.calico_policies;
    inv.problems = d.problems;
    inv
}

fn blockers(a: &Analysis) -> Vec<String> {
    a.blockers().map(|f| format!("[{}] {}", f.subject, f.message)).collect()
}

fn blocker_with(a: &Analysis, needle: &str) -> String {
    let all = blockers(a);
    all.iter().find(|b| b.contains(needle)).cloned().unwrap_or_else(|| panic!("no blocker with {needle:?} in {all:#?}"))
}

fn no_blocker_with(a: &Analysis, needle: &str) {
    let all = blockers(a);
    assert!(!all.iter().any(|b| b.contains(needle)), "unexpected blocker with {needle:?}: {all:#?}");
}

// --- Flannel releases (point 5: per-arch DaemonSets) ------------------------

#[test]
fn flannel_v0_13_and_v0_28_single_daemonset_and_defaults() {
    for (file, ds, cm) in [
        ("flannel-v0.13.0-kube-flannel.yml", "kube-system/kube-flannel-ds", "ConfigMap kube-system/kube-flannel-cfg"),
        ("flannel-v0.28.9-kube-flannel.yml", "kube-flannel/kube-flannel-ds", "ConfigMap kube-flannel/kube-flannel-cfg"),
    ] {
        let d = discover(&[file]);
        assert_eq!(d.cni.kind.as_deref(), Some("flannel"), "{file}");
        assert_eq!(d.cni.daemonsets, vec![ds.to_string()], "{file}");
        let f = d.cni.flannel.as_ref().unwrap();
        assert_eq!(f.network.as_deref(), Some("10.244.0.0/16"), "{file}");
        assert_eq!(f.backend(), "vxlan");
        assert!(f.source.starts_with(cm), "{file}: {}", f.source);
        assert!(!f.enable_nftables && !f.enable_ipv6, "{file}");
        let inv = inventory(d);
        let a = analyze(&inv, &[], None);
        assert!(blockers(&a).is_empty(), "{file}: {:#?}", blockers(&a));
    }
}

#[test]
fn flannel_v0_11_per_arch_daemonsets_are_all_the_legacy_cni() {
    let d = discover(&["flannel-v0.11.0-kube-flannel.yml"]);
    let want: Vec<String> = ["amd64", "arm64", "arm", "ppc64le", "s390x"]
        .iter()
        .map(|a| format!("kube-system/kube-flannel-ds-{a}"))
        .collect();
    assert_eq!(d.cni.daemonsets, want);
    assert_eq!(d.cni.found.len(), 1, "one CNI, five DaemonSets: {:?}", d.cni.found);
    let inv = inventory(d);
    let a = analyze(&inv, &[], None);
    let info = a.findings.iter().find(|f| f.message.starts_with("legacy CNI flannel")).unwrap();
    for ds in &want {
        assert!(info.message.contains(ds.as_str()), "{}", info.message);
    }
    // apply reads the DaemonSets to pin and remove from the plan.
    let plan = build_plan(&plan_input(&inv, "p", 1)).unwrap();
    assert_eq!(plan.cluster.legacy_daemon_sets, want);
    let back = kubeshift_planner::plan::parse_plan("plan.yaml", &plan.to_yaml(), None).unwrap();
    assert_eq!(back.cluster.legacy_daemon_sets, want);
}

// --- Point 1: tunnel port and VNI -------------------------------------------

#[test]
fn tunnel_avoids_flannel_defaults_and_says_they_were_defaults() {
    let inv = inventory(discover(&["flannel-v0.28.9-kube-flannel.yml"]));
    let plan = build_plan(&plan_input(&inv, "p", 1)).unwrap();
    assert_eq!((plan.target.tunnel.port, plan.target.tunnel.vni), (8473, Some(2)));
    assert_eq!(
        plan.target.tunnel.avoids,
        vec!["Flannel vxlan port 8472 (Flannel's default), VNI 1 (Flannel's default), ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json"]
    );
}

/// The chart-rendered net-conf.json replaces the manifest's ConfigMap: Flannel
/// on 8473 (kubeshift's default) and VNI 4096.
fn flannel_on_8473() -> Inventory {
    let mut objs = objects(&["flannel-v0.28.9-kube-flannel.yml"]);
    objs.config_maps.clear();
    objs.add_manifest("chart", &fixture("flannel-v0.28.9-chart-port-vni-cm.yaml")).unwrap();
    inventory(discover_cni(&objs).unwrap())
}

#[test]
fn tunnel_port_read_from_flannel_backend_is_avoided() {
    let inv = flannel_on_8473();
    let mut input = plan_input(&inv, "p", 1);
    let plan = build_plan(&input).unwrap();
    assert_eq!(plan.target.tunnel.port, 8474, "8473 is Flannel's Backend.Port here");
    assert_eq!(plan.target.tunnel.vni, Some(2));
    assert!(
        plan.target.tunnel.avoids[0].contains("port 8473 (read), VNI 4096 (read)"),
        "{:?}",
        plan.target.tunnel.avoids
    );

    input.tunnel_port = Some(8473);
    match build_plan(&input) {
        Err(PlanningError::PortTaken { port: 8473, what }) => {
            assert!(what.contains("ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    input.tunnel_port = None;
    input.tunnel_vni = Some(4096);
    assert!(matches!(build_plan(&input), Err(PlanningError::VniTaken { vni: 4096, .. })));
}

#[test]
fn tunnel_avoids_calico_felix_vxlan_settings_from_v3_felixconfiguration() {
    // Calico defaults first: 4789 / 4096 are avoided and said to be defaults.
    let inv = inventory(discover(&["calico-v3.32.1-vxlan.yaml"]));
    let input = plan_input(&inv, "p", 1);
    assert_eq!(input.legacy_tunnels.len(), 1);
    assert_eq!(input.legacy_tunnels[0].port, 4789);
    assert_eq!(input.legacy_tunnels[0].vni, Some(4096));
    assert!(input.legacy_tunnels[0].what.contains("vxlanPort 4789 (Felix's default)"));

    // FelixConfiguration default sets vxlanPort 8472 and vxlanVNI 1.
    let inv = inventory(discover(&["calico-v3.32.1-vxlan.yaml", "calico-v3-felixconfiguration-docs.yaml"]));
    let mut input = plan_input(&inv, "p", 1);
    let t = &input.legacy_tunnels[0];
    assert_eq!((t.port, t.vni), (8472, Some(1)));
    assert!(
        t.what.contains("vxlanPort 8472 from FelixConfiguration default (projectcalico.org/v3) spec.vxlanPort"),
        "{}",
        t.what
    );
    input.tunnel_vni = Some(1);
    match build_plan(&input) {
        Err(PlanningError::VniTaken { vni: 1, what }) => {
            assert!(what.contains("vxlanVNI 1 from FelixConfiguration"), "{what}")
        }
        other => panic!("{other:?}"),
    }
}

// --- Point 2: native projectcalico.org/v3 CRDs ------------------------------

fn calico_v3() -> Inventory {
    inventory(discover(&[
        "calico-v3.32.1-v3-crds.yaml",
        "calico-v3-confd-cluster-routes-input.yaml",
        "calico-v3-migration-seed-resources.yaml",
    ]))
}

#[test]
fn calico_v3_crds_pools_bgp_and_policies_are_read() {
    let inv = calico_v3();
    let c = inv.cni.calico.as_ref().unwrap();
    assert_eq!(c.api_groups, vec!["projectcalico.org/v3"]);
    let pools: Vec<(&str, &str)> = c.ip_pools.iter().map(|p| (p.name.as_str(), p.cidr.as_str())).collect();
    assert!(pools.contains(&("ippoolv4-1", "192.168.0.0/16")), "{pools:?}");
    assert!(pools.contains(&("ippoolv4-3", "172.17.0.0/16")), "{pools:?}");
    assert_eq!(c.ip_pools[0].source, "IPPool ippoolv4-1 (projectcalico.org/v3)");
    assert_eq!(c.bgp.as_ref().unwrap()["nodeToNodeMeshEnabled"], json!(false));
    assert!(c.bgp_peers.iter().any(|p| p == "test-peer (10.0.0.100)"), "{:?}", c.bgp_peers);

    // The target CIDR can never be one of the pods' own ranges.
    let mut input = plan_input(&inv, "p", 1);
    let plan = build_plan(&input).unwrap();
    for p in &c.ip_pools {
        assert_ne!(plan.target.pod_cidr, p.cidr);
    }
    input.pod_cidr = Some("172.17.0.0/16".into());
    assert_eq!(
        build_plan(&input),
        Err(PlanningError::Overlap { wanted: "172.17.0.0/16".into(), used: "172.17.0.0/16".into() })
    );
}

#[test]
fn calico_v3_deny_all_policy_is_a_blocker() {
    let a = analyze(&calico_v3(), &[], None);
    // test-deny-all has types Ingress and Egress and no rules: Calico drops everything it selects.
    let b = blocker_with(&a, "projectcalico.org/GlobalNetworkPolicy/test-deny-all");
    assert!(b.contains("Deny") && b.contains("order 1000"), "{b}");
    let allow = a.policies.iter().find(|p| p.name == "test-allow-web").unwrap();
    assert_eq!(allow.api, "projectcalico.org/NetworkPolicy");
}

#[test]
fn calico_policy_seen_in_both_groups_is_counted_once() {
    // The seed file's own comment: the Calico API server stores the default-tier
    // policy test-deny-all in the v1 CRD as default.test-deny-all.
    let mut objs = objects(&["calico-v3.32.1-v3-crds.yaml", "calico-v3-migration-seed-resources.yaml"]);
    let mut v1 = objs.resources.iter().find(|r| r["metadata"]["name"] == "test-deny-all").unwrap().clone();
    v1["apiVersion"] = json!("crd.projectcalico.org/v1");
    v1["metadata"]["name"] = json!("default.test-deny-all");
    objs.add(v1);
    let d = discover_cni(&objs).unwrap();
    let n = d.calico_policies.iter().filter(|p| p.name.ends_with("test-deny-all")).count();
    assert_eq!(n, 1, "{:?}", d.calico_policies);
}

// --- Point 3: Calico before its first IPPool --------------------------------

#[test]
fn calico_manifest_without_pools_takes_them_from_calico_node_env() {
    let d = discover(&["calico-v3.32.1.yaml"]);
    assert_eq!(d.cni.workload.as_deref(), Some("DaemonSet kube-system/calico-node"));
    assert_eq!(d.cni.daemonsets, vec!["kube-system/calico-node"]);
    let p = &d.cni.calico.as_ref().unwrap().ip_pools;
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].cidr, "192.168.0.0/16");
    assert_eq!(p[0].ipip_mode.as_deref(), Some("Always"));
    assert_eq!(p[0].vxlan_mode, None);
    assert!(p[0].nat_outgoing);
    assert_eq!(
        p[0].source,
        "DaemonSet kube-system/calico-node calico-node's default (CALICO_IPV4POOL_CIDR unset), before the first IPPool exists"
    );

    let d = discover(&["calico-v3.32.1-vxlan.yaml"]);
    let p = &d.cni.calico.as_ref().unwrap().ip_pools[0];
    assert_eq!((p.ipip_mode.as_deref(), p.vxlan_mode.as_deref()), (None, Some("CrossSubnet")));
    assert_eq!(d.cni.calico.as_ref().unwrap().backend.as_deref(), Some("vxlan"));
}

#[test]
fn calico_manifest_with_uncommented_pool_cidr() {
    // What the manifest's comment asks users to do: uncomment CALICO_IPV4POOL_CIDR.
    let text = fixture("calico-v3.32.1.yaml")
        .replace("# - name: CALICO_IPV4POOL_CIDR", "- name: CALICO_IPV4POOL_CIDR")
        .replace("#   value: \"192.168.0.0/16\"", "  value: \"10.10.0.0/16\"");
    let mut objs = CniObjects::default();
    objs.add_manifest("calico.yaml", &text).unwrap();
    let d = discover_cni(&objs).unwrap();
    let p = &d.cni.calico.as_ref().unwrap().ip_pools[0];
    assert_eq!(p.cidr, "10.10.0.0/16");
    assert!(p.source.contains("env CALICO_IPV4POOL_CIDR"), "{}", p.source);
    let inv = inventory(d);
    assert!(plan_input(&inv, "p", 1).used_cidrs.contains(&"10.10.0.0/16".to_string()));
}

#[test]
fn operator_installation_pools_before_ippools_exist() {
    let d = discover(&["calico-v3.32.1-custom-resources.yaml"]);
    assert_eq!(d.cni.kind.as_deref(), Some("calico"));
    let c = d.cni.calico.as_ref().unwrap();
    assert_eq!(c.installed_by, "Installation default");
    assert_eq!(d.cni.workload.as_deref(), Some("Installation default"));
    assert!(d.cni.daemonsets.is_empty(), "the operator's calico-node is not a DaemonSet of the manifests");
    assert_eq!(c.ip_pools[0].name, "default-ipv4-ippool");
    assert_eq!(c.ip_pools[0].cidr, "192.168.0.0/16");
    assert_eq!(c.ip_pools[0].vxlan_mode.as_deref(), Some("CrossSubnet"));
    assert_eq!(c.ip_pools[0].source, "Installation default spec.calicoNetwork.ipPools[0]");
}

// --- Point 4: two CNIs ------------------------------------------------------

#[test]
fn flannel_and_calico_half_done_migration_is_a_blocker() {
    let inv = inventory(discover(&[
        "flannel-v0.28.9-kube-flannel.yml",
        "calico-v3.32.1-flannel-migration-calico.yaml",
        "calico-v3.32.1-flannel-migration-migration-job.yaml",
    ]));
    assert_eq!(inv.cni.found.len(), 2);
    let a = analyze(&inv, &[], None);
    let b = blocker_with(&a, "two CNIs at once");
    assert!(b.contains("flannel (kube-flannel/kube-flannel-ds; network 10.244.0.0/16)"), "{b}");
    // CALICO_IPV4POOL_CIDR is commented out in the manifest, but it is not calico-node
    // that makes the pool here: the migration controller creates it on Flannel's network.
    assert!(b.contains("calico (kube-system/calico-node; network 10.244.0.0/16)"), "{b}");
    let pool = &inv.cni.calico.as_ref().unwrap().ip_pools[0];
    assert_eq!(
        (pool.cidr.as_str(), pool.vxlan_mode.as_deref(), pool.ipip_mode.as_deref()),
        ("10.244.0.0/16", Some("Always"), None)
    );
    assert_eq!(pool.source, "Calico's flannel-migration controller creates it from Flannel's Network (ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json), before the first IPPool exists");
    assert!(b.contains("projectcalico.org/node-network-during-migration=calico"), "{b}");
    assert!(b.contains("Job kube-system/flannel-migration"), "{b}");
    assert!(b.contains("ConfigMap kube-system/flannel-migration-config"), "{b}");
}

#[test]
fn canal_is_one_cni() {
    let inv = inventory(discover(&["calico-v3.32.1-canal.yaml"]));
    assert_eq!(inv.cni.kind.as_deref(), Some("canal"));
    assert_eq!(inv.cni.daemonsets, vec!["kube-system/canal"]);
    assert_eq!(inv.cni.found[0].networks, vec!["10.244.0.0/16"]);
    // Canal's pods take Flannel's subnets; no Calico pool is made up from its env.
    assert!(inv.cni.calico.as_ref().unwrap().ip_pools.is_empty());
    let a = analyze(&inv, &[], None);
    no_blocker_with(&a, "two CNIs");
    assert!(blockers(&a).is_empty(), "{:#?}", blockers(&a));
    // Canal runs Flannel's VXLAN and Felix: both are avoided.
    let tunnels = plan_input(&inv, "p", 1).legacy_tunnels;
    let ports: Vec<(u16, Option<u32>)> = tunnels.iter().map(|t| (t.port, t.vni)).collect();
    assert_eq!(ports, vec![(8472, Some(1)), (4789, Some(4096))]);
    assert!(tunnels[0].what.contains("ConfigMap kube-system/canal-config key net-conf.json"), "{}", tunnels[0].what);
}

// --- Point 6: dataplanes that are not iptables ------------------------------

#[test]
fn calico_ebpf_from_manifest_env_is_a_blocker() {
    let a = analyze(&inventory(discover(&["calico-v3.32.1-bpf.yaml"])), &[], None);
    let b = blocker_with(&a, "eBPF dataplane");
    assert!(b.contains("bpfEnabled true (DaemonSet kube-system/calico-node env FELIX_BPFENABLED)"), "{b}");
}

#[test]
fn calico_ebpf_from_operator_installation_is_a_blocker() {
    let mut inv = inventory(discover(&["calico-v3.32.1-custom-resources-bpf.yaml"]));
    inv.kube_proxy = Default::default();
    let a = analyze(&inv, &[], None);
    let b = blocker_with(&a, "eBPF dataplane");
    assert!(b.contains("Installation spec.calicoNetwork.linuxDataplane BPF"), "{b}");
    assert!(b.contains("kube-proxy is absent"), "{b}");
    assert!(b.contains("kubeProxyManagement Enabled"), "{b}");
}

#[test]
fn felix_bpf_and_nftables_from_felixconfiguration() {
    let a =
        analyze(&inventory(discover(&["calico-v3.32.1.yaml", "calico-v3-felixconfiguration-docs.yaml"])), &[], None);
    let b = blocker_with(&a, "eBPF dataplane");
    assert!(b.contains("FelixConfiguration default (projectcalico.org/v3) spec.bpfEnabled"), "{b}");
    let n = blocker_with(&a, "nftables");
    assert!(
        n.contains("nftablesMode Enabled (FelixConfiguration default (projectcalico.org/v3) spec.nftablesMode)"),
        "{n}"
    );
}

#[test]
fn flannel_enable_nftables_is_a_blocker() {
    let mut objs = objects(&["flannel-v0.28.9-kube-flannel.yml"]);
    objs.config_maps.clear();
    objs.add_manifest("e2e", &fixture("flannel-e2e-vxlan-nft-cm.yaml")).unwrap();
    let a = analyze(&inventory(discover_cni(&objs).unwrap()), &[], None);
    let b = blocker_with(&a, "EnableNFTables true");
    assert!(b.contains("ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json"), "{b}");
}

#[test]
fn kube_proxy_disabled_by_node_selector() {
    // kube-proxy's DaemonSet after the patch of Calico's "Enable the eBPF
    // dataplane" guide (nodeSelector non-calico: "true"), with the status the
    // DaemonSet controller then reports.
    let ds: k8s_openapi::api::apps::v1::DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
        "spec": {"selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
                 "template": {"spec": {"nodeSelector": {"non-calico": "true"}, "containers": []}}},
        "status": {"desiredNumberScheduled": 0, "currentNumberScheduled": 0, "numberMisscheduled": 0, "numberReady": 0}
    }))
    .unwrap();
    let why = kubeshift_planner::inventory::kube_proxy_disabled(&ds, 3).unwrap();
    assert!(why.contains("kube-system/kube-proxy") && why.contains("non-calico=true"), "{why}");
    let mut inv = inventory(discover(&["calico-v3.32.1-bpf.yaml"]));
    inv.kube_proxy.disabled_by = Some(why);
    let a = analyze(&inv, &[], None);
    assert!(blocker_with(&a, "eBPF dataplane").contains("kube-proxy is disabled"));
    assert!(a.findings.iter().any(|f| f.subject == "kube-proxy" && f.message.contains("runs on no node")));
}

// --- Point 7: encryption ----------------------------------------------------

#[test]
fn encryption_is_a_blocker() {
    let a =
        analyze(&inventory(discover(&["calico-v3.32.1.yaml", "calico-v3-felixconfiguration-docs.yaml"])), &[], None);
    let b = blocker_with(&a, "encrypted");
    assert!(b.contains("Calico WireGuard (wireguardEnabled true, FelixConfiguration default (projectcalico.org/v3) spec.wireguardEnabled)"), "{b}");

    for (cm, backend) in [
        ("flannel-v0.24.0-functional-ipsec-cm.yaml", "ipsec"),
        ("flannel-e2e-dualstack-wireguard-nft-cm.yaml", "wireguard"),
    ] {
        let mut objs = objects(&["flannel-v0.28.9-kube-flannel.yml"]);
        objs.config_maps.clear();
        objs.add_manifest(cm, &fixture(cm)).unwrap();
        let a = analyze(&inventory(discover_cni(&objs).unwrap()), &[], None);
        let b = blocker_with(&a, "encrypted");
        assert!(b.contains(&format!("Flannel's {backend} backend")), "{cm}: {b}");
    }
}

// --- Point 8: IPv6 and dual-stack -------------------------------------------

#[test]
fn flannel_dual_stack_is_a_blocker_naming_the_ipv6_network() {
    let mut objs = objects(&["flannel-v0.28.9-kube-flannel.yml"]);
    objs.config_maps.clear();
    objs.add_manifest("e2e", &fixture("flannel-e2e-dualstack-wireguard-nft-cm.yaml")).unwrap();
    let inv = inventory(discover_cni(&objs).unwrap());
    assert_eq!(inv.cni.found[0].networks, vec!["10.42.0.0/16", "fd00:10:244::/56"]);
    let a = analyze(&inv, &[], None);
    let b = blocker_with(&a, "carries IPv6");
    assert!(b.contains("EnableIPv6 true, IPv6Network fd00:10:244::/56"), "{b}");
}

#[test]
fn calico_v6_pools_and_dual_stack_services_are_a_blocker() {
    let mut inv = calico_v3();
    // The dual-stack Service example of kubernetes.io "IPv4/IPv6 dual-stack"
    // (my-service, ipFamilyPolicy PreferDualStack), with the addresses an
    // apiserver allocates from dual-stack service ranges.
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "my-service", "namespace": "default", "labels": {"app.kubernetes.io/name": "MyApp"}},
        "spec": {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"],
                 "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
                 "selector": {"app.kubernetes.io/name": "MyApp"}, "ports": [{"protocol": "TCP", "port": 80}]}
    }))
    .unwrap();
    inv.ipv6_services.extend(kubeshift_planner::inventory::ipv6_service(&svc));
    let a = analyze(&inv, &[], None);
    let b = blocker_with(&a, "carries IPv6");
    assert!(b.contains("Calico IPv6 pool ippoolv6-1 2002::/64 (IPPool ippoolv6-1 (projectcalico.org/v3))"), "{b}");
    assert!(b.contains("default/my-service (IPv4,IPv6)"), "{b}");
}

// --- Point 9: hostNetwork pods and hostPort ---------------------------------

#[test]
fn host_network_ports_are_not_host_ports() {
    let mut objs = CniObjects::default();
    objs.add_manifest("typha", &fixture("calico-v3.32.1-typha-deployment.yaml")).unwrap();
    let deploy = &objs.resources[0];
    let mut spec = deploy["spec"]["template"]["spec"].clone();
    // The apiserver's defaulting for a hostNetwork pod: hostPort = containerPort.
    for c in spec["containers"].as_array_mut().unwrap() {
        for p in c["ports"].as_array_mut().into_iter().flatten() {
            p["hostPort"] = p["containerPort"].clone();
        }
    }
    let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(spec).unwrap();
    assert_eq!(spec.containers[0].ports.as_ref().unwrap()[0].host_port, Some(5473));
    assert!(kubeshift_planner::inventory::host_ports(&spec).is_empty());

    // The same container off the host network with that hostPort is portmap's.
    let mut pod = spec.clone();
    pod.host_network = Some(false);
    assert_eq!(kubeshift_planner::inventory::host_ports(&pod), vec!["5473/TCP->5473"]);
}

// --- Errors name the input and the place ------------------------------------

#[test]
fn bad_manifest_and_bad_net_conf_name_the_place() {
    let mut objs = CniObjects::default();
    let e = objs.add_manifest("broken.yaml", "kind: ConfigMap\nmetadata: {name: x\n").unwrap_err();
    assert!(e.starts_with("broken.yaml:"), "{e}");

    // The v0.28.9 ConfigMap with EnableIPv6 written as a string.
    let text =
        fixture("flannel-v0.28.9-kube-flannel.yml").replace("\"EnableNFTables\": false", "\"EnableIPv6\": \"yes\"");
    let mut objs = CniObjects::default();
    objs.add_manifest("kube-flannel.yml", &text).unwrap();
    let e = discover_cni(&objs).unwrap_err();
    assert_eq!(e, "ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json: EnableIPv6 must be true or false");
}

#[test]
fn felix_and_bgp_config_come_from_the_group_calico_node_reads() {
    // Calico's v1-to-v3 datastore migration copies FelixConfiguration default to
    // projectcalico.org/v3, sets CALICO_API_GROUP=projectcalico.org/v3 on calico-node
    // and leaves the v1 objects behind. Here the v1 copy still has Felix's defaults
    // and no BGP mesh setting; the v3 one is the docs' (eBPF, vxlanPort 8472 / VNI 1).
    let mut objs = objects(&[
        "calico-v3.32.1-v3-crds.yaml",
        "calico-v3-felixconfiguration-docs.yaml",
        "calico-v3-confd-cluster-routes-input.yaml",
    ]);
    for (kind, spec) in [("FelixConfiguration", json!({"bpfEnabled": false})), ("BGPConfiguration", json!({}))] {
        objs.add(json!({"apiVersion": "crd.projectcalico.org/v1", "kind": kind,
            "metadata": {"name": "default"}, "spec": spec}));
    }
    // Without CALICO_API_GROUP and both groups present, calico-node reads v1
    // (libcalico-go: v3 is then Calico's API server over the v1 CRDs).
    let d = discover_cni(&objs).unwrap();
    let c = d.cni.calico.as_ref().unwrap();
    assert_eq!(c.felix_source.as_deref(), Some("FelixConfiguration default (crd.projectcalico.org/v1)"));
    assert_eq!(c.felix.as_ref().unwrap()["bpfEnabled"], json!(false));
    assert_eq!(c.bgp.as_ref().unwrap().get("nodeToNodeMeshEnabled"), None);
    assert_eq!(kubeshift_planner::cni::legacy_tunnels(&d.cni)[0].port, 4789);

    // calico-node told to read v3: the v3 objects count, the stale v1 ones not.
    let ds = objs.daemonsets.iter_mut().find(|d| d["metadata"]["name"] == "calico-node").unwrap();
    let node = ds["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == "calico-node")
        .unwrap();
    node["env"].as_array_mut().unwrap().push(json!({"name": "CALICO_API_GROUP", "value": "projectcalico.org/v3"}));
    let d = discover_cni(&objs).unwrap();
    let c = d.cni.calico.as_ref().unwrap();
    assert_eq!(c.felix_source.as_deref(), Some("FelixConfiguration default (projectcalico.org/v3)"));
    assert_eq!(c.bgp.as_ref().unwrap()["nodeToNodeMeshEnabled"], json!(false));
    let t = &kubeshift_planner::cni::legacy_tunnels(&d.cni)[0];
    assert_eq!((t.port, t.vni), (8472, Some(1)), "{}", t.what);
    let a = analyze(&inventory(d), &[], None);
    blocker_with(&a, "bpfEnabled true (FelixConfiguration default (projectcalico.org/v3) spec.bpfEnabled)");
}

// --- Calico's datastore: policy across the two pod networks --------------------

#[test]
fn calico_on_etcd_is_a_blocker_naming_where_it_was_read_and_kdd_is_not() {
    // Calico's own etcd manifest: ETCD_ENDPOINTS from calico-config, DATASTORE_TYPE unset.
    let inv = inventory(discover(&["calico-v3.32.1-etcd.yaml"]));
    let c = inv.cni.calico.as_ref().unwrap();
    assert_eq!(c.datastore, "etcdv3");
    let a = analyze(&inv, &[], None);
    let b = blocker_with(&a, "Calico keeps its data in etcd");
    assert!(b.contains("DaemonSet kube-system/calico-node env ETCD_ENDPOINTS http://<ETCD_IP>:<ETCD_PORT>"), "{b}");
    assert!(b.contains("Kubernetes datastore"), "{b}");

    // The Kubernetes-datastore manifests: endpoints come from Pods, kubeshift's included.
    for (f, ds) in [
        ("calico-v3.32.1.yaml", "calico-node"),
        ("calico-v3.32.1-vxlan.yaml", "calico-node"),
        ("calico-v3.32.1-canal.yaml", "canal"),
    ] {
        let inv = inventory(discover(&[f]));
        let c = inv.cni.calico.as_ref().unwrap();
        assert_eq!(c.datastore, "kubernetes", "{f}");
        assert_eq!(c.datastore_from, format!("DaemonSet kube-system/{ds} env DATASTORE_TYPE"), "{f}");
        no_blocker_with(&analyze(&inv, &[], None), "etcd");
    }
    // The operator: always the Kubernetes datastore.
    let inv = inventory(discover(&["calico-v3.32.1-custom-resources.yaml"]));
    assert_eq!(inv.cni.calico.as_ref().unwrap().datastore, "kubernetes");

    // An explicit DATASTORE_TYPE wins over ETCD_ENDPOINTS, as in calico-node.
    let text = fixture("calico-v3.32.1-etcd.yaml").replace(
        "            # The location of the etcd cluster.\n            - name: ETCD_ENDPOINTS\n              valueFrom:\n                configMapKeyRef:\n                  name: calico-config\n                  key: etcd_endpoints\n            # Location of the CA",
        "            - name: DATASTORE_TYPE\n              value: \"kubernetes\"\n            - name: ETCD_ENDPOINTS\n              valueFrom:\n                configMapKeyRef:\n                  name: calico-config\n                  key: etcd_endpoints\n            # Location of the CA",
    );
    let mut objs = CniObjects::default();
    objs.add_manifest("calico-etcd.yaml", &text).unwrap();
    let inv = inventory(discover_cni(&objs).unwrap());
    assert_eq!(inv.cni.calico.as_ref().unwrap().datastore, "kubernetes", "the replacement did not apply");
}
