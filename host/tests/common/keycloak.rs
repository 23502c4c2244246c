//! A real Keycloak for the tests: the one `cargo xtask keycloak start` runs on
//! 127.0.0.1:18180 with the realm of `tests/keycloak/acme-realm.json` (`scripts/test.sh`
//! starts it and sets `LOCKSTEP_TEST_KEYCLOAK_URL`), and on 127.0.0.1:18443 over HTTPS with
//! a certificate of the xtask's test CA ([`keycloak_https`]; every helper's client trusts it). Helpers drive it like a browser and an
//! administrator would: a headless authorization-code login, client-credentials tokens, and
//! the Admin REST API (sessions, client attributes, signing keys).
//!
//! Every request has a timeout and no helper loops, so a stuck Keycloak fails a test instead
//! of hanging it. Tokens are decoded here without verification; verifying them is the
//! product's job.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Response, StatusCode, Url};
use serde_json::{Value, json};

/// The realm imported from `tests/keycloak/acme-realm.json`.
pub const REALM: &str = "acme";
pub const ALICE: &str = "alice";
pub const ALICE_PASSWORD: &str = "alice-password";
/// Confidential client with the `realm-management` roles `manage-users` and `view-users`;
/// defines the client role `users:manage`.
pub const LOCKSTEP_CLIENT: (&str, &str) = ("lockstep", "lockstep-secret");
/// Relying party with back-channel logout (`set_backchannel_logout_url` points it).
pub const PORTAL_CLIENT: (&str, &str) = ("portal", "portal-secret");
/// Service account holding `lockstep` → `users:manage` (aud `lockstep`).
pub const OPS_CLIENT: (&str, &str) = ("ops-tool", "ops-secret");
/// Service account with audience `lockstep` and no lockstep role.
pub const NO_PERM_CLIENT: (&str, &str) = ("no-perm", "no-perm-secret");
/// Where the login flow redirects to; nothing listens there, the code is taken from the
/// `Location` header.
pub const REDIRECT_URI: &str = "http://127.0.0.1/cb";

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The signing secret the test Keycloak's event extension uses for realms without one in
/// the vault: `cargo xtask keycloak start` sets it as the provider option `secret`.
pub const EVENTS_SECRET: &str = "whsec_a2V5Y2xvYWstZXZlbnRzLXRlc3Qtc2VjcmV0LTMyYnl0ZXM=";
/// Keycloak's management interface (`/metrics`), as `cargo xtask keycloak start` sets it.
pub const METRICS_URL: &str = "http://127.0.0.1:18190/metrics";
/// The HTTPS listener of `cargo xtask keycloak start` (`cargo xtask keycloak url --https`).
pub const HTTPS_URL: &str = "https://127.0.0.1:18443";

/// Base URL of the test Keycloak from `LOCKSTEP_TEST_KEYCLOAK_URL`; `None` when it is unset
/// and `LOCKSTEP_SKIP_KEYCLOAK=1` asks to skip Keycloak tests (the test then prints why).
pub fn keycloak_url() -> Option<String> {
    match std::env::var("LOCKSTEP_TEST_KEYCLOAK_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().trim_end_matches('/').to_owned()),
        _ if std::env::var("LOCKSTEP_SKIP_KEYCLOAK").is_ok_and(|v| v == "1") => None,
        _ => panic!(
            "Keycloak tests need LOCKSTEP_TEST_KEYCLOAK_URL: run `bash scripts/test.sh` (starts \
             Keycloak and sets it), or `cargo xtask keycloak start` and then \
             LOCKSTEP_TEST_KEYCLOAK_URL=$(cargo xtask keycloak url); set \
             LOCKSTEP_SKIP_KEYCLOAK=1 to skip them"
        ),
    }
}

