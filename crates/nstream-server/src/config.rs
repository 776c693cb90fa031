//! Server settings, resolved by the binaries from flags and environment.

use std::fmt;

use subtle::ConstantTimeEq;

/// A bearer API key. `Debug` prints `ApiKey(***)` and there is no `Display`, so settings that
/// hold one can be logged safely.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself; call only to compare or forward it, never to log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Compares with a presented key in time independent of where they differ (`subtle`), so
    /// response timing does not reveal how much of a guess was right; only a length mismatch
    /// answers early, so the length is all that timing can tell.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("ApiKey(***)")
    }
}

/// Limits and access control of the HTTP server.
///
/// `#[non_exhaustive]`: start from [`ServerConfig::default`] and use the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Largest accepted request body in bytes; larger bodies get a 413. Default 4 MiB, which
    /// holds 2048 inputs of about 2 KB each.
    pub max_body_bytes: usize,
    /// Most inputs in one `/v1/embeddings` request (OpenAI's own limit is 2048).
    pub max_embedding_inputs: usize,
    /// When set, every `/v1/*` route requires `Authorization: Bearer <key>`; `/health`, `/ready`
    /// and `/metrics` stay open for probes and scrapers.
    pub api_key: Option<ApiKey>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { max_body_bytes: 4 * 1024 * 1024, max_embedding_inputs: 2048, api_key: None }
    }
}

impl ServerConfig {
    /// Sets [`ServerConfig::max_body_bytes`].
    pub fn with_max_body_bytes(mut self, max_body_bytes: usize) -> Self {
        self.max_body_bytes = max_body_bytes;
        self
    }

    /// Sets [`ServerConfig::max_embedding_inputs`].
    pub fn with_max_embedding_inputs(mut self, max_embedding_inputs: usize) -> Self {
        self.max_embedding_inputs = max_embedding_inputs;
        self
    }

    /// Requires this bearer key on `/v1/*`.
    pub fn with_api_key(mut self, api_key: ApiKey) -> Self {
        self.api_key = Some(api_key);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_key() {
        let config = ServerConfig::default().with_api_key(ApiKey::new("sk-very-secret"));
        let printed = format!("{config:?}");
        assert!(!printed.contains("sk-very-secret"), "{printed}");
        assert!(printed.contains("***"));
    }

    #[test]
    fn keys_match_only_exactly() {
        let key = ApiKey::new("sk-abc");
        assert!(key.matches("sk-abc"));
        assert!(!key.matches("sk-abd"));
        assert!(!key.matches("sk-ab"));
        assert!(!key.matches("sk-abcd"));
        assert!(!key.matches(""));
        assert!(!key.matches("SK-ABC"), "the comparison is byte for byte, case included");
        assert!(ApiKey::new("ключ-🔑").matches("ключ-🔑"));
        assert!(!ApiKey::new("ключ-🔑").matches("ключ-🔒"));
    }
}
