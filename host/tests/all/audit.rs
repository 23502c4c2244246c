//! The audit log against the real binary, on SQLite and PostgreSQL: one record per
//! operation with its actor, action, target and result; refusals recorded; IdP-caused and
//! expiry changes; connector and delivery actions without a realm; `GET /admin/audit`
//! filters, pagination, permissions and realm isolation; retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::{Backend, Server, ServerOptions, TOKEN, assert_problem};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    every_session_operation_leaves_one_record_with_actor_action_target_and_result,
    refused_operations_leave_a_refusal_record_and_change_nothing,
    idp_events_and_expiry_are_recorded_as_their_actors,
    connector_and_delivery_actions_are_recorded_without_a_realm,
    pages_filters_permissions_and_realm_isolation,
    retention_deletes_old_records_and_keeps_recent_ones,
);

const SECRET: &str = "whsec_c2VjcmV0LWZvci1sb2Nrc3RlcC1ldmVudC10ZXN0cw==";

fn hex_sha256(s: &str) -> String {
    hex::encode(lockstep::auth::sha256(s))
}

/// API keys: `portal` manages sessions in acme and other, `auditor` reads acme's audit log,
/// `ops` reads every realm's.
fn keys_config() -> String {
    let key = |id: &str, secret: &str, realms: &str, perms: &str| {
        format!(
            "[[api_keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nrealms = {realms}\npermissions = {perms}\n",
            hex_sha256(secret)
        )
    };
    [
        format!("[realms.acme]\nevents_secrets = [\"{SECRET}\"]\n"),
        key(
            "portal",
            "portal-key",
            r#"["acme", "other"]"#,
            r#"["users:manage"]"#,
        ),
        key("auditor", "auditor-key", r#"["acme"]"#, r#"["audit:read"]"#),
        key("ops", "ops-key", r#"["*"]"#, r#"["audit:read"]"#),
    ]
    .concat()
}

async fn start(backend: Backend) -> Server {
    Server::start_with(backend, ServerOptions::with_config(keys_config())).await
}

/// `GET path` with this bearer token (None: no Authorization header).
async fn get_as(server: &Server, token: Option<&str>, path: &str) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", server.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Every record the admin token sees for `query`, following cursors (newest first).
async fn audit_all(server: &Server, token: &str, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let path = match &cursor {
            Some(c) => format!("/admin/audit?limit=500&cursor={c}&{query}"),
            None => format!("/admin/audit?limit=500&{query}"),
        };
        let (code, body) = get_as(server, Some(token), &path).await;
        assert_eq!(code, StatusCode::OK, "{path}: {body}");
        out.extend(body["items"].as_array().unwrap().iter().cloned());
        match body["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
    panic!("pagination did not end");
}

/// (actor, action, target, result, changed) of each record, oldest first.
fn summary(records: &[Value]) -> Vec<(String, String, String, String, Option<i64>)> {
    records
        .iter()
        .rev()
        .map(|r| {
            (
                r["actor"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
                r["target"].as_str().unwrap_or("-").to_owned(),
                r["result"].as_str().unwrap().to_owned(),
                r["changed"].as_i64(),
            )
        })
        .collect()
}

fn row(
    actor: &str,
    action: &str,
    target: &str,
    result: &str,
    changed: Option<i64>,
) -> (String, String, String, String, Option<i64>) {
    (
        actor.into(),
        action.into(),
        target.into(),
        result.into(),
        changed,
    )
}

async fn every_session_operation_leaves_one_record_with_actor_action_target_and_result(
    backend: Backend,
) {
    let server = start(backend).await;
    let portal = server.api_as("acme", "portal-key");
    let admin = server.api("acme");
    assert_eq!(
        portal
            .post(
                "map-parent",
                json!({"externalId": "p", "keycloakSessionId": "kc-1", "userId": "u-1"})
            )
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(portal.map_child("c1", "p").await.0, StatusCode::CREATED);
    assert_eq!(portal.map_child("c2", "p").await.0, StatusCode::CREATED);
    assert_eq!(
        admin
            .post("map-fixed", json!({"externalId": "f", "userId": "u-1"}))
            .await
            .0,
        StatusCode::CREATED
    );
    let destroyed = admin
        .post("destroy-child", json!({"externalId": "c2"}))
        .await;
    assert_eq!(destroyed.0, StatusCode::OK);
    let destroyed = portal
        .post(
            "destroy-parent",
            json!({"externalId": "p", "reason": "admin"}),
        )
        .await;
    assert_eq!(destroyed.1["changed"].as_array().unwrap().len(), 2);
    // Idempotent destroy: recorded, nothing changed.
    portal.destroy_parent("p").await;
    admin.post("destroy-user", json!({"userId": "u-1"})).await;
    // Reads are not audited.
    admin.get("p").await;
    admin.get("").await;

    let records = audit_all(&server, TOKEN, "realm=acme").await;
    assert_eq!(
        summary(&records),
        vec![
            row("key:portal", "map-parent", "p", "ok", Some(1)),
            row("key:portal", "map-child", "c1", "ok", Some(1)),
            row("key:portal", "map-child", "c2", "ok", Some(1)),
            row("admin", "map-fixed", "f", "ok", Some(1)),
            row("admin", "destroy-child", "c2", "ok", Some(1)),
            row("key:portal", "destroy-parent", "p", "ok", Some(2)),
            row("key:portal", "destroy-parent", "p", "ok", Some(0)),
            row("admin", "destroy-user", "u-1", "ok", Some(1)),
        ]
    );
    let last_destroy = &records[2];
    assert_eq!(last_destroy["detail"], json!({"reason": "admin"}));
    for r in &records {
        assert_eq!(r["realm"], "acme");
        let at: chrono::DateTime<chrono::Utc> = r["at"].as_str().unwrap().parse().unwrap();
        assert!((chrono::Utc::now() - at).num_seconds().abs() < 60);
    }
    let ids: Vec<i64> = records.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
}

async fn refused_operations_leave_a_refusal_record_and_change_nothing(backend: Backend) {
    let server = start(backend).await;
    let api = server.api_as("acme", "portal-key");
    assert_eq!(api.map_parent("p", "kc-1").await.0, StatusCode::CREATED);
    assert_eq!(api.map_child("c", "p").await.0, StatusCode::CREATED);
    assert_problem(&api.map_parent("p", "kc-1").await, 409, "ALREADY_EXISTS");
    assert_problem(
        &api.map_child("x", "missing").await,
        404,
        "PARENT_NOT_FOUND",
    );
    assert_problem(&api.destroy_parent("c").await, 409, "WRONG_KIND");
    assert_problem(
        &api.post("destroy-child", json!({"externalId": "nope"}))
            .await,
        404,
        "NOT_FOUND",
    );
    api.destroy_parent("p").await;
    assert_problem(&api.map_child("late", "p").await, 409, "PARENT_NOT_ACTIVE");
    // Bad input and missing permissions are not audited (nothing was attempted).
    assert_eq!(
        api.post("map-parent", json!({"externalId": "q"})).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_problem(
        &server
            .api_as("third", "portal-key")
            .map_parent("z", "kc")
            .await,
        403,
        "FORBIDDEN",
    );
    assert_eq!(
        api.clone().without_token().map_parent("z", "kc").await.0,
        StatusCode::UNAUTHORIZED
    );

    let records = audit_all(&server, TOKEN, "").await;
    assert_eq!(
        summary(&records),
        vec![
            row("key:portal", "map-parent", "p", "ok", Some(1)),
            row("key:portal", "map-child", "c", "ok", Some(1)),
            row("key:portal", "map-parent", "p", "ALREADY_EXISTS", None),
            row("key:portal", "map-child", "x", "PARENT_NOT_FOUND", None),
            row("key:portal", "destroy-parent", "c", "WRONG_KIND", None),
            row("key:portal", "destroy-child", "nope", "NOT_FOUND", None),
            row("key:portal", "destroy-parent", "p", "ok", Some(2)),
            row("key:portal", "map-child", "late", "PARENT_NOT_ACTIVE", None),
        ]
    );
    // The refused maps created nothing.
    let all = api.list_all("").await;
    assert_eq!(all.len(), 2);
    assert_problem(&api.get("x").await, 404, "NOT_FOUND");
    assert_problem(&api.get("late").await, 404, "NOT_FOUND");
}

async fn idp_events_and_expiry_are_recorded_as_their_actors(backend: Backend) {
    let server = start(backend).await;
    let id = uuid::Uuid::new_v4().to_string();
    let login = json!({
        "id": id, "type": "LOGIN", "realm": "acme",
        "time": chrono::Utc::now().timestamp_millis(),
        "userId": "u-1", "sessionId": "sid-1",
        "sessionExpiresAt": chrono::Utc::now().timestamp_millis() + 3_600_000,
    });
    let (code, body) = server.post_event("acme", SECRET, &login).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, body) = server.post_event("acme", SECRET, &login).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    let logout = json!({
        "id": uuid::Uuid::new_v4().to_string(), "type": "LOGOUT", "realm": "acme",
        "time": chrono::Utc::now().timestamp_millis(),
        "userId": "u-1", "sessionId": "sid-1",
    });
    assert_eq!(
        server.post_event("acme", SECRET, &logout).await.0,
        StatusCode::OK
    );
    // A session that expires in a moment: the sweeper (every second) ends it.
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let api = server.api("acme");
    let (code, body) = api
        .post(
            "map-parent",
            json!({"externalId": "short", "keycloakSessionId": "kc-short", "expiresAt": expires}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.status_of("short").await == "ACTIVE" {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let records = audit_all(&server, TOKEN, "realm=acme").await;
    assert_eq!(
        summary(&records),
        vec![
            row("idp:keycloak", "idp-event:LOGIN", "sid-1", "ok", Some(1)),
            row(
                "idp:keycloak",
                "idp-event:LOGIN",
                "sid-1",
                "DUPLICATE_EVENT",
                None
            ),
            row("idp:keycloak", "idp-event:LOGOUT", "sid-1", "ok", Some(1)),
            row("admin", "map-parent", "short", "ok", Some(1)),
            row("lockstep:expiry", "expire", "-", "ok", Some(1)),
        ]
    );
    assert_eq!(records[4]["detail"], json!({"eventId": id}));
    assert_eq!(records[0]["detail"], json!({"due": 1}));
    let by_idp = audit_all(&server, TOKEN, "actor=idp:keycloak").await;
    assert_eq!(by_idp.len(), 3);
}

async fn connector_and_delivery_actions_are_recorded_without_a_realm(backend: Backend) {
    let server = start(backend).await;
    let manifest = "name = \"hook\"\nrealms = [\"*\"]\nallowed_hosts = []\n[config]\nurl = \"http://127.0.0.1:9/x\"\n";
    let webhook = std::fs::read(common::components::component("webhook")).unwrap();
    let (code, body) = server
        .put_connector("hook", manifest, Some(webhook.clone()))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, _) = server.put_connector("hook", manifest, Some(webhook)).await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = server
        .put_connector("bad", "name = \"bad\"\n", Some(b"not wasm".to_vec()))
        .await;
    assert!(code.is_client_error());
    assert_eq!(
        server
            .admin_post("/admin/connectors/hook/disable", json!({}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        server
            .admin_post("/admin/connectors/hook/enable", json!({}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        server
            .admin_post("/admin/connectors/ghost/disable", json!({}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server
            .admin_post("/admin/deliveries/replay", json!({"connector": "hook"}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        server
            .admin_post("/admin/deliveries/replay", json!({"deliveryId": 999}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server.admin_delete("/admin/connectors/hook").await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        server.admin_delete("/admin/connectors/hook").await.0,
        StatusCode::NOT_FOUND
    );

    let records = audit_all(&server, TOKEN, "").await;
    let got = summary(&records);
    let bad = got[2].clone();
    assert_eq!((bad.1.as_str(), bad.2.as_str()), ("connector-put", "bad"));
    assert!(
        ["INVALID_MANIFEST", "INVALID_COMPONENT"].contains(&bad.3.as_str()),
        "{bad:?}"
    );
    assert_eq!(
        got,
        vec![
            row("admin", "connector-put", "hook", "ok", Some(1)),
            row("admin", "connector-put", "hook", "ok", Some(0)),
            bad,
            row("admin", "connector-disable", "hook", "ok", Some(1)),
            row("admin", "connector-enable", "hook", "ok", Some(1)),
            row("admin", "connector-disable", "ghost", "NOT_FOUND", None),
            row("admin", "delivery-replay", "hook", "ok", Some(0)),
            row("admin", "delivery-replay", "999", "NOT_FOUND", None),
            row("admin", "connector-delete", "hook", "ok", Some(1)),
            row("admin", "connector-delete", "hook", "NOT_FOUND", None),
        ]
    );
    assert!(records.iter().all(|r| r["realm"].is_null()));
    assert_eq!(records[8]["detail"], json!({"outcome": "unchanged"}));
    // A realm's auditor does not see actions across realms.
    assert!(
        audit_all(&server, "auditor-key", "realm=acme")
            .await
            .is_empty()
    );
}

async fn pages_filters_permissions_and_realm_isolation(backend: Backend) {
    let server = start(backend).await;
    let acme = server.api_as("acme", "portal-key");
    let other = server.api_as("other", "portal-key");
    for i in 0..7 {
        assert_eq!(
            acme.map_parent(&format!("a{i}"), "kc").await.0,
            StatusCode::CREATED
        );
    }
    for i in 0..3 {
        assert_eq!(
            other.map_parent(&format!("o{i}"), "kc").await.0,
            StatusCode::CREATED
        );
    }
    assert_eq!(
        server.api("acme").destroy_parent("a0").await.0,
        StatusCode::OK
    );

    // Pages of 3 over acme's 8 records: newest first, no gaps, no repeats, acme only.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/audit?realm=acme&limit=3&cursor={c}"),
            None => "/admin/audit?realm=acme&limit=3".to_owned(),
        };
        let (code, body) = get_as(&server, Some("auditor-key"), &path).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        pages += 1;
        for r in body["items"].as_array().unwrap() {
            assert_eq!(r["realm"], "acme");
            seen.push(r["id"].as_i64().unwrap());
        }
        match body["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 8);
    assert!(seen.windows(2).all(|w| w[0] > w[1]));

    // Filters.
    let by_admin = audit_all(&server, "auditor-key", "realm=acme&actor=admin").await;
    assert_eq!(by_admin.len(), 1);
    assert_eq!(by_admin[0]["action"], "destroy-parent");
    let maps = audit_all(&server, "ops-key", "action=map-parent").await;
    assert_eq!(maps.len(), 10);
    let portal_everywhere = audit_all(&server, "ops-key", "actor=key:portal").await;
    assert_eq!(portal_everywhere.len(), 10);
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let since = format!("since={}", urlencode(&future));
    assert!(audit_all(&server, "ops-key", &since).await.is_empty());
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let since = format!("since={}", urlencode(&past));
    assert_eq!(audit_all(&server, "ops-key", &since).await.len(), 11);
    let in_other = audit_all(&server, "ops-key", "realm=other").await;
    assert_eq!(in_other.len(), 3);
    assert!(in_other.iter().all(|r| r["realm"] == "other"));

    // Permissions: audit:read in the realm asked for; in every realm without one.
    let p = |path: &str, token: Option<&'static str>| {
        let path = path.to_owned();
        let server = &server;
        async move { get_as(server, token, &path).await }
    };
    assert_problem(
        &p("/admin/audit?realm=other", Some("auditor-key")).await,
        403,
        "FORBIDDEN",
    );
    assert_problem(
        &p("/admin/audit", Some("auditor-key")).await,
        403,
        "FORBIDDEN",
    );
    assert_problem(
        &p("/admin/audit?realm=acme", Some("portal-key")).await,
        403,
        "FORBIDDEN",
    );
    assert_problem(
        &p("/admin/audit?realm=acme", None).await,
        401,
        "UNAUTHORIZED",
    );
    assert_problem(
        &p("/admin/audit?realm=acme", Some("wrong")).await,
        401,
        "UNAUTHORIZED",
    );
    // Bad input.
    for bad in [
        "realm=acme&limit=0",
        "realm=acme&limit=501",
        "realm=acme&cursor=zz",
        "realm=acme&since=yesterday",
        "realm=acme&color=red",
        "realm=a%20b",
    ] {
        let got = p(&format!("/admin/audit?{bad}"), Some(TOKEN)).await;
        assert_problem(&got, 400, "VALIDATION");
    }
    // The audit reads themselves are not audited.
    assert_eq!(audit_all(&server, TOKEN, "").await.len(), 11);
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

async fn retention_deletes_old_records_and_keeps_recent_ones(backend: Backend) {
    let options =
        ServerOptions::with_config(format!("{}[audit]\nretention_days = 2\n", keys_config()));
    let server = Server::start_with(backend, options.clone()).await;
    let api = server.api("acme");
    assert_eq!(api.map_parent("p", "kc").await.0, StatusCode::CREATED);
    let day_ms: i64 = 24 * 3600 * 1000;
    let now = chrono::Utc::now().timestamp_millis();
    // 1,500 records three days old (more than one sweep batch) and one a day old.
    server
        .exec_sql(&format!(
            "INSERT INTO audit (at_ms, realm, actor, action, target, result, changed) \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500) \
             SELECT {}, 'acme', 'admin', 'map-parent', 'old', 'ok', 1 FROM n",
            now - 3 * day_ms
        ))
        .await;
    server
        .exec_sql(&format!(
            "INSERT INTO audit (at_ms, realm, actor, action, target, result, changed) \
             VALUES ({}, 'acme', 'admin', 'map-parent', 'recent', 'ok', 1)",
            now - day_ms
        ))
        .await;
    assert_eq!(audit_all(&server, TOKEN, "").await.len(), 1502);
    // The sweep runs at start (and then hourly): a restart applies it now.
    let (url, dir) = server.kill().await;
    let server = Server::start_on(backend, url, dir, options).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = audit_all(&server, TOKEN, "").await;
        if records.len() == 2 {
            let targets: Vec<&str> = records
                .iter()
                .map(|r| r["target"].as_str().unwrap())
                .collect();
            assert_eq!(targets, vec!["recent", "p"]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "old records were not deleted: {} left",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
