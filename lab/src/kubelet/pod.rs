//! One pod's life on a lab node: sandbox (netns + CNI), volumes, init containers,
//! containers (as processes in the pod netns and a per-pod cgroup v2), readiness,
//! status reports, and teardown when the pod is deleted.

use super::images::{self, ResolveInput};
use super::volumes::{self, PodFiles};
use super::NodeCtx;
use crate::sys;
use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::watch;

struct Sandbox {
    netns: Option<String>,
    cni_conf: Option<Value>,
    cni_result: Value,
    ip: String,
}

struct Running {
    name: String,
    image: String,
    child: Option<Child>,
    restarts: i32,
    started_at: Option<String>,
    last_exit: Option<i32>,
    exited_at: Option<Instant>,
    ready: bool,
    probe: Option<Probe>,
    initial_delay: Duration,
    started: Instant,
}

#[derive(Clone)]
enum Probe {
    Tcp(u16),
    Http(u16, String),
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or(""))
}

/// Drives one pod until it is deleted. `rx` carries every update of the pod object;
/// `None` means it is gone from the API.
pub async fn run(ctx: Arc<NodeCtx>, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(first) = rx.borrow().clone() else { return };
    let k = key(&first);
    let dir = ctx.dir.join("pods").join(uid(&first));
    let cgroup = ctx.cgroup.join(format!("pod-{}", uid(&first)));
    let mut sandbox: Option<Sandbox> = None;
    let mut containers: Vec<Running> = vec![];
    let mut last_status = Value::Null;
    // resourceVersion of our last status write, to tell "the watch has not shown our write
    // yet" from "someone changed the status after it".
    let mut written_rv: Option<String> = None;
    let mut init_done = false;
    // The node loop dropped this pod's sender: the pod is gone from the API.
    let mut gone = false;

    loop {
        let pod = if gone { None } else { rx.borrow().clone() };
        let deleting = pod.as_ref().map(|p| p.metadata.deletion_timestamp.is_some()).unwrap_or(true);
        if deleting {
            let grace =
                pod.as_ref().and_then(|p| p.metadata.deletion_grace_period_seconds).unwrap_or(30).clamp(0, 10) as u64;
            stop_all(&mut containers, Duration::from_secs(grace)).await;
            if let Some(sb) = sandbox.take() {
                teardown_sandbox(&ctx, &first, sb);
            }
            let _ = sys::cgroup_remove_tree(&cgroup);
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(p) = pod {
                // The kubelet makes the final delete once everything is gone.
                let api: Api<Pod> =
                    Api::namespaced(ctx.client.clone(), p.metadata.namespace.as_deref().unwrap_or("default"));
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions { uid: p.metadata.uid.clone(), resource_version: None }),
                    ..Default::default()
                };
                if let Err(e) = api.delete(p.metadata.name.as_deref().unwrap_or(""), &dp).await {
                    tracing::debug!("final delete of {k}: {e}");
                }
            }
            tracing::info!("pod {k} removed");
            return;
        }
        let pod = pod.unwrap();

        let step: Result<()> = async {
            if sandbox.is_none() {
                sandbox = Some(setup(&ctx, &pod, &dir, &cgroup).await?);
            }
            let sb = sandbox.as_ref().unwrap();
            if !init_done {
                run_init_containers(&ctx, &pod, &dir, &cgroup, sb).await?;
                init_done = true;
                containers = start_containers(&ctx, &pod, &dir, &cgroup, sb).await?;
                if let Some(d) = super::status_delay() {
                    // A real kubelet reports a new pod's IP on its next PLEG relist (up
                    // to a second later) while the containers already run; the lab can
                    // widen that window so tests can look into it.
                    tokio::time::sleep(d).await;
                }
            }
            supervise(&ctx, &pod, &dir, &cgroup, sb, &mut containers).await?;
            Ok(())
        }
        .await;
        let status = match &step {
            Ok(()) => running_status(&ctx, &pod, sandbox.as_ref(), &containers),
            Err(e) => {
                tracing::warn!("pod {k}: {e:#}");
                waiting_status(&ctx, &pod, &format!("{e:#}"))
            }
        };
        // Ours is not the only hand on a pod's status: kube-controller-manager's node
        // lifecycle controller sets Ready=False on every pod updated while its node is not
        // Ready (1.20 `processPod` -> `MarkPodsNotReady`). A hostNetwork pod (kube-proxy,
        // flanneld) starts before its node has a CNI config, so on a loaded machine its
        // Ready=True can land while the node is still NotReady and be overwritten at once;
        // comparing only with what we last wrote left it NotReady for good (the lab's
        // DaemonSet wait then timed out with every container ready). Like the real kubelet's
        // status manager, compare with what the API holds once it has shown our write.
        let drifted = written_rv.as_deref().is_some_and(|rv| shows_write(&pod, rv)) && !api_agrees(&status, &pod);
        if drifted {
            tracing::info!(
                "pod {k}: status in the API differs from the node's (changed by another writer); writing it again"
            );
        }
        if status != last_status || drifted {
            let api: Api<Pod> =
                Api::namespaced(ctx.client.clone(), pod.metadata.namespace.as_deref().unwrap_or("default"));
            match api
                .patch_status(
                    pod.metadata.name.as_deref().unwrap_or(""),
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": status})),
                )
                .await
            {
                Ok(written) => {
                    last_status = status;
                    written_rv = written.metadata.resource_version;
                }
                Err(e) => tracing::warn!("status of {k}: {e}"),
            }
        }
        let wait = if step.is_err() { Duration::from_secs(2) } else { Duration::from_millis(500) };
        tokio::select! {
            r = rx.changed() => if r.is_err() { gone = true },
            _ = tokio::time::sleep(wait) => {},
        }
    }
}

fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)
}

async fn setup(ctx: &NodeCtx, pod: &Pod, dir: &PathBuf, cgroup: &PathBuf) -> Result<Sandbox> {
    // Processes of this pod left by an earlier kubelet run (host-network ones do not
    // die with a pod netns) are stopped before the pod is started again.
    sys::cgroup_remove_tree(cgroup)?;
    std::fs::create_dir_all(dir)?;
    std::fs::create_dir_all(cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    if host_network(pod) {
        return Ok(Sandbox { netns: None, cni_conf: None, cni_result: Value::Null, ip: ctx.node_ip.to_string() });
    }
    let cni = ctx.cni();
    let (_, conf) =
        cni.default_conf()?.ok_or_else(|| anyhow!("network plugin is not ready: cni config uninitialized"))?;
    let netns = crate::spec::pod_netns(&ctx.lab.name, &uid(pod));
    if sys::netns_exists(&netns) {
        // Left by an earlier kubelet run: start from a clean sandbox.
        sys::netns_delete(&netns)?;
    }
    sys::netns_add(&netns)?;
    let nspath = sys::netns_path(&netns);
    let u = uid(pod);
    let att = attachment(pod, &u, &nspath);
    let result = match cni.add(&conf, &att) {
        Ok(r) => r,
        Err(e) => {
            let _ = cni.del(&conf, &att, &Value::Null);
            let _ = sys::netns_delete(&netns);
            return Err(e);
        }
    };
    std::fs::write(dir.join("cni-result.json"), serde_json::to_vec(&result)?)?;
    let ip = super::cni::result_ipv4(&result).ok_or_else(|| anyhow!("CNI result has no IPv4 address: {result}"))?;
    Ok(Sandbox { netns: Some(netns), cni_conf: Some(conf), cni_result: result, ip })
}

fn attachment<'a>(pod: &'a Pod, uid: &'a str, nspath: &'a std::path::Path) -> super::cni::Attachment<'a> {
    super::cni::Attachment {
        container_id: uid,
        netns_path: nspath,
        ifname: "eth0",
        pod_namespace: pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod_name: pod.metadata.name.as_deref().unwrap_or(""),
        pod_uid: uid,
    }
}

fn teardown_sandbox(ctx: &NodeCtx, pod: &Pod, sb: Sandbox) {
    if let (Some(netns), Some(conf)) = (&sb.netns, &sb.cni_conf) {
        let u = uid(pod);
        let nspath = sys::netns_path(netns);
        if let Err(e) = ctx.cni().del(conf, &attachment(pod, &u, &nspath), &sb.cni_result) {
            tracing::warn!("CNI DEL for {}: {e:#}", key(pod));
        }
        if let Err(e) = sys::netns_delete(netns) {
            tracing::warn!("removing netns {netns}: {e:#}");
        }
    }
}

