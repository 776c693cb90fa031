//! The three custom resources of `llm.nstream.ai/v1`: field names are those of the
//! specification (`shared/spec/models.md`), in camelCase.

#![expect(
    clippy::duplicated_attributes,
    reason = "kube's printcolumn(...) repeats type_ and priority once per column, which this lint misreads"
)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use validator::Validate;

use crate::patterns;
use crate::quantity::ResourceQuantity;
use crate::replicas::Replicas;
use crate::secret::{SecretKeyRef, SecretSource, SecretString};
use crate::status::ModelStatus;

/// The API group of every nstream resource.
pub const GROUP: &str = "llm.nstream.ai";
/// The API version of every nstream resource.
pub const VERSION: &str = "v1";
/// `apiVersion` as written in YAML.
pub const API_VERSION: &str = "llm.nstream.ai/v1";

/// The default OpenAI endpoint.
pub const OPENAI_DEFAULT_ENDPOINT: &str = "https://api.openai.com/v1";
/// The default Anthropic endpoint.
pub const ANTHROPIC_DEFAULT_ENDPOINT: &str = "https://api.anthropic.com";
/// The `anthropic-version` sent when a template does not name one.
pub const ANTHROPIC_DEFAULT_VERSION: &str = "2023-06-01";

// ---------------------------------------------------------------------------------------------
// MegaModel
// ---------------------------------------------------------------------------------------------

/// A hosted foundation model (Azure OpenAI, OpenAI or Anthropic) used to generate ground truth.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[kube(
    group = "llm.nstream.ai",
    version = "v1",
    kind = "MegaModel",
    namespaced,
    status = "ModelStatus",
    derive = "PartialEq",
    shortname = "mm",
    shortname = "mega",
    category = "nstream",
    doc = "A hosted foundation model (Azure OpenAI, OpenAI, Anthropic) that generates ground truth.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.modelProvider"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new(
    "(self.modelProvider == 'AzureOpenAI') == has(self.modelTemplate.azureOpenAI) && (self.modelProvider == 'OpenAI') == has(self.modelTemplate.openAI) && (self.modelProvider == 'Anthropic') == has(self.modelTemplate.anthropic)"
).message("modelTemplate must hold exactly the template of modelProvider: azureOpenAI for AzureOpenAI, openAI for OpenAI, anthropic for Anthropic"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MegaModelSpec {
    /// Who hosts the model.
    pub model_provider: MegaModelProvider,
    /// How to reach the model: the template of `modelProvider`, and only that one.
    #[validate(nested)]
    pub model_template: ModelTemplate,
    /// Client-side limits, so every caller of this MegaModel together stays under the
    /// deployment's quota; provider defaults when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub limits: Option<MegaModelLimits>,
}

impl MegaModelSpec {
    /// The template this MegaModel uses: the one of `modelProvider`, or `None` when the spec
    /// lacks it (`nstream validate` reports that). The one place that decides which template
    /// goes with which provider; every crate that reads a MegaModel's connection asks here.
    pub fn provider_template(&self) -> Option<ProviderTemplate<'_>> {
        let template = &self.model_template;
        match self.model_provider {
            MegaModelProvider::AzureOpenAI => template.azure_open_ai.as_ref().map(ProviderTemplate::AzureOpenAI),
            MegaModelProvider::OpenAI => template.open_ai.as_ref().map(ProviderTemplate::OpenAI),
            MegaModelProvider::Anthropic => template.anthropic.as_ref().map(ProviderTemplate::Anthropic),
        }
    }
}

/// The template of a MegaModel's provider, borrowed from its spec
/// ([`MegaModelSpec::provider_template`]); it also says which wire format the provider speaks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ProviderTemplate<'a> {
    /// Azure OpenAI: OpenAI's wire format at a deployment URL, with an `api-version`.
    AzureOpenAI(&'a AzureOpenAiTemplate),
    /// OpenAI or an OpenAI-compatible endpoint: OpenAI's wire format.
    OpenAI(&'a OpenAiTemplate),
    /// Anthropic's Messages API.
    Anthropic(&'a AnthropicTemplate),
}

impl<'a> ProviderTemplate<'a> {
    /// The provider whose template this is.
    pub fn provider(self) -> MegaModelProvider {
        match self {
            Self::AzureOpenAI(_) => MegaModelProvider::AzureOpenAI,
            Self::OpenAI(_) => MegaModelProvider::OpenAI,
            Self::Anthropic(_) => MegaModelProvider::Anthropic,
        }
    }

    /// The key fields (`apikey`, `apikeySecretRef`) of the template.
    pub fn api_key_fields(self) -> &'a dyn ApiKeyFields {
        match self {
            Self::AzureOpenAI(template) => template,
            Self::OpenAI(template) => template,
            Self::Anthropic(template) => template,
        }
    }

    /// The endpoint as configured, with the provider's default where the field is optional.
    pub fn endpoint(self) -> &'a str {
        match self {
            Self::AzureOpenAI(template) => &template.endpoint,
            Self::OpenAI(template) => template.endpoint_or_default(),
            Self::Anthropic(template) => template.endpoint_or_default(),
        }
    }
}

