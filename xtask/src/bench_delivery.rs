//! `cargo xtask bench-delivery`: how far event delivery trails the API. A release build of
//! `lockstep serve` takes `map-fixed` at its top rate for `--seconds` while webhook connectors
//! (the bundled `webhook.wasm`) post every event to a receiver on 127.0.0.1, which notes for
//! each one its arrival time beside the event's `occurredAt`. Per backend (SQLite in a temp
//! dir; PostgreSQL too with `--postgres-url`, one fresh database per scenario):
//!
//! 1. `api`: the same load with no connector at all, the ceiling of the API rate;
//! 2. `fast`: `--connectors` webhooks to a receiver that answers 200 at once;
//! 3. `slow`: the same plus one webhook whose receiver path answers after `--slow-ms`, to
//!    show whether a slow legacy system holds the others back;
//! 4. `noop`: `--noop-connectors` no-op connectors, disabled during the load so their
//!    deliveries pile up, then enabled: the dispatcher's own rate with no HTTP in the way.
//!
//! Before the scenarios the receiver's own rate with a keep-alive client is measured (the
//! ceiling of deliveries/s); after them `cargo bench -p lockstep --bench hooks` runs and its
//! output is passed through. The summary sets each figure beside its ceiling and the targets.
//!
//! Clocks: `occurredAt` and the arrival times are both read from the system clock of this
//! machine. `occurredAt` is truncated to the millisecond, so a lag reads up to 1 ms long.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde::Deserialize;
use serde_json::{Value, json};
use testkit::Loopback;
use testkit::manifest::toml_str;
use tokio::task::JoinSet;

use crate::bench_api::cpu::{CpuUse, Meter, us_per_op};
use crate::bench_api::db::{self, Target};
use crate::bench_api::load::{Api, Outcome, PhaseStats, run_phase};
use crate::bench_api::report::thousands;
use crate::bench_api::server::Server;
use crate::bench_api::{self, Durability, user_id};
use crate::harness::Admin;
use crate::harness::{self, lock};

const TOKEN: &str = "bench-delivery-token";
const REALM: &str = "bench";
/// Per-request timeout of the load; a slower request counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the drain is checked.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How often the no-op scenario asks the server how far it got: each ask counts every
/// connector's pending deliveries (an index scan of the backlog per connector), and at 50 ms
/// those counts took a fifth of the server's CPU away from the drain they measure.
const NOOP_POLL: Duration = Duration::from_millis(250);
/// The share "delivered within the load window" allows this much after the load stopped.
const GRACE: Duration = Duration::from_secs(1);
/// Length of the receiver's ceiling run.
const RECEIVER_CEILING: Duration = Duration::from_secs(3);
/// Sequential keep-alive POSTs timed for the loopback baseline (without the hooks bench).
const BASELINE_POSTS: usize = 5_000;
/// Missing events listed by id in the report, per connector.
const MISSING_SHOWN: usize = 5;

/// Targets, on two cores with everything on the same machine.
const TARGET_WITHIN: f64 = 90.0;
const TARGET_LAG_P99: Duration = Duration::from_secs(1);
const TARGET_NOOP_RATE: f64 = 30_000.0;
const TARGET_HOOK_US: f64 = 20.0;
const TARGET_POOLED_US: f64 = 100.0;

/// Options of `cargo xtask bench-delivery`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// PostgreSQL server to benchmark as well; a fresh database is created on it for each
    /// scenario and dropped afterwards. Without it only SQLite is measured.
    #[arg(long, env = "LOCKSTEP_TEST_DATABASE_URL")]
    postgres_url: Option<String>,
    /// Webhook connectors that answer at once (each posts to its own receiver path).
    #[arg(long, default_value_t = 2)]
    connectors: usize,
    /// Length of the load in each scenario, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent client tasks posting map-fixed, each on its own keep-alive connection.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Longest wait for the deliveries after the load stopped, in seconds.
    #[arg(long, default_value_t = 120)]
    drain_seconds: u64,
    /// How long the slow connector's receiver path takes to answer (200), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    slow_ms: u64,
    /// No-op connectors of the dispatcher-rate scenario (0 skips it).
    #[arg(long, default_value_t = 4)]
    noop_connectors: usize,
    /// Commit durability given to the server (`--durability`): `normal` is its default.
    #[arg(long, value_enum, default_value_t = Durability::Normal)]
    durability: Durability,
    /// Skip the hook-call micro-benchmark (`cargo bench -p lockstep --bench hooks`).
    #[arg(long)]
    skip_hooks: bool,
    /// Skip SQLite (benchmark PostgreSQL only).
    #[arg(long)]
    skip_sqlite: bool,
    /// Server binary to run instead of building `target/release/lockstep` first.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Keep the temp directories and the PostgreSQL databases (their names are printed).
    #[arg(long)]
    keep: bool,
}

/// Entry point: the scenarios on a Tokio runtime (Ctrl-C stops the servers and drops the
/// scratch databases), then the hooks bench, then the summary.
pub fn main(args: Args) -> Result<ExitCode> {
    if args.connectors == 0 || args.seconds == 0 || args.concurrency == 0 {
        bail!("--connectors, --seconds and --concurrency must be positive");
    }
    if args.skip_sqlite && args.postgres_url.is_none() {
        bail!("nothing to benchmark: --skip-sqlite without --postgres-url");
    }
    let root = crate::workspace_root()?;
    let webhook = bench_api::webhook_component(&root)?;
    let noop = component(&root, "hostile")?;
    let command_line = bench_api::command_line();
    let bin = bench_api::server_bin(args.server_bin.as_deref())?;
    let (receiver, backends) = bench_api::block_on(async {
        let pg_prefix = harness::scratch_db_name("lockstep_delivery");
        let created = Arc::new(Mutex::new(Vec::new()));
        let components = Components {
            webhook: &webhook,
            noop: &noop,
        };
        let scenarios = run(&args, &bin, components, &pg_prefix, &created);
        let outcome = bench_api::until_interrupted(scenarios).await;
        // Dropping `run` killed the servers; the scratch databases need an explicit drop.
        if let (Some(url), false) = (&args.postgres_url, args.keep) {
            let names = lock(&created).clone();
            harness::drop_scratch_databases(url, &names).await;
        }
        outcome
    })?;
    let hooks = if args.skip_hooks {
        None
    } else {
        Some(hooks_bench(&root))
    };
    print(
        &args,
        &command_line,
        &bench_api::revision(),
        &receiver,
        &backends,
        hooks.as_ref(),
    );
    let failed = backends.iter().any(|b| b.failure.is_some())
        || hooks.as_ref().is_some_and(|h| h.error.is_some());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// A built connector component, with the hint to build it when it is missing.
fn component(root: &Path, name: &str) -> Result<PathBuf> {
    let wasm = crate::target_dir(root).join(format!("wasm32-wasip2/connector/{name}.wasm"));
    if !wasm.is_file() {
        bail!(
            "{} is missing; build it with `cargo xtask build-connectors`",
            wasm.display()
        );
    }
    Ok(wasm)
}

#[derive(Clone, Copy)]
struct Components<'a> {
    webhook: &'a Path,
    noop: &'a Path,
}

