//! `cargo xtask bench-ssf`: Lockstep as a Shared Signals transmitter, on a release build of
//! `lockstep serve` (SQLite, idle host). Everything runs on 127.0.0.1 and stops at the end:
//!
//! - a receiver that accepts pushed SETs (RFC 8935: `application/secevent+jwt`, answers 202)
//!   and notes when the `session-revoked` SET of each session arrives (read from the SET's
//!   `sub_id.session.id`; the signature is the tests' business, not the timing's);
//! - the server, with `public_url` in a `--config` file and one push stream to the receiver
//!   created through its configuration endpoint.
//!
//! Per sample, one at a time: map a parent (with a unique `keycloakSessionId`), pause, then
//! time from the `destroy-parent` call to its `session-revoked` SET arriving.
//!
//! Then the receiver half (see [`receiver`]): pushed SETs per second that Lockstep's own SSF
//! receiver (`POST /realms/{realm}/ssf/push`) verifies and applies, beside the ceiling of the
//! same client on the same server.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use serde_json::{Value, json};
use testkit::Loopback;
use tokio::sync::Notify;

use crate::bench_api::load::{Api, Outcome};
use crate::bench_api::server::Server;
use crate::bench_api::{self, user_id};
use crate::harness::{self, lock, ms, percentile_ms};

mod receiver;

const TOKEN: &str = "bench-ssf-token";
const REALM: &str = "bench";
const REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
/// Longest wait for one SET.
const WAIT: Duration = Duration::from_secs(10);
/// Pause between a map and the destroy that is timed, so the login's delivery is not in the
/// way (the stream asks for `session-revoked` only, but the fan-out still routes the login).
const SETTLE: Duration = Duration::from_millis(30);
/// Per-request timeout of the harness's own calls.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The run stops after this many failed samples.
const MAX_ERRORS: usize = 10;
/// The target: p99 from destroy-parent to the SET at the receiver, idle, on two cores.
const TARGET: Duration = Duration::from_millis(100);

/// Options of `cargo xtask bench-ssf`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Logouts to time, one after another.
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Untimed logouts first (connections, caches).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Server binary to run instead of building `target/release/lockstep` first.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Receiver half: SETs to push (one PARENT session each); 0 skips the receiver half.
    #[arg(long, default_value_t = 20_000)]
    sets: usize,
    /// Receiver half: SETs in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Receiver half: an empty database for its server (say, a fresh PostgreSQL database)
    /// instead of SQLite in the temp directory.
    #[arg(long)]
    database_url: Option<String>,
    /// Only the receiver half.
    #[arg(long)]
    receiver_only: bool,
    /// Keep the temp directory (database, config, server log); its path is printed.
    #[arg(long)]
    keep: bool,
}

