//! The overview's live-session counts, shared by every viewer: counting reads every live
//! row (about 2 s for a million sessions on SQLite), so it is done in the background, at
//! most once per [`FRESH`] and never more often than ten times its own duration (at most a
//! tenth of a core however many watch), and an overview is served from the last count
//! while it is recent; the first overview after a quiet spell waits for a new one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::overview::LiveCounts;
use crate::store::{Store, StoreError};

/// How old a count may be before the next overview starts a new one, at least.
pub const FRESH: Duration = Duration::from_secs(2);

/// A count, when it was made and how long it took.
#[derive(Clone)]
struct Count {
    at: Instant,
    took: Duration,
    counts: Arc<Vec<LiveCounts>>,
}

impl Count {
    fn interval(&self) -> Duration {
        FRESH.max(self.took.saturating_mul(10))
    }

    fn fresh(&self) -> bool {
        self.at.elapsed() < self.interval()
    }

    /// Recent enough to show while the next count runs: the overview is being watched.
    /// An older one (nobody looked for a while) is not shown at all.
    fn usable(&self) -> bool {
        self.at.elapsed() < self.interval().saturating_mul(2)
    }
}

#[derive(Default)]
struct Inner {
    last: Mutex<Option<Count>>,
    refreshing: AtomicBool,
}

/// The last count and whether a new one is under way.
#[derive(Clone, Default)]
pub struct LiveCache {
    inner: Arc<Inner>,
}

impl LiveCache {
    fn last(&self) -> Option<Count> {
        self.inner
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn count(&self, store: &Store) -> Result<Arc<Vec<LiveCounts>>, StoreError> {
        let started = Instant::now();
        let counts = Arc::new(store.live_counts().await?);
        *self
            .inner
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Count {
            at: Instant::now(),
            took: started.elapsed(),
            counts: counts.clone(),
        });
        Ok(counts)
    }

    /// The live sessions per realm, from the last count; a stale one starts the next.
    pub async fn counts(&self, store: &Store) -> Result<Arc<Vec<LiveCounts>>, StoreError> {
        match self.last() {
            Some(c) if c.fresh() => Ok(c.counts),
            Some(c) if c.usable() => {
                if !self.inner.refreshing.swap(true, Ordering::AcqRel) {
                    let cache = self.clone();
                    let store = store.clone();
                    tokio::spawn(async move {
                        if let Err(e) = cache.count(&store).await {
                            tracing::warn!(error = %e, "console: live session count failed");
                        }
                        cache.inner.refreshing.store(false, Ordering::Release);
                    });
                }
                Ok(c.counts)
            }
            _ => self.count(store).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_count_is_made_less_often() {
        let count = |took_ms: u64, age_ms: u64| Count {
            at: Instant::now() - Duration::from_millis(age_ms),
            took: Duration::from_millis(took_ms),
            counts: Arc::new(Vec::new()),
        };
        assert!(count(5, 1_000).fresh());
        assert!(!count(5, 2_500).fresh());
        assert!(
            count(2_000, 15_000).fresh(),
            "2 s to count: every 20 s at most"
        );
        assert!(!count(2_000, 21_000).fresh());
        assert!(
            count(2_000, 21_000).usable(),
            "shown while the next count runs"
        );
        assert!(
            !count(5, 4_500).usable(),
            "too old to show: counted again first"
        );
    }
}
