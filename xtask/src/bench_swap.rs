//! `cargo xtask bench-swap`: measures connector hot-swapping on a release build of
//! `lockstep serve` under session load. Two connectors run the real `webhook.wasm`: `hook-dir`
//! from a manifest in the watched connectors directory and `hook-api` uploaded through the
//! admin API; both post every event to one of two local receivers (A, B). Phases:
//!
//! 1. baseline: `--clients` tasks map and destroy parent sessions for `--seconds`;
//! 2. swapping: the same load while, every `--swap-every-ms`, one connector is re-pointed at
//!    the other receiver, alternately by renaming a new manifest into the directory and by a
//!    manifest-only `PUT /admin/connectors/hook-api`.
//!
//! Each webhook URL carries the sequence number of the swap that set it (`?v=N`), so the
//! receivers know exactly which version delivered each event. At the end every event must
//! have arrived at least once and no delivery may be pending or dead.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use serde_json::Value;
use testkit::Loopback;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::bench_api::load::{Api, Outcome, PhaseStats};
use crate::bench_api::server::Server;
use crate::bench_api::{self, idp_session_id, parent_id, user_id};
use crate::harness::{self, Admin, ConnectorDirs, QueueCounts, lock, ms, percentile_ms};

const TOKEN: &str = "bench-swap-token";
const REALM: &str = "bench";
/// Process-crash durability: the figures are about swapping, not about fsync on a shared box.
const DURABILITY: &str = "normal";
/// The Standard Webhooks example secret. Signing makes the connector send `webhook-id` (the
/// event id), which the receivers count unique events by.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// How often a directory swap is polled for the new version.
const POLL: Duration = Duration::from_millis(5);
/// Longest wait for a directory swap to serve.
const SWAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the deliveries to drain, between the phases and at the end. The load
/// creates deliveries faster than one dispatcher on two shared cores makes webhook calls
/// (about 4:1 measured), so a 10 s phase leaves about a minute of backlog.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);
/// How often the drain is checked.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Per-request timeout of the session load; a slower request counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `cargo xtask bench-swap`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Length of each phase (baseline, then swapping), in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients, each mapping and then destroying one parent session at a time.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Interval between swaps; they alternate between the directory and the API connector.
    #[arg(long, default_value_t = 500)]
    swap_every_ms: u64,
    /// Server binary to run instead of building `target/release/lockstep` first.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Keep the temp directory (database, manifests, server log); its path is printed.
    #[arg(long)]
    keep: bool,
}

/// The two connectors under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Hook {
    /// `hook-dir`: a manifest in the watched directory.
    Dir,
    /// `hook-api`: uploaded with `PUT /admin/connectors/hook-api`.
    Api,
}

impl Hook {
    const ALL: [Hook; 2] = [Hook::Dir, Hook::Api];

    fn name(self) -> &'static str {
        match self {
            Hook::Dir => "hook-dir",
            Hook::Api => "hook-api",
        }
    }

    fn index(self) -> usize {
        match self {
            Hook::Dir => 0,
            Hook::Api => 1,
        }
    }

    /// Each connector posts to `/<its name>`, so a receiver can tell them apart.
    fn from_path(path: &str) -> Option<Hook> {
        Hook::ALL
            .into_iter()
            .find(|h| path.strip_prefix('/') == Some(h.name()))
    }
}

/// Entry point: checks the prerequisites, builds the server, and runs the benchmark on a
/// Tokio runtime; Ctrl-C stops the server and cleans up.
pub fn main(args: Args) -> Result<ExitCode> {
    if args.seconds == 0 || args.clients == 0 || args.swap_every_ms == 0 {
        bail!("--seconds, --clients and --swap-every-ms must be positive");
    }
    let root = crate::workspace_root()?;
    let wasm = bench_api::webhook_component(&root)?;
    let command_line = bench_api::command_line();
    let bin = bench_api::server_bin(args.server_bin.as_deref())?;
    bench_api::block_on(bench_api::until_interrupted(run(
        &args,
        &bin,
        &wasm,
        &command_line,
    )))
}

