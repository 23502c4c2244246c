//! Readings of a process from Linux's `/proc`: resident memory and CPU ticks. Each returns
//! `None` where the file cannot be read (the process is gone, or this is not Linux).

use std::sync::OnceLock;

/// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The fields of `/proc/<pid>/stat` the harnesses read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub ppid: u32,
    /// utime + stime in clock ticks: the process's own CPU, all its threads, exited ones
    /// included.
    pub own: u64,
    /// cutime + cstime: CPU of children it has waited for.
    pub children: u64,
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn parse_stat(text: &str) -> Option<Stat> {
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

/// Kernel clock ticks per second, the unit of the times in `/proc/<pid>/stat`.
pub fn clock_ticks_per_sec() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
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

/// The pids of `/proc`, every process the machine shows.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_comm_has_spaces_and_parens() {
        let line = "4242 (postgres: a) b) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 30 7 2 20 0 1 0 100 1000 10";
        let s = parse_stat(line);
        assert_eq!(
            s,
            Some(Stat {
                comm: "postgres: a) b".to_owned(),
                ppid: 17,
                own: 280,
                children: 9
            })
        );
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(stat(me).is_some_and(|s| !s.comm.is_empty()));
        assert!(rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(pids().contains(&me));
    }
}
