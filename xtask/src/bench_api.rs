//! `cargo xtask bench-api`: load-tests the external-sessions API of a release build of
//! `lockstep serve`, once per backend, and sets the figures beside what the database itself
//! can do with the same writes (`ceiling.rs`) and the CPU each process spends per request
//! (`cpu.rs`). Phases per backend:
//!
//! 1. ceilings: a map-parent's rows (session, outbox event, audit record) written without
//!    the server, one request per transaction and (SQLite) a group per transaction, on a
//!    database set up by `lockstep migrate`; then the same with each `sessions` index dropped;
//! 2. API load: map-parent, map-child, get, destroy-parent (each parent with its children);
//! 3. cascade: destroy-parent of the root of 1,000-session trees, median of several;
//! 4. the same cascade after growing `sessions` to 1,000,000 rows, then a short rerun of the
//!    load phases (unless `--skip-1m`).
//!
//! Each backend gets a fresh store (a temp dir for SQLite, a new database for PostgreSQL), so
//! runs never see each other's rows.

mod ceiling;
pub(crate) mod cpu;
pub(crate) mod db;
pub(crate) mod load;
pub(crate) mod report;
pub(crate) mod server;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use ceiling::{CeilingDb, Ceilings};
use cpu::Meter;
use db::Target;
use load::{Api, Outcome, PhaseStats, run_phase};
use server::Server;

use crate::harness;

const TOKEN: &str = "bench-token";
const REALM: &str = "bench";
/// Sessions per level of a cascade tree: 1 + 10 + 100 + 889 = 1000.
const TREE_LEVELS: [usize; 4] = [1, 10, 100, 889];

/// Options of `cargo xtask bench-api`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// PostgreSQL server to benchmark as well; a fresh database is created on it for the run
    /// and dropped afterwards. Without it only SQLite is measured.
    #[arg(long, env = "LOCKSTEP_TEST_DATABASE_URL")]
    postgres_url: Option<String>,
    /// Commit durability given to the server (`--durability`) and used by the SQLite
    /// ceilings: `fsync` (synchronous=FULL) or `normal` (synchronous=NORMAL). One value per
    /// run; run twice to compare.
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    /// Concurrent client tasks (each with its own keep-alive connection), as many as a
    /// `wrk -c32` run keeps open.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Operations in the map-parent and map-child phases (destroy-parent does half as many);
    /// also the requests of each ceiling run.
    #[arg(long, default_value_t = 20_000)]
    ops: usize,
    /// Clients of the PostgreSQL ceiling (default: --concurrency).
    #[arg(long)]
    ceiling_clients: Option<usize>,
    /// Requests per transaction of the SQLite group-commit ceiling.
    #[arg(long, default_value_t = 64)]
    group: usize,
    /// Measure what each index of `sessions` costs a map-parent (`--index-costs=false`
    /// skips it; it takes about 30 s per backend).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    index_costs: bool,
    /// pgbench, which runs the PostgreSQL ceiling; when it cannot be started an sqlx loop
    /// does the same transactions.
    #[arg(long, default_value = "pgbench")]
    pgbench: PathBuf,
    /// Upper bound on any single phase, in seconds; a phase cut short says so.
    #[arg(long, default_value_t = 120)]
    seconds_cap: u64,
    /// Cascade trees per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    trees: usize,
    /// Rows the sessions table is grown to before the cascade and load are measured again.
    #[arg(long, default_value_t = 1_000_000)]
    grow_to: i64,
    /// Realm of the filler rows. The default keeps them out of the benchmark realm, as most
    /// of a big table would be; `bench` puts them in the realm the cascades run in.
    #[arg(long, default_value = "filler")]
    filler_realm: String,
    /// Skip growing the table and the cascade and load reruns on it.
    #[arg(long)]
    skip_1m: bool,
    /// Skip SQLite (benchmark PostgreSQL only).
    #[arg(long)]
    skip_sqlite: bool,
    /// Server binary to run instead of building `target/release/lockstep` first.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Keep the temp directories and the PostgreSQL database (their paths are printed).
    #[arg(long)]
    keep: bool,
}

/// Commit durability, as `lockstep serve --durability` takes it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Normal,
    Fsync,
}

impl Durability {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Durability::Normal => "normal",
            Durability::Fsync => "fsync",
        }
    }
}

