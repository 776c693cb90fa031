//! Secrets in local mode: a Kubernetes Secret reference is read from an environment variable or
//! from a folder laid out like a mounted Secret volume.

use std::path::PathBuf;

use nstream_core::{SecretKeyRef, SecretSource, SecretString};

use crate::error::{ProviderError, Result};

/// Reads an environment variable by name.
type VariableLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Where local mode looks up Secret references. Built from the process environment in
/// production and from a map in tests.
pub struct SecretLookup {
    variable: VariableLookup,
    secrets_dir: Option<PathBuf>,
}

impl SecretLookup {
    /// Reads `NSTREAM_SECRET_*` variables and `$NSTREAM_SECRETS_DIR/<name>/<key>` files.
    pub fn from_env() -> Self {
        Self {
            variable: Box::new(|name| std::env::var(name).ok()),
            secrets_dir: std::env::var_os("NSTREAM_SECRETS_DIR").map(PathBuf::from),
        }
    }

    /// A lookup over a function and an optional folder (for tests).
    pub fn new(
        variable: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
        secrets_dir: Option<PathBuf>,
    ) -> Self {
        Self { variable: Box::new(variable), secrets_dir }
    }

    fn reference(&self, reference: &SecretKeyRef) -> Result<SecretString> {
        let variable = reference.environment_variable();
        if let Some(value) = (self.variable)(&variable) {
            return Ok(SecretString::new(value));
        }
        if let Some(folder) = &self.secrets_dir
            && let Ok(value) = std::fs::read_to_string(folder.join(&reference.name).join(&reference.key))
        {
            // Files made with `echo` end in a newline that is not part of the secret.
            return Ok(SecretString::new(value.trim_end_matches(['\n', '\r'])));
        }
        Err(ProviderError::SecretMissing { name: reference.name.clone(), key: reference.key.clone(), variable })
    }
}

/// The value of a secret from a spec: inline, or through `lookup`.
pub fn resolve_secret(source: &SecretSource<'_>, lookup: &SecretLookup) -> Result<SecretString> {
    match source {
        SecretSource::Inline(value) => Ok((*value).clone()),
        SecretSource::Reference(reference) => lookup.reference(reference),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> SecretKeyRef {
        SecretKeyRef { name: "hf-token".into(), key: "token".into() }
    }

    #[test]
    fn reads_the_environment_variable_first() {
        let lookup = SecretLookup::new(
            |name| (name == "NSTREAM_SECRET_HF_TOKEN_TOKEN").then(|| "hf_from_env".to_string()),
            None,
        );
        let reference = reference();
        let value = resolve_secret(&SecretSource::Reference(&reference), &lookup).unwrap();
        assert_eq!(value.expose(), "hf_from_env");
    }

    #[test]
    fn reads_a_mounted_secret_folder() {
        let folder = std::env::temp_dir().join(format!("nstream-secrets-{}", std::process::id()));
        std::fs::create_dir_all(folder.join("hf-token")).unwrap();
        std::fs::write(folder.join("hf-token/token"), "hf_from_file\n").unwrap();
        let lookup = SecretLookup::new(|_| None, Some(folder.clone()));
        let reference = reference();
        let value = resolve_secret(&SecretSource::Reference(&reference), &lookup).unwrap();
        assert_eq!(value.expose(), "hf_from_file");
        std::fs::remove_dir_all(folder).unwrap();
    }

    #[test]
    fn a_missing_secret_names_where_to_put_it_and_nothing_else() {
        let lookup = SecretLookup::new(|_| None, None);
        let reference = reference();
        let error = resolve_secret(&SecretSource::Reference(&reference), &lookup).unwrap_err().to_string();
        assert!(error.contains("NSTREAM_SECRET_HF_TOKEN_TOKEN"), "{error}");
        assert!(error.contains("hf-token/token"), "{error}");
    }

    #[test]
    fn inline_values_pass_through() {
        let lookup = SecretLookup::new(|_| None, None);
        let inline = SecretString::new("value");
        assert_eq!(resolve_secret(&SecretSource::Inline(&inline), &lookup).unwrap().expose(), "value");
    }
}
