//! Issue 8, black box: three `lockstep serve` instances on one PostgreSQL database with no
//! proxy in front — the test spreads its calls over the instances the way clients behind a
//! plain round-robin balancer would. Races on the same session from different instances
//! (identical maps, overlapping destroys, map-child against destroy-parent) and the shared
//! outbox (claimed with `FOR UPDATE SKIP LOCKED`, while events are written and as a held
//! backlog released to three dispatchers at once: each delivery made once, with one attempt,
//! by whichever instance claimed it). The three start together, so their migrations race as
//! well. PostgreSQL only: a SQLite database has one instance.
//!
//! A connector change on one instance reaching the others (upload, replace, disable, enable,
//! delete) is `hot_loading.rs`'s `a_change_on_one_instance_reaches_every_instance`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::components::unsigned_webhook_manifest;
use common::receiver::Receiver;
use common::{Api, Backend, Server, ServerOptions, fresh_database, skip_postgres};
use futures::FutureExt;
use futures::future::BoxFuture;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// Three instances on one fresh PostgreSQL database, started at the same moment (so their
/// migrations race too, as in a rolling start), or `None` when PostgreSQL tests are skipped.
async fn three_instances(opts: ServerOptions) -> Option<Vec<Server>> {
    if skip_postgres() {
        eprintln!("LOCKSTEP_SKIP_POSTGRES=1: skipping");
        return None;
    }
    let (url, _) = fresh_database(Backend::Postgres).await;
    let start = || Server::start_on(Backend::Postgres, url.clone(), None, opts.clone());
    let (a, b, c) = tokio::join!(start(), start(), start());
    Some(vec![a, b, c])
}

/// One realm's API on every instance; call `i` goes to `apis[i % 3]`.
fn apis(servers: &[Server], realm: &str) -> Vec<Api> {
    servers.iter().map(|s| s.api(realm)).collect()
}

