//! `/admin/connectors`: the operator surface of the connector lifecycle (list, inspect,
//! upload, remove, enable, disable) and `/metrics`. Needs `connectors:manage` in every
//! realm; the rules live in `lifecycle`.

use axum::Json;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, PROBLEM_JSON, Problem};
use super::extract::{ApiPath, Caller};
use super::spec::{ConnectorName, Forbidden, Invalid, NotFound, Unauthorized};
use crate::auth::Permission;
use crate::domain::ProblemCode;
use crate::domain::{AuditAction, AuditEntry, AuditOutcome};
use crate::lifecycle::{
    ConnectorInfo, MAX_COMPONENT_BYTES, MAX_MANIFEST_BYTES, ManageError, PutOutcome,
};
use crate::runtime::cache::CacheOutcome;
use crate::runtime::manifest::{self, OnFailure, SyncMode};
use crate::runtime::registry::Source;

/// Largest upload body: both parts plus room for the multipart framing.
pub const MAX_UPLOAD_BYTES: usize = MAX_COMPONENT_BYTES + MAX_MANIFEST_BYTES + 64 * 1024;

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(one, put, remove).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)))
        .routes(routes!(disable))
        .routes(routes!(enable))
        .routes(routes!(metrics))
}

/// Failure policy of a connector.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDto {
    /// retry, alert or log.
    pub on_failure: String,
    /// Attempts before a dead letter.
    pub max_attempts: u32,
    /// First backoff ceiling.
    pub backoff_ms: u64,
    /// Largest backoff ceiling.
    pub max_backoff_ms: u64,
}

/// Deliveries of a connector.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCountsDto {
    /// Waiting in the database (held while disabled).
    pub pending: i64,
    /// Dead letters in the database.
    pub dead: i64,
    /// Dropped (log policy) in the database.
    pub dropped: i64,
    /// Delivered by this instance since it started.
    pub delivered_since_start: u64,
    /// Failed hook calls (retry, fail, timeout, oom, trap) on this instance since it started.
    pub failed_calls_since_start: u64,
}

/// Hook latency on this instance since it started (from the histogram behind `/metrics`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencyDto {
    /// Hook calls measured.
    pub calls: u64,
    /// Median, in milliseconds (null before the first call).
    pub p50_ms: Option<f64>,
    /// 99th percentile, in milliseconds.
    pub p99_ms: Option<f64>,
}

/// The last refused change.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LastErrorDto {
    /// Why it was refused.
    pub message: String,
    /// When it was refused.
    pub at: DateTime<Utc>,
}

/// A connector: loaded (`active` or `disabled`), or configured and `failed` to load, in
/// which case only its name, source, state, `lastError` and counts are known and the fields of
/// a serving version are absent.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorDto {
    /// Unique name (for a manifest that cannot be read, its file name without `.toml`).
    pub name: String,
    /// Version serving: content hash of component and manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The WIT world the component targets (`lockstep:connector@0.3.0`, `@0.2.0` or `@0.1.0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub world: Option<String>,
    /// `directory` (a manifest in the watched directory) or `api` (uploaded).
    pub source: String,
    /// The manifest file, for directory connectors.
    pub manifest_path: Option<String>,
    /// `active`, `disabled` (deliveries held) or `failed` (it did not load and no version of
    /// it serves; `lastError` says why).
    pub state: String,
    /// Realms served (`*` for all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realms: Option<Vec<String>>,
    /// Event types received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// outbound, inbound or both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Outgoing HTTP allowlist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_hosts: Option<Vec<String>>,
    /// Audiences its events may be signed for (`signing_audiences`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_audiences: Option<Vec<String>>,
    /// Deadline per hook call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Linear memory cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// Whether calls are served from warm instances (`reuse_instance`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse_instance: Option<bool>,
    /// Calls one warm instance serves before it is recycled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_calls_per_instance: Option<u32>,
    /// What a failed delivery does: retries, dead letter or drop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyDto>,
    /// When this version was swapped in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<DateTime<Utc>>,
    /// `cache` (no compilation) or `compiler`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compiled_from: Option<String>,
    /// The last refused change since this version was loaded (for a `failed` connector: why
    /// it does not load).
    pub last_error: Option<LastErrorDto>,
    /// Its deliveries: waiting, dead and dropped in the database; delivered and failed calls
    /// on this instance.
    pub deliveries: DeliveryCountsDto,
    /// How long its hook calls took on this instance since it started.
    pub hook_latency: LatencyDto,
}

