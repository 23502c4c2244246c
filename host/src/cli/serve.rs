//! `lockstep serve`: resolves the settings, opens the store, loads the connectors, starts the
//! background tasks and the API, and on a shutdown signal stops them in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{StoreArgs, open_store, realm_policies, shutdown_signal};
use crate::api::{self, AppState};
use crate::auth::Authenticator;
use crate::config::FileConfig;
use crate::lifecycle::{self, Connectors};
use crate::oidc::keycloak_admin::{AdminSettings, KeycloakAdmin};
use crate::oidc::revocation::RealmRevocation;
use crate::oidc::tls::TrustRoots;
use crate::oidc::{AccessTokens, RealmIdp, Verifier};
use crate::runtime::Runtime;
use crate::runtime::registry::Registry;
use crate::sync::admission::Admission;
use crate::sync::dispatcher::{Dispatcher, DispatcherConfig};
use crate::sync::expiry::{self, ExpiryConfig};
use crate::sync::reconcile::{self, Reconciler};
use crate::sync::sessions::SessionService;
use crate::sync::ssf_streams::{SsfReceiver, TransmitterSettings};
use crate::telemetry::audit::{self, RetentionConfig};
use crate::telemetry::metrics::Metrics;

/// Default directory of compiled components: one the service owns, never one relative to
/// wherever it was started (where another user might have planted it). systemd's
/// `CacheDirectory` (`$CACHE_DIRECTORY`), else `$XDG_CACHE_HOME/lockstep`, else
/// `~/.cache/lockstep`; `None` (no cache) without any of them.
pub fn default_compile_cache() -> Option<PathBuf> {
    compile_cache_from(|name| std::env::var_os(name))
}

fn compile_cache_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(dirs) = var("CACHE_DIRECTORY") {
        // systemd may list several, separated by colons; the first is ours.
        return dirs.to_string_lossy().split(':').next().map(PathBuf::from);
    }
    var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|base| base.join("lockstep"))
}
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// `serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "LOCKSTEP_LISTEN")]
    pub listen: Option<String>,
    /// Bootstrap token with every permission in every realm (first set-up, demos, tests).
    #[arg(
        long = "admin-token",
        env = "LOCKSTEP_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Directory of connector manifests (`*.toml`, see docs/connectors.md).
    #[arg(long, env = "LOCKSTEP_CONNECTORS_DIR")]
    pub connectors_dir: Option<PathBuf>,
    /// Refuse to start, naming the file, when a connector of the connectors directory does not
    /// load (`strict_connectors = true`). Without it such a connector is reported as failed
    /// (log, `/admin/connectors`, `/metrics`, `/readyz`) and the others serve.
    #[arg(long, env = "LOCKSTEP_STRICT_CONNECTORS")]
    pub strict_connectors: bool,
    /// Directory for compiled connector components (reused across restarts); default
    /// `$CACHE_DIRECTORY`, else `$XDG_CACHE_HOME/lockstep`, else `~/.cache/lockstep`. It must
    /// belong to the service's user and be writable by nobody else, or the cache is off.
    #[arg(long, env = "LOCKSTEP_COMPILE_CACHE")]
    pub compile_cache: Option<PathBuf>,
    /// Days an audit record is kept (default 90, `[audit] retention_days`); 0 keeps them all.
    #[arg(long, env = "LOCKSTEP_AUDIT_RETENTION_DAYS")]
    pub audit_retention_days: Option<u32>,
    /// Requests per second per caller (default 1000, `[limits] requests_per_second`); 0 switches
    /// the rate limit off.
    #[arg(long, env = "LOCKSTEP_REQUESTS_PER_SECOND")]
    pub requests_per_second: Option<u32>,
    /// PEM file of extra certificate authorities for HTTPS to identity providers (`[tls]
    /// ca_file`); the bundled Mozilla roots are always trusted.
    #[arg(long, env = "LOCKSTEP_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Storage.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// File the bootstrap admin token is written to when no terminal can show it.
pub const BOOTSTRAP_TOKEN_FILE: &str = "lockstep-admin-token";

