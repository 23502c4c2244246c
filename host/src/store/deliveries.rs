//! Records of the sync engine: per-connector deliveries of outbox events, their attempts,
//! and the reads over them (generated per backend by [`delivery_reads!`]). The writes are
//! per backend: `postgres/deliveries.rs`, and SQLite's writer thread.

use serde::Serialize;

use crate::sync::model::SyncEvent;

/// A delivery's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its (next) attempt.
    Pending,
    /// The connector confirmed it.
    Delivered,
    /// Gave up (dead letter); can be replayed.
    Dead,
    /// Failed under the `log` policy: recorded and dropped; can be replayed.
    Dropped,
}

impl DeliveryStatus {
    /// Spelling in SQL and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Dropped => "dropped",
        }
    }

    /// Parses the SQL spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "dead" => Some(DeliveryStatus::Dead),
            "dropped" => Some(DeliveryStatus::Dropped),
            _ => None,
        }
    }
}

/// A delivery claimed for an attempt (leased to this instance).
#[derive(Clone, Debug)]
pub struct ClaimedDelivery {
    /// Delivery id.
    pub id: i64,
    /// Target connector.
    pub connector: String,
    /// Attempts made before this one.
    pub attempts: i32,
    /// The event.
    pub event: SyncEvent,
}

/// What an attempt decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// Confirmed.
    Delivered,
    /// Try again at this time (epoch ms).
    Retry {
        /// When.
        next_attempt_at: i64,
    },
    /// Dead letter.
    Dead,
    /// Dropped (log policy).
    Dropped,
}

/// One finished attempt, to record.
#[derive(Clone, Debug)]
pub struct AttemptRecord {
    /// Delivery id.
    pub delivery_id: i64,
    /// Number of this attempt (1-based).
    pub attempt: i32,
    /// Decision.
    pub result: AttemptResult,
    /// `delivered`, `retry`, `fail`, `timeout`, `oom`, `trap` or `unavailable`.
    pub outcome: String,
    /// Failure reason.
    pub error: Option<String>,
    /// Connector version that served it.
    pub version: String,
    /// Start (epoch ms).
    pub started_at: i64,
    /// End (epoch ms).
    pub finished_at: i64,
}

/// A delivery as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeliveryRow {
    /// Id.
    pub id: i64,
    /// Outbox event id (stable across redeliveries).
    pub event_id: String,
    /// login, logout, revoke, refresh.
    pub event_type: String,
    /// Target connector.
    pub connector: String,
    /// Realm of the session.
    pub realm: String,
    /// Session.
    pub external_id: String,
    /// pending, delivered, dead, dropped.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// Next attempt (epoch ms), for pending deliveries.
    pub next_attempt_at: i64,
    /// Last failure.
    pub last_error: Option<String>,
    /// Version of the connector that made the last attempt.
    pub connector_version: Option<String>,
    /// Created (epoch ms).
    pub created_at: i64,
    /// Last change (epoch ms).
    pub updated_at: i64,
    /// Confirmed (epoch ms).
    pub delivered_at: Option<i64>,
}

/// An attempt as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AttemptRow {
    /// Number (1-based).
    pub attempt: i32,
    /// Outcome label.
    pub outcome: String,
    /// Failure reason.
    pub error: Option<String>,
    /// Connector version.
    pub connector_version: Option<String>,
    /// Start (epoch ms).
    pub started_at: i64,
    /// End (epoch ms).
    pub finished_at: i64,
}

