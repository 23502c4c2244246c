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
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Page, Result, SessionQuery, StoreError, StoreOptions, now_millis};
use crate::sync::model::{DestroyCommand, MapCommand, Session};

mod ops {
    crate::store::ops::session_ops!(
        db = sqlx::Sqlite,
        conn = sqlx::sqlite::SqliteConnection,
        for_share = "",
        for_update = "",
        ids = "SELECT value FROM json_each($2)",
        recheck = false,
    );
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

enum WriteOp {
    Map(MapCommand),
    Destroy(DestroyCommand),
}

enum WriteOutcome {
    Mapped(Box<Session>),
    Destroyed(Vec<Session>),
}

struct WriteJob {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

/// Handle to the SQLite store; clones share the writer and the read pool.
#[derive(Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    writer: mpsc::Sender<WriteJob>,
    task: std::sync::Arc<Mutex<Option<JoinHandle<()>>>>,
    migrate_conn: std::sync::Arc<Mutex<Option<SqliteConnection>>>,
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
        let task = tokio::spawn(writer_loop(write_conn, rx));
        Ok(SqliteStore {
            read,
            writer: tx,
            task: std::sync::Arc::new(Mutex::new(Some(task))),
            migrate_conn: std::sync::Arc::new(Mutex::new(Some(migrate_conn))),
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

    async fn submit(&self, op: WriteOp) -> Result<WriteOutcome> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriteJob { op, reply })
            .await
            .map_err(|_| StoreError::Unavailable)?;
        rx.await.map_err(|_| StoreError::Unavailable)?
    }

    pub(super) async fn map(&self, cmd: MapCommand) -> Result<Session> {
        match self.submit(WriteOp::Map(cmd)).await? {
            WriteOutcome::Mapped(s) => Ok(*s),
            WriteOutcome::Destroyed(_) => Err(StoreError::Corrupt(
                "writer answered a map with a destroy".into(),
            )),
        }
    }

    pub(super) async fn destroy(&self, cmd: DestroyCommand) -> Result<Vec<Session>> {
        match self.submit(WriteOp::Destroy(cmd)).await? {
            WriteOutcome::Destroyed(v) => Ok(v),
            WriteOutcome::Mapped(_) => Err(StoreError::Corrupt(
                "writer answered a destroy with a map".into(),
            )),
        }
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

    pub(super) async fn outbox_count(&self, realm: &str, id: &str) -> Result<i64> {
        let mut conn = self.read.acquire().await?;
        ops::outbox_count(&mut conn, realm, id).await
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
async fn writer_loop(mut conn: SqliteConnection, mut rx: mpsc::Receiver<WriteJob>) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let results = run_batch(&mut conn, &batch).await;
        for (job, result) in batch.drain(..).zip(results) {
            // The caller may have gone away (client disconnected); the change stands.
            let _ = job.reply.send(result);
        }
    }
}

async fn run_batch(conn: &mut SqliteConnection, batch: &[WriteJob]) -> Vec<Result<WriteOutcome>> {
    let now = now_millis();
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE").await {
        tracing::error!(error = %e, "sqlite writer could not begin a transaction");
        return batch.iter().map(|_| Err(StoreError::Unavailable)).collect();
    }
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        results.push(run_one(conn, &job.op, now).await);
    }
    match exec(conn, "COMMIT").await {
        Ok(_) => results,
        Err(e) => {
            tracing::error!(error = %e, "sqlite group commit failed; every request in it fails");
            let _ = exec(conn, "ROLLBACK").await;
            batch.iter().map(|_| Err(StoreError::Unavailable)).collect()
        }
    }
}

async fn run_one(conn: &mut SqliteConnection, op: &WriteOp, now: i64) -> Result<WriteOutcome> {
    exec(conn, "SAVEPOINT op").await?;
    let result = match op {
        WriteOp::Map(cmd) => ops::map(conn, cmd, now)
            .await
            .map(|s| WriteOutcome::Mapped(Box::new(s))),
        WriteOp::Destroy(cmd) => ops::destroy(conn, cmd, now)
            .await
            .map(WriteOutcome::Destroyed),
    };
    // If the savepoint cannot be closed the whole batch is in doubt; COMMIT will then fail
    // and every caller in it gets an error, which is the honest answer.
    if result.is_err() {
        exec(conn, "ROLLBACK TO op").await?;
    }
    exec(conn, "RELEASE op").await?;
    result
}

/// Runs one parameterless statement on the writer connection.
async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<()> {
    sqlx::query(sql).execute(conn).await?;
    Ok(())
}
