//! The operator console's overview counts: live sessions per realm and kind. Read-only, on
//! the reader pool (SQLite) or a pooled connection (PostgreSQL).

use super::{Result, Store};

/// Sessions that have not ended, per realm and kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    /// Realm.
    pub realm: String,
    /// ACTIVE PARENTs.
    pub parent: i64,
    /// ACTIVE CHILDs.
    pub child: i64,
    /// ACTIVE FIXEDs.
    pub fixed: i64,
    /// ORPHANED sessions (any kind): waiting for their owner to end them.
    pub orphaned: i64,
}

const LIVE_SQL: &str = "SELECT realm, kind, status, COUNT(*) FROM sessions \
     WHERE status <> 'DESTROYED' GROUP BY realm, kind, status ORDER BY realm";

fn fold(rows: Vec<(String, String, String, i64)>) -> Vec<LiveCounts> {
    let mut out: Vec<LiveCounts> = Vec::new();
    for (realm, kind, status, n) in rows {
        if out.last().is_none_or(|c| c.realm != realm) {
            out.push(LiveCounts {
                realm: realm.clone(),
                ..LiveCounts::default()
            });
        }
        let Some(c) = out.last_mut() else { continue };
        match (status.as_str(), kind.as_str()) {
            ("ORPHANED", _) => c.orphaned += n,
            (_, "PARENT") => c.parent += n,
            (_, "CHILD") => c.child += n,
            _ => c.fixed += n,
        }
    }
    out
}

/// A session a destroy would reach, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reached {
    /// The session.
    pub external_id: String,
    /// 0: a seed, 1: below one (parent edge), 2: delegated from one reached.
    pub via: i32,
    /// ACTIVE, DESTROYED or ORPHANED.
    pub status: String,
    /// The session it was delegated by.
    pub delegated_by: Option<String>,
}

/// The walk of the destroy cascade (parent and delegation edges, within the realm), read
/// only (one recursive term: PostgreSQL allows no more); `SEEDS` is replaced by the
/// backend's way of reading a bound list.
const REACH_SQL: &str = "WITH RECURSIVE tree(external_id, via) AS ( \
         SELECT s.external_id, 0 FROM sessions s WHERE s.realm = $1 AND s.external_id IN (SEEDS) \
       UNION SELECT c.external_id, CASE WHEN c.parent_id = t.external_id THEN 1 ELSE 2 END \
         FROM tree t CROSS JOIN sessions c WHERE c.realm = $1 \
         AND (c.parent_id = t.external_id OR c.delegated_by = t.external_id) \
     ) SELECT s.external_id, MIN(t.via), s.status, s.delegated_by FROM tree t \
       CROSS JOIN sessions s WHERE s.realm = $1 AND s.external_id = t.external_id \
       GROUP BY s.external_id, s.status, s.delegated_by LIMIT $3";

impl Store {
    /// Every session a destroy seeded with `seeds` would walk over (at most `limit`): what
    /// it would end and the sessions delegated from them.
    pub async fn reach(&self, realm: &str, seeds: &[String], limit: i64) -> Result<Vec<Reached>> {
        type Row = (String, i32, String, Option<String>);
        let rows: Vec<Row> = match self {
            Store::Sqlite(s) => {
                let seeds = serde_json::to_string(seeds).unwrap_or_else(|_| "[]".into());
                sqlx::query_as(&REACH_SQL.replace("SEEDS", "SELECT value FROM json_each($2)"))
                    .bind(realm)
                    .bind(seeds)
                    .bind(limit)
                    .fetch_all(&mut *s.reader().await?)
                    .await?
            }
            Store::Postgres(p) => {
                sqlx::query_as(&REACH_SQL.replace("SEEDS", "SELECT unnest($2::text[])"))
                    .bind(realm)
                    .bind(seeds)
                    .bind(limit)
                    .fetch_all(&mut *p.pool.acquire().await?)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(external_id, via, status, delegated_by)| Reached {
                external_id,
                via,
                status,
                delegated_by,
            })
            .collect())
    }

    /// Live sessions per realm and kind, by realm name.
    pub async fn live_counts(&self) -> Result<Vec<LiveCounts>> {
        let rows: Vec<(String, String, String, i64)> = match self {
            Store::Sqlite(s) => {
                sqlx::query_as(LIVE_SQL)
                    .fetch_all(&mut *s.reader().await?)
                    .await?
            }
            Store::Postgres(p) => {
                sqlx::query_as(LIVE_SQL)
                    .fetch_all(&mut *p.pool.acquire().await?)
                    .await?
            }
        };
        Ok(fold(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_fold_into_one_line_per_realm() {
        let row = |r: &str, k: &str, s: &str, n| (r.to_owned(), k.to_owned(), s.to_owned(), n);
        let out = fold(vec![
            row("acme", "PARENT", "ACTIVE", 2),
            row("acme", "CHILD", "ACTIVE", 5),
            row("acme", "CHILD", "ORPHANED", 1),
            row("beta", "FIXED", "ACTIVE", 3),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].parent, out[0].child, out[0].orphaned), (2, 5, 1));
        assert_eq!((out[1].realm.as_str(), out[1].fixed), ("beta", 3));
    }
}
