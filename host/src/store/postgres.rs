//! PostgreSQL backend: every operation is one pooled transaction, a single statement in
//! autocommit where the operation is one (a map, a claim, an attempt). Concurrent instances
//! are safe because map-child holds its parent row FOR SHARE while a destroy locks its target
//! FOR UPDATE and re-checks for children committed while it ran.

mod deliveries;
mod sessions;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use super::{Page, Result, SessionQuery, StoreError, StoreOptions, now_millis};
use crate::domain::{DestroyCommand, IdpCommand, IdpOutcome, MapCommand, Session};

pub(super) mod ops {
    use crate::store::{Result, StoreError};

    mod reads {
        crate::store::ops::session_reads!(db = sqlx::Postgres, conn = sqlx::postgres::PgConnection);
    }
    pub(crate) use reads::*;
    crate::store::deliveries::delivery_reads!(
        db = sqlx::Postgres,
        conn = sqlx::postgres::PgConnection,
        ids = "SELECT jsonb_array_elements_text(CAST($2 AS jsonb))",
    );
    crate::store::connectors::connector_ops!(
        db = sqlx::Postgres,
        conn = sqlx::postgres::PgConnection,
    );
    crate::store::audit::audit_ops!(db = sqlx::Postgres, conn = sqlx::postgres::PgConnection,);

    /// Announces a connector change to every instance (delivered when the transaction commits).
    pub(crate) async fn announce(
        conn: &mut sqlx::postgres::PgConnection,
        name: &str,
    ) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::store::connectors::CHANGES_CHANNEL)
            .bind(name)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Deadlocks and serialisation failures between concurrent cascades are retried this often.
const MAX_TX_ATTEMPTS: usize = 5;

/// Handle to the PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pub(super) pool: PgPool,
    committed: std::sync::Arc<tokio::sync::Notify>,
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
/// serialisation failure as [`in_tx!`] does.
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

/// Runs `$body` (an expression using `$conn: &mut PgConnection`) in a transaction, retrying
/// on deadlock or serialisation failure.
macro_rules! in_tx {
    ($pool:expr, |$conn:ident| $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = $pool.begin().await?;
            let result = {
                let $conn: &mut sqlx::PgConnection = &mut tx;
                $body.await
            };
            match result {
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
    }};
}

impl PgStore {
    pub(super) async fn open(opts: &StoreOptions) -> Result<Self> {
        // JIT off: every statement here is a short OLTP one, but with a million rows the
        // planner's estimate for the cascade passes jit_above_cost and each destroy paid a
        // 70-290 ms compile for a 0.55 ms statement (xtask bench --rows 1000000).
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
        Ok(PgStore {
            pool,
            committed: std::sync::Arc::new(tokio::sync::Notify::new()),
        })
    }

    pub(super) async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    /// Runs a connector control-plane change and announces it in the same transaction.
    pub(super) async fn connector_change<T, F>(&self, name: &str, f: F) -> Result<T>
    where
        F: for<'c> Fn(&'c mut sqlx::PgConnection) -> futures::future::BoxFuture<'c, Result<T>>,
    {
        in_tx!(self.pool, |conn| async {
            let out = f(&mut *conn).await?;
            ops::announce(conn, name).await?;
            Ok(out)
        })
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
        let now = now_millis();
        let changed = in_tx!(self.pool, |conn| sessions::destroy(conn, &cmd, now))?;
        if !changed.is_empty() {
            self.committed.notify_one();
        }
        Ok(changed)
    }

    pub(super) async fn apply_idp(&self, cmd: IdpCommand) -> Result<IdpOutcome> {
        let now = now_millis();
        let out = in_tx!(self.pool, |conn| sessions::apply_idp(conn, &cmd, now))?;
        self.committed.notify_one();
        Ok(out)
    }

    pub(super) async fn expired(&self, now: i64, limit: i64) -> Result<Vec<(String, String)>> {
        let mut conn = self.pool.acquire().await?;
        ops::expired(&mut conn, now, limit).await
    }

    pub(super) async fn live_idp_parents(
        &self,
        realm: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Session>> {
        let mut conn = self.pool.acquire().await?;
        ops::live_idp_parents(&mut conn, realm, after, limit).await
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
        in_tx!(self.pool, |conn| deliveries::fan_out(
            conn, route, gate, now
        ))
    }

    pub(super) async fn claim(
        &self,
        lanes: &[super::deliveries::LaneClaim],
    ) -> Result<Vec<super::deliveries::ClaimedDelivery>> {
        let now = now_millis();
        retrying(|| deliveries::claim(&self.pool, lanes, now)).await
    }

    pub(super) async fn record(&self, records: &[super::deliveries::AttemptRecord]) -> Result<()> {
        retrying(|| deliveries::record(&self.pool, records)).await
    }

    /// A listener on the channel fan-outs announce new deliveries on.
    pub(super) async fn listen_deliveries(&self) -> Result<sqlx::postgres::PgListener> {
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
        let n = in_tx!(self.pool, |conn| async {
            let n = deliveries::replay(&mut *conn, target, now).await?;
            if let Some(entry) = audit {
                let outcome = crate::domain::AuditOutcome::Ok(n as i64);
                ops::insert_audit(conn, entry, outcome, now).await?;
            }
            Ok(n)
        })?;
        self.committed.notify_one();
        Ok(n)
    }

    pub(super) async fn get(&self, realm: &str, id: &str) -> Result<Option<Session>> {
        let mut conn = self.pool.acquire().await?;
        ops::get(&mut conn, realm, id).await
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
        let tree = ops::tree(&mut tx, realm, id, max).await?;
        tx.commit().await?;
        Ok(tree)
    }

    pub(super) async fn query(&self, realm: &str, q: &SessionQuery) -> Result<Page> {
        let mut conn = self.pool.acquire().await?;
        ops::query(&mut conn, realm, q).await
    }

    pub(super) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}
