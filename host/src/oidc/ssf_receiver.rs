//! Security Event Tokens (RFC 8417) that an OpenID Shared Signals (SSF 1.0) transmitter of a
//! realm (`[[realms.NAME.ssf_transmitters]]`) delivers, verified in full before anything is
//! done with them: JWS signature against the transmitter's `jwks_uri` (by `kid`, refetched
//! on rotation) with RS256 or ES256 only, header `typ` `secevent+jwt`, `iss` equal to the
//! transmitter's issuer, `aud` naming the stream's audience, `iat` not older than the
//! transmitter's window nor in the future, a `jti`, no `sub` and no `exp` (SSF 1.0 forbids
//! both), exactly one event, and a subject this realm can resolve. Refusals carry the error
//! codes of RFC 8935 section 2.3 (`invalid_request`, `invalid_key`, `invalid_issuer`,
//! `invalid_audience`), which push answers and poll `setErrs` both use.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::{OidcError, Verifier};
use crate::domain::rules;

/// Header `typ` of a SET (RFC 8417 section 2.3); `application/secevent+jwt` is accepted too.
pub const SET_TYP: &str = "secevent+jwt";
/// The only signature algorithms a SET may use.
pub const ALGS: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];
/// Default oldest `iat` accepted, seconds: a poll backlog of an hour still counts.
pub const DEFAULT_MAX_AGE_S: u64 = 3600;

/// CAEP session revoked: one session (complex subject with `session`) or all of a user's.
pub const SESSION_REVOKED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
/// CAEP credential change.
pub const CREDENTIAL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/credential-change";
/// RISC sessions revoked.
pub const SESSIONS_REVOKED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/sessions-revoked";
/// RISC account disabled.
pub const ACCOUNT_DISABLED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled";
/// RISC account purged.
pub const ACCOUNT_PURGED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/account-purged";
/// SSF stream verification.
pub const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
/// SSF stream updated (status change).
pub const STREAM_UPDATED: &str =
    "https://schemas.openid.net/secevent/ssf/event-type/stream-updated";
/// The events a stream asks for unless configured otherwise: all that end sessions.
pub const ACTIONABLE_EVENTS: [&str; 5] = [
    SESSION_REVOKED,
    CREDENTIAL_CHANGE,
    SESSIONS_REVOKED,
    ACCOUNT_DISABLED,
    ACCOUNT_PURGED,
];
/// Members of a complex subject this receiver understands.
pub const UNDERSTOOD_MEMBERS: [&str; 2] = ["user", "session"];

/// Why a SET is refused, as RFC 8935 names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    /// Malformed, a forbidden or missing claim, a stale `iat`, a subject not resolvable here.
    #[error("{0}")]
    InvalidRequest(String),
    /// The signature, its key or its algorithm is not acceptable.
    #[error("{0}")]
    InvalidKey(String),
    /// `iss` is not the transmitter's.
    #[error("{0}")]
    InvalidIssuer(String),
    /// `aud` does not name this stream.
    #[error("{0}")]
    InvalidAudience(String),
    /// The transmitter's keys cannot be fetched now: not a verdict, try again later.
    #[error("{0}")]
    Unavailable(String),
}

impl SetError {
    /// The RFC 8935 `err` code (`Unavailable` never reaches a transmitter as one).
    pub fn code(&self) -> &'static str {
        match self {
            SetError::InvalidRequest(_) | SetError::Unavailable(_) => "invalid_request",
            SetError::InvalidKey(_) => "invalid_key",
            SetError::InvalidIssuer(_) => "invalid_issuer",
            SetError::InvalidAudience(_) => "invalid_audience",
        }
    }
}

