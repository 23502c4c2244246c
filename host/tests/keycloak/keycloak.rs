//! Smoke checks of the Keycloak test harness (`common/keycloak.rs`) against the real Keycloak
//! of `cargo xtask keycloak start`: the imported realm, its clients and roles, the headless
//! login, the Admin API calls and key rotation that product tests build on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::keycloak::{
    self, ALICE, ALICE_PASSWORD, LOCKSTEP_CLIENT, NO_PERM_CLIENT, OPS_CLIENT, PORTAL_CLIENT, REALM,
};
use serde_json::{Value, json};

fn base_or_skip(test: &str) -> Option<String> {
    let base = keycloak::keycloak_url();
    if base.is_none() {
        eprintln!("LOCKSTEP_SKIP_KEYCLOAK=1: skipping {test}");
    }
    base
}

fn audiences(claims: &Value) -> Vec<String> {
    match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn lockstep_roles(claims: &Value) -> Vec<String> {
    claims["resource_access"]["lockstep"]["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// The only test of this file that touches alice's sessions (`keycloak::room` keeps the other
/// files' tests off Keycloak meanwhile), so the count is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_lists_a_session_that_the_lockstep_service_account_can_delete() {
    let _room = keycloak::room(file!()).await;
    let Some(base) =
        base_or_skip("login_lists_a_session_that_the_lockstep_service_account_can_delete")
    else {
        return;
    };
    // Sessions persist across Keycloak restarts: start from none.
    keycloak::logout_user(&base, REALM, ALICE).await;
    assert_eq!(
        keycloak::user_sessions(&base, REALM, ALICE).await,
        Vec::<Value>::new()
    );

    let (portal, portal_secret) = PORTAL_CLIENT;
    let login = keycloak::login(&base, REALM, portal, portal_secret, ALICE, ALICE_PASSWORD).await;
    assert!(!login.sid.is_empty());
    assert!(!login.access_token.is_empty() && !login.refresh_token.is_empty());
    let id_claims = keycloak::claims(&login.id_token);
    assert_eq!(id_claims["iss"], json!(keycloak::issuer(&base, REALM)));
    assert_eq!(id_claims["aud"], json!(portal));
    assert_eq!(id_claims["preferred_username"], json!(ALICE));

    let sessions = keycloak::user_sessions(&base, REALM, ALICE).await;
    assert_eq!(sessions.len(), 1, "alice's sessions: {sessions:?}");
    assert_eq!(sessions[0]["id"], json!(login.sid));

    // The lockstep service account (realm-management: manage-users) may end it.
    let (lockstep, lockstep_secret) = LOCKSTEP_CLIENT;
    let token = keycloak::client_credentials(&base, REALM, lockstep, lockstep_secret).await;
    keycloak::delete_session_as(&base, REALM, &login.sid, &token).await;
    let sessions = keycloak::user_sessions(&base, REALM, ALICE).await;
    assert!(sessions.is_empty(), "session still listed: {sessions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_carry_the_lockstep_audience_and_only_granted_roles() {
    let _room = keycloak::room(file!()).await;
    let Some(base) =
        base_or_skip("service_account_tokens_carry_the_lockstep_audience_and_only_granted_roles")
    else {
        return;
    };
    let (ops, ops_secret) = OPS_CLIENT;
    let ops = keycloak::claims(&keycloak::client_credentials(&base, REALM, ops, ops_secret).await);
    assert!(audiences(&ops).contains(&"lockstep".to_owned()), "{ops}");
    assert!(
        lockstep_roles(&ops).contains(&"users:manage".to_owned()),
        "{ops}"
    );
    assert_eq!(ops["iss"], json!(keycloak::issuer(&base, REALM)));

    let (no_perm, no_perm_secret) = NO_PERM_CLIENT;
    let no_perm = keycloak::claims(
        &keycloak::client_credentials(&base, REALM, no_perm, no_perm_secret).await,
    );
    assert!(
        audiences(&no_perm).contains(&"lockstep".to_owned()),
        "{no_perm}"
    );
    assert!(lockstep_roles(&no_perm).is_empty(), "{no_perm}");

    let (lockstep, lockstep_secret) = LOCKSTEP_CLIENT;
    let own = keycloak::claims(
        &keycloak::client_credentials(&base, REALM, lockstep, lockstep_secret).await,
    );
    let manage = &own["resource_access"]["realm-management"]["roles"];
    assert!(
        manage
            .as_array()
            .is_some_and(|r| r.contains(&json!("manage-users"))),
        "{own}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_sign_new_tokens_and_both_stay_in_the_jwks() {
    let _room = keycloak::room(file!()).await;
    let Some(base) = base_or_skip("rotated_keys_sign_new_tokens_and_both_stay_in_the_jwks") else {
        return;
    };
    let (ops, ops_secret) = OPS_CLIENT;
    let before = keycloak::kid(&keycloak::client_credentials(&base, REALM, ops, ops_secret).await);
    let new_kid = keycloak::rotate_keys(&base, REALM).await;
    assert_ne!(new_kid, before);
    let after = keycloak::kid(&keycloak::client_credentials(&base, REALM, ops, ops_secret).await);
    assert_eq!(after, new_kid, "new tokens are signed with the new key");

    let jwks: Value = keycloak::http()
        .get(keycloak::jwks_url(&base, REALM))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let signing: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kty"] == json!("RSA") && k["use"] == json!("sig"))
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(signing.len() >= 2, "{jwks}");
    assert!(
        signing.contains(&before.as_str()) && signing.contains(&new_kid.as_str()),
        "{jwks}"
    );
}