async fn run(
    args: &Args,
    bin: &Path,
    components: Components<'_>,
    pg_prefix: &str,
    created: &Arc<Mutex<Vec<String>>>,
) -> Result<(ReceiverCeiling, Vec<BackendReport>)> {
    // The receiver's ceiling first, while nothing else of this run uses the cores.
    let receiver = receiver_ceiling(args).await?;
    eprintln!("receiver ceiling: {}", receiver.summary());
    let mut backends = Vec::new();
    if !args.skip_sqlite {
        let dir = harness::temp_dir("lockstep-bench-delivery-")?;
        let store = Store::Sqlite {
            dir: dir.path().to_owned(),
        };
        backends.push(backend(args, bin, components, &store, dir.path()).await);
        if args.keep {
            eprintln!("kept {}", dir.keep().display());
        }
    }
    if let Some(admin_url) = &args.postgres_url {
        let dir = harness::temp_dir("lockstep-bench-delivery-pg-")?;
        let store = Store::Postgres {
            admin_url: admin_url.clone(),
            prefix: pg_prefix.to_owned(),
            created: Arc::clone(created),
        };
        backends.push(backend(args, bin, components, &store, dir.path()).await);
        if args.keep {
            eprintln!(
                "kept {} and databases {}",
                dir.keep().display(),
                lock(created).join(", ")
            );
        }
    }
    Ok((receiver, backends))
}

/// Where each scenario's fresh database comes from.
enum Store {
    Sqlite {
        dir: PathBuf,
    },
    Postgres {
        admin_url: String,
        prefix: String,
        /// Every database created, so that they can be dropped even after Ctrl-C.
        created: Arc<Mutex<Vec<String>>>,
    },
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Store::Sqlite { .. } => "sqlite",
            Store::Postgres { .. } => "postgres",
        }
    }

    async fn fresh(&self, scenario: &str) -> Result<Target> {
        match self {
            Store::Sqlite { dir } => Ok(Target::Sqlite {
                path: dir.join(format!("{scenario}.db")),
            }),
            Store::Postgres {
                admin_url,
                prefix,
                created,
            } => {
                let name = format!("{prefix}_{scenario}");
                let url = db::create_pg_database(admin_url, &name).await?;
                lock(created).push(name);
                Ok(Target::Postgres { url })
            }
        }
    }
}

/// Everything measured on one backend.
struct BackendReport {
    backend: &'static str,
    api: Option<ApiOnly>,
    fast: Option<Scenario>,
    slow: Option<Scenario>,
    noop: Option<Noop>,
    /// Set when the run on this backend was aborted; the figures so far are kept.
    failure: Option<String>,
}

async fn backend(
    args: &Args,
    bin: &Path,
    components: Components<'_>,
    store: &Store,
    dir: &Path,
) -> BackendReport {
    let mut report = BackendReport {
        backend: store.name(),
        api: None,
        fast: None,
        slow: None,
        noop: None,
        failure: None,
    };
    report.failure = harness::run_backend(
        store.name(),
        dir,
        backend_inner(args, bin, components, store, dir, &mut report),
    )
    .await;
    report
}

async fn backend_inner(
    args: &Args,
    bin: &Path,
    components: Components<'_>,
    store: &Store,
    dir: &Path,
    report: &mut BackendReport,
) -> Result<()> {
    let name = store.name();
    // One compile cache for the run: the component is compiled once, not per scenario.
    let cache = dir.join("compile-cache");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let env = Env {
        args,
        bin,
        components,
        dir,
        cache: &cache,
        backend: name,
    };

    let api = api_only(&env, store.fresh("api").await?).await?;
    eprintln!("  [{name}] api: {}", api.load.summary());
    report.api = Some(api);

    let fast = scenario(&env, store.fresh("fast").await?, false).await?;
    eprintln!("  [{name}] fast scenario: {}", fast.summary());
    report.fast = Some(fast);

    let slow = scenario(&env, store.fresh("slow").await?, true).await?;
    eprintln!("  [{name}] slow scenario: {}", slow.summary());
    report.slow = Some(slow);

    if args.noop_connectors > 0 {
        let noop = noop(&env, store.fresh("noop").await?).await?;
        eprintln!("  [{name}] noop: {}", noop.summary());
        report.noop = Some(noop);
    }
    Ok(())
}

/// What every scenario of one backend shares.
struct Env<'a> {
    args: &'a Args,
    bin: &'a Path,
    components: Components<'a>,
    dir: &'a Path,
    cache: &'a Path,
    backend: &'static str,
}

impl Env<'_> {
    /// Writes `manifests` (name, text) into a fresh connectors directory, starts the server
    /// on `target` with it, and waits until every connector is loaded.
    async fn start(
        &self,
        target: &Target,
        scenario: &str,
        manifests: &[(String, String)],
    ) -> Result<(Server, Admin, Meter)> {
        let connectors = self.dir.join(format!("{scenario}-connectors"));
        std::fs::create_dir_all(&connectors)
            .with_context(|| format!("creating {}", connectors.display()))?;
        for (name, text) in manifests {
            let path = connectors.join(format!("{name}.toml"));
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let log = self.dir.join(format!("{scenario}-server.log"));
        let extra: [&OsStr; 4] = [
            "--connectors-dir".as_ref(),
            connectors.as_os_str(),
            "--compile-cache".as_ref(),
            self.cache.as_os_str(),
        ];
        let server = Server::start(
            self.bin,
            &target.server_url(),
            self.args.durability.as_str(),
            TOKEN,
            &extra,
            &log,
        )
        .await?;
        eprintln!(
            "  [{}] {scenario}: server pid {} on {} (log {})",
            self.backend,
            server.pid().unwrap_or(0),
            server.addr,
            log.display()
        );
        let admin = Admin::new(server.addr, TOKEN)?;
        for (name, _) in manifests {
            admin.wait_loaded(name).await?;
        }
        let postmaster = match target {
            Target::Postgres { url } => db::postmaster_pid(url).await,
            Target::Sqlite { .. } => None,
        };
        let meter = Meter::new(server.pid(), postmaster);
        Ok((server, admin, meter))
    }
}

// ---------------------------------------------------------------------------------------
// The load

/// A timed map-fixed load and which of its requests failed.
struct Load {
    stats: PhaseStats,
    /// Indices of failed requests; every other index in `0..stats.ops` was mapped.
    failed: HashSet<usize>,
    /// System-clock microseconds when the load started and stopped.
    started_us: i64,
    ended_us: i64,
}

impl Load {
    /// Events owed to each connector: one `login` per map answered 201.
    fn events(&self) -> usize {
        self.stats.ops - self.failed.len()
    }

    fn mapped(&self, i: usize) -> bool {
        i < self.stats.ops && !self.failed.contains(&i)
    }
}

fn external_id(scenario: &str, i: usize) -> String {
    format!("{scenario}-{i:09}")
}

/// The request index behind an external id of [`external_id`].
fn index_of(external_id: &str) -> Option<usize> {
    external_id.rsplit_once('-')?.1.parse().ok()
}

