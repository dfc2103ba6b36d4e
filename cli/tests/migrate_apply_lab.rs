//! `kubeshift migrate apply` and `rollback` end to end on a real 3-node Flannel lab
//! (one control-plane node with kubeadm's labels and taint, two workers in two pools; real apiserver, controllers, kube-proxy writing real iptables rules, the
//! flanneld stand-in, kubeshift's agent DaemonSet):
//!
//! - refused without changing anything: a plan for another cluster, and a second apply
//!   while another holds the Lease (named in the error);
//! - a full run: every NodeMigration Done, no kube-proxy pod, no kube-proxy chain on
//!   either iptables backend of any node, no flannel.1/cni0, every non-host pod on
//!   kubeshift's range, the connectivity suite passing, a JUnit file with every gate;
//! - `rollback --all`: the DaemonSets back from their backups, kube-proxy Ready on every
//!   node, the legacy conf first again, and the suite passing on the legacy datapath.

mod common;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kubeshift_node_migrator::crd::{ClusterMigration, NodeMigration};
use kubeshift_node_migrator::lease::Lock;
use std::process::Command;
use std::time::Duration;

fn kubeshift_on(lab: &Lab, args: &[&str]) -> std::process::Output {
    kubeshift().arg("--kubeconfig").arg(lab.kubeconfig()).args(args).output().expect("running kubeshift")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn in_node(lab: &Lab, node: &str, cmd: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("ks-{}-{node}", lab.name)])
        .args(cmd)
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn pods(client: &kube::Client) -> Vec<Pod> {
    Api::<Pod>::all(client.clone()).list(&ListParams::default()).await.unwrap().items
}

fn non_host_ips(pods: &[Pod]) -> Vec<(String, String)> {
    pods.iter()
        .filter(|p| !p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((p.metadata.name.clone().unwrap_or_default(), ip))
        })
        .collect()
}

/// A lab and its plan: the lab, a scratch dir, the plan file (as a string for the
/// command line) and the plan read back.
struct Planned {
    lab: Lab,
    dir: std::path::PathBuf,
    plan_s: String,
    plan: kubeshift_planner::plan::Plan,
}

