//! API authentication and authorisation: the bootstrap admin token, static
//! API keys (stored as SHA-256 digests), and the seam where IdP access tokens will be
//! verified. It decides who the caller is and what it may do; it does not know routes.

pub mod webhook;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do, per realm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Map, destroy and query external sessions.
    UsersManage,
    /// Load, replace and remove connectors.
    ConnectorsManage,
    /// Read the audit log.
    AuditRead,
    /// Manage the realm's Shared Signals streams (Lockstep as a transmitter) and poll them.
    SsfManage,
}

impl Permission {
    /// The spelling used in config files and tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::UsersManage => "users:manage",
            Permission::ConnectorsManage => "connectors:manage",
            Permission::AuditRead => "audit:read",
            Permission::SsfManage => "ssf:manage",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "users:manage" => Ok(Permission::UsersManage),
            "connectors:manage" => Ok(Permission::ConnectorsManage),
            "audit:read" => Ok(Permission::AuditRead),
            "ssf:manage" => Ok(Permission::SsfManage),
            other => Err(format!(
                "unknown permission {other:?} (users:manage, connectors:manage, audit:read, \
                 ssf:manage)"
            )),
        }
    }
}

/// A configured static API key.
#[derive(Clone, Debug)]
pub struct ApiKey {
    /// Name used in logs, audit records and as the default origin system.
    pub id: String,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// Realms it may act in; `"*"` for all.
    pub realms: Vec<String>,
    /// What it may do there.
    pub permissions: Vec<Permission>,
    /// The system (connector name) the key speaks for; `None`: its `id`.
    pub system: Option<String>,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The bootstrap `LOCKSTEP_ADMIN_TOKEN`: every permission in every realm.
    Admin,
    /// A static API key.
    Key {
        /// Key id.
        id: String,
        /// Realms (`"*"` for all).
        realms: Vec<String>,
        /// Permissions.
        permissions: Vec<Permission>,
        /// The system it speaks for (`[[api_keys]] system`; `None`: its id).
        system: Option<String>,
    },
    /// An IdP-issued access token, verified against its realm's keys.
    Token {
        /// Token subject.
        subject: String,
        /// The realm whose IdP issued it; the only realm it can act in.
        realm: String,
        /// Permissions its roles/scopes grant.
        permissions: Vec<Permission>,
    },
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable credentials (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the permission (403).
    #[error("{0}")]
    Forbidden(String),
}

impl Principal {
    /// The caller's name: default `system`/`originSystem` and audit actor.
    pub fn name(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Key { id, .. } => id,
            Principal::Token { subject, .. } => subject,
        }
    }

    /// The system the caller speaks for: a key's configured `system` (else its id), a
    /// token's subject, `admin` for the bootstrap token. The default `system` and
    /// `originSystem` of its calls.
    pub fn system(&self) -> &str {
        match self {
            Principal::Key {
                system: Some(system),
                ..
            } => system,
            _ => self.name(),
        }
    }

    /// The `originSystem` of a change the caller asks for: `requested`, or its own system.
    /// The origin's connector is not sent the change (no echo), so naming another system
    /// would silence that connector; only the bootstrap token (the operator) may.
    pub fn origin(&self, requested: Option<String>) -> Result<String, AuthError> {
        match requested {
            None => Ok(self.system().to_owned()),
            Some(origin) if origin == self.system() || *self == Principal::Admin => Ok(origin),
            Some(origin) => Err(AuthError::Forbidden(format!(
                "{} may not name {origin:?} as originSystem: a caller names only its own \
                 system ({:?}), whose connector is then not sent the change",
                self.name(),
                self.system()
            ))),
        }
    }

    /// How the audit log names the caller: `admin`, `key:<id>` or `token:<sub>@<realm>`
    /// (prefixed, so an API key cannot pass for a token subject of the same name).
    pub fn actor(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Key { id, .. } => format!("key:{id}"),
            Principal::Token { subject, realm, .. } => format!("token:{subject}@{realm}"),
        }
    }

    /// Succeeds when the caller holds `permission` in `realm`.
    pub fn authorize(&self, realm: &str, permission: Permission) -> Result<(), AuthError> {
        let allowed = match self {
            Principal::Admin => true,
            Principal::Key {
                realms,
                permissions,
                ..
            } => permissions.contains(&permission) && realms.iter().any(|r| r == "*" || r == realm),
            Principal::Token {
                realm: token_realm,
                permissions,
                ..
            } => token_realm == realm && permissions.contains(&permission),
        };
        if allowed {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "{} may not {permission} in realm {realm:?}",
                self.name()
            )))
        }
    }
}

impl Principal {
    /// Succeeds when the caller holds `permission` in every realm (operator surfaces such as
    /// connectors and deliveries span realms).
    pub fn authorize_global(&self, permission: Permission) -> Result<(), AuthError> {
        let allowed = match self {
            Principal::Admin => true,
            Principal::Key {
                realms,
                permissions,
                ..
            } => permissions.contains(&permission) && realms.iter().any(|r| r == "*"),
            Principal::Token { .. } => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "{} may not {permission} across realms (needs realms = [\"*\"])",
                self.name()
            )))
        }
    }
}

/// Verifies IdP-issued bearer tokens (`oidc::AccessTokens`, backed by each realm's JWKS).
/// Asynchronous because verifying may fetch the issuer's keys.
pub trait AccessTokenVerifier: Send + Sync {
    /// `Ok(Some)` for a valid token, `Ok(None)` when the token is not one this verifier
    /// recognises (so it is not a JWT of a configured issuer), `Err` when it is invalid.
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<Principal>, AuthError>>;
}

