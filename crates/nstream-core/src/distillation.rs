//! The fifth kind, `Distillation`: a teacher (a MegaModel, or any chat model) answers a task's
//! inputs, a student BaseModel is fine-tuned on the answers and evaluated against the teacher on a
//! held-out part. `nstream distill -f FILE` runs it on one machine; the fields are the contract of
//! the cluster's Distillation resource too.

#![expect(
    clippy::duplicated_attributes,
    reason = "kube's printcolumn(...) repeats type_ and priority once per column, which this lint misreads"
)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use validator::Validate;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::patterns;
use crate::quantity::ResourceQuantity;
use crate::status::{ConditionStatus, find_condition, set_condition_in};
use crate::validate::{Check, Problem, field_rules, quote};

/// The share of the inputs held out for evaluation when `split.heldOut` is omitted.
pub const DEFAULT_HELD_OUT: f64 = 0.2;
/// The most tokens of one answer when `task.maxTokens` is omitted.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Steps between checkpoints of the fine-tuning when `fineTuning.saveEvery` is omitted: a killed
/// run loses at most this many steps.
pub const DEFAULT_SAVE_EVERY: u32 = 10;

/// A distillation: teacher -> ground truth -> fine-tuned student -> evaluated.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[kube(
    group = "llm.nstream.ai",
    version = "v1",
    kind = "Distillation",
    namespaced,
    status = "DistillationStatus",
    derive = "PartialEq",
    shortname = "distill",
    category = "nstream",
    doc = "A teacher's answers to a task, a student BaseModel fine-tuned on them and evaluated against the teacher.",
    printcolumn(name = "Teacher", type_ = "string", json_path = ".spec.teacher"),
    printcolumn(name = "Student", type_ = "string", json_path = ".spec.student"),
    printcolumn(name = "Stage", type_ = "string", json_path = ".status.stage"),
    printcolumn(name = "Score", type_ = "string", json_path = ".status.score"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistillationSpec {
    /// The `metadata.name` of the model that writes the ground truth: a MegaModel (or a
    /// BaseModel) in the same file or namespace.
    #[validate(regex(path = *patterns::DNS_LABEL))]
    #[schemars(regex(pattern = patterns::DNS_LABEL_PATTERN))]
    pub teacher: String,
    /// The `metadata.name` of the BaseModel that is fine-tuned.
    #[validate(regex(path = *patterns::DNS_LABEL))]
    #[schemars(regex(pattern = patterns::DNS_LABEL_PATTERN))]
    pub student: String,
    /// The inputs, how they become prompts, and what answers look like.
    #[validate(nested)]
    pub task: DistillationTask,
    /// How the inputs are shared between training and evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub split: Option<DistillationSplit>,
    /// How the teacher is called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub generation: Option<DistillationGeneration>,
    /// How the student is fine-tuned (`nstream finetune`'s settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub fine_tuning: Option<FineTuning>,
    /// How the student is measured against the teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub evaluation: Option<DistillationEvaluation>,
    /// The `metadata.name` of the BaseModel written for the fine-tuned student;
    /// `<metadata.name>-student` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *patterns::DNS_LABEL), length(max = 63))]
    #[schemars(regex(pattern = patterns::DNS_LABEL_PATTERN), length(max = 63))]
    pub student_name: Option<String>,
    /// The folder of the run (data, journals, checkpoints, adapter, reports); relative to the
    /// file locally; `runs/<metadata.name>` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 4096), regex(path = *patterns::DISPLAY_NAME))]
    #[schemars(length(min = 1, max = 4096))]
    pub output: Option<String>,
    /// On a cluster only (`nstream distill` ignores it): the PersistentVolumeClaim holding the
    /// run folder (data, journals, checkpoints, the adapter) and what becomes of it when the
    /// Distillation is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub storage: Option<DistillationStorage>,
}

/// What becomes of the data claim the operator made when its Distillation is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum DataPolicy {
    /// The claim stays (the teacher's answers cost money; the adapter is served from it).
    #[default]
    Keep,
    /// The claim is deleted with the Distillation (a claim named in `claimName` never is).
    Delete,
}

/// The claim of a Distillation on a cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistillationStorage {
    /// An existing PersistentVolumeClaim of the namespace to use (never deleted by the operator);
    /// the operator makes `distill-<metadata.name>` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *patterns::DNS_SUBDOMAIN), length(max = 253))]
    #[schemars(regex(pattern = patterns::DNS_SUBDOMAIN_PATTERN), length(max = 253))]
    pub claim_name: Option<String>,
    /// The size of the claim the operator makes; 10Gi when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ResourceQuantity>,
    /// The storage class of the claim the operator makes; the cluster's default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *patterns::DNS_SUBDOMAIN), length(max = 253))]
    #[schemars(regex(pattern = patterns::DNS_SUBDOMAIN_PATTERN), length(max = 253))]
    pub storage_class_name: Option<String>,
    /// `Keep` (default) or `Delete`: what becomes of the claim the operator made when the
    /// Distillation is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_policy: Option<DataPolicy>,
}

