//! `--kubeconfig`, `--context` and `-n/--namespace`, as kubectl takes them: global
//! options of the `kubeshift` command, accepted before or after the subcommand
//! (`kubectl kubeshift --context prod migrate status`), declared once here and flattened
//! into the top-level parser. An unreachable apiserver is reported once, with the
//! address tried.

use anyhow::{bail, Context, Result};
use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::PathBuf;

#[derive(Args, Clone, Debug, Default)]
pub struct ClusterArgs {
    /// Path to the kubeconfig (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG", global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace scope, as kubectl's -n: the client's default namespace. kubeshift's
    /// commands work across the namespaces they need, so most do not use it;
    /// `connectivity test` has its own --namespace (see there).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

impl ClusterArgs {
    pub async fn client(&self) -> Result<Client> {
        let opts = KubeConfigOptions { context: self.context.clone(), ..Default::default() };
        let found = match &self.kubeconfig {
            Some(p) => Some((
                Kubeconfig::read_from(p).with_context(|| format!("reading kubeconfig {}", p.display()))?,
                p.display().to_string(),
            )),
            None => match Kubeconfig::read() {
                Ok(kc) => Some((kc, "~/.kube/config".to_string())),
                // Inside a pod (the agent's DaemonSet) there is no kubeconfig: the service
                // account's in-cluster config is the one to use.
                Err(_) if self.context.is_none() => None,
                Err(e) => return Err(e).context("no kubeconfig: pass --kubeconfig or set KUBECONFIG"),
            },
        };
        let mut cfg = match found {
            Some((kc, source)) => {
                if let Some(c) = &self.context {
                    if !kc.contexts.iter().any(|nc| nc.name == *c) {
                        let known: Vec<&str> = kc.contexts.iter().map(|nc| nc.name.as_str()).collect();
                        bail!("--context {c}: kubeconfig {source} has no such context (it has: {})", known.join(", "));
                    }
                }
                Config::from_custom_kubeconfig(kc, &opts).await.with_context(|| format!("kubeconfig {source}"))?
            }
            None => {
                Config::incluster().context("no kubeconfig (pass --kubeconfig or set KUBECONFIG) and not in a pod")?
            }
        };
        if let Some(ns) = &self.namespace {
            cfg.default_namespace = ns.clone();
        }
        let url = cfg.cluster_url.clone();
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
