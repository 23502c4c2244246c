//! The outbox dispatcher: turns committed outbox events into per-connector deliveries,
//! delivers each connector's through its own lane (claims under leases, so several instances
//! can share a PostgreSQL outbox; at most the manifest's `concurrency` calls at once), calls
//! the connector's hook in the sandbox, and records outcomes in batches under the
//! connector's failure policy. Everything it knows lives in the database, so a crash loses
//! nothing: unfinished deliveries are claimed again after a restart (at least once).
//!
//! Tasks: the fan-out loop ([`Dispatcher::run`]), one lane per enabled connector
//! ([`Lane`]), and one recorder ([`record_batches`]) that writes the attempts of every lane,
//! as many per transaction as have finished while the previous batch was written.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::domain::SyncEvent;
use crate::runtime::LoadedConnector;
use crate::runtime::manifest::{OnFailure, Policy};
use crate::runtime::registry::Registry;
use crate::runtime::{HookFailure, Runtime};
use crate::store::deliveries::{AttemptRecord, AttemptResult, ClaimedDelivery, LaneClaim};
use crate::store::{Gate, Route, Store, now_millis};
use crate::sync::admission::{Admission, LagSource};
use crate::sync::ssf_transmit::{self, SsfTransmitter};
use crate::telemetry::metrics::Metrics;

/// Dispatcher settings.
#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    /// How often to look for work without a wake-up (other instances' events, backoffs).
    pub poll: Duration,
    /// Hook calls in flight at once over all lanes (each lane is also held to its
    /// connector's `concurrency`).
    pub concurrency: usize,
    /// Lease added to the connector's timeout.
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
    /// Calls in flight over all lanes ([`DispatcherConfig::concurrency`]).
    calls: Arc<Semaphore>,
    /// Where the fan-out and the lanes publish how far they trail the API.
    admission: Arc<Admission>,
    /// Since when fan-out has waited for connector uploads to load here (for the warning).
    behind_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// The Shared Signals streams: delivery targets named `ssf:<id>` beside the connectors.
    ssf: Option<Arc<SsfTransmitter>>,
}

/// Fan-out waiting this long for this instance to load the stored uploads is logged.
const BEHIND_WARN_AFTER: Duration = Duration::from_secs(10);

/// A lane claims at least this many times its connector's concurrency: one part runs while
/// the next waits, so the hook threads have work while a claim waits for the writer.
const CLAIM_AHEAD: usize = 2;

/// A lane whose calls are quick holds as many deliveries as it gets through in about this
/// long, so that each claim leases many rows: a claim costs the database a statement and
/// its planning whatever its size (on PostgreSQL 0.2 ms, eleven times the cost of a leased
/// row), and with claims of one concurrency's worth the no-op drain spent a third of its
/// time claiming.
const CLAIM_HORIZON: Duration = Duration::from_millis(50);

/// Most deliveries a lane holds, claimed and not finished.
const MAX_HELD: usize = 512;

/// How many deliveries a lane of `width` concurrent calls holds when its calls take
/// `call_us` on average (0: not measured yet): about [`CLAIM_HORIZON`]'s worth, never fewer
/// than [`CLAIM_AHEAD`] rounds of calls nor more than [`MAX_HELD`] (unless one round is more).
fn claim_depth(width: usize, call_us: u64) -> usize {
    let rounds = usize::try_from(CLAIM_HORIZON.as_micros() / u128::from(call_us.max(1)))
        .unwrap_or(usize::MAX);
    let floor = width.saturating_mul(CLAIM_AHEAD);
    if call_us == 0 {
        return floor;
    }
    width
        .saturating_mul(rounds)
        .clamp(floor, MAX_HELD.max(floor))
}

/// The latest time (epoch ms) a call that may run `timeout_ms` can start and still end
/// inside a lease that ends at `lease_until`, with `margin_ms` to spare for recording it. A
/// delivery held past that is not called: its lease lapses and it is claimed again, so it is
/// never called twice at once, here or by another instance.
fn latest_start(lease_until: i64, timeout_ms: u64, margin_ms: i64) -> i64 {
    let timeout = i64::try_from(timeout_ms).unwrap_or(i64::MAX);
    lease_until
        .saturating_sub(timeout)
        .saturating_sub(margin_ms)
}

