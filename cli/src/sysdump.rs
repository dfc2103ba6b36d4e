//! `kubeshift sysdump`: what a bug report about a migration needs, in one .tar.gz, like
//! cilium-cli's sysdump. Everything comes through the API server (no SSH, no exec), so
//! it works wherever `migrate apply` does.
//!
//! Each part is collected on its own: a part that fails (RBAC, an agent that does not
//! answer) is listed in `failures.txt` and the rest is still written. Secrets are never
//! read: no part lists them, and objects of kind Secret met inside other lists are
//! dropped before anything is written.

use crate::kubeconfig::ClusterArgs;
use anyhow::{anyhow, Context as _, Result};
use clap::Args;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod};
use kube::api::{Api, DynamicObject, ListParams, LogParams};
use kube::discovery::Discovery;
use kube::Client;
use std::path::{Path, PathBuf};

/// The API group of kubeshift's own objects (NodeMigrations, the cluster migration, plans).
pub const KUBESHIFT_GROUP: &str = "kubeshift.io";

#[derive(Args)]
pub struct SysdumpArgs {
    /// The archive to write (default: kubeshift-sysdump-<UTC time>.tar.gz here).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Log lines per container (the newest).
    #[arg(long, default_value_t = 2000)]
    pub log_lines: i64,
    /// The port of the agents' metrics endpoint (`kubeshift agent --metrics`).
    #[arg(long, default_value_t = 9963)]
    pub agent_port: u16,
}

/// The DaemonSets whose objects, pods and logs go in: kubeshift's own and the legacy
/// networking the migration replaces.
pub fn is_network_daemonset(name: &str) -> bool {
    name.starts_with("kubeshift")
        || name == "kube-proxy"
        || name.starts_with("kube-flannel")
        || name == "calico-node"
        || name == "canal"
}

/// ConfigMaps that describe the networking: kube-proxy's, Flannel's, Calico's, kubeshift's.
pub fn is_network_configmap(name: &str) -> bool {
    name.starts_with("kubeshift")
        || name == "kube-proxy"
        || name == "kube-flannel-cfg"
        || name == "calico-config"
        || name == "canal-config"
}

#[derive(Default)]
pub struct Dump {
    /// Archive path (under the top directory) and content.
    pub files: Vec<(String, Vec<u8>)>,
    /// Part and why it failed.
    pub failures: Vec<(String, String)>,
}

impl Dump {
    fn add(&mut self, path: impl Into<String>, content: impl Into<Vec<u8>>) {
        self.files.push((path.into(), content.into()));
    }

    fn fail(&mut self, part: impl Into<String>, e: impl Into<anyhow::Error>) {
        self.failures.push((part.into(), why(&e.into())));
    }

    fn record<T>(&mut self, part: &str, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(part, e);
                None
            }
        }
    }

    #[cfg(test)]
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.iter().find(|(p, _)| p == path).map(|(_, c)| c.as_slice())
    }
}

