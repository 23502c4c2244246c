//! Write ceilings: the rows the server writes for one map-parent (a PARENT in `sessions`,
//! its `login` event in `outbox`, its record in `audit`), written without the server, on a
//! database the server binary migrated (`lockstep migrate`), so every index is the server's.
//! The API's rate divided by these says how much of the gap is the database and how much the
//! server.
//!
//! - SQLite: one thread, one rusqlite connection with the writer's pragmas and cached
//!   statements; one request per transaction, then [`Settings::group`] per transaction,
//!   each under its own savepoint as the server's group commit does.
//! - PostgreSQL: `pgbench -M prepared` with a script doing the same inserts, one request per
//!   transaction from N clients; an sqlx loop when pgbench cannot be run.
//!
//! The index-cost table reruns the one-request loop with each index of `sessions` dropped
//! in turn, to show what each costs a map-parent.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, OptionalExtension, params};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection as _, Executor};

use super::cpu::{CpuUse, Meter, thread_cpu};
use super::load::{Outcome, PhaseStats, run_phase};
use super::{Durability, REALM, db, idp_session_id, parent_id, user_id};

/// What the server writes for a map-parent by the bootstrap token: `system`,
/// `originSystem` and the audit actor all default to the caller's name.
const CALLER: &str = "admin";

/// Interleaved rounds of the index-cost runs (the median is reported): drift on a shared
/// machine then hits every variant alike.
const INDEX_ROUNDS: usize = 5;
/// Bound on each index-cost run, so the table stays well under a minute.
const INDEX_RUN_SECONDS: f64 = 0.6;
/// Most requests in one index-cost run.
const INDEX_RUN_OPS: usize = 20_000;

/// The session insert, as `store/sqlite/write.rs` and `store/ops.rs` issue it, returning
/// only the id (the server decodes the whole row; that is server work, not database work).
const INSERT_SESSION: &str = "INSERT INTO sessions (realm, external_id, kind, parent_id, \
     idp_session_id, idp_client_session_id, user_id, system, delegated_by, status, end_reason, \
     attributes, expires_at, created_at, updated_at) \
     VALUES ($1, $2, 'PARENT', NULL, $3, NULL, $4, $5, NULL, 'ACTIVE', NULL, '{}', NULL, $6, $6) \
     ON CONFLICT (realm, external_id) DO NOTHING RETURNING id";
const INSERT_OUTBOX: &str = "INSERT INTO outbox (event_id, realm, event_type, external_id, \
     origin_system, payload, created_at) VALUES ($1, $2, 'login', $3, $4, $5, $6)";
const INSERT_AUDIT: &str = "INSERT INTO audit (at_ms, realm, actor, action, target, result, \
     changed, detail) VALUES ($1, $2, $3, 'map-parent', $4, 'ok', 1, NULL)";

/// Where a ceiling runs.
pub enum CeilingDb {
    /// A file `lockstep migrate` created; every run works on a fresh copy of it.
    Sqlite { template: PathBuf },
    /// A database of its own that `lockstep migrate` set up; emptied before every run.
    Postgres { url: String },
}

impl CeilingDb {
    /// Its `--database-url`, for `lockstep migrate`.
    pub fn server_url(&self) -> String {
        match self {
            CeilingDb::Sqlite { template } => format!("sqlite://{}", template.display()),
            CeilingDb::Postgres { url } => url.clone(),
        }
    }
}

/// Options of the ceiling runs.
pub struct Settings<'a> {
    pub durability: Durability,
    /// PostgreSQL clients.
    pub clients: usize,
    /// Requests in each main ceiling run.
    pub ops: usize,
    /// Requests per transaction of the SQLite group ceiling.
    pub group: usize,
    pub cap: Duration,
    pub index_costs: bool,
    pub pgbench: &'a Path,
    /// Scratch space (pgbench scripts and logs, SQLite copies).
    pub dir: &'a Path,
}

