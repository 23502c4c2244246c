//! `cargo xtask bench-console`: server time of the operator console's overview and of a
//! 1,000-session tree page with a million sessions in the store (SQLite). A load harness,
//! not a timed test: it prints p50/p99 against the targets (overview p99 < 50 ms, tree
//! p99 < 100 ms) and fails only when it cannot run.
//!
//! The store is grown with filler sessions while the server is stopped (as `bench`
//! does), the tree is mapped through the API, and the console is signed into with the
//! admin token like a browser would. Requests are sent one at a time over loopback, so
//! each latency is the server's time plus a loopback round trip.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::bench_api::db::{self, Target};
use crate::bench_api::server::Server;
use crate::harness;

const TOKEN: &str = "bench-console-token";
const REALM: &str = "acme";
const ROOT: &str = "tree-root";

#[derive(clap::Args)]
pub struct Args {
    /// Sessions in the store (filler FIXED sessions plus the tree).
    #[arg(long, default_value_t = 1_000_000)]
    sessions: i64,
    /// Sessions in the measured tree (a PARENT, 99 children, the rest grandchildren).
    #[arg(long, default_value_t = 1_000)]
    tree: usize,
    /// Requests measured per page.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Use this `lockstep` binary instead of building the release one.
    #[arg(long)]
    bin: Option<PathBuf>,
}

pub fn main(args: Args) -> Result<ExitCode> {
    if args.tree < 2 || args.requests == 0 {
        bail!("--tree must be at least 2 and --requests positive");
    }
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => crate::bench_api::build_server()?,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?
        .block_on(run(args, bin))
}

struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
    bytes: usize,
}

async fn measure(
    http: &reqwest::Client,
    url: &str,
    cookie: &str,
    requests: usize,
) -> Result<Stats> {
    let mut times = Vec::with_capacity(requests);
    let mut bytes = 0;
    for i in 0..requests + 10 {
        let started = Instant::now();
        let res = http
            .get(url)
            .header("cookie", cookie)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = res.status();
        let body = res.bytes().await?;
        let took = started.elapsed();
        if status != reqwest::StatusCode::OK {
            bail!("GET {url}: {status}");
        }
        // The first few warm the caches (SQLite pages, prepared statements).
        if i >= 10 {
            times.push(took);
            bytes = body.len();
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    Ok(Stats {
        p50: at(0.50),
        p99: at(0.99),
        max: *times.last().unwrap_or(&Duration::ZERO),
        bytes,
    })
}

/// Signs into the console as a browser does: the sign-in form's token, then the post.
async fn sign_in(http: &reqwest::Client, base: &str) -> Result<String> {
    let page = http.get(format!("{base}/console/login")).send().await?;
    let pre = page
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("lockstep_console_pre="))
        .and_then(|c| c.split(';').next())
        .context("no sign-in form cookie")?
        .to_owned();
    let res = http
        .post(format!("{base}/console/login"))
        .header("cookie", format!("lockstep_console_pre={pre}"))
        .form(&[("token", TOKEN), ("csrf", pre.as_str())])
        .send()
        .await?;
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("lockstep_console=") && !c.starts_with("lockstep_console=;"))
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
        .context("the console refused the admin token")
}

async fn map(
    http: &reqwest::Client,
    base: &str,
    action: &str,
    body: serde_json::Value,
) -> Result<()> {
    let res = http
        .post(format!(
            "{base}/admin/realms/{REALM}/external-sessions/{action}"
        ))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await?;
    harness::expect_status(res, reqwest::StatusCode::CREATED, action).await?;
    Ok(())
}

async fn run(args: Args, bin: PathBuf) -> Result<ExitCode> {
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let target = Target::Sqlite {
        path: dir.path().join("lockstep.db"),
    };
    let log = dir.path().join("server.log");
    let no_args: [&OsStr; 0] = [];
    // First start migrates the empty database.
    let server = Server::start(&bin, &target.server_url(), "normal", TOKEN, &no_args, &log).await?;
    server.stop().await?;
    let filler = args.sessions - args.tree as i64;
    db::fill_sessions(&target, filler.max(0), REALM).await?;
    let server = Server::start(&bin, &target.server_url(), "normal", TOKEN, &no_args, &log).await?;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let started = Instant::now();
    map(
        &http,
        &base,
        "map-parent",
        json!({"externalId": ROOT, "keycloakSessionId": "kc-tree", "userId": "tree-user"}),
    )
    .await?;
    for i in 1..args.tree {
        let parent = if i < 100 {
            ROOT.to_owned()
        } else {
            format!("tree-{}", 1 + i % 99)
        };
        map(
            &http,
            &base,
            "map-child",
            json!({"externalId": format!("tree-{i}"), "parentExternalId": parent, "userId": "tree-user"}),
        )
        .await?;
    }
    eprintln!(
        "  mapped a {}-session tree in {:.1} s",
        args.tree,
        started.elapsed().as_secs_f64()
    );
    let cookie = sign_in(&http, &base).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
    // The first overview counts the live sessions itself; later ones read the count the
    // background refresh keeps (at most 2 s old).
    let started = Instant::now();
    let first = http
        .get(format!("{base}/console/overview/live"))
        .header("cookie", &cookie)
        .send()
        .await?;
    if first.status() != reqwest::StatusCode::OK {
        bail!("first overview: {}", first.status());
    }
    first.bytes().await?;
    let uncached = started.elapsed();
    println!(
        "operator console, SQLite, {} sessions in the store, {} requests per page, {}",
        args.sessions,
        args.requests,
        crate::bench_api::revision()
    );
    let pages = [
        ("overview (whole page)", format!("{base}/console/"), 50.0),
        (
            "overview (live refresh)",
            format!("{base}/console/overview/live"),
            50.0,
        ),
        (
            "tree of 1,000 sessions",
            format!("{base}/console/tree?realm={REALM}&id={ROOT}"),
            100.0,
        ),
    ];
    println!(
        "  first overview (counts {} live sessions itself): {:.1} ms",
        args.sessions,
        ms(uncached)
    );
    for (name, url, target_ms) in pages {
        let s = measure(&http, &url, &cookie, args.requests).await?;
        println!(
            "  {name:<26} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  ({} KiB)  target p99 < {target_ms} ms: {}",
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            s.bytes / 1024,
            if ms(s.p99) < target_ms {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    if let Some(note) = server.stop().await? {
        eprintln!("  {note}");
    }
    Ok(ExitCode::SUCCESS)
}
