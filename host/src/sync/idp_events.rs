//! Keycloak events (posted by `keycloak-extension/` to `POST /realms/{realm}/events`) and
//! what each one does to the realm's sessions. Pure: the HTTP edge verifies the signature,
//! the store applies the change.
//!
//! Every live Keycloak user session is mirrored as a PARENT `{idp_system}:{sid}` owned by the
//! IdP system, so a Keycloak login reaches connectors as an ordinary `login` event, its
//! lifetime (`expires_at`) and delegation (impersonation) are recorded once and inherited by
//! every PARENT an application maps to the same IdP session.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::domain::rules::{self, ValidationError};
use crate::domain::{Attributes, DestroyTarget, EndReason, IdpChange, NewSession, SessionKind};

/// One event as the extension posts it (docs/keycloak.md, "Event extension"). Fields a newer
/// extension may add are ignored, so an upgrade of Keycloak's side never breaks the intake.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeycloakEvent {
    /// Unique event id; equals the `webhook-id` header; the replay key.
    pub id: String,
    /// What happened (see [`KeycloakEventType`]).
    #[serde(rename = "type")]
    pub event_type: String,
    /// Realm name; must equal the path's realm.
    pub realm: String,
    /// When Keycloak recorded it (epoch ms).
    #[serde(default)]
    pub time: Option<i64>,
    /// Keycloak user id.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Keycloak user-session id.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Client the event concerns.
    #[serde(default)]
    pub client_id: Option<String>,
    /// When the user session expires (epoch ms), per the realm's SSO idle and max lifetimes.
    #[serde(default)]
    pub session_expires_at: Option<i64>,
    /// IMPERSONATE: the administrator's user id.
    #[serde(default)]
    pub impersonator_id: Option<String>,
    /// IMPERSONATE: the administrator's own user session.
    #[serde(default)]
    pub impersonator_session_id: Option<String>,
    /// IMPERSONATE: the administrator's realm.
    #[serde(default)]
    pub impersonator_realm: Option<String>,
}

/// The event types the intake understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeycloakEventType {
    /// A user authenticated.
    Login,
    /// An authorization code was exchanged for tokens.
    CodeToToken,
    /// A refresh-token grant extended the session.
    RefreshToken,
    /// The user logged out.
    Logout,
    /// The user revoked a client's grant (consent, offline token).
    RevokeGrant,
    /// An administrator impersonated the user.
    Impersonate,
    /// The user session expired.
    SessionExpired,
    /// An administrator deleted the user session.
    SessionDeleted,
    /// An administrator signed the user out of every session.
    UserLogoutAll,
    /// An administrator signed everyone in the realm out.
    RealmLogoutAll,
    /// The user was deleted.
    UserDeleted,
    /// The user was disabled.
    UserDisabled,
}

impl KeycloakEventType {
    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "LOGIN" => Self::Login,
            "CODE_TO_TOKEN" => Self::CodeToToken,
            "REFRESH_TOKEN" => Self::RefreshToken,
            "LOGOUT" => Self::Logout,
            "REVOKE_GRANT" => Self::RevokeGrant,
            "IMPERSONATE" => Self::Impersonate,
            "SESSION_EXPIRED" => Self::SessionExpired,
            "SESSION_DELETED" => Self::SessionDeleted,
            "USER_LOGOUT_ALL" => Self::UserLogoutAll,
            "REALM_LOGOUT_ALL" => Self::RealmLogoutAll,
            "USER_DELETED" => Self::UserDeleted,
            "USER_DISABLED" => Self::UserDisabled,
            _ => return None,
        })
    }
}

/// The external id of the mirror of IdP session `sid`.
pub fn mirror_id(idp_system: &str, sid: &str) -> String {
    format!("{idp_system}:{sid}")
}

