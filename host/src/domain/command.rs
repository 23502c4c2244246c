//! The commands that change sessions (map, destroy, an IdP event), each applied by the store
//! in one transaction with its events and its audit record.

use chrono::{DateTime, Utc};

use super::audit::AuditEntry;
use super::event::{EventType, SyncEvent};
use super::session::{EndReason, NewSession, Session, SessionStatus};

/// A request to register a session, with the system the change came from.
#[derive(Clone, Debug)]
pub struct MapCommand {
    pub session: NewSession,
    /// Connectors with this name do not receive the resulting event.
    pub origin_system: Option<String>,
    /// A PARENT takes `expires_at` (when it has none) and delegation from this session, the
    /// mirror of its IdP session, when that is live.
    pub inherit_from: Option<String>,
    /// Written to the audit log in the same transaction when the session is registered.
    pub audit: Option<AuditEntry>,
}

/// Which sessions a destroy starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestroyTarget {
    /// A root (PARENT or FIXED) and everything below it.
    Parent(String),
    /// A CHILD and its own descendants.
    Child(String),
    /// Every live session of a user, cascading.
    User(String),
    /// Every live PARENT mapped to this IdP session (back-channel logout `sid`), cascading.
    IdpSession(String),
    /// Every live PARENT mapped to any IdP session of the realm (the IdP logged everyone out).
    AllIdpSessions,
    /// These sessions, if they are still ACTIVE and past their `expires_at` (the sweeper).
    Expired(Vec<String>),
}

impl DestroyTarget {
    /// How an error message names the target.
    pub fn label(&self) -> String {
        match self {
            DestroyTarget::Parent(id) | DestroyTarget::Child(id) => id.clone(),
            DestroyTarget::User(id) => format!("user {id}"),
            DestroyTarget::IdpSession(sid) => format!("IdP session {sid}"),
            DestroyTarget::AllIdpSessions => "every IdP session".to_owned(),
            DestroyTarget::Expired(ids) => format!("{} expired sessions", ids.len()),
        }
    }
}

/// What an id stored by a [`ReplayGuard`] identifies; each kind has its own table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayKind {
    /// A back-channel logout token's `jti`.
    LogoutToken,
    /// An event id of the IdP event intake.
    IdpEvent,
}

/// A logout token's id, stored in the destroy's transaction so a replay is refused even
/// after a restart.
#[derive(Clone, Debug)]
pub struct ReplayGuard {
    /// Which table remembers it.
    pub kind: ReplayKind,
    /// `jti` of the logout token, or the event id.
    pub jti: String,
    /// Until when (epoch ms) it is remembered.
    pub until_ms: i64,
}

/// A request to end sessions.
#[derive(Clone, Debug)]
pub struct DestroyCommand {
    /// The realm (tenant) it belongs to.
    pub realm: String,
    /// Where the destroy starts.
    pub target: DestroyTarget,
    /// Reason recorded on the targeted sessions; descendants get
    /// [`EndReason::for_descendants`], delegated sessions `delegation_ended`.
    pub reason: EndReason,
    /// Connectors with this name do not receive the resulting events.
    pub origin_system: Option<String>,
    /// Realm policy: descendants become ORPHANED instead of DESTROYED when the IdP ended the root.
    pub orphan_children: bool,
    /// Refuse the whole destroy if this token id was seen before (back-channel logout).
    pub replay_guard: Option<ReplayGuard>,
    /// Every session that ends is also announced by a `revoke` event, before its `logout`
    /// (global token revocation: the user's grants go too, not only the sessions).
    pub revoke: bool,
    /// Refuse the whole destroy (nothing changes) if it would end more sessions than this.
    /// API destroys carry `[limits] max_cascade`; a logout the IdP ordered is never refused.
    pub max_sessions: Option<usize>,
    /// Written to the audit log in the same transaction (with the number of sessions
    /// changed), also when nothing changed.
    pub audit: Option<AuditEntry>,
}

impl DestroyCommand {
    /// The outbox rows of the sessions this destroy changed (in creation order): a `logout`
    /// for each one that ended, preceded by its `revoke` when [`DestroyCommand::revoke`] is
    /// set; ORPHANED sessions have not ended and get none.
    pub fn events(&self, changed: &[Session], occurred_at: DateTime<Utc>) -> Vec<SyncEvent> {
        let origin = self.origin_system.as_deref();
        let kinds: &[EventType] = if self.revoke {
            &[EventType::Revoke, EventType::Logout]
        } else {
            &[EventType::Logout]
        };
        changed
            .iter()
            .filter(|s| s.status == SessionStatus::Destroyed)
            .flat_map(|s| {
                kinds
                    .iter()
                    .map(move |&kind| SyncEvent::for_session(kind, s, origin, occurred_at))
            })
            .collect()
    }
}

/// What an identity-provider event (Keycloak event intake) does to the realm's sessions.
#[derive(Clone, Debug)]
pub enum IdpChange {
    /// The IdP session is alive (login, code-to-token, refresh, impersonation): its mirror
    /// PARENT is registered if new (`login` event), and every live PARENT mapped to the IdP
    /// session takes its `expires_at` (`refresh` event when it changes) and, when the mirror
    /// is delegated, its delegation.
    Alive {
        /// The mirror session (PARENT, system = the realm's IdP system).
        mirror: Box<NewSession>,
        /// An impersonation by an administrator of another realm (Keycloak's master): the
        /// mirror here of the administrator's session, which the mirror is delegated by, and
        /// that realm, whose events end it (recorded in `idp_delegations`).
        actor: Option<(Box<NewSession>, String)>,
        /// An IdP session the IdP ended in the same request: the administrator's own session
        /// when it impersonates within its realm (Keycloak emits no event for that).
        ended: Option<String>,
    },
    /// The user's grants were revoked: a `revoke` event for each of their live sessions.
    Revoke {
        /// Whose.
        user_id: String,
    },
    /// Sessions end (logout, session deleted, user deleted or disabled, logout-all).
    End {
        /// Where the destroy starts.
        target: DestroyTarget,
        /// Reason on the targeted sessions.
        reason: EndReason,
    },
}

/// An IdP event to apply in one transaction with its replay guard.
#[derive(Clone, Debug)]
pub struct IdpCommand {
    /// The realm (tenant) it belongs to.
    pub realm: String,
    /// The change.
    pub change: IdpChange,
    /// The event id, refused if seen before.
    pub guard: ReplayGuard,
    /// The realm's IdP system (origin of the resulting events).
    pub origin_system: String,
    /// Realm policy for IdP-ended sessions.
    pub orphan_children: bool,
    /// Written to the audit log in the same transaction.
    pub audit: Option<AuditEntry>,
}

/// What applying an IdP event changed.
#[derive(Clone, Debug, Default)]
pub struct IdpOutcome {
    /// Sessions registered (mirrors).
    pub created: Vec<Session>,
    /// Sessions whose lifetime or delegation changed.
    pub updated: Vec<Session>,
    /// Sessions that ended.
    pub ended: Vec<Session>,
    /// Revoke events written.
    pub revoked: usize,
    /// Sessions that ended in other realms, delegated by an administrator's session of this
    /// realm (counted, not listed: their ids belong to those realms).
    pub ended_elsewhere: usize,
}

impl IdpOutcome {
    /// Sessions registered, changed or ended, plus revoke events (the audit record's count).
    pub fn changed(&self) -> usize {
        self.created.len()
            + self.updated.len()
            + self.ended.len()
            + self.revoked
            + self.ended_elsewhere
    }
}
