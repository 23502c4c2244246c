//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>), which authenticate the
//! Keycloak extension's event posts: `webhook-signature: v1,<base64 HMAC-SHA256(key,
//! "{webhook-id}.{webhook-timestamp}.{body}")>`, timestamps within five minutes. The id is
//! the replay key (the store remembers it), so a captured post cannot be applied twice.
//!
//! Checking costs one HMAC per configured secret, whatever the post carries: the signatures
//! header is bounded in length and in entries before anything is hashed, and each secret's MAC
//! is computed once and compared with every candidate, so an unauthenticated sender cannot
//! make the server hash its body thousands of times.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// How far `webhook-timestamp` may be from the local clock, either way.
pub const TOLERANCE_S: i64 = 300;
/// Shortest accepted secret (Standard Webhooks recommends 24–64 bytes).
pub const MIN_SECRET_BYTES: usize = 16;
/// Most `v1,` signatures looked at in one post: one per secret during a rotation, with room.
pub const MAX_SIGNATURES: usize = 4;
/// Longest `webhook-signature` header accepted (a v1 entry is 47 bytes).
pub const MAX_SIGNATURE_HEADER_BYTES: usize = 512;
/// Longest `webhook-id` accepted (it is hashed with the body, and stored as an event id).
pub const MAX_ID_BYTES: usize = 255;

/// Why a post is not authentic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A required header is absent or not text.
    #[error("the {0} header is missing")]
    Missing(&'static str),
    /// `webhook-timestamp` is not a number of seconds.
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    /// The timestamp is outside the tolerance (a stale or replayed post, or a skewed clock).
    #[error("webhook-timestamp is {0} s away from this server's clock (limit {TOLERANCE_S} s)")]
    OutsideWindow(i64),
    /// A header is longer than its bound (checked before any hashing).
    #[error("the {0} header is longer than {1} bytes")]
    TooLong(&'static str, usize),
    /// No `v1` signature matches any configured secret.
    #[error("no valid v1 signature")]
    Mismatch,
}

/// One realm's secrets; more than one while a secret is being rotated.
#[derive(Clone)]
pub struct WebhookKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for WebhookKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookKeys({} keys)", self.0.len())
    }
}

impl WebhookKeys {
    /// Parses secrets as written in the config: `whsec_<base64>` (the Standard Webhooks
    /// form) or any other string, used as its UTF-8 bytes.
    pub fn parse(secrets: &[String]) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(secrets.len());
        for (i, secret) in secrets.iter().enumerate() {
            let key = match secret.strip_prefix("whsec_") {
                Some(b64) => STANDARD
                    .decode(b64)
                    .map_err(|e| format!("secret #{}: whsec_ value is not base64: {e}", i + 1))?,
                None => secret.as_bytes().to_vec(),
            };
            if key.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "secret #{} is {} bytes; at least {MIN_SECRET_BYTES} are needed",
                    i + 1,
                    key.len()
                ));
            }
            keys.push(key);
        }
        Ok(WebhookKeys(keys))
    }

    /// Checks a post's headers and body at `now_s` (Unix seconds).
    pub fn verify(
        &self,
        id: Option<&str>,
        timestamp: Option<&str>,
        signatures: Option<&str>,
        body: &[u8],
        now_s: i64,
    ) -> Result<(), SignatureError> {
        let id = id.ok_or(SignatureError::Missing("webhook-id"))?;
        let timestamp = timestamp.ok_or(SignatureError::Missing("webhook-timestamp"))?;
        let signatures = signatures.ok_or(SignatureError::Missing("webhook-signature"))?;
        if signatures.len() > MAX_SIGNATURE_HEADER_BYTES {
            return Err(SignatureError::TooLong(
                "webhook-signature",
                MAX_SIGNATURE_HEADER_BYTES,
            ));
        }
        if id.len() > MAX_ID_BYTES {
            return Err(SignatureError::TooLong("webhook-id", MAX_ID_BYTES));
        }
        let ts: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| SignatureError::BadTimestamp)?;
        let skew = now_s.saturating_sub(ts);
        if skew.abs() > TOLERANCE_S {
            return Err(SignatureError::OutsideWindow(skew));
        }
        // Several signatures may be sent (one per secret during a rotation); any may match.
        // Only the first few are considered, and only well-formed ones count.
        let candidates: Vec<[u8; 32]> = signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .take(MAX_SIGNATURES)
            .filter_map(|b64| STANDARD.decode(b64).ok())
            .filter_map(|raw| <[u8; 32]>::try_from(raw).ok())
            .collect();
        if candidates.is_empty() {
            return Err(SignatureError::Mismatch);
        }
        let mut matched = subtle::Choice::from(0);
        for key in &self.0 {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
                continue;
            };
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(body);
            let expected = mac.finalize().into_bytes();
            for candidate in &candidates {
                // Constant-time comparison.
                matched |= expected.as_slice().ct_eq(candidate.as_slice());
            }
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

