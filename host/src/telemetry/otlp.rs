//! OTLP trace export: reads the standard `OTEL_EXPORTER_OTLP_*` variables, builds an HTTP
//! exporter (protobuf or JSON) behind a batch span processor on the Tokio runtime, and the
//! resource (`service.name = lockstep` unless `OTEL_SERVICE_NAME` or
//! `OTEL_RESOURCE_ATTRIBUTES` say otherwise). It decides where spans go, never which spans
//! exist: those are the modules' business.
//!
//! The exporter sends with the service's own reqwest 0.12 client (through
//! [`opentelemetry_http::HttpClient`]): opentelemetry-otlp's built-in reqwest client is 0.13,
//! which would put a second reqwest and hyper stack in the binary.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const SERVICE_NAME: &str = "lockstep";
/// Export timeout when `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` is unset (the OTLP default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector response read (the collector answers with a small status document).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";

/// Why OTLP export cannot start. Each is a start-up error: a half-configured exporter would
/// drop every span without a word.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is not an absolute `http://` URL with a host.
    #[error("{var}={value:?} is not a usable OTLP endpoint: {reason}")]
    Endpoint {
        /// The variable that held it.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// gRPC was asked for; this build exports over HTTP only.
    #[error(
        "{var}=grpc is not supported in this build: Lockstep exports OTLP over HTTP only; use \
         http/protobuf (the default, port 4318) or http/json"
    )]
    Grpc {
        /// The variable that asked for it.
        var: &'static str,
    },
    /// A protocol value the OTLP specification does not define.
    #[error("{var}={value:?} is not an OTLP protocol; use http/protobuf or http/json")]
    Protocol {
        /// The variable that held it.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The timeout is not a whole number of milliseconds.
    #[error("{var}={value:?} is not a timeout in milliseconds")]
    Timeout {
        /// The variable that held it.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The SDK refused the exporter settings (e.g. `OTEL_EXPORTER_OTLP_COMPRESSION`).
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
}

/// Where and how spans are exported, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The full URL spans are POSTed to (`…/v1/traces`).
    pub endpoint: String,
    /// `http/protobuf` or `http/json`.
    pub json: bool,
    /// Per export request.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// The configuration the process environment asks for; `None` when no endpoint is set
    /// (export off).
    pub fn from_env() -> Result<Option<OtlpConfig>, OtlpError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `var` (tests). Empty values
    /// count as unset, as the specification says.
    pub fn from_lookup(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpConfig>, OtlpError> {
        let get = |name: &'static str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .map(|v| (name, v))
        };
        // The per-signal variable is the full URL; the generic one is a base to which the
        // signal's path is appended (OTLP exporter specification).
        let (name, endpoint) = match (get(TRACES_ENDPOINT), get(ENDPOINT)) {
            (Some((name, url)), _) => (name, url),
            (None, Some((name, base))) => {
                (name, format!("{}/v1/traces", base.trim_end_matches('/')))
            }
            (None, None) => return Ok(None),
        };
        check_endpoint(&endpoint).map_err(|reason| OtlpError::Endpoint {
            var: name,
            value: var(name).unwrap_or_default(),
            reason,
        })?;
        let json = match get(TRACES_PROTOCOL).or_else(|| get(PROTOCOL)) {
            None => false,
            Some((_, p)) if p == "http/protobuf" => false,
            Some((_, p)) if p == "http/json" => true,
            Some((var, p)) if p == "grpc" => return Err(OtlpError::Grpc { var }),
            Some((var, value)) => return Err(OtlpError::Protocol { var, value }),
        };
        let timeout = match get(TRACES_TIMEOUT).or_else(|| get(TIMEOUT)) {
            None => DEFAULT_TIMEOUT,
            Some((var, value)) => match value.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => return Err(OtlpError::Timeout { var, value }),
            },
        };
        Ok(Some(OtlpConfig {
            endpoint,
            json,
            timeout,
        }))
    }

    /// The tracer provider: exporter, batch processor (spawned on the current Tokio runtime;
    /// `OTEL_BSP_*` tune it) and resource. Call inside the runtime.
    pub fn provider(&self) -> Result<SdkTracerProvider, OtlpError> {
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OtlpError::Build(format!("HTTP client: {e}")))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Reqwest(client))
            .with_endpoint(self.endpoint.clone())
            .with_protocol(if self.json {
                Protocol::HttpJson
            } else {
                Protocol::HttpBinary
            })
            .with_timeout(self.timeout)
            .build()
            .map_err(|e| OtlpError::Build(e.to_string()))?;
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        Ok(SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource())
            .build())
    }
}

