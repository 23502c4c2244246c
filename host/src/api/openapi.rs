//! The OpenAPI 3.1 document, served at `/openapi.json`; `docs/openapi.json` is a checked-in
//! copy kept equal by a test. The operations come from the routers (`api::routes`, where each
//! handler is registered with its `#[utoipa::path]`); this module adds what belongs to the
//! document as a whole: info, tags, the security scheme, and the modifiers that apply one
//! rule to many operations.

use axum::Json;
use axum::routing::get;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;
use super::constraints::PathRules;

/// The document-level parts; the operations and the schemas they use are added by
/// [`document`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Lockstep",
        description = "Keeps login sessions consistent between Keycloak and legacy IAM systems. \
                       The external-sessions API is compatible with Keymate's.",
        license(name = "Apache-2.0")
    ),
    tags((name = "external-sessions", description = "Map and destroy external sessions"),
         (name = "receipts", description = "Termination receipts: which connectors confirmed a logout, when, with which version"),
         (name = "deliveries", description = "Outbox deliveries to connectors, dead letters, replay"),
         (name = "connectors", description = "Load, replace, remove, enable and disable connectors at run time"),
         (name = "identity-provider", description = "OIDC Back-Channel Logout, Keycloak event intake, Global Token Revocation and Shared Signals (SSF) push from identity providers"),
         (name = "shared-signals", description = "Lockstep as a Shared Signals (SSF 1.0) transmitter: metadata, signing keys, the realms' streams, RFC 8936 poll"),
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

/// Every operation of the document (get, put, post, delete, patch), for modifiers that apply
/// one rule to all of them.
pub(super) fn operations_mut(
    openapi: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    openapi.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
    })
}

/// Every route that takes a bearer token can also answer 429 (`[limits] requests_per_second`):
/// added here to each operation that documents a 401, rather than repeated on every handler.
struct RateLimited;

impl Modify for RateLimited {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        for op in operations_mut(openapi) {
            let Some(RefOr::T(unauthorized)) = op.responses.responses.get("401") else {
                continue;
            };
            let mut limited = unauthorized.clone();
            limited.description = "RATE_LIMITED: the caller sent more than its \
                    `[limits] requests_per_second`, or its address failed to authenticate more \
                    often than `[limits] failed_auth_burst` allows; retry after `Retry-After` \
                    seconds"
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

/// OpenAPI links from the responses that create a session to the operations that take it:
/// what a client does next with `externalId`, and what lets a stateful fuzzer (schemathesis,
/// scripts/fuzz-api.sh) reach sessions that exist instead of guessing ids.
///
/// Written as JSON into the response's flattened extension map rather than `Response::links`:
/// utoipa 5.5's `Link` serialises its fields in snake_case (`operation_id`, `request_body`),
/// which no OpenAPI tool reads.
struct SessionLinks;

impl Modify for SessionLinks {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use serde_json::{Value, json};
        use utoipa::openapi::RefOr;