/// Client-side rate limits, timeouts and retries of a MegaModel.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MegaModelLimits {
    /// Most requests per minute sent to the provider (retries included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1_000_000))]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_minute: Option<u32>,
    /// Most tokens per minute (prompt estimate plus max_tokens), as Azure counts quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1_000_000_000))]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub tokens_per_minute: Option<u32>,
    /// Time limit of one attempt, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 3600))]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<u32>,
    /// Retries after a retryable failure (429, 5xx, connection errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 0, max = 20))]
    #[schemars(range(min = 0, max = 20))]
    pub max_retries: Option<u32>,
    /// Longest a request waits, in seconds, for room under `requestsPerMinute` and
    /// `tokensPerMinute`; one that would wait longer is refused at once with 429 and
    /// `Retry-After` (30 when omitted; 0 refuses every request that does not fit at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 0, max = 3600))]
    #[schemars(range(min = 0, max = 3600))]
    pub rate_limit_wait_seconds: Option<u32>,
}

/// A hosted model provider.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum MegaModelProvider {
    /// Azure OpenAI Service: a deployment of an OpenAI model in an Azure resource.
    AzureOpenAI,
    /// OpenAI's API, or any OpenAI-compatible endpoint (Gemini's OpenAI endpoint, vLLM, a gateway).
    OpenAI,
    /// Anthropic's Messages API.
    Anthropic,
}

impl MegaModelProvider {
    /// The name of the template field this provider reads.
    pub fn template_field(self) -> &'static str {
        match self {
            Self::AzureOpenAI => "azureOpenAI",
            Self::OpenAI => "openAI",
            Self::Anthropic => "anthropic",
        }
    }

    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AzureOpenAI => "AzureOpenAI",
            Self::OpenAI => "OpenAI",
            Self::Anthropic => "Anthropic",
        }
    }
}

/// The connection template of a MegaModel: exactly one field is set, the one of its provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[serde(deny_unknown_fields)]
pub struct ModelTemplate {
    /// Azure OpenAI: endpoint, deployment, api-version and key.
    #[serde(rename = "azureOpenAI", default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub azure_open_ai: Option<AzureOpenAiTemplate>,
    /// OpenAI or an OpenAI-compatible endpoint: endpoint, model and key.
    #[serde(rename = "openAI", default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub open_ai: Option<OpenAiTemplate>,
    /// Anthropic: endpoint, model, anthropic-version and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub anthropic: Option<AnthropicTemplate>,
}

impl ModelTemplate {
    /// The names of the templates that are set, in field order.
    pub fn present(&self) -> Vec<&'static str> {
        let mut present = Vec::new();
        if self.azure_open_ai.is_some() {
            present.push("azureOpenAI");
        }
        if self.open_ai.is_some() {
            present.push("openAI");
        }
        if self.anthropic.is_some() {
            present.push("anthropic");
        }
        present
    }
}