fn planned(name: &str, args: &[&str]) -> Planned {
    let lab = Lab::up(name, args);
    let dir = std::env::temp_dir().join(format!("ks-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan_path = dir.join("plan.yaml");
    let plan_s = plan_path.to_str().unwrap().to_string();
    run_ok(kubeshift().arg("--kubeconfig").arg(lab.kubeconfig()).args(["migrate", "plan", "--out", &plan_s]));
    let plan = kubeshift_planner::plan::load_plan(&plan_path, None).unwrap();
    Planned { lab, dir, plan_s, plan }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_job_flannel_lab_migrates_node_by_node_and_rolls_back_whole() {
    let lab = Lab::up("tma", &["--nodes", "3", "--pools", "2", "--control-plane-nodes", "1"]);
    let client = lab.client().await;
    let dir = std::env::temp_dir().join(format!("ks-tma-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.yaml");
    let plan_s = plan.to_str().unwrap();
    run_ok(kubeshift().arg("--kubeconfig").arg(lab.kubeconfig()).args(["migrate", "plan", "--out", plan_s]));

    // A plan made for another cluster: refused, nothing created.
    let other = dir.join("other.yaml");
    let yaml = std::fs::read_to_string(&plan).unwrap();
    let fp = yaml.lines().find_map(|l| l.trim().strip_prefix("fingerprint: ")).unwrap().to_string();
    std::fs::write(&other, yaml.replace(&fp, "sha1:0000000000000000000000000000000000000000")).unwrap();
    let o = kubeshift_on(&lab, &["migrate", "apply", "-f", other.to_str().unwrap(), "--yes"]);
    assert!(
        !o.status.success() && text(&o).contains("another cluster") || text(&o).contains("made for cluster"),
        "{}",
        text(&o)
    );
    let cms = Api::<ClusterMigration>::all(client.clone()).list(&ListParams::default()).await;
    assert!(cms.map(|l| l.items.is_empty()).unwrap_or(true), "a refused plan created a ClusterMigration");

    // Another run holds the Lease: refused, naming it.
    let lock = Lock::acquire(&client, "someone-else@test", Duration::from_secs(60)).await.unwrap();
    let o = kubeshift_on(&lab, &["migrate", "apply", "-f", plan_s, "--yes"]);
    assert!(!o.status.success() && text(&o).contains("someone-else@test"), "{}", text(&o));
    lock.release().await.unwrap();

    // The whole job.
    let junit = dir.join("gates.xml");
    let o = kubeshift_on(&lab, &["migrate", "apply", "-f", plan_s, "--yes", "--junit", junit.to_str().unwrap()]);
    assert!(o.status.success(), "migrate apply failed:\n{}", text(&o));
    let nms = Api::<NodeMigration>::all(client.clone()).list(&ListParams::default()).await.unwrap().items;
    assert_eq!(nms.len(), 3);
    for nm in &nms {
        let st = nm.status.clone().unwrap_or_default();
        assert_eq!(st.phase, "Done", "{}: {st:?}", nm.spec.node);
        assert!(st.last_gate.as_ref().is_some_and(|g| g.passed), "{}: no passed gate recorded", nm.spec.node);
        assert!(st.legacy_removed.is_some(), "{}: finish did not record the legacy removal", nm.spec.node);
        // Of the 9 long-lived connections (3 per node), those of the node's own pods and
        // host and those to its replaced pods end by design; the other 4, between pods
        // on the other two nodes (one of them on kubeshift's network after the first
        // node), survived the node's step.
        let conns = st.last_gate.as_ref().and_then(|g| g.connections.clone()).unwrap_or_default();
        assert_eq!((conns.judged, conns.ended_by_design), (4, 5), "{}: {:?}", nm.spec.node, st.last_gate);
    }
    // Control plane last, for real: its first step started after every worker's last.
    let plan_doc = kubeshift_planner::plan::load_plan(&plan, None).unwrap();
    let last_wave = plan_doc.waves.last().unwrap();
    assert_eq!(last_wave.name, "control-plane", "{:?}", plan_doc.waves.iter().map(|w| &w.name).collect::<Vec<_>>());
    let cp = &last_wave.batches[0].nodes[0].name;
    let cp_start =
        nms.iter().find(|m| &m.spec.node == cp).unwrap().status.as_ref().unwrap().history[0].started_at.clone();
    for nm in nms.iter().filter(|m| &m.spec.node != cp) {
        let end = nm.status.as_ref().unwrap().history.last().unwrap().finished_at.clone();
        assert!(
            end <= cp_start,
            "worker {} finished at {end}, after the control plane started at {cp_start}",
            nm.spec.node
        );
    }
    let gates = std::fs::read_to_string(&junit).unwrap();
    assert!(gates.contains("tests=\"4\" failures=\"0\""), "three node gates and finish's: {gates}");
    let all = pods(&client).await;
    assert!(
        !all.iter().any(|p| p.metadata.name.as_deref().unwrap_or("").starts_with("kube-proxy")),
        "a kube-proxy pod is left"
    );
    for (name, ip) in non_host_ips(&all) {
        assert!(ip.starts_with("10.200."), "pod {name} is on {ip}, not kubeshift's range (plan target 10.200.0.0/16)");
    }
    for node in ["node-1", "node-2", "node-3"] {
        for save in ["iptables-legacy-save", "iptables-nft-save"] {
            let rules = in_node(&lab, node, &[save]);
            let left: Vec<&str> = rules
                .lines()
                .filter(|l| {
                    ["KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-NODEPORTS", "FLANNEL-"]
                        .iter()
                        .any(|c| l.starts_with(&format!(":{c}")))
                })
                .collect();
            assert!(left.is_empty(), "{node} {save}: {left:?}");
        }
        let links = in_node(&lab, node, &["ip", "-o", "link", "show"]);
        assert!(!links.contains("flannel.1") && !links.contains(" cni0"), "{node} keeps legacy links:\n{links}");
    }
    run_ok(kubeshift().arg("--kubeconfig").arg(lab.kubeconfig()).args(["connectivity", "test"]));
    let status =
        run_ok(kubeshift().arg("--kubeconfig").arg(lab.kubeconfig()).args(["migrate", "status", "-o", "json"]));
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(doc["cluster"]["phase"], "Finished", "{doc}");

    // And all the way back.
    let o = kubeshift_on(&lab, &["migrate", "rollback", "--all", "--yes"]);
    assert!(o.status.success(), "migrate rollback failed:\n{}", text(&o));
    for nm in Api::<NodeMigration>::all(client.clone()).list(&ListParams::default()).await.unwrap().items {
        assert_eq!(nm.status.unwrap_or_default().phase, "RolledBack", "{}", nm.spec.node);
    }
    let all = pods(&client).await;
    let kube_proxies =
        all.iter().filter(|p| p.metadata.name.as_deref().unwrap_or("").starts_with("kube-proxy")).count();
    assert_eq!(kube_proxies, 3, "kube-proxy back on every node");
    for node in ["node-1", "node-2", "node-3"] {
        let conf = std::fs::read_dir(kubeshift_lab::kubelet::node_root(&lab.name, node).join("etc/cni/net.d"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
            .collect::<Vec<_>>();
        assert!(!conf.iter().any(|c| c.starts_with("00-kubeshift")), "{node}: kubeshift's conf left: {conf:?}");
        assert!(conf.iter().any(|c| c.contains("flannel")), "{node}: the legacy conf is not back: {conf:?}");
    }
    // New pods land on the legacy network again, and the suite passes there.
    run_ok(kubeshift().arg("--kubeconfig").arg(lab.kubeconfig()).args(["connectivity", "test"]));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn history_len(nm: Option<&NodeMigration>) -> usize {
    nm.and_then(|n| n.status.as_ref()).map(|s| s.history.len()).unwrap_or(0)
}

/// The canary's apply killed with SIGKILL at every step boundary (each time its
/// NodeMigration records one more step) and run again: the runs converge, every step is
/// journalled exactly once, and a re-run takes over the dead run's Lease at once. Then
/// a PodDisruptionBudget that forbids the drain of the next node ends that node's run
/// with the PDB named and the node back as it was, and `rollback --node` returns the
/// canary to the legacy datapath.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_job_killed_applies_resume_and_a_blocked_drain_rolls_the_node_back() {
    use k8s_openapi::api::core::v1::Node;
    let Planned { lab, dir, plan_s, plan } = planned("tmk", &["--nodes", "3", "--pools", "2"]);
    let client = lab.client().await;
    let canary = plan.waves[0].batches[0].nodes[0].name.clone();
    let nms: Api<NodeMigration> = Api::all(client.clone());

    let mut kills = 0;
    let mut resumes_ms = Vec::new();
    let mut seen = 0;
    let mut killed_at: Option<std::time::Instant> = None;
    loop {
        let mut child = kubeshift()
            .arg("--kubeconfig")
            .arg(lab.kubeconfig())
            .args(["migrate", "apply", "-f", &plan_s, "--yes", "--until-wave", "canary"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The next boundary: one more journalled step, or the run's end.
        let exited = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            let now = history_len(nms.get_opt(&canary).await.ok().flatten().as_ref());
            if now > seen {
                if let Some(t) = killed_at.take() {
                    resumes_ms.push(t.elapsed().as_millis());
                }
                seen = now;
                break None;
            }
            // Polling the object is the condition: the journal is what is awaited.
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match exited {
            Some(st) => {
                let out = child.wait_with_output().unwrap();
                assert!(st.success(), "the last resumed run failed:\n{}", text(&out));
                break;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                killed_at = Some(std::time::Instant::now());
            }
        }
        assert!(kills < 30, "no convergence after {kills} kills");
    }
    eprintln!("kills: {kills}; kill -9 to the next journalled step (ms): {resumes_ms:?}");
    let nm = nms.get(&canary).await.unwrap();
    let st = nm.status.clone().unwrap();
    assert_eq!(st.phase, "Done", "{st:?}");
    assert!(kills >= nm.spec.steps.len() - 1, "killed at {kills} boundaries of {} steps", nm.spec.steps.len());
    for step in &nm.spec.steps {
        let n = st.history.iter().filter(|h| h.step == *step).count();
        assert_eq!(n, 1, "{step:?} journalled {n} times: {:?}", st.history);
    }

    // A PDB allowing no disruption of the backend: the next node with a backend pod
    // cannot be drained; it is rolled back and apply stops, naming the budget.
    let backend: Vec<Pod> = Api::<Pod>::namespaced(client.clone(), "demo-backend")
        .list(&ListParams::default().labels("app=backend"))
        .await
        .unwrap()
        .items;
    let victim = backend
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .find(|n| *n != canary)
        .expect("a backend pod off the canary");
    let pdb = serde_json::json!({"apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "no-disruption", "namespace": "demo-backend"},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "backend"}}}});
    let pdbs: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "demo-backend",
        &kube::api::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            "policy",
            "v1beta1",
            "PodDisruptionBudget",
        )),
    );
    pdbs.create(&Default::default(), &serde_json::from_value(pdb).unwrap()).await.unwrap();
    let o =
        kubeshift_on(&lab, &["migrate", "apply", "-f", &plan_s, "--yes", "--nodes", &victim, "--drain-timeout", "10s"]);
    let said = text(&o);
    assert!(!o.status.success(), "apply went on past a drain the PDB forbids:\n{said}");
    assert!(said.contains("drain") && said.contains("rolled back"), "{said}");
    let st = nms.get(&victim).await.unwrap().status.unwrap_or_default();
    assert_eq!(st.phase, "RolledBack", "{st:?}");
    let node = Api::<Node>::all(client.clone()).get(&victim).await.unwrap();
    assert!(!node.spec.and_then(|s| s.unschedulable).unwrap_or(false), "{victim} left cordoned");
    pdbs.delete("no-disruption", &Default::default()).await.unwrap();

    // The canary alone goes back.
    let o = kubeshift_on(&lab, &["migrate", "rollback", "--node", &canary, "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    let st = nms.get(&canary).await.unwrap().status.unwrap_or_default();
    assert_eq!(st.phase, "RolledBack");
    let labels = Api::<Node>::all(client.clone()).get(&canary).await.unwrap().metadata.labels.unwrap_or_default();
    assert!(!labels.contains_key(kubeshift_node_migrator::daemonsets::NO_KUBE_PROXY), "{labels:?}");
    run_ok(kubeshift().arg("--kubeconfig").arg(lab.kubeconfig()).args(["connectivity", "test"]));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Calico lab (policy enforced by the calico-node stand-in from the lab's
/// NetworkPolicies): a gate made to fail (a DROP, in every other node's netns, of
/// forwarded TCP to kubeshift's pod range: the baseline on the legacy range passes, the
/// canary's gate does not) rolls the canary back and stops before any other node. With
/// the DROP gone the same plan runs whole: every node Done, no kube-proxy chain, no
/// Calico device, chain or conf file left, and the suite, policy scenarios included,
/// gives the verdicts it gave before the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_job_calico_lab_a_failed_gate_rolls_back_then_the_run_keeps_every_verdict() {
    let Planned { lab, dir, plan_s, plan } = planned("tmc", &["--nodes", "3", "--cni", "calico"]);
    let client = lab.client().await;
    let canary = plan.waves[0].batches[0].nodes[0].name.clone();
    let target = plan.target.pod_cidr.to_string();
    let cidr: kubeshift_datapath::overlay::Cidr = target.parse().unwrap();
    let before = dir.join("before.json");
    let o = kubeshift_on(&lab, &["connectivity", "test", "--save", before.to_str().unwrap()]);
    assert!(o.status.success() && !text(&o).contains("SKIP"), "baseline with policies enforced:\n{}", text(&o));

    let others = ["node-1", "node-2", "node-3"].into_iter().filter(|n| *n != canary).collect::<Vec<_>>();
    let drop = ["FORWARD", "-d", &target, "-p", "tcp", "-j", "DROP"];
    for n in &others {
        let args: Vec<&str> = ["iptables", "-I"].into_iter().chain(drop).collect();
        in_node(&lab, n, &args);
        assert!(in_node(&lab, n, &["iptables-save"]).contains(&format!("-d {target} -p tcp -j DROP")), "{n}");
    }
    let o = kubeshift_on(&lab, &["migrate", "apply", "-f", &plan_s, "--yes"]);
    let said = text(&o);
    assert!(!o.status.success(), "apply went on past a failed gate:\n{said}");
    assert!(said.contains("connectivity-gate") && said.contains("rolling the node back"), "{said}");
    let nms: Api<NodeMigration> = Api::all(client.clone());
    let st = nms.get(&canary).await.unwrap().status.unwrap_or_default();
    assert_eq!(st.phase, "RolledBack", "{st:?}");
    assert!(st.last_gate.as_ref().is_some_and(|g| !g.passed && !g.failures.is_empty()), "{:?}\n{said}", st.last_gate);
    for n in &others {
        let started = nms.get_opt(n).await.unwrap().and_then(|m| m.status).and_then(|s| s.reached);
        assert!(started.is_none(), "{n} started after the canary's gate failed: {started:?}");
    }

    for n in &others {
        let args: Vec<&str> = ["iptables", "-D"].into_iter().chain(drop).collect();
        in_node(&lab, n, &args);
    }
    let o = kubeshift_on(&lab, &["migrate", "apply", "-f", &plan_s, "--yes"]);
    assert!(o.status.success(), "the second apply failed:\n{}", text(&o));
    // The plan's gate after the wave of two nodes ran, and passed.
    let wide = plan.waves.iter().find(|w| w.batches.iter().map(|b| b.nodes.len()).sum::<usize>() > 1).unwrap();
    let cm = Api::<ClusterMigration>::all(client.clone()).get(&plan.metadata.name).await.unwrap();
    let wg = cm.status.unwrap_or_default().wave_gates;
    assert!(wg.get(&wide.name).is_some_and(|g| g.passed && g.nodes.len() >= 2), "wave {}: {wg:?}", wide.name);
    assert!(text(&o).contains(&format!("wave {}: gate on", wide.name)), "{}", text(&o));
    for nm in nms.list(&ListParams::default()).await.unwrap().items {
        let st = nm.status.unwrap_or_default();
        assert_eq!(st.phase, "Done", "{}: {st:?}", nm.spec.node);
        assert!(st.last_gate.is_some_and(|g| g.passed), "{}", nm.spec.node);
    }
    let all = pods(&client).await;
    assert!(!all.iter().any(|p| p.metadata.name.as_deref().unwrap_or("").starts_with("kube-proxy")));
    assert!(!all.iter().any(|p| p.metadata.name.as_deref().unwrap_or("").starts_with("calico-node")));
    for (name, ip) in non_host_ips(&all) {
        assert!(cidr.contains(ip.parse().unwrap()), "pod {name} is on {ip}, not kubeshift's {target}");
    }
    for node in ["node-1", "node-2", "node-3"] {
        for save in ["iptables-legacy-save", "iptables-nft-save"] {
            let left: Vec<String> = in_node(&lab, node, &[save])
                .lines()
                .filter(|l| {
                    ["KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "cali-"].iter().any(|c| l.starts_with(&format!(":{c}")))
                })
                .map(String::from)
                .collect();
            assert!(left.is_empty(), "{node} {save}: {left:?}");
        }
        let links = in_node(&lab, node, &["ip", "-o", "link", "show"]);
        assert!(
            !links.contains("vxlan.calico") && !links.contains("tunl0") && !links.contains(": cali"),
            "{node} keeps Calico's links:\n{links}"
        );
        let conf = std::fs::read_dir(kubeshift_lab::kubelet::node_root(&lab.name, node).join("etc/cni/net.d"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
            .collect::<Vec<_>>();
        assert!(!conf.iter().any(|c| c.contains("calico")), "{node} keeps Calico's conf: {conf:?}");
    }
    let o = kubeshift_on(&lab, &["connectivity", "test", "--compare", before.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success() && !t.contains("SKIP") && t.contains("no verdict changed"), "{t}");
    std::fs::remove_dir_all(&dir).unwrap();
}
