//! Termination receipts: `GET /admin/realms/{realm}/external-sessions/{externalId}/receipt`
//! (one session) and `GET /admin/realms/{realm}/receipts?userId=` (every session of a user),
//! for an auditor who must show that a logout reached every connector. Readable with
//! `users:manage` or `audit:read` in the realm. The rules live in `sync::receipts`.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::cursor;
use super::error::{ApiError, PROBLEM_JSON, Problem};
use super::extract::{ApiPath, ApiQuery, Caller};
use super::spec::{ExternalId, Invalid, NotFound, Realm, Unauthorized};
use crate::auth::Permission;
use crate::domain::ProblemCode;
use crate::domain::rules;
use crate::domain::{EndReason, EventType, SessionKind, SessionStatus};
use crate::sync::receipts::{
    self, Confirmation, ConnectorReceipt, LogoutReceipt, SessionReceipt, Tally, UserReceipts,
    UserTally,
};

/// Routes of this resource. The per-user receipt is not under `external-sessions/`, where
/// any segment after the base is a session's external id.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(session_receipt))
        .routes(routes!(user_receipts))
}

/// Where one connector stands with a logout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConfirmationDto {
    /// Confirmed by the connector.
    Delivered,
    /// Routed, not attempted yet.
    Pending,
    /// Attempted and failed; due again at `nextAttemptAt`.
    Retrying,
    /// Gave up (dead letter); `POST /admin/deliveries/replay` can still deliver it.
    Dead,
    /// Failed under the `log` policy and dropped; replay can still deliver it.
    Dropped,
}

impl From<Confirmation> for ConfirmationDto {
    fn from(c: Confirmation) -> Self {
        match c {
            Confirmation::Delivered => ConfirmationDto::Delivered,
            Confirmation::Pending => ConfirmationDto::Pending,
            Confirmation::Retrying => ConfirmationDto::Retrying,
            Confirmation::Dead => ConfirmationDto::Dead,
            Confirmation::Dropped => ConfirmationDto::Dropped,
        }
    }
}

/// One connector's part in a logout.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorReceiptDto {
    /// Connector name.
    pub connector: String,
    /// delivered (confirmed), pending, retrying, dead or dropped.
    pub status: ConfirmationDto,
    /// Delivery id (`/admin/deliveries/{id}`, replay by `deliveryId`).
    pub delivery_id: i64,
    /// Attempts made (restarts at 0 after a replay).
    pub attempts: i32,
    /// When the connector confirmed (delivered only).
    pub confirmed_at: Option<DateTime<Utc>>,
    /// Version of the connector that confirmed (delivered), else of the last attempt.
    pub connector_version: Option<String>,
    /// When the next attempt is due (pending and retrying only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed (retrying, dead, dropped).
    pub last_error: Option<String>,
}

impl From<ConnectorReceipt> for ConnectorReceiptDto {
    fn from(c: ConnectorReceipt) -> Self {
        ConnectorReceiptDto {
            connector: c.connector,
            status: c.state.into(),
            delivery_id: c.delivery_id,
            attempts: c.attempts,
            confirmed_at: c.confirmed_at,
            connector_version: c.connector_version,
            next_attempt_at: c.next_attempt_at,
            last_error: c.last_error,
        }
    }
}

/// A `logout` event of the session and every connector it was routed to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogoutEventDto {
    /// Stable event id (what the connectors received).
    pub event_id: String,
    /// When the session ended.
    pub occurred_at: DateTime<Utc>,
    /// The system the logout came from. A connector of that name was not sent its own
    /// logout back (no echo) and is not expected to confirm it.
    pub origin_system: Option<String>,
    /// Whether the event has been routed to connectors yet (shortly after the logout).
    pub routed: bool,
    /// Every connector subscribed to it when it was routed, by delivery id.
    pub connectors: Vec<ConnectorReceiptDto>,
    /// Connectors subscribed to it (as loaded on this instance now) that were not sent it
    /// because they are its origin: the system that ended the session itself.
    pub skipped: Vec<SkippedConnectorDto>,
}

/// A subscribed connector a logout was not sent to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedConnectorDto {
    /// Connector name.
    pub connector: String,
    /// Why: `origin` (the logout came from this system; no echo).
    pub reason: SkipReasonDto,
}

/// Why a subscribed connector was not sent a logout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SkipReasonDto {
    /// The logout's `originSystem` names it.
    Origin,
}

