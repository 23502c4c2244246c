//! The receiver side of the OpenID Shared Signals Framework (SSF 1.0): for every
//! `[[realms.NAME.ssf_transmitters]]`, a background task that (through `oidc::ssf_client`)
//! reads the transmitter's metadata, takes an OAuth token (client-credentials grant),
//! creates or adopts Lockstep's stream (push to `{public_url}/realms/NAME/ssf/push` with the
//! `authorization_header` `Bearer <push_secret or a random secret made at each start>`, or
//! poll), asks the transmitter to verify it (a verification event carrying a random
//! `state`), reads its status, and, for poll streams, polls (RFC 8936) with
//! acknowledgements, `setErrs` and back-off. Push (RFC 8935) arrives at `api::ssf_push`;
//! both hand each SET to [`SsfReceiver::receive`], which verifies it (`oidc::ssf_receiver`)
//! and applies what it says through [`SessionService::apply_signal`], so the outbox, the
//! audit and the cascade are those of every other logout, and the SET's `jti` is stored in
//! the same transaction as the change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::RealmConfig;
use crate::domain::{DestroyTarget, EndReason, ReplayGuard, ReplayKind, rules};
use crate::oidc::ssf_client::{ClientError, SsfClient, TransmitterMetadata};
use crate::oidc::ssf_receiver::{self, SetCheck, SetError, SetEvent};
use crate::oidc::{DEFAULT_SKEW_S, Verifier, tls};
use crate::store::StoreError;
use crate::sync::sessions::{SessionError, SessionService, SignalOrder};

/// Delivery method URN of push (RFC 8935).
pub const PUSH_METHOD: &str = "urn:ietf:rfc:8935";
/// Delivery method URN of poll (RFC 8936).
pub const POLL_METHOD: &str = "urn:ietf:rfc:8936";
/// Path of a realm's push endpoint below the public URL.
pub const PUSH_PATH: &str = "ssf/push";
/// Default `originSystem` of what a transmitter's events end.
pub const DEFAULT_SYSTEM: &str = "ssf";
/// Scopes asked for unless configured otherwise.
pub const DEFAULT_SCOPE: &str = "ssf.manage ssf.read";
/// Default pause between polls that found nothing.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Shortest configured push secret accepted.
const MIN_PUSH_SECRET: usize = 32;
/// Most SETs asked for in one poll.
const MAX_EVENTS: u32 = 100;
/// How often a push stream's status is read again.
const STATUS_REFRESH: Duration = Duration::from_secs(60);
/// First and longest pause after a failure (doubling in between).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The URL of `realm`'s push endpoint under `public_url`.
pub fn push_url(public_url: &str, realm: &str) -> String {
    format!(
        "{}/realms/{realm}/{PUSH_PATH}",
        public_url.trim_end_matches('/')
    )
}

/// How SETs reach Lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// The transmitter POSTs them to the realm's push endpoint.
    Push,
    /// Lockstep polls the transmitter's poll endpoint.
    Poll,
}

/// One transmitter of one realm, validated from `[[realms.NAME.ssf_transmitters]]`.
#[derive(Clone, Debug)]
pub struct TransmitterSettings {
    /// The realm the events end sessions in.
    pub realm: String,
    /// The transmitter's issuer.
    pub issuer: String,
    /// Where its metadata is looked for, in order (the next one after a 404).
    pub metadata_urls: Vec<String>,
    /// OAuth client of the stream API.
    pub client_id: String,
    /// Its secret.
    pub client_secret: String,
    /// Token endpoint (`None`: from the issuer's OpenID discovery).
    pub token_url: Option<String>,
    /// Scopes asked for (empty: none).
    pub scope: String,
    /// Push or poll.
    pub delivery: Delivery,
    /// The push endpoint (push only).
    pub push_url: Option<String>,
    /// Event types requested.
    pub events: Vec<String>,
    /// Audience SETs must name (`None`: the stream's).
    pub audience: Option<String>,
    /// `originSystem` and audit actor.
    pub system: String,
    /// The realm's own IdP issuer.
    pub realm_issuer: Option<String>,
    /// Oldest `iat` accepted, seconds.
    pub max_age_s: u64,
    /// Clock skew, seconds.
    pub skew_s: u64,
    /// Pause between empty polls.
    pub poll_interval: Duration,
    /// The push secret shared by every instance (`None`: a random one per start).
    pub push_secret: Option<String>,
}

