//! `legacy-sim`: run the legacy IAM simulator by hand (connector walk-throughs, demos).

use clap::Parser;

/// A legacy IAM system: a session table behind a REST API with HTTP Basic auth.
#[derive(Parser)]
#[command(name = "legacy-sim")]
struct Args {
    /// Where to listen (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: String,
    /// Basic-auth user.
    #[arg(long, default_value = legacy_sim::DEFAULT_USER)]
    user: String,
    /// Basic-auth password.
    #[arg(long, default_value = legacy_sim::DEFAULT_PASSWORD)]
    password: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let sim = legacy_sim::Sim::new(&args.user, &args.password);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!(
        "legacy-sim listening on http://{} (Basic auth user {}); Ctrl-C stops it",
        listener.local_addr()?,
        args.user
    );
    sim.serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
