//! Who answers: the identity of the model recorded in provenance and hashed into item keys.

use nstream_core::{MegaModelProvider, ModelResource};
use serde::Serialize;

use crate::key::hash_json;

/// The model's identity: provider, endpoint, deployment or model id, API version. Never a key
/// or token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The name requests carry (`metadata.name`).
    pub name: String,
    /// `MegaModel`, `BaseModel`, or `backend` for a backend given directly.
    pub kind: String,
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

impl ModelInfo {
    /// A model known only by name (a backend built in code, a test).
    pub fn named(name: impl Into<String>, provider: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: "backend".to_owned(),
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
        let kind = resource.kind().to_string();
        match resource {
            ModelResource::MegaModel(model) => {
                let spec = &model.spec;
                let template = &spec.model_template;
                let mut info = Self { kind, ..Self::named(name, spec.model_provider.as_str()) };
                match spec.model_provider {
                    MegaModelProvider::AzureOpenAI => {
                        if let Some(azure) = &template.azure_open_ai {
                            info.endpoint = Some(azure.endpoint.trim_end_matches('/').to_owned());
                            info.deployment = Some(azure.deployment.clone());
                            info.api_version = Some(azure.api_version.clone());
                        }
                    }
                    MegaModelProvider::OpenAI => {
                        if let Some(openai) = &template.open_ai {
                            info.endpoint = Some(openai.endpoint_or_default().trim_end_matches('/').to_owned());
                            info.model = Some(openai.model.clone());
                        }
                    }
                    MegaModelProvider::Anthropic => {
                        if let Some(claude) = &template.anthropic {
                            info.endpoint = Some(claude.endpoint_or_default().trim_end_matches('/').to_owned());
                            info.model = Some(claude.model.clone());
                            info.api_version = Some(claude.version_or_default().to_owned());
                        }
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
        }
    }

    /// Whether the model runs here (its tokens cost nothing).
    pub fn is_local(&self) -> bool {
        self.kind == "BaseModel"
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