/// Every ceiling figure of one backend.
pub struct Ceilings {
    /// One request per transaction.
    pub single: PhaseStats,
    /// [`Settings::group`] requests per transaction (SQLite).
    pub group: Option<PhaseStats>,
    /// How the single-request ceiling was run.
    pub how: String,
    /// Size of the outbox payload written per request.
    pub payload_bytes: usize,
    pub index_costs: Option<IndexCosts>,
}

/// The one-request loop with each `sessions` index dropped in turn.
pub struct IndexCosts {
    pub how: String,
    /// Whose CPU [`Run::cpu_us`] counts.
    pub cpu_of: &'static str,
    /// Unit of [`Variant::wal`].
    pub wal_unit: &'static str,
    /// Every index in place.
    pub baseline: Variant,
    /// Each index dropped in turn.
    pub without: Vec<Variant>,
}

/// The runs of one set of indexes.
pub struct Variant {
    /// The index dropped; empty for the baseline.
    pub name: String,
    /// Its columns and predicate, for the report.
    pub definition: String,
    /// One per round.
    pub runs: Vec<Run>,
    /// WAL written per request. Unlike the times, the machine's other load does not move
    /// it: an index a map-parent never touches (a partial index whose predicate its row
    /// fails) adds nothing.
    pub wal: Option<f64>,
}

impl Variant {
    fn new(name: &str, definition: &str) -> Self {
        Variant {
            name: name.to_owned(),
            definition: definition.to_owned(),
            runs: Vec::new(),
            wal: None,
        }
    }
}

/// One index-cost run: wall-clock rate, and CPU per request, which other load on the
/// machine disturbs less.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub rate: f64,
    pub cpu_us: Option<f64>,
}

impl Run {
    fn of(stats: &PhaseStats, cpu: impl Fn(&CpuUse) -> Option<Duration>) -> Self {
        Run {
            rate: stats.requests_per_sec(),
            cpu_us: stats.cpu_us_per_request(cpu),
        }
    }
}

/// The order of round `round` over `n` variants (0 = every index): rotated, so that no
/// variant always runs first, right after a file copy or a checkpoint of the one before.
fn round_order(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + round) % n)
}

/// The progress line once a backend's index-cost rounds are done (SQLite and PostgreSQL alike).
fn print_index_rounds(name: &str, variants: &[Variant], started: Instant) {
    eprintln!(
        "  [{name}] index costs: {} indexes × {INDEX_ROUNDS} rounds in {:.1} s",
        variants.len() - 1,
        started.elapsed().as_secs_f64()
    );
}

/// Splits the measured variants (baseline first) into an [`IndexCosts`].
fn index_costs(
    mut variants: Vec<Variant>,
    how: String,
    cpu_of: &'static str,
    wal_unit: &'static str,
) -> Result<IndexCosts> {
    if variants.is_empty() {
        bail!("no index-cost variants");
    }
    let baseline = variants.remove(0);
    Ok(IndexCosts {
        how,
        cpu_of,
        wal_unit,
        baseline,
        without: variants,
    })
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `login` event's JSON as `SyncEvent` serialises it for such a PARENT.
fn event_payload(event_id: &str, external_id: &str, idp: &str, user: &str, now: i64) -> String {
    let occurred_at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now);
    serde_json::json!({
        "eventId": event_id,
        "type": "login",
        "realm": REALM,
        "externalId": external_id,
        "kind": "PARENT",
        "idpSessionId": idp,
        "idpClientSessionId": null,
        "userId": user,
        "system": CALLER,
        "originSystem": CALLER,
        "endReason": null,
        "attributes": {},
        "occurredAt": occurred_at,
    })
    .to_string()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs every ceiling of one backend; `lockstep migrate` must already have run on `db`.
pub async fn run(db: &CeilingDb, s: &Settings<'_>, name: &str) -> Result<Ceilings> {
    match db {
        CeilingDb::Sqlite { template } => sqlite(template, s, name).await,
        CeilingDb::Postgres { url } => postgres(url, s, name).await,
    }
}

// ---- SQLite ---------------------------------------------------------------------------

/// Opens `path` as the server's writer does (`store/sqlite/writer.rs`): WAL, the same
/// synchronous level, foreign keys, temp store and page cache.
fn sqlite_open(path: &Path, durability: Durability) -> Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Fsync => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
         PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -16000;"
    ))
    .context("setting the writer's pragmas")?;
    Ok(conn)
}

