//! Sessions: their kinds, states and end reasons, a stored record and one to register.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// Free-form string metadata attached to a session.
pub type Attributes = BTreeMap<String, String>;

/// The system label of the sessions the identity provider owns, when the realm names none.
pub const DEFAULT_IDP_SYSTEM: &str = "keycloak";

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

/// A stored session record: one row of `sessions`.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// Store-assigned, monotonically increasing; the pagination key.
    pub seq: i64,
    /// The realm (tenant) it belongs to.
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
    /// The user (`sub` of the IdP), when known.
    pub user_id: Option<String>,
    /// The system that owns it and ends it (a portal, the IdP system label).
    pub system: Option<String>,
    /// External id of the actor's session when this one was delegated.
    pub delegated_by: Option<String>,
    /// Lifecycle state.
    pub status: SessionStatus,
    /// Why it ended.
    pub end_reason: Option<EndReason>,
    /// Free-form metadata, bounded by [`rules::attributes`](crate::domain::rules::attributes).
    pub attributes: Attributes,
    /// When it expires, if known.
    pub expires_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When its status, lifetime or delegation last changed.
    pub updated_at: DateTime<Utc>,
}

/// A session to register (already validated by the caller).
#[derive(Clone, Debug)]
pub struct NewSession {
    /// The realm (tenant) it belongs to.
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
    /// The system that owns it and ends it (a portal, the IdP system label).
    pub system: Option<String>,
    /// Delegating session, if any.
    pub delegated_by: Option<String>,
    /// Free-form metadata, bounded by [`rules::attributes`](crate::domain::rules::attributes).
    pub attributes: Attributes,
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
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
}
