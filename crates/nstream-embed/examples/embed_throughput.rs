//! Embeds the fixture corpus with all-MiniLM-L6-v2 from the offline cache and prints sentences/s.
//!
//! `cargo run --release -p nstream-embed --example embed_throughput -- [rounds] [max_batch_tokens] [max_batch_requests]`
//! Compare with `scripts/reference-embeddings.py --bench` on the same machine, in the same run.

use std::path::Path;
use std::time::Instant;

use nstream_embed::{EmbedInput, EmbedOptions, EmbeddingBackend};
use nstream_hub::{Hub, ModelSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rounds = args.first().copied().unwrap_or(3);
    let defaults = EmbedOptions::default();
    let options = EmbedOptions::default()
        .with_max_batch_tokens(args.get(1).copied().unwrap_or(defaults.max_batch_tokens))
        .with_max_batch_requests(args.get(2).copied().unwrap_or(defaults.max_batch_requests));
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/embeddings/corpus.jsonl");
    let texts: Vec<EmbedInput> = std::fs::read_to_string(corpus)?
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .map(|v| EmbedInput::Text(v["text"].as_str().unwrap_or("").to_owned()))
        })
        .collect::<Result<_, _>>()?;
    let hub = Hub::from_env().with_offline(true);
    let source = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
    let backend = EmbeddingBackend::load_with("minilm", &hub, &source, options.clone(), None)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(backend.embed(texts[..32].to_vec(), true))?;
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let started = Instant::now();
        runtime.block_on(backend.embed(texts.clone(), true))?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    let metrics = backend.metrics().snapshot();
    println!(
        "{{\"engine\":\"nstream-embed\",\"sentences\":{},\"max_batch_tokens\":{},\"max_batch_requests\":{},\"best_seconds\":{:.4},\"sentences_per_second\":{:.1},\"padding_overhead\":{:.3}}}",
        texts.len(),
        options.max_batch_tokens,
        options.max_batch_requests,
        best,
        texts.len() as f64 / best,
        metrics.padded_tokens_total as f64 / metrics.tokens_total.max(1) as f64
    );
    Ok(())
}
