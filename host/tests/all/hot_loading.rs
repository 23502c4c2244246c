//! Issue 5, black box: connectors added, replaced, removed, disabled and enabled at run time
//! through the watched directory, the admin API and the CLI, against the real binary, real
//! webhook components built from `connectors/`, real HTTP receivers on 127.0.0.1, and both
//! backends (PostgreSQL for the multi-instance case).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::components::{component, workspace};
use common::receiver::Receiver;
use common::{Backend, Server, ServerOptions, TOKEN, assert_problem, skip_postgres};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Digest;

on_both_backends!(
    swapping_under_load_loses_nothing_and_serves_each_event_with_a_current_version,
    disabled_connectors_hold_their_events_until_enabled,
);

/// A webhook manifest; both receivers' origins are allowed, so a swap only moves `url`.
fn webhook_manifest(name: &str, url: &str, origins: &[String], component: Option<&str>) -> String {
    let hosts: Vec<String> = origins.iter().map(|o| format!("\"{o}\"")).collect();
    let component = component
        .map(|c| format!("component = \"{c}\"\n"))
        .unwrap_or_default();
    format!(
        "name = \"{name}\"\n{component}realms = [\"*\"]\nallowed_hosts = [{}]\ntimeout_ms = 2000\n\
         [policy]\non_failure = \"retry\"\nmax_attempts = 20\nbackoff_ms = 20\nmax_backoff_ms = 200\n\
         [config]\nurl = \"{url}\"\n",
        hosts.join(", ")
    )
}

/// Replaces a file the way a careful operator (or a config-management tool) does.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn webhook_bytes() -> Vec<u8> {
    std::fs::read(component("webhook")).unwrap()
}

