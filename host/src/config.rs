//! Configuration: the optional TOML file (docs/operations.md, "Configuration"), parsed strictly
//! (unknown keys are errors), and validated into the settings the service runs with.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use crate::auth::webhook::{EventKeys, WebhookKeys};
use crate::auth::{ApiKey, Permission};
use crate::domain::rules;

/// Problems with the configuration file; each names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// File path.
        path: String,
        /// Cause (with line and column).
        source: Box<toml::de::Error>,
    },
    /// A value breaks a rule.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The TOML file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen address.
    pub listen: Option<String>,
    /// Database URL.
    pub database_url: Option<String>,
    /// `normal` or `fsync`.
    pub durability: Option<String>,
    /// Directory of connector manifests (`*.toml`) and their components.
    pub connectors_dir: Option<std::path::PathBuf>,
    /// Refuse to start when a connector of the directory does not load (default false: it is
    /// reported as failed and the others serve).
    pub strict_connectors: Option<bool>,
    /// Directory for compiled components.
    pub compile_cache: Option<std::path::PathBuf>,
    /// Per-realm settings.
    #[serde(default)]
    pub realms: BTreeMap<String, RealmConfig>,
    /// Static API keys.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// `[audit]`: the audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[limits]`: request rate, cascade size and connections.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[tls]`: trust for outgoing HTTPS (identity providers).
    #[serde(default)]
    pub tls: TlsConfig,
    /// `[console]`: the operator console at `/console/`.
    #[serde(default)]
    pub console: crate::console::ConsoleConfig,
    /// The URL callers reach the service at (`https://lockstep.example.com`): the base of
    /// the URLs Lockstep publishes about itself (the global token revocation endpoint in its
    /// metadata) and of the audience an IdP's revocation token must name.
    pub public_url: Option<String>,
    /// `[ssf_transmitter]`: Lockstep as a Shared Signals transmitter (on with `public_url`).
    #[serde(default)]
    pub ssf_transmitter: SsfTransmitterConfig,
}

/// `[ssf_transmitter]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfTransmitterConfig {
    /// Algorithm of the SETs' signatures: `RS256` (default) or `ES256`. Keys of both are
    /// generated and published.
    pub signing_alg: Option<String>,
    /// Days a signing key signs before a new one replaces it (default 90).
    pub rotate_after_days: Option<u64>,
    /// Days a replaced key stays in the JWKS (default 7).
    pub key_overlap_days: Option<u64>,
    /// The signing keys, when the operator supplies them (files outside the database, e.g.
    /// from a secrets manager); then none are generated or rotated: the first key of each
    /// algorithm signs, the others are only published (list the next key first and keep the
    /// old one until receivers' caches let go of it).
    #[serde(default)]
    pub keys: Vec<SsfKeyConfig>,
    /// Destinations push streams may deliver to, as `scheme://host[:port]` (the form of a
    /// connector's `allowed_hosts`). Empty (default): only poll streams can be made.
    #[serde(default)]
    pub push_allowed_hosts: Vec<String>,
}

/// One `[[ssf_transmitter.keys]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfKeyConfig {
    /// The key id published in the JWKS and set in each SET's header.
    pub kid: String,
    /// A PEM file with the private key: PKCS#8 EC P-256 (ES256) or RSA ≥ 2048 bits (RS256,
    /// PKCS#8 or PKCS#1).
    pub file: std::path::PathBuf,
}

/// `[tls]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of certificate authorities trusted for HTTPS to identity providers, in
    /// addition to the bundled Mozilla roots (an internal CA).
    pub ca_file: Option<std::path::PathBuf>,
}

