//! NetworkPolicy enforcement: Kubernetes NetworkPolicy v1 compiled into identities, an
//! ipcache and a policy map, enforced by tc programs on the pods' host-side interfaces.
//!
//! Data flow, each step plain data:
//!
//! ```text
//! API objects ──source──▶ PolicyInput ──compile──▶ Compiled ──loader──▶ pinned maps
//!                              │
//!                              └──oracle──▶ "is this connection allowed?" (tests only)
//! ```
//!
//! - [`model`]: the input (namespaces, pods, policies as the API means them) and the
//!   compiled output (identities, ipcache, isolation, policy entries). The map layouts
//!   the output is written into are described on [`model::Compiled`].
//! - [`compile`]: [`model::PolicyInput`] → [`model::Compiled`], with identities that stay
//!   stable across recompiles so an update rewrites only what changed.
//! - [`oracle`]: the Kubernetes semantics evaluated directly, connection by connection.
//!   The netpol matrix test compares real probes through the programs against it.
//! - [`source`]: k8s-openapi NetworkPolicy / Pod / Namespace → model.
//! - [`selector`], [`cidr`]: label selector matching and IPv4 prefix arithmetic on the model
//!   types.

pub mod cidr;
pub mod compile;
pub mod loader;
pub mod model;
pub mod oracle;
pub mod selector;
pub mod source;

#[cfg(test)]
mod tests;
