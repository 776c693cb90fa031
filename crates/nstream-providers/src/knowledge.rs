//! KnowledgeBase spec -> an opened `nstream_kb::Collection`: its EmbeddingModel's tokenizer for
//! chunking, its backend for embedding, and its store (a folder under the data directory, or
//! PostgreSQL with the connection URL from a Secret).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nstream_backend::{ModelBackend, VectorStoreBackend};
use nstream_core::{EmbeddingModel, KnowledgeBase, ModelResource, SecretSource};
use nstream_hub::Hub;
use nstream_kb::{BackendEmbedder, Chunker, Collection, EmbeddedStore, EmbeddingChoice, Store, VectorStoreService};

use crate::error::{ProviderError, Result};
use crate::load::{LoadedModel, model_source};
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

/// The tokenizer of an EmbeddingModel (from the hub cache, or downloaded), for chunk sizes;
/// errors are reported under `owner` (the KnowledgeBase or service that needs it).
async fn embedding_tokenizer(
    owner: &str,
    embedding_model: &EmbeddingModel,
    secrets: &SecretLookup,
) -> Result<Arc<dyn nstream_kb::TokenOffsets>> {
    let source = model_source(&embedding_model.spec.embedding_model_serving_info, secrets)?;
    let tokenizer_path = tokio::task::spawn_blocking(move || Hub::from_env().resolve_file(&source, "tokenizer.json"))
        .await
        .map_err(|error| kb_error(owner, nstream_kb::Error::Task(error.to_string())))?
        .map_err(|error| kb_error(owner, nstream_kb::Error::Tokenizer(error.to_string())))?;
    let tokenizer = nstream_kb::load_tokenizer(&tokenizer_path).map_err(|cause| kb_error(owner, cause))?;
    Ok(Arc::new(tokenizer))
}

/// The files and vector stores of a served file: every loaded EmbeddingModel may embed stores
/// created through the API, and every KnowledgeBase of the file is a store named by its
/// `metadata.name`. Everything lives under `data_dir/openai` (KnowledgeBases in their own stores).
/// `None` when the file serves no EmbeddingModel.
pub async fn vector_store_service(
    resources: &[ModelResource],
    models: &[LoadedModel],
    data_dir: &Path,
    secrets: &SecretLookup,
) -> Result<Option<Arc<dyn VectorStoreBackend>>> {
    let backend_of = |name: &str| models.iter().find(|model| model.name == name).map(|model| model.backend.clone());
    let mut choices = Vec::new();
    for resource in resources {
        let ModelResource::EmbeddingModel(model) = resource else { continue };
        let name = model.metadata.name.clone().unwrap_or_default();
        let Some(backend) = backend_of(&name) else { continue };
        let tokenizer = embedding_tokenizer(&name, model, secrets).await?;
        let embedder = Arc::new(BackendEmbedder::new(backend, name.clone()));
        choices.push(EmbeddingChoice::new(name, embedder, tokenizer));
    }
    if choices.is_empty() {
        return Ok(None);
    }
    let mut declared = Vec::new();
    for resource in resources {
        let ModelResource::KnowledgeBase(knowledge_base) = resource else { continue };
        let embedding_model = embedding_model_of(knowledge_base, resources)?;
        let model_name = embedding_model.metadata.name.clone().unwrap_or_default();
        let backend = backend_of(&model_name).ok_or_else(|| ProviderError::NotServable {
            kind: "KnowledgeBase".to_string(),
            name: knowledge_base.metadata.name.clone().unwrap_or_default(),
            reason: format!("its EmbeddingModel {model_name} is not loaded"),
        })?;
        let collection = open_knowledge_base(knowledge_base, &embedding_model, backend, data_dir, secrets).await?;
        tracing::info!(knowledge_base = collection.name(), model = %model_name, "serving a KnowledgeBase as a vector store");
        declared.push(collection);
    }
    let service = VectorStoreService::open(&data_dir.join("openai"), choices, declared)
        .await
        .map_err(|cause| kb_error("vector stores", cause))?;
    Ok(Some(Arc::new(service)))
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
    let tokenizer = embedding_tokenizer(&name, embedding_model, secrets).await?;
    let chunker = Chunker::new(tokenizer, &knowledge_base.spec.chunking_or_default());
    let store = open_store(knowledge_base, data_dir, secrets).await?;
    let embedder = Arc::new(BackendEmbedder::new(backend, model_name));
    let search = knowledge_base.spec.search.clone().unwrap_or_default();
    let collection = Collection::open(name.clone(), chunker, embedder, store)
        .await
        .map_err(|cause| kb_error(&name, cause))?
        .with_search_defaults(search.max_num_results, search.score_threshold.map(|threshold| threshold as f32));
    Ok(collection)
}
