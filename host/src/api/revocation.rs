//! `POST /realms/{realm}/global-token-revocation`: Global Token Revocation
//! (draft-parecki-oauth-global-token-revocation-06), the endpoint Okta Universal Logout and
//! Auth0 call, and the metadata that advertises it. The caller is an identity provider of
//! `[[realms.NAME.token_revocation_callers]]` with a JWT it signed for this endpoint (verified
//! in full by `oidc::revocation`, its `jti` stored with the revocation), or an API client with
//! `users:manage` in the realm. Every live session of the subject ends (reason `revoked`, a
//! `revoke` and a `logout` event each). The draft leaves the error body open; refusals here
//! are OAuth-style `{"error", "error_description"}`, what the IdPs calling it read.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiPath, Caller, JsonBytes};
use super::spec::Realm;
use crate::auth::Permission;
use crate::domain::rules;
use crate::domain::{AuditAction, AuditEntry, EndReason, ProblemCode, ReplayGuard, ReplayKind};
use crate::oidc::OidcError;
use crate::oidc::revocation::RevocationToken;
use crate::store::StoreError;
use crate::sync::sessions::{Revoker, SessionError};

/// The subject identifier formats this endpoint resolves (RFC 9493 names).
pub const SUBJECT_FORMATS: [&str; 3] = ["email", "iss_sub", "opaque"];

/// Routes of this resource, each registered and documented by `routes!`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(revoke))
        .routes(routes!(metadata))
}

/// A Security Event Token subject identifier (RFC 9493) of a format this endpoint resolves
/// to a user: `opaque` `id` and `iss_sub` `sub` are Lockstep's `userId`, `email` is a
/// `userId` spelled as that address. Documented by [`subject_schema`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum SubjectId {
    /// `{"format": "email", "email": ...}`: the user whose `userId` is this address.
    Email {
        /// The address, compared exactly.
        email: String,
    },
    /// `{"format": "iss_sub", "iss": ..., "sub": ...}`: the user `sub` of issuer `iss`, which
    /// must be the realm's identity provider or the calling one.
    IssSub {
        /// The issuer.
        iss: String,
        /// The user at that issuer: Lockstep's `userId`.
        sub: String,
    },
    /// `{"format": "opaque", "id": ...}`: the user whose `userId` is `id`.
    Opaque {
        /// Lockstep's `userId`.
        id: String,
    },
}

/// The schema of [`SubjectId`], written out: each format closed to other members, as the
/// parser is (utoipa does not say so for the variants of a tagged enum).
fn subject_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Type};
    let text = |max: usize, description: &str| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(max))
            .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]+$"))
            .description(Some(description))
    };
    let variant = |format: &str, members: &[(&str, usize, &str)], description: &str| {
        let mut object = ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(description))
            .property(
                "format",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([format])),
            )
            .required("format");
        for (name, max, about) in members {
            object = object.property(*name, text(*max, about)).required(*name);
        }
        object
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .build()
    };
    OneOfBuilder::new()
        .item(variant(
            "email",
            &[("email", rules::MAX_ID_LEN, "Compared exactly with userId")],
            "The user whose userId is this address",
        ))
        .item(variant(
            "iss_sub",
            &[
                (
                    "iss",
                    rules::MAX_ID_LEN,
                    "The realm's identity provider or the calling one",
                ),
                ("sub", rules::MAX_ID_LEN, "The user's userId"),
            ],
            "The user sub of issuer iss",
        ))
        .item(variant(
            "opaque",
            &[("id", rules::MAX_ID_LEN, "The user's userId")],
            "The user whose userId is id",
        ))
        .description(Some(
            "An RFC 9493 subject identifier of format email, iss_sub or opaque",
        ))
        .build()
        .into()
}

impl SubjectId {
    /// The RFC 9493 format name.
    pub fn format(&self) -> &'static str {
        match self {
            SubjectId::Email { .. } => "email",
            SubjectId::IssSub { .. } => "iss_sub",
            SubjectId::Opaque { .. } => "opaque",
        }
    }
}