/// An Azure OpenAI deployment, exactly as the specification lists its fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[x_kube(validation = Rule::new("has(self.apikey) != has(self.apikeySecretRef)").message("set exactly one of apikey and apikeySecretRef"))]
#[x_kube(validation = Rule::new("!has(self.apikey)").message("an inline apikey is refused on a cluster (it would be stored readable in etcd): put the key in a Secret labelled llm.nstream.ai/provider-credentials=true and name it in apikeySecretRef {name, key}; local files (nstream up -f) keep inline keys"))]
#[x_kube(validation = Rule::new(crate::validate::PLAIN_HTTP_CEL_RULE).message(crate::validate::PLAIN_HTTP_CEL_MESSAGE).field_path(".endpoint"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AzureOpenAiTemplate {
    /// The `api-version` query parameter, such as `2023-10-01-preview` or `2024-10-21`.
    #[validate(regex(path = *patterns::AZURE_API_VERSION))]
    #[schemars(regex(pattern = patterns::AZURE_API_VERSION_PATTERN))]
    pub api_version: String,
    /// The API key, inline: local files only. A cluster's API server refuses it (a CRD rule,
    /// so it never rests in etcd); there, use `apikeySecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apikey: Option<SecretString>,
    /// The API key, from a Kubernetes Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub apikey_secret_ref: Option<SecretKeyRef>,
    /// The deployment name chosen when the model was deployed in Azure.
    #[validate(regex(path = *patterns::AZURE_DEPLOYMENT))]
    #[schemars(regex(pattern = patterns::AZURE_DEPLOYMENT_PATTERN))]
    pub deployment: String,
    /// The resource endpoint, such as `https://my-resource.openai.azure.com`.
    #[validate(url, length(max = 2048))]
    #[schemars(regex(pattern = r"^https?://"), length(max = 2048))]
    pub endpoint: String,
}

/// OpenAI's API or any OpenAI-compatible endpoint (Gemini, vLLM, LiteLLM, a corporate gateway).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[x_kube(validation = Rule::new("has(self.apikey) != has(self.apikeySecretRef)").message("set exactly one of apikey and apikeySecretRef"))]
#[x_kube(validation = Rule::new("!has(self.apikey)").message("an inline apikey is refused on a cluster (it would be stored readable in etcd): put the key in a Secret labelled llm.nstream.ai/provider-credentials=true and name it in apikeySecretRef {name, key}; local files (nstream up -f) keep inline keys"))]
#[x_kube(validation = Rule::new(crate::validate::PLAIN_HTTP_CEL_RULE).message(crate::validate::PLAIN_HTTP_CEL_MESSAGE).field_path(".endpoint"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenAiTemplate {
    /// Base URL of the API, `https://api.openai.com/v1` when omitted. For Gemini use
    /// `https://generativelanguage.googleapis.com/v1beta/openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(url, length(max = 2048))]
    #[schemars(regex(pattern = r"^https?://"), length(max = 2048))]
    pub endpoint: Option<String>,
    /// The API key, inline: local files only. A cluster's API server refuses it (a CRD rule,
    /// so it never rests in etcd); there, use `apikeySecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apikey: Option<SecretString>,
    /// The API key, from a Kubernetes Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub apikey_secret_ref: Option<SecretKeyRef>,
    /// The model to call, such as `gpt-4o`.
    #[validate(length(min = 1, max = 256), regex(path = *patterns::DISPLAY_NAME))]
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    /// The `OpenAI-Organization` header, for keys that belong to several organisations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 256))]
    pub organization: Option<String>,
    /// The `OpenAI-Project` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 256))]
    pub project: Option<String>,
}

impl OpenAiTemplate {
    /// The endpoint, or OpenAI's when none is set.
    pub fn endpoint_or_default(&self) -> &str {
        self.endpoint.as_deref().unwrap_or(OPENAI_DEFAULT_ENDPOINT)
    }
}

/// Anthropic's Messages API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[x_kube(validation = Rule::new("has(self.apikey) != has(self.apikeySecretRef)").message("set exactly one of apikey and apikeySecretRef"))]
#[x_kube(validation = Rule::new("!has(self.apikey)").message("an inline apikey is refused on a cluster (it would be stored readable in etcd): put the key in a Secret labelled llm.nstream.ai/provider-credentials=true and name it in apikeySecretRef {name, key}; local files (nstream up -f) keep inline keys"))]
#[x_kube(validation = Rule::new(crate::validate::PLAIN_HTTP_CEL_RULE).message(crate::validate::PLAIN_HTTP_CEL_MESSAGE).field_path(".endpoint"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnthropicTemplate {
    /// Base URL of the API, `https://api.anthropic.com` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(url, length(max = 2048))]
    #[schemars(regex(pattern = r"^https?://"), length(max = 2048))]
    pub endpoint: Option<String>,
    /// The API key, inline: local files only. A cluster's API server refuses it (a CRD rule,
    /// so it never rests in etcd); there, use `apikeySecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apikey: Option<SecretString>,
    /// The API key, from a Kubernetes Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub apikey_secret_ref: Option<SecretKeyRef>,
    /// The model to call, such as `claude-sonnet-4-5`.
    #[validate(length(min = 1, max = 256), regex(path = *patterns::DISPLAY_NAME))]
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    /// The `anthropic-version` header, `2023-06-01` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *patterns::ANTHROPIC_VERSION))]
    #[schemars(regex(pattern = patterns::ANTHROPIC_VERSION_PATTERN))]
    pub anthropic_version: Option<String>,
    /// `max_tokens` for requests that do not set it (Anthropic requires one); 4096 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1_000_000))]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_tokens: Option<u32>,
}

