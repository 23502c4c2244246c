//! The operator console at `/console/`: server-rendered pages over the same services, the
//! same authorisation (`auth::Principal::authorize`) and the same audit records as the admin
//! API, for people who would rather look than curl. A sign-in (admin token, API key, or
//! Keycloak for realms with a console client) becomes an in-memory console session named by
//! an `HttpOnly; SameSite=Strict` cookie; every form carries the session's CSRF token; every
//! response carries a script-free CSP and no-store caching. Assets are compiled in.

mod actions;
pub mod html;
mod live;
mod pages;
pub mod session;
mod sso;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::auth::{AuthError, Principal};
use crate::domain::ProblemCode;
use html::{Chrome, Nav};
use session::{Lifetimes, Sessions, SignedIn};

/// Default of `[console] idle_timeout_s`.
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 30 * 60;
/// Default of `[console] absolute_timeout_s`.
pub const DEFAULT_ABSOLUTE_TIMEOUT_S: u64 = 12 * 60 * 60;

/// `[console]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the console (default true).
    pub enabled: Option<bool>,
    /// Seconds a console sign-in lasts without a request (default 1800).
    pub idle_timeout_s: Option<u64>,
    /// Seconds a console sign-in lasts at most (default 43200).
    pub absolute_timeout_s: Option<u64>,
    /// Addresses of reverse proxies whose `X-Forwarded-Proto: https` is believed (the
    /// session cookie is then `Secure`). Nobody else's is: a client could claim anything.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The URL browsers reach the service at (`https://lockstep.example.com`): the base of
    /// the Keycloak sign-in's redirect URI, and `Secure` cookies when it is HTTPS. Without
    /// it the redirect URI is built from the request's `Host`.
    pub public_url: Option<String>,
}

/// Why the console cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleSetupError {
    /// A `[console]` value breaks a rule.
    #[error("[console] {0}")]
    Invalid(String),
    /// The HTTP client for Keycloak sign-in could not be built.
    #[error("console sign-in with Keycloak: {0}")]
    Client(String),
}

/// A realm whose operators can sign in with its identity provider.
#[derive(Clone, Debug)]
pub struct SsoRealm {
    /// Realm.
    pub realm: String,
    /// Its issuer (discovery is under it).
    pub issuer: String,
    /// The public client the console signs in with.
    pub client_id: String,
}

/// The console's state: sign-ins, trusted proxies, Keycloak sign-in.
pub struct Console {
    sessions: Sessions,
    live: live::LiveCache,
    trusted_proxies: Vec<IpAddr>,
    public_url: Option<String>,
    sso: sso::Sso,
}

impl Console {
    /// The console `config` describes, `None` when it is switched off.
    pub fn from_config(
        config: &ConsoleConfig,
        sso_realms: Vec<SsoRealm>,
        roots: &crate::oidc::tls::TrustRoots,
    ) -> Result<Option<Self>, ConsoleSetupError> {
        if config.enabled == Some(false) {
            return Ok(None);
        }
        let secs = |v: Option<u64>, default: u64, key: &str| match v.unwrap_or(default) {
            0 => Err(ConsoleSetupError::Invalid(format!(
                "{key} must be at least 1"
            ))),
            s => Ok(Duration::from_secs(s)),
        };
        let lifetimes = Lifetimes {
            idle: secs(
                config.idle_timeout_s,
                DEFAULT_IDLE_TIMEOUT_S,
                "idle_timeout_s",
            )?,
            absolute: secs(
                config.absolute_timeout_s,
                DEFAULT_ABSOLUTE_TIMEOUT_S,
                "absolute_timeout_s",
            )?,
        };
        let trusted_proxies = config
            .trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<IpAddr>().map_err(|_| {
                    ConsoleSetupError::Invalid(format!(
                        "trusted_proxies: {p:?} is not an IP address"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let public_url = match &config.public_url {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => {
                Some(u.trim_end_matches('/').to_owned())
            }
            Some(u) => {
                return Err(ConsoleSetupError::Invalid(format!(
                    "public_url {u:?} must start with https:// or http://"
                )));
            }
            None => None,
        };
        Ok(Some(Console {
            sessions: Sessions::new(lifetimes),
            live: live::LiveCache::default(),
            trusted_proxies,
            public_url,
            sso: sso::Sso::new(sso_realms, roots)?,
        }))
    }

    /// A console with defaults and no Keycloak sign-in (in-process tests).
    pub fn for_tests() -> Self {
        Console {
            sessions: Sessions::new(Lifetimes {
                idle: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_S),
                absolute: Duration::from_secs(DEFAULT_ABSOLUTE_TIMEOUT_S),
            }),
            live: live::LiveCache::default(),
            trusted_proxies: Vec::new(),
            public_url: None,
            sso: sso::Sso::empty(),
        }
    }

    /// Whether the browser reached us over HTTPS: the public URL says so, or a trusted proxy
    /// in front of us does.
    fn secure(&self, parts: &Parts) -> bool {
        if self
            .public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
        {
            return true;
        }
        peer(parts).is_some_and(|ip| self.trusted_proxies.contains(&ip))
            && parts
                .headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                // The proxy nearest to us appends last.
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
    }
}

/// The client's address, as `api::serve` records it.
fn peer(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// How the request reached us: the client's address and whether over HTTPS.
pub struct Transport {
    /// The client (or the proxy in front of it).
    pub peer: Option<IpAddr>,
    /// Cookies get `Secure`.
    pub secure: bool,
}

impl FromRequestParts<AppState> for Transport {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let console = console(state)?;
        Ok(Transport {
            peer: peer(parts),
            secure: console.secure(parts),
        })
    }
}

/// Query parameters; a malformed query is a 400 page.
pub struct CQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for CQuery<T> {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(v)| CQuery(v))
            .map_err(|e| ApiError::Validation(format!("invalid query: {}", e.body_text())).into())
    }
}

/// Path parameters; a malformed path is a 400 page.
pub struct CPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for CPath<T> {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| CPath(v))
            .map_err(|e| ApiError::Validation(format!("invalid path: {}", e.body_text())).into())
    }
}

