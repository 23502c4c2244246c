//! The console's actions (POST). Each checks the sign-in's CSRF token, authorises like the
//! API route it mirrors, calls the same service with an audit record naming the signed-in
//! actor (a refusal is recorded too, as the API records it), and sends the browser on to a
//! page that shows the outcome.

use std::time::Instant;

use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::html::q;
use super::pages::authorize_sessions;
use super::session::{self, PRE_COOKIE};
use super::{CPath, ConsoleError, Transport, Viewer, read_form, see_other};
use crate::api::AppState;
use crate::api::error::ApiError;
use crate::api::limits::FailureGate;
use crate::auth::{AuthError, Permission, Principal};
use crate::domain::ProblemCode;
use crate::domain::{AuditAction, AuditEntry, DestroyTarget, EndReason};
use crate::lifecycle::{MAX_COMPONENT_BYTES, MAX_MANIFEST_BYTES, PutOutcome};
use crate::store::deliveries::ReplayTarget;

/// Passes `result` on, first recording a refusal in the audit log: the API's own
/// `api::audit::refused`, answered as a console error.
async fn refused<T>(
    state: &AppState,
    entry: AuditEntry,
    result: Result<T, ApiError>,
) -> Result<T, ConsoleError> {
    Ok(crate::api::audit::refused(state, entry, result).await?)
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    csrf: String,
}

/// Sign-in with an admin token or API key: the same authenticator and failed-authentication
/// throttle as the API's bearer tokens.
pub async fn login(
    State(state): State<AppState>,
    transport: Transport,
    req: Request,
) -> Result<Response, ConsoleError> {
    let console = super::console(&state)?;
    let pre = session::cookie(super::cookie_header(req.headers()), PRE_COOKIE)
        .unwrap_or("")
        .to_owned();
    let form: LoginForm = read_form(req).await?;
    if pre.is_empty() || !session::tokens_match(&pre, &form.csrf) {
        return Ok(super::pages::login_page(
            console,
            &transport,
            StatusCode::FORBIDDEN,
            Some("The sign-in form expired or was not sent by this console; sign in again."),
        ));
    }
    let gate = FailureGate::new(state.auth_failures.as_deref(), transport.peer);
    if let Some(gate) = gate {
        gate.check().map_err(ApiError::from)?;
    }
    let token = form.token.trim();
    let principal = match state
        .auth
        .authenticate(Some(&format!("Bearer {token}")))
        .await
    {
        Ok(p) => p,
        Err(e) => {
            if let (AuthError::Unauthenticated(_), Some(gate)) = (&e, gate) {
                gate.failed();
            }
            tracing::info!(error = %e, "console sign-in refused");
            return Ok(super::pages::login_page(
                console,
                &transport,
                StatusCode::UNAUTHORIZED,
                Some("Sign-in refused: that is not a valid admin token or API key."),
            ));
        }
    };
    Ok(signed_in(console, &transport, principal))
}

