//! Secrets in specs: inline values that never print, and references to Kubernetes Secrets.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use validator::Validate;

use crate::patterns;

/// A secret given inline in a spec (an API key or a hub token).
///
/// It serialises as the plain value, because a spec must round-trip to the API server unchanged,
/// but `Debug` and `Display` print `***`, so logging a spec, a settings struct or an error that
/// holds one never shows the value. Read it with [`SecretString::expose`], only where it is sent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself. Call it only at the point where the value is sent.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the value looks like, in words that reveal nothing of it; used by validation.
    pub(crate) fn shape_problem(&self) -> Option<&'static str> {
        if self.0.is_empty() {
            Some("an empty value")
        } else if self.0.trim() != self.0 {
            Some("a value with leading or trailing whitespace (often a stray newline)")
        } else {
            None
        }
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("SecretString(***)")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("***")
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

/// A key in a Kubernetes Secret in the resource's namespace.
///
/// In local mode (no cluster) the value is read from the environment variable
/// `NSTREAM_SECRET_<NAME>_<KEY>` (upper case, `-` and `.` as `_`) or from the file
/// `$NSTREAM_SECRETS_DIR/<name>/<key>`, the layout of a mounted Secret volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Validate)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret, in the namespace of the resource.
    #[validate(length(min = 1, max = 253), regex(path = *patterns::DNS_SUBDOMAIN))]
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key within the Secret's data.
    #[validate(length(min = 1, max = 253), regex(path = *patterns::SECRET_KEY))]
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::SECRET_KEY_PATTERN))]
    pub key: String,
}

impl SecretKeyRef {
    /// The environment variable that holds this secret in local mode.
    pub fn environment_variable(&self) -> String {
        let normalise = |text: &str| {
            text.chars()
                .map(|character| if character.is_ascii_alphanumeric() { character.to_ascii_uppercase() } else { '_' })
                .collect::<String>()
        };
        format!("NSTREAM_SECRET_{}_{}", normalise(&self.name), normalise(&self.key))
    }
}

/// Where a credential comes from: a value in the spec or a Secret reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource<'a> {
    /// The value is inline in the spec.
    Inline(&'a SecretString),
    /// The value lives in a Kubernetes Secret.
    Reference(&'a SecretKeyRef),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = SecretString::new("sk-live-123456");
        assert_eq!(format!("{secret:?}"), "SecretString(***)");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(secret.expose(), "sk-live-123456");
    }

    #[test]
    fn serialises_as_plain_value_for_round_trips() {
        let secret = SecretString::new("abc");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"abc\"");
    }

    #[test]
    fn shape_problems_reveal_nothing() {
        assert_eq!(SecretString::new("").shape_problem(), Some("an empty value"));
        let problem = SecretString::new("key\n").shape_problem().unwrap();
        assert!(!problem.contains("key"));
        assert_eq!(SecretString::new("key").shape_problem(), None);
    }

    #[test]
    fn environment_variable_name_is_normalised() {
        let reference = SecretKeyRef { name: "azure-openai".into(), key: "api.key".into() };
        assert_eq!(reference.environment_variable(), "NSTREAM_SECRET_AZURE_OPENAI_API_KEY");
    }
}
