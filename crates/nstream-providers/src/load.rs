//! One resource -> one backend.

use std::sync::Arc;

use crate::metrics::EmbedMetricsExporter;
use nstream_backend::ModelBackend;
use nstream_core::{ModelResource, ServingInfo};
use nstream_embed::{EmbedOptions, EmbeddingBackend};
use nstream_hub::{Hub, ModelSource, SecretToken};

use crate::error::{ProviderError, Result};
use crate::secrets::{SecretLookup, resolve_secret};

/// How models are loaded (device, batching); one set for every model of a file.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Embedding models: device, dtype, batch budget, queue size, threads.
    pub embed: EmbedOptions,
}

/// A model ready to serve, under the name clients route by.
pub struct LoadedModel {
    /// `metadata.name` of the resource.
    pub name: String,
    /// The backend answering its requests.
    pub backend: Arc<dyn ModelBackend>,
}

/// Why this build cannot serve a resource, or `None` when it can.
pub fn servable(resource: &ModelResource) -> Option<&'static str> {
    match resource {
        ModelResource::EmbeddingModel(_) => None,
        ModelResource::BaseModel(_) => {
            Some("serving BaseModels (candle causal LMs) is the BaseModel serving issue, not yet landed")
        }
        ModelResource::MegaModel(_) => Some("the hosted-provider gateway is the MegaModel issue, not yet landed"),
    }
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
    exporter: Option<&EmbedMetricsExporter>,
) -> Result<LoadedModel> {
    let name = resource.name().unwrap_or_default().to_string();
    match resource {
        ModelResource::EmbeddingModel(model) => {
            let source = model_source(&model.spec.embedding_model_serving_info, secrets)?;
            let observer = exporter.as_ref().map(|exporter| exporter.observer(&name));
            let backend =
                EmbeddingBackend::load_with(name.clone(), &Hub::from_env(), &source, options.embed.clone(), observer)
                    .map_err(|source| ProviderError::Embedding { name: name.clone(), source: Box::new(source) })?;
            if let Some(exporter) = exporter {
                exporter.track(&name, backend.metrics().clone());
            }
            Ok(LoadedModel { name, backend })
        }
        other => Err(ProviderError::NotServable {
            kind: other.kind().to_string(),
            name,
            reason: servable(other).unwrap_or_default().to_string(),
        }),
    }
}

/// Loads an embedding model straight from a hub repository id (`org/name`), for the CLI's
/// `nstream embed --model org/name`. Blocking.
pub fn load_embedding_repo(repo_id: &str, options: &LoadOptions) -> Result<LoadedModel> {
    let name = repo_id.to_string();
    let backend = EmbeddingBackend::load(name.clone(), &ModelSource::new(repo_id), options.embed.clone())
        .map_err(|source| ProviderError::Embedding { name: name.clone(), source: Box::new(source) })?;
    Ok(LoadedModel { name, backend })
}
