//! Property tests of the back-channel logout-token verifier (`oidc::Verifier::verify_logout`,
//! called as a library) against a local identity provider: discovery and a JWKS served on
//! 127.0.0.1 with the key `tests/fixtures/oidc/test-rsa-a`. Arbitrary strings and JWT-shaped
//! inputs never panic and are never accepted; a token signed properly is accepted, and the
//! same token with any one claim broken (iss, aud, iat, exp, events, sid/sub, jti, a nonce
//! present, the key or the algorithm) is refused. `backchannel.rs` checks the same rules
//! one example at a time through the HTTP endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::proptest_api::{config, json_with_keys};

use std::sync::OnceLock;

use axum::Json;
use axum::routing::get;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lockstep::oidc::{BACKCHANNEL_LOGOUT_EVENT, RealmIdp, Verifier};
use proptest::prelude::*;
use serde_json::{Value, json};

const REALM: &str = "acme";
const AUDIENCE: &str = "lockstep";
const SKEW_S: u64 = 30;

struct Fixture {
    rt: tokio::runtime::Runtime,
    verifier: Verifier,
    issuer: String,
    published: EncodingKey,
    unpublished: EncodingKey,
}

fn oidc_fixture(name: &str) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/oidc");
    std::fs::read_to_string(format!("{dir}/{name}")).unwrap()
}

/// One IdP and one verifier for every case of every test in this file (the verifier caches
/// the keys as it does in the server).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let issuer = format!("http://{}/realms/{REALM}", listener.local_addr().unwrap());
        let jwk: Value = serde_json::from_str(&oidc_fixture("test-rsa-a.jwk.json")).unwrap();
        let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/certs")});
        let app = axum::Router::new()
            .route(
                "/realms/acme/.well-known/openid-configuration",
                get(move || {
                    let d = discovery.clone();
                    async move { Json(d) }
                }),
            )
            .route(
                "/realms/acme/certs",
                get(move || {
                    let keys = json!({ "keys": [jwk.clone()] });
                    async move { Json(keys) }
                }),
            );
        rt.spawn(async move { axum::serve(listener, app).await.ok() });
        let verifier = Verifier::new(
            vec![RealmIdp {
                realm: REALM.into(),
                issuer: issuer.clone(),
                audiences: vec![AUDIENCE.into()],
                algs: vec![Algorithm::RS256],
                skew_s: SKEW_S,
                permission_role: "users:manage".into(),
                idp_system: "keycloak".into(),
            }],
            &Default::default(),
        )
        .unwrap();
        let key = |name: &str| EncodingKey::from_rsa_pem(oidc_fixture(name).as_bytes()).unwrap();
        Fixture {
            rt,
            verifier,
            issuer,
            published: key("test-rsa-a.pem"),
            unpublished: key("test-rsa-b.pem"),
        }
    })
}

fn verify(token: &str) -> Result<lockstep::oidc::LogoutToken, lockstep::oidc::OidcError> {
    let f = fixture();
    f.rt.block_on(f.verifier.verify_logout(REALM, token))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Arbitrary JSON (any shape, small), with claim-like object keys.
fn json_value() -> impl Strategy<Value = Value> {
    json_with_keys("[a-z]{1,6}")
}

/// A valid id (what `sid`, `sub` and `jti` must be).
fn valid_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-][A-Za-z0-9 ._:é-]{0,40}"
}

/// The claims of a logout token the verifier must accept.
fn good_claims(sid: Option<&str>, sub: Option<&str>, jti: &str) -> Value {
    let f = fixture();
    let mut c = json!({
        "iss": f.issuer,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 120,
        "jti": jti,
        "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
    });
    if let Some(sid) = sid {
        c["sid"] = json!(sid);
    }
    if let Some(sub) = sub {
        c["sub"] = json!(sub);
    }
    c
}

