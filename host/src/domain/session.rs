//! Domain types shared by every layer: sessions, their kinds and states, and sync events.
//! Conversions to wire formats (JSON DTOs, SQL rows) live at the edges, not here.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Free-form string metadata attached to a session.
pub type Attributes = BTreeMap<String, String>;

/// The system label of the sessions the identity provider owns, when the realm names none.
pub const DEFAULT_IDP_SYSTEM: &str = "keycloak";

/// Declares a closed string enum with a canonical spelling, used in SQL, JSON and logs alike.
///
/// The spelling is taken as a `tt`, not a `literal`: a `literal` fragment reaches derive macros
/// wrapped in an invisible group, which serde unwraps but utoipa's `ToSchema` does not — the
/// OpenAPI document then listed the Rust names (`Active`) instead of the wire names (`ACTIVE`).
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:tt),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical spelling (SQL, JSON, logs).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue { kind: stringify!($name), value: other.to_owned() }),
                }
            }
        }
    };
}

/// A string that is not one of an enum's spellings (a corrupt row or bad input).
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} value {value:?}")]
pub struct UnknownValue {
    /// The enum that was being parsed.
    pub kind: &'static str,
    /// The offending text.
    pub value: String,
}

string_enum! {
    /// How a session hangs in the tree.
    SessionKind {
        /// Mapped to an IdP user session; the usual root of a tree.
        Parent => "PARENT",
        /// Linked to a parent session in the same realm.
        Child => "CHILD",
        /// Standalone; may still have children.
        Fixed => "FIXED",
    }
}

string_enum! {
    /// Lifecycle state of a session.
    SessionStatus {
        /// Live.
        Active => "ACTIVE",
        /// Ended; `end_reason` says why.
        Destroyed => "DESTROYED",
        /// Its parent ended under the `orphan_children` policy; its owner must destroy it.
        Orphaned => "ORPHANED",
    }
}

string_enum! {
    /// Why a session ended.
    EndReason {
        /// The owning system logged it out.
        Logout => "logout",
        /// An administrator ended it.
        Admin => "admin",
        /// The identity provider ended the user session.
        IdpLogout => "idp_logout",
        /// Its lifetime ran out.
        Expired => "expired",
        /// An ancestor ended.
        Cascade => "cascade",
        /// The session it was delegated by ended.
        DelegationEnded => "delegation_ended",
        /// Its grant was revoked.
        Revoked => "revoked",
        /// The reconciler found its IdP session gone (an event or logout that never arrived).
        Reconciled => "reconciled",
    }
}

impl EndReason {
    /// What the sessions below an ended one get: `expired` when a lifetime ran out (the
    /// whole tree outlived its IdP session), otherwise `cascade`.
    pub fn for_descendants(self) -> EndReason {
        match self {
            EndReason::Expired => EndReason::Expired,
            _ => EndReason::Cascade,
        }
    }

    /// Whether a caller may name this reason in a destroy: `cascade` and `delegation_ended`
    /// are assigned by the cascade only, `reconciled` by the reconciler only (it claims that
    /// Keycloak no longer has the session, which a caller cannot vouch for).
    pub fn caller_may_give(self) -> bool {
        !matches!(
            self,
            EndReason::Cascade | EndReason::DelegationEnded | EndReason::Reconciled
        )
    }
}

string_enum! {
    /// Kinds of sync events written to the outbox.
    EventType {
        /// A session began.
        Login => "login",
        /// A session ended.
        Logout => "logout",
        /// A user's grants were revoked.
        Revoke => "revoke",
        /// A session's lifetime was extended.
        Refresh => "refresh",
    }
}

