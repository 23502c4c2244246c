//! `/admin/realms/{realm}/external-sessions`: the Keymate-compatible external-sessions API.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::AppState;
use super::cursor;
use super::dto::*;
use super::error::{ApiError, Problem};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::auth::Permission;
use crate::domain::ProblemCode;
use crate::domain::rules;
use crate::domain::{
    AuditAction, DestroyTarget, EndReason, MapCommand, NewSession, Session, SessionKind,
};
use crate::store::SessionQuery;
use crate::sync::sessions::SessionError;

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Invalid(v) => v.into(),
            SessionError::Store(s) => s.into(),
            SessionError::Backlogged(b) => ApiError::Backlogged {
                detail: b.to_string(),
                retry_after_secs: 1,
            },
        }
    }
}

/// Problems every authenticated route can answer with.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only describes responses for the OpenAPI document
enum AccessProblems {
    /// VALIDATION: bad realm name, path, query or body.
    #[response(status = 400, content_type = "application/problem+json")]
    Invalid(Problem),
    /// UNAUTHORIZED: missing or invalid bearer token.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthenticated(Problem),
    /// FORBIDDEN: no `users:manage` in this realm.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
}

/// Problems every authenticated write can answer with.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only describes responses for the OpenAPI document
enum WriteAccessProblems {
    /// VALIDATION: bad realm name, path or body.
    #[response(status = 400, content_type = "application/problem+json")]
    Invalid(Problem),
    /// UNAUTHORIZED: missing or invalid bearer token.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthenticated(Problem),
    /// FORBIDDEN: no `users:manage` in this realm, or an `originSystem` other than the
    /// caller's own system (an API key's `system`, else its id); nothing changed.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
}

/// Problems of routes that take a JSON body.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only describes responses for the OpenAPI document
enum BodyProblems {
    /// PAYLOAD_TOO_LARGE: body over 64 KiB.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// VALIDATION: body is not application/json.
    #[response(status = 415, content_type = "application/problem+json")]
    NotJson(Problem),
}

/// Problems of the routes that create a session.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only describes responses for the OpenAPI document
enum AdmissionProblems {
    /// DELIVERY_BACKLOG: deliveries to connectors trail by more than
    /// `[limits] max_delivery_lag_ms` and did not catch up within `[limits] admission_wait_ms`;
    /// nothing changed; retry after `Retry-After` seconds.
    #[response(
        status = 503,
        content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds before trying again"))
    )]
    Backlogged(Problem),
}

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    let base = "/admin/realms/{realm}/external-sessions";
    axum::Router::new()
        // GET on an action's path is the session of that name (ids are free text); without
        // it, `GET .../map-parent` was the action's 405 and such a session unreadable.
        .route(
            &format!("{base}/map-parent"),
            post(map_parent).get(get_session_named_like_an_action),
        )
        .route(
            &format!("{base}/map-child"),
            post(map_child).get(get_session_named_like_an_action),
        )
        .route(
            &format!("{base}/map-fixed"),
            post(map_fixed).get(get_session_named_like_an_action),
        )
        .route(
            &format!("{base}/destroy-parent"),
            post(destroy_parent).get(get_session_named_like_an_action),
        )
        .route(
            &format!("{base}/destroy-child"),
            post(destroy_child).get(get_session_named_like_an_action),
        )
        .route(
            &format!("{base}/destroy-user"),
            post(destroy_user).get(get_session_named_like_an_action),
        )
        .route(
            &format!("{base}/session-tree/{{externalId}}"),
            get(session_tree),
        )
        .route(&format!("{base}/{{externalId}}"), get(get_session))
        .route(base, get(list_sessions))
        .route(&format!("{base}/"), get(list_sessions))
}

/// Authorises the caller for `users:manage` in `realm` (403 before any input is examined,
/// so a key scoped elsewhere learns nothing), then checks the realm name.
fn authorize(caller: &Caller, realm: &str) -> Result<(), ApiError> {
    caller.0.authorize(realm, Permission::UsersManage)?;
    rules::realm(realm)?;
    Ok(())
}

/// Names the session a request is about on the request span (`api::app`), once the caller
/// is authorised and only if the id is well-formed (a refused id is never an attribute).
fn trace_session(external_id: &str) {
    if rules::id("externalId", external_id).is_ok() {
        tracing::Span::current().record("external_id", external_id);
    }
}

