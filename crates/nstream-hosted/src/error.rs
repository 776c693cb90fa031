//! The crate's error type (building a backend) and the lenient parsing of provider error bodies.

use serde_json::Value;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a [`crate::HostedBackend`] could not be built. Request-time failures are
/// [`nstream_backend::BackendError`]s instead, because they travel through the `ModelBackend` trait.
///
/// No variant ever holds the API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `modelTemplate` lacks the template of `modelProvider` (validation normally catches this).
    #[error("modelProvider is {provider} but modelTemplate.{template} is missing")]
    MissingTemplate {
        /// The provider named in the spec.
        provider: &'static str,
        /// The template field that should be set.
        template: &'static str,
    },
    /// The endpoint is not an `http://` or `https://` URL.
    #[error("endpoint {endpoint:?} must be an http:// or https:// URL")]
    InvalidEndpoint {
        /// The endpoint as written.
        endpoint: String,
    },
    /// The endpoint is a plain `http://` URL to a host outside this machine and the cluster: the
    /// key would cross networks unencrypted. See [`nstream_core::validate::plain_http_refused`].
    #[error(
        "endpoint {endpoint:?} is plain http:// to a host that is neither loopback nor cluster-local; expected {}",
        nstream_core::validate::PLAIN_HTTP_EXPECTED
    )]
    InsecureEndpoint {
        /// The endpoint as written.
        endpoint: String,
    },
    /// The API key is empty or cannot be sent as an HTTP header value.
    #[error("the API key is empty or contains characters that cannot be sent in an HTTP header")]
    InvalidApiKey,
    /// A [`crate::HostedOptions`] value is out of range.
    #[error("invalid option `{option}`: {reason}")]
    InvalidOption {
        /// The option's field name.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("could not build the HTTP client: {0}")]
    Client(String),
}

/// What a provider said when it refused a request, parsed leniently from any of the shapes seen
/// in the wild: OpenAI's `{"error": {...}}` (with `code` as a string, an integer or null, and
/// Azure's `innererror`), Anthropic's `{"type": "error", "error": {...}}`, Azure API Management's
/// top-level `{"statusCode": 429, "message": ...}`, and non-JSON bodies from gateways and proxies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderError {
    /// The human-readable message (never empty: falls back to a description of the body).
    pub message: String,
    /// OpenAI `type` or Anthropic `error.type` (`insufficient_quota`, `overloaded_error`...).
    pub error_type: Option<String>,
    /// `code`, as a string whatever its JSON type (`DeploymentNotFound`, `"429"`, `rate_limit_exceeded`).
    pub code: Option<String>,
    /// Azure's `innererror.code` (`ResponsibleAIPolicyViolation`).
    pub inner_code: Option<String>,
}

/// Longest stretch of a non-JSON body kept in a message: enough to recognise a gateway page.
const MAX_RAW_BODY: usize = 200;

impl ProviderError {
    /// Parses an error body; never fails.
    pub fn parse(body: &[u8]) -> Self {
        match serde_json::from_slice::<Value>(body) {
            Ok(value) => Self::from_json(&value).unwrap_or_else(|| Self::from_raw(body)),
            Err(_) => Self::from_raw(body),
        }
    }

    fn from_json(value: &Value) -> Option<Self> {
        let object = value.as_object()?;
        // `{"error": {...}}` (OpenAI, Azure, Anthropic) or `{"error": "text"}` (some gateways).
        let (error, outer) = match object.get("error") {
            Some(Value::Object(error)) => (error, Some(object)),
            Some(Value::String(message)) => {
                return Some(Self { message: message.clone(), ..Self::default() });
            }
            _ => (object, None),
        };
        let message = text(error.get("message"))
            .or_else(|| outer.and_then(|outer| text(outer.get("message"))))
            .or_else(|| text(error.get("detail")))?;
        let code = text(error.get("code")).or_else(|| text(error.get("statusCode")));
        let inner = error.get("innererror").or_else(|| error.get("inner_error"));
        Some(Self {
            message,
            error_type: text(error.get("type")),
            code,
            inner_code: inner.and_then(|inner| text(inner.get("code"))),
        })
    }