/// Runs every task at once and returns their results in the order given.
async fn all<T: Send + 'static>(tasks: impl IntoIterator<Item = BoxFuture<'static, T>>) -> Vec<T> {
    let mut set = JoinSet::new();
    for (i, t) in tasks.into_iter().enumerate() {
        set.spawn(async move { (i, t.await) });
    }
    let mut out: Vec<(usize, T)> = set.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_maps_and_destroys_spread_over_three_instances_succeed_exactly_once() {
    let Some(servers) = three_instances(ServerOptions::default()).await else {
        return;
    };
    let apis = apis(&servers, "acme");

    // 60 identical map-parent calls, 20 per instance, in 5 rounds with fresh ids.
    for round in 0..5 {
        let id = format!("same-{round}");
        let results = all((0..60).map(|i| {
            let api = apis[i % 3].clone();
            let id = id.clone();
            async move { api.map_parent(&id, &format!("kc-{i}")).await }.boxed()
        }))
        .await;
        let mut created = Vec::new();
        for (i, (code, body)) in results.iter().enumerate() {
            match code.as_u16() {
                201 => created.push(i),
                409 => assert_eq!(body["code"], "ALREADY_EXISTS", "{body}"),
                other => panic!("{id}: unexpected {other} from instance {}: {body}", i % 3),
            }
        }
        assert_eq!(created.len(), 1, "{id}: exactly one 201, got {created:?}");
        // The winner's row, seen alike from every instance; one login event, not 60.
        let winner = format!("kc-{}", created[0]);
        for api in &apis {
            let (code, s) = api.get(&id).await;
            assert_eq!(code, StatusCode::OK, "{s}");
            assert_eq!(s["keycloakSessionId"], winner.as_str(), "{s}");
        }
        assert_eq!(servers[0].outbox("acme", &id).await.len(), 1);
    }

    // The same id through map-parent, map-fixed and map-child at once: still one winner.
    assert_eq!(
        apis[0].map_parent("base", "kc").await.0,
        StatusCode::CREATED
    );
    let results = all((0..30).map(|i| {
        let api = apis[i % 3].clone();
        async move {
            match i % 3 {
                0 => api.map_parent("mixed", "kc").await,
                1 => api.post("map-fixed", json!({"externalId": "mixed"})).await,
                _ => api.map_child("mixed", "base").await,
            }
        }
        .boxed()
    }))
    .await;
    let codes: Vec<u16> = results.iter().map(|(c, _)| c.as_u16()).collect();
    assert_eq!(codes.iter().filter(|c| **c == 201).count(), 1, "{codes:?}");
    for (code, body) in &results {
        assert!(
            code.as_u16() == 201 || (code.as_u16() == 409 && body["code"] == "ALREADY_EXISTS"),
            "{code}: {body}"
        );
    }

    // Destroy racing destroy: 30 identical destroy-parent calls over a tree of four. All are
    // 200 (destroy is idempotent); one lists the four sessions, the others `changed: []`.
    let root = "tree";
    apis[0].map_parent(root, "kc-tree").await;
    apis[1].map_child("tree-a", root).await;
    apis[2].map_child("tree-b", root).await;
    apis[0].map_child("tree-a-1", "tree-a").await;
    let results = all((0..30).map(|i| {
        let api = apis[i % 3].clone();
        async move { api.destroy_parent(root).await }.boxed()
    }))
    .await;
    let mut sizes = Vec::new();
    for (i, (code, body)) in results.iter().enumerate() {
        assert_eq!(*code, StatusCode::OK, "instance {}: {body}", i % 3);
        sizes.push(body["changed"].as_array().unwrap().len());
    }
    sizes.sort_unstable();
    assert_eq!(sizes.iter().filter(|n| **n > 0).count(), 1, "{sizes:?}");
    assert_eq!(sizes.last(), Some(&4), "{sizes:?}");
    for id in [root, "tree-a", "tree-b", "tree-a-1"] {
        assert_eq!(apis[2].status_of(id).await, "DESTROYED");
        // A login and exactly one logout per session.
        let events = servers[1].outbox("acme", id).await;
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["login", "logout"], "{id}");
    }

    // Overlapping destroys from different instances — the root, a child inside its tree and
    // the user owning all of it — end every session exactly once: the `changed` lists of all
    // the answers together name each session once, and each has one logout event.
    for round in 0..10 {
        let root = format!("overlap-{round}");
        let user = format!("user-{round}");
        let (code, body) = apis[0]
            .post(
                "map-parent",
                json!({"externalId": root, "keycloakSessionId": "kc", "userId": user}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
        let mut ids = vec![root.clone()];
        for c in 0..3 {
            let child = format!("{root}-c{c}");
            assert_eq!(
                apis[1].map_child(&child, &root).await.0,
                StatusCode::CREATED
            );
            let grandchild = format!("{child}-g");
            assert_eq!(
                apis[2].map_child(&grandchild, &child).await.0,
                StatusCode::CREATED
            );
            ids.extend([child, grandchild]);
        }
        let calls = [
            ("destroy-parent", json!({"externalId": root})),
            ("destroy-child", json!({"externalId": format!("{root}-c1")})),
            ("destroy-user", json!({"userId": user})),
            (
                "destroy-child",
                json!({"externalId": format!("{root}-c2-g")}),
            ),
            ("destroy-parent", json!({"externalId": root})),
            ("destroy-user", json!({"userId": user})),
        ];
        let results = all(calls.into_iter().enumerate().map(|(i, (path, body))| {
            let api = apis[i % 3].clone();
            async move { api.post(path, body).await }.boxed()
        }))
        .await;
        let mut ended: HashMap<String, usize> = HashMap::new();
        for (code, body) in &results {
            assert_eq!(*code, StatusCode::OK, "{body}");
            for s in body["changed"].as_array().unwrap() {
                assert_eq!(s["status"], "DESTROYED", "{s}");
                *ended
                    .entry(s["externalId"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
        for id in &ids {
            assert_eq!(ended.get(id), Some(&1), "{id} in round {round}: {ended:?}");
            let events = servers[round % 3].outbox("acme", id).await;
            let logouts = events.iter().filter(|e| e["type"] == "logout").count();
            assert_eq!(logouts, 1, "{id}: {events:#?}");
        }
        assert_eq!(ended.len(), ids.len(), "{ended:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_child_racing_destroy_parent_on_other_instances_never_leaves_an_active_child() {
    let Some(servers) = three_instances(ServerOptions::default()).await else {
        return;
    };
    let apis = apis(&servers, "acme");
    const ROUNDS: usize = 50;
    const CHILDREN: usize = 6;
    let (mut created, mut refused) = (0, 0);
    let started = Instant::now();
    for round in 0..ROUNDS {
        let root = format!("race-{round}");
        assert_eq!(
            apis[round % 3].map_parent(&root, "kc-race").await.0,
            StatusCode::CREATED
        );
        // An existing child, so that half the new ones hang one level down (the cascade must
        // also find children committed under a descendant while it ran).
        let mid = format!("{root}-mid");
        assert_eq!(
            apis[(round + 1) % 3].map_child(&mid, &root).await.0,
            StatusCode::CREATED
        );
        // The destroy goes out among the children, on yet another instance. Its place moves
        // from first to last over the rounds, and the children after it leave 0 to 3 ms later,
        // so that they land all along the destroy's own run: early ones win, late ones lose.
        // Both outcomes must be seen, or this test proved nothing about the race.
        let destroy_at = round % (CHILDREN + 1);
        let mut calls: Vec<BoxFuture<'static, (String, StatusCode, Value)>> = Vec::new();
        for i in 0..CHILDREN {
            let delay = if i >= destroy_at {
                Duration::from_millis((round % 4) as u64)
            } else {
                Duration::ZERO
            };
            let api = apis[(round + i) % 3].clone();
            let parent = if i % 2 == 0 {
                root.clone()
            } else {
                mid.clone()
            };
            let id = format!("{root}-n{i}");
            calls.push(Box::pin(async move {
                tokio::time::sleep(delay).await;
                let (code, body) = api.map_child(&id, &parent).await;
                (id, code, body)
            }));
        }
        let api = apis[(round + 2) % 3].clone();
        let destroyed = root.clone();
        calls.insert(
            destroy_at,
            Box::pin(async move {
                let (code, body) = api.destroy_parent(&destroyed).await;
                (String::new(), code, body)
            }),
        );
        let results = all(calls).await;
        for (id, code, body) in results {
            if id.is_empty() {
                assert_eq!(code, StatusCode::OK, "destroy-parent: {body}");
                continue;
            }
            // Through the API, from an instance that did not answer the map.
            let (get, session) = apis[round % 3].get(&id).await;
            match code.as_u16() {
                201 => {
                    created += 1;
                    assert_eq!(get, StatusCode::OK, "{session}");
                    assert_eq!(session["status"], "DESTROYED", "left ACTIVE: {session}");
                    assert_eq!(session["endReason"], "cascade", "{session}");
                }
                409 => {
                    refused += 1;
                    assert_eq!(body["code"], "PARENT_NOT_ACTIVE", "{body}");
                    assert_eq!(get, StatusCode::NOT_FOUND, "refused but stored: {session}");
                    assert!(servers[0].outbox("acme", &id).await.is_empty());
                }
                other => panic!("{id}: unexpected {other}: {body}"),
            }
        }
        let (code, tree) = apis[(round + 1) % 3]
            .get(&format!("session-tree/{root}"))
            .await;
        assert_eq!(code, StatusCode::OK, "{tree}");
        for s in tree["sessions"].as_array().unwrap() {
            assert_eq!(s["status"], "DESTROYED", "left behind: {s}");
        }
    }
    eprintln!(
        "{ROUNDS} rounds in {:?}: {created} children created then destroyed by the cascade, \
         {refused} refused with PARENT_NOT_ACTIVE",
        started.elapsed()
    );
    assert_eq!(created + refused, ROUNDS * CHILDREN);
    assert!(
        created > 0 && refused > 0,
        "the race happened: some children won it, some lost it"
    );
    // Nothing ACTIVE anywhere in the realm.
    let active = apis[2].list_all("&status=ACTIVE").await;
    assert!(active.is_empty(), "{active:#?}");
}

/// A connector's state as each instance reports it.
async fn connector_on_each(servers: &[Server], name: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for s in servers {
        let (code, c) = s.admin_get(&format!("/admin/connectors/{name}")).await;
        assert_eq!(code, StatusCode::OK, "{c}");
        out.push(c);
    }
    out
}

/// Maps `count` sessions `{prefix}{i}` through all instances, 16 calls at a time, and
/// destroys every other one on the next instance; returns the number of events written.
async fn load(apis: &[Api], prefix: &str, count: usize) -> usize {
    let mut set = JoinSet::new();
    for i in 0..count {
        while set.len() >= 16 {
            set.join_next().await.unwrap().unwrap();
        }
        let (api, other) = (apis[i % 3].clone(), apis[(i + 1) % 3].clone());
        let id = format!("{prefix}{i}");
        set.spawn(async move {
            let (code, body) = api.map_parent(&id, &format!("kc-{id}")).await;
            assert_eq!(code, StatusCode::CREATED, "{body}");
            if i % 2 == 0 {
                let (code, body) = other.destroy_parent(&id).await;
                assert_eq!(code, StatusCode::OK, "{body}");
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    count + count.div_ceil(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_outbox_is_delivered_once_per_event_by_several_instances() {
    let receiver = Receiver::start().await;
    // Each instance loads the same directory content (here: the same directory).
    let dir = tempfile::tempdir().unwrap();
    unsigned_webhook_manifest(
        dir.path(),
        "hook",
        &["acme"],
        &receiver,
        "timeout_ms = 2000\n[policy]\non_failure = \"retry\"\nmax_attempts = 5\n",
    );
    let Some(servers) = three_instances(ServerOptions {
        connectors_dir: Some(dir.path().to_owned()),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let versions: HashSet<String> = connector_on_each(&servers, "hook")
        .await
        .iter()
        .map(|c| {
            assert_eq!(c["state"], "active", "{c}");
            c["version"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(versions.len(), 1, "one version everywhere: {versions:?}");
    let version = versions.into_iter().next().unwrap();
    let apis = apis(&servers, "acme");
    let served = |cs: &[Value]| -> Vec<usize> {
        cs.iter()
            .map(|c| c["deliveries"]["deliveredSinceStart"].as_u64().unwrap() as usize)
            .collect()
    };

    // Live: 240 sessions mapped through all three instances, every other one destroyed on
    // another instance — 360 events, claimed while they are being written.
    let started = Instant::now();
    let live = load(&apis, "live-", 240).await;
    servers[0]
        .wait_delivery_pages("connector=hook", 500, Duration::from_secs(60), |d| {
            d.len() == live && d.iter().all(|x| x["status"] == "delivered")
        })
        .await;
    let live_took = started.elapsed();
    let after_live = served(&connector_on_each(&servers, "hook").await);

    // Backlog: disabled (on one instance, followed by the others), the next 180 events are
    // routed and held; enabled on another instance, all three dispatchers claim the same
    // backlog at once.
    let (code, body) = servers[0]
        .admin_post("/admin/connectors/hook/disable", json!({}))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while connector_on_each(&servers, "hook")
        .await
        .iter()
        .any(|c| c["state"] != "disabled")
    {
        assert!(
            Instant::now() < deadline,
            "disable did not reach every instance"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = load(&apis, "held-", 120).await;
    servers[1]
        .wait_delivery_pages("connector=hook", 500, Duration::from_secs(30), |d| {
            d.len() == live + held && d.iter().filter(|x| x["status"] == "pending").count() == held
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        receiver.requests().len(),
        live,
        "nothing sent while disabled"
    );
    let started = Instant::now();
    let (code, body) = servers[1]
        .admin_post("/admin/connectors/hook/enable", json!({}))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let events = live + held;
    let deliveries = servers[2]
        .wait_delivery_pages("connector=hook", 500, Duration::from_secs(60), |d| {
            d.len() == events && d.iter().all(|x| x["status"] == "delivered")
        })
        .await;
    let backlog_took = started.elapsed();
    // A second claim of the same delivery would arrive at once; give it a moment anyway.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Each event arrived exactly once, with one attempt recorded.
    let mut arrivals: BTreeMap<String, usize> = BTreeMap::new();
    for r in receiver.requests() {
        *arrivals
            .entry(r.json()["eventId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = arrivals.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(arrivals.len(), events, "each event arrived");
    let ids: HashSet<&str> = deliveries
        .iter()
        .map(|d| d["eventId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events, "one delivery per event");
    assert!(ids.iter().all(|id| arrivals.contains_key(*id)));
    for (i, d) in deliveries.iter().enumerate() {
        assert_eq!(d["attempts"], 1, "{d}");
        assert_eq!(d["connectorVersion"], version.as_str(), "{d}");
        // Asked of the instances in turn.
        let (code, detail) = servers[i % 3]
            .admin_get(&format!("/admin/deliveries/{}", d["id"]))
            .await;
        assert_eq!(code, StatusCode::OK, "{detail}");
        let history = detail["history"].as_array().unwrap();
        assert_eq!(history.len(), 1, "{detail:#}");
        assert_eq!(history[0]["outcome"], "delivered", "{detail:#}");
    }

    // Who served them: each instance counts the deliveries it made itself.
    let end = connector_on_each(&servers, "hook").await;
    for c in &end {
        assert_eq!(c["state"], "active", "{c}");
        assert_eq!(c["deliveries"]["pending"], 0, "{c}");
        assert_eq!(c["deliveries"]["failedCallsSinceStart"], 0, "{c}");
    }
    let total = served(&end);
    let backlog: Vec<usize> = total.iter().zip(&after_live).map(|(t, l)| t - l).collect();
    eprintln!(
        "{live} live events delivered in {live_took:?} (from the first map), per instance \
         {after_live:?}; a backlog of {held} in {backlog_took:?} (from enable), per instance \
         {backlog:?}"
    );
    assert_eq!(total.iter().sum::<usize>(), events, "{total:?}");
    assert!(
        total.iter().filter(|n| **n > 0).count() >= 2,
        "more than one instance delivered: {total:?}"
    );
}

/// Regression: each instance routes the events it fans out with the connectors it has
/// loaded. A connector uploaded on one instance must still get every event committed after
/// its upload answered, whichever instance wrote or fans out the event (the others load the
/// upload moments later, after its NOTIFY). Five uploads, each followed at once by maps on
/// all three instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_uploaded_on_one_instance_gets_every_later_event_from_every_instance() {
    let receiver = Receiver::start().await;
    let Some(servers) = three_instances(ServerOptions::default()).await else {
        return;
    };
    let apis = apis(&servers, "acme");
    let bytes = std::fs::read(common::components::component("webhook")).unwrap();
    const PER_ROUND: usize = 30;
    for round in 0..5 {
        let name = format!("late-{round}");
        let manifest = format!(
            "name = \"{name}\"\nrealms = [\"acme\"]\nevents = [\"login\"]\n\
             allowed_hosts = [\"{}\"]\ntimeout_ms = 2000\n[config]\nurl = \"{}\"\n",
            receiver.origin(),
            receiver.url(&format!("/{name}"))
        );
        let (code, body) = servers[round % 3]
            .put_connector(&name, &manifest, Some(bytes.clone()))
            .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
        let tasks = (0..PER_ROUND).map(|i| {
            let api = apis[i % 3].clone();
            let id = format!("{name}-s{i}");
            async move {
                let (code, body) = api.map_parent(&id, &format!("kc-{id}")).await;
                assert_eq!(code, StatusCode::CREATED, "{body}");
            }
            .boxed()
        });
        all(tasks).await;
        let got = servers[0]
            .wait_delivery_pages(
                &format!("connector={name}"),
                500,
                Duration::from_secs(30),
                |d| d.len() >= PER_ROUND,
            )
            .await;
        let sessions: HashSet<&str> = got
            .iter()
            .filter_map(|d| d["externalId"].as_str())
            .collect();
        assert_eq!(
            sessions.len(),
            PER_ROUND,
            "{name}: one login delivery per session"
        );
    }
}
