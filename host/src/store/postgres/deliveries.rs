//! The sync engine's writes on PostgreSQL: fan-out, claims, attempts, replays. Several
//! instances share one outbox, so batches and claims are taken `FOR UPDATE SKIP LOCKED`.
//! Rows go in and out as PostgreSQL arrays, so each statement text is fixed whatever the
//! batch size. The fan-out, claim and record statements are sent unnamed
//! (`persistent(false)`), so PostgreSQL plans each call with the table's current size: after
//! five calls of a named statement its plan cache may keep a generic plan, and one made while
//! the table was small (a fresh install, the first seconds of a burst) scans the whole table
//! on every call until the next ANALYZE (the record statement: a sequential scan of 50,000
//! deliveries per batch of 100). Planning costs ~0.1-0.2 ms a batch, about a microsecond a
//! delivery.

use sqlx::PgExecutor;
use sqlx::postgres::{PgConnection, PgPool};

use crate::domain::SyncEvent;
use crate::store::deliveries::{
    AttemptRecord, ClaimedDelivery, FAN_OUT_BATCH, FanOut, LaneClaim, ReplayTarget,
    decision_columns,
};
use crate::store::{GateFn, Result, StoreError};

/// Channel on which a fan-out that created deliveries announces them (in its transaction),
/// so every instance's lanes claim at once instead of at their next poll.
pub(crate) const DELIVERIES_CHANNEL: &str = "lockstep_deliveries";

/// Routes not-yet-fanned-out outbox events to connectors (`route` names them) and marks
/// them fanned out, in the caller's transaction. Returns what was routed, or `None` when
/// `gate` refuses the uploads this instance has loaded.
pub(crate) async fn fan_out(
    conn: &mut PgConnection,
    route: &(dyn Fn(&SyncEvent) -> Vec<String> + Send + Sync),
    gate: &GateFn,
    now: i64,
) -> Result<Option<FanOut>> {
    // The uploads are read in the batch's snapshot: an upload committed before any event
    // of the batch is visible to it, which is all the gate needs.
    let (ids, payloads, names, versions): (Vec<i64>, Vec<String>, Vec<String>, Vec<String>) =
        sqlx::query_as(
            "WITH batch AS ( \
               SELECT id, payload FROM outbox WHERE fanned_out = 0 ORDER BY id LIMIT $1 \
               FOR UPDATE SKIP LOCKED \
             ) SELECT ARRAY(SELECT id FROM batch ORDER BY id), \
                      ARRAY(SELECT payload FROM batch ORDER BY id), \
                      ARRAY(SELECT name FROM connector_uploads ORDER BY name), \
                      ARRAY(SELECT version FROM connector_uploads ORDER BY name)",
        )
        .bind(FAN_OUT_BATCH)
        .persistent(false)
        .fetch_one(&mut *conn)
        .await?;
    if ids.is_empty() {
        return Ok(Some(FanOut::default()));
    }
    let uploads: Vec<(String, String)> = names.into_iter().zip(versions).collect();
    if !gate(&uploads) {
        return Ok(None);
    }
    let mut targets = Targets::default();
    let mut done = FanOut {
        events: ids.len(),
        ..FanOut::default()
    };
    for (id, payload) in ids.iter().zip(&payloads) {
        let event: SyncEvent = serde_json::from_str(payload)
            .map_err(|e| StoreError::Corrupt(format!("outbox row {id}: {e}")))?;
        for connector in route(&event) {
            done.routed(&connector, &event);
            targets.outbox_ids.push(*id);
            targets.event_ids.push(event.event_id.clone());
            targets.types.push(event.event_type.as_str());
            targets.connectors.push(connector);
            targets.realms.push(event.realm.clone());
            targets.sessions.push(event.external_id.clone());
        }
    }
    sqlx::query(
        "WITH routed AS ( \
           INSERT INTO deliveries (outbox_id, event_id, event_type, connector, realm, \
             external_id, status, attempts, next_attempt_at, created_at, updated_at) \
           SELECT d.outbox_id, d.event_id, d.event_type, d.connector, d.realm, d.external_id, \
             'pending', 0, $2, $2, $2 \
           FROM unnest(CAST($3 AS bigint[]), CAST($4 AS text[]), CAST($5 AS text[]), \
                       CAST($6 AS text[]), CAST($7 AS text[]), CAST($8 AS text[])) \
             WITH ORDINALITY AS d(outbox_id, event_id, event_type, connector, realm, \
                                  external_id, n) \
           ORDER BY d.n \
           ON CONFLICT (outbox_id, connector) DO NOTHING \
         ) UPDATE outbox SET fanned_out = 1 WHERE id = ANY($1)",
    )
    .bind(&ids)
    .bind(now)
    .bind(targets.outbox_ids)
    .bind(targets.event_ids)
    .bind(targets.types)
    .bind(targets.connectors)
    .bind(targets.realms)
    .bind(targets.sessions)
    .persistent(false)
    .execute(&mut *conn)
    .await?;
    if done.deliveries > 0 {
        // Delivered with the commit; a listener that misses it (reconnecting) still polls.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(DELIVERIES_CHANNEL)
            .execute(&mut *conn)
            .await?;
    }
    Ok(Some(done))
}

