//! Direct database work for the benchmarks: the scratch PostgreSQL databases, growing the
//! `sessions` table with filler rows while the server is stopped, and reading the server's
//! database while it runs (`ServerDb`). (The write ceilings are in `ceiling.rs`.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Connection, Executor};

use super::Durability;

/// Filler rows per transaction when growing the table.
const FILL_CHUNK: i64 = 50_000;

/// Where a backend keeps its data.
#[derive(Clone)]
pub enum Target {
    /// The server's SQLite file; the ceiling uses a sibling file.
    Sqlite { path: PathBuf },
    /// A scratch PostgreSQL database.
    Postgres { url: String },
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Sqlite { .. } => "sqlite",
            Target::Postgres { .. } => "postgres",
        }
    }

    /// The backend as a report's prose names it.
    pub fn title(&self) -> &'static str {
        match self {
            Target::Sqlite { .. } => "SQLite",
            Target::Postgres { .. } => "PostgreSQL",
        }
    }

    /// The `--database-url` the server gets.
    pub fn server_url(&self) -> String {
        match self {
            Target::Sqlite { path } => format!("sqlite://{}", path.display()),
            Target::Postgres { url } => url.clone(),
        }
    }
}

/// The server's database, read straight while the server runs (SQLite in WAL mode lets a
/// reader in beside the writer): one connection, and the same statement on both backends.
pub enum ServerDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl ServerDb {
    pub async fn open(target: &Target) -> Result<ServerDb> {
        Ok(match target {
            Target::Sqlite { path } => ServerDb::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(
                        SqliteConnectOptions::new()
                            .filename(path)
                            .busy_timeout(Duration::from_secs(10)),
                    )
                    .await
                    .with_context(|| format!("opening {}", path.display()))?,
            ),
            Target::Postgres { url } => ServerDb::Postgres(
                PgPoolOptions::new()
                    .max_connections(1)
                    .connect(url)
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            ),
        })
    }

    /// Every row of `sql`.
    pub async fn rows<T>(&self, sql: &str) -> Result<Vec<T>>
    where
        T: for<'r> sqlx::FromRow<'r, SqliteRow> + for<'r> sqlx::FromRow<'r, PgRow>,
        T: Send + Unpin,
    {
        match self {
            ServerDb::Sqlite(p) => sqlx::query_as::<_, T>(sql).fetch_all(p).await,
            ServerDb::Postgres(p) => sqlx::query_as::<_, T>(sql).fetch_all(p).await,
        }
        .with_context(|| format!("running {sql}"))
    }

    /// The one number `sql` selects (a count, say).
    pub async fn scalar(&self, sql: &str) -> Result<i64> {
        match self {
            ServerDb::Sqlite(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
            ServerDb::Postgres(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
        }
        .with_context(|| format!("running {sql}"))
    }

    pub async fn close(self) {
        match self {
            ServerDb::Sqlite(p) => p.close().await,
            ServerDb::Postgres(p) => p.close().await,
        }
    }
}

/// A scratch database on the PostgreSQL server at an admin URL.
pub use testkit::postgres::create_database as create_pg_database;

/// The PostgreSQL server's postmaster process, when it runs on this machine (for reading
/// the cluster's CPU time); `None` when it cannot be found.
pub async fn postmaster_pid(url: &str) -> Option<u32> {
    let mut conn = PgConnection::connect(url).await.ok()?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .ok()?;
    // Read while the backend is still alive.
    let pid = super::cpu::postmaster_of(u32::try_from(backend).ok()?);
    let _ = conn.close().await;
    pid
}

fn sqlite_options(path: &PathBuf, durability: Durability) -> SqliteConnectOptions {
    let synchronous = match durability {
        Durability::Normal => SqliteSynchronous::Normal,
        Durability::Fsync => SqliteSynchronous::Full,
    };
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10))
}

/// Rows in `sessions` (all realms). Safe while the server runs.
pub async fn count_sessions(target: &Target) -> Result<i64> {
    match target {
        Target::Sqlite { path } => {
            let opts = SqliteConnectOptions::new().filename(path).read_only(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&opts)
                .await
                .context("opening the SQLite database")?;
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions")
                .fetch_one(&mut conn)
                .await
                .context("counting sessions")?;
            Ok(n)
        }
        Target::Postgres { url } => {
            let mut conn = PgConnection::connect(url)
                .await
                .context("connecting to PostgreSQL")?;
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions")
                .fetch_one(&mut conn)
                .await
                .context("counting sessions")?;
            Ok(n)
        }
    }
}

const FILL_SQLITE: &str =
    "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
    INSERT INTO sessions (realm, external_id, kind, idp_session_id, user_id, system, status,
                          attributes, created_at, updated_at)
    SELECT ?4, 'filler-' || i, 'FIXED',
           'kc-' || substr('00000000000000000000000000000000' || i, -32, 32),
           'user-' || (i % 10000), 'bench', 'ACTIVE', '{}', ?3, ?3
    FROM n";
