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

impl Store {
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
