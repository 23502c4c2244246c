//! `cargo xtask bench-events`: load on the Keycloak event intake `POST /realms/{realm}/events`
//! of a release build of `lockstep serve` (SQLite, or a fresh PostgreSQL database with
//! `--postgres-url`). Everything runs on 127.0.0.1 and stops at the end:
//!
//! - the server, with `[realms.acme] events_secrets` in a `--config` file and two webhook
//!   connectors (`hook-1`, `hook-2`, the real `webhook.wasm`, subscribed to login, logout and
//!   refresh) in its `--connectors-dir`;
//! - one receiver both connectors post to, noting when each (connector, session, event type)
//!   arrives and how often.
//!
//! Load: `--concurrency` clients pull simulated Keycloak sessions from a shared counter. For
//! each session they post, signed as `keycloak-extension/` signs (docs/keycloak.md §6),
//! `LOGIN` (mirror `keycloak:{sid}` created), then map a PARENT `app-{sid}` with that
//! `keycloakSessionId` through the external-sessions API, then `REFRESH_TOKEN` with a later
//! `sessionExpiresAt` (both sessions updated), then `LOGOUT` (both ended), each answer checked.
//! After the load: wait for the webhooks, check the database and the receiver, then re-post
//! already-applied events (each must be `409`, and nothing may change).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use testkit::Loopback;
use testkit::manifest::toml_str;
use tokio::task::JoinSet;

use crate::bench_api::db::{self, ServerDb, Target};
use crate::bench_api::load::{Api, Outcome};
use crate::bench_api::server::Server;
use crate::bench_api::{self, Durability, idp_session_id, user_id};
use crate::harness::Admin;
use crate::harness::{self, ConnectorDirs, LatencyTable, lock, ms, percentile_ms};

const TOKEN: &str = "bench-events-token";
const REALM: &str = "acme";
/// The realm's `idp_system` (the default): mirrors are `keycloak:{sid}`.
const IDP_SYSTEM: &str = "keycloak";
const CLIENT_ID: &str = "portal";
/// The two connectors; each posts to `/<its name>` on the receiver.
const HOOKS: [&str; 2] = ["hook-1", "hook-2"];
/// Per-request timeout of the harness's own calls.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The load stops after this many failed sessions (a dead server would otherwise cost a
/// timeout per remaining session).
const MAX_ERRORS: usize = 20;
/// Already-applied events posted again in the replay phase (at most).
const REPLAYS: usize = 200;
/// The wait for the webhooks gives up when none arrives for this long...
const DRAIN_STALL: Duration = Duration::from_secs(30);
/// ... or after this long in all.
const DRAIN_CAP: Duration = Duration::from_secs(600);
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// After the replays: how long the receiver must stay silent.
const QUIET: Duration = Duration::from_secs(1);
/// `sessionExpiresAt` of LOGIN and of REFRESH_TOKEN, from the start of the run: far enough
/// that the expiry sweeper never ends a session during the run.
const LOGIN_EXPIRY: Duration = Duration::from_secs(3600);
const REFRESH_EXPIRY: Duration = Duration::from_secs(7200);

/// Options of `cargo xtask bench-events`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Simulated Keycloak sessions (LOGIN, map-parent, REFRESH_TOKEN, LOGOUT each).
    #[arg(long, default_value_t = 2_000)]
    sessions: usize,
    /// Concurrent clients, each driving one session at a time.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Commit durability given to the server (`--durability`); `normal` is its default.
    #[arg(long, value_enum, default_value_t = Durability::Normal)]
    durability: Durability,
    /// PostgreSQL server to run on instead of SQLite: a fresh database is created on it for
    /// the run and dropped afterwards (kept with `--keep`).
    #[arg(long)]
    postgres_url: Option<String>,
    /// Server binary to run instead of building `target/release/lockstep` first.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Keep the temp directory (database, config, manifests, server log); its path is printed.
    #[arg(long)]
    keep: bool,
}

