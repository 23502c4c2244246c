//! `cargo xtask bench`: mixed-load curves of a release build of `lockstep serve`.
//!
//! For each backend (SQLite in a temp dir, a fresh PostgreSQL database, or both) the server
//! starts on 127.0.0.1 and gets an **open-loop** mixed workload at increasing offered rates:
//! request *k* of a step is sent at `start + k / rate` whatever happened to the others, and
//! its latency runs from that scheduled time, so it includes any wait for one of the
//! `--concurrency` connections (queueing), as a client of an overloaded service sees it.
//!
//! The mix, per 100 requests: 30 map-parent, 25 map-child (under a live parent the workload
//! mapped), 15 map-fixed, 10 GET of a session it mapped, 10 list by user
//! (`?userId=..&limit=50`), 10 destroy-parent of a live root (PARENT or FIXED) with its
//! children. A map-child whose parent is being destroyed at the same time is refused with
//! 404/409: those answers are counted apart from errors (any other non-2xx, a transport
//! error, or no answer within `--timeout-seconds`).
//!
//! With `--rows N` the server is then stopped, `sessions` is bulk-loaded to N rows with SQL
//! (`bench_api::db::fill_sessions`: FIXED sessions in the benchmark realm, 50,000 per
//! transaction), the server starts again, and its RSS is read idle and under the same mix at
//! `--rows-rate` (half the GETs then read a random bulk-loaded row), with the size of the
//! database on disk.
//!
//! The plot (`--plot`, default `docs/bench-curves.png`): achieved throughput and p99 latency
//! against the offered rate, one line per backend.

mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use testkit::procfs::{self, rss_kib};

use crate::bench_api::db::{self, DbSize, Target};
use crate::bench_api::load::{Api, run_phase};
use crate::bench_api::server::Server;
use crate::bench_api::{self, Durability, idp_session_id, user_id};
use crate::harness::{self, lock};

const TOKEN: &str = "bench-mixed-token";
const REALM: &str = "bench";
/// Parents mapped (closed loop, not measured) before the first step, so that map-child,
/// GET and destroy have targets from the first request on.
const SEED_PARENTS: usize = 500;
/// Users the workload spreads its sessions over (as `bench_api::user_id` and the bulk load).
const USERS: u64 = 10_000;
const RSS_EVERY: Duration = Duration::from_millis(250);
/// Pause after each step, so the next starts on a server that has caught up.
const SETTLE: Duration = Duration::from_secs(1);
/// Wait after a start before the idle RSS is read.
const IDLE_WAIT: Duration = Duration::from_secs(3);

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Backends to measure. Default: `both` when a PostgreSQL URL is given, else `sqlite`.
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// PostgreSQL server for the `postgres` backend: a fresh database is created on it for
    /// the run and dropped afterwards (kept with `--keep`).
    #[arg(long, env = "LOCKSTEP_TEST_DATABASE_URL")]
    database_url: Option<String>,
    /// Offered rates of the steps, requests/s, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 200, 400, 800, 1600])]
    rates: Vec<u32>,
    /// Seconds each step offers its rate.
    #[arg(long, default_value_t = 10)]
    step_seconds: u64,
    /// Requests in flight at most (keep-alive connections). A request due while all are
    /// busy waits for one, and that wait is part of its latency.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// A request with no answer this many seconds after its scheduled time is an error.
    #[arg(long, default_value_t = 10)]
    timeout_seconds: u64,
    /// Commit durability given to the server (`--durability`).
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    /// Grow `sessions` to this many rows with SQL after the curves and measure the
    /// server's memory with them (0: skip).
    #[arg(long, default_value_t = 0)]
    rows: i64,
    /// Offered rate of the load with `--rows` rows.
    #[arg(long, default_value_t = 400)]
    rows_rate: u32,
    /// Seconds of load with `--rows` rows.
    #[arg(long, default_value_t = 20)]
    rows_seconds: u64,
    /// Where the PNG goes (default `docs/bench-curves.png` in the workspace).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Do not write the PNG.
    #[arg(long)]
    no_plot: bool,
    /// TrueType font for the plot's text; without it the plot has no text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// Seed of the request mix (the same seed gives the same sequence of operations).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A further flag for `lockstep serve`, as one argument (`--server-arg=--flag=value`);
    /// repeatable. Say, to switch off a per-caller rate limit that the offered rates exceed.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Server binary to run instead of building `target/release/lockstep` first.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Keep the temp directories (database, server log) and the PostgreSQL database.
    #[arg(long)]
    keep: bool,
}

