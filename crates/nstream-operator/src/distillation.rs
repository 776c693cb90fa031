//! The Distillation controller: each `Distillation` becomes a data claim, a ConfigMap holding the
//! distill file, and one Job per stage (generate + split, finetune, eval), each created once the
//! one before it completed. Every Job runs `nstream distill --stage ...` over the run folder on
//! the claim, so a pod that dies is retried by the Job and resumes from the journal or the
//! checkpoint. The teacher is called through its MegaModel's (or BaseModel's) own server, with
//! that server's API key. The stages report a one-line JSON summary as their termination message,
//! which the status shows (progress, cost, scores). Once eval succeeded, the adapter is added to
//! the student BaseModel under a field manager of its own. Deleting the Distillation stops its
//! Jobs and keeps or deletes the claim per `spec.storage.dataPolicy`.
//!
//! The decisions (which Job next, the status from the Jobs and their pods, the objects) are pure
//! functions, tested without a cluster; [`reconcile`] reads and writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodSpec, PodTemplateSpec,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use nstream_core::distillation::{DEFAULT_CLAIM_SIZE, SUCCEEDED};
use nstream_core::status::{ConditionStatus, DEGRADED, READY};
use nstream_core::validate::Check;
use nstream_core::{
    BaseModel, DataPolicy, Distillation, DistillationScore, DistillationSpec, DistillationStageStatus,
    DistillationStatus, MegaModel, StagePhase,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::controller::Context;
use crate::desired::{self, MANAGED_BY, MANAGED_BY_LABEL, WORKING_DIR};
use crate::error::{Error, Result};
use crate::model::{Served, ServedResource, api_key_secret_name};
use crate::settings::{ADAPTERS_CLAIM_ANNOTATION, ADAPTERS_MOUNT_PATH, FIELD_MANAGER, OperatorSettings};

/// Label on a Distillation's objects: its `metadata.name`.
pub const DISTILLATION_LABEL: &str = "llm.nstream.ai/distillation";
/// Label on a Distillation's Jobs: the stage.
pub const STAGE_LABEL: &str = "llm.nstream.ai/stage";
/// The finalizer that stops the Jobs and applies the data policy before a Distillation goes.
pub const FINALIZER: &str = "llm.nstream.ai/distillation";
/// The field manager of the adapter entry and annotation the operator adds to the student: its
/// own, so the user's entries and fields stay the user's.
pub const ADAPTER_FIELD_MANAGER: &str = "nstream-operator-distillation";
/// The key of the distill file in the ConfigMap.
pub const DISTILL_FILE_KEY: &str = "distill.yaml";
/// Where the claim is mounted, relative to [`WORKING_DIR`].
pub const DATA_DIR: &str = "data";
/// Where the dataset ConfigMap is mounted, relative to [`WORKING_DIR`].
pub const DATASET_DIR: &str = "dataset";
/// Where the stages write their summary (the Kubernetes default `terminationMessagePath`).
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The name of the Jobs' container.
pub const CONTAINER_NAME: &str = "distill";
/// Retries of a stage whose pod died: each retry resumes where the last one stopped.
pub const BACKOFF_LIMIT: i32 = 4;
/// The kind, for metrics.
const KIND: &str = "Distillation";
/// How often a Distillation with a Job running is looked at even without a change.
const RUNNING_RESYNC: Duration = Duration::from_secs(15);

/// A stage of the cluster's Distillation: one Job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The teacher answers the inputs, and the answers are split (`--stage generate,split`).
    Generate,
    /// The student is fine-tuned (`--stage finetune`).
    Finetune,
    /// The base, the student and the teacher are scored (`--stage eval`).
    Eval,
}

impl Stage {
    /// The stages, in order.
    pub const ALL: [Stage; 3] = [Self::Generate, Self::Finetune, Self::Eval];

    /// The stage's name in status, labels and Job names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Finetune => "finetune",
            Self::Eval => "eval",
        }
    }

    /// The value of `nstream distill --stage`.
    pub fn cli_stages(self) -> &'static str {
        match self {
            Self::Generate => "generate,split",
            Self::Finetune => "finetune",
            Self::Eval => "eval",
        }
    }

    /// Whether the stage runs the student locally (and so takes its resources and GPU).
    fn runs_the_student(self) -> bool {
        matches!(self, Self::Finetune | Self::Eval)
    }
}

/// `<prefix>-<name>[-<suffix>]` as a DNS label of at most 63 characters; a longer one is cut
/// and made unique with a hash of the name.
pub fn short_name(name: &str, suffix: Option<&str>) -> String {
    const MAX: usize = 63;
    let tail = suffix.map(|suffix| format!("-{suffix}")).unwrap_or_default();
    let plain = format!("distill-{name}{tail}");
    if plain.len() <= MAX {
        return plain;
    }
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest.iter().take(4).map(|byte| format!("{byte:02x}")).collect();
    let mut head: String = format!("distill-{name}").chars().take(MAX - hash.len() - 1 - tail.len()).collect();
    while head.ends_with('-') {
        head.pop();
    }
    format!("{head}-{hash}{tail}")
}

/// The ConfigMap's name (and that of the claim the operator makes).
pub fn config_map_name(name: &str) -> String {
    short_name(name, None)
}

/// A stage's Job name.
pub fn job_name(name: &str, stage: Stage) -> String {
    short_name(name, Some(stage.name()))
}

