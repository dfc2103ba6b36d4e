//! Long-lived connections through ClusterIPs that must survive a migration step.
//! `--conn-disrupt-setup` has every pod agent open connections to other endpoints'
//! Services (same node, other node, and from the host network) and keeps the test
//! namespace; `--include-conn-disrupt`, in a later run, checks that every one of those
//! connections is still the same live connection.

use crate::agent::{result_configmap, streams_key, PROBES_CONFIGMAP};
use crate::deploy::{Endpoint, STREAM_PORT};
use crate::model::{StreamSet, StreamSpec, StreamStatus};
use crate::suite::{Failure, ScenarioOutcome};
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// One long-lived connection: which pod keeps it, and the endpoint pod behind the
/// Service it goes to.
#[derive(Debug, Clone)]
pub struct Stream {
    pub from_pod: String,
    pub from_node: String,
    pub to_pod: String,
    pub spec: StreamSpec,
}

/// Which agent keeps which connection: every first pod of a node to the other node's
/// first pod and to its own node's second pod, and each node's host to the other
/// node's first pod — all through ClusterIPs.
pub fn streams(eps: &[Endpoint]) -> Vec<Stream> {
    let mut out = vec![];
    let find = |key: &str| eps.iter().find(|e| e.key == key);
    let mut nodes: Vec<&str> = vec![];
    for e in eps {
        if !nodes.contains(&e.node.as_str()) {
            nodes.push(&e.node);
        }
    }
    for (i, a) in nodes.iter().enumerate() {
        let b = nodes[(i + 1) % nodes.len()];
        let targets = [
            (format!("{a}/pod-1"), format!("{b}/pod-1")),
            (format!("{a}/pod-1"), format!("{a}/pod-2")),
            (format!("{a}/host"), format!("{b}/pod-1")),
        ];
        for (from, to) in targets {
            let (Some(f), Some(t)) = (find(&from), find(&to)) else { continue };
            let Some(vip) = &t.service_ip else { continue };
            out.push(Stream {
                from_pod: f.pod.clone(),
                from_node: f.node.clone(),
                to_pod: t.pod.clone(),
                spec: StreamSpec {
                    id: format!("{} -> svc-{} ({vip}:{STREAM_PORT})", f.key, t.pod),
                    addr: vip.clone(),
                    port: STREAM_PORT,
                },
            });
        }
    }
    out
}

/// [`streams`] by the pod that keeps them.
pub fn plan(eps: &[Endpoint]) -> BTreeMap<String, Vec<StreamSpec>> {
    let mut out: BTreeMap<String, Vec<StreamSpec>> = BTreeMap::new();
    for s in streams(eps) {
        out.entry(s.from_pod).or_default().push(s.spec);
    }
    out
}

async fn statuses(client: &Client, ns: &str, pods: &[String]) -> Result<Vec<StreamStatus>> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut v = vec![];
    for p in pods {
        if let Some(s) =
            cms.get_opt(&result_configmap(p)).await?.and_then(|c| c.data).and_then(|d| d.get("streams").cloned())
        {
            v.extend(serde_json::from_str::<Vec<StreamStatus>>(&s).with_context(|| format!("stream status of {p}"))?);
        }
    }
    Ok(v)
}

