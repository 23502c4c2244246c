//! Hook-call benchmark: a fresh sandboxed instance per call, a warm one (`reuse_instance`),
//! against the same payload POSTed over loopback HTTP; the webhook connector delivering to a
//! loopback receiver over a pooled keep-alive connection and over a new connection each; and
//! destroy-parent → every connector called, end to end.
//!
//! Run: `cargo xtask build-connectors && cargo bench -p lockstep --bench hooks`
//! (`-- --calls N` to change the sample size; `-- --only fresh` or `-- --only webhook` runs
//! only the fresh-instance or the pooled-webhook loops, for a profiler; `webhook-fresh` and
//! `webhook-warm` run one in-place webhook loop alone). The fresh-instance and
//! pooled-webhook calls are timed twice: from a Tokio worker of the bench (a hop to a hook
//! thread and back per call) and on a hook thread, as the dispatcher calls (in place).
//! Prints medians, p99 and ratios; figures go to docs/benchmarks.md.
//! Not a test: nothing here asserts a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/components.rs"]
mod components;
#[path = "../tests/common/events.rs"]
mod events;
// `components` names the receiver type the tests' webhook manifests point at.
#[path = "../tests/common/receiver.rs"]
mod receiver;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lockstep::domain::{EventType, SyncEvent};
use lockstep::runtime::Runtime;
use lockstep::runtime::manifest::Manifest;

use components::component;
use events::portal_event;

/// The server's allocator (see `src/main.rs`), so that the calls are timed as it makes them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn event() -> SyncEvent {
    portal_event(
        EventType::Login,
        "01a20897-7a57-7512-bb52-195b95bc028a",
        "portal-session-001",
    )
}

struct Stats {
    median_us: f64,
    p99_us: f64,
    /// CPU of every thread but the receivers' per call: the host's time (bench loop
    /// included, which is a few instructions per call).
    host_cpu_us: Option<f64>,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        median_us: at(0.5).as_secs_f64() * 1e6,
        p99_us: at(0.99).as_secs_f64() * 1e6,
        host_cpu_us: None,
    }
}

/// Name of the thread every loopback receiver runs on, so that its CPU can be told apart
/// from the host's.
const RECEIVER_THREAD: &str = "bench-receiver";

/// A loopback receiver answering 200 on its own thread (a current-thread runtime), counting
/// requests.
async fn receiver() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(RECEIVER_THREAD.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new().fallback(move |_body: axum::body::Bytes| {
                    let h = h.clone();
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        "ok"
                    }
                });
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, app).await.ok();
            });
        })
        .unwrap();
    (rx.await.unwrap(), hits)
}

/// A per-call CPU figure for the table.
fn cpu(s: &Stats) -> String {
    s.host_cpu_us
        .map_or("-".to_owned(), |us| format!("{us:.1} µs"))
}

/// CPU time so far of this process's threads, split into (receiver threads, the rest), from
/// `/proc/self/task/*/schedstat` (nanoseconds on a CPU). `None` off Linux.
fn thread_cpu() -> Option<(Duration, Duration)> {
    let (mut receiver, mut rest) = (0u64, 0u64);
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("schedstat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
        if comm.trim() == RECEIVER_THREAD {
            receiver += ns;
        } else {
            rest += ns;
        }
    }
    Some((Duration::from_nanos(receiver), Duration::from_nanos(rest)))
}

fn main() {
    let calls: usize = std::env::args()
        .skip_while(|a| a != "--calls")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(calls, only.as_deref()));
}

/// The webhook connector posting to `addr`, with `pool` as its `[http]` settings.
fn webhook_manifest(addr: std::net::SocketAddr, pool: &str) -> Manifest {
    webhook_manifest_with(addr, "", pool)
}

/// [`webhook_manifest`] with `top` among the manifest's top-level settings.
fn webhook_manifest_with(addr: std::net::SocketAddr, top: &str, pool: &str) -> Manifest {
    let text = format!(
        "name = \"webhook\"\ncomponent = \"{}\"\nallowed_hosts = [\"http://{addr}\"]\n{top}\n[http]\n{pool}\n[config]\nurl = \"http://{addr}/s\"\n",
        component("webhook").display()
    );
    Manifest::parse(&text, Path::new("."), "webhook").unwrap()
}