/// The change `event` makes in `realm`, whose IdP system is `idp_system`. Refuses events that
/// lack what their type needs, or name another realm.
pub fn change_for(
    realm: &str,
    idp_system: &str,
    event: &KeycloakEvent,
) -> Result<IdpChange, ValidationError> {
    rules::id("id", &event.id)?;
    if event.realm != realm {
        return Err(ValidationError(format!(
            "the event is for realm {:?}, posted to realm {realm:?}",
            event.realm
        )));
    }
    for (field, value) in [
        ("userId", &event.user_id),
        ("sessionId", &event.session_id),
        ("clientId", &event.client_id),
        ("impersonatorId", &event.impersonator_id),
        ("impersonatorSessionId", &event.impersonator_session_id),
        ("impersonatorRealm", &event.impersonator_realm),
    ] {
        rules::optional_id(field, value.as_deref())?;
    }
    let Some(kind) = KeycloakEventType::parse(&event.event_type) else {
        return Err(ValidationError(format!(
            "unsupported event type {:?}",
            truncate(&event.event_type)
        )));
    };
    let need = |field: &str, value: &Option<String>| {
        value
            .clone()
            .ok_or_else(|| ValidationError(format!("{} needs {field}", event.event_type.as_str())))
    };
    let end = |target, reason| Ok(IdpChange::End { target, reason });
    use KeycloakEventType as T;
    match kind {
        T::Login | T::CodeToToken | T::RefreshToken | T::Impersonate => {
            let sid = need("sessionId", &event.session_id)?;
            let expires_at = event.session_expires_at.map(time).transpose()?;
            let mut mirror = mirror_session(realm, idp_system, &sid, event.user_id.clone());
            mirror.expires_at = expires_at;
            let mut actor = None;
            let mut ended = None;
            if kind == T::Impersonate {
                // Who impersonated stays on the record, whatever else happens.
                for (key, value) in [
                    ("impersonatorId", &event.impersonator_id),
                    ("impersonatorSessionId", &event.impersonator_session_id),
                    ("impersonatorRealm", &event.impersonator_realm),
                ] {
                    if let Some(v) = value {
                        mirror.attributes.insert(key.to_owned(), v.clone());
                    }
                }
                rules::attributes(&mirror.attributes)?;
                match (
                    &event.impersonator_session_id,
                    event.impersonator_realm.as_deref(),
                ) {
                    // Within its own realm, Keycloak ends the administrator's session when
                    // the impersonation starts: what was mapped to it ends now, and the
                    // impersonated session stands on its own.
                    (Some(admin_sid), Some(r)) if r == realm => ended = Some(admin_sid.clone()),
                    (Some(admin_sid), Some(r)) => {
                        rules::realm(r)?;
                        let admin = mirror_session(
                            realm,
                            idp_system,
                            admin_sid,
                            event.impersonator_id.clone(),
                        );
                        rules::id("externalId", &admin.external_id)?;
                        mirror.delegated_by = Some(admin.external_id.clone());
                        actor = Some((Box::new(admin), r.to_owned()));
                    }
                    _ => {}
                }
            }
            rules::id("externalId", &mirror.external_id)?;
            Ok(IdpChange::Alive {
                mirror: Box::new(mirror),
                actor,
                ended,
            })
        }
        T::RevokeGrant => Ok(IdpChange::Revoke {
            user_id: need("userId", &event.user_id)?,
        }),
        T::Logout => end(
            DestroyTarget::IdpSession(need("sessionId", &event.session_id)?),
            EndReason::IdpLogout,
        ),
        T::SessionExpired => end(
            DestroyTarget::IdpSession(need("sessionId", &event.session_id)?),
            EndReason::Expired,
        ),
        T::SessionDeleted => end(
            DestroyTarget::IdpSession(need("sessionId", &event.session_id)?),
            EndReason::Admin,
        ),
        T::UserLogoutAll | T::UserDeleted => end(
            DestroyTarget::User(need("userId", &event.user_id)?),
            EndReason::Admin,
        ),
        T::UserDisabled => end(
            DestroyTarget::User(need("userId", &event.user_id)?),
            EndReason::Revoked,
        ),
        T::RealmLogoutAll => end(DestroyTarget::AllIdpSessions, EndReason::Admin),
    }
}

fn mirror_session(realm: &str, idp_system: &str, sid: &str, user_id: Option<String>) -> NewSession {
    NewSession {
        realm: realm.to_owned(),
        external_id: mirror_id(idp_system, sid),
        kind: SessionKind::Parent,
        parent_id: None,
        idp_session_id: Some(sid.to_owned()),
        idp_client_session_id: None,
        user_id,
        system: Some(idp_system.to_owned()),
        delegated_by: None,
        attributes: Attributes::new(),
        expires_at: None,
    }
}

