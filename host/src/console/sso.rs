//! "Sign in with Keycloak": OpenID Connect authorization code flow with PKCE (S256) against
//! a realm's issuer, for realms with `console_client_id`. `state` (bound to the browser by
//! a cookie) and `nonce` are checked; the ID token is verified with the realm's keys, and
//! the access token goes through the same verification and role rules as an API bearer
//! token, so the console grants what the API would.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::html::{self, Nav, q};
use super::session::{self, random_token};
use super::{CQuery, ConsoleError, ConsoleSetupError, SsoRealm, Transport};
use crate::api::AppState;
use crate::api::error::ApiError;
use crate::domain::ProblemCode;

/// How long a browser may take at the IdP.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// Sign-ins under way kept at most (oldest dropped beyond).
const MAX_PENDING: usize = 1_000;
/// The cookie that binds a sign-in's `state` to the browser that started it.
const STATE_COOKIE: &str = "lockstep_console_sso";
/// Bound on each exchange with the IdP.
const TIMEOUT: Duration = Duration::from_secs(10);

struct Pending {
    realm: String,
    verifier: String,
    nonce: String,
    redirect_uri: String,
    created: Instant,
}

#[derive(Clone, Debug, Deserialize)]
struct Endpoints {
    authorization_endpoint: String,
    token_endpoint: String,
}

/// Keycloak sign-in of the realms that have a console client.
pub struct Sso {
    realms: Vec<SsoRealm>,
    client: Option<reqwest::Client>,
    pending: Mutex<HashMap<String, Pending>>,
    endpoints: Mutex<HashMap<String, Endpoints>>,
}

/// The PKCE S256 challenge of a verifier.
fn challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn fail(message: impl Into<String>) -> ConsoleError {
    ApiError::Unauthorized(format!("Keycloak sign-in failed: {}", message.into())).into()
}

impl Sso {
    /// Sign-in for `realms`, reaching their IdPs over HTTPS that trusts `roots`.
    pub fn new(
        realms: Vec<SsoRealm>,
        roots: &crate::oidc::tls::TrustRoots,
    ) -> Result<Self, ConsoleSetupError> {
        let client = if realms.is_empty() {
            None
        } else {
            Some(
                roots
                    .apply(reqwest::Client::builder())
                    .timeout(TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| ConsoleSetupError::Client(e.to_string()))?,
            )
        };
        Ok(Sso {
            realms,
            client,
            pending: Mutex::new(HashMap::new()),
            endpoints: Mutex::new(HashMap::new()),
        })
    }

    /// No Keycloak sign-in.
    pub fn empty() -> Self {
        Sso {
            realms: Vec::new(),
            client: None,
            pending: Mutex::new(HashMap::new()),
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    /// Realms offering the sign-in.
    pub fn realms(&self) -> impl Iterator<Item = &str> {
        self.realms.iter().map(|r| r.realm.as_str())
    }

    fn realm(&self, realm: &str) -> Option<&SsoRealm> {
        self.realms.iter().find(|r| r.realm == realm)
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn endpoints(&self, r: &SsoRealm) -> Result<Endpoints, ConsoleError> {
        if let Some(e) = Self::lock(&self.endpoints).get(&r.realm) {
            return Ok(e.clone());
        }
        let client = self.client.as_ref().ok_or_else(|| fail("no HTTP client"))?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            r.issuer.trim_end_matches('/')
        );
        let e: Endpoints = async {
            client
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
        }
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, realm = %r.realm, "console sign-in: discovery failed");
            ConsoleError::Api(ApiError::Unavailable(format!(
                "the identity provider of realm {} cannot be reached",
                r.realm
            )))
        })?;
        for u in [&e.authorization_endpoint, &e.token_endpoint] {
            crate::oidc::tls::check_url(u).map_err(|e| fail(e.to_string()))?;
        }
        Self::lock(&self.endpoints).insert(r.realm.clone(), e.clone());
        Ok(e)
    }

    fn remember(&self, state: String, p: Pending) {
        let mut map = Self::lock(&self.pending);
        let now = Instant::now();
        map.retain(|_, v| now.saturating_duration_since(v.created) < PENDING_TTL);
        if map.len() >= MAX_PENDING
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, v)| v.created)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(state, p);
    }

    fn take(&self, state: &str) -> Option<Pending> {
        let p = Self::lock(&self.pending).remove(state)?;
        (p.created.elapsed() < PENDING_TTL).then_some(p)
    }
}

/// Where the IdP sends the browser back to.
fn redirect_uri(
    console: &super::Console,
    transport: &Transport,
    host: Option<&str>,
) -> Result<String, ConsoleError> {
    if let Some(base) = &console.public_url {
        return Ok(format!("{base}/console/sso/callback"));
    }
    let host = host
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        })
        .ok_or_else(|| ApiError::Validation("the request has no usable Host header".into()))?;
    let scheme = if transport.secure { "https" } else { "http" };
    Ok(format!("{scheme}://{host}/console/sso/callback"))
}

#[derive(Deserialize)]
pub struct StartParams {
    realm: String,
}

