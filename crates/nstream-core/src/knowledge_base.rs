//! The fourth kind, `KnowledgeBase`: documents chunked with an EmbeddingModel's tokenizer,
//! embedded by it, and kept in a store (embedded by default, or PostgreSQL with pgvector).

#![expect(
    clippy::duplicated_attributes,
    reason = "kube's printcolumn(...) repeats type_ and priority once per column, which this lint misreads"
)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use validator::Validate;

use crate::patterns;
use crate::quantity::ResourceQuantity;
use crate::secret::SecretKeyRef;
use crate::status::ModelStatus;
use crate::validate::{Check, Problem, field_rules, quote};

/// Chunk size when `chunking.maxTokens` is omitted.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Overlap when `chunking.overlapTokens` is omitted.
pub const DEFAULT_OVERLAP_TOKENS: u32 = 32;
/// Results of a search that does not say how many it wants.
pub const DEFAULT_MAX_NUM_RESULTS: u32 = 10;
/// The most results one search may ask for.
pub const MAX_NUM_RESULTS_LIMIT: u32 = 100;
/// The table of the postgres store when `store.postgres.table` is omitted.
pub const DEFAULT_POSTGRES_TABLE: &str = "nstream_chunks";
/// The size of the PersistentVolumeClaim the operator makes for an embedded store when
/// `store.embedded.size` is omitted.
pub const DEFAULT_CLAIM_SIZE: &str = "10Gi";

/// A PostgreSQL table name nstream creates: lower-case, unquoted, at most 63 bytes.
pub const TABLE_NAME_PATTERN: &str = "^[a-z_][a-z0-9_]{0,62}$";

/// A collection of documents, chunked and embedded by an EmbeddingModel and searched by
/// similarity; served as the OpenAI vector store whose id is its `metadata.name`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[kube(
    group = "llm.nstream.ai",
    version = "v1",
    kind = "KnowledgeBase",
    namespaced,
    status = "KnowledgeBaseStatus",
    derive = "PartialEq",
    shortname = "kb",
    category = "nstream",
    doc = "Documents chunked and embedded by an EmbeddingModel, searched by similarity (an OpenAI vector store).",
    printcolumn(name = "Embedding-Model", type_ = "string", json_path = ".spec.embeddingModel"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(name = "Deployment", type_ = "string", json_path = ".status.deployment", priority = "1"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KnowledgeBaseSpec {
    /// The `metadata.name` of the EmbeddingModel that embeds the documents and the queries.
    #[validate(regex(path = *patterns::DNS_LABEL))]
    #[schemars(regex(pattern = patterns::DNS_LABEL_PATTERN))]
    pub embedding_model: String,
    /// How documents are cut into chunks; 256 tokens with 32 of overlap when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub chunking: Option<Chunking>,
    /// Where chunks and their vectors live; an embedded store under the data directory when
    /// omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub store: Option<KnowledgeBaseStore>,
    /// Defaults of searches that do not set them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub search: Option<SearchDefaults>,
}

impl KnowledgeBaseSpec {
    /// The chunking, with defaults filled in.
    pub fn chunking_or_default(&self) -> Chunking {
        self.chunking.clone().unwrap_or_default()
    }

    /// The store, with the embedded default when none is set.
    pub fn store_or_default(&self) -> KnowledgeBaseStore {
        self.store.clone().unwrap_or_default()
    }
}

/// How documents are cut into chunks, in tokens of the EmbeddingModel's tokenizer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[x_kube(validation = Rule::new("!has(self.maxTokens) || !has(self.overlapTokens) || self.overlapTokens < self.maxTokens").message("overlapTokens must be less than maxTokens"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Chunking {
    /// The most tokens in one chunk (the model truncates longer inputs, so keep it at or under its
    /// maximum sequence length: 256 for all-MiniLM-L6-v2).
    #[serde(default = "default_max_tokens")]
    #[validate(range(min = 16, max = 8192))]
    #[schemars(range(min = 16, max = 8192))]
    pub max_tokens: u32,
    /// Tokens repeated at the start of a chunk from the end of the previous one, so a sentence cut
    /// at a boundary is found whole in one of them.
    #[serde(default = "default_overlap_tokens")]
    #[validate(range(min = 0, max = 4096))]
    #[schemars(range(min = 0, max = 4096))]
    pub overlap_tokens: u32,
    /// How text is split before it is packed into chunks.
    #[serde(default)]
    pub splitting: Splitting,
}

fn default_max_tokens() -> u32 {
    DEFAULT_MAX_TOKENS
}

fn default_overlap_tokens() -> u32 {
    DEFAULT_OVERLAP_TOKENS
}

impl Default for Chunking {
    fn default() -> Self {
        Self { max_tokens: DEFAULT_MAX_TOKENS, overlap_tokens: DEFAULT_OVERLAP_TOKENS, splitting: Splitting::Auto }
    }
}

/// Where chunk boundaries may fall.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Splitting {
    /// By the file's structure: headings and paragraphs of markdown and HTML, paragraphs of text.
    #[default]
    Auto,
    /// Fixed windows of tokens, ignoring structure.
    Tokens,
}