fn sign_with(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    header.typ = Some("logout+jwt".into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn sign(claims: &Value) -> String {
    sign_with(
        &fixture().published,
        Algorithm::RS256,
        Some("test-a"),
        claims,
    )
}

/// One way to break an otherwise good token.
#[derive(Clone, Debug)]
enum Break {
    /// Another issuer (or none).
    Iss(Option<Value>),
    /// An audience without ours (or none).
    Aud(Option<Value>),
    /// Issued in the future beyond the skew, older than the replay window, not a number, or
    /// missing.
    Iat(Option<Value>),
    /// Expired beyond the skew.
    ExpiredSecondsAgo(i64),
    /// `events` missing, without the logout event, or with it not an object.
    Events(Option<Value>),
    /// Neither `sid` nor `sub` (or only empty ones).
    NoSubject { empty: bool },
    /// A `sid` or `sub` that is not a valid id (control characters, over 255 characters).
    BadSubject { field: &'static str, value: String },
    /// `jti` missing, empty or not a valid id.
    Jti(Option<Value>),
    /// A `nonce`, whatever its value (`null` included).
    Nonce(Value),
    /// Signed with a key the IdP never published (under the published key's id).
    UnpublishedKey,
    /// Signed with an algorithm the realm does not allow.
    Alg(Algorithm),
}

fn a_break() -> impl Strategy<Value = Break> {
    let not_issuer = prop_oneof![
        Just(None),
        "\\PC{0,40}".prop_map(|s| Some(Value::from(s))),
        Just(Some(Value::from("http://127.0.0.1:1/realms/acme"))),
        json_value()
            .prop_filter("not a string", |v| !v.is_string())
            .prop_map(Some),
    ];
    let not_audience = prop_oneof![
        Just(None),
        "[a-z]{0,12}"
            .prop_filter("not ours", |s| s != AUDIENCE)
            .prop_map(|s| Some(Value::from(s))),
        proptest::collection::vec("[a-z]{1,8}", 0..3)
            .prop_filter("without ours", |v| !v.iter().any(|a| a == AUDIENCE))
            .prop_map(|v| Some(Value::from(v))),
        any::<i64>().prop_map(|n| Some(Value::from(n))),
    ];
    let skew = SKEW_S as i64;
    let window = lockstep::oidc::REPLAY_WINDOW_S;
    let bad_iat = prop_oneof![
        Just(None),
        (skew + 1..1_000_000_000i64).prop_map(move |d| Some(Value::from(now() + d))),
        (window + skew + 1..1_000_000_000i64).prop_map(move |d| Some(Value::from(now() - d))),
        "\\PC{0,10}".prop_map(|s| Some(Value::from(s))),
    ];
    let bad_events = prop_oneof![
        Just(None),
        Just(Some(json!({}))),
        "[a-z:/.]{1,30}".prop_map(|k| Some(json!({ k: {} }))),
        json_value()
            .prop_filter("not an object", |v| !v.is_object())
            .prop_map(|v| Some(json!({ BACKCHANNEL_LOGOUT_EVENT: v }))),
        json_value()
            .prop_filter("not an object", |v| !v.is_object())
            .prop_map(Some),
    ];
    let bad_subject = prop_oneof![
        (
            "\\PC{0,10}",
            proptest::char::range('\u{0}', '\u{1f}'),
            "\\PC{0,10}"
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
        (256usize..400).prop_map(|n| "s".repeat(n)),
    ];
    let bad_jti = prop_oneof![
        Just(None),
        Just(Some(Value::from(""))),
        bad_subject.clone().prop_map(|s| Some(Value::from(s))),
    ];
    prop_oneof![
        not_issuer.prop_map(Break::Iss),
        not_audience.prop_map(Break::Aud),
        bad_iat.prop_map(Break::Iat),
        (skew + 1..1_000_000_000i64).prop_map(Break::ExpiredSecondsAgo),
        bad_events.prop_map(Break::Events),
        any::<bool>().prop_map(|empty| Break::NoSubject { empty }),
        (prop_oneof![Just("sid"), Just("sub")], bad_subject)
            .prop_map(|(field, value)| Break::BadSubject { field, value }),
        bad_jti.prop_map(Break::Jti),
        // `null` on its own too: it is a nonce member all the same (an `Option` once read it
        // as absent, and such a token was accepted).
        prop_oneof![Just(Value::Null), json_value()].prop_map(Break::Nonce),
        Just(Break::UnpublishedKey),
        prop_oneof![
            Just(Algorithm::RS384),
            Just(Algorithm::RS512),
            Just(Algorithm::PS256)
        ]
        .prop_map(Break::Alg),
    ]
}

fn set(claims: &mut Value, name: &str, value: Option<Value>) {
    let map = claims.as_object_mut().unwrap();
    match value {
        Some(v) => {
            map.insert(name.to_owned(), v);
        }
        None => {
            map.remove(name);
        }
    }
}

/// A good token with `b` applied.
fn broken_token(b: &Break, sid: &str, sub: &str, jti: &str) -> String {
    let f = fixture();
    let mut claims = good_claims(Some(sid), Some(sub), jti);
    match b.clone() {
        Break::Iss(v) => set(&mut claims, "iss", v),
        Break::Aud(v) => set(&mut claims, "aud", v),
        Break::Iat(v) => set(&mut claims, "iat", v),
        Break::ExpiredSecondsAgo(d) => set(&mut claims, "exp", Some(Value::from(now() - d))),
        Break::Events(v) => set(&mut claims, "events", v),
        Break::NoSubject { empty } => {
            let v = empty.then(|| Value::from(""));
            set(&mut claims, "sid", v.clone());
            set(&mut claims, "sub", v);
        }
        Break::BadSubject { field, value } => set(&mut claims, field, Some(Value::from(value))),
        Break::Jti(v) => set(&mut claims, "jti", v),
        Break::Nonce(v) => set(&mut claims, "nonce", Some(v)),
        Break::UnpublishedKey => {
            return sign_with(&f.unpublished, Algorithm::RS256, Some("test-a"), &claims);
        }
        Break::Alg(alg) => return sign_with(&f.published, alg, Some("test-a"), &claims),
    }
    sign(&claims)
}

#[test]
fn a_null_nonce_is_a_nonce() {
    let token = broken_token(
        &Break::Nonce(Value::Null),
        "sid-1",
        "sub-1",
        "jti-null-nonce",
    );
    assert!(verify(&token).is_err());
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn a_properly_signed_token_is_accepted(
        sid in proptest::option::of(valid_id()),
        sub in valid_id(),
        jti in valid_id(),
        sub_only in any::<bool>(),
    ) {
        // The baseline the broken tokens differ from by one claim.
        let sid = if sub_only { None } else { sid };
        let token = sign(&good_claims(sid.as_deref(), Some(&sub), &jti));
        let verified = verify(&token);
        prop_assert!(verified.is_ok(), "{:?}", verified);
        let verified = verified.unwrap();
        prop_assert_eq!(verified.sid, sid);
        prop_assert_eq!(verified.sub, Some(sub));
        prop_assert_eq!(verified.jti, jti);
    }

    #[test]
    fn a_signed_token_with_one_claim_broken_is_refused(
        b in a_break(),
        sid in valid_id(),
        sub in valid_id(),
        jti in valid_id(),
    ) {
        let token = broken_token(&b, &sid, &sub, &jti);
        let verified = verify(&token);
        prop_assert!(verified.is_err(), "{:?} was accepted: {:?}", b, verified);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_text_is_refused(token in prop_oneof![
        "\\PC{0,200}",
        any::<String>(),
        "[A-Za-z0-9_.-]{0,300}",
    ]) {
        prop_assert!(verify(&token).is_err());
    }

    #[test]
    fn jwt_shaped_input_is_refused(
        alg in prop_oneof![
            Just(Value::from("RS256")),
            Just(Value::from("none")),
            Just(Value::from("HS256")),
            Just(Value::from("ES256")),
            json_value(),
        ],
        kid in prop_oneof![
            Just(Some(Value::from("test-a"))),
            Just(Some(Value::from("test-b"))),
            Just(None),
            json_value().prop_map(Some),
        ],
        extra_header in json_value(),
        claims in prop_oneof![
            json_value(),
            (valid_id(), valid_id()).prop_map(|(sub, jti)| good_claims(None, Some(&sub), &jti)),
        ],
        signature in proptest::collection::vec(any::<u8>(), 0..300),
        raw_segments in proptest::option::of(proptest::collection::vec("[A-Za-z0-9_=+/-]{0,40}", 0..6)),
    ) {
        // Either three base64url segments (a header with an alg and a kid, claims that may
        // even be good ones, a signature nobody made), or dot-joined junk.
        let token = match raw_segments {
            Some(parts) => parts.join("."),
            None => {
                let mut header = json!({ "typ": "logout+jwt", "alg": alg, "x": extra_header });
                if let Some(kid) = kid {
                    header["kid"] = kid;
                }
                format!(
                    "{}.{}.{}",
                    b64(header.to_string().as_bytes()),
                    b64(claims.to_string().as_bytes()),
                    b64(&signature)
                )
            }
        };
        prop_assert!(verify(&token).is_err(), "accepted: {}", token);
    }
}
