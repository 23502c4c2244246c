//! `/admin/deliveries`: outbox delivery state per connector, dead letters and replay.
//! Operator surface: needs `connectors:manage` in every realm.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::cursor;
use super::error::{ApiError, PROBLEM_JSON, Problem};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::spec::{Forbidden, Invalid, JsonBody, NotFound, Unauthorized};
use crate::auth::Permission;
use crate::domain::AuditAction;
use crate::domain::ProblemCode;
use crate::store::deliveries::{
    AttemptRow, DeliveryQuery, DeliveryRow, DeliveryStatus, ReplayTarget,
};
use crate::store::split_page;
use crate::sync::sessions::{DEFAULT_PAGE, MAX_PAGE};

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(replay))
        .routes(routes!(one))
}

fn time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// A delivery of one event to one connector.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryDto {
    /// Delivery id (`/admin/deliveries/{id}`).
    pub id: i64,
    /// Event id (stable across redeliveries).
    pub event_id: String,
    /// login, logout or revoke.
    pub event_type: String,
    /// The connector the event goes to.
    pub connector: String,
    /// The realm of the session.
    pub realm: String,
    /// External id of the session the event is about.
    pub external_id: String,
    /// pending, delivered, dead or dropped.
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: i32,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Last failure reason.
    pub last_error: Option<String>,
    /// Connector version that made the last attempt.
    pub connector_version: Option<String>,
    /// When the event was routed to the connector.
    pub created_at: DateTime<Utc>,
    /// When its status or attempts last changed.
    pub updated_at: DateTime<Utc>,
    /// When the connector confirmed it (delivered only).
    pub delivered_at: Option<DateTime<Utc>>,
}

impl From<DeliveryRow> for DeliveryDto {
    fn from(r: DeliveryRow) -> Self {
        let status = DeliveryStatus::parse(&r.status).unwrap_or(DeliveryStatus::Pending);
        DeliveryDto {
            id: r.id,
            event_id: r.event_id,
            event_type: r.event_type,
            connector: r.connector,
            realm: r.realm,
            external_id: r.external_id,
            next_attempt_at: (status == DeliveryStatus::Pending).then(|| time(r.next_attempt_at)),
            status,
            attempts: r.attempts,
            last_error: r.last_error,
            connector_version: r.connector_version,
            created_at: time(r.created_at),
            updated_at: time(r.updated_at),
            delivered_at: r.delivered_at.map(time),
        }
    }
}

/// One hook call for a delivery and how it ended.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptDto {
    /// Number (1-based; restarts after a replay).
    pub attempt: i32,
    /// delivered, retry, fail, timeout, oom or trap.
    pub outcome: String,
    /// Why it failed, as the connector or the sandbox said.
    pub error: Option<String>,
    /// Connector version that served it.
    pub connector_version: Option<String>,
    /// When the hook was called.
    pub started_at: DateTime<Utc>,
    /// When the call ended.
    pub finished_at: DateTime<Utc>,
}

impl From<AttemptRow> for AttemptDto {
    fn from(a: AttemptRow) -> Self {
        AttemptDto {
            attempt: a.attempt,
            outcome: a.outcome,
            error: a.error,
            connector_version: a.connector_version,
            started_at: time(a.started_at),
            finished_at: time(a.finished_at),
        }
    }
}

/// A delivery with its attempts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryDetail {
    #[serde(flatten)]
    pub delivery: DeliveryDto,
    /// Every attempt, oldest first.
    pub history: Vec<AttemptDto>,
}

/// Query parameters of the listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// pending, delivered, dead or dropped.
    pub status: Option<DeliveryStatus>,
    /// Only deliveries to this connector.
    pub connector: Option<String>,
    /// Session external id.
    pub session: Option<String>,
    /// Only deliveries of sessions in this realm.
    pub realm: Option<String>,
    /// Cursor from the previous page.
    #[param(schema_with = super::constraints::cursor)]
    pub cursor: Option<String>,
    /// Page size, 1-500 (default 50).
    #[param(schema_with = super::constraints::page_limit)]
    pub limit: Option<u32>,
}

/// One page of deliveries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    /// Deliveries by id.
    pub items: Vec<DeliveryDto>,
    /// Next page cursor; null on the last page.
    pub next_cursor: Option<String>,
}

/// Body of replay: exactly one of the two fields.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(min_properties = 1, max_properties = 1)]
pub struct ReplayRequest {
    /// Replay every dead or dropped delivery of this connector.
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub connector: Option<String>,
    /// Replay this one delivery.
    #[schema(nullable = false)]
    pub delivery_id: Option<i64>,
}

