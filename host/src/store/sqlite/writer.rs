//! The SQLite writer: one OS thread that owns the only write connection (rusqlite) and
//! folds every queued request into one transaction (group commit). Statements run on the
//! thread that owns the connection, so a request costs no thread hop per statement; each
//! request runs under its own SAVEPOINT, so one refused request never undoes another, and
//! callers are answered only after the COMMIT of their group has returned.
//!
//! It must not hold the connection across anything but SQLite calls: no awaiting, no I/O.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{Notify, mpsc, oneshot};

use super::Durability;
use crate::store::{Result, StoreError, now_millis};

/// Most requests folded into one commit.
const MAX_BATCH: usize = 256;
/// Requests waiting for the writer before callers feel back-pressure.
const QUEUE_DEPTH: usize = 4096;
/// Write jobs between two `PRAGMA optimize` runs.
const OPTIMIZE_EVERY: usize = 50_000;
/// A group commit that takes this long is logged at debug level (statements vs COMMIT).
const SLOW_GROUP: Duration = Duration::from_millis(5);
/// Distinct statements the connection keeps prepared (every write statement fits).
const STATEMENT_CACHE: usize = 128;

/// What a job hands back after running: whether it succeeded (so its savepoint is kept) and
/// how to answer its caller once the commit's outcome is known.
struct Pending {
    ok: bool,
    /// Whether committing it is news for the dispatcher (see [`Writer::submit`]).
    wakes: bool,
    answer: Box<dyn FnOnce(Result<()>) + Send>,
}

type Job = Box<dyn FnOnce(&Connection, i64) -> Pending + Send>;

enum Msg {
    Job(Job),
    /// Finish what is queued before it, then close the connection.
    Stop,
}

/// Handle to the writer thread; clones share it.
#[derive(Clone)]
pub(super) struct Writer {
    tx: mpsc::Sender<Msg>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    checkpointer: Arc<std::sync::Mutex<Option<Checkpointer>>>,
}

/// How often the checkpointer copies committed WAL pages back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// WAL pages after which the writer checkpoints by itself: only when the checkpointer falls
/// far behind (SQLite's default is 1,000, which put a 5-8 ms checkpoint and its fsync inside
/// one group commit in every few hundred).
const WRITER_AUTOCHECKPOINT: u32 = 20_000;

/// A thread that checkpoints the WAL (PASSIVE: it never blocks the writer or readers), so
/// that the copy and its fsync stay off the writer thread.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(1))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lockstep-ckpt".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
                        tracing::warn!(error = %e, "sqlite checkpoint failed; the writer will checkpoint");
                    }
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot start the SQLite checkpointer: {e}")))?;
        Ok(Checkpointer { stop, thread })
    }
}

impl Writer {
    /// Opens the write connection on `path` and starts the thread.
    pub(super) fn start(
        path: &Path,
        durability: Durability,
        committed: Arc<Notify>,
    ) -> Result<Writer> {
        let conn = open(path, durability)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let checkpointer = Checkpointer::start(path)?;
        let thread = std::thread::Builder::new()
            .name("lockstep-writer".into())
            .spawn(move || run(conn, rx, committed))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the SQLite writer: {e}")))?;
        Ok(Writer {
            tx,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
            checkpointer: Arc::new(std::sync::Mutex::new(Some(checkpointer))),
        })
    }

    /// Runs `f` inside the writer's next group commit and answers after the COMMIT. With
    /// `wakes` false the commit does not wake the dispatcher: its own fan-out, claims,
    /// records and lease changes, and audit writes. (Waking it for those made an idle
    /// dispatcher loop forever: every empty fan-out commit woke it for the next one.)
    pub(super) async fn submit<T, F>(&self, f: F, wakes: bool) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, i64) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |conn, now| {
            let result = f(conn, now);
            Pending {
                ok: result.is_ok(),
                wakes,
                answer: Box::new(move |commit: Result<()>| {
                    // The caller may have gone away (client disconnected); the change stands.
                    let _ = reply.send(commit.and(result));
                }),
            }
        });
        self.tx
            .send(Msg::Job(job))
            .await
            .map_err(|_| StoreError::Unavailable)?;
        rx.await.map_err(|_| StoreError::Unavailable)?
    }

    /// Whether the thread has stopped.
    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Lets the thread finish what is queued, close the connection (which checkpoints the
    /// WAL) and exit; waits for it.
    pub(super) async fn stop(&self) {
        let _ = self.tx.send(Msg::Stop).await;
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        let checkpointer = self.checkpointer.lock().ok().and_then(|mut c| c.take());
        let _ = tokio::task::spawn_blocking(move || {
            // The checkpointer first: the writer's close then checkpoints what is left.
            if let Some(c) = checkpointer {
                let _ = c.stop.send(());
                let _ = c.thread.join();
            }
            if let Some(handle) = handle {
                let _ = handle.join();
            }
        })
        .await;
    }
}