/// Entry point: checks the prerequisites, builds the server, and runs the benchmark on a
/// Tokio runtime; Ctrl-C stops the server and cleans up.
pub fn main(args: Args) -> Result<ExitCode> {
    if args.sessions == 0 || args.concurrency == 0 {
        bail!("--sessions and --concurrency must be positive");
    }
    let root = crate::workspace_root()?;
    let wasm = bench_api::webhook_component(&root)?;
    let command_line = bench_api::command_line();
    let bin = bench_api::server_bin(args.server_bin.as_deref())?;
    bench_api::block_on(async {
        let pg_db = harness::scratch_db_name("lockstep_bench_events");
        let outcome =
            bench_api::until_interrupted(run(&args, &bin, &wasm, &command_line, &pg_db)).await;
        // Dropping `run` killed the server; the scratch database needs an explicit drop.
        if let (Some(url), false) = (&args.postgres_url, args.keep) {
            harness::drop_scratch_databases(url, &[pg_db]).await;
        }
        outcome
    })
}

async fn run(
    args: &Args,
    bin: &Path,
    wasm: &Path,
    command_line: &str,
    pg_db: &str,
) -> Result<ExitCode> {
    let dir = harness::temp_dir("lockstep-bench-events-")?;
    let target = match &args.postgres_url {
        None => Target::Sqlite {
            path: dir.path().join("bench.db"),
        },
        Some(url) => Target::Postgres {
            url: db::create_pg_database(url, pg_db).await?,
        },
    };
    let result = bench(args, bin, wasm, &target, dir.path()).await;
    if args.keep {
        eprintln!("kept {}", dir.keep().display());
        if args.postgres_url.is_some() {
            eprintln!("kept database {pg_db}");
        }
    }
    let report = result?;
    report.print(args, &target, command_line, &bench_api::revision());
    Ok(crate::verdict::exit_code(&report.failures()))
}

/// What the database holds, for the checks and for "the replay changed nothing".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Snapshot {
    sessions: i64,
    active: i64,
    /// Sessions whose `expires_at` is the REFRESH_TOKEN's `sessionExpiresAt`.
    refreshed: i64,
    outbox: i64,
    idp_events: i64,
    deliveries: i64,
    delivered: i64,
    pending: i64,
    dead: i64,
    /// Latest `updated_at` of the realm's sessions: any write to a session moves it.
    last_update: i64,
}

/// Read-only counts for the checks.
impl ServerDb {
    async fn snapshot(&self, refresh_expiry_ms: i64) -> Result<Snapshot> {
        let realm = format!("realm = '{REALM}'");
        let status = |s: &str| format!("SELECT COUNT(*) FROM deliveries WHERE status = '{s}'");
        Ok(Snapshot {
            sessions: self
                .scalar(&format!("SELECT COUNT(*) FROM sessions WHERE {realm}"))
                .await?,
            active: self
                .scalar(&format!(
                    "SELECT COUNT(*) FROM sessions WHERE {realm} AND status = 'ACTIVE'"
                ))
                .await?,
            refreshed: self
                .scalar(&format!(
                    "SELECT COUNT(*) FROM sessions WHERE {realm} AND expires_at = {refresh_expiry_ms}"
                ))
                .await?,
            outbox: self.scalar("SELECT COUNT(*) FROM outbox").await?,
            idp_events: self.scalar("SELECT COUNT(*) FROM idp_events").await?,
            deliveries: self.scalar("SELECT COUNT(*) FROM deliveries").await?,
            delivered: self.scalar(&status("delivered")).await?,
            pending: self.scalar(&status("pending")).await?,
            dead: self.scalar(&status("dead")).await?,
            last_update: self
                .scalar(&format!(
                    "SELECT COALESCE(MAX(updated_at), 0) FROM sessions WHERE {realm}"
                ))
                .await?,
        })
    }
}

/// The three Keycloak event types the workload posts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Login,
    Refresh,
    Logout,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Login, Kind::Refresh, Kind::Logout];

    fn index(self) -> usize {
        match self {
            Kind::Login => 0,
            Kind::Refresh => 1,
            Kind::Logout => 2,
        }
    }

    /// The wire `type`.
    fn wire(self) -> &'static str {
        match self {
            Kind::Login => "LOGIN",
            Kind::Refresh => "REFRESH_TOKEN",
            Kind::Logout => "LOGOUT",
        }
    }
}