/// What a SET is checked against: one transmitter of one realm, and its stream.
#[derive(Clone, Debug)]
pub struct SetCheck<'a> {
    /// The configured issuer (equal to the discovered one, checked at start).
    pub issuer: &'a str,
    /// The transmitter's key set.
    pub jwks_uri: &'a str,
    /// Audiences of the stream; a SET must name one.
    pub audiences: &'a [String],
    /// The realm's own IdP issuer: an `iss_sub` subject of it names a user here too.
    pub realm_issuer: Option<&'a str>,
    /// Complex-subject members the transmitter declares critical (its metadata).
    pub critical_members: &'a [String],
    /// Oldest `iat` accepted, seconds before now.
    pub max_age_s: u64,
    /// Clock skew tolerated, seconds.
    pub skew_s: u64,
}

/// Who a SET is about, resolved to this realm's identifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// Lockstep's `userId` (the transmitter's user id, or the address of an `email` subject).
    pub user: Option<String>,
    /// The IdP session id (Keycloak's `sid`) of a complex subject's `session`.
    pub session: Option<String>,
}

/// What a verified SET says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetEvent {
    /// CAEP session-revoked.
    SessionRevoked(Subject),
    /// CAEP credential-change.
    CredentialChange(Subject),
    /// RISC sessions-revoked.
    SessionsRevoked(Subject),
    /// RISC account-disabled.
    AccountDisabled(Subject),
    /// RISC account-purged.
    AccountPurged(Subject),
    /// SSF verification, with the `state` the receiver asked for (if any).
    Verification {
        /// Echo of the verification request's `state`.
        state: Option<String>,
    },
    /// SSF stream-updated: the stream's new status.
    StreamUpdated {
        /// `enabled`, `paused` or `disabled`.
        status: String,
        /// Why, when the transmitter says.
        reason: Option<String>,
    },
    /// An event type this receiver does not act on (acknowledged, nothing done).
    Other(String),
}

impl SetEvent {
    /// A short name for logs, audit and metrics.
    pub fn name(&self) -> &str {
        match self {
            SetEvent::SessionRevoked(_) => "session-revoked",
            SetEvent::CredentialChange(_) => "credential-change",
            SetEvent::SessionsRevoked(_) => "sessions-revoked",
            SetEvent::AccountDisabled(_) => "account-disabled",
            SetEvent::AccountPurged(_) => "account-purged",
            SetEvent::Verification { .. } => "verification",
            SetEvent::StreamUpdated { .. } => "stream-updated",
            SetEvent::Other(_) => "other",
        }
    }
}

/// A verified SET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSet {
    /// Its id, unique per transmitter.
    pub jti: String,
    /// What it says.
    pub event: SetEvent,
    /// Until when (epoch ms) its `jti` must be remembered: past it, `iat` is too old anyway.
    pub remember_until_ms: i64,
}

/// The JOSE header members that matter, read before the signature is checked (they only
/// pick the key and reject what can never be valid).
struct Header {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: bool,
}