impl TransmitterSettings {
    /// A realm's transmitters from `[realms.NAME]` and the service's `public_url`.
    pub fn from_config(
        realm: &str,
        c: &RealmConfig,
        public_url: Option<&str>,
    ) -> Result<Vec<Self>, String> {
        let mut out: Vec<TransmitterSettings> = Vec::with_capacity(c.ssf_transmitters.len());
        for (i, t) in c.ssf_transmitters.iter().enumerate() {
            let ctx = |e: String| format!("[realms.{realm}] ssf_transmitters[{i}]: {e}");
            tls::check_url(&t.issuer).map_err(|e| ctx(format!("issuer {e}")))?;
            if out.iter().any(|o| o.issuer == t.issuer) {
                return Err(ctx(format!("issuer {:?} is listed twice", t.issuer)));
            }
            let metadata_urls = match &t.metadata_url {
                Some(u) => {
                    tls::check_url(u).map_err(|e| ctx(format!("metadata_url {e}")))?;
                    vec![u.clone()]
                }
                None => metadata_urls(&t.issuer),
            };
            if let Some(u) = &t.token_url {
                tls::check_url(u).map_err(|e| ctx(format!("token_url {e}")))?;
            }
            if t.client_id.is_empty() || t.client_secret.is_empty() {
                return Err(ctx("client_id and client_secret must not be empty".into()));
            }
            let delivery = match t.delivery.as_deref() {
                None | Some("push") => Delivery::Push,
                Some("poll") => Delivery::Poll,
                Some(other) => {
                    return Err(ctx(format!(
                        "delivery {other:?} is neither \"push\" nor \"poll\""
                    )));
                }
            };
            let push_url = match (delivery, public_url) {
                (Delivery::Push, Some(u))
                    if u.starts_with("https://") || u.starts_with("http://") =>
                {
                    Some(push_url(u, realm))
                }
                (Delivery::Push, _) => {
                    return Err(ctx(
                        "push delivery needs public_url (https:// or http://): the transmitter \
                         is given {public_url}/realms/NAME/ssf/push"
                            .into(),
                    ));
                }
                (Delivery::Poll, _) => None,
            };
            let events = if t.events.is_empty() {
                ssf_receiver::ACTIONABLE_EVENTS
                    .iter()
                    .map(|e| (*e).to_owned())
                    .collect()
            } else {
                for e in &t.events {
                    if !(e.starts_with("https://") || e.starts_with("urn:")) {
                        return Err(ctx(format!("events: {e:?} is not an event type URI")));
                    }
                }
                t.events.clone()
            };
            let system = t
                .system
                .clone()
                .unwrap_or_else(|| DEFAULT_SYSTEM.to_owned());
            rules::id("system", &system).map_err(|e| ctx(e.to_string()))?;
            if t.max_set_age_s == Some(0) {
                return Err(ctx("max_set_age_s must be at least 1".into()));
            }
            if let Some(secret) = &t.push_secret
                && (secret.len() < MIN_PUSH_SECRET || !secret.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(ctx(format!(
                    "push_secret must be at least {MIN_PUSH_SECRET} printable ASCII characters \
                     without spaces (e.g. `openssl rand -base64 32`)"
                )));
            }
            if t.poll_interval_ms == Some(0) {
                return Err(ctx("poll_interval_ms must be at least 1".into()));
            }
            out.push(TransmitterSettings {
                realm: realm.to_owned(),
                issuer: t.issuer.clone(),
                metadata_urls,
                client_id: t.client_id.clone(),
                client_secret: t.client_secret.clone(),
                token_url: t.token_url.clone(),
                scope: t.scope.clone().unwrap_or_else(|| DEFAULT_SCOPE.to_owned()),
                delivery,
                push_url,
                events,
                audience: t.audience.clone(),
                system,
                realm_issuer: c.issuer.clone(),
                max_age_s: t.max_set_age_s.unwrap_or(ssf_receiver::DEFAULT_MAX_AGE_S),
                skew_s: c.clock_skew_s.unwrap_or(DEFAULT_SKEW_S),
                poll_interval: t
                    .poll_interval_ms
                    .map_or(DEFAULT_POLL_INTERVAL, Duration::from_millis),
                push_secret: t.push_secret.clone(),
            });
        }
        Ok(out)
    }
}

/// Where an issuer's SSF metadata may be: the form SSF 1.0 prescribes (the well-known suffix
/// between host and path, as RFC 8414 does it) and the issuer with the suffix appended (what
/// Keycloak serves); one URL when the issuer has no path.
fn metadata_urls(issuer: &str) -> Vec<String> {
    const SUFFIX: &str = ".well-known/ssf-configuration";
    let appended = format!("{}/{SUFFIX}", issuer.trim_end_matches('/'));
    let Ok(url) = reqwest::Url::parse(issuer) else {
        return vec![appended];
    };
    let path = url.path().trim_end_matches('/');
    if path.is_empty() {
        return vec![appended];
    }
    let mut inserted = url.clone();
    inserted.set_path(&format!("/{SUFFIX}{path}"));
    vec![inserted.to_string(), appended]
}

