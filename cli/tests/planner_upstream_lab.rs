//! Issue 11's lab proof: `kubeshift migrate plan` against the lab's real apiserver
//! (v1.20.2) with the upstream objects of `planner/tests/fixtures/upstream/`
//! applied (server-side apply, as `kubectl apply --server-side` would). One Calico
//! lab (the calico-node DaemonSet's env as the only pool source, then Calico's
//! native projectcalico.org/v3 CRDs) and one Flannel lab (a tunnel port clash, then
//! a half-done flannel-to-Calico migration), each mutated between scenarios.

mod common;

use common::{eventually, kubeshift, Lab};
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use kubeshift_planner::planning::{cidrs_overlap, parse_cidr};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../planner/tests/fixtures/upstream").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The documents of a multi-document manifest, as JSON.
fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .map(|d| serde_json::to_value(d).unwrap())
        .collect()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

/// Removes what a 1.20 apiserver rejects in Calico 3.32's CRDs: CEL rules
/// (`x-kubernetes-validations`, 1.25+) and `selectableFields` (1.30+), which its
/// server-side apply refuses as undeclared fields, and the empty-string `default: ""`
/// of a few string properties, which 1.20 reads as `null` and refuses ("must be of
/// type string"). Calico's own validation of these objects is lost; the objects
/// applied here are Calico's own examples and pass it.
fn strip_for_1_20(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("x-kubernetes-validations");
            m.remove("selectableFields");
            if m.get("default") == Some(&Value::String(String::new())) {
                m.remove("default");
            }
            m.values_mut().for_each(strip_for_1_20);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_for_1_20),
        _ => {}
    }
}

/// Server-side applies the documents; retried until the apiserver serves their
/// kinds (CRDs applied just before become served once Established).
async fn apply(lab: &Lab, what: &str, objs: &[Value]) {
    let yaml: String = objs.iter().map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap())).collect();
    let client = lab.client().await;
    eventually(&format!("{what} applied"), Duration::from_secs(60), || {
        let (c, y) = (client.clone(), yaml.clone());
        async move { kubeshift_lab::api::apply_yaml(&c, what, &y).await.map(Some) }
    })
    .await;
}

async fn delete_all(lab: &Lab, group: &str, version: &str, kind_: &str, plural: &str) {
    let ar = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind_.into(),
        plural: plural.into(),
    };
    let api: Api<DynamicObject> = Api::all_with(lab.client().await, &ar);
    for o in api.list(&ListParams::default()).await.unwrap().items {
        api.delete(o.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
    }
    eventually(&format!("{kind_}s ({group}/{version}) gone"), Duration::from_secs(30), || {
        let api = api.clone();
        async move { Ok(api.list(&ListParams::default()).await?.items.is_empty().then_some(())) }
    })
    .await;
}

/// `migrate plan -o json`: whether it exited 0, the JSON, and stderr.
fn plan(lab: &Lab, extra: &[&str]) -> (bool, Value, String) {
    let out = kubeshift()
        .args(["migrate", "plan", "-o", "json", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .args(extra)
        .output()
        .expect("running kubeshift");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("migrate plan -o json printed no JSON ({e}): {stderr}"));
    (out.status.success(), v, stderr)
}

fn findings<'a>(v: &'a Value, severity: &str) -> Vec<(&'a str, &'a str)> {
    v["analysis"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == severity)
        .map(|f| (f["subject"].as_str().unwrap(), f["message"].as_str().unwrap()))
        .collect()
}

fn has_finding(v: &Value, severity: &str, subject: &str, text: &str) -> bool {
    findings(v, severity).iter().any(|(s, m)| *s == subject && m.contains(text))
}

fn pools(v: &Value) -> &Vec<Value> {
    v["inventory"]["cni"]["calico"]["ipPools"].as_array().expect("calico.ipPools")
}

fn overlaps(a: &str, b: &str) -> bool {
    matches!((parse_cidr(a), parse_cidr(b)), (Ok(Some(x)), Ok(Some(y))) if cidrs_overlap(x, y))
}

