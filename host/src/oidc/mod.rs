//! Tokens issued by a realm's identity provider: OIDC Back-Channel Logout tokens and access
//! tokens for the admin API (docs/keycloak.md), and the global token revocation orders of the
//! realms' trusted callers ([`revocation`], docs/ssf.md). Every token is verified in full — signature against the issuer's published keys ([`jwks`]), algorithm from the realm's
//! allowlist (asymmetric only, so neither `none` nor an HMAC keyed with a public key can
//! pass), issuer, audience, times — with `jsonwebtoken`; nothing here decodes a token and
//! trusts it.

pub mod jwks;
pub mod keycloak_admin;
pub mod revocation;
pub mod signing_keys;
pub mod ssf_client;
pub mod ssf_receiver;
pub mod tls;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::auth::{AccessTokenVerifier, AuthError, Permission, Principal};
use crate::config::RealmConfig;
use crate::domain::rules;

/// The `events` member that makes a JWT a logout token (Back-Channel Logout 1.0, 2.4).
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// How long a logout token's `jti` is remembered (tokens older than this are refused, so a
/// replay can never outlive its record).
pub const REPLAY_WINDOW_S: i64 = 600;
/// Algorithms accepted when a realm does not list its own.
pub const DEFAULT_ALGS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::PS256];
/// Default clock skew tolerance.
pub const DEFAULT_SKEW_S: u64 = 60;
/// The scope or client role that grants `users:manage` by default.
pub const DEFAULT_PERMISSION_ROLE: &str = "users:manage";
pub use crate::domain::DEFAULT_IDP_SYSTEM;

/// Why a token was refused, or could not be checked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OidcError {
    /// The token is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The IdP's keys could not be obtained.
    #[error("{0}")]
    Unavailable(String),
    /// The realm has no identity provider configured.
    #[error("realm {0:?} has no identity provider configured (issuer)")]
    NotConfigured(String),
}

/// A realm's identity provider, validated from `[realms.NAME]`.
#[derive(Clone, Debug)]
pub struct RealmIdp {
    pub realm: String,
    /// `iss` of its tokens; discovery and keys are found under it.
    pub issuer: String,
    /// Accepted `aud` values (any one must be present).
    pub audiences: Vec<String>,
    /// Accepted signature algorithms.
    pub algs: Vec<Algorithm>,
    /// Clock skew tolerance, seconds.
    pub skew_s: u64,
    /// Scope or client role (of an audience client) that grants `users:manage`.
    pub permission_role: String,
    /// `originSystem` of back-channel logouts (connectors of that name do not get the echo).
    pub idp_system: String,
}

impl RealmIdp {
    /// The realm's IdP, or `None` when it names no issuer.
    pub fn from_config(realm: &str, c: &RealmConfig) -> Result<Option<Self>, String> {
        let Some(issuer) = c.issuer.clone() else {
            return Ok(None);
        };
        tls::check_url(&issuer).map_err(|e| format!("[realms.{realm}] issuer {e}"))?;
        if c.audiences.is_empty() {
            return Err(format!(
                "[realms.{realm}] audiences must name at least one audience (e.g. [\"lockstep\"])"
            ));
        }
        let algs = if c.allowed_algs.is_empty() {
            DEFAULT_ALGS.to_vec()
        } else {
            c.allowed_algs
                .iter()
                .map(|a| parse_alg(a).map_err(|e| format!("[realms.{realm}] allowed_algs: {e}")))
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Some(RealmIdp {
            realm: realm.to_owned(),
            issuer,
            audiences: c.audiences.clone(),
            algs,
            skew_s: c.clock_skew_s.unwrap_or(DEFAULT_SKEW_S),
            permission_role: c
                .permission_role
                .clone()
                .unwrap_or_else(|| DEFAULT_PERMISSION_ROLE.to_owned()),
            idp_system: c
                .idp_system
                .clone()
                .unwrap_or_else(|| DEFAULT_IDP_SYSTEM.to_owned()),
        }))
    }
}

