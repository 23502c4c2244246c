//! The per-call store data of a hook call: an empty WASI context (no filesystem, environment,
//! arguments or sockets), wasi:http gated by the manifest's allowlist, a memory budget shared
//! by the instance's memories and the host's buffers for its HTTP requests, and the `host`
//! interface (capped logging, config lookups).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use super::bindings::{v0_1_0, v0_2_0, v0_3_0};
use super::kv::Kv;
use super::manifest::{Manifest, split_host_port};
use super::outgoing::{CONNECTION_BUFFER, ConnectionPool, Timeouts};
use super::signer::{EventSigner, MAX_SIGNATURES_PER_CALL, SignRefusal};
use crate::domain::SyncEvent;

/// Most log lines one hook call may write; the rest are counted and summarised.
pub const MAX_LOG_LINES: u32 = 100;
/// Longest log line kept.
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024;
/// Resource-table entries one call may hold (bounds handles a guest can open).
pub const MAX_TABLE_ENTRIES: usize = 1_000;
/// Outgoing requests one call may have open at once (sent, and the host still holds their
/// request body, response or connection).
pub const MAX_OPEN_REQUESTS: usize = 16;
/// Largest guest write to an outgoing body, and writes buffered beside the one in flight:
/// set rather than left to wasi-http's defaults (1 MiB chunks), so the bytes a body makes
/// the host hold are known and modest.
const BODY_CHUNK: usize = 64 * 1024;
/// See [`BODY_CHUNK`].
const BODY_BUFFER_CHUNKS: usize = 1;
/// What an outgoing body can make the host hold: its channel to the connection takes
/// `BODY_BUFFER_CHUNKS + 1` chunks, sent or not (a guest may fill a body it never sends).
const BODY_BYTES: usize = (BODY_BUFFER_CHUNKS + 1) * BODY_CHUNK;
/// What a sent request makes the host hold beside its body: the connection's read buffer and
/// its write buffer (one body chunk over the cap), TLS records, and the response frame the
/// guest has not read yet (a slice of an earlier read buffer).
const REQUEST_BYTES: usize = 4 * CONNECTION_BUFFER + 2 * BODY_CHUNK;
/// Chunk size of a body created past the budget: it cannot be refused (wasi-http has no hook
/// for that), so it holds next to nothing, and its request is refused when sent.
const OVERDRAWN_CHUNK: usize = 1;

