//! Logging and trace set-up: `tracing` to stderr as text or JSON, filtered by `RUST_LOG` or
//! `--log-level`, and, when `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` is set, the same spans
//! exported over OTLP ([`otlp`]). It configures output only; which spans and events exist is
//! each module's business. [`metrics`] holds the counters behind `GET /metrics`; [`audit`] the
//! audit log's retention. Text logs escape every control character of every field (see
//! [`EscapedFields`]), so text from outside cannot forge or hide log lines.

pub mod audit;
pub mod metrics;
pub mod otlp;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
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

/// The fields of text logs, each value with its control characters escaped (`\n`, `\r`,
/// `\u{1b}`, ...), and the Unicode line separators and bidirectional overrides too. Field
/// values come from outside (a logout token's `alg`, a connector's log line, a peer's error
/// text): unescaped, a newline in one forges a log line of its own, an ANSI sequence rewrites
/// the operator's terminal. Escaping here covers every call site, the message and span fields
/// included. JSON logs need none of it: JSON strings escape control characters already.
#[derive(Clone, Copy, Debug, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: std::fmt::Result,
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // Quoted, as the default formatter writes strings.
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let name = field.name();
        // The `log` crate's bridge metadata, which the default formatter leaves out too.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        // Streamed through the escaping writer, not formatted into a string first: the fmt
        // layer formats every span's fields when the span opens, logged or not, and each
        // delivery opens two.
        self.result = if name == "message" {
            self.writer.write_str(separator)
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{separator}{name}=")
        }
        .and_then(|()| write!(Escaping(&mut self.writer), "{value:?}"));
    }
}

/// Writes what it is given on to the inner writer with the characters that could forge or
/// hide a log line escaped ([`EscapedFields`]); runs of safe text pass through in one write.
struct Escaping<'a, W: std::fmt::Write>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let mut safe_from = 0;
        for (at, c) in text.char_indices() {
            let risky = c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if risky {
                self.0.write_str(&text[safe_from..at])?;
                write!(self.0, "{}", c.escape_default())?;
                safe_from = at + c.len_utf8();
            }
        }
        self.0.write_str(&text[safe_from..])
    }
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
            LogFormat::Text => builder.fmt_fields(EscapedFields).try_init(),
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
        };
        return Ok(Telemetry { provider: None });
    };

    let provider = config.provider()?;
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.fmt_fields(EscapedFields).with_filter(filter()).boxed(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_logs_escape_control_characters_of_every_field() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields)
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", path = %"/x\nINFO forged");
            let _entered = span.enter();
            let alg = "RS256\n2026-01-01T00:00:00Z  INFO lockstep: admin logged in";
            let line = "ok\r\u{1b}[2Khidden\u{202e}";
            tracing::warn!(reason = %alg, kid = "k\n1", "connector says {line}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "one event, one line: {text}");
        assert!(text.ends_with('\n'));
        for escaped in [
            r"path=/x\nINFO forged",
            r"connector says ok\r\u{1b}[2Khidden\u{202e}",
            r"reason=RS256\n2026",
            r#"kid="k\n1""#,
        ] {
            assert!(text.contains(escaped), "{escaped} missing from {text}");
        }
        assert!(!text.contains('\u{1b}') && !text.contains('\r'));
    }
}
