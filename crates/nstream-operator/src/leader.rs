//! Leader election with a `coordination.k8s.io` Lease, so several operator replicas can run and
//! exactly one reconciles (the others wait as standbys and take over when its Lease expires).
//!
//! As in client-go, time is judged on the local clock only: a standby deems the holder's Lease
//! expired when the Lease record has not changed for its duration *as this process observed it*
//! (never by comparing the holder's `renewTime` with the local clock, which clock skew between
//! nodes would make wrong), and the leader gives up leading when a renewal has not succeeded
//! within the renew deadline, measured from the start of its last successful renewal, so it has
//! stopped before any standby may take over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// What a contender should do with the Lease it just read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It holds the Lease: renew it.
    Renew,
    /// Nobody holds it, or the holder's record has not changed for a whole Lease duration on this
    /// contender's clock: take it over.
    Take,
    /// Another contender holds it and renewed it recently enough (on this contender's clock).
    Wait,
}

/// Decides from the Lease's `holder` and when this contender last saw its record change
/// (`observed_at`, on the local monotonic clock) whether to renew, take or wait. `renewTime` is
/// deliberately not an input: it was written by another node's clock.
pub fn decide(
    identity: &str,
    holder: Option<&str>,
    observed_at: Instant,
    lease_duration: Duration,
    now: Instant,
) -> Decision {
    match holder.filter(|holder| !holder.is_empty()) {
        Some(holder) if holder == identity => Decision::Renew,
        None => Decision::Take,
        Some(_) if now.saturating_duration_since(observed_at) >= lease_duration => Decision::Take,
        Some(_) => Decision::Wait,
    }
}

/// How long the leader may still try to renew: what is left of `renew_deadline` since the start of
/// its last successful renewal (`last_renewed`); `None` once it has passed (step down).
pub fn renewal_budget(last_renewed: Instant, renew_deadline: Duration, now: Instant) -> Option<Duration> {
    renew_deadline.checked_sub(now.saturating_duration_since(last_renewed)).filter(|left| !left.is_zero())
}

/// The Lease record as last seen, and when it was seen to change (local monotonic time).
#[derive(Clone, Debug)]
struct Observation {
    record: LeaseSpec,
    at: Instant,
}

/// One contender for a Lease.
#[derive(Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    /// Shared by clones: the contender that acquired and the one that keeps are one observer.
    observed: Arc<Mutex<Option<Observation>>>,
}

