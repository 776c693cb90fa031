//! One resource -> one backend.

use std::sync::Arc;

use crate::metrics::ModelMetricsExporter;
use nstream_backend::ModelBackend;
use std::time::Duration;

use nstream_core::{BaseModel, MegaModelSpec, ModelResource, ServingInfo};
use nstream_embed::{EmbedOptions, EmbeddingBackend};
use nstream_hosted::{HostedBackend, HostedOptions};
use nstream_hub::{Hub, ModelSource, SecretToken};
use nstream_llm::{AdapterSource, LlmBackend, LlmOptions};

use crate::error::{ProviderError, Result};
use crate::secrets::{SecretLookup, resolve_secret};

/// How models are loaded (device, batching); one set for every model of a file.
///
/// `#[non_exhaustive]`: start from [`LoadOptions::default`] and use the `with_*` methods.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Embedding models: device, dtype, batch budget, queue size, threads.
    pub embed: EmbedOptions,
    /// Causal LMs (BaseModels): device, threads, running sequences, prefill chunk, queue size.
    pub llm: LlmOptions,
}

impl LoadOptions {
    /// Loads embedding models with these options.
    pub fn with_embed(mut self, embed: EmbedOptions) -> Self {
        self.embed = embed;
        self
    }

    /// Loads causal LMs with these options.
    pub fn with_llm(mut self, llm: LlmOptions) -> Self {
        self.llm = llm;
        self
    }
}

/// A model ready to serve, under the name clients route by.
pub struct LoadedModel {
    /// `metadata.name` of the resource.
    pub name: String,
    /// The backend answering its requests.
    pub backend: Arc<dyn ModelBackend>,
}

/// The client options a MegaModel's `limits` ask for.
pub fn hosted_options(spec: &MegaModelSpec) -> HostedOptions {
    let mut options = HostedOptions::default();
    if let Some(limits) = &spec.limits {
        options = options.with_rate_limits(limits.requests_per_minute, limits.tokens_per_minute);
        if let Some(seconds) = limits.timeout_seconds {
            options = options.with_timeout(Duration::from_secs(u64::from(seconds)));
        }
        if let Some(retries) = limits.max_retries {
            options = options.with_max_retries(retries);
        }
        if let Some(seconds) = limits.rate_limit_wait_seconds {
            options = options.with_max_rate_limit_wait(Duration::from_secs(u64::from(seconds)));
        }
    }
    options
}

/// A MegaModel's client, its key resolved from the spec or a Secret reference.
pub fn hosted_backend(name: &str, spec: &MegaModelSpec, secrets: &SecretLookup) -> Result<Arc<HostedBackend>> {
    let missing = || ProviderError::NotServable {
        kind: "MegaModel".to_string(),
        name: name.to_string(),
        reason: format!("its {} template has no key (run `nstream validate`)", spec.model_provider.template_field()),
    };
    let source =
        spec.provider_template().and_then(|template| template.api_key_fields().api_key_source()).ok_or_else(missing)?;
    let key = resolve_secret(&source, secrets)?;
    HostedBackend::new(name, spec, key, hosted_options(spec))
        .map_err(|cause| ProviderError::Hosted { name: name.to_string(), cause })
}

/// The hub source of a serving info, with its token resolved.
pub fn model_source(info: &ServingInfo, secrets: &SecretLookup) -> Result<ModelSource> {
    let mut source = ModelSource::new(&info.hf_model_id);
    if let Some(revision) = &info.revision {
        source = source.with_revision(revision);
    }
    if let Some(file) = &info.model_file {
        source = source.with_file(file);
    }
    if let Some(token) = info.token_source() {
        source = source.with_token(SecretToken::new(resolve_secret(&token, secrets)?.expose()));
    }
    Ok(source)
}

/// Loads one resource (downloading weights when online and not cached), exporting its metrics
/// through `exporter` when given. Blocking: call it from a blocking context.
pub fn load_model(
    resource: &ModelResource,
    options: &LoadOptions,
    secrets: &SecretLookup,
    exporter: Option<&ModelMetricsExporter>,
) -> Result<LoadedModel> {
    let name = resource.name().unwrap_or_default().to_string();
    match resource {
        ModelResource::EmbeddingModel(model) => {
            let source = model_source(&model.spec.embedding_model_serving_info, secrets)?;
            let observer = exporter.as_ref().map(|exporter| exporter.observer(&name));
            let backend =
                EmbeddingBackend::load_with(name.clone(), &Hub::from_env(), &source, options.embed.clone(), observer)
                    .map_err(|cause| ProviderError::Embedding { name: name.clone(), cause: Box::new(cause) })?;
            if let Some(exporter) = exporter {
                exporter.track(&name, backend.metrics().clone());
            }
            Ok(LoadedModel { name, backend })
        }
        ModelResource::BaseModel(model) => {
            let backend = load_base_model(&name, model, options, secrets, exporter)?;
            Ok(LoadedModel { name, backend })
        }
        ModelResource::MegaModel(model) => {
            Ok(LoadedModel { name: name.clone(), backend: hosted_backend(&name, &model.spec, secrets)? })
        }
        ModelResource::KnowledgeBase(_) => Err(ProviderError::NotServable {
            kind: "KnowledgeBase".to_string(),
            name,
            reason: "a KnowledgeBase is not a model: it is served as a vector store beside its EmbeddingModel"
                .to_string(),
        }),
        ModelResource::Distillation(_) => Err(ProviderError::NotServable {
            kind: "Distillation".to_string(),
            name,
            reason: "a Distillation is not a model: `nstream distill` runs it and writes the student's BaseModel"
                .to_string(),
        }),
    }
}

