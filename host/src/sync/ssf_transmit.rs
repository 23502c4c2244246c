//! Lockstep as a Shared Signals (SSF 1.0) transmitter: its signing keys (stored in the
//! database, shared by every instance, rotated with overlap), the receivers' streams of each
//! realm (create, read, update, replace, delete, status, subjects, verification), and how a
//! stream's events are made and delivered.
//!
//! A stream is a delivery target of the ordinary outbox: the fan-out routes an event to the
//! target `ssf:<stream_id>` beside the connectors ([`SsfTransmitter::route`]), so a stream
//! has deliveries, retries, dead letters and replay like a connector. A push stream (RFC
//! 8935) has a lane in the dispatcher that signs the SET and POSTs it
//! ([`SsfTransmitter::push`]); a poll stream (RFC 8936) has no lane: the receiver's poll
//! leases its due deliveries and its `ack` records them delivered ([`SsfTransmitter::poll`]).
//! Logout events become CAEP `session-revoked`, login events `session-established`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::domain::{AuditEntry, EndReason, EventType, SyncEvent};
use crate::oidc::signing_keys::{KeyAlg, SigningError, SigningKey};
use crate::runtime::HookFailure;
use crate::runtime::manifest::{AllowedHost, OnFailure, Policy};
use crate::runtime::signer::{EventSigner, SignRefusal, check_audience};
use crate::store::deliveries::{AttemptRecord, AttemptResult, LaneClaim};
use crate::store::ssf::{KeyRow, StreamRow};
use crate::store::{Store, StoreError, now_millis};

/// Targets of the outbox fan-out that are streams, not connectors, start with this (a
/// connector name cannot hold a colon).
pub const TARGET_PREFIX: &str = "ssf:";
/// RFC 8935 push delivery.
pub const PUSH: &str = "urn:ietf:rfc:8935";
/// RFC 8936 poll delivery.
pub const POLL: &str = "urn:ietf:rfc:8936";
/// CAEP session revoked.
pub const SESSION_REVOKED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
/// CAEP session established.
pub const SESSION_ESTABLISHED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-established";
/// Lockstep's event type of a revoke (a user's grants withdrawn) in a connector's SET.
pub const GRANTS_REVOKED: &str = "urn:lockstep:secevent:grants-revoked";
/// Lockstep's event type of a refresh (a session's lifetime extended) in a connector's SET.
pub const SESSION_REFRESHED: &str = "urn:lockstep:secevent:session-refreshed";
/// SSF verification.
pub const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
/// Events a stream can carry.
pub const EVENTS_SUPPORTED: [&str; 2] = [SESSION_REVOKED, SESSION_ESTABLISHED];
/// How many pushes a lane of a stream makes at once.
pub const PUSH_WIDTH: usize = 8;
/// Deadline of one push.
pub const PUSH_TIMEOUT_MS: u64 = 10_000;

/// The most of a receiver's refusal body read.
const MAX_REFUSAL_BYTES: usize = 16 * 1024;
/// How long a polled SET stays leased to the poll that returned it before it is offered again.
const POLL_LEASE_MS: i64 = 30_000;
/// Most SETs one poll returns.
const POLL_MAX: i64 = 1_000;
/// Longest a poll without `returnImmediately` waits for events.
const POLL_WAIT: Duration = Duration::from_secs(10);

/// The retry policy of every stream: transient failures back off up to five minutes, ten
/// attempts, then a dead letter; a receiver's 400 is a dead letter at once.
pub const PUSH_POLICY: Policy = Policy {
    on_failure: OnFailure::Retry,
    max_attempts: 10,
    backoff_ms: 1_000,
    max_backoff_ms: 300_000,
};

/// `[ssf_transmitter]` settings, resolved.
#[derive(Clone, Debug)]
pub struct TransmitterSettings {
    /// The service's public URL (issuer base, endpoint URLs); without it the transmitter's
    /// routes answer 404.
    pub public_url: Option<String>,
    /// Algorithm of the SETs' signatures.
    pub signing_alg: KeyAlg,
    /// A key signs this long, then a new one is generated (checked at start and hourly).
    pub rotate_after: Duration,
    /// A replaced key stays in the JWKS this long.
    pub overlap: Duration,
    /// `iss` of each realm's IdP (for `iss_sub` subjects); realms without one get `opaque`.
    pub idp_issuers: HashMap<String, String>,
    /// Keys the operator supplied (`[[ssf_transmitter.keys]]`): when any, they are the only
    /// keys, never generated, stored or rotated here.
    pub configured_keys: Vec<SigningKey>,
    /// Where push streams may deliver: a stream's `endpoint_url` names one of these
    /// (scheme, host and port), or it is refused. None: push streams are refused, so a
    /// holder of `ssf:manage` cannot make Lockstep send requests into its own network.
    pub push_allowed_hosts: Vec<AllowedHost>,
}

impl Default for TransmitterSettings {
    fn default() -> Self {
        TransmitterSettings {
            public_url: None,
            signing_alg: KeyAlg::Rs256,
            rotate_after: Duration::from_secs(90 * 86_400),
            overlap: Duration::from_secs(7 * 86_400),
            idp_issuers: HashMap::new(),
            push_allowed_hosts: Vec::new(),
            configured_keys: Vec::new(),
        }
    }
}

/// A stream's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamStatus {
    /// Events are delivered.
    Enabled,
    /// Events are held (routed, not delivered) until enabled again.
    Paused,
    /// Events are not routed.
    Disabled,
}

/// How a stream delivers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// [`PUSH`] or [`POLL`].
    pub method: String,
    /// Push: the receiver's URL; poll: Lockstep's poll URL (set by Lockstep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Push: the `Authorization` value to send. Never shown back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_header: Option<String>,
}

/// A stream as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stream {
    /// Id (assigned by Lockstep).
    pub stream_id: String,
    /// Realm.
    pub realm: String,
    /// Audience of its SETs (the receiver: the caller that created it).
    pub aud: String,
    /// Event types the receiver asked for.
    pub events_requested: Vec<String>,
    /// Delivery.
    pub delivery: DeliveryConfig,
    /// Receiver's description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// State.
    pub status: StreamStatus,
    /// Why it has that state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Subjects removed from the stream (every other subject of the realm is in it).
    #[serde(default)]
    pub removed_subjects: Vec<Value>,
    /// A verification SET waiting for the receiver's poll: (`jti`, SET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_verification: Option<(String, String)>,
}