async fn run(args: &Args, bin: &Path, wasm: &Path, command_line: &str) -> Result<ExitCode> {
    let dir = harness::temp_dir("lockstep-bench-swap-")?;
    let result = bench(args, bin, wasm, dir.path()).await;
    if args.keep {
        eprintln!("kept {}", dir.keep().display());
    }
    let report = result?;
    report.print(args, command_line, &bench_api::revision());
    Ok(crate::verdict::exit_code(&report.failures()))
}

/// Everything measured.
struct Report {
    baseline: PhaseStats,
    swapping: PhaseStats,
    swaps: Vec<Swap>,
    /// First arrival of each connector version, from the receivers.
    first: HashMap<(Hook, u32, usize), Instant>,
    /// Events each connector should have received (one per successful request).
    events: usize,
    /// Unique events each connector did receive (by `Hook::index`).
    received: [usize; 2],
    duplicates: usize,
    /// Requests at the receivers that no connector version accounts for.
    unrecognised: usize,
    /// The wait between the phases (the swapping phase starts with what is left).
    settle: Drain,
    final_drain: Drain,
    /// Per connector (by `Hook::index`), from `GET /admin/connectors/{name}` at the end.
    queues: [QueueCounts; 2],
    /// Unclean server exit and the like.
    notes: Vec<String>,
}

/// Runs both phases on a fresh server in `dir`. The server and the receivers stop when this
/// returns, whichever way.
async fn bench(args: &Args, bin: &Path, wasm: &Path, dir: &Path) -> Result<Report> {
    // Small files: blocking std::fs calls are fine here and below.
    let dirs = ConnectorDirs::create(dir)?;
    // A private copy, so a `build-connectors` run meanwhile cannot swap in another component.
    let component = dir.join("webhook.wasm");
    std::fs::copy(wasm, &component)
        .with_context(|| format!("copying {} into {}", wasm.display(), dir.display()))?;
    let component_bytes =
        std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;

    let receivers = Receivers::start().await?;
    let dir_manifest = dirs.write_manifest(
        Hook::Dir.name(),
        &manifest(Hook::Dir, Some(&component), &receivers, 0, 0),
    )?;

    let log = dir.join("server.log");
    let database_url = format!("sqlite://{}", dir.join("bench.db").display());
    let extra = dirs.flags();
    let server = Server::start(bin, &database_url, DURABILITY, TOKEN, &extra, &log).await?;
    eprintln!("server on {} (log {})", server.addr, log.display());
    let admin = Admin::new(server.addr, TOKEN)?;
    admin.wait_loaded(Hook::Dir.name()).await?;
    let (status, body) = admin
        .put(
            Hook::Api.name(),
            manifest(Hook::Api, None, &receivers, 0, 0),
            Some(component_bytes),
        )
        .await?;
    if status != StatusCode::CREATED {
        bail!("uploading {} answered {status}: {body}", Hook::Api.name());
    }

    let api = Arc::new(Api::new(
        server.addr,
        REALM,
        TOKEN,
        args.clients,
        REQUEST_TIMEOUT,
    )?);
    let phase = Duration::from_secs(args.seconds);

    eprintln!("baseline: {} s, {} clients", args.seconds, args.clients);
    let baseline = load(
        &api,
        args.clients,
        "baseline",
        "base",
        Instant::now() + phase,
    )
    .await?;
    eprintln!("  {}", baseline.summary());
    let mut events = baseline.ops - baseline.errors;
    // The swapping phase starts from an empty queue, so both phases see the same work.
    let settle = drain(&admin, &receivers, events).await?;
    eprintln!("  {}", settle.summary());

    eprintln!(
        "swapping: {} s, {} clients, a swap every {} ms",
        args.seconds, args.clients, args.swap_every_ms
    );
    let until = Instant::now() + phase;
    let swapper = Swapper {
        admin: &admin,
        receivers: &receivers,
        dir_manifest: &dir_manifest,
        component: &component,
    };
    let (swapping, swaps) = tokio::join!(
        load(&api, args.clients, "swapping", "swap", until),
        swapper.run(Duration::from_millis(args.swap_every_ms), until),
    );
    let swapping = swapping?;
    eprintln!("  {}", swapping.summary());
    events += swapping.ops - swapping.errors;
    let final_drain = drain(&admin, &receivers, events).await?;
    eprintln!("  {}", final_drain.summary());

    let queues = [
        admin.queue_counts(Hook::Dir.name()).await?,
        admin.queue_counts(Hook::Api.name()).await?,
    ];
    let (received, duplicates, unrecognised, first) = {
        let log = receivers.log();
        (
            [log.seen[0].len(), log.seen[1].len()],
            log.duplicates,
            log.unrecognised,
            log.first.clone(),
        )
    };
    let mut notes = Vec::new();
    if let Some(note) = server.stop().await? {
        notes.push(note);
    }
    Ok(Report {
        baseline,
        swapping,
        swaps,
        first,
        events,
        received,
        duplicates,
        unrecognised,
        settle,
        final_drain,
        queues,
        notes,
    })
}

