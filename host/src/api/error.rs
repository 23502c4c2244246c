//! The one error type of the HTTP edge and its RFC 9457 problem document. Conversion from
//! lower layers happens here; `into_response` only renders (logging is middleware's job,
//! except for 5xx causes, which are logged when converted because the client never sees them).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::domain::ProblemCode;
use crate::domain::rules::ValidationError;
use crate::store::StoreError;

/// Every error the API can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or out-of-bounds input.
    #[error("{0}")]
    Validation(String),
    /// Body larger than the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A connector manifest is invalid.
    #[error("{0}")]
    InvalidManifest(String),
    /// A connector component does not load (not a component, wrong world, fails at start).
    #[error("{0}")]
    InvalidComponent(String),
    /// Body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Missing or invalid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials without the permission.
    #[error("{0}")]
    Forbidden(String),
    /// A domain refusal: the data does not allow the change or read (404, 409, 422). The
    /// code says which; [`status_of`] gives its status.
    #[error("{detail}")]
    Refused {
        /// Which refusal.
        code: ProblemCode,
        /// What was refused and why.
        detail: String,
    },
    /// The caller used up its request budget (429, with `Retry-After` in whole seconds).
    #[error("{detail}")]
    RateLimited {
        /// What happened and the limit.
        detail: String,
        /// Seconds until a request is accepted again.
        retry_after_secs: u64,
    },
    /// The route exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request body did not arrive in time (`[limits] body_read_timeout_ms`).
    #[error("{0}")]
    RequestTimeout(String),
    /// The store cannot take requests right now.
    #[error("{0}")]
    Unavailable(String),
    /// New sessions are held while deliveries to connectors catch up (503, `Retry-After`).
    #[error("{detail}")]
    Backlogged {
        /// The lag and the budget.
        detail: String,
        /// Seconds before trying again.
        retry_after_secs: u64,
    },
    /// Our fault; details stay in the logs.
    #[error("internal error")]
    Internal,
}

/// The media type of every [`Problem`] answer (RFC 9457), on the wire and in the OpenAPI
/// document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// RFC 9457 problem document with Lockstep's stable `code`.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// URI identifying the problem type.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// Explanation of this occurrence.
    pub detail: String,
    /// Stable machine-readable code.
    pub code: ProblemCode,
}

