//! `cargo xtask bench-hostile`: hostile connectors under API load, on a release build of
//! `lockstep serve` (SQLite in a temp dir). Seven connectors misbehave at once — the runtime
//! fixtures (`hostile.wasm`: a CPU loop, a memory hog, a trap, a request to a host it was not
//! granted, a multi-megabyte error, a log flood) plus the real `webhook.wasm` posting to a
//! legacy system on 127.0.0.1 that answers after 5 s — while clients map and destroy sessions.
//!
//! 1. baseline: `--clients` tasks map then destroy a PARENT in realm `acme` for `--seconds`,
//!    while a trickle (`--trickle` sessions/s) maps and destroys sessions in realm `hostile`
//!    (no connector is loaded yet);
//! 2. hostile: the seven manifests are copied into the watched directory (all subscribed to
//!    realm `hostile`, policy `alert`: a failed delivery is dead at once), then the same load.
//!
//! Figures: per phase, operations, p50/p99/max of one map+destroy, server RSS (sampled every
//! 100 ms: peak and last). Checks: API p99 under hostile load within 2× the baseline's, no API
//! error, RSS bounded (peak below `--max-rss-mib`), and after the load every delivery of each
//! hostile connector ended the way its misbehaviour should (dead with timeout / out of memory
//! / trap / denied host / a capped error; the log flood delivered).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use testkit::procfs::rss_kib;

use crate::bench_api::load::{Api, Outcome, PhaseStats, run_phase};
use crate::bench_api::server::Server;
use crate::bench_api::{self, idp_session_id, user_id};

const TOKEN: &str = "bench-hostile-token";
/// How long the slow legacy system takes to answer (the webhook's timeout is 1 s).
const SLOW_ANSWER: Duration = Duration::from_secs(5);
/// Longest wait for the hostile deliveries to end after the load.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `cargo xtask bench-hostile`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Length of each phase, in seconds.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Concurrent API clients in realm `acme`.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Sessions per second mapped and destroyed in realm `hostile` (what the hostile
    /// connectors get: two events each).
    #[arg(long, default_value_t = 5)]
    trickle: u64,
    /// The RSS the server may reach (MiB) before the memory check fails.
    #[arg(long, default_value_t = 1024)]
    max_rss_mib: u64,
    /// Server binary to run instead of building `target/release/lockstep` first.
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

/// One hostile connector: name, component, manifest lines, and what its deliveries must say.
struct Hostile {
    name: &'static str,
    expect: Expect,
}