/// The mirror of Keycloak session `sid` and the application's PARENT mapped to it.
fn mirror_id(sid: &str) -> String {
    format!("{IDP_SYSTEM}:{sid}")
}

fn app_id(sid: &str) -> String {
    format!("app-{sid}")
}

/// Posts events to the intake, signed as the extension signs them.
struct Intake {
    client: reqwest::Client,
    url: String,
    /// The base64 decoding of the secret after `whsec_`.
    key: Vec<u8>,
}

/// One posted event, kept for the replay phase.
#[derive(Clone)]
struct Posted {
    id: String,
    body: Vec<u8>,
}

impl Intake {
    /// Posts `body` (whose `id` is `id`) with a fresh timestamp and signature; the status and
    /// the body, read whole (JSON, or `Null` when it is not).
    async fn post(&self, id: &str, body: &[u8]) -> Result<(StatusCode, Value)> {
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key)
            .map_err(|e| anyhow!("HMAC key rejected: {e}"))?;
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        let resp = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", &timestamp)
            .header("webhook-signature", &signature)
            .body(body.to_vec())
            .send()
            .await
            .context("POST events")?;
        let status = resp.status();
        let text = resp.text().await.context("POST events: reading the body")?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }
}

/// The event body the extension would send for session `i`.
fn event(kind: Kind, i: usize, expires_at_ms: i64) -> Posted {
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = json!({
        "id": id,
        "type": kind.wire(),
        "realm": REALM,
        "time": chrono::Utc::now().timestamp_millis(),
        "userId": user_id(i),
        "sessionId": idp_session_id(i),
        "clientId": CLIENT_ID,
    });
    // LOGOUT carries no expiry (docs/keycloak.md §6: absent fields are left out).
    if kind != Kind::Logout {
        body["sessionExpiresAt"] = json!(expires_at_ms);
    }
    Posted {
        id,
        body: body.to_string().into_bytes(),
    }
}

/// The ids listed under `key` in an intake answer, sorted.
fn ids(answer: &Value, key: &str) -> Option<Vec<String>> {
    let mut out: Vec<String> = answer
        .get(key)?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<_>>()?;
    out.sort();
    Some(out)
}

/// Checks an intake answer against what `kind` must do to session `sid` (mirror and app
/// PARENT already mapped for REFRESH_TOKEN and LOGOUT).
fn check_answer(kind: Kind, sid: &str, status: StatusCode, answer: &Value) -> Result<()> {
    let mut both = vec![mirror_id(sid), app_id(sid)];
    both.sort();
    let (created, updated, ended) = match kind {
        Kind::Login => (vec![mirror_id(sid)], vec![], vec![]),
        Kind::Refresh => (vec![], both, vec![]),
        Kind::Logout => (vec![], vec![], both),
    };
    let count = |k: &str| answer.get(k).and_then(Value::as_u64);
    let ok = status == StatusCode::OK
        && ids(answer, "created").as_ref() == Some(&created)
        && ids(answer, "updated").as_ref() == Some(&updated)
        && ids(answer, "ended").as_ref() == Some(&ended)
        && count("revoked") == Some(0)
        && count("endedElsewhere") == Some(0);
    if !ok {
        bail!(
            "{} of {sid} answered {status} {answer}, expected 200 with created {created:?}, updated {updated:?}, ended {ended:?}",
            kind.wire()
        );
    }
    Ok(())
}

/// (connector index, external id, event type) of one webhook.
type Webhook = (usize, String, String);

/// What the receiver saw.
#[derive(Default)]
struct Arrivals {
    /// First arrival and number of arrivals of each webhook.
    seen: HashMap<Webhook, (Instant, u32)>,
    requests: usize,
    /// Not a known connector's path, or a body without `externalId` and `type`.
    unrecognised: usize,
}

/// One HTTP server on 127.0.0.1 that answers 200 to every request and logs each webhook.
struct Receiver {
    server: Loopback,
    log: Arc<Mutex<Arrivals>>,
}

