//! The Keycloak connector: when Lockstep ends a PARENT session (a logout in a legacy system,
//! `destroy-parent`, `destroy-user`, expiry...), it ends the Keycloak user session the PARENT
//! is mapped to, through the Admin REST API
//! (`DELETE {base_url}/admin/realms/{realm}/sessions/{idp-session-id}`), with an access token
//! of a service account obtained by the client-credentials grant.
//!
//! Config (`[config]` in the manifest):
//! - `base_url` (required): Keycloak's base URL, e.g. `https://sso.example.com` (with any path
//!   prefix such as `/auth`); its origin must be in the manifest's `allowed_hosts`.
//! - `realm` (optional): the Keycloak realm; default: the event's realm.
//! - `client_id`, `client_secret` (required): a confidential client with service accounts
//!   enabled whose service account holds the `realm-management` client role `manage-users`.
//! - `token_url` (optional): default `{base_url}/realms/{realm}/protocol/openid-connect/token`.
//! - `idp_system` (optional, default `keycloak`): events whose `origin-system` is this came
//!   from Keycloak itself (a back-channel logout) and are skipped, so a logout never
//!   ping-pongs back to the IdP that reported it.
//! - `timeout_ms` (optional, default 5000): connect and first-byte timeout of each request.
//!
//! Hooks: `on-logout` and `revoke` (a revocation ends the Keycloak session too) act on PARENT
//! events that carry an `idp-session-id` and did not come from `idp_system`; every other
//! event, `on-login` and `on-refresh` have nothing to do and succeed.
//!
//! The access token is kept in the host's cache (per connector version) for its
//! `expires_in` minus 30 s, so a burst of logouts costs one token request. If Keycloak
//! answers 401 to a cached token, the token is dropped and the call tries once more with a
//! fresh one.
//!
//! Outcomes: 2xx ends the session; 404 means it was already gone (success); 401 with a fresh
//! token, 408, 429, 5xx and network failures ask for a retry; 403 (the service account lacks
//! `manage-users`) and other statuses fail permanently. At the token endpoint, 5xx, 408, 429
//! and network failures ask for a retry and 4xx (wrong client credentials) fails. Log lines
//! never contain the client secret or a token.

use std::time::Duration;

use lockstep_connector::{
    Connector, HookError, SessionEvent, SessionKind, cache, config, http, log,
};

/// `origin-system` of events that came from Keycloak itself (Lockstep's back-channel logout
/// receiver uses this name by default).
const DEFAULT_IDP_SYSTEM: &str = "keycloak";
/// Default connect/first-byte timeout of each request.
const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// A cached token is dropped this long before Keycloak says it expires, so it is never sent
/// just as it lapses.
const TOKEN_EXPIRY_MARGIN_SECS: u64 = 30;
/// Shortest time a token is cached (unless it lives even shorter).
const MIN_TOKEN_CACHE_SECS: u64 = 5;
/// Most characters of a response body quoted in an error message.
const MAX_QUOTED_BODY: usize = 300;

struct Keycloak;

impl Connector for Keycloak {
    fn on_logout(event: SessionEvent) -> Result<(), HookError> {
        end_keycloak_session(&event)
    }

    /// A revocation ends the Keycloak session as a logout does: the user's grants are gone,
    /// so their SSO session must not outlive them.
    fn revoke(event: SessionEvent) -> Result<(), HookError> {
        end_keycloak_session(&event)
    }

    /// A longer session in Lockstep changes nothing in Keycloak (Keycloak's own refresh is
    /// usually where the event came from).
    fn on_refresh(event: SessionEvent) -> Result<(), HookError> {
        let _ = event;
        Ok(())
    }
}

lockstep_connector::export_connector!(Keycloak);

/// How a session delete ended, when it succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Keycloak ended the session.
    Now,
    /// Keycloak no longer knew it (404): ended before, by a user, an admin or a redelivery.
    AlreadyGone,
}

fn end_keycloak_session(event: &SessionEvent) -> Result<(), HookError> {
    let idp_system = config::get("idp_system").unwrap_or_else(|| DEFAULT_IDP_SYSTEM.to_owned());
    let sid = match target(event, &idp_system) {
        Ok(sid) => sid,
        Err(why) => {
            log::debug(&format!("nothing to do: {why}"));
            return Ok(());
        }
    };
    let result =
        Settings::from_lookup(config::get, &event.realm).and_then(|s| end_session(&s, sid));
    match &result {
        Ok(Ended::Now) => log::info(&format!("ended Keycloak session {sid}")),
        Ok(Ended::AlreadyGone) => {
            log::info(&format!("Keycloak session {sid} was already gone (404)"));
        }
        Err(HookError::Retry(msg)) => {
            log::warn(&format!(
                "Keycloak session {sid} not ended yet (retryable): {msg}"
            ));
        }
        Err(HookError::Fail(msg)) => {
            log::error(&format!("Keycloak session {sid} cannot be ended: {msg}"));
        }
    }
    result.map(|_| ())
}

