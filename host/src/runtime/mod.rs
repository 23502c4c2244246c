//! Connector runtime: one Wasmtime engine and linker per process, connectors compiled once
//! (through the on-disk cache) and pre-instantiated, and every hook call in a fresh store
//! with a deadline (epoch interruption plus a wall-clock timeout for host I/O), a memory cap
//! and an HTTP allowlist. It knows nothing of HTTP routing or the database.

pub mod bindings;
pub mod cache;
pub mod kv;
pub mod manifest;
pub mod outgoing;
pub mod registry;
mod sandbox;
pub mod signer;
mod threads;
pub mod world;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::Instrument;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use bindings::{v0_1_0, v0_2_0, v0_3_0};
use cache::{CacheOutcome, CompileCache};
use manifest::Manifest;
use sandbox::{CallState, Recorder};
use world::{Hooks, Instance, World};

pub use sandbox::{HttpExchange, Transcript};
pub use threads::HookThreads;

use crate::domain::SyncEvent;

/// Epoch tick; deadlines are rounded up to it.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Longest error message kept from a connector.
pub const MAX_ERROR_BYTES: usize = 2 * 1024;
/// Component instances alive at once (bounds memory: each may use up to its `memory_mb`).
pub const MAX_CONCURRENT_CALLS: usize = 64;
/// Idle warm instances kept for `reuse_instance` connectors, per connector and in all. They
/// hold pool slots and memory while idle, so both are small and the pool is sized for them.
pub const MAX_IDLE_WARM_PER_CONNECTOR: usize = 4;
/// See [`MAX_IDLE_WARM_PER_CONNECTOR`].
pub const MAX_IDLE_WARM: usize = 16;
/// Bytes of each pooled linear memory (and table) kept resident between instances; the rest
/// is given back to the kernel. Bounds resident memory to about this much per warm slot.
const KEEP_RESIDENT_MEMORY: usize = 1024 * 1024;
/// See [`KEEP_RESIDENT_MEMORY`].
const KEEP_RESIDENT_TABLE: usize = 64 * 1024;

/// Runtime failures outside a hook call (loading, compiling).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be built.
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
    /// The component could not be read.
    #[error("cannot read component {path}: {source}")]
    Read {
        /// The component file.
        path: String,
        source: std::io::Error,
    },
    /// Not a valid component, or it fits no `lockstep:connector` version the host serves,
    /// or its manifest subscribes to events its version has no hook for.
    #[error("connector {name}: {message}")]
    Invalid {
        /// The connector's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The compile cache directory is unusable.
    #[error("compile cache: {0}")]
    Cache(std::io::Error),
}

/// Why a hook call did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookFailure {
    /// The connector asked for a retry.
    Retry(String),
    /// The connector failed permanently.
    Fail(String),
    /// The call ran past its deadline.
    Timeout(u64),
    /// The connector exceeded its memory cap.
    OutOfMemory(u32),
    /// The connector trapped (panic, unreachable, bad host call...).
    Trap(String),
}

impl HookFailure {
    /// Whether trying again may help.
    pub fn retryable(&self) -> bool {
        matches!(self, HookFailure::Retry(_) | HookFailure::Timeout(_))
    }

    /// Short reason for logs and the deliveries API.
    pub fn reason(&self) -> String {
        match self {
            HookFailure::Retry(m) => format!("retry: {m}"),
            HookFailure::Fail(m) => format!("fail: {m}"),
            HookFailure::Timeout(ms) => format!("timeout: exceeded {ms} ms"),
            HookFailure::OutOfMemory(mb) => format!("out of memory: exceeded {mb} MiB"),
            HookFailure::Trap(m) => format!("trap: {m}"),
        }
    }

    /// Stable outcome label (metrics, attempts).
    pub fn kind(&self) -> &'static str {
        match self {
            HookFailure::Retry(_) => "retry",
            HookFailure::Fail(_) => "fail",
            HookFailure::Timeout(_) => "timeout",
            HookFailure::OutOfMemory(_) => "oom",
            HookFailure::Trap(_) => "trap",
        }
    }
}

