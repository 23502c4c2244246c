//! Back-channel logout, admin access tokens and Global Token Revocation against a local
//! identity provider: a real HTTP
//! server on 127.0.0.1 that publishes a discovery document and a JWKS, with tokens signed by
//! the test (keys in `tests/fixtures/oidc/`). This checks every verification rule one by one
//! without Keycloak; `keycloak.rs` runs the same flows against a real Keycloak. The same file
//! holds a Shared Signals (SSF 1.0) transmitter written here from the specifications (stream
//! management, push per RFC 8935, poll per RFC 8936, SETs per RFC 8417 signed with the
//! fixture keys), independent of Lockstep's receiver code, for what Keycloak's transmitter
//! does not send: RISC events, poll acknowledgements and `setErrs`, and forged SETs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::routing::get;
use common::components::workspace;
use common::{Backend, Server, ServerOptions, assert_problem};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    an_ssf_push_stream_is_set_up_verified_and_refuses_forged_sets,
    an_ssf_poll_stream_acknowledges_sets_and_reports_refusals,
    concurrent_ssf_pushes_each_get_their_own_outcome,
    a_verified_logout_token_ends_the_mapped_tree_once,
    global_token_revocation_by_an_api_key_ends_every_session_of_the_user,
    global_token_revocation_by_a_signed_jwt_is_accepted_once,
);

/// The keys of an `https://` issuer are fetched over TLS, trusting the bundled roots plus
/// `[tls] ca_file`; an IdP whose certificate chains to neither is not believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_tokens_verify_against_an_https_idp_trusted_through_the_ca_file() {
    let ca = TestCa::new();
    let idp = Idp::start_tls(&ca).await;
    let with_ca = format!(
        "{}[tls]\nca_file = {:?}\n",
        idp.config(),
        ca.pem_path().display().to_string()
    );
    let server = Server::start_with(Backend::Sqlite, ServerOptions::with_config(with_ca)).await;
    let api = server.api("acme");
    assert_eq!(
        api.map_parent("portal-1", "kc-sid-1").await.0,
        StatusCode::CREATED
    );
    let token = sign("a", "test-a", &logout_claims(&idp, Some("kc-sid-1"), None));
    server.assert_logout_ends("acme", &token, 1).await;

    // Without the CA the same IdP is a stranger: the token cannot be checked, nothing ends.
    let untrusting = server_with(Backend::Sqlite, &idp).await;
    let api = untrusting.api("acme");
    assert_eq!(
        api.map_parent("portal-1", "kc-sid-1").await.0,
        StatusCode::CREATED
    );
    let token = sign("a", "test-a", &logout_claims(&idp, Some("kc-sid-1"), None));
    let (description, _) = untrusting
        .assert_logout_refused("acme", &token, "keys are unavailable")
        .await;
    // The refusal does not tell an unauthenticated caller the IdP's address.
    assert!(!description.contains("127.0.0.1"), "{description}");
    assert_eq!(api.status_of("portal-1").await, "ACTIVE");
}

/// A local IdP: discovery + JWKS, with keys that can be rotated.
struct Idp {
    issuer: String,
    keys: Arc<Mutex<Vec<Value>>>,
    _server: common::Loopback,
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(workspace().join("tests/fixtures/oidc").join(name)).unwrap()
}

fn jwk(name: &str) -> Value {
    serde_json::from_str(&fixture(&format!("test-rsa-{name}.jwk.json"))).unwrap()
}

impl Idp {
    async fn start() -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}/realms/acme", listener.local_addr().unwrap());
        let keys = Arc::new(Mutex::new(vec![jwk("a")]));
        let server = common::serve(listener, idp_app(&issuer, &keys));
        Idp {
            issuer,
            keys,
            _server: server,
        }
    }

    /// The same IdP over HTTPS, with a certificate for 127.0.0.1 issued by `ca`.
    async fn start_tls(ca: &TestCa) -> Idp {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("https://{}/realms/acme", tcp.local_addr().unwrap());
        let keys = Arc::new(Mutex::new(vec![jwk("a")]));
        let listener = TlsListener {
            tcp,
            acceptor: ca.acceptor_for_loopback(),
        };
        let server = common::serve(listener, idp_app(&issuer, &keys));
        Idp {
            issuer,
            keys,
            _server: server,
        }
    }

    fn config(&self) -> String {
        format!(
            "[realms.acme]\nissuer = \"{}\"\naudiences = [\"lockstep\"]\nallowed_algs = [\"RS256\"]\nclock_skew_s = 30\n",
            self.issuer
        )
    }
}

fn idp_app(issuer: &str, keys: &Arc<Mutex<Vec<Value>>>) -> axum::Router {
    let (discovery, jwks) = (issuer.to_owned(), keys.clone());
    axum::Router::new()
        .route(
            "/realms/acme/.well-known/openid-configuration",
            get(move || {
                let issuer = discovery.clone();
                async move { Json(json!({"issuer": issuer, "jwks_uri": format!("{issuer}/certs")})) }
            }),
        )
        .route(
            "/realms/acme/certs",
            get(move || {
                let keys = jwks.lock().unwrap().clone();
                async move { Json(json!({ "keys": keys })) }
            }),
        )
}

