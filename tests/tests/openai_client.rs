//! `async-openai`, the Rust OpenAI client, against the real nstream-server (examples/quickstart.yaml,
//! offline MiniLM and SmolLM2 GGUF): the Rust twin of tests/python/test_openai_client.py. Every
//! answer goes through the client's own types, so a field nstream-server leaves out or shapes
//! differently from OpenAI fails here as it would in a Rust service calling us.
//!
//! The example a Rust service would copy, examples/openai_client.rs, is compiled in and run too.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, FinishReason, Prompt,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::types::embeddings::{CreateEmbeddingRequestArgs, EmbeddingInput, EncodingFormat};
use base64::Engine;
use futures_util::StreamExt;
use nstream_e2e::{CHAT_MODEL, DIMENSION, EMBEDDING_MODEL, Server, http_client};

/// The example, compiled into this test so that its code runs here as a service would run it
/// (its `main`, which reads the environment, is left unused).
#[allow(dead_code)]
#[path = "../../examples/openai_client.rs"]
mod example;

/// The generation limit of every chat and completion request: enough to see text, quick on CPU.
const MAX_TOKENS: u32 = 8;
const API_KEY: &str = "sk-rust-e2e";

/// An async-openai client for `server`, sending `api_key`.
fn client(server: &Server, api_key: &str) -> Client<OpenAIConfig> {
    let config = OpenAIConfig::new().with_api_base(server.url("/v1")).with_api_key(api_key);
    Client::build(http_client().expect("an HTTP client"), config)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The status and error body of a failed call, which must be async-openai's `ApiError`.
fn api_error<T: std::fmt::Debug>(result: Result<T, OpenAIError>) -> (u16, async_openai::error::ApiError) {
    match result {
        Err(OpenAIError::ApiError(response)) => (response.status_code.as_u16(), response.api_error),
        other => panic!("expected an ApiError, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_single_and_batched() {
    let server = Server::start(&[]).await.expect("the server starts");
    let client = client(&server, "unused");
    let embeddings = client.embeddings();

    let text = "The quick brown fox jumps over the lazy dog.";
    let request = CreateEmbeddingRequestArgs::default().model(EMBEDDING_MODEL).input(text).build().expect("request");
    let single = embeddings.create(request).await.expect("one embedding");
    assert_eq!(single.object, "list");
    assert_eq!(single.model, EMBEDDING_MODEL);
    assert_eq!(single.data.len(), 1);
    assert_eq!(single.data[0].object, "embedding");
    assert_eq!(single.data[0].embedding.len(), DIMENSION);
    assert!(single.usage.prompt_tokens > 0);
    assert_eq!(single.usage.total_tokens, single.usage.prompt_tokens);

    // A batch: the same text twice and two others; order kept, identical inputs identical vectors.
    let texts = [text, "The cat sits on the mat.", text, "Interest rates rose by half a point."];
    let request = CreateEmbeddingRequestArgs::default()
        .model(EMBEDDING_MODEL)
        .input(EmbeddingInput::StringArray(texts.map(str::to_owned).to_vec()))
        .dimensions(DIMENSION as u32)
        .build()
        .expect("request");
    let batch = embeddings.create(request).await.expect("a batch of embeddings");
    assert_eq!(batch.data.iter().map(|item| item.index).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(batch.data.iter().all(|item| item.embedding.len() == DIMENSION));
    let vector = |index: usize| batch.data[index].embedding.as_slice();
    assert!(cosine(vector(0), vector(2)) > 0.9999, "identical inputs: {}", cosine(vector(0), vector(2)));
    assert!(cosine(vector(0), &single.data[0].embedding) > 0.9999, "alone and in a batch");
    assert!(cosine(vector(0), vector(3)) < 0.9, "unrelated inputs: {}", cosine(vector(0), vector(3)));
    assert!(batch.usage.prompt_tokens > 2 * single.usage.prompt_tokens);

    // base64 (what the Python SDK asks for by default): little-endian f32s equal to the floats.
    let request = CreateEmbeddingRequestArgs::default()
        .model(EMBEDDING_MODEL)
        .input(text)
        .encoding_format(EncodingFormat::Base64)
        .build()
        .expect("request");
    let encoded = embeddings.create_base64(request).await.expect("a base64 embedding");
    let bytes = base64::engine::general_purpose::STANDARD.decode(&encoded.data[0].embedding.0).expect("base64");
    let decoded: Vec<f32> =
        bytes.chunks_exact(4).map(|word| f32::from_le_bytes(word.try_into().expect("four bytes"))).collect();
    assert_eq!(decoded, single.data[0].embedding);

    // Asking for a length the model does not have names the field.
    let request = CreateEmbeddingRequestArgs::default()
        .model(EMBEDDING_MODEL)
        .input("x")
        .dimensions(DIMENSION as u32 + 1)
        .build()
        .expect("request");
    let (status, error) = api_error(embeddings.create(request).await);
    assert_eq!(status, 400, "{error:?}");
    assert_eq!(error.param.as_deref(), Some("dimensions"), "{error:?}");
    assert_eq!(error.r#type.as_deref(), Some("invalid_request_error"), "{error:?}");
}

fn chat_request(stream: bool) -> CreateChatCompletionRequest {
    let mut request = CreateChatCompletionRequestArgs::default();
    request
        .model(CHAT_MODEL)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Name three fruits.")
            .build()
            .expect("message")
            .into()])
        .max_completion_tokens(MAX_TOKENS)
        .temperature(0.0);
    if stream {
        request.stream_options(ChatCompletionStreamOptions { include_usage: Some(true), include_obfuscation: None });
    }
    request.build().expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_whole_and_streamed_and_completions() {
    let server = Server::start(&[]).await.expect("the server starts");
    let client = client(&server, "unused");

    let whole = client.chat().create(chat_request(false)).await.expect("a chat answer");
    assert!(whole.id.starts_with("chatcmpl-"), "{whole:?}");
    assert_eq!(whole.object, "chat.completion");
    assert_eq!(whole.model, CHAT_MODEL);
    assert_eq!(whole.choices.len(), 1);
    let choice = &whole.choices[0];
    let answer = choice.message.content.clone().expect("content");
    assert!(!answer.trim().is_empty(), "{whole:?}");
    let usage = whole.usage.clone().expect("usage");
    assert!(usage.prompt_tokens > 0 && (1..=MAX_TOKENS).contains(&usage.completion_tokens), "{usage:?}");
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
    let finish = choice.finish_reason.expect("finish_reason");
    // Cut at the limit is `length`; an answer that ended by itself within it is `stop`.
    match finish {
        FinishReason::Length => assert_eq!(usage.completion_tokens, MAX_TOKENS),
        FinishReason::Stop => {}
        other => panic!("finish_reason {other:?}"),
    }

    // Streamed: one id, text deltas that assemble into the same (greedy) answer, the finish
    // reason on the last content chunk, and a final usage chunk with no choices.
    let mut stream = client.chat().create_stream(chat_request(true)).await.expect("a stream");
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.expect("each chunk parses"));
    }
    assert!(chunks.len() >= 2, "{chunks:?}");
    assert!(chunks.iter().all(|chunk| chunk.id == chunks[0].id && chunk.object == "chat.completion.chunk"));
    let text: String =
        chunks.iter().flat_map(|chunk| &chunk.choices).filter_map(|choice| choice.delta.content.as_deref()).collect();
    assert_eq!(text, answer);
    let reasons: Vec<FinishReason> =
        chunks.iter().flat_map(|chunk| &chunk.choices).filter_map(|choice| choice.finish_reason).collect();
    assert_eq!(reasons, [finish], "{chunks:?}");
    let last = chunks.last().expect("chunks");
    assert!(last.choices.is_empty(), "the usage chunk has no choices: {last:?}");
    assert_eq!(last.usage.as_ref(), Some(&usage), "the usage chunk counts what the whole answer counts");
    assert!(chunks[..chunks.len() - 1].iter().all(|chunk| chunk.usage.is_none()));

    // Legacy completions: a prompt continued, counted, finished.
    let request = CreateCompletionRequestArgs::default()
        .model(CHAT_MODEL)
        .prompt(Prompt::String("The capital of France is".to_owned()))
        .max_tokens(MAX_TOKENS)
        .temperature(0.0)
        .build()
        .expect("request");
    let completion = client.completions().create(request).await.expect("a completion");
    assert_eq!(completion.object, "text_completion");
    assert_eq!(completion.model, CHAT_MODEL);
    assert_eq!(completion.choices.len(), 1);
    assert!(!completion.choices[0].text.is_empty(), "{completion:?}");
    assert!(completion.choices[0].finish_reason.is_some(), "{completion:?}");
    let usage = completion.usage.expect("usage");
    assert!((1..=MAX_TOKENS).contains(&usage.completion_tokens), "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_errors() {
    let server = Server::start(&[]).await.expect("the server starts");
    let client = client(&server, "unused");

    let models = client.models().list().await.expect("the model list");
    assert_eq!(models.object, "list");
    // The quickstart file's models, in file order.
    let ids: Vec<&str> = models.data.iter().map(|model| model.id.as_str()).collect();
    assert_eq!(ids, [EMBEDDING_MODEL, CHAT_MODEL]);
    assert!(models.data.iter().all(|model| model.object == "model" && !model.owned_by.is_empty()));
    let model = client.models().retrieve(CHAT_MODEL).await.expect("one model");
    assert_eq!(model.id, CHAT_MODEL);

    // An unknown model is OpenAI's 404, for every API.
    let request =
        CreateEmbeddingRequestArgs::default().model("text-embedding-3-small").input("a").build().expect("request");
    let (status, error) = api_error(client.embeddings().create(request).await);
    assert_eq!(status, 404, "{error:?}");
    assert_eq!(error.code.as_deref(), Some("model_not_found"), "{error:?}");
    assert_eq!(error.param.as_deref(), Some("model"), "{error:?}");
    assert!(error.message.contains("text-embedding-3-small"), "{error:?}");
    let mut request = chat_request(false);
    request.model = "gpt-4o".to_owned();
    let (status, error) = api_error(client.chat().create(request).await);
    assert_eq!((status, error.code.as_deref()), (404, Some("model_not_found")), "{error:?}");
    let (status, error) = api_error(client.models().retrieve("gpt-4o").await);
    assert_eq!(status, 404, "{error:?}");

    // A request the server refuses before streaming: the client's stream call fails with it.
    let mut request = chat_request(true);
    request.model = "gpt-4o".to_owned();
    let (status, _) = api_error(client.chat().create_stream(request).await.map(|_| ()));
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_and_the_example() {
    let server = Server::start(&["--api-key", API_KEY]).await.expect("the server starts");

    let request = CreateEmbeddingRequestArgs::default().model(EMBEDDING_MODEL).input("a").build().expect("request");
    let (status, error) = api_error(client(&server, "sk-wrong").embeddings().create(request.clone()).await);
    assert_eq!(status, 401, "{error:?}");
    assert_eq!(error.code.as_deref(), Some("invalid_api_key"), "{error:?}");
    assert!(!error.message.contains(API_KEY), "{error:?}");
    let answer = client(&server, API_KEY).embeddings().create(request).await.expect("the right key");
    assert_eq!(answer.data[0].embedding.len(), DIMENSION);

    // examples/openai_client.rs, with a client that sends the key.
    let client = client(&server, API_KEY);
    let mut printed = Vec::new();
    let embeddings = example::embed(&client, EMBEDDING_MODEL, &mut printed).await.expect("the example embeds");
    assert_eq!(embeddings.data.len(), 2);
    assert!(embeddings.data.iter().all(|item| item.embedding.len() == DIMENSION));
    let (text, usage) = example::chat(&client, CHAT_MODEL, &mut printed).await.expect("the example chats");
    let usage = usage.expect("the usage chunk");
    assert!(!text.is_empty() && usage.completion_tokens > 0, "{text:?} {usage:?}");
    let printed = String::from_utf8(printed).expect("UTF-8");
    assert!(printed.contains(&format!("embedding 1: {DIMENSION} dimensions")), "{printed}");
    assert!(printed.contains(&format!("chat: {text}")), "{printed}");
    assert!(!server.logs().contains(API_KEY), "the key must not be logged");
}
