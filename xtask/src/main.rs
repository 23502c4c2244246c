//! Project tasks that are not part of the product: `cargo xtask <command>`.
//!
//! - `build-connectors`: build the connector components (`connectors/`, `tests/fixtures/`)
//!   for `wasm32-wasip2` into `target/wasm32-wasip2/connector/`, where tests load them.
//! - `bench-api`: load-test the external-sessions REST API of a release build against SQLite
//!   and (optionally) PostgreSQL, beside a raw-insert ceiling; see `docs/benchmarks.md`.
//! - `bench-swap`: measure connector hot-swapping (directory manifest and API upload) of a
//!   release build under session load: request latency, time to serving, lost deliveries.
//! - `bench-logout`: measure OIDC back-channel logout of a release build against a local
//!   identity provider: time to the answer (sessions ended) and to every connector called.
//! - `bench-events`: load the Keycloak event intake (`POST /realms/{realm}/events`) of a
//!   release build: answer latency, throughput, time to the webhooks, replays refused.
//! - `bench-delivery`: how far webhook deliveries of a release build trail the API at its top
//!   rate (lag from `occurredAt` to arrival, share in time, drain, duplicates, missing), with
//!   and without a slow connector beside the fast ones, the dispatcher's rate with no-op
//!   connectors, and the hook-call micro-benchmark, each beside its ceiling.
//! - `bench-crash`: SIGKILL a release build at random points under map/destroy load with two
//!   webhook connectors, restart it, and check that nothing committed or routed was lost.
//! - `bench-ssf`: Lockstep as a Shared Signals transmitter: time from a `destroy-parent` to
//!   its `session-revoked` SET at a push receiver on 127.0.0.1 (p50/p99, idle); and as a
//!   receiver: pushed SETs per second verified and applied, beside `GET /healthz`'s rate.
//! - `bench`: mixed-load curves (map, query, destroy) of a release build at increasing offered
//!   rates (open loop) on SQLite and PostgreSQL, the server's memory with `--rows` rows, and
//!   a PNG plot of throughput and p99 latency (`docs/bench-curves.png`).
//! - `keycloak start|stop|status|url`: the real Keycloak the tests log in against
//!   (`127.0.0.1:18180`, realms from `tests/keycloak/`), started once per test run.

mod bench_api;
mod bench_console;
mod bench_crash;
mod bench_delivery;
mod bench_events;
mod bench_hostile;
mod bench_logout;
mod bench_mixed;
mod bench_ssf;
mod bench_swap;
mod build_connectors;
mod harness;
mod keycloak;
mod verdict;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Lockstep project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build every connector component for wasm32-wasip2 (the tests load them).
    BuildConnectors(build_connectors::Args),
    /// Benchmark the external-sessions API (map, destroy, cascades) on SQLite and PostgreSQL.
    BenchApi(bench_api::Args),
    /// Benchmark connector hot-swapping under load (directory and API swaps, delivery check).
    BenchSwap(bench_swap::Args),
    /// Benchmark OIDC back-channel logout: sessions ended and every connector called.
    BenchLogout(bench_logout::Args),
    /// Benchmark the Keycloak event intake: signed LOGIN, REFRESH_TOKEN, LOGOUT under load,
    /// time to the webhooks, replays refused.
    BenchEvents(bench_events::Args),
    /// Delivery lag at the API's top rate: webhooks to a loopback receiver (alone and beside
    /// a slow one), no-op connectors, the hook-call micro-benchmark, ceilings and targets.
    BenchDelivery(bench_delivery::Args),
    /// Crash safety: SIGKILL and restart the server under load, then check no committed
    /// change or delivery was lost, count duplicates, and check no echo to the origin.
    BenchCrash(bench_crash::Args),
    /// Hostile connectors (CPU loop, memory hog, trap, forbidden host, huge error, log flood,
    /// slow legacy system) loaded at once under API load: p99 against a baseline, RSS, and
    /// how every hostile delivery ended.
    BenchHostile(bench_hostile::Args),
    /// Operator console: overview and 1,000-session tree page server time (p50/p99) with a
    /// million sessions in the store.
    BenchConsole(bench_console::Args),
    /// Shared Signals transmitter: destroy-parent to the session-revoked SET at a push
    /// receiver on 127.0.0.1, p50/p99, idle.
    BenchSsf(bench_ssf::Args),
    /// Mixed-load curves: map/query/destroy at increasing offered rates (open loop) on SQLite
    /// and PostgreSQL, server memory with `--rows` rows, and a PNG plot of the curves.
    Bench(bench_mixed::Args),
    /// Run the test Keycloak: `start` (download, import tests/keycloak/*.json), `stop`,
    /// `status`, `url`.
    Keycloak(keycloak::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BuildConnectors(args) => build_connectors::main(args).map(|()| ExitCode::SUCCESS),
        Command::BenchApi(args) => bench_api::main(args),
        Command::BenchSwap(args) => bench_swap::main(args),
        Command::BenchLogout(args) => bench_logout::main(args),
        Command::BenchEvents(args) => bench_events::main(args),
        Command::BenchDelivery(args) => bench_delivery::main(args),
        Command::BenchCrash(args) => bench_crash::main(args),
        Command::BenchHostile(args) => bench_hostile::main(args),
        Command::BenchConsole(args) => bench_console::main(args),
        Command::BenchSsf(args) => bench_ssf::main(args),
        Command::Bench(args) => bench_mixed::main(args),
        Command::Keycloak(args) => keycloak::main(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:?}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> anyhow::Result<PathBuf> {
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else `target/` in the workspace.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}