/// Deliveries to create, as parallel arrays.
#[derive(Default)]
struct Targets {
    outbox_ids: Vec<i64>,
    event_ids: Vec<String>,
    types: Vec<&'static str>,
    connectors: Vec<String>,
    realms: Vec<String>,
    sessions: Vec<String>,
}

/// One lane's claim (see [`claim`]): `$1` the connector, `$2` the limit, `$3` the lease's
/// end, `$4` now.
const CLAIM_SQL: &str = "WITH picked AS ( \
       SELECT d.id FROM deliveries d \
       WHERE d.status = 'pending' AND d.connector = $1 AND d.next_attempt_at <= $4 \
         AND (d.lease_until IS NULL OR d.lease_until <= $4) AND d.id <= ( \
           SELECT e.id FROM deliveries e \
           WHERE e.connector = d.connector AND e.realm = d.realm \
             AND e.external_id = d.external_id AND e.status = 'pending' \
           ORDER BY e.id LIMIT 1) \
       ORDER BY d.next_attempt_at, d.id LIMIT $2 FOR UPDATE SKIP LOCKED \
     ), claimed AS ( \
       UPDATE deliveries SET updated_at = $4, lease_until = $3 \
       WHERE deliveries.id = ANY(ARRAY(SELECT id FROM picked)) \
       RETURNING deliveries.id, deliveries.outbox_id, deliveries.connector, \
         deliveries.attempts \
     ) SELECT c.id, c.outbox_id, c.connector, c.attempts, \
         (SELECT o.payload FROM outbox o WHERE o.id = c.outbox_id) \
       FROM claimed c ORDER BY c.id";

/// Leases up to the lane's limit of its connector's due deliveries, most overdue first, never one
/// whose session has an earlier pending delivery to the same connector. One statement (the leases
/// and the events' payloads) that commits on its own; rows another instance is claiming are
/// skipped, not waited for. The leased rows and their payloads are looked up by key (`= ANY`, a
/// scalar subquery): written as joins, the planner hashed the whole outbox for every claim (30 ms
/// at 80,000 events). The session check is a scalar subquery too (the session's first pending
/// delivery must be this one), which the planner runs per candidate on the pending-session index;
/// written as `NOT EXISTS`, it became an anti-join, and with statistics taken while the table was
/// small the planner compared every pending row of the connector with each candidate (26 ms per
/// claim, 2,000 deliveries/s, in a backlog of 50,000). The check reads "no earlier than the
/// session's first" (`<=`), which means the same (the row itself is pending): the planner takes an
/// equality with a subquery to match one row, and for a claim larger than about a hundred it then
/// sorted every pending row of the lane, running the check for each, instead of reading the lane
/// index in order and stopping at the limit (53 ms against 4 ms for 256 of a backlog of 20,000).
pub(crate) async fn claim(
    pool: &PgPool,
    lane: &LaneClaim,
    now: i64,
) -> Result<Vec<ClaimedDelivery>> {
    let claimed: Vec<(i64, i64, String, i32, Option<String>)> = sqlx::query_as(CLAIM_SQL)
        .bind(&lane.connector)
        .bind(lane.limit)
        .bind(lane.lease_until)
        .bind(now)
        // Planned with this call's values every time (an unnamed statement): a generic plan
        // made while the table looked empty scans it whole, per candidate, until the next
        // ANALYZE (3 s per claim at 6,000 rows).
        .persistent(false)
        .fetch_all(pool)
        .await?;
    claimed
        .into_iter()
        .map(|(id, outbox_id, connector, attempts, payload)| {
            let payload = payload.ok_or_else(|| {
                StoreError::Corrupt(format!("delivery {id}: outbox row {outbox_id} missing"))
            })?;
            let event: SyncEvent = serde_json::from_str(&payload)
                .map_err(|e| StoreError::Corrupt(format!("outbox row {outbox_id}: {e}")))?;
            Ok(ClaimedDelivery {
                id,
                connector,
                attempts,
                event,
            })
        })
        .collect()
}

