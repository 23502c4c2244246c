//! The Keycloak event intake (`POST /realms/{realm}/events`) and the expiry sweeper, against
//! the real binary. Events are signed here exactly as `keycloak-extension/` signs them, so
//! every rule (signature, window, replay, each event type's effect) is checked one by one;
//! `keycloak_events.rs` runs the same flows with a real Keycloak and the real extension.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::{Backend, Server, ServerOptions, assert_problem, sign_event};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SECRET: &str = "whsec_c2VjcmV0LWZvci1sb2Nrc3RlcC1ldmVudC10ZXN0cw==";

on_both_backends!(
    keycloak_events_drive_the_session_lifecycle,
    admin_events_end_sessions_with_the_right_reason,
    expired_sessions_end_with_their_tree,
);

fn config() -> String {
    format!(
        "[realms.acme]\nevents_secrets = [\"{SECRET}\"]\n\
         [realms.orphans]\nevents_secrets = [\"{SECRET}\"]\norphan_children = true\n\
         [realms.master]\nevents_secrets = [\"{SECRET}\"]\n"
    )
}

async fn server(backend: Backend) -> Server {
    Server::start_with(backend, ServerOptions::with_config(config())).await
}

/// Posts one Keycloak event of `kind` to realm acme, signed with the realm's secret.
async fn post(server: &Server, kind: &str, extra: Value) -> (StatusCode, Value) {
    server.post_event("acme", SECRET, &event(kind, extra)).await
}

fn event(kind: &str, extra: Value) -> Value {
    let mut e = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "type": kind,
        "realm": "acme",
        "time": chrono::Utc::now().timestamp_millis(),
    });
    for (k, v) in extra.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

