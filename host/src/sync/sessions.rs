//! The session operations the API offers, with the rules that are not the store's business:
//! input limits, which end reasons a caller may give, and when the realm's
//! `orphan_children` policy applies.

use std::collections::HashMap;
use std::sync::Arc;

use super::idp_events::{self, KeycloakEvent};
use crate::domain::rules::{self, ValidationError};
use crate::domain::{
    AuditAction, AuditEntry, AuditOutcome, DEFAULT_IDP_SYSTEM, DestroyCommand, DestroyTarget,
    EndReason, IdpCommand, IdpOutcome, MapCommand, ReplayGuard, ReplayKind, Session, SessionKind,
};
use crate::store::{Page, SessionQuery, Store, StoreError};

/// Largest page a query may ask for.
pub const MAX_PAGE: u32 = 500;
/// Page size when the caller gives none.
pub const DEFAULT_PAGE: u32 = 50;
/// The audit actor of the expiry sweeper.
pub const EXPIRY_ACTOR: &str = "lockstep:expiry";

/// Per-realm rules.
#[derive(Clone, Debug, Default)]
pub struct RealmPolicy {
    /// When the IdP ends a user session, descendants become ORPHANED instead of DESTROYED.
    pub orphan_children: bool,
    /// The IdP's system label (default `keycloak`): origin of IdP-caused events and owner of
    /// the mirrors of IdP sessions.
    pub idp_system: Option<String>,
    /// The realm receives IdP events, so PARENTs inherit lifetime and delegation from the
    /// mirror of their IdP session.
    pub idp_events: bool,
}

impl RealmPolicy {
    /// The realm's IdP system label.
    pub fn idp_system(&self) -> &str {
        self.idp_system.as_deref().unwrap_or(DEFAULT_IDP_SYSTEM)
    }
}

/// Failures of a session operation.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The input breaks a rule.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A new session was held for the delivery backlog and then refused.
    #[error(transparent)]
    Backlogged(#[from] crate::sync::admission::Backlogged),
}

/// Who orders a global token revocation, and how it is recorded.
#[derive(Clone, Debug)]
pub struct Revoker {
    /// The audit actor (`key:<id>`, `idp:<system>`...).
    pub actor: String,
    /// `originSystem` of the events (its connector does not hear them); `None`: all do.
    pub origin_system: Option<String>,
    /// The caller's token id, stored with the revocation (a replay changes nothing).
    pub guard: Option<ReplayGuard>,
    /// Whether `[limits] max_cascade` applies (API callers); an IdP's order is never limited.
    pub limited: bool,
    /// The audit record's detail (subject format, token id).
    pub detail: serde_json::Value,
}

/// What a verified Shared Signals event orders (see [`SessionService::apply_signal`]).
#[derive(Clone, Debug)]
pub struct SignalOrder {
    /// The event's short name (`session-revoked`...), for the audit action.
    pub event: String,
    /// Every PARENT of an IdP session, or every session of a user.
    pub target: DestroyTarget,
    /// `idp_logout`, `revoked` or `admin`.
    pub reason: EndReason,
    /// Whether connectors hear `revoke` events too (credentials changed).
    pub revoke: bool,
    /// The transmitter's system label: `originSystem` of the events, audit actor `idp:<it>`.
    pub origin_system: String,
    /// The SET's `jti`, namespaced by transmitter.
    pub guard: ReplayGuard,
}

/// A session in a tree, with its distance from the root.
#[derive(Clone, Debug, PartialEq)]
pub struct TreeEntry {
    /// 0 for the root.
    pub depth: u32,
    /// The session.
    pub session: Session,
}

