//! The embedded store: one LMDB environment (through heed) holding the documents, the chunks and
//! hannoy's HNSW graph of their vectors. A write is one LMDB transaction, so a crash loses nothing
//! committed and never leaves a vector without its chunk or a chunk of a half-replaced document.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use hannoy::distances::Cosine;
use hannoy::{Reader, Writer};
use heed::types::{Bytes, Str};
use heed::{CommitOrAbort, Env, EnvOpenOptions, RoTxn, RwTxn};
use rand::SeedableRng;
use rand::rngs::StdRng;
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{DocumentEntry, DocumentWrite, SearchHit, Store, StoreStats, VectorQuery};

/// The largest the LMDB file may grow to (address space, not disk: the file grows as needed).
const DEFAULT_MAP_SIZE: usize = 64 << 30;
/// HNSW links per node on upper layers and on the bottom layer.
const LINKS: usize = 16;
const BOTTOM_LINKS: usize = 32;
/// Candidates kept while building.
const EF_CONSTRUCTION: usize = 128;
/// The smallest candidate list of a search.
const MIN_EF_SEARCH: usize = 64;
/// The index number within the hannoy database (one index per store).
const INDEX: u16 = 0;

type ItemId = u32;

/// A document as stored: its entry and the ids of its chunks' vectors.
#[derive(Serialize, Deserialize)]
struct StoredDocument {
    entry: DocumentEntry,
    items: Vec<ItemId>,
}

/// A chunk as stored (its vector lives in hannoy under the same id).
#[derive(Serialize, Deserialize)]
struct StoredChunk {
    document_id: String,
    index: u32,
    text: String,
}

struct Databases {
    documents: heed::Database<'static, Str, Bytes>,
    chunks: heed::Database<'static, Bytes, Bytes>,
    meta: heed::Database<'static, Str, Bytes>,
    vectors: hannoy::Database<'static, Cosine>,
}

struct Inner {
    path: PathBuf,
    env: Env,
    databases: Databases,
}

/// The embedded store in one folder.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EmbeddedStore").field("path", &self.inner.path).finish()
    }
}

fn item_key(item: ItemId) -> [u8; 4] {
    item.to_be_bytes()
}

impl EmbeddedStore {
    /// Opens the store in `path`, creating the folder and its files when missing.
    pub fn open(path: &Path) -> Result<Self> {
        let path_error = |reason: String| Error::StorePath { path: path.to_path_buf(), reason };
        if path.is_file() {
            return Err(path_error("is a file; expected a folder for the embedded store".to_string()));
        }
        std::fs::create_dir_all(path).map_err(|error| path_error(format!("cannot create the folder: {error}")))?;
        let embedded = |error: heed::Error| Error::Embedded { path: path.to_path_buf(), cause: error.to_string() };
        let mut options = EnvOpenOptions::new();
        options.map_size(DEFAULT_MAP_SIZE).max_dbs(8);
        // SAFETY: heed's `open` is unsafe because the memory map is undefined behaviour if the
        // file is changed behind LMDB's back. Only LMDB writes these files: nstream opens the
        // folder through this function alone (heed allows opening it twice in one process) and
        // other processes go through LMDB's own lock file. The folder must be on a local disk
        // (docs/knowledge-base.md says so).
        #[expect(unsafe_code, reason = "opening an LMDB memory map, see the SAFETY comment")]
        let env = unsafe { options.open(path) }.map_err(|error| match error {
            heed::Error::Io(io) => path_error(format!("cannot open: {io}")),
            other => embedded(other),
        })?;
        let wtxn = env.write_txn().map_err(embedded)?;
        let databases = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> heed::Result<_> {
                let documents = opener.create_database::<Str, Bytes>(wtxn, Some("documents"))?;
                let chunks = opener.create_database::<Bytes, Bytes>(wtxn, Some("chunks"))?;
                let meta = opener.create_database::<Str, Bytes>(wtxn, Some("meta"))?;
                let vectors: hannoy::Database<Cosine> = opener.create_database(wtxn, Some("vectors"))?;
                Ok(CommitOrAbort::<_, ()>::Commit((documents, chunks, meta, vectors)))
            })
            .map_err(embedded)?;
        let CommitOrAbort::Commit((documents, chunks, meta, vectors)) = databases else {
            return Err(Error::Embedded { path: path.to_path_buf(), cause: "creating the databases aborted".into() });
        };
        let databases = Databases { documents, chunks, meta, vectors };
        Ok(Self { inner: Arc::new(Inner { path: path.to_path_buf(), env, databases }) })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T: Send + 'static>(&self, work: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::spawn_blocking(move || work(&inner))
                .await
                .map_err(|error| Error::Task(error.to_string()))?,
            Err(_) => work(&inner),
        }
    }
}

