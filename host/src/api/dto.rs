//! Wire shapes of the external-sessions API (camelCase JSON), strict on input
//! (`deny_unknown_fields`), and their conversion from domain types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::constraints;
use crate::domain::{Attributes, EndReason, Session, SessionKind, SessionStatus};

/// A session as returned by the API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionDto {
    /// Id given by the owning system (unique in the realm).
    pub external_id: String,
    /// The realm it belongs to.
    pub realm: String,
    /// PARENT, CHILD or FIXED.
    pub kind: SessionKind,
    /// CHILD only: the parent's external id.
    pub parent_external_id: Option<String>,
    /// Keycloak user-session id (`sid`).
    pub keycloak_session_id: Option<String>,
    /// Keycloak client-session id.
    pub keycloak_client_session_id: Option<String>,
    /// Subject (Keycloak user id).
    pub user_id: Option<String>,
    /// The system that owns the session and ends it (a portal, the IdP system label).
    pub system: Option<String>,
    /// External id of the session this one was delegated by.
    pub delegated_by: Option<String>,
    /// ACTIVE, DESTROYED or ORPHANED.
    pub status: SessionStatus,
    /// Why it ended.
    pub end_reason: Option<EndReason>,
    /// Free-form string metadata given when it was mapped.
    pub attributes: Attributes,
    /// Expiry (RFC 3339).
    pub expires_at: Option<DateTime<Utc>>,
    /// Creation time (RFC 3339).
    pub created_at: DateTime<Utc>,
    /// Last change (RFC 3339).
    pub updated_at: DateTime<Utc>,
}

impl From<Session> for SessionDto {
    fn from(s: Session) -> Self {
        SessionDto {
            external_id: s.external_id,
            realm: s.realm,
            kind: s.kind,
            parent_external_id: s.parent_id,
            keycloak_session_id: s.idp_session_id,
            keycloak_client_session_id: s.idp_client_session_id,
            user_id: s.user_id,
            system: s.system,
            delegated_by: s.delegated_by,
            status: s.status,
            end_reason: s.end_reason,
            attributes: s.attributes,
            expires_at: s.expires_at,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// Body of `map-parent`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MapParentRequest {
    /// Id of the session in the calling system (1–255 characters).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub external_id: String,
    /// The Keycloak user session (`sid`) it belongs to.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub keycloak_session_id: String,
    /// Keycloak client session.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub keycloak_client_session_id: Option<String>,
    /// Subject (Keycloak user id); a CHILD inherits its parent's when absent.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub user_id: Option<String>,
    /// Owning system (default: the caller's system: an API key's `system`, else its id).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub system: Option<String>,
    /// Up to 64 string entries, 8 KiB in all.
    #[serde(default)]
    #[schema(schema_with = constraints::attributes)]
    pub attributes: Attributes,
    /// Expiry (RFC 3339).
    pub expires_at: Option<DateTime<Utc>>,
    /// The system the change comes from; connectors with this name do not receive the
    /// event. Default and only accepted value: the caller's own system (an API key's
    /// `system`, else its id); another name is 403 FORBIDDEN (the bootstrap token may name any).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub origin_system: Option<String>,
}

/// Body of `map-child`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MapChildRequest {
    /// Id of the session in the calling system.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub external_id: String,
    /// The ACTIVE session (same realm) this one hangs under.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub parent_external_id: String,
    /// Keycloak client session.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub keycloak_client_session_id: Option<String>,
    /// Subject (default: the parent's).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub user_id: Option<String>,
    /// Owning system (default: the caller's system: an API key's `system`, else its id).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub system: Option<String>,
    /// Up to 64 string entries, 8 KiB in all.
    #[serde(default)]
    #[schema(schema_with = constraints::attributes)]
    pub attributes: Attributes,
    /// Expiry (RFC 3339).
    pub expires_at: Option<DateTime<Utc>>,
    /// The system the change comes from; connectors with this name do not receive the
    /// event. Default and only accepted value: the caller's own system (an API key's
    /// `system`, else its id); another name is 403 FORBIDDEN (the bootstrap token may name any).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub origin_system: Option<String>,
}

/// Body of `map-fixed`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MapFixedRequest {
    /// Id of the session in the calling system.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub external_id: String,
    /// Optional Keycloak user session.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub keycloak_session_id: Option<String>,
    /// Keycloak client session.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub keycloak_client_session_id: Option<String>,
    /// Subject (Keycloak user id); a CHILD inherits its parent's when absent.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub user_id: Option<String>,
    /// Owning system (default: the caller's system: an API key's `system`, else its id).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub system: Option<String>,
    /// Up to 64 string entries, 8 KiB in all.
    #[serde(default)]
    #[schema(schema_with = constraints::attributes)]
    pub attributes: Attributes,
    /// Expiry (RFC 3339).
    pub expires_at: Option<DateTime<Utc>>,
    /// The system the change comes from; connectors with this name do not receive the
    /// event. Default and only accepted value: the caller's own system (an API key's
    /// `system`, else its id); another name is 403 FORBIDDEN (the bootstrap token may name any).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub origin_system: Option<String>,
}

