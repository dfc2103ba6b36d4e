//! sysdump against a fake API server (a tower service answering kube's requests by path):
//! which parts it collects, that a failing part leaves the rest, that Secrets are never
//! asked for, and the archive it writes.

use super::*;
use serde_json::json;
use std::sync::{Arc, Mutex};

fn list(kind: &str, api_version: &str, items: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn owned(kind: &str, name: &str, ns: &str, owner: &str, node: &str, restarts: i32) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": kind,
        "metadata": {"name": name, "namespace": ns,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": owner, "uid": "u1", "controller": true}]},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
        "status": {"containerStatuses": [{"name": "main", "restartCount": restarts, "ready": true, "image": "x", "imageID": "", "started": true}]}
    })
}

fn daemonset(name: &str, ns: &str) -> serde_json::Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": {"app": name}},
           "spec": {"containers": [{"name": "main", "image": "x"}]}}}})
}

/// Answers like an API server midway through a migration, with Events forbidden.
fn fake_api(path: &str, query: &str) -> (u16, String) {
    let ok = |v: serde_json::Value| (200, v.to_string());
    match path {
        "/version" => ok(json!({"major": "1", "minor": "34", "gitVersion": "v1.34.1", "gitCommit": "", "gitTreeState": "",
                                "buildDate": "", "goVersion": "", "compiler": "", "platform": "linux/amd64"})),
        "/api/v1/nodes" => ok(list("NodeList", "v1", json!([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}]))),
        "/apis" => ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": "kubeshift.io", "versions": [{"groupVersion": "kubeshift.io/v1alpha1", "version": "v1alpha1"}],
             "preferredVersion": {"groupVersion": "kubeshift.io/v1alpha1", "version": "v1alpha1"}}]})),
        "/apis/kubeshift.io/v1alpha1" => ok(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "kubeshift.io/v1alpha1",
            "resources": [
                {"name": "nodemigrations", "singularName": "nodemigration", "namespaced": false, "kind": "NodeMigration", "verbs": ["get", "list"]},
                {"name": "nodemigrations/status", "singularName": "", "namespaced": false, "kind": "NodeMigration", "verbs": ["get"]}]})),
        "/apis/kubeshift.io/v1alpha1/nodemigrations" => ok(list("NodeMigrationList", "kubeshift.io/v1alpha1", json!([
            {"apiVersion": "kubeshift.io/v1alpha1", "kind": "NodeMigration", "metadata": {"name": "node-1"},
             "status": {"phase": "switch-pods"}},
            // Nothing of kind Secret is written, whatever list it turns up in.
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "leak"}, "data": {"token": "c2VjcmV0LXRva2Vu"}}]))),
        "/apis/apps/v1/daemonsets" => ok(list("DaemonSetList", "apps/v1", json!([
            daemonset("kube-proxy", "kube-system"), daemonset("kube-flannel-ds", "kube-flannel"),
            daemonset("kubeshift-agent", "kubeshift-system"), daemonset("fluent-bit", "logging")]))),
        "/api/v1/pods" => ok(list("PodList", "v1", json!([
            owned("Pod", "kube-proxy-a", "kube-system", "kube-proxy", "node-1", 0),
            owned("Pod", "kube-flannel-ds-a", "kube-flannel", "kube-flannel-ds", "node-1", 2),
            owned("Pod", "kubeshift-agent-a", "kubeshift-system", "kubeshift-agent", "node-1", 0),
            owned("Pod", "fluent-bit-a", "logging", "fluent-bit", "node-1", 0)]))),
        p if p.ends_with("/log") => {
            let previous = query.contains("previous=true");
            (200, format!("log of {p}{}\n", if previous { " (previous)" } else { "" }))
        }
        "/api/v1/namespaces/kubeshift-system/pods/kubeshift-agent-a:9963/proxy/metrics" => {
            (200, "kubeshift_agent_ready 0\n".into())
        }
        "/api/v1/namespaces/kubeshift-system/pods/kubeshift-agent-a:9963/proxy/readyz" => {
            (503, "not ready: policy half not synced\n".into())
        }
        "/api/v1/configmaps" => ok(list("ConfigMapList", "v1", json!([
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-proxy", "namespace": "kube-system"}, "data": {"mode": "iptables"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-settings", "namespace": "shop"}, "data": {"x": "y"}}]))),
        "/api/v1/events" => (403, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "events is forbidden: User \"ops\" cannot list resource \"events\"", "reason": "Forbidden", "code": 403}).to_string()),
        _ => (404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404}).to_string()),
    }
}

fn fake_client(seen: Arc<Mutex<Vec<String>>>) -> Client {
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let seen = seen.clone();
        async move {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            seen.lock().unwrap().push(format!("{path}?{query}"));
            let (status, body) = fake_api(&path, &query);
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.into_bytes()))
                    .unwrap(),
            )
        }
    });
    Client::new(svc, "default")
}

fn args() -> SysdumpArgs {
    SysdumpArgs { out: None, log_lines: 50, agent_port: 9963 }
}

fn text(d: &Dump, path: &str) -> String {
    String::from_utf8(d.file(path).unwrap_or_else(|| panic!("no {path} in {:?}", paths(d))).to_vec()).unwrap()
}

