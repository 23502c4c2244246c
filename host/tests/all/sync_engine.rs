//! The sync engine end to end: the real binary, real connector components (webhook and the
//! hostile fixtures) and real HTTP receivers on 127.0.0.1, on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::components::{unsigned_webhook_manifest, webhook_manifest, write_manifest};
use common::receiver::Receiver;
use common::{Backend, Server, ServerOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    webhook_receives_login_and_one_logout_per_destroyed_session,
    failed_deliveries_retry_then_dead_letter_and_replay_delivers_them,
    log_and_alert_policies_do_not_retry,
    events_are_not_echoed_to_their_origin_system,
    hostile_connectors_fail_with_reasons_while_the_api_and_others_keep_working,
    sigkill_with_pending_events_loses_nothing,
    a_graceful_stop_finishes_calls_and_gives_back_what_it_claimed_ahead,
    a_graceful_stop_starts_no_call_that_waited_for_a_free_call_slot,
    deliveries_api_is_for_operators_only_and_validates_input,
    refresh_events_reach_only_connectors_that_subscribe_to_them,
    a_slow_connector_holds_only_its_own_lane,
    a_broken_connector_at_start_is_reported_and_the_others_serve,
    new_sessions_wait_for_a_delivery_backlog_and_logouts_never_do,
    a_sessions_deliveries_are_listed_by_session_and_shown_on_its_tree,
);

const FAST_RETRY: &str =
    "[policy]\non_failure = \"retry\"\nmax_attempts = 3\nbackoff_ms = 20\nmax_backoff_ms = 100\n";

/// A legacy system that answers each call after `delay`, and a webhook connector `legacy`
/// that calls it one call at a time (its manifest in the returned directory).
async fn one_call_at_a_time(delay: Duration) -> (Receiver, tempfile::TempDir) {
    let receiver = Receiver::start().await;
    receiver.set_delay(delay);
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(
        dir.path(),
        "legacy",
        &receiver,
        "concurrency = 1",
        FAST_RETRY,
    );
    (receiver, dir)
}

async fn start(backend: Backend, dir: &Path) -> Server {
    Server::start_with(
        backend,
        ServerOptions {
            connectors_dir: Some(dir.to_owned()),
            ..Default::default()
        },
    )
    .await
}

async fn webhook_receives_login_and_one_logout_per_destroyed_session(backend: Backend) {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(dir.path(), "billing", &receiver, "", FAST_RETRY);
    let server = start(backend, dir.path()).await;
    let api = server.api("acme");

    api.post(
        "map-parent",
        json!({"externalId": "portal-session-001", "keycloakSessionId": "kc-user-123", "userId": "alice", "system": "portal"}),
    )
    .await;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    let login = got[0].json();
    assert_eq!(login["type"], "login");
    assert_eq!(login["externalId"], "portal-session-001");
    assert_eq!(login["idpSessionId"], "kc-user-123");
    assert_eq!(login["userId"], "alice");
    assert_eq!(login["realm"], "acme");
    assert_eq!(got[0].header("webhook-id"), login["eventId"].as_str());
    assert!(
        got[0]
            .header("webhook-signature")
            .unwrap()
            .starts_with("v1,")
    );

    api.map_child("service-a-session-001", "portal-session-001")
        .await;
    api.map_child("service-b-session-001", "portal-session-001")
        .await;
    receiver.wait_for(3, Duration::from_secs(10)).await;
    let (_, res) = api.destroy_parent("portal-session-001").await;
    assert_eq!(res["changed"].as_array().unwrap().len(), 3);
    let got = receiver.wait_for(6, Duration::from_secs(10)).await;
    // Give a duplicate the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logouts: Vec<Value> = receiver
        .requests()
        .iter()
        .map(|r| r.json())
        .filter(|e| e["type"] == "logout")
        .collect();
    assert_eq!(logouts.len(), 3, "{logouts:#?}");
    let ids: BTreeSet<&str> = logouts
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "each logout event once, with its own id");
    let sessions: BTreeSet<&str> = logouts
        .iter()
        .map(|e| e["externalId"].as_str().unwrap())
        .collect();
    assert_eq!(
        sessions,
        BTreeSet::from([
            "portal-session-001",
            "service-a-session-001",
            "service-b-session-001"
        ])
    );
    // Every signature verifies with the secret (raw secret: key is its bytes).
    for r in &got {
        let id = r.header("webhook-id").unwrap();
        let ts = r.header("webhook-timestamp").unwrap();
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&r.body);
        use base64::Engine;
        let sig = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(r.header("webhook-signature"), Some(sig.as_str()));
    }
    // The session tree shows the delivery state per connector.
    let (_, tree) = api.get("session-tree/portal-session-001").await;
    for s in tree["sessions"].as_array().unwrap() {
        let d = s["deliveries"].as_array().unwrap();
        assert_eq!(d.len(), 2, "{s}");
        assert!(
            d.iter()
                .all(|d| d["status"] == "delivered" && d["connector"] == "billing")
        );
    }
}