/// Body of a revocation request: the subject as `sub_id` (draft-06) or `subject` (earlier
/// drafts, what Okta and Auth0 send); exactly one of them. Only documents the body (its
/// schema is written out, as utoipa drops `minProperties`); [`parse_body`] reads it.
pub struct RevocationRequest;

impl utoipa::PartialSchema for RevocationRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "The user whose sessions end, as sub_id or (its earlier name) subject: \
                 exactly one of them",
            ))
            .property("sub_id", subject_schema())
            .property("subject", subject_schema())
            .min_properties(Some(1))
            .max_properties(Some(1))
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for RevocationRequest {}

/// A refusal: an OAuth-style error code and its explanation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevocationError {
    /// invalid_request, unsupported_subject_format, invalid_token, insufficient_scope,
    /// user_not_found, unable_to_process, slow_down or temporarily_unavailable.
    pub error: String,
    /// What was refused and why.
    pub error_description: String,
}

/// Why a body is refused (both are 400).
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON, not the shape, or an identifier breaking the rules.
    Invalid(String),
    /// A subject identifier format this endpoint does not resolve.
    UnsupportedFormat(String),
}

/// Reads a request body into its subject. The format is looked at before the members, so an
/// unknown format is reported as such rather than as a malformed body.
pub fn parse_body(bytes: &[u8]) -> Result<SubjectId, BodyError> {
    let body: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)
        .map_err(|e| BodyError::Invalid(format!("invalid JSON body: {e}")))?;
    let mut members = body.into_iter();
    let value = match (members.next(), members.next()) {
        (Some((name, value)), None) if name == "sub_id" || name == "subject" => value,
        (None, _) => {
            return Err(BodyError::Invalid(
                "the body must name the user in sub_id (or subject)".into(),
            ));
        }
        _ => {
            return Err(BodyError::Invalid(
                "the body holds exactly one member, sub_id or subject".into(),
            ));
        }
    };
    let Some(format) = value
        .get("format")
        .and_then(|f| f.as_str())
        .map(str::to_owned)
    else {
        return Err(BodyError::Invalid(
            "the subject identifier must be an object with a string format".into(),
        ));
    };
    if !SUBJECT_FORMATS.contains(&format.as_str()) {
        return Err(BodyError::UnsupportedFormat(format!(
            "subject format {format:?} is not supported (email, iss_sub, opaque)"
        )));
    }
    let subject: SubjectId = serde_json::from_value(value)
        .map_err(|e| BodyError::Invalid(format!("invalid {format} subject: {e}")))?;
    let checked = match &subject {
        SubjectId::Email { email } => rules::id("email", email),
        SubjectId::Opaque { id } => rules::id("id", id),
        SubjectId::IssSub { iss, sub } => {
            rules::id("iss", iss).and_then(|()| rules::id("sub", sub))
        }
    };
    checked.map_err(|e| BodyError::Invalid(e.to_string()))?;
    Ok(subject)
}

