//! Status that tells the truth: Ready / Progressing / Degraded derived from the Deployment's and
//! the pods' real state, and the transitions that become Kubernetes Events.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nstream_core::ModelStatus;
use nstream_core::status::{ConditionStatus, DEGRADED, PROGRESSING, READY};

use crate::provider::{PROVIDER_REACHABLE, ProviderCheck};

/// Why the operator could not (or would not) build the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocker {
    /// The spec fails a check the API server's schema cannot express.
    InvalidSpec(String),
    /// The referenced Secret does not exist.
    SecretNotFound {
        /// The Secret's name.
        name: String,
    },
    /// The referenced Secret exists but lacks the key.
    SecretKeyMissing {
        /// The Secret's name.
        name: String,
        /// The missing key.
        key: String,
    },
    /// A MegaModel's `apikeySecretRef` names a Secret that does not carry the opt-in label
    /// ([`crate::settings::PROVIDER_CREDENTIALS_LABEL`]), so the operator did not read it.
    SecretNotOptedIn {
        /// The Secret's name.
        name: String,
    },
    /// A KnowledgeBase's `spec.embeddingModel` names no EmbeddingModel of its namespace.
    EmbeddingModelNotFound {
        /// The EmbeddingModel's name.
        name: String,
    },
    /// An object the resource needs exists under the same name without the resource as its
    /// controller owner; applying would take it over, so nothing is applied.
    NameConflict {
        /// The object's kind, such as `Service`.
        kind: String,
        /// `namespace/name` of the object.
        object: String,
        /// The resource's kind.
        owner_kind: String,
        /// The resource's name.
        owner_name: String,
    },
}

impl Blocker {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::SecretNotFound { .. } => "SecretNotFound",
            Self::SecretKeyMissing { .. } => "SecretKeyMissing",
            Self::SecretNotOptedIn { .. } => "SecretNotOptedIn",
            Self::EmbeddingModelNotFound { .. } => "EmbeddingModelNotFound",
            Self::NameConflict { .. } => "NameConflict",
        }
    }

    /// The condition message (names and keys only, never a value).
    pub fn message(&self) -> String {
        match self {
            Self::InvalidSpec(problems) => format!("the spec is invalid: {problems}"),
            Self::SecretNotFound { name } => format!("Secret {name:?} does not exist in this namespace"),
            Self::SecretKeyMissing { name, key } => format!("Secret {name:?} has no key {key:?}"),
            Self::SecretNotOptedIn { name } => format!(
                "Secret {name:?} is not labelled for provider credentials, so the operator does not read it: \
                 add the label with `kubectl label secret {name} {label}=true` once you agree that its value \
                 is sent to the endpoint this MegaModel names",
                label = crate::settings::PROVIDER_CREDENTIALS_LABEL
            ),
            Self::EmbeddingModelNotFound { name } => {
                format!("spec.embeddingModel: no EmbeddingModel {name:?} in this namespace; create it or name another")
            }
            Self::NameConflict { kind, object, owner_kind, owner_name } => format!(
                "{kind} {object} exists and is not owned by {owner_kind} {owner_name}; \
                 nothing was applied: delete or rename that object, or give this resource another name"
            ),
        }
    }
}

/// What the operator observed about one resource.
#[derive(Clone, Debug, Default)]
pub struct Observed<'a> {
    /// The resource's `metadata.generation`.
    pub generation: Option<i64>,
    /// The replicas the spec asks for.
    pub desired_replicas: i32,
    /// The Deployment as the API server has it, if it exists.
    pub deployment: Option<&'a Deployment>,
    /// The pods of the Deployment.
    pub pods: &'a [Pod],
    /// Why the server could not be built, if it could not.
    pub blocker: Option<Blocker>,
    /// The Service URL.
    pub endpoint: Option<String>,
    /// The pods' label selector, for the scale subresource.
    pub selector: Option<String>,
    /// The provider check of a MegaModel (`None`: not a MegaModel, checks off, or blocked).
    pub provider: Option<ProviderCheck>,
}