/// The Keycloak session to end, or why there is none.
fn target<'e>(event: &'e SessionEvent, idp_system: &str) -> Result<&'e str, String> {
    if event.kind != SessionKind::Parent {
        return Err(format!(
            "a {} session is not mapped to a Keycloak session",
            event.kind.as_str()
        ));
    }
    let Some(sid) = event.idp_session_id.as_deref().filter(|s| !s.is_empty()) else {
        return Err("the PARENT has no Keycloak session id".to_owned());
    };
    if event.origin_system.as_deref() == Some(idp_system) {
        return Err(format!(
            "the change came from {idp_system} itself (origin-system), which already ended it"
        ));
    }
    Ok(sid)
}

/// The connector's `[config]`, validated, for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    base_url: String,
    realm: String,
    client_id: String,
    client_secret: String,
    token_url: String,
    timeout: Duration,
}

impl Settings {
    /// Reads the config through `get` (the host's `config-get`; a map in tests).
    fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
        event_realm: &str,
    ) -> Result<Settings, HookError> {
        let value = |key: &str| {
            get(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let require = |key: &str| {
            value(key).ok_or_else(|| HookError::Fail(format!("config key `{key}` is not set")))
        };
        let base_url = require("base_url")?.trim_end_matches('/').to_owned();
        let realm = value("realm").unwrap_or_else(|| event_realm.to_owned());
        let client_id = require("client_id")?;
        let client_secret = require("client_secret")?;
        let token_url = value("token_url").unwrap_or_else(|| default_token_url(&base_url, &realm));
        let timeout_ms = match value("timeout_ms") {
            None => DEFAULT_TIMEOUT_MS,
            Some(v) => v.parse().map_err(|_| {
                HookError::Fail(format!(
                    "config key `timeout_ms` must be a number, got {v:?}"
                ))
            })?,
        };
        Ok(Settings {
            base_url,
            realm,
            client_id,
            client_secret,
            token_url,
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    /// Where the cached token lives: one per client and token endpoint (without a `realm`
    /// key, events of several realms need tokens of several realms).
    fn cache_key(&self) -> String {
        format!("token:{}@{}", self.client_id, self.token_url)
    }
}

/// `{base}/realms/{realm}/protocol/openid-connect/token`.
fn default_token_url(base_url: &str, realm: &str) -> String {
    format!(
        "{base_url}/realms/{}/protocol/openid-connect/token",
        http::percent_encode(realm)
    )
}

/// `{base}/admin/realms/{realm}/sessions/{sid}`, each segment percent-encoded so an id can
/// never reach another path.
fn session_url(base_url: &str, realm: &str, sid: &str) -> String {
    format!(
        "{base_url}/admin/realms/{}/sessions/{}",
        http::percent_encode(realm),
        http::percent_encode(sid)
    )
}

/// Deletes the session with a cached or fresh token; a cached token that Keycloak rejects
/// (401) is dropped and the delete tried once more with a fresh one.
fn end_session(settings: &Settings, sid: &str) -> Result<Ended, HookError> {
    let url = session_url(&settings.base_url, &settings.realm, sid);
    let key = settings.cache_key();
    let (token, cached) = match cache::get(&key).filter(|t| !t.is_empty()) {
        Some(token) => {
            log::debug("access token from cache");
            (token, true)
        }
        None => (fetch_token(settings, &key)?, false),
    };
    let mut response = delete(&url, &token, settings.timeout)?;
    if response.status == 401 && cached {
        // The host cache has no delete: an empty value that expires at once replaces the
        // token, so it is gone even if fetching a new one fails below.
        cache::set(&key, "", Duration::from_millis(1));
        let token = fetch_token(settings, &key)?;
        response = delete(&url, &token, settings.timeout)?;
    }
    delete_outcome(&response, settings)
}

fn delete(url: &str, token: &str, timeout: Duration) -> Result<http::Response, HookError> {
    Ok(http::Request::delete(url)
        .header("authorization", &format!("Bearer {token}"))
        .timeout(timeout)
        .send()?)
}

/// What the Admin API's answer to a session delete means.
fn delete_outcome(response: &http::Response, settings: &Settings) -> Result<Ended, HookError> {
    let status = response.status;
    match status {
        200..=299 => Ok(Ended::Now),
        404 => Ok(Ended::AlreadyGone),
        401 => Err(HookError::Retry(format!(
            "the Admin API rejected a fresh access token of client `{}` (HTTP 401: {}); is \
             `token_url` ({}) an endpoint of realm `{}`?",
            settings.client_id,
            quote(response),
            settings.token_url,
            settings.realm
        ))),
        403 => Err(HookError::Fail(format!(
            "the service account of client `{}` may not end sessions in realm `{}` (HTTP 403): \
             grant it the `realm-management` client role `manage-users`",
            settings.client_id, settings.realm
        ))),
        408 | 429 | 500.. => Err(HookError::Retry(format!(
            "the Admin API answered HTTP {status}: {}",
            quote(response)
        ))),
        _ => Err(HookError::Fail(format!(
            "the Admin API answered HTTP {status}: {}",
            quote(response)
        ))),
    }
}

/// An access token and how long it may be cached.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    access_token: String,
    cache_for: Option<Duration>,
}

/// Gets a token by the client-credentials grant and caches it.
fn fetch_token(settings: &Settings, key: &str) -> Result<String, HookError> {
    let response = http::Request::post(&settings.token_url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &settings.client_id),
            ("client_secret", &settings.client_secret),
        ])
        .header("accept", "application/json")
        .timeout(settings.timeout)
        .send()?;
    let token = token_outcome(&response, settings)?;
    if let Some(ttl) = token.cache_for {
        cache::set(key, &token.access_token, ttl);
    }
    Ok(token.access_token)
}

/// What the token endpoint's answer means. Only the `error` fields of an error body are
/// quoted (never the request, which carries the secret).
fn token_outcome(response: &http::Response, settings: &Settings) -> Result<Token, HookError> {
    let status = response.status;
    let body = response.json().ok();
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b[name].as_str())
            .map(str::to_owned)
    };
    let error = || {
        let error = field("error").unwrap_or_else(|| "no OAuth error in the body".to_owned());
        match field("error_description") {
            Some(d) => format!("{error}: {d}"),
            None => error,
        }
    };
    match status {
        200..=299 => {
            let access_token = field("access_token").filter(|t| !t.is_empty()).ok_or_else(
                || {
                    HookError::Fail(format!(
                        "the token endpoint {} answered HTTP {status} without an access_token; is \
                     `token_url` right?",
                        settings.token_url
                    ))
                },
            )?;
            let expires_in = body.as_ref().and_then(|b| b["expires_in"].as_u64());
            Ok(Token {
                access_token,
                cache_for: expires_in.and_then(cache_ttl),
            })
        }
        408 | 429 | 500.. => Err(HookError::Retry(format!(
            "the token endpoint {} answered HTTP {status} ({})",
            settings.token_url,
            error()
        ))),
        400..=499 => Err(HookError::Fail(format!(
            "Keycloak refused the client credentials of `{}` at {} (HTTP {status}: {}): check \
             `client_id` and `client_secret`, and that the client is confidential with service \
             accounts enabled",
            settings.client_id,
            settings.token_url,
            error()
        ))),
        _ => Err(HookError::Fail(format!(
            "the token endpoint {} answered HTTP {status}; is `token_url` right?",
            settings.token_url
        ))),
    }
}

