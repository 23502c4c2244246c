//! The session writes on PostgreSQL: `map`, `destroy`, `apply_idp`.
//!
//! Each round trip costs more than the work of most statements here, so an operation is as
//! few statements as its data allows. A map is one statement (data-modifying CTEs write the
//! session, its `login` event and its audit record together) and commits on its own; a
//! destroy is one statement that locks its target and cascades, then one that writes the
//! `logout` events, looks for children committed meanwhile and, when there are none, the
//! audit record. Arrays are bound as PostgreSQL arrays, so every statement text is fixed and
//! prepared once per connection whatever the number of rows.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{FromRow, PgExecutor, Row};

use crate::domain::{
    AuditEntry, AuditOutcome, DestroyCommand, DestroyTarget, EndReason, EventType, IdpChange,
    IdpCommand, IdpOutcome, MapCommand, NewSession, ReplayGuard, ReplayKind, Session, SessionKind,
    SessionStatus, SyncEvent,
};
use crate::store::row::{SessionRow, into_sessions, millis_to_time, session_columns};
use crate::store::{Result, StoreError};

use super::records::insert_audit;

/// Bound on straggler passes after a cascade (each pass is one level of concurrent inserts).
const MAX_CASCADE_PASSES: usize = 32;

/// The columns a new session is inserted with, `$1`..`$12`; `$13`..`$15` are its `login`
/// event (id, origin system, payload) and `$16`..`$20` its audit record (actor, realm,
/// action, target, detail), written only when the actor is not NULL.
const INSERT_COLUMNS: &str = "INSERT INTO sessions (realm, external_id, kind, parent_id, \
     idp_session_id, idp_client_session_id, user_id, system, delegated_by, status, end_reason, \
     attributes, expires_at, created_at, updated_at) ";

/// The CTEs that follow the insert `ins`: its `login` event (`payload`: the expression of
/// the event's payload) and its audit record.
fn login_and_audit(payload: &str) -> String {
    [
        " ), event AS ( \
           INSERT INTO outbox (event_id, realm, event_type, external_id, origin_system, \
             payload, created_at) \
           SELECT $13, realm, 'login', external_id, $14, ",
        payload,
        ", $12 FROM ins \
         ), audit AS ( \
           INSERT INTO audit (at_ms, realm, actor, action, target, result, changed, detail) \
           SELECT $12, $17, $16, $18, $19, 'ok', 1, $20 FROM ins WHERE $16 IS NOT NULL \
         ) ",
    ]
    .concat()
}

/// A PARENT or FIXED session. The unique constraint decides a conflict: no row comes back.
static INSERT_ROOT: LazyLock<String> = LazyLock::new(|| {
    [
        "WITH ins AS ( ",
        INSERT_COLUMNS,
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'ACTIVE', NULL, $10, $11, $12, $12) \
         ON CONFLICT (realm, external_id) DO NOTHING RETURNING ",
        session_columns!(),
        &login_and_audit("$15"),
        "SELECT ",
        session_columns!(),
        " FROM ins",
    ]
    .concat()
});

/// A CHILD, inserted only under a parent that is ACTIVE, which it holds FOR SHARE until the
/// commit: a destroy of the parent either waits for this insert and then finds the child, or
/// ends the parent first and this insert finds it ended. The child takes its parent's IdP
/// session and user when it has none (`$21` says whether the event's payload, built without
/// them, must take them too). One row always comes back: the parent's status (NULL when
/// there is none), and the new session's columns (NULL when nothing was inserted).
///
/// The status is tested after the lookup, not in it: `status = 'ACTIVE'` beside
/// `realm = $1` lets the planner take the `(realm, status, id)` index while the table's
/// statistics are young, and scan every live session of the realm for each insert.
static INSERT_CHILD: LazyLock<String> = LazyLock::new(|| {
    [
        "WITH parent AS ( \
           SELECT status, idp_session_id, user_id FROM sessions \
           WHERE realm = $1 AND external_id = $4 FOR SHARE \
         ), ins AS ( ",
        INSERT_COLUMNS,
        "SELECT $1, $2, $3, $4, COALESCE($5, parent.idp_session_id), $6, \
           COALESCE($7, parent.user_id), $8, $9, 'ACTIVE', NULL, $10, $11, $12, $12 FROM parent \
         WHERE parent.status = 'ACTIVE' \
         ON CONFLICT (realm, external_id) DO NOTHING RETURNING ",
        session_columns!(),
        &login_and_audit(
            "CASE WHEN $21 THEN CAST(CAST($15 AS jsonb) || jsonb_build_object('idpSessionId', \
             idp_session_id, 'userId', user_id) AS text) ELSE $15 END",
        ),
        "SELECT (SELECT status FROM parent) AS parent_status, ins.* \
         FROM (SELECT 1) AS one LEFT JOIN ins ON true",
    ]
    .concat()
});

