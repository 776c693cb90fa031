//! MegaModel backends: Azure OpenAI, OpenAI (and OpenAI-compatible endpoints) and Anthropic
//! behind the one [`nstream_backend::ModelBackend`] trait, with our own retry, client-side rate
//! limits and timeouts.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo(spec: nstream_core::MegaModelSpec, key: nstream_core::SecretString) -> Result<(), Box<dyn std::error::Error>> {
//! use nstream_hosted::{HostedBackend, HostedOptions};
//! let options = HostedOptions::default().with_rate_limits(Some(600), Some(200_000));
//! let backend = HostedBackend::new("gpt-4o", &spec, key, options)?;
//! println!("{}", backend.check().await);
//! # Ok(()) }
//! ```
//!
//! # What is mapped
//!
//! - **OpenAI**: `POST {endpoint}/chat/completions` and `/embeddings`, `Authorization: Bearer`,
//!   `OpenAI-Organization` / `OpenAI-Project` headers; the request is passed through with `model`
//!   set to the template's model (OpenAI-compatible servers such as vLLM also get the nstream
//!   extensions `top_k` and `repetition_penalty`; OpenAI itself answers 400 to them).
//! - **Azure OpenAI**: `POST {endpoint}/openai/deployments/{deployment}/{operation}?api-version=`
//!   with the `api-key` header; `preview`/`latest` use the v1 API (`/openai/v1/...`, deployment
//!   as `model`). Fields are gated by api-version: on versions before 2023-12-01-preview, `tools`,
//!   `tool_choice`, a non-text `response_format` and `logprobs` are rejected with a 400 naming the
//!   version, `seed` is dropped; `max_completion_tokens` becomes `max_tokens` before
//!   2024-09-01-preview, and `stream_options` is dropped (the usage chunk is then estimated).
//!   Content-filter chunks without `delta` and the prompt-filter chunk are tolerated.
//! - **Anthropic**: `POST {endpoint}/v1/messages` with `x-api-key` and `anthropic-version`;
//!   system and developer messages become the top-level `system`, messages become content blocks
//!   (text, images, `tool_use`, `tool_result`), neighbouring turns of one role are merged,
//!   `max_tokens` defaults to the template's. Answers, whole or streamed (the named SSE events,
//!   `ping`, a mid-stream `error`), become OpenAI chat completions with usage (cache tokens count as
//!   prompt tokens). Embeddings are `Unsupported`.
//!
//! Answers carry the MegaModel's name as `model`. Streams end with a usage chunk when the client
//! asked for one (`stream_options.include_usage`), as the `ModelBackend` contract requires.
//!
//! # Resilience
//!
//! See [`retry`] and [`limiter`]: retried statuses and headers honoured, the cap on total waiting,
//! the sliding-window RPM/TPM limiter (a request that would wait for it longer than
//! [`HostedOptions::max_rate_limit_wait`] is refused with `BackendError::RateLimited`, a 429; a
//! chat request is charged its prompt plus `max_tokens` per choice of `n`). A per-attempt timeout
//! bounds a non-streamed answer, or a stream's headers and then each gap between events; a
//! timed-out attempt is not retried. A stream is retried only before its first byte; a cut
//! mid-way ends it with an error item.
//!
//! # Hardening
//!
//! Redirects are never followed (they would carry the key to another host): a 3xx is an error
//! naming the status and the host it pointed to. A plain `http://` endpoint is refused unless its
//! host is loopback or cluster-local ([`nstream_core::validate::plain_http_refused`]). Chat answers
//! are read up to 16 MiB (embeddings answers 16 MiB plus 192 KiB per input), one SSE event up to
//! 1 MiB: past those the call fails with a 502 naming the cap, instead of buffering without
//! limit. Error bodies are read up to 64 KiB and cut there.
//!
//! # Why reqwest and not async-openai
//!
//! The architecture named async-openai for OpenAI and Azure. We call both with reqwest directly,
//! because what this crate must guarantee is exactly what async-openai keeps from its caller:
//! its error type drops the HTTP status and headers (so no `retry-after-ms`, `Retry-After` or
//! rate-limit reset headers for our own retry, and its built-in retry cannot be replaced per
//! status), its strict error and chunk types fail on Azure's integer error codes and on
//! content-filter chunks without `delta`, and its typed requests would have to be translated from
//! ours field by field, and back, to gate fields by Azure api-version. Our OpenAI-shaped types
//! (`nstream-backend`) already are the wire format, so the mapping stays small and testable.
//!
//! # Secrets
//!
//! The key is held as a [`nstream_core::SecretString`] and sent in sensitive header values;
//! `Debug` of every type prints `***`; anything a provider echoes back (OpenAI's masked key in a
//! 401) is scrubbed from error messages.

mod anthropic;
mod backend;
mod check;
mod error;
pub mod limiter;
mod openai;
mod options;
pub mod retry;
// Public only for the fuzz targets (fuzz/); not part of the supported API.
#[doc(hidden)]
pub mod sse;
mod transport;

pub use backend::HostedBackend;
pub use check::{CheckProblem, CheckReport};
pub use error::{Error, ProviderError, Result};
pub use options::HostedOptions;