impl From<LogoutReceipt> for LogoutEventDto {
    fn from(l: LogoutReceipt) -> Self {
        LogoutEventDto {
            event_id: l.event_id,
            occurred_at: l.occurred_at,
            origin_system: l.origin_system,
            routed: l.routed,
            connectors: l.connectors.into_iter().map(Into::into).collect(),
            skipped: l
                .skipped
                .into_iter()
                .map(|connector| SkippedConnectorDto {
                    connector,
                    reason: SkipReasonDto::Origin,
                })
                .collect(),
        }
    }
}

/// Counts of connector states.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TallyDto {
    /// Connector deliveries counted.
    pub connectors: u64,
    /// Confirmed by their connector.
    pub delivered: u64,
    /// Not attempted yet.
    pub pending: u64,
    /// Failed, due again.
    pub retrying: u64,
    /// Dead letters: attempts used up, waiting for a replay.
    pub dead: u64,
    /// Dropped (log policy).
    pub dropped: u64,
}

impl From<Tally> for TallyDto {
    fn from(t: Tally) -> Self {
        TallyDto {
            connectors: t.connectors,
            delivered: t.delivered,
            pending: t.pending,
            retrying: t.retrying,
            dead: t.dead,
            dropped: t.dropped,
        }
    }
}

/// The termination receipt of one session.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionReceiptDto {
    /// The realm of the session.
    pub realm: String,
    /// The session's external id.
    pub external_id: String,
    /// PARENT, CHILD or FIXED.
    pub kind: SessionKind,
    /// CHILD only: its parent.
    pub parent_external_id: Option<String>,
    /// Keycloak user-session id.
    pub keycloak_session_id: Option<String>,
    /// Subject (Keycloak user id).
    pub user_id: Option<String>,
    /// The system that owns the session.
    pub system: Option<String>,
    /// ACTIVE, DESTROYED or ORPHANED.
    pub status: SessionStatus,
    /// Why it ended.
    pub end_reason: Option<EndReason>,
    /// Whether it has ended (DESTROYED). ORPHANED has not: its owner has yet to end it.
    pub ended: bool,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// Ended, its logout routed, and confirmed by every connector it was routed to.
    pub complete: bool,
    /// Its `logout` events (one per ended session), oldest first.
    pub logouts: Vec<LogoutEventDto>,
    /// Counts over every connector of its logouts.
    pub summary: TallyDto,
}

impl From<SessionReceipt> for SessionReceiptDto {
    fn from(r: SessionReceipt) -> Self {
        let s = r.session;
        SessionReceiptDto {
            realm: s.realm,
            external_id: s.external_id,
            kind: s.kind,
            parent_external_id: s.parent_id,
            keycloak_session_id: s.idp_session_id,
            user_id: s.user_id,
            system: s.system,
            status: s.status,
            end_reason: s.end_reason,
            ended: r.ended,
            ended_at: r.ended_at,
            complete: r.complete,
            logouts: r.logouts.into_iter().map(Into::into).collect(),
            summary: r.summary.into(),
        }
    }
}

/// A session's receipt as an export: the receipt and when it was read.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionReceiptResponse {
    /// When this receipt was read.
    pub generated_at: DateTime<Utc>,
    #[serde(flatten)]
    pub receipt: SessionReceiptDto,
}

/// Counts over every session of the user in the realm.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserTallyDto {
    /// Sessions of the user.
    pub sessions: u64,
    /// Of which ended (DESTROYED).
    pub ended: u64,
    /// Of which ACTIVE.
    pub active: u64,
    /// Of which ORPHANED.
    pub orphaned: u64,
    /// Logout events not yet routed to connectors.
    pub unrouted: u64,
    /// Connector states over every logout of the user's sessions.
    pub deliveries: TallyDto,
}

impl From<UserTally> for UserTallyDto {
    fn from(t: UserTally) -> Self {
        UserTallyDto {
            sessions: t.sessions,
            ended: t.ended,
            active: t.active,
            orphaned: t.orphaned,
            unrouted: t.unrouted,
            deliveries: t.deliveries.into(),
        }
    }
}

/// The receipts of a user's sessions: one page of them, with totals and `complete` over all.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserReceiptsResponse {
    /// When this was read.
    pub generated_at: DateTime<Utc>,
    /// The realm asked about.
    pub realm: String,
    /// The user asked about (Keycloak user id).
    pub user_id: String,
    /// The user has sessions, every one has ended, and every connector confirmed every
    /// logout — over all of the user's sessions, not only this page.
    pub complete: bool,
    /// Counts over all of the user's sessions.
    pub totals: UserTallyDto,
    /// Receipts of this page's sessions, in creation order.
    pub items: Vec<SessionReceiptDto>,
    /// Next page; null on the last.
    pub next_cursor: Option<String>,
}