/// Where the service keeps its files: systemd's `StateDirectory`, else the SQLite
/// database's directory; `None` for PostgreSQL without either.
fn data_dir(database_url: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several, separated by colons; the first is ours.
        let first = dir.to_string_lossy().split(':').next().map(PathBuf::from);
        return first;
    }
    let path = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    let parent = std::path::Path::new(path).parent()?;
    Some(if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent.to_owned()
    })
}

/// Gives the bootstrap token to the operator without putting it in a log: on stdout when
/// that is a terminal, else in [`BOOTSTRAP_TOKEN_FILE`] (mode 0600, created afresh, never
/// through a symlink) in the data directory; stderr, which service managers collect, only
/// says where. `false` when neither works: the token is then not enabled at all.
fn hand_out_bootstrap_token(token: &str, data_dir: Option<&std::path::Path>) -> bool {
    use std::io::IsTerminal;
    let how_else = "or set LOCKSTEP_ADMIN_TOKEN, or add an [[api_keys]] entry \
                    (`lockstep hash-key -` prints its sha256)";
    if std::io::stdout().is_terminal() {
        println!(
            "No LOCKSTEP_ADMIN_TOKEN or API keys configured; generated a bootstrap admin token \
             for this run:\n\n    export TOKEN={token}\n"
        );
        return true;
    }
    let Some(dir) = data_dir else {
        eprintln!(
            "No LOCKSTEP_ADMIN_TOKEN, API keys or realm issuers configured, and no terminal or \
             data directory to hand a bootstrap token to: every admin call will be refused. \
             Run once in a terminal, {how_else}."
        );
        return false;
    };
    let path = dir.join(BOOTSTRAP_TOKEN_FILE);
    match write_private(&path, format!("{token}\n").as_bytes()) {
        Ok(()) => {
            eprintln!(
                "No LOCKSTEP_ADMIN_TOKEN or API keys configured; wrote a bootstrap admin token \
                 for this run to {} (mode 0600): export TOKEN=$(cat {}) -- {how_else} to \
                 choose your own.",
                path.display(),
                path.display()
            );
            true
        }
        Err(e) => {
            eprintln!(
                "No LOCKSTEP_ADMIN_TOKEN or API keys configured, and the bootstrap token cannot \
                 be written to {}: {e}. Every admin call will be refused; {how_else}.",
                path.display()
            );
            false
        }
    }
}

/// Replaces `path` with a new file only the owner can read, holding `bytes`. Created with
/// `O_EXCL`, which never follows a symlink: whatever was there, a planted symlink included,
/// is removed, never written through.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Every realm with `[realms.NAME.reconcile]`, its admin client set up.
fn reconcilers(file: &FileConfig, roots: &TrustRoots) -> anyhow::Result<Vec<Arc<KeycloakAdmin>>> {
    let mut out = Vec::new();
    for (name, realm) in file.realm_policies()? {
        if let Some(settings) =
            AdminSettings::from_config(&name, &realm).map_err(|e| anyhow::anyhow!("config: {e}"))?
        {
            out.push(Arc::new(KeycloakAdmin::new(settings, roots)?));
        }
    }
    Ok(out)
}