/// The write connection, with the same settings the read pool uses.
fn open(path: &Path, durability: Durability) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Fsync => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
         PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -16000; \
         PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT};"
    ))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// The thread: one transaction per round over everything queued (up to [`MAX_BATCH`]).
fn run(conn: Connection, mut rx: mpsc::Receiver<Msg>, committed: Arc<Notify>) {
    // Table statistics steer SQLite's planner to the selective indexes (a realm holds many
    // sessions; a user, parent or IdP session few); refresh them at start and now and then.
    optimize(&conn);
    let mut since_optimize = 0usize;
    // Group sizes, logged at debug level now and then: how much each commit amortises.
    let (mut commits, mut jobs) = (0u64, 0u64);
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    while !stopping {
        match rx.blocking_recv() {
            Some(Msg::Job(job)) => batch.push(job),
            Some(Msg::Stop) | None => break,
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        since_optimize += batch.len();
        commits += 1;
        jobs += batch.len() as u64;
        if jobs >= 10_000 {
            tracing::debug!(
                commits,
                jobs,
                "sqlite writer: requests per group commit {:.1}",
                jobs as f64 / commits as f64
            );
            (commits, jobs) = (0, 0);
        }
        group_commit(&conn, &mut batch, &committed);
        if since_optimize >= OPTIMIZE_EVERY {
            since_optimize = 0;
            optimize(&conn);
        }
    }
    // Callers that queued after the stop get `Unavailable` when their reply is dropped.
    drop(rx);
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "sqlite writer connection did not close cleanly");
    }
}

/// Runs `batch` in one transaction and answers every caller with the commit's outcome.
fn group_commit(conn: &Connection, batch: &mut Vec<Job>, committed: &Notify) {
    let now = now_millis();
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        tracing::error!(error = %e, "sqlite writer could not begin a transaction");
        // Dropping the jobs drops their reply senders: each caller gets `Unavailable`.
        batch.clear();
        return;
    }
    let began = std::time::Instant::now();
    let size = batch.len();
    let changes_before = conn.total_changes();
    let pending: Vec<Pending> = batch.drain(..).map(|job| run_one(conn, job, now)).collect();
    let ran = began.elapsed();
    let commit = match exec(conn, "COMMIT") {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::error!(error = %e, "sqlite group commit failed; every request in it fails");
            let _ = exec(conn, "ROLLBACK");
            Err(())
        }
    };
    if began.elapsed() >= SLOW_GROUP {
        tracing::debug!(
            size,
            rows = conn.total_changes() - changes_before,
            run_ms = ran.as_secs_f64() * 1e3,
            commit_ms = (began.elapsed() - ran).as_secs_f64() * 1e3,
            "sqlite writer: slow group commit"
        );
    }
    let news = pending.iter().any(|p| p.ok && p.wakes);
    for p in pending {
        (p.answer)(commit.map_err(|()| StoreError::Unavailable));
    }
    if commit.is_ok() && news {
        committed.notify_one();
    }
}

/// Runs one job under its own savepoint, so a refused request never undoes another.
fn run_one(conn: &Connection, job: Job, now: i64) -> Pending {
    if let Err(e) = exec(conn, "SAVEPOINT op") {
        tracing::error!(error = %e, "sqlite savepoint could not be opened");
        return Pending {
            ok: false,
            wakes: false,
            // Dropping `job` unanswered would also fail the caller; say why instead.
            answer: Box::new(move |_| drop(job)),
        };
    }
    let pending = job(conn, now);
    // If the savepoint cannot be closed the whole batch is in doubt; COMMIT will then fail
    // and every caller in it gets an error, which is the honest answer.
    if !pending.ok
        && let Err(e) = exec(conn, "ROLLBACK TO op")
    {
        tracing::error!(error = %e, "sqlite savepoint could not be rolled back");
    }
    if let Err(e) = exec(conn, "RELEASE op") {
        tracing::error!(error = %e, "sqlite savepoint could not be released");
    }
    pending
}

