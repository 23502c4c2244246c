//! The sync event the runtime tests and the hook benchmarks hand to connectors: alice's
//! parent session in realm acme, from the portal, with one attribute.
#![allow(dead_code)]

use lockstep::domain::{EventType, SessionKind, SyncEvent};

/// alice's portal session `external_id`, as event `event_id` of type `event_type`.
pub fn portal_event(
    event_type: EventType,
    event_id: impl Into<String>,
    external_id: impl Into<String>,
) -> SyncEvent {
    SyncEvent {
        event_id: event_id.into(),
        event_type,
        realm: "acme".into(),
        external_id: external_id.into(),
        kind: SessionKind::Parent,
        idp_session_id: Some("kc-user-123".into()),
        idp_client_session_id: None,
        user_id: Some("alice".into()),
        system: Some("portal".into()),
        origin_system: Some("portal".into()),
        end_reason: None,
        attributes: [("ip".to_owned(), "10.1.2.3".to_owned())].into(),
        expires_at: None,
        occurred_at: chrono::Utc::now(),
    }
}