/// The data claim: the one `spec.storage.claimName` names, or the operator's.
pub fn claim_name(name: &str, spec: &DistillationSpec) -> String {
    spec.storage.as_ref().and_then(|storage| storage.claim_name.clone()).unwrap_or_else(|| config_map_name(name))
}

/// Whether the operator made (and may delete) the claim.
pub fn owns_claim(spec: &DistillationSpec) -> bool {
    spec.storage.as_ref().and_then(|storage| storage.claim_name.as_ref()).is_none()
}

/// The run folder, relative to the claim's root: `spec.output`, or `runs/<name>`.
pub fn run_folder(name: &str, spec: &DistillationSpec) -> String {
    spec.output.clone().unwrap_or_else(|| format!("runs/{name}")).trim_end_matches('/').to_string()
}

/// The adapter folder on the claim, as the student's pods read it (the claim mounted at
/// [`ADAPTERS_MOUNT_PATH`]).
pub fn adapter_path(name: &str, spec: &DistillationSpec) -> String {
    format!("{ADAPTERS_MOUNT_PATH}/{}/student", run_folder(name, spec))
}

/// A path on the claim must stay on it: relative, with no `..`.
fn claim_path_problem(field: &str, path: &str) -> Option<String> {
    let escapes = path.starts_with('/') || path.split('/').any(|part| part == "..") || path.starts_with('~');
    escapes.then(|| {
        format!("{field}: `{path}` leaves the data claim; on a cluster it is a path relative to the claim's root")
    })
}

/// What is wrong with a Distillation for the cluster, beyond its schema.
pub fn problems(distillation: &Distillation) -> Vec<String> {
    let spec = &distillation.spec;
    let mut problems: Vec<String> = spec.problems("spec").iter().map(ToString::to_string).collect();
    if let Some(output) = &spec.output {
        problems.extend(claim_path_problem("spec.output", output));
    }
    if spec.task.dataset_config_map.is_none() {
        problems.extend(claim_path_problem("spec.task.dataset", &spec.task.dataset));
    } else if spec.task.dataset.contains('/') {
        problems.push(format!(
            "spec.task.dataset: `{}` is not a ConfigMap key; with task.datasetConfigMap it names the key holding the inputs",
            spec.task.dataset
        ));
    }
    let name = distillation.metadata.name.clone().unwrap_or_default();
    let adapter = spec.student_name_or_default(&name);
    if adapter == spec.student {
        problems.push(format!(
            "spec.studentName: `{adapter}` is the student's own name; the adapter is served beside the base under another"
        ));
    }
    problems
}

/// The teacher as the Jobs reach it: the server the operator runs for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Teacher {
    /// `metadata.name` (also the model id its server answers to).
    pub name: String,
    /// The server's OpenAI-compatible base URL (its Service).
    pub endpoint: String,
    /// The Secret holding the server's API key.
    pub api_key_secret: String,
}

impl Teacher {
    /// The teacher's server, as the operator runs it for a resource of `kind`.
    pub fn of(served: &Served, settings: &OperatorSettings) -> Self {
        Self {
            name: served.name.clone(),
            endpoint: desired::endpoint(served, settings),
            api_key_secret: api_key_secret_name(served.kind, &served.name),
        }
    }
}

/// Everything the objects of a Distillation are made from.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`, for owner references.
    pub uid: String,
    /// The spec.
    pub spec: DistillationSpec,
    /// The teacher's server.
    pub teacher: Teacher,
    /// The student as the operator serves it (its credential moved to a Secret reference).
    pub student: Served,
}

fn labels(plan: &Plan) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "nstream-distill".to_string()),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (DISTILLATION_LABEL.to_string(), plan.name.clone()),
    ])
}

/// The owner reference tying an object to its Distillation.
pub fn owner_reference(plan: &Plan) -> OwnerReference {
    desired::controller_reference(KIND, &plan.name, &plan.uid)
}

fn metadata(plan: &Plan, name: String, owned: bool) -> ObjectMeta {
    desired::object_metadata(name, &plan.namespace, labels(plan), owned.then(|| owner_reference(plan)))
}