/// An asymmetric JWS algorithm: HMAC would let anyone holding the (public) key sign.
fn parse_alg(name: &str) -> Result<Algorithm, String> {
    let alg: Algorithm = name
        .parse()
        .map_err(|_| format!("unknown algorithm {name:?}"))?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Err(format!(
            "{name} is symmetric; only RS*, PS*, ES* and EdDSA are accepted"
        )),
        other => Ok(other),
    }
}

/// A verified logout token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutToken {
    /// The IdP session that ended.
    pub sid: Option<String>,
    /// The user whose sessions ended (when no `sid` is given).
    pub sub: Option<String>,
    /// Token id, for replay detection.
    pub jti: String,
    /// Until when (epoch ms) the `jti` must be remembered.
    pub remember_until_ms: i64,
}

#[derive(Deserialize)]
struct LogoutClaims {
    iat: Option<i64>,
    exp: Option<i64>,
    jti: Option<String>,
    sid: Option<String>,
    sub: Option<String>,
    events: Option<serde_json::Map<String, serde_json::Value>>,
    /// Whether the token has a `nonce` member at all: `"nonce": null` is a nonce too (an
    /// `Option` would read it as absent).
    #[serde(default, deserialize_with = "present")]
    nonce: bool,
}

/// `true` for any value, `null` included; a missing member takes the field's default.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

#[derive(Deserialize, Default)]
struct Roles {
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
struct AccessClaims {
    sub: Option<String>,
    azp: Option<String>,
    scope: Option<String>,
    #[serde(default)]
    resource_access: HashMap<String, Roles>,
}

/// Verifies tokens of every realm with an identity provider.
pub struct Verifier {
    realms: HashMap<String, RealmIdp>,
    jwks: jwks::Jwks,
    revocation: HashMap<String, revocation::RealmRevocation>,
    public_url: Option<String>,
}

impl Verifier {
    /// A verifier for these realms, fetching keys over HTTPS that trusts `roots`.
    pub fn new(realms: Vec<RealmIdp>, roots: &tls::TrustRoots) -> Result<Self, OidcError> {
        Ok(Verifier {
            realms: realms.into_iter().map(|r| (r.realm.clone(), r)).collect(),
            jwks: jwks::Jwks::new(roots)?,
            revocation: HashMap::new(),
            public_url: None,
        })
    }

    /// Whether any realm has an identity provider.
    pub fn is_empty(&self) -> bool {
        self.realms.is_empty()
    }

    /// The identity provider of a realm.
    pub fn realm(&self, realm: &str) -> Option<&RealmIdp> {
        self.realms.get(realm)
    }