/// The size of the claim the operator makes when `storage.size` is omitted.
pub const DEFAULT_CLAIM_SIZE: &str = "10Gi";

/// The phase of one stage (one Job) of a Distillation on a cluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum StagePhase {
    /// Waiting for the stages before it.
    #[default]
    Pending,
    /// Its Job exists and has not finished (retries included).
    Running,
    /// Its Job completed.
    Succeeded,
    /// Its Job failed beyond its retries.
    Failed,
}

/// One stage of a Distillation on a cluster: its Job and what the Job's pods reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DistillationStageStatus {
    /// `generate` (teacher answers and the split), `finetune` or `eval`.
    pub name: String,
    /// Pending, Running, Succeeded or Failed.
    pub phase: StagePhase,
    /// The stage's Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Pods the Job started (a retry after a pod died counts one more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// When the Job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the Job completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// What the stage's last finished pod reported, in words (answers, steps, loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// US dollars paid to the teacher so far (earlier attempts included), where its price is
    /// known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Why the stage failed, or is waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One model's headline score on the held-out inputs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DistillationScore {
    /// The model's name.
    pub model: String,
    /// `teacher`, `base` or `student`.
    pub role: String,
    /// The headline metric (the first of the first scorer).
    pub metric: String,
    /// The mean, from 0 to 1.
    pub score: f64,
    /// The low end of its 95% bootstrap interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low: Option<f64>,
    /// The high end of its 95% bootstrap interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<f64>,
}

/// Condition type of a Distillation: every stage succeeded and the adapter is on the student.
pub const SUCCEEDED: &str = "Succeeded";

/// The observed state of a Distillation on a cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DistillationStatus {
    /// `Ready` and `Succeeded` (both True once the adapter is on the student), `Degraded` when a
    /// stage failed or the spec cannot run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The stage running now, or `Succeeded` / `Failed` at the end (a printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The student's headline score, such as `json_exact 100.0%` (a printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<String>,
    /// The PersistentVolumeClaim holding the run folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// The model id the student serves the adapter under, once attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// The stages in order: generate, finetune, eval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub stages: Vec<DistillationStageStatus>,
    /// The headline per model, from the eval stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<DistillationScore>,
}

impl DistillationStatus {
    /// The condition of a type, if set.
    pub fn condition(&self, condition_type: &str) -> Option<&Condition> {
        find_condition(&self.conditions, condition_type)
    }

    /// Sets a condition; `lastTransitionTime` moves only when the status changes (as
    /// [`set_condition_in`]).
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

    /// The status of a stage, if listed.
    pub fn stage(&self, name: &str) -> Option<&DistillationStageStatus> {
        self.stages.iter().find(|stage| stage.name == name)
    }
}

/// The task: inputs, prompt and answer format.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistillationTask {
    /// The inputs: JSONL (any fields), CSV (header row) or text (one input per line); relative to
    /// the file locally.
    #[validate(length(min = 1, max = 4096), regex(path = *patterns::DISPLAY_NAME))]
    #[schemars(length(min = 1, max = 4096))]
    pub dataset: String,
    /// A minijinja template rendering the user message from an input's fields (`{{ text }}`);
    /// without one, an input's `messages`, `prompt` or `text` field is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 65536))]
    #[schemars(length(min = 1, max = 65536))]
    pub prompt_template: Option<String>,
    /// A system message put first in every conversation, the teacher's and the student's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 65536))]
    #[schemars(length(min = 1, max = 65536))]
    pub system_prompt: Option<String>,
    /// A JSON schema every answer must match: the teacher is asked for it, answers that do not
    /// match are retried, and the `json` scorer checks the students against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub response_schema: Option<serde_json::Value>,
    /// On a cluster: a ConfigMap of the namespace holding the inputs under the key
    /// `task.dataset`; without it, `task.dataset` is a path on the data claim. `nstream distill`
    /// ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *patterns::DNS_SUBDOMAIN), length(max = 253))]
    #[schemars(regex(pattern = patterns::DNS_SUBDOMAIN_PATTERN), length(max = 253))]
    pub dataset_config_map: Option<String>,
    /// The most tokens of one answer; 256 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 32768))]
    #[schemars(range(min = 1, max = 32768))]
    pub max_tokens: Option<u32>,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// The split of the inputs, by a hash of each one: the same input always lands on the same side.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistillationSplit {
    /// The share of inputs held out for evaluation, never trained on; 0.2 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(exclusive_min = 0.0, exclusive_max = 1.0))]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub held_out: Option<f64>,
    /// The share of the training part whose loss is watched during fine-tuning; none when
    /// omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 0.0, exclusive_max = 1.0))]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub validation: Option<f64>,
}