/// The distill file the Jobs run: the teacher as an OpenAI-compatible MegaModel pointing at its
/// server (with that server's API key from its Secret), the student BaseModel (without its
/// adapters), and the Distillation with its paths moved onto the claim. The file is mounted in the
/// working directory (a `subPath` mount), so its relative paths are the pod's `data/...` and
/// `dataset/...`.
pub fn distill_file(plan: &Plan) -> String {
    let teacher = serde_json::json!({
        "apiVersion": nstream_core::spec::API_VERSION,
        "kind": "MegaModel",
        "metadata": {"name": plan.teacher.name},
        "spec": {
            "modelProvider": "OpenAI",
            "modelTemplate": {"openAI": {
                "endpoint": plan.teacher.endpoint,
                "model": plan.teacher.name,
                "apikeySecretRef": {"name": plan.teacher.api_key_secret, "key": desired::API_KEY_DATA_KEY},
            }},
        },
    });
    let mut student = plan.student.server_document.clone();
    if let Some(info) = student.pointer_mut("/spec/baseModelServingInfo").and_then(serde_json::Value::as_object_mut) {
        // The Jobs train and score the base; the adapters it serves are not theirs to load.
        info.remove("adapters");
    }
    let mut spec = plan.spec.clone();
    spec.task.dataset = match spec.task.dataset_config_map.take() {
        Some(_) => format!("{DATASET_DIR}/{}", spec.task.dataset),
        None => format!("{DATA_DIR}/{}", spec.task.dataset),
    };
    spec.output = Some(format!("{DATA_DIR}/{}", run_folder(&plan.name, &plan.spec)));
    // The claim's settings are the operator's, not the run's: changing them does not change the run.
    spec.storage = None;
    let distillation = serde_json::json!({
        "apiVersion": nstream_core::spec::API_VERSION,
        "kind": KIND,
        "metadata": {"name": plan.name},
        "spec": spec,
    });
    [teacher, student, distillation]
        .iter()
        .map(|document| serde_yaml::to_string(document).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The ConfigMap holding the distill file.
pub fn config_map(plan: &Plan) -> ConfigMap {
    ConfigMap {
        metadata: metadata(plan, config_map_name(&plan.name), true),
        data: Some(BTreeMap::from([(DISTILL_FILE_KEY.to_string(), distill_file(plan))])),
        ..ConfigMap::default()
    }
}

/// The data claim the operator makes (none when `storage.claimName` names the user's). Not owned
/// by the Distillation: the finalizer applies the data policy.
pub fn claim(plan: &Plan) -> Option<PersistentVolumeClaim> {
    if !owns_claim(&plan.spec) {
        return None;
    }
    let storage = plan.spec.storage.clone().unwrap_or_default();
    let size = storage.size.map_or_else(|| DEFAULT_CLAIM_SIZE.to_string(), |size| size.as_str().to_string());
    Some(PersistentVolumeClaim {
        metadata: metadata(plan, claim_name(&plan.name, &plan.spec), false),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), Quantity(size))])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    })
}

/// A stage's Job: `nstream distill -f config/distill.yaml --stage ...` over the claim, retried
/// [`BACKOFF_LIMIT`] times (each retry resumes), its summary in the termination message. The
/// finetune and eval stages run the student locally: they take its resources, GPU, tolerations
/// and node selector, as its server pods do.
pub fn job(plan: &Plan, stage: Stage, settings: &OperatorSettings) -> Job {
    let student = &plan.student;
    // Only fine-tuning trains on the GPU (`nstream distill --device cuda`); eval runs the
    // student on the CPU, so its Job does not hold a GPU.
    let gpus = if stage == Stage::Finetune { desired::gpus(student) } else { 0 };
    let mut volumes = vec![
        desired::config_map_volume("config", config_map_name(&plan.name), DISTILL_FILE_KEY),
        desired::claim_volume("data", claim_name(&plan.name, &plan.spec), false),
        desired::empty_dir_volume("tmp", None),
        desired::secret_volume("teacher-key", plan.teacher.api_key_secret.clone(), desired::API_KEY_DATA_KEY),
    ];
    let mut mounts = vec![
        // One file in the working directory: the paths of the file are relative to it.
        VolumeMount {
            sub_path: Some(DISTILL_FILE_KEY.into()),
            ..desired::volume_mount("config", format!("{WORKING_DIR}/{DISTILL_FILE_KEY}"), true)
        },
        desired::volume_mount("data", format!("{WORKING_DIR}/{DATA_DIR}"), false),
        desired::volume_mount("tmp", "/tmp".into(), false),
        desired::volume_mount("teacher-key", desired::secrets_dir(&plan.teacher.api_key_secret), true),
    ];
    if let Some(dataset) = &plan.spec.task.dataset_config_map {
        volumes.push(desired::config_map_volume("dataset", dataset.clone(), &plan.spec.task.dataset));
        mounts.push(desired::volume_mount("dataset", format!("{WORKING_DIR}/{DATASET_DIR}"), true));
    }
    // The student's model cache (its cache claim, or an emptyDir) and its hub token, as its
    // server pods have them.
    let (student_volumes, student_mounts) = desired::volumes(student, settings);
    for wanted in ["cache", "credentials"] {
        if let Some(volume) = student_volumes.iter().find(|volume| volume.name == wanted) {
            volumes.push(volume.clone());
        }
        if let Some(volume_mount) = student_mounts.iter().find(|volume_mount| volume_mount.name == wanted) {
            mounts.push(volume_mount.clone());
        }
    }
    let mut env = desired::server_env(student, settings);
    env.push(EnvVar {
        name: "NSTREAM_TERMINATION_MESSAGE".into(),
        value: Some(TERMINATION_MESSAGE_PATH.into()),
        value_from: None,
    });
    let resources = stage.runs_the_student().then(|| {
        let mut resources = desired::resource_requirements(student);
        if gpus == 0 {
            for quantities in [resources.limits.as_mut(), resources.requests.as_mut()].into_iter().flatten() {
                quantities.retain(|name, _| name != desired::GPU_RESOURCE);
            }
        }
        resources
    });
    let mut args = ["distill", "-f", DISTILL_FILE_KEY, "--stage", stage.cli_stages(), "--progress", "lines"]
        .map(String::from)
        .to_vec();
    if gpus > 0 {
        args.extend(["--device".to_string(), "cuda".to_string()]);
    }
    let image = if gpus > 0 { settings.distill_image_cuda.clone() } else { settings.distill_image.clone() };
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(image),
        image_pull_policy: settings.image_pull_policy.clone(),
        command: Some(vec!["nstream".into()]),
        args: Some(args),
        working_dir: Some(WORKING_DIR.into()),
        env: Some(env),
        resources,
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        // A pod killed before it wrote its summary shows the end of its log instead.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(desired::container_security_context()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let mut job_labels = labels(plan);
    job_labels.insert(STAGE_LABEL.to_string(), stage.name().to_string());
    Job {
        metadata: ObjectMeta { labels: Some(job_labels.clone()), ..metadata(plan, job_name(&plan.name, stage), true) },
        spec: Some(JobSpec {
            backoff_limit: Some(BACKOFF_LIMIT),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(job_labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    // A dead pod is replaced by a new one (the Job counts it), never restarted in
                    // place: each attempt is visible. The claim is written by the pods' group
                    // (`fsGroup`).
                    restart_policy: Some("Never".into()),
                    ..desired::pod_spec(container, volumes, settings, gpus)
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// The summary a stage writes as its termination message (`nstream distill
/// --termination-message`).
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StageSummary {
    /// The stages the run did.
    #[serde(default)]
    pub stages: Vec<String>,
    /// Whether it ended without an error.
    #[serde(default)]
    pub ok: bool,
    /// The error, when it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The teacher's answers.
    #[serde(default)]
    pub generate: Option<GenerateSummary>,
    /// The split.
    #[serde(default)]
    pub split: Option<SplitSummary>,
    /// The fine-tuning.
    #[serde(default)]
    pub finetune: Option<FinetuneSummary>,
    /// The scores.
    #[serde(default)]
    pub eval: Option<EvalSummary>,
}

/// The generate stage's figures.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GenerateSummary {
    /// Inputs read.
    pub inputs: u64,
    /// Inputs answered (earlier attempts included).
    pub answered: u64,
    /// Inputs without a valid answer.
    pub failed: u64,
    /// Answered by this attempt.
    #[serde(default)]
    pub answered_now: u64,
    /// Dollars spent, earlier attempts included.
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

/// The split's sizes.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SplitSummary {
    /// Answers trained on.
    pub train: u64,
    /// Answers held out.
    pub held_out: u64,
}

/// The fine-tuning's figures.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FinetuneSummary {
    /// Steps done.
    pub step: u64,
    /// Steps in all.
    pub total_steps: u64,
    /// The last training loss.
    #[serde(default)]
    pub loss: Option<f64>,
}

/// The scores.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EvalSummary {
    /// The headline metric.
    pub headline: String,
    /// Per model.
    pub models: Vec<ModelSummary>,
}

/// One model's headline.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSummary {
    /// The model's name.
    pub model: String,
    /// teacher, base or student.
    pub role: String,
    /// The mean, 0 to 1.
    pub score: f64,
    /// The interval's low end.
    pub low: f64,
    /// The interval's high end.
    pub high: f64,
}

/// What a stage's Job and its pods say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedStage {
    /// The Job, if it exists.
    pub job: Option<Job>,
    /// The newest termination message of its pods: a summary, or (a pod that died without one)
    /// the end of its log.
    pub message: Option<String>,
}

