//! The overview's live-session counts, shared by every viewer: counting a realm's sessions
//! reads every live row, so with a million sessions it is done at most once per
//! [`FRESH`] per instance, in the background, and each overview is served from the last
//! count (only the very first one waits for it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::overview::LiveCounts;
use crate::store::{Store, StoreError};

/// How old a count may be before the next overview starts a new one.
pub const FRESH: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Inner {
    last: Mutex<Option<(Instant, Arc<Vec<LiveCounts>>)>>,
    refreshing: AtomicBool,
}

/// The last count and whether a new one is under way.
#[derive(Clone, Default)]
pub struct LiveCache {
    inner: Arc<Inner>,
}

impl LiveCache {
    fn last(&self) -> Option<(Instant, Arc<Vec<LiveCounts>>)> {
        self.inner
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn store(&self, counts: Arc<Vec<LiveCounts>>) {
        *self
            .inner
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), counts));
    }

    /// The live sessions per realm, at most [`FRESH`] old when the overview is watched.
    pub async fn counts(&self, store: &Store) -> Result<Arc<Vec<LiveCounts>>, StoreError> {
        match self.last() {
            Some((at, counts)) if at.elapsed() < FRESH => Ok(counts),
            Some((_, counts)) => {
                if !self.inner.refreshing.swap(true, Ordering::AcqRel) {
                    let cache = self.clone();
                    let store = store.clone();
                    tokio::spawn(async move {
                        match store.live_counts().await {
                            Ok(c) => cache.store(Arc::new(c)),
                            Err(e) => {
                                tracing::warn!(error = %e, "console: live session count failed")
                            }
                        }
                        cache.inner.refreshing.store(false, Ordering::Release);
                    });
                }
                Ok(counts)
            }
            None => {
                let counts = Arc::new(store.live_counts().await?);
                self.store(counts.clone());
                Ok(counts)
            }
        }
    }
}