/// A certificate authority made for one test, written as PEM for `[tls] ca_file`.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lockstep test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).unwrap();
        TestCa { issuer, dir }
    }

    fn pem_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn acceptor_for_loopback(&self) -> tokio_rustls::TlsAcceptor {
        use tokio_rustls::rustls;
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// Loopback TCP with a TLS handshake per connection, for axum.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = axum::serve::Listener::accept(&mut self.tcp).await;
            // A client that distrusts the certificate aborts the handshake: wait for the next.
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn sign(key: &str, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("logout+jwt".into());
    let key =
        EncodingKey::from_rsa_pem(fixture(&format!("test-rsa-{key}.pem")).as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn logout_claims(idp: &Idp, sid: Option<&str>, sub: Option<&str>) -> Value {
    let mut c = json!({
        "iss": idp.issuer,
        "aud": "lockstep",
        "iat": now(),
        "exp": now() + 120,
        "jti": uuid::Uuid::new_v4().to_string(),
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    });
    if let Some(sid) = sid {
        c["sid"] = json!(sid);
    }
    if let Some(sub) = sub {
        c["sub"] = json!(sub);
    }
    c
}

async fn server_with(backend: Backend, idp: &Idp) -> Server {
    Server::start_with(backend, ServerOptions::with_config(idp.config())).await
}

async fn a_verified_logout_token_ends_the_mapped_tree_once(backend: Backend) {
    let idp = Idp::start().await;
    let server = server_with(backend, &idp).await;
    let api = server.api("acme");
    assert_eq!(
        api.map_parent("portal-1", "kc-sid-1").await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.map_child("svc-a", "portal-1").await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.map_child("svc-b", "portal-1").await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.map_parent("other", "kc-sid-2").await.0,
        StatusCode::CREATED
    );

    let token = sign("a", "test-a", &logout_claims(&idp, Some("kc-sid-1"), None));
    let cache = server.assert_logout_ends("acme", &token, 3).await;
    assert_eq!(cache, "no-store");
    for (id, reason) in [
        ("portal-1", "idp_logout"),
        ("svc-a", "cascade"),
        ("svc-b", "cascade"),
    ] {
        let (_, s) = api.get(id).await;
        assert_eq!(s["status"], "DESTROYED", "{s}");
        assert_eq!(s["endReason"], reason, "{s}");
    }
    assert_eq!(api.status_of("other").await, "ACTIVE");
    // Connectors get the logouts, marked as coming from the IdP (no echo to `keycloak`).
    let events = server.outbox("acme", "svc-a").await;
    let logout = events.iter().find(|e| e["type"] == "logout").unwrap();
    assert_eq!(logout["originSystem"], "keycloak");

    // The same token again: refused, nothing written.
    let outbox = server.outbox_total().await;
    let (_, cache) = server
        .assert_logout_refused("acme", &token, "already used")
        .await;
    assert_eq!(cache, "no-store");
    // A fresh token for the same session: accepted, changes nothing (idempotent).
    let again = sign("a", "test-a", &logout_claims(&idp, Some("kc-sid-1"), None));
    server.assert_logout_ends("acme", &again, 0).await;
    assert_eq!(server.outbox_total().await, outbox);

    // By `sub`: every session of the user.
    let body = json!({"externalId": "u1", "keycloakSessionId": "kc-sid-9", "userId": "alice"});
    assert_eq!(api.post("map-parent", body).await.0, StatusCode::CREATED);
    let by_sub = sign("a", "test-a", &logout_claims(&idp, None, Some("alice")));
    server.assert_logout_ends("acme", &by_sub, 1).await;

    // The audit log names the IdP as the actor, with what each logout did.
    assert_acme_audit(
        &server,
        "backchannel-logout",
        "idp:keycloak",
        &[
            ("kc-sid-1", "ok", Some(3)),
            ("kc-sid-1", "DUPLICATE_EVENT", None),
            ("kc-sid-1", "ok", Some(0)),
            ("alice", "ok", Some(1)),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_logout_tokens_are_refused_and_change_nothing() {
    let idp = Idp::start().await;
    let server = server_with(Backend::Sqlite, &idp).await;
    let api = server.api("acme");
    assert_eq!(api.map_parent("p", "kc-sid").await.0, StatusCode::CREATED);
    let good = || logout_claims(&idp, Some("kc-sid"), None);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good();
        f(&mut c);
        sign("a", "test-a", &c)
    };
    let valid = sign("a", "test-a", &good());
    let (h, p, _) = {
        let mut parts = valid.split('.');
        (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        )
    };
    let tampered_payload = {
        let mut c = good();
        c["sid"] = json!("someone-else");
        common::b64url(c.to_string().as_bytes())
    };
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("test-a".into());
        jsonwebtoken::encode(
            &header,
            &good(),
            &EncodingKey::from_secret(fixture("test-rsa-a.pub.pem").as_bytes()),
        )
        .unwrap()
    };
    let alg_none = format!(
        "{}.{}.",
        common::b64url(br#"{"alg":"none","typ":"JWT"}"#),
        common::b64url(good().to_string().as_bytes())
    );
    let cases: Vec<(&str, String)> = vec![
        (
            "bad signature",
            format!(
                "{h}.{tampered_payload}.{}",
                valid.split('.').nth(2).unwrap()
            ),
        ),
        ("unknown key", sign("b", "test-b", &good())),
        ("known kid, other key", sign("b", "test-a", &good())),
        ("alg none", alg_none),
        ("HS256 keyed with the public key", hs256_with_public_key),
        (
            "wrong iss",
            with(&|c| c["iss"] = json!("http://127.0.0.1:1/realms/acme")),
        ),
        ("wrong aud", with(&|c| c["aud"] = json!("someone-else"))),
        (
            "expired",
            with(&|c| {
                c["iat"] = json!(now() - 300);
                c["exp"] = json!(now() - 200);
            }),
        ),
        (
            "iat in the future",
            with(&|c| c["iat"] = json!(now() + 3_600)),
        ),
        (
            "too old",
            with(&|c| {
                c["iat"] = json!(now() - 3_600);
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
        (
            "no iat",
            with(&|c| {
                c.as_object_mut().unwrap().remove("iat");
            }),
        ),
        (
            "no events",
            with(&|c| {
                c.as_object_mut().unwrap().remove("events");
            }),
        ),
        (
            "other event",
            with(&|c| c["events"] = json!({"http://example.com/other": {}})),
        ),
        (
            "nonce present",
            with(&|c| c["nonce"] = json!("n-0S6_WzA2Mj")),
        ),
        (
            "neither sid nor sub",
            with(&|c| {
                c.as_object_mut().unwrap().remove("sid");
            }),
        ),
        (
            "no jti",
            with(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
        ),
        ("not a JWT", "not-a-jwt".to_owned()),
        ("two parts", format!("{h}.{p}")),
    ];
    for (what, token) in &cases {
        let (code, body, cache) = server.backchannel_logout("acme", token).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_eq!(body["error"], "invalid_request", "{what}: {body}");
        assert_eq!(cache, "no-store", "{what}");
    }
    // A realm without an IdP, a wrong media type, a missing token.
    let (code, _, _) = server.backchannel_logout("other", &valid).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let res = reqwest::Client::new()
        .post(format!("{}/realms/acme/backchannel-logout", server.base))
        .json(&json!({"logout_token": valid}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = reqwest::Client::new()
        .post(format!("{}/realms/acme/backchannel-logout", server.base))
        .form(&[("other", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(api.status_of("p").await, "ACTIVE", "nothing changed");
    // The genuine token still works afterwards.
    server.assert_logout_ends("acme", &valid, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_verify_after_a_refetch() {
    let idp = Idp::start().await;
    let server = server_with(Backend::Sqlite, &idp).await;
    let api = server.api("acme");
    assert_eq!(api.map_parent("p1", "sid-1").await.0, StatusCode::CREATED);
    assert_eq!(api.map_parent("p2", "sid-2").await.0, StatusCode::CREATED);
    let first = sign("a", "test-a", &logout_claims(&idp, Some("sid-1"), None));
    assert_eq!(
        server.backchannel_logout("acme", &first).await.0,
        StatusCode::OK
    );
    // The IdP rotates to key b (published before use, as Keycloak does). The cached set does
    // not hold it; the next token with the new kid makes the verifier fetch again, once the
    // rate limit since the last fetch (10 s) has passed.
    idp.keys.lock().unwrap().push(jwk("b"));
    tokio::time::sleep(lockstep::oidc::jwks::MIN_REFETCH).await;
    let rotated = sign("b", "test-b", &logout_claims(&idp, Some("sid-2"), None));
    server.assert_logout_ends("acme", &rotated, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_accept_verified_access_tokens_with_the_permission() {
    let idp = Idp::start().await;
    let server = server_with(Backend::Sqlite, &idp).await;
    let token = |f: &dyn Fn(&mut Value), key: &str, kid: &str| {
        let mut c = json!({
            "iss": idp.issuer, "aud": ["lockstep", "account"], "sub": "svc-ops", "azp": "ops-tool",
            "iat": now(), "exp": now() + 300,
            "resource_access": {"lockstep": {"roles": ["users:manage"]}},
        });
        f(&mut c);
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        let key =
            EncodingKey::from_rsa_pem(fixture(&format!("test-rsa-{key}.pem")).as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &c, &key).unwrap()
    };
    let map = |t: String| {
        let api = server.api_as("acme", &t);
        async move {
            api.map_parent(&format!("p-{}", uuid::Uuid::new_v4()), "sid")
                .await
        }
    };
    assert_eq!(
        map(token(&|_| {}, "a", "test-a")).await.0,
        StatusCode::CREATED
    );
    let by_scope = token(
        &|c| {
            c.as_object_mut().unwrap().remove("resource_access");
            c["scope"] = json!("openid users:manage");
        },
        "a",
        "test-a",
    );
    assert_eq!(map(by_scope).await.0, StatusCode::CREATED);
    let no_role = token(
        &|c| {
            c.as_object_mut().unwrap().remove("resource_access");
        },
        "a",
        "test-a",
    );
    assert_problem(&map(no_role.clone()).await, 403, "FORBIDDEN");
    // The token's realm only.
    let other_realm = server.api_as("other", &token(&|_| {}, "a", "test-a"));
    assert_problem(&other_realm.map_parent("x", "sid").await, 403, "FORBIDDEN");
    for (what, t) in [
        (
            "expired",
            token(&|c| c["exp"] = json!(now() - 120), "a", "test-a"),
        ),
        (
            "wrong audience",
            token(&|c| c["aud"] = json!("account"), "a", "test-a"),
        ),
        ("forged", token(&|_| {}, "b", "test-a")),
        (
            "unknown issuer",
            token(&|c| c["iss"] = json!("http://127.0.0.1:1/x"), "a", "test-a"),
        ),
    ] {
        assert_problem(&map(t).await, 401, "UNAUTHORIZED");
        let _ = what;
    }
    // Operator endpoints need connectors:manage across realms, which a token never carries.
    let (code, _) = send_get(&server, "/admin/connectors", &no_role).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
}

async fn send_get(server: &Server, path: &str, token: &str) -> (StatusCode, Value) {
    let res = reqwest::Client::new()
        .get(format!("{}{path}", server.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (res.status(), res.json().await.unwrap_or(Value::Null))
}

// --- Global Token Revocation ------------------------------------------------------------------
// The local IdP above doubles as the calling IdP (an Okta stand-in): its tokens are signed by
// the test with the fixture keys, independently of Lockstep's own code.

const PUBLIC_URL: &str = "https://lockstep.example.com";
const GTR_PATH: &str = "/realms/acme/global-token-revocation";

fn gtr_audience() -> String {
    format!("{PUBLIC_URL}{GTR_PATH}")
}

/// The IdP's realm, the same IdP as a trusted revocation caller, an API key for acme and one
/// for another realm, and no throttle of failed authentications (the forged tokens below are
/// many on purpose).
fn gtr_config(idp: &Idp) -> String {
    let key = |id: &str, realm: &str| {
        format!(
            "[[api_keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nrealms = [\"{realm}\"]\npermissions = [\"users:manage\"]\n",
            hex::encode(lockstep::auth::sha256(&format!("{id}-secret")))
        )
    };
    format!(
        "public_url = \"{PUBLIC_URL}/\"\n{}[[realms.acme.token_revocation_callers]]\nissuer = \"{}\"\nsystem = \"okta\"\nallowed_algs = [\"RS256\"]\n{}{}[limits]\nfailed_auth_per_minute = 0\n",
        idp.config(),
        idp.issuer,
        key("siem", "acme"),
        key("other-siem", "other"),
    )
}

fn gtr_claims(idp: &Idp) -> Value {
    json!({
        "iss": idp.issuer,
        "aud": gtr_audience(),
        "sub": "okta-universal-logout",
        "iat": now(),
        "exp": now() + 120,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

fn sign_gtr(key: &str, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key =
        EncodingKey::from_rsa_pem(fixture(&format!("test-rsa-{key}.pem")).as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

async fn revoke(
    server: &Server,
    realm: &str,
    bearer: Option<&str>,
    body: &Value,
) -> (StatusCode, Value, Option<String>) {
    let mut req = reqwest::Client::new()
        .post(format!(
            "{}/realms/{realm}/global-token-revocation",
            server.base
        ))
        .json(body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let cache = res
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = res.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, body, cache)
}

fn opaque(id: &str) -> Value {
    json!({"sub_id": {"format": "opaque", "id": id}})
}

async fn map_user(api: &common::Api, id: &str, sid: &str, user: &str) {
    let body =
        json!({"externalId": id, "keycloakSessionId": sid, "userId": user, "system": "portal"});
    assert_eq!(api.post("map-parent", body).await.0, StatusCode::CREATED);
}

async fn global_token_revocation_by_an_api_key_ends_every_session_of_the_user(backend: Backend) {
    let idp = Idp::start().await;
    let receiver = common::receiver::Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    common::components::webhook_manifest(dir.path(), "billing", &receiver, "", "");
    let server = Server::start_with(
        backend,
        ServerOptions {
            config: Some(gtr_config(&idp)),
            connectors_dir: Some(dir.path().to_owned()),
            ..ServerOptions::default()
        },
    )
    .await;
    let api = server.api("acme");
    map_user(&api, "p1", "kc-1", "alice").await;
    assert_eq!(api.map_child("c1", "p1").await.0, StatusCode::CREATED);
    // A child of another user (a service acting for alice): ended with her tree.
    let body = json!({"externalId": "c2", "parentExternalId": "c1", "userId": "svc"});
    assert_eq!(api.post("map-child", body).await.0, StatusCode::CREATED);
    map_user(&api, "p2", "kc-2", "alice").await;
    map_user(&api, "bob-1", "kc-3", "bob").await;
    receiver.wait_for(5, Duration::from_secs(10)).await;

    let (code, body, cache) = revoke(&server, "acme", Some("siem-secret"), &opaque("alice")).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(body, Value::Null);
    assert_eq!(cache, None);
    for (id, reason) in [
        ("p1", "revoked"),
        ("c1", "revoked"),
        ("c2", "cascade"),
        ("p2", "revoked"),
    ] {
        let (_, s) = api.get(id).await;
        assert_eq!(
            (s["status"].as_str(), s["endReason"].as_str()),
            (Some("DESTROYED"), Some(reason)),
            "{id}: {s}"
        );
    }
    assert_eq!(api.status_of("bob-1").await, "ACTIVE");

    // The connector hears, for each ended session, `revoke` and then `logout`.
    receiver.wait_for(13, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut by_session: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in receiver.requests().iter().skip(5) {
        let e = r.json();
        by_session
            .entry(e["externalId"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(receiver.requests().len(), 13, "one of each, no more");
    for id in ["p1", "c1", "c2", "p2"] {
        assert_eq!(by_session[id], ["revoke", "logout"], "{id}");
    }
    assert_eq!(by_session.len(), 4, "{by_session:?}");
    // The events come from the key's system: a connector named `siem` would not hear them.
    let events = server.outbox("acme", "p1").await;
    assert!(
        events.iter().skip(1).all(|e| e["originSystem"] == "siem"),
        "{events:?}"
    );

    // Again: the user is known, nothing is live, nothing changes.
    let outbox = server.outbox_total().await;
    let (code, _, _) = revoke(&server, "acme", Some("siem-secret"), &opaque("alice")).await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    assert_eq!(server.outbox_total().await, outbox);

    // `subject` (what Okta and Auth0 send) and the email format: a userId spelled as an address.
    map_user(&api, "carol-1", "kc-4", "carol@example.com").await;
    let body = json!({"subject": {"format": "email", "email": "carol@example.com"}});
    assert_eq!(
        revoke(&server, "acme", Some("siem-secret"), &body).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.status_of("carol-1").await, "DESTROYED");
    // iss_sub: the realm's own IdP names its users by sub; another issuer's users are unknown.
    map_user(&api, "dave-1", "kc-5", "dave").await;
    let foreign = json!({"sub_id": {"format": "iss_sub", "iss": "https://elsewhere.example.com", "sub": "dave"}});
    let (code, body, _) = revoke(&server, "acme", Some("siem-secret"), &foreign).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("user_not_found")),
        "{body}"
    );
    assert_eq!(api.status_of("dave-1").await, "ACTIVE");
    let own = json!({"sub_id": {"format": "iss_sub", "iss": idp.issuer, "sub": "dave"}});
    assert_eq!(
        revoke(&server, "acme", Some("siem-secret"), &own).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.status_of("dave-1").await, "DESTROYED");

    // Refusals, each changing nothing.
    let outbox = server.outbox_total().await;
    let (code, body, _) = revoke(&server, "acme", Some("siem-secret"), &opaque("nobody")).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("user_not_found")),
        "{body}"
    );
    let phone = json!({"sub_id": {"format": "phone_number", "phone_number": "+12065550100"}});
    let (code, body, _) = revoke(&server, "acme", Some("siem-secret"), &phone).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unsupported_subject_format")),
        "{body}"
    );
    let (code, body, _) = revoke(
        &server,
        "acme",
        Some("siem-secret"),
        &json!({"user": "bob"}),
    )
    .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "{body}"
    );
    let (code, body, _) = revoke(&server, "acme", Some("other-siem-secret"), &opaque("bob")).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("insufficient_scope")),
        "{body}"
    );
    let (code, body, _) = revoke(&server, "acme", None, &opaque("bob")).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token")),
        "{body}"
    );
    let (code, _, _) = revoke(&server, "acme", Some("wrong-secret"), &opaque("bob")).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(api.status_of("bob-1").await, "ACTIVE");
    assert_eq!(server.outbox_total().await, outbox);

    // The audit log names the caller, the user and what each call did.
    assert_acme_audit(
        &server,
        "global-token-revocation",
        "key:siem",
        &[
            ("alice", "ok", Some(4)),
            ("alice", "ok", Some(0)),
            ("carol@example.com", "ok", Some(1)),
            ("dave", "NOT_FOUND", None),
            ("dave", "ok", Some(1)),
            ("nobody", "NOT_FOUND", None),
        ],
    )
    .await;

    // The metadata document advertises the endpoint.
    let res = reqwest::get(format!(
        "{}/.well-known/oauth-authorization-server/realms/acme",
        server.base
    ))
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let meta: Value = res.json().await.unwrap();
    assert_eq!(meta["issuer"], format!("{PUBLIC_URL}/realms/acme"));
    assert_eq!(meta["global_token_revocation_endpoint"], gtr_audience());
    assert_eq!(
        meta["global_token_revocation_subject_formats_supported"],
        json!(["email", "iss_sub", "opaque"])
    );
}

async fn global_token_revocation_by_a_signed_jwt_is_accepted_once(backend: Backend) {
    let idp = Idp::start().await;
    let server = Server::start_with(backend, ServerOptions::with_config(gtr_config(&idp))).await;
    let api = server.api("acme");
    map_user(&api, "p1", "kc-1", "alice").await;
    assert_eq!(api.map_child("c1", "p1").await.0, StatusCode::CREATED);
    let token = sign_gtr("a", "test-a", &gtr_claims(&idp));
    let (code, body, _) = revoke(&server, "acme", Some(&token), &opaque("alice")).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(api.status_of("p1").await, "DESTROYED");
    assert_eq!(api.status_of("c1").await, "DESTROYED");
    let events = server.outbox("acme", "p1").await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["login", "revoke", "logout"]);
    assert!(
        events.iter().skip(1).all(|e| e["originSystem"] == "okta"),
        "{events:?}"
    );

    // The same token again is a replay, refused even though the call would change nothing.
    map_user(&api, "p2", "kc-2", "alice").await;
    let (code, body, _) = revoke(&server, "acme", Some(&token), &opaque("alice")).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token")),
        "{body}"
    );
    assert_eq!(api.status_of("p2").await, "ACTIVE");
    // An iss_sub of the calling IdP names the user too.
    let fresh = sign_gtr("a", "test-a", &gtr_claims(&idp));
    let own = json!({"subject": {"format": "iss_sub", "iss": idp.issuer, "sub": "alice"}});
    assert_eq!(
        revoke(&server, "acme", Some(&fresh), &own).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.status_of("p2").await, "DESTROYED");

    let audit = acme_audit(&server, "global-token-revocation").await;
    let results: Vec<(&str, &str)> = audit
        .iter()
        .map(|r| (r["actor"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        results,
        [
            ("idp:okta", "ok"),
            ("idp:okta", "DUPLICATE_EVENT"),
            ("idp:okta", "ok")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_global_token_revocation_tokens_are_refused_and_change_nothing() {
    let idp = Idp::start().await;
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions::with_config(gtr_config(&idp)),
    )
    .await;
    let api = server.api("acme");
    map_user(&api, "p1", "kc-1", "alice").await;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = gtr_claims(&idp);
        f(&mut c);
        sign_gtr("a", "test-a", &c)
    };
    let valid = sign_gtr("a", "test-a", &gtr_claims(&idp));
    let mut parts = valid.split('.');
    let (h, _, sig) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let tampered = {
        let mut c = gtr_claims(&idp);
        c["sub"] = json!("someone-else");
        format!("{h}.{}.{sig}", common::b64url(c.to_string().as_bytes()))
    };
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("test-a".into());
        jsonwebtoken::encode(
            &header,
            &gtr_claims(&idp),
            &EncodingKey::from_secret(fixture("test-rsa-a.pub.pem").as_bytes()),
        )
        .unwrap()
    };
    let alg_none = format!(
        "{}.{}.",
        common::b64url(br#"{"alg":"none","typ":"JWT"}"#),
        common::b64url(gtr_claims(&idp).to_string().as_bytes())
    );
    let replayed = sign_gtr("a", "test-a", &gtr_claims(&idp));
    map_user(&api, "bob-1", "kc-2", "bob").await;
    assert_eq!(
        revoke(&server, "acme", Some(&replayed), &opaque("bob"))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let cases: Vec<(&str, String)> = vec![
        ("bad signature", tampered),
        ("unknown kid", sign_gtr("b", "test-b", &gtr_claims(&idp))),
        (
            "known kid, other key",
            sign_gtr("b", "test-a", &gtr_claims(&idp)),
        ),
        ("alg none", alg_none),
        ("HS256 keyed with the public key", hs256_with_public_key),
        (
            "wrong iss",
            with(&|c| c["iss"] = json!("http://127.0.0.1:1/realms/acme")),
        ),
        ("wrong aud", with(&|c| c["aud"] = json!("lockstep"))),
        (
            "aud of another realm",
            with(&|c| {
                c["aud"] = json!(format!("{PUBLIC_URL}/realms/other/global-token-revocation"))
            }),
        ),
        (
            "expired",
            with(&|c| {
                c["iat"] = json!(now() - 300);
                c["exp"] = json!(now() - 200);
            }),
        ),
        ("exp too far", with(&|c| c["exp"] = json!(now() + 3_600))),
        (
            "lives longer than 5 minutes",
            with(&|c| {
                c["iat"] = json!(now() - 200);
                c["exp"] = json!(now() + 200);
            }),
        ),
        (
            "no exp",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
        (
            "iat in the future",
            with(&|c| c["iat"] = json!(now() + 3_600)),
        ),
        (
            "no jti",
            with(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
        ),
        ("replayed jti", replayed),
    ];
    let outbox = server.outbox_total().await;
    for (what, token) in &cases {
        let (code, body, cache) = revoke(&server, "acme", Some(token), &opaque("alice")).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"], "invalid_token", "{what}: {body}");
        assert_eq!(cache.as_deref(), Some("no-store"), "{what}");
    }
    assert_eq!(api.status_of("p1").await, "ACTIVE", "nothing changed");
    assert_eq!(server.outbox_total().await, outbox);
    // A caller of one realm is nobody in another.
    let other =
        with(&|c| c["aud"] = json!(format!("{PUBLIC_URL}/realms/other/global-token-revocation")));
    assert_eq!(
        revoke(&server, "other", Some(&other), &opaque("alice"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // The genuine token still works afterwards.
    assert_eq!(
        revoke(&server, "acme", Some(&valid), &opaque("alice"))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.status_of("p1").await, "DESTROYED");
}

/// An API client's revocation obeys `[limits] max_cascade` (422, nothing changed); the IdP's
/// order for the same user does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_clients_revocation_beyond_max_cascade_is_refused_whole() {
    let idp = Idp::start().await;
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions::with_config(format!("{}max_cascade = 2\n", gtr_config(&idp))),
    )
    .await;
    let api = server.api("acme");
    map_user(&api, "p1", "kc-1", "alice").await;
    map_user(&api, "p2", "kc-2", "alice").await;
    map_user(&api, "p3", "kc-3", "alice").await;
    let outbox = server.outbox_total().await;
    let (code, body, _) = revoke(&server, "acme", Some("siem-secret"), &opaque("alice")).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("unable_to_process")),
        "{body}"
    );
    assert_eq!(api.status_of("p1").await, "ACTIVE");
    assert_eq!(server.outbox_total().await, outbox);
    let token = sign_gtr("a", "test-a", &gtr_claims(&idp));
    let (code, body, _) = revoke(&server, "acme", Some(&token), &opaque("alice")).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{body}");
    for id in ["p1", "p2", "p3"] {
        assert_eq!(api.status_of(id).await, "DESTROYED", "{id}");
    }
}

// ---- Shared Signals: a transmitter written from the specifications ----------------------

const TX_CLIENT: &str = "lockstep-rx";
const TX_SECRET: &str = "lockstep-rx-secret";
const TX_TOKEN: &str = "tx-access-token";
const TX_AUD: &str = "https://lockstep.example/ssf-receiver";
const TX_PUSH_SECRET: &str = "ssf-push-secret-shared-by-every-instance";
const SESSION_REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
const CREDENTIAL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/credential-change";
const SESSIONS_REVOKED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/sessions-revoked";
const ACCOUNT_DISABLED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled";
const ACCOUNT_PURGED: &str = "https://schemas.openid.net/secevent/risc/event-type/account-purged";
const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
const STREAM_UPDATED: &str = "https://schemas.openid.net/secevent/ssf/event-type/stream-updated";

/// What the test transmitter holds: its one stream, the `state`s it was asked to verify
/// with, SETs waiting for a poll, and what polls acknowledged or refused.
#[derive(Default)]
struct TxState {
    stream: Option<Value>,
    verify_states: Vec<String>,
    queue: Vec<(String, String)>,
    acks: Vec<String>,
    errs: serde_json::Map<String, Value>,
}

/// An SSF transmitter on 127.0.0.1 (issuer `http://127.0.0.1:PORT/tx`), signing with the
/// fixture RSA key `a` (kid `test-a`) and a P-256 key made at start (kid `test-ec`).
struct Tx {
    issuer: String,
    state: Arc<Mutex<TxState>>,
    /// The P-256 key, PKCS #8.
    ec_der: Vec<u8>,
    _server: common::Loopback,
}

fn tx_authorized(headers: &axum::http::HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TX_TOKEN}"))
}

impl Tx {
    async fn start() -> Tx {
        use axum::http::{HeaderMap, StatusCode as S};
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}/tx", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(TxState::default()));
        let (meta_issuer, st) = (issuer.clone(), state.clone());
        let ec = rcgen::KeyPair::generate().unwrap();
        let raw = ec.public_key_raw().to_vec();
        let ec_jwk = json!({"kty": "EC", "crv": "P-256", "kid": "test-ec", "alg": "ES256", "use": "sig",
                            "x": common::b64url(&raw[1..33]), "y": common::b64url(&raw[33..65])});
        let keys = json!({"keys": [jwk("a"), ec_jwk]});
        let app = axum::Router::new()
            .route(
                "/tx/.well-known/ssf-configuration",
                get(move || {
                    let i = meta_issuer.clone();
                    async move {
                        Json(json!({
                            "spec_version": "1_0",
                            "issuer": i,
                            "jwks_uri": format!("{i}/certs"),
                            "delivery_methods_supported": ["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"],
                            "configuration_endpoint": format!("{i}/streams"),
                            "status_endpoint": format!("{i}/streams/status"),
                            "verification_endpoint": format!("{i}/verify"),
                            "critical_subject_members": ["user", "tenant"],
                            "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
                        }))
                    }
                }),
            )
            .route(
                "/tx/certs",
                get(move || {
                    let keys = keys.clone();
                    async move { Json(keys) }
                }),
            )
            .route(
                "/tx/token",
                axum::routing::post(|headers: HeaderMap| async move {
                    use base64::Engine;
                    let basic = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{TX_CLIENT}:{TX_SECRET}"))
                    );
                    if headers.get("authorization").and_then(|v| v.to_str().ok())
                        != Some(basic.as_str())
                    {
                        return (S::UNAUTHORIZED, Json(json!({"error": "invalid_client"})))
                            .into_response();
                    }
                    Json(json!({"access_token": TX_TOKEN, "token_type": "Bearer", "expires_in": 300}))
                        .into_response()
                }),
            )
            .route(
                "/tx/streams",
                get({
                    let st = st.clone();
                    move |headers: HeaderMap| {
                        let st = st.clone();
                        async move {
                            if !tx_authorized(&headers) {
                                return S::UNAUTHORIZED.into_response();
                            }
                            let stream = st.lock().unwrap().stream.clone();
                            Json(json!(stream.into_iter().collect::<Vec<_>>())).into_response()
                        }
                    }
                })
                .post({
                    let (st, i) = (st.clone(), issuer.clone());
                    move |headers: HeaderMap, Json(mut body): Json<Value>| {
                        let (st, i) = (st.clone(), i.clone());
                        async move {
                            if !tx_authorized(&headers) {
                                return S::UNAUTHORIZED.into_response();
                            }
                            body["stream_id"] = json!("tx-stream-1");
                            body["iss"] = json!(i);
                            body["aud"] = json!(TX_AUD);
                            if body["delivery"]["method"] == "urn:ietf:rfc:8936" {
                                body["delivery"]["endpoint_url"] = json!(format!("{i}/poll"));
                            }
                            st.lock().unwrap().stream = Some(body.clone());
                            (S::CREATED, Json(body)).into_response()
                        }
                    }
                })
                .patch({
                    let st = st.clone();
                    move |headers: HeaderMap, Json(body): Json<Value>| {
                        let st = st.clone();
                        async move {
                            if !tx_authorized(&headers) {
                                return S::UNAUTHORIZED.into_response();
                            }
                            let mut g = st.lock().unwrap();
                            let Some(stream) = g.stream.as_mut() else {
                                return S::NOT_FOUND.into_response();
                            };
                            for (k, v) in body.as_object().unwrap() {
                                if k == "delivery" && stream["delivery"]["endpoint_url"].is_string() && v.get("endpoint_url").is_none() {
                                    let url = stream["delivery"]["endpoint_url"].clone();
                                    stream[k] = v.clone();
                                    stream["delivery"]["endpoint_url"] = url;
                                } else {
                                    stream[k] = v.clone();
                                }
                            }
                            Json(stream.clone()).into_response()
                        }
                    }
                })
                .delete({
                    let st = st.clone();
                    move || {
                        let st = st.clone();
                        async move {
                            st.lock().unwrap().stream = None;
                            S::NO_CONTENT
                        }
                    }
                }),
            )
            .route(
                "/tx/streams/status",
                get(|| async { Json(json!({"stream_id": "tx-stream-1", "status": "enabled"})) }),
            )
            .route(
                "/tx/verify",
                axum::routing::post({
                    let st = st.clone();
                    move |headers: HeaderMap, Json(body): Json<Value>| {
                        let st = st.clone();
                        async move {
                            if !tx_authorized(&headers) {
                                return S::UNAUTHORIZED;
                            }
                            let state = body["state"].as_str().unwrap_or_default().to_owned();
                            st.lock().unwrap().verify_states.push(state);
                            S::NO_CONTENT
                        }
                    }
                }),
            )
            .route(
                "/tx/poll",
                axum::routing::post({
                    let st = st.clone();
                    move |headers: HeaderMap, Json(body): Json<Value>| {
                        let st = st.clone();
                        async move {
                            if !tx_authorized(&headers) {
                                return S::UNAUTHORIZED.into_response();
                            }
                            let mut g = st.lock().unwrap();
                            for a in body["ack"].as_array().into_iter().flatten() {
                                g.acks.push(a.as_str().unwrap().to_owned());
                            }
                            for (k, v) in body["setErrs"].as_object().into_iter().flatten() {
                                g.errs.insert(k.clone(), v.clone());
                            }
                            let max = body["maxEvents"].as_u64().unwrap_or(100) as usize;
                            let n = g.queue.len().min(max);
                            let sets: serde_json::Map<String, Value> = g
                                .queue
                                .drain(..n)
                                .map(|(jti, set)| (jti, json!(set)))
                                .collect();
                            Json(json!({"sets": sets, "moreAvailable": !g.queue.is_empty()}))
                                .into_response()
                        }
                    }
                }),
            );
        Tx {
            issuer,
            state,
            ec_der: ec.serialize_der(),
            _server: common::serve(listener, app),
        }
    }

    fn config(&self, delivery: &str, public_url: &str) -> String {
        format!(
            "public_url = \"{public_url}\"\n[realms.acme]\nclock_skew_s = 30\n\
             [[realms.acme.ssf_transmitters]]\nissuer = \"{i}\"\nclient_id = \"{TX_CLIENT}\"\n\
             client_secret = \"{TX_SECRET}\"\ntoken_url = \"{i}/token\"\ndelivery = \"{delivery}\"\n\
             system = \"ssf-tx\"\npoll_interval_ms = 100\nmax_set_age_s = 600\n{secret}",
            i = self.issuer,
            // Push streams share a configured secret (as instances behind one URL would).
            secret = if delivery == "push" {
                format!("push_secret = \"{TX_PUSH_SECRET}\"\n")
            } else {
                String::new()
            }
        )
    }

    /// The stream once Lockstep set it up and asked for its verification.
    async fn wait_stream(&self) -> (Value, String) {
        for _ in 0..200 {
            {
                let g = self.state.lock().unwrap();
                if let (Some(stream), Some(state)) = (&g.stream, g.verify_states.last()) {
                    return (stream.clone(), state.clone());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Lockstep never set up its stream");
    }

    fn claims(&self, event: &str, payload: Value, sub_id: Option<Value>) -> Value {
        let mut c = json!({
            "iss": self.issuer,
            "aud": TX_AUD,
            "iat": now(),
            "jti": uuid::Uuid::new_v4().to_string(),
            "events": {event: payload},
        });
        if let Some(sub_id) = sub_id {
            c["sub_id"] = sub_id;
        }
        c
    }
}

fn sign_set_es256(tx: &Tx, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("secevent+jwt".into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&tx.ec_der)).unwrap()
}

fn sign_set(key: &str, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("secevent+jwt".into());
    let key =
        EncodingKey::from_rsa_pem(fixture(&format!("test-rsa-{key}.pem")).as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// A JWT with a header written by hand (`alg: none`, no `typ`...), signed with key `a` when
/// the header says RS256, else with an empty or an HMAC signature.
fn sign_raw(header: &Value, claims: &Value) -> String {
    use common::b64url;
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = match header["alg"].as_str().unwrap() {
        "none" => String::new(),
        "HS256" => {
            // The classic confusion: the transmitter's public key used as an HMAC secret.
            use hmac::Mac;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(
                fixture("test-rsa-a.pub.pem").as_bytes(),
            )
            .unwrap();
            mac.update(input.as_bytes());
            b64url(&mac.finalize().into_bytes())
        }
        _ => {
            let key = EncodingKey::from_rsa_pem(fixture("test-rsa-a.pem").as_bytes()).unwrap();
            jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::RS256).unwrap()
        }
    };
    format!("{input}.{signature}")
}

/// SETs minted by `tests/fixtures/ssf/mint_sets.py` with jwcrypto, in order. The Python
/// with jwcrypto is `LOCKSTEP_TEST_PYTHON`, which `scripts/test.sh` sets up.
fn mint_with_jwcrypto(items: &[Value]) -> Vec<String> {
    use std::io::Write;
    let python = std::env::var("LOCKSTEP_TEST_PYTHON").expect(
        "LOCKSTEP_TEST_PYTHON names a Python with jwcrypto: run scripts/test.sh, which makes one",
    );
    let root = common::components::workspace();
    let spec = json!({
        "fixtures": root.join("tests/fixtures/oidc"),
        "items": items,
    });
    let mut child = std::process::Command::new(python)
        .arg(root.join("tests/fixtures/ssf/mint_sets.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mint_sets.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sets: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(sets.len(), items.len());
    sets
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

async fn ssf_server(backend: Backend, tx: &Tx, delivery: &str) -> Server {
    let addr = free_addr();
    Server::start_with(
        backend,
        ServerOptions {
            config: Some(tx.config(delivery, &format!("http://{addr}"))),
            listen: Some(addr),
            ..ServerOptions::default()
        },
    )
    .await
}

/// Answers the stream's verification request (its `state`) with a verification SET: 202.
async fn push_verification(tx: &Tx, stream: &Value, state: &str) {
    let verification = sign_set(
        "a",
        "test-a",
        &tx.claims(VERIFICATION, json!({"state": state}), None),
    );
    assert_eq!(
        push_set(stream, &verification, None).await.0,
        StatusCode::ACCEPTED
    );
}

async fn push_set(stream: &Value, set: &str, authorization: Option<&str>) -> (StatusCode, Value) {
    let url = stream["delivery"]["endpoint_url"].as_str().unwrap();
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/secevent+jwt")
        .body(set.to_owned());
    if let Some(a) = authorization.or(stream["delivery"]["authorization_header"].as_str()) {
        req = req.header("authorization", a);
    }
    let res = req.send().await.unwrap();
    let code = res.status();
    (code, res.json().await.unwrap_or(Value::Null))
}

async fn ssf_stream_view(server: &Server) -> Value {
    let (code, body) = server.admin_get("/admin/realms/acme/ssf/streams").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body[0].clone()
}

fn complex(user: &str, sid: &str, issuer: &str) -> Value {
    json!({"format": "complex",
           "user": {"format": "iss_sub", "iss": issuer, "sub": user},
           "session": {"format": "opaque", "id": sid}})
}

async fn an_ssf_push_stream_is_set_up_verified_and_refuses_forged_sets(backend: Backend) {
    let tx = Tx::start().await;
    let server = ssf_server(backend, &tx, "push").await;
    let (stream, state) = tx.wait_stream().await;
    assert_eq!(stream["delivery"]["method"], "urn:ietf:rfc:8935");
    assert!(
        stream["delivery"]["endpoint_url"]
            .as_str()
            .unwrap()
            .ends_with("/realms/acme/ssf/push"),
        "{stream}"
    );
    assert_eq!(stream["events_requested"].as_array().unwrap().len(), 5);
    assert_eq!(
        stream["delivery"]["authorization_header"],
        format!("Bearer {TX_PUSH_SECRET}")
    );
    push_verification(&tx, &stream, &state).await;
    let view = ssf_stream_view(&server).await;
    assert_eq!(
        (
            view["verified"].as_bool(),
            view["status"].as_str(),
            view["streamId"].as_str()
        ),
        (Some(true), Some("enabled"), Some("tx-stream-1")),
        "{view}"
    );

    let api = server.api("acme");
    map_user(&api, "p1", "kc-1", "alice").await;
    assert_eq!(api.map_child("c1", "p1").await.0, StatusCode::CREATED);
    map_user(&api, "p2", "kc-2", "alice").await;
    map_user(&api, "bob-1", "kc-3", "bob").await;
    let outbox = server.outbox_total().await;

    // Without the stream's Authorization, or with another, nothing is even read.
    let good = sign_set(
        "a",
        "test-a",
        &tx.claims(
            SESSION_REVOKED,
            json!({}),
            Some(complex("alice", "kc-1", &tx.issuer)),
        ),
    );
    let (code, body) = push_set(&stream, &good, Some("Bearer guessed")).await;
    assert_eq!(
        (code, body["err"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("authentication_failed"))
    );
    let res = reqwest::Client::new()
        .post(stream["delivery"]["endpoint_url"].as_str().unwrap())
        .header(
            "authorization",
            stream["delivery"]["authorization_header"].as_str().unwrap(),
        )
        .header("content-type", "application/json")
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let base = || {
        tx.claims(
            SESSION_REVOKED,
            json!({}),
            Some(complex("alice", "kc-1", &tx.issuer)),
        )
    };
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = base();
        f(&mut c);
        c
    };
    let rs256 = json!({"alg": "RS256", "kid": "test-a", "typ": "secevent+jwt"});
    let forged: Vec<(&str, String, &str)> = vec![
        (
            "bad signature",
            sign_set("b", "test-a", &base()),
            "invalid_key",
        ),
        ("unknown kid", sign_set("a", "nope", &base()), "invalid_key"),
        (
            "alg none",
            sign_raw(&json!({"alg": "none", "typ": "secevent+jwt"}), &base()),
            "invalid_key",
        ),
        (
            "HS256 with the public key",
            sign_raw(
                &json!({"alg": "HS256", "kid": "test-a", "typ": "secevent+jwt"}),
                &base(),
            ),
            "invalid_key",
        ),
        (
            "wrong iss",
            sign_set(
                "a",
                "test-a",
                &with(&|c| c["iss"] = json!("http://127.0.0.1:1/tx")),
            ),
            "invalid_issuer",
        ),
        (
            "wrong aud",
            sign_set("a", "test-a", &with(&|c| c["aud"] = json!("someone-else"))),
            "invalid_audience",
        ),
        (
            "sub present",
            sign_set("a", "test-a", &with(&|c| c["sub"] = json!("alice"))),
            "invalid_request",
        ),
        (
            "exp present",
            sign_set("a", "test-a", &with(&|c| c["exp"] = json!(now() + 60))),
            "invalid_request",
        ),
        (
            "typ missing",
            sign_raw(&json!({"alg": "RS256", "kid": "test-a"}), &base()),
            "invalid_request",
        ),
        (
            "stale iat",
            sign_set(
                "a",
                "test-a",
                &with(&|c| c["iat"] = json!(now() - 2 * 86_400)),
            ),
            "invalid_request",
        ),
        (
            "unknown critical subject member",
            sign_set(
                "a",
                "test-a",
                &with(&|c| c["sub_id"]["tenant"] = json!({"format": "opaque", "id": "t1"})),
            ),
            "invalid_request",
        ),
        (
            "subject in another realm",
            sign_set(
                "a",
                "test-a",
                &with(&|c| c["sub_id"]["user"]["iss"] = json!("http://127.0.0.1:1/realms/other")),
            ),
            "invalid_request",
        ),
        (
            "two events",
            sign_set(
                "a",
                "test-a",
                &with(&|c| c["events"][ACCOUNT_DISABLED] = json!({})),
            ),
            "invalid_request",
        ),
        ("not a JWT", "garbage".to_owned(), "invalid_request"),
        (
            "ES256 under the RSA key's kid",
            sign_set_es256(&tx, "test-a", &base()),
            "invalid_key",
        ),
        (
            "RS256 header, tampered payload",
            {
                let t = sign_raw(&rs256, &base());
                let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
                parts[1] = common::b64url(
                    with(&|c| c["sub_id"]["user"]["sub"] = json!("bob"))
                        .to_string()
                        .as_bytes(),
                );
                parts.join(".")
            },
            "invalid_key",
        ),
    ];
    for (what, set, err) in &forged {
        let (code, body) = push_set(&stream, set, None).await;
        assert_eq!(
            (code, body["err"].as_str()),
            (StatusCode::BAD_REQUEST, Some(*err)),
            "{what}: {body}"
        );
        assert!(body["description"].is_string(), "{what}: {body}");
    }
    for id in ["p1", "c1", "p2", "bob-1"] {
        assert_eq!(api.status_of(id).await, "ACTIVE", "{id}");
    }
    assert_eq!(
        server.outbox_total().await,
        outbox,
        "a refused SET wrote events"
    );

    // SETs minted by another JOSE implementation (Python's jwcrypto): its forgeries are
    // refused the same way, its genuine SET is applied.
    map_user(&api, "carol-1", "kc-4", "carol").await;
    let outbox = server.outbox_total().await;
    let carol = || {
        tx.claims(
            SESSION_REVOKED,
            json!({}),
            Some(complex("carol", "kc-4", &tx.issuer)),
        )
    };
    let item = |key: &str, alg: &str, kid: &str| json!({"key": key, "alg": alg, "kid": kid, "claims": carol()});
    let minted = mint_with_jwcrypto(&[
        item("test-rsa-b", "RS256", "test-a"),
        item("hmac:test-rsa-a.pub.pem", "HS256", "test-a"),
        item("test-rsa-a", "PS256", "test-a"),
        item("test-ec-a", "ES256", "test-ec"),
        item("test-rsa-a", "RS256", "test-a"),
    ]);
    let (genuine, forgeries) = minted.split_last().unwrap();
    for (i, set) in forgeries.iter().enumerate() {
        let (code, body) = push_set(&stream, set, None).await;
        assert_eq!(
            (code, body["err"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_key")),
            "jwcrypto forgery {i}: {body}"
        );
    }
    assert_eq!(api.status_of("carol-1").await, "ACTIVE");
    assert_eq!(
        server.outbox_total().await,
        outbox,
        "a refused SET wrote events"
    );
    assert_eq!(
        push_set(&stream, genuine, None).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(api.status_of("carol-1").await, "DESTROYED");

    // CAEP session-revoked with a session: the PARENTs of that Keycloak session id, and
    // their tree, end; the user's other session stays.
    assert_eq!(push_set(&stream, &good, None).await.0, StatusCode::ACCEPTED);
    assert_eq!(api.status_of("p1").await, "DESTROYED");
    assert_eq!(api.status_of("c1").await, "DESTROYED");
    assert_eq!(api.status_of("p2").await, "ACTIVE");
    let (_, p1) = api.get("p1").await;
    assert_eq!(p1["endReason"], "idp_logout");
    let events = server.outbox("acme", "p1").await;
    assert_eq!(events.last().unwrap()["type"], "logout");
    assert_eq!(events.last().unwrap()["originSystem"], "ssf-tx");
    // Delivered again (same jti): acknowledged, and nothing changes, not even for a new
    // PARENT of the same Keycloak session.
    map_user(&api, "p3", "kc-1", "alice").await;
    assert_eq!(push_set(&stream, &good, None).await.0, StatusCode::ACCEPTED);
    assert_eq!(api.status_of("p3").await, "ACTIVE");

    // CAEP credential-change: every session of the user, connectors told `revoke` too.
    let change = sign_set(
        "a",
        "test-a",
        &tx.claims(
            CREDENTIAL_CHANGE,
            json!({"credential_type": "password", "change_type": "update"}),
            Some(json!({"format": "iss_sub", "iss": tx.issuer, "sub": "alice"})),
        ),
    );
    assert_eq!(
        push_set(&stream, &change, None).await.0,
        StatusCode::ACCEPTED
    );
    let types: Vec<String> = server
        .outbox("acme", "p2")
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, ["login", "revoke", "logout"]);
    assert_eq!(api.status_of("p3").await, "DESTROYED");
    // RISC account-disabled (an opaque subject, signed with ES256): reason revoked.
    let disabled = sign_set_es256(
        &tx,
        "test-ec",
        &tx.claims(
            ACCOUNT_DISABLED,
            json!({}),
            Some(json!({"format": "opaque", "id": "bob"})),
        ),
    );
    assert_eq!(
        push_set(&stream, &disabled, None).await.0,
        StatusCode::ACCEPTED
    );
    let (_, bob) = api.get("bob-1").await;
    assert_eq!(
        (bob["status"].as_str(), bob["endReason"].as_str()),
        (Some("DESTROYED"), Some("revoked"))
    );

    // The transmitter pauses the stream: shown in the admin API and the metrics.
    let paused = sign_set(
        "a",
        "test-a",
        &tx.claims(
            STREAM_UPDATED,
            json!({"status": "paused", "reason": "maintenance"}),
            Some(json!({"format": "opaque", "id": "tx-stream-1"})),
        ),
    );
    assert_eq!(
        push_set(&stream, &paused, None).await.0,
        StatusCode::ACCEPTED
    );
    let view = ssf_stream_view(&server).await;
    assert_eq!(
        (view["status"].as_str(), view["reason"].as_str()),
        (Some("paused"), Some("maintenance")),
        "{view}"
    );
    assert_eq!(
        view["setsRefused"].as_u64(),
        Some((forged.len() + forgeries.len()) as u64),
        "{view}"
    );
    assert_eq!(view["setsReplayed"].as_u64(), Some(1), "{view}");
    let metrics = server.metrics().await;
    let label = format!("realm=\"acme\",transmitter=\"{}\"", tx.issuer);
    for line in [
        format!("lockstep_ssf_stream_status{{{label},status=\"paused\"}} 1"),
        format!("lockstep_ssf_stream_status{{{label},status=\"enabled\"}} 0"),
        format!("lockstep_ssf_stream_verified{{{label}}} 1"),
        format!(
            "lockstep_ssf_sets_total{{{label},outcome=\"refused\"}} {}",
            forged.len() + forgeries.len()
        ),
        format!("lockstep_ssf_sets_total{{{label},outcome=\"replayed\"}} 1"),
    ] {
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }
    // An operator has the stream set up again: adopted (the same stream, the same
    // configured secret), a new verification asked for.
    let (code, body) = server
        .admin_post("/admin/realms/acme/ssf/streams/refresh", json!({}))
        .await;
    assert_eq!(
        (code, body["streams"].as_u64()),
        (StatusCode::ACCEPTED, Some(1)),
        "{body}"
    );
    for _ in 0..200 {
        if tx.state.lock().unwrap().verify_states.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (renewed, state) = tx.wait_stream().await;
    assert_eq!(
        tx.state.lock().unwrap().verify_states.len(),
        2,
        "no new verification"
    );
    assert_eq!(renewed["stream_id"], "tx-stream-1");
    assert_eq!(
        renewed["delivery"]["authorization_header"],
        stream["delivery"]["authorization_header"]
    );
    assert_eq!(ssf_stream_view(&server).await["verified"], false);
    push_verification(&tx, &renewed, &state).await;
    assert_eq!(ssf_stream_view(&server).await["verified"], true);

    let audit = acme_audit(&server, "ssf:session-revoked").await;
    let results: Vec<(&str, &str)> = audit
        .iter()
        .map(|r| (r["actor"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    // carol's (minted by jwcrypto), alice's, alice's again.
    assert_eq!(
        results,
        [
            ("idp:ssf-tx", "ok"),
            ("idp:ssf-tx", "ok"),
            ("idp:ssf-tx", "DUPLICATE_EVENT")
        ]
    );
}

/// Realm acme's audit records of `action`, oldest first.
async fn acme_audit(server: &Server, action: &str) -> Vec<Value> {
    let (code, audit) = server
        .admin_get(&format!("/admin/audit?realm=acme&action={action}"))
        .await;
    assert_eq!(code, StatusCode::OK, "{audit}");
    let mut items = audit["items"].as_array().unwrap().clone();
    items.reverse();
    items
}

/// Asserts realm acme's audit records of `action`, oldest first: each by `actor`, with
/// (target, result, rows changed).
async fn assert_acme_audit(
    server: &Server,
    action: &str,
    actor: &str,
    want: &[(&str, &str, Option<i64>)],
) {
    let got: Vec<_> = acme_audit(server, action)
        .await
        .iter()
        .map(outcome)
        .collect();
    let want: Vec<_> = want
        .iter()
        .map(|(target, result, changed)| {
            (
                actor.to_owned(),
                (*target).to_owned(),
                (*result).to_owned(),
                *changed,
            )
        })
        .collect();
    assert_eq!(got, want);
}

/// What one audit record says: (actor, target, result, rows changed).
fn outcome(record: &Value) -> (String, String, String, Option<i64>) {
    let text = |k: &str| record[k].as_str().unwrap().to_owned();
    (
        text("actor"),
        text("target"),
        text("result"),
        record["changed"].as_i64(),
    )
}

/// SETs pushed at once (on PostgreSQL, committed together in batches) each get their own
/// outcome: every good one applied, a redelivered one acknowledged once more without a
/// second change, a forged one refused, and one the database fails to apply (a trigger
/// refuses its update) answered 503 without taking the others down with it; delivered
/// again once the database takes it, it is applied.
async fn concurrent_ssf_pushes_each_get_their_own_outcome(backend: Backend) {
    const GOOD: usize = 24;
    let tx = Tx::start().await;
    let server = ssf_server(backend, &tx, "push").await;
    let (stream, state) = tx.wait_stream().await;
    push_verification(&tx, &stream, &state).await;
    let api = server.api("acme");
    for i in 0..GOOD {
        map_user(&api, &format!("p{i}"), &format!("kc-{i}"), &format!("u{i}")).await;
    }
    map_user(&api, "poison", "kc-poison", "upoison").await;
    let trigger = match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER poison BEFORE UPDATE ON sessions FOR EACH ROW \
             WHEN OLD.external_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'poisoned'; END $$; \
             CREATE TRIGGER poison BEFORE UPDATE ON sessions FOR EACH ROW \
             WHEN (OLD.external_id = 'poison') EXECUTE FUNCTION poison();"
        }
    };
    server.exec_sql(trigger).await;

    let revoke = |sid: &str, user: &str| {
        sign_set(
            "a",
            "test-a",
            &tx.claims(
                SESSION_REVOKED,
                json!({}),
                Some(complex(user, sid, &tx.issuer)),
            ),
        )
    };
    let good: Vec<String> = (0..GOOD)
        .map(|i| revoke(&format!("kc-{i}"), &format!("u{i}")))
        .collect();
    let poison = revoke("kc-poison", "upoison");
    let forged = sign_set("b", "test-a", &tx.claims(SESSION_REVOKED, json!({}), None));
    // The first good SET twice, the poisoned one and the forged one in the middle.
    let mut sets: Vec<&str> = good.iter().map(String::as_str).collect();
    sets.insert(GOOD / 2, &poison);
    sets.insert(GOOD / 2, &forged);
    sets.push(&good[0]);
    let codes: Vec<StatusCode> =
        futures::future::join_all(sets.iter().map(|set| push_set(&stream, set, None)))
            .await
            .into_iter()
            .map(|(code, _)| code)
            .collect();
    for (set, code) in sets.iter().zip(&codes) {
        let expected = if *set == poison {
            StatusCode::SERVICE_UNAVAILABLE
        } else if *set == forged {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::ACCEPTED
        };
        assert_eq!(*code, expected, "{codes:?}");
    }
    for i in 0..GOOD {
        let (_, s) = api.get(&format!("p{i}")).await;
        assert_eq!(s["status"], "DESTROYED", "p{i}: {s}");
    }
    assert_eq!(api.get("poison").await.1["status"], "ACTIVE");
    let view = ssf_stream_view(&server).await;
    assert_eq!(
        (
            view["setsAccepted"].as_u64(),
            view["setsReplayed"].as_u64(),
            view["setsRefused"].as_u64()
        ),
        (Some(GOOD as u64 + 1), Some(1), Some(1)),
        "{view}"
    );
    // Its mapping's event and one logout: the redelivery changed nothing.
    assert_eq!(server.outbox("acme", "p0").await.len(), 2);

    // The transmitter delivers the refused-for-now SET again once the database takes it.
    let drop = match backend {
        Backend::Sqlite => "DROP TRIGGER poison",
        Backend::Postgres => "DROP TRIGGER poison ON sessions",
    };
    server.exec_sql(drop).await;
    assert_eq!(
        push_set(&stream, &poison, None).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(api.get("poison").await.1["status"], "DESTROYED");
}

async fn an_ssf_poll_stream_acknowledges_sets_and_reports_refusals(backend: Backend) {
    let tx = Tx::start().await;
    let server = ssf_server(backend, &tx, "poll").await;
    let (stream, state) = tx.wait_stream().await;
    assert_eq!(stream["delivery"]["method"], "urn:ietf:rfc:8936");
    let enqueue = |c: Value| {
        let jti = c["jti"].as_str().unwrap().to_owned();
        let set = sign_set("a", "test-a", &c);
        tx.state.lock().unwrap().queue.push((jti.clone(), set));
        jti
    };
    let acked = |jti: &str| {
        tx.state
            .lock()
            .unwrap()
            .acks
            .iter()
            .filter(|a| *a == jti)
            .count()
    };
    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}");
    }
    let v = enqueue(tx.claims(VERIFICATION, json!({"state": state}), None));
    until("the verification's ack", || acked(&v) == 1).await;
    assert_eq!(ssf_stream_view(&server).await["verified"], true);

    let api = server.api("acme");
    map_user(&api, "p1", "kc-1", "alice").await;
    assert_eq!(api.map_child("c1", "p1").await.0, StatusCode::CREATED);
    map_user(&api, "p2", "kc-2", "alice").await;
    map_user(&api, "carol-1", "kc-3", "carol").await;
    let outbox = server.outbox_total().await;

    // A forged SET is refused in setErrs with its code, never acknowledged, changes nothing.
    let mut wrong_aud = tx.claims(
        SESSIONS_REVOKED,
        json!({}),
        Some(json!({"format": "opaque", "id": "alice"})),
    );
    wrong_aud["aud"] = json!("someone-else");
    let bad = enqueue(wrong_aud);
    let mut stale = tx.claims(
        SESSIONS_REVOKED,
        json!({}),
        Some(json!({"format": "opaque", "id": "alice"})),
    );
    stale["iat"] = json!(now() - 86_400);
    let old = enqueue(stale);
    until("the setErrs", || {
        let g = tx.state.lock().unwrap();
        g.errs.contains_key(&bad) && g.errs.contains_key(&old)
    })
    .await;
    {
        let g = tx.state.lock().unwrap();
        assert_eq!(g.errs[&bad]["err"], "invalid_audience");
        assert_eq!(g.errs[&old]["err"], "invalid_request");
        assert!(!g.acks.contains(&bad) && !g.acks.contains(&old));
    }
    assert_eq!(api.status_of("p1").await, "ACTIVE");
    assert_eq!(server.outbox_total().await, outbox);

    // RISC sessions-revoked: every session of the user (reason idp_logout), acknowledged.
    let revoked = tx.claims(
        SESSIONS_REVOKED,
        json!({}),
        Some(json!({"format": "opaque", "id": "alice"})),
    );
    let good = enqueue(revoked.clone());
    until("the ack", || acked(&good) == 1).await;
    for id in ["p1", "c1", "p2"] {
        assert_eq!(api.status_of(id).await, "DESTROYED", "{id}");
    }
    // Delivered again: acknowledged again, nothing changes.
    map_user(&api, "p3", "kc-4", "alice").await;
    let set = sign_set("a", "test-a", &revoked);
    tx.state.lock().unwrap().queue.push((good.clone(), set));
    until("the second ack", || acked(&good) == 2).await;
    assert_eq!(api.status_of("p3").await, "ACTIVE");

    // Users and Keycloak sessions Lockstep never mapped: acknowledged, nothing to end.
    let strangers = [
        enqueue(tx.claims(
            SESSIONS_REVOKED,
            json!({}),
            Some(json!({"format": "opaque", "id": "nobody"})),
        )),
        enqueue(tx.claims(
            SESSION_REVOKED,
            json!({}),
            Some(complex("nobody", "kc-unknown", &tx.issuer)),
        )),
    ];
    until("the strangers' acks", || {
        strangers.iter().all(|j| acked(j) == 1)
    })
    .await;

    // RISC account-purged: reason admin.
    let purged = enqueue(tx.claims(
        ACCOUNT_PURGED,
        json!({}),
        Some(json!({"format": "email", "email": "carol"})),
    ));
    until("the purge's ack", || acked(&purged) == 1).await;
    let (_, carol) = api.get("carol-1").await;
    assert_eq!(
        (carol["status"].as_str(), carol["endReason"].as_str()),
        (Some("DESTROYED"), Some("admin"))
    );
    let view = ssf_stream_view(&server).await;
    assert_eq!(
        (
            view["delivery"].as_str(),
            view["setsRefused"].as_u64(),
            view["setsReplayed"].as_u64()
        ),
        (Some("poll"), Some(2), Some(1)),
        "{view}"
    );
}
