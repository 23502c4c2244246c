//! Command line and start-up: parses flags (each with a `LOCKSTEP_*` env var), resolves them
//! with the optional TOML file (`settings.rs`: flag, else env, else file, else default), opens
//! and migrates the store, and runs the command: `serve`
//! (`serve.rs`), `reconcile` (`reconcile.rs`), `migrate`, `openapi` and `hash-key` here;
//! `connectors` is [`crate::admin_client`] and `connector` [`crate::devkit`].

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::api;
use crate::auth;
use crate::config::FileConfig;
use crate::store::{Durability, Store, StoreOptions};
use crate::sync::sessions::RealmPolicy;
use crate::telemetry::{self, LogFormat};

mod reconcile;
mod serve;
mod settings;

pub use reconcile::ReconcileArgs;
pub use serve::{BOOTSTRAP_TOKEN_FILE, DEFAULT_LISTEN, ServeArgs, default_compile_cache};

/// Default SQLite file when no database URL is given.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://lockstep.db";
/// Lockstep keeps login sessions consistent between Keycloak and legacy IAM systems.
#[derive(Debug, Parser)]
#[command(name = "lockstep", version, about)]
pub struct Cli {
    /// Log output format.
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (overridden by RUST_LOG), e.g. `info` or `lockstep=debug`.
    #[arg(
        long,
        env = "LOCKSTEP_LOG_LEVEL",
        default_value = "info",
        global = true
    )]
    pub log_level: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(StoreArgs),
    /// Print the OpenAPI document.
    Openapi,
    /// Manage the connectors of a running instance through its admin API.
    Connectors(crate::admin_client::ClientArgs),
    /// Write a connector: scaffold (`new`), `build` and `test` it locally.
    Connector(crate::devkit::ConnectorArgs),
    /// Compare a realm's sessions with Keycloak's once, end those whose Keycloak session is
    /// gone (reason `reconciled`, cascading) and print them; needs `[realms.NAME.reconcile]`.
    Reconcile(ReconcileArgs),
    /// Print the SHA-256 of an API key, for `[[api_keys]] sha256` in the config file.
    HashKey {
        /// The key (prefer reading it from stdin with `-` to keep it out of shell history).
        key: String,
    },
}

/// Where the data lives.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Configuration file (TOML, see docs/operations.md); flags and env vars override it.
    #[arg(long, env = "LOCKSTEP_CONFIG")]
    pub config: Option<PathBuf>,
    /// `sqlite://PATH` (default `sqlite://lockstep.db`) or `postgres://USER@HOST/DB`.
    #[arg(long, env = "LOCKSTEP_DATABASE_URL")]
    pub database_url: Option<String>,
    /// SQLite commit durability: `normal` survives a process crash, `fsync` survives power
    /// loss (concurrent writes share one fsync).
    #[arg(long, env = "LOCKSTEP_DURABILITY")]
    pub durability: Option<Durability>,
    /// Database connections (PostgreSQL pool, SQLite readers).
    #[arg(long, env = "LOCKSTEP_MAX_CONNECTIONS", default_value_t = 16)]
    pub max_connections: u32,
}

impl StoreArgs {
    fn file(&self) -> anyhow::Result<FileConfig> {
        match &self.config {
            Some(path) => Ok(FileConfig::load(path)?),
            None => Ok(FileConfig::default()),
        }
    }
}

async fn open_store(opts: &StoreOptions) -> anyhow::Result<Store> {
    let store = Store::connect(opts)
        .await
        .with_context(|| format!("cannot open database {}", redact(&opts.url)))?;
    store.migrate().await.context("database migration failed")?;
    Ok(store)
}