/// The recursive step and the update of a cascade over `tree(id, external_id, via)`, whose
/// seeds the statement starts with: children via `parent_id` (`via` 1) get `$7` (or
/// ORPHANED when `$4`, the orphan policy), sessions delegated by one of the tree
/// (`via` 2) `delegation_ended`, the seeds (`via` 0) `$5`. `ended` holds the changed rows.
/// PostgreSQL allows one recursive reference; a lateral union keeps both index lookups. The
/// update finds its rows by primary key (`= ANY` of the ids): joined to `marked` alone, whose
/// size the planner guesses at 200, it scans the whole table whenever that looks cheaper.
/// `realm = sessions.realm` changes nothing but marks the realm-led indexes as touched: for
/// an index whose columns the update leaves alone, PostgreSQL first tries to make room on a
/// full leaf page by deleting old row versions there ("bottom-up" deletion), which cannot
/// succeed while this transaction still holds them, and that failed pass over the heap was
/// a sixth of a 1,000-session cascade. The pages split at once instead; vacuum tidies them.
const CASCADE_TAIL: &str = concat!(
    " UNION \
           SELECT x.id, x.external_id, x.via FROM tree t CROSS JOIN LATERAL ( \
             SELECT c.id, c.external_id, 1 AS via FROM sessions c \
             WHERE c.realm = $1 AND c.parent_id = t.external_id \
             UNION ALL SELECT c.id, c.external_id, 2 AS via FROM sessions c \
             WHERE c.realm = $1 AND c.delegated_by = t.external_id) x \
         ), marked AS ( \
           SELECT id AS m_id, MIN(via) AS via FROM tree GROUP BY id \
         ), ended AS ( \
           UPDATE sessions SET \
             status = CASE WHEN marked.via = 1 AND $4 THEN 'ORPHANED' ELSE 'DESTROYED' END, \
             end_reason = CASE WHEN marked.via = 0 THEN $5 \
                               WHEN marked.via = 1 AND $4 THEN NULL \
                               WHEN marked.via = 1 THEN $7 \
                               ELSE 'delegation_ended' END, \
             updated_at = $6, realm = sessions.realm \
           FROM marked \
           WHERE sessions.id = ANY(ARRAY(SELECT m_id FROM marked)) \
             AND sessions.id = marked.m_id \
             AND (sessions.status = 'ACTIVE' \
                  OR (sessions.status = 'ORPHANED' AND NOT (marked.via = 1 AND $4))) \
           RETURNING ",
    session_columns!(),
    " ) "
);

/// Live (ACTIVE or ORPHANED) sessions of the trees below the seeds `$2` of the kinds `$4`,
/// reached through live sessions, counted up to `$3`: the walk is lazy, so the LIMIT stops
/// the recursion there.
const COUNT_LIVE_TREE: &str = "WITH RECURSIVE tree(external_id) AS ( \
       SELECT external_id FROM sessions WHERE realm = $1 AND external_id = ANY($2) \
         AND kind = ANY($4) AND status IN ('ACTIVE', 'ORPHANED') \
     UNION \
       SELECT x.external_id FROM tree t CROSS JOIN LATERAL ( \
         SELECT c.external_id, c.status FROM sessions c \
         WHERE c.realm = $1 AND c.parent_id = t.external_id \
         UNION ALL SELECT c.external_id, c.status FROM sessions c \
         WHERE c.realm = $1 AND c.delegated_by = t.external_id) x \
       WHERE x.status IN ('ACTIVE', 'ORPHANED') \
     ) SELECT count(*) FROM (SELECT 1 FROM tree LIMIT $3) bounded";

/// Destroy of one named session (`$2`): locks it FOR UPDATE, and cascades from it when it
/// has one of the kinds `$3` and has not ended. One row per changed session, or one with
/// NULL session columns when nothing changed; none when it does not exist. Every row
/// carries the target's kind and status, which decide the refusal.
static CASCADE_FROM_TARGET: LazyLock<String> = LazyLock::new(|| {
    [
        "WITH RECURSIVE target AS ( \
           SELECT id, external_id, kind, status FROM sessions \
           WHERE realm = $1 AND external_id = $2 FOR UPDATE \
         ), tree(id, external_id, via) AS ( \
           SELECT id, external_id, 0 FROM target \
           WHERE status <> 'DESTROYED' AND kind = ANY($3)",
        CASCADE_TAIL,
        "SELECT target.kind AS target_kind, target.status AS target_status, ended.* \
         FROM target LEFT JOIN ended ON true",
    ]
    .concat()
});

/// A cascade from the sessions named in `$2`, which get `via` `$3`.
static CASCADE_FROM_SEEDS: LazyLock<String> = LazyLock::new(|| {
    [
        "WITH RECURSIVE tree(id, external_id, via) AS ( \
           SELECT id, external_id, $3 FROM sessions WHERE realm = $1 AND external_id = ANY($2)",
        CASCADE_TAIL,
        "SELECT * FROM ended",
    ]
    .concat()
});

/// A cascade whose seeds (`via` `$3`) are the live sessions `seeds` selects by `$2`: found
/// in the cascade's own statement, a round trip less than reading them first.
fn cascade_from_match(seeds: &str) -> String {
    [
        "WITH RECURSIVE tree(id, external_id, via) AS ( \
           SELECT id, external_id, $3 FROM sessions WHERE realm = $1 AND ",
        seeds,
        CASCADE_TAIL,
        "SELECT * FROM ended",
    ]
    .concat()
}

/// A cascade from the live PARENTs mapped to the IdP session `$2`.
static CASCADE_FROM_IDP_SESSION: LazyLock<String> = LazyLock::new(|| {
    cascade_from_match(
        "idp_session_id = $2 AND kind = 'PARENT' AND status IN ('ACTIVE', 'ORPHANED')",
    )
});

/// A cascade from every live session of the user `$2`.
static CASCADE_FROM_USER: LazyLock<String> =
    LazyLock::new(|| cascade_from_match("user_id = $2 AND status IN ('ACTIVE', 'ORPHANED')"));

/// Outbox rows of one realm from parallel arrays (event ids, types, sessions, payloads), in
/// array order; the arguments name the placeholders.
fn insert_events_sql(realm: &str, origin: &str, now: &str, arrays: &str) -> String {
    [
        "INSERT INTO outbox (event_id, realm, event_type, external_id, origin_system, \
           payload, created_at) \
         SELECT e.event_id, ",
        realm,
        ", e.event_type, e.external_id, ",
        origin,
        ", e.payload, ",
        now,
        " FROM unnest(",
        arrays,
        ") WITH ORDINALITY AS e(event_id, event_type, external_id, payload, n) ORDER BY e.n",
    ]
    .concat()
}

