//! Black-box harness: starts the real `lockstep` binary on 127.0.0.1:0 against a fresh
//! SQLite file or a fresh PostgreSQL database, and talks to it over HTTP. Starting and
//! stopping the process, the databases, receivers and manifests are `testkit`'s (shared with
//! the xtask load harnesses); this module sets them up the way every test wants them.
//! PostgreSQL comes from `LOCKSTEP_TEST_DATABASE_URL` (an admin URL; `scripts/test.sh` starts
//! a throwaway cluster and sets it). Without it the PostgreSQL tests fail, unless
//! `LOCKSTEP_SKIP_POSTGRES=1` says to skip them on purpose.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod components;
pub mod events;
pub mod keycloak;
pub mod receiver;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

pub const TOKEN: &str = "test-admin-token";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one test per backend for each named `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::common::skip_postgres() {
                        eprintln!("LOCKSTEP_SKIP_POSTGRES=1: skipping {}", stringify!($name));
                        return;
                    }
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// An axum app served on a loopback listener until this is dropped. Receivers, the local
/// IdP and fakes share it.
pub use testkit::Loopback;

/// Serves `app` on `listener` (bound by the caller, who may need its address first; a TLS
/// listener for an HTTPS peer).
pub fn serve<L>(listener: L, app: axum::Router) -> Loopback
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    Loopback::serve(listener, app).unwrap()
}

/// Base64url without padding (JWT segments).
pub fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn skip_postgres() -> bool {
    testkit::postgres::skipped()
}

fn postgres_admin_url() -> String {
    testkit::postgres::test_server().expect("PostgreSQL tests are skipped")
}

/// A fresh, empty database of the backend; returns its URL (and keeps a temp dir alive).
pub async fn fresh_database(backend: Backend) -> (String, Option<tempfile::TempDir>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}/lockstep.db", dir.path().display());
            (url, Some(dir))
        }
        Backend::Postgres => {
            let name = testkit::postgres::unique_name("lockstep_test_");
            let url = testkit::postgres::create_database(&postgres_admin_url(), &name)
                .await
                .unwrap();
            (url, None)
        }
    }
}

pub struct Server {
    process: testkit::Lockstep,
    pub base: String,
    pub database_url: String,
    pub backend: Backend,
    client: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
    _config: Option<tempfile::NamedTempFile>,
}

#[derive(Clone)]
pub struct ServerOptions {
    pub config: Option<String>,
    pub durability: &'static str,
    pub admin_token: Option<&'static str>,
    pub connectors_dir: Option<std::path::PathBuf>,
    /// Compile cache; the default is shared by every test (target/test-compile-cache).
    pub compile_cache: Option<std::path::PathBuf>,
    pub log: &'static str,
    /// Listen address (default `127.0.0.1:0`); a restart on the same address keeps what
    /// points at the server valid.
    pub listen: Option<String>,
    /// `--requests-per-second` (default 0: off, so tests that send quickly never meet the
    /// per-caller limit; `None` leaves the config file or the built-in default in charge).
    pub requests_per_second: Option<u32>,
    /// Extra environment of the server process (e.g. `OTEL_*`). The harness removes the
    /// OTLP endpoint variables first, so no server exports spans unless its test asks.
    pub env: Vec<(String, String)>,
    /// Extra arguments of `lockstep serve` (say, `--tls-ca-file`).
    pub args: Vec<String>,
}

impl ServerOptions {
    /// The defaults, with `config` as the config file.
    pub fn with_config(config: String) -> Self {
        ServerOptions {
            config: Some(config),
            ..ServerOptions::default()
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            config: None,
            durability: "normal",
            admin_token: Some(TOKEN),
            connectors_dir: None,
            compile_cache: None,
            log: "error",
            listen: None,
            requests_per_second: Some(0),
            env: Vec::new(),
            args: Vec::new(),
        }
    }
}

impl Server {
    pub async fn start(backend: Backend) -> Server {
        Self::start_with(backend, ServerOptions::default()).await
    }

    pub async fn start_with(backend: Backend, opts: ServerOptions) -> Server {
        let (database_url, dir) = fresh_database(backend).await;
        Self::start_on(backend, database_url, dir, opts).await
    }

    pub async fn start_on(
        backend: Backend,
        database_url: String,
        dir: Option<tempfile::TempDir>,
        opts: ServerOptions,
    ) -> Server {
        let config = opts.config.map(|text| {
            use std::io::Write;
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(text.as_bytes()).unwrap();
            f
        });
        let mut launch = testkit::Launch::new(env!("CARGO_BIN_EXE_lockstep"), &database_url);
        launch.durability = opts.durability.to_owned();
        if let Some(listen) = &opts.listen {
            launch.listen = listen.clone();
        }
        let compile_cache = opts
            .compile_cache
            .clone()
            .unwrap_or_else(|| components::workspace().join("target/test-compile-cache"));
        launch = launch.arg("--compile-cache").arg(compile_cache);
        if let Some(rps) = opts.requests_per_second {
            launch = launch.arg("--requests-per-second").arg(rps.to_string());
        }
        if let Some(f) = &config {
            launch = launch.arg("--config").arg(f.path());
        }
        if let Some(d) = &opts.connectors_dir {
            launch = launch.arg("--connectors-dir").arg(d);
        }
        launch.args.extend(opts.args.iter().map(Into::into));
        // Nothing of the caller's shell reaches a server: no token, config file or rate limit
        // but the test's, no OTLP export unless it asks, no CA it did not give.
        for var in [
            "LOCKSTEP_ADMIN_TOKEN",
            "LOCKSTEP_CONFIG",
            "LOCKSTEP_REQUESTS_PER_SECOND",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "LOCKSTEP_TLS_CA_FILE",
        ] {
            launch = launch.env_remove(var);
        }
        // LOCKSTEP_TEST_LOG (e.g. `lockstep=debug`) overrides every server's level when chasing a failure.
        launch = launch.env(
            "RUST_LOG",
            std::env::var("LOCKSTEP_TEST_LOG").unwrap_or_else(|_| opts.log.to_owned()),
        );
        if let Some(token) = opts.admin_token {
            launch = launch.env("LOCKSTEP_ADMIN_TOKEN", token);
        }
        for (k, v) in &opts.env {
            launch = launch.env(k, v);
        }
        let process = launch.start().await.expect("start lockstep");
        Server {
            base: process.base_url(),
            process,
            database_url,
            backend,
            client: reqwest::Client::new(),
            _dir: dir,
            _config: config,
        }
    }

    /// Process id (for memory readings).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Resident memory of the server process in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        testkit::procfs::rss_kib(self.pid().unwrap()).unwrap()
    }

    /// An admin client for operator endpoints (`/admin/deliveries`...).
    pub async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        send(
            self.client
                .get(format!("{}{path}", self.base))
                .bearer_auth(TOKEN),
        )
        .await
    }

    pub async fn admin_delete(&self, path: &str) -> (StatusCode, Value) {
        send(
            self.client
                .delete(format!("{}{path}", self.base))
                .bearer_auth(TOKEN),
        )
        .await
    }

    /// `PUT /admin/connectors/{name}` with a manifest and, optionally, a component.
    pub async fn put_connector(
        &self,
        name: &str,
        manifest: &str,
        component: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        let mut form = reqwest::multipart::Form::new().text("manifest", manifest.to_owned());
        if let Some(bytes) = component {
            form = form.part("component", reqwest::multipart::Part::bytes(bytes));
        }
        send(
            self.client
                .put(format!("{}/admin/connectors/{name}", self.base))
                .bearer_auth(TOKEN)
                .multipart(form),
        )
        .await
    }

    /// `POST /realms/{realm}/backchannel-logout` with a logout token: status, body and the
    /// `Cache-Control` header.
    pub async fn backchannel_logout(
        &self,
        realm: &str,
        token: &str,
    ) -> (StatusCode, Value, String) {
        let res = self
            .client
            .post(format!("{}/realms/{realm}/backchannel-logout", self.base))
            .form(&[("logout_token", token)])
            .send()
            .await
            .unwrap();
        let status = res.status();
        let cache = res
            .headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (status, res.json().await.unwrap_or(Value::Null), cache)
    }

    /// Posts `token` to `realm`'s back-channel logout and checks that it is accepted and ends
    /// exactly `ended` sessions (the body is shown when it does not); returns the response's
    /// Cache-Control for the tests that also check it.
    pub async fn assert_logout_ends(&self, realm: &str, token: &str, ended: u64) -> String {
        let (code, body, cache) = self.backchannel_logout(realm, token).await;
        assert_eq!(
            (code, body["ended"].as_u64()),
            (StatusCode::OK, Some(ended)),
            "{body}"
        );
        cache
    }

    /// Posts `token` to `realm`'s back-channel logout and checks that it is refused (400) with
    /// an `error_description` containing `reason`; returns that description, for further
    /// checks, and the response's Cache-Control.
    pub async fn assert_logout_refused(
        &self,
        realm: &str,
        token: &str,
        reason: &str,
    ) -> (String, String) {
        let (code, body, cache) = self.backchannel_logout(realm, token).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        let description = body["error_description"].as_str().unwrap_or("").to_owned();
        assert!(description.contains(reason), "{body}");
        (description, cache)
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        send(
            self.client
                .post(format!("{}{path}", self.base))
                .bearer_auth(TOKEN)
                .json(&body),
        )
        .await
    }

    /// Every delivery of `connector` (`GET /admin/deliveries`), following the cursor
    /// (bounded).
    pub async fn all_deliveries(&self, connector: &str) -> Vec<Value> {
        self.delivery_pages(&format!("connector={connector}"), 500)
            .await
    }

    /// Every delivery `GET /admin/deliveries?{query}` lists, `limit` a page, following the
    /// cursor (bounded).
    pub async fn delivery_pages(&self, query: &str, limit: u32) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        for _ in 0..100 {
            let (code, body) = self
                .admin_get(&format!("/admin/deliveries?{query}&limit={limit}{cursor}"))
                .await;
            assert_eq!(code, StatusCode::OK, "{body}");
            out.extend(body["items"].as_array().unwrap().iter().cloned());
            match body["nextCursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return out,
            }
        }
        panic!("too many pages of deliveries for {query}");
    }

    /// Polls (bounded) until `pred` holds for every delivery [`Self::delivery_pages`] lists;
    /// returns them.
    pub async fn wait_delivery_pages(
        &self,
        query: &str,
        limit: u32,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let all = self.delivery_pages(query, limit).await;
            if pred(&all) {
                return all;
            }
            let mut by_status: std::collections::BTreeMap<String, usize> = Default::default();
            for d in &all {
                *by_status.entry(d["status"].to_string()).or_default() += 1;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "deliveries of {query} never satisfied the condition: {} {by_status:?}",
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `/admin/deliveries` until `pred` holds for the filtered list (bounded).
    pub async fn wait_deliveries(
        &self,
        query: &str,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (code, body) = self
                .admin_get(&format!("/admin/deliveries?limit=500&{query}"))
                .await;
            assert_eq!(code, StatusCode::OK, "{body}");
            let items = body["items"].as_array().unwrap().clone();
            if pred(&items) {
                return items;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "deliveries never satisfied the condition: {items:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (the graceful shutdown an orchestrator asks for) and waits, bounded,
    /// for the process to exit; returns its exit status.
    pub async fn terminate(self, timeout: Duration) -> std::process::ExitStatus {
        self.process
            .terminate(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Server::terminate`], and returns the database so it can be read or reopened.
    pub async fn terminate_keeping(
        self,
        timeout: Duration,
    ) -> (std::process::ExitStatus, String, Option<tempfile::TempDir>) {
        let status = self
            .process
            .terminate(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (status, self.database_url, self._dir)
    }

    /// Stops the process (SIGKILL) and returns the database so it can be reopened.
    pub async fn kill(self) -> (String, Option<tempfile::TempDir>) {
        self.process.kill().await.ok();
        (self.database_url, self._dir)
    }

    pub fn sessions_url(&self, realm: &str) -> String {
        format!("{}/admin/realms/{realm}/external-sessions", self.base)
    }

    pub fn api(&self, realm: &str) -> Api {
        self.api_as(realm, TOKEN)
    }

    pub fn api_as(&self, realm: &str, token: &str) -> Api {
        Api {
            client: self.client.clone(),
            base: self.sessions_url(realm),
            token: Some(token.to_owned()),
        }
    }

    /// Outbox payloads for one session, read straight from the database.
    pub async fn outbox(&self, realm: &str, external_id: &str) -> Vec<Value> {
        use sqlx::Connection;
        let sql = "SELECT payload FROM outbox WHERE realm = $1 AND external_id = $2 ORDER BY id";
        let rows: Vec<String> = match self.backend {
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.database_url)
                    .await
                    .unwrap();
                sqlx::query_scalar(sql)
                    .bind(realm)
                    .bind(external_id)
                    .fetch_all(&mut c)
                    .await
                    .unwrap()
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .unwrap();
                sqlx::query_scalar(sql)
                    .bind(realm)
                    .bind(external_id)
                    .fetch_all(&mut c)
                    .await
                    .unwrap()
            }
        };
        rows.iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect()
    }

    /// Posts a Keycloak event signed the way `keycloak-extension/` signs it (Standard
    /// Webhooks, `webhook-id` = the event's `id`, timestamp = now).
    pub async fn post_event(
        &self,
        realm: &str,
        secret: &str,
        event: &Value,
    ) -> (StatusCode, Value) {
        let body = serde_json::to_vec(event).unwrap();
        let id = event["id"].as_str().unwrap().to_owned();
        let ts = chrono::Utc::now().timestamp().to_string();
        let signature = sign_event(secret, &id, &ts, &body);
        self.post_event_raw(
            realm,
            &[
                ("webhook-id", id.as_str()),
                ("webhook-timestamp", ts.as_str()),
                ("webhook-signature", signature.as_str()),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }

    /// Posts `body` to the event intake with exactly these headers.
    pub async fn post_event_raw(
        &self,
        realm: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .post(format!("{}/realms/{realm}/events", self.base))
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        send(req).await
    }

    /// Total outbox rows.
    pub async fn outbox_total(&self) -> i64 {
        count_rows(
            self.backend,
            &self.database_url,
            "SELECT COUNT(*) FROM outbox",
        )
        .await
    }

    /// Runs `sql` (one or more statements, no parameters) on the server's database, beside
    /// the server: to set up what the API cannot (old records, a failing trigger).
    pub async fn exec_sql(&self, sql: &str) {
        use sqlx::Connection;
        match self.backend {
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.database_url)
                    .await
                    .unwrap();
                sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .unwrap();
                sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
            }
        }
    }
}

