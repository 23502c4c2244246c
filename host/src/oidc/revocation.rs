//! Tokens that order a global token revocation (draft-parecki-oauth-global-token-revocation):
//! a JWT an identity provider trusted by the realm (`[[realms.NAME.token_revocation_callers]]`)
//! signs for exactly this realm's endpoint URL. Verified in full like every token here:
//! signature against the caller's published keys, an asymmetric algorithm from its allowlist,
//! `iss`, `aud`, `exp` (required, and at most [`MAX_LIFETIME_S`] away, so a leaked token is
//! short-lived), `iat` when present, and a `jti` the caller stores with the revocation.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{DEFAULT_ALGS, DEFAULT_SKEW_S, OidcError, Verifier, parse_alg, tls, unverified_issuer};
use crate::config::RealmConfig;
use crate::domain::rules;

/// Longest a revocation token may live: `exp` at most this far after `iat` and after now.
pub const MAX_LIFETIME_S: i64 = 300;
/// The path of a realm's endpoint below the public URL.
pub const ENDPOINT_PATH: &str = "global-token-revocation";

/// The URL of `realm`'s global token revocation endpoint under `public_url`: the `aud` its
/// tokens must carry and the URL the metadata advertises.
pub fn endpoint_url(public_url: &str, realm: &str) -> String {
    format!(
        "{}/realms/{realm}/{ENDPOINT_PATH}",
        public_url.trim_end_matches('/')
    )
}

/// An identity provider whose tokens may order revocations in a realm.
#[derive(Clone, Debug)]
pub struct RevocationCaller {
    /// `iss` of its tokens.
    pub issuer: String,
    /// Its key set; `None`: found through the issuer's discovery document.
    pub jwks_uri: Option<String>,
    /// Accepted signature algorithms.
    pub algs: Vec<Algorithm>,
    /// The system it speaks for (audit actor, `originSystem`).
    pub system: Option<String>,
}

/// A realm's global token revocation settings.
#[derive(Clone, Debug)]
pub struct RealmRevocation {
    /// The realm.
    pub realm: String,
    /// The endpoint's public URL (the tokens' audience); `None` without a `public_url`.
    pub endpoint: Option<String>,
    /// The realm's own IdP issuer (an `iss_sub` subject of it names a user here).
    pub realm_issuer: Option<String>,
    /// Identity providers whose tokens are accepted.
    pub callers: Vec<RevocationCaller>,
    /// Clock skew tolerance, seconds (the realm's `clock_skew_s`).
    pub skew_s: u64,
}

