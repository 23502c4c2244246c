//! Single logout from Keycloak, against the real Keycloak of `cargo xtask keycloak start`:
//! a real login (authorization code flow, headless) gives a Keycloak session; Lockstep maps
//! it; Keycloak ends it (admin session delete, user logout) and its back-channel logout
//! reaches Lockstep, which ends the mapped tree. Admin API calls carry real Keycloak access
//! tokens. That test re-points the shared `portal` client's back-channel URL at its server, so
//! nothing else may use the `acme` realm beside it. Reconciliation finds the logouts Lockstep
//! was never told of, in a realm of its own that tells Lockstep nothing. Keycloak over HTTPS
//! (its second listener, with the xtask's test CA) is believed only through `--tls-ca-file`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::keycloak::{self, LOCKSTEP_CLIENT, NO_PERM_CLIENT, OPS_CLIENT, PORTAL_CLIENT, REALM};
use common::receiver::Receiver;
use common::{Api, Backend, Server, ServerOptions, assert_problem};
use reqwest::StatusCode;
use serde_json::{Value, json};

const USER: &str = "bob-logout";
const PASSWORD: &str = "bob-logout-password";

/// Creates the test's own user (so other Keycloak tests' users are untouched).
async fn ensure_user(base: &str) {
    let token = keycloak::admin_token(base).await;
    let res = keycloak::http()
        .post(format!("{base}/admin/realms/{REALM}/users"))
        .bearer_auth(token)
        .json(&json!({
            "username": USER, "enabled": true, "emailVerified": true,
            "email": format!("{USER}@example.com"), "firstName": "Bob", "lastName": "Logout",
            "credentials": [{"type": "password", "value": PASSWORD, "temporary": false}],
        }))
        .send()
        .await
        .unwrap();
    assert!(
        res.status() == StatusCode::CREATED || res.status() == StatusCode::CONFLICT,
        "create user: {}",
        res.status()
    );
}

async fn login(base: &str) -> keycloak::Login {
    keycloak::login(
        base,
        REALM,
        PORTAL_CLIENT.0,
        PORTAL_CLIENT.1,
        USER,
        PASSWORD,
    )
    .await
}

