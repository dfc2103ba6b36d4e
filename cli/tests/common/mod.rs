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
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn kubeshift() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubeshift"))
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
        let turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let lab = Lab { name: name.to_string(), _turn: Some(turn) };
        let mut c = kubeshift();
        c.args(["lab", "up", "--name", name]).args(args);
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
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let Some((head, body)) = buf.split_once("\r\n\r\n") else { bail!("no HTTP response from {addr}: {buf:?}") };
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{addr}{path}: {head}");
        }
        Ok(body.to_string())
    })?
}
