//! Shared state of the router: the models, the settings and the metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use nstream_backend::{ModelBackend, VectorStoreBackend};

use crate::config::ServerConfig;
use crate::metrics::Metrics;

/// Errors building or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Two backends were registered under the same model name.
    #[error("model `{0}` is registered twice")]
    DuplicateModel(String),
    /// A model name is empty.
    #[error("a model name must not be empty")]
    EmptyModelName,
    /// Binding or serving the socket failed.
    #[error("server I/O error: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for ServerError {
    fn from(error: std::io::Error) -> Self {
        Self::Io(error)
    }
}

/// The served models, by the name clients put in `model`.
#[derive(Clone, Default)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<dyn ModelBackend>>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ModelRegistry").field("models", &self.models.keys().collect::<Vec<_>>()).finish()
    }
}

impl ModelRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a backend under its own id ([`nstream_backend::ModelDescription::id`]).
    pub fn register(&mut self, backend: Arc<dyn ModelBackend>) -> Result<(), ServerError> {
        let name = backend.describe().id;
        self.register_as(name, backend)
    }

    /// Registers a backend under `name` (for aliases, or when the id is not the public name).
    pub fn register_as(&mut self, name: impl Into<String>, backend: Arc<dyn ModelBackend>) -> Result<(), ServerError> {
        let name = name.into();
        if name.is_empty() {
            return Err(ServerError::EmptyModelName);
        }
        if self.models.contains_key(&name) {
            return Err(ServerError::DuplicateModel(name));
        }
        self.models.insert(name, backend);
        Ok(())
    }

    /// Builder form of [`ModelRegistry::register`].
    pub fn with_model(mut self, backend: Arc<dyn ModelBackend>) -> Result<Self, ServerError> {
        self.register(backend)?;
        Ok(self)
    }

    /// The backend serving `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn ModelBackend>> {
        self.models.get(name)
    }

    /// Every model, by name, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn ModelBackend>)> {
        self.models.iter().map(|(name, backend)| (name.as_str(), backend))
    }

    /// How many models are registered.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether no model is registered.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// Everything a request handler needs; cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<StateInner>,
}

#[derive(Clone, Debug)]
struct StateInner {
    models: ModelRegistry,
    config: ServerConfig,
    metrics: Metrics,
    vector_stores: Option<VectorStores>,
}

/// The files and vector stores, when served; `Debug` names no internals.
#[derive(Clone)]
struct VectorStores(Arc<dyn VectorStoreBackend>);

impl std::fmt::Debug for VectorStores {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("VectorStores")
    }
}

impl AppState {
    /// State for [`crate::app`]. Pass the same [`Metrics`] whose registry the backends
    /// registered their own metrics in, so `/metrics` shows them too.
    pub fn new(models: ModelRegistry, config: ServerConfig, metrics: Metrics) -> Self {
        Self { inner: Arc::new(StateInner { models, config, metrics, vector_stores: None }) }
    }

    /// The served models.
    pub fn models(&self) -> &ModelRegistry {
        &self.inner.models
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Serves `/v1/files` and `/v1/vector_stores` from `backend` (they answer 404 without one).
    pub fn with_vector_stores(self, backend: Arc<dyn VectorStoreBackend>) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.vector_stores = Some(VectorStores(backend));
        Self { inner: Arc::new(inner) }
    }

    /// The files and vector stores, when served.
    pub fn vector_stores(&self) -> Option<&Arc<dyn VectorStoreBackend>> {
        self.inner.vector_stores.as_ref().map(|stores| &stores.0)
    }
}
