//! SQLite backend. All writes go through one writer task that owns the only write
//! connection: SQLite allows one writer at a time anyway, and a single task lets concurrent
//! requests share a commit (group commit), which is what makes `fsync` durability fast.
//! Each request runs under its own SAVEPOINT, so one refused request never undoes another.
//! Reads use a separate pool of read-only connections (WAL lets them run beside the writer).

use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Page, Result, SessionQuery, StoreError, StoreOptions, now_millis};
use crate::sync::model::{DestroyCommand, IdpCommand, IdpOutcome, MapCommand, Session};

pub(super) mod ops {
    crate::store::ops::session_ops!(
        db = sqlx::Sqlite,
        conn = sqlx::sqlite::SqliteConnection,
        for_share = "",
        for_update = "",
        ids = "SELECT value FROM json_each($2)",
        // Two recursive arms, one per edge, so each uses its index (an OR join cannot).
        // CROSS JOIN keeps `tree` as the outer loop, so each step is an index lookup.
        children = "SELECT c.external_id, 1 FROM tree t CROSS JOIN sessions c \
                    WHERE c.realm = $1 AND c.parent_id = t.external_id \
                    UNION SELECT c.external_id, 2 FROM tree t CROSS JOIN sessions c \
                    WHERE c.realm = $1 AND c.delegated_by = t.external_id",
        recheck = false,
    );
    crate::store::deliveries::delivery_ops!(
        db = sqlx::Sqlite,
        conn = sqlx::sqlite::SqliteConnection,
        skip_locked = "",
        ids = "SELECT value FROM json_each($2)",
        int_ids = "SELECT value FROM json_each($2)",
    );
    crate::store::connectors::connector_ops!(
        db = sqlx::Sqlite,
        conn = sqlx::sqlite::SqliteConnection,
    );
    crate::store::audit::audit_ops!(db = sqlx::Sqlite, conn = sqlx::sqlite::SqliteConnection,);
}

/// How hard a commit is pushed to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: a commit survives a process crash.
    #[default]
    Normal,
    /// WAL with `synchronous=FULL`: a commit survives power loss (one fsync per group commit).
    Fsync,
}

/// Most requests folded into one commit.
const MAX_BATCH: usize = 256;
/// Requests waiting for the writer before callers feel back-pressure.
const QUEUE_DEPTH: usize = 4096;

/// What a job hands back after running: whether it succeeded (so its savepoint is kept) and
/// how to answer its caller once the commit's outcome is known.
struct Pending {
    ok: bool,
    /// Whether committing it is news for the dispatcher (see [`SqliteStore::write_quiet`]).
    wakes: bool,
    answer: Box<dyn FnOnce(Result<()>) + Send>,
}

type JobFn = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection, i64) -> futures::future::BoxFuture<'c, Pending>
        + Send,
>;

/// Handle to the SQLite store; clones share the writer and the read pool.
#[derive(Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    writer: mpsc::Sender<JobFn>,
    task: std::sync::Arc<Mutex<Option<JoinHandle<()>>>>,
    migrate_conn: std::sync::Arc<Mutex<Option<SqliteConnection>>>,
    committed: std::sync::Arc<Notify>,
}

fn connect_options(opts: &StoreOptions) -> Result<SqliteConnectOptions> {
    let synchronous = match opts.durability {
        Durability::Normal => SqliteSynchronous::Normal,
        Durability::Fsync => SqliteSynchronous::Full,
    };
    Ok(SqliteConnectOptions::from_str(&opts.url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10))
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-16000"))
}

impl SqliteStore {
    pub(super) async fn open(opts: &StoreOptions) -> Result<Self> {
        let base = connect_options(opts)?;
        let write_conn = SqliteConnection::connect_with(&base).await?;
        let migrate_conn = SqliteConnection::connect_with(&base).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(opts.max_connections.clamp(1, 64))
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(base.read_only(true))
            .await?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let committed = std::sync::Arc::new(Notify::new());
        let task = tokio::spawn(writer_loop(write_conn, rx, committed.clone()));
        Ok(SqliteStore {
            read,
            writer: tx,
            task: std::sync::Arc::new(Mutex::new(Some(task))),
            migrate_conn: std::sync::Arc::new(Mutex::new(Some(migrate_conn))),
            committed,
        })
    }

