//! CPU time per request, from `/proc/<pid>/stat`: the server's, the PostgreSQL cluster's and
//! the harness's own. Wall-clock rates on two shared cores say little about where the time
//! goes; CPU per request says which process to make cheaper.

use std::time::Duration;

/// Kernel clock ticks per second, the unit of the times in `/proc/<pid>/stat`.
fn clock_ticks_per_sec() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // `getconf` rather than `sysconf(3)`: the workspace forbids unsafe code. 100 is what
    // Linux reports on every common architecture.
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t: &u64| t > 0)
            .unwrap_or(100)
    })
}

/// The fields of `/proc/<pid>/stat` this module needs.
struct Stat {
    comm: String,
    ppid: u32,
    /// utime + stime: the process's own CPU, all its threads, exited ones included.
    own: u64,
    /// cutime + cstime: CPU of children it has waited for.
    children: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // comm is in parentheses and may itself contain spaces or ')'; the last ')' ends it.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    // Fields after comm, numbered from 3 (state) as in proc(5).
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { rest.get(n - 3)?.parse().ok() };
    Some(Stat {
        comm,
        ppid: u32::try_from(field(4)?).ok()?,
        own: field(14)? + field(15)?,
        children: field(16)? + field(17)?,
    })
}

/// The PostgreSQL cluster's CPU: the postmaster's own and that of the backends it has
/// reaped, plus every live child's (backends, walwriter, checkpointer, autovacuum). Counting
/// reaped children makes connections that closed during a phase count too.
fn cluster_ticks(postmaster: u32) -> Option<u64> {
    let pm = stat(postmaster)?;
    let mut total = pm.own + pm.children;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
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
    fn parses_a_stat_line_whose_comm_has_spaces_and_parens() {
        let line = "4242 (postgres: a) b) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 30 7 2 20 0 1 0 100 1000 10";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.comm, "postgres: a) b");
        assert_eq!(s.ppid, 17);
        assert_eq!(s.own, 280);
        assert_eq!(s.children, 9);
    }

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
