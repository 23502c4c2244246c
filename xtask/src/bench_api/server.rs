//! Runs `lockstep serve` as a child process on an ephemeral port. The child is killed when the
//! handle is dropped, whatever happens to the benchmark.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Readiness line printed by `lockstep serve` on stdout.
const READY_PREFIX: &str = "listening on ";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    drain: JoinHandle<()>,
}

impl Server {
    /// Starts the server and waits (bounded) for its readiness line. `extra_args` are
    /// further `serve` flags (say, a connectors directory).
    pub async fn start(
        bin: &Path,
        database_url: &str,
        durability: &str,
        token: &str,
        extra_args: &[&OsStr],
        log: &Path,
    ) -> Result<Server> {
        let stderr = open_log(log)?;
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
            .arg(database_url)
            .args(["--durability", durability])
            .args(extra_args)
            .env("LOCKSTEP_ADMIN_TOKEN", token)
            // The harnesses measure the server, not its per-caller rate limit (one token
            // sends everything); an older server binary ignores the variable.
            .env("LOCKSTEP_REQUESTS_PER_SECOND", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the server's stdout was not captured"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut out = open_log(log)?;
        let waited = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                writeln!(out, "{line}")?;
                if let Some(rest) = line.trim().strip_prefix(READY_PREFIX) {
                    let addr: SocketAddr = rest
                        .trim()
                        .parse()
                        .with_context(|| format!("unparsable readiness line {line:?}"))?;
                    return Ok(Some(addr));
                }
            }
            anyhow::Ok(None)
        })
        .await;
        let addr = match waited {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => {
                let status = child.wait().await.ok();
                bail!(
                    "the server exited ({status:?}) before printing `{READY_PREFIX}ADDR`; log {}:\n{}",
                    log.display(),
                    tail(log)
                );
            }
            Ok(Err(e)) => return Err(e.context("reading the server's stdout")),
            Err(_) => bail!(
                "the server printed no `{READY_PREFIX}ADDR` within {START_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                tail(log)
            ),
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        let drain = tokio::spawn(drain(lines, out));
        Ok(Server {
            child,
            addr,
            log: log.to_owned(),
            drain,
        })
    }

    /// The server's process id, while it runs (for reading `/proc/<pid>/`).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the server with SIGKILL (a crash: no shutdown code runs) and waits until the
    /// process is gone, so a restart never overlaps it.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("killing the server")?;
        self.drain.abort();
        Ok(())
    }

    /// Stops the server with SIGTERM (graceful shutdown), falling back to SIGKILL.
    /// Returns a note when the exit was not clean, for the report.
    pub async fn stop(mut self) -> Result<Option<String>> {
        let note = match self.child.id() {
            Some(pid) => {
                let sent = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .context("running kill -TERM")?;
                if !sent.success() {
                    bail!("kill -TERM {pid} failed: {sent}");
                }
                match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
                    Ok(status) => {
                        let status = status.context("waiting for the server")?;
                        (!status.success()).then(|| {
                            format!(
                                "server exited with {status} after SIGTERM (log {})",
                                self.log.display()
                            )
                        })
                    }
                    Err(_) => {
                        self.child.kill().await.context("killing the server")?;
                        Some(format!(
                            "server did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed"
                        ))
                    }
                }
            }
            None => Some("server had already exited before stop".to_owned()),
        };
        self.drain.abort();
        Ok(note)
    }
}

async fn drain(mut lines: tokio::io::Lines<BufReader<ChildStdout>>, mut out: File) {
    while let Ok(Some(line)) = lines.next_line().await {
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
}

pub(crate) fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Last lines of the server log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