/// A connector ready to serve: its manifest, version and pre-instantiated component.
pub struct LoadedConnector {
    /// The manifest it was loaded with (shared with the calls in flight).
    pub manifest: Arc<Manifest>,
    /// Content hash of component and manifest (first 16 hex digits).
    pub version: String,
    /// The `lockstep:connector` version the component targets.
    pub world: World,
    /// Whether the compiled code came from the cache.
    pub cache: CacheOutcome,
    /// Its scope in the connector cache (`name@version`), computed once.
    kv_scope: Arc<str>,
    hooks: Hooks,
    /// Idle instances of a `reuse_instance` connector; dropped with this version, so a
    /// replacement never serves from its predecessor's instances.
    warm: WarmPool,
    /// Keep-alive connections of every call of this version; dropped with it, so a
    /// replacement (whose allowlist may differ) never sends over its predecessor's.
    pool: outgoing::ConnectionPool,
    /// Until when (epoch ms) this version's calls run on the low-priority hook threads:
    /// set by a call that ran guest code for [`DEMOTE_TICKS`] ticks or was interrupted.
    demoted_until: std::sync::atomic::AtomicI64,
}

impl LoadedConnector {
    /// This version's pool of outgoing keep-alive connections.
    pub fn connections(&self) -> &outgoing::ConnectionPool {
        &self.pool
    }

    /// Whether this version's calls run on the low-priority hook threads now.
    pub fn demoted(&self) -> bool {
        self.demoted_until.load(Ordering::Relaxed) > crate::store::now_millis()
    }

    /// Sends this version's calls to the low-priority threads for [`DEMOTED_FOR`].
    fn demote(&self) {
        let until = crate::store::now_millis()
            .saturating_add(i64::try_from(DEMOTED_FOR.as_millis()).unwrap_or(i64::MAX));
        if self.demoted_until.swap(until, Ordering::Relaxed) <= crate::store::now_millis() {
            tracing::warn!(
                connector = %self.manifest.name,
                version = %self.version,
                secs = DEMOTED_FOR.as_secs(),
                "connector burns CPU in its hooks; its calls run at low priority for a while"
            );
        }
    }
}

/// Epoch ticks of guest execution after which a call counts as CPU-heavy (about 50 ms: an
/// ordinary connector runs microseconds of guest code and waits on the network).
pub const DEMOTE_TICKS: u64 = 5;
/// How long a CPU-heavy call sends its connector version to the low-priority threads; every
/// further heavy call renews it.
pub const DEMOTED_FOR: Duration = Duration::from_secs(60);

/// An instance kept warm between calls, with the store it lives in.
struct Warm {
    store: Store<CallState>,
    instance: Instance,
    calls: u32,
}

/// The idle warm instances of one connector version, counted against the runtime's total.
struct WarmPool {
    idle: std::sync::Mutex<Vec<Warm>>,
    total: Arc<std::sync::atomic::AtomicUsize>,
}

impl WarmPool {
    fn take(&self) -> Option<Warm> {
        let warm = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        if warm.is_some() {
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
        warm
    }

    /// Keeps `warm` for the next call unless either cap is reached (then it is dropped).
    fn put(&self, warm: Warm) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() >= MAX_IDLE_WARM_PER_CONNECTOR {
            return;
        }
        let reserved = self
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_IDLE_WARM).then_some(n + 1)
            });
        if reserved.is_ok() {
            idle.push(warm);
        }
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        let idle = self
            .idle
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.total.fetch_sub(idle.len(), Ordering::Relaxed);
    }
}

impl std::fmt::Debug for LoadedConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedConnector")
            .field("name", &self.manifest.name)
            .field("version", &self.version)
            .field("world", &self.world)
            .finish()
    }
}

/// Which hook threads a call runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPriority {
    /// The API's priority: every connector starts here, so deliveries get their fair share
    /// of the CPU however busy the API is.
    Normal,
    /// Niceness [`HOOK_NICENESS`]: connectors whose calls burn CPU ([`DEMOTE_TICKS`]) go here
    /// for [`DEMOTED_FOR`], where the API's threads get about ten times their share.
    Low,
}

