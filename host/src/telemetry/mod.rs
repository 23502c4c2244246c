//! Logging and trace set-up: `tracing` to stderr as text or JSON, filtered by `RUST_LOG` or
//! `--log-level`, and, when `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` is set, the same spans
//! exported over OTLP ([`otlp`]). It configures output only; which spans and events exist is
//! each module's business. [`metrics`] holds the counters behind `GET /metrics`; [`audit`] the
//! audit log's retention.

pub mod audit;
pub mod metrics;
pub mod otlp;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

pub use otlp::OtlpError;

/// Output format of the logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How long shutdown waits for the last spans to reach the collector.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`init`] installed; [`Telemetry::shutdown`] flushes the spans still queued.
#[must_use = "spans queued at exit are lost unless `shutdown` is awaited"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter (bounded by [`FLUSH_TIMEOUT`]).
    /// Without OTLP export it does nothing.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks its caller until the batch task on this runtime has
        // exported; from a worker thread that could starve the very task it waits for.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(FLUSH_TIMEOUT, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "OTLP export: final flush failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "OTLP export: final flush task failed"),
            Err(_) => tracing::warn!(
                timeout_s = FLUSH_TIMEOUT.as_secs(),
                "OTLP export: final flush did not finish in time; queued spans are lost"
            ),
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level` for the logs.
///
/// With `export` and an OTLP endpoint in the environment, `lockstep`'s spans at `info` and
/// above are also exported, whatever the log level says (logs at `error` still give full
/// traces). A bad OTLP setting is an error; without an endpoint nothing else changes.
/// Must run inside the Tokio runtime (the batch exporter is a task on it).
pub fn init(format: LogFormat, level: &str, export: bool) -> Result<Telemetry, OtlpError> {
    let config = if export {
        otlp::OtlpConfig::from_env()?
    } else {
        None
    };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let Some(config) = config else {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr);
        // A second init (tests calling `run` twice) is harmless; ignore the error.
        let _ = match format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
        };
        return Ok(Telemetry { provider: None });
    };

    let provider = config.provider()?;
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_filter(filter()).boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_filter(filter())
            .boxed(),
    };
    // Only this crate's spans (and the events inside them, as span events): the SDK's own
    // diagnostics must never feed back into the exporter.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("lockstep"))
        .with_threads(false)
        .with_filter(Targets::new().with_target("lockstep", LevelFilter::INFO))
        .boxed();
    let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![logs, spans];
    let installed = tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok();
    if installed {
        tracing::info!(
            endpoint = %config.endpoint,
            protocol = if config.json { "http/json" } else { "http/protobuf" },
            "exporting traces over OTLP"
        );
    }
    Ok(Telemetry {
        provider: Some(provider),
    })
}
