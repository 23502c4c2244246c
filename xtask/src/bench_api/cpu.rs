//! CPU time per request, from `/proc/<pid>/stat`: the server's, the PostgreSQL cluster's and
//! the harness's own. Wall-clock rates on two shared cores say little about where the time
//! goes; CPU per request says which process to make cheaper.

use std::time::Duration;

use testkit::procfs::{clock_ticks_per_sec, pids, stat};

/// The PostgreSQL cluster's CPU: the postmaster's own and that of the backends it has
/// reaped, plus every live child's (backends, walwriter, checkpointer, autovacuum). Counting
/// reaped children makes connections that closed during a phase count too.
fn cluster_ticks(postmaster: u32) -> Option<u64> {
    let pm = stat(postmaster)?;
    let mut total = pm.own + pm.children;
    for pid in pids() {
        if let Some(s) = stat(pid).filter(|s| s.ppid == postmaster) {
            total += s.own;
        }
    }
    Some(total)
}

/// The postmaster of the backend `backend_pid`, if it runs on this machine (same PID
/// namespace) and looks like PostgreSQL.
pub fn postmaster_of(backend_pid: u32) -> Option<u32> {
    let backend = stat(backend_pid).filter(|s| s.comm == "postgres")?;
    stat(backend.ppid).filter(|s| s.comm == "postgres")?;
    Some(backend.ppid)
}

/// CPU time of the calling thread, in nanoseconds of `/proc/thread-self/schedstat` (user and
/// system time alike): exact where the 10 ms ticks of `stat` would blur a one-second run,
/// and blind to whatever else the machine is running.
pub fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// CPU used during one measurement, per process group; `None` where it could not be read.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    /// The `lockstep serve` process.
    pub server: Option<Duration>,
    /// The PostgreSQL cluster (every database on it, so a shared cluster adds noise).
    pub postgres: Option<Duration>,
    /// This harness (load client, raw ceiling loop), plus children it reaped meanwhile
    /// (pgbench).
    pub harness: Option<Duration>,
}

/// Per-request CPU in microseconds.
pub fn us_per_op(cpu: Option<Duration>, ops: usize) -> Option<f64> {
    if ops == 0 {
        return None;
    }
    Some(cpu?.as_secs_f64() * 1e6 / ops as f64)
}

/// What to read before and after a measurement.
#[derive(Clone, Copy, Debug)]
pub struct Meter {
    ticks_per_sec: u64,
    server: Option<u32>,
    postmaster: Option<u32>,
}

/// Tick counters at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    server: Option<u64>,
    postgres: Option<u64>,
    harness: Option<u64>,
}

impl Meter {
    pub fn new(server: Option<u32>, postmaster: Option<u32>) -> Self {
        Meter {
            ticks_per_sec: clock_ticks_per_sec(),
            server,
            postmaster,
        }
    }

    pub fn sample(&self) -> Sample {
        Sample {
            server: self.server.and_then(stat).map(|s| s.own),
            postgres: self.postmaster.and_then(cluster_ticks),
            harness: stat(std::process::id()).map(|s| s.own + s.children),
        }
    }

    /// CPU used between two samples.
    pub fn since(&self, before: &Sample) -> CpuUse {
        let after = self.sample();
        let diff = |a: Option<u64>, b: Option<u64>| {
            let ticks = a?.checked_sub(b?)?;
            Some(Duration::from_secs_f64(
                ticks as f64 / self.ticks_per_sec as f64,
            ))
        };
        CpuUse {
            server: diff(after.server, before.server),
            postgres: diff(after.postgres, before.postgres),
            harness: diff(after.harness, before.harness),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_thread() {
        let s = stat(std::process::id()).unwrap();
        assert!(!s.comm.is_empty());
        let before = thread_cpu().unwrap();
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(5) {}
        assert!(thread_cpu().unwrap() > before);
    }
}