/// The store of a KnowledgeBase: exactly one of `embedded` and `postgres`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[x_kube(validation = Rule::new("has(self.embedded) != has(self.postgres)").message("set exactly one of embedded and postgres"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KnowledgeBaseStore {
    /// An embedded index in one folder (one machine, one process writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub embedded: Option<EmbeddedStore>,
    /// A PostgreSQL table with pgvector's HNSW index (several servers share it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(nested)]
    pub postgres: Option<PostgresStore>,
}

impl Default for KnowledgeBaseStore {
    fn default() -> Self {
        Self { embedded: Some(EmbeddedStore::default()), postgres: None }
    }
}

/// An embedded store in a folder.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddedStore {
    /// The folder; relative paths are under the data directory, and `<data dir>/kb/<name>` is
    /// used when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 4096), regex(path = *patterns::DISPLAY_NAME))]
    #[schemars(length(min = 1, max = 4096))]
    pub path: Option<String>,
    /// On a cluster only (local serving ignores it): the size of the PersistentVolumeClaim the
    /// operator makes for the store; 10Gi when omitted. Read when the claim is made: changing it
    /// later does not resize the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ResourceQuantity>,
    /// On a cluster only: the storage class of that claim; the cluster's default when omitted.
    /// Read when the claim is made, like `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *patterns::DNS_SUBDOMAIN), length(max = 253))]
    #[schemars(regex(pattern = patterns::DNS_SUBDOMAIN_PATTERN), length(max = 253))]
    pub storage_class_name: Option<String>,
}

/// A PostgreSQL store; the server needs the pgvector extension (>= 0.7).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresStore {
    /// The Secret key holding the connection URL, `postgres://user:password@host:5432/db`.
    #[validate(nested)]
    pub connection_secret_ref: SecretKeyRef,
    /// The table of chunks, created when missing; `nstream_chunks` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(regex(path = *TABLE_NAME))]
    #[schemars(regex(pattern = TABLE_NAME_PATTERN))]
    pub table: Option<String>,
}

impl PostgresStore {
    /// The table name, or the default.
    pub fn table_or_default(&self) -> &str {
        self.table.as_deref().unwrap_or(DEFAULT_POSTGRES_TABLE)
    }
}

/// The observed state of a KnowledgeBase on a cluster: the conditions, replicas and endpoint of
/// the server Deployment that serves it, and the names of that Deployment and of the claim of its
/// embedded store.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KnowledgeBaseStatus {
    /// `Ready`, `Progressing`, `Degraded` (and `ReplicasLimited`), replicas, the endpoint.
    #[serde(flatten)]
    pub serving: ModelStatus,
    /// The Deployment whose pods serve the KnowledgeBase (`kb-<metadata.name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The PersistentVolumeClaim of the embedded store; absent for a postgres store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

static TABLE_NAME: std::sync::LazyLock<regex::Regex> =
    std::sync::LazyLock::new(|| regex::Regex::new(TABLE_NAME_PATTERN).expect("the pattern is a valid constant"));

/// Defaults of a search.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Validate)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SearchDefaults {
    /// Results returned when a search does not say; 10 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 100))]
    #[schemars(range(min = 1, max = 100))]
    pub max_num_results: Option<u32>,
    /// Results scoring below this cosine similarity are dropped; none are when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = -1.0, max = 1.0))]
    #[schemars(range(min = -1.0, max = 1.0))]
    pub score_threshold: Option<f64>,
}

impl Check for KnowledgeBaseSpec {
    fn problems(&self, prefix: &str) -> Vec<Problem> {
        let mut problems = field_rules(self, prefix);
        if let Some(chunking) = &self.chunking
            && chunking.overlap_tokens >= chunking.max_tokens
        {
            problems.push(Problem::new(
                format!("{prefix}.chunking.overlapTokens"),
                format!("{} with maxTokens {}", chunking.overlap_tokens, chunking.max_tokens),
                "fewer overlap tokens than maxTokens (a chunk must move forward)",
            ));
        }
        if let Some(store) = &self.store {
            let path = format!("{prefix}.store");
            match (&store.embedded, &store.postgres) {
                (Some(_), Some(_)) => problems.push(Problem::new(
                    path,
                    "both embedded and postgres",
                    "exactly one of embedded and postgres",
                )),
                (None, None) => problems.push(Problem::new(
                    path,
                    "no store",
                    "embedded: {path: ...} or postgres: {connectionSecretRef: {name, key}}",
                )),
                _ => {}
            }
            if let Some(size) = store.embedded.as_ref().and_then(|embedded| embedded.size.as_ref())
                && !size.amount().is_ok_and(|amount| amount.is_positive())
            {
                problems.push(Problem::new(
                    format!("{prefix}.store.embedded.size"),
                    quote(size.as_str()),
                    "a size such as 10Gi",
                ));
            }
            if let Some(path_text) = store.embedded.as_ref().and_then(|embedded| embedded.path.as_deref())
                && path_text.split(['/', '\\']).any(|part| part == "..")
            {
                problems.push(Problem::new(
                    format!("{prefix}.store.embedded.path"),
                    quote(path_text),
                    "a path without `..` (relative paths are under the data directory)",
                ));
            }
        }
        problems
    }
}
