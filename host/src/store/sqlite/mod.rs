//! SQLite backend. All writes go through one writer thread that owns the only write
//! connection (`writer.rs`; the statements are in `write.rs`): SQLite allows one writer at a
//! time anyway, and a single writer lets concurrent requests share a commit (group commit),
//! which is what makes `fsync` durability fast. Reads use a separate pool of read-only sqlx
//! connections (WAL lets them run beside the writer).

mod write;
pub(super) use write::insert_audit;
mod writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio::sync::{Mutex, Notify};

use super::{Result, StoreError, StoreOptions};
use crate::domain::{
    AuditEntry, AuditOutcome, DestroyCommand, IdpCommand, IdpOutcome, MapCommand, Session,
};
use crate::store::connectors::UploadRow;
use crate::store::deliveries::{AttemptRecord, ClaimedDelivery, FanOut, LaneClaim, ReplayTarget};
use writer::Writer;

/// The read side: the shared sqlx statements on the read-only pool .
pub(super) type Ops = super::ops::Shared<sqlx::Sqlite>;

/// How hard a commit is pushed to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: a commit survives a process crash.
    #[default]
    Normal,
    /// WAL with `synchronous=FULL`: a commit survives power loss (one fsync per group commit).
    Fsync,
}

/// Handle to the SQLite store; clones share the writer and the read pool.
#[derive(Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    writer: Writer,
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

fn is_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

impl SqliteStore {
    pub(super) async fn open(opts: &StoreOptions) -> Result<Self> {
        // The writer opens the file by name with a connection of its own; an in-memory
        // database would be a different, empty one on that connection.
        if is_in_memory(&opts.url) {
            return Err(StoreError::UnsupportedUrl(opts.url.clone()));
        }
        let base = connect_options(opts)?;
        // Creates the file (and switches it to WAL) before the writer opens it.
        let migrate_conn = SqliteConnection::connect_with(&base).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(opts.max_connections.clamp(1, 64))
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(base.clone().read_only(true))
            .await?;
        let committed = std::sync::Arc::new(Notify::new());
        let writer = Writer::start(base.get_filename(), opts.durability, committed.clone())?;
        Ok(SqliteStore {
            read,
            writer,
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

    /// Runs `f` on the writer thread inside its next group commit; answers after the COMMIT.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, i64) -> Result<T> + Send + 'static,
    {
        self.writer.submit(f, true).await
    }

    /// A write whose commit does not wake the dispatcher (see [`Writer::submit`]).
    pub(super) async fn write_quiet<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, i64) -> Result<T> + Send + 'static,
    {
        self.writer.submit(f, false).await
    }

    /// Signalled after every commit (the dispatcher waits on it).
    pub(super) fn committed(&self) -> std::sync::Arc<Notify> {
        self.committed.clone()
    }

    pub(super) async fn map(&self, cmd: MapCommand) -> Result<Session> {
        self.write(move |conn, now| write::map(conn, &cmd, now))
            .await
    }

    pub(super) async fn destroy(&self, cmd: DestroyCommand) -> Result<Vec<Session>> {
        self.write(move |conn, now| write::destroy(conn, &cmd, now))
            .await
    }

    pub(super) async fn apply_idp(&self, cmd: IdpCommand) -> Result<IdpOutcome> {
        self.write(move |conn, now| write::apply_idp(conn, &cmd, now))
            .await
    }

    pub(super) async fn fan_out(
        &self,
        route: super::Route,
        gate: super::Gate,
    ) -> Result<Option<FanOut>> {
        self.write_quiet(move |conn, now| write::fan_out(conn, &*route, &*gate, now))
            .await
    }

    pub(super) async fn claim(&self, lane: LaneClaim) -> Result<Vec<ClaimedDelivery>> {
        self.write_quiet(move |conn, now| write::claim(conn, &lane, now))
            .await
    }

    pub(super) async fn record(&self, records: Vec<AttemptRecord>) -> Result<()> {
        self.write_quiet(move |conn, _| write::record(conn, &records))
            .await
    }

    pub(super) async fn release_leases(&self) -> Result<u64> {
        self.write_quiet(|conn, _| write::release_leases(conn))
            .await
    }

    pub(super) async fn unlease(&self, ids: Vec<i64>) -> Result<()> {
        self.write_quiet(move |conn, _| write::unlease(conn, &ids))
            .await
    }

    pub(super) async fn replay(
        &self,
        target: ReplayTarget,
        audit: Option<AuditEntry>,
    ) -> Result<u64> {
        self.write(move |conn, now| {
            let n = write::replay(conn, &target, now)?;
            if let Some(entry) = &audit {
                write::insert_audit(conn, entry, AuditOutcome::Ok(n as i64), now)?;
            }
            Ok(n)
        })
        .await
    }

    pub(super) async fn record_audit(
        &self,
        entry: AuditEntry,
        outcome: AuditOutcome,
    ) -> Result<()> {
        self.write_quiet(move |conn, now| write::insert_audit(conn, &entry, outcome, now))
            .await
    }

    pub(super) async fn purge_audit(&self, before_ms: i64, limit: i64) -> Result<u64> {
        self.write_quiet(move |conn, _| write::purge_audit(conn, before_ms, limit))
            .await
    }

    pub(super) async fn put_upload(&self, row: UploadRow, audit: Option<AuditEntry>) -> Result<()> {
        self.write(move |conn, now| {
            write::put_upload(conn, &row)?;
            if let Some(entry) = &audit {
                write::insert_audit(conn, entry, AuditOutcome::Ok(1), now)?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn delete_upload(
        &self,
        name: String,
        audit: Option<AuditEntry>,
    ) -> Result<bool> {
        self.write(move |conn, now| {
            let gone = write::delete_upload(conn, &name)?;
            if gone && let Some(entry) = &audit {
                write::insert_audit(conn, entry, AuditOutcome::Ok(1), now)?;
            }
            Ok(gone)
        })
        .await
    }

    pub(super) async fn set_enabled(
        &self,
        name: String,
        enabled: bool,
        audit: Option<AuditEntry>,
    ) -> Result<()> {
        self.write(move |conn, now| {
            write::set_enabled(conn, &name, enabled, now)?;
            if let Some(entry) = &audit {
                write::insert_audit(conn, entry, AuditOutcome::Ok(1), now)?;
            }
            Ok(())
        })
        .await
    }

    /// A read-only connection.
    pub(super) async fn reader(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        Ok(self.read.acquire().await?)
    }

    pub(super) async fn ping(&self) -> Result<()> {
        if self.writer.is_closed() {
            return Err(StoreError::Unavailable);
        }
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    pub(super) async fn close(&self) {
        // Called after the HTTP server has drained, so no request waits on the writer; it
        // finishes whatever is still queued, then closes its connection.
        self.writer.stop().await;
        if let Some(conn) = self.migrate_conn.lock().await.take() {
            let _ = conn.close().await;
        }
        self.read.close().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn an_in_memory_database_is_refused_with_a_clear_error() {
        for url in [
            "sqlite::memory:",
            "sqlite://file:x?mode=memory&cache=shared",
        ] {
            let err = SqliteStore::open(&StoreOptions::new(url))
                .await
                .err()
                .unwrap();
            assert!(matches!(err, StoreError::UnsupportedUrl(_)), "{url}: {err}");
        }
    }
}