/// Entry point: builds the server and runs the benchmark on a Tokio runtime.
pub fn main(args: Args) -> Result<ExitCode> {
    if args.samples == 0 && !args.receiver_only {
        bail!("--samples must be positive");
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be positive");
    }
    let fixtures = crate::workspace_root()?.join("tests/fixtures/oidc");
    let read = |name: &str| {
        let path = fixtures.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let keys = Keys {
        jwk: serde_json::from_str(&read("test-rsa-a.jwk.json")?)
            .context("parsing test-rsa-a.jwk.json")?,
        key: jsonwebtoken::EncodingKey::from_rsa_pem(read("test-rsa-a.pem")?.as_bytes())
            .context("parsing test-rsa-a.pem")?,
    };
    let command_line = bench_api::command_line();
    let bin = bench_api::server_bin(args.server_bin.as_deref())?;
    bench_api::block_on(bench_api::until_interrupted(run(
        &args,
        &bin,
        &keys,
        &command_line,
    )))
}

/// The transmitter key of the receiver half (`tests/fixtures/oidc/test-rsa-a`).
struct Keys {
    jwk: Value,
    key: jsonwebtoken::EncodingKey,
}

/// When each session's `session-revoked` SET arrived.
#[derive(Clone, Default)]
struct Inbox {
    arrived: Arc<Mutex<HashMap<String, Instant>>>,
    news: Arc<Notify>,
}

/// RFC 8935 push endpoint: notes the arrival, answers 202.
async fn receive(State(inbox): State<Inbox>, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let session = std::str::from_utf8(&body)
        .ok()
        .and_then(|jwt| jwt.split('.').nth(1))
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .filter(|c| c["events"].get(REVOKED).is_some())
        .and_then(|c| c["sub_id"]["session"]["id"].as_str().map(str::to_owned));
    if let Some(s) = session {
        lock(&inbox.arrived).entry(s).or_insert(at);
        inbox.news.notify_waiters();
    }
    StatusCode::ACCEPTED
}

impl Inbox {
    async fn wait_for(&self, session: &str) -> Option<Instant> {
        let deadline = Instant::now() + WAIT;
        loop {
            let notified = self.news.notified();
            if let Some(at) = lock(&self.arrived).get(session) {
                return Some(*at);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            // Bounded: the notification, or a re-check every 5 ms.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(5)), notified).await;
        }
    }
}

/// Starts `lockstep serve` on `db` with the `--config` file `config`: the transmitter and
/// the receiver measurement run the server alike and differ only in that file.
async fn start_server(bin: &Path, db: &str, config: &Path, log: &Path) -> Result<Server> {
    let extra = [OsStr::new("--config"), config.as_os_str()];
    Server::start(bin, db, "normal", TOKEN, &extra, log).await
}

async fn run(args: &Args, bin: &Path, keys: &Keys, command_line: &str) -> Result<ExitCode> {
    let dir = harness::temp_dir("lockstep-bench-ssf-")?;
    let result = both(args, bin, keys, dir.path()).await;
    if args.keep {
        eprintln!("kept {}", dir.keep().display());
    }
    let (samples, figures) = result?;
    Ok(print(
        args,
        command_line,
        samples.as_ref(),
        figures.as_ref(),
    ))
}

async fn both(
    args: &Args,
    bin: &Path,
    keys: &Keys,
    dir: &Path,
) -> Result<(Option<Samples>, Option<receiver::Figures>)> {
    let samples = if args.receiver_only {
        None
    } else {
        Some(bench(args, bin, dir).await?)
    };
    let figures = if args.sets == 0 {
        None
    } else {
        Some(
            receiver::bench(
                bin,
                dir,
                args.database_url.as_deref(),
                args.sets,
                args.concurrency,
                keys.jwk.clone(),
                &keys.key,
            )
            .await?,
        )
    };
    Ok((samples, figures))
}

struct Samples {
    times: Vec<Duration>,
    errors: Vec<String>,
}

async fn bench(args: &Args, bin: &Path, dir: &Path) -> Result<Samples> {
    let inbox = Inbox::default();
    let app = axum::Router::new()
        .route("/events", axum::routing::post(receive))
        .with_state(inbox.clone());
    let receiver = Loopback::bind(app).await.context("SET receiver")?;
    let config = dir.join("lockstep.toml");
    // The issuer and advertised URLs are not used by the receiver here.
    let text = format!(
        "public_url = \"http://127.0.0.1\"\n\
         [ssf_transmitter]\npush_allowed_hosts = [\"http://{}\"]\n",
        receiver.addr
    );
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let db = format!("sqlite://{}", dir.join("lockstep.db").display());
    let server = start_server(bin, &db, &config, &dir.join("server.log")).await?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let res = http
        .post(format!(
            "http://{}/realms/{REALM}/ssf/transmitter/stream",
            server.addr
        ))
        .bearer_auth(TOKEN)
        .json(&json!({
            "delivery": {"method": "urn:ietf:rfc:8935",
                         "endpoint_url": format!("http://{}/events", receiver.addr)},
            "events_requested": [REVOKED],
        }))
        .send()
        .await?;
    harness::expect_status(res, reqwest::StatusCode::CREATED, "creating the stream").await?;
    let api = Api::new(server.addr, REALM, TOKEN, 4, REQUEST_TIMEOUT)?;
    let mut out = Samples {
        times: Vec::new(),
        errors: Vec::new(),
    };
    for i in 0..args.warmup + args.samples {
        if out.errors.len() >= MAX_ERRORS {
            break;
        }
        let id = format!("ssf-{i}");
        let sid = format!("kc-ssf-{i}");
        if let Outcome::Err(e) = api.map_parent(&id, &sid, &user_id(i)).await {
            out.errors.push(e);
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        let t0 = Instant::now();
        if let Outcome::Err(e) = api.destroy_parent(&id, 1).await {
            out.errors.push(e);
            continue;
        }
        match inbox.wait_for(&sid).await {
            Some(at) if i >= args.warmup => out.times.push(at.saturating_duration_since(t0)),
            Some(_) => {}
            None => out
                .errors
                .push(format!("no session-revoked SET for {sid} within {WAIT:?}")),
        }
    }
    server.stop().await?;
    out.times.sort();
    Ok(out)
}

/// Pushed SETs per second accepted by the receiver, when measured.
const RECEIVER_TARGET: f64 = 2000.0;

fn print(
    args: &Args,
    command_line: &str,
    s: Option<&Samples>,
    r: Option<&receiver::Figures>,
) -> ExitCode {
    println!("# bench-ssf");
    println!("command: {command_line}");
    println!("revision: {}", bench_api::revision());
    let mut failed = false;
    if let Some(s) = s {
        let p = |q| percentile_ms(&s.times, q);
        println!(
            "transmitter, idle: destroy-parent -> session-revoked SET at a receiver on 127.0.0.1 \
             ({} samples after {} warm-up, SQLite, push)",
            s.times.len(),
            args.warmup
        );
        println!(
            "  p50 {} ms  p90 {} ms  p99 {} ms  max {} ms  (target p99 <= {} ms)",
            ms(p(50.0)),
            ms(p(90.0)),
            ms(p(99.0)),
            ms(s.times.last().map(|d| d.as_secs_f64() * 1e3)),
            TARGET.as_millis()
        );
        for e in s.errors.iter().take(5) {
            println!("error: {e}");
        }
        let over = p(99.0).is_none_or(|v| v > TARGET.as_secs_f64() * 1e3);
        failed |= !s.errors.is_empty() || over;
    }
    if let Some(r) = r {
        println!(
            "receiver: {} session-revoked SETs pushed to POST /realms/{REALM}/ssf/push, \
             {} in flight, RS256, each ending one PARENT ({})",
            r.sets, r.concurrency, r.database
        );
        println!(
            "  {:.0} SETs/s accepted (202: {}, refused or failed: {}) in {:.2} s  \
             p50 {} ms  p99 {} ms  (target >= {RECEIVER_TARGET:.0}/s)",
            r.rate(),
            r.accepted,
            r.refused,
            r.elapsed.as_secs_f64(),
            ms(r.p(50.0)),
            ms(r.p(99.0)),
        );
        println!(
            "  ceiling: {:.0} GET /healthz per second, same client, concurrency and server",
            r.ceiling
        );
        println!(
            "  sessions DESTROYED afterwards: {}/{} read back",
            r.destroyed, r.checked
        );
        for e in &r.errors {
            println!("error: {e}");
        }
        failed |= r.refused > 0 || r.destroyed != r.checked || r.rate() < RECEIVER_TARGET;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