/// What follows a cascade pass, in one statement: its `logout` events; the live children of
/// the sessions it changed (`$2`) that were committed while it ran (this statement's
/// snapshot is newer than the cascade's), the stragglers it returns; and, when there are
/// none, the destroy's audit record (`$9`..`$14`: actor, realm, action, target, detail,
/// count). Two index lookups rather than one OR, which the planner turns into a scan; the
/// status is tested outside them (`below` is materialised), so the edge indexes are the
/// only ones that fit (see [`INSERT_CHILD`]).
static EVENTS_AND_RECHECK: LazyLock<String> = LazyLock::new(|| {
    [
        "WITH event AS ( ",
        &insert_events_sql(
            "$1",
            "$3",
            "$4",
            "CAST($5 AS text[]), CAST($6 AS text[]), CAST($7 AS text[]), CAST($8 AS text[])",
        ),
        " ), below AS MATERIALIZED ( \
       SELECT external_id, status FROM sessions \
       WHERE realm = $1 AND parent_id IS NOT NULL AND parent_id = ANY($2) \
       UNION ALL SELECT external_id, status FROM sessions \
       WHERE realm = $1 AND delegated_by IS NOT NULL AND delegated_by = ANY($2) \
     ), straggler AS ( \
       SELECT DISTINCT external_id FROM below WHERE status = 'ACTIVE' \
     ), audit AS ( \
       INSERT INTO audit (at_ms, realm, actor, action, target, result, changed, detail) \
       SELECT $4, $10, $9, $11, $12, 'ok', $14, $13 \
       WHERE $9 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM straggler) \
     ) SELECT external_id FROM straggler",
    ]
    .concat()
});

/// Outbox rows alone (refresh and revoke events).
static INSERT_EVENTS: LazyLock<String> = LazyLock::new(|| {
    insert_events_sql(
        "$1",
        "$2",
        "$3",
        "CAST($4 AS text[]), CAST($5 AS text[]), CAST($6 AS text[]), CAST($7 AS text[])",
    )
});

/// An audit entry as the statement parameters that carry it (all NULL without one).
struct AuditBinds {
    actor: Option<String>,
    realm: Option<String>,
    action: Option<String>,
    target: Option<String>,
    detail: Option<String>,
}

impl AuditBinds {
    fn of(entry: Option<&AuditEntry>) -> Self {
        AuditBinds {
            actor: entry.map(|e| e.actor.clone()),
            realm: entry.and_then(|e| e.realm.clone()),
            action: entry.map(|e| e.action.to_string()),
            target: entry.and_then(|e| e.target.clone()),
            detail: entry.and_then(|e| e.detail.as_ref().map(|d| d.to_string())),
        }
    }
}

/// Parallel arrays of outbox rows, as [`insert_events_sql`] binds them.
#[derive(Default)]
struct EventArrays {
    ids: Vec<String>,
    types: Vec<&'static str>,
    sessions: Vec<String>,
    payloads: Vec<String>,
}

impl EventArrays {
    fn of(events: &[SyncEvent]) -> Result<Self> {
        let mut out = EventArrays::default();
        for e in events {
            out.payloads.push(
                serde_json::to_string(e)
                    .map_err(|err| StoreError::Corrupt(format!("event: {err}")))?,
            );
            out.ids.push(e.event_id.clone());
            out.types.push(e.event_type.as_str());
            out.sessions.push(e.external_id.clone());
        }
        Ok(out)
    }
}

/// The `login` event of a session about to be inserted: everything in it is known before
/// the insert (the store adds only the sequence number and the timestamps, and `now` is
/// both). Inherited fields are filled in by the statement.
fn login_event(new: &NewSession, origin: Option<&str>, now: i64) -> Result<SyncEvent> {
    Ok(SyncEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        event_type: EventType::Login,
        realm: new.realm.clone(),
        external_id: new.external_id.clone(),
        kind: new.kind,
        idp_session_id: new.idp_session_id.clone(),
        idp_client_session_id: new.idp_client_session_id.clone(),
        user_id: new.user_id.clone(),
        system: new.system.clone(),
        origin_system: origin.map(str::to_owned),
        end_reason: None,
        attributes: new.attributes.clone(),
        // Stored in milliseconds: the event says what a read of the session says.
        expires_at: new
            .expires_at
            .map(|t| millis_to_time(t.timestamp_millis()))
            .transpose()?,
        occurred_at: millis_to_time(now)?,
    })
}

/// Binds `$1`..`$20` of [`INSERT_ROOT`] and [`INSERT_CHILD`].
fn bind_insert<'q>(
    new: &'q NewSession,
    event: &SyncEvent,
    audit: Option<&AuditEntry>,
    now: i64,
) -> Result<sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>> {
    let sql = if new.parent_id.is_some() {
        INSERT_CHILD.as_str()
    } else {
        INSERT_ROOT.as_str()
    };
    let attributes = serde_json::to_string(&new.attributes)
        .map_err(|e| StoreError::Corrupt(format!("attributes: {e}")))?;
    let payload =
        serde_json::to_string(event).map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
    let audit = AuditBinds::of(audit);
    Ok(sqlx::query(sql)
        .bind(&new.realm)
        .bind(&new.external_id)
        .bind(new.kind.as_str())
        .bind(&new.parent_id)
        .bind(&new.idp_session_id)
        .bind(&new.idp_client_session_id)
        .bind(&new.user_id)
        .bind(&new.system)
        .bind(&new.delegated_by)
        .bind(attributes)
        .bind(new.expires_at.map(|t| t.timestamp_millis()))
        .bind(now)
        .bind(event.event_id.clone())
        .bind(event.origin_system.clone())
        .bind(payload)
        .bind(audit.actor)
        .bind(audit.realm)
        .bind(audit.action)
        .bind(audit.target)
        .bind(audit.detail))
}

