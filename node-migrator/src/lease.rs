//! The apply lock: a `coordination.k8s.io/v1` Lease, so that only one `migrate apply`
//! or `rollback` changes the cluster at a time. A holder renews it while it runs; a
//! holder that died (kill -9, lost laptop) stops renewing, and once the lease has
//! expired the next apply takes it over. Every write carries the resourceVersion it
//! read, so two applies racing for an expired lease cannot both win.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::Client;
use std::time::Duration;

pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "kubeshift-migrate";

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "another kubeshift run holds Lease {NAMESPACE}/{NAME}: {holder}, renewed {renewed}, expires {expires}; wait for it to finish (`kubeshift migrate status`), or if it is gone, retry after it expires"
    )]
    Held { holder: String, renewed: String, expires: String },
    #[error("Lease {NAMESPACE}/{NAME} was taken by {holder} while this run held it; stopping")]
    Lost { holder: String },
    #[error("Lease {NAMESPACE}/{NAME}: {0}")]
    Api(#[from] kube::Error),
}

/// Who holds the lock: enough for an operator to find the process.
pub fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let user = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| "unknown".into());
    format!(
        "{user}@{} pid {} started {}",
        host.trim(),
        std::process::id(),
        Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ")
    )
}

pub struct Lock {
    api: Api<Lease>,
    holder: String,
    duration: Duration,
    /// resourceVersion of our last write.
    version: String,
}

