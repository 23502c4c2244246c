//! Property tests of the external-sessions input path, called as a library: the strict JSON
//! extractor (`api::extract::ApiJson`, `ApiQuery`) with the request DTOs (`api::dto`), then the
//! session service's rules (`sync::sessions` → `domain::rules`) on a real SQLite store in a
//! temp directory. Arbitrary bytes, media types, query strings and JSON values never panic and
//! are either parsed or refused as a 400/415 problem; valid requests round-trip through the
//! store and the response DTO unchanged; a request with one invalid id or attribute map is
//! refused with `SessionError::Invalid` (400 VALIDATION naming the field) and stores nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use chrono::{DateTime, TimeZone, Utc};
use lockstep::api::dto::{
    DestroyRequest, DestroyUserRequest, ListParams, MapChildRequest, MapFixedRequest,
    MapParentRequest, SessionDto,
};
use lockstep::api::error::ApiError;
use lockstep::api::extract::{ApiJson, ApiQuery};
use lockstep::domain::{MapCommand, NewSession, ProblemCode, SessionKind};
use lockstep::store::{Store, StoreOptions};
use lockstep::sync::sessions::{SessionError, SessionService};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

struct Fixture {
    rt: tokio::runtime::Runtime,
    sessions: SessionService,
    _dir: tempfile::TempDir,
}

/// One store for every case; each case maps into a realm of its own.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/lockstep.db", dir.path().display());
        let store = rt.block_on(async {
            let store = Store::connect(&StoreOptions::new(url)).await.unwrap();
            store.migrate().await.unwrap();
            store
        });
        Fixture {
            rt,
            sessions: SessionService::new(store, HashMap::new()),
            _dir: dir,
        }
    })
}

fn fresh_realm() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("prop-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// `cases` cases, none written to disk.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn request(content_type: Option<&str>, body: Vec<u8>) -> axum::extract::Request {
    let mut b = axum::http::Request::builder().method("POST").uri("/x");
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    b.body(axum::body::Body::from(body)).unwrap()
}

/// What the extractor makes of a body.
fn extract<T: DeserializeOwned>(content_type: Option<&str>, body: Vec<u8>) -> Result<T, ApiError> {
    let f = fixture();
    f.rt.block_on(ApiJson::<T>::from_request(request(content_type, body), &()))
        .map(|ApiJson(v)| v)
}

/// Parsed, or refused as a 400 VALIDATION problem: never anything else.
fn parsed_or_400<T: DeserializeOwned>(body: &[u8]) -> Result<Option<T>, TestCaseError> {
    match extract::<T>(Some("application/json"), body.to_vec()) {
        Ok(v) => Ok(Some(v)),
        Err(e @ ApiError::Validation(_)) => {
            prop_assert_eq!(
                e.status_and_code(),
                (StatusCode::BAD_REQUEST, ProblemCode::Validation)
            );
            Ok(None)
        }
        Err(other) => Err(TestCaseError::fail(format!("{other:?}"))),
    }
}

/// Arbitrary JSON (any shape, small).
fn json_value() -> impl Strategy<Value = Value> {
    json_with_keys("\\PC{0,8}")
}

/// Arbitrary JSON (any shape, small) whose object keys match the regex `keys`.
pub(crate) fn json_with_keys(keys: &'static str) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(keys, inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const MAP_PARENT_FIELDS: [&str; 8] = [
    "externalId",
    "keycloakSessionId",
    "keycloakClientSessionId",
    "userId",
    "system",
    "attributes",
    "expiresAt",
    "originSystem",
];

/// An object whose keys are mostly map-parent's own, with values of any type.
fn map_parent_shaped() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        8 => proptest::sample::select(MAP_PARENT_FIELDS.to_vec()).prop_map(str::to_owned),
        1 => "[a-zA-Z]{1,12}",
    ];
    let value = prop_oneof![
        3 => "\\PC{0,20}".prop_map(Value::from),
        1 => json_value(),
    ];
    proptest::collection::btree_map(key, value, 0..9)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// A valid id: 1–255 characters, no control characters (any other Unicode).
fn valid_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._:@/-]{1,40}",
        "[^\\p{Cc}]{1,60}",
        (1usize..=255).prop_map(|n| "é".repeat(n)),
    ]
}

/// Attributes within every limit (at most 64 entries, keys 1–128 characters, 8 KiB).
fn valid_attributes() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map("[^\\p{Cc}]{1,20}", "\\PC{0,60}", 0..20)
}

/// One way to make an id invalid.
fn invalid_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (256usize..300).prop_map(|n| "x".repeat(n)),
        (
            "\\PC{0,10}",
            prop_oneof![
                proptest::char::range('\u{0}', '\u{1f}'),
                proptest::char::range('\u{7f}', '\u{9f}')
            ],
            "\\PC{0,10}"
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
    ]
}

