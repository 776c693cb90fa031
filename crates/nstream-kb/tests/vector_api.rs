//! The OpenAI vector-stores service over real MiniLM embeddings and the embedded store: upload,
//! attach, background indexing, search with filters, deletion, a restart, bad requests, file
//! batches (and their cancellation), a file's parsed content, the expiry of stores and files, and
//! attaching a file twice.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use nstream_backend::VectorStoreBackend;
use nstream_backend::vector_store::{
    CreateVectorStore, CreateVectorStoreFile, CreateVectorStoreFileBatch, FileUpload, ListQuery, SearchVectorStore,
};
use nstream_kb::vector_api::Clock;
use nstream_kb::{BackendEmbedder, Embed, EmbeddingChoice, VectorStoreService};
use serde_json::{Value, json};

fn choice(backend: &Arc<nstream_embed::EmbeddingBackend>, tokenizer: &tokenizers::Tokenizer) -> EmbeddingChoice {
    EmbeddingChoice::new(
        "minilm",
        Arc::new(BackendEmbedder::new(backend.clone(), "minilm")),
        Arc::new(tokenizer.clone()),
    )
}

fn body<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid request body")
}

async fn wait(service: &VectorStoreService) {
    assert!(service.wait_idle(Duration::from_secs(120)).await, "indexing did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_attach_search_delete_and_restart() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let root = folder.path().join("openai");
    let service = VectorStoreService::open(&root, vec![choice(&backend, &tokenizer)], Vec::new()).await.unwrap();

    let mut file_ids = Vec::new();
    for (name, topic) in [("sourdough.md", "cooking"), ("tides.md", "science"), ("espresso.md", "cooking")] {
        let bytes = std::fs::read(common::fixtures().join("docs").join(name)).unwrap();
        let file = service.create_file(FileUpload::new(name, "assistants", bytes)).await.unwrap();
        assert_eq!(file.filename, name);
        file_ids.push((file.id, topic));
    }
    let store = service.create_vector_store(body(json!({"name": "docs"}))).await.unwrap();
    assert_eq!(store.metadata["embedding_model"], "minilm");
    for (file_id, topic) in &file_ids {
        let request: CreateVectorStoreFile = body(json!({"file_id": file_id, "attributes": {"topic": topic}}));
        let attached = service.attach_file(&store.id, request).await.unwrap();
        assert_eq!(attached.status, "in_progress");
    }
    wait(&service).await;
    let listed = service.list_vector_store_files(&store.id, ListQuery::default()).await.unwrap();
    assert_eq!(listed.data.len(), 3);
    assert!(listed.data.iter().all(|file| file.status == "completed"), "{:?}", listed.data);
    let shown = service.vector_store(&store.id).await.unwrap();
    assert_eq!(shown.file_counts.completed, 3);
    assert!(shown.usage_bytes > 0);

    let question = "How do I know my sourdough starter is ready for baking?";
    let found = service.search(&store.id, body(json!({"query": question, "max_num_results": 3}))).await.unwrap();
    assert_eq!(found.data[0].filename, "sourdough.md");
    assert_eq!(found.data[0].file_id, file_ids[0].0);
    assert_eq!(found.data[0].attributes["topic"], "cooking");

    let science: SearchVectorStore =
        body(json!({"query": question, "filters": {"type": "eq", "key": "topic", "value": "science"}}));
    let filtered = service.search(&store.id, science).await.unwrap();
    assert!(!filtered.data.is_empty());
    assert!(filtered.data.iter().all(|hit| hit.filename == "tides.md"), "{:?}", filtered.data);

    let strict = service
        .search(&store.id, body(json!({"query": question, "ranking_options": {"score_threshold": 0.99}})))
        .await
        .unwrap();
    assert!(strict.data.is_empty(), "{:?}", strict.data);

    // Deleting a file removes it from results; the store keeps the others.
    service.delete_file(&file_ids[0].0).await.unwrap();
    let after = service.search(&store.id, body(json!({"query": question, "max_num_results": 10}))).await.unwrap();
    assert!(!after.data.is_empty());
    assert!(after.data.iter().all(|hit| hit.filename != "sourdough.md"), "{:?}", after.data);
    drop(service);

    // A restart finds the files, the store and its index.
    let service = VectorStoreService::open(&root, vec![choice(&backend, &tokenizer)], Vec::new()).await.unwrap();
    let files = service.list_files(ListQuery::default()).await.unwrap();
    assert_eq!(files.data.len(), 2);
    let stores = service.list_vector_stores(ListQuery::default()).await.unwrap();
    assert_eq!(stores.data.len(), 1);
    assert_eq!(stores.data[0].file_counts.completed, 2);
    let again = service.search(&store.id, body(json!({"query": "espresso extraction"}))).await.unwrap();
    assert_eq!(again.data[0].filename, "espresso.md");

    // Detach one; delete the store.
    service.detach_file(&store.id, &file_ids[2].0).await.unwrap();
    let without = service.search(&store.id, body(json!({"query": "espresso extraction"}))).await.unwrap();
    assert!(without.data.iter().all(|hit| hit.filename != "espresso.md"), "{:?}", without.data);
    let deleted = service.delete_vector_store(&store.id).await.unwrap();
    assert_eq!(deleted.object, "vector_store.deleted");
    assert_eq!(service.vector_store(&store.id).await.unwrap_err().status_code(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_bad_files() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let service =
        VectorStoreService::open(&folder.path().join("openai"), vec![choice(&backend, &tokenizer)], Vec::new())
            .await
            .unwrap();
    let store = service.create_vector_store(CreateVectorStore::default()).await.unwrap();

    let unknown_model: CreateVectorStore = body(json!({"metadata": {"embedding_model": "bge"}}));
    let error = service.create_vector_store(unknown_model).await.unwrap_err();
    assert_eq!(error.param(), Some("metadata.embedding_model"));
    assert!(error.to_string().contains("minilm"), "{error}");

    let missing: CreateVectorStoreFile = body(json!({"file_id": "file-nope"}));
    let error = service.attach_file(&store.id, missing).await.unwrap_err();
    assert_eq!((error.status_code(), error.param()), (404, Some("file_id")));

    for (search, field) in [
        (json!({"query": ""}), "query"),
        (json!({"query": "a", "max_num_results": 0}), "max_num_results"),
        (json!({"query": "a", "max_num_results": 10000}), "max_num_results"),
        (json!({"query": "a", "filters": {"type": "like", "key": "a", "value": 1}}), "filters.type"),
    ] {
        let error = service.search(&store.id, body(search.clone())).await.unwrap_err();
        assert_eq!((error.status_code(), error.param()), (400, Some(field)), "{search}: {error}");
    }

    // Not UTF-8: the file fails with OpenAI's code, the store goes on.
    let binary = service.create_file(FileUpload::new("blob.bin", "assistants", vec![0xff, 0xfe, 0x00])).await.unwrap();
    service.attach_file(&store.id, body(json!({"file_id": binary.id}))).await.unwrap();
    wait(&service).await;
    let failed = service.vector_store_file(&store.id, &binary.id).await.unwrap();
    assert_eq!(failed.status, "failed");
    assert_eq!(failed.last_error.as_ref().map(|error| error.code.as_str()), Some("unsupported_file"));
    assert_eq!(service.vector_store(&store.id).await.unwrap().file_counts.failed, 1);

    // The folder is a file: a clear error naming it.
    let file = folder.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let error = VectorStoreService::open(&file, Vec::new(), Vec::new()).await.unwrap_err().to_string();
    assert!(error.contains("plain") && error.contains("is a file"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_progress_at_a_stop_are_indexed_on_the_next_start() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let root = folder.path().join("openai");
    let service = VectorStoreService::open(&root, vec![choice(&backend, &tokenizer)], Vec::new()).await.unwrap();
    let bytes = std::fs::read(common::fixtures().join("docs").join("tides.md")).unwrap();
    let file = service.create_file(FileUpload::new("tides.md", "assistants", bytes)).await.unwrap();
    let store = service.create_vector_store(body(json!({"file_ids": [file.id]}))).await.unwrap();
    wait(&service).await;
    drop(service);

    // As after a kill during indexing: the catalog still says in_progress (the chunks may or may
    // not have been committed; here they were).
    let catalog_path = root.join("catalog.json");
    let text = std::fs::read_to_string(&catalog_path).unwrap();
    assert!(text.contains("\"status\": \"completed\""));
    std::fs::write(&catalog_path, text.replace("\"status\": \"completed\"", "\"status\": \"in_progress\"")).unwrap();

    let service = VectorStoreService::open(&root, vec![choice(&backend, &tokenizer)], Vec::new()).await.unwrap();
    wait(&service).await;
    let attached = service.vector_store_file(&store.id, &file.id).await.unwrap();
    assert_eq!(attached.status, "completed");
    let results = service.search(&store.id, body(json!({"query": "tides", "max_num_results": 50}))).await.unwrap();
    let chunks: Vec<&str> = results.data.iter().map(|hit| hit.content[0].text.as_str()).collect();
    let mut unique = chunks.clone();
    unique.sort_unstable();
    unique.dedup();
    assert!(!chunks.is_empty());
    assert_eq!(unique.len(), chunks.len(), "a chunk is present twice: {chunks:?}");
}

/// Uploads `name` from the fixtures as `copies` files (named `0-name`, `1-name`...).
async fn upload(service: &VectorStoreService, name: &str, copies: usize) -> Vec<String> {
    let bytes = std::fs::read(common::fixtures().join("docs").join(name)).unwrap();
    let mut ids = Vec::new();
    for copy in 0..copies {
        let upload = FileUpload::new(format!("{copy}-{name}"), "assistants", bytes.clone());
        ids.push(service.create_file(upload).await.unwrap().id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_batches_complete_cancel_and_survive_a_restart() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let root = folder.path().join("openai");
    let service = VectorStoreService::open(&root, vec![choice(&backend, &tokenizer)], Vec::new()).await.unwrap();
    let store = service.create_vector_store(CreateVectorStore::default()).await.unwrap();

    // file_ids with shared attributes and chunking.
    let mut ids = upload(&service, "tides.md", 1).await;
    ids.extend(upload(&service, "espresso.md", 1).await);
    let static_chunks = json!({"type": "static", "static": {"max_chunk_size_tokens": 120, "chunk_overlap_tokens": 20}});
    let request = body(json!({"file_ids": ids, "attributes": {"batch": "one"}, "chunking_strategy": static_chunks}));
    let batch = service.create_file_batch(&store.id, request).await.unwrap();
    assert!(batch.id.starts_with("vsfb_"), "{}", batch.id);
    assert_eq!((batch.object.as_str(), batch.vector_store_id.as_str()), ("vector_store.file_batch", store.id.as_str()));
    assert_eq!((batch.file_counts.total, batch.file_counts.in_progress), (2, 2));
    wait(&service).await;
    let done = service.file_batch(&store.id, &batch.id).await.unwrap();
    assert_eq!(done.status, "completed");
    assert_eq!((done.file_counts.completed, done.file_counts.total), (2, 2));
    let listed = service.list_file_batch_files(&store.id, &batch.id, ListQuery::default()).await.unwrap();
    assert_eq!(listed.data.len(), 2);
    for file in &listed.data {
        assert_eq!(file.attributes["batch"], "one");
        assert_eq!(file.chunking_strategy, static_chunks);
    }
    let found = service
        .search(
            &store.id,
            body(json!({"query": "espresso extraction", "filters": {"type": "eq", "key": "batch", "value": "one"}})),
        )
        .await
        .unwrap();
    assert_eq!(found.data[0].file_id, ids[1]);
    let error = service.cancel_file_batch(&store.id, &batch.id).await.unwrap_err();
    assert!(error.status_code() == 400 && error.to_string().contains("already completed"), "{error}");

    // files with their own attributes; a missing file names its entry.
    let missing: CreateVectorStoreFileBatch = body(json!({"files": [{"file_id": ids[0]}, {"file_id": "file-nope"}]}));
    let error = service.create_file_batch(&store.id, missing).await.unwrap_err();
    assert_eq!((error.status_code(), error.param()), (404, Some("files[1].file_id")));
    assert_eq!(service.file_batch(&store.id, "vsfb_nope").await.unwrap_err().status_code(), 404);
    let error = service.list_file_batch_files(&store.id, &batch.id, body(json!({"filter": "done"}))).await.unwrap_err();
    assert_eq!(error.param(), Some("filter"));

    // A batch larger than the files indexed at once: cancelling it leaves the waiting files
    // cancelled, and nothing of a cancelled file is searchable.
    let many = upload(&service, "black-holes.md", 12).await;
    let big = service.create_file_batch(&store.id, body(json!({"file_ids": many}))).await.unwrap();
    let cancelled = service.cancel_file_batch(&store.id, &big.id).await.unwrap();
    assert_eq!(cancelled.status, "cancelled");
    assert_eq!(cancelled.file_counts.in_progress, 0);
    assert!(cancelled.file_counts.cancelled >= 8, "{:?}", cancelled.file_counts);
    wait(&service).await;
    let after = service.file_batch(&store.id, &big.id).await.unwrap();
    assert_eq!(after, cancelled, "a settled batch does not change");
    let completed: Vec<String> = service
        .list_file_batch_files(&store.id, &big.id, body(json!({"filter": "completed", "limit": 100})))
        .await
        .unwrap()
        .data
        .into_iter()
        .map(|file| file.id)
        .collect();
    let hits = service.search(&store.id, body(json!({"query": "event horizon", "max_num_results": 50}))).await.unwrap();
    for hit in &hits.data {
        assert!(!many.contains(&hit.file_id) || completed.contains(&hit.file_id), "{} was cancelled", hit.file_id);
    }
    drop(service);

    // A restart keeps the batches.
    let service = VectorStoreService::open(&root, vec![choice(&backend, &tokenizer)], Vec::new()).await.unwrap();
    assert_eq!(service.file_batch(&store.id, &batch.id).await.unwrap(), done);
    assert_eq!(service.file_batch(&store.id, &big.id).await.unwrap().status, "cancelled");

    // The parsed content of an attached file.
    let content = service.vector_store_file_content(&store.id, &ids[0]).await.unwrap();
    assert_eq!(content.object, "vector_store.file_content.page");
    let text = std::fs::read_to_string(common::fixtures().join("docs").join("tides.md")).unwrap();
    assert_eq!(content.data.len(), 1);
    assert_eq!((content.data[0].kind.as_str(), content.data[0].text.as_str()), ("text", text.as_str()));
    assert_eq!(service.vector_store_file_content(&store.id, "file-nope").await.unwrap_err().status_code(), 404);
    assert_eq!(service.vector_store_file_content("vs_nope", &ids[0]).await.unwrap_err().status_code(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_expire_after_their_days_of_inactivity() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let root = folder.path().join("openai");
    let service = VectorStoreService::open(&root, vec![choice(&backend, &tokenizer)], Vec::new()).await.unwrap();
    let ids = upload(&service, "tides.md", 2).await;
    let policy = json!({"anchor": "last_active_at", "days": 1});
    let store =
        service.create_vector_store(body(json!({"file_ids": [ids[0]], "expires_after": policy}))).await.unwrap();
    assert_eq!(store.expires_after, Some(policy.clone()));
    assert_eq!(store.expires_at, Some(store.last_active_at.unwrap() + 86_400));
    let error = service
        .create_vector_store(body(json!({"expires_after": {"anchor": "last_active_at", "days": 0}})))
        .await
        .unwrap_err();
    assert_eq!(error.param(), Some("expires_after.days"));
    wait(&service).await;
    drop(service);

    // Two days without use (as if): the store is expired.
    let catalog_path = root.join("catalog.json");
    let mut catalog: Value = serde_json::from_slice(&std::fs::read(&catalog_path).unwrap()).unwrap();
    let now = catalog["stores"][&store.id]["object"]["last_active_at"].as_u64().unwrap();
    catalog["stores"][&store.id]["object"]["last_active_at"] = json!(now - 2 * 86_400);
    std::fs::write(&catalog_path, serde_json::to_vec(&catalog).unwrap()).unwrap();
    let service = VectorStoreService::open(&root, vec![choice(&backend, &tokenizer)], Vec::new()).await.unwrap();
    let expired = service.vector_store(&store.id).await.unwrap();
    assert_eq!(expired.status, "expired");
    assert_eq!(expired.expires_at, Some(now - 86_400));
    let error = service.search(&store.id, body(json!({"query": "tides"}))).await.unwrap_err();
    assert!(error.status_code() == 400 && error.to_string().contains("expired"), "{error}");
    let error = service.attach_file(&store.id, body(json!({"file_id": ids[1]}))).await.unwrap_err();
    assert!(error.to_string().contains("expired"), "{error}");
    let error = service.update_vector_store(&store.id, body(json!({"name": "x"}))).await.unwrap_err();
    assert!(error.to_string().contains("expired"), "{error}");
    assert_eq!(service.list_vector_store_files(&store.id, ListQuery::default()).await.unwrap().data.len(), 1);

    // A new policy revives it; null removes the policy.
    let revived = service
        .update_vector_store(&store.id, body(json!({"expires_after": {"anchor": "last_active_at", "days": 3}})))
        .await
        .unwrap();
    assert_eq!(revived.status, "completed");
    assert_eq!(revived.expires_at, Some(revived.last_active_at.unwrap() + 3 * 86_400));
    let found = service.search(&store.id, body(json!({"query": "Why does the sea rise twice a day?"}))).await.unwrap();
    assert_eq!(found.data[0].file_id, ids[0]);
    let forever = service.update_vector_store(&store.id, body(json!({"expires_after": null}))).await.unwrap();
    assert_eq!((forever.expires_after, forever.expires_at), (None, None));
    let error = service
        .update_vector_store(&store.id, body(json!({"expires_after": {"anchor": "now", "days": 3}})))
        .await
        .unwrap_err();
    assert_eq!(error.param(), Some("expires_after.anchor"));
}

/// MiniLM behind a gate: every embedding waits until the test opens it, and the texts embedded
/// are counted (so a test sees how many indexing jobs embedded a file).
struct GatedEmbedder {
    inner: BackendEmbedder,
    gate: tokio::sync::Semaphore,
    calls: AtomicUsize,
    texts: AtomicUsize,
}

impl GatedEmbedder {
    fn open(&self) {
        self.gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }
}

#[async_trait::async_trait]
impl Embed for GatedEmbedder {
    fn model(&self) -> &str {
        self.inner.model()
    }

    fn dimension(&self) -> Option<usize> {
        self.inner.dimension()
    }

    async fn embed(&self, texts: Vec<String>) -> nstream_kb::Result<Vec<Vec<f32>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _permit = self.gate.acquire().await.expect("the gate is never closed");
        self.texts.fetch_add(texts.len(), Ordering::SeqCst);
        self.inner.embed(texts).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_a_file_again_answers_the_attachment_and_indexes_once() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let root = folder.path().join("openai");
    let embedder = Arc::new(GatedEmbedder {
        inner: BackendEmbedder::new(backend.clone(), "minilm"),
        gate: tokio::sync::Semaphore::new(0),
        calls: AtomicUsize::new(0),
        texts: AtomicUsize::new(0),
    });
    let model = EmbeddingChoice::new("minilm", embedder.clone(), Arc::new(tokenizer.clone()));
    let service = VectorStoreService::open(&root, vec![model], Vec::new()).await.unwrap();
    let file = upload(&service, "tides.md", 1).await.remove(0);
    let store = service.create_vector_store(CreateVectorStore::default()).await.unwrap();
    let request = || -> CreateVectorStoreFile { body(json!({"file_id": file, "attributes": {"topic": "science"}})) };

    let first = service.attach_file(&store.id, request()).await.unwrap();
    assert_eq!(first.status, "in_progress");
    // The first attachment's job is embedding (held at the gate) when the others come.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while embedder.calls.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "indexing did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (second, third) =
        tokio::join!(service.attach_file(&store.id, request()), service.attach_file(&store.id, request()));
    for again in [second.unwrap(), third.unwrap()] {
        assert_eq!(again, first, "attaching again answers the attachment in progress");
    }
    let batch =
        service.create_file_batch(&store.id, body(json!({"file_ids": [file], "attributes": {"topic": "science"}})));
    assert_eq!(batch.await.unwrap().file_counts.in_progress, 1);
    embedder.open();
    wait(&service).await;
    let embedded = embedder.texts.load(Ordering::SeqCst);
    let listed = service.list_vector_store_files(&store.id, ListQuery::default()).await.unwrap();
    assert_eq!(listed.data.len(), 1);
    assert_eq!(listed.data[0].status, "completed");
    let results = service.search(&store.id, body(json!({"query": "tides", "max_num_results": 50}))).await.unwrap();
    let mut chunks: Vec<&str> = results.data.iter().map(|hit| hit.content[0].text.as_str()).collect();
    chunks.sort_unstable();
    chunks.dedup();
    assert!(!chunks.is_empty());
    assert_eq!(chunks.len(), results.data.len(), "a chunk is present twice");
    // One job: each chunk was embedded once (a second job would have embedded them all again).
    assert_eq!(embedded, chunks.len(), "texts embedded for {} chunks", chunks.len());

    // Completed: attaching again answers the completed file and indexes nothing.
    let embedded = embedder.texts.load(Ordering::SeqCst);
    let again = service.attach_file(&store.id, request()).await.unwrap();
    assert_eq!((again.status.as_str(), again.created_at), ("completed", first.created_at));
    wait(&service).await;
    assert_eq!(embedder.texts.load(Ordering::SeqCst), embedded);

    // Asking for other attributes or another chunking is refused, naming the field.
    let different: CreateVectorStoreFile = body(json!({"file_id": file, "attributes": {"topic": "cooking"}}));
    let error = service.attach_file(&store.id, different).await.unwrap_err();
    assert_eq!((error.status_code(), error.param()), (400, Some("attributes")), "{error}");
    assert!(error.to_string().contains("already attached"), "{error}");
    let rechunked: CreateVectorStoreFile = body(json!({
        "file_id": file,
        "attributes": {"topic": "science"},
        "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 10}}
    }));
    let error = service.attach_file(&store.id, rechunked).await.unwrap_err();
    assert_eq!(error.param(), Some("chunking_strategy"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_uploaded_with_an_expiry_are_deleted_when_it_passes() {
    let Some((backend, tokenizer)) = common::minilm() else { return };
    let folder = tempfile::tempdir().unwrap();
    let root = folder.path().join("openai");
    let time = Arc::new(AtomicU64::new(1_800_000_000));
    let clock: Clock = {
        let time = time.clone();
        Arc::new(move || time.load(Ordering::SeqCst))
    };
    let open =
        || VectorStoreService::open_with_clock(&root, vec![choice(&backend, &tokenizer)], Vec::new(), clock.clone());
    let service = open().await.unwrap();
    let read = |name: &str| std::fs::read(common::fixtures().join("docs").join(name)).unwrap();

    for (anchor, seconds, field) in [
        (Some("created_at"), Some("60"), "expires_after[seconds]"),
        (Some("created_at"), Some("2592001"), "expires_after[seconds]"),
        (Some("last_active_at"), Some("3600"), "expires_after[anchor]"),
        (None, Some("3600"), "expires_after[anchor]"),
    ] {
        let upload = FileUpload::new("tides.md", "assistants", read("tides.md"))
            .with_expires_after(anchor.map(str::to_string), seconds.map(str::to_string));
        let error = service.create_file(upload).await.unwrap_err();
        assert_eq!((error.status_code(), error.param()), (400, Some(field)), "{error}");
    }
    assert!(service.list_files(ListQuery::default()).await.unwrap().data.is_empty(), "a refused upload was kept");

    let upload = FileUpload::new("tides.md", "assistants", read("tides.md"))
        .with_expires_after(Some("created_at".to_string()), Some("3600".to_string()));
    let expiring = service.create_file(upload).await.unwrap();
    assert_eq!(expiring.expires_at, Some(1_800_000_000 + 3_600));
    let kept = service.create_file(FileUpload::new("espresso.md", "assistants", read("espresso.md"))).await.unwrap();
    assert_eq!(kept.expires_at, None);
    let store = service.create_vector_store(body(json!({"file_ids": [expiring.id, kept.id]}))).await.unwrap();
    wait(&service).await;
    let question =
        || -> SearchVectorStore { body(json!({"query": "Why does the sea rise twice a day?", "max_num_results": 50})) };
    let found = service.search(&store.id, question()).await.unwrap();
    assert_eq!(found.data[0].file_id, expiring.id);

    // A second before its expiry it is still there; at its expiry it is gone, as if deleted.
    time.fetch_add(3_599, Ordering::SeqCst);
    assert_eq!(service.file(&expiring.id).await.unwrap().expires_at, expiring.expires_at);
    time.fetch_add(1, Ordering::SeqCst);
    assert_eq!(service.file(&expiring.id).await.unwrap_err().status_code(), 404);
    assert_eq!(service.file_content(&expiring.id).await.unwrap_err().status_code(), 404);
    let listed: Vec<String> =
        service.list_files(ListQuery::default()).await.unwrap().data.into_iter().map(|file| file.id).collect();
    assert_eq!(listed, std::slice::from_ref(&kept.id));
    let attached: Vec<String> = service
        .list_vector_store_files(&store.id, ListQuery::default())
        .await
        .unwrap()
        .data
        .into_iter()
        .map(|file| file.id)
        .collect();
    assert_eq!(attached, std::slice::from_ref(&kept.id));
    assert_eq!(service.vector_store(&store.id).await.unwrap().file_counts.total, 1);
    let found = service.search(&store.id, question()).await.unwrap();
    assert!(!found.data.is_empty());
    assert!(found.data.iter().all(|hit| hit.file_id == kept.id), "chunks of the expired file remain");
    assert!(!root.join("files").join(&expiring.id).exists(), "the expired upload's bytes remain");
    drop(service);

    // Gone for good: the catalog was saved without it.
    let service = open().await.unwrap();
    assert_eq!(service.file(&expiring.id).await.unwrap_err().status_code(), 404);
    assert_eq!(service.file(&kept.id).await.unwrap().id, kept.id);
}