/// How long to cache a token that lives `expires_in` seconds: 30 s less, but at least a few
/// seconds (never longer than it lives); not at all when it is already expired.
fn cache_ttl(expires_in: u64) -> Option<Duration> {
    if expires_in == 0 {
        return None;
    }
    let secs = expires_in
        .saturating_sub(TOKEN_EXPIRY_MARGIN_SECS)
        .max(MIN_TOKEN_CACHE_SECS.min(expires_in));
    Some(Duration::from_secs(secs))
}

/// The start of a response body, for an error message.
fn quote(response: &http::Response) -> String {
    let text = response.text();
    let text = text.trim();
    if text.is_empty() {
        return "empty body".to_owned();
    }
    match text.char_indices().nth(MAX_QUOTED_BODY) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lockstep_connector::EventType;

    use super::*;

    fn event(kind: SessionKind, sid: Option<&str>, origin: Option<&str>) -> SessionEvent {
        SessionEvent {
            event_id: "0190-event".into(),
            event_type: EventType::Logout,
            realm: "acme".into(),
            external_id: "portal-session-001".into(),
            kind,
            idp_session_id: sid.map(str::to_owned),
            idp_client_session_id: None,
            user_id: Some("alice".into()),
            system: Some("portal".into()),
            origin_system: origin.map(str::to_owned),
            end_reason: Some("logout".into()),
            attributes: Vec::new(),
            occurred_at: "2025-01-01T00:00:00Z".into(),
            expires_at: None,
        }
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, HookError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned(), "acme")
    }

    fn base() -> Settings {
        settings(&[
            ("base_url", "http://127.0.0.1:18180/"),
            ("client_id", "lockstep"),
            ("client_secret", "s3cret"),
        ])
        .unwrap()
    }

    fn response(status: u16, body: &str) -> http::Response {
        http::Response {
            status,
            body: body.as_bytes().to_vec(),
        }
    }

    fn is_retry(r: &Result<impl std::fmt::Debug, HookError>) -> bool {
        matches!(r, Err(HookError::Retry(_)))
    }

    fn is_fail(r: &Result<impl std::fmt::Debug, HookError>) -> bool {
        matches!(r, Err(HookError::Fail(_)))
    }

    fn message<T: std::fmt::Debug>(r: Result<T, HookError>) -> String {
        match r {
            Err(HookError::Retry(m) | HookError::Fail(m)) => m,
            Ok(v) => panic!("expected an error, got {v:?}"),
        }
    }

    #[test]
    fn only_parent_logouts_with_a_keycloak_session_from_elsewhere_are_targets() {
        let parent = event(SessionKind::Parent, Some("kc-sid-1"), Some("portal"));
        assert_eq!(target(&parent, "keycloak"), Ok("kc-sid-1"));
        let no_origin = event(SessionKind::Parent, Some("kc-sid-1"), None);
        assert_eq!(target(&no_origin, "keycloak"), Ok("kc-sid-1"));

        let from_keycloak = event(SessionKind::Parent, Some("kc-sid-1"), Some("keycloak"));
        assert!(target(&from_keycloak, "keycloak").is_err(), "no ping-pong");
        assert!(
            target(&parent, "portal").is_err(),
            "idp_system is configurable"
        );
        for kind in [SessionKind::Child, SessionKind::Fixed] {
            assert!(target(&event(kind, Some("kc-sid-1"), Some("portal")), "keycloak").is_err());
        }
        for sid in [None, Some("")] {
            assert!(target(&event(SessionKind::Parent, sid, Some("portal")), "keycloak").is_err());
        }
    }

    #[test]
    fn settings_default_the_realm_and_token_url_and_require_credentials() {
        let s = base();
        assert_eq!(
            s.base_url, "http://127.0.0.1:18180",
            "trailing slash dropped"
        );
        assert_eq!(s.realm, "acme", "the event's realm");
        assert_eq!(
            s.token_url,
            "http://127.0.0.1:18180/realms/acme/protocol/openid-connect/token"
        );
        assert_eq!(s.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));

        let s = settings(&[
            ("base_url", "https://sso.example.com/auth"),
            ("realm", "other realm"),
            ("client_id", "lockstep"),
            ("client_secret", "s3cret"),
            ("timeout_ms", "1500"),
        ])
        .unwrap();
        assert_eq!(
            s.token_url,
            "https://sso.example.com/auth/realms/other%20realm/protocol/openid-connect/token"
        );
        assert_eq!(s.timeout, Duration::from_millis(1500));

        let s = settings(&[
            ("base_url", "http://kc"),
            ("client_id", "c"),
            ("client_secret", "s"),
            ("token_url", "http://idp/token"),
        ])
        .unwrap();
        assert_eq!(s.token_url, "http://idp/token");

        for missing in ["base_url", "client_id", "client_secret"] {
            let pairs: Vec<(&str, &str)> = [
                ("base_url", "http://kc"),
                ("client_id", "c"),
                ("client_secret", "s"),
            ]
            .into_iter()
            .map(|(k, v)| if k == missing { (k, " ") } else { (k, v) })
            .collect();
            let err = message(settings(&pairs));
            assert!(err.contains(missing), "{err}");
        }
        assert!(is_fail(&settings(&[
            ("base_url", "http://kc"),
            ("client_id", "c"),
            ("client_secret", "s"),
            ("timeout_ms", "soon"),
        ])));
    }

    #[test]
    fn session_urls_percent_encode_each_segment() {
        assert_eq!(
            session_url("http://127.0.0.1:18180", "acme", "3f2a-41c9"),
            "http://127.0.0.1:18180/admin/realms/acme/sessions/3f2a-41c9"
        );
        assert_eq!(
            session_url("http://kc", "a/b", "../../users?x=1#y"),
            "http://kc/admin/realms/a%2Fb/sessions/..%2F..%2Fusers%3Fx%3D1%23y"
        );
    }

    #[test]
    fn cache_keys_differ_per_client_and_token_endpoint() {
        let a = base();
        let mut b = base();
        b.token_url = default_token_url(&b.base_url, "other");
        let mut c = base();
        c.client_id = "other".into();
        assert_ne!(a.cache_key(), b.cache_key());
        assert_ne!(a.cache_key(), c.cache_key());
        assert!(!a.cache_key().contains("s3cret"));
    }

    #[test]
    fn delete_statuses_map_to_success_retry_or_fail() {
        let s = base();
        assert!(matches!(
            delete_outcome(&response(204, ""), &s),
            Ok(Ended::Now)
        ));
        assert!(matches!(
            delete_outcome(&response(200, "{}"), &s),
            Ok(Ended::Now)
        ));
        assert!(matches!(
            delete_outcome(&response(404, r#"{"error":"Session not found"}"#), &s),
            Ok(Ended::AlreadyGone)
        ));
        for status in [401, 408, 429, 500, 502, 503, 504] {
            assert!(
                is_retry(&delete_outcome(&response(status, ""), &s)),
                "{status}"
            );
        }
        let forbidden = message(delete_outcome(&response(403, ""), &s));
        assert!(forbidden.contains("manage-users"), "{forbidden}");
        assert!(forbidden.contains("lockstep"), "{forbidden}");
        for status in [301, 400, 403, 405, 409, 415] {
            assert!(
                is_fail(&delete_outcome(&response(status, ""), &s)),
                "{status}"
            );
        }
    }

    #[test]
    fn token_responses_give_a_token_or_the_right_error() {
        let s = base();
        let ok = token_outcome(
            &response(
                200,
                r#"{"access_token":"eyJ.x.y","expires_in":300,"token_type":"Bearer"}"#,
            ),
            &s,
        )
        .unwrap();
        assert_eq!(ok.access_token, "eyJ.x.y");
        assert_eq!(ok.cache_for, Some(Duration::from_secs(270)));

        let no_expiry = token_outcome(&response(200, r#"{"access_token":"t"}"#), &s).unwrap();
        assert_eq!(no_expiry.cache_for, None, "unknown lifetime: not cached");

        assert!(is_fail(&token_outcome(&response(200, "<html>"), &s)));
        assert!(is_fail(&token_outcome(
            &response(200, r#"{"access_token":""}"#),
            &s
        )));

        let bad_creds = message(token_outcome(
            &response(
                401,
                r#"{"error":"unauthorized_client","error_description":"Invalid client or Invalid client credentials"}"#,
            ),
            &s,
        ));
        assert!(bad_creds.contains("client credentials"), "{bad_creds}");
        assert!(
            bad_creds.contains("Invalid client credentials"),
            "{bad_creds}"
        );
        assert!(!bad_creds.contains("s3cret"), "{bad_creds}");
        assert!(is_fail(&token_outcome(&response(400, "{}"), &s)));

        for status in [408, 429, 500, 503] {
            assert!(
                is_retry(&token_outcome(&response(status, "oops"), &s)),
                "{status}"
            );
        }
    }

    #[test]
    fn tokens_are_cached_30_s_short_of_their_expiry_but_a_few_seconds_at_least() {
        assert_eq!(cache_ttl(300), Some(Duration::from_secs(270)));
        assert_eq!(cache_ttl(60), Some(Duration::from_secs(30)));
        assert_eq!(cache_ttl(31), Some(Duration::from_secs(5)));
        assert_eq!(cache_ttl(20), Some(Duration::from_secs(5)));
        assert_eq!(cache_ttl(3), Some(Duration::from_secs(3)));
        assert_eq!(cache_ttl(0), None);
    }

    #[test]
    fn quoted_bodies_are_trimmed_and_bounded() {
        assert_eq!(quote(&response(500, "  \n")), "empty body");
        assert_eq!(quote(&response(500, " busy ")), "busy");
        let long = "é".repeat(MAX_QUOTED_BODY + 10);
        let quoted = quote(&response(500, &long));
        assert_eq!(quoted.chars().count(), MAX_QUOTED_BODY + 3);
    }
}