fn avoids(v: &Value) -> Vec<String> {
    v["plan"]["target"]["tunnel"]["avoids"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calico_daemonset_env_pool_then_native_v3_crds() {
    let lab = Lab::up("tpu1", &["--nodes", "2", "--cni", "calico", "--no-demo"]);

    // As `lab up` leaves it: the pool is the crd.projectcalico.org/v1 IPPool.
    let (ok, v, err) = plan(&lab, &[]);
    assert!(ok, "{err}");
    let p = pools(&v);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0]["source"], "IPPool default-ipv4-ippool (crd.projectcalico.org/v1)");
    let lab_cidr = p[0]["cidr"].as_str().unwrap().to_string();
    let first_target = v["plan"]["target"]["podCidr"].as_str().unwrap().to_string();

    // --- Calico before its first IPPool exists: only calico-node's env names it. ---
    // The lab's calico-node DaemonSet is Calico v3.26.4's manifest with
    // CALICO_IPV4POOL_CIDR set (as Calico's install docs say to), IPIP Never, VXLAN Always.
    delete_all(&lab, "crd.projectcalico.org", "v1", "IPPool", "ippools").await;
    let (ok, v, err) = plan(&lab, &[]);
    assert!(ok, "{err}");
    let p = pools(&v);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0]["name"], "default-ipv4-ippool");
    assert_eq!(p[0]["cidr"], lab_cidr.as_str());
    assert_eq!(p[0]["vxlanMode"], "Always");
    assert_eq!(p[0]["ipipMode"], Value::Null, "CALICO_IPV4POOL_IPIP Never");
    assert_eq!(p[0]["natOutgoing"], true, "CALICO_IPV4POOL_NAT_OUTGOING unset: Calico's default true");
    let from_env = "DaemonSet kube-system/calico-node env CALICO_IPV4POOL_CIDR, before the first IPPool exists";
    assert_eq!(p[0]["source"], from_env);
    assert!(
        has_finding(
            &v,
            "info",
            "cni",
            &format!("pool {lab_cidr} ipip Never vxlan Always natOutgoing true from {from_env}")
        ),
        "{:?}",
        findings(&v, "info")
    );
    assert!(!overlaps(v["plan"]["target"]["podCidr"].as_str().unwrap(), &lab_cidr));

    // --- Calico's native projectcalico.org/v3 CRDs (no crd.projectcalico.org objects). ---
    // As Calico's v1-to-v3 datastore migration leaves a cluster: the v1 CRDs and the
    // lab's v1 FelixConfiguration/BGPConfiguration stay behind, and calico-node is told
    // to read v3 (CALICO_API_GROUP; with both groups and no such setting Calico reads v1).
    // OnDelete first, so the lab's calico-node pods keep running as they are.
    let dss: Api<DaemonSet> = Api::namespaced(lab.client().await, "kube-system");
    dss.patch(
        "calico-node",
        &PatchParams::default(),
        &Patch::Strategic(serde_json::json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null}}})),
    )
    .await
    .unwrap();
    dss.patch(
        "calico-node",
        &PatchParams::default(),
        &Patch::Strategic(serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "calico-node",
            "env": [{"name": "CALICO_API_GROUP", "value": "projectcalico.org/v3"}]}]}}}})),
    )
    .await
    .unwrap();
    let mut crds = docs(&fixture("calico-v3.32.1-v3-crds-definitions.yaml"));
    crds.iter_mut().for_each(strip_for_1_20);
    assert_eq!(crds.len(), 10);
    apply(&lab, "calico-v3.32.1-v3-crds-definitions.yaml", &crds).await;

    let mut objs: Vec<Value> =
        vec![serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "migration-test"}})];
    // Calico's migration seed (Tier, GNPs, NetworkPolicy, HostEndpoint, network sets, BGPPeer).
    objs.extend(docs(&fixture("calico-v3-migration-seed-resources.yaml")));
    // FelixConfiguration default: eBPF, nftables, WireGuard, vxlanPort 8472 / VNI 1.
    objs.extend(docs(&fixture("calico-v3-felixconfiguration-docs.yaml")));
    // BGPConfiguration default and five IPPools (three v4, two v6). Its projectcalico.org/v3
    // Nodes are left out: in a Kubernetes-datastore install the Calico Node is the
    // Kubernetes Node, no CRD serves that kind.
    objs.extend(docs(&fixture("calico-v3-confd-cluster-routes-input.yaml")).into_iter().filter(|d| kind(d) != "Node"));
    // kubeshift's own pool, shaped like the upstream ippoolv4-3, on the very range the
    // plan chose when Calico's pools were invisible to it: read, it moves the target.
    objs.push(serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
        "metadata": {"name": "ippoolv4-on-target"}, "spec": {"cidr": first_target, "ipipMode": "Never"}}));
    apply(&lab, "v3 objects", &objs).await;

    let (ok, v, err) = plan(&lab, &[]);
    assert!(!ok, "blockers must fail the plan");
    assert!(err.contains("blocker(s) found"), "{err}");
    let calico = &v["inventory"]["cni"]["calico"];
    assert!(calico["apiGroups"].as_array().unwrap().iter().any(|g| g == "projectcalico.org/v3"), "{calico}");
    let p = pools(&v);
    let mut names: Vec<&str> = p.iter().map(|p| p["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["ippoolv4-1", "ippoolv4-2", "ippoolv4-3", "ippoolv4-on-target", "ippoolv6-1", "ippoolv6-2"]);
    for pool in p {
        assert_eq!(pool["source"], format!("IPPool {} (projectcalico.org/v3)", pool["name"].as_str().unwrap()));
    }
    // The target CIDR is none of the v3 pools' ranges.
    let target = v["plan"]["target"]["podCidr"].as_str().unwrap();
    assert_ne!(target, first_target);
    for pool in p {
        assert!(!overlaps(target, pool["cidr"].as_str().unwrap()), "target {target} overlaps {pool}");
    }
    // The v3 policies are classified: the rule-less deny-all GNP blocks, the allow-only one needs attention.
    assert!(
        has_finding(&v, "blocker", "projectcalico.org/GlobalNetworkPolicy/test-deny-all", "Deny rules at order 1000"),
        "{:?}",
        findings(&v, "blocker")
    );
    assert!(
        has_finding(
            &v,
            "attention",
            "projectcalico.org/NetworkPolicy/migration-test/test-allow-web",
            "allow rules only, order 500"
        ),
        "{:?}",
        findings(&v, "attention")
    );
    // Felix's v3 config, not the stale v1 one (bpfEnabled false, VXLAN defaults): its
    // dataplane and encryption are blockers, its VXLAN port and VNI avoided.
    assert!(calico["apiGroups"].as_array().unwrap().iter().any(|g| g == "crd.projectcalico.org/v1"), "{calico}");
    assert_eq!(calico["felixSource"], "FelixConfiguration default (projectcalico.org/v3)");
    assert_eq!(calico["bgp"]["nodeToNodeMeshEnabled"], false, "BGPConfiguration default of v3");
    let felix = "FelixConfiguration default (projectcalico.org/v3) spec";
    for text in [
        format!("bpfEnabled true ({felix}.bpfEnabled)"),
        format!("Calico WireGuard (wireguardEnabled true, {felix}.wireguardEnabled)"),
        format!("nftablesMode Enabled ({felix}.nftablesMode)"),
    ] {
        assert!(has_finding(&v, "blocker", "cni", &text), "{text}: {:?}", findings(&v, "blocker"));
    }
    assert!(
        has_finding(
            &v,
            "blocker",
            "ipv6",
            "Calico IPv6 pool ippoolv6-1 2002::/64 (IPPool ippoolv6-1 (projectcalico.org/v3))"
        ),
        "{:?}",
        findings(&v, "blocker")
    );
    let tunnel = &v["plan"]["target"]["tunnel"];
    assert_ne!(tunnel["port"], 8472);
    assert_ne!(tunnel["vni"], 1);
    let calico_tunnel =
        format!("Calico VXLAN: vxlanPort 8472 from {felix}.vxlanPort, vxlanVNI 1 from {felix}.vxlanVNI");
    assert!(avoids(&v).contains(&calico_tunnel), "{:?}", avoids(&v));

    drop(lab);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_port_clash_then_half_done_calico_migration() {
    let lab = Lab::up("tpu2", &["--nodes", "2", "--cni", "flannel", "--no-demo"]);

    // As `lab up` leaves it: Flannel's defaults, so the first candidate port is free.
    let (ok, v, err) = plan(&lab, &[]);
    assert!(ok, "{err}");
    assert_eq!(v["plan"]["target"]["tunnel"]["port"], 8473);
    let src = "ConfigMap kube-flannel/kube-flannel-cfg key net-conf.json";
    assert!(
        avoids(&v).contains(&format!("Flannel vxlan port 8472 (Flannel's default), VNI 1 (Flannel's default), {src}")),
        "{:?}",
        avoids(&v)
    );

    // --- Port clash: Flannel's chart with backendPort 8473 and vni 4096. ---
    let cm = docs(&fixture("flannel-v0.28.9-chart-port-vni-cm.yaml"));
    assert_eq!(cm[0]["metadata"]["namespace"], "kube-flannel");
    apply(&lab, "flannel-v0.28.9-chart-port-vni-cm.yaml", &cm).await;
    let (ok, v, err) = plan(&lab, &[]);
    assert!(ok, "{err}");
    let flannel = &v["inventory"]["cni"]["flannel"];
    assert_eq!(flannel["port"], 8473);
    assert_eq!(flannel["vni"], 4096);
    let tunnel = &v["plan"]["target"]["tunnel"];
    let port = tunnel["port"].as_u64().unwrap();
    assert!(port != 8473 && port != 8472, "{tunnel}");
    assert_ne!(tunnel["vni"], 4096);
    let read = format!("Flannel vxlan port 8473 (read), VNI 4096 (read), {src}");
    assert!(avoids(&v).contains(&read), "{:?}", avoids(&v));
    // The plan file says the same.
    let out =
        kubeshift().args(["migrate", "plan", "-o", "yaml", "--kubeconfig"]).arg(lab.kubeconfig()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let y: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let t = &y["target"]["tunnel"];
    assert_eq!(t["port"].as_u64(), Some(port), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(t["avoids"].as_sequence().unwrap().iter().any(|a| a.as_str() == Some(read.as_str())));

    // --- Two CNIs: Calico's flannel-migration manifests applied to the Flannel cluster. ---
    // calico.yaml of flannel-migration: ConfigMap calico-config and DaemonSet calico-node,
    // whose nodeSelector (projectcalico.org/node-network-during-migration=calico) no
    // lab node carries yet, so no pod of it starts.
    let mut objs = docs(&fixture("calico-v3.32.1-flannel-migration-calico.yaml"));
    assert_eq!(objs.iter().map(kind).collect::<Vec<_>>(), ["ConfigMap", "DaemonSet"]);
    // migration-job.yaml: flannel-migration-config, RBAC, ServiceAccount and the Job. The
    // Job gets parallelism 0: the lab has no stand-in for the migration controller's
    // image, and its pods would only fail (the object is what the planner reads).
    for mut d in docs(&fixture("calico-v3.32.1-flannel-migration-migration-job.yaml")) {
        if kind(&d) == "Job" {
            d["spec"]["parallelism"] = 0.into();
        }
        objs.push(d);
    }
    apply(&lab, "Calico flannel-migration", &objs).await;
    let (ok, v, err) = plan(&lab, &[]);
    assert!(!ok, "a half-done migration must fail the plan");
    assert!(err.contains("blocker(s) found"), "{err}");
    let found: Vec<&str> =
        v["inventory"]["cni"]["found"].as_array().unwrap().iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(found, ["flannel", "calico"]);
    let blockers = findings(&v, "blocker");
    let (_, two) = blockers
        .iter()
        .find(|(s, m)| *s == "cni" && m.starts_with("two CNIs at once"))
        .unwrap_or_else(|| panic!("no two-CNI blocker: {blockers:?}"));
    for text in [
        "flannel (kube-flannel/kube-flannel-ds; network 10.244.0.0/16)",
        // Not calico-node's default 192.168.0.0/16 (CALICO_IPV4POOL_CIDR is commented
        // out in the manifest): the migration controller makes Calico's pool on Flannel's network.
        "calico (kube-system/calico-node; network 10.244.0.0/16)",
        "half-done migration",
        "DaemonSet kube-system/calico-node spec.template.spec.nodeSelector projectcalico.org/node-network-during-migration=calico",
        "Job kube-system/flannel-migration",
        "ConfigMap kube-system/flannel-migration-config",
    ] {
        assert!(two.contains(text), "{text:?} not in: {two}");
    }
    let pool = &pools(&v)[0];
    assert_eq!(pool["cidr"], "10.244.0.0/16");
    assert_eq!(
        pool["source"],
        format!("Calico's flannel-migration controller creates it from Flannel's Network ({src}), before the first IPPool exists")
    );
    // --allow-blockers: the plan is written, and still avoids both legacy tunnels.
    let (ok, v, err) = plan(&lab, &["--allow-blockers"]);
    assert!(ok, "{err}");
    let tunnel = &v["plan"]["target"]["tunnel"];
    assert!(![8472, 8473, 4789].contains(&tunnel["port"].as_u64().unwrap()), "{tunnel}");
    assert_ne!(tunnel["vni"], 4096);
    assert!(
        avoids(&v).iter().any(|a| a.starts_with("Calico VXLAN: vxlanPort 4789 (Felix's default)")),
        "{:?}",
        avoids(&v)
    );

    drop(lab);
}