/// `service.name = lockstep` and `service.version`, then `OTEL_RESOURCE_ATTRIBUTES`, then
/// `OTEL_SERVICE_NAME`: later sources win, in the specification's order of precedence.
fn resource() -> Resource {
    let builder = Resource::builder_empty()
        .with_service_name(SERVICE_NAME)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    match std::env::var(SERVICE_NAME_VAR) {
        Ok(name) if !name.trim().is_empty() => builder.with_service_name(name),
        _ => builder,
    }
    .build()
}

/// An absolute `http://` URL with a host. `https://` is refused: this build has no TLS
/// stack for outgoing service calls (connectors have their own, inside wasi:http).
fn check_endpoint(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(
                "https is not supported in this build (no TLS for OTLP); send to a \
                        collector over http, e.g. a local agent on 127.0.0.1:4318"
                    .into(),
            );
        }
        other => return Err(format!("scheme {other:?}; expected http")),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    // The SDK parses the endpoint again as an `http::Uri`; refuse here what it would refuse.
    url.parse::<http::Uri>().map_err(|e| e.to_string())?;
    Ok(())
}

/// The exporter's HTTP client: the service's reqwest, with its timeout and no redirects.
#[derive(Debug)]
struct Reqwest(reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for Reqwest {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let mut response = self.0.execute(request.try_into()?).await?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(Box::new(opentelemetry_http::ResponseBodyTooLarge::new()));
            }
            body.extend_from_slice(&chunk);
        }
        let mut out = Response::builder().status(status).body(Bytes::from(body))?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>, OtlpError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        OtlpConfig::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn no_endpoint_means_no_export() {
        assert_eq!(config(&[]).unwrap(), None);
        assert_eq!(config(&[(ENDPOINT, "  ")]).unwrap(), None);
        // A protocol alone does not switch export on.
        assert_eq!(config(&[(PROTOCOL, "http/json")]).unwrap(), None);
    }

    #[test]
    fn the_generic_endpoint_gets_the_traces_path_and_the_traces_one_is_used_as_is() {
        let c = config(&[(ENDPOINT, "http://127.0.0.1:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint, "http://127.0.0.1:4318/v1/traces");
        assert!(!c.json, "http/protobuf is the default");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        let c = config(&[
            (ENDPOINT, "http://ignored:4318"),
            (TRACES_ENDPOINT, "http://collector:9999/custom"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:9999/custom");
    }

    #[test]
    fn protocol_and_timeout_follow_the_specification_with_per_signal_precedence() {
        let c = config(&[
            (ENDPOINT, "http://127.0.0.1:4318"),
            (PROTOCOL, "http/protobuf"),
            (TRACES_PROTOCOL, "http/json"),
            (TIMEOUT, "2500"),
        ])
        .unwrap()
        .unwrap();
        assert!(c.json);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        let c = config(&[(ENDPOINT, "http://h:1"), (TRACES_TIMEOUT, "5")])
            .unwrap()
            .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(5));
    }

    #[test]
    fn grpc_and_unknown_protocols_are_start_up_errors() {
        let e = config(&[(ENDPOINT, "http://127.0.0.1:4317"), (PROTOCOL, "grpc")]).unwrap_err();
        assert!(matches!(e, OtlpError::Grpc { var: PROTOCOL }), "{e}");
        assert!(e.to_string().contains("not supported in this build"), "{e}");
        let e = config(&[(ENDPOINT, "http://h:1"), (TRACES_PROTOCOL, "http/xml")]).unwrap_err();
        assert!(matches!(e, OtlpError::Protocol { .. }), "{e}");
    }

    #[test]
    fn bad_endpoints_and_timeouts_are_start_up_errors() {
        for bad in [
            "127.0.0.1:4318",
            "not a url",
            "http://",
            "ftp://collector:21",
            "https://collector:4318",
            "http://exa mple:4318",
            "http://collector:99999",
        ] {
            let e = config(&[(TRACES_ENDPOINT, bad)]).unwrap_err();
            assert!(
                matches!(
                    e,
                    OtlpError::Endpoint {
                        var: TRACES_ENDPOINT,
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        let e = config(&[(ENDPOINT, "http://h:1"), (TIMEOUT, "10s")]).unwrap_err();
        assert!(matches!(e, OtlpError::Timeout { .. }), "{e}");
    }
}
