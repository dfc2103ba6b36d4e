//! Shared by the lab tests: run the real `kubeshift` binary, talk to the lab's real
//! apiserver, look into node and pod network namespaces. Each test owns a lab with a
//! unique name and a guard that runs `kubeshift lab down` even when the test fails.

#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::Client;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The binary under test. `KUBESHIFT_TEST_BIN` overrides cargo's path, for a
/// target directory shared by several worktrees, where another build may replace
/// `target/debug/kubeshift` while these tests run.
pub fn kubeshift() -> Command {
    match std::env::var_os("KUBESHIFT_TEST_BIN") {
        Some(bin) => Command::new(bin),
        None => Command::new(env!("CARGO_BIN_EXE_kubeshift")),
    }
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running kubeshift");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Tears the lab down when dropped (test passed or panicked). Labs of one test
/// binary run one at a time: two clusters at once on two cores only measure the
/// machine's load.
pub struct Lab {
    pub name: String,
    _turn: Option<std::sync::MutexGuard<'static, ()>>,
}

static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Lab {
    /// A handle that only cleans up (for a lab some other process starts).
    pub fn named(name: &str) -> Lab {
        Lab { name: name.to_string(), _turn: None }
    }

    pub fn up(name: &str, args: &[&str]) -> Lab {
        Self::up_with_env(name, args, &[])
    }

    /// `up`, with environment variables for the lab's processes (they inherit them).
    pub fn up_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Lab {
        let turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let lab = Lab { name: name.to_string(), _turn: Some(turn) };
        let mut c = kubeshift();
        c.args(["lab", "up", "--name", name]).args(args).envs(env.iter().copied());
        run_ok(&mut c);
        lab
    }

    pub fn kubeconfig(&self) -> std::path::PathBuf {
        kubeshift_lab::up::kubeconfig_path(&self.name)
    }

    pub async fn client(&self) -> Client {
        kubeshift_lab::api::client_from(&self.kubeconfig()).await.expect("lab client")
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("ks-{}-{node}", self.name)
    }

    pub fn iptables_save(&self, node: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node_netns(node), "iptables-save"])
            .output()
            .expect("iptables-save");
        assert!(out.status.success(), "iptables-save in {node}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn down(&self) -> Vec<String> {
        let _ = kubeshift().args(["lab", "down", "--name", &self.name]).output();
        kubeshift_lab::down::leftovers(&self.name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let left = self.down();
        if !left.is_empty() && !std::thread::panicking() {
            panic!("lab {} left things behind: {left:?}", self.name);
        }
    }
}

/// Polls `f` until it yields a value; the message says what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what} {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kubeshift install manifests ARGS | kubectl apply -f -` against the lab, as a user
/// would install the agent.
pub fn install_agent(lab: &Lab, args: &[&str]) {
    let manifests = run_ok(kubeshift().args(["install", "manifests"]).args(args)).stdout;
    let mut apply = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    std::io::Write::write_all(apply.stdin.as_mut().unwrap(), &manifests).unwrap();
    let out = apply.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
}

pub async fn ready_pod(client: &Client, ns: &str, selector: &str) -> Result<Option<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(list.items.into_iter().find(|p| {
        p.metadata.deletion_timestamp.is_none()
            && p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .map(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                .unwrap_or(false)
    }))
}

pub fn pod_netns(lab: &str, pod: &Pod) -> String {
    kubeshift_lab::spec::pod_netns(lab, pod.metadata.uid.as_deref().unwrap())
}

/// An HTTP GET made from inside a network namespace (a pod or a node): real packets
/// through that namespace's routes and the node's kube-proxy rules.
pub fn http_get_from(netns: &str, addr: SocketAddr, path: &str) -> Result<String> {
    let path = path.to_string();
    kubeshift_lab::sys::in_netns(netns, move || -> Result<String> {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let Some((head, body)) = buf.split_once("\r\n\r\n") else { bail!("no HTTP response from {addr}: {buf:?}") };
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{addr}{path}: {head}");
        }
        Ok(body.to_string())
    })?
}

// --- kubeshift's datapath on a lab node ------------------------------------------

/// The agent child process; stopped by its PID when dropped.
pub struct Agent {
    child: Child,
}

impl Agent {
    pub fn start(lab: &Lab, cgroup: &Path, pins: &Path, metrics: &str) -> Agent {
        Self::start_node(lab, "node-1", cgroup, pins, metrics)
    }

    /// The agent of `node` of the lab: its cgroup, pins and, for NetworkPolicy, the
    /// node's network namespace where the pods' veths are.
    pub fn start_on(lab: &Lab, node: &str, pins: &Path, metrics: &str) -> Agent {
        let cgroup = kubeshift_lab::down::cgroup_dir(&lab.name).unwrap().join(node);
        Self::start_node(lab, node, &cgroup, pins, metrics)
    }