    /// Signature, algorithm, issuer and audience; `exp` only when `check_exp`.
    async fn verify<T: DeserializeOwned>(
        &self,
        idp: &RealmIdp,
        token: &str,
        check_exp: bool,
    ) -> Result<T, OidcError> {
        // An unsupported `alg` (including "none") fails to parse here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| OidcError::Invalid(format!("malformed token: {e}")))?;
        if !idp.algs.contains(&header.alg) {
            return Err(OidcError::Invalid(format!(
                "algorithm {:?} is not allowed for realm {:?}",
                header.alg, idp.realm
            )));
        }
        let jwk = self
            .jwks
            .key(&idp.issuer, header.kid.as_deref(), header.alg)
            .await?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| OidcError::Invalid(format!("unusable signing key: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[idp.issuer.as_str()]);
        validation.set_audience(&idp.audiences);
        validation.leeway = idp.skew_s;
        validation.validate_exp = check_exp;
        validation.validate_nbf = true;
        let required: &[&str] = if check_exp {
            &["iss", "aud", "exp"]
        } else {
            &["iss", "aud"]
        };
        validation.set_required_spec_claims(required);
        jsonwebtoken::decode::<T>(token, &key, &validation)
            .map(|t| t.claims)
            .map_err(|e| OidcError::Invalid(format!("token rejected: {e}")))
    }

    /// Verifies a Back-Channel Logout token for `realm` (Back-Channel Logout 1.0, 2.6).
    /// Replay of the `jti` is the caller's check (it must be stored with the logout).
    pub async fn verify_logout(&self, realm: &str, token: &str) -> Result<LogoutToken, OidcError> {
        let idp = self
            .realms
            .get(realm)
            .ok_or_else(|| OidcError::NotConfigured(realm.to_owned()))?;
        let claims: LogoutClaims = self.verify(idp, token, false).await?;
        let invalid = |m: &str| Err(OidcError::Invalid(m.to_owned()));
        let now = chrono::Utc::now().timestamp();
        let skew = i64::try_from(idp.skew_s).unwrap_or(i64::MAX / 4);
        let Some(iat) = claims.iat else {
            return invalid("iat is missing");
        };
        if iat > now + skew {
            return invalid("iat is in the future");
        }
        if now - iat > REPLAY_WINDOW_S + skew {
            return invalid("the token is too old (iat outside the replay window)");
        }
        if let Some(exp) = claims.exp
            && exp + skew < now
        {
            return invalid("the token has expired");
        }
        match claims
            .events
            .as_ref()
            .map(|e| e.get(BACKCHANNEL_LOGOUT_EVENT))
        {
            Some(Some(serde_json::Value::Object(_))) => {}
            _ => return invalid("events must hold the back-channel logout event"),
        }
        if claims.nonce {
            return invalid("a logout token must not carry a nonce");
        }
        let Some(jti) = claims.jti.filter(|j| !j.is_empty()) else {
            return invalid("jti is missing");
        };
        rules::id("jti", &jti).map_err(|e| OidcError::Invalid(e.to_string()))?;
        let sid = claims.sid.filter(|s| !s.is_empty());
        let sub = claims.sub.filter(|s| !s.is_empty());
        if sid.is_none() && sub.is_none() {
            return invalid("a logout token must name a sid or a sub");
        }
        for (name, v) in [("sid", &sid), ("sub", &sub)] {
            rules::optional_id(name, v.as_deref())
                .map_err(|e| OidcError::Invalid(e.to_string()))?;
        }
        let until = claims.exp.unwrap_or(iat).max(iat + REPLAY_WINDOW_S) + skew;
        Ok(LogoutToken {
            sid,
            sub,
            jti,
            remember_until_ms: until.saturating_mul(1_000),
        })
    }

    /// Verifies an admin API access token issued by one of the realms' IdPs.
    /// `Ok(None)`: not a JWT of any configured issuer (the caller tries nothing else).
    pub async fn verify_access(&self, token: &str) -> Result<Option<Principal>, AuthError> {
        // The unverified `iss` only selects which realm's keys and rules to verify against.
        let Some(issuer) = unverified_issuer(token) else {
            return Ok(None);
        };
        let Some(idp) = self.realms.values().find(|r| r.issuer == issuer) else {
            return Ok(None);
        };
        let claims: AccessClaims = self
            .verify(idp, token, true)
            .await
            .map_err(|e| AuthError::Unauthenticated(format!("access token: {e}")))?;
        // A scope, or a client role of an audience client, grants a permission.
        let grants = |role: &str| {
            claims
                .scope
                .as_deref()
                .is_some_and(|s| s.split(' ').any(|w| w == role))
                || idp.audiences.iter().any(|aud| {
                    claims
                        .resource_access
                        .get(aud)
                        .is_some_and(|r| r.roles.iter().any(|x| x == role))
                })
        };
        let mut permissions = Vec::new();
        if grants(idp.permission_role.as_str()) {
            permissions.push(Permission::UsersManage);
        }
        // Shared Signals receivers (Lockstep as transmitter) are granted by `ssf:manage`.
        if grants(Permission::SsfManage.as_str()) {
            permissions.push(Permission::SsfManage);
        }
        Ok(Some(Principal::Token {
            subject: claims
                .sub
                .or(claims.azp)
                .unwrap_or_else(|| "access-token".into()),
            realm: idp.realm.clone(),
            permissions,
        }))
    }
}

#[derive(Deserialize)]
struct IdClaims {
    sub: Option<String>,
    nonce: Option<String>,
}

impl Verifier {
    /// Verifies an OpenID Connect ID token of `realm`'s IdP issued to `client_id` (signature,
    /// algorithm, issuer, audience, expiry) and bound to `nonce`; returns its subject.
    pub async fn verify_id_token(
        &self,
        realm: &str,
        token: &str,
        client_id: &str,
        nonce: &str,
    ) -> Result<String, OidcError> {
        let mut idp = self
            .realms
            .get(realm)
            .ok_or_else(|| OidcError::NotConfigured(realm.to_owned()))?
            .clone();
        // An ID token's audience is the client it was issued to, not the API's audiences.
        idp.audiences = vec![client_id.to_owned()];
        let claims: IdClaims = self.verify(&idp, token, true).await?;
        let sent = claims.nonce.unwrap_or_default();
        if sent.len() != nonce.len()
            || !bool::from(subtle::ConstantTimeEq::ct_eq(
                sent.as_bytes(),
                nonce.as_bytes(),
            ))
        {
            return Err(OidcError::Invalid(
                "the ID token's nonce is not the one this sign-in sent".into(),
            ));
        }
        claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OidcError::Invalid("the ID token has no sub".into()))
    }
}

/// The `iss` claim of a compact JWS, read without verification (routing only).
fn unverified_issuer(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["iss"].as_str().map(str::to_owned)
}

/// Adapts the verifier to the authenticator's seam.
pub struct AccessTokens(pub Arc<Verifier>);

impl AccessTokenVerifier for AccessTokens {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<Principal>, AuthError>> {
        Box::pin(self.0.verify_access(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_asymmetric_algorithms_are_accepted() {
        assert_eq!(parse_alg("RS256"), Ok(Algorithm::RS256));
        assert_eq!(parse_alg("ES256"), Ok(Algorithm::ES256));
        assert!(parse_alg("HS256").unwrap_err().contains("symmetric"));
        assert!(parse_alg("none").is_err());
    }

    #[test]
    fn realm_idp_needs_audiences_and_a_url() {
        let mut c = RealmConfig {
            issuer: Some("http://127.0.0.1:18180/realms/acme".into()),
            ..RealmConfig::default()
        };
        assert!(
            RealmIdp::from_config("acme", &c)
                .unwrap_err()
                .contains("audiences")
        );
        c.audiences = vec!["lockstep".into()];
        let idp = RealmIdp::from_config("acme", &c).unwrap().unwrap();
        assert_eq!(idp.algs, DEFAULT_ALGS.to_vec());
        assert_eq!(idp.idp_system, "keycloak");
        c.issuer = Some("ftp://x".into());
        assert!(RealmIdp::from_config("acme", &c).is_err());
        c.issuer = Some("http://idp.example.com/realms/acme".into());
        let err = RealmIdp::from_config("acme", &c).unwrap_err();
        assert!(err.contains("https://"), "{err}");
        c.issuer = Some("https://idp.example.com/realms/acme".into());
        assert!(RealmIdp::from_config("acme", &c).unwrap().is_some());
        assert!(
            RealmIdp::from_config("acme", &RealmConfig::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_unverified_issuer_is_read_only_from_a_three_part_token() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"iss":"http://i"}"#);
        assert_eq!(
            unverified_issuer(&format!("h.{payload}.s")).as_deref(),
            Some("http://i")
        );
        assert_eq!(unverified_issuer(&format!("h.{payload}")), None);
        assert_eq!(unverified_issuer(&format!("h.{payload}.s.x")), None);
        assert_eq!(unverified_issuer("lst_plainkey"), None);
    }

    #[test]
    fn a_nonce_member_is_seen_whatever_its_value() {
        for (claims, nonce) in [
            (r#"{"nonce": null}"#, true),
            (r#"{"nonce": "n"}"#, true),
            (r#"{"nonce": {}}"#, true),
            (r#"{}"#, false),
        ] {
            let c: LogoutClaims = serde_json::from_str(claims).unwrap();
            assert_eq!(c.nonce, nonce, "{claims}");
        }
    }
}