impl From<ConnectorInfo> for ConnectorDto {
    fn from(info: ConnectorInfo) -> Self {
        let ms = |q: f64| info.metrics.latency.quantile(q).map(|s| s * 1_000.0);
        let e = info.entry.as_deref();
        let m = e.map(|e| &e.connector.manifest);
        ConnectorDto {
            name: info.name.clone(),
            version: e.map(|e| e.connector.version.clone()),
            world: e.map(|e| e.connector.world.package().to_owned()),
            source: info.source.label().to_owned(),
            manifest_path: match &info.source {
                Source::Directory(p) => Some(p.display().to_string()),
                Source::Api => None,
            },
            state: match e {
                Some(e) if e.enabled => "active",
                Some(_) => "disabled",
                None => "failed",
            }
            .to_owned(),
            realms: m.map(|m| m.realms.clone()),
            events: m.map(|m| m.events.iter().map(|t| t.as_str().to_owned()).collect()),
            mode: m.map(|m| {
                match m.mode {
                    SyncMode::Outbound => "outbound",
                    SyncMode::Inbound => "inbound",
                    SyncMode::Both => "both",
                }
                .to_owned()
            }),
            allowed_hosts: m.map(|m| {
                m.allowed_hosts
                    .iter()
                    .map(|h| format!("{}://{}:{}", h.scheme, h.host, h.port))
                    .collect()
            }),
            signing_audiences: m.map(|m| m.signing_audiences.clone()),
            timeout_ms: m.map(|m| m.timeout_ms),
            memory_mb: m.map(|m| m.memory_mb),
            reuse_instance: m.map(|m| m.reuse_instance),
            max_calls_per_instance: m.map(|m| m.max_calls_per_instance),
            policy: m.map(|m| PolicyDto {
                on_failure: match m.policy.on_failure {
                    OnFailure::Retry => "retry",
                    OnFailure::Alert => "alert",
                    OnFailure::Log => "log",
                }
                .to_owned(),
                max_attempts: m.policy.max_attempts,
                backoff_ms: m.policy.backoff_ms,
                max_backoff_ms: m.policy.max_backoff_ms,
            }),
            loaded_at: e.map(|e| e.loaded_at),
            compiled_from: e.map(|e| {
                match e.connector.cache {
                    CacheOutcome::Hit => "cache",
                    CacheOutcome::Miss => "compiler",
                }
                .to_owned()
            }),
            last_error: info.last_error.map(|l| LastErrorDto {
                message: l.message,
                at: l.at,
            }),
            deliveries: DeliveryCountsDto {
                pending: info.queue.pending,
                dead: info.queue.dead,
                dropped: info.queue.dropped,
                delivered_since_start: info.metrics.calls("delivered"),
                failed_calls_since_start: info.metrics.failed_calls(),
            },
            hook_latency: LatencyDto {
                calls: info.metrics.latency.count(),
                p50_ms: ms(0.5),
                p99_ms: ms(0.99),
            },
        }
    }
}

/// Every loaded connector and every configured one that failed to load.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectorList {
    /// Sorted by name.
    pub items: Vec<ConnectorDto>,
}

/// What an upload did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PutResponse {
    /// `created`, `replaced` or `unchanged` (same bytes and manifest: nothing was done).
    pub outcome: String,
    /// The version replaced.
    pub previous_version: Option<String>,
    /// The connector now serving.
    pub connector: ConnectorDto,
}

/// The two parts of an upload (OpenAPI description only).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The manifest (TOML); its `name` must equal the path's.
    manifest: String,
    /// The component (`.wasm`). Optional on a replacement: the stored one is kept.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    component: Option<Vec<u8>>,
}

impl From<ManageError> for ApiError {
    fn from(e: ManageError) -> Self {
        match e {
            ManageError::Manifest(m) => ApiError::InvalidManifest(m.to_string()),
            ManageError::Component(c) => ApiError::InvalidComponent(c.to_string()),
            ManageError::Request(m) => ApiError::Validation(m),
            ManageError::NotFound(_) => ApiError::refused(ProblemCode::NotFound, e.to_string()),
            ManageError::ManagedByDirectory { .. } | ManageError::ManagedByApi(_) => {
                ApiError::refused(ProblemCode::Conflict, e.to_string())
            }
            ManageError::Store(s) => s.into(),
            ManageError::InFile { source, .. } => (*source).into(),
        }
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    manifest::check_name(name).map_err(ApiError::Validation)
}

/// Every connector with its state, counts and hook latency: the loaded ones and the
/// configured ones that failed to load (`failed`).
#[utoipa::path(get, path = "/admin/connectors", operation_id = "list_connectors", tag = "connectors", security(("bearer" = [])),
    responses((status = 200, body = ConnectorList),
              Unauthorized, Forbidden))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ConnectorList>, ApiError> {
    caller.0.authorize_global(Permission::ConnectorsManage)?;
    let items = state.connectors.list().await?;
    Ok(Json(ConnectorList {
        items: items.into_iter().map(Into::into).collect(),
    }))
}