/// Which backends a run measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Both,
}

/// Entry point: builds the server, runs the benchmark on a Tokio runtime; Ctrl-C stops the
/// servers and cleans up.
pub fn main(args: Args) -> Result<ExitCode> {
    if args.rates.is_empty() || args.rates.contains(&0) {
        bail!("--rates takes one or more positive rates");
    }
    if args.concurrency == 0 || args.step_seconds == 0 || args.timeout_seconds == 0 {
        bail!("--concurrency, --step-seconds and --timeout-seconds must be positive");
    }
    if args.rows > 0 && (args.rows_rate == 0 || args.rows_seconds == 0) {
        bail!("--rows-rate and --rows-seconds must be positive");
    }
    let backend = args.backend.unwrap_or(if args.database_url.is_some() {
        Backend::Both
    } else {
        Backend::Sqlite
    });
    let pg_url = match (backend, &args.database_url) {
        (Backend::Sqlite, _) => None,
        (_, Some(url)) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Some(url.clone())
        }
        (_, Some(_)) => bail!("--database-url takes a PostgreSQL URL"),
        (_, None) => bail!("--backend postgres and both need --database-url (PostgreSQL)"),
    };
    let root = crate::workspace_root()?;
    let plot_path = (!args.no_plot).then(|| {
        args.plot
            .clone()
            .unwrap_or_else(|| root.join("docs/bench-curves.png"))
    });
    let command_line = bench_api::command_line();
    let bin = bench_api::server_bin(args.server_bin.as_deref())?;
    let revision = bench_api::revision();
    bench_api::block_on(async {
        let pg_db = harness::scratch_db_name("lockstep_bench_mixed");
        let runs =
            bench_api::until_interrupted(run(&args, backend, pg_url.as_deref(), &bin, &pg_db))
                .await;
        // Dropping `run` killed the servers; the scratch database needs an explicit drop.
        if let (Some(url), false) = (&pg_url, args.keep) {
            harness::drop_scratch_databases(url, &[pg_db]).await;
        }
        let runs = runs?;
        print_report(&runs, &args, &command_line, &revision);
        if let Some(path) = &plot_path {
            let curves: Vec<plot::Curve> = runs
                .iter()
                .filter(|r| !r.steps.is_empty())
                .map(|r| plot::Curve {
                    name: r.backend.to_owned(),
                    points: r
                        .steps
                        .iter()
                        .map(|s| (s.rate, s.achieved(), s.percentile_ms(99.0)))
                        .collect(),
                })
                .collect();
            match plot::draw(path, &curves, &args.font)? {
                plot::Text::Drawn => println!("\nplot: {}", path.display()),
                plot::Text::Missing(why) => println!(
                    "\nplot: {} (no text: {why}; the figures are in the tables above)",
                    path.display()
                ),
            }
        }
        Ok(if runs.iter().any(|r| r.failure.is_some()) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

async fn run(
    args: &Args,
    backend: Backend,
    pg_url: Option<&str>,
    bin: &Path,
    pg_db: &str,
) -> Result<Vec<BackendRun>> {
    let mut runs = Vec::new();
    if backend != Backend::Postgres {
        let dir = harness::temp_dir("lockstep-bench-mixed-")?;
        let target = Target::Sqlite {
            path: dir.path().join("bench.db"),
        };
        runs.push(bench_backend(args, bin, &target, dir.path()).await);
        if args.keep {
            eprintln!("kept {}", dir.keep().display());
        }
    }
    if let Some(admin_url) = pg_url {
        let dir = harness::temp_dir("lockstep-bench-mixed-pg-")?;
        // A database that cannot be created fails this backend, not the SQLite figures.
        let run = match db::create_pg_database(admin_url, pg_db).await {
            Ok(url) => bench_backend(args, bin, &Target::Postgres { url }, dir.path()).await,
            Err(e) => BackendRun {
                failure: Some(format!("{e:#}")),
                ..BackendRun::new("postgres")
            },
        };
        runs.push(run);
        if args.keep {
            eprintln!("kept {} and database {pg_db}", dir.keep().display());
        }
    }
    Ok(runs)
}

/// Everything measured on one backend.
struct BackendRun {
    backend: &'static str,
    steps: Vec<Step>,
    /// RSS (KiB) a few seconds after the first start, empty database.
    rss_start: Option<u64>,
    /// Database size after the curves.
    size_after_curves: Option<DbSize>,
    memory: Option<Memory>,
    notes: Vec<String>,
    /// Set when the run on this backend was aborted (its figures so far are kept).
    failure: Option<String>,
}

/// The server's memory with `--rows` rows.
struct Memory {
    rows: i64,
    rss_idle: Option<u64>,
    load: Step,
    size: DbSize,
}

impl BackendRun {
    fn new(backend: &'static str) -> BackendRun {
        BackendRun {
            backend,
            steps: Vec::new(),
            rss_start: None,
            size_after_curves: None,
            memory: None,
            notes: Vec::new(),
            failure: None,
        }
    }
}

async fn bench_backend(args: &Args, bin: &Path, target: &Target, dir: &Path) -> BackendRun {
    let mut run = BackendRun::new(target.name());
    run.failure = harness::run_backend(
        target.name(),
        dir,
        bench_backend_inner(args, bin, target, dir, &mut run),
    )
    .await;
    run
}

async fn bench_backend_inner(
    args: &Args,
    bin: &Path,
    target: &Target,
    dir: &Path,
    run: &mut BackendRun,
) -> Result<()> {
    let name = target.name();
    let log = dir.join("server.log");
    let server = start(bin, target, args, &log).await?;
    let pid = server.pid().context("the server has no pid")?;
    eprintln!(
        "  [{name}] server pid {pid} on {} (log {})",
        server.addr,
        log.display()
    );
    tokio::time::sleep(IDLE_WAIT).await;
    run.rss_start = rss_kib(pid);

    let workload = Arc::new(Workload::new(&server, target, args, 0, 0)?);
    workload.seed_parents(SEED_PARENTS).await?;
    let mut seq = 0;
    for &rate in &args.rates {
        let label = format!("{rate} req/s");
        let step = run_step(&workload, f64::from(rate), args.step_seconds, pid, &mut seq).await?;
        eprintln!("  [{name}] {}", step.summary(&label));
        run.steps.push(step);
        tokio::time::sleep(SETTLE).await;
    }
    // The `--rows` part maps new sessions after these.
    let next_id = workload.next_id.load(Ordering::Relaxed);
    if let Some(note) = server.stop().await? {
        run.notes.push(note);
    }
    run.size_after_curves = Some(db::size(target).await?);

    if args.rows > 0 {
        let added = db::fill_sessions(target, args.rows, REALM).await?;
        let rows = db::count_sessions(target).await?;
        let size = db::size(target).await?;
        let server = start(bin, target, args, &log).await?;
        let pid = server.pid().context("the server has no pid")?;
        tokio::time::sleep(IDLE_WAIT).await;
        let rss_idle = rss_kib(pid);
        eprintln!(
            "  [{name}] {rows} rows ({}), server RSS idle {}",
            bytes_mib(size.total),
            mib(rss_idle)
        );
        let filler = usize::try_from(added).unwrap_or(0);
        let workload = Arc::new(Workload::new(&server, target, args, next_id, filler)?);
        workload.seed_parents(SEED_PARENTS).await?;
        let load = run_step(
            &workload,
            f64::from(args.rows_rate),
            args.rows_seconds,
            pid,
            &mut seq,
        )
        .await?;
        eprintln!(
            "  [{name}] {}",
            load.summary(&format!("{} req/s, {rows} rows", args.rows_rate))
        );
        if let Some(note) = server.stop().await? {
            run.notes.push(note);
        }
        run.memory = Some(Memory {
            rows,
            rss_idle,
            load,
            size: db::size(target).await?,
        });
    }
    Ok(())
}

async fn start(bin: &Path, target: &Target, args: &Args, log: &Path) -> Result<Server> {
    let extra: Vec<&std::ffi::OsStr> = args.server_arg.iter().map(|a| a.as_ref()).collect();
    Server::start(
        bin,
        &target.server_url(),
        args.durability.as_str(),
        TOKEN,
        &extra,
        log,
    )
    .await
}

/// One kind of request of the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    MapParent,
    MapChild,
    MapFixed,
    Get,
    ListByUser,
    Destroy,
}

impl Op {
    /// Requests of each kind per 100: 70 map, 20 query, 10 destroy.
    const MIX: [(Op, u64); 6] = [
        (Op::MapParent, 30),
        (Op::MapChild, 25),
        (Op::MapFixed, 15),
        (Op::Get, 10),
        (Op::ListByUser, 10),
        (Op::Destroy, 10),
    ];

    fn pick(r: u64) -> Op {
        let mut x = r % 100;
        for (op, weight) in Op::MIX {
            if x < weight {
                return op;
            }
            x -= weight;
        }
        Op::Destroy
    }

    fn name(self) -> &'static str {
        match self {
            Op::MapParent => "map-parent",
            Op::MapChild => "map-child",
            Op::MapFixed => "map-fixed",
            Op::Get => "get",
            Op::ListByUser => "list-by-user",
            Op::Destroy => "destroy-parent",
        }
    }
}

/// SplitMix64: spreads the request number and the seed into the bits that choose the
/// operation and its target.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What one request came to.
enum Class {
    /// 2xx.
    Ok,
    /// 404/409 of a map-child whose parent was being destroyed.
    Refused,
    Error(String),
    /// No answer by the deadline.
    Timeout,
}

struct Sample {
    op: Op,
    /// From the scheduled send time to the whole answer read.
    latency: Duration,
    answered: Instant,
    class: Class,
}

/// The workload's view of the sessions it made, and its client.
struct Workload {
    api: Api,
    seed: u64,
    timeout: Duration,
    /// Connections: a request holds one from send to the end of the answer.
    slots: Semaphore,
    /// Numbers new external ids.
    next_id: AtomicUsize,
    /// Live PARENTs: parents of map-child, targets of destroy-parent.
    parents: Mutex<Vec<String>>,
    /// Live FIXED sessions: targets of destroy-parent.
    fixed: Mutex<Vec<String>>,
    /// Every session mapped (also once destroyed): targets of GET.
    known: Mutex<Vec<String>>,
    /// Bulk-loaded rows `filler-0..filler`: half the GETs read one when there are any.
    filler: usize,
    /// The backend is PostgreSQL (its processes' CPU is measured too).
    postgres: bool,
}

impl Workload {
    /// A workload whose new external ids are numbered from `first_id` (a later workload on
    /// the same database starts where the previous one stopped).
    fn new(
        server: &Server,
        target: &Target,
        args: &Args,
        first_id: usize,
        filler: usize,
    ) -> Result<Workload> {
        let timeout = Duration::from_secs(args.timeout_seconds);
        Ok(Workload {
            api: Api::new(server.addr, REALM, TOKEN, args.concurrency, timeout)?,
            seed: args.seed,
            timeout,
            slots: Semaphore::new(args.concurrency),
            next_id: AtomicUsize::new(first_id),
            parents: Mutex::new(Vec::new()),
            fixed: Mutex::new(Vec::new()),
            known: Mutex::new(Vec::new()),
            filler,
            postgres: matches!(target, Target::Postgres { .. }),
        })
    }

    /// Maps `n` parents through the API, 16 at a time (not measured).
    async fn seed_parents(self: &Arc<Self>, n: usize) -> Result<()> {
        let wl = Arc::clone(self);
        let stats = run_phase("seed parents", n, 16, self.timeout, move |_| {
            let wl = Arc::clone(&wl);
            async move {
                match wl.map_parent().await {
                    Ok(s) if s == StatusCode::CREATED => bench_api::load::Outcome::Ok,
                    Ok(s) => bench_api::load::Outcome::Err(format!("map-parent: HTTP {s}")),
                    Err(e) => bench_api::load::Outcome::Err(e),
                }
            }
        })
        .await?;
        if stats.errors > 0 {
            bail!("seeding parents failed: {}", stats.summary());
        }
        Ok(())
    }

    /// Request `i`, due at `at`; its latency is measured from `at`.
    async fn one(self: Arc<Self>, i: u64, at: Instant) -> Sample {
        let r = mix(self.seed.wrapping_mul(0x1000_0000_01B3) ^ i);
        let op = Op::pick(r);
        let answer = tokio::time::timeout_at((at + self.timeout).into(), async {
            let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
            self.send(op, r >> 8).await
        })
        .await;
        let answered = Instant::now();
        let class = match answer {
            Err(_) => Class::Timeout,
            Ok(Err(e)) => Class::Error(format!("{}: {e}", op.name())),
            Ok(Ok(s)) if s.is_success() => Class::Ok,
            Ok(Ok(s))
                if op == Op::MapChild
                    && (s == StatusCode::NOT_FOUND || s == StatusCode::CONFLICT) =>
            {
                Class::Refused
            }
            Ok(Ok(s)) => Class::Error(format!("{}: HTTP {s}", op.name())),
        };
        Sample {
            op,
            latency: answered.saturating_duration_since(at),
            answered,
            class,
        }
    }

    async fn send(&self, op: Op, r: u64) -> Result<StatusCode, String> {
        match op {
            Op::MapParent => self.map_parent().await,
            Op::MapChild => {
                let parent = pick(&self.parents, r, false).ok_or("no live parent")?;
                let id = self.new_id("c");
                let body = json!({ "externalId": id, "parentExternalId": parent });
                let status = self.api.status_of("/map-child", Some(&body)).await?;
                if status == StatusCode::CREATED {
                    lock(&self.known).push(id);
                }
                Ok(status)
            }
            Op::MapFixed => {
                let n = self.next_id.load(Ordering::Relaxed);
                let id = self.new_id("f");
                let body = json!({ "externalId": id, "userId": user_id(n) });
                let status = self.api.status_of("/map-fixed", Some(&body)).await?;
                if status == StatusCode::CREATED {
                    lock(&self.fixed).push(id.clone());
                    lock(&self.known).push(id);
                }
                Ok(status)
            }
            Op::Get => {
                let id = if self.filler > 0 && r.is_multiple_of(2) {
                    format!("filler-{}", (r >> 1) % self.filler as u64)
                } else {
                    pick(&self.known, r >> 1, false).ok_or("no session known")?
                };
                self.api.status_of(&format!("/{id}"), None).await
            }
            Op::ListByUser => {
                let path = format!("?userId=user-{}&limit=50", r % USERS);
                self.api.status_of(&path, None).await
            }
            Op::Destroy => {
                // PARENTs are made twice as often as FIXED sessions.
                let (first, second) = if r.is_multiple_of(3) {
                    (&self.fixed, &self.parents)
                } else {
                    (&self.parents, &self.fixed)
                };
                let id = pick(first, r >> 2, true)
                    .or_else(|| pick(second, r >> 2, true))
                    .ok_or("no live root")?;
                let body = json!({ "externalId": id });
                self.api.status_of("/destroy-parent", Some(&body)).await
            }
        }
    }

    async fn map_parent(&self) -> Result<StatusCode, String> {
        let n = self.next_id.load(Ordering::Relaxed);
        let id = self.new_id("p");
        let body = json!({
            "externalId": id,
            "keycloakSessionId": idp_session_id(n),
            "userId": user_id(n),
        });
        let status = self.api.status_of("/map-parent", Some(&body)).await?;
        if status == StatusCode::CREATED {
            lock(&self.parents).push(id.clone());
            lock(&self.known).push(id);
        }
        Ok(status)
    }

    fn new_id(&self, kind: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("mix-{kind}-{n:08}")
    }
}

/// A pseudo-random element of `list`, taken out of it when `remove`.
fn pick(list: &Mutex<Vec<String>>, r: u64, remove: bool) -> Option<String> {
    let mut list = lock(list);
    if list.is_empty() {
        return None;
    }
    // The modulus is below the length, so it fits in usize.
    let i = usize::try_from(r % list.len() as u64).unwrap_or(0);
    Some(if remove {
        list.swap_remove(i)
    } else {
        list[i].clone()
    })
}

/// Figures of one step (one offered rate).
struct Step {
    /// Offered requests/s.
    rate: f64,
    seconds: f64,
    scheduled: usize,
    /// 2xx and refused answers that arrived within the step's window.
    answered_in_window: usize,
    ok: usize,
    refused: usize,
    errors: usize,
    timeouts: usize,
    first_error: Option<String>,
    /// Errors by kind (`HTTP 429`, `timeout`, `transport`), to tell overload from failure.
    error_kinds: BTreeMap<String, usize>,
    /// Every request's latency (a timeout counts as the timeout), sorted.
    latencies: Vec<Duration>,
    by_op: BTreeMap<Op, Vec<Duration>>,
    /// Longest time the scheduler sent a request after it was due (client overload).
    send_lag: Duration,
    /// Who used the CPU over the window.
    cpu: CpuUse,
    rss_peak: Option<u64>,
    rss_end: Option<u64>,
}

impl Step {
    /// Answers per second within the window.
    fn achieved(&self) -> f64 {
        self.answered_in_window as f64 / self.seconds
    }

    fn percentile_ms(&self, q: f64) -> f64 {
        bench_api_percentile(&self.latencies, q)
    }

    fn summary(&self, label: &str) -> String {
        let mut line = format!(
            "{label}: {} requests, achieved {:.0}/s, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, \
             refused {}, errors {} ({} timeouts), CPU cores: server {}, client {}, \
             postgres {}, machine {} busy; RSS {}",
            self.scheduled,
            self.achieved(),
            self.percentile_ms(50.0),
            self.percentile_ms(90.0),
            self.percentile_ms(99.0),
            self.percentile_ms(100.0),
            self.refused,
            self.errors,
            self.timeouts,
            opt(self.cpu.server, 2),
            opt(self.cpu.client, 2),
            opt(self.cpu.postgres, 2),
            percent(self.cpu.machine_busy),
            mib(self.rss_end),
        );
        let ops: Vec<String> = self
            .by_op
            .iter()
            .map(|(op, l)| {
                format!(
                    "{} {:.1}/{:.1}",
                    op.name(),
                    bench_api_percentile(l, 50.0),
                    bench_api_percentile(l, 99.0)
                )
            })
            .collect();
        line.push_str(&format!("\n      p50/p99 ms by kind: {}", ops.join(", ")));
        if self.send_lag > Duration::from_millis(50) {
            line.push_str(&format!(
                "\n      the client sent up to {:.0} ms late (it could not keep the rate)",
                self.send_lag.as_secs_f64() * 1e3
            ));
        }
        if let Some(e) = &self.first_error {
            let kinds: Vec<String> = self
                .error_kinds
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            line.push_str(&format!("\n      errors: {}; first: {e}", kinds.join(", ")));
        } else if self.timeouts > 0 {
            line.push_str(&format!("\n      errors: {} timeout", self.timeouts));
        }
        line
    }
}

/// Nearest-rank percentile of sorted durations, in milliseconds (0 when empty).
fn bench_api_percentile(sorted: &[Duration], q: f64) -> f64 {
    crate::harness::percentile_ms(sorted, q).unwrap_or(0.0)
}

/// Offers `rate` requests/s for `seconds` (open loop), then waits for the last answers
/// (each bounded by the timeout). `seq` numbers requests across steps.
async fn run_step(
    wl: &Arc<Workload>,
    rate: f64,
    seconds: u64,
    pid: u32,
    seq: &mut u64,
) -> Result<Step> {
    // Truncation is intended: a whole number of requests.
    let n = (rate * seconds as f64).round() as u64;
    let rss_peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_rss(pid, Arc::clone(&rss_peak)));
    let cpu0 = CpuTicks::now(pid, wl.postgres);
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut tasks = JoinSet::new();
    let mut samples = Vec::new();
    let mut send_lag = Duration::ZERO;
    for k in 0..n {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        send_lag = send_lag.max(at.elapsed());
        tasks.spawn(Arc::clone(wl).one(*seq + k, at));
        while let Some(done) = tasks.try_join_next() {
            samples.push(done.context("a request task failed")?);
        }
    }
    *seq += n;
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = CpuTicks::now(pid, wl.postgres);
    let rss_end = rss_kib(pid);
    while let Some(done) = tasks.join_next().await {
        samples.push(done.context("a request task failed")?);
    }
    sampler.abort();
    let window = end - start;
    let cpu = cpu0.until(&cpu1, window);
    let peak = rss_peak.load(Ordering::Relaxed);
    let mut step = Step {
        rate,
        seconds: window.as_secs_f64(),
        scheduled: samples.len(),
        answered_in_window: 0,
        ok: 0,
        refused: 0,
        errors: 0,
        timeouts: 0,
        first_error: None,
        error_kinds: BTreeMap::new(),
        latencies: Vec::with_capacity(samples.len()),
        by_op: BTreeMap::new(),
        send_lag,
        cpu,
        rss_peak: (peak > 0).then_some(peak).max(rss_end),
        rss_end,
    };
    for s in samples {
        step.latencies.push(s.latency);
        step.by_op.entry(s.op).or_default().push(s.latency);
        let answered = match s.class {
            Class::Ok => {
                step.ok += 1;
                true
            }
            Class::Refused => {
                step.refused += 1;
                true
            }
            Class::Error(e) => {
                step.errors += 1;
                *step.error_kinds.entry(error_kind(&e)).or_default() += 1;
                step.first_error.get_or_insert(e);
                false
            }
            Class::Timeout => {
                step.errors += 1;
                step.timeouts += 1;
                *step.error_kinds.entry("timeout".to_owned()).or_default() += 1;
                false
            }
        };
        if answered && s.answered <= end {
            step.answered_in_window += 1;
        }
    }
    step.latencies.sort_unstable();
    for l in step.by_op.values_mut() {
        l.sort_unstable();
    }
    Ok(step)
}

