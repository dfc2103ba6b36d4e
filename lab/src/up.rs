//! `lab up`: builds a lab from nothing, step by step, recording every process it starts
//! so `lab down` can undo a half-finished run.

use crate::api;
use crate::control_plane::{self, ControlPlaneFiles};
use crate::down;
use crate::pki::{self, Identity};
use crate::spec::{Cni, LabSpec, APISERVER_PORT, KUBERNETES_SERVICE_IP, SERVICE_CIDR};
use crate::state::LabState;
use crate::sys;
use crate::topology;
use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::Client;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const MANIFEST_RBAC: &str = include_str!("../manifests/lab-rbac.yaml");
pub const MANIFEST_KUBE_PROXY: &str = include_str!("../manifests/kube-proxy.yaml");
pub const MANIFEST_FLANNEL: &str = include_str!("../manifests/flannel.yaml");
pub const MANIFEST_CALICO_CRDS: &str = include_str!("../manifests/calico-crds.yaml");
pub const MANIFEST_CALICO: &str = include_str!("../manifests/calico.yaml");
pub const MANIFEST_DEMO: &str = include_str!("../manifests/demo.yaml");

pub struct UpOptions {
    pub spec: LabSpec,
    /// The kubeshift binary, started again as the lab's kubelet stand-ins and forwarder.
    pub self_exe: PathBuf,
    /// Leave a failed lab in place for debugging instead of removing it.
    pub keep_on_failure: bool,
}

pub fn kubeconfig_path(lab: &str) -> PathBuf {
    crate::spec::state_dir(lab).join("kubeconfig")
}

pub fn node_dir(lab: &str, node: &str) -> PathBuf {
    crate::spec::state_dir(lab).join("nodes").join(node)
}

pub async fn up(opts: UpOptions) -> Result<LabState> {
    opts.spec.validate()?;
    let name = opts.spec.name.clone();
    if let Ok(Some(st)) = LabState::load(&opts.spec.state_dir()) {
        if st.processes.iter().all(|p| p.is_running()) {
            bail!(
                "lab {name} is already up (kubeconfig {}); run `kubeshift lab down --name {name}` first",
                st.kubeconfig.display()
            );
        }
    }
    if down::exists(&opts.spec) {
        tracing::info!("removing leftovers of an earlier lab {name}");
        down::down(&name)?;
    }
    match build(&opts).await {
        Ok(st) => Ok(st),
        Err(e) if opts.keep_on_failure => Err(e.context(format!(
            "lab up failed; left in place for debugging (remove with `kubeshift lab down --name {name}`)"
        ))),
        Err(e) => {
            let logs = crate::spec::state_dir(&name).join("logs");
            let hint = std::fs::read_dir(&logs)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| format!("--- {}\n{}", e.path().display(), sys::tail(&e.path(), 8)))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            if let Err(d) = down::down(&name) {
                tracing::error!("cleaning up after the failure: {d:#}");
            }
            Err(e.context(format!("lab up failed and was rolled back; last log lines:\n{hint}")))
        }
    }
}

