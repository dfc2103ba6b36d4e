//! `kubeshift lab …`: the user-facing up/down/status, and the hidden entry points the
//! lab starts as its own processes (forwarder, kubelet stand-ins, CNI daemons and
//! plugins, the echo server).

use anyhow::Result;
use clap::{Args, Subcommand};
use kubeshift_lab::{spec, Cni, LabSpec};
use std::path::PathBuf;

#[derive(Args)]
pub struct LabArgs {
    #[command(subcommand)]
    pub command: LabCommand,
}

/// What `lab status -o` writes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum StatusOutput {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum LabCommand {
    /// Start a lab: control plane, nodes with real kube-proxy and CNI plugins, demo workload.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 1)]
        pools: usize,
        /// The node label that carries the pool name.
        #[arg(long, default_value = "node.kubernetes.io/pool")]
        pool_label: String,
        /// flannel or calico.
        #[arg(long, default_value = "flannel")]
        cni: String,
        /// Loopback port for the API (0 picks a free one).
        #[arg(long, default_value_t = 0)]
        api_port: u16,
        /// Skip the demo workload.
        #[arg(long)]
        no_demo: bool,
        /// Make the first N nodes control-plane nodes (kubeadm's role labels and taint).
        #[arg(long, default_value_t = 0)]
        control_plane_nodes: usize,
        /// Leave a failed lab in place for debugging.
        #[arg(long)]
        keep_on_failure: bool,
    },
    /// Remove everything a lab made (namespaces, processes, cgroups, pins, state). Safe to repeat.
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Show the lab's processes and nodes.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, short = 'o', value_parser = crate::output_format::formats::<StatusOutput>(), default_value = "text")]
        output: crate::output_format::OutputFormat,
    },
    #[command(hide = true)]
    Forward {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    #[command(hide = true)]
    Kubelet {
        #[arg(long)]
        name: String,
        #[arg(long)]
        node: String,
    },
    #[command(hide = true)]
    Flanneld {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long)]
        net_conf: PathBuf,
        #[arg(long)]
        ip_masq: bool,
    },
    #[command(hide = true)]
    CalicoNode {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        kubeconfig: PathBuf,
    },
    #[command(hide = true)]
    CniPlugin { name: String },
    #[command(hide = true)]
    InstallCni {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        plugin: String,
        #[arg(long)]
        conf_name: Option<String>,
        #[arg(long)]
        conf_template: Option<PathBuf>,
        #[arg(long)]
        node: Option<String>,
    },
    #[command(hide = true)]
    Netexec {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub async fn run(args: LabArgs) -> Result<()> {
    match args.command {
        LabCommand::Up {
            name,
            nodes,
            pools,
            pool_label,
            cni,
            api_port,
            no_demo,
            control_plane_nodes,
            keep_on_failure,
        } => {
            let spec = LabSpec {
                name,
                nodes,
                pools,
                pool_label,
                cni: Cni::parse(&cni)?,
                api_port,
                demo: !no_demo,
                control_plane_nodes,
            };
            let st = kubeshift_lab::up::up(kubeshift_lab::up::UpOptions {
                spec,
                self_exe: std::env::current_exe()?,
                keep_on_failure,
            })
            .await?;
            let s = kubeshift_lab::status::status(&st.spec.name).await?;
            print!("{s}");
            println!("\nexport KUBECONFIG={}", st.kubeconfig.display());
            Ok(())
        }
        LabCommand::Down { name } => {
            let removed = kubeshift_lab::down::down(&name)?;
            if removed.is_empty() {
                println!("lab {name}: nothing to remove");
            } else {
                println!("lab {name}: removed {} items", removed.len());
                for r in removed {
                    println!("  {r}");
                }
            }
            let left = kubeshift_lab::down::leftovers(&name);
            anyhow::ensure!(left.is_empty(), "lab {name}: still present after down: {}", left.join(", "));
            Ok(())
        }
        LabCommand::Status { name, output } => {
            let s = kubeshift_lab::status::status(&name).await?;
            match crate::output_format::narrow(output, "lab status")? {
                StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                StatusOutput::Text => print!("{s}"),
            }
            Ok(())
        }
        LabCommand::Forward { name, port } => {
            let st = kubeshift_lab::LabState::load(&spec::state_dir(&name))?
                .ok_or_else(|| anyhow::anyhow!("lab {name} has no state"))?;
            kubeshift_lab::forward::run(kubeshift_lab::forward::ForwardArgs {
                listen: ([127, 0, 0, 1], port).into(),
                netns: st.spec.netns_control_plane(),
                target: (st.spec.apiserver_ip(), spec::APISERVER_PORT).into(),
                port_file: spec::state_dir(&name).join("api-port"),
            })
            .await
        }
        LabCommand::Kubelet { name, node } => kubeshift_lab::kubelet::run(&name, &node).await,
        LabCommand::Flanneld { root, node, kubeconfig, net_conf, ip_masq } => {
            kubeshift_lab::flanneld::run_flanneld(kubeshift_lab::flanneld::FlannelArgs {
                root: &root,
                node: &node,
                kubeconfig: &kubeconfig,
                net_conf: &net_conf,
                ip_masq,
            })
            .await
        }
        LabCommand::CalicoNode { root, node, kubeconfig } => {
            kubeshift_lab::calico_node::run_calico_node(kubeshift_lab::calico_node::CalicoArgs {
                root: &root,
                node: &node,
                kubeconfig: &kubeconfig,
            })
            .await
        }
        LabCommand::CniPlugin { .. } => unreachable!("handled before the runtime starts"),
        LabCommand::InstallCni { root, plugin, conf_name, conf_template, node } => kubeshift_lab::cni_plugins::install(
            &root,
            &plugin,
            conf_name.as_deref(),
            conf_template.as_deref(),
            node.as_deref(),
        ),
        LabCommand::Netexec { args } => tokio::task::spawn_blocking(move || kubeshift_lab::netexec::run(&args)).await?,
    }
}
