//! PostgreSQL backend: every operation is one pooled transaction, a single statement in
//! autocommit where the operation is one (a map, a claim, an attempt). Concurrent instances
//! are safe because map-child holds its parent row FOR SHARE while a destroy locks its target
//! FOR UPDATE and re-checks for children committed while it ran.

mod deliveries;
mod group;
mod records;
pub(super) use records::insert_audit;
mod sessions;

use futures::future::BoxFuture;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use super::connectors::UploadRow;
use super::{Result, StoreError, StoreOptions, now_millis};
use crate::domain::{
    AuditEntry, AuditOutcome, DestroyCommand, IdpCommand, IdpOutcome, MapCommand, Session,
};

/// The shared sqlx statements, on PostgreSQL.
pub(super) type Ops = super::ops::Shared<sqlx::Postgres>;

/// Announces a connector change to every instance (delivered when the transaction commits).
async fn announce(conn: &mut PgConnection, name: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(crate::store::connectors::CHANGES_CHANNEL)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Deadlocks and serialisation failures between concurrent cascades are retried this often.
const MAX_TX_ATTEMPTS: usize = 5;

/// Writer tasks committing guarded destroys together, at most: on two cores, four batches in
/// flight keep PostgreSQL busy while each writer waits for its round trips.
const MAX_GROUP_WRITERS: usize = 4;

/// Applies one destroy in a transaction of its own, retried on deadlock or serialisation
/// failure.
async fn destroy_alone(pool: &PgPool, cmd: &DestroyCommand) -> Result<Vec<Session>> {
    let now = now_millis();
    in_tx(pool, cmd, |conn, cmd| {
        Box::pin(sessions::destroy(conn, cmd, now))
    })
    .await
}

/// Handle to the PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pub(super) pool: PgPool,
    committed: std::sync::Arc<tokio::sync::Notify>,
    /// Where guarded destroys queue to be committed together.
    group: group::GroupCommit,
}

/// Whether the database asked us to run the transaction again.
fn is_retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40001") | Some("40P01"))
        }
        _ => false,
    }
}

/// A pooled connection idle for longer than this is pinged before use: one that sat out a
/// database restart fails the ping, not the request. Busier connections skip the round trip.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Runs a statement that commits on its own (autocommit), retrying on deadlock or
/// serialisation failure as [`in_tx`] does.
async fn retrying<T, F, Fut>(mut run: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match run().await {
            Err(e) if attempt < MAX_TX_ATTEMPTS && is_retryable(&e) => {
                tracing::debug!(attempt, error = %e, "retrying statement");
            }
            done => break done,
        }
    }
}

/// Runs `body` in a transaction, retrying on deadlock or serialisation failure: each
/// attempt gets a fresh transaction, and a failed one is rolled back before the next.
///
/// `body` gets the connection and `ctx` (what it reads of the caller's) and returns a boxed
/// future. Not an async closure: the future of one borrows the connection for a lifetime
/// the compiler cannot prove `Send` for in general, and the API's handlers need it `Send`.
/// `ctx` is passed rather than captured so that its borrow may be as short as the
/// connection's.
async fn in_tx<C, T, F>(pool: &PgPool, ctx: &C, mut body: F) -> Result<T>
where
    C: ?Sized + Sync,
    F: for<'c> FnMut(&'c mut PgConnection, &'c C) -> BoxFuture<'c, Result<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut tx = pool.begin().await?;
        match body(&mut tx, ctx).await {
            Ok(v) => {
                tx.commit().await?;
                break Ok(v);
            }
            Err(e) => {
                tx.rollback().await?;
                if attempt < MAX_TX_ATTEMPTS && is_retryable(&e) {
                    tracing::debug!(attempt, error = %e, "retrying transaction");
                    continue;
                }
                break Err(e);
            }
        }
    }
}

