//! `cargo xtask bench-crash`: crash safety of a release build of `lockstep serve`.
//! Everything runs on 127.0.0.1:
//!
//! - one webhook receiver, started once, that outlives every server it serves: it counts the
//!   arrivals of each (connector, event id) and notes any event whose `originSystem` reached
//!   the connector of that name;
//! - the server on SQLite (a temp dir) or on a fresh PostgreSQL database, with two webhook
//!   connectors (`hook-1`, `hook-2`, the real `webhook.wasm`) in its `--connectors-dir`.
//!
//! Load: `--concurrency` clients build trees (map a parent, map two children, destroy the
//! parent) without pause; every fifth call carries `originSystem: "hook-1"`. Each call is
//! recorded: acknowledged (2xx, committed), refused (another answer) or unknown (sent, but
//! the answer never came: the server may have died before or after the commit). A client
//! whose connection is refused (the server is down) waits and sends the same call again: it
//! never reached a server. After an unknown or refused call the client leaves that tree.
//!
//! `--kills` times: let the load run for a random 0.3–2 s, SIGKILL the server, start it again
//! on the same database. Then the load stops, the server drains its outbox, and the harness
//! resolves the unknown calls with `GET`, stops the server and checks the database and the
//! receiver:
//!
//! 1. no committed change lost: every acknowledged map is there, every acknowledged destroy
//!    left its whole tree DESTROYED (and answered with it), nothing else ended, and each of
//!    these changes has its outbox event;
//! 2. every outbox event has a delivered delivery to each connector it is routed to (both,
//!    except the one named by its `originSystem`), and the receiver saw each at least once;
//! 3. duplicates (arrivals beyond the first) are counted and bounded by the hook calls a kill
//!    can interrupt: the dispatcher's concurrency × kills;
//! 4. no event reached the connector named by its `originSystem`;
//! 5. no dead or dropped delivery (the receiver always answers 200).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use serde_json::{Value, json};
use testkit::Loopback;
use tokio::task::JoinSet;

use crate::bench_api::db::{self, ServerDb, Target};
use crate::bench_api::server::Server;
use crate::bench_api::{self, Durability};
use crate::harness::Admin;
use crate::harness::{self, ConnectorDirs, lock, ms, percentile_ms};

const TOKEN: &str = "bench-crash-token";
const REALM: &str = "crash";
/// The two connectors; each posts to `/<its name>` on the receiver.
const HOOKS: [&str; 2] = ["hook-1", "hook-2"];
/// Every `ORIGIN_EVERY`-th call names `HOOKS[0]` as its origin system.
const ORIGIN_EVERY: usize = 5;
/// Children mapped under each parent before it is destroyed.
const CHILDREN: usize = 2;
/// Hook calls the dispatcher runs at once (`runtime::MAX_CONCURRENT_CALLS` in the host): it
/// claims no more than that, so a kill interrupts at most that many deliveries.
const DISPATCHER_CONCURRENCY: usize = 64;
/// Per-request timeout of the harness's calls; a call that times out is unknown.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A client gives up when the server refuses connections for this long.
const UNREACHABLE_CAP: Duration = Duration::from_secs(60);
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// The drain after the load gives up after this long.
const DRAIN_CAP: Duration = Duration::from_secs(900);
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Options of `cargo xtask bench-crash`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Times the server is killed with SIGKILL and started again.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Concurrent clients, each building one tree at a time.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// PostgreSQL server to run on instead of SQLite in a temp dir: a fresh database is
    /// created on it for the run and dropped afterwards (kept with `--keep`).
    #[arg(long)]
    database_url: Option<String>,
    /// Commit durability given to the server (`--durability`); SIGKILL is a process crash,
    /// which `normal` already survives on SQLite.
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    /// Shortest load between kills, in milliseconds.
    #[arg(long, default_value_t = 300)]
    min_ms: u64,
    /// Longest load between kills, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    max_ms: u64,
    /// Seed of the kill points (printed; the default is taken from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Server binary to run instead of building `target/release/lockstep` first.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Keep the temp directory (database, manifests, server log) and the PostgreSQL database.
    #[arg(long)]
    keep: bool,
}

