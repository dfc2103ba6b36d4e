//! `--kubeconfig` and `--context`, as kubectl takes them, for every command that talks
//! to a cluster. An unreachable apiserver is reported once, with the address tried.

use anyhow::{Context, Result};
use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct ClusterArgs {
    /// Path to the kubeconfig (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
}

impl ClusterArgs {
    pub async fn client(&self) -> Result<Client> {
        let opts = KubeConfigOptions { context: self.context.clone(), ..Default::default() };
        let cfg = match &self.kubeconfig {
            Some(p) => {
                let kc = Kubeconfig::read_from(p).with_context(|| format!("reading kubeconfig {}", p.display()))?;
                Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .with_context(|| format!("kubeconfig {}", p.display()))?
            }
            // Inside a pod (the agent's DaemonSet) there is no kubeconfig: the service
            // account's in-cluster config is the one to use.
            None if opts.context.is_none() => {
                Config::infer().await.context("no kubeconfig (pass --kubeconfig or set KUBECONFIG) and not in a pod")?
            }
            None => {
                Config::from_kubeconfig(&opts).await.context("no kubeconfig: pass --kubeconfig or set KUBECONFIG")?
            }
        };
        let url = cfg.cluster_url.clone();
        let mut cfg = cfg;
        cfg.connect_timeout = Some(std::time::Duration::from_secs(5));
        // kube retries 429s up to 15 times with backoff of up to 1000 s by default; a 429 from
        // the eviction API means "a PodDisruptionBudget says not now", which drain must see
        // at once to keep its own deadline and message.
        cfg.default_retry = false;
        let client = Client::try_from(cfg)?;
        client.apiserver_version().await.with_context(|| format!("the API server at {url} is not reachable"))?;
        Ok(client)
    }
}
