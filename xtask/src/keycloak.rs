//! `cargo xtask keycloak start|stop|kill|status|url|ca-file`: one real Keycloak for a test
//! run, the Quarkus distribution from Maven Central in dev mode, on `127.0.0.1:18180`, with the
//! realms of `tests/keycloak/*.json` imported at start-up. Its database is `lockstep_keycloak` in the
//! test PostgreSQL cluster (`LOCKSTEP_TEST_DATABASE_URL`, else the `scripts/pg.sh` default
//! on 127.0.0.1:55432), created here; so what Keycloak commits survives a SIGKILL, as it
//! would in production. Metrics (`--metrics-enabled`) are served on `127.0.0.1:18190`, a
//! file vault lives in `target/keycloak/vault/`, and the event extension signs with
//! [`EVENTS_SECRET`] unless the vault holds a realm's own.
//!
//! The same server also answers HTTPS on `127.0.0.1:18443`, with a certificate for
//! `127.0.0.1` and `localhost` issued by a test CA that every fresh `start` makes anew
//! (`target/keycloak/tls/`: `ca.pem`, `server.pem`, `server-key.pem`; `keycloak ca-file`
//! prints the CA's path, `keycloak url --https` the base URL). Keycloak derives its issuer
//! from the request, so tokens fetched over HTTPS carry the `https://` issuer: one server for
//! the plain-HTTP tests and those of Lockstep's TLS to the IdP.
//!
//! The server runs detached in its own process group so this command can exit; its pid is
//! kept in `target/keycloak/keycloak.pid` and its output in `target/keycloak/keycloak.log`.
//! `start` reuses a server that is already running and answering; `stop` ends the whole
//! process group (`kc.sh` and its JVM); `kill` ends it with SIGKILL at once, as a crash
//! would (tests of what survives one use it, then `start --no-build`).
//!
//! Before a start it builds the Lockstep event listener (`keycloak-extension/`, Maven) and
//! copies the jar into the distribution's `providers/`; `start-dev` re-augments the server
//! when that jar changed. A server that is reused keeps the jar it was started with.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::{target_dir, workspace_root};

/// Keycloak release to run: 26.7 carries the experimental SSF transmitter (`--features=ssf`)
/// the SSF receiver's tests use. It needs a JDK of at least [`MIN_JDK`].
const VERSION: &str = "26.7.3";
/// Least Java release Keycloak [`VERSION`] starts on.
const MIN_JDK: u32 = 21;
/// Where a suitable JDK is looked for when `KEYCLOAK_JAVA_HOME` is not set: the newest first.
const JDK_CANDIDATES: [&str; 4] = [
    "/usr/lib/jvm/temurin-25-jdk-amd64",
    "/usr/lib/jvm/java-25-openjdk-amd64",
    "/usr/lib/jvm/temurin-21-jdk-amd64",
    "/usr/lib/jvm/java-21-openjdk-amd64",
];
/// The loopback push endpoint the SSF tests ask for is plain HTTP, which the transmitter
/// refuses unless told otherwise; `default-subjects=ALL` makes it deliver the events of every
/// user rather than only of users a receiver subscribed; no rate limit on verification.
const SSF_OPTIONS: [&str; 4] = [
    "--spi-ssf-transmitter--default--allow-insecure-push-targets=true",
    "--spi-ssf-transmitter--default--default-subjects=ALL",
    "--spi-ssf-transmitter--default--min-verification-interval-seconds=0",
    "--spi-ssf-transmitter--default--outbox-drainer-interval=1s",
];
const HOST: &str = "127.0.0.1";
const PORT: u16 = 18180;
/// Management interface (`/metrics`) of the test Keycloak.
const MANAGEMENT_PORT: u16 = 18190;
/// HTTPS listener of the same server (certificate of the test CA in `target/keycloak/tls/`).
const HTTPS_PORT: u16 = 18443;
/// Names the server certificate is valid for.
const TLS_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];
/// Database of the test Keycloak in the test PostgreSQL cluster.
const DB_NAME: &str = "lockstep_keycloak";
/// Keycloak's pool in a cluster shared with every PostgreSQL test (`max_connections = 200`).
const DB_POOL_MAX: u32 = 10;
/// Signing secret of the event extension for realms without one in the vault (the
/// provider option `secret`); `host/tests/common/keycloak.rs` has the same value.
const EVENTS_SECRET: &str = "whsec_a2V5Y2xvYWstZXZlbnRzLXRlc3Qtc2VjcmV0LTMyYnl0ZXM=";
/// Realm whose discovery document says the server is up and the test realm imported.
const READY_REALM: &str = "acme";
/// Bound on a (first) start: unpacking Quarkus, H2 schema creation, realm import.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// Time given to a graceful shutdown after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(500);
/// Timeout of each readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The admin user the tests' helpers log in with (master realm, password grant).
const ADMIN_USER: &str = "admin";
const ADMIN_PASSWORD: &str = "admin";
/// JVM heap: the default (512 MiB) is tight for imports on a busy machine; 1 GiB is plenty.
const HEAP: &str = "-Xms256m -Xmx1g";
/// Realm files the tests rely on, copied into the distribution's `data/import/`.
const REALM_DIR: &str = "tests/keycloak";
/// The Lockstep event listener's Maven project, and the jar it builds.
const EXTENSION_POM: &str = "keycloak-extension/pom.xml";
const EXTENSION_JAR: &str = "keycloak-extension/target/lockstep-keycloak-extension.jar";
const EXTENSION_JAR_NAME: &str = "lockstep-keycloak-extension.jar";

