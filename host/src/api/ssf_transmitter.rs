//! Lockstep as a Shared Signals (SSF 1.0) transmitter: the metadata documents
//! (`/.well-known/ssf-configuration`, per realm too), the public signing keys
//! (`/ssf/jwks.json`), stream management of a realm under `/realms/{realm}/ssf/transmitter/`
//! (configuration, status, subjects, verification, RFC 8936 poll) and key rotation
//! (`/admin/ssf/signing-keys/rotate`). Callers need `ssf:manage` in the realm, like the admin
//! API's permissions; refusals are problem documents (400, 401, 403, 404, 409).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, PROBLEM_JSON, Problem};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::spec::{
    AlreadyExists, BadRealm, Forbidden, Invalid, JsonBody, NoPublicUrl, NotFound, Realm,
    Unauthorized,
};
use crate::auth::Permission;
use crate::domain::{AuditAction, AuditEntry, ProblemCode, rules};
use crate::sync::ssf_transmit::{
    PollRequest, PollResponse, SsfError, StreamRequest, StreamStatus, StreamView,
};

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metadata))
        .routes(routes!(realm_metadata))
        // The realm's metadata at the RFC 8414 style location as well: the same operation,
        // documented once (its description names this path).
        .route(
            "/.well-known/ssf-configuration/realms/{realm}",
            get(realm_metadata),
        )
        .routes(routes!(jwks))
        .routes(routes!(rotate))
        .routes(routes!(create, read, update, replace, remove))
        .routes(routes!(status, set_status))
        .routes(routes!(add_subject))
        .routes(routes!(remove_subject))
        .routes(routes!(verify))
        .routes(routes!(poll))
}

impl From<SsfError> for ApiError {
    fn from(e: SsfError) -> Self {
        match e {
            SsfError::Invalid(m) => ApiError::Validation(m),
            SsfError::NotFound(_) | SsfError::Off => {
                ApiError::refused(ProblemCode::NotFound, e.to_string())
            }
            SsfError::Conflict(m) => ApiError::refused(ProblemCode::AlreadyExists, m),
            SsfError::Store(err) => {
                tracing::error!(error = %err, "ssf transmitter: store failed");
                ApiError::Unavailable("the database cannot be reached; try again".into())
            }
            SsfError::Signing(err) => {
                tracing::error!(error = %err, "ssf transmitter: signing failed");
                ApiError::Unavailable("no signing key is usable; try again".into())
            }
        }
    }
}

/// `ssf-stream-update` of stream `id` (`change`: what the call changes).
fn stream_entry(caller: &Caller, realm: &str, id: Option<&str>, change: &str) -> AuditEntry {
    let e = super::audit::entry(caller, AuditAction::SsfStreamUpdate, Some(realm))
        .detail(json!({ "change": change }));
    match id {
        Some(id) => e.target(id),
        None => e,
    }
}

/// Passes a transmitter result on, recording a refusal in the audit log first.
async fn refused<T>(
    state: &AppState,
    audit: AuditEntry,
    result: Result<T, SsfError>,
) -> Result<T, ApiError> {
    super::audit::refused(state, audit, result.map_err(ApiError::from)).await
}

/// Checks the realm's name and the caller's `ssf:manage` there.
fn allowed(caller: &Caller, realm: &str) -> Result<(), ApiError> {
    rules::realm(realm).map_err(|e| ApiError::Validation(e.to_string()))?;
    caller.0.authorize(realm, Permission::SsfManage)?;
    Ok(())
}

fn no_store(value: Value) -> Response {
    super::error::no_store_json(StatusCode::OK, value)
}

/// The service's transmitter metadata (issuer, keys, delivery methods; stream management is
/// per realm: see the realm's document).
#[utoipa::path(get, path = "/.well-known/ssf-configuration", operation_id = "ssf_configuration", tag = "shared-signals",
    responses(
        (status = 200, description = "SSF 1.0 transmitter metadata", body = Object),
        NoPublicUrl,
    ))]
async fn metadata(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.ssf_transmitter.metadata(None)?))
}

/// A realm's transmitter metadata, with its stream management endpoints.
#[utoipa::path(get, path = "/realms/{realm}/.well-known/ssf-configuration", operation_id = "ssf_realm_configuration", tag = "shared-signals",
    params(Realm),
    responses(
        (status = 200, description = "SSF 1.0 transmitter metadata of the realm (also at `/.well-known/ssf-configuration/realms/{realm}`)", body = Object),
        BadRealm, NoPublicUrl,
    ))]
