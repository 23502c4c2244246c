//! `[limits]` against the real binary: the per-caller rate limit (429 + `Retry-After`), the
//! largest tree one API destroy may end (422 `CASCADE_TOO_LARGE`, nothing changed; a logout
//! the IdP orders is never refused), and the connection limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::{Backend, Server, ServerOptions, assert_problem};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

on_both_backends!(
    a_destroy_larger_than_max_cascade_is_refused_and_changes_nothing,
    an_idp_logout_is_never_refused_by_max_cascade,
);

const SECRET: &str = "whsec_c2VjcmV0LWZvci1sb2Nrc3RlcC1ldmVudC10ZXN0cw==";

fn key(id: &str, secret: &str) -> String {
    format!(
        "[[api_keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nrealms = [\"acme\"]\npermissions = [\"users:manage\"]\n",
        hex::encode(lockstep::auth::sha256(secret))
    )
}

async fn get_as(server: &Server, token: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}{path}", server.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_gets_429_with_retry_after_and_others_are_unaffected() {
    let config = format!(
        "[limits]\nrequests_per_second = 1\nburst = 3\n{}{}",
        key("portal", "portal-key"),
        key("billing", "billing-key")
    );
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            config: Some(config),
            requests_per_second: None,
            ..ServerOptions::default()
        },
    )
    .await;
    let path = "/admin/realms/acme/external-sessions?limit=1";
    for i in 0..3 {
        let res = get_as(&server, "portal-key", path).await;
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "request {i} is within the burst"
        );
    }
    let res = get_as(&server, "portal-key", path).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = res
        .headers()
        .get("retry-after")
        .expect("Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: Value = res.json().await.unwrap();
    assert_problem(
        &(StatusCode::TOO_MANY_REQUESTS, body.clone()),
        429,
        "RATE_LIMITED",
    );
    assert!(
        body["detail"].as_str().unwrap().contains("key:portal"),
        "{body}"
    );
    // Another key, the health endpoints and a refused credential are not held back.
    assert_eq!(
        get_as(&server, "billing-key", path).await.status(),
        StatusCode::OK
    );
    let health = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(
        get_as(&server, "wrong-key", path).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // After Retry-After the caller is served again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(
        get_as(&server, "portal-key", path).await.status(),
        StatusCode::OK
    );
}

/// A PARENT with `children` CHILDren, mapped to Keycloak session `sid`.
async fn tree(server: &Server, parent: &str, sid: &str, children: usize) {
    let api = server.api("acme");
    assert_eq!(api.map_parent(parent, sid).await.0, StatusCode::CREATED);
    for c in 0..children {
        let (code, body) = api.map_child(&format!("{parent}-c{c}"), parent).await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
}

async fn status_of(server: &Server, id: &str) -> String {
    let (code, body) = server.api("acme").get(id).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body["status"].as_str().unwrap().to_owned()
}

async fn start_with_max_cascade(backend: Backend) -> Server {
    Server::start_with(
        backend,
        ServerOptions {
            config: Some(format!(
                "[limits]\nmax_cascade = 4\n[realms.acme]\nevents_secrets = [\"{SECRET}\"]\n"
            )),
            ..ServerOptions::default()
        },
    )
    .await
}

async fn a_destroy_larger_than_max_cascade_is_refused_and_changes_nothing(backend: Backend) {
    let server = start_with_max_cascade(backend).await;
    let api = server.api("acme");
    tree(&server, "p", "sid-p", 4).await;
    let outbox_before = server.outbox("acme", "p").await.len();

    let refused = api.destroy_parent("p").await;
    assert_problem(&refused, 422, "CASCADE_TOO_LARGE");
    let detail = refused.1["detail"].as_str().unwrap();
    assert!(
        detail.contains("5 sessions") && detail.contains("limit is 4"),
        "{detail}"
    );
    for id in ["p", "p-c0", "p-c1", "p-c2", "p-c3"] {
        assert_eq!(status_of(&server, id).await, "ACTIVE", "{id}");
    }
    assert_eq!(
        server.outbox("acme", "p").await.len(),
        outbox_before,
        "no logout event"
    );
    // The refusal is in the audit log with its code.
    let (code, audit) = server.admin_get("/admin/audit?realm=acme").await;
    assert_eq!(code, StatusCode::OK, "{audit}");
    let results: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "destroy-parent")
        .filter_map(|r| r["result"].as_str())
        .collect();
    assert!(results.contains(&"CASCADE_TOO_LARGE"), "{audit:#}");

    // A much larger tree is refused after counting one past the limit, not after ending
    // all of it.
    tree(&server, "huge", "sid-huge", 40).await;
    let refused = api.destroy_parent("huge").await;
    assert_problem(&refused, 422, "CASCADE_TOO_LARGE");
    let detail = refused.1["detail"].as_str().unwrap();
    assert!(detail.contains("at least 5 sessions"), "{detail}");
    assert_eq!(status_of(&server, "huge-c39").await, "ACTIVE");

    // One child less and the tree fits.
    let (code, body) = api
        .post("destroy-child", json!({"externalId": "p-c3"}))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, body) = api.destroy_parent("p").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    for id in ["p", "p-c0", "p-c1", "p-c2"] {
        assert_eq!(status_of(&server, id).await, "DESTROYED", "{id}");
    }
}