impl AnthropicTemplate {
    /// The endpoint, or Anthropic's when none is set.
    pub fn endpoint_or_default(&self) -> &str {
        self.endpoint.as_deref().unwrap_or(ANTHROPIC_DEFAULT_ENDPOINT)
    }

    /// The `anthropic-version` header value.
    pub fn version_or_default(&self) -> &str {
        self.anthropic_version.as_deref().unwrap_or(ANTHROPIC_DEFAULT_VERSION)
    }
}

/// Access to the key fields every provider template has, for the rules they share.
pub trait ApiKeyFields {
    /// The inline key.
    fn apikey(&self) -> Option<&SecretString>;
    /// The Secret reference.
    fn apikey_secret_ref(&self) -> Option<&SecretKeyRef>;

    /// Where the key comes from; `None` when neither (or, wrongly, both) is set.
    fn api_key_source(&self) -> Option<SecretSource<'_>> {
        match (self.apikey(), self.apikey_secret_ref()) {
            (Some(inline), None) => Some(SecretSource::Inline(inline)),
            (None, Some(reference)) => Some(SecretSource::Reference(reference)),
            _ => None,
        }
    }
}

macro_rules! api_key_fields {
    ($($template:ty),*) => {$(
        impl ApiKeyFields for $template {
            fn apikey(&self) -> Option<&SecretString> {
                self.apikey.as_ref()
            }
            fn apikey_secret_ref(&self) -> Option<&SecretKeyRef> {
                self.apikey_secret_ref.as_ref()
            }
        }
    )*};
}
api_key_fields!(AzureOpenAiTemplate, OpenAiTemplate, AnthropicTemplate);

// ---------------------------------------------------------------------------------------------
// BaseModel and EmbeddingModel
// ---------------------------------------------------------------------------------------------

/// Declares a resource served from the hub (BaseModel, EmbeddingModel) with the kube attributes
/// both share: the scale subresource on the serving template's replicas, the printer columns, the
/// status. Only the kind, its short name, its description and its field prefix differ, so the
/// twins cannot drift apart. (`tt` fragments, so kube's derive sees plain literals.)
macro_rules! hub_model_resource {
    (
        kind: $kind:tt,
        shortname: $shortname:tt,
        description: $description:tt,
        model_path: $model_path:tt,
        replicas_path: $replicas_path:tt,
        $(#[$($attribute:tt)*])*
        pub struct $spec:ident { $($body:tt)* }
    ) => {
        #[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
        #[kube(
            group = "llm.nstream.ai",
            version = "v1",
            kind = $kind,
            namespaced,
            status = "ModelStatus",
            scale(
                spec_replicas_path = $replicas_path,
                status_replicas_path = ".status.replicas",
                label_selector_path = ".status.selector"
            ),
            derive = "PartialEq",
            shortname = $shortname,
            category = "nstream",
            doc = $description,
            printcolumn(name = "Model", type_ = "string", json_path = $model_path),
            printcolumn(name = "Replicas", type_ = "string", json_path = $replicas_path),
            printcolumn(name = "Ready-Replicas", type_ = "integer", json_path = ".status.readyReplicas"),
            printcolumn(name = "Desired", type_ = "integer", json_path = ".status.autoscaler.desiredReplicas"),
            printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
            printcolumn(
                name = "Reason",
                type_ = "string",
                json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
                priority = "1"
            ),
            printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint", priority = "1"),
            printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
        )]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        $(#[$($attribute)*])*
        pub struct $spec { $($body)* }
    };
}

