//! `POST /realms/{realm}/events`: the Keycloak event intake. The post is authenticated by its
//! Standard Webhooks signature (no bearer token: `keycloak-extension/` holds the realm's
//! shared secret), then applied by `sync::idp_events` in one transaction that also stores the
//! event id, so a replay is refused with 409 and changes nothing.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, PROBLEM_JSON};
use super::extract::{ApiPath, JsonBytes};
use crate::auth::webhook::SignatureError;
use crate::domain::ProblemCode;
use crate::sync::idp_events::KeycloakEvent;
use crate::sync::sessions::SessionError;

/// How long an applied event id is remembered: longer than the extension keeps retrying
/// (its `max-age-ms`, 24 h by default), so a late resend is still recognised.
pub const REMEMBER_EVENTS_MS: i64 = 48 * 3600 * 1000;

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(receive))
}

/// What an applied event changed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventOutcome {
    /// The event id.
    pub event_id: String,
    /// Sessions registered (mirrors of Keycloak sessions).
    pub created: Vec<String>,
    /// Sessions whose lifetime or delegation changed.
    pub updated: Vec<String>,
    /// Sessions that ended.
    pub ended: Vec<String>,
    /// Revoke events written.
    pub revoked: usize,
    /// Sessions ended in other realms that this realm's administrator session had
    /// impersonated into (counted only: their ids belong to those realms).
    pub ended_elsewhere: usize,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Receives one Keycloak event from the Lockstep event-listener extension.
#[utoipa::path(post, path = "/realms/{realm}/events", operation_id = "receive_keycloak_event", tag = "identity-provider",
    params(("realm" = String, Path, description = "Realm (must have events_secrets configured)"),
           ("webhook-id" = String, Header, description = "Event id (equals the body's id)"),
           ("webhook-timestamp" = i64, Header, description = "Unix seconds when sent"),
           ("webhook-signature" = String, Header,
            description = "v1,<base64 HMAC-SHA256 of id.timestamp.body>; several space-separated")),
    request_body(content = KeycloakEvent, content_type = "application/json"),
    responses((status = 200, description = "Applied", body = EventOutcome),
              (status = 400, description = "Malformed or unsupported event", body = crate::api::error::Problem, content_type = PROBLEM_JSON),
              (status = 401, description = "Bad or missing signature, or stale timestamp", body = crate::api::error::Problem, content_type = PROBLEM_JSON),
              (status = 404, description = "The realm does not accept events", body = crate::api::error::Problem, content_type = PROBLEM_JSON),
              (status = 409, description = "This event id was applied before", body = crate::api::error::Problem, content_type = PROBLEM_JSON),
              (status = 413, description = "Body over 64 KiB", body = crate::api::error::Problem, content_type = PROBLEM_JSON),
              (status = 415, description = "Not application/json", body = crate::api::error::Problem, content_type = PROBLEM_JSON)))]
pub(super) async fn receive(
    State(state): State<AppState>,
    ApiPath(realm): ApiPath<String>,
    headers: HeaderMap,
    JsonBytes(body): JsonBytes,
) -> Result<Json<EventOutcome>, ApiError> {
    let Some(keys) = state.events.realm(&realm) else {
        return Err(ApiError::refused(
            ProblemCode::NotFound,
            format!("realm {realm:?} does not accept IdP events (no events_secrets configured)"),
        ));
    };
    let id = header(&headers, "webhook-id");
    keys.verify(
        id,
        header(&headers, "webhook-timestamp"),
        header(&headers, "webhook-signature"),
        &body,
        chrono::Utc::now().timestamp(),
    )
    .map_err(|e: SignatureError| {
        tracing::warn!(%realm, reason = %e, "IdP event refused");
        ApiError::Unauthorized(e.to_string())
    })?;
    let event: KeycloakEvent = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Validation(format!("invalid event: {e}")))?;
    if Some(event.id.as_str()) != id {
        return Err(ApiError::Validation(
            "the body's id differs from the webhook-id header".into(),
        ));
    }
    let until = chrono::Utc::now().timestamp_millis() + REMEMBER_EVENTS_MS;
    let outcome = match state.sessions.apply_idp_event(&realm, &event, until).await {
        Ok(o) => o,
        Err(SessionError::Invalid(e)) => {
            tracing::warn!(%realm, event_id = %event.id, event_type = %event.event_type, reason = %e, "IdP event not applicable");
            return Err(e.into());
        }
        Err(e @ (SessionError::Store(_) | SessionError::Backlogged(_))) => return Err(e.into()),
    };
    let ids = |v: Vec<crate::domain::Session>| -> Vec<String> {
        v.into_iter().map(|s| s.external_id).collect()
    };
    let out = EventOutcome {
        event_id: event.id.clone(),
        created: ids(outcome.created),
        updated: ids(outcome.updated),
        ended: ids(outcome.ended),
        revoked: outcome.revoked,
        ended_elsewhere: outcome.ended_elsewhere,
    };
    tracing::info!(
        %realm,
        event_id = %event.id,
        event_type = %event.event_type,
        session = event.session_id.as_deref().unwrap_or("-"),
        created = out.created.len(),
        updated = out.updated.len(),
        ended = out.ended.len(),
        revoked = out.revoked,
        ended_elsewhere = out.ended_elsewhere,
        "IdP event applied"
    );
    Ok(Json(out))
}