/// The LLM backend of a BaseModel (with its `hfModelId` adapter applied, when it names one).
fn load_base_model(
    name: &str,
    model: &BaseModel,
    options: &LoadOptions,
    secrets: &SecretLookup,
    exporter: Option<&ModelMetricsExporter>,
) -> Result<Arc<LlmBackend>> {
    let source = model_source(&model.spec.base_model_serving_info, secrets)?;
    let backend = LlmBackend::load_with(name.to_owned(), &Hub::from_env(), &source, options.llm.clone())
        .map_err(|cause| ProviderError::Llm { name: name.to_owned(), cause: Box::new(cause) })?;
    if let Some(exporter) = exporter {
        exporter.track_llm(name, backend.metrics().clone());
    }
    Ok(backend)
}

/// Loads one resource as [`load_model`] does and, for a BaseModel with
/// `baseModelServingInfo.adapters`, one more model per adapter, sharing the base's weights and
/// scheduler (so its sequences batch with the base's and the other adapters'). Blocking.
pub fn load_model_and_adapters(
    resource: &ModelResource,
    options: &LoadOptions,
    secrets: &SecretLookup,
    exporter: Option<&ModelMetricsExporter>,
) -> Result<Vec<LoadedModel>> {
    let ModelResource::BaseModel(model) = resource else {
        return Ok(vec![load_model(resource, options, secrets, exporter)?]);
    };
    let name = resource.name().unwrap_or_default().to_string();
    let base = load_base_model(&name, model, options, secrets, exporter)?;
    let info = &model.spec.base_model_serving_info;
    let mut loaded = vec![LoadedModel { name: name.clone(), backend: base.clone() }];
    for (index, spec) in info.adapters.iter().flatten().enumerate() {
        let field = format!("spec.baseModelServingInfo.adapters[{index}]");
        let llm_error = |cause: nstream_llm::Error| ProviderError::Llm {
            name: name.clone(),
            cause: Box::new(nstream_llm::Error::InvalidModel {
                file: format!("{field} ({})", spec.hf_model_id),
                message: cause.to_string(),
            }),
        };
        let mut source = ModelSource::new(&spec.hf_model_id);
        if let Some(revision) = &spec.revision {
            source = source.with_revision(revision);
        }
        if let Some(token) = info.token_source() {
            source = source.with_token(SecretToken::new(resolve_secret(&token, secrets)?.expose()));
        }
        let adapter = AdapterSource::detect(&Hub::from_env(), &source).map_err(llm_error)?.ok_or_else(|| {
            llm_error(nstream_llm::Error::Unsupported("it holds no adapter_config.json: not a PEFT adapter".into()))
        })?;
        if let Some(recorded) = adapter.base_model()
            && recorded != info.hf_model_id
        {
            tracing::warn!(
                adapter = %spec.name,
                recorded_base = recorded,
                served_base = %info.hf_model_id,
                "the adapter names another base model; it is loaded because its matrices fit this base"
            );
        }
        let lora = adapter.read().and_then(|read| base.lora_adapter(spec.name.clone(), &read)).map_err(llm_error)?;
        tracing::info!(adapter = %spec.name, base = %name, rank = lora.rank(), "serving a LoRA adapter");
        loaded.push(LoadedModel {
            name: spec.name.clone(),
            backend: base.with_adapter(spec.name.clone(), lora, Some(name.clone())).with_root(&spec.hf_model_id),
        });
    }
    Ok(loaded)
}

/// Loads an embedding model straight from a hub repository id (`org/name`), for the CLI's
/// `nstream embed --model org/name`. Blocking.
pub fn load_embedding_repo(repo_id: &str, options: &LoadOptions) -> Result<LoadedModel> {
    let name = repo_id.to_string();
    let backend = EmbeddingBackend::load(name.clone(), &ModelSource::new(repo_id), options.embed.clone())
        .map_err(|cause| ProviderError::Embedding { name: name.clone(), cause: Box::new(cause) })?;
    Ok(LoadedModel { name, backend })
}
