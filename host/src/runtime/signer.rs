//! Signed events for connectors: the seam through which a connector gets a Security Event
//! Token (RFC 8417) about the event it is delivering, signed with Lockstep's key, without
//! the key ever entering the component.
//!
//! The keys belong to the SSF transmitter (`sync`), which `runtime` must not import: the
//! transmitter implements [`EventSigner`] and the server builder hands it to the runtime.
//! The signer builds the SET itself from the event of the current hook call; a connector
//! chooses only the audience, so it cannot make Lockstep sign claims of its own.

use crate::domain::SyncEvent;

/// Longest audience a connector may ask for, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 512;
/// Most SETs one hook call may have signed: signing runs on the host, outside the
/// component's fuel and deadline, so it is bounded here.
pub const MAX_SIGNATURES_PER_CALL: u32 = 4;

/// Why no SET was signed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignRefusal {
    /// Lockstep has no transmitter or no signing key: the operator must configure one.
    #[error(
        "signed events are not available: configure [ssf_transmitter] with a public_url \
         (its keys sign the events)"
    )]
    Unavailable,
    /// The audience is empty, too long or holds control characters.
    #[error("invalid audience: {0}")]
    Audience(String),
    /// Asked for outside a hook call: there is no event to sign.
    #[error("no event: sign-event is called from a hook")]
    OutsideHook,
    /// The connector's manifest does not list the audience in `signing_audiences`.
    #[error(
        "audience {0:?} is not granted: the connector's manifest lists the audiences it may \
         have events signed for in signing_audiences"
    )]
    NotGranted(String),
    /// The call already had its share of signatures.
    #[error("at most {MAX_SIGNATURES_PER_CALL} signed events per hook call")]
    TooMany,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Failed(String),
}

/// Signs a SET about one event for one audience with the current signing key.
pub trait EventSigner: Send + Sync {
    /// The compact JWS of the SET about `event` for `audience`. The same event and audience
    /// give the same `jti`, so a receiver de-duplicates redeliveries.
    fn sign_event(&self, event: &SyncEvent, audience: &str) -> Result<String, SignRefusal>;
}

/// Checks an audience a connector asks for: non-empty, at most [`MAX_AUDIENCE_BYTES`], no
/// control characters.
pub fn check_audience(audience: &str) -> Result<(), SignRefusal> {
    if audience.trim().is_empty() {
        return Err(SignRefusal::Audience("empty".into()));
    }
    if audience.len() > MAX_AUDIENCE_BYTES {
        return Err(SignRefusal::Audience(format!(
            "longer than {MAX_AUDIENCE_BYTES} bytes"
        )));
    }
    if audience.chars().any(char::is_control) {
        return Err(SignRefusal::Audience("holds control characters".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_bounded() {
        assert_eq!(check_audience("https://rp.example"), Ok(()));
        assert!(check_audience(" ").is_err());
        assert!(check_audience("a\nb").is_err());
        assert!(check_audience(&"a".repeat(MAX_AUDIENCE_BYTES + 1)).is_err());
        assert_eq!(check_audience(&"a".repeat(MAX_AUDIENCE_BYTES)), Ok(()));
    }
}
