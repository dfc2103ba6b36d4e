//! Plain data passed between the suite and its probe agents, and the verdict matrix.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// One probe an agent runs: connect to `addr:port` and ask who answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub id: String,
    pub addr: String,
    pub port: u16,
    pub proto: Proto,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub id: String,
    pub ok: bool,
    /// Who answered (the echo server's hostname) or why it failed.
    pub detail: String,
    pub micros: u64,
}

/// What the suite hands an agent: a round number and the probes of that round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub round: u64,
    pub probes: Vec<Probe>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub round: u64,
    pub results: Vec<ProbeResult>,
}

/// Long-lived connections an agent keeps open for the conn-disrupt check. A new
/// generation replaces the set; the same generation leaves running streams alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamSet {
    pub generation: u64,
    pub streams: Vec<StreamSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamSpec {
    pub id: String,
    pub addr: String,
    pub port: u16,
}

/// How one long-lived connection is doing, as its agent last saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub id: String,
    pub generation: u64,
    pub established: bool,
    pub sent: u64,
    pub received: u64,
    /// Set once, when the connection broke (reset, timeout, wrong echo); never cleared.
    pub broken: Option<String>,
    /// Unix milliseconds of the last echo received.
    pub last_ok_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Denied,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
        })
    }
}

/// (source, destination, port/proto) → verdict, for every pair of test endpoints.
/// Keys are stable names ("node-1/pod-1", "node-2/host"), not IPs, so matrices taken
/// before and after a migration compare even though pods got new addresses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub entries: BTreeMap<String, Verdict>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub pair: String,
    pub before: Option<Verdict>,
    pub after: Option<Verdict>,
}

pub fn pair_key(src: &str, dst: &str, port: u16, proto: Proto) -> String {
    format!("{src} -> {dst} {port}/{}", if proto == Proto::Tcp { "tcp" } else { "udp" })
}

impl Matrix {
    pub const API_VERSION: &'static str = "kubeshift.io/v1alpha1";
    pub const KIND: &'static str = "VerdictMatrix";

    pub fn new() -> Self {
        Matrix { api_version: Self::API_VERSION.into(), kind: Self::KIND.into(), entries: BTreeMap::new() }
    }

    pub fn load(path: &std::path::Path) -> anyhow::Result<Matrix> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading verdict matrix {}", path.display()))?;
        let m: Matrix = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}:{}:{}: not a verdict matrix: {e}", path.display(), e.line(), e.column())
        })?;
        if m.api_version != Self::API_VERSION || m.kind != Self::KIND {
            anyhow::bail!(
                "{}: apiVersion/kind {}/{} is not {}/{}",
                path.display(),
                m.api_version,
                m.kind,
                Self::API_VERSION,
                Self::KIND
            );
        }
        Ok(m)
    }

    /// Every pair whose verdict differs, including pairs present on one side only.
    pub fn compare(before: &Matrix, after: &Matrix) -> Vec<Change> {
        let mut keys: Vec<&String> = before.entries.keys().chain(after.entries.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let (b, a) = (before.entries.get(k).copied(), after.entries.get(k).copied());
                (b != a).then(|| Change { pair: k.clone(), before: b, after: a })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_lists_changed_added_and_removed_pairs() {
        let mut a = Matrix::new();
        let mut b = Matrix::new();
        a.entries.insert(pair_key("n1/pod-1", "n2/pod-1", 8080, Proto::Tcp), Verdict::Allowed);
        a.entries.insert(pair_key("n1/pod-1", "n2/pod-2", 8080, Proto::Tcp), Verdict::Allowed);
        b.entries.insert(pair_key("n1/pod-1", "n2/pod-1", 8080, Proto::Tcp), Verdict::Denied);
        b.entries.insert(pair_key("n1/pod-1", "n1/pod-2", 8081, Proto::Udp), Verdict::Allowed);
        let c = Matrix::compare(&a, &b);
        assert_eq!(c.len(), 3);
        assert_eq!(c.iter().find(|c| c.pair.contains("n2/pod-1")).unwrap().after, Some(Verdict::Denied));
        assert!(Matrix::compare(&a, &a).is_empty());
    }

    #[test]
    fn a_broken_matrix_file_is_named_with_line_and_column() {
        let dir = std::env::temp_dir().join(format!("ks-matrix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("before.json");
        std::fs::write(&p, "{\n  \"entries\": [").unwrap();
        let e = Matrix::load(&p).unwrap_err().to_string();
        assert!(e.contains("before.json:2:"), "{e}");
        std::fs::write(&p, r#"{"apiVersion": "v1", "kind": "Plan", "entries": {}}"#).unwrap();
        assert!(Matrix::load(&p).unwrap_err().to_string().contains("is not kubeshift.io/v1alpha1/VerdictMatrix"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
