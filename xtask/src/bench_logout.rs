//! `cargo xtask bench-logout`: measures OIDC back-channel logout on a release build of
//! `lockstep serve` (SQLite): from the logout token arriving to every mapped session ended and
//! every connector called. Everything runs on 127.0.0.1 and stops at the end:
//!
//! - a local identity provider (discovery document and JWKS for realm `acme`, key
//!   `tests/fixtures/oidc/test-rsa-a`); the harness signs the logout tokens with that key;
//! - the server, with the realm's issuer in a `--config` file and two webhook connectors
//!   (`hook-1`, `hook-2`, the real `webhook.wasm`) in its `--connectors-dir`;
//! - one receiver that both connectors post to, noting when each (connector, session, event
//!   type) first arrives.
//!
//! Per logout, one at a time: map a parent (with a unique `keycloakSessionId`) and two
//! children, wait until their login webhooks have arrived and nothing is pending (so the
//! logout is measured alone), then POST the signed logout token and time its answer (must be
//! `200 {"ended": 3}`) and the arrival of the last of the six logout webhooks.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use testkit::Loopback;
use testkit::manifest::toml_str;
use tokio::sync::Notify;

use crate::bench_api::load::{Api, Outcome};
use crate::bench_api::server::Server;
use crate::bench_api::{self, Durability, idp_session_id, parent_id, user_id};
use crate::harness::Admin;
use crate::harness::{self, ConnectorDirs, LatencyTable, lock, ms, percentile_ms};

const TOKEN: &str = "bench-logout-token";
const REALM: &str = "acme";
const AUDIENCE: &str = "lockstep";
/// Key id of `tests/fixtures/oidc/test-rsa-a.jwk.json`.
const KID: &str = "test-a";
const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// The two connectors; each posts to `/<its name>` on the receiver.
const HOOKS: [&str; 2] = ["hook-1", "hook-2"];
/// Sessions per logout: a parent and two children.
const TREE: usize = 3;
/// Longest wait for webhooks (logins before a logout, logouts after it) and for an idle queue.
const WAIT: Duration = Duration::from_secs(10);
/// How often the delivery queue is polled for being empty.
const IDLE_POLL: Duration = Duration::from_millis(5);
/// Per-request timeout of the harness's own calls.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The run stops after this many failed logouts (a dead server would otherwise cost
/// `WAIT` per remaining logout).
const MAX_ERRORS: usize = 10;
/// The target: p99 of "every connector called" under this on an idle host.
const TARGET: Duration = Duration::from_millis(50);

/// Options of `cargo xtask bench-logout`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Logouts to measure, one after another, each of a fresh 3-session tree.
    #[arg(long, default_value_t = 200)]
    logouts: usize,
    /// Commit durability given to the server (`--durability`); `normal` is its default.
    #[arg(long, value_enum, default_value_t = Durability::Normal)]
    durability: Durability,
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
    if args.logouts == 0 {
        bail!("--logouts must be positive");
    }
    let root = crate::workspace_root()?;
    let wasm = bench_api::webhook_component(&root)?;
    let fixtures = root.join("tests/fixtures/oidc");
    let read = |name: &str| {
        let path = fixtures.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let jwk: Value = serde_json::from_str(&read("test-rsa-a.jwk.json")?)
        .context("parsing test-rsa-a.jwk.json")?;
    let key = EncodingKey::from_rsa_pem(read("test-rsa-a.pem")?.as_bytes())
        .context("parsing test-rsa-a.pem")?;
    let command_line = bench_api::command_line();
    let bin = bench_api::server_bin(args.server_bin.as_deref())?;
    bench_api::block_on(bench_api::until_interrupted(run(
        &args,
        &bin,
        &wasm,
        jwk,
        key,
        &command_line,
    )))
}

async fn run(
    args: &Args,
    bin: &Path,
    wasm: &Path,
    jwk: Value,
    key: EncodingKey,
    command_line: &str,
) -> Result<ExitCode> {
    let dir = harness::temp_dir("lockstep-bench-logout-")?;
    let result = bench(args, bin, wasm, jwk, key, dir.path()).await;
    if args.keep {
        eprintln!("kept {}", dir.keep().display());
    }
    let report = result?;
    report.print(args, command_line, &bench_api::revision());
    Ok(crate::verdict::exit_code(&report.failures()))
}

