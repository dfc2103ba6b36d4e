//! The `kubeshift` binary: parses the command line and calls the libraries.

mod agent_cmd;
mod connectivity_cmd;
mod install_cmd;
mod kubeconfig;
mod lab_cmd;
mod migrate_apply;
mod migrate_cmd;
mod node_cmd;
mod observe;
mod runbook;
mod shell_cmd;
mod sysdump;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kubeshift",
    version,
    about = "Migrate a live Kubernetes cluster from iptables networking to an eBPF datapath, node pool by node pool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A real multi-node cluster on this machine, to rehearse migrations and to test kubeshift.
    Lab(lab_cmd::LabArgs),
    /// The connectivity suite: the gate between migration steps.
    Connectivity(connectivity_cmd::ConnectivityArgs),
    /// The node datapath daemon: keeps this node's eBPF service load balancer in step with the cluster.
    Agent(agent_cmd::AgentArgs),
    /// What one node looks like to the migration (`node report`).
    Node(node_cmd::NodeArgs),
    /// Plan (and check plans for) the migration of this cluster.
    Migrate(migrate_cmd::MigrateArgs),
    /// Flows the node agents see (like `hubble observe`): last N or follow, with filters.
    Observe(observe::ObserveArgs),
    /// Shell completion script for bash, zsh or fish (or elvish, powershell), on stdout.
    Completion(shell_cmd::CompletionArgs),
    /// Man pages: kubeshift(1) on stdout, or one page per command into --out DIR.
    Man(shell_cmd::ManArgs),
    /// Everything a bug report needs, from the API server, in one .tar.gz (never Secrets).
    Sysdump(sysdump::SysdumpArgs),
    /// Print the agent's manifests (ServiceAccount, RBAC, CRDs, DaemonSet) as YAML.
    Install(install_cmd::InstallArgs),
}

/// The program name kubectl looks for: `kubectl kubeshift ARGS` runs
/// `kubectl-kubeshift ARGS` from PATH.
const KUBECTL_PLUGIN_NAME: &str = "kubectl-kubeshift";

/// The clap command, named as the user invoked it, so that usage lines and errors show
/// `kubectl kubeshift migrate ...` to someone who typed that.
pub fn cli_command(argv0: Option<&std::ffi::OsStr>) -> clap::Command {
    let cmd = Cli::command();
    let invoked = argv0.and_then(|a| std::path::Path::new(a).file_name()).and_then(|n| n.to_str());
    if invoked == Some(KUBECTL_PLUGIN_NAME) {
        cmd.bin_name("kubectl kubeshift").display_name("kubectl-kubeshift")
    } else {
        cmd
    }
}

fn parse_cli() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = cli_command(args.first().map(|a| a.as_os_str())).get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=off,kube_client=off,hyper=warn,rustls=warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn main() -> ExitCode {
    // Piped into `head`, a command should stop quietly, as other unix tools do, instead
    // of panicking on the closed pipe.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = parse_cli();
    // CNI plugins speak JSON on stdout and must not log there or start a runtime.
    if let Command::Lab(lab_cmd::LabArgs { command: lab_cmd::LabCommand::CniPlugin { name } }) = &cli.command {
        return if kubeshift_lab::cni_plugins::main(name) { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    // Text generators: nothing to log, no runtime to start.
    match &cli.command {
        Command::Completion(a) => return report(shell_cmd::completion(a)),
        Command::Man(a) => return report(shell_cmd::man(a)),
        _ => {}
    }
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Lab(args) => lab_cmd::run(args).await,
            Command::Connectivity(args) => connectivity_cmd::run(args).await,
            Command::Agent(args) => agent_cmd::run(args).await,
            Command::Node(args) => node_cmd::run(args).await,
            Command::Migrate(args) => migrate_cmd::run(args).await,
            Command::Observe(args) => observe::run(args).await,
            Command::Sysdump(args) => sysdump::run(args).await,
            Command::Install(args) => install_cmd::run(&args),
            Command::Completion(_) | Command::Man(_) => unreachable!("handled before the runtime starts"),
        }
    });
    report(result)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kind workflow users copy runs kubeshift commands nobody can run here (no
    /// Docker): at least each must be one the parser accepts.
    #[test]
    fn every_kubeshift_command_in_the_kind_workflow_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../kind-configs/kubeshift-kind.yaml");
        let wf: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut parsed = Vec::new();
        for job in wf["jobs"].as_mapping().unwrap().values() {
            for step in job["steps"].as_sequence().unwrap() {
                for line in step["run"].as_str().unwrap_or("").lines().map(str::trim) {
                    if line != "kubeshift" && !line.starts_with("kubeshift ") {
                        continue;
                    }
                    let words = runbook::tests::shell_words(line);
                    match Cli::try_parse_from(&words) {
                        Ok(_) => {}
                        Err(e) if e.kind() == clap::error::ErrorKind::DisplayVersion => {}
                        Err(e) => panic!("{path}: {line:?} does not parse:\n{e}"),
                    }
                    parsed.push(words[1..3.min(words.len())].join(" "));
                }
            }
        }
        for want in ["migrate plan", "connectivity test", "migrate apply", "migrate rollback", "sysdump"] {
            assert!(parsed.iter().any(|p| p.starts_with(want)), "the workflow runs no `kubeshift {want}`: {parsed:?}");
        }
    }
}