impl Stream {
    /// The delivery target name of this stream.
    pub fn target(&self) -> String {
        format!("{TARGET_PREFIX}{}", self.stream_id)
    }

    /// Events supported and requested.
    pub fn events_delivered(&self) -> Vec<String> {
        self.events_requested
            .iter()
            .filter(|e| EVENTS_SUPPORTED.contains(&e.as_str()))
            .cloned()
            .collect()
    }

    fn is_push(&self) -> bool {
        self.delivery.method == PUSH
    }

    /// Whether the realm's event belongs in this stream (type requested, subject not removed).
    fn wants(&self, event: &SyncEvent) -> bool {
        let Some(uri) = event_uri(event) else {
            return false;
        };
        self.status != StreamStatus::Disabled
            && self.realm == event.realm
            && self.events_requested.iter().any(|e| e == uri)
            && !self
                .removed_subjects
                .iter()
                .any(|s| subject_matches(s, event))
    }
}

/// The CAEP event type of a sync event, for the types a stream carries.
fn event_uri(event: &SyncEvent) -> Option<&'static str> {
    match event.event_type {
        EventType::Logout => Some(SESSION_REVOKED),
        EventType::Login => Some(SESSION_ESTABLISHED),
        EventType::Revoke | EventType::Refresh => None,
    }
}

/// The event type of a connector's SET: the streams' CAEP types for login and logout; a
/// revoke (a user's grants withdrawn, sessions kept) and a refresh (a lifetime extended) have
/// no CAEP type that says the same, so they get Lockstep's own URIs rather than a CAEP type
/// a receiver would act on wrongly.
fn connector_event_uri(event: &SyncEvent) -> &'static str {
    match event.event_type {
        EventType::Logout => SESSION_REVOKED,
        EventType::Login => SESSION_ESTABLISHED,
        EventType::Revoke => GRANTS_REVOKED,
        EventType::Refresh => SESSION_REFRESHED,
    }
}

/// A connector SET's `jti`: the event's id and a digest of the audience, so a redelivery
/// repeats it and two audiences' copies differ.
fn connector_jti(event_id: &str, audience: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(audience.as_bytes());
    format!("{event_id}.{}", hex::encode(&digest[..8]))
}

/// Whether a subject (RFC 9493 identifier, simple or complex) names the event's user or
/// session.
fn subject_matches(subject: &Value, event: &SyncEvent) -> bool {
    let session = event
        .idp_session_id
        .as_deref()
        .unwrap_or(&event.external_id);
    let user = event.user_id.as_deref();
    match subject["format"].as_str() {
        Some("complex") => ["user", "session"]
            .iter()
            .filter_map(|k| subject.get(*k))
            .all(|part| subject_matches(part, event)),
        Some("iss_sub") => user.is_some() && subject["sub"].as_str() == user,
        Some("opaque") => {
            let id = subject["id"].as_str();
            id == Some(session)
                || id == Some(event.external_id.as_str())
                || (user.is_some() && id == user)
        }
        Some("email") | Some("account") | Some("uri") | Some("phone_number") | Some("did")
        | Some("aliases") | None | Some(_) => false,
    }
}

/// What a stream operation refused.
#[derive(Debug, thiserror::Error)]
pub enum SsfError {
    /// A malformed or unacceptable request (400).
    #[error("{0}")]
    Invalid(String),
    /// No such stream in the realm (404).
    #[error("no stream {0:?} in this realm")]
    NotFound(String),
    /// The request conflicts with another stream (409).
    #[error("{0}")]
    Conflict(String),
    /// No `public_url` is configured (404: the transmitter is off).
    #[error("the SSF transmitter needs `public_url` in the configuration")]
    Off,
    /// The database failed (503).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No key can sign (503).
    #[error(transparent)]
    Signing(#[from] SigningError),
}

/// A stream as a receiver sees it (SSF 1.0 stream configuration).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct StreamView {
    /// Id.
    pub stream_id: String,
    /// Issuer of its SETs.
    pub iss: String,
    /// Audience of its SETs.
    pub aud: String,
    /// What Lockstep can send.
    pub events_supported: Vec<String>,
    /// What the receiver asked for.
    pub events_requested: Vec<String>,
    /// What it gets.
    pub events_delivered: Vec<String>,
    /// `method` and `endpoint_url`.
    #[schema(value_type = Object)]
    pub delivery: Value,
    /// Receiver's description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A receiver's stream configuration request (create, update, replace).
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct StreamRequest {
    /// Id (update and replace only; ignored on create).
    pub stream_id: Option<String>,
    /// Event type URIs wanted.
    pub events_requested: Option<Vec<String>>,
    /// `method` (push or poll URN), `endpoint_url` (push), `authorization_header` (push).
    #[schema(value_type = Object)]
    pub delivery: Option<DeliveryConfig>,
    /// Free text.
    pub description: Option<String>,
    /// Transmitter-supplied fields a receiver may echo back; ignored.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: BTreeMap<String, Value>,
}

/// An RFC 8936 poll request.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollRequest {
    /// Most SETs to return (0: acknowledge only).
    pub max_events: Option<i64>,
    /// Answer at once even when nothing is waiting.
    pub return_immediately: Option<bool>,
    /// `jti`s of SETs received.
    #[serde(default)]
    pub ack: Vec<String>,
    /// `jti` → `{err, description}` of SETs refused.
    #[serde(default, rename = "setErrs")]
    #[schema(value_type = Object)]
    pub set_errs: BTreeMap<String, Value>,
}

/// An RFC 8936 poll response.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PollResponse {
    /// `jti` → SET.
    pub sets: BTreeMap<String, String>,
    /// More SETs are waiting.
    #[serde(rename = "moreAvailable")]
    pub more_available: bool,
}