fn default_name(value: Option<String>, caller: &Caller) -> Option<String> {
    value.or_else(|| Some(caller.0.system().to_owned()))
}

async fn do_map(
    state: &AppState,
    caller: &Caller,
    session: NewSession,
    origin: Option<String>,
) -> Result<(StatusCode, Json<SessionDto>), ApiError> {
    let origin_system = Some(caller.0.origin(origin)?);
    let action = match session.kind {
        SessionKind::Parent => AuditAction::MapParent,
        SessionKind::Child => AuditAction::MapChild,
        SessionKind::Fixed => AuditAction::MapFixed,
    };
    let audit = super::audit::entry(caller, action, Some(&session.realm))
        .target(session.external_id.clone());
    // The service records a refusal itself (it knows the store's refusals).
    let created = state
        .sessions
        .map(MapCommand {
            session,
            origin_system,
            inherit_from: None,
            audit: Some(audit),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created.into())))
}

/// Register a PARENT session mapped to a Keycloak user session.
#[utoipa::path(post, path = "/admin/realms/{realm}/external-sessions/map-parent",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name")),
    request_body = MapParentRequest,
    responses(
        (status = 201, description = "Registered", body = SessionDto),
        WriteAccessProblems,
        (status = 409, description = "ALREADY_EXISTS", body = Problem, content_type = "application/problem+json"),
        BodyProblems,
        AdmissionProblems,
    ))]
async fn map_parent(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<MapParentRequest>,
) -> Result<(StatusCode, Json<SessionDto>), ApiError> {
    authorize(&caller, &realm)?;
    trace_session(&req.external_id);
    let session = NewSession {
        realm,
        external_id: req.external_id,
        kind: SessionKind::Parent,
        parent_id: None,
        idp_session_id: Some(req.keycloak_session_id),
        idp_client_session_id: req.keycloak_client_session_id,
        user_id: req.user_id,
        system: default_name(req.system, &caller),
        delegated_by: None,
        attributes: req.attributes,
        expires_at: req.expires_at,
    };
    do_map(&state, &caller, session, req.origin_system).await
}

/// Register a CHILD session under an ACTIVE parent of the same realm.
#[utoipa::path(post, path = "/admin/realms/{realm}/external-sessions/map-child",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name")),
    request_body = MapChildRequest,
    responses(
        (status = 201, description = "Registered", body = SessionDto),
        WriteAccessProblems,
        (status = 404, description = "PARENT_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "ALREADY_EXISTS or PARENT_NOT_ACTIVE", body = Problem, content_type = "application/problem+json"),
        BodyProblems,
        AdmissionProblems,
    ))]
async fn map_child(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<MapChildRequest>,
) -> Result<(StatusCode, Json<SessionDto>), ApiError> {
    authorize(&caller, &realm)?;
    trace_session(&req.external_id);
    let session = NewSession {
        realm,
        external_id: req.external_id,
        kind: SessionKind::Child,
        parent_id: Some(req.parent_external_id),
        idp_session_id: None,
        idp_client_session_id: req.keycloak_client_session_id,
        user_id: req.user_id,
        system: default_name(req.system, &caller),
        delegated_by: None,
        attributes: req.attributes,
        expires_at: req.expires_at,
    };
    do_map(&state, &caller, session, req.origin_system).await
}

/// Register a FIXED (standalone) session.
#[utoipa::path(post, path = "/admin/realms/{realm}/external-sessions/map-fixed",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name")),
    request_body = MapFixedRequest,
    responses(
        (status = 201, description = "Registered", body = SessionDto),
        WriteAccessProblems,
        (status = 409, description = "ALREADY_EXISTS", body = Problem, content_type = "application/problem+json"),
        BodyProblems,
        AdmissionProblems,
    ))]
async fn map_fixed(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<MapFixedRequest>,
) -> Result<(StatusCode, Json<SessionDto>), ApiError> {
    authorize(&caller, &realm)?;
    trace_session(&req.external_id);
    let session = NewSession {
        realm,
        external_id: req.external_id,
        kind: SessionKind::Fixed,
        parent_id: None,
        idp_session_id: req.keycloak_session_id,
        idp_client_session_id: req.keycloak_client_session_id,
        user_id: req.user_id,
        system: default_name(req.system, &caller),
        delegated_by: None,
        attributes: req.attributes,
        expires_at: req.expires_at,
    };
    do_map(&state, &caller, session, req.origin_system).await
}

