//! Process metrics in the Prometheus text format (`GET /metrics`): per-connector hook calls by
//! outcome, hook latency histograms, dead letters and swaps, and the compile cache. Counters
//! are atomics, so recording on the delivery path never locks; the per-connector map is only
//! written when a connector is first seen. Also the reconciler's passes, per realm.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::store::connectors::Backlog;

/// Upper bounds (seconds) of the hook latency buckets.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Outcome labels of a hook call (as recorded in delivery attempts).
pub const OUTCOMES: [&str; 6] = ["delivered", "retry", "fail", "timeout", "oom", "trap"];

/// A cumulative latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `q` quantile (0..=1) in seconds, interpolated linearly inside its bucket (the
    /// usual Prometheus estimate); `None` before the first observation.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            if n > 0 && (seen + n) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
                let Some(&upper) = LATENCY_BUCKETS.get(i) else {
                    // +Inf bucket: the best statement is its lower bound.
                    return Some(lower);
                };
                let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * within);
            }
            seen += n;
        }
        LATENCY_BUCKETS.last().copied()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |v| v.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count());
    }
}

/// Counters of one connector (kept across replacements: they describe the name).
#[derive(Debug, Default)]
pub struct ConnectorMetrics {
    calls: [AtomicU64; OUTCOMES.len()],
    /// Hook latency.
    pub latency: Histogram,
    dead: AtomicU64,
    dropped: AtomicU64,
    swaps: AtomicU64,
    rejected: AtomicU64,
    /// Calls running now (a gauge).
    in_flight: AtomicU64,
}

/// One running call of a connector, counted in its in-flight gauge until dropped (also when
/// the call's task is cancelled).
pub struct CallInFlight(Arc<ConnectorMetrics>);

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectorMetrics {
    /// A call starts: counted as running until the returned guard drops.
    pub fn call_started(self: &Arc<Self>) -> CallInFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        CallInFlight(self.clone())
    }

    /// Calls running now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// One hook call with its outcome label.
    pub fn hook_call(&self, outcome: &str, took: Duration) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.calls[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency.observe(took);
    }

    /// Calls with this outcome so far.
    pub fn calls(&self, outcome: &str) -> u64 {
        OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.calls[i].load(Ordering::Relaxed))
    }

    /// Calls that did not deliver.
    pub fn failed_calls(&self) -> u64 {
        OUTCOMES.iter().skip(1).map(|o| self.calls(o)).sum::<u64>()
    }

    /// A delivery was dead-lettered.
    pub fn dead_letter(&self) {
        self.dead.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery was dropped (log policy).
    pub fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A new version was swapped in.
    pub fn swapped(&self) {
        self.swaps.fetch_add(1, Ordering::Relaxed);
    }

    /// A candidate version was refused.
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
}

/// State of a connector at scrape time (from the registry).
#[derive(Clone, Debug)]
pub struct ConnectorGauge {
    /// Name.
    pub name: String,
    /// Version serving.
    pub version: String,
    /// `directory` or `api`.
    pub source: &'static str,
    /// Whether it receives deliveries.
    pub enabled: bool,
    /// Pending, dead and dropped deliveries in the database, when they could be read.
    pub queue: Option<crate::store::connectors::QueueCounts>,
}

/// Back-pressure of deliveries onto new sessions (`sync::admission`).
#[derive(Debug, Default)]
pub struct AdmissionMetrics {
    lag_ms: AtomicU64,
    held: AtomicU64,
    refused: AtomicU64,
}

impl AdmissionMetrics {
    /// The delivery lag that admission compares with its budget.
    pub fn set_lag_ms(&self, ms: u64) {
        self.lag_ms.store(ms, Ordering::Relaxed);
    }

