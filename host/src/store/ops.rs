//! The statements both backends run through sqlx (SQLite on its read-only pool), written
//! once over [`sqlx::Database`]: the session reads here, the delivery reads, connector and
//! audit statements beside their records (`deliveries.rs`, `connectors.rs`, `audit.rs`). The
//! session writes are per backend: PostgreSQL's in `postgres/sessions.rs`, SQLite's on its
//! writer thread (`sqlite/write.rs`).

use std::marker::PhantomData;

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use crate::domain::Session;
use crate::store::row::{SessionRow, into_sessions, session_columns};
use crate::store::{Page, Result, SessionQuery, StoreError};

/// The shared statements of backend `DB`, called as `Shared::<Postgres>::get(..)`. A type
/// rather than free functions so that sqlx's bounds are stated once per group of
/// statements (on each `impl` block) instead of on every function.
pub(crate) struct Shared<DB>(PhantomData<DB>);

/// How a backend writes what differs in the shared statements.
pub(crate) trait Dialect {
    /// Writes the placeholder of the `n`th bound value (1-based), as sqlx's query builder
    /// does: `?` on SQLite, `$n` on PostgreSQL.
    fn placeholder(sql: &mut String, n: usize);
    /// A subquery that expands the JSON array of text bound at `$2` into rows.
    const JSON_IDS: &'static str;
    /// What makes a read transaction one snapshot (nothing on SQLite, whose read
    /// transactions are snapshots in WAL mode).
    const SNAPSHOT: &'static str;
}

impl Dialect for sqlx::Sqlite {
    const JSON_IDS: &'static str = "SELECT value FROM json_each($2)";
    const SNAPSHOT: &'static str = "";

    fn placeholder(sql: &mut String, _: usize) {
        sql.push('?');
    }
}

impl Dialect for sqlx::Postgres {
    const JSON_IDS: &'static str = "SELECT jsonb_array_elements_text(CAST($2 AS jsonb))";
    const SNAPSHOT: &'static str = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY";

    fn placeholder(sql: &mut String, n: usize) {
        sql.push('$');
        sql.push_str(&n.to_string());
    }
}

/// A value bound to a [`Filtered`] statement.
pub(crate) enum Value {
    Text(String),
    Int(i64),
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

/// A statement made of the filters a listing was given, its values bound in order: the
/// text and placeholders `sqlx::QueryBuilder` writes. It owns its values, so a function
/// generic over the backend can run it: sqlx's builder stays borrowed for as long as its
/// arguments' lifetime, which its own drop then outlasts.
pub(crate) struct Filtered<DB> {
    sql: String,
    values: Vec<Value>,
    db: PhantomData<DB>,
}

impl<DB: Dialect> Filtered<DB> {
    pub(crate) fn new(sql: &str) -> Self {
        Filtered {
            sql: sql.to_owned(),
            values: Vec::new(),
            db: PhantomData,
        }
    }

    pub(crate) fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    pub(crate) fn push_bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.values.push(value.into());
        DB::placeholder(&mut self.sql, self.values.len());
        self
    }

    /// Adds ` AND {condition}` and its value (`condition` ends with the operator, as in
    /// `"user_id = "`) when the filter was given: only the filters present go into the
    /// SQL, so each query can use its index.
    pub(crate) fn and(&mut self, condition: &str, value: Option<impl Into<Value>>) -> &mut Self {
        if let Some(value) = value {
            self.push(" AND ").push(condition).push_bind(value);
        }
        self
    }
}

impl<DB> Filtered<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    pub(crate) async fn fetch_all<O>(&self, conn: &mut DB::Connection) -> Result<Vec<O>>
    where
        O: Send + Unpin + for<'r> FromRow<'r, DB::Row>,
    {
        let mut query = sqlx::query_as::<DB, O>(&self.sql);
        for value in &self.values {
            query = match value {
                Value::Text(v) => query.bind(v.as_str()),
                Value::Int(v) => query.bind(*v),
            };
        }
        Ok(query.fetch_all(conn).await?)
    }
}

/// The statements over some sessions of a realm named by external id.
impl<DB> Shared<DB>
where
    DB: Database + Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    /// The external ids as the JSON array [`Shared::fetch_for_ids`] binds: one statement,
    /// prepared once, serves any number of them.
    pub(crate) fn json_ids(external_ids: &[String]) -> Result<String> {
        serde_json::to_string(external_ids).map_err(|e| StoreError::Corrupt(format!("ids: {e}")))
    }

    /// The rows of `sql`, in which `{ids}` stands for a subquery over the external ids
    /// `ids` (from [`Shared::json_ids`], bound at `$2`) and the realm is bound at `$1`.
    pub(crate) async fn fetch_for_ids<O>(
        conn: &mut DB::Connection,
        sql: &str,
        realm: &str,
        ids: &str,
    ) -> Result<Vec<O>>
    where
        O: Send + Unpin + for<'r> FromRow<'r, DB::Row>,
    {
        let sql = sql.replace("{ids}", DB::JSON_IDS);
        Ok(sqlx::query_as(&sql)
            .bind(realm)
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?)
    }
}

