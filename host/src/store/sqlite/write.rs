//! Every SQLite write, run by the writer thread on its own connection (rusqlite) inside the
//! group's transaction and the request's savepoint. The rules are those of the sqlx
//! operations PostgreSQL runs (`store/ops.rs`, `store/deliveries.rs`): the unique constraint
//! decides conflicts, a cascade is one recursive statement, every change writes its outbox
//! events and audit record in the same transaction. There is one writer, so no row locks and
//! no re-check for children added during a cascade.
//!
//! Placeholders are `?N`: SQLite numbers `$N` by first appearance, `?N` by N.
//!
//! Writes say `OR FAIL`: a statement that may abort half-way makes SQLite copy every page it
//! touches into a statement journal first, which cost more than the insert itself for the
//! outbox rows of a cascade. Nothing needs that journal here: any error fails the request,
//! and its savepoint undoes all of the request's statements.

use std::borrow::Cow;

use rusqlite::{CachedStatement, Connection, OptionalExtension, Params, ToSql, params};

use crate::domain::{
    AuditEntry, AuditOutcome, DestroyCommand, DestroyTarget, EndReason, EventType, IdpChange,
    IdpCommand, IdpOutcome, MapCommand, NewSession, ReplayGuard, ReplayKind, Session, SessionKind,
    SessionStatus, SyncEvent,
};
use crate::store::deliveries::{
    AttemptRecord, ClaimedDelivery, FAN_OUT_BATCH, FanOut, LaneClaim, ReplayTarget,
    decision_columns,
};
use crate::store::row::{SessionRow, into_sessions, millis_to_time, session_columns};
use crate::store::{GateFn, Result, StoreError, connectors::UploadRow};

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn json<T: serde::Serialize + ?Sized>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| corrupt(what, e))
}

/// Runs a prepared statement and converts every row it returns into a session.
fn sessions(mut stmt: CachedStatement<'_>, params: impl Params) -> Result<Vec<Session>> {
    let rows = stmt
        .query_map(params, SessionRow::from_rusqlite)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    into_sessions(rows)
}

