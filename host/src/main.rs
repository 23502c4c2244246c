//! The `lockstep` binary: parse the command line, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    lockstep::cli::run(lockstep::cli::Cli::parse()).await
}
