//! Lockstep as a Shared Signals transmitter: its signing keys and its receivers' streams
//! (tables `ssf_signing_keys` and `ssf_streams`). A stream's events are ordinary deliveries
//! whose target is `ssf:<stream_id>` (see `sync::ssf_transmit`); the reads and writes here
//! are plain functions per backend, called from the `Store` methods at the bottom.

use rusqlite::{OptionalExtension, params};

use super::{Result, Store, StoreError};
use crate::domain::{AuditEntry, AuditOutcome};

/// A signing key as stored. The private half is only ever handed to the signer.
#[derive(Clone, sqlx::FromRow)]
pub struct KeyRow {
    /// Key id (`kid`).
    pub kid: String,
    /// `ES256` or `RS256`.
    pub alg: String,
    /// PKCS#8 (ES256) or PKCS#1 (RS256) DER of the private key.
    pub private_der: Vec<u8>,
    /// The public key as a JWK (JSON text).
    pub public_jwk: String,
    /// Generated (epoch ms).
    pub created_at: i64,
    /// Replaced by a newer key (epoch ms); published until this plus the overlap.
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for KeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRow")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("private_der", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish()
    }
}

/// A stream as stored: its realm and its configuration as JSON.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct StreamRow {
    /// Transmitter-assigned id.
    pub stream_id: String,
    /// The realm it belongs to.
    pub realm: String,
    /// The stream (JSON text, `sync::ssf_transmit::Stream`).
    pub config: String,
    /// Created (epoch ms).
    pub created_at: i64,
    /// Last change (epoch ms).
    pub updated_at: i64,
}

/// A pending delivery of a stream (poll acknowledgements).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PendingSet {
    /// Delivery id.
    pub id: i64,
    /// The outbox event id.
    pub event_id: String,
    /// Attempts made.
    pub attempts: i32,
}

mod sqlite {
    use super::*;
    use rusqlite::Connection;

    pub(super) fn add_key(conn: &Connection, row: &KeyRow, now: i64) -> Result<()> {
        conn.prepare_cached(
            "UPDATE OR FAIL ssf_signing_keys SET retired_at = ?2 \
             WHERE alg = ?1 AND retired_at IS NULL",
        )?
        .execute(params![row.alg, now])?;
        conn.prepare_cached(
            "INSERT OR FAIL INTO ssf_signing_keys \
             (kid, alg, private_der, public_jwk, created_at, retired_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
        )?
        .execute(params![
            row.kid,
            row.alg,
            row.private_der,
            row.public_jwk,
            row.created_at
        ])?;
        Ok(())
    }

    pub(super) fn delete_expired_keys(conn: &Connection, before: i64) -> Result<u64> {
        Ok(conn
            .prepare_cached(
                "DELETE FROM ssf_signing_keys WHERE retired_at IS NOT NULL AND retired_at < ?1",
            )?
            .execute([before])? as u64)
    }

