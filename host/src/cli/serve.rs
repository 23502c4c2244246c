//! `lockstep serve`: resolves the settings (`settings.rs`), builds the server (identity,
//! store, listener, connectors, the tasks beside the API, the router), runs it until a
//! shutdown signal, then drains: the API's requests in flight, the tasks in order, the store.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::settings::{self, ServeSettings};
use super::{StoreArgs, open_store, realm_policies, shutdown_signal};
use crate::api::{self, AppState};
use crate::auth::Authenticator;
use crate::config::{FileConfig, Limits};
use crate::lifecycle::{self, Connectors};
use crate::oidc::keycloak_admin::{AdminSettings, KeycloakAdmin};
use crate::oidc::revocation::RealmRevocation;
use crate::oidc::tls::TrustRoots;
use crate::oidc::{AccessTokens, RealmIdp, Verifier};
use crate::runtime::Runtime;
use crate::runtime::manifest::AllowedHost;
use crate::runtime::registry::Registry;
use crate::runtime::signer::EventSigner;
use crate::store::Store;
use crate::sync::admission::Admission;
use crate::sync::dispatcher::{Dispatcher, DispatcherConfig};
use crate::sync::expiry::{self, ExpiryConfig};
use crate::sync::reconcile::{self, Reconciler};
use crate::sync::sessions::SessionService;
use crate::sync::ssf_streams::{SsfReceiver, TransmitterSettings};
use crate::sync::ssf_transmit::{SsfTransmitter, TransmitterSettings as TransmitterConfig};
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
    let settings = settings::serve(&args, &file)?;
    let server = Server::build(settings, &file).await?;
    server.run(shutdown_signal()).await
}

/// The service, built and bound: the API's listener and router, the tasks beside it, and
/// the store they share. [`Server::run`] serves until the signal, then drains.
struct Server {
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    background: Background,
    store: Store,
}

/// Who may call: the realms' token verifier, the SSF receiver, the API's authenticator,
/// the console and the Keycloak event keys, all from the file.
struct Identity {
    oidc: Arc<Verifier>,
    /// Each realm's issuer (realm → issuer URL).
    idp_issuers: HashMap<String, String>,
    ssf: Arc<SsfReceiver>,
    admins: Vec<Arc<KeycloakAdmin>>,
    console: Option<Arc<crate::console::Console>>,
    events: Arc<crate::auth::webhook::EventKeys>,
    auth: Authenticator,
}

