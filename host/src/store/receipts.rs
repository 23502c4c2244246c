//! What termination receipts are built from: the `logout` outbox events of sessions, the
//! deliveries they were routed to, and the attempts that confirmed them — read in one
//! snapshot per call. Only SQL and rows here; which state counts as confirmed, and when a
//! receipt is complete, is decided in `sync::receipts`.

use sqlx::{Connection, Database, Encode, Executor, FromRow, IntoArguments, Type};

use super::deliveries::{DeliveryRow, delivery_columns};
use crate::domain::Session;
use crate::store::ops::{Dialect, Shared};
use crate::store::row::SessionRow;
use crate::store::{Page, Result, SessionQuery, StoreError};

/// A `logout` outbox event of a session.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LogoutEventRow {
    /// Outbox row id (creation order).
    pub outbox_id: i64,
    /// Stable event id (what connectors de-duplicate by).
    pub event_id: String,
    /// The session that ended.
    pub external_id: String,
    /// The system the logout came from; connectors of that name were not routed to.
    pub origin_system: Option<String>,
    /// When the session ended (epoch ms; the event's `occurredAt`).
    pub created_at: i64,
    /// Non-zero once the event was routed (its deliveries exist).
    pub fanned_out: i32,
}

/// The first attempt that a connector confirmed.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ConfirmationRow {
    /// Delivery id.
    pub delivery_id: i64,
    /// Connector version that served the confirming attempt.
    pub connector_version: Option<String>,
    /// When the confirming attempt finished (epoch ms).
    pub finished_at: i64,
}

/// Logout events of some sessions with their deliveries and confirmations.
#[derive(Clone, Debug, Default)]
pub struct LogoutRecords {
    /// `logout` events, oldest first.
    pub events: Vec<LogoutEventRow>,
    /// Their deliveries (matched to events by `event_id`), by id.
    pub deliveries: Vec<DeliveryRow>,
    /// The confirming attempts of delivered ones, oldest first.
    pub confirmations: Vec<ConfirmationRow>,
}

/// Counts over every session of one user in a realm (not only one page of them).
#[derive(Clone, Debug, Default)]
pub struct UserTotals {
    /// Sessions per status (`ACTIVE`, `DESTROYED`, `ORPHANED`).
    pub sessions_by_status: Vec<(String, i64)>,
    /// Logout deliveries per (status, whether an attempt was made).
    pub deliveries_by_status: Vec<(String, i32, i64)>,
    /// Logout events not routed yet.
    pub unrouted_events: i64,
    /// DESTROYED sessions without any logout event.
    pub ended_without_event: i64,
}

