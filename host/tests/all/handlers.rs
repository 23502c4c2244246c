//! Handler logic that needs no process: the router of `api::app`, built from the library's
//! public parts on a real store, answers single requests through tower's `oneshot`. Client
//! mistakes (bad JSON, a wrong media type, a missing or wrong token, a cursor this server
//! never issued, an unknown session, route or method) come back as RFC 9457 problem
//! documents with the right status and code, and change nothing. The black-box files check
//! the same paths through a real `lockstep serve`; these run in milliseconds each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use lockstep::api::{self, AppState};
use lockstep::auth::Authenticator;
use lockstep::auth::webhook::EventKeys;
use lockstep::lifecycle::Connectors;
use lockstep::oidc::Verifier;
use lockstep::oidc::tls::TrustRoots;
use lockstep::runtime::Runtime;
use lockstep::runtime::registry::Registry;
use lockstep::store::{Store, StoreOptions};
use lockstep::sync::sessions::SessionService;
use lockstep::sync::ssf_streams::SsfReceiver;
use lockstep::sync::ssf_transmit::{SsfTransmitter, TransmitterSettings};
use lockstep::telemetry::metrics::Metrics;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::common::{self, Backend, TOKEN};

const SESSIONS: &str = "/admin/realms/acme/external-sessions";

/// The router `lockstep serve` would serve, on a fresh migrated database of `backend`: the
/// admin token [`TOKEN`], no IdP, no event keys, no rate limit, no console, no connectors.
struct App {
    router: axum::Router,
    _dir: Option<tempfile::TempDir>,
}

impl App {
    async fn new(backend: Backend) -> App {
        let (url, dir) = common::fresh_database(backend).await;
        let store = Store::connect(&StoreOptions::new(url)).await.unwrap();
        store.migrate().await.unwrap();
        let roots = TrustRoots::load(None).unwrap();
        let metrics = Arc::new(Metrics::new());
        let connectors = Connectors::new(
            Runtime::new(None).unwrap(),
            Arc::new(Registry::new()),
            store.clone(),
            metrics,
        );
        let state = AppState {
            sessions: SessionService::new(store.clone(), HashMap::new()),
            auth: Authenticator::new(Some(TOKEN), Vec::new()),
            connectors,
            oidc: Arc::new(Verifier::new(Vec::new(), &roots).unwrap()),
            events: Arc::new(EventKeys::new([])),
            rate_limit: None,
            auth_failures: None,
            console: None,
            ssf: Arc::new(SsfReceiver::new(Vec::new(), &roots).unwrap()),
            ssf_transmitter: Arc::new(SsfTransmitter::new(
                store,
                TransmitterSettings::default(),
                reqwest::Client::new(),
            )),
        };
        App {
            router: api::app(state),
            _dir: dir,
        }
    }

    /// One request; the status, the `Content-Type` and the body (JSON, or `Null` if empty).
    async fn call(&self, req: Request<Body>) -> (StatusCode, String, Value) {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, content_type, body)
    }

    async fn get(&self, uri: &str) -> (StatusCode, String, Value) {
        self.call(admin(Request::get(uri)).body(Body::empty()).unwrap())
            .await
    }

    async fn post(&self, uri: &str, content_type: &str, body: &str) -> (StatusCode, String, Value) {
        let req = admin(Request::post(uri))
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body.to_owned()))
            .unwrap();
        self.call(req).await
    }
}

fn admin(req: axum::http::request::Builder) -> axum::http::request::Builder {
    req.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
}