impl Server {
    /// Sets everything up in the order a start needs: identity (a bootstrap token handed
    /// out if nothing else could authenticate), the store (migrated), the listener, the
    /// connectors, the tasks beside the API, then the readiness line and the router.
    async fn build(settings: ServeSettings, file: &FileConfig) -> anyhow::Result<Self> {
        let policies = realm_policies(file)?;
        let roots =
            TrustRoots::load(settings.tls_ca_file.as_deref()).context("config: [tls] ca_file")?;
        let identity = Identity::from_file(file, &roots, &settings)?;
        let store = open_store(&settings.store).await?;
        let ssf_transmitter = Arc::new(SsfTransmitter::new(
            store.clone(),
            transmitter_settings(file, identity.idp_issuers.clone())?,
            roots
                .apply(reqwest::Client::builder())
                // A receiver must not send a push on to a host push_allowed_hosts leaves out.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .context("cannot set up the SSF transmitter's HTTP client")?,
        ));
        ssf_transmitter
            .start()
            .await
            .context("cannot load or generate the SSF transmitter's signing keys")?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let local = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new());
        // The transmitter's keys sign connectors' events (`sign-event`) when it is on.
        let signer = ssf_transmitter
            .is_on()
            .then(|| ssf_transmitter.clone() as Arc<dyn EventSigner>);
        let (runtime, registry, connectors) =
            load_connectors(&settings, &store, &metrics, signer).await?;
        let limits = settings.limits;
        let admission = Arc::new(Admission::new(limits.admission, metrics.clone()));
        let sessions = SessionService::new(store.clone(), policies)
            .with_max_cascade(limits.max_cascade)
            .with_max_tree(limits.max_tree)
            .with_admission(admission.clone());
        let dispatcher = Dispatcher::new(
            store.clone(),
            runtime,
            registry,
            metrics.clone(),
            DispatcherConfig::default(),
            admission,
        )
        .with_ssf(ssf_transmitter.clone());
        let background = Background::spawn(Tasks {
            settings: &settings,
            store: &store,
            dispatcher,
            ssf_transmitter: &ssf_transmitter,
            sessions: &sessions,
            connectors: &connectors,
            identity: &identity,
            metrics: &metrics,
        });
        tracing::info!(%local, backend = store.backend(), durability = ?settings.store.durability, ?limits, "lockstep serving");
        // Machine-readable readiness line for scripts and black-box tests: printed only once the
        // store is migrated and every connector has been loaded or reported as failed.
        println!("listening on {local}");
        let state = AppState {
            sessions,
            auth: identity.auth,
            connectors,
            oidc: identity.oidc,
            events: identity.events,
            rate_limit: limits
                .rate
                .map(|(rate, burst)| Arc::new(api::limits::RateLimiter::new(rate, burst))),
            auth_failures: limits.failed_auth.map(|(per_minute, burst)| {
                Arc::new(api::limits::AuthFailures::new(per_minute, burst))
            }),
            console: identity.console,
            ssf: identity.ssf,
            ssf_transmitter,
        };
        Ok(Server {
            listener,
            app: api::app(state),
            limits,
            background,
            store,
        })
    }

    /// Serves until `signal`, lets the requests in flight finish, then stops the background
    /// tasks and closes the store.
    async fn run(self, signal: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Server {
            listener,
            app,
            limits,
            background,
            store,
        } = self;
        match limits.max_client_connections {
            Some(max) => {
                let listener = api::limits::LimitedListener::new(listener, max);
                api::serve::serve(listener, app, limits.timeouts, signal).await
            }
            None => api::serve::serve(listener, app, limits.timeouts, signal).await,
        }
        background.stop().await;
        tracing::info!("shutting down: draining the store");
        tokio::time::timeout(Duration::from_secs(10), store.close())
            .await
            .unwrap_or_else(|_| tracing::warn!("store did not close within 10 s"));
        Ok(())
    }
}

impl Identity {
    fn from_file(
        file: &FileConfig,
        roots: &TrustRoots,
        settings: &ServeSettings,
    ) -> anyhow::Result<Self> {
        let (oidc, idp_issuers) = verifier(file, roots)?;
        let ssf = ssf_receiver(file, roots)?;
        let admins = reconcilers(file, roots)?;
        let console = console(file, &oidc, roots)?;
        let events = Arc::new(file.event_keys()?);
        let keys = file.api_keys()?;
        let mut admin_token = settings.admin_token.clone();
        if admin_token.is_none() && keys.is_empty() && oidc.is_empty() {
            // Nothing could ever authenticate; mint a one-off bootstrap token so a first run works.
            let token = format!("lst_{}", uuid::Uuid::new_v4().simple());
            let data_dir = data_dir(&settings.store.url);
            if hand_out_bootstrap_token(&token, data_dir.as_deref()) {
                admin_token = Some(token);
            }
        }
        let mut auth = Authenticator::new(admin_token.as_deref(), keys);
        if !oidc.is_empty() {
            auth = auth.with_verifier(Arc::new(AccessTokens(oidc.clone())));
        }
        Ok(Identity {
            oidc,
            idp_issuers,
            ssf,
            admins,
            console,
            events,
            auth,
        })
    }
}

