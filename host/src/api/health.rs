//! `/healthz` (the process answers) and `/readyz` (the database answers too, and whether
//! every configured connector serves).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::dto::{HealthResponse, ReadyResponse};

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
    })
}

/// Readiness: the database answers. The body also says whether every configured connector
/// serves (`connectorsServing`, `failedConnectors`); one that failed to load leaves the
/// instance ready, since everything else serves.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready", body = ReadyResponse),
              (status = 503, description = "Database unavailable", body = ReadyResponse)))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<ReadyResponse>) {
    let failed_connectors = state.connectors.failed();
    let (code, status) = match state.sessions.store().ping().await {
        Ok(()) => (StatusCode::OK, "ok"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
    };
    (
        code,
        Json(ReadyResponse {
            status: status.into(),
            connectors_serving: failed_connectors.is_empty(),
            failed_connectors,
        }),
    )
}