    fn start_node(lab: &Lab, node: &str, cgroup: &Path, pins: &Path, metrics: &str) -> Agent {
        let child = kubeshift()
            .args(["agent", "--node", node, "--metrics", metrics])
            .arg("--kubeconfig")
            .arg(lab.kubeconfig())
            .arg("--netns")
            .arg(Path::new("/run/netns").join(lab.node_netns(node)))
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(pins)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("starting kubeshift agent");
        Agent { child }
    }

    /// SIGTERM, as a node's service manager would stop it.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// Removes the node's pins (which detaches the programs) also when the test fails.
pub struct Pins(pub PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = kubeshift_datapath::purge_node(&self.0) {
            eprintln!("purging {}: {e}", self.0.display());
        }
    }
}

pub fn metrics(addr: &str) -> anyhow::Result<String> {
    agent_get(addr, "/metrics")
}

/// The agent's whole HTTP response to `GET path`, status line included.
pub fn agent_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    Ok(b)
}

pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(&format!("{name}{{")))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// A migration step on one node: kube-proxy leaves it (the DaemonSet excludes the
/// node) and its KUBE-SERVICES chains are flushed. The filter table's chain holds the
/// REJECTs for services without endpoints; with it gone, a refusal can only come
/// from kubeshift's datapath.
pub async fn take_kube_proxy_off(lab: &Lab, client: &Client, node: &str) {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use kube::api::{Patch, PatchParams};
    Api::<DaemonSet>::namespaced(client.clone(), "kube-system")
        .patch(
            "kube-proxy",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"template": {"spec": {"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [node]}]}]}}}}}}})),
        )
        .await
        .expect("patching the kube-proxy DaemonSet");
    eventually(&format!("kube-proxy to leave {node}"), Duration::from_secs(90), || async {
        let pods = Api::<Pod>::namespaced(client.clone(), "kube-system")
            .list(&ListParams::default().labels("k8s-app=kube-proxy"))
            .await?;
        Ok(pods.items.iter().all(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node)).then_some(()))
    })
    .await;
    for table in ["nat", "filter"] {
        flush_chain(&lab.node_netns(node), "iptables", table, "KUBE-SERVICES");
    }
}

/// Empties `chain` of `table` in `netns` with `iptables` (a tool name, e.g. `iptables` or
/// `iptables-legacy`; its `-save` is used to check). A chain that is not there counts as
/// empty: kube-proxy creates KUBE-SERVICES on its first sync, and one stopped before that
/// (a rollout a moment after `lab up`, which only waits for the pods to be Ready) never
/// made it. That is how the bench's switch to the legacy backend could fail with
/// "iptables: No chain/target/match by that name". Any other failure (the chain is
/// still there after a failed flush) fails the test.
pub fn flush_chain(netns: &str, iptables: &str, table: &str, chain: &str) {
    let out =
        Command::new("ip").args(["netns", "exec", netns, iptables, "-w", "-t", table, "-F", chain]).output().unwrap();
    if out.status.success() {
        return;
    }
    let save =
        Command::new("ip").args(["netns", "exec", netns, &format!("{iptables}-save"), "-t", table]).output().unwrap();
    assert!(save.status.success(), "{iptables}-save -t {table}: {}", String::from_utf8_lossy(&save.stderr));
    let declared = format!(":{chain} ");
    assert!(
        !String::from_utf8_lossy(&save.stdout).lines().any(|l| l.starts_with(&declared)),
        "flush {table} {chain} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `kubeshift agent` for `node` of the lab (socket LB on the node's cgroup,
/// pins under the lab's bpffs dir) and waits for its first full reconcile.
pub async fn start_agent(lab: &Lab, node: &str) -> (Agent, Pins, String) {
    let cgroup = kubeshift_lab::down::cgroup_dir(&lab.name).unwrap().join(node);
    let pins = Pins(kubeshift_lab::down::bpffs_dir(&lab.name).join(node));
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let agent = Agent::start_node(lab, node, &cgroup, &pins.0, &addr);
    eventually("the agent's first reconcile", Duration::from_secs(60), || {
        let a = addr.clone();
        async move { Ok(metrics(&a).ok().filter(|m| metric(m, "kubeshift_agent_synced") == Some(1.0))) }
    })
    .await;
    // The policy half attaches to pod veths on its own loop; a connection made before
    // that is never seen by the policy programs. /readyz says when all is in force; the
    // count of pods is taken from the API, independently of the agent's own view.
    let client = lab.client().await;
    eventually(&format!("agent on {node} ready, attached to every pod-network pod"), Duration::from_secs(60), || {
        let (a, c) = (addr.clone(), client.clone());
        async move {
            let ready = agent_get(&a, "/readyz")?.starts_with("HTTP/1.1 200");
            let m = metrics(&a)?;
            let pods = pod_network_pods(&c, node).await;
            Ok((ready && metric(&m, "kubeshift_agent_policy_interfaces") == Some(pods as f64)).then_some(()))
        }
    })
    .await;
    (agent, pins, addr)
}

/// Running pods on `node` that have their own network (a veth the policy programs go on).
pub async fn pod_network_pods(client: &Client, node: &str) -> usize {
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let pods = Api::<Pod>::all(client.clone()).list(&lp).await.expect("listing pods");
    pods.items
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.host_network) != Some(true))
        .filter(|p| {
            let st = p.status.as_ref();
            st.and_then(|s| s.pod_ip.as_ref()).is_some()
                && !matches!(st.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
        })
        .count()
}

/// Creates an object from JSON; the test fails on any API error.
pub async fn create<K>(api: &Api<K>, v: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(v).unwrap();
    api.create(&kube::api::PostParams::default(), &obj).await.expect("create");
}

// --- a client inside a pod ----------------------------------------------------------

#[derive(Debug, PartialEq)]
pub enum Reply {
    Ok(String),
    Refused,
    Other(String),
}

/// The client's side of one connection, run inside the client pod (its cgroup and netns).
/// A child process, not a thread: the socket hooks are attached to the node's cgroup,
/// and cgroup membership is per process.
pub fn from_pod(pod_cgroup: &Path, pod_netns: &str, argv: &[&str]) -> Reply {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    for v in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(v);
    }
    kubeshift_lab::sys::confine(&mut cmd, Some(pod_netns), Some(pod_cgroup)).expect("confine");
    let out = cmd.output().expect("running the client");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.success() && !stdout.is_empty() {
        Reply::Ok(stdout)
    } else if stderr.contains("Connection refused") || stderr.contains("onnection refused") {
        Reply::Refused
    } else {
        Reply::Other(format!("{:?}: {stdout} {stderr}", out.status))
    }
}

pub fn http(pod_cgroup: &Path, pod_netns: &str, vip: std::net::Ipv4Addr, port: u16) -> Reply {
    let url = format!("http://{vip}:{port}/hostname");
    from_pod(pod_cgroup, pod_netns, &["curl", "-sS", "--noproxy", "*", "--max-time", "3", &url])
}

/// A bare TCP connect: bash reports the errno's text ("Connection refused"), curl does not.
pub fn tcp_connect(pod_cgroup: &Path, pod_netns: &str, vip: std::net::Ipv4Addr, port: u16) -> Reply {
    let script = format!("exec 3<>/dev/tcp/{vip}/{port} && echo connected");
    from_pod(pod_cgroup, pod_netns, &["bash", "-c", &script])
}

/// Polls the client until `want` holds for its reply.
pub async fn await_reply(what: &str, f: impl Fn() -> Reply, want: impl Fn(&Reply) -> bool) -> Reply {
    let f = &f;
    let want = &want;
    eventually(what, Duration::from_secs(60), || async move {
        let r = f();
        Ok(want(&r).then_some(r))
    })
    .await
}

/// An agnhost netexec pod (HTTP on 8080, ready on /healthz) pinned to `node`, in
/// `default`, labelled `t=<name>`.
pub async fn netexec_on(client: &Client, name: &str, node: &str) {
    create(
        &Api::<Pod>::namespaced(client.clone(), "default"),
        serde_json::json!({"metadata": {"name": name, "labels": {"t": name}}, "spec": {"nodeName": node, "containers": [{
            "name": "e", "image": "registry.k8s.io/e2e-test-images/agnhost:2.39",
            "args": ["netexec", "--http-port=8080"],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]}}),
    )
    .await;
}

/// The pod `t=<name>` in `default` once Ready, and its IP.
pub async fn ready_ip(client: &Client, name: &str) -> (Pod, std::net::Ipv4Addr) {
    let sel = format!("t={name}");
    let p =
        eventually(&format!("pod {name} Ready"), Duration::from_secs(90), || ready_pod(client, "default", &sel)).await;
    let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).unwrap().parse().unwrap();
    (p, ip)
}

/// The lab's kubeshift image runs the binaries next to `kubeshift`: the CNI plugin is
/// the datapath crate's target, built by `cargo test --workspace` (its own tests use it).
pub fn assert_cni_plugin_built() {
    let plugin = PathBuf::from(kubeshift().get_program()).with_file_name("kubeshift-cni");
    let release = if cfg!(debug_assertions) { "" } else { " --release" };
    assert!(
        plugin.exists(),
        "{} is missing: run `cargo build{release} -p kubeshift-datapath --bin kubeshift-cni` (or the whole workspace's tests)",
        plugin.display()
    );
}