/// Everything measured on one backend.
pub struct BackendReport {
    pub backend: &'static str,
    pub ceiling: Option<Ceilings>,
    /// Why the ceilings are missing, when they failed (the API phases still run).
    pub ceiling_error: Option<String>,
    pub phases: Vec<PhaseStats>,
    pub cascades: Vec<CascadeResult>,
    /// Unclean server exits and other oddities worth reporting.
    pub notes: Vec<String>,
    /// Set when the run on this backend was aborted.
    pub failure: Option<String>,
}

impl BackendReport {
    fn new(backend: &'static str) -> Self {
        BackendReport {
            backend,
            ceiling: None,
            ceiling_error: None,
            phases: Vec::new(),
            cascades: Vec::new(),
            notes: Vec::new(),
            failure: None,
        }
    }

    /// Errors in ceilings, API phases, cascade builds and destroys.
    pub fn errors(&self) -> usize {
        let ceilings = self
            .ceiling
            .iter()
            .flat_map(|c| std::iter::once(&c.single).chain(&c.group));
        self.phases
            .iter()
            .chain(ceilings)
            .map(|p| p.errors)
            .sum::<usize>()
            + self
                .cascades
                .iter()
                .map(|c| c.build.errors + c.destroy_errors.len())
                .sum::<usize>()
    }
}

/// Destroy-parent of tree roots at one table size.
pub struct CascadeResult {
    pub label: String,
    /// Rows in `sessions` before the trees were built.
    pub table_rows: i64,
    /// All map calls that built the trees.
    pub build: PhaseStats,
    /// Wall time of each root's destroy-parent call.
    pub times: Vec<Duration>,
    pub destroy_errors: Vec<String>,
}

impl CascadeResult {
    pub fn median_ms(&self) -> f64 {
        let mut ms: Vec<f64> = self.times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        match ms.len() {
            0 => 0.0,
            n if n % 2 == 1 => ms[n / 2],
            n => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
        }
    }
}

/// Runs a benchmark on a fresh multi-threaded Tokio runtime.
pub(crate) fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the Tokio runtime")?
        .block_on(f)
}

/// Runs `f` until it ends or Ctrl-C (dropping it stops the servers it started).
pub(crate) async fn until_interrupted<T>(
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = f => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

/// The server binary: `--server-bin` if given, else a fresh release build.
pub(crate) fn server_bin(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(bin) => Ok(bin.to_owned()),
        None => build_server(),
    }
}

/// The built webhook component the connector benchmarks load.
pub(crate) fn webhook_component(root: &Path) -> Result<PathBuf> {
    let wasm = crate::target_dir(root).join("wasm32-wasip2/connector/webhook.wasm");
    if !wasm.is_file() {
        bail!(
            "{} is missing; build it with `cargo xtask build-connectors`",
            wasm.display()
        );
    }
    Ok(wasm)
}

/// Entry point: runs the benchmark on a Tokio runtime; Ctrl-C stops the servers and cleans up.
pub fn main(args: Args) -> Result<ExitCode> {
    block_on(async {
        let pg_db = harness::scratch_db_name("lockstep_bench");
        let outcome = until_interrupted(run(&args, &pg_db)).await;
        // Dropping `run` killed the servers; the scratch databases need an explicit drop.
        if let (Some(url), false) = (&args.postgres_url, args.keep) {
            let names = [pg_db.clone(), ceiling_db_name(&pg_db)];
            harness::drop_scratch_databases(url, &names).await;
        }
        outcome
    })
}

/// The PostgreSQL ceilings' own database, beside the API's.
fn ceiling_db_name(pg_db: &str) -> String {
    format!("{pg_db}_ceiling")
}

