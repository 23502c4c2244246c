//! The input rules of [`crate::domain::rules`] (and of connector names, cursors and page
//! sizes) stated in the OpenAPI document, built from the same constants, so that a client —
//! or a fuzzer — can tell valid input from invalid without calling. Only describes input:
//! the checks themselves stay where they are.
//!
//! Ids in bodies and queries carry their rule inline (`#[schema(min_length = 1, max_length =
//! 255, pattern = ..)]`: utoipa drops a field's doc comment when `schema_with` is used, and
//! takes only literals there), checked against the constants by the tests below. Attribute
//! maps, end reasons, cursors and page sizes use the functions here through `schema_with`;
//! path parameters (the shared ones in `api::spec`, the few route-specific ones inline in
//! their `#[utoipa::path]`) get theirs from [`PathRules`] by name.

use utoipa::Modify;
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{
    AdditionalProperties, Object, ObjectBuilder, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::{KnownFormat, RefOr};

use crate::domain::EndReason;
use crate::domain::rules::{
    MAX_ATTRIBUTE_KEY_LEN, MAX_ATTRIBUTES, MAX_ATTRIBUTES_BYTES, MAX_ID_LEN, MAX_REALM_LEN,
};
use crate::sync::sessions::{DEFAULT_PAGE, MAX_PAGE};

/// Characters of realm and connector names.
const NAME_PATTERN: &str = "^[A-Za-z0-9._-]+$";
/// No control characters (Unicode category Cc, what `char::is_control` refuses). Written with
/// `\u` escapes, which ECMA-262 and Python regular expressions read alike.
const NO_CONTROL_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";
/// What `api::cursor::encode` issues: hex of `v1:` and at most 18 decimal digits (every such
/// position is accepted; 19 digits could overflow an i64).
const CURSOR_PATTERN: &str = "^76313a(3[0-9]){1,18}$";
/// Longest connector name (`runtime::manifest::check_name`).
const MAX_CONNECTOR_NAME_LEN: usize = 64;

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

/// A realm name: 1–64 characters from `[A-Za-z0-9._-]`.
pub fn realm() -> Object {
    string()
        .min_length(Some(1))
        .max_length(Some(MAX_REALM_LEN))
        .pattern(Some(NAME_PATTERN))
        .description(Some(format!(
            "Realm name: 1-{MAX_REALM_LEN} characters from [A-Za-z0-9._-]"
        )))
        .build()
}

/// A connector name: 1–64 characters from `[A-Za-z0-9._-]`.
pub fn connector_name() -> Object {
    string()
        .min_length(Some(1))
        .max_length(Some(MAX_CONNECTOR_NAME_LEN))
        .pattern(Some(NAME_PATTERN))
        .build()
}

/// An id (external id, session id, user id, system label): 1–255 characters, no control
/// characters.
pub fn id() -> Object {
    string()
        .min_length(Some(1))
        .max_length(Some(MAX_ID_LEN))
        .pattern(Some(NO_CONTROL_PATTERN))
        .build()
}

/// A session's attributes: string values, at most 64 entries, keys of 1–128 characters
/// without control characters (the 8 KiB total cannot be stated in JSON Schema; it is in the
/// description).
pub fn attributes() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::from(string())))
        .max_properties(Some(MAX_ATTRIBUTES))
        .property_names(Some(
            string()
                .min_length(Some(1))
                .max_length(Some(MAX_ATTRIBUTE_KEY_LEN))
                .pattern(Some(NO_CONTROL_PATTERN)),
        ))
        .description(Some(format!(
            "String metadata: at most {MAX_ATTRIBUTES} entries, keys of 1-{MAX_ATTRIBUTE_KEY_LEN} \
             characters, at most {MAX_ATTRIBUTES_BYTES} bytes of keys and values in all"
        )))
        .build()
}

/// The end reason a caller may give (every [`EndReason`] but the ones the cascade assigns),
/// or null for the default, `logout`.
pub fn caller_reason() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(
            EndReason::ALL
                .iter()
                .filter(|r| r.caller_may_give())
                .map(|r| serde_json::Value::from(r.as_str()))
                .chain([serde_json::Value::Null]),
        ))
        .description(Some(
            "Why the session ends (default logout); cascade and delegation_ended are \
             assigned by the cascade only, reconciled by the reconciler only",
        ))
        .build()
}

/// A page cursor: a `nextCursor` given back unchanged.
pub fn cursor() -> Object {
    string()
        .pattern(Some(CURSOR_PATTERN))
        .description(Some("`nextCursor` of the previous page, unchanged"))
        .build()
}

/// A page size: 1–500, default 50.
pub fn page_limit() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
        .minimum(Some(1))
        .maximum(Some(MAX_PAGE))
        .default(Some(DEFAULT_PAGE.into()))
        .description(Some(format!(
            "Page size, 1-{MAX_PAGE} (default {DEFAULT_PAGE})"
        )))
        .build()
}

