//! `POST /realms/{realm}/ssf/push`: push delivery of Security Event Tokens (RFC 8935) from
//! the realm's Shared Signals transmitters, the `endpoint_url` of the streams Lockstep set up
//! (`sync::ssf_streams`). The caller proves to be the transmitter of a stream by the
//! `Authorization` value Lockstep gave that stream (`push_secret`, or a random secret made
//! at each start; compared in constant time); the SET is then verified in full and applied.
//! Answers: 202 (also for a SET whose `jti` was seen before: acknowledged again, nothing
//! changed), 400 `{"err", "description"}` with an RFC 8935 error code, 401 without the
//! stream's `Authorization`, 503 when the transmitter's keys or the database cannot be
//! reached (the transmitter delivers again). Also `GET /admin/realms/{realm}/ssf/streams`,
//! the realm's receiver streams with their status and counters, and `POST
//! .../ssf/streams/refresh`, which has them set up again.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, PROBLEM_JSON, Problem};
use super::extract::{ApiPath, Caller, MAX_BODY_BYTES};
use super::spec::{BadRealm, Realm, Unauthorized};
use crate::auth::Permission;
use crate::domain::rules;
use crate::sync::ssf_streams::{ReceiveError, Received};

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(push))
        .routes(routes!(streams))
        .routes(routes!(refresh))
}

/// A refusal of a pushed SET (RFC 8935 section 2.3).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PushError {
    /// invalid_request, invalid_key, invalid_issuer, invalid_audience or
    /// authentication_failed.
    pub err: String,
    /// What was refused and why.
    pub description: String,
}

fn refuse(status: StatusCode, err: &str, description: impl Into<String>) -> Response {
    super::error::no_store_json(
        status,
        PushError {
            err: err.to_owned(),
            description: description.into(),
        },
    )
}

/// Receives one SET from a transmitter of the realm.
#[utoipa::path(post, path = "/realms/{realm}/ssf/push", operation_id = "ssf_push", tag = "identity-provider",
    params(("realm" = String, Path, description = "Realm with a push stream in `ssf_transmitters`")),
    request_body(content = String, content_type = "application/secevent+jwt",
                 description = "One Security Event Token (a signed JWT)"),
    responses(
        (status = 202, description = "Accepted: applied, or a stream event noted, or a SET whose jti was seen before (nothing changed)"),
        (status = 400, description = "Refused for good: invalid_request, invalid_key, invalid_issuer or invalid_audience", body = PushError),
        (status = 401, description = "authentication_failed: not the Authorization value this realm's stream was given", body = PushError),
        (status = 404, description = "invalid_request: the realm has no push stream", body = PushError),
        (status = 413, description = "invalid_request: body over 64 KiB", body = PushError),
        (status = 415, description = "invalid_request: body is not application/secevent+jwt", body = PushError),
        (status = 429, description = "authentication_failed: too many failed authentications from this address (`[limits] failed_auth_*`); Retry-After says when", body = PushError),
        (status = 503, description = "temporarily_unavailable: the transmitter's keys or the database cannot be reached; deliver again", body = PushError),
    ))]
async fn push(
    State(state): State<AppState>,
    ApiPath(realm): ApiPath<String>,
    request: Request,
) -> Response {
    if let Err(e) = rules::realm(&realm) {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
    }
    if !state.ssf.has_push(&realm) {
        return refuse(
            StatusCode::NOT_FOUND,
            "invalid_request",
            format!("realm {realm:?} has no push stream"),
        );
    }
    // Guessing the stream's secret is throttled like any failed authentication.
    let gate = super::limits::FailureGate::of_request(
        state.auth_failures.as_deref(),
        request.extensions(),
    );
    if let Some(Err(over)) = gate.map(|g| g.check()) {
        let mut response = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "authentication_failed",
            over.detail,
        );
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(over.retry_after_secs),
        );
        return response;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(transmitter) = state.ssf.push_transmitter(&realm, authorization) else {
        tracing::warn!(%realm, "ssf push without this realm's stream authorization");
        if let Some(gate) = gate {
            gate.failed();
        }
        return refuse(
            StatusCode::UNAUTHORIZED,
            "authentication_failed",
            "the Authorization header is not the one this realm's stream was given",
        );
    };
    let media_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if media_type.as_deref() != Some("application/secevent+jwt") {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "the body must be application/secevent+jwt",
        );
    }
    let Ok(body) = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await else {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            format!("the body is unreadable or larger than {MAX_BODY_BYTES} bytes"),
        );
    };
    let Ok(token) = std::str::from_utf8(&body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body is not UTF-8",
        );
    };
    match state
        .ssf
        .receive(&transmitter, &state.oidc, &state.sessions, token)
        .await
    {
        Ok(Received::Applied(_) | Received::Replayed | Received::Noted) => {
            StatusCode::ACCEPTED.into_response()
        }
        Err(ReceiveError::Refused(e)) => refuse(StatusCode::BAD_REQUEST, e.code(), e.to_string()),
        Err(ReceiveError::Transient(detail)) => {
            // The detail may name the transmitter's internal URLs: the log gets it.
            tracing::warn!(%realm, %detail, "ssf push could not be taken now");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the SET cannot be verified or stored now; deliver it again",
            )
        }
    }
}

