//! Keycloak's Admin REST API as the reconciler uses it: a client-credentials token (kept until
//! shortly before it expires) and the sessions Keycloak holds for a user. Every request, token
//! requests included, first waits its turn at a [`Pacer`], so the calls per second stay
//! within `[realms.NAME.reconcile] calls_per_second`. Knows no routes and no SQL.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use super::tls::{self, TrustRoots};
use crate::config::RealmConfig;

/// Default of `[realms.NAME.reconcile] interval_s`.
pub const DEFAULT_INTERVAL_S: u64 = 300;
/// Default of `calls_per_second`.
pub const DEFAULT_CALLS_PER_SECOND: u32 = 5;
/// Default of `batch`.
pub const DEFAULT_BATCH: u32 = 100;
/// Largest `batch`.
pub const MAX_BATCH: u32 = 1_000;
/// Default of `timeout_ms`.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// A secret that never reaches a log line through `Debug`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A realm's reconciliation settings, validated from `[realms.NAME.reconcile]`.
#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// Lockstep realm.
    pub realm: String,
    /// Keycloak's address: the issuer without `/realms/{name}` (a context path such as
    /// `/auth` stays).
    pub base_url: String,
    /// Keycloak's realm: the last segment of the issuer (URL-encoded as written there).
    pub kc_realm: String,
    /// Confidential client with a service account.
    pub client_id: String,
    /// Its secret.
    pub client_secret: Secret,
    /// Pause between passes; `None`: only `lockstep reconcile` runs a pass.
    pub interval: Option<Duration>,
    /// Calls to Keycloak per second at most.
    pub calls_per_second: u32,
    /// PARENTs read per batch.
    pub batch: u32,
    /// Bound of one call to Keycloak.
    pub timeout: Duration,
}

