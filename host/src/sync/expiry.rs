//! The expiry sweeper: ends sessions whose `expires_at` has passed (reason `expired`,
//! cascading), so legacy sessions end when their IdP session's lifetime does. Work per tick is
//! bounded; a backlog is worked off over the following ticks without starving the writer.

use std::time::Duration;

use tokio::sync::watch;

use super::sessions::SessionService;

/// How often the sweeper looks, and its bounds.
#[derive(Clone, Debug)]
pub struct ExpiryConfig {
    /// Pause between sweeps.
    pub interval: Duration,
    /// Sessions ended per batch (one transaction per realm in the batch).
    pub batch: i64,
    /// Batches per sweep at most; the rest waits for the next sweep.
    pub max_batches: usize,
}

impl Default for ExpiryConfig {
    fn default() -> Self {
        ExpiryConfig {
            interval: Duration::from_secs(1),
            batch: 500,
            max_batches: 10,
        }
    }
}

/// Sweeps until `shutdown` turns true. Store errors are logged and retried next tick.
pub async fn run(
    sessions: SessionService,
    config: ExpiryConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        for _ in 0..config.max_batches {
            match sessions.end_expired(config.batch).await {
                Ok((changed, full)) => {
                    if changed > 0 {
                        tracing::info!(ended = changed, "expired sessions ended");
                    }
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "expiry sweep failed; retrying next tick");
                    break;
                }
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