/// Filters of the deliveries listing.
#[derive(Clone, Debug, Default)]
pub struct DeliveryQuery {
    /// Only this status.
    pub status: Option<DeliveryStatus>,
    /// Only this connector.
    pub connector: Option<String>,
    /// Only this session (external id).
    pub session: Option<String>,
    /// Only this realm.
    pub realm: Option<String>,
    /// Rows after this id.
    pub after: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// Which dead letters to replay.
#[derive(Clone, Debug)]
pub enum ReplayTarget {
    /// Every dead (and dropped) delivery of a connector.
    Connector(String),
    /// One delivery.
    Delivery(i64),
}

/// Most deliveries created per fan-out round.
pub(crate) const FAN_OUT_BATCH: i64 = 500;

/// Generates the delivery reads for one backend (`ids`: a subquery that expands the JSON
/// array of text bound at `$2`).
macro_rules! delivery_reads {
    (db = $db:ty, conn = $conn:ty, ids = $ids:literal $(,)?) => {
        use crate::store::deliveries::{AttemptRow, DeliveryQuery, DeliveryRow};

        pub(crate) async fn list_deliveries(
            conn: &mut $conn,
            q: &DeliveryQuery,
        ) -> Result<Vec<DeliveryRow>> {
            let mut qb = sqlx::QueryBuilder::<$db>::new(
                "SELECT id, event_id, event_type, connector, realm, external_id, status, attempts, \
                 next_attempt_at, last_error, connector_version, created_at, updated_at, \
                 delivered_at FROM deliveries WHERE 1 = 1",
            );
            if let Some(s) = q.status {
                qb.push(" AND status = ").push_bind(s.as_str());
            }
            if let Some(c) = &q.connector {
                qb.push(" AND connector = ").push_bind(c.clone());
            }
            if let Some(r) = &q.realm {
                qb.push(" AND realm = ").push_bind(r.clone());
            }
            if let Some(s) = &q.session {
                qb.push(" AND external_id = ").push_bind(s.clone());
            }
            if let Some(a) = q.after {
                qb.push(" AND id > ").push_bind(a);
            }
            qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(q.limit));
            Ok(qb.build_query_as().fetch_all(&mut *conn).await?)
        }

        pub(crate) async fn get_delivery(
            conn: &mut $conn,
            id: i64,
        ) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>> {
            let row: Option<DeliveryRow> = sqlx::query_as(
                "SELECT id, event_id, event_type, connector, realm, external_id, status, attempts, \
                 next_attempt_at, last_error, connector_version, created_at, updated_at, \
                 delivered_at FROM deliveries WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let attempts: Vec<AttemptRow> = sqlx::query_as(
                "SELECT attempt, outcome, error, connector_version, started_at, finished_at \
                 FROM delivery_attempts WHERE delivery_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
            Ok(Some((row, attempts)))
        }

        /// Deliveries of some sessions of a realm (for the session tree).
        pub(crate) async fn session_deliveries(
            conn: &mut $conn,
            realm: &str,
            external_ids: &[String],
        ) -> Result<Vec<DeliveryRow>> {
            if external_ids.is_empty() {
                return Ok(Vec::new());
            }
            let ids = serde_json::to_string(external_ids)
                .map_err(|e| StoreError::Corrupt(format!("ids: {e}")))?;
            Ok(sqlx::query_as(concat!(
                "SELECT id, event_id, event_type, connector, realm, external_id, status, attempts, \
                 next_attempt_at, last_error, connector_version, created_at, updated_at, \
                 delivered_at FROM deliveries WHERE realm = $1 AND external_id IN (",
                $ids,
                ") ORDER BY id"
            ))
            .bind(realm)
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?)
        }
    };
}

pub(crate) use delivery_reads;

/// The delivery reads plus backend-neutral sqlx versions of the writes, as SQLite's read
/// module instantiates them (its writes run on its writer thread, these stay unused there).
/// PostgreSQL has its own writes (`postgres/deliveries.rs`) and uses [`delivery_reads!`].
/// `skip_locked`: the claim's row-lock suffix; `int_ids`: `ids` for integers.
macro_rules! delivery_ops {
    (
        db = $db:ty,
        conn = $conn:ty,
        skip_locked = $skip_locked:literal,
        ids = $ids:literal,
        int_ids = $int_ids:literal $(,)?
    ) => {
        crate::store::deliveries::delivery_reads!(db = $db, conn = $conn, ids = $ids);
        use crate::store::deliveries::{
            AttemptRecord, AttemptResult, ClaimedDelivery, ReplayTarget, FAN_OUT_BATCH,
        };

        /// Routes not-yet-fanned-out outbox events to connectors (`route` names them) and
        /// marks them fanned out. Returns (events, deliveries) handled.
        pub(crate) async fn fan_out(
            conn: &mut $conn,
            route: &(dyn Fn(&SyncEvent) -> Vec<String> + Send + Sync),
            gate: &crate::store::GateFn,
            now: i64,
        ) -> Result<Option<(usize, usize)>> {
            let rows: Vec<(i64, String)> = sqlx::query_as(concat!(
                "SELECT id, payload FROM outbox WHERE fanned_out = 0 ORDER BY id LIMIT $1",
                $skip_locked
            ))
            .bind(FAN_OUT_BATCH)
            .fetch_all(&mut *conn)
            .await?;
            if rows.is_empty() {
                return Ok(Some((0, 0)));
            }
            // Read after the batch: an upload committed before any of these events is seen.
            if !gate(&upload_versions(&mut *conn).await?) {
                return Ok(None);
            }
            let mut targets: Vec<(i64, SyncEvent, String)> = Vec::new();
            for (id, payload) in &rows {
                let event: SyncEvent = serde_json::from_str(payload)
                    .map_err(|e| StoreError::Corrupt(format!("outbox row {id}: {e}")))?;
                for connector in route(&event) {
                    targets.push((*id, event.clone(), connector));
                }
            }
            for chunk in targets.chunks(EVENT_CHUNK) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO deliveries (outbox_id, event_id, event_type, connector, realm, \
                     external_id, status, attempts, next_attempt_at, created_at, updated_at) ",
                );
                qb.push_values(chunk, |mut b, (id, e, connector)| {
                    b.push_bind(*id)
                        .push_bind(e.event_id.clone())
                        .push_bind(e.event_type.as_str())
                        .push_bind(connector.clone())
                        .push_bind(e.realm.clone())
                        .push_bind(e.external_id.clone())
                        .push_bind("pending")
                        .push_bind(0i32)
                        .push_bind(now)
                        .push_bind(now)
                        .push_bind(now);
                });
                qb.push(" ON CONFLICT (outbox_id, connector) DO NOTHING");
                qb.build().execute(&mut *conn).await?;
            }
            let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
            let ids = serde_json::to_string(&ids)
                .map_err(|e| StoreError::Corrupt(format!("ids: {e}")))?;
            sqlx::query(concat!(
                "UPDATE outbox SET fanned_out = 1 WHERE id IN (",
                $int_ids,
                ")"
            ))
            .bind(0i32)
            .bind(ids)
            .execute(&mut *conn)
            .await?;
            Ok(Some((rows.len(), targets.len())))
        }

