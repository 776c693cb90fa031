//! The persisted list of files and vector stores: one JSON file, replaced atomically (written
//! beside, synced, renamed) after every change, so a restart finds every acknowledged object.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nstream_backend::vector_store::{
    FileCounts, FileObject, VectorStoreFileBatchObject, VectorStoreFileObject, VectorStoreObject,
};
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

/// Files counted by status (anything but in progress, completed and failed counts as cancelled).
fn count<'a>(statuses: impl Iterator<Item = &'a str>) -> FileCounts {
    let mut counts = FileCounts::default();
    for status in statuses {
        match status {
            "in_progress" => counts.in_progress += 1,
            "completed" => counts.completed += 1,
            "failed" => counts.failed += 1,
            _ => counts.cancelled += 1,
        }
        counts.total += 1;
    }
    counts
}

/// The days of an `expires_after` policy (`{"anchor": "last_active_at", "days": N}`).
pub(crate) fn expiry_days(expires_after: Option<&serde_json::Value>) -> Option<u64> {
    expires_after?.get("days")?.as_u64()
}

impl StoreRecord {
    /// When the store expires: `last_active_at` plus its policy's days, when it has one.
    pub fn expires_at(&self) -> Option<u64> {
        let days = expiry_days(self.object.expires_after.as_ref())?;
        let anchor = self.object.last_active_at.unwrap_or(self.object.created_at);
        Some(anchor.saturating_add(days.saturating_mul(86_400)))
    }

    /// Whether it expired by `now` (Unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at().is_some_and(|expires_at| now >= expires_at)
    }

    /// The object with its files counted and its expiry applied at `now` (Unix seconds).
    pub fn render_at(&self, now: u64) -> VectorStoreObject {
        let mut object = self.object.clone();
        let counts = count(self.files.values().map(|file| file.status.as_str()));
        object.status = if self.is_expired(now) {
            "expired"
        } else if counts.in_progress > 0 {
            "in_progress"
        } else {
            "completed"
        }
        .to_string();
        object.usage_bytes = self.files.values().map(|file| file.usage_bytes).sum();
        object.file_counts = counts;
        object.expires_at = self.expires_at();
        object
    }
}

/// A file batch: the files it attached and, once none is in progress, its outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct BatchRecord {
    /// `vsfb_...`.
    pub id: String,
    /// The store it attached files to.
    pub store: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The files it attached, in the order given.
    pub file_ids: Vec<String>,
    /// Whether it was cancelled.
    pub cancelled: bool,
    /// Its status and counts once settled (no file in progress); derived from its files before.
    pub settled: Option<(String, FileCounts)>,
}

impl BatchRecord {
    /// The object: its files' statuses in `store` (a file no longer attached counts as cancelled).
    pub fn render(&self, store: Option<&StoreRecord>) -> VectorStoreFileBatchObject {
        let (status, file_counts) = match &self.settled {
            Some((status, counts)) => (status.clone(), counts.clone()),
            None => {
                let counts = count(self.file_ids.iter().map(|id| {
                    store.and_then(|record| record.files.get(id)).map_or("cancelled", |file| file.status.as_str())
                }));
                let status = if counts.in_progress > 0 {
                    "in_progress"
                } else if self.cancelled {
                    "cancelled"
                } else if counts.total > 0 && counts.failed == counts.total {
                    "failed"
                } else {
                    "completed"
                };
                (status.to_string(), counts)
            }
        };
        VectorStoreFileBatchObject {
            id: self.id.clone(),
            object: "vector_store.file_batch".to_string(),
            created_at: self.created_at,
            vector_store_id: self.store.clone(),
            status,
            file_counts,
        }
    }
}