async fn build(opts: &UpOptions) -> Result<LabState> {
    let spec = &opts.spec;
    let dir = spec.state_dir();
    std::fs::create_dir_all(dir.join("logs"))?;
    for b in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"] {
        control_plane::binary(b)?;
    }

    let cgroup = down::cgroup_dir(&spec.name).context("cgroup v2")?;
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    let mut state = LabState {
        spec: spec.clone(),
        api_port: 0,
        kubeconfig: kubeconfig_path(&spec.name),
        cgroup: cgroup.clone(),
        processes: vec![],
    };
    state.save()?;

    // --- credentials --------------------------------------------------------------
    let san: Vec<IpAddr> = vec!["127.0.0.1".parse()?, IpAddr::V4(spec.apiserver_ip()), KUBERNETES_SERVICE_IP.parse()?];
    let pki = pki::write(&dir.join("pki"), &san)?;
    let ca_pem = std::fs::read_to_string(pki.ca())?;
    let admin = pki::random_token()?;
    let cm = pki::random_token()?;
    let sched = pki::random_token()?;
    let mut ids = vec![
        Identity { token: admin.clone(), user: "kubeshift-lab-admin".into(), groups: vec!["system:masters".into()] },
        // No service-account token controller runs, so the controllers share one
        // privileged identity instead of per-controller service accounts.
        Identity {
            token: cm.clone(),
            user: "kubeshift-lab-controller-manager".into(),
            groups: vec!["system:masters".into()],
        },
        Identity { token: sched.clone(), user: "system:kube-scheduler".into(), groups: vec![] },
    ];
    let local = format!("https://127.0.0.1:{APISERVER_PORT}");
    let cm_kc = dir.join("controller-manager.kubeconfig");
    let sched_kc = dir.join("scheduler.kubeconfig");
    std::fs::write(&cm_kc, pki::kubeconfig(&local, &ca_pem, "controller-manager", &cm, "lab"))?;
    std::fs::write(&sched_kc, pki::kubeconfig(&local, &ca_pem, "scheduler", &sched, "lab"))?;
    for node in spec.node_names() {
        let token = pki::random_token()?;
        let nd = node_dir(&spec.name, &node);
        std::fs::create_dir_all(&nd)?;
        std::fs::write(
            nd.join("kubelet.kubeconfig"),
            pki::kubeconfig(&spec.apiserver_url(), &ca_pem, &format!("system:node:{node}"), &token, "lab"),
        )?;
        ids.push(Identity { token, user: format!("system:node:{node}"), groups: vec!["system:nodes".into()] });
    }
    pki::write_tokens(&pki, &ids)?;

    // --- wires ----------------------------------------------------------------------
    topology::create_underlay(spec)?;
    topology::setup_control_plane(spec)?;
    for (i, node) in spec.node_names().iter().enumerate() {
        topology::setup_node(spec, i, node)?;
    }

    // --- control plane --------------------------------------------------------------
    let files = ControlPlaneFiles {
        dir: &dir,
        pki: &pki,
        controller_manager_kubeconfig: cm_kc,
        scheduler_kubeconfig: sched_kc,
    };
    state.add_process(control_plane::start_etcd(spec, &files)?)?;
    state.add_process(control_plane::start_apiserver(spec, &files)?)?;
    let port_file = dir.join("api-port");
    let mut fwd = Command::new(&opts.self_exe);
    fwd.args(["lab", "forward", "--name", &spec.name, "--port", &spec.api_port.to_string()]);
    sys::confine(&mut fwd, None, None)?;
    state.add_process(sys::spawn_daemon("apiserver-forwarder", fwd, &dir.join("logs/forwarder.log"))?)?;
    let port = wait_port_file(&port_file).await?;
    state.api_port = port;
    std::fs::write(
        &state.kubeconfig,
        pki::kubeconfig(
            &format!("https://127.0.0.1:{port}"),
            &ca_pem,
            "admin",
            &admin,
            &format!("kubeshift-lab-{}", spec.name),
        ),
    )?;
    state.save()?;

    let client = api::client_from(&state.kubeconfig).await?;
    api::wait_ready(&client, Duration::from_secs(90)).await?;
    tracing::info!("apiserver ready on 127.0.0.1:{port}");

    state.add_process(control_plane::start_controller_manager(spec, &files)?)?;
    state.add_process(control_plane::start_scheduler(spec, &files)?)?;

    // --- cluster objects as a real install has them --------------------------------
    let vars = vec![
        ("CLUSTER_CIDR", spec.cni.cluster_cidr().to_string()),
        ("SERVICE_CIDR", SERVICE_CIDR.to_string()),
        ("API_SERVER", spec.apiserver_url()),
    ];
    apply(&client, "lab-rbac.yaml", MANIFEST_RBAC, &vars).await?;
    apply(&client, "kubernetes-endpoints", &kubernetes_endpoints(spec), &vars).await?;
    apply(&client, "kube-proxy.yaml", MANIFEST_KUBE_PROXY, &vars).await?;
    match spec.cni {
        Cni::Flannel => apply(&client, "flannel.yaml", MANIFEST_FLANNEL, &vars).await?,
        Cni::Calico => {
            apply(&client, "calico-crds.yaml", MANIFEST_CALICO_CRDS, &vars).await?;
            // Custom resources can only be applied once discovery serves their kinds.
            api::wait_for("Calico CRDs to be served", Duration::from_secs(60), || {
                let client = client.clone();
                let vars = vars.clone();
                async move {
                    Ok(api::apply_yaml(&client, "calico.yaml", &api::render("calico.yaml", MANIFEST_CALICO, &vars)?)
                        .await
                        .ok()
                        .map(|_| ()))
                }
            })
            .await?;
        }
    }

    // --- nodes ------------------------------------------------------------------------
    for node in spec.node_names() {
        let mut k = Command::new(&opts.self_exe);
        k.args(["lab", "kubelet", "--name", &spec.name, "--node", &node]);
        k.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        sys::confine(&mut k, Some(&spec.netns_node(&node)), None)?;
        state.add_process(sys::spawn_daemon(
            &format!("kubelet-{node}"),
            k,
            &dir.join(format!("logs/kubelet-{node}.log")),
        )?)?;
    }
    wait_nodes_ready(&client, spec).await?;
    wait_daemonsets(&client, spec).await?;

    if spec.demo {
        apply(&client, "demo.yaml", MANIFEST_DEMO, &vars).await?;
        wait_deployments(&client, &["demo-frontend", "demo-backend"], Duration::from_secs(120)).await?;
    }
    Ok(state)
}