/// The kind of an error message of [`Workload::one`]: its `HTTP <status>`, else `transport`.
fn error_kind(message: &str) -> String {
    message
        .find("HTTP ")
        .map(|i| message[i..].chars().take(8).collect())
        .unwrap_or_else(|| "transport".to_owned())
}

/// Keeps the highest VmRSS seen in `peak` until aborted.
async fn sample_rss(pid: u32, peak: Arc<AtomicU64>) {
    loop {
        if let Some(kib) = rss_kib(pid) {
            peak.fetch_max(kib, Ordering::Relaxed);
        }
        tokio::time::sleep(RSS_EVERY).await;
    }
}

/// CPU ticks of the processes a step involves, read at one moment.
struct CpuTicks {
    server: Option<u64>,
    client: Option<u64>,
    /// Every process named `postgres` (the PostgreSQL server and its backends), when the
    /// backend is PostgreSQL.
    postgres: Option<u64>,
    /// The machine's (busy, total).
    machine: Option<(u64, u64)>,
}

/// CPU used over a window: cores (1.0 = one core busy all the time) and the machine's busy
/// share.
struct CpuUse {
    server: Option<f64>,
    client: Option<f64>,
    postgres: Option<f64>,
    machine_busy: Option<f64>,
}

impl CpuTicks {
    fn now(server: u32, postgres: bool) -> CpuTicks {
        CpuTicks {
            server: process_ticks(server),
            client: process_ticks(std::process::id()),
            postgres: postgres.then(postgres_ticks).flatten(),
            machine: machine_ticks(),
        }
    }