/// Every file and vector store.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Catalog {
    /// Uploaded files, by id.
    pub files: BTreeMap<String, FileObject>,
    /// Vector stores, by id.
    pub stores: BTreeMap<String, StoreRecord>,
    /// File batches, by id (absent from catalogs written before batches existed).
    #[serde(default)]
    pub batches: BTreeMap<String, BatchRecord>,
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

    /// Freezes the outcome of every batch none of whose files is in progress any more (so later
    /// changes to its files, such as a detach, do not rewrite its history), and forgets the
    /// batches of deleted stores.
    pub fn settle_batches(&mut self) {
        let stores = &self.stores;
        self.batches.retain(|_, batch| stores.contains_key(&batch.store));
        for batch in self.batches.values_mut() {
            if batch.settled.is_none() {
                let object = batch.render(stores.get(&batch.store));
                if object.status != "in_progress" {
                    batch.settled = Some((object.status, object.file_counts));
                }
            }
        }
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

    fn store(expires_after: Option<serde_json::Value>, statuses: &[(&str, &str)]) -> StoreRecord {
        let files = statuses
            .iter()
            .map(|(id, status)| {
                let file = VectorStoreFileObject {
                    id: id.to_string(),
                    object: "vector_store.file".to_string(),
                    usage_bytes: 10,
                    created_at: 1,
                    vector_store_id: "vs_1".to_string(),
                    status: status.to_string(),
                    last_error: None,
                    chunking_strategy: serde_json::json!({"type": "auto"}),
                    attributes: serde_json::Map::new(),
                };
                (id.to_string(), file)
            })
            .collect();
        StoreRecord {
            object: VectorStoreObject {
                id: "vs_1".to_string(),
                object: "vector_store".to_string(),
                created_at: 1_000,
                name: String::new(),
                usage_bytes: 0,
                file_counts: FileCounts::default(),
                status: "completed".to_string(),
                expires_after,
                expires_at: None,
                last_active_at: Some(2_000),
                metadata: serde_json::Map::new(),
                description: None,
            },
            embedding_model: "minilm".to_string(),
            max_tokens: 256,
            overlap_tokens: 32,
            declared: false,
            files,
        }
    }

    #[test]
    fn stores_expire_after_their_days_of_inactivity() {
        let never = store(None, &[("file-a", "completed")]);
        assert_eq!(never.render_at(u64::MAX).status, "completed");
        assert_eq!(never.render_at(u64::MAX).expires_at, None);
        let policy = serde_json::json!({"anchor": "last_active_at", "days": 2});
        let expiring = store(Some(policy), &[("file-a", "completed"), ("file-b", "in_progress")]);
        let before = expiring.render_at(2_000 + 2 * 86_400 - 1);
        assert_eq!(before.expires_at, Some(2_000 + 2 * 86_400));
        assert_eq!(before.status, "in_progress");
        assert_eq!((before.file_counts.completed, before.file_counts.total, before.usage_bytes), (1, 2, 20));
        assert_eq!(expiring.render_at(2_000 + 2 * 86_400).status, "expired");
    }

    #[test]
    fn batches_count_their_files_and_settle_once_done() {
        let mut catalog = Catalog::default();
        catalog.stores.insert("vs_1".to_string(), store(None, &[("file-a", "completed"), ("file-b", "in_progress")]));
        let batch = |id: &str, files: &[&str]| BatchRecord {
            id: id.to_string(),
            store: "vs_1".to_string(),
            created_at: 5,
            file_ids: files.iter().map(ToString::to_string).collect(),
            cancelled: false,
            settled: None,
        };
        catalog.batches.insert("vsfb_1".to_string(), batch("vsfb_1", &["file-a", "file-b"]));
        catalog.batches.insert("vsfb_2".to_string(), batch("vsfb_2", &["file-a"]));
        catalog
            .batches
            .insert("vsfb_gone".to_string(), BatchRecord { store: "vs_gone".to_string(), ..batch("vsfb_gone", &[]) });
        catalog.settle_batches();
        assert!(!catalog.batches.contains_key("vsfb_gone"));
        let first = catalog.batches["vsfb_1"].render(catalog.stores.get("vs_1"));
        assert_eq!((first.object.as_str(), first.status.as_str()), ("vector_store.file_batch", "in_progress"));
        assert_eq!((first.file_counts.in_progress, first.file_counts.completed, first.file_counts.total), (1, 1, 2));
        assert!(catalog.batches["vsfb_1"].settled.is_none());
        assert_eq!(catalog.batches["vsfb_2"].settled.as_ref().map(|(status, _)| status.as_str()), Some("completed"));

        // The last file fails: the batch completes (not every file failed) and keeps its counts
        // after the file is detached.
        catalog.stores.get_mut("vs_1").unwrap().files.get_mut("file-b").unwrap().status = "failed".to_string();
        catalog.settle_batches();
        catalog.stores.get_mut("vs_1").unwrap().files.clear();
        catalog.settle_batches();
        let settled = catalog.batches["vsfb_1"].render(catalog.stores.get("vs_1"));
        assert_eq!(settled.status, "completed");
        assert_eq!((settled.file_counts.failed, settled.file_counts.completed), (1, 1));

        let mut failing = batch("vsfb_3", &["file-c"]);
        let record = store(None, &[("file-c", "failed")]);
        assert_eq!(failing.render(Some(&record)).status, "failed");
        failing.cancelled = true;
        let cancelled = failing.render(Some(&store(None, &[("file-c", "cancelled")])));
        assert_eq!((cancelled.status.as_str(), cancelled.file_counts.cancelled), ("cancelled", 1));
    }

    #[test]
    fn a_catalog_from_before_batches_loads() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("catalog.json");
        std::fs::write(&path, br#"{"files": {}, "stores": {}}"#).unwrap();
        assert!(Catalog::load(&path).unwrap().batches.is_empty());
    }

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
