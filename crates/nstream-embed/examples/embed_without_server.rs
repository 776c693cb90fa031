//! An embedding model inside another Rust program, without the HTTP server.
//!
//! Loads all-MiniLM-L6-v2 from the offline Hugging Face cache (`scripts/offline-models.sh`),
//! embeds a query and two documents, and ranks the documents by cosine similarity (the vectors
//! are normalised, so a dot product is the cosine).
//!
//! `cargo run -p nstream-embed --example embed_without_server`

use nstream_embed::{EmbedInput, EmbedOptions, EmbeddingBackend};
use nstream_hub::{Hub, ModelSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hub = Hub::from_env().with_offline(true);
    let source = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
    // Small batches and a short queue suit a program that embeds a few texts at a time.
    let options = EmbedOptions::default().with_max_batch_requests(8).with_queue_capacity(16);
    let backend = EmbeddingBackend::load_with("minilm", &hub, &source, options, None)?;
    println!("loaded {} ({} dimensions)", backend.name(), backend.info().dimension);

    let texts = ["How do I bake bread?", "Knead the dough, let it rise, bake at 220 °C.", "Kubernetes schedules pods."];
    let inputs = texts.iter().map(|text| EmbedInput::Text((*text).to_string())).collect();
    // `embed` is async (the model runs on its own worker thread); any runtime drives it.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let output = runtime.block_on(backend.embed(inputs, true))?;

    let query = &output.embeddings[0];
    for (text, vector) in texts.iter().zip(&output.embeddings).skip(1) {
        let cosine: f32 = query.iter().zip(vector).map(|(left, right)| left * right).sum();
        println!("{cosine:.3}  {text}");
    }
    Ok(())
}