/// Posts map-fixed with unique ids from `--concurrency` tasks for `--seconds`.
async fn load(env: &Env<'_>, server: &Server, scenario: &'static str) -> Result<Load> {
    let args = env.args;
    let api = Arc::new(Api::new(
        server.addr,
        REALM,
        TOKEN,
        args.concurrency,
        REQUEST_TIMEOUT,
    )?);
    let failed = Arc::new(Mutex::new(HashSet::new()));
    let f = Arc::clone(&failed);
    let started_us = now_us();
    let mut stats = run_phase(
        "map-fixed",
        usize::MAX,
        args.concurrency,
        Duration::from_secs(args.seconds),
        move |i| {
            let api = Arc::clone(&api);
            let failed = Arc::clone(&f);
            async move {
                let body = json!({ "externalId": external_id(scenario, i), "userId": user_id(i) });
                let outcome = match api.status_of("/map-fixed", Some(&body)).await {
                    Ok(StatusCode::CREATED) => Outcome::Ok,
                    Ok(status) => Outcome::Err(format!("map-fixed: HTTP {status}")),
                    Err(e) => Outcome::Err(format!("map-fixed: {e}")),
                };
                if matches!(outcome, Outcome::Err(_)) {
                    lock(&failed).insert(i);
                }
                outcome
            }
        },
    )
    .await?;
    let ended_us = now_us();
    // A timed phase has no planned count; this keeps `capped()` from calling it cut short.
    stats.planned = stats.ops;
    let failed = std::mem::take(&mut *lock(&failed));
    Ok(Load {
        stats,
        failed,
        started_us,
        ended_us,
    })
}

/// The system clock in microseconds since the epoch: the clock `occurredAt` is read from.
fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

// ---------------------------------------------------------------------------------------
// Scenario 1: the API alone

struct ApiOnly {
    load: PhaseStats,
    cpu: CpuUse,
}

async fn api_only(env: &Env<'_>, target: Target) -> Result<ApiOnly> {
    let (server, _admin, meter) = env.start(&target, "api", &[]).await?;
    let before = meter.sample();
    let load = load(env, &server, "api").await?;
    let cpu = meter.since(&before);
    server.kill().await?;
    Ok(ApiOnly {
        load: load.stats,
        cpu,
    })
}

// ---------------------------------------------------------------------------------------
// Scenarios 2 and 3: webhooks to the receiver

/// One scenario with webhook connectors: the load, then the wait for the fast connectors'
/// deliveries.
struct Scenario {
    load: PhaseStats,
    /// Events owed to each connector.
    events: usize,
    /// The connectors that answer at once, together.
    fast: Group,
    /// The one answering after `--slow-ms`, in the slow scenario.
    slow: Option<Group>,
    /// CPU from the load's start until the wait ended.
    cpu: CpuUse,
    /// Whether every fast connector got every event before the wait's bound.
    drained: bool,
    /// How long the wait after the load took (at most `--drain-seconds`).
    waited: Duration,
    /// Arrivals whose event no answered map accounts for (a timed-out request that did
    /// commit, or a path no connector posts to).
    unexpected: usize,
}

impl Scenario {
    fn summary(&self) -> String {
        let mut line = format!("fast: {}", self.fast.summary());
        if let Some(slow) = &self.slow {
            line.push_str(&format!("\n      slow: {}", slow.summary()));
        }
        line.push_str(&format!(
            "\n      {} after {:.1} s",
            if self.drained {
                "drained"
            } else {
                "NOT drained"
            },
            self.waited.as_secs_f64()
        ));
        line
    }
}

/// Delivery figures of one or more connectors taken together.
#[derive(Default)]
struct Group {
    connectors: usize,
    /// Events × connectors.
    owed: usize,
    /// Distinct owed (event, connector) pairs that arrived.
    delivered: usize,
    /// ... of them, first arrived by the end of the load + [`GRACE`].
    within: usize,
    /// Arrivals of a (event, connector) pair already seen.
    duplicates: usize,
    /// (connector, external id) of owed deliveries that never arrived (the first few).
    missing_ids: Vec<String>,
    missing: usize,
    /// `occurredAt` → first arrival of each delivered pair, in microseconds, sorted.
    lags_us: Vec<i64>,
    /// System-clock microseconds of the last first arrival.
    last_us: Option<i64>,
    /// Load start and end, for the rates.
    started_us: i64,
    ended_us: i64,
}

impl Group {
    fn share_within(&self) -> Option<f64> {
        (self.owed > 0).then(|| self.within as f64 * 100.0 / self.owed as f64)
    }

    /// Nearest-rank percentile of the lags, counting a delivery that never arrived as
    /// later than every one that did (leaving it out would flatter a run that fell behind).
    fn lag(&self, q: f64) -> Option<Lag> {
        let n = self.lags_us.len() + self.missing;
        if n == 0 {
            return None;
        }
        let rank = ((q / 100.0) * n as f64).ceil() as usize;
        Some(match self.lags_us.get(rank.clamp(1, n) - 1) {
            Some(&us) => Lag::At(Duration::from_micros(u64::try_from(us).unwrap_or(0))),
            None => Lag::NotArrived,
        })
    }

    fn max_lag(&self) -> Option<Lag> {
        self.lag(100.0)
    }

    /// The same over the deliveries that did arrive: what a run that fell behind still says.
    fn arrived_lag(&self, q: f64) -> Option<Duration> {
        let n = self.lags_us.len();
        let rank = ((q / 100.0) * n as f64).ceil() as usize;
        let us = *self.lags_us.get(rank.clamp(1, n.max(1)) - 1)?;
        Some(Duration::from_micros(u64::try_from(us).unwrap_or(0)))
    }

    /// From the end of the load to the last delivery, when everything arrived.
    fn drain(&self) -> Option<Duration> {
        if self.delivered < self.owed {
            return None;
        }
        let us = (self.last_us? - self.ended_us).max(0);
        Some(Duration::from_micros(u64::try_from(us).unwrap_or(0)))
    }

    /// Deliveries per second from the start of the load to the last delivery.
    fn rate(&self) -> Option<f64> {
        let secs = (self.last_us? - self.started_us) as f64 / 1e6;
        (secs > 0.0).then(|| self.delivered as f64 / secs)
    }

    fn summary(&self) -> String {
        format!(
            "{} connector(s): {} of {} delivered, {} within the load + {} s, lag p50 {} p99 {} max {}, drain {}, {} deliveries/s, {} duplicates, {} missing",
            self.connectors,
            self.delivered,
            self.owed,
            opt(self.share_within(), pct),
            GRACE.as_secs(),
            opt(self.lag(50.0), lag_str),
            opt(self.lag(99.0), lag_str),
            opt(self.max_lag(), lag_str),
            opt(self.drain(), dur),
            opt(self.rate(), thousands),
            self.duplicates,
            self.missing,
        )
    }
}

/// A percentile of the lag.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lag {
    At(Duration),
    /// The percentile falls among deliveries that had not arrived when the wait ended.
    NotArrived,
}

impl Lag {
    fn within(self, bound: Duration) -> bool {
        matches!(self, Lag::At(d) if d <= bound)
    }
}

