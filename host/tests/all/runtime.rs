//! The connector runtime with real components (built from `connectors/` and
//! `tests/fixtures/`) and a real HTTP receiver on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use base64::Engine;
use common::components::component;
use common::events::portal_event;
use common::receiver::Receiver;
use hmac::{Hmac, Mac};
use lockstep::domain::{EventType, SyncEvent};
use lockstep::runtime::cache::CacheOutcome;
use lockstep::runtime::manifest::Manifest;
use lockstep::runtime::world::World;
use lockstep::runtime::{HookFailure, Runtime, RuntimeError};

fn manifest(name: &str, component_name: &str, extra: &str) -> Manifest {
    let text = format!(
        "name = \"{name}\"\ncomponent = \"{}\"\n{extra}\n",
        component(component_name).display()
    );
    Manifest::parse(&text, Path::new("."), name).unwrap()
}

fn event(event_type: EventType) -> SyncEvent {
    portal_event(
        event_type,
        uuid::Uuid::now_v7().to_string(),
        "portal-session-001",
    )
}

fn hostile(mode: &str, extra: &str) -> Manifest {
    manifest(
        &format!("hostile-{mode}"),
        "hostile",
        &format!("timeout_ms = 300\nmemory_mb = 16\n{extra}\n[config]\nmode = \"{mode}\"\n"),
    )
}

#[tokio::test]
async fn webhook_posts_the_event_signed_per_standard_webhooks() {
    let receiver = Receiver::start().await;
    let runtime = Runtime::new(None).unwrap();
    let secret_bytes = b"0123456789abcdef0123456789abcdef";
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(secret_bytes)
    );
    let webhook = runtime
        .load(manifest(
            "billing",
            "webhook",
            &format!(
                "allowed_hosts = [\"{}\"]\n[config]\nurl = \"{}\"\nsecret = \"{secret}\"\nauthorization = \"Bearer legacy\"\n",
                receiver.origin(),
                receiver.url("/sessions")
            ),
        ))
        .await
        .unwrap();
    let ev = event(EventType::Login);
    runtime.call(&webhook, &ev).await.unwrap();
    let got = receiver.wait_for(1, Duration::from_secs(5)).await;
    let req = &got[0];
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("POST", "/sessions")
    );
    assert_eq!(req.header("authorization"), Some("Bearer legacy"));
    let body = req.json();
    assert_eq!(body["eventId"], ev.event_id.as_str());
    assert_eq!(body["type"], "login");
    assert_eq!(body["externalId"], "portal-session-001");
    assert_eq!(body["kind"], "PARENT");
    assert_eq!(body["idpSessionId"], "kc-user-123");
    assert_eq!(body["userId"], "alice");
    assert_eq!(body["attributes"]["ip"], "10.1.2.3");
    // Standard Webhooks: v1,base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).
    let id = req.header("webhook-id").unwrap();
    let ts = req.header("webhook-timestamp").unwrap();
    assert_eq!(id, ev.event_id);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret_bytes).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&req.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(req.header("webhook-signature"), Some(expected.as_str()));
}

#[tokio::test]
async fn webhook_maps_statuses_and_outages_to_retry_or_fail() {
    let receiver = Receiver::start().await;
    let runtime = Runtime::new(None).unwrap();
    let load = |url: String, origin: String| {
        let runtime = runtime.clone();
        async move {
            runtime
                .load(manifest(
                    "legacy",
                    "webhook",
                    &format!("allowed_hosts = [\"{origin}\"]\n[config]\nurl = \"{url}\"\ntimeout_ms = \"500\"\n"),
                ))
                .await
                .unwrap()
        }
    };
    let webhook = load(receiver.url("/s"), receiver.origin()).await;
    receiver.set_status(503);
    let got = runtime.call(&webhook, &event(EventType::Logout)).await;
    assert!(
        matches!(&got, Err(HookFailure::Retry(m)) if m.contains("503")),
        "{got:?}"
    );
    receiver.set_status(400);
    let got = runtime.call(&webhook, &event(EventType::Logout)).await;
    assert!(
        matches!(&got, Err(HookFailure::Fail(m)) if m.contains("400")),
        "{got:?}"
    );
    receiver.set_status(200);
    assert_eq!(
        runtime.call(&webhook, &event(EventType::Revoke)).await,
        Ok(())
    );

    // Nothing listens on this port: a transport failure, worth a retry.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = load(
        format!("http://127.0.0.1:{port}/s"),
        format!("http://127.0.0.1:{port}"),
    )
    .await;
    let got = runtime.call(&down, &event(EventType::Login)).await;
    assert!(matches!(got, Err(HookFailure::Retry(_))), "{got:?}");
}