/// A receiver stream as the admin API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SsfStreamDto {
    /// The realm.
    pub realm: String,
    /// The transmitter's issuer.
    pub issuer: String,
    /// `push` or `poll`.
    pub delivery: String,
    /// Event types requested.
    pub events_requested: Vec<String>,
    /// The transmitter's stream id; absent until the stream is set up.
    pub stream_id: Option<String>,
    /// `enabled`, `paused`, `disabled`, or `unknown` before the transmitter answered.
    pub status: String,
    /// The transmitter's reason for the status.
    pub reason: Option<String>,
    /// Whether the verification event Lockstep asked for arrived.
    pub verified: bool,
    /// Audiences a SET must name.
    pub audiences: Vec<String>,
    /// The last failure talking to the transmitter.
    pub last_error: Option<String>,
    /// SETs applied or noted since the start.
    pub sets_accepted: u64,
    /// SETs whose jti was seen before.
    pub sets_replayed: u64,
    /// SETs refused.
    pub sets_refused: u64,
}

/// The realm's SSF receiver streams.
#[utoipa::path(get, path = "/admin/realms/{realm}/ssf/streams", operation_id = "ssf_streams", tag = "identity-provider",
    params(Realm),
    responses(
        (status = 200, description = "The realm's receiver streams (empty without `ssf_transmitters`)", body = Vec<SsfStreamDto>),
        BadRealm, Unauthorized,
        (status = 403, description = "FORBIDDEN: no `users:manage` in this realm", body = Problem, content_type = PROBLEM_JSON),
    ),
    security(("bearer" = [])))]
async fn streams(
    State(state): State<AppState>,
    ApiPath(realm): ApiPath<String>,
    Caller(principal): Caller,
) -> Result<Json<Vec<SsfStreamDto>>, ApiError> {
    rules::realm(&realm).map_err(ApiError::from)?;
    principal.authorize(&realm, Permission::UsersManage)?;
    Ok(Json(
        state
            .ssf
            .streams(Some(&realm))
            .into_iter()
            .map(|v| SsfStreamDto {
                realm: v.realm,
                issuer: v.issuer,
                delivery: match v.delivery {
                    crate::sync::ssf_streams::Delivery::Push => "push".into(),
                    crate::sync::ssf_streams::Delivery::Poll => "poll".into(),
                },
                events_requested: v.events_requested,
                stream_id: v.stream.stream_id,
                status: v.stream.status,
                reason: v.stream.reason,
                verified: v.stream.verified,
                audiences: v.stream.audiences,
                last_error: v.stream.last_error,
                sets_accepted: v.sets_accepted,
                sets_replayed: v.sets_replayed,
                sets_refused: v.sets_refused,
            })
            .collect(),
    ))
}

/// How many streams were asked to set up again.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SsfRefreshDto {
    /// The realm's receiver streams, each now set up again in the background.
    pub streams: usize,
}

/// Sets the realm's receiver streams up again: the transmitter's metadata and a token are
/// fetched anew, the stream adopted (or replaced), its status read and a new verification
/// asked for (`verified` is false until it arrives). For after a change at the transmitter.
#[utoipa::path(post, path = "/admin/realms/{realm}/ssf/streams/refresh", operation_id = "ssf_streams_refresh", tag = "identity-provider",
    params(Realm),
    responses(
        (status = 202, description = "The streams are being set up again; `GET /admin/realms/{realm}/ssf/streams` shows how it went", body = SsfRefreshDto),
        BadRealm, Unauthorized,
        (status = 403, description = "FORBIDDEN: no `users:manage` in this realm", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "NOT_FOUND: the realm has no `ssf_transmitters`", body = Problem, content_type = PROBLEM_JSON),
    ),
    security(("bearer" = [])))]
async fn refresh(
    State(state): State<AppState>,
    ApiPath(realm): ApiPath<String>,
    Caller(principal): Caller,
) -> Result<(StatusCode, Json<SsfRefreshDto>), ApiError> {
    rules::realm(&realm).map_err(ApiError::from)?;
    principal.authorize(&realm, Permission::UsersManage)?;
    match state.ssf.restart(&realm) {
        0 => Err(ApiError::refused(
            crate::domain::ProblemCode::NotFound,
            format!("realm {realm:?} has no ssf_transmitters"),
        )),
        streams => Ok((StatusCode::ACCEPTED, Json(SsfRefreshDto { streams }))),
    }
}