/// A stream as Lockstep knows it (the admin API's view).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamState {
    /// The transmitter's stream id (`None`: not set up yet).
    pub stream_id: Option<String>,
    /// `enabled`, `paused`, `disabled`, or `unknown` before the first answer.
    pub status: String,
    /// The transmitter's reason for the status, if it gave one.
    pub reason: Option<String>,
    /// Whether the verification event with Lockstep's `state` arrived.
    pub verified: bool,
    /// Audiences SETs must name.
    pub audiences: Vec<String>,
    /// The last failure talking to the transmitter (cleared by a success).
    pub last_error: Option<String>,
    #[serde(skip)]
    metadata: Option<TransmitterMetadata>,
    #[serde(skip)]
    verification_state: Option<String>,
    #[serde(skip)]
    poll_url: Option<String>,
}

/// One transmitter and its stream.
pub struct Transmitter {
    /// Its settings.
    pub settings: TransmitterSettings,
    /// The `Authorization` value the transmitter must send with each push.
    push_authorization: String,
    state: Mutex<StreamState>,
    /// Asks the stream's task to set the stream up again (the admin API's refresh).
    restart: tokio::sync::Notify,
    accepted: AtomicU64,
    replayed: AtomicU64,
    refused: AtomicU64,
}

impl Transmitter {
    fn new(settings: TransmitterSettings) -> Self {
        let secret = settings.push_secret.clone().unwrap_or_else(|| {
            let bytes: [u8; 32] = rand::random();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        });
        Transmitter {
            settings,
            push_authorization: format!("Bearer {secret}"),
            state: Mutex::new(StreamState {
                status: "unknown".into(),
                ..StreamState::default()
            }),
            restart: tokio::sync::Notify::new(),
            accepted: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StreamState> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether `authorization` (the push request's header) is the one this stream was given;
    /// compared in constant time.
    pub fn authorizes(&self, authorization: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.push_authorization.as_bytes();
        let got = authorization.trim().as_bytes();
        want.len() == got.len() && bool::from(want.ct_eq(got))
    }

    fn fail(&self, e: &ClientError) {
        tracing::warn!(realm = %self.settings.realm, issuer = %self.settings.issuer, error = %e, "ssf stream");
        self.state().last_error = Some(e.to_string());
    }
}

/// What became of a SET that passed verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// It ended this many sessions.
    Applied(usize),
    /// Its `jti` was seen before: acknowledged again, nothing changed.
    Replayed,
    /// A stream event (verification, status) or an event type not acted on.
    Noted,
}

/// Why a SET was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Refused for good (told to the transmitter).
    #[error(transparent)]
    Refused(SetError),
    /// Not checkable or not storable now; the transmitter should deliver it again.
    #[error("{0}")]
    Transient(String),
}

/// Every transmitter of every realm.
pub struct SsfReceiver {
    transmitters: Vec<Arc<Transmitter>>,
    client: SsfClient,
}

impl SsfReceiver {
    /// The receiver of these transmitters, talking HTTPS that trusts `roots`.
    pub fn new(
        settings: Vec<TransmitterSettings>,
        roots: &tls::TrustRoots,
    ) -> Result<Self, String> {
        Ok(SsfReceiver {
            transmitters: settings
                .into_iter()
                .map(|s| Arc::new(Transmitter::new(s)))
                .collect(),
            client: SsfClient::new(roots)?,
        })
    }

    /// Whether no realm has a transmitter.
    pub fn is_empty(&self) -> bool {
        self.transmitters.is_empty()
    }

    /// Whether `realm` has a push stream.
    pub fn has_push(&self, realm: &str) -> bool {
        self.transmitters
            .iter()
            .any(|t| t.settings.realm == realm && t.settings.delivery == Delivery::Push)
    }

    /// The push transmitter of `realm` whose stream was given `authorization`.
    pub fn push_transmitter(&self, realm: &str, authorization: &str) -> Option<Arc<Transmitter>> {
        // Every candidate is compared, so the time taken does not tell which one matched.
        let mut found = None;
        for t in &self.transmitters {
            if t.settings.realm == realm
                && t.settings.delivery == Delivery::Push
                && t.authorizes(authorization)
            {
                found = Some(t.clone());
            }
        }
        found
    }