/// `clients` tasks, each mapping a parent session and destroying it again until `until`;
/// every request is timed on its own.
async fn load(
    api: &Arc<Api>,
    clients: usize,
    name: &str,
    prefix: &'static str,
    until: Instant,
) -> Result<PhaseStats> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let api = Arc::clone(api);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut stats = PhaseStats::default();
            while Instant::now() < until {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let id = parent_id(prefix, i);
                let began = Instant::now();
                let outcome = api.map_parent(&id, &idp_session_id(i), &user_id(i)).await;
                let mapped = !matches!(outcome, Outcome::Err(_));
                stats.record(began.elapsed(), outcome);
                if mapped {
                    let began = Instant::now();
                    let outcome = api.destroy_parent(&id, 1).await;
                    stats.record(began.elapsed(), outcome);
                }
            }
            stats
        });
    }
    let mut stats = PhaseStats::named(name);
    while let Some(joined) = tasks.join_next().await {
        let worker = joined.with_context(|| format!("a {name} client task failed"))?;
        stats.absorb(&worker);
    }
    // A timed phase has no planned count; this keeps `capped()` from calling it cut short.
    stats.planned = stats.ops;
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// One swap: which connector was pointed where, and how it went.
struct Swap {
    hook: Hook,
    seq: u32,
    /// Receiver index the new version posts to.
    target: usize,
    outcome: Result<SwapTiming, String>,
}

struct SwapTiming {
    /// The PUT was sent / the manifest was renamed into place.
    started: Instant,
    /// From `started` until the new version was serving.
    serving: Duration,
}

/// Re-points the connectors at the other receiver, one swap at a time.
struct Swapper<'a> {
    admin: &'a Admin,
    receivers: &'a Receivers,
    dir_manifest: &'a Path,
    component: &'a Path,
}