async fn apply(client: &Client, name: &str, template: &str, vars: &[(&str, String)]) -> Result<()> {
    let yaml = api::render(name, template, vars)?;
    let done = api::apply_yaml(client, name, &yaml).await?;
    tracing::info!("applied {name}: {}", done.join(", "));
    Ok(())
}

/// `--endpoint-reconciler-type=none` leaves the `kubernetes` Service without
/// endpoints; the lab writes them so pods can reach the API through its ClusterIP.
/// The controller-manager mirrors them into an EndpointSlice for kube-proxy.
fn kubernetes_endpoints(spec: &LabSpec) -> String {
    format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: kubernetes\n  namespace: default\nsubsets:\n- addresses:\n  - ip: {}\n  ports:\n  - name: https\n    port: {APISERVER_PORT}\n    protocol: TCP\n",
        spec.apiserver_ip()
    )
}

async fn wait_port_file(p: &Path) -> Result<u16> {
    let p = p.to_path_buf();
    api::wait_for("the apiserver forwarder to listen", Duration::from_secs(10), || {
        let p = p.clone();
        async move { Ok(std::fs::read_to_string(&p).ok().and_then(|s| s.trim().parse().ok())) }
    })
    .await
}

async fn wait_nodes_ready(client: &Client, spec: &LabSpec) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let want = spec.nodes;
    api::wait_for(&format!("{want} nodes to be Ready"), Duration::from_secs(180), || {
        let nodes = nodes.clone();
        async move {
            let list = nodes.list(&ListParams::default()).await?;
            let ready = list.items.iter().filter(|n| crate::kubelet::node_is_ready(n)).count();
            Ok((ready >= want).then_some(()))
        }
    })
    .await
}

async fn wait_daemonsets(client: &Client, spec: &LabSpec) -> Result<()> {
    let mut sets = vec![("kube-system", "kube-proxy", "k8s-app=kube-proxy")];
    match spec.cni {
        Cni::Flannel => sets.push(("kube-flannel", "kube-flannel-ds", "app=flannel")),
        Cni::Calico => sets.push(("kube-system", "calico-node", "k8s-app=calico-node")),
    }
    for (ns, name, selector) in sets {
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
        let want = spec.nodes;
        let r =
            api::wait_for(&format!("DaemonSet {ns}/{name} ready on {want} nodes"), Duration::from_secs(180), || {
                let (api, pods) = (api.clone(), pods.clone());
                async move {
                    let ds = api.get(name).await?;
                    let counted = ds.status.as_ref().map(|s| s.number_ready).unwrap_or(0) as usize;
                    // The DaemonSet controller's status write can lag far behind its pods on a
                    // loaded machine (once seen in CI: both pods Ready, numberReady short for
                    // 180 s), so the pods themselves count as well.
                    let owned = pods.list(&ListParams::default().labels(selector)).await?;
                    Ok((counted >= want || ready_nodes(&owned.items, &ds) >= want).then_some(()))
                }
            })
            .await;
        if let Err(e) = r {
            return Err(e.context(pod_states(client, ns, name, selector).await));
        }
    }
    Ok(())
}

