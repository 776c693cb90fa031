//! Serving a file of models: what `nstream up` and `nstream-server --model-file` run.

use std::path::Path;

use nstream_core::{LoadedDocument, SecretString};
use nstream_server::{ApiKey, AppState, Metrics, ModelRegistry, ServerConfig};

use crate::error::{ProviderError, Result};
use crate::load::{LoadOptions, LoadedModel, load_model_and_adapters};
use crate::metrics::ModelMetricsExporter;
use crate::secrets::SecretLookup;

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServeSettings {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<SecretString>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Most inputs in one embeddings request.
    pub max_embedding_inputs: usize,
    /// How models are loaded.
    pub load: LoadOptions,
}

impl Default for ServeSettings {
    fn default() -> Self {
        let server = ServerConfig::default();
        Self {
            host: "127.0.0.1".to_string(),
            port: 8080,
            api_key: None,
            max_body_bytes: server.max_body_bytes,
            max_embedding_inputs: server.max_embedding_inputs,
            load: LoadOptions::default(),
        }
    }
}

/// Renders the diagnostics of invalid documents, one line each.
fn report(documents: &[LoadedDocument]) -> String {
    let mut lines = Vec::new();
    for document in documents {
        for diagnostic in &document.diagnostics {
            let line = diagnostic.line.unwrap_or(document.origin.line);
            lines.push(format!("{}:{line}: {}: {diagnostic}", document.origin.file, document.label()));
        }
    }
    lines.join("\n")
}

/// Loads every model of valid documents; refuses a file with any invalid document. Each model's
/// metrics go to `metrics`.
/// Blocking.
pub fn load_models(
    documents: &[LoadedDocument],
    options: &LoadOptions,
    secrets: &SecretLookup,
    metrics: &Metrics,
) -> Result<Vec<LoadedModel>> {
    if documents.iter().any(|document| !document.diagnostics.is_empty()) {
        let path = documents.first().map(|document| document.origin.file.clone()).unwrap_or_default();
        return Err(ProviderError::InvalidFile { path, report: report(documents) });
    }
    let exporter = ModelMetricsExporter::register(metrics);
    let mut models = Vec::new();
    let models_only =
        |resource: &&nstream_core::ModelResource| !matches!(
        resource,
        nstream_core::ModelResource::KnowledgeBase(_) | nstream_core::ModelResource::Distillation(_)
    );
    for resource in documents.iter().filter_map(LoadedDocument::valid_resource).filter(models_only) {
        tracing::info!(kind = resource.kind(), name = resource.name(), "loading");
        let started = std::time::Instant::now();
        let loaded = load_model_and_adapters(resource, options, secrets, Some(&exporter))?;
        for model in loaded {
            tracing::info!(name = %model.name, seconds = started.elapsed().as_secs_f64(), "loaded");
            models.push(model);
        }
    }
    Ok(models)
}

/// Serves loaded models until SIGINT/SIGTERM, then finishes in-flight requests. `metrics` is the
/// registry the models were loaded with.
pub async fn serve_models(models: Vec<LoadedModel>, settings: &ServeSettings, metrics: Metrics) -> Result<()> {
    let mut registry = ModelRegistry::new();
    let names: Vec<String> = models.iter().map(|model| model.name.clone()).collect();
    for model in models {
        registry.register_as(model.name, model.backend)?;
    }
    let mut config = ServerConfig::default()
        .with_max_body_bytes(settings.max_body_bytes)
        .with_max_embedding_inputs(settings.max_embedding_inputs);
    if let Some(key) = &settings.api_key {
        config = config.with_api_key(ApiKey::new(key.expose()));
    }
    let app = nstream_server::app(AppState::new(registry, config, metrics));
    let address = format!("{}:{}", settings.host, settings.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|cause| ProviderError::Bind { address: address.clone(), cause })?;
    let local = listener.local_addr().map_err(|cause| ProviderError::Bind { address, cause })?;
    tracing::info!(models = ?names, "serving on http://{local}/v1");
    nstream_server::serve(listener, app, nstream_server::shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads a file (or folder) of models and serves every servable one.
pub async fn serve_file(path: &Path, settings: &ServeSettings) -> Result<()> {
    let documents = nstream_core::load_path(path)?;
    let options = settings.load.clone();
    let owned_path = path.to_path_buf();
    let metrics = Metrics::new();
    let loading_metrics = metrics.clone();
    let models = tokio::task::spawn_blocking(move || {
        load_models(&documents, &options, &SecretLookup::from_env(), &loading_metrics)
    })
    .await
    .map_err(|error| ProviderError::NotServable {
        kind: "file".to_string(),
        name: owned_path.display().to_string(),
        reason: format!("the loading task failed: {error}"),
    })??;
    if models.is_empty() {
        return Err(ProviderError::NothingToServe(path.to_path_buf()));
    }
    serve_models(models, settings, metrics).await
}