/// A fresh copy of the migrated template, without `drop_index` if given.
fn sqlite_copy(template: &Path, run: &Path, drop_index: Option<&str>) -> Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = run.as_os_str().to_owned();
        file.push(suffix);
        let file = PathBuf::from(file);
        if file.exists() {
            std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        }
    }
    std::fs::copy(template, run)
        .with_context(|| format!("copying {} to {}", template.display(), run.display()))?;
    if let Some(index) = drop_index {
        let conn = Connection::open(run)?;
        conn.execute_batch(&format!("DROP INDEX \"{index}\""))
            .with_context(|| format!("dropping {index}"))?;
    }
    Ok(())
}

/// One request's three inserts on the writer's connection.
fn sqlite_request(conn: &Connection, sql: &SqliteSql, i: usize, now: i64) -> Result<()> {
    let external_id = parent_id("ceil", i);
    let idp = idp_session_id(i);
    let user = user_id(i);
    let id: Option<i64> = conn
        .prepare_cached(&sql.session)?
        .query_row(params![REALM, external_id, idp, user, CALLER, now], |r| {
            r.get(0)
        })
        .optional()?;
    if id.is_none() {
        bail!("{external_id} already exists");
    }
    let event_id = uuid::Uuid::now_v7().to_string();
    let payload = event_payload(&event_id, &external_id, &idp, &user, now);
    conn.prepare_cached(&sql.outbox)?.execute(params![
        event_id,
        REALM,
        external_id,
        CALLER,
        payload,
        now
    ])?;
    conn.prepare_cached(&sql.audit)?
        .execute(params![now, REALM, CALLER, external_id])?;
    Ok(())
}

/// The statements with SQLite's `?N` placeholders (`$N` would be numbered by first use).
struct SqliteSql {
    session: String,
    outbox: String,
    audit: String,
}

impl SqliteSql {
    fn new() -> Self {
        SqliteSql {
            session: INSERT_SESSION.replace('$', "?"),
            outbox: INSERT_OUTBOX.replace('$', "?"),
            audit: INSERT_AUDIT.replace('$', "?"),
        }
    }
}