/// Records finished attempts and their decisions, in one statement (rows as arrays): a
/// failed attempt as a row of its own, the one that delivers on the delivery row.
pub(crate) async fn record<'c>(conn: impl PgExecutor<'c>, records: &[AttemptRecord]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let mut cols = RecordColumns::default();
    for r in records {
        let (status, next, delivered_at) = decision_columns(r);
        cols.ids.push(r.delivery_id);
        cols.statuses.push(status);
        cols.attempts.push(r.attempt);
        cols.next.push(next);
        cols.errors.push(r.error.as_deref());
        cols.versions.push(r.version.as_str());
        cols.finished.push(r.finished_at);
        cols.delivered.push(delivered_at);
        cols.outcomes.push(r.outcome.as_str());
        cols.started.push(r.started_at);
    }
    sqlx::query(
        "WITH r AS ( \
           SELECT * FROM unnest(CAST($1 AS bigint[]), CAST($2 AS text[]), CAST($3 AS int[]), \
             CAST($4 AS bigint[]), CAST($5 AS text[]), CAST($6 AS text[]), \
             CAST($7 AS bigint[]), CAST($8 AS bigint[]), CAST($9 AS text[]), \
             CAST($10 AS bigint[])) \
             AS r(id, status, attempt, next, error, version, finished, delivered, outcome, \
                  started) \
         ), done AS ( \
           UPDATE deliveries d SET status = r.status, attempts = r.attempt, \
             next_attempt_at = r.next, lease_until = NULL, last_error = r.error, \
             connector_version = r.version, updated_at = r.finished, \
             delivered_at = COALESCE(r.delivered, d.delivered_at), \
             delivered_started_at = CASE WHEN r.status = 'delivered' THEN r.started \
               ELSE d.delivered_started_at END \
           FROM r WHERE d.id = r.id \
         ) INSERT INTO delivery_attempts (delivery_id, attempt, outcome, error, \
             connector_version, started_at, finished_at) \
           SELECT id, attempt, outcome, error, version, started, finished FROM r \
           WHERE r.status <> 'delivered'",
    )
    .bind(cols.ids)
    .bind(cols.statuses)
    .bind(cols.attempts)
    .bind(cols.next)
    .bind(cols.errors)
    .bind(cols.versions)
    .bind(cols.finished)
    .bind(cols.delivered)
    .bind(cols.outcomes)
    .bind(cols.started)
    .persistent(false)
    .execute(conn)
    .await?;
    Ok(())
}

/// Attempt records as parallel arrays.
#[derive(Default)]
struct RecordColumns<'a> {
    ids: Vec<i64>,
    statuses: Vec<&'static str>,
    attempts: Vec<i32>,
    next: Vec<i64>,
    errors: Vec<Option<&'a str>>,
    versions: Vec<&'a str>,
    finished: Vec<i64>,
    delivered: Vec<Option<i64>>,
    outcomes: Vec<&'a str>,
    started: Vec<i64>,
}

