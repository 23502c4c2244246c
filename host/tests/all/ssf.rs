//! Lockstep as a Shared Signals (SSF 1.0) transmitter, against a receiver written here from
//! the specifications (RFC 8417 SETs, RFC 8935 push, RFC 8936 poll, CAEP session events): it
//! shares no code with Lockstep, fetches Lockstep's JWKS over HTTP on 127.0.0.1 and verifies
//! every SET with `jsonwebtoken` (`typ`, `iss`, `aud`, `jti`, the event's claims).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::{Backend, Server, ServerOptions, TOKEN};
use serde_json::{Value, json};

const REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
const ESTABLISHED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-established";
const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
const PUSH: &str = "urn:ietf:rfc:8935";
const POLL: &str = "urn:ietf:rfc:8936";

fn hex_sha256(s: &str) -> String {
    hex::encode(lockstep::auth::sha256(s))
}

/// A server whose `public_url` is its own address, with keys: `rx-acme` (`ssf:manage` in
/// acme), `rx-other` (`ssf:manage` in other), `portal` (`users:manage` in acme).
async fn transmitter(backend: Backend) -> Server {
    transmitter_allowing(backend, &[]).await
}

/// [`transmitter`] whose push streams may deliver to `push_hosts` (`scheme://host:port`).
async fn transmitter_allowing(backend: Backend, push_hosts: &[&str]) -> Server {
    let hosts: Vec<String> = push_hosts.iter().map(|h| format!("{h:?}")).collect();
    transmitter_with(
        backend,
        &format!(
            "[ssf_transmitter]\npush_allowed_hosts = [{}]\n",
            hosts.join(", ")
        ),
    )
    .await
}

/// [`transmitter`] with `extra` (TOML tables) in its configuration.
async fn transmitter_with(backend: Backend, extra: &str) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "public_url = \"http://127.0.0.1:{port}\"\n{extra}\
         [[api_keys]]\nid = \"rx-acme\"\nsha256 = \"{}\"\nrealms = [\"acme\"]\npermissions = [\"ssf:manage\"]\n\
         [[api_keys]]\nid = \"rx-other\"\nsha256 = \"{}\"\nrealms = [\"other\"]\npermissions = [\"ssf:manage\"]\n\
         [[api_keys]]\nid = \"portal\"\nsha256 = \"{}\"\nrealms = [\"acme\"]\npermissions = [\"users:manage\"]\n",
        hex_sha256("rx-acme-key"),
        hex_sha256("rx-other-key"),
        hex_sha256("portal-key"),
    );
    Server::start_with(
        backend,
        ServerOptions {
            config: Some(config),
            listen: Some(format!("127.0.0.1:{port}")),
            ..Default::default()
        },
    )
    .await
}

// ---- the receiver ----------------------------------------------------------------------

/// What the receiver was sent, and how it answers (202, or `refuse` with an `err`).
#[derive(Default)]
struct Inbox {
    sets: Mutex<Vec<(String, Option<String>)>>,
    refuse: AtomicU16,
}

struct PushReceiver {
    /// `http://127.0.0.1:port`.
    origin: String,
    url: String,
    inbox: Arc<Inbox>,
    _server: common::Loopback,
}

async fn push_endpoint(
    State(inbox): State<Arc<Inbox>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    // RFC 8935 section 2: the body is one SET, application/secevent+jwt.
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != "application/secevent+jwt" {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"err": "invalid_request", "description": "content type"})),
        )
            .into_response();
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    inbox
        .sets
        .lock()
        .unwrap()
        .push((String::from_utf8(body.to_vec()).unwrap(), auth));
    let refuse = inbox.refuse.load(Ordering::SeqCst);
    if refuse != 0 {
        return (
            StatusCode::from_u16(refuse).unwrap(),
            axum::Json(json!({"err": "invalid_key", "description": "test refuses"})),
        )
            .into_response();
    }
    StatusCode::ACCEPTED.into_response()
}

async fn push_receiver() -> PushReceiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let inbox = Arc::new(Inbox::default());
    let app = axum::Router::new()
        .route("/events", axum::routing::post(push_endpoint))
        .with_state(inbox.clone());
    PushReceiver {
        origin: format!("http://{addr}"),
        url: format!("http://{addr}/events"),
        inbox,
        _server: common::serve(listener, app),
    }
}

impl PushReceiver {
    /// Waits (at most 15 s) until `n` SETs have arrived; returns them all.
    async fn wait_for(&self, n: usize) -> Vec<(String, Option<String>)> {
        for _ in 0..300 {
            let got = self.inbox.sets.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "expected {n} SETs, got {:?}",
            self.inbox.sets.lock().unwrap().len()
        );
    }
}

/// The event type and session id of a SET, read without verifying it (to find it; tests
/// verify what they then check).
fn unverified_event(jwt: &str) -> (String, String) {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let event = claims["events"].as_object().unwrap().keys().next().unwrap();
    let session = claims["sub_id"]["session"]["id"].as_str().unwrap_or("");
    (event.clone(), session.to_owned())
}

