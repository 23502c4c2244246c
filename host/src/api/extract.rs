//! Extractors that turn every kind of bad input into an [`ApiError`] problem document
//! (axum's own rejections are plain text): JSON bodies, path and query parameters, and the
//! authenticated caller.

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use super::limits::FailureGate;
use crate::auth::Principal;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body: `application/json`, at most [`MAX_BODY_BYTES`], strict deserialisation.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let JsonBytes(bytes) = JsonBytes::from_request(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::Validation(format!("invalid JSON body: {e}")))
    }
}

/// The raw bytes of a JSON body (for handlers that authenticate the exact bytes before
/// parsing them): `application/json`, at most [`MAX_BODY_BYTES`].
pub struct JsonBytes(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = content_type.split(';').next().unwrap_or("").trim();
        let is_json = mime.eq_ignore_ascii_case("application/json")
            || (mime.starts_with("application/") && mime.ends_with("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(format!(
                "request body must be application/json, got {:?}",
                if content_type.is_empty() {
                    "no Content-Type"
                } else {
                    content_type
                }
            )));
        }
        let too_large = || {
            ApiError::PayloadTooLarge(format!(
                "request body exceeds the limit of {MAX_BODY_BYTES} bytes"
            ))
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map(JsonBytes)
            .map_err(|e| unreadable_body(&e, too_large))
    }
}

/// Whether the request says its body is `application/x-www-form-urlencoded` (parameters of
/// the media type, such as a charset, allowed).
pub(crate) fn is_form(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// What a request body that could not be read is answered with: `too_large` past the limit,
/// 408 when it did not arrive within `[limits] body_read_timeout_ms`, else 400.
pub(crate) fn unreadable_body(e: &axum::Error, too_large: impl FnOnce() -> ApiError) -> ApiError {
    if is_length_limit(e) {
        too_large()
    } else if super::serve::is_body_timeout(e) {
        ApiError::RequestTimeout(format!("could not read request body: {e}"))
    } else {
        ApiError::Validation(format!("could not read request body: {e}"))
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Path parameters with problem-document rejections.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e| ApiError::Validation(format!("invalid path: {}", e.body_text())))
    }
}

/// Query parameters with problem-document rejections (unknown parameters are refused by
/// the target type's `deny_unknown_fields`).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::Validation(format!("invalid query: {}", e.body_text())))
    }
}

/// The authenticated caller of an admin endpoint.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = match parts.headers.get(header::AUTHORIZATION) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::Unauthorized("Authorization header is not valid text".into())
            })?),
        };
        let gate = FailureGate::of_request(state.auth_failures.as_deref(), &parts.extensions);
        if let Some(gate) = gate {
            gate.check()?;
        }
        let principal = match state.auth.authenticate(header).await {
            Ok(p) => p,
            Err(e) => {
                if let (crate::auth::AuthError::Unauthenticated(_), Some(gate)) = (&e, gate) {
                    gate.failed();
                }
                return Err(e.into());
            }
        };
        if let Some(limiter) = &state.rate_limit
            && let Err(wait) = limiter.check(&principal.actor(), std::time::Instant::now())
        {
            return Err(ApiError::RateLimited {
                detail: format!(
                    "too many requests from {}: the limit is {} per caller ([limits] requests_per_second)",
                    principal.actor(),
                    limiter.describe()
                ),
                retry_after_secs: super::limits::retry_after_secs(wait),
            });
        }
        Ok(Caller(principal))
    }
}
