//! The {{name}} connector: tells a legacy system about Lockstep session events.
//!
//! Each hook gets the event and answers `Ok(())`, `Err(HookError::Retry(..))` (trying again
//! can help: the peer is down, timed out or answered 5xx) or `Err(HookError::Fail(..))` (it
//! cannot: bad configuration, 4xx). Hooks you do not write do nothing.

use lockstep_connector::{Connector, HookError, SessionEvent, config, http, log};

struct Legacy;

impl Connector for Legacy {
    fn on_login(event: SessionEvent) -> Result<(), HookError> {
        let base = config::require("base_url")?;
        let body = serde_json::json!({
            "sessionId": event.external_id,
            "userId": event.user_id,
            "realm": event.realm,
            "idpSessionId": event.idp_session_id,
        });
        let response = http::Request::post(&format!("{base}/sessions"))
            .header("authorization", &config::require("authorization")?)
            .json(body.to_string().into_bytes())
            .send()?;
        match response.status {
            200..=299 | 409 => {
                log::info(&format!("created legacy session {}", event.external_id));
                Ok(())
            }
            _ => Err(response.into_hook_error()),
        }
    }

    fn on_logout(event: SessionEvent) -> Result<(), HookError> {
        let base = config::require("base_url")?;
        let url = format!("{base}/sessions/{}", http::percent_encode(&event.external_id));
        let response = http::Request::delete(&url)
            .header("authorization", &config::require("authorization")?)
            .send()?;
        match response.status {
            200..=299 | 404 => {
                log::info(&format!("ended legacy session {}", event.external_id));
                Ok(())
            }
            _ => Err(response.into_hook_error()),
        }
    }
}

lockstep_connector::export_connector!(Legacy);
