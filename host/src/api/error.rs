//! The one error type of the HTTP edge and its RFC 9457 problem document. Conversion from
//! lower layers happens here; `into_response` only renders (logging is middleware's job,
//! except for 5xx causes, which are logged when converted because the client never sees them).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
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
    /// The named resource does not exist (in this realm).
    #[error("{0}")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// A CHILD names a missing parent.
    #[error("{0}")]
    ParentNotFound(String),
    /// A CHILD names an ended parent.
    #[error("{0}")]
    ParentNotActive(String),
    /// A destroy named the wrong kind of session.
    #[error("{0}")]
    WrongKind(String),
    /// The resource is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// An IdP event with this id was applied before.
    #[error("{0}")]
    DuplicateEvent(String),
    /// A destroy would end more sessions than `[limits] max_cascade` (422); nothing changed.
    #[error("{0}")]
    CascadeTooLarge(String),
    /// A tree holds more sessions than `[limits] max_tree` lets one read return (422).
    #[error("{0}")]
    TreeTooLarge(String),
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
    /// Stable machine-readable code: ALREADY_EXISTS, NOT_FOUND, PARENT_NOT_FOUND,
    /// PARENT_NOT_ACTIVE, WRONG_KIND, VALIDATION, UNAUTHORIZED, FORBIDDEN, PAYLOAD_TOO_LARGE,
    /// CONFLICT, CASCADE_TOO_LARGE, TREE_TOO_LARGE, RATE_LIMITED, METHOD_NOT_ALLOWED,
    /// REQUEST_TIMEOUT, UNAVAILABLE, DELIVERY_BACKLOG, INTERNAL.
    pub code: String,
}

impl ApiError {
    /// HTTP status and stable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Validation(_) => (StatusCode::BAD_REQUEST, "VALIDATION"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            ApiError::InvalidManifest(_) => (StatusCode::BAD_REQUEST, "INVALID_MANIFEST"),
            ApiError::InvalidComponent(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_COMPONENT")
            }
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "VALIDATION"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            ApiError::AlreadyExists(_) => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
            ApiError::ParentNotFound(_) => (StatusCode::NOT_FOUND, "PARENT_NOT_FOUND"),
            ApiError::ParentNotActive(_) => (StatusCode::CONFLICT, "PARENT_NOT_ACTIVE"),
            ApiError::WrongKind(_) => (StatusCode::CONFLICT, "WRONG_KIND"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT"),
            ApiError::DuplicateEvent(_) => (StatusCode::CONFLICT, "DUPLICATE_EVENT"),
            ApiError::CascadeTooLarge(_) => (StatusCode::UNPROCESSABLE_ENTITY, "CASCADE_TOO_LARGE"),
            ApiError::TreeTooLarge(_) => (StatusCode::UNPROCESSABLE_ENTITY, "TREE_TOO_LARGE"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "REQUEST_TIMEOUT"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            ApiError::Backlogged { .. } => (StatusCode::SERVICE_UNAVAILABLE, "DELIVERY_BACKLOG"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        }
    }

    /// The code an audit record gives this error when it refuses an action the caller was
    /// allowed to ask for: the domain's refusals (404, 409) and a refused connector (400, 422).
    /// `None` for bad input, authentication, permission and server failures, which are
    /// logged, not audited.
    pub fn refusal_code(&self) -> Option<&'static str> {
        match self {
            ApiError::NotFound(_)
            | ApiError::AlreadyExists(_)
            | ApiError::ParentNotFound(_)
            | ApiError::ParentNotActive(_)
            | ApiError::WrongKind(_)
            | ApiError::Conflict(_)
            | ApiError::DuplicateEvent(_)
            | ApiError::CascadeTooLarge(_)
            | ApiError::InvalidManifest(_)
            | ApiError::InvalidComponent(_) => Some(self.status_and_code().1),
            ApiError::Validation(_)
            | ApiError::TreeTooLarge(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::Unauthorized(_)
            | ApiError::Forbidden(_)
            | ApiError::MethodNotAllowed(_)
            | ApiError::Unavailable(_)
            | ApiError::Backlogged { .. }
            | ApiError::RequestTimeout(_)
            | ApiError::RateLimited { .. }
            | ApiError::Internal => None,
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let (status, code) = self.status_and_code();
        Problem {
            problem_type: format!(
                "urn:lockstep:problem:{}",
                code.to_ascii_lowercase().replace('_', "-")
            ),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: code.to_owned(),
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
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
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
        match e {
            StoreError::AlreadyExists(_) => ApiError::AlreadyExists(e.to_string()),
            StoreError::NotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::ParentNotFound(_) => ApiError::ParentNotFound(e.to_string()),
            StoreError::ParentNotActive { .. } => ApiError::ParentNotActive(e.to_string()),
            StoreError::WrongKind(m) => ApiError::WrongKind(m),
            StoreError::CascadeTooLarge { .. } => ApiError::CascadeTooLarge(e.to_string()),
            StoreError::TreeTooLarge { .. } => ApiError::TreeTooLarge(e.to_string()),
            StoreError::Replayed(id) => {
                ApiError::DuplicateEvent(format!("event {id:?} was already applied"))
            }
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
            "DELIVERY_BACKLOG"
        );
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