async fn run(args: &Args, pg_db: &str) -> Result<ExitCode> {
    if args.concurrency == 0 || args.ops == 0 || args.group == 0 {
        bail!("--concurrency, --ops and --group must be positive");
    }
    if args.ceiling_clients == Some(0) {
        bail!("--ceiling-clients must be positive");
    }
    let command_line = command_line();
    let bin = server_bin(args.server_bin.as_deref())?;
    let mut reports = Vec::new();
    if !args.skip_sqlite {
        let dir = harness::temp_dir("lockstep-bench-")?;
        let target = Target::Sqlite {
            path: dir.path().join("bench.db"),
        };
        let ceiling = CeilingDb::Sqlite {
            template: dir.path().join("ceiling-template.db"),
        };
        reports.push(bench_backend(args, &bin, &target, &ceiling, dir.path()).await);
        if args.keep {
            eprintln!("kept {}", dir.keep().display());
        }
    }
    if let Some(admin_url) = &args.postgres_url {
        let dir = harness::temp_dir("lockstep-bench-pg-")?;
        let created = async {
            let url = db::create_pg_database(admin_url, pg_db).await?;
            let ceiling = db::create_pg_database(admin_url, &ceiling_db_name(pg_db)).await?;
            anyhow::Ok((url, ceiling))
        };
        let report = match created.await {
            Ok((url, ceiling)) => {
                let ceiling = CeilingDb::Postgres { url: ceiling };
                bench_backend(args, &bin, &Target::Postgres { url }, &ceiling, dir.path()).await
            }
            Err(e) => {
                let mut r = BackendReport::new("postgres");
                r.failure = Some(format!("{e:#}"));
                r
            }
        };
        reports.push(report);
        if args.keep {
            eprintln!("kept {} and database {pg_db}", dir.keep().display());
        }
    }
    if reports.is_empty() {
        bail!("nothing to benchmark: --skip-sqlite without --postgres-url");
    }
    report::print(&reports, args, &command_line, &revision());
    let failed = reports
        .iter()
        .any(|r| r.failure.is_some() || r.ceiling_error.is_some() || r.errors() > 0);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs every phase on one backend; a failure ends this backend's run but keeps its figures.
async fn bench_backend(
    args: &Args,
    bin: &Path,
    target: &Target,
    ceiling: &CeilingDb,
    dir: &Path,
) -> BackendReport {
    let mut report = BackendReport::new(target.name());
    report.failure = harness::run_backend(
        target.name(),
        dir,
        bench_backend_inner(args, bin, target, ceiling, dir, &mut report),
    )
    .await;
    report
}

async fn bench_backend_inner(
    args: &Args,
    bin: &Path,
    target: &Target,
    ceiling: &CeilingDb,
    dir: &Path,
    report: &mut BackendReport,
) -> Result<()> {
    let name = target.name();
    let cap = Duration::from_secs(args.seconds_cap);
    let log = dir.join("server.log");

    // The ceilings run first, with no server competing for the two cores. Their failure
    // leaves the API figures worth having.
    match ceilings(args, bin, ceiling, dir, name).await {
        Ok(c) => report.ceiling = Some(c),
        Err(e) => {
            eprintln!("  [{name}] ceilings failed: {e:#}");
            report.ceiling_error = Some(format!("{e:#}"));
        }
    }

    let postmaster = match target {
        Target::Postgres { url } => db::postmaster_pid(url).await,
        Target::Sqlite { .. } => None,
    };
    let server = start_server(bin, target, args.durability, &log).await?;
    let meter = Meter::new(server.pid(), postmaster);
    let api = Arc::new(Api::new(server.addr, REALM, TOKEN, args.concurrency, cap)?);
    eprintln!(
        "  [{name}] server on {} (log {})",
        server.addr,
        log.display()
    );

    load_phases(report, &api, &meter, args, "load", args.ops, "").await?;

    let rows = db::count_sessions(target).await?;
    let base = cascade(&api, args, "base", rows).await?;
    eprintln!("  [{name}] {}", cascade_summary(&base));
    report.cascades.push(base);
    if let Some(note) = server.stop().await? {
        report.notes.push(note);
    }

    if !args.skip_1m {
        db::fill_sessions(target, args.grow_to, &args.filler_realm).await?;
        let rows = db::count_sessions(target).await?;
        let server = start_server(bin, target, args.durability, &log).await?;
        let meter = Meter::new(server.pid(), postmaster);
        let api = Arc::new(Api::new(
            server.addr,
            REALM,
            TOKEN,
            args.concurrency,
            Duration::from_secs(args.seconds_cap),
        )?);
        let grown = cascade(&api, args, "grown", rows).await?;
        eprintln!("  [{name}] {}", cascade_summary(&grown));
        report.cascades.push(grown);
        // A short rerun of the load phases shows what the table size does to single calls.
        let n = (args.ops / 20).max(1);
        load_phases(report, &api, &meter, args, "grown", n, " (grown)").await?;
        if let Some(note) = server.stop().await? {
            report.notes.push(note);
        }
    }
    Ok(())
}

/// Has the server binary migrate the ceiling database (`lockstep migrate`, so its schema and
/// indexes are the server's own, whatever the revision), then runs the ceilings on it.
async fn ceilings(
    args: &Args,
    bin: &Path,
    db: &CeilingDb,
    dir: &Path,
    name: &str,
) -> Result<Ceilings> {
    const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
    let log = dir.join("ceiling-migrate.log");
    let out = server::open_log(&log)?;
    let err = out.try_clone().context("duplicating the log handle")?;
    let status = tokio::time::timeout(
        MIGRATE_TIMEOUT,
        tokio::process::Command::new(bin)
            .args(["migrate", "--database-url"])
            .arg(db.server_url())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .status(),
    )
    .await
    .map_err(|_| anyhow!("`lockstep migrate` ran longer than {MIGRATE_TIMEOUT:?}"))?
    .context("running lockstep migrate")?;
    if !status.success() {
        bail!(
            "lockstep migrate failed ({status}); log {}:\n{}",
            log.display(),
            server::tail(&log)
        );
    }
    let settings = ceiling::Settings {
        durability: args.durability,
        clients: args.ceiling_clients.unwrap_or(args.concurrency),
        ops: args.ops,
        group: args.group,
        cap: Duration::from_secs(args.seconds_cap),
        index_costs: args.index_costs,
        pgbench: &args.pgbench,
        dir,
    };
    ceiling::run(db, &settings, name).await
}

/// map-parent, map-child (one child under each parent), get, and destroy-parent of half the
/// parents, `n` operations each; ids start with `prefix`, phase names end with `suffix`.
async fn load_phases(
    report: &mut BackendReport,
    api: &Arc<Api>,
    meter: &Meter,
    args: &Args,
    prefix: &'static str,
    n: usize,
    suffix: &str,
) -> Result<()> {
    let a = Arc::clone(api);
    let parents = phase(
        report,
        meter,
        &format!("map-parent{suffix}"),
        n,
        args,
        move |i| {
            let a = Arc::clone(&a);
            async move {
                a.map_parent(&parent_id(prefix, i), &idp_session_id(i), &user_id(i))
                    .await
            }
        },
    )
    .await?
    .max(1);

    let a = Arc::clone(api);
    let children = phase(
        report,
        meter,
        &format!("map-child{suffix}"),
        n,
        args,
        move |i| {
            let a = Arc::clone(&a);
            async move {
                a.map_child(&child_id(prefix, i), &parent_id(prefix, i % parents))
                    .await
            }
        },
    )
    .await?;

    let a = Arc::clone(api);
    phase(report, meter, &format!("get{suffix}"), n, args, move |i| {
        let a = Arc::clone(&a);
        async move { a.get(&parent_id(prefix, i % parents)).await }
    })
    .await?;

    let a = Arc::clone(api);
    let destroys = (n / 2).min(parents);
    phase(
        report,
        meter,
        &format!("destroy-parent{suffix}"),
        destroys,
        args,
        move |i| {
            let a = Arc::clone(&a);
            // Child j was mapped under parent j % parents.
            let expect = 1 + children / parents + usize::from(i < children % parents);
            async move { a.destroy_parent(&parent_id(prefix, i), expect).await }
        },
    )
    .await?;
    Ok(())
}

async fn start_server(
    bin: &Path,
    target: &Target,
    durability: Durability,
    log: &Path,
) -> Result<Server> {
    Server::start(
        bin,
        &target.server_url(),
        durability.as_str(),
        TOKEN,
        &[],
        log,
    )
    .await
}

/// Runs one API phase with the CPU it costs, records it, and returns how many operations it
/// got through.
async fn phase<F, Fut>(
    report: &mut BackendReport,
    meter: &Meter,
    name: &str,
    total: usize,
    args: &Args,
    op: F,
) -> Result<usize>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let cap = Duration::from_secs(args.seconds_cap);
    let before = meter.sample();
    let mut stats = run_phase(name, total, args.concurrency, cap, op).await?;
    stats.cpu = Some(meter.since(&before));
    eprintln!("  [{}] {}", report.backend, stats.summary());
    let done = stats.ops;
    report.phases.push(stats);
    Ok(done)
}