impl Inner {
    fn error(&self, cause: impl std::fmt::Display) -> Error {
        Error::Embedded { path: self.path.clone(), cause: cause.to_string() }
    }

    fn dimension(&self, rtxn: &RoTxn) -> Result<Option<usize>> {
        let bytes = self.databases.meta.get(rtxn, "dimension").map_err(|error| self.error(error))?;
        Ok(bytes.and_then(|bytes| <[u8; 4]>::try_from(bytes).ok()).map(|bytes| u32::from_be_bytes(bytes) as usize))
    }

    fn next_item(&self, rtxn: &RoTxn) -> Result<ItemId> {
        let bytes = self.databases.meta.get(rtxn, "next_item").map_err(|error| self.error(error))?;
        Ok(bytes.and_then(|bytes| <[u8; 4]>::try_from(bytes).ok()).map_or(0, u32::from_be_bytes))
    }

    fn stored_document(&self, rtxn: &RoTxn, id: &str) -> Result<Option<StoredDocument>> {
        let Some(bytes) = self.databases.documents.get(rtxn, id).map_err(|error| self.error(error))? else {
            return Ok(None);
        };
        serde_json::from_slice(bytes).map(Some).map_err(|error| self.error(format!("document {id:?}: {error}")))
    }

    /// Removes a document's chunks and vectors; whether it existed.
    fn remove(&self, wtxn: &mut RwTxn, writer: &Writer<Cosine>, id: &str) -> Result<bool> {
        let Some(stored) = self.stored_document(wtxn, id)? else { return Ok(false) };
        for item in stored.items {
            self.databases.chunks.delete(wtxn, &item_key(item)).map_err(|error| self.error(error))?;
            writer.del_item(wtxn, item).map_err(|error| self.error(error))?;
        }
        self.databases.documents.delete(wtxn, id).map_err(|error| self.error(error))?;
        Ok(true)
    }