async fn do_destroy(
    state: &AppState,
    caller: &Caller,
    realm: &str,
    target: DestroyTarget,
    reason: Option<EndReason>,
    origin: Option<String>,
) -> Result<Json<DestroyResponse>, ApiError> {
    authorize(caller, realm)?;
    let origin = Some(caller.0.origin(origin)?);
    let (action, id) = match &target {
        DestroyTarget::Parent(id) => {
            trace_session(id);
            (AuditAction::DestroyParent, id)
        }
        DestroyTarget::Child(id) => {
            trace_session(id);
            (AuditAction::DestroyChild, id)
        }
        DestroyTarget::User(id) => (AuditAction::DestroyUser, id),
        // No route of this API builds these.
        DestroyTarget::IdpSession(_)
        | DestroyTarget::AllIdpSessions
        | DestroyTarget::Expired(_) => {
            return Err(ApiError::Validation(
                "not a destroy a caller can ask for".into(),
            ));
        }
    };
    let audit = super::audit::entry(caller, action, Some(realm)).target(id.clone());
    let changed: Vec<Session> = state
        .sessions
        .destroy(realm, target, reason, origin, Some(audit))
        .await?;
    Ok(Json(DestroyResponse {
        changed: changed.into_iter().map(Into::into).collect(),
    }))
}

/// End a root session (PARENT or FIXED) and its whole tree, in one transaction.
/// Idempotent: an already-ended session gives `changed: []`.
#[utoipa::path(post, path = "/admin/realms/{realm}/external-sessions/destroy-parent",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name")),
    request_body = DestroyRequest,
    responses(
        (status = 200, description = "Every session that changed", body = DestroyResponse),
        WriteAccessProblems,
        BodyProblems,
        (status = 404, description = "NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "WRONG_KIND (a CHILD)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "CASCADE_TOO_LARGE: the destroy would end more sessions than `[limits] max_cascade`; nothing changed", body = Problem, content_type = "application/problem+json"),
    ))]
async fn destroy_parent(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<DestroyRequest>,
) -> Result<Json<DestroyResponse>, ApiError> {
    do_destroy(
        &state,
        &caller,
        &realm,
        DestroyTarget::Parent(req.external_id),
        req.reason,
        req.origin_system,
    )
    .await
}

/// End one CHILD session and its own descendants; its parent and siblings stay.
#[utoipa::path(post, path = "/admin/realms/{realm}/external-sessions/destroy-child",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name")),
    request_body = DestroyRequest,
    responses(
        (status = 200, description = "Every session that changed", body = DestroyResponse),
        WriteAccessProblems,
        BodyProblems,
        (status = 404, description = "NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "WRONG_KIND (not a CHILD)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "CASCADE_TOO_LARGE: the destroy would end more sessions than `[limits] max_cascade`; nothing changed", body = Problem, content_type = "application/problem+json"),
    ))]
async fn destroy_child(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<DestroyRequest>,
) -> Result<Json<DestroyResponse>, ApiError> {
    do_destroy(
        &state,
        &caller,
        &realm,
        DestroyTarget::Child(req.external_id),
        req.reason,
        req.origin_system,
    )
    .await
}

/// End every live session of a user in the realm, each with its tree (logout everywhere).
#[utoipa::path(post, path = "/admin/realms/{realm}/external-sessions/destroy-user",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name")),
    request_body = DestroyUserRequest,
    responses(
        (status = 200, description = "Every session that changed", body = DestroyResponse),
        (status = 422, description = "CASCADE_TOO_LARGE: the destroy would end more sessions than `[limits] max_cascade`; nothing changed", body = Problem, content_type = "application/problem+json"),
        WriteAccessProblems,
        BodyProblems,
    ))]
async fn destroy_user(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<DestroyUserRequest>,
) -> Result<Json<DestroyResponse>, ApiError> {
    do_destroy(
        &state,
        &caller,
        &realm,
        DestroyTarget::User(req.user_id),
        req.reason,
        req.origin_system,
    )
    .await
}

/// The whole tree that contains this session, from its root.
#[utoipa::path(get, path = "/admin/realms/{realm}/external-sessions/session-tree/{externalId}",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name"),
           ("externalId" = String, Path, description = "Any session of the tree")),
    responses(
        (status = 200, description = "The tree", body = TreeResponse),
        AccessProblems,
        (status = 404, description = "NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "TREE_TOO_LARGE: the tree holds more sessions than `[limits] max_tree` lets one read return; list them page by page", body = Problem, content_type = "application/problem+json"),
    ))]
