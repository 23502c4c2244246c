//! The `lockstep` binary: parse the command line, hand over to the library.

use clap::Parser;

/// mimalloc rather than the C library's allocator: a hook call builds and drops a sandbox
/// (its store, instance and contexts), and with glibc's malloc the allocator's own work
/// (consolidating and splitting freed chunks) took 15 % of the server's CPU in a no-op
/// delivery drain.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    lockstep::cli::run(lockstep::cli::Cli::parse()).await
}