/// One way to make an attribute map invalid.
fn invalid_attributes() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        // 65 entries.
        Just((0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect()),
        // An empty key, a key over 128 characters, a key with a control character.
        Just(BTreeMap::from([(String::new(), "v".to_owned())])),
        (129usize..200).prop_map(|n| BTreeMap::from([("k".repeat(n), String::new())])),
        Just(BTreeMap::from([("a\u{7}b".to_owned(), "v".to_owned())])),
        // Over 8 KiB of keys and values.
        (8 * 1024usize..9000).prop_map(|n| BTreeMap::from([("k".to_owned(), "v".repeat(n))])),
    ]
}

/// Expiry at millisecond precision (what the store keeps), 1970–2100.
fn expiry() -> impl Strategy<Value = Option<DateTime<Utc>>> {
    proptest::option::of(
        (0i64..4_102_444_800_000).prop_map(|ms| Utc.timestamp_millis_opt(ms).single().unwrap()),
    )
}

/// A valid map-parent body.
#[derive(Clone, Debug)]
struct ValidParent {
    external_id: String,
    keycloak_session_id: String,
    keycloak_client_session_id: Option<String>,
    user_id: Option<String>,
    system: Option<String>,
    attributes: BTreeMap<String, String>,
    expires_at: Option<DateTime<Utc>>,
    origin_system: Option<String>,
}

fn valid_parent() -> impl Strategy<Value = ValidParent> {
    (
        valid_id(),
        valid_id(),
        proptest::option::of(valid_id()),
        proptest::option::of(valid_id()),
        proptest::option::of(valid_id()),
        valid_attributes(),
        expiry(),
        proptest::option::of(valid_id()),
    )
        .prop_map(|(a, b, c, d, e, attributes, expires_at, f)| ValidParent {
            external_id: a,
            keycloak_session_id: b,
            keycloak_client_session_id: c,
            user_id: d,
            system: e,
            attributes,
            expires_at,
            origin_system: f,
        })
}

impl ValidParent {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "externalId": self.external_id,
            "keycloakSessionId": self.keycloak_session_id,
            "attributes": self.attributes,
        });
        for (name, value) in [
            ("keycloakClientSessionId", &self.keycloak_client_session_id),
            ("userId", &self.user_id),
            ("system", &self.system),
            ("originSystem", &self.origin_system),
        ] {
            if let Some(value) = value {
                v[name] = json!(value);
            }
        }
        if let Some(at) = self.expires_at {
            v["expiresAt"] = json!(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        }
        v
    }
}

/// What the map-parent handler does with a parsed body (the caller is called `api`).
fn map_parent(
    realm: &str,
    req: MapParentRequest,
) -> Result<lockstep::domain::Session, SessionError> {
    let f = fixture();
    let session = NewSession {
        realm: realm.to_owned(),
        external_id: req.external_id,
        kind: SessionKind::Parent,
        parent_id: None,
        idp_session_id: Some(req.keycloak_session_id),
        idp_client_session_id: req.keycloak_client_session_id,
        user_id: req.user_id,
        system: req.system.or_else(|| Some("api".into())),
        delegated_by: None,
        attributes: req.attributes,
        expires_at: req.expires_at,
    };
    f.rt.block_on(f.sessions.map(MapCommand {
        session,
        origin_system: req.origin_system.or_else(|| Some("api".into())),
        inherit_from: None,
        audit: None,
    }))
}