async fn realm_metadata(
    State(state): State<AppState>,
    ApiPath(realm): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    rules::realm(&realm).map_err(|e| ApiError::Validation(e.to_string()))?;
    Ok(Json(state.ssf_transmitter.metadata(Some(&realm))?))
}

/// Lockstep's public signing keys: the current ones and, during the overlap, the replaced.
#[utoipa::path(get, path = "/ssf/jwks.json", operation_id = "ssf_jwks", tag = "shared-signals",
    responses((status = 200, description = "JWK Set (ES256 and RS256 public keys)", body = Object)))]
async fn jwks(State(state): State<AppState>) -> Response {
    let mut r = Json(state.ssf_transmitter.jwks()).into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    r
}

/// Generates new signing keys; the replaced ones stay in the JWKS for the overlap.
#[utoipa::path(post, path = "/admin/ssf/signing-keys/rotate", operation_id = "ssf_rotate_keys", tag = "shared-signals",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The new keys' ids", body = Object),
        Unauthorized,
        (status = 403, description = "FORBIDDEN: needs `ssf:manage` in every realm", body = Problem, content_type = PROBLEM_JSON),
        NoPublicUrl,
    ))]
async fn rotate(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.0.authorize_global(Permission::SsfManage)?;
    if !state.ssf_transmitter.is_on() {
        return Err(SsfError::Off.into());
    }
    let kids = state.ssf_transmitter.rotate().await?;
    tracing::info!(actor = %caller.0.actor(), ?kids, "ssf signing keys rotated");
    Ok(Json(json!({ "kids": kids })))
}

/// `stream_id` in the query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamIdQuery {
    /// The stream (optional for GET: every stream of the realm).
    pub stream_id: Option<String>,
}

/// Creates a stream (SSF 1.0 section 8.1.1.1).
#[utoipa::path(post, path = "/realms/{realm}/ssf/transmitter/stream", operation_id = "ssf_stream_create", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm),
    request_body = StreamRequest,
    responses(
        (status = 201, description = "The stream's configuration", body = StreamView),
        Invalid, JsonBody, Unauthorized,
        (status = 403, description = "FORBIDDEN: needs `ssf:manage` in the realm", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "ALREADY_EXISTS: a stream of the realm already pushes to that URL", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<StreamRequest>,
) -> Result<Response, ApiError> {
    allowed(&caller, &realm)?;
    let t = &state.ssf_transmitter;
    let audit = super::audit::entry(&caller, AuditAction::SsfStreamCreate, Some(&realm));
    let made = t.create(&realm, caller.0.name(), req, audit.clone()).await;
    let stream = refused(&state, audit, made).await?;
    let view = t.view(&stream)?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// One stream (`stream_id`) or every stream of the realm.
#[utoipa::path(get, path = "/realms/{realm}/ssf/transmitter/stream", operation_id = "ssf_stream_read", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm, StreamIdQuery),
    responses(
        (status = 200, description = "The stream, or an array of the realm's streams", body = StreamView),
        (status = 400, description = "VALIDATION: bad realm name or stream_id", body = Problem, content_type = PROBLEM_JSON),
        Unauthorized, Forbidden, NotFound,
    ))]
async fn read(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiQuery(q): ApiQuery<StreamIdQuery>,
) -> Result<Response, ApiError> {
    allowed(&caller, &realm)?;
    let t = &state.ssf_transmitter;
    match q.stream_id {
        Some(id) => Ok(no_store(json!(t.view(&*t.get(&realm, &id)?)?))),
        None => {
            let views = t
                .list(&realm)?
                .iter()
                .map(|s| t.view(s))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(no_store(json!(views)))
        }
    }
}

/// Changes the given receiver-supplied fields.
#[utoipa::path(patch, path = "/realms/{realm}/ssf/transmitter/stream", operation_id = "ssf_stream_update", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm),
    request_body = StreamRequest,
    responses(
        (status = 200, description = "The stream", body = StreamView),
        Invalid, JsonBody, Unauthorized, Forbidden, NotFound, AlreadyExists,
    ))]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<StreamRequest>,
) -> Result<Json<StreamView>, ApiError> {
    allowed(&caller, &realm)?;
    let t = &state.ssf_transmitter;
    let audit = stream_entry(&caller, &realm, req.stream_id.as_deref(), "update");
    let changed = t.update(&realm, req, false, audit.clone()).await;
    Ok(Json(t.view(&*refused(&state, audit, changed).await?)?))
}