/// A stored session record: one row of `sessions`.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// Store-assigned, monotonically increasing; the pagination key.
    pub seq: i64,
    /// Tenant.
    pub realm: String,
    /// Id given by the owning system; unique within the realm.
    pub external_id: String,
    /// PARENT, CHILD or FIXED.
    pub kind: SessionKind,
    /// CHILD only: the parent's external id.
    pub parent_id: Option<String>,
    /// IdP user-session id.
    pub idp_session_id: Option<String>,
    /// IdP client-session id.
    pub idp_client_session_id: Option<String>,
    /// Subject.
    pub user_id: Option<String>,
    /// Owning system.
    pub system: Option<String>,
    /// External id of the actor's session when this one was delegated.
    pub delegated_by: Option<String>,
    /// Lifecycle state.
    pub status: SessionStatus,
    /// Why it ended.
    pub end_reason: Option<EndReason>,
    /// Metadata.
    pub attributes: Attributes,
    /// When it expires, if known.
    pub expires_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A session to register (already validated by the caller).
#[derive(Clone, Debug)]
pub struct NewSession {
    /// Tenant.
    pub realm: String,
    /// Id given by the owning system.
    pub external_id: String,
    /// Kind to register.
    pub kind: SessionKind,
    /// CHILD only.
    pub parent_id: Option<String>,
    /// Required for PARENT; a CHILD inherits its parent's when absent.
    pub idp_session_id: Option<String>,
    /// Optional client-session id.
    pub idp_client_session_id: Option<String>,
    /// A CHILD inherits its parent's when absent.
    pub user_id: Option<String>,
    /// Owning system.
    pub system: Option<String>,
    /// Delegating session, if any.
    pub delegated_by: Option<String>,
    /// Metadata.
    pub attributes: Attributes,
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A request to register a session, with the system the change came from.
#[derive(Clone, Debug)]
pub struct MapCommand {
    /// The session.
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
    /// Tenant.
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
    /// Refuse the whole destroy (nothing changes) if it would end more sessions than this.
    /// API destroys carry `[limits] max_cascade`; a logout the IdP ordered is never refused.
    pub max_sessions: Option<usize>,
    /// Written to the audit log in the same transaction (with the number of sessions
    /// changed), also when nothing changed.
    pub audit: Option<AuditEntry>,
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
    /// Tenant.
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

/// What an audit record says was done. Spelled in kebab case in the log; IdP events carry
/// their Keycloak type (`idp-event:LOGOUT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditAction {
    /// `map-parent`.
    MapParent,
    /// `map-child`.
    MapChild,
    /// `map-fixed`.
    MapFixed,
    /// `destroy-parent`.
    DestroyParent,
    /// `destroy-child`.
    DestroyChild,
    /// `destroy-user`.
    DestroyUser,
    /// `backchannel-logout`: the IdP ended a session (OIDC Back-Channel Logout).
    BackchannelLogout,
    /// `idp-event:<TYPE>`: a Keycloak event from the event intake.
    IdpEvent(String),
    /// `expire`: the sweeper ended sessions whose lifetime ran out.
    Expire,
    /// `reconcile`: the reconciler ended what was mapped to an IdP session the IdP no longer has.
    Reconcile,
    /// `connector-put`: an upload through the admin API.
    ConnectorPut,
    /// `connector-delete`.
    ConnectorDelete,
    /// `connector-enable`.
    ConnectorEnable,
    /// `connector-disable`.
    ConnectorDisable,
    /// `delivery-replay`: dead letters queued again.
    DeliveryReplay,
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuditAction::MapParent => "map-parent",
            AuditAction::MapChild => "map-child",
            AuditAction::MapFixed => "map-fixed",
            AuditAction::DestroyParent => "destroy-parent",
            AuditAction::DestroyChild => "destroy-child",
            AuditAction::DestroyUser => "destroy-user",
            AuditAction::BackchannelLogout => "backchannel-logout",
            AuditAction::IdpEvent(kind) => return write!(f, "idp-event:{kind}"),
            AuditAction::Expire => "expire",
            AuditAction::Reconcile => "reconcile",
            AuditAction::ConnectorPut => "connector-put",
            AuditAction::ConnectorDelete => "connector-delete",
            AuditAction::ConnectorEnable => "connector-enable",
            AuditAction::ConnectorDisable => "connector-disable",
            AuditAction::DeliveryReplay => "delivery-replay",
        })
    }
}

