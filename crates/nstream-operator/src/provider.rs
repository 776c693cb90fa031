//! The live provider check of MegaModels: does the provider accept the key, and does the Azure
//! deployment or the model exist? Run by the operator (it already reads the key Secret to hash
//! it), in the background so a slow or unreachable provider never stalls a reconcile, again
//! whenever the spec or the key changes and otherwise every `provider_check_interval`.
//!
//! What the answer means for the status is decided by [`ProviderCheck`]: a refusal (key, model,
//! deployment, api-version, quota) makes the resource not Ready and Degraded, because the gateway
//! would answer every request with that error; no answer (no egress from the operator's pod, DNS,
//! timeout, a 5xx) is reported as unknown and changes nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nstream_core::{MegaModelSpec, SecretString};
use nstream_hosted::{CheckProblem, CheckReport, HostedBackend, HostedOptions};

pub use nstream_core::status::PROVIDER_REACHABLE;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the last provider check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderCheck {
    /// No result yet for the current spec and key.
    Pending,
    /// The provider answered and accepted the key (a rate-limited answer counts: waiting fixes it).
    Accepted {
        /// What was verified, with the latency.
        message: String,
    },
    /// The provider answered with a refusal that waiting does not fix.
    Refused {
        /// PascalCase reason (`ProviderUnauthorized`, `DeploymentNotFound`...).
        reason: String,
        /// The provider's message (the key scrubbed) and the usual fix.
        message: String,
    },
    /// No usable answer: unreachable, timed out or a server error.
    NoAnswer {
        /// PascalCase reason (`ProviderUnreachable`, `ProviderTimeout`, `ProviderError`).
        reason: String,
        /// What happened.
        message: String,
    },
}

impl ProviderCheck {
    /// The check's meaning for the status, from nstream-hosted's report.
    pub fn from_report(report: &CheckReport) -> Self {
        // No latency in the messages: a condition that changes with every check would be a write
        // every time (it is logged instead).
        let endpoint = format!("{} {} at {}", report.provider.as_str(), report.target, report.endpoint);
        let Some(problem) = report.problem else {
            return Self::Accepted { message: format!("{endpoint}: {}", report.detail) };
        };
        let message = format!("{endpoint}: {} ({})", report.detail, problem.hint());
        let refused = |reason: &str| Self::Refused { reason: reason.into(), message: message.clone() };
        let no_answer = |reason: &str| Self::NoAnswer { reason: reason.into(), message: message.clone() };
        match problem {
            CheckProblem::RateLimited => {
                Self::Accepted { message: format!("{endpoint}: key accepted (rate limited at the time of the check)") }
            }
            CheckProblem::Unauthorized => refused("ProviderUnauthorized"),
            CheckProblem::Forbidden => refused("ProviderForbidden"),
            CheckProblem::DeploymentNotFound => refused("DeploymentNotFound"),
            CheckProblem::ModelNotFound => refused("ModelNotFound"),
            CheckProblem::UnsupportedApiVersion => refused("UnsupportedApiVersion"),
            CheckProblem::ResourceNotFound => refused("EndpointNotFound"),
            CheckProblem::QuotaExceeded => refused("QuotaExceeded"),
            CheckProblem::Unreachable => no_answer("ProviderUnreachable"),
            CheckProblem::Timeout => no_answer("ProviderTimeout"),
            // ProviderError and any problem a later nstream-hosted adds: not a verdict on the key.
            _ => no_answer("ProviderError"),
        }
    }
}

struct Entry {
    fingerprint: String,
    checked_at: Instant,
    in_flight: bool,
    result: ProviderCheck,
}

/// The latest check of every MegaModel, keyed by namespace/name.
#[derive(Default, Clone)]
pub struct ProviderChecks {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

/// What the reconcile learns from [`ProviderChecks::observe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The result to report now (the previous one while a re-check runs).
    pub check: ProviderCheck,
    /// A check is running: reconcile again soon to pick its result up.
    pub in_flight: bool,
}