/// Orders a flat tree (root first, as the store returns it) depth-first, each node
/// followed by its descendants, siblings in creation order. Flat rather than nested so that
/// neither building, serialising nor dropping a deep chain can exhaust the stack.
pub fn tree_order(mut flat: Vec<Session>) -> Vec<TreeEntry> {
    if flat.is_empty() {
        return Vec::new();
    }
    let root = flat.remove(0);
    let mut by_parent: HashMap<String, Vec<Session>> = HashMap::new();
    for s in flat {
        if let Some(p) = s.parent_id.clone() {
            by_parent.entry(p).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![(0u32, root)];
    while let Some((depth, node)) = stack.pop() {
        if let Some(mut kids) = by_parent.remove(&node.external_id) {
            kids.reverse();
            stack.extend(kids.into_iter().map(|k| (depth + 1, k)));
        }
        out.push(TreeEntry {
            depth,
            session: node,
        });
    }
    out
}

/// Session operations over a store.
#[derive(Clone)]
pub struct SessionService {
    store: Store,
    policies: Arc<HashMap<String, RealmPolicy>>,
    max_cascade: Option<usize>,
    max_tree: Option<usize>,
    admission: Option<Arc<crate::sync::admission::Admission>>,
}

impl SessionService {
    /// A service over `store` with per-realm `policies` (realms not listed use defaults).
    pub fn new(store: Store, policies: HashMap<String, RealmPolicy>) -> Self {
        SessionService {
            store,
            policies: Arc::new(policies),
            max_cascade: None,
            max_tree: None,
            admission: None,
        }
    }

    /// Holds new sessions while deliveries trail the API by more than the admission budget
    /// (destroys are never held).
    pub fn with_admission(mut self, admission: Arc<crate::sync::admission::Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Refuses API destroys that would end more than `limit` sessions (`None`: no limit).
    /// Logouts the IdP orders and the expiry sweeper are never limited.
    pub fn with_max_cascade(mut self, limit: Option<usize>) -> Self {
        self.max_cascade = limit;
        self
    }

    /// Refuses to read a tree of more than `limit` sessions (`None`: no limit).
    pub fn with_max_tree(mut self, limit: Option<usize>) -> Self {
        self.max_tree = limit;
        self
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn policy(&self, realm: &str) -> RealmPolicy {
        self.policies.get(realm).cloned().unwrap_or_default()
    }

    /// Passes `result` on; a domain refusal is first recorded in the audit log. The refused
    /// operation's transaction was rolled back (with the record it carried), so this is a
    /// separate write: refusals are recorded best-effort (a failure is logged, the caller
    /// still gets the refusal), successes transactionally.
    async fn audited<T>(
        &self,
        entry: Option<AuditEntry>,
        result: Result<T, StoreError>,
    ) -> Result<T, SessionError> {
        if let (Err(e), Some(entry)) = (&result, entry)
            && let Some(code) = e.refusal_code()
        {
            let action = entry.action.to_string();
            if let Err(w) = self
                .store
                .record_audit(entry, AuditOutcome::Refused(code))
                .await
            {
                tracing::warn!(error = %w, %action, code = code.as_str(), "audit record of a refusal not written");
            }
        }
        Ok(result?)
    }

    /// Validates and registers a session.
    pub async fn map(&self, cmd: MapCommand) -> Result<Session, SessionError> {
        let s = &cmd.session;
        rules::realm(&s.realm)?;
        rules::id("externalId", &s.external_id)?;
        rules::optional_id("parentExternalId", s.parent_id.as_deref())?;
        rules::optional_id("keycloakSessionId", s.idp_session_id.as_deref())?;
        rules::optional_id(
            "keycloakClientSessionId",
            s.idp_client_session_id.as_deref(),
        )?;
        rules::optional_id("userId", s.user_id.as_deref())?;
        rules::optional_id("system", s.system.as_deref())?;
        rules::optional_id("delegatedBy", s.delegated_by.as_deref())?;
        rules::optional_id("originSystem", cmd.origin_system.as_deref())?;
        rules::attributes(&s.attributes)?;
        match s.kind {
            SessionKind::Parent if s.idp_session_id.is_none() => {
                return Err(ValidationError("a PARENT needs keycloakSessionId".into()).into());
            }
            SessionKind::Child if s.parent_id.is_none() => {
                return Err(ValidationError("a CHILD needs parentExternalId".into()).into());
            }
            SessionKind::Child if s.parent_id.as_deref() == Some(s.external_id.as_str()) => {
                return Err(ValidationError("a session cannot be its own parent".into()).into());
            }
            _ => {}
        }
        let mut cmd = cmd;
        let policy = self.policy(&cmd.session.realm);
        if policy.idp_events
            && cmd.session.kind == SessionKind::Parent
            && let Some(sid) = &cmd.session.idp_session_id
        {
            cmd.inherit_from = Some(idp_events::mirror_id(policy.idp_system(), sid));
        }
        // After validation, so bad input is answered at once whatever the backlog.
        if let Some(admission) = &self.admission {
            admission.admit().await?;
        }
        let audit = cmd.audit.clone();
        let result = self.store.map(cmd).await;
        self.audited(audit, result).await
    }

    /// Applies a Keycloak event (already authenticated) and remembers its id until
    /// `remember_until_ms`; a second delivery of the same id is `StoreError::Replayed`.
    pub async fn apply_idp_event(
        &self,
        realm: &str,
        event: &KeycloakEvent,
        remember_until_ms: i64,
    ) -> Result<IdpOutcome, SessionError> {
        rules::realm(realm)?;
        let policy = self.policy(realm);
        let change = idp_events::change_for(realm, policy.idp_system(), event)?;
        let mut audit = AuditEntry::new(
            format!("idp:{}", policy.idp_system()),
            AuditAction::IdpEvent(event.event_type.clone()),
            Some(realm),
        )
        .detail(serde_json::json!({ "eventId": event.id }));
        audit.target = event.session_id.clone().or_else(|| event.user_id.clone());
        let result = self
            .store
            .apply_idp(IdpCommand {
                realm: realm.to_owned(),
                change,
                guard: ReplayGuard {
                    kind: ReplayKind::IdpEvent,
                    jti: event.id.clone(),
                    until_ms: remember_until_ms,
                },
                origin_system: policy.idp_system().to_owned(),
                orphan_children: policy.orphan_children,
                audit: Some(audit.clone()),
            })
            .await;
        self.audited(Some(audit), result).await
    }

    /// Ends up to `limit` sessions whose lifetime ran out (reason `expired`, descendants too,
    /// or ORPHANED under the realm's policy). Returns how many sessions changed and whether
    /// the batch was full (more may be due).
    pub async fn end_expired(&self, limit: i64) -> Result<(usize, bool), SessionError> {
        let now = chrono::Utc::now().timestamp_millis();
        let due = self.store.expired(now, limit).await?;
        let full = due.len() as i64 >= limit;
        let mut by_realm: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (realm, id) in due {
            by_realm.entry(realm).or_default().push(id);
        }
        let mut changed = 0;
        for (realm, ids) in by_realm {
            let policy = self.policy(&realm);
            // One record per realm and batch: the sessions themselves say `expired`.
            let audit = AuditEntry::new(EXPIRY_ACTOR, AuditAction::Expire, Some(&realm))
                .detail(serde_json::json!({ "due": ids.len() }));
            changed += self
                .store
                .destroy(DestroyCommand {
                    realm,
                    target: DestroyTarget::Expired(ids),
                    reason: EndReason::Expired,
                    // Lockstep decided it: every subscribed connector hears of it.
                    origin_system: None,
                    orphan_children: policy.orphan_children,
                    replay_guard: None,
                    revoke: false,
                    max_sessions: None,
                    audit: Some(audit),
                })
                .await?
                .len();
        }
        Ok((changed, full))
    }

    /// Ends sessions. `reason` must be one a caller may give (not `cascade` or
    /// `delegation_ended`, which only the cascade assigns, nor `reconciled`).
    pub async fn destroy(
        &self,
        realm: &str,
        target: DestroyTarget,
        reason: Option<EndReason>,
        origin_system: Option<String>,
        audit: Option<AuditEntry>,
    ) -> Result<Vec<Session>, SessionError> {
        rules::realm(realm)?;
        match &target {
            DestroyTarget::Parent(id) | DestroyTarget::Child(id) => rules::id("externalId", id)?,
            DestroyTarget::User(id) => rules::id("userId", id)?,
            DestroyTarget::IdpSession(id) => rules::id("sid", id)?,
            DestroyTarget::AllIdpSessions | DestroyTarget::Expired(_) => {
                return Err(ValidationError("not a destroy a caller can ask for".into()).into());
            }
        }
        rules::optional_id("originSystem", origin_system.as_deref())?;
        let reason = reason.unwrap_or(EndReason::Logout);
        if !reason.caller_may_give() {
            return Err(ValidationError(format!(
                "reason {reason} is assigned by Lockstep; use logout, admin, idp_logout, expired or revoked"
            ))
            .into());
        }
        // The orphan policy applies only when the IdP ended the session.
        let orphan_children = reason == EndReason::IdpLogout && self.policy(realm).orphan_children;
        let audit = audit.map(|a| a.detail(serde_json::json!({ "reason": reason.as_str() })));
        let result = self
            .store
            .destroy(DestroyCommand {
                realm: realm.to_owned(),
                target,
                reason,
                origin_system,
                orphan_children,
                replay_guard: None,
                revoke: false,
                max_sessions: self.max_cascade,
                audit: audit.clone(),
            })
            .await;
        self.audited(audit, result).await
    }

    /// Ends what the IdP ended (back-channel logout): every PARENT of the IdP session `sid`,
    /// or every session of the user `sub`, with reason `idp_logout` and the realm's orphan
    /// policy, storing the token's `jti` in the same transaction (a replay changes nothing).
    pub async fn idp_logout(
        &self,
        realm: &str,
        target: DestroyTarget,
        guard: ReplayGuard,
        origin_system: &str,
    ) -> Result<Vec<Session>, SessionError> {
        rules::realm(realm)?;
        match &target {
            DestroyTarget::IdpSession(id) => rules::id("sid", id)?,
            DestroyTarget::User(id) => rules::id("sub", id)?,
            DestroyTarget::Parent(_)
            | DestroyTarget::Child(_)
            | DestroyTarget::AllIdpSessions
            | DestroyTarget::Expired(_) => {
                return Err(ValidationError("an IdP logout names a sid or a sub".into()).into());
            }
        }
        let target_id = match &target {
            DestroyTarget::IdpSession(id) | DestroyTarget::User(id) => Some(id.clone()),
            _ => None,
        };
        let mut audit = AuditEntry::new(
            format!("idp:{origin_system}"),
            AuditAction::BackchannelLogout,
            Some(realm),
        )
        .detail(serde_json::json!({
            "jti": guard.jti,
            "by": if matches!(target, DestroyTarget::User(_)) { "sub" } else { "sid" },
        }));
        audit.target = target_id;
        let result = self
            .store
            .destroy(DestroyCommand {
                realm: realm.to_owned(),
                target,
                reason: EndReason::IdpLogout,
                origin_system: Some(origin_system.to_owned()),
                orphan_children: self.policy(realm).orphan_children,
                replay_guard: Some(guard),
                revoke: false,
                max_sessions: None,
                audit: Some(audit.clone()),
            })
            .await;
        self.audited(Some(audit), result).await
    }

    /// Global token revocation: ends every live session of `user_id` in `realm` (cascading;
    /// reason `revoked`) and announces each ended session by a `revoke` and a `logout`
    /// event, with `by`'s replay guard and audit record in the same transaction. A user
    /// of whom the realm never had a session is `StoreError::NotFound` (audited as a
    /// refusal), so the caller learns that the revocation reached nobody.
    pub async fn revoke_user(
        &self,
        realm: &str,
        user_id: &str,
        by: Revoker,
    ) -> Result<Vec<Session>, SessionError> {
        rules::realm(realm)?;
        rules::id("userId", user_id)?;
        rules::optional_id("originSystem", by.origin_system.as_deref())?;
        let audit = AuditEntry::new(by.actor, AuditAction::GlobalTokenRevocation, Some(realm))
            .target(user_id)
            .detail(by.detail);
        let known = SessionQuery {
            user_id: Some(user_id.to_owned()),
            limit: 1,
            ..SessionQuery::default()
        };
        if self.store.query(realm, &known).await?.items.is_empty() {
            let refused = Err(StoreError::NotFound(format!("user {user_id}")));
            return self.audited(Some(audit), refused).await;
        }
        let result = self
            .store
            .destroy(DestroyCommand {
                realm: realm.to_owned(),
                target: DestroyTarget::User(user_id.to_owned()),
                reason: EndReason::Revoked,
                origin_system: by.origin_system,
                // The orphan policy is for what the IdP ended; a revocation ends everything.
                orphan_children: false,
                replay_guard: by.guard,
                revoke: true,
                max_sessions: if by.limited { self.max_cascade } else { None },
                audit: Some(audit.clone()),
            })
            .await;
        self.audited(Some(audit), result).await
    }

    /// Applies what a Shared Signals transmitter said (a verified SET): ends `order.target`
    /// with `order.reason`, cascading (the realm's orphan policy applies to `idp_logout`),
    /// `revoke` events too when asked, with the SET's `jti` stored in the same transaction
    /// (a redelivery is `StoreError::Replayed` and changes nothing) and its audit record.
    pub async fn apply_signal(
        &self,
        realm: &str,
        order: SignalOrder,
    ) -> Result<Vec<Session>, SessionError> {
        rules::realm(realm)?;
        match &order.target {
            DestroyTarget::IdpSession(id) => rules::id("sid", id)?,
            DestroyTarget::User(id) => rules::id("userId", id)?,
            _ => {
                return Err(ValidationError("a signal names a session or a user".into()).into());
            }
        }
        rules::id("originSystem", &order.origin_system)?;
        let orphan_children =
            order.reason == EndReason::IdpLogout && self.policy(realm).orphan_children;
        let audit = AuditEntry::new(
            format!("idp:{}", order.origin_system),
            AuditAction::SharedSignal(order.event.clone()),
            Some(realm),
        )
        .detail(serde_json::json!({
            "jti": order.guard.jti,
            "reason": order.reason.as_str(),
        }));
        let audit = match &order.target {
            DestroyTarget::IdpSession(id) | DestroyTarget::User(id) => audit.target(id.as_str()),
            _ => audit,
        };
        let result = self
            .store
            .destroy(DestroyCommand {
                realm: realm.to_owned(),
                target: order.target,
                reason: order.reason,
                origin_system: Some(order.origin_system),
                orphan_children,
                replay_guard: Some(order.guard),
                revoke: order.revoke,
                // A transmitter's order, like an IdP's logout, is never cut short.
                max_sessions: None,
                audit: Some(audit.clone()),
            })
            .await;
        self.audited(Some(audit), result).await
    }

    /// The realm's IdP system label (origin of IdP-caused events, owner of the mirrors).
    pub fn idp_system(&self, realm: &str) -> String {
        self.policy(realm).idp_system().to_owned()
    }

    /// Ends what is mapped to the IdP session `sid`, which the reconciler found gone from the
    /// IdP (`parents`: how many PARENTs it saw, for the audit record): every live PARENT of
    /// the sid with reason `reconciled`, cascading under the realm's orphan policy like any
    /// IdP logout, with the events' `originSystem` = the IdP system so its connector is not
    /// asked to end what the IdP already ended.
    pub async fn end_reconciled(
        &self,
        realm: &str,
        sid: &str,
        parents: usize,
    ) -> Result<Vec<Session>, SessionError> {
        rules::realm(realm)?;
        rules::id("sid", sid)?;
        let policy = self.policy(realm);
        let audit = AuditEntry::new(
            super::reconcile::RECONCILE_ACTOR,
            AuditAction::Reconcile,
            Some(realm),
        )
        .target(sid)
        .detail(
            serde_json::json!({ "reason": EndReason::Reconciled.as_str(), "parents": parents }),
        );
        let result = self
            .store
            .destroy(DestroyCommand {
                realm: realm.to_owned(),
                target: DestroyTarget::IdpSession(sid.to_owned()),
                reason: EndReason::Reconciled,
                origin_system: Some(policy.idp_system().to_owned()),
                orphan_children: policy.orphan_children,
                replay_guard: None,
                revoke: false,
                // What the IdP ended is never refused for its size.
                max_sessions: None,
                audit: Some(audit.clone()),
            })
            .await;
        self.audited(Some(audit), result).await
    }

    /// One session.
    pub async fn get(
        &self,
        realm: &str,
        external_id: &str,
    ) -> Result<Option<Session>, SessionError> {
        rules::realm(realm)?;
        rules::id("externalId", external_id)?;
        Ok(self.store.get(realm, external_id).await?)
    }

    /// The tree containing a session (refused beyond `with_max_tree`).
    pub async fn tree(
        &self,
        realm: &str,
        external_id: &str,
    ) -> Result<Option<Vec<TreeEntry>>, SessionError> {
        rules::realm(realm)?;
        rules::id("externalId", external_id)?;
        Ok(self
            .store
            .tree(realm, external_id, self.max_tree)
            .await?
            .map(tree_order))
    }

    /// Filtered listing; `limit` defaults to 50 and may not exceed 500.
    pub async fn query(&self, realm: &str, mut q: SessionQuery) -> Result<Page, SessionError> {
        rules::realm(realm)?;
        for (field, v) in [
            ("keycloakSessionId", &q.idp_session_id),
            ("keycloakClientSessionId", &q.idp_client_session_id),
            ("userId", &q.user_id),
            ("system", &q.system),
        ] {
            rules::optional_id(field, v.as_deref())?;
        }
        if q.limit == 0 {
            q.limit = DEFAULT_PAGE;
        }
        if q.limit > MAX_PAGE {
            return Err(ValidationError(format!("limit must be 1-{MAX_PAGE}")).into());
        }
        Ok(self.store.query(realm, &q).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SessionStatus;

    fn session(id: &str, parent: Option<&str>, seq: i64) -> Session {
        let now = chrono::Utc::now();
        Session {
            seq,
            realm: "acme".into(),
            external_id: id.into(),
            kind: if parent.is_some() {
                SessionKind::Child
            } else {
                SessionKind::Parent
            },
            parent_id: parent.map(Into::into),
            idp_session_id: None,
            idp_client_session_id: None,
            user_id: None,
            system: None,
            delegated_by: None,
            status: SessionStatus::Active,
            end_reason: None,
            attributes: Default::default(),
            expires_at: None,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn tree_order_is_depth_first_with_siblings_in_creation_order() {
        let order: Vec<(u32, String)> = tree_order(vec![
            session("root", None, 1),
            session("a", Some("root"), 2),
            session("b", Some("root"), 3),
            session("a1", Some("a"), 4),
        ])
        .into_iter()
        .map(|e| (e.depth, e.session.external_id))
        .collect();
        assert_eq!(
            order,
            vec![
                (0, "root".into()),
                (1, "a".into()),
                (2, "a1".into()),
                (1, "b".into())
            ]
        );
    }

    #[test]
    fn deep_chains_are_ordered_without_recursion() {
        let mut flat = vec![session("n0", None, 0)];
        for i in 1..50_000 {
            flat.push(session(&format!("n{i}"), Some(&format!("n{}", i - 1)), i));
        }
        let order = tree_order(flat);
        assert_eq!(order.len(), 50_000);
        assert_eq!(order.last().map(|e| e.depth), Some(49_999));
    }
}
