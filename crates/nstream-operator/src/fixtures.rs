//! Test fixtures that read like prose: `EmbeddingModel::test("minilm").with_gpu(1)`,
//! `deployment().wanting(2).with_ready(1)`, `pod("minilm-1").crash_looping(5)`.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
    PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use nstream_core::{
    BaseModel, BaseModelSpec, EmbeddingModel, EmbeddingModelSpec, MegaModel, MegaModelProvider, MegaModelSpec,
    ModelHub, ModelTemplate, OpenAiTemplate, Replicas, ResourceQuantity, Resources, SecretKeyRef, SecretString,
    ServingInfo, ServingTemplate,
};

use crate::settings::OperatorSettings;

fn metadata(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("models".into()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        ..ObjectMeta::default()
    }
}

fn info(repo: &str) -> ServingInfo {
    ServingInfo {
        hf_model_id: repo.into(),
        model_provider: ModelHub::HuggingFace,
        model_provider_token: None,
        model_provider_token_secret_ref: None,
        revision: None,
        model_file: None,
        adapters: None,
    }
}

fn quantity(text: &str) -> ResourceQuantity {
    ResourceQuantity::new(text)
}

/// Builders shared by the kinds served from Hugging Face.
pub trait HubModelFixture: Sized {
    /// A resource named `name` in namespace `models`, generation 1, one replica, no credential.
    fn test(name: &str) -> Self;
    /// The serving template to edit.
    fn template_mut(&mut self) -> &mut ServingTemplate;
    /// The serving info to edit.
    fn info_mut(&mut self) -> &mut ServingInfo;

    /// Asks for `count` replicas.
    fn with_replicas(mut self, count: i64) -> Self {
        self.template_mut().replicas = Replicas::Number(count);
        self
    }
    /// Asks for `count` GPUs per replica (as a limit).
    fn with_gpu(mut self, count: u32) -> Self {
        let limit = self.template_mut().resource_limit.get_or_insert_with(Resources::default);
        limit.gpu = Some(quantity(&count.to_string()));
        self
    }
    /// Sets cpu and memory requests and limits.
    fn with_resources(mut self, request: (&str, &str), limit: (&str, &str)) -> Self {
        let template = self.template_mut();
        template.resource_request =
            Some(Resources { cpu: Some(quantity(request.0)), memory: Some(quantity(request.1)), gpu: None });
        let existing_gpu = template.resource_limit.as_ref().and_then(|limit| limit.gpu.clone());
        template.resource_limit =
            Some(Resources { cpu: Some(quantity(limit.0)), memory: Some(quantity(limit.1)), gpu: existing_gpu });
        self
    }
    /// Gives the hub token inline.
    fn with_inline_token(mut self, token: &str) -> Self {
        self.info_mut().model_provider_token = Some(SecretString::new(token));
        self
    }
    /// Takes the hub token from a Secret.
    fn with_token_from(mut self, secret: &str, key: &str) -> Self {
        self.info_mut().model_provider_token_secret_ref = Some(SecretKeyRef { name: secret.into(), key: key.into() });
        self
    }
}

impl HubModelFixture for EmbeddingModel {
    fn test(name: &str) -> Self {
        let mut model = EmbeddingModel::new(
            name,
            EmbeddingModelSpec {
                embedding_model_name: "all-MiniLM-L6-v2".into(),
                embedding_model_serving_info: info("sentence-transformers/all-MiniLM-L6-v2"),
                embedding_model_serving_template: ServingTemplate::default(),
            },
        );
        model.metadata = metadata(name);
        model
    }
    fn template_mut(&mut self) -> &mut ServingTemplate {
        &mut self.spec.embedding_model_serving_template
    }
    fn info_mut(&mut self) -> &mut ServingInfo {
        &mut self.spec.embedding_model_serving_info
    }
}

impl HubModelFixture for BaseModel {
    fn test(name: &str) -> Self {
        let mut model = BaseModel::new(
            name,
            BaseModelSpec {
                base_model_name: "llama-3-8b-instruct".into(),
                base_model_serving_info: info("meta-llama/Meta-Llama-3-8B-Instruct"),
                base_model_serving_template: ServingTemplate::default(),
            },
        );
        model.metadata = metadata(name);
        model
    }
    fn template_mut(&mut self) -> &mut ServingTemplate {
        &mut self.spec.base_model_serving_template
    }
    fn info_mut(&mut self) -> &mut ServingInfo {
        &mut self.spec.base_model_serving_info
    }
}

/// An OpenAI MegaModel named `name` with an inline key.
pub fn openai_mega_model(name: &str, apikey: &str) -> MegaModel {
    let mut model = MegaModel::new(
        name,
        MegaModelSpec {
            model_provider: MegaModelProvider::OpenAI,
            model_template: ModelTemplate {
                open_ai: Some(OpenAiTemplate {
                    endpoint: None,
                    apikey: Some(SecretString::new(apikey)),
                    apikey_secret_ref: None,
                    model: "gpt-4o".into(),
                    organization: None,
                    project: None,
                }),
                ..ModelTemplate::default()
            },
            limits: None,
        },
    );
    model.metadata = metadata(name);
    model
}

