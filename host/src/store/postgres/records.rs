//! The connector and audit writes on PostgreSQL, in the caller's transaction or on their
//! own. SQLite runs the same writes on its writer thread (`sqlite/write.rs`).

use sqlx::postgres::PgConnection;

use crate::domain::{AuditEntry, AuditOutcome};
use crate::store::Result;
use crate::store::connectors::UploadRow;

/// Inserts or replaces an upload.
pub(super) async fn put_upload(conn: &mut PgConnection, row: &UploadRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO connector_uploads (name, manifest, component, version, updated_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET \
         manifest = excluded.manifest, component = excluded.component, \
         version = excluded.version, updated_at = excluded.updated_at",
    )
    .bind(&row.name)
    .bind(&row.manifest)
    .bind(&row.component)
    .bind(&row.version)
    .bind(row.updated_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Removes an upload and its state; whether there was one.
pub(super) async fn delete_upload(conn: &mut PgConnection, name: &str) -> Result<bool> {
    let gone = sqlx::query("DELETE FROM connector_uploads WHERE name = $1")
        .bind(name)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM connector_states WHERE name = $1")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(gone > 0)
}

/// Sets a connector's enabled flag.
pub(super) async fn set_enabled(
    conn: &mut PgConnection,
    name: &str,
    enabled: bool,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO connector_states (name, enabled, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled, \
         updated_at = excluded.updated_at",
    )
    .bind(name)
    .bind(i32::from(enabled))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Gives claimed deliveries back without an attempt (their connector is switched off, or the
/// instance is stopping).
pub(super) async fn unlease(conn: &mut PgConnection, ids: &[i64]) -> Result<()> {
    sqlx::query(
        "UPDATE deliveries SET lease_until = NULL WHERE id = ANY($1) AND status = 'pending'",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes one audit record, in the caller's transaction (or on its own).
pub(in crate::store) async fn insert_audit(
    conn: &mut PgConnection,
    entry: &AuditEntry,
    outcome: AuditOutcome,
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

/// Deletes up to `limit` records older than `before_ms`, oldest first; how many.
pub(super) async fn purge_audit(
    conn: &mut PgConnection,
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