fn lag_str(l: Lag) -> String {
    match l {
        Lag::At(d) => dur(d),
        Lag::NotArrived => "not arrived".to_owned(),
    }
}

/// The manifest of a webhook connector `name` posting every login and logout to `url`.
fn webhook_manifest(name: &str, component: &Path, origin: &str, url: &str, slow: bool) -> String {
    // The hook's deadline must outlast the slow receiver's answer; the fast ones keep the
    // usual bound.
    let timeout_ms: u64 = if slow { 30_000 } else { 2_000 };
    testkit::manifest::Webhook {
        name,
        component: Some(component),
        realms: &[REALM],
        events: &["login", "logout"],
        allowed_hosts: &[origin],
        timeout_ms,
        url,
        config: &[("timeout_ms", &timeout_ms.to_string())],
    }
    .to_toml()
}

async fn scenario(env: &Env<'_>, target: Target, with_slow: bool) -> Result<Scenario> {
    let args = env.args;
    let name: &'static str = if with_slow { "slow" } else { "fast" };
    let total = args.connectors + usize::from(with_slow);
    let slow_index = with_slow.then_some(args.connectors);
    let receiver = Receiver::start(total, slow_index, Duration::from_millis(args.slow_ms)).await?;
    let manifests: Vec<(String, String)> = (0..total)
        .map(|c| {
            let hook = if Some(c) == slow_index {
                format!("slow{c}")
            } else {
                format!("hook{c}")
            };
            let text = webhook_manifest(
                &hook,
                env.components.webhook,
                &receiver.server.origin(),
                &receiver.url(c),
                Some(c) == slow_index,
            );
            (hook, text)
        })
        .collect();
    let (server, _admin, meter) = env.start(&target, name, &manifests).await?;
    let before = meter.sample();
    let load = load(env, &server, name).await?;
    eprintln!("  [{}] {name}: {}", env.backend, load.stats.summary());

    // Waits for the fast connectors only: the slow one cannot finish in any useful time.
    let events = load.events();
    let fast: Vec<usize> = (0..args.connectors).collect();
    let bound = Duration::from_secs(args.drain_seconds);
    let wait = Instant::now();
    let drained = loop {
        let done = {
            let log = lock(&receiver.log);
            fast.iter().all(|&c| log.unique[c] >= events)
        };
        if done {
            break true;
        }
        if wait.elapsed() >= bound {
            break false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    let waited = wait.elapsed();
    let cpu = meter.since(&before);
    server.kill().await?;

    let log = std::mem::take(&mut *lock(&receiver.log));
    let fast_group = group(&log, &fast, &load);
    let slow = slow_index.map(|c| group(&log, &[c], &load));
    let unexpected = log.unexpected(&load);
    Ok(Scenario {
        load: load.stats,
        events,
        fast: fast_group,
        slow,
        cpu,
        drained,
        waited,
        unexpected,
    })
}

/// The figures of `connectors` from the receiver's log.
fn group(log: &ReceiverLog, connectors: &[usize], load: &Load) -> Group {
    let deadline = load.ended_us + i64::try_from(GRACE.as_micros()).unwrap_or(i64::MAX);
    let mut g = Group {
        connectors: connectors.len(),
        owed: load.events() * connectors.len(),
        started_us: load.started_us,
        ended_us: load.ended_us,
        ..Group::default()
    };
    for &c in connectors {
        // First arrival per request index; arrivals are logged in arrival order.
        let mut first: Vec<Option<&Arrival>> = vec![None; load.stats.ops];
        for a in &log.arrivals[c] {
            let Some(i) = a.index.filter(|&i| load.mapped(i)) else {
                continue;
            };
            if first[i].is_some() {
                g.duplicates += 1;
            } else {
                first[i] = Some(a);
            }
        }
        for (i, slot) in first.iter().enumerate() {
            if !load.mapped(i) {
                continue;
            }
            match slot {
                Some(a) => {
                    g.delivered += 1;
                    if a.at_us <= deadline {
                        g.within += 1;
                    }
                    if let Some(occurred) = a.occurred_us {
                        g.lags_us.push(a.at_us - occurred);
                    }
                    g.last_us = g.last_us.max(Some(a.at_us));
                }
                None => {
                    g.missing += 1;
                    if g.missing_ids.len() < MISSING_SHOWN {
                        g.missing_ids.push(format!("#{c}: {i}"));
                    }
                }
            }
        }
    }
    g.lags_us.sort_unstable();
    g
}

// ---------------------------------------------------------------------------------------
// Scenario 4: the dispatcher's own rate

struct Noop {
    connectors: usize,
    load: PhaseStats,
    owed: usize,
    delivered: usize,
    /// From enabling the connectors until everything was delivered or the bound.
    took: Duration,
    drained: bool,
    cpu: CpuUse,
}

impl Noop {
    fn rate(&self) -> Option<f64> {
        let secs = self.took.as_secs_f64();
        (secs > 0.0).then(|| self.delivered as f64 / secs)
    }

    fn summary(&self) -> String {
        format!(
            "{} connectors: {} of {} delivered in {:.1} s = {} deliveries/s{}",
            self.connectors,
            self.delivered,
            self.owed,
            self.took.as_secs_f64(),
            opt(self.rate(), thousands),
            if self.drained { "" } else { " (NOT drained)" }
        )
    }
}

/// The no-op connector (`hostile.wasm` in its `ok` mode): a hook call that does nothing.
fn noop_manifest(name: &str, component: &Path) -> String {
    format!(
        r#"name = {}
component = {}
realms = [{}]
events = ["login", "logout"]
timeout_ms = 2000

[config]
mode = "ok"
"#,
        toml_str(name),
        toml_str(&component.display().to_string()),
        toml_str(REALM),
    )
}

async fn noop(env: &Env<'_>, target: Target) -> Result<Noop> {
    let args = env.args;
    let names: Vec<String> = (0..args.noop_connectors)
        .map(|c| format!("noop{c}"))
        .collect();
    let manifests: Vec<(String, String)> = names
        .iter()
        .map(|n| (n.clone(), noop_manifest(n, env.components.noop)))
        .collect();
    let (server, admin, meter) = env.start(&target, "noop", &manifests).await?;
    // Disabled connectors are still routed to, so their deliveries wait as pending.
    for n in &names {
        admin.set_enabled(n, false).await?;
    }
    let load = load(env, &server, "noop").await?;
    eprintln!("  [{}] noop: {}", env.backend, load.stats.summary());
    let owed = load.events() * names.len();
    let before = meter.sample();
    let started = Instant::now();
    for n in &names {
        admin.set_enabled(n, true).await?;
    }
    let bound = Duration::from_secs(args.drain_seconds);
    let (delivered, drained) = loop {
        let delivered = admin.delivered_calls(&names).await?;
        if delivered >= owed {
            break (delivered, true);
        }
        if started.elapsed() >= bound {
            break (delivered, false);
        }
        tokio::time::sleep(NOOP_POLL).await;
    };
    let took = started.elapsed();
    let cpu = meter.since(&before);
    server.kill().await?;
    Ok(Noop {
        connectors: names.len(),
        load: load.stats,
        owed,
        delivered,
        took,
        drained,
        cpu,
    })
}

// ---------------------------------------------------------------------------------------
// The receiver

/// One webhook as it arrived.
#[derive(Clone)]
struct Arrival {
    /// System-clock microseconds at arrival (before a slow path's wait).
    at_us: i64,
    /// `occurredAt`, in microseconds; `None` when it did not parse.
    occurred_us: Option<i64>,
    /// The load's request index, from `externalId`.
    index: Option<usize>,
}

#[derive(Default)]
struct ReceiverLog {
    /// Per connector, in arrival order.
    arrivals: Vec<Vec<Arrival>>,
    /// Distinct event ids per connector, counted as they arrive (the drain polls this).
    seen: Vec<HashSet<String>>,
    unique: Vec<usize>,
    /// Requests with an unknown path or a body that is not an event.
    unrecognised: usize,
}

impl ReceiverLog {
    fn unexpected(&self, load: &Load) -> usize {
        self.unrecognised
            + self
                .arrivals
                .iter()
                .flatten()
                .filter(|a| !a.index.is_some_and(|i| load.mapped(i)))
                .count()
    }
}

/// The part of the webhook's JSON body the receiver reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    event_id: String,
    external_id: String,
    occurred_at: String,
}

/// An HTTP server on 127.0.0.1 that answers 200 to `/c{N}` (connector N) and logs the event;
/// the slow connector's path answers after a wait. It stops when dropped.
struct Receiver {
    server: Loopback,
    log: Arc<Mutex<ReceiverLog>>,
}

#[derive(Clone)]
struct ReceiverState {
    log: Arc<Mutex<ReceiverLog>>,
    slow: Option<usize>,
    delay: Duration,
}

impl Receiver {
    async fn start(connectors: usize, slow: Option<usize>, delay: Duration) -> Result<Receiver> {
        let log = Arc::new(Mutex::new(ReceiverLog {
            arrivals: vec![Vec::new(); connectors],
            seen: vec![HashSet::new(); connectors],
            unique: vec![0; connectors],
            unrecognised: 0,
        }));
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(ReceiverState {
                log: Arc::clone(&log),
                slow,
                delay,
            });
        let server = Loopback::bind(app).await.context("the webhook receiver")?;
        Ok(Receiver { server, log })
    }

    fn url(&self, connector: usize) -> String {
        format!("{}/c{connector}", self.server.origin())
    }
}

/// Logs one webhook and answers 200 (after the wait, on the slow connector's path).
async fn receive(State(state): State<ReceiverState>, uri: Uri, body: Bytes) -> StatusCode {
    let at_us = now_us();
    let connector = uri
        .path()
        .strip_prefix("/c")
        .and_then(|n| n.parse::<usize>().ok());
    let payload = serde_json::from_slice::<Payload>(&body).ok();
    {
        let mut log = lock(&state.log);
        match (connector.filter(|&c| c < log.arrivals.len()), payload) {
            (Some(c), Some(p)) => {
                if log.seen[c].insert(p.event_id) {
                    log.unique[c] += 1;
                }
                log.arrivals[c].push(Arrival {
                    at_us,
                    occurred_us: chrono::DateTime::parse_from_rfc3339(&p.occurred_at)
                        .ok()
                        .map(|t| t.timestamp_micros()),
                    index: index_of(&p.external_id),
                });
            }
            _ => log.unrecognised += 1,
        }
    }
    if connector.is_some() && connector == state.slow {
        tokio::time::sleep(state.delay).await;
    }
    StatusCode::OK
}

/// What the receiver manages on its own with a keep-alive client: the ceiling of any
/// delivery rate measured against it.
struct ReceiverCeiling {
    clients: usize,
    posts: usize,
    errors: usize,
    elapsed: Duration,
    /// Median of sequential POSTs on one keep-alive connection (only when the hooks bench,
    /// which times the same, is skipped).
    sequential_median: Option<Duration>,
}

impl ReceiverCeiling {
    fn rate(&self) -> f64 {
        self.posts as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "{} POSTs/s ({} clients, keep-alive, {:.1} s, {} errors)",
            thousands(self.rate()),
            self.clients,
            self.elapsed.as_secs_f64(),
            self.errors
        );
        if let Some(m) = self.sequential_median {
            s.push_str(&format!(
                "; one connection, sequential: median {:.1} µs",
                m.as_secs_f64() * 1e6
            ));
        }
        s
    }
}