/// Everything measured.
#[derive(Default)]
struct Report {
    /// Logouts attempted.
    attempted: usize,
    /// t1 - t0 of each logout answered `200 {"ended": 3}`.
    answered: Vec<Duration>,
    /// t2 - t0 of each logout whose six webhooks all arrived.
    called: Vec<Duration>,
    /// The first logout, which also fetches the discovery document and the key set.
    first: Option<(Duration, Option<Duration>)>,
    /// One line per failed logout.
    errors: Vec<String>,
    /// Stopped early after `MAX_ERRORS`.
    aborted: bool,
    /// From the receiver at the end.
    arrivals: Counts,
    /// Requests the identity provider answered (discovery and key set).
    idp_requests: usize,
    /// Deliveries still pending, or dead, at the end.
    pending_at_end: bool,
    dead_at_end: bool,
    /// Unclean server exit and the like.
    notes: Vec<String>,
}

/// Runs the logouts against a fresh server in `dir`. The identity provider, the receiver and
/// the server stop when this returns, whichever way.
async fn bench(
    args: &Args,
    bin: &Path,
    wasm: &Path,
    jwk: Value,
    key: EncodingKey,
    dir: &Path,
) -> Result<Report> {
    let idp = Idp::start(jwk).await?;
    let receiver = Receiver::start().await?;

    // Small files: blocking std::fs calls are fine here.
    let dirs = ConnectorDirs::create(dir)?;
    dirs.write_webhooks(
        &HOOKS,
        wasm,
        REALM,
        &["login", "logout", "revoke"],
        &receiver.server.origin(),
    )?;
    let config = dir.join("lockstep.toml");
    std::fs::write(&config, realm_config(&idp.issuer))
        .with_context(|| format!("writing {}", config.display()))?;

    let log = dir.join("server.log");
    let database_url = format!("sqlite://{}", dir.join("bench.db").display());
    let extra = [
        [OsStr::new("--config"), config.as_os_str()].as_slice(),
        &dirs.flags(),
    ]
    .concat();
    // The readiness line comes after every connector in the directory has loaded.
    let server = Server::start(
        bin,
        &database_url,
        args.durability.as_str(),
        TOKEN,
        &extra,
        &log,
    )
    .await?;
    eprintln!("server on {} (log {})", server.addr, log.display());
    let signer = Signer {
        key,
        issuer: idp.issuer.clone(),
    };
    let measured = measure(args, &server, &signer, &receiver).await;
    let (mut report, note) = server.stop_after(measured).await?;
    report.notes.extend(note);
    report.arrivals = receiver.counts();
    report.idp_requests = idp.requests.load(Ordering::Relaxed);
    Ok(report)
}

/// Everything one logout needs.
struct Harness<'a> {
    api: Api,
    admin: Admin,
    client: reqwest::Client,
    logout_url: String,
    signer: &'a Signer,
    receiver: &'a Receiver,
}

async fn measure(
    args: &Args,
    server: &Server,
    signer: &Signer,
    receiver: &Receiver,
) -> Result<Report> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the logout HTTP client")?;
    let h = Harness {
        api: Api::new(server.addr, REALM, TOKEN, 1, REQUEST_TIMEOUT)?,
        admin: Admin::new(server.addr, TOKEN)?,
        client,
        logout_url: format!("http://{}/realms/{REALM}/backchannel-logout", server.addr),
        signer,
        receiver,
    };
    let mut report = Report::default();
    eprintln!("{} logouts, one at a time", args.logouts);
    for i in 0..args.logouts {
        if report.errors.len() >= MAX_ERRORS {
            report.aborted = true;
            break;
        }
        report.attempted += 1;
        let before = (report.answered.len(), report.called.len());
        if let Err(e) = h.logout(i, &mut report).await {
            eprintln!("  logout {i}: {e:#}");
            report.errors.push(format!("logout {i}: {e:#}"));
        }
        if i == 0 {
            let answered = report.answered.get(before.0).copied();
            let called = report.called.get(before.1).copied();
            report.first = answered.map(|a| (a, called));
        }
        if (i + 1) % 50 == 0 {
            eprintln!("  {} done, {} errors", i + 1, report.errors.len());
        }
    }
    // Whatever the logouts left behind must still be delivered, not pending or dead.
    report.pending_at_end = h.wait_idle().await.is_err();
    report.dead_at_end = h.admin.any_delivery("dead").await?;
    Ok(report)
}