/// Runs a prepared statement returning one text column per row.
fn strings(mut stmt: CachedStatement<'_>, params: impl Params) -> Result<Vec<String>> {
    Ok(stmt
        .query_map(params, |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?)
}

// ---- sessions -------------------------------------------------------------------------

/// Inserts a session (and its `login` event). The unique constraint decides conflicts.
pub(super) fn map(conn: &Connection, cmd: &MapCommand, now: i64) -> Result<Session> {
    // Copied only when something is inherited (the common PARENT is not).
    let mut new = Cow::Borrowed(&cmd.session);
    if let Some(parent_id) = &cmd.session.parent_id {
        let parent = conn
            .prepare_cached(
                "SELECT status, idp_session_id, user_id FROM sessions \
                 WHERE realm = ?1 AND external_id = ?2",
            )?
            .query_row(params![new.realm, parent_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })
            .optional()?;
        let Some((status, parent_sid, parent_user)) = parent else {
            return Err(StoreError::ParentNotFound(parent_id.clone()));
        };
        let status: SessionStatus = status.parse().map_err(|e| corrupt("status", e))?;
        if status != SessionStatus::Active {
            return Err(StoreError::ParentNotActive {
                id: parent_id.clone(),
                status,
            });
        }
        // A child belongs to its parent's IdP session and user unless told otherwise, so
        // that queries and logout-everywhere find it.
        if new.idp_session_id.is_none() && parent_sid.is_some() {
            new.to_mut().idp_session_id = parent_sid;
        }
        if new.user_id.is_none() && parent_user.is_some() {
            new.to_mut().user_id = parent_user;
        }
    }
    if let Some(mirror_id) = cmd
        .inherit_from
        .as_deref()
        .filter(|m| *m != new.external_id)
    {
        // The IdP session's user, lifetime and delegation (impersonation) hold for every
        // PARENT mapped to it.
        let mirror = conn
            .prepare_cached(
                "SELECT delegated_by, expires_at, user_id FROM sessions \
                 WHERE realm = ?1 AND external_id = ?2 AND status = 'ACTIVE'",
            )?
            .query_row(params![new.realm, mirror_id], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })
            .optional()?;
        if let Some((delegated_by, expires_at, user_id)) = mirror {
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
    match insert_session(conn, &new, cmd.origin_system.as_deref(), now)? {
        Some(session) => {
            if let Some(entry) = &cmd.audit {
                insert_audit(conn, entry, AuditOutcome::Ok(1), now)?;
            }
            Ok(session)
        }
        None => Err(StoreError::AlreadyExists(new.external_id.clone())),
    }
}

/// Inserts a session and its `login` event; `None` when `(realm, external_id)` is taken.
fn insert_session(
    conn: &Connection,
    new: &NewSession,
    origin_system: Option<&str>,
    now: i64,
) -> Result<Option<Session>> {
    let attributes = json("attributes", &new.attributes)?;
    let row = conn
        .prepare_cached(concat!(
            "INSERT OR FAIL INTO sessions (realm, external_id, kind, parent_id, idp_session_id, \
             idp_client_session_id, user_id, system, delegated_by, status, end_reason, \
             attributes, expires_at, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'ACTIVE', NULL, ?10, ?11, ?12, ?12) \
             ON CONFLICT (realm, external_id) DO NOTHING RETURNING ",
            session_columns!()
        ))?
        .query_row(
            params![
                new.realm,
                new.external_id,
                new.kind.as_str(),
                new.parent_id,
                new.idp_session_id,
                new.idp_client_session_id,
                new.user_id,
                new.system,
                new.delegated_by,
                attributes,
                new.expires_at.map(|t| t.timestamp_millis()),
                now,
            ],
            SessionRow::from_rusqlite,
        )
        .optional()?;
    let Some(row) = row else {
        return Ok(None);
    };
    let session = Session::try_from(row)?;
    let event = SyncEvent::for_session(
        EventType::Login,
        &session,
        origin_system,
        millis_to_time(now)?,
    );
    insert_events(conn, std::slice::from_ref(&event), now)?;
    Ok(Some(session))
}

/// Remembers `guard`'s id for its window; refuses an id seen before.
fn check_replay(conn: &Connection, realm: &str, guard: &ReplayGuard, now: i64) -> Result<()> {
    let (purge, insert) = match guard.kind {
        ReplayKind::LogoutToken => (
            "DELETE FROM logout_tokens WHERE until_ms < ?1",
            "INSERT OR FAIL INTO logout_tokens (realm, jti, until_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (realm, jti) DO NOTHING",
        ),
        ReplayKind::IdpEvent => (
            "DELETE FROM idp_events WHERE until_ms < ?1",
            "INSERT OR FAIL INTO idp_events (realm, event_id, until_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (realm, event_id) DO NOTHING",
        ),
    };
    conn.prepare_cached(purge)?.execute([now])?;
    let fresh = conn
        .prepare_cached(insert)?
        .execute(params![realm, guard.jti, guard.until_ms])?;
    if fresh == 0 {
        return Err(StoreError::Replayed(guard.jti.clone()));
    }
    Ok(())
}

/// Applies an identity-provider event and stores its id (and its audit record).
pub(super) fn apply_idp(conn: &Connection, cmd: &IdpCommand, now: i64) -> Result<IdpOutcome> {
    check_replay(conn, &cmd.realm, &cmd.guard, now)?;
    let out = apply_idp_change(conn, cmd, now)?;
    if let Some(entry) = &cmd.audit {
        insert_audit(conn, entry, AuditOutcome::Ok(out.changed() as i64), now)?;
    }
    Ok(out)
}

/// A destroy the IdP ordered (never refused for its size, no replay guard of its own).
fn idp_destroy(
    cmd: &IdpCommand,
    realm: &str,
    target: DestroyTarget,
    reason: EndReason,
) -> DestroyCommand {
    DestroyCommand {
        realm: realm.to_owned(),
        target,
        reason,
        origin_system: Some(cmd.origin_system.clone()),
        orphan_children: cmd.orphan_children,
        replay_guard: None,
        revoke: false,
        max_sessions: None,
        audit: None,
    }
}

/// One function per kind of event, so each reads on its own.
fn apply_idp_change(conn: &Connection, cmd: &IdpCommand, now: i64) -> Result<IdpOutcome> {
    match &cmd.change {
        IdpChange::Alive {
            mirror,
            actor,
            ended,
        } => idp_alive(conn, cmd, mirror, actor.as_ref(), ended.as_deref(), now),
        IdpChange::Revoke { user_id } => idp_revoke(conn, cmd, user_id, now),
        IdpChange::End { target, reason } => idp_end(conn, cmd, target, *reason, now),
    }
}

/// The IdP session behind `mirror` is alive. The writes come in the order PostgreSQL runs
/// them: the session the IdP ended in the same request first, then the actor, the mirror,
/// and last the sessions mapped to the IdP session before the event arrived.
fn idp_alive(
    conn: &Connection,
    cmd: &IdpCommand,
    mirror: &NewSession,
    actor: Option<&(Box<NewSession>, String)>,
    ended: Option<&str>,
    now: i64,
) -> Result<IdpOutcome> {
    let origin = Some(cmd.origin_system.as_str());
    let mut out = IdpOutcome::default();
    if let Some(sid) = ended {
        let destroy = idp_destroy(
            cmd,
            &cmd.realm,
            DestroyTarget::IdpSession(sid.to_owned()),
            EndReason::IdpLogout,
        );
        out.ended = destroy_unguarded(conn, &destroy, now)?;
    }
    if let Some((actor, actor_realm)) = actor {
        out.created
            .extend(register_actor(conn, cmd, actor, actor_realm, now)?);
    }
    let created = insert_session(conn, mirror, origin, now)?;
    if let (None, Some(actor)) = (&created, &mirror.delegated_by) {
        out.updated
            .extend(adopt_mirror(conn, cmd, mirror, actor, now)?);
    }
    out.created.extend(created);
    let Some(sid) = mirror.idp_session_id.as_deref() else {
        return Ok(out);
    };
    if let Some(user_id) = &mirror.user_id {
        set_mapped_user(conn, cmd, sid, user_id, now)?;
    }
    if let Some(expires_at) = mirror.expires_at {
        let expiry = expires_at.timestamp_millis();
        out.updated
            .extend(refresh_mapped(conn, cmd, sid, expiry, now)?);
    }
    if mirror.delegated_by.is_some() {
        out.updated
            .extend(delegate_mapped(conn, cmd, sid, &mirror.external_id, now)?);
    }
    Ok(out)
}

/// Registers the impersonating administrator's mirror and remembers which realm its IdP
/// session impersonates in, so the end of that session reaches this realm too.
fn register_actor(
    conn: &Connection,
    cmd: &IdpCommand,
    actor: &NewSession,
    actor_realm: &str,
    now: i64,
) -> Result<Option<Session>> {
    let origin = Some(cmd.origin_system.as_str());
    let created = insert_session(conn, actor, origin, now)?;
    if let Some(actor_sid) = actor.idp_session_id.as_deref() {
        conn.prepare_cached(
            "INSERT OR FAIL INTO idp_delegations (actor_realm, actor_sid, realm) \
             VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )?
        .execute(params![actor_realm, actor_sid, cmd.realm])?;
    }
    Ok(created)
}

/// The mirror was registered by an earlier event, before the impersonation: it becomes
/// delegated by `actor`.
fn adopt_mirror(
    conn: &Connection,
    cmd: &IdpCommand,
    mirror: &NewSession,
    actor: &str,
    now: i64,
) -> Result<Vec<Session>> {
    let stmt = conn.prepare_cached(concat!(
        "UPDATE OR FAIL sessions SET delegated_by = ?3, updated_at = ?4 \
         WHERE realm = ?1 AND external_id = ?2 AND status = 'ACTIVE' \
         AND delegated_by IS NULL RETURNING ",
        session_columns!()
    ))?;
    sessions(stmt, params![cmd.realm, mirror.external_id, actor, now])
}

/// Sessions mapped to the IdP session `sid` before the event arrived had no user yet; the
/// event names it.
fn set_mapped_user(
    conn: &Connection,
    cmd: &IdpCommand,
    sid: &str,
    user_id: &str,
    now: i64,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE OR FAIL sessions SET user_id = ?3, updated_at = ?4 \
         WHERE realm = ?1 AND idp_session_id = ?2 AND user_id IS NULL \
         AND status = 'ACTIVE'",
    )?
    .execute(params![cmd.realm, sid, user_id, now])?;
    Ok(())
}

/// The live PARENTs mapped to `sid` take the IdP session's expiry (`expiry`, ms); those
/// whose expiry changed get a `refresh` event, in creation order.
fn refresh_mapped(
    conn: &Connection,
    cmd: &IdpCommand,
    sid: &str,
    expiry: i64,
    now: i64,
) -> Result<Vec<Session>> {
    let origin = Some(cmd.origin_system.as_str());
    let stmt = conn.prepare_cached(concat!(
        "UPDATE OR FAIL sessions SET expires_at = ?3, updated_at = ?4 \
         WHERE realm = ?1 AND idp_session_id = ?2 AND kind = 'PARENT' \
         AND status = 'ACTIVE' AND (expires_at IS NULL OR expires_at <> ?3) \
         RETURNING ",
        session_columns!()
    ))?;
    let mut refreshed = sessions(stmt, params![cmd.realm, sid, expiry, now])?;
    refreshed.sort_by_key(|s| s.seq);
    let occurred_at = millis_to_time(now)?;
    let events: Vec<SyncEvent> = refreshed
        .iter()
        .map(|s| SyncEvent::for_session(EventType::Refresh, s, origin, occurred_at))
        .collect();
    insert_events(conn, &events, now)?;
    Ok(refreshed)
}

/// PARENTs mapped to `sid` before the impersonation event arrived become delegated by the
/// mirror (`mirror_id`), so they end with it.
fn delegate_mapped(
    conn: &Connection,
    cmd: &IdpCommand,
    sid: &str,
    mirror_id: &str,
    now: i64,
) -> Result<Vec<Session>> {
    let stmt = conn.prepare_cached(concat!(
        "UPDATE OR FAIL sessions SET delegated_by = ?3, updated_at = ?4 \
         WHERE realm = ?1 AND idp_session_id = ?2 AND kind = 'PARENT' \
         AND status = 'ACTIVE' AND delegated_by IS NULL AND external_id <> ?3 \
         RETURNING ",
        session_columns!()
    ))?;
    sessions(stmt, params![cmd.realm, sid, mirror_id, now])
}

/// The user's grants were revoked: their sessions stay live, and the connectors learn of
/// it through a `revoke` event per session.
fn idp_revoke(conn: &Connection, cmd: &IdpCommand, user_id: &str, now: i64) -> Result<IdpOutcome> {
    let origin = Some(cmd.origin_system.as_str());
    let stmt = conn.prepare_cached(concat!(
        "SELECT ",
        session_columns!(),
        " FROM sessions WHERE realm = ?1 AND user_id = ?2 AND status = 'ACTIVE' \
         ORDER BY id"
    ))?;
    let live = sessions(stmt, params![cmd.realm, user_id])?;
    let occurred_at = millis_to_time(now)?;
    let events: Vec<SyncEvent> = live
        .iter()
        .map(|s| SyncEvent::for_session(EventType::Revoke, s, origin, occurred_at))
        .collect();
    insert_events(conn, &events, now)?;
    Ok(IdpOutcome {
        revoked: events.len(),
        ..IdpOutcome::default()
    })
}

/// Sessions end; when an IdP session ended, so do its mirrors in the realms where it
/// impersonated someone.
fn idp_end(
    conn: &Connection,
    cmd: &IdpCommand,
    target: &DestroyTarget,
    reason: EndReason,
    now: i64,
) -> Result<IdpOutcome> {
    let mut out = IdpOutcome::default();
    let destroy = idp_destroy(cmd, &cmd.realm, target.clone(), reason);
    out.ended = destroy_unguarded(conn, &destroy, now)?;
    if let DestroyTarget::IdpSession(sid) = target {
        out.ended_elsewhere = end_delegations(conn, cmd, sid, reason, now)?;
    }
    Ok(out)
}

/// The IdP session `sid` of `cmd.realm` ended: its mirrors in the realms where it
/// impersonated someone end too (cascading to the delegated sessions there).
fn end_delegations(
    conn: &Connection,
    cmd: &IdpCommand,
    sid: &str,
    reason: EndReason,
    now: i64,
) -> Result<usize> {
    let realms = strings(
        conn.prepare_cached(
            "DELETE FROM idp_delegations WHERE actor_realm = ?1 AND actor_sid = ?2 \
             RETURNING realm",
        )?,
        params![cmd.realm, sid],
    )?;
    let mut ended = 0;
    for realm in realms {
        let destroy = idp_destroy(
            cmd,
            &realm,
            DestroyTarget::IdpSession(sid.to_owned()),
            reason,
        );
        ended += destroy_unguarded(conn, &destroy, now)?.len();
    }
    Ok(ended)
}

/// Ends the targeted sessions and everything below them; writes a `logout` event per ended
/// session. Returns the changed sessions in creation order.
pub(super) fn destroy(conn: &Connection, cmd: &DestroyCommand, now: i64) -> Result<Vec<Session>> {
    if let Some(guard) = &cmd.replay_guard {
        check_replay(conn, &cmd.realm, guard, now)?;
    }
    let changed = destroy_unguarded(conn, cmd, now)?;
    if let Some(entry) = &cmd.audit {
        insert_audit(conn, entry, AuditOutcome::Ok(changed.len() as i64), now)?;
    }
    Ok(changed)
}

/// Finds the sessions `cmd` starts from, then hands them to [`end_trees`]. No seeds, no
/// work: a target already gone or nothing matching changes nothing.
fn destroy_unguarded(conn: &Connection, cmd: &DestroyCommand, now: i64) -> Result<Vec<Session>> {
    let seeds: Vec<String> = match &cmd.target {
        DestroyTarget::Parent(id) | DestroyTarget::Child(id) => target_seed(conn, cmd, id)?,
        DestroyTarget::IdpSession(sid) => idp_session_seeds(conn, &cmd.realm, sid)?,
        DestroyTarget::AllIdpSessions => all_idp_session_seeds(conn, &cmd.realm)?,
        DestroyTarget::Expired(ids) => expired_seeds(conn, &cmd.realm, ids, now)?,
        DestroyTarget::User(user_id) => user_seeds(conn, &cmd.realm, user_id)?,
    };
    if seeds.is_empty() {
        return Ok(Vec::new());
    }
    end_trees(conn, cmd, &seeds, now)
}

/// The one root or child `id`, which must exist and be of the target's kind; none when it
/// already ended (destroying twice is not an error).
fn target_seed(conn: &Connection, cmd: &DestroyCommand, id: &String) -> Result<Vec<String>> {
    let found = conn
        .prepare_cached("SELECT kind, status FROM sessions WHERE realm = ?1 AND external_id = ?2")?
        .query_row(params![cmd.realm, id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?;
    let Some((kind, status)) = found else {
        return Err(StoreError::NotFound(id.clone()));
    };
    let kind: SessionKind = kind.parse().map_err(|e| corrupt("kind", e))?;
    crate::store::check_kind(&cmd.target, id, kind)?;
    if status == SessionStatus::Destroyed.as_str() {
        return Ok(Vec::new());
    }
    Ok(vec![id.clone()])
}

/// Seeds of the IdP session `sid` ending: its live PARENTs.
fn idp_session_seeds(conn: &Connection, realm: &str, sid: &str) -> Result<Vec<String>> {
    strings(
        conn.prepare_cached(
            "SELECT external_id FROM sessions WHERE realm = ?1 AND idp_session_id = ?2 \
             AND kind = 'PARENT' AND status IN ('ACTIVE', 'ORPHANED')",
        )?,
        params![realm, sid],
    )
}

/// Seeds of the IdP logging everyone out: the live PARENTs mapped to any IdP session.
fn all_idp_session_seeds(conn: &Connection, realm: &str) -> Result<Vec<String>> {
    strings(
        conn.prepare_cached(
            "SELECT external_id FROM sessions WHERE realm = ?1 \
             AND idp_session_id IS NOT NULL AND kind = 'PARENT' \
             AND status IN ('ACTIVE', 'ORPHANED')",
        )?,
        params![realm],
    )
}

/// Seeds of a sweep: those of `ids` still expired. Looked at again here: a refresh may have
/// moved the expiry since the sweeper read it.
fn expired_seeds(conn: &Connection, realm: &str, ids: &[String], now: i64) -> Result<Vec<String>> {
    strings(
        conn.prepare_cached(
            "SELECT external_id FROM sessions WHERE realm = ?1 AND external_id IN \
             (SELECT value FROM json_each(?2)) AND status = 'ACTIVE' \
             AND expires_at IS NOT NULL AND expires_at <= ?3",
        )?,
        params![realm, json("ids", ids)?, now],
    )
}

/// Seeds of a user's sessions ending: all of their live sessions.
fn user_seeds(conn: &Connection, realm: &str, user_id: &str) -> Result<Vec<String>> {
    strings(
        conn.prepare_cached(
            "SELECT external_id FROM sessions WHERE realm = ?1 AND user_id = ?2 \
             AND status IN ('ACTIVE', 'ORPHANED')",
        )?,
        params![realm, user_id],
    )
}

/// Ends the trees below `seeds` and writes a `logout` event per ended session; refuses a
/// limited destroy over its limit.
fn end_trees(
    conn: &Connection,
    cmd: &DestroyCommand,
    seeds: &[String],
    now: i64,
) -> Result<Vec<Session>> {
    if let Some(limit) = cmd.max_sessions {
        // Counted before the work, the walk stopping one past the limit: an oversized
        // destroy must not hold the writer for its whole tree only to be rolled back.
        let live = count_live_tree(conn, &cmd.realm, seeds, limit.saturating_add(1))?;
        if live > limit {
            return Err(StoreError::CascadeTooLarge {
                target: cmd.target.label(),
                sessions: live,
                limit,
            });
        }
    }
    let mut changed = cascade(conn, cmd, seeds, now)?;
    if let Some(limit) = cmd.max_sessions
        && changed.len() > limit
    {
        // Live sessions below an ended one are not in the count above; the request's
        // savepoint rolls the cascade back.
        return Err(StoreError::CascadeTooLarge {
            target: cmd.target.label(),
            sessions: changed.len(),
            limit,
        });
    }
    changed.sort_by_key(|s| s.seq);
    let occurred_at = millis_to_time(now)?;
    let events = cmd.events(&changed, occurred_at);
    insert_events(conn, &events, now)?;
    Ok(changed)
}

/// Live (ACTIVE or ORPHANED) sessions of the trees below `seeds`, reached through live
/// sessions, counted up to `cap`: the recursion stops there.
fn count_live_tree(conn: &Connection, realm: &str, seeds: &[String], cap: usize) -> Result<usize> {
    let cap = i64::try_from(cap).unwrap_or(i64::MAX);
    let n: i64 = conn
        .prepare_cached(
            "WITH RECURSIVE tree(external_id) AS ( \
                 SELECT s.external_id FROM sessions s \
                 WHERE s.realm = ?1 AND s.external_id IN (SELECT value FROM json_each(?2)) \
                   AND s.status IN ('ACTIVE', 'ORPHANED') \
               UNION SELECT c.external_id FROM tree t CROSS JOIN sessions c \
                 WHERE c.realm = ?1 AND c.parent_id = t.external_id \
                   AND c.status IN ('ACTIVE', 'ORPHANED') \
               UNION SELECT c.external_id FROM tree t CROSS JOIN sessions c \
                 WHERE c.realm = ?1 AND c.delegated_by = t.external_id \
                   AND c.status IN ('ACTIVE', 'ORPHANED') \
               LIMIT ?3 \
             ) SELECT count(*) FROM tree",
        )?
        .query_row(params![realm, json("seeds", seeds)?, cap], |r| r.get(0))?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// One statement over the whole tree below `seeds`: children via `parent_id` get `cascade`
/// (or ORPHANED under the orphan policy), sessions reached through `delegated_by` get
/// `delegation_ended`. Two recursive arms, one per edge, so each uses its index (an OR join
/// cannot); CROSS JOIN keeps `tree` as the outer loop, so each step is an index lookup.
fn cascade(
    conn: &Connection,
    cmd: &DestroyCommand,
    seeds: &[String],
    now: i64,
) -> Result<Vec<Session>> {
    let stmt = conn.prepare_cached(concat!(
        "WITH RECURSIVE tree(external_id, via) AS ( \
             SELECT s.external_id, 0 FROM sessions s \
             WHERE s.realm = ?1 AND s.external_id IN (SELECT value FROM json_each(?2)) \
           UNION SELECT c.external_id, 1 FROM tree t CROSS JOIN sessions c \
             WHERE c.realm = ?1 AND c.parent_id = t.external_id \
           UNION SELECT c.external_id, 2 FROM tree t CROSS JOIN sessions c \
             WHERE c.realm = ?1 AND c.delegated_by = t.external_id \
         ), marked AS ( \
             SELECT external_id AS m_id, MIN(via) AS via FROM tree GROUP BY external_id \
         ), targets AS MATERIALIZED ( \
             SELECT s.id AS t_id, m.via AS via FROM marked m CROSS JOIN sessions s \
             WHERE s.realm = ?1 AND s.external_id = m.m_id \
         ) \
         UPDATE OR FAIL sessions SET \
             status = CASE WHEN targets.via = 1 AND ?3 THEN 'ORPHANED' ELSE 'DESTROYED' END, \
             end_reason = CASE WHEN targets.via = 0 THEN ?4 \
                               WHEN targets.via = 1 AND ?3 THEN NULL \
                               WHEN targets.via = 1 THEN ?6 \
                               ELSE 'delegation_ended' END, \
             updated_at = ?5 \
         FROM targets \
         WHERE sessions.id = targets.t_id \
           AND (sessions.status = 'ACTIVE' \
                OR (sessions.status = 'ORPHANED' AND NOT (targets.via = 1 AND ?3))) \
         RETURNING ",
        session_columns!()
    ))?;
    sessions(
        stmt,
        params![
            cmd.realm,
            json("ids", seeds)?,
            cmd.orphan_children,
            cmd.reason.as_str(),
            now,
            cmd.reason.for_descendants().as_str(),
        ],
    )
}

/// Rows per multi-row outbox insert, largest first: a cascade's events go in a few
/// statements, each prepared once (the sizes are few, so the statement cache keeps them).
const EVENT_ROWS: [usize; 5] = [128, 32, 8, 2, 1];

fn insert_events(conn: &Connection, events: &[SyncEvent], now: i64) -> Result<()> {
    let mut rest = events;
    for rows in EVENT_ROWS {
        while rest.len() >= rows {
            let (chunk, tail) = rest.split_at(rows);
            insert_event_rows(conn, chunk, now)?;
            rest = tail;
        }
    }
    Ok(())
}

fn insert_event_rows(conn: &Connection, chunk: &[SyncEvent], now: i64) -> Result<()> {
    const COLUMNS: usize = 7;
    let values: Vec<String> = (0..chunk.len())
        .map(|i| {
            let n = i * COLUMNS;
            format!(
                "(?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{})",
                n + 1,
                n + 2,
                n + 3,
                n + 4,
                n + 5,
                n + 6,
                n + 7
            )
        })
        .collect();
    let sql = format!(
        "INSERT OR FAIL INTO outbox (event_id, realm, event_type, external_id, origin_system, \
         payload, created_at) VALUES {}",
        values.join(", ")
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    for (i, e) in chunk.iter().enumerate() {
        let n = i * COLUMNS;
        stmt.raw_bind_parameter(n + 1, &e.event_id)?;
        stmt.raw_bind_parameter(n + 2, &e.realm)?;
        stmt.raw_bind_parameter(n + 3, e.event_type.as_str())?;
        stmt.raw_bind_parameter(n + 4, &e.external_id)?;
        stmt.raw_bind_parameter(n + 5, &e.origin_system)?;
        stmt.raw_bind_parameter(n + 6, json("event", e)?)?;
        stmt.raw_bind_parameter(n + 7, now)?;
    }
    stmt.raw_execute()?;
    Ok(())
}

// ---- audit ----------------------------------------------------------------------------

/// Writes one audit record. Part of the caller's transaction.
pub(in crate::store) fn insert_audit(
    conn: &Connection,
    entry: &AuditEntry,
    outcome: AuditOutcome,
    now: i64,
) -> Result<()> {
    let (result, changed) = outcome.columns();
    let detail = entry.detail.as_ref().map(|d| d.to_string());
    conn.prepare_cached(
        "INSERT OR FAIL INTO audit (at_ms, realm, actor, action, target, result, changed, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        now,
        entry.realm,
        entry.actor,
        entry.action.to_string(),
        entry.target,
        result,
        changed,
        detail,
    ])?;
    Ok(())
}

/// Deletes up to `limit` records older than `before_ms`, oldest first; how many.
pub(super) fn purge_audit(conn: &Connection, before_ms: i64, limit: i64) -> Result<u64> {
    let n = conn
        .prepare_cached(
            "DELETE FROM audit WHERE id IN \
             (SELECT id FROM audit WHERE at_ms < ?1 ORDER BY at_ms LIMIT ?2)",
        )?
        .execute(params![before_ms, limit])?;
    Ok(n as u64)
}

// ---- deliveries -----------------------------------------------------------------------

/// Routes not-yet-fanned-out outbox events to connectors (`route` names them) and marks
/// them fanned out. Returns what was routed, or `None` when `gate` refuses.
pub(super) fn fan_out(
    conn: &Connection,
    route: &(dyn Fn(&SyncEvent) -> Vec<String> + Send + Sync),
    gate: &GateFn,
    now: i64,
) -> Result<Option<FanOut>> {
    let rows: Vec<(i64, String)> = conn
        .prepare_cached("SELECT id, payload FROM outbox WHERE fanned_out = 0 ORDER BY id LIMIT ?1")?
        .query_map([FAN_OUT_BATCH], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    if rows.is_empty() {
        return Ok(Some(FanOut::default()));
    }
    // Read after the batch: an upload committed before any of these events is seen.
    if !gate(&upload_versions(conn)?) {
        return Ok(None);
    }
    let mut insert = conn.prepare_cached(
        "INSERT OR FAIL INTO deliveries (outbox_id, event_id, event_type, connector, realm, \
         external_id, status, attempts, next_attempt_at, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?7, ?7) \
         ON CONFLICT (outbox_id, connector) DO NOTHING",
    )?;
    let mut done = FanOut {
        events: rows.len(),
        ..FanOut::default()
    };
    for (id, payload) in &rows {
        let event: SyncEvent =
            serde_json::from_str(payload).map_err(|e| corrupt(&format!("outbox row {id}"), e))?;
        for connector in route(&event) {
            insert.execute(params![
                id,
                event.event_id,
                event.event_type.as_str(),
                connector,
                event.realm,
                event.external_id,
                now,
            ])?;
            done.routed(&connector, &event);
        }
    }
    // Exactly the rows read above: the oldest unrouted ones, and only this thread writes.
    let last = rows.last().map_or(0, |(id, _)| *id);
    conn.prepare_cached(
        "UPDATE OR FAIL outbox SET fanned_out = 1 WHERE fanned_out = 0 AND id <= ?1",
    )?
    .execute([last])?;
    Ok(Some(done))
}

/// Name and version of every upload (no bytes).
fn upload_versions(conn: &Connection) -> Result<Vec<(String, String)>> {
    Ok(conn
        .prepare_cached("SELECT name, version FROM connector_uploads ORDER BY name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?)
}

/// Leases up to the lane's limit of its connector's due deliveries, most overdue first,
/// never one whose session has an earlier pending delivery to the same connector.
pub(super) fn claim(conn: &Connection, lane: &LaneClaim, now: i64) -> Result<Vec<ClaimedDelivery>> {
    let mut lease = conn.prepare_cached(
        "UPDATE OR FAIL deliveries SET lease_until = ?3, updated_at = ?4 WHERE id IN ( \
           SELECT d.id FROM deliveries d INDEXED BY deliveries_lane_idx \
           WHERE d.status = 'pending' AND d.connector = ?2 AND d.next_attempt_at <= ?4 \
             AND (d.lease_until IS NULL OR d.lease_until <= ?4) AND NOT EXISTS ( \
               SELECT 1 FROM deliveries e \
               WHERE e.connector = d.connector AND e.realm = d.realm \
                 AND e.external_id = d.external_id AND e.status = 'pending' \
                 AND e.id < d.id) \
           ORDER BY d.next_attempt_at, d.id LIMIT ?1) \
         RETURNING id, outbox_id, attempts",
    )?;
    let mut payload = conn.prepare_cached("SELECT payload FROM outbox WHERE id = ?1")?;
    let mut out = Vec::new();
    let claimed: Vec<(i64, i64, i32)> = lease
        .query_map(
            params![lane.limit, lane.connector, lane.lease_until, now],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    for (id, outbox_id, attempts) in claimed {
        let text: Option<String> = payload.query_row([outbox_id], |r| r.get(0)).optional()?;
        let text = text.ok_or_else(|| {
            StoreError::Corrupt(format!("delivery {id}: outbox row {outbox_id} missing"))
        })?;
        let event: SyncEvent = serde_json::from_str(&text)
            .map_err(|e| corrupt(&format!("outbox row {outbox_id}"), e))?;
        out.push(ClaimedDelivery {
            id,
            connector: lane.connector.clone(),
            attempts,
            event,
        });
    }
    out.sort_by_key(|c| c.id);
    Ok(out)
}

/// Records finished attempts and their decisions: a failed attempt as a row of its own, the
/// one that delivers on the delivery row.
pub(super) fn record(conn: &Connection, records: &[AttemptRecord]) -> Result<()> {
    let mut update = conn.prepare_cached(
        "UPDATE OR FAIL deliveries SET status = ?2, attempts = ?3, next_attempt_at = ?4, \
         lease_until = NULL, last_error = ?5, connector_version = ?6, updated_at = ?7, \
         delivered_at = COALESCE(?8, delivered_at), \
         delivered_started_at = CASE WHEN ?2 = 'delivered' THEN ?9 ELSE delivered_started_at END \
         WHERE id = ?1",
    )?;
    let mut insert = conn.prepare_cached(
        "INSERT OR FAIL INTO delivery_attempts (delivery_id, attempt, outcome, error, \
         connector_version, started_at, finished_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for r in records {
        let (status, next, delivered_at) = decision_columns(r);
        update.execute(params![
            r.delivery_id,
            status,
            r.attempt,
            next,
            r.error,
            r.version,
            r.finished_at,
            delivered_at,
            r.started_at,
        ])?;
        // The delivering attempt stays on the delivery row.
        if status == "delivered" {
            continue;
        }
        insert.execute(params![
            r.delivery_id,
            r.attempt,
            r.outcome,
            r.error,
            r.version,
            r.started_at,
            r.finished_at,
        ])?;
    }
    Ok(())
}

/// Returns leased deliveries to the pool (a restarted single instance owns them all).
pub(super) fn release_leases(conn: &Connection) -> Result<u64> {
    let n = conn
        .prepare_cached(
            "UPDATE OR FAIL deliveries SET lease_until = NULL \
             WHERE status = 'pending' AND lease_until IS NOT NULL",
        )?
        .execute([])?;
    Ok(n as u64)
}

/// Gives claimed deliveries back without an attempt (their connector is switched off, or the
/// instance is stopping), in the writer's transaction.
pub(super) fn unlease(conn: &Connection, ids: &[i64]) -> Result<()> {
    let mut give_back = conn.prepare_cached(
        "UPDATE OR FAIL deliveries SET lease_until = NULL WHERE id = ?1 AND status = 'pending'",
    )?;
    for id in ids {
        give_back.execute([id])?;
    }
    Ok(())
}

/// Puts dead (and dropped) deliveries back in the queue with fresh attempts.
pub(super) fn replay(conn: &Connection, target: &ReplayTarget, now: i64) -> Result<u64> {
    let (sql, key): (&str, &dyn ToSql) = match target {
        ReplayTarget::Connector(name) => (
            "UPDATE OR FAIL deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?2, \
             lease_until = NULL, updated_at = ?2 \
             WHERE connector = ?1 AND status IN ('dead', 'dropped')",
            name,
        ),
        ReplayTarget::Delivery(id) => (
            "UPDATE OR FAIL deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?2, \
             lease_until = NULL, updated_at = ?2 \
             WHERE id = ?1 AND status IN ('dead', 'dropped')",
            id,
        ),
    };
    let n = conn.prepare_cached(sql)?.execute(params![key, now])?;
    Ok(n as u64)
}

// ---- connectors -----------------------------------------------------------------------

/// Inserts or replaces an upload.
pub(super) fn put_upload(conn: &Connection, row: &UploadRow) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR FAIL INTO connector_uploads (name, manifest, component, version, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET \
         manifest = excluded.manifest, component = excluded.component, \
         version = excluded.version, updated_at = excluded.updated_at",
    )?
    .execute(params![
        row.name,
        row.manifest,
        row.component,
        row.version,
        row.updated_at,
    ])?;
    Ok(())
}

/// Removes an upload and its state; whether there was one.
pub(super) fn delete_upload(conn: &Connection, name: &str) -> Result<bool> {
    let gone = conn
        .prepare_cached("DELETE FROM connector_uploads WHERE name = ?1")?
        .execute([name])?;
    conn.prepare_cached("DELETE FROM connector_states WHERE name = ?1")?
        .execute([name])?;
    Ok(gone > 0)
}

/// Sets a connector's enabled flag.
pub(super) fn set_enabled(conn: &Connection, name: &str, enabled: bool, now: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR FAIL INTO connector_states (name, enabled, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled, \
         updated_at = excluded.updated_at",
    )?
    .execute(params![name, i32::from(enabled), now])?;
    Ok(())
}