    fn build(&self, wtxn: &mut RwTxn, writer: &Writer<Cosine>, seed: u64) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(seed);
        writer
            .builder(&mut rng)
            .ef_construction(EF_CONSTRUCTION)
            .build::<LINKS, BOTTOM_LINKS>(wtxn)
            .map_err(|error| self.error(error))
    }

    fn write(&self, documents: Vec<DocumentWrite>) -> Result<()> {
        let Some(dimension) =
            documents.iter().flat_map(|document| &document.chunks).map(|chunk| chunk.vector.len()).next()
        else {
            // Only documents without chunks (empty texts): record them, nothing to index.
            return self.write_with_dimension(documents, None);
        };
        self.write_with_dimension(documents, Some(dimension))
    }

    fn write_with_dimension(&self, documents: Vec<DocumentWrite>, incoming: Option<usize>) -> Result<()> {
        let mut wtxn = self.env.write_txn().map_err(|error| self.error(error))?;
        let stored_dimension = self.dimension(&wtxn)?;
        let dimension = match (stored_dimension, incoming) {
            (Some(stored), Some(incoming)) if stored != incoming => {
                return Err(Error::DimensionMismatch {
                    model: "the EmbeddingModel".to_string(),
                    model_dimension: incoming,
                    store: format!("embedded {}", self.path.display()),
                    store_dimension: stored,
                });
            }
            (Some(stored), _) => Some(stored),
            (None, Some(incoming)) => {
                let bytes = u32::try_from(incoming).map_err(|error| self.error(error))?.to_be_bytes();
                self.databases.meta.put(&mut wtxn, "dimension", &bytes).map_err(|error| self.error(error))?;
                Some(incoming)
            }
            (None, None) => None,
        };
        let mut next = self.next_item(&wtxn)?;
        let writer = dimension.map(|dimension| Writer::new(self.databases.vectors, INDEX, dimension));
        for document in documents {
            if let Some(writer) = &writer {
                self.remove(&mut wtxn, writer, &document.entry.id)?;
            }
            let mut items = Vec::with_capacity(document.chunks.len());
            for chunk in document.chunks {
                let (Some(writer), Some(dimension)) = (&writer, dimension) else { break };
                if chunk.vector.len() != dimension {
                    return Err(self.error(format!(
                        "document {:?} chunk {}: a {}-dimensional vector in a {dimension}-dimensional store",
                        document.entry.id,
                        chunk.index,
                        chunk.vector.len()
                    )));
                }
                let item = next;
                next = next.checked_add(1).ok_or_else(|| self.error("more than 4 billion chunks written"))?;
                writer.add_item(&mut wtxn, item, &chunk.vector).map_err(|error| self.error(error))?;
                let stored =
                    StoredChunk { document_id: document.entry.id.clone(), index: chunk.index, text: chunk.text };
                let bytes = serde_json::to_vec(&stored).map_err(|error| self.error(error))?;
                self.databases.chunks.put(&mut wtxn, &item_key(item), &bytes).map_err(|error| self.error(error))?;
                items.push(item);
            }
            let id = document.entry.id.clone();
            let stored = StoredDocument { entry: document.entry, items };
            let bytes = serde_json::to_vec(&stored).map_err(|error| self.error(error))?;
            self.databases.documents.put(&mut wtxn, &id, &bytes).map_err(|error| self.error(error))?;
        }
        self.databases.meta.put(&mut wtxn, "next_item", &next.to_be_bytes()).map_err(|error| self.error(error))?;
        if let Some(writer) = &writer {
            self.build(&mut wtxn, writer, u64::from(next))?;
        }
        wtxn.commit().map_err(|error| self.error(error))
    }

    fn delete(&self, id: &str) -> Result<bool> {
        let mut wtxn = self.env.write_txn().map_err(|error| self.error(error))?;
        let Some(dimension) = self.dimension(&wtxn)? else {
            let existed = self.databases.documents.delete(&mut wtxn, id).map_err(|error| self.error(error))?;
            wtxn.commit().map_err(|error| self.error(error))?;
            return Ok(existed);
        };
        let writer = Writer::new(self.databases.vectors, INDEX, dimension);
        let existed = self.remove(&mut wtxn, &writer, id)?;
        if existed {
            let seed = u64::from(self.next_item(&wtxn)?);
            self.build(&mut wtxn, &writer, seed)?;
        }
        wtxn.commit().map_err(|error| self.error(error))?;
        Ok(existed)
    }

    fn search(&self, query: &VectorQuery) -> Result<Vec<SearchHit>> {
        let rtxn = self.env.read_txn().map_err(|error| self.error(error))?;
        let Some(dimension) = self.dimension(&rtxn)? else { return Ok(Vec::new()) };
        if query.vector.len() != dimension {
            return Err(Error::DimensionMismatch {
                model: "the query's EmbeddingModel".to_string(),
                model_dimension: query.vector.len(),
                store: format!("embedded {}", self.path.display()),
                store_dimension: dimension,
            });
        }
        let reader = match Reader::<Cosine>::open(&rtxn, INDEX, self.databases.vectors) {
            Ok(reader) => reader,
            // Every chunk deleted: hannoy keeps no index to open.
            Err(_) if self.databases.chunks.is_empty(&rtxn).unwrap_or(false) => return Ok(Vec::new()),
            Err(error) => return Err(self.error(error)),
        };
        let candidates = match &query.filter {
            None => None,
            Some(filter) => {
                let mut candidates = RoaringBitmap::new();
                let iterator = self.databases.documents.iter(&rtxn).map_err(|error| self.error(error))?;
                for row in iterator {
                    let (id, bytes) = row.map_err(|error| self.error(error))?;
                    let stored: StoredDocument = serde_json::from_slice(bytes)
                        .map_err(|error| self.error(format!("document {id:?}: {error}")))?;
                    if filter.matches(&stored.entry.metadata) {
                        candidates.extend(stored.items);
                    }
                }
                if candidates.is_empty() {
                    return Ok(Vec::new());
                }
                Some(candidates)
            }
        };
        let limit = query.limit.max(1);
        let mut builder = reader.nns(limit);
        builder.ef_search(MIN_EF_SEARCH.max(limit * 2));
        if let Some(candidates) = &candidates {
            builder.candidates(candidates);
        }
        let neighbours = builder.by_vector(&rtxn, &query.vector).map_err(|error| self.error(error))?.into_nns();
        let mut hits = Vec::with_capacity(neighbours.len());
        let mut documents: std::collections::HashMap<String, DocumentEntry> = std::collections::HashMap::new();
        for (item, distance) in neighbours {
            // hannoy's cosine distance is (1 - cos) / 2.
            let score = 1.0 - 2.0 * distance;
            if query.score_threshold.is_some_and(|threshold| score < threshold) {
                continue;
            }
            let Some(bytes) = self.databases.chunks.get(&rtxn, &item_key(item)).map_err(|error| self.error(error))?
            else {
                return Err(self.error(format!("vector {item} has no chunk (the store is corrupt)")));
            };
            let chunk: StoredChunk = serde_json::from_slice(bytes).map_err(|error| self.error(error))?;
            if !documents.contains_key(&chunk.document_id) {
                let stored = self
                    .stored_document(&rtxn, &chunk.document_id)?
                    .ok_or_else(|| self.error(format!("chunk {item} has no document (the store is corrupt)")))?;
                documents.insert(chunk.document_id.clone(), stored.entry);
            }
            let metadata = documents.get(&chunk.document_id).map(|entry| entry.metadata.clone()).unwrap_or_default();
            hits.push(SearchHit {
                document_id: chunk.document_id,
                chunk_index: chunk.index,
                score,
                text: chunk.text,
                metadata,
            });
        }
        hits.sort_by(|left, right| right.score.total_cmp(&left.score));
        hits.truncate(limit);
        Ok(hits)
    }

    fn documents(&self) -> Result<Vec<DocumentEntry>> {
        let rtxn = self.env.read_txn().map_err(|error| self.error(error))?;
        let mut entries = Vec::new();
        for row in self.databases.documents.iter(&rtxn).map_err(|error| self.error(error))? {
            let (id, bytes) = row.map_err(|error| self.error(error))?;
            let stored: StoredDocument =
                serde_json::from_slice(bytes).map_err(|error| self.error(format!("document {id:?}: {error}")))?;
            entries.push(stored.entry);
        }
        Ok(entries)
    }

    fn stats(&self) -> Result<StoreStats> {
        let rtxn = self.env.read_txn().map_err(|error| self.error(error))?;
        Ok(StoreStats {
            documents: self.databases.documents.len(&rtxn).map_err(|error| self.error(error))?,
            chunks: self.databases.chunks.len(&rtxn).map_err(|error| self.error(error))?,
            dimension: self.dimension(&rtxn)?,
        })
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded {}", self.inner.path.display())
    }

    async fn dimension(&self) -> Result<Option<usize>> {
        self.blocking(|inner| {
            let rtxn = inner.env.read_txn().map_err(|error| inner.error(error))?;
            inner.dimension(&rtxn)
        })
        .await
    }

    async fn document(&self, id: &str) -> Result<Option<DocumentEntry>> {
        let id = id.to_string();
        self.blocking(move |inner| {
            let rtxn = inner.env.read_txn().map_err(|error| inner.error(error))?;
            Ok(inner.stored_document(&rtxn, &id)?.map(|stored| stored.entry))
        })
        .await
    }

    async fn documents(&self) -> Result<Vec<DocumentEntry>> {
        self.blocking(Inner::documents).await
    }

    async fn write(&self, documents: Vec<DocumentWrite>) -> Result<()> {
        self.blocking(move |inner| inner.write(documents)).await
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.blocking(move |inner| inner.delete(&id)).await
    }

    async fn search(&self, query: &VectorQuery) -> Result<Vec<SearchHit>> {
        let query = query.clone();
        self.blocking(move |inner| inner.search(&query)).await
    }

    async fn stats(&self) -> Result<StoreStats> {
        self.blocking(Inner::stats).await
    }
}