/// Something wrong with the running pods or the rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// PascalCase reason, such as `CrashLoopBackOff`.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
}

/// The first problem the pods and the Deployment show, worst first: image pulls and crash loops
/// before scheduling and readiness.
pub fn pod_problem(deployment: Option<&Deployment>, pods: &[Pod]) -> Option<Problem> {
    let mut problems: Vec<(u8, Problem)> = Vec::new();
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let pod_name = pod.metadata.name.as_deref().unwrap_or("<pod>");
        let Some(status) = &pod.status else { continue };
        for condition in status.conditions.iter().flatten() {
            if condition.type_ == "PodScheduled"
                && condition.status == "False"
                && condition.reason.as_deref() == Some("Unschedulable")
            {
                problems.push((
                    3,
                    Problem {
                        reason: "Unschedulable".into(),
                        message: format!(
                            "pod {pod_name} cannot be scheduled: {}",
                            condition.message.as_deref().unwrap_or("no node fits")
                        ),
                    },
                ));
            }
        }
        for container in status.container_statuses.iter().flatten() {
            let waiting = container.state.as_ref().and_then(|state| state.waiting.as_ref());
            let waiting_reason = waiting.and_then(|waiting| waiting.reason.as_deref()).unwrap_or("");
            let waiting_message = waiting.and_then(|waiting| waiting.message.as_deref()).unwrap_or("");
            let last_exit =
                container.last_state.as_ref().and_then(|state| state.terminated.as_ref()).map(|terminated| {
                    format!(
                        "; last exit code {}{}",
                        terminated.exit_code,
                        terminated.reason.as_deref().map(|reason| format!(" ({reason})")).unwrap_or_default()
                    )
                });
            match waiting_reason {
                "CrashLoopBackOff" => problems.push((
                    1,
                    Problem {
                        reason: "CrashLoopBackOff".into(),
                        message: format!(
                            "pod {pod_name}: container {} is crash-looping, restarted {} times{}",
                            container.name,
                            container.restart_count,
                            last_exit.clone().unwrap_or_default()
                        ),
                    },
                )),
                "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" | "ErrImageNeverPull" => problems.push((
                    0,
                    Problem {
                        reason: "ImagePullFailed".into(),
                        message: format!(
                            "pod {pod_name}: image {} cannot be pulled ({waiting_reason}) {waiting_message}",
                            container.image
                        )
                        .trim_end()
                        .to_string(),
                    },
                )),
                "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => problems.push((
                    2,
                    Problem {
                        reason: "ContainerConfigError".into(),
                        message: format!("pod {pod_name}: {waiting_reason}: {waiting_message}").trim_end().to_string(),
                    },
                )),
                _ => {}
            }
            let running = container.state.as_ref().and_then(|state| state.running.as_ref()).is_some();
            if running && container.started == Some(true) && !container.ready && container.restart_count > 0 {
                problems.push((
                    4,
                    Problem {
                        reason: "ProbeFailing".into(),
                        message: format!(
                            "pod {pod_name}: container {} started but fails its readiness probe (restarted {} times{})",
                            container.name,
                            container.restart_count,
                            last_exit.clone().unwrap_or_default()
                        ),
                    },
                ));
            }
        }
    }
    if let Some(status) = deployment.and_then(|deployment| deployment.status.as_ref()) {
        for condition in status.conditions.iter().flatten() {
            if condition.type_ == "Progressing" && condition.reason.as_deref() == Some("ProgressDeadlineExceeded") {
                problems.push((
                    5,
                    Problem {
                        reason: "ProgressDeadlineExceeded".into(),
                        message: condition.message.clone().unwrap_or_else(|| "the rollout made no progress".into()),
                    },
                ));
            }
            if condition.type_ == "ReplicaFailure" && condition.status == "True" {
                problems.push((
                    2,
                    Problem {
                        reason: "ReplicaFailure".into(),
                        message: condition.message.clone().unwrap_or_else(|| "pods cannot be created".into()),
                    },
                ));
            }
        }
    }
    problems.sort_by_key(|(rank, _)| *rank);
    problems.into_iter().next().map(|(_, problem)| problem)
}