fn spec(holder: &str, duration: Duration, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
    let now = MicroTime(Timestamp::now());
    LeaseSpec {
        holder_identity: Some(holder.to_string()),
        lease_duration_seconds: Some(duration.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

/// When a lease stops being valid: its renew time plus its duration.
fn expiry(s: &LeaseSpec) -> Option<Timestamp> {
    let renewed = s.renew_time.as_ref()?.0;
    let secs = s.lease_duration_seconds.unwrap_or(0) as i64;
    renewed.checked_add(SignedDuration::from_secs(secs)).ok()
}

/// Pure: may `me` take a lease that looks like `s`, at `now`?
pub fn may_take(s: &LeaseSpec, me: &str, now: Timestamp) -> bool {
    match s.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(_) => expiry(s).is_none_or(|e| e <= now),
    }
}

/// Pure: the host and pid an [`identity`] names (`user@host pid N started …`).
pub fn holder_process(holder: &str) -> Option<(&str, u32)> {
    let (_, rest) = holder.split_once('@')?;
    let (host, rest) = rest.split_once(" pid ")?;
    let pid = rest.split_whitespace().next()?.parse().ok()?;
    Some((host, pid))
}

/// Whether the holder was a kubeshift process on this very host that is no longer
/// running (killed with -9, so it could not release): its lease need not be waited out.
fn holder_gone_here(holder: &str) -> bool {
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let Some((host, pid)) = holder_process(holder) else { return false };
    if host != me.trim() || pid == std::process::id() {
        return false;
    }
    // A reused pid belongs to some other program: the holder is gone all the same.
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => !String::from_utf8_lossy(&cmd).contains("kubeshift"),
        Err(_) => true,
    }
}

impl Lock {
    /// Takes the lease or says who has it. `duration` is how long a dead holder blocks
    /// the next run; the holder renews at a third of it.
    pub async fn acquire(client: &Client, holder: &str, duration: Duration) -> Result<Lock, LeaseError> {
        let api: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
        let written = match api.get_opt(NAME).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(NAME.into()),
                        namespace: Some(NAMESPACE.into()),
                        labels: Some([(crate::crd::PART_OF.0.to_string(), crate::crd::PART_OF.1.to_string())].into()),
                        ..Default::default()
                    },
                    spec: Some(spec(holder, duration, None, 0)),
                };
                api.create(&PostParams::default(), &lease).await.map_err(|e| conflict_as_held(e, holder))?
            }
            Some(mut cur) => {
                let s = cur.spec.clone().unwrap_or_default();
                let dead = s.holder_identity.as_deref().is_some_and(holder_gone_here);
                if !may_take(&s, holder, Timestamp::now()) && !dead {
                    return Err(held(&s));
                }
                if dead {
                    tracing::info!(
                        "taking over the lease of {:?}: that process is no longer running",
                        s.holder_identity
                    );
                }
                let same = s.holder_identity.as_deref() == Some(holder);
                let transitions = s.lease_transitions.unwrap_or(0) + i32::from(!same);
                cur.spec = Some(spec(holder, duration, if same { s.acquire_time } else { None }, transitions));
                // The resourceVersion read above makes this a compare-and-swap.
                api.replace(NAME, &PostParams::default(), &cur).await.map_err(|e| conflict_as_held(e, holder))?
            }
        };
        let version = written.metadata.resource_version.unwrap_or_default();
        Ok(Lock { api, holder: holder.to_string(), duration, version })
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// Renews the lease; `Lost` when someone else holds it now.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let mut cur = self.api.get(NAME).await?;
        let s = cur.spec.clone().unwrap_or_default();
        if s.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Err(LeaseError::Lost { holder: s.holder_identity.unwrap_or_default() });
        }
        cur.spec = Some(spec(&self.holder, self.duration, s.acquire_time, s.lease_transitions.unwrap_or(0)));
        let written = self.api.replace(NAME, &PostParams::default(), &cur).await?;
        self.version = written.metadata.resource_version.unwrap_or_default();
        Ok(())
    }

    /// Gives the lease up so the next run need not wait for it to expire. Deletes it only
    /// if it is still ours (a precondition on the version we wrote last).
    pub async fn release(self) -> Result<(), LeaseError> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions { resource_version: Some(self.version.clone()), uid: None }),
            ..Default::default()
        };
        match self.api.delete(NAME, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn held(s: &LeaseSpec) -> LeaseError {
    let fmt =
        |t: Option<Timestamp>| t.map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_else(|| "?".into());
    LeaseError::Held {
        holder: s.holder_identity.clone().unwrap_or_default(),
        renewed: fmt(s.renew_time.as_ref().map(|t| t.0)),
        expires: fmt(expiry(s)),
    }
}

/// A create or replace that lost a race: someone else wrote the lease in between.
fn conflict_as_held(e: kube::Error, me: &str) -> LeaseError {
    match &e {
        kube::Error::Api(s) if s.code == 409 => LeaseError::Held {
            holder: format!("another run that took it at the same moment as {me}"),
            renewed: "just now".into(),
            expires: "later".into(),
        },
        _ => LeaseError::Api(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holders_host_and_pid_are_read_back_from_its_identity() {
        assert_eq!(holder_process("root@vm pid 4242 started 2026-12-02T19:00:00Z"), Some(("vm", 4242)));
        assert_eq!(holder_process("someone-else@test"), None);
        assert!(!holder_gone_here("someone-else@test"), "a holder that names no process is never presumed gone");
        let me = identity();
        assert!(!holder_gone_here(&me), "this process is not gone");
    }

    fn lease(holder: &str, renewed_ago: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(Timestamp::now() - SignedDuration::from_secs(renewed_ago))),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_holder_is_refused_an_expired_one_is_taken() {
        let now = Timestamp::now();
        assert!(!may_take(&lease("other", 5, 30), "me", now));
        assert!(may_take(&lease("other", 31, 30), "me", now));
        assert!(may_take(&lease("me", 5, 30), "me", now));
        assert!(may_take(&LeaseSpec::default(), "me", now));
    }

    #[test]
    fn the_refusal_names_the_holder_and_the_expiry() {
        let msg = held(&lease("alice@host pid 7", 5, 30)).to_string();
        assert!(msg.contains("alice@host pid 7") && msg.contains("expires"), "{msg}");
    }
}