/// Replaces every receiver-supplied field.
#[utoipa::path(put, path = "/realms/{realm}/ssf/transmitter/stream", operation_id = "ssf_stream_replace", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm),
    request_body = StreamRequest,
    responses(
        (status = 200, description = "The stream", body = StreamView),
        (status = 400, description = "VALIDATION: delivery and events_requested are required", body = Problem, content_type = PROBLEM_JSON),
        JsonBody, Unauthorized, Forbidden, NotFound, AlreadyExists,
    ))]
async fn replace(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<StreamRequest>,
) -> Result<Json<StreamView>, ApiError> {
    allowed(&caller, &realm)?;
    let t = &state.ssf_transmitter;
    let audit = stream_entry(&caller, &realm, req.stream_id.as_deref(), "replace");
    let changed = t.update(&realm, req, true, audit.clone()).await;
    Ok(Json(t.view(&*refused(&state, audit, changed).await?)?))
}

/// Deletes a stream; its undelivered events are dropped.
#[utoipa::path(delete, path = "/realms/{realm}/ssf/transmitter/stream", operation_id = "ssf_stream_delete", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm, StreamIdQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "VALIDATION: stream_id is required", body = Problem, content_type = PROBLEM_JSON),
        Unauthorized, Forbidden, NotFound,
    ))]
async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiQuery(q): ApiQuery<StreamIdQuery>,
) -> Result<StatusCode, ApiError> {
    allowed(&caller, &realm)?;
    let id = q
        .stream_id
        .ok_or_else(|| ApiError::Validation("stream_id is required".into()))?;
    let audit = super::audit::entry(&caller, AuditAction::SsfStreamDelete, Some(&realm))
        .target(id.as_str());
    let gone = state
        .ssf_transmitter
        .delete(&realm, &id, audit.clone())
        .await;
    refused(&state, audit, gone).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn status_body(id: &str, status: StreamStatus, reason: Option<&str>) -> Value {
    let mut v = json!({"stream_id": id, "status": status});
    if let (Some(r), Some(obj)) = (reason, v.as_object_mut()) {
        obj.insert("reason".into(), json!(r));
    }
    v
}

/// A stream's status.
#[utoipa::path(get, path = "/realms/{realm}/ssf/transmitter/status", operation_id = "ssf_stream_status", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm, StreamIdQuery),
    responses(
        (status = 200, description = "`stream_id`, `status` (enabled, paused, disabled), `reason`", body = Object),
        Invalid, Unauthorized, Forbidden, NotFound,
    ))]
async fn status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiQuery(q): ApiQuery<StreamIdQuery>,
) -> Result<Response, ApiError> {
    allowed(&caller, &realm)?;
    let id = q
        .stream_id
        .ok_or_else(|| ApiError::Validation("stream_id is required".into()))?;
    let s = state.ssf_transmitter.get(&realm, &id)?;
    Ok(no_store(status_body(&id, s.status, s.reason.as_deref())))
}

/// A status change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// The stream.
    pub stream_id: String,
    /// enabled, paused or disabled.
    #[schema(value_type = String)]
    pub status: StreamStatus,
    /// Why.
    pub reason: Option<String>,
}

/// Enables, pauses (events are held) or disables (events are not kept) a stream.
#[utoipa::path(post, path = "/realms/{realm}/ssf/transmitter/status", operation_id = "ssf_stream_set_status", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm),
    request_body = StatusRequest,
    responses(
        (status = 200, description = "The new status", body = Object),
        Invalid, JsonBody, Unauthorized, Forbidden, NotFound,
    ))]
async fn set_status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<StatusRequest>,
) -> Result<Json<Value>, ApiError> {
    allowed(&caller, &realm)?;
    if req.reason.as_ref().is_some_and(|r| r.len() > 1_024) {
        return Err(ApiError::Validation("reason is too long".into()));
    }
    let audit = stream_entry(&caller, &realm, Some(&req.stream_id), "status")
        .detail(json!({"change": "status", "status": req.status, "reason": req.reason}));
    let set = state
        .ssf_transmitter
        .set_status(
            &realm,
            &req.stream_id,
            req.status,
            req.reason,
            audit.clone(),
        )
        .await;
    let s = refused(&state, audit, set).await?;
    Ok(Json(status_body(
        &s.stream_id,
        s.status,
        s.reason.as_deref(),
    )))
}

