//! The JSON form of a [`SessionEvent`], the same shape Lockstep stores in its outbox.

use crate::SessionEvent;

/// The event as a JSON object with camelCase keys.
pub fn event(event: &SessionEvent) -> serde_json::Value {
    let attributes: serde_json::Map<String, serde_json::Value> = event
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "eventId": event.event_id,
        "type": event.event_type.as_str(),
        "realm": event.realm,
        "externalId": event.external_id,
        "kind": event.kind.as_str(),
        "idpSessionId": event.idp_session_id,
        "idpClientSessionId": event.idp_client_session_id,
        "userId": event.user_id,
        "system": event.system,
        "originSystem": event.origin_system,
        "endReason": event.end_reason,
        "attributes": attributes,
        "occurredAt": event.occurred_at,
        "expiresAt": event.expires_at,
    })
}

/// [`event`] serialised to bytes.
pub fn event_bytes(e: &SessionEvent) -> Vec<u8> {
    // Serialising a `Value` cannot fail.
    serde_json::to_vec(&event(e)).unwrap_or_default()
}