/// Most attempts written in one transaction.
const RECORD_BATCH: usize = 512;

/// Finished attempts waiting for the recorder; a full queue holds the lanes (back-pressure
/// while the database is slow) instead of growing without bound.
const RECORD_QUEUE: usize = 4_096;

/// A finished attempt and the lane to wake once it is stored (the session's next delivery to
/// that connector becomes claimable then).
type Finished = (AttemptRecord, Arc<Notify>);

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

/// A running lane: its wake-up and its task.
struct LaneHandle {
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Dispatcher {
    /// A dispatcher over this store, runtime and connector registry.
    pub fn new(
        store: Store,
        runtime: Runtime,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: DispatcherConfig,
        admission: Arc<Admission>,
    ) -> Self {
        let wake = store.committed();
        let slots = config.concurrency.max(1);
        let calls = Arc::new(Semaphore::new(slots));
        metrics.set_call_slots(slots);
        Dispatcher {
            store,
            runtime,
            registry,
            metrics,
            wake,
            config,
            calls,
            admission,
            behind_since: Arc::default(),
            ssf: None,
        }
    }

    /// Routes events to the transmitter's streams too, and delivers its push streams.
    pub fn with_ssf(mut self, ssf: Arc<SsfTransmitter>) -> Self {
        self.ssf = Some(ssf);
        self
    }

    /// Runs until `shutdown` turns true, then waits for calls in flight (each bounded by its
    /// connector's deadline) and their records, and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        match self.store.release_leases().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deliveries = n,
                "resuming deliveries interrupted by a restart"
            ),
            Err(e) => tracing::error!(error = %e, "cannot release stale delivery leases"),
        }
        let (finished, to_record) = mpsc::channel::<Finished>(RECORD_QUEUE);
        let recorder = tokio::spawn(record_batches(self.store.clone(), to_record));
        // Deliveries fanned out by other instances (PostgreSQL) wake every lane.
        let announced = Arc::new(Notify::new());
        let watcher = {
            let (store, announced, shutdown) =
                (self.store.clone(), announced.clone(), shutdown.clone());
            tokio::spawn(async move { store.watch_deliveries(announced, shutdown).await })
        };
        let mut lanes: HashMap<String, LaneHandle> = HashMap::new();
        let fan_out_lag = self.admission.source();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let round_began = tokio::time::Instant::now();
            self.open_lanes(&mut lanes, &finished, &shutdown);
            // One fan-out batch per round, then the lanes claim: under a steady stream of new
            // events a full batch is always waiting, and fanning out until the outbox is
            // empty would starve delivery for as long as the load lasts.
            let backlog = match self.fan_out().await {
                Ok(Some(done)) => {
                    fan_out_lag.publish(age(done.oldest_routed_ms));
                    for name in &done.connectors {
                        if let Some(lane) = lanes.get(name) {
                            lane.wake.notify_one();
                        }
                    }
                    done.events >= crate::store::deliveries::FAN_OUT_BATCH as usize
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::error!(error = %e, "outbox fan-out failed; retrying");
                    false
                }
            };
            if backlog {
                // More events are already waiting to be routed: no need to sleep.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {
                    tokio::time::sleep_until(round_began + self.config.coalesce).await;
                }
                _ = announced.notified() => {
                    for lane in lanes.values() {
                        lane.wake.notify_one();
                    }
                }
                _ = tokio::time::sleep(self.config.poll) => {}
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!(lanes = lanes.len(), "dispatcher draining");
        for (name, lane) in lanes {
            if let Err(e) = lane.task.await {
                tracing::error!(connector = %name, error = %e, "delivery lane failed");
            }
        }
        drop(finished);
        if let Err(e) = recorder.await {
            tracing::error!(error = %e, "delivery recorder failed");
        }
        watcher.abort();
    }

    /// Starts a lane for every enabled connector that has none running (new, enabled again,
    /// or whose lane ended).
    fn open_lanes(
        &self,
        lanes: &mut HashMap<String, LaneHandle>,
        finished: &mpsc::Sender<Finished>,
        shutdown: &watch::Receiver<bool>,
    ) {
        lanes.retain(|_, lane| !lane.task.is_finished());
        let streams = self
            .ssf
            .as_ref()
            .map(|s| s.push_targets())
            .unwrap_or_default();
        let connectors = self.registry.snapshot();
        let enabled = connectors
            .iter()
            .filter(|(_, entry)| entry.enabled)
            .map(|(name, _)| name)
            .chain(streams.iter());
        for name in enabled {
            if lanes.contains_key(name) {
                continue;
            }
            let wake = Arc::new(Notify::new());
            let lane = Lane {
                dispatcher: self.clone(),
                connector: name.clone(),
                wake: wake.clone(),
                finished: finished.clone(),
                lag: self.admission.source(),
                call_us: Arc::default(),
            };
            let task = tokio::spawn(lane.run(shutdown.clone()));
            lanes.insert(name.clone(), LaneHandle { wake, task });
        }
    }

    /// Fans out one batch of committed events not yet routed.
    async fn fan_out(&self) -> crate::store::Result<Option<crate::store::deliveries::FanOut>> {
        let registry = self.registry.clone();
        let ssf = self.ssf.clone();
        let route = route_on_first_use(
            move || {
                (
                    registry.snapshot(),
                    ssf.as_ref().map(|s| s.routes_snapshot()),
                )
            },
            |(connectors, streams), event| {
                // Disabled connectors are routed to as well: their deliveries are held. A
                // connector only gets events its world has a hook for (refresh needs 0.2.0);
                // loading already refuses a 0.1.0 component subscribed to refresh. Paused
                // streams likewise hold theirs.
                let to_streams = streams.as_ref().map(|r| r(event)).unwrap_or_default();
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
                    .chain(to_streams)
                    .collect()
            },
        );
        let registry = self.registry.clone();
        let gate: Gate = Arc::new(move |uploads| registry.covers(uploads));
        let Some(done) = self.store.fan_out(route, gate).await? else {
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
            return Ok(None);
        };
        if let Ok(mut behind) = self.behind_since.lock() {
            *behind = None;
        }
        if done.events > 0 {
            tracing::debug!(
                events = done.events,
                deliveries = done.deliveries,
                "fanned out outbox events"
            );
        }
        Ok(Some(done))
    }

    /// One attempt of one delivery; `None` when the delivery was given back untouched.
    async fn attempt(&self, delivery: ClaimedDelivery) -> Option<AttemptRecord> {
        let attempt = u32::try_from(delivery.attempts)
            .unwrap_or(0)
            .saturating_add(1);
        let started_at = now_millis();
        // Resolve the target now: a replacement loaded since the claim serves the attempt.
        let Some(target) = self.target_of(&delivery.connector) else {
            // Unloaded, disabled, paused or deleted after the claim: give the delivery back
            // untouched; it waits for its target to return (or is dropped with a stream).
            tracing::info!(
                connector = %delivery.connector,
                delivery = delivery.id,
                "delivery held"
            );
            if let Err(e) = self.store.unlease(vec![delivery.id]).await {
                tracing::warn!(error = %e, "cannot release the lease; it expires instead");
            }
            return None;
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
        let metrics = self.metrics.connector(&delivery.connector);
        let running = metrics.call_started();
        let clock = std::time::Instant::now();
        let outcome = match &target {
            Target::Hook(connector) => {
                self.runtime
                    .call(connector, &delivery.event)
                    .instrument(span.clone())
                    .await
            }
            Target::Push(ssf, stream) => {
                ssf.push(stream, &delivery.event)
                    .instrument(span.clone())
                    .await
            }
        };
        let took = clock.elapsed();
        drop(running);
        let _enter = span.enter();
        let finished_at = now_millis();
        let (policy, version) = match &target {
            Target::Hook(connector) => (&connector.manifest.policy, connector.version.clone()),
            // The receiver's answer stands in for a hook's result, under a fixed policy.
            Target::Push(..) => (&ssf_transmit::PUSH_POLICY, "ssf-push".to_owned()),
        };
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
        Some(AttemptRecord {
            delivery_id: delivery.id,
            attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
            result,
            outcome: outcome_label,
            error,
            version,
            started_at,
            finished_at,
        })
    }

    /// The connector or push stream a delivery goes to, if it can take one now.
    fn target_of(&self, name: &str) -> Option<Target<'_>> {
        if name.starts_with(ssf_transmit::TARGET_PREFIX) {
            let ssf = self.ssf.as_deref()?;
            Some(Target::Push(ssf, ssf.push_stream(name)?))
        } else {
            let entry = self.registry.get(name).filter(|e| e.enabled)?;
            Some(Target::Hook(entry.connector.clone()))
        }
    }
}

