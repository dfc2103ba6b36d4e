//! Talking to the lab's apiserver: clients from kubeconfig files, applying the
//! manifests under `lab/manifests/` with server-side apply, and waiting for conditions.

use anyhow::{anyhow, bail, Context, Result};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::Discovery;
use kube::{Client, Config};
use std::path::Path;
use std::time::{Duration, Instant};

pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let kc =
        Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("kubeconfig {}", kubeconfig.display()))?;
    cfg.connect_timeout = Some(Duration::from_secs(5));
    // kube retries 429s up to 15 times with backoff of up to 1000 s by default; a 429 from
    // the eviction API means "a PodDisruptionBudget says not now", which drain must see
    // at once to keep its own deadline and message.
    cfg.default_retry = false;
    cfg.read_timeout = Some(Duration::from_secs(60));
    Ok(Client::try_from(cfg)?)
}

/// Retries `f` until it returns `Ok(Some(v))` or the timeout passes; the last error is
/// part of the timeout message so a failed wait says what it was waiting on.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met yet");
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn wait_ready(client: &Client, timeout: Duration) -> Result<()> {
    wait_for("the apiserver's /readyz", timeout, || async {
        let req = http::Request::get("/readyz").body(Vec::new())?;
        let body = client.request_text(req).await?;
        Ok((body.trim() == "ok").then_some(()))
    })
    .await
}

/// Substitutes `{{NAME}}` placeholders; an unknown placeholder is an error naming it.
pub fn render(name: &str, template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(i) = out.find("{{") {
        let line = out[..i].lines().count();
        let rest: String = out[i..].chars().take(40).collect();
        bail!("manifest {name}:{line}: unknown placeholder {rest:?}");
    }
    Ok(out)
}

/// Server-side applies every document of a multi-document YAML string. Kinds are
/// resolved through discovery, so CRDs applied earlier work once established.
pub async fn apply_yaml(client: &Client, name: &str, yaml: &str) -> Result<Vec<String>> {
    let discovery = Discovery::new(client.clone()).run().await.context("API discovery")?;
    let mut applied = vec![];
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
            .with_context(|| format!("{name}: document {}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject =
            serde_yaml::from_value(value).with_context(|| format!("{name}: document {}", i + 1))?;
        let tm = obj.types.clone().ok_or_else(|| anyhow!("{name}: document {} has no apiVersion/kind", i + 1))?;
        let gvk = GroupVersionKind::try_from(&tm)?;
        let (ar, caps) = discovery
            .resolve_gvk(&gvk)
            .ok_or_else(|| anyhow!("{name}: {}/{} is not served by this apiserver", tm.api_version, tm.kind))?;
        let obj_name =
            obj.metadata.name.clone().ok_or_else(|| anyhow!("{name}: document {} has no metadata.name", i + 1))?;
        let api: Api<DynamicObject> = match caps.scope {
            kube::discovery::Scope::Namespaced => {
                let ns = obj.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                Api::namespaced_with(client.clone(), &ns, &ar)
            }
            kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &ar),
        };
        api.patch(&obj_name, &PatchParams::apply("kubeshift-lab").force(), &Patch::Apply(&obj))
            .await
            .with_context(|| format!("{name}: applying {} {obj_name}", tm.kind))?;
        applied.push(format!("{}/{}", tm.kind, obj_name));
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_substitutes_and_names_unknown_placeholders() {
        let out = render("m.yaml", "a: {{X}}\n", &[("X", "1".into())]).unwrap();
        assert_eq!(out, "a: 1\n");
        let err = render("m.yaml", "a: 1\nb: {{NOPE}}\n", &[]).unwrap_err().to_string();
        assert!(err.contains("m.yaml:2") && err.contains("NOPE"), "{err}");
    }
}