/// A page size of the per-user receipts: 1–500, default 500.
pub fn receipts_page_limit() -> Object {
    let page = crate::sync::receipts::USER_PAGE;
    let mut limit = page_limit();
    limit.default = Some(page.into());
    limit.description = Some(format!("Sessions per page, 1-{MAX_PAGE} (default {page})"));
    limit
}

/// Gives the path parameters their rules by name: `realm`, `externalId` (an id), `name` (a
/// connector) and `id` (a delivery, int64). By name, so that a parameter declared inline in
/// a route's annotation gets the same rule as the shared ones of `api::spec`; the rule is in
/// one place, as `RateLimited` keeps 429.
pub struct PathRules;

impl Modify for PathRules {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for op in super::openapi::operations_mut(openapi) {
            for p in op.parameters.iter_mut().flatten() {
                if p.parameter_in != ParameterIn::Path {
                    continue;
                }
                let schema = match p.name.as_str() {
                    "realm" => realm(),
                    "externalId" | "stream_id" => id(),
                    "name" => connector_name(),
                    "id" => ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                        .build(),
                    _ => continue,
                };
                p.schema = Some(RefOr::T(schema.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EndReason, SessionKind, SessionStatus};

    fn document() -> serde_json::Value {
        serde_json::from_str(&crate::api::openapi::document_json()).unwrap_or_default()
    }

    #[test]
    fn enums_in_the_document_use_the_wire_spellings() {
        let doc = document();
        let spelled = |name: &str| -> Vec<String> {
            doc["components"]["schemas"][name]["enum"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        fn wire<T: serde::Serialize>(all: &[T]) -> Vec<String> {
            all.iter()
                .filter_map(|v| serde_json::to_value(v).ok()?.as_str().map(str::to_owned))
                .collect()
        }
        assert_eq!(spelled("SessionKind"), wire(SessionKind::ALL));
        assert_eq!(spelled("SessionStatus"), wire(SessionStatus::ALL));
        assert_eq!(spelled("EndReason"), wire(EndReason::ALL));
        assert_eq!(
            wire(SessionStatus::ALL),
            ["ACTIVE", "DESTROYED", "ORPHANED"]
        );
    }

    #[test]
    fn every_path_parameter_states_its_rule() {
        let doc = document();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        assert!(!paths.is_empty());
        for (path, item) in paths {
            for (method, op) in item.as_object().cloned().unwrap_or_default() {
                for p in op["parameters"].as_array().cloned().unwrap_or_default() {
                    if p["in"] == "path" {
                        let schema = &p["schema"];
                        assert!(
                            schema.get("pattern").is_some() || schema["type"] == "integer",
                            "{method} {path}: path parameter {} has no rule",
                            p["name"]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn cursors_the_pattern_allows_are_accepted() {
        // The pattern describes what `cursor::encode` issues; every position it allows
        // (up to 18 digits) decodes.
        assert_eq!(
            super::super::cursor::decode(&hex::encode("v1:0")).ok(),
            Some(0)
        );
        let longest = "9".repeat(18);
        assert!(super::super::cursor::decode(&hex::encode(format!("v1:{longest}"))).is_ok());
        assert!(super::super::cursor::encode(42).starts_with("76313a"));
    }

    /// Every string schema in the document, with where it is.
    fn string_schemas(
        v: &serde_json::Value,
        at: String,
        out: &mut Vec<(String, serde_json::Value)>,
    ) {
        match v {
            serde_json::Value::Object(map) => {
                if map.contains_key("pattern") {
                    out.push((at.clone(), v.clone()));
                }
                for (k, child) in map {
                    string_schemas(child, format!("{at}/{k}"), out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    string_schemas(child, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn inline_rules_match_the_validation_constants() {
        let mut found = Vec::new();
        string_schemas(&document(), String::new(), &mut found);
        let ids: Vec<_> = found
            .iter()
            .filter(|(at, s)| s["pattern"] == NO_CONTROL_PATTERN && !at.ends_with("propertyNames"))
            .collect();
        // map-parent alone has six ids; the queries and the other bodies add more.
        assert!(ids.len() > 20, "only {} id schemas", ids.len());
        for (at, s) in ids {
            assert_eq!(s["minLength"], 1, "{at}");
            assert_eq!(s["maxLength"], MAX_ID_LEN, "{at}");
        }
        let names: Vec<_> = found
            .iter()
            .filter(|(_, s)| s["pattern"] == NAME_PATTERN)
            .collect();
        assert!(!names.is_empty());
        for (at, s) in names {
            assert_eq!(s["minLength"], 1, "{at}");
            assert_eq!(s["maxLength"], MAX_REALM_LEN, "{at}");
            assert_eq!(MAX_REALM_LEN, MAX_CONNECTOR_NAME_LEN);
        }
    }
}
