//! `lockstep serve` as a child process: started with the caller's flags and environment,
//! ready once it prints `listening on ADDR` (bounded), killed when the handle is dropped.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

use crate::Error;

/// The line `lockstep serve` prints on stdout once it accepts connections.
pub const READY_PREFIX: &str = "listening on ";

/// How to start one `lockstep serve`.
#[derive(Clone, Debug)]
pub struct Launch {
    pub bin: PathBuf,
    pub database_url: String,
    /// `--listen`; a restart on the same address keeps what points at the server valid.
    pub listen: String,
    pub durability: String,
    /// Further `serve` flags, after the ones above.
    pub args: Vec<OsString>,
    /// Variables removed from the inherited environment (before `env` is applied).
    pub env_remove: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    /// Where stdout and stderr go, appended; `None`: stderr is inherited and stdout read
    /// and dropped.
    pub log: Option<PathBuf>,
    pub start_timeout: Duration,
}

impl Launch {
    /// `serve --listen 127.0.0.1:0 --database-url URL --durability normal`, 30 s to start.
    pub fn new(bin: impl Into<PathBuf>, database_url: impl Into<String>) -> Launch {
        Launch {
            bin: bin.into(),
            database_url: database_url.into(),
            listen: "127.0.0.1:0".to_owned(),
            durability: "normal".to_owned(),
            args: Vec::new(),
            env_remove: Vec::new(),
            env: Vec::new(),
            log: None,
            start_timeout: Duration::from_secs(30),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Launch {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn env_remove(mut self, key: impl Into<OsString>) -> Launch {
        self.env_remove.push(key.into());
        self
    }

    /// Starts the process and waits for its readiness line.
    pub async fn start(self) -> Result<Lockstep, Error> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(&self.listen)
            .arg("--database-url")
            .arg(&self.database_url)
            .arg("--durability")
            .arg(&self.durability)
            .args(&self.args);
        for key in &self.env_remove {
            cmd.env_remove(key);
        }
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        let stderr = match &self.log {
            Some(path) => Stdio::from(open_log(path)?),
            None => Stdio::inherit(),
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        let stdout = child.stdout.take().ok_or(Error::Gone)?;
        let mut lines = BufReader::new(stdout).lines();
        let mut copy = self.log.as_deref().map(open_log).transpose()?;
        let ready = tokio::time::timeout(self.start_timeout, async {
            while let Some(line) = lines.next_line().await.map_err(Error::Stdout)? {
                if let Some(out) = copy.as_mut() {
                    // The log is for reading afterwards; a failed write loses a line of it.
                    let _ = writeln!(out, "{line}");
                }
                if let Some(rest) = line.trim().strip_prefix(READY_PREFIX) {
                    return rest
                        .trim()
                        .parse::<SocketAddr>()
                        .map(Some)
                        .map_err(|_| Error::ReadyLine(line.clone()));
                }
            }
            Ok(None)
        })
        .await;
        let addr = match ready {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => {
                let status = child.wait().await.map_err(Error::Wait)?;
                return Err(Error::ExitedEarly {
                    status: status.to_string(),
                    log: log_tail(self.log.as_deref()),
                });
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::NotReady {
                    timeout: self.start_timeout,
                    log: log_tail(self.log.as_deref()),
                });
            }
        };
        // Keep reading stdout so the server never blocks on a full pipe.
        let drain = tokio::spawn(drain(lines, copy));
        Ok(Lockstep {
            child,
            addr,
            log: self.log,
            drain,
        })
    }
}

/// A running `lockstep serve`; SIGKILLed when dropped.
pub struct Lockstep {
    child: Child,
    pub addr: SocketAddr,
    log: Option<PathBuf>,
    drain: JoinHandle<()>,
}

impl Lockstep {
    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id while it runs (for `/proc/<pid>/` readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The log given at launch, if any.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// SIGKILL (a crash: no shutdown code runs), then waits until the process is gone, so a
    /// restart never overlaps it.
    pub async fn kill(mut self) -> Result<(), Error> {
        self.drain.abort();
        self.child.kill().await.map_err(Error::Wait)
    }

    /// SIGTERM (the graceful shutdown an orchestrator asks for), then waits up to `timeout`
    /// for the exit status; past it the process is killed and [`Error::StopTimeout`] returned.
    pub async fn terminate(mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let pid = self.child.id().ok_or(Error::Gone)?;
        // `kill(1)` rather than `kill(2)`: the workspace forbids unsafe code.
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .map_err(|e| Error::Signal {
                pid,
                detail: e.to_string(),
            })?;
        if !sent.success() {
            return Err(Error::Signal {
                pid,
                detail: format!("kill exited with {sent}"),
            });
        }
        let waited = tokio::time::timeout(timeout, self.child.wait()).await;
        self.drain.abort();
        match waited {
            Ok(status) => status.map_err(Error::Wait),
            Err(_) => {
                self.child.kill().await.map_err(Error::Wait)?;
                Err(Error::StopTimeout(timeout))
            }
        }
    }
}

async fn drain(mut lines: Lines<BufReader<ChildStdout>>, mut copy: Option<File>) {
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(out) = copy.as_mut()
            && writeln!(out, "{line}").is_err()
        {
            copy = None;
        }
    }
}

/// Opens `path` for appending, creating it.
pub fn open_log(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::Log {
            path: path.to_owned(),
            source,
        })
}

/// The last 30 lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn log_tail(path: Option<&Path>) -> String {
    match path {
        Some(path) => format!("; log {}:\n{}", path.display(), tail(path)),
        None => String::new(),
    }
}
