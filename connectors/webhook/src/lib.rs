//! The generic HTTP connector: POSTs every session event as JSON to `config.url` (the
//! `lockstep_connector::json` shape; refresh events carry the new `expiresAt`).
//!
//! Config (`[config]` in the manifest):
//! - `url` (required): where to POST.
//! - `secret` (optional): signs each request per the Standard Webhooks spec
//!   (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`); a
//!   `whsec_`-prefixed secret is base64-decoded, any other is used as raw bytes.
//! - `authorization` (optional): sent as the `Authorization` header (legacy endpoints with
//!   their own auth).
//! - `timeout_ms` (optional, default 5000): connect and first-byte timeout.
//! - `format` (optional, default `json`): `json` posts the event as JSON; `set` posts it as a
//!   Security Event Token signed by Lockstep (RFC 8417, pushed as RFC 8935 describes:
//!   `content-type: application/secevent+jwt`, the compact JWS as the body), which the
//!   receiver verifies with Lockstep's public JWKS. The HMAC of `secret` still applies, to
//!   the token. Signing needs Lockstep's `[ssf_transmitter]` with a `public_url`, and the
//!   audience in the manifest's `signing_audiences`; without either every event fails with
//!   the reason.
//! - `set_audience` (optional, default `url`): the token's `aud`, for `format = "set"`.
//!
//! 2xx is success; 5xx, 408, 429 and network failures ask for a retry; other statuses and a
//! destination outside `allowed_hosts` fail permanently.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use lockstep_connector::{Connector, HookError, SessionEvent, config, http, json, log, signing};
use sha2::Sha256;

struct Webhook;

impl Connector for Webhook {
    fn on_login(event: SessionEvent) -> Result<(), HookError> {
        deliver(&event)
    }

    fn on_logout(event: SessionEvent) -> Result<(), HookError> {
        deliver(&event)
    }

    fn revoke(event: SessionEvent) -> Result<(), HookError> {
        deliver(&event)
    }

    fn on_refresh(event: SessionEvent) -> Result<(), HookError> {
        deliver(&event)
    }
}

lockstep_connector::export_connector!(Webhook);

/// What the body of a delivery is.
enum Format {
    /// The event as JSON.
    Json,
    /// The event as a SET signed by Lockstep, for this audience.
    Set { audience: String },
}

impl Format {
    fn from_config(url: &str) -> Result<Self, HookError> {
        match config::get("format").as_deref() {
            None | Some("json") => Ok(Format::Json),
            Some("set") => Ok(Format::Set {
                audience: config::get("set_audience").unwrap_or_else(|| url.to_owned()),
            }),
            Some(other) => Err(HookError::Fail(format!(
                "config `format` is {other:?}; expected \"json\" or \"set\""
            ))),
        }
    }
}

fn deliver(event: &SessionEvent) -> Result<(), HookError> {
    let url = config::require("url")?;
    let timeout = Duration::from_millis(config::get_u64("timeout_ms", 5000)?);
    let mut request = http::Request::post(&url).timeout(timeout);
    let body = match Format::from_config(&url)? {
        Format::Json => {
            let body = json::event_bytes(event);
            request = request.header("content-type", "application/json");
            body
        }
        Format::Set { audience } => {
            let token = signing::sign_event(&audience)?;
            // RFC 8935: a receiver that refuses the token explains why in JSON.
            request = request
                .header("content-type", signing::CONTENT_TYPE)
                .header("accept", "application/json");
            token.into_bytes()
        }
    };
    if let Some(secret) = config::get("secret") {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string();
        let signature = sign(&secret, &event.event_id, &timestamp, &body)?;
        request = request
            .header("webhook-id", &event.event_id)
            .header("webhook-timestamp", &timestamp)
            .header("webhook-signature", &signature);
    }
    if let Some(auth) = config::get("authorization") {
        request = request.header("authorization", &auth);
    }
    let response = request.body(body).send()?;
    if (200..300).contains(&response.status) {
        Ok(())
    } else {
        let err = response.into_hook_error();
        log::warn(&format!("{url} refused event {}: {err:?}", event.event_id));
        Err(err)
    }
}

/// Standard Webhooks: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
fn sign(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> Result<String, HookError> {
    let key = match secret.strip_prefix("whsec_") {
        Some(encoded) => STANDARD
            .decode(encoded)
            .map_err(|e| HookError::Fail(format!("config `secret` is not valid base64: {e}")))?,
        None => secret.as_bytes().to_vec(),
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|e| HookError::Fail(format!("config `secret` is unusable: {e}")))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}