impl Receiver {
    async fn start() -> Result<Receiver> {
        let log = Arc::new(Mutex::new(Arrivals::default()));
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&log));
        let server = Loopback::bind(app).await.context("the webhook receiver")?;
        Ok(Receiver { server, log })
    }

    /// How many of `expected` have arrived at least once.
    fn arrived(&self, expected: &[Webhook]) -> usize {
        let log = lock(&self.log);
        expected
            .iter()
            .filter(|w| log.seen.contains_key(*w))
            .count()
    }

    fn requests(&self) -> usize {
        lock(&self.log).requests
    }
}

/// Logs one webhook. Taking the body reads it whole, so the connection can be reused.
async fn receive(State(log): State<Arc<Mutex<Arrivals>>>, uri: Uri, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let hook = uri
        .path()
        .strip_prefix('/')
        .and_then(|h| HOOKS.iter().position(|k| *k == h));
    let event = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Some((field("externalId")?, field("type")?))
    });
    let mut log = lock(&log);
    log.requests += 1;
    match (hook, event) {
        (Some(hook), Some((id, kind))) => {
            log.seen
                .entry((hook, id, kind))
                .and_modify(|(_, n)| *n += 1)
                .or_insert((at, 1));
        }
        _ => log.unrecognised += 1,
    }
    StatusCode::OK
}

/// The webhooks both connectors make for one completed session: login, refresh and logout
/// of the mirror and of the application's PARENT.
fn webhooks_of(sid: &str) -> Vec<Webhook> {
    let mut out = Vec::new();
    for hook in 0..HOOKS.len() {
        for id in [mirror_id(sid), app_id(sid)] {
            for kind in ["login", "refresh", "logout"] {
                out.push((hook, id.clone(), kind.to_owned()));
            }
        }
    }
    out
}

/// One session that went through all four steps.
struct Done {
    i: usize,
    login_sent: Instant,
    logout_sent: Instant,
    events: [Posted; 3],
}

/// What one client task collected.
#[derive(Default)]
struct WorkerLog {
    /// Answer latency per event type (`Kind::index`), every answered post.
    intake: [Vec<Duration>; 3],
    map: Vec<Duration>,
    done: Vec<Done>,
    errors: Vec<String>,
}

/// Everything the clients share.
struct Load {
    intake: Intake,
    api: Api,
    next: AtomicUsize,
    failed: AtomicUsize,
    sessions: usize,
    login_expiry_ms: i64,
    refresh_expiry_ms: i64,
}

impl Load {
    /// Drives sessions until none is left or too many failed.
    async fn worker(self: Arc<Self>) -> WorkerLog {
        let mut log = WorkerLog::default();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.sessions || self.failed.load(Ordering::Relaxed) >= MAX_ERRORS {
                return log;
            }
            match self.session(i, &mut log).await {
                Ok(done) => log.done.push(done),
                Err(e) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("  session {i}: {e:#}");
                    log.errors.push(format!("session {i}: {e:#}"));
                }
            }
        }
    }

    /// LOGIN, map-parent, REFRESH_TOKEN, LOGOUT of session `i`; stops at the first failure.
    async fn session(&self, i: usize, log: &mut WorkerLog) -> Result<Done> {
        let sid = idp_session_id(i);
        let login = event(Kind::Login, i, self.login_expiry_ms);
        let login_sent = self.step(Kind::Login, &sid, &login, log).await?;

        let t0 = Instant::now();
        let mapped = self.api.map_parent(&app_id(&sid), &sid, &user_id(i)).await;
        log.map.push(t0.elapsed());
        match mapped {
            Outcome::Ok => {}
            Outcome::Warn(e) | Outcome::Err(e) => bail!("map-parent {}: {e}", app_id(&sid)),
        }

        let refresh = event(Kind::Refresh, i, self.refresh_expiry_ms);
        self.step(Kind::Refresh, &sid, &refresh, log).await?;
        let logout = event(Kind::Logout, i, 0);
        let logout_sent = self.step(Kind::Logout, &sid, &logout, log).await?;
        Ok(Done {
            i,
            login_sent,
            logout_sent,
            events: [login, refresh, logout],
        })
    }

    /// Posts one event, times it and checks the answer; when it was sent.
    async fn step(
        &self,
        kind: Kind,
        sid: &str,
        posted: &Posted,
        log: &mut WorkerLog,
    ) -> Result<Instant> {
        let t0 = Instant::now();
        let (status, answer) = self.intake.post(&posted.id, &posted.body).await?;
        log.intake[kind.index()].push(t0.elapsed());
        check_answer(kind, sid, status, &answer)?;
        Ok(t0)
    }
}