/// The console's routes (merged into [`crate::api::app`]).
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(pages::overview))
        .route("/console/overview/live", get(pages::overview_live))
        .route("/console/login", get(pages::login).post(actions::login))
        .route("/console/logout", post(actions::logout))
        .route("/console/sso/start", get(sso::start))
        .route("/console/sso/callback", get(sso::callback))
        .route("/console/sessions", get(pages::sessions))
        .route("/console/tree", get(pages::tree))
        .route(
            "/console/destroy",
            get(pages::destroy_confirm).post(actions::destroy),
        )
        .route("/console/receipt", get(pages::session_receipt))
        .route("/console/receipts", get(pages::user_receipts))
        .route("/console/connectors", get(pages::connectors))
        .route("/console/connectors/{name}", get(pages::connector))
        .route("/console/connectors/{name}/enable", post(actions::enable))
        .route("/console/connectors/{name}/disable", post(actions::disable))
        .route(
            "/console/upload",
            get(pages::upload)
                .post(actions::upload)
                .layer(DefaultBodyLimit::max(
                    crate::api::connectors::MAX_UPLOAD_BYTES,
                )),
        )
        .route("/console/deliveries", get(pages::deliveries))
        .route("/console/deliveries/{id}", get(pages::delivery))
        .route("/console/replay", post(actions::replay))
        .route("/console/audit", get(pages::audit))
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .route("/console/{*rest}", get(not_found).post(not_found))
        .layer(axum::middleware::map_response(security_headers))
}

/// The script-free policy of every console response.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                       frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    res
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
        .into_response()
}

async fn not_found() -> ConsoleError {
    ConsoleError::Api(ApiError::refused(
        ProblemCode::NotFound,
        "no such console page".into(),
    ))
}

/// What a console page can fail with; rendered as an HTML page with the API's status.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No live sign-in: the browser is sent to the sign-in page.
    #[error("sign in first")]
    SignIn,
    /// A form without this sign-in's CSRF token.
    #[error(
        "the form is stale or was not sent by this console (CSRF token mismatch); reload the page and try again"
    )]
    Csrf,
    /// Anything the API would answer with.
    #[error(transparent)]
    Api(#[from] ApiError),
}

macro_rules! via_api {
    ($($t:ty),*) => {$(
        impl From<$t> for ConsoleError {
            fn from(e: $t) -> Self {
                ConsoleError::Api(e.into())
            }
        }
    )*};
}
via_api!(
    AuthError,
    crate::sync::sessions::SessionError,
    crate::store::StoreError,
    crate::lifecycle::ManageError,
    crate::domain::rules::ValidationError
);

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            ConsoleError::SignIn => return Redirect::to("/console/login").into_response(),
            ConsoleError::Csrf => (StatusCode::FORBIDDEN, self.to_string()),
            ConsoleError::Api(e) => {
                let (status, _) = e.status_and_code();
                let message = if status.is_server_error() {
                    // The cause is logged where it was converted; the page says no more.
                    "Lockstep could not answer this request (an internal error or the \
                     database is unavailable); try again shortly"
                        .to_owned()
                } else {
                    e.to_string()
                };
                (status, message)
            }
        };
        let title = status.canonical_reason().unwrap_or("Error");
        let body = format!(
            "<p class=\"error\" role=\"alert\">{}</p><p><a href=\"/console/\">Back to the overview</a></p>",
            html::esc(&message)
        );
        let page = html::page(
            &format!("{} {title}", status.as_u16()),
            Nav::None,
            &Chrome {
                actor: None,
                csrf: None,
                flash: None,
            },
            &body,
        );
        let mut res = (status, axum::response::Html(page)).into_response();
        if let ConsoleError::Api(ApiError::RateLimited {
            retry_after_secs, ..
        }) = &self
            && let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            res.headers_mut().insert(header::RETRY_AFTER, v);
        }
        res
    }
}

