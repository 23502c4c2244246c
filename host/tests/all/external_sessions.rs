//! The external-sessions API against the real binary, on SQLite and PostgreSQL: the
//! scenarios the API promises. Every scenario runs once per backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::{BTreeSet, HashMap};

use common::{Backend, Server, ServerOptions, TOKEN, assert_problem};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    reference_scenario_destroy_parent_cascades_and_is_idempotent,
    mapping_an_existing_id_conflicts_whatever_its_status,
    fifty_concurrent_identical_maps_create_exactly_one,
    fifty_concurrent_identical_maps_with_fsync_group_commit,
    realms_are_isolated,
    queries_filter_and_paginate_stably_under_inserts,
    destroy_user_ends_every_session_of_the_user,
    destroy_child_leaves_parent_and_siblings_active,
    wrong_kinds_and_missing_sessions_are_refused,
    four_level_tree_of_1000_is_destroyed_in_one_transaction,
    orphan_children_policy_orphans_on_idp_logout,
    map_child_racing_destroy_parent_never_leaves_an_active_orphan,
    bad_input_gets_a_problem_document_and_changes_nothing,
    authentication_and_authorisation_are_enforced,
    outbox_records_one_event_per_change_in_the_same_transaction,
    committed_changes_survive_sigkill,
    a_session_named_like_an_action_is_readable,
    a_key_names_only_its_own_system_as_origin,
    a_tree_larger_than_max_tree_is_refused_not_read,
    failed_authentications_are_throttled_per_address,
);

