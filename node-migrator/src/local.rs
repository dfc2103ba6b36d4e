//! The node-local half of a node's migration, run by that node's agent (privileged,
//! host network): it reconciles its own `NodeMigration` with kube-runtime's
//! `Controller`, watching that one object by name. No SSH, no `kubectl exec`.
//!
//! The status is the hand-over. `migrate apply` writes a node-local step as entered
//! (`status.inProgress`); the agent performs it, checks its postcondition, and writes
//! it finished with what it changed ([`crate::next::finished`]). apply waits for that.
//! A step found entered again after a restart is simply run again: each tolerates
//! "already done".
//!
//! The node-local steps, forward / inverse / postcondition:
//! - `snapshot`: the node's networking as it is (iptables-save of both backends and
//!   families, the nft ruleset, IPVS, links, addresses and routes, CNI conf files with
//!   SHA-256) into a directory under the state dir; recorded: the directory and each
//!   file's size and hash. Inverse: nothing (the snapshot is kept). Postcondition: every
//!   file written.
//! - `clean-kube-proxy`: [`crate::cleanup::run_cleanup`] (verified by reading the rules
//!   again). Inverse: nothing here: kube-proxy rewrites its chains when it returns to the
//!   node in `take-over-services`' inverse, which apply waits for.
//! - `clean-legacy`: the legacy CNI's conf files leave the conf dir (moved into the state
//!   dir, so kubeshift's conf is the only one). Inverse: moved back.
//! - finish (`spec.removeLegacy`): [`crate::cleanup::run_legacy_removal`], recorded in
//!   `status.legacyRemoved`.

use crate::cleanup::exec::Ns;
use crate::cleanup::{run_cleanup, run_legacy_removal, CleanupError, CleanupOptions, Netns};
use crate::crd::{now, write_status, Direction, NodeMigration, StepRecord};
use crate::next;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::Client;
use kubeshift_planner::plan::StepAction;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// kubeshift's own CNI conf: never a legacy one.
const OWN_CONF: &str = "00-kubeshift.conflist";

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub node: String,
    /// The node's network namespace (the agent's own: it runs with the host network).
    pub netns: PathBuf,
    /// Snapshots and moved legacy conf files go under here.
    pub state_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
}

/// Whether the node's agent performs `step` (the others are apply's, from off the node).
pub fn is_local(step: StepAction) -> bool {
    matches!(step, StepAction::Snapshot | StepAction::CleanKubeProxy | StepAction::CleanLegacy)
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("writing NodeMigration {0}'s status: {1}")]
    Status(String, #[source] kube::Error),
    #[error("{step} on node {node}: {source}")]
    Cleanup { step: String, node: String, source: Box<CleanupError> },
    #[error("{step} on node {node}: {what}")]
    Io { step: String, node: String, what: String },
}

struct Ctx {
    api: Api<NodeMigration>,
    cfg: LocalConfig,
}

/// Runs until the watch ends (it retries API errors with backoff on its own).
pub async fn run(client: Client, cfg: LocalConfig) {
    let api: Api<NodeMigration> = Api::all(client);
    let selector = format!("metadata.name={}", cfg.node);
    let ctx = Arc::new(Ctx { api: api.clone(), cfg });
    Controller::new(api, watcher::Config::default().fields(&selector))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("node migration reconcile: {e}");
            }
        })
        .await;
}

