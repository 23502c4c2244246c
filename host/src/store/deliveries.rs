//! Records of the sync engine: per-connector deliveries of outbox events, their attempts,
//! and the reads over them (one body for both backends, on [`Shared`]). The writes are
//! per backend: `postgres/deliveries.rs`, and SQLite's writer thread.

use serde::Serialize;

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use crate::domain::SyncEvent;
use crate::store::Result;
use crate::store::ops::{Dialect, Filtered, Shared};

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

/// One lane's claim: up to `limit` due deliveries of `connector`, leased until `lease_until`.
#[derive(Clone, Debug)]
pub struct LaneClaim {
    /// The lane's connector.
    pub connector: String,
    /// Most deliveries to lease.
    pub limit: i64,
    /// Lease end (epoch ms).
    pub lease_until: i64,
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

/// The columns of a [`DeliveryRow`], in its order.
macro_rules! delivery_columns {
    () => {
        "id, event_id, event_type, connector, realm, external_id, status, attempts, \
         next_attempt_at, last_error, connector_version, created_at, updated_at, delivered_at, \
         delivered_started_at"
    };
}
pub(crate) use delivery_columns;

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
    /// Start of the attempt that delivered it (epoch ms), when that attempt is kept on this
    /// row rather than in the attempts table (see [`DeliveryRow::delivered_attempt`]).
    pub delivered_started_at: Option<i64>,
}

impl DeliveryRow {
    /// The attempt that delivered it, as the row keeps it: a delivered delivery's last
    /// attempt is not written to the attempts table, which holds the failed ones (and, for
    /// deliveries recorded before that, the delivering one too: then this is `None`).
    pub fn delivered_attempt(&self) -> Option<AttemptRow> {
        if self.status != "delivered" {
            return None;
        }
        Some(AttemptRow {
            attempt: self.attempts,
            outcome: "delivered".to_owned(),
            error: None,
            connector_version: self.connector_version.clone(),
            started_at: self.delivered_started_at?,
            finished_at: self.delivered_at?,
        })
    }
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

/// What a fan-out round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FanOut {
    /// Outbox events routed.
    pub events: usize,
    /// Deliveries created.
    pub deliveries: usize,
    /// The connectors that got at least one (their lanes have work).
    pub connectors: std::collections::BTreeSet<String>,
    /// When the oldest event routed to at least one connector occurred (milliseconds since
    /// the epoch): how far fan-out trails the API.
    pub oldest_routed_ms: Option<i64>,
}

impl FanOut {
    /// Counts one delivery of `event` to `connector`.
    pub(crate) fn routed(&mut self, connector: &str, event: &SyncEvent) {
        self.deliveries += 1;
        if !self.connectors.contains(connector) {
            self.connectors.insert(connector.to_owned());
        }
        let at = event.occurred_at.timestamp_millis();
        if self.oldest_routed_ms.is_none_or(|o| at < o) {
            self.oldest_routed_ms = Some(at);
        }
    }
}

/// Status, next attempt and delivery time an attempt's decision writes.
pub(crate) fn decision_columns(r: &AttemptRecord) -> (&'static str, i64, Option<i64>) {
    match r.result {
        AttemptResult::Delivered => ("delivered", r.finished_at, Some(r.finished_at)),
        AttemptResult::Retry { next_attempt_at } => ("pending", next_attempt_at, None),
        AttemptResult::Dead => ("dead", r.finished_at, None),
        AttemptResult::Dropped => ("dropped", r.finished_at, None),
    }
}

/// The delivery reads.
impl<DB> Shared<DB>
where
    DB: Database + Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'r> DeliveryRow: FromRow<'r, DB::Row>,
    for<'r> AttemptRow: FromRow<'r, DB::Row>,
{
    pub(crate) async fn list_deliveries(
        conn: &mut DB::Connection,
        q: &DeliveryQuery,
    ) -> Result<Vec<DeliveryRow>> {
        let mut qb = Filtered::<DB>::new(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE 1 = 1"
        ));
        qb.and("status = ", q.status.map(|s| s.as_str()))
            .and("connector = ", q.connector.as_deref())
            .and("realm = ", q.realm.as_deref());
        if let Some(session) = q.session.as_deref() {
            // Through the outbox's session index: see `session_deliveries`.
            qb.push(" AND outbox_id IN (SELECT o.id FROM outbox o WHERE o.external_id = ")
                .push_bind(session)
                .and("o.realm = ", q.realm.as_deref())
                .push(")");
        }
        qb.and("id > ", q.after)
            .push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(q.limit));
        let rows = qb.fetch_all(&mut *conn).await?;
        Ok(rows)
    }

    pub(crate) async fn get_delivery(
        conn: &mut DB::Connection,
        id: i64,
    ) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>> {
        let row: Option<DeliveryRow> = sqlx::query_as(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut attempts: Vec<AttemptRow> = sqlx::query_as(
            "SELECT attempt, outcome, error, connector_version, started_at, finished_at \
             FROM delivery_attempts WHERE delivery_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        // The delivering attempt came last.
        attempts.extend(row.delivered_attempt());
        Ok(Some((row, attempts)))
    }

    /// Deliveries of some sessions of a realm (for the session tree). Found through the
    /// outbox's session index and the `(outbox_id, connector)` key: a delivery carries its
    /// event's realm and session, but an index of its own on them would cost every delivery
    /// two more index writes (at fan-out and at its decision) for a read made by people.
    pub(crate) async fn session_deliveries(
        conn: &mut DB::Connection,
        realm: &str,
        external_ids: &[String],
    ) -> Result<Vec<DeliveryRow>> {
        if external_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = Self::json_ids(external_ids)?;
        let sql = concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE outbox_id IN (SELECT o.id FROM outbox o \
               WHERE o.realm = $1 AND o.external_id IN ({ids})) ORDER BY id"
        );
        Self::fetch_for_ids(conn, sql, realm, &ids).await
    }
}