async fn wait_status(api: &Api, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = api.get(id).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        if body["status"] == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn map_tree(api: &Api, root: &str, sid: &str) {
    let body = json!({"externalId": root, "keycloakSessionId": sid, "userId": USER});
    assert_eq!(api.post("map-parent", body).await.0, StatusCode::CREATED);
    for child in ["a", "b"] {
        assert_eq!(
            api.map_child(&format!("{root}-{child}"), root).await.0,
            StatusCode::CREATED
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_logouts_reach_lockstep_and_keycloak_tokens_authorise_admin_calls() {
    let _room = keycloak::room(file!()).await;
    let Some(base) = keycloak::keycloak_url() else {
        eprintln!("LOCKSTEP_SKIP_KEYCLOAK=1: skipping");
        return;
    };
    ensure_user(&base).await;
    keycloak::logout_user(&base, REALM, USER).await;
    let issuer = keycloak::issuer(&base, REALM);
    let config = format!(
        "[realms.{REALM}]\nissuer = \"{issuer}\"\naudiences = [\"portal\", \"lockstep\"]\n\
         allowed_algs = [\"RS256\"]\nclock_skew_s = 30\n"
    );
    // The bundled Keycloak connector, so a logout in Lockstep reaches Keycloak too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keycloak.toml"),
        format!(
            "name = \"keycloak\"\ncomponent = \"{}\"\nrealms = [\"{REALM}\"]\n\
             events = [\"logout\", \"revoke\"]\nallowed_hosts = [\"{base}\"]\ntimeout_ms = 5000\n\
             [policy]\non_failure = \"retry\"\nmax_attempts = 5\nbackoff_ms = 100\nmax_backoff_ms = 1000\n\
             [config]\nbase_url = \"{base}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n",
            common::components::component("keycloak").display(),
            LOCKSTEP_CLIENT.0,
            LOCKSTEP_CLIENT.1,
        ),
    )
    .unwrap();
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            config: Some(config),
            connectors_dir: Some(dir.path().to_owned()),
            ..ServerOptions::default()
        },
    )
    .await;
    let api = server.api(REALM);
    let backchannel = format!("{}/realms/{REALM}/backchannel-logout", server.base);
    keycloak::set_backchannel_logout_url(&base, REALM, PORTAL_CLIENT.0, &backchannel).await;

    // 1. An administrator ends the Keycloak session: the mapped tree ends in Lockstep.
    let first = login(&base).await;
    map_tree(&api, "portal-1", &first.sid).await;
    let started = Instant::now();
    keycloak::delete_session(&base, REALM, &first.sid).await;
    let root = wait_status(&api, "portal-1", "DESTROYED").await;
    eprintln!(
        "Keycloak session delete → Lockstep tree ended in {:?}",
        started.elapsed()
    );
    assert_eq!(root["endReason"], "idp_logout");
    for child in ["portal-1-a", "portal-1-b"] {
        let s = wait_status(&api, child, "DESTROYED").await;
        assert_eq!(s["endReason"], "cascade");
    }
    let logout = server
        .outbox(REALM, "portal-1-a")
        .await
        .into_iter()
        .find(|e| e["type"] == "logout")
        .unwrap();
    assert_eq!(logout["originSystem"], "keycloak");
    // No ping-pong: the Keycloak connector does not get Keycloak's own logouts.
    let (_, echoed) = server
        .admin_get("/admin/deliveries?connector=keycloak&session=portal-1")
        .await;
    assert_eq!(echoed["items"], json!([]), "{echoed}");

    // 2. The user logs out everywhere (Keycloak's user logout): the same, by back-channel.
    let second = login(&base).await;
    map_tree(&api, "portal-2", &second.sid).await;
    keycloak::logout_user(&base, REALM, USER).await;
    wait_status(&api, "portal-2", "DESTROYED").await;
    wait_status(&api, "portal-2-b", "DESTROYED").await;

    // 3. A logout token really signed by Keycloak, captured on its way: accepted once, then a
    //    replay; tampering with it breaks the signature.
    let recorder = Receiver::start().await;
    keycloak::set_backchannel_logout_url(&base, REALM, PORTAL_CLIENT.0, &recorder.url("/bc")).await;
    let third = login(&base).await;
    map_tree(&api, "portal-3", &third.sid).await;
    keycloak::delete_session(&base, REALM, &third.sid).await;
    let got = recorder.wait_for(1, Duration::from_secs(20)).await;
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&got[0].body).unwrap();
    let token = form
        .into_iter()
        .find(|(k, _)| k == "logout_token")
        .map(|(_, v)| v)
        .unwrap();
    let claims = keycloak::claims(&token);
    assert_eq!(claims["sid"], third.sid.as_str());
    let parts: Vec<&str> = token.split('.').collect();
    let mut forged_claims = claims.clone();
    forged_claims["sid"] = json!("someone-else");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        common::b64url(forged_claims.to_string().as_bytes()),
        parts[2]
    );
    let (code, body, _) = server.backchannel_logout(REALM, &tampered).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(api.status_of("portal-3").await, "ACTIVE");
    server.assert_logout_ends(REALM, &token, 3).await;
    server
        .assert_logout_refused(REALM, &token, "already used")
        .await;
    keycloak::set_backchannel_logout_url(&base, REALM, PORTAL_CLIENT.0, &backchannel).await;

    // 4. Admin API calls with real Keycloak access tokens.
    let ops = keycloak::client_credentials(&base, REALM, OPS_CLIENT.0, OPS_CLIENT.1).await;
    let as_ops = server.api_as(REALM, &ops);
    assert_eq!(
        as_ops.map_parent("ops-1", "sid-x").await.0,
        StatusCode::CREATED
    );
    let no_perm =
        keycloak::client_credentials(&base, REALM, NO_PERM_CLIENT.0, NO_PERM_CLIENT.1).await;
    assert_problem(
        &server
            .api_as(REALM, &no_perm)
            .map_parent("np-1", "sid-y")
            .await,
        403,
        "FORBIDDEN",
    );
    assert_problem(
        &server
            .api_as("other", &ops)
            .map_parent("o-1", "sid-z")
            .await,
        403,
        "FORBIDDEN",
    );
    let ops_parts: Vec<&str> = ops.split('.').collect();
    let mut escalated = keycloak::claims(&ops);
    escalated["sub"] = json!("someone-else");
    let forged = format!(
        "{}.{}.{}",
        ops_parts[0],
        common::b64url(escalated.to_string().as_bytes()),
        ops_parts[2]
    );
    let master = keycloak::admin_token(&base).await; // another realm's issuer
    for (what, token) in [("forged", forged), ("other realm's token", master)] {
        let got = server.api_as(REALM, &token).map_parent("f-1", "sid").await;
        assert_eq!(got.0, StatusCode::UNAUTHORIZED, "{what}: {}", got.1);
    }

    // 5. Keycloak rotates its keys: tokens signed with the new key still verify (the cached
    //    key set is refetched for the unknown kid once the 10 s rate limit allows).
    let new_kid = keycloak::rotate_keys(&base, REALM).await;
    tokio::time::sleep(lockstep::oidc::jwks::MIN_REFETCH).await;
    let rotated = keycloak::client_credentials(&base, REALM, OPS_CLIENT.0, OPS_CLIENT.1).await;
    assert_eq!(keycloak::kid(&rotated), new_kid);
    assert_eq!(
        server
            .api_as(REALM, &rotated)
            .map_parent("ops-2", "sid-r")
            .await
            .0,
        StatusCode::CREATED
    );
    let fourth = login(&base).await;
    map_tree(&api, "portal-4", &fourth.sid).await;
    keycloak::delete_session(&base, REALM, &fourth.sid).await;
    wait_status(&api, "portal-4", "DESTROYED").await;

    // 6. destroy-parent in Lockstep ends the Keycloak session (Keycloak connector); the
    //    back-channel logout Keycloak then sends is accepted and changes nothing.
    let fifth = login(&base).await;
    map_tree(&api, "portal-5", &fifth.sid).await;
    let has_session = |sessions: &[Value]| sessions.iter().any(|s| s["id"] == fifth.sid.as_str());
    assert!(has_session(
        &keycloak::user_sessions(&base, REALM, USER).await
    ));
    let used_before = used_logout_tokens(&server).await;
    let (code, body) = api.destroy_parent("portal-5").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    while has_session(&keycloak::user_sessions(&base, REALM, USER).await) {
        assert!(
            Instant::now() < deadline,
            "the Keycloak session was never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "destroy-parent → Keycloak session gone in {:?}",
        started.elapsed()
    );
    while used_logout_tokens(&server).await == used_before {
        assert!(
            Instant::now() < deadline,
            "Keycloak's back-channel logout never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in ["portal-5", "portal-5-a", "portal-5-b"] {
        let logouts = server
            .outbox(REALM, id)
            .await
            .into_iter()
            .filter(|e| e["type"] == "logout")
            .count();
        assert_eq!(logouts, 1, "{id}: no duplicate logout event");
    }
    let (_, deliveries) = server
        .admin_get("/admin/deliveries?connector=keycloak&session=portal-5")
        .await;
    assert_eq!(
        deliveries["items"][0]["status"], "delivered",
        "{deliveries}"
    );

    keycloak::set_backchannel_logout_url(
        &base,
        REALM,
        PORTAL_CLIENT.0,
        "http://127.0.0.1:9/realms/acme/backchannel-logout",
    )
    .await;
}

/// The logout token of the next back-channel logout `recorder` receives.
async fn captured_logout_token(recorder: &Receiver) -> String {
    let got = recorder.wait_for(1, Duration::from_secs(20)).await;
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&got[0].body).unwrap();
    form.into_iter()
        .find(|(k, _)| k == "logout_token")
        .map(|(_, v)| v)
        .unwrap()
}