impl PushReceiver {
    /// Waits (at most 15 s) for a SET of `event` about session `sid`; returns it.
    async fn wait_for_event(&self, event: &str, sid: &str) -> String {
        for _ in 0..300 {
            let got = self.inbox.sets.lock().unwrap().clone();
            if let Some((jwt, _)) = got
                .into_iter()
                .find(|(jwt, _)| unverified_event(jwt) == (event.to_owned(), sid.to_owned()))
            {
                return jwt;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {event} SET about {sid}");
    }
}

/// Lockstep's published keys.
async fn jwks(server: &Server) -> jsonwebtoken::jwk::JwkSet {
    let meta: Value = reqwest::get(format!("{}/.well-known/ssf-configuration", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uri = meta["jwks_uri"].as_str().unwrap();
    assert!(uri.starts_with(&server.base), "{uri}");
    reqwest::get(uri).await.unwrap().json().await.unwrap()
}

/// Verifies a SET as RFC 8417 and SSF 1.0 say: signature by a key of the set named by `kid`,
/// `typ` = `secevent+jwt`, `iss`, `aud`, a `jti`, an `iat`, no `sub`/`exp`, one event.
fn verify_set(jwt: &str, keys: &jsonwebtoken::jwk::JwkSet, iss: &str, aud: &str) -> Value {
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.typ.as_deref(), Some("secevent+jwt"));
    let kid = header.kid.clone().expect("kid");
    let jwk = keys
        .find(&kid)
        .unwrap_or_else(|| panic!("kid {kid} not in the JWKS"));
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_issuer(&[iss]);
    v.set_audience(&[aud]);
    v.validate_exp = false;
    v.required_spec_claims = ["iss", "aud"].iter().map(|s| (*s).to_owned()).collect();
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &v).unwrap().claims;
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert!(claims["iat"].as_i64().is_some());
    assert!(claims.get("sub").is_none() && claims.get("exp").is_none());
    assert_eq!(claims["events"].as_object().unwrap().len(), 1);
    claims
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = client().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = StatusCode::from_u16(res.status().as_u16()).unwrap();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A call by acme's SSF receiver, with its key.
async fn acme_rx(method: reqwest::Method, url: String, body: Option<Value>) -> (StatusCode, Value) {
    call(method, url, Some("rx-acme-key"), body).await
}

fn base(server: &Server, realm: &str) -> String {
    format!("{}/realms/{realm}/ssf/transmitter", server.base)
}

/// Creates a poll stream of revocations for the acme receiver; returns its configuration.
async fn create_poll_stream(server: &Server) -> Value {
    let (status, stream) = acme_rx(
        reqwest::Method::POST,
        format!("{}/stream", base(server, "acme")),
        Some(json!({"delivery": {"method": POLL}, "events_requested": [REVOKED]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{stream}");
    stream
}

/// Adds or removes (`op` is `add-subject` or `remove-subject`) the user `user` on the acme
/// receiver's stream `id`, as that receiver; returns the transmitter's status.
async fn change_subject(server: &Server, id: &str, op: &str, user: &str) -> StatusCode {
    let subject = json!({"stream_id": id, "subject": {"format": "opaque", "id": user}});
    let url = format!("{}/{op}", base(server, "acme"));
    acme_rx(reqwest::Method::POST, url, Some(subject)).await.0
}

async fn destroy_parent(server: &Server, id: &str) {
    let (status, body) = server.api("acme").destroy_parent(id).await;
    assert!(status.is_success(), "{status} {body}");
}

async fn map_parent(server: &Server, id: &str, kc: &str, user: &str) {
    let (status, body) = server
        .api("acme")
        .post(
            "map-parent",
            json!({"externalId": id, "keycloakSessionId": kc, "userId": user}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// A legacy login and logout mapped to a Keycloak session: one session-established and one
/// session-revoked event for `user`.
async fn log_in_and_out(server: &Server, id: &str, kc: &str, user: &str) {
    map_parent(server, id, kc, user).await;
    destroy_parent(server, id).await;
}

// ---- tests ------------------------------------------------------------------------------

async fn push_stream_delivers_verifiable_caep_sets_and_is_managed_per_ssf(backend: Backend) {
    let rx = push_receiver().await;
    let server = transmitter_allowing(backend, &[&rx.origin]).await;
    let iss = format!("{}/realms/acme", server.base);

    // Discovery: both well-known forms name the realm's endpoints.
    let (status, meta) = call(
        reqwest::Method::GET,
        format!("{}/realms/acme/.well-known/ssf-configuration", server.base),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(meta["issuer"], iss);
    assert_eq!(meta["spec_version"], "1_0");
    assert_eq!(meta["delivery_methods_supported"], json!([PUSH, POLL]));
    let config_ep = meta["configuration_endpoint"].as_str().unwrap().to_owned();
    assert_eq!(config_ep, format!("{}/stream", base(&server, "acme")));
    for k in [
        "status_endpoint",
        "add_subject_endpoint",
        "remove_subject_endpoint",
        "verification_endpoint",
        "jwks_uri",
    ] {
        assert!(meta[k].as_str().unwrap().starts_with(&server.base), "{k}");
    }
    let (_, same) = call(
        reqwest::Method::GET,
        format!("{}/.well-known/ssf-configuration/realms/acme", server.base),
        None,
        None,
    )
    .await;
    assert_eq!(same, meta);
    let keys = jwks(&server).await;
    let algs: Vec<String> = keys
        .keys
        .iter()
        .map(|k| format!("{:?}", k.common.key_algorithm))
        .collect();
    assert!(
        algs.iter().any(|a| a.contains("ES256")) && algs.iter().any(|a| a.contains("RS256")),
        "{algs:?}"
    );
    let served = reqwest::get(format!("{}/ssf/jwks.json", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !served.contains("\"d\"") && !served.contains("\"p\""),
        "no private parts"
    );

    // Create a push stream.
    let (status, stream) = acme_rx(
        reqwest::Method::POST,
        config_ep.clone(),
        Some(json!({
            "delivery": {"method": PUSH, "endpoint_url": rx.url, "authorization_header": "Bearer rx-secret"},
            "events_requested": [REVOKED, ESTABLISHED, "urn:example:unknown"],
            "description": "test receiver",
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{stream}");
    let id = stream["stream_id"].as_str().unwrap().to_owned();
    assert_eq!(stream["iss"], iss);
    assert_eq!(stream["aud"], "rx-acme");
    assert_eq!(stream["events_delivered"], json!([REVOKED, ESTABLISHED]));
    assert!(stream["delivery"].get("authorization_header").is_none());
    // The same endpoint twice is a conflict.
    let (status, _) = acme_rx(
        reqwest::Method::POST,
        config_ep.clone(),
        Some(json!({"delivery": {"method": PUSH, "endpoint_url": rx.url}, "events_requested": [REVOKED]})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A host the operator did not allow is refused, loopback included.
    let (status, refused) = acme_rx(
        reqwest::Method::POST,
        config_ep.clone(),
        Some(json!({"delivery": {"method": PUSH, "endpoint_url": "http://127.0.0.1:9/events"}})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(
        refused.to_string().contains("push_allowed_hosts"),
        "{refused}"
    );
    let (status, _) = acme_rx(
        reqwest::Method::POST,
        config_ep.clone(),
        Some(json!({"delivery": {"method": "urn:example:carrier-pigeon"}})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Verification: a SET carrying the receiver's state.
    let (status, _) = acme_rx(
        reqwest::Method::POST,
        format!("{}/verify", base(&server, "acme")),
        Some(json!({"stream_id": id, "state": "xyz"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let got = rx.wait_for(1).await;
    assert_eq!(got[0].1.as_deref(), Some("Bearer rx-secret"));
    let claims = verify_set(&got[0].0, &keys, &iss, "rx-acme");
    assert_eq!(claims["events"][VERIFICATION]["state"], "xyz");
    assert_eq!(claims["sub_id"], json!({"format": "opaque", "id": id}));

    // A legacy login and logout become session-established and session-revoked.
    log_in_and_out(&server, "legacy-1", "kc-sid-1", "user-1").await;
    let got = rx.wait_for(3).await;
    let established = verify_set(&got[1].0, &keys, &iss, "rx-acme");
    let revoked = verify_set(&got[2].0, &keys, &iss, "rx-acme");
    assert!(established["events"][ESTABLISHED]["event_timestamp"].is_i64());
    let event = &revoked["events"][REVOKED];
    assert!(event["event_timestamp"].is_i64(), "{revoked}");
    assert_eq!(event["initiating_entity"], "user");
    assert!(
        event["reason_admin"]["en"]
            .as_str()
            .unwrap()
            .contains("legacy-1")
    );
    assert_eq!(revoked["sub_id"]["format"], "complex");
    assert_eq!(
        revoked["sub_id"]["user"],
        json!({"format": "opaque", "id": "user-1"})
    );
    assert_eq!(
        revoked["sub_id"]["session"],
        json!({"format": "opaque", "id": "kc-sid-1"})
    );
    assert_ne!(established["jti"], revoked["jti"]);

    // Read, update, replace.
    let (status, one) = acme_rx(
        reqwest::Method::GET,
        format!("{config_ep}?stream_id={id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["description"], "test receiver");
    let (status, all) = acme_rx(reqwest::Method::GET, config_ep.clone(), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all.as_array().unwrap().len(), 1);
    let (status, patched) = acme_rx(
        reqwest::Method::PATCH,
        config_ep.clone(),
        Some(json!({"stream_id": id, "description": "renamed"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched["description"], "renamed");
    assert_eq!(patched["events_requested"].as_array().unwrap().len(), 3);
    let (status, _) = acme_rx(
        reqwest::Method::PUT,
        config_ep.clone(),
        Some(json!({"stream_id": id, "description": "no delivery"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, replaced) = acme_rx(
        reqwest::Method::PUT,
        config_ep.clone(),
        Some(json!({"stream_id": id, "delivery": {"method": PUSH, "endpoint_url": rx.url, "authorization_header": "Bearer rx-secret"}, "events_requested": [REVOKED]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["events_delivered"], json!([REVOKED]));
    assert!(replaced.get("description").is_none());

    // Status: paused holds events; enabled again delivers them.
    let status_ep = format!("{}/status", base(&server, "acme"));
    let (status, body) = acme_rx(
        reqwest::Method::POST,
        status_ep.clone(),
        Some(json!({"stream_id": id, "status": "paused", "reason": "maintenance"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "paused");
    let (_, body) = acme_rx(
        reqwest::Method::GET,
        format!("{status_ep}?stream_id={id}"),
        None,
    )
    .await;
    assert_eq!(
        body,
        json!({"stream_id": id, "status": "paused", "reason": "maintenance"})
    );
    // Give every instance's copy of the streams time to see the change (reloads every 5 s;
    // this instance reloaded at once).
    log_in_and_out(&server, "legacy-2", "kc-sid-2", "user-2").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx.inbox.sets.lock().unwrap().len(), 3, "held while paused");
    acme_rx(
        reqwest::Method::POST,
        status_ep.clone(),
        Some(json!({"stream_id": id, "status": "enabled"})),
    )
    .await;
    let got = rx.wait_for(4).await;
    let held = verify_set(&got[3].0, &keys, &iss, "rx-acme");
    assert_eq!(held["sub_id"]["session"]["id"], "kc-sid-2");

    // Subjects: a removed user's events are not sent; added back, they are.
    let status = change_subject(&server, &id, "remove-subject", "user-3").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    log_in_and_out(&server, "legacy-3", "kc-sid-3", "user-3").await;
    // Streams are matched when the outbox is fanned out (at most 200 ms after a commit):
    // let that happen before the subject is added back.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = change_subject(&server, &id, "add-subject", "user-3").await;
    assert_eq!(status, StatusCode::OK);
    log_in_and_out(&server, "legacy-4", "kc-sid-4", "user-3").await;
    let got = rx.wait_for(5).await;
    let last = verify_set(&got[4].0, &keys, &iss, "rx-acme");
    assert_eq!(
        last["sub_id"]["session"]["id"], "kc-sid-4",
        "legacy-3 was left out"
    );

    // Key rotation: a new kid signs; the old one stays published and verifies old SETs.
    let old_kid = jsonwebtoken::decode_header(&got[4].0).unwrap().kid.unwrap();
    let (status, rotated) = rotate(&server, TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let (status, _) = rotate(&server, "rx-acme-key").await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "rotation needs ssf:manage in every realm"
    );
    let after = jwks(&server).await;
    assert!(
        after.find(&old_kid).is_some(),
        "the old key stays during the overlap"
    );
    assert_eq!(after.keys.len(), keys.keys.len() * 2);
    verify_set(&got[4].0, &after, &iss, "rx-acme");
    log_in_and_out(&server, "legacy-5", "kc-sid-5", "user-5").await;
    let got = rx.wait_for(6).await;
    let new_kid = jsonwebtoken::decode_header(&got[5].0).unwrap().kid.unwrap();
    assert_ne!(new_kid, old_kid);
    assert!(
        rotated["kids"]
            .as_array()
            .unwrap()
            .contains(&json!(new_kid))
    );
    verify_set(&got[5].0, &after, &iss, "rx-acme");

    // A refused SET (400 with err) is a dead letter at once; replayed, it is delivered.
    rx.inbox.refuse.store(400, Ordering::SeqCst);
    log_in_and_out(&server, "legacy-6", "kc-sid-6", "user-6").await;
    let target = format!("ssf:{id}");
    let dead = dead_letter(&server, &target, "").await;
    assert_eq!(dead["status"], "dead", "{dead}");
    assert!(
        dead["lastError"].as_str().unwrap().contains("invalid_key"),
        "{dead}"
    );
    rx.inbox.refuse.store(0, Ordering::SeqCst);
    let (status, replayed) = call(
        reqwest::Method::POST,
        format!("{}/admin/deliveries/replay", server.base),
        Some(TOKEN),
        Some(json!({"deliveryId": dead["id"]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    let got = rx.wait_for(8).await;
    let again = verify_set(&got[7].0, &after, &iss, "rx-acme");
    assert_eq!(again["sub_id"]["session"]["id"], "kc-sid-6");
    let mut delivered = false;
    for _ in 0..200 {
        let (_, one) = server
            .admin_get(&format!("/admin/deliveries/{}", dead["id"]))
            .await;
        if one["status"] == "delivered" {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered);

    // Delete.
    let (status, _) = acme_rx(
        reqwest::Method::DELETE,
        format!("{config_ep}?stream_id={id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = acme_rx(
        reqwest::Method::GET,
        format!("{config_ep}?stream_id={id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn poll_stream_serves_sets_until_they_are_acknowledged(backend: Backend) {
    let server = transmitter(backend).await;
    let iss = format!("{}/realms/acme", server.base);
    let keys = jwks(&server).await;
    let stream = create_poll_stream(&server).await;
    let id = stream["stream_id"].as_str().unwrap().to_owned();
    let poll_url = stream["delivery"]["endpoint_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(poll_url, format!("{}/poll/{id}", base(&server, "acme")));
    let poll = |body: Value| acme_rx(reqwest::Method::POST, poll_url.clone(), Some(body));

    // Nothing yet.
    let (status, empty) = poll(json!({"returnImmediately": true})).await;
    assert_eq!(status, StatusCode::OK, "{empty}");
    assert_eq!(empty, json!({"sets": {}, "moreAvailable": false}));

    // Verification is served by the poll.
    acme_rx(
        reqwest::Method::POST,
        format!("{}/verify", base(&server, "acme")),
        Some(json!({"stream_id": id, "state": "s-1"})),
    )
    .await;
    let (_, got) = poll(json!({"returnImmediately": true})).await;
    let sets: BTreeMap<String, String> = serde_json::from_value(got["sets"].clone()).unwrap();
    assert_eq!(sets.len(), 1);
    let (vjti, vset) = sets.iter().next().unwrap();
    let claims = verify_set(vset, &keys, &iss, "rx-acme");
    assert_eq!(&claims["jti"], vjti);
    assert_eq!(claims["events"][VERIFICATION]["state"], "s-1");
    // Not acknowledged, it is offered again; acknowledged, it is gone.
    let (_, again) = poll(json!({"returnImmediately": true})).await;
    assert_eq!(again["sets"][vjti], json!(vset));
    let (_, acked) = poll(json!({"ack": [vjti], "returnImmediately": true})).await;
    assert_eq!(acked["sets"], json!({}));

    // Three logouts (a login is not requested); a long poll waits for them.
    for i in 0..3 {
        map_parent(&server, &format!("p-{i}"), &format!("kc-{i}"), "user-p").await;
    }
    let waiting = {
        let poll_url = poll_url.clone();
        tokio::spawn(async move {
            acme_rx(
                reqwest::Method::POST,
                poll_url,
                Some(json!({"ack": [], "maxEvents": 2})),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        destroy_parent(&server, &format!("p-{i}")).await;
    }
    let (status, got) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let sets: BTreeMap<String, String> = serde_json::from_value(got["sets"].clone()).unwrap();
    let mut jtis: Vec<String> = Vec::new();
    for (jti, set) in &sets {
        let c = verify_set(set, &keys, &iss, "rx-acme");
        assert_eq!(&c["jti"], jti);
        assert!(c["events"][REVOKED].is_object());
        jtis.push(jti.clone());
    }
    // Up to maxEvents, with moreAvailable when more wait (the batch may have caught fewer
    // than three logouts, then fewer are served).
    assert!(!jtis.is_empty() && jtis.len() <= 2);

    // Acknowledge them; the rest are refused (setErrs): dead letters.
    let acks = jtis.clone();
    let (_, got) = poll(json!({"ack": acks, "maxEvents": 10, "returnImmediately": true})).await;
    let mut rest: BTreeMap<String, String> = serde_json::from_value(got["sets"].clone()).unwrap();
    for _ in 0..50 {
        if jtis.len() + rest.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, more) = poll(json!({"maxEvents": 10, "returnImmediately": true})).await;
        rest.extend(
            serde_json::from_value::<BTreeMap<String, String>>(more["sets"].clone()).unwrap(),
        );
    }
    assert_eq!(jtis.len() + rest.len(), 3, "{rest:?}");
    assert!(
        rest.keys().all(|j| !jtis.contains(j)),
        "acknowledged SETs are not served again"
    );
    let errs: serde_json::Map<String, Value> = rest
        .keys()
        .map(|j| {
            (
                j.clone(),
                json!({"err": "invalid_request", "description": "test"}),
            )
        })
        .collect();
    let (_, after) =
        poll(json!({"setErrs": errs, "maxEvents": 10, "returnImmediately": true})).await;
    assert_eq!(after["sets"], json!({}));
    let target = format!("ssf:{id}");
    let (_, delivered) = server
        .admin_get(&format!(
            "/admin/deliveries?connector={target}&status=delivered"
        ))
        .await;
    assert_eq!(delivered["items"].as_array().unwrap().len(), jtis.len());
    let (_, dead) = server
        .admin_get(&format!("/admin/deliveries?connector={target}&status=dead"))
        .await;
    assert_eq!(dead["items"].as_array().unwrap().len(), rest.len());
    // A poll on a push stream, or someone else's stream, is refused.
    let (status, _) = call(
        reqwest::Method::POST,
        format!("{}/poll/{id}", base(&server, "other")),
        Some("rx-other-key"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn stream_management_is_authorised_per_realm(backend: Backend) {
    use reqwest::Method;
    let server = transmitter(backend).await;
    let ep = format!("{}/stream", base(&server, "acme"));
    let body = json!({"delivery": {"method": POLL}, "events_requested": [REVOKED]});
    // Creating a stream: (key, the status it gets, why).
    let creators = [
        (None, StatusCode::UNAUTHORIZED, "no key"),
        (
            Some("portal-key"),
            StatusCode::FORBIDDEN,
            "users:manage is not ssf:manage",
        ),
        (
            Some("rx-other-key"),
            StatusCode::FORBIDDEN,
            "another realm's key",
        ),
    ];
    for (key, want, why) in creators {
        let (status, problem) = call(Method::POST, ep.clone(), key, Some(body.clone())).await;
        assert_eq!(status, want, "{why}: {problem}");
    }
    let (status, created) = acme_rx(Method::POST, ep.clone(), Some(body.clone())).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["stream_id"].as_str().unwrap();
    // The other realm's receiver sees none of acme's streams, by list or by id.
    let other = format!("{}/stream", base(&server, "other"));
    let (status, list) = call(Method::GET, other.clone(), Some("rx-other-key"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!([]));
    let acme = base(&server, "acme");
    let other_base = base(&server, "other");
    // Requests refused, in this order: (method, url, key, body, the status it gets).
    let refused = [
        (
            Method::GET,
            format!("{other_base}/stream?stream_id={id}"),
            "rx-other-key",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            format!("{other_base}/status?stream_id={id}"),
            "rx-other-key",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            format!("{other}?stream_id={id}"),
            "rx-other-key",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            format!("{acme}/poll/{id}"),
            "rx-other-key",
            Some(json!({})),
            StatusCode::FORBIDDEN,
        ),
        // Malformed requests.
        (
            Method::POST,
            format!("{acme}/status"),
            "rx-acme-key",
            Some(json!({"stream_id": id, "status": "sleeping"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            format!("{acme}/remove-subject"),
            "rx-acme-key",
            Some(json!({"stream_id": id, "subject": "user-1"})),
            StatusCode::BAD_REQUEST,
        ),
        // Plain HTTP only to loopback.
        (
            Method::POST,
            ep.clone(),
            "rx-acme-key",
            Some(
                json!({"delivery": {"method": PUSH, "endpoint_url": "http://receiver.example/events"}}),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            format!("{ep}?stream_id=nope"),
            "rx-acme-key",
            None,
            StatusCode::NOT_FOUND,
        ),
    ];
    for (method, url, key, body, want) in refused {
        let what = format!("{method} {url} as {key}");
        let (status, problem) = call(method, url, Some(key), body).await;
        assert_eq!(status, want, "{what}: {problem}");
    }

    // Every change a receiver makes is in the audit log, with its actor and stream; a refused
    // one too.
    let id = id.to_owned();
    let (status, _) = acme_rx(
        reqwest::Method::POST,
        format!("{}/status", base(&server, "acme")),
        Some(json!({"stream_id": id, "status": "paused", "reason": "maintenance"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for stream in [id.as_str(), "nope"] {
        let (status, _) = acme_rx(
            reqwest::Method::DELETE,
            format!("{ep}?stream_id={stream}"),
            None,
        )
        .await;
        let want = if stream == "nope" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::NO_CONTENT
        };
        assert_eq!(status, want, "{stream}");
    }
    let (status, audit) = call(
        reqwest::Method::GET,
        format!("{}/admin/audit?realm=acme&limit=100", server.base),
        Some(common::TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    let records: Vec<(String, String, String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"].as_str().unwrap().starts_with("ssf-stream-"))
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (
                text("action"),
                text("actor"),
                text("target"),
                text("result"),
            )
        })
        .collect();
    let has = |action: &str, target: &str, result: &str| {
        records.iter().any(|(a, who, t, res)| {
            a == action && who == "key:rx-acme" && t == target && res == result
        })
    };
    assert!(has("ssf-stream-create", &id, "ok"), "{records:?}");
    assert!(has("ssf-stream-update", &id, "ok"), "{records:?}");
    assert!(has("ssf-stream-delete", &id, "ok"), "{records:?}");
    assert!(has("ssf-stream-delete", "nope", "NOT_FOUND"), "{records:?}");
    let paused = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "ssf-stream-update")
        .unwrap();
    assert_eq!(paused["detail"]["status"], "paused", "{paused}");
}

/// Without `public_url` there is no transmitter: its documents and routes answer 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_public_url_the_transmitter_is_off() {
    let server = Server::start(Backend::Sqlite).await;
    for path in [
        "/.well-known/ssf-configuration",
        "/realms/acme/.well-known/ssf-configuration",
    ] {
        let (status, _) = call(
            reqwest::Method::GET,
            format!("{}{path}", server.base),
            None,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = call(
        reqwest::Method::GET,
        format!("{}/stream", base(&server, "acme")),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Keys the operator configures are the only ones: published (the listed-later one of an
/// algorithm too), the first of the signing algorithm signs, none is generated, and rotation
/// is refused (it is done in the file).
async fn configured_signing_keys_are_the_only_keys(backend: Backend) {
    let fixture = |name: &str| {
        common::components::workspace()
            .join("tests/fixtures/oidc")
            .join(name)
            .display()
            .to_string()
    };
    let server = transmitter_with(
        backend,
        &format!(
            "[ssf_transmitter]\nsigning_alg = \"ES256\"\n\
             [[ssf_transmitter.keys]]\nkid = \"ec-2026\"\nfile = {:?}\n\
             [[ssf_transmitter.keys]]\nkid = \"rsa-2026\"\nfile = {:?}\n\
             [[ssf_transmitter.keys]]\nkid = \"rsa-2025\"\nfile = {:?}\n",
            fixture("test-ec-a.pem"),
            fixture("test-rsa-a.pem"),
            fixture("test-rsa-b.pem"),
        ),
    )
    .await;
    let keys = jwks(&server).await;
    let mut kids: Vec<String> = keys
        .keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect();
    kids.sort();
    assert_eq!(kids, ["ec-2026", "rsa-2025", "rsa-2026"]);
    let served = reqwest::get(format!("{}/ssf/jwks.json", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!served.contains("\"d\""), "no private parts");

    // A verification SET is signed by the configured ES256 key, which its own public PEM
    // verifies (not only the JWK Lockstep derived from it).
    let stream = create_poll_stream(&server).await;
    let id = stream["stream_id"].as_str().unwrap().to_owned();
    let (status, _) = acme_rx(
        reqwest::Method::POST,
        format!("{}/verify", base(&server, "acme")),
        Some(json!({"stream_id": id, "state": "k"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, got) = acme_rx(
        reqwest::Method::POST,
        stream["delivery"]["endpoint_url"]
            .as_str()
            .unwrap()
            .to_owned(),
        Some(json!({"returnImmediately": true})),
    )
    .await;
    let sets: BTreeMap<String, String> = serde_json::from_value(got["sets"].clone()).unwrap();
    let set = sets.values().next().expect("a verification SET");
    let header = jsonwebtoken::decode_header(set).unwrap();
    assert_eq!(header.kid.as_deref(), Some("ec-2026"));
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    verify_set(
        set,
        &keys,
        &format!("{}/realms/acme", server.base),
        "rx-acme",
    );
    let pem = std::fs::read(fixture("test-ec-a.pub.pem")).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(
        set,
        &jsonwebtoken::DecodingKey::from_ec_pem(&pem).unwrap(),
        &v,
    )
    .unwrap();

    let (status, problem) = rotate(&server, TOKEN).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(jwks(&server).await.keys.len(), 3, "nothing generated");
}

/// A key file that cannot serve stops the start with a message naming the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_configured_key_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lockstep.toml");
    let public = common::components::workspace().join("tests/fixtures/oidc/test-rsa-a.pub.pem");
    std::fs::write(
        &config,
        format!(
            "public_url = \"http://127.0.0.1:1\"\n\
             [[ssf_transmitter.keys]]\nkid = \"k1\"\nfile = {:?}\n",
            public.display().to_string()
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--database-url")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("db.sqlite").display()
        ))
        .env("LOCKSTEP_ADMIN_TOKEN", TOKEN)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the server gives up at once")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys[0]") && err.contains("not a private key"),
        "{err}"
    );
}

/// The bundled webhook connector with `format = "set"`: every event reaches the legacy
/// receiver as a SET that Lockstep signed (the component never holds the key), verifiable
/// with the public JWKS; a redelivery repeats the `jti`; after a key rotation the new key
/// signs; without a transmitter the event is a dead letter that says why.
async fn the_webhook_connector_sends_sets_lockstep_signed(backend: Backend) {
    const AUDIENCE: &str = "urn:legacy:portal";
    let rx = push_receiver().await;
    // `granted`: the audience the operator lets the connector sign for.
    let manifest = |format: &str, granted: &str| {
        format!(
            "name = \"signed\"\nrealms = [\"acme\"]\n\
             allowed_hosts = [\"{}\"]\nsigning_audiences = [\"{granted}\"]\ntimeout_ms = 2000\n\
             [policy]\non_failure = \"retry\"\nmax_attempts = 20\nbackoff_ms = 20\nmax_backoff_ms = 100\n\
             [config]\nurl = \"{}\"\nformat = \"{format}\"\nset_audience = \"{AUDIENCE}\"\n\
             authorization = \"Bearer legacy-token\"\n",
            rx.origin, rx.url
        )
    };
    let webhook = || std::fs::read(common::components::component("webhook")).unwrap();
    let server = transmitter(backend).await;
    let iss = format!("{}/realms/acme", server.base);
    let (status, body) = server
        .put_connector("signed", &manifest("set", AUDIENCE), Some(webhook()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["connector"]["world"], "lockstep:connector@0.3.0");

    // The receiver is down at first: the login's SET is retried with the same jti.
    rx.inbox.refuse.store(503, Ordering::SeqCst);
    map_parent(&server, "legacy-1", "kc-sid-1", "user-1").await;
    rx.wait_for(2).await;
    rx.inbox.refuse.store(0, Ordering::SeqCst);
    destroy_parent(&server, "legacy-1").await;
    let logout_jwt = rx.wait_for_event(REVOKED, "kc-sid-1").await;
    let keys = jwks(&server).await;
    let got = rx.inbox.sets.lock().unwrap().clone();
    let logins: Vec<Value> = got
        .iter()
        .filter(|(jwt, _)| unverified_event(jwt) == (ESTABLISHED.into(), "kc-sid-1".into()))
        .map(|(jwt, auth)| {
            assert_eq!(auth.as_deref(), Some("Bearer legacy-token"));
            verify_set(jwt, &keys, &iss, AUDIENCE)
        })
        .collect();
    assert!(logins.len() >= 2, "refused, then sent again: {logins:?}");
    assert!(
        logins
            .iter()
            .all(|c| c["jti"] == logins[0]["jti"] && c["txn"] == logins[0]["txn"]),
        "every attempt at the login carries one jti: {logins:?}"
    );
    let logout = verify_set(&logout_jwt, &keys, &iss, AUDIENCE);
    assert_eq!(
        logout["events"][REVOKED]["initiating_entity"], "user",
        "{logout}"
    );
    assert_ne!(logout["jti"], logins[0]["jti"]);
    assert_eq!(logout["sub_id"]["session"]["id"], "kc-sid-1");
    assert_eq!(logout["sub_id"]["user"]["id"], "user-1");

    // After a rotation the new key signs; the receiver finds it in the JWKS.
    let old_kid = jsonwebtoken::decode_header(&logout_jwt)
        .unwrap()
        .kid
        .unwrap();
    let (status, rotated) = rotate(&server, TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    map_parent(&server, "legacy-2", "kc-sid-2", "user-2").await;
    let jwt = rx.wait_for_event(ESTABLISHED, "kc-sid-2").await;
    let kid = jsonwebtoken::decode_header(&jwt).unwrap().kid.unwrap();
    assert_ne!(kid, old_kid);
    assert!(rotated["kids"].as_array().unwrap().contains(&json!(kid)));
    verify_set(&jwt, &jwks(&server).await, &iss, AUDIENCE);

    // An audience the manifest does not grant is not signed for: nothing is sent.
    let sent = rx.inbox.sets.lock().unwrap().len();
    let (status, body) = server
        .put_connector("signed", &manifest("set", "urn:another"), Some(webhook()))
        .await;
    assert!(status.is_success(), "{status} {body}");
    map_parent(&server, "legacy-9", "kc-sid-9", "user-9").await;
    let dead = dead_letter(&server, "signed", "not granted").await;
    assert!(
        dead["lastError"].as_str().unwrap().contains(AUDIENCE),
        "{dead}"
    );
    assert_eq!(rx.inbox.sets.lock().unwrap().len(), sent);
    drop(server);

    // No transmitter, no key: nothing is sent, and the dead letter says what to configure.
    let server = Server::start(backend).await;
    let sent = rx.inbox.sets.lock().unwrap().len();
    let (status, body) = server
        .put_connector("signed", &manifest("set", AUDIENCE), Some(webhook()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    map_parent(&server, "legacy-3", "kc-sid-3", "user-3").await;
    dead_letter(&server, "signed", "signed events are not available").await;
    // A format the connector does not know is refused the same way.
    let (status, body) = server
        .put_connector("signed", &manifest("xml", AUDIENCE), Some(webhook()))
        .await;
    assert!(status.is_success(), "{status} {body}");
    map_parent(&server, "legacy-4", "kc-sid-4", "user-4").await;
    let dead = dead_letter(&server, "signed", "format").await;
    assert!(
        dead["lastError"].as_str().unwrap().contains("\"xml\""),
        "{dead}"
    );
    assert_eq!(
        rx.inbox.sets.lock().unwrap().len(),
        sent,
        "nothing was sent"
    );
}

/// The first dead letter of `connector` whose error holds `error` (waits at most 10 s).
async fn dead_letter(server: &Server, connector: &str, error: &str) -> Value {
    for _ in 0..200 {
        let (_, page) = server
            .admin_get(&format!(
                "/admin/deliveries?connector={connector}&status=dead"
            ))
            .await;
        if let Some(dead) = page["items"].as_array().and_then(|a| {
            a.iter()
                .find(|d| d["lastError"].as_str().unwrap_or("").contains(error))
        }) {
            return dead.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no dead letter of {connector} saying {error:?}");
}

/// `POST /admin/ssf/signing-keys/rotate` with `token`.
async fn rotate(server: &Server, token: &str) -> (StatusCode, Value) {
    call(
        reqwest::Method::POST,
        format!("{}/admin/ssf/signing-keys/rotate", server.base),
        Some(token),
        None,
    )
    .await
}

on_both_backends!(
    push_stream_delivers_verifiable_caep_sets_and_is_managed_per_ssf,
    the_webhook_connector_sends_sets_lockstep_signed,
    poll_stream_serves_sets_until_they_are_acknowledged,
    stream_management_is_authorised_per_realm,
    configured_signing_keys_are_the_only_keys,
);
