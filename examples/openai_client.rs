//! A Rust service calling nstream-server with `async-openai`, the Rust OpenAI client: embeddings
//! and a streamed chat answer, with nothing nstream-specific but the base URL.
//!
//! ```sh
//! nstream up -f examples/quickstart.yaml            # serves http://127.0.0.1:8080/v1
//! OPENAI_BASE_URL=http://127.0.0.1:8080/v1 cargo run -p nstream-e2e --example openai_client
//! ```
//!
//! Settings, from the environment (the names the OpenAI SDKs read):
//! - `OPENAI_BASE_URL`: the server's `/v1` URL (default `http://127.0.0.1:8080/v1`);
//! - `OPENAI_API_KEY`: the key the server was started with (`--api-key`); any value when it has none;
//! - `EMBEDDING_MODEL` and `CHAT_MODEL`: model names (default: the models of quickstart.yaml).
//!
//! In a service of your own, depend on `async-openai` with the features of the APIs you call
//! (`embedding`, `chat-completion`, ...) and its default `rustls` feature for https.
//! tests/tests/openai_client.rs runs [`embed`] and [`chat`] against a real server.

use std::io::Write;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CompletionUsage, CreateChatCompletionRequestArgs,
};
use async_openai::types::embeddings::{CreateEmbeddingRequestArgs, CreateEmbeddingResponse};
use futures_util::StreamExt;

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // Only because this workspace builds reqwest with `rustls-no-provider` (see tests/Cargo.toml):
    // with async-openai's default features, a service leaves this line out.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let config = OpenAIConfig::new()
        .with_api_base(setting("OPENAI_BASE_URL", "http://127.0.0.1:8080/v1"))
        .with_api_key(setting("OPENAI_API_KEY", "unused"));
    let client = Client::with_config(config);
    let mut out = std::io::stdout();
    embed(&client, &setting("EMBEDDING_MODEL", "all-minilm-l6-v2"), &mut out).await?;
    chat(&client, &setting("CHAT_MODEL", "smollm2-135m-instruct"), &mut out).await?;
    Ok(())
}

/// Embeds two sentences (one vector per input, in input order) and prints each vector's length.
pub async fn embed(
    client: &Client<OpenAIConfig>,
    model: &str,
    out: &mut impl Write,
) -> anyhow::Result<CreateEmbeddingResponse> {
    let request = CreateEmbeddingRequestArgs::default()
        .model(model)
        .input(["The cat sits on the mat.", "A cat is sitting on a rug."])
        .build()?;
    let response = client.embeddings().create(request).await?;
    for item in &response.data {
        writeln!(out, "embedding {}: {} dimensions", item.index, item.embedding.len())?;
    }
    writeln!(out, "embedding usage: {} prompt tokens", response.usage.prompt_tokens)?;
    Ok(response)
}

/// Asks a question with the answer streamed, printing the text as it arrives; returns the text
/// and the token counts, which the server sends in a last chunk when `include_usage` is set.
pub async fn chat(
    client: &Client<OpenAIConfig>,
    model: &str,
    out: &mut impl Write,
) -> anyhow::Result<(String, Option<CompletionUsage>)> {
    let request = CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages([ChatCompletionRequestUserMessageArgs::default().content("Name three fruits.").build()?.into()])
        .max_completion_tokens(16_u32)
        .temperature(0.0)
        .stream_options(ChatCompletionStreamOptions { include_usage: Some(true), include_obfuscation: None })
        .build()?;
    let mut stream = client.chat().create_stream(request).await?;
    let (mut text, mut usage) = (String::new(), None);
    write!(out, "chat: ")?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        for choice in &chunk.choices {
            if let Some(delta) = &choice.delta.content {
                write!(out, "{delta}")?;
                text.push_str(delta);
            }
            if let Some(reason) = choice.finish_reason {
                write!(out, " [finish: {reason:?}]")?;
            }
        }
        out.flush()?;
        if let Some(counts) = chunk.usage {
            writeln!(
                out,
                "\nchat usage: {} prompt + {} completion tokens",
                counts.prompt_tokens, counts.completion_tokens
            )?;
            usage = Some(counts);
        }
    }
    Ok((text, usage))
}
