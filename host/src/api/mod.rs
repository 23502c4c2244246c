//! HTTP edge: axum routers for every resource, the shared state, the error-to-problem
//! mapping and the strict extractors. Handlers translate between wire DTOs and the domain;
//! the rules live in `sync`, the SQL in `store`.

pub(crate) mod audit;
mod backchannel;
pub mod connectors;
pub mod constraints;
mod cursor;
pub(crate) mod deliveries;
pub mod dto;
pub mod error;
pub mod events;
pub mod extract;
mod health;
pub mod limits;
pub mod openapi;
pub(crate) mod receipts;
pub mod revocation;
pub mod serve;
mod sessions;
mod spec;
pub mod ssf_push;
pub mod ssf_transmitter;

use std::time::Duration;

use axum::Router;
use axum::http::{Request, Response};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::domain::ProblemCode;
use crate::lifecycle::Connectors;
use crate::sync::sessions::SessionService;
use error::ApiError;
use utoipa_axum::router::OpenApiRouter;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Session operations.
    pub sessions: SessionService,
    /// Caller authentication.
    pub auth: Authenticator,
    /// Connector lifecycle and metrics.
    pub connectors: Connectors,
    /// Identity providers of the realms (back-channel logout, access tokens).
    pub oidc: std::sync::Arc<crate::oidc::Verifier>,
    /// Realms that accept Keycloak events, with their signing secrets.
    pub events: std::sync::Arc<crate::auth::webhook::EventKeys>,
    /// Per-caller request budget of the authenticated endpoints (`None`: unlimited).
    pub rate_limit: Option<std::sync::Arc<limits::RateLimiter>>,
    /// Failed authentications per client address (`None`: not throttled).
    pub auth_failures: Option<std::sync::Arc<limits::AuthFailures>>,
    /// The operator console (`None`: switched off).
    pub console: Option<std::sync::Arc<crate::console::Console>>,
    /// The realms' Shared Signals receiver streams (push endpoint, admin view, metrics).
    pub ssf: std::sync::Arc<crate::sync::ssf_streams::SsfReceiver>,
    /// Lockstep as a Shared Signals transmitter: keys, the realms' streams, polls.
    pub ssf_transmitter: std::sync::Arc<crate::sync::ssf_transmit::SsfTransmitter>,
}

/// The documented routes: each module's `router()` registers every handler and its
/// `#[utoipa::path]` together (`utoipa_axum::routes!`), so what is served and what
/// `/openapi.json` lists cannot drift apart. The console's pages and `/openapi.json` itself
/// are not part of the API document and are merged as plain axum routes in [`app`].
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(sessions::router())
        .merge(audit::router())
        .merge(receipts::router())
        .merge(deliveries::router())
        .merge(connectors::router())
        .merge(backchannel::router())
        .merge(revocation::router())
        .merge(ssf_push::router())
        .merge(ssf_transmitter::router())
        .merge(events::router())
        .merge(health::router())
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let metrics = state.connectors.metrics().clone();
    let console = if state.console.is_some() {
        crate::console::router()
    } else {
        Router::new()
    };
    let (api, _) = routes().split_for_parts();
    Router::new()
        .merge(console)
        .merge(api)
        .merge(openapi::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            record_request,
        ))
        .with_state(state)
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("request handler panicked");
                axum::response::IntoResponse::into_response(ApiError::Internal)
            },
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(
                    |res: &Response<_>, latency: Duration, span: &tracing::Span| {
                        let status = res.status().as_u16();
                        span.record("status", status);
                        if status >= 500 {
                            span.record("otel.status_code", "ERROR");
                        }
                        let ms = latency.as_secs_f64() * 1000.0;
                        if status >= 500 {
                            tracing::error!(status, latency_ms = ms, "response");
                        } else {
                            tracing::debug!(status, latency_ms = ms, "response");
                        }
                    },
                ),
        )
}

/// The `request` span of every call. `route` and `realm` are recorded once the router has
/// matched ([`record_request`]), `external_id` by the handlers that know it, `status` (and an
/// error status for 5xx, for trace backends) when the response is ready.
fn request_span<B>(req: &Request<B>) -> tracing::Span {
    tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        route = tracing::field::Empty,
        realm = tracing::field::Empty,
        external_id = tracing::field::Empty,
        status = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Times every request into `lockstep_http_request_duration_seconds`, labelled with the route
/// template the router matched (inside the router, where that is known), and names the route
/// and a well-formed `{realm}` on the request span.
async fn record_request(
    axum::extract::State(metrics): axum::extract::State<
        std::sync::Arc<crate::telemetry::metrics::Metrics>,
    >,
    params: Result<axum::extract::RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let span = tracing::Span::current();
    span.record("route", route.as_str());
    if let Some((_, realm)) = params
        .iter()
        .flat_map(|p| p.iter())
        .find(|(name, _)| *name == "realm")
    {
        // A malformed realm is refused by the handler; it never becomes a span attribute.
        if crate::domain::rules::realm(realm).is_ok() {
            span.record("realm", realm);
        }
    }
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    metrics.http_request(
        method.as_str(),
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::refused(ProblemCode::NotFound, "no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this route".into())
}