async fn reference_scenario_destroy_parent_cascades_and_is_idempotent(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    let (code, parent) = api.map_parent("portal-session-001", "kc-user-123").await;
    assert_eq!(code, StatusCode::CREATED, "{parent}");
    assert_eq!(parent["kind"], "PARENT");
    assert_eq!(parent["status"], "ACTIVE");
    assert_eq!(parent["keycloakSessionId"], "kc-user-123");
    for child in ["service-a-session-001", "service-b-session-001"] {
        let (code, body) = api.map_child(child, "portal-session-001").await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
        assert_eq!(body["parentExternalId"], "portal-session-001");
        // A child belongs to its parent's Keycloak session unless told otherwise.
        assert_eq!(body["keycloakSessionId"], "kc-user-123");
    }

    let (code, tree) = api.get("session-tree/service-b-session-001").await;
    assert_eq!(code, StatusCode::OK, "{tree}");
    assert_eq!(tree["rootExternalId"], "portal-session-001");
    assert_eq!(tree["size"], 3);
    let ids: Vec<&str> = tree["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["externalId"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "portal-session-001",
            "service-a-session-001",
            "service-b-session-001"
        ]
    );
    assert_eq!(tree["sessions"][1]["depth"], 1);

    let (code, res) = api.destroy_parent("portal-session-001").await;
    assert_eq!(code, StatusCode::OK, "{res}");
    let changed = res["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 3);
    let reasons: HashMap<&str, &str> = changed
        .iter()
        .map(|s| {
            assert_eq!(s["status"], "DESTROYED");
            (
                s["externalId"].as_str().unwrap(),
                s["endReason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(reasons["portal-session-001"], "logout");
    assert_eq!(reasons["service-a-session-001"], "cascade");
    assert_eq!(reasons["service-b-session-001"], "cascade");
    for id in [
        "portal-session-001",
        "service-a-session-001",
        "service-b-session-001",
    ] {
        assert_eq!(api.status_of(id).await, "DESTROYED");
    }

    let again = api.destroy_parent("portal-session-001").await;
    assert_eq!(again.0, StatusCode::OK);
    assert_eq!(again.1, json!({"changed": []}));
}

async fn mapping_an_existing_id_conflicts_whatever_its_status(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    assert_eq!(api.map_parent("p1", "sid-1").await.0, StatusCode::CREATED);
    assert_problem(&api.map_parent("p1", "sid-2").await, 409, "ALREADY_EXISTS");
    // Same id through another route, and after the session ended: still taken.
    let fixed = api.post("map-fixed", json!({"externalId": "p1"})).await;
    assert_problem(&fixed, 409, "ALREADY_EXISTS");
    api.destroy_parent("p1").await;
    assert_problem(&api.map_parent("p1", "sid-3").await, 409, "ALREADY_EXISTS");
    // The original row is untouched by the refused attempts.
    let (_, p1) = api.get("p1").await;
    assert_eq!(p1["keycloakSessionId"], "sid-1");
}

/// Ids are free text, so a session may be called like a route: GET on `.../map-parent` is
/// that session (it was the action's 405), and a name nobody mapped is 404 there too.
async fn a_session_named_like_an_action_is_readable(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    let names = [
        "map-parent",
        "map-child",
        "map-fixed",
        "destroy-parent",
        "destroy-child",
        "destroy-user",
        "session-tree",
        "receipt",
    ];
    for name in names {
        assert_eq!(api.map_parent(name, "sid-1").await.0, StatusCode::CREATED);
        let (code, body) = api.get(name).await;
        assert_eq!(code, StatusCode::OK, "GET {name}: {body}");
        assert_eq!(body["externalId"], name);
        assert_eq!(body["realm"], "acme");
    }
    let other = server.api("other");
    for name in names {
        assert_problem(&other.get(name).await, 404, "NOT_FOUND");
    }
}

async fn concurrent_identical_maps(server: &Server) {
    let api = server.api("acme");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.map_parent("same-session", "kc-1").await
        }));
    }
    let mut created = 0;
    let mut conflicts = 0;
    for t in tasks {
        let (code, body) = t.await.unwrap();
        match code.as_u16() {
            201 => created += 1,
            409 => {
                assert_eq!(body["code"], "ALREADY_EXISTS");
                conflicts += 1
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((created, conflicts), (1, 49));
    assert_eq!(server.outbox("acme", "same-session").await.len(), 1);
}

async fn fifty_concurrent_identical_maps_create_exactly_one(backend: Backend) {
    let server = Server::start(backend).await;
    concurrent_identical_maps(&server).await;
}

async fn fifty_concurrent_identical_maps_with_fsync_group_commit(backend: Backend) {
    let server = Server::start_with(
        backend,
        ServerOptions {
            durability: "fsync",
            ..Default::default()
        },
    )
    .await;
    concurrent_identical_maps(&server).await;
    // Distinct ids in parallel all land, sharing commits.
    let api = server.api("acme");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.map_parent(&format!("gc-{i}"), "kc-gc").await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    assert_eq!(api.list_all("&keycloakSessionId=kc-gc").await.len(), 200);
}

async fn realms_are_isolated(backend: Backend) {
    let key_hash = hex_sha256("acme-only-key");
    let server = Server::start_with(
        backend,
        ServerOptions {
            config: Some(format!(
                "[[api_keys]]\nid = \"portal\"\nsha256 = \"{key_hash}\"\nrealms = [\"acme\"]\npermissions = [\"users:manage\"]\n"
            )),
            ..Default::default()
        },
    )
    .await;
    let acme = server.api("acme");
    let other = server.api("other");
    assert_eq!(
        acme.map_parent("p", "kc-shared").await.0,
        StatusCode::CREATED
    );

    // A child in `other` cannot hang under a parent of `acme`.
    assert_problem(&other.map_child("c", "p").await, 404, "PARENT_NOT_FOUND");
    // The same external id is free in another realm.
    assert_eq!(
        other.map_parent("p", "kc-shared").await.0,
        StatusCode::CREATED
    );
    // Reads never cross realms.
    let in_other = other.list_all("&keycloakSessionId=kc-shared").await;
    assert_eq!(in_other.len(), 1);
    assert!(in_other.iter().all(|s| s["realm"] == "other"));
    assert_eq!(other.list_all("").await.len(), 1);
    // Destroying in one realm leaves the other alone.
    other.destroy_parent("p").await;
    assert_eq!(acme.status_of("p").await, "ACTIVE");
    assert_problem(&server.api("third").get("p").await, 404, "NOT_FOUND");
    assert_problem(
        &server.api("third").get("session-tree/p").await,
        404,
        "NOT_FOUND",
    );

    // A key scoped to `acme` works there and is forbidden elsewhere.
    let key_acme = server.api_as("acme", "acme-only-key");
    assert_eq!(
        key_acme.map_parent("k1", "kc-k").await.0,
        StatusCode::CREATED
    );
    assert_eq!(key_acme.get("k1").await.1["system"], "portal");
    let key_other = server.api_as("other", "acme-only-key");
    assert_problem(&key_other.get("p").await, 403, "FORBIDDEN");
    assert_problem(&key_other.map_parent("k2", "kc-k").await, 403, "FORBIDDEN");
    assert_problem(&key_other.get("").await, 403, "FORBIDDEN");
}

async fn queries_filter_and_paginate_stably_under_inserts(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    for i in 0..30 {
        let body = json!({
            "externalId": format!("p{i}"),
            "keycloakSessionId": format!("kc-{}", i % 3),
            "keycloakClientSessionId": format!("cs-{}", i % 5),
            "userId": format!("user-{}", i % 2),
            "system": if i % 2 == 0 { "portal" } else { "billing" },
        });
        assert_eq!(api.post("map-parent", body).await.0, StatusCode::CREATED);
    }
    api.destroy_parent("p0").await;

    assert_eq!(api.list_all("&keycloakSessionId=kc-1").await.len(), 10);
    assert_eq!(api.list_all("&keycloakClientSessionId=cs-4").await.len(), 6);
    assert_eq!(api.list_all("&userId=user-0").await.len(), 15);
    assert_eq!(api.list_all("&system=billing").await.len(), 15);
    assert_eq!(api.list_all("&status=DESTROYED").await.len(), 1);
    assert_eq!(api.list_all("&status=ACTIVE").await.len(), 29);
    assert_eq!(
        api.list_all("&userId=user-0&status=ACTIVE&keycloakSessionId=kc-0")
            .await
            .len(),
        4
    );

    // Walk pages of 7 while new sessions keep arriving: every session that existed before
    // the walk is seen exactly once, in creation order.
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut extra = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("?limit=7&cursor={c}"),
            None => "?limit=7".to_owned(),
        };
        let (code, page) = api.get(&q).await;
        assert_eq!(code, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 7);
        seen.extend(
            items
                .iter()
                .map(|s| s["externalId"].as_str().unwrap().to_owned()),
        );
        if extra < 5 {
            api.map_parent(&format!("late-{extra}"), "kc-late").await;
            extra += 1;
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(seen.len() < 1000, "pagination does not end");
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "a session appeared twice: {seen:?}"
    );
    for i in 0..30 {
        assert!(seen.contains(&format!("p{i}")), "p{i} was skipped");
    }
    let pos = |id: &str| seen.iter().position(|s| s == id).unwrap();
    assert!(pos("p3") < pos("p4") && pos("p28") < pos("p29"));
}

async fn destroy_user_ends_every_session_of_the_user(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    for (id, user) in [("a1", "alice"), ("a2", "alice"), ("b1", "bob")] {
        let body =
            json!({"externalId": id, "keycloakSessionId": format!("kc-{id}"), "userId": user});
        assert_eq!(api.post("map-parent", body).await.0, StatusCode::CREATED);
    }
    // Alice's child inherits her user id; a FIXED session of hers counts too.
    api.map_child("a1-child", "a1").await;
    api.post(
        "map-fixed",
        json!({"externalId": "a-fixed", "userId": "alice"}),
    )
    .await;
    // Same user id in another realm is someone else.
    server
        .api("other")
        .post(
            "map-parent",
            json!({"externalId": "x", "keycloakSessionId": "kc-x", "userId": "alice"}),
        )
        .await;

    let (code, res) = api
        .post(
            "destroy-user",
            json!({"userId": "alice", "reason": "admin"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{res}");
    let changed: BTreeSet<&str> = res["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["externalId"].as_str().unwrap())
        .collect();
    assert_eq!(changed, BTreeSet::from(["a1", "a1-child", "a2", "a-fixed"]));
    assert_eq!(api.status_of("b1").await, "ACTIVE");
    assert_eq!(server.api("other").status_of("x").await, "ACTIVE");
    assert_eq!(api.get("a1").await.1["endReason"], "admin");
    // Idempotent, and an unknown user is simply nothing to do.
    let again = api.post("destroy-user", json!({"userId": "alice"})).await;
    assert_eq!(again.1, json!({"changed": []}));
    let nobody = api.post("destroy-user", json!({"userId": "nobody"})).await;
    assert_eq!(
        (nobody.0, nobody.1),
        (StatusCode::OK, json!({"changed": []}))
    );
}

async fn destroy_child_leaves_parent_and_siblings_active(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    api.map_parent("p", "kc").await;
    api.map_child("c1", "p").await;
    api.map_child("c2", "p").await;
    api.map_child("c1-1", "c1").await;
    let (code, res) = api.post("destroy-child", json!({"externalId": "c1"})).await;
    assert_eq!(code, StatusCode::OK, "{res}");
    let changed: Vec<(&str, &str)> = res["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["externalId"].as_str().unwrap(),
                s["endReason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(changed, [("c1", "logout"), ("c1-1", "cascade")]);
    assert_eq!(api.status_of("p").await, "ACTIVE");
    assert_eq!(api.status_of("c2").await, "ACTIVE");
    let again = api.post("destroy-child", json!({"externalId": "c1"})).await;
    assert_eq!(again.1, json!({"changed": []}));
}

async fn wrong_kinds_and_missing_sessions_are_refused(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    api.map_parent("p", "kc").await;
    api.map_child("c", "p").await;
    api.post("map-fixed", json!({"externalId": "f"})).await;
    assert_problem(&api.destroy_parent("c").await, 409, "WRONG_KIND");
    assert_problem(
        &api.post("destroy-child", json!({"externalId": "p"})).await,
        409,
        "WRONG_KIND",
    );
    assert_problem(&api.destroy_parent("ghost").await, 404, "NOT_FOUND");
    assert_problem(&api.map_child("c2", "ghost").await, 404, "PARENT_NOT_FOUND");
    // FIXED sessions are roots: destroy-parent ends them, and they may have children.
    assert_eq!(api.map_child("f-child", "f").await.0, StatusCode::CREATED);
    let res = api.destroy_parent("f").await;
    assert_eq!(res.1["changed"].as_array().unwrap().len(), 2);
    assert_problem(&api.map_child("c3", "f").await, 409, "PARENT_NOT_ACTIVE");
    assert_eq!(api.status_of("p").await, "ACTIVE");
    assert_eq!(api.status_of("c").await, "ACTIVE");
}

async fn four_level_tree_of_1000_is_destroyed_in_one_transaction(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    api.map_parent("root", "kc-big").await;
    // Levels: 1 root, 9 children, 90 grandchildren, 900 great-grandchildren = 1000.
    let mut level: Vec<String> = vec!["root".into()];
    for (depth, fanout) in [(1, 9), (2, 10), (3, 10)] {
        let mut next = Vec::new();
        for parent in &level {
            for i in 0..fanout {
                next.push((parent.clone(), format!("{parent}/{depth}-{i}")));
            }
        }
        let results = futures::future::join_all(next.chunks(50).map(|chunk| {
            let api = api.clone();
            let chunk = chunk.to_vec();
            async move {
                for (parent, id) in chunk {
                    let (code, body) = api.map_child(&id, &parent).await;
                    assert_eq!(code, StatusCode::CREATED, "{body}");
                }
            }
        }))
        .await;
        assert_eq!(results.len(), next.len().div_ceil(50));
        level = next.into_iter().map(|(_, id)| id).collect();
    }
    let (_, tree) = api.get("session-tree/root").await;
    assert_eq!(tree["size"], 1000);
    assert_eq!(
        tree["sessions"].as_array().unwrap().last().unwrap()["depth"],
        3
    );

    let (code, res) = api.destroy_parent("root").await;
    assert_eq!(code, StatusCode::OK);
    let changed = res["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1000);
    // One transaction: every row carries the same change time, and all are DESTROYED.
    let stamps: BTreeSet<&str> = changed
        .iter()
        .map(|s| s["updatedAt"].as_str().unwrap())
        .collect();
    assert_eq!(
        stamps.len(),
        1,
        "changes came from more than one transaction"
    );
    assert!(changed.iter().all(|s| s["status"] == "DESTROYED"));
    let active = api
        .list_all("&status=ACTIVE&keycloakSessionId=kc-big")
        .await;
    assert!(active.is_empty());
}

async fn orphan_children_policy_orphans_on_idp_logout(backend: Backend) {
    let server = Server::start_with(
        backend,
        ServerOptions::with_config("[realms.acme]\norphan_children = true\n".into()),
    )
    .await;
    let api = server.api("acme");
    api.map_parent("p", "kc").await;
    api.map_child("c", "p").await;
    api.map_child("c-c", "c").await;
    let (_, res) = api
        .post(
            "destroy-parent",
            json!({"externalId": "p", "reason": "idp_logout"}),
        )
        .await;
    let got: HashMap<&str, (&str, &Value)> = res["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["externalId"].as_str().unwrap(),
                (s["status"].as_str().unwrap(), &s["endReason"]),
            )
        })
        .collect();
    assert_eq!(got["p"], ("DESTROYED", &json!("idp_logout")));
    assert_eq!(got["c"], ("ORPHANED", &Value::Null));
    assert_eq!(got["c-c"], ("ORPHANED", &Value::Null));
    // The owning system cleans up: destroying an orphan ends it and its descendants.
    let (_, res) = api.post("destroy-child", json!({"externalId": "c"})).await;
    assert_eq!(res["changed"].as_array().unwrap().len(), 2);
    assert_eq!(api.status_of("c-c").await, "DESTROYED");
    // Other reasons still cascade in this realm; other realms are not affected.
    api.map_parent("q", "kc2").await;
    api.map_child("qc", "q").await;
    api.destroy_parent("q").await;
    assert_eq!(api.status_of("qc").await, "DESTROYED");
    let other = server.api("other");
    other.map_parent("p", "kc").await;
    other.map_child("c", "p").await;
    other
        .post(
            "destroy-parent",
            json!({"externalId": "p", "reason": "idp_logout"}),
        )
        .await;
    assert_eq!(other.status_of("c").await, "DESTROYED");
}

async fn map_child_racing_destroy_parent_never_leaves_an_active_orphan(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    for round in 0..5 {
        let root = format!("race-{round}");
        api.map_parent(&root, "kc-race").await;
        for i in 0..5 {
            api.map_child(&format!("{root}-c{i}"), &root).await;
        }
        let mut tasks = Vec::new();
        for i in 0..40 {
            let api = api.clone();
            // Half the new children hang under the root, half under an existing child.
            let parent = if i % 2 == 0 {
                root.clone()
            } else {
                format!("{root}-c{}", i % 5)
            };
            let id = format!("{root}-n{i}");
            tasks.push(tokio::spawn(
                async move { api.map_child(&id, &parent).await },
            ));
        }
        let destroy = {
            let api = api.clone();
            let root = root.clone();
            tokio::spawn(async move { api.destroy_parent(&root).await })
        };
        for t in tasks {
            let (code, body) = t.await.unwrap();
            assert!(
                code == StatusCode::CREATED
                    || (code == StatusCode::CONFLICT && body["code"] == "PARENT_NOT_ACTIVE"),
                "unexpected {code}: {body}"
            );
        }
        assert_eq!(destroy.await.unwrap().0, StatusCode::OK);
        let (_, tree) = api.get(&format!("session-tree/{root}")).await;
        for s in tree["sessions"].as_array().unwrap() {
            assert_eq!(s["status"], "DESTROYED", "left behind: {s}");
        }
    }
}

async fn bad_input_gets_a_problem_document_and_changes_nothing(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    api.map_parent("existing", "kc").await;
    let long = "x".repeat(256);
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let heavy = json!({"k": "v".repeat(8 * 1024)});
    let cases: Vec<(&str, Value, u16)> = vec![
        (
            "map-parent",
            json!({"externalId": "a", "keycloakSessionId": "kc", "bogus": 1}),
            400,
        ),
        (
            "map-parent",
            json!({"externalId": 5, "keycloakSessionId": "kc"}),
            400,
        ),
        ("map-parent", json!({"externalId": "a"}), 400),
        (
            "map-parent",
            json!({"externalId": "", "keycloakSessionId": "kc"}),
            400,
        ),
        (
            "map-parent",
            json!({"externalId": long, "keycloakSessionId": "kc"}),
            400,
        ),
        (
            "map-parent",
            json!({"externalId": "a", "keycloakSessionId": long}),
            400,
        ),
        (
            "map-parent",
            json!({"externalId": "a", "keycloakSessionId": "kc", "attributes": many}),
            400,
        ),
        (
            "map-parent",
            json!({"externalId": "a", "keycloakSessionId": "kc", "attributes": heavy}),
            400,
        ),
        (
            "map-parent",
            json!({"externalId": "a", "keycloakSessionId": "kc", "attributes": {"k": 1}}),
            400,
        ),
        (
            "map-parent",
            json!({"externalId": "a", "keycloakSessionId": "kc", "expiresAt": "tomorrow"}),
            400,
        ),
        (
            "map-parent",
            json!({"externalId": "a\u{0000}", "keycloakSessionId": "kc"}),
            400,
        ),
        ("map-parent", json!([1, 2]), 400),
        (
            "map-child",
            json!({"externalId": "a", "parentExternalId": ""}),
            400,
        ),
        (
            "map-child",
            json!({"externalId": "a", "parentExternalId": "a"}),
            400,
        ),
        (
            "map-fixed",
            json!({"externalId": "a", "kind": "PARENT"}),
            400,
        ),
        (
            "destroy-parent",
            json!({"externalId": "existing", "reason": "cascade"}),
            400,
        ),
        (
            "destroy-parent",
            json!({"externalId": "existing", "reason": "whenever"}),
            400,
        ),
        (
            "destroy-parent",
            json!({"externalId": "existing", "extra": true}),
            400,
        ),
        ("destroy-user", json!({"userId": ""}), 400),
    ];
    for (path, body, status) in cases {
        let got = api.post(path, body.clone()).await;
        assert_problem(&got, status, "VALIDATION");
        assert!(
            !got.1["detail"].as_str().unwrap().is_empty(),
            "{path} {body}: no detail"
        );
    }
    // Malformed JSON, wrong media type, oversized bodies.
    assert_problem(
        &api.post_raw(
            "map-parent",
            Some("application/json"),
            b"{\"externalId\":".to_vec(),
        )
        .await,
        400,
        "VALIDATION",
    );
    assert_problem(
        &api.post_raw("map-parent", Some("application/json"), Vec::new())
            .await,
        400,
        "VALIDATION",
    );
    let text = api
        .post_raw(
            "map-parent",
            Some("text/plain"),
            br#"{"externalId":"a","keycloakSessionId":"kc"}"#.to_vec(),
        )
        .await;
    assert_eq!(text.0.as_u16(), 415, "{}", text.1);
    let huge = format!(
        r#"{{"externalId":"a","keycloakSessionId":"kc","attributes":{{"k":"{}"}}}}"#,
        "v".repeat(70 * 1024)
    );
    assert_problem(
        &api.post_raw("map-parent", Some("application/json"), huge.into_bytes())
            .await,
        413,
        "PAYLOAD_TOO_LARGE",
    );
    // Bad realm names, path ids and query parameters.
    assert_problem(
        &server.api("bad realm!").get("existing").await,
        400,
        "VALIDATION",
    );
    assert_problem(
        &server.api(&"r".repeat(65)).map_parent("a", "kc").await,
        400,
        "VALIDATION",
    );
    assert_problem(&api.get(&"y".repeat(256)).await, 400, "VALIDATION");
    assert_problem(&api.get("?limit=0").await, 400, "VALIDATION");
    assert_problem(&api.get("?limit=501").await, 400, "VALIDATION");
    assert_problem(&api.get("?limit=ten").await, 400, "VALIDATION");
    assert_problem(&api.get("?status=GONE").await, 400, "VALIDATION");
    assert_problem(&api.get("?cursor=not-a-cursor").await, 400, "VALIDATION");
    assert_problem(&api.get("?colour=red").await, 400, "VALIDATION");

    // Nothing was written: only the session created before the bad requests exists, with
    // its single login event, and it is still ACTIVE.
    let all = api.list_all("").await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["externalId"], "existing");
    assert_eq!(all[0]["status"], "ACTIVE");
    assert_eq!(server.outbox_total().await, 1);
}

async fn authentication_and_authorisation_are_enforced(backend: Backend) {
    let read_hash = hex_sha256("connectors-key");
    let server = Server::start_with(
        backend,
        ServerOptions {
            config: Some(format!(
                "[[api_keys]]\nid = \"ops\"\nsha256 = \"{read_hash}\"\nrealms = [\"*\"]\npermissions = [\"connectors:manage\"]\n"
            )),
            ..Default::default()
        },
    )
    .await;
    let api = server.api("acme");
    assert_problem(
        &api.clone().without_token().get("x").await,
        401,
        "UNAUTHORIZED",
    );
    assert_problem(
        &api.clone().without_token().map_parent("x", "kc").await,
        401,
        "UNAUTHORIZED",
    );
    assert_problem(
        &server.api_as("acme", "wrong").get("x").await,
        401,
        "UNAUTHORIZED",
    );
    // A valid key without users:manage is forbidden, and nothing is written.
    let ops = server.api_as("acme", "connectors-key");
    assert_problem(&ops.map_parent("x", "kc").await, 403, "FORBIDDEN");
    assert_problem(&api.get("x").await, 404, "NOT_FOUND");
    // Public endpoints need no token.
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let res = client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
    // The served OpenAPI document is the checked-in one.
    let served: Value = client
        .get(format!("{}/openapi.json", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(served, on_disk);
    let _ = TOKEN;
}

async fn outbox_records_one_event_per_change_in_the_same_transaction(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    let body = json!({
        "externalId": "p", "keycloakSessionId": "kc-9", "keycloakClientSessionId": "cs-9",
        "userId": "u-9", "system": "portal", "attributes": {"ip": "10.0.0.1"},
        "originSystem": "portal",
    });
    assert_eq!(api.post("map-parent", body).await.0, StatusCode::CREATED);
    api.map_child("c", "p").await;
    api.post(
        "destroy-parent",
        json!({"externalId": "p", "originSystem": "billing"}),
    )
    .await;
    let events = server.outbox("acme", "p").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["type"], "login");
    assert_eq!(events[0]["originSystem"], "portal");
    assert_eq!(events[0]["kind"], "PARENT");
    assert_eq!(events[0]["idpSessionId"], "kc-9");
    assert_eq!(events[0]["idpClientSessionId"], "cs-9");
    assert_eq!(events[0]["userId"], "u-9");
    assert_eq!(events[0]["attributes"], json!({"ip": "10.0.0.1"}));
    assert_eq!(events[1]["type"], "logout");
    assert_eq!(events[1]["endReason"], "logout");
    assert_eq!(events[1]["originSystem"], "billing");
    assert_ne!(events[0]["eventId"], events[1]["eventId"]);
    let child = server.outbox("acme", "c").await;
    assert_eq!(child.len(), 2);
    assert_eq!(
        child[0]["originSystem"], "admin",
        "origin defaults to the caller"
    );
    assert_eq!(child[1]["endReason"], "cascade");
    // Refused and idempotent calls write no events.
    api.map_parent("p", "kc-9").await;
    api.destroy_parent("p").await;
    assert_eq!(server.outbox_total().await, 4);
}

async fn a_key_names_only_its_own_system_as_origin(backend: Backend) {
    let (portal, ops) = (hex_sha256("portal-key"), hex_sha256("ops-key"));
    let server = Server::start_with(
        backend,
        ServerOptions {
            config: Some(format!(
                "[[api_keys]]\nid = \"portal-app\"\nsystem = \"portal\"\nsha256 = \"{portal}\"\n\
                 realms = [\"acme\"]\npermissions = [\"users:manage\"]\n\
                 [[api_keys]]\nid = \"ops\"\nsha256 = \"{ops}\"\n\
                 realms = [\"acme\"]\npermissions = [\"users:manage\"]\n"
            )),
            ..Default::default()
        },
    )
    .await;
    let as_portal = server.api_as("acme", "portal-key");
    let as_ops = server.api_as("acme", "ops-key");

    // Naming another system's connector as origin would keep the logout from it: refused,
    // and nothing is written.
    let body = json!({"externalId": "p", "keycloakSessionId": "kc", "originSystem": "billing"});
    assert_problem(&as_portal.post("map-parent", body).await, 403, "FORBIDDEN");
    assert_problem(&as_portal.get("p").await, 404, "NOT_FOUND");
    assert_eq!(server.outbox_total().await, 0);

    // The key's own system is the default and may be named.
    assert_eq!(as_portal.map_parent("p", "kc").await.0, StatusCode::CREATED);
    assert_eq!(as_portal.get("p").await.1["system"], "portal");
    let body = json!({"externalId": "c", "parentExternalId": "p", "originSystem": "portal"});
    assert_eq!(
        as_portal.post("map-child", body).await.0,
        StatusCode::CREATED
    );
    for (id, origin) in [("p", "portal"), ("c", "portal")] {
        assert_eq!(server.outbox("acme", id).await[0]["originSystem"], origin);
    }

    // Destroys too: refused before anything changes.
    for (api, other) in [(&as_portal, "billing"), (&as_ops, "portal")] {
        let refused = api
            .post(
                "destroy-parent",
                json!({"externalId": "p", "originSystem": other}),
            )
            .await;
        assert_problem(&refused, 403, "FORBIDDEN");
        assert!(
            refused.1["detail"]
                .as_str()
                .unwrap()
                .contains("originSystem"),
            "{}",
            refused.1
        );
    }
    assert_eq!(as_ops.status_of("p").await, "ACTIVE");
    // A key without `system` speaks for its id.
    let (code, _) = as_ops
        .post(
            "destroy-parent",
            json!({"externalId": "p", "originSystem": "ops"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(server.outbox("acme", "p").await[1]["originSystem"], "ops");
    // The bootstrap token (the operator) may speak for any system.
    let admin = server.api("acme");
    admin.map_parent("q", "kc-q").await;
    let (code, _) = admin
        .post(
            "destroy-parent",
            json!({"externalId": "q", "originSystem": "billing"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
}

async fn a_tree_larger_than_max_tree_is_refused_not_read(backend: Backend) {
    let server = Server::start_with(
        backend,
        ServerOptions::with_config("[limits]\nmax_tree = 3\n".into()),
    )
    .await;
    let api = server.api("acme");
    api.map_parent("root", "kc-t").await;
    api.map_child("a", "root").await;
    api.map_child("a1", "a").await;
    let (code, tree) = api.get("session-tree/a1").await;
    assert_eq!(code, StatusCode::OK, "{tree}");
    assert_eq!(tree["size"], 3, "a tree at the limit is read whole");

    api.map_child("b", "root").await;
    for from in ["root", "a1", "b"] {
        let refused = api.get(&format!("session-tree/{from}")).await;
        assert_problem(&refused, 422, "TREE_TOO_LARGE");
        let detail = refused.1["detail"].as_str().unwrap();
        assert!(
            detail.contains("max_tree") && detail.contains('3'),
            "{detail}"
        );
    }
    // The sessions stay readable one by one and page by page.
    assert_eq!(api.list_all("&keycloakSessionId=kc-t").await.len(), 4);
}

async fn failed_authentications_are_throttled_per_address(backend: Backend) {
    let server = Server::start_with(
        backend,
        ServerOptions::with_config(
            "[limits]\nfailed_auth_burst = 3\nfailed_auth_per_minute = 1\n".into(),
        ),
    )
    .await;
    let guess = server.api_as("acme", "guess");
    for _ in 0..3 {
        assert_problem(&guess.get("x").await, 401, "UNAUTHORIZED");
    }
    // The address has used its failures: refused before any credential is looked at, the
    // right one included, with when to come back.
    assert_problem(&guess.get("x").await, 429, "RATE_LIMITED");
    let res = reqwest::Client::new()
        .get(format!("{}/x", server.sessions_url("acme")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = res.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("failed_auth"),
        "{body}"
    );
    // Routes without credentials are not throttled.
    let health = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

/// With no credential configured and no terminal, the one-off admin token goes to a file only
/// its owner reads, never to the output a service manager logs.
#[tokio::test]
async fn the_bootstrap_token_is_written_to_a_private_file_not_the_output() {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("lockstep-admin-token");
    // A planted symlink is replaced, not written through.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, &token_file).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--database-url"])
        .arg(format!("sqlite://{}", dir.path().join("l.db").display()))
        .arg("--compile-cache")
        .arg(dir.path().join("cache"))
        .env_remove("LOCKSTEP_ADMIN_TOKEN")
        .env_remove("LOCKSTEP_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let addr = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).await.unwrap() > 0,
                "exited: {seen}"
            );
            seen.push_str(&line);
            if let Some(addr) = line.trim().strip_prefix("listening on ") {
                return addr.to_owned();
            }
        }
    })
    .await
    .unwrap();
    let meta = std::fs::symlink_metadata(&token_file).unwrap();
    assert!(meta.is_file(), "the symlink was replaced by a file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.starts_with("lst_"), "{token}");
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/admin/realms/acme/external-sessions"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    child.start_kill().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    stdout.read_to_string(&mut seen).await.unwrap();
    child.wait().await.unwrap();
    assert!(
        !seen.contains(&token) && !stderr.contains(&token),
        "{seen}\n{stderr}"
    );
    assert!(stderr.contains("lockstep-admin-token"), "{stderr}");
}

async fn committed_changes_survive_sigkill(backend: Backend) {
    let server = Server::start(backend).await;
    let api = server.api("acme");
    for i in 0..50 {
        assert_eq!(
            api.map_parent(&format!("k{i}"), "kc-kill").await.0,
            StatusCode::CREATED
        );
    }
    api.destroy_parent("k0").await;
    let backend = server.backend;
    let (url, dir) = server.kill().await;
    let server = Server::start_on(backend, url, dir, ServerOptions::default()).await;
    let api = server.api("acme");
    assert_eq!(api.list_all("&keycloakSessionId=kc-kill").await.len(), 50);
    assert_eq!(api.status_of("k0").await, "DESTROYED");
    assert_eq!(server.outbox_total().await, 51);
}

fn hex_sha256(s: &str) -> String {
    hex::encode(lockstep::auth::sha256(s))
}
