//! The settings a command runs with, each resolved in one order: its flag (or the flag's
//! `LOCKSTEP_*` environment variable, which clap reads when the flag is absent), else the
//! config file, else the default. The one place that order is written; the commands take
//! what these functions return.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use super::serve::{DEFAULT_LISTEN, ServeArgs, default_compile_cache};
use super::{DEFAULT_DATABASE_URL, StoreArgs};
use crate::config::{FileConfig, Limits};
use crate::store::{Durability, StoreOptions};
use crate::telemetry::audit::DEFAULT_RETENTION_DAYS;

/// What `serve` runs with (no `Debug`: it holds the admin token).
pub(super) struct ServeSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The database.
    pub store: StoreOptions,
    /// Request rate, cascade and tree sizes, connections, deadlines, back-pressure.
    pub limits: Limits,
    /// Directory of connector manifests.
    pub connectors_dir: Option<PathBuf>,
    /// Refuse to start when a connector of the directory does not load.
    pub strict_connectors: bool,
    /// Directory of compiled components (`None`: no cache).
    pub compile_cache: Option<PathBuf>,
    /// Days an audit record is kept (0: forever).
    pub audit_retention_days: u32,
    /// Extra certificate authorities for HTTPS to identity providers.
    pub tls_ca_file: Option<PathBuf>,
    /// The bootstrap admin token, when one was given (an empty one counts as none).
    pub admin_token: Option<String>,
}

/// `serve`'s settings from its flags and the file.
pub(super) fn serve(args: &ServeArgs, file: &FileConfig) -> anyhow::Result<ServeSettings> {
    let listen = pick(args.listen.clone(), file.listen.clone(), || {
        DEFAULT_LISTEN.to_owned()
    });
    Ok(ServeSettings {
        listen: listen
            .parse()
            .with_context(|| format!("invalid listen address {listen:?}"))?,
        store: store(&args.store, file)?,
        limits: file.limits.resolve(args.requests_per_second)?,
        connectors_dir: args
            .connectors_dir
            .clone()
            .or_else(|| file.connectors_dir.clone()),
        // A switch: present means on; absent leaves the file's value.
        strict_connectors: args.strict_connectors || file.strict_connectors.unwrap_or(false),
        compile_cache: args
            .compile_cache
            .clone()
            .or_else(|| file.compile_cache.clone())
            .or_else(default_compile_cache),
        audit_retention_days: pick(args.audit_retention_days, file.audit.retention_days, || {
            DEFAULT_RETENTION_DAYS
        }),
        tls_ca_file: tls_ca_file(args.tls_ca_file.as_ref(), file),
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
    })
}

/// The database from `--database-url`, `--durability`, `--max-connections` and the file.
pub(super) fn store(args: &StoreArgs, file: &FileConfig) -> anyhow::Result<StoreOptions> {
    let url = pick(args.database_url.clone(), file.database_url.clone(), || {
        DEFAULT_DATABASE_URL.to_owned()
    });
    let durability = match (args.durability, &file.durability) {
        (Some(d), _) => d,
        (None, Some(text)) => text
            .parse()
            .map_err(|e: String| anyhow::anyhow!("config durability: {e}"))?,
        (None, None) => Durability::Normal,
    };
    let mut opts = StoreOptions::new(url);
    opts.durability = durability;
    opts.max_connections = args.max_connections;
    Ok(opts)
}

/// `--tls-ca-file`, else `[tls] ca_file`.
pub(super) fn tls_ca_file(flag: Option<&PathBuf>, file: &FileConfig) -> Option<PathBuf> {
    flag.cloned().or_else(|| file.tls.ca_file.clone())
}

/// The flag's value, else the file's, else the default.
fn pick<T>(flag: Option<T>, file: Option<T>, default: impl FnOnce() -> T) -> T {
    flag.or(file).unwrap_or_else(default)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn settings(flags: &[&str], toml: &str) -> anyhow::Result<ServeSettings> {
        let cli = Cli::try_parse_from(["lockstep", "serve"].iter().chain(flags)).unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!("parsed serve")
        };
        serve(&args, &FileConfig::parse(toml).unwrap())
    }

    const FILE: &str = r#"
        listen = "127.0.0.1:9001"
        database_url = "sqlite://file.db"
        durability = "fsync"
        strict_connectors = true
        compile_cache = "/file/cache"
        [audit]
        retention_days = 30
        [limits]
        requests_per_second = 50
        [tls]
        ca_file = "/file/ca.pem"
    "#;

    #[test]
    fn a_flag_wins_over_the_file() {
        let s = settings(
            &[
                "--listen=127.0.0.1:9002",
                "--database-url=sqlite://flag.db",
                "--durability=normal",
                "--compile-cache=/flag/cache",
                "--audit-retention-days=0",
                "--requests-per-second=7",
                "--tls-ca-file=/flag/ca.pem",
            ],
            FILE,
        )
        .unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9002");
        assert_eq!(s.store.url, "sqlite://flag.db");
        assert_eq!(s.store.durability, Durability::Normal);
        assert_eq!(s.compile_cache, Some(PathBuf::from("/flag/cache")));
        assert_eq!(s.audit_retention_days, 0);
        assert_eq!(s.limits.rate, Some((7, 14)));
        assert_eq!(s.tls_ca_file, Some(PathBuf::from("/flag/ca.pem")));
    }

    #[test]
    fn the_file_wins_over_the_default() {
        let s = settings(&[], FILE).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(s.store.url, "sqlite://file.db");
        assert_eq!(s.store.durability, Durability::Fsync);
        assert!(s.strict_connectors);
        assert_eq!(s.compile_cache, Some(PathBuf::from("/file/cache")));
        assert_eq!(s.audit_retention_days, 30);
        assert_eq!(s.limits.rate, Some((50, 100)));
        assert_eq!(s.tls_ca_file, Some(PathBuf::from("/file/ca.pem")));
    }

    #[test]
    fn without_flag_or_file_the_default_holds() {
        let s = settings(&[], "").unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.store.url, DEFAULT_DATABASE_URL);
        assert_eq!(s.store.durability, Durability::Normal);
        assert!(!s.strict_connectors);
        assert_eq!(s.audit_retention_days, DEFAULT_RETENTION_DAYS);
        assert_eq!(s.limits.rate, Some((1_000, 2_000)));
        assert_eq!(s.tls_ca_file, None);
        assert_eq!(s.admin_token, None);
    }

    #[test]
    fn the_strict_switch_turns_on_what_the_file_leaves_off_and_bad_values_are_named() {
        let s = settings(&["--strict-connectors"], "strict_connectors = false").unwrap();
        assert!(s.strict_connectors);
        let err = settings(&["--listen=nowhere"], "").err().unwrap();
        assert!(err.to_string().contains("invalid listen address"), "{err}");
        let err = settings(&[], "durability = \"sometimes\"").err().unwrap();
        assert!(err.to_string().contains("config durability"), "{err}");
    }
}