async fn failed_deliveries_retry_then_dead_letter_and_replay_delivers_them(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(dir.path(), "legacy", &receiver, "", FAST_RETRY);
    let server = start(backend, dir.path()).await;
    let api = server.api("acme");
    api.map_parent("p1", "kc").await;
    let dead = server
        .wait_deliveries("connector=legacy", Duration::from_secs(15), |items| {
            items.len() == 1 && items[0]["status"] == "dead"
        })
        .await;
    assert_eq!(dead[0]["attempts"], 3);
    assert!(dead[0]["lastError"].as_str().unwrap().contains("503"));
    let id = dead[0]["id"].as_i64().unwrap();
    let (_, detail) = server.admin_get(&format!("/admin/deliveries/{id}")).await;
    let history = detail["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|a| a["outcome"] == "retry"));
    // Backoff: attempts are spread out, not back to back.
    let first =
        chrono::DateTime::parse_from_rfc3339(history[0]["finishedAt"].as_str().unwrap()).unwrap();
    let last =
        chrono::DateTime::parse_from_rfc3339(history[2]["startedAt"].as_str().unwrap()).unwrap();
    assert!(last >= first);
    assert!(receiver.requests().is_empty());

    // Receiver back: replay by connector delivers the dead letter.
    receiver.set_status(200);
    let (code, res) = server
        .admin_post("/admin/deliveries/replay", json!({"connector": "legacy"}))
        .await;
    assert_eq!((code, res["replayed"].as_u64()), (StatusCode::OK, Some(1)));
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["externalId"], "p1");
    server
        .wait_deliveries(
            "connector=legacy&status=delivered",
            Duration::from_secs(10),
            |i| i.len() == 1,
        )
        .await;

    // Replay of one delivery by id; a delivered one cannot be replayed.
    receiver.set_status(500);
    api.map_parent("p2", "kc").await;
    let dead = server
        .wait_deliveries(
            "connector=legacy&status=dead",
            Duration::from_secs(15),
            |i| i.len() == 1,
        )
        .await;
    receiver.set_status(200);
    let id = dead[0]["id"].as_i64().unwrap();
    let (code, _) = server
        .admin_post("/admin/deliveries/replay", json!({"deliveryId": id}))
        .await;
    assert_eq!(code, StatusCode::OK);
    receiver.wait_for(2, Duration::from_secs(10)).await;
    let again = server
        .admin_post("/admin/deliveries/replay", json!({"deliveryId": id}))
        .await;
    // It may still be pending for a moment; once delivered, replay is a conflict.
    server
        .wait_deliveries(
            "connector=legacy&status=delivered",
            Duration::from_secs(10),
            |i| i.len() == 2,
        )
        .await;
    let after = server
        .admin_post("/admin/deliveries/replay", json!({"deliveryId": id}))
        .await;
    assert!(again.0 == StatusCode::OK || again.0 == StatusCode::CONFLICT);
    common::assert_problem(&after, 409, "CONFLICT");
}

async fn log_and_alert_policies_do_not_retry(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(
        dir.path(),
        "logged",
        &receiver,
        "",
        "[policy]\non_failure = \"log\"\n",
    );
    webhook_manifest(
        dir.path(),
        "alerting",
        &receiver,
        "",
        "[policy]\non_failure = \"alert\"\n",
    );
    let server = start(backend, dir.path()).await;
    server.api("acme").map_parent("p", "kc").await;
    let logged = server
        .wait_deliveries("connector=logged", Duration::from_secs(10), |i| {
            i.len() == 1 && i[0]["status"] != "pending"
        })
        .await;
    assert_eq!(logged[0]["status"], "dropped");
    assert_eq!(logged[0]["attempts"], 1);
    let alerting = server
        .wait_deliveries("connector=alerting", Duration::from_secs(10), |i| {
            i.len() == 1 && i[0]["status"] != "pending"
        })
        .await;
    assert_eq!(alerting[0]["status"], "dead");
    assert_eq!(alerting[0]["attempts"], 1);
    // Nothing retries behind our back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, d) = server
        .admin_get(&format!("/admin/deliveries/{}", alerting[0]["id"]))
        .await;
    assert_eq!(d["history"].as_array().unwrap().len(), 1);
}

