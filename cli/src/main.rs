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
mod output_format;
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
    /// --kubeconfig, --context, -n: global, as kubectl has them.
    #[command(flatten)]
    cluster: kubeconfig::ClusterArgs,
    /// Output format, as kubectl's -o. Each command that prints a report lists the
    /// formats it writes in its own help: migrate plan and status: table, yaml, json;
    /// migrate runbook: markdown, html; observe: compact, json; connectivity test and
    /// lab status: text, json. Other commands refuse it.
    #[arg(short = 'o', long, global = true, value_enum, value_name = "FORMAT")]
    output: Option<output_format::OutputFormat>,
}

impl Cli {
    /// Whether the command prints in a format `-o` chooses. A global option is accepted
    /// by every subcommand's parser, so the others refuse it here rather than ignore it.
    fn takes_output(&self) -> bool {
        use migrate_cmd::MigrateCommand as M;
        match &self.command {
            Command::Migrate(m) => matches!(m.command, M::Plan(_) | M::Status(_) | M::Runbook(_)),
            Command::Observe(_) => true,
            Command::Lab(l) => matches!(l.command, lab_cmd::LabCommand::Status { .. }),
            Command::Connectivity(c) => matches!(c.command, connectivity_cmd::ConnectivityCommand::Test { .. }),
            _ => false,
        }
    }
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
        // Targets match by string prefix, so `kube=off` would also silence every
        // `kubeshift_*` crate: name kube's crates one by one.
        .unwrap_or_else(|_| "info,kube_client=off,kube_runtime=warn,hyper=warn,rustls=warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn main() -> ExitCode {
    // Piped into `head`, a command should stop quietly, as other unix tools do, instead
    // of panicking on the closed pipe.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Run by a container runtime as the `kubeshift` CNI plugin (no arguments, CNI_*
    // in the environment): the binary is then its own `kubeshift-cni`, so a node whose
    // CNI bin dir got this binary (the lab's image when only `-p kubeshift` was built)
    // still wires pods.
    if std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some() {
        let env = std::env::vars().collect();
        let code =
            kubeshift_datapath::cni::main_with(&env, &mut std::io::stdin().lock(), &mut std::io::stdout().lock());
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = parse_cli();
    // CNI plugins speak JSON on stdout and must not log there or start a runtime.
    if let Command::Lab(lab_cmd::LabArgs { command: lab_cmd::LabCommand::CniPlugin { name } }) = &cli.command {
        return if kubeshift_lab::cni_plugins::main(name) { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    if let (Some(o), false) = (cli.output, cli.takes_output()) {
        eprintln!("error: -o {}: this command has no output formats", o.name());
        return ExitCode::FAILURE;
    }
    // Text generators: nothing to log, no runtime to start.
    match &cli.command {
        Command::Completion(a) => return report(shell_cmd::completion(a)),
        Command::Man(a) => return report(shell_cmd::man(a)),
        _ => {}
    }
    init_tracing();
    if matches!(cli.command, Command::Agent(_)) {
        // Before the runtime's threads exist: the agent is the one long-running process.
        kubeshift_datapath::agent::memory::tune_allocator();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let cluster = &cli.cluster;
        match cli.command {
            Command::Lab(args) => lab_cmd::run(args).await,
            Command::Connectivity(args) => connectivity_cmd::run(args, cluster, cli.output).await,
            Command::Agent(args) => agent_cmd::run(args, cluster).await,
            Command::Node(args) => node_cmd::run(args).await,
            Command::Migrate(args) => migrate_cmd::run(args, cluster).await,
            Command::Observe(args) => observe::run(args, cluster).await,
            Command::Sysdump(args) => sysdump::run(args, cluster).await,
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
    use output_format::OutputFormat;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?} does not parse:\n{e}"))
    }

    fn words(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    /// `--kubeconfig`, `--context` and `-n` before the subcommand, between, after, and
    /// mixed, for every command that talks to a cluster (with the spellings the tests
    /// and scripts already use).
    #[test]
    fn cluster_flags_go_before_or_after_the_subcommand() {
        let commands = [
            "migrate plan",
            "migrate check --plan P",
            "migrate apply -f P --yes",
            "migrate rollback --all --yes",
            "migrate status",
            "connectivity test",
            "agent --node n1",
            "sysdump --out F.tar.gz",
        ];
        for cmd in commands {
            let (first, rest) = cmd.split_once(' ').unwrap();
            for line in [
                format!("kubeshift --kubeconfig K --context prod -n shop {cmd}"),
                format!("kubeshift {cmd} --kubeconfig K --context prod --namespace shop"),
                format!("kubeshift {first} --kubeconfig K --context=prod -n shop {rest}"),
                format!("kubeshift --context prod {cmd} --kubeconfig=K -n shop"),
            ] {
                let cli = parse(&words(&line));
                assert_eq!(cli.cluster.kubeconfig.as_deref(), Some(std::path::Path::new("K")), "{line}");
                assert_eq!(cli.cluster.context.as_deref(), Some("prod"), "{line}");
                assert_eq!(cli.cluster.namespace.as_deref(), Some("shop"), "{line}");
            }
        }
    }

    fn status_output(cli: &Cli) -> OutputFormat {
        match &cli.command {
            Command::Migrate(migrate_cmd::MigrateArgs { command: migrate_cmd::MigrateCommand::Status(s) }) => s.output,
            _ => panic!("not migrate status"),
        }
    }

    fn plan_output(cli: &Cli) -> OutputFormat {
        match &cli.command {
            Command::Migrate(migrate_cmd::MigrateArgs { command: migrate_cmd::MigrateCommand::Plan(p) }) => p.output,
            _ => panic!("not migrate plan"),
        }
    }

    #[test]
    fn output_goes_before_or_after_the_subcommand() {
        for line in [
            "kubeshift --context prod migrate status -o json",
            "kubeshift -o json migrate status",
            "kubeshift migrate -o json status",
            "kubeshift migrate status --kubeconfig K -o json",
            "kubeshift migrate status --output=json",
            // The innermost one given wins.
            "kubeshift -o yaml migrate status -o json",
        ] {
            let cli = parse(&words(line));
            assert_eq!(status_output(&cli), OutputFormat::Json, "{line}");
            assert!(cli.takes_output(), "{line}");
        }
        assert_eq!(status_output(&parse(&words("kubeshift migrate status"))), OutputFormat::Table);
        assert_eq!(plan_output(&parse(&words("kubeshift migrate plan -o yaml"))), OutputFormat::Yaml);
        assert_eq!(plan_output(&parse(&words("kubeshift -o yaml migrate plan"))), OutputFormat::Yaml);
        // A command's own -o takes only its formats...
        let e = Cli::try_parse_from(words("kubeshift migrate plan -o compact")).err().expect("compact is observe's");
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(e.to_string().contains("[possible values: table, yaml, json]"), "{e}");
        // ...and one given before the subcommand is checked when the command runs.
        let cli = parse(&words("kubeshift -o compact migrate plan"));
        let e = output_format::narrow::<migrate_cmd::Output>(plan_output(&cli), "migrate plan").unwrap_err();
        assert_eq!(e.to_string(), "-o compact: `kubeshift migrate plan` writes table, yaml, json");

        let observe = |line: &str| match parse(&words(line)).command {
            Command::Observe(o) => o.output,
            _ => unreachable!(),
        };
        assert_eq!(observe("kubeshift observe"), OutputFormat::Compact);
        assert_eq!(observe("kubeshift observe -o json"), OutputFormat::Json);
        assert_eq!(observe("kubeshift -o json observe --last 5"), OutputFormat::Json);
        let runbook = |line: &str| match parse(&words(line)).command {
            Command::Migrate(migrate_cmd::MigrateArgs { command: migrate_cmd::MigrateCommand::Runbook(r) }) => r.output,
            _ => unreachable!(),
        };
        assert_eq!(runbook("kubeshift migrate runbook -f P"), OutputFormat::Markdown);
        assert_eq!(runbook("kubeshift migrate runbook -f P -o html --out R.html"), OutputFormat::Html);
        assert_eq!(runbook("kubeshift -o html migrate runbook -f P"), OutputFormat::Html);
        let lab = |line: &str| match parse(&words(line)).command {
            Command::Lab(lab_cmd::LabArgs { command: lab_cmd::LabCommand::Status { output, .. } }) => output,
            _ => unreachable!(),
        };
        assert_eq!(lab("kubeshift lab status --name l"), OutputFormat::Text);
        assert_eq!(lab("kubeshift lab status --name l -o json"), OutputFormat::Json);
        // connectivity test has no -o of its own: the global one (json = --json).
        let cli = parse(&words("kubeshift connectivity test -o json"));
        assert_eq!((cli.output, cli.takes_output()), (Some(OutputFormat::Json), true));
        // Commands without formats parse it (it is global) and refuse it in main.
        for line in
            ["kubeshift sysdump -o json", "kubeshift -o yaml migrate apply -f P", "kubeshift -o json completion bash"]
        {
            let cli = parse(&words(line));
            assert!(cli.output.is_some() && !cli.takes_output(), "{line}");
        }
        assert!(!parse(&words("kubeshift sysdump --out F")).takes_output());
    }

    /// connectivity test keeps its own --namespace (the namespace it creates and
    /// deletes), with its default, and the spelling the tests use.
    #[test]
    fn connectivity_test_keeps_its_namespace() {
        let ns = |line: &str| match parse(&words(line)).command {
            Command::Connectivity(connectivity_cmd::ConnectivityArgs {
                command: connectivity_cmd::ConnectivityCommand::Test { namespace, .. },
            }) => namespace,
            _ => unreachable!(),
        };
        assert_eq!(ns("kubeshift connectivity test --kubeconfig K"), "kubeshift-connectivity");
        assert_eq!(ns("kubeshift connectivity test --kubeconfig K --namespace ks-conn"), "ks-conn");
        assert_eq!(ns("kubeshift connectivity test -n ks-conn"), "ks-conn");
        assert_eq!(ns("kubeshift -n ks-conn connectivity test"), "ks-conn");
    }

    /// As a kubectl plugin: `kubectl kubeshift --context prod migrate status -o json`
    /// runs `kubectl-kubeshift` with those words.
    #[test]
    fn kubectl_plugin_takes_the_global_flags() {
        let argv = words("kubectl-kubeshift --context prod migrate status -o json --kubeconfig K");
        let m = cli_command(Some(std::ffi::OsStr::new(argv[0]))).try_get_matches_from(&argv).unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        assert_eq!(cli.cluster.context.as_deref(), Some("prod"));
        assert_eq!(cli.cluster.kubeconfig.as_deref(), Some(std::path::Path::new("K")));
        assert_eq!(status_output(&cli), OutputFormat::Json);
    }

    /// The kind workflow users copy runs kubeshift commands nobody can run here (no
    /// Docker): at least each must be one the parser accepts.
    #[test]
    fn every_kubeshift_command_in_the_kind_workflow_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../kind-configs/.github/workflows/kubeshift-kind.yaml");
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