/// The transmitter: keys, streams and SETs. Shared by the API and the dispatcher.
pub struct SsfTransmitter {
    store: Store,
    settings: TransmitterSettings,
    keys: ArcSwap<Vec<SigningKey>>,
    streams: ArcSwap<Vec<Arc<Stream>>>,
    http: reqwest::Client,
}

impl std::fmt::Debug for SsfTransmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsfTransmitter")
            .field("public_url", &self.settings.public_url)
            .field("keys", &self.keys.load().len())
            .field("streams", &self.streams.load().len())
            .finish()
    }
}

impl SsfTransmitter {
    /// A transmitter over `store`; [`SsfTransmitter::start`] loads (or makes) its keys.
    pub fn new(store: Store, settings: TransmitterSettings, http: reqwest::Client) -> Self {
        SsfTransmitter {
            store,
            settings,
            keys: ArcSwap::from_pointee(Vec::new()),
            streams: ArcSwap::from_pointee(Vec::new()),
            http,
        }
    }

    /// Whether a `public_url` switches the transmitter on.
    pub fn is_on(&self) -> bool {
        self.settings.public_url.is_some()
    }

    /// Loads keys and streams, generating a key of each algorithm that has none in use (or
    /// whose key is due for rotation).
    pub async fn start(&self) -> Result<(), SsfError> {
        if !self.is_on() {
            return Ok(());
        }
        self.reload().await?;
        if !self.settings.configured_keys.is_empty() {
            return Ok(());
        }
        let now = now_millis();
        let due = i64::try_from(self.settings.rotate_after.as_millis()).unwrap_or(i64::MAX);
        for alg in [KeyAlg::Es256, KeyAlg::Rs256] {
            let current = self.current_key(alg);
            if current.is_none_or(|k| now.saturating_sub(k.created_at) >= due) {
                self.add_key(alg).await?;
            }
        }
        Ok(())
    }

    /// Generates a new key of every algorithm; the old ones keep verifying during the overlap.
    pub async fn rotate(&self) -> Result<Vec<String>, SsfError> {
        if !self.settings.configured_keys.is_empty() {
            return Err(SsfError::Conflict(
                "the signing keys come from [ssf_transmitter] keys: rotate them there".into(),
            ));
        }
        let mut kids = Vec::new();
        for alg in [KeyAlg::Es256, KeyAlg::Rs256] {
            kids.push(self.add_key(alg).await?);
        }
        Ok(kids)
    }

    async fn add_key(&self, alg: KeyAlg) -> Result<String, SsfError> {
        let now = now_millis();
        // RSA key generation takes a moment of CPU: off the async workers.
        let key = tokio::task::spawn_blocking(move || SigningKey::generate(alg, now))
            .await
            .map_err(|e| SigningError::Generate(alg.as_str(), e.to_string()))??;
        let overlap = i64::try_from(self.settings.overlap.as_millis()).unwrap_or(i64::MAX);
        let row = KeyRow {
            kid: key.kid.clone(),
            alg: alg.as_str().to_owned(),
            private_der: key.private_der().to_vec(),
            public_jwk: key.public_jwk.to_string(),
            created_at: key.created_at,
            retired_at: None,
        };
        self.store
            .ssf_add_key(row, now.saturating_sub(overlap))
            .await?;
        tracing::info!(kid = %key.kid, alg = alg.as_str(), "ssf signing key generated");
        self.reload().await?;
        Ok(key.kid)
    }

    /// Reads keys and streams again (changes made by other instances).
    pub async fn reload(&self) -> Result<(), SsfError> {
        if self.settings.configured_keys.is_empty() {
            self.reload_keys().await?;
        } else if self.keys.load().is_empty() {
            self.keys
                .store(Arc::new(self.settings.configured_keys.clone()));
        }
        let mut streams = Vec::new();
        for row in self.store.ssf_streams().await? {
            match serde_json::from_str::<Stream>(&row.config) {
                Ok(s) => streams.push(Arc::new(s)),
                Err(e) => {
                    tracing::error!(stream = %row.stream_id, error = %e, "unreadable ssf stream")
                }
            }
        }
        self.streams.store(Arc::new(streams));
        Ok(())
    }

    /// The generated keys, as stored (other instances may have rotated them).
    async fn reload_keys(&self) -> Result<(), SsfError> {
        let mut keys = Vec::new();
        for row in self.store.ssf_keys().await? {
            let Some(alg) = KeyAlg::parse(&row.alg) else {
                continue;
            };
            let jwk: Value =
                serde_json::from_str(&row.public_jwk).map_err(|e| SigningError::BadKey {
                    kid: row.kid.clone(),
                    reason: e.to_string(),
                })?;
            keys.push(SigningKey::from_parts(
                row.kid,
                alg,
                row.private_der,
                jwk,
                row.created_at,
                row.retired_at,
            )?);
        }
        self.keys.store(Arc::new(keys));
        Ok(())
    }