/// The real Keycloak over HTTPS: a session logged in on its HTTPS listener has the
/// `https://` issuer, and Keycloak's back-channel logout of it is verified with keys fetched
/// over TLS when `--tls-ca-file` names the test CA. Without the CA the same logout token is
/// refused and nothing ends; the token itself is sound, as the trusting server shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_over_https_logs_out_with_the_ca_file_and_is_refused_without_it() {
    let _room = keycloak::room(file!()).await;
    let Some(base) = keycloak::keycloak_url() else {
        eprintln!("LOCKSTEP_SKIP_KEYCLOAK=1: skipping");
        return;
    };
    let tls = keycloak::keycloak_https();
    // A realm of its own (the `acme` one is the first test's); its `portal` client gets a
    // back-channel logout URL below.
    let realm = keycloak::quiet_realm(&base).await;
    let name = realm.name.clone();
    let over_https = keycloak::EventsRealm {
        base: tls.base.clone(),
        name: name.clone(),
    };
    let (portal, portal_secret) = PORTAL_CLIENT;
    let (alice, alice_password) = keycloak::EV_ALICE;
    let issuer = keycloak::issuer(&tls.base, &name);
    assert!(issuer.starts_with("https://"), "{issuer}");
    let config = format!(
        "[realms.{name}]\nissuer = \"{issuer}\"\naudiences = [\"{portal}\"]\n\
         allowed_algs = [\"RS256\"]\nclock_skew_s = 30\n"
    );
    let trusting = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            config: Some(config.clone()),
            args: vec!["--tls-ca-file".into(), tls.ca_file.display().to_string()],
            ..ServerOptions::default()
        },
    )
    .await;
    let untrusting = Server::start_with(Backend::Sqlite, ServerOptions::with_config(config)).await;
    let api = trusting.api(&name);
    let stranger = untrusting.api(&name);

    // 1. Keycloak ends a session logged in over HTTPS (admin delete, over HTTPS too, so the
    //    logout token names the same issuer): the trusting server ends the mapped tree.
    keycloak::set_backchannel_logout_url(
        &base,
        &name,
        portal,
        &format!("{}/realms/{name}/backchannel-logout", trusting.base),
    )
    .await;
    let first = over_https
        .password_login(portal, portal_secret, alice, alice_password)
        .await;
    assert_eq!(keycloak::claims(&first.access_token)["iss"], json!(issuer));
    map_tree(&api, "tls-1", &first.sid).await;
    keycloak::delete_session(&tls.base, &name, &first.sid).await;
    let root = wait_status(&api, "tls-1", "DESTROYED").await;
    assert_eq!(root["endReason"], "idp_logout");
    for child in ["tls-1-a", "tls-1-b"] {
        assert_eq!(
            wait_status(&api, child, "DESTROYED").await["endReason"],
            "cascade"
        );
    }

    // 2. The next logout token, captured on its way, to both servers: the one without the CA
    //    cannot fetch the keys over TLS, refuses it, and ends nothing; the trusting one ends
    //    the tree with the very same token.
    let recorder = Receiver::start().await;
    keycloak::set_backchannel_logout_url(&base, &name, portal, &recorder.url("/bc")).await;
    let second = over_https
        .password_login(portal, portal_secret, alice, alice_password)
        .await;
    map_tree(&stranger, "tls-2", &second.sid).await;
    map_tree(&api, "tls-2", &second.sid).await;
    keycloak::delete_session(&tls.base, &name, &second.sid).await;
    let token = captured_logout_token(&recorder).await;
    let claims = keycloak::claims(&token);
    assert_eq!(
        (&claims["iss"], &claims["sid"]),
        (&json!(issuer), &json!(second.sid)),
        "{claims}"
    );
    untrusting
        .assert_logout_refused(&name, &token, "keys are unavailable")
        .await;
    for id in ["tls-2", "tls-2-a", "tls-2-b"] {
        assert_eq!(stranger.status_of(id).await, "ACTIVE", "{id}");
    }
    assert_eq!(used_logout_tokens(&untrusting).await, 0);
    trusting.assert_logout_ends(&name, &token, 3).await;

    drop((trusting, untrusting));
    realm.delete().await;
}

