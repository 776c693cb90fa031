//! A knowledge base inside another Rust program: index documents, then search them.
//!
//! Chunks three small documents with all-MiniLM-L6-v2's tokenizer, embeds them with the model
//! itself (both from the offline Hugging Face cache, `scripts/offline-models.sh`), stores them in
//! an embedded HNSW store (LMDB) in a temporary folder, and runs two searches, the second with a
//! metadata filter. A PostgreSQL + pgvector store ([`nstream_kb::PostgresStore`]) plugs in the
//! same way.
//!
//! `cargo run -p nstream-kb --example index_and_search -- "how do pods restart?"`

use std::sync::Arc;

use nstream_core::{Chunking, Splitting};
use nstream_embed::{EmbedOptions, EmbeddingBackend};
use nstream_hub::{Hub, ModelSource};
use nstream_kb::{
    BackendEmbedder, Chunker, Collection, EmbeddedStore, Filter, Format, SearchRequest, SourceDocument, Store,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let query = std::env::args().nth(1).unwrap_or_else(|| "how do pods restart?".to_string());
    let hub = Hub::from_env().with_offline(true);
    let source = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
    // Loading reads files (and the hub client blocks), so it runs off the async threads.
    let (backend, tokenizer) =
        tokio::task::spawn_blocking(move || -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let backend = EmbeddingBackend::load_with("minilm", &hub, &source, EmbedOptions::default(), None)?;
            let tokenizer = nstream_kb::load_tokenizer(&hub.resolve_file(&source, "tokenizer.json")?)?;
            Ok((backend, tokenizer))
        })
        .await?
        .map_err(|error| error.to_string())?;

    // Chunks of at most 64 tokens with 8 of overlap, split on the documents' structure.
    let chunking = Chunking { max_tokens: 64, overlap_tokens: 8, splitting: Splitting::Auto };
    let chunker = Chunker::new(Arc::new(tokenizer), &chunking);
    let embedder = Arc::new(BackendEmbedder::new(backend, "minilm"));
    let folder = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&folder.path().join("kb"))?);
    let collection = Collection::open("handbook", chunker, embedder, store).await?;

    let documents = vec![
        SourceDocument::new(
            "pods.md",
            "# Pods\n\nA pod whose container exits is restarted by the kubelet, with a back-off.",
            Format::Markdown,
        )
        .with_metadata("team", "platform"),
        SourceDocument::new("bread.txt", "Knead the dough, let it rise for an hour, bake at 220 °C.", Format::Text)
            .with_metadata("team", "kitchen"),
        SourceDocument::new(
            "services.md",
            "# Services\n\nA Service gives a set of pods one stable address and load-balances across them.",
            Format::Markdown,
        )
        .with_metadata("team", "platform"),
    ];
    let report = collection.index(documents, &mut |_| {}).await?;
    println!("indexed {} documents into {} chunks", report.indexed, report.chunks);

    for (label, request) in [
        ("all teams", SearchRequest::new(&query).with_max_results(2)),
        ("team = kitchen", SearchRequest::new(&query).with_max_results(2).with_filter(Filter::eq("team", "kitchen"))),
    ] {
        println!("{query:?} ({label}):");
        for hit in collection.search(&request).await? {
            println!("  {:.3}  {}  {}", hit.score, hit.document_id, hit.text.replace('\n', " "));
        }
    }
    Ok(())
}