impl PgStore {
    pub(super) async fn open(opts: &StoreOptions) -> Result<Self> {
        // JIT off: every statement here is a short OLTP one, but with a million rows the
        // planner's estimate for the cascade passes jit_above_cost and each destroy paid a
        // 70-290 ms compile for a 0.55 ms statement (xtask bench --rows 1000000).
        //
        // Plans stay custom (PostgreSQL's default): a generic plan is fixed at a connection's
        // first call, and one made while a table was small kept scanning it whole later.
        let connect = PgConnectOptions::from_str(&opts.url)?.options([("jit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            // sqlx pings every connection it hands out by default: a round trip as long as a
            // map's whole statement.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    // A connection that fails the ping is dropped and another one tried.
                    Ok(meta.idle_for < PING_IDLE_AFTER || conn.ping().await.is_ok())
                })
            })
            .connect_with(connect)
            .await?;
        let committed = std::sync::Arc::new(tokio::sync::Notify::new());
        // A writer holds one connection while it applies a batch: a quarter of the pool at
        // most, so the other operations keep theirs.
        let writers = (opts.max_connections as usize / 4).clamp(1, MAX_GROUP_WRITERS);
        let group = group::GroupCommit::start(pool.clone(), writers, committed.clone());
        Ok(PgStore {
            pool,
            committed,
            group,
        })
    }

    pub(super) async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores (or replaces) an upload, with its audit record, and announces the change in
    /// the same transaction.
    pub(super) async fn put_upload(
        &self,
        row: &UploadRow,
        audit: Option<&AuditEntry>,
    ) -> Result<()> {
        in_tx(&self.pool, &(row, audit), |conn, &(row, audit)| {
            Box::pin(async move {
                records::put_upload(&mut *conn, row).await?;
                if let Some(entry) = audit {
                    records::insert_audit(conn, entry, AuditOutcome::Ok(1), now_millis()).await?;
                }
                announce(conn, &row.name).await
            })
        })
        .await
    }

    /// Removes an upload (the audit record only when there was one) and announces the
    /// change in the same transaction.
    pub(super) async fn delete_upload(
        &self,
        name: &str,
        audit: Option<&AuditEntry>,
    ) -> Result<bool> {
        in_tx(&self.pool, &(name, audit), |conn, &(name, audit)| {
            Box::pin(async move {
                let gone = records::delete_upload(&mut *conn, name).await?;
                if gone && let Some(entry) = audit {
                    records::insert_audit(conn, entry, AuditOutcome::Ok(1), now_millis()).await?;
                }
                announce(conn, name).await?;
                Ok(gone)
            })
        })
        .await
    }

    /// Sets a connector's enabled flag, with its audit record, and announces the change in
    /// the same transaction.
    pub(super) async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
        audit: Option<&AuditEntry>,
    ) -> Result<()> {
        in_tx(&self.pool, &(name, audit), |conn, &(name, audit)| {
            Box::pin(async move {
                let now = now_millis();
                records::set_enabled(&mut *conn, name, enabled, now).await?;
                if let Some(entry) = audit {
                    records::insert_audit(conn, entry, AuditOutcome::Ok(1), now).await?;
                }
                announce(conn, name).await
            })
        })
        .await
    }

    /// Writes one audit record on its own (autocommit).
    pub(super) async fn record_audit(
        &self,
        entry: &AuditEntry,
        outcome: AuditOutcome,
    ) -> Result<()> {
        records::insert_audit(&mut *self.conn().await?, entry, outcome, now_millis()).await
    }

    pub(super) async fn purge_audit(&self, before_ms: i64, limit: i64) -> Result<u64> {
        records::purge_audit(&mut *self.conn().await?, before_ms, limit).await
    }

    pub(super) async fn unlease(&self, ids: &[i64]) -> Result<()> {
        records::unlease(&mut *self.conn().await?, ids).await
    }

    /// A pooled connection, for the shared reads.
    pub(super) async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        Ok(self.pool.acquire().await?)
    }

    /// A listener on the connector-changes channel.
    pub(super) async fn listen_connectors(&self) -> Result<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener
            .listen(crate::store::connectors::CHANGES_CHANNEL)
            .await?;
        Ok(listener)
    }

    pub(super) async fn map(&self, cmd: MapCommand) -> Result<Session> {
        let now = now_millis();
        let session = retrying(|| sessions::map(&self.pool, &cmd, now)).await?;
        self.committed.notify_one();
        Ok(session)
    }

    pub(super) async fn destroy(&self, cmd: DestroyCommand) -> Result<Vec<Session>> {
        // A guarded, unlimited destroy (a pushed SET, a logout token) cannot be refused for
        // its size: it is committed together with the others queued meanwhile.
        if cmd.replay_guard.is_some() && cmd.max_sessions.is_none() {
            return self.group.destroy(cmd).await;
        }
        let changed = destroy_alone(&self.pool, &cmd).await?;
        if !changed.is_empty() {
            self.committed.notify_one();
        }
        Ok(changed)
    }

    pub(super) async fn apply_idp(&self, cmd: IdpCommand) -> Result<IdpOutcome> {
        let now = now_millis();
        let out = in_tx(&self.pool, &cmd, |conn, cmd| {
            Box::pin(sessions::apply_idp(conn, cmd, now))
        })
        .await?;
        self.committed.notify_one();
        Ok(out)
    }

    /// Signalled after commits that wrote outbox events on this instance.
    pub(super) fn committed(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.committed.clone()
    }

    pub(super) async fn fan_out(
        &self,
        route: &(dyn Fn(&crate::domain::SyncEvent) -> Vec<String> + Send + Sync),
        gate: &super::GateFn,
    ) -> Result<Option<super::deliveries::FanOut>> {
        let now = now_millis();
        in_tx(&self.pool, &(route, gate), |conn, &(route, gate)| {
            Box::pin(deliveries::fan_out(conn, route, gate, now))
        })
        .await
    }

    pub(super) async fn claim(
        &self,
        lane: &super::deliveries::LaneClaim,
    ) -> Result<Vec<super::deliveries::ClaimedDelivery>> {
        let now = now_millis();
        retrying(|| deliveries::claim(&self.pool, lane, now)).await
    }

    pub(super) async fn record(&self, records: &[super::deliveries::AttemptRecord]) -> Result<()> {
        retrying(|| deliveries::record(&self.pool, records)).await
    }

    /// Signals `wake` for every delivery announced by an instance, until `shutdown`; see
    /// [`super::Store::watch_deliveries`].
    pub(super) async fn watch_deliveries(
        &self,
        wake: std::sync::Arc<tokio::sync::Notify>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut backoff = std::time::Duration::from_millis(100);
        while !*shutdown.borrow() {
            let mut listener = match self.listen_deliveries().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for delivery announcements; polling");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    continue;
                }
            };
            backoff = std::time::Duration::from_millis(100);
            loop {
                tokio::select! {
                    got = listener.try_recv() => match got {
                        Ok(Some(_)) => wake.notify_one(),
                        // The connection dropped; announcements in between are lost, so
                        // look for work once now.
                        Ok(None) => wake.notify_one(),
                        Err(e) => {
                            tracing::warn!(error = %e, "delivery announcements interrupted");
                            wake.notify_one();
                            break;
                        }
                    },
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// A listener on the channel fan-outs announce new deliveries on.
    async fn listen_deliveries(&self) -> Result<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(deliveries::DELIVERIES_CHANNEL).await?;
        Ok(listener)
    }

    pub(super) async fn replay(
        &self,
        target: &super::deliveries::ReplayTarget,
        audit: Option<&crate::domain::AuditEntry>,
    ) -> Result<u64> {
        let now = now_millis();
        let n = in_tx(&self.pool, &(target, audit), |conn, &(target, audit)| {
            Box::pin(async move {
                let n = deliveries::replay(&mut *conn, target, now).await?;
                if let Some(entry) = audit {
                    let outcome = AuditOutcome::Ok(n as i64);
                    records::insert_audit(conn, entry, outcome, now).await?;
                }
                Ok(n)
            })
        })
        .await?;
        self.committed.notify_one();
        Ok(n)
    }

    pub(super) async fn tree(
        &self,
        realm: &str,
        id: &str,
        max: Option<usize>,
    ) -> Result<Option<Vec<Session>>> {
        // One snapshot for both statements, so the tree is consistent.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let tree = Ops::tree(&mut tx, realm, id, max).await?;
        tx.commit().await?;
        Ok(tree)
    }

    pub(super) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}