/// Everything measured.
#[derive(Default)]
struct Report {
    /// Answer latency per event type.
    intake: [Vec<Duration>; 3],
    map: Vec<Duration>,
    load_took: Duration,
    /// Sessions whose four steps all succeeded.
    completed: usize,
    attempted: usize,
    errors: Vec<String>,
    aborted: bool,
    /// LOGIN sent → first `login` webhook of the mirror (either connector).
    login_to_webhook: Vec<Duration>,
    /// LOGOUT sent → both connectors have the `logout` of `app-{sid}`.
    logout_to_webhooks: Vec<Duration>,
    /// Expected webhooks arrived when the load ended, and in all.
    expected_webhooks: usize,
    arrived_at_load_end: usize,
    /// Load end → every expected webhook arrived (or the wait gave up).
    drain_took: Duration,
    drained: bool,
    /// Per expected webhook: not arrived, arrived more than once (extra arrivals).
    missing: usize,
    duplicates: usize,
    /// Webhooks for sessions or types nobody expected; unparsable requests.
    unexpected: usize,
    unrecognised: usize,
    requests: usize,
    /// The database after the drain.
    after_load: Snapshot,
    /// The replays: answers not 409 (with the first few), latencies of the 409s.
    replayed: usize,
    replay_409: Vec<Duration>,
    replay_wrong: Vec<String>,
    /// The database after the replays, and webhooks that arrived after them.
    after_replay: Snapshot,
    requests_after_replay: usize,
    notes: Vec<String>,
}

