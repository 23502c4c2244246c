//! Per-language connector figures: component size, cold load (compile), load from
//! the compile cache (deserialize), and hook-call latency with a fresh instance per call and
//! with `reuse_instance = true`, for the example connector of each language
//! (`connectors/legacy-{rust,js,python}`), both for a hook that does no I/O (`on-refresh`)
//! and for a login that POSTs to the legacy simulator on 127.0.0.1.
//!
//! Run: build the examples (`lockstep connector build connectors/legacy-<lang>` for each, or
//! `cargo test -p lockstep --test all languages::`, which does), then
//! `cargo bench -p lockstep --bench languages` (`-- --calls N`). Prints medians and p99;
//! figures go to docs/benchmarks.md. Not a test: nothing here asserts a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/events.rs"]
mod events;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep::domain::{EventType, SyncEvent};
use lockstep::runtime::manifest::Manifest;
use lockstep::runtime::{LoadedConnector, Runtime};

use events::portal_event;

const LANGS: [&str; 3] = ["rust", "js", "python"];

fn example_dir(lang: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../connectors")
        .join(format!("legacy-{lang}"))
}

fn event(event_type: EventType, n: usize) -> SyncEvent {
    portal_event(
        event_type,
        format!("bench-{n}"),
        format!("portal-session-{n}"),
    )
}

/// The example's manifest, pointed at `base_url`, with its own `reuse_instance` line dropped
/// and `extra` lines added on top (each row chooses fresh or warm instances itself).
fn manifest(lang: &str, base_url: &str, extra: &str) -> Manifest {
    let dir = example_dir(lang);
    let text = std::fs::read_to_string(dir.join("manifest.toml")).unwrap();
    let own: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("reuse_instance"))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = format!(
        "{extra}\n{}",
        own.replace("http://127.0.0.1:9100", base_url)
    );
    Manifest::parse(&text, &dir, lang).unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * 0.99).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

async fn calls(
    runtime: &Runtime,
    c: &Arc<LoadedConnector>,
    event_type: EventType,
    n: usize,
) -> Vec<Duration> {
    // Warm-up: the first calls page code in and (with reuse) fill the pool.
    for i in 0..10 {
        runtime
            .call(c, &event(event_type, 1_000_000 + i))
            .await
            .unwrap();
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let e = event(event_type, i);
        let started = Instant::now();
        runtime.call(c, &e).await.unwrap();
        out.push(started.elapsed());
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--calls")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let sim = legacy_sim::start().await.unwrap();
    let base = sim.base_url();
    println!("per-language connector figures ({n} calls per row; medians, p99 in brackets)\n");
    println!(
        "| | size | cold load (compile) | load from cache | on-refresh, fresh instance | on-refresh, reuse_instance | login → legacy POST, fresh | login → legacy POST, reuse |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for lang in LANGS {
        let wasm = example_dir(lang).join(format!("legacy-{lang}.wasm"));
        let Ok(bytes) = std::fs::read(&wasm) else {
            println!(
                "| {lang} | missing: build {} first | | | | | | |",
                wasm.display()
            );
            continue;
        };
        // Cold: a new engine with no cache, three times.
        let mut cold = Vec::new();
        for _ in 0..3 {
            let runtime = Runtime::new(None).unwrap();
            let started = Instant::now();
            runtime
                .load_bytes(manifest(lang, &base, ""), bytes.clone())
                .await
                .unwrap();
            cold.push(started.elapsed());
        }
        // From the cache: the first load stores, the next five read it.
        let cache = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(Some(cache.path().to_owned())).unwrap();
        runtime
            .load_bytes(manifest(lang, &base, ""), bytes.clone())
            .await
            .unwrap();
        let mut cached = Vec::new();
        for i in 0..5 {
            let started = Instant::now();
            runtime
                .load_bytes(manifest(lang, &base, &format!("# {i}")), bytes.clone())
                .await
                .unwrap();
            cached.push(started.elapsed());
        }
        let fresh = runtime
            .load_bytes(manifest(lang, &base, ""), bytes.clone())
            .await
            .unwrap();
        let warm = runtime
            .load_bytes(
                manifest(lang, &base, "reuse_instance = true"),
                bytes.clone(),
            )
            .await
            .unwrap();
        let f = calls(&runtime, &fresh, EventType::Refresh, n).await;
        let w = calls(&runtime, &warm, EventType::Refresh, n).await;
        let fl = calls(&runtime, &fresh, EventType::Login, n).await;
        let wl = calls(&runtime, &warm, EventType::Login, n).await;
        println!(
            "| {lang} | {:.1} KiB | {} | {} | {} ({}) | {} ({}) | {} ({}) | {} ({}) |",
            bytes.len() as f64 / 1024.0,
            ms(median(cold)),
            ms(median(cached)),
            us(median(f.clone())),
            us(p99(f)),
            us(median(w.clone())),
            us(p99(w)),
            us(median(fl.clone())),
            us(p99(fl)),
            us(median(wl.clone())),
            us(p99(wl)),
        );
    }
    println!(
        "\nlegacy sessions created during the run: {}",
        sim.sim.sessions().len()
    );
}
