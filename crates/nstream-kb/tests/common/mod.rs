//! Shared by the knowledge-base tests: all-MiniLM-L6-v2 from the offline cache, the labelled
//! retrieval set, and the PostgreSQL server that scripts/pg-test-server.sh starts.

#![allow(dead_code, reason = "each test file uses part of the helpers")]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nstream_core::{Chunking, Splitting};
use nstream_embed::{EmbedOptions, EmbeddingBackend};
use nstream_hub::{Hub, ModelSource};
use nstream_kb::{BackendEmbedder, Chunker, Collection, JsonlOptions, SourceDocument, Store};

pub const REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// The model's backend and tokenizer, or `None` (with SKIPPED printed) without the cache.
pub fn minilm() -> Option<(Arc<EmbeddingBackend>, tokenizers::Tokenizer)> {
    let hub = Hub::from_env().with_offline(true).with_progress(false);
    let source = ModelSource::new(REPO);
    if hub.list_cached_files(&source).map(|files| files.is_empty()).unwrap_or(true) {
        eprintln!("SKIPPED: {REPO} is not in the hub cache; run scripts/offline-models.sh");
        return None;
    }
    let backend = EmbeddingBackend::load_with("minilm", &hub, &source, EmbedOptions::default(), None).expect("loads");
    let tokenizer = nstream_kb::load_tokenizer(&hub.resolve_file(&source, "tokenizer.json").expect("tokenizer"))
        .expect("tokenizer loads");
    Some((backend, tokenizer))
}

/// A collection over `store` embedding with MiniLM.
pub async fn collection(
    backend: &Arc<EmbeddingBackend>,
    tokenizer: &tokenizers::Tokenizer,
    store: Arc<dyn Store>,
    max_tokens: u32,
) -> Collection {
    let chunking = Chunking { max_tokens, overlap_tokens: max_tokens / 8, splitting: Splitting::Auto };
    let chunker = Chunker::new(Arc::new(tokenizer.clone()), &chunking);
    let embedder = Arc::new(BackendEmbedder::new(backend.clone(), "minilm"));
    Collection::open("test", chunker, embedder, store).await.expect("opens")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kb")
}

/// The markdown passages, with their file names as ids.
pub fn passages() -> Vec<SourceDocument> {
    let (files, problems) = nstream_kb::source::collect_files(&[fixtures().join("docs")]);
    assert!(problems.is_empty(), "{problems:?}");
    files
        .iter()
        .flat_map(|file| {
            let id = file.file_name().unwrap().to_string_lossy().to_string();
            nstream_kb::source::read_file(file, &id, &JsonlOptions::default()).expect("reads").documents
        })
        .collect()
}

/// (question, answering document id, topic).
pub fn questions() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(fixtures().join("questions.jsonl")).expect("questions");
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("json");
            let field = |name: &str| value[name].as_str().expect("field").to_string();
            (field("question"), field("document"), field("topic"))
        })
        .collect()
}

/// The test server's URL, from scripts/pg-test-server.sh; `None` prints SKIPPED, unless
/// NSTREAM_REQUIRE_PG is set (scripts/test.sh sets it), where a missing server fails the test.
pub fn postgres_url() -> Option<String> {
    match std::env::var("NSTREAM_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("NSTREAM_REQUIRE_PG").is_none(),
                "NSTREAM_REQUIRE_PG is set but NSTREAM_TEST_PG_URL is not: start scripts/pg-test-server.sh"
            );
            eprintln!("SKIPPED: NSTREAM_TEST_PG_URL is unset; run `eval \"$(scripts/pg-test-server.sh start)\"`");
            None
        }
    }
}

/// A table name no other test uses.
pub fn unique_table(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}
