//! Keycloak → Lockstep through the event extension, end to end: a real Keycloak
//! (`cargo xtask keycloak start`, which builds `keycloak-extension/` and installs it), a
//! throwaway realm per test whose `lockstep` event listener posts to this test's Lockstep,
//! the real webhook connector, and a real receiver on 127.0.0.1 standing in for the legacy
//! system. Skipped (with a note) only when `LOCKSTEP_TEST_KEYCLOAK_URL` is unset and
//! `LOCKSTEP_SKIP_KEYCLOAK=1` says so; `scripts/test.sh` always provides Keycloak.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::keycloak::{self, EV_ALICE, EV_ANN, EventsRealm, PORTAL_CLIENT};
use common::receiver::{Receiver, Recorded};
use common::{Api, Backend, Server, ServerOptions};
use reqwest::StatusCode;
use serde_json::Value;

/// What the test Keycloak signs with unless a realm has its own secret in the vault.
const SECRET: &str = keycloak::EVENTS_SECRET;

/// Taken shared by every test of this file, exclusively by the one that kills and restarts
/// Keycloak, so none of them talks to Keycloak while it is down (the other files' tests are
/// kept off it by `keycloak::room`).
static KEYCLOAK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A Lockstep with the webhook connector (login, logout, revoke, refresh) posting to
/// `receiver`, accepting events for `realm` (and `extra_realms`).
fn options(
    realm: &str,
    extra_realms: &[&str],
    receiver: &Receiver,
    dir: &std::path::Path,
) -> ServerOptions {
    std::fs::write(
        dir.join("legacy.toml"),
        format!(
            "name = \"legacy\"\ncomponent = \"{}\"\nrealms = [\"*\"]\n\
             events = [\"login\", \"logout\", \"revoke\", \"refresh\"]\n\
             allowed_hosts = [\"{}\"]\ntimeout_ms = 2000\n\
             [policy]\non_failure = \"retry\"\nmax_attempts = 10\nbackoff_ms = 50\nmax_backoff_ms = 500\n\
             [config]\nurl = \"{}\"\n",
            common::components::component("webhook").display(),
            receiver.origin(),
            receiver.url("/sessions"),
        ),
    )
    .unwrap();
    let mut config = String::new();
    for r in std::iter::once(&realm).chain(extra_realms) {
        config.push_str(&format!(
            "[realms.\"{r}\"]\nevents_secrets = [\"{SECRET}\"]\n"
        ));
    }
    ServerOptions {
        config: Some(config),
        connectors_dir: Some(dir.to_owned()),
        ..ServerOptions::default()
    }
}

/// A fresh realm whose events go to a fresh Lockstep.
async fn setup(
    sso_idle_s: u32,
) -> Option<(String, EventsRealm, Server, Receiver, tempfile::TempDir)> {
    let base = keycloak::keycloak_url()?;
    // The realm is made first (its name is random), pointed at Lockstep once that listens.
    let realm = keycloak::events_realm(&base, "http://127.0.0.1:9", sso_idle_s).await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        Backend::Sqlite,
        options(&realm.name, &[], &receiver, dir.path()),
    )
    .await;
    realm.set_lockstep(&server.base).await;
    Some((base, realm, server, receiver, dir))
}

/// The receiver's events of `type` for `external_id`.
fn received(receiver: &Receiver, kind: &str, external_id: &str) -> Vec<Value> {
    receiver
        .requests()
        .iter()
        .map(Recorded::json)
        .filter(|e| e["type"] == kind && e["externalId"] == external_id)
        .collect()
}