    pub(super) async fn migrate(&self) -> Result<()> {
        // Migrations run on a connection of their own, before the writer sees any request;
        // SQLite's busy timeout covers the short overlap with an idle writer.
        let mut guard = self.migrate_conn.lock().await;
        let conn = match guard.as_mut() {
            Some(c) => c,
            None => return Err(StoreError::Unavailable),
        };
        sqlx::migrate!("./migrations/sqlite").run(conn).await?;
        Ok(())
    }

    /// Runs `f` inside the writer's next group commit and answers after the COMMIT.
    pub(super) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut SqliteConnection,
                i64,
            ) -> futures::future::BoxFuture<'c, Result<T>>
            + Send
            + 'static,
    {
        self.submit(f, true).await
    }

    /// A write whose commit does not wake the dispatcher: its own fan-out, claims, records and
    /// lease changes, and audit writes. (Waking it for those made an idle dispatcher loop
    /// forever: every empty fan-out commit woke it for the next one, a core busy at idle.)
    pub(super) async fn write_quiet<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut SqliteConnection,
                i64,
            ) -> futures::future::BoxFuture<'c, Result<T>>
            + Send
            + 'static,
    {
        self.submit(f, false).await
    }

    async fn submit<T, F>(&self, f: F, wakes: bool) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut SqliteConnection,
                i64,
            ) -> futures::future::BoxFuture<'c, Result<T>>
            + Send
            + 'static,
    {
        let (reply, rx) = oneshot::channel::<Result<T>>();
        let job: JobFn = Box::new(move |conn, now| {
            Box::pin(async move {
                let result = f(conn, now).await;
                Pending {
                    ok: result.is_ok(),
                    wakes,
                    answer: Box::new(move |commit: Result<()>| {
                        // The caller may have gone away (client disconnected); the change stands.
                        let _ = reply.send(commit.and(result));
                    }),
                }
            })
        });
        self.writer
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable)?;
        rx.await.map_err(|_| StoreError::Unavailable)?
    }

    /// Signalled after every commit (the dispatcher waits on it).
    pub(super) fn committed(&self) -> std::sync::Arc<Notify> {
        self.committed.clone()
    }

    pub(super) async fn map(&self, cmd: MapCommand) -> Result<Session> {
        self.write(move |conn, now| Box::pin(async move { ops::map(conn, &cmd, now).await }))
            .await
    }

    pub(super) async fn destroy(&self, cmd: DestroyCommand) -> Result<Vec<Session>> {
        self.write(move |conn, now| Box::pin(async move { ops::destroy(conn, &cmd, now).await }))
            .await
    }

    pub(super) async fn apply_idp(&self, cmd: IdpCommand) -> Result<IdpOutcome> {
        self.write(move |conn, now| Box::pin(async move { ops::apply_idp(conn, &cmd, now).await }))
            .await
    }

    pub(super) async fn expired(&self, now: i64, limit: i64) -> Result<Vec<(String, String)>> {
        let mut conn = self.read.acquire().await?;
        ops::expired(&mut conn, now, limit).await
    }

    /// A read-only connection.
    pub(super) async fn reader(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        Ok(self.read.acquire().await?)
    }

    pub(super) async fn get(&self, realm: &str, id: &str) -> Result<Option<Session>> {
        let mut conn = self.read.acquire().await?;
        ops::get(&mut conn, realm, id).await
    }

    pub(super) async fn tree(&self, realm: &str, id: &str) -> Result<Option<Vec<Session>>> {
        let mut conn = self.read.acquire().await?;
        ops::tree(&mut conn, realm, id).await
    }

    pub(super) async fn query(&self, realm: &str, q: &SessionQuery) -> Result<Page> {
        let mut conn = self.read.acquire().await?;
        ops::query(&mut conn, realm, q).await
    }

    pub(super) async fn ping(&self) -> Result<()> {
        if self.writer.is_closed() {
            return Err(StoreError::Unavailable);
        }
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    pub(super) async fn close(&self) {
        // Called after the HTTP server has drained, so no request waits on the writer and
        // it sits idle in `recv`; stopping it there loses nothing.
        if let Some(conn) = self.migrate_conn.lock().await.take() {
            let _ = conn.close().await;
        }
        self.read.close().await;
        if let Some(task) = self.task.lock().await.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Owns the write connection; folds queued requests into one transaction per round.
async fn writer_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<JobFn>,
    committed: std::sync::Arc<Notify>,
) {
    let mut batch: Vec<JobFn> = Vec::with_capacity(MAX_BATCH);
    // Table statistics steer SQLite's planner to the selective indexes (a realm holds many
    // sessions; a user, parent or IdP session few); refresh them at start and now and then.
    optimize(&mut conn).await;
    let mut since_optimize = 0usize;
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        since_optimize += batch.len();
        let now = now_millis();
        let mut pending = Vec::with_capacity(batch.len());
        let began = exec(&mut conn, "BEGIN IMMEDIATE").await;
        if let Err(e) = &began {
            tracing::error!(error = %e, "sqlite writer could not begin a transaction");
        }
        for job in batch.drain(..) {
            if began.is_err() {
                continue;
            }
            pending.push(run_one(&mut conn, job, now).await);
        }
        let commit = match began {
            Err(_) => Err(StoreError::Unavailable),
            Ok(()) => match exec(&mut conn, "COMMIT").await {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::error!(error = %e, "sqlite group commit failed; every request in it fails");
                    let _ = exec(&mut conn, "ROLLBACK").await;
                    Err(StoreError::Unavailable)
                }
            },
        };
        let ok = commit.is_ok();
        let news = pending.iter().any(|p| p.ok && p.wakes);
        for p in pending {
            (p.answer)(if ok {
                Ok(())
            } else {
                Err(StoreError::Unavailable)
            });
        }
        if ok && news {
            committed.notify_one();
        }
        if since_optimize >= OPTIMIZE_EVERY {
            since_optimize = 0;
            optimize(&mut conn).await;
        }
    }
}