/// The one number `sql` selects, read straight from a database (say, one whose server has
/// stopped: [`Server::terminate_keeping`]).
pub async fn count_rows(backend: Backend, database_url: &str, sql: &str) -> i64 {
    use sqlx::Connection;
    match backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(database_url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(database_url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
        }
    }
}

/// A client for one realm's external-sessions API.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    pub base: String,
    token: Option<String>,
}

impl Api {
    pub fn without_token(mut self) -> Api {
        self.token = None;
        self
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let req = self
            .client
            .post(format!("{}/{path}", self.base))
            .json(&body);
        send(self.auth(req)).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.post(format!("{}/{path}", self.base)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        send(self.auth(req)).await
    }

    pub async fn get(&self, path_and_query: &str) -> (StatusCode, Value) {
        let url = if path_and_query.is_empty() {
            self.base.clone()
        } else if path_and_query.starts_with('?') {
            format!("{}{path_and_query}", self.base)
        } else {
            format!("{}/{path_and_query}", self.base)
        };
        send(self.auth(self.client.get(url))).await
    }

    pub async fn map_parent(&self, id: &str, sid: &str) -> (StatusCode, Value) {
        self.post(
            "map-parent",
            json!({"externalId": id, "keycloakSessionId": sid}),
        )
        .await
    }

    pub async fn map_child(&self, id: &str, parent: &str) -> (StatusCode, Value) {
        self.post(
            "map-child",
            json!({"externalId": id, "parentExternalId": parent}),
        )
        .await
    }

    /// Without a reason or origin: callers that set one post the body themselves.
    pub async fn destroy_parent(&self, id: &str) -> (StatusCode, Value) {
        self.post("destroy-parent", json!({"externalId": id})).await
    }

    pub async fn status_of(&self, id: &str) -> String {
        let (code, body) = self.get(id).await;
        assert_eq!(code, StatusCode::OK, "GET {id}: {body}");
        body["status"].as_str().unwrap().to_owned()
    }

    /// Every session of the realm, following cursors.
    pub async fn list_all(&self, filter: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let q = match &cursor {
                Some(c) => format!("?limit=500&cursor={c}{filter}"),
                None => format!("?limit=500{filter}"),
            };
            let (code, body) = self.get(&q).await;
            assert_eq!(code, StatusCode::OK, "{body}");
            out.extend(body["items"].as_array().unwrap().iter().cloned());
            match body["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
        panic!("pagination did not end");
    }
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let res = req.send().await.expect("request failed");
    let status = res.status();
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = res.text().await.unwrap();
    if status.is_client_error() || status.is_server_error() {
        assert_eq!(
            content_type, "application/problem+json",
            "error responses are problem documents: {status} {text}"
        );
    }
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{ts}.{body}")>`; the key is the secret's bytes, or the
/// base64 after `whsec_`.
pub fn sign_event(secret: &str, id: &str, ts: &str, body: &[u8]) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use hmac::{Hmac, Mac};
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD.decode(b64).unwrap(),
        None => secret.as_bytes().to_vec(),
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Asserts a problem document with this status and code.
#[track_caller]
pub fn assert_problem(got: &(StatusCode, Value), status: u16, code: &str) {
    assert_eq!(got.0.as_u16(), status, "unexpected status: {}", got.1);
    assert_eq!(got.1["code"], code, "unexpected problem: {}", got.1);
    assert_eq!(got.1["status"], status);
    assert!(got.1["detail"].as_str().is_some_and(|d| !d.is_empty()));
}