pub(super) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = args.store.file()?;
    let policies = realm_policies(&file)?;
    let idps = file
        .realm_policies()?
        .iter()
        .map(|(name, r)| RealmIdp::from_config(name, r).map_err(|e| anyhow::anyhow!("config: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    let ca_file = args
        .tls_ca_file
        .clone()
        .or_else(|| file.tls.ca_file.clone());
    let roots = TrustRoots::load(ca_file.as_deref()).context("config: [tls] ca_file")?;
    let idp_issuers: std::collections::HashMap<String, String> = idps
        .iter()
        .map(|idp| (idp.realm.clone(), idp.issuer.clone()))
        .collect();
    if let Some(u) = &file.public_url
        && !(u.starts_with("https://") || u.starts_with("http://"))
    {
        anyhow::bail!("config: public_url {u:?} must start with https:// or http://");
    }
    let revocation = file
        .realm_policies()?
        .iter()
        .map(|(name, r)| {
            RealmRevocation::from_config(name, r, file.public_url.as_deref())
                .map_err(|e| anyhow::anyhow!("config: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let oidc = Arc::new(
        Verifier::new(idps, &roots)
            .context("cannot set up token verification")?
            .with_revocation(
                file.public_url
                    .as_deref()
                    .map(|u| u.trim_end_matches('/').to_owned()),
                revocation,
            ),
    );
    let mut transmitters = Vec::new();
    for (name, r) in file.realm_policies()? {
        transmitters.extend(
            TransmitterSettings::from_config(&name, &r, file.public_url.as_deref())
                .map_err(|e| anyhow::anyhow!("config: {e}"))?,
        );
    }
    let ssf = Arc::new(
        SsfReceiver::new(transmitters, &roots)
            .map_err(|e| anyhow::anyhow!("cannot set up the SSF receiver: {e}"))?,
    );
    let admins = reconcilers(&file, &roots)?;
    let console = console(&file, &oidc, &roots)?;
    let events = Arc::new(file.event_keys()?);
    let keys = file.api_keys()?;
    let mut admin_token = args.admin_token.clone().filter(|t| !t.is_empty());
    if admin_token.is_none() && keys.is_empty() && oidc.is_empty() {
        // Nothing could ever authenticate; mint a one-off bootstrap token so a first run works.
        let token = format!("lst_{}", uuid::Uuid::new_v4().simple());
        let data_dir = data_dir(&args.store.options(&file)?.url);
        if hand_out_bootstrap_token(&token, data_dir.as_deref()) {
            admin_token = Some(token);
        }
    }
    let mut auth = Authenticator::new(admin_token.as_deref(), keys);
    if !oidc.is_empty() {
        auth = auth.with_verifier(Arc::new(AccessTokens(oidc.clone())));
    }

    let listen = args
        .listen
        .clone()
        .or_else(|| file.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("invalid listen address {listen:?}"))?;
    let opts = args.store.options(&file)?;
    let limits = file.limits.resolve(args.requests_per_second)?;
    let store = open_store(&opts).await?;
    let ssf_transmitter = Arc::new(crate::sync::ssf_transmit::SsfTransmitter::new(
        store.clone(),
        transmitter_settings(&file, idp_issuers)?,
        roots
            .apply(reqwest::Client::builder())
            .build()
            .context("cannot set up the SSF transmitter's HTTP client")?,
    ));
    ssf_transmitter
        .start()
        .await
        .context("cannot load or generate the SSF transmitter's signing keys")?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;

    let cache_dir = args
        .compile_cache
        .clone()
        .or_else(|| file.compile_cache.clone())
        .or_else(default_compile_cache);
    if cache_dir.is_none() {
        tracing::info!(
            "no compile cache (no --compile-cache, CACHE_DIRECTORY, XDG_CACHE_HOME or HOME): \
             connectors are compiled at every start"
        );
    }
    let runtime = Runtime::new(cache_dir).context("cannot start the connector runtime")?;
    crate::runtime::check_hook_priority().await;
    let registry = Arc::new(Registry::new());
    let metrics = Arc::new(Metrics::new());
    let connectors = Connectors::new(
        runtime.clone(),
        registry.clone(),
        store.clone(),
        metrics.clone(),
    );
    let dir = args
        .connectors_dir
        .clone()
        .or_else(|| file.connectors_dir.clone());
    let strict = args.strict_connectors || file.strict_connectors.unwrap_or(false);
    let n = connectors
        .start(dir.as_deref(), strict)
        .await
        .with_context(|| match &dir {
            Some(d) => format!("cannot load connectors from {}", d.display()),
            None => "cannot load the stored connectors".to_owned(),
        })?;
    tracing::info!(connectors = n, failed = connectors.failed().len(), dir = ?dir, "connectors loaded");
    let (stop, stopping) = watch::channel(false);
    let watcher =
        dir.map(|dir| lifecycle::spawn_watcher(connectors.clone(), dir, stopping.clone()));
    let cluster_sync = lifecycle::spawn_cluster_sync(connectors.clone(), stopping.clone());
    tracing::info!(%local, backend = store.backend(), durability = ?opts.durability, ?limits, "lockstep serving");
    // Machine-readable readiness line for scripts and black-box tests: printed only once the
    // store is migrated and every connector has been loaded or reported as failed.
    println!("listening on {local}");
    let admission = Arc::new(Admission::new(limits.admission, metrics.clone()));
    let dispatcher = Dispatcher::new(
        store.clone(),
        runtime.clone(),
        registry.clone(),
        metrics.clone(),
        DispatcherConfig::default(),
        admission.clone(),
    )
    .with_ssf(ssf_transmitter.clone());
    if ssf_transmitter.is_on() {
        tokio::spawn(ssf_transmitter.clone().run(stopping.clone()));
    }
    let dispatcher = tokio::spawn(dispatcher.run(stopping.clone()));
    let sessions = SessionService::new(store.clone(), policies)
        .with_max_cascade(limits.max_cascade)
        .with_max_tree(limits.max_tree)
        .with_admission(admission);
    let sweeper = tokio::spawn(expiry::run(
        sessions.clone(),
        ExpiryConfig::default(),
        stopping,
    ));
    let reconciling: Vec<_> = admins
        .into_iter()
        .filter_map(|admin| {
            let interval = admin.settings().interval?;
            let r = Reconciler::new(sessions.clone(), admin.clone())
                .with_metrics(metrics.reconcile(&admin.settings().realm));
            Some(tokio::spawn(reconcile::run(r, interval, stop.subscribe())))
        })
        .collect();

    let retention = RetentionConfig {
        retention_days: args
            .audit_retention_days
            .or(file.audit.retention_days)
            .unwrap_or(audit::DEFAULT_RETENTION_DAYS),
        ..RetentionConfig::default()
    };
    let audit_sweeper = tokio::spawn(audit::run(store.clone(), retention, stop.subscribe()));
    let ssf_streams = (!ssf.is_empty()).then(|| {
        tokio::spawn(
            ssf.clone()
                .run(oidc.clone(), sessions.clone(), stop.subscribe()),
        )
    });
    let background = Background {
        stop,
        dispatcher,
        sweeper,
        audit_sweeper,
        reconciling,
        ssf_streams,
        watcher,
        cluster_sync,
    };

    let state = AppState {
        sessions,
        auth,
        connectors,
        oidc,
        events,
        rate_limit: limits
            .rate
            .map(|(rate, burst)| Arc::new(api::limits::RateLimiter::new(rate, burst))),
        auth_failures: limits
            .failed_auth
            .map(|(per_minute, burst)| Arc::new(api::limits::AuthFailures::new(per_minute, burst))),
        console,
        ssf,
        ssf_transmitter,
    };
    let app = api::app(state);
    match limits.max_client_connections {
        Some(max) => {
            let listener = api::limits::LimitedListener::new(listener, max);
            api::serve::serve(listener, app, limits.timeouts, shutdown_signal()).await
        }
        None => api::serve::serve(listener, app, limits.timeouts, shutdown_signal()).await,
    }
    background.stop().await;
    tracing::info!("shutting down: draining the store");
    tokio::time::timeout(Duration::from_secs(10), store.close())
        .await
        .unwrap_or_else(|_| tracing::warn!("store did not close within 10 s"));
    Ok(())
}

/// `[ssf_transmitter]` and `public_url` as the transmitter's settings.
fn transmitter_settings(
    file: &crate::config::FileConfig,
    idp_issuers: std::collections::HashMap<String, String>,
) -> anyhow::Result<crate::sync::ssf_transmit::TransmitterSettings> {
    use crate::oidc::signing_keys::KeyAlg;
    let c = &file.ssf_transmitter;
    let defaults = crate::sync::ssf_transmit::TransmitterSettings::default();
    let signing_alg = match c.signing_alg.as_deref() {
        None => defaults.signing_alg,
        Some(a) => KeyAlg::parse(a).ok_or_else(|| {
            anyhow::anyhow!("config: [ssf_transmitter] signing_alg {a:?} must be RS256 or ES256")
        })?,
    };
    let days = |d: Option<u64>, default: Duration, name: &str| match d {
        Some(0) => Err(anyhow::anyhow!(
            "config: [ssf_transmitter] {name} must be at least 1"
        )),
        Some(d) => Ok(Duration::from_secs(d.saturating_mul(86_400))),
        None => Ok(default),
    };
    Ok(crate::sync::ssf_transmit::TransmitterSettings {
        public_url: file.public_url.clone(),
        signing_alg,
        rotate_after: days(
            c.rotate_after_days,
            defaults.rotate_after,
            "rotate_after_days",
        )?,
        overlap: days(c.key_overlap_days, defaults.overlap, "key_overlap_days")?,
        idp_issuers,
    })
}

/// The tasks `serve` starts beside the API, held so that each one's end is seen.
struct Background {
    /// Tells every task to stop.
    stop: watch::Sender<bool>,
    dispatcher: tokio::task::JoinHandle<()>,
    sweeper: tokio::task::JoinHandle<()>,
    audit_sweeper: tokio::task::JoinHandle<()>,
    reconciling: Vec<tokio::task::JoinHandle<()>>,
    /// The SSF receiver's streams (their pollers send what they owe before stopping).
    ssf_streams: Option<tokio::task::JoinHandle<()>>,
    /// The connectors directory's watcher, when there is a directory.
    watcher: Option<tokio::task::JoinHandle<()>>,
    cluster_sync: tokio::task::JoinHandle<()>,
}

impl Background {
    /// Stops the tasks once the API has drained: the sweepers and reconcilers first, then
    /// the dispatcher, which finishes the hook calls in flight (70 s at most). The directory
    /// watcher and the cluster sync, which the stop signal also ends, are cancelled rather
    /// than left to the end of the process: neither holds anything a shutdown must finish.
    async fn stop(self) {
        tracing::info!("shutting down: finishing hook calls in flight");
        let _ = self.stop.send(true);
        if let Err(e) = self.sweeper.await {
            tracing::error!(error = %e, "expiry sweeper failed");
        }
        if let Err(e) = self.audit_sweeper.await {
            tracing::error!(error = %e, "audit retention sweeper failed");
        }
        for task in self.reconciling {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "reconciler failed");
            }
        }
        if let Some(task) = self.ssf_streams {
            match tokio::time::timeout(Duration::from_secs(15), task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "ssf streams task failed"),
                Err(_) => tracing::warn!("ssf streams did not stop within 15 s"),
            }
        }
        match tokio::time::timeout(Duration::from_secs(70), self.dispatcher).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "dispatcher task failed"),
            Err(_) => tracing::warn!("dispatcher did not stop within 70 s"),
        }
        if let Some(watcher) = self.watcher {
            watcher.abort();
        }
        self.cluster_sync.abort();
    }
}

