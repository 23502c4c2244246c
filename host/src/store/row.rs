//! Row shape of the `sessions` table and its conversion to the domain type.

use chrono::{DateTime, TimeZone, Utc};

use super::StoreError;
use crate::domain::{Attributes, Session};

/// Column list selected wherever a full session is read, in [`SessionRow`] order. A macro so
/// that `concat!` can build complete SQL literals from it.
macro_rules! session_columns {
    () => {
        "id, realm, external_id, kind, parent_id, idp_session_id, idp_client_session_id, \
         user_id, system, delegated_by, status, end_reason, attributes, expires_at, \
         created_at, updated_at"
    };
}
pub(crate) use session_columns;

/// A `sessions` row as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct SessionRow {
    id: i64,
    realm: String,
    external_id: String,
    kind: String,
    parent_id: Option<String>,
    idp_session_id: Option<String>,
    idp_client_session_id: Option<String>,
    user_id: Option<String>,
    system: Option<String>,
    delegated_by: Option<String>,
    status: String,
    end_reason: Option<String>,
    attributes: String,
    expires_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl SessionRow {
    /// Reads a row selected with [`session_columns!`] (the SQLite writer thread).
    pub(crate) fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(SessionRow {
            id: r.get(0)?,
            realm: r.get(1)?,
            external_id: r.get(2)?,
            kind: r.get(3)?,
            parent_id: r.get(4)?,
            idp_session_id: r.get(5)?,
            idp_client_session_id: r.get(6)?,
            user_id: r.get(7)?,
            system: r.get(8)?,
            delegated_by: r.get(9)?,
            status: r.get(10)?,
            end_reason: r.get(11)?,
            attributes: r.get(12)?,
            expires_at: r.get(13)?,
            created_at: r.get(14)?,
            updated_at: r.get(15)?,
        })
    }
}

pub(crate) fn millis_to_time(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

impl TryFrom<SessionRow> for Session {
    type Error = StoreError;

    fn try_from(r: SessionRow) -> Result<Self, Self::Error> {
        let corrupt = |e: crate::domain::UnknownValue| StoreError::Corrupt(e.to_string());
        let attributes: Attributes = serde_json::from_str(&r.attributes)
            .map_err(|e| StoreError::Corrupt(format!("attributes of {:?}: {e}", r.external_id)))?;
        Ok(Session {
            seq: r.id,
            kind: r.kind.parse().map_err(corrupt)?,
            status: r.status.parse().map_err(corrupt)?,
            end_reason: r
                .end_reason
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(corrupt)?,
            expires_at: r.expires_at.map(millis_to_time).transpose()?,
            created_at: millis_to_time(r.created_at)?,
            updated_at: millis_to_time(r.updated_at)?,
            realm: r.realm,
            external_id: r.external_id,
            parent_id: r.parent_id,
            idp_session_id: r.idp_session_id,
            idp_client_session_id: r.idp_client_session_id,
            user_id: r.user_id,
            system: r.system,
            delegated_by: r.delegated_by,
            attributes,
        })
    }
}

/// Converts a batch of rows, failing on the first corrupt one.
pub(crate) fn into_sessions(rows: Vec<SessionRow>) -> Result<Vec<Session>, StoreError> {
    rows.into_iter().map(Session::try_from).collect()
}