/// Requests `t * group ..` in one transaction: savepoints around each when `group > 1`, as
/// in the server's group commit.
fn sqlite_tx(conn: &Connection, sql: &SqliteSql, t: usize, group: usize) -> Result<()> {
    let now = now_ms();
    let result = (|| -> Result<()> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        for k in 0..group {
            let i = t * group + k;
            if group > 1 {
                conn.prepare_cached("SAVEPOINT op")?.execute([])?;
                sqlite_request(conn, sql, i, now)?;
                conn.prepare_cached("RELEASE op")?.execute([])?;
            } else {
                sqlite_request(conn, sql, i, now)?;
            }
        }
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(())
    })();
    if result.is_err() {
        // Leaves the connection usable for the next transaction.
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// `total` requests, `group` per transaction, on one thread, until done or `cap`.
fn sqlite_loop(
    file: &Path,
    durability: Durability,
    name: &str,
    total: usize,
    group: usize,
    cap: Duration,
) -> Result<PhaseStats> {
    let conn = sqlite_open(file, durability)?;
    let sql = SqliteSql::new();
    let transactions = total.div_ceil(group);
    let mut stats = PhaseStats::named(name);
    stats.requests_per_op = group;
    stats.planned = transactions;
    // This thread does all the work, so its own CPU time is the loop's.
    let before = thread_cpu();
    let start = Instant::now();
    for t in 0..transactions {
        if start.elapsed() >= cap {
            break;
        }
        let began = Instant::now();
        let outcome = match sqlite_tx(&conn, &sql, t, group) {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Err(format!("{e:#}")),
        };
        stats.record(began.elapsed(), outcome);
    }
    stats.elapsed = start.elapsed();
    stats.finish();
    stats.cpu = Some(CpuUse {
        harness: thread_cpu()
            .zip(before)
            .map(|(after, before)| after - before),
        ..CpuUse::default()
    });
    Ok(stats)
}

/// WAL pages a request writes: with automatic checkpoints off, the WAL keeps one frame for
/// every page each commit wrote.
fn sqlite_wal_pages(file: &Path, n: usize) -> Result<f64> {
    let conn = sqlite_open(file, Durability::Normal)?;
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
    let sql = SqliteSql::new();
    for t in 0..n {
        sqlite_tx(&conn, &sql, t, 1)?;
    }
    let page: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let mut wal = file.as_os_str().to_owned();
    wal.push("-wal");
    let len = std::fs::metadata(&wal)
        .with_context(|| format!("reading the size of {}", PathBuf::from(&wal).display()))?
        .len();
    // A 32-byte file header, then a 24-byte header before each page.
    let frames = len.saturating_sub(32) / (page + 24);
    Ok(frames as f64 / n as f64)
}

/// Indexes of `sessions` that were created by name (not the unique constraint's own).
fn sqlite_indexes(template: &Path) -> Result<Vec<(String, String)>> {
    let conn = Connection::open(template)?;
    let mut stmt = conn.prepare(
        "SELECT name, sql FROM sqlite_master \
         WHERE type = 'index' AND tbl_name = 'sessions' AND sql IS NOT NULL ORDER BY name",
    )?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .map(|(name, sql)| {
            // `CREATE INDEX x ON sessions (a, b) WHERE ...` → `(a, b) WHERE ...`
            let def = sql
                .find('(')
                .map_or(sql.as_str(), |at| &sql[at..])
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            (name, def)
        })
        .collect())
}

async fn sqlite(template: &Path, s: &Settings<'_>, name: &str) -> Result<Ceilings> {
    // The migration may leave its last changes in the WAL; fold them in so that a copy of
    // the main file alone is the whole database.
    {
        let conn = Connection::open(template)?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .context("checkpointing the template")?;
    }
    let template = template.to_owned();
    let run_file = s.dir.join("ceiling-run.db");
    let (durability, ops, group, cap, index_costs) =
        (s.durability, s.ops, s.group, s.cap, s.index_costs);
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Fsync => "FULL",
    };
    let how = format!("rusqlite, 1 writer thread, synchronous={synchronous}");
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Ceilings> {
        sqlite_copy(&template, &run_file, None)?;
        let single = sqlite_loop(&run_file, durability, "1 request/tx", ops, 1, cap)?;
        eprintln!("  [{name}] ceiling {}", single.summary());
        sqlite_copy(&template, &run_file, None)?;
        let grouped = sqlite_loop(
            &run_file,
            durability,
            &format!("{group} requests/tx"),
            ops,
            group,
            cap,
        )?;
        eprintln!("  [{name}] ceiling {}", grouped.summary());
        let index_costs = if index_costs {
            Some(sqlite_index_costs(&template, &run_file, ops, &name)?)
        } else {
            None
        };
        Ok(Ceilings {
            single,
            group: Some(grouped),
            how,
            payload_bytes: sample_payload().len(),
            index_costs,
        })
    })
    .await
    .context("the SQLite ceiling thread failed")?
}