    fn until(&self, later: &CpuTicks, window: Duration) -> CpuUse {
        let per_sec = clock_ticks() * window.as_secs_f64();
        let cores = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if per_sec > 0.0 => Some(b.saturating_sub(a) as f64 / per_sec),
            _ => None,
        };
        CpuUse {
            server: cores(self.server, later.server),
            client: cores(self.client, later.client),
            postgres: cores(self.postgres, later.postgres),
            machine_busy: match (self.machine, later.machine) {
                (Some((busy0, all0)), Some((busy1, all1))) if all1 > all0 => {
                    Some(busy1.saturating_sub(busy0) as f64 / (all1 - all0) as f64)
                }
                _ => None,
            },
        }
    }
}

/// CPU ticks of every process named `postgres`: backends that exit within a window take
/// their ticks with them, but the server's pooled connections live through the run.
fn postgres_ticks() -> Option<u64> {
    let total = procfs::pids()
        .into_iter()
        .filter_map(procfs::stat)
        .filter(|s| s.comm == "postgres")
        .map(|s| s.own)
        .sum();
    Some(total)
}

/// User + system CPU time of a process, in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    procfs::stat(pid).map(|s| s.own)
}

/// The machine's (busy, total) CPU ticks from `/proc/stat`; idle and iowait are not busy.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