/// How the teacher is called (the MegaModel's own limits apply too).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistillationGeneration {
    /// Requests in flight at most; 8 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1024))]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: Option<u32>,
    /// Stop calling the teacher once this many US dollars are spent (earlier runs included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 0.0))]
    #[schemars(range(min = 0.0))]
    pub max_cost: Option<f64>,
    /// The teacher's sampling temperature; the provider's default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 0.0, max = 2.0))]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f32>,
}

/// How the student is fine-tuned.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FineTuningMethod {
    /// Low-rank adapters; the base stays frozen and is shared when served.
    #[default]
    Lora,
    /// Every weight.
    Full,
}

/// The fine-tuning settings; omitted ones take `nstream finetune`'s defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FineTuning {
    /// `lora` (default) or `full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<FineTuningMethod>,
    /// LoRA rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1024))]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: Option<u32>,
    /// LoRA alpha: the update is scaled by alpha/rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(exclusive_min = 0.0))]
    #[schemars(range(min = 0.0))]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 0.0, exclusive_max = 1.0))]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub dropout: Option<f64>,
    /// Adapted modules: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or
    /// all-linear.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_modules: Vec<String>,
    /// Passes over the training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1000))]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: Option<u32>,
    /// Optimiser steps (overrides epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1))]
    #[schemars(range(min = 1))]
    pub max_steps: Option<u32>,
    /// Peak learning rate (AdamW).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(exclusive_min = 0.0, max = 1.0))]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub learning_rate: Option<f64>,
    /// Linear warmup steps before the cosine decay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u32>,
    /// Examples per micro-batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 4096))]
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: Option<u32>,
    /// Micro-batches per optimiser step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 4096))]
    #[schemars(range(min = 1, max = 4096))]
    pub gradient_accumulation: Option<u32>,
    /// Longest example in tokens; longer ones are cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 8, max = 131072))]
    #[schemars(range(min = 8, max = 131072))]
    pub max_seq_len: Option<u32>,
    /// Seed of the initialisation, the data order and dropout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Steps between checkpoints; 10 when omitted (a killed run loses at most that many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1))]
    #[schemars(range(min = 1))]
    pub save_every: Option<u32>,
}

/// How the students are measured.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistillationEvaluation {
    /// Scorers, as `nstream eval --scorer` takes them: exact, contains, json, regex:PATTERN,
    /// choice:A,B,...; the first is the headline. `json` when the task has a responseSchema,
    /// else `exact`, when omitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scorers: Vec<String>,
    /// Bootstrap resamples per interval; 1000 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 10, max = 100000))]
    #[schemars(range(min = 10, max = 100000))]
    pub bootstrap: Option<u32>,
}

/// Modules a LoRA adapter may target.
pub const TARGET_MODULES: [&str; 8] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all-linear"];

/// Scorer names `evaluation.scorers` accepts (those with a `:` take an argument).
pub const SCORERS: [&str; 5] = ["exact", "contains", "json", "regex:", "choice:"];

impl DistillationSpec {
    /// The held-out share, with its default.
    pub fn held_out(&self) -> f64 {
        self.split.as_ref().and_then(|split| split.held_out).unwrap_or(DEFAULT_HELD_OUT)
    }

    /// The scorers, with their default.
    pub fn scorers(&self) -> Vec<String> {
        match self.evaluation.as_ref().map(|evaluation| evaluation.scorers.clone()) {
            Some(scorers) if !scorers.is_empty() => scorers,
            _ if self.task.response_schema.is_some() => vec!["json".to_owned()],
            _ => vec!["exact".to_owned()],
        }
    }

    /// The data claim's policy, with its default.
    pub fn data_policy(&self) -> DataPolicy {
        self.storage.as_ref().and_then(|storage| storage.data_policy).unwrap_or_default()
    }

    /// The name of the BaseModel written for the fine-tuned student.
    pub fn student_name_or_default(&self, distillation_name: &str) -> String {
        self.student_name.clone().unwrap_or_else(|| format!("{distillation_name}-student"))
    }
}