/// Logout tokens Lockstep has accepted (their `jti`s are kept for the replay window).
async fn used_logout_tokens(server: &Server) -> i64 {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(&server.database_url)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT COUNT(*) FROM logout_tokens")
        .fetch_one(&mut c)
        .await
        .unwrap()
}

/// `lockstep reconcile` that succeeds: its stdout, and how long it took.
async fn reconcile_ok(
    server: &Server,
    config: &str,
    realm: &str,
    dry_run: bool,
) -> (String, Duration) {
    let (out, took) = reconcile_cli(server, config, realm, dry_run).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, took)
}

/// `lockstep reconcile` against this server's database; returns its output and how long it
/// took.
async fn reconcile_cli(
    server: &Server,
    config: &str,
    realm: &str,
    dry_run: bool,
) -> (std::process::Output, Duration) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep"));
    cmd.args(["reconcile", "--realm", realm, "--database-url"])
        .arg(&server.database_url)
        .arg("--config")
        .arg(file.path())
        .env_remove("LOCKSTEP_CONFIG")
        .env("RUST_LOG", "error");
    if dry_run {
        cmd.arg("--dry-run");
    }
    let start = Instant::now();
    let out = cmd.output().await.unwrap();
    (out, start.elapsed())
}

fn calls_of(stdout: &str) -> u64 {
    let summary = stdout.lines().last().unwrap_or_default();
    let words: Vec<&str> = summary.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "calls")
        .unwrap_or_else(|| panic!("no call count in {summary:?}"));
    words[at - 1].parse().unwrap()
}