/// Where one attempt goes: a connector's hook, or a Shared Signals stream's receiver.
enum Target<'a> {
    Hook(Arc<LoadedConnector>),
    Push(&'a SsfTransmitter, Arc<ssf_transmit::Stream>),
}

impl Dispatcher {
    /// A lane's width and call deadline (ms): its connector's manifest, or the fixed ones of
    /// a push stream; `None` when the target is gone, disabled or paused (the lane ends).
    fn lane_settings(&self, target: &str) -> Option<(usize, u64)> {
        if target.starts_with(ssf_transmit::TARGET_PREFIX) {
            self.ssf
                .as_ref()?
                .push_stream(target)
                .map(|_| (ssf_transmit::PUSH_WIDTH, ssf_transmit::PUSH_TIMEOUT_MS))
        } else {
            let entry = self.registry.get(target).filter(|e| e.enabled)?;
            let manifest = &entry.connector.manifest;
            Some((
                usize::try_from(manifest.concurrency).unwrap_or(1).max(1),
                manifest.timeout_ms,
            ))
        }
    }
}

/// One connector's delivery lane: claims its due deliveries (never more than its
/// `concurrency` in flight) and runs them, independently of every other lane, so a slow or
/// failing connector holds only its own deliveries. It ends when its connector is unloaded
/// or disabled, after the calls in flight.
struct Lane {
    dispatcher: Dispatcher,
    connector: String,
    wake: Arc<Notify>,
    finished: mpsc::Sender<Finished>,
    /// How long the oldest first attempt it claimed had waited (for admission).
    lag: LagSource,
    /// Moving average of its calls' duration in microseconds.
    call_us: Arc<std::sync::atomic::AtomicU64>,
}