    pub(super) fn insert_stream(conn: &Connection, row: &StreamRow) -> Result<()> {
        conn.prepare_cached(
            "INSERT OR FAIL INTO ssf_streams (stream_id, realm, config, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            row.stream_id,
            row.realm,
            row.config,
            row.created_at,
            row.updated_at
        ])?;
        Ok(())
    }

    pub(super) fn update_stream(conn: &Connection, row: &StreamRow) -> Result<bool> {
        Ok(conn
            .prepare_cached(
                "UPDATE OR FAIL ssf_streams SET config = ?3, updated_at = ?4 \
                 WHERE stream_id = ?1 AND realm = ?2",
            )?
            .execute(params![
                row.stream_id,
                row.realm,
                row.config,
                row.updated_at
            ])?
            > 0)
    }

    pub(super) fn delete_stream(
        conn: &Connection,
        realm: &str,
        id: &str,
        target: &str,
    ) -> Result<bool> {
        let gone = conn
            .prepare_cached("DELETE FROM ssf_streams WHERE stream_id = ?1 AND realm = ?2")?
            .execute(params![id, realm])?
            > 0;
        if gone {
            // Nobody will ever take them: the stream's receiver is gone.
            conn.prepare_cached(
                "UPDATE OR FAIL deliveries SET status = 'dropped', lease_until = NULL, \
                 last_error = 'stream deleted' WHERE connector = ?1 AND status = 'pending'",
            )?
            .execute([target])?;
        }
        Ok(gone)
    }

    pub(super) fn stream_exists(conn: &Connection, id: &str) -> Result<bool> {
        Ok(conn
            .prepare_cached("SELECT 1 FROM ssf_streams WHERE stream_id = ?1")?
            .query_row([id], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

mod postgres {
    use super::*;
    use sqlx::postgres::PgConnection;

    pub(super) async fn add_key(conn: &mut PgConnection, row: &KeyRow, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE ssf_signing_keys SET retired_at = $2 WHERE alg = $1 AND retired_at IS NULL",
        )
        .bind(&row.alg)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO ssf_signing_keys \
             (kid, alg, private_der, public_jwk, created_at, retired_at) \
             VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(&row.kid)
        .bind(&row.alg)
        .bind(&row.private_der)
        .bind(&row.public_jwk)
        .bind(row.created_at)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    pub(super) async fn delete_stream(
        conn: &mut PgConnection,
        realm: &str,
        id: &str,
        target: &str,
    ) -> Result<bool> {
        let gone = sqlx::query("DELETE FROM ssf_streams WHERE stream_id = $1 AND realm = $2")
            .bind(id)
            .bind(realm)
            .execute(&mut *conn)
            .await?
            .rows_affected()
            > 0;
        if gone {
            sqlx::query(
                "UPDATE deliveries SET status = 'dropped', lease_until = NULL, \
                 last_error = 'stream deleted' WHERE connector = $1 AND status = 'pending'",
            )
            .bind(target)
            .execute(&mut *conn)
            .await?;
        }
        Ok(gone)
    }
}

impl Store {
    /// Every stored signing key, oldest first.
    pub async fn ssf_keys(&self) -> Result<Vec<KeyRow>> {
        const SQL: &str = "SELECT kid, alg, private_der, public_jwk, created_at, retired_at \
                           FROM ssf_signing_keys ORDER BY created_at, kid";
        match self {
            Store::Sqlite(s) => Ok(sqlx::query_as(SQL)
                .fetch_all(&mut *s.reader().await?)
                .await?),
            Store::Postgres(p) => Ok(sqlx::query_as(SQL).fetch_all(&p.pool).await?),
        }
    }

    /// Stores a new key of its algorithm and retires the ones that signed until now, in one
    /// transaction; keys retired before `forget_before` are deleted.
    pub async fn ssf_add_key(&self, row: KeyRow, forget_before: i64) -> Result<()> {
        match self {
            Store::Sqlite(s) => {
                s.write_quiet(move |conn, now| {
                    sqlite::delete_expired_keys(conn, forget_before)?;
                    sqlite::add_key(conn, &row, now)
                })
                .await
            }
            Store::Postgres(p) => {
                let mut tx = p.pool.begin().await?;
                sqlx::query(
                    "DELETE FROM ssf_signing_keys WHERE retired_at IS NOT NULL AND retired_at < $1",
                )
                .bind(forget_before)
                .execute(&mut *tx)
                .await?;
                postgres::add_key(&mut tx, &row, super::now_millis()).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Every stream of every realm, oldest first.
    pub async fn ssf_streams(&self) -> Result<Vec<StreamRow>> {
        const SQL: &str = "SELECT stream_id, realm, config, created_at, updated_at \
                           FROM ssf_streams ORDER BY created_at, stream_id";
        match self {
            Store::Sqlite(s) => Ok(sqlx::query_as(SQL)
                .fetch_all(&mut *s.reader().await?)
                .await?),
            Store::Postgres(p) => Ok(sqlx::query_as(SQL).fetch_all(&p.pool).await?),
        }
    }

    /// Stores a new stream, with its audit record in the same transaction.
    pub async fn ssf_insert_stream(&self, row: StreamRow, audit: Option<AuditEntry>) -> Result<()> {
        match self {
            Store::Sqlite(s) => {
                s.write_quiet(move |conn, now| {
                    if sqlite::stream_exists(conn, &row.stream_id)? {
                        return Err(StoreError::AlreadyExists(row.stream_id.clone()));
                    }
                    sqlite::insert_stream(conn, &row)?;
                    audited_sqlite(conn, audit.as_ref(), now)
                })
                .await
            }
            Store::Postgres(p) => {
                let mut tx = p.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO ssf_streams (stream_id, realm, config, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&row.stream_id)
                .bind(&row.realm)
                .bind(&row.config)
                .bind(row.created_at)
                .bind(row.updated_at)
                .execute(&mut *tx)
                .await?;
                audited_pg(&mut tx, audit.as_ref(), row.updated_at).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Replaces a stream's configuration; whether it exists in that realm. The audit record,
    /// if any, is written with the change (none when the stream is gone).
    pub async fn ssf_update_stream(
        &self,
        row: StreamRow,
        audit: Option<AuditEntry>,
    ) -> Result<bool> {
        match self {
            Store::Sqlite(s) => {
                s.write_quiet(move |conn, now| {
                    let found = sqlite::update_stream(conn, &row)?;
                    if found {
                        audited_sqlite(conn, audit.as_ref(), now)?;
                    }
                    Ok(found)
                })
                .await
            }
            Store::Postgres(p) => {
                let mut tx = p.pool.begin().await?;
                let found = sqlx::query(
                    "UPDATE ssf_streams SET config = $3, updated_at = $4 \
                     WHERE stream_id = $1 AND realm = $2",
                )
                .bind(&row.stream_id)
                .bind(&row.realm)
                .bind(&row.config)
                .bind(row.updated_at)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    > 0;
                if found {
                    audited_pg(&mut tx, audit.as_ref(), row.updated_at).await?;
                }
                tx.commit().await?;
                Ok(found)
            }
        }
    }

    /// Deletes a stream of a realm and drops its pending deliveries (to `target`); whether
    /// it existed. The audit record, if any, is written with the change.
    pub async fn ssf_delete_stream(
        &self,
        realm: &str,
        id: &str,
        target: &str,
        audit: Option<AuditEntry>,
    ) -> Result<bool> {
        let (realm, id, target) = (realm.to_owned(), id.to_owned(), target.to_owned());
        match self {
            Store::Sqlite(s) => {
                s.write_quiet(move |conn, now| {
                    let gone = sqlite::delete_stream(conn, &realm, &id, &target)?;
                    if gone {
                        audited_sqlite(conn, audit.as_ref(), now)?;
                    }
                    Ok(gone)
                })
                .await
            }
            Store::Postgres(p) => {
                let mut tx = p.pool.begin().await?;
                let gone = postgres::delete_stream(&mut tx, &realm, &id, &target).await?;
                if gone {
                    audited_pg(&mut tx, audit.as_ref(), super::now_millis()).await?;
                }
                tx.commit().await?;
                Ok(gone)
            }
        }
    }

    /// The pending deliveries to `target` of these outbox events (a poll's `ack`/`setErrs`).
    pub async fn ssf_pending(&self, target: &str, event_ids: &[String]) -> Result<Vec<PendingSet>> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(event_ids)
            .map_err(|e| StoreError::Corrupt(format!("event ids: {e}")))?;
        match self {
            Store::Sqlite(s) => Ok(sqlx::query_as(
                "SELECT id, event_id, attempts FROM deliveries WHERE connector = $1 \
                 AND status = 'pending' AND event_id IN (SELECT value FROM json_each($2))",
            )
            .bind(target)
            .bind(ids)
            .fetch_all(&mut *s.reader().await?)
            .await?),
            Store::Postgres(p) => Ok(sqlx::query_as(
                "SELECT id, event_id, attempts FROM deliveries WHERE connector = $1 \
                 AND status = 'pending' AND event_id = ANY($2)",
            )
            .bind(target)
            .bind(event_ids)
            .fetch_all(&p.pool)
            .await?),
        }
    }
}

/// A stream change's audit record (one stream changed), in the change's transaction.
fn audited_sqlite(conn: &rusqlite::Connection, audit: Option<&AuditEntry>, now: i64) -> Result<()> {
    match audit {
        Some(entry) => super::sqlite::insert_audit(conn, entry, AuditOutcome::Ok(1), now),
        None => Ok(()),
    }
}

/// [`audited_sqlite`] on PostgreSQL.
async fn audited_pg(
    conn: &mut sqlx::PgConnection,
    audit: Option<&AuditEntry>,
    now: i64,
) -> Result<()> {
    match audit {
        Some(entry) => super::postgres::insert_audit(conn, entry, AuditOutcome::Ok(1), now).await,
        None => Ok(()),
    }
}
