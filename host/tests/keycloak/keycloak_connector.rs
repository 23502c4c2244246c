//! The bundled Keycloak connector (`connectors/keycloak`): end to end against the real test
//! Keycloak (the real binary, a real login, the Admin API), and in the runtime against a fake
//! Keycloak on 127.0.0.1 that counts token requests and answers with chosen statuses.
//!
//! Everything that touches the Keycloak user alice stays in one test function: the tests of
//! this file run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode as AxumStatus, Uri};
use common::components::component;
use common::keycloak::{self, ALICE, ALICE_PASSWORD, LOCKSTEP_CLIENT, PORTAL_CLIENT, REALM};
use common::{Backend, Server, ServerOptions};
use lockstep::domain::{EndReason, EventType, SessionKind, SyncEvent};
use lockstep::runtime::manifest::Manifest;
use lockstep::runtime::{HookFailure, Runtime};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Bound on every wait for Keycloak or a delivery.
const WAIT: Duration = Duration::from_secs(15);

/// `scheme://host[:port]` of a URL (what `allowed_hosts` takes).
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let authority = rest.split('/').next().unwrap();
    format!("{scheme}://{authority}")
}

/// A manifest for the Keycloak connector named `name` in `dir`, fast retries.
fn write_manifest(dir: &Path, name: &str, base_url: &str, client: (&str, &str)) {
    let text = format!(
        r#"name = "{name}"
component = "{component}"
realms = ["{REALM}"]
events = ["logout", "revoke"]
allowed_hosts = ["{origin}"]
timeout_ms = 10000

[policy]
on_failure = "retry"
max_attempts = 5
backoff_ms = 100

[config]
base_url = "{base_url}"
realm = "{REALM}"
client_id = "{client_id}"
client_secret = "{client_secret}"
"#,
        component = component("keycloak").display(),
        origin = origin(base_url),
        client_id = client.0,
        client_secret = client.1,
    );
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

async fn start_with_connectors(dir: &Path, names: &[&str]) -> Server {
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            connectors_dir: Some(dir.to_owned()),
            ..Default::default()
        },
    )
    .await;
    // Events are routed only to connectors loaded when they happen.
    for name in names {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (code, body) = server.admin_get(&format!("/admin/connectors/{name}")).await;
            if code == StatusCode::OK && body["state"] == "active" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "connector {name} never loaded: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    server
}