impl Check for DistillationSpec {
    fn problems(&self, prefix: &str) -> Vec<Problem> {
        let mut problems = field_rules(self, prefix);
        if self.teacher == self.student {
            problems.push(Problem::new(
                format!("{prefix}.student"),
                format!("{} (the teacher too)", quote(&self.student)),
                "a BaseModel other than the teacher",
            ));
        }
        if let Some(schema) = &self.task.response_schema
            && !schema.is_object()
        {
            problems.push(Problem::new(
                format!("{prefix}.task.responseSchema"),
                "not an object",
                "a JSON schema object such as {type: object, properties: {...}}",
            ));
        }
        if let Some(fine_tuning) = &self.fine_tuning {
            for (index, module) in fine_tuning.target_modules.iter().enumerate() {
                if !TARGET_MODULES.contains(&module.as_str()) {
                    problems.push(Problem::new(
                        format!("{prefix}.fineTuning.targetModules[{index}]"),
                        quote(module),
                        format!("one of {}", TARGET_MODULES.join(", ")),
                    ));
                }
            }
            if fine_tuning.method == Some(FineTuningMethod::Full)
                && (fine_tuning.rank.is_some() || fine_tuning.alpha.is_some() || !fine_tuning.target_modules.is_empty())
            {
                problems.push(Problem::new(
                    format!("{prefix}.fineTuning.method"),
                    "full with LoRA settings (rank, alpha or targetModules)",
                    "method lora, or no LoRA settings",
                ));
            }
        }
        if let Some(evaluation) = &self.evaluation {
            for (index, scorer) in evaluation.scorers.iter().enumerate() {
                let known = SCORERS
                    .iter()
                    .any(|name| if name.ends_with(':') { scorer.starts_with(name) } else { scorer == name });
                if !known {
                    problems.push(Problem::new(
                        format!("{prefix}.evaluation.scorers[{index}]"),
                        quote(scorer),
                        "exact, contains, json, regex:PATTERN or choice:A,B,...",
                    ));
                } else if scorer == "json" && self.task.response_schema.is_none() {
                    problems.push(Problem::new(
                        format!("{prefix}.evaluation.scorers[{index}]"),
                        "json without task.responseSchema",
                        "a task.responseSchema for the json scorer to check answers against",
                    ));
                }
            }
        }
        if let Some(size) = self.storage.as_ref().and_then(|storage| storage.size.as_ref())
            && !size.amount().is_ok_and(|amount| amount.is_positive())
        {
            problems.push(Problem::new(format!("{prefix}.storage.size"), quote(size.as_str()), "a size such as 10Gi"));
        }
        for (field, path) in [(Some(&self.task.dataset), "task.dataset"), (self.output.as_ref(), "output")] {
            if let Some(text) = field
                && text.trim().is_empty()
            {
                problems.push(Problem::new(format!("{prefix}.{path}"), "an empty path", "a path"));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> DistillationSpec {
        serde_yaml::from_str(yaml).expect("a spec")
    }

    #[test]
    fn a_minimal_spec_is_valid_and_takes_the_defaults() {
        let spec = spec("teacher: gpt\nstudent: smollm2\ntask: {dataset: inputs.jsonl}\n");
        assert!(spec.problems("spec").is_empty(), "{:?}", spec.problems("spec"));
        assert_eq!(spec.held_out(), DEFAULT_HELD_OUT);
        assert_eq!(spec.scorers(), ["exact"]);
        assert_eq!(spec.student_name_or_default("orders"), "orders-student");
    }

    #[test]
    fn a_schema_makes_json_the_default_scorer() {
        let spec = spec("teacher: gpt\nstudent: smollm2\ntask: {dataset: d.jsonl, responseSchema: {type: object}}\n");
        assert_eq!(spec.scorers(), ["json"]);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let spec = spec(
            r#"
teacher: same
student: same
task: {dataset: d.jsonl, responseSchema: [1]}
split: {heldOut: 1.5}
fineTuning: {method: full, rank: 8, targetModules: [q_proj, qkv]}
evaluation: {scorers: [json, fuzzy]}
"#,
        );
        let paths: Vec<String> = spec.problems("spec").into_iter().map(|problem| problem.path).collect();
        for expected in [
            "spec.student",
            "spec.task.responseSchema",
            "spec.split.heldOut",
            "spec.fineTuning.targetModules[1]",
            "spec.fineTuning.method",
            "spec.evaluation.scorers[1]",
        ] {
            assert!(paths.iter().any(|path| path == expected), "{expected} not in {paths:?}");
        }
    }

    #[test]
    fn the_json_scorer_needs_a_schema() {
        let spec = spec("teacher: a\nstudent: b\ntask: {dataset: d.jsonl}\nevaluation: {scorers: [json]}\n");
        let problems = spec.problems("spec");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "spec.evaluation.scorers[0]");
    }
}