/// `[limits]`; every value has a default, 0 switches that limit off.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sustained requests per second per caller (API key, token subject, admin token) on one
    /// instance (default 1000).
    pub requests_per_second: Option<u32>,
    /// Requests a caller may send at once above the sustained rate (default 2 × the rate).
    pub burst: Option<u32>,
    /// Sessions one API destroy may end, descendants included (default 10000).
    pub max_cascade: Option<usize>,
    /// Sessions one `session-tree` read may return; a bigger tree is refused (default 10000).
    pub max_tree: Option<usize>,
    /// Failed authentications one client address may make at once (default 20).
    pub failed_auth_burst: Option<u32>,
    /// Failed authentications per minute one client address may make after its burst
    /// (default 10).
    pub failed_auth_per_minute: Option<u32>,
    /// Client connections open at once; more wait in the listen backlog (default 1024).
    pub max_client_connections: Option<usize>,
    /// Milliseconds a request head may take, from the connection's opening or the request's
    /// first byte (default 10000).
    pub header_read_timeout_ms: Option<u64>,
    /// Milliseconds a request body may take after its head (default 30000).
    pub body_read_timeout_ms: Option<u64>,
    /// Milliseconds a kept-alive connection waits for its next request (default 75000).
    pub idle_timeout_ms: Option<u64>,
    /// Milliseconds a response may wait for a client that does not read it (default 30000).
    pub send_timeout_ms: Option<u64>,
    /// Milliseconds the oldest undelivered event may have waited before new sessions are held
    /// until deliveries catch up (default 300; 0 switches this back-pressure off).
    pub max_delivery_lag_ms: Option<u64>,
    /// Milliseconds a held new session waits before it is refused with 503 (default 5000).
    pub admission_wait_ms: Option<u64>,
}

/// Default of `[limits] requests_per_second`.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 1_000;
/// Default of `[limits] failed_auth_burst`.
pub const DEFAULT_FAILED_AUTH_BURST: u32 = 20;
/// Default of `[limits] failed_auth_per_minute`.
pub const DEFAULT_FAILED_AUTH_PER_MINUTE: u32 = 10;
/// Default of `[limits] max_cascade`.
pub const DEFAULT_MAX_CASCADE: usize = 10_000;
/// Default of `[limits] max_tree`: the same as `max_cascade`, so any tree the API may
/// destroy can be read first.
pub const DEFAULT_MAX_TREE: usize = 10_000;
/// Default of `[limits] max_client_connections`.
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: usize = 1_024;
/// Default of `[limits] header_read_timeout_ms`.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Default of `[limits] body_read_timeout_ms`.
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30_000;
/// Default of `[limits] idle_timeout_ms`: above the 60 s idle timeout of common load
/// balancers, so they close a kept-alive connection before Lockstep does.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 75_000;
/// Default of `[limits] send_timeout_ms`.
pub const DEFAULT_SEND_TIMEOUT_MS: u64 = 30_000;
/// Default of `[limits] max_delivery_lag_ms`: with a call's own time on top, a logout reaches
/// a legacy system within a second while the API runs flat out.
pub const DEFAULT_MAX_DELIVERY_LAG_MS: u64 = 300;
/// Default of `[limits] admission_wait_ms`: well inside common client timeouts.
pub const DEFAULT_ADMISSION_WAIT_MS: u64 = 5_000;

/// The limits the service runs with (`None`: that limit is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Per-caller rate and burst.
    pub rate: Option<(u32, u32)>,
    /// Failed authentications per client address: per minute and burst.
    pub failed_auth: Option<(u32, u32)>,
    /// Sessions one API destroy may end.
    pub max_cascade: Option<usize>,
    /// Sessions one tree read may return.
    pub max_tree: Option<usize>,
    /// Client connections open at once.
    pub max_client_connections: Option<usize>,
    /// Connection deadlines.
    pub timeouts: crate::api::serve::Timeouts,
    /// Back-pressure of deliveries onto new sessions (`None`: off).
    pub admission: Option<crate::sync::admission::AdmissionConfig>,
}