/// The phase of a stage from its Job.
pub fn job_phase(job: Option<&Job>) -> StagePhase {
    let Some(job) = job else { return StagePhase::Pending };
    let status = job.status.as_ref();
    let condition = |kind: &str| {
        status
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == kind && c.status == "True"))
    };
    if condition("Complete") || status.and_then(|status| status.succeeded).unwrap_or(0) > 0 {
        StagePhase::Succeeded
    } else if condition("Failed") {
        StagePhase::Failed
    } else {
        StagePhase::Running
    }
}

/// What to do next, from the stages' phases in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Create this stage's Job (every stage before it succeeded).
    Create(Stage),
    /// A Job is running: wait for it.
    Wait(Stage),
    /// This stage failed beyond its retries: stop.
    Failed(Stage),
    /// Every stage succeeded: attach the adapter.
    Attach,
}

/// Which Job comes next: the first stage that has not succeeded decides.
pub fn next(phases: &[(Stage, StagePhase)]) -> Next {
    for (stage, phase) in phases {
        match phase {
            StagePhase::Succeeded => continue,
            StagePhase::Pending => return Next::Create(*stage),
            StagePhase::Running => return Next::Wait(*stage),
            StagePhase::Failed => return Next::Failed(*stage),
        }
    }
    Next::Attach
}

fn percent(score: f64) -> String {
    format!("{:.1}%", score * 100.0)
}

