//! Connector manifests (docs/connectors.md, "Manifests and loading"): parsed strictly and
//! validated, so a typo is an error at load time rather than a surprise at delivery time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::EventType;
use crate::domain::rules;

/// Highest `memory_mb` a manifest may ask for (the pooling allocator reserves this much).
pub const MAX_MEMORY_MB: u32 = 512;
/// Highest `timeout_ms`.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// Highest `max_attempts`.
pub const MAX_ATTEMPTS: u32 = 100;
/// Highest `max_calls_per_instance`.
pub const MAX_CALLS_PER_INSTANCE: u32 = 1_000_000;
/// Highest `concurrency`: the runtime runs at most this many hook calls at once in all.
pub const MAX_CONCURRENCY: u32 = 64;
/// Most audiences a manifest may let its connector sign events for.
pub const MAX_SIGNING_AUDIENCES: usize = 16;
/// Highest `[http] max_idle_per_host`.
pub const MAX_IDLE_PER_HOST: u32 = 64;
/// Highest `[http] idle_timeout_ms`.
pub const MAX_IDLE_TIMEOUT_MS: u64 = 300_000;

/// Errors in a manifest; each names the field.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid TOML or unknown keys.
    #[error("invalid manifest {path}: {message}")]
    Parse {
        /// The manifest file, or where its text came from.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A value breaks a rule.
    #[error("invalid manifest {path}: {message}")]
    Invalid {
        /// The manifest file, or where its text came from.
        path: String,
        /// Which field and why.
        message: String,
    },
}

/// Direction of synchronisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Lockstep → legacy: the connector receives events.
    Outbound,
    /// Legacy → Lockstep only: the connector receives no events.
    Inbound,
    /// Both directions.
    Both,
}

/// What a failed delivery does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Retry with exponential backoff and full jitter up to `max_attempts`, then dead letter.
    Retry,
    /// Dead letter at once and raise a `connector_alert`.
    Alert,
    /// Record the failure and drop the event.
    Log,
}

/// `[policy]`: what a failed delivery does.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What a delivery that failed for good does (default `retry`).
    #[serde(default = "default_on_failure")]
    pub on_failure: OnFailure,
    /// Attempts before a dead letter (retry policy).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First backoff ceiling; doubles per attempt.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Largest backoff ceiling.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

/// `[http]`: the connector's pool of outgoing keep-alive connections.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpPool {
    /// Idle connections kept per destination (0: a new connection per request).
    #[serde(default = "default_max_idle_per_host")]
    pub max_idle_per_host: u32,
    /// An idle connection is closed after this long.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

fn default_max_idle_per_host() -> u32 {
    16
}
fn default_idle_timeout_ms() -> u64 {
    30_000
}

impl Default for HttpPool {
    fn default() -> Self {
        HttpPool {
            max_idle_per_host: default_max_idle_per_host(),
            idle_timeout_ms: default_idle_timeout_ms(),
        }
    }
}

fn default_on_failure() -> OnFailure {
    OnFailure::Retry
}
fn default_max_attempts() -> u32 {
    5
}
fn default_backoff_ms() -> u64 {
    1_000
}
fn default_max_backoff_ms() -> u64 {
    300_000
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            on_failure: default_on_failure(),
            max_attempts: default_max_attempts(),
            backoff_ms: default_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    #[serde(default)]
    component: Option<PathBuf>,
    #[serde(default = "all_realms")]
    realms: Vec<String>,
    #[serde(default = "all_events")]
    events: Vec<EventType>,
    #[serde(default = "default_mode")]
    mode: SyncMode,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    #[serde(default)]
    signing_audiences: Vec<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_memory_mb")]
    memory_mb: u32,
    #[serde(default)]
    reuse_instance: bool,
    #[serde(default = "default_max_calls_per_instance")]
    max_calls_per_instance: u32,
    #[serde(default = "default_concurrency")]
    concurrency: u32,
    #[serde(default)]
    http: HttpPool,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

fn all_realms() -> Vec<String> {
    vec!["*".into()]
}
fn all_events() -> Vec<EventType> {
    vec![EventType::Login, EventType::Logout, EventType::Revoke]
}
fn default_mode() -> SyncMode {
    SyncMode::Outbound
}
fn default_timeout_ms() -> u64 {
    2_000
}
fn default_memory_mb() -> u32 {
    32
}
fn default_max_calls_per_instance() -> u32 {
    1_000
}
fn default_concurrency() -> u32 {
    16
}

/// An allowed outgoing destination: scheme, host and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AllowedHost {
    /// `http` or `https`.
    pub scheme: String,
    /// Lower-case host name or IP literal.
    pub host: String,
    /// Port (the scheme's default when the manifest omits it).
    pub port: u16,
}