/// Options of `cargo xtask keycloak`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand, Debug)]
enum Action {
    /// Download (Maven) and unpack Keycloak if needed, create its PostgreSQL database, import
    /// tests/keycloak/*.json, make a new test CA and HTTPS certificate (target/keycloak/tls/)
    /// and start it in the background; waits until the `acme` realm answers over HTTP and
    /// HTTPS. Reuses a running one.
    Start {
        /// Keep the event extension already in providers/ instead of building it (a restart).
        #[arg(long)]
        no_build: bool,
    },
    /// Stop the Keycloak started by `start` (SIGTERM to its process group, SIGKILL after 20 s).
    Stop,
    /// SIGKILL the Keycloak started by `start` at once, as a crash would end it.
    Kill,
    /// Exit 0 when the Keycloak started by `start` is running and answering.
    Status,
    /// Print the base URL of the test Keycloak.
    Url {
        /// The HTTPS listener's URL (its certificate chains to `keycloak ca-file`).
        #[arg(long)]
        https: bool,
    },
    /// Print the path of the test CA's certificate (PEM) that the HTTPS listener's chains to.
    CaFile,
}

pub fn main(args: Args) -> Result<ExitCode> {
    let paths = Paths::new()?;
    match args.action {
        Action::Start { no_build } => start(&paths, !no_build).map(|()| ExitCode::SUCCESS),
        Action::Stop => stop(&paths).map(|()| ExitCode::SUCCESS),
        Action::Kill => kill(&paths).map(|()| ExitCode::SUCCESS),
        Action::Status => status(&paths),
        Action::Url { https } => {
            println!("{}", if https { https_url() } else { base_url() });
            Ok(ExitCode::SUCCESS)
        }
        Action::CaFile => {
            println!("{}", paths.tls.ca.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn base_url() -> String {
    format!("http://{HOST}:{PORT}")
}

fn https_url() -> String {
    format!("https://{HOST}:{HTTPS_PORT}")
}

fn ready_url() -> String {
    discovery_url(&base_url())
}

fn discovery_url(base: &str) -> String {
    format!("{base}/realms/{READY_REALM}/.well-known/openid-configuration")
}

struct Paths {
    root: PathBuf,
    /// `target/keycloak/`: the unpacked distribution, the log and the pid file.
    dir: PathBuf,
    /// `target/keycloak/keycloak-<version>/`.
    home: PathBuf,
    log: PathBuf,
    pid: PathBuf,
    /// `target/keycloak/vault/`: the file vault (`<realm>_<key>`, one secret per file).
    vault: PathBuf,
    /// `target/keycloak/tls/`: the test CA and the HTTPS listener's certificate and key.
    tls: TlsFiles,
}

/// PEM files of the HTTPS listener, made by [`TlsFiles::generate`].
struct TlsFiles {
    dir: PathBuf,
    /// The test CA's certificate: what a client adds to its roots (`--tls-ca-file`).
    ca: PathBuf,
    /// The server certificate (`--https-certificate-file`).
    cert: PathBuf,
    /// Its private key, PKCS #8 (`--https-certificate-key-file`).
    key: PathBuf,
}

impl Paths {
    fn new() -> Result<Paths> {
        let root = workspace_root()?;
        let dir = target_dir(&root).join("keycloak");
        let tls = dir.join("tls");
        Ok(Paths {
            home: dir.join(format!("keycloak-{VERSION}")),
            log: dir.join("keycloak.log"),
            pid: dir.join("keycloak.pid"),
            vault: dir.join("vault"),
            tls: TlsFiles {
                ca: tls.join("ca.pem"),
                cert: tls.join("server.pem"),
                key: tls.join("server-key.pem"),
                dir: tls,
            },
            root,
            dir,
        })
    }
}

fn start(paths: &Paths, build: bool) -> Result<()> {
    let rt = runtime()?;
    let client = http_client()?;
    if let Some(pid) = read_pid(paths)? {
        if group_alive(pid) {
            if rt.block_on(answers(&client)) {
                println!("Keycloak already running (pid {pid}): {}", base_url());
                warn_without_https(&rt, paths);
                return Ok(());
            }
            // Alive but not answering yet: most likely another `start` is still waiting.
            eprintln!("Keycloak (pid {pid}) is running but not answering yet; waiting for it");
            rt.block_on(wait_ready(&client, None, paths, pid, None))?;
            warn_without_https(&rt, paths);
            return Ok(());
        }
        eprintln!("removing stale pid file (pid {pid} is gone)");
        remove_pid(paths)?;
    }
    if rt.block_on(answers(&client)) {
        bail!(
            "something not started by `cargo xtask keycloak start` (no pid file in {}) already \
             answers on {}; stop it first",
            paths.dir.display(),
            base_url()
        );
    }

    std::fs::create_dir_all(&paths.dir)
        .with_context(|| format!("creating {}", paths.dir.display()))?;
    let archive = distribution()?;
    unpack(&archive, paths)?;
    if build
        || !paths
            .home
            .join("providers")
            .join(EXTENSION_JAR_NAME)
            .is_file()
    {
        install_extension(paths)?;
    }
    let realms_changed = install_realms(paths)?;
    let db = Database::from_env()?;
    rt.block_on(db.prepare(realms_changed))?;
    std::fs::create_dir_all(&paths.vault)
        .with_context(|| format!("creating {}", paths.vault.display()))?;
    paths.tls.generate()?;
    let https_client = paths.tls.client()?;

    let log = open_log(&paths.log)?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("duplicating the handle of {}", paths.log.display()))?;
    let java_home = java_home()?;
    let kc = paths.home.join("bin/kc.sh");
    let mut cmd = Command::new(&kc);
    cmd.current_dir(&paths.home)
        .env("JAVA_HOME", &java_home)
        .args([
            "start-dev",
            "--features=ssf",
            &format!("--http-host={HOST}"),
            &format!("--http-port={PORT}"),
            // --http-host binds this listener too.
            &format!("--https-port={HTTPS_PORT}"),
            &format!("--https-certificate-file={}", paths.tls.cert.display()),
            &format!("--https-certificate-key-file={}", paths.tls.key.display()),
            "--import-realm",
            "--db=postgres",
            &format!("--db-url={}", db.jdbc_url()),
            &format!("--db-username={}", db.user),
            &format!("--db-pool-max-size={DB_POOL_MAX}"),
            "--metrics-enabled=true",
            &format!("--http-management-port={MANAGEMENT_PORT}"),
            // Plain HTTP like the main port's: it would inherit the HTTPS settings otherwise.
            "--http-management-scheme=http",
            "--vault=file",
            &format!("--vault-dir={}", paths.vault.display()),
        ])
        .args(SSF_OPTIONS)
        // Secrets through the environment, not the command line that `ps` shows.
        .env("KC_DB_PASSWORD", db.password.as_deref().unwrap_or(""))
        .env("KC_SPI_EVENTS_LISTENER__LOCKSTEP__SECRET", EVENTS_SECRET)
        .env("KC_BOOTSTRAP_ADMIN_USERNAME", ADMIN_USER)
        .env("KC_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("JAVA_OPTS_KC_HEAP", HEAP)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: it outlives this command, and `stop` can end kc.sh and the
        // JVM it starts together.
        .process_group(0);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", kc.display()))?;
    let pid = child.id();
    std::fs::write(&paths.pid, format!("{pid}\n"))
        .with_context(|| format!("writing {}", paths.pid.display()))?;
    eprintln!(
        "started Keycloak {VERSION} (pid {pid}, log {}); waiting up to {}s for {}",
        paths.log.display(),
        START_TIMEOUT.as_secs(),
        ready_url()
    );
    let ready = rt.block_on(wait_ready(
        &client,
        Some(&https_client),
        paths,
        pid,
        Some(&mut child),
    ));
    if ready.is_err() {
        // Do not leave a half-started server behind.
        kill_group(pid, "-KILL");
        remove_pid(paths)?;
    }
    ready?;
    println!(
        "Keycloak {VERSION} ready in {:.1}s: {} and {} (CA {})",
        started.elapsed().as_secs_f64(),
        base_url(),
        https_url(),
        paths.tls.ca.display()
    );
    Ok(())
}

/// A reused server started without the HTTPS listener (by an older `start`) fails the tests
/// of TLS to the IdP; say so where the restart is decided.
fn warn_without_https(rt: &tokio::runtime::Runtime, paths: &Paths) {
    let https = paths.tls.client().ok();
    if !rt.block_on(answers_https(https.as_ref())) {
        eprintln!(
            "warning: the running Keycloak does not answer {} with a certificate of {}; the \
             HTTPS tests need `cargo xtask keycloak stop` and `start` again",
            https_url(),
            paths.tls.ca.display()
        );
    }
}

/// Polls the readiness URL (and with `https` the HTTPS listener's) until it answers 200, the
/// process dies, or [`START_TIMEOUT`].
async fn wait_ready(
    client: &reqwest::Client,
    https: Option<&reqwest::Client>,
    paths: &Paths,
    pid: u32,
    mut child: Option<&mut std::process::Child>,
) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if answers(client).await && (https.is_none() || answers_https(https).await) {
            return Ok(());
        }
        let exited = match child.as_mut() {
            Some(c) => c.try_wait().context("checking the Keycloak process")?,
            None => None,
        };
        if let Some(status) = exited {
            bail!(
                "Keycloak exited ({status}) before it was ready; last lines of {}:\n{}",
                paths.log.display(),
                tail(&paths.log)
            );
        }
        if child.is_none() && !group_alive(pid) {
            bail!(
                "Keycloak (pid {pid}) exited before it was ready; last lines of {}:\n{}",
                paths.log.display(),
                tail(&paths.log)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "Keycloak did not answer {} within {}s; last lines of {}:\n{}",
                ready_url(),
                START_TIMEOUT.as_secs(),
                paths.log.display(),
                tail(&paths.log)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn stop(paths: &Paths) -> Result<()> {
    let Some(pid) = read_pid(paths)? else {
        eprintln!(
            "no Keycloak pid file ({}); nothing to stop",
            paths.pid.display()
        );
        return Ok(());
    };
    if !group_alive(pid) {
        eprintln!("Keycloak (pid {pid}) is not running");
        return remove_pid(paths);
    }
    eprintln!("stopping Keycloak (process group {pid})");
    kill_group(pid, "-TERM");
    if !group_gone_within(pid, STOP_GRACE, Duration::from_millis(200)) {
        eprintln!(
            "Keycloak did not stop within {}s of SIGTERM; sending SIGKILL",
            STOP_GRACE.as_secs()
        );
        kill_group(pid, "-KILL");
        if !group_gone_within(pid, Duration::from_secs(5), Duration::from_millis(100)) {
            bail!("Keycloak process group {pid} survived SIGKILL");
        }
    }
    remove_pid(paths)
}

/// SIGKILL to the whole process group, no grace: what a crash or an OOM kill does.
fn kill(paths: &Paths) -> Result<()> {
    let Some(pid) = read_pid(paths)? else {
        bail!(
            "no Keycloak pid file ({}); nothing to kill",
            paths.pid.display()
        );
    };
    eprintln!("killing Keycloak (process group {pid}) with SIGKILL");
    kill_group(pid, "-KILL");
    if !group_gone_within(pid, Duration::from_secs(10), Duration::from_millis(50)) {
        bail!("Keycloak process group {pid} survived SIGKILL");
    }
    remove_pid(paths)
}

/// Where the test Keycloak keeps its data: a database of the test PostgreSQL cluster.
struct Database {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    /// The URL Lockstep's tests use (its database is only the maintenance connection).
    admin_url: String,
}

impl Database {
    /// `LOCKSTEP_TEST_DATABASE_URL` (what `scripts/test.sh` exports), else the cluster of
    /// `scripts/pg.sh` on `PGPORT` (55432).
    fn from_env() -> Result<Database> {
        let admin_url = match std::env::var("LOCKSTEP_TEST_DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
            _ => format!(
                "postgres://postgres@127.0.0.1:{}/postgres",
                std::env::var("PGPORT").unwrap_or_else(|_| "55432".into())
            ),
        };
        let url = reqwest::Url::parse(&admin_url)
            .with_context(|| format!("LOCKSTEP_TEST_DATABASE_URL is not a URL: {admin_url}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            bail!("the test Keycloak needs a PostgreSQL URL, got {admin_url}");
        }
        Ok(Database {
            host: url.host_str().unwrap_or("127.0.0.1").to_owned(),
            port: url.port().unwrap_or(5432),
            user: if url.username().is_empty() {
                "postgres".to_owned()
            } else {
                url.username().to_owned()
            },
            password: url.password().map(str::to_owned),
            admin_url,
        })
    }

    fn jdbc_url(&self) -> String {
        format!("jdbc:postgresql://{}:{}/{DB_NAME}", self.host, self.port)
    }

    /// Creates the database if missing; `fresh` drops it first, so changed realm files are
    /// imported again (Keycloak skips realms that already exist).
    async fn prepare(&self, fresh: bool) -> Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .with_context(|| {
                format!(
                    "connecting to PostgreSQL for the test Keycloak's database ({}:{}); start \
                     it with `bash scripts/pg.sh start` or set LOCKSTEP_TEST_DATABASE_URL",
                    self.host, self.port
                )
            })?;
        if fresh {
            eprintln!("realm files changed since the last import; recreating database {DB_NAME}");
            sqlx::query(&format!("DROP DATABASE IF EXISTS {DB_NAME}"))
                .execute(&mut conn)
                .await
                .with_context(|| format!("dropping database {DB_NAME}"))?;
        }
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(DB_NAME)
                .fetch_optional(&mut conn)
                .await
                .context("looking up the Keycloak database")?;
        if exists.is_none() {
            sqlx::query(&format!("CREATE DATABASE {DB_NAME}"))
                .execute(&mut conn)
                .await
                .with_context(|| format!("creating database {DB_NAME}"))?;
        }
        conn.close()
            .await
            .context("closing the PostgreSQL connection")
    }
}

fn status(paths: &Paths) -> Result<ExitCode> {
    let Some(pid) = read_pid(paths)? else {
        eprintln!("Keycloak not running (no pid file)");
        return Ok(ExitCode::FAILURE);
    };
    if !group_alive(pid) {
        eprintln!("Keycloak not running (pid {pid} is gone)");
        return Ok(ExitCode::FAILURE);
    }
    let client = http_client()?;
    let rt = runtime()?;
    if rt.block_on(answers(&client)) {
        eprintln!("Keycloak running (pid {pid}): {}", base_url());
        warn_without_https(&rt, paths);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "Keycloak process {pid} is alive but {} does not answer",
            ready_url()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// The distribution archive in the local Maven repository, fetched with Maven if missing.
/// The JDK Keycloak runs on: `KEYCLOAK_JAVA_HOME` when set, else the first of
/// [`JDK_CANDIDATES`] present; its `release` file must name Java [`MIN_JDK`] or later.
/// Maven (the extension's build) keeps the default JDK.
fn java_home() -> Result<PathBuf> {
    let explicit = std::env::var_os("KEYCLOAK_JAVA_HOME").map(PathBuf::from);
    let candidates: Vec<PathBuf> = match &explicit {
        Some(home) => vec![home.clone()],
        None => JDK_CANDIDATES.iter().map(PathBuf::from).collect(),
    };
    for home in &candidates {
        if !home.join("bin/java").is_file() {
            continue;
        }
        match jdk_release(home) {
            Some(v) if v >= MIN_JDK => return Ok(home.clone()),
            found => eprintln!(
                "{} is Java {}, Keycloak {VERSION} needs {MIN_JDK} or later",
                home.display(),
                found.map_or_else(|| "of unknown release".to_owned(), |v| v.to_string())
            ),
        }
    }
    bail!(
        "no JDK {MIN_JDK} or later for Keycloak {VERSION}: looked at {}; install one (e.g. \
         `apt-get install openjdk-21-jdk-headless`) or set KEYCLOAK_JAVA_HOME",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The feature release of a JDK from its `release` file (`JAVA_VERSION="25.0.1"` → 25).
fn jdk_release(home: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(home.join("release")).ok()?;
    let line = text.lines().find(|l| l.starts_with("JAVA_VERSION="))?;
    let version = line.trim_start_matches("JAVA_VERSION=").trim_matches('"');
    let major = version.split(['.', '-', '+']).next()?;
    // Java 8 and older spelled themselves 1.x.
    match major.parse::<u32>().ok()? {
        1 => version.split('.').nth(1)?.parse().ok(),
        n => Some(n),
    }
}

fn distribution() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set (needed for ~/.m2)")?;
    let archive = PathBuf::from(home).join(format!(
        ".m2/repository/org/keycloak/keycloak-quarkus-dist/{VERSION}/keycloak-quarkus-dist-{VERSION}.tar.gz"
    ));
    if archive.is_file() {
        return Ok(archive);
    }
    eprintln!("fetching org.keycloak:keycloak-quarkus-dist:{VERSION}:tar.gz with Maven");
    let status = Command::new("mvn")
        .args([
            "-q",
            "-B",
            "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:get",
            &format!("-Dartifact=org.keycloak:keycloak-quarkus-dist:{VERSION}:tar.gz"),
            "-Dtransitive=false",
        ])
        .status()
        .context("running mvn (is Maven installed?)")?;
    if !status.success() {
        bail!("mvn dependency:get of keycloak-quarkus-dist {VERSION} failed: {status}");
    }
    if !archive.is_file() {
        bail!("Maven succeeded but {} is missing", archive.display());
    }
    Ok(archive)
}

/// Unpacks the archive into `target/keycloak/` unless already there; through a temporary
/// directory so an interrupted run never leaves a half-unpacked distribution in place.
fn unpack(archive: &Path, paths: &Paths) -> Result<()> {
    if paths.home.join("bin/kc.sh").is_file() {
        return Ok(());
    }
    let tmp = paths.dir.join(".unpacking");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    eprintln!(
        "unpacking {} into {}",
        archive.display(),
        paths.dir.display()
    );
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(&tmp)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar -xzf {} failed: {status}", archive.display());
    }
    let unpacked = tmp.join(format!("keycloak-{VERSION}"));
    if !unpacked.join("bin/kc.sh").is_file() {
        bail!("{} has no bin/kc.sh", unpacked.display());
    }
    if paths.home.exists() {
        // A distribution without kc.sh: a leftover of something else; replace it.
        std::fs::remove_dir_all(&paths.home)
            .with_context(|| format!("removing {}", paths.home.display()))?;
    }
    std::fs::rename(&unpacked, &paths.home)
        .with_context(|| format!("moving {} to {}", unpacked.display(), paths.home.display()))?;
    std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))
}

/// Builds the Lockstep event listener with Maven and copies the jar into `providers/` (only
/// when its bytes changed, so an unchanged jar does not make Keycloak re-augment).
fn install_extension(paths: &Paths) -> Result<()> {
    let pom = paths.root.join(EXTENSION_POM);
    install_model_jpa(paths)?;
    eprintln!("building the Lockstep event listener ({})", pom.display());
    let status = Command::new("mvn")
        .args(["-q", "-B", "-Dstyle.color=never", "-f"])
        .arg(&pom)
        .arg("package")
        .status()
        .context("running mvn to build keycloak-extension (is Maven installed?)")?;
    if !status.success() {
        bail!(
            "building the Lockstep Keycloak extension failed ({status}): `mvn -q -B -f {} package`; \
             Keycloak was not started",
            pom.display()
        );
    }
    let jar = paths.root.join(EXTENSION_JAR);
    let bytes = std::fs::read(&jar)
        .with_context(|| format!("Maven succeeded but {} is unreadable", jar.display()))?;
    let providers = paths.home.join("providers");
    std::fs::create_dir_all(&providers)
        .with_context(|| format!("creating {}", providers.display()))?;
    let name = jar
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", jar.display()))?;
    let to = providers.join(name);
    if std::fs::read(&to).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::write(&to, &bytes).with_context(|| format!("writing {}", to.display()))?;
        eprintln!("installed {}", to.display());
    }
    Ok(())
}

/// Puts the distribution's `keycloak-model-jpa` jar (the extension compiles against its JPA
/// entity provider SPI) into the local Maven repository with a pom of its own: the one on
/// Maven Central for 26.7.3 names a parent, `keycloak-model-pom` 26.7.3, that Central does
/// not have, so Maven cannot resolve the artifact from there.
fn install_model_jpa(paths: &Paths) -> Result<()> {
    let jar = paths.home.join(format!(
        "lib/lib/main/org.keycloak.keycloak-model-jpa-{VERSION}.jar"
    ));
    if !jar.is_file() {
        bail!("{} is missing from the distribution", jar.display());
    }
    let status = Command::new("mvn")
        .args([
            "-q",
            "-B",
            "-Dstyle.color=never",
            "org.apache.maven.plugins:maven-install-plugin:3.1.2:install-file",
        ])
        .arg(format!("-Dfile={}", jar.display()))
        .args([
            "-DgroupId=org.keycloak",
            "-DartifactId=keycloak-model-jpa",
            &format!("-Dversion={VERSION}"),
            "-Dpackaging=jar",
            "-DgeneratePom=true",
        ])
        .status()
        .context("running mvn install:install-file (is Maven installed?)")?;
    if !status.success() {
        bail!(
            "installing {} into the local Maven repository failed ({status})",
            jar.display()
        );
    }
    Ok(())
}

/// Copies `tests/keycloak/*.json` into `data/import/`; true when they changed since the last
/// import (Keycloak skips the import of a realm that already exists, so the caller starts
/// from an empty database then).
fn install_realms(paths: &Paths) -> Result<bool> {
    let source = paths.root.join(REALM_DIR);
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(&source).with_context(|| format!("reading {}", source.display()))?
    {
        let path = entry
            .with_context(|| format!("reading {}", source.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "json") && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        bail!("no realm files (*.json) in {}", source.display());
    }
    let import = paths.home.join("data/import");
    std::fs::create_dir_all(&import).with_context(|| format!("creating {}", import.display()))?;
    let mut changed = false;
    for path in &files {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
        let to = import.join(name);
        let new = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if std::fs::read(&to).ok().as_deref() != Some(new.as_slice()) {
            changed = true;
            std::fs::write(&to, &new).with_context(|| format!("writing {}", to.display()))?;
        }
    }
    // Realm files removed from the repository must not be imported any more either.
    for entry in
        std::fs::read_dir(&import).with_context(|| format!("reading {}", import.display()))?
    {
        let path = entry
            .with_context(|| format!("reading {}", import.display()))?
            .path();
        if !files.iter().any(|f| f.file_name() == path.file_name()) {
            changed = true;
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(changed)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the Tokio runtime")
}

fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .no_proxy()
        .build()
        .context("building the HTTP client")
}

/// True when the `acme` realm's discovery document answers 200.
async fn answers(client: &reqwest::Client) -> bool {
    client
        .get(ready_url())
        .send()
        .await
        .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
}

/// True when the same document answers 200 over HTTPS to a client that trusts only the test
/// CA (`None`: no such client, so no).
async fn answers_https(client: Option<&reqwest::Client>) -> bool {
    let Some(client) = client else {
        return false;
    };
    client
        .get(discovery_url(&https_url()))
        .send()
        .await
        .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
}

impl TlsFiles {
    /// Makes a new test CA and, signed by it, a server certificate for [`TLS_NAMES`]; writes
    /// both certificates and the server's key (mode 0600), replacing older ones. The CA's own
    /// key is never written: nothing else is ever signed by it.
    fn generate(&self) -> Result<()> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).context("parameters of the test CA")?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Lockstep test Keycloak CA");
        let ca_key = KeyPair::generate().context("generating the test CA's key")?;
        let ca =
            CertifiedIssuer::self_signed(ca_params, ca_key).context("self-signing the test CA")?;

        let names: Vec<String> = TLS_NAMES.iter().map(|n| (*n).to_owned()).collect();
        let mut params =
            CertificateParams::new(names).context("parameters of the server certificate")?;
        params
            .distinguished_name
            .push(DnType::CommonName, TLS_NAMES[0]);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating the server key")?;
        let cert = params
            .signed_by(&key, &ca)
            .context("signing the server certificate")?;

        write_file(&self.ca, ca.pem().as_bytes(), 0o644)?;
        write_file(&self.cert, cert.pem().as_bytes(), 0o644)?;
        write_file(&self.key, key.serialize_pem().as_bytes(), 0o600)
    }

    /// An HTTP client that trusts only the test CA.
    fn client(&self) -> Result<reqwest::Client> {
        let pem =
            std::fs::read(&self.ca).with_context(|| format!("reading {}", self.ca.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", self.ca.display()))?;
        reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .context("building the HTTPS client")
    }
}

/// Replaces `path` with `bytes`, created with `mode` (a new file, so an older one's mode
/// does not carry over).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()));
        }
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn read_pid(paths: &Paths) -> Result<Option<u32>> {
    match std::fs::read_to_string(&paths.pid) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .map(Some)
            .with_context(|| format!("{} holds no pid: {text:?}", paths.pid.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", paths.pid.display())),
    }
}

fn remove_pid(paths: &Paths) -> Result<()> {
    match std::fs::remove_file(&paths.pid) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", paths.pid.display()))
        }
        _ => Ok(()),
    }
}

/// True while any process of the group led by `pid` exists (`kill -0 -- -pid`).
fn group_alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits up to `within`, looking every `poll`, for the process group led by `pid` to be gone;
/// whether it is.
fn group_gone_within(pid: u32, within: Duration, poll: Duration) -> bool {
    let deadline = Instant::now() + within;
    while group_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(poll);
    }
    !group_alive(pid)
}

/// Sends `signal` (`-TERM`, `-KILL`) to the process group led by `pid`; failures (the group
/// is already gone) are for the caller's liveness check to notice.
fn kill_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Last lines of the Keycloak log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
