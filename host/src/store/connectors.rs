//! Records of the connector control plane: components uploaded through the admin API and the
//! enabled flag of every connector. Both live in the database so an upload survives a restart
//! and a change made on one instance reaches every instance sharing the database.

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use crate::store::Result;
use crate::store::ops::Shared;

/// PostgreSQL channel that announces a connector change (the payload is the name).
pub const CHANGES_CHANNEL: &str = "lockstep_connectors";

/// An uploaded connector as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct UploadRow {
    /// Connector name.
    pub name: String,
    /// Manifest text (TOML).
    pub manifest: String,
    /// Component bytes.
    pub component: Vec<u8>,
    /// Version (content hash of component and manifest).
    pub version: String,
    /// Last change (epoch ms).
    pub updated_at: i64,
}

/// Deliveries of one connector that are not delivered, by status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting for an attempt (or held while the connector is disabled or missing).
    pub pending: i64,
    /// Dead letters.
    pub dead: i64,
    /// Dropped under the `log` policy.
    pub dropped: i64,
}

/// How far the sync engine is behind, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Outbox events not yet routed to connectors.
    pub unrouted: i64,
    /// `created_at` (epoch ms) of the oldest event still waiting: unrouted, or with a
    /// pending delivery.
    pub oldest_waiting_ms: Option<i64>,
}

/// The connector reads (PostgreSQL's writes are in `postgres/records.rs`, SQLite's on its
/// writer thread).
impl<DB> Shared<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> UploadRow: FromRow<'r, DB::Row>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'r> (String, String, i64): FromRow<'r, DB::Row>,
    for<'r> (i64, Option<i64>): FromRow<'r, DB::Row>,
{
    /// One upload with its bytes.
    pub(crate) async fn get_upload(
        conn: &mut DB::Connection,
        name: &str,
    ) -> Result<Option<UploadRow>> {
        Ok(sqlx::query_as(
            "SELECT name, manifest, component, version, updated_at \
             FROM connector_uploads WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?)
    }

    /// Name and version of every upload (no bytes).
    pub(crate) async fn upload_versions(
        conn: &mut DB::Connection,
    ) -> Result<Vec<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT name, version FROM connector_uploads ORDER BY name")
                .fetch_all(&mut *conn)
                .await?,
        )
    }

    /// Names of the connectors switched off.
    pub(crate) async fn disabled(conn: &mut DB::Connection) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT name FROM connector_states WHERE enabled = 0 ORDER BY name")
                .fetch_all(&mut *conn)
                .await?,
        )
    }

    /// Undelivered deliveries per connector and status (the status index covers it), of
    /// every connector or of `only` one. Counting walks every undelivered row counted, so one
    /// connector's page counts its own: during a backlog of a few hundred thousand rows,
    /// counting all of them for each page took a seventh of the server's CPU.
    pub(crate) async fn queue_counts(
        conn: &mut DB::Connection,
        only: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, QueueCounts>> {
        let rows: Vec<(String, String, i64)> = match only {
            None => {
                sqlx::query_as(
                    "SELECT connector, status, COUNT(*) FROM deliveries \
                     WHERE status IN ('pending', 'dead', 'dropped') GROUP BY connector, status",
                )
                .fetch_all(&mut *conn)
                .await?
            }
            Some(name) => {
                sqlx::query_as(
                    "SELECT connector, status, COUNT(*) FROM deliveries \
                     WHERE status IN ('pending', 'dead', 'dropped') AND connector = $1 \
                     GROUP BY connector, status",
                )
                .bind(name)
                .fetch_all(&mut *conn)
                .await?
            }
        };
        let mut out = std::collections::BTreeMap::<String, QueueCounts>::new();
        for (connector, status, n) in rows {
            let c = out.entry(connector).or_default();
            match status.as_str() {
                "pending" => c.pending = n,
                "dead" => c.dead = n,
                _ => c.dropped = n,
            }
        }
        Ok(out)
    }

    /// Unrouted outbox events and the oldest event still waiting (both on partial or
    /// status indexes).
    pub(crate) async fn backlog(conn: &mut DB::Connection) -> Result<Backlog> {
        let (unrouted, oldest_unrouted): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE fanned_out = 0")
                .fetch_one(&mut *conn)
                .await?;
        // When the event was committed, not when it was routed.
        let oldest_pending: Option<i64> = sqlx::query_scalar(
            "SELECT created_at FROM outbox WHERE id = \
             (SELECT MIN(outbox_id) FROM deliveries WHERE status = 'pending')",
        )
        .fetch_optional(&mut *conn)
        .await?;
        let oldest_waiting_ms = match (oldest_unrouted, oldest_pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Backlog {
            unrouted,
            oldest_waiting_ms,
        })
    }
}
