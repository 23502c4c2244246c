//! OTLP trace export end to end: the real `lockstep serve` with `OTEL_EXPORTER_OTLP_*` set,
//! a real webhook connector, and a small OTLP/HTTP collector on 127.0.0.1 that decodes what
//! arrives (JSON: `ExportTraceServiceRequest` → resourceSpans → scopeSpans → spans).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use common::components::webhook_manifest;
use common::receiver::Receiver;
use common::{Backend, Server, ServerOptions};
use serde_json::Value;

/// One export request as the collector got it.
#[derive(Clone, Debug)]
struct Export {
    content_type: String,
    body: Bytes,
}

/// An OTLP/HTTP trace receiver: `POST /v1/traces`, answered as a collector would.
struct Collector {
    addr: std::net::SocketAddr,
    exports: Arc<Mutex<Vec<Export>>>,
    _server: common::Loopback,
}

impl Collector {
    async fn start() -> Collector {
        let exports: Arc<Mutex<Vec<Export>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(exports.clone());
        Collector {
            addr,
            exports,
            _server: common::serve(listener, app),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn exports(&self) -> Vec<Export> {
        self.exports.lock().unwrap().clone()
    }

    /// Every span received so far (JSON exports only).
    fn spans(&self) -> Vec<Span> {
        self.exports()
            .iter()
            .filter(|e| e.content_type == "application/json")
            .flat_map(|e| spans_of(&serde_json::from_slice(&e.body).unwrap()))
            .collect()
    }

    /// Polls (bounded) until `pick` finds what it wants in the spans received.
    async fn wait_for<T>(&self, timeout: Duration, pick: impl Fn(&[Span]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if let Some(found) = pick(&spans) {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the collector never got the expected spans within {timeout:?}; got {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn receive(
    State(exports): State<Arc<Mutex<Vec<Export>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let json = content_type == "application/json";
    exports.lock().unwrap().push(Export { content_type, body });
    // An empty ExportTraceServiceResponse: full success.
    if json {
        ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            Bytes::new(),
        )
            .into_response()
    }
}

/// A span flattened out of an export, with its resource's attributes.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    resource: HashMap<String, String>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// OTLP JSON attributes (`[{key, value: {stringValue | intValue | boolValue ...}}]`) as text.
fn attributes(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            let key = kv["key"].as_str()?.to_owned();
            let value = kv["value"].as_object()?.values().next()?;
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some((key, text))
        })
        .collect()
}

fn spans_of(request: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in request["resourceSpans"].as_array().into_iter().flatten() {
        let resource = attributes(&rs["resource"]["attributes"]);
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(Span {
                    name: s["name"].as_str().unwrap_or("").to_owned(),
                    trace_id: s["traceId"].as_str().unwrap_or("").to_owned(),
                    span_id: s["spanId"].as_str().unwrap_or("").to_owned(),
                    parent_span_id: s["parentSpanId"].as_str().unwrap_or("").to_owned(),
                    attributes: attributes(&s["attributes"]),
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}

fn otel_env(collector: &Collector, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![(
        "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
        collector.endpoint(),
    )];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

/// A webhook connector `billing` in realm `acme` that posts to `receiver`.
fn billing_connector(receiver: &Receiver) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(dir.path(), "billing", receiver, "", "");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_delivery_and_hook_spans_reach_an_otlp_collector() {
    let collector = Collector::start().await;
    let receiver = Receiver::start().await;
    let dir = billing_connector(&receiver);
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            connectors_dir: Some(dir.path().to_owned()),
            env: otel_env(
                &collector,
                &[
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                    ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                ],
            ),
            ..Default::default()
        },
    )
    .await;

    let (code, body) = server.api("acme").map_parent("p-1", "sid-1").await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let delivered = receiver.wait_for(1, Duration::from_secs(20)).await;
    let event_id = delivered[0].header("webhook-id").unwrap().to_owned();

    let (request, delivery, hook) = collector
        .wait_for(Duration::from_secs(20), |spans| {
            let request = spans
                .iter()
                .find(|s| s.name == "request" && s.attr("external_id") == Some("p-1"))?;
            let delivery = spans
                .iter()
                .find(|s| s.name == "delivery" && s.attr("event_id") == Some(&event_id))?;
            let hook = spans
                .iter()
                .find(|s| s.name == "hook" && s.parent_span_id == delivery.span_id)?;
            Some((request.clone(), delivery.clone(), hook.clone()))
        })
        .await;

    // The request span: realm from the route, external id from the handler, the outcome.
    assert_eq!(request.attr("realm"), Some("acme"), "{request:#?}");
    assert_eq!(request.attr("method"), Some("POST"));
    assert_eq!(
        request.attr("route"),
        Some("/admin/realms/{realm}/external-sessions/map-parent")
    );
    assert_eq!(request.attr("status"), Some("201"));
    assert_eq!(request.parent_span_id, "", "a request starts its own trace");

    // The delivery span: connector and event, and what the session was.
    assert_eq!(delivery.attr("connector"), Some("billing"), "{delivery:#?}");
    assert_eq!(delivery.attr("realm"), Some("acme"));
    assert_eq!(delivery.attr("external_id"), Some("p-1"));
    assert_eq!(delivery.attr("attempt"), Some("1"));
    assert_eq!(delivery.attr("outcome"), Some("delivered"));

    // The hook call is a child of the delivery, in the same trace.
    assert_eq!(hook.trace_id, delivery.trace_id);
    assert_eq!(hook.parent_span_id, delivery.span_id);
    assert_eq!(hook.attr("connector"), Some("billing"), "{hook:#?}");
    assert_eq!(hook.attr("hook"), Some("on-login"));
    assert_eq!(hook.attr("outcome"), Some("ok"));
    let version = hook.attr("version").unwrap();
    assert!(
        version.len() == 16 && version.bytes().all(|b| b.is_ascii_hexdigit()),
        "the connector version: {version}"
    );

    for span in [&request, &delivery, &hook] {
        assert_eq!(
            span.resource.get("service.name").map(String::as_str),
            Some("lockstep")
        );
        assert_eq!(span.trace_id.len(), 32, "{span:#?}");
        assert_eq!(span.span_id.len(), 16, "{span:#?}");
    }
    assert!(
        collector
            .exports()
            .iter()
            .all(|e| e.content_type == "application/json"),
        "OTEL_EXPORTER_OTLP_PROTOCOL=http/json is honoured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_spans_still_queued_for_export() {
    let collector = Collector::start().await;
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            env: otel_env(
                &collector,
                &[
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                    // Nothing leaves on the schedule: only the shutdown can export.
                    ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
                    ("OTEL_SERVICE_NAME", "lockstep-eu-1"),
                    ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
                ],
            ),
            ..Default::default()
        },
    )
    .await;
    let api = server.api("acme");
    assert_eq!(api.map_parent("p-2", "sid-2").await.0, StatusCode::CREATED);
    assert_eq!(api.status_of("p-2").await, "ACTIVE");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        collector.exports().is_empty(),
        "nothing is exported before the schedule or the shutdown"
    );

    let status = server.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    // The shutdown waited for the export: the spans are there the moment the process is gone.
    let spans = collector.spans();
    let with_id: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "request" && s.attr("external_id") == Some("p-2"))
        .collect();
    assert_eq!(with_id.len(), 2, "map-parent and GET: {spans:#?}");
    assert!(
        with_id.iter().any(
            |s| s.attr("route") == Some("/admin/realms/{realm}/external-sessions/{externalId}")
        )
    );
    for span in with_id {
        assert_eq!(span.attr("realm"), Some("acme"));
        assert_eq!(
            span.resource.get("service.name").map(String::as_str),
            Some("lockstep-eu-1"),
            "OTEL_SERVICE_NAME wins over the built-in name"
        );
        assert_eq!(
            span.resource
                .get("deployment.environment")
                .map(String::as_str),
            Some("test"),
            "OTEL_RESOURCE_ATTRIBUTES is read"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_is_the_default_protocol() {
    let collector = Collector::start().await;
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            env: otel_env(&collector, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        server.api("acme").map_parent("p-3", "sid-3").await.0,
        StatusCode::CREATED
    );
    // Protobuf carries strings as raw UTF-8: the attribute values are visible in the bytes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let exports = collector.exports();
        let found = exports.iter().any(|e| {
            e.content_type == "application/x-protobuf"
                && contains(&e.body, b"p-3")
                && contains(&e.body, b"service.name")
                && contains(&e.body, b"lockstep")
        });
        if found {
            assert!(
                exports
                    .iter()
                    .all(|e| e.content_type == "application/x-protobuf"),
                "{exports:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no protobuf export with the request span: {exports:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs `lockstep serve` with `env` and expects it to refuse to start (bounded); returns
/// its stderr.
async fn refused_start(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
        .arg(format!("sqlite://{}/lockstep.db", dir.path().display()))
        .env("LOCKSTEP_ADMIN_TOKEN", common::TOKEN)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("lockstep should refuse to start at once")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{env:?}: {stderr}");
    assert!(!stdout.contains("listening on"), "{env:?}: {stdout}");
    assert!(!stderr.contains("panicked"), "{env:?}: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_bad_endpoints_stop_start_up_with_a_clear_error() {
    let stderr = refused_start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ])
    .await;
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported in this build"),
        "{stderr}"
    );
    let stderr =
        refused_start(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://exa mple:4318")]).await;
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=\"http://exa mple:4318\" is not a usable OTLP endpoint"),
        "{stderr}"
    );
    let stderr = refused_start(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318")]).await;
    assert!(stderr.contains("https is not supported"), "{stderr}");
}