fn sqlite_index_costs(
    template: &Path,
    run_file: &Path,
    ops: usize,
    name: &str,
) -> Result<IndexCosts> {
    /// Requests of the WAL count (enough to average out the first commit's extra pages).
    const WAL_REQUESTS: usize = 200;
    let mut variants = vec![Variant::new("", "")];
    variants.extend(
        sqlite_indexes(template)?
            .iter()
            .map(|(name, def)| Variant::new(name, def)),
    );
    let drop_of = |v: &Variant| Some(v.name.clone()).filter(|n| !n.is_empty());
    let n = ops.min(INDEX_RUN_OPS);
    let cap = Duration::from_secs_f64(INDEX_RUN_SECONDS);
    let started = Instant::now();
    for v in &mut variants {
        sqlite_copy(template, run_file, drop_of(v).as_deref())?;
        v.wal = Some(sqlite_wal_pages(run_file, WAL_REQUESTS)?);
    }
    for round in 0..INDEX_ROUNDS {
        for k in round_order(round, variants.len()) {
            let drop = drop_of(&variants[k]);
            sqlite_copy(template, run_file, drop.as_deref())?;
            // synchronous=NORMAL whatever the run's durability: with FULL every commit
            // waits for an fsync (about 1 ms on a virtio disk), which buries the
            // microseconds an index costs in noise; under load the server's group commit
            // pays that fsync once per group anyway.
            let stats = sqlite_loop(run_file, Durability::Normal, "index run", n, 1, cap)?;
            if let Some(e) = &stats.first_error {
                bail!("index-cost run without {drop:?}: {e}");
            }
            variants[k].runs.push(Run::of(&stats, |c| c.harness));
        }
    }
    print_index_rounds(name, &variants, started);
    index_costs(
        variants,
        format!(
            "rusqlite, 1 writer, 1 request/tx, synchronous=NORMAL, up to {n} requests or \
             {INDEX_RUN_SECONDS} s per run; WAL counted over {WAL_REQUESTS} requests"
        ),
        "writer thread",
        "WAL pages/req",
    )
}

fn sample_payload() -> String {
    let i = 12_345;
    event_payload(
        &uuid::Uuid::now_v7().to_string(),
        &parent_id("ceil", i),
        &idp_session_id(i),
        &user_id(i),
        now_ms(),
    )
}

// ---- PostgreSQL -----------------------------------------------------------------------

async fn pg_connect(url: &str) -> Result<PgConnection> {
    PgConnection::connect(url)
        .await
        .context("connecting to the ceiling database")
}

/// Empties the three tables (fresh relation files, like the first run had) and checkpoints,
/// so every run starts from the same state and pays the same full-page writes.
async fn pg_reset(url: &str) -> Result<()> {
    let mut conn = pg_connect(url).await?;
    conn.execute("TRUNCATE sessions, outbox, audit RESTART IDENTITY CASCADE")
        .await
        .context("emptying the ceiling tables")?;
    // Needs superuser (or pg_checkpoint); without it runs are merely noisier.
    let _ = conn.execute("CHECKPOINT").await;
    conn.close().await?;
    Ok(())
}

async fn pg_indexes(url: &str) -> Result<Vec<(String, String)>> {
    let mut conn = pg_connect(url).await?;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes \
         WHERE schemaname = current_schema() AND tablename = 'sessions' \
           AND indexname NOT IN (SELECT conname FROM pg_constraint \
                                 WHERE conrelid = 'sessions'::regclass) \
         ORDER BY indexname",
    )
    .fetch_all(&mut conn)
    .await
    .context("listing the indexes of sessions")?;
    conn.close().await?;
    Ok(rows)
}

/// `CREATE INDEX x ON public.sessions USING btree (a, b) WHERE ...` → `(a, b) WHERE ...`
fn pg_definition(indexdef: &str) -> String {
    indexdef
        .find(" USING ")
        .and_then(|at| indexdef[at..].find('(').map(|p| &indexdef[at + p..]))
        .unwrap_or(indexdef)
        .to_owned()
}