/// The operator's defaults with fixed image names.
pub fn settings() -> OperatorSettings {
    OperatorSettings {
        server_image: "nstream-server:test".into(),
        server_image_cuda: "nstream-server:test-cuda".into(),
        ..OperatorSettings::default()
    }
}

/// A time in seconds since the epoch.
pub fn at(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("fixture times are valid"))
}

/// A Deployment as the API server reports it.
pub fn deployment() -> Deployment {
    Deployment {
        metadata: ObjectMeta { name: Some("em-minilm".into()), generation: Some(1), ..ObjectMeta::default() },
        spec: None,
        status: Some(DeploymentStatus { observed_generation: Some(1), ..DeploymentStatus::default() }),
    }
}

/// Builders of Deployment states.
pub trait DeploymentFixture {
    /// The Deployment controller has created `count` pods on the current spec.
    fn with_pods(self, count: i32) -> Self;
    /// `count` of them pass readiness (and are available).
    fn with_ready(self, count: i32) -> Self;
    /// The spec changed and the Deployment controller has not seen it yet.
    fn with_new_spec_unobserved(self) -> Self;
    /// Only `count` pods run the current spec (a rollout in progress).
    fn with_updated(self, count: i32) -> Self;
    /// The rollout made no progress within its deadline.
    fn past_its_progress_deadline(self) -> Self;
}

impl DeploymentFixture for Deployment {
    fn with_pods(mut self, count: i32) -> Self {
        let status = self.status.get_or_insert_with(DeploymentStatus::default);
        status.replicas = Some(count);
        status.updated_replicas = Some(count);
        self
    }
    fn with_ready(mut self, count: i32) -> Self {
        let status = self.status.get_or_insert_with(DeploymentStatus::default);
        status.ready_replicas = Some(count);
        status.available_replicas = Some(count);
        self
    }
    fn with_new_spec_unobserved(mut self) -> Self {
        self.metadata.generation = Some(2);
        self
    }
    fn with_updated(mut self, count: i32) -> Self {
        self.status.get_or_insert_with(DeploymentStatus::default).updated_replicas = Some(count);
        self
    }
    fn past_its_progress_deadline(mut self) -> Self {
        self.status.get_or_insert_with(DeploymentStatus::default).conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet \"em-minilm-5d4\" has timed out progressing.".into()),
            ..DeploymentCondition::default()
        }]);
        self
    }
}

/// A pending pod named `name`.
pub fn pod(name: &str) -> Pod {
    Pod {
        metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
        spec: None,
        status: Some(PodStatus { phase: Some("Pending".into()), ..PodStatus::default() }),
    }
}

fn container(image: &str) -> ContainerStatus {
    ContainerStatus { name: "server".into(), image: image.into(), ..ContainerStatus::default() }
}

/// Builders of pod states.
pub trait PodFixture {
    /// The server container crashed `restarts` times (last exit code 1) and is backing off.
    fn crash_looping(self, restarts: i32) -> Self;
    /// The image cannot be pulled.
    fn failing_to_pull(self, image: &str) -> Self;
    /// No node has room (for instance no free GPU).
    fn unschedulable(self, why: &str) -> Self;
    /// Started (startup probe passed) but failing readiness after `restarts` restarts.
    fn failing_readiness(self, restarts: i32) -> Self;
    /// Still downloading or loading (startup probe not yet passed).
    fn starting(self) -> Self;
}

impl PodFixture for Pod {
    fn crash_looping(mut self, restarts: i32) -> Self {
        let status = self.status.get_or_insert_with(PodStatus::default);
        status.container_statuses = Some(vec![ContainerStatus {
            restart_count: restarts,
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    message: Some("back-off 5m0s restarting failed container".into()),
                }),
                ..ContainerState::default()
            }),
            last_state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 1,
                    reason: Some("Error".into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..container("nstream-server:test")
        }]);
        self
    }
    fn failing_to_pull(mut self, image: &str) -> Self {
        let status = self.status.get_or_insert_with(PodStatus::default);
        status.container_statuses = Some(vec![ContainerStatus {
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ImagePullBackOff".into()),
                    message: Some("Back-off pulling image".into()),
                }),
                ..ContainerState::default()
            }),
            ..container(image)
        }]);
        self
    }
    fn unschedulable(mut self, why: &str) -> Self {
        let status = self.status.get_or_insert_with(PodStatus::default);
        status.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some(why.into()),
            ..PodCondition::default()
        }]);
        self
    }
    fn failing_readiness(mut self, restarts: i32) -> Self {
        let status = self.status.get_or_insert_with(PodStatus::default);
        status.phase = Some("Running".into());
        status.container_statuses = Some(vec![ContainerStatus {
            restart_count: restarts,
            started: Some(true),
            ready: false,
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..ContainerState::default()
            }),
            ..container("nstream-server:test")
        }]);
        self
    }
    fn starting(mut self) -> Self {
        let status = self.status.get_or_insert_with(PodStatus::default);
        status.phase = Some("Running".into());
        status.container_statuses = Some(vec![ContainerStatus {
            started: Some(false),
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..ContainerState::default()
            }),
            ..container("nstream-server:test")
        }]);
        self
    }
}
