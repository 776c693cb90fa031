//! A model of your own behind the `ModelBackend` trait.
//!
//! `LetterCounts` embeds a text as its normalised a-z letter histogram: a toy, but a complete
//! backend. It implements only `describe` and `embed` (every other capability answers
//! `Unsupported`), refuses pre-tokenised input with an error naming the field, and is called the
//! way the server calls it: `validate()` first, then the trait method on an
//! `Arc<dyn ModelBackend>`. Registering the same value with `nstream_server::app` serves it over
//! HTTP (see `crates/nstream-server/examples/mount_in_axum.rs`).
//!
//! `cargo run -p nstream-backend --example custom_backend -- "first text" "second text"`

use std::sync::Arc;

use async_trait::async_trait;
use nstream_backend::embedding::EmbeddingUsage;
use nstream_backend::{
    BackendError, ChatCompletionRequest, EmbeddingRequest, EmbeddingResponse, Input, InputItem, ModelBackend,
    ModelDescription,
};

/// Number of dimensions: one per ASCII letter.
const LETTERS: usize = 26;

/// Embeds texts as L2-normalised letter histograms.
struct LetterCounts;

#[async_trait]
impl ModelBackend for LetterCounts {
    fn describe(&self) -> ModelDescription {
        ModelDescription::embedding("letter-counts", LETTERS as u32).with_normalized_embeddings(true)
    }

    async fn embed(&self, request: EmbeddingRequest) -> nstream_backend::Result<EmbeddingResponse> {
        let mut vectors = Vec::new();
        let mut tokens = 0u32;
        for (index, item) in request.input.items().into_iter().enumerate() {
            let InputItem::Text(text) = item else {
                // A model-dependent check, so it is the backend's to make (see the trait's contract).
                return Err(BackendError::invalid_param(
                    format!("input[{index}]"),
                    "letter-counts embeds text only, not token ids",
                ));
            };
            let mut counts = vec![0f32; LETTERS];
            for letter in text.chars().filter(char::is_ascii_alphabetic) {
                counts[usize::from(letter.to_ascii_lowercase() as u8 - b'a')] += 1.0;
            }
            let norm = counts.iter().map(|count| count * count).sum::<f32>().sqrt().max(f32::EPSILON);
            counts.iter_mut().for_each(|count| *count /= norm);
            tokens += u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX);
            vectors.push(counts);
        }
        Ok(EmbeddingResponse::from_vectors(request.model, vectors, EmbeddingUsage::new(tokens)))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut texts: Vec<String> = std::env::args().skip(1).collect();
    if texts.is_empty() {
        texts = vec!["listen to the rain".to_owned(), "silent train".to_owned()];
    }
    let backend: Arc<dyn ModelBackend> = Arc::new(LetterCounts);
    println!("{}", serde_json::to_string(&backend.describe())?);

    let request = EmbeddingRequest::new("letter-counts", Input::TextBatch(texts.clone()));
    request.validate()?;
    let response = backend.embed(request).await?;
    let vectors: Vec<&[f32]> = response.data.iter().map(|embedding| embedding.embedding.as_slice()).collect();
    if let [first, second, ..] = vectors.as_slice() {
        let cosine: f32 = first.iter().zip(*second).map(|(a, b)| a * b).sum();
        println!("cosine({:?}, {:?}) = {cosine:.3}", texts[0], texts[1]);
    }
    println!("{} vectors of {} floats, {} tokens", vectors.len(), LETTERS, response.usage.prompt_tokens);

    // What the backend did not implement answers a typed error the server maps to HTTP 400/404/501.
    let unsupported = backend.chat(ChatCompletionRequest::new("letter-counts", vec![])).await.unwrap_err();
    println!("chat: {} (HTTP {})", unsupported, unsupported.status_code());
    let tokens = EmbeddingRequest::new("letter-counts", Input::Tokens(vec![101, 102]));
    let refused = backend.embed(tokens).await.unwrap_err();
    println!("token input: {refused} (param {:?})", refused.param());
    Ok(())
}