impl AdminSettings {
    /// The realm's settings, or `None` when it has no `reconcile` table. Reads the secret from
    /// its file or environment variable now, so a missing one stops the start.
    pub fn from_config(realm: &str, c: &RealmConfig) -> Result<Option<Self>, String> {
        let Some(r) = &c.reconcile else {
            return Ok(None);
        };
        let key = |k: &str| format!("[realms.{realm}.reconcile] {k}");
        let issuer = c.issuer.as_deref().ok_or_else(|| {
            format!("[realms.{realm}.reconcile] needs the realm's issuer (Keycloak's address)")
        })?;
        tls::check_url(issuer).map_err(|e| format!("[realms.{realm}] issuer {e}"))?;
        let (base_url, kc_realm) = split_issuer(issuer)
            .ok_or_else(|| format!("[realms.{realm}] issuer {issuer:?} does not end in /realms/NAME, so it names no Keycloak realm"))?;
        if r.client_id.is_empty() {
            return Err(format!("{} must not be empty", key("client_id")));
        }
        let secret = match (
            &r.client_secret,
            &r.client_secret_file,
            &r.client_secret_env,
        ) {
            (Some(s), None, None) => s.clone(),
            (None, Some(path), None) => std::fs::read_to_string(path)
                .map_err(|e| format!("{} {}: {e}", key("client_secret_file"), path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            (None, None, Some(var)) => std::env::var(var).map_err(|_| {
                format!(
                    "{}: environment variable {var} is not set",
                    key("client_secret_env")
                )
            })?,
            _ => {
                return Err(format!(
                    "[realms.{realm}.reconcile] needs exactly one of client_secret, \
                     client_secret_file, client_secret_env"
                ));
            }
        };
        if secret.is_empty() {
            return Err(format!(
                "[realms.{realm}.reconcile] the client secret is empty"
            ));
        }
        let calls_per_second = r.calls_per_second.unwrap_or(DEFAULT_CALLS_PER_SECOND);
        if calls_per_second == 0 {
            return Err(format!("{} must be at least 1", key("calls_per_second")));
        }
        let batch = r.batch.unwrap_or(DEFAULT_BATCH);
        if batch == 0 || batch > MAX_BATCH {
            return Err(format!("{} must be 1-{MAX_BATCH}", key("batch")));
        }
        let timeout_ms = r.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout_ms == 0 {
            return Err(format!("{} must be at least 1", key("timeout_ms")));
        }
        Ok(Some(AdminSettings {
            realm: realm.to_owned(),
            base_url,
            kc_realm,
            client_id: r.client_id.clone(),
            client_secret: Secret(secret),
            interval: Some(r.interval_s.unwrap_or(DEFAULT_INTERVAL_S))
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
            calls_per_second,
            batch,
            timeout: Duration::from_millis(timeout_ms),
        }))
    }
}

/// `https://sso/auth/realms/acme` → (`https://sso/auth`, `acme`).
fn split_issuer(issuer: &str) -> Option<(String, String)> {
    let trimmed = issuer.trim_end_matches('/');
    let (base, name) = trimmed.rsplit_once("/realms/")?;
    if name.is_empty() || name.contains('/') || base.is_empty() {
        return None;
    }
    Some((base.to_owned(), name.to_owned()))
}

/// Spaces the starts of calls at least `1 / per_second` apart, whoever makes them, so no
/// second holds more than `per_second` calls (plus the first one of a quiet spell).
#[derive(Debug)]
pub struct Pacer {
    gap: Duration,
    next: tokio::sync::Mutex<Option<Instant>>,
    calls: AtomicU64,
}

impl Pacer {
    /// At most `per_second` calls per second (at least 1).
    pub fn new(per_second: u32) -> Self {
        Pacer {
            gap: Duration::from_secs(1) / per_second.max(1),
            next: tokio::sync::Mutex::new(None),
            calls: AtomicU64::new(0),
        }
    }

    /// Waits until the next call may start, and counts it.
    pub async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let at = next.map_or(now, |n| n.max(now));
            *next = Some(at + self.gap);
            at
        };
        tokio::time::sleep_until(at).await;
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// Why a call to Keycloak gave no usable answer. None of these says anything about a
/// session, so the reconciler ends nothing because of one.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No answer in time.
    #[error("Keycloak did not answer within the timeout")]
    Timeout,
    /// Connection refused, reset, TLS failure.
    #[error("cannot reach Keycloak: {0}")]
    Transport(String),
    /// The client credentials were refused, or a token was (401).
    #[error("Keycloak refused the client credentials: {0}")]
    Unauthorized(String),
    /// The service account lacks `view-users` (403).
    #[error("Keycloak answered 403: the service account needs realm-management → view-users")]
    Forbidden,
    /// Any other status (5xx, a 404 that is not Keycloak's "User not found", ...).
    #[error("Keycloak answered {0}")]
    Status(u16),
    /// A 2xx whose body is not what the API documents.
    #[error("unexpected answer from Keycloak: {0}")]
    Body(String),
    /// The HTTP client could not be built.
    #[error("cannot set up the Keycloak admin client: {0}")]
    Setup(String),
}

impl AdminError {
    /// Every further call would fail the same way: the pass stops instead of spending its
    /// rate on them.
    pub fn stops_pass(&self) -> bool {
        matches!(self, AdminError::Unauthorized(_) | AdminError::Forbidden)
    }

    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            AdminError::Timeout
        } else {
            AdminError::Transport(e.to_string())
        }
    }
}

/// What Keycloak holds for one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserSessions {
    /// The user exists; these are the ids of its sessions.
    Listed(HashSet<String>),
    /// Keycloak says the user does not exist (404 "User not found").
    NoSuchUser,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct SessionRep {
    id: String,
}

