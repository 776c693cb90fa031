//! Route handlers: the OpenAI-compatible `/v1/*` surface and the operational routes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::stream::BoxStream;
use nstream_backend::chat::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse};
use nstream_backend::completion::{CompletionChunk, CompletionRequest, CompletionResponse};
use nstream_backend::embedding::{EmbeddingRequest, EmbeddingUsage, EncodingFormat};
use nstream_backend::{Capability, Health, ModelBackend, ModelDescription, ModelKind, StreamOptions, Usage};
use serde::Serialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::metrics::{OPENMETRICS_CONTENT_TYPE, TokenKind};
use crate::state::AppState;
use crate::stream::{StreamEnds, StreamMetrics, StreamedChunk, sse_response};

/// The model a request was routed to, put in the response extensions for the metrics layer.
/// Only registered names end up there, so label cardinality stays bounded.
#[derive(Debug, Clone)]
pub(crate) struct ModelLabel(pub(crate) String);

/// Attaches the model label to whatever the handler answered.
fn labelled(model: Option<String>, result: Result<Response, ApiError>) -> Response {
    let mut response = result.into_response();
    if let Some(model) = model {
        response.extensions_mut().insert(ModelLabel(model));
    }
    response
}

/// The backend serving `name`, when the caller may use it; a model the caller's key may not
/// use is answered exactly like one that does not exist.
fn find_model(state: &AppState, caller: &Caller, name: &str) -> Result<Arc<dyn ModelBackend>, ApiError> {
    if !caller.allows_model(name) {
        return Err(ApiError::model_not_found(name));
    }
    state.models().get(name).ok_or_else(|| ApiError::model_not_found(name))
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    OpenAiJson(request): OpenAiJson<EmbeddingRequest>,
) -> Response {
    let model = state.models().get(&request.model).map(|_| request.model.clone());
    labelled(model, embed(&state, &caller, request).await)
}

async fn embed(state: &AppState, caller: &Caller, request: EmbeddingRequest) -> Result<Response, ApiError> {
    let backend = find_model(state, caller, &request.model)?;
    request.validate()?;
    let input_count = request.input.len();
    let limit = state.config().max_embedding_inputs;
    if input_count > limit {
        return Err(ApiError::bad_request(
            format!("Too many inputs: {input_count} in one request, at most {limit} are allowed; split the request"),
            Some("input".to_owned()),
        ));
    }
    let description = backend.describe();
    if let (Some(requested), Some(model_dimension)) = (request.dimensions, description.embedding_dimension)
        && requested > model_dimension
    {
        return Err(ApiError::bad_request(
            format!(
                "`dimensions` is {requested} but model `{}` produces {model_dimension}-dimensional embeddings",
                request.model
            ),
            Some("dimensions".to_owned()),
        ));
    }
    let encoding = request.encoding_format.unwrap_or_default();
    let dimensions = request.dimensions;
    let model_name = request.model.clone();
    let response = backend.embed(request).await?;
    caller.settle_tokens(response.usage.total_tokens);

    let metrics = state.metrics();
    metrics.record_embedding_inputs(&model_name, response.data.len() as u64);
    metrics.record_tokens(&model_name, TokenKind::Prompt, response.usage.prompt_tokens);

    let data = response
        .data
        .into_iter()
        .map(|item| {
            let mut vector = item.embedding;
            if let Some(dimensions) = dimensions {
                shorten(&mut vector, dimensions as usize, description.embeddings_normalized);
            }
            WireEmbedding { object: "embedding", index: item.index, embedding: encode_vector(vector, encoding) }
        })
        .collect();
    Ok(Json(WireEmbeddingResponse { object: "list", data, model: response.model, usage: response.usage })
        .into_response())
}

/// Matryoshka truncation: keep the leading `dimensions` values and, when the model's vectors are
/// unit length, rescale so they stay unit length (cosine and dot product then agree again).
fn shorten(vector: &mut Vec<f32>, dimensions: usize, normalized: bool) {
    if vector.len() <= dimensions {
        return;
    }
    vector.truncate(dimensions);
    if normalized {
        let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
        if norm > 0.0 {
            vector.iter_mut().for_each(|value| *value /= norm);
        }
    }
}

