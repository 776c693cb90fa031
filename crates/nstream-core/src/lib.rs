//! Typed specs for the nstream kinds (MegaModel, BaseModel, EmbeddingModel, KnowledgeBase,
//! Distillation):
//! serde + kube CustomResources, validation with field paths, Kubernetes quantities, CRD
//! generation and YAML loading with file:line diagnostics.
//!
//! ```
//! let yaml = r#"
//! apiVersion: llm.nstream.ai/v1
//! kind: EmbeddingModel
//! metadata:
//!   name: all-minilm-l6-v2
//! spec:
//!   embeddingModelName: all-MiniLM-L6-v2
//!   embeddingModelServingInfo:
//!     hfModelId: sentence-transformers/all-MiniLM-L6-v2
//!     modelProvider: HUGGINGFACE
//! "#;
//! let documents = nstream_core::parse_str(yaml, "example.yaml");
//! assert!(documents[0].valid_resource().is_some());
//! ```

#[cfg(feature = "cli")]
pub mod cli;
pub mod crd;
pub mod distillation;
pub mod document;
pub mod knowledge_base;
pub mod locate;
pub mod patterns;
pub mod quantity;
pub mod replicas;
pub mod secret;
pub mod spec;
pub mod status;
pub mod validate;

pub use distillation::{
    DataPolicy, Distillation, DistillationEvaluation, DistillationGeneration, DistillationScore, DistillationSpec,
    DistillationSplit, DistillationStageStatus, DistillationStatus, DistillationStorage, DistillationTask, FineTuning,
    FineTuningMethod, StagePhase,
};
pub use document::{
    Diagnostic, LoadError, LoadedDocument, ModelResource, Origin, Outcome, load_path, parse_bytes, parse_str,
};
pub use knowledge_base::{
    Chunking, EmbeddedStore, KnowledgeBase, KnowledgeBaseSpec, KnowledgeBaseStatus, KnowledgeBaseStore, PostgresStore,
    SearchDefaults, Splitting,
};
pub use quantity::{Amount, QuantityError, ResourceQuantity, parse_quantity};
pub use replicas::Replicas;
pub use secret::{SecretKeyRef, SecretSource, SecretString};
pub use spec::{
    AdapterSpec, AnthropicTemplate, ApiKeyFields, Autoscaling, AzureOpenAiTemplate, BaseModel, BaseModelSpec,
    EmbeddingModel, EmbeddingModelSpec, HubModelSpec, MegaModel, MegaModelLimits, MegaModelProvider, MegaModelSpec,
    ModelHub, ModelTemplate, OpenAiTemplate, ProviderTemplate, Resources, ServingInfo, ServingTemplate,
};
pub use status::{AutoscalerStatus, ModelStatus};
pub use validate::{Check, Problem};