/// The threads guest code runs on, per priority (a thread per core at the API's priority,
/// half as many at low priority; see [`threads`]), started at first use. `None` if they
/// cannot be started; calls then run on the caller's runtime.
fn hook_threads(priority: HookPriority) -> Option<&'static HookThreads> {
    type Threads = std::sync::OnceLock<Option<HookThreads>>;
    static NORMAL: Threads = std::sync::OnceLock::new();
    static LOW: Threads = std::sync::OnceLock::new();
    // Deliveries get as many threads as there are cores (one was saturated under load while
    // the API's and the writer's threads still had room); the demoted ones half of them.
    let (cell, name, on_start, share): (&Threads, &str, fn(), usize) = match priority {
        HookPriority::Normal => (&NORMAL, "lockstep-hooks", enter_normal_hook_thread, 1),
        HookPriority::Low => (&LOW, "lockstep-hk-low", enter_low_hook_thread, 2),
    };
    cell.get_or_init(|| {
        // Read once: it parses the cgroup files under /proc, and asked on every call it cost
        // 13 % of the server's CPU while no-op deliveries drained.
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        HookThreads::start(name, (cores / share).max(1), on_start)
            .inspect_err(|e| {
                tracing::error!(error = %e, "cannot start the hook threads; hooks run on the API's threads")
            })
            .ok()
    })
    .as_ref()
}

/// A hook thread at the API's priority for a task that mostly makes hook calls (a delivery:
/// the call, and around it a few channel sends): spawned there, each call runs in place
/// instead of hopping to a hook thread and back. `None` when they could not be started.
pub fn delivery_threads() -> Option<&'static HookThreads> {
    hook_threads(HookPriority::Normal)
}

thread_local! {
    /// The priority of this thread if it is a hook thread: a call of that priority made
    /// there runs in place (no hop to another thread and back).
    static ON_HOOK_THREAD: std::cell::Cell<Option<HookPriority>> =
        const { std::cell::Cell::new(None) };
}

/// Niceness of the low-priority hook threads: under contention the scheduler gives the
/// API's threads about ten times their share, so CPU-burning connectors get mostly idle CPU.
#[cfg(target_os = "linux")]
const HOOK_NICENESS: i32 = 10;

fn enter_normal_hook_thread() {
    ON_HOOK_THREAD.set(Some(HookPriority::Normal));
}

/// Marks the calling thread as a low-priority hook thread and lowers its priority (Linux:
/// `setpriority` on a thread id affects only that thread). Best effort: a refusal only costs
/// the API some of its headroom.
fn enter_low_hook_thread() {
    ON_HOOK_THREAD.set(Some(HookPriority::Low));
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), HOOK_NICENESS) {
            hook_priority_failed(&e);
        }
    }
}

/// Set once a hook thread's priority could not be lowered: the cause (a sandbox that forbids
/// `setpriority`, or no right to the niceness) is the same for every thread, so it is said once.
static HOOK_PRIORITY_REPORTED: AtomicBool = AtomicBool::new(false);

fn hook_priority_failed(why: &dyn std::fmt::Display) {
    if !HOOK_PRIORITY_REPORTED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %why,
            "the hook threads run at the API's priority: a connector that burns CPU slows the \
             API (under systemd, allow setpriority in SystemCallFilter)"
        );
    }
}