/// Entry point: builds the server, runs the harness on a Tokio runtime; Ctrl-C stops the
/// server and cleans up.
pub fn main(args: Args) -> Result<ExitCode> {
    if args.concurrency == 0 || args.min_ms > args.max_ms {
        bail!("--concurrency must be positive and --min-ms at most --max-ms");
    }
    if let Some(url) = &args.database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        bail!("--database-url takes a PostgreSQL URL (SQLite is the default, in a temp dir)");
    }
    let root = crate::workspace_root()?;
    let wasm = bench_api::webhook_component(&root)?;
    let bin = bench_api::server_bin(args.server_bin.as_deref())?;
    let command_line = bench_api::command_line();
    let revision = bench_api::revision();
    bench_api::block_on(async {
        let dir = harness::temp_dir("lockstep-crash-")?;
        let pg_db = harness::scratch_db_name("lockstep_crash");
        let target = match &args.database_url {
            None => Target::Sqlite {
                path: dir.path().join("crash.db"),
            },
            Some(admin) => Target::Postgres {
                url: db::create_pg_database(admin, &pg_db).await?,
            },
        };
        let outcome =
            bench_api::until_interrupted(crash(&args, &bin, &wasm, &target, dir.path())).await;
        if let Some(admin) = &args.database_url {
            if args.keep {
                eprintln!("kept database {pg_db}");
            } else {
                harness::drop_scratch_databases(admin, &[pg_db]).await;
            }
        }
        if args.keep {
            eprintln!("kept {}", dir.keep().display());
        }
        let report = outcome?;
        report.print(&args, &target, &command_line, &revision);
        Ok(crate::verdict::exit_code(&report.failures()))
    })
}

/// A small xorshift generator: the kill points only need to be spread, and repeatable from
/// the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform enough in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// What a client did with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    MapParent,
    MapChild,
    DestroyParent,
}

impl Op {
    fn path(self) -> &'static str {
        match self {
            Op::MapParent => "map-parent",
            Op::MapChild => "map-child",
            Op::DestroyParent => "destroy-parent",
        }
    }
}

/// How a call ended, as far as the client knows.
enum Answer {
    /// A 2xx answer: committed.
    Acked(Value),
    /// Another answer: the server says it did not do it.
    Refused(String),
    /// Sent, but no answer came (connection reset by the kill, or a timeout).
    Unknown(String),
}

/// A call the client could not confirm, to resolve with `GET` once the load is over.
#[derive(Clone, Debug)]
struct Unsure {
    op: Op,
    /// The session mapped, or the parent destroyed.
    id: String,
    /// For a destroy: the children acknowledged under the parent.
    children: Vec<String>,
    /// Refused (answered non-2xx) rather than unanswered.
    refused: bool,
    /// The answer, or why none came.
    why: String,
}

/// One acknowledged destroy-parent.
struct Destroyed {
    parent: String,
    children: Vec<String>,
    /// `changed` of the answer.
    changed: Vec<String>,
}

/// Everything the clients did.
#[derive(Default)]
struct CallLog {
    calls: usize,
    /// Acknowledged maps: (external id, parent).
    maps: Vec<(String, Option<String>)>,
    destroys: Vec<Destroyed>,
    unsure: Vec<Unsure>,
    /// Calls that waited for the server to come back (connection refused) before going out.
    waited: usize,
}

/// The API client of the load: the server's address changes with every restart.
struct Client {
    http: reqwest::Client,
    addr: Arc<RwLock<SocketAddr>>,
    /// Numbers the calls, to put `originSystem` on every `ORIGIN_EVERY`-th.
    seq: AtomicUsize,
}

impl Client {
    fn addr(&self) -> SocketAddr {
        *self.addr.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `op` with `body` (plus `originSystem` on every fifth call); a refused connection
    /// is sent again, for up to `UNREACHABLE_CAP`.
    async fn call(&self, op: Op, mut body: Value, waited: &mut usize) -> Result<Answer> {
        if self
            .seq
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(ORIGIN_EVERY)
        {
            body["originSystem"] = Value::from(HOOKS[0]);
        }
        let started = Instant::now();
        let mut counted = false;
        loop {
            let url = format!(
                "http://{}/admin/realms/{REALM}/external-sessions/{}",
                self.addr(),
                op.path()
            );
            let sent = self
                .http
                .post(url)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await;
            let resp = match sent {
                Ok(resp) => resp,
                Err(e) if e.is_connect() => {
                    if started.elapsed() >= UNREACHABLE_CAP {
                        bail!("the server refused connections for {UNREACHABLE_CAP:?}: {e}");
                    }
                    if !counted {
                        *waited += 1;
                        counted = true;
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                Err(e) => return Ok(Answer::Unknown(format!("{e}"))),
            };
            let status = resp.status();
            let text = match resp.text().await {
                Ok(text) => text,
                Err(e) => return Ok(Answer::Unknown(format!("reading the answer: {e}"))),
            };
            if !status.is_success() {
                return Ok(Answer::Refused(format!("HTTP {status}: {text}")));
            }
            return Ok(match serde_json::from_str(&text) {
                Ok(v) => Answer::Acked(v),
                Err(e) => Answer::Refused(format!("HTTP {status}, not JSON ({e}): {text}")),
            });
        }
    }

    /// `GET /{id}`: the session's status, `None` when it does not exist.
    async fn status(&self, id: &str) -> Result<Option<String>> {
        let url = format!(
            "http://{}/admin/realms/{REALM}/external-sessions/{id}",
            self.addr()
        );
        let resp = self
            .http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .with_context(|| format!("GET {id}"))?;
        let status = resp.status();
        let text = resp.text().await.with_context(|| format!("GET {id}"))?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let v: Value = serde_json::from_str(&text)
                    .with_context(|| format!("GET {id}: not JSON: {text}"))?;
                v.get("status")
                    .and_then(Value::as_str)
                    .map(|s| Some(s.to_owned()))
                    .with_context(|| format!("GET {id}: no status: {text}"))
            }
            s => bail!("GET {id}: HTTP {s}: {text}"),
        }
    }
}

/// The load: trees from a shared counter until `stop`.
struct Load {
    client: Client,
    next: AtomicUsize,
    stop: AtomicBool,
}

impl Load {
    async fn worker(self: Arc<Self>) -> Result<CallLog> {
        let mut log = CallLog::default();
        while !self.stop.load(Ordering::Relaxed) {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            self.tree(n, &mut log).await?;
        }
        Ok(log)
    }