fn in_ms(ms: i64) -> i64 {
    chrono::Utc::now().timestamp_millis() + ms
}

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// Event types written to the outbox for one session, in order.
async fn outbox_types(s: &Server, id: &str) -> Vec<String> {
    s.outbox("acme", id)
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

async fn keycloak_events_drive_the_session_lifecycle(backend: Backend) {
    let s = server(backend).await;
    let api = s.api("acme");

    // LOGIN: the Keycloak session is mirrored as a PARENT owned by `keycloak`.
    let expires = in_ms(3_600_000);
    let login = json!({
        "userId": "u-1", "sessionId": "sid-1", "clientId": "portal", "sessionExpiresAt": expires
    });
    let (code, body) = post(&s, "LOGIN", login).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["created"]), vec!["keycloak:sid-1"]);
    let (_, mirror) = api.get("keycloak:sid-1").await;
    assert_eq!(mirror["kind"], "PARENT");
    assert_eq!(mirror["system"], "keycloak");
    assert_eq!(mirror["userId"], "u-1");
    assert_eq!(mirror["keycloakSessionId"], "sid-1");
    let login = s.outbox("acme", "keycloak:sid-1").await;
    assert_eq!(login[0]["type"], "login");
    assert_eq!(login[0]["originSystem"], "keycloak");

    // An application's PARENT on the same IdP session inherits its lifetime.
    let (code, portal) = api.map_parent("portal-1", "sid-1").await;
    assert_eq!(code, StatusCode::CREATED, "{portal}");
    assert_eq!(portal["expiresAt"], mirror["expiresAt"]);
    assert_eq!(
        api.map_child("portal-1-c", "portal-1").await.0,
        StatusCode::CREATED
    );

    // REFRESH_TOKEN moves every mapped PARENT's expiry and emits `refresh` with the new value.
    let later = in_ms(7_200_000);
    let (code, body) = post(
        &s,
        "REFRESH_TOKEN",
        json!({"userId": "u-1", "sessionId": "sid-1", "sessionExpiresAt": later}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["updated"]), vec!["keycloak:sid-1", "portal-1"]);
    let (_, portal) = api.get("portal-1").await;
    let moved =
        chrono::DateTime::parse_from_rfc3339(portal["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(moved.timestamp_millis(), later);
    let refresh = s.outbox("acme", "portal-1").await;
    assert_eq!(refresh.last().unwrap()["type"], "refresh");
    let carried = refresh.last().unwrap()["expiresAt"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(&carried)
            .unwrap()
            .timestamp_millis(),
        later
    );
    // The same expiry again changes nothing and emits nothing.
    let (_, body) = post(
        &s,
        "REFRESH_TOKEN",
        json!({"sessionId": "sid-1", "sessionExpiresAt": later}),
    )
    .await;
    assert_eq!(ids(&body["updated"]), Vec::<String>::new());

    // REVOKE_GRANT: every live session of the user hears `revoke`; none ends.
    let (code, body) = post(
        &s,
        "REVOKE_GRANT",
        json!({"userId": "u-1", "clientId": "portal"}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"], 3);
    assert_eq!(
        outbox_types(&s, "portal-1-c").await,
        vec!["login", "revoke"]
    );
    assert_eq!(api.status_of("portal-1").await, "ACTIVE");

    // IMPERSONATE within the realm: Keycloak ends the administrator's own session in that
    // request (without an event), so what was mapped to it ends now; the impersonated
    // session stands on its own and records who impersonated.
    let (code, body) = post(
        &s,
        "LOGIN",
        json!({"userId": "admin-1", "sessionId": "sid-admin"}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        api.map_parent("admin-app", "sid-admin").await.0,
        StatusCode::CREATED
    );
    let (code, body) = post(
        &s,
        "IMPERSONATE",
        json!({"userId": "u-1", "sessionId": "sid-imp", "impersonatorId": "admin-1",
                       "impersonatorSessionId": "sid-admin", "impersonatorRealm": "acme"}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["created"]), vec!["keycloak:sid-imp"]);
    assert_eq!(ids(&body["ended"]), vec!["admin-app", "keycloak:sid-admin"]);
    let (_, admin_app) = api.get("admin-app").await;
    assert_eq!(admin_app["endReason"], "idp_logout");
    let (_, imp) = api.get("keycloak:sid-imp").await;
    assert_eq!(imp["delegatedBy"], Value::Null);
    assert_eq!(imp["attributes"]["impersonatorId"], "admin-1");
    assert_eq!(imp["attributes"]["impersonatorSessionId"], "sid-admin");
    assert_eq!(imp["status"], "ACTIVE");
    // The user's own session was not touched by the administrator's.
    assert_eq!(api.status_of("portal-1").await, "ACTIVE");

    // An administrator of another realm (Keycloak's master) impersonates: when its session
    // ends in its own realm, the delegated sessions here end, and that realm's caller learns
    // only how many.
    let cross = event(
        "IMPERSONATE",
        json!({"userId": "u-1", "sessionId": "sid-x", "impersonatorId": "root",
               "impersonatorSessionId": "sid-m", "impersonatorRealm": "master"}),
    );
    let (code, body) = s.post_event("acme", SECRET, &cross).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        api.map_parent("app-x", "sid-x").await.0,
        StatusCode::CREATED
    );
    let mut master_logout = event("LOGOUT", json!({"userId": "root", "sessionId": "sid-m"}));
    master_logout["realm"] = json!("master");
    let (code, body) = s.post_event("master", SECRET, &master_logout).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["ended"], json!([]));
    assert_eq!(body["endedElsewhere"], 3);
    for (id, reason) in [
        ("keycloak:sid-m", "idp_logout"),
        ("keycloak:sid-x", "delegation_ended"),
        ("app-x", "delegation_ended"),
    ] {
        let (_, got) = api.get(id).await;
        assert_eq!(got["endReason"], reason, "{id}");
    }
    // The delegation was used up: a second end of that session reaches nothing here.
    let mut again = master_logout.clone();
    again["id"] = json!(uuid::Uuid::new_v4().to_string());
    let (_, body) = s.post_event("master", SECRET, &again).await;
    assert_eq!(body["endedElsewhere"], 0);

    // LOGOUT of the user's session: the same path as a back-channel logout.
    let (code, body) = post(&s, "LOGOUT", json!({"userId": "u-1", "sessionId": "sid-1"})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        ids(&body["ended"]),
        vec!["keycloak:sid-1", "portal-1", "portal-1-c"]
    );
    let (_, child) = api.get("portal-1-c").await;
    assert_eq!(child["endReason"], "cascade");
    let logout = s.outbox("acme", "portal-1").await;
    assert_eq!(logout.last().unwrap()["type"], "logout");
    assert_eq!(logout.last().unwrap()["originSystem"], "keycloak");
}

async fn admin_events_end_sessions_with_the_right_reason(backend: Backend) {
    let s = server(backend).await;
    let api = s.api("acme");
    let cases = [
        (
            "SESSION_DELETED",
            json!({"sessionId": "sid-a"}),
            "a",
            "admin",
        ),
        ("USER_LOGOUT_ALL", json!({"userId": "user-b"}), "b", "admin"),
        ("USER_DELETED", json!({"userId": "user-c"}), "c", "admin"),
        ("USER_DISABLED", json!({"userId": "user-d"}), "d", "revoked"),
        (
            "SESSION_EXPIRED",
            json!({"sessionId": "sid-e"}),
            "e",
            "expired",
        ),
    ];
    for (_, _, n, _) in &cases {
        let (code, body) = post(
            &s,
            "LOGIN",
            json!({"userId": format!("user-{n}"), "sessionId": format!("sid-{n}")}),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(
            api.map_parent(&format!("app-{n}"), &format!("sid-{n}"))
                .await
                .0,
            StatusCode::CREATED
        );
        assert_eq!(
            api.map_child(&format!("app-{n}-c"), &format!("app-{n}"))
                .await
                .0,
            StatusCode::CREATED
        );
    }
    for (kind, extra, n, reason) in &cases {
        let (code, body) = post(&s, kind, extra.clone()).await;
        assert_eq!(code, StatusCode::OK, "{kind}: {body}");
        assert_eq!(
            ids(&body["ended"]),
            vec![
                format!("app-{n}"),
                format!("app-{n}-c"),
                format!("keycloak:sid-{n}")
            ],
            "{kind}"
        );
        let (_, app) = api.get(&format!("app-{n}")).await;
        assert_eq!(app["endReason"], *reason, "{kind}");
        let (_, child) = api.get(&format!("app-{n}-c")).await;
        // A user-wide end targets the child too (it carries the user); a session-wide end
        // reaches it through the cascade.
        let child_reason = match (extra.get("userId"), *reason) {
            (Some(_), r) | (None, r @ "expired") => r,
            (None, _) => "cascade",
        };
        assert_eq!(child["endReason"], child_reason, "{kind}");
        // Every other user's sessions are untouched.
        let live = api.list_all("&status=ACTIVE").await.len();
        assert!(live > 0 || *kind == "SESSION_EXPIRED", "{kind}");
    }

    // REALM_LOGOUT_ALL ends every PARENT mapped to an IdP session, and nothing else.
    for n in ["x", "y"] {
        post(&s, "LOGIN", json!({"sessionId": format!("sid-{n}")})).await;
        api.map_parent(&format!("app-{n}"), &format!("sid-{n}"))
            .await;
    }
    let (code, _) = api
        .post("map-fixed", json!({"externalId": "standalone"}))
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, body) = post(&s, "REALM_LOGOUT_ALL", json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        ids(&body["ended"]),
        vec!["app-x", "app-y", "keycloak:sid-x", "keycloak:sid-y"]
    );
    assert_eq!(api.status_of("standalone").await, "ACTIVE");
}

async fn expired_sessions_end_with_their_tree(backend: Backend) {
    let s = server(backend).await;
    let api = s.api("acme");
    // A Keycloak session that runs out (no refresh), one that is refreshed in time, and a
    // session without an expiry.
    for (sid, ms) in [("sid-short", 1_500), ("sid-kept", 1_500)] {
        let (code, body) = post(
            &s,
            "LOGIN",
            json!({"sessionId": sid, "sessionExpiresAt": in_ms(ms)}),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{body}");
    }
    api.map_parent("app-short", "sid-short").await;
    api.map_child("app-short-c", "app-short").await;
    api.map_child("app-short-cc", "app-short-c").await;
    api.map_parent("app-kept", "sid-kept").await;
    api.post("map-fixed", json!({"externalId": "forever"}))
        .await;
    let (code, _) = post(
        &s,
        "REFRESH_TOKEN",
        json!({"sessionId": "sid-kept", "sessionExpiresAt": in_ms(3_600_000)}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    // Orphan policy: children of an expired parent are ORPHANED, not destroyed.
    let orphans = s.api("orphans");
    orphans
        .post(
            "map-parent",
            json!({"externalId": "o-root", "keycloakSessionId": "sid-o", "expiresAt": chrono::DateTime::from_timestamp_millis(in_ms(1_000)).unwrap().to_rfc3339()}),
        )
        .await;
    orphans.map_child("o-child", "o-root").await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while api.status_of("app-short-cc").await == "ACTIVE"
        || orphans.status_of("o-root").await == "ACTIVE"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweeper never ended the expired trees"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in [
        "keycloak:sid-short",
        "app-short",
        "app-short-c",
        "app-short-cc",
    ] {
        let (_, got) = api.get(id).await;
        assert_eq!(
            (got["status"].as_str(), got["endReason"].as_str()),
            (Some("DESTROYED"), Some("expired")),
            "{id}"
        );
        assert_eq!(
            outbox_types(&s, id).await.last().map(String::as_str),
            Some("logout"),
            "{id}"
        );
    }
    for id in ["keycloak:sid-kept", "app-kept", "forever"] {
        assert_eq!(api.status_of(id).await, "ACTIVE", "{id}");
    }
    let (_, root) = orphans.get("o-root").await;
    assert_eq!(root["endReason"], "expired");
    assert_eq!(orphans.status_of("o-child").await, "ORPHANED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_stale_replayed_and_malformed_posts_change_nothing() {
    let s = server(Backend::Sqlite).await;
    let login = event("LOGIN", json!({"userId": "u-1", "sessionId": "sid-1"}));
    let body = serde_json::to_vec(&login).unwrap();
    let id = login["id"].as_str().unwrap();
    let now = chrono::Utc::now().timestamp().to_string();
    let good = sign_event(SECRET, id, &now, &body);
    let post = |headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let s = &s;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            s.post_event_raw("acme", &h, body).await
        }
    };
    let headers = |id: &str, ts: &str, sig: &str| {
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_owned()),
            ("webhook-signature", sig.to_owned()),
            ("content-type", "application/json".to_owned()),
        ]
    };

    // Tampered body, other id, other secret, stale or future timestamp, missing headers.
    let mut tampered = login.clone();
    tampered["sessionId"] = json!("sid-evil");
    let tampered = serde_json::to_vec(&tampered).unwrap();
    assert_problem(
        &post(headers(id, &now, &good), tampered).await,
        401,
        "UNAUTHORIZED",
    );
    assert_problem(
        &post(headers("other", &now, &good), body.clone()).await,
        401,
        "UNAUTHORIZED",
    );
    let wrong_key = sign_event("a-different-secret-of-length", id, &now, &body);
    assert_problem(
        &post(headers(id, &now, &wrong_key), body.clone()).await,
        401,
        "UNAUTHORIZED",
    );
    for skew in [-301, 301] {
        let ts = (chrono::Utc::now().timestamp() + skew).to_string();
        let sig = sign_event(SECRET, id, &ts, &body);
        let got = post(headers(id, &ts, &sig), body.clone()).await;
        assert_problem(&got, 401, "UNAUTHORIZED");
        assert!(
            got.1["detail"]
                .as_str()
                .unwrap()
                .contains("webhook-timestamp"),
            "{}",
            got.1
        );
    }
    let mut missing = headers(id, &now, &good);
    missing.retain(|(k, _)| *k != "webhook-signature");
    assert_problem(&post(missing, body.clone()).await, 401, "UNAUTHORIZED");
    assert_eq!(s.outbox_total().await, 0, "nothing was applied");

    // Not JSON, a realm without secrets, an unknown type, a realm or id mismatch.
    let mut text = headers(id, &now, &good);
    text[3].1 = "text/plain".into();
    assert_problem(&post(text, body.clone()).await, 415, "VALIDATION");
    assert_problem(
        &s.post_event("elsewhere", SECRET, &login).await,
        404,
        "NOT_FOUND",
    );
    assert_problem(
        &s.post_event("acme", SECRET, &event("PASSWORD_RESET", json!({})))
            .await,
        400,
        "VALIDATION",
    );
    let mut other_realm = event("LOGIN", json!({"sessionId": "sid-2"}));
    other_realm["realm"] = json!("orphans");
    assert_problem(
        &s.post_event("acme", SECRET, &other_realm).await,
        400,
        "VALIDATION",
    );
    let mut no_sid = event("LOGOUT", json!({}));
    no_sid["userId"] = json!("u-1");
    assert_problem(
        &s.post_event("acme", SECRET, &no_sid).await,
        400,
        "VALIDATION",
    );
    let sig = sign_event(SECRET, "header-id", &now, &body);
    assert_problem(
        &post(headers("header-id", &now, &sig), body.clone()).await,
        400,
        "VALIDATION",
    );
    assert_eq!(s.outbox_total().await, 0, "nothing was applied");

    // The genuine post applies once; the same event again (re-signed, as the extension does
    // on a retry) is 409 and changes nothing.
    let (code, first) = post(headers(id, &now, &good), body.clone()).await;
    assert_eq!(code, StatusCode::OK, "{first}");
    let after_first = s.outbox_total().await;
    assert_eq!(after_first, 1);
    let again = s.post_event("acme", SECRET, &login).await;
    assert_problem(&again, 409, "DUPLICATE_EVENT");
    assert_eq!(s.outbox_total().await, after_first);
    // A replayed duplicate survives a restart (the id is stored with the change).
    let (url, dir) = s.kill().await;
    let s = Server::start_on(
        Backend::Sqlite,
        url,
        dir,
        ServerOptions::with_config(config()),
    )
    .await;
    assert_problem(
        &s.post_event("acme", SECRET, &login).await,
        409,
        "DUPLICATE_EVENT",
    );
    assert_eq!(s.outbox_total().await, after_first);
}