async fn prepare(
    ctx: &NodeCtx,
    pod: &Pod,
    dir: &Path,
    c: &Container,
    sb: &Sandbox,
) -> Result<(Vec<String>, Vec<(String, String)>)> {
    let files: PodFiles = volumes::materialise(ctx, pod, dir).await?;
    let env = volumes::environment(ctx, pod, c, &sb.ip).await?;
    let paths = volumes::path_map(&files, c);
    let command: Vec<String> = c.command.iter().flatten().map(|s| volumes::expand(s, &env)).collect();
    let args: Vec<String> = c.args.iter().flatten().map(|s| volumes::expand(s, &env)).collect();
    let pod_kubeconfig = dir.join("pod.kubeconfig");
    let token_file = files.service_account.as_ref().map(|s| s.join("token"));
    let token = token_file.and_then(|t| std::fs::read_to_string(t).ok()).unwrap_or_default();
    std::fs::write(
        &pod_kubeconfig,
        crate::pki::kubeconfig(&ctx.lab.apiserver_url(), &ctx.ca_pem, "pod", &token, "lab"),
    )?;
    let program = images::resolve(
        ctx,
        &ResolveInput {
            container: c,
            command,
            args,
            env: &env,
            paths: &paths,
            pod_dir: dir,
            pod_kubeconfig: &pod_kubeconfig,
        },
    )?;
    let mut env = env;
    env.extend(program.env);
    Ok((program.argv, env))
}

fn spawn(
    ctx: &NodeCtx,
    dir: &Path,
    cgroup: &Path,
    sb: &Sandbox,
    name: &str,
    argv: &[String],
    env: &[(String, String)],
) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log")))?;
    let mut std_cmd = std::process::Command::new(&argv[0]);
    std_cmd.args(&argv[1..]).env_clear().envs(env.iter().map(|(k, v)| (k, v))).current_dir(dir);
    std_cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    sys::confine(&mut std_cmd, sb.netns.as_deref(), Some(cgroup))?;
    let mut cmd = Command::from(std_cmd);
    cmd.kill_on_drop(true);
    let _ = ctx;
    cmd.spawn().with_context(|| format!("starting container {name}: {argv:?}"))
}

async fn run_init_containers(ctx: &NodeCtx, pod: &Pod, dir: &Path, cgroup: &Path, sb: &Sandbox) -> Result<()> {
    for c in pod.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default() {
        let (argv, env) = prepare(ctx, pod, dir, &c, sb).await?;
        let mut child = spawn(ctx, dir, cgroup, sb, &c.name, &argv, &env)?;
        let st = child.wait().await?;
        if !st.success() {
            return Err(anyhow!(
                "init container {} exited with {st}; see {}",
                c.name,
                dir.join(format!("{}.log", c.name)).display()
            ));
        }
    }
    Ok(())
}

fn probe_of(c: &Container) -> (Option<Probe>, Duration) {
    let Some(p) = &c.readiness_probe else { return (None, Duration::ZERO) };
    let port = |ip: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| -> Option<u16> {
        match ip {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => Some(*i as u16),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .map(|cp| cp.container_port as u16),
        }
    };
    let probe = if let Some(t) = &p.tcp_socket {
        port(&t.port).map(Probe::Tcp)
    } else if let Some(h) = &p.http_get {
        port(&h.port).map(|po| Probe::Http(po, h.path.clone().unwrap_or_else(|| "/".into())))
    } else {
        None
    };
    (probe, Duration::from_secs(p.initial_delay_seconds.unwrap_or(0) as u64))
}

async fn start_containers(ctx: &NodeCtx, pod: &Pod, dir: &Path, cgroup: &Path, sb: &Sandbox) -> Result<Vec<Running>> {
    let mut out = vec![];
    for c in pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default() {
        let (argv, env) = prepare(ctx, pod, dir, &c, sb).await?;
        let child = spawn(ctx, dir, cgroup, sb, &c.name, &argv, &env)?;
        let (probe, initial_delay) = probe_of(&c);
        out.push(Running {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            child: Some(child),
            restarts: 0,
            started_at: Some(now()),
            last_exit: None,
            exited_at: None,
            ready: false,
            probe,
            initial_delay,
            started: Instant::now(),
        });
    }
    Ok(out)
}