fn error_policy(_nm: Arc<NodeMigration>, e: &LocalError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!("node migration: {e}; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(nm: Arc<NodeMigration>, ctx: Arc<Ctx>) -> Result<Action, LocalError> {
    let name = nm.metadata.name.clone().unwrap_or_default();
    let status = nm.status.clone().unwrap_or_default();
    if let Some(p) = status.in_progress.clone().filter(|p| is_local(p.step)) {
        let (changed, summary) = perform(&ctx.cfg, p.step, p.direction, &status)?;
        tracing::info!(step = %next::name(p.step), direction = ?p.direction, "{summary}");
        let done = next::finished(&nm.spec, status, changed, &summary, &now());
        write_status(&ctx.api, &nm, done).await.map_err(|e| LocalError::Status(name, e))?;
        return Ok(Action::await_change());
    }
    if nm.spec.remove_legacy && status.legacy_removed.is_none() {
        let started = now();
        let netns = Netns::at(&ctx.cfg.netns);
        let report = tokio::task::block_in_place(|| run_legacy_removal(&netns, &nm.spec.legacy_pod_cidrs)).map_err(
            |source| LocalError::Cleanup {
                step: "remove-legacy".into(),
                node: ctx.cfg.node.clone(),
                source: Box::new(source),
            },
        )?;
        tracing::info!("legacy CNI leftovers removed: {}", report.summary());
        let mut st = status;
        st.legacy_removed = Some(StepRecord {
            step: StepAction::CleanLegacy,
            direction: Direction::Forward,
            started_at: started,
            finished_at: now(),
            summary: report.summary(),
            changed: serde_json::to_value(&report).unwrap_or_default(),
        });
        write_status(&ctx.api, &nm, st).await.map_err(|e| LocalError::Status(name, e))?;
    }
    Ok(Action::await_change())
}

/// One node-local step in `direction`; what it changed (for its inverse) and a line for
/// `migrate status`.
fn perform(
    cfg: &LocalConfig,
    step: StepAction,
    direction: Direction,
    status: &crate::crd::NodeMigrationStatus,
) -> Result<(Value, String), LocalError> {
    let io = |what: String| LocalError::Io { step: next::name(step), node: cfg.node.clone(), what };
    match (step, direction) {
        (StepAction::Snapshot, Direction::Forward) => snapshot(cfg).map_err(io),
        (StepAction::CleanKubeProxy, Direction::Forward) => {
            let netns = Netns::at(&cfg.netns);
            let report =
                tokio::task::block_in_place(|| run_cleanup(&netns, &CleanupOptions::default())).map_err(|source| {
                    LocalError::Cleanup { step: next::name(step), node: cfg.node.clone(), source: Box::new(source) }
                })?;
            let summary = format!(
                "{} kube-proxy chains and {} rules removed, {} nftables tables, {} service conntrack entries",
                report.chains_removed(),
                report.rules_removed(),
                report.nftables_removed.len(),
                report.conntrack.iter().map(|c| c.deleted).sum::<u64>()
            );
            Ok((serde_json::to_value(report.summary()).unwrap_or_default(), summary))
        }
        (StepAction::CleanLegacy, Direction::Forward) => move_legacy_confs(cfg).map_err(io),
        (StepAction::CleanLegacy, Direction::Rollback) => {
            restore_legacy_confs(&next::forward_record(status, step)).map_err(io)
        }
        (_, Direction::Rollback) => Ok((json!({}), "nothing to undo on the node".into())),
        (other, _) => Err(io(format!("{} is not a node-local step", next::name(other)))),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The commands whose output makes a snapshot; a tool the node lacks (ipvsadm, ip6tables)
/// is recorded as missing rather than failing the step.
const SNAPSHOT_COMMANDS: [(&str, &[&str]); 10] = [
    ("iptables-legacy-save", &[]),
    ("iptables-nft-save", &[]),
    ("ip6tables-legacy-save", &[]),
    ("ip6tables-nft-save", &[]),
    ("nft", &["list", "ruleset"]),
    ("ipvsadm", &["-Sn"]),
    ("ip", &["-d", "link", "show"]),
    ("ip", &["addr", "show"]),
    ("ip", &["route", "show", "table", "all"]),
    ("ip", &["-6", "route", "show", "table", "all"]),
];

fn snapshot(cfg: &LocalConfig) -> Result<(Value, String), String> {
    let dir = cfg.state_dir.join("snapshots").join(format!("{}-{}", cfg.node, now().replace(':', "")));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let ns = Ns::open(&Netns::at(&cfg.netns)).map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    let mut missing = Vec::new();
    let mut write = |name: String, bytes: &[u8]| -> Result<(), String> {
        let path = dir.join(&name);
        std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
        files.push(json!({"name": name, "bytes": bytes.len(), "sha256": sha256_hex(bytes)}));
        Ok(())
    };
    for (program, args) in SNAPSHOT_COMMANDS {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        match ns.run(program, &args, None) {
            Ok(ran) if ran.status.success() => {
                write(format!("{}.txt", ran.command.replace(' ', "_")), ran.stdout.as_bytes())?
            }
            Ok(ran) => missing.push(format!("{}: {}", ran.command, ran.stderr.trim())),
            Err(e) => missing.push(e.to_string()),
        }
    }
    for entry in std::fs::read_dir(&cfg.cni_conf_dir).map_err(|e| format!("{}: {e}", cfg.cni_conf_dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            let bytes = std::fs::read(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
            write(format!("cni-conf_{}", entry.file_name().to_string_lossy()), &bytes)?;
        }
    }
    let summary = format!("{} files in {}", files.len(), dir.display());
    Ok((json!({"dir": dir, "files": files, "missing": missing}), summary))
}

/// A legacy CNI conf: anything the runtime would read from the conf dir but kubeshift's.
fn is_legacy_conf(name: &str) -> bool {
    name != OWN_CONF && [".conf", ".conflist", ".json"].iter().any(|ext| name.ends_with(ext))
}

fn move_legacy_confs(cfg: &LocalConfig) -> Result<(Value, String), String> {
    let backup = cfg.state_dir.join("legacy-cni-conf");
    std::fs::create_dir_all(&backup).map_err(|e| format!("creating {}: {e}", backup.display()))?;
    let mut moved = Vec::new();
    for entry in std::fs::read_dir(&cfg.cni_conf_dir).map_err(|e| format!("{}: {e}", cfg.cni_conf_dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !is_legacy_conf(&name) {
            continue;
        }
        let to = backup.join(&name);
        move_file(&entry.path(), &to)?;
        moved.push(json!({"from": entry.path(), "to": to}));
    }
    let summary = format!("{} legacy CNI conf files moved to {}", moved.len(), backup.display());
    Ok((json!({"moved": moved}), summary))
}

fn restore_legacy_confs(record: &Value) -> Result<(Value, String), String> {
    let mut restored = 0;
    for m in record.get("moved").and_then(|m| m.as_array()).into_iter().flatten() {
        let (Some(from), Some(to)) = (m.get("from").and_then(|v| v.as_str()), m.get("to").and_then(|v| v.as_str()))
        else {
            continue;
        };
        // Already back (a re-run), or the legacy agent wrote its conf again: leave it.
        if Path::new(from).exists() || !Path::new(to).exists() {
            continue;
        }
        move_file(Path::new(to), Path::new(from))?;
        restored += 1;
    }
    Ok((json!({"restored": restored}), format!("{restored} legacy CNI conf files moved back")))
}

/// rename(2) where it can; copy and remove across filesystems (the state dir and the
/// conf dir are separate hostPath mounts).
fn move_file(from: &Path, to: &Path) -> Result<(), String> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    std::fs::remove_file(from).map_err(|e| format!("removing {}: {e}", from.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_node_local_steps_are_the_agents() {
        assert!(is_local(StepAction::Snapshot) && is_local(StepAction::CleanKubeProxy));
        assert!(!is_local(StepAction::Drain) && !is_local(StepAction::SwitchPods));
    }

    #[test]
    fn legacy_confs_move_out_and_back_and_kubeshifts_stays() {
        let root = std::env::temp_dir().join(format!("ks-local-{}", std::process::id()));
        let conf = root.join("net.d");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join(OWN_CONF), "{}").unwrap();
        std::fs::write(conf.join("10-flannel.conflist"), "{\"name\":\"cbr0\"}").unwrap();
        std::fs::write(conf.join("calico-kubeconfig"), "x").unwrap();
        let cfg = LocalConfig {
            node: "n".into(),
            netns: "/proc/self/ns/net".into(),
            state_dir: root.join("state"),
            cni_conf_dir: conf.clone(),
        };
        let (rec, _) = move_legacy_confs(&cfg).unwrap();
        assert!(!conf.join("10-flannel.conflist").exists());
        assert!(conf.join(OWN_CONF).exists() && conf.join("calico-kubeconfig").exists());
        let (again, _) = move_legacy_confs(&cfg).unwrap();
        assert_eq!(again["moved"].as_array().unwrap().len(), 0, "a second run moves nothing");
        restore_legacy_confs(&rec).unwrap();
        assert_eq!(std::fs::read_to_string(conf.join("10-flannel.conflist")).unwrap(), "{\"name\":\"cbr0\"}");
        let (r, _) = restore_legacy_confs(&rec).unwrap();
        assert_eq!(r["restored"], 0, "restoring twice is restoring once");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