/// Which test file's tests are using the shared Keycloak now, and how many of them.
static ROOM: std::sync::Mutex<(Option<&'static str>, usize)> = std::sync::Mutex::new((None, 0));
/// Woken when the last test of a file leaves the room.
static ROOM_FREED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Held by a test while it uses Keycloak; see [`room`].
pub struct Room;

impl Drop for Room {
    fn drop(&mut self) {
        let mut room = ROOM
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        room.1 -= 1;
        if room.1 == 0 {
            room.0 = None;
            ROOM_FREED.notify_waiters();
        }
    }
}

/// Waits until no test of another file uses Keycloak, then lets this one in (`file` is the
/// caller's `file!()`). Tests of one file share Keycloak as they always did; the files differ
/// in what they change on it (realm keys, a client's back-channel logout URL, alice's
/// sessions, a Keycloak crash), so two files never use it at once. The wait is as long as the
/// other file's tests that are already running.
pub async fn room(file: &'static str) -> Room {
    loop {
        let freed = ROOM_FREED.notified();
        tokio::pin!(freed);
        // Registered before the check, so a leave between the check and the wait still wakes.
        freed.as_mut().enable();
        {
            let mut room = ROOM
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match room.0 {
                None => {
                    *room = (Some(file), 1);
                    return Room;
                }
                Some(holder) if holder == file => {
                    room.1 += 1;
                    return Room;
                }
                Some(_) => {}
            }
        }
        freed.await;
    }
}

/// The test Keycloak's HTTPS listener and the CA its certificate chains to.
#[derive(Clone, Debug)]
pub struct KeycloakHttps {
    /// Base URL, `https://…` (issuers below it are `{base}/realms/{realm}`).
    pub base: String,
    /// PEM file of the test CA (what `--tls-ca-file` is given).
    pub ca_file: std::path::PathBuf,
}

/// The HTTPS side of the test Keycloak: `LOCKSTEP_TEST_KEYCLOAK_HTTPS_URL` and
/// `LOCKSTEP_TEST_KEYCLOAK_CA_FILE` (`scripts/test.sh` sets them from `cargo xtask keycloak url
/// --https` and `cargo xtask keycloak ca-file`), else what `cargo xtask keycloak start` uses:
/// [`HTTPS_URL`] and `target/keycloak/tls/ca.pem`. Call it after [`keycloak_url`].
pub fn keycloak_https() -> KeycloakHttps {
    let ca_file = test_ca_file();
    assert!(
        ca_file.is_file(),
        "no test CA at {}: this Keycloak was started without HTTPS; run `cargo xtask keycloak \
         stop` and `cargo xtask keycloak start`",
        ca_file.display()
    );
    let base = match std::env::var("LOCKSTEP_TEST_KEYCLOAK_HTTPS_URL") {
        Ok(url) if !url.trim().is_empty() => url.trim().trim_end_matches('/').to_owned(),
        _ => HTTPS_URL.to_owned(),
    };
    KeycloakHttps { base, ca_file }
}

fn test_ca_file() -> std::path::PathBuf {
    match std::env::var("LOCKSTEP_TEST_KEYCLOAK_CA_FILE") {
        Ok(path) if !path.trim().is_empty() => path.trim().into(),
        _ => target_dir().join("keycloak/tls/ca.pem"),
    }
}

/// The test CA, read anew each time (a fresh `cargo xtask keycloak start` makes a new one).
fn test_ca() -> Option<reqwest::Certificate> {
    let pem = std::fs::read(test_ca_file()).ok()?;
    reqwest::Certificate::from_pem(&pem).ok()
}

/// The tokens of a finished login, and the Keycloak session id (`sid` of the ID token).
#[derive(Clone, Debug)]
pub struct Login {
    pub access_token: String,
    pub id_token: String,
    pub refresh_token: String,
    pub sid: String,
}

/// An HTTP client that never follows redirects (the login flow reads them), times out, and
/// trusts the test CA besides the bundled roots (so every helper works on [`keycloak_https`]).
pub fn http() -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .no_proxy();
    match test_ca() {
        Some(ca) => builder.add_root_certificate(ca),
        None => builder,
    }
    .build()
    .unwrap()
}

fn token_endpoint(base: &str, realm: &str) -> String {
    format!("{base}/realms/{realm}/protocol/openid-connect/token")
}

/// The realm's JWKS URL.
pub fn jwks_url(base: &str, realm: &str) -> String {
    format!("{base}/realms/{realm}/protocol/openid-connect/certs")
}

/// The realm's issuer (`iss` of its tokens).
pub fn issuer(base: &str, realm: &str) -> String {
    format!("{base}/realms/{realm}")
}

/// The claims of a JWT, decoded without any verification.
pub fn claims(jwt: &str) -> Value {
    let payload = jwt
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT: {jwt:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .unwrap_or_else(|e| panic!("JWT payload is not base64url: {e}"));
    serde_json::from_slice(&bytes).expect("JWT payload is not JSON")
}

/// The `kid` of a JWT's header.
pub fn kid(jwt: &str) -> String {
    let header = jwt.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .unwrap_or_else(|e| panic!("JWT header is not base64url: {e}"));
    let header: Value = serde_json::from_slice(&bytes).expect("JWT header is not JSON");
    header["kid"]
        .as_str()
        .expect("JWT header has no kid")
        .to_owned()
}

/// Panics with the response body unless the status is `want`; returns the body.
async fn expect_status(resp: Response, want: StatusCode, what: &str) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, want, "{what}: unexpected status; body: {body}");
    body
}

async fn json_of(resp: Response, want: StatusCode, what: &str) -> Value {
    let body = expect_status(resp, want, what).await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body}"))
}

/// An access token of the master realm's `admin` (admin-cli, password grant). Master-realm
/// tokens live 60 s, so each admin helper takes a fresh one.
pub async fn admin_token(base: &str) -> String {
    let resp = http()
        .post(token_endpoint(base, "master"))
        .form(&[
            ("grant_type", "password"),
            ("client_id", "admin-cli"),
            ("username", "admin"),
            ("password", "admin"),
        ])
        .send()
        .await
        .expect("admin token request");
    let body = json_of(resp, StatusCode::OK, "admin token").await;
    body["access_token"].as_str().unwrap().to_owned()
}

/// An access token of `client_id` by the client-credentials grant.
pub async fn client_credentials(base: &str, realm: &str, client_id: &str, secret: &str) -> String {
    let resp = http()
        .post(token_endpoint(base, realm))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
        ])
        .send()
        .await
        .expect("client credentials request");
    let body = json_of(
        resp,
        StatusCode::OK,
        &format!("client credentials of {client_id}"),
    )
    .await;
    body["access_token"].as_str().unwrap().to_owned()
}