impl RealmRevocation {
    /// The realm's settings from `[realms.NAME]` and the service's `public_url`.
    pub fn from_config(
        realm: &str,
        c: &RealmConfig,
        public_url: Option<&str>,
    ) -> Result<Self, String> {
        let public_url = match public_url {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => Some(u),
            Some(u) => {
                return Err(format!(
                    "public_url {u:?} must start with https:// or http://"
                ));
            }
            None => None,
        };
        if !c.token_revocation_callers.is_empty() && public_url.is_none() {
            return Err(format!(
                "[realms.{realm}] token_revocation_callers need public_url: a caller's token \
                 must name the endpoint's URL as its audience"
            ));
        }
        let mut callers = Vec::with_capacity(c.token_revocation_callers.len());
        for (i, t) in c.token_revocation_callers.iter().enumerate() {
            let ctx = |e: String| format!("[realms.{realm}] token_revocation_callers[{i}]: {e}");
            tls::check_url(&t.issuer).map_err(|e| ctx(format!("issuer {e}")))?;
            if let Some(uri) = &t.jwks_uri {
                tls::check_url(uri).map_err(|e| ctx(format!("jwks_uri {e}")))?;
            }
            if callers
                .iter()
                .any(|c: &RevocationCaller| c.issuer == t.issuer)
            {
                return Err(ctx(format!("issuer {:?} is listed twice", t.issuer)));
            }
            if let Some(system) = &t.system {
                rules::id("system", system).map_err(|e| ctx(e.to_string()))?;
            }
            let algs = if t.allowed_algs.is_empty() {
                DEFAULT_ALGS.to_vec()
            } else {
                t.allowed_algs
                    .iter()
                    .map(|a| parse_alg(a).map_err(|e| ctx(format!("allowed_algs: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?
            };
            callers.push(RevocationCaller {
                issuer: t.issuer.clone(),
                jwks_uri: t.jwks_uri.clone(),
                algs,
                system: t.system.clone(),
            });
        }
        Ok(RealmRevocation {
            realm: realm.to_owned(),
            endpoint: public_url.map(|u| endpoint_url(u, realm)),
            realm_issuer: c.issuer.clone(),
            callers,
            skew_s: c.clock_skew_s.unwrap_or(DEFAULT_SKEW_S),
        })
    }
}

/// A verified revocation token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationToken {
    /// The caller's issuer.
    pub issuer: String,
    /// The system the caller speaks for, if configured.
    pub system: Option<String>,
    /// Token id, for replay detection.
    pub jti: String,
    /// Until when (epoch ms) the `jti` must be remembered: past it the token has expired.
    pub remember_until_ms: i64,
}

#[derive(Deserialize)]
struct RevocationClaims {
    iat: Option<i64>,
    exp: Option<i64>,
    jti: Option<String>,
}

impl Verifier {
    /// Adds the service's public URL and the realms' global token revocation settings.
    pub fn with_revocation(
        mut self,
        public_url: Option<String>,
        realms: Vec<RealmRevocation>,
    ) -> Self {
        self.public_url = public_url;
        self.revocation = realms.into_iter().map(|r| (r.realm.clone(), r)).collect();
        self
    }

    /// The URL callers reach the service at (`public_url`), if configured.
    pub fn public_url(&self) -> Option<&str> {
        self.public_url.as_deref()
    }

    /// A realm's global token revocation settings (`None`: the realm is not configured).
    pub fn revocation(&self, realm: &str) -> Option<&RealmRevocation> {
        self.revocation.get(realm)
    }

    /// Every realm's settings.
    pub fn revocation_realms(&self) -> &HashMap<String, RealmRevocation> {
        &self.revocation
    }

    /// Verifies a bearer token as a revocation order for `realm`. `Ok(None)`: not a JWT of
    /// any of the realm's callers (the caller then tries the API's own credentials).
    pub async fn verify_revocation(
        &self,
        realm: &str,
        token: &str,
    ) -> Result<Option<RevocationToken>, OidcError> {
        let Some(settings) = self.revocation.get(realm) else {
            return Ok(None);
        };
        // The unverified `iss` only selects whose keys and rules the token is checked against.
        let Some(issuer) = unverified_issuer(token) else {
            return Ok(None);
        };
        let Some(caller) = settings.callers.iter().find(|c| c.issuer == issuer) else {
            return Ok(None);
        };
        let Some(endpoint) = &settings.endpoint else {
            // Refused at start-up; kept so a missing URL can never mean "any audience".
            return Err(OidcError::Invalid("the endpoint has no public URL".into()));
        };
        // An unsupported `alg` (including "none") fails to parse here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| OidcError::Invalid(format!("malformed token: {e}")))?;
        if !caller.algs.contains(&header.alg) {
            return Err(OidcError::Invalid(format!(
                "algorithm {:?} is not allowed for issuer {issuer}",
                header.alg
            )));
        }
        let jwk = match &caller.jwks_uri {
            Some(uri) => {
                self.jwks
                    .key_at(uri, header.kid.as_deref(), header.alg)
                    .await?
            }
            None => {
                self.jwks
                    .key(&caller.issuer, header.kid.as_deref(), header.alg)
                    .await?
            }
        };
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| OidcError::Invalid(format!("unusable signing key: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[caller.issuer.as_str()]);
        validation.set_audience(&[endpoint.as_str()]);
        validation.leeway = settings.skew_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["iss", "aud", "exp"]);
        let claims = jsonwebtoken::decode::<RevocationClaims>(token, &key, &validation)
            .map_err(|e| OidcError::Invalid(format!("token rejected: {e}")))?
            .claims;
        let now = chrono::Utc::now().timestamp();
        check_times(claims.iat, claims.exp, now, settings.skew_s)?;
        let exp = claims.exp.unwrap_or(now);
        let Some(jti) = claims.jti.filter(|j| !j.is_empty()) else {
            return Err(OidcError::Invalid("jti is missing".into()));
        };
        rules::id("jti", &jti).map_err(|e| OidcError::Invalid(e.to_string()))?;
        let skew = i64::try_from(settings.skew_s).unwrap_or(i64::MAX / 4);
        Ok(Some(RevocationToken {
            issuer: caller.issuer.clone(),
            system: caller.system.clone(),
            jti,
            remember_until_ms: exp.saturating_add(skew).saturating_mul(1_000),
        }))
    }
}

/// The lifetime rules `jsonwebtoken` does not know: `exp` present and at most
/// [`MAX_LIFETIME_S`] after `iat` (when given) and after now; `iat` not in the future.
fn check_times(iat: Option<i64>, exp: Option<i64>, now: i64, skew_s: u64) -> Result<(), OidcError> {
    let skew = i64::try_from(skew_s).unwrap_or(i64::MAX / 4);
    let invalid = |m: &str| Err(OidcError::Invalid(m.to_owned()));
    let Some(exp) = exp else {
        return invalid("exp is missing");
    };
    if exp.saturating_sub(now) > MAX_LIFETIME_S.saturating_add(skew) {
        return invalid("exp is more than 5 minutes away");
    }
    if let Some(iat) = iat {
        if iat > now.saturating_add(skew) {
            return invalid("iat is in the future");
        }
        if exp.saturating_sub(iat) > MAX_LIFETIME_S {
            return invalid("the token lives longer than 5 minutes (exp - iat)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RevocationCallerConfig;

    #[test]
    fn token_lifetimes_are_bounded_to_five_minutes() {
        let now = 1_000_000;
        assert!(check_times(Some(now), Some(now + 300), now, 60).is_ok());
        assert!(check_times(None, Some(now + 300), now, 60).is_ok());
        assert!(check_times(Some(now), None, now, 60).is_err());
        assert!(check_times(Some(now), Some(now + 301), now, 60).is_err());
        assert!(check_times(None, Some(now + 400), now, 60).is_err());
        assert!(check_times(Some(now + 120), Some(now + 180), now, 60).is_err());
    }

    #[test]
    fn callers_need_a_public_url_and_asymmetric_algorithms() {
        let mut c = RealmConfig {
            token_revocation_callers: vec![RevocationCallerConfig {
                issuer: "https://acme.okta.com".into(),
                ..RevocationCallerConfig::default()
            }],
            ..RealmConfig::default()
        };
        let err = RealmRevocation::from_config("acme", &c, None).unwrap_err();
        assert!(err.contains("public_url"), "{err}");
        let r = RealmRevocation::from_config("acme", &c, Some("https://ls.example.com/")).unwrap();
        assert_eq!(
            r.endpoint.as_deref(),
            Some("https://ls.example.com/realms/acme/global-token-revocation")
        );
        assert_eq!(r.callers[0].algs, DEFAULT_ALGS.to_vec());
        c.token_revocation_callers[0].allowed_algs = vec!["HS256".into()];
        let err = RealmRevocation::from_config("acme", &c, Some("https://x")).unwrap_err();
        assert!(err.contains("symmetric"), "{err}");
        c.token_revocation_callers[0].allowed_algs = vec![];
        c.token_revocation_callers[0].jwks_uri = Some("http://keys.example.com/jwks".into());
        assert!(RealmRevocation::from_config("acme", &c, Some("https://x")).is_err());
        assert!(
            RealmRevocation::from_config("acme", &RealmConfig::default(), Some("ftp://x")).is_err()
        );
    }
}
