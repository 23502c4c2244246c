//! What an operator sees on `/metrics` besides the connector counters: API request latency
//! by method, route template and status, and how far the sync engine is behind (unrouted
//! outbox events, age of the oldest waiting event).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::components::component;
use common::receiver::Receiver;
use common::{Backend, Server};
use reqwest::StatusCode;
use serde_json::json;

on_both_backends!(metrics_show_request_latency_by_route_and_the_delivery_backlog);

/// The hook threads are started, and their niceness checked, when the server starts (a
/// sandbox that forbids `setpriority` is then reported before any connector runs): by the
/// time it is ready they exist and run at niceness 10.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_hook_threads_run_at_a_lower_priority_from_the_start() {
    let server = Server::start(Backend::Sqlite).await;
    let pid = server.pid().unwrap();
    let mut hook_threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        // The low-priority hook threads (for connectors that burn CPU); the others run at
        // the API's priority.
        if name.trim_end() != "lockstep-hk-low" {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        // Fields after the parenthesised name: state is field 3, niceness field 19.
        let after_name = stat.rsplit_once(')').unwrap().1;
        let nice: i32 = after_name
            .split_whitespace()
            .nth(16)
            .unwrap()
            .parse()
            .unwrap();
        hook_threads.push(nice);
    }
    assert!(
        !hook_threads.is_empty(),
        "no low-priority hook thread started with the server"
    );
    assert!(hook_threads.iter().all(|n| *n == 10), "{hook_threads:?}");
}

/// The value of the first sample line that starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}

async fn metrics_show_request_latency_by_route_and_the_delivery_backlog(backend: Backend) {
    let receiver = Receiver::start().await;
    let server = Server::start(backend).await;
    let manifest = format!(
        "name = \"hook\"\nrealms = [\"acme\"]\nallowed_hosts = [\"{}\"]\n[config]\nurl = \"{}\"\n",
        receiver.origin(),
        receiver.url("/hook")
    );
    let wasm = std::fs::read(component("webhook")).unwrap();
    let (code, body) = server.put_connector("hook", &manifest, Some(wasm)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    // Disabled: its deliveries wait, so the backlog has an age.
    let (code, body) = server
        .admin_post("/admin/connectors/hook/disable", json!({}))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");

    let api = server.api("acme");
    for i in 0..3 {
        assert_eq!(
            api.map_parent(&format!("p{i}"), "sid").await.0,
            StatusCode::CREATED
        );
    }
    assert_eq!(api.map_parent("p0", "sid").await.0, StatusCode::CONFLICT);
    let (code, _) = server.admin_get("/no/such/route").await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // Routed (fan-out) but not delivered: nothing unrouted, the oldest event waits.
    let mut text = String::new();
    for _ in 0..100 {
        text = server.metrics().await;
        if sample(&text, "lockstep_outbox_unrouted_events ") == Some(0.0)
            && sample(
                &text,
                "lockstep_deliveries_queued{connector=\"hook\",status=\"pending\"}",
            ) == Some(3.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sample(&text, "lockstep_outbox_unrouted_events "),
        Some(0.0),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let text = server.metrics().await;
    let age = sample(&text, "lockstep_oldest_waiting_event_age_seconds ").unwrap();
    assert!(
        (1.0..120.0).contains(&age),
        "the oldest pending login waits: {age}"
    );

    let route = "route=\"/admin/realms/{realm}/external-sessions/map-parent\"";
    assert_eq!(
        sample(
            &text,
            &format!(
                "lockstep_http_request_duration_seconds_count{{method=\"POST\",{route},status=\"201\"}}"
            )
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "lockstep_http_request_duration_seconds_count{{method=\"POST\",{route},status=\"409\"}}"
            )
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "lockstep_http_request_duration_seconds_count{method=\"GET\",route=\"unmatched\",status=\"404\"}"
        ),
        Some(1.0),
        "a path no route matched is not a label of its own"
    );
    assert!(
        text.contains(&format!(
            "lockstep_http_request_duration_seconds_bucket{{method=\"POST\",{route},status=\"201\",le=\"+Inf\"}} 3"
        )),
        "{text}"
    );

    // Enabled again: the backlog drains and its age goes back to 0.
    let (code, _) = server
        .admin_post("/admin/connectors/hook/enable", json!({}))
        .await;
    assert_eq!(code, StatusCode::OK);
    receiver.wait_for(3, Duration::from_secs(10)).await;
    let mut age = f64::NAN;
    for _ in 0..100 {
        let text = server.metrics().await;
        age = sample(&text, "lockstep_oldest_waiting_event_age_seconds ").unwrap();
        if age == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(age, 0.0);
}