/// A stage's status from its Job and its pods' newest termination message.
pub fn stage_status(stage: Stage, observed: &ObservedStage) -> DistillationStageStatus {
    let job = observed.job.as_ref();
    let status = job.and_then(|job| job.status.as_ref());
    let phase = job_phase(job);
    let attempts =
        status.map(|status| status.active.unwrap_or(0) + status.succeeded.unwrap_or(0) + status.failed.unwrap_or(0));
    let summary = observed.message.as_deref().and_then(|text| serde_json::from_str::<StageSummary>(text).ok());
    let mut progress = None;
    let mut cost_usd = None;
    let mut message = None;
    if let Some(summary) = &summary {
        progress = match stage {
            Stage::Generate => summary.generate.as_ref().map(|generate| {
                let split = summary
                    .split
                    .as_ref()
                    .map(|split| format!("; split {} to train on, {} held out", split.train, split.held_out))
                    .unwrap_or_default();
                format!(
                    "{}/{} inputs answered ({} by this attempt), {} failed{split}",
                    generate.answered, generate.inputs, generate.answered_now, generate.failed
                )
            }),
            Stage::Finetune => summary.finetune.as_ref().map(|finetune| {
                let loss = finetune.loss.map(|loss| format!(", loss {loss:.4}")).unwrap_or_default();
                format!("step {}/{}{loss}", finetune.step, finetune.total_steps)
            }),
            Stage::Eval => summary.eval.as_ref().map(|eval| {
                let models: Vec<String> = eval
                    .models
                    .iter()
                    .map(|model| format!("{} {} {}", model.role, model.model, percent(model.score)))
                    .collect();
                format!("{}: {}", eval.headline, models.join(", "))
            }),
        };
        cost_usd = summary.generate.as_ref().and_then(|generate| generate.cost_usd);
        message = summary.error.clone();
    } else if phase == StagePhase::Failed || phase == StagePhase::Running {
        // No summary: the last words of a pod that died.
        message = observed.message.as_ref().map(|text| {
            let text = text.trim();
            let start = text.len().saturating_sub(512);
            let start = (start..=text.len()).find(|index| text.is_char_boundary(*index)).unwrap_or(text.len());
            text[start..].to_string()
        });
    }
    if phase == StagePhase::Failed && message.is_none() {
        message = Some(format!("the Job failed {} times (backoffLimit {BACKOFF_LIMIT})", attempts.unwrap_or(0)));
    }
    DistillationStageStatus {
        name: stage.name().to_string(),
        phase,
        job: job.and_then(|job| job.metadata.name.clone()),
        attempts,
        start_time: status.and_then(|status| status.start_time.clone()),
        completion_time: status.and_then(|status| status.completion_time.clone()),
        progress,
        cost_usd,
        message,
    }
}

/// The scores of the eval stage's summary.
pub fn scores(message: Option<&str>) -> Vec<DistillationScore> {
    let Some(eval) = message.and_then(|text| serde_json::from_str::<StageSummary>(text).ok()).and_then(|s| s.eval)
    else {
        return Vec::new();
    };
    eval.models
        .iter()
        .map(|model| DistillationScore {
            model: model.model.clone(),
            role: model.role.clone(),
            metric: eval.headline.clone(),
            score: model.score,
            low: Some(model.low),
            high: Some(model.high),
        })
        .collect()
}

/// Why the Distillation cannot go on, when something outside it is missing or wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// The spec cannot run.
    Invalid(String),
    /// The teacher or student is missing, or the teacher's server is not Ready: wait.
    For(String),
    /// The adapter cannot be attached.
    AttachFailed(String),
}