/// State of one hook call.
pub struct CallState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    gate: HttpGate,
    pub(super) limiter: MemoryLimiter,
    budget: Arc<Budget>,
    pub(super) logs: LogBudget,
    manifest: Arc<Manifest>,
    event_id: String,
    kv: Kv,
    kv_scope: Arc<str>,
    /// Epoch ticks the current call has run (its deadline is a number of ticks).
    pub(super) ticks: u64,
    pub(super) recorder: Option<Recorder>,
    /// Who signs events (`None`: signing is not configured).
    signer: Option<Arc<dyn EventSigner>>,
    /// The event of the current call: the only thing `sign-event` signs.
    event: Option<SyncEvent>,
    /// Signatures made in the current call.
    signatures: u32,
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
        signer: Option<Arc<dyn EventSigner>>,
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
        let budget = Arc::new(Budget::new(manifest.memory_mb as usize * 1024 * 1024));
        CallState {
            wasi,
            http: WasiHttpCtx::new(),
            table,
            gate: HttpGate {
                manifest: manifest.clone(),
                pool,
                event_id: event_id.clone(),
                recorder: None,
                budget: budget.clone(),
                unsent_bodies: 0,
            },
            limiter: MemoryLimiter::new(budget.clone()),
            budget,
            logs: LogBudget::default(),
            manifest,
            event_id,
            kv,
            kv_scope,
            ticks: 0,
            recorder: None,
            signer,
            event: None,
            signatures: 0,
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
    pub(super) fn begin_call(&mut self, event: &SyncEvent, recorder: Option<Recorder>) {
        let event_id = event.event_id.as_str();
        self.event = Some(event.clone());
        self.signatures = 0;
        event_id.clone_into(&mut self.event_id);
        event_id.clone_into(&mut self.gate.event_id);
        self.logs = LogBudget::default();
        self.budget.hit.store(false, Ordering::Relaxed);
        self.recount_unsent_bodies();
        self.ticks = 0;
        self.gate.recorder = recorder.clone();
        self.recorder = recorder;
    }

    /// The call's memory budget (its memories and the host's HTTP buffers together).
    pub(super) fn budget(&self) -> Arc<Budget> {
        self.budget.clone()
    }

    /// Sets the reservation of unsent bodies to what the table holds now. Within a call a
    /// body is counted from its creation until its request is sent; one the guest drops
    /// unsent stays counted (nothing tells the host), so a warm instance's next call starts
    /// from the bodies it really still holds, not from the last call's guesses.
    fn recount_unsent_bodies(&mut self) {
        use wasmtime_wasi_http::p2::types::{HostOutgoingRequest, HostOutgoingResponse};
        let unsent = self
            .table
            .iter_mut()
            .filter(|entry| {
                entry
                    .downcast_ref::<HostOutgoingRequest>()
                    .is_some_and(|r| r.body.is_some())
                    || entry
                        .downcast_ref::<HostOutgoingResponse>()
                        .is_some_and(|r| r.body.is_some())
            })
            .count();
        let gate = &mut self.gate;
        gate.budget.release(gate.unsent_bodies * BODY_BYTES);
        gate.budget.force(unsent * BODY_BYTES);
        gate.unsent_bodies = unsent;
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

/// Checks every outgoing request against the manifest before it leaves the host, and
/// reserves the host memory it can hold against the call's budget.
struct HttpGate {
    manifest: Arc<Manifest>,
    /// The connector version's keep-alive connections.
    pool: ConnectionPool,
    event_id: String,
    recorder: Option<Recorder>,
    budget: Arc<Budget>,
    /// Outgoing bodies created (and reserved) whose request has not been sent: the request
    /// that is sent next takes one of their reservations over, so a body is counted once.
    unsent_bodies: usize,
}

impl HttpGate {
    /// Takes over the reservation of one unsent body for a request with a body; `0` if there
    /// is none to take (a body created past the budget, or one carried from an earlier call).
    fn adopt_body(&mut self, has_body: bool) -> usize {
        if has_body && self.unsent_bodies > 0 {
            self.unsent_bodies -= 1;
            BODY_BYTES
        } else {
            0
        }
    }

    /// Gives up on a request before it leaves: its body's reservation goes (the body is
    /// drained and dropped), the transcript notes why, and the guest's response future
    /// fails with `error`.
    fn refuse(
        &self,
        request: http::Request<WasiBody>,
        adopted: usize,
        started: Instant,
        outcome: String,
        error: wasmtime_wasi_http::Error,
    ) -> SendFuture {
        self.budget.release(adopted);
        record(&self.recorder, |t| {
            t.requests.push(HttpExchange {
                method: request.method().to_string(),
                url: request.uri().to_string(),
                outcome,
                millis: started.elapsed().as_secs_f64() * 1e3,
            })
        });
        super::outgoing::abandon(request);
        Box::new(async move { Err(error) })
    }
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
        let started = Instant::now();
        // wasi-http sends an empty body for a request whose body the guest never asked for.
        let has_body = !hyper::body::Body::is_end_stream(request.body());
        let adopted = self.adopt_body(has_body);
        let uri = request.uri();
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
            return self.refuse(
                request,
                adopted,
                started,
                "denied".into(),
                wasmtime_wasi_http::Error::HttpRequestDenied,
            );
        }
        if !self.budget.open_request() {
            tracing::debug!(
                connector = %self.manifest.name,
                event_id = %self.event_id,
                "connector has {MAX_OPEN_REQUESTS} requests open; request refused"
            );
            return self.refuse(
                request,
                adopted,
                started,
                format!("refused: {MAX_OPEN_REQUESTS} requests open"),
                wasmtime_wasi_http::Error::ConnectionLimitReached,
            );
        }
        let more = REQUEST_BYTES
            + if has_body && adopted == 0 {
                BODY_BYTES
            } else {
                0
            };
        if !self.budget.reserve(more) {
            self.budget.close_request();
            self.budget.hit.store(true, Ordering::Relaxed);
            tracing::debug!(
                connector = %self.manifest.name,
                event_id = %self.event_id,
                "connector's requests would hold more than its memory_mb; request refused"
            );
            let why = format!(
                "memory_mb = {} exceeded by the host's buffers for the call's requests",
                self.manifest.memory_mb
            );
            return self.refuse(
                request,
                adopted,
                started,
                format!("refused: {why}"),
                wasmtime_wasi_http::Error::InternalError(Some(why)),
            );
        }
        let held: super::outgoing::Held = Arc::new(Reservation {
            budget: self.budget.clone(),
            bytes: adopted + more,
        });
        let (method, url) = (request.method().to_string(), request.uri().to_string());
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
            let sent = pool.send(request, Timeouts::from(&options), held).await;
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

    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        BODY_BUFFER_CHUNKS
    }

    /// Asked once for every outgoing body the guest creates, before its buffers exist: the
    /// one place to count a body that may never be sent.
    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        if self.budget.reserve(BODY_BYTES) {
            self.unsent_bodies += 1;
            BODY_CHUNK
        } else {
            self.budget.hit.store(true, Ordering::Relaxed);
            OVERDRAWN_CHUNK
        }
    }
}

/// The call's memory budget, `memory_mb`: the instance's memories and what the host holds
/// for its HTTP requests count against it together, so a guest cannot move its data into
/// host buffers to get past its cap, nor grow its memory over what those buffers hold.
/// Reservations are given back wherever the host lets go of a buffer (a connection's task,
/// a body being drained), hence atomics.
pub(super) struct Budget {
    max_bytes: usize,
    used: AtomicUsize,
    /// Requests with a [`Reservation`] alive.
    open: AtomicUsize,
    /// Set when the cap refused something this call: the call ends as out of memory.
    hit: AtomicBool,
}