/// Replica counts of a Deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    replicas: i32,
    ready: i32,
    available: i32,
    updated: i32,
    current: bool,
}

fn counts(deployment: &Deployment) -> Counts {
    let status = deployment.status.clone().unwrap_or_default();
    Counts {
        replicas: status.replicas.unwrap_or(0),
        ready: status.ready_replicas.unwrap_or(0),
        available: status.available_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        current: status.observed_generation.is_some() && status.observed_generation >= deployment.metadata.generation,
    }
}

/// The status of a resource from what was observed. Conditions keep their `lastTransitionTime`
/// unless their status changes, so deriving twice from the same state gives the same status
/// (and no write).
///
/// A MegaModel's provider check adds the `ProviderReachable` condition; a refusal (bad key, no
/// such model or deployment...) also makes it not Ready and Degraded, since its gateway would
/// fail every request, even with every pod Ready.
pub fn derive_status(observed: &Observed<'_>, previous: Option<&ModelStatus>, now: Time) -> ModelStatus {
    let mut status = derive_serving_status(observed, previous, now.clone());
    let generation = observed.generation;
    let Some(check) = &observed.provider else {
        status.conditions.retain(|condition| condition.type_ != PROVIDER_REACHABLE);
        return status;
    };
    let (value, reason, message) = match check {
        ProviderCheck::Pending => (ConditionStatus::Unknown, "CheckPending", "the provider check is running"),
        ProviderCheck::Accepted { message } => (ConditionStatus::True, "KeyAccepted", message.as_str()),
        ProviderCheck::Refused { reason, message } => (ConditionStatus::False, reason.as_str(), message.as_str()),
        ProviderCheck::NoAnswer { reason, message } => (ConditionStatus::Unknown, reason.as_str(), message.as_str()),
    };
    status.set_condition(PROVIDER_REACHABLE, value, reason, message, generation, now.clone());
    if let ProviderCheck::Refused { reason, message } = check {
        let message = format!("the provider refuses this MegaModel: {message}");
        status.set_condition(READY, ConditionStatus::False, reason, &message, generation, now.clone());
        if status.condition(DEGRADED).is_none_or(|condition| condition.status != "True") {
            status.set_condition(DEGRADED, ConditionStatus::True, reason, &message, generation, now);
        }
    }
    status
}