/// Reaps exited containers (restarting them per restartPolicy) and runs readiness
/// probes from the node's netns, as the kubelet does.
async fn supervise(
    ctx: &NodeCtx,
    pod: &Pod,
    dir: &Path,
    cgroup: &Path,
    sb: &Sandbox,
    cs: &mut [Running],
) -> Result<()> {
    let policy = pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into());
    for r in cs.iter_mut() {
        if let Some(child) = r.child.as_mut() {
            if let Some(st) = child.try_wait()? {
                let code = st.code().unwrap_or(128 + st.signal_number());
                tracing::info!("container {}/{} exited with {code}", key(pod), r.name);
                r.child = None;
                r.last_exit = Some(code);
                r.exited_at = Some(Instant::now());
                r.ready = false;
            }
        }
        let restart = match policy.as_str() {
            "Always" => r.child.is_none(),
            "OnFailure" => r.child.is_none() && r.last_exit.unwrap_or(0) != 0,
            _ => false,
        };
        // Back off like the kubelet's CrashLoopBackOff, capped low for a lab.
        let backoff = Duration::from_millis(500 * 2u64.pow(r.restarts.clamp(0, 5) as u32)).min(Duration::from_secs(10));
        if restart && r.last_exit.is_some() && r.exited_at.map(|t| t.elapsed() >= backoff).unwrap_or(true) {
            let c = pod.spec.as_ref().unwrap().containers.iter().find(|c| c.name == r.name).cloned().unwrap();
            let (argv, env) = prepare(ctx, pod, dir, &c, sb).await?;
            r.child = Some(spawn(ctx, dir, cgroup, sb, &r.name, &argv, &env)?);
            r.restarts += 1;
            r.started_at = Some(now());
            r.started = Instant::now();
            r.last_exit = None;
        }
        if r.child.is_some() {
            r.ready = match &r.probe {
                None => true,
                Some(_) if r.started.elapsed() < r.initial_delay => false,
                Some(p) => probe(&sb.ip, p.clone()).await,
            };
        }
    }
    Ok(())
}

trait SignalNumber {
    fn signal_number(&self) -> i32;
}
impl SignalNumber for std::process::ExitStatus {
    fn signal_number(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        self.signal().unwrap_or(0)
    }
}

async fn probe(ip: &str, p: Probe) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = match &p {
        Probe::Tcp(p) | Probe::Http(p, _) => *p,
    };
    let conn = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect((ip, port))).await;
    let Ok(Ok(mut s)) = conn else { return false };
    match p {
        Probe::Tcp(_) => true,
        Probe::Http(_, path) => {
            let req = format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\nUser-Agent: kube-probe/1.20\r\n\r\n");
            if s.write_all(req.as_bytes()).await.is_err() {
                return false;
            }
            let mut buf = vec![0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            head.split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .map(|c| (200..400).contains(&c))
                .unwrap_or(false)
        }
    }
}

async fn stop_all(cs: &mut [Running], grace: Duration) {
    let pids: Vec<i32> = cs.iter().filter_map(|r| r.child.as_ref().and_then(|c| c.id())).map(|p| p as i32).collect();
    for &p in &pids {
        sys::terminate(p);
    }
    let deadline = Instant::now() + grace;
    for r in cs.iter_mut() {
        if let Some(mut child) = r.child.take() {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

fn conditions(ready: bool, initialized: bool) -> Value {
    let t = now();
    let b = |x: bool| if x { "True" } else { "False" };
    json!([
        {"type": "Initialized", "status": b(initialized), "lastTransitionTime": t},
        {"type": "Ready", "status": b(ready), "lastTransitionTime": t},
        {"type": "ContainersReady", "status": b(ready), "lastTransitionTime": t},
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
    ])
}

/// Status with times left out of the comparison: only a real change is patched.
fn running_status(ctx: &NodeCtx, pod: &Pod, sb: Option<&Sandbox>, cs: &[Running]) -> Value {
    let policy = pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into());
    let all_ready = !cs.is_empty() && cs.iter().all(|r| r.ready);
    let all_exited = !cs.is_empty() && cs.iter().all(|r| r.child.is_none() && r.last_exit.is_some());
    let phase = if all_exited && policy != "Always" {
        if cs.iter().all(|r| r.last_exit == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else {
        "Running"
    };
    let statuses: Vec<Value> = cs
        .iter()
        .map(|r| {
            let state = match (&r.child, r.last_exit) {
                (Some(_), _) => json!({"running": {"startedAt": r.started_at}}),
                (None, Some(code)) => {
                    json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}})
                }
                (None, None) => json!({"waiting": {"reason": "ContainerCreating"}}),
            };
            json!({
                "name": r.name, "image": r.image, "imageID": format!("kubeshift-lab://{}", r.image),
                "containerID": format!("kubeshift-lab://{}-{}", uid(pod), r.name),
                "ready": r.ready, "started": r.child.is_some(), "restartCount": r.restarts, "state": state,
            })
        })
        .collect();
    let ip = sb.map(|s| s.ip.clone()).unwrap_or_default();
    let mut conds = conditions(all_ready && phase == "Running", true);
    strip_times(&mut conds);
    json!({
        "phase": phase,
        "hostIP": ctx.node_ip.to_string(),
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).map(|t| serde_json::to_value(t).unwrap()).unwrap_or_else(|| json!(now())),
        "conditions": conds,
        "containerStatuses": statuses,
    })
}