impl LimitsConfig {
    /// Applies the defaults; `requests_per_second` from the command line wins over the file.
    pub fn resolve(&self, requests_per_second: Option<u32>) -> Result<Limits, ConfigError> {
        let rps = requests_per_second
            .or(self.requests_per_second)
            .unwrap_or(DEFAULT_REQUESTS_PER_SECOND);
        let rate = match (rps, self.burst) {
            (0, _) => None,
            (_, Some(0)) => {
                return Err(ConfigError::Invalid(
                    "[limits] burst must be at least 1 (set requests_per_second = 0 to switch \
                     the rate limit off)"
                        .into(),
                ));
            }
            (rps, burst) => Some((rps, burst.unwrap_or(rps.saturating_mul(2)))),
        };
        let off_if_zero = |v: usize| (v > 0).then_some(v);
        let ms = |v: Option<u64>, default: u64| {
            Some(v.unwrap_or(default))
                .filter(|ms| *ms > 0)
                .map(std::time::Duration::from_millis)
        };
        let timeouts = crate::api::serve::Timeouts {
            header_read: ms(self.header_read_timeout_ms, DEFAULT_HEADER_READ_TIMEOUT_MS),
            body_read: ms(self.body_read_timeout_ms, DEFAULT_BODY_READ_TIMEOUT_MS),
            idle: ms(self.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS),
            send: ms(self.send_timeout_ms, DEFAULT_SEND_TIMEOUT_MS),
        };
        let failed_auth = match (
            self.failed_auth_per_minute
                .unwrap_or(DEFAULT_FAILED_AUTH_PER_MINUTE),
            self.failed_auth_burst.unwrap_or(DEFAULT_FAILED_AUTH_BURST),
        ) {
            (0, _) | (_, 0) => None,
            pair => Some(pair),
        };
        let admission = ms(self.max_delivery_lag_ms, DEFAULT_MAX_DELIVERY_LAG_MS).map(|budget| {
            crate::sync::admission::AdmissionConfig {
                budget,
                max_wait: std::time::Duration::from_millis(
                    self.admission_wait_ms.unwrap_or(DEFAULT_ADMISSION_WAIT_MS),
                ),
            }
        });
        Ok(Limits {
            timeouts,
            admission,
            rate,
            failed_auth,
            max_cascade: off_if_zero(self.max_cascade.unwrap_or(DEFAULT_MAX_CASCADE)),
            max_tree: off_if_zero(self.max_tree.unwrap_or(DEFAULT_MAX_TREE)),
            max_client_connections: off_if_zero(
                self.max_client_connections
                    .unwrap_or(DEFAULT_MAX_CLIENT_CONNECTIONS),
            ),
        })
    }
}

/// `[audit]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Days an audit record is kept (default 90); 0 keeps every record forever.
    pub retention_days: Option<u32>,
}

/// `[realms.NAME]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealmConfig {
    /// OIDC issuer (discovery and JWKS); used by back-channel logout and admin JWTs.
    pub issuer: Option<String>,
    /// Accepted token audiences.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted JWS algorithms.
    #[serde(default)]
    pub allowed_algs: Vec<String>,
    /// Allowed clock skew in seconds.
    pub clock_skew_s: Option<u64>,
    /// When the IdP ends a user session, children become ORPHANED instead of DESTROYED.
    #[serde(default)]
    pub orphan_children: bool,
    /// Scope or client role that grants `users:manage` to an IdP access token.
    pub permission_role: Option<String>,
    /// `originSystem` of the events a back-channel logout produces (default `keycloak`), so
    /// the connector of that name does not get its own logout back.
    pub idp_system: Option<String>,
    /// Secrets that sign the Keycloak extension's event posts (`whsec_<base64>` or a plain
    /// string of at least 16 bytes); more than one during a rotation. Without any, the
    /// realm's `POST /realms/{realm}/events` answers 404.
    #[serde(default)]
    pub events_secrets: Vec<String>,
    /// `[realms.NAME.reconcile]`: compare the realm's sessions with Keycloak's now and then.
    pub reconcile: Option<ReconcileConfig>,
    /// Public OIDC client (authorization code + PKCE) of the operator console's "Sign in with
    /// Keycloak"; without it the realm offers no such sign-in.
    pub console_client_id: Option<String>,
    /// `[[realms.NAME.token_revocation_callers]]`: identity providers whose signed JWTs may
    /// call the realm's global token revocation endpoint.
    #[serde(default)]
    pub token_revocation_callers: Vec<RevocationCallerConfig>,
    /// `[[realms.NAME.ssf_transmitters]]`: OpenID Shared Signals transmitters this realm
    /// receives security events from (as an SSF receiver).
    #[serde(default)]
    pub ssf_transmitters: Vec<RemoteTransmitterConfig>,
}