/// Sends the browser to the realm's IdP.
pub async fn start(
    State(state): State<AppState>,
    transport: Transport,
    headers: axum::http::HeaderMap,
    CQuery(params): CQuery<StartParams>,
) -> Result<Response, ConsoleError> {
    let console = super::console(&state)?;
    let realm = console.sso.realm(&params.realm).ok_or_else(|| {
        ApiError::refused(
            ProblemCode::NotFound,
            format!(
                "realm {:?} offers no Keycloak sign-in (console_client_id)",
                params.realm
            ),
        )
    })?;
    let endpoints = console.sso.endpoints(realm).await?;
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let redirect = redirect_uri(console, &transport, host)?;
    let (st, nonce, verifier) = (random_token(), random_token(), random_token());
    let url = format!(
        "{}{}response_type=code&client_id={}&redirect_uri={}&scope=openid&state={}&nonce={}&code_challenge={}&code_challenge_method=S256",
        endpoints.authorization_endpoint,
        if endpoints.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        },
        q(&realm.client_id),
        q(&redirect),
        q(&st),
        q(&nonce),
        q(&challenge(&verifier))
    );
    console.sso.remember(
        st.clone(),
        Pending {
            realm: realm.realm.clone(),
            verifier,
            nonce,
            redirect_uri: redirect,
            created: Instant::now(),
        },
    );
    // Lax, not Strict: the IdP's redirect back is a cross-site navigation.
    let cookie = format!(
        "{STATE_COOKIE}={st}; Path=/console/sso; HttpOnly; SameSite=Lax; Max-Age=600{}",
        if transport.secure { "; Secure" } else { "" }
    );
    Ok((
        StatusCode::SEE_OTHER,
        [(header::LOCATION, url), (header::SET_COOKIE, cookie)],
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    id_token: String,
}

/// The IdP's answer: checks state, exchanges the code (with the PKCE verifier), verifies
/// both tokens, and signs in as the access token's principal.
pub async fn callback(
    State(state): State<AppState>,
    transport: Transport,
    headers: axum::http::HeaderMap,
    CQuery(params): CQuery<CallbackParams>,
) -> Result<Response, ConsoleError> {
    let console = super::console(&state)?;
    if let Some(e) = params.error {
        return Err(fail(format!(
            "{e}{}",
            params
                .error_description
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        )));
    }
    let (Some(code), Some(st)) = (params.code, params.state) else {
        return Err(ApiError::Validation("code and state are required".into()).into());
    };
    let bound = session::cookie(super::cookie_header(&headers), STATE_COOKIE).unwrap_or("");
    if !session::tokens_match(&st, bound) {
        return Err(fail(
            "this browser did not start that sign-in (state mismatch)",
        ));
    }
    let pending = console
        .sso
        .take(&st)
        .ok_or_else(|| fail("the sign-in expired or was already used; start again"))?;
    let realm = console
        .sso
        .realm(&pending.realm)
        .ok_or_else(|| fail("the realm no longer offers Keycloak sign-in"))?;
    let endpoints = console.sso.endpoints(realm).await?;
    let client = console
        .sso
        .client
        .as_ref()
        .ok_or_else(|| fail("no HTTP client"))?;
    let res = client
        .post(&endpoints.token_endpoint)
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", pending.redirect_uri.as_str()),
            ("client_id", realm.client_id.as_str()),
            ("code_verifier", pending.verifier.as_str()),
        ])
        .send()
        .await
        .map_err(|e| fail(format!("token request: {e}")))?;
    if !res.status().is_success() {
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        tracing::info!(%status, body = %text.chars().take(300).collect::<String>(), "console sign-in: code exchange refused");
        return Err(fail(format!(
            "the identity provider refused the code ({status})"
        )));
    }
    let tokens: TokenResponse = res
        .json()
        .await
        .map_err(|e| fail(format!("token response: {e}")))?;
    state
        .oidc
        .verify_id_token(
            &realm.realm,
            &tokens.id_token,
            &realm.client_id,
            &pending.nonce,
        )
        .await
        .map_err(|e| fail(format!("ID token: {e}")))?;
    let principal = state
        .oidc
        .verify_access(&tokens.access_token)
        .await
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("the access token is not from a configured issuer"))?;
    let mut res = super::actions::signed_in(console, &transport, principal);
    // The IdP's redirect was cross-site, so a Strict cookie set now would not go with an
    // immediate redirect: a page of ours moves on instead (a same-site navigation).
    let body = html::page(
        "Signed in",
        Nav::None,
        &html::Chrome {
            actor: None,
            csrf: None,
            flash: None,
        },
        "<meta http-equiv=\"refresh\" content=\"0;url=/console/\"><p><a href=\"/console/\">Continue to the console</a></p>",
    );
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().remove(header::LOCATION);
    let clear = format!("{STATE_COOKIE}=; Path=/console/sso; HttpOnly; SameSite=Lax; Max-Age=0");
    if let Ok(v) = header::HeaderValue::from_str(&clear) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    *res.body_mut() = axum::body::Body::from(body);
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pkce_challenge_is_s256() {
        // RFC 7636, appendix B.
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn a_pending_sign_in_is_used_once() {
        let sso = Sso::empty();
        sso.remember(
            "s".into(),
            Pending {
                realm: "acme".into(),
                verifier: "v".into(),
                nonce: "n".into(),
                redirect_uri: "http://x/cb".into(),
                created: Instant::now(),
            },
        );
        assert!(sso.take("s").is_some());
        assert!(sso.take("s").is_none());
    }
}
