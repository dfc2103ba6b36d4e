//! `kubeshift connectivity test` and the hidden in-pod `agent`.

use crate::kubeconfig::ClusterArgs;
use crate::output_format::{narrow, OutputFormat};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kubeshift_connectivity_test::{agent, deploy::DeployConfig, report, suite};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ConnectivityArgs {
    #[command(subcommand)]
    pub command: ConnectivityCommand,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run; boxing would only obscure the fields
pub enum ConnectivityCommand {
    /// Deploy probe pods, run every scenario, report, clean up.
    Test {
        /// The namespace the suite creates for its pods and deletes when done (it
        /// refuses one that exists and is not its own). Not kubectl's `-n`, the scope of
        /// a command in a namespace that exists, so this command keeps its own option
        /// and default; clap gives it the global option's value too, so `kubeshift -n X
        /// connectivity test` also runs the suite in X.
        #[arg(short = 'n', long, default_value = "kubeshift-connectivity")]
        namespace: String,
        /// Only scenarios whose name matches this regex.
        #[arg(long)]
        test: Option<String>,
        /// Timeout of one probe, e.g. 2s or 500ms.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        probe_timeout: Duration,
        /// Nodes to place test pods on (repeat); default: the first two Ready nodes.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// How long failing probes are retried before they count (datapath programming lag).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        settle: Duration,
        /// Save the verdict matrix here.
        #[arg(long)]
        save: Option<PathBuf>,
        /// Compare the verdict matrix with one saved earlier; every changed pair fails the run.
        #[arg(long)]
        compare: Option<PathBuf>,
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Print the report as JSON instead of text (the same as `-o json`).
        #[arg(long)]
        json: bool,
        /// Start long-lived connections through ClusterIPs and keep the test namespace,
        /// for a later run with --include-conn-disrupt (e.g. before a migration step).
        #[arg(long)]
        conn_disrupt_setup: bool,
        /// Check that every connection from an earlier --conn-disrupt-setup is unbroken.
        #[arg(long)]
        include_conn_disrupt: bool,
        /// Leave the test namespace in place for debugging.
        #[arg(long)]
        keep: bool,
        #[arg(long, default_value = "registry.k8s.io/e2e-test-images/agnhost:2.39")]
        echo_image: String,
        #[arg(long, default_value = "docker.io/kubeshift/kubeshift:0.1.0")]
        agent_image: String,
        /// The command that starts kubeshift inside the agent image.
        #[arg(long, default_value = "kubeshift")]
        agent_command: String,
    },
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        pod: String,
        #[arg(long)]
        sa_dir: PathBuf,
        #[arg(long)]
        server: String,
        #[arg(long, default_value_t = 8082)]
        stream_port: u16,
    },
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 2s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// What `connectivity test -o` writes (the global `-o`; `--json` is the older spelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TestOutput {
    Text,
    Json,
}

pub async fn run(args: ConnectivityArgs, cluster: &ClusterArgs, output: Option<OutputFormat>) -> Result<()> {
    match args.command {
        ConnectivityCommand::Agent { namespace, pod, sa_dir, server, stream_port } => {
            agent::run(agent::AgentArgs { namespace, pod, sa_dir, server, stream_port }).await
        }
        ConnectivityCommand::Test {
            namespace,
            test,
            probe_timeout,
            settle,
            nodes,
            save,
            compare,
            junit,
            json,
            conn_disrupt_setup,
            include_conn_disrupt,
            keep,
            echo_image,
            agent_image,
            agent_command,
        } => {
            let json = json || output.map(|o| narrow(o, "connectivity test")).transpose()? == Some(TestOutput::Json);
            let filter = test
                .map(|t| regex::Regex::new(&t).with_context(|| format!("--test {t:?} is not a valid regex")))
                .transpose()?;
            let client = cluster.client().await?;
            let opts = suite::SuiteOptions {
                deploy: DeployConfig {
                    namespace,
                    echo_image,
                    agent_image,
                    agent_command: agent_command.split_whitespace().map(String::from).collect(),
                    nodes,
                    host_port_base: kubeshift_connectivity_test::deploy::HOST_PORT_BASE,
                },
                probe_timeout,
                settle,
                conn_disrupt_setup,
                include_conn_disrupt,
                filter,
                keep,
                compare,
                progress: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let r = suite::run(&client, &opts).await?;
            if let Some(p) = &save {
                std::fs::write(p, serde_json::to_string_pretty(&r.matrix)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            if let Some(p) = &junit {
                std::fs::write(p, report::junit(&r)).with_context(|| format!("writing {}", p.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", report::text(&r));
            }
            anyhow::ensure!(r.passed(), "connectivity test failed");
            Ok(())
        }
    }
}