/// How many deliveries were queued again.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplayResponse {
    /// Dead or dropped deliveries queued again.
    pub replayed: u64,
}

/// Deliveries, filtered and paginated by id.
#[utoipa::path(get, path = "/admin/deliveries", operation_id = "list_deliveries", tag = "deliveries", security(("bearer" = [])),
    params(ListParams),
    responses((status = 200, body = DeliveryPage),
              Invalid, Unauthorized, Forbidden))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<DeliveryPage>, ApiError> {
    caller.0.authorize_global(Permission::ConnectorsManage)?;
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Validation(format!("limit must be 1-{MAX_PAGE}")));
    }
    let after = p.cursor.as_deref().map(cursor::decode).transpose()?;
    let rows = state
        .sessions
        .store()
        .list_deliveries(&DeliveryQuery {
            status: p.status,
            connector: p.connector,
            session: p.session,
            realm: p.realm,
            after,
            limit: limit + 1,
        })
        .await?;
    let (rows, next) = split_page(rows, limit as usize, |r| r.id);
    Ok(Json(DeliveryPage {
        items: rows.into_iter().map(Into::into).collect(),
        next_cursor: next.map(cursor::encode),
    }))
}

/// One delivery with its attempts.
#[utoipa::path(get, path = "/admin/deliveries/{id}", operation_id = "get_delivery", tag = "deliveries", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Delivery id")),
    responses((status = 200, body = DeliveryDetail),
              (status = 400, description = "VALIDATION: the id is not an integer (int64)", body = Problem, content_type = PROBLEM_JSON),
              Unauthorized, Forbidden, NotFound))]
async fn one(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<DeliveryDetail>, ApiError> {
    caller.0.authorize_global(Permission::ConnectorsManage)?;
    let (row, attempts) = find(&state, id).await?;
    Ok(Json(DeliveryDetail {
        delivery: row.into(),
        history: attempts.into_iter().map(Into::into).collect(),
    }))
}

/// Delivery `id` with its attempts, or NOT_FOUND (the API's page and the console's).
pub(crate) async fn find(
    state: &AppState,
    id: i64,
) -> Result<(DeliveryRow, Vec<AttemptRow>), ApiError> {
    state
        .sessions
        .store()
        .get_delivery(id)
        .await?
        .ok_or_else(|| ApiError::refused(ProblemCode::NotFound, format!("delivery {id} not found")))
}

/// Queue dead (or dropped) deliveries again: all of a connector's, or one.
#[utoipa::path(post, path = "/admin/deliveries/replay", operation_id = "replay_deliveries", tag = "deliveries", security(("bearer" = [])),
    request_body = ReplayRequest,
    responses((status = 200, body = ReplayResponse),
              Invalid, Unauthorized, Forbidden, NotFound,
              (status = 409, description = "CONFLICT: only a dead or dropped delivery can be replayed", body = Problem, content_type = PROBLEM_JSON),
              JsonBody))]
async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<ReplayRequest>,
) -> Result<Json<ReplayResponse>, ApiError> {
    caller.0.authorize_global(Permission::ConnectorsManage)?;
    let audit = super::audit::entry(&caller, AuditAction::DeliveryReplay, None);
    let audit = match (&req.connector, req.delivery_id) {
        (Some(name), None) => audit.target(name.clone()),
        (None, Some(id)) => audit.target(id.to_string()),
        _ => audit,
    };
    let replayed = replay_target(&state, req).await;
    let target = super::audit::refused(&state, audit.clone(), replayed).await?;
    let replayed = state.sessions.store().replay(target, Some(audit)).await?;
    Ok(Json(ReplayResponse { replayed }))
}

/// What a replay request names, refusing a delivery that is missing or not dead.
async fn replay_target(state: &AppState, req: ReplayRequest) -> Result<ReplayTarget, ApiError> {
    let target = match (req.connector, req.delivery_id) {
        (Some(name), None) => {
            crate::domain::rules::id("connector", &name)?;
            ReplayTarget::Connector(name)
        }
        (None, Some(id)) => {
            let (row, _) = find(state, id).await?;
            if !matches!(row.status.as_str(), "dead" | "dropped") {
                return Err(ApiError::refused(
                    ProblemCode::Conflict,
                    format!(
                        "delivery {id} is {}; only dead or dropped deliveries can be replayed",
                        row.status
                    ),
                ));
            }
            ReplayTarget::Delivery(id)
        }
        _ => {
            return Err(ApiError::Validation(
                "give exactly one of `connector` or `deliveryId`".into(),
            ));
        }
    };
    Ok(target)
}
