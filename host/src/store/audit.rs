//! The audit log's records: one row per session operation and admin action. Successful
//! changes write their row inside their own transaction (the operations call
//! `insert_audit`), so a committed change always has its record and a rolled-back one never
//! does; refusals are written afterwards by [`crate::store::Store::record_audit`].

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

/// Generates the audit statements for one backend (expanded in the same module as the
/// session, delivery and connector operations, which call `insert_audit`).
macro_rules! audit_ops {
    (db = $db:ty, conn = $conn:ty $(,)?) => {
        /// Writes one audit record. Part of the caller's transaction.
        pub(crate) async fn insert_audit(
            conn: &mut $conn,
            entry: &crate::domain::AuditEntry,
            outcome: crate::domain::AuditOutcome,
            now: i64,
        ) -> Result<()> {
            let (result, changed) = outcome.columns();
            let detail = entry.detail.as_ref().map(|d| d.to_string());
            sqlx::query(
                "INSERT INTO audit (at_ms, realm, actor, action, target, result, changed, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(now)
            .bind(&entry.realm)
            .bind(&entry.actor)
            .bind(entry.action.to_string())
            .bind(&entry.target)
            .bind(result)
            .bind(changed)
            .bind(detail)
            .execute(&mut *conn)
            .await?;
            Ok(())
        }

        /// Audit records, newest first.
        pub(crate) async fn list_audit(
            conn: &mut $conn,
            q: &crate::store::audit::AuditQuery,
        ) -> Result<Vec<crate::store::audit::AuditRow>> {
            use crate::store::audit::AuditScope;
            let mut qb = sqlx::QueryBuilder::<$db>::new(
                "SELECT id, at_ms, realm, actor, action, target, result, changed, detail \
                 FROM audit WHERE ",
            );
            // Only the filters present go into the SQL, so each can use its index.
            match &q.scope {
                AuditScope::Realm(realm) => {
                    qb.push("realm = ").push_bind(realm.clone());
                }
                AuditScope::All => {
                    qb.push("1 = 1");
                }
            }
            if let Some(actor) = &q.actor {
                qb.push(" AND actor = ").push_bind(actor.clone());
            }
            if let Some(action) = &q.action {
                qb.push(" AND action = ").push_bind(action.clone());
            }
            if let Some(since) = q.since_ms {
                qb.push(" AND at_ms >= ").push_bind(since);
            }
            if let Some(before) = q.before {
                qb.push(" AND id < ").push_bind(before);
            }
            qb.push(" ORDER BY id DESC LIMIT ").push_bind(q.limit);
            Ok(qb.build_query_as().fetch_all(&mut *conn).await?)
        }

        /// Deletes up to `limit` records older than `before_ms`, oldest first; how many.
        pub(crate) async fn purge_audit(
            conn: &mut $conn,
            before_ms: i64,
            limit: i64,
        ) -> Result<u64> {
            Ok(sqlx::query(
                "DELETE FROM audit WHERE id IN \
                 (SELECT id FROM audit WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)",
            )
            .bind(before_ms)
            .bind(limit)
            .execute(&mut *conn)
            .await?
            .rows_affected())
        }
    };
}
pub(crate) use audit_ops;