/// The verifier of every realm's tokens (and each realm's issuer, for the SSF transmitter): its issuer's, and the global token revocation
/// orders of its `token_revocation_callers` (audience: the endpoint under `public_url`).
fn verifier(
    file: &FileConfig,
    roots: &TrustRoots,
) -> anyhow::Result<(Arc<Verifier>, HashMap<String, String>)> {
    let idps = file
        .realm_policies()?
        .iter()
        .map(|(name, r)| RealmIdp::from_config(name, r).map_err(|e| anyhow::anyhow!("config: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    let issuers = idps
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
    let verifier = Arc::new(
        Verifier::new(idps, roots)
            .context("cannot set up token verification")?
            .with_revocation(
                file.public_url
                    .as_deref()
                    .map(|u| u.trim_end_matches('/').to_owned()),
                revocation,
            ),
    );
    Ok((verifier, issuers))
}

/// The SSF receiver with every realm's `[[realms.NAME.ssf_transmitters]]`.
fn ssf_receiver(file: &FileConfig, roots: &TrustRoots) -> anyhow::Result<Arc<SsfReceiver>> {
    let mut transmitters = Vec::new();
    for (name, r) in file.realm_policies()? {
        transmitters.extend(
            TransmitterSettings::from_config(&name, &r, file.public_url.as_deref())
                .map_err(|e| anyhow::anyhow!("config: {e}"))?,
        );
    }
    Ok(Arc::new(SsfReceiver::new(transmitters, roots).map_err(
        |e| anyhow::anyhow!("cannot set up the SSF receiver: {e}"),
    )?))
}

/// The connector runtime and registry, with the connectors of the directory and the
/// database loaded (or reported as failed).
async fn load_connectors(
    settings: &ServeSettings,
    store: &Store,
    metrics: &Arc<Metrics>,
    signer: Option<Arc<dyn EventSigner>>,
) -> anyhow::Result<(Runtime, Arc<Registry>, Connectors)> {
    if settings.compile_cache.is_none() {
        tracing::info!(
            "no compile cache (no --compile-cache, CACHE_DIRECTORY, XDG_CACHE_HOME or HOME): \
             connectors are compiled at every start"
        );
    }
    let runtime = Runtime::new(settings.compile_cache.clone())
        .context("cannot start the connector runtime")?;
    // Before any connector loads, so every instance (a warm one too) sees it.
    if let Some(signer) = signer {
        runtime.set_signer(signer);
    }
    crate::runtime::check_hook_priority().await;
    let registry = Arc::new(Registry::new());
    let connectors = Connectors::new(
        runtime.clone(),
        registry.clone(),
        store.clone(),
        metrics.clone(),
    );
    let dir = &settings.connectors_dir;
    let n = connectors
        .start(dir.as_deref(), settings.strict_connectors)
        .await
        .with_context(|| match dir {
            Some(d) => format!("cannot load connectors from {}", d.display()),
            None => "cannot load the stored connectors".to_owned(),
        })?;
    tracing::info!(connectors = n, failed = connectors.failed().len(), dir = ?dir, "connectors loaded");
    Ok((runtime, registry, connectors))
}

/// What the background tasks are started with.
struct Tasks<'a> {
    settings: &'a ServeSettings,
    store: &'a Store,
    dispatcher: Dispatcher,
    ssf_transmitter: &'a Arc<SsfTransmitter>,
    sessions: &'a SessionService,
    connectors: &'a Connectors,
    identity: &'a Identity,
    metrics: &'a Metrics,
}

/// `[ssf_transmitter]` and `public_url` as the transmitter's settings.
fn transmitter_settings(
    file: &FileConfig,
    idp_issuers: HashMap<String, String>,
) -> anyhow::Result<TransmitterConfig> {
    use crate::oidc::signing_keys::KeyAlg;
    let c = &file.ssf_transmitter;
    let defaults = TransmitterConfig::default();
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
    Ok(TransmitterConfig {
        public_url: file.public_url.clone(),
        signing_alg,
        rotate_after: days(
            c.rotate_after_days,
            defaults.rotate_after,
            "rotate_after_days",
        )?,
        overlap: days(c.key_overlap_days, defaults.overlap, "key_overlap_days")?,
        idp_issuers,
        configured_keys: configured_keys(&c.keys, signing_alg)?,
        push_allowed_hosts: c
            .push_allowed_hosts
            .iter()
            .map(|h| {
                AllowedHost::parse(h).map_err(|e| {
                    anyhow::anyhow!("config: [ssf_transmitter] push_allowed_hosts: {e}")
                })
            })
            .collect::<anyhow::Result<_>>()?,
    })
}

/// `[[ssf_transmitter.keys]]` read from their files: the first key of each algorithm signs.
fn configured_keys(
    entries: &[crate::config::SsfKeyConfig],
    signing_alg: crate::oidc::signing_keys::KeyAlg,
) -> anyhow::Result<Vec<crate::oidc::signing_keys::SigningKey>> {
    use crate::oidc::signing_keys::SigningKey;
    let mut keys: Vec<SigningKey> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("config: [ssf_transmitter] keys[{i}]");
        let kid = entry.kid.as_str();
        if kid.is_empty() || kid.len() > 128 || !kid.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!("{at}: kid must be 1-128 printable ASCII characters");
        }
        if keys.iter().any(|k| k.kid == kid) {
            anyhow::bail!("{at}: kid {kid:?} is listed twice");
        }
        let pem = std::fs::read_to_string(&entry.file)
            .with_context(|| format!("{at}: cannot read {}", entry.file.display()))?;
        let mut key = SigningKey::from_pem(kid.to_owned(), &pem)
            .with_context(|| format!("{at}: {}", entry.file.display()))?;
        if keys.iter().any(|k| k.alg == key.alg) {
            // Published for the receivers that still hold SETs it signed; never signs.
            key.retired_at = Some(0);
        }
        keys.push(key);
    }
    if !keys.is_empty() && !keys.iter().any(|k| k.alg == signing_alg) {
        anyhow::bail!(
            "config: [ssf_transmitter] keys has no {} key, the signing_alg",
            signing_alg.as_str()
        );
    }
    Ok(keys)
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
    /// Starts the tasks beside the API: the connectors directory's watcher and the cluster
    /// sync, the dispatcher, the expiry and audit sweepers, the reconcilers of the realms
    /// with an interval, and the SSF receiver's streams.
    fn spawn(t: Tasks<'_>) -> Self {
        let (stop, stopping) = watch::channel(false);
        let watcher = t
            .settings
            .connectors_dir
            .clone()
            .map(|dir| lifecycle::spawn_watcher(t.connectors.clone(), dir, stopping.clone()));
        let cluster_sync = lifecycle::spawn_cluster_sync(t.connectors.clone(), stopping.clone());
        if t.ssf_transmitter.is_on() {
            // Not held: its signing-key rotation has nothing a shutdown must finish.
            tokio::spawn(t.ssf_transmitter.clone().run(stopping.clone()));
        }
        let dispatcher = tokio::spawn(t.dispatcher.run(stopping.clone()));
        let sweeper = tokio::spawn(expiry::run(
            t.sessions.clone(),
            ExpiryConfig::default(),
            stopping,
        ));
        let reconciling = t
            .identity
            .admins
            .iter()
            .filter_map(|admin| {
                let interval = admin.settings().interval?;
                let r = Reconciler::new(t.sessions.clone(), admin.clone())
                    .with_metrics(t.metrics.reconcile(&admin.settings().realm));
                Some(tokio::spawn(reconcile::run(r, interval, stop.subscribe())))
            })
            .collect();
        let retention = RetentionConfig {
            retention_days: t.settings.audit_retention_days,
            ..RetentionConfig::default()
        };
        let audit_sweeper = tokio::spawn(audit::run(t.store.clone(), retention, stop.subscribe()));
        let ssf = &t.identity.ssf;
        let ssf_streams = (!ssf.is_empty()).then(|| {
            tokio::spawn(ssf.clone().run(
                t.identity.oidc.clone(),
                t.sessions.clone(),
                stop.subscribe(),
            ))
        });
        Background {
            stop,
            dispatcher,
            sweeper,
            audit_sweeper,
            reconciling,
            ssf_streams,
            watcher,
            cluster_sync,
        }
    }

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