fn header(token: &str) -> Result<Header, SetError> {
    let invalid = |m: &str| SetError::InvalidRequest(format!("malformed SET: {m}"));
    let encoded = token
        .split('.')
        .next()
        .ok_or_else(|| invalid("no header"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .map_err(|_| invalid("the header is not base64url"))?;
    let value: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| invalid("the header is not a JSON object"))?;
    let text = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
    Ok(Header {
        alg: text("alg").ok_or_else(|| invalid("the header has no alg"))?,
        kid: text("kid"),
        typ: text("typ"),
        crit: value.contains_key("crit"),
    })
}

impl Verifier {
    /// Verifies a SET delivered by the transmitter `check` describes.
    pub async fn verify_set(
        &self,
        check: &SetCheck<'_>,
        token: &str,
    ) -> Result<VerifiedSet, SetError> {
        let token = token.trim();
        if token.split('.').count() != 3 {
            return Err(SetError::InvalidRequest(
                "a SET is a signed JWT (JWS compact serialization)".into(),
            ));
        }
        let header = header(token)?;
        let alg = match header.alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(SetError::InvalidKey(format!(
                    "algorithm {other:?} is not accepted (RS256 or ES256)"
                )));
            }
        };
        if header.crit {
            return Err(SetError::InvalidRequest(
                "the header names critical extensions this receiver does not know".into(),
            ));
        }
        match header.typ.as_deref() {
            Some(t)
                if t.eq_ignore_ascii_case(SET_TYP)
                    || t.eq_ignore_ascii_case("application/secevent+jwt") => {}
            Some(t) => {
                return Err(SetError::InvalidRequest(format!(
                    "header typ {t:?} is not {SET_TYP}"
                )));
            }
            None => {
                return Err(SetError::InvalidRequest(format!(
                    "header typ is missing (must be {SET_TYP})"
                )));
            }
        }
        let jwk = self
            .jwks
            .key_at(check.jwks_uri, header.kid.as_deref(), alg)
            .await
            .map_err(|e| match e {
                OidcError::Unavailable(d) => SetError::Unavailable(d),
                other => SetError::InvalidKey(other.to_string()),
            })?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| SetError::InvalidKey(format!("unusable signing key: {e}")))?;
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        // Issuer, audience and times are checked below, each with its own error code.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims::<&str>(&[]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature
                | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                | jsonwebtoken::errors::ErrorKind::InvalidKeyFormat
                | jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey
                | jsonwebtoken::errors::ErrorKind::InvalidRsaKey(_) => {
                    SetError::InvalidKey(format!("signature rejected: {e}"))
                }
                _ => SetError::InvalidRequest(format!("SET rejected: {e}")),
            })?
            .claims;
        check_claims(check, &claims, chrono::Utc::now().timestamp())
    }
}

/// Every check after the signature: issuer, audience, times, claims, event and subject.
fn check_claims(
    check: &SetCheck<'_>,
    claims: &Map<String, Value>,
    now: i64,
) -> Result<VerifiedSet, SetError> {
    let invalid = |m: String| Err(SetError::InvalidRequest(m));
    match claims.get("iss").and_then(Value::as_str) {
        Some(iss) if iss == check.issuer => {}
        Some(iss) => {
            return Err(SetError::InvalidIssuer(format!(
                "iss {iss:?} is not the transmitter {:?}",
                check.issuer
            )));
        }
        None => return Err(SetError::InvalidIssuer("iss is missing".into())),
    }
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !auds
        .iter()
        .any(|a| check.audiences.iter().any(|want| want == a))
    {
        return Err(SetError::InvalidAudience(format!(
            "aud {auds:?} does not name this stream's audience"
        )));
    }
    if claims.contains_key("sub") {
        return invalid("a SET must not carry sub (the subject is sub_id)".into());
    }
    if claims.contains_key("exp") {
        return invalid("a SET must not carry exp".into());
    }
    let skew = i64::try_from(check.skew_s).unwrap_or(i64::MAX / 4);
    let max_age = i64::try_from(check.max_age_s).unwrap_or(i64::MAX / 4);
    let Some(iat) = claims.get("iat").and_then(Value::as_i64) else {
        return invalid("iat is missing".into());
    };
    if iat > now.saturating_add(skew) {
        return invalid("iat is in the future".into());
    }
    if iat < now.saturating_sub(max_age).saturating_sub(skew) {
        return invalid(format!("iat is more than {} seconds old", check.max_age_s));
    }
    let Some(jti) = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty())
    else {
        return invalid("jti is missing".into());
    };
    rules::id("jti", jti).map_err(|e| SetError::InvalidRequest(e.to_string()))?;
    let Some(events) = claims.get("events").and_then(Value::as_object) else {
        return invalid("events is missing or not an object".into());
    };
    let mut entries = events.iter();
    let (event_type, payload) = match (entries.next(), entries.next()) {
        (Some(entry), None) => entry,
        _ => return invalid("a SET carries exactly one event".into()),
    };
    let subject = || {
        let sub_id = claims
            .get("sub_id")
            .or_else(|| payload.get("subject"))
            .ok_or_else(|| SetError::InvalidRequest("the SET names no subject (sub_id)".into()))?;
        resolve_subject(check, sub_id)
    };
    let event = match event_type.as_str() {
        SESSION_REVOKED => SetEvent::SessionRevoked(subject()?),
        CREDENTIAL_CHANGE => SetEvent::CredentialChange(user_subject(subject()?)?),
        SESSIONS_REVOKED => SetEvent::SessionsRevoked(user_subject(subject()?)?),
        ACCOUNT_DISABLED => SetEvent::AccountDisabled(user_subject(subject()?)?),
        ACCOUNT_PURGED => SetEvent::AccountPurged(user_subject(subject()?)?),
        VERIFICATION => SetEvent::Verification {
            state: payload
                .get("state")
                .and_then(Value::as_str)
                .map(str::to_owned),
        },
        STREAM_UPDATED => SetEvent::StreamUpdated {
            status: payload
                .get("status")
                .and_then(Value::as_str)
                .ok_or_else(|| SetError::InvalidRequest("stream-updated without a status".into()))?
                .to_owned(),
            reason: payload
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned),
        },
        other => SetEvent::Other(other.to_owned()),
    };
    let remember_until_ms = iat
        .saturating_add(max_age)
        .saturating_add(skew.saturating_mul(2))
        .saturating_mul(1_000);
    Ok(VerifiedSet {
        jti: jti.to_owned(),
        event,
        remember_until_ms,
    })
}

