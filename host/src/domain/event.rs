//! Sync events: what the outbox holds and connectors receive.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::session::{Attributes, EndReason, Session, SessionKind};

string_enum! {
    /// Kinds of sync events written to the outbox.
    EventType {
        /// A session began.
        Login => "login",
        /// A session ended.
        Logout => "logout",
        /// A user's grants were revoked.
        Revoke => "revoke",
        /// A session's lifetime was extended.
        Refresh => "refresh",
    }
}

/// A sync event as written to the outbox and later handed to connectors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyncEvent {
    /// Stable id for de-duplication by connectors.
    pub event_id: String,
    /// login, logout, revoke, refresh.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// The realm (tenant) it belongs to.
    pub realm: String,
    /// The session concerned.
    pub external_id: String,
    /// Its kind.
    pub kind: SessionKind,
    /// IdP user-session id.
    pub idp_session_id: Option<String>,
    /// IdP client-session id.
    pub idp_client_session_id: Option<String>,
    /// The user (`sub` of the IdP), when known.
    pub user_id: Option<String>,
    /// The system that owns it and ends it (a portal, the IdP system label).
    pub system: Option<String>,
    /// Where the change came from.
    pub origin_system: Option<String>,
    /// Why the session ended (logout events).
    pub end_reason: Option<EndReason>,
    /// Session metadata.
    pub attributes: Attributes,
    /// When the session expires, if known (refresh events carry the new value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When the change happened.
    pub occurred_at: DateTime<Utc>,
}

impl SyncEvent {
    /// The event describing `session` after a change of type `event_type`.
    pub fn for_session(
        event_type: EventType,
        session: &Session,
        origin_system: Option<&str>,
        occurred_at: DateTime<Utc>,
    ) -> Self {
        SyncEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            event_type,
            realm: session.realm.clone(),
            external_id: session.external_id.clone(),
            kind: session.kind,
            idp_session_id: session.idp_session_id.clone(),
            idp_client_session_id: session.idp_client_session_id.clone(),
            user_id: session.user_id.clone(),
            system: session.system.clone(),
            origin_system: origin_system.map(str::to_owned),
            end_reason: session.end_reason,
            attributes: session.attributes.clone(),
            expires_at: session.expires_at,
            occurred_at,
        }
    }
}