impl Lane {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let d = &self.dispatcher;
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut poll = tokio::time::interval(d.config.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the queue may hold due deliveries: set by wake-ups and the poll, cleared
        // when a claim finds fewer than it asked for.
        let mut due = true;
        // The calls that may run at once: the manifest's concurrency.
        let slots = Arc::new(Slots::default());
        // Claimed deliveries waiting for a call slot, in claim order, each with the latest
        // time its call may start. They are plain values, not parked tasks (a delivery's task
        // is 3.5 KB before it runs), so the next batch is claimed while one runs at little
        // cost in memory. Each call slot is a worker that takes the next one as soon as its
        // call ends, without a round trip through this loop.
        let held: Held = Arc::default();
        let progress = Arc::new(Notify::new());
        loop {
            while let Some(res) = in_flight.try_join_next() {
                if let Err(e) = res {
                    tracing::error!(connector = %self.connector, error = %e, "delivery task failed");
                }
            }
            if *shutdown.borrow() {
                break;
            }
            let Some((width, timeout_ms)) = d.lane_settings(&self.connector) else {
                break;
            };
            slots.allowed.store(width, Ordering::SeqCst);
            let waiting = lock(&held).len();
            for _ in 0..waiting {
                let Some(slot) = Slot::take(&slots) else {
                    break;
                };
                self.spawn(&mut in_flight, slot, &held, &progress, &shutdown);
            }
            let call_us = self.call_us.load(std::sync::atomic::Ordering::Relaxed);
            let depth = claim_depth(width, call_us);
            let free = depth.saturating_sub(in_flight.len() + lock(&held).len());
            // Claim in batches (half the depth or more), not one per finished call: each
            // claim is a database transaction, and on a busy writer it waits behind other
            // transactions while the claimed half still runs.
            if due && free > 0 && (free * 2 >= depth || in_flight.is_empty()) {
                // A delivery claimed ahead waits for about the claim horizon before its own
                // call, far less than a timeout; one that waits longer (the connector
                // slowed down) is not called once its lease could end before the call does.
                let lease_until = now_millis()
                    + i64::try_from(timeout_ms)
                        .unwrap_or(i64::MAX / 8)
                        .saturating_mul(CLAIM_AHEAD as i64)
                    + i64::try_from(d.config.lease_margin.as_millis()).unwrap_or(5_000);
                let asked = i64::try_from(free).unwrap_or(i64::MAX);
                let lane = LaneClaim {
                    connector: self.connector.clone(),
                    limit: asked,
                    lease_until,
                };
                match d.store.claim(lane).await {
                    Ok(claimed) => {
                        due = i64::try_from(claimed.len()).unwrap_or(i64::MAX) >= asked;
                        self.publish_lag(&claimed);
                        let margin_ms =
                            i64::try_from(d.config.lease_margin.as_millis() / 2).unwrap_or(0);
                        let call_by = latest_start(lease_until, timeout_ms, margin_ms);
                        lock(&held).extend(claimed.into_iter().map(|delivery| (delivery, call_by)));
                    }
                    Err(e) => {
                        // Try again at the next poll, not in a tight loop.
                        due = false;
                        tracing::error!(connector = %self.connector, error = %e, "claiming deliveries failed; retrying");
                    }
                }
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => due = true,
                // A call ended: maybe time to claim the next batch.
                _ = progress.notified() => {}
                Some(res) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(e) = res {
                        tracing::error!(connector = %self.connector, error = %e, "delivery task failed");
                    }
                }
                _ = poll.tick() => due = true,
                _ = shutdown.changed() => {}
            }
        }
        // No slot left: each worker ends after its call instead of taking the next held
        // delivery, which would only find its connector gone and give it back on its own.
        slots.allowed.store(0, Ordering::SeqCst);
        while let Some(res) = in_flight.join_next().await {
            if let Err(e) = res {
                tracing::error!(connector = %self.connector, error = %e, "delivery task failed");
            }
        }
        // Stopping, or the connector went away: what was claimed ahead and not started goes
        // back in one statement, so another instance (or this one restarted) takes it at once
        // instead of after its lease.
        let ids = std::mem::take(&mut *lock(&held))
            .into_iter()
            .map(|(delivery, _)| delivery.id)
            .collect();
        if let Err(e) = d.store.unlease(ids).await {
            tracing::warn!(connector = %self.connector, error = %e, "cannot release the leases of deliveries claimed ahead; they expire instead");
        }
    }

    /// Publishes how long the oldest first attempt of a claim waited (claims take the most
    /// overdue first, so that is the lane's backlog), or nothing when this connector's calls
    /// are too slow for the budget: its lag is then its own, not the API's to work off.
    fn publish_lag(&self, claimed: &[ClaimedDelivery]) {
        let oldest = claimed
            .iter()
            .filter(|d| d.attempts == 0)
            .map(|d| d.event.occurred_at.timestamp_millis())
            .min();
        let call = Duration::from_micros(self.call_us.load(std::sync::atomic::Ordering::Relaxed));
        let counted = self.lag.budget().is_none_or(|b| call <= b / 4);
        self.lag
            .publish(if counted { age(oldest) } else { Duration::ZERO });
    }

    /// Starts a worker on the lane's call `slot`: it runs the held deliveries one after
    /// another, in claim order, and hands each record to the recorder; it ends when none is
    /// left, when the lane has more workers than its connector's concurrency now allows (a
    /// swap lowered it), or when the dispatcher stops (what is left is given back by the
    /// lane).
    fn spawn(
        &self,
        in_flight: &mut JoinSet<()>,
        mut slot: Slot,
        held: &Held,
        progress: &Arc<Notify>,
        shutdown: &watch::Receiver<bool>,
    ) {
        let (d, finished, wake, call_us, held, progress, mut shutdown) = (
            self.dispatcher.clone(),
            self.finished.clone(),
            self.wake.clone(),
            self.call_us.clone(),
            held.clone(),
            progress.clone(),
            shutdown.clone(),
        );
        let task = async move {
            loop {
                if *shutdown.borrow() || slot.shed() || lock(&held).is_empty() {
                    return;
                }
                // Free slots were counted before the claim; another lane may have taken one
                // since, and then this worker waits for the next (each ends by its deadline).
                // It takes a delivery only once it has a slot: one taken before would be
                // called after a stop that came during the wait, which must start no call,
                // instead of going back with the rest of the lane's held deliveries.
                let _call = tokio::select! {
                    biased;
                    // (A sender that is gone sends no stop: then only the slot counts.)
                    Ok(_) = shutdown.wait_for(|stop| *stop) => return,
                    permit = d.calls.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                };
                if *shutdown.borrow() || slot.shed() {
                    return;
                }
                let Some((delivery, call_by)) = lock(&held).pop_front() else {
                    return;
                };
                if now_millis() > call_by {
                    tracing::info!(
                        connector = %delivery.connector,
                        delivery = delivery.id,
                        "claimed delivery waited too long for its call; it is claimed again \
                         once its lease ends"
                    );
                    continue;
                }
                let clock = std::time::Instant::now();
                let record = d.attempt(delivery).await;
                observe_call(&call_us, clock.elapsed());
                if let Some(record) = record
                    && finished.send((record, wake.clone())).await.is_err()
                {
                    // Only at shutdown after the recorder stopped: the lease expires and the
                    // delivery is made again (at least once).
                    tracing::warn!("delivery attempt not recorded: the recorder has stopped");
                }
                progress.notify_one();
            }
        };
        // On a hook thread the calls run in place: no hop there and back per delivery.
        match crate::runtime::delivery_threads() {
            Some(threads) => {
                let (thread, task) = threads.place(task);
                in_flight.spawn_on(task, thread)
            }
            None => in_flight.spawn(task),
        };
    }
}