/// A subject that must name a user (the account-wide events).
fn user_subject(s: Subject) -> Result<Subject, SetError> {
    if s.user.is_none() {
        return Err(SetError::InvalidRequest(
            "this event needs a user in its subject".into(),
        ));
    }
    Ok(s)
}

/// An RFC 9493 subject identifier (or an SSF complex subject) resolved to this realm's ids.
fn resolve_subject(check: &SetCheck<'_>, value: &Value) -> Result<Subject, SetError> {
    let invalid = |m: String| SetError::InvalidRequest(m);
    let object = value
        .as_object()
        .ok_or_else(|| invalid("the subject is not an object".into()))?;
    match object.get("format").and_then(Value::as_str) {
        Some("complex") => {}
        Some(_) => {
            return Ok(Subject {
                user: Some(simple_user(check, object)?),
                session: None,
            });
        }
        None => return Err(invalid("the subject has no format".into())),
    }
    for name in object.keys() {
        if name == "format" || UNDERSTOOD_MEMBERS.contains(&name.as_str()) {
            continue;
        }
        if check.critical_members.iter().any(|c| c == name) {
            return Err(invalid(format!(
                "the subject's member {name:?} is critical and not understood here"
            )));
        }
    }
    let user = match object.get("user") {
        Some(Value::Object(u)) => Some(simple_user(check, u)?),
        Some(_) => return Err(invalid("the subject's user is not an object".into())),
        None => None,
    };
    let session = match object.get("session") {
        Some(Value::Object(s)) => Some(session_id(s)?),
        Some(_) => return Err(invalid("the subject's session is not an object".into())),
        None => None,
    };
    if user.is_none() && session.is_none() {
        return Err(invalid(
            "a complex subject must name a user or a session".into(),
        ));
    }
    Ok(Subject { user, session })
}

/// The user of an `email`, `opaque` or `iss_sub` identifier. An `iss_sub` must be of the
/// transmitter or of the realm's own IdP: another issuer's user is someone else.
fn simple_user(check: &SetCheck<'_>, object: &Map<String, Value>) -> Result<String, SetError> {
    let text = |name: &str| {
        object
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| SetError::InvalidRequest(format!("the subject has no {name}")))
    };
    let (name, user) = match object.get("format").and_then(Value::as_str) {
        Some("email") => ("email", text("email")?),
        Some("opaque") => ("id", text("id")?),
        Some("iss_sub") => {
            let iss = text("iss")?;
            if iss != check.issuer && Some(iss) != check.realm_issuer {
                return Err(SetError::InvalidRequest(format!(
                    "the subject's issuer {iss:?} is neither the transmitter nor this realm's \
                     identity provider"
                )));
            }
            ("sub", text("sub")?)
        }
        Some(other) => {
            return Err(SetError::InvalidRequest(format!(
                "subject format {other:?} is not supported (email, iss_sub, opaque, complex)"
            )));
        }
        None => return Err(SetError::InvalidRequest("the subject has no format".into())),
    };
    rules::id(name, user).map_err(|e| SetError::InvalidRequest(e.to_string()))?;
    Ok(user.to_owned())
}

