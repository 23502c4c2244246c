//! The outbox dispatcher: turns committed outbox events into per-connector deliveries,
//! claims due deliveries (leases, so several instances can share a PostgreSQL outbox),
//! calls the connector's hook in the sandbox, and records the outcome under the connector's
//! failure policy. Everything it knows lives in the database, so a crash loses nothing:
//! unfinished deliveries are claimed again after a restart (at least once).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::runtime::manifest::{OnFailure, Policy};
use crate::runtime::registry::Registry;
use crate::runtime::{HookFailure, Runtime};
use crate::store::deliveries::{AttemptRecord, AttemptResult, ClaimedDelivery};
use crate::store::{Gate, Route, Store, now_millis};
use crate::sync::model::SyncEvent;
use crate::telemetry::metrics::Metrics;

/// Dispatcher settings.
#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    /// How often to look for work without a wake-up (other instances' events, backoffs).
    pub poll: Duration,
    /// Hook calls in flight at once.
    pub concurrency: usize,
    /// Lease added to the longest connector timeout.
    pub lease_margin: Duration,
    /// Shortest time between the starts of two rounds woken by commits. Every commit wakes
    /// the dispatcher; under load a round right after the last would route a handful of
    /// events for a whole transaction of its own, so the wake-ups that come sooner wait for
    /// this to pass and share one round. A wake-up after a quiet spell starts a round at once.
    pub coalesce: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            poll: Duration::from_millis(200),
            concurrency: crate::runtime::MAX_CONCURRENT_CALLS,
            lease_margin: Duration::from_secs(5),
            coalesce: Duration::from_millis(5),
        }
    }
}

/// Delivers outbox events to connectors.
#[derive(Clone)]
pub struct Dispatcher {
    store: Store,
    runtime: Runtime,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    config: DispatcherConfig,
    /// Since when fan-out has waited for connector uploads to load here (for the warning).
    behind_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// Fan-out waiting this long for this instance to load the stored uploads is logged.
const BEHIND_WARN_AFTER: Duration = Duration::from_secs(10);

/// The delay before attempt `attempt + 1`: exponential ceiling, full jitter.
pub fn backoff_ms(policy: &Policy, attempt: u32, rng: &mut impl Rng) -> u64 {
    let ceiling = policy
        .backoff_ms
        .saturating_mul(1u64 << attempt.min(32))
        .min(policy.max_backoff_ms);
    rng.random_range(0..=ceiling)
}

/// What the policy makes of a failed attempt number `attempt` (1-based).
pub fn decide(policy: &Policy, failure: &HookFailure, attempt: u32, now: i64) -> AttemptResult {
    match policy.on_failure {
        OnFailure::Log => AttemptResult::Dropped,
        OnFailure::Alert => AttemptResult::Dead,
        OnFailure::Retry if failure.retryable() && attempt < policy.max_attempts => {
            let delay = backoff_ms(policy, attempt - 1, &mut rand::rng());
            AttemptResult::Retry {
                next_attempt_at: now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
            }
        }
        OnFailure::Retry => AttemptResult::Dead,
    }
}

impl Dispatcher {
    /// A dispatcher over this store, runtime and connector registry.
    pub fn new(
        store: Store,
        runtime: Runtime,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: DispatcherConfig,
    ) -> Self {
        let wake = store.committed();
        Dispatcher {
            store,
            runtime,
            registry,
            metrics,
            wake,
            config,
            behind_since: Arc::default(),
        }
    }

