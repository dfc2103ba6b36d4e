//! Applies the cleanup inside a network namespace with the real tools, and
//! checks the result by reading the rules again.
//!
//! Every command's exit status is checked and its stderr kept: the Rust
//! `iptables` crate returns empty output when a command fails, which would
//! read as "nothing to clean" on a node full of rules.

use super::conntrack::deleted_count;
use super::iptables::plan_ruleset;
use super::nftables::{plan_nftables, set_addresses};
use super::{
    iptables_binary, plan_conntrack, Backend, CleanupError, ConntrackFlush, ConntrackPlan, ConntrackScope, Family,
    IptablesPlan, KubeletChains, NftTable, PlanError, Report,
};
use kubeshift_planner::iptables::save_rules::{parse_saved_rules, SavedRuleset};
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// A network namespace, by its file: `/var/run/netns/NAME` (iproute2) or
/// `/proc/PID/ns/net` (a process's, e.g. the host's from a hostPID pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    path: PathBuf,
}

impl Netns {
    pub fn named(name: &str) -> Netns {
        Netns { path: Path::new("/var/run/netns").join(name) }
    }

    pub fn of_pid(pid: u32) -> Netns {
        Netns { path: PathBuf::from(format!("/proc/{pid}/ns/net")) }
    }

    pub fn at(path: impl Into<PathBuf>) -> Netns {
        Netns { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where the conntrack flush takes its addresses from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConntrackSource {
    Skip,
    /// ClusterIPs in kube-proxy's rules as read before the cleanup
    /// (iptables KUBE-SERVICES, the nftables `cluster-ips` set), plus these
    /// (e.g. from the Service list, for IPVS mode).
    FromRules {
        extra: Vec<IpAddr>,
    },
    /// Only these.
    Given(Vec<IpAddr>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupOptions {
    pub kubelet: KubeletChains,
    /// Both by default: kube-proxy's image may have picked the other backend
    /// than kubelet, and a node that switched backends holds rules in both.
    pub backends: Vec<Backend>,
    pub families: Vec<Family>,
    /// Delete `ip kube-proxy` / `ip6 kube-proxy`.
    pub nftables: bool,
    pub conntrack: ConntrackSource,
    pub conntrack_scope: ConntrackScope,
}

impl Default for CleanupOptions {
    fn default() -> Self {
        CleanupOptions {
            kubelet: KubeletChains::Detect,
            backends: Backend::ALL.to_vec(),
            families: Family::ALL.to_vec(),
            nftables: true,
            conntrack: ConntrackSource::FromRules { extra: Vec::new() },
            conntrack_scope: ConntrackScope::AllProtocols,
        }
    }
}

/// Removes kube-proxy's iptables chains and jumps (each backend and family),
/// its nftables tables and the conntrack entries of service addresses in
/// `netns`, then reads the rules again and fails if any kube-proxy chain is
/// left or a kept chain changed. Running it again removes nothing and
/// succeeds.
pub fn run_cleanup(netns: &Netns, opts: &CleanupOptions) -> Result<Report, CleanupError> {
    let ns = Ns::open(netns)?;
    let mut report = Report::default();
    let mut conntrack = ConntrackPlan::new(opts.conntrack_scope, []);
    for &backend in &opts.backends {
        for &family in &opts.families {
            let plan = clean_iptables(&ns, backend, family, opts, &mut conntrack, &mut report.warnings)?;
            report.iptables.push(plan);
        }
    }
    if opts.nftables {
        let from_rules = matches!(opts.conntrack, ConntrackSource::FromRules { .. });
        let found = if from_rules { Some(&mut conntrack) } else { None };
        report.nftables_removed = clean_nftables(&ns, found, &mut report.warnings)?;
    }
    match &opts.conntrack {
        ConntrackSource::Skip => conntrack.addresses.clear(),
        ConntrackSource::FromRules { extra } => conntrack.extend(extra.iter().copied()),
        ConntrackSource::Given(ips) => conntrack = ConntrackPlan::new(opts.conntrack_scope, ips.iter().copied()),
    }
    report.conntrack = flush_conntrack(&ns, &conntrack)?;
    Ok(report)
}

fn clean_iptables(
    ns: &Ns,
    backend: Backend,
    family: Family,
    opts: &CleanupOptions,
    conntrack: &mut ConntrackPlan,
    warnings: &mut Vec<String>,
) -> Result<IptablesPlan, CleanupError> {
    let (text, before) = read_rules(ns, backend, family, warnings)?;
    if matches!(opts.conntrack, ConntrackSource::FromRules { .. }) {
        let save = iptables_binary(backend, family, "-save");
        let found = plan_conntrack(&save, &text, opts.conntrack_scope).map_err(|e| ns.parse_error(&save, e))?;
        conntrack.extend(found.addresses);
    }
    let plan = plan_ruleset(backend, family, &before, opts.kubelet);
    let kubelet = if plan.kubelet_owns_mark_chains { KubeletChains::OwnsMarkChains } else { KubeletChains::HintOnly };
    apply_and_verify(ns, plan, &before, warnings, "kube-proxy", |after| plan_ruleset(backend, family, after, kubelet))
}

/// Restores `plan` and checks the postcondition: `left` of the rules read again is
/// empty, and every chain that stayed holds exactly its old rules minus the deleted jumps.
pub(crate) fn apply_and_verify(
    ns: &Ns,
    plan: IptablesPlan,
    before: &SavedRuleset,
    warnings: &mut Vec<String>,
    whose: &str,
    left: impl Fn(&SavedRuleset) -> IptablesPlan,
) -> Result<IptablesPlan, CleanupError> {
    let input = plan.restore_input();
    if !input.is_empty() {
        restore(ns, plan.backend, plan.family, &input, warnings)?;
    }
    let (_, after) = read_rules(ns, plan.backend, plan.family, warnings)?;
    verify(ns, &plan, before, &after, &left(&after), whose)?;
    Ok(plan)
}

pub(crate) fn read_rules(
    ns: &Ns,
    backend: Backend,
    family: Family,
    warnings: &mut Vec<String>,
) -> Result<(String, SavedRuleset), CleanupError> {
    let save = iptables_binary(backend, family, "-save");
    let ran = ns.run(&save, &[], None)?;
    if !ran.status.success() {
        return Err(CleanupError::Read {
            command: save,
            netns: ns.label.clone(),
            status: ran.status.to_string(),
            stderr: ran.stderr,
        });
    }
    ran.warn_into(warnings);
    let rules = parse_saved_rules(&save, &ran.stdout).map_err(|e| ns.parse_error(&save, e.into()))?;
    Ok((ran.stdout, rules))
}

fn restore(
    ns: &Ns,
    backend: Backend,
    family: Family,
    input: &str,
    warnings: &mut Vec<String>,
) -> Result<(), CleanupError> {
    let program = iptables_binary(backend, family, "-restore");
    // --wait: iptables-legacy takes the host-wide xtables lock, and kubelet
    // or a CNI agent may hold it for a moment.
    let args = ["--noflush".to_string(), "--wait".to_string()];
    let ran = ns.run(&program, &args, Some(input))?;
    if !ran.status.success() {
        return Err(CleanupError::Restore {
            command: ran.command,
            netns: ns.label.clone(),
            status: ran.status.to_string(),
            stderr: ran.stderr,
            input: input.to_string(),
        });
    }
    ran.warn_into(warnings);
    Ok(())
}

/// The postcondition: nothing of `whose` left, and every chain that stayed holds
/// exactly its old rules minus the deleted jumps.
fn verify(
    ns: &Ns,
    plan: &IptablesPlan,
    before: &SavedRuleset,
    after: &SavedRuleset,
    left: &IptablesPlan,
    whose: &str,
) -> Result<(), CleanupError> {
    let command = iptables_binary(plan.backend, plan.family, "-save");
    let fail = |what: String| CleanupError::Postcondition { command: command.clone(), netns: ns.label.clone(), what };
    if !left.is_empty() {
        let chains: Vec<String> =
            left.tables.iter().flat_map(|t| t.chains_removed.iter().map(move |c| format!("{} {c}", t.table))).collect();
        let jumps = left.tables.iter().map(|t| t.jumps_removed.len()).sum::<usize>();
        return Err(fail(format!("{whose} chains still present: {chains:?}; jumps to them: {jumps}")));
    }
    let expected = plan.apply_to(before);
    for table in &expected.tables {
        for chain in &table.chains {
            let Some(now) = after.table(&table.name).and_then(|t| t.chain(&chain.name)) else {
                return Err(fail(format!(
                    "chain {} of table {} is gone but was not {whose}'s",
                    chain.name, table.name
                )));
            };
            let want: Vec<&str> = chain.rules.iter().map(|r| r.spec.as_str()).collect();
            let got: Vec<&str> = now.rules.iter().map(|r| r.spec.as_str()).collect();
            if got != want {
                return Err(fail(format!(
                    "chain {} of table {} changed: expected {want:?}, found {got:?}",
                    chain.name, table.name
                )));
            }
        }
    }
    Ok(())
}

fn clean_nftables(
    ns: &Ns,
    mut conntrack: Option<&mut ConntrackPlan>,
    warnings: &mut Vec<String>,
) -> Result<Vec<NftTable>, CleanupError> {
    let plan = plan_nftables(&list_nft_tables(ns, warnings)?);
    for table in &plan.remove {
        if let Some(c) = conntrack.as_deref_mut() {
            c.extend(cluster_ips(ns, table, warnings)?);
        }
        let args: Vec<String> = table.delete_args().iter().map(|s| s.to_string()).collect();
        let ran = ns.run("nft", &args, None)?;
        if !ran.status.success() {
            return Err(CleanupError::NftDelete {
                command: ran.command,
                netns: ns.label.clone(),
                status: ran.status.to_string(),
                stderr: ran.stderr,
            });
        }
        ran.warn_into(warnings);
    }
    let left = plan_nftables(&list_nft_tables(ns, warnings)?);
    if !left.remove.is_empty() {
        let names: Vec<String> = left.remove.iter().map(|t| format!("{} {}", t.family, t.name)).collect();
        return Err(CleanupError::Postcondition {
            command: "nft list tables".into(),
            netns: ns.label.clone(),
            what: format!("kube-proxy tables still present: {names:?}"),
        });
    }
    Ok(plan.remove)
}

/// The table's ClusterIPs; none when the set does not exist (a kube-proxy
/// release that named it otherwise).
fn cluster_ips(ns: &Ns, table: &NftTable, warnings: &mut Vec<String>) -> Result<Vec<IpAddr>, CleanupError> {
    let args: Vec<String> = table.list_cluster_ips_args().iter().map(|s| s.to_string()).collect();
    let ran = ns.run("nft", &args, None)?;
    if ran.status.success() {
        ran.warn_into(warnings);
        return Ok(set_addresses(&ran.stdout));
    }
    if ran.stderr.contains("No such file or directory") {
        return Ok(Vec::new());
    }
    Err(CleanupError::Read {
        command: ran.command,
        netns: ns.label.clone(),
        status: ran.status.to_string(),
        stderr: ran.stderr,
    })
}

fn list_nft_tables(ns: &Ns, warnings: &mut Vec<String>) -> Result<String, CleanupError> {
    ns.read("nft", &["list".into(), "tables".into()], warnings).map(|(_, out)| out)
}

fn flush_conntrack(ns: &Ns, plan: &ConntrackPlan) -> Result<Vec<ConntrackFlush>, CleanupError> {
    let mut out = Vec::new();
    for &address in &plan.addresses {
        let ran = ns.run("conntrack", &plan.args(address), None)?;
        // conntrack exits 1 when it deleted nothing; kube-proxy accepts that
        // the same way (its "0 flow entries have been deleted" check).
        let deleted = deleted_count(&ran.stderr);
        match (ran.status.success(), deleted) {
            (true, d) | (false, d @ Some(0)) => {
                out.push(ConntrackFlush { address, deleted: d.unwrap_or(0) });
            }
            _ => {
                return Err(CleanupError::Conntrack {
                    command: ran.command,
                    netns: ns.label.clone(),
                    status: ran.status.to_string(),
                    stderr: ran.stderr,
                })
            }
        }
    }
    Ok(out)
}

/// The opened namespace file; commands enter it with setns(2) between fork
/// and exec, so nothing else of this process changes namespace.
pub(crate) struct Ns {
    file: File,
    pub(crate) label: String,
}

pub(crate) struct Ran {
    pub(crate) command: String,
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Ran {
    pub(crate) fn warn_into(&self, warnings: &mut Vec<String>) {
        let e = self.stderr.trim();
        if !e.is_empty() {
            warnings.push(format!("{}: {e}", self.command));
        }
    }
}

impl Ns {
    pub(crate) fn open(netns: &Netns) -> Result<Ns, CleanupError> {
        let label = netns.path.display().to_string();
        let file =
            File::open(&netns.path).map_err(|source| CleanupError::OpenNetns { netns: label.clone(), source })?;
        Ok(Ns { file, label })
    }

    fn parse_error(&self, command: &str, source: PlanError) -> CleanupError {
        CleanupError::Parse { command: command.to_string(), netns: self.label.clone(), source }
    }

    /// Runs a command that only reads; its stdout (and the command line), or a `Read`
    /// error with what it said. stderr of a success goes to `warnings`.
    pub(crate) fn read(
        &self,
        program: &str,
        args: &[String],
        warnings: &mut Vec<String>,
    ) -> Result<(String, String), CleanupError> {
        let ran = self.run(program, args, None)?;
        if !ran.status.success() {
            return Err(CleanupError::Read {
                command: ran.command,
                netns: self.label.clone(),
                status: ran.status.to_string(),
                stderr: ran.stderr,
            });
        }
        ran.warn_into(warnings);
        Ok((ran.command, ran.stdout))
    }

    pub(crate) fn run(&self, program: &str, args: &[String], stdin: Option<&str>) -> Result<Ran, CleanupError> {
        let command = std::iter::once(program).chain(args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ");
        let spawn_err = |source| CleanupError::Spawn { command: command.clone(), netns: self.label.clone(), source };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let fd = self.file.as_raw_fd();
        // SAFETY: only setns(2), an async-signal-safe syscall, runs in the
        // forked child; the fd stays open in the parent for the call.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // A writer thread: a child that answers while reading a large input
        // must not block on a full stdout pipe nobody drains yet.
        let writer = stdin.map(|input| {
            let mut pipe = child.stdin.take().expect("stdin piped");
            let input = input.to_string();
            std::thread::spawn(move || pipe.write_all(input.as_bytes()))
        });
        let out = child.wait_with_output().map_err(spawn_err)?;
        if let Some(w) = writer {
            // A write error means the child exited early; its status says why.
            let _ = w.join();
        }
        Ok(Ran {
            command,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
