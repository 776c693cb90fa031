//! The result of [`crate::HostedBackend::check`]: a live connectivity check with a diagnosis.

use std::fmt;
use std::time::Duration;

use nstream_core::MegaModelProvider;

use crate::error::ProviderError;

/// What went wrong in a check, with the usual cause spelled out by [`CheckProblem::hint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckProblem {
    /// 401: the key was refused.
    Unauthorized,
    /// 403: the key is valid but may not use this resource or model.
    Forbidden,
    /// Azure 404 `DeploymentNotFound`.
    DeploymentNotFound,
    /// OpenAI or Anthropic 404: no such model for this key.
    ModelNotFound,
    /// Azure refused the `api-version`.
    UnsupportedApiVersion,
    /// Any other 404: the endpoint is not the API's base URL.
    ResourceNotFound,
    /// 429 that waiting fixes: the MegaModel works but is busy now.
    RateLimited,
    /// 429 that waiting does not fix: no quota or credit left.
    QuotaExceeded,
    /// No HTTP answer: DNS, connection, proxy or TLS failure.
    Unreachable,
    /// No answer within the timeout.
    Timeout,
    /// Any other error answer.
    ProviderError,
}

impl CheckProblem {
    pub(crate) fn classify(status: u16, error: &ProviderError) -> Self {
        let message = error.message.to_ascii_lowercase();
        let code = error.code.as_deref().unwrap_or_default();
        match status {
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 if code == "DeploymentNotFound" => Self::DeploymentNotFound,
            404 if code == "model_not_found" || error.error_type.as_deref() == Some("not_found_error") => {
                Self::ModelNotFound
            }
            400 | 404 if message.contains("api version") || message.contains("api-version") => {
                Self::UnsupportedApiVersion
            }
            404 if message.contains("model") => Self::ModelNotFound,
            404 => Self::ResourceNotFound,
            429 if error.is_permanent_quota_error() => Self::QuotaExceeded,
            429 | 529 => Self::RateLimited,
            _ if error.is_permanent_quota_error() => Self::QuotaExceeded,
            _ => Self::ProviderError,
        }
    }

    /// What usually causes this and what to change.
    pub fn hint(self) -> &'static str {
        match self {
            Self::Unauthorized => {
                "the provider refused the key: check apikey/apikeySecretRef (a stray newline in a Secret is common); for Azure the key must belong to the resource of `endpoint`"
            }
            Self::Forbidden => {
                "the key is valid but not allowed here: check the resource's network rules or the project/organization"
            }
            Self::DeploymentNotFound => {
                "no deployment of that name in this Azure resource: `deployment` is the deployment name (not the model name); a deployment created in the last few minutes may not be visible yet"
            }
            Self::ModelNotFound => "the model does not exist or this key may not use it: check `model`",
            Self::UnsupportedApiVersion => {
                "the resource does not accept this api-version: use a current one such as 2024-10-21, or `preview`/`latest` for the v1 API"
            }
            Self::ResourceNotFound => {
                "the endpoint answered 404: Azure wants the resource endpoint (https://NAME.openai.azure.com), OpenAI-compatible APIs the base URL ending in /v1 (or the provider's documented base)"
            }
            Self::RateLimited => "reachable and authorised, but rate-limited right now",
            Self::QuotaExceeded => "the account has no quota or credit left: raise the quota or the spend limit",
            Self::Unreachable => "no connection: check the endpoint's host name, DNS, proxy and firewall",
            Self::Timeout => "the provider did not answer in time: check the network path or raise the timeout",
            Self::ProviderError => "the provider refused the check request; its message says why",
        }
    }
}

/// The outcome of a connectivity check. It never contains the key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// The MegaModel's name.
    pub name: String,
    /// Its provider.
    pub provider: MegaModelProvider,
    /// The endpoint checked.
    pub endpoint: String,
    /// The Azure deployment or the model.
    pub target: String,
    /// The HTTP status of the answer, when there was one.
    pub status: Option<u16>,
    /// How long the call took.
    pub latency: Option<Duration>,
    /// What went wrong; `None` when the check passed.
    pub problem: Option<CheckProblem>,
    /// The provider's message, or what was verified.
    pub detail: String,
}

impl CheckReport {
    /// A report that has found nothing yet (no status, no problem), for `target` at `endpoint`.
    pub fn new(name: &str, provider: MegaModelProvider, endpoint: &str, target: &str) -> Self {
        Self {
            name: name.to_owned(),
            provider,
            endpoint: endpoint.to_owned(),
            target: target.to_owned(),
            status: None,
            latency: None,
            problem: None,
            detail: String::new(),
        }
    }

    /// Whether the MegaModel can serve: no problem, or only a momentary rate limit.
    pub fn is_ok(&self) -> bool {
        matches!(self.problem, None | Some(CheckProblem::RateLimited))
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_ok() { "ok" } else { "FAILED" };
        write!(formatter, "{}: {verdict} ({} {} at {}", self.name, self.provider.as_str(), self.target, self.endpoint)?;
        if let Some(status) = self.status {
            write!(formatter, ", HTTP {status}")?;
        }
        if let Some(latency) = self.latency {
            write!(formatter, ", {} ms", latency.as_millis())?;
        }
        write!(formatter, "): {}", self.detail)?;
        if let Some(problem) = self.problem {
            write!(formatter, "; {problem:?}: {}", problem.hint())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: &str) -> ProviderError {
        ProviderError::parse(body.as_bytes())
    }

    #[test]
    fn classifies_the_usual_failures() {
        let not_found = parsed(
            r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#,
        );
        assert_eq!(CheckProblem::classify(404, &not_found), CheckProblem::DeploymentNotFound);
        let version = parsed(r#"{"error":{"code":"BadRequest","message":"API version not supported"}}"#);
        assert_eq!(CheckProblem::classify(400, &version), CheckProblem::UnsupportedApiVersion);
        let denied = parsed(r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key"}}"#);
        assert_eq!(CheckProblem::classify(401, &denied), CheckProblem::Unauthorized);
        assert_eq!(
            CheckProblem::classify(404, &parsed(r#"{"error":{"code":"404","message":"Resource not found"}}"#)),
            CheckProblem::ResourceNotFound
        );
        let model = parsed(
            r#"{"error":{"message":"The model `gpt-9` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#,
        );
        assert_eq!(CheckProblem::classify(404, &model), CheckProblem::ModelNotFound);
        let quota = parsed(
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
        );
        assert_eq!(CheckProblem::classify(429, &quota), CheckProblem::QuotaExceeded);
        assert_eq!(CheckProblem::classify(529, &parsed("overloaded")), CheckProblem::RateLimited);
    }

    #[test]
    fn reports_read_as_one_line_with_the_hint() {
        let mut report = CheckReport::new("gpt", MegaModelProvider::AzureOpenAI, "https://r.openai.azure.com", "gpt4o");
        report.status = Some(404);
        report.latency = Some(Duration::from_millis(42));
        report.problem = Some(CheckProblem::DeploymentNotFound);
        report.detail = "DeploymentNotFound: missing".into();
        let line = report.to_string();
        assert!(
            line.starts_with("gpt: FAILED (AzureOpenAI gpt4o at https://r.openai.azure.com, HTTP 404, 42 ms)"),
            "{line}"
        );
        assert!(line.contains("deployment name (not the model name)"), "{line}");
        assert!(!report.is_ok());
    }
}