/// The IdP session id of a complex subject's `session` (`opaque` `id`, or `session_id`).
fn session_id(object: &Map<String, Value>) -> Result<String, SetError> {
    let id = object
        .get("id")
        .or_else(|| object.get("session_id"))
        .or_else(|| object.get("sub"))
        .and_then(Value::as_str)
        .ok_or_else(|| SetError::InvalidRequest("the subject's session has no id".into()))?;
    rules::id("sid", id).map_err(|e| SetError::InvalidRequest(e.to_string()))?;
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check() -> SetCheck<'static> {
        SetCheck {
            issuer: "https://tx.example",
            jwks_uri: "https://tx.example/jwks",
            audiences: &[],
            realm_issuer: Some("https://idp.example/realms/acme"),
            critical_members: &[],
            max_age_s: 3600,
            skew_s: 60,
        }
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn claims_are_checked_each_with_its_code() {
        let auds = vec!["lockstep".to_owned()];
        let c = SetCheck {
            audiences: &auds,
            ..check()
        };
        let now = 1_000_000;
        let good = json!({
            "iss": "https://tx.example", "aud": "lockstep", "iat": now, "jti": "j1",
            "sub_id": {"format": "complex",
                       "user": {"format": "iss_sub", "iss": "https://tx.example", "sub": "u1"},
                       "session": {"format": "opaque", "id": "s1"}},
            "events": {SESSION_REVOKED: {}}
        });
        let ok = check_claims(&c, &claims(good.clone()), now).unwrap();
        assert_eq!(
            ok.event,
            SetEvent::SessionRevoked(Subject {
                user: Some("u1".into()),
                session: Some("s1".into())
            })
        );
        let with = |k: &str, v: Value| {
            let mut m = claims(good.clone());
            m.insert(k.into(), v);
            check_claims(&c, &m, now).map(|_| ()).map_err(|e| e.code())
        };
        assert_eq!(with("iss", json!("https://other")), Err("invalid_issuer"));
        assert_eq!(with("aud", json!(["other"])), Err("invalid_audience"));
        assert_eq!(with("sub", json!("u1")), Err("invalid_request"));
        assert_eq!(with("exp", json!(now + 60)), Err("invalid_request"));
        assert_eq!(with("iat", json!(now - 7200)), Err("invalid_request"));
        assert_eq!(with("iat", json!(now + 600)), Err("invalid_request"));
        assert_eq!(
            with(
                "sub_id",
                json!({"format": "iss_sub", "iss": "https://elsewhere", "sub": "u1"})
            ),
            Err("invalid_request")
        );
        assert_eq!(
            with(
                "events",
                json!({SESSION_REVOKED: {}, CREDENTIAL_CHANGE: {}})
            ),
            Err("invalid_request")
        );
        assert_eq!(
            with(
                "sub_id",
                json!({"format": "phone_number", "phone_number": "+1"})
            ),
            Err("invalid_request")
        );
        let critical = vec!["tenant".to_owned()];
        let strict = SetCheck {
            critical_members: &critical,
            ..c.clone()
        };
        let mut m = claims(good);
        m.insert(
            "sub_id".into(),
            json!({"format": "complex", "user": {"format": "opaque", "id": "u1"},
                   "tenant": {"format": "opaque", "id": "t"}}),
        );
        assert_eq!(
            check_claims(&strict, &m, now)
                .map(|_| ())
                .map_err(|e| e.code()),
            Err("invalid_request")
        );
        // Not critical: ignored.
        assert!(check_claims(&c, &m, now).is_ok());
    }
}
