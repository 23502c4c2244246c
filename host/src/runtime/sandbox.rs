//! The per-call store data of a hook call: an empty WASI context (no filesystem, environment,
//! arguments or sockets), wasi:http gated by the manifest's allowlist, a memory limiter, and
//! the `host` interface (capped logging, config lookups).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use super::bindings::{v0_1_0, v0_2_0};
use super::kv::Kv;
use super::manifest::{Manifest, split_host_port};
use super::outgoing::{ConnectionPool, Timeouts};

/// Most log lines one hook call may write; the rest are counted and summarised.
pub const MAX_LOG_LINES: u32 = 100;
/// Longest log line kept.
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024;
/// Resource-table entries one call may hold (bounds handles a guest can open).
pub const MAX_TABLE_ENTRIES: usize = 1_000;

/// State of one hook call.
pub struct CallState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    gate: HttpGate,
    pub(super) limiter: MemoryLimiter,
    pub(super) logs: LogBudget,
    manifest: Arc<Manifest>,
    event_id: String,
    kv: Kv,
    kv_scope: Arc<str>,
    /// Epoch ticks the current call has run (its deadline is a number of ticks).
    pub(super) ticks: u64,
    pub(super) recorder: Option<Recorder>,
}

/// What one hook call did, for `lockstep connector test`: its log lines (before the host's
/// caps drop any) and every outgoing HTTP request with how it ended.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Transcript {
    /// `(level, message)` in order.
    pub logs: Vec<(String, String)>,
    /// Outgoing requests in order.
    pub requests: Vec<HttpExchange>,
    /// Log lines dropped past the per-call cap.
    pub dropped_logs: u64,
}

/// One outgoing request.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HttpExchange {
    /// `GET`, `POST`...
    pub method: String,
    /// The full URL.
    pub url: String,
    /// The response status, `denied` (outside `allowed_hosts`) or `error: ...`.
    pub outcome: String,
    /// Until the response head (or the refusal).
    pub millis: f64,
}

/// Where a call's transcript is written, when one is asked for.
pub(super) type Recorder = Arc<Mutex<Transcript>>;

