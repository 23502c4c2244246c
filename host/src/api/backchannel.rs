//! `POST /realms/{realm}/backchannel-logout`: the OIDC Back-Channel Logout 1.0 receiver.
//! The logout token is the credential (no bearer token): it is verified in full by `oidc`,
//! then every PARENT of its `sid` (or every session of its `sub`) ends with reason
//! `idp_logout`, cascading, in one transaction that also stores the token's `jti`.
//! Answers are 200 or 400, both `Cache-Control: no-store` (Back-Channel Logout 1.0, 2.8).

use std::collections::HashMap;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{ApiPath, MAX_BODY_BYTES};
use crate::domain::{DestroyTarget, ReplayGuard, ReplayKind};
use crate::oidc::OidcError;
use crate::store::StoreError;
use crate::sync::sessions::SessionError;

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(logout))
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = super::error::no_store_json(status, body);
    response
        .headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn refuse(description: impl Into<String>) -> Response {
    let description = description.into();
    tracing::warn!(reason = %description, "back-channel logout refused");
    answer(
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_request", "error_description": description}),
    )
}

/// Receives a logout token from the realm's identity provider.
#[utoipa::path(post, path = "/realms/{realm}/backchannel-logout", operation_id = "backchannel_logout", tag = "identity-provider",
    params(("realm" = String, Path, description = "Realm (must have an issuer configured)")),
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
                 description = "logout_token=<JWT>"),
    responses((status = 200, description = "Logged out (also when nothing was mapped)"),
              (status = 400, description = "Invalid, replayed or unverifiable logout token")))]
async fn logout(
    State(state): State<AppState>,
    ApiPath(realm): ApiPath<String>,
    request: Request,
) -> Response {
    let Some(idp) = state.oidc.realm(&realm).cloned() else {
        return refuse(OidcError::NotConfigured(realm).to_string());
    };
    if !super::extract::is_form(request.headers()) {
        return refuse("the body must be application/x-www-form-urlencoded");
    }
    let Ok(body) = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await else {
        return refuse(format!(
            "the body is unreadable or larger than {MAX_BODY_BYTES} bytes"
        ));
    };
    let Ok(form) = serde_urlencoded::from_bytes::<HashMap<String, String>>(&body) else {
        return refuse("the body is not a valid form");
    };
    let Some(token) = form.get("logout_token").filter(|t| !t.is_empty()) else {
        return refuse("logout_token is missing");
    };
    let verified = match state.oidc.verify_logout(&realm, token).await {
        Ok(v) => v,
        Err(OidcError::Unavailable(detail)) => {
            // The detail names the IdP's internal URLs and TLS errors: the log gets it, the
            // unauthenticated caller does not.
            tracing::warn!(%realm, %detail, "back-channel logout: the IdP's keys are unavailable");
            return refuse(
                "the token cannot be verified: the identity provider's keys are unavailable",
            );
        }
        Err(e) => return refuse(e.to_string()),
    };
    let target = match (&verified.sid, &verified.sub) {
        (Some(sid), _) => DestroyTarget::IdpSession(sid.clone()),
        (None, Some(sub)) => DestroyTarget::User(sub.clone()),
        (None, None) => return refuse("a logout token must name a sid or a sub"),
    };
    let guard = ReplayGuard {
        kind: ReplayKind::LogoutToken,
        jti: verified.jti.clone(),
        until_ms: verified.remember_until_ms,
    };
    match state
        .sessions
        .idp_logout(&realm, target, guard, &idp.idp_system)
        .await
    {
        Ok(changed) => {
            tracing::info!(
                %realm,
                sid = verified.sid.as_deref().unwrap_or("-"),
                sub = verified.sub.as_deref().unwrap_or("-"),
                ended = changed.len(),
                "back-channel logout"
            );
            answer(StatusCode::OK, json!({"ended": changed.len()}))
        }
        Err(SessionError::Store(StoreError::Replayed(jti))) => {
            refuse(format!("logout token {jti:?} was already used"))
        }
        Err(SessionError::Invalid(e)) => refuse(e.0),
        Err(e) => {
            tracing::error!(error = %e, "back-channel logout could not be applied");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "temporarily_unavailable", "error_description": "retry later"}),
            )
        }
    }
}