impl UserReceiptsResponse {
    fn new(realm: String, r: UserReceipts) -> Self {
        UserReceiptsResponse {
            generated_at: Utc::now(),
            realm,
            user_id: r.user_id,
            complete: r.complete,
            totals: r.totals.into(),
            items: r.sessions.into_iter().map(Into::into).collect(),
            next_cursor: r.next_after.map(cursor::encode),
        }
    }
}

/// Query parameters of a user's receipts.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UserReceiptParams {
    /// The user (subject) whose sessions to show.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub user_id: String,
    /// Cursor from the previous page.
    #[param(schema_with = super::constraints::cursor)]
    pub cursor: Option<String>,
    /// Sessions per page, 1-500 (default 500).
    #[param(schema_with = super::constraints::receipts_page_limit)]
    pub limit: Option<u32>,
}

/// The loaded connectors that take the realm's logouts whatever their origin (what the
/// fan-out routes to, before it leaves out the origin's own connector).
pub(crate) fn logout_subscribers(state: &AppState, realm: &str) -> Vec<String> {
    state
        .connectors
        .registry()
        .snapshot()
        .values()
        .map(|e| &e.connector)
        .filter(|c| {
            c.world.has_hook(EventType::Logout)
                && c.manifest.subscribes(realm, EventType::Logout, None)
        })
        .map(|c| c.manifest.name.clone())
        .collect()
}

/// `users:manage` or `audit:read` in the realm (403 before any input is examined), then the
/// realm name.
fn authorize(caller: &Caller, realm: &str) -> Result<(), ApiError> {
    let p = &caller.0;
    if p.authorize(realm, Permission::UsersManage).is_err()
        && p.authorize(realm, Permission::AuditRead).is_err()
    {
        return Err(ApiError::Forbidden(format!(
            "{} may not read receipts in realm {realm:?} (needs users:manage or audit:read)",
            p.name()
        )));
    }
    rules::realm(realm)?;
    Ok(())
}

/// The termination receipt of one session: its logout and, per connector it was routed to,
/// whether and when that connector confirmed it. 200 for an ACTIVE session too
/// (`ended: false`).
#[utoipa::path(get, path = "/admin/realms/{realm}/external-sessions/{externalId}/receipt",
    tag = "receipts", security(("bearer" = [])),
    params(Realm,
           ExternalId),
    responses(
        (status = 200, description = "The receipt", body = SessionReceiptResponse),
        Invalid, Unauthorized,
        (status = 403, description = "FORBIDDEN: neither users:manage nor audit:read in this realm", body = Problem, content_type = PROBLEM_JSON),
        NotFound,
    ))]
async fn session_receipt(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((realm, external_id)): ApiPath<(String, String)>,
) -> Result<Json<SessionReceiptResponse>, ApiError> {
    authorize(&caller, &realm)?;
    let subscribers = logout_subscribers(&state, &realm);
    let receipt =
        receipts::session_receipt(state.sessions.store(), &realm, &external_id, &subscribers)
            .await?
            .ok_or_else(|| {
                ApiError::refused(
                    ProblemCode::NotFound,
                    format!("session {external_id:?} not found in this realm"),
                )
            })?;
    Ok(Json(SessionReceiptResponse {
        generated_at: Utc::now(),
        receipt: receipt.into(),
    }))
}

/// The receipts of every session of a user (ended or not), in creation order and pages of
/// up to 500, with `complete` and totals over all of them.
#[utoipa::path(get, path = "/admin/realms/{realm}/receipts",
    tag = "receipts", security(("bearer" = [])),
    params(Realm, UserReceiptParams),
    responses(
        (status = 200, description = "One page of receipts", body = UserReceiptsResponse),
        Invalid, Unauthorized,
        (status = 403, description = "FORBIDDEN: neither users:manage nor audit:read in this realm", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn user_receipts(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(realm): ApiPath<String>,
    ApiQuery(params): ApiQuery<UserReceiptParams>,
) -> Result<Json<UserReceiptsResponse>, ApiError> {
    authorize(&caller, &realm)?;
    let after = params.cursor.as_deref().map(cursor::decode).transpose()?;
    let page = receipts::user_receipts(
        state.sessions.store(),
        &realm,
        &params.user_id,
        after,
        params.limit,
        &logout_subscribers(&state, &realm),
    )
    .await?;
    Ok(Json(UserReceiptsResponse::new(realm, page)))
}