    fn from_raw(body: &[u8]) -> Self {
        let raw = String::from_utf8_lossy(body);
        let trimmed = raw.trim();
        let message = if trimmed.is_empty() {
            "empty error body".to_owned()
        } else {
            let mut shortened: String = trimmed.chars().take(MAX_RAW_BODY).collect();
            if shortened.len() < trimmed.len() {
                shortened.push_str("...");
            }
            format!("unrecognised error body: {shortened}")
        };
        Self { message, ..Self::default() }
    }

    /// Whether the provider says the account is out of quota or over a spend limit, which no
    /// amount of waiting fixes.
    pub fn is_permanent_quota_error(&self) -> bool {
        const PERMANENT: [&str; 4] =
            ["insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "access_terminated"];
        let named = |field: &Option<String>| field.as_deref().is_some_and(|value| PERMANENT.contains(&value));
        let message = self.message.to_ascii_lowercase();
        named(&self.code)
            || named(&self.error_type)
            || message.contains("exceeded your current quota")
            || message.contains("credit balance is too low")
            || message.contains("spend limit")
    }

    /// `code: message` with the inner code when there is one: what an operator needs to see.
    pub fn describe(&self) -> String {
        let mut described = String::new();
        if let Some(code) = self.code.as_deref().or(self.error_type.as_deref()) {
            described.push_str(code);
            if let Some(inner) = &self.inner_code {
                described.push_str(" (");
                described.push_str(inner);
                described.push(')');
            }
            described.push_str(": ");
        }
        described.push_str(&self.message);
        described
    }
}

/// A JSON string, number or boolean as text; `None` for null, absent, empty or structured values.
fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_errors() {
        let error = ProviderError::parse(
            br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        );
        assert_eq!(error.code.as_deref(), Some("insufficient_quota"));
        assert!(error.is_permanent_quota_error());
        assert_eq!(error.describe(), "insufficient_quota: You exceeded your current quota");
    }

    #[test]
    fn parses_azure_integer_codes_and_innererror() {
        let error = ProviderError::parse(br#"{"error":{"code":429,"message":"Requests have exceeded the limit."}}"#);
        assert_eq!(error.code.as_deref(), Some("429"));
        assert!(!error.is_permanent_quota_error());
        let filtered = ProviderError::parse(
            br#"{"error":{"message":"filtered","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{}}}}"#,
        );
        assert_eq!(filtered.describe(), "content_filter (ResponsibleAIPolicyViolation): filtered");
        let management =
            ProviderError::parse(br#"{"statusCode":429,"message":"Rate limit is exceeded. Try again in 1 seconds."}"#);
        assert_eq!(management.code.as_deref(), Some("429"));
        assert!(management.message.starts_with("Rate limit"));
    }

    #[test]
    fn parses_anthropic_errors() {
        let error =
            ProviderError::parse(br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
        assert_eq!(error.error_type.as_deref(), Some("overloaded_error"));
        assert_eq!(error.describe(), "overloaded_error: Overloaded");
    }

    #[test]
    fn tolerates_gateway_pages_empty_bodies_and_odd_json() {
        let html = ProviderError::parse(b"<html><body>502 Bad Gateway</body></html>");
        assert!(html.message.starts_with("unrecognised error body: <html>"));
        assert_eq!(ProviderError::parse(b"  ").message, "empty error body");
        assert!(ProviderError::parse(&[b'x'; 1000]).message.ends_with("..."));
        assert!(ProviderError::parse(b"[1,2]").message.contains("[1,2]"));
        assert_eq!(ProviderError::parse(br#"{"error":"nope"}"#).message, "nope");
        // JSON without a message is described by its raw text, which still helps an operator.
        assert!(ProviderError::parse(br#"{"error":{"code":null}}"#).message.contains(r#"{"code":null}"#));
        assert!(ProviderError::parse(&[0xff, 0xfe, 0x00]).message.starts_with("unrecognised error body"));
    }
}
