//! What the load harnesses do the same way around the server they measure: the run's temp
//! directory and scratch PostgreSQL databases, the server's connector directory and compile
//! cache with the webhook connectors that post to a loopback receiver, the run of one backend
//! that keeps its figures when it fails part-way, the percentiles and latency tables they
//! print, the lock of a log their loopback receivers share, and the client of the server's
//! admin API (`admin.rs`).

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

mod admin;

pub(crate) use admin::{Admin, QueueCounts};

/// `--connectors-dir` and `--compile-cache` of one server, both inside the run's directory.
pub(crate) struct ConnectorDirs {
    pub connectors: PathBuf,
    pub cache: PathBuf,
}

impl ConnectorDirs {
    /// Creates `connectors/` and `compile-cache/` in `dir`.
    pub(crate) fn create(dir: &Path) -> Result<Self> {
        let dirs = ConnectorDirs {
            connectors: dir.join("connectors"),
            cache: dir.join("compile-cache"),
        };
        // Small files: blocking std::fs calls are fine here.
        for d in [&dirs.connectors, &dirs.cache] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(dirs)
    }

    /// Writes connector `name`'s manifest as `<name>.toml` in the connectors directory and
    /// returns its path.
    pub(crate) fn write_manifest(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.connectors.join(format!("{name}.toml"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Writes one webhook connector per name in `hooks` (see [`webhook_manifest`]), all
    /// posting to the one receiver at `origin`.
    pub(crate) fn write_webhooks(
        &self,
        hooks: &[&str],
        component: &Path,
        realm: &str,
        events: &[&str],
        origin: &str,
    ) -> Result<()> {
        for hook in hooks {
            let text = webhook_manifest(hook, component, realm, events, origin);
            self.write_manifest(hook, &text)?;
        }
        Ok(())
    }

    /// The `serve` flags that point the server at both directories.
    pub(crate) fn flags(&self) -> [&OsStr; 4] {
        [
            "--connectors-dir".as_ref(),
            self.connectors.as_os_str(),
            "--compile-cache".as_ref(),
            self.cache.as_os_str(),
        ]
    }
}

/// The manifest of webhook connector `hook`, posting `events` of `realm` to `<origin>/<hook>`.
pub(crate) fn webhook_manifest(
    hook: &str,
    component: &Path,
    realm: &str,
    events: &[&str],
    origin: &str,
) -> String {
    testkit::manifest::Webhook {
        name: hook,
        component: Some(component),
        realms: &[realm],
        events,
        allowed_hosts: &[origin],
        timeout_ms: 2000,
        url: &format!("{origin}/{hook}"),
        config: &[],
    }
    .to_toml()
}

/// Runs one backend's phases under a `=== name (dir)` heading. A failure ends that backend's
/// run, not the others', and what it measured so far stays in its report: the error comes
/// back as the message to file as the report's failure.
pub(crate) async fn run_backend(
    name: &str,
    dir: &Path,
    phases: impl Future<Output = Result<()>>,
) -> Option<String> {
    eprintln!("\n=== {name} ({})", dir.display());
    match phases.await {
        Ok(()) => None,
        Err(e) => {
            eprintln!("  [{name}] aborted: {e:#}");
            Some(format!("{e:#}"))
        }
    }
}

/// A fresh temp directory for one run (database, config, manifests, server log), named
/// `<prefix>…` so a kept one says which harness made it.
pub(crate) fn temp_dir(prefix: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temp dir")
}

/// A scratch database name of this run: `<prefix>_<UTC start time>`, so runs one after
/// another never meet an earlier run's database.
pub(crate) fn scratch_db_name(prefix: &str) -> String {
    format!("{prefix}_{}", chrono::Utc::now().format("%Y%m%d_%H%M%S"))
}

/// Drops the run's scratch databases on the PostgreSQL server at `admin_url`. Killing the
/// servers leaves them behind, so this runs whichever way the run ended; a database that
/// cannot be dropped is a warning, not a failed run.
pub(crate) async fn drop_scratch_databases(admin_url: &str, names: &[String]) {
    for name in names {
        if let Err(e) = testkit::postgres::drop_database(admin_url, name).await {
            eprintln!("warning: could not drop database {name}: {e:#}");
        }
    }
}

/// A harness's shared log (a receiver's arrivals, say) stays consistent even if a holder
/// panicked (each update is a few plain inserts), so a poisoned lock is used as is.
pub(crate) fn lock<T>(log: &Mutex<T>) -> MutexGuard<'_, T> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Nearest-rank percentile of sorted durations, in milliseconds.
pub(crate) fn percentile_ms(sorted: &[Duration], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((q / 100.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1].as_secs_f64() * 1e3)
}

/// A figure from [`percentile_ms`], or `-` when there is none.
pub(crate) fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// `res` when its status is `want`; otherwise an error naming `what`, with the status and
/// the body the server gave as its reason.
pub(crate) async fn expect_status(
    res: reqwest::Response,
    want: reqwest::StatusCode,
    what: &str,
) -> Result<reqwest::Response> {
    if res.status() != want {
        bail!(
            "{what}: {} {}",
            res.status(),
            res.text().await.unwrap_or_default()
        );
    }
    Ok(res)
}

/// A table of latencies in milliseconds, a row per sample set: its label, how many, p50,
/// p90, p99 and max. Each harness keeps its own label and count widths.
pub(crate) struct LatencyTable {
    pub label_width: usize,
    pub n_width: usize,
}

impl LatencyTable {
    /// The heading line, `title` in the label column.
    pub(crate) fn header(&self, title: &str) {
        let heads = ["p50 ms", "p90 ms", "p99 ms", "max ms"].map(str::to_owned);
        println!("{}", self.line(title, "n", heads));
    }

    /// The row of `samples` (in any order).
    pub(crate) fn row(&self, label: &str, samples: &[Duration]) {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let figures = [50.0, 90.0, 99.0, 100.0].map(|q| ms(percentile_ms(&sorted, q)));
        println!("{}", self.line(label, &sorted.len().to_string(), figures));
    }

    fn line(&self, label: &str, n: &str, [p50, p90, p99, max]: [String; 4]) -> String {
        format!(
            "{label:<lw$} {n:>nw$} {p50:>8} {p90:>8} {p99:>8} {max:>8}",
            lw = self.label_width,
            nw = self.n_width,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_line_pads_the_label_left_and_the_figures_right() {
        let table = LatencyTable {
            label_width: 44,
            n_width: 6,
        };
        let figures = ["1.0", "2.0", "3.0", "40.5"].map(str::to_owned);
        assert_eq!(
            table.line("LOGIN (1 created)", "1200", figures),
            format!(
                "{:<44} {:>6} {:>8} {:>8} {:>8} {:>8}",
                "LOGIN (1 created)", 1200, "1.0", "2.0", "3.0", "40.5"
            )
        );
    }
}
