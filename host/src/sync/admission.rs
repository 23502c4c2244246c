//! Back-pressure from delivery onto new sessions.
//!
//! Every new session owes each subscribed connector a delivery. When the host cannot make
//! those deliveries as fast as the API creates sessions (on a machine where the API and the
//! connectors share the cores, the API can always create them faster), the backlog grows for
//! as long as the load lasts, and a logout queued behind it reaches the legacy systems
//! seconds or minutes late. [`Admission`] bounds that: the dispatcher publishes how long the
//! oldest waiting event has waited, and while that exceeds the budget new sessions wait for
//! the backlog to shrink (then are refused with 503 and `Retry-After`). Logouts are never
//! held: ending sessions is what the backlog delays.
//!
//! Only lag the host can work off counts. A connector whose calls take longer than a quarter
//! of the budget cannot meet the budget at any API rate, so its lane's lag is shown in the
//! metrics but never throttles the API: one slow legacy system must not slow every login.
//! Retries are not counted either (their wait is the back-off the policy asked for).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::telemetry::metrics::Metrics;

/// Admission settings (`[limits] max_delivery_lag_ms`, `admission_wait_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Longest a waiting event may have waited before new sessions are held.
    pub budget: Duration,
    /// Longest a new session is held before it is refused.
    pub max_wait: Duration,
}

/// A new session was refused because the delivery backlog did not shrink in time.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error(
    "deliveries to connectors are {lag_ms} ms behind (budget {budget_ms} ms); new sessions are \
     held until they catch up: retry shortly"
)]
pub struct Backlogged {
    /// The lag when the wait ended.
    pub lag_ms: u64,
    /// The configured budget.
    pub budget_ms: u64,
}

/// Shared between the dispatcher (which publishes lags) and the session service (which
/// admits new sessions).
#[derive(Debug)]
pub struct Admission {
    config: Option<AdmissionConfig>,
    /// One per publisher (the fan-out and each lane): its current lag in milliseconds.
    sources: Mutex<Vec<Arc<AtomicU64>>>,
    /// The largest lag of all sources, recomputed on every publication.
    lag_ms: AtomicU64,
    opened: Notify,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// Admission under `config` (`None`: every session is admitted at once; lags are still
    /// published to the metrics).
    pub fn new(config: Option<AdmissionConfig>, metrics: Arc<Metrics>) -> Self {
        Admission {
            config,
            sources: Mutex::new(Vec::new()),
            lag_ms: AtomicU64::new(0),
            opened: Notify::new(),
            metrics,
        }
    }

    /// The budget above which new sessions wait (`None`: admission is off).
    pub fn budget(&self) -> Option<Duration> {
        self.config.map(|c| c.budget)
    }

    /// A new publisher of lag; it stops counting when dropped.
    pub fn source(self: &Arc<Self>) -> LagSource {
        let slot = Arc::new(AtomicU64::new(0));
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot.clone());
        LagSource {
            admission: self.clone(),
            slot,
        }
    }

    /// The largest published lag.
    pub fn lag(&self) -> Duration {
        Duration::from_millis(self.lag_ms.load(Ordering::Relaxed))
    }

    fn is_open(&self) -> bool {
        match self.config {
            None => true,
            Some(c) => {
                self.lag_ms.load(Ordering::Relaxed)
                    <= u64::try_from(c.budget.as_millis()).unwrap_or(u64::MAX)
            }
        }
    }

    /// Returns once a new session may be written: at once while the lag is within the budget,
    /// else when it is back within it, or [`Backlogged`] after `max_wait`.
    pub async fn admit(&self) -> Result<(), Backlogged> {
        let Some(config) = self.config else {
            return Ok(());
        };
        if self.is_open() {
            return Ok(());
        }
        self.metrics.admission().held();
        let deadline = tokio::time::Instant::now() + config.max_wait;
        loop {
            let opened = self.opened.notified();
            if self.is_open() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, opened).await.is_err() {
                if self.is_open() {
                    return Ok(());
                }
                self.metrics.admission().refused();
                return Err(Backlogged {
                    lag_ms: self.lag_ms.load(Ordering::Relaxed),
                    budget_ms: u64::try_from(config.budget.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
    }

    fn recompute(&self) {
        let max = {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            // A dropped source holds the only other reference no more.
            sources.retain(|s| Arc::strong_count(s) > 1);
            sources
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0)
        };
        self.lag_ms.store(max, Ordering::Relaxed);
        self.metrics.admission().set_lag_ms(max);
        if self.is_open() {
            self.opened.notify_waiters();
        }
    }
}

/// One publisher's handle: the fan-out's or a lane's.
#[derive(Debug)]
pub struct LagSource {
    admission: Arc<Admission>,
    slot: Arc<AtomicU64>,
}

impl LagSource {
    /// This source's lag now (zero when it is caught up).
    pub fn publish(&self, lag: Duration) {
        let ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
        if self.slot.swap(ms, Ordering::Relaxed) != ms {
            self.admission.recompute();
        }
    }

    /// The budget, so that a lane can tell whether its calls are too slow to count.
    pub fn budget(&self) -> Option<Duration> {
        self.admission.budget()
    }
}

impl Drop for LagSource {
    fn drop(&mut self) {
        self.slot.store(0, Ordering::Relaxed);
        self.admission.recompute();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(budget_ms: u64, wait_ms: u64) -> Arc<Admission> {
        Arc::new(Admission::new(
            Some(AdmissionConfig {
                budget: Duration::from_millis(budget_ms),
                max_wait: Duration::from_millis(wait_ms),
            }),
            Arc::new(Metrics::new()),
        ))
    }

    #[tokio::test]
    async fn within_the_budget_sessions_pass_at_once() {
        let a = admission(500, 10_000);
        let lane = a.source();
        lane.publish(Duration::from_millis(500));
        tokio::time::timeout(Duration::from_millis(100), a.admit())
            .await
            .expect("not held")
            .unwrap();
    }

    #[tokio::test]
    async fn over_the_budget_sessions_wait_until_the_lag_falls() {
        let a = admission(500, 10_000);
        let lane = a.source();
        lane.publish(Duration::from_millis(900));
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "admitted while 400 ms over budget");
        lane.publish(Duration::from_millis(100));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the lag fell")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_backlog_that_does_not_shrink_is_refused_after_the_wait() {
        let a = admission(500, 50);
        let fan_out = a.source();
        fan_out.publish(Duration::from_secs(3));
        let refused = a.admit().await.unwrap_err();
        assert_eq!(
            refused,
            Backlogged {
                lag_ms: 3_000,
                budget_ms: 500
            }
        );
    }

    #[tokio::test]
    async fn the_largest_source_counts_and_a_dropped_one_stops_counting() {
        let a = admission(500, 50);
        let (one, two) = (a.source(), a.source());
        one.publish(Duration::from_millis(100));
        two.publish(Duration::from_millis(2_000));
        assert_eq!(a.lag(), Duration::from_millis(2_000));
        drop(two);
        assert_eq!(a.lag(), Duration::from_millis(100));
        a.admit().await.unwrap();
    }

    #[tokio::test]
    async fn switched_off_it_never_holds() {
        let a = Arc::new(Admission::new(None, Arc::new(Metrics::new())));
        a.source().publish(Duration::from_secs(60));
        a.admit().await.unwrap();
    }
}
