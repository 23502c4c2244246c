//! The receiver half of `bench-ssf`: pushed SETs per second that Lockstep's own SSF receiver
//! (`POST /realms/{realm}/ssf/push`) verifies and applies. Everything runs on 127.0.0.1 and
//! stops at the end:
//!
//! - a transmitter written here (metadata at `{issuer}/.well-known/ssf-configuration`, a
//!   client-credentials token, stream create, verification request, JWKS with the key
//!   `tests/fixtures/oidc/test-rsa-a`) that only sets the stream up; the harness itself is
//!   the one that pushes;
//! - the server, with that transmitter in `[[realms.bench.ssf_transmitters]]`, push delivery
//!   and a fixed `push_secret`.
//!
//! Untimed: the stream set-up and its verification SET, `sets` PARENT sessions mapped through
//! the API (each with its own `keycloakSessionId`), and `sets` SETs signed up front (RS256,
//! distinct `jti`, CAEP session-revoked with a complex subject naming one session each).
//! Timed: the ceiling (the same client and concurrency sending `GET /healthz` to the same
//! server), then every SET posted once with the same concurrency. A sample of the sessions
//! must be DESTROYED afterwards.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use testkit::Loopback;

use crate::bench_api::load::{Api, Outcome};
use crate::bench_api::server::Server;
use crate::bench_api::user_id;
use crate::harness::{self, lock, percentile_ms};

use super::{REALM, REQUEST_TIMEOUT, REVOKED, TOKEN, start_server};

/// The stream's Authorization is `Bearer <this>` (32+ printable characters).
const PUSH_SECRET: &str = "bench-ssf-push-secret-of-the-receiver-half";
/// The stream's audience, as the transmitter reports it.
const AUDIENCE: &str = "https://lockstep.bench/ssf-receiver";
/// Key id of `tests/fixtures/oidc/test-rsa-a.jwk.json`.
const KID: &str = "test-a";
const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
/// Longest wait for Lockstep to set its stream up.
const SETUP_WAIT: Duration = Duration::from_secs(15);
/// Sessions whose state is read back at the end.
const CHECKED: usize = 200;

/// What the transmitter was asked: its issuer (known once it listens), and the `state` of
/// the last verification request.
#[derive(Default)]
struct Tx {
    issuer: OnceLock<String>,
    keys: OnceLock<Value>,
    stream: Mutex<Option<Value>>,
    verify_state: Mutex<Option<String>>,
}

impl Tx {
    fn issuer(&self) -> String {
        self.issuer.get().cloned().unwrap_or_default()
    }
}

fn transmitter(tx: Arc<Tx>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route(
            "/tx/.well-known/ssf-configuration",
            get(|State(tx): State<Arc<Tx>>| async move {
                let i = tx.issuer();
                Json(json!({
                    "spec_version": "1_0",
                    "issuer": i,
                    "jwks_uri": format!("{i}/certs"),
                    "delivery_methods_supported": ["urn:ietf:rfc:8935"],
                    "configuration_endpoint": format!("{i}/streams"),
                    "status_endpoint": format!("{i}/streams/status"),
                    "verification_endpoint": format!("{i}/verify"),
                    "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
                }))
            }),
        )
        .route(
            "/tx/certs",
            get(|State(tx): State<Arc<Tx>>| async move {
                Json(json!({"keys": [tx.keys.get().cloned().unwrap_or(Value::Null)]}))
            }),
        )
        .route(
            "/tx/token",
            post(|| async {
                Json(
                    json!({"access_token": "bench-tx-token", "token_type": "Bearer",
                            "expires_in": 3600}),
                )
            }),
        )
        .route(
            "/tx/streams",
            get(|State(tx): State<Arc<Tx>>| async move {
                Json(json!(
                    lock(&tx.stream).clone().into_iter().collect::<Vec<_>>()
                ))
            })
            .post(
                |State(tx): State<Arc<Tx>>, Json(mut body): Json<Value>| async move {
                    body["stream_id"] = json!("bench-stream");
                    body["iss"] = json!(tx.issuer());
                    body["aud"] = json!(AUDIENCE);
                    *lock(&tx.stream) = Some(body.clone());
                    (StatusCode::CREATED, Json(body))
                },
            ),
        )
        .route(
            "/tx/streams/status",
            get(|| async { Json(json!({"stream_id": "bench-stream", "status": "enabled"})) }),
        )
        .route(
            "/tx/verify",
            post(
                |State(tx): State<Arc<Tx>>, Json(body): Json<Value>| async move {
                    *lock(&tx.verify_state) = body["state"].as_str().map(str::to_owned);
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(tx)
}

/// What the receiver half measured.
pub(super) struct Figures {
    pub(super) sets: usize,
    pub(super) concurrency: usize,
    pub(super) database: &'static str,
    /// SETs answered 202, and how long all the posts took.
    pub(super) accepted: usize,
    pub(super) elapsed: Duration,
    /// Latency of each post, sorted.
    pub(super) latencies: Vec<Duration>,
    /// GET /healthz per second, same client and concurrency, same server.
    pub(super) ceiling: f64,
    /// Sessions read back, and how many of them were DESTROYED.
    pub(super) checked: usize,
    pub(super) destroyed: usize,
    /// Refusals and failures (first few kept).
    pub(super) refused: usize,
    pub(super) errors: Vec<String>,
}

impl Figures {
    pub(super) fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(super) fn p(&self, q: f64) -> Option<f64> {
        percentile_ms(&self.latencies, q)
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs `n` jobs with `concurrency` workers; each worker returns what its jobs gave.
async fn spread<T, F, Fut>(n: usize, concurrency: usize, job: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, job) = (next.clone(), job.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break out;
                }
                out.push(job(i).await);
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.context("a worker panicked")?);
    }
    Ok(all)
}

fn sign(key: &EncodingKey, claims: &Value) -> Result<String> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KID.to_owned());
    header.typ = Some("secevent+jwt".into());
    jsonwebtoken::encode(&header, claims, key).context("signing a SET")
}