/// Who did what, where and to what: an audit record before the store adds its result and
/// time. Carried by the command it describes, so the store writes it in that command's
/// transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    /// `admin`, `key:<id>`, `token:<sub>@<realm>`, `idp:<system>`, `lockstep:expiry` or
    /// `lockstep:reconciler`.
    pub actor: String,
    /// What was done.
    pub action: AuditAction,
    /// The realm acted in; `None` for actions that span realms (connectors, deliveries).
    pub realm: Option<String>,
    /// External id, user id, IdP session id, connector name or delivery id.
    pub target: Option<String>,
    /// A small JSON object with whatever else identifies the action (event id, reason).
    pub detail: Option<serde_json::Value>,
}

impl AuditEntry {
    /// An entry without target or detail.
    pub fn new(actor: impl Into<String>, action: AuditAction, realm: Option<&str>) -> Self {
        AuditEntry {
            actor: actor.into(),
            action,
            realm: realm.map(str::to_owned),
            target: None,
            detail: None,
        }
    }

    /// With this target.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// With this detail.
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }
}

/// How an audited action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditOutcome {
    /// Done; this many sessions (deliveries, connectors) changed.
    Ok(i64),
    /// Refused with this problem code (ALREADY_EXISTS, NOT_FOUND...).
    Refused(&'static str),
}

impl AuditOutcome {
    /// The stored `result` and `changed` columns: `ok` with the count, or the refusal's code
    /// without one.
    pub fn columns(self) -> (&'static str, Option<i64>) {
        match self {
            AuditOutcome::Ok(n) => ("ok", Some(n)),
            AuditOutcome::Refused(code) => (code, None),
        }
    }
}

/// A sync event as written to the outbox and later handed to connectors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyncEvent {
    /// Stable id for de-duplication by connectors.
    pub event_id: String,
    /// login, logout, revoke, refresh.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Tenant.
    pub realm: String,
    /// The session concerned.
    pub external_id: String,
    /// Its kind.
    pub kind: SessionKind,
    /// IdP user-session id.
    pub idp_session_id: Option<String>,
    /// IdP client-session id.
    pub idp_client_session_id: Option<String>,
    /// Subject.
    pub user_id: Option<String>,
    /// Owning system.
    pub system: Option<String>,
    /// Where the change came from.
    pub origin_system: Option<String>,
    /// Why the session ended (logout events).
    pub end_reason: Option<EndReason>,
    /// Session metadata.
    pub attributes: Attributes,
    /// When the session expires, if known (refresh events carry the new value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When the change happened.
    pub occurred_at: DateTime<Utc>,
}

impl SyncEvent {
    /// The event describing `session` after a change of type `event_type`.
    pub fn for_session(
        event_type: EventType,
        session: &Session,
        origin_system: Option<&str>,
        occurred_at: DateTime<Utc>,
    ) -> Self {
        SyncEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            event_type,
            realm: session.realm.clone(),
            external_id: session.external_id.clone(),
            kind: session.kind,
            idp_session_id: session.idp_session_id.clone(),
            idp_client_session_id: session.idp_client_session_id.clone(),
            user_id: session.user_id.clone(),
            system: session.system.clone(),
            origin_system: origin_system.map(str::to_owned),
            end_reason: session.end_reason,
            attributes: session.attributes.clone(),
            expires_at: session.expires_at,
            occurred_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_spellings_round_trip() {
        for r in EndReason::ALL {
            assert_eq!(r.as_str().parse::<EndReason>().ok(), Some(*r));
        }
        for k in SessionKind::ALL {
            assert_eq!(k.as_str().parse::<SessionKind>().ok(), Some(*k));
        }
        assert!("parent".parse::<SessionKind>().is_err());
    }

    #[test]
    fn audit_actions_are_spelled_in_kebab_case() {
        assert_eq!(AuditAction::MapParent.to_string(), "map-parent");
        assert_eq!(AuditAction::DeliveryReplay.to_string(), "delivery-replay");
        assert_eq!(
            AuditAction::IdpEvent("LOGOUT".into()).to_string(),
            "idp-event:LOGOUT"
        );
    }
}