async fn session_tree(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((realm, external_id)): ApiPath<(String, String)>,
) -> Result<Json<TreeResponse>, ApiError> {
    authorize(&caller, &realm)?;
    trace_session(&external_id);
    let entries = state
        .sessions
        .tree(&realm, &external_id)
        .await?
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::refused(
                ProblemCode::NotFound,
                format!("session {external_id:?} not found in this realm"),
            )
        })?;
    let root_external_id = entries
        .first()
        .map(|e| e.session.external_id.clone())
        .unwrap_or_default();
    let ids: Vec<String> = entries
        .iter()
        .map(|e| e.session.external_id.clone())
        .collect();
    let mut by_session: std::collections::HashMap<String, Vec<SessionDeliveryDto>> =
        std::collections::HashMap::new();
    for d in state
        .sessions
        .store()
        .session_deliveries(&realm, &ids)
        .await?
    {
        let status = crate::store::deliveries::DeliveryStatus::parse(&d.status)
            .unwrap_or(crate::store::deliveries::DeliveryStatus::Pending);
        by_session
            .entry(d.external_id)
            .or_default()
            .push(SessionDeliveryDto {
                id: d.id,
                connector: d.connector,
                event_type: d.event_type,
                status,
                attempts: d.attempts,
                last_error: d.last_error,
            });
    }
    Ok(Json(TreeResponse {
        root_external_id,
        size: entries.len(),
        sessions: entries
            .into_iter()
            .map(|e| TreeEntryDto {
                depth: e.depth,
                deliveries: by_session
                    .remove(&e.session.external_id)
                    .unwrap_or_default(),
                session: e.session.into(),
            })
            .collect(),
    }))
}

/// One session.
#[utoipa::path(get, path = "/admin/realms/{realm}/external-sessions/{externalId}",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name"),
           ("externalId" = String, Path, description = "External id")),
    responses(
        (status = 200, description = "The session", body = SessionDto),
        AccessProblems,
        (status = 404, description = "NOT_FOUND", body = Problem, content_type = "application/problem+json"),
    ))]
async fn get_session(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((realm, external_id)): ApiPath<(String, String)>,
) -> Result<Json<SessionDto>, ApiError> {
    authorize(&caller, &realm)?;
    trace_session(&external_id);
    let session = state
        .sessions
        .get(&realm, &external_id)
        .await?
        .ok_or_else(|| {
            ApiError::refused(
                ProblemCode::NotFound,
                format!("session {external_id:?} not found in this realm"),
            )
        })?;
    Ok(Json(session.into()))
}

/// `GET {base}/map-parent` and the other action paths: the session whose external id is the
/// action's name (the last path segment, plain ASCII). Documented as `GET /{externalId}`.
async fn get_session_named_like_an_action(
    state: State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    uri: axum::http::Uri,
) -> Result<Json<SessionDto>, ApiError> {
    let action = uri.path().rsplit('/').next().unwrap_or_default().to_owned();
    get_session(state, caller, ApiPath((realm, action))).await
}

/// Sessions of the realm, filtered, in creation order, cursor-paginated.
#[utoipa::path(get, path = "/admin/realms/{realm}/external-sessions",
    tag = "external-sessions", security(("bearer" = [])),
    params(("realm" = String, Path, description = "Realm name"), ListParams),
    responses(
        (status = 200, description = "One page", body = ListResponse),
        AccessProblems,
    ))]
async fn list_sessions(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<ListResponse>, ApiError> {
    authorize(&caller, &realm)?;
    let after = params.cursor.as_deref().map(cursor::decode).transpose()?;
    if params.limit == Some(0) {
        return Err(ApiError::Validation("limit must be at least 1".into()));
    }
    let page = state
        .sessions
        .query(
            &realm,
            SessionQuery {
                idp_session_id: params.keycloak_session_id,
                idp_client_session_id: params.keycloak_client_session_id,
                user_id: params.user_id,
                status: params.status,
                system: params.system,
                after,
                limit: params.limit.unwrap_or(0),
            },
        )
        .await?;
    Ok(Json(ListResponse {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_after.map(cursor::encode),
    }))
}