/// One connector: its manifest, state, version, deliveries and hook latency.
#[utoipa::path(get, path = "/admin/connectors/{name}", operation_id = "get_connector", tag = "connectors", security(("bearer" = [])),
    params(ConnectorName),
    responses((status = 200, body = ConnectorDto),
              Invalid, Unauthorized, Forbidden, NotFound))]
async fn one(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ConnectorDto>, ApiError> {
    caller.0.authorize_global(Permission::ConnectorsManage)?;
    check_name(&name)?;
    Ok(Json(state.connectors.describe(&name).await?.into()))
}

/// Records an upload that changed nothing (the API's and the console's): nothing was
/// written, so nothing carried the audit record, and it is written on its own. A failure is
/// logged, not answered: the upload itself succeeded.
pub(crate) async fn record_unchanged(state: &AppState, audit: AuditEntry, name: &str) {
    let audit = audit.detail(serde_json::json!({ "outcome": "unchanged" }));
    if let Err(e) = state
        .sessions
        .store()
        .record_audit(audit, AuditOutcome::Ok(0))
        .await
    {
        tracing::warn!(error = %e, connector = %name, "audit record of an unchanged upload not written");
    }
}

/// Adds or replaces an uploaded connector (multipart: `manifest`, `component`). The new
/// version is validated, compiled and pre-instantiated before it is stored and swapped in;
/// calls in flight finish on the old one. Identical bytes and manifest change nothing.
#[utoipa::path(put, path = "/admin/connectors/{name}", operation_id = "put_connector", tag = "connectors", security(("bearer" = [])),
    params(ConnectorName),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 201, description = "Created", body = PutResponse),
              (status = 200, description = "Replaced or unchanged", body = PutResponse),
              Invalid, Unauthorized, Forbidden,
              (status = 409, description = "The name belongs to a directory manifest", body = Problem, content_type = PROBLEM_JSON),
              (status = 413, description = "PAYLOAD_TOO_LARGE: upload larger than the limit", body = Problem, content_type = PROBLEM_JSON),
              (status = 415, description = "VALIDATION: body is not multipart/form-data", body = Problem, content_type = PROBLEM_JSON),
              (status = 422, description = "The component does not load", body = Problem, content_type = PROBLEM_JSON)))]
async fn put(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    caller.0.authorize_global(Permission::ConnectorsManage)?;
    check_name(&name)?;
    let (manifest, component) = read_upload(request, &state).await?;
    let audit = super::audit::entry(&caller, AuditAction::ConnectorPut, None).target(name.clone());
    let put = state
        .connectors
        .put(&name, &manifest, component, Some(audit.clone()))
        .await
        .map_err(ApiError::from);
    let (outcome, entry) = super::audit::refused(&state, audit.clone(), put).await?;
    if matches!(outcome, PutOutcome::Unchanged) {
        record_unchanged(&state, audit, &name).await;
    }
    let info = state
        .connectors
        .describe(&entry.connector.manifest.name)
        .await?;
    let (status, label, previous) = match outcome {
        PutOutcome::Created => (StatusCode::CREATED, "created", None),
        PutOutcome::Replaced { previous } => (StatusCode::OK, "replaced", Some(previous)),
        PutOutcome::Unchanged => (StatusCode::OK, "unchanged", None),
    };
    Ok((
        status,
        Json(PutResponse {
            outcome: label.to_owned(),
            previous_version: previous,
            connector: info.into(),
        }),
    ))
}