/// Runs one parameterless statement, prepared once per connection.
fn exec(conn: &Connection, sql: &'static str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn optimize(conn: &Connection) {
    // 0x10002: analyse the tables that need it, even on a fresh connection; analysis_limit
    // keeps it to milliseconds on big tables.
    if let Err(e) = conn.execute_batch("PRAGMA analysis_limit = 400; PRAGMA optimize = 0x10002;") {
        tracing::warn!(error = %e, "sqlite PRAGMA optimize failed");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A writer on a fresh file with one table `t(v UNIQUE)` and a deferred foreign key
    /// (`d.v` must name a `t.v`), which lets a job make its group's COMMIT fail.
    fn writer(dir: &tempfile::TempDir) -> (Writer, std::path::PathBuf) {
        let path = dir.path().join("w.db");
        let setup = Connection::open(&path).unwrap();
        setup
            .execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE t (v INTEGER NOT NULL UNIQUE); \
                 CREATE TABLE d (v INTEGER NOT NULL REFERENCES t (v) DEFERRABLE INITIALLY DEFERRED);",
            )
            .unwrap();
        drop(setup);
        let w = Writer::start(&path, Durability::Normal, Arc::new(Notify::new())).unwrap();
        (w, path)
    }

    fn rows(path: &Path, table: &str) -> Vec<i64> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare(&format!("SELECT v FROM {table} ORDER BY v"))
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn insert(v: i64) -> impl FnOnce(&Connection, i64) -> Result<()> + Send + 'static {
        move |conn, _| {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_request_is_undone_without_undoing_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let (w, path) = writer(&dir);
        // Many concurrent requests share groups; every odd one writes, then refuses.
        let mut tasks = Vec::new();
        for v in 0..200i64 {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                let r = w
                    .submit(
                        move |conn, now| {
                            insert(v)(conn, now)?;
                            if v % 2 == 1 {
                                return Err(StoreError::NotFound(v.to_string()));
                            }
                            Ok(())
                        },
                        true,
                    )
                    .await;
                (v, r.is_ok())
            }));
        }
        for t in tasks {
            let (v, ok) = t.await.unwrap();
            assert_eq!(ok, v % 2 == 0, "request {v}");
        }
        w.stop().await;
        let expected: Vec<i64> = (0..200).filter(|v| v % 2 == 0).collect();
        assert_eq!(rows(&path, "t"), expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_request_is_acknowledged_unless_its_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (w, path) = writer(&dir);
        let (mut acknowledged, mut refused) = (Vec::new(), 0);
        // Waves of concurrent requests, so that some groups hold a broken one and some not.
        for wave in 0..10i64 {
            let mut tasks = Vec::new();
            for v in wave * 30..(wave + 1) * 30 {
                let w = w.clone();
                tasks.push(tokio::spawn(async move {
                    let r = w
                        .submit(
                            move |conn, _| {
                                conn.execute("INSERT INTO d (v) VALUES (?1)", [v])?;
                                // Every 50th request breaks the deferred key: its statement
                                // succeeds, so only the group's COMMIT can fail.
                                if v % 50 != 0 {
                                    conn.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
                                }
                                Ok(())
                            },
                            true,
                        )
                        .await;
                    (v, r)
                }));
            }
            for t in tasks {
                let (v, r) = t.await.unwrap();
                match r {
                    Ok(()) => {
                        assert_ne!(
                            v % 50,
                            0,
                            "request {v} broke its commit but was acknowledged"
                        );
                        acknowledged.push(v);
                    }
                    // A failed COMMIT fails every request of its group, innocent ones too.
                    Err(e) => {
                        assert!(matches!(e, StoreError::Unavailable), "{v}: {e}");
                        refused += 1;
                    }
                }
            }
        }
        assert!(refused >= 6, "every broken request is refused");
        assert!(!acknowledged.is_empty(), "some groups must have committed");
        w.stop().await;
        acknowledged.sort_unstable();
        // Exactly the acknowledged requests are stored: nothing acknowledged was lost and
        // nothing refused was kept.
        assert_eq!(rows(&path, "d"), acknowledged);
        assert_eq!(rows(&path, "t"), acknowledged);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_stop_requests_are_refused_and_queued_ones_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (w, path) = writer(&dir);
        let queued = {
            let w = w.clone();
            tokio::spawn(async move { w.submit(insert(1), true).await })
        };
        queued.await.unwrap().unwrap();
        w.stop().await;
        assert!(w.is_closed());
        assert!(matches!(
            w.submit(insert(2), true).await,
            Err(StoreError::Unavailable)
        ));
        assert_eq!(rows(&path, "t"), vec![1]);
    }
}