/// Cookies of one login, kept by hand (reqwest is built without its cookie store).
#[derive(Default)]
struct Cookies(BTreeMap<String, String>);

impl Cookies {
    fn take(&mut self, resp: &Response) {
        for value in resp.headers().get_all(SET_COOKIE) {
            let Ok(value) = value.to_str() else { continue };
            let pair = value.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                let (name, value) = (name.trim(), value.trim());
                if value.is_empty() {
                    self.0.remove(name); // an expired (deleted) cookie
                } else {
                    self.0.insert(name.to_owned(), value.to_owned());
                }
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Logs `username` in through `client_id` with the authorization code flow, as a browser
/// would: the login page, the form post, the redirect with the code (not followed), and the
/// code exchange at the token endpoint.
pub async fn login(
    base: &str,
    realm: &str,
    client_id: &str,
    secret: &str,
    username: &str,
    password: &str,
) -> Login {
    let http = http();
    let mut cookies = Cookies::default();
    let state = uuid::Uuid::new_v4().simple().to_string();
    let nonce = uuid::Uuid::new_v4().simple().to_string();

    let page = http
        .get(format!(
            "{base}/realms/{realm}/protocol/openid-connect/auth"
        ))
        .query(&[
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", REDIRECT_URI),
            ("scope", "openid"),
            ("state", &state),
            ("nonce", &nonce),
        ])
        .send()
        .await
        .expect("authorization request");
    cookies.take(&page);
    let html = expect_status(page, StatusCode::OK, "login page").await;
    let action = login_form_action(&html);

    let posted = http
        .post(&action)
        .header(COOKIE, cookies.header())
        .form(&[
            ("username", username),
            ("password", password),
            ("credentialId", ""),
        ])
        .send()
        .await
        .expect("login form post");
    let status = posted.status();
    let location = posted
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Some(location) = location.filter(|_| status == StatusCode::FOUND) else {
        let body = posted.text().await.unwrap_or_default();
        panic!(
            "login of {username} via {client_id}: expected a 302 to {REDIRECT_URI}, got \
             {status} (wrong password, or a required action?); page: {}",
            page_summary(&body)
        );
    };
    let redirect = Url::parse(&location).expect("Location is not a URL");
    assert!(
        location.starts_with(REDIRECT_URI),
        "login redirected elsewhere: {location}"
    );
    let param = |name: &str| {
        redirect
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    if let Some(error) = param("error") {
        panic!("login of {username} via {client_id} failed: {error} ({location})");
    }
    assert_eq!(param("state").as_deref(), Some(state.as_str()), "state");
    let code = param("code").unwrap_or_else(|| panic!("no code in {location}"));

    let resp = http
        .post(token_endpoint(base, realm))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT_URI),
            ("client_id", client_id),
            ("client_secret", secret),
        ])
        .send()
        .await
        .expect("code exchange");
    let tokens = json_of(resp, StatusCode::OK, "code exchange").await;
    let field = |name: &str| {
        tokens[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in the token response: {tokens}"))
            .to_owned()
    };
    let id_token = field("id_token");
    let id_claims = claims(&id_token);
    assert_eq!(id_claims["nonce"], json!(nonce), "nonce of the ID token");
    let sid = id_claims["sid"]
        .as_str()
        .unwrap_or_else(|| panic!("ID token has no sid: {id_claims}"))
        .to_owned();
    Login {
        access_token: field("access_token"),
        id_token,
        refresh_token: field("refresh_token"),
        sid,
    }
}

/// The `action` URL of Keycloak's login form (`<form id="kc-form-login" ... action="...">`).
fn login_form_action(html: &str) -> String {
    let at = html.find("kc-form-login").unwrap_or_else(|| {
        panic!(
            "no login form (kc-form-login) on the page: {}",
            page_summary(html)
        )
    });
    let start = html[..at]
        .rfind("<form")
        .expect("kc-form-login outside a <form> tag");
    let end = at + html[at..].find('>').expect("unterminated <form> tag");
    let tag = &html[start..end];
    let value = tag
        .split_once("action=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(v, _)| v)
        .unwrap_or_else(|| panic!("login form has no action: {tag}"));
    html_unescape(value)
}

/// Undoes the HTML escaping of an attribute value (`&amp;`, `&quot;`, numeric references).
fn html_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(semi) = rest.find(';').filter(|&j| j <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "lt" => Some('<'),
            "gt" => Some('>'),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The title and any error message of a Keycloak page, for panic messages.
fn page_summary(html: &str) -> String {
    let between = |open: &str, close: &str| {
        html.split_once(open)
            .and_then(|(_, rest)| rest.split_once(close))
            .map(|(v, _)| v.trim().to_owned())
    };
    let title = between("<title>", "</title>").unwrap_or_default();
    let error = between("kc-feedback-text\">", "<")
        .or_else(|| between("input-error\"", "</span>"))
        .unwrap_or_default();
    format!("title {title:?}, message {error:?}, {} bytes", html.len())
}

/// GET an Admin REST API path (below `/admin/realms/`) with `token`; panics unless 200.
async fn admin_get(base: &str, token: &str, path: &str) -> Value {
    let resp = http()
        .get(format!("{base}/admin/realms/{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /admin/realms/{path}: {e}"));
    json_of(resp, StatusCode::OK, &format!("GET /admin/realms/{path}")).await
}

/// The internal id of a user, looked up by exact username.
async fn user_id(base: &str, token: &str, realm: &str, username: &str) -> String {
    let query = [("username", username), ("exact", "true")];
    first_id(base, token, realm, "user", &query, username).await
}

/// The internal id of a client, looked up by its `clientId`.
async fn client_uuid(base: &str, token: &str, realm: &str, client_id: &str) -> String {
    first_id(
        base,
        token,
        realm,
        "client",
        &[("clientId", client_id)],
        client_id,
    )
    .await
}

/// The `id` of the first `kind` (user, client) the admin API lists for `query`; `name` is
/// what was looked up, for the message when there is none.
async fn first_id(
    base: &str,
    token: &str,
    realm: &str,
    kind: &str,
    query: &[(&str, &str)],
    name: &str,
) -> String {
    let lookup = format!("{kind} lookup");
    let resp = http()
        .get(format!("{base}/admin/realms/{realm}/{kind}s"))
        .query(query)
        .bearer_auth(token)
        .send()
        .await
        .expect(&lookup);
    let found = json_of(resp, StatusCode::OK, &lookup).await;
    found[0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no {kind} {name} in realm {realm}: {found}"))
        .to_owned()
}

/// Points a client's OIDC back-channel logout at `url` (the attribute
/// `backchannel.logout.url`), so Keycloak calls it when a session of the client ends; its
/// logout tokens name the session (`sid`, `backchannel.logout.session.required`).
pub async fn set_backchannel_logout_url(base: &str, realm: &str, client_id: &str, url: &str) {
    let token = admin_token(base).await;
    let id = client_uuid(base, &token, realm, client_id).await;
    let mut rep = admin_get(base, &token, &format!("{realm}/clients/{id}")).await;
    rep["attributes"]["backchannel.logout.url"] = json!(url);
    rep["attributes"]["backchannel.logout.session.required"] = json!("true");
    let resp = http()
        .put(format!("{base}/admin/realms/{realm}/clients/{id}"))
        .bearer_auth(&token)
        .json(&rep)
        .send()
        .await
        .expect("client update");
    expect_status(
        resp,
        StatusCode::NO_CONTENT,
        &format!("setting the back-channel logout URL of {client_id}"),
    )
    .await;
}

/// The user's active sessions as Keycloak lists them (`id` is the session id, the `sid`
/// claim; `clients` maps client ids to client ids).
pub async fn user_sessions(base: &str, realm: &str, username: &str) -> Vec<Value> {
    let token = admin_token(base).await;
    let id = user_id(base, &token, realm, username).await;
    let sessions = admin_get(base, &token, &format!("{realm}/users/{id}/sessions")).await;
    sessions
        .as_array()
        .unwrap_or_else(|| panic!("sessions is not an array: {sessions}"))
        .clone()
}

/// Ends one Keycloak session (Admin API `DELETE /admin/realms/{realm}/sessions/{sid}`) as
/// the master admin.
pub async fn delete_session(base: &str, realm: &str, sid: &str) {
    let token = admin_token(base).await;
    delete_session_as(base, realm, sid, &token).await;
}

/// Ends one Keycloak session with the caller's `token` (say, the `lockstep` service
/// account's, which holds `realm-management` → `manage-users`).
pub async fn delete_session_as(base: &str, realm: &str, sid: &str, token: &str) {
    let resp = http()
        .delete(format!("{base}/admin/realms/{realm}/sessions/{sid}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("session delete");
    expect_status(
        resp,
        StatusCode::NO_CONTENT,
        &format!("deleting session {sid}"),
    )
    .await;
}

/// Ends every session of a user (Admin API `POST /admin/realms/{realm}/users/{id}/logout`).
pub async fn logout_user(base: &str, realm: &str, username: &str) {
    let token = admin_token(base).await;
    let id = user_id(base, &token, realm, username).await;
    let resp = http()
        .post(format!("{base}/admin/realms/{realm}/users/{id}/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("user logout");
    expect_status(
        resp,
        StatusCode::NO_CONTENT,
        &format!("logging out {username}"),
    )
    .await;
}

/// Adds an `rsa-generated` key provider with a priority above every existing key provider of
/// the realm, so tokens issued from now on are signed with a new key; the old keys stay in
/// the JWKS. Returns the `kid` of the new RS256 key.
pub async fn rotate_keys(base: &str, realm: &str) -> String {
    let token = admin_token(base).await;
    let realm_rep = admin_get(base, &token, realm).await;
    let realm_id = realm_rep["id"]
        .as_str()
        .expect("realm has no id")
        .to_owned();
    let providers = admin_get(
        base,
        &token,
        &format!("{realm}/components?type=org.keycloak.keys.KeyProvider"),
    )
    .await;
    let top = providers
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["config"]["priority"][0].as_str()?.parse::<i64>().ok())
        .max()
        .unwrap_or(100);
    let priority = (top + 100).to_string();
    let name = format!("rsa-rotated-{}", uuid::Uuid::new_v4().simple());
    let resp = http()
        .post(format!("{base}/admin/realms/{realm}/components"))
        .bearer_auth(&token)
        .json(&json!({
            "name": name,
            "providerId": "rsa-generated",
            "providerType": "org.keycloak.keys.KeyProvider",
            "parentId": realm_id,
            "config": {
                "priority": [priority],
                "enabled": ["true"],
                "active": ["true"],
                "algorithm": ["RS256"],
                "keySize": ["2048"],
            },
        }))
        .send()
        .await
        .expect("key provider create");
    let location = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    expect_status(resp, StatusCode::CREATED, "adding a key provider").await;
    let component = location
        .as_deref()
        .and_then(|l| l.rsplit('/').next())
        .expect("no Location for the new key provider")
        .to_owned();
    let keys = admin_get(base, &token, &format!("{realm}/keys")).await;
    keys["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["providerId"] == json!(component) && k["algorithm"] == json!("RS256"))
        .and_then(|k| k["kid"].as_str())
        .unwrap_or_else(|| panic!("no key of provider {component} in {keys}"))
        .to_owned()
}

/// A throwaway realm whose events the `lockstep` event listener (`keycloak-extension/`)
/// forwards to one Lockstep server: made by [`events_realm`], one per test.
///
/// There is no async `Drop`: every test calls [`EventsRealm::delete`] at its end. A test that
/// fails before that leaves its `ev-…` realm behind in the dev database; it sends nothing
/// once its Lockstep server is gone, and a fresh database (`target/keycloak/.../data/h2`
/// removed) clears it.
#[derive(Clone, Debug)]
pub struct EventsRealm {
    pub base: String,
    pub name: String,
}

/// Tokens of a password-grant login (or a refresh) and the Keycloak session id (`sid`).
#[derive(Clone, Debug)]
pub struct PasswordLogin {
    pub access_token: String,
    pub refresh_token: String,
    pub sid: String,
}

/// What an admin impersonation produced.
#[derive(Clone, Debug)]
pub struct Impersonation {
    /// The new Keycloak session of the impersonated user (`sessionId` of the IMPERSONATE event).
    pub session_id: String,
    /// The impersonating admin's own session (`sid` of its token). Impersonating in its own
    /// realm, Keycloak ends that session in the same request.
    pub impersonator_sid: String,
    pub impersonator_id: String,
}

/// The realm user the tests log in as.
pub const EV_ALICE: (&str, &str) = ("alice", "alice-password");
/// Realm administrator with `realm-management` → impersonation, manage-users, view-users,
/// query-users.
pub const EV_ANN: (&str, &str) = ("ann", "ann-password");

/// Creates (Admin REST API, master `admin`) a realm `ev-<8 hex>` with the `lockstep` and
/// `jboss-logging` event listeners, user events not stored, admin events stored with details,
/// SSO Session Idle `sso_idle_s` and Max 36000 s, the realm attribute `lockstep.url` (events
/// are signed with [`EVENTS_SECRET`], the server's option, unless the vault has the realm's
/// own: [`EventsRealm::set_vault_secret`]), the users [`EV_ALICE`] and [`EV_ANN`], and the
/// confidential client [`PORTAL_CLIENT`] (direct access grants, standard flow, redirect
/// [`REDIRECT_URI`]).
pub async fn events_realm(base: &str, lockstep_url: &str, sso_idle_s: u32) -> EventsRealm {
    let name = format!("ev-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let user = |username: &str, password: &str, first: &str| {
        json!({
            "username": username,
            "enabled": true,
            "emailVerified": true,
            "email": format!("{username}@example.com"),
            "firstName": first,
            "lastName": "Test",
            "credentials": [{"type": "password", "value": password, "temporary": false}],
        })
    };
    let mut ann = user(EV_ANN.0, EV_ANN.1, "Ann");
    ann["clientRoles"] = json!({
        "realm-management": ["impersonation", "manage-users", "view-users", "query-users"],
    });
    let rep = json!({
        "realm": name,
        "enabled": true,
        "eventsListeners": ["lockstep", "jboss-logging"],
        "eventsEnabled": false,
        "adminEventsEnabled": true,
        "adminEventsDetailsEnabled": true,
        "ssoSessionIdleTimeout": sso_idle_s,
        "ssoSessionMaxLifespan": 36000,
        "attributes": {"lockstep.url": lockstep_url},
        "users": [user(EV_ALICE.0, EV_ALICE.1, "Alice"), ann],
        "clients": [{
            "clientId": PORTAL_CLIENT.0,
            "enabled": true,
            "publicClient": false,
            "secret": PORTAL_CLIENT.1,
            "directAccessGrantsEnabled": true,
            "standardFlowEnabled": true,
            "redirectUris": [REDIRECT_URI],
        }],
    });
    create_realm(base, name, &rep).await
}

/// The confidential client whose service account may read sessions (`realm-management` →
/// `view-users`): the reconciler's Keycloak admin access in [`quiet_realm`].
pub const RECONCILER_CLIENT: (&str, &str) = ("reconciler", "reconciler-secret");

/// A throwaway realm `rc-<8 hex>` that tells Lockstep nothing (no `lockstep` event listener,
/// no back-channel logout URL), so sessions can end behind Lockstep's back: the users
/// [`EV_ALICE`] and [`EV_ANN`], the client [`PORTAL_CLIENT`] (direct access grants) and
/// [`RECONCILER_CLIENT`]. Delete it with [`EventsRealm::delete`] like an events realm.
pub async fn quiet_realm(base: &str) -> EventsRealm {
    let name = format!("rc-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let user = |username: &str, password: &str| {
        json!({
            "username": username,
            "enabled": true,
            "emailVerified": true,
            "email": format!("{username}@example.com"),
            "firstName": username,
            "lastName": "Test",
            "credentials": [{"type": "password", "value": password, "temporary": false}],
        })
    };
    let rep = json!({
        "realm": name,
        "enabled": true,
        "eventsListeners": ["jboss-logging"],
        "users": [
            user(EV_ALICE.0, EV_ALICE.1),
            user(EV_ANN.0, EV_ANN.1),
            {
                "username": format!("service-account-{}", RECONCILER_CLIENT.0),
                "enabled": true,
                "serviceAccountClientId": RECONCILER_CLIENT.0,
                "clientRoles": {"realm-management": ["view-users"]},
            },
        ],
        "clients": [
            {
                "clientId": PORTAL_CLIENT.0,
                "enabled": true,
                "publicClient": false,
                "secret": PORTAL_CLIENT.1,
                "directAccessGrantsEnabled": true,
                "standardFlowEnabled": false,
            },
            {
                "clientId": RECONCILER_CLIENT.0,
                "enabled": true,
                "publicClient": false,
                "secret": RECONCILER_CLIENT.1,
                "serviceAccountsEnabled": true,
                "standardFlowEnabled": false,
                "directAccessGrantsEnabled": false,
            },
        ],
    });
    create_realm(base, name, &rep).await
}

/// Creates a realm from its representation (as the Keycloak admin).
async fn create_realm(base: &str, name: String, rep: &Value) -> EventsRealm {
    let token = admin_token(base).await;
    let resp = http()
        .post(format!("{base}/admin/realms"))
        .bearer_auth(&token)
        .json(rep)
        .send()
        .await
        .expect("realm create");
    expect_status(resp, StatusCode::CREATED, &format!("creating realm {name}")).await;
    EventsRealm {
        base: base.to_owned(),
        name,
    }
}

impl EventsRealm {
    async fn token_request(&self, form: &[(&str, &str)], what: &str) -> PasswordLogin {
        let resp = http()
            .post(token_endpoint(&self.base, &self.name))
            .form(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let body = json_of(resp, StatusCode::OK, what).await;
        let field = |name: &str| {
            body[name]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no {name} in {body}"))
                .to_owned()
        };
        let access_token = field("access_token");
        let sid = claims(&access_token)["sid"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: access token has no sid"))
            .to_owned();
        PasswordLogin {
            refresh_token: field("refresh_token"),
            access_token,
            sid,
        }
    }

    /// Password grant of `username` through the confidential `client_id` (LOGIN event).
    pub async fn password_login(
        &self,
        client_id: &str,
        secret: &str,
        username: &str,
        password: &str,
    ) -> PasswordLogin {
        self.token_request(
            &[
                ("grant_type", "password"),
                ("client_id", client_id),
                ("client_secret", secret),
                ("username", username),
                ("password", password),
                ("scope", "openid"),
            ],
            &format!("password grant of {username} via {client_id}"),
        )
        .await
    }

    /// Refresh-token grant (REFRESH_TOKEN event); the same `sid`.
    pub async fn refresh(
        &self,
        client_id: &str,
        secret: &str,
        refresh_token: &str,
    ) -> PasswordLogin {
        self.token_request(
            &[
                ("grant_type", "refresh_token"),
                ("client_id", client_id),
                ("client_secret", secret),
                ("refresh_token", refresh_token),
            ],
            &format!("refresh via {client_id}"),
        )
        .await
    }

    /// Revokes `refresh_token` at the realm's RFC 7009 revocation endpoint (REVOKE_GRANT event).
    pub async fn revoke(&self, client_id: &str, secret: &str, refresh_token: &str) {
        let resp = http()
            .post(format!(
                "{}/realms/{}/protocol/openid-connect/revoke",
                self.base, self.name
            ))
            .form(&[
                ("token", refresh_token),
                ("token_type_hint", "refresh_token"),
                ("client_id", client_id),
                ("client_secret", secret),
            ])
            .send()
            .await
            .expect("token revocation");
        expect_status(resp, StatusCode::OK, &format!("revoking via {client_id}")).await;
    }

    /// [`EV_ANN`] (password grant on this realm's `admin-cli`) impersonates `username`
    /// (`POST /admin/realms/{realm}/users/{id}/impersonation`; IMPERSONATE event). The new
    /// session's id is the `sid` of the `KEYCLOAK_IDENTITY` cookie Keycloak sets.
    pub async fn impersonate(&self, username: &str) -> Impersonation {
        let ann = self
            .token_request(
                &[
                    ("grant_type", "password"),
                    ("client_id", "admin-cli"),
                    ("username", EV_ANN.0),
                    ("password", EV_ANN.1),
                ],
                "password grant of ann via admin-cli",
            )
            .await;
        // admin-cli tokens carry no `sub` (no `basic` scope), so ann's id comes from the API.
        let impersonator_id = self.user_id(EV_ANN.0).await;
        self.impersonate_with(&ann.access_token, ann.sid, impersonator_id, username)
            .await
    }

    /// The master realm's `admin` impersonates `username` of this realm: the administrator's
    /// own session lives in master and outlives the impersonation.
    pub async fn impersonate_as_master_admin(&self, username: &str) -> Impersonation {
        let token = admin_token(&self.base).await;
        let sid = claims(&token)["sid"]
            .as_str()
            .expect("admin token sid")
            .to_owned();
        let admin_id = user_id(&self.base, &token, "master", "admin").await;
        self.impersonate_with(&token, sid, admin_id, username).await
    }

    async fn impersonate_with(
        &self,
        token: &str,
        impersonator_sid: String,
        impersonator_id: String,
        username: &str,
    ) -> Impersonation {
        let id = self.user_id(username).await;
        let resp = http()
            .post(format!(
                "{}/admin/realms/{}/users/{id}/impersonation",
                self.base, self.name
            ))
            .bearer_auth(token)
            .send()
            .await
            .expect("impersonation");
        let mut cookies = Cookies::default();
        cookies.take(&resp);
        expect_status(resp, StatusCode::OK, &format!("impersonating {username}")).await;
        let identity = cookies.0.get("KEYCLOAK_IDENTITY").unwrap_or_else(|| {
            panic!(
                "impersonation set no KEYCLOAK_IDENTITY cookie: {:?}",
                cookies.0
            )
        });
        let session_id = claims(identity)["sid"]
            .as_str()
            .expect("KEYCLOAK_IDENTITY has no sid")
            .to_owned();
        Impersonation {
            session_id,
            impersonator_sid,
            impersonator_id,
        }
    }

    /// Points the realm's `lockstep` listener at another Lockstep (realm attribute).
    pub async fn set_lockstep(&self, lockstep_url: &str) {
        set_realm_events(&self.base, &self.name, lockstep_url, true).await;
    }

    /// Sets one realm attribute (say, a `lockstep.secret` the extension must ignore).
    pub async fn set_attribute(&self, name: &str, value: &str) {
        let token = admin_token(&self.base).await;
        let url = format!("{}/admin/realms/{}", self.base, self.name);
        let mut rep = admin_get(&self.base, &token, &self.name).await;
        rep["attributes"][name] = json!(value);
        let resp = http()
            .put(&url)
            .bearer_auth(&token)
            .json(&json!({"attributes": rep["attributes"]}))
            .send()
            .await
            .expect("realm update");
        expect_status(
            resp,
            StatusCode::NO_CONTENT,
            &format!("setting {name} of realm {}", self.name),
        )
        .await;
    }

    /// Puts the realm's own signing secret in the test Keycloak's file vault
    /// (`target/keycloak/vault/<realm>_lockstep-secret`), which wins over the server option.
    pub fn set_vault_secret(&self, secret: &str) {
        let dir = vault_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{}_lockstep-secret", self.name)), secret).unwrap();
    }

    /// Logs a session out with its refresh token (`POST .../logout`; a LOGOUT event).
    pub async fn logout(&self, client_id: &str, secret: &str, refresh_token: &str) {
        let resp = http()
            .post(format!(
                "{}/realms/{}/protocol/openid-connect/logout",
                self.base, self.name
            ))
            .form(&[
                ("client_id", client_id),
                ("client_secret", secret),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .expect("logout");
        expect_status(resp, StatusCode::NO_CONTENT, "logout").await;
    }

    /// [`EventsRealm::impersonate`] of [`EV_ALICE`].
    pub async fn impersonate_alice(&self) -> Impersonation {
        self.impersonate(EV_ALICE.0).await
    }

    /// The internal id of a user of this realm.
    pub async fn user_id(&self, username: &str) -> String {
        let token = admin_token(&self.base).await;
        user_id(&self.base, &token, &self.name, username).await
    }

    /// Disables a user (`PUT users/{id}` with `enabled: false`; USER_DISABLED).
    pub async fn disable_user(&self, username: &str) {
        let token = admin_token(&self.base).await;
        let id = user_id(&self.base, &token, &self.name, username).await;
        let mut rep = admin_get(&self.base, &token, &format!("{}/users/{id}", self.name)).await;
        rep["enabled"] = json!(false);
        let resp = http()
            .put(format!(
                "{}/admin/realms/{}/users/{id}",
                self.base, self.name
            ))
            .bearer_auth(&token)
            .json(&rep)
            .send()
            .await
            .expect("user update");
        expect_status(
            resp,
            StatusCode::NO_CONTENT,
            &format!("disabling {username}"),
        )
        .await;
    }

    /// Deletes a user (`DELETE users/{id}`; USER_DELETED).
    pub async fn delete_user(&self, username: &str) {
        let token = admin_token(&self.base).await;
        let id = user_id(&self.base, &token, &self.name, username).await;
        let resp = http()
            .delete(format!(
                "{}/admin/realms/{}/users/{id}",
                self.base, self.name
            ))
            .bearer_auth(&token)
            .send()
            .await
            .expect("user delete");
        expect_status(
            resp,
            StatusCode::NO_CONTENT,
            &format!("deleting {username}"),
        )
        .await;
    }

    /// Ends every session of a user (`POST users/{id}/logout`; USER_LOGOUT_ALL).
    pub async fn logout_user(&self, username: &str) {
        logout_user(&self.base, &self.name, username).await;
    }

    /// Ends one session (`DELETE sessions/{sid}`; SESSION_DELETED).
    pub async fn delete_session(&self, sid: &str) {
        delete_session(&self.base, &self.name, sid).await;
    }

    /// Ends every session of the realm (`POST logout-all`; REALM_LOGOUT_ALL).
    pub async fn logout_all(&self) {
        let token = admin_token(&self.base).await;
        let resp = http()
            .post(format!(
                "{}/admin/realms/{}/logout-all",
                self.base, self.name
            ))
            .bearer_auth(&token)
            .send()
            .await
            .expect("logout-all");
        expect_status(resp, StatusCode::OK, "logout-all").await;
    }

    /// Deletes the realm (and its vault secret); every test calls this at its end (see
    /// [`EventsRealm`]).
    pub async fn delete(self) {
        let _ = std::fs::remove_file(vault_dir().join(format!("{}_lockstep-secret", self.name)));
        let token = admin_token(&self.base).await;
        let resp = http()
            .delete(format!("{}/admin/realms/{}", self.base, self.name))
            .bearer_auth(&token)
            .send()
            .await
            .expect("realm delete");
        expect_status(
            resp,
            StatusCode::NO_CONTENT,
            &format!("deleting realm {}", self.name),
        )
        .await;
    }
}

/// Sets (or, with `on` false, removes) the `lockstep` event listener and its realm attribute.
async fn set_realm_events(base: &str, realm: &str, lockstep_url: &str, on: bool) {
    let token = admin_token(base).await;
    let url = format!("{base}/admin/realms/{realm}");
    let resp = http()
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("realm get");
    let rep = json_of(resp, StatusCode::OK, &format!("reading realm {realm}")).await;
    let mut listeners: Vec<String> = rep["eventsListeners"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    listeners.retain(|l| l != "lockstep");
    if on {
        listeners.push("lockstep".into());
    }
    let mut attributes = rep["attributes"].as_object().cloned().unwrap_or_default();
    if on {
        attributes.insert("lockstep.url".into(), json!(lockstep_url));
    } else {
        attributes.remove("lockstep.url");
    }
    let resp = http()
        .put(&url)
        .bearer_auth(&token)
        .json(
            &json!({"eventsListeners": listeners, "adminEventsEnabled": true,
                      "adminEventsDetailsEnabled": true, "attributes": attributes}),
        )
        .send()
        .await
        .expect("realm update");
    expect_status(
        resp,
        StatusCode::NO_CONTENT,
        &format!("updating realm {realm}"),
    )
    .await;
}

/// The master realm's events sent to a test's Lockstep, until [`MasterEvents::restore`].
/// One test at a time may hold it (only the impersonation test does).
pub struct MasterEvents {
    base: String,
}

/// Enables the `lockstep` listener on the master realm, posting to `lockstep_url`.
pub async fn master_events(base: &str, lockstep_url: &str) -> MasterEvents {
    set_realm_events(base, "master", lockstep_url, true).await;
    MasterEvents {
        base: base.to_owned(),
    }
}

impl MasterEvents {
    /// Removes the listener and its attributes from master again.
    pub async fn restore(self) {
        set_realm_events(&self.base, "master", "", false).await;
    }
}

/// Cargo's target directory of this test binary (`target/debug/deps/<test>` → `target`).
fn target_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .unwrap_or_else(|| panic!("{} is not in target/<profile>/deps", exe.display()))
        .to_owned()
}

/// The test Keycloak's file vault (`cargo xtask keycloak start` passes it as `--vault-dir`).
pub fn vault_dir() -> std::path::PathBuf {
    target_dir().join("keycloak/vault")
}

/// Runs `cargo xtask keycloak <args>` through the xtask binary `scripts/test.sh` built
/// (`target/release/xtask`): `cargo` itself would wait for the build lock the running
/// `cargo test` holds.
fn xtask_keycloak(args: &[&str]) {
    let xtask = target_dir().join("release/xtask");
    assert!(
        xtask.is_file(),
        "{} is missing: run `cargo xtask keycloak start` first",
        xtask.display()
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let status = std::process::Command::new(&xtask)
        .arg("keycloak")
        .args(args)
        .current_dir(root)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", xtask.display()));
    assert!(status.success(), "xtask keycloak {args:?} failed: {status}");
}

/// Kills the test Keycloak with SIGKILL (a crash: nothing is flushed or stopped) and starts
/// it again on the same database; returns once it answers (bounded by the xtask's timeout).
pub fn crash_and_restart() {
    xtask_keycloak(&["kill"]);
    xtask_keycloak(&["start", "--no-build"]);
}

/// The value of one metric of Keycloak's `/metrics` (the first sample), or `None`.
pub async fn metric(name: &str) -> Option<f64> {
    let text = http()
        .get(METRICS_URL)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
