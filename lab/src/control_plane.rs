//! The real control plane: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler v1.20.2, built by `scripts/build-control-plane.sh`, all running in
//! the lab's control-plane network namespace.

use crate::spec::{LabSpec, APISERVER_PORT, SERVICE_CIDR};
use crate::sys::{self, ProcessRecord};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn binary_dir() -> PathBuf {
    std::env::var_os("KUBESHIFT_CP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/kubeshift/control-plane-v1.20.2"))
        .join("bin")
}

pub fn binary(name: &str) -> Result<PathBuf> {
    let p = binary_dir().join(name);
    if !p.exists() {
        bail!("{} is missing: build the lab's control plane first with scripts/build-control-plane.sh", p.display());
    }
    Ok(p)
}

pub struct ControlPlaneFiles<'a> {
    pub dir: &'a Path,
    pub pki: &'a crate::pki::PkiFiles,
    /// Kubeconfigs used from inside the control-plane netns (server = loopback).
    pub controller_manager_kubeconfig: PathBuf,
    pub scheduler_kubeconfig: PathBuf,
}

fn daemon(spec: &LabSpec, name: &str, bin: &Path, args: Vec<String>, logdir: &Path) -> Result<ProcessRecord> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    sys::confine(&mut cmd, Some(&spec.netns_control_plane()), None)?;
    sys::spawn_daemon(name, cmd, &logdir.join(format!("{name}.log")))
}

pub fn start_etcd(spec: &LabSpec, f: &ControlPlaneFiles) -> Result<ProcessRecord> {
    let data = f.dir.join("etcd-data");
    std::fs::create_dir_all(&data)?;
    daemon(
        spec,
        "etcd",
        &binary("etcd")?,
        vec![
            format!("--data-dir={}", data.display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=default=http://127.0.0.1:2380".into(),
            "--name=default".into(),
            "--log-level=warn".into(),
        ],
        &f.dir.join("logs"),
    )
}

pub fn start_apiserver(spec: &LabSpec, f: &ControlPlaneFiles) -> Result<ProcessRecord> {
    let pki = f.pki;
    daemon(
        spec,
        "kube-apiserver",
        &binary("kube-apiserver")?,
        vec![
            "--etcd-servers=http://127.0.0.1:2379".into(),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={APISERVER_PORT}"),
            "--insecure-port=0".into(),
            format!("--advertise-address={}", spec.apiserver_ip()),
            format!("--tls-cert-file={}", pki.server_cert().display()),
            format!("--tls-private-key-file={}", pki.server_key().display()),
            format!("--client-ca-file={}", pki.ca().display()),
            format!("--token-auth-file={}", pki.tokens().display()),
            "--authorization-mode=RBAC".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", pki.sa_pub().display()),
            format!("--service-account-signing-key-file={}", pki.sa_key().display()),
            "--allow-privileged=true".into(),
            // No token controller runs, so the admission plugin that waits for
            // service-account token secrets would refuse every pod.
            "--disable-admission-plugins=ServiceAccount".into(),
            // The default reconciler loops on a loopback advertise address; the lab
            // writes the `kubernetes` Endpoints itself.
            "--endpoint-reconciler-type=none".into(),
            format!("--cert-dir={}", f.dir.join("apiserver-certs").display()),
            "--profiling=false".into(),
            "--v=1".into(),
        ],
        &f.dir.join("logs"),
    )
}

pub fn start_controller_manager(spec: &LabSpec, f: &ControlPlaneFiles) -> Result<ProcessRecord> {
    daemon(
        spec,
        "kube-controller-manager",
        &binary("kube-controller-manager")?,
        vec![
            format!("--kubeconfig={}", f.controller_manager_kubeconfig.display()),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={}", spec.cni.cluster_cidr()),
            "--node-cidr-mask-size=24".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--use-service-account-credentials=false".into(),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            format!("--root-ca-file={}", f.pki.ca().display()),
            "--controllers=*,-cloud-node-lifecycle,-service,-route".into(),
            "--v=1".into(),
        ],
        &f.dir.join("logs"),
    )
}

pub fn start_scheduler(spec: &LabSpec, f: &ControlPlaneFiles) -> Result<ProcessRecord> {
    daemon(
        spec,
        "kube-scheduler",
        &binary("kube-scheduler")?,
        vec![
            format!("--kubeconfig={}", f.scheduler_kubeconfig.display()),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--v=1".into(),
        ],
        &f.dir.join("logs"),
    )
}
