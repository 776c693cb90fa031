//! Serving a file of models: what `nstream up` and `nstream-server --model-file` run.

use std::path::Path;
use std::sync::Arc;

use nstream_backend::VectorStoreBackend;
use nstream_core::ModelResource;

use nstream_core::{LoadedDocument, SecretString};
use nstream_server::{ApiKey, AppState, Metrics, ModelRegistry, ServerConfig};

use crate::error::{ProviderError, Result};
use crate::knowledge::{default_data_dir, vector_store_service};
use crate::load::{LoadOptions, LoadedModel, load_model_and_adapters};
use crate::metrics::ModelMetricsExporter;
use crate::secrets::SecretLookup;

/// Where and how to serve.
///
/// `#[non_exhaustive]`: start from [`ServeSettings::default`] (or [`crate::ServeArgs::settings`])
/// and use the `with_*` methods.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServeSettings {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>` (the key named `default`).
    pub api_key: Option<SecretString>,
    /// A file holding one key, re-read when it changes ([`ServerConfig::api_key_file`]).
    pub api_key_file: Option<std::path::PathBuf>,
    /// A YAML or JSON file of named keys, re-read when it changes
    /// ([`ServerConfig::api_keys_file`]).
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Whether `/metrics` requires a valid key.
    pub metrics_require_key: bool,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Largest file upload (`POST /v1/files`) in bytes.
    pub max_upload_bytes: usize,
    /// Most inputs in one embeddings request.
    pub max_embedding_inputs: usize,
    /// Time limits, the concurrency limit and the drain sequence.
    pub http_limits: crate::HttpLimits,
    /// How models are loaded.
    pub load: LoadOptions,
    /// Files, vector stores and embedded KnowledgeBase stores; the default data directory when
    /// `None`.
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for ServeSettings {
    fn default() -> Self {
        let server = ServerConfig::default();
        Self {
            host: "127.0.0.1".to_string(),
            port: 8080,
            api_key: None,
            api_key_file: None,
            api_keys_file: None,
            metrics_require_key: false,
            max_body_bytes: server.max_body_bytes,
            max_upload_bytes: server.max_upload_bytes,
            max_embedding_inputs: server.max_embedding_inputs,
            http_limits: crate::HttpLimits::default(),
            load: LoadOptions::default(),
            data_dir: None,
        }
    }
}

impl ServeSettings {
    /// Listens on this address.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Listens on this port (0 picks a free one).
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Requires this bearer key on `/v1/*`.
    pub fn with_api_key(mut self, api_key: SecretString) -> Self {
        self.api_key = Some(api_key);
        self
    }

    /// Refuses request bodies above this many bytes.
    pub fn with_max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Refuses embeddings requests with more inputs than this.
    pub fn with_max_embedding_inputs(mut self, inputs: usize) -> Self {
        self.max_embedding_inputs = inputs;
        self
    }

    /// Uses these time limits, concurrency limit and drain sequence.
    pub fn with_http_limits(mut self, limits: crate::HttpLimits) -> Self {
        self.http_limits = limits;
        self
    }

    /// Loads models with these options.
    pub fn with_load(mut self, load: LoadOptions) -> Self {
        self.load = load;
        self
    }

    /// Keeps files, vector stores and embedded KnowledgeBase stores under this folder.
    pub fn with_data_dir(mut self, data_dir: impl Into<std::path::PathBuf>) -> Self {
        self.data_dir = Some(data_dir.into());
        self
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
    let models_only = |resource: &&nstream_core::ModelResource| {
        !matches!(
            resource,
            nstream_core::ModelResource::KnowledgeBase(_) | nstream_core::ModelResource::Distillation(_)
        )
    };
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

/// Serves loaded models until SIGINT/SIGTERM, then drains ([`nstream_server::serve_with`]:
/// `/ready` fails, the drain delay on SIGTERM, in-flight requests finish within the shutdown
/// timeout). `metrics` is the registry the models were loaded with.
pub async fn serve_models(models: Vec<LoadedModel>, settings: &ServeSettings, metrics: Metrics) -> Result<()> {
    serve_models_with(models, None, settings, metrics).await
}

/// [`serve_models`] with `/v1/files` and `/v1/vector_stores` answered by `vector_stores`.
pub async fn serve_models_with(
    models: Vec<LoadedModel>,
    vector_stores: Option<Arc<dyn VectorStoreBackend>>,
    settings: &ServeSettings,
    metrics: Metrics,
) -> Result<()> {
    let mut registry = ModelRegistry::new();
    let names: Vec<String> = models.iter().map(|model| model.name.clone()).collect();
    for model in models {
        registry.register_as(model.name, model.backend)?;
    }
    let mut config = settings.http_limits.apply(
        ServerConfig::default()
            .with_max_body_bytes(settings.max_body_bytes)
            .with_max_upload_bytes(settings.max_upload_bytes)
            .with_max_embedding_inputs(settings.max_embedding_inputs),
    );
    if let Some(key) = &settings.api_key {
        config = config.with_api_key(ApiKey::new(key.expose()));
    }
    if let Some(path) = &settings.api_key_file {
        config = config.with_api_key_file(path);
    }
    if let Some(path) = &settings.api_keys_file {
        config = config.with_api_keys_file(path);
    }
    config = config.with_metrics_require_key(settings.metrics_require_key);
    // `try_new`: a key file that is missing or invalid at start-up stops the server.
    let mut state = AppState::try_new(registry, config, metrics)?;
    if let Some(vector_stores) = vector_stores {
        state = state.with_vector_stores(vector_stores);
    }
    let app = nstream_server::app(state.clone());
    let address = format!("{}:{}", settings.host, settings.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|cause| ProviderError::Bind { address: address.clone(), cause })?;
    let local = listener.local_addr().map_err(|cause| ProviderError::Bind { address, cause })?;
    tracing::info!(models = ?names, "serving on http://{local}/v1");
    nstream_server::serve_with(listener, app, &state, nstream_server::termination_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads a file (or folder) of models and serves every servable one.
pub async fn serve_file(path: &Path, settings: &ServeSettings) -> Result<()> {
    let documents = nstream_core::load_path(path)?;
    let resources: Vec<ModelResource> = documents.iter().filter_map(LoadedDocument::valid_resource).cloned().collect();
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
    let data_dir = settings.data_dir.clone().unwrap_or_else(default_data_dir);
    let declares_knowledge_bases = resources.iter().any(|resource| matches!(resource, ModelResource::KnowledgeBase(_)));
    let vector_stores = match vector_store_service(&resources, &models, &data_dir, &SecretLookup::from_env()).await {
        Ok(service) => service,
        // Without KnowledgeBases the vector-stores API is a bonus: a read-only or missing data
        // directory (a pod without a volume) must not stop the models from being served.
        Err(error) if !declares_knowledge_bases => {
            tracing::warn!(error = %error, data_dir = %data_dir.display(), "serving without /v1/vector_stores");
            None
        }
        Err(error) => return Err(error),
    };
    serve_models_with(models, vector_stores, settings, metrics).await
}