/// A webhook body as the connector sends it, for the ceiling and the baseline.
fn sample_event(i: usize) -> Value {
    json!({
        "eventId": format!("01a20897-7a57-7512-bb52-{i:012}"),
        "type": "login",
        "realm": REALM,
        "externalId": external_id("ceiling", i),
        "kind": "FIXED",
        "idpSessionId": null,
        "idpClientSessionId": null,
        "userId": user_id(i),
        "system": null,
        "originSystem": "admin",
        "endReason": null,
        "attributes": {},
        "occurredAt": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "expiresAt": null,
    })
}

async fn receiver_ceiling(args: &Args) -> Result<ReceiverCeiling> {
    let receiver = Receiver::start(1, None, Duration::ZERO).await?;
    let url = receiver.url(0);
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let body = Arc::new(serde_json::to_vec(&sample_event(0)).context("serialising an event")?);
    let post = |client: reqwest::Client, url: String, body: Arc<Vec<u8>>| async move {
        let resp = client
            .post(url)
            .header("content-type", "application/json")
            .body(body.as_ref().clone())
            .send()
            .await
            .ok()?;
        let ok = resp.status().is_success();
        resp.bytes().await.ok()?;
        ok.then_some(())
    };

    let sequential_median = if args.skip_hooks {
        let mut samples = Vec::with_capacity(BASELINE_POSTS);
        for _ in 0..BASELINE_POSTS {
            let t = Instant::now();
            if post(client.clone(), url.clone(), Arc::clone(&body))
                .await
                .is_some()
            {
                samples.push(t.elapsed());
            }
        }
        samples.sort_unstable();
        samples.get(samples.len() / 2).copied()
    } else {
        None
    };

    let posts = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let until = start + RECEIVER_CEILING;
    let mut tasks = JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, url, body) = (client.clone(), url.clone(), Arc::clone(&body));
        let (posts, errors) = (Arc::clone(&posts), Arc::clone(&errors));
        tasks.spawn(async move {
            while Instant::now() < until {
                match post(client.clone(), url.clone(), Arc::clone(&body)).await {
                    Some(()) => posts.fetch_add(1, Ordering::Relaxed),
                    None => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a receiver ceiling task failed")?;
    }
    Ok(ReceiverCeiling {
        clients: args.concurrency,
        posts: posts.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        sequential_median,
    })
}

// ---------------------------------------------------------------------------------------
// The hook-call micro-benchmark

struct Hooks {
    /// Its stdout, printed again in the summary.
    output: String,
    error: Option<String>,
}

impl Hooks {
    /// The first figure in µs on the first line that mentions every word of `words`.
    fn figure(&self, words: &[&str]) -> Option<f64> {
        microseconds(self.line(words)?)
    }

    /// The host-CPU column (the fourth) of the table row with all of `words`.
    fn host_cpu(&self, words: &[&str]) -> Option<f64> {
        microseconds(self.line(words)?.split('|').nth(4)?)
    }

    fn line(&self, words: &[&str]) -> Option<&str> {
        // Only lines with a figure: comment lines mention the same words.
        self.output.lines().find(|l| {
            let l = l.to_lowercase();
            l.contains("µs") && words.iter().all(|w| l.contains(w))
        })
    }
}

/// The words of the hooks bench's rows timed on a hook thread, as the dispatcher calls.
const IN_PLACE: &str = "as deliveries call";

/// The first figure in microseconds in `text` ("1,234.5 µs" is 1234.5).
fn microseconds(text: &str) -> Option<f64> {
    let (before, _) = text.split_once("µs")?;
    let number: String = before
        .chars()
        .rev()
        .skip_while(|c| c.is_whitespace())
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .filter(|c| *c != ',')
        .collect();
    number.parse().ok()
}

/// `cargo bench -p lockstep --bench hooks`, its stdout echoed as it comes and kept.
fn hooks_bench(root: &Path) -> Hooks {
    use std::io::{BufRead, BufReader};
    eprintln!("\nrunning: cargo bench -p lockstep --bench hooks");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let child = std::process::Command::new(cargo)
        .args(["bench", "-p", "lockstep", "--bench", "hooks"])
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Hooks {
                output: String::new(),
                error: Some(format!("starting cargo bench: {e}")),
            };
        }
    };
    let mut output = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::io::Result::ok)
        {
            eprintln!("  {line}");
            output.push_str(&line);
            output.push('\n');
        }
    }
    let error = match child.wait() {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("cargo bench -p lockstep --bench hooks failed: {s}")),
        Err(e) => Some(format!("waiting for cargo bench: {e}")),
    };
    Hooks { output, error }
}