/// A subject to add or remove.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubjectRequest {
    /// The stream.
    pub stream_id: String,
    /// An RFC 9493 subject identifier (opaque or iss_sub user id, opaque session id, complex).
    #[schema(value_type = Object)]
    pub subject: Value,
    /// Whether the receiver verified the subject (ignored).
    pub verified: Option<bool>,
}

/// Puts a removed subject back (every subject of the realm is in a stream by default).
#[utoipa::path(post, path = "/realms/{realm}/ssf/transmitter/add-subject", operation_id = "ssf_add_subject", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm),
    request_body = SubjectRequest,
    responses(
        (status = 200, description = "Added"),
        Invalid, JsonBody, Unauthorized, Forbidden, NotFound,
    ))]
async fn add_subject(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<SubjectRequest>,
) -> Result<StatusCode, ApiError> {
    allowed(&caller, &realm)?;
    let audit = stream_entry(&caller, &realm, Some(&req.stream_id), "add-subject")
        .detail(json!({"change": "add-subject", "subject": req.subject}));
    let added = state
        .ssf_transmitter
        .add_subject(&realm, &req.stream_id, req.subject, audit.clone())
        .await;
    refused(&state, audit, added).await?;
    Ok(StatusCode::OK)
}

/// Removes a subject: its sessions' events are no longer sent on the stream.
#[utoipa::path(post, path = "/realms/{realm}/ssf/transmitter/remove-subject", operation_id = "ssf_remove_subject", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm),
    request_body = SubjectRequest,
    responses(
        (status = 204, description = "Removed"),
        Invalid, JsonBody, Unauthorized, Forbidden, NotFound,
    ))]
async fn remove_subject(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<SubjectRequest>,
) -> Result<StatusCode, ApiError> {
    allowed(&caller, &realm)?;
    let audit = stream_entry(&caller, &realm, Some(&req.stream_id), "remove-subject")
        .detail(json!({"change": "remove-subject", "subject": req.subject}));
    let removed = state
        .ssf_transmitter
        .remove_subject(&realm, &req.stream_id, req.subject, audit.clone())
        .await;
    refused(&state, audit, removed).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A verification request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The stream.
    pub stream_id: String,
    /// Echoed in the verification event.
    pub state: Option<String>,
}

/// Sends a verification SET carrying `state` on the stream (pushed, or returned by the next
/// poll).
#[utoipa::path(post, path = "/realms/{realm}/ssf/transmitter/verify", operation_id = "ssf_verify", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm),
    request_body = VerifyRequest,
    responses(
        (status = 204, description = "The verification SET is on its way"),
        Invalid, JsonBody, Unauthorized, Forbidden, NotFound,
    ))]
async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiJson(req): ApiJson<VerifyRequest>,
) -> Result<StatusCode, ApiError> {
    allowed(&caller, &realm)?;
    if req.state.as_ref().is_some_and(|s| s.len() > 1_024) {
        return Err(ApiError::Validation("state is too long".into()));
    }
    state
        .ssf_transmitter
        .verify(&realm, &req.stream_id, req.state)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// RFC 8936 poll of a poll stream: acknowledges (`ack`, `setErrs`) and returns waiting SETs.
#[utoipa::path(post, path = "/realms/{realm}/ssf/transmitter/poll/{stream_id}", operation_id = "ssf_poll", tag = "shared-signals",
    security(("bearer" = [])),
    params(Realm, ("stream_id" = String, Path, description = "Stream")),
    request_body = PollRequest,
    responses(
        (status = 200, description = "`sets` (jti → SET) and `moreAvailable`; a SET not acknowledged within 30 s is offered again", body = PollResponse),
        Invalid, JsonBody, Unauthorized, Forbidden, NotFound,
    ))]
async fn poll(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((realm, id)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<PollRequest>,
) -> Result<Response, ApiError> {
    allowed(&caller, &realm)?;
    let res = state.ssf_transmitter.poll(&realm, &id, req).await?;
    Ok(no_store(json!(res)))
}