/// Starts a console session for `principal` and sends the browser to the overview.
pub(super) fn signed_in(
    console: &super::Console,
    transport: &Transport,
    principal: Principal,
) -> Response {
    tracing::info!(actor = %principal.actor(), "console sign-in");
    let (id, _) = console.sessions.create(principal, Instant::now());
    let mut res = see_other("/console/");
    let h = res.headers_mut();
    for cookie in [
        session::set_cookie(session::COOKIE, &id, None, transport.secure),
        session::clear_cookie(PRE_COOKIE, transport.secure),
    ] {
        if let Ok(v) = header::HeaderValue::from_str(&cookie) {
            h.append(header::SET_COOKIE, v);
        }
    }
    res
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

/// Sign-out: the console session ends here, whatever the cookie does.
pub async fn logout(
    State(state): State<AppState>,
    viewer: Viewer,
    transport: Transport,
    req: Request,
) -> Result<Response, ConsoleError> {
    let form: CsrfForm = read_form(req).await?;
    viewer.check_csrf(&form.csrf)?;
    super::console(&state)?.sessions.remove(&viewer.id);
    let mut res = see_other("/console/login?signed_out=1");
    if let Ok(v) =
        header::HeaderValue::from_str(&session::clear_cookie(session::COOKIE, transport.secure))
    {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(res)
}

fn flash(state: &AppState, viewer: &Viewer, message: String) {
    if let Some(c) = &state.console {
        c.sessions.flash(&viewer.id, message);
    }
}

#[derive(Deserialize)]
pub struct DestroyForm {
    csrf: String,
    realm: String,
    kind: String,
    id: String,
    reason: Option<String>,
}

/// destroy-parent or destroy-user, as the API runs them.
pub async fn destroy(
    State(state): State<AppState>,
    viewer: Viewer,
    req: Request,
) -> Result<Response, ConsoleError> {
    let form: DestroyForm = read_form(req).await?;
    viewer.check_csrf(&form.csrf)?;
    let p = &viewer.principal;
    authorize_sessions(p, &form.realm)?;
    let reason = match form.reason.as_deref() {
        None | Some("") => None,
        Some(r) => Some(
            r.parse::<EndReason>()
                .map_err(|e| ApiError::Validation(e.to_string()))?,
        ),
    };
    let (target, action) = match form.kind.as_str() {
        "parent" => (
            DestroyTarget::Parent(form.id.clone()),
            AuditAction::DestroyParent,
        ),
        "user" => (
            DestroyTarget::User(form.id.clone()),
            AuditAction::DestroyUser,
        ),
        other => {
            return Err(ApiError::Validation(format!(
                "kind must be parent or user, got {other:?}"
            ))
            .into());
        }
    };
    let origin = Some(p.origin(None)?);
    let audit = AuditEntry::new(p.actor(), action, Some(&form.realm)).target(form.id.clone());
    // The service records a refusal itself.
    let changed = state
        .sessions
        .destroy(&form.realm, target, reason, origin, Some(audit))
        .await?;
    let n = changed.len();
    flash(
        &state,
        &viewer,
        format!("{n} session{} ended.", if n == 1 { "" } else { "s" }),
    );
    let to = if form.kind == "parent" {
        format!("/console/tree?realm={}&id={}", q(&form.realm), q(&form.id))
    } else {
        format!(
            "/console/sessions?realm={}&field=userId&value={}",
            q(&form.realm),
            q(&form.id)
        )
    };
    Ok(see_other(&to))
}

async fn set_enabled(
    state: AppState,
    viewer: Viewer,
    name: String,
    req: Request,
    enabled: bool,
) -> Result<Response, ConsoleError> {
    let form: CsrfForm = read_form(req).await?;
    viewer.check_csrf(&form.csrf)?;
    viewer
        .principal
        .authorize_global(Permission::ConnectorsManage)?;
    crate::runtime::manifest::check_name(&name).map_err(ApiError::Validation)?;
    let action = if enabled {
        AuditAction::ConnectorEnable
    } else {
        AuditAction::ConnectorDisable
    };
    let audit = AuditEntry::new(viewer.principal.actor(), action, None).target(name.clone());
    let set = state
        .connectors
        .set_enabled(&name, enabled, Some(audit.clone()))
        .await
        .map_err(ApiError::from);
    refused(&state, audit, set).await?;
    flash(
        &state,
        &viewer,
        format!(
            "Connector {name} {}.",
            if enabled { "enabled" } else { "disabled" }
        ),
    );
    Ok(see_other(&format!("/console/connectors/{}", q(&name))))
}

/// Enable a connector.
pub async fn enable(
    State(state): State<AppState>,
    viewer: Viewer,
    CPath(name): CPath<String>,
    req: Request,
) -> Result<Response, ConsoleError> {
    set_enabled(state, viewer, name, req, true).await
}

/// Disable a connector.
pub async fn disable(
    State(state): State<AppState>,
    viewer: Viewer,
    CPath(name): CPath<String>,
    req: Request,
) -> Result<Response, ConsoleError> {
    set_enabled(state, viewer, name, req, false).await
}

#[derive(Deserialize)]
pub struct ReplayForm {
    csrf: String,
    connector: Option<String>,
    delivery_id: Option<String>,
}

/// Replay one dead letter, or all of a connector's.
pub async fn replay(
    State(state): State<AppState>,
    viewer: Viewer,
    req: Request,
) -> Result<Response, ConsoleError> {
    let form: ReplayForm = read_form(req).await?;
    viewer.check_csrf(&form.csrf)?;
    viewer
        .principal
        .authorize_global(Permission::ConnectorsManage)?;
    let audit = AuditEntry::new(viewer.principal.actor(), AuditAction::DeliveryReplay, None);
    let store = state.sessions.store();
    let (audit, target, back) = match (form.connector, form.delivery_id) {
        (Some(name), None) => {
            let audit = audit.target(name.clone());
            let checked = crate::domain::rules::id("connector", &name).map_err(ApiError::from);
            refused(&state, audit.clone(), checked).await?;
            let back = format!("/console/deliveries?connector={}&status=dead", q(&name));
            (audit, ReplayTarget::Connector(name), back)
        }
        (None, Some(id)) => {
            let id: i64 = id
                .parse()
                .map_err(|_| ApiError::Validation(format!("delivery id {id:?} is not a number")))?;
            let audit = audit.target(id.to_string());
            let found = match store.get_delivery(id).await? {
                None => Err(ApiError::refused(
                    ProblemCode::NotFound,
                    format!("delivery {id} not found"),
                )),
                Some((row, _)) if !matches!(row.status.as_str(), "dead" | "dropped") => {
                    Err(ApiError::refused(
                        ProblemCode::Conflict,
                        format!(
                            "delivery {id} is {}; only dead or dropped deliveries can be replayed",
                            row.status
                        ),
                    ))
                }
                Some(_) => Ok(()),
            };
            refused(&state, audit.clone(), found).await?;
            (
                audit,
                ReplayTarget::Delivery(id),
                format!("/console/deliveries/{id}"),
            )
        }
        _ => {
            return Err(ApiError::Validation(
                "give exactly one of a connector or a delivery id".into(),
            )
            .into());
        }
    };
    let n = store.replay(target, Some(audit)).await?;
    flash(
        &state,
        &viewer,
        format!(
            "{n} deliver{} queued again.",
            if n == 1 { "y" } else { "ies" }
        ),
    );
    Ok(see_other(&back))
}

/// Upload a connector (manifest + component). A refusal is shown on the form with the
/// host's reason, with the API's status code.
pub async fn upload(
    State(state): State<AppState>,
    viewer: Viewer,
    req: Request,
) -> Result<Response, ConsoleError> {
    viewer
        .principal
        .authorize_global(Permission::ConnectorsManage)?;
    let mut multipart = axum::extract::Multipart::from_request(req, &state)
        .await
        .map_err(|e| ApiError::Validation(format!("malformed upload: {}", e.body_text())))?;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "an upload may carry at most {} MiB of component and {} KiB of manifest",
            MAX_COMPONENT_BYTES / (1024 * 1024),
            MAX_MANIFEST_BYTES / 1024
        ))
    };
    let (mut csrf, mut name, mut manifest, mut component) = (None, None, None, None);
    while let Some(mut field) = multipart.next_field().await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::Validation(format!("malformed upload: {}", e.body_text()))
        }
    })? {
        let part = field.name().unwrap_or("").to_owned();
        let limit = match part.as_str() {
            "component" => MAX_COMPONENT_BYTES,
            "manifest" => MAX_MANIFEST_BYTES,
            "csrf" | "name" => 1024,
            other => {
                return Err(ApiError::Validation(format!("unknown form field {other:?}")).into());
            }
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| ApiError::Validation(format!("malformed upload: {}", e.body_text())))?
        {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large().into());
            }
            bytes.extend_from_slice(&chunk);
        }
        let text = || {
            String::from_utf8(bytes.clone())
                .map_err(|_| ApiError::Validation(format!("field {part:?} is not UTF-8 text")))
        };
        match part.as_str() {
            "csrf" => csrf = Some(text()?),
            "name" => name = Some(text()?.trim().to_owned()),
            "manifest" => {
                manifest = Some(String::from_utf8(bytes).map_err(|_| {
                    ApiError::InvalidManifest("the manifest is not UTF-8 text".into())
                })?)
            }
            // A file input left empty is sent as an empty part: keep the stored component.
            _ => component = Some(bytes).filter(|b| !b.is_empty()),
        }
    }
    viewer.check_csrf(csrf.as_deref().unwrap_or(""))?;
    let name = name.unwrap_or_default();
    let manifest = manifest.unwrap_or_default();
    let show = |status: StatusCode, reason: &str| {
        (
            status,
            Html(super::pages::upload_page(&viewer, &name, Some(reason))),
        )
            .into_response()
    };
    if let Err(e) = crate::runtime::manifest::check_name(&name) {
        return Ok(show(StatusCode::BAD_REQUEST, &e));
    }
    if manifest.trim().is_empty() {
        return Ok(show(
            StatusCode::BAD_REQUEST,
            "the manifest (connector manifest, TOML) is required",
        ));
    }
    let audit = AuditEntry::new(viewer.principal.actor(), AuditAction::ConnectorPut, None)
        .target(name.clone());
    let put = state
        .connectors
        .put(&name, &manifest, component, Some(audit.clone()))
        .await
        .map_err(ApiError::from);
    let outcome = match refused(&state, audit.clone(), put).await {
        Ok((outcome, _)) => outcome,
        Err(ConsoleError::Api(e)) => {
            let (status, _) = e.status_and_code();
            if status.is_client_error() {
                return Ok(show(status, &e.to_string()));
            }
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    let label = match &outcome {
        PutOutcome::Created => "created".to_owned(),
        PutOutcome::Replaced { previous } => format!(
            "replaced version {}",
            previous.chars().take(12).collect::<String>()
        ),
        PutOutcome::Unchanged => {
            crate::api::connectors::record_unchanged(&state, audit, &name).await;
            "unchanged (same manifest and component)".to_owned()
        }
    };
    flash(&state, &viewer, format!("Connector {name}: {label}."));
    Ok(see_other(&format!("/console/connectors/{}", q(&name))))
}