fn derive_serving_status(observed: &Observed<'_>, previous: Option<&ModelStatus>, now: Time) -> ModelStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let generation = observed.generation;
    status.observed_generation = generation;
    status.endpoint = observed.endpoint.clone();
    status.selector = observed.selector.clone();
    macro_rules! set {
        ($condition:expr, $value:expr, $reason:expr, $message:expr $(,)?) => {
            status.set_condition($condition, $value, $reason, $message, generation, now.clone())
        };
    }

    if let Some(blocker) = &observed.blocker {
        let message = blocker.message();
        set!(READY, ConditionStatus::False, blocker.reason(), &message);
        set!(PROGRESSING, ConditionStatus::False, blocker.reason(), &message);
        set!(DEGRADED, ConditionStatus::True, blocker.reason(), &message);
        // Replicas still reflect what runs (an old Deployment keeps serving).
        if let Some(deployment) = observed.deployment {
            let counts = counts(deployment);
            status.replicas = Some(counts.replicas);
            status.ready_replicas = Some(counts.ready);
        }
        return status;
    }

    let Some(deployment) = observed.deployment else {
        set!(READY, ConditionStatus::False, "Creating", "the server Deployment is being created");
        set!(PROGRESSING, ConditionStatus::True, "Creating", "the server Deployment is being created");
        set!(DEGRADED, ConditionStatus::False, "AsExpected", "nothing is wrong");
        status.replicas = Some(0);
        status.ready_replicas = Some(0);
        return status;
    };

    let counts = counts(deployment);
    status.replicas = Some(counts.replicas);
    status.ready_replicas = Some(counts.ready);
    let desired = observed.desired_replicas;
    let problem = pod_problem(Some(deployment), observed.pods);
    let complete =
        counts.current && counts.updated >= desired && counts.replicas == desired && counts.available >= desired;
    let summary = format!("{}/{} replicas ready", counts.ready, desired);

    match &problem {
        Some(problem) => set!(DEGRADED, ConditionStatus::True, &problem.reason, &problem.message),
        None => set!(DEGRADED, ConditionStatus::False, "AsExpected", "nothing is wrong"),
    }

    if desired == 0 {
        set!(READY, ConditionStatus::False, "ScaledToZero", "replicas is 0: nothing serves this model");
        if counts.replicas == 0 {
            set!(PROGRESSING, ConditionStatus::False, "ScaledToZero", "replicas is 0");
        } else {
            set!(
                PROGRESSING,
                ConditionStatus::True,
                "ScalingDown",
                &format!("{} replicas still running", counts.replicas)
            );
        }
        return status;
    }

    if counts.available > 0 {
        set!(READY, ConditionStatus::True, "Available", &summary);
    } else if let Some(problem) = &problem {
        set!(READY, ConditionStatus::False, &problem.reason, &format!("{summary}: {}", problem.message));
    } else {
        set!(
            READY,
            ConditionStatus::False,
            "Loading",
            &format!("{summary}: waiting for pods to start, download and load the model")
        );
    }

    if complete {
        set!(PROGRESSING, ConditionStatus::False, "RolloutComplete", &format!("{summary}, all on the current spec"));
    } else if counts.updated < counts.replicas || !counts.current {
        set!(
            PROGRESSING,
            ConditionStatus::True,
            "RollingOut",
            &format!("{} of {} replicas on the current spec", counts.updated, desired),
        );
    } else {
        set!(PROGRESSING, ConditionStatus::True, "Loading", &format!("{summary}: pods are starting"));
    }
    status
}

/// A change worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// `Warning` when something went wrong, else `Normal`.
    pub warning: bool,
    /// The Event reason.
    pub reason: String,
    /// The Event note.
    pub note: String,
}

/// The Events for the changes from `previous` to `next`: Ready or Degraded changing status or
/// reason.
pub fn transitions(previous: Option<&ModelStatus>, next: &ModelStatus) -> Vec<Transition> {
    let mut events = Vec::new();
    for condition_type in [READY, DEGRADED] {
        let Some(now) = next.condition(condition_type) else { continue };
        let before = previous.and_then(|status| status.condition(condition_type));
        let changed = before.is_none_or(|before| before.status != now.status || before.reason != now.reason);
        if !changed {
            continue;
        }
        // The first "nothing is wrong" is not news.
        if condition_type == DEGRADED && now.status == "False" && before.is_none_or(|before| before.status == "False") {
            continue;
        }
        let warning = condition_type == DEGRADED && now.status == "True";
        let reason = match (condition_type, now.status.as_str()) {
            (READY, "True") => "Ready".to_string(),
            (READY, _) => {
                format!("NotReady{}", if now.reason.is_empty() { String::new() } else { format!(":{}", now.reason) })
            }
            (_, "True") => now.reason.clone(),
            _ => "Recovered".to_string(),
        };
        events.push(Transition { warning, reason: sanitize_reason(&reason), note: now.message.clone() });
    }
    events
}

/// Event reasons are PascalCase words (at most 128 characters).
fn sanitize_reason(reason: &str) -> String {
    reason.chars().filter(char::is_ascii_alphanumeric).take(128).collect()
}