/// Clock ticks per second, as `f64` for the rates.
fn clock_ticks() -> f64 {
    procfs::clock_ticks_per_sec() as f64
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn percent(share: Option<f64>) -> String {
    share.map_or("-".to_owned(), |s| format!("{:.0}%", s * 100.0))
}

fn bytes_mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn print_report(runs: &[BackendRun], args: &Args, command_line: &str, revision: &str) {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!();
    println!("== Mixed load curves");
    println!("command:   {command_line}");
    println!("revision:  {revision}");
    println!(
        "settings:  open loop, {} s per step, up to {} requests in flight, timeout {} s, \
         durability {}, seed {}; {cores} cores shared by client, server and database",
        args.step_seconds,
        args.concurrency,
        args.timeout_seconds,
        args.durability.as_str(),
        args.seed,
    );
    println!(
        "mix:       {}",
        Op::MIX
            .iter()
            .map(|(op, w)| format!("{w}% {}", op.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in runs {
        println!();
        println!("### {}", r.backend);
        println!();
        println!(
            "| offered req/s | achieved req/s | p50 ms | p90 ms | p99 ms | max ms | 404/409 | errors (timeouts) | CPU cores: server / client / postgres | machine busy | server RSS |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in &r.steps {
            println!(
                "| {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} ({}) | {} / {} / {} | {} | {} |",
                s.rate,
                s.achieved(),
                s.percentile_ms(50.0),
                s.percentile_ms(90.0),
                s.percentile_ms(99.0),
                s.percentile_ms(100.0),
                s.refused,
                s.errors,
                s.timeouts,
                opt(s.cpu.server, 2),
                opt(s.cpu.client, 2),
                opt(s.cpu.postgres, 2),
                percent(s.cpu.machine_busy),
                mib(s.rss_end),
            );
        }
        println!();
        println!(
            "server RSS a few seconds after start (empty database): {}",
            mib(r.rss_start)
        );
        println!(
            "peak server RSS during the steps: {}",
            mib(r.steps.iter().filter_map(|s| s.rss_peak).max())
        );
        if let Some(size) = &r.size_after_curves {
            println!("database after the steps: {}", size_line(size));
        }
        if let Some(m) = &r.memory {
            println!();
            println!("with {} rows in sessions:", m.rows);
            println!("  database on disk: {}", size_line(&m.size));
            println!("  server RSS idle (3 s after start): {}", mib(m.rss_idle));
            println!(
                "  server RSS under load ({} req/s offered for {:.0} s): peak {}, at the end {}",
                m.load.rate,
                m.load.seconds,
                mib(m.load.rss_peak),
                mib(m.load.rss_end)
            );
            println!("  {}", m.load.summary("load"));
        }
        for note in &r.notes {
            println!("note: {note}");
        }
        if let Some(f) = &r.failure {
            println!("ABORTED: {f}");
        }
    }
}

fn size_line(size: &DbSize) -> String {
    match size.sessions {
        Some(s) => format!(
            "{} ({} of it sessions with its indexes)",
            bytes_mib(size.total),
            bytes_mib(s)
        ),
        None => bytes_mib(size.total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_adds_up_to_70_map_20_query_10_destroy() {
        let mut counts: BTreeMap<Op, u64> = BTreeMap::new();
        for i in 0..100_000 {
            *counts.entry(Op::pick(mix(i))).or_default() += 1;
        }
        let share = |ops: &[Op]| -> f64 {
            ops.iter()
                .map(|op| counts.get(op).copied().unwrap_or(0))
                .sum::<u64>() as f64
                / 1000.0
        };
        let map = share(&[Op::MapParent, Op::MapChild, Op::MapFixed]);
        let query = share(&[Op::Get, Op::ListByUser]);
        let destroy = share(&[Op::Destroy]);
        assert!((map - 70.0).abs() < 1.0, "map {map}%");
        assert!((query - 20.0).abs() < 1.0, "query {query}%");
        assert!((destroy - 10.0).abs() < 1.0, "destroy {destroy}%");
    }

    #[test]
    fn a_picked_root_is_taken_out_of_the_pool() {
        let pool = Mutex::new(vec!["a".to_owned(), "b".to_owned()]);
        let first = pick(&pool, 7, true).unwrap();
        let second = pick(&pool, 7, true).unwrap();
        assert_ne!(first, second);
        assert!(pick(&pool, 7, true).is_none());
    }

    #[test]
    fn errors_are_grouped_by_status() {
        assert_eq!(
            error_kind("map-child: HTTP 429 Too Many Requests"),
            "HTTP 429"
        );
        assert_eq!(error_kind("get: error sending request"), "transport");
    }

    #[test]
    fn proc_readers_see_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(process_ticks(pid).is_some());
        let (busy, total) = machine_ticks().unwrap();
        assert!(busy <= total);
    }
}