/// The pgbench script: one request per transaction, the three inserts of a map-parent.
/// Ids come from a sequence so that clients never collide; `:now` and `:payload` are fixed
/// per run (and bound as parameters, as the server binds them: pgbench would also take
/// `:null` inside the JSON for a variable).
fn pgbench_script() -> String {
    format!(
        "BEGIN;\n\
         INSERT INTO sessions (realm, external_id, kind, parent_id, idp_session_id, \
         idp_client_session_id, user_id, system, delegated_by, status, end_reason, attributes, \
         expires_at, created_at, updated_at) \
         SELECT '{REALM}', 'ceil-parent-' || lpad(n::text, 8, '0'), 'PARENT', NULL, \
         'kc-' || lpad(n::text, 32, '0'), NULL, 'user-' || (n % 10000), '{CALLER}', NULL, \
         'ACTIVE', NULL, '{{}}', NULL, :now, :now \
         FROM (SELECT nextval('lockstep_ceiling_ids') AS n) AS s WHERE true \
         ON CONFLICT (realm, external_id) DO NOTHING RETURNING external_id AS ext \\gset\n\
         INSERT INTO outbox (event_id, realm, event_type, external_id, origin_system, payload, \
         created_at) VALUES (gen_random_uuid()::text, '{REALM}', 'login', :ext, '{CALLER}', \
         :payload, :now);\n\
         INSERT INTO audit (at_ms, realm, actor, action, target, result, changed, detail) \
         VALUES (:now, '{REALM}', '{CALLER}', 'map-parent', :ext, 'ok', 1, NULL);\n\
         END;\n"
    )
}

/// Runs pgbench; `Ok(None)` when it cannot be started at all.
async fn pgbench_run(
    url: &str,
    s: &Settings<'_>,
    name: &str,
    total: usize,
    meter: &Meter,
) -> Result<Option<PhaseStats>> {
    let clients = s.clients.max(1);
    let per_client = total.div_ceil(clients).max(1);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let work = tempfile::Builder::new()
        .prefix("pgbench-")
        .tempdir_in(s.dir)
        .context("creating the pgbench directory")?;
    let script = work.path().join("map-parent.sql");
    std::fs::write(&script, pgbench_script()).context("writing the pgbench script")?;
    let before = meter.sample();
    let child = tokio::process::Command::new(s.pgbench)
        .args(["--no-vacuum", "--protocol=prepared", "--log"])
        .arg(format!("--log-prefix={}", work.path().join("tx").display()))
        .arg(format!("--client={clients}"))
        .arg(format!("--jobs={}", clients.min(cores)))
        .arg(format!("--transactions={per_client}"))
        .arg(format!("--define=now={}", now_ms()))
        .arg(format!("--define=payload={}", sample_payload()))
        .arg("--file")
        .arg(&script)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("starting {}", s.pgbench.display())),
    };
    let out = tokio::time::timeout(s.cap + Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| anyhow!("pgbench ran past the time cap"))?
        .context("running pgbench")?;
    let cpu = meter.since(&before);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Every client repeats the same error; the first few lines say it all.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let head: Vec<&str> = stderr.lines().take(4).collect();
        bail!("pgbench failed ({}):\n{}", out.status, head.join("\n"));
    }
    let value = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
            .ok_or_else(|| anyhow!("pgbench printed no `{prefix}` line:\n{stdout}"))
    };
    let tps: f64 = value("tps = ")?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .context("parsing pgbench's tps")?;
    let done: usize = value("number of transactions actually processed:")?
        .split('/')
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .context("parsing pgbench's transaction count")?;
    let failed: usize = value("number of failed transactions:")
        .ok()
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    // Per-transaction log lines: client, transaction number, latency in µs, ...
    let mut latencies = Vec::with_capacity(done);
    for entry in std::fs::read_dir(work.path())?.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("tx.") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())?;
        latencies.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    let elapsed = if tps > 0.0 {
        Duration::from_secs_f64(done as f64 / tps)
    } else {
        Duration::ZERO
    };
    let mut stats = PhaseStats::measured(name, per_client * clients, done, elapsed, latencies);
    stats.cpu = Some(cpu);
    if failed > 0 {
        stats.errors = failed;
        stats.first_error = Some(format!("pgbench: {failed} failed transactions"));
    }
    Ok(Some(stats))
}

