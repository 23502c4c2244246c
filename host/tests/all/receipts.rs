//! Termination receipts end to end: the real binary, real webhook connectors posting to real
//! receivers on 127.0.0.1 (one healthy, one answering 503), on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::components::unsigned_webhook_manifest;
use common::receiver::Receiver;
use common::{Api, Backend, Server, ServerOptions, assert_problem};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    receipt_shows_confirmed_and_dead_connectors_until_a_replay_completes_it,
    user_receipt_covers_every_tree_and_is_complete_only_when_all_confirmed,
    the_origin_of_a_logout_is_named_and_not_expected_to_confirm,
    live_and_orphaned_sessions_have_not_ended,
    receipts_need_permission_and_stay_in_their_realm,
);

const HEALTHY: &str =
    "[policy]\non_failure = \"retry\"\nmax_attempts = 3\nbackoff_ms = 20\nmax_backoff_ms = 100\n";
/// Slow enough retries that a test sees the logout pending before it dies.
const FAILING: &str =
    "[policy]\non_failure = \"retry\"\nmax_attempts = 3\nbackoff_ms = 200\nmax_backoff_ms = 400\n";

fn webhook(dir: &Path, name: &str, receiver: &Receiver, policy: &str) {
    unsigned_webhook_manifest(
        dir,
        name,
        &["acme"],
        receiver,
        &format!("timeout_ms = 2000\n{policy}"),
    );
}

async fn start(backend: Backend, dir: Option<&Path>, config: Option<String>) -> Server {
    Server::start_with(
        backend,
        ServerOptions {
            connectors_dir: dir.map(Path::to_owned),
            config,
            ..Default::default()
        },
    )
    .await
}

