//! The load generator: a phase is `total` numbered operations pulled by `concurrency` tasks
//! from one atomic counter until done or out of time, each timed on its own. Also the thin
//! HTTP client for the external-sessions API.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::cpu::{CpuUse, us_per_op};

/// What one operation came to.
pub enum Outcome {
    /// Did what was asked, as documented.
    Ok,
    /// Did what was asked but not as documented (say, 200 where 201 is specified).
    Warn(String),
    /// Failed: transport error, non-2xx status, or a wrong result.
    Err(String),
}

/// Figures for one phase.
#[derive(Debug, Default, Clone)]
pub struct PhaseStats {
    pub name: String,
    /// Operations asked for.
    pub planned: usize,
    /// Operations done (including failed ones) before the counter or the time cap ran out.
    pub ops: usize,
    /// Requests each operation stands for (a ceiling's group transaction does many), to
    /// turn ops/s into requests/s.
    pub requests_per_op: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub warnings: usize,
    pub first_warning: Option<String>,
    pub elapsed: Duration,
    /// CPU used while the phase ran, when it was measured.
    pub cpu: Option<CpuUse>,
    /// Per-operation latencies in microseconds, sorted.
    latencies_us: Vec<u64>,
}

impl PhaseStats {
    pub fn named(name: &str) -> Self {
        PhaseStats {
            name: name.to_owned(),
            requests_per_op: 1,
            ..PhaseStats::default()
        }
    }

    /// A phase measured elsewhere (pgbench): `ops` operations over `elapsed`, with the
    /// latencies that were logged.
    pub fn measured(
        name: &str,
        planned: usize,
        ops: usize,
        elapsed: Duration,
        mut latencies_us: Vec<u64>,
    ) -> Self {
        latencies_us.sort_unstable();
        PhaseStats {
            planned,
            ops,
            elapsed,
            latencies_us,
            ..PhaseStats::named(name)
        }
    }

    /// Operations per second over the phase's wall time.
    pub fn ops_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    /// Requests per second (operations per second where an operation is one request).
    pub fn requests_per_sec(&self) -> f64 {
        self.ops_per_sec() * self.requests_per_op as f64
    }

    /// CPU per request of one process group, in microseconds.
    pub fn cpu_us_per_request(&self, which: impl Fn(&CpuUse) -> Option<Duration>) -> Option<f64> {
        us_per_op(
            self.cpu.as_ref().and_then(which),
            self.ops * self.requests_per_op,
        )
    }

    /// Nearest-rank percentile of the latencies, in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let n = self.latencies_us.len();
        let rank = ((q / 100.0) * n as f64).ceil() as usize;
        let idx = rank.clamp(1, n) - 1;
        self.latencies_us[idx] as f64 / 1000.0
    }

    /// True when the time cap stopped the phase early.
    pub fn capped(&self) -> bool {
        self.ops < self.planned
    }

    /// Folds another phase's counts into this one (for multi-step builds).
    pub fn absorb(&mut self, other: &PhaseStats) {
        self.planned += other.planned;
        self.ops += other.ops;
        self.errors += other.errors;
        self.warnings += other.warnings;
        self.elapsed += other.elapsed;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        if self.first_warning.is_none() {
            self.first_warning.clone_from(&other.first_warning);
        }
        self.latencies_us.extend_from_slice(&other.latencies_us);
        self.latencies_us.sort_unstable();
    }

    /// Sorts the latencies [`PhaseStats::record`] collected (percentiles need them sorted).
    pub(crate) fn finish(&mut self) {
        self.latencies_us.sort_unstable();
    }

    pub(crate) fn record(&mut self, latency: Duration, outcome: Outcome) {
        self.ops += 1;
        self.latencies_us
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        match outcome {
            Outcome::Ok => {}
            Outcome::Warn(msg) => {
                self.warnings += 1;
                self.first_warning.get_or_insert(msg);
            }
            Outcome::Err(msg) => {
                self.errors += 1;
                self.first_error.get_or_insert(msg);
            }
        }
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}: {} ops in {:.1} s = {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
            self.name,
            self.ops,
            self.elapsed.as_secs_f64(),
            self.ops_per_sec(),
            self.percentile_ms(50.0),
            self.percentile_ms(99.0),
            self.errors,
        );
        if self.capped() {
            line.push_str(&format!(
                " (time cap: {} of {} ops)",
                self.ops, self.planned
            ));
        }
        if let Some(e) = &self.first_error {
            line.push_str(&format!("\n      first error: {e}"));
        }
        if let Some(w) = &self.first_warning {
            line.push_str(&format!("\n      {} warnings, first: {w}", self.warnings));
        }
        line
    }
}

