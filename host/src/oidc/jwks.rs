//! Signing keys of each configured issuer: found through the issuer's discovery document,
//! cached, refetched when they age out or when a token names a key the cache does not hold
//! (key rotation), at most once per [`MIN_REFETCH`] per issuer so a stream of forged `kid`s
//! cannot turn Lockstep into a load generator against the IdP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};

use super::OidcError;
use super::tls::TrustRoots;

/// How long a fetched key set is used without asking again.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// Least time between two fetches for one issuer.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// Largest discovery document or key set accepted.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Bound on each HTTP exchange with the IdP.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct IssuerKeys {
    set: Option<(Arc<JwkSet>, Instant)>,
    last_fetch: Option<Instant>,
}

/// Key sets by issuer.
pub struct Jwks {
    client: reqwest::Client,
    issuers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<IssuerKeys>>>>,
}

impl Jwks {
    /// An empty cache whose HTTPS connections trust the bundled roots and `roots`.
    pub fn new(roots: &TrustRoots) -> Result<Self, OidcError> {
        let client = roots
            .apply(reqwest::Client::builder())
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OidcError::Unavailable(format!("cannot build the HTTP client: {e}")))?;
        Ok(Jwks {
            client,
            issuers: Mutex::new(HashMap::new()),
        })
    }

    fn slot(&self, issuer: &str) -> Arc<tokio::sync::Mutex<IssuerKeys>> {
        let mut map = match self.issuers.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(issuer.to_owned()).or_default().clone()
    }

    /// The key that signed a token: by `kid`, or the only key usable for `alg` when the
    /// token names none. Fetches (or refetches once, rate-limited) when needed.
    pub async fn key(
        &self,
        issuer: &str,
        kid: Option<&str>,
        alg: jsonwebtoken::Algorithm,
    ) -> Result<Jwk, OidcError> {
        self.key_from(KeySource::Discovery(issuer), kid, alg).await
    }

    /// Like [`Jwks::key`], from a key set named directly rather than through discovery (a
    /// token signer need not be an OpenID provider with a discovery document).
    pub async fn key_at(
        &self,
        jwks_uri: &str,
        kid: Option<&str>,
        alg: jsonwebtoken::Algorithm,
    ) -> Result<Jwk, OidcError> {
        self.key_from(KeySource::Uri(jwks_uri), kid, alg).await
    }

    async fn key_from(
        &self,
        source: KeySource<'_>,
        kid: Option<&str>,
        alg: jsonwebtoken::Algorithm,
    ) -> Result<Jwk, OidcError> {
        // Discovery and direct key sets never share a slot: one URL could be both.
        let (slot_key, issuer) = match source {
            KeySource::Discovery(issuer) => (issuer.to_owned(), issuer),
            KeySource::Uri(uri) => (format!("jwks_uri {uri}"), uri),
        };
        let slot = self.slot(&slot_key);
        // One fetch at a time per issuer; waiters then find the fresh set.
        let mut keys = slot.lock().await;
        let now = Instant::now();
        if let Some((set, at)) = &keys.set
            && now.duration_since(*at) < MAX_AGE
            && let Some(jwk) = pick(set, kid, alg)
        {
            return Ok(jwk);
        }
        if let Some(last) = keys.last_fetch
            && now.duration_since(last) < MIN_REFETCH
        {
            // Fetched moments ago: the key is genuinely unknown (or the IdP is down).
            return match &keys.set {
                Some((set, _)) => pick(set, kid, alg).ok_or_else(|| unknown(kid)),
                None => Err(OidcError::Unavailable(format!(
                    "signing keys of {issuer} are not available yet"
                ))),
            };
        }
        keys.last_fetch = Some(now);
        let fetched = match source {
            KeySource::Discovery(issuer) => self.fetch(issuer).await,
            KeySource::Uri(uri) => self.fetch_set(uri).await,
        };
        match fetched {
            Ok(set) => {
                let set = Arc::new(set);
                keys.set = Some((set.clone(), Instant::now()));
                pick(&set, kid, alg).ok_or_else(|| unknown(kid))
            }
            Err(e) => {
                tracing::warn!(%issuer, error = %e, "cannot fetch the IdP's signing keys");
                // Keep serving with the keys we had; a rotated key waits for the next fetch.
                match &keys.set {
                    Some((set, _)) => pick(set, kid, alg).ok_or(e),
                    None => Err(e),
                }
            }
        }
    }

    async fn fetch(&self, issuer: &str) -> Result<JwkSet, OidcError> {
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let discovery: serde_json::Value = self.get_json(&discovery_url).await?;
        // OpenID Connect Discovery 1.0, 4.3: the document must name the issuer it came from.
        if discovery["issuer"].as_str() != Some(issuer) {
            return Err(OidcError::Unavailable(format!(
                "discovery document of {issuer} names issuer {}",
                discovery["issuer"]
            )));
        }
        let jwks_uri = discovery["jwks_uri"]
            .as_str()
            .ok_or_else(|| {
                OidcError::Unavailable(format!("discovery document of {issuer} has no jwks_uri"))
            })?
            .to_owned();
        // The keys are what every token is checked against: an HTTPS issuer whose discovery
        // names a plain-HTTP key set would hand them to anyone on the path.
        super::tls::check_url(&jwks_uri).map_err(|e| {
            OidcError::Unavailable(format!("discovery document of {issuer}: jwks_uri {e}"))
        })?;
        let set = self.fetch_set(&jwks_uri).await?;
        tracing::info!(%issuer, keys = set.keys.len(), "fetched the IdP's signing keys");
        Ok(set)
    }

    async fn fetch_set(&self, jwks_uri: &str) -> Result<JwkSet, OidcError> {
        serde_json::from_value(self.get_json(jwks_uri).await?)
            .map_err(|e| OidcError::Unavailable(format!("invalid JWKS at {jwks_uri}: {e}")))
    }

    async fn get_json(&self, url: &str) -> Result<serde_json::Value, OidcError> {
        let unavailable = |e: String| OidcError::Unavailable(format!("{url}: {e}"));
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(unavailable(format!("HTTP {}", response.status())));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(unavailable("document too large".into()));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(unavailable("document too large".into()));
        }
        serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("invalid JSON: {e}")))
    }
}

/// Where a key set is found.
#[derive(Clone, Copy)]
enum KeySource<'a> {
    /// The `jwks_uri` of this issuer's discovery document.
    Discovery(&'a str),
    /// This key set URL.
    Uri(&'a str),
}

fn unknown(kid: Option<&str>) -> OidcError {
    OidcError::Invalid(match kid {
        Some(k) => format!("the token is signed with an unknown key (kid {k:?})"),
        None => "the token names no key (kid) and the issuer has several".into(),
    })
}

/// The key for `kid` (or the single usable key), if it may verify `alg`.
fn pick(set: &JwkSet, kid: Option<&str>, alg: jsonwebtoken::Algorithm) -> Option<Jwk> {
    let usable = |k: &&Jwk| {
        k.common
            .public_key_use
            .as_ref()
            .is_none_or(|u| *u == jsonwebtoken::jwk::PublicKeyUse::Signature)
            && k.common
                .key_algorithm
                .is_none_or(|a| a.to_string() == format!("{alg:?}"))
    };
    match kid {
        Some(kid) => set
            .keys
            .iter()
            .filter(usable)
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .cloned(),
        None => {
            let mut candidates = set.keys.iter().filter(usable);
            match (candidates.next(), candidates.next()) {
                (Some(only), None) => Some(only.clone()),
                _ => None,
            }
        }
    }
}