/// Hides a password in a database URL before it reaches a log line.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Parses the command line and runs it.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Only the service exports traces; the one-shot commands just log.
    let serving = matches!(cli.command, Command::Serve(_));
    let traces = telemetry::init(cli.log_format, &cli.log_level, serving)
        .context("cannot set up trace export (OTEL_* environment)")?;
    match cli.command {
        Command::Serve(args) => {
            let result = serve::serve(args).await;
            // After the drain: the spans of the last requests and hook calls are queued now.
            traces.shutdown().await;
            result
        }
        Command::Migrate(args) => {
            let file = args.file()?;
            let store = open_store(&settings::store(&args, &file)?).await?;
            tracing::info!(backend = store.backend(), "migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Connectors(args) => crate::admin_client::run(args).await,
        Command::Reconcile(args) => reconcile::reconcile(args).await,
        Command::Connector(args) => crate::devkit::execute(args).await,
        Command::Openapi => {
            print!("{}", api::openapi::document_json());
            Ok(())
        }
        Command::HashKey { key } => {
            let key = if key == "-" {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line.trim_end_matches(['\r', '\n']).to_owned()
            } else {
                key
            };
            println!("{}", hex::encode(auth::sha256(&key)));
            Ok(())
        }
    }
}

fn realm_policies(file: &FileConfig) -> anyhow::Result<HashMap<String, RealmPolicy>> {
    Ok(file
        .realm_policies()?
        .into_iter()
        .map(|(name, r)| {
            (
                name,
                RealmPolicy {
                    orphan_children: r.orphan_children,
                    idp_system: r.idp_system,
                    idp_events: !r.events_secrets.is_empty(),
                },
            )
        })
        .collect())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_database_urls() {
        assert_eq!(
            redact("postgres://lockstep:s3cret@db:5432/lockstep"),
            "postgres://lockstep:***@db:5432/lockstep"
        );
        assert_eq!(redact("sqlite://lockstep.db"), "sqlite://lockstep.db");
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
    }

    #[test]
    fn cli_parses_the_documented_commands() {
        let cli = Cli::try_parse_from([
            "lockstep",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--durability",
            "fsync",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Serve(_)));
        assert!(Cli::try_parse_from(["lockstep", "serve", "--durability", "sometimes"]).is_err());
        assert!(Cli::try_parse_from(["lockstep", "migrate"]).is_ok());
        assert!(
            Cli::try_parse_from(["lockstep", "reconcile", "--realm", "acme", "--dry-run"]).is_ok()
        );
        assert!(Cli::try_parse_from(["lockstep", "reconcile", "--dry-run"]).is_err());
        for args in [
            &["lockstep", "connectors", "list"][..],
            &[
                "lockstep",
                "connectors",
                "load",
                "x.toml",
                "--component",
                "x.wasm",
            ],
            &[
                "lockstep",
                "connectors",
                "--url",
                "http://127.0.0.1:1",
                "remove",
                "x",
            ],
            &["lockstep", "connectors", "disable", "x", "--json"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["lockstep", "connectors", "frobnicate"]).is_err());
        for args in [
            &[
                "lockstep",
                "connector",
                "new",
                "--lang",
                "js",
                "my-connector",
            ][..],
            &[
                "lockstep",
                "connector",
                "new",
                "--lang",
                "python",
                "x",
                "--dir",
                "d",
            ],
            &["lockstep", "connector", "build"],
            &["lockstep", "connector", "build", "connectors/legacy-rust"],
            &[
                "lockstep",
                "connector",
                "test",
                "x.wasm",
                "--events",
                "e.json",
                "--config",
                "a=b",
                "--config",
                "c=",
                "--allow-host",
                "http://127.0.0.1:9100",
                "--json",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
        for args in [
            &["lockstep", "connector", "new", "--lang", "cobol", "x"][..],
            &["lockstep", "connector", "new", "x"],
            &["lockstep", "connector", "test", "x.wasm"],
            &[
                "lockstep",
                "connector",
                "test",
                "x.wasm",
                "--events",
                "e",
                "--config",
                "=v",
            ],
            &[
                "lockstep",
                "connector",
                "test",
                "x.wasm",
                "--events",
                "e",
                "--config",
                "novalue",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