/// Why a part failed, on one line: an API error as its code, reason and message, without
/// the Debug dump of the Status that kube's own Display appends (a pod log the kubelet
/// does not serve was three lines of it).
fn why(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        if let Some(kube::Error::Api(s)) = cause.downcast_ref::<kube::Error>() {
            let reason = if s.reason.is_empty() { String::new() } else { format!(" {}", s.reason) };
            parts.push(format!("API error {}{reason}: {}", s.code, s.message));
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
}

/// YAML of a list of objects, with Secrets removed whatever list they came in.
fn objects_yaml<T: serde::Serialize>(items: &[T]) -> Result<String> {
    let mut values: Vec<serde_json::Value> = items.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
    values.retain(|v| v.get("kind").and_then(|k| k.as_str()) != Some("Secret"));
    Ok(serde_yaml::to_string(&values)?)
}

pub async fn run(a: SysdumpArgs, cluster: &ClusterArgs) -> Result<()> {
    let client = cluster.client().await?;
    let out = a.out.clone().unwrap_or_else(|| {
        let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
        PathBuf::from(format!("kubeshift-sysdump-{now}.tar.gz"))
    });
    let dump = collect(&client, &a).await;
    write_archive(&dump, &out)?;
    eprintln!("sysdump written to {} ({} files)", out.display(), dump.files.len());
    if !dump.failures.is_empty() {
        eprintln!("{} part(s) could not be collected (listed in failures.txt):", dump.failures.len());
        for (part, why) in &dump.failures {
            eprintln!("  {part}: {why}");
        }
    }
    Ok(())
}

pub async fn collect(client: &Client, a: &SysdumpArgs) -> Dump {
    let mut d = Dump::default();

    let version = client.apiserver_version().await.map_err(anyhow::Error::from);
    if let Some(v) = d.record("cluster/version", version) {
        d.add("cluster/version.json", serde_json::to_vec_pretty(&v).unwrap_or_default());
    }

    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await;
    if let Some(nodes) = d.record("cluster/nodes", nodes.map_err(Into::into).and_then(|l| objects_yaml(&l.items))) {
        d.add("cluster/nodes.yaml", nodes);
    }

    kubeshift_objects(client, &mut d).await;

    let daemonsets = Api::<DaemonSet>::all(client.clone()).list(&ListParams::default()).await;
    let ds_names: Vec<(String, String)> = match daemonsets {
        Ok(list) => {
            let ours: Vec<&DaemonSet> =
                list.items.iter().filter(|ds| ds.metadata.name.as_deref().is_some_and(is_network_daemonset)).collect();
            match objects_yaml(&ours) {
                Ok(y) => d.add("workloads/daemonsets.yaml", y),
                Err(e) => d.fail("workloads/daemonsets", e),
            }
            ours.iter()
                .map(|ds| {
                    (ds.metadata.namespace.clone().unwrap_or_default(), ds.metadata.name.clone().unwrap_or_default())
                })
                .collect()
        }
        Err(e) => {
            d.fail("workloads/daemonsets", e);
            Vec::new()
        }
    };

    let pods = match Api::<Pod>::all(client.clone()).list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|p| {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                p.metadata.owner_references.iter().flatten().any(|o| {
                    o.kind == "DaemonSet" && ds_names.iter().any(|(dns, dname)| *dns == ns && *dname == o.name)
                }) || p.metadata.name.as_deref().is_some_and(|n| n.starts_with("kubeshift"))
            })
            .collect::<Vec<_>>(),
        Err(e) => {
            d.fail("workloads/pods", e);
            Vec::new()
        }
    };
    match objects_yaml(&pods) {
        Ok(y) => d.add("workloads/pods.yaml", y),
        Err(e) => d.fail("workloads/pods", e),
    }
    for pod in &pods {
        pod_logs(client, pod, a.log_lines, &mut d).await;
        let is_agent = pod.metadata.owner_references.iter().flatten().any(|o| o.name.starts_with("kubeshift"));
        if is_agent {
            agent_endpoints(client, pod, a.agent_port, &mut d).await;
        }
    }

    match Api::<ConfigMap>::all(client.clone()).list(&ListParams::default()).await {
        Ok(list) => {
            let ours: Vec<&ConfigMap> =
                list.items.iter().filter(|c| c.metadata.name.as_deref().is_some_and(is_network_configmap)).collect();
            match objects_yaml(&ours) {
                Ok(y) => d.add("config/configmaps.yaml", y),
                Err(e) => d.fail("config/configmaps", e),
            }
        }
        Err(e) => d.fail("config/configmaps", e),
    }

    let events = Api::<Event>::all(client.clone()).list(&ListParams::default()).await;
    if let Some(y) = d.record("cluster/events", events.map_err(Into::into).and_then(|l| objects_yaml(&l.items))) {
        d.add("cluster/events.yaml", y);
    }
    d
}