/// A client of one Keycloak realm's Admin REST API.
#[derive(Debug)]
pub struct KeycloakAdmin {
    settings: AdminSettings,
    http: reqwest::Client,
    pacer: Pacer,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl KeycloakAdmin {
    /// A client with these settings, trusting `roots` for HTTPS.
    pub fn new(settings: AdminSettings, roots: &TrustRoots) -> Result<Self, AdminError> {
        let http = roots
            .apply(reqwest::Client::builder())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // An admin API that redirects is misconfigured; following it could send the
            // token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AdminError::Setup(e.to_string()))?;
        Ok(KeycloakAdmin {
            pacer: Pacer::new(settings.calls_per_second),
            settings,
            http,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &AdminSettings {
        &self.settings
    }

    /// Calls made to Keycloak so far, token requests included.
    pub fn calls(&self) -> u64 {
        self.pacer.calls()
    }

    async fn token(&self) -> Result<String, AdminError> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        self.pacer.wait().await;
        let url = format!(
            "{}/realms/{}/protocol/openid-connect/token",
            self.settings.base_url, self.settings.kc_realm
        );
        let resp = self
            .http
            .post(url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.settings.client_id.as_str()),
                ("client_secret", self.settings.client_secret.expose()),
            ])
            .send()
            .await
            .map_err(AdminError::from_reqwest)?;
        let status = resp.status();
        if status == reqwest::StatusCode::BAD_REQUEST || status == reqwest::StatusCode::UNAUTHORIZED
        {
            #[derive(Deserialize)]
            struct OauthError {
                error: Option<String>,
            }
            let error = resp
                .json::<OauthError>()
                .await
                .ok()
                .and_then(|e| e.error)
                .unwrap_or_default();
            return Err(AdminError::Unauthorized(format!(
                "token request answered {} {error}",
                status.as_u16()
            )));
        }
        if !status.is_success() {
            return Err(AdminError::Status(status.as_u16()));
        }
        let answer: TokenAnswer = resp
            .json()
            .await
            .map_err(|e| AdminError::Body(format!("token response: {e}")))?;
        // Renew well before expiry: a token that expires in flight fails a call for nothing.
        let life = Duration::from_secs(answer.expires_in.unwrap_or(60));
        let until = Instant::now() + life.saturating_sub(Duration::from_secs(30)).max(life / 2);
        *cached = Some((answer.access_token.clone(), until));
        Ok(answer.access_token)
    }

    /// `GET /admin/realms/{realm}/users/{id}/sessions`: the sessions Keycloak holds for the
    /// user, or [`UserSessions::NoSuchUser`] on Keycloak's own 404 "User not found" (any other
    /// 404, say from a proxy in front of a wrong path, is an error).
    pub async fn user_sessions(&self, user_id: &str) -> Result<UserSessions, AdminError> {
        let token = self.token().await?;
        // The realm is URL-encoded already, as the issuer writes it; the user id is not.
        let mut url = reqwest::Url::parse(&format!(
            "{}/admin/realms/{}/users",
            self.settings.base_url, self.settings.kc_realm
        ))
        .map_err(|e| AdminError::Setup(format!("admin URL: {e}")))?;
        url.path_segments_mut()
            .map_err(|()| AdminError::Setup("admin URL cannot take a path".into()))?
            .push(user_id)
            .push("sessions");
        self.pacer.wait().await;
        let resp = self
            .http
            .get(url)
            .bearer_auth(&token)
            .send()
            .await
            .map_err(AdminError::from_reqwest)?;
        match resp.status().as_u16() {
            200 => {
                let reps: Vec<SessionRep> = resp
                    .json()
                    .await
                    .map_err(|e| AdminError::Body(format!("user sessions: {e}")))?;
                Ok(UserSessions::Listed(
                    reps.into_iter().map(|r| r.id).collect(),
                ))
            }
            404 => {
                #[derive(Deserialize)]
                struct NotFound {
                    error: Option<String>,
                }
                let body = resp.json::<NotFound>().await.ok().and_then(|b| b.error);
                if body.as_deref() == Some("User not found") {
                    Ok(UserSessions::NoSuchUser)
                } else {
                    Err(AdminError::Status(404))
                }
            }
            401 => {
                // Revoked or expired early: the next call fetches a new one.
                *self.token.lock().await = None;
                Err(AdminError::Unauthorized("admin call answered 401".into()))
            }
            403 => Err(AdminError::Forbidden),
            other => Err(AdminError::Status(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realm(toml: &str) -> RealmConfig {
        crate::config::FileConfig::parse(toml)
            .unwrap()
            .realms
            .remove("acme")
            .unwrap()
    }

    #[test]
    fn the_issuer_gives_keycloak_and_its_realm() {
        assert_eq!(
            split_issuer("https://sso.example.com/realms/acme"),
            Some(("https://sso.example.com".into(), "acme".into()))
        );
        assert_eq!(
            split_issuer("https://sso.example.com/auth/realms/a%20b/"),
            Some(("https://sso.example.com/auth".into(), "a%20b".into()))
        );
        assert_eq!(split_issuer("https://sso.example.com/acme"), None);
        assert_eq!(split_issuer("https://sso.example.com/realms/"), None);
    }

    #[test]
    fn settings_have_defaults_and_refuse_what_cannot_work() {
        let ok = realm(
            "[realms.acme]\nissuer = \"https://sso.example.com/realms/acme\"\n\
             [realms.acme.reconcile]\nclient_id = \"reconciler\"\nclient_secret = \"s\"\n",
        );
        let s = AdminSettings::from_config("acme", &ok).unwrap().unwrap();
        assert_eq!(s.base_url, "https://sso.example.com");
        assert_eq!(s.kc_realm, "acme");
        assert_eq!(s.interval, Some(Duration::from_secs(300)));
        assert_eq!((s.calls_per_second, s.batch), (5, 100));
        assert_eq!(format!("{:?}", s.client_secret), "\"***\"");
        assert!(
            AdminSettings::from_config("acme", &realm("[realms.acme]\n"))
                .unwrap()
                .is_none()
        );
        let zero = realm(
            "[realms.acme]\nissuer = \"https://sso.example.com/realms/acme\"\n\
             [realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret = \"s\"\ninterval_s = 0\n",
        );
        let s = AdminSettings::from_config("acme", &zero).unwrap().unwrap();
        assert_eq!(s.interval, None, "0: only `lockstep reconcile`");
        for (bad, says) in [
            (
                "[realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret = \"s\"\n",
                "issuer",
            ),
            (
                "issuer = \"https://sso.example.com/realms/acme\"\n[realms.acme.reconcile]\nclient_id = \"r\"\n",
                "exactly one",
            ),
            (
                "issuer = \"https://sso.example.com/realms/acme\"\n[realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret = \"s\"\nclient_secret_env = \"X\"\n",
                "exactly one",
            ),
            (
                "issuer = \"https://sso.example.com/realms/acme\"\n[realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret_env = \"LOCKSTEP_TEST_SURELY_UNSET\"\n",
                "not set",
            ),
            (
                "issuer = \"https://sso.example.com/realms/acme\"\n[realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret = \"s\"\ncalls_per_second = 0\n",
                "calls_per_second",
            ),
            (
                "issuer = \"https://sso.example.com/realms/acme\"\n[realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret = \"s\"\nbatch = 5000\n",
                "batch",
            ),
            (
                "issuer = \"http://sso.example.com/realms/acme\"\n[realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret = \"s\"\n",
                "https://",
            ),
            (
                "issuer = \"https://sso.example.com/acme\"\n[realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret = \"s\"\n",
                "/realms/NAME",
            ),
        ] {
            let err = AdminSettings::from_config("acme", &realm(&format!("[realms.acme]\n{bad}")))
                .unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(
            crate::config::FileConfig::parse(
                "[realms.acme.reconcile]\nclient_id = \"r\"\nsecret = \"s\"\n"
            )
            .is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn the_secret_may_come_from_a_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, b"from-file\n").unwrap();
        let cfg = realm(&format!(
            "[realms.acme]\nissuer = \"https://sso.example.com/realms/acme\"\n\
             [realms.acme.reconcile]\nclient_id = \"r\"\nclient_secret_file = \"{}\"\n",
            f.path().display()
        ));
        let s = AdminSettings::from_config("acme", &cfg).unwrap().unwrap();
        assert_eq!(s.client_secret.expose(), "from-file");
    }

    // A paused clock: the sleeps advance it exactly, so a loaded machine cannot squeeze two
    // wake-ups together or stretch a wait.
    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_calls_by_the_rate() {
        let pacer = std::sync::Arc::new(Pacer::new(20));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..9 {
            let p = pacer.clone();
            tasks.push(tokio::spawn(async move {
                p.wait().await;
                Instant::now()
            }));
        }
        let mut at = Vec::new();
        for t in tasks {
            at.push(t.await.unwrap() - start);
        }
        at.sort();
        assert_eq!(pacer.calls(), 9);
        // 9 calls at 20 per second, however many callers: 50 ms apart at least.
        for w in at.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(49), "{at:?}");
        }
        assert!(at[8] >= Duration::from_millis(400), "{at:?}");
        // After a quiet spell the next call starts at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = Instant::now();
        pacer.wait().await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
