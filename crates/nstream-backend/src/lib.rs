//! The `ModelBackend` trait and the OpenAI-shaped types every nstream model backend speaks.
//!
//! This crate is the leaf of the serving stack: the HTTP server (`nstream-server`) depends on it to
//! map requests and errors without knowing any provider, and each provider crate (candle
//! embeddings, candle LLMs, hosted APIs) implements [`ModelBackend`] on top of it. It links no
//! HTTP client, no candle and no kube.
//!
//! # Contents
//!
//! - [`ModelBackend`]: the object-safe async trait, held as `Arc<dyn ModelBackend>`. Every
//!   capability has a default that returns [`BackendError::Unsupported`], so an embedding backend
//!   implements only [`ModelBackend::describe`] and [`ModelBackend::embed`].
//! - [`chat`], [`completion`], [`embedding`]: request/response types faithful to the OpenAI API
//!   reference, with a few documented nstream extensions (`top_k`, `repetition_penalty`,
//!   `ignore_eos`, `truncate`). Each request type has a `validate()` that the server calls before
//!   a backend sees the request, so backends may rely on the ranges it checks.
//! - [`BackendError`]: one error enum whose [`BackendError::status_code`],
//!   [`BackendError::error_type`] and [`BackendError::code`] are the single mapping to HTTP.
//! - [`vector_store`]: OpenAI's files and vector-stores objects and the [`VectorStoreBackend`]
//!   trait the server's `/v1/files` and `/v1/vector_stores` routes call.
//! - `FakeBackend` (cargo feature `fake`): a deterministic backend for server tests and demos.
//!
//! # Unknown request fields
//!
//! The official OpenAI clients send only documented fields, but many others (LangChain, LiteLLM,
//! vendor SDKs) add their own. Chat and legacy completion requests therefore *ignore* unknown
//! fields, as OpenAI's own API does for forward compatibility. Embedding requests *reject* them
//! (`#[serde(deny_unknown_fields)]`): the embeddings surface is small and a misspelt `dimensions`
//! or `encoding_format` silently changes the vectors a client indexes, so a 400 naming the field is
//! the safer answer.

mod backend;
pub mod chat;
pub mod completion;
pub mod embedding;
mod error;
#[cfg(feature = "fake")]
mod fake;
mod input;
mod model;
mod model_error;
mod panic;
mod usage;
pub mod vector_store;

pub use backend::{ChatCompletionStream, CompletionStream, ModelBackend};
// The request and response types every backend touches, also reachable from the crate root.
pub use chat::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse};
pub use completion::{CompletionChunk, CompletionRequest, CompletionResponse};
pub use embedding::{EmbeddingRequest, EmbeddingResponse};
pub use error::{BackendError, Result};
#[cfg(feature = "fake")]
pub use fake::{FakeBackend, FakeBackendStats};
pub use input::{Input, InputItem};
pub use model::{Capability, Health, ModelDescription, ModelKind};
pub use panic::catch_panic;
pub use usage::{StopSequences, StreamOptions, Usage, unix_timestamp};
pub use vector_store::VectorStoreBackend;