const FILL_PG: &str = "INSERT INTO sessions (realm, external_id, kind, idp_session_id, user_id,
                          system, status, attributes, created_at, updated_at)
    SELECT $4, 'filler-' || g, 'FIXED', 'kc-' || lpad(g::text, 32, '0'),
           'user-' || (g % 10000), 'bench', 'ACTIVE', '{}', $3, $3
    FROM generate_series($1::bigint, $2::bigint) AS g";

/// Grows `sessions` to `to` rows with FIXED sessions in `realm`, in transactions of
/// [`FILL_CHUNK`] rows. The server must be stopped. Returns the rows added.
pub async fn fill_sessions(target: &Target, to: i64, realm: &str) -> Result<i64> {
    let have = count_sessions(target).await?;
    let want = (to - have).max(0);
    let now = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    match target {
        Target::Sqlite { path } => {
            let opts = sqlite_options(path, Durability::Normal);
            let mut conn = sqlx::SqliteConnection::connect_with(&opts)
                .await
                .context("opening the SQLite database")?;
            insert_fillers(&mut conn, FILL_SQLITE, want, now, realm).await?;
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&mut conn)
                .await
                .context("checkpointing the WAL")?;
            conn.close().await?;
        }
        Target::Postgres { url } => {
            let mut conn = PgConnection::connect(url)
                .await
                .context("connecting to PostgreSQL")?;
            insert_fillers(&mut conn, FILL_PG, want, now, realm).await?;
            // What autovacuum would soon do on its own; without it the planner still sees
            // the statistics of a nearly empty table.
            conn.execute("ANALYZE sessions")
                .await
                .context("ANALYZE sessions")?;
            conn.close().await?;
        }
    }
    eprintln!(
        "  [{}] filled sessions: +{want} rows to {to} in {:.1} s",
        target.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(want)
}

/// Inserts the filler rows `0..want` with `sql` (bound: first row, last row, `now`, `realm`),
/// one transaction per [`FILL_CHUNK`] rows. Generic so that both backends' connections run
/// the same loop; only the statement differs.
async fn insert_fillers<C>(
    conn: &mut C,
    sql: &'static str,
    want: i64,
    now: i64,
    realm: &str,
) -> Result<()>
where
    C: Connection,
    for<'c> &'c mut <C::Database as sqlx::Database>::Connection:
        Executor<'c, Database = C::Database>,
    for<'q> i64: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
    for<'q> &'q str: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
    for<'q> <C::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, C::Database>,
{
    let mut first = 0_i64;
    while first < want {
        let last = (first + FILL_CHUNK).min(want) - 1;
        let mut tx = conn.begin().await?;
        sqlx::query(sql)
            .bind(first)
            .bind(last)
            .bind(now)
            .bind(realm)
            .execute(&mut *tx)
            .await
            .context("inserting filler rows")?;
        tx.commit().await?;
        first = last + 1;
    }
    Ok(())
}

/// The size of a backend's data on disk.
pub struct DbSize {
    /// SQLite: the database file with its `-wal` and `-shm` files; PostgreSQL:
    /// `pg_database_size` of the database.
    pub total: u64,
    /// `sessions` with its indexes: SQLite from the `dbstat` table (when the library has it),
    /// PostgreSQL `pg_total_relation_size` (table, indexes, TOAST).
    pub sessions: Option<u64>,
}

const SESSIONS_SIZE_SQLITE: &str = "SELECT SUM(pgsize) FROM dbstat
    WHERE name IN (SELECT name FROM sqlite_master WHERE tbl_name = 'sessions')";

/// Size of the target's data on disk. Safe while the server runs.
pub async fn size(target: &Target) -> Result<DbSize> {
    match target {
        Target::Sqlite { path } => {
            let mut total = 0;
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.as_os_str().to_owned();
                file.push(suffix);
                if let Ok(meta) = std::fs::metadata(&file) {
                    total += meta.len();
                }
            }
            let opts = SqliteConnectOptions::new().filename(path).read_only(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&opts)
                .await
                .context("opening the SQLite database")?;
            // `dbstat` exists only when SQLite was built with it; without it, no breakdown.
            let sessions: Option<i64> = sqlx::query_scalar(SESSIONS_SIZE_SQLITE)
                .fetch_one(&mut conn)
                .await
                .ok()
                .flatten();
            conn.close().await?;
            Ok(DbSize {
                total,
                sessions: sessions.and_then(|n| u64::try_from(n).ok()),
            })
        }
        Target::Postgres { url } => {
            let mut conn = PgConnection::connect(url)
                .await
                .context("connecting to PostgreSQL")?;
            let (total, sessions): (i64, i64) = sqlx::query_as(
                "SELECT pg_database_size(current_database()),
                        pg_total_relation_size('sessions')",
            )
            .fetch_one(&mut conn)
            .await
            .context("reading the database size")?;
            conn.close().await?;
            Ok(DbSize {
                total: u64::try_from(total).unwrap_or(0),
                sessions: u64::try_from(sessions).ok(),
            })
        }
    }
}