const FRESH_IN_PLACE: &str =
    "hook call, fresh instance, on a hook thread as deliveries call (no-op connector)";
const WEBHOOK_IN_PLACE: &str =
    "webhook connector → loopback receiver, pooled, on a hook thread as deliveries call";

/// One table row: median, p99 and host CPU per call.
fn row(figure: &str, s: &Stats) {
    println!(
        "| {figure} | {:.1} µs | {:.1} µs | {} |",
        s.median_us,
        s.p99_us,
        cpu(s)
    );
}

fn noop_manifest(extra: &str) -> Manifest {
    let text = format!(
        "name = \"noop\"\ncomponent = \"{}\"\n{extra}\n[config]\nmode = \"ok\"\n",
        component("hostile").display()
    );
    Manifest::parse(&text, Path::new("."), "noop").unwrap()
}

/// [`sequential`] run on a hook thread, as the dispatcher makes its calls (each delivery is a
/// task there, so the call runs in place): no hop from the caller's thread and back.
async fn sequential_in_place(
    runtime: &Runtime,
    connector: &Arc<lockstep::runtime::LoadedConnector>,
    ev: &SyncEvent,
    calls: usize,
) -> Stats {
    let threads = lockstep::runtime::delivery_threads().expect("hook threads");
    let (runtime, connector, ev) = (runtime.clone(), connector.clone(), ev.clone());
    threads
        .spawn(async move { sequential(&runtime, &connector, &ev, calls).await })
        .await
        .unwrap()
}

/// Sequential calls of `connector`, each timed.
async fn sequential(
    runtime: &Runtime,
    connector: &Arc<lockstep::runtime::LoadedConnector>,
    ev: &SyncEvent,
    calls: usize,
) -> Stats {
    timed(calls, || async move {
        runtime.call(connector, ev).await.unwrap()
    })
    .await
}

/// `op` run `calls` times after a warm-up of up to 500, each run timed, with the CPU of every
/// thread but the receivers' per run.
async fn timed<F, Fut>(calls: usize, mut op: F) -> Stats
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..calls.min(500) {
        op().await;
    }
    let mut samples = Vec::with_capacity(calls);
    let before = thread_cpu();
    for _ in 0..calls {
        let t = Instant::now();
        op().await;
        samples.push(t.elapsed());
    }
    let host = before
        .zip(thread_cpu())
        .map(|((_, a), (_, b))| b.saturating_sub(a).as_secs_f64() * 1e6 / calls.max(1) as f64);
    Stats {
        host_cpu_us: host,
        ..stats(samples)
    }
}

/// The ceiling of a pooled webhook delivery: the same event POSTed as JSON by a plain HTTP
/// client (reqwest over hyper, the client wasi-http's sender also uses) on a hook thread over one
/// keep-alive connection, timed and CPU-counted as [`sequential_in_place`] is. No guest, no
/// signature: what the host cannot go below.
async fn post_in_place(addr: std::net::SocketAddr, ev: &SyncEvent, calls: usize) -> Stats {
    let threads = lockstep::runtime::delivery_threads().expect("hook threads");
    let body = serde_json::to_vec(ev).unwrap();
    let url = format!("http://{addr}/s");
    threads
        .spawn(async move {
            let client = reqwest::Client::new();
            let (client, url, body) = (&client, &url, &body);
            timed(calls, || async move {
                let response = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                response.bytes().await.unwrap();
            })
            .await
        })
        .await
        .unwrap()
}

const POST_IN_PLACE: &str =
    "ceiling: the same event POSTed by reqwest on a hook thread, keep-alive (no guest)";
const WARM_WEBHOOK_IN_PLACE: &str = "webhook connector → loopback receiver, pooled, warm instance (`reuse_instance`), on a hook thread";

