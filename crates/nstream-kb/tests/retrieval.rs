//! all-MiniLM-L6-v2 over the labelled retrieval set (tests/fixtures/kb): recall@5 on the embedded
//! store and on PostgreSQL + pgvector, the same results on both; unchanged documents are skipped
//! and changed ones replaced; JSONL metadata filters.

mod common;

use std::sync::Arc;

use nstream_kb::{Collection, EmbeddedStore, Filter, PostgresStore, SearchRequest, Store};
use serde_json::json;

/// Top-5 document ids of each question, and recall@5.
async fn evaluate(collection: &Collection) -> (Vec<Vec<String>>, f64) {
    let questions = common::questions();
    let mut rankings = Vec::new();
    let mut found = 0;
    for (question, answer, _) in &questions {
        let hits = collection.search(&SearchRequest::new(question).with_max_results(5)).await.expect("searches");
        let ids: Vec<String> = hits.iter().map(|hit| hit.document_id.clone()).collect();
        if ids.contains(answer) {
            found += 1;
        }
        rankings.push(ids);
    }
    (rankings, found as f64 / questions.len() as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recall_at_5_is_high_and_equal_on_both_stores() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let embedded: Arc<dyn Store> = Arc::new(EmbeddedStore::open(folder.path()).unwrap());
    let collection = common::collection(&backend, &tokenizer, embedded, 64).await;
    let report = collection.index(common::passages(), &mut |_| {}).await.unwrap();
    assert_eq!((report.indexed, report.unchanged), (24, 0));
    assert!(report.chunks >= 24, "{report:?}");
    let (embedded_rankings, embedded_recall) = evaluate(&collection).await;
    eprintln!("embedded recall@5 = {embedded_recall}");
    assert!(embedded_recall >= 0.9, "recall@5 {embedded_recall}: {embedded_rankings:?}");

    // Indexing again changes nothing; a changed document is replaced, not duplicated.
    let again = collection.index(common::passages(), &mut |_| {}).await.unwrap();
    assert_eq!((again.indexed, again.unchanged, again.chunks), (0, 24, 0));
    let mut changed = common::passages();
    changed[0].text.push_str("\nA new closing sentence.\n");
    let replaced = collection.index(changed, &mut |_| {}).await.unwrap();
    assert_eq!((replaced.indexed, replaced.unchanged), (1, 23));
    let stats = collection.stats().await.unwrap();
    let expected_chunks: u64 =
        collection.documents().await.unwrap().iter().map(|entry| u64::from(entry.chunk_count)).sum();
    assert_eq!((stats.documents, stats.chunks), (24, expected_chunks));

    let Some(url) = common::postgres_url() else { return };
    let table = common::unique_table("kb_recall");
    let postgres: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url, &table).await.unwrap());
    let on_postgres = common::collection(&backend, &tokenizer, postgres, 64).await;
    on_postgres.index(common::passages(), &mut |_| {}).await.unwrap();
    let (postgres_rankings, postgres_recall) = evaluate(&on_postgres).await;
    eprintln!("postgres recall@5 = {postgres_recall}");
    assert_eq!(postgres_recall, embedded_recall);
    // The first changed document above aside, both stores hold the same chunks: same top 5.
    let (embedded_rankings, _) = {
        let folder = tempfile::tempdir().unwrap();
        let fresh: Arc<dyn Store> = Arc::new(EmbeddedStore::open(folder.path()).unwrap());
        let fresh = common::collection(&backend, &tokenizer, fresh, 64).await;
        fresh.index(common::passages(), &mut |_| {}).await.unwrap();
        evaluate(&fresh).await
    };
    assert_eq!(postgres_rankings, embedded_rankings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_metadata_filters_restrict_results() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(folder.path()).unwrap());
    let collection = common::collection(&backend, &tokenizer, store, 128).await;
    let read = nstream_kb::source::read_file(
        &common::fixtures().join("passages.jsonl"),
        "passages.jsonl",
        &nstream_kb::JsonlOptions::default(),
    )
    .unwrap();
    assert!(read.problems.is_empty());
    collection.index(read.documents, &mut |_| {}).await.unwrap();
    let filter = Filter::parse(&json!({"type": "eq", "key": "topic", "value": "cooking"}), "filters").unwrap();
    let hits = collection
        .search(&SearchRequest::new("what makes the northern lights").with_max_results(10).with_filter(filter))
        .await
        .unwrap();
    assert_eq!(hits.len(), 3, "three cooking passages: {hits:#?}");
    assert!(hits.iter().all(|hit| hit.metadata["topic"] == "cooking"));
    let unfiltered = collection.search(&SearchRequest::new("what makes the northern lights")).await.unwrap();
    assert_eq!(unfiltered[0].document_id, "passages.jsonl#northern-lights");
    // Bad searches are clear errors.
    for (request, field) in [
        (SearchRequest::new("   "), "query"),
        (SearchRequest::new("x").with_max_results(0), "max_num_results"),
        (SearchRequest::new("x").with_max_results(10_000), "max_num_results"),
    ] {
        let error = collection.search(&request).await.unwrap_err();
        assert!(error.to_string().starts_with(field), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_built_with_another_model_dimension_is_refused_by_name() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(folder.path()).unwrap();
    let entry = nstream_kb::DocumentEntry {
        id: "old".into(),
        content_hash: "x".into(),
        metadata: Default::default(),
        chunk_count: 1,
        bytes: 1,
        indexed_at: 0,
    };
    let chunk = nstream_kb::store::ChunkRecord { index: 0, text: "old".into(), vector: vec![0.1; 768] };
    store.write(vec![nstream_kb::store::DocumentWrite { entry, chunks: vec![chunk] }]).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let chunking = nstream_core::Chunking::default();
    let chunker = nstream_kb::Chunker::new(Arc::new(tokenizer), &chunking);
    let embedder = Arc::new(nstream_kb::BackendEmbedder::new(backend, "minilm"));
    let error = Collection::open("test", chunker, embedder, store).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("minilm") && message.contains("384") && message.contains("768"), "{message}");
    assert!(message.contains(&folder.path().display().to_string()), "{message}");
}