fn trap_at_start_bytes() -> Vec<u8> {
    wat::parse_file(workspace().join("tests/fixtures/trap-at-start.wat")).unwrap()
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

/// Polls `GET /admin/connectors/{name}` until `pred` holds (bounded).
async fn wait_connector(
    server: &Server,
    name: &str,
    timeout: Duration,
    pred: impl Fn(StatusCode, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = server.admin_get(&format!("/admin/connectors/{name}")).await;
        if pred(code, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "connector {name} never reached the expected state: {code} {body:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the deliveries of both webhook connectors look like, for a failure message: rows by
/// status per connector, and the events one connector has and the other lacks.
async fn explain_missing(server: &Server) -> String {
    let mut out = String::new();
    let mut events: HashMap<&str, HashMap<String, Value>> = HashMap::new();
    for name in ["hook-dir", "hook-api"] {
        let all = server.all_deliveries(name).await;
        let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
        for d in &all {
            *by_status.entry(d["status"].to_string()).or_default() += 1;
        }
        out += &format!("{name}: {} deliveries {by_status:?}\n", all.len());
        events.insert(
            name,
            all.into_iter()
                .map(|d| (d["eventId"].as_str().unwrap_or("").to_owned(), d))
                .collect(),
        );
    }
    for (a, b) in [("hook-dir", "hook-api"), ("hook-api", "hook-dir")] {
        let missing: Vec<&Value> = events[a]
            .iter()
            .filter(|(id, _)| !events[b].contains_key(*id))
            .map(|(_, d)| d)
            .collect();
        out += &format!("{} events routed to {a} but not to {b}", missing.len());
        if let Some(d) = missing.iter().min_by_key(|d| d["createdAt"].to_string()) {
            out += &format!("; earliest: {d}");
        }
        if let Some(d) = missing.iter().max_by_key(|d| d["createdAt"].to_string()) {
            out += &format!("; latest: {d}");
        }
        out += "\n";
    }
    out
}

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
}

async fn swapping_under_load_loses_nothing_and_serves_each_event_with_a_current_version(
    backend: Backend,
) {
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    let origins = [a.origin(), b.origin()];
    let url = |i: usize, path: &str| {
        if i.is_multiple_of(2) {
            a.url(path)
        } else {
            b.url(path)
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let wasm = component("webhook").display().to_string();
    let manifest_path = dir.path().join("hook-dir.toml");
    // Versions are content hashes: the `swap` key keeps the alternating manifests distinct.
    let dir_manifest = |i: usize| {
        webhook_manifest("hook-dir", &url(i, "/dir"), &origins, Some(&wasm))
            + &format!("swap = \"{i}\"\n")
    };
    let api_manifest = |i: usize| {
        webhook_manifest("hook-api", &url(i, "/api"), &origins, None) + &format!("swap = \"{i}\"\n")
    };
    std::fs::write(&manifest_path, dir_manifest(0)).unwrap();
    let server = Arc::new(
        Server::start_with(
            backend,
            ServerOptions {
                connectors_dir: Some(dir.path().to_owned()),
                ..ServerOptions::default()
            },
        )
        .await,
    );
    let (code, body) = server
        .put_connector("hook-api", &api_manifest(0), Some(webhook_bytes()))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    // Versions in the order they were swapped in, with when: index parity = receiver.
    let mut versions: HashMap<&str, Vec<(String, DateTime<Utc>)>> = HashMap::new();
    versions.insert(
        "hook-api",
        vec![(
            body["connector"]["version"].as_str().unwrap().to_owned(),
            time(&body["connector"]["loadedAt"]),
        )],
    );
    let first = wait_connector(&server, "hook-dir", Duration::from_secs(5), |c, _| c == 200).await;
    versions.insert(
        "hook-dir",
        vec![(
            first["version"].as_str().unwrap().to_owned(),
            time(&first["loadedAt"]),
        )],
    );

    // Steady load: map-parent then destroy-parent, from four clients.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let sessions = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (server, stop, errors, sessions) = (
            server.clone(),
            stop.clone(),
            errors.clone(),
            sessions.clone(),
        );
        clients.push(tokio::spawn(async move {
            let api = server.api("acme");
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 5_000 {
                let id = format!("s-{c}-{n}");
                let (code, body) = api.map_parent(&id, &format!("sid-{id}")).await;
                if code != StatusCode::CREATED {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("map {id}: {code} {body}"));
                }
                let (code, body) = api.destroy_parent(&id).await;
                if code != StatusCode::OK {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("destroy {id}: {code} {body}"));
                }
                sessions.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    // Ten replacements through each path, alternating the receiver.
    for i in 1..=10 {
        let previous = versions["hook-dir"].last().unwrap().0.clone();
        replace_file(&manifest_path, dir_manifest(i).as_bytes());
        let now = wait_connector(&server, "hook-dir", Duration::from_secs(10), |_, b| {
            b["version"].as_str().is_some_and(|v| v != previous)
        })
        .await;
        versions.get_mut("hook-dir").unwrap().push((
            now["version"].as_str().unwrap().to_owned(),
            time(&now["loadedAt"]),
        ));
        let (code, body) = server
            .put_connector("hook-api", &api_manifest(i), None)
            .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], "replaced", "{body}");
        versions.get_mut("hook-api").unwrap().push((
            body["connector"]["version"].as_str().unwrap().to_owned(),
            time(&body["connector"]["loadedAt"]),
        ));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "API errors under swaps: {errors:#?}");
    let sessions = sessions.load(Ordering::Relaxed);
    assert!(sessions > 40, "the load ran: {sessions} sessions");

    // Everything is delivered: a login and a logout per session, per connector.
    let deadline = Instant::now() + Duration::from_secs(120);
    for name in ["hook-dir", "hook-api"] {
        loop {
            let (_, b) = server.admin_get(&format!("/admin/connectors/{name}")).await;
            if b["deliveries"]["pending"] == 0
                && b["deliveries"]["deliveredSinceStart"].as_u64() >= Some(2 * sessions as u64)
            {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{name} did not deliver all {} events: {b:#}\n{}",
                    2 * sessions,
                    explain_missing(&server).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let received: Vec<_> = a.requests().into_iter().chain(b.requests()).collect();
    let a_ids: HashSet<(String, String)> = a
        .requests()
        .iter()
        .map(|r| {
            (
                r.path.clone(),
                r.json()["eventId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let b_ids: HashSet<(String, String)> = b
        .requests()
        .iter()
        .map(|r| {
            (
                r.path.clone(),
                r.json()["eventId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        received.len(),
        a_ids.len() + b_ids.len(),
        "no event was delivered twice"
    );
    for (name, path) in [("hook-dir", "/dir"), ("hook-api", "/api")] {
        let list = &versions[name];
        let deliveries = server.all_deliveries(name).await;
        assert_eq!(
            deliveries.len(),
            2 * sessions,
            "{name}: one delivery per event"
        );
        let mut served = HashSet::new();
        for d in &deliveries {
            assert_eq!(d["status"], "delivered", "{name}: {d:#}");
            assert_eq!(d["attempts"], 1, "{name}: no failed attempt: {d:#}");
            let version = d["connectorVersion"].as_str().unwrap();
            let index = list
                .iter()
                .position(|(v, _)| v == version)
                .unwrap_or_else(|| panic!("{name}: unknown version {version}"));
            served.insert(index);
            // The version active when the delivery was created (it is claimed later): allow
            // one millisecond, the resolution of `createdAt`.
            let created = time(&d["createdAt"]);
            let active = list
                .iter()
                .rposition(|(_, at)| *at + chrono::Duration::milliseconds(1) < created)
                .unwrap_or(0);
            assert!(
                index >= active,
                "{name}: delivery {} created at {created} (version #{active} active) was served \
                 by the older version #{index}",
                d["id"]
            );
            let key = (path.to_owned(), d["eventId"].as_str().unwrap().to_owned());
            let receiver = if index.is_multiple_of(2) {
                &a_ids
            } else {
                &b_ids
            };
            assert!(
                receiver.contains(&key),
                "{name}: event {} should have reached the receiver of version #{index}",
                key.1
            );
        }
        eprintln!(
            "{name}: {} deliveries served by {} of {} versions",
            deliveries.len(),
            served.len(),
            list.len()
        );
    }
    let text = server.metrics().await;
    assert_eq!(
        metric(
            &text,
            "lockstep_connector_swaps_total{connector=\"hook-api\"}"
        ),
        11.0
    );
    assert!(
        metric(
            &text,
            "lockstep_hook_calls_total{connector=\"hook-dir\",outcome=\"delivered\"}"
        ) >= (2 * sessions) as f64
    );
}

async fn disabled_connectors_hold_their_events_until_enabled(backend: Backend) {
    let receiver = Receiver::start().await;
    let server = Server::start(backend).await;
    let manifest = webhook_manifest("hook", &receiver.url("/hook"), &[receiver.origin()], None);
    let (code, body) = server
        .put_connector("hook", &manifest, Some(webhook_bytes()))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = server
        .admin_post("/admin/connectors/hook/disable", json!({}))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "disabled");
    let api = server.api("acme");
    for i in 0..5 {
        assert_eq!(
            api.map_parent(&format!("p{i}"), "sid").await.0,
            StatusCode::CREATED
        );
    }
    wait_connector(&server, "hook", Duration::from_secs(10), |_, b| {
        b["deliveries"]["pending"] == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        receiver.requests().is_empty(),
        "a disabled connector is never called"
    );
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, "lockstep_connector_enabled{connector=\"hook\"}"),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "lockstep_deliveries_queued{connector=\"hook\",status=\"pending\"}"
        ),
        5.0
    );
    let (code, body) = server
        .admin_post("/admin/connectors/hook/enable", json!({}))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "active");
    let got = receiver.wait_for(5, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 5);
    wait_connector(&server, "hook", Duration::from_secs(10), |_, b| {
        b["deliveries"]["pending"] == 0
    })
    .await;
    let (code, body) = server
        .admin_post("/admin/connectors/nope/disable", json!({}))
        .await;
    assert_problem(&(code, body), 404, "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_versions_are_refused_and_the_previous_one_keeps_serving() {
    let receiver = Receiver::start().await;
    let origins = [receiver.origin()];
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("hook.wasm");
    std::fs::write(&wasm, webhook_bytes()).unwrap();
    let manifest_path = dir.path().join("hook-dir.toml");
    std::fs::write(
        &manifest_path,
        webhook_manifest(
            "hook-dir",
            &receiver.url("/dir"),
            &origins,
            Some("hook.wasm"),
        ),
    )
    .unwrap();
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            connectors_dir: Some(dir.path().to_owned()),
            ..ServerOptions::default()
        },
    )
    .await;
    let api_manifest = webhook_manifest("hook-api", &receiver.url("/api"), &origins, None);
    let (code, body) = server
        .put_connector("hook-api", &api_manifest, Some(webhook_bytes()))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let api_version = body["connector"]["version"].as_str().unwrap().to_owned();
    let dir_version = server.admin_get("/admin/connectors/hook-dir").await.1["version"]
        .as_str()
        .unwrap()
        .to_owned();

    // Through the API: each refused with its reason; the old version stays.
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "not a component",
            b"definitely not wasm".to_vec(),
            "not a loadable component",
        ),
        ("wrong world", b"\0asm\x0d\0\x01\0".to_vec(), "hooks"),
        (
            "trap at start",
            trap_at_start_bytes(),
            "fails when instantiated",
        ),
    ];
    for (i, (what, bytes, needle)) in cases.into_iter().enumerate() {
        let manifest = format!("{api_manifest}attempt = \"{i}\"\n");
        let got = server
            .put_connector("hook-api", &manifest, Some(bytes))
            .await;
        assert_problem(&got, 422, "INVALID_COMPONENT");
        assert!(
            got.1["detail"].as_str().unwrap().contains(needle),
            "{what}: {}",
            got.1
        );
        let now = server.admin_get("/admin/connectors/hook-api").await.1;
        assert_eq!(now["version"], api_version.as_str(), "{what}");
        assert!(
            now["lastError"]["message"]
                .as_str()
                .unwrap()
                .contains(needle),
            "{now:#}"
        );
    }
    let got = server
        .put_connector("hook-api", "name = \"hook-api\"\ntimeout_ms = 0\n", None)
        .await;
    assert_problem(&got, 400, "INVALID_MANIFEST");
    assert!(
        got.1["detail"].as_str().unwrap().contains("timeout_ms"),
        "{}",
        got.1
    );
    let got = server
        .put_connector(
            "hook-api",
            &api_manifest.replace("\"hook-api\"", "\"other\""),
            None,
        )
        .await;
    assert_problem(&got, 400, "VALIDATION");

    // Through the directory: a partial write, garbage, a trap at start.
    let good = webhook_bytes();
    let mut last_at = Value::Null;
    for (what, bytes, needle) in [
        (
            "partial write",
            good[..good.len() / 2].to_vec(),
            "not a loadable component",
        ),
        ("garbage", b"garbage".to_vec(), "not a loadable component"),
        (
            "trap at start",
            trap_at_start_bytes(),
            "fails when instantiated",
        ),
    ] {
        std::fs::write(&wasm, &bytes).unwrap();
        let now = wait_connector(&server, "hook-dir", Duration::from_secs(10), |_, b| {
            b["lastError"]["at"] != last_at
                && b["lastError"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(needle))
        })
        .await;
        last_at = now["lastError"]["at"].clone();
        assert_eq!(
            now["version"],
            dir_version.as_str(),
            "{what}: the old version serves"
        );
    }
    // Both old versions still serve.
    let api = server.api("acme");
    assert_eq!(api.map_parent("p1", "sid").await.0, StatusCode::CREATED);
    let got = receiver.wait_for(2, Duration::from_secs(10)).await;
    let paths: HashSet<_> = got.iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, HashSet::from(["/dir".to_owned(), "/api".to_owned()]));

    // A good component with a new manifest: swapped in, error cleared.
    std::fs::write(&wasm, &good).unwrap();
    replace_file(
        &manifest_path,
        webhook_manifest(
            "hook-dir",
            &receiver.url("/dir2"),
            &origins,
            Some("hook.wasm"),
        )
        .as_bytes(),
    );
    let now = wait_connector(&server, "hook-dir", Duration::from_secs(10), |_, b| {
        b["version"].as_str() != Some(dir_version.as_str())
    })
    .await;
    assert!(now["lastError"].is_null(), "{now:#}");
    assert_eq!(api.map_parent("p2", "sid").await.0, StatusCode::CREATED);
    receiver.wait_for(4, Duration::from_secs(10)).await;
    assert!(receiver.requests().iter().any(|r| r.path == "/dir2"));

    // Removing the manifest unloads the connector; its events are held, not dropped.
    std::fs::remove_file(&manifest_path).unwrap();
    wait_connector(&server, "hook-dir", Duration::from_secs(10), |c, _| {
        c == 404
    })
    .await;
    assert_eq!(api.map_parent("p3", "sid").await.0, StatusCode::CREATED);
    let text = server.metrics().await;
    assert!(
        metric(
            &text,
            "lockstep_connector_rejected_total{connector=\"hook-api\"}"
        ) >= 3.0
    );
    assert!(
        metric(
            &text,
            "lockstep_connector_rejected_total{connector=\"hook-dir\"}"
        ) >= 3.0
    );
}

/// A connector that failed at start (never loaded) is listed as `failed`; fixing its files is
/// enough: the watcher loads it, the failure is cleared everywhere, and it delivers. A
/// failed manifest that is removed is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_that_failed_at_start_loads_once_its_files_are_fixed() {
    let receiver = Receiver::start().await;
    let origins = [receiver.origin()];
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("hook.wasm");
    std::fs::write(&wasm, trap_at_start_bytes()).unwrap();
    let manifest_path = dir.path().join("hook-dir.toml");
    let manifest = webhook_manifest(
        "hook-dir",
        &receiver.url("/dir"),
        &origins,
        Some("hook.wasm"),
    );
    std::fs::write(&manifest_path, &manifest).unwrap();
    // A manifest that does not parse: listed under its file's name.
    let unparsable = dir.path().join("typo.toml");
    std::fs::write(
        &unparsable,
        "name = \"typo\"\ncomponent = \"hook.wasm\"\nrealm = [\"*\"]\n",
    )
    .unwrap();
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            connectors_dir: Some(dir.path().to_owned()),
            ..ServerOptions::default()
        },
    )
    .await;
    let ready = |server: &Server| {
        let url = format!("{}/readyz", server.base);
        async move {
            let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            body
        }
    };

    let failed = wait_connector(&server, "hook-dir", Duration::from_secs(10), |c, _| {
        c == StatusCode::OK
    })
    .await;
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert!(
        failed["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("fails when instantiated"),
        "{failed:#}"
    );
    let typo = server.admin_get("/admin/connectors/typo").await.1;
    assert_eq!(typo["state"], "failed", "{typo:#}");
    assert!(
        typo["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("realm"),
        "{typo:#}"
    );
    assert_eq!(
        ready(&server).await["failedConnectors"],
        json!(["hook-dir", "typo"])
    );
    // Not loaded: its events are not routed to it (nothing is sent anywhere).
    let api = server.api("acme");
    assert_eq!(api.map_parent("p1", "sid").await.0, StatusCode::CREATED);

    // The component is fixed: loaded, error cleared, delivering.
    replace_file(&wasm, &webhook_bytes());
    let loaded = wait_connector(&server, "hook-dir", Duration::from_secs(10), |_, b| {
        b["state"] == "active"
    })
    .await;
    assert!(loaded["lastError"].is_null(), "{loaded:#}");
    assert!(loaded["version"].is_string(), "{loaded:#}");
    assert_eq!(api.map_parent("p2", "sid").await.0, StatusCode::CREATED);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !receiver
        .requests()
        .iter()
        .any(|r| r.path == "/dir" && r.json()["externalId"] == "p2")
    {
        assert!(Instant::now() < deadline, "p2 never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The bad manifest is removed: forgotten, and every configured connector serves.
    std::fs::remove_file(&unparsable).unwrap();
    wait_connector(&server, "typo", Duration::from_secs(10), |c, _| {
        c == StatusCode::NOT_FOUND
    })
    .await;
    let body = ready(&server).await;
    assert_eq!(body["connectorsServing"], true, "{body}");
    assert_eq!(body["failedConnectors"], json!([]), "{body}");
    let text = server.metrics().await;
    assert!(!text.contains("lockstep_connector_failed{"), "{text}");
    let (_, list) = server.admin_get("/admin/connectors").await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hook-dir"], "{list:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_states_survive_a_restart_without_recompiling() {
    let receiver = Receiver::start().await;
    let cache = tempfile::tempdir().unwrap();
    let opts = ServerOptions {
        compile_cache: Some(cache.path().to_owned()),
        log: "info",
        ..ServerOptions::default()
    };
    let server = Server::start_with(Backend::Sqlite, opts.clone()).await;
    let manifest = webhook_manifest("hook", &receiver.url("/hook"), &[receiver.origin()], None);
    let (code, body) = server
        .put_connector("hook", &manifest, Some(webhook_bytes()))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(body["connector"]["compiledFrom"], "compiler");
    assert_eq!(body["connector"]["world"], "lockstep:connector@0.3.0");
    let version = body["connector"]["version"].clone();
    // Identical bytes and manifest: a no-op.
    let (code, body) = server
        .put_connector("hook", &manifest, Some(webhook_bytes()))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "unchanged");
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, "lockstep_compile_cache_total{outcome=\"miss\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "lockstep_connector_swaps_total{connector=\"hook\"}"),
        1.0
    );
    // Disabled, with an event held, when the process dies.
    server
        .admin_post("/admin/connectors/hook/disable", json!({}))
        .await;
    assert_eq!(
        server.api("acme").map_parent("p1", "sid").await.0,
        StatusCode::CREATED
    );
    let (url, dir) = server.kill().await;

    let server = Server::start_on(Backend::Sqlite, url, dir, opts).await;
    let (code, body) = server.admin_get("/admin/connectors/hook").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["version"], version);
    assert_eq!(body["source"], "api");
    assert_eq!(body["state"], "disabled");
    assert_eq!(body["compiledFrom"], "cache");
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, "lockstep_compile_cache_total{outcome=\"hit\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "lockstep_compile_cache_total{outcome=\"miss\"}"),
        0.0
    );
    server
        .admin_post("/admin/connectors/hook/enable", json!({}))
        .await;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["externalId"], "p1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_bad_uploads_and_foreign_names() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = component("webhook").display().to_string();
    std::fs::write(
        dir.path().join("hook-dir.toml"),
        webhook_manifest(
            "hook-dir",
            "http://127.0.0.1:9/x",
            &["http://127.0.0.1:9".to_owned()],
            Some(&wasm),
        ),
    )
    .unwrap();
    let key = "scoped-key";
    let config = format!(
        "[[api_keys]]\nid = \"portal\"\nsha256 = \"{}\"\nrealms = [\"*\"]\npermissions = [\"users:manage\"]\n",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    );
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            connectors_dir: Some(dir.path().to_owned()),
            config: Some(config),
            ..ServerOptions::default()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{}/admin/connectors{p}", server.base);
    let send = |r: reqwest::RequestBuilder| async move {
        let res = r.send().await.unwrap();
        let code = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        (code, body)
    };
    assert_problem(&send(client.get(url(""))).await, 401, "UNAUTHORIZED");
    assert_problem(
        &send(client.get(url("")).bearer_auth(key)).await,
        403,
        "FORBIDDEN",
    );
    let manifest = webhook_manifest("hook", "http://127.0.0.1:9/x", &[], None);
    assert_problem(
        &send(
            client
                .put(url("/hook"))
                .bearer_auth(TOKEN)
                .json(&json!({"manifest": manifest})),
        )
        .await,
        415,
        "VALIDATION",
    );
    let form = || reqwest::multipart::Form::new();
    for (what, form, code, problem) in [
        (
            "no manifest",
            form().text("component", "x"),
            400,
            "VALIDATION",
        ),
        (
            "unknown part",
            form().text("manifest", manifest.clone()).text("extra", "x"),
            400,
            "VALIDATION",
        ),
        (
            "manifest twice",
            form()
                .text("manifest", manifest.clone())
                .text("manifest", manifest.clone()),
            400,
            "VALIDATION",
        ),
        (
            "no component stored",
            form().text("manifest", manifest.clone()),
            400,
            "VALIDATION",
        ),
        (
            "bad name",
            form().text("manifest", manifest.replace("\"hook\"", "\"a b\"")),
            400,
            "INVALID_MANIFEST",
        ),
    ] {
        let got = send(client.put(url("/hook")).bearer_auth(TOKEN).multipart(form)).await;
        assert_eq!(got.0.as_u16(), code, "{what}: {}", got.1);
        assert_eq!(got.1["code"], problem, "{what}: {}", got.1);
    }
    // Too large: refused with 413 before the body is read.
    let huge = vec![0u8; lockstep::lifecycle::MAX_COMPONENT_BYTES + 1];
    let got = send(
        client.put(url("/hook")).bearer_auth(TOKEN).multipart(
            form()
                .text("manifest", manifest.clone())
                .part("component", reqwest::multipart::Part::bytes(huge)),
        ),
    )
    .await;
    assert_problem(&got, 413, "PAYLOAD_TOO_LARGE");
    // Names owned by the directory cannot be uploaded over or deleted.
    let got = server
        .put_connector(
            "hook-dir",
            &manifest.replace("\"hook\"", "\"hook-dir\""),
            Some(webhook_bytes()),
        )
        .await;
    assert_problem(&got, 409, "CONFLICT");
    assert!(
        got.1["detail"].as_str().unwrap().contains("directory"),
        "{}",
        got.1
    );
    assert_problem(
        &server.admin_delete("/admin/connectors/hook-dir").await,
        409,
        "CONFLICT",
    );
    assert_problem(
        &server.admin_delete("/admin/connectors/nope").await,
        404,
        "NOT_FOUND",
    );
    assert_problem(
        &server.admin_get("/admin/connectors/nope").await,
        404,
        "NOT_FOUND",
    );
    assert_problem(
        &server.admin_get("/admin/connectors/a%20b").await,
        400,
        "VALIDATION",
    );
    // Nothing above was stored.
    let (code, body) = server.admin_get("/admin/connectors").await;
    assert_eq!(code, StatusCode::OK);
    let names: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hook-dir"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_loads_lists_disables_and_removes_connectors() {
    let receiver = Receiver::start().await;
    let server = Server::start(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("hook-cli.toml");
    std::fs::write(
        &manifest,
        webhook_manifest(
            "hook-cli",
            &receiver.url("/cli"),
            &[receiver.origin()],
            Some(&component("webhook").display().to_string()),
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .arg("connectors")
            .args(["--url", &server.base, "--token", TOKEN])
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["load", manifest.to_str().unwrap()]);
    assert!(
        ok && out.starts_with("created hook-cli version "),
        "{out}{err}"
    );
    let (ok, out, err) = cli(&["load", manifest.to_str().unwrap()]);
    assert!(ok && out.starts_with("unchanged hook-cli"), "{out}{err}");
    let (ok, out, _) = cli(&["list"]);
    assert!(
        ok && out.lines().nth(1).unwrap().starts_with("hook-cli "),
        "{out}"
    );
    assert!(out.contains(" api ") && out.contains(" active "), "{out}");
    assert_eq!(
        server.api("acme").map_parent("p1", "sid").await.0,
        StatusCode::CREATED
    );
    receiver.wait_for(1, Duration::from_secs(10)).await;
    let (ok, out, _) = cli(&["disable", "hook-cli", "--json"]);
    assert!(ok, "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "disabled"
    );
    let (ok, out, _) = cli(&["remove", "hook-cli"]);
    assert!(ok && out.trim() == "removed hook-cli", "{out}");
    let (ok, _, err) = cli(&["remove", "hook-cli"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "connectors",
            "--url",
            &server.base,
            "--token",
            "wrong",
            "list",
        ])
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(!ok && err.contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_instance_reaches_every_instance() {
    if skip_postgres() {
        eprintln!("LOCKSTEP_SKIP_POSTGRES=1: skipping");
        return;
    }
    let receiver = Receiver::start().await;
    let first = Server::start(Backend::Postgres).await;
    let others = |url: String| Server::start_on(Backend::Postgres, url, None, Default::default());
    let second = others(first.database_url.clone()).await;
    let third = others(first.database_url.clone()).await;
    // Each change is made on one instance and awaited (bounded) on the other two.
    async fn reaches(on: [&Server; 2], pred: impl Fn(StatusCode, &Value) -> bool) {
        for server in on {
            wait_connector(server, "hook", Duration::from_secs(4), &pred).await;
        }
    }
    let manifest =
        |path: &str| webhook_manifest("hook", &receiver.url(path), &[receiver.origin()], None);
    let (code, body) = first
        .put_connector("hook", &manifest("/one"), Some(webhook_bytes()))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let version = body["connector"]["version"].as_str().unwrap().to_owned();
    let started = Instant::now();
    reaches([&second, &third], |_, b| {
        b["version"].as_str() == Some(version.as_str())
    })
    .await;
    eprintln!(
        "upload reached the other instances in {:?}",
        started.elapsed()
    );
    let (code, body) = third.put_connector("hook", &manifest("/two"), None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let version = body["connector"]["version"].as_str().unwrap().to_owned();
    reaches([&first, &second], |_, b| {
        b["version"].as_str() == Some(version.as_str())
    })
    .await;
    first
        .admin_post("/admin/connectors/hook/disable", json!({}))
        .await;
    reaches([&second, &third], |_, b| b["state"] == "disabled").await;
    // Held on every instance while disabled; delivered once after enable from another one.
    assert_eq!(
        second.api("acme").map_parent("p1", "sid").await.0,
        StatusCode::CREATED
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.requests().is_empty());
    second
        .admin_post("/admin/connectors/hook/enable", json!({}))
        .await;
    reaches([&first, &third], |_, b| b["state"] == "active").await;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].path, "/two");
    assert_eq!(
        first.admin_delete("/admin/connectors/hook").await.0,
        StatusCode::NO_CONTENT
    );
    reaches([&second, &third], |c, _| c == 404).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1, "delivered exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_calls_finish_on_the_old_version_and_retries_move_to_the_new_one() {
    let slow = Receiver::start().await;
    let failing = Receiver::start().await;
    let good = Receiver::start().await;
    let origins = [slow.origin(), failing.origin(), good.origin()];
    let server = Server::start(Backend::Sqlite).await;
    let api = server.api("acme");

    // A call in flight when the swap happens finishes on the version it started with.
    slow.set_delay(Duration::from_millis(1_500));
    let (code, body) = server
        .put_connector(
            "hook",
            &webhook_manifest("hook", &slow.url("/slow"), &origins, None),
            Some(webhook_bytes()),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let old = body["connector"]["version"].as_str().unwrap().to_owned();
    assert_eq!(api.map_parent("p1", "sid").await.0, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    let (code, body) = server
        .put_connector(
            "hook",
            &webhook_manifest("hook", &good.url("/good"), &origins, None),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert!(
        started.elapsed() < Duration::from_millis(1_000),
        "the swap does not wait for calls in flight"
    );
    let got = slow.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["externalId"], "p1");
    let done = server
        .wait_deliveries("connector=hook", Duration::from_secs(10), |d| {
            d.len() == 1 && d[0]["status"] == "delivered"
        })
        .await;
    assert_eq!(done[0]["attempts"], 1);
    assert_eq!(done[0]["connectorVersion"], old.as_str());
    assert!(
        good.requests().is_empty(),
        "the in-flight call was not repeated"
    );

    // Deliveries failing on one version are retried on its replacement.
    failing.set_status(503);
    let (code, body) = server
        .put_connector(
            "hook",
            &webhook_manifest("hook", &failing.url("/failing"), &origins, None),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let failing_version = body["connector"]["version"].as_str().unwrap().to_owned();
    for id in ["p2", "p3"] {
        assert_eq!(api.map_parent(id, "sid").await.0, StatusCode::CREATED);
    }
    server
        .wait_deliveries(
            "connector=hook&status=pending",
            Duration::from_secs(10),
            |d| d.len() == 2 && d.iter().all(|x| x["attempts"].as_i64() >= Some(2)),
        )
        .await;
    let (code, body) = server
        .put_connector(
            "hook",
            &(webhook_manifest("hook", &good.url("/good"), &origins, None) + "fixed = \"1\"\n"),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let new = body["connector"]["version"].as_str().unwrap().to_owned();
    let done = server
        .wait_deliveries("connector=hook", Duration::from_secs(10), |d| {
            d.len() == 3 && d.iter().all(|x| x["status"] == "delivered")
        })
        .await;
    for d in done.iter().filter(|d| d["externalId"] != "p1") {
        let (_, detail) = server
            .admin_get(&format!("/admin/deliveries/{}", d["id"]))
            .await;
        let history = detail["history"].as_array().unwrap();
        let (last, earlier) = history.split_last().unwrap();
        assert!(!earlier.is_empty(), "{detail:#}");
        assert!(
            earlier
                .iter()
                .all(|a| a["outcome"] == "retry"
                    && a["connectorVersion"] == failing_version.as_str()),
            "{detail:#}"
        );
        assert_eq!(last["outcome"], "delivered");
        assert_eq!(last["connectorVersion"], new.as_str(), "{detail:#}");
        // The delivering attempt is kept on the delivery row, the failed ones as rows of
        // their own: the history still reads as one numbered sequence.
        assert_eq!(last["attempt"], earlier.len() + 1, "{detail:#}");
        assert_eq!(last["error"], serde_json::Value::Null, "{detail:#}");
        let (started, finished) = (
            last["startedAt"].as_str().unwrap(),
            last["finishedAt"].as_str().unwrap(),
        );
        assert!(started <= finished, "{detail:#}");
    }
    assert_eq!(good.requests().len(), 2);
}