async fn session(api: &Api, id: &str) -> (String, String) {
    let (code, body) = api.get(id).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    (
        body["status"].as_str().unwrap().to_owned(),
        body["endReason"].as_str().unwrap_or("-").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_ends_trees_of_sessions_keycloak_ended_behind_lockstep_s_back_only() {
    let _room = keycloak::room(file!()).await;
    let Some(base) = keycloak::keycloak_url() else {
        eprintln!("LOCKSTEP_SKIP_KEYCLOAK=1: skipping");
        return;
    };
    let realm = keycloak::quiet_realm(&base).await;
    let name = realm.name.clone();
    let (portal, portal_secret) = PORTAL_CLIENT;
    let (alice, alice_password) = keycloak::EV_ALICE;
    let (ann, ann_password) = keycloak::EV_ANN;
    let alice_id = realm.user_id(alice).await;
    let ann_id = realm.user_id(ann).await;
    let gone = realm
        .password_login(portal, portal_secret, alice, alice_password)
        .await;
    let live = realm
        .password_login(portal, portal_secret, alice, alice_password)
        .await;
    let anns = realm
        .password_login(portal, portal_secret, ann, ann_password)
        .await;

    let issuer = keycloak::issuer(&base, &name);
    let (client, secret) = keycloak::RECONCILER_CLIENT;
    let config = |secret: &str, interval_s: u32| {
        format!(
            "[realms.{name}]\nissuer = \"{issuer}\"\naudiences = [\"portal\"]\n\
             [realms.{name}.reconcile]\nclient_id = \"{client}\"\nclient_secret = \"{secret}\"\n\
             interval_s = {interval_s}\ncalls_per_second = 4\nbatch = 2\n"
        )
    };
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions::with_config(config(secret, 0)),
    )
    .await;
    let api = server.api(&name);
    let map = |id: &str, sid: &str, user: &str, system: &str| json!({"externalId": id, "keycloakSessionId": sid, "userId": user, "system": system});
    for (body, child) in [
        (
            map("app-gone", &gone.sid, &alice_id, "portal"),
            "app-gone-a",
        ),
        (
            map("app-live", &live.sid, &alice_id, "portal"),
            "app-live-a",
        ),
        // The mirror of ann's session: its user id is Keycloak's own.
        (
            map(
                &format!("keycloak:{}", anns.sid),
                &anns.sid,
                &ann_id,
                "keycloak",
            ),
            "ann-a",
        ),
        // An application's own user id, which Keycloak does not know: no sure answer.
        (
            map("app-unsure", "no-such-sid", "alice@legacy", "portal"),
            "app-unsure-a",
        ),
    ] {
        let parent = body["externalId"].as_str().unwrap().to_owned();
        let (code, got) = api.post("map-parent", body).await;
        assert_eq!(code, StatusCode::CREATED, "{got}");
        assert_eq!(api.map_child(child, &parent).await.0, StatusCode::CREATED);
    }
    let ann_mirror = format!("keycloak:{}", anns.sid);

    // Behind Lockstep's back: the realm sends neither events nor back-channel logouts.
    keycloak::delete_session(&base, &name, &gone.sid).await;
    realm.delete_user(ann).await;
    let listed: Vec<Value> = keycloak::user_sessions(&base, &name, alice).await;
    assert_eq!(listed.len(), 1, "{listed:?}");

    // Refused credentials: the pass stops, fails, and ends nothing.
    let (out, _) = reconcile_cli(&server, &config("wrong-secret", 0), &name, false).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a refused secret must fail the command"
    );
    assert!(
        stderr.contains("refused the client credentials"),
        "{stderr}"
    );
    assert_eq!(session(&api, "app-gone").await.0, "ACTIVE");

    // Dry run: says what it would end, changes nothing.
    let (stdout, _) = reconcile_ok(&server, &config(secret, 0), &name, true).await;
    assert!(
        stdout.contains(&format!(
            "keycloak session {} is gone: would end app-gone",
            gone.sid
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("would end {ann_mirror}")),
        "{stdout}"
    );
    assert!(stdout.contains("dry run: nothing changed"), "{stdout}");
    for id in [
        "app-gone",
        "app-gone-a",
        "app-live",
        "app-live-a",
        ann_mirror.as_str(),
        "ann-a",
        "app-unsure",
    ] {
        assert_eq!(session(&api, id).await.0, "ACTIVE", "{id} after a dry run");
    }

    // For real: the two gone trees end, the live one and the unsure one stay.
    let (stdout, took) = reconcile_ok(&server, &config(secret, 0), &name, false).await;
    assert!(
        stdout.contains("3 PARENTs checked, 2 Keycloak sessions gone, 4 sessions ended, 1 left alone, 0 failed calls"),
        "{stdout}"
    );
    // A token and one call per user (alice, ann, alice@legacy), 4 a second at most.
    let calls = calls_of(&stdout);
    assert_eq!(calls, 4, "{stdout}");
    assert!(
        took >= Duration::from_millis(250 * (calls - 1)),
        "{calls} calls in {took:?} break the rate of 4 per second"
    );
    for (id, want) in [
        ("app-gone", ("DESTROYED", "reconciled")),
        ("app-gone-a", ("DESTROYED", "cascade")),
        (ann_mirror.as_str(), ("DESTROYED", "reconciled")),
        ("ann-a", ("DESTROYED", "cascade")),
        ("app-live", ("ACTIVE", "-")),
        ("app-live-a", ("ACTIVE", "-")),
        ("app-unsure", ("ACTIVE", "-")),
        ("app-unsure-a", ("ACTIVE", "-")),
    ] {
        let got = session(&api, id).await;
        assert_eq!((got.0.as_str(), got.1.as_str()), want, "{id}");
    }
    // Keycloak already ended it: the events say so, so its connector is not asked again.
    let events = server.outbox(&name, "app-gone-a").await;
    let logout = events.iter().find(|e| e["type"] == "logout").unwrap();
    assert_eq!(logout["originSystem"], json!("keycloak"), "{logout}");
    let (code, audit) = server
        .admin_get(&format!(
            "/admin/audit?realm={name}&actor=lockstep:reconciler"
        ))
        .await;
    assert_eq!(code, StatusCode::OK, "{audit}");
    let records = audit["items"].as_array().unwrap();
    assert_eq!(records.len(), 2, "{audit}");
    assert!(
        records.iter().all(|r| r["action"] == "reconcile"),
        "{audit}"
    );
    assert!(
        records.iter().any(|r| r["target"] == json!(gone.sid)),
        "{audit}"
    );
    // The live session was not touched in Keycloak either.
    let listed = keycloak::user_sessions(&base, &name, alice).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], json!(live.sid));

    // The service reconciles by itself every interval, and says so in /metrics.
    let (url, dir) = server.kill().await;
    let server = Server::start_on(
        Backend::Sqlite,
        url,
        dir,
        ServerOptions::with_config(config(secret, 1)),
    )
    .await;
    let api = server.api(&name);
    keycloak::delete_session(&base, &name, &live.sid).await;
    let ended = wait_status(&api, "app-live-a", "DESTROYED").await;
    assert_eq!(ended["endReason"], json!("cascade"));
    assert_eq!(
        session(&api, "app-live").await,
        ("DESTROYED".into(), "reconciled".into())
    );
    assert_eq!(session(&api, "app-unsure").await.0, "ACTIVE");
    let value = |metrics: &str, metric: &str| -> Option<f64> {
        let key = format!("{metric}{{realm=\"{name}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(|v| v.parse().unwrap())
    };
    // Counted when the pass is over, a moment after the destroy.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let text = server.metrics().await;
        if value(&text, "lockstep_reconcile_last_run_timestamp_seconds").unwrap_or(0.0) > 0.0
            && value(&text, "lockstep_reconcile_ended_total").unwrap_or(0.0) >= 2.0
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no finished pass in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let value = |metric: &str| value(&metrics, metric).unwrap();
    assert!(value("lockstep_reconcile_ended_total") >= 2.0);
    assert!(value("lockstep_reconcile_checked_total") >= 1.0);
    assert!(value("lockstep_reconcile_admin_calls_total") >= 2.0);
    assert_eq!(value("lockstep_reconcile_errors_total"), 0.0);
    assert!(value("lockstep_reconcile_last_run_timestamp_seconds") > 1.7e9);
    drop(server);
    realm.delete().await;
}