/// Every object of every resource in kubeshift's API group, whatever its kinds are by
/// then (NodeMigration, the cluster migration, the plan): found by discovery rather
/// than named here.
async fn kubeshift_objects(client: &Client, d: &mut Dump) {
    let discovery = match Discovery::new(client.clone()).filter(&[KUBESHIFT_GROUP]).run().await {
        Ok(disc) => disc,
        Err(e) => return d.fail("kubeshift/discovery", e),
    };
    let mut found = 0;
    for group in discovery.groups() {
        for (ar, _caps) in group.recommended_resources() {
            found += 1;
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let part = format!("kubeshift/{}", ar.plural);
            match api.list(&ListParams::default()).await {
                Ok(list) => match objects_yaml(&list.items) {
                    Ok(y) => d.add(format!("{part}.yaml"), y),
                    Err(e) => d.fail(part, e),
                },
                Err(e) => d.fail(part, e),
            }
        }
    }
    if found == 0 {
        d.add("kubeshift/NONE.txt", format!("The API server serves no {KUBESHIFT_GROUP} resources: kubeshift's CRDs are not installed (no migration prepared yet, or rolled back).\n"));
    }
}

async fn pod_logs(client: &Client, pod: &Pod, lines: i64, d: &mut Dump) {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let spec = pod.spec.as_ref();
    let containers = spec.map(|s| s.init_containers.iter().flatten().chain(s.containers.iter()).collect::<Vec<_>>());
    let restarted = |c: &str| {
        pod.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .any(|cs| cs.name == c && cs.restart_count > 0)
    };
    for c in containers.unwrap_or_default() {
        for previous in [false, true] {
            if previous && !restarted(&c.name) {
                continue;
            }
            let lp =
                LogParams { container: Some(c.name.clone()), tail_lines: Some(lines), previous, ..Default::default() };
            let suffix = if previous { ".previous" } else { "" };
            let path = format!("logs/{ns}/{name}/{}{suffix}.log", c.name);
            match api.logs(name, &lp).await {
                Ok(text) => d.add(path, text),
                Err(e) => d.fail(path, e),
            }
        }
    }
}

/// The agent's /metrics and /readyz through the API server's pod proxy, so no network
/// path to the node is needed.
async fn agent_endpoints(client: &Client, pod: &Pod, port: u16, d: &mut Dump) {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or(name);
    for endpoint in ["metrics", "readyz"] {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/{endpoint}");
        let part = format!("agents/{node}/{endpoint}");
        let req = http::Request::get(&path).body(Vec::new()).map_err(|e| anyhow!("{e}"));
        let text = match req {
            Ok(req) => client.request_text(req).await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match text {
            Ok(t) => d.add(format!("{part}.txt"), t),
            // /readyz answers 503 with its reasons while the agent is not ready: that
            // answer is the interesting part, so keep it as the content.
            Err(e) if endpoint == "readyz" => {
                d.add(format!("{part}.txt"), format!("not ready or not reachable: {e:#}\n"))
            }
            Err(e) => d.fail(part, e),
        }
    }
}

/// The files under one top directory named like the archive, plus `failures.txt` (even
/// when empty, so a reader knows the dump is whole) and `index.txt`.
pub fn write_archive(d: &Dump, out: &Path) -> Result<()> {
    let top = out
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".tar.gz").trim_end_matches(".tgz").to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "kubeshift-sysdump".into());
    let tmp = out.with_extension("tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut failures = String::new();
    for (part, why) in &d.failures {
        failures.push_str(&format!("{part}: {why}\n"));
    }
    let mut index = String::new();
    for (path, content) in &d.files {
        index.push_str(&format!("{path}\t{} bytes\n", content.len()));
    }
    let extra = [("failures.txt".to_string(), failures.into_bytes()), ("index.txt".to_string(), index.into_bytes())];
    let mtime = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for (path, content) in d.files.iter().chain(extra.iter()) {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_cksum();
        tar.append_data(&mut h, format!("{top}/{path}"), content.as_slice())
            .with_context(|| format!("writing {path} into {}", tmp.display()))?;
    }
    tar.into_inner()?.finish()?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
