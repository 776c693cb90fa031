//! The status every nstream resource reports: Kubernetes conditions, replicas and the endpoint.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the model answers requests.
pub const READY: &str = "Ready";
/// Condition type: the model is being rolled out, downloaded or loaded.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something is wrong (crash loop, image pull, invalid spec, provider rejects the key).
pub const DEGRADED: &str = "Degraded";
/// Condition type, MegaModels only: the operator's live check of the provider (key accepted, model
/// or deployment found).
pub const PROVIDER_REACHABLE: &str = "ProviderReachable";

/// The observed state of a MegaModel, BaseModel or EmbeddingModel.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Replicas that pass their readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The URL clients call (the Service's OpenAI-compatible base URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The label selector of the pods, as a string (the scale subresource's `labelSelectorPath`,
    /// which a HorizontalPodAutoscaler reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The operator's autoscaler: what it wants and why (set only with `maxReplicas`; written
    /// under a field manager of its own, `nstream-operator-autoscaler`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<AutoscalerStatus>,
}

/// The autoscaler's latest decision for a resource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerStatus {
    /// The replicas the autoscaler asks for now (after the bounds and the scale-down delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// The replicas the load alone asks for: `ceil(currentLoad / targetRequestsPerReplica)`
    /// within `[minReplicas, maxReplicas]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_replicas: Option<i32>,
    /// Requests in flight (waiting ones included) summed over the Ready pods at the last
    /// scrape; absent when no pod could be scraped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_load: Option<i64>,
    /// Why, in one word: `ScaledUp`, `ScaledDown`, `Stable`, `ScaleDownDelayed`,
    /// `LoadUnknown`, `HorizontalPodAutoscaler`.
    #[serde(default)]
    pub reason: String,
    /// Why, in a sentence.
    #[serde(default)]
    pub message: String,
    /// When the autoscaler last changed the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
}

/// The status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// It is not known yet.
    Unknown,
}

impl ConditionStatus {
    /// The value Kubernetes stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl ModelStatus {
    /// The condition of a type, if set.
    pub fn condition(&self, condition_type: &str) -> Option<&Condition> {
        find_condition(&self.conditions, condition_type)
    }

    /// Whether the `Ready` condition is `True`.
    pub fn is_ready(&self) -> bool {
        self.condition(READY).is_some_and(|condition| condition.status == "True")
    }

    /// Sets a condition. `lastTransitionTime` moves only when the status changes, as Kubernetes
    /// convention asks, so an unchanged condition causes no write.
    pub fn set_condition(
        &mut self,
        condition_type: &str,
        status: ConditionStatus,
        reason: &str,
        message: &str,
        observed_generation: Option<i64>,
        now: Time,
    ) {
        set_condition_in(&mut self.conditions, condition_type, status, reason, message, observed_generation, now);
    }
}

/// The condition of `condition_type` among `conditions` (any resource's status), if set.
pub fn find_condition<'conditions>(
    conditions: &'conditions [Condition],
    condition_type: &str,
) -> Option<&'conditions Condition> {
    conditions.iter().find(|condition| condition.type_ == condition_type)
}

/// Sets the condition of `condition_type` among `conditions` (any resource's status), adding it
/// when missing. `lastTransitionTime` moves only when the status changes, as Kubernetes
/// convention asks, so an unchanged condition causes no write.
pub fn set_condition_in(
    conditions: &mut Vec<Condition>,
    condition_type: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) {
    let status = status.as_str();
    match conditions.iter_mut().find(|condition| condition.type_ == condition_type) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now;
                existing.status = status.to_string();
            }
            existing.reason = reason.to_string();
            existing.message = message.to_string();
            existing.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: condition_type.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation,
            last_transition_time: now,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut status = ModelStatus::default();
        status.set_condition(READY, ConditionStatus::False, "Loading", "loading weights", Some(1), time(10));
        status.set_condition(READY, ConditionStatus::False, "Loading", "still loading", Some(1), time(20));
        assert_eq!(status.condition(READY).unwrap().last_transition_time, time(10));
        assert_eq!(status.condition(READY).unwrap().message, "still loading");
        assert!(!status.is_ready());
        status.set_condition(READY, ConditionStatus::True, "Available", "1/1 replicas ready", Some(1), time(30));
        assert_eq!(status.condition(READY).unwrap().last_transition_time, time(30));
        assert!(status.is_ready());
        assert_eq!(status.conditions.len(), 1);
    }
}