#[tokio::test]
async fn requests_outside_the_allowlist_are_denied_before_they_leave() {
    let receiver = Receiver::start().await;
    let runtime = Runtime::new(None).unwrap();
    // The manifest allows another port on the same host; the receiver must never be reached.
    let c = runtime
        .load(hostile(
            "forbidden-host",
            "allowed_hosts = [\"http://127.0.0.1:1\"]",
        ))
        .await
        .unwrap();
    let mut m = (*c.manifest).clone();
    m.config.insert("url".into(), receiver.url("/steal"));
    let c = runtime.load(m).await.unwrap();
    let got = runtime.call(&c, &event(EventType::Login)).await;
    assert!(
        matches!(&got, Err(HookFailure::Fail(msg)) if msg.contains("denied")),
        "{got:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(receiver.requests().is_empty());
}

#[tokio::test]
async fn hostile_components_fail_with_their_reason_and_the_runtime_survives() {
    let runtime = Runtime::new(None).unwrap();

    let looping = runtime.load(hostile("loop", "")).await.unwrap();
    assert!(
        !looping.demoted(),
        "every connector starts at the API's priority"
    );
    let started = Instant::now();
    let got = runtime.call(&looping, &event(EventType::Login)).await;
    assert_eq!(got, Err(HookFailure::Timeout(300)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A call that burned its CPU budget sends the connector to the low-priority threads.
    assert!(looping.demoted(), "a CPU-burning connector is demoted");

    let hog = runtime.load(hostile("alloc", "")).await.unwrap();
    assert_eq!(
        runtime.call(&hog, &event(EventType::Login)).await,
        Err(HookFailure::OutOfMemory(16))
    );

    let trap = runtime.load(hostile("trap", "")).await.unwrap();
    let got = runtime.call(&trap, &event(EventType::Login)).await;
    assert!(matches!(got, Err(HookFailure::Trap(_))), "{got:?}");

    let spam = runtime
        .load(manifest(
            "spam",
            "hostile",
            "timeout_ms = 10000\n[config]\nmode = \"log-spam\"\n",
        ))
        .await
        .unwrap();
    assert_eq!(runtime.call(&spam, &event(EventType::Login)).await, Ok(()));

    let loud = runtime
        .load(manifest(
            "loud",
            "hostile",
            "memory_mb = 64\n[config]\nmode = \"huge-error\"\n",
        ))
        .await
        .unwrap();
    match runtime.call(&loud, &event(EventType::Login)).await {
        Err(HookFailure::Fail(m)) => assert!(m.len() < 4096, "error not capped: {} bytes", m.len()),
        other => panic!("{other:?}"),
    }

    // After all that, the engine and the same pre-instantiated components still work.
    let fine = runtime.load(hostile("ok", "")).await.unwrap();
    for _ in 0..3 {
        assert_eq!(runtime.call(&fine, &event(EventType::Logout)).await, Ok(()));
    }
    assert!(
        !fine.demoted(),
        "a quick connector keeps the API's priority"
    );
    assert_eq!(
        runtime.call(&looping, &event(EventType::Login)).await,
        Err(HookFailure::Timeout(300))
    );
}

#[tokio::test]
async fn invalid_components_are_refused_with_a_message() {
    let runtime = Runtime::new(None).unwrap();
    let m = hostile("ok", "");
    let not_wasm = runtime
        .load_bytes(m.clone(), b"not a component".to_vec())
        .await;
    assert!(
        matches!(&not_wasm, Err(RuntimeError::Invalid { message, .. }) if message.contains("not a loadable component")),
        "{not_wasm:?}"
    );
    // A core module, not a component.
    let core = runtime
        .load_bytes(m.clone(), b"\0asm\x01\0\0\0".to_vec())
        .await;
    assert!(
        matches!(core, Err(RuntimeError::Invalid { .. })),
        "{core:?}"
    );
    // An empty component: valid, but it exports no hooks (wrong world); the message names
    // both versions the host loads.
    let empty = runtime.load_bytes(m, b"\0asm\x0d\0\x01\0".to_vec()).await;
    assert!(
        matches!(&empty, Err(RuntimeError::Invalid { message, .. })
            if message.contains("hooks")
                && message.contains("lockstep:connector@0.2.0")
                && message.contains("lockstep:connector@0.1.0")),
        "{empty:?}"
    );
}

#[tokio::test]
async fn a_component_that_traps_at_start_is_refused_when_loaded() {
    let runtime = Runtime::new(None).unwrap();
    let wat = common::components::workspace().join("tests/fixtures/trap-at-start.wat");
    let bytes = wat::parse_file(&wat).unwrap();
    let refused = runtime.load_bytes(hostile("ok", ""), bytes).await;
    assert!(
        matches!(&refused, Err(RuntimeError::Invalid { message, .. }) if message.contains("fails when instantiated")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn compiled_components_are_cached_by_content_hash() {
    let dir = tempfile::tempdir().unwrap();
    let first = Runtime::new(Some(dir.path().to_owned())).unwrap();
    let a = first.load(hostile("ok", "")).await.unwrap();
    assert_eq!(a.cache, CacheOutcome::Miss);
    // A new runtime (a restart) finds the artefact.
    let second = Runtime::new(Some(dir.path().to_owned())).unwrap();
    let b = second.load(hostile("ok", "")).await.unwrap();
    assert_eq!(b.cache, CacheOutcome::Hit);
    assert_eq!(a.version, b.version);
    assert_eq!(second.call(&b, &event(EventType::Login)).await, Ok(()));
    // Same component, different manifest: same compiled code, different version.
    let c = second.load(hostile("trap", "")).await.unwrap();
    assert_eq!(c.cache, CacheOutcome::Hit);
    assert_ne!(c.version, b.version);
}

#[tokio::test]
async fn webhook_posts_refresh_events_with_the_new_expiry() {
    let receiver = Receiver::start().await;
    let runtime = Runtime::new(None).unwrap();
    let webhook = runtime
        .load(manifest(
            "billing",
            "webhook",
            &format!(
                "events = [\"login\", \"refresh\"]\nallowed_hosts = [\"{}\"]\n[config]\nurl = \"{}\"\n",
                receiver.origin(),
                receiver.url("/sessions")
            ),
        ))
        .await
        .unwrap();
    assert_eq!(webhook.world, World::V0_3_0);
    let mut ev = event(EventType::Refresh);
    ev.expires_at = Some("2030-01-02T03:04:05.678Z".parse().unwrap());
    runtime.call(&webhook, &ev).await.unwrap();
    let got = receiver.wait_for(1, Duration::from_secs(5)).await;
    let body = got[0].json();
    assert_eq!(body["type"], "refresh");
    assert_eq!(body["eventId"], ev.event_id.as_str());
    assert_eq!(body["expiresAt"], "2030-01-02T03:04:05.678Z");
    // Other events carry the expiry when the session has one, and null when not.
    runtime
        .call(&webhook, &event(EventType::Login))
        .await
        .unwrap();
    let got = receiver.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got[1].json()["expiresAt"], serde_json::Value::Null);
}

fn connector_v0_1_0(extra: &str) -> Manifest {
    manifest("legacy", "connector_v0_1_0", extra)
}

#[tokio::test]
async fn a_0_1_0_component_loads_and_its_three_hooks_are_called() {
    let runtime = Runtime::new(None).unwrap();
    let legacy = runtime
        .load(connector_v0_1_0("[config]\nanswer = \"echo\"\n"))
        .await
        .unwrap();
    assert_eq!(legacy.world, World::V0_1_0);
    // Each hook answers with its name, the event it got and the hook the host cache saw
    // before it: the 0.1.0 hooks, event record and host interface (config, cache) all work.
    for (event_type, expected) in [
        (
            EventType::Login,
            "on-login login portal-session-001 previous=-",
        ),
        (
            EventType::Logout,
            "on-logout logout portal-session-001 previous=on-login",
        ),
        (
            EventType::Revoke,
            "revoke revoke portal-session-001 previous=on-logout",
        ),
    ] {
        assert_eq!(
            runtime.call(&legacy, &event(event_type)).await,
            Err(HookFailure::Fail(expected.to_owned()))
        );
    }
    let fine = runtime.load(connector_v0_1_0("")).await.unwrap();
    for event_type in [EventType::Login, EventType::Logout, EventType::Revoke] {
        assert_eq!(runtime.call(&fine, &event(event_type)).await, Ok(()));
    }
}

#[tokio::test]
async fn refresh_needs_a_0_2_0_component_or_later() {
    let runtime = Runtime::new(None).unwrap();
    let refused = runtime
        .load(connector_v0_1_0("events = [\"login\", \"refresh\"]"))
        .await;
    assert!(
        matches!(&refused, Err(RuntimeError::Invalid { message, .. })
            if message.contains("refresh needs lockstep:connector@0.2.0")),
        "{refused:?}"
    );
    // A component built against the frozen 0.2.0 gets refreshes through its own hook, with
    // the 0.2.0 host interface.
    let frozen = runtime
        .load(manifest(
            "legacy",
            "connector_v0_2_0",
            "events = [\"login\", \"refresh\"]\n[config]\nanswer = \"echo\"\n",
        ))
        .await
        .unwrap();
    assert_eq!(frozen.world, World::V0_2_0);
    assert_eq!(
        runtime.call(&frozen, &event(EventType::Login)).await,
        Err(HookFailure::Fail(
            "on-login login portal-session-001 previous=-".into()
        ))
    );
    assert_eq!(
        runtime.call(&frozen, &event(EventType::Refresh)).await,
        Err(HookFailure::Fail(
            "on-refresh refresh portal-session-001 previous=on-login".into()
        ))
    );
    // And so does one of today's version.
    let current = runtime
        .load(hostile("ok", "events = [\"login\", \"refresh\"]"))
        .await
        .unwrap();
    assert_eq!(current.world, World::V0_3_0);
    assert_eq!(
        runtime.call(&current, &event(EventType::Refresh)).await,
        Ok(())
    );
}

/// Signs nothing real: the seam between the runtime and Lockstep's transmitter, whose real
/// signatures the SSF tests verify end to end; here what counts is what the runtime lets a
/// component ask for.
struct CountingSigner(std::sync::atomic::AtomicU32);

impl lockstep::runtime::signer::EventSigner for CountingSigner {
    fn sign_event(
        &self,
        event: &SyncEvent,
        audience: &str,
    ) -> Result<String, lockstep::runtime::signer::SignRefusal> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(format!("{}.{audience}", event.event_id))
    }
}

fn signing(audience: &str, times: u32) -> Manifest {
    manifest(
        "signing",
        "hostile",
        &format!(
            "signing_audiences = [\"urn:granted\"]\n[config]\nmode = \"sign\"\n\
             audience = \"{audience}\"\ntimes = \"{times}\"\n"
        ),
    )
}

/// The answers a `sign` call got, one per line.
async fn sign_answers(runtime: &Runtime, manifest: Manifest, ev: &SyncEvent) -> Vec<String> {
    let connector = runtime.load(manifest).await.unwrap();
    match runtime.call(&connector, ev).await {
        Err(HookFailure::Fail(answers)) => answers.lines().map(str::to_owned).collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_component_gets_signed_events_only_as_granted_and_within_the_cap() {
    let ev = event(EventType::Logout);
    // No signer: the host says what to configure.
    let runtime = Runtime::new(None).unwrap();
    let answers = sign_answers(&runtime, signing("urn:granted", 1), &ev).await;
    assert!(
        answers[0].starts_with("refused signed events are not available"),
        "{answers:?}"
    );

    let runtime = Runtime::new(None).unwrap();
    let signer = Arc::new(CountingSigner(Default::default()));
    assert!(runtime.set_signer(signer.clone()));
    // Four per call, the fifth refused; the signer is asked four times.
    let answers = sign_answers(&runtime, signing("urn:granted", 5), &ev).await;
    let signed = format!("ok {}.urn:granted", ev.event_id);
    assert_eq!(answers[..4], vec![signed.clone(); 4][..], "{answers:?}");
    assert!(answers[4].contains("at most 4"), "{answers:?}");
    assert_eq!(signer.0.load(std::sync::atomic::Ordering::SeqCst), 4);
    // The next call has its own four.
    let answers = sign_answers(&runtime, signing("urn:granted", 1), &ev).await;
    assert_eq!(answers, [signed]);
    // An audience the manifest does not grant is refused before the signer is asked.
    let answers = sign_answers(&runtime, signing("urn:other", 1), &ev).await;
    assert!(
        answers[0].starts_with("refused audience \"urn:other\" is not granted"),
        "{answers:?}"
    );
    assert_eq!(signer.0.load(std::sync::atomic::Ordering::SeqCst), 5);
}

/// What `count` mode logged: the instance's call number.
fn call_number(transcript: &lockstep::runtime::Transcript) -> u32 {
    let (_, line) = transcript
        .logs
        .iter()
        .find(|(_, m)| m.starts_with("call "))
        .unwrap_or_else(|| panic!("no count line in {transcript:?}"));
    line["call ".len()..].parse().unwrap()
}

async fn numbers(
    runtime: &Runtime,
    connector: &std::sync::Arc<lockstep::runtime::LoadedConnector>,
    ids: &[&str],
) -> Vec<u32> {
    let mut out = Vec::new();
    for id in ids {
        let mut e = event(EventType::Login);
        e.external_id = (*id).to_owned();
        let (_, transcript) = runtime.call_recorded(connector, &e).await;
        out.push(call_number(&transcript));
    }
    out
}

#[tokio::test]
async fn each_call_gets_a_fresh_instance_by_default() {
    let runtime = Runtime::new(None).unwrap();
    let c = runtime.load(hostile("count", "")).await.unwrap();
    assert_eq!(numbers(&runtime, &c, &["a", "b", "c"]).await, vec![1, 1, 1]);
}

#[tokio::test]
async fn reuse_instance_serves_calls_from_a_warm_instance_and_recycles_it() {
    let runtime = Runtime::new(None).unwrap();
    let c = runtime
        .load(hostile(
            "count",
            "reuse_instance = true\nmax_calls_per_instance = 3",
        ))
        .await
        .unwrap();
    // Recycled after 3 calls.
    assert_eq!(
        numbers(&runtime, &c, &["a", "b", "c", "d", "e"]).await,
        vec![1, 2, 3, 1, 2]
    );
    // A connector's own error (retry/fail) keeps the instance; a trap discards it.
    let long = runtime
        .load(hostile("count", "reuse_instance = true"))
        .await
        .unwrap();
    assert_eq!(
        numbers(&runtime, &long, &["a", "retry", "b", "trap", "c"]).await,
        vec![1, 2, 3, 4, 1]
    );
    let mut e = event(EventType::Login);
    e.external_id = "trap".into();
    assert!(matches!(
        runtime.call(&long, &e).await,
        Err(HookFailure::Trap(_))
    ));
    assert_eq!(numbers(&runtime, &long, &["a"]).await, vec![1]);

    // A replacement (even of the same bytes) never serves from its predecessor's instances.
    let replaced = runtime
        .load(hostile(
            "count",
            "reuse_instance = true\nmax_calls_per_instance = 3\n# v2",
        ))
        .await
        .unwrap();
    assert_eq!(numbers(&runtime, &replaced, &["a"]).await, vec![1]);
    // The predecessor's warm instance is still its own (2 calls served; this is the 3rd).
    assert_eq!(numbers(&runtime, &c, &["a"]).await, vec![3]);
}

#[tokio::test]
async fn reuse_instance_discards_an_instance_that_timed_out() {
    let runtime = Runtime::new(None).unwrap();
    let counting = runtime
        .load(hostile("count", "reuse_instance = true"))
        .await
        .unwrap();
    assert_eq!(numbers(&runtime, &counting, &["a", "b"]).await, vec![1, 2]);
    // A looping connector with reuse: every call times out, and none poisons the next.
    let looping = runtime
        .load(hostile("loop", "reuse_instance = true"))
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            runtime.call(&looping, &event(EventType::Login)).await,
            Err(HookFailure::Timeout(300))
        );
    }
    assert_eq!(numbers(&runtime, &counting, &["c"]).await, vec![3]);
}

#[test]
fn max_calls_per_instance_is_bounded() {
    for bad in [
        "max_calls_per_instance = 0",
        "max_calls_per_instance = 1000001",
    ] {
        let text = format!("name = \"x\"\ncomponent = \"x.wasm\"\n{bad}\n");
        let err = Manifest::parse(&text, Path::new("."), "x").unwrap_err();
        assert!(err.to_string().contains("max_calls_per_instance"), "{err}");
    }
}

#[tokio::test]
async fn reuse_instance_recycles_an_instance_that_holds_many_handles_or_most_of_its_memory() {
    let runtime = Runtime::new(None).unwrap();
    let c = runtime
        .load(hostile("count", "reuse_instance = true"))
        .await
        .unwrap();
    // 300 handles kept open (a quarter of the table is 250), then 80 % of memory_mb kept:
    // each instance serves the call that filled it, and the next call gets a fresh one
    // instead of failing later at the cap.
    assert_eq!(
        numbers(&runtime, &c, &["a", "leak-handles", "b", "grow", "c", "d"]).await,
        vec![1, 2, 1, 2, 1, 2]
    );
}

/// A loopback HTTP server that answers 200 to everything and counts the TCP connections it
/// accepted and the requests it served. Stops when dropped.
struct Counting {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Counting {
    async fn start() -> Counting {
        use axum::serve::ListenerExt;
        let (accepted, served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = accepted.clone();
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, SeqCst);
        });
        let counter = served.clone();
        let app = axum::Router::new().fallback(move || {
            counter.fetch_add(1, SeqCst);
            async { "ok" }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .ok();
        });
        Counting {
            addr,
            accepted,
            served,
            _stop: stop,
        }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }

    fn served(&self) -> usize {
        self.served.load(SeqCst)
    }
}

fn webhook_to(receiver: &Counting, extra: &str) -> Manifest {
    manifest(
        "pooled",
        "webhook",
        &format!(
            "allowed_hosts = [\"{}\"]\n{extra}\n[config]\nurl = \"{}\"\n",
            receiver.origin(),
            receiver.url("/sessions")
        ),
    )
}

#[tokio::test]
async fn webhook_calls_of_one_version_share_keep_alive_connections() {
    let receiver = Counting::start().await;
    let runtime = Runtime::new(None).unwrap();
    let pooled = runtime.load(webhook_to(&receiver, "")).await.unwrap();
    for _ in 0..20 {
        runtime
            .call(&pooled, &event(EventType::Login))
            .await
            .unwrap();
    }
    assert_eq!(receiver.served(), 20);
    // A pooled connection serves the hook thread that opened it; calls of other tests in
    // this process can push a call onto the second thread, which then opens its own.
    let used = receiver.accepted();
    assert!(used <= 2, "20 sequential calls opened {used} connections");
    assert_eq!(pooled.connections().opened(), used as u64);
    assert_eq!(pooled.connections().idle(), used);

    // `max_idle_per_host = 0`: a connection per request, as without a pool.
    let receiver = Counting::start().await;
    let unpooled = runtime
        .load(webhook_to(&receiver, "[http]\nmax_idle_per_host = 0"))
        .await
        .unwrap();
    for _ in 0..20 {
        runtime
            .call(&unpooled, &event(EventType::Login))
            .await
            .unwrap();
    }
    assert_eq!(receiver.served(), 20);
    assert_eq!(receiver.accepted(), 20);
    assert_eq!(unpooled.connections().idle(), 0);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let receiver = Counting::start().await;
    let runtime = Runtime::new(None).unwrap();
    let c = runtime
        .load(webhook_to(&receiver, "[http]\nidle_timeout_ms = 100"))
        .await
        .unwrap();
    runtime.call(&c, &event(EventType::Login)).await.unwrap();
    assert_eq!(c.connections().idle(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.connections().idle(), 0);
    runtime.call(&c, &event(EventType::Login)).await.unwrap();
    assert_eq!(receiver.accepted(), 2);
}

#[tokio::test]
async fn a_replaced_version_never_reuses_its_predecessors_connections() {
    let receiver = Counting::start().await;
    let runtime = Runtime::new(None).unwrap();
    let old = runtime.load(webhook_to(&receiver, "")).await.unwrap();
    for _ in 0..3 {
        runtime.call(&old, &event(EventType::Login)).await.unwrap();
    }
    // One connection per hook thread the calls ran on (other tests share the threads).
    let old_opened = old.connections().opened();
    assert!((1..=2).contains(&old_opened), "{old_opened}");
    assert_eq!(receiver.accepted() as u64, old_opened);
    // Same component and destination, a new version: it opens its own, never takes one of
    // the old version's idle connections.
    let new = runtime.load(webhook_to(&receiver, "# v2")).await.unwrap();
    assert_ne!(new.version, old.version);
    for _ in 0..3 {
        runtime.call(&new, &event(EventType::Login)).await.unwrap();
    }
    let new_opened = new.connections().opened();
    assert!((1..=2).contains(&new_opened), "{new_opened}");
    assert_eq!(receiver.accepted() as u64, old_opened + new_opened);
    assert_eq!(receiver.served(), 6);
    assert_eq!(old.connections().idle() as u64, old_opened);
    // Dropping the old version closes its idle connections with it.
    let old_pool = old.connections().clone();
    drop(old);
    assert_eq!(
        old_pool.idle() as u64,
        old_opened,
        "the pool outlives only through this handle"
    );
}

#[tokio::test]
async fn requests_outside_the_allowlist_are_denied_even_with_a_pooled_connection_open() {
    let receiver = Counting::start().await;
    let runtime = Runtime::new(None).unwrap();
    let c = runtime
        .load(hostile(
            "fetch",
            &format!("allowed_hosts = [\"{}\"]", receiver.origin()),
        ))
        .await
        .unwrap();
    let fetch = |url: String| {
        let mut e = event(EventType::Login);
        e.attributes.insert("url".into(), url);
        e
    };
    assert_eq!(runtime.call(&c, &fetch(receiver.url("/ok"))).await, Ok(()));
    assert_eq!(c.connections().idle(), 1);
    // The same server under a name the allowlist does not hold: refused before it leaves,
    // though a live connection to that very socket sits in the pool.
    let port = receiver.addr.port();
    for url in [
        format!("http://localhost:{port}/steal"),
        format!("http://127.0.0.1:{}/steal", port.wrapping_add(1)),
    ] {
        let got = runtime.call(&c, &fetch(url.clone())).await;
        assert!(
            matches!(&got, Err(HookFailure::Fail(msg)) if msg.contains("denied")),
            "{url}: {got:?}"
        );
    }
    assert_eq!(receiver.served(), 1);
    assert_eq!(receiver.accepted(), 1);
}

#[tokio::test]
async fn the_memory_cap_covers_all_of_an_instances_memories_together() {
    let runtime = Runtime::new(None).unwrap();
    let wat = common::components::workspace().join("tests/fixtures/two-memories.wat");
    let bytes = wat::parse_file(&wat).unwrap();
    // Two memories of 6 MiB each fit 16 MiB; the hook grows one to 12 MiB, which is under
    // the cap alone but 18 MiB with the other.
    let c = runtime
        .load_bytes(hostile("ok", ""), bytes.clone())
        .await
        .unwrap();
    assert_eq!(
        runtime.call(&c, &event(EventType::Login)).await,
        Err(HookFailure::OutOfMemory(16))
    );
    // With room for both, the same call succeeds.
    let roomy = manifest("roomy", "hostile", "memory_mb = 32");
    let c = runtime.load_bytes(roomy, bytes.clone()).await.unwrap();
    assert_eq!(runtime.call(&c, &event(EventType::Login)).await, Ok(()));
    // Two memories that together exceed the cap at start are refused at load.
    let tight = manifest("tight", "hostile", "memory_mb = 10");
    let refused = runtime.load_bytes(tight, bytes).await;
    assert!(
        matches!(&refused, Err(RuntimeError::Invalid { message, .. }) if message.contains("memory_mb = 10")),
        "{refused:?}"
    );
}

/// A server that accepts connections and never reads from them: whatever a request sends
/// stays in the sender's buffers.
struct Sink {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, SeqCst);
                open.push(socket);
            }
        });
        Sink {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn holding(sink: &Sink, memory_mb: u32, config: &str) -> Manifest {
    manifest(
        &format!("holding-{memory_mb}"),
        "hostile",
        &format!(
            "timeout_ms = 5000\nmemory_mb = {memory_mb}\nallowed_hosts = [\"http://{}\"]\n\
             [config]\nmode = \"hold-requests\"\n{config}\n",
            sink.addr
        ),
    )
}

fn hold_event(sink: &Sink) -> SyncEvent {
    let mut e = event(EventType::Login);
    e.attributes
        .insert("url".into(), format!("http://{}/hold", sink.addr));
    e
}

#[tokio::test]
async fn a_call_cannot_make_the_host_hold_more_than_its_memory_cap() {
    let sink = Sink::start().await;
    let runtime = Runtime::new(None).unwrap();
    // 64 requests of 1 MiB each to a server that reads nothing: the host would buffer every
    // body while the guest's own memory stays small.
    let c = runtime
        .load(holding(&sink, 6, "requests = \"64\"\nbody_kb = \"1024\""))
        .await
        .unwrap();
    let (got, transcript) = runtime.call_recorded(&c, &hold_event(&sink)).await;
    assert_eq!(got, Err(HookFailure::OutOfMemory(6)));
    let refused: Vec<_> = transcript
        .requests
        .iter()
        .filter(|r| r.outcome.contains("memory_mb = 6"))
        .collect();
    assert_eq!(refused.len(), 1, "{:?}", transcript.requests);
    // Each request sent reserved at least 512 KiB of the 6 MiB, so few ever left.
    assert!(
        sink.accepted.load(SeqCst) <= 12,
        "{} connections",
        sink.accepted.load(SeqCst)
    );
    // Ordinary calls of the same version are unaffected once those requests are gone.
    let mut small = (*c.manifest).clone();
    small.config.insert("requests".into(), "2".into());
    small.config.insert("body_kb".into(), "16".into());
    let small = runtime.load(small).await.unwrap();
    assert_eq!(runtime.call(&small, &hold_event(&sink)).await, Ok(()));
}

#[tokio::test]
async fn a_call_has_at_most_16_requests_open_at_once() {
    let sink = Sink::start().await;
    let runtime = Runtime::new(None).unwrap();
    let c = runtime
        .load(holding(&sink, 64, "requests = \"20\"\nbody_kb = \"16\""))
        .await
        .unwrap();
    // A plain limit, not the memory cap: the guest sees the refusal and fails.
    let got = runtime.call(&c, &hold_event(&sink)).await;
    assert!(
        matches!(&got, Err(HookFailure::Fail(m)) if m.contains("request 16") && m.contains("ConnectionLimitReached")),
        "{got:?}"
    );
}

#[tokio::test]
async fn memory_the_host_holds_for_requests_leaves_less_for_the_guest_to_grow() {
    let sink = Sink::start().await;
    let runtime = Runtime::new(None).unwrap();
    let run = |config: &'static str| {
        let (runtime, sink) = (&runtime, &sink);
        async move {
            let c = runtime.load(holding(sink, 16, config)).await.unwrap();
            runtime.call(&c, &hold_event(sink)).await
        }
    };
    // 16 requests (8 MiB of host buffers) fit, and so do 9 MiB of guest memory alone.
    assert_eq!(run("requests = \"16\"\nbody_kb = \"16\"").await, Ok(()));
    assert_eq!(run("requests = \"0\"\ngrow_mb = \"9\"").await, Ok(()));
    // Both together do not.
    assert_eq!(
        run("requests = \"16\"\nbody_kb = \"16\"\ngrow_mb = \"9\"").await,
        Err(HookFailure::OutOfMemory(16))
    );
}

#[tokio::test]
async fn a_warm_instance_starts_each_call_without_the_last_calls_reservations() {
    let sink = Sink::start().await;
    let runtime = Runtime::new(None).unwrap();
    let mut m = holding(&sink, 16, "requests = \"8\"\nbody_kb = \"256\"");
    m.reuse_instance = true;
    let c = runtime.load(m).await.unwrap();
    // Each call holds 4 MiB of host buffers and lets them go when it returns; kept across
    // calls, they would exhaust the 16 MiB by the fourth.
    for n in 1..=5 {
        let (got, transcript) = runtime.call_recorded(&c, &hold_event(&sink)).await;
        assert_eq!(got, Ok(()), "call {n}");
        assert_eq!(
            transcript.logs,
            vec![("info".to_owned(), format!("holding 8 requests in call {n}"))]
        );
    }
}
