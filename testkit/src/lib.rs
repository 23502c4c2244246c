//! What `host/tests` and the `xtask` load harnesses both need to drive a real `lockstep`:
//! start and stop the binary ([`server`]), scratch PostgreSQL databases ([`postgres`]),
//! memory and CPU readings of a process ([`procfs`]), HTTP servers on 127.0.0.1
//! ([`loopback`]) and connector manifests ([`manifest`]).
//!
//! Errors are values ([`Error`]): the load harnesses report them, the tests unwrap them.
//! Everything a caller starts stops when its handle is dropped.

pub mod loopback;
pub mod manifest;
pub mod postgres;
pub mod procfs;
pub mod server;

pub use loopback::{Loopback, Receiver, Recorded};
pub use server::{Launch, Lockstep};

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong while starting, stopping or talking to something the kit runs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("starting {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the stdout of lockstep: {0}")]
    Stdout(std::io::Error),
    #[error("lockstep exited ({status}) before it printed `listening on ADDR`{log}")]
    ExitedEarly { status: String, log: String },
    #[error("lockstep printed no `listening on ADDR` within {timeout:?}{log}")]
    NotReady { timeout: Duration, log: String },
    #[error("lockstep printed an unparsable readiness line {0:?}")]
    ReadyLine(String),
    #[error("lockstep has already exited")]
    Gone,
    #[error("sending SIGTERM to {pid}: {detail}")]
    Signal { pid: u32, detail: String },
    #[error("lockstep did not exit within {0:?} of SIGTERM and was killed")]
    StopTimeout(Duration),
    #[error("waiting for lockstep: {0}")]
    Wait(std::io::Error),
    #[error("{what}: {source}")]
    Postgres { what: String, source: sqlx::Error },
    #[error("{0:?} is not a PostgreSQL URL with a database path")]
    PostgresUrl(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}