impl Swapper<'_> {
    /// Swaps every `every` until `until`, alternating directory and API. A swap waits until
    /// its version serves, so a slow one delays the next rather than overlapping it.
    async fn run(&self, every: Duration, until: Instant) -> Vec<Swap> {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Both start on receiver A (version 0).
        let mut target = [0usize; 2];
        let mut swaps = Vec::new();
        let mut seq = 0u32;
        loop {
            ticker.tick().await;
            if Instant::now() >= until {
                return swaps;
            }
            seq += 1;
            let hook = if seq % 2 == 1 { Hook::Dir } else { Hook::Api };
            let to = 1 - target[hook.index()];
            let outcome = match hook {
                Hook::Dir => self.swap_dir(to, seq).await,
                Hook::Api => self.swap_api(to, seq).await,
            };
            // Even a failed directory swap may still apply later; the run fails either way.
            target[hook.index()] = to;
            swaps.push(Swap {
                hook,
                seq,
                target: to,
                outcome: outcome.map_err(|e| format!("{e:#}")),
            });
        }
    }

    /// Writes the new manifest beside the old one and renames it into place (the watcher
    /// never sees a half-written file), then polls until the new version serves.
    async fn swap_dir(&self, to: usize, seq: u32) -> Result<SwapTiming> {
        let name = Hook::Dir.name();
        let before = self
            .admin
            .version(name)
            .await?
            .with_context(|| format!("{name} is not loaded"))?;
        let text = manifest(Hook::Dir, Some(self.component), self.receivers, to, seq);
        // `.toml.tmp`: the watcher only reads `*.toml`.
        let tmp = self.dir_manifest.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        let started = Instant::now();
        std::fs::rename(&tmp, self.dir_manifest)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        loop {
            match self.admin.version(name).await? {
                Some(v) if v != before => {
                    return Ok(SwapTiming {
                        started,
                        serving: started.elapsed(),
                    });
                }
                _ if started.elapsed() >= SWAP_TIMEOUT => {
                    bail!("{name} version {seq} was not serving within {SWAP_TIMEOUT:?}")
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// A manifest-only PUT (the stored component is kept); it answers once the new version
    /// serves.
    async fn swap_api(&self, to: usize, seq: u32) -> Result<SwapTiming> {
        let name = Hook::Api.name();
        let text = manifest(Hook::Api, None, self.receivers, to, seq);
        let started = Instant::now();
        let (status, body) = self.admin.put(name, text, None).await?;
        let serving = started.elapsed();
        let outcome = body.get("outcome").and_then(Value::as_str);
        if outcome != Some("replaced") {
            bail!(
                "PUT {name} version {seq} answered {status} with outcome {outcome:?}, expected \"replaced\""
            );
        }
        Ok(SwapTiming { started, serving })
    }
}

/// The manifest of `hook` posting to receiver `to`, tagged with version `seq`. Both receivers
/// are always allowed, so a swap changes only the URL. `component` is left out of uploads.
fn manifest(
    hook: Hook,
    component: Option<&Path>,
    receivers: &Receivers,
    to: usize,
    seq: u32,
) -> String {
    testkit::manifest::Webhook {
        name: hook.name(),
        component,
        realms: &["*"],
        events: &["login", "logout", "revoke"],
        allowed_hosts: &[&receivers.origin(0), &receivers.origin(1)],
        timeout_ms: 2000,
        url: &format!("{}/{}?v={seq}", receivers.origin(to), hook.name()),
        config: &[("secret", SECRET)],
    }
    .to_toml()
}

/// How the wait for the deliveries ended.
struct Drain {
    /// Nothing pending and every event arrived at both connectors' receivers.
    complete: bool,
    /// `GET /admin/deliveries?status=pending&limit=1` listed something at the end.
    pending: bool,
    /// Same for `status=dead`.
    dead: bool,
    took: Duration,
    /// Unique events that arrived during the wait (both connectors); with the load stopped,
    /// this over `took` is what the dispatcher alone manages.
    delivered: usize,
}

impl Drain {
    fn summary(&self) -> String {
        let secs = self.took.as_secs_f64();
        format!(
            "deliveries {} after {secs:.1} s ({} delivered meanwhile, {:.0}/s){}{}",
            if self.complete {
                "drained"
            } else {
                "NOT drained"
            },
            self.delivered,
            if secs > 0.0 {
                self.delivered as f64 / secs
            } else {
                0.0
            },
            if self.pending { ", some pending" } else { "" },
            if self.dead { ", some dead" } else { "" },
        )
    }
}

/// Waits (bounded) until nothing is pending and each connector's receivers hold at least
/// `events` unique events. The count matters as much as the queue: events not yet fanned out
/// to deliveries are not pending yet.
async fn drain(admin: &Admin, receivers: &Receivers, events: usize) -> Result<Drain> {
    let start = Instant::now();
    let unique = || {
        receivers
            .log()
            .seen
            .iter()
            .map(HashSet::len)
            .collect::<Vec<_>>()
    };
    let before: usize = unique().iter().sum();
    loop {
        let pending = admin.any_delivery("pending").await?;
        let now = unique();
        let arrived = now.iter().all(|&n| n >= events);
        let timed_out = start.elapsed() >= DRAIN_TIMEOUT;
        if (!pending && arrived) || timed_out {
            return Ok(Drain {
                complete: !pending && arrived,
                pending,
                dead: admin.any_delivery("dead").await?,
                took: start.elapsed(),
                delivered: now.iter().sum::<usize>() - before,
            });
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// What the receivers saw, shared by both.
#[derive(Default)]
struct DeliveryLog {
    /// Unique event ids per connector (by `Hook::index`).
    seen: [HashSet<String>; 2],
    /// Repeats of an event already seen (allowed: delivery is at least once).
    duplicates: usize,
    /// Requests no connector version accounts for (unknown path or version, no event id).
    unrecognised: usize,
    /// First arrival of each (connector, version, receiver).
    first: HashMap<(Hook, u32, usize), Instant>,
}

/// Two HTTP servers on 127.0.0.1 (receiver 0 = A, 1 = B) that answer 200 to every request
/// and log each webhook. They stop when this is dropped.
struct Receivers {
    servers: [Loopback; 2],
    log: Arc<Mutex<DeliveryLog>>,
}

#[derive(Clone)]
struct ReceiverState {
    receiver: usize,
    log: Arc<Mutex<DeliveryLog>>,
}

impl Receivers {
    async fn start() -> Result<Receivers> {
        let log = Arc::new(Mutex::new(DeliveryLog::default()));
        let mut servers = Vec::new();
        for receiver in 0..2 {
            let app = axum::Router::new()
                .fallback(receive)
                .with_state(ReceiverState {
                    receiver,
                    log: Arc::clone(&log),
                });
            servers.push(Loopback::bind(app).await.context("a receiver")?);
        }
        let servers: [Loopback; 2] = servers
            .try_into()
            .map_err(|_| anyhow!("expected two receivers"))?;
        Ok(Receivers { servers, log })
    }

    /// `http://127.0.0.1:PORT` of receiver `i` (0 or 1).
    fn origin(&self, i: usize) -> String {
        self.servers[i].origin()
    }

    fn log(&self) -> MutexGuard<'_, DeliveryLog> {
        lock(&self.log)
    }
}

/// Logs one webhook. Taking the body reads it whole, so the connection can be reused.
async fn receive(
    State(state): State<ReceiverState>,
    uri: Uri,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let hook = Hook::from_path(uri.path());
    let seq = uri
        .query()
        .and_then(|q| q.strip_prefix("v="))
        .and_then(|v| v.parse::<u32>().ok());
    let event_id = headers.get("webhook-id").and_then(|v| v.to_str().ok());
    let mut log = lock(&state.log);
    match (hook, seq, event_id) {
        (Some(hook), Some(seq), Some(id)) => {
            if !log.seen[hook.index()].insert(id.to_owned()) {
                log.duplicates += 1;
            }
            log.first.entry((hook, seq, state.receiver)).or_insert(at);
        }
        _ => log.unrecognised += 1,
    }
    StatusCode::OK
}

impl Report {
    /// Why the run failed; empty when it passed.
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let errors = self.baseline.errors + self.swapping.errors;
        if errors > 0 {
            out.push(format!("{errors} requests failed"));
        }
        let failed_swaps = self.swaps.iter().filter(|s| s.outcome.is_err()).count();
        if failed_swaps > 0 {
            out.push(format!("{failed_swaps} swaps failed"));
        }
        if self.lost() > 0 {
            out.push(format!("{} events lost", self.lost()));
        }
        let queue = QueueCounts::sum(&self.queues);
        if self.final_drain.pending || queue.pending > 0 {
            out.push(format!(
                "{} deliveries still pending after {:.0} s",
                queue.pending,
                DRAIN_TIMEOUT.as_secs_f64()
            ));
        }
        if self.final_drain.dead || queue.dead > 0 {
            out.push(format!("{} deliveries dead", queue.dead));
        }
        if queue.dropped > 0 {
            out.push(format!("{} deliveries dropped", queue.dropped));
        }
        out
    }

    /// Events a connector neither received nor still holds (pending, dead or dropped),
    /// summed over both. Exact once drained; before that, events not yet fanned out to
    /// deliveries count here too.
    fn lost(&self) -> usize {
        Hook::ALL
            .into_iter()
            .map(|h| {
                let i = h.index();
                self.events
                    .saturating_sub(self.received[i] + self.queues[i].all())
            })
            .sum()
    }

    fn print(&self, args: &Args, command_line: &str, revision: &str) {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!();
        println!("== Connector hot-swap benchmark");
        println!("command:     {command_line}");
        println!("revision:    {revision}");
        println!(
            "settings:    seconds={} clients={} swap-every-ms={} durability={DURABILITY}; {cores} cores shared by clients, server and receivers",
            args.seconds, args.clients, args.swap_every_ms
        );

        println!();
        println!(
            "{:<10} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8}",
            "phase", "requests", "errors", "req/s", "p50 ms", "p99 ms", "max ms"
        );
        for p in [&self.baseline, &self.swapping] {
            println!(
                "{:<10} {:>9} {:>7} {:>8.0} {:>8.2} {:>8.2} {:>8.2}",
                p.name,
                p.ops,
                p.errors,
                p.ops_per_sec(),
                p.percentile_ms(50.0),
                p.percentile_ms(99.0),
                p.percentile_ms(100.0),
            );
        }
        let base_p99 = self.baseline.percentile_ms(99.0);
        if base_p99 > 0.0 {
            println!(
                "p99 ratio swapping/baseline: {:.2}",
                self.swapping.percentile_ms(99.0) / base_p99
            );
        }
        for p in [&self.baseline, &self.swapping] {
            if let Some(e) = &p.first_error {
                println!("first {} error: {e}", p.name);
            }
            if let Some(w) = &p.first_warning {
                println!("{} {} warnings, first: {w}", p.warnings, p.name);
            }
        }

        println!();
        println!(
            "{:<19} {:>5} {:>6}   {:>25}   {:>25}",
            "swap", "count", "failed", "to serving ms: med p99 max", "to 1st delivery: med max"
        );
        for (hook, label) in [
            (Hook::Api, "PUT hook-api"),
            (Hook::Dir, "directory hook-dir"),
        ] {
            let mine: Vec<&Swap> = self.swaps.iter().filter(|s| s.hook == hook).collect();
            let mut serving = Vec::new();
            let mut delivery = Vec::new();
            let mut undelivered = 0;
            for s in &mine {
                let Ok(t) = &s.outcome else { continue };
                serving.push(t.serving);
                match self.first.get(&(hook, s.seq, s.target)) {
                    Some(at) => delivery.push(at.saturating_duration_since(t.started)),
                    None => undelivered += 1,
                }
            }
            serving.sort_unstable();
            delivery.sort_unstable();
            let failed = mine.len() - serving.len();
            println!(
                "{:<19} {:>5} {:>6}   {:>9} {:>7} {:>7}   {:>17} {:>7}{}",
                label,
                mine.len(),
                failed,
                ms(percentile_ms(&serving, 50.0)),
                ms(percentile_ms(&serving, 99.0)),
                ms(percentile_ms(&serving, 100.0)),
                ms(percentile_ms(&delivery, 50.0)),
                ms(percentile_ms(&delivery, 100.0)),
                if undelivered > 0 {
                    format!("  ({undelivered} versions delivered nothing)")
                } else {
                    String::new()
                },
            );
        }
        println!(
            "  to serving: PUT sent → its response; rename → GET /admin/connectors/hook-dir shows the new version (polled every {} ms)",
            POLL.as_millis()
        );
        println!(
            "  to 1st delivery: same start → first webhook of the new version at its receiver"
        );
        for s in &self.swaps {
            if let Err(e) = &s.outcome {
                println!("  swap {} ({}) failed: {e}", s.seq, s.hook.name());
            }
        }

        println!();
        println!(
            "deliveries:  {} events per connector; received hook-dir {}, hook-api {} (unique; {} repeats, {} unrecognised requests)",
            self.events,
            self.received[Hook::Dir.index()],
            self.received[Hook::Api.index()],
            self.duplicates,
            self.unrecognised,
        );
        let queue = QueueCounts::sum(&self.queues);
        println!(
            "             lost {}, pending {}, dead {}, dropped {}",
            self.lost(),
            queue.pending,
            queue.dead,
            queue.dropped,
        );
        println!("between:     {}", self.settle.summary());
        println!("at the end:  {}", self.final_drain.summary());
        crate::verdict::print_verdict(&self.notes, &self.failures());
    }
}
