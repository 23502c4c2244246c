//! The OpenAPI 3.1 document, generated from the handlers and DTOs and served at
//! `/openapi.json`; `docs/openapi.json` is a checked-in copy kept equal by a test.

use axum::Json;
use axum::routing::get;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;
use super::constraints::PathRules;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Lockstep",
        description = "Keeps login sessions consistent between Keycloak and legacy IAM systems. \
                       The external-sessions API is compatible with Keymate's.",
        license(name = "Apache-2.0")
    ),
    paths(
        super::sessions::map_parent,
        super::sessions::map_child,
        super::sessions::map_fixed,
        super::sessions::destroy_parent,
        super::sessions::destroy_child,
        super::sessions::destroy_user,
        super::sessions::session_tree,
        super::sessions::get_session,
        super::sessions::list_sessions,
        super::receipts::session_receipt,
        super::receipts::user_receipts,
        super::deliveries::list,
        super::deliveries::one,
        super::deliveries::replay,
        super::connectors::list,
        super::connectors::one,
        super::connectors::put,
        super::connectors::remove,
        super::connectors::disable,
        super::connectors::enable,
        super::connectors::metrics,
        super::backchannel::logout,
        super::events::receive,
        super::health::healthz,
        super::health::readyz,
        super::audit::list,
    ),
    modifiers(&BearerAuth, &RateLimited, &PathRules),
    tags((name = "external-sessions", description = "Map and destroy external sessions"),
         (name = "receipts", description = "Termination receipts: which connectors confirmed a logout, when, with which version"),
         (name = "deliveries", description = "Outbox deliveries to connectors, dead letters, replay"),
         (name = "connectors", description = "Load, replace, remove, enable and disable connectors at run time"),
         (name = "identity-provider", description = "OIDC Back-Channel Logout and Keycloak event intake from the realm's identity provider"),
         (name = "audit", description = "The audit log of session operations and admin actions"),
         (name = "health", description = "Liveness, readiness and metrics"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "LOCKSTEP_ADMIN_TOKEN, a configured API key, or an IdP access token",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every route that takes a bearer token can also answer 429 (`[limits] requests_per_second`):
/// added here to each operation that documents a 401, rather than repeated on every handler.
struct RateLimited;

impl Modify for RateLimited {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let Some(RefOr::T(unauthorized)) = op.responses.responses.get("401") else {
                    continue;
                };
                let mut limited = unauthorized.clone();
                limited.description = "RATE_LIMITED: the caller sent more than its \
                    `[limits] requests_per_second`; retry after `Retry-After` seconds"
                    .to_owned();
                limited.headers.insert(
                    "Retry-After".to_owned(),
                    HeaderBuilder::new()
                        .schema(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(1)),
                        )
                        .description(Some("Seconds until a request is accepted again"))
                        .build(),
                );
                op.responses
                    .responses
                    .insert("429".to_owned(), RefOr::T(limited));
            }
        }
    }
}

/// The document as pretty JSON (what `docs/openapi.json` holds, plus a trailing newline).
pub fn document_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut text = doc.to_pretty_json().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot render the OpenAPI document");
        "{}".to_owned()
    });
    text.push('\n');
    text
}

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new().route("/openapi.json", get(serve))
}

async fn serve() -> Json<serde_json::Value> {
    Json(serde_json::from_str(&document_json()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_openapi_document_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == document_json(),
            "docs/openapi.json is stale: run `cargo run -p lockstep -- openapi > docs/openapi.json`"
        );
    }

    #[test]
    fn document_is_openapi_3_1_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&document_json()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = doc["paths"].as_object().unwrap();
        for route in [
            "map-parent",
            "map-child",
            "map-fixed",
            "destroy-parent",
            "destroy-child",
            "destroy-user",
            "session-tree/{externalId}",
            "{externalId}",
        ] {
            let key = format!("/admin/realms/{{realm}}/external-sessions/{route}");
            assert!(paths.contains_key(&key), "missing {key}");
        }
        assert!(paths.contains_key("/admin/realms/{realm}/external-sessions"));
    }
}