/// The same transaction from `clients` sqlx connections (statements prepared once per
/// connection by sqlx's cache), for machines without pgbench.
async fn sqlx_run(
    url: &str,
    s: &Settings<'_>,
    name: &str,
    total: usize,
    first: usize,
    meter: &Meter,
) -> Result<PhaseStats> {
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(s.clients).unwrap_or(u32::MAX))
        .min_connections(u32::try_from(s.clients).unwrap_or(u32::MAX))
        .acquire_timeout(Duration::from_secs(120))
        .connect_with(PgConnectOptions::from_str(url).context("parsing the URL")?)
        .await
        .context("connecting to PostgreSQL")?;
    let pool = Arc::new(pool);
    let before = meter.sample();
    let p = Arc::clone(&pool);
    let mut stats = run_phase(name, total, s.clients, s.cap, move |i| {
        let p = Arc::clone(&p);
        async move {
            match pg_request(&p, first + i).await {
                Ok(()) => Outcome::Ok,
                Err(e) => Outcome::Err(format!("{e:#}")),
            }
        }
    })
    .await?;
    stats.cpu = Some(meter.since(&before));
    pool.close().await;
    Ok(stats)
}

async fn pg_request(pool: &PgPool, i: usize) -> Result<()> {
    let external_id = parent_id("ceil", i);
    let idp = idp_session_id(i);
    let user = user_id(i);
    let now = now_ms();
    let event_id = uuid::Uuid::now_v7().to_string();
    let payload = event_payload(&event_id, &external_id, &idp, &user, now);
    let mut tx = pool.begin().await?;
    let id: Option<i64> = sqlx::query_scalar(INSERT_SESSION)
        .bind(REALM)
        .bind(&external_id)
        .bind(&idp)
        .bind(&user)
        .bind(CALLER)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
    if id.is_none() {
        bail!("{external_id} already exists");
    }
    sqlx::query(INSERT_OUTBOX)
        .bind(&event_id)
        .bind(REALM)
        .bind(&external_id)
        .bind(CALLER)
        .bind(payload)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(INSERT_AUDIT)
        .bind(now)
        .bind(REALM)
        .bind(CALLER)
        .bind(&external_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Runs one PostgreSQL ceiling pass on an emptied database: pgbench if it can be started,
/// else the sqlx loop (`ids` keeps the sqlx loop's external ids unique across passes).
async fn pg_pass(
    url: &str,
    s: &Settings<'_>,
    name: &str,
    total: usize,
    meter: &Meter,
    ids: &AtomicUsize,
) -> Result<Pass> {
    pg_reset(url).await?;
    let wal_before = pg_wal_position(url).await?;
    let (stats, pgbench) = match pgbench_run(url, s, name, total, meter).await? {
        Some(stats) => (stats, true),
        None => {
            let first = ids.fetch_add(total, Ordering::Relaxed);
            (sqlx_run(url, s, name, total, first, meter).await?, false)
        }
    };
    let wal = pg_wal_position(url).await? - wal_before;
    let requests = stats.ops * stats.requests_per_op;
    Ok(Pass {
        wal_per_request: (requests > 0).then(|| wal as f64 / requests as f64),
        stats,
        pgbench,
    })
}

/// One PostgreSQL ceiling run.
struct Pass {
    stats: PhaseStats,
    /// Whether pgbench ran it (else the sqlx loop).
    pgbench: bool,
    /// WAL bytes per request, whatever else the cluster wrote meanwhile included.
    wal_per_request: Option<f64>,
}

/// The cluster's WAL insert position, in bytes.
async fn pg_wal_position(url: &str) -> Result<i64> {
    let mut conn = pg_connect(url).await?;
    let lsn: i64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .fetch_one(&mut conn)
            .await
            .context("reading the WAL position")?;
    conn.close().await?;
    Ok(lsn)
}

async fn pg_execute(url: &str, sql: &str) -> Result<()> {
    let mut conn = pg_connect(url).await?;
    conn.execute(sql).await.with_context(|| sql.to_owned())?;
    conn.close().await?;
    Ok(())
}

async fn postgres(url: &str, s: &Settings<'_>, name: &str) -> Result<Ceilings> {
    pg_execute(url, "CREATE SEQUENCE IF NOT EXISTS lockstep_ceiling_ids").await?;
    let meter = Meter::new(None, db::postmaster_pid(url).await);
    let ids = AtomicUsize::new(0);
    let first = pg_pass(url, s, "1 request/tx", s.ops, &meter, &ids).await?;
    let how = if first.pgbench {
        format!("pgbench -M prepared, {} clients", s.clients)
    } else {
        format!(
            "sqlx, {} clients ({} could not be started)",
            s.clients,
            s.pgbench.display()
        )
    };
    let single = first.stats;
    eprintln!("  [{name}] ceiling ({how}) {}", single.summary());
    let index_costs = if s.index_costs {
        Some(pg_index_costs(url, s, name, &how, single.ops_per_sec(), &meter, &ids).await?)
    } else {
        None
    };
    Ok(Ceilings {
        single,
        group: None,
        how,
        payload_bytes: sample_payload().len(),
        index_costs,
    })
}

async fn pg_index_costs(
    url: &str,
    s: &Settings<'_>,
    name: &str,
    how: &str,
    rate: f64,
    meter: &Meter,
    ids: &AtomicUsize,
) -> Result<IndexCosts> {
    // Sized from the rate just measured, so each run takes about INDEX_RUN_SECONDS.
    let n = ((rate * INDEX_RUN_SECONDS) as usize).clamp(s.clients, s.ops.max(s.clients));
    let indexes = pg_indexes(url).await?;
    let mut variants = vec![Variant::new("", "")];
    variants.extend(
        indexes
            .iter()
            .map(|(name, def)| Variant::new(name, &pg_definition(def))),
    );
    let mut wal: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let started = Instant::now();
    for round in 0..INDEX_ROUNDS {
        for k in round_order(round, variants.len()) {
            let dropped = k.checked_sub(1).map(|i| &indexes[i]);
            if let Some((index, _)) = dropped {
                pg_execute(url, &format!("DROP INDEX \"{index}\"")).await?;
            }
            let result = pg_pass(url, s, "index run", n, meter, ids).await;
            if let Some((_, def)) = dropped {
                // Put back before anything else, even after a failed run; on an empty
                // table, which makes it instant.
                pg_reset(url).await?;
                pg_execute(url, def).await?;
            }
            let pass = result?;
            if let Some(e) = &pass.stats.first_error {
                bail!("index-cost run without {dropped:?}: {e}");
            }
            variants[k].runs.push(Run::of(&pass.stats, |c| c.postgres));
            wal[k].extend(pass.wal_per_request);
        }
    }
    for (v, w) in variants.iter_mut().zip(&wal) {
        v.wal = (!w.is_empty()).then(|| median(w));
    }
    print_index_rounds(name, &variants, started);
    index_costs(
        variants,
        format!("{how}, 1 request/tx, {n} requests per run, synchronous_commit on"),
        "PostgreSQL cluster",
        "WAL bytes/req",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_definitions_keep_columns_and_predicate() {
        assert_eq!(
            pg_definition(
                "CREATE INDEX sessions_user_idx ON public.sessions USING btree \
                 (realm, user_id, id) WHERE (user_id IS NOT NULL)"
            ),
            "(realm, user_id, id) WHERE (user_id IS NOT NULL)"
        );
    }

    #[test]
    fn the_payload_is_a_login_event_of_realistic_size() {
        let p = sample_payload();
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["type"], "login");
        assert!((250..600).contains(&p.len()), "{} bytes: {p}", p.len());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