/// Reads the `manifest` and `component` parts, refusing anything else.
async fn read_upload(
    request: Request,
    state: &AppState,
) -> Result<(String, Option<Vec<u8>>), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return Err(ApiError::UnsupportedMediaType(format!(
            "an upload must be multipart/form-data with parts `manifest` and `component`, got {:?}",
            if content_type.is_empty() {
                "no Content-Type"
            } else {
                content_type.as_str()
            }
        )));
    }
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "an upload may carry at most {} MiB of component and {} KiB of manifest",
            MAX_COMPONENT_BYTES / (1024 * 1024),
            MAX_MANIFEST_BYTES / 1024
        ))
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES as u64) {
        return Err(too_large());
    }
    let mut multipart = axum::extract::Multipart::from_request(request, state)
        .await
        .map_err(|e| {
            ApiError::Validation(format!("malformed multipart body: {}", e.body_text()))
        })?;
    let read_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::Validation(format!("malformed multipart body: {}", e.body_text()))
        }
    };
    let mut manifest: Option<String> = None;
    let mut component: Option<Vec<u8>> = None;
    while let Some(mut field) = multipart.next_field().await.map_err(read_error)? {
        let part = field.name().unwrap_or("").to_owned();
        let limit = match part.as_str() {
            "manifest" if manifest.is_none() => MAX_MANIFEST_BYTES,
            "component" if component.is_none() => MAX_COMPONENT_BYTES,
            "manifest" | "component" => {
                return Err(ApiError::Validation(format!("part `{part}` appears twice")));
            }
            other => {
                return Err(ApiError::Validation(format!(
                    "unknown part {other:?}: an upload has parts `manifest` and `component`"
                )));
            }
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(read_error)? {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        if part == "manifest" {
            manifest = Some(String::from_utf8(bytes).map_err(|_| {
                ApiError::InvalidManifest("the manifest part is not UTF-8 text".into())
            })?);
        } else {
            component = Some(bytes);
        }
    }
    let manifest = manifest.ok_or_else(|| {
        ApiError::Validation("the `manifest` part (connector manifest, TOML) is required".into())
    })?;
    Ok((manifest, component))
}

/// Unloads and forgets an uploaded connector; its pending deliveries are held.
#[utoipa::path(delete, path = "/admin/connectors/{name}", operation_id = "remove_connector", tag = "connectors", security(("bearer" = [])),
    params(ConnectorName),
    responses((status = 204, description = "Removed"),
              Invalid, Unauthorized, Forbidden, NotFound,
              (status = 409, description = "The name belongs to a directory manifest", body = Problem, content_type = PROBLEM_JSON)))]
async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.0.authorize_global(Permission::ConnectorsManage)?;
    check_name(&name)?;
    let audit =
        super::audit::entry(&caller, AuditAction::ConnectorDelete, None).target(name.clone());
    let removed = state
        .connectors
        .remove(&name, Some(audit.clone()))
        .await
        .map_err(ApiError::from);
    super::audit::refused(&state, audit, removed).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stops calling a connector: its events are held as pending deliveries until it is enabled.
#[utoipa::path(post, path = "/admin/connectors/{name}/disable", operation_id = "disable_connector", tag = "connectors", security(("bearer" = [])),
    params(ConnectorName),
    responses((status = 200, body = ConnectorDto),
              Invalid, Unauthorized, Forbidden, NotFound))]
async fn disable(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ConnectorDto>, ApiError> {
    set_enabled(state, caller, name, false).await
}

/// Calls a connector again; deliveries held while it was disabled go out.
#[utoipa::path(post, path = "/admin/connectors/{name}/enable", operation_id = "enable_connector", tag = "connectors", security(("bearer" = [])),
    params(ConnectorName),
    responses((status = 200, body = ConnectorDto),
              Invalid, Unauthorized, Forbidden, NotFound))]
async fn enable(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ConnectorDto>, ApiError> {
    set_enabled(state, caller, name, true).await
}

async fn set_enabled(
    state: AppState,
    caller: Caller,
    name: String,
    enabled: bool,
) -> Result<Json<ConnectorDto>, ApiError> {
    caller.0.authorize_global(Permission::ConnectorsManage)?;
    check_name(&name)?;
    let action = if enabled {
        AuditAction::ConnectorEnable
    } else {
        AuditAction::ConnectorDisable
    };
    let audit = super::audit::entry(&caller, action, None).target(name.clone());
    let set = state
        .connectors
        .set_enabled(&name, enabled, Some(audit.clone()))
        .await
        .map_err(ApiError::from);
    super::audit::refused(&state, audit, set).await?;
    Ok(Json(state.connectors.describe(&name).await?.into()))
}

/// Prometheus metrics (text exposition 0.0.4): hook calls by outcome, hook latency
/// histograms, dead letters, swaps, queue depth and state per connector, compile cache.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = state.connectors.render_metrics().await;
            state.ssf.render_metrics(&mut text);
            text
        },
    )
}