    /// Reloads every few seconds and rotates keys that are due, until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut rounds: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            rounds += 1;
            // Hourly: a key past its lifetime is replaced (start does the same).
            let result = if rounds.is_multiple_of(720) {
                self.start().await
            } else {
                self.reload().await
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "ssf transmitter reload failed");
            }
        }
    }

    fn current_key(&self, alg: KeyAlg) -> Option<SigningKey> {
        self.keys
            .load()
            .iter()
            .filter(|k| k.alg == alg && k.retired_at.is_none())
            .max_by_key(|k| (k.created_at, k.kid.clone()))
            .cloned()
    }

    /// The JWKS: current keys and retired ones still within the overlap.
    pub fn jwks(&self) -> Value {
        let now = now_millis();
        let overlap = i64::try_from(self.settings.overlap.as_millis()).unwrap_or(i64::MAX);
        let keys: Vec<Value> = self
            .keys
            .load()
            .iter()
            // A configured key is published as long as it is listed.
            .filter(|k| {
                !self.settings.configured_keys.is_empty()
                    || k.retired_at.is_none_or(|r| r.saturating_add(overlap) > now)
            })
            .map(|k| k.public_jwk.clone())
            .collect();
        json!({ "keys": keys })
    }

    fn base(&self) -> Result<&str, SsfError> {
        self.settings
            .public_url
            .as_deref()
            .map(|u| u.trim_end_matches('/'))
            .ok_or(SsfError::Off)
    }

    /// `iss` of a realm's SETs.
    pub fn issuer(&self, realm: &str) -> Result<String, SsfError> {
        Ok(format!("{}/realms/{realm}", self.base()?))
    }

    /// The transmitter metadata (SSF 1.0 section 7.1) of a realm, or of the service (`None`:
    /// no stream management endpoints, which are per realm).
    pub fn metadata(&self, realm: Option<&str>) -> Result<Value, SsfError> {
        let base = self.base()?;
        let mut doc = json!({
            "spec_version": "1_0",
            "issuer": base,
            "jwks_uri": format!("{base}/ssf/jwks.json"),
            "delivery_methods_supported": [PUSH, POLL],
            "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6750"}],
            "default_subjects": "ALL",
        });
        if let (Some(realm), Some(obj)) = (realm, doc.as_object_mut()) {
            let r = format!("{base}/realms/{realm}/ssf/transmitter");
            obj.insert("issuer".into(), json!(self.issuer(realm)?));
            obj.insert(
                "configuration_endpoint".into(),
                json!(format!("{r}/stream")),
            );
            obj.insert("status_endpoint".into(), json!(format!("{r}/status")));
            obj.insert(
                "add_subject_endpoint".into(),
                json!(format!("{r}/add-subject")),
            );
            obj.insert(
                "remove_subject_endpoint".into(),
                json!(format!("{r}/remove-subject")),
            );
            obj.insert("verification_endpoint".into(), json!(format!("{r}/verify")));
        }
        Ok(doc)
    }

    fn poll_url(&self, realm: &str, id: &str) -> Result<String, SsfError> {
        Ok(format!(
            "{}/realms/{realm}/ssf/transmitter/poll/{id}",
            self.base()?
        ))
    }

    /// The stream as a receiver sees it.
    pub fn view(&self, s: &Stream) -> Result<StreamView, SsfError> {
        let endpoint = match s.delivery.method.as_str() {
            POLL => self.poll_url(&s.realm, &s.stream_id)?,
            _ => s.delivery.endpoint_url.clone().unwrap_or_default(),
        };
        Ok(StreamView {
            stream_id: s.stream_id.clone(),
            iss: self.issuer(&s.realm)?,
            aud: s.aud.clone(),
            events_supported: EVENTS_SUPPORTED.iter().map(|e| (*e).to_owned()).collect(),
            events_requested: s.events_requested.clone(),
            events_delivered: s.events_delivered(),
            delivery: json!({"method": s.delivery.method, "endpoint_url": endpoint}),
            description: s.description.clone(),
        })
    }

    fn find(&self, realm: &str, id: &str) -> Result<Arc<Stream>, SsfError> {
        self.streams
            .load()
            .iter()
            .find(|s| s.realm == realm && s.stream_id == id)
            .cloned()
            .ok_or_else(|| SsfError::NotFound(id.to_owned()))
    }

    /// The realm's streams.
    pub fn list(&self, realm: &str) -> Result<Vec<Arc<Stream>>, SsfError> {
        self.base()?;
        Ok(self
            .streams
            .load()
            .iter()
            .filter(|s| s.realm == realm)
            .cloned()
            .collect())
    }

    /// One stream of the realm.
    pub fn get(&self, realm: &str, id: &str) -> Result<Arc<Stream>, SsfError> {
        self.base()?;
        self.find(realm, id)
    }

    fn check_delivery(
        &self,
        realm: &str,
        d: &DeliveryConfig,
        own: Option<&str>,
    ) -> Result<(), SsfError> {
        match d.method.as_str() {
            PUSH => {
                let Some(url) = d.endpoint_url.as_deref() else {
                    return Err(SsfError::Invalid(
                        "push delivery needs delivery.endpoint_url".into(),
                    ));
                };
                crate::oidc::tls::check_url(url)
                    .map_err(|e| SsfError::Invalid(format!("delivery.endpoint_url: {e}")))?;
                if url.len() > 2_048 {
                    return Err(SsfError::Invalid(
                        "delivery.endpoint_url is too long".into(),
                    ));
                }
                self.check_push_host(url).map_err(SsfError::Invalid)?;
                if d.authorization_header
                    .as_ref()
                    .is_some_and(|h| h.len() > 4_096)
                {
                    return Err(SsfError::Invalid(
                        "delivery.authorization_header is too long".into(),
                    ));
                }
                let taken = self.streams.load().iter().any(|s| {
                    s.realm == realm
                        && Some(s.stream_id.as_str()) != own
                        && s.delivery.endpoint_url.as_deref() == Some(url)
                });
                if taken {
                    return Err(SsfError::Conflict(format!(
                        "a stream of this realm already pushes to {url}"
                    )));
                }
                Ok(())
            }
            POLL => Ok(()),
            other => Err(SsfError::Invalid(format!(
                "delivery.method {other:?} is not supported ({PUSH}, {POLL})"
            ))),
        }
    }

    /// Whether `url`'s scheme, host and port are one of `push_allowed_hosts`.
    fn check_push_host(&self, url: &str) -> Result<(), String> {
        let parsed =
            reqwest::Url::parse(url).map_err(|e| format!("delivery.endpoint_url {url:?}: {e}"))?;
        let host = parsed.host_str().unwrap_or_default();
        let port = parsed.port_or_known_default().unwrap_or_default();
        let allowed = self.settings.push_allowed_hosts.iter().any(|a| {
            a.scheme == parsed.scheme()
                && a.host
                    .eq_ignore_ascii_case(host.trim_start_matches('[').trim_end_matches(']'))
                && a.port == port
        });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "delivery.endpoint_url: {}://{host}:{port} is not in the operator's \
                 [ssf_transmitter] push_allowed_hosts",
                parsed.scheme()
            ))
        }
    }

    fn check_events(events: &[String]) -> Result<(), SsfError> {
        if events.len() > 32 || events.iter().any(|e| e.len() > 512) {
            return Err(SsfError::Invalid("events_requested is too large".into()));
        }
        Ok(())
    }

    /// Creates a stream for the caller (`aud`).
    pub async fn create(
        &self,
        realm: &str,
        aud: &str,
        req: StreamRequest,
        audit: AuditEntry,
    ) -> Result<Arc<Stream>, SsfError> {
        self.base()?;
        let delivery = req.delivery.unwrap_or(DeliveryConfig {
            method: POLL.to_owned(),
            endpoint_url: None,
            authorization_header: None,
        });
        self.check_delivery(realm, &delivery, None)?;
        let events = req.events_requested.unwrap_or_default();
        Self::check_events(&events)?;
        let stream = Stream {
            stream_id: uuid::Uuid::new_v4().simple().to_string(),
            realm: realm.to_owned(),
            aud: aud.to_owned(),
            events_requested: events,
            delivery: normalise(delivery),
            description: req.description,
            status: StreamStatus::Enabled,
            reason: None,
            removed_subjects: Vec::new(),
            pending_verification: None,
        };
        let now = now_millis();
        self.store
            .ssf_insert_stream(
                StreamRow {
                    stream_id: stream.stream_id.clone(),
                    realm: realm.to_owned(),
                    config: to_json(&stream)?,
                    created_at: now,
                    updated_at: now,
                },
                Some(audit.target(stream.stream_id.as_str())),
            )
            .await?;
        self.reload().await?;
        tracing::info!(%realm, stream = %stream.stream_id, method = %stream.delivery.method, "ssf stream created");
        Ok(Arc::new(stream))
    }

    /// Stores `stream`'s new state; `audit` records a receiver's change (none for
    /// Lockstep's own bookkeeping, such as a verification held for the next poll).
    async fn save(&self, stream: &Stream, audit: Option<AuditEntry>) -> Result<(), SsfError> {
        let audit = audit.map(|a| a.target(stream.stream_id.as_str()));
        let found = self
            .store
            .ssf_update_stream(
                StreamRow {
                    stream_id: stream.stream_id.clone(),
                    realm: stream.realm.clone(),
                    config: to_json(stream)?,
                    created_at: 0,
                    updated_at: now_millis(),
                },
                audit,
            )
            .await?;
        self.reload().await?;
        if found {
            Ok(())
        } else {
            Err(SsfError::NotFound(stream.stream_id.clone()))
        }
    }

    /// PATCH (`replace` false: the given fields change) or PUT (`replace` true: every
    /// receiver-supplied field is given).
    pub async fn update(
        &self,
        realm: &str,
        req: StreamRequest,
        replace: bool,
        audit: AuditEntry,
    ) -> Result<Arc<Stream>, SsfError> {
        let id = req
            .stream_id
            .clone()
            .ok_or_else(|| SsfError::Invalid("stream_id is required".into()))?;
        let mut stream = (*self.get(realm, &id)?).clone();
        if replace && (req.delivery.is_none() || req.events_requested.is_none()) {
            return Err(SsfError::Invalid(
                "a replacement gives delivery and events_requested".into(),
            ));
        }
        if let Some(d) = req.delivery {
            self.check_delivery(realm, &d, Some(&id))?;
            if d.method != stream.delivery.method {
                return Err(SsfError::Invalid(
                    "delivery.method cannot change; delete the stream and create another".into(),
                ));
            }
            stream.delivery = normalise(d);
        }
        if let Some(e) = req.events_requested {
            Self::check_events(&e)?;
            stream.events_requested = e;
        }
        if replace || req.description.is_some() {
            stream.description = req.description;
        }
        self.save(&stream, Some(audit)).await?;
        Ok(Arc::new(stream))
    }

    /// Deletes a stream; its undelivered events are dropped.
    pub async fn delete(&self, realm: &str, id: &str, audit: AuditEntry) -> Result<(), SsfError> {
        let stream = self.get(realm, id)?;
        if !self
            .store
            .ssf_delete_stream(realm, id, &stream.target(), Some(audit.target(id)))
            .await?
        {
            return Err(SsfError::NotFound(id.to_owned()));
        }
        self.reload().await?;
        tracing::info!(%realm, stream = %id, "ssf stream deleted");
        Ok(())
    }

    /// Sets a stream's status.
    pub async fn set_status(
        &self,
        realm: &str,
        id: &str,
        status: StreamStatus,
        reason: Option<String>,
        audit: AuditEntry,
    ) -> Result<Arc<Stream>, SsfError> {
        let mut stream = (*self.get(realm, id)?).clone();
        stream.status = status;
        stream.reason = reason;
        self.save(&stream, Some(audit)).await?;
        Ok(Arc::new(stream))
    }

    /// Adds a subject back (every subject is in a stream unless removed).
    pub async fn add_subject(
        &self,
        realm: &str,
        id: &str,
        subject: Value,
        audit: AuditEntry,
    ) -> Result<(), SsfError> {
        check_subject(&subject)?;
        let mut stream = (*self.get(realm, id)?).clone();
        stream.removed_subjects.retain(|s| *s != subject);
        self.save(&stream, Some(audit)).await
    }

    /// Removes a subject: its events are no longer sent on this stream.
    pub async fn remove_subject(
        &self,
        realm: &str,
        id: &str,
        subject: Value,
        audit: AuditEntry,
    ) -> Result<(), SsfError> {
        check_subject(&subject)?;
        let mut stream = (*self.get(realm, id)?).clone();
        if stream.removed_subjects.len() >= 10_000 {
            return Err(SsfError::Invalid("too many removed subjects".into()));
        }
        if !stream.removed_subjects.contains(&subject) {
            stream.removed_subjects.push(subject);
        }
        self.save(&stream, Some(audit)).await
    }

    /// Sends a verification SET with the receiver's `state`: pushed now, or held for the
    /// next poll.
    pub async fn verify(
        self: &Arc<Self>,
        realm: &str,
        id: &str,
        state: Option<String>,
    ) -> Result<(), SsfError> {
        let stream = self.get(realm, id)?;
        let jti = uuid::Uuid::now_v7().to_string();
        let mut event = serde_json::Map::new();
        if let Some(state) = state {
            event.insert("state".into(), Value::String(state));
        }
        let claims = json!({
            "iss": self.issuer(realm)?,
            "aud": stream.aud,
            "jti": jti,
            "iat": chrono::Utc::now().timestamp(),
            "sub_id": {"format": "opaque", "id": stream.stream_id},
            "events": { VERIFICATION: Value::Object(event) },
        });
        let jwt = self.sign(&claims)?;
        if stream.is_push() {
            let this = self.clone();
            tokio::spawn(async move {
                for wait in [0u64, 1_000, 5_000] {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    match this.send(&stream, &jwt).await {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::warn!(stream = %stream.stream_id, reason = %e.reason(), "ssf verification push failed")
                        }
                    }
                }
            });
            Ok(())
        } else {
            let mut stream = (*stream).clone();
            stream.pending_verification = Some((jti, jwt));
            self.save(&stream, None).await
        }
    }

    fn sign(&self, claims: &Value) -> Result<String, SsfError> {
        let key = self
            .current_key(self.settings.signing_alg)
            .ok_or_else(|| SigningError::Sign("no signing key is loaded".into()))?;
        Ok(key.sign("secevent+jwt", claims)?)
    }

    /// The targets of an event: every stream of its realm that wants it (enabled or paused).
    pub fn route(&self, event: &SyncEvent) -> Vec<String> {
        self.routes_snapshot()(event)
    }

    /// A router over the streams as they are now (the fan-out reads it once per batch).
    pub fn routes_snapshot(&self) -> impl Fn(&SyncEvent) -> Vec<String> + use<> {
        let streams = self.streams.load_full();
        move |event| {
            streams
                .iter()
                .filter(|s| s.wants(event))
                .map(|s| s.target())
                .collect()
        }
    }

    /// The push streams that are enabled (each gets a lane).
    pub fn push_targets(&self) -> Vec<String> {
        self.streams
            .load()
            .iter()
            .filter(|s| s.is_push() && s.status == StreamStatus::Enabled)
            .map(|s| s.target())
            .collect()
    }

    /// The enabled push stream behind a target name.
    pub fn push_stream(&self, target: &str) -> Option<Arc<Stream>> {
        let id = target.strip_prefix(TARGET_PREFIX)?;
        self.streams
            .load()
            .iter()
            .find(|s| s.stream_id == id && s.is_push() && s.status == StreamStatus::Enabled)
            .cloned()
    }

    /// The SET of an event for a stream, with its `jti`.
    pub fn set_for(
        &self,
        stream: &Stream,
        event: &SyncEvent,
    ) -> Result<(String, String), SsfError> {
        let uri = event_uri(event).ok_or_else(|| {
            SsfError::Invalid(format!("{} events are not sent", event.event_type))
        })?;
        let jti = jti(stream, &event.event_id);
        let jwt = self.build_set(&stream.realm, &stream.aud, &jti, uri, event)?;
        Ok((jti, jwt))
    }

    /// The one SET builder of streams and connectors: the claims of `event` under the event
    /// type `uri`, signed with the current key.
    fn build_set(
        &self,
        realm: &str,
        aud: &str,
        jti: &str,
        uri: &str,
        event: &SyncEvent,
    ) -> Result<String, SsfError> {
        let mut body = serde_json::Map::new();
        body.insert(
            "event_timestamp".into(),
            json!(event.occurred_at.timestamp()),
        );
        if event.event_type == EventType::Logout {
            let reason = event.end_reason.unwrap_or(EndReason::Logout);
            body.insert("initiating_entity".into(), json!(initiating_entity(reason)));
            body.insert(
                "reason_admin".into(),
                json!({"en": format!("session {} ended: {reason}", event.external_id)}),
            );
        }
        if event.event_type == EventType::Refresh
            && let Some(expires) = event.expires_at
        {
            body.insert("expires_at".into(), json!(expires.timestamp()));
        }
        let mut subject = serde_json::Map::new();
        subject.insert("format".into(), json!("complex"));
        if let Some(user) = &event.user_id {
            let id = match self.settings.idp_issuers.get(&event.realm) {
                Some(iss) => json!({"format": "iss_sub", "iss": iss, "sub": user}),
                None => json!({"format": "opaque", "id": user}),
            };
            subject.insert("user".into(), id);
        }
        let session = event
            .idp_session_id
            .as_deref()
            .unwrap_or(&event.external_id);
        subject.insert("session".into(), json!({"format": "opaque", "id": session}));
        let claims = json!({
            "iss": self.issuer(realm)?,
            "aud": aud,
            "jti": jti,
            "iat": chrono::Utc::now().timestamp(),
            "txn": event.event_id,
            "sub_id": Value::Object(subject),
            "events": { uri: Value::Object(body) },
        });
        self.sign(&claims)
    }

    /// The SET a connector delivers for `event` to `audience` (see [`EventSigner`]).
    fn set_for_connector(&self, event: &SyncEvent, audience: &str) -> Result<String, SsfError> {
        self.base()?;
        let jti = connector_jti(&event.event_id, audience);
        self.build_set(
            &event.realm,
            audience,
            &jti,
            connector_event_uri(event),
            event,
        )
    }

    /// One push attempt of an event (RFC 8935): 202 (or any 2xx) delivers; a 400 with an
    /// `err` is a permanent refusal (a dead letter); anything else is tried again.
    pub async fn push(&self, stream: &Stream, event: &SyncEvent) -> Result<(), HookFailure> {
        let (_, jwt) = self
            .set_for(stream, event)
            .map_err(|e| HookFailure::Retry(format!("cannot make the SET: {e}")))?;
        self.send(stream, &jwt).await
    }

    async fn send(&self, stream: &Stream, jwt: &str) -> Result<(), HookFailure> {
        let url = stream
            .delivery
            .endpoint_url
            .as_deref()
            .ok_or_else(|| HookFailure::Fail("the stream has no endpoint_url".into()))?;
        // Checked again on every push: the operator may have withdrawn the host since the
        // stream was made.
        self.check_push_host(url).map_err(HookFailure::Fail)?;
        let mut req = self
            .http
            .post(url)
            .timeout(Duration::from_millis(PUSH_TIMEOUT_MS))
            .header(reqwest::header::CONTENT_TYPE, "application/secevent+jwt")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(jwt.to_owned());
        if let Some(auth) = &stream.delivery.authorization_header {
            req = req.header(reqwest::header::AUTHORIZATION, auth);
        }
        let res = req
            .send()
            .await
            .map_err(|e| HookFailure::Retry(format!("push to the receiver failed: {e}")))?;
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        // A refusal is a small JSON object; a receiver cannot make Lockstep buffer more.
        let body: Value = crate::oidc::ssf_client::read_capped(res, MAX_REFUSAL_BYTES)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let err = body["err"].as_str().unwrap_or("").to_owned();
        let what = format!(
            "receiver answered {status}{}{}",
            if err.is_empty() { "" } else { ": " },
            err
        );
        if status == reqwest::StatusCode::BAD_REQUEST && !err.is_empty() {
            Err(HookFailure::Fail(what))
        } else {
            Err(HookFailure::Retry(what))
        }
    }

    /// An RFC 8936 poll: records `ack` (delivered) and `setErrs` (dead letters), then leases
    /// and returns up to `maxEvents` waiting SETs (waiting up to 10 s for one unless
    /// `returnImmediately`).
    pub async fn poll(
        &self,
        realm: &str,
        id: &str,
        req: PollRequest,
    ) -> Result<PollResponse, SsfError> {
        let stream = self.get(realm, id)?;
        if stream.is_push() {
            return Err(SsfError::Invalid("this stream delivers by push".into()));
        }
        if req.ack.len() + req.set_errs.len() > 10_000 {
            return Err(SsfError::Invalid(
                "too many acknowledgements in one poll".into(),
            ));
        }
        let target = stream.target();
        // Acknowledgements.
        let mut verified = false;
        let mut records = Vec::new();
        let answered: Vec<(String, Option<String>)> = req
            .ack
            .iter()
            .map(|j| (j.clone(), None))
            .chain(req.set_errs.iter().map(|(j, e)| {
                let why = format!(
                    "{}: {}",
                    e["err"].as_str().unwrap_or("refused"),
                    e["description"].as_str().unwrap_or("")
                );
                (j.clone(), Some(why))
            }))
            .collect();
        if let Some((vjti, _)) = &stream.pending_verification
            && answered.iter().any(|(j, _)| j == vjti)
        {
            verified = true;
        }
        let by_event: HashMap<String, Option<String>> = answered
            .into_iter()
            .filter_map(|(j, e)| event_of(&stream, &j).map(|ev| (ev.to_owned(), e)))
            .collect();
        let ids: Vec<String> = by_event.keys().cloned().collect();
        let now = now_millis();
        for pending in self.store.ssf_pending(&target, &ids).await? {
            let error = by_event.get(&pending.event_id).cloned().flatten();
            let (result, outcome) = match &error {
                None => (AttemptResult::Delivered, "delivered"),
                Some(_) => (AttemptResult::Dead, "fail"),
            };
            records.push(AttemptRecord {
                delivery_id: pending.id,
                attempt: pending.attempts.saturating_add(1),
                result,
                outcome: outcome.to_owned(),
                error,
                version: "ssf-poll".to_owned(),
                started_at: now,
                finished_at: now,
            });
        }
        if !records.is_empty() {
            self.store.record(records).await?;
        }
        if verified {
            let mut s = (*stream).clone();
            s.pending_verification = None;
            self.save(&s, None).await?;
        }
        // SETs.
        let max = req.max_events.unwrap_or(100).clamp(0, POLL_MAX);
        let mut sets = BTreeMap::new();
        if max == 0 {
            return Ok(PollResponse {
                sets,
                more_available: false,
            });
        }
        if let Some((j, jwt)) = self.find(realm, id)?.pending_verification.clone() {
            sets.insert(j, jwt);
        }
        let deadline = tokio::time::Instant::now() + POLL_WAIT;
        let mut more = false;
        // Bounded: one claim per 100 ms until the deadline.
        for _ in 0..=(POLL_WAIT.as_millis() / 100) {
            if stream.status == StreamStatus::Enabled {
                let room = max - i64::try_from(sets.len()).unwrap_or(0);
                if room > 0 {
                    let claimed = self
                        .store
                        .claim(LaneClaim {
                            connector: target.clone(),
                            limit: room + 1,
                            lease_until: now_millis() + POLL_LEASE_MS,
                        })
                        .await?;
                    for (i, d) in claimed.into_iter().enumerate() {
                        if i64::try_from(i).unwrap_or(i64::MAX) >= room {
                            // Claimed one more than fits, to know there is more: give it back.
                            more = true;
                            self.store.unlease(vec![d.id]).await?;
                            continue;
                        }
                        let (j, jwt) = self.set_for(&stream, &d.event)?;
                        sets.insert(j, jwt);
                    }
                }
            }
            if !sets.is_empty()
                || req.return_immediately.unwrap_or(false)
                || tokio::time::Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(PollResponse {
            sets,
            more_available: more,
        })
    }
}