    /// Map-parent, `CHILDREN` map-child, destroy-parent; stops at the first call that is
    /// not acknowledged, or when the load stops.
    async fn tree(&self, n: usize, log: &mut CallLog) -> Result<()> {
        let parent = format!("crash-{n:06}");
        let body = json!({
            "externalId": parent,
            "keycloakSessionId": bench_api::idp_session_id(n),
            "userId": bench_api::user_id(n),
        });
        if !self.step(Op::MapParent, &parent, body, log).await? {
            return Ok(());
        }
        log.maps.push((parent.clone(), None));
        let mut children = Vec::new();
        for j in 0..CHILDREN {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let child = format!("{parent}-c{j}");
            let body = json!({ "externalId": child, "parentExternalId": parent });
            if !self.step(Op::MapChild, &child, body, log).await? {
                return Ok(());
            }
            log.maps.push((child.clone(), Some(parent.clone())));
            children.push(child);
        }
        if self.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let body = json!({ "externalId": parent });
        log.calls += 1;
        match self
            .client
            .call(Op::DestroyParent, body, &mut log.waited)
            .await?
        {
            Answer::Acked(v) => {
                let changed = v
                    .get("changed")
                    .and_then(Value::as_array)
                    .map(|c| {
                        c.iter()
                            .filter_map(|s| s.get("externalId").and_then(Value::as_str))
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                log.destroys.push(Destroyed {
                    parent,
                    children,
                    changed,
                });
            }
            Answer::Refused(why) => log.unsure.push(Unsure {
                op: Op::DestroyParent,
                id: parent,
                children,
                refused: true,
                why,
            }),
            Answer::Unknown(why) => log.unsure.push(Unsure {
                op: Op::DestroyParent,
                id: parent,
                children,
                refused: false,
                why,
            }),
        }
        Ok(())
    }

    /// One map call; true when acknowledged.
    async fn step(&self, op: Op, id: &str, body: Value, log: &mut CallLog) -> Result<bool> {
        log.calls += 1;
        let (refused, why) = match self.client.call(op, body, &mut log.waited).await? {
            Answer::Acked(_) => return Ok(true),
            Answer::Refused(why) => (true, why),
            Answer::Unknown(why) => (false, why),
        };
        log.unsure.push(Unsure {
            op,
            id: id.to_owned(),
            children: Vec::new(),
            refused,
            why,
        });
        Ok(false)
    }
}

/// What the receiver saw.
#[derive(Default)]
struct Arrivals {
    /// Arrivals of each (connector index, event id), and the server generation of the first.
    count: HashMap<(usize, String), (u32, usize)>,
    /// Arrivals beyond the first that came from the same server generation as the first: no
    /// kill explains them.
    same_generation_duplicates: usize,
    /// Arrivals beyond the first, by the server generation (0 = first start) they came in.
    duplicates_by_generation: BTreeMap<usize, usize>,
    /// Event ids that reached the connector named by their payload's `originSystem`.
    echoed: Vec<(usize, String)>,
    requests: usize,
    /// Not a known connector's path, or no event id.
    unrecognised: usize,
}

#[derive(Clone)]
struct ReceiverState {
    log: Arc<Mutex<Arrivals>>,
    generation: Arc<AtomicUsize>,
}

/// Logs one webhook; always 200, so no delivery ever fails at the receiver.
async fn receive(
    State(state): State<ReceiverState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let generation = state.generation.load(Ordering::Relaxed);
    let hook = uri
        .path()
        .strip_prefix('/')
        .and_then(|h| HOOKS.iter().position(|k| *k == h));
    // The payload's `eventId` (the `webhook-id` header too, when the connector signs).
    let payload = serde_json::from_slice::<Value>(&body).ok();
    let field = |k: &str| {
        payload
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let event_id = field("eventId").or_else(|| {
        headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let origin = field("originSystem");
    let mut log = lock(&state.log);
    log.requests += 1;
    match (hook, event_id) {
        (Some(hook), Some(id)) => {
            if origin.as_deref() == Some(HOOKS[hook]) {
                log.echoed.push((hook, id.clone()));
            }
            let (n, first) = log.count.entry((hook, id)).or_insert((0, generation));
            *n += 1;
            if *n > 1 {
                let same = *first == generation;
                *log.duplicates_by_generation.entry(generation).or_insert(0) += 1;
                if same {
                    log.same_generation_duplicates += 1;
                }
            }
        }
        _ => log.unrecognised += 1,
    }
    StatusCode::OK
}

/// What the checks read.
impl ServerDb {
    /// Outbox rows not fanned out yet plus pending deliveries: the work left.
    async fn backlog(&self) -> Result<(i64, i64)> {
        Ok((
            self.scalar("SELECT COUNT(*) FROM outbox WHERE fanned_out = 0")
                .await?,
            self.scalar("SELECT COUNT(*) FROM deliveries WHERE status = 'pending'")
                .await?,
        ))
    }
}

/// One outbox row: id, event id, type, external id, origin system.
type OutboxRow = (i64, String, String, String, Option<String>);
/// One delivery: outbox id, connector, status.
type DeliveryRow = (i64, String, String);

/// Figures and findings of a run.
#[derive(Default)]
struct Report {
    seed: u64,
    server_bin: String,
    kills: usize,
    restarts: Vec<Duration>,
    load_took: Duration,
    calls: usize,
    acked_maps: usize,
    acked_destroys: usize,
    waited: usize,
    unknown: usize,
    unknown_committed: usize,
    /// The first few unanswered calls and why no answer came.
    unknown_samples: Vec<String>,
    refused: Vec<String>,
    refused_committed: usize,
    drain_took: Duration,
    drained: bool,
    sessions: usize,
    destroyed_sessions: usize,
    outbox: usize,
    outbox_hook1_origin: usize,
    deliveries: usize,
    delivered: usize,
    expected_deliveries: usize,
    arrivals: usize,
    duplicates: usize,
    duplicated_pairs: usize,
    max_arrivals: u32,
    duplicates_by_generation: BTreeMap<usize, usize>,
    same_generation_duplicates: usize,
    unrecognised: usize,
    dead: usize,
    dropped: usize,
    notes: Vec<String>,
    /// Per check (1–5): what failed, with evidence.
    lost_changes: Vec<String>,
    undelivered: Vec<String>,
    echoes: Vec<String>,
    dead_letters: Vec<String>,
}

async fn crash(
    args: &Args,
    bin: &Path,
    wasm: &Path,
    target: &Target,
    dir: &Path,
) -> Result<Report> {
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Truncation is fine: any bits make a seed.
        (nanos as u64) | 1
    });
    let mut rng = Rng(seed | 1);
    let mut report = Report {
        seed,
        server_bin: bin.display().to_string(),
        ..Report::default()
    };

    let generation = Arc::new(AtomicUsize::new(0));
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(ReceiverState {
            log: Arc::clone(&arrivals),
            generation: Arc::clone(&generation),
        });
    let receiver = Loopback::bind(app).await.context("the webhook receiver")?;

    let dirs = ConnectorDirs::create(dir)?;
    dirs.write_webhooks(
        &HOOKS,
        wasm,
        REALM,
        &["login", "logout"],
        &receiver.origin(),
    )?;
    let log = dir.join("server.log");
    let extra = dirs.flags();
    let url = target.server_url();
    let start = || Server::start(bin, &url, args.durability.as_str(), TOKEN, &extra, &log);

    // The readiness line comes after every connector in the directory has loaded.
    let mut server = start().await?;
    eprintln!(
        "server on {} (log {}), receiver on {}, seed {seed}",
        server.addr,
        log.display(),
        receiver.origin()
    );
    let load = Arc::new(Load {
        client: Client {
            http: reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(args.concurrency)
                .timeout(REQUEST_TIMEOUT)
                .build()
                .context("building the HTTP client")?,
            addr: Arc::new(RwLock::new(server.addr)),
            seq: AtomicUsize::new(0),
        },
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });
    let load_started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency {
        workers.spawn(Arc::clone(&load).worker());
    }

    for k in 1..=args.kills {
        let pause = Duration::from_millis(rng.between(args.min_ms, args.max_ms));
        tokio::time::sleep(pause).await;
        if let Some(joined) = workers.try_join_next() {
            // A worker only ends early on an error; report it now.
            joined.context("a client task failed")??;
            bail!("a client stopped before the load did");
        }
        let killed = Instant::now();
        server.kill().await?;
        generation.fetch_add(1, Ordering::Relaxed);
        server = start().await?;
        let took = killed.elapsed();
        *load
            .client
            .addr
            .write()
            .unwrap_or_else(PoisonError::into_inner) = server.addr;
        report.restarts.push(took);
        report.kills = k;
        eprintln!(
            "kill {k}/{} after {} ms of load; serving again in {:.0} ms on {}",
            args.kills,
            pause.as_millis(),
            took.as_secs_f64() * 1e3,
            server.addr
        );
    }
    // Some load on the last server too, then stop.
    tokio::time::sleep(Duration::from_millis(rng.between(args.min_ms, args.max_ms))).await;
    load.stop.store(true, Ordering::Relaxed);
    let mut calls = CallLog::default();
    while let Some(joined) = workers.join_next().await {
        let log = joined.context("a client task failed")??;
        calls.calls += log.calls;
        calls.maps.extend(log.maps);
        calls.destroys.extend(log.destroys);
        calls.unsure.extend(log.unsure);
        calls.waited += log.waited;
    }
    report.load_took = load_started.elapsed();
    report.calls = calls.calls;
    report.acked_maps = calls.maps.len();
    report.acked_destroys = calls.destroys.len();
    report.waited = calls.waited;
    eprintln!(
        "load stopped after {:.1} s: {} calls; draining",
        report.load_took.as_secs_f64(),
        calls.calls
    );

    let db = ServerDb::open(target).await?;
    let checked = async {
        // Drain: nothing left to fan out, nothing pending (the admin API says the same).
        let admin = Admin::new(server.addr, TOKEN)?;
        let drain_start = Instant::now();
        loop {
            let (unfanned, pending) = db.backlog().await?;
            if unfanned == 0 && pending == 0 && !admin.any_delivery("pending").await? {
                report.drained = true;
                break;
            }
            if drain_start.elapsed() >= DRAIN_CAP {
                report.notes.push(format!(
                    "not drained after {DRAIN_CAP:?}: {unfanned} outbox rows not fanned out, {pending} deliveries pending"
                ));
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        report.drain_took = drain_start.elapsed();
        eprintln!(
            "drained in {:.1} s; resolving {} unconfirmed calls",
            report.drain_took.as_secs_f64(),
            calls.unsure.len()
        );
        let resolved = resolve(&load.client, &calls.unsure).await?;
        anyhow::Ok(resolved)
    }
    .await;
    // The checks then read a quiet database.
    let (resolved, note) = server.stop_after(checked).await?;
    report.notes.extend(note);
    verify(&mut report, &db, &calls, &resolved, &arrivals).await?;
    db.close().await;
    drop(receiver);
    Ok(report)
}

/// Whether each unconfirmed call took effect, by `GET` of its session: a map took effect
/// when the session exists, a destroy when its parent is no longer ACTIVE.
async fn resolve(client: &Client, unsure: &[Unsure]) -> Result<Vec<bool>> {
    let mut out = Vec::with_capacity(unsure.len());
    for u in unsure {
        let status = client.status(&u.id).await?;
        out.push(match u.op {
            Op::MapParent | Op::MapChild => status.is_some(),
            Op::DestroyParent => status.is_some_and(|s| s != "ACTIVE"),
        });
    }
    Ok(out)
}

async fn verify(
    report: &mut Report,
    db: &ServerDb,
    calls: &CallLog,
    resolved: &[bool],
    arrivals: &Mutex<Arrivals>,
) -> Result<()> {
    let sessions: Vec<(String, String, Option<String>, String)> = db
        .rows(&format!(
            "SELECT external_id, kind, parent_id, status FROM sessions WHERE realm = '{REALM}'"
        ))
        .await?;
    let outbox: Vec<OutboxRow> = db
        .rows(&format!(
            "SELECT id, event_id, event_type, external_id, origin_system FROM outbox \
             WHERE realm = '{REALM}' ORDER BY id"
        ))
        .await?;
    let deliveries: Vec<DeliveryRow> = db
        .rows(&format!(
            "SELECT outbox_id, connector, status FROM deliveries WHERE realm = '{REALM}'"
        ))
        .await?;
    report.sessions = sessions.len();
    report.destroyed_sessions = sessions.iter().filter(|s| s.3 == "DESTROYED").count();
    report.outbox = outbox.len();
    report.outbox_hook1_origin = outbox
        .iter()
        .filter(|o| o.4.as_deref() == Some(HOOKS[0]))
        .count();
    report.deliveries = deliveries.len();
    report.delivered = deliveries.iter().filter(|d| d.2 == "delivered").count();
    report.dead = deliveries.iter().filter(|d| d.2 == "dead").count();
    report.dropped = deliveries.iter().filter(|d| d.2 == "dropped").count();

    // 1. No committed change lost.
    let by_id: HashMap<&str, (&str, Option<&str>, &str)> = sessions
        .iter()
        .map(|(id, kind, parent, status)| {
            (
                id.as_str(),
                (kind.as_str(), parent.as_deref(), status.as_str()),
            )
        })
        .collect();
    // Every committed map (acknowledged, or unconfirmed and found), with its parent.
    let mut committed: Vec<(String, Option<String>)> = calls.maps.clone();
    // Trees whose destroy committed: parent → children known to exist.
    let mut ended: HashMap<String, Vec<String>> = HashMap::new();
    for d in &calls.destroys {
        ended.insert(d.parent.clone(), d.children.clone());
    }
    for (u, took_effect) in calls.unsure.iter().zip(resolved) {
        if u.refused {
            report
                .refused
                .push(format!("{} {}: {}", u.op.path(), u.id, u.why));
            if *took_effect {
                report.refused_committed += 1;
            }
        } else {
            report.unknown += 1;
            if *took_effect {
                report.unknown_committed += 1;
            }
            if report.unknown_samples.len() < 3 {
                report
                    .unknown_samples
                    .push(format!("{} {}: {}", u.op.path(), u.id, u.why));
            }
        }
        if *took_effect {
            match u.op {
                Op::MapParent => committed.push((u.id.clone(), None)),
                Op::MapChild => {
                    let parent = u.id.rsplit_once("-c").map(|(p, _)| p.to_owned());
                    committed.push((u.id.clone(), parent));
                }
                Op::DestroyParent => {
                    ended.insert(u.id.clone(), u.children.clone());
                }
            }
        } else if matches!(u.op, Op::MapParent | Op::MapChild)
            && let Some(row) = by_id.get(u.id.as_str())
        {
            report.lost_changes.push(format!(
                "{} {} was not confirmed and GET found nothing, yet the table has it: {row:?}",
                u.op.path(),
                u.id
            ));
        }
    }
    let mut should_end: HashSet<&str> = HashSet::new();
    for (parent, children) in &ended {
        should_end.insert(parent);
        // Children mapped before the destroy, acknowledged or not, end with it.
        for (id, p) in &committed {
            if p.as_deref() == Some(parent.as_str()) {
                should_end.insert(id);
            }
        }
        for c in children {
            should_end.insert(c);
        }
    }
    for (id, parent) in &committed {
        match by_id.get(id.as_str()) {
            None => report
                .lost_changes
                .push(format!("committed map of {id} is missing from sessions")),
            Some((kind, p, status)) => {
                let want_kind = if parent.is_some() { "CHILD" } else { "PARENT" };
                let want_status = if should_end.contains(id.as_str()) {
                    "DESTROYED"
                } else {
                    "ACTIVE"
                };
                if *kind != want_kind || *p != parent.as_deref() || *status != want_status {
                    report.lost_changes.push(format!(
                        "{id}: table has ({kind}, parent {p:?}, {status}), committed calls say ({want_kind}, parent {parent:?}, {want_status})"
                    ));
                }
            }
        }
    }
    let committed_ids: HashSet<&str> = committed.iter().map(|(id, _)| id.as_str()).collect();
    for (id, (_, _, status)) in &by_id {
        if !committed_ids.contains(id) {
            report.lost_changes.push(format!(
                "{id} ({status}) is in sessions, but no call that took effect mapped it"
            ));
        }
    }
    for d in &calls.destroys {
        let mut want: Vec<&str> = vec![d.parent.as_str()];
        want.extend(d.children.iter().map(String::as_str));
        let missing: Vec<&&str> = want
            .iter()
            .filter(|w| !d.changed.iter().any(|c| c == *w))
            .collect();
        if !missing.is_empty() {
            report.lost_changes.push(format!(
                "destroy-parent {} answered changed {:?}, missing {missing:?}",
                d.parent, d.changed
            ));
        }
    }
    // Each committed change wrote its event: a login per map, a logout per ended session.
    let events: HashSet<(&str, &str)> = outbox
        .iter()
        .map(|o| (o.2.as_str(), o.3.as_str()))
        .collect();
    for (id, _) in &committed {
        if !events.contains(&("login", id.as_str())) {
            report.lost_changes.push(format!(
                "committed map of {id} has no login event in the outbox"
            ));
        }
    }
    for id in &should_end {
        if !events.contains(&("logout", *id)) {
            report.lost_changes.push(format!(
                "ended session {id} has no logout event in the outbox"
            ));
        }
    }

    // 2, 4, 5: every routed delivery delivered and received; none to the origin; none dead.
    let routed: HashMap<(i64, &str), &str> = deliveries
        .iter()
        .map(|(o, c, s)| ((*o, c.as_str()), s.as_str()))
        .collect();
    let log = lock(arrivals);
    for (id, event_id, kind, external_id, origin) in &outbox {
        for (h, hook) in HOOKS.iter().enumerate() {
            let seen = log.count.get(&(h, event_id.clone())).map_or(0, |c| c.0);
            if origin.as_deref() == Some(*hook) {
                if routed.contains_key(&(*id, *hook)) {
                    report.echoes.push(format!(
                        "outbox {id} ({kind} {external_id}, origin {hook}) was routed to {hook}"
                    ));
                }
                if seen > 0 {
                    report.echoes.push(format!(
                        "outbox {id} ({kind} {external_id}, event {event_id}, origin {hook}) reached {hook} {seen}×"
                    ));
                }
                continue;
            }
            report.expected_deliveries += 1;
            match routed.get(&(*id, *hook)) {
                None => report.undelivered.push(format!(
                    "outbox {id} ({kind} {external_id}, event {event_id}, origin {origin:?}) has no delivery to {hook}"
                )),
                Some(&"delivered") => {}
                Some(status) => report.undelivered.push(format!(
                    "outbox {id} ({kind} {external_id}) to {hook}: delivery is {status}"
                )),
            }
            if seen == 0 {
                report.undelivered.push(format!(
                    "outbox {id} ({kind} {external_id}, event {event_id}) never reached {hook}'s receiver"
                ));
            }
        }
    }
    for (h, event_id) in &log.echoed {
        report.echoes.push(format!(
            "event {event_id} with originSystem {0} reached {0}",
            HOOKS[*h]
        ));
    }
    for (o, c, s) in &deliveries {
        if s == "dead" || s == "dropped" {
            report
                .dead_letters
                .push(format!("delivery of outbox {o} to {c} is {s}"));
        }
    }

    // 3. Duplicates.
    let known: HashSet<&str> = outbox.iter().map(|o| o.1.as_str()).collect();
    for ((h, event_id), (n, _)) in &log.count {
        report.arrivals += *n as usize;
        if *n > 1 {
            report.duplicated_pairs += 1;
            report.duplicates += (*n - 1) as usize;
        }
        report.max_arrivals = report.max_arrivals.max(*n);
        if !known.contains(event_id.as_str()) {
            report.notes.push(format!(
                "{} received event {event_id}, which is not in the outbox",
                HOOKS[*h]
            ));
        }
    }
    report
        .duplicates_by_generation
        .clone_from(&log.duplicates_by_generation);
    report.unrecognised = log.unrecognised;
    report.same_generation_duplicates = log.same_generation_duplicates;
    Ok(())
}

impl Report {
    fn duplicate_bound(&self) -> usize {
        DISPATCHER_CONCURRENCY * self.kills
    }

    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |name: &str, items: &[String]| {
            if !items.is_empty() {
                out.push(format!("{name}: {} ({})", items.len(), items[0]));
            }
        };
        check("1. committed changes lost or wrong", &self.lost_changes);
        check("2. events not delivered", &self.undelivered);
        check("4. deliveries to the origin system", &self.echoes);
        check("5. dead letters", &self.dead_letters);
        if self.duplicates > self.duplicate_bound() {
            out.push(format!(
                "3. duplicates {} exceed the in-flight bound {}",
                self.duplicates,
                self.duplicate_bound()
            ));
        }
        if !self.drained {
            out.push("the outbox did not drain".to_owned());
        }
        if self.unrecognised > 0 {
            out.push(format!(
                "{} webhooks the receiver could not attribute",
                self.unrecognised
            ));
        }
        out
    }

    fn print(&self, args: &Args, target: &Target, command_line: &str, revision: &str) {
        let mut restarts = self.restarts.clone();
        restarts.sort_unstable();
        println!();
        println!("== bench-crash ({})", target.name());
        println!("command:   {command_line}");
        println!("revision:  {revision} (server binary {})", self.server_bin);
        println!(
            "setup:     {} clients, kills every {}–{} ms (seed {}), durability {}, connectors {} (webhook.wasm)",
            args.concurrency,
            args.min_ms,
            args.max_ms,
            self.seed,
            args.durability.as_str(),
            HOOKS.join(", ")
        );
        println!(
            "kills:     {} SIGKILLs; restart (kill → serving again) median {} ms, max {} ms",
            self.kills,
            ms(percentile_ms(&restarts, 50.0)),
            ms(percentile_ms(&restarts, 100.0)),
        );
        println!(
            "load:      {:.1} s, {} calls: {} maps and {} destroy-parent acknowledged; {} calls waited for a restart",
            self.load_took.as_secs_f64(),
            self.calls,
            self.acked_maps,
            self.acked_destroys,
            self.waited
        );
        println!(
            "unknown:   {} calls without an answer, resolved by GET: {} had committed, {} had not",
            self.unknown,
            self.unknown_committed,
            self.unknown - self.unknown_committed
        );
        for u in &self.unknown_samples {
            println!("           {u}");
        }
        println!(
            "refused:   {} calls answered non-2xx ({} took effect anyway)",
            self.refused.len(),
            self.refused_committed
        );
        for r in self.refused.iter().take(5) {
            println!("           {r}");
        }
        println!(
            "sessions:  {} in the table, {} DESTROYED",
            self.sessions, self.destroyed_sessions
        );
        println!(
            "events:    {} outbox events ({} with originSystem {})",
            self.outbox, self.outbox_hook1_origin, HOOKS[0]
        );
        println!(
            "deliveries: {} rows, {} delivered, {} expected by routing; {} dead, {} dropped; drained in {:.1} s",
            self.deliveries,
            self.delivered,
            self.expected_deliveries,
            self.dead,
            self.dropped,
            self.drain_took.as_secs_f64()
        );
        println!(
            "receiver:  {} webhooks, {} duplicates over {} (connector, event) pairs (max {} arrivals of one); bound {} = {} in flight × {} kills",
            self.arrivals,
            self.duplicates,
            self.duplicated_pairs,
            self.max_arrivals,
            self.duplicate_bound(),
            DISPATCHER_CONCURRENCY,
            self.kills
        );
        if !self.duplicates_by_generation.is_empty() {
            let per: Vec<String> = self
                .duplicates_by_generation
                .iter()
                .map(|(g, n)| format!("after kill {g}: {n}"))
                .collect();
            println!(
                "           duplicates arrived {}; {} of them from the same server process as the first arrival (no kill between)",
                per.join(", "),
                self.same_generation_duplicates
            );
        }
        for note in &self.notes {
            println!("note:      {note}");
        }
        println!("checks:");
        let line = |name: &str, items: &[String]| {
            println!(
                "  {name}: {}",
                if items.is_empty() { "ok" } else { "FAILED" }
            );
            for i in items.iter().take(20) {
                println!("    {i}");
            }
            if items.len() > 20 {
                println!("    … {} more", items.len() - 20);
            }
        };
        line("1. no committed change lost", &self.lost_changes);
        line(
            "2. every event delivered to every routed connector and received",
            &self.undelivered,
        );
        println!(
            "  3. duplicates {} ≤ bound {}: {}",
            self.duplicates,
            self.duplicate_bound(),
            if self.duplicates <= self.duplicate_bound() {
                "ok"
            } else {
                "FAILED"
            }
        );
        line("4. nothing delivered to its origin system", &self.echoes);
        line("5. no dead letters", &self.dead_letters);
        let failures = self.failures();
        if failures.is_empty() {
            println!("result: all checks passed");
        } else {
            println!("result: FAILED");
            for f in failures {
                println!("  {f}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_points_stay_in_range_and_repeat_with_the_seed() {
        let mut a = Rng(42);
        let mut b = Rng(42);
        for _ in 0..1000 {
            let x = a.between(300, 2000);
            assert!((300..=2000).contains(&x));
            assert_eq!(x, b.between(300, 2000));
        }
    }

    #[test]
    fn the_connector_named_as_origin_is_hook_1() {
        assert_eq!(HOOKS[0], "hook-1");
        let origin = "http://127.0.0.1:1";
        let manifest =
            crate::harness::webhook_manifest(HOOKS[0], Path::new("w.wasm"), REALM, &[], origin);
        assert!(manifest.contains("/hook-1"));
    }
}