/// A problem document of this status and code, with a detail a person can act on.
#[track_caller]
fn assert_problem(got: &(StatusCode, String, Value), status: StatusCode, code: &str) {
    let (got_status, content_type, body) = got;
    assert_eq!(*got_status, status, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
}

async fn bad_bodies_are_400_and_a_wrong_media_type_415(backend: Backend) {
    let app = App::new(backend).await;
    let map_parent = format!("{SESSIONS}/map-parent");
    let json_type = "application/json";
    for body in [
        "{",
        "[]",
        r#"{"externalId": 5, "keycloakSessionId": "kc"}"#,
        r#"{"externalId": "a", "keycloakSessionId": "kc", "bogus": 1}"#,
        r#"{"externalId": "", "keycloakSessionId": "kc"}"#,
    ] {
        let got = app.post(&map_parent, json_type, body).await;
        assert_problem(&got, StatusCode::BAD_REQUEST, "VALIDATION");
    }
    let got = app
        .post(&map_parent, "text/plain", r#"{"externalId": "a"}"#)
        .await;
    assert_problem(&got, StatusCode::UNSUPPORTED_MEDIA_TYPE, "VALIDATION");
    // Nothing of the refused requests was stored.
    let (status, _, page) = app.get(SESSIONS).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"], json!([]));
}

async fn callers_without_the_token_are_refused(backend: Backend) {
    let app = App::new(backend).await;
    let body = r#"{"externalId": "a", "keycloakSessionId": "kc"}"#;
    let uri = format!("{SESSIONS}/map-parent");
    let bare = Request::post(&uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap();
    assert_problem(
        &app.call(bare).await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    );
    let wrong = Request::post(&uri)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer not-the-token")
        .body(Body::from(body))
        .unwrap();
    assert_problem(
        &app.call(wrong).await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    );
    let (status, _, page) = app.get(SESSIONS).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"], json!([]), "a refused call stored nothing");
}

async fn cursors_this_server_never_issued_are_400(backend: Backend) {
    let app = App::new(backend).await;
    for uri in [
        format!("{SESSIONS}?cursor=garbage"),
        format!("{SESSIONS}?cursor="),
        format!("{SESSIONS}?limit=1&cursor=%00%ff"),
        "/admin/deliveries?cursor=garbage".to_owned(),
        "/admin/audit?cursor=garbage".to_owned(),
    ] {
        let got = app.get(&uri).await;
        assert_problem(&got, StatusCode::BAD_REQUEST, "VALIDATION");
    }
    // A cursor the server did issue pages on.
    for id in ["a", "b"] {
        let (status, _, body) = app
            .post(
                &format!("{SESSIONS}/map-fixed"),
                "application/json",
                &json!({"externalId": id, "userId": "u"}).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (_, _, first) = app.get(&format!("{SESSIONS}?limit=1")).await;
    let cursor = first["nextCursor"].as_str().unwrap().to_owned();
    let (status, _, second) = app
        .get(&format!("{SESSIONS}?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert_ne!(
        first["items"][0]["externalId"],
        second["items"][0]["externalId"]
    );
}

async fn unknown_sessions_realms_routes_and_methods(backend: Backend) {
    let app = App::new(backend).await;
    assert_problem(
        &app.get(&format!("{SESSIONS}/nobody")).await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    // Another realm has nothing of this one's.
    let (status, _, page) = app.get("/admin/realms/elsewhere/external-sessions").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"], json!([]));
    // A realm name outside the rules is refused, not looked up.
    assert_problem(
        &app.get("/admin/realms/bad%20realm/external-sessions").await,
        StatusCode::BAD_REQUEST,
        "VALIDATION",
    );
    // The IdP-facing routes of a realm with nothing configured for them: the event intake
    // (no signing secret) is a 404 problem, the back-channel logout (no IdP) an OAuth error.
    let event = Request::post("/realms/acme/events")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"id": "e1", "type": "LOGIN"}"#))
        .unwrap();
    assert_problem(&app.call(event).await, StatusCode::NOT_FOUND, "NOT_FOUND");
    let logout = Request::post("/realms/acme/backchannel-logout")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("logout_token=x.y.z"))
        .unwrap();
    let (status, _, body) = app.call(logout).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request", "{body}");
    assert_problem(
        &app.get("/admin/no-such-thing").await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    let delete = admin(Request::delete(format!("{SESSIONS}/map-parent")))
        .body(Body::empty())
        .unwrap();
    assert_problem(
        &app.call(delete).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
    );
}

on_both_backends!(
    bad_bodies_are_400_and_a_wrong_media_type_415,
    callers_without_the_token_are_refused,
    cursors_this_server_never_issued_are_400,
    unknown_sessions_realms_routes_and_methods,
);
