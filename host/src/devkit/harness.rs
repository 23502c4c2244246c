//! `lockstep connector test`: loads a component the way `serve` does (same engine, limits,
//! allowlist and compile cache) and calls its hooks with events from a file, printing what
//! each call returned, logged and sent over HTTP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::DevkitError;
use crate::domain::{EndReason, EventType, SessionKind, SyncEvent};
use crate::runtime::manifest::{AllowedHost, Manifest};
use crate::runtime::world::World;
use crate::runtime::{HookFailure, Runtime, Transcript};

/// `lockstep connector test` flags.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The component (.wasm).
    pub component: PathBuf,
    /// A JSON file with one event or an array of events (the connector JSON shape: `type`
    /// (or `eventType`), `externalId`, `kind`, `userId`, ...; missing ids and times are
    /// filled in).
    #[arg(long)]
    pub events: PathBuf,
    /// The manifest (default: manifest.toml beside the component, else a permissive one
    /// named after the file with no allowed hosts).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Sets a `[config]` value (repeatable): `--config base_url=http://127.0.0.1:9100`.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub config: Vec<(String, String)>,
    /// Adds an allowed destination (repeatable), e.g. `http://127.0.0.1:9100`.
    #[arg(long = "allow-host", value_name = "ORIGIN")]
    pub allow_hosts: Vec<String>,
    /// Directory for compiled components (default: compile-cache/ in the tools directory),
    /// so a second run skips the seconds a JavaScript or Python component takes to compile.
    #[arg(long, env = "LOCKSTEP_COMPILE_CACHE")]
    pub compile_cache: Option<PathBuf>,
    /// Print one JSON object per call instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// An event as an author writes it in a sample file: only `type` and `externalId` are
/// needed.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SampleEvent {
    #[serde(alias = "eventType")]
    r#type: String,
    external_id: String,
    event_id: Option<String>,
    realm: Option<String>,
    kind: Option<String>,
    idp_session_id: Option<String>,
    idp_client_session_id: Option<String>,
    user_id: Option<String>,
    system: Option<String>,
    origin_system: Option<String>,
    end_reason: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    occurred_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
}