fn revoked_claims(issuer: &str, i: usize) -> Value {
    json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "iat": now_s(),
        "jti": format!("bench-set-{i}"),
        "sub_id": {"format": "complex",
                   "user": {"format": "iss_sub", "iss": issuer, "sub": user_id(i)},
                   "session": {"format": "opaque", "id": session_id(i)}},
        "events": {REVOKED: {}},
    })
}

fn session_id(i: usize) -> String {
    format!("kc-rx-{i}")
}

/// Signs the SETs on two blocking threads (signing is not what is measured).
async fn mint(key: &EncodingKey, issuer: &str, n: usize) -> Result<Vec<String>> {
    let half = n.div_ceil(2);
    let mut parts = Vec::new();
    for range in [0..half, half..n] {
        let (key, issuer) = (key.clone(), issuer.to_owned());
        parts.push(tokio::task::spawn_blocking(move || {
            range
                .map(|i| sign(&key, &revoked_claims(&issuer, i)))
                .collect::<Result<Vec<_>>>()
        }));
    }
    let mut sets = Vec::with_capacity(n);
    for p in parts {
        sets.extend(p.await.context("a signing thread panicked")??);
    }
    Ok(sets)
}

pub(super) async fn bench(
    bin: &Path,
    dir: &Path,
    database_url: Option<&str>,
    sets: usize,
    concurrency: usize,
    jwk: Value,
    key: &EncodingKey,
) -> Result<Figures> {
    let tx = Arc::new(Tx::default());
    let _ = tx.keys.set(jwk);
    let peer = Loopback::bind(transmitter(tx.clone()))
        .await
        .context("SSF transmitter")?;
    let issuer = format!("http://{}/tx", peer.addr);
    let _ = tx.issuer.set(issuer.clone());

    let config = dir.join("receiver.toml");
    std::fs::write(
        &config,
        format!(
            "public_url = \"http://127.0.0.1\"\n[realms.{REALM}]\n\
             [[realms.{REALM}.ssf_transmitters]]\nissuer = \"{issuer}\"\n\
             client_id = \"bench\"\nclient_secret = \"bench-secret\"\n\
             token_url = \"{issuer}/token\"\ndelivery = \"push\"\nsystem = \"ssf-bench\"\n\
             push_secret = \"{PUSH_SECRET}\"\n"
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let (db, database) = match database_url {
        Some(url) => (url.to_owned(), "PostgreSQL"),
        None => (
            format!("sqlite://{}", dir.join("receiver.db").display()),
            "SQLite",
        ),
    };
    let server = start_server(bin, &db, &config, &dir.join("receiver-server.log")).await?;
    let result = measure(&server, &tx, &issuer, sets, concurrency, key, database).await;
    server.stop().await?;
    drop(peer);
    result
}

async fn measure(
    server: &Server,
    tx: &Tx,
    issuer: &str,
    sets: usize,
    concurrency: usize,
    key: &EncodingKey,
    database: &'static str,
) -> Result<Figures> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let push_url = format!("http://{}/realms/{REALM}/ssf/push", server.addr);
    let push = move |http: &reqwest::Client, set: String| {
        http.post(&push_url)
            .header("authorization", format!("Bearer {PUSH_SECRET}"))
            .header("content-type", "application/secevent+jwt")
            .body(set)
            .send()
    };

    // The stream: Lockstep creates it at start and asks for its verification.
    let deadline = Instant::now() + SETUP_WAIT;
    let state = loop {
        if let Some(s) = lock(&tx.verify_state).clone() {
            break s;
        }
        if Instant::now() > deadline {
            bail!("Lockstep did not set up its stream within {SETUP_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let verification = sign(
        key,
        &json!({"iss": issuer, "aud": AUDIENCE, "iat": now_s(), "jti": "bench-verify",
                "events": {VERIFICATION: {"state": state}}}),
    )?;
    let res = push(&http, verification).await?;
    harness::expect_status(res, reqwest::StatusCode::ACCEPTED, "the verification SET").await?;

    // One PARENT per SET, mapped through the API.
    let api = Arc::new(Api::new(
        server.addr,
        REALM,
        TOKEN,
        concurrency,
        REQUEST_TIMEOUT,
    )?);
    let mapped = {
        let api = api.clone();
        spread(sets, concurrency, move |i| {
            let api = api.clone();
            async move {
                api.map_parent(&format!("rx-{i}"), &session_id(i), &user_id(i))
                    .await
            }
        })
        .await?
    };
    let mut errors: Vec<String> = mapped
        .into_iter()
        .filter_map(|o| match o {
            Outcome::Err(e) => Some(e),
            _ => None,
        })
        .collect();
    if !errors.is_empty() {
        bail!(
            "{} map-parent calls failed, first: {}",
            errors.len(),
            errors[0]
        );
    }
    let signed = Arc::new(mint(key, issuer, sets).await?);

    // The ceiling: the same client and concurrency, the cheapest endpoint of the server.
    let health = format!("http://{}/healthz", server.addr);
    let t0 = Instant::now();
    let answers = {
        let (http, health) = (http.clone(), health.clone());
        spread(sets, concurrency, move |_| {
            let (http, health) = (http.clone(), health.clone());
            async move {
                http.get(&health)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            }
        })
        .await?
    };
    let ceiling = answers.iter().filter(|ok| **ok).count() as f64 / t0.elapsed().as_secs_f64();

    let t0 = Instant::now();
    let outcomes = {
        let (http, signed) = (http.clone(), signed.clone());
        let push = Arc::new(push);
        spread(sets, concurrency, move |i| {
            let (http, signed, push) = (http.clone(), signed.clone(), push.clone());
            async move {
                let start = Instant::now();
                let res = push(&http, signed[i].clone()).await;
                let took = start.elapsed();
                match res {
                    Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => Ok(took),
                    Ok(r) => Err(format!(
                        "SET {i}: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Err(format!("SET {i}: {e}")),
                }
            }
        })
        .await?
    };
    let elapsed = t0.elapsed();
    let mut latencies = Vec::with_capacity(sets);
    let mut refused = 0;
    for o in outcomes {
        match o {
            Ok(d) => latencies.push(d),
            Err(e) => {
                refused += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
    }
    latencies.sort();

    // Each accepted SET ended its session: read a spread-out sample back.
    let step = (sets / CHECKED).max(1);
    let mut checked = 0;
    let mut destroyed = 0;
    for i in (0..sets).step_by(step).take(CHECKED) {
        checked += 1;
        let url = format!(
            "http://{}/admin/realms/{REALM}/external-sessions/rx-{i}",
            server.addr
        );
        let body: Value = http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        if body["status"] == "DESTROYED" {
            destroyed += 1;
        } else if errors.len() < 5 {
            errors.push(format!("rx-{i} is {} after its SET", body["status"]));
        }
    }
    Ok(Figures {
        sets,
        concurrency,
        database,
        accepted: latencies.len(),
        elapsed,
        latencies,
        ceiling,
        checked,
        destroyed,
        refused,
        errors,
    })
}