        /// Leases up to `limit` due deliveries of the given connectors, oldest first, never
        /// one whose session has an earlier pending delivery to the same connector.
        pub(crate) async fn claim(
            conn: &mut $conn,
            connectors: &[String],
            limit: i64,
            lease_until: i64,
            now: i64,
        ) -> Result<Vec<ClaimedDelivery>> {
            if connectors.is_empty() || limit <= 0 {
                return Ok(Vec::new());
            }
            let names = serde_json::to_string(connectors)
                .map_err(|e| StoreError::Corrupt(format!("names: {e}")))?;
            let claimed: Vec<(i64, i64, String, i32)> = sqlx::query_as(concat!(
                "UPDATE deliveries SET lease_until = $3, updated_at = $4 WHERE id IN ( \
                   SELECT d.id FROM deliveries d \
                   WHERE d.status = 'pending' AND d.next_attempt_at <= $4 \
                     AND (d.lease_until IS NULL OR d.lease_until <= $4) \
                     AND d.connector IN (",
                $ids,
                ") AND NOT EXISTS ( \
                       SELECT 1 FROM deliveries e \
                       WHERE e.connector = d.connector AND e.realm = d.realm \
                         AND e.external_id = d.external_id AND e.status = 'pending' \
                         AND e.id < d.id) \
                   ORDER BY d.id LIMIT $1",
                $skip_locked,
                ") RETURNING id, outbox_id, connector, attempts"
            ))
            .bind(limit)
            .bind(names)
            .bind(lease_until)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
            if claimed.is_empty() {
                return Ok(Vec::new());
            }
            let outbox_ids: Vec<i64> = claimed.iter().map(|c| c.1).collect();
            let outbox_ids = serde_json::to_string(&outbox_ids)
                .map_err(|e| StoreError::Corrupt(format!("ids: {e}")))?;
            let payloads: Vec<(i64, String)> = sqlx::query_as(concat!(
                "SELECT id, payload FROM outbox WHERE id IN (",
                $int_ids,
                ")"
            ))
            .bind(0i32)
            .bind(outbox_ids)
            .fetch_all(&mut *conn)
            .await?;
            let payloads: std::collections::HashMap<i64, String> = payloads.into_iter().collect();
            let mut out = Vec::with_capacity(claimed.len());
            for (id, outbox_id, connector, attempts) in claimed {
                let payload = payloads.get(&outbox_id).ok_or_else(|| {
                    StoreError::Corrupt(format!("delivery {id}: outbox row {outbox_id} missing"))
                })?;
                let event: SyncEvent = serde_json::from_str(payload)
                    .map_err(|e| StoreError::Corrupt(format!("outbox row {outbox_id}: {e}")))?;
                out.push(ClaimedDelivery { id, connector, attempts, event });
            }
            out.sort_by_key(|c| c.id);
            Ok(out)
        }