/// The session reads (`expired`, `live_idp_parents`, `get`, `tree`, `query`).
impl<DB> Shared<DB>
where
    DB: Database + Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'r> SessionRow: FromRow<'r, DB::Row>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
{
    /// Sessions past their `expires_at` (any realm), soonest first: `(realm, external_id)`.
    pub(crate) async fn expired(
        conn: &mut DB::Connection,
        now: i64,
        limit: i64,
    ) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT realm, external_id FROM sessions \
                 WHERE status = 'ACTIVE' AND expires_at IS NOT NULL AND expires_at <= $1 \
                 ORDER BY expires_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Live PARENTs mapped to an IdP session, after sequence number `after`, in sequence
    /// order: the reconciler's walk (index `(realm, status, id)`).
    pub(crate) async fn live_idp_parents(
        conn: &mut DB::Connection,
        realm: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Session>> {
        let rows: Vec<SessionRow> = sqlx::query_as(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE realm = $1 AND status = 'ACTIVE' AND id > $2 \
                   AND kind = 'PARENT' AND idp_session_id IS NOT NULL ORDER BY id LIMIT $3"
        ))
        .bind(realm)
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        into_sessions(rows)
    }

    pub(crate) async fn get(
        conn: &mut DB::Connection,
        realm: &str,
        external_id: &str,
    ) -> Result<Option<Session>> {
        let row: Option<SessionRow> = sqlx::query_as(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE realm = $1 AND external_id = $2"
        ))
        .bind(realm)
        .bind(external_id)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(Session::try_from).transpose()
    }

    /// `max`: the most sessions returned; a bigger tree is refused (`TreeTooLarge`)
    /// after reading one session past the limit, so the walk costs what the limit allows.
    pub(crate) async fn tree(
        conn: &mut DB::Connection,
        realm: &str,
        external_id: &str,
        max: Option<usize>,
    ) -> Result<Option<Vec<Session>>> {
        // CROSS JOIN fixes the join order (SQLite): the walk drives the index lookups.
        // Walk up to the root (depth-bounded: parents exist before children, so there is
        // no cycle, but a corrupt row must not loop forever), then down from it.
        let root: Option<String> = sqlx::query_scalar(
            "WITH RECURSIVE up(external_id, parent_id, depth) AS ( \
                     SELECT external_id, parent_id, 0 FROM sessions \
                     WHERE realm = $1 AND external_id = $2 \
                   UNION ALL \
                     SELECT s.external_id, s.parent_id, up.depth + 1 FROM up \
                     CROSS JOIN sessions s \
                     WHERE s.realm = $1 AND s.external_id = up.parent_id AND up.depth < 10000 \
                 ) SELECT external_id FROM up ORDER BY depth DESC LIMIT 1",
        )
        .bind(realm)
        .bind(external_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(root) = root else {
            return Ok(None);
        };
        let rows: Vec<SessionRow> = sqlx::query_as(concat!(
            "WITH RECURSIVE down(external_id) AS ( \
                     SELECT CAST($2 AS TEXT) \
                   UNION \
                     SELECT s.external_id FROM down \
                     CROSS JOIN sessions s WHERE s.realm = $1 AND s.parent_id = down.external_id \
                 ) SELECT ",
            session_columns!(),
            " FROM sessions WHERE realm = $1 \
                   AND external_id IN (SELECT external_id FROM down LIMIT $3) ORDER BY id"
        ))
        .bind(realm)
        .bind(root.as_str())
        // The LIMIT stops the recursive walk itself on both backends (rows are produced
        // as the outer query pulls them), not only the answer.
        .bind(max.map_or(i64::MAX, |m| {
            i64::try_from(m).unwrap_or(i64::MAX).saturating_add(1)
        }))
        .fetch_all(&mut *conn)
        .await?;
        if let Some(limit) = max
            && rows.len() > limit
        {
            return Err(crate::store::StoreError::TreeTooLarge {
                target: external_id.to_owned(),
                limit,
            });
        }
        Ok(Some(into_sessions(rows)?))
    }

    pub(crate) async fn query(
        conn: &mut DB::Connection,
        realm: &str,
        q: &SessionQuery,
    ) -> Result<Page> {
        let mut qb = Filtered::<DB>::new(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE realm = "
        ));
        qb.push_bind(realm)
            .and("idp_session_id = ", q.idp_session_id.as_deref())
            .and(
                "idp_client_session_id = ",
                q.idp_client_session_id.as_deref(),
            )
            .and("user_id = ", q.user_id.as_deref())
            .and("status = ", q.status.map(|s| s.as_str()))
            .and("system = ", q.system.as_deref())
            .and("id > ", q.after);
        // One extra row tells whether another page follows.
        qb.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(q.limit) + 1);
        let rows: Vec<SessionRow> = qb.fetch_all(&mut *conn).await?;
        let (items, next_after) =
            super::split_page(into_sessions(rows)?, q.limit as usize, |s| s.seq);
        Ok(Page { items, next_after })
    }
}