hub_model_resource! {
    kind: "BaseModel",
    shortname: "bm",
    description: "A Hugging Face causal language model, served with candle and fine-tuned on a MegaModel's ground truth.",
    model_path: ".spec.baseModelServingInfo.hfModelId",
    replicas_path: ".spec.baseModelServingTemplate.replicas",
    /// A Hugging Face causal language model served with candle and fine-tuned on ground truth.
    #[x_kube(validation = Rule::new("!has(self.baseModelServingInfo.adapters) || self.baseModelServingInfo.adapters.all(a, a.name != self.baseModelName)").message("an adapter's name must differ from baseModelName"))]
    pub struct BaseModelSpec {
        /// Name of the base model; also the name clients pass as `model` (defaults to the resource
        /// name when the resource is served).
        #[validate(length(min = 1, max = 256), regex(path = *patterns::DISPLAY_NAME))]
        #[schemars(length(min = 1, max = 256))]
        pub base_model_name: String,
        /// Where the weights come from.
        #[validate(nested)]
        pub base_model_serving_info: ServingInfo,
        /// How many servers, and how big.
        #[serde(default)]
        #[validate(nested)]
        pub base_model_serving_template: ServingTemplate,
    }
}

hub_model_resource! {
    kind: "EmbeddingModel",
    shortname: "em",
    description: "A Hugging Face sentence-embedding model served with candle for similarity search.",
    model_path: ".spec.embeddingModelServingInfo.hfModelId",
    replicas_path: ".spec.embeddingModelServingTemplate.replicas",
    /// A Hugging Face sentence-embedding model served with candle for similarity search.
    #[x_kube(validation = Rule::new("!has(self.embeddingModelServingInfo.adapters)").message("adapters are for BaseModels only"))]
    pub struct EmbeddingModelSpec {
        /// Name of the embedding model, such as `all-MiniLM-L6-v2`.
        #[validate(length(min = 1, max = 256), regex(path = *patterns::DISPLAY_NAME))]
        #[schemars(length(min = 1, max = 256))]
        pub embedding_model_name: String,
        /// Where the weights come from.
        #[validate(nested)]
        pub embedding_model_serving_info: ServingInfo,
        /// How many servers, and how big.
        #[serde(default)]
        #[validate(nested)]
        pub embedding_model_serving_template: ServingTemplate,
    }
}

/// What the BaseModel and EmbeddingModel specs share: a model from the hub and the servers that
/// serve it, under field names that differ only by their prefix. Code that treats both alike
/// (validation, the operator's served form) is written once against it.
pub trait HubModelSpec {
    /// The prefix of the spec's fields: `baseModel` or `embeddingModel`.
    const FIELD_PREFIX: &'static str;
    /// Where the weights come from (`<prefix>ServingInfo`).
    fn serving_info(&self) -> &ServingInfo;
    /// The same, to rewrite (the operator moves an inline token into a Secret).
    fn serving_info_mut(&mut self) -> &mut ServingInfo;
    /// How many servers, and how big (`<prefix>ServingTemplate`).
    fn serving_template(&self) -> &ServingTemplate;
}

macro_rules! hub_model_spec {
    ($($spec:ty: $prefix:literal, $info:ident, $template:ident;)*) => {$(
        impl HubModelSpec for $spec {
            const FIELD_PREFIX: &'static str = $prefix;
            fn serving_info(&self) -> &ServingInfo {
                &self.$info
            }
            fn serving_info_mut(&mut self) -> &mut ServingInfo {
                &mut self.$info
            }
            fn serving_template(&self) -> &ServingTemplate {
                &self.$template
            }
        }
    )*};
}
hub_model_spec! {
    BaseModelSpec: "baseModel", base_model_serving_info, base_model_serving_template;
    EmbeddingModelSpec: "embeddingModel", embedding_model_serving_info, embedding_model_serving_template;
}