/// A lane's call slots: how many workers it may run (its connector's `concurrency`, which a
/// swap may change while the lane runs) and how many it runs.
#[derive(Default)]
struct Slots {
    allowed: AtomicUsize,
    busy: AtomicUsize,
}

/// One worker's call slot, free again when the worker ends (returns or panics).
struct Slot {
    slots: Arc<Slots>,
    held: bool,
}

impl Slot {
    /// A slot for a new worker, if the lane runs fewer than it allows.
    fn take(slots: &Arc<Slots>) -> Option<Slot> {
        slots
            .busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |busy| {
                (busy < slots.allowed.load(Ordering::SeqCst)).then_some(busy + 1)
            })
            .ok()
            .map(|_| Slot {
                slots: slots.clone(),
                held: true,
            })
    }

    /// Frees this slot if the lane runs more workers than it now allows; the worker then
    /// ends after its call, so a lowered concurrency holds from the next call on, not from
    /// the end of the backlog.
    fn shed(&mut self) -> bool {
        let slots = &self.slots;
        let shed = slots
            .busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |busy| {
                (busy > slots.allowed.load(Ordering::SeqCst)).then(|| busy - 1)
            })
            .is_ok();
        if shed {
            self.held = false;
        }
        shed
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.slots.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A lane's claimed deliveries not yet started, with the latest start of each call.
type Held = Arc<std::sync::Mutex<VecDeque<(ClaimedDelivery, i64)>>>;

