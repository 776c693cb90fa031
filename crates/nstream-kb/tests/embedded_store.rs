//! The embedded store on real files: atomic replacement, persistence across reopen, filters,
//! bad paths, dimension mismatches, and the HNSW index's recall@10 against exact search.

use std::sync::Arc;

use nstream_kb::store::{ChunkRecord, DocumentWrite, cosine};
use nstream_kb::{DocumentEntry, EmbeddedStore, Error, Filter, Store, VectorQuery};
use serde_json::{Map, Value, json};

fn entry(id: &str, chunks: u32, metadata: Value) -> DocumentEntry {
    let metadata: Map<String, Value> = metadata.as_object().cloned().unwrap_or_default();
    DocumentEntry {
        id: id.to_string(),
        content_hash: format!("hash-{id}-{chunks}"),
        metadata,
        chunk_count: chunks,
        bytes: 0,
        indexed_at: 0,
    }
}

/// A deterministic pseudo-random unit vector.
fn vector(seed: u64, dimension: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut values: Vec<f32> = (0..dimension)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let norm = values.iter().map(|value| value * value).sum::<f32>().sqrt();
    values.iter_mut().for_each(|value| *value /= norm);
    values
}

fn document(id: &str, seeds: &[u64], metadata: Value) -> DocumentWrite {
    let chunks = seeds
        .iter()
        .enumerate()
        .map(|(index, seed)| ChunkRecord {
            index: index as u32,
            text: format!("{id} chunk {index}"),
            vector: vector(*seed, 16),
        })
        .collect::<Vec<_>>();
    DocumentWrite { entry: entry(id, chunks.len() as u32, metadata), chunks }
}

#[tokio::test]
async fn replacing_a_document_leaves_no_orphans_and_survives_reopening() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("kb");
    {
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .write(vec![
                document("a", &[1, 2, 3], json!({"lang": "en"})),
                document("b", &[4, 5], json!({"lang": "fr"})),
            ])
            .await
            .unwrap();
        assert_eq!(store.stats().await.unwrap().chunks, 5);
        // "a" changes: its three chunks are replaced by one.
        store.write(vec![document("a", &[6], json!({"lang": "en"}))]).await.unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.documents, stats.chunks, stats.dimension), (2, 3, Some(16)));
        let hits = store.search(&VectorQuery::new(vector(1, 16), 10)).await.unwrap();
        assert_eq!(hits.len(), 3, "{hits:#?}");
        assert!(hits.iter().all(|hit| hit.text != "a chunk 1" && hit.text != "a chunk 2"));
    }
    let store = EmbeddedStore::open(&path).unwrap();
    let hits = store.search(&VectorQuery::new(vector(6, 16), 1)).await.unwrap();
    assert_eq!(hits[0].document_id, "a");
    assert!((hits[0].score - 1.0).abs() < 1e-4, "{}", hits[0].score);
    assert!(store.delete("a").await.unwrap());
    assert!(!store.delete("a").await.unwrap());
    let ids: Vec<String> = store.documents().await.unwrap().into_iter().map(|entry| entry.id).collect();
    assert_eq!(ids, ["b"]);
    let hits = store.search(&VectorQuery::new(vector(6, 16), 10)).await.unwrap();
    assert!(hits.iter().all(|hit| hit.document_id == "b"));
    assert!(store.delete("b").await.unwrap());
    assert!(store.search(&VectorQuery::new(vector(6, 16), 10)).await.unwrap().is_empty());
}

#[tokio::test]
async fn filters_and_score_thresholds_narrow_results() {
    let folder = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(folder.path()).unwrap();
    let writes: Vec<DocumentWrite> = (0..40)
        .map(|index| {
            document(
                &format!("d{index:02}"),
                &[index],
                json!({"parity": if index % 2 == 0 { "even" } else { "odd" }, "n": index}),
            )
        })
        .collect();
    store.write(writes).await.unwrap();
    let filter = Filter::parse(
        &json!({"type": "and", "filters": [
            {"type": "eq", "key": "parity", "value": "odd"},
            {"type": "lt", "key": "n", "value": 10}
        ]}),
        "filters",
    )
    .unwrap();
    let hits = store.search(&VectorQuery::new(vector(2, 16), 10).with_filter(Some(filter))).await.unwrap();
    let mut ids: Vec<&str> = hits.iter().map(|hit| hit.document_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["d01", "d03", "d05", "d07", "d09"]);
    let hits = store.search(&VectorQuery::new(vector(2, 16), 10).with_score_threshold(Some(0.99))).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].document_id, "d02");
}

#[tokio::test]
async fn a_store_path_that_is_a_file_is_a_clear_error() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let error = EmbeddedStore::open(file.path()).unwrap_err();
    assert!(matches!(error, Error::StorePath { .. }));
    let message = error.to_string();
    assert!(message.contains(&file.path().display().to_string()) && message.contains("is a file"), "{message}");
}

#[tokio::test]
async fn vectors_of_another_dimension_are_refused_and_nothing_is_lost() {
    let folder = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(folder.path()).unwrap();
    store.write(vec![document("a", &[1, 2], json!({}))]).await.unwrap();
    let wrong = DocumentWrite {
        entry: entry("a", 1, json!({})),
        chunks: vec![ChunkRecord { index: 0, text: "x".into(), vector: vec![0.5; 8] }],
    };
    let message = store.write(vec![wrong]).await.unwrap_err().to_string();
    assert!(message.contains("8-dimensional") && message.contains("16-dimensional"), "{message}");
    assert_eq!(store.stats().await.unwrap().chunks, 2, "the failed write changed nothing");
    let message = store.search(&VectorQuery::new(vec![1.0; 8], 3)).await.unwrap_err().to_string();
    assert!(message.contains("dimension mismatch"), "{message}");
}

#[tokio::test]
async fn hnsw_recall_at_10_against_exact_search() {
    let folder = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(folder.path()).unwrap());
    let dimension = 64;
    let count = 3000u64;
    let vectors: Vec<Vec<f32>> = (0..count).map(|seed| vector(seed, dimension)).collect();
    for batch in (0..count).collect::<Vec<_>>().chunks(500) {
        let writes = batch
            .iter()
            .map(|seed| DocumentWrite {
                entry: entry(&format!("v{seed}"), 1, json!({})),
                chunks: vec![ChunkRecord { index: 0, text: String::new(), vector: vectors[*seed as usize].clone() }],
            })
            .collect();
        store.write(writes).await.unwrap();
    }
    let mut found = 0;
    let queries = 50;
    for query_seed in 0..queries {
        let query = vector(1_000_000 + query_seed, dimension);
        let mut exact: Vec<(usize, f32)> =
            vectors.iter().enumerate().map(|(index, vector)| (index, cosine(&query, vector))).collect();
        exact.sort_by(|left, right| right.1.total_cmp(&left.1));
        let truth: Vec<String> = exact.iter().take(10).map(|(index, _)| format!("v{index}")).collect();
        let hits = store.search(&VectorQuery::new(query, 10)).await.unwrap();
        found += hits.iter().filter(|hit| truth.contains(&hit.document_id)).count();
    }
    let recall = found as f64 / (queries as f64 * 10.0);
    assert!(recall >= 0.95, "recall@10 {recall}");
}