        const BASE: &str = "/admin/realms/{realm}/external-sessions";
        let by_path = |op: &str, description: &str| {
            json!({
                "operationId": op,
                "parameters": {
                    "realm": "$request.path.realm",
                    "externalId": "$response.body#/externalId",
                },
                "description": description,
            })
        };
        let with_body = |op: &str, field: &str, description: &str| {
            json!({
                "operationId": op,
                "parameters": { "realm": "$request.path.realm" },
                "requestBody": { field: "$response.body#/externalId" },
                "description": description,
            })
        };
        let common = || {
            serde_json::Map::from_iter([
                (
                    "GetSession".to_owned(),
                    by_path("get_session", "The session"),
                ),
                (
                    "SessionTree".to_owned(),
                    by_path("session_tree", "The tree it is in"),
                ),
                (
                    "Receipt".to_owned(),
                    by_path("session_receipt", "Its termination receipt"),
                ),
                (
                    "MapChild".to_owned(),
                    with_body("map_child", "parentExternalId", "A child under it"),
                ),
            ])
        };
        let mut root = common();
        root.insert(
            "DestroyParent".to_owned(),
            with_body("destroy_parent", "externalId", "End it and its tree"),
        );
        let mut child = common();
        child.insert(
            "DestroyChild".to_owned(),
            with_body("destroy_child", "externalId", "End it and its descendants"),
        );
        for (route, links) in [
            ("map-parent", &root),
            ("map-fixed", &root),
            ("map-child", &child),
        ] {
            let created = openapi
                .paths
                .paths
                .get_mut(&format!("{BASE}/{route}"))
                .and_then(|item| item.post.as_mut())
                .and_then(|op| op.responses.responses.get_mut("201"));
            if let Some(RefOr::T(created)) = created {
                created
                    .extensions
                    .get_or_insert_with(Default::default)
                    .insert("links".to_owned(), Value::Object(links.clone()));
            }
        }
    }
}

/// The action paths of the external-sessions API; a GET on one reads the session of that name
/// (`api::sessions::router`).
const ACTIONS: [&str; 6] = [
    "map-parent",
    "map-child",
    "map-fixed",
    "destroy-parent",
    "destroy-child",
    "destroy-user",
];

/// Documents GET on each action path: a concrete path is matched before a templated one, so
/// `GET .../map-parent` is not `GET .../{externalId}` for OpenAPI either; it reads the session
/// called `map-parent`. A copy of the `get_session` operation without the id parameter.
struct SessionsNamedLikeActions;

impl Modify for SessionsNamedLikeActions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        const BASE: &str = "/admin/realms/{realm}/external-sessions";
        let Some(get) = openapi
            .paths
            .paths
            .get(&format!("{BASE}/{{externalId}}"))
            .and_then(|item| item.get.clone())
        else {
            return;
        };
        for action in ACTIONS {
            let Some(item) = openapi.paths.paths.get_mut(&format!("{BASE}/{action}")) else {
                continue;
            };
            let mut op = get.clone();
            op.operation_id = Some(format!("get_session_named_{}", action.replace('-', "_")));
            op.summary = Some(format!(
                "The session whose external id is `{action}` (ids are free text)."
            ));
            op.description = None;
            if let Some(params) = op.parameters.as_mut() {
                params.retain(|p| p.name != "externalId");
            }
            item.get = Some(op);
        }
    }
}

/// The whole document: [`ApiDoc`], the operations of every router, then the modifiers (in
/// this order: [`SessionsNamedLikeActions`] copies an operation that [`PathRules`] has
/// already given its rules).
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(super::routes().into_openapi());
    let modifiers: [&dyn Modify; 5] = [
        &BearerAuth,
        &RateLimited,
        &PathRules,
        &SessionLinks,
        &SessionsNamedLikeActions,
    ];
    for modifier in modifiers {
        modifier.modify(&mut doc);
    }
    doc
}

/// The document as pretty JSON (what `docs/openapi.json` holds, plus a trailing newline).
pub fn document_json() -> String {
    let mut doc = document();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut text = doc.to_pretty_json().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot render the OpenAPI document");
        "{}".to_owned()
    });
    text.push('\n');
    text
}

/// The document's own route, a plain axum route: the document does not list itself.
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
    fn operation_ids_are_unique_and_every_link_names_one() {
        let doc: serde_json::Value = serde_json::from_str(&document_json()).unwrap();
        let mut ids = std::collections::BTreeSet::new();
        let mut linked = Vec::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for (method, op) in item.as_object().unwrap() {
                if !["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                    continue;
                }
                let id = op["operationId"].as_str().unwrap().to_owned();
                assert!(ids.insert(id.clone()), "operationId {id} is used twice");
                for response in op["responses"].as_object().unwrap().values() {
                    for link in response["links"].as_object().into_iter().flatten() {
                        linked.push(link.1["operationId"].as_str().unwrap().to_owned());
                    }
                }
            }
        }
        assert!(linked.len() >= 10, "{linked:?}");
        for action in ACTIONS {
            let item = &doc["paths"][format!("/admin/realms/{{realm}}/external-sessions/{action}")];
            assert!(
                item["post"].is_object() && item["get"].is_object(),
                "{action}"
            );
        }
        for id in linked {
            assert!(
                ids.contains(&id),
                "a link names {id}, which no operation has"
            );
        }
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