        /// Records one finished attempt and its decision.
        pub(crate) async fn record(conn: &mut $conn, r: &AttemptRecord) -> Result<()> {
            let (status, next, delivered_at) = match r.result {
                AttemptResult::Delivered => ("delivered", r.finished_at, Some(r.finished_at)),
                AttemptResult::Retry { next_attempt_at } => ("pending", next_attempt_at, None),
                AttemptResult::Dead => ("dead", r.finished_at, None),
                AttemptResult::Dropped => ("dropped", r.finished_at, None),
            };
            sqlx::query(
                "UPDATE deliveries SET status = $2, attempts = $3, next_attempt_at = $4, \
                 lease_until = NULL, last_error = $5, connector_version = $6, updated_at = $7, \
                 delivered_at = COALESCE($8, delivered_at) WHERE id = $1",
            )
            .bind(r.delivery_id)
            .bind(status)
            .bind(r.attempt)
            .bind(next)
            .bind(&r.error)
            .bind(&r.version)
            .bind(r.finished_at)
            .bind(delivered_at)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "INSERT INTO delivery_attempts (delivery_id, attempt, outcome, error, \
                 connector_version, started_at, finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(r.delivery_id)
            .bind(r.attempt)
            .bind(&r.outcome)
            .bind(&r.error)
            .bind(&r.version)
            .bind(r.started_at)
            .bind(r.finished_at)
            .execute(&mut *conn)
            .await?;
            Ok(())
        }

        /// Returns leased deliveries to the pool (a restarted single instance owns them all).
        #[allow(dead_code)] // PostgreSQL leases belong to live instances; they expire instead.
        pub(crate) async fn release_leases(conn: &mut $conn) -> Result<u64> {
            Ok(sqlx::query(
                "UPDATE deliveries SET lease_until = NULL \
                 WHERE status = 'pending' AND lease_until IS NOT NULL",
            )
            .execute(&mut *conn)
            .await?
            .rows_affected())
        }

        /// Puts dead (and dropped) deliveries back in the queue with fresh attempts.
        pub(crate) async fn replay(
            conn: &mut $conn,
            target: &ReplayTarget,
            now: i64,
        ) -> Result<u64> {
            let done = match target {
                ReplayTarget::Connector(name) => sqlx::query(
                    "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, \
                     lease_until = NULL, updated_at = $2 \
                     WHERE connector = $1 AND status IN ('dead', 'dropped')",
                )
                .bind(name)
                .bind(now)
                .execute(&mut *conn)
                .await?,
                ReplayTarget::Delivery(id) => sqlx::query(
                    "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, \
                     lease_until = NULL, updated_at = $2 \
                     WHERE id = $1 AND status IN ('dead', 'dropped')",
                )
                .bind(id)
                .bind(now)
                .execute(&mut *conn)
                .await?,
            };
            Ok(done.rows_affected())
        }

    };
}

pub(crate) use delivery_ops;