/// The operator console `[console]` asks for, with Keycloak sign-in for every realm that
/// has an issuer and a `console_client_id`.
fn console(
    file: &FileConfig,
    oidc: &Verifier,
    roots: &TrustRoots,
) -> anyhow::Result<Option<Arc<crate::console::Console>>> {
    let mut sso = Vec::new();
    for (name, realm) in file.realm_policies()? {
        if let Some(client_id) = realm.console_client_id.clone() {
            let idp = oidc.realm(&name).ok_or_else(|| {
                anyhow::anyhow!("config: [realms.{name}] console_client_id needs an issuer")
            })?;
            sso.push(crate::console::SsoRealm {
                realm: name.clone(),
                issuer: idp.issuer.clone(),
                client_id,
            });
        }
    }
    sso.sort_by(|a, b| a.realm.cmp(&b.realm));
    Ok(crate::console::Console::from_config(&file.console, sso, roots)?.map(Arc::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compile_cache_defaults_to_a_directory_of_the_service_never_the_working_one() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        const ALL: [(&str, &str); 3] = [
            ("CACHE_DIRECTORY", "/var/cache/lockstep:/var/cache/other"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/home/u"),
        ];
        type Vars = &'static [(&'static str, &'static str)];
        let cases: [(Vars, Option<&str>); 5] = [
            (&ALL, Some("/var/cache/lockstep")),
            (&[ALL[1], ALL[2]], Some("/x/lockstep")),
            (
                &[("XDG_CACHE_HOME", "relative"), ("HOME", "/home/u")],
                Some("/home/u/.cache/lockstep"),
            ),
            (&[ALL[2]], Some("/home/u/.cache/lockstep")),
            (&[], None),
        ];
        for (vars, want) in cases {
            assert_eq!(
                compile_cache_from(env(vars)),
                want.map(PathBuf::from),
                "{vars:?}"
            );
        }
    }
}