async fn events_are_not_echoed_to_their_origin_system(backend: Backend) {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(dir.path(), "portal", &receiver, "", FAST_RETRY);
    webhook_manifest(dir.path(), "billing", &receiver, "", FAST_RETRY);
    let server = start(backend, dir.path()).await;
    let api = server.api("acme");
    api.post(
        "map-parent",
        json!({"externalId": "from-portal", "keycloakSessionId": "kc", "originSystem": "portal"}),
    )
    .await;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paths: Vec<String> = receiver.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        ["/billing"],
        "portal must not get its own event back: {got:?}"
    );
    let (_, page) = server.admin_get("/admin/deliveries?connector=portal").await;
    assert!(page["items"].as_array().unwrap().is_empty());
}

/// Each connector has its own lane: a legacy system that answers after a second, with a
/// lane of 2, delivers about 2 events a second, while a fast one beside it gets all of its
/// events at once. (With one shared queue the slow connector's calls filled every call slot
/// and the fast connector waited behind them.)
async fn a_slow_connector_holds_only_its_own_lane(backend: Backend) {
    const EVENTS: usize = 100;
    let fast = Receiver::start().await;
    let slow = Receiver::start().await;
    slow.set_delay(Duration::from_millis(1_000));
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(dir.path(), "fast", &fast, "", FAST_RETRY);
    unsigned_webhook_manifest(
        dir.path(),
        "slow",
        &["acme"],
        &slow,
        &format!("timeout_ms = 5000\nconcurrency = 2\n{FAST_RETRY}"),
    );
    let server = start(backend, dir.path()).await;
    let api = server.api("acme");
    let began = std::time::Instant::now();
    for i in 0..EVENTS {
        let (status, _) = api
            .post("map-fixed", json!({"externalId": format!("lane-{i}")}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    fast.wait_for(EVENTS, Duration::from_secs(30)).await;
    let elapsed = began.elapsed();
    let slow_done = slow.requests().len();
    // Two at a time, a second each (+2 for calls that were just answering).
    let bound = 2 * elapsed.as_secs() as usize + 4;
    assert!(
        slow_done <= bound && slow_done < EVENTS / 2,
        "the slow lane ran {slow_done} calls in {elapsed:?} (its width is 2)"
    );
    let fast_ids: BTreeSet<String> = fast
        .requests()
        .iter()
        .map(|r| r.json()["externalId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        fast_ids.len(),
        EVENTS,
        "each event once to the fast connector"
    );
}

/// Back-pressure: a legacy system that takes 20 ms a call, one call at a time (50/s), is sent
/// logins faster than that. Once the oldest undelivered event has waited longer than the
/// budget, new sessions are held and, after the admission wait, refused with 503
/// DELIVERY_BACKLOG (nothing written); a logout is never held; once the backlog is delivered
/// new sessions are admitted again; every admitted login is delivered.
async fn new_sessions_wait_for_a_delivery_backlog_and_logouts_never_do(backend: Backend) {
    let (receiver, dir) = one_call_at_a_time(Duration::from_millis(20)).await;
    let server = Server::start_with(
        backend,
        ServerOptions {
            connectors_dir: Some(dir.path().to_owned()),
            config: Some("[limits]\nmax_delivery_lag_ms = 400\nadmission_wait_ms = 200\n".into()),
            ..Default::default()
        },
    )
    .await;
    let api = server.api("acme");
    let (status, _) = api.map_parent("p", "kc-p").await;
    assert_eq!(status, StatusCode::CREATED);

    // Eight clients post logins until one is refused, each at most 25/s: 200/s in all falls
    // 400 ms behind 50/s deliveries within about 0.6 s, whatever the API's own speed (unpaced,
    // a fast build admitted all 1,600 before the lag reached the budget). Bounded: 8 s at most.
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..8 {
        let (api, refused) = (api.clone(), refused.clone());
        clients.spawn(async move {
            let mut created = Vec::new();
            for i in 0..200 {
                if refused.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let id = format!("bp-{c}-{i}");
                let (status, body) = api.post("map-fixed", json!({"externalId": id})).await;
                match status {
                    StatusCode::CREATED => {
                        created.push(id);
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert_eq!(body["code"], "DELIVERY_BACKLOG", "{body}");
                        refused.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => panic!("map-fixed {id}: {other} {body}"),
                }
            }
            created
        });
    }
    let mut created = Vec::new();
    while let Some(done) = clients.join_next().await {
        created.extend(done.unwrap());
    }
    assert!(
        refused.load(std::sync::atomic::Ordering::Relaxed),
        "{} logins admitted without back-pressure at 50 deliveries/s",
        created.len()
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("lockstep_admission_refused_total ")
            && !metrics.contains("lockstep_admission_refused_total 0\n"),
        "{metrics}"
    );

    // A logout while the backlog is over the budget is not held (held, it would be refused).
    let lag: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lockstep_delivery_lag_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(lag > 0.4, "lag {lag} s after a refusal");
    let (status, body) = api.destroy_parent("p").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Every admitted login (and p's login and logout) arrives; a refused one wrote nothing.
    let owed = created.len() + 2;
    let arrived = receiver.wait_for(owed, Duration::from_secs(120)).await;
    let ids: BTreeSet<String> = arrived
        .iter()
        .filter(|r| r.json()["type"] == "login")
        .map(|r| r.json()["externalId"].as_str().unwrap().to_owned())
        .collect();
    for id in &created {
        assert!(ids.contains(id), "login of {id} not delivered");
    }
    assert_eq!(
        ids.len(),
        created.len() + 1,
        "a refused login was delivered"
    );

    // Caught up: new sessions are admitted again.
    let (status, body) = api.post("map-fixed", json!({"externalId": "after"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

async fn hostile_connectors_fail_with_reasons_while_the_api_and_others_keep_working(
    backend: Backend,
) {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(dir.path(), "good", &receiver, "", FAST_RETRY);
    for (mode, extra) in [
        ("loop", "timeout_ms = 200"),
        ("alloc", "memory_mb = 16"),
        ("trap", ""),
        // 100,000 lines of 64 KiB cross into the host (6 GiB of copying in a debug build) on
        // low-priority hook threads that a busy test machine starves: the whole budget.
        ("log-spam", "timeout_ms = 60000"),
        ("forbidden-host", "allowed_hosts = [\"http://127.0.0.1:1\"]"),
    ] {
        write_manifest(
            dir.path(),
            &format!("hostile-{mode}"),
            "hostile",
            &format!(
                "realms = [\"acme\"]\n{extra}\n[policy]\non_failure = \"alert\"\n[config]\nmode = \"{mode}\"\nurl = \"{}\"\n",
                receiver.url("/stolen")
            ),
        );
    }
    let server = start(backend, dir.path()).await;
    let api = server.api("acme");
    let rss_before = server.rss_kib();
    for i in 0..20 {
        let (code, _) = api.map_parent(&format!("h{i}"), "kc").await;
        assert_eq!(code, StatusCode::CREATED);
    }
    // The good connector gets all 20 while the hostile ones fail.
    receiver.wait_for(20, Duration::from_secs(30)).await;
    let expect = [
        ("hostile-loop", "timeout"),
        ("hostile-alloc", "out of memory"),
        ("hostile-trap", "trap"),
        ("hostile-forbidden-host", "denied"),
    ];
    for (connector, reason) in expect {
        let items = server
            .wait_deliveries(
                &format!("connector={connector}"),
                Duration::from_secs(60),
                |i| i.len() == 20 && i.iter().all(|d| d["status"] == "dead"),
            )
            .await;
        for d in &items {
            assert!(
                d["lastError"].as_str().unwrap().contains(reason),
                "{connector}: {d}"
            );
        }
    }
    // Log spam is capped, not fatal.
    server
        .wait_deliveries(
            "connector=hostile-log-spam",
            Duration::from_secs(120),
            |i| i.len() == 20 && i.iter().all(|d| d["status"] == "delivered"),
        )
        .await;
    // The API kept answering throughout, nothing reached the forbidden path, memory bounded.
    let (code, _) = api.get("h0").await;
    assert_eq!(code, StatusCode::OK);
    assert!(receiver.requests().iter().all(|r| r.path == "/good"));
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 512 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// A lane claims up to twice its connector's concurrency, so at a graceful stop it can hold
/// deliveries it has not started. The call in flight is finished and recorded; the ones
/// claimed ahead are given back (no lease left), so another instance sharing the outbox, or
/// this one restarted, takes them at once instead of after the lease.
async fn a_graceful_stop_finishes_calls_and_gives_back_what_it_claimed_ahead(backend: Backend) {
    let (receiver, dir) = one_call_at_a_time(Duration::from_millis(1_500)).await;
    let server = start(backend, dir.path()).await;
    let api = server.api("acme");
    for i in 0..4 {
        let (status, _) = api
            .post("map-fixed", json!({"externalId": format!("ahead-{i}")}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    // The receiver records a call when it answers it: by then the lane has started the
    // next one and claimed the one after it ahead.
    let before = receiver.wait_for(1, Duration::from_secs(10)).await.len() as i64;
    let (status, url, _db) = server.terminate_keeping(Duration::from_secs(15)).await;
    assert!(status.success(), "graceful stop: {status}");
    let answered = receiver.requests().len() as i64;
    assert!(
        answered <= before + 1,
        "{answered} calls answered, {before} before the stop: one call (the lane's width) may \
         finish after it, none may start"
    );
    let count = |sql| common::count_rows(backend, &url, sql);
    assert_eq!(
        count("SELECT COUNT(*) FROM deliveries WHERE status = 'delivered'").await,
        answered,
        "every call started was finished and recorded"
    );
    assert!(answered < 4, "the stop left deliveries to give back");
    assert_eq!(
        count("SELECT COUNT(*) FROM deliveries WHERE status = 'pending'").await,
        4 - answered
    );
    assert_eq!(
        count(
            "SELECT COUNT(*) FROM deliveries WHERE status = 'pending' AND lease_until IS NOT NULL"
        )
        .await,
        0,
        "a delivery claimed ahead is given back, not left leased"
    );
}

/// Every call slot of the instance is busy with another connector's slow calls when a lane
/// has deliveries to make: its workers wait for a slot. A graceful stop that comes during the
/// wait must start none of those calls once slots free up (a stop starts no call); the
/// deliveries go back unleased, and the slow calls in flight finish and are recorded.
async fn a_graceful_stop_starts_no_call_that_waited_for_a_free_call_slot(backend: Backend) {
    // The most calls an instance makes at once, all of them taken by `hog`.
    const SLOTS: usize = 64;
    let slow = Receiver::start().await;
    slow.set_delay(Duration::from_millis(2_500));
    let fast = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    unsigned_webhook_manifest(
        dir.path(),
        "hog",
        &["hog"],
        &slow,
        &format!("timeout_ms = 10000\nconcurrency = {SLOTS}"),
    );
    webhook_manifest(dir.path(), "late", &fast, "", FAST_RETRY);
    let server = start(backend, dir.path()).await;
    let hog = server.api("hog");
    for i in 0..SLOTS {
        let (status, _) = hog
            .post("map-fixed", json!({"externalId": format!("hog-{i}")}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    // The slow receiver records a call when it answers (2.5 s on): wait until it has
    // received them all instead.
    let began = std::time::Instant::now();
    while slow.received() < SLOTS {
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{} of {SLOTS} calls started after {:?}",
            slow.received(),
            began.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let api = server.api("acme");
    for i in 0..3 {
        let (status, _) = api
            .post("map-fixed", json!({"externalId": format!("late-{i}")}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    // Time for `late`'s lane to claim them and its workers to wait for a slot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        fast.requests().is_empty() && slow.requests().is_empty(),
        "every call slot should still be busy"
    );
    // What an operator sees meanwhile: every slot taken by `hog`.
    let metrics = server.metrics().await;
    for line in [
        format!("lockstep_hook_calls_in_flight{{connector=\"hog\"}} {SLOTS}\n"),
        format!("lockstep_hook_call_slots {SLOTS}\n"),
    ] {
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
    let (status, url, _db) = server.terminate_keeping(Duration::from_secs(20)).await;
    assert!(status.success(), "graceful stop: {status}");
    assert_eq!(slow.requests().len(), SLOTS, "the calls in flight finished");
    let late: Vec<Value> = fast
        .requests()
        .iter()
        .map(|r| r.json()["externalId"].clone())
        .collect();
    assert!(late.is_empty(), "calls started after the stop: {late:?}");
    let count = |sql| common::count_rows(backend, &url, sql);
    assert_eq!(
        count("SELECT COUNT(*) FROM deliveries WHERE connector = 'hog' AND status = 'delivered'")
            .await,
        SLOTS as i64,
        "the finished calls were recorded"
    );
    assert_eq!(
        count(
            "SELECT COUNT(*) FROM deliveries WHERE connector = 'late' AND status = 'pending' \
             AND lease_until IS NULL AND attempts = 0"
        )
        .await,
        3,
        "what waited for a slot goes back untried, without a lease"
    );
}

async fn sigkill_with_pending_events_loses_nothing(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    // Slow retries keep the 1,000 events pending while the host dies.
    webhook_manifest(
        dir.path(),
        "legacy",
        &receiver,
        "",
        "[policy]\non_failure = \"retry\"\nmax_attempts = 100\nbackoff_ms = 50\nmax_backoff_ms = 200\n",
    );
    let opts = ServerOptions {
        connectors_dir: Some(dir.path().to_owned()),
        ..Default::default()
    };
    let server = Server::start_with(backend, opts.clone()).await;
    let api = server.api("acme");
    let mut tasks = Vec::new();
    for chunk in 0..10 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let id = format!("k{chunk}-{i}");
                assert_eq!(api.map_parent(&id, "kc").await.0, StatusCode::CREATED);
                let (code, _) = api.destroy_parent(&id).await;
                assert_eq!(code, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(server.outbox_total().await, 1000);
    let backend = server.backend;
    let (url, db_dir) = server.kill().await;
    // The receiver recovers; the restarted host must deliver every event.
    receiver.set_status(200);
    let server = Server::start_on(backend, url, db_dir, opts).await;
    let got = receiver.wait_for(1000, Duration::from_secs(120)).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for r in &got {
        *seen
            .entry(r.json()["eventId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "{backend:?}: {} distinct events delivered, {duplicates} duplicates",
        seen.len()
    );
    assert_eq!(seen.len(), 1000, "every event delivered");
    // Per session, the connector saw the login before the logout (per-session order).
    let mut first_login: HashMap<String, usize> = HashMap::new();
    let mut first_logout: HashMap<String, usize> = HashMap::new();
    for (i, r) in got.iter().enumerate() {
        let e = r.json();
        let session = e["externalId"].as_str().unwrap().to_owned();
        let slot = if e["type"] == "login" {
            &mut first_login
        } else {
            &mut first_logout
        };
        slot.entry(session).or_insert(i);
    }
    assert_eq!(first_login.len(), 500);
    for (session, login) in &first_login {
        assert!(
            login < &first_logout[session],
            "{session}: logout delivered before login"
        );
    }
    server
        .wait_deliveries("status=pending", Duration::from_secs(30), |i| i.is_empty())
        .await;
}

async fn deliveries_api_is_for_operators_only_and_validates_input(backend: Backend) {
    let hash = hex::encode(lockstep::auth::sha256("realm-key"));
    let server = Server::start_with(
        backend,
        ServerOptions {
            config: Some(format!(
                "[[api_keys]]\nid = \"scoped\"\nsha256 = \"{hash}\"\nrealms = [\"acme\"]\npermissions = [\"users:manage\", \"connectors:manage\"]\n"
            )),
            ..Default::default()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let res = client
        .get(format!("{}/admin/deliveries", server.base))
        .bearer_auth("realm-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = client
        .get(format!("{}/admin/deliveries", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    common::assert_problem(
        &server.admin_get("/admin/deliveries?status=lost").await,
        400,
        "VALIDATION",
    );
    common::assert_problem(
        &server.admin_get("/admin/deliveries?limit=0").await,
        400,
        "VALIDATION",
    );
    common::assert_problem(
        &server.admin_get("/admin/deliveries/999").await,
        404,
        "NOT_FOUND",
    );
    common::assert_problem(
        &server.admin_get("/admin/deliveries/abc").await,
        400,
        "VALIDATION",
    );
    common::assert_problem(
        &server
            .admin_post("/admin/deliveries/replay", json!({}))
            .await,
        400,
        "VALIDATION",
    );
    common::assert_problem(
        &server
            .admin_post(
                "/admin/deliveries/replay",
                json!({"connector": "a", "deliveryId": 1}),
            )
            .await,
        400,
        "VALIDATION",
    );
    common::assert_problem(
        &server
            .admin_post("/admin/deliveries/replay", json!({"deliveryId": 12345}))
            .await,
        404,
        "NOT_FOUND",
    );
    let (code, body) = server
        .admin_post("/admin/deliveries/replay", json!({"connector": "nobody"}))
        .await;
    assert_eq!((code, body["replayed"].as_u64()), (StatusCode::OK, Some(0)));
}

/// Writes one connector of each kind that cannot load into `dir`, beside whatever else is
/// there: not a component, a component of no connector world, one that traps at start, and a
/// manifest that does not parse. Returns each one's name and what its error says.
fn write_broken_connectors(dir: &Path) -> [(&'static str, &'static str); 4] {
    let workspace = common::components::workspace();
    std::fs::write(dir.join("junk.wasm"), b"not a component").unwrap();
    std::fs::write(dir.join("empty.wasm"), b"\0asm\x0d\0\x01\0").unwrap();
    std::fs::write(
        dir.join("trap.wasm"),
        wat::parse_file(workspace.join("tests/fixtures/trap-at-start.wat")).unwrap(),
    )
    .unwrap();
    for name in ["junk", "empty", "trap"] {
        std::fs::write(
            dir.join(format!("{name}.toml")),
            format!("name = \"{name}\"\ncomponent = \"{name}.wasm\"\nrealms = [\"acme\"]\n"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("bad-manifest.toml"),
        "name = \"bad-manifest\"\ncomponent = \"junk.wasm\"\ntimeout_ms = 0\n",
    )
    .unwrap();
    [
        ("junk", "not a loadable component"),
        ("empty", "hooks"),
        ("trap", "fails when instantiated"),
        ("bad-manifest", "timeout_ms"),
    ]
}

/// A connector that cannot load at start is one bad plug-in, not a reason to keep every other
/// connector and the API down: it is reported as failed (list, detail, `/readyz`, `/metrics`)
/// and everything else serves.
async fn a_broken_connector_at_start_is_reported_and_the_others_serve(backend: Backend) {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    webhook_manifest(dir.path(), "billing", &receiver, "", FAST_RETRY);
    let broken = write_broken_connectors(dir.path());
    let server = start(backend, dir.path()).await;

    let (code, list) = server.admin_get("/admin/connectors").await;
    assert_eq!(code, StatusCode::OK, "{list}");
    let items = list["items"].as_array().unwrap();
    let by_name: HashMap<&str, &Value> = items
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c))
        .collect();
    assert_eq!(by_name.len(), 5, "{list:#}");
    assert_eq!(by_name["billing"]["state"], "active");
    assert!(by_name["billing"]["lastError"].is_null());
    for (name, needle) in broken {
        let c = by_name[name];
        assert_eq!(c["state"], "failed", "{c:#}");
        assert_eq!(c["source"], "directory", "{c:#}");
        assert!(
            c["manifestPath"]
                .as_str()
                .unwrap()
                .ends_with(&format!("{name}.toml")),
            "{c:#}"
        );
        assert!(
            c["lastError"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle)),
            "{name}: {c:#}"
        );
        // Nothing of a version is claimed for a connector that serves none.
        assert!(
            c.get("version").is_none() && c.get("world").is_none(),
            "{c:#}"
        );
        let (code, one) = server.admin_get(&format!("/admin/connectors/{name}")).await;
        assert_eq!(code, StatusCode::OK, "{one}");
        assert_eq!(one["state"], "failed", "{one:#}");
    }

    // Ready (the API and the other connectors serve), and saying which connectors do not.
    let ready = reqwest::get(format!("{}/readyz", server.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "ok", "{ready}");
    assert_eq!(ready["connectorsServing"], false, "{ready}");
    let failed: BTreeSet<&str> = ready["failedConnectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        BTreeSet::from(["bad-manifest", "empty", "junk", "trap"]),
        "{ready}"
    );
    let metrics = server.metrics().await;
    for (name, _) in broken {
        let sample =
            format!("lockstep_connector_failed{{connector=\"{name}\",source=\"directory\"}} 1");
        assert!(metrics.contains(&sample), "missing {sample}");
    }
    assert!(!metrics.contains("lockstep_connector_failed{connector=\"billing\""));

    // The connector that loads delivers as usual.
    let api = server.api("acme");
    assert_eq!(
        api.map_parent("portal-1", "sid-1").await.0,
        StatusCode::CREATED
    );
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].path, "/billing");
    assert_eq!(got[0].json()["externalId"], "portal-1");
}

/// The start's one ERROR line per broken connector names its file; operators who prefer a
/// start that fails over one that runs without a connector say so with `--strict-connectors`
/// or `strict_connectors = true`, and get a non-zero exit naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connector_logs_its_file_and_strict_mode_refuses_to_start() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let connectors = dir.path().join("connectors");
    std::fs::create_dir(&connectors).unwrap();
    std::fs::write(connectors.join("junk.wasm"), b"not a component").unwrap();
    std::fs::write(
        connectors.join("junk.toml"),
        "name = \"junk\"\ncomponent = \"junk.wasm\"\n",
    )
    .unwrap();
    let config = dir.path().join("lockstep.toml");
    std::fs::write(&config, "strict_connectors = true\n").unwrap();
    let serve = |db: &str, extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
            .arg(format!("sqlite://{}/{db}.db", dir.path().display()))
            .arg("--connectors-dir")
            .arg(&connectors)
            .arg("--compile-cache")
            .arg(dir.path().join("cache"))
            .args(extra)
            .env("LOCKSTEP_ADMIN_TOKEN", "t")
            .env("LOCKSTEP_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("LOCKSTEP_CONFIG")
            .env_remove("LOCKSTEP_STRICT_CONNECTORS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    };

    // By default: serving, with one ERROR line that names the manifest.
    let mut child = serve("default", &[]).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if line.starts_with("listening on ") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(
        listening,
        "lockstep did not start beside a broken connector"
    );
    child.kill().await.unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    let errors: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let line = errors[0].to_string();
    assert!(
        line.contains("junk.toml") && line.contains("not a loadable component"),
        "{line}"
    );

    // Strict, by flag or by config key: no start, and the file named.
    for (db, extra) in [
        ("flag", vec!["--strict-connectors"]),
        ("key", vec!["--config", config.to_str().unwrap()]),
    ] {
        let out = tokio::time::timeout(Duration::from_secs(30), serve(db, &extra).output())
            .await
            .unwrap()
            .unwrap();
        assert!(!out.status.success(), "{db}: a strict start must fail");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("listening on"), "{stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("junk.toml") && stderr.contains("not a loadable component"),
            "{db}: {stderr}"
        );
    }
}

async fn refresh_events_reach_only_connectors_that_subscribe_to_them(backend: Backend) {
    const SECRET: &str = "whsec_c2VjcmV0LWZvci1sb2Nrc3RlcC1ldmVudC10ZXN0cw==";
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let all = "events = [\"login\", \"logout\", \"revoke\", \"refresh\"]";
    webhook_manifest(dir.path(), "billing", &receiver, all, FAST_RETRY);
    webhook_manifest(dir.path(), "crm", &receiver, "", FAST_RETRY);
    let server = Server::start_with(
        backend,
        ServerOptions {
            connectors_dir: Some(dir.path().to_owned()),
            config: Some(format!("[realms.acme]\nevents_secrets = [\"{SECRET}\"]\n")),
            ..Default::default()
        },
    )
    .await;
    let api = server.api("acme");
    assert_eq!(
        api.map_parent("portal-1", "sid-1").await.0,
        StatusCode::CREATED
    );
    receiver.wait_for(2, Duration::from_secs(10)).await;

    // Keycloak reports a token refresh: the PARENT mapped to its session is extended.
    let later = chrono::Utc::now().timestamp_millis() + 7_200_000;
    let refresh = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "REFRESH_TOKEN",
        "realm": "acme",
        "time": chrono::Utc::now().timestamp_millis(),
        "userId": "u-1",
        "sessionId": "sid-1",
        "sessionExpiresAt": later,
    });
    let (code, body) = server.post_event("acme", SECRET, &refresh).await;
    assert_eq!(code, StatusCode::OK, "{body}");

    let got = receiver.wait_for(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refreshes: Vec<(String, Value)> = receiver
        .requests()
        .iter()
        .map(|r| (r.path.clone(), r.json()))
        .filter(|(_, body)| body["type"] == "refresh")
        .collect();
    assert_eq!(refreshes.len(), 1, "{got:?}");
    let (path, body) = &refreshes[0];
    assert_eq!(path, "/billing", "crm does not subscribe to refresh");
    assert_eq!(body["externalId"], "portal-1");
    let expires =
        chrono::DateTime::parse_from_rfc3339(body["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(expires.timestamp_millis(), later);
}

/// Every delivery `/admin/deliveries?{query}` lists, one a page, once all `want` of them are
/// delivered (recording follows the call, so poll a little).
async fn delivered_pages(server: &Server, query: &str, want: usize) -> Vec<Value> {
    server
        .wait_delivery_pages(query, 1, Duration::from_secs(10), |d| {
            d.len() == want && d.iter().all(|d| d["status"] == "delivered")
        })
        .await
}

/// Deliveries are found by their session (in one realm or in every one, page by page) and
/// each session of a tree shows its own; the same session id in another realm is another
/// session. (These reads go through the outbox's session index, not one of the deliveries.)
async fn a_sessions_deliveries_are_listed_by_session_and_shown_on_its_tree(backend: Backend) {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    unsigned_webhook_manifest(
        dir.path(),
        "billing",
        &["acme", "other"],
        &receiver,
        FAST_RETRY,
    );
    let server = start(backend, dir.path()).await;
    let (acme, other) = (server.api("acme"), server.api("other"));
    acme.map_parent("portal-1", "kc-1").await;
    acme.map_child("app-1", "portal-1").await;
    acme.map_parent("portal-2", "kc-2").await;
    acme.map_child("app-2", "portal-2").await;
    other.map_parent("portal-1", "kc-9").await;
    // The logins arrive before the logouts are made (a login still pending at its logout
    // would be dropped, not delivered).
    receiver.wait_for(5, Duration::from_secs(10)).await;
    acme.destroy_parent("portal-1").await;
    receiver.wait_for(7, Duration::from_secs(10)).await;

    let mine = delivered_pages(&server, "realm=acme&session=portal-1", 2).await;
    let kinds: Vec<(&str, &str, &str)> = mine
        .iter()
        .map(|d| {
            (
                d["realm"].as_str().unwrap(),
                d["externalId"].as_str().unwrap(),
                d["eventType"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("acme", "portal-1", "login"),
            ("acme", "portal-1", "logout")
        ]
    );
    let everywhere = delivered_pages(&server, "session=portal-1", 3).await;
    let realms: BTreeSet<&str> = everywhere
        .iter()
        .map(|d| d["realm"].as_str().unwrap())
        .collect();
    assert_eq!(realms, BTreeSet::from(["acme", "other"]));
    let logouts = delivered_pages(
        &server,
        "session=app-1&status=delivered&connector=billing",
        2,
    )
    .await;
    assert_eq!(logouts[1]["eventType"], "logout");
    let (_, none) = server
        .admin_get("/admin/deliveries?realm=other&session=app-1")
        .await;
    assert_eq!(none["items"], json!([]), "app-1 is a session of acme only");

    let (status, tree) = acme.get("session-tree/app-2").await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    let shown: Vec<(String, Vec<String>)> = tree["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let deliveries = s["deliveries"].as_array().unwrap();
            let each = deliveries
                .iter()
                .map(|d| format!("{}:{}", d["connector"], d["eventType"]).replace('"', ""))
                .collect();
            (s["externalId"].as_str().unwrap().to_owned(), each)
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("portal-2".to_owned(), vec!["billing:login".to_owned()]),
            ("app-2".to_owned(), vec!["billing:login".to_owned()]),
        ]
    );
}