/// Inserts a PARENT or FIXED session with its `login` event (and audit record);
/// `None` when `(realm, external_id)` is taken.
async fn insert_root<'c>(
    conn: impl PgExecutor<'c>,
    new: &NewSession,
    origin: Option<&str>,
    audit: Option<&AuditEntry>,
    now: i64,
) -> Result<Option<Session>> {
    let event = login_event(new, origin, now)?;
    let row = bind_insert(new, &event, audit, now)?
        .fetch_optional(conn)
        .await?;
    row.map(|r| session_of(&r)).transpose()
}

fn session_of(row: &PgRow) -> Result<Session> {
    Session::try_from(SessionRow::from_row(row)?)
}

/// What a PARENT inherits from the mirror of its IdP session.
#[derive(sqlx::FromRow)]
struct Mirror {
    status: String,
    delegated_by: Option<String>,
    expires_at: Option<i64>,
    user_id: Option<String>,
}

/// Registers a session (its `login` event and audit record in the same statement). Runs
/// outside a transaction: it is one statement, apart from the read of an IdP session's
/// mirror, which takes no lock and would see the same in a transaction.
pub(crate) async fn map<'c>(
    conn: impl PgExecutor<'c> + Copy,
    cmd: &MapCommand,
    now: i64,
) -> Result<Session> {
    // Copied only when something is inherited (the common PARENT is not).
    let mut new = std::borrow::Cow::Borrowed(&cmd.session);
    if let Some(mirror_id) = cmd
        .inherit_from
        .as_deref()
        .filter(|m| *m != new.external_id)
    {
        // The IdP session's user, lifetime and delegation (impersonation) hold for every
        // PARENT mapped to it.
        // Only a live mirror counts; tested here, not in the lookup (see INSERT_CHILD).
        let mirror: Option<Mirror> = sqlx::query_as(
            "SELECT status, delegated_by, expires_at, user_id FROM sessions \
             WHERE realm = $1 AND external_id = $2",
        )
        .bind(&new.realm)
        .bind(mirror_id)
        .fetch_optional(conn)
        .await?;
        if let Some(Mirror {
            delegated_by,
            expires_at,
            user_id,
            ..
        }) = mirror.filter(|m| m.status == SessionStatus::Active.as_str())
        {
            // Logout-everywhere and revoke find it by the IdP session's user.
            if new.user_id.is_none() && user_id.is_some() {
                new.to_mut().user_id = user_id;
            }
            if new.expires_at.is_none() && expires_at.is_some() {
                new.to_mut().expires_at = expires_at.map(millis_to_time).transpose()?;
            }
            if new.delegated_by.is_none() && delegated_by.is_some() {
                new.to_mut().delegated_by = Some(mirror_id.to_owned());
            }
        }
    }
    let origin = cmd.origin_system.as_deref();
    let Some(parent_id) = &new.parent_id else {
        return insert_root(conn, &new, origin, cmd.audit.as_ref(), now)
            .await?
            .ok_or_else(|| StoreError::AlreadyExists(new.external_id.clone()));
    };
    let event = login_event(&new, origin, now)?;
    // A child takes its parent's IdP session and user unless told otherwise, so that
    // queries and logout-everywhere find it.
    let inherits = new.idp_session_id.is_none() || new.user_id.is_none();
    let row = bind_insert(&new, &event, cmd.audit.as_ref(), now)?
        .bind(inherits)
        .fetch_one(conn)
        .await?;
    if row.try_get::<Option<i64>, _>("id")?.is_some() {
        return session_of(&row);
    }
    let status: Option<String> = row.try_get("parent_status")?;
    match status.map(|s| s.parse::<SessionStatus>()) {
        None => Err(StoreError::ParentNotFound(parent_id.clone())),
        Some(Ok(SessionStatus::Active)) => Err(StoreError::AlreadyExists(new.external_id.clone())),
        Some(Ok(status)) => Err(StoreError::ParentNotActive {
            id: parent_id.clone(),
            status,
        }),
        Some(Err(e)) => Err(StoreError::Corrupt(e.to_string())),
    }
}

/// Remembers `guard`'s id for its window; refuses an id seen before, in one round trip. An
/// expired row of the same id is taken over (the `WHERE` of the upsert), as if it had been
/// purged first. The purge of other expired ids rides along, bounded and skipping rows a
/// concurrent transaction is purging, so no two callers wait on each other's deletes; it
/// leaves this id's row to the upsert (one statement must not change a row twice).
async fn check_replay(
    conn: &mut PgConnection,
    realm: &str,
    guard: &ReplayGuard,
    now: i64,
) -> Result<()> {
    let sql = match guard.kind {
        ReplayKind::LogoutToken => &*GUARD_LOGOUT_TOKEN,
        ReplayKind::IdpEvent => &*GUARD_IDP_EVENT,
    };
    let fresh = sqlx::query(sql)
        .bind(realm)
        .bind(&guard.jti)
        .bind(guard.until_ms)
        .bind(now)
        .bind(REPLAY_PURGE_BATCH)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if fresh == 0 {
        return Err(StoreError::Replayed(guard.jti.clone()));
    }
    Ok(())
}

/// Expired replay-guard rows purged per guarded write: more than one, so the table shrinks
/// faster than it grows at any write rate; few, so a backlog never makes one write slow.
const REPLAY_PURGE_BATCH: i64 = 16;

