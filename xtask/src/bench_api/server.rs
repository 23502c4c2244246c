//! Runs `lockstep serve` as a child process on an ephemeral port (`testkit::Lockstep`), its
//! stdout and stderr appended to a log. The child is killed when the handle is dropped,
//! whatever happens to the benchmark.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

pub(crate) use testkit::server::{open_log, tail};

const STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Server {
    process: testkit::Lockstep,
    pub addr: SocketAddr,
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
        let mut launch = testkit::Launch::new(bin, database_url)
            .env("LOCKSTEP_ADMIN_TOKEN", token)
            // The harnesses measure the server, not its per-caller rate limit (one token
            // sends everything); an older server binary ignores the variable.
            .env("LOCKSTEP_REQUESTS_PER_SECOND", "0");
        launch.durability = durability.to_owned();
        launch
            .args
            .extend(extra_args.iter().map(|a| a.to_os_string()));
        launch.log = Some(log.to_owned());
        let process = launch
            .start()
            .await
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Server {
            addr: process.addr,
            process,
        })
    }

    /// The server's process id, while it runs (for reading `/proc/<pid>/`).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Kills the server with SIGKILL (a crash: no shutdown code runs) and waits until the
    /// process is gone, so a restart never overlaps it.
    pub async fn kill(self) -> Result<()> {
        self.process.kill().await.context("killing the server")
    }

    /// Stops the server with SIGTERM (graceful shutdown), falling back to SIGKILL.
    /// Returns a note when the exit was not clean, for the report.
    pub async fn stop(self) -> Result<Option<String>> {
        let log = self
            .process
            .log()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match self.process.terminate(STOP_TIMEOUT).await {
            Ok(status) if status.success() => Ok(None),
            Ok(status) => Ok(Some(format!(
                "server exited with {status} after SIGTERM (log {log})"
            ))),
            Err(testkit::Error::StopTimeout(timeout)) => Ok(Some(format!(
                "server did not exit within {timeout:?} of SIGTERM; killed"
            ))),
            Err(testkit::Error::Gone) => {
                Ok(Some("server had already exited before stop".to_owned()))
            }
            Err(e) => Err(e).context("stopping the server"),
        }
    }

    /// [`stop`](Self::stop) after a measurement, whichever way it went: the server is
    /// stopped before the measurement's error is passed on, so an error never leaves it to be
    /// killed uncleanly. Gives back what was measured and the note of an unclean stop.
    pub async fn stop_after<T>(self, measured: Result<T>) -> Result<(T, Option<String>)> {
        let stopped = self.stop().await;
        Ok((measured?, stopped?))
    }
}
