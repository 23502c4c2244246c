//! What the routes' `#[utoipa::path]` attributes share, stated once: the problem answers
//! most routes give ([`Problem`] as [`PROBLEM_JSON`]) and the path parameters that recur.
//! Only describes the API for the OpenAPI document; the checks stay in the extractors and
//! handlers.
//!
//! A response set is listed in `responses(..)` like a tuple; each answers one status, so
//! sets and route-specific tuples combine without overriding one another. A route whose
//! answer says more than the code (`NOT_FOUND: the realm has no ...`) writes that tuple
//! itself, with `content_type = PROBLEM_JSON`. The rule each path parameter follows is added
//! by name in [`super::constraints::PathRules`].

// The types below are never built: they exist for their `IntoResponses` and `IntoParams`
// implementations, which only the OpenAPI document reads.
#![allow(dead_code)]

use utoipa::{IntoParams, IntoResponses};

use super::error::{PROBLEM_JSON, Problem};

/// VALIDATION
#[derive(IntoResponses)]
#[response(status = 400, content_type = PROBLEM_JSON)]
pub struct Invalid(Problem);

/// VALIDATION: bad realm name
#[derive(IntoResponses)]
#[response(status = 400, content_type = PROBLEM_JSON)]
pub struct BadRealm(Problem);

/// UNAUTHORIZED
#[derive(IntoResponses)]
#[response(status = 401, content_type = PROBLEM_JSON)]
pub struct Unauthorized(Problem);

/// FORBIDDEN
#[derive(IntoResponses)]
#[response(status = 403, content_type = PROBLEM_JSON)]
pub struct Forbidden(Problem);

/// NOT_FOUND
#[derive(IntoResponses)]
#[response(status = 404, content_type = PROBLEM_JSON)]
pub struct NotFound(Problem);

/// NOT_FOUND: no `public_url` is configured
#[derive(IntoResponses)]
#[response(status = 404, content_type = PROBLEM_JSON)]
pub struct NoPublicUrl(Problem);

/// ALREADY_EXISTS
#[derive(IntoResponses)]
#[response(status = 409, content_type = PROBLEM_JSON)]
pub struct AlreadyExists(Problem);

/// CASCADE_TOO_LARGE: the destroy would end more sessions than `[limits] max_cascade`; nothing changed
#[derive(IntoResponses)]
#[response(status = 422, content_type = PROBLEM_JSON)]
pub struct CascadeTooLarge(Problem);

/// Problems of the routes that take a JSON body (`extract::ApiJson`).
#[derive(IntoResponses)]
pub enum JsonBody {
    /// PAYLOAD_TOO_LARGE: body over 64 KiB
    #[response(status = 413, content_type = PROBLEM_JSON)]
    TooLarge(Problem),
    /// VALIDATION: body is not application/json
    #[response(status = 415, content_type = PROBLEM_JSON)]
    NotJson(Problem),
}

/// The realm of a route under `/realms/{realm}` or `/admin/realms/{realm}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct Realm {
    /// Realm name
    realm: String,
}

/// The session a route under `external-sessions/{externalId}` is about.
#[derive(IntoParams)]
#[into_params(parameter_in = Path, rename_all = "camelCase")]
pub struct ExternalId {
    /// External id
    external_id: String,
}

/// The connector of a route under `/admin/connectors/{name}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ConnectorName {
    /// Connector name
    name: String,
}