// ---------------------------------------------------------------------------------------
// The summary

fn count(n: usize) -> String {
    thousands(n as f64)
}

fn pct(x: f64) -> String {
    if x > 99.0 && x < 100.0 {
        format!("{x:.1} %")
    } else {
        format!("{x:.0} %")
    }
}

/// A duration as a person reads it: "13.4 s", "850 ms", "3.2 ms".
fn dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.1} s")
    } else if s >= 0.01 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn opt<T>(x: Option<T>, f: impl Fn(T) -> String) -> String {
    x.map_or_else(|| "-".to_owned(), f)
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "not met",
        None => "not measured",
    }
}

fn lags(g: &Group) -> String {
    format!(
        "{} / {} / {}",
        opt(g.lag(50.0), lag_str),
        opt(g.lag(99.0), lag_str),
        opt(g.max_lag(), lag_str)
    )
}

fn arrived_lags(g: &Group) -> String {
    if g.missing == 0 {
        return "as above".to_owned();
    }
    format!(
        "{} / {} / {}",
        opt(g.arrived_lag(50.0), dur),
        opt(g.arrived_lag(99.0), dur),
        opt(g.arrived_lag(100.0), dur)
    )
}

fn drain_cell(s: &Scenario, g: &Group, bound: u64) -> String {
    match g.drain() {
        Some(d) => dur(d),
        None if s.drained => "-".to_owned(),
        None => format!(
            "not within {bound} s ({} left)",
            count(g.owed - g.delivered)
        ),
    }
}

fn missing_cell(g: &Group) -> String {
    if g.missing == 0 {
        "0".to_owned()
    } else {
        format!("{} (e.g. {})", count(g.missing), g.missing_ids.join(", "))
    }
}

/// Server CPU per delivery over the load and the wait, in µs (the load's own API work
/// included: it is what the server spent per delivery made).
fn cpu_per_delivery(s: &Scenario) -> Option<f64> {
    let delivered = s.fast.delivered + s.slow.as_ref().map_or(0, |g| g.delivered);
    us_per_op(s.cpu.server, delivered)
}