/// The HTTP status of each problem code: the one place that says it. (VALIDATION is also sent
/// with 415 for a body of the wrong media type: [`ApiError::status_and_code`].)
pub fn status_of(code: ProblemCode) -> StatusCode {
    match code {
        ProblemCode::Validation | ProblemCode::InvalidManifest => StatusCode::BAD_REQUEST,
        ProblemCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ProblemCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ProblemCode::Forbidden => StatusCode::FORBIDDEN,
        ProblemCode::NotFound | ProblemCode::ParentNotFound => StatusCode::NOT_FOUND,
        ProblemCode::AlreadyExists
        | ProblemCode::ParentNotActive
        | ProblemCode::WrongKind
        | ProblemCode::Conflict
        | ProblemCode::DuplicateEvent => StatusCode::CONFLICT,
        ProblemCode::InvalidComponent
        | ProblemCode::CascadeTooLarge
        | ProblemCode::TreeTooLarge => StatusCode::UNPROCESSABLE_ENTITY,
        ProblemCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ProblemCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ProblemCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ProblemCode::Unavailable | ProblemCode::DeliveryBacklog => StatusCode::SERVICE_UNAVAILABLE,
        ProblemCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ApiError {
    /// A domain refusal with this code.
    pub fn refused(code: ProblemCode, detail: String) -> Self {
        ApiError::Refused { code, detail }
    }

    /// The stable code of this error.
    pub fn code(&self) -> ProblemCode {
        match self {
            ApiError::Validation(_) | ApiError::UnsupportedMediaType(_) => ProblemCode::Validation,
            ApiError::PayloadTooLarge(_) => ProblemCode::PayloadTooLarge,
            ApiError::InvalidManifest(_) => ProblemCode::InvalidManifest,
            ApiError::InvalidComponent(_) => ProblemCode::InvalidComponent,
            ApiError::Unauthorized(_) => ProblemCode::Unauthorized,
            ApiError::Forbidden(_) => ProblemCode::Forbidden,
            ApiError::Refused { code, .. } => *code,
            ApiError::RateLimited { .. } => ProblemCode::RateLimited,
            ApiError::MethodNotAllowed(_) => ProblemCode::MethodNotAllowed,
            ApiError::RequestTimeout(_) => ProblemCode::RequestTimeout,
            ApiError::Unavailable(_) => ProblemCode::Unavailable,
            ApiError::Backlogged { .. } => ProblemCode::DeliveryBacklog,
            ApiError::Internal => ProblemCode::Internal,
        }
    }

    /// HTTP status and stable code.
    pub fn status_and_code(&self) -> (StatusCode, ProblemCode) {
        let code = self.code();
        let status = match self {
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => status_of(code),
        };
        (status, code)
    }

    /// The code an audit record gives this error when it refuses an action the caller was
    /// allowed to ask for ([`ProblemCode::audited`]); `None` for what is logged, not audited.
    pub fn refusal_code(&self) -> Option<ProblemCode> {
        Some(self.code()).filter(|code| code.audited())
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let (status, code) = self.status_and_code();
        Problem {
            problem_type: format!(
                "urn:lockstep:problem:{}",
                code.as_str().to_ascii_lowercase().replace('_', "-")
            ),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        let retry_after = match &self {
            ApiError::RateLimited {
                retry_after_secs, ..
            }
            | ApiError::Backlogged {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body was not read, so this connection cannot carry another
            // request; tell the client instead of letting it reuse a dead connection.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::Validation(e.0)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => ApiError::Unauthorized(m),
            AuthError::Forbidden(m) => ApiError::Forbidden(m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let Some(code) = e.refusal() {
            let detail = match &e {
                StoreError::Replayed(id) => format!("event {id:?} was already applied"),
                _ => e.to_string(),
            };
            return ApiError::Refused { code, detail };
        }
        match e {
            StoreError::Unavailable => ApiError::Unavailable(e.to_string()),
            StoreError::Database(sqlx::Error::PoolTimedOut) => {
                tracing::warn!("database pool exhausted");
                ApiError::Unavailable("the database is busy; retry shortly".into())
            }
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::Internal
            }
        }
    }
}

/// A JSON answer that no cache may keep (`Cache-Control: no-store`): the shape every
/// token- and event-carrying route answers with (RFC 6749 §5.1, RFC 8935, RFC 8936).
pub(crate) fn no_store_json(
    status: axum::http::StatusCode,
    body: impl serde::Serialize,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_refusal_is_a_503_with_retry_after() {
        let response = ApiError::Backlogged {
            detail: "behind".into(),
            retry_after_secs: 1,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            ApiError::Backlogged {
                detail: String::new(),
                retry_after_secs: 1
            }
            .problem()
            .code,
            ProblemCode::DeliveryBacklog
        );
    }

    /// The published list of codes is the enum: each code, with its status, has a row in
    /// docs/api.md's table of errors.
    #[test]
    fn every_code_is_documented_with_its_status() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let errors = &doc[doc.find("## Errors").unwrap()..];
        for code in ProblemCode::ALL {
            let status = status_of(*code).as_u16();
            let documented = errors.lines().any(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                cells.get(1) == Some(&status.to_string().as_str())
                    && cells
                        .get(2)
                        .is_some_and(|c| c.split('/').any(|w| w.trim() == code.as_str()))
            });
            assert!(
                documented,
                "{code} ({status}) has no row in docs/api.md, Errors"
            );
        }
    }

    #[test]
    fn store_refusals_are_audited_with_the_code_the_client_sees() {
        let refusals = [
            StoreError::AlreadyExists("a".into()),
            StoreError::NotFound("a".into()),
            StoreError::ParentNotFound("a".into()),
            StoreError::ParentNotActive {
                id: "a".into(),
                status: crate::domain::SessionStatus::Destroyed,
            },
            StoreError::WrongKind("a".into()),
            StoreError::Replayed("a".into()),
            StoreError::CascadeTooLarge {
                target: "a".into(),
                sessions: 3,
                limit: 2,
            },
        ];
        for e in refusals {
            let store_code = e.refusal_code();
            let api = ApiError::from(e);
            assert_eq!(store_code, Some(api.status_and_code().1));
            assert_eq!(api.refusal_code(), store_code);
        }
        assert_eq!(StoreError::Unavailable.refusal_code(), None);
        assert_eq!(ApiError::Forbidden("x".into()).refusal_code(), None);
        assert_eq!(ApiError::Validation("x".into()).refusal_code(), None);
    }
}
