//! Leader election with a `coordination.k8s.io` Lease, so several operator replicas can run and
//! exactly one reconciles (the others wait as standbys and take over when its Lease expires).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::error::{Error, Result};

/// One contender for a Lease.
#[derive(Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
}

impl LeaderElection {
    /// A contender `identity` (usually the pod name) for the Lease `name` in `api`'s namespace.
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        lease_duration: Duration,
    ) -> Self {
        Self { api, name: name.into(), identity: identity.into(), lease_duration }
    }

    /// This contender's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX).max(1)
    }

    /// Takes or renews the Lease once; `true` when this contender holds it afterwards. A conflict
    /// (another contender wrote first) is `false`, not an error.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.name).await.map_err(Error::Kube)?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(Error::Kube(error)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|holder| !holder.is_empty());
        let held_by_me = holder.as_deref() == Some(self.identity.as_str());
        let duration =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(self.lease_seconds())));
        let expired = match &spec.renew_time {
            Some(MicroTime(renewed)) => renewed.checked_add(duration).map_or(true, |until| until < now),
            None => true,
        };
        if !held_by_me && holder.is_some() && !expired {
            return Ok(false);
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_seconds()),
            acquire_time: if held_by_me { spec.acquire_time.clone() } else { Some(MicroTime(now)) },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me)),
            ..spec
        });
        // replace() carries the resourceVersion read above: a concurrent writer makes it a 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    /// Waits until this contender holds the Lease, retrying every `retry`; returns `false` when
    /// `stop` fired first.
    pub async fn acquire(&self, retry: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return true,
                Ok(false) => tracing::debug!(lease = %self.name, "another replica leads; waiting"),
                Err(error) => tracing::warn!(lease = %self.name, error = %error, "leader election attempt failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                _ = stop.changed() => return false,
            }
            if *stop.borrow() {
                return false;
            }
        }
    }

    /// Renews the Lease every third of its duration until `stop` fires; returns when renewal
    /// failed for two thirds of the duration (leadership lost: the caller must stop reconciling).
    pub async fn keep(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let period = self.lease_duration / 3;
        let deadline = self.lease_duration * 2 / 3;
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = stop.changed() => return true,
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "another replica took the Lease");
                    return false;
                }
                Err(error) => tracing::warn!(lease = %self.name, error = %error, "renewing the Lease failed"),
            }
            if last_renewed.elapsed() > deadline {
                tracing::error!(lease = %self.name, "could not renew the Lease in time");
                return false;
            }
        }
    }

    /// Gives the Lease up (on shutdown), so a standby takes over at once instead of after expiry.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(Error::Kube)? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(error) => Err(Error::Kube(error)),
        }
    }
}