impl Harness<'_> {
    /// One measured logout of a fresh tree; pushes its figures into `report`.
    async fn logout(&self, i: usize, report: &mut Report) -> Result<()> {
        let parent = parent_id("logout", i);
        let ids = [
            parent.clone(),
            format!("{parent}-child-1"),
            format!("{parent}-child-2"),
        ];
        let sid = idp_session_id(i);
        expect_ok(self.api.map_parent(&ids[0], &sid, &user_id(i)).await)?;
        for child in &ids[1..] {
            expect_ok(self.api.map_child(child, &ids[0]).await)?;
        }
        let logins = webhooks(&ids, "login");
        self.receiver
            .wait_all(&logins, Instant::now() + WAIT)
            .await
            .map_err(|n| {
                anyhow!(
                    "{n} of {} login webhooks arrived within {WAIT:?}",
                    logins.len()
                )
            })?;
        // Arrived is not recorded: the dispatcher writes each outcome after the call returns.
        self.wait_idle().await?;

        let token = self.signer.logout_token(&sid)?;
        let logouts = webhooks(&ids, "logout");
        let t0 = Instant::now();
        let (status, body) = self.post_logout(&token).await?;
        let answered = t0.elapsed();
        let ended = body.get("ended").and_then(Value::as_u64);
        if status != StatusCode::OK || ended != Some(TREE as u64) {
            bail!(
                "back-channel logout answered {status} {body}, expected 200 {{\"ended\": {TREE}}}"
            );
        }
        report.answered.push(answered);
        let t2 = self
            .receiver
            .wait_all(&logouts, t0 + WAIT)
            .await
            .map_err(|n| {
                anyhow!(
                    "{n} of {} logout webhooks arrived within {WAIT:?}",
                    logouts.len()
                )
            })?;
        report.called.push(t2.saturating_duration_since(t0));
        Ok(())
    }

    /// `POST /realms/acme/backchannel-logout` with `logout_token=<jwt>`; status and JSON body,
    /// read whole.
    async fn post_logout(&self, token: &str) -> Result<(StatusCode, Value)> {
        let resp = self
            .client
            .post(&self.logout_url)
            .form(&[("logout_token", token)])
            .send()
            .await
            .context("POST backchannel-logout")?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .context("POST backchannel-logout: reading the body")?;
        let body = serde_json::from_str(&text).with_context(|| {
            format!("POST backchannel-logout: HTTP {status} with a body that is not JSON: {text}")
        })?;
        Ok((status, body))
    }

    /// Waits (bounded) until no delivery is pending.
    async fn wait_idle(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        while self.admin.any_delivery("pending").await? {
            if Instant::now() >= deadline {
                bail!("deliveries still pending after {WAIT:?}");
            }
            tokio::time::sleep(IDLE_POLL).await;
        }
        Ok(())
    }
}

/// A map call must have answered as documented (a warning counts as an error here).
fn expect_ok(outcome: Outcome) -> Result<()> {
    match outcome {
        Outcome::Ok => Ok(()),
        Outcome::Warn(e) | Outcome::Err(e) => Err(anyhow!(e)),
    }
}

/// Signs logout tokens as the identity provider would.
struct Signer {
    key: EncodingKey,
    issuer: String,
}

impl Signer {
    /// A fresh token (new `jti`) for `sid`, valid for two minutes.
    fn logout_token(&self, sid: &str) -> Result<String> {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": self.issuer,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 120,
            "jti": uuid::Uuid::new_v4().to_string(),
            "sid": sid,
            "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(KID.to_owned());
        // Explicit typing, as Back-Channel Logout 1.0 (section 2.4) recommends.
        header.typ = Some("logout+jwt".to_owned());
        jsonwebtoken::encode(&header, &claims, &self.key).context("signing a logout token")
    }
}

