//! The session reads, written once and instantiated per backend (both accept `$N`
//! placeholders). The writes are per backend: PostgreSQL's in `postgres/sessions.rs`,
//! SQLite's on its writer thread (`sqlite/write.rs`).

/// Generates the session reads (`expired`, `live_idp_parents`, `get`, `tree`, `query`) for one backend; both run
/// them through sqlx (SQLite on its read-only pool).
macro_rules! session_reads {
    (db = $db:ty, conn = $conn:ty $(,)?) => {
        use crate::store::row::{into_sessions, session_columns, SessionRow};
        use crate::store::{Page, Result, SessionQuery};
        use crate::domain::Session;

        /// Sessions past their `expires_at` (any realm), soonest first: `(realm, external_id)`.
        pub(crate) async fn expired(
            conn: &mut $conn,
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
            conn: &mut $conn,
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
            conn: &mut $conn,
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
            conn: &mut $conn,
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
            .bind(&root)
            // The LIMIT stops the recursive walk itself on both backends (rows are produced
            // as the outer query pulls them), not only the answer.
            .bind(max.map_or(i64::MAX, |m| i64::try_from(m).unwrap_or(i64::MAX).saturating_add(1)))
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
            conn: &mut $conn,
            realm: &str,
            q: &SessionQuery,
        ) -> Result<Page> {
            let mut qb = sqlx::QueryBuilder::<$db>::new(concat!(
                "SELECT ",
                session_columns!(),
                " FROM sessions WHERE realm = "
            ));
            qb.push_bind(realm.to_owned());
            // Only the filters present go into the SQL, so each query can use its index.
            let filters = [
                ("idp_session_id", q.idp_session_id.clone()),
                ("idp_client_session_id", q.idp_client_session_id.clone()),
                ("user_id", q.user_id.clone()),
                ("status", q.status.map(|s| s.as_str().to_owned())),
                ("system", q.system.clone()),
            ];
            for (column, value) in filters {
                if let Some(value) = value {
                    qb.push(" AND ").push(column).push(" = ").push_bind(value);
                }
            }
            if let Some(after) = q.after {
                qb.push(" AND id > ").push_bind(after);
            }
            // One extra row tells whether another page follows.
            qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(q.limit) + 1);
            let rows: Vec<SessionRow> = qb.build_query_as().fetch_all(&mut *conn).await?;
            let mut items = into_sessions(rows)?;
            let more = items.len() > q.limit as usize;
            items.truncate(q.limit as usize);
            let next_after = if more { items.last().map(|s| s.seq) } else { None };
            Ok(Page { items, next_after })
        }
    };
}

pub(crate) use session_reads;