/// [`check_replay`]'s statement for a replay table keyed `(realm, <id column>)`:
/// `$1` realm, `$2` id, `$3` its window's end, `$4` now, `$5` the purge batch.
fn replay_guard_sql(table: &str, id: &str) -> String {
    format!(
        "WITH purged AS ( \
           DELETE FROM {table} WHERE (realm, {id}) IN ( \
             SELECT realm, {id} FROM {table} WHERE until_ms < $4 \
               AND NOT (realm = $1 AND {id} = $2) \
             ORDER BY until_ms LIMIT $5 FOR UPDATE SKIP LOCKED) \
         ) INSERT INTO {table} (realm, {id}, until_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (realm, {id}) DO UPDATE SET until_ms = EXCLUDED.until_ms \
         WHERE {table}.until_ms < $4"
    )
}

static GUARD_LOGOUT_TOKEN: LazyLock<String> =
    LazyLock::new(|| replay_guard_sql("logout_tokens", "jti"));
static GUARD_IDP_EVENT: LazyLock<String> =
    LazyLock::new(|| replay_guard_sql("idp_events", "event_id"));

/// Applies an identity-provider event and stores its id (and its audit record), in the
/// caller's transaction.
pub(crate) async fn apply_idp(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    now: i64,
) -> Result<IdpOutcome> {
    check_replay(conn, &cmd.realm, &cmd.guard, now).await?;
    let out = apply_idp_change(conn, cmd, now).await?;
    if let Some(entry) = &cmd.audit {
        insert_audit(conn, entry, AuditOutcome::Ok(out.changed() as i64), now).await?;
    }
    Ok(out)
}

/// One function per kind of event, so each reads on its own; all of them write in the
/// caller's transaction.
async fn apply_idp_change(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    now: i64,
) -> Result<IdpOutcome> {
    match &cmd.change {
        IdpChange::Alive {
            mirror,
            actor,
            ended,
        } => idp_alive(conn, cmd, mirror, actor.as_ref(), ended.as_deref(), now).await,
        IdpChange::Revoke { user_id } => idp_revoke(conn, cmd, user_id, now).await,
        IdpChange::End { target, reason } => idp_end(conn, cmd, target, *reason, now).await,
    }
}

/// The IdP session behind `mirror` is alive. The order of the writes is that of the locks
/// taken: the session the IdP ended in the same request first, then the actor, the mirror,
/// and last the sessions mapped to the IdP session before the event arrived.
async fn idp_alive(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    mirror: &NewSession,
    actor: Option<&(Box<NewSession>, String)>,
    ended: Option<&str>,
    now: i64,
) -> Result<IdpOutcome> {
    let origin = Some(cmd.origin_system.as_str());
    let mut out = IdpOutcome::default();
    if let Some(sid) = ended {
        let destroy = idp_destroy(cmd, DestroyTarget::IdpSession(sid.to_owned()), None);
        out.ended = destroy_unguarded(conn, &destroy, None, now).await?;
    }
    if let Some((actor, actor_realm)) = actor {
        out.created
            .extend(register_actor(conn, cmd, actor, actor_realm, now).await?);
    }
    let created = insert_root(&mut *conn, mirror, origin, None, now).await?;
    if let (None, Some(actor)) = (&created, &mirror.delegated_by) {
        out.updated
            .extend(adopt_mirror(conn, cmd, mirror, actor, now).await?);
    }
    out.created.extend(created);
    let Some(sid) = mirror.idp_session_id.as_deref() else {
        return Ok(out);
    };
    if let Some(user_id) = &mirror.user_id {
        set_mapped_user(conn, cmd, sid, user_id, now).await?;
    }
    if let Some(expires_at) = mirror.expires_at {
        let expiry = expires_at.timestamp_millis();
        out.updated
            .extend(refresh_mapped(conn, cmd, sid, expiry, now).await?);
    }
    if mirror.delegated_by.is_some() {
        out.updated
            .extend(delegate_mapped(conn, cmd, sid, &mirror.external_id, now).await?);
    }
    Ok(out)
}