fn print(
    args: &Args,
    command_line: &str,
    revision: &str,
    receiver: &ReceiverCeiling,
    backends: &[BackendReport],
    hooks: Option<&Hooks>,
) {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let n = args.connectors;
    println!();
    println!("== Delivery benchmark");
    println!("command:   {command_line}");
    if args.postgres_url.is_some() && !command_line.contains("--postgres-url") {
        println!("           (PostgreSQL URL from LOCKSTEP_TEST_DATABASE_URL)");
    }
    println!("revision:  {revision}");
    match &args.server_bin {
        Some(bin) => println!(
            "server:    {} (--server-bin: built {}, maybe from another revision)",
            bin.display(),
            std::fs::metadata(bin)
                .and_then(|m| m.modified())
                .map(|t| chrono::DateTime::<chrono::Utc>::from(t)
                    .format("%Y-%m-%d %H:%M UTC")
                    .to_string())
                .unwrap_or_else(|_| "at an unknown time".to_owned())
        ),
        None => println!("server:    target/release/lockstep, built from this revision"),
    }
    println!(
        "settings:  connectors={n} seconds={} concurrency={} drain-seconds={} slow-ms={} noop-connectors={} durability={}; {cores} cores shared by client, server, receiver and database",
        args.seconds,
        args.concurrency,
        args.drain_seconds,
        args.slow_ms,
        args.noop_connectors,
        args.durability.as_str()
    );
    println!(
        "clock:     lag = arrival (system clock, µs) - occurredAt (same clock, truncated to the ms: up to 1 ms long)"
    );
    println!("receiver:  {}", receiver.summary());

    for b in backends {
        println!();
        println!("### {}", b.backend);
        if let Some(f) = &b.failure {
            println!("ABORTED: {f}");
        }
        let api_rate = b.api.as_ref().map(|a| a.load.ops_per_sec());
        let fast = b.fast.as_ref();
        let slow = b.slow.as_ref();
        let cell =
            |s: Option<&Scenario>, f: &dyn Fn(&Scenario) -> String| s.map_or("-".to_owned(), f);
        let slow_cell = |f: &dyn Fn(&Scenario, &Group) -> String| {
            slow.and_then(|s| s.slow.as_ref().map(|g| f(s, g)))
                .unwrap_or_else(|| "-".to_owned())
        };
        println!();
        println!(
            "| figure | {n} webhooks | {n} webhooks beside a slow one | the slow one ({} ms) | ceiling |",
            args.slow_ms
        );
        println!("|---|---:|---:|---:|---|");
        println!(
            "| API rate (map-fixed/s) | {} | {} | | {} (no connectors) |",
            cell(fast, &|s: &Scenario| thousands(s.load.ops_per_sec())),
            cell(slow, &|s: &Scenario| thousands(s.load.ops_per_sec())),
            opt(api_rate, thousands),
        );
        println!(
            "| API errors | {} | {} | | {} |",
            cell(fast, &|s: &Scenario| count(s.load.errors)),
            cell(slow, &|s: &Scenario| count(s.load.errors)),
            b.api
                .as_ref()
                .map_or("-".to_owned(), |a| count(a.load.errors)),
        );
        println!(
            "| deliveries owed (events × connectors) | {} | {} | {} | |",
            cell(fast, &|s: &Scenario| format!(
                "{} × {} = {}",
                count(s.events),
                s.fast.connectors,
                count(s.fast.owed)
            )),
            cell(slow, &|s: &Scenario| format!(
                "{} × {} = {}",
                count(s.events),
                s.fast.connectors,
                count(s.fast.owed)
            )),
            slow_cell(&|s: &Scenario, g: &Group| format!(
                "{} × 1 = {}",
                count(s.events),
                count(g.owed)
            )),
        );
        println!(
            "| deliveries done | {} | {} | {} | |",
            cell(fast, &|s: &Scenario| count(s.fast.delivered)),
            cell(slow, &|s: &Scenario| count(s.fast.delivered)),
            slow_cell(&|_: &Scenario, g: &Group| count(g.delivered)),
        );
        println!(
            "| delivered within the load + {} s | {} | {} | {} | 100 % |",
            GRACE.as_secs(),
            cell(fast, &|s: &Scenario| opt(s.fast.share_within(), pct)),
            cell(slow, &|s: &Scenario| opt(s.fast.share_within(), pct)),
            slow_cell(&|_: &Scenario, g: &Group| opt(g.share_within(), pct)),
        );
        println!(
            "| lag occurredAt → arrival p50 / p99 / max (one never arrived: slowest) | {} | {} | {} | {} |",
            cell(fast, &|s: &Scenario| lags(&s.fast)),
            cell(slow, &|s: &Scenario| lags(&s.fast)),
            slow_cell(&|_: &Scenario, g: &Group| lags(g)),
            receiver.sequential_median.map_or_else(
                || "loopback POST: see the hooks bench".to_owned(),
                |m| format!("loopback POST {:.1} µs", m.as_secs_f64() * 1e6)
            ),
        );
        println!(
            "| the same over the deliveries that arrived | {} | {} | {} | |",
            cell(fast, &|s: &Scenario| arrived_lags(&s.fast)),
            cell(slow, &|s: &Scenario| arrived_lags(&s.fast)),
            slow_cell(&|_: &Scenario, g: &Group| arrived_lags(g)),
        );
        println!(
            "| drain after the load stopped | {} | {} | {} | 0 |",
            cell(fast, &|s: &Scenario| drain_cell(
                s,
                &s.fast,
                args.drain_seconds
            )),
            cell(slow, &|s: &Scenario| drain_cell(
                s,
                &s.fast,
                args.drain_seconds
            )),
            slow_cell(&|_: &Scenario, g: &Group| format!(
                "{} left after the wait",
                count(g.owed - g.delivered)
            )),
        );
        println!(
            "| deliveries/s overall (load start → last arrival) | {} | {} | {} | {} (receiver) |",
            cell(fast, &|s: &Scenario| opt(s.fast.rate(), thousands)),
            cell(slow, &|s: &Scenario| opt(s.fast.rate(), thousands)),
            slow_cell(&|_: &Scenario, g: &Group| opt(g.rate(), thousands)),
            thousands(receiver.rate()),
        );
        println!(
            "| duplicate arrivals | {} | {} | {} | 0 |",
            cell(fast, &|s: &Scenario| count(s.fast.duplicates)),
            cell(slow, &|s: &Scenario| count(s.fast.duplicates)),
            slow_cell(&|_: &Scenario, g: &Group| count(g.duplicates)),
        );
        println!(
            "| not arrived when the wait ended (connector #: request) | {} | {} | {} | 0 |",
            cell(fast, &|s: &Scenario| missing_cell(&s.fast)),
            cell(slow, &|s: &Scenario| missing_cell(&s.fast)),
            slow_cell(&|_: &Scenario, g: &Group| missing_cell(g)),
        );
        println!(
            "| arrivals of unanswered maps or unknown paths | {} | {} | | 0 |",
            cell(fast, &|s: &Scenario| count(s.unexpected)),
            cell(slow, &|s: &Scenario| count(s.unexpected)),
        );
        println!(
            "| server CPU per delivery (load + wait) | {} | {} | | {} per map (no connectors) |",
            cell(fast, &|s: &Scenario| opt(cpu_per_delivery(s), |x| format!(
                "{x:.0} µs"
            ))),
            cell(slow, &|s: &Scenario| opt(cpu_per_delivery(s), |x| format!(
                "{x:.0} µs"
            ))),
            b.api.as_ref().map_or("-".to_owned(), |a| opt(
                us_per_op(a.cpu.server, a.load.ops),
                |x| format!("{x:.0} µs")
            )),
        );
        if let Some(p) = fast
            .and_then(|s| s.cpu.postgres)
            .filter(|_| b.backend == "postgres")
        {
            println!(
                "PostgreSQL cluster CPU during the {n}-webhook scenario: {:.1} s",
                p.as_secs_f64()
            );
        }
        if let (Some(f), Some(s)) = (fast, slow)
            && let (Some(Lag::At(without)), Some(Lag::At(beside))) =
                (f.fast.lag(99.0), s.fast.lag(99.0))
        {
            println!(
                "fast connectors' lag p99 beside a slow one / without it: {} / {} = {:.2}",
                dur(beside),
                dur(without),
                beside.as_secs_f64() / without.as_secs_f64().max(1e-9)
            );
        }
        if let Some(no) = &b.noop {
            println!(
                "no-op connectors (deliveries held while disabled, then released): {}; API rate meanwhile {} maps/s; server CPU per delivery {}",
                no.summary(),
                thousands(no.load.ops_per_sec()),
                opt(us_per_op(no.cpu.server, no.delivered), |x| format!(
                    "{x:.1} µs"
                )),
            );
        }
    }

    if let Some(h) = hooks {
        println!();
        println!("### Hook calls (cargo bench -p lockstep --bench hooks)");
        if let Some(e) = &h.error {
            println!("FAILED: {e}");
        }
        print!("{}", h.output);
    }

    println!();
    println!("### Targets");
    println!();
    let names: Vec<&str> = backends.iter().map(|b| b.backend).collect();
    println!("| target | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    let row = |label: &str, f: &dyn Fn(&BackendReport) -> (String, Option<bool>)| {
        let cells: Vec<String> = backends
            .iter()
            .map(|b| {
                let (figure, ok) = f(b);
                format!("{figure}: {}", met(ok))
            })
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    row(
        &format!("{n} webhooks: ≥ {TARGET_WITHIN:.0} % delivered within the load + 1 s"),
        &|b: &BackendReport| {
            let share = b.fast.as_ref().and_then(|s| s.fast.share_within());
            (opt(share, pct), share.map(|x| x >= TARGET_WITHIN))
        },
    );
    row(
        &format!("{n} webhooks: lag p99 ≤ 1 s"),
        &|b: &BackendReport| {
            let p99 = b.fast.as_ref().and_then(|s| s.fast.lag(99.0));
            (opt(p99, lag_str), p99.map(|l| l.within(TARGET_LAG_P99)))
        },
    );
    row(
        &format!("{n} webhooks: every event delivered once per connector"),
        &|b: &BackendReport| match &b.fast {
            Some(s) => (
                format!(
                    "{} missing, {} duplicates",
                    count(s.fast.missing),
                    count(s.fast.duplicates)
                ),
                Some(s.fast.missing == 0 && s.fast.duplicates == 0),
            ),
            None => ("-".to_owned(), None),
        },
    );
    row(
        "beside a slow connector: the others' lag p99 ≤ 1 s",
        &|b: &BackendReport| {
            let p99 = b.slow.as_ref().and_then(|s| s.fast.lag(99.0));
            (opt(p99, lag_str), p99.map(|l| l.within(TARGET_LAG_P99)))
        },
    );
    row(
        &format!(
            "no-op connector ≥ {} deliveries/s end to end",
            thousands(TARGET_NOOP_RATE)
        ),
        &|b: &BackendReport| {
            let rate = b.noop.as_ref().and_then(Noop::rate);
            (
                opt(rate, |r| format!("{}/s", thousands(r))),
                rate.map(|r| r >= TARGET_NOOP_RATE),
            )
        },
    );
    // The calls as deliveries make them (on a hook thread, in place) when the bench times
    // them so; an older bench's calls from its own workers otherwise.
    let hook_us = hooks.and_then(|h| {
        h.figure(&["fresh instance", IN_PLACE])
            .or_else(|| h.figure(&["fresh instance"]))
    });
    // Host time is the CPU of every thread but the receiver's per call (the bench's fourth
    // column); a hooks bench without that column gives its wall-clock median, labelled.
    let pooled_us = hooks.and_then(|h| {
        h.host_cpu(&["pooled", IN_PLACE])
            .or_else(|| h.host_cpu(&["pooled"]))
            .map(|x| (x, "pooled, host CPU per call"))
            .or_else(|| h.figure(&["pooled"]).map(|x| (x, "pooled, wall clock")))
    });
    println!();
    println!("| target (hooks bench, no server) | figure |");
    println!("|---|---|");
    println!(
        "| fresh-instance hook call median ≤ {TARGET_HOOK_US:.0} µs | {}: {} |",
        opt(hook_us, |x| format!("{x:.1} µs")),
        met(hook_us.map(|x| x <= TARGET_HOOK_US))
    );
    println!(
        "| webhook to a loopback receiver over a pooled connection ≤ {TARGET_POOLED_US:.0} µs of host time | {}: {} |",
        opt(pooled_us, |(x, how)| format!("{x:.1} µs ({how})")),
        met(pooled_us.map(|(x, _)| x <= TARGET_POOLED_US))
    );
    // The webhook connector keeps nothing between calls, so a warm instance may serve it;
    // and what a plain HTTP client spends on the same POST is the floor beside both.
    let warm_us = hooks.and_then(|h| h.host_cpu(&["pooled", "warm instance"]));
    let ceiling_us = hooks.and_then(|h| h.host_cpu(&["ceiling"]));
    if warm_us.is_some() || ceiling_us.is_some() {
        println!(
            "| the same with `reuse_instance = true` (a warm instance) | {}: {} |",
            opt(warm_us, |x| format!("{x:.1} µs")),
            met(warm_us.map(|x| x <= TARGET_POOLED_US))
        );
        println!(
            "| ceiling: the same POST by a plain HTTP client on a hook thread, no guest | {} |",
            opt(ceiling_us, |x| format!("{x:.1} µs"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_external_id_gives_back_its_index() {
        assert_eq!(index_of(&external_id("fast", 42)), Some(42));
        assert_eq!(index_of("nonsense"), None);
    }

    #[test]
    fn the_targets_read_the_calls_made_as_deliveries_make_them() {
        let h = Hooks {
            output: "| figure | median | p99 | host CPU |\n\
                     | hook call, fresh instance (no-op connector) | 28.5 µs | 70.0 µs | 29.6 µs |\n\
                     | hook call, fresh instance, on a hook thread as deliveries call (no-op connector) | 14.7 µs | 36.1 µs | 16.8 µs |\n"
                .to_owned(),
            error: None,
        };
        assert_eq!(h.figure(&["fresh instance", IN_PLACE]), Some(14.7));
        assert_eq!(h.host_cpu(&["fresh instance", IN_PLACE]), Some(16.8));
    }

    #[test]
    fn reads_a_figure_from_the_hooks_bench_table() {
        let h = Hooks {
            output: "# connections opened: pooled 1 for 5500 calls, unpooled 5500\n\
                     | figure | median | p99 |\n\
                     | hook call, fresh instance (no-op connector) | 39.7 µs | 80.1 µs |\n\
                     | webhook, pooled connection | 1,234.5 µs | 2 ms |\n"
                .to_owned(),
            error: None,
        };
        assert_eq!(h.figure(&["fresh instance"]), Some(39.7));
        assert_eq!(h.figure(&["pooled"]), Some(1234.5));
        assert_eq!(h.figure(&["warm"]), None);
        assert_eq!(h.host_cpu(&["fresh instance"]), None);
        let h = Hooks {
            output: "| figure | median | p99 | host CPU |\n\
                     | webhook, pooled keep-alive connection | 198.5 µs | 308.5 µs | 91.2 µs |\n"
                .to_owned(),
            error: None,
        };
        assert_eq!(h.host_cpu(&["pooled"]), Some(91.2));
        // The rows of today's bench: fresh and warm instances and the plain-client ceiling
        // are told apart.
        let h = Hooks {
            output: "| webhook connector → loopback receiver, pooled, on a hook thread as deliveries call | 158.1 µs | 403.8 µs | 110.7 µs |\n\
                     | webhook connector → loopback receiver, pooled, warm instance (`reuse_instance`), on a hook thread | 130.4 µs | 213.8 µs | 83.0 µs |\n\
                     | ceiling: the same event POSTed by reqwest on a hook thread, keep-alive (no guest) | 93.2 µs | 159.8 µs | 43.9 µs |\n"
                .to_owned(),
            error: None,
        };
        assert_eq!(h.host_cpu(&["pooled", IN_PLACE]), Some(110.7));
        assert_eq!(h.host_cpu(&["pooled", "warm instance"]), Some(83.0));
        assert_eq!(h.host_cpu(&["ceiling"]), Some(43.9));
    }

    #[test]
    fn a_group_counts_first_arrivals_duplicates_and_missing() {
        let mut stats = PhaseStats::named("t");
        stats.ops = 3;
        let load = Load {
            stats,
            failed: [2].into(),
            started_us: 0,
            ended_us: 1_000_000,
        };
        let arrival = |at_us, index| Arrival {
            at_us,
            occurred_us: Some(0),
            index: Some(index),
        };
        let log = ReceiverLog {
            arrivals: vec![vec![
                arrival(500_000, 0),
                arrival(2_500_000, 0),
                arrival(2_500_000, 2),
            ]],
            ..ReceiverLog::default()
        };
        let g = group(&log, &[0], &load);
        assert_eq!((g.owed, g.delivered, g.within), (2, 1, 1));
        assert_eq!((g.duplicates, g.missing), (1, 1));
        assert_eq!(g.lags_us, vec![500_000]);
        // The one that never arrived is the slower half.
        assert_eq!(g.lag(50.0), Some(Lag::At(Duration::from_millis(500))));
        assert_eq!(g.lag(99.0), Some(Lag::NotArrived));
        assert_eq!(log.unexpected(&load), 1);
    }
}