/// Ids of alice's sessions as Keycloak's Admin API lists them.
async fn alice_sessions(kc: &str) -> HashSet<String> {
    keycloak::user_sessions(kc, REALM, ALICE)
        .await
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls Keycloak (bounded) until none of `sids` is among alice's sessions.
async fn wait_sessions_gone(kc: &str, sids: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let live = alice_sessions(kc).await;
        if sids.iter().all(|s| !live.contains(*s)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Keycloak still lists {sids:?} among alice's sessions {live:?} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn map_tree(server: &Server, parent: &str, sid: &str) {
    let api = server.api(REALM);
    let (code, body) = api
        .post(
            "map-parent",
            json!({"externalId": parent, "keycloakSessionId": sid, "userId": ALICE, "system": "portal"}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    for n in 1..=2 {
        let (code, body) = api
            .map_child(&format!("{parent}-service-{n}"), parent)
            .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
}

fn delivery_of<'a>(items: &'a [Value], external_id: &str) -> &'a Value {
    items
        .iter()
        .find(|d| d["externalId"] == external_id)
        .unwrap_or_else(|| panic!("no delivery for {external_id}: {items:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_a_parent_in_lockstep_ends_its_keycloak_session() {
    let _room = keycloak::room(file!()).await;
    let Some(kc) = keycloak::keycloak_url() else {
        eprintln!("LOCKSTEP_SKIP_KEYCLOAK=1: skipping the Keycloak connector end-to-end test");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), "keycloak", &kc, LOCKSTEP_CLIENT);
    let server = start_with_connectors(dir.path(), &["keycloak"]).await;
    let api = server.api(REALM);
    let (portal, portal_secret) = PORTAL_CLIENT;

    // alice logs in to the portal through Keycloak; the portal maps its session to hers.
    let sid = keycloak::login(&kc, REALM, portal, portal_secret, ALICE, ALICE_PASSWORD)
        .await
        .sid;
    map_tree(&server, "portal-session-kc-1", &sid).await;
    assert!(
        alice_sessions(&kc).await.contains(&sid),
        "Keycloak lists the session after the login"
    );

    // The portal logs her out: Lockstep ends the tree, the connector ends the Keycloak session.
    let (code, body) = api.destroy_parent("portal-session-kc-1").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["changed"].as_array().unwrap().len(), 3, "{body}");
    wait_sessions_gone(&kc, &[&sid]).await;
    let items = server
        .wait_deliveries("connector=keycloak", WAIT, |items| {
            items.len() == 3 && items.iter().all(|d| d["status"] == "delivered")
        })
        .await;
    // Only the PARENT's logout called Keycloak; the children's were no-ops, also delivered.
    let parent = delivery_of(&items, "portal-session-kc-1");
    assert_eq!(parent["eventType"], "logout");
    assert_eq!(parent["attempts"], 1, "{parent}");
    for n in 1..=2 {
        let child = delivery_of(&items, &format!("portal-session-kc-1-service-{n}"));
        assert_eq!(child["eventType"], "logout");
        assert_eq!(child["status"], "delivered");
    }

    // Destroying it again changes nothing and sends nothing.
    let (code, body) = api.destroy_parent("portal-session-kc-1").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], json!([]), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = server
        .admin_get("/admin/deliveries?connector=keycloak&limit=500")
        .await;
    assert_eq!(body["items"].as_array().unwrap().len(), 3, "{body}");

    // Two more logins; logging alice out everywhere in Lockstep ends both Keycloak sessions
    // (the second call reuses the cached token: the runtime test below counts requests).
    let mut sids = Vec::new();
    for n in 2..=3 {
        let sid = keycloak::login(&kc, REALM, portal, portal_secret, ALICE, ALICE_PASSWORD)
            .await
            .sid;
        map_tree(&server, &format!("portal-session-kc-{n}"), &sid).await;
        sids.push(sid);
    }
    let live = alice_sessions(&kc).await;
    assert!(
        sids.iter().all(|s| live.contains(s)),
        "{sids:?} in {live:?}"
    );
    let (code, body) = api.post("destroy-user", json!({"userId": ALICE})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["changed"].as_array().unwrap().len(), 6, "{body}");
    let sid_refs: Vec<&str> = sids.iter().map(String::as_str).collect();
    wait_sessions_gone(&kc, &sid_refs).await;
    server
        .wait_deliveries("connector=keycloak", WAIT, |items| {
            items.len() == 9 && items.iter().all(|d| d["status"] == "delivered")
        })
        .await;

    // Misconfigured connectors: a wrong client secret, and a service account without
    // realm-management manage-users. Both dead-letter at once, saying why; the Keycloak
    // session survives.
    let bad_dir = tempfile::tempdir().unwrap();
    write_manifest(
        bad_dir.path(),
        "kc-wrong-secret",
        &kc,
        (LOCKSTEP_CLIENT.0, "not-the-secret"),
    );
    write_manifest(bad_dir.path(), "kc-no-perm", &kc, keycloak::NO_PERM_CLIENT);
    let bad = start_with_connectors(bad_dir.path(), &["kc-wrong-secret", "kc-no-perm"]).await;
    let sid = keycloak::login(&kc, REALM, portal, portal_secret, ALICE, ALICE_PASSWORD)
        .await
        .sid;
    map_tree(&bad, "portal-session-kc-4", &sid).await;
    let (code, body) = bad.api(REALM).destroy_parent("portal-session-kc-4").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    for (connector, why) in [
        ("kc-wrong-secret", "client credentials"),
        ("kc-no-perm", "manage-users"),
    ] {
        let items = bad
            .wait_deliveries(&format!("connector={connector}"), WAIT, |items| {
                items.len() == 3 && items.iter().all(|d| d["status"] != "pending")
            })
            .await;
        let parent = delivery_of(&items, "portal-session-kc-4");
        assert_eq!(parent["status"], "dead", "{parent}");
        assert_eq!(parent["attempts"], 1, "a permanent failure: {parent}");
        let error = parent["lastError"].as_str().unwrap();
        assert!(error.contains(why), "{connector}: {error}");
        assert!(
            !error.contains("not-the-secret"),
            "no secret in errors: {error}"
        );
        for n in 1..=2 {
            let child = delivery_of(&items, &format!("portal-session-kc-4-service-{n}"));
            assert_eq!(child["status"], "delivered", "{child}");
        }
    }
    assert!(
        alice_sessions(&kc).await.contains(&sid),
        "a failed connector leaves the Keycloak session alone"
    );
    keycloak::delete_session(&kc, REALM, &sid).await;
}

// ---- The runtime against a fake Keycloak ------------------------------------------------

/// A stand-in for Keycloak's token endpoint and Admin API on 127.0.0.1: issues `tok-1`,
/// `tok-2`... by the client-credentials grant, answers session deletes with a chosen status,
/// or 401 for a token on its reject list. Records every request.
#[derive(Default)]
struct FakeState {
    token_requests: Mutex<Vec<(String, String)>>,
    deletes: Mutex<Vec<(String, String)>>,
    rejected: Mutex<HashSet<String>>,
    token_status: AtomicU16,
    delete_status: AtomicU16,
}

struct FakeKeycloak {
    addr: std::net::SocketAddr,
    state: Arc<FakeState>,
    _server: common::Loopback,
}

impl FakeKeycloak {
    async fn start() -> FakeKeycloak {
        let state = Arc::new(FakeState::default());
        state.token_status.store(200, Ordering::SeqCst);
        state.delete_status.store(204, Ordering::SeqCst);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(fake_keycloak)
            .with_state(state.clone());
        let server = common::serve(listener, app);
        FakeKeycloak {
            addr,
            state,
            _server: server,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (content type, form body) of each token request.
    fn token_requests(&self) -> Vec<(String, String)> {
        self.state.token_requests.lock().unwrap().clone()
    }

    /// (raw path, authorization) of each session delete.
    fn deletes(&self) -> Vec<(String, String)> {
        self.state.deletes.lock().unwrap().clone()
    }

    fn reject(&self, token: &str) {
        self.state.rejected.lock().unwrap().insert(token.to_owned());
    }
}

async fn fake_keycloak(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (AxumStatus, String) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let path = uri.path().to_owned();
    let status = |s: &AtomicU16| AxumStatus::from_u16(s.load(Ordering::SeqCst)).unwrap();
    if method == Method::POST && path == "/realms/acme/protocol/openid-connect/token" {
        let n = {
            let mut requests = state.token_requests.lock().unwrap();
            requests.push((
                header("content-type"),
                String::from_utf8_lossy(&body).into_owned(),
            ));
            requests.len()
        };
        let code = status(&state.token_status);
        if code != AxumStatus::OK {
            return (
                code,
                json!({"error": "unauthorized_client", "error_description": "Invalid client or Invalid client credentials"}).to_string(),
            );
        }
        let token =
            json!({"access_token": format!("tok-{n}"), "expires_in": 300, "token_type": "Bearer"});
        return (AxumStatus::OK, token.to_string());
    }
    if method == Method::DELETE && path.starts_with("/admin/realms/acme/sessions/") {
        let auth = header("authorization");
        state.deletes.lock().unwrap().push((path, auth.clone()));
        let token = auth.strip_prefix("Bearer ").unwrap_or_default();
        if state.rejected.lock().unwrap().contains(token) {
            return (AxumStatus::UNAUTHORIZED, String::new());
        }
        return (status(&state.delete_status), String::new());
    }
    (AxumStatus::NOT_FOUND, format!("unexpected {method} {path}"))
}

fn fake_manifest(kc: &FakeKeycloak, secret: &str) -> Manifest {
    let text = format!(
        r#"name = "keycloak"
component = "{}"
allowed_hosts = ["{}"]
timeout_ms = 5000
[config]
base_url = "{}"
client_id = "lockstep"
client_secret = "{secret}"
timeout_ms = "2000"
"#,
        component("keycloak").display(),
        kc.base_url(),
        kc.base_url(),
    );
    Manifest::parse(&text, Path::new("."), "keycloak").unwrap()
}

fn event(event_type: EventType, kind: SessionKind, sid: &str, origin: &str) -> SyncEvent {
    SyncEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        event_type,
        realm: "acme".into(),
        external_id: format!("portal-{sid}"),
        kind,
        idp_session_id: Some(sid.to_owned()),
        idp_client_session_id: None,
        user_id: Some("alice".into()),
        system: Some("portal".into()),
        origin_system: Some(origin.to_owned()),
        end_reason: Some(EndReason::Logout),
        attributes: Default::default(),
        expires_at: None,
        occurred_at: chrono::Utc::now(),
    }
}

fn logout(sid: &str) -> SyncEvent {
    event(EventType::Logout, SessionKind::Parent, sid, "portal")
}

fn runtime() -> Runtime {
    Runtime::new(Some(
        common::components::workspace().join("target/test-compile-cache"),
    ))
    .unwrap()
}

#[tokio::test]
async fn one_cached_token_serves_many_logouts_and_a_rejected_one_is_renewed_once() {
    let kc = FakeKeycloak::start().await;
    let runtime = runtime();
    let connector = runtime
        .load(fake_manifest(&kc, "se&cret=+ /%"))
        .await
        .unwrap();

    assert_eq!(runtime.call(&connector, &logout("sid-1")).await, Ok(()));
    let revoke = event(EventType::Revoke, SessionKind::Parent, "sid-2", "portal");
    assert_eq!(
        runtime.call(&connector, &revoke).await,
        Ok(()),
        "revoke ends it too"
    );
    let tokens = kc.token_requests();
    assert_eq!(tokens.len(), 1, "the second call used the cached token");
    assert_eq!(tokens[0].0, "application/x-www-form-urlencoded");
    assert_eq!(
        tokens[0].1,
        "grant_type=client_credentials&client_id=lockstep&client_secret=se%26cret%3D%2B%20%2F%25"
    );
    assert_eq!(
        kc.deletes(),
        [
            (
                "/admin/realms/acme/sessions/sid-1".to_owned(),
                "Bearer tok-1".to_owned()
            ),
            (
                "/admin/realms/acme/sessions/sid-2".to_owned(),
                "Bearer tok-1".to_owned()
            ),
        ]
    );

    // Keycloak stops accepting the cached token: it is dropped and the delete tried once more.
    kc.reject("tok-1");
    assert_eq!(runtime.call(&connector, &logout("sid/../3")).await, Ok(()));
    assert_eq!(kc.token_requests().len(), 2);
    let deletes = kc.deletes();
    assert_eq!(
        deletes[2..],
        [
            (
                "/admin/realms/acme/sessions/sid%2F..%2F3".to_owned(),
                "Bearer tok-1".to_owned()
            ),
            (
                "/admin/realms/acme/sessions/sid%2F..%2F3".to_owned(),
                "Bearer tok-2".to_owned()
            ),
        ]
    );
    assert_eq!(runtime.call(&connector, &logout("sid-4")).await, Ok(()));
    assert_eq!(kc.token_requests().len(), 2, "the renewed token is cached");
    assert_eq!(kc.deletes()[4].1, "Bearer tok-2");

    // A fresh token rejected as well: one renewal only, then a retry for later.
    kc.state.delete_status.store(401, Ordering::SeqCst);
    kc.reject("tok-2");
    let got = runtime.call(&connector, &logout("sid-5")).await;
    assert!(
        matches!(&got, Err(HookFailure::Retry(m)) if m.contains("401")),
        "{got:?}"
    );
    assert_eq!(kc.token_requests().len(), 3);
    assert_eq!(kc.deletes().len(), 7);
}

#[tokio::test]
async fn keycloak_answers_map_to_success_retry_or_fail() {
    let kc = FakeKeycloak::start().await;
    let runtime = runtime();
    let connector = runtime.load(fake_manifest(&kc, "secret")).await.unwrap();
    let call = |ev: SyncEvent| {
        let (runtime, connector) = (runtime.clone(), connector.clone());
        async move { runtime.call(&connector, &ev).await }
    };

    // Nothing to do: children, FIXED sessions, changes that came from Keycloak, logins.
    for ev in [
        event(EventType::Logout, SessionKind::Child, "sid-c", "portal"),
        event(EventType::Logout, SessionKind::Fixed, "sid-f", "portal"),
        event(EventType::Logout, SessionKind::Parent, "sid-k", "keycloak"),
        event(EventType::Login, SessionKind::Parent, "sid-l", "portal"),
    ] {
        assert_eq!(call(ev).await, Ok(()));
    }
    assert!(kc.token_requests().is_empty() && kc.deletes().is_empty());

    kc.state.delete_status.store(404, Ordering::SeqCst);
    assert_eq!(call(logout("gone")).await, Ok(()), "already gone is fine");
    for (status, retry) in [(500, true), (503, true), (429, true), (400, false)] {
        kc.state.delete_status.store(status, Ordering::SeqCst);
        let got = call(logout("sid")).await;
        match got {
            Err(HookFailure::Retry(m)) if retry => assert!(m.contains(&status.to_string())),
            Err(HookFailure::Fail(m)) if !retry => assert!(m.contains(&status.to_string())),
            other => panic!("HTTP {status}: {other:?}"),
        }
    }
    kc.state.delete_status.store(403, Ordering::SeqCst);
    let got = call(logout("sid")).await;
    assert!(
        matches!(&got, Err(HookFailure::Fail(m)) if m.contains("manage-users")),
        "{got:?}"
    );
    assert_eq!(
        kc.token_requests().len(),
        1,
        "every call used the cached token"
    );

    // The token endpoint: bad credentials fail, an outage retries (a new connector version
    // starts with an empty cache).
    let fresh = runtime.load(fake_manifest(&kc, "wrong")).await.unwrap();
    kc.state.token_status.store(401, Ordering::SeqCst);
    let got = runtime.call(&fresh, &logout("sid")).await;
    assert!(
        matches!(&got, Err(HookFailure::Fail(m)) if m.contains("client credentials") && !m.contains("wrong")),
        "{got:?}"
    );
    kc.state.token_status.store(503, Ordering::SeqCst);
    let got = runtime.call(&fresh, &logout("sid")).await;
    assert!(matches!(&got, Err(HookFailure::Retry(_))), "{got:?}");

    // Keycloak unreachable: retry.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut down = fake_manifest(&kc, "secret");
    let url = format!("http://127.0.0.1:{port}");
    down.allowed_hosts = vec![lockstep::runtime::manifest::AllowedHost::parse(&url).unwrap()];
    down.config.insert("base_url".into(), url);
    let down = runtime.load(down).await.unwrap();
    let got = runtime.call(&down, &logout("sid")).await;
    assert!(matches!(&got, Err(HookFailure::Retry(_))), "{got:?}");
}