fn record(recorder: &Option<Recorder>, f: impl FnOnce(&mut Transcript)) {
    if let Some(r) = recorder {
        f(&mut r.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

impl CallState {
    pub(super) fn new(
        manifest: Arc<Manifest>,
        event_id: String,
        kv: Kv,
        kv_scope: Arc<str>,
        pool: ConnectionPool,
    ) -> Self {
        // Nothing is inherited or granted: no args, env, preopens, stdin; sockets denied.
        let wasi = WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_TABLE_ENTRIES);
        CallState {
            wasi,
            http: WasiHttpCtx::new(),
            table,
            gate: HttpGate {
                manifest: manifest.clone(),
                pool,
                event_id: event_id.clone(),
                recorder: None,
            },
            limiter: MemoryLimiter::new(manifest.memory_mb as usize * 1024 * 1024),
            logs: LogBudget::default(),
            manifest,
            event_id,
            kv,
            kv_scope,
            ticks: 0,
            recorder: None,
        }
    }

    /// Whether a warm instance may serve another call: a guest that keeps handles between
    /// calls (JavaScript's fetch leaves some to its garbage collector) or grows its memory
    /// would otherwise fail a later call at a cap, so it is recycled when a quarter of the
    /// resource table or three quarters of its memory cap is used.
    pub(super) fn fit_for_reuse(&mut self) -> bool {
        !self.limiter.mostly_used() && self.table.iter_mut().count() <= MAX_TABLE_ENTRIES / 4
    }

    /// Readies the state for the next call (of a fresh instance, or of a reused one): the
    /// per-call budgets start again and the call is tagged with its event.
    pub(super) fn begin_call(&mut self, event_id: &str, recorder: Option<Recorder>) {
        event_id.clone_into(&mut self.event_id);
        event_id.clone_into(&mut self.gate.event_id);
        self.logs = LogBudget::default();
        self.limiter.hit = false;
        self.ticks = 0;
        self.gate.recorder = recorder.clone();
        self.recorder = recorder;
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.gate,
        }
    }
}

/// Checks every outgoing request against the manifest before it leaves the host.
struct HttpGate {
    manifest: Arc<Manifest>,
    /// The connector version's keep-alive connections.
    pool: ConnectionPool,
    event_id: String,
    recorder: Option<Recorder>,
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                ),
                wasmtime_wasi_http::Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for HttpGate {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> SendFuture {
        let uri = request.uri();
        let started = Instant::now();
        let (method, url) = (request.method().to_string(), uri.to_string());
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
        let default_port = if scheme == "http" { 80 } else { 443 };
        let allowed = match split_host_port(authority) {
            Some((host, port)) => self
                .manifest
                .allows(&scheme, host, port.unwrap_or(default_port)),
            None => false,
        };
        if !allowed {
            tracing::warn!(
                connector = %self.manifest.name,
                event_id = %self.event_id,
                destination = %format!("{scheme}://{authority}"),
                "connector tried to reach a host outside its allowed_hosts; request denied"
            );
            record(&self.recorder, |t| {
                t.requests.push(HttpExchange {
                    method,
                    url,
                    outcome: "denied".into(),
                    millis: started.elapsed().as_secs_f64() * 1e3,
                })
            });
            super::outgoing::abandon(request);
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        // A request may not outlive the hook's own deadline.
        let cap = std::time::Duration::from_millis(self.manifest.timeout_ms);
        let mut options = options.unwrap_or_default();
        for t in [
            &mut options.connect_timeout,
            &mut options.first_byte_timeout,
            &mut options.between_bytes_timeout,
        ] {
            *t = Some(t.map_or(cap, |v| v.min(cap)));
        }
        drop(fut);
        let recorder = self.recorder.clone();
        let pool = self.pool.clone();
        Box::new(async move {
            let sent = pool.send(request, Timeouts::from(&options)).await;
            record(&recorder, |t| {
                t.requests.push(HttpExchange {
                    method,
                    url,
                    outcome: match &sent {
                        Ok(response) => response.status().as_u16().to_string(),
                        Err(e) => format!("error: {e}"),
                    },
                    millis: started.elapsed().as_secs_f64() * 1e3,
                })
            });
            // The connection lives in a task of its own (it outlasts the response when it is
            // kept), so there is no I/O left for wasi-http to drive.
            Ok((
                sent?,
                Box::new(async { Ok(()) }) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// Caps the instance's linear memory (the sum over all of its memories: a component may
/// have several, each of which could otherwise grow to the cap) and table growth; remembers
/// that the cap was hit so the failure can be reported as out-of-memory rather than a
/// generic trap.
pub(super) struct MemoryLimiter {
    max_bytes: usize,
    pub(super) hit: bool,
    /// Bytes of all the store's memories now. A store holds one component instance (memories
    /// are never freed before the store), so this is the instance's total.
    total: usize,
    /// The last growth this limiter allowed, taken back if the grow then fails.
    pending: usize,
    /// The largest total the instance has reached.
    peak: usize,
}

impl MemoryLimiter {
    pub(super) fn new(max_bytes: usize) -> Self {
        MemoryLimiter {
            max_bytes,
            hit: false,
            total: 0,
            pending: 0,
            peak: 0,
        }
    }

    /// Whether the instance has used more than three quarters of its cap: a warm instance
    /// that far up is recycled rather than left to fail a later call at the cap.
    pub(super) fn mostly_used(&self) -> bool {
        self.peak > self.max_bytes / 4 * 3
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A new memory comes here with `current` 0, so instantiation is counted too.
        let growth = desired.saturating_sub(current);
        let total = self.total.saturating_add(growth);
        if total > self.max_bytes {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} MiB exceeded (the instance's memories together)",
                self.max_bytes / (1024 * 1024)
            )));
        }
        self.total = total;
        self.pending = growth;
        self.peak = self.peak.max(total);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.total = self.total.saturating_sub(std::mem::take(&mut self.pending));
        tracing::debug!(error = %error, "a connector's memory could not grow");
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Counts log lines of one call.
#[derive(Default)]
pub(super) struct LogBudget {
    pub(super) written: u32,
    pub(super) dropped: u64,
}

impl v0_2_0::lockstep::connector0_2_0::session::Host for CallState {}
impl v0_1_0::lockstep::connector0_1_0::session::Host for CallState {}

/// The `host` interface, written once for the newest version; older versions delegate to it.
impl v0_2_0::Host for CallState {
    fn log(&mut self, level: v0_2_0::Level, message: String) {
        use v0_2_0::Level;
        if self.logs.written >= MAX_LOG_LINES {
            self.logs.dropped += 1;
            return;
        }
        self.logs.written += 1;
        let mut message = message;
        if message.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("…[truncated]");
        }
        // What the host keeps (after its caps), so a test run shows what production logs.
        record(&self.recorder, |t| {
            let name = match level {
                Level::Trace => "trace",
                Level::Debug => "debug",
                Level::Info => "info",
                Level::Warn => "warn",
                Level::Error => "error",
            };
            t.logs.push((name.to_owned(), message.clone()))
        });
        let connector = self.manifest.name.as_str();
        let event_id = self.event_id.as_str();
        match level {
            Level::Trace => tracing::trace!(connector, event_id, "{message}"),
            Level::Debug => tracing::debug!(connector, event_id, "{message}"),
            Level::Info => tracing::info!(connector, event_id, "{message}"),
            Level::Warn => tracing::warn!(connector, event_id, "{message}"),
            Level::Error => tracing::error!(connector, event_id, "{message}"),
        }
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.manifest.config.get(&key).cloned()
    }

    fn cache_get(&mut self, key: String) -> Option<String> {
        self.kv.get(&self.kv_scope, &key)
    }

    fn cache_set(&mut self, key: String, value: String, ttl_ms: u64) {
        if !self
            .kv
            .set(&self.kv_scope, key, value, Duration::from_millis(ttl_ms))
        {
            tracing::debug!(connector = %self.manifest.name, "cache-set refused: entry too large");
        }
    }
}

/// 0.1.0's `host` interface is the same as 0.2.0's (the versions differ only in the hooks and
/// the event record), so each function forwards to the 0.2.0 one.
impl v0_1_0::Host for CallState {
    fn log(&mut self, level: v0_1_0::Level, message: String) {
        let level = match level {
            v0_1_0::Level::Trace => v0_2_0::Level::Trace,
            v0_1_0::Level::Debug => v0_2_0::Level::Debug,
            v0_1_0::Level::Info => v0_2_0::Level::Info,
            v0_1_0::Level::Warn => v0_2_0::Level::Warn,
            v0_1_0::Level::Error => v0_2_0::Level::Error,
        };
        v0_2_0::Host::log(self, level, message)
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        v0_2_0::Host::config_get(self, key)
    }

    fn cache_get(&mut self, key: String) -> Option<String> {
        v0_2_0::Host::cache_get(self, key)
    }

    fn cache_set(&mut self, key: String, value: String, ttl_ms: u64) {
        v0_2_0::Host::cache_set(self, key, value, ttl_ms)
    }
}