/// Resolves bearer credentials to a [`Principal`].
#[derive(Clone, Default)]
pub struct Authenticator {
    admin_sha256: Option<[u8; 32]>,
    keys: Arc<HashMap<[u8; 32], ApiKey>>,
    verifier: Option<Arc<dyn AccessTokenVerifier>>,
}

/// SHA-256 of a secret, as stored in the config.
pub fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Authenticator {
    /// Builds the authenticator from the bootstrap token (if any) and the configured keys.
    pub fn new(admin_token: Option<&str>, keys: Vec<ApiKey>) -> Self {
        Authenticator {
            admin_sha256: admin_token.filter(|t| !t.is_empty()).map(sha256),
            keys: Arc::new(keys.into_iter().map(|k| (k.sha256, k)).collect()),
            verifier: None,
        }
    }

    /// Adds an IdP access-token verifier.
    pub fn with_verifier(mut self, verifier: Arc<dyn AccessTokenVerifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Whether any credential is configured at all.
    pub fn has_credentials(&self) -> bool {
        self.admin_sha256.is_some() || !self.keys.is_empty() || self.verifier.is_some()
    }

    /// Resolves an `Authorization` header value.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or_else(|| {
            AuthError::Unauthenticated("missing Authorization: Bearer <token> header".into())
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                AuthError::Unauthenticated("Authorization header must be `Bearer <token>`".into())
            })?;
        // Compare digests, not secrets: equal-length inputs, constant-time comparison.
        let digest = sha256(token);
        if let Some(admin) = &self.admin_sha256
            && bool::from(admin.ct_eq(&digest))
        {
            return Ok(Principal::Admin);
        }
        if let Some(key) = self.keys.get(&digest) {
            return Ok(Principal::Key {
                id: key.id.clone(),
                realms: key.realms.clone(),
                permissions: key.permissions.clone(),
                system: key.system.clone(),
            });
        }
        if let Some(verifier) = &self.verifier
            && let Some(principal) = verifier.verify(token).await?
        {
            return Ok(principal);
        }
        Err(AuthError::Unauthenticated(
            "invalid or unknown bearer token".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(
            Some("root-secret"),
            vec![ApiKey {
                id: "portal".into(),
                sha256: sha256("portal-secret"),
                realms: vec!["acme".into()],
                permissions: vec![Permission::UsersManage],
                system: None,
            }],
        )
    }

    #[tokio::test]
    async fn bearer_tokens_resolve_to_their_principal() {
        let a = auth();
        assert_eq!(
            a.authenticate(Some("Bearer root-secret")).await,
            Ok(Principal::Admin)
        );
        let key = a.authenticate(Some("Bearer portal-secret")).await.unwrap();
        assert_eq!(key.name(), "portal");
        assert!(matches!(
            a.authenticate(Some("Bearer nope")).await,
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            a.authenticate(None).await,
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            a.authenticate(Some("Basic cm9vdA==")).await,
            Err(AuthError::Unauthenticated(_))
        ));
    }

    #[tokio::test]
    async fn keys_are_confined_to_their_realms_and_permissions() {
        let key = auth()
            .authenticate(Some("Bearer portal-secret"))
            .await
            .unwrap();
        assert!(key.authorize("acme", Permission::UsersManage).is_ok());
        assert!(matches!(
            key.authorize("other", Permission::UsersManage),
            Err(AuthError::Forbidden(_))
        ));
        assert!(matches!(
            key.authorize("acme", Permission::ConnectorsManage),
            Err(AuthError::Forbidden(_))
        ));
        assert!(
            Principal::Admin
                .authorize("anything", Permission::AuditRead)
                .is_ok()
        );
    }

    #[test]
    fn actors_name_the_kind_of_credential() {
        assert_eq!(Principal::Admin.actor(), "admin");
        let key = Principal::Key {
            id: "portal".into(),
            realms: vec!["acme".into()],
            permissions: vec![],
            system: None,
        };
        assert_eq!(key.actor(), "key:portal");
        let token = Principal::Token {
            subject: "u-1".into(),
            realm: "acme".into(),
            permissions: vec![],
        };
        assert_eq!(token.actor(), "token:u-1@acme");
    }

    #[test]
    fn a_caller_names_only_its_own_system_as_origin() {
        let key = |system: Option<&str>| Principal::Key {
            id: "portal-key".into(),
            realms: vec!["acme".into()],
            permissions: vec![Permission::UsersManage],
            system: system.map(str::to_owned),
        };
        let bound = key(Some("portal"));
        assert_eq!(bound.origin(None).unwrap(), "portal");
        assert_eq!(bound.origin(Some("portal".into())).unwrap(), "portal");
        assert!(matches!(
            bound.origin(Some("billing".into())),
            Err(AuthError::Forbidden(_))
        ));
        assert!(
            bound.origin(Some("portal-key".into())).is_err(),
            "a configured system replaces the id"
        );
        let unbound = key(None);
        assert_eq!(unbound.origin(None).unwrap(), "portal-key");
        assert!(unbound.origin(Some("portal".into())).is_err());
        let token = Principal::Token {
            subject: "u-1".into(),
            realm: "acme".into(),
            permissions: vec![Permission::UsersManage],
        };
        assert!(token.origin(Some("billing".into())).is_err());
        assert_eq!(
            Principal::Admin.origin(Some("billing".into())).unwrap(),
            "billing",
            "the operator may speak for any system"
        );
    }
}