async fn an_idp_logout_is_never_refused_by_max_cascade(backend: Backend) {
    let server = start_with_max_cascade(backend).await;
    tree(&server, "big", "sid-big", 6).await;
    let logout = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "LOGOUT",
        "realm": "acme",
        "time": chrono::Utc::now().timestamp_millis(),
        "userId": "u-1",
        "sessionId": "sid-big",
    });
    let (code, body) = server.post_event("acme", SECRET, &logout).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(status_of(&server, "big").await, "DESTROYED");
    for c in 0..6 {
        assert_eq!(status_of(&server, &format!("big-c{c}")).await, "DESTROYED");
    }
}

/// Sends `GET /healthz` on `stream` and reads the status line, or `None` within `wait`.
async fn health_on(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(wait, stream.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_client_connections_wait_until_one_closes() {
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions::with_config("[limits]\nmax_client_connections = 2\n".into()),
    )
    .await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut first = TcpStream::connect(&addr).await.unwrap();
    let mut second = TcpStream::connect(&addr).await.unwrap();
    let ok = Some("HTTP/1.1 200 OK".to_owned());
    assert_eq!(health_on(&mut first, Duration::from_secs(5)).await, ok);
    assert_eq!(health_on(&mut second, Duration::from_secs(5)).await, ok);
    // The kernel completes the third handshake (listen backlog), but the server does not
    // take the connection while two are open.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    assert_eq!(
        health_on(&mut third, Duration::from_millis(700)).await,
        None,
        "a third connection is not served while two are open"
    );
    drop(first);
    assert_eq!(health_on_after_write(&mut third).await, ok);
    assert!(started.elapsed() < Duration::from_secs(10));
    // The admin API still works through the freed slot once `third` closes.
    drop(third);
    drop(second);
    let (code, _) = server.admin_get("/admin/connectors").await;
    assert_eq!(code, StatusCode::OK);
}

/// The request was already written by [`health_on`]; read the answer it gets once the
/// connection is accepted.
async fn health_on_after_write(stream: &mut TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().map(str::to_owned)
}

/// Reads until the server closes `stream` (EOF or reset); `None` if it is still open after
/// `wait`. Returns what was read.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_never_hold_the_connection_slots() {
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            config: Some(
                "[limits]\nmax_client_connections = 4\nheader_read_timeout_ms = 600\n\
                 body_read_timeout_ms = 600\nidle_timeout_ms = 2500\n"
                    .into(),
            ),
            ..ServerOptions::default()
        },
    )
    .await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let ok = Some("HTTP/1.1 200 OK".to_owned());

    // A kept-alive connection: answered, then allowed to sit longer than a head may take.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(health_on(&mut idle, Duration::from_secs(5)).await, ok);

    // A head that never ends, and one that trickles a byte every 100 ms (progress does not
    // extend the deadline).
    let mut stuck_head = TcpStream::connect(&addr).await.unwrap();
    stuck_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut trickle = TcpStream::connect(&addr).await.unwrap();
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let (mut trickle_read, mut trickle_write) = trickle.into_split();
    let trickler = tokio::spawn(async move {
        for _ in 0..50 {
            if trickle_write.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // A body that stops after its first byte.
    let mut stuck_body = TcpStream::connect(&addr).await.unwrap();
    stuck_body
        .write_all(
            format!(
                "POST /admin/realms/acme/external-sessions/map-fixed HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
                 Content-Length: 100\r\n\r\n{{",
                common::TOKEN
            )
            .as_bytes(),
        )
        .await
        .unwrap();

    // Every slot is taken now; the slow ones are cut off and a new client gets in.
    let started = Instant::now();
    let mut fresh = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(health_on(&mut fresh, Duration::from_secs(5)).await, ok);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(
        closed_within(&mut stuck_head, Duration::from_secs(3))
            .await
            .is_some()
    );
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), trickle_read.read_to_end(&mut buf));
    assert!(read.await.is_ok(), "the trickled head is cut off");
    trickler.abort();
    let answer = closed_within(&mut stuck_body, Duration::from_secs(3))
        .await
        .expect("the stalled body is cut off");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");

    // The kept-alive connection outlived the head deadline, then closes once idle too long.
    assert_eq!(health_on(&mut idle, Duration::from_secs(5)).await, ok);
    assert!(
        closed_within(&mut idle, Duration::from_secs(6))
            .await
            .is_some(),
        "an idle connection is closed after idle_timeout_ms"
    );
    drop(fresh);
    let (code, _) = server.admin_get("/admin/connectors").await;
    assert_eq!(code, StatusCode::OK);
}
