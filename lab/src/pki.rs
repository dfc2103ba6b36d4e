//! Certificates and credentials of one lab: a CA, the apiserver's serving certificate,
//! the service-account signing key, and static bearer tokens for the lab's own
//! components (admin, controller-manager, scheduler, one per kubelet stand-in).
//! Pods get real service-account tokens through the TokenRequest API instead.

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub struct PkiFiles {
    pub dir: PathBuf,
}

impl PkiFiles {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("apiserver.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("apiserver.key")
    }
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }
    pub fn tokens(&self) -> PathBuf {
        self.dir.join("tokens.csv")
    }
}

/// A static identity in the apiserver's token file.
pub struct Identity {
    pub token: String,
    pub user: String,
    pub groups: Vec<String>,
}

pub fn random_token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

/// Writes the CA, the apiserver certificate (valid for every name and address the
/// apiserver is reached by: loopback through the forwarder, the underlay address,
/// the `kubernetes` Service IP) and the service-account key pair.
pub fn write(dir: &Path, san_ips: &[IpAddr]) -> Result<PkiFiles> {
    std::fs::create_dir_all(dir)?;
    let files = PkiFiles { dir: dir.to_path_buf() };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "kubeshift-lab-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut sp = CertificateParams::new(vec![
        "kubernetes".to_string(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
        "localhost".into(),
    ])?;
    sp.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    for ip in san_ips {
        sp.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let cert = sp.signed_by(&key, &ca_cert, &ca_key)?;

    let sa = KeyPair::generate()?;
    std::fs::write(files.ca(), ca_cert.pem())?;
    std::fs::write(files.server_cert(), cert.pem())?;
    std::fs::write(files.server_key(), key.serialize_pem())?;
    std::fs::write(files.sa_key(), sa.serialize_pem())?;
    std::fs::write(files.sa_pub(), sa.public_key_pem())?;
    Ok(files)
}

pub fn write_tokens(files: &PkiFiles, ids: &[Identity]) -> Result<()> {
    let mut s = String::new();
    for (i, id) in ids.iter().enumerate() {
        s.push_str(&format!("{},{},uid-{},\"{}\"\n", id.token, id.user, i, id.groups.join(",")));
    }
    std::fs::write(files.tokens(), s).context("writing the token file")
}

/// A kubeconfig for one identity. `server` is how that client reaches the apiserver.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str, context: &str) -> String {
    use std::fmt::Write;
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let mut s = String::new();
    let _ = write!(
        s,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {context}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_b64}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: {user}\ncurrent-context: {context}\n"
    );
    s
}