/// Registers the impersonating administrator's mirror and remembers which realm its IdP
/// session impersonates in, so the end of that session reaches this realm too.
async fn register_actor(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    actor: &NewSession,
    actor_realm: &str,
    now: i64,
) -> Result<Option<Session>> {
    let origin = Some(cmd.origin_system.as_str());
    let created = insert_root(&mut *conn, actor, origin, None, now).await?;
    if let Some(actor_sid) = actor.idp_session_id.as_deref() {
        sqlx::query(
            "INSERT INTO idp_delegations (actor_realm, actor_sid, realm) \
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(actor_realm)
        .bind(actor_sid)
        .bind(&cmd.realm)
        .execute(&mut *conn)
        .await?;
    }
    Ok(created)
}

/// The mirror was registered by an earlier event, before the impersonation: it becomes
/// delegated by `actor`.
async fn adopt_mirror(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    mirror: &NewSession,
    actor: &str,
    now: i64,
) -> Result<Vec<Session>> {
    let sql = concat!(
        "UPDATE sessions SET delegated_by = $3, updated_at = $4 \
         WHERE realm = $1 AND external_id = $2 AND status = 'ACTIVE' \
         AND delegated_by IS NULL RETURNING ",
        session_columns!()
    );
    update_returning(conn, sql, cmd, &mirror.external_id, actor, now).await
}

/// Sessions mapped to the IdP session `sid` before the event arrived had no user yet; the
/// event names it.
async fn set_mapped_user(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    sid: &str,
    user_id: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE sessions SET user_id = $3, updated_at = $4 \
         WHERE realm = $1 AND idp_session_id = $2 AND user_id IS NULL \
         AND status = 'ACTIVE'",
    )
    .bind(&cmd.realm)
    .bind(sid)
    .bind(user_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The live PARENTs mapped to `sid` take the IdP session's expiry (`expiry`, ms); those
/// whose expiry changed get a `refresh` event, in creation order.
async fn refresh_mapped(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    sid: &str,
    expiry: i64,
    now: i64,
) -> Result<Vec<Session>> {
    let origin = Some(cmd.origin_system.as_str());
    let sql = concat!(
        "UPDATE sessions SET expires_at = $3, updated_at = $4 \
         WHERE realm = $1 AND idp_session_id = $2 AND kind = 'PARENT' \
         AND status = 'ACTIVE' AND (expires_at IS NULL OR expires_at <> $3) \
         RETURNING ",
        session_columns!()
    );
    let mut refreshed = update_returning(conn, sql, cmd, sid, expiry, now).await?;
    refreshed.sort_by_key(|s| s.seq);
    let occurred_at = millis_to_time(now)?;
    let events: Vec<SyncEvent> = refreshed
        .iter()
        .map(|s| SyncEvent::for_session(EventType::Refresh, s, origin, occurred_at))
        .collect();
    insert_events(conn, &cmd.realm, origin, &events, now).await?;
    Ok(refreshed)
}

/// PARENTs mapped to `sid` before the impersonation event arrived become delegated by the
/// mirror (`mirror_id`), so they end with it.
async fn delegate_mapped(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    sid: &str,
    mirror_id: &str,
    now: i64,
) -> Result<Vec<Session>> {
    let sql = concat!(
        "UPDATE sessions SET delegated_by = $3, updated_at = $4 \
         WHERE realm = $1 AND idp_session_id = $2 AND kind = 'PARENT' \
         AND status = 'ACTIVE' AND delegated_by IS NULL AND external_id <> $3 \
         RETURNING ",
        session_columns!()
    );
    update_returning(conn, sql, cmd, sid, mirror_id, now).await
}

/// Runs one of the updates an IdP event makes, `sql`: in the event's realm (`$1`), the
/// sessions `key` names (`$2`) take `value` (`$3`) at `now` (`$4`); the sessions changed.
async fn update_returning<'q, T>(
    conn: &mut PgConnection,
    sql: &'q str,
    cmd: &'q IdpCommand,
    key: &'q str,
    value: T,
    now: i64,
) -> Result<Vec<Session>>
where
    T: 'q + Send + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    let rows: Vec<SessionRow> = sqlx::query_as(sql)
        .bind(&cmd.realm)
        .bind(key)
        .bind(value)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
    into_sessions(rows)
}

/// The user's grants were revoked: their sessions stay live, and the connectors learn of
/// it through a `revoke` event per session.
async fn idp_revoke(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    user_id: &str,
    now: i64,
) -> Result<IdpOutcome> {
    let origin = Some(cmd.origin_system.as_str());
    let rows: Vec<SessionRow> = sqlx::query_as(concat!(
        "SELECT ",
        session_columns!(),
        " FROM sessions WHERE realm = $1 AND user_id = $2 AND status = 'ACTIVE' \
         ORDER BY id"
    ))
    .bind(&cmd.realm)
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?;
    let occurred_at = millis_to_time(now)?;
    let events: Vec<SyncEvent> = into_sessions(rows)?
        .iter()
        .map(|s| SyncEvent::for_session(EventType::Revoke, s, origin, occurred_at))
        .collect();
    insert_events(conn, &cmd.realm, origin, &events, now).await?;
    Ok(IdpOutcome {
        revoked: events.len(),
        ..IdpOutcome::default()
    })
}

/// Sessions end; when an IdP session ended, so do its mirrors in the realms where it
/// impersonated someone.
async fn idp_end(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    target: &DestroyTarget,
    reason: EndReason,
    now: i64,
) -> Result<IdpOutcome> {
    let mut out = IdpOutcome::default();
    let destroy = idp_destroy(cmd, target.clone(), Some(reason));
    out.ended = destroy_unguarded(conn, &destroy, None, now).await?;
    if let DestroyTarget::IdpSession(sid) = target {
        out.ended_elsewhere = end_delegations(conn, cmd, sid, reason, now).await?;
    }
    Ok(out)
}

/// A destroy the IdP ordered (never limited, no audit record of its own).
fn idp_destroy(
    cmd: &IdpCommand,
    target: DestroyTarget,
    reason: Option<EndReason>,
) -> DestroyCommand {
    DestroyCommand {
        realm: cmd.realm.clone(),
        target,
        reason: reason.unwrap_or(EndReason::IdpLogout),
        origin_system: Some(cmd.origin_system.clone()),
        orphan_children: cmd.orphan_children,
        replay_guard: None,
        revoke: false,
        max_sessions: None,
        audit: None,
    }
}

/// The IdP session `sid` of `cmd.realm` ended: its mirrors in the realms where it
/// impersonated someone end too (cascading to the delegated sessions there).
async fn end_delegations(
    conn: &mut PgConnection,
    cmd: &IdpCommand,
    sid: &str,
    reason: EndReason,
    now: i64,
) -> Result<usize> {
    let realms: Vec<String> = sqlx::query_scalar(
        "DELETE FROM idp_delegations WHERE actor_realm = $1 AND actor_sid = $2 \
         RETURNING realm",
    )
    .bind(&cmd.realm)
    .bind(sid)
    .fetch_all(&mut *conn)
    .await?;
    let mut ended = 0;
    for realm in realms {
        let mut destroy = idp_destroy(cmd, DestroyTarget::IdpSession(sid.to_owned()), Some(reason));
        destroy.realm = realm;
        ended += destroy_unguarded(conn, &destroy, None, now).await?.len();
    }
    Ok(ended)
}