/// Puts dead (and dropped) deliveries back in the queue with fresh attempts.
pub(crate) async fn replay(
    conn: &mut PgConnection,
    target: &ReplayTarget,
    now: i64,
) -> Result<u64> {
    let query = match target {
        ReplayTarget::Connector(name) => sqlx::query(
            "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, \
             lease_until = NULL, updated_at = $2 \
             WHERE connector = $1 AND status IN ('dead', 'dropped')",
        )
        .bind(name),
        ReplayTarget::Delivery(id) => sqlx::query(
            "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, \
             lease_until = NULL, updated_at = $2 \
             WHERE id = $1 AND status IN ('dead', 'dropped')",
        )
        .bind(id),
    };
    Ok(query.bind(now).execute(&mut *conn).await?.rows_affected())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::CLAIM_SQL;
    use crate::store::deliveries::{AttemptRecord, AttemptResult};

    /// A fresh database on the test server with the migrations applied, or `None` when the
    /// PostgreSQL tests are skipped.
    async fn scratch(prefix: &str) -> Option<(String, String, sqlx::PgPool)> {
        let admin = testkit::postgres::test_server()?;
        let name = testkit::postgres::unique_name(prefix);
        let url = testkit::postgres::create_database(&admin, &name)
            .await
            .unwrap();
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .unwrap();
        Some((admin, name, pool))
    }

    #[tokio::test]
    async fn the_delivering_attempt_stays_on_the_row_and_failed_ones_get_rows() {
        let Some((admin, name, pool)) = scratch("lockstep_record_").await else {
            return;
        };
        sqlx::query(
            "INSERT INTO deliveries (outbox_id, event_id, event_type, connector, realm, \
               external_id, status, attempts, next_attempt_at, created_at, updated_at) \
             SELECT g, 'e' || g, 'login', 'c', 'r', 's' || g, 'pending', 0, 1, 1, 1 \
             FROM generate_series(1, 2) g",
        )
        .execute(&pool)
        .await
        .unwrap();
        let attempt = |id: i64, result: AttemptResult, outcome: &str| AttemptRecord {
            delivery_id: id,
            attempt: 1,
            result,
            outcome: outcome.to_owned(),
            error: (outcome != "delivered").then(|| "HTTP 503".to_owned()),
            version: "v1".to_owned(),
            started_at: 100,
            finished_at: 110,
        };
        super::record(
            &pool,
            &[
                attempt(1, AttemptResult::Delivered, "delivered"),
                attempt(
                    2,
                    AttemptResult::Retry {
                        next_attempt_at: 500,
                    },
                    "retry",
                ),
            ],
        )
        .await
        .unwrap();
        let rows: Vec<(i64, String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT id, status, delivered_at, delivered_started_at FROM deliveries ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let attempts: Vec<(i64, String)> =
            sqlx::query_as("SELECT delivery_id, outcome FROM delivery_attempts ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        pool.close().await;
        testkit::postgres::drop_database(&admin, &name)
            .await
            .unwrap();
        assert_eq!(
            rows,
            [
                (1, "delivered".to_owned(), Some(110), Some(100)),
                (2, "pending".to_owned(), None, None),
            ]
        );
        assert_eq!(attempts, [(2, "retry".to_owned())]);
    }

    /// What a claim of `limit` costs: the shared buffers it touched and the rows it leased.
    async fn explain_claim(pool: &sqlx::PgPool, limit: i64) -> (u64, u64) {
        let (plan,): (sqlx::types::Json<serde_json::Value>,) = sqlx::query_as(&format!(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {CLAIM_SQL}"
        ))
        .bind("noop")
        .bind(limit)
        .bind(i64::MAX / 4)
        .bind(i64::MAX / 8)
        .fetch_one(pool)
        .await
        .unwrap();
        let top = &plan.0[0]["Plan"];
        let blocks = top["Shared Hit Blocks"].as_u64().unwrap()
            + top["Shared Read Blocks"].as_u64().unwrap();
        (blocks, top["Actual Rows"].as_u64().unwrap())
    }

    /// The cases that once made claims walk the whole backlog. Statistics taken over a
    /// history of decided deliveries, then a backlog that builds up before the next ANALYZE:
    /// the planner believes pending rows are rare, and ran the session check on an index of
    /// every status, filtering every pending row of the connector for each candidate
    /// (12,573,711 buffers, 20 s, for a claim of 16 in a backlog of 17,000). Then statistics
    /// that know the backlog and a quick lane's claim of 256: with the check read as an
    /// equality the planner sorted the whole backlog, checking each row (71,225 buffers).
    /// Four connectors share the table, as in a real outbox. Counted in buffers, not timed.
    #[tokio::test]
    async fn a_claim_reads_a_few_pages_per_delivery_however_long_the_backlog() {
        let Some((admin, name, pool)) = scratch("lockstep_claim_plan_").await else {
            return;
        };
        let rows = |status: &'static str, from: i64, to: i64| {
            sqlx::query(
                "INSERT INTO deliveries (outbox_id, event_id, event_type, connector, realm, \
                   external_id, status, attempts, next_attempt_at, created_at, updated_at) \
                 SELECT g, 'e' || g, 'login', CASE g % 4 WHEN 0 THEN 'noop' ELSE 'c' || g % 4 END, \
                   'r', 's' || g, $1, 0, 1, 1, 1 \
                 FROM generate_series($2::bigint, $3::bigint) g",
            )
            .bind(status)
            .bind(from)
            .bind(to)
        };
        rows("delivered", 1, 12_000).execute(&pool).await.unwrap();
        sqlx::query("ANALYZE deliveries")
            .execute(&pool)
            .await
            .unwrap();
        rows("pending", 12_001, 80_000)
            .execute(&pool)
            .await
            .unwrap();

        let (blocks, leased) = explain_claim(&pool, 16).await;
        // Then statistics that know the backlog, and a claim of a quick lane's size: the
        // planner must still read the lane in order and stop at the limit, not sort the
        // backlog and check every row of it (it did while the check read as an equality).
        sqlx::query("ANALYZE deliveries")
            .execute(&pool)
            .await
            .unwrap();
        let (deep_blocks, deep_leased) = explain_claim(&pool, 256).await;

        pool.close().await;
        testkit::postgres::drop_database(&admin, &name)
            .await
            .unwrap();
        assert_eq!(
            leased, 16,
            "a claim of 16 over a backlog of 3,000 leases 16"
        );
        assert!(
            blocks <= 16 * 20,
            "a claim of 16 touched {blocks} buffers: the session check walks the backlog"
        );
        assert_eq!(deep_leased, 256, "a claim of 256 leases 256");
        assert!(
            deep_blocks <= 256 * 20,
            "a claim of 256 touched {deep_blocks} buffers: it checks the whole backlog"
        );
    }
}
