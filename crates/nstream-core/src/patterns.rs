//! Regular expressions shared by the validator rules and the CRD schemas, so both enforce the
//! same thing.

use std::sync::LazyLock;

use regex::Regex;

/// A DNS-1035 label: what Kubernetes requires of a Service name, so every model name can become one.
pub const DNS_LABEL_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 label: a namespace name.
pub const NAMESPACE_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain: a Secret name.
pub const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key of a Secret's data.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// A Hugging Face repository id: `org/name`.
pub const HF_REPO_ID_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$";
/// A model source: a Hugging Face repository id (`org/name`) or a local path (absolute, or
/// starting with `./`, `../` or `~/`). Repeat counts stay at or under 1000: the API server compiles
/// CRD patterns with Go's regexp, which refuses larger ones (and with them the whole CRD).
pub const HF_MODEL_ID_PATTERN: &str =
    r"^([A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}|(/|\./|\.\./|~/).{0,1000})$";
/// A git revision on the hub: a branch, tag or commit, without whitespace.
pub const REVISION_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$";
/// An Azure OpenAI deployment name.
pub const AZURE_DEPLOYMENT_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";
/// An Azure OpenAI `api-version`: a dated version, optionally `-preview`, or `preview`/`latest`
/// for the v1 API.
pub const AZURE_API_VERSION_PATTERN: &str = r"^([0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?|preview|latest)$";
/// An `anthropic-version` header value: a date.
pub const ANTHROPIC_VERSION_PATTERN: &str = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$";
/// A model name on a hosted provider or a display name: no whitespace at the ends (emptiness is
/// left to the length rule, so an empty name gets one message, not two).
pub const DISPLAY_NAME_PATTERN: &str = r"^(\S(.*\S)?)?$";

macro_rules! compiled {
    ($name:ident, $pattern:ident) => {
        #[doc = concat!("The compiled form of [`", stringify!($pattern), "`].")]
        pub static $name: LazyLock<Regex> =
            LazyLock::new(|| Regex::new($pattern).expect("the pattern is a valid constant"));
    };
}

compiled!(DNS_LABEL, DNS_LABEL_PATTERN);
compiled!(NAMESPACE, NAMESPACE_PATTERN);
compiled!(DNS_SUBDOMAIN, DNS_SUBDOMAIN_PATTERN);
compiled!(SECRET_KEY, SECRET_KEY_PATTERN);
compiled!(HF_REPO_ID, HF_REPO_ID_PATTERN);
compiled!(HF_MODEL_ID, HF_MODEL_ID_PATTERN);
compiled!(REVISION, REVISION_PATTERN);
compiled!(AZURE_DEPLOYMENT, AZURE_DEPLOYMENT_PATTERN);
compiled!(AZURE_API_VERSION, AZURE_API_VERSION_PATTERN);
compiled!(ANTHROPIC_VERSION, ANTHROPIC_VERSION_PATTERN);
compiled!(DISPLAY_NAME, DISPLAY_NAME_PATTERN);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_compiles_and_matches_its_examples() {
        assert!(DNS_LABEL.is_match("gpt-4-mega"));
        assert!(!DNS_LABEL.is_match("4gpt"));
        assert!(!DNS_LABEL.is_match("Gpt"));
        assert!(NAMESPACE.is_match("nstream"));
        assert!(DNS_SUBDOMAIN.is_match("hf.tokens"));
        assert!(SECRET_KEY.is_match("api-key"));
        assert!(HF_REPO_ID.is_match("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(!HF_REPO_ID.is_match("all-MiniLM-L6-v2"));
        assert!(!HF_REPO_ID.is_match("a/b/c"));
        assert!(HF_MODEL_ID.is_match("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(HF_MODEL_ID.is_match("/work/out/student"));
        assert!(HF_MODEL_ID.is_match("./out/student"));
        assert!(HF_MODEL_ID.is_match("~/adapters/a"));
        assert!(!HF_MODEL_ID.is_match("llama3"));
        assert!(!HF_MODEL_ID.is_match("a/b/c"));
        assert!(REVISION.is_match("main"));
        assert!(REVISION.is_match("refs/pr/1"));
        assert!(AZURE_DEPLOYMENT.is_match("gpt-4-deployment"));
        assert!(AZURE_API_VERSION.is_match("2023-10-01-preview"));
        assert!(AZURE_API_VERSION.is_match("2024-06-01"));
        assert!(!AZURE_API_VERSION.is_match("PREVIEW"));
        assert!(ANTHROPIC_VERSION.is_match("2023-06-01"));
        assert!(DISPLAY_NAME.is_match("gpt-4o"));
        assert!(!DISPLAY_NAME.is_match(" gpt"));
    }
}