    /// Has every stream of `realm` set up again (metadata, token, adoption, status, a new
    /// verification request); returns how many there are.
    pub fn restart(&self, realm: &str) -> usize {
        let mut n = 0;
        for t in self
            .transmitters
            .iter()
            .filter(|t| t.settings.realm == realm)
        {
            t.restart.notify_one();
            n += 1;
        }
        n
    }

    /// The streams of `realm` (every realm when `None`), for the admin API.
    pub fn streams(&self, realm: Option<&str>) -> Vec<StreamView> {
        self.transmitters
            .iter()
            .filter(|t| realm.is_none_or(|r| t.settings.realm == r))
            .map(|t| StreamView {
                realm: t.settings.realm.clone(),
                issuer: t.settings.issuer.clone(),
                delivery: t.settings.delivery,
                events_requested: t.settings.events.clone(),
                stream: t.state().clone(),
                sets_accepted: t.accepted.load(Ordering::Relaxed),
                sets_replayed: t.replayed.load(Ordering::Relaxed),
                sets_refused: t.refused.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Appends the streams' gauges and counters in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        if self.transmitters.is_empty() {
            return;
        }
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "# HELP lockstep_ssf_stream_status SSF receiver stream status (1 for the current one)."
        );
        let _ = writeln!(out, "# TYPE lockstep_ssf_stream_status gauge");
        for t in &self.transmitters {
            let status = t.state().status.clone();
            for s in ["enabled", "paused", "disabled", "unknown"] {
                let _ = writeln!(
                    out,
                    "lockstep_ssf_stream_status{{realm=\"{}\",transmitter=\"{}\",status=\"{s}\"}} {}",
                    esc(&t.settings.realm),
                    esc(&t.settings.issuer),
                    u8::from(status == s)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP lockstep_ssf_stream_verified Whether the SSF stream's verification event arrived."
        );
        let _ = writeln!(out, "# TYPE lockstep_ssf_stream_verified gauge");
        for t in &self.transmitters {
            let _ = writeln!(
                out,
                "lockstep_ssf_stream_verified{{realm=\"{}\",transmitter=\"{}\"}} {}",
                esc(&t.settings.realm),
                esc(&t.settings.issuer),
                u8::from(t.state().verified)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lockstep_ssf_sets_total SETs received, by outcome (accepted, replayed, refused)."
        );
        let _ = writeln!(out, "# TYPE lockstep_ssf_sets_total counter");
        for t in &self.transmitters {
            for (outcome, n) in [
                ("accepted", &t.accepted),
                ("replayed", &t.replayed),
                ("refused", &t.refused),
            ] {
                let _ = writeln!(
                    out,
                    "lockstep_ssf_sets_total{{realm=\"{}\",transmitter=\"{}\",outcome=\"{outcome}\"}} {}",
                    esc(&t.settings.realm),
                    esc(&t.settings.issuer),
                    n.load(Ordering::Relaxed)
                );
            }
        }
    }

    /// Verifies one SET of `t`'s stream and applies it.
    pub async fn receive(
        &self,
        t: &Transmitter,
        verifier: &Verifier,
        sessions: &SessionService,
        token: &str,
    ) -> Result<Received, ReceiveError> {
        let (metadata, audiences) = {
            let st = t.state();
            (st.metadata.clone(), st.audiences.clone())
        };
        let Some(metadata) = metadata else {
            return Err(ReceiveError::Transient(
                "the stream is not set up yet (no transmitter metadata)".into(),
            ));
        };
        let s = &t.settings;
        let check = SetCheck {
            issuer: &s.issuer,
            jwks_uri: &metadata.jwks_uri,
            audiences: &audiences,
            realm_issuer: s.realm_issuer.as_deref(),
            critical_members: &metadata.critical_members,
            max_age_s: s.max_age_s,
            skew_s: s.skew_s,
        };
        let set = match verifier.verify_set(&check, token).await {
            Ok(set) => set,
            Err(SetError::Unavailable(d)) => return Err(ReceiveError::Transient(d)),
            Err(e) => {
                t.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(realm = %s.realm, issuer = %s.issuer, code = e.code(), reason = %e, "SET refused");
                return Err(ReceiveError::Refused(e));
            }
        };
        let event_name = set.event.name().to_owned();
        let (target, reason, revoke) = match set.event {
            SetEvent::Verification { state } => {
                let mut st = t.state();
                if state.is_some() && state == st.verification_state {
                    st.verified = true;
                    tracing::info!(realm = %s.realm, issuer = %s.issuer, "ssf stream verified");
                }
                drop(st);
                t.accepted.fetch_add(1, Ordering::Relaxed);
                return Ok(Received::Noted);
            }
            SetEvent::StreamUpdated { status, reason } => {
                tracing::info!(realm = %s.realm, issuer = %s.issuer, %status, "ssf stream updated");
                let mut st = t.state();
                st.status = status;
                st.reason = reason;
                drop(st);
                t.accepted.fetch_add(1, Ordering::Relaxed);
                return Ok(Received::Noted);
            }
            SetEvent::Other(kind) => {
                tracing::info!(realm = %s.realm, issuer = %s.issuer, %kind, "SET of an event type not acted on");
                t.accepted.fetch_add(1, Ordering::Relaxed);
                return Ok(Received::Noted);
            }
            SetEvent::SessionRevoked(subject) => {
                let target = match (subject.session, subject.user) {
                    // The IdP session id maps to the PARENTs mapped with it.
                    (Some(sid), _) => DestroyTarget::IdpSession(sid),
                    (None, Some(user)) => DestroyTarget::User(user),
                    (None, None) => {
                        return Err(ReceiveError::Refused(SetError::InvalidRequest(
                            "the subject names neither a session nor a user".into(),
                        )));
                    }
                };
                (target, EndReason::IdpLogout, false)
            }
            SetEvent::SessionsRevoked(subject) => {
                (user_target(subject)?, EndReason::IdpLogout, false)
            }
            SetEvent::AccountDisabled(subject) => {
                (user_target(subject)?, EndReason::Revoked, false)
            }
            SetEvent::AccountPurged(subject) => (user_target(subject)?, EndReason::Admin, false),
            SetEvent::CredentialChange(subject) => {
                (user_target(subject)?, EndReason::Revoked, true)
            }
        };
        let order = SignalOrder {
            event: event_name.clone(),
            target,
            reason,
            revoke,
            origin_system: s.system.clone(),
            guard: ReplayGuard {
                // Beside logout token ids, namespaced so that neither kind of token can
                // replay as the other, and by issuer, as a jti is unique only per issuer.
                kind: ReplayKind::LogoutToken,
                jti: format!("ssf {} {}", s.issuer, set.jti),
                until_ms: set.remember_until_ms,
            },
        };
        match sessions.apply_signal(&s.realm, order).await {
            Ok(ended) => {
                t.accepted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(realm = %s.realm, issuer = %s.issuer, event = %event_name, jti = %set.jti, ended = ended.len(), "SET applied");
                Ok(Received::Applied(ended.len()))
            }
            Err(SessionError::Store(StoreError::Replayed(_))) => {
                t.replayed.fetch_add(1, Ordering::Relaxed);
                Ok(Received::Replayed)
            }
            // Nothing of that user or session is mapped here: done, as far as this realm goes.
            Err(SessionError::Store(StoreError::NotFound(_))) => {
                t.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(Received::Applied(0))
            }
            Err(SessionError::Invalid(e)) => {
                t.refused.fetch_add(1, Ordering::Relaxed);
                Err(ReceiveError::Refused(SetError::InvalidRequest(e.0)))
            }
            Err(e) => Err(ReceiveError::Transient(e.to_string())),
        }
    }

    /// Runs every transmitter's stream until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        verifier: Arc<Verifier>,
        sessions: SessionService,
        stop: watch::Receiver<bool>,
    ) {
        let tasks: Vec<_> = self
            .transmitters
            .iter()
            .map(|t| {
                tokio::spawn(keep(
                    self.clone(),
                    t.clone(),
                    verifier.clone(),
                    sessions.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "ssf stream task failed");
            }
        }
    }
}

/// The admin API's view of one stream.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamView {
    /// The realm.
    pub realm: String,
    /// The transmitter's issuer.
    pub issuer: String,
    /// Push or poll.
    pub delivery: Delivery,
    /// Event types requested.
    pub events_requested: Vec<String>,
    /// The stream.
    #[serde(flatten)]
    pub stream: StreamState,
    /// SETs applied or noted.
    pub sets_accepted: u64,
    /// SETs whose `jti` was seen before.
    pub sets_replayed: u64,
    /// SETs refused.
    pub sets_refused: u64,
}

fn user_target(subject: ssf_receiver::Subject) -> Result<DestroyTarget, ReceiveError> {
    subject.user.map(DestroyTarget::User).ok_or_else(|| {
        ReceiveError::Refused(SetError::InvalidRequest(
            "this event needs a user in its subject".into(),
        ))
    })
}

/// An OAuth access token and when to stop using it.
struct Token {
    value: String,
    until: Instant,
}

/// Keeps one transmitter's stream: set it up, then poll (or watch its status), and start
/// over after a failure with a doubling pause.
async fn keep(
    rx: Arc<SsfReceiver>,
    t: Arc<Transmitter>,
    verifier: Arc<Verifier>,
    sessions: SessionService,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut token: Option<Token> = None;
    // Acknowledgements and errors not yet told to a poll transmitter survive a new set-up.
    let mut acks: Vec<String> = Vec::new();
    let mut errs = serde_json::Map::new();
    while !*stop.borrow() {
        let result = match set_up(&rx, &t, &mut token).await {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                let running = async {
                    match t.settings.delivery {
                        Delivery::Poll => {
                            poll(
                                &rx, &t, &verifier, &sessions, &mut token, &mut acks, &mut errs,
                                &mut stop,
                            )
                            .await
                        }
                        Delivery::Push => watch_status(&rx, &t, &mut token, &mut stop).await,
                    }
                };
                // A SET being applied when a restart cuts in is either stored or not; one
                // stored but not yet acknowledged comes again and is acknowledged as a replay.
                tokio::select! {
                    r = running => r,
                    () = t.restart.notified() => {
                        tracing::info!(realm = %t.settings.realm, issuer = %t.settings.issuer, "ssf stream set up again on request");
                        Ok(())
                    }
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            t.fail(&e);
            token = None;
            if sleep_or_stop(backoff, &mut stop).await {
                break;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Sleeps for `d` unless stopped first; true when stopped.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn access_token(
    rx: &SsfReceiver,
    t: &Transmitter,
    cached: &mut Option<Token>,
) -> Result<String, ClientError> {
    if let Some(tok) = cached
        && Instant::now() < tok.until
    {
        return Ok(tok.value.clone());
    }
    let s = &t.settings;
    let token = rx
        .client
        .token(
            &s.issuer,
            s.token_url.as_deref(),
            &s.client_id,
            &s.client_secret,
            &s.scope,
        )
        .await?;
    // Renewed a little early so that a request never carries a token about to expire.
    let lifetime = token.expires_in.saturating_sub(Duration::from_secs(15));
    *cached = Some(Token {
        value: token.value.clone(),
        until: Instant::now() + lifetime.max(Duration::from_secs(5)),
    });
    Ok(token.value)
}

fn text(v: &Value, name: &str) -> Option<String> {
    v.get(name).and_then(Value::as_str).map(str::to_owned)
}

/// Metadata, token, stream (created or adopted), status, verification request.
async fn set_up(
    rx: &SsfReceiver,
    t: &Transmitter,
    token: &mut Option<Token>,
) -> Result<(), ClientError> {
    let s = &t.settings;
    let mut found = None;
    for url in &s.metadata_urls {
        match rx.client.metadata(url, &s.issuer).await {
            Ok(m) => {
                found = Some(m);
                break;
            }
            Err(ClientError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let Some(metadata) = found else {
        return Err(ClientError::NotFound(format!(
            "no SSF metadata at {}",
            s.metadata_urls.join(" nor ")
        )));
    };
    let method = match s.delivery {
        Delivery::Push => PUSH_METHOD,
        Delivery::Poll => POLL_METHOD,
    };
    if let Some(methods) = &metadata.delivery_methods
        && !methods.iter().any(|m| m == method)
    {
        return Err(ClientError::Protocol(format!(
            "the transmitter does not offer delivery {method}"
        )));
    }
    // SETs that arrive from here on can be verified.
    t.state().metadata = Some(metadata.clone());
    let bearer = access_token(rx, t, token).await?;
    let delivery = match s.delivery {
        Delivery::Push => json!({
            "method": PUSH_METHOD,
            "endpoint_url": s.push_url,
            "authorization_header": t.push_authorization,
        }),
        Delivery::Poll => json!({"method": POLL_METHOD}),
    };
    let mut stream = None;
    if let Some(old) = rx.client.existing_stream(&metadata, &bearer).await? {
        let id = text(&old, "stream_id").unwrap_or_default();
        let same_method = old
            .get("delivery")
            .and_then(|d| d.get("method"))
            .and_then(Value::as_str)
            == Some(method);
        if same_method {
            // Adopt it: the push secret is new at each start, and the events may have changed.
            let update = json!({
                "stream_id": id,
                "delivery": delivery,
                "events_requested": s.events,
            });
            match rx.client.update_stream(&metadata, &bearer, &update).await {
                Ok(v) => stream = Some(v),
                Err(e) => {
                    tracing::info!(realm = %s.realm, issuer = %s.issuer, error = %e, "cannot update the ssf stream; replacing it");
                }
            }
        }
        if stream.is_none() {
            rx.client.delete_stream(&metadata, &bearer, &id).await?;
        }
    }
    let stream = match stream {
        Some(v) => v,
        None => {
            let create = json!({
                "delivery": delivery,
                "events_requested": s.events,
                "description": format!("Lockstep realm {}", s.realm),
            });
            rx.client.create_stream(&metadata, &bearer, &create).await?
        }
    };
    let stream_id = text(&stream, "stream_id")
        .ok_or_else(|| ClientError::Protocol("the stream has no stream_id".into()))?;
    let audiences = match (&s.audience, stream.get("aud")) {
        (Some(a), _) => vec![a.clone()],
        (None, Some(Value::String(a))) => vec![a.clone()],
        (None, Some(Value::Array(items))) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        (None, _) => {
            return Err(ClientError::Protocol(
                "the stream names no aud; configure audience".into(),
            ));
        }
    };
    let poll_url = match s.delivery {
        Delivery::Poll => {
            let url = stream
                .get("delivery")
                .and_then(|d| d.get("endpoint_url"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ClientError::Protocol("the poll stream names no delivery.endpoint_url".into())
                })?
                .to_owned();
            tls::check_url(&url)
                .map_err(|e| ClientError::Protocol(format!("poll endpoint_url {e}")))?;
            Some(url)
        }
        Delivery::Push => None,
    };
    let state_token = {
        let bytes: [u8; 16] = rand::random();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    {
        let mut st = t.state();
        st.stream_id = Some(stream_id.clone());
        st.audiences = audiences;
        st.poll_url = poll_url;
        st.verified = false;
        st.verification_state = Some(state_token.clone());
        st.last_error = None;
    }
    refresh_status(rx, t, &bearer).await?;
    rx.client
        .request_verification(&metadata, &bearer, &stream_id, &state_token)
        .await?;
    tracing::info!(realm = %s.realm, issuer = %s.issuer, stream_id = %stream_id, delivery = ?s.delivery, "ssf stream set up");
    Ok(())
}

async fn refresh_status(
    rx: &SsfReceiver,
    t: &Transmitter,
    bearer: &str,
) -> Result<(), ClientError> {
    let (metadata, id) = {
        let st = t.state();
        (st.metadata.clone(), st.stream_id.clone())
    };
    let (Some(metadata), Some(id)) = (metadata, id) else {
        return Ok(());
    };
    let status = rx.client.status(&metadata, bearer, &id).await?;
    let mut st = t.state();
    match status {
        Some((status, reason)) => {
            st.status = status;
            st.reason = reason;
        }
        // No status endpoint: a stream the transmitter created is enabled.
        None => st.status = "enabled".into(),
    }
    Ok(())
}

/// A push stream between set-ups: its status read again now and then.
async fn watch_status(
    rx: &SsfReceiver,
    t: &Transmitter,
    token: &mut Option<Token>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), ClientError> {
    loop {
        if sleep_or_stop(STATUS_REFRESH, stop).await {
            return Ok(());
        }
        let bearer = access_token(rx, t, token).await?;
        refresh_status(rx, t, &bearer).await?;
    }
}

/// Polls until stopped or a failure: each request carries the acknowledgements and errors
/// of the SETs of the one before.
#[allow(clippy::too_many_arguments)]
async fn poll(
    rx: &SsfReceiver,
    t: &Transmitter,
    verifier: &Verifier,
    sessions: &SessionService,
    token: &mut Option<Token>,
    acks: &mut Vec<String>,
    errs: &mut serde_json::Map<String, Value>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let s = &t.settings;
    let mut last_status = Instant::now();
    loop {
        let stopping = *stop.borrow();
        if stopping && acks.is_empty() && errs.is_empty() {
            return Ok(());
        }
        let (url, status) = {
            let st = t.state();
            (st.poll_url.clone(), st.status.clone())
        };
        let Some(url) = url else {
            return Err(ClientError::Protocol(
                "the poll stream has no endpoint".into(),
            ));
        };
        let bearer = access_token(rx, t, token).await?;
        if status != "enabled" && acks.is_empty() && errs.is_empty() {
            // A paused or disabled stream is not polled; its status is read again instead.
            if sleep_or_stop(s.poll_interval.max(Duration::from_secs(5)), stop).await {
                return Ok(());
            }
            refresh_status(rx, t, &bearer).await?;
            continue;
        }
        let max_events = if stopping { 0 } else { MAX_EVENTS };
        let answer = rx
            .client
            .poll(&url, &bearer, acks, errs, max_events)
            .await?;
        acks.clear();
        errs.clear();
        if stopping {
            return Ok(());
        }
        let mut transient = None;
        for (jti, set) in &answer.sets {
            let Some(set) = set.as_str() else {
                errs.insert(
                    jti.clone(),
                    json!({"err": "invalid_request", "description": "not a JWT"}),
                );
                continue;
            };
            match rx.receive(t, verifier, sessions, set).await {
                Ok(_) => acks.push(jti.clone()),
                Err(ReceiveError::Refused(e)) => {
                    errs.insert(
                        jti.clone(),
                        json!({"err": e.code(), "description": e.to_string()}),
                    );
                }
                // Neither acknowledged nor refused: the transmitter delivers it again.
                Err(ReceiveError::Transient(d)) => transient = Some(d),
            }
        }
        if let Some(d) = &transient {
            tracing::warn!(realm = %s.realm, issuer = %s.issuer, reason = %d, "SETs left for redelivery");
        }
        if last_status.elapsed() >= STATUS_REFRESH {
            last_status = Instant::now();
            refresh_status(rx, t, &bearer).await?;
        }
        let pending = !(acks.is_empty() && errs.is_empty());
        // Acknowledgements go out at once (a stop sends them too); an empty poll, or SETs
        // that could not be taken now, wait for the interval.
        if (!answer.more_available && !pending) || transient.is_some() {
            let _ = sleep_or_stop(s.poll_interval, stop).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RemoteTransmitterConfig;

    #[test]
    fn settings_are_checked_at_start() {
        let mut c = RealmConfig {
            ssf_transmitters: vec![RemoteTransmitterConfig {
                issuer: "https://idp.example/realms/acme".into(),
                client_id: "lockstep".into(),
                client_secret: "s".into(),
                ..RemoteTransmitterConfig::default()
            }],
            ..RealmConfig::default()
        };
        let err = TransmitterSettings::from_config("acme", &c, None).unwrap_err();
        assert!(err.contains("public_url"), "{err}");
        let ok = TransmitterSettings::from_config("acme", &c, Some("https://ls.example/")).unwrap();
        assert_eq!(
            ok[0].push_url.as_deref(),
            Some("https://ls.example/realms/acme/ssf/push")
        );
        assert_eq!(
            ok[0].metadata_urls,
            [
                "https://idp.example/.well-known/ssf-configuration/realms/acme",
                "https://idp.example/realms/acme/.well-known/ssf-configuration"
            ]
        );
        assert_eq!(
            metadata_urls("https://tx.example/"),
            ["https://tx.example/.well-known/ssf-configuration"]
        );
        assert_eq!(ok[0].events.len(), 5);
        c.ssf_transmitters[0].push_secret = Some("short".into());
        let err = TransmitterSettings::from_config("acme", &c, Some("https://x")).unwrap_err();
        assert!(err.contains("push_secret"), "{err}");
        c.ssf_transmitters[0].push_secret = Some("s".repeat(32));
        assert!(TransmitterSettings::from_config("acme", &c, Some("https://x")).is_ok());
        c.ssf_transmitters[0].delivery = Some("poll".into());
        assert!(TransmitterSettings::from_config("acme", &c, None).is_ok());
        c.ssf_transmitters[0].delivery = Some("webhook".into());
        assert!(TransmitterSettings::from_config("acme", &c, None).is_err());
        c.ssf_transmitters[0].delivery = None;
        c.ssf_transmitters[0].issuer = "http://idp.example".into();
        assert!(TransmitterSettings::from_config("acme", &c, Some("https://x")).is_err());
        c.ssf_transmitters[0].issuer = "http://127.0.0.1:8080".into();
        c.ssf_transmitters.push(c.ssf_transmitters[0].clone());
        let err = TransmitterSettings::from_config("acme", &c, Some("https://x")).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn push_authorization_is_compared_whole() {
        let settings = TransmitterSettings {
            realm: "acme".into(),
            issuer: "https://tx".into(),
            metadata_urls: vec!["https://tx/m".into()],
            client_id: "c".into(),
            client_secret: "s".into(),
            token_url: None,
            scope: String::new(),
            delivery: Delivery::Push,
            push_url: None,
            events: vec![],
            audience: None,
            system: "ssf".into(),
            realm_issuer: None,
            max_age_s: 60,
            skew_s: 60,
            poll_interval: DEFAULT_POLL_INTERVAL,
            push_secret: None,
        };
        let t = Transmitter::new(settings);
        let good = t.push_authorization.clone();
        assert!(t.authorizes(&good));
        assert!(!t.authorizes(&good[..good.len() - 1]));
        assert!(!t.authorizes(""));
        assert!(!t.authorizes("Bearer x"));
    }
}
