//! `GET /admin/audit`: the audit log, newest first, cursor-paginated; and the helpers the
//! other handlers use to name an audited action and to record a refusal. Needs `audit:read`
//! in the realm asked for, or in every realm to see every realm and the records without one
//! (connector and delivery actions).

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
use super::extract::{ApiQuery, Caller};
use super::spec::Unauthorized;
use crate::auth::Permission;
use crate::domain::rules;
use crate::domain::{AuditAction, AuditEntry, AuditOutcome};
use crate::store::audit::{AuditQuery, AuditRow, AuditScope};
use crate::store::split_page;
use crate::sync::sessions::{DEFAULT_PAGE, MAX_PAGE};

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// The record of `action` by the caller in `realm` (`None`: an action across realms).
pub(super) fn entry(caller: &Caller, action: AuditAction, realm: Option<&str>) -> AuditEntry {
    AuditEntry::new(caller.0.actor(), action, realm)
}

/// Passes `result` on; a refusal (404, 409, 400/422 for a refused connector) is first
/// recorded. The refused change wrote nothing, so this is a separate, best-effort write: a
/// failure is logged and the caller still gets the refusal.
pub(crate) async fn refused<T>(
    state: &AppState,
    entry: AuditEntry,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    if let Err(e) = &result
        && let Some(code) = e.refusal_code()
    {
        let action = entry.action.to_string();
        if let Err(w) = state
            .sessions
            .store()
            .record_audit(entry, AuditOutcome::Refused(code))
            .await
        {
            tracing::warn!(error = %w, %action, code = code.as_str(), "audit record of a refusal not written");
        }
    }
    result
}

/// Query parameters of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only this realm's records (needs `audit:read` there). Without it: every record,
    /// including those without a realm (needs `audit:read` in every realm).
    #[param(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    pub realm: Option<String>,
    /// Only this actor: `admin`, `key:<id>`, `token:<sub>@<realm>`, `idp:<system>`,
    /// `lockstep:expiry`.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub actor: Option<String>,
    /// Only this action, e.g. `map-parent` or `idp-event:LOGOUT`.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub action: Option<String>,
    /// Only records at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Cursor from the previous page (older records).
    #[param(schema_with = super::constraints::cursor)]
    pub cursor: Option<String>,
    /// Page size, 1-500 (default 50).
    #[param(schema_with = super::constraints::page_limit)]
    pub limit: Option<u32>,
}

/// One audit record.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecordDto {
    /// Record id (increasing).
    pub id: i64,
    /// When the action was done or refused.
    pub at: DateTime<Utc>,
    /// Realm acted in; null for actions across realms (connectors, deliveries).
    pub realm: Option<String>,
    /// Who: `admin`, `key:<id>`, `token:<sub>@<realm>`, `idp:<system>` (back-channel logout,
    /// Keycloak events) or `lockstep:expiry` (the expiry sweeper).
    pub actor: String,
    /// What: map-parent, map-child, map-fixed, destroy-parent, destroy-child, destroy-user,
    /// backchannel-logout, idp-event:<TYPE>, ssf:<event>, expire, connector-put, connector-delete,
    /// connector-enable, connector-disable, delivery-replay, ssf-stream-create,
    /// ssf-stream-update, ssf-stream-delete.
    pub action: String,
    /// To what: external id, user id, IdP session id, connector name or delivery id.
    pub target: Option<String>,
    /// `ok`, or the refusal's problem code (ALREADY_EXISTS, NOT_FOUND, PARENT_NOT_ACTIVE...).
    pub result: String,
    /// With `ok`: how many sessions (deliveries, connectors) changed.
    pub changed: Option<i64>,
    /// More about the action (reason, event id, logout token id...).
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
}

impl From<AuditRow> for AuditRecordDto {
    fn from(r: AuditRow) -> Self {
        AuditRecordDto {
            id: r.id,
            at: Utc
                .timestamp_millis_opt(r.at_ms)
                .single()
                .unwrap_or_default(),
            realm: r.realm,
            actor: r.actor,
            action: r.action,
            target: r.target,
            result: r.result,
            changed: r.changed,
            // Written by us as JSON; anything else is shown as a string rather than lost.
            detail: r
                .detail
                .map(|d| serde_json::from_str(&d).unwrap_or(serde_json::Value::String(d))),
        }
    }
}

/// One page of audit records.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// Newest first.
    pub items: Vec<AuditRecordDto>,
    /// Cursor of the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The audit log: every session operation and admin action, newest first.
#[utoipa::path(get, path = "/admin/audit", operation_id = "list_audit", tag = "audit", security(("bearer" = [])),
    params(AuditParams),
    responses((status = 200, description = "One page, newest first", body = AuditPage),
              (status = 400, description = "VALIDATION: bad realm, filter, time, cursor or limit", body = Problem, content_type = PROBLEM_JSON),
              Unauthorized,
              (status = 403, description = "FORBIDDEN: no audit:read in that realm (or, without realm, in every realm)", body = Problem, content_type = PROBLEM_JSON)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<AuditParams>,
) -> Result<Json<AuditPage>, ApiError> {
    // Authorised before any input is examined, so a caller without the permission learns
    // nothing from the answers.
    let scope = match p.realm {
        Some(realm) => {
            caller.0.authorize(&realm, Permission::AuditRead)?;
            rules::realm(&realm)?;
            AuditScope::Realm(realm)
        }
        None => {
            caller.0.authorize_global(Permission::AuditRead)?;
            AuditScope::All
        }
    };
    rules::optional_id("actor", p.actor.as_deref())?;
    rules::optional_id("action", p.action.as_deref())?;
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Validation(format!("limit must be 1-{MAX_PAGE}")));
    }
    let before = p.cursor.as_deref().map(cursor::decode).transpose()?;
    let rows = state
        .sessions
        .store()
        .list_audit(&AuditQuery {
            scope,
            actor: p.actor,
            action: p.action,
            since_ms: p.since.map(|t| t.timestamp_millis()),
            before,
            limit: i64::from(limit) + 1,
        })
        .await?;
    let (rows, next) = split_page(rows, limit as usize, |r| r.id);
    let next_cursor = next.map(cursor::encode);
    Ok(Json(AuditPage {
        items: rows.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}