/// The `Ready` (and `Succeeded`) condition: status, reason, message.
type ReadyCondition = (ConditionStatus, &'static str, String);
/// The `Degraded` condition when it holds: reason, message.
type DegradedCondition = (&'static str, String);

/// The whole status: the stages, the scores, the printer columns and the conditions.
pub fn derive_status(
    generation: Option<i64>,
    claim: &str,
    observed: &[(Stage, ObservedStage)],
    waiting: Option<&Waiting>,
    attached: Option<&str>,
    previous: Option<&DistillationStatus>,
    now: Time,
) -> DistillationStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    status.claim = Some(claim.to_string());
    status.stages = observed.iter().map(|(stage, observed)| stage_status(*stage, observed)).collect();
    let phases: Vec<(Stage, StagePhase)> =
        status.stages.iter().zip(observed).map(|(s, (stage, _))| (*stage, s.phase)).collect();
    let eval_message = observed.iter().find(|(stage, _)| *stage == Stage::Eval).and_then(|(_, o)| o.message.as_deref());
    let eval_done = phases.iter().any(|(stage, phase)| *stage == Stage::Eval && *phase == StagePhase::Succeeded);
    status.scores = if eval_done { scores(eval_message) } else { Vec::new() };
    status.score = status
        .scores
        .iter()
        .find(|score| score.role == "student")
        .map(|score| format!("{} {}", score.metric, percent(score.score)));
    status.adapter = attached.map(str::to_string);
    let next = next(&phases);
    let (stage, ready, degraded): (String, ReadyCondition, Option<DegradedCondition>) = match (waiting, next) {
        (Some(Waiting::Invalid(problem)), _) => (
            "Invalid".into(),
            (ConditionStatus::False, "InvalidSpec", problem.clone()),
            Some(("InvalidSpec", problem.clone())),
        ),
        (_, Next::Failed(stage)) => {
            let message = format!(
                "stage {} failed: {}",
                stage.name(),
                status.stage(stage.name()).and_then(|s| s.message.clone()).unwrap_or_default()
            );
            ("Failed".into(), (ConditionStatus::False, "StageFailed", message.clone()), Some(("StageFailed", message)))
        }
        (Some(Waiting::AttachFailed(problem)), _) => (
            "Attach".into(),
            (ConditionStatus::False, "AdapterNotAttached", problem.clone()),
            Some(("AdapterNotAttached", problem.clone())),
        ),
        (Some(Waiting::For(what)), next) => {
            let stage = match next {
                Next::Create(stage) | Next::Wait(stage) | Next::Failed(stage) => stage.name().to_string(),
                Next::Attach => "Attach".into(),
            };
            (stage, (ConditionStatus::False, "Waiting", what.clone()), None)
        }
        (None, Next::Attach) if attached.is_some() => (
            "Succeeded".into(),
            (ConditionStatus::True, "Succeeded", format!("the adapter is served as {}", attached.unwrap_or_default())),
            None,
        ),
        (None, Next::Attach) => ("Attach".into(), (ConditionStatus::False, "Attaching", String::new()), None),
        (None, Next::Create(stage) | Next::Wait(stage)) => (
            stage.name().into(),
            (ConditionStatus::False, "Running", format!("stage {} is running", stage.name())),
            None,
        ),
    };
    let (ready_status, ready_reason, ready_message) = ready;
    for kind in [READY, SUCCEEDED] {
        status.set_condition(kind, ready_status, ready_reason, &ready_message, generation, now.clone());
    }
    match &degraded {
        Some((reason, message)) => {
            status.set_condition(DEGRADED, ConditionStatus::True, reason, message, generation, now)
        }
        None => status.set_condition(DEGRADED, ConditionStatus::False, "AsExpected", "", generation, now),
    }
    status.stage = Some(stage);
    status
}

/// An Event for each stage whose phase changed, and one when the whole run succeeded.
pub fn transitions(previous: Option<&DistillationStatus>, status: &DistillationStatus) -> Vec<(bool, String, String)> {
    let mut events = Vec::new();
    for stage in &status.stages {
        let before = previous.and_then(|previous| previous.stage(&stage.name)).map(|s| s.phase).unwrap_or_default();
        if before == stage.phase {
            continue;
        }
        let (warning, reason, note) = match stage.phase {
            StagePhase::Pending => continue,
            StagePhase::Running => (
                false,
                "StageStarted",
                format!("stage {} started ({})", stage.name, stage.job.clone().unwrap_or_default()),
            ),
            StagePhase::Succeeded => (
                false,
                "StageSucceeded",
                format!(
                    "stage {} succeeded{}",
                    stage.name,
                    stage.progress.as_ref().map(|p| format!(": {p}")).unwrap_or_default()
                ),
            ),
            StagePhase::Failed => (
                true,
                "StageFailed",
                format!("stage {} failed: {}", stage.name, stage.message.clone().unwrap_or_default()),
            ),
        };
        events.push((warning, reason.to_string(), note));
    }
    let adapter_before = previous.and_then(|previous| previous.adapter.clone());
    if let Some(adapter) = &status.adapter
        && adapter_before.as_ref() != Some(adapter)
    {
        events.push((false, "AdapterAttached".into(), format!("the student serves the adapter as {adapter}")));
    }
    events
}

/// The server-side apply patch that adds the adapter to the student: the claim annotation and one
/// entry of `adapters` (a list keyed by name), under [`ADAPTER_FIELD_MANAGER`].
pub fn adapter_patch(name: &str, spec: &DistillationSpec, claim: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": nstream_core::spec::API_VERSION,
        "kind": "BaseModel",
        "metadata": {
            "name": spec.student,
            "annotations": {ADAPTERS_CLAIM_ANNOTATION: claim},
        },
        "spec": {"baseModelServingInfo": {"adapters": [{
            "name": spec.student_name_or_default(name),
            "hfModelId": adapter_path(name, spec),
        }]}},
    })
}

/// Why the adapter cannot be put on this student: another claim is mounted there already.
pub fn attach_conflict(student: &BaseModel, claim: &str) -> Option<String> {
    let current = student.annotations().get(ADAPTERS_CLAIM_ANNOTATION)?;
    (current != claim).then(|| {
        format!(
            "BaseModel {} mounts the claim {current} ({ADAPTERS_CLAIM_ANNOTATION}); the adapter is on {claim}: use storage.claimName: {current}, or move the annotation",
            student.name_any()
        )
    })
}

/// The newest termination message of a Job's pods.
fn newest_message(pods: &[Pod]) -> Option<String> {
    pods.iter()
        .flat_map(|pod| pod.status.iter().flat_map(|status| status.container_statuses.iter().flatten()))
        .filter(|container| container.name == CONTAINER_NAME)
        .filter_map(|container| container.state.as_ref()?.terminated.as_ref())
        .filter_map(|terminated| Some((terminated.finished_at.clone(), terminated.message.clone()?)))
        .filter(|(_, message)| !message.trim().is_empty())
        .max_by(|a, b| a.0.as_ref().map(|t| t.0).cmp(&b.0.as_ref().map(|t| t.0)))
        .map(|(_, message)| message)
}

async fn publish(context: &Context, distillation: &Distillation, warning: bool, reason: String, note: String) {
    let event = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason,
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = context.recorder.publish(&event, &distillation.object_ref(&())).await {
        tracing::warn!(error = %error, "publishing an event failed");
    } else {
        context.metrics.wrote(KIND, "event");
    }
}

/// The teacher's server, once it is Ready; or what it waits for.
async fn teacher_of(
    client: &Client,
    namespace: &str,
    name: &str,
    settings: &OperatorSettings,
) -> Result<Result<Teacher, Waiting>> {
    if let Some(mega) =
        Api::<MegaModel>::namespaced(client.clone(), namespace).get_opt(name).await.map_err(Error::Kube)?
    {
        if !mega.status.as_ref().is_some_and(|status| status.is_ready()) {
            return Ok(Err(Waiting::For(format!("waiting for the teacher MegaModel {name}'s gateway to be Ready"))));
        }
        return Ok(Ok(Teacher::of(&mega.served(), settings)));
    }
    if let Some(base) =
        Api::<BaseModel>::namespaced(client.clone(), namespace).get_opt(name).await.map_err(Error::Kube)?
    {
        if !base.status.as_ref().is_some_and(|status| status.is_ready()) {
            return Ok(Err(Waiting::For(format!("waiting for the teacher BaseModel {name} to be Ready"))));
        }
        return Ok(Ok(Teacher::of(&base.served(), settings)));
    }
    Ok(Err(Waiting::For(format!("spec.teacher: no MegaModel or BaseModel {name} in namespace {namespace}"))))
}

