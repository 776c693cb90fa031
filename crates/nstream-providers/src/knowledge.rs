//! KnowledgeBase spec -> an opened `nstream_kb::Collection`: its EmbeddingModel's tokenizer for
//! chunking, its backend for embedding, and its store (a folder under the data directory, or
//! PostgreSQL with the connection URL from a Secret).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nstream_backend::ModelBackend;
use nstream_core::{EmbeddingModel, KnowledgeBase, ModelResource, SecretSource};
use nstream_hub::Hub;
use nstream_kb::{BackendEmbedder, Chunker, Collection, EmbeddedStore, Store};

use crate::error::{ProviderError, Result};
use crate::load::model_source;
use crate::secrets::{SecretLookup, resolve_secret};

/// The data directory: `$NSTREAM_DATA_DIR`, else `$XDG_DATA_HOME/nstream`, else
/// `~/.local/share/nstream`, else `./.nstream`.
pub fn default_data_dir() -> PathBuf {
    if let Some(folder) = std::env::var_os("NSTREAM_DATA_DIR").filter(|folder| !folder.is_empty()) {
        return PathBuf::from(folder);
    }
    if let Some(folder) = std::env::var_os("XDG_DATA_HOME").filter(|folder| !folder.is_empty()) {
        return PathBuf::from(folder).join("nstream");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) {
        return PathBuf::from(home).join(".local/share/nstream");
    }
    PathBuf::from(".nstream")
}

fn kb_error(name: &str, cause: nstream_kb::Error) -> ProviderError {
    ProviderError::KnowledgeBase { name: name.to_string(), cause }
}

/// The folder of a KnowledgeBase's embedded store: its `path` (relative ones under `data_dir`),
/// or `data_dir/kb/<name>`.
pub fn embedded_store_path(knowledge_base: &KnowledgeBase, data_dir: &Path) -> Option<PathBuf> {
    let name = knowledge_base.metadata.name.as_deref().unwrap_or("default");
    let store = knowledge_base.spec.store_or_default();
    let embedded = store.embedded?;
    Some(match embedded.path {
        Some(path) if Path::new(&path).is_absolute() => PathBuf::from(path),
        Some(path) => data_dir.join(path),
        None => data_dir.join("kb").join(name),
    })
}

/// Opens a KnowledgeBase's store.
pub async fn open_store(
    knowledge_base: &KnowledgeBase,
    data_dir: &Path,
    secrets: &SecretLookup,
) -> Result<Arc<dyn Store>> {
    let name = knowledge_base.metadata.name.clone().unwrap_or_default();
    if let Some(path) = embedded_store_path(knowledge_base, data_dir) {
        let store = EmbeddedStore::open(&path).map_err(|cause| kb_error(&name, cause))?;
        return Ok(Arc::new(store));
    }
    let store = knowledge_base.spec.store_or_default();
    let Some(postgres) = store.postgres else {
        return Err(ProviderError::NotServable {
            kind: "KnowledgeBase".to_string(),
            name,
            reason: "its store names neither embedded nor postgres (run `nstream validate`)".to_string(),
        });
    };
    let url = resolve_secret(&SecretSource::Reference(&postgres.connection_secret_ref), secrets)?;
    let store = nstream_kb::PostgresStore::connect(url.expose(), postgres.table_or_default())
        .await
        .map_err(|cause| kb_error(&name, cause))?;
    Ok(Arc::new(store))
}

/// The EmbeddingModel a KnowledgeBase names, among the resources of its file.
pub fn embedding_model_of<'a>(
    knowledge_base: &KnowledgeBase,
    resources: impl IntoIterator<Item = &'a ModelResource>,
) -> Result<EmbeddingModel> {
    let wanted = &knowledge_base.spec.embedding_model;
    let mut names = Vec::new();
    for resource in resources {
        if let ModelResource::EmbeddingModel(model) = resource {
            if model.metadata.name.as_deref() == Some(wanted.as_str()) {
                return Ok(model.clone());
            }
            names.extend(model.metadata.name.clone());
        }
    }
    Err(ProviderError::NotServable {
        kind: "KnowledgeBase".to_string(),
        name: knowledge_base.metadata.name.clone().unwrap_or_default(),
        reason: format!(
            "its embeddingModel {wanted} is not an EmbeddingModel of the same file (found: {})",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        ),
    })
}

/// Opens a KnowledgeBase for indexing and search, embedding with `backend` (its EmbeddingModel,
/// loaded in this process or reached over HTTP) and chunking with that model's tokenizer.
pub async fn open_knowledge_base(
    knowledge_base: &KnowledgeBase,
    embedding_model: &EmbeddingModel,
    backend: Arc<dyn ModelBackend>,
    data_dir: &Path,
    secrets: &SecretLookup,
) -> Result<Collection> {
    let name = knowledge_base.metadata.name.clone().unwrap_or_default();
    let model_name = embedding_model.metadata.name.clone().unwrap_or_default();
    let source = model_source(&embedding_model.spec.embedding_model_serving_info, secrets)?;
    let tokenizer_path = tokio::task::spawn_blocking(move || Hub::from_env().resolve_file(&source, "tokenizer.json"))
        .await
        .map_err(|error| kb_error(&name, nstream_kb::Error::Task(error.to_string())))?
        .map_err(|error| kb_error(&name, nstream_kb::Error::Tokenizer(error.to_string())))?;
    let tokenizer = nstream_kb::load_tokenizer(&tokenizer_path).map_err(|cause| kb_error(&name, cause))?;
    let chunker = Chunker::new(Arc::new(tokenizer), &knowledge_base.spec.chunking_or_default());
    let store = open_store(knowledge_base, data_dir, secrets).await?;
    let embedder = Arc::new(BackendEmbedder::new(backend, model_name));
    let search = knowledge_base.spec.search.clone().unwrap_or_default();
    let collection = Collection::open(name.clone(), chunker, embedder, store)
        .await
        .map_err(|cause| kb_error(&name, cause))?
        .with_search_defaults(search.max_num_results, search.score_threshold.map(|threshold| threshold as f32));
    Ok(collection)
}
