//! Retention of the audit log: a background task deletes records older than the configured
//! number of days, in bounded batches (short transactions, so the writer is never held for
//! long), at start and then every interval. It owns only the schedule; the SQL is the
//! store's.

use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// Default retention of `[audit] retention_days`.
pub const DEFAULT_RETENTION_DAYS: u32 = 90;
const DAY_MS: i64 = 24 * 3600 * 1000;

/// How long records are kept and how the sweep is bounded.
#[derive(Clone, Debug)]
pub struct RetentionConfig {
    /// Days a record is kept; 0 keeps every record forever.
    pub retention_days: u32,
    /// Pause between sweeps.
    pub interval: Duration,
    /// Records deleted per transaction.
    pub batch: i64,
    /// Batches per sweep at most; the rest waits for the next sweep.
    pub max_batches: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            retention_days: DEFAULT_RETENTION_DAYS,
            interval: Duration::from_secs(3600),
            batch: 1000,
            max_batches: 100,
        }
    }
}

/// Records before this time (epoch ms) are due for deletion; `None` when nothing ever is.
pub fn cutoff_ms(now_ms: i64, retention_days: u32) -> Option<i64> {
    (retention_days > 0).then(|| now_ms.saturating_sub(i64::from(retention_days) * DAY_MS))
}

/// Deletes due records until `shutdown` turns true. Store errors are logged and retried at
/// the next sweep. Returns at once when retention is off.
pub async fn run(store: Store, config: RetentionConfig, mut shutdown: watch::Receiver<bool>) {
    if config.retention_days == 0 {
        return;
    }
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        if let Some(cutoff) = cutoff_ms(now, config.retention_days) {
            let mut deleted = 0;
            for _ in 0..config.max_batches {
                match store.purge_audit(cutoff, config.batch).await {
                    Ok(n) => {
                        deleted += n;
                        if (n as i64) < config.batch {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "audit retention sweep failed; retrying next time");
                        break;
                    }
                }
            }
            if deleted > 0 {
                tracing::info!(
                    deleted,
                    days = config.retention_days,
                    "old audit records deleted"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_is_retention_days_before_now_and_zero_keeps_forever() {
        assert_eq!(cutoff_ms(10 * DAY_MS, 3), Some(7 * DAY_MS));
        assert_eq!(cutoff_ms(10 * DAY_MS, 0), None);
        assert_eq!(
            cutoff_ms(0, u32::MAX),
            Some(-(i64::from(u32::MAX) * DAY_MS))
        );
    }
}