/// Merge-patches `metadata.finalizers` to `finalizers`.
async fn set_finalizers(api: &Api<Distillation>, name: &str, finalizers: Vec<String>) -> Result<()> {
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
    match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(Error::Kube(error)),
    }
}

/// A Distillation being deleted: its Jobs are stopped (their pods go with them), the claim the
/// operator made is deleted when `dataPolicy: Delete`, and the finalizer goes.
async fn finalize(distillation: &Distillation, context: &Context) -> Result<Action> {
    let name = distillation.name_any();
    let namespace = distillation.namespace().unwrap_or_default();
    let client = &context.client;
    let jobs = Api::<Job>::namespaced(client.clone(), &namespace);
    let selector = format!("{DISTILLATION_LABEL}={name}");
    let listed = jobs.list(&ListParams::default().labels(&selector)).await.map_err(Error::Kube)?;
    for job in listed.items.iter().filter(|job| controlled(job.meta(), distillation)) {
        match jobs.delete(&job.name_any(), &DeleteParams::background()).await {
            Ok(_) => context.metrics.wrote(KIND, "Job"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(Error::Kube(error)),
        }
    }
    let spec = &distillation.spec;
    if spec.data_policy() == DataPolicy::Delete && owns_claim(spec) {
        let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace);
        let claim = claim_name(&name, spec);
        let ours = claims
            .get_metadata_opt(&claim)
            .await
            .map_err(Error::Kube)?
            .is_some_and(|meta| meta.labels().get(DISTILLATION_LABEL) == Some(&name));
        if ours {
            match claims.delete(&claim, &DeleteParams::background()).await {
                Ok(_) => context.metrics.wrote(KIND, "PersistentVolumeClaim"),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(Error::Kube(error)),
            }
            tracing::info!(claim, "deleted the data claim (dataPolicy: Delete)");
        }
    }
    let remaining: Vec<String> = distillation.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    set_finalizers(&Api::namespaced(client.clone(), &namespace), &name, remaining).await?;
    Ok(Action::await_change())
}

fn controlled(meta: &ObjectMeta, distillation: &Distillation) -> bool {
    let uid = distillation.uid().unwrap_or_default();
    !uid.is_empty()
        && meta.owner_references.iter().flatten().any(|owner| owner.uid == uid && owner.controller == Some(true))
}

/// Server-side applies `object` under the operator's field manager.
async fn apply<T>(api: &Api<T>, object: &T) -> Result<T>
where
    T: Resource<DynamicType = ()> + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().ok_or(Error::MissingMetadata("name"))?;
    let stored = api
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
        .map_err(Error::Kube)?;
    Ok(stored)
}

/// Creates `object` unless it exists (Jobs and claims are immutable where it matters: a Job's
/// template never changes once made).
async fn create_once<T>(api: &Api<T>, object: &T, context: &Context) -> Result<()>
where
    T: Resource<DynamicType = ()> + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
    match api.create(&params, object).await {
        Ok(_) => {
            context.metrics.wrote(KIND, &T::kind(&()));
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(Error::Kube(error)),
    }
}