fn waiting_status(ctx: &NodeCtx, pod: &Pod, message: &str) -> Value {
    let statuses: Vec<Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({"name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"waiting": {"reason": "ContainerCreating", "message": message}}})
        })
        .collect();
    let mut conds = conditions(false, false);
    strip_times(&mut conds);
    json!({"phase": "Pending", "hostIP": ctx.node_ip.to_string(), "conditions": conds, "containerStatuses": statuses, "message": message})
}

/// Whether `pod` (from the watch) is our write of `rv` or newer. The lab's apiserver is
/// backed by etcd, whose resourceVersions are its revisions: integers that only grow. The
/// API asks clients not to compare them; a kubelet stand-in of one known apiserver may.
fn shows_write(pod: &Pod, rv: &str) -> bool {
    match (pod.metadata.resource_version.as_deref().map(str::parse::<u64>), rv.parse::<u64>()) {
        (Some(Ok(seen)), Ok(ours)) => seen >= ours,
        _ => true,
    }
}

/// Whether the API's status says what the node says on the points others can change:
/// phase, each condition's status and each container's readiness.
fn api_agrees(wanted: &Value, pod: &Pod) -> bool {
    let have = pod.status.as_ref().map(|s| serde_json::to_value(s).unwrap_or_default()).unwrap_or_default();
    let conditions = |v: &Value| -> std::collections::BTreeMap<String, String> {
        v["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c["type"].as_str().unwrap_or("").to_string(), c["status"].as_str().unwrap_or("").to_string()))
            .collect()
    };
    let ready = |v: &Value| -> std::collections::BTreeMap<String, bool> {
        v["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c["name"].as_str().unwrap_or("").to_string(), c["ready"].as_bool().unwrap_or(false)))
            .collect()
    };
    wanted["phase"] == have["phase"] && conditions(wanted) == conditions(&have) && ready(wanted) == ready(&have)
}

fn strip_times(v: &mut Value) {
    // Transition times would make every status differ from the last; the apiserver
    // keeps the times it has when we omit them.
    if let Some(a) = v.as_array_mut() {
        for c in a {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastTransitionTime");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_with(status: Value, rv: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "resourceVersion": rv}, "status": status})).unwrap()
    }

    fn wanted() -> Value {
        let mut conds = conditions(true, true);
        strip_times(&mut conds);
        json!({"phase": "Running", "conditions": conds, "containerStatuses": [{"name": "c", "ready": true}]})
    }

    #[test]
    fn a_ready_condition_set_false_by_another_writer_is_a_drift() {
        let ours = pod_with(wanted(), "10");
        assert!(api_agrees(&wanted(), &ours));
        // What the node lifecycle controller's MarkPodsNotReady leaves: containers ready,
        // the Ready condition False.
        let mut marked = wanted();
        marked["conditions"][1]["status"] = json!("False");
        marked["conditions"][1]["lastTransitionTime"] = json!("2026-12-02T05:13:10Z");
        assert!(!api_agrees(&wanted(), &pod_with(marked, "11")));
        let mut container = wanted();
        container["containerStatuses"][0]["ready"] = json!(false);
        assert!(!api_agrees(&wanted(), &pod_with(container, "11")));
    }

    #[test]
    fn only_a_pod_at_or_after_our_write_counts() {
        assert!(!shows_write(&pod_with(wanted(), "9"), "10"));
        assert!(shows_write(&pod_with(wanted(), "10"), "10"));
        assert!(shows_write(&pod_with(wanted(), "12"), "10"));
        // Not an integer: no order to rely on, so the comparison is made.
        assert!(shows_write(&pod_with(wanted(), "x"), "10"));
    }
}