impl SampleEvent {
    fn into_event(self, n: usize) -> Result<SyncEvent, String> {
        let parse = |what: &str, text: &str| format!("event {n}: unknown {what} {text:?}");
        let event_type: EventType = self
            .r#type
            .to_ascii_lowercase()
            .parse()
            .map_err(|_| parse("type (login, logout, revoke, refresh)", &self.r#type))?;
        let kind = match self.kind.as_deref() {
            None => SessionKind::Parent,
            Some(k) => k
                .to_ascii_uppercase()
                .parse()
                .map_err(|_| parse("kind (parent, child, fixed)", k))?,
        };
        let end_reason = match self.end_reason.as_deref() {
            None => None,
            Some(r) => Some(r.parse::<EndReason>().map_err(|_| parse("endReason", r))?),
        };
        Ok(SyncEvent {
            event_id: self
                .event_id
                .unwrap_or_else(|| format!("test-{}", uuid::Uuid::now_v7())),
            event_type,
            realm: self.realm.unwrap_or_else(|| "acme".into()),
            external_id: self.external_id,
            kind,
            idp_session_id: self.idp_session_id,
            idp_client_session_id: self.idp_client_session_id,
            user_id: self.user_id,
            system: self.system,
            origin_system: self.origin_system,
            end_reason,
            attributes: self.attributes,
            expires_at: self.expires_at,
            occurred_at: self.occurred_at.unwrap_or_else(Utc::now),
        })
    }
}

/// Reads the sample events: one object or an array of them.
fn read_events(path: &Path) -> Result<Vec<SyncEvent>, DevkitError> {
    let text = std::fs::read_to_string(path).map_err(|source| DevkitError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |m: String| DevkitError::Usage(format!("{}: {m}", path.display()));
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let items = match value {
        serde_json::Value::Array(items) => items,
        one @ serde_json::Value::Object(_) => vec![one],
        _ => return Err(bad("expected an event object or an array of them".into())),
    };
    if items.is_empty() {
        return Err(bad("no events".into()));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let sample: SampleEvent =
                serde_json::from_value(item).map_err(|e| bad(format!("event {}: {e}", i + 1)))?;
            sample.into_event(i + 1).map_err(bad)
        })
        .collect()
}

/// The manifest to run under: the given one, the one beside the component, or a default.
fn manifest_for(args: &TestArgs) -> Result<Manifest, DevkitError> {
    let beside = args
        .component
        .parent()
        .map(|d| d.join("manifest.toml"))
        .filter(|p| p.is_file());
    let mut manifest = match args.manifest.clone().or(beside) {
        Some(path) => Manifest::load(&path).map_err(|e| DevkitError::Usage(e.to_string()))?,
        None => {
            let stem = args
                .component
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("connector");
            let name: String = stem
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let text = format!(
                "name = {name:?}\nevents = [\"login\", \"logout\", \"revoke\", \"refresh\"]\n\
                 timeout_ms = 5000\nmemory_mb = 128\n"
            );
            Manifest::parse_uploaded(&text, "(default manifest)")
                .map_err(|e| DevkitError::Usage(e.to_string()))?
        }
    };
    for (k, v) in &args.config {
        manifest.config.insert(k.clone(), v.clone());
    }
    for origin in &args.allow_hosts {
        let host = AllowedHost::parse(origin)
            .map_err(|e| DevkitError::Usage(format!("--allow-host {origin}: {e}")))?;
        manifest.allowed_hosts.push(host);
    }
    Ok(manifest)
}

/// Runs `lockstep connector test`.
pub async fn run(args: TestArgs) -> anyhow::Result<()> {
    let manifest = manifest_for(&args)?;
    let events = read_events(&args.events)?;
    let bytes = std::fs::read(&args.component).map_err(|source| DevkitError::Io {
        path: args.component.clone(),
        source,
    })?;
    let cache = match args.compile_cache.clone() {
        Some(dir) => dir,
        None => super::Tools::new(None)?.dir.join("compile-cache"),
    };
    let runtime = Runtime::new(Some(cache))?;
    let started = Instant::now();
    let connector = runtime.load_bytes(manifest, bytes).await?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    if !args.json {
        println!(
            "loaded {} ({}, version {}) in {load_ms:.0} ms ({})",
            connector.manifest.name,
            connector.world,
            connector.version,
            match connector.cache {
                crate::runtime::cache::CacheOutcome::Hit => "from the compile cache",
                crate::runtime::cache::CacheOutcome::Miss => "compiled",
            }
        );
    }
    let mut failed = 0usize;
    for event in &events {
        let started = Instant::now();
        let (result, transcript) = runtime.call_recorded(&connector, event).await;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if result.is_err() {
            failed += 1;
        }
        let subscribed = connector.manifest.subscribes(
            &event.realm,
            event.event_type,
            event.origin_system.as_deref(),
        );
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "eventId": event.event_id,
                    "type": event.event_type,
                    "externalId": event.external_id,
                    "hook": World::hook_name(event.event_type),
                    "subscribed": subscribed,
                    "outcome": match &result { Ok(()) => "ok", Err(f) => f.kind() },
                    "error": result.as_ref().err().map(HookFailure::reason),
                    "ms": ms,
                    "logs": transcript.logs.iter().map(|(l, m)| serde_json::json!({"level": l, "message": m})).collect::<Vec<_>>(),
                    "droppedLogs": transcript.dropped_logs,
                    "requests": transcript.requests,
                })
            );
        } else {
            print_call(event, subscribed, &result, ms, &transcript);
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} calls failed", events.len());
    }
    if !args.json {
        println!("all {} calls succeeded", events.len());
    }
    Ok(())
}

fn print_call(
    event: &SyncEvent,
    subscribed: bool,
    result: &Result<(), HookFailure>,
    ms: f64,
    transcript: &Transcript,
) {
    let outcome = match result {
        Ok(()) => "ok".to_owned(),
        Err(f) => f.reason(),
    };
    println!(
        "\n{} {} ({}) -> {outcome} in {ms:.1} ms",
        World::hook_name(event.event_type),
        event.external_id,
        event.event_id
    );
    if !subscribed {
        println!(
            "  note: the manifest does not subscribe to {} events of realm {} (serve would not deliver it)",
            event.event_type, event.realm
        );
    }
    for (level, message) in &transcript.logs {
        println!("  log {level:<5} {message}");
    }
    if transcript.dropped_logs > 0 {
        println!(
            "  log lines dropped past the cap: {}",
            transcript.dropped_logs
        );
    }
    for r in &transcript.requests {
        println!(
            "  http {} {} -> {} ({:.1} ms)",
            r.method, r.url, r.outcome, r.millis
        );
    }
}