/// OpenAI's base64 form: the little-endian bytes of the `f32`s.
fn encode_vector(vector: Vec<f32>, encoding: EncodingFormat) -> WireVector {
    match encoding {
        EncodingFormat::Float => WireVector::Float(vector),
        EncodingFormat::Base64 => {
            let bytes: Vec<u8> = vector.iter().flat_map(|value| value.to_le_bytes()).collect();
            WireVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

#[derive(Serialize)]
struct WireEmbeddingResponse {
    object: &'static str,
    data: Vec<WireEmbedding>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct WireEmbedding {
    object: &'static str,
    index: u32,
    embedding: WireVector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WireVector {
    Float(Vec<f32>),
    Base64(String),
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    OpenAiJson(request): OpenAiJson<ChatCompletionRequest>,
) -> Response {
    let model = state.models().get(&request.model).map(|_| request.model.clone());
    labelled(model, generate(&state, caller, request).await)
}

/// `POST /v1/completions`.
pub(crate) async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    OpenAiJson(request): OpenAiJson<CompletionRequest>,
) -> Response {
    let model = state.models().get(&request.model).map(|_| request.model.clone());
    labelled(model, generate(&state, caller, request).await)
}

/// What the chat and completion endpoints share, so that one handler serves both: a request that
/// names its model, checks itself, and is answered whole or as a stream of chunks.
trait GenerationRequest: Send + Sized + 'static {
    /// The whole answer.
    type Response: Serialize + Send;
    /// One streamed chunk.
    type Chunk: StreamedChunk;
    /// The route that serves it (the metrics' `route` label).
    const ROUTE: &'static str;
    /// The model asked for.
    fn model(&self) -> &str;
    /// The request's own checks.
    fn validate(&self) -> nstream_backend::Result<()>;
    /// Whether the client asked for a stream, and whether for usage in it.
    fn stream(&self) -> (bool, bool);
    /// Asks for usage in the stream.
    fn ask_for_usage(&mut self);
    /// The usage of a whole answer.
    fn usage(response: &Self::Response) -> Option<Usage>;
    /// The backend's whole answer.
    fn answer(
        self,
        backend: Arc<dyn ModelBackend>,
    ) -> impl Future<Output = nstream_backend::Result<Self::Response>> + Send;
    /// The backend's stream.
    fn answer_stream(
        self,
        backend: Arc<dyn ModelBackend>,
    ) -> impl Future<Output = nstream_backend::Result<BoxStream<'static, nstream_backend::Result<Self::Chunk>>>> + Send;
}

macro_rules! generation_request {
    ($($route:literal: $request:ty => $response:ty, $chunk:ty, $answer:ident, $answer_stream:ident;)*) => {$(
        impl GenerationRequest for $request {
            type Response = $response;
            type Chunk = $chunk;
            const ROUTE: &'static str = $route;
            fn model(&self) -> &str {
                &self.model
            }
            fn validate(&self) -> nstream_backend::Result<()> {
                <$request>::validate(self)
            }
            fn stream(&self) -> (bool, bool) {
                (self.stream, self.include_usage())
            }
            fn ask_for_usage(&mut self) {
                self.stream_options = Some(StreamOptions { include_usage: true });
            }
            fn usage(response: &Self::Response) -> Option<Usage> {
                response.usage
            }
            async fn answer(self, backend: Arc<dyn ModelBackend>) -> nstream_backend::Result<Self::Response> {
                backend.$answer(self).await
            }
            async fn answer_stream(
                self,
                backend: Arc<dyn ModelBackend>,
            ) -> nstream_backend::Result<BoxStream<'static, nstream_backend::Result<Self::Chunk>>> {
                backend.$answer_stream(self).await
            }
        }
    )*};
}

generation_request! {
    "/v1/chat/completions": ChatCompletionRequest => ChatCompletionResponse, ChatCompletionChunk, chat, chat_stream;
    "/v1/completions": CompletionRequest => CompletionResponse, CompletionChunk, complete, complete_stream;
}

/// Answers a chat or completion request: whole (its usage recorded), or as server-sent events.
async fn generate<R: GenerationRequest>(
    state: &AppState,
    caller: Caller,
    mut request: R,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let backend = find_model(state, &caller, request.model())?;
    request.validate()?;
    let model_name = request.model().to_owned();
    let (stream, client_wants_usage) = request.stream();
    if stream {
        // Always ask for usage so token metrics are complete; it is stripped again below when
        // the client did not ask for it.
        request.ask_for_usage();
        let stream = request.answer_stream(backend).await?;
        let labels =
            StreamMetrics { metrics: state.metrics().clone(), route: R::ROUTE, model: model_name, started, caller };
        let deadline =
            state.config().stream_deadline.map(|limit| (tokio::time::Instant::from_std(started) + limit, limit));
        let ends = StreamEnds { deadline, shutdown: state.lifecycle().subscribe() };
        return sse_response(stream, client_wants_usage, labels, ends).await;
    }
    let response = request.answer(backend).await?;
    if let Some(usage) = R::usage(&response) {
        record_usage(state, &model_name, usage);
        caller.settle_tokens(usage.total_tokens);
    }
    Ok(Json(response).into_response())
}

fn record_usage(state: &AppState, model: &str, usage: nstream_backend::Usage) {
    let metrics = state.metrics();
    metrics.record_tokens(model, TokenKind::Prompt, usage.prompt_tokens);
    metrics.record_tokens(model, TokenKind::Completion, usage.completion_tokens);
}

/// One entry of `/v1/models`: OpenAI's fields plus an `nstream` object that OpenAI clients ignore.
#[derive(Serialize)]
struct WireModel {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
    /// vLLM's fields for LoRA adapters: the base's id and the adapter's path.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root: Option<String>,
    nstream: WireModelDetails,
}

#[derive(Serialize)]
struct WireModelDetails {
    kind: ModelKind,
    capabilities: Vec<Capability>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_length: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding_dimension: Option<u32>,
}

fn wire_model(name: &str, description: ModelDescription) -> WireModel {
    WireModel {
        id: name.to_owned(),
        object: "model",
        created: description.created,
        owned_by: description.owned_by,
        parent: description.parent,
        root: description.root,
        nstream: WireModelDetails {
            kind: description.kind,
            capabilities: description.capabilities.into_iter().collect(),
            context_length: description.context_length,
            embedding_dimension: description.embedding_dimension,
        },
    }
}

/// `GET /v1/models`.
pub(crate) async fn list_models(State(state): State<AppState>, caller: Caller) -> Response {
    let data: Vec<WireModel> = state
        .models()
        .iter()
        .filter(|(name, _)| caller.allows_model(name))
        .map(|(name, backend)| wire_model(&name, backend.describe()))
        .collect();
    Json(serde_json::json!({ "object": "list", "data": data })).into_response()
}

/// `GET /v1/models/{id}`; the id may contain slashes (`BAAI/bge-small-en-v1.5`).
pub(crate) async fn get_model(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    match state.models().get(&id).filter(|_| caller.allows_model(&id)) {
        Some(backend) => labelled(Some(id.clone()), Ok(Json(wire_model(&id, backend.describe())).into_response())),
        None => ApiError::model_not_found(&id).into_response(),
    }
}

/// `GET /health`: the process is up and answering.
pub(crate) async fn health() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// How long one backend may take to answer a readiness probe.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /ready`: 200 only when at least one model is registered and every model is ready, and
/// the server is not shutting down (then 503 at once, so load balancers stop sending traffic
/// while in-flight requests finish).
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    if state.lifecycle().is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": "draining" }))).into_response();
    }
    let checks = state.models().iter().map(|(name, backend)| async move {
        let health = tokio::time::timeout(HEALTH_CHECK_TIMEOUT, backend.health())
            .await
            .unwrap_or_else(|_| Health::Unhealthy { reason: "health check timed out".to_owned() });
        (name.to_owned(), health)
    });
    let results: BTreeMap<String, Health> = futures_util::future::join_all(checks).await.into_iter().collect();
    let all_ready = !results.is_empty() && results.values().all(Health::is_ready);
    let (status, label) =
        if all_ready { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not_ready") };
    (status, Json(serde_json::json!({ "status": label, "models": results }))).into_response()
}

/// `GET /metrics`: the shared registry in the OpenMetrics text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let waiting = state.models().iter().filter_map(|(name, backend)| Some((name, backend.waiting_requests()?)));
    state.metrics().set_waiting(waiting.collect::<Vec<_>>());
    match state.metrics().encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(error) => ApiError::internal(format!("encoding metrics failed: {error}")).into_response(),
    }
}

/// Any path no route serves.
pub(crate) async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

/// A served path with the wrong method.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortening_renormalises_only_normalised_models() {
        let mut vector = vec![0.6, 0.0, 0.8];
        shorten(&mut vector, 2, true);
        assert_eq!(vector, vec![1.0, 0.0]);
        let mut vector = vec![0.6, 0.0, 0.8];
        shorten(&mut vector, 2, false);
        assert_eq!(vector, vec![0.6, 0.0]);
        let mut vector = vec![0.6, 0.8];
        shorten(&mut vector, 5, true);
        assert_eq!(vector, vec![0.6, 0.8]);
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let WireVector::Base64(text) = encode_vector(vec![1.0, -2.5], EncodingFormat::Base64) else {
            panic!("expected base64");
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).expect("valid base64");
        assert_eq!(&bytes[..4], &1.0f32.to_le_bytes());
        assert_eq!(&bytes[4..], &(-2.5f32).to_le_bytes());
    }
}