    /// A new session waited for the backlog to shrink.
    pub fn held(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    /// A new session was refused because the backlog did not shrink in time.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Sessions held and refused so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.held.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// Counters of one realm's reconciler.
#[derive(Debug, Default)]
pub struct ReconcileMetrics {
    checked: AtomicU64,
    unsure: AtomicU64,
    errors: AtomicU64,
    ended: AtomicU64,
    calls: AtomicU64,
    /// End of the last pass that went through the whole realm (epoch ms; 0: none yet).
    last_run_ms: AtomicU64,
}

impl ReconcileMetrics {
    /// One pass: PARENTs checked and left alone, failed calls, sessions ended, calls made,
    /// and whether it went through the whole realm.
    pub fn pass(
        &self,
        checked: u64,
        unsure: u64,
        errors: u64,
        ended: u64,
        calls: u64,
        whole: bool,
    ) {
        self.checked.fetch_add(checked, Ordering::Relaxed);
        self.unsure.fetch_add(unsure, Ordering::Relaxed);
        self.errors.fetch_add(errors, Ordering::Relaxed);
        self.ended.fetch_add(ended, Ordering::Relaxed);
        self.calls.fetch_add(calls, Ordering::Relaxed);
        if whole {
            let now = u64::try_from(crate::store::now_millis()).unwrap_or(0);
            self.last_run_ms.store(now, Ordering::Relaxed);
        }
    }
}

/// A configured connector that serves no version because it failed to load.
#[derive(Clone, Debug)]
pub struct FailedGauge {
    /// Name (the manifest's file stem when the manifest itself is unreadable).
    pub name: String,
    /// `directory` or `api`.
    pub source: &'static str,
}

/// Every metric of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    connectors: RwLock<BTreeMap<String, Arc<ConnectorMetrics>>>,
    reconcile: RwLock<BTreeMap<String, Arc<ReconcileMetrics>>>,
    compile_hits: AtomicU64,
    compile_misses: AtomicU64,
    admission: AdmissionMetrics,
    /// Calls the instance runs at once at most, over every connector (0 until set).
    call_slots: AtomicU64,
    /// Request latency by (method, route template, status).
    http: RwLock<BTreeMap<RequestKey, Arc<Histogram>>>,
}

/// (method, route template, status) of an answered request.
type RequestKey = (&'static str, String, u16);

/// The methods the API serves; anything else is counted as `other` (labels stay bounded).
const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

impl Metrics {
    /// Counters of a realm's reconciler (created on first use).
    pub fn reconcile(&self, realm: &str) -> Arc<ReconcileMetrics> {
        let mut map = self.reconcile.write().unwrap_or_else(|p| p.into_inner());
        map.entry(realm.to_owned()).or_default().clone()
    }

    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most calls the instance runs at once (the dispatcher's limit), for the scrape.
    pub fn set_call_slots(&self, slots: usize) {
        self.call_slots
            .store(u64::try_from(slots).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The counters of one connector, created on first use.
    pub fn connector(&self, name: &str) -> Arc<ConnectorMetrics> {
        if let Ok(map) = self.connectors.read()
            && let Some(m) = map.get(name)
        {
            return m.clone();
        }
        match self.connectors.write() {
            Ok(mut map) => map.entry(name.to_owned()).or_default().clone(),
            // A panic while holding the lock cannot leave a map half-written; keep counting.
            Err(poisoned) => poisoned
                .into_inner()
                .entry(name.to_owned())
                .or_default()
                .clone(),
        }
    }

    /// One answered HTTP request: `route` is the matched route template (`unmatched` when no
    /// route matched), so label values stay bounded whatever paths clients send.
    pub fn http_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let method = METHODS
            .iter()
            .find(|m| m.eq_ignore_ascii_case(method))
            .copied()
            .unwrap_or("other");
        let key = (method, route.to_owned(), status);
        let found = match self.http.read() {
            Ok(map) => map.get(&key).cloned(),
            Err(poisoned) => poisoned.into_inner().get(&key).cloned(),
        };
        let histogram = match found {
            Some(h) => h,
            None => {
                let mut map = self.http.write().unwrap_or_else(|p| p.into_inner());
                map.entry(key).or_default().clone()
            }
        };
        histogram.observe(took);
    }

    /// Back-pressure counters.
    pub fn admission(&self) -> &AdmissionMetrics {
        &self.admission
    }

    /// A component was compiled (`hit == false`) or taken from the compile cache.
    pub fn compiled(&self, hit: bool) {
        let c = if hit {
            &self.compile_hits
        } else {
            &self.compile_misses
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Compile-cache hits and misses so far.
    pub fn compile_counts(&self) -> (u64, u64) {
        (
            self.compile_hits.load(Ordering::Relaxed),
            self.compile_misses.load(Ordering::Relaxed),
        )
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(
        &self,
        gauges: &[ConnectorGauge],
        failed: &[FailedGauge],
        backlog: Option<Backlog>,
    ) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let snapshot: Vec<(String, Arc<ConnectorMetrics>)> = match self.connectors.read() {
            Ok(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(poisoned) => poisoned
                .into_inner()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "lockstep_connector_up",
            "gauge",
            "1 for each loaded connector and its version, source and state.",
        );
        for g in gauges {
            let state = if g.enabled { "active" } else { "disabled" };
            let _ = writeln!(
                out,
                "lockstep_connector_up{{connector=\"{}\",version=\"{}\",source=\"{}\",state=\"{state}\"}} 1",
                g.name, g.version, g.source
            );
        }
        family(
            &mut out,
            "lockstep_connector_failed",
            "gauge",
            "1 for each configured connector that serves no version because it failed to load (its lastError in /admin/connectors says why).",
        );
        for f in failed {
            let _ = writeln!(
                out,
                "lockstep_connector_failed{{connector=\"{}\",source=\"{}\"}} 1",
                f.name, f.source
            );
        }
        family(
            &mut out,
            "lockstep_connector_enabled",
            "gauge",
            "1 when the connector receives deliveries, 0 when it is disabled (events are held).",
        );
        for g in gauges {
            let _ = writeln!(
                out,
                "lockstep_connector_enabled{{connector=\"{}\"}} {}",
                g.name,
                u8::from(g.enabled)
            );
        }
        family(
            &mut out,
            "lockstep_deliveries_queued",
            "gauge",
            "Undelivered deliveries in the database by connector and status.",
        );
        for g in gauges {
            if let Some(q) = g.queue {
                for (status, n) in [
                    ("pending", q.pending),
                    ("dead", q.dead),
                    ("dropped", q.dropped),
                ] {
                    let _ = writeln!(
                        out,
                        "lockstep_deliveries_queued{{connector=\"{}\",status=\"{status}\"}} {n}",
                        g.name
                    );
                }
            }
        }
        family(
            &mut out,
            "lockstep_hook_calls_total",
            "counter",
            "Hook calls by connector and outcome (delivered, retry, fail, timeout, oom, trap).",
        );
        for (name, m) in &snapshot {
            for outcome in OUTCOMES {
                let _ = writeln!(
                    out,
                    "lockstep_hook_calls_total{{connector=\"{name}\",outcome=\"{outcome}\"}} {}",
                    m.calls(outcome)
                );
            }
        }
        family(
            &mut out,
            "lockstep_hook_calls_in_flight",
            "gauge",
            "Hook calls running now, by connector (calls waiting for a free call slot are not counted).",
        );
        for (name, m) in &snapshot {
            let _ = writeln!(
                out,
                "lockstep_hook_calls_in_flight{{connector=\"{name}\"}} {}",
                m.in_flight()
            );
        }
        let slots = self.call_slots.load(Ordering::Relaxed);
        if slots > 0 {
            family(
                &mut out,
                "lockstep_hook_call_slots",
                "gauge",
                "Hook calls the instance runs at once at most, over every connector; when the in-flight calls of all connectors reach it, deliveries wait for a slot.",
            );
            let _ = writeln!(out, "lockstep_hook_call_slots {slots}");
        }
        family(
            &mut out,
            "lockstep_hook_duration_seconds",
            "histogram",
            "Hook call latency by connector (instantiation and the call).",
        );
        for (name, m) in &snapshot {
            m.latency.render(
                &mut out,
                "lockstep_hook_duration_seconds",
                &format!("connector=\"{name}\""),
            );
        }
        for (metric, help, read) in [
            (
                "lockstep_dead_letters_total",
                "Deliveries dead-lettered by connector.",
                (|m: &ConnectorMetrics| m.dead.load(Ordering::Relaxed))
                    as fn(&ConnectorMetrics) -> u64,
            ),
            (
                "lockstep_dropped_deliveries_total",
                "Deliveries dropped under the log policy, by connector.",
                |m| m.dropped.load(Ordering::Relaxed),
            ),
            (
                "lockstep_connector_swaps_total",
                "New versions swapped in, by connector.",
                |m| m.swaps.load(Ordering::Relaxed),
            ),
            (
                "lockstep_connector_rejected_total",
                "Candidate versions refused (invalid manifest or component), by connector.",
                |m| m.rejected.load(Ordering::Relaxed),
            ),
        ] {
            family(&mut out, metric, "counter", help);
            for (name, m) in &snapshot {
                let _ = writeln!(out, "{metric}{{connector=\"{name}\"}} {}", read(m));
            }
        }
        family(
            &mut out,
            "lockstep_compile_cache_total",
            "counter",
            "Component loads by compile-cache outcome (hit: no compilation).",
        );
        let (hits, misses) = self.compile_counts();
        let _ = writeln!(
            out,
            "lockstep_compile_cache_total{{outcome=\"hit\"}} {hits}"
        );
        let _ = writeln!(
            out,
            "lockstep_compile_cache_total{{outcome=\"miss\"}} {misses}"
        );
        family(
            &mut out,
            "lockstep_delivery_lag_seconds",
            "gauge",
            "How long the oldest event this instance still has to deliver has waited (fan-out and lanes whose calls are fast enough to count); above [limits] max_delivery_lag_ms new sessions are held.",
        );
        let a = &self.admission;
        let _ = writeln!(
            out,
            "lockstep_delivery_lag_seconds {}",
            a.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let (held, refused) = a.counts();
        family(
            &mut out,
            "lockstep_admission_held_total",
            "counter",
            "New sessions that waited for the delivery backlog to shrink.",
        );
        let _ = writeln!(out, "lockstep_admission_held_total {held}");
        family(
            &mut out,
            "lockstep_admission_refused_total",
            "counter",
            "New sessions refused (503) because the delivery backlog did not shrink within [limits] admission_wait_ms.",
        );
        let _ = writeln!(out, "lockstep_admission_refused_total {refused}");
        if let Some(b) = backlog {
            family(
                &mut out,
                "lockstep_outbox_unrouted_events",
                "gauge",
                "Outbox events committed but not yet routed to connectors (all instances).",
            );
            let _ = writeln!(out, "lockstep_outbox_unrouted_events {}", b.unrouted);
            family(
                &mut out,
                "lockstep_oldest_waiting_event_age_seconds",
                "gauge",
                "Age of the oldest event not yet routed or with a pending delivery; 0 when none.",
            );
            let age = b.oldest_waiting_ms.map_or(0.0, |at| {
                (crate::store::now_millis() - at).max(0) as f64 / 1000.0
            });
            let _ = writeln!(out, "lockstep_oldest_waiting_event_age_seconds {age}");
        }
        let reconcile: Vec<(String, Arc<ReconcileMetrics>)> = {
            let map = self.reconcile.read().unwrap_or_else(|p| p.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        if !reconcile.is_empty() {
            for (metric, kind, help, read) in [
                (
                    "lockstep_reconcile_checked_total",
                    "counter",
                    "Live PARENTs compared with Keycloak's sessions, by realm.",
                    (|m: &ReconcileMetrics| m.checked.load(Ordering::Relaxed) as f64)
                        as fn(&ReconcileMetrics) -> f64,
                ),
                (
                    "lockstep_reconcile_ended_total",
                    "counter",
                    "Sessions ended because their Keycloak session was gone (with their trees), by realm.",
                    |m| m.ended.load(Ordering::Relaxed) as f64,
                ),
                (
                    "lockstep_reconcile_skipped_total",
                    "counter",
                    "Live PARENTs left alone for want of a sure answer (no user, failed call), by realm.",
                    |m| m.unsure.load(Ordering::Relaxed) as f64,
                ),
                (
                    "lockstep_reconcile_errors_total",
                    "counter",
                    "Calls to Keycloak's admin API that failed (5xx, timeout, refused credentials), by realm.",
                    |m| m.errors.load(Ordering::Relaxed) as f64,
                ),
                (
                    "lockstep_reconcile_admin_calls_total",
                    "counter",
                    "Calls made to Keycloak (token requests included), by realm.",
                    |m| m.calls.load(Ordering::Relaxed) as f64,
                ),
                (
                    "lockstep_reconcile_last_run_timestamp_seconds",
                    "gauge",
                    "End of the last pass that went through the whole realm (Unix seconds; 0: none yet).",
                    |m| m.last_run_ms.load(Ordering::Relaxed) as f64 / 1000.0,
                ),
            ] {
                family(&mut out, metric, kind, help);
                for (realm, m) in &reconcile {
                    let _ = writeln!(out, "{metric}{{realm=\"{realm}\"}} {}", read(m));
                }
            }
        }
        family(
            &mut out,
            "lockstep_http_request_duration_seconds",
            "histogram",
            "API request latency by method, route template and status.",
        );
        let http: Vec<_> = match self.http.read() {
            Ok(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(poisoned) => poisoned
                .into_inner()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        for ((method, route, status), h) in http {
            h.render(
                &mut out,
                "lockstep_http_request_duration_seconds",
                &format!("method=\"{method}\",route=\"{route}\",status=\"{status}\""),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..99 {
            h.observe(Duration::from_micros(300)); // bucket (0.25 ms, 0.5 ms]
        }
        h.observe(Duration::from_millis(40)); // bucket (25 ms, 50 ms]
        let p50 = h.quantile(0.5).unwrap();
        assert!((0.000_25..=0.000_5).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!(p99 <= 0.000_5, "{p99}");
        let max = h.quantile(1.0).unwrap();
        assert!((0.025..=0.05).contains(&max), "{max}");
        h.observe(Duration::from_secs(120));
        assert_eq!(h.quantile(1.0), Some(60.0));
    }

    #[test]
    fn exposition_has_every_family_and_cumulative_buckets() {
        let m = Metrics::new();
        let c = m.connector("billing");
        c.hook_call("delivered", Duration::from_micros(80));
        c.hook_call("retry", Duration::from_millis(3));
        c.dead_letter();
        let running = c.call_started();
        let ended = c.call_started();
        drop(ended);
        m.set_call_slots(64);
        m.compiled(true);
        let text = m.render(
            &[ConnectorGauge {
                name: "billing".into(),
                version: "abc".into(),
                source: "api",
                enabled: false,
                queue: Some(crate::store::connectors::QueueCounts {
                    pending: 4,
                    dead: 1,
                    dropped: 0,
                }),
            }],
            &[FailedGauge {
                name: "crm".into(),
                source: "directory",
            }],
            None,
        );
        for line in [
            "lockstep_hook_calls_total{connector=\"billing\",outcome=\"delivered\"} 1",
            "lockstep_hook_calls_total{connector=\"billing\",outcome=\"retry\"} 1",
            "lockstep_hook_duration_seconds_bucket{connector=\"billing\",le=\"0.0001\"} 1",
            "lockstep_hook_duration_seconds_bucket{connector=\"billing\",le=\"+Inf\"} 2",
            "lockstep_hook_duration_seconds_count{connector=\"billing\"} 2",
            "lockstep_dead_letters_total{connector=\"billing\"} 1",
            "lockstep_hook_calls_in_flight{connector=\"billing\"} 1",
            "lockstep_hook_call_slots 64",
            "lockstep_connector_enabled{connector=\"billing\"} 0",
            "lockstep_deliveries_queued{connector=\"billing\",status=\"pending\"} 4",
            "lockstep_compile_cache_total{outcome=\"hit\"} 1",
            "lockstep_connector_failed{connector=\"crm\",source=\"directory\"} 1",
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        // Every sample line belongs to a declared family.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {family} ")), "{l}");
        }
        drop(running);
        assert_eq!(c.in_flight(), 0);
    }
}