/// Runs `op(0..total)` from `concurrency` tasks until all are done or `cap` has passed.
pub async fn run_phase<F, Fut>(
    name: &str,
    total: usize,
    concurrency: usize,
    cap: Duration,
    op: F,
) -> Result<PhaseStats>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + cap;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.clamp(1, total.max(1)) {
        let op = Arc::clone(&op);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut stats = PhaseStats::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    break;
                }
                let began = Instant::now();
                let outcome = op(i).await;
                stats.record(began.elapsed(), outcome);
            }
            stats
        });
    }
    let mut stats = PhaseStats::named(name);
    while let Some(joined) = tasks.join_next().await {
        let worker = joined.with_context(|| format!("a {name} worker task failed"))?;
        stats.absorb(&worker);
    }
    stats.planned = total;
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Client for `/admin/realms/{realm}/external-sessions`, sharing keep-alive connections.
pub struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub fn new(
        addr: SocketAddr,
        realm: &str,
        token: &str,
        concurrency: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(concurrency)
            .timeout(timeout)
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            client,
            base: format!("http://{addr}/admin/realms/{realm}/external-sessions"),
            token: token.to_owned(),
        })
    }

    pub async fn map_parent(&self, external_id: &str, idp_session: &str, user: &str) -> Outcome {
        let body = json!({
            "externalId": external_id,
            "keycloakSessionId": idp_session,
            "userId": user,
        });
        self.post("map-parent", &body, StatusCode::CREATED)
            .await
            .map_or_else(Outcome::Err, |(_, warn)| warn)
    }

    pub async fn map_child(&self, external_id: &str, parent: &str) -> Outcome {
        let body = json!({ "externalId": external_id, "parentExternalId": parent });
        self.post("map-child", &body, StatusCode::CREATED)
            .await
            .map_or_else(Outcome::Err, |(_, warn)| warn)
    }

    /// Destroys a parent; the response must list exactly `expect_changed` sessions.
    pub async fn destroy_parent(&self, external_id: &str, expect_changed: usize) -> Outcome {
        let body = json!({ "externalId": external_id });
        let (value, warn) = match self.post("destroy-parent", &body, StatusCode::OK).await {
            Ok(ok) => ok,
            Err(e) => return Outcome::Err(e),
        };
        match value.get("changed").and_then(Value::as_array) {
            Some(changed) if changed.len() == expect_changed => warn,
            Some(changed) => Outcome::Err(format!(
                "destroy-parent {external_id}: `changed` has {} entries, expected {expect_changed}",
                changed.len()
            )),
            None => Outcome::Err(format!(
                "destroy-parent {external_id}: response has no `changed` array: {}",
                truncate(&value.to_string())
            )),
        }
    }

    pub async fn get(&self, external_id: &str) -> Outcome {
        let req = self
            .client
            .get(format!("{}/{external_id}", self.base))
            .bearer_auth(&self.token);
        self.send(req, StatusCode::OK, &format!("GET {external_id}"))
            .await
            .map_or_else(Outcome::Err, |(_, warn)| warn)
    }

    /// Sends a GET of `{base}{path}`, or a POST of `body` as JSON when there is one, and
    /// reads the whole answer: its status, or the transport error. For harnesses that judge
    /// statuses themselves (where a 404 or 409 may be an expected answer, not a failure).
    pub async fn status_of(
        &self,
        path: &str,
        body: Option<&Value>,
    ) -> std::result::Result<StatusCode, String> {
        let url = format!("{}{path}", self.base);
        let req = match body {
            None => self.client.get(url),
            Some(body) => self.client.post(url).json(body),
        };
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        resp.bytes()
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok(status)
    }

    async fn post(
        &self,
        op: &str,
        body: &Value,
        expected: StatusCode,
    ) -> std::result::Result<(Value, Outcome), String> {
        let req = self
            .client
            .post(format!("{}/{op}", self.base))
            .bearer_auth(&self.token)
            .json(body);
        self.send(req, expected, op).await
    }

    /// Sends, reads the whole body, and judges the status: non-2xx is an error, a 2xx other
    /// than the documented one is a warning.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        expected: StatusCode,
        what: &str,
    ) -> std::result::Result<(Value, Outcome), String> {
        let resp = req.send().await.map_err(|e| format!("{what}: {e}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{what}: reading the body: {e}"))?;
        if !status.is_success() {
            return Err(format!("{what}: HTTP {status}: {}", truncate(&text)));
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{what}: HTTP {status} with a body that is not JSON ({e}): {}",
                truncate(&text)
            )
        })?;
        let outcome = if status == expected {
            Outcome::Ok
        } else {
            Outcome::Warn(format!("{what}: HTTP {status}, documented {expected}"))
        };
        Ok((value, outcome))
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 500;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