/// Write jobs between two `PRAGMA optimize` runs.
const OPTIMIZE_EVERY: usize = 50_000;

async fn optimize(conn: &mut SqliteConnection) {
    // 0x10002: analyse the tables that need it, even on a fresh connection; analysis_limit
    // keeps it to milliseconds on big tables.
    for sql in ["PRAGMA analysis_limit = 400", "PRAGMA optimize = 0x10002"] {
        if let Err(e) = exec(conn, sql).await {
            tracing::warn!(error = %e, "sqlite {sql} failed");
        }
    }
}

/// Runs one job under its own savepoint, so a refused request never undoes another.
async fn run_one(conn: &mut SqliteConnection, job: JobFn, now: i64) -> Pending {
    if let Err(e) = exec(conn, "SAVEPOINT op").await {
        return Pending {
            ok: false,
            wakes: false,
            answer: Box::new(move |_| drop(e)),
        };
    }
    let pending = job(conn, now).await;
    // If the savepoint cannot be closed the whole batch is in doubt; COMMIT will then fail
    // and every caller in it gets an error, which is the honest answer.
    if !pending.ok
        && let Err(e) = exec(conn, "ROLLBACK TO op").await
    {
        tracing::error!(error = %e, "sqlite savepoint could not be rolled back");
    }
    if let Err(e) = exec(conn, "RELEASE op").await {
        tracing::error!(error = %e, "sqlite savepoint could not be released");
    }
    pending
}

/// Runs one parameterless statement on the writer connection.
async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<()> {
    sqlx::query(sql).execute(conn).await?;
    Ok(())
}