/// The held queue, even if a worker panicked while holding it (a queue stays consistent).
fn lock(held: &Held) -> std::sync::MutexGuard<'_, VecDeque<(ClaimedDelivery, i64)>> {
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long ago `at_ms` was (zero for `None` or a time in the future).
fn age(at_ms: Option<i64>) -> Duration {
    at_ms.map_or(Duration::ZERO, |at| {
        Duration::from_millis(u64::try_from(now_millis().saturating_sub(at)).unwrap_or(0))
    })
}

/// Folds one call's duration into a lane's moving average (weight 1/8): races between calls
/// finishing together lose an update, which an average can afford.
fn observe_call(average_us: &std::sync::atomic::AtomicU64, took: Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    let old = average_us.load(Relaxed);
    let new = if old == 0 {
        took
    } else {
        old.saturating_mul(7).saturating_add(took) / 8
    };
    average_us.store(new, Relaxed);
}

/// Writes finished attempts, as many per transaction as have queued up while the previous
/// batch was written, and wakes their lanes afterwards. Ends when every lane has stopped.
async fn record_batches(store: Store, mut queue: mpsc::Receiver<Finished>) {
    let mut batch: Vec<Finished> = Vec::with_capacity(RECORD_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < RECORD_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let records: Vec<AttemptRecord> = batch.iter().map(|(r, _)| r.clone()).collect();
        // If recording fails the leases expire and the attempts are made again (at least
        // once).
        for wait in [0u64, 100, 500, 2_000] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            match store.record(records.clone()).await {
                Ok(()) => break,
                Err(e) => tracing::error!(
                    error = %e,
                    attempts = records.len(),
                    "cannot record delivery attempts"
                ),
            }
        }
        let mut woken: Vec<&Arc<Notify>> = Vec::new();
        for (_, lane) in &batch {
            if !woken.iter().any(|w| Arc::ptr_eq(w, lane)) {
                lane.notify_one();
                woken.push(lane);
            }
        }
        batch.clear();
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
    fn a_lane_runs_at_most_its_concurrency_and_sheds_workers_when_it_is_lowered() {
        let slots = Arc::new(Slots::default());
        slots.allowed.store(2, Ordering::SeqCst);
        let mut a = Slot::take(&slots).unwrap();
        let mut b = Slot::take(&slots).unwrap();
        assert!(Slot::take(&slots).is_none(), "two allowed, two running");
        assert!(!a.shed() && !b.shed(), "none to shed at the allowed width");

        // A swap lowers the concurrency to 1: exactly one worker ends after its call.
        slots.allowed.store(1, Ordering::SeqCst);
        assert!(a.shed());
        assert!(!b.shed(), "the other keeps its slot");
        drop(a);
        assert_eq!(
            slots.busy.load(Ordering::SeqCst),
            1,
            "a shed slot is freed once"
        );
        assert!(Slot::take(&slots).is_none());

        // A worker that ends (or panics) frees its slot for the next.
        drop(b);
        assert_eq!(slots.busy.load(Ordering::SeqCst), 0);
        assert!(Slot::take(&slots).is_some());
    }

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
    fn quick_lanes_claim_deep_and_slow_ones_two_rounds() {
        // Not measured yet, or slow calls: two rounds of the lane's width.
        assert_eq!(claim_depth(16, 0), 32);
        assert_eq!(claim_depth(16, 2_000_000), 32);
        assert_eq!(claim_depth(16, 30_000), 32);
        // 50 ms of 1 ms calls, 16 at a time.
        assert_eq!(claim_depth(16, 1_000), 800.min(MAX_HELD));
        assert_eq!(claim_depth(4, 1_000), 200);
        // No-op calls: capped.
        assert_eq!(claim_depth(16, 12), MAX_HELD);
        // A lane wider than the cap still runs two rounds.
        assert_eq!(claim_depth(400, 12), 800);
    }

    #[test]
    fn a_call_starts_only_if_it_ends_inside_its_lease() {
        // Lease to 10,000 ms; calls of up to 2,000 ms with 500 ms to record.
        let start_by = latest_start(10_000, 2_000, 500);
        assert!(7_500 <= start_by);
        assert!(7_501 > start_by);
        assert!(12_000 > start_by);
        // A deadline beyond any lease: never.
        assert!(0 > latest_start(i64::MAX - 1, u64::MAX, 0));
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