/// The identity provider of realm `acme`: its discovery document and key set.
struct Idp {
    /// Serving until dropped.
    _server: Loopback,
    issuer: String,
    requests: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct IdpState {
    /// Set once the port is known, before anyone can ask.
    issuer: Arc<OnceLock<String>>,
    keys: Arc<Value>,
    requests: Arc<AtomicUsize>,
}

impl Idp {
    async fn start(jwk: Value) -> Result<Idp> {
        let state = IdpState {
            issuer: Arc::new(OnceLock::new()),
            keys: Arc::new(json!({ "keys": [jwk] })),
            requests: Arc::new(AtomicUsize::new(0)),
        };
        let app = axum::Router::new()
            .route(
                &format!("/realms/{REALM}/.well-known/openid-configuration"),
                get(discovery),
            )
            .route(&format!("/realms/{REALM}/certs"), get(certs))
            .with_state(state.clone());
        let server = Loopback::bind(app).await.context("the identity provider")?;
        let issuer = format!("{}/realms/{REALM}", server.origin());
        state
            .issuer
            .set(issuer.clone())
            .map_err(|_| anyhow!("the issuer was already set"))?;
        Ok(Idp {
            _server: server,
            issuer,
            requests: state.requests,
        })
    }
}

async fn discovery(State(state): State<IdpState>) -> Result<Json<Value>, StatusCode> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let issuer = state.issuer.get().ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    Ok(Json(
        json!({ "issuer": issuer, "jwks_uri": format!("{issuer}/certs") }),
    ))
}

async fn certs(State(state): State<IdpState>) -> Json<Value> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    Json((*state.keys).clone())
}

/// `[realms.acme]` trusting the local identity provider.
fn realm_config(issuer: &str) -> String {
    format!(
        "[realms.{REALM}]\nissuer = {}\naudiences = [{}]\nallowed_algs = [\"RS256\"]\n",
        toml_str(issuer),
        toml_str(AUDIENCE),
    )
}

/// (connector, external id, event type) of one webhook.
type Webhook = (String, String, String);

/// The webhooks both connectors make for `ids` and event `kind`.
fn webhooks(ids: &[String], kind: &str) -> Vec<Webhook> {
    HOOKS
        .iter()
        .flat_map(|hook| {
            ids.iter()
                .map(move |id| ((*hook).to_owned(), id.clone(), kind.to_owned()))
        })
        .collect()
}

/// What the receiver saw.
#[derive(Default, Clone, Copy)]
struct Counts {
    requests: usize,
    /// A webhook seen before (allowed: delivery is at least once).
    repeats: usize,
    /// Not a known connector's path, or a body without `externalId` and `type`.
    unrecognised: usize,
}

#[derive(Default)]
struct Arrivals {
    first: HashMap<Webhook, Instant>,
    counts: Counts,
}

struct ReceiverState {
    log: Mutex<Arrivals>,
    /// Woken after every webhook, so waiting never adds a polling delay.
    arrived: Notify,
}

/// One HTTP server on 127.0.0.1 that answers 200 to every request and notes when each
/// webhook first arrived.
struct Receiver {
    server: Loopback,
    state: Arc<ReceiverState>,
}

impl Receiver {
    async fn start() -> Result<Receiver> {
        let state = Arc::new(ReceiverState {
            log: Mutex::new(Arrivals::default()),
            arrived: Notify::new(),
        });
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&state));
        let server = Loopback::bind(app).await.context("the webhook receiver")?;
        Ok(Receiver { server, state })
    }

    /// Waits until every one of `expected` has arrived, or `deadline`; the last arrival, or
    /// how many had arrived.
    async fn wait_all(&self, expected: &[Webhook], deadline: Instant) -> Result<Instant, usize> {
        loop {
            let notified = self.state.arrived.notified();
            tokio::pin!(notified);
            // Registered before looking, so an arrival in between still wakes us.
            notified.as_mut().enable();
            let (last, arrived) = {
                let log = lock(&self.state.log);
                let times: Vec<Instant> = expected
                    .iter()
                    .filter_map(|w| log.first.get(w).copied())
                    .collect();
                (times.iter().max().copied(), times.len())
            };
            if arrived == expected.len()
                && let Some(last) = last
            {
                return Ok(last);
            }
            let deadline = tokio::time::Instant::from_std(deadline);
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(arrived);
            }
        }
    }

    fn counts(&self) -> Counts {
        lock(&self.state.log).counts
    }
}