/// Where a Hugging Face model's files come from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[x_kube(validation = Rule::new("!(has(self.modelProviderToken) && has(self.modelProviderTokenSecretRef))").message("set at most one of modelProviderToken and modelProviderTokenSecretRef"))]
#[x_kube(validation = Rule::new("!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))").message("adapter names must be unique"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingInfo {
    /// The repository on the hub, `org/name`, such as `sentence-transformers/all-MiniLM-L6-v2`, or
    /// a local directory (absolute, or starting with `./`, `../` or `~/`). For a BaseModel it may
    /// name a PEFT LoRA adapter (a folder or repository holding `adapter_config.json`): the base
    /// it adapts is loaded (`base_model.json`, else `base_model_name_or_path`) and the adapter
    /// applied at run time.
    #[validate(regex(path = *patterns::HF_MODEL_ID))]
    #[schemars(regex(pattern = patterns::HF_MODEL_ID_PATTERN))]
    pub hf_model_id: String,
    /// The model hub; only `HUGGINGFACE` today.
    pub model_provider: ModelHub,
    /// A hub token, inline (gated or private models). Prefer `modelProviderTokenSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_provider_token: Option<SecretString>,
    /// A hub token, from a Kubernetes Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub model_provider_token_secret_ref: Option<SecretKeyRef>,
    /// A branch, tag or commit of the repository; `main` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *patterns::REVISION))]
    #[schemars(regex(pattern = patterns::REVISION_PATTERN))]
    pub revision: Option<String>,
    /// Which weights file to use when the repository holds several (GGUF repositories hold one per
    /// quantisation): a file name or a glob such as `*Q4_K_M.gguf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 512))]
    #[schemars(length(min = 1, max = 512))]
    pub model_file: Option<String>,
    /// LoRA adapters served over this base (BaseModels only): one base in memory, each adapter
    /// its own model id in `/v1/models` (with the base as `parent`), selected by the request's
    /// `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    // A list map keyed by name, so the operator's Distillations add their adapter entry under a
    // field manager of their own without taking over the user's entries.
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub adapters: Option<Vec<AdapterSpec>>,
}

/// A LoRA adapter served over a BaseModel as its own model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdapterSpec {
    /// The model id clients pass as `model`; unique among the base's adapters and not the
    /// base's own name.
    #[validate(length(min = 1, max = 256), regex(path = *patterns::DISPLAY_NAME))]
    #[schemars(length(min = 1, max = 256), regex(pattern = patterns::DISPLAY_NAME_PATTERN))]
    pub name: String,
    /// A PEFT LoRA adapter: a hub repository or a local directory holding `adapter_config.json`
    /// and `adapter_model.safetensors`.
    #[validate(regex(path = *patterns::HF_MODEL_ID))]
    #[schemars(regex(pattern = patterns::HF_MODEL_ID_PATTERN))]
    pub hf_model_id: String,
    /// A branch, tag or commit of the adapter's repository; `main` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *patterns::REVISION))]
    #[schemars(regex(pattern = patterns::REVISION_PATTERN))]
    pub revision: Option<String>,
}

impl ServingInfo {
    /// Where the hub token comes from, if there is one.
    pub fn token_source(&self) -> Option<SecretSource<'_>> {
        match (&self.model_provider_token, &self.model_provider_token_secret_ref) {
            (Some(inline), None) => Some(SecretSource::Inline(inline)),
            (None, Some(reference)) => Some(SecretSource::Reference(reference)),
            _ => None,
        }
    }
}

/// A model hub.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum ModelHub {
    /// The Hugging Face hub (or its cache, offline).
    #[serde(rename = "HUGGINGFACE")]
    HuggingFace,
}

/// Replicas and resources of the servers of one model, and the autoscaling bounds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[x_kube(validation = Rule::new("has(self.maxReplicas) || !(has(self.minReplicas) || has(self.targetRequestsPerReplica) || has(self.scaleDownDelaySeconds))").message("minReplicas, targetRequestsPerReplica and scaleDownDelaySeconds need maxReplicas (autoscaling is on when maxReplicas is set)"))]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message("minReplicas must be at most maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.resourceRequest) || !has(self.resourceLimit) || ((!has(self.resourceRequest.cpu) || !has(self.resourceLimit.cpu) || quantity(string(self.resourceRequest.cpu)).compareTo(quantity(string(self.resourceLimit.cpu))) <= 0) && (!has(self.resourceRequest.memory) || !has(self.resourceLimit.memory) || quantity(string(self.resourceRequest.memory)).compareTo(quantity(string(self.resourceLimit.memory))) <= 0) && (!has(self.resourceRequest.gpu) || !has(self.resourceLimit.gpu) || quantity(string(self.resourceRequest.gpu)).compareTo(quantity(string(self.resourceLimit.gpu))) <= 0))").message("each resourceRequest must be at most its resourceLimit"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingTemplate {
    /// Number of server replicas; 1 when omitted. An integer without quotes (`replicas: 1`): the
    /// API server refuses a string here.
    ///
    /// With autoscaling (`maxReplicas` set) it is only the starting count, kept within
    /// `[minReplicas, maxReplicas]`, and the operator's autoscaler (or `kubectl scale`) changes it.
    #[serde(default)]
    pub replicas: Replicas,
    /// Autoscaling: the fewest replicas; 1 when omitted. 0 scales the model to zero when idle
    /// (the router scales it back to 1 when a request comes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_replicas: Option<i32>,
    /// Autoscaling: the most replicas. Setting it turns autoscaling on; without it `replicas`
    /// is a fixed size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_replicas: Option<i32>,
    /// Autoscaling: the load one replica should carry, in requests in flight (waiting ones
    /// included); the autoscaler wants `ceil(load / targetRequestsPerReplica)` replicas. 16 when
    /// omitted (the generative server's default running batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_requests_per_replica: Option<i32>,
    /// Autoscaling: how long the load must have asked for fewer replicas before the autoscaler
    /// scales down (and for none before it scales to zero); 30 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub scale_down_delay_seconds: Option<i32>,
    /// The most each replica may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_limit: Option<Resources>,
    /// What each replica is guaranteed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_request: Option<Resources>,
}