impl EventSigner for SsfTransmitter {
    fn sign_event(&self, event: &SyncEvent, audience: &str) -> Result<String, SignRefusal> {
        check_audience(audience)?;
        if self.current_key(self.settings.signing_alg).is_none() {
            return Err(SignRefusal::Unavailable);
        }
        self.set_for_connector(event, audience)
            .map_err(|e| match e {
                SsfError::Off => SignRefusal::Unavailable,
                e => SignRefusal::Failed(e.to_string()),
            })
    }
}

/// A SET's `jti`: the event's id and the stream's, so that the copies of one event on two
/// streams differ.
fn jti(stream: &Stream, event_id: &str) -> String {
    format!("{event_id}.{}", stream.stream_id)
}

/// The event id of one of this stream's `jti`s.
fn event_of<'a>(stream: &Stream, jti: &'a str) -> Option<&'a str> {
    jti.strip_suffix(stream.stream_id.as_str())?
        .strip_suffix('.')
}

/// Who ended a session, in CAEP's words.
fn initiating_entity(reason: EndReason) -> &'static str {
    match reason {
        EndReason::Logout | EndReason::IdpLogout => "user",
        EndReason::Admin | EndReason::Revoked => "admin",
        EndReason::Expired | EndReason::DelegationEnded => "policy",
        EndReason::Cascade | EndReason::Reconciled => "system",
    }
}

