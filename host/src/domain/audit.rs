//! Audit records: who did what, where and to what, and how it ended.

use std::fmt;

use super::problem::ProblemCode;

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
    /// `global-token-revocation`: a caller ended every session of a user (Global Token
    /// Revocation).
    GlobalTokenRevocation,
    /// `ssf:<event>`: a Shared Signals transmitter's event (`ssf:session-revoked`...).
    SharedSignal(String),
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
    /// `ssf-stream-create`: a receiver made a stream on Lockstep's transmitter.
    SsfStreamCreate,
    /// `ssf-stream-update`: a stream's configuration, status or subjects changed (`detail`
    /// says which).
    SsfStreamUpdate,
    /// `ssf-stream-delete`.
    SsfStreamDelete,
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
            AuditAction::GlobalTokenRevocation => "global-token-revocation",
            AuditAction::IdpEvent(kind) => return write!(f, "idp-event:{kind}"),
            AuditAction::SharedSignal(event) => return write!(f, "ssf:{event}"),
            AuditAction::Expire => "expire",
            AuditAction::Reconcile => "reconcile",
            AuditAction::ConnectorPut => "connector-put",
            AuditAction::ConnectorDelete => "connector-delete",
            AuditAction::ConnectorEnable => "connector-enable",
            AuditAction::ConnectorDisable => "connector-disable",
            AuditAction::DeliveryReplay => "delivery-replay",
            AuditAction::SsfStreamCreate => "ssf-stream-create",
            AuditAction::SsfStreamUpdate => "ssf-stream-update",
            AuditAction::SsfStreamDelete => "ssf-stream-delete",
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
    Refused(ProblemCode),
}

impl AuditOutcome {
    /// The stored `result` and `changed` columns: `ok` with the count, or the refusal's code
    /// without one.
    pub fn columns(self) -> (&'static str, Option<i64>) {
        match self {
            AuditOutcome::Ok(n) => ("ok", Some(n)),
            AuditOutcome::Refused(code) => (code.as_str(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