impl ProviderChecks {
    /// The result for `id` (namespace/name) under `fingerprint` (generation and key hash),
    /// starting a background check when there is none for this fingerprint or it is older than
    /// `interval`. Must be called inside a Tokio runtime.
    pub fn observe(
        &self,
        id: &str,
        fingerprint: &str,
        interval: Duration,
        name: &str,
        spec: &MegaModelSpec,
        key: SecretString,
    ) -> Observation {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = entries.get(id).filter(|entry| entry.fingerprint == fingerprint);
        if let Some(entry) = current
            && (entry.in_flight || entry.checked_at.elapsed() < interval)
        {
            return Observation { check: entry.result.clone(), in_flight: entry.in_flight };
        }
        let check = current.map_or(ProviderCheck::Pending, |entry| entry.result.clone());
        entries.insert(
            id.to_owned(),
            Entry {
                fingerprint: fingerprint.to_owned(),
                checked_at: Instant::now(),
                in_flight: true,
                result: check.clone(),
            },
        );
        drop(entries);
        let checks = self.clone();
        let (id, fingerprint, name, spec) = (id.to_owned(), fingerprint.to_owned(), name.to_owned(), spec.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let result = check_provider(&name, &spec, key).await;
            tracing::info!(megamodel = %name, millis = started.elapsed().as_millis() as u64, result = ?result, "provider check");
            let mut entries = checks.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(entry) = entries.get_mut(&id)
                && entry.fingerprint == fingerprint
            {
                entry.in_flight = false;
                entry.checked_at = Instant::now();
                entry.result = result;
            }
        });
        Observation { check, in_flight: true }
    }

    /// Forgets a resource (deleted, or no longer checkable).
    pub fn forget(&self, id: &str) {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
    }
}

/// One check with nstream-hosted's client: the request the gateway itself would make.
async fn check_provider(name: &str, spec: &MegaModelSpec, key: SecretString) -> ProviderCheck {
    let options = HostedOptions::default().with_timeout(CHECK_TIMEOUT).with_max_retries(0);
    match HostedBackend::new(name, spec, key, options) {
        Ok(backend) => ProviderCheck::from_report(&backend.check().await),
        Err(error) => ProviderCheck::Refused { reason: "InvalidProviderSettings".into(), message: error.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nstream_core::MegaModelProvider;

    fn report(problem: Option<CheckProblem>, detail: &str) -> CheckReport {
        let mut report =
            CheckReport::new("gpt-4o-mega", MegaModelProvider::OpenAI, "https://api.openai.com/v1", "gpt-4o");
        report.status = problem.map(|_| 401);
        report.latency = Some(Duration::from_millis(42));
        report.problem = problem;
        report.detail = detail.into();
        report
    }

    #[test]
    fn an_accepted_key_is_reachable_and_the_message_does_not_change_with_latency() {
        let check = ProviderCheck::from_report(&report(None, "reachable, key accepted"));
        assert_eq!(
            check,
            ProviderCheck::Accepted {
                message: "OpenAI gpt-4o at https://api.openai.com/v1: reachable, key accepted".into()
            }
        );
    }

    #[test]
    fn a_refused_key_or_model_is_a_refusal_and_a_rate_limit_is_not() {
        let refused = ProviderCheck::from_report(&report(Some(CheckProblem::Unauthorized), "Incorrect API key"));
        assert!(matches!(&refused, ProviderCheck::Refused { reason, message }
            if reason == "ProviderUnauthorized" && message.contains("Incorrect API key")));
        let missing = ProviderCheck::from_report(&report(Some(CheckProblem::ModelNotFound), "no such model"));
        assert!(matches!(missing, ProviderCheck::Refused { reason, .. } if reason == "ModelNotFound"));
        let busy = ProviderCheck::from_report(&report(Some(CheckProblem::RateLimited), "slow down"));
        assert!(matches!(busy, ProviderCheck::Accepted { .. }));
    }

    #[test]
    fn no_answer_is_not_a_refusal() {
        for (problem, reason) in [
            (CheckProblem::Unreachable, "ProviderUnreachable"),
            (CheckProblem::Timeout, "ProviderTimeout"),
            (CheckProblem::ProviderError, "ProviderError"),
        ] {
            let check = ProviderCheck::from_report(&report(Some(problem), "dns error"));
            assert!(matches!(&check, ProviderCheck::NoAnswer { reason: found, .. } if found == reason), "{check:?}");
        }
    }
}