fn normalise(mut d: DeliveryConfig) -> DeliveryConfig {
    if d.method == POLL {
        d.endpoint_url = None;
        d.authorization_header = None;
    }
    d
}

fn to_json(stream: &Stream) -> Result<String, SsfError> {
    serde_json::to_string(stream).map_err(|e| SsfError::Store(StoreError::Corrupt(e.to_string())))
}

fn check_subject(subject: &Value) -> Result<(), SsfError> {
    if !subject.is_object() || subject["format"].as_str().is_none() {
        return Err(SsfError::Invalid(
            "subject must be a subject identifier with a format (RFC 9493)".into(),
        ));
    }
    if subject.to_string().len() > 2_048 {
        return Err(SsfError::Invalid("subject is too large".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(kind: &str) -> SyncEvent {
        serde_json::from_value(json!({
            "eventId": "e1", "type": kind, "realm": "acme", "externalId": "s1",
            "kind": "PARENT", "attributes": {}, "occurredAt": "2026-11-23T00:00:00Z",
            "userId": "u1", "idpSessionId": "kc1"
        }))
        .unwrap()
    }

    #[test]
    fn subjects_match_the_user_or_the_session() {
        let e = event("logout");
        assert!(subject_matches(
            &json!({"format": "opaque", "id": "u1"}),
            &e
        ));
        assert!(subject_matches(
            &json!({"format": "opaque", "id": "kc1"}),
            &e
        ));
        assert!(subject_matches(
            &json!({"format": "iss_sub", "iss": "x", "sub": "u1"}),
            &e
        ));
        assert!(!subject_matches(
            &json!({"format": "iss_sub", "iss": "x", "sub": "u2"}),
            &e
        ));
        assert!(subject_matches(
            &json!({"format": "complex", "user": {"format": "opaque", "id": "u1"}}),
            &e
        ));
        assert!(!subject_matches(
            &json!({"format": "email", "email": "a@b"}),
            &e
        ));
    }

    #[test]
    fn a_jti_names_its_event_on_its_stream_only() {
        let s = Stream {
            stream_id: "abc".into(),
            realm: "acme".into(),
            aud: "r".into(),
            events_requested: vec![SESSION_REVOKED.into()],
            delivery: DeliveryConfig {
                method: POLL.into(),
                endpoint_url: None,
                authorization_header: None,
            },
            description: None,
            status: StreamStatus::Enabled,
            reason: None,
            removed_subjects: Vec::new(),
            pending_verification: None,
        };
        assert_eq!(event_of(&s, &jti(&s, "e-1")), Some("e-1"));
        assert_eq!(event_of(&s, "e-1.abd"), None);
        assert!(s.wants(&event("logout")));
        assert!(!s.wants(&event("login")));
    }

    async fn transmitter(
        public_url: Option<&str>,
        alg: KeyAlg,
    ) -> (SsfTransmitter, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::connect(&crate::store::StoreOptions::new(url))
            .await
            .unwrap();
        let key = SigningKey::generate(alg, now_millis()).unwrap();
        let settings = TransmitterSettings {
            public_url: public_url.map(str::to_owned),
            signing_alg: alg,
            configured_keys: vec![key.clone()],
            ..TransmitterSettings::default()
        };
        let t = SsfTransmitter::new(store, settings, reqwest::Client::new());
        t.keys.store(Arc::new(vec![key]));
        (t, dir)
    }

    #[tokio::test]
    async fn a_connector_set_is_built_by_the_host_and_verifies() {
        for alg in [KeyAlg::Es256, KeyAlg::Rs256] {
            let (t, _dir) = transmitter(Some("https://ls.example/"), alg).await;
            let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(t.jwks()).unwrap();
            for (kind, uri) in [
                ("logout", SESSION_REVOKED),
                ("login", SESSION_ESTABLISHED),
                ("revoke", GRANTS_REVOKED),
                ("refresh", SESSION_REFRESHED),
            ] {
                let e = event(kind);
                let jwt = t.sign_event(&e, "https://rp.example").unwrap();
                let header = jsonwebtoken::decode_header(&jwt).unwrap();
                assert_eq!(header.typ.as_deref(), Some("secevent+jwt"));
                let kid = header.kid.clone().unwrap();
                let jwk = jwks.find(&kid).unwrap();
                let mut v = jsonwebtoken::Validation::new(header.alg);
                v.set_audience(&["https://rp.example"]);
                v.set_issuer(&["https://ls.example/realms/acme"]);
                v.required_spec_claims.clear();
                let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
                let claims = jsonwebtoken::decode::<Value>(&jwt, &key, &v)
                    .unwrap()
                    .claims;
                assert_eq!(claims["txn"], "e1");
                assert!(claims["events"][uri].is_object(), "{kind}: {claims}");
                assert_eq!(claims["sub_id"]["session"]["id"], "kc1");
                // The same event and audience give the same jti; another audience another.
                let again = jsonwebtoken::decode::<Value>(
                    &t.sign_event(&e, "https://rp.example").unwrap(),
                    &key,
                    &v,
                )
                .unwrap()
                .claims;
                assert_eq!(claims["jti"], again["jti"]);
                assert_ne!(claims["jti"], connector_jti("e1", "https://other.example"));
            }
        }
    }

    #[tokio::test]
    async fn no_transmitter_no_signed_events() {
        let (t, _dir) = transmitter(None, KeyAlg::Es256).await;
        assert_eq!(
            t.sign_event(&event("logout"), "https://rp.example"),
            Err(SignRefusal::Unavailable)
        );
        let (t, _dir) = transmitter(Some("https://ls.example"), KeyAlg::Es256).await;
        t.keys.store(Arc::new(Vec::new()));
        assert_eq!(
            t.sign_event(&event("logout"), "https://rp.example"),
            Err(SignRefusal::Unavailable)
        );
        let (t, _dir) = transmitter(Some("https://ls.example"), KeyAlg::Es256).await;
        assert!(matches!(
            t.sign_event(&event("logout"), ""),
            Err(SignRefusal::Audience(_))
        ));
    }
}