/// Notes one webhook. Taking the body reads it whole, so the connection can be reused.
async fn receive(State(state): State<Arc<ReceiverState>>, uri: Uri, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let hook = uri
        .path()
        .strip_prefix('/')
        .filter(|h| HOOKS.contains(h))
        .map(str::to_owned);
    let event = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Some((field("externalId")?, field("type")?))
    });
    {
        let mut log = lock(&state.log);
        log.counts.requests += 1;
        match (hook, event) {
            (Some(hook), Some((id, kind))) => match log.first.entry((hook, id, kind)) {
                Entry::Occupied(_) => log.counts.repeats += 1,
                Entry::Vacant(slot) => {
                    slot.insert(at);
                }
            },
            _ => log.counts.unrecognised += 1,
        }
    }
    state.arrived.notify_waiters();
    StatusCode::OK
}

impl Report {
    /// Why the run failed; empty when it passed. Missing the latency target is reported, not
    /// a failure.
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.errors.is_empty() {
            out.push(format!("{} logouts failed", self.errors.len()));
        }
        if self.aborted {
            out.push(format!("stopped after {MAX_ERRORS} errors"));
        }
        if self.pending_at_end {
            out.push(format!(
                "deliveries still pending {WAIT:?} after the last logout"
            ));
        }
        if self.dead_at_end {
            out.push("some deliveries dead".to_owned());
        }
        if self.arrivals.unrecognised > 0 {
            out.push(format!(
                "{} unrecognised requests at the receiver",
                self.arrivals.unrecognised
            ));
        }
        out
    }

    fn print(&self, args: &Args, command_line: &str, revision: &str) {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!();
        println!("== Back-channel logout benchmark");
        println!("command:     {command_line}");
        println!("revision:    {revision}");
        println!(
            "settings:    logouts={} durability={}; SQLite; one logout at a time of a {TREE}-session tree (map-parent + 2 map-child), {} webhook connectors, idle server between logouts; {cores} cores shared by harness, server, IdP and receiver",
            args.logouts,
            args.durability.as_str(),
            HOOKS.len(),
        );

        println!();
        let table = LatencyTable {
            label_width: 52,
            n_width: 5,
        };
        table.header("from the logout token sent (t0) to");
        for (label, samples) in [
            (
                "logout answered (sessions ended, events committed)",
                &self.answered,
            ),
            ("every connector called for every session", &self.called),
        ] {
            table.row(label, samples);
        }
        println!(
            "  answered: the 200 {{\"ended\": {TREE}}} read whole; called: the last of the {} logout webhooks ({TREE} sessions x {} connectors) at the receiver",
            TREE * HOOKS.len(),
            HOOKS.len(),
        );
        if let Some((answered, called)) = self.first {
            println!(
                "  first logout (includes fetching discovery and keys): answered {} ms, called {} ms",
                ms(Some(answered.as_secs_f64() * 1e3)),
                ms(called.map(|c| c.as_secs_f64() * 1e3)),
            );
        }

        println!();
        let mut called = self.called.clone();
        called.sort_unstable();
        let p99 = percentile_ms(&called, 99.0);
        let target_ms = TARGET.as_secs_f64() * 1e3;
        println!(
            "target:      p99 every connector called < {target_ms:.0} ms: {} (p99 {} ms)",
            match p99 {
                Some(p) if p < target_ms => "met",
                Some(_) => "NOT met",
                None => "no data",
            },
            ms(p99),
        );
        let a = self.arrivals;
        println!(
            "webhooks:    {} received ({} per logout expected: {} login + {} logout), {} repeats, {} unrecognised; IdP requests {}",
            a.requests,
            2 * TREE * HOOKS.len(),
            TREE * HOOKS.len(),
            TREE * HOOKS.len(),
            a.repeats,
            a.unrecognised,
            self.idp_requests,
        );
        crate::verdict::print_errors(&self.errors, self.attempted, "logouts", self.aborted);
        crate::verdict::print_verdict(&self.notes, &self.failures());
    }
}