async fn run(calls: usize, only: Option<&str>) {
    println!("# hooks benchmark: {calls} calls per figure, 2 tokio workers");
    let runtime = Runtime::new(None).unwrap();
    let ev = event();
    // One loop alone, for a profiler: the pooled webhook in place, fresh or warm.
    if let Some(warm) = match only {
        Some("webhook-fresh") => Some(""),
        Some("webhook-warm") => Some("reuse_instance = true"),
        _ => None,
    } {
        let (waddr, _) = receiver().await;
        let connector = runtime
            .load(webhook_manifest_with(waddr, warm, ""))
            .await
            .unwrap();
        let s = sequential_in_place(&runtime, &connector, &ev, calls).await;
        row(only.unwrap_or_default(), &s);
        return;
    }
    if only == Some("webhook") {
        let (waddr, _) = receiver().await;
        let pooled = runtime.load(webhook_manifest(waddr, "")).await.unwrap();
        let s = sequential(&runtime, &pooled, &ev, calls).await;
        let in_place = sequential_in_place(&runtime, &pooled, &ev, calls).await;
        let warm = runtime
            .load(webhook_manifest_with(waddr, "reuse_instance = true", ""))
            .await
            .unwrap();
        let warm = sequential_in_place(&runtime, &warm, &ev, calls).await;
        let ceiling = post_in_place(waddr, &ev, calls).await;
        row(
            "webhook connector → loopback receiver, pooled keep-alive connection",
            &s,
        );
        row(WEBHOOK_IN_PLACE, &in_place);
        row(WARM_WEBHOOK_IN_PLACE, &warm);
        row(POST_IN_PLACE, &ceiling);
        return;
    }
    let noop = runtime.load(noop_manifest("")).await.unwrap();
    // 1. Sequential: fresh store + instantiate + on-login + drop.
    let hook = sequential(&runtime, &noop, &ev, calls).await;
    let hook_in_place = sequential_in_place(&runtime, &noop, &ev, calls).await;
    if only == Some("fresh") {
        row("hook call, fresh instance (no-op connector)", &hook);
        row(FRESH_IN_PLACE, &hook_in_place);
        return;
    }
    // 1b. The same with `reuse_instance`: a warm instance serves the call.
    let warm = runtime
        .load(noop_manifest("reuse_instance = true"))
        .await
        .unwrap();
    let warm = sequential(&runtime, &warm, &ev, calls).await;
    // 2. Throughput: 64 concurrent callers on 2 workers.
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (runtime, noop, ev, done) = (runtime.clone(), noop.clone(), ev.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.fetch_add(1, Ordering::Relaxed) < calls {
                runtime.call(&noop, &ev).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let per_s = calls as f64 / started.elapsed().as_secs_f64();

    // 3. The same payload as a loopback HTTP POST (keep-alive, and a new connection each).
    let (addr, _) = receiver().await;
    let body = serde_json::to_vec(&ev).unwrap();
    let url = format!("http://{addr}/events");
    let keep = reqwest::Client::new();
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let http = |client: reqwest::Client| {
        let url = url.clone();
        let body = body.clone();
        async move {
            let mut s = Vec::with_capacity(calls);
            for _ in 0..calls.min(10_000) {
                let t = Instant::now();
                client.post(&url).body(body.clone()).send().await.unwrap();
                s.push(t.elapsed());
            }
            stats(s)
        }
    };
    let keepalive = http(keep).await;
    let newconn = http(fresh).await;

    // 4. The webhook connector calling a loopback receiver (hook + real HTTP), over the
    // connector's pool of keep-alive connections and with pooling off.
    let (waddr, _) = receiver().await;
    let webhook = |pool: &'static str| webhook_manifest(waddr, pool);
    let pooled = runtime.load(webhook("")).await.unwrap();
    let webhook_pooled = sequential(&runtime, &pooled, &ev, calls.min(5_000)).await;
    let webhook_in_place = sequential_in_place(&runtime, &pooled, &ev, calls.min(5_000)).await;
    let warm_webhook = runtime
        .load(webhook_manifest_with(waddr, "reuse_instance = true", ""))
        .await
        .unwrap();
    let warm_webhook = sequential_in_place(&runtime, &warm_webhook, &ev, calls.min(5_000)).await;
    let post_ceiling = post_in_place(waddr, &ev, calls.min(5_000)).await;
    let unpooled = runtime
        .load(webhook("max_idle_per_host = 0"))
        .await
        .unwrap();
    let webhook_unpooled = sequential(&runtime, &unpooled, &ev, calls.min(5_000)).await;
    println!(
        "# webhook connections opened: pooled {} for {} calls, unpooled {}",
        pooled.connections().opened(),
        2 * (calls.min(5_000) + calls.min(5_000).min(500)),
        unpooled.connections().opened()
    );

    let e2e = end_to_end(200).await;

    println!("| figure | median | p99 | host CPU per call (all threads but the receiver's) |");
    println!("|---|---|---|---|");
    row("hook call, fresh instance (no-op connector)", &hook);
    row(FRESH_IN_PLACE, &hook_in_place);
    row(
        "hook call, warm instance (`reuse_instance`, no-op connector)",
        &warm,
    );
    println!(
        "| loopback HTTP POST, keep-alive | {:.1} µs | {:.1} µs | - |",
        keepalive.median_us, keepalive.p99_us
    );
    println!(
        "| loopback HTTP POST, new connection | {:.1} µs | {:.1} µs | - |",
        newconn.median_us, newconn.p99_us
    );
    row(
        "webhook connector → loopback receiver, pooled keep-alive connection",
        &webhook_pooled,
    );
    row(WEBHOOK_IN_PLACE, &webhook_in_place);
    row(WARM_WEBHOOK_IN_PLACE, &warm_webhook);
    row(POST_IN_PLACE, &post_ceiling);
    println!(
        "pooled webhook on a hook thread / its ceiling, host CPU: {}",
        webhook_in_place
            .host_cpu_us
            .zip(post_ceiling.host_cpu_us)
            .map_or("-".to_owned(), |(w, c)| format!("{:.2}", w / c))
    );
    row(
        "webhook connector → loopback receiver, new connection each (`max_idle_per_host = 0`)",
        &webhook_unpooled,
    );
    println!(
        "| destroy-parent (3 sessions) → 2 webhook connectors called 3 times each | {:.1} µs | {:.1} µs | - |",
        e2e.median_us, e2e.p99_us
    );
    println!("hook calls/s (64 concurrent callers, 2 workers): {per_s:.0}");
    println!(
        "hook median / HTTP keep-alive median: {:.2}; / HTTP new-connection median: {:.2}",
        hook.median_us / keepalive.median_us,
        hook.median_us / newconn.median_us
    );
}

/// destroy-parent of a 3-session tree through the real binary until both webhook receivers
/// have their three logout events.
async fn end_to_end(rounds: usize) -> Stats {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (a, hits_a) = receiver().await;
    let (b, hits_b) = receiver().await;
    for (name, addr) in [("a", a), ("b", b)] {
        std::fs::write(
            dir.path().join(format!("{name}.toml")),
            format!(
                "name = \"{name}\"\ncomponent = \"{}\"\nallowed_hosts = [\"http://{addr}\"]\n[config]\nurl = \"http://{addr}/s\"\n",
                component("webhook").display()
            ),
        )
        .unwrap();
    }
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
        .arg(format!("sqlite://{}/bench.db", dir.path().display()))
        .arg("--connectors-dir")
        .arg(dir.path())
        .arg("--compile-cache")
        .arg(dir.path().join("cache"))
        .env("LOCKSTEP_ADMIN_TOKEN", "bench")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next_line().await.unwrap().unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_owned();
        }
    };
    let base = format!("http://{addr}/admin/realms/acme/external-sessions");
    let client = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        client
            .post(format!("{base}/{path}"))
            .bearer_auth("bench")
            .json(&body)
            .send()
    };
    let wait = |target: usize| {
        let (ha, hb) = (hits_a.clone(), hits_b.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while ha.load(Ordering::SeqCst) < target || hb.load(Ordering::SeqCst) < target {
                assert!(Instant::now() < deadline, "connectors not called in time");
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
        }
    };
    let mut samples = Vec::with_capacity(rounds);
    let mut expected = 0;
    for i in 0..rounds {
        let p = format!("p{i}");
        post(
            "map-parent",
            serde_json::json!({"externalId": p, "keycloakSessionId": "kc"}),
        )
        .await
        .unwrap();
        post(
            "map-child",
            serde_json::json!({"externalId": format!("{p}-a"), "parentExternalId": p}),
        )
        .await
        .unwrap();
        post(
            "map-child",
            serde_json::json!({"externalId": format!("{p}-b"), "parentExternalId": p}),
        )
        .await
        .unwrap();
        expected += 3;
        wait(expected).await;
        let t = Instant::now();
        let res = post("destroy-parent", serde_json::json!({"externalId": p}))
            .await
            .unwrap();
        assert!(res.status().is_success());
        expected += 3;
        wait(expected).await;
        samples.push(t.elapsed());
    }
    child.kill().await.ok();
    stats(samples)
}