/// Ends the targeted sessions and everything below them, with a `logout` event per ended
/// session and the audit record, in the caller's transaction. Returns the changed sessions
/// in creation order.
pub(crate) async fn destroy(
    conn: &mut PgConnection,
    cmd: &DestroyCommand,
    now: i64,
) -> Result<Vec<Session>> {
    if let Some(guard) = &cmd.replay_guard {
        check_replay(conn, &cmd.realm, guard, now).await?;
    }
    destroy_unguarded(conn, cmd, cmd.audit.as_ref(), now).await
}

/// Finds the sessions `cmd` starts from and cascades from them. A root or child target, and
/// an unlimited IdP-session or user target, need no lookup of their own: the cascade
/// statement finds its seeds, saving a round trip.
async fn destroy_unguarded(
    conn: &mut PgConnection,
    cmd: &DestroyCommand,
    audit: Option<&AuditEntry>,
    now: i64,
) -> Result<Vec<Session>> {
    let seeds: Vec<String> = match &cmd.target {
        DestroyTarget::Parent(id) | DestroyTarget::Child(id) => {
            let changed = cascade_from_target(conn, cmd, id, now).await?;
            return finish_destroy(conn, cmd, audit, changed, now).await;
        }
        // Unlimited, nothing to count first: seeds and cascade in one statement.
        DestroyTarget::IdpSession(key) | DestroyTarget::User(key) if cmd.max_sessions.is_none() => {
            let sql = match &cmd.target {
                DestroyTarget::IdpSession(_) => &*CASCADE_FROM_IDP_SESSION,
                _ => &*CASCADE_FROM_USER,
            };
            let changed = cascade_with(conn, cmd, sql, key.as_str(), now, 0).await?;
            return finish_destroy(conn, cmd, audit, changed, now).await;
        }
        DestroyTarget::IdpSession(sid) => idp_session_seeds(conn, &cmd.realm, sid).await?,
        DestroyTarget::AllIdpSessions => all_idp_session_seeds(conn, &cmd.realm).await?,
        DestroyTarget::Expired(ids) => expired_seeds(conn, &cmd.realm, ids, now).await?,
        DestroyTarget::User(user_id) => user_seeds(conn, &cmd.realm, user_id).await?,
    };
    let changed = if seeds.is_empty() {
        Vec::new()
    } else {
        refuse_oversized(conn, cmd, &seeds, &["PARENT", "CHILD", "FIXED"]).await?;
        cascade(conn, cmd, &seeds, 0, now).await?
    };
    finish_destroy(conn, cmd, audit, changed, now).await
}

/// The first cascade pass from one root or child `id`, which the statement checks is of the
/// target's kind; the sessions it changed.
async fn cascade_from_target(
    conn: &mut PgConnection,
    cmd: &DestroyCommand,
    id: &String,
    now: i64,
) -> Result<Vec<Session>> {
    let reasons = (cmd.reason, cmd.reason.for_descendants());
    let kinds: &[&str] = match &cmd.target {
        DestroyTarget::Child(_) => &["CHILD"],
        _ => &["PARENT", "FIXED"],
    };
    refuse_oversized(conn, cmd, std::slice::from_ref(id), kinds).await?;
    let rows: Vec<PgRow> = sqlx::query(&CASCADE_FROM_TARGET)
        .bind(&cmd.realm)
        .bind(id)
        .bind(kinds)
        .bind(cmd.orphan_children)
        .bind(reasons.0.as_str())
        .bind(now)
        .bind(reasons.1.as_str())
        .fetch_all(&mut *conn)
        .await?;
    let Some(first) = rows.first() else {
        return Err(StoreError::NotFound(id.clone()));
    };
    let kind: SessionKind = first
        .try_get::<String, _>("target_kind")?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
    crate::store::check_kind(&cmd.target, id, kind)?;
    let mut changed = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get::<Option<i64>, _>("id")?.is_some() {
            changed.push(session_of(row)?);
        }
    }
    Ok(changed)
}

/// Seeds of a limited destroy of the IdP session `sid`: its live PARENTs, looked up apart
/// from the cascade so they can be counted first.
async fn idp_session_seeds(conn: &mut PgConnection, realm: &str, sid: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT external_id FROM sessions WHERE realm = $1 AND idp_session_id = $2 \
         AND kind = 'PARENT' AND status IN ('ACTIVE', 'ORPHANED')",
    )
    .bind(realm)
    .bind(sid)
    .fetch_all(&mut *conn)
    .await?)
}

/// Seeds of the IdP logging everyone out: the live PARENTs mapped to any IdP session.
async fn all_idp_session_seeds(conn: &mut PgConnection, realm: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT external_id FROM sessions WHERE realm = $1 \
         AND idp_session_id IS NOT NULL AND kind = 'PARENT' \
         AND status IN ('ACTIVE', 'ORPHANED')",
    )
    .bind(realm)
    .fetch_all(&mut *conn)
    .await?)
}

/// Seeds of a sweep: those of `ids` still expired. Looked at again here: a refresh may have
/// moved the expiry since the sweeper read it.
async fn expired_seeds(
    conn: &mut PgConnection,
    realm: &str,
    ids: &[String],
    now: i64,
) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT external_id FROM sessions WHERE realm = $1 AND external_id = ANY($2) \
         AND status = 'ACTIVE' AND expires_at IS NOT NULL AND expires_at <= $3",
    )
    .bind(realm)
    .bind(ids)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?)
}

/// Seeds of a limited destroy of a user's sessions, looked up apart from the cascade so
/// they can be counted first.
async fn user_seeds(conn: &mut PgConnection, realm: &str, user_id: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT external_id FROM sessions WHERE realm = $1 AND user_id = $2 \
         AND status IN ('ACTIVE', 'ORPHANED')",
    )
    .bind(realm)
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?)
}