/// The receipt reads, each from one snapshot: a read transaction, which is one on SQLite
/// (WAL) and is made REPEATABLE READ on PostgreSQL, where READ COMMITTED would give each
/// statement its own ([`Dialect::SNAPSHOT`]).
impl<DB> Shared<DB>
where
    DB: Database + Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'r> SessionRow: FromRow<'r, DB::Row>,
    for<'r> LogoutEventRow: FromRow<'r, DB::Row>,
    for<'r> DeliveryRow: FromRow<'r, DB::Row>,
    for<'r> ConfirmationRow: FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'r> (String, i64): FromRow<'r, DB::Row>,
    for<'r> (String, i32, i64): FromRow<'r, DB::Row>,
{
    async fn begin_snapshot(conn: &mut DB::Connection) -> Result<sqlx::Transaction<'_, DB>> {
        let mut tx = conn.begin().await?;
        if !DB::SNAPSHOT.is_empty() {
            sqlx::query(DB::SNAPSHOT).execute(&mut *tx).await?;
        }
        Ok(tx)
    }

    /// One session and its logout records, from one snapshot.
    pub(crate) async fn session_receipt(
        conn: &mut DB::Connection,
        realm: &str,
        external_id: &str,
    ) -> Result<Option<(Session, LogoutRecords)>> {
        let mut tx = Self::begin_snapshot(conn).await?;
        let Some(session) = Shared::<DB>::get(&mut tx, realm, external_id).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        let records = Self::logout_records(&mut tx, realm, &[external_id.to_owned()]).await?;
        tx.commit().await?;
        Ok(Some((session, records)))
    }

    /// One page of a user's sessions (`q.user_id` set), their logout records and the
    /// totals over all the user's sessions, from one snapshot.
    pub(crate) async fn user_receipts(
        conn: &mut DB::Connection,
        realm: &str,
        q: &SessionQuery,
    ) -> Result<(Page, LogoutRecords, UserTotals)> {
        let user_id = q
            .user_id
            .clone()
            .ok_or_else(|| StoreError::Corrupt("a user's receipts need a user id".into()))?;
        let mut tx = Self::begin_snapshot(conn).await?;
        let page = Shared::<DB>::query(&mut tx, realm, q).await?;
        let ids: Vec<String> = page.items.iter().map(|s| s.external_id.clone()).collect();
        let records = Self::logout_records(&mut tx, realm, &ids).await?;
        let totals = Self::user_totals(&mut tx, realm, &user_id).await?;
        tx.commit().await?;
        Ok((page, records, totals))
    }

    async fn logout_records(
        conn: &mut DB::Connection,
        realm: &str,
        external_ids: &[String],
    ) -> Result<LogoutRecords> {
        if external_ids.is_empty() {
            return Ok(LogoutRecords::default());
        }
        let ids = Self::json_ids(external_ids)?;
        // Each statement walks an index on (realm, external_id, ...).
        let events: Vec<LogoutEventRow> = Self::fetch_for_ids(
            conn,
            "SELECT id AS outbox_id, event_id, external_id, origin_system, created_at, \
             fanned_out FROM outbox WHERE realm = $1 AND external_id IN ({ids}) \
             AND event_type = 'logout' ORDER BY id",
            realm,
            &ids,
        )
        .await?;
        if events.is_empty() {
            return Ok(LogoutRecords::default());
        }
        let deliveries = Self::fetch_for_ids(
            conn,
            concat!(
                "SELECT ",
                delivery_columns!(),
                " FROM deliveries WHERE realm = $1 AND external_id IN ({ids}) \
                 AND event_type = 'logout' ORDER BY id"
            ),
            realm,
            &ids,
        )
        .await?;
        let confirmations = Self::fetch_for_ids(
            conn,
            "SELECT a.delivery_id, a.connector_version, a.finished_at \
             FROM deliveries d CROSS JOIN delivery_attempts a \
             WHERE d.realm = $1 AND d.external_id IN ({ids}) AND d.event_type = 'logout' \
             AND d.status = 'delivered' AND a.delivery_id = d.id AND a.outcome = 'delivered' \
             ORDER BY a.id",
            realm,
            &ids,
        )
        .await?;
        Ok(LogoutRecords {
            events,
            deliveries,
            confirmations,
        })
    }

    async fn user_totals(
        conn: &mut DB::Connection,
        realm: &str,
        user_id: &str,
    ) -> Result<UserTotals> {
        let sessions_by_status = sqlx::query_as(
            "SELECT status, COUNT(*) FROM sessions WHERE realm = $1 AND user_id = $2 \
             GROUP BY status ORDER BY status",
        )
        .bind(realm)
        .bind(user_id)
        .fetch_all(&mut *conn)
        .await?;
        let deliveries_by_status = sqlx::query_as(
            "SELECT d.status, CAST(CASE WHEN d.attempts > 0 THEN 1 ELSE 0 END AS INTEGER), \
             COUNT(*) FROM deliveries d \
             WHERE d.realm = $1 AND d.event_type = 'logout' AND d.external_id IN ( \
                 SELECT s.external_id FROM sessions s WHERE s.realm = $1 AND s.user_id = $2) \
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .bind(realm)
        .bind(user_id)
        .fetch_all(&mut *conn)
        .await?;
        let unrouted_events = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbox o \
             WHERE o.realm = $1 AND o.event_type = 'logout' AND o.fanned_out = 0 \
               AND o.external_id IN ( \
                 SELECT s.external_id FROM sessions s WHERE s.realm = $1 AND s.user_id = $2)",
        )
        .bind(realm)
        .bind(user_id)
        .fetch_one(&mut *conn)
        .await?;
        let ended_without_event = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sessions s \
             WHERE s.realm = $1 AND s.user_id = $2 AND s.status = 'DESTROYED' \
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.realm = s.realm \
                   AND o.external_id = s.external_id AND o.event_type = 'logout')",
        )
        .bind(realm)
        .bind(user_id)
        .fetch_one(&mut *conn)
        .await?;
        Ok(UserTotals {
            sessions_by_status,
            deliveries_by_status,
            unrouted_events,
            ended_without_event,
        })
    }
}
