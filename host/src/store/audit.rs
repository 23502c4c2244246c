//! The audit log's records: one row per session operation and admin action. Successful
//! changes write their row inside their own transaction (the operations call
//! `insert_audit`), so a committed change always has its record and a rolled-back one never
//! does; refusals are written afterwards by [`crate::store::Store::record_audit`].

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use crate::store::Result;
use crate::store::ops::{Dialect, Filtered, Shared};

/// An audit record as stored.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct AuditRow {
    /// Monotonic id (the cursor key).
    pub id: i64,
    /// When (epoch ms).
    pub at_ms: i64,
    /// Realm; `None` for actions that span realms.
    pub realm: Option<String>,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: Option<String>,
    /// `ok` or the refusal's problem code.
    pub result: String,
    /// With `ok`: how many sessions (deliveries, connectors) changed.
    pub changed: Option<i64>,
    /// Small JSON object, as text.
    pub detail: Option<String>,
}

/// Which realms' records a query may see (decided by the caller's permissions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditScope {
    /// Records of this realm only.
    Realm(String),
    /// Every record, those without a realm included.
    All,
}

/// Filters of the audit listing, newest first.
#[derive(Clone, Debug)]
pub struct AuditQuery {
    /// Which realms.
    pub scope: AuditScope,
    /// Match `actor`.
    pub actor: Option<String>,
    /// Match `action`.
    pub action: Option<String>,
    /// Only records at or after this time (epoch ms).
    pub since_ms: Option<i64>,
    /// Only records with a smaller id (the cursor: pages go back in time).
    pub before: Option<i64>,
    /// Rows to fetch (the caller asks for one more than it shows, to know if more follow).
    pub limit: i64,
}

/// The audit listing (PostgreSQL's writes are in `postgres/records.rs`, SQLite's on its
/// writer thread).
impl<DB> Shared<DB>
where
    DB: Database + Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'r> AuditRow: FromRow<'r, DB::Row>,
{
    /// Audit records, newest first.
    pub(crate) async fn list_audit(
        conn: &mut DB::Connection,
        q: &AuditQuery,
    ) -> Result<Vec<AuditRow>> {
        let mut qb = Filtered::<DB>::new(
            "SELECT id, at_ms, realm, actor, action, target, result, changed, detail \
             FROM audit WHERE ",
        );
        match &q.scope {
            AuditScope::Realm(realm) => qb.push("realm = ").push_bind(realm.as_str()),
            AuditScope::All => qb.push("1 = 1"),
        };
        qb.and("actor = ", q.actor.as_deref())
            .and("action = ", q.action.as_deref())
            .and("at_ms >= ", q.since_ms)
            .and("id < ", q.before)
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(q.limit);
        let rows = qb.fetch_all(&mut *conn).await?;
        Ok(rows)
    }
}