    /// Runs until `shutdown` turns true, then waits for calls in flight (each bounded by its
    /// connector's deadline) and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        match self.store.release_leases().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deliveries = n,
                "resuming deliveries interrupted by a restart"
            ),
            Err(e) => tracing::error!(error = %e, "cannot release stale delivery leases"),
        }
        let mut in_flight: JoinSet<()> = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let round_began = tokio::time::Instant::now();
            // One fan-out batch per round, then claims: under a steady stream of new events a
            // full batch is always waiting, and fanning out until the outbox is empty would
            // starve delivery for as long as the load lasts.
            let backlog = match self.fan_out().await {
                Ok(full) => full,
                Err(e) => {
                    tracing::error!(error = %e, "outbox fan-out failed; retrying");
                    false
                }
            };
            while let Some(res) = in_flight.try_join_next() {
                if let Err(e) = res {
                    tracing::error!(error = %e, "delivery task failed");
                }
            }
            let free = self.config.concurrency.saturating_sub(in_flight.len());
            if free > 0 {
                match self.claim(free).await {
                    Ok(claimed) => {
                        for delivery in claimed {
                            let me = self.clone();
                            in_flight.spawn(async move { me.attempt(delivery).await });
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "claiming deliveries failed; retrying"),
                }
            }
            if backlog {
                // More events are already waiting to be routed: no need to sleep.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {
                    tokio::time::sleep_until(round_began + self.config.coalesce).await;
                }
                Some(res) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(e) = res {
                        tracing::error!(error = %e, "delivery task failed");
                    }
                }
                _ = tokio::time::sleep(self.config.poll) => {}
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!(in_flight = in_flight.len(), "dispatcher draining");
        while let Some(res) = in_flight.join_next().await {
            if let Err(e) = res {
                tracing::error!(error = %e, "delivery task failed");
            }
        }
    }

    /// Fans out one batch of committed events not yet routed; true when the batch was full
    /// (more are waiting).
    async fn fan_out(&self) -> crate::store::Result<bool> {
        let registry = self.registry.clone();
        let route = route_on_first_use(
            move || registry.snapshot(),
            |connectors, event| {
                // Disabled connectors are routed to as well: their deliveries are held. A
                // connector only gets events its world has a hook for (refresh needs 0.2.0);
                // loading already refuses a 0.1.0 component subscribed to refresh.
                connectors
                    .values()
                    .map(|e| &e.connector)
                    .filter(|c| {
                        c.world.has_hook(event.event_type)
                            && c.manifest.subscribes(
                                &event.realm,
                                event.event_type,
                                event.origin_system.as_deref(),
                            )
                    })
                    .map(|c| c.manifest.name.clone())
                    .collect()
            },
        );
        let registry = self.registry.clone();
        let gate: Gate = Arc::new(move |uploads| registry.covers(uploads));
        let Some((events, deliveries)) = self.store.fan_out(route, gate).await? else {
            // A connector uploaded (or replaced, or removed) elsewhere has not reached this
            // instance yet; the cluster sync loads it within moments. Until then this
            // instance leaves the batch to one that has it (or to its next round).
            let mut behind = self.behind_since.lock().unwrap_or_else(|p| p.into_inner());
            let since = *behind.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > BEHIND_WARN_AFTER {
                tracing::warn!(
                    behind_s = since.elapsed().as_secs(),
                    "outbox fan-out waits for connector uploads stored in the database to load \
                     on this instance"
                );
                *behind = Some(std::time::Instant::now());
            }
            return Ok(false);
        };
        if let Ok(mut behind) = self.behind_since.lock() {
            *behind = None;
        }
        if events > 0 {
            tracing::debug!(events, deliveries, "fanned out outbox events");
        }
        Ok(events >= crate::store::deliveries::FAN_OUT_BATCH as usize)
    }

    async fn claim(&self, limit: usize) -> crate::store::Result<Vec<ClaimedDelivery>> {
        let snapshot = self.registry.snapshot();
        let enabled: Vec<_> = snapshot.iter().filter(|(_, e)| e.enabled).collect();
        if enabled.is_empty() {
            return Ok(Vec::new());
        }
        let longest = enabled
            .iter()
            .map(|(_, e)| e.connector.manifest.timeout_ms)
            .max()
            .unwrap_or(0);
        let lease_until = now_millis()
            + i64::try_from(longest).unwrap_or(i64::MAX / 2)
            + i64::try_from(self.config.lease_margin.as_millis()).unwrap_or(5_000);
        let names: Vec<String> = enabled.iter().map(|(n, _)| (*n).clone()).collect();
        self.store
            .claim(names, i64::try_from(limit).unwrap_or(64), lease_until)
            .await
    }

    /// One attempt of one delivery, recorded whatever happens.
    async fn attempt(&self, delivery: ClaimedDelivery) {
        let attempt = u32::try_from(delivery.attempts)
            .unwrap_or(0)
            .saturating_add(1);
        let started_at = now_millis();
        // Resolve the connector now: a replacement loaded since the claim serves the attempt.
        let connector = match self.registry.get(&delivery.connector) {
            Some(entry) if entry.enabled => entry.connector.clone(),
            gone_or_off => {
                // Unloaded or disabled after the claim: give the delivery back untouched; it
                // waits for the connector to return or be enabled.
                tracing::info!(
                    connector = %delivery.connector,
                    delivery = delivery.id,
                    state = if gone_or_off.is_some() { "disabled" } else { "unloaded" },
                    "delivery held"
                );
                if let Err(e) = self.store.unlease(delivery.id).await {
                    tracing::warn!(error = %e, "cannot release the lease; it expires instead");
                }
                return;
            }
        };
        let span = tracing::info_span!(
            "delivery",
            delivery = delivery.id,
            connector = %delivery.connector,
            event_id = %delivery.event.event_id,
            realm = %delivery.event.realm,
            external_id = %delivery.event.external_id,
            attempt,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let clock = std::time::Instant::now();
        let outcome = self
            .runtime
            .call(&connector, &delivery.event)
            .instrument(span.clone())
            .await;
        let took = clock.elapsed();
        let _enter = span.enter();
        let finished_at = now_millis();
        let metrics = self.metrics.connector(&delivery.connector);
        let policy = &connector.manifest.policy;
        let (result, outcome_label, error) = match &outcome {
            Ok(()) => (AttemptResult::Delivered, "delivered".to_owned(), None),
            Err(failure) => {
                let result = decide(policy, failure, attempt, finished_at);
                match (&result, policy.on_failure) {
                    (AttemptResult::Dead, OnFailure::Alert) => tracing::error!(
                        alert = "connector_alert",
                        reason = %failure.reason(),
                        "connector_alert: delivery failed; dead-lettered"
                    ),
                    (AttemptResult::Dead, _) => {
                        tracing::warn!(reason = %failure.reason(), "delivery dead-lettered")
                    }
                    (AttemptResult::Dropped, _) => {
                        tracing::warn!(reason = %failure.reason(), "delivery failed; dropped (log policy)")
                    }
                    _ => tracing::info!(reason = %failure.reason(), "delivery failed; will retry"),
                }
                (result, failure.kind().to_owned(), Some(failure.reason()))
            }
        };
        span.record("outcome", outcome_label.as_str());
        if outcome.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        metrics.hook_call(&outcome_label, took);
        match result {
            AttemptResult::Dead => metrics.dead_letter(),
            AttemptResult::Dropped => metrics.dropped(),
            _ => {}
        }
        let record = AttemptRecord {
            delivery_id: delivery.id,
            attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
            result,
            outcome: outcome_label,
            error,
            version: connector.version.clone(),
            started_at,
            finished_at,
        };
        drop(_enter);
        // If recording fails the lease expires and the attempt is made again (at least once).
        for wait in [0u64, 100, 500, 2_000] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            match self.store.record(record.clone()).await {
                Ok(()) => return,
                Err(e) => tracing::error!(error = %e, "cannot record delivery attempt"),
            }
        }
    }
}