async fn wait_received(
    receiver: &Receiver,
    kind: &str,
    external_id: &str,
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = received(receiver, kind, external_id).pop() {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} event for {external_id} within {timeout:?}; got {:#?}",
            receiver
                .requests()
                .iter()
                .map(Recorded::json)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ended(api: &Api, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, s) = api.get(id).await;
        if code == StatusCode::OK && s["status"] != "ACTIVE" {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{id} still {s} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn map_legacy(api: &Api, id: &str, sid: &str) {
    let (code, body) = api.map_parent(id, sid).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = api.map_child(&format!("{id}-c"), id).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
}

fn millis(rfc3339: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_refreshes_and_expiry_follow_keycloak() {
    let _room = keycloak::room(file!()).await;
    let _shared = KEYCLOAK.read().await;
    let Some((_, realm, server, receiver, _dir)) = setup(4).await else {
        return;
    };
    let api = server.api(&realm.name);
    let alice_id = realm.user_id(EV_ALICE.0).await;

    // A real login reaches the legacy system as a `login` event within 1 s.
    let started = Instant::now();
    let login = realm
        .password_login(PORTAL_CLIENT.0, PORTAL_CLIENT.1, EV_ALICE.0, EV_ALICE.1)
        .await;
    let mirror = format!("keycloak:{}", login.sid);
    let event = wait_received(&receiver, "login", &mirror, Duration::from_secs(1)).await;
    eprintln!(
        "Keycloak login → connector login event in {:?}",
        started.elapsed()
    );
    assert_eq!(event["idpSessionId"], login.sid);
    assert_eq!(event["userId"], alice_id);
    assert_eq!(event["system"], "keycloak");

    // The legacy system maps its session; it inherits the Keycloak session's lifetime.
    map_legacy(&api, "crm-1", &login.sid).await;
    let (_, crm) = api.get("crm-1").await;
    assert_eq!(crm["userId"], alice_id);
    let first_expiry = millis(&crm["expiresAt"]);
    let now = chrono::Utc::now().timestamp_millis();
    assert!(
        (now..now + 5_000).contains(&first_expiry),
        "expiry {first_expiry} should be ~4 s (SSO Session Idle) after {now}"
    );

    // A refresh-token grant moves the expiry forward and is delivered as `refresh`.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let refreshed = realm
        .refresh(PORTAL_CLIENT.0, PORTAL_CLIENT.1, &login.refresh_token)
        .await;
    assert_eq!(refreshed.sid, login.sid);
    let event = wait_received(&receiver, "refresh", "crm-1", Duration::from_secs(2)).await;
    let moved = millis(&event["expiresAt"]);
    assert!(
        moved > first_expiry,
        "refresh moved the expiry {first_expiry} → {moved}"
    );
    let (_, crm) = api.get("crm-1").await;
    assert_eq!(millis(&crm["expiresAt"]), moved);

    // No more refreshes: when the Keycloak session's idle time runs out, the tree ends with
    // reason `expired` and the legacy system hears of each session.
    for id in [mirror.as_str(), "crm-1", "crm-1-c"] {
        let ended = wait_ended(&api, id, Duration::from_secs(15)).await;
        assert_eq!(ended["endReason"], "expired", "{id}");
        let event = wait_received(&receiver, "logout", id, Duration::from_secs(5)).await;
        assert_eq!(event["endReason"], "expired", "{id}");
    }
    realm.delete().await;
}

/// A client revoking its refresh token at Keycloak's revocation endpoint (RFC 7009) is a
/// REVOKE_GRANT event: every live legacy session of the user hears `revoke`, sent by the real
/// Keycloak through the real extension (the signed-event path is covered in idp_events.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_reaches_every_legacy_session_of_the_user() {
    let _room = keycloak::room(file!()).await;
    let _shared = KEYCLOAK.read().await;
    let Some((_, realm, server, receiver, _dir)) = setup(1800).await else {
        return;
    };
    let api = server.api(&realm.name);
    let alice_id = realm.user_id(EV_ALICE.0).await;
    let login = realm
        .password_login(PORTAL_CLIENT.0, PORTAL_CLIENT.1, EV_ALICE.0, EV_ALICE.1)
        .await;
    let mirror = format!("keycloak:{}", login.sid);
    // The mirror carries alice's id; legacy sessions mapped to it inherit it.
    wait_received(&receiver, "login", &mirror, Duration::from_secs(5)).await;
    map_legacy(&api, "erp-1", &login.sid).await;
    assert!(received(&receiver, "revoke", "erp-1").is_empty());

    realm
        .revoke(PORTAL_CLIENT.0, PORTAL_CLIENT.1, &login.refresh_token)
        .await;
    for id in [mirror.as_str(), "erp-1", "erp-1-c"] {
        let event = wait_received(&receiver, "revoke", id, Duration::from_secs(5)).await;
        assert_eq!(event["realm"], realm.name, "{id}");
        // The child was mapped without a userId (map_legacy); it hears `revoke` as part of
        // the user's tree, not through a user of its own.
        if id != "erp-1-c" {
            assert_eq!(event["userId"], alice_id, "{id}");
        }
    }
    realm.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_admin_actions_end_every_mapped_session() {
    let _room = keycloak::room(file!()).await;
    let _shared = KEYCLOAK.read().await;
    let Some((base, realm, server, receiver, _dir)) = setup(1800).await else {
        return;
    };
    let api = server.api(&realm.name);
    // A fresh password login whose mirror's `login` has reached the legacy system, with the
    // legacy tree `id` mapped to it.
    let mapped_login = |who: (&'static str, &'static str), id: &'static str| {
        let (realm, receiver, api) = (realm.clone(), &receiver, &api);
        async move {
            let s = realm
                .password_login(PORTAL_CLIENT.0, PORTAL_CLIENT.1, who.0, who.1)
                .await;
            let mirror = format!("keycloak:{}", s.sid);
            wait_received(receiver, "login", &mirror, Duration::from_secs(2)).await;
            map_legacy(api, id, &s.sid).await;
        }
    };
    // Each admin action against a fresh Keycloak session with a mapped legacy tree. The first
    // is a browser-style authorization-code login: Keycloak emits LOGIN and then
    // CODE_TO_TOKEN for it, which make one mirror and one `login` event, not two.
    let code_login = keycloak::login(
        &base,
        &realm.name,
        PORTAL_CLIENT.0,
        PORTAL_CLIENT.1,
        EV_ALICE.0,
        EV_ALICE.1,
    )
    .await;
    let mirror = format!("keycloak:{}", code_login.sid);
    wait_received(&receiver, "login", &mirror, Duration::from_secs(2)).await;
    map_legacy(&api, "by-session-delete", &code_login.sid).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        received(&receiver, "login", &mirror).len(),
        1,
        "one login per Keycloak session"
    );
    assert_eq!(
        api.list_all(&format!(
            "&keycloakSessionId={}&system=keycloak",
            code_login.sid
        ))
        .await
        .len(),
        1
    );
    realm.delete_session(&code_login.sid).await;
    mapped_login(EV_ALICE, "by-sign-out-all").await;
    realm.logout_user(EV_ALICE.0).await;
    mapped_login(EV_ALICE, "by-realm-logout-all").await;
    realm.logout_all().await;
    mapped_login(EV_ALICE, "by-user-disabled").await;
    realm.disable_user(EV_ALICE.0).await;
    mapped_login(EV_ANN, "by-user-deleted").await;
    realm.delete_user(EV_ANN.0).await;

    for (id, reason, child_reason) in [
        ("by-session-delete", "admin", "cascade"),
        ("by-sign-out-all", "admin", "admin"),
        ("by-realm-logout-all", "admin", "cascade"),
        ("by-user-disabled", "revoked", "revoked"),
        ("by-user-deleted", "admin", "admin"),
    ] {
        let root = wait_ended(&api, id, Duration::from_secs(10)).await;
        assert_eq!(root["endReason"], reason, "{id}");
        let child = wait_ended(&api, &format!("{id}-c"), Duration::from_secs(2)).await;
        // User-wide ends target the child too (it carries the user); session-wide ones
        // reach it through the cascade.
        assert_eq!(child["endReason"], child_reason, "{id}-c");
        for s in [id.to_owned(), format!("{id}-c")] {
            let event = wait_received(&receiver, "logout", &s, Duration::from_secs(5)).await;
            assert_eq!(event["originSystem"], "keycloak", "{s}");
        }
    }
    realm.delete().await;
}

/// Lockstep down while users log in and out, then Keycloak killed with SIGKILL: the events
/// wait in Keycloak's database (its PostgreSQL), and once both are back every one of them
/// arrives, once, and logins never waited on Lockstep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockstep_down_and_a_keycloak_crash_lose_no_event() {
    let _room = keycloak::room(file!()).await;
    let _exclusive = KEYCLOAK.write().await;
    let Some((_, realm, server, _receiver, dir)) = setup(1800).await else {
        return;
    };
    let listen = server.base.trim_start_matches("http://").to_owned();
    let (database_url, db_dir) = server.kill().await;

    // Lockstep is down while users log in (and some log out again).
    let mut live = Vec::new();
    let mut ended = Vec::new();
    let mut latencies = Vec::new();
    for i in 0..8 {
        let t = Instant::now();
        let l = realm
            .password_login(PORTAL_CLIENT.0, PORTAL_CLIENT.1, EV_ALICE.0, EV_ALICE.1)
            .await;
        latencies.push(t.elapsed());
        if i % 3 == 2 {
            realm
                .logout(PORTAL_CLIENT.0, PORTAL_CLIENT.1, &l.refresh_token)
                .await;
            ended.push(l.sid);
        } else {
            live.push(l.sid);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    latencies.sort();
    let worst = *latencies.last().unwrap();
    eprintln!(
        "{} logins while Lockstep was down: median {:?}, worst {worst:?}",
        latencies.len(),
        latencies[latencies.len() / 2]
    );
    // A login never waits on Lockstep: the extension only writes a row in its transaction.
    assert!(worst < Duration::from_secs(2), "a login took {worst:?}");
    let events = live.len() + 2 * ended.len();

    // The waiting events show in Keycloak's metrics (counted every 5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let waiting = keycloak::metric("lockstep_events_waiting").await;
        if waiting.is_some_and(|w| w >= events as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lockstep_events_waiting is {waiting:?}, expected at least {events}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Keycloak crashes with all of them undelivered, and comes back on the same database.
    let restarted = Instant::now();
    tokio::task::spawn_blocking(keycloak::crash_and_restart)
        .await
        .unwrap();
    eprintln!("Keycloak killed and back in {:?}", restarted.elapsed());

    // Lockstep comes back on the same address: every event arrives, once.
    let receiver = Receiver::start().await;
    let mut opts = options(&realm.name, &[], &receiver, dir.path());
    opts.listen = Some(listen);
    let server = Server::start_on(Backend::Sqlite, database_url, db_dir, opts).await;
    let api = server.api(&realm.name);
    let back = Instant::now();
    for sid in &live {
        let id = format!("keycloak:{sid}");
        wait_received(&receiver, "login", &id, Duration::from_secs(30)).await;
        assert_eq!(api.status_of(&id).await, "ACTIVE", "{id}");
    }
    for sid in &ended {
        let id = format!("keycloak:{sid}");
        let s = wait_ended(&api, &id, Duration::from_secs(30)).await;
        assert_eq!(s["endReason"], "idp_logout", "{id}");
    }
    eprintln!(
        "{events} events applied {:?} after Lockstep returned",
        back.elapsed()
    );
    // Once: each event id reached Lockstep's intake exactly one time (a second post of the
    // same id would be audited as DUPLICATE_EVENT).
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let (code, body) = server
            .admin_get(&format!(
                "/admin/audit?realm={}&actor=idp:keycloak&limit=500",
                realm.name
            ))
            .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let items = body["items"].as_array().unwrap().clone();
        if items.len() >= events || Instant::now() >= deadline {
            break items;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let results: Vec<&str> = records
        .iter()
        .map(|r| r["result"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        results,
        vec!["ok"; events],
        "one intake per event, no duplicate: {records:#?}"
    );
    assert_eq!(
        api.list_all("&system=keycloak").await.len(),
        live.len() + ended.len(),
        "one mirror per login"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while keycloak::metric("lockstep_events_waiting").await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "lockstep_events_waiting never went back to 0"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    realm.delete().await;
}

/// The signing secret comes from Keycloak's vault (per realm) or the server's option, never
/// from the realm attribute `lockstep.secret`, which realm exports show to their readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_signed_with_the_vault_secret_never_a_realm_attribute() {
    let _room = keycloak::room(file!()).await;
    let _shared = KEYCLOAK.read().await;
    let Some(base) = keycloak::keycloak_url() else {
        return;
    };
    const VAULT_SECRET: &str = "whsec_dmF1bHQtc2VjcmV0LW9mLW9uZS1yZWFsbS0zMmJ5dGVzIQ==";
    let realm = keycloak::events_realm(&base, "http://127.0.0.1:9", 1800).await;
    realm.set_vault_secret(VAULT_SECRET);
    // A forger's secret where the extension used to read it: ignored.
    realm
        .set_attribute(
            "lockstep.secret",
            "whsec_Zm9yZ2VkLWJ5LWEtcmVhbG0tcmVhZGVyLTMyYnl0ZXMh",
        )
        .await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&realm.name, &[], &receiver, dir.path());
    // Lockstep knows only the realm's own secret: a post signed with anything else is 401.
    opts.config = Some(format!(
        "[realms.\"{}\"]\nevents_secrets = [\"{VAULT_SECRET}\"]\n",
        realm.name
    ));
    let server = Server::start_with(Backend::Sqlite, opts).await;
    realm.set_lockstep(&server.base).await;
    let login = realm
        .password_login(PORTAL_CLIENT.0, PORTAL_CLIENT.1, EV_ALICE.0, EV_ALICE.1)
        .await;
    wait_received(
        &receiver,
        "login",
        &format!("keycloak:{}", login.sid),
        Duration::from_secs(5),
    )
    .await;
    realm.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impersonation_ends_when_the_administrators_session_ends() {
    let _room = keycloak::room(file!()).await;
    let Some(base) = keycloak::keycloak_url() else {
        return;
    };
    // The master realm's administrator impersonates alice: its own session (in master)
    // outlives the impersonation, and ending it ends everything it delegated.
    let _shared = KEYCLOAK.read().await;
    let realm = keycloak::events_realm(&base, "http://127.0.0.1:9", 1800).await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        Backend::Sqlite,
        options(&realm.name, &["master"], &receiver, dir.path()),
    )
    .await;
    realm.set_lockstep(&server.base).await;
    let master = keycloak::master_events(&base, &server.base).await;
    let api = server.api(&realm.name);

    let imp = realm.impersonate_as_master_admin(EV_ALICE.0).await;
    let mirror = format!("keycloak:{}", imp.session_id);
    let deadline = Instant::now() + Duration::from_secs(5);
    let recorded = loop {
        let (code, s) = api.get(&mirror).await;
        if code == StatusCode::OK {
            break s;
        }
        assert!(Instant::now() < deadline, "the impersonation never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        recorded["delegatedBy"],
        format!("keycloak:{}", imp.impersonator_sid)
    );
    let (code, app) = api.map_parent("crm-imp", &imp.session_id).await;
    assert_eq!(code, StatusCode::CREATED, "{app}");
    assert_eq!(app["delegatedBy"], mirror);
    assert_eq!(
        api.map_child("crm-imp-c", "crm-imp").await.0,
        StatusCode::CREATED
    );

    // The administrator's session ends in master: the delegated tree ends here.
    keycloak::delete_session(&base, "master", &imp.impersonator_sid).await;
    for (id, reason) in [
        (mirror.as_str(), "delegation_ended"),
        ("crm-imp", "delegation_ended"),
        ("crm-imp-c", "cascade"),
    ] {
        let s = wait_ended(&api, id, Duration::from_secs(10)).await;
        assert_eq!(s["endReason"], reason, "{id}");
        wait_received(&receiver, "logout", id, Duration::from_secs(5)).await;
    }
    master.restore().await;
    realm.delete().await;
}
