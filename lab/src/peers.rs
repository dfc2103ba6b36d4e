//! What flanneld and calico-node have in common: learn this node's podCIDR, then keep
//! one route (and whatever else the backend needs) per other node, from a watch on
//! Node objects.

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use kube::{Api, Client};
use std::collections::HashMap;
use std::time::Duration;

pub async fn own_pod_cidr(client: &Client, node: &str) -> Result<String> {
    let api: Api<Node> = Api::all(client.clone());
    crate::api::wait_for(&format!("a podCIDR on node {node}"), Duration::from_secs(120), || {
        let api = api.clone();
        async move { Ok(api.get(node).await?.spec.and_then(|s| s.pod_cidr)) }
    })
    .await
}

/// A peer as the backend needs it; `None` from `read` means "not ready yet".
pub trait PeerBackend {
    type Peer: PartialEq + Clone + std::fmt::Debug;
    fn read(&self, node: &Node) -> Option<Self::Peer>;
    fn add(&mut self, peer: &Self::Peer) -> Result<()>;
    fn remove(&mut self, peer: &Self::Peer) -> Result<()>;
}

pub async fn sync_peers<B: PeerBackend>(client: &Client, own: &str, backend: &mut B) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let mut known: HashMap<String, B::Peer> = HashMap::new();
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    while let Some(ev) = stream.next().await {
        let (node, deleted) = match ev {
            Ok(watcher::Event::Apply(n)) | Ok(watcher::Event::InitApply(n)) => (n, false),
            Ok(watcher::Event::Delete(n)) => (n, true),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!("node watch: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let name = node.metadata.name.clone().unwrap_or_default();
        if name == own {
            continue;
        }
        let want = if deleted { None } else { backend.read(&node) };
        let have = known.get(&name).cloned();
        if want == have {
            continue;
        }
        if let Some(old) = &have {
            if let Err(e) = backend.remove(old) {
                tracing::warn!("removing peer {name}: {e:#}");
            }
            known.remove(&name);
        }
        if let Some(new) = want {
            match backend.add(&new) {
                Ok(()) => {
                    tracing::info!("peer {name}: {new:?}");
                    known.insert(name, new);
                }
                Err(e) => tracing::warn!("adding peer {name}: {e:#}"),
            }
        }
    }
    Ok(())
}