/// Distinct nodes with a Ready pod owned by `ds`.
fn ready_nodes(pods: &[k8s_openapi::api::core::v1::Pod], ds: &DaemonSet) -> usize {
    let owned_by_ds = |p: &k8s_openapi::api::core::v1::Pod| {
        p.metadata.owner_references.iter().flatten().any(|o| Some(&o.uid) == ds.metadata.uid.as_ref())
    };
    pods.iter()
        .filter(|p| owned_by_ds(p) && pod_is_ready(p))
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn pod_is_ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    let conds = p.status.as_ref().and_then(|s| s.conditions.as_ref());
    conds.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What the DaemonSet wait looked at, for its timeout message: the DaemonSet's status
/// numbers and, per pod, its node, owner, Ready condition and containers, so a failed
/// wait says why it did not count a pod.
async fn pod_states(client: &Client, ns: &str, name: &str, selector: &str) -> String {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let ds = match sets.get(name).await {
        Ok(ds) => ds,
        Err(e) => return format!("DaemonSet {ns}/{name} could not be read: {e}"),
    };
    let st = ds.status.clone().unwrap_or_default();
    let mut out = vec![format!(
        "DaemonSet {ns}/{name} uid {}: generation {} observed {}, desired {} scheduled {} ready {} available {} updated {}",
        ds.metadata.uid.as_deref().unwrap_or("?"),
        ds.metadata.generation.unwrap_or(0),
        st.observed_generation.unwrap_or(0),
        st.desired_number_scheduled,
        st.current_number_scheduled,
        st.number_ready,
        st.number_available.unwrap_or(0),
        st.updated_number_scheduled.unwrap_or(0),
    )];
    match pods.list(&ListParams::default().labels(selector)).await {
        Ok(l) => out.extend(l.items.iter().map(|p| pod_line(p, &ds))),
        Err(e) => out.push(format!("pods of {selector} could not be listed: {e}")),
    }
    out.join("\n")
}

fn pod_line(p: &k8s_openapi::api::core::v1::Pod, ds: &DaemonSet) -> String {
    let st = p.status.clone().unwrap_or_default();
    let ready = st.conditions.iter().flatten().find(|c| c.type_ == "Ready").map(|c| {
        format!(
            "Ready={} ({}{}since {})",
            c.status,
            c.reason.as_deref().map(|r| format!("{r}, ")).unwrap_or_default(),
            c.message.as_deref().map(|m| format!("{m}, ")).unwrap_or_default(),
            c.last_transition_time.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| "?".into())
        )
    });
    let owner = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .map(|o| {
            let ours = if Some(&o.uid) == ds.metadata.uid.as_ref() { "this DaemonSet" } else { "another owner" };
            format!("{}/{} ({ours})", o.kind, o.name)
        })
        .collect::<Vec<_>>();
    let containers: Vec<String> = st
        .container_statuses
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.message.clone());
            format!(
                "{} ready={} restarts={}{}",
                c.name,
                c.ready,
                c.restart_count,
                waiting.map(|w| format!(" {w}")).unwrap_or_default()
            )
        })
        .collect();
    format!(
        "{} on {}: {} {}, owner {}, containers: {}",
        p.metadata.name.as_deref().unwrap_or(""),
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("(unscheduled)"),
        st.phase.unwrap_or_default(),
        ready.unwrap_or_else(|| "no Ready condition".into()),
        if owner.is_empty() { "none".to_string() } else { owner.join(", ") },
        containers.join("; ")
    )
}

pub async fn wait_deployments(client: &Client, namespaces: &[&str], timeout: Duration) -> Result<()> {
    for ns in namespaces {
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        api::wait_for(&format!("Deployments in {ns} to be available"), timeout, || {
            let api = api.clone();
            async move {
                let list = api.list(&ListParams::default()).await?;
                if list.items.is_empty() {
                    return Ok(None);
                }
                let all = list.items.iter().all(|d| {
                    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0) >= want
                });
                Ok(all.then_some(()))
            }
        })
        .await?;
    }
    Ok(())
}
