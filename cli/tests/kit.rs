//! The operator's kit, checked without Docker or a cluster: the kind configs against
//! kind's v1alpha4 schema (unknown fields are errors, as a typo would otherwise make
//! kind silently install its default CNI), the CI workflow with actionlint, the
//! Containerfile with hadolint, and the built binary's shell fit (completions, man
//! pages, the kubectl plugin name).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// kind's `pkg/apis/config/v1alpha4/types.go` (`Cluster`), field for field.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct Cluster {
    kind: String,
    api_version: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(default)]
    networking: Networking,
    #[serde(default)]
    feature_gates: BTreeMap<String, bool>,
    #[serde(default)]
    runtime_config: BTreeMap<String, String>,
    #[serde(default)]
    kubeadm_config_patches: Vec<String>,
    #[serde(default, rename = "kubeadmConfigPatchesJSON6902")]
    kubeadm_config_patches_json6902: Vec<PatchJson6902>,
    #[serde(default)]
    containerd_config_patches: Vec<String>,
    #[serde(default, rename = "containerdConfigPatchesJSON6902")]
    containerd_config_patches_json6902: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct Node {
    #[serde(default)]
    role: Role,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    extra_mounts: Vec<Mount>,
    #[serde(default)]
    extra_port_mappings: Vec<PortMapping>,
    #[serde(default)]
    gpus: Option<String>,
    #[serde(default)]
    kubeadm_config_patches: Vec<String>,
    #[serde(default, rename = "kubeadmConfigPatchesJSON6902")]
    kubeadm_config_patches_json6902: Vec<PatchJson6902>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Role {
    #[default]
    ControlPlane,
    Worker,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct Networking {
    #[serde(default)]
    ip_family: Option<IpFamily>,
    #[serde(default, rename = "apiServerPort")]
    api_server_port: Option<i32>,
    #[serde(default, rename = "apiServerAddress")]
    api_server_address: Option<String>,
    #[serde(default)]
    pod_subnet: Option<String>,
    #[serde(default)]
    service_subnet: Option<String>,
    #[serde(default, rename = "disableDefaultCNI")]
    disable_default_cni: bool,
    #[serde(default)]
    kube_proxy_mode: Option<ProxyMode>,
    #[serde(default, rename = "dnsSearch")]
    dns_search: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum IpFamily {
    Ipv4,
    Ipv6,
    Dual,
}

/// The values kind's validator accepts (`pkg/internal/apis/config/validate.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProxyMode {
    Iptables,
    Ipvs,
    Nftables,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PatchJson6902 {
    group: String,
    version: String,
    kind: String,
    patch: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct Mount {
    #[serde(default)]
    container_path: Option<String>,
    #[serde(default)]
    host_path: Option<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default, rename = "selinuxRelabel")]
    selinux_relabel: bool,
    #[serde(default)]
    propagation: Option<Propagation>,
}

#[derive(Debug, Deserialize)]
enum Propagation {
    None,
    HostToContainer,
    Bidirectional,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct PortMapping {
    #[serde(default)]
    container_port: Option<i32>,
    #[serde(default)]
    host_port: Option<i32>,
    #[serde(default)]
    listen_address: Option<String>,
    #[serde(default)]
    protocol: Option<Protocol>,
}

#[derive(Debug, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
enum Protocol {
    TCP,
    UDP,
    SCTP,
}

const POOL_LABEL: &str = "node.kubernetes.io/pool";

fn kind_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kind-configs")
}

fn parse(path: &Path) -> Cluster {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: not a kind v1alpha4 Cluster: {e}", path.display()))
}

fn configs() -> Vec<(String, Cluster)> {
    let mut out: Vec<(String, Cluster)> = std::fs::read_dir(kind_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), parse(&p)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_kind_config_is_a_v1alpha4_cluster_for_a_migration_rehearsal() {
    let configs = configs();
    assert!(
        configs.len() >= 4,
        "expected the Flannel/Calico iptables, ipvs and nftables configs, got {}",
        configs.len()
    );
    for (name, c) in &configs {
        assert_eq!(c.kind, "Cluster", "{name}");
        assert_eq!(c.api_version, "kind.x-k8s.io/v1alpha4", "{name}");
        assert!(c.networking.disable_default_cni, "{name}: kindnet must be off so the legacy CNI can be installed");
        let mode = c.networking.kube_proxy_mode.unwrap_or(ProxyMode::Iptables);
        assert_ne!(mode, ProxyMode::None, "{name}: the rehearsal needs kube-proxy to migrate away from");

        // The name says the legacy CNI and the mode; the pod subnet is that CNI's default
        // so its stock manifest works unchanged.
        let (cni, mode_name) = name.split_once('-').unwrap_or_else(|| panic!("{name}: expected <cni>-<mode>.yaml"));
        let want_mode = match mode_name {
            "iptables" => ProxyMode::Iptables,
            "ipvs" => ProxyMode::Ipvs,
            "nftables" => ProxyMode::Nftables,
            other => panic!("{name}: unknown kube-proxy mode {other}"),
        };
        assert_eq!(mode, want_mode, "{name}");
        let want_subnet = match cni {
            "flannel" => "10.244.0.0/16",
            "calico" => "192.168.0.0/16",
            other => panic!("{name}: unknown legacy CNI {other}"),
        };
        assert_eq!(c.networking.pod_subnet.as_deref(), Some(want_subnet), "{name}");

        let roles: Vec<Role> = c.nodes.iter().map(|n| n.role).collect();
        assert_eq!(roles, [Role::ControlPlane, Role::Worker, Role::Worker], "{name}: 1 control plane + 2 workers");
        let pools: Vec<&str> =
            c.nodes.iter().map(|n| n.labels.get(POOL_LABEL).map(String::as_str).unwrap_or("")).collect();
        assert!(pools.iter().all(|p| !p.is_empty()), "{name}: every node needs {POOL_LABEL}");
        assert_ne!(pools[1], pools[2], "{name}: the two workers must be in two pools (two pool waves)");
        assert!(!pools[1..].contains(&pools[0]), "{name}: the control plane is its own pool");
    }
    let cnis: std::collections::BTreeSet<&str> = configs.iter().map(|(n, _)| n.split('-').next().unwrap()).collect();
    assert_eq!(cnis.into_iter().collect::<Vec<_>>(), ["calico", "flannel"]);
    let modes: std::collections::BTreeSet<ProxyMode> =
        configs.iter().map(|(_, c)| c.networking.kube_proxy_mode.unwrap_or(ProxyMode::Iptables)).collect();
    assert_eq!(modes.into_iter().collect::<Vec<_>>(), [ProxyMode::Iptables, ProxyMode::Ipvs, ProxyMode::Nftables]);
}

#[test]
fn the_schema_rejects_what_kind_would_reject_or_ignore() {
    let ok = "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnetworking:\n  disableDefaultCNI: true\n";
    serde_yaml::from_str::<Cluster>(ok).unwrap();
    for (bad, why) in [
        (ok.replace("disableDefaultCNI", "disableDefaultCni"), "misspelt field"),
        (format!("{ok}  kubeProxyMode: ebpf\n"), "mode kind's validator refuses"),
        (format!("{ok}nodes:\n  - role: master\n"), "unknown role"),
        (format!("{ok}nodes:\n  - role: worker\n    label: {{a: b}}\n"), "misspelt node field"),
    ] {
        assert!(serde_yaml::from_str::<Cluster>(&bad).is_err(), "{why} was accepted:\n{bad}");
    }
}

fn workflow() -> PathBuf {
    kind_dir().join(".github/workflows/kubeshift-kind.yaml")
}

#[test]
fn the_workflow_matrix_names_the_kind_configs_and_runs_the_whole_rehearsal() {
    let text = std::fs::read_to_string(workflow()).unwrap();
    let wf: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let matrix: Vec<String> = wf["jobs"]["migrate"]["strategy"]["matrix"]["config"]
        .as_sequence()
        .expect("jobs.migrate.strategy.matrix.config")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let names: Vec<String> = configs().into_iter().map(|(n, _)| n).collect();
    let mut sorted = matrix.clone();
    sorted.sort();
    assert_eq!(sorted, names, "the matrix must cover exactly the configs in kind-configs/");

    let steps = wf["jobs"]["migrate"]["steps"].as_sequence().unwrap();
    let kind_step =
        steps.iter().find(|s| s["uses"].as_str().is_some_and(|u| u.starts_with("helm/kind-action@"))).unwrap();
    // The control plane is never Ready before the legacy CNI is in: waiting would time out.
    assert_eq!(kind_step["with"]["wait"].as_i64(), Some(0));
    let run: String = steps.iter().filter_map(|s| s["run"].as_str()).collect::<Vec<_>>().join("\n");
    // In the order a rehearsal needs them.
    let mut at = 0;
    for cmd in [
        "kubeshift migrate plan",
        "kubeshift connectivity test --save",
        "kubeshift migrate apply -f plan.yaml --yes",
        "kubeshift connectivity test --compare",
        "iptables-save",
        "nft list ruleset",
        "kubeshift migrate rollback --node",
        "kubeshift sysdump",
    ] {
        let i = run[at..].find(cmd).unwrap_or_else(|| panic!("the workflow's steps lack {cmd:?} (after offset {at})"));
        at += i;
    }
    assert!(text.contains("junit/"), "JUnit results are uploaded");
}

/// A linter that this test needs: in CI (CI=true) its absence is a failure, since
/// scripts/setup-linters.sh installs it; on a developer's machine the test says so and
/// passes.
pub fn linter(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or(None);
    if found.is_none() {
        let msg = format!("{name} is not on PATH; run scripts/setup-linters.sh");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}

#[test]
fn actionlint_passes_the_workflow() {
    let Some(actionlint) = linter("actionlint") else { return };
    let out = std::process::Command::new(actionlint).arg("-no-color").arg(workflow()).output().unwrap();
    assert!(
        out.status.success(),
        "actionlint found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn actionlint_is_a_real_check() {
    // A broken workflow must fail, or a green check above means nothing.
    let Some(actionlint) = linter("actionlint") else { return };
    let dir = TempDir::new("actionlint");
    let bad = dir.0.join("bad.yaml");
    let text = std::fs::read_to_string(workflow()).unwrap().replace("${{ matrix.config }}", "${{ matrix.cofnig }}");
    std::fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(actionlint).arg("-no-color").arg(&bad).output().unwrap();
    assert!(!out.status.success(), "actionlint accepted an unknown matrix key");
}

/// A fresh directory under the system temp dir, removed on drop (also when a test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("kubeshift-kit-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn containerfile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../Containerfile")
}

#[test]
fn hadolint_passes_the_containerfile() {
    let Some(hadolint) = linter("hadolint") else { return };
    let out = std::process::Command::new(hadolint).arg("--no-color").arg(containerfile()).output().unwrap();
    assert!(
        out.status.success(),
        "hadolint found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_image_carries_the_agents_tools_and_one_binary() {
    let text = std::fs::read_to_string(containerfile()).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).collect::<Vec<_>>();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {stages:?}");
    assert!(stages[1].contains("debian:"), "Debian runtime: {}", stages[1]);
    let runtime = &text[text.rfind("FROM ").unwrap()..];
    for pkg in ["iproute2", "iptables", "nftables", "conntrack"] {
        assert!(runtime.split_whitespace().any(|w| w == pkg), "the runtime stage does not install {pkg}");
    }
    assert!(runtime.contains("/usr/local/bin/kubeshift"));
    assert!(text.contains("cargo build --release --locked -p kubeshift"));
}

#[test]
fn hadolint_is_a_real_check() {
    let Some(hadolint) = linter("hadolint") else { return };
    let dir = TempDir::new("hadolint");
    let bad = dir.0.join("Containerfile");
    // Without the reasoned ignore, the unpinned apt install is reported.
    let text = std::fs::read_to_string(containerfile()).unwrap().replace("# hadolint ignore=DL3008", "");
    std::fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(hadolint).arg("--no-color").arg(&bad).output().unwrap();
    assert!(!out.status.success(), "hadolint accepted an unpinned apt-get install");
    assert!(String::from_utf8_lossy(&out.stdout).contains("DL3008"));
}

fn kubeshift(args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubeshift")).args(args).output().unwrap();
    assert!(out.status.success(), "kubeshift {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn completions_generate_for_each_shell_and_know_the_subcommands() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef kubeshift"), ("fish", "complete -c kubeshift")] {
        let text = String::from_utf8(kubeshift(&["completion", shell]).stdout).unwrap();
        assert!(text.contains(marker), "{shell}: no {marker:?}");
        for sub in ["migrate", "connectivity", "runbook", "rollback", "completion"] {
            assert!(text.contains(sub), "{shell} completion does not know {sub}");
        }
    }
    // bash must accept what it is given to source.
    let bash = kubeshift(&["completion", "bash"]).stdout;
    let dir = TempDir::new("completion");
    std::fs::write(dir.0.join("k.bash"), bash).unwrap();
    let out = std::process::Command::new("bash").arg("-n").arg(dir.0.join("k.bash")).output().unwrap();
    assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_kubeshift")).args(["completion", "tcsh"]).output().unwrap();
    assert!(!out.status.success(), "an unknown shell is an error");
}

#[test]
fn man_pages_cover_every_command() {
    let top = String::from_utf8(kubeshift(&["man"]).stdout).unwrap();
    assert!(top.starts_with(".ie") || top.contains(".TH kubeshift 1"), "roff: {}", &top[..top.len().min(200)]);
    assert!(top.contains("migrate"));

    let dir = TempDir::new("man");
    kubeshift(&["man", "--out", dir.0.to_str().unwrap()]);
    let mut pages: Vec<String> =
        std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    pages.sort();
    for want in ["kubeshift.1", "kubeshift-migrate.1", "kubeshift-migrate-runbook.1", "kubeshift-migrate-rollback.1"] {
        assert!(pages.iter().any(|p| p == want), "no {want} in {pages:?}");
    }
    let rollback = std::fs::read_to_string(dir.0.join("kubeshift-migrate-rollback.1")).unwrap();
    assert!(rollback.contains("\\-\\-all") || rollback.contains("--all"), "the page documents the flags");
    // Hidden commands (the CNI plugin entry, the in-pod probe agent) get no page.
    assert!(!pages.iter().any(|p| p.contains("cni-plugin")), "{pages:?}");
}

#[test]
fn the_binary_is_a_kubectl_plugin_under_that_name() {
    let dir = TempDir::new("plugin");
    let plugin = dir.0.join("kubectl-kubeshift");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kubeshift"), &plugin).unwrap();
    let run = |args: &[&str]| std::process::Command::new(&plugin).args(args).output().unwrap();

    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // kubectl runs `kubectl-kubeshift ARGS` for `kubectl kubeshift ARGS`; the usage line
    // should show what the user typed.
    assert!(help.contains("Usage: kubectl kubeshift [OPTIONS] <COMMAND>"), "{help}");
    assert!(help.contains("migrate"));
    let out = run(&["migrate", "status", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("Usage: kubectl kubeshift migrate status"));
    // The same arguments reach the same commands: a parse error names the subcommand.
    let out = run(&["migrate", "rollback", "--bogus"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kubectl kubeshift migrate rollback"));

    // Under its own name, it stays `kubeshift`.
    let help = String::from_utf8(kubeshift(&["--help"]).stdout).unwrap();
    assert!(help.contains("Usage: kubeshift [OPTIONS] <COMMAND>"), "{help}");
    // kubectl's global flags are the top level's options.
    for flag in ["--kubeconfig <FILE>", "--context <NAME>", "-n, --namespace <NAMESPACE>", "-o, --output <FORMAT>"] {
        assert!(help.contains(flag), "no {flag} in {help}");
    }
}

/// A kubeconfig whose one cluster is 127.0.0.1:1, where nothing listens, with the
/// contexts `lab` (current) and `prod`.
fn unreachable_kubeconfig(dir: &Path) -> PathBuf {
    let path = dir.join("unreachable.kubeconfig");
    let yaml = "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
        clusters:\n- name: nowhere\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\n\
        users:\n- name: u\n  user:\n    token: t\n\
        contexts:\n- name: lab\n  context:\n    cluster: nowhere\n    user: u\n\
        - name: prod\n  context:\n    cluster: nowhere\n    user: u\n";
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The real binary, with no KUBECONFIG from the environment running the tests; fails
/// and says why on stderr.
fn kubeshift_fails(args: &[&str], env: &[(&str, &Path)]) -> String {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kubeshift"));
    c.env_remove("KUBECONFIG").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "kubeshift {args:?} succeeded against nothing: {stderr}");
    stderr
}

#[test]
fn global_cluster_flags_reach_the_command_before_or_after_it() {
    let dir = TempDir::new("global-flags");
    let k = unreachable_kubeconfig(&dir.0);
    let k = k.to_str().unwrap();
    let out = dir.0.join("dump.tar.gz");
    let out = out.to_str().unwrap();
    for args in [
        vec!["--kubeconfig", k, "migrate", "status"],
        vec!["migrate", "status", "--kubeconfig", k, "-o", "json"],
        vec!["--context", "prod", "migrate", "status", "-o", "json", "--kubeconfig", k],
        vec!["-o", "json", "--kubeconfig", k, "migrate", "status"],
        vec!["migrate", "--kubeconfig", k, "plan", "-o", "yaml"],
        vec!["--kubeconfig", k, "sysdump", "--out", out],
        vec!["sysdump", "--kubeconfig", k, "--out", out],
        vec!["-n", "shop", "connectivity", "test", "--kubeconfig", k],
    ] {
        let err = kubeshift_fails(&args, &[]);
        assert!(err.contains("https://127.0.0.1:1"), "{args:?}: the error names the server tried: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
    // KUBECONFIG is still read when no --kubeconfig is given.
    let err = kubeshift_fails(&["migrate", "status"], &[("KUBECONFIG", Path::new(k))]);
    assert!(err.contains("https://127.0.0.1:1"), "{err}");

    for args in [
        vec!["--context", "staging", "--kubeconfig", k, "migrate", "status"],
        vec!["migrate", "status", "--kubeconfig", k, "--context", "staging"],
    ] {
        let err = kubeshift_fails(&args, &[]);
        assert!(err.contains("--context staging"), "{args:?}: the error names the context: {err}");
        assert!(err.contains("lab, prod"), "{args:?}: and the ones there are: {err}");
    }

    // -o is checked against the command's formats, wherever it was given.
    let err = kubeshift_fails(&["-o", "compact", "--kubeconfig", k, "migrate", "status"], &[]);
    assert!(err.contains("-o compact: `kubeshift migrate status` writes table, yaml, json"), "{err}");
    let err = kubeshift_fails(&["-o", "json", "sysdump", "--kubeconfig", k], &[]);
    assert!(err.contains("-o json: this command has no output formats"), "{err}");
}

#[test]
fn migrate_runbook_end_to_end() {
    use kubeshift_planner::planning::{build_plan, PlanInput, PlanNodeInput};
    let node = |name: &str, pool: &str| PlanNodeInput {
        name: name.into(),
        pool: pool.into(),
        control_plane: pool == "control-plane",
        evictable_pods: 3,
    };
    let plan = build_plan(&PlanInput {
        name: "kind".into(),
        fingerprint: "sha1:0123".into(),
        legacy_cni: Some("flannel".into()),
        nodes: vec![
            node("kind-control-plane", "control-plane"),
            node("kind-worker", "blue"),
            node("kind-worker2", "green"),
        ],
        used_cidrs: vec!["10.244.0.0/16".into()],
        max_unavailable: 1,
        ..Default::default()
    })
    .unwrap();
    let dir = TempDir::new("runbook");
    let plan_path = dir.0.join("plan.yaml");
    std::fs::write(&plan_path, plan.to_yaml()).unwrap();
    let html = dir.0.join("runbook.html");
    kubeshift(&[
        "migrate",
        "runbook",
        "-f",
        plan_path.to_str().unwrap(),
        "-o",
        "html",
        "--out",
        html.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&html).unwrap();
    for n in ["kind-control-plane", "kind-worker", "kind-worker2"] {
        assert!(text.contains(&format!("id=\"node-{n}\"")), "no section for {n}");
        assert!(text.contains(&format!("kubeshift migrate rollback --node {n} --yes")));
    }
    let md = String::from_utf8(kubeshift(&["migrate", "runbook", "-f", plan_path.to_str().unwrap()]).stdout).unwrap();
    assert!(md.starts_with("# Migration runbook: kind\n"), "{}", &md[..80]);

    // Bad input: a clear error naming the file and the place, non-zero, nothing written.
    let bad = dir.0.join("bad.yaml");
    std::fs::write(&bad, plan.to_yaml().replace("waves:", "wavez:")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubeshift"))
        .args(["migrate", "runbook", "-f", bad.to_str().unwrap(), "--out", dir.0.join("no.md").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:") && err.contains("wavez"), "{err}");
    assert!(!dir.0.join("no.md").exists());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubeshift"))
        .args(["migrate", "runbook", "-f", plan_path.to_str().unwrap(), "--templates", "/nonexistent-kubeshift"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--templates /nonexistent-kubeshift: not a directory"));
}
