//! Signed events: the event of the current hook call as a Security Event Token (RFC 8417),
//! signed by Lockstep with its Shared Signals transmitter key.
//!
//! The private key never enters the component, and the component does not choose what is
//! signed: the host builds the token from the event being delivered (a CAEP
//! `session-established` for a login, `session-revoked` for a logout, and Lockstep's own
//! event types for a revoke or a refresh) and signs it. The connector chooses only the
//! audience, the `aud` claim: usually the receiver's URL or client id. Receivers verify the
//! token with Lockstep's public JWKS, the `jwks_uri` of its transmitter metadata
//! (`/.well-known/ssf-configuration`).
//!
//! ```no_run
//! use lockstep_connector::{HookError, SessionEvent, http, signing};
//!
//! fn deliver(event: &SessionEvent) -> Result<(), HookError> {
//!     let set = signing::sign_event("https://legacy.example/events")?;
//!     let response = http::Request::post("https://legacy.example/events")
//!         .header("content-type", signing::CONTENT_TYPE)
//!         .body(set.into_bytes())
//!         .send()?;
//!     if response.status == 202 || response.status == 200 {
//!         Ok(())
//!     } else {
//!         Err(response.into_hook_error())
//!     }
//! }
//! ```

use crate::HookError;
use crate::wit::lockstep::connector0_3_0::signing;

/// The media type of a SET in an HTTP body (RFC 8417, RFC 8935 push delivery).
pub const CONTENT_TYPE: &str = "application/secevent+jwt";

/// Why the host signed nothing. Retrying does not help: the operator has not configured
/// signing (no `[ssf_transmitter]` with a `public_url`, or no key), the audience is empty,
/// longer than 512 bytes or holds control characters, or the hook asked for more than four
/// tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignError(pub String);

impl std::fmt::Display for SignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "signing the event failed: {}", self.0)
    }
}

impl std::error::Error for SignError {}

impl From<SignError> for HookError {
    /// A permanent failure: the connector's failure policy decides, and the reason reaches
    /// the dead letter.
    fn from(e: SignError) -> Self {
        HookError::Fail(e.to_string())
    }
}

/// The compact JWS of the SET about the current event for `audience`. The same event and
/// audience give the same `jti` on every redelivery, so a receiver de-duplicates by it.
/// At most four calls per hook call.
pub fn sign_event(audience: &str) -> Result<String, SignError> {
    signing::sign_event(audience).map_err(SignError)
}