/// The autoscaling bounds of a [`ServingTemplate`], defaults applied ([`ServingTemplate::autoscaling`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Autoscaling {
    /// The fewest replicas (`minReplicas`; may be 0).
    pub min_replicas: i32,
    /// The most replicas (`maxReplicas`).
    pub max_replicas: i32,
    /// Requests in flight one replica should carry (`targetRequestsPerReplica`).
    pub target_requests_per_replica: i32,
    /// How long the load must ask for fewer replicas before scaling down.
    pub scale_down_delay: std::time::Duration,
}

impl Autoscaling {
    /// `minReplicas` when omitted.
    pub const DEFAULT_MIN_REPLICAS: i32 = 1;
    /// `targetRequestsPerReplica` when omitted: the generative server's default running batch
    /// (`--max-running-sequences`), so a replica at target decodes a full batch without a queue.
    pub const DEFAULT_TARGET_REQUESTS_PER_REPLICA: i32 = 16;
    /// `scaleDownDelaySeconds` when omitted: KubeAI's default. (An HPA waits 300 s, made for
    /// noisy CPU figures; request counts are exact, and a model server idle for 30 s costs a GPU.)
    pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: i32 = 30;
}

impl ServingTemplate {
    /// The autoscaling bounds, when autoscaling is on (`maxReplicas` set), with defaults
    /// applied; `None` for a fixed size. Assumes a valid template (see `validate`): values out of
    /// range are clamped rather than refused here.
    pub fn autoscaling(&self) -> Option<Autoscaling> {
        let max_replicas = self.max_replicas?.max(1);
        let min_replicas = self.min_replicas.unwrap_or(Autoscaling::DEFAULT_MIN_REPLICAS).clamp(0, max_replicas);
        let target =
            self.target_requests_per_replica.unwrap_or(Autoscaling::DEFAULT_TARGET_REQUESTS_PER_REPLICA).max(1);
        let delay = self.scale_down_delay_seconds.unwrap_or(Autoscaling::DEFAULT_SCALE_DOWN_DELAY_SECONDS).max(0);
        Some(Autoscaling {
            min_replicas,
            max_replicas,
            target_requests_per_replica: target,
            scale_down_delay: std::time::Duration::from_secs(u64::try_from(delay).unwrap_or(0)),
        })
    }
}

/// CPU, memory and GPUs, as Kubernetes quantities.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[x_kube(validation = Rule::new("(!has(self.cpu) || (isQuantity(string(self.cpu)) && quantity(string(self.cpu)).isGreaterThan(quantity('0')))) && (!has(self.memory) || (isQuantity(string(self.memory)) && quantity(string(self.memory)).isGreaterThan(quantity('0')))) && (!has(self.gpu) || (isQuantity(string(self.gpu)) && quantity(string(self.gpu)).isInteger() && !quantity(string(self.gpu)).isLessThan(quantity('0'))))").message("cpu and memory must be positive Kubernetes quantities (500m, 2, 8Gi) and gpu a whole number"))]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores: `2`, `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<ResourceQuantity>,
    /// Memory in bytes: `8Gi`, `512Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ResourceQuantity>,
    /// Whole GPUs (`nvidia.com/gpu`): `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<ResourceQuantity>,
}
