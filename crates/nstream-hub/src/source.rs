//! What to resolve: a repo id, a revision, a token and a weight-file selector.

use std::fmt;

use crate::error::{Error, Result};

/// A Hugging Face access token. `Debug` prints `SecretToken(***)` and there is no `Display`, so a
/// token never reaches a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(String);

impl SecretToken {
    /// Wraps a token; surrounding whitespace (a stray newline from a file) is removed.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into().trim().to_owned())
    }

    /// The token itself. Call it only where the token is sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("SecretToken(***)")
    }
}

impl From<String> for SecretToken {
    fn from(token: String) -> Self {
        Self::new(token)
    }
}

impl From<&str> for SecretToken {
    fn from(token: &str) -> Self {
        Self::new(token)
    }
}

/// A model on the hub: the repo, which revision, which token and which weight file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSource {
    /// `owner/name`, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub repo_id: String,
    /// A branch, tag or 40-hex commit; `main` when `None`.
    pub revision: Option<String>,
    /// A token for this repo; it takes priority over `HF_TOKEN` and the token file.
    pub token: Option<SecretToken>,
    /// A weight-file selector: a file name or a glob with `*` and `?` (e.g. `*Q4_1.gguf`).
    pub file: Option<String>,
}

impl ModelSource {
    /// A source for `repo_id` at `main`, with no token and no selector.
    pub fn new(repo_id: impl Into<String>) -> Self {
        Self { repo_id: repo_id.into(), revision: None, token: None, file: None }
    }

    /// The same source at `revision`.
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }

    /// The same source with a token.
    pub fn with_token(mut self, token: SecretToken) -> Self {
        self.token = Some(token);
        self
    }

    /// The same source with a weight-file selector.
    pub fn with_file(mut self, file: impl Into<String>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// The revision to resolve: the one given, or `main`.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// Checks the repo id's shape, so that it cannot escape the cache folder or the URL path.
    pub(crate) fn validate(&self) -> Result<()> {
        let valid_part = |part: &str| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let parts: Vec<&str> = self.repo_id.split('/').collect();
        let valid_revision = self
            .revision
            .as_deref()
            .is_none_or(|revision| !revision.is_empty() && !revision.split('/').any(|p| p == ".." || p.is_empty()));
        if parts.len() <= 2 && parts.iter().all(|part| valid_part(part)) && valid_revision {
            Ok(())
        } else {
            Err(Error::InvalidRepoId { repo_id: self.repo_id.clone() })
        }
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters and `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                backtrack = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    p = star + 1;
                    n = matched + 1;
                    backtrack = Some((star, matched + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_prints() {
        let source = ModelSource::new("a/b").with_token(SecretToken::new("hf_secret\n"));
        let debug = format!("{source:?}");
        assert!(!debug.contains("hf_secret"), "{debug}");
        assert_eq!(source.token.as_ref().map(SecretToken::expose), Some("hf_secret"));
    }

    #[test]
    fn repo_ids_are_checked() {
        for good in ["gpt2", "sentence-transformers/all-MiniLM-L6-v2", "a.b/c_d-e"] {
            assert!(ModelSource::new(good).validate().is_ok(), "{good}");
        }
        for bad in ["", "a/b/c", "../x", "a/..", "a b/c", "a//b"] {
            assert!(ModelSource::new(bad).validate().is_err(), "{bad}");
        }
        assert!(ModelSource::new("a/b").with_revision("../../etc").validate().is_err());
        assert!(ModelSource::new("a/b").with_revision("refs/pr/1").validate().is_ok());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(!glob_match("*Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_0.gguf"));
        assert!(glob_match("model-?????-of-*.safetensors", "model-00001-of-00002.safetensors"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("exact.gguf", "exact.gguf"));
    }
}
