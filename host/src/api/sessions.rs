//! `/admin/realms/{realm}/external-sessions`: the Keymate-compatible external-sessions API.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::AppState;
use super::cursor;
use super::dto::*;
use super::error::{ApiError, PROBLEM_JSON, Problem};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::spec::{AlreadyExists, CascadeTooLarge, ExternalId, JsonBody, NotFound, Realm};
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
    #[response(status = 400, content_type = PROBLEM_JSON)]
    Invalid(Problem),
    /// UNAUTHORIZED: missing or invalid bearer token.
    #[response(status = 401, content_type = PROBLEM_JSON)]
    Unauthenticated(Problem),
    /// FORBIDDEN: no `users:manage` in this realm.
    #[response(status = 403, content_type = PROBLEM_JSON)]
    Forbidden(Problem),
}

/// Problems every authenticated write can answer with.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only describes responses for the OpenAPI document
enum WriteAccessProblems {
    /// VALIDATION: bad realm name, path or body.
    #[response(status = 400, content_type = PROBLEM_JSON)]
    Invalid(Problem),
    /// UNAUTHORIZED: missing or invalid bearer token.
    #[response(status = 401, content_type = PROBLEM_JSON)]
    Unauthenticated(Problem),
    /// FORBIDDEN: no `users:manage` in this realm, or an `originSystem` other than the
    /// caller's own system (an API key's `system`, else its id); nothing changed.
    #[response(status = 403, content_type = PROBLEM_JSON)]
    Forbidden(Problem),
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
        content_type = PROBLEM_JSON,
        headers(("Retry-After" = u64, description = "Seconds before trying again"))
    )]
    Backlogged(Problem),
}

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    // GET on an action's path is the session of that name (ids are free text); without it,
    // `GET .../map-parent` was the action's 405 and such a session unreadable. A plain method
    // beside the action: `openapi::SessionsNamedLikeActions` documents it as a copy of
    // `get_session`, since one handler serves six paths.
    let named = |action: UtoipaMethodRouter<AppState>| {
        action.map(|method| method.get(get_session_named_like_an_action))
    };
    OpenApiRouter::new()
        .routes(named(routes!(map_parent)))
        .routes(named(routes!(map_child)))
        .routes(named(routes!(map_fixed)))
        .routes(named(routes!(destroy_parent)))
        .routes(named(routes!(destroy_child)))
        .routes(named(routes!(destroy_user)))
        .routes(routes!(session_tree))
        .routes(routes!(get_session))
        .routes(routes!(list_sessions))
        // The listing with a trailing slash: an alias, not an operation of its own.
        .route(
            "/admin/realms/{realm}/external-sessions/",
            get(list_sessions),
        )
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
    params(Realm),
    request_body = MapParentRequest,
    responses(
        (status = 201, description = "Registered", body = SessionDto),
        WriteAccessProblems, AlreadyExists, JsonBody, AdmissionProblems,
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
    params(Realm),
    request_body = MapChildRequest,
    responses(
        (status = 201, description = "Registered", body = SessionDto),
        WriteAccessProblems,
        (status = 404, description = "PARENT_NOT_FOUND", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "ALREADY_EXISTS or PARENT_NOT_ACTIVE", body = Problem, content_type = PROBLEM_JSON),
        JsonBody, AdmissionProblems,
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
    params(Realm),
    request_body = MapFixedRequest,
    responses(
        (status = 201, description = "Registered", body = SessionDto),
        WriteAccessProblems, AlreadyExists, JsonBody, AdmissionProblems,
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
    params(Realm),
    request_body = DestroyRequest,
    responses(
        (status = 200, description = "Every session that changed", body = DestroyResponse),
        WriteAccessProblems, JsonBody, NotFound,
        (status = 409, description = "WRONG_KIND (a CHILD)", body = Problem, content_type = PROBLEM_JSON),
        CascadeTooLarge,
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
    params(Realm),
    request_body = DestroyRequest,
    responses(
        (status = 200, description = "Every session that changed", body = DestroyResponse),
        WriteAccessProblems, JsonBody, NotFound,
        (status = 409, description = "WRONG_KIND (not a CHILD)", body = Problem, content_type = PROBLEM_JSON),
        CascadeTooLarge,
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
    params(Realm),
    request_body = DestroyUserRequest,
    responses(
        (status = 200, description = "Every session that changed", body = DestroyResponse),
        CascadeTooLarge, WriteAccessProblems, JsonBody,
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
    params(Realm,
           ("externalId" = String, Path, description = "Any session of the tree")),
    responses(
        (status = 200, description = "The tree", body = TreeResponse),
        AccessProblems, NotFound,
        (status = 422, description = "TREE_TOO_LARGE: the tree holds more sessions than `[limits] max_tree` lets one read return; list them page by page", body = Problem, content_type = PROBLEM_JSON),
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
    params(Realm,
           ExternalId),
    responses(
        (status = 200, description = "The session", body = SessionDto),
        AccessProblems, NotFound,
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
    params(Realm, ListParams),
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
