//! `ApiError`: the one place where failures become OpenAI-shaped HTTP responses.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nstream_backend::BackendError;
use serde::Serialize;

/// An error answer: `{"error":{"message","type","param","code"}}` with the right status and,
/// when the client should come back later, a `Retry-After` header.
///
/// Server-side failures (5xx) carry a detail that is logged when the response is built and never
/// sent to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError(Box<Details>);

/// Boxed so `Result<_, ApiError>` stays one pointer wide on the happy path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Details {
    status: StatusCode,
    message: String,
    error_type: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after_seconds: Option<u64>,
    detail: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

/// The OpenAI error object, also sent as an SSE event when a stream fails midway.
#[derive(Serialize)]
pub(crate) struct ErrorFields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(Details {
            status,
            message: message.into(),
            error_type,
            param: None,
            code: None,
            retry_after_seconds: None,
            detail: None,
        }))
    }

    fn with_param(mut self, param: impl Into<String>) -> Self {
        self.0.param = Some(param.into());
        self
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.0.code = Some(code);
        self
    }

    /// 400 about the request as a whole or, with `param`, about one field.
    pub fn bad_request(message: impl Into<String>, param: Option<String>) -> Self {
        let mut error = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        error.0.param = param;
        error
    }

    /// 404 for a `model` that is not served.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 404 for a path no route serves.
    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("Invalid URL ({method} {path})"))
            .with_code("unknown_url")
    }

    /// 405 for a known path with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("Method {method} is not allowed on {path}"),
        )
        .with_code("method_not_allowed")
    }

    /// 409 for a request that conflicts with the server's state (unloading an adapter in use).
    pub fn conflict(message: impl Into<String>, param: &str) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message).with_param(param).with_code("conflict")
    }

    /// 401 for a missing or wrong bearer key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message).with_code("invalid_api_key")
    }

    /// 403 for a key that may not use a route at all (a key limited to some models managing
    /// adapters).
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message).with_code("insufficient_permissions")
    }

    /// 429 for a key past its own requests or tokens per minute, with `Retry-After`; `limit` is
    /// OpenAI's error type for it, `"requests"` or `"tokens"`.
    pub fn rate_limit_exceeded(limit: &'static str, message: impl Into<String>, retry_after_seconds: u64) -> Self {
        let mut error = Self::new(StatusCode::TOO_MANY_REQUESTS, limit, message).with_code("rate_limit_exceeded");
        error.0.retry_after_seconds = Some(retry_after_seconds.max(1));
        error
    }

    /// 413 for a `POST /v1/files` upload over `limit_bytes`.
    pub fn upload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The uploaded file is larger than the server's upload limit of {limit_bytes} bytes; split it into smaller files"),
        )
        .with_code("request_too_large")
    }

    /// 413 for a body over the configured limit.
    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "Request body is larger than the server's limit of {limit_bytes} bytes; send fewer or shorter inputs per request"
            ),
        )
        .with_code("request_too_large")
    }

    /// 415 for a body that is not declared as JSON.
    pub fn unsupported_media_type(received: Option<&str>) -> Self {
        let received = received.map_or_else(
            || "no Content-Type header".to_owned(),
            |content_type| format!("Content-Type `{content_type}`"),
        );
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("Expected a request with `Content-Type: application/json`, got {received}"),
        )
        .with_code("unsupported_media_type")
    }

    /// 429 when the server already serves [`crate::ServerConfig::max_concurrent_requests`]
    /// requests; the client should retry after a second.
    pub fn server_overloaded(limit: usize) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("The server is serving its limit of {limit} concurrent requests; retry shortly"),
        )
        .with_code("server_overloaded");
        error.0.retry_after_seconds = Some(1);
        error
    }

    /// 408 for a client that did not send its body within `limit`.
    pub fn body_read_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("The request body was not received within {} s", limit.as_secs_f64()),
        )
        .with_code("request_timeout")
    }

    /// 504 for a request the server did not answer within `limit`.
    pub fn request_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!("The request was not answered within the server's limit of {} s", limit.as_secs_f64()),
        )
        .with_code("request_timeout")
    }

    /// The error event that ends a stream past [`crate::ServerConfig::stream_deadline`].
    pub fn stream_deadline_exceeded(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!("The stream reached the server's limit of {} s and was ended", limit.as_secs_f64()),
        )
        .with_code("stream_deadline_exceeded")
    }

    /// 503 (or the error event that ends a stream) when the server stops before the request is
    /// done; another replica can serve a retry.
    pub fn server_shutting_down() -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The server is shutting down and ended the request; retry it",
        )
        .with_code("server_shutting_down");
        error.0.retry_after_seconds = Some(1);
        error
    }

    /// 500 whose `detail` is logged, not returned.
    pub fn internal(detail: impl Into<String>) -> Self {
        let mut error = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an internal error while processing the request",
        )
        .with_code("internal_error");
        error.0.detail = Some(detail.into());
        error
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The client-facing message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The `param` field.
    pub fn param(&self) -> Option<&str> {
        self.0.param.as_deref()
    }

    /// The `code` field.
    pub fn code(&self) -> Option<&'static str> {
        self.0.code
    }

    pub(crate) fn fields(&self) -> ErrorFields<'_> {
        ErrorFields {
            message: &self.0.message,
            error_type: self.0.error_type,
            param: self.0.param.as_deref(),
            code: self.0.code,
        }
    }

    /// Logs 5xx errors with their hidden detail; 4xx are the client's business, logged at debug.
    pub(crate) fn log(&self) {
        if self.0.status.is_server_error() {
            tracing::error!(
                status = self.0.status.as_u16(),
                code = self.0.code,
                detail = self.0.detail.as_deref().unwrap_or(&self.0.message),
                "request failed"
            );
        } else {
            tracing::debug!(status = self.0.status.as_u16(), code = self.0.code, message = %self.0.message, "request rejected");
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(error: BackendError) -> Self {
        let status = StatusCode::from_u16(error.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self(Box::new(Details {
            status,
            message: error.public_message(),
            error_type: error.error_type(),
            param: error.param().map(str::to_owned),
            code: error.code(),
            retry_after_seconds: error.retry_after_seconds(),
            detail: error.is_server_error().then(|| error.to_string()),
        }))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let body = ErrorBody { error: self.fields() };
        let mut response = (self.0.status, Json(body)).into_response();
        if let Some(seconds) = self.0.retry_after_seconds {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.0.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self.0.status, StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT) {
            // The rest of an oversized or late body may still be in flight: the connection cannot
            // be reused.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn backend_errors_keep_their_mapping_and_hide_internals() {
        let overloaded = ApiError::from(BackendError::Overloaded { retry_after: Duration::from_secs(2) });
        assert_eq!(overloaded.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = overloaded.into_response();
        assert_eq!(response.headers().get(header::RETRY_AFTER), Some(&HeaderValue::from(2u64)));

        let internal = ApiError::from(BackendError::Internal("secret path /root/x".into()));
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!internal.message().contains("/root"));
    }
}