// ---- Shared Signals from Keycloak 26.7's SSF transmitter (`--features=ssf`) -------------

/// A realm of its own for the SSF receiver, made afresh through the Admin REST API.
const SSF_REALM: &str = "ssf-receiver";
const SSF_CLIENT: (&str, &str) = ("lockstep-ssf", "lockstep-ssf-secret");
const SSF_USER: (&str, &str) = ("carl", "carl-password");

async fn admin(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let token = keycloak::admin_token(base).await;
    let mut req = keycloak::http()
        .request(method, format!("{base}/admin/realms{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await.unwrap();
    let code = res.status();
    (code, res.json().await.unwrap_or(Value::Null))
}

/// The realm with the transmitter switched on (`ssf.transmitterEnabled`), user and admin
/// events going to the `ssf-events` listener, a login client, a user, and Lockstep's receiver
/// client: confidential with a service account, `ssf.enabled`, the optional scopes
/// `ssf.read` and `ssf.manage` (Keycloak creates them with the realm), every user's events
/// delivered (`ssf.defaultSubjects=ALL`) and `push_url` as the only push target allowed.
/// Returns the user's id.
async fn ssf_realm(base: &str, push_url: &str) -> String {
    use reqwest::Method;
    admin(base, Method::DELETE, &format!("/{SSF_REALM}"), None).await;
    let (code, body) = admin(
        base,
        Method::POST,
        "",
        Some(json!({
            "realm": SSF_REALM, "enabled": true, "sslRequired": "none",
            "eventsEnabled": true, "adminEventsEnabled": true,
            "eventsListeners": ["jboss-logging", "ssf-events"],
            "attributes": {"ssf.transmitterEnabled": "true"},
        })),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = admin(
        base,
        Method::POST,
        &format!("/{SSF_REALM}/users"),
        Some(json!({
            "username": SSF_USER.0, "enabled": true, "emailVerified": true,
            "email": "carl@example.com", "firstName": "Carl", "lastName": "Signals",
            "credentials": [{"type": "password", "value": SSF_USER.1, "temporary": false}],
        })),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let clients = [
        json!({"clientId": PORTAL_CLIENT.0, "secret": PORTAL_CLIENT.1, "publicClient": false,
               "standardFlowEnabled": true, "directAccessGrantsEnabled": true,
               "redirectUris": [keycloak::REDIRECT_URI]}),
        json!({"clientId": SSF_CLIENT.0, "secret": SSF_CLIENT.1, "publicClient": false,
               "serviceAccountsEnabled": true, "standardFlowEnabled": false,
               "attributes": {"ssf.enabled": "true", "ssf.defaultSubjects": "ALL",
                              "ssf.validPushUrls": push_url}}),
    ];
    for client in clients {
        let (code, body) = admin(
            base,
            Method::POST,
            &format!("/{SSF_REALM}/clients"),
            Some(client),
        )
        .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
    let (_, found) = admin(
        base,
        Method::GET,
        &format!("/{SSF_REALM}/clients?clientId={}", SSF_CLIENT.0),
        None,
    )
    .await;
    let client = found[0]["id"].as_str().unwrap().to_owned();
    let (_, scopes) = admin(
        base,
        Method::GET,
        &format!("/{SSF_REALM}/client-scopes"),
        None,
    )
    .await;
    for name in ["ssf.read", "ssf.manage"] {
        let scope = scopes
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("Keycloak made no {name} scope: is the ssf feature on?"));
        let path = format!(
            "/{SSF_REALM}/clients/{client}/optional-client-scopes/{}",
            scope["id"].as_str().unwrap()
        );
        assert_eq!(
            admin(base, Method::PUT, &path, None).await.0,
            StatusCode::NO_CONTENT
        );
    }
    let (_, users) = admin(
        base,
        Method::GET,
        &format!("/{SSF_REALM}/users?username={}&exact=true", SSF_USER.0),
        None,
    )
    .await;
    users[0]["id"].as_str().unwrap().to_owned()
}

fn ssf_config(base: &str, public_url: &str, delivery: &str) -> String {
    let issuer = keycloak::issuer(base, SSF_REALM);
    format!(
        "public_url = \"{public_url}\"\n[realms.{SSF_REALM}]\nissuer = \"{issuer}\"\n\
         audiences = [\"portal\"]\nclock_skew_s = 30\n\
         [[realms.{SSF_REALM}.ssf_transmitters]]\nissuer = \"{issuer}\"\nclient_id = \"{}\"\n\
         client_secret = \"{}\"\ndelivery = \"{delivery}\"\nsystem = \"keycloak-ssf\"\n\
         poll_interval_ms = 200\n",
        SSF_CLIENT.0, SSF_CLIENT.1
    )
}

async fn wait_stream(server: &Server, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = server
            .admin_get(&format!("/admin/realms/{SSF_REALM}/ssf/streams"))
            .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        if f(&body[0]) {
            return body[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the stream never became {what}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keycloak 26.7.3 as an SSF transmitter. Push: Lockstep creates its stream (push to its
/// `/realms/NAME/ssf/push` with a random Authorization value), asks for verification, and
/// Keycloak's verification SET reaches the push endpoint. Poll: at a restart with `delivery =
/// "poll"` Lockstep replaces that stream with a poll stream; a user's logout in Keycloak
/// becomes a CAEP session-revoked SET (a complex subject: user + Keycloak session id) that
/// Lockstep polls, verifies against Keycloak's keys and applies: the PARENT of that Keycloak
/// session and its legacy CHILD end (the user's other session stays) and the connector hears
/// both logouts; an administrator's password reset becomes a CAEP credential-change that ends
/// the rest with `revoke` events. Keycloak 26.7.3 delivers the push SETs of user events
/// through its outbox drainer, which fails in this server (it opens the file vault without
/// a realm in its context and retries forever), so logouts over push are tested against the
/// transmitter of `backchannel.rs` only; RISC events, which Keycloak 26.7.3 does not emit,
/// likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_shared_signals_reach_lockstep_by_push_and_poll() {
    let _room = keycloak::room(file!()).await;
    let Some(base) = keycloak::keycloak_url() else {
        eprintln!("LOCKSTEP_SKIP_KEYCLOAK=1: skipping");
        return;
    };
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let public_url = format!("http://{addr}");
    let user_id = ssf_realm(&base, &format!("{public_url}/realms/{SSF_REALM}/ssf/push")).await;

    let push = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            config: Some(ssf_config(&base, &public_url, "push")),
            listen: Some(addr.clone()),
            ..ServerOptions::default()
        },
    )
    .await;
    let view = wait_stream(&push, "verified", |s| s["verified"] == true).await;
    assert_eq!(
        (view["status"].as_str(), view["delivery"].as_str()),
        (Some("enabled"), Some("push")),
        "{view}"
    );
    let push_stream = view["streamId"].as_str().unwrap().to_owned();
    let metrics = push.metrics().await;
    assert!(
        metrics.contains(&format!(
            "lockstep_ssf_stream_verified{{realm=\"{SSF_REALM}\",transmitter=\"{}\"}} 1",
            keycloak::issuer(&base, SSF_REALM)
        )),
        "{metrics}"
    );
    drop(push);

    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    common::components::write_manifest(
        dir.path(),
        "legacy",
        "webhook",
        &format!(
            "realms = [\"{SSF_REALM}\"]\nallowed_hosts = [\"{}\"]\ntimeout_ms = 2000\n[config]\nurl = \"{}\"\nsecret = \"s3cret\"\n",
            receiver.origin(),
            receiver.url("/legacy")
        ),
    );
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            config: Some(ssf_config(&base, &public_url, "poll")),
            connectors_dir: Some(dir.path().to_owned()),
            listen: Some(addr),
            ..ServerOptions::default()
        },
    )
    .await;
    let view = wait_stream(&server, "verified over poll", |s| s["verified"] == true).await;
    assert_eq!(view["delivery"], "poll", "{view}");
    assert_ne!(
        view["streamId"].as_str(),
        Some(push_stream.as_str()),
        "the push stream was adopted"
    );

    let api = server.api(SSF_REALM);
    let login = |n: u8| {
        let base = base.clone();
        async move {
            let l = keycloak::login(
                &base,
                SSF_REALM,
                PORTAL_CLIENT.0,
                PORTAL_CLIENT.1,
                SSF_USER.0,
                SSF_USER.1,
            )
            .await;
            eprintln!("login {n}: Keycloak session {}", l.sid);
            l
        }
    };
    let first = login(1).await;
    let second = login(2).await;
    for (root, sid) in [("portal-1", &first.sid), ("portal-2", &second.sid)] {
        let body = json!({"externalId": root, "keycloakSessionId": sid, "userId": user_id});
        assert_eq!(api.post("map-parent", body).await.0, StatusCode::CREATED);
        assert_eq!(
            api.map_child(&format!("{root}-legacy"), root).await.0,
            StatusCode::CREATED
        );
    }
    receiver.wait_for(4, Duration::from_secs(10)).await;

    // The user logs out of the first session in Keycloak.
    let started = Instant::now();
    let res = keycloak::http()
        .post(format!(
            "{base}/realms/{SSF_REALM}/protocol/openid-connect/logout"
        ))
        .form(&[
            ("client_id", PORTAL_CLIENT.0),
            ("client_secret", PORTAL_CLIENT.1),
            ("refresh_token", first.refresh_token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let root = wait_status(&api, "portal-1", "DESTROYED").await;
    eprintln!(
        "Keycloak logout → SSF poll → Lockstep tree ended in {:?}",
        started.elapsed()
    );
    assert_eq!(root["endReason"], "idp_logout");
    let child = wait_status(&api, "portal-1-legacy", "DESTROYED").await;
    assert_eq!(child["endReason"], "cascade");
    assert_eq!(api.status_of("portal-2").await, "ACTIVE");
    let heard = receiver.wait_for(6, Duration::from_secs(10)).await;
    let logouts: Vec<(String, String)> = heard
        .iter()
        .skip(4)
        .map(|r| {
            let e = r.json();
            (
                e["type"].as_str().unwrap().to_owned(),
                e["externalId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        logouts.contains(&("logout".into(), "portal-1".into())),
        "{logouts:?}"
    );
    assert!(
        logouts.contains(&("logout".into(), "portal-1-legacy".into())),
        "{logouts:?}"
    );
    let events = server.outbox(SSF_REALM, "portal-1").await;
    assert_eq!(
        events.last().unwrap()["originSystem"],
        "keycloak-ssf",
        "{events:?}"
    );

    // An administrator resets the password: credential-change ends the rest, with `revoke`.
    let (code, body) = admin(
        &base,
        reqwest::Method::PUT,
        &format!("/{SSF_REALM}/users/{user_id}/reset-password"),
        Some(json!({"type": "password", "value": "carl-new-password", "temporary": false})),
    )
    .await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{body}");
    let root = wait_status(&api, "portal-2", "DESTROYED").await;
    assert_eq!(root["endReason"], "revoked");
    let types: Vec<String> = server
        .outbox(SSF_REALM, "portal-2")
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, ["login", "revoke", "logout"]);
    let view = wait_stream(&server, "counted", |s| {
        s["setsAccepted"].as_u64() >= Some(3)
    })
    .await;
    assert_eq!(view["setsRefused"], 0, "{view}");
}