/// Runs the load against a fresh server. The receiver and the server stop when this
/// returns, whichever way.
async fn bench(
    args: &Args,
    bin: &Path,
    wasm: &Path,
    target: &Target,
    dir: &Path,
) -> Result<Report> {
    let receiver = Receiver::start().await?;

    // Small files: blocking std::fs calls are fine here.
    let dirs = ConnectorDirs::create(dir)?;
    dirs.write_webhooks(
        &HOOKS,
        wasm,
        REALM,
        &["login", "logout", "refresh"],
        &receiver.server.origin(),
    )?;
    let mut key = Vec::new();
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    let secret = format!("whsec_{}", STANDARD.encode(&key));
    let config = dir.join("lockstep.toml");
    std::fs::write(
        &config,
        format!(
            "[realms.{REALM}]\nevents_secrets = [{}]\n",
            toml_str(&secret)
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;

    let log = dir.join("server.log");
    let extra = [
        [OsStr::new("--config"), config.as_os_str()].as_slice(),
        &dirs.flags(),
    ]
    .concat();
    // The readiness line comes after every connector in the directory has loaded.
    let server = Server::start(
        bin,
        &target.server_url(),
        args.durability.as_str(),
        TOKEN,
        &extra,
        &log,
    )
    .await?;
    eprintln!("server on {} (log {})", server.addr, log.display());
    let measured = async {
        let db = ServerDb::open(target).await?;
        let measured = measure(args, &server, &secret, &receiver, &db).await;
        db.close().await;
        measured
    }
    .await;
    let (mut report, note) = server.stop_after(measured).await?;
    report.notes.extend(note);
    Ok(report)
}

async fn measure(
    args: &Args,
    server: &Server,
    secret: &str,
    receiver: &Receiver,
    db: &ServerDb,
) -> Result<Report> {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .context("decoding the events secret")?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the intake HTTP client")?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let as_ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let load = Arc::new(Load {
        intake: Intake {
            client,
            url: format!("http://{}/realms/{REALM}/events", server.addr),
            key,
        },
        api: Api::new(server.addr, REALM, TOKEN, args.concurrency, REQUEST_TIMEOUT)?,
        next: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        sessions: args.sessions,
        login_expiry_ms: now_ms + as_ms(LOGIN_EXPIRY),
        refresh_expiry_ms: now_ms + as_ms(REFRESH_EXPIRY),
    });
    let mut report = Report::default();

    eprintln!(
        "{} sessions, {} concurrent clients",
        args.sessions, args.concurrency
    );
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.concurrency {
        tasks.spawn(Arc::clone(&load).worker());
    }
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let log = joined.context("a client task failed")?;
        for k in Kind::ALL {
            report.intake[k.index()].extend(&log.intake[k.index()]);
        }
        report.map.extend(log.map);
        report.errors.extend(log.errors);
        done.extend(log.done);
    }
    report.load_took = started.elapsed();
    report.attempted = load.next.load(Ordering::Relaxed).min(args.sessions);
    report.aborted = load.failed.load(Ordering::Relaxed) >= MAX_ERRORS;
    report.completed = done.len();
    done.sort_by_key(|d| d.i);

    // Wait for the webhooks of every completed session.
    let expected: Vec<Webhook> = done
        .iter()
        .flat_map(|d| webhooks_of(&idp_session_id(d.i)))
        .collect();
    report.expected_webhooks = expected.len();
    report.arrived_at_load_end = receiver.arrived(&expected);
    eprintln!(
        "load done in {:.1} s; {} of {} webhooks arrived so far, waiting for the rest",
        report.load_took.as_secs_f64(),
        report.arrived_at_load_end,
        expected.len()
    );
    let drain_start = Instant::now();
    let mut last = (report.arrived_at_load_end, Instant::now());
    loop {
        let arrived = receiver.arrived(&expected);
        if arrived == expected.len() {
            report.drained = true;
            break;
        }
        if arrived != last.0 {
            last = (arrived, Instant::now());
        }
        if last.1.elapsed() >= DRAIN_STALL || drain_start.elapsed() >= DRAIN_CAP {
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    report.drain_took = drain_start.elapsed();
    // The dispatcher records an outcome after the call returns: give it a moment to settle.
    let admin = Admin::new(server.addr, TOKEN)?;
    let settle = Instant::now();
    while admin.any_delivery("pending").await? && settle.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(DRAIN_POLL).await;
    }

    // Latencies and exactly-once, from the receiver's log.
    {
        let log = lock(&receiver.log);
        for d in &done {
            let sid = idp_session_id(d.i);
            let first = |hook: usize, id: &str, kind: &str| {
                log.seen
                    .get(&(hook, id.to_owned(), kind.to_owned()))
                    .map(|(at, _)| *at)
            };
            let logins: Vec<Instant> = (0..HOOKS.len())
                .filter_map(|h| first(h, &mirror_id(&sid), "login"))
                .collect();
            if let Some(at) = logins.iter().min() {
                report
                    .login_to_webhook
                    .push(at.saturating_duration_since(d.login_sent));
            }
            let logouts: Vec<Instant> = (0..HOOKS.len())
                .filter_map(|h| first(h, &app_id(&sid), "logout"))
                .collect();
            if logouts.len() == HOOKS.len()
                && let Some(at) = logouts.iter().max()
            {
                report
                    .logout_to_webhooks
                    .push(at.saturating_duration_since(d.logout_sent));
            }
        }
        let mut wanted = 0;
        for w in &expected {
            match log.seen.get(w) {
                None => report.missing += 1,
                Some((_, n)) => {
                    wanted += 1;
                    report.duplicates += usize::try_from(n.saturating_sub(1)).unwrap_or(0);
                }
            }
        }
        report.unexpected = log.seen.len() - wanted;
        report.unrecognised = log.unrecognised;
        report.requests = log.requests;
    }
    report.after_load = db.snapshot(load.refresh_expiry_ms).await?;

    // Replay: already-applied events, spread over the run and the three types, re-signed.
    let applied: Vec<&Posted> = done.iter().flat_map(|d| d.events.iter()).collect();
    let replays = REPLAYS.min(applied.len());
    eprintln!("replaying {replays} applied events");
    for j in 0..replays {
        let posted = applied[j * applied.len() / replays];
        report.replayed += 1;
        let t0 = Instant::now();
        match load.intake.post(&posted.id, &posted.body).await {
            Ok((StatusCode::CONFLICT, _)) => report.replay_409.push(t0.elapsed()),
            Ok((status, answer)) => report
                .replay_wrong
                .push(format!("event {}: {status} {answer}", posted.id)),
            Err(e) => report
                .replay_wrong
                .push(format!("event {}: {e:#}", posted.id)),
        }
    }
    let requests = receiver.requests();
    tokio::time::sleep(QUIET).await;
    report.requests_after_replay = receiver.requests() - requests;
    report.after_replay = db.snapshot(load.refresh_expiry_ms).await?;
    Ok(report)
}