/// Which field of a valid body to break, and how.
#[derive(Clone, Debug)]
enum Invalid {
    Id(&'static str, String),
    Attributes(BTreeMap<String, String>),
}

fn invalid_field() -> impl Strategy<Value = Invalid> {
    let field = proptest::sample::select(vec![
        "externalId",
        "keycloakSessionId",
        "keycloakClientSessionId",
        "userId",
        "system",
        "originSystem",
    ]);
    prop_oneof![
        3 => (field, invalid_id()).prop_map(|(f, v)| Invalid::Id(f, v)),
        1 => invalid_attributes().prop_map(Invalid::Attributes),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_are_parsed_or_refused_as_400(
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            "\\PC{0,200}".prop_map(String::into_bytes),
            map_parent_shaped().prop_map(|v| v.to_string().into_bytes()),
        ],
    ) {
        parsed_or_400::<MapParentRequest>(&body)?;
        parsed_or_400::<MapChildRequest>(&body)?;
        parsed_or_400::<MapFixedRequest>(&body)?;
        parsed_or_400::<DestroyRequest>(&body)?;
        parsed_or_400::<DestroyUserRequest>(&body)?;
    }

    #[test]
    fn arbitrary_json_parses_only_with_known_fields_of_the_right_types(
        value in prop_oneof![map_parent_shaped(), json_value()],
    ) {
        let parsed = parsed_or_400::<MapParentRequest>(value.to_string().as_bytes())?;
        if let Some(req) = parsed {
            // Unknown fields are refused, the two required ones are strings.
            let object = value.as_object().unwrap();
            prop_assert!(object.keys().all(|k| MAP_PARENT_FIELDS.contains(&k.as_str())));
            prop_assert_eq!(object["externalId"].as_str(), Some(req.external_id.as_str()));
            prop_assert_eq!(
                object["keycloakSessionId"].as_str(),
                Some(req.keycloak_session_id.as_str())
            );
        }
    }

    #[test]
    fn a_body_that_is_not_json_by_media_type_is_415(
        content_type in proptest::option::of(prop_oneof![
            "[a-z]{1,10}/[a-z+.-]{1,15}",
            "\\PC{0,30}",
            Just("text/plain".to_owned()),
            Just("application/x-www-form-urlencoded".to_owned()),
        ]),
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let is_json = content_type.as_deref().is_some_and(|ct| {
            let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
        prop_assume!(!is_json);
        // A header value that is not visible ASCII cannot be sent at all.
        prop_assume!(content_type.as_deref().is_none_or(|ct| ct.bytes().all(|b| (0x20..0x7f).contains(&b))));
        let got = extract::<MapParentRequest>(content_type.as_deref(), body);
        let is_415 = matches!(&got, Err(e) if e.status_and_code() == (StatusCode::UNSUPPORTED_MEDIA_TYPE, ProblemCode::Validation));
        prop_assert!(is_415, "{:?}", got.err());
    }

    #[test]
    fn arbitrary_query_strings_are_parsed_or_refused_as_400(
        query in prop_oneof![
            "[ -~]{0,120}",
            proptest::collection::vec(
                (
                    proptest::sample::select(vec!["keycloakSessionId", "userId", "status", "system", "cursor", "limit", "x"]),
                    "[ -~]{0,20}",
                ),
                0..5,
            )
            .prop_map(|pairs| pairs.into_iter().map(|(k, v)| format!("{k}={}", urlencode(&v))).collect::<Vec<_>>().join("&")),
        ],
    ) {
        let Ok(uri) = format!("/x?{query}").parse::<axum::http::Uri>() else {
            return Ok(());
        };
        let (mut parts, ()) = axum::http::Request::builder().uri(uri).body(()).unwrap().into_parts();
        let f = fixture();
        match f.rt.block_on(ApiQuery::<ListParams>::from_request_parts(&mut parts, &())) {
            Ok(_) => {}
            Err(e @ ApiError::Validation(_)) => prop_assert_eq!(e.status_and_code().0, StatusCode::BAD_REQUEST),
            Err(other) => prop_assert!(false, "{:?}", other),
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

proptest! {
    // Each case is a write to SQLite.
    #![proptest_config(config(64))]

    #[test]
    fn a_valid_map_parent_round_trips_through_the_store_and_the_dto(p in valid_parent()) {
        let body = p.to_json().to_string().into_bytes();
        let req = parsed_or_400::<MapParentRequest>(&body)?.expect("a valid body parses");
        let realm = fresh_realm();
        let stored = map_parent(&realm, req);
        prop_assert!(stored.is_ok(), "{:?}", stored.err());
        let dto = SessionDto::from(stored.unwrap());
        prop_assert_eq!(&dto.external_id, &p.external_id);
        prop_assert_eq!(&dto.realm, &realm);
        prop_assert_eq!(dto.keycloak_session_id.as_ref(), Some(&p.keycloak_session_id));
        prop_assert_eq!(&dto.keycloak_client_session_id, &p.keycloak_client_session_id);
        prop_assert_eq!(&dto.user_id, &p.user_id);
        prop_assert_eq!(dto.system.as_deref(), Some(p.system.as_deref().unwrap_or("api")));
        prop_assert_eq!(&dto.attributes, &p.attributes);
        prop_assert_eq!(dto.expires_at, p.expires_at);
        // The response document reads back as the same session.
        let text = serde_json::to_string(&dto).unwrap();
        let back: SessionDto = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &dto);
        // And the store returns it as it was answered.
        let f = fixture();
        let read = f.rt.block_on(f.sessions.get(&realm, &p.external_id)).unwrap().map(SessionDto::from);
        prop_assert_eq!(read.as_ref(), Some(&dto));
    }

    #[test]
    fn one_invalid_id_or_attribute_map_is_refused_with_a_typed_error(
        p in valid_parent(),
        broken in invalid_field(),
    ) {
        let mut body = p.to_json();
        match &broken {
            Invalid::Id(field, value) => body[*field] = json!(value),
            Invalid::Attributes(attrs) => body["attributes"] = json!(attrs),
        }
        // Well-formed JSON of the right shape: the extractor takes it, the rules refuse it.
        let req = parsed_or_400::<MapParentRequest>(body.to_string().as_bytes())?
            .expect("the shape is valid");
        let realm = fresh_realm();
        match map_parent(&realm, req) {
            Err(SessionError::Invalid(e)) => {
                if let Invalid::Id(field, _) = &broken {
                    prop_assert!(e.0.starts_with(field), "{} does not name {}", e.0, field);
                }
                let api = ApiError::from(SessionError::Invalid(e));
                prop_assert_eq!(api.status_and_code(), (StatusCode::BAD_REQUEST, ProblemCode::Validation));
            }
            other => prop_assert!(false, "{:?} was not refused: {:?}", broken, other.map(|s| s.external_id)),
        }
        // Nothing was stored.
        let f = fixture();
        let count = f.rt.block_on(f.sessions.query(&realm, Default::default())).unwrap().items.len();
        prop_assert_eq!(count, 0);
    }
}