fn paths(d: &Dump) -> Vec<&str> {
    d.files.iter().map(|(p, _)| p.as_str()).collect()
}

#[tokio::test]
async fn a_dump_has_each_part_and_lists_what_failed() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let d = collect(&fake_client(seen.clone()), &args()).await;

    assert!(text(&d, "cluster/version.json").contains("v1.34.1"));
    assert!(text(&d, "cluster/nodes.yaml").contains("node-1"));
    let nm = text(&d, "kubeshift/nodemigrations.yaml");
    assert!(nm.contains("switch-pods"), "{nm}");
    let ds = text(&d, "workloads/daemonsets.yaml");
    for name in ["kube-proxy", "kube-flannel-ds", "kubeshift-agent"] {
        assert!(ds.contains(name), "{name} missing from {ds}");
    }
    assert!(!ds.contains("fluent-bit"), "unrelated DaemonSets stay out");
    let pods = text(&d, "workloads/pods.yaml");
    assert!(pods.contains("kube-flannel-ds-a") && !pods.contains("fluent-bit-a"));
    assert!(text(&d, "logs/kube-system/kube-proxy-a/main.log").starts_with("log of"));
    // A restarted container's previous logs say why it restarted.
    assert!(text(&d, "logs/kube-flannel/kube-flannel-ds-a/main.previous.log").contains("(previous)"));
    assert!(d.file("logs/kube-system/kube-proxy-a/main.previous.log").is_none());
    assert_eq!(text(&d, "agents/node-1/metrics.txt"), "kubeshift_agent_ready 0\n");
    assert!(text(&d, "agents/node-1/readyz.txt").contains("policy half not synced"), "the 503's reasons are kept");
    let cms = text(&d, "config/configmaps.yaml");
    assert!(cms.contains("kube-proxy") && !cms.contains("app-settings"));

    // Events were forbidden: listed, and everything else is still there.
    assert_eq!(d.failures.len(), 1, "{:?}", d.failures);
    assert_eq!(d.failures[0].0, "cluster/events");
    assert!(d.failures[0].1.contains("forbidden"), "{}", d.failures[0].1);
    assert!(!d.failures[0].1.contains("Status {"), "one line, no Debug dump: {}", d.failures[0].1);

    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|p| p.contains("tailLines=50")), "log lines are bounded: {seen:?}");
    assert!(!seen.iter().any(|p| p.contains("secrets")), "Secrets must never be requested: {seen:?}");
    assert!(
        !d.files.iter().any(|(_, c)| String::from_utf8_lossy(c).contains("c2VjcmV0LXRva2Vu")),
        "a Secret's data was written"
    );
}

#[tokio::test]
async fn without_kubeshift_crds_the_dump_says_so() {
    let svc = tower::service_fn(|req: http::Request<kube::client::Body>| async move {
        let path = req.uri().path().to_string();
        let (status, body) = if path == "/apis" {
            (200, json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}).to_string())
        } else {
            fake_api(&path, "")
        };
        Ok::<_, std::convert::Infallible>(
            http::Response::builder().status(status).body(kube::client::Body::from(body.into_bytes())).unwrap(),
        )
    });
    let d = collect(&Client::new(svc, "default"), &args()).await;
    assert!(text(&d, "kubeshift/NONE.txt").contains("CRDs are not installed"));
}

#[test]
fn the_archive_holds_every_file_under_one_directory_with_the_failures() {
    let dir = std::env::temp_dir().join(format!("kubeshift-sysdump-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("dump-1.tar.gz");
    let mut d = Dump::default();
    d.add("cluster/nodes.yaml", "- node-1\n");
    d.fail("cluster/events", anyhow!("forbidden"));
    write_archive(&d, &out).unwrap();

    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&out).unwrap()));
    let mut files = std::collections::BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).unwrap();
        files.insert(e.path().unwrap().display().to_string(), s);
    }
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["dump-1/cluster/nodes.yaml", "dump-1/failures.txt", "dump-1/index.txt"]
    );
    assert_eq!(files["dump-1/failures.txt"], "cluster/events: forbidden\n");
    assert!(files["dump-1/index.txt"].contains("cluster/nodes.yaml\t9 bytes"));
    assert!(!dir.join("dump-1.tmp").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A part's failure reads as the API server's answer, and context around it is kept.
#[test]
fn a_failure_is_one_line_with_the_api_servers_answer() {
    let status = kube::core::Status {
        code: 500,
        message: "Get \"https://node-1:10250/containerLogs/ns/p/c\": dial tcp: connect: network is unreachable".into(),
        ..Default::default()
    };
    let e = anyhow::Error::from(kube::Error::Api(Box::new(status))).context("reading the log");
    assert_eq!(
        why(&e),
        "reading the log: API error 500: Get \"https://node-1:10250/containerLogs/ns/p/c\": dial tcp: connect: network is unreachable"
    );
    let forbidden = kube::core::Status {
        code: 403,
        reason: "Forbidden".into(),
        message: "events is forbidden".into(),
        ..Default::default()
    };
    assert_eq!(why(&kube::Error::Api(Box::new(forbidden)).into()), "API error 403 Forbidden: events is forbidden");
    assert_eq!(why(&anyhow!("agent did not answer")), "agent did not answer");
}