enum Expect {
    /// Dead, with a last error that contains this (lowercase), or a timeout: the deadline is
    /// wall-clock, and on a saturated machine the low-priority hook threads may not get
    /// enough CPU to reach the misbehaviour (say, to allocate 16 MiB) before it.
    Dead(&'static str),
    /// Dead, with a last error capped below 4 KiB (or a timeout, as above).
    DeadCapped,
    /// Delivered (the flood of log lines is cut and the call succeeds), or dead with a
    /// timeout when the flood itself outlasts the deadline on a busy machine.
    DeliveredOrTimeout,
}

const HOSTILE: [Hostile; 7] = [
    Hostile {
        name: "h-loop",
        expect: Expect::Dead("timeout"),
    },
    Hostile {
        name: "h-alloc",
        expect: Expect::Dead("out of memory"),
    },
    Hostile {
        name: "h-trap",
        expect: Expect::Dead("trap"),
    },
    Hostile {
        name: "h-forbidden",
        expect: Expect::Dead("denied"),
    },
    Hostile {
        name: "h-huge-error",
        expect: Expect::DeadCapped,
    },
    Hostile {
        name: "h-log-spam",
        expect: Expect::DeliveredOrTimeout,
    },
    Hostile {
        name: "h-slow",
        expect: Expect::Dead("timeout"),
    },
];

fn manifest(h: &Hostile, hostile_wasm: &Path, webhook_wasm: &Path, slow: &str) -> String {
    let common = "realms = [\"hostile\"]\nevents = [\"login\", \"logout\"]\n";
    let policy = "[policy]\non_failure = \"alert\"\n";
    let mode = |mode: &str, extra: &str| {
        format!(
            "name = \"{}\"\ncomponent = \"{}\"\n{common}{extra}{policy}[config]\nmode = \"{mode}\"\n",
            h.name,
            hostile_wasm.display()
        )
    };
    match h.name {
        "h-loop" => mode("loop", "timeout_ms = 1000\n"),
        "h-alloc" => mode("alloc", "memory_mb = 16\n"),
        "h-trap" => mode("trap", ""),
        // Allowed nothing; asks for the slow receiver.
        "h-forbidden" => format!(
            "name = \"{}\"\ncomponent = \"{}\"\n{common}{policy}[config]\nmode = \"forbidden-host\"\nurl = \"{slow}\"\n",
            h.name,
            hostile_wasm.display()
        ),
        "h-huge-error" => mode("huge-error", "memory_mb = 64\n"),
        "h-log-spam" => mode("log-spam", "timeout_ms = 5000\n"),
        _ => {
            let origin = slow.split('/').take(3).collect::<Vec<_>>().join("/");
            format!(
                "name = \"{}\"\ncomponent = \"{}\"\n{common}allowed_hosts = [\"{origin}\"]\ntimeout_ms = 1000\n{policy}[config]\nurl = \"{slow}\"\n",
                h.name,
                webhook_wasm.display()
            )
        }
    }
}

/// A legacy system that takes [`SLOW_ANSWER`] to answer anything.
async fn slow_receiver() -> Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|| async {
        tokio::time::sleep(SLOW_ANSWER).await;
        "late"
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/slow"), task))
}

/// Samples the server's RSS every 100 ms into `peak` and `last` (KiB) until `stop`.
fn sample_rss(
    pid: u32,
    peak: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Some(kib) = rss_kib(pid) {
                peak.fetch_max(kib, Ordering::Relaxed);
                last.store(kib, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

struct Phase {
    stats: PhaseStats,
    peak_rss_kib: u64,
    last_rss_kib: u64,
    trickled: u64,
}

/// The measured load in `acme` plus the trickle in `hostile`, for `seconds`.
async fn phase(name: &str, server: &Server, args: &Args, prefix: &str) -> Result<Phase> {
    let pid = server
        .pid()
        .ok_or_else(|| anyhow!("the server has no pid"))?;
    let (peak, last, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let sampler = sample_rss(pid, peak.clone(), last.clone(), stop.clone());
    let hostile = Arc::new(Api::new(server.addr, "hostile", TOKEN, 4, REQUEST_TIMEOUT)?);
    let trickle_stop = stop.clone();
    let trickle_every = Duration::from_micros(1_000_000 / args.trickle.max(1));
    let trickle_prefix = format!("{prefix}-t");
    let trickle = tokio::spawn(async move {
        let mut n = 0u64;
        let mut tick = tokio::time::interval(trickle_every);
        while !trickle_stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let id = format!("{trickle_prefix}{n}");
            let _ = hostile
                .map_parent(&id, &idp_session_id(n as usize), &user_id(n as usize))
                .await;
            let _ = hostile.destroy_parent(&id, 1).await;
            n += 1;
        }
        n
    });
    let api = Arc::new(Api::new(
        server.addr,
        "acme",
        TOKEN,
        args.clients,
        REQUEST_TIMEOUT,
    )?);
    let p = prefix.to_owned();
    let stats = run_phase(
        name,
        usize::MAX / 2,
        args.clients,
        Duration::from_secs(args.seconds),
        move |i| {
            let api = api.clone();
            let id = format!("{p}-{i}");
            async move {
                match api.map_parent(&id, &idp_session_id(i), &user_id(i)).await {
                    Outcome::Err(e) => Outcome::Err(e),
                    _ => api.destroy_parent(&id, 1).await,
                }
            }
        },
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    let trickled = trickle.await.context("the trickle task failed")?;
    let _ = sampler.await;
    Ok(Phase {
        stats,
        peak_rss_kib: peak.load(Ordering::Relaxed),
        last_rss_kib: last.load(Ordering::Relaxed),
        trickled,
    })
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value> {
    let res = client
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = res.status();
    let body: Value = res
        .json()
        .await
        .with_context(|| format!("GET {url}: body"))?;
    if !status.is_success() {
        return Err(anyhow!("GET {url}: {status} {body}"));
    }
    Ok(body)
}

/// Every delivery of `connector` (following cursors, bounded).
async fn deliveries(client: &reqwest::Client, base: &str, connector: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10_000 {
        let body = get_json(
            client,
            &format!("{base}/admin/deliveries?connector={connector}&limit=500{cursor}"),
        )
        .await?;
        if let Some(items) = body["items"].as_array() {
            out.extend(items.iter().cloned());
        }
        match body["nextCursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return Ok(out),
        }
    }
    Err(anyhow!("too many pages of deliveries for {connector}"))
}

/// Entry point.
pub fn main(args: Args) -> Result<ExitCode> {
    let root = crate::workspace_root()?;
    let webhook = bench_api::webhook_component(&root)?;
    let hostile = webhook.with_file_name("hostile.wasm");
    if !hostile.is_file() {
        return Err(anyhow!(
            "{} is missing; build it with `cargo xtask build-connectors`",
            hostile.display()
        ));
    }
    let bin = bench_api::server_bin(args.server_bin.as_deref())?;
    let command_line = bench_api::command_line();
    let revision = bench_api::revision();
    bench_api::block_on(bench_api::until_interrupted(async {
        let dir = tempfile::tempdir()?;
        let connectors = dir.path().join("connectors");
        std::fs::create_dir(&connectors)?;
        let log = dir.path().join("server.log");
        let database_url = format!("sqlite://{}", dir.path().join("lockstep.db").display());
        let extra: [&OsStr; 2] = ["--connectors-dir".as_ref(), connectors.as_os_str()];
        let server = Server::start(&bin, &database_url, "normal", TOKEN, &extra, &log).await?;
        let (slow, _slow_task) = slow_receiver().await?;
        let client = reqwest::Client::builder().no_proxy().build()?;
        let base = format!("http://{}", server.addr);

        eprintln!("baseline: {} s, {} clients", args.seconds, args.clients);
        let baseline = phase("baseline", &server, &args, "b").await?;
        eprintln!("  {}", baseline.stats.summary());

        for h in &HOSTILE {
            let text = manifest(h, &hostile, &webhook, &slow);
            let tmp = connectors.join(format!("{}.partial", h.name));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, connectors.join(format!("{}.toml", h.name)))?;
        }
        let loaded_by = Instant::now() + Duration::from_secs(120);
        loop {
            let list = get_json(&client, &format!("{base}/admin/connectors")).await?;
            let n = list["items"].as_array().map_or(0, Vec::len);
            if n == HOSTILE.len() {
                break;
            }
            if Instant::now() > loaded_by {
                return Err(anyhow!("only {n} hostile connectors loaded: {list}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("hostile: {} connectors loaded", HOSTILE.len());
        let loaded = phase("hostile", &server, &args, "h").await?;
        eprintln!("  {}", loaded.stats.summary());

        // Drain: every hostile delivery ends (dead or delivered).
        let drained_by = Instant::now() + DRAIN_TIMEOUT;
        let drain_started = Instant::now();
        loop {
            let list = get_json(&client, &format!("{base}/admin/connectors")).await?;
            let pending: i64 = list["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| c["deliveries"]["pending"].as_i64().unwrap_or(0))
                        .sum()
                })
                .unwrap_or(0);
            if pending == 0 {
                break;
            }
            if Instant::now() > drained_by {
                return Err(anyhow!("{pending} hostile deliveries still pending"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let drain = drain_started.elapsed();

        let mut checks: Vec<(String, bool)> = Vec::new();
        let mut outcomes = Vec::new();
        for h in &HOSTILE {
            let all = deliveries(&client, &base, h.name).await?;
            let wrong: Vec<&Value> = all
                .iter()
                .filter(|d| {
                    let error = d["lastError"].as_str().unwrap_or("");
                    match h.expect {
                        Expect::Dead(word) => {
                            d["status"] != "dead"
                                || !(error.to_lowercase().contains(word)
                                    || error.starts_with("timeout"))
                        }
                        Expect::DeadCapped => d["status"] != "dead" || error.len() > 4096,
                        Expect::DeliveredOrTimeout => {
                            d["status"] != "delivered"
                                && !(d["status"] == "dead" && error.starts_with("timeout"))
                        }
                    }
                })
                .collect();
            // Each distinct (status, first line of the error, capped) with its count.
            let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
            for d in &all {
                let e = d["lastError"].as_str().unwrap_or("-");
                let line = e.lines().next().unwrap_or("-");
                let line: String = line.chars().take(70).collect();
                let kind = format!("{} / {line} ({} bytes)", d["status"], e.len());
                *kinds.entry(kind).or_default() += 1;
            }
            let example = kinds
                .iter()
                .map(|(k, n)| format!("{n} × {k}"))
                .collect::<Vec<_>>()
                .join("; ");
            outcomes.push((h.name, all.len(), example));
            checks.push((
                format!(
                    "{}: every delivery ({}) ended as expected{}",
                    h.name,
                    all.len(),
                    wrong
                        .first()
                        .map(|d| format!("; first wrong: {d}"))
                        .unwrap_or_default()
                ),
                wrong.is_empty() && !all.is_empty(),
            ));
        }
        let (b99, h99) = (
            baseline.stats.percentile_ms(99.0),
            loaded.stats.percentile_ms(99.0),
        );
        checks.push((
            format!(
                "API p99 under hostile load within 2x the baseline ({h99:.1} ms vs {b99:.1} ms)"
            ),
            h99 <= 2.0 * b99,
        ));
        checks.push((
            format!(
                "no API errors ({} baseline, {} hostile)",
                baseline.stats.errors, loaded.stats.errors
            ),
            baseline.stats.errors + loaded.stats.errors == 0,
        ));
        let peak_mib = loaded.peak_rss_kib.max(baseline.peak_rss_kib) / 1024;
        checks.push((
            format!("peak RSS {peak_mib} MiB below {} MiB", args.max_rss_mib),
            peak_mib < args.max_rss_mib,
        ));
        let _ = server.stop().await;

        println!("\n## bench-hostile ({revision})\n\ncommand: `{command_line}`\n");
        println!(
            "| phase | ops (map+destroy) | ops/s | p50 ms | p99 ms | max ms | errors | hostile-realm sessions | peak RSS MiB | RSS at end MiB |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for p in [&baseline, &loaded] {
            println!(
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
                p.stats.name,
                p.stats.ops,
                p.stats.ops_per_sec(),
                p.stats.percentile_ms(50.0),
                p.stats.percentile_ms(99.0),
                p.stats.percentile_ms(100.0),
                p.stats.errors,
                p.trickled,
                p.peak_rss_kib / 1024,
                p.last_rss_kib / 1024,
            );
        }
        println!(
            "\np99 ratio hostile/baseline: {:.2}; drain of hostile deliveries after the load: {:.1} s\n",
            if b99 > 0.0 { h99 / b99 } else { f64::NAN },
            drain.as_secs_f64()
        );
        println!(
            "| connector | deliveries | how they ended: count × status / last error (first line) |"
        );
        println!("|---|---:|---|");
        for (name, n, example) in &outcomes {
            println!("| {name} | {n} | {} |", example.replace('|', "\\|"));
        }
        println!();
        let mut all_ok = true;
        for (what, ok) in &checks {
            println!("- [{}] {what}", if *ok { "x" } else { " " });
            all_ok &= ok;
        }
        Ok(if all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }))
}