/// Refuses a limited destroy whose trees hold more live sessions than its limit, counted
/// before any row is locked or changed, so an oversized destroy costs a bounded walk rather
/// than its whole cascade and a rollback. Live sessions below an ended one are not counted
/// here; [`finish_destroy`] still checks what the cascade changed.
async fn refuse_oversized(
    conn: &mut PgConnection,
    cmd: &DestroyCommand,
    seeds: &[String],
    kinds: &[&str],
) -> Result<()> {
    let Some(limit) = cmd.max_sessions else {
        return Ok(());
    };
    let cap = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
    let live: i64 = sqlx::query_scalar(COUNT_LIVE_TREE)
        .bind(&cmd.realm)
        .bind(seeds)
        .bind(cap)
        .bind(kinds)
        .fetch_one(&mut *conn)
        .await?;
    let live = usize::try_from(live).unwrap_or(usize::MAX);
    if live > limit {
        return Err(StoreError::CascadeTooLarge {
            target: cmd.target.label(),
            sessions: live,
            limit,
        });
    }
    Ok(())
}

/// After the first cascade pass: refuses a destroy over its limit, writes the events, ends
/// the children committed while the cascade ran (a pass per level of them), then the audit
/// record.
async fn finish_destroy(
    conn: &mut PgConnection,
    cmd: &DestroyCommand,
    audit: Option<&AuditEntry>,
    mut changed: Vec<Session>,
    now: i64,
) -> Result<Vec<Session>> {
    let mut pass_from = 0;
    let mut audited = audit.is_none();
    for pass in 0..=MAX_CASCADE_PASSES {
        if let Some(limit) = cmd.max_sessions
            && changed.len() > limit
        {
            // The caller's transaction rolls the cascade back.
            return Err(StoreError::CascadeTooLarge {
                target: cmd.target.label(),
                sessions: changed.len(),
                limit,
            });
        }
        let total = changed.len();
        let pass_changed = &mut changed[pass_from..];
        pass_changed.sort_by_key(|s| s.seq);
        let stragglers = events_and_recheck(conn, cmd, audit, pass_changed, total, now).await?;
        if stragglers.is_empty() {
            audited = true;
            break;
        }
        if pass == MAX_CASCADE_PASSES {
            break;
        }
        pass_from = changed.len();
        let more = cascade(conn, cmd, &stragglers, 1, now).await?;
        changed.extend(more);
    }
    if !audited && let Some(entry) = audit {
        insert_audit(conn, entry, AuditOutcome::Ok(changed.len() as i64), now).await?;
    }
    changed.sort_by_key(|s| s.seq);
    Ok(changed)
}

/// One cascade pass from `seeds` (`seed_via` 0 for the targets themselves, 1 for
/// stragglers, which are children).
async fn cascade(
    conn: &mut PgConnection,
    cmd: &DestroyCommand,
    seeds: &[String],
    seed_via: i32,
    now: i64,
) -> Result<Vec<Session>> {
    cascade_with(conn, cmd, &CASCADE_FROM_SEEDS, seeds, now, seed_via).await
}

/// Runs one of the cascade statements, whose seeds `$2` names (`via` `$3`).
async fn cascade_with<'q, S>(
    conn: &mut PgConnection,
    cmd: &'q DestroyCommand,
    sql: &'q str,
    seeds: S,
    now: i64,
    seed_via: i32,
) -> Result<Vec<Session>>
where
    S: sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + 'q,
{
    let rows: Vec<SessionRow> = sqlx::query_as(sql)
        .bind(&cmd.realm)
        .bind(seeds)
        .bind(seed_via)
        .bind(cmd.orphan_children)
        .bind(cmd.reason.as_str())
        .bind(now)
        .bind(cmd.reason.for_descendants().as_str())
        .fetch_all(&mut *conn)
        .await?;
    into_sessions(rows)
}

/// [`EVENTS_AND_RECHECK`] after a pass that changed `pass` (in creation order); `total`
/// sessions changed so far. Returns the stragglers.
async fn events_and_recheck(
    conn: &mut PgConnection,
    cmd: &DestroyCommand,
    audit: Option<&AuditEntry>,
    pass: &[Session],
    total: usize,
    now: i64,
) -> Result<Vec<String>> {
    let occurred_at: DateTime<Utc> = millis_to_time(now)?;
    let origin = cmd.origin_system.as_deref();
    let events = cmd.events(pass, occurred_at);
    let events = EventArrays::of(&events)?;
    let ids: Vec<&str> = pass.iter().map(|s| s.external_id.as_str()).collect();
    let audit = AuditBinds::of(audit);
    Ok(sqlx::query_scalar(&EVENTS_AND_RECHECK)
        .bind(&cmd.realm)
        .bind(ids)
        .bind(origin)
        .bind(now)
        .bind(events.ids)
        .bind(events.types)
        .bind(events.sessions)
        .bind(events.payloads)
        .bind(audit.actor)
        .bind(audit.realm)
        .bind(audit.action)
        .bind(audit.target)
        .bind(audit.detail)
        .bind(total as i64)
        .fetch_all(&mut *conn)
        .await?)
}

/// Writes outbox rows of one realm in one statement.
async fn insert_events(
    conn: &mut PgConnection,
    realm: &str,
    origin: Option<&str>,
    events: &[SyncEvent],
    now: i64,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let events = EventArrays::of(events)?;
    sqlx::query(&INSERT_EVENTS)
        .bind(realm)
        .bind(origin)
        .bind(now)
        .bind(events.ids)
        .bind(events.types)
        .bind(events.sessions)
        .bind(events.payloads)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