impl AllowedHost {
    /// Parses `scheme://host[:port]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("{text:?} must look like http://host:port"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(format!("{text:?}: scheme must be http or https")),
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err(format!(
                "{text:?} must be scheme://host[:port] without a path"
            ));
        }
        let (host, port) =
            split_host_port(rest).ok_or_else(|| format!("{text:?}: invalid port"))?;
        Ok(AllowedHost {
            scheme,
            host: host.to_ascii_lowercase(),
            port: port.unwrap_or(default_port),
        })
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`.
pub fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((authority, None)),
    }
}

/// The rule for connector names (manifests, the admin API's path): they are file names,
/// metric labels and `originSystem` values, so a short, plain alphabet.
pub fn check_name(name: &str) -> Result<(), String> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain && !name.is_empty() && name.len() <= 64 {
        Ok(())
    } else {
        Err(format!(
            "connector name {name:?} must be 1-64 characters from [A-Za-z0-9._-]"
        ))
    }
}

/// A validated manifest.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Unique name; also the `system` label of sessions the connector owns.
    pub name: String,
    /// Component file (resolved against the manifest's directory; empty for an upload).
    pub component: PathBuf,
    /// Realms it serves (`*` for all).
    pub realms: Vec<String>,
    /// Event types it receives (`refresh` only if listed; it needs a 0.2.0 component, which
    /// loading checks).
    pub events: Vec<EventType>,
    /// Whether it receives events at all (`inbound` connectors do not).
    pub mode: SyncMode,
    /// Outgoing HTTP allowlist.
    pub allowed_hosts: Vec<AllowedHost>,
    /// The audiences the connector may have events signed for (0.3.0's `sign-event`); none
    /// by default. Like `allowed_hosts`, the operator's grant: a connector cannot have
    /// Lockstep vouch for its events to a receiver the operator did not name.
    pub signing_audiences: Vec<String>,
    /// Deadline per hook call.
    pub timeout_ms: u64,
    /// Linear memory cap.
    pub memory_mb: u32,
    /// Serve calls from a warm instance instead of a fresh one per call (for stateless
    /// connectors whose instantiation dominates a call: JavaScript, Python). An instance is
    /// recycled after `max_calls_per_instance` calls, after any trap, timeout or memory cap,
    /// and when the connector is replaced.
    pub reuse_instance: bool,
    /// Calls one warm instance serves before it is recycled (`reuse_instance` only).
    pub max_calls_per_instance: u32,
    /// Hook calls of this connector in flight at once (its delivery lane's width).
    pub concurrency: u32,
    /// Outgoing keep-alive connection pool.
    pub http: HttpPool,
    /// What a failed delivery does: retries, dead letter or drop.
    pub policy: Policy,
    /// Free configuration read by the component.
    pub config: BTreeMap<String, String>,
    /// The manifest text, part of the connector's version.
    pub source: String,
}

impl Manifest {
    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir, &path.display().to_string())
    }

    /// Parses manifest text; relative component paths resolve against `dir`.
    pub fn parse(text: &str, dir: &Path, label: &str) -> Result<Self, ManifestError> {
        Self::parse_with(text, Some(dir), label)
    }

    /// Parses the manifest of an uploaded connector: the component comes with it, so a
    /// `component` path (kept when the same file serves a directory) is ignored.
    pub fn parse_uploaded(text: &str, label: &str) -> Result<Self, ManifestError> {
        Self::parse_with(text, None, label)
    }

    fn parse_with(text: &str, dir: Option<&Path>, label: &str) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: label.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ManifestError::Invalid {
            path: label.to_owned(),
            message,
        };
        rules::id("name", &raw.name).map_err(|e| invalid(e.to_string()))?;
        check_name(&raw.name).map_err(invalid)?;
        if raw.realms.is_empty() {
            return Err(invalid(
                "realms must not be empty (use [\"*\"] for all)".into(),
            ));
        }
        for realm in &raw.realms {
            if realm != "*" {
                rules::realm(realm).map_err(|e| invalid(format!("realms: {e}")))?;
            }
        }
        let allowed_hosts = raw
            .allowed_hosts
            .iter()
            .map(|h| AllowedHost::parse(h).map_err(|e| invalid(format!("allowed_hosts: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if raw.signing_audiences.len() > MAX_SIGNING_AUDIENCES {
            return Err(invalid(format!(
                "signing_audiences lists more than {MAX_SIGNING_AUDIENCES}"
            )));
        }
        for audience in &raw.signing_audiences {
            super::signer::check_audience(audience)
                .map_err(|e| invalid(format!("signing_audiences: {e}")))?;
        }
        if raw.timeout_ms == 0 || raw.timeout_ms > MAX_TIMEOUT_MS {
            return Err(invalid(format!("timeout_ms must be 1-{MAX_TIMEOUT_MS}")));
        }
        if raw.memory_mb == 0 || raw.memory_mb > MAX_MEMORY_MB {
            return Err(invalid(format!("memory_mb must be 1-{MAX_MEMORY_MB}")));
        }
        if raw.max_calls_per_instance == 0 || raw.max_calls_per_instance > MAX_CALLS_PER_INSTANCE {
            return Err(invalid(format!(
                "max_calls_per_instance must be 1-{MAX_CALLS_PER_INSTANCE}"
            )));
        }
        if raw.concurrency == 0 || raw.concurrency > MAX_CONCURRENCY {
            return Err(invalid(format!("concurrency must be 1-{MAX_CONCURRENCY}")));
        }
        if raw.http.max_idle_per_host > MAX_IDLE_PER_HOST {
            return Err(invalid(format!(
                "http.max_idle_per_host must be 0-{MAX_IDLE_PER_HOST}"
            )));
        }
        if raw.http.idle_timeout_ms == 0 || raw.http.idle_timeout_ms > MAX_IDLE_TIMEOUT_MS {
            return Err(invalid(format!(
                "http.idle_timeout_ms must be 1-{MAX_IDLE_TIMEOUT_MS}"
            )));
        }
        let p = &raw.policy;
        if p.max_attempts == 0 || p.max_attempts > MAX_ATTEMPTS {
            return Err(invalid(format!(
                "policy.max_attempts must be 1-{MAX_ATTEMPTS}"
            )));
        }
        if p.backoff_ms == 0 || p.max_backoff_ms < p.backoff_ms {
            return Err(invalid(
                "policy.backoff_ms must be > 0 and <= policy.max_backoff_ms".into(),
            ));
        }
        let component = match (dir, &raw.component) {
            (None, _) => PathBuf::new(),
            (Some(_), None) => {
                return Err(invalid(
                    "component is required (path of the .wasm file, relative to the manifest)"
                        .into(),
                ));
            }
            (Some(_), Some(c)) if c.is_absolute() => c.clone(),
            (Some(dir), Some(c)) => dir.join(c),
        };
        Ok(Manifest {
            name: raw.name,
            component,
            realms: raw.realms,
            events: raw.events,
            mode: raw.mode,
            allowed_hosts,
            signing_audiences: raw.signing_audiences,
            timeout_ms: raw.timeout_ms,
            memory_mb: raw.memory_mb,
            reuse_instance: raw.reuse_instance,
            max_calls_per_instance: raw.max_calls_per_instance,
            concurrency: raw.concurrency,
            http: raw.http,
            policy: raw.policy,
            config: raw.config,
            source: text.to_owned(),
        })
    }

    /// Whether this connector receives `event_type` events of `realm` coming from `origin`.
    pub fn subscribes(&self, realm: &str, event_type: EventType, origin: Option<&str>) -> bool {
        self.mode != SyncMode::Inbound
            && self.events.contains(&event_type)
            && self.realms.iter().any(|r| r == "*" || r == realm)
            && origin != Some(self.name.as_str())
    }

    /// Whether outgoing HTTP to this destination is allowed.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allowed_hosts.iter().any(|a| {
            a.scheme.eq_ignore_ascii_case(scheme)
                && a.host.eq_ignore_ascii_case(host)
                && a.port == port
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name = "billing-portal"
component = "webhook.wasm"
realms = ["acme"]
events = ["login", "logout", "revoke"]
mode = "outbound"
allowed_hosts = ["http://127.0.0.1:9000"]
timeout_ms = 2000
memory_mb = 32
[policy]
on_failure = "retry"
max_attempts = 5
[config]
url = "http://127.0.0.1:9000/sessions"
"#;

    #[test]
    fn the_documented_example_parses() {
        let m = Manifest::parse(EXAMPLE, Path::new("/etc/lockstep"), "x.toml").unwrap();
        assert_eq!(m.name, "billing-portal");
        assert_eq!(m.component, Path::new("/etc/lockstep/webhook.wasm"));
        assert_eq!(m.config["url"], "http://127.0.0.1:9000/sessions");
        assert!(m.allows("http", "127.0.0.1", 9000));
        assert!(!m.allows("http", "127.0.0.1", 9001));
        assert!(!m.allows("https", "127.0.0.1", 9000));
        assert!(!m.allows("http", "127.0.0.2", 9000));
    }

    #[test]
    fn the_shipped_example_manifests_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/connectors.d");
        let webhook = std::fs::read_to_string(dir.join("webhook.toml.example")).unwrap();
        let m = Manifest::parse(&webhook, &dir, "webhook.toml").unwrap();
        assert_eq!(m.name, "webhook");
        assert!(m.reuse_instance, "the stateless webhook is served warm");
        let keycloak = std::fs::read_to_string(dir.join("keycloak.toml.example")).unwrap();
        let m = Manifest::parse(&keycloak, &dir, "keycloak.toml").unwrap();
        assert!(!m.reuse_instance);
    }

    #[test]
    fn subscriptions_follow_realms_events_mode_and_origin() {
        let m = Manifest::parse(EXAMPLE, Path::new("."), "x.toml").unwrap();
        assert!(m.subscribes("acme", EventType::Login, Some("portal")));
        assert!(!m.subscribes("other", EventType::Login, None));
        assert!(!m.subscribes("acme", EventType::Refresh, None));
        assert!(!m.subscribes("acme", EventType::Login, Some("billing-portal")));
        let inbound = EXAMPLE.replace("\"outbound\"", "\"inbound\"");
        let m = Manifest::parse(&inbound, Path::new("."), "x.toml").unwrap();
        assert!(!m.subscribes("acme", EventType::Login, None));
    }

    #[test]
    fn refresh_is_received_only_when_listed() {
        let text = EXAMPLE.replace("events = [\"login\", \"logout\", \"revoke\"]\n", "");
        let m = Manifest::parse(&text, Path::new("."), "x.toml").unwrap();
        assert_eq!(
            m.events,
            [EventType::Login, EventType::Logout, EventType::Revoke]
        );
        let text = EXAMPLE.replace("\"revoke\"]", "\"revoke\", \"refresh\"]");
        let m = Manifest::parse(&text, Path::new("."), "x.toml").unwrap();
        assert!(m.subscribes("acme", EventType::Refresh, None));
    }

    #[test]
    fn bad_manifests_are_refused_with_the_field_named() {
        for (from, to, needle) in [
            ("timeout_ms = 2000", "timeout_ms = 0", "timeout_ms"),
            ("memory_mb = 32", "memory_mb = 4096", "memory_mb"),
            ("max_attempts = 5", "max_attempts = 0", "max_attempts"),
            (
                "memory_mb = 32",
                "memory_mb = 32\nconcurrency = 0",
                "concurrency",
            ),
            (
                "memory_mb = 32",
                "memory_mb = 32\nconcurrency = 65",
                "concurrency",
            ),
            (
                "[policy]",
                "[http]\nmax_idle_per_host = 65\n[policy]",
                "http.max_idle_per_host",
            ),
            (
                "[policy]",
                "[http]\nidle_timeout_ms = 0\n[policy]",
                "http.idle_timeout_ms",
            ),
            ("[policy]", "[http]\nsize = 1\n[policy]", "size"),
            (
                "\"http://127.0.0.1:9000\"]",
                "\"ftp://x\"]",
                "allowed_hosts",
            ),
            (
                "memory_mb = 32",
                "memory_mb = 32\nsigning_audiences = [\"\"]",
                "signing_audiences",
            ),
            (
                "memory_mb = 32",
                "memory_mb = 32\nsigning_audiences = [\"a\\u0001b\"]",
                "signing_audiences",
            ),
            (
                "\"http://127.0.0.1:9000\"]",
                "\"http://x/path\"]",
                "allowed_hosts",
            ),
            ("name = \"billing-portal\"", "name = \"a b\"", "name"),
            ("mode = \"outbound\"", "mode = \"sideways\"", "mode"),
            (
                "memory_mb = 32",
                "memory_mb = 32\ncolour = \"red\"",
                "colour",
            ),
        ] {
            let text = EXAMPLE.replace(from, to);
            let err = Manifest::parse(&text, Path::new("."), "x.toml").unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn uploaded_manifests_need_no_component_path() {
        let text = EXAMPLE.replace("component = \"webhook.wasm\"\n", "");
        assert!(Manifest::parse(&text, Path::new("."), "x.toml").is_err());
        let m = Manifest::parse_uploaded(&text, "upload").unwrap();
        assert_eq!(m.name, "billing-portal");
        assert_eq!(m.component, PathBuf::new());
        // The same file that serves a directory uploads as it is.
        assert!(Manifest::parse_uploaded(EXAMPLE, "upload").is_ok());
    }

    #[test]
    fn host_ports_parse_for_names_and_ipv6() {
        assert_eq!(split_host_port("a:1"), Some(("a", Some(1))));
        assert_eq!(split_host_port("a"), Some(("a", None)));
        assert_eq!(split_host_port("[::1]:8"), Some(("::1", Some(8))));
        assert_eq!(split_host_port("a:x"), None);
        let h = AllowedHost::parse("https://Example.COM").unwrap();
        assert_eq!((h.host.as_str(), h.port), ("example.com", 443));
    }
}