/// Body of `destroy-parent` and `destroy-child`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestroyRequest {
    /// The session to end.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub external_id: String,
    /// logout (default), admin, idp_logout, expired or revoked.
    #[schema(schema_with = constraints::caller_reason)]
    pub reason: Option<EndReason>,
    /// The system the change comes from; connectors with this name do not receive the
    /// events. Default and only accepted value: the caller's own system (an API key's
    /// `system`, else its id); another name is 403 FORBIDDEN (the bootstrap token may name any).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub origin_system: Option<String>,
}

/// Body of `destroy-user`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestroyUserRequest {
    /// Every live session of this subject in the realm ends.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub user_id: String,
    /// logout (default), admin, idp_logout, expired or revoked.
    #[schema(schema_with = constraints::caller_reason)]
    pub reason: Option<EndReason>,
    /// The system the change comes from; connectors with this name do not receive the
    /// events. Default and only accepted value: the caller's own system (an API key's
    /// `system`, else its id); another name is 403 FORBIDDEN (the bootstrap token may name any).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub origin_system: Option<String>,
}

/// Result of every destroy: each session whose state changed (empty when nothing did).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DestroyResponse {
    /// Changed sessions in creation order.
    pub changed: Vec<SessionDto>,
}

/// Where one event of a session stands with one connector.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionDeliveryDto {
    /// Delivery id (see `/admin/deliveries/{id}`).
    pub id: i64,
    /// The connector the event goes to.
    pub connector: String,
    /// login, logout or revoke.
    pub event_type: String,
    /// pending, delivered, dead or dropped.
    pub status: crate::store::deliveries::DeliveryStatus,
    /// Attempts made so far.
    pub attempts: i32,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
}

/// A session in a tree.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TreeEntryDto {
    /// Distance from the root (0 for the root).
    pub depth: u32,
    #[serde(flatten)]
    pub session: SessionDto,
    /// Delivery state of its events per connector, oldest first.
    pub deliveries: Vec<SessionDeliveryDto>,
}

/// The whole tree containing the requested session, depth-first from its root: each session
/// is followed by its descendants (use `depth` and `parentExternalId` to nest them).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TreeResponse {
    /// External id of the root.
    pub root_external_id: String,
    /// Number of sessions in the tree.
    pub size: usize,
    /// The sessions, root first.
    pub sessions: Vec<TreeEntryDto>,
}

/// Query parameters of the listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct ListParams {
    /// Sessions of this Keycloak user session.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub keycloak_session_id: Option<String>,
    /// Sessions of this Keycloak client session.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub keycloak_client_session_id: Option<String>,
    /// Sessions of this subject.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub user_id: Option<String>,
    /// ACTIVE, DESTROYED or ORPHANED.
    pub status: Option<SessionStatus>,
    /// Only sessions this system owns.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub system: Option<String>,
    /// Opaque cursor from a previous page's `nextCursor`.
    #[param(schema_with = constraints::cursor)]
    pub cursor: Option<String>,
    /// Page size, 1–500 (default 50).
    #[param(schema_with = constraints::page_limit)]
    pub limit: Option<u32>,
}

/// One page of sessions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse {
    /// Sessions in creation order.
    pub items: Vec<SessionDto>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Liveness answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` or the reason it is not.
    pub status: String,
}

/// Readiness answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadyResponse {
    /// `ok` or the reason it is not.
    pub status: String,
    /// Whether every configured connector (directory manifest or upload) serves a version.
    /// A connector that failed to load does not make the instance unready: the others and
    /// the API serve; this field and `failedConnectors` say that one does not.
    pub connectors_serving: bool,
    /// The configured connectors that failed to load (`GET /admin/connectors` says why).
    pub failed_connectors: Vec<String>,
}