/// Reconciles one Distillation.
#[tracing::instrument(skip(distillation, context), fields(kind = KIND, namespace = distillation.namespace().unwrap_or_default(), name = %distillation.name_any()))]
pub async fn reconcile(distillation: Arc<Distillation>, context: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let name = distillation.name_any();
    let namespace = distillation.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let client = &context.client;
    let settings = &context.settings;
    let api = Api::<Distillation>::namespaced(client.clone(), &namespace);
    if distillation.meta().deletion_timestamp.is_some() {
        if distillation.finalizers().iter().any(|f| f == FINALIZER) {
            return finalize(&distillation, &context).await;
        }
        return Ok(Action::await_change());
    }
    if !distillation.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = distillation.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        set_finalizers(&api, &name, finalizers).await?;
    }
    let spec = &distillation.spec;
    let claim = claim_name(&name, spec);
    let jobs = Api::<Job>::namespaced(client.clone(), &namespace);
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);

    let mut waiting = None;
    let problems = problems(&distillation);
    if !problems.is_empty() {
        waiting = Some(Waiting::Invalid(problems.join("; ")));
    }
    let mut plan = None;
    if waiting.is_none() {
        let student = Api::<BaseModel>::namespaced(client.clone(), &namespace)
            .get_opt(&spec.student)
            .await
            .map_err(Error::Kube)?;
        match (student, teacher_of(client, &namespace, &spec.teacher, settings).await?) {
            (None, _) => {
                waiting =
                    Some(Waiting::For(format!("spec.student: no BaseModel {} in namespace {namespace}", spec.student)))
            }
            (Some(_), Err(why)) => waiting = Some(why),
            (Some(student), Ok(teacher)) => {
                plan = Some(Plan {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    uid: distillation.uid().unwrap_or_default(),
                    spec: spec.clone(),
                    teacher,
                    student: student.served(),
                })
            }
        }
    }
    if let Some(plan) = &plan {
        if let Some(wanted) = self::claim(plan) {
            create_once(&Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace), &wanted, &context)
                .await?;
        }
        apply(&Api::<ConfigMap>::namespaced(client.clone(), &namespace), &config_map(plan)).await?;
    }

    // What each stage's Job and pods say.
    let mut observed = Vec::new();
    for stage in Stage::ALL {
        let job = jobs
            .get_opt(&job_name(&name, stage))
            .await
            .map_err(Error::Kube)?
            .filter(|job| controlled(job.meta(), &distillation));
        let message = match &job {
            Some(job) => {
                let selector = format!("{DISTILLATION_LABEL}={name},{STAGE_LABEL}={}", stage.name());
                let listed = pods.list(&ListParams::default().labels(&selector)).await.map_err(Error::Kube)?;
                let owned: Vec<Pod> = listed
                    .items
                    .into_iter()
                    .filter(|pod| {
                        let uid = job.uid().unwrap_or_default();
                        pod.owner_references().iter().any(|owner| owner.uid == uid)
                    })
                    .collect();
                newest_message(&owned)
            }
            None => None,
        };
        observed.push((stage, ObservedStage { job, message }));
    }
    let phases: Vec<(Stage, StagePhase)> =
        observed.iter().map(|(stage, observed)| (*stage, job_phase(observed.job.as_ref()))).collect();
    let mut attached = None;
    match (next(&phases), &plan) {
        (Next::Create(stage), Some(plan)) if !matches!(waiting, Some(Waiting::Invalid(_))) => {
            let wanted = job(plan, stage, settings);
            create_once(&jobs, &wanted, &context).await?;
            tracing::info!(stage = stage.name(), "created the stage's Job");
            if let Ok(Some(created)) = jobs.get_opt(&job_name(&name, stage)).await
                && let Some((_, slot)) = observed.iter_mut().find(|(s, _)| *s == stage)
            {
                slot.job = Some(created);
            }
        }
        (Next::Attach, _) if waiting.is_none() || matches!(waiting, Some(Waiting::For(_))) => {
            // The adapter is on the claim: attach it even if the teacher went away since.
            waiting = None;
            let students = Api::<BaseModel>::namespaced(client.clone(), &namespace);
            match students.get_opt(&spec.student).await.map_err(Error::Kube)? {
                None => {
                    waiting = Some(Waiting::AttachFailed(format!("the student BaseModel {} is gone", spec.student)))
                }
                Some(student) => match attach_conflict(&student, &claim) {
                    Some(conflict) => waiting = Some(Waiting::AttachFailed(conflict)),
                    None => {
                        let patch = adapter_patch(&name, spec, &claim);
                        match students
                            .patch(&spec.student, &PatchParams::apply(ADAPTER_FIELD_MANAGER), &Patch::Apply(&patch))
                            .await
                        {
                            Ok(_) => attached = Some(spec.student_name_or_default(&name)),
                            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => {
                                waiting = Some(Waiting::AttachFailed(format!(
                                    "adding the adapter to BaseModel {} was refused: {}",
                                    spec.student, status.message
                                )))
                            }
                            Err(error) => return Err(Error::Kube(error)),
                        }
                    }
                },
            }
        }
        _ => {}
    }

    let previous = distillation.status.as_ref();
    let status = derive_status(
        distillation.metadata.generation,
        &claim,
        &observed,
        waiting.as_ref(),
        attached.as_deref(),
        previous,
        Time(Timestamp::now()),
    );
    if previous != Some(&status) {
        let patch = serde_json::json!({
            "apiVersion": nstream_core::spec::API_VERSION,
            "kind": KIND,
            "status": status,
        });
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(Error::Kube)?;
        context.metrics.wrote(KIND, "status");
        for (warning, reason, note) in transitions(previous, &status) {
            publish(&context, &distillation, warning, reason, note).await;
        }
        tracing::info!(stage = status.stage.as_deref().unwrap_or(""), "status updated");
    }
    context.metrics.reconciled(KIND, started.elapsed());
    let running = matches!(next(&phases), Next::Wait(_) | Next::Create(_));
    Ok(Action::requeue(if running || waiting.is_some() {
        settings.resync.min(RUNNING_RESYNC)
    } else {
        settings.resync
    }))
}

fn error_policy(distillation: Arc<Distillation>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.failed(KIND, &error.label());
    tracing::warn!(name = %distillation.name_any(), error = %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the Distillation controller until `shutdown` resolves: one over the whole cluster, or one
/// per namespace of [`OperatorSettings::watch_namespaces`].
pub async fn run(context: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let namespaces = context.settings.watch_namespaces.clone();
    crate::namespaces::per_namespace(&namespaces, shutdown, |namespace, shutdown| {
        run_in(context.clone(), namespace, shutdown)
    })
    .await;
}

/// The Distillation controller over `namespace` (every namespace when `None`).
async fn run_in(
    context: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = context.client.clone();
    let owned = watcher::Config::default().labels(DISTILLATION_LABEL);
    Controller::new(crate::controller::scoped::<Distillation>(&client, namespace), watcher::Config::default())
        .with_config(controller::Config::default().concurrency(4))
        .owns(crate::controller::scoped::<Job>(&client, namespace), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(error = %error, "distillation controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