/// Builds `args.trees` trees of 1,000 sessions through the API (level by level, concurrently
/// within a level) and times destroy-parent of each root on its own.
async fn cascade(
    api: &Arc<Api>,
    args: &Args,
    label: &str,
    table_rows: i64,
) -> Result<CascadeResult> {
    let cap = Duration::from_secs(args.seconds_cap);
    let tree_size: usize = TREE_LEVELS.iter().sum();
    let mut result = CascadeResult {
        label: label.to_owned(),
        table_rows,
        build: PhaseStats::named(&format!("cascade build ({label})")),
        times: Vec::new(),
        destroy_errors: Vec::new(),
    };
    for t in 0..args.trees {
        let prefix = format!("tree-{label}-{t}");
        for (level, &width) in TREE_LEVELS.iter().enumerate() {
            let a = Arc::clone(api);
            let p = prefix.clone();
            let stats = run_phase("tree level", width, args.concurrency, cap, move |j| {
                let a = Arc::clone(&a);
                let p = p.clone();
                async move {
                    if level == 0 {
                        a.map_parent(&tree_node(&p, 0, j), &idp_session_id(j), &user_id(j))
                            .await
                    } else {
                        let parent = tree_node(&p, level - 1, j % TREE_LEVELS[level - 1]);
                        a.map_child(&tree_node(&p, level, j), &parent).await
                    }
                }
            })
            .await?;
            result.build.absorb(&stats);
        }
        let began = Instant::now();
        let outcome = api
            .destroy_parent(&tree_node(&prefix, 0, 0), tree_size)
            .await;
        let took = began.elapsed();
        match outcome {
            Outcome::Ok => result.times.push(took),
            Outcome::Warn(w) => {
                result.times.push(took);
                result.build.warnings += 1;
                result.build.first_warning.get_or_insert(w);
            }
            Outcome::Err(e) => result.destroy_errors.push(e),
        }
    }
    Ok(result)
}