/// The realms that accept IdP events, with their keys.
#[derive(Clone, Debug, Default)]
pub struct EventKeys(HashMap<String, WebhookKeys>);

impl EventKeys {
    /// From `(realm, secrets)` pairs; realms without secrets are left out.
    pub fn new(realms: impl IntoIterator<Item = (String, WebhookKeys)>) -> Self {
        EventKeys(
            realms
                .into_iter()
                .filter(|(_, k)| !k.0.is_empty())
                .collect(),
        )
    }

    /// The keys of `realm`, if it accepts events.
    pub fn realm(&self, realm: &str) -> Option<&WebhookKeys> {
        self.0.get(realm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn sign(key: &[u8], id: &str, ts: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("key");
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // From the Standard Webhooks specification's reference libraries.
        let keys = WebhookKeys::parse(&[SECRET.into()]).expect("keys");
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let r = keys.verify(
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
            Some("1614265330"),
            Some(sig),
            body,
            1_614_265_330,
        );
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn refuses_tampering_staleness_and_missing_headers() {
        let raw = "a-shared-secret-of-enough-length";
        let keys = WebhookKeys::parse(&[raw.into()]).expect("keys");
        let body = b"{\"id\":\"e1\"}";
        let sig = sign(raw.as_bytes(), "e1", "1000", body);
        assert_eq!(
            keys.verify(Some("e1"), Some("1000"), Some(&sig), body, 1000),
            Ok(())
        );
        assert_eq!(
            keys.verify(
                Some("e1"),
                Some("1000"),
                Some(&sig),
                b"{\"id\":\"e2\"}",
                1000
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            keys.verify(Some("e2"), Some("1000"), Some(&sig), body, 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            keys.verify(
                Some("e1"),
                Some("1000"),
                Some(&sig),
                body,
                1000 + TOLERANCE_S + 1
            ),
            Err(SignatureError::OutsideWindow(TOLERANCE_S + 1))
        );
        assert_eq!(
            keys.verify(Some("e1"), Some("soon"), Some(&sig), body, 1000),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            keys.verify(None, Some("1000"), Some(&sig), body, 1000),
            Err(SignatureError::Missing("webhook-id"))
        );
        let other = sign(b"another-secret-of-enough-length!", "e1", "1000", body);
        assert_eq!(
            keys.verify(Some("e1"), Some("1000"), Some(&other), body, 1000),
            Err(SignatureError::Mismatch)
        );
        // During a rotation the sender may send both signatures; one valid is enough.
        let both = format!("{other} {sig}");
        assert_eq!(
            keys.verify(Some("e1"), Some("1000"), Some(&both), body, 1000),
            Ok(())
        );
    }

    #[test]
    fn a_hostile_signature_header_costs_one_mac_per_secret() {
        let raw = "a-shared-secret-of-enough-length";
        let keys = WebhookKeys::parse(&[raw.into()]).expect("keys");
        let body = vec![b'x'; 64 * 1024];
        let junk = format!("v1,{}", STANDARD.encode([7u8; 32]));
        // Over the length bound: refused before any hashing.
        let flood = vec![junk.as_str(); 10_000].join(" ");
        assert_eq!(
            keys.verify(Some("e1"), Some("1000"), Some(&flood), &body, 1000),
            Err(SignatureError::TooLong(
                "webhook-signature",
                MAX_SIGNATURE_HEADER_BYTES
            ))
        );
        // Within the bound: the valid signature after MAX_SIGNATURES others is not looked at.
        let good = sign(raw.as_bytes(), "e1", "1000", &body);
        let mut entries = vec![junk.as_str(); MAX_SIGNATURES];
        entries.push(&good);
        let late = entries.join(" ");
        assert!(late.len() <= MAX_SIGNATURE_HEADER_BYTES);
        assert_eq!(
            keys.verify(Some("e1"), Some("1000"), Some(&late), &body, 1000),
            Err(SignatureError::Mismatch)
        );
        let long_id = "i".repeat(MAX_ID_BYTES + 1);
        assert_eq!(
            keys.verify(Some(&long_id), Some("1000"), Some(&good), &body, 1000),
            Err(SignatureError::TooLong("webhook-id", MAX_ID_BYTES))
        );
        // The most a sender can make one check cost: MAX_SIGNATURES candidates, a full body,
        // one MAC. A thousand such checks stay far below a second (the unbounded loop hashed
        // the body once per entry: seconds per post).
        let started = std::time::Instant::now();
        for _ in 0..1_000 {
            assert_eq!(
                keys.verify(Some("e1"), Some("1000"), Some(&late), &body, 1000),
                Err(SignatureError::Mismatch)
            );
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn secrets_are_checked_when_parsed() {
        assert!(WebhookKeys::parse(&["short".into()]).is_err());
        assert!(WebhookKeys::parse(&["whsec_!!notbase64".into()]).is_err());
        assert!(WebhookKeys::parse(&["whsec_c2hvcnQ=".into()]).is_err());
    }
}