fn refuse(status: StatusCode, error: &str, description: impl Into<String>) -> Response {
    let mut response = super::error::no_store_json(
        status,
        RevocationError {
            error: error.to_owned(),
            error_description: description.into(),
        },
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    response
}

/// The same refusal from an error of the API's shared extractors (credentials, body).
fn refuse_api(e: ApiError) -> Response {
    let status = e.status_and_code().0;
    let error = match status {
        StatusCode::UNAUTHORIZED => "invalid_token",
        StatusCode::FORBIDDEN => "insufficient_scope",
        StatusCode::TOO_MANY_REQUESTS => "slow_down",
        StatusCode::SERVICE_UNAVAILABLE => "temporarily_unavailable",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request",
    };
    let retry_after = match &e {
        ApiError::RateLimited {
            retry_after_secs, ..
        } => Some(*retry_after_secs),
        _ => None,
    };
    let mut response = refuse(status, error, e.to_string());
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Who is calling: an identity provider's verified token, or an API client.
enum Revoking {
    Idp(RevocationToken),
    Api(crate::auth::Principal),
}

/// Orders the end of every session of a user in the realm.
#[utoipa::path(post, path = "/realms/{realm}/global-token-revocation", operation_id = "global_token_revocation", tag = "identity-provider",
    params(Realm),
    request_body(content = RevocationRequest, content_type = "application/json",
                 description = "The user, as `sub_id` or `subject`: an RFC 9493 subject identifier of format email, iss_sub or opaque"),
    responses(
        (status = 204, description = "Every live session of the user ended (reason `revoked`; connectors hear `revoke` and `logout`); also when none was live"),
        (status = 400, description = "invalid_request (malformed body or realm name) or unsupported_subject_format", body = RevocationError),
        (status = 401, description = "invalid_token: no credentials, or a token that is not valid (signature, issuer, audience, lifetime, a jti already used)", body = RevocationError),
        (status = 403, description = "insufficient_scope: an API client without `users:manage` in this realm", body = RevocationError),
        (status = 404, description = "user_not_found: the realm never had a session of this user (or an iss_sub of an issuer it does not trust)", body = RevocationError),
        (status = 413, description = "invalid_request: body over 64 KiB", body = RevocationError),
        (status = 415, description = "invalid_request: body is not application/json", body = RevocationError),
        (status = 422, description = "unable_to_process: ending the sessions would exceed `[limits] max_cascade` (API clients only); nothing changed", body = RevocationError),
        (status = 503, description = "temporarily_unavailable: the calling IdP's keys or the database cannot be reached; retry", body = RevocationError),
    ),
    security(("bearer" = [])))]
async fn revoke(State(state): State<AppState>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let realm = match ApiPath::<String>::from_request_parts(&mut parts, &state).await {
        Ok(ApiPath(realm)) => realm,
        Err(e) => return refuse_api(e),
    };
    if let Err(e) = rules::realm(&realm) {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
    }
    let caller = match authenticate(&state, &realm, &mut parts).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let bytes = match JsonBytes::from_request(Request::from_parts(parts, body), &state).await {
        Ok(JsonBytes(bytes)) => bytes,
        Err(e) => return refuse_api(e),
    };
    let subject = match parse_body(&bytes) {
        Ok(s) => s,
        Err(BodyError::Invalid(d)) => {
            return refuse(StatusCode::BAD_REQUEST, "invalid_request", d);
        }
        Err(BodyError::UnsupportedFormat(d)) => {
            return refuse(StatusCode::BAD_REQUEST, "unsupported_subject_format", d);
        }
    };
    let detail = |jti: Option<&str>| {
        let mut d = serde_json::json!({
            "reason": EndReason::Revoked.as_str(),
            "format": subject.format(),
        });
        if let Some(jti) = jti {
            d["jti"] = serde_json::Value::from(jti);
        }
        d
    };
    let revoker = match &caller {
        Revoking::Idp(token) => Revoker {
            actor: format!(
                "idp:{}",
                token.system.as_deref().unwrap_or(token.issuer.as_str())
            ),
            origin_system: token.system.clone(),
            guard: Some(ReplayGuard {
                // Stored beside logout token ids: namespaced so neither kind of token can
                // replay as the other, and by issuer, as a jti is unique only per issuer.
                kind: ReplayKind::LogoutToken,
                jti: format!("gtr {} {}", token.issuer, token.jti),
                until_ms: token.remember_until_ms,
            }),
            limited: false,
            detail: detail(Some(&token.jti)),
        },
        Revoking::Api(principal) => Revoker {
            actor: principal.actor(),
            origin_system: Some(principal.system().to_owned()),
            guard: None,
            limited: true,
            detail: detail(None),
        },
    };
    let user_id = match &subject {
        SubjectId::Email { email } => email.clone(),
        SubjectId::Opaque { id } => id.clone(),
        SubjectId::IssSub { iss, sub } => {
            let realm_issuer = state
                .oidc
                .revocation(&realm)
                .and_then(|r| r.realm_issuer.clone())
                .or_else(|| state.oidc.realm(&realm).map(|i| i.issuer.clone()));
            let caller_issuer = match &caller {
                Revoking::Idp(token) => Some(token.issuer.clone()),
                Revoking::Api(_) => None,
            };
            if realm_issuer.as_deref() != Some(iss.as_str())
                && caller_issuer.as_deref() != Some(iss.as_str())
            {
                let detail = format!(
                    "issuer {iss:?} is neither the realm's identity provider nor the caller"
                );
                let entry = AuditEntry::new(
                    revoker.actor.clone(),
                    AuditAction::GlobalTokenRevocation,
                    Some(&realm),
                )
                .target(sub.as_str())
                .detail(revoker.detail.clone());
                // Recorded like the store's own NOT_FOUND: the answer is built here.
                let _ = super::audit::refused(
                    &state,
                    entry,
                    Err::<(), _>(ApiError::refused(ProblemCode::NotFound, detail.clone())),
                )
                .await;
                return refuse(StatusCode::NOT_FOUND, "user_not_found", detail);
            }
            sub.clone()
        }
    };
    match state.sessions.revoke_user(&realm, &user_id, revoker).await {
        Ok(ended) => {
            tracing::info!(%realm, format = subject.format(), ended = ended.len(), "global token revocation");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(SessionError::Store(StoreError::NotFound(_))) => refuse(
            StatusCode::NOT_FOUND,
            "user_not_found",
            format!("realm {realm:?} never had a session of this user"),
        ),
        Err(SessionError::Store(StoreError::Replayed(_))) => refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the token's jti was already used",
        ),
        Err(SessionError::Store(e @ StoreError::CascadeTooLarge { .. })) => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unable_to_process",
            e.to_string(),
        ),
        Err(SessionError::Invalid(e)) => refuse(StatusCode::BAD_REQUEST, "invalid_request", e.0),
        Err(e) => refuse_api(ApiError::from(e)),
    }
}