/// Starts the connections and waits until every one has echoed a few lines.
pub async fn setup(client: &Client, ns: &str, eps: &[Endpoint], timeout: Duration) -> Result<ScenarioOutcome> {
    let started = Instant::now();
    let plan = plan(eps);
    let generation = now_ms();
    let mut data = serde_json::Map::new();
    for (pod, streams) in &plan {
        data.insert(
            streams_key(pod),
            json!(serde_json::to_string(&StreamSet { generation, streams: streams.clone() })?),
        );
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": PROBES_CONFIGMAP, "namespace": ns}, "data": data});
    // Its own field manager: probe rounds rewrite their keys without touching these.
    cms.patch(PROBES_CONFIGMAP, &PatchParams::apply("kubeshift-connectivity-streams").force(), &Patch::Apply(&cm))
        .await?;
    let pods: Vec<String> = plan.keys().cloned().collect();
    let want: usize = plan.values().map(|v| v.len()).sum();
    let deadline = Instant::now() + timeout;
    loop {
        let st: Vec<StreamStatus> =
            statuses(client, ns, &pods).await?.into_iter().filter(|s| s.generation == generation).collect();
        let broken: Vec<Failure> = st.iter().filter_map(|s| s.broken.as_ref().map(|b| failure(s, b))).collect();
        let flowing = st.iter().filter(|s| s.broken.is_none() && s.received >= 5).count();
        if !broken.is_empty() || flowing >= want || Instant::now() > deadline {
            let mut failures = broken;
            if flowing < want && failures.is_empty() {
                failures.push(Failure {
                    from: "-".into(),
                    to: "-".into(),
                    address: "-".into(),
                    detail: format!("only {flowing} of {want} connections flowing after {timeout:?}"),
                });
            }
            return Ok(ScenarioOutcome {
                name: "conn-disrupt-setup".into(),
                description: "long-lived connections through ClusterIPs are established and echoing".into(),
                checks: want,
                failures,
                skipped: None,
                max_ms: started.elapsed().as_secs_f64() * 1000.0,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn failure(s: &StreamStatus, why: &str) -> Failure {
    let (from, to) = s.id.split_once(" -> ").unwrap_or((&s.id, ""));
    Failure {
        from: from.to_string(),
        to: to.to_string(),
        address: format!("after {} echoes", s.received),
        detail: why.to_string(),
    }
}

/// Every connection set up earlier is still the same connection, still echoing.
pub async fn check(client: &Client, ns: &str, eps: &[Endpoint]) -> Result<ScenarioOutcome> {
    check_where(client, ns, eps, |_| true).await
}

/// [`check`] of the connections `judged` keeps: a migration leaves out those that end
/// by design (their pod was drained and replaced).
pub async fn check_where(
    client: &Client,
    ns: &str,
    eps: &[Endpoint],
    judged: impl Fn(&Stream) -> bool,
) -> Result<ScenarioOutcome> {
    let kept: Vec<Stream> = streams(eps).into_iter().filter(|s| judged(s)).collect();
    let ids: std::collections::BTreeSet<&str> = kept.iter().map(|s| s.spec.id.as_str()).collect();
    let mut pods: Vec<String> = kept.iter().map(|s| s.from_pod.clone()).collect();
    pods.dedup();
    let want = kept.len();
    // Reports are written every second; give a live connection a moment to show it.
    let since = now_ms();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st: Vec<StreamStatus> =
            statuses(client, ns, &pods).await?.into_iter().filter(|s| ids.contains(s.id.as_str())).collect();
        let mut failures: Vec<Failure> = vec![];
        for s in &st {
            if let Some(b) = &s.broken {
                failures.push(failure(s, b));
            } else if s.last_ok_ms < since {
                failures.push(failure(s, "no echo since the check started"));
            }
        }
        if st.len() < want {
            failures.push(Failure {
                from: "-".into(),
                to: "-".into(),
                address: "-".into(),
                detail: format!(
                    "{} of {want} connections reported: was --conn-disrupt-setup run in namespace {ns}?",
                    st.len()
                ),
            });
        }
        // Wait while any connection is merely quiet: it either echoes again or its own
        // 3 s echo timeout marks it broken with the real reason.
        let lagging = failures.iter().any(|f| f.detail == "no echo since the check started");
        if failures.is_empty() || !lagging || Instant::now() > deadline {
            return Ok(ScenarioOutcome {
                name: "no-interrupted-connections".into(),
                description: "every long-lived connection from --conn-disrupt-setup survived, unbroken".into(),
                checks: want,
                failures,
                skipped: None,
                max_ms: 0.0,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
