//! The sync engine's writes on PostgreSQL: fan-out, claims, attempts, replays. Several
//! instances share one outbox, so batches and claims are taken `FOR UPDATE SKIP LOCKED`.
//! Rows go in and out as PostgreSQL arrays, so each statement text is fixed whatever the
//! batch size and is prepared once per connection.

use sqlx::PgExecutor;
use sqlx::postgres::PgConnection;

use crate::store::deliveries::{
    AttemptRecord, AttemptResult, ClaimedDelivery, FAN_OUT_BATCH, ReplayTarget,
};
use crate::store::{GateFn, Result, StoreError};
use crate::sync::model::SyncEvent;

/// Routes not-yet-fanned-out outbox events to connectors (`route` names them) and marks
/// them fanned out, in the caller's transaction. Returns (events, deliveries) handled, or
/// `None` when `gate` refuses the uploads this instance has loaded.
pub(crate) async fn fan_out(
    conn: &mut PgConnection,
    route: &(dyn Fn(&SyncEvent) -> Vec<String> + Send + Sync),
    gate: &GateFn,
    now: i64,
) -> Result<Option<(usize, usize)>> {
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
        .fetch_one(&mut *conn)
        .await?;
    if ids.is_empty() {
        return Ok(Some((0, 0)));
    }
    let uploads: Vec<(String, String)> = names.into_iter().zip(versions).collect();
    if !gate(&uploads) {
        return Ok(None);
    }
    let mut targets = Targets::default();
    for (id, payload) in ids.iter().zip(&payloads) {
        let event: SyncEvent = serde_json::from_str(payload)
            .map_err(|e| StoreError::Corrupt(format!("outbox row {id}: {e}")))?;
        for connector in route(&event) {
            targets.outbox_ids.push(*id);
            targets.event_ids.push(event.event_id.clone());
            targets.types.push(event.event_type.as_str());
            targets.connectors.push(connector);
            targets.realms.push(event.realm.clone());
            targets.sessions.push(event.external_id.clone());
        }
    }
    let deliveries = targets.outbox_ids.len();
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
    .execute(&mut *conn)
    .await?;
    Ok(Some((ids.len(), deliveries)))
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

/// Leases up to `limit` due deliveries of the given connectors, oldest first, never one
/// whose session has an earlier pending delivery to the same connector. One statement (the
/// lease and the events' payloads), so it commits on its own.
pub(crate) async fn claim<'c>(
    conn: impl PgExecutor<'c>,
    connectors: &[String],
    limit: i64,
    lease_until: i64,
    now: i64,
) -> Result<Vec<ClaimedDelivery>> {
    if connectors.is_empty() || limit <= 0 {
        return Ok(Vec::new());
    }
    let claimed: Vec<(i64, i64, String, i32, Option<String>)> = sqlx::query_as(
        "WITH claimed AS ( \
           UPDATE deliveries SET lease_until = $3, updated_at = $4 WHERE id IN ( \
             SELECT d.id FROM deliveries d \
             WHERE d.status = 'pending' AND d.next_attempt_at <= $4 \
               AND (d.lease_until IS NULL OR d.lease_until <= $4) \
               AND d.connector = ANY($2) AND NOT EXISTS ( \
                 SELECT 1 FROM deliveries e \
                 WHERE e.connector = d.connector AND e.realm = d.realm \
                   AND e.external_id = d.external_id AND e.status = 'pending' \
                   AND e.id < d.id) \
             ORDER BY d.id LIMIT $1 FOR UPDATE SKIP LOCKED \
           ) RETURNING id, outbox_id, connector, attempts \
         ) SELECT c.id, c.outbox_id, c.connector, c.attempts, o.payload \
           FROM claimed c LEFT JOIN outbox o ON o.id = c.outbox_id ORDER BY c.id",
    )
    .bind(limit)
    .bind(connectors)
    .bind(lease_until)
    .bind(now)
    .fetch_all(conn)
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

/// Records one finished attempt and its decision, in one statement.
pub(crate) async fn record<'c>(conn: impl PgExecutor<'c>, r: &AttemptRecord) -> Result<()> {
    let (status, next, delivered_at) = match r.result {
        AttemptResult::Delivered => ("delivered", r.finished_at, Some(r.finished_at)),
        AttemptResult::Retry { next_attempt_at } => ("pending", next_attempt_at, None),
        AttemptResult::Dead => ("dead", r.finished_at, None),
        AttemptResult::Dropped => ("dropped", r.finished_at, None),
    };
    sqlx::query(
        "WITH done AS ( \
           UPDATE deliveries SET status = $2, attempts = $3, next_attempt_at = $4, \
             lease_until = NULL, last_error = $5, connector_version = $6, updated_at = $7, \
             delivered_at = COALESCE($8, delivered_at) WHERE id = $1 \
         ) INSERT INTO delivery_attempts (delivery_id, attempt, outcome, error, \
             connector_version, started_at, finished_at) \
           VALUES ($1, $3, $9, $5, $6, $10, $7)",
    )
    .bind(r.delivery_id)
    .bind(status)
    .bind(r.attempt)
    .bind(next)
    .bind(&r.error)
    .bind(&r.version)
    .bind(r.finished_at)
    .bind(delivered_at)
    .bind(&r.outcome)
    .bind(r.started_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Puts dead (and dropped) deliveries back in the queue with fresh attempts.
pub(crate) async fn replay(
    conn: &mut PgConnection,
    target: &ReplayTarget,
    now: i64,
) -> Result<u64> {
    let done = match target {
        ReplayTarget::Connector(name) => {
            sqlx::query(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, \
                 lease_until = NULL, updated_at = $2 \
                 WHERE connector = $1 AND status IN ('dead', 'dropped')",
            )
            .bind(name)
            .bind(now)
            .execute(&mut *conn)
            .await?
        }
        ReplayTarget::Delivery(id) => {
            sqlx::query(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, \
                 lease_until = NULL, updated_at = $2 \
                 WHERE id = $1 AND status IN ('dead', 'dropped')",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *conn)
            .await?
        }
    };
    Ok(done.rows_affected())
}