/// Both latency tables of the report.
const TABLE: LatencyTable = LatencyTable {
    label_width: 44,
    n_width: 6,
};

impl Report {
    fn intake_events(&self) -> usize {
        self.intake.iter().map(Vec::len).sum()
    }

    /// Why the run failed; empty when it passed.
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let n = i64::try_from(self.completed).unwrap_or(i64::MAX);
        if !self.errors.is_empty() {
            out.push(format!("{} sessions failed", self.errors.len()));
        }
        if self.aborted {
            out.push(format!("stopped after {MAX_ERRORS} failed sessions"));
        }
        if self.completed != self.attempted {
            out.push(format!(
                "{} of {} sessions completed",
                self.completed, self.attempted
            ));
        }
        let s = self.after_load;
        if s.active != 0 {
            out.push(format!("{} sessions still active", s.active));
        }
        if s.sessions != 2 * n {
            out.push(format!(
                "{} sessions in the realm, expected {}",
                s.sessions,
                2 * n
            ));
        }
        if s.refreshed != 2 * n {
            out.push(format!(
                "{} sessions carry the refreshed expiry, expected {}",
                s.refreshed,
                2 * n
            ));
        }
        if s.outbox != 6 * n {
            out.push(format!("{} outbox events, expected {}", s.outbox, 6 * n));
        }
        if s.idp_events != 3 * n {
            out.push(format!(
                "{} stored event ids, expected {}",
                s.idp_events,
                3 * n
            ));
        }
        if s.pending != 0 || s.dead != 0 || s.delivered != s.deliveries {
            out.push(format!(
                "deliveries: {} pending, {} dead, {} delivered of {}",
                s.pending, s.dead, s.delivered, s.deliveries
            ));
        }
        if self.missing > 0 {
            out.push(format!("{} webhooks never arrived", self.missing));
        }
        if self.duplicates > 0 {
            out.push(format!("{} duplicate webhooks", self.duplicates));
        }
        if self.unexpected > 0 || self.unrecognised > 0 {
            out.push(format!(
                "{} unexpected and {} unrecognised requests at the receiver",
                self.unexpected, self.unrecognised
            ));
        }
        if !self.replay_wrong.is_empty() {
            out.push(format!(
                "{} of {} replays not answered 409",
                self.replay_wrong.len(),
                self.replayed
            ));
        }
        if self.after_replay != self.after_load {
            out.push("the replays changed the database".to_owned());
        }
        if self.requests_after_replay > 0 {
            out.push(format!(
                "{} webhooks after the replays",
                self.requests_after_replay
            ));
        }
        out
    }

    fn print(&self, args: &Args, target: &Target, command_line: &str, revision: &str) {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!();
        println!("== Keycloak event intake benchmark");
        println!("command:     {command_line}");
        println!("revision:    {revision}");
        println!(
            "settings:    sessions={} concurrency={} durability={}; {}; per session LOGIN, map-parent, REFRESH_TOKEN, LOGOUT; {} webhook connectors (login, logout, refresh); {cores} cores shared by harness, server and receiver",
            args.sessions,
            args.concurrency,
            args.durability.as_str(),
            target.title(),
            HOOKS.len(),
        );

        println!();
        TABLE.header("request answered (sent -> body read)");
        for k in Kind::ALL {
            let label = match k {
                Kind::Login => "LOGIN (1 created)",
                Kind::Refresh => "REFRESH_TOKEN (2 updated)",
                Kind::Logout => "LOGOUT (2 ended)",
            };
            TABLE.row(label, &self.intake[k.index()]);
        }
        let all: Vec<Duration> = self.intake.iter().flatten().copied().collect();
        TABLE.row("all intake events", &all);
        TABLE.row("map-parent (external-sessions API)", &self.map);
        let secs = self.load_took.as_secs_f64();
        let rate = |n: usize| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        println!(
            "throughput:  {:.0} intake events/s ({} in {secs:.1} s; with the map-parent calls {:.0} requests/s)",
            rate(self.intake_events()),
            self.intake_events(),
            rate(self.intake_events() + self.map.len()),
        );

        println!();
        TABLE.header("to the webhooks (at the receiver)");
        TABLE.row(
            "LOGIN sent -> first login of the mirror",
            &self.login_to_webhook,
        );
        TABLE.row(
            "LOGOUT sent -> logout of app-{sid} at both",
            &self.logout_to_webhooks,
        );
        println!(
            "  backlog: {} of {} webhooks had arrived when the load ended; the rest {} {:.1} s later",
            self.arrived_at_load_end,
            self.expected_webhooks,
            if self.drained {
                "arrived"
            } else {
                "had NOT all arrived"
            },
            self.drain_took.as_secs_f64(),
        );
        let total = secs + self.drain_took.as_secs_f64();
        if total > 0.0 {
            println!(
                "  delivery rate over load + drain: {:.0} webhooks/s",
                self.expected_webhooks as f64 / total
            );
        }

        println!();
        let s = self.after_load;
        println!(
            "sessions:    {} in the realm, {} active, {} with the refreshed expiry (expected {}, 0, {})",
            s.sessions,
            s.active,
            s.refreshed,
            2 * self.completed,
            2 * self.completed
        );
        println!(
            "store:       {} outbox events (expected {}), {} event ids (expected {}), deliveries {} = {} delivered + {} pending + {} dead",
            s.outbox,
            6 * self.completed,
            s.idp_events,
            3 * self.completed,
            s.deliveries,
            s.delivered,
            s.pending,
            s.dead,
        );
        println!(
            "webhooks:    {} requests; {} expected, {} missing, {} duplicates, {} unexpected, {} unrecognised",
            self.requests,
            self.expected_webhooks,
            self.missing,
            self.duplicates,
            self.unexpected,
            self.unrecognised,
        );
        let mut replay = self.replay_409.clone();
        replay.sort_unstable();
        println!(
            "replay:      {} of {} answered 409 (p50 {} ms); database {}; {} webhooks after",
            self.replay_409.len(),
            self.replayed,
            ms(percentile_ms(&replay, 50.0)),
            if self.after_replay == self.after_load {
                "unchanged"
            } else {
                "CHANGED"
            },
            self.requests_after_replay,
        );
        for w in self.replay_wrong.iter().take(5) {
            println!("  {w}");
        }
        crate::verdict::print_errors(&self.errors, self.attempted, "sessions", self.aborted);
        crate::verdict::print_verdict(&self.notes, &self.failures());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_against_what_each_event_does() {
        let sid = "kc-1";
        let login = json!({"eventId": "e", "created": ["keycloak:kc-1"], "updated": [],
                           "ended": [], "revoked": 0, "endedElsewhere": 0});
        assert!(check_answer(Kind::Login, sid, StatusCode::OK, &login).is_ok());
        assert!(check_answer(Kind::Login, sid, StatusCode::CONFLICT, &login).is_err());
        assert!(check_answer(Kind::Refresh, sid, StatusCode::OK, &login).is_err());
        let logout = json!({"eventId": "e", "created": [], "updated": [],
                            "ended": ["app-kc-1", "keycloak:kc-1"], "revoked": 0,
                            "endedElsewhere": 0});
        assert!(check_answer(Kind::Logout, sid, StatusCode::OK, &logout).is_ok());
    }

    #[test]
    fn each_session_expects_six_webhooks_per_connector() {
        let w = webhooks_of("kc-1");
        assert_eq!(w.len(), 6 * HOOKS.len());
        assert!(w.contains(&(1, "app-kc-1".to_owned(), "refresh".to_owned())));
    }
}