/// The signed-in viewer of a console page.
pub struct Viewer {
    /// Who.
    pub principal: Principal,
    /// The sign-in's cookie value (to leave a flash message or sign out).
    pub id: String,
    /// The sign-in's CSRF token.
    pub csrf: String,
    /// A message from the previous action.
    pub flash: Option<String>,
}

impl Viewer {
    /// The layout's view of the viewer.
    pub fn chrome(&self) -> Chrome<'_> {
        Chrome {
            actor: Some(self.principal.name()),
            csrf: Some(&self.csrf),
            flash: self.flash.as_deref(),
        }
    }

    /// Refuses a form that does not carry this sign-in's token.
    pub fn check_csrf(&self, given: &str) -> Result<(), ConsoleError> {
        if session::tokens_match(&self.csrf, given) {
            Ok(())
        } else {
            Err(ConsoleError::Csrf)
        }
    }
}

fn console(state: &AppState) -> Result<&Arc<Console>, ConsoleError> {
    state.console.as_ref().ok_or_else(|| {
        ConsoleError::Api(ApiError::refused(
            ProblemCode::NotFound,
            "the console is switched off".into(),
        ))
    })
}

fn cookie_header(headers: &HeaderMap) -> &str {
    headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let console = console(state)?;
        let id = session::cookie(cookie_header(&parts.headers), session::COOKIE)
            .ok_or(ConsoleError::SignIn)?
            .to_owned();
        let SignedIn {
            principal,
            csrf,
            flash,
        } = console
            .sessions
            .get(&id, Instant::now())
            .ok_or(ConsoleError::SignIn)?;
        // The same per-caller budget as the API's.
        if let Some(limiter) = &state.rate_limit
            && let Err(wait) = limiter.check(&principal.actor(), Instant::now())
        {
            return Err(ApiError::RateLimited {
                detail: format!(
                    "too many requests from {}: the limit is {} per caller ([limits] requests_per_second)",
                    principal.actor(),
                    limiter.describe()
                ),
                retry_after_secs: crate::api::limits::retry_after_secs(wait),
            }
            .into());
        }
        Ok(Viewer {
            principal,
            id,
            csrf,
            flash,
        })
    }
}

/// Largest form body (everything but uploads).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// A URL-encoded form body, at most [`MAX_FORM_BYTES`].
async fn read_form<T: DeserializeOwned>(req: Request) -> Result<T, ConsoleError> {
    if !crate::api::extract::is_form(req.headers()) {
        return Err(ApiError::UnsupportedMediaType(
            "a console form is sent as application/x-www-form-urlencoded".into(),
        )
        .into());
    }
    let bytes = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|e| {
            crate::api::extract::unreadable_body(&e, || {
                ApiError::PayloadTooLarge(format!("a form may be at most {MAX_FORM_BYTES} bytes"))
            })
        })?;
    serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| ApiError::Validation(format!("malformed form: {e}")).into())
}

/// Sends the browser to `to` after a form (so a reload does not post again).
fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(peer: &str, proto: Option<&str>) -> Parts {
        let mut req = axum::http::Request::builder().uri("/console/");
        if let Some(p) = proto {
            req = req.header("x-forwarded-proto", p);
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        let addr: std::net::SocketAddr = format!("{peer}:5000").parse().unwrap();
        parts.extensions.insert(axum::extract::ConnectInfo(addr));
        parts
    }

    #[test]
    fn only_a_trusted_proxy_makes_cookies_secure() {
        let mut console = Console::for_tests();
        console.trusted_proxies = vec!["10.0.0.1".parse().unwrap()];
        assert!(console.secure(&parts("10.0.0.1", Some("https"))));
        assert!(console.secure(&parts("10.0.0.1", Some("http, https"))));
        assert!(!console.secure(&parts("10.0.0.1", Some("http"))));
        assert!(
            !console.secure(&parts("10.0.0.2", Some("https"))),
            "untrusted"
        );
        assert!(!console.secure(&parts("10.0.0.1", None)));
        console.public_url = Some("https://lockstep.example.com".into());
        assert!(console.secure(&parts("10.0.0.2", None)));
    }

    #[test]
    fn settings_are_checked() {
        let roots = crate::oidc::tls::TrustRoots::load(None).unwrap();
        let off = ConsoleConfig {
            enabled: Some(false),
            ..ConsoleConfig::default()
        };
        assert!(
            Console::from_config(&off, vec![], &roots)
                .unwrap()
                .is_none()
        );
        let bad = ConsoleConfig {
            trusted_proxies: vec!["proxy.local".into()],
            ..ConsoleConfig::default()
        };
        assert!(Console::from_config(&bad, vec![], &roots).is_err());
        let zero = ConsoleConfig {
            idle_timeout_s: Some(0),
            ..ConsoleConfig::default()
        };
        assert!(Console::from_config(&zero, vec![], &roots).is_err());
        assert!(
            Console::from_config(&ConsoleConfig::default(), vec![], &roots)
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn every_response_carries_the_security_headers() {
        let res = security_headers(ConsoleError::Csrf.into_response()).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        let h = res.headers();
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        assert!(!CSP.contains("unsafe-inline"));
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
    }
}
