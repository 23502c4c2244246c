//! A small legacy IAM system: a session table behind a REST API with its own auth (HTTP
//! Basic), the peer the example connectors of every language talk to in the end-to-end
//! tests and in the connector walk-through (docs/connectors.md).
//!
//! Routes (all need `Authorization: Basic` with the configured user and password, else 401):
//! - `POST /api/v1/sessions` `{"sessionId", "userId"?, "realm"?, "idpSessionId"?}` → 201 with
//!   the stored session; 409 when the id exists; 400 on a bad body.
//! - `DELETE /api/v1/sessions/{sessionId}` → 204; 404 when unknown.
//! - `DELETE /api/v1/users/{userId}/sessions` → 200 `{"deleted": n}`.
//! - `GET /api/v1/sessions` → 200, every session (oldest first).
//!
//! Faults for tests: [`Sim::fail_next`] makes the next N session calls answer 503.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Default Basic-auth user.
pub const DEFAULT_USER: &str = "lockstep";
/// Default Basic-auth password.
pub const DEFAULT_PASSWORD: &str = "legacy-secret";

/// One legacy session.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LegacySession {
    /// The id the legacy system knows the session by (Lockstep's `externalId`).
    pub session_id: String,
    /// The user, if given.
    pub user_id: Option<String>,
    /// The realm, if given.
    pub realm: Option<String>,
    /// The identity provider's session, if given.
    pub idp_session_id: Option<String>,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSession {
    session_id: String,
    user_id: Option<String>,
    realm: Option<String>,
    idp_session_id: Option<String>,
}

#[derive(Default)]
struct Table {
    /// Insertion order number → session, plus an id index.
    order: u64,
    sessions: BTreeMap<String, (u64, LegacySession)>,
    fail_next: u32,
    /// Every authenticated call, as `METHOD path`, for assertions.
    calls: Vec<String>,
}

/// A running simulator's shared state.
#[derive(Clone)]
pub struct Sim {
    table: Arc<Mutex<Table>>,
    authorization: Arc<str>,
}

impl Sim {
    /// A simulator accepting `user`/`password`.
    pub fn new(user: &str, password: &str) -> Self {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Sim {
            table: Arc::default(),
            authorization: format!("Basic {token}").into(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every session, oldest first.
    pub fn sessions(&self) -> Vec<LegacySession> {
        let t = self.table();
        let mut all: Vec<_> = t.sessions.values().cloned().collect();
        all.sort_by_key(|(n, _)| *n);
        all.into_iter().map(|(_, s)| s).collect()
    }

    /// Whether a session with this id exists.
    pub fn has(&self, session_id: &str) -> bool {
        self.table().sessions.contains_key(session_id)
    }

    /// Makes the next `n` session calls answer 503 (a legacy system in maintenance).
    pub fn fail_next(&self, n: u32) {
        self.table().fail_next = n;
    }

    /// Every authenticated call so far, as `METHOD /path`.
    pub fn calls(&self) -> Vec<String> {
        self.table().calls.clone()
    }

    /// The routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/v1/sessions", get(list).post(create))
            .route("/api/v1/sessions/{session_id}", delete(remove))
            .route("/api/v1/users/{user_id}/sessions", delete(remove_user))
            .layer(middleware::from_fn_with_state(self.clone(), guard))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `stop` resolves.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(stop)
            .await
    }
}

/// A simulator serving on 127.0.0.1 (an ephemeral port) until dropped.
pub struct Running {
    /// Its state.
    pub sim: Sim,
    /// Where it listens.
    pub addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Running {
    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts a simulator with the default credentials on 127.0.0.1:0 (inside a Tokio runtime).
pub async fn start() -> std::io::Result<Running> {
    let sim = Sim::new(DEFAULT_USER, DEFAULT_PASSWORD);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = sim.clone();
    tokio::spawn(async move {
        let _ = serving
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok(Running {
        sim,
        addr,
        _stop: stop,
    })
}

fn problem(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

async fn guard(
    State(sim): State<Sim>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if given != &*sim.authorization {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"legacy\"")],
            axum::Json(json!({ "error": "unauthorized" })),
        )
            .into_response();
    }
    {
        let mut t = sim.table();
        t.calls
            .push(format!("{} {}", request.method(), request.uri().path()));
        if t.fail_next > 0 {
            t.fail_next -= 1;
            return problem(StatusCode::SERVICE_UNAVAILABLE, "maintenance");
        }
    }
    next.run(request).await
}

async fn list(State(sim): State<Sim>) -> Response {
    axum::Json(sim.sessions()).into_response()
}

async fn create(State(sim): State<Sim>, body: axum::body::Bytes) -> Response {
    let new: NewSession = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &format!("bad body: {e}")),
    };
    if new.session_id.is_empty() {
        return problem(StatusCode::BAD_REQUEST, "sessionId is empty");
    }
    let mut t = sim.table();
    if t.sessions.contains_key(&new.session_id) {
        return problem(StatusCode::CONFLICT, "exists");
    }
    t.order += 1;
    let session = LegacySession {
        session_id: new.session_id.clone(),
        user_id: new.user_id,
        realm: new.realm,
        idp_session_id: new.idp_session_id,
        created_at: chrono::Utc::now().to_rfc3339(),
    };
    let n = t.order;
    t.sessions.insert(new.session_id, (n, session.clone()));
    (StatusCode::CREATED, axum::Json(session)).into_response()
}

async fn remove(State(sim): State<Sim>, Path(session_id): Path<String>) -> Response {
    match sim.table().sessions.remove(&session_id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => problem(StatusCode::NOT_FOUND, "no such session"),
    }
}

async fn remove_user(State(sim): State<Sim>, Path(user_id): Path<String>) -> Response {
    let mut t = sim.table();
    let before = t.sessions.len();
    t.sessions
        .retain(|_, (_, s)| s.user_id.as_deref() != Some(user_id.as_str()));
    let deleted = before - t.sessions.len();
    axum::Json(json!({ "deleted": deleted })).into_response()
}