async fn receipt(api: &Api, id: &str) -> Value {
    let (code, body) = api.get(&format!("{id}/receipt")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body
}

/// Polls a session's receipt until `pred` holds (bounded).
async fn wait_receipt(api: &Api, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = receipt(api, id).await;
        if pred(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "receipt of {id} never satisfied the condition: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `GET /admin/realms/{realm}/receipts?...` with the admin token.
async fn user_receipts(server: &Server, realm: &str, query: &str) -> Value {
    let (code, body) = server
        .admin_get(&format!("/admin/realms/{realm}/receipts?{query}"))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body
}

async fn wait_user(server: &Server, query: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = user_receipts(server, "acme", query).await;
        if pred(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "user receipts never satisfied the condition: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn connector<'a>(receipt: &'a Value, name: &str) -> &'a Value {
    receipt["logouts"][0]["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["connector"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {receipt:#}"))
}

async fn version_of(server: &Server, name: &str) -> String {
    let (code, body) = server.admin_get(&format!("/admin/connectors/{name}")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body["version"].as_str().unwrap().to_owned()
}

async fn receipt_shows_confirmed_and_dead_connectors_until_a_replay_completes_it(backend: Backend) {
    let good = Receiver::start().await;
    let bad = Receiver::start().await;
    bad.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    webhook(dir.path(), "billing", &good, HEALTHY);
    webhook(dir.path(), "legacy", &bad, FAILING);
    let server = start(backend, Some(dir.path()), None).await;
    let api = server.api("acme");
    let (code, _) = api
        .post(
            "map-parent",
            json!({"externalId": "p1", "keycloakSessionId": "kc-1", "userId": "alice", "originSystem": "portal"}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    assert_eq!(api.map_child("c1", "p1").await.0, StatusCode::CREATED);
    let (code, _) = api
        .post(
            "destroy-parent",
            json!({"externalId": "p1", "originSystem": "portal"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);

    // The failing connector is first seen owing the logout (its earlier login is retried
    // first: per-session order), then dead; the healthy one confirmed.
    let owing = wait_receipt(&api, "p1", |r| {
        r["logouts"][0]["routed"] == true
            && r["logouts"][0]["connectors"].as_array().unwrap().len() == 2
    })
    .await;
    let legacy = connector(&owing, "legacy");
    assert!(
        ["pending", "retrying"].contains(&legacy["status"].as_str().unwrap()),
        "{owing:#}"
    );
    assert!(legacy["nextAttemptAt"].is_string(), "{legacy}");
    assert_eq!(owing["complete"], false);

    let dead = wait_receipt(&api, "p1", |r| {
        connector(r, "legacy")["status"] == "dead"
            && connector(r, "billing")["status"] == "delivered"
    })
    .await;
    assert_eq!(dead["externalId"], "p1");
    assert_eq!(dead["status"], "DESTROYED");
    assert_eq!(dead["endReason"], "logout");
    assert_eq!(dead["ended"], true);
    assert_eq!(dead["complete"], false);
    assert!(dead["generatedAt"].is_string());
    let ended_at = dead["endedAt"].as_str().unwrap();
    let (_, session) = api.get("p1").await;
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(ended_at).unwrap(),
        chrono::DateTime::parse_from_rfc3339(session["updatedAt"].as_str().unwrap()).unwrap()
    );
    let logout = &dead["logouts"][0];
    assert_eq!(dead["logouts"].as_array().unwrap().len(), 1);
    assert_eq!(logout["originSystem"], "portal");
    // The event id is the one the healthy connector received.
    let event_id = logout["eventId"].as_str().unwrap();
    let posted: Vec<Value> = good.requests().iter().map(|r| r.json()).collect();
    assert!(
        posted
            .iter()
            .any(|e| e["eventId"] == event_id && e["type"] == "logout" && e["externalId"] == "p1"),
        "{posted:#?}"
    );
    let billing = connector(&dead, "billing");
    assert_eq!(
        billing["connectorVersion"],
        version_of(&server, "billing").await
    );
    let confirmed =
        chrono::DateTime::parse_from_rfc3339(billing["confirmedAt"].as_str().unwrap()).unwrap();
    let occurred =
        chrono::DateTime::parse_from_rfc3339(logout["occurredAt"].as_str().unwrap()).unwrap();
    assert!(confirmed >= occurred, "{billing}");
    assert_eq!(billing["attempts"], 1);
    assert!(billing["lastError"].is_null() && billing["nextAttemptAt"].is_null());
    let legacy = connector(&dead, "legacy");
    assert_eq!(legacy["attempts"], 3);
    assert!(
        legacy["lastError"].as_str().unwrap().contains("503"),
        "{legacy}"
    );
    assert!(legacy["confirmedAt"].is_null() && legacy["nextAttemptAt"].is_null());
    assert_eq!(
        dead["summary"],
        json!({"connectors": 2, "delivered": 1, "pending": 0, "retrying": 0, "dead": 1, "dropped": 0})
    );

    // The child's logout dies too before the receiver recovers.
    wait_receipt(&api, "c1", |r| {
        r["logouts"][0]["connectors"].as_array().unwrap().len() == 2
            && connector(r, "legacy")["status"] == "dead"
    })
    .await;

    // The receiver recovers; replaying the dead letter named by the receipt completes it.
    bad.set_status(200);
    let (code, body) = server
        .admin_post(
            "/admin/deliveries/replay",
            json!({"deliveryId": legacy["deliveryId"]}),
        )
        .await;
    assert_eq!((code, body["replayed"].as_u64()), (StatusCode::OK, Some(1)));
    let done = wait_receipt(&api, "p1", |r| r["complete"] == true).await;
    let legacy = connector(&done, "legacy");
    assert_eq!(legacy["status"], "delivered");
    assert_eq!(legacy["attempts"], 1);
    assert!(legacy["lastError"].is_null());
    assert_eq!(
        legacy["connectorVersion"],
        version_of(&server, "legacy").await
    );
    assert!(legacy["confirmedAt"].is_string());
    assert_eq!(done["summary"]["delivered"], 2);

    // The child's logout is still a dead letter, so the user is not logged out everywhere.
    assert_eq!(
        connector(&receipt(&api, "c1").await, "legacy")["status"],
        "dead"
    );
    let user = user_receipts(&server, "acme", "userId=alice").await;
    assert_eq!(user["complete"], false, "{user:#}");
    assert_eq!(user["totals"]["deliveries"]["dead"], 1);
    let (code, _) = server
        .admin_post("/admin/deliveries/replay", json!({"connector": "legacy"}))
        .await;
    assert_eq!(code, StatusCode::OK);
    let user = wait_user(&server, "userId=alice", |u| u["complete"] == true).await;
    assert_eq!(user["totals"]["sessions"], 2);
    assert_eq!(user["totals"]["deliveries"]["delivered"], 4);
    assert!(
        user["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["complete"] == true)
    );
}

async fn user_receipt_covers_every_tree_and_is_complete_only_when_all_confirmed(backend: Backend) {
    let good = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    webhook(dir.path(), "billing", &good, HEALTHY);
    let server = start(backend, Some(dir.path()), None).await;
    let api = server.api("acme");
    for (id, sid) in [("a", "kc-a"), ("b", "kc-b")] {
        let (code, _) = api
            .post(
                "map-parent",
                json!({"externalId": id, "keycloakSessionId": sid, "userId": "alice"}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED);
    }
    for (child, parent) in [("a1", "a"), ("b1", "b"), ("b1x", "b1")] {
        assert_eq!(api.map_child(child, parent).await.0, StatusCode::CREATED);
    }
    // Someone else, and alice's namesake in another realm, stay out of her receipt.
    api.post(
        "map-parent",
        json!({"externalId": "bob-1", "keycloakSessionId": "kc-c", "userId": "bob"}),
    )
    .await;
    server
        .api("other")
        .post(
            "map-parent",
            json!({"externalId": "elsewhere", "keycloakSessionId": "kc-o", "userId": "alice"}),
        )
        .await;

    let live = user_receipts(&server, "acme", "userId=alice").await;
    assert_eq!(live["realm"], "acme");
    assert_eq!(live["userId"], "alice");
    assert_eq!(live["complete"], false);
    let ids: Vec<&str> = live["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["externalId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b", "a1", "b1", "b1x"]);
    assert!(
        live["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["ended"] == false)
    );
    assert_eq!(live["totals"]["active"], 5);
    assert!(live["nextCursor"].is_null());

    // One tree ended and confirmed; the other is still live.
    api.destroy_parent("a").await;
    for id in ["a", "a1"] {
        wait_receipt(&api, id, |r| r["complete"] == true).await;
    }
    let half = user_receipts(&server, "acme", "userId=alice").await;
    assert_eq!(half["complete"], false);
    assert_eq!(
        (
            half["totals"]["ended"].as_u64(),
            half["totals"]["active"].as_u64()
        ),
        (Some(2), Some(3))
    );

    // Logout everywhere: every session ends and the connector confirms every logout.
    let (code, _) = api.post("destroy-user", json!({"userId": "alice"})).await;
    assert_eq!(code, StatusCode::OK);
    let done = wait_user(&server, "userId=alice", |u| u["complete"] == true).await;
    assert_eq!(done["totals"]["sessions"], 5);
    assert_eq!(done["totals"]["ended"], 5);
    assert_eq!(done["totals"]["deliveries"]["delivered"], 5);
    assert_eq!(done["totals"]["unrouted"], 0);
    for item in done["items"].as_array().unwrap() {
        assert_eq!(item["complete"], true, "{item:#}");
        assert_eq!(connector(item, "billing")["status"], "delivered");
    }
    let b1x = &done["items"][4];
    assert_eq!(b1x["parentExternalId"], "b1");
    // destroy-user ends each of her sessions itself (none is only a descendant).
    assert_eq!(b1x["endReason"], "logout");

    // Pages of two: the same five, and `complete` speaks for all of them on every page.
    let mut seen = Vec::new();
    let mut query = "userId=alice&limit=2".to_owned();
    for _ in 0..5 {
        let page = user_receipts(&server, "acme", &query).await;
        assert_eq!(page["complete"], true);
        assert_eq!(page["totals"]["sessions"], 5);
        assert!(page["items"].as_array().unwrap().len() <= 2);
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["externalId"].as_str().unwrap().to_owned()),
        );
        match page["nextCursor"].as_str() {
            Some(c) => query = format!("userId=alice&limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["a", "b", "a1", "b1", "b1x"]);

    // bob is still live; nobody is not complete (nothing is proven for a user without
    // sessions); the other realm's alice was never touched.
    assert_eq!(
        user_receipts(&server, "acme", "userId=bob").await["complete"],
        false
    );
    let nobody = user_receipts(&server, "acme", "userId=nobody").await;
    assert_eq!(nobody["complete"], false);
    assert_eq!(nobody["items"], json!([]));
    let other = user_receipts(&server, "other", "userId=alice").await;
    assert_eq!(other["totals"]["active"], 1);
}

async fn the_origin_of_a_logout_is_named_and_not_expected_to_confirm(backend: Backend) {
    let good = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    webhook(dir.path(), "billing", &good, HEALTHY);
    webhook(dir.path(), "portal", &good, HEALTHY);
    let server = start(backend, Some(dir.path()), None).await;
    let api = server.api("acme");
    api.map_parent("from-portal", "kc").await;
    let (code, _) = api
        .post(
            "destroy-parent",
            json!({"externalId": "from-portal", "originSystem": "portal"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let done = wait_receipt(&api, "from-portal", |r| r["complete"] == true).await;
    let logout = &done["logouts"][0];
    assert_eq!(logout["originSystem"], "portal");
    let names: Vec<&str> = logout["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["connector"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing"], "portal logged the user out itself");
    assert_eq!(done["summary"]["connectors"], 1);
    // ... and the connector passed over is named, with why.
    assert_eq!(
        logout["skipped"],
        json!([{"connector": "portal", "reason": "origin"}]),
        "{done:#}"
    );
    // A logout from a system that has no connector passes over nobody.
    api.map_parent("from-admin", "kc-2").await;
    api.destroy_parent("from-admin").await;
    let done = wait_receipt(&api, "from-admin", |r| r["complete"] == true).await;
    assert_eq!(done["logouts"][0]["skipped"], json!([]));
    assert_eq!(done["summary"]["connectors"], 2);
}

async fn live_and_orphaned_sessions_have_not_ended(backend: Backend) {
    // No connectors: an ended session's logout is routed to nobody, which is complete.
    let server = start(
        backend,
        None,
        Some("[realms.acme]\norphan_children = true\n".into()),
    )
    .await;
    let api = server.api("acme");
    api.map_parent("p", "kc").await;
    api.map_child("c", "p").await;
    let live = receipt(&api, "p").await;
    assert_eq!(live["status"], "ACTIVE");
    assert_eq!(live["ended"], false);
    assert_eq!(live["complete"], false);
    assert!(live["endedAt"].is_null() && live["endReason"].is_null());
    assert_eq!(live["logouts"], json!([]));
    assert_eq!(live["summary"]["connectors"], 0);

    // The IdP ended the user session under the orphan policy: the child is ORPHANED, which
    // is not ended (its owner has yet to end it; no logout was sent for it).
    let (code, _) = api
        .post(
            "destroy-parent",
            json!({"externalId": "p", "reason": "idp_logout"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let orphan = receipt(&api, "c").await;
    assert_eq!(orphan["status"], "ORPHANED");
    assert_eq!(
        (&orphan["ended"], &orphan["complete"]),
        (&json!(false), &json!(false))
    );
    let parent = wait_receipt(&api, "p", |r| r["complete"] == true).await;
    assert_eq!(parent["endReason"], "idp_logout");
    assert_eq!(parent["logouts"][0]["connectors"], json!([]));

    // Its owner ends it: now it has ended, and its logout reached everyone subscribed.
    api.post("destroy-child", json!({"externalId": "c"})).await;
    let ended = wait_receipt(&api, "c", |r| r["complete"] == true).await;
    assert_eq!(ended["status"], "DESTROYED");
    assert_eq!(ended["ended"], true);
}

async fn receipts_need_permission_and_stay_in_their_realm(backend: Backend) {
    let hash = |k: &str| hex::encode(lockstep::auth::sha256(k));
    let server = start(
        backend,
        None,
        Some(format!(
            "[[api_keys]]\nid = \"auditor\"\nsha256 = \"{}\"\nrealms = [\"acme\"]\npermissions = [\"audit:read\"]\n\
             [[api_keys]]\nid = \"portal\"\nsha256 = \"{}\"\nrealms = [\"acme\"]\npermissions = [\"users:manage\"]\n\
             [[api_keys]]\nid = \"elsewhere\"\nsha256 = \"{}\"\nrealms = [\"other\"]\npermissions = [\"users:manage\", \"audit:read\"]\n\
             [[api_keys]]\nid = \"ops\"\nsha256 = \"{}\"\nrealms = [\"*\"]\npermissions = [\"connectors:manage\"]\n",
            hash("auditor-key"),
            hash("portal-key"),
            hash("elsewhere-key"),
            hash("ops-key"),
        )),
    )
    .await;
    let api = server.api("acme");
    api.post(
        "map-parent",
        json!({"externalId": "p", "keycloakSessionId": "kc", "userId": "alice"}),
    )
    .await;
    server
        .api("other")
        .post(
            "map-parent",
            json!({"externalId": "theirs", "keycloakSessionId": "kc", "userId": "alice"}),
        )
        .await;

    // Either permission reads receipts of its realm.
    for key in ["auditor-key", "portal-key"] {
        let (code, body) = server.api_as("acme", key).get("p/receipt").await;
        assert_eq!(code, StatusCode::OK, "{key}: {body}");
        let client = reqwest::Client::new();
        let res = client
            .get(format!(
                "{}/admin/realms/acme/receipts?userId=alice",
                server.base
            ))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{key}");
    }
    for key in ["elsewhere-key", "ops-key"] {
        assert_problem(
            &server.api_as("acme", key).get("p/receipt").await,
            403,
            "FORBIDDEN",
        );
    }
    assert_problem(
        &server.api("acme").without_token().get("p/receipt").await,
        401,
        "UNAUTHORIZED",
    );
    let client = reqwest::Client::new();
    let res = client
        .get(format!(
            "{}/admin/realms/acme/receipts?userId=alice",
            server.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = client
        .get(format!(
            "{}/admin/realms/acme/receipts?userId=alice",
            server.base
        ))
        .bearer_auth("elsewhere-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);

    // Another realm's session is not found here; unknown ones neither.
    assert_problem(&api.get("theirs/receipt").await, 404, "NOT_FOUND");
    assert_problem(&api.get("nobody/receipt").await, 404, "NOT_FOUND");
    let theirs = server.api("other").get("theirs/receipt").await;
    assert_eq!(theirs.0, StatusCode::OK);
    assert_eq!(theirs.1["realm"], "other");
    let mine = user_receipts(&server, "acme", "userId=alice").await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    assert_eq!(mine["items"][0]["externalId"], "p");

    // Bad input is a problem document.
    for query in [
        "",
        "userId=",
        "userId=alice&limit=0",
        "userId=alice&limit=501",
        "userId=alice&cursor=zz",
        "userId=alice&status=ACTIVE",
    ] {
        assert_problem(
            &server
                .admin_get(&format!("/admin/realms/acme/receipts?{query}"))
                .await,
            400,
            "VALIDATION",
        );
    }
    assert_problem(
        &server
            .admin_get("/admin/realms/bad%20realm/receipts?userId=alice")
            .await,
        400,
        "VALIDATION",
    );
}
