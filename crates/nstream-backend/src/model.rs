//! What a backend says about itself: identity, kind, capabilities and health.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Which family of model a backend serves; mirrors the three nstream resource kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelKind {
    /// A locally loaded causal language model (a `BaseModel`): chat and completions.
    Chat,
    /// A locally loaded sentence-embedding model (an `EmbeddingModel`).
    Embedding,
    /// A hosted foundation model behind a provider API (a `MegaModel`).
    Hosted,
}

/// One thing a backend can do. Calling a method whose capability is missing yields
/// [`crate::BackendError::Unsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Capability {
    /// `/v1/chat/completions` without streaming.
    Chat,
    /// `/v1/chat/completions` with `stream: true`.
    ChatStream,
    /// Legacy `/v1/completions` without streaming.
    Completion,
    /// Legacy `/v1/completions` with `stream: true`.
    CompletionStream,
    /// `/v1/embeddings`.
    Embedding,
}

impl Capability {
    /// The snake_case name used in error messages and `/v1/models`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::ChatStream => "chat_stream",
            Self::Completion => "completion",
            Self::CompletionStream => "completion_stream",
            Self::Embedding => "embedding",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A backend's readiness, polled by the server's `/ready` route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Health {
    /// Weights are still downloading or loading; requests get [`crate::BackendError::NotReady`].
    Loading,
    /// Serving.
    Ready,
    /// Loaded but broken (worker thread died, provider unreachable).
    Unhealthy {
        /// Why, for operators; shown on `/ready`.
        reason: String,
    },
}

impl Health {
    /// Whether requests can be served now.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }
}

/// What a backend serves, as listed by `/v1/models` and used by the server for routing and
/// validation (for instance `dimensions` on embeddings).
///
/// Built with [`ModelDescription::new`], [`ModelDescription::embedding`] or
/// [`ModelDescription::chat`] and the `with_*` methods, so fields can be added later without
/// breaking backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ModelDescription {
    /// The model name clients put in `model` (the resource name in `models.yaml`).
    pub id: String,
    /// Which family of model this is.
    pub kind: ModelKind,
    /// What the backend implements.
    pub capabilities: BTreeSet<Capability>,
    /// Maximum tokens per sequence (prompt plus completion for generative models), when known.
    pub context_length: Option<u32>,
    /// Length of the vectors [`crate::ModelBackend::embed`] returns, for embedding models.
    pub embedding_dimension: Option<u32>,
    /// Whether embeddings are L2-normalised; the server then renormalises after truncating to a
    /// requested `dimensions` (Matryoshka style).
    pub embeddings_normalized: bool,
    /// The OpenAI `owned_by` field: the organisation or provider behind the model.
    pub owned_by: String,
    /// Unix seconds when the model was loaded or registered (OpenAI's `created`).
    pub created: u64,
    /// The served model this one derives from (a LoRA adapter's base), as vLLM's `parent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Where the model's weights came from (a LoRA adapter's path), as vLLM's `root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

impl ModelDescription {
    /// A description with no capabilities; add them with [`ModelDescription::with_capability`].
    pub fn new(id: impl Into<String>, kind: ModelKind) -> Self {
        Self {
            id: id.into(),
            kind,
            capabilities: BTreeSet::new(),
            context_length: None,
            embedding_dimension: None,
            embeddings_normalized: false,
            owned_by: "nstream".to_owned(),
            created: crate::usage::unix_timestamp(),
            parent: None,
            root: None,
        }
    }

    /// An embedding model producing vectors of `dimension` floats.
    pub fn embedding(id: impl Into<String>, dimension: u32) -> Self {
        let mut description = Self::new(id, ModelKind::Embedding).with_capability(Capability::Embedding);
        description.embedding_dimension = Some(dimension);
        description
    }

    /// A local generative model with chat and completions, streaming included.
    pub fn chat(id: impl Into<String>) -> Self {
        Self::new(id, ModelKind::Chat)
            .with_capability(Capability::Chat)
            .with_capability(Capability::ChatStream)
            .with_capability(Capability::Completion)
            .with_capability(Capability::CompletionStream)
    }

    /// Adds a capability.
    pub fn with_capability(mut self, capability: Capability) -> Self {
        self.capabilities.insert(capability);
        self
    }

    /// Sets the context length in tokens.
    pub fn with_context_length(mut self, context_length: u32) -> Self {
        self.context_length = Some(context_length);
        self
    }

    /// Declares whether embeddings come out L2-normalised.
    pub fn with_normalized_embeddings(mut self, normalized: bool) -> Self {
        self.embeddings_normalized = normalized;
        self
    }

    /// Sets the OpenAI `owned_by` field.
    pub fn with_owned_by(mut self, owned_by: impl Into<String>) -> Self {
        self.owned_by = owned_by.into();
        self
    }

    /// Sets the OpenAI `created` field (Unix seconds).
    pub fn with_created(mut self, created: u64) -> Self {
        self.created = created;
        self
    }

    /// Sets the model it derives from (`parent`).
    pub fn with_parent(mut self, parent: impl Into<String>) -> Self {
        self.parent = Some(parent.into());
        self
    }

    /// Sets where its weights came from (`root`).
    pub fn with_root(mut self, root: impl Into<String>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Whether the backend declares this capability.
    pub fn supports(&self, capability: Capability) -> bool {
        self.capabilities.contains(&capability)
    }
}