impl Budget {
    fn new(max_bytes: usize) -> Self {
        Budget {
            max_bytes,
            used: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            hit: AtomicBool::new(false),
        }
    }

    /// Whether the cap refused memory to this call.
    pub(super) fn hit(&self) -> bool {
        self.hit.load(Ordering::Relaxed)
    }

    fn reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|t| *t <= self.max_bytes)
            })
            .is_ok()
    }

    /// Counts bytes that are held already, whether or not they fit.
    fn force(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    fn open_request(&self) -> bool {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_OPEN_REQUESTS).then_some(n + 1)
            })
            .is_ok()
    }

    fn close_request(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }
}

/// The host memory one sent request may hold, and its place among the open requests; given
/// back when the last of its holders (the send, the request body, the response body) drops.
struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
        self.budget.close_request();
    }
}

/// Caps the instance's linear memory (the sum over all of its memories: a component may
/// have several, each of which could otherwise grow to the cap) together with the host's
/// buffers for its HTTP requests ([`Budget`]), and table growth; a refusal marks the budget,
/// so the failure is reported as out-of-memory rather than a generic trap.
pub(super) struct MemoryLimiter {
    budget: Arc<Budget>,
    /// Bytes of all the store's memories now. A store holds one component instance (memories
    /// are never freed before the store), so this is the instance's total.
    memory: usize,
    /// The last growth this limiter allowed, taken back if the grow then fails.
    pending: usize,
    /// The largest total the instance's memories have reached.
    peak: usize,
}

impl MemoryLimiter {
    fn new(budget: Arc<Budget>) -> Self {
        MemoryLimiter {
            budget,
            memory: 0,
            pending: 0,
            peak: 0,
        }
    }

    /// Whether the instance's memories have used more than three quarters of the cap: a
    /// warm instance that far up is recycled rather than left to fail a later call at the cap.
    pub(super) fn mostly_used(&self) -> bool {
        self.peak > self.budget.max_bytes / 4 * 3
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
        if !self.budget.reserve(growth) {
            self.budget.hit.store(true, Ordering::Relaxed);
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} MiB exceeded (the instance's memories together, with what \
                 the host holds for its HTTP requests)",
                self.budget.max_bytes / (1024 * 1024)
            )));
        }
        self.memory = self.memory.saturating_add(growth);
        self.pending = growth;
        self.peak = self.peak.max(self.memory);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.memory = self.memory.saturating_sub(pending);
        self.budget.release(pending);
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

impl v0_3_0::lockstep::connector0_3_0::session::Host for CallState {}
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

/// `signing`: the host signs a SET it builds from the current call's event; the component
/// names only the audience.
impl v0_3_0::SigningHost for CallState {
    fn sign_event(&mut self, audience: String) -> Result<String, String> {
        self.sign(audience).map_err(|refusal| {
            tracing::debug!(connector = %self.manifest.name, event_id = %self.event_id, "sign-event refused: {refusal}");
            refusal.to_string()
        })
    }
}

impl CallState {
    /// The checks before signing, in order: signing configured, inside a hook, the audience
    /// granted, the call's budget left.
    fn sign(&mut self, audience: String) -> Result<String, SignRefusal> {
        let signer = self.signer.clone().ok_or(SignRefusal::Unavailable)?;
        let event = self.event.as_ref().ok_or(SignRefusal::OutsideHook)?;
        if !self.manifest.signing_audiences.contains(&audience) {
            return Err(SignRefusal::NotGranted(audience));
        }
        // Counted before signing, so failed attempts use the budget too.
        if self.signatures >= MAX_SIGNATURES_PER_CALL {
            return Err(SignRefusal::TooMany);
        }
        self.signatures += 1;
        signer.sign_event(event, &audience)
    }
}

/// The `host` interfaces of 0.1.0 and 0.3.0 are 0.2.0's (the versions differ in the hooks,
/// the event record and 0.3.0's `signing`), so each function forwards to the 0.2.0 one; the
/// macro only writes the same forwarding for each generated module.
macro_rules! host_as_in_0_2_0 {
    ($v:ident) => {
        impl $v::Host for CallState {
            fn log(&mut self, level: $v::Level, message: String) {
                let level = match level {
                    $v::Level::Trace => v0_2_0::Level::Trace,
                    $v::Level::Debug => v0_2_0::Level::Debug,
                    $v::Level::Info => v0_2_0::Level::Info,
                    $v::Level::Warn => v0_2_0::Level::Warn,
                    $v::Level::Error => v0_2_0::Level::Error,
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
    };
}

host_as_in_0_2_0!(v0_1_0);
host_as_in_0_2_0!(v0_3_0);