/// `[[realms.NAME.ssf_transmitters]]`: an SSF 1.0 transmitter (Keycloak 26.7 with
/// `--features=ssf`, Okta, any) whose session and account events end sessions here. Lockstep
/// creates or adopts its stream at start, verifies it and keeps it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteTransmitterConfig {
    /// The transmitter's issuer: `iss` of its SETs and of its metadata.
    pub issuer: String,
    /// Its metadata; default: the well-known URL SSF 1.0 prescribes, then (after a 404)
    /// `{issuer}/.well-known/ssf-configuration`.
    pub metadata_url: Option<String>,
    /// OAuth client Lockstep calls the stream API with (client-credentials grant).
    pub client_id: String,
    /// That client's secret.
    pub client_secret: String,
    /// Token endpoint; default: `token_endpoint` of `{issuer}/.well-known/openid-configuration`.
    pub token_url: Option<String>,
    /// Scopes asked for (default `ssf.manage ssf.read`; empty string: none).
    pub scope: Option<String>,
    /// `push` (default: the transmitter POSTs SETs to `{public_url}/realms/NAME/ssf/push`)
    /// or `poll` (Lockstep fetches them).
    pub delivery: Option<String>,
    /// Event type URIs requested (default: session-revoked, credential-change,
    /// sessions-revoked, account-disabled, account-purged).
    #[serde(default)]
    pub events: Vec<String>,
    /// Audience a SET must name (default: the stream's `aud` as the transmitter reports it).
    pub audience: Option<String>,
    /// `originSystem` of the events and audit actor `idp:<system>` (default `ssf`).
    pub system: Option<String>,
    /// Oldest `iat` accepted, seconds (default 3600).
    pub max_set_age_s: Option<u64>,
    /// Milliseconds between polls when the last one found nothing (default 2000).
    pub poll_interval_ms: Option<u64>,
    /// Push: the secret the stream's `authorization_header` carries (`Bearer <it>`), the same
    /// on every instance behind one `public_url`; default: a random one made at each start.
    pub push_secret: Option<String>,
}

/// `[[realms.NAME.token_revocation_callers]]`: an IdP (Okta, Auth0, any JWT signer with a
/// published key set) trusted to order a user's global token revocation.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationCallerConfig {
    /// `iss` of its tokens.
    pub issuer: String,
    /// Its key set; default: the `jwks_uri` of `{issuer}/.well-known/openid-configuration`.
    pub jwks_uri: Option<String>,
    /// Accepted JWS algorithms (default RS256, ES256, PS256; asymmetric only).
    #[serde(default)]
    pub allowed_algs: Vec<String>,
    /// The system it speaks for: the audit actor `idp:<system>` and the `originSystem` of the
    /// events (default: none, so every subscribed connector hears them; the actor is then
    /// `idp:<issuer>`).
    pub system: Option<String>,
}

/// `[realms.NAME.reconcile]`: Keycloak admin access for the reconciler, which ends what is
/// mapped to Keycloak sessions that Keycloak no longer has. Keycloak's address and realm are
/// those of the realm's `issuer`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Confidential client whose service account holds `realm-management` → `view-users`.
    pub client_id: String,
    /// Its secret; exactly one of `client_secret`, `client_secret_file`, `client_secret_env`.
    pub client_secret: Option<String>,
    /// File holding the secret (trailing newline ignored).
    pub client_secret_file: Option<std::path::PathBuf>,
    /// Environment variable holding the secret.
    pub client_secret_env: Option<String>,
    /// Seconds between the end of one pass and the start of the next (default 300); 0: no
    /// periodic pass, only `lockstep reconcile`.
    pub interval_s: Option<u64>,
    /// Calls to Keycloak per second at most, token requests included (default 5).
    pub calls_per_second: Option<u32>,
    /// PARENTs read per batch (default 100, at most 1000).
    pub batch: Option<u32>,
    /// Milliseconds one call to Keycloak may take (default 10000).
    pub timeout_ms: Option<u64>,
}