/// A route that reads the connectors (`view`) when the first event is routed, once per batch.
///
/// The store calls the route after it has selected the batch, so the view is never older than
/// the events: a connector loaded before an event was committed gets that event. Read before
/// the SELECT, a slow database could hand the batch events committed after a connector was
/// loaded, routed with a view that predates the connector (seen under CI load: the first
/// events after an upload were routed without the uploaded connector).
fn route_on_first_use<V, L, P>(view: L, pick: P) -> Route
where
    V: Send + Sync + 'static,
    L: Fn() -> V + Send + Sync + 'static,
    P: Fn(&V, &SyncEvent) -> Vec<String> + Send + Sync + 'static,
{
    let taken = std::sync::OnceLock::new();
    Arc::new(move |event| pick(taken.get_or_init(&view), event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_reads_the_connectors_when_it_first_routes_not_when_it_is_made() {
        let live = Arc::new(std::sync::Mutex::new(vec!["old".to_owned()]));
        let source = live.clone();
        let route = route_on_first_use(
            move || source.lock().unwrap().clone(),
            |names: &Vec<String>, _| names.clone(),
        );
        // A connector loaded after the route was made, before the batch is routed.
        live.lock().unwrap().push("uploaded".to_owned());
        let event: SyncEvent = serde_json::from_value(serde_json::json!({
            "eventId": "e1", "type": "login", "realm": "acme", "externalId": "s1",
            "kind": "PARENT", "attributes": {}, "occurredAt": "2026-11-23T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(route(&event), ["old", "uploaded"]);
        // One view per batch: a change in the middle of routing it does not split the batch.
        live.lock().unwrap().clear();
        assert_eq!(route(&event), ["old", "uploaded"]);
    }

    fn policy(on_failure: OnFailure) -> Policy {
        Policy {
            on_failure,
            max_attempts: 3,
            backoff_ms: 100,
            max_backoff_ms: 1_000,
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_ceiling() {
        let p = policy(OnFailure::Retry);
        let mut rng = rand::rng();
        for attempt in 0..20 {
            let ceiling = (100u64 << attempt.min(32)).min(1_000);
            for _ in 0..50 {
                assert!(backoff_ms(&p, attempt, &mut rng) <= ceiling);
            }
        }
        // Jitter: not always the ceiling.
        let samples: std::collections::HashSet<u64> =
            (0..50).map(|_| backoff_ms(&p, 3, &mut rng)).collect();
        assert!(samples.len() > 5);
    }

    #[test]
    fn policies_decide_retry_dead_or_dropped() {
        let retry = HookFailure::Retry("503".into());
        let fail = HookFailure::Fail("400".into());
        let trap = HookFailure::Trap("unreachable".into());
        let timeout = HookFailure::Timeout(10);
        let p = policy(OnFailure::Retry);
        assert!(matches!(
            decide(&p, &retry, 1, 0),
            AttemptResult::Retry { .. }
        ));
        assert!(matches!(
            decide(&p, &timeout, 2, 0),
            AttemptResult::Retry { .. }
        ));
        assert_eq!(decide(&p, &retry, 3, 0), AttemptResult::Dead);
        assert_eq!(decide(&p, &fail, 1, 0), AttemptResult::Dead);
        assert_eq!(decide(&p, &trap, 1, 0), AttemptResult::Dead);
        assert_eq!(
            decide(&policy(OnFailure::Alert), &retry, 1, 0),
            AttemptResult::Dead
        );
        assert_eq!(
            decide(&policy(OnFailure::Log), &retry, 1, 0),
            AttemptResult::Dropped
        );
        match decide(&p, &retry, 1, 1_000) {
            AttemptResult::Retry { next_attempt_at } => {
                assert!((1_000..=1_100).contains(&next_attempt_at))
            }
            other => panic!("{other:?}"),
        }
    }
}