impl LeaderElection {
    /// A contender `identity` (usually the pod name) for the Lease `name` in `api`'s namespace.
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        lease_duration: Duration,
    ) -> Self {
        Self { api, name: name.into(), identity: identity.into(), lease_duration, observed: Arc::default() }
    }

    /// This contender's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How often the leader renews (and a standby retries): a third of the Lease duration.
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 3
    }

    /// How long the leader keeps leading without a successful renewal: two thirds of the Lease
    /// duration, so it has stopped before a standby can deem the Lease expired.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX).max(1)
    }

    /// Records `record` as seen now; returns when it was last seen to change.
    fn observe(&self, record: &LeaseSpec, now: Instant) -> Instant {
        let Ok(mut observed) = self.observed.lock() else { return now };
        match observed.as_ref() {
            Some(previous) if previous.record == *record => previous.at,
            _ => {
                *observed = Some(Observation { record: record.clone(), at: now });
                now
            }
        }
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
                Ok(created) => {
                    self.observe(&created.spec.unwrap_or_default(), Instant::now());
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(Error::Kube(error)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let observed_at = self.observe(&spec, Instant::now());
        // The holder's own duration (it may be configured differently from this replica).
        let duration = spec
            .lease_duration_seconds
            .and_then(|seconds| u64::try_from(seconds).ok())
            .map_or(self.lease_duration, Duration::from_secs);
        let holder = spec.holder_identity.clone();
        let decision = decide(&self.identity, holder.as_deref(), observed_at, duration, Instant::now());
        if decision == Decision::Wait {
            return Ok(false);
        }
        let held_by_me = decision == Decision::Renew;
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
            Ok(stored) => {
                self.observe(&stored.spec.unwrap_or_default(), Instant::now());
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    /// Waits until this contender holds the Lease, retrying every `retry`; returns `false` when
    /// `stop` fired first. Each attempt is bounded by the Lease duration, so a hung request
    /// does not stall the standby.
    pub async fn acquire(&self, retry: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            match tokio::time::timeout(self.lease_duration, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => return true,
                Ok(Ok(false)) => tracing::debug!(lease = %self.name, "another replica leads; waiting"),
                Ok(Err(error)) => {
                    tracing::warn!(lease = %self.name, error = %error, "leader election attempt failed")
                }
                Err(_) => tracing::warn!(lease = %self.name, "leader election attempt timed out"),
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

    /// Renews the Lease every [`retry_period`](Self::retry_period) until `stop` fires (`true`).
    /// Returns `false` (leadership lost: the caller must stop reconciling) when another replica
    /// took the Lease, or when no renewal succeeded within the
    /// [`renew_deadline`](Self::renew_deadline): a renewal still in flight at the deadline is
    /// abandoned.
    pub async fn keep(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let period = self.retry_period();
        let deadline = self.renew_deadline();
        // The acquisition that made this replica leader was its last renewal.
        let mut last_renewed = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = stop.changed() => return true,
            }
            let attempt_started = Instant::now();
            let Some(budget) = renewal_budget(last_renewed, deadline, attempt_started) else {
                tracing::error!(lease = %self.name, "could not renew the Lease within its renew deadline");
                return false;
            };
            let attempt = tokio::select! {
                attempt = tokio::time::timeout(budget, self.try_acquire_or_renew()) => attempt,
                _ = stop.changed() => return true,
            };
            match attempt {
                // Counted from when the request left: the API server may have stamped it later.
                Ok(Ok(true)) => last_renewed = attempt_started,
                Ok(Ok(false)) => {
                    tracing::error!(lease = %self.name, "another replica took the Lease");
                    return false;
                }
                Ok(Err(error)) => tracing::warn!(lease = %self.name, error = %error, "renewing the Lease failed"),
                Err(_) => {
                    tracing::error!(lease = %self.name, "renewing the Lease did not finish within its renew deadline");
                    return false;
                }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::http::{Method, Request, Response, StatusCode};
    use http_body_util::BodyExt;
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::client::Body;
    use kube::{Api, Client};
    use tokio::time::Instant;

    use super::{Decision, LeaderElection, decide, renewal_budget};

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_standby_judges_the_holders_lease_by_its_own_clock() {
        let now = Instant::now();
        let seen = |ago: Duration| now.checked_sub(ago).unwrap_or(now);
        // Just seen to change: the holder is alive, whatever its renewTime says.
        assert_eq!(decide("b", Some("a"), seen(Duration::ZERO), 15 * SECOND, now), Decision::Wait);
        assert_eq!(decide("b", Some("a"), seen(14 * SECOND), 15 * SECOND, now), Decision::Wait);
        // Unchanged for a whole duration on this clock: expired.
        assert_eq!(decide("b", Some("a"), seen(15 * SECOND), 15 * SECOND, now), Decision::Take);
        assert_eq!(decide("a", Some("a"), seen(60 * SECOND), 15 * SECOND, now), Decision::Renew);
        assert_eq!(decide("b", None, now, 15 * SECOND, now), Decision::Take);
        assert_eq!(decide("b", Some(""), now, 15 * SECOND, now), Decision::Take, "a released Lease");
    }

    #[test]
    fn the_renewal_budget_runs_out_at_the_renew_deadline() {
        let renewed = Instant::now();
        assert_eq!(renewal_budget(renewed, 10 * SECOND, renewed), Some(10 * SECOND));
        assert_eq!(renewal_budget(renewed, 10 * SECOND, renewed + 4 * SECOND), Some(6 * SECOND));
        assert_eq!(renewal_budget(renewed, 10 * SECOND, renewed + 10 * SECOND), None);
        assert_eq!(renewal_budget(renewed, 10 * SECOND, renewed + 11 * SECOND), None);
    }

    /// An API server holding one Lease; `hang` makes every later request wait forever, as a
    /// partitioned API server does.
    #[derive(Default)]
    struct LeaseServer {
        lease: Option<serde_json::Value>,
        version: u64,
        hang: bool,
    }

    fn respond(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
            .unwrap_or_else(|_| Response::new(Body::from(Vec::new())))
    }

    impl LeaseServer {
        fn handle(&mut self, method: &Method, body: &[u8]) -> Response<Body> {
            if *method == Method::GET {
                return match &self.lease {
                    Some(lease) => respond(StatusCode::OK, lease),
                    None => respond(
                        StatusCode::NOT_FOUND,
                        &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                    ),
                };
            }
            let mut lease: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            self.version += 1;
            lease["metadata"]["resourceVersion"] = serde_json::json!(self.version.to_string());
            self.lease = Some(lease.clone());
            respond(StatusCode::OK, &lease)
        }

        /// Another replica `holder` renews, stamping `renew_time` with its own (skewed) clock.
        fn renewed_by(&mut self, holder: &str, renew_time: &str) {
            self.version += 1;
            self.lease = Some(serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "lead", "namespace": "ops", "resourceVersion": self.version.to_string()},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1, "renewTime": renew_time},
            }));
        }
    }

    fn election(server: Arc<Mutex<LeaseServer>>, identity: &str) -> LeaderElection {
        let service = tower::service_fn(move |request: Request<Body>| {
            let server = server.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await.map(|collected| collected.to_bytes().to_vec()).unwrap_or_default();
                let hang = server.lock().map(|server| server.hang).unwrap_or(true);
                if hang {
                    std::future::pending::<()>().await;
                }
                let response = match server.lock() {
                    Ok(mut server) => server.handle(&parts.method, &bytes),
                    Err(_) => respond(StatusCode::INTERNAL_SERVER_ERROR, &serde_json::json!({})),
                };
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let client = Client::new(service, "ops");
        LeaderElection::new(Api::<Lease>::namespaced(client, "ops"), "lead", identity, SECOND)
    }

    #[tokio::test]
    async fn a_lease_stamped_by_a_clock_far_behind_is_not_taken_while_it_keeps_changing() {
        let server = Arc::new(Mutex::new(LeaseServer::default()));
        // The holder's clock is an hour behind: its renewTime looks long expired to this node.
        server.lock().expect("server").renewed_by("a", "2020-01-01T00:00:00.000000Z");
        let standby = election(server.clone(), "b");
        assert!(!standby.try_acquire_or_renew().await.expect("read"), "a Lease just seen renewed is taken over");

        tokio::time::sleep(SECOND * 6 / 10).await;
        server.lock().expect("server").renewed_by("a", "2020-01-01T00:00:00.600000Z");
        assert!(!standby.try_acquire_or_renew().await.expect("read"));
        tokio::time::sleep(SECOND * 6 / 10).await;
        assert!(!standby.try_acquire_or_renew().await.expect("read"), "the holder renewed 0.6 s ago on this clock");

        // The holder stops renewing: a whole duration later on this clock, the standby takes over.
        tokio::time::sleep(SECOND * 5 / 10).await;
        assert!(standby.try_acquire_or_renew().await.expect("take over"));
        let lease = server.lock().expect("server").lease.clone().expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    }

    #[tokio::test]
    async fn a_leader_whose_renewals_hang_steps_down_within_the_renew_deadline() {
        let server = Arc::new(Mutex::new(LeaseServer::default()));
        let leader = election(server.clone(), "a");
        assert!(leader.try_acquire_or_renew().await.expect("acquire"), "an absent Lease is created");
        assert!(leader.try_acquire_or_renew().await.expect("renew"), "a held Lease is renewed");
        // The API server stops answering: the renewal never completes.
        server.lock().expect("server").hang = true;
        let (_stop_sender, mut stop) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let kept = tokio::time::timeout(3 * SECOND, leader.keep(&mut stop)).await;
        assert_eq!(kept, Ok(false), "the leader must step down when renewals cannot complete");
        let elapsed = started.elapsed();
        // Stepped down before a standby could deem the Lease expired.
        assert!(elapsed < SECOND, "stepped down after {elapsed:?}, past the Lease duration");
        assert!(elapsed >= leader.renew_deadline(), "stepped down after {elapsed:?}, before the renew deadline");
    }

    #[tokio::test]
    async fn a_stopped_leader_keeps_true() {
        let server = Arc::new(Mutex::new(LeaseServer::default()));
        let leader = election(server, "a");
        assert!(leader.try_acquire_or_renew().await.expect("acquire"));
        let (stop_sender, mut stop) = tokio::sync::watch::channel(false);
        let keeping = tokio::spawn(async move { leader.keep(&mut stop).await });
        tokio::time::sleep(SECOND / 2).await;
        let _ = stop_sender.send(true);
        assert_eq!(tokio::time::timeout(SECOND, keeping).await.map(Result::ok), Ok(Some(true)));
    }
}