/// A trusted IdP's token when the bearer token is a JWT of one of the realm's callers;
/// otherwise the API's own credentials (API key, bootstrap token, IdP access token) with
/// `users:manage` in the realm.
async fn authenticate(
    state: &AppState,
    realm: &str,
    parts: &mut axum::http::request::Parts,
) -> Result<Revoking, Response> {
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim);
    if let Some(token) = token {
        let gate = super::limits::FailureGate::of_request(
            state.auth_failures.as_deref(),
            &parts.extensions,
        );
        if let Some(gate) = gate {
            gate.check().map_err(|o| refuse_api(o.into()))?;
        }
        match state.oidc.verify_revocation(realm, token).await {
            Ok(Some(token)) => return Ok(Revoking::Idp(token)),
            Ok(None) => {}
            Err(OidcError::Unavailable(detail)) => {
                // The detail names the IdP's internal URLs: the log gets it, the caller not.
                tracing::warn!(%realm, %detail, "global token revocation: the caller's keys are unavailable");
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "the token cannot be verified now: the identity provider's keys are unavailable",
                ));
            }
            Err(e) => {
                tracing::warn!(%realm, reason = %e, "global token revocation: token refused");
                if let Some(gate) = gate {
                    gate.failed();
                }
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    e.to_string(),
                ));
            }
        }
    }
    let Caller(principal) = Caller::from_request_parts(parts, state)
        .await
        .map_err(refuse_api)?;
    principal
        .authorize(realm, Permission::UsersManage)
        .map_err(|e| refuse_api(e.into()))?;
    Ok(Revoking::Api(principal))
}

/// Authorization server metadata (RFC 8414) of a realm: where its global token revocation
/// endpoint is and what it takes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevocationMetadata {
    /// `{public_url}/realms/{realm}`.
    pub issuer: String,
    /// The endpoint's URL.
    pub global_token_revocation_endpoint: String,
    /// How callers authenticate: a bearer token (an IdP-signed JWT or an API key).
    pub global_token_revocation_endpoint_auth_methods_supported: Vec<String>,
    /// The subject identifier formats the endpoint resolves (Lockstep's addition).
    pub global_token_revocation_subject_formats_supported: Vec<String>,
}