fn time(ms: i64) -> Result<DateTime<Utc>, ValidationError> {
    DateTime::from_timestamp_millis(ms)
        .filter(|t| t.timestamp() > 0)
        .ok_or_else(|| ValidationError(format!("sessionExpiresAt {ms} is not a valid time")))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(t: &str) -> KeycloakEvent {
        KeycloakEvent {
            id: "ev-1".into(),
            event_type: t.into(),
            realm: "acme".into(),
            time: Some(1),
            user_id: Some("u-1".into()),
            session_id: Some("sid-1".into()),
            client_id: None,
            session_expires_at: Some(1_900_000_000_000),
            impersonator_id: None,
            impersonator_session_id: None,
            impersonator_realm: None,
        }
    }

    #[test]
    fn logins_and_refreshes_keep_a_mirror_with_the_idp_lifetime() {
        for t in ["LOGIN", "CODE_TO_TOKEN", "REFRESH_TOKEN"] {
            let Ok(IdpChange::Alive { mirror, actor, .. }) =
                change_for("acme", "keycloak", &event(t))
            else {
                panic!("{t}: not alive");
            };
            assert_eq!(mirror.external_id, "keycloak:sid-1");
            assert_eq!(mirror.kind, SessionKind::Parent);
            assert_eq!(mirror.system.as_deref(), Some("keycloak"));
            assert_eq!(mirror.user_id.as_deref(), Some("u-1"));
            assert_eq!(
                mirror.expires_at.map(|t| t.timestamp_millis()),
                Some(1_900_000_000_000)
            );
            assert!(actor.is_none() && mirror.delegated_by.is_none());
            assert!(mirror.attributes.is_empty());
        }
    }

    #[test]
    fn an_impersonation_from_another_realm_is_delegated_by_the_admins_session() {
        let mut e = event("IMPERSONATE");
        e.impersonator_id = Some("admin-1".into());
        e.impersonator_session_id = Some("admin-sid".into());
        e.impersonator_realm = Some("master".into());
        let Ok(IdpChange::Alive {
            mirror,
            actor,
            ended,
        }) = change_for("acme", "kc", &e)
        else {
            panic!("not alive");
        };
        let (actor, actor_realm) = actor.expect("actor");
        assert_eq!(actor_realm, "master");
        assert_eq!(actor.external_id, "kc:admin-sid");
        assert_eq!(actor.user_id.as_deref(), Some("admin-1"));
        assert_eq!(mirror.delegated_by.as_deref(), Some("kc:admin-sid"));
        assert_eq!(mirror.attributes["impersonatorId"], "admin-1");
        assert!(ended.is_none());
    }

    #[test]
    fn an_impersonation_within_the_realm_ends_the_admins_session() {
        let mut e = event("IMPERSONATE");
        e.impersonator_id = Some("admin-1".into());
        e.impersonator_session_id = Some("admin-sid".into());
        e.impersonator_realm = Some("acme".into());
        let Ok(IdpChange::Alive {
            mirror,
            actor,
            ended,
        }) = change_for("acme", "kc", &e)
        else {
            panic!("not alive");
        };
        assert!(actor.is_none() && mirror.delegated_by.is_none());
        assert_eq!(ended.as_deref(), Some("admin-sid"));
        assert_eq!(mirror.attributes["impersonatorSessionId"], "admin-sid");
    }

    #[test]
    fn ends_carry_the_right_reason() {
        let sid = || DestroyTarget::IdpSession("sid-1".into());
        let user = || DestroyTarget::User("u-1".into());
        let cases = [
            ("LOGOUT", sid(), EndReason::IdpLogout),
            ("SESSION_EXPIRED", sid(), EndReason::Expired),
            ("SESSION_DELETED", sid(), EndReason::Admin),
            ("USER_LOGOUT_ALL", user(), EndReason::Admin),
            ("USER_DELETED", user(), EndReason::Admin),
            ("USER_DISABLED", user(), EndReason::Revoked),
            (
                "REALM_LOGOUT_ALL",
                DestroyTarget::AllIdpSessions,
                EndReason::Admin,
            ),
        ];
        for (t, want_target, want_reason) in cases {
            match change_for("acme", "keycloak", &event(t)) {
                Ok(IdpChange::End { target, reason }) => {
                    assert_eq!((target, reason), (want_target, want_reason), "{t}");
                }
                other => panic!("{t}: {other:?}"),
            }
        }
        assert!(matches!(
            change_for("acme", "keycloak", &event("REVOKE_GRANT")),
            Ok(IdpChange::Revoke { user_id }) if user_id == "u-1"
        ));
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        let mut no_sid = event("LOGOUT");
        no_sid.session_id = None;
        let mut no_user = event("USER_DELETED");
        no_user.user_id = None;
        let mut bad_time = event("LOGIN");
        bad_time.session_expires_at = Some(i64::MAX);
        let mut long_sid = event("LOGIN");
        long_sid.session_id = Some("x".repeat(300));
        for (e, needle) in [
            (event("SOMETHING_ELSE"), "unsupported event type"),
            (no_sid, "LOGOUT needs sessionId"),
            (no_user, "USER_DELETED needs userId"),
            (bad_time, "not a valid time"),
            (long_sid, "sessionId is 300 characters"),
        ] {
            let err = change_for("acme", "keycloak", &e).expect_err(needle);
            assert!(err.0.contains(needle), "{err}");
        }
        let err = change_for("other", "keycloak", &event("LOGIN")).expect_err("realm");
        assert!(err.0.contains("posted to realm \"other\""), "{err}");
    }
}
