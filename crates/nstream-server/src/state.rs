//! Shared state of the router: the models, the settings and the metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use nstream_backend::{ModelBackend, VectorStoreBackend};

use crate::auth::{KeyFileError, KeyRing, KeySources};
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::shutdown::Lifecycle;

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
    /// The API key files could not be loaded.
    #[error("API keys: {0}")]
    Keys(KeyFileError),
    /// `/metrics` should require a key but no key is configured.
    #[error("metrics_require_key is set but no API key is configured (api_key, api_key_file or api_keys_file)")]
    MetricsKeyWithoutKeys,
}

impl From<std::io::Error> for ServerError {
    fn from(error: std::io::Error) -> Self {
        Self::Io(error)
    }
}

/// The served models, by the name clients put in `model`. Clones share the same models: LoRA
/// adapters are added and removed at run time (`/v1/load_lora_adapter`).
#[derive(Clone, Default)]
pub struct ModelRegistry {
    models: Arc<RwLock<BTreeMap<String, Arc<dyn ModelBackend>>>>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ModelRegistry").field("models", &self.read().keys().collect::<Vec<_>>()).finish()
    }
}

impl ModelRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The map, read-locked; a panic while it was held left nothing half-written (every write is
    /// one insert or remove), so a poisoned lock is taken as is.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<dyn ModelBackend>>> {
        self.models.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<dyn ModelBackend>>> {
        self.models.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a backend under its own id ([`nstream_backend::ModelDescription::id`]).
    pub fn register(&mut self, backend: Arc<dyn ModelBackend>) -> Result<(), ServerError> {
        let name = backend.describe().id;
        self.register_as(name, backend)
    }

    /// Registers a backend under `name` (for aliases, or when the id is not the public name).
    pub fn register_as(&mut self, name: impl Into<String>, backend: Arc<dyn ModelBackend>) -> Result<(), ServerError> {
        self.insert(name.into(), backend)
    }

    /// Registers a backend while serving (a hot-loaded adapter); refused under a taken name.
    pub fn insert(&self, name: String, backend: Arc<dyn ModelBackend>) -> Result<(), ServerError> {
        if name.is_empty() {
            return Err(ServerError::EmptyModelName);
        }
        let mut models = self.write();
        if models.contains_key(&name) {
            return Err(ServerError::DuplicateModel(name));
        }
        models.insert(name, backend);
        Ok(())
    }

    /// Stops serving `name` when `keep` refuses nothing: `keep` sees the backend under the write
    /// lock and returns why it must stay, if it must. Returns the removed backend.
    pub fn remove_if<E>(
        &self,
        name: &str,
        keep: impl FnOnce(&Arc<dyn ModelBackend>) -> Result<(), E>,
    ) -> Option<Result<Arc<dyn ModelBackend>, E>> {
        let mut models = self.write();
        let backend = models.get(name)?;
        if let Err(reason) = keep(backend) {
            return Some(Err(reason));
        }
        models.remove(name).map(Ok)
    }

    /// Builder form of [`ModelRegistry::register`].
    pub fn with_model(mut self, backend: Arc<dyn ModelBackend>) -> Result<Self, ServerError> {
        self.register(backend)?;
        Ok(self)
    }

    /// The backend serving `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn ModelBackend>> {
        self.read().get(name).cloned()
    }

    /// Every model, by name, in name order (a snapshot).
    pub fn iter(&self) -> impl Iterator<Item = (String, Arc<dyn ModelBackend>)> + use<> {
        let snapshot: Vec<_> = self.read().iter().map(|(name, backend)| (name.clone(), Arc::clone(backend))).collect();
        snapshot.into_iter()
    }

    /// How many models are registered.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no model is registered.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
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
    /// Where the server is in its shutdown, shared with [`crate::serve_with`].
    lifecycle: Lifecycle,
    /// Permits for [`ServerConfig::max_concurrent_requests`]; `None` without a limit.
    admission: Option<Arc<tokio::sync::Semaphore>>,
    /// The accepted API keys; `None` when requests need no key.
    keys: Option<KeyRing>,
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
    ///
    /// Key files that cannot be loaded are logged and refuse every request until they become
    /// valid (never open the server); [`AppState::try_new`] reports them instead.
    pub fn new(models: ModelRegistry, config: ServerConfig, metrics: Metrics) -> Self {
        let sources = KeySources::from_config(&config);
        let keys = (!sources.is_empty()).then(|| KeyRing::load_or_refuse_all(sources));
        Self::with_key_ring(models, config, metrics, keys)
    }

    fn with_key_ring(models: ModelRegistry, config: ServerConfig, metrics: Metrics, keys: Option<KeyRing>) -> Self {
        let admission = (config.max_concurrent_requests > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)));
        let lifecycle = Lifecycle::default();
        Self {
            inner: Arc::new(StateInner { models, config, metrics, vector_stores: None, lifecycle, admission, keys }),
        }
    }

    /// [`AppState::new`], failing when the key files cannot be loaded or `/metrics` should
    /// require a key and none is configured (what a binary wants at start-up).
    pub fn try_new(models: ModelRegistry, config: ServerConfig, metrics: Metrics) -> Result<Self, ServerError> {
        let sources = KeySources::from_config(&config);
        if config.metrics_require_key && sources.is_empty() {
            return Err(ServerError::MetricsKeyWithoutKeys);
        }
        let ring = if sources.is_empty() { None } else { Some(KeyRing::load(sources).map_err(ServerError::Keys)?) };
        Ok(Self::with_key_ring(models, config, metrics, ring))
    }

    /// The accepted API keys; `None` when requests need no key.
    pub fn key_ring(&self) -> Option<&KeyRing> {
        self.inner.keys.as_ref()
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

    /// Where the server is in its shutdown.
    pub(crate) fn lifecycle(&self) -> &Lifecycle {
        &self.inner.lifecycle
    }

    /// The permits of [`ServerConfig::max_concurrent_requests`], when limited.
    pub(crate) fn admission(&self) -> Option<&Arc<tokio::sync::Semaphore>> {
        self.inner.admission.as_ref()
    }

    /// The files and vector stores, when served.
    pub fn vector_stores(&self) -> Option<&Arc<dyn VectorStoreBackend>> {
        self.inner.vector_stores.as_ref().map(|stores| &stores.0)
    }
}