/// The realm's metadata document (RFC 8414 path form: the well-known prefix before the
/// realm's path).
#[utoipa::path(get, path = "/.well-known/oauth-authorization-server/realms/{realm}", operation_id = "revocation_metadata", tag = "identity-provider",
    params(Realm),
    responses(
        (status = 200, description = "The realm's global token revocation endpoint and what it takes", body = RevocationMetadata),
        (status = 400, description = "invalid_request: bad realm name", body = RevocationError),
        (status = 404, description = "not_found: no `public_url` is configured, so no absolute URL can be advertised", body = RevocationError),
    ))]
async fn metadata(State(state): State<AppState>, ApiPath(realm): ApiPath<String>) -> Response {
    if let Err(e) = rules::realm(&realm) {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
    }
    let Some(public_url) = state.oidc.public_url() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "no public_url is configured, so the endpoint's URL is unknown",
        );
    };
    let base = public_url.trim_end_matches('/');
    Json(RevocationMetadata {
        issuer: format!("{base}/realms/{realm}"),
        global_token_revocation_endpoint: crate::oidc::revocation::endpoint_url(base, &realm),
        global_token_revocation_endpoint_auth_methods_supported: vec!["Bearer".into()],
        global_token_revocation_subject_formats_supported: SUBJECT_FORMATS
            .iter()
            .map(|f| (*f).to_owned())
            .collect(),
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<SubjectId, BodyError> {
        parse_body(body.as_bytes())
    }

    #[test]
    fn subjects_are_read_from_sub_id_or_subject() {
        let opaque = SubjectId::Opaque { id: "u-1".into() };
        assert_eq!(
            parse(r#"{"sub_id": {"format": "opaque", "id": "u-1"}}"#),
            Ok(opaque.clone())
        );
        assert_eq!(
            parse(r#"{"subject": {"format": "opaque", "id": "u-1"}}"#),
            Ok(opaque)
        );
        assert_eq!(
            parse(r#"{"subject": {"format": "email", "email": "a@example.com"}}"#),
            Ok(SubjectId::Email {
                email: "a@example.com".into()
            })
        );
        assert_eq!(
            parse(r#"{"sub_id": {"format": "iss_sub", "iss": "https://i", "sub": "s"}}"#),
            Ok(SubjectId::IssSub {
                iss: "https://i".into(),
                sub: "s".into()
            })
        );
    }

    #[test]
    fn malformed_bodies_and_unknown_formats_are_told_apart() {
        let unsupported = |b: &str| matches!(parse(b), Err(BodyError::UnsupportedFormat(_)));
        let invalid = |b: &str| matches!(parse(b), Err(BodyError::Invalid(_)));
        assert!(unsupported(
            r#"{"sub_id": {"format": "phone_number", "phone_number": "+1"}}"#
        ));
        assert!(unsupported(
            r#"{"sub_id": {"format": "account", "uri": "acct:a@b"}}"#
        ));
        for body in [
            "",
            "[]",
            "{}",
            r#"{"sub_id": null}"#,
            r#"{"sub_id": "u-1"}"#,
            r#"{"sub_id": {"id": "u-1"}}"#,
            r#"{"sub_id": {"format": 1, "id": "u-1"}}"#,
            r#"{"sub_id": {"format": "opaque"}}"#,
            r#"{"sub_id": {"format": "opaque", "id": ""}}"#,
            r#"{"sub_id": {"format": "opaque", "id": "u\u0001"}}"#,
            r#"{"sub_id": {"format": "opaque", "id": "u", "extra": 1}}"#,
            r#"{"sub_id": {"format": "email", "id": "u"}}"#,
            r#"{"sub_id": {"format": "iss_sub", "sub": "s"}}"#,
            r#"{"sub_id": {"format": "iss_sub", "iss": "", "sub": "s"}}"#,
            r#"{"sub_id": {"format": "opaque", "id": "u"}, "subject": {"format": "opaque", "id": "u"}}"#,
            r#"{"sub_id": {"format": "opaque", "id": "u"}, "other": 1}"#,
            r#"{"sub_id": null, "subject": {"format": "opaque", "id": "u"}}"#,
        ] {
            assert!(invalid(body), "{body}");
        }
        let long = "x".repeat(256);
        assert!(invalid(&format!(
            r#"{{"sub_id": {{"format": "opaque", "id": "{long}"}}}}"#
        )));
    }
}