/// `[[api_keys]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Name shown in audit records and used as the default origin system.
    pub id: String,
    /// Hex SHA-256 of the key; the key itself is never stored.
    pub sha256: String,
    /// Realms the key may act in (`"*"` for all).
    pub realms: Vec<String>,
    /// Permissions it grants.
    pub permissions: Vec<String>,
    /// The system (connector name) the key speaks for: the default `system` and the only
    /// `originSystem` its calls may name (default: its `id`).
    pub system: Option<String>,
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: display,
                source,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "<inline>".into(),
            source: Box::new(source),
        })
    }

    /// Validated realm policies.
    pub fn realm_policies(&self) -> Result<HashMap<String, RealmConfig>, ConfigError> {
        let mut out = HashMap::new();
        for (name, realm) in &self.realms {
            rules::realm(name)
                .map_err(|e| ConfigError::Invalid(format!("[realms.{name}]: {e}")))?;
            out.insert(name.clone(), realm.clone());
        }
        Ok(out)
    }

    /// Validated API keys.
    pub fn api_keys(&self) -> Result<Vec<ApiKey>, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut keys = Vec::with_capacity(self.api_keys.len());
        for k in &self.api_keys {
            let ctx = |msg: String| ConfigError::Invalid(format!("api key {:?}: {msg}", k.id));
            rules::id("id", &k.id).map_err(|e| ctx(e.to_string()))?;
            if !seen.insert(k.id.clone()) {
                return Err(ctx("duplicate id".into()));
            }
            let digest = hex::decode(&k.sha256)
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| ctx("sha256 must be 64 hex digits".into()))?;
            if k.realms.is_empty() {
                return Err(ctx("realms must not be empty (use [\"*\"] for all)".into()));
            }
            for realm in &k.realms {
                if realm != "*" {
                    rules::realm(realm).map_err(|e| ctx(e.to_string()))?;
                }
            }
            let permissions = k
                .permissions
                .iter()
                .map(|p| p.parse::<Permission>().map_err(&ctx))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(system) = &k.system {
                rules::id("system", system).map_err(|e| ctx(e.to_string()))?;
            }
            keys.push(ApiKey {
                id: k.id.clone(),
                sha256: digest,
                realms: k.realms.clone(),
                permissions,
                system: k.system.clone(),
            });
        }
        Ok(keys)
    }

    /// The realms that accept Keycloak events, with their parsed `events_secrets`.
    pub fn event_keys(&self) -> Result<EventKeys, ConfigError> {
        let mut realms = Vec::new();
        for (name, realm) in self.realm_policies()? {
            let keys = WebhookKeys::parse(&realm.events_secrets).map_err(|e| {
                ConfigError::Invalid(format!("[realms.{name}] events_secrets: {e}"))
            })?;
            realms.push((name, keys));
        }
        Ok(EventKeys::new(realms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_defaults_zero_switches_them_off_and_the_command_line_wins() {
        let none = FileConfig::parse("").unwrap().limits.resolve(None).unwrap();
        let s = |secs| Some(std::time::Duration::from_secs(secs));
        assert_eq!(
            none,
            Limits {
                rate: Some((1_000, 2_000)),
                failed_auth: Some((10, 20)),
                max_cascade: Some(10_000),
                max_tree: Some(10_000),
                max_client_connections: Some(1_024),
                timeouts: crate::api::serve::Timeouts {
                    header_read: s(10),
                    body_read: s(30),
                    idle: s(75),
                    send: s(30),
                },
                admission: Some(crate::sync::admission::AdmissionConfig {
                    budget: std::time::Duration::from_millis(300),
                    max_wait: std::time::Duration::from_secs(5),
                }),
            }
        );
        let off = FileConfig::parse("[limits]\nmax_delivery_lag_ms = 0\n").unwrap();
        assert_eq!(off.limits.resolve(None).unwrap().admission, None);
        let t = FileConfig::parse("[limits]\nheader_read_timeout_ms = 500\nsend_timeout_ms = 0\n")
            .unwrap()
            .limits
            .resolve(None)
            .unwrap()
            .timeouts;
        assert_eq!(t.header_read, Some(std::time::Duration::from_millis(500)));
        assert_eq!(t.send, None, "0 switches a deadline off");
        let file = FileConfig::parse(
            "[limits]\nrequests_per_second = 5\nburst = 7\nmax_cascade = 0\nmax_tree = 0\nmax_client_connections = 3\n",
        )
        .unwrap();
        let l = file.limits.resolve(None).unwrap();
        assert_eq!(l.rate, Some((5, 7)));
        assert_eq!(l.max_cascade, None);
        assert_eq!(l.max_tree, None);
        let off = FileConfig::parse("[limits]\nfailed_auth_burst = 0\n").unwrap();
        assert_eq!(off.limits.resolve(None).unwrap().failed_auth, None);
        assert_eq!(l.max_client_connections, Some(3));
        assert_eq!(file.limits.resolve(Some(0)).unwrap().rate, None);
        assert_eq!(file.limits.resolve(Some(9)).unwrap().rate, Some((9, 7)));
        let bad = FileConfig::parse("[limits]\nburst = 0\n").unwrap();
        assert!(bad.limits.resolve(None).is_err());
        assert!(
            FileConfig::parse("[limits]\nrps = 1\n").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn documented_example_parses() {
        let cfg = FileConfig::parse(
            r#"
listen = "127.0.0.1:8080"
database_url = "sqlite://lockstep.db"
connectors_dir = "connectors.d"

[realms.acme]
issuer = "http://127.0.0.1:8180/realms/acme"
audiences = ["lockstep"]
allowed_algs = ["RS256", "ES256"]
clock_skew_s = 60
orphan_children = false
permission_role = "users:manage"

[[api_keys]]
id = "portal-app"
system = "portal"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
realms = ["acme"]
permissions = ["users:manage"]
"#,
        )
        .unwrap();
        let keys = cfg.api_keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].system.as_deref(), Some("portal"));
        assert!(cfg.realm_policies().unwrap().contains_key("acme"));
    }

    #[test]
    fn the_tls_section_is_optional_and_strict() {
        assert_eq!(FileConfig::default().tls.ca_file, None);
        let cfg = FileConfig::parse("[tls]\nca_file = \"/etc/lockstep/ca.pem\"\n").unwrap();
        assert_eq!(
            cfg.tls.ca_file.as_deref(),
            Some(Path::new("/etc/lockstep/ca.pem"))
        );
        assert!(FileConfig::parse("[tls]\nroots = \"x\"\n").is_err());
    }

    #[test]
    fn audit_retention_is_optional_and_strict() {
        assert_eq!(FileConfig::default().audit.retention_days, None);
        let cfg = FileConfig::parse("[audit]\nretention_days = 0\n").unwrap();
        assert_eq!(cfg.audit.retention_days, Some(0));
        assert!(FileConfig::parse("[audit]\nretention = 5\n").is_err());
        assert!(FileConfig::parse("[audit]\nretention_days = -1\n").is_err());
    }

    #[test]
    fn event_secrets_are_checked_at_start() {
        let ok = FileConfig::parse(
            "[realms.acme]\nevents_secrets = [\"whsec_c2VjcmV0LWZvci1sb2Nrc3RlcC1ldmVudHM=\"]\n\
             [realms.other]\n",
        )
        .unwrap();
        let keys = ok.event_keys().unwrap();
        assert!(keys.realm("acme").is_some());
        assert!(keys.realm("other").is_none(), "no secrets: no intake");
        for bad in ["short", "whsec_not*base64"] {
            let cfg = FileConfig::parse(&format!("[realms.acme]\nevents_secrets = [\"{bad}\"]\n"))
                .unwrap();
            let err = cfg.event_keys().unwrap_err().to_string();
            assert!(err.contains("[realms.acme] events_secrets"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(FileConfig::parse("lisen = \"x\"").is_err());
        let bad_hash = FileConfig::parse(
            "[[api_keys]]\nid = \"a\"\nsha256 = \"zz\"\nrealms = [\"*\"]\npermissions = []\n",
        )
        .unwrap();
        assert!(bad_hash.api_keys().is_err());
        let bad_perm = FileConfig::parse(&format!(
            "[[api_keys]]\nid = \"a\"\nsha256 = \"{}\"\nrealms = [\"*\"]\npermissions = [\"root\"]\n",
            "0".repeat(64)
        ))
        .unwrap();
        assert!(bad_perm.api_keys().is_err());
        let bad_realm = FileConfig::parse("[realms.\"a b\"]\n").unwrap();
        assert!(bad_realm.realm_policies().is_err());
    }
}
