//! The transactional session operations, written once and instantiated per backend.
//!
//! Both backends accept `$N` placeholders, so the SQL is shared; the few differences
//! (row locks, how a JSON array of ids is expanded, whether concurrent writers exist)
//! are parameters of [`session_ops!`]. Every function runs inside a transaction that the
//! caller owns, so a whole operation commits or rolls back as one.

/// Most outbox rows per INSERT statement (keeps bind counts far below both backends' limits).
pub(crate) const EVENT_CHUNK: usize = 200;
/// Bound on straggler passes after a cascade (each pass is one level of concurrent inserts).
pub(crate) const MAX_CASCADE_PASSES: usize = 32;

/// Generates the transactional writes (`map`, `destroy`, `apply_idp`) for a sqlx backend.
/// PostgreSQL runs them; SQLite's writer thread has its own (`store/sqlite/write.rs`).
///
/// - `for_share` / `for_update`: row-lock suffixes (empty where the backend serialises writers).
/// - `ids`: a subquery that expands the JSON array bound at `$2` into rows of text.
/// - `children`: the recursive step of the cascade CTE over `tree(external_id, via)`, yielding
///   children (`via` 1) and delegated sessions (`via` 2) of the rows found so far.
/// - `recheck`: whether concurrent writers can add children under a tree while it is being
///   destroyed, so the cascade must look again for sessions it could not see.
macro_rules! session_ops {
    (
        db = $db:ty,
        conn = $conn:ty,
        for_share = $for_share:literal,
        for_update = $for_update:literal,
        ids = $ids:literal,
        children = $children:literal,
        recheck = $recheck:literal $(,)?
    ) => {
        use crate::store::ops::{EVENT_CHUNK, MAX_CASCADE_PASSES};
        use crate::store::row::{into_sessions, millis_to_time, session_columns, SessionRow};
        use crate::store::{Result, StoreError};
        use crate::sync::model::{
            AuditOutcome, DestroyCommand, DestroyTarget, EndReason, EventType, MapCommand,
            Session, SessionKind, SessionStatus, SyncEvent,
        };

        /// Inserts a session (and its `login` event). The unique constraint decides conflicts.
        pub(crate) async fn map(conn: &mut $conn, cmd: &MapCommand, now: i64) -> Result<Session> {
            // Copied only when something is inherited (the common PARENT is not).
            let mut new = std::borrow::Cow::Borrowed(&cmd.session);
            if let Some(parent_id) = &cmd.session.parent_id {
                let parent: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(concat!(
                    "SELECT status, idp_session_id, user_id FROM sessions \
                     WHERE realm = $1 AND external_id = $2",
                    $for_share
                ))
                .bind(&new.realm)
                .bind(parent_id)
                .fetch_optional(&mut *conn)
                .await?;
                let Some((status, parent_sid, parent_user)) = parent else {
                    return Err(StoreError::ParentNotFound(parent_id.clone()));
                };
                let status: SessionStatus =
                    status.parse().map_err(|e| StoreError::Corrupt(format!("{e}")))?;
                if status != SessionStatus::Active {
                    return Err(StoreError::ParentNotActive { id: parent_id.clone(), status });
                }
                // A child belongs to its parent's IdP session and user unless told otherwise,
                // so that queries and logout-everywhere find it.
                if new.idp_session_id.is_none() && parent_sid.is_some() {
                    new.to_mut().idp_session_id = parent_sid;
                }
                if new.user_id.is_none() && parent_user.is_some() {
                    new.to_mut().user_id = parent_user;
                }
            }
            if let Some(mirror_id) = cmd.inherit_from.as_deref().filter(|m| *m != new.external_id) {
                // The IdP session's user, lifetime and delegation (impersonation) hold for
                // every PARENT mapped to it.
                let mirror: Option<(Option<String>, Option<i64>, Option<String>)> = sqlx::query_as(
                    "SELECT delegated_by, expires_at, user_id FROM sessions \
                     WHERE realm = $1 AND external_id = $2 AND status = 'ACTIVE'",
                )
                .bind(&new.realm)
                .bind(mirror_id)
                .fetch_optional(&mut *conn)
                .await?;
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
            match insert_session(conn, &new, cmd.origin_system.as_deref(), now).await? {
                Some(session) => {
                    if let Some(entry) = &cmd.audit {
                        insert_audit(conn, entry, AuditOutcome::Ok(1), now).await?;
                    }
                    Ok(session)
                }
                None => Err(StoreError::AlreadyExists(new.external_id.clone())),
            }
        }

        /// Inserts a session and its `login` event; `None` when `(realm, external_id)` is taken.
        async fn insert_session(
            conn: &mut $conn,
            new: &crate::sync::model::NewSession,
            origin_system: Option<&str>,
            now: i64,
        ) -> Result<Option<Session>> {
            let attributes = serde_json::to_string(&new.attributes)
                .map_err(|e| StoreError::Corrupt(format!("attributes: {e}")))?;
            let row: Option<SessionRow> = sqlx::query_as(concat!(
                "INSERT INTO sessions (realm, external_id, kind, parent_id, idp_session_id, \
                 idp_client_session_id, user_id, system, delegated_by, status, end_reason, \
                 attributes, expires_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'ACTIVE', NULL, $10, $11, $12, $12) \
                 ON CONFLICT (realm, external_id) DO NOTHING RETURNING ",
                session_columns!()
            ))
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
            .fetch_optional(&mut *conn)
            .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let session = Session::try_from(row)?;
            let event =
                SyncEvent::for_session(EventType::Login, &session, origin_system, millis_to_time(now)?);
            insert_events(conn, std::slice::from_ref(&event), now).await?;
            Ok(Some(session))
        }

        /// Remembers `guard`'s id for its window; refuses an id seen before.
        async fn check_replay(
            conn: &mut $conn,
            realm: &str,
            guard: &crate::sync::model::ReplayGuard,
            now: i64,
        ) -> Result<()> {
            use crate::sync::model::ReplayKind;
            let (purge, insert) = match guard.kind {
                ReplayKind::LogoutToken => (
                    "DELETE FROM logout_tokens WHERE until_ms < $1",
                    "INSERT INTO logout_tokens (realm, jti, until_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (realm, jti) DO NOTHING",
                ),
                ReplayKind::IdpEvent => (
                    "DELETE FROM idp_events WHERE until_ms < $1",
                    "INSERT INTO idp_events (realm, event_id, until_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (realm, event_id) DO NOTHING",
                ),
            };
            sqlx::query(purge).bind(now).execute(&mut *conn).await?;
            let fresh = sqlx::query(insert)
                .bind(realm)
                .bind(&guard.jti)
                .bind(guard.until_ms)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if fresh == 0 {
                return Err(StoreError::Replayed(guard.jti.clone()));
            }
            Ok(())
        }

        /// Applies an identity-provider event and stores its id (and its audit record), in one
        /// transaction.
        pub(crate) async fn apply_idp(
            conn: &mut $conn,
            cmd: &crate::sync::model::IdpCommand,
            now: i64,
        ) -> Result<crate::sync::model::IdpOutcome> {
            check_replay(conn, &cmd.realm, &cmd.guard, now).await?;
            let out = apply_idp_change(conn, cmd, now).await?;
            if let Some(entry) = &cmd.audit {
                insert_audit(conn, entry, AuditOutcome::Ok(out.changed() as i64), now).await?;
            }
            Ok(out)
        }

        async fn apply_idp_change(
            conn: &mut $conn,
            cmd: &crate::sync::model::IdpCommand,
            now: i64,
        ) -> Result<crate::sync::model::IdpOutcome> {
            use crate::sync::model::{IdpChange, IdpOutcome};
            let origin = Some(cmd.origin_system.as_str());
            let mut out = IdpOutcome::default();
            match &cmd.change {
                IdpChange::Alive { mirror, actor, ended } => {
                    if let Some(sid) = ended {
                        let destroy = DestroyCommand {
                            realm: cmd.realm.clone(),
                            target: DestroyTarget::IdpSession(sid.clone()),
                            reason: EndReason::IdpLogout,
                            origin_system: Some(cmd.origin_system.clone()),
                            orphan_children: cmd.orphan_children,
                            replay_guard: None,
                            max_sessions: None,
                            audit: None,
                        };
                        out.ended = destroy_unguarded(conn, &destroy, now).await?;
                    }
                    if let Some((actor, actor_realm)) = actor {
                        out.created.extend(insert_session(conn, actor, origin, now).await?);
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
                    }
                    let created = insert_session(conn, mirror, origin, now).await?;
                    if let (None, Some(actor)) = (&created, &mirror.delegated_by) {
                        // The mirror was registered by an earlier event: it becomes delegated.
                        let rows: Vec<SessionRow> = sqlx::query_as(concat!(
                            "UPDATE sessions SET delegated_by = $3, updated_at = $4 \
                             WHERE realm = $1 AND external_id = $2 AND status = 'ACTIVE' \
                             AND delegated_by IS NULL RETURNING ",
                            session_columns!()
                        ))
                        .bind(&cmd.realm)
                        .bind(&mirror.external_id)
                        .bind(actor)
                        .bind(now)
                        .fetch_all(&mut *conn)
                        .await?;
                        out.updated.extend(into_sessions(rows)?);
                    }
                    out.created.extend(created);
                    let Some(sid) = mirror.idp_session_id.as_deref() else {
                        return Ok(out);
                    };
                    if let Some(user_id) = &mirror.user_id {
                        // Sessions mapped before the event arrived, without a user.
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
                    }
                    if let Some(expires_at) = mirror.expires_at {
                        let rows: Vec<SessionRow> = sqlx::query_as(concat!(
                            "UPDATE sessions SET expires_at = $3, updated_at = $4 \
                             WHERE realm = $1 AND idp_session_id = $2 AND kind = 'PARENT' \
                             AND status = 'ACTIVE' AND (expires_at IS NULL OR expires_at <> $3) \
                             RETURNING ",
                            session_columns!()
                        ))
                        .bind(&cmd.realm)
                        .bind(sid)
                        .bind(expires_at.timestamp_millis())
                        .bind(now)
                        .fetch_all(&mut *conn)
                        .await?;
                        let mut refreshed = into_sessions(rows)?;
                        refreshed.sort_by_key(|s| s.seq);
                        let occurred_at = millis_to_time(now)?;
                        let events: Vec<SyncEvent> = refreshed
                            .iter()
                            .map(|s| SyncEvent::for_session(EventType::Refresh, s, origin, occurred_at))
                            .collect();
                        insert_events(conn, &events, now).await?;
                        out.updated.extend(refreshed);
                    }
                    if mirror.delegated_by.is_some() {
                        // PARENTs mapped before the impersonation event arrived.
                        let rows: Vec<SessionRow> = sqlx::query_as(concat!(
                            "UPDATE sessions SET delegated_by = $3, updated_at = $4 \
                             WHERE realm = $1 AND idp_session_id = $2 AND kind = 'PARENT' \
                             AND status = 'ACTIVE' AND delegated_by IS NULL AND external_id <> $3 \
                             RETURNING ",
                            session_columns!()
                        ))
                        .bind(&cmd.realm)
                        .bind(sid)
                        .bind(&mirror.external_id)
                        .bind(now)
                        .fetch_all(&mut *conn)
                        .await?;
                        out.updated.extend(into_sessions(rows)?);
                    }
                }
                IdpChange::Revoke { user_id } => {
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
                    insert_events(conn, &events, now).await?;
                    out.revoked = events.len();
                }
                IdpChange::End { target, reason } => {
                    let destroy = DestroyCommand {
                        realm: cmd.realm.clone(),
                        target: target.clone(),
                        reason: *reason,
                        origin_system: Some(cmd.origin_system.clone()),
                        orphan_children: cmd.orphan_children,
                        replay_guard: None,
                        max_sessions: None,
                        audit: None,
                    };
                    out.ended = destroy_unguarded(conn, &destroy, now).await?;
                    if let DestroyTarget::IdpSession(sid) = target {
                        out.ended_elsewhere =
                            end_delegations(conn, cmd, sid, *reason, now).await?;
                    }
                }
            }
            Ok(out)
        }

        /// The IdP session `sid` of `cmd.realm` ended: its mirrors in the realms where it
        /// impersonated someone end too (cascading to the delegated sessions there).
        async fn end_delegations(
            conn: &mut $conn,
            cmd: &crate::sync::model::IdpCommand,
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
                let destroy = DestroyCommand {
                    realm,
                    target: DestroyTarget::IdpSession(sid.to_owned()),
                    reason,
                    origin_system: Some(cmd.origin_system.clone()),
                    orphan_children: cmd.orphan_children,
                    replay_guard: None,
                    max_sessions: None,
                    audit: None,
                };
                ended += destroy_unguarded(conn, &destroy, now).await?.len();
            }
            Ok(ended)
        }

        /// Ends the targeted sessions and everything below them; writes a `logout` event per
        /// ended session. Returns the changed sessions in creation order.
        pub(crate) async fn destroy(
            conn: &mut $conn,
            cmd: &DestroyCommand,
            now: i64,
        ) -> Result<Vec<Session>> {
            if let Some(guard) = &cmd.replay_guard {
                check_replay(conn, &cmd.realm, guard, now).await?;
            }
            let changed = destroy_unguarded(conn, cmd, now).await?;
            if let Some(entry) = &cmd.audit {
                insert_audit(conn, entry, AuditOutcome::Ok(changed.len() as i64), now).await?;
            }
            Ok(changed)
        }

        async fn destroy_unguarded(
            conn: &mut $conn,
            cmd: &DestroyCommand,
            now: i64,
        ) -> Result<Vec<Session>> {
            let seeds: Vec<String> = match &cmd.target {
                DestroyTarget::Parent(id) | DestroyTarget::Child(id) => {
                    let found: Option<(String, String)> = sqlx::query_as(concat!(
                        "SELECT kind, status FROM sessions WHERE realm = $1 AND external_id = $2",
                        $for_update
                    ))
                    .bind(&cmd.realm)
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                    let Some((kind, status)) = found else {
                        return Err(StoreError::NotFound(id.clone()));
                    };
                    let kind: SessionKind =
                        kind.parse().map_err(|e| StoreError::Corrupt(format!("{e}")))?;
                    check_kind(&cmd.target, id, kind)?;
                    if status == SessionStatus::Destroyed.as_str() {
                        return Ok(Vec::new());
                    }
                    vec![id.clone()]
                }
                DestroyTarget::IdpSession(sid) => {
                    sqlx::query_scalar(
                        "SELECT external_id FROM sessions WHERE realm = $1 AND idp_session_id = $2 \
                         AND kind = 'PARENT' AND status IN ('ACTIVE', 'ORPHANED')",
                    )
                    .bind(&cmd.realm)
                    .bind(sid)
                    .fetch_all(&mut *conn)
                    .await?
                }
                DestroyTarget::AllIdpSessions => {
                    sqlx::query_scalar(
                        "SELECT external_id FROM sessions WHERE realm = $1 \
                         AND idp_session_id IS NOT NULL AND kind = 'PARENT' \
                         AND status IN ('ACTIVE', 'ORPHANED')",
                    )
                    .bind(&cmd.realm)
                    .fetch_all(&mut *conn)
                    .await?
                }
                DestroyTarget::Expired(ids) => {
                    let ids = serde_json::to_string(ids)
                        .map_err(|e| StoreError::Corrupt(format!("ids: {e}")))?;
                    // Looked at again here: a refresh may have moved the expiry since the
                    // sweeper read it.
                    sqlx::query_scalar(concat!(
                        "SELECT external_id FROM sessions WHERE realm = $1 AND external_id IN (",
                        $ids,
                        ") AND status = 'ACTIVE' AND expires_at IS NOT NULL AND expires_at <= $3"
                    ))
                    .bind(&cmd.realm)
                    .bind(ids)
                    .bind(now)
                    .fetch_all(&mut *conn)
                    .await?
                }
                DestroyTarget::User(user_id) => {
                    sqlx::query_scalar(
                        "SELECT external_id FROM sessions WHERE realm = $1 AND user_id = $2 \
                         AND status IN ('ACTIVE', 'ORPHANED')",
                    )
                    .bind(&cmd.realm)
                    .bind(user_id)
                    .fetch_all(&mut *conn)
                    .await?
                }
            };
            if seeds.is_empty() {
                return Ok(Vec::new());
            }
            let reasons = (cmd.reason, cmd.reason.for_descendants());
            let mut changed =
                cascade(conn, &cmd.realm, &seeds, 0, reasons, cmd.orphan_children, now).await?;
            if $recheck {
                let mut last: Vec<String> =
                    changed.iter().map(|s| s.external_id.clone()).collect();
                for _ in 0..MAX_CASCADE_PASSES {
                    let stragglers = active_children(conn, &cmd.realm, &last).await?;
                    if stragglers.is_empty() {
                        break;
                    }
                    let more = cascade(
                        conn,
                        &cmd.realm,
                        &stragglers,
                        1,
                        reasons,
                        cmd.orphan_children,
                        now,
                    )
                    .await?;
                    last = more.iter().map(|s| s.external_id.clone()).collect();
                    changed.extend(more);
                }
            }
            if let Some(limit) = cmd.max_sessions
                && changed.len() > limit
            {
                // The caller's savepoint/transaction rolls the cascade back.
                return Err(StoreError::CascadeTooLarge {
                    target: cmd.target.label(),
                    sessions: changed.len(),
                    limit,
                });
            }
            changed.sort_by_key(|s| s.seq);
            let occurred_at = millis_to_time(now)?;
            let events: Vec<SyncEvent> = changed
                .iter()
                .filter(|s| s.status == SessionStatus::Destroyed)
                .map(|s| {
                    SyncEvent::for_session(
                        EventType::Logout,
                        s,
                        cmd.origin_system.as_deref(),
                        occurred_at,
                    )
                })
                .collect();
            insert_events(conn, &events, now).await?;
            Ok(changed)
        }

        /// One statement over the whole tree below `seeds`: children via `parent_id` get
        /// `cascade` (or ORPHANED under the orphan policy), sessions reached through
        /// `delegated_by` get `delegation_ended`. `seed_via` is 0 for the targets themselves.
        async fn cascade(
            conn: &mut $conn,
            realm: &str,
            seeds: &[String],
            seed_via: i32,
            (reason, cascade_reason): (EndReason, EndReason),
            orphan: bool,
            now: i64,
        ) -> Result<Vec<Session>> {
            let ids = serde_json::to_string(seeds)
                .map_err(|e| StoreError::Corrupt(format!("ids: {e}")))?;
            let rows: Vec<SessionRow> = sqlx::query_as(concat!(
                "WITH RECURSIVE tree(external_id, via) AS ( \
                     SELECT s.external_id, CAST($3 AS INTEGER) FROM sessions s \
                     WHERE s.realm = $1 AND s.external_id IN (",
                $ids,
                ") UNION ",
                $children,
                " ), marked AS ( \
                     SELECT external_id AS m_id, MIN(via) AS via FROM tree GROUP BY external_id \
                 ), targets AS MATERIALIZED ( \
                     SELECT s.id AS t_id, m.via AS via FROM marked m CROSS JOIN sessions s \
                     WHERE s.realm = $1 AND s.external_id = m.m_id \
                 ) \
                 UPDATE sessions SET \
                     status = CASE WHEN targets.via = 1 AND $4 THEN 'ORPHANED' ELSE 'DESTROYED' END, \
                     end_reason = CASE WHEN targets.via = 0 THEN $5 \
                                       WHEN targets.via = 1 AND $4 THEN NULL \
                                       WHEN targets.via = 1 THEN $7 \
                                       ELSE 'delegation_ended' END, \
                     updated_at = $6 \
                 FROM targets \
                 WHERE sessions.id = targets.t_id \
                   AND (sessions.status = 'ACTIVE' \
                        OR (sessions.status = 'ORPHANED' AND NOT (targets.via = 1 AND $4))) \
                 RETURNING ",
                session_columns!()
            ))
            .bind(realm)
            .bind(ids)
            .bind(seed_via)
            .bind(orphan)
            .bind(reason.as_str())
            .bind(now)
            .bind(cascade_reason.as_str())
            .fetch_all(&mut *conn)
            .await?;
            into_sessions(rows)
        }

        /// Live sessions directly below any of `ids` (committed after the cascade looked).
        async fn active_children(
            conn: &mut $conn,
            realm: &str,
            ids: &[String],
        ) -> Result<Vec<String>> {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let ids = serde_json::to_string(ids)
                .map_err(|e| StoreError::Corrupt(format!("ids: {e}")))?;
            // Two index lookups rather than one OR, which planners turn into a scan.
            Ok(sqlx::query_scalar(concat!(
                "SELECT external_id FROM sessions WHERE realm = $1 AND status = 'ACTIVE' \
                 AND parent_id IS NOT NULL AND parent_id IN (",
                $ids,
                ") UNION SELECT external_id FROM sessions WHERE realm = $1 AND status = 'ACTIVE' \
                 AND delegated_by IS NOT NULL AND delegated_by IN (",
                $ids,
                ")"
            ))
            .bind(realm)
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?)
        }

        fn check_kind(target: &DestroyTarget, id: &str, kind: SessionKind) -> Result<()> {
            match (target, kind) {
                (DestroyTarget::Parent(_), SessionKind::Parent | SessionKind::Fixed)
                | (DestroyTarget::Child(_), SessionKind::Child) => Ok(()),
                (DestroyTarget::Parent(_), SessionKind::Child) => Err(StoreError::WrongKind(
                    format!("session {id:?} is a CHILD; use destroy-child"),
                )),
                (DestroyTarget::Child(_), other) => Err(StoreError::WrongKind(format!(
                    "session {id:?} is a {other}; use destroy-parent"
                ))),
                (
                    DestroyTarget::User(_)
                    | DestroyTarget::IdpSession(_)
                    | DestroyTarget::AllIdpSessions
                    | DestroyTarget::Expired(_),
                    _,
                ) => Ok(()),
            }
        }

        async fn insert_events(conn: &mut $conn, events: &[SyncEvent], now: i64) -> Result<()> {
            for chunk in events.chunks(EVENT_CHUNK) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO outbox (event_id, realm, event_type, external_id, \
                     origin_system, payload, created_at) ",
                );
                let mut payloads = Vec::with_capacity(chunk.len());
                for e in chunk {
                    payloads.push(
                        serde_json::to_string(e)
                            .map_err(|err| StoreError::Corrupt(format!("event: {err}")))?,
                    );
                }
                qb.push_values(chunk.iter().zip(payloads), |mut b, (e, payload)| {
                    b.push_bind(e.event_id.clone())
                        .push_bind(e.realm.clone())
                        .push_bind(e.event_type.as_str())
                        .push_bind(e.external_id.clone())
                        .push_bind(e.origin_system.clone())
                        .push_bind(payload)
                        .push_bind(now);
                });
                qb.build().execute(&mut *conn).await?;
            }
            Ok(())
        }

    };
}

pub(crate) use session_ops;

/// Generates the session reads (`expired`, `get`, `tree`, `query`) for one backend; both run
/// them through sqlx (SQLite on its read-only pool).
macro_rules! session_reads {
    (db = $db:ty, conn = $conn:ty $(,)?) => {
        use crate::store::row::{into_sessions, session_columns, SessionRow};
        use crate::store::{Page, Result, SessionQuery};
        use crate::sync::model::Session;

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

        pub(crate) async fn tree(
            conn: &mut $conn,
            realm: &str,
            external_id: &str,
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
                   AND external_id IN (SELECT external_id FROM down) ORDER BY id"
            ))
            .bind(realm)
            .bind(&root)
            .fetch_all(&mut *conn)
            .await?;
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