/// Starts the hook threads and checks that their niceness took effect, warning once if not;
/// `serve` calls it at start, so a sandbox that forbids `setpriority` is reported before the
/// first connector runs, not when it is already competing with the API.
pub async fn check_hook_priority() -> bool {
    #[cfg(target_os = "linux")]
    {
        let Some(hooks) = hook_threads(HookPriority::Low) else {
            return false;
        };
        let niceness = hooks
            .spawn(async { rustix::process::getpriority_process(Some(rustix::thread::gettid())) })
            .await;
        match niceness {
            Ok(Ok(n)) if n >= HOOK_NICENESS => true,
            Ok(Ok(n)) => {
                hook_priority_failed(&format!("niceness {n}, not {HOOK_NICENESS}"));
                false
            }
            Ok(Err(e)) => {
                hook_priority_failed(&e);
                false
            }
            Err(e) => {
                hook_priority_failed(&e);
                false
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    true
}

/// The process-wide engine, linker and compile cache.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<CallState>>,
    cache: CompileCache,
    kv: kv::Kv,
    slots: Arc<tokio::sync::Semaphore>,
    warm_total: Arc<std::sync::atomic::AtomicUsize>,
    /// Who signs connectors' events, once the server builder has set it.
    signer: Arc<std::sync::OnceLock<Arc<dyn signer::EventSigner>>>,
    _ticker: Arc<EpochTicker>,
}

/// Advances the engine's epoch on a fixed tick until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config() -> Result<Config, RuntimeError> {
    let mut pool = PoolingAllocationConfig::default();
    // Instances in calls, the load checks beside them, and the idle warm ones.
    let instances = (MAX_CONCURRENT_CALLS + MAX_IDLE_WARM) as u32;
    pool.total_component_instances(instances * 4)
        .total_core_instances(instances * 16)
        .total_memories(instances * 4)
        .total_tables(instances * 16)
        .total_stacks(instances * 4)
        // componentize-py components hold more than 16 core instances.
        .max_core_instances_per_component(64)
        .max_memories_per_component(8)
        .max_tables_per_component(64)
        .max_memory_size(manifest::MAX_MEMORY_MB as usize * 1024 * 1024)
        // A slot is reset for the next instance by copying back the original contents of the
        // pages the last one wrote (found with PAGEMAP_SCAN where the kernel has it, 6.7+),
        // up to these sizes, instead of madvise: the next instance then takes no page
        // faults, and no TLB shootdown is needed. Without PAGEMAP_SCAN the first bytes up to
        // these sizes are reset by memset. Fresh state is what the guest sees either way.
        .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
        .table_keep_resident(KEEP_RESIDENT_TABLE)
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(config)
}

impl Runtime {
    /// Sets who signs connectors' events (the SSF transmitter, which holds the keys); a
    /// runtime without one answers `sign-event` with "not configured". Set once, before
    /// connectors run; a later call changes nothing and returns false.
    pub fn set_signer(&self, signer: Arc<dyn signer::EventSigner>) -> bool {
        self.signer.set(signer).is_ok()
    }

    /// Builds the engine and linker; `cache_dir` keeps compiled components across restarts.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, RuntimeError> {
        let engine =
            Engine::new(&engine_config()?).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<CallState>::new(&engine);
        let link = |r: wasmtime::Result<()>| r.map_err(|e| RuntimeError::Engine(format!("{e:#}")));
        // Guests built for wasip2 import wasi:cli/io/clocks/random even when they use none of
        // it; the WasiCtx of each call grants nothing (no preopens, env, args or sockets).
        link(wasmtime_wasi::p2::add_to_linker_async(&mut linker))?;
        link(wasmtime_wasi_http::p2::add_only_http_to_linker_async(
            &mut linker,
        ))?;
        // Every version's `host` interface (and 0.3.0's `signing`), so components of any
        // supported version link.
        link(v0_3_0::ConnectorCore::add_to_linker::<
            CallState,
            HasSelf<CallState>,
        >(&mut linker, |s| s))?;
        link(v0_2_0::ConnectorCore::add_to_linker::<
            CallState,
            HasSelf<CallState>,
        >(&mut linker, |s| s))?;
        link(v0_1_0::ConnectorCore::add_to_linker::<
            CallState,
            HasSelf<CallState>,
        >(&mut linker, |s| s))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("lockstep-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        }
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            cache: CompileCache::new(cache_dir).map_err(RuntimeError::Cache)?,
            kv: kv::Kv::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_CALLS)),
            warm_total: Arc::default(),
            signer: Arc::default(),
            _ticker: Arc::new(EpochTicker { stop }),
        })
    }

    /// Reads the manifest's component, compiles it (or takes it from the cache) off the async
    /// threads, and pre-instantiates it, which checks it against the `lockstep:connector`
    /// version whose hooks it exports (0.3.0, 0.2.0 or 0.1.0): a component importing anything the
    /// host does not offer, exporting neither version's hooks, or subscribing to events its
    /// version has no hook for is refused here.
    pub async fn load(&self, manifest: Manifest) -> Result<Arc<LoadedConnector>, RuntimeError> {
        let path = manifest.component.clone();
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|source| RuntimeError::Read {
                path: path.display().to_string(),
                source,
            })?;
        self.load_bytes(manifest, bytes).await
    }

    /// Like [`Runtime::load`] with the component bytes in hand.
    pub async fn load_bytes(
        &self,
        manifest: Manifest,
        bytes: Vec<u8>,
    ) -> Result<Arc<LoadedConnector>, RuntimeError> {
        let name = manifest.name.clone();
        let invalid = |message: String| RuntimeError::Invalid {
            name: name.clone(),
            message,
        };
        let version = version_of(&bytes, &manifest.source);
        let manifest = Arc::new(manifest);
        let kv_scope: Arc<str> = format!("{}@{version}", manifest.name).into();
        let engine = self.engine.clone();
        let cache = self.cache.clone();
        let started = Instant::now();
        let (component, outcome) = tokio::task::spawn_blocking(move || cache.load(&engine, &bytes))
            .await
            .map_err(|e| invalid(format!("compiler task failed: {e}")))?
            .map_err(|e| invalid(format!("not a loadable component: {e:#}")))?;
        let world = World::of(&component).ok_or_else(|| {
            invalid(format!(
                "exports no lockstep:connector/hooks of a supported version (the host loads {})",
                World::supported_list()
            ))
        })?;
        if let Some(t) = manifest.events.iter().find(|t| !world.has_hook(**t)) {
            return Err(invalid(format!(
                "its manifest subscribes to {t} events, but the component targets {world}: \
                 {t} needs {}",
                // The oldest version that has it.
                World::SUPPORTED
                    .into_iter()
                    .rev()
                    .find(|w| w.has_hook(*t))
                    .unwrap_or(World::V0_2_0)
            )));
        }
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("does not fit the {world} world: {e:#}")))?;
        let hooks = Hooks::new(world, instance_pre)
            .map_err(|e| invalid(format!("does not export {world}'s hooks: {e:#}")))?;
        let pool = outgoing::ConnectionPool::new(&manifest.http);
        // Instantiate once now, under the manifest's limits: a component that traps in its
        // start function or outgrows its memory cap at start is refused before it can serve.
        {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| invalid("runtime shutting down".into()))?;
            let mut store = self.sandboxed_store(&manifest, &kv_scope, &pool, "load-check".into());
            let outer = Duration::from_millis(manifest.timeout_ms) + Duration::from_millis(250);
            match tokio::time::timeout(outer, hooks.instantiate(&mut store)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if store.data().budget().hit() => {
                    return Err(invalid(format!(
                        "needs more than memory_mb = {} at start: {e:#}",
                        manifest.memory_mb
                    )));
                }
                Ok(Err(e)) => return Err(invalid(format!("fails when instantiated: {e:#}"))),
                Err(_) => {
                    return Err(invalid(format!(
                        "instantiation ran past timeout_ms = {}",
                        manifest.timeout_ms
                    )));
                }
            }
        }
        tracing::info!(
            connector = %name,
            %version,
            %world,
            cache = ?outcome,
            ms = started.elapsed().as_millis() as u64,
            "connector compiled and pre-instantiated"
        );
        Ok(Arc::new(LoadedConnector {
            manifest,
            version,
            world,
            cache: outcome,
            kv_scope,
            hooks,
            warm: WarmPool {
                idle: std::sync::Mutex::default(),
                total: self.warm_total.clone(),
            },
            pool,
            demoted_until: std::sync::atomic::AtomicI64::new(0),
        }))
    }

    /// A fresh store with the manifest's memory cap and deadline.
    fn sandboxed_store(
        &self,
        manifest: &Arc<Manifest>,
        kv_scope: &Arc<str>,
        pool: &outgoing::ConnectionPool,
        call_id: String,
    ) -> Store<CallState> {
        let mut store = Store::new(
            &self.engine,
            CallState::new(
                manifest.clone(),
                call_id,
                self.kv.clone(),
                kv_scope.clone(),
                pool.clone(),
                self.signer.get().cloned(),
            ),
        );
        store.limiter(|s| &mut s.limiter);
        // Guest code yields to the executor at every epoch tick and is interrupted once it has
        // run for its timeout: a busy loop then shares the async worker threads with the API
        // instead of holding one until its deadline (with 2 workers, two looping connectors
        // stalled every request for their whole timeout).
        let budget = manifest
            .timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            .max(1);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            let state = ctx.data_mut();
            state.ticks += 1;
            Ok(if state.ticks >= budget {
                wasmtime::UpdateDeadline::Interrupt
            } else {
                wasmtime::UpdateDeadline::Yield(1)
            })
        });
        store
    }

    /// Forgets the cache entries of a connector version that no longer serves.
    pub fn forget(&self, connector: &LoadedConnector) {
        self.kv.drop_scope(&connector.kv_scope);
    }

    /// Calls the hook for `event` in a fresh, sandboxed instance. Never panics and never
    /// hangs past the connector's deadline; every failure comes back as a [`HookFailure`].
    ///
    /// Guest code runs on the hook threads ([`hook_threads`]), not on the caller's runtime:
    /// the operating system then shares the CPU between the API's threads and the hooks', so
    /// a connector never holds the API's workers. A connector version whose calls burn CPU
    /// is demoted to the low-priority threads ([`HookPriority::Low`]) and cannot starve
    /// requests; the others keep the API's priority, so deliveries keep up under load.
    ///
    /// The call is a `hook` span (connector, version, hook, outcome), a child of the caller's
    /// span (the dispatcher's `delivery`); it covers the wait for a free slot too.
    pub async fn call(
        &self,
        connector: &Arc<LoadedConnector>,
        event: &SyncEvent,
    ) -> Result<(), HookFailure> {
        let span = tracing::info_span!(
            "hook",
            connector = %connector.manifest.name,
            version = %connector.version,
            hook = World::hook_name(event.event_type),
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let priority = if connector.demoted() {
            HookPriority::Low
        } else {
            HookPriority::Normal
        };
        let result = match hook_threads(priority).filter(|_| ON_HOOK_THREAD.get() != Some(priority))
        {
            None => {
                self.call_here(connector, event, None)
                    .instrument(span.clone())
                    .await
            }
            Some(threads) => {
                let (me, connector, event) = (self.clone(), connector.clone(), event.clone());
                let run = async move { me.call_here(&connector, &event, None).await }
                    .instrument(span.clone());
                match threads.spawn(run).await {
                    Ok(result) => result,
                    Err(e) => Err(HookFailure::Trap(cap(format!(
                        "the hook task ended abnormally: {e}"
                    )))),
                }
            }
        };
        match &result {
            Ok(()) => span.record("outcome", "ok"),
            Err(failure) => span
                .record("outcome", failure.kind())
                .record("otel.status_code", "ERROR"),
        };
        result
    }

    /// Like [`Runtime::call`], on the caller's threads, also returning what the call did
    /// (its log lines and outgoing requests): `lockstep connector test`.
    pub async fn call_recorded(
        &self,
        connector: &Arc<LoadedConnector>,
        event: &SyncEvent,
    ) -> (Result<(), HookFailure>, Transcript) {
        let recorder = Recorder::default();
        let result = self
            .call_here(connector, event, Some(recorder.clone()))
            .await;
        let transcript = recorder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        (result, transcript)
    }

    async fn call_here(
        &self,
        connector: &LoadedConnector,
        event: &SyncEvent,
        recorder: Option<Recorder>,
    ) -> Result<(), HookFailure> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| HookFailure::Retry("runtime shutting down".into()))?;
        let manifest = &connector.manifest;
        let timeout_ms = manifest.timeout_ms;
        let reuse = manifest.reuse_instance;
        let warm = if reuse { connector.warm.take() } else { None };
        let (mut store, warm_instance, calls) = match warm {
            Some(Warm {
                mut store,
                instance,
                calls,
            }) => {
                store.set_epoch_deadline(1);
                (store, Some(instance), calls)
            }
            None => {
                let store = self.sandboxed_store(
                    manifest,
                    &connector.kv_scope,
                    &connector.pool,
                    event.event_id.clone(),
                );
                (store, None, 0)
            }
        };
        store.data_mut().begin_call(event, recorder);
        // Outside the store, which a timeout drops: a call cut short after its cap refused
        // memory still ends as out of memory.
        let budget = store.data().budget();
        let hooks = &connector.hooks;
        let run = async move {
            let instance = match warm_instance {
                Some(instance) => Ok(instance),
                None => hooks.instantiate(&mut store).await,
            };
            let (instance, answer) = match instance {
                Ok(instance) => {
                    let answer = instance.call(&mut store, event).await;
                    (Some(instance), answer)
                }
                Err(e) => (None, Err(e)),
            };
            (store, instance, calls + 1, answer)
        };
        // The epoch deadline stops runaway guest code; this outer bound also stops a guest
        // blocked in host I/O (which the epoch cannot interrupt). A timed-out instance is
        // dropped with its store, never reused.
        let outer = Duration::from_millis(timeout_ms) + Duration::from_millis(250);
        let Ok((mut store, instance, calls, answer)) = tokio::time::timeout(outer, run).await
        else {
            return Err(if budget.hit() {
                HookFailure::OutOfMemory(manifest.memory_mb)
            } else {
                HookFailure::Timeout(timeout_ms)
            });
        };
        let interrupted =
            matches!(&answer, Err(e) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt));
        if interrupted || store.data().ticks >= DEMOTE_TICKS {
            connector.demote();
        }
        // The cap refused memory (a memory grow, or host buffers for a request): whatever the
        // hook then answered, it ran short of what it was given.
        let oom = budget.hit();
        let dropped_logs = store.data().logs.dropped;
        if let Some(recorder) = &store.data().recorder {
            recorder
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .dropped_logs = dropped_logs;
        }
        if dropped_logs > 0 {
            tracing::warn!(
                connector = %manifest.name,
                event_id = %event.event_id,
                dropped_logs,
                "connector exceeded its log budget; lines dropped"
            );
        }
        // Only an instance that answered (ok, retry or fail) within its cap is kept: after a
        // trap its state is unknown.
        if reuse
            && !oom
            && let (Some(instance), Ok(_)) = (instance, &answer)
            && calls < manifest.max_calls_per_instance
            && store.data_mut().fit_for_reuse()
        {
            connector.warm.put(Warm {
                store,
                instance,
                calls,
            });
        }
        if oom {
            return Err(HookFailure::OutOfMemory(manifest.memory_mb));
        }
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(HookFailure::Retry(m))) => Err(HookFailure::Retry(cap(m))),
            Ok(Err(HookFailure::Fail(m))) => Err(HookFailure::Fail(cap(m))),
            Ok(Err(other)) => Err(other),
            Err(e) => Err(if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                HookFailure::Timeout(timeout_ms)
            } else {
                HookFailure::Trap(cap(format!("{e:#}")))
            }),
        }
    }
}

/// The version of a connector: content hash of its component and manifest (16 hex digits),
/// so identical bytes and settings always give the same version.
pub fn version_of(component: &[u8], manifest_source: &str) -> String {
    let mut h = Sha256::new();
    h.update(component);
    h.update(manifest_source.as_bytes());
    hex::encode(h.finalize())[..16].to_owned()
}

/// Bounds a connector-supplied message.
fn cap(mut s: String) -> String {
    if s.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        let total = s.len();
        s.truncate(cut);
        s.push_str(&format!("…[{total} bytes]"));
    }
    s
}