fn cascade_summary(c: &CascadeResult) -> String {
    let mut line = format!(
        "cascade ({}, {} rows): destroy-parent of a {}-session tree, median {:.2} ms over {}; build errors {}, destroy errors {}",
        c.label,
        c.table_rows,
        TREE_LEVELS.iter().sum::<usize>(),
        c.median_ms(),
        c.times.len(),
        c.build.errors,
        c.destroy_errors.len()
    );
    if let Some(e) = &c.build.first_error {
        line.push_str(&format!("\n      first build error: {e}"));
    }
    if let Some(e) = c.destroy_errors.first() {
        line.push_str(&format!("\n      first destroy error: {e}"));
    }
    line
}

pub(crate) fn parent_id(prefix: &str, i: usize) -> String {
    format!("{prefix}-parent-{i:08}")
}

fn child_id(prefix: &str, i: usize) -> String {
    format!("{prefix}-child-{i:08}")
}

fn tree_node(prefix: &str, level: usize, j: usize) -> String {
    format!("{prefix}-l{level}-{j:04}")
}

/// A Keycloak-session-id-sized value.
pub(crate) fn idp_session_id(i: usize) -> String {
    format!("kc-{i:032}")
}

pub(crate) fn user_id(i: usize) -> String {
    format!("user-{}", i % 10_000)
}

/// `cargo build --release -p lockstep`; returns the binary's path.
pub(crate) fn build_server() -> Result<PathBuf> {
    let root = crate::workspace_root()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building: cargo build --release -p lockstep");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "lockstep"])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p lockstep failed: {status}");
    }
    let bin = crate::target_dir(&root).join("release").join("lockstep");
    if !bin.is_file() {
        bail!("{} is missing after the build", bin.display());
    }
    Ok(bin)
}

/// `git rev-parse --short HEAD`, marked when the work tree has uncommitted changes.
pub(crate) fn revision() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match (
        git(&["rev-parse", "--short", "HEAD"]),
        git(&["status", "--porcelain"]),
    ) {
        (Some(rev), Some(status)) if status.is_empty() => rev,
        (Some(rev), Some(_)) => format!("{rev} + uncommitted changes"),
        _ => "unknown".to_owned(),
    }
}

/// The command as typed, for the report (`cargo xtask ...`).
pub(crate) fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a
            }
        })
        .collect();
    format!("cargo xtask {}", args.join(" "))
}
