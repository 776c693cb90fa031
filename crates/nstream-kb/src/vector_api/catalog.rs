//! The persisted list of files and vector stores: one JSON file, replaced atomically (written
//! beside, synced, renamed) after every change, so a restart finds every acknowledged object.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nstream_backend::vector_store::{FileCounts, FileObject, VectorStoreFileObject, VectorStoreObject};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A vector store and what nstream needs to index into it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StoreRecord {
    /// The object as created (counts, usage and status are derived when shown).
    pub object: VectorStoreObject,
    /// The EmbeddingModel that embeds its chunks and queries.
    pub embedding_model: String,
    /// Chunk size in tokens.
    pub max_tokens: u32,
    /// Overlap in tokens.
    pub overlap_tokens: u32,
    /// Whether it is a KnowledgeBase declared in YAML (not deletable through the API).
    pub declared: bool,
    /// Its files, by id.
    pub files: BTreeMap<String, VectorStoreFileObject>,
}

impl StoreRecord {
    /// The object with its files counted.
    pub fn render(&self) -> VectorStoreObject {
        let mut object = self.object.clone();
        let mut counts = FileCounts::default();
        let mut usage = 0;
        for file in self.files.values() {
            match file.status.as_str() {
                "in_progress" => counts.in_progress += 1,
                "completed" => counts.completed += 1,
                "failed" => counts.failed += 1,
                _ => counts.cancelled += 1,
            }
            usage += file.usage_bytes;
        }
        counts.total = self.files.len() as u64;
        object.status = if counts.in_progress > 0 { "in_progress" } else { "completed" }.to_string();
        object.usage_bytes = usage;
        object.file_counts = counts;
        object
    }
}

/// Every file and vector store.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Catalog {
    /// Uploaded files, by id.
    pub files: BTreeMap<String, FileObject>,
    /// Vector stores, by id.
    pub stores: BTreeMap<String, StoreRecord>,
}

impl Catalog {
    /// Reads the catalog, or an empty one when the file does not exist yet.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(error) => return Err(store_error(path, format!("cannot read: {error}"))),
        };
        serde_json::from_slice(&bytes)
            .map_err(|error| store_error(path, format!("not a catalog written by nstream: {error}")))
    }

    /// Replaces the file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|error| store_error(path, error.to_string()))?;
        let temporary = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)?;
            if let Some(parent) = path.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|error| store_error(path, format!("cannot write: {error}")))
    }
}

fn store_error(path: &Path, reason: String) -> Error {
    Error::StorePath { path: PathBuf::from(path), reason }
}

/// A new id with `prefix`: 24 hex digits, unique within the process and unlikely across them.
pub(crate) fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |duration| duration.as_nanos());
    let mut hasher = Sha256::new();
    hasher.update(nanos.to_le_bytes());
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hasher.update(std::process::id().to_le_bytes());
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(12).map(|byte| format!("{byte:02x}")).collect();
    format!("{prefix}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_and_the_catalog_survives_a_round_trip() {
        let first = new_id("file-");
        assert!(first.starts_with("file-") && first.len() == 29, "{first}");
        assert_ne!(first, new_id("file-"));
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("catalog.json");
        assert!(Catalog::load(&path).unwrap().files.is_empty());
        let mut catalog = Catalog::default();
        catalog.files.insert(
            first.clone(),
            FileObject {
                id: first.clone(),
                object: "file".to_string(),
                bytes: 3,
                created_at: 1,
                filename: "a.txt".to_string(),
                purpose: "assistants".to_string(),
                status: "processed".to_string(),
                expires_at: None,
                status_details: None,
            },
        );
        catalog.save(&path).unwrap();
        assert_eq!(Catalog::load(&path).unwrap().files[&first].filename, "a.txt");
        std::fs::write(&path, b"{").unwrap();
        let message = Catalog::load(&path).unwrap_err().to_string();
        assert!(message.contains("catalog.json") && message.contains("not a catalog"), "{message}");
    }
}
