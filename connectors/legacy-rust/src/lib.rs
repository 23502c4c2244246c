//! Example connector: mirrors Lockstep sessions into a legacy IAM system's session table
//! (`tests/legacy-sim`), behind its REST API and HTTP Basic auth. The JavaScript and Python
//! examples (`connectors/legacy-js`, `connectors/legacy-python`) do exactly the same.
//!
//! - login: `POST /api/v1/sessions`; 201, or 409 (already there: delivery is at least once).
//! - logout: `DELETE /api/v1/sessions/{externalId}`; 204, or 404 (already gone).
//! - revoke: `DELETE /api/v1/users/{userId}/sessions`.
//!
//! Network failures, timeouts, 5xx, 408 and 429 ask for a retry; any other status fails.
//! Config: `base_url`, `username`, `password` (required), `timeout_ms` (default 5000).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lockstep_connector::{Connector, HookError, SessionEvent, config, http, log};

struct LegacySessions;

impl Connector for LegacySessions {
    fn on_login(event: SessionEvent) -> Result<(), HookError> {
        let body = serde_json::json!({
            "sessionId": event.external_id,
            "userId": event.user_id,
            "realm": event.realm,
            "idpSessionId": event.idp_session_id,
        });
        let response = request(http::Request::post(&url("/api/v1/sessions")?))?
            .json(body.to_string().into_bytes())
            .send()?;
        match response.status {
            201 | 409 => {
                log::info(&format!("created legacy session {}", event.external_id));
                Ok(())
            }
            _ => Err(response.into_hook_error()),
        }
    }

    fn on_logout(event: SessionEvent) -> Result<(), HookError> {
        let path = format!(
            "/api/v1/sessions/{}",
            http::percent_encode(&event.external_id)
        );
        let response = request(http::Request::delete(&url(&path)?))?.send()?;
        match response.status {
            204 | 404 => {
                log::info(&format!("deleted legacy session {}", event.external_id));
                Ok(())
            }
            _ => Err(response.into_hook_error()),
        }
    }

    fn revoke(event: SessionEvent) -> Result<(), HookError> {
        let Some(user) = event.user_id.as_deref() else {
            return Ok(()); // no user, nothing the legacy system can revoke
        };
        let path = format!("/api/v1/users/{}/sessions", http::percent_encode(user));
        let response = request(http::Request::delete(&url(&path)?))?.send()?;
        match response.status {
            200..=299 => {
                log::info(&format!("revoked the legacy sessions of {user}"));
                Ok(())
            }
            _ => Err(response.into_hook_error()),
        }
    }
}

lockstep_connector::export_connector!(LegacySessions);

fn url(path: &str) -> Result<String, HookError> {
    Ok(format!(
        "{}{path}",
        config::require("base_url")?.trim_end_matches('/')
    ))
}

/// Adds the legacy system's Basic auth and the timeout to `request`.
fn request(request: http::Request) -> Result<http::Request, HookError> {
    let credentials = format!(
        "{}:{}",
        config::require("username")?,
        config::require("password")?
    );
    let timeout = Duration::from_millis(config::get_u64("timeout_ms", 5000)?);
    Ok(request
        .header(
            "authorization",
            &format!("Basic {}", STANDARD.encode(credentials)),
        )
        .timeout(timeout))
}
