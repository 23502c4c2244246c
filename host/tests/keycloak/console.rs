//! The operator console end to end, in a real headless Chromium driven over W3C WebDriver by
//! chromedriver (Debian's `chromium` and `chromium-driver`; `scripts/test.sh` installs them).
//! A few WebDriver calls over our reqwest stand in for a client crate. Every test starts its
//! own `lockstep serve` and chromedriver (on a free loopback port) and kills both on drop.
//! The console reads through the same store calls on both backends (the API's tests cover
//! those on PostgreSQL); these run on SQLite.
//!
//! `LOCKSTEP_CONSOLE_SCREENSHOTS=docs/console` saves a screenshot of each page there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::components::write_manifest;
use common::receiver::Receiver;
use common::{Backend, Server, ServerOptions, TOKEN};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const WAIT: Duration = Duration::from_secs(20);

/// chromedriver and one browser session; both end on drop.
struct Browser {
    _driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    shots: Option<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn chromedriver() -> PathBuf {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect(
            "chromedriver is missing: apt-get install chromium chromium-driver \
             (scripts/test.sh installs them)",
        )
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(res) = http.get(format!("{base}/status")).send().await
                && let Ok(v) = res.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let binary = ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("chromium is missing: apt-get install chromium");
        let res: Value = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": binary,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,800",
                             "--no-first-run", "--disable-extensions"]
                }
            }}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {res}"))
            .to_owned();
        Browser {
            _driver: driver,
            base,
            session,
            http,
            shots: std::env::var_os("LOCKSTEP_CONSOLE_SCREENSHOTS").map(|d| {
                let d = common::components::workspace().join(d);
                std::fs::create_dir_all(&d).unwrap();
                d
            }),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res: Value = req.send().await.unwrap().json().await.unwrap();
        if res["value"]["error"].is_string() {
            panic!("WebDriver {path}: {}", res["value"]);
        }
        res["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn texts(&self, css: &str) -> Vec<String> {
        let els = self
            .call(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        let mut out = Vec::new();
        for e in els.as_array().unwrap() {
            let id = e[ELEMENT].as_str().unwrap();
            let t = self
                .call(reqwest::Method::GET, &format!("/element/{id}/text"), None)
                .await;
            out.push(t.as_str().unwrap().to_owned());
        }
        out
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Clicks what leads to another page and waits until that page has loaded.
    async fn click_through(&self, css: &str) {
        self.script("document.documentElement.setAttribute('data-left', '1')")
            .await;
        self.click(css).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let done = self
                .script(
                    "return document.readyState === 'complete' && \
                     !document.documentElement.hasAttribute('data-left')",
                )
                .await;
            if done == true {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "clicking {css} led nowhere"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Sends a file's path to a file input (chromedriver runs on this machine).
    async fn attach(&self, css: &str, path: &Path) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": path.display().to_string()})),
        )
        .await;
    }

    async fn cookie(&self, name: &str) -> Option<Value> {
        let all = self.call(reqwest::Method::GET, "/cookie", None).await;
        all.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    async fn delete_cookies(&self) {
        self.call(reqwest::Method::DELETE, "/cookie", None).await;
    }

    async fn resize(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Reloads `url` until its page source satisfies `pred`.
    async fn wait_page(&self, url: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.goto(url).await;
            let src = self.source().await;
            if pred(&src) {
                return src;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url} never showed {what}: {src}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let Some(dir) = &self.shots else { return };
        use base64::Engine;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the browser; chromedriver itself is killed with its `Child`.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        reqwest::Client::new().delete(url).send(),
                    )
                    .await;
                });
            }
        })
        .join();
    }
}

const OTHER_KEY: &str = "beta-only-secret";

fn config() -> String {
    format!(
        "[[api_keys]]\nid = \"beta-ops\"\nsha256 = \"{}\"\nrealms = [\"beta\"]\n\
         permissions = [\"users:manage\", \"audit:read\"]\n",
        hex::encode(lockstep::auth::sha256(OTHER_KEY))
    )
}

fn webhook(dir: &Path, name: &str, receiver: &Receiver, max_attempts: u32) {
    write_manifest(
        dir,
        name,
        "webhook",
        &format!(
            "realms = [\"acme\", \"beta\"]\nallowed_hosts = [\"{}\"]\ntimeout_ms = 2000\n\
             [policy]\non_failure = \"retry\"\nmax_attempts = {max_attempts}\nbackoff_ms = 20\nmax_backoff_ms = 50\n\
             [config]\nurl = \"{}\"\ntoken = \"do-not-show-me\"\n",
            receiver.origin(),
            receiver.url(&format!("/{name}"))
        ),
    );
}

async fn sign_in(b: &Browser, server: &Server, token: &str) {
    b.goto(&format!("{}/console/login", server.base)).await;
    b.type_into("#token", token).await;
    b.click_through("form[action='/console/login'] button")
        .await;
}

/// The reference tree: a Keycloak-mapped PARENT and the two legacy sessions under it.
async fn reference_tree(server: &Server, realm: &str, prefix: &str) {
    let api = server.api(realm);
    let (code, body) = api
        .post(
            "map-parent",
            json!({"externalId": format!("{prefix}kc-7f3a"), "keycloakSessionId": "kc-sid-1",
                   "userId": "alice", "system": "keycloak"}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    for (id, system) in [("portal-42", "portal"), ("billing-17", "billing-app")] {
        let (code, body) = api
            .post(
                "map-child",
                json!({"externalId": format!("{prefix}{id}"), "parentExternalId": format!("{prefix}kc-7f3a"),
                       "userId": "alice", "system": system}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_console_end_to_end() {
    let good = Receiver::start().await;
    let bad = Receiver::start().await;
    bad.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    webhook(dir.path(), "billing", &good, 3);
    webhook(dir.path(), "legacy", &bad, 2);
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            connectors_dir: Some(dir.path().to_owned()),
            config: Some(config()),
            ..Default::default()
        },
    )
    .await;
    reference_tree(&server, "acme", "").await;
    reference_tree(&server, "beta", "beta-").await;
    let b = Browser::start().await;
    let console = format!("{}/console/", server.base);

    // Not signed in: every page leads to the sign-in form.
    b.goto(&format!("{console}sessions")).await;
    assert!(
        b.url().await.ends_with("/console/login"),
        "{} {}",
        b.url().await,
        b.source().await
    );
    b.screenshot("sign-in").await;

    // A wrong token is refused and nothing is signed in.
    sign_in(&b, &server, "not-the-token").await;
    assert!(
        b.text("main .error").await.contains("Sign-in refused"),
        "{}",
        b.source().await
    );
    assert!(b.cookie("lockstep_console").await.is_none());

    // The admin token signs in; the cookie is out of scripts' reach and never cross-site.
    sign_in(&b, &server, TOKEN).await;
    assert!(b.url().await.ends_with("/console/"), "{}", b.url().await);
    let cookie = b.cookie("lockstep_console").await.expect("session cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(cookie["path"], "/console", "{cookie}");
    let session_cookie = cookie["value"].as_str().unwrap().to_owned();
    assert!(
        !b.source().await.contains(TOKEN),
        "the token is never in a page"
    );
    let overview = b.source().await;
    assert!(
        overview.contains("acme") && overview.contains("billing"),
        "{overview}"
    );
    // The overview refreshes itself (console.js) without a reload.
    let before = b
        .script("return document.getElementById('live').getAttribute('data-updated')")
        .await;
    assert!(before.is_null());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = b
            .script("return document.getElementById('live').getAttribute('data-updated')")
            .await;
        if v.is_string() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overview never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    b.screenshot("overview").await;

    // Search the reference tree by user, open it.
    b.goto(&format!("{console}sessions")).await;
    b.type_into("#realm", "acme").await;
    b.click("#field option[value='userId']").await;
    b.type_into("#value", "alice").await;
    b.click_through("form.search button").await;
    let found = b.texts("tbody td:first-child a").await;
    assert_eq!(
        found,
        ["kc-7f3a", "portal-42", "billing-17"],
        "{}",
        b.source().await
    );
    b.screenshot("sessions").await;
    b.click_through("tbody td:first-child a").await;
    assert!(
        b.url().await.contains("/console/tree?"),
        "{}",
        b.url().await
    );
    assert_eq!(b.texts("table.tree td.status").await, ["ACTIVE"; 3]);
    b.screenshot("tree").await;

    // Destroy the parent: the confirmation says how many end, then all three are DESTROYED.
    b.click_through("a.button.danger[href*='kind=parent']")
        .await;
    assert_eq!(b.text("strong.count").await, "3");
    b.screenshot("destroy-confirm").await;
    b.click_through("form[action='/console/destroy'] button[type=submit]")
        .await;
    assert!(
        b.text(".flash").await.contains("3 sessions ended"),
        "{}",
        b.source().await
    );
    assert_eq!(b.texts("table.tree td.status").await, ["DESTROYED"; 3]);

    // The failing connector's deliveries become dead letters; replay one once it recovers.
    let dead_url = format!("{console}deliveries?status=dead&connector=legacy");
    b.wait_page(&dead_url, "a dead letter", |s| {
        s.contains("/console/replay") && s.contains("503")
    })
    .await;
    b.screenshot("deliveries").await;
    bad.set_status(200);
    let id = b.text("tbody td:first-child a").await;
    b.click_through("tbody form[action='/console/replay'] button")
        .await;
    assert!(
        b.text(".flash").await.contains("1 delivery queued again"),
        "{}",
        b.source().await
    );
    assert!(
        b.url()
            .await
            .ends_with(&format!("/console/deliveries/{id}"))
    );
    b.wait_page(
        &format!("{console}deliveries/{id}"),
        "the delivery delivered",
        |s| s.contains("badge good\">delivered"),
    )
    .await;
    b.screenshot("delivery").await;

    // Disable and enable a connector; its configuration values are never shown.
    b.goto(&format!("{console}connectors")).await;
    b.screenshot("connectors").await;
    b.click_through("a[href='/console/connectors/billing']")
        .await;
    let page = b.source().await;
    assert!(page.contains("url") && page.contains("token") && !page.contains("do-not-show-me"));
    b.click_through("form[action='/console/connectors/billing/disable'] button")
        .await;
    assert!(b.text(".flash").await.contains("disabled"));
    assert!(b.source().await.contains("badge muted\">disabled"));
    b.click_through("form[action='/console/connectors/billing/enable'] button")
        .await;
    assert!(b.text(".flash").await.contains("enabled"));
    assert!(b.source().await.contains("badge good\">active"));
    b.screenshot("connector").await;

    // A refused upload shows the host's reason.
    let files = tempfile::tempdir().unwrap();
    let manifest = files.path().join("broken.toml");
    std::fs::write(&manifest, "name = \"broken\"\nrealms = [\"acme\"]\n").unwrap();
    let component = files.path().join("broken.wasm");
    std::fs::write(&component, b"\0asm but not really a component").unwrap();
    b.goto(&format!("{console}upload")).await;
    b.type_into("#name", "broken").await;
    b.attach("#manifest", &manifest).await;
    b.attach("#component", &component).await;
    b.click_through("form[action='/console/upload'] button")
        .await;
    let refusal = b.text(".refusal").await;
    assert!(!refusal.is_empty(), "{}", b.source().await);
    b.screenshot("upload-refused").await;

    // The audit log names the signed-in actor for every console action.
    b.goto(&format!("{console}audit?actor=admin")).await;
    let actions = b.texts("tbody td:nth-child(4)").await;
    for a in [
        "destroy-parent",
        "delivery-replay",
        "connector-disable",
        "connector-enable",
        "connector-put",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    b.screenshot("audit").await;
    b.goto(&format!("{console}receipts?realm=acme&user=alice"))
        .await;
    assert!(
        b.text(".summary").await.contains("3 sessions in 3 systems"),
        "{}",
        b.source().await
    );
    b.screenshot("receipt").await;

    // Phone width: the same pages, no horizontal scroll of the page itself.
    b.resize(390, 844).await;
    b.goto(&console).await;
    let wide = b
        .script("return document.documentElement.scrollWidth > window.innerWidth + 1")
        .await;
    assert_eq!(wide, false, "the overview scrolls sideways at phone width");
    b.screenshot("overview-phone").await;
    b.resize(1280, 800).await;

    // Every console response carries the CSP and the other headers, signed in or not.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in [
        "",
        "login",
        "sessions",
        "tree?realm=acme&id=kc-7f3a",
        "destroy?realm=acme&kind=user&id=alice",
        "receipt?realm=acme&id=kc-7f3a",
        "receipts?realm=acme&user=alice",
        "connectors",
        "connectors/billing",
        "upload",
        "deliveries",
        &format!("deliveries/{id}"),
        "audit",
        "overview/live",
        "assets/console.css",
        "assets/console.js",
        "no-such-page",
        "tree?realm=acme",
    ] {
        let res = http
            .get(format!("{console}{path}"))
            .header("cookie", format!("lockstep_console={session_cookie}"))
            .send()
            .await
            .unwrap();
        let status = res.status();
        assert!(status.as_u16() < 500, "{path}: {status}");
        let h = res.headers();
        assert_eq!(
            h["content-security-policy"],
            "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; \
             form-action 'self'; base-uri 'none'",
            "{path}"
        );
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
        if !path.starts_with("assets") && status == StatusCode::OK && path != "overview/live" {
            let body = res.text().await.unwrap();
            assert!(!body.contains("<script>"), "{path} has an inline script");
        }
    }
    // A form without the session's CSRF token changes nothing.
    let res = http
        .post(format!("{console}connectors/billing/disable"))
        .header("cookie", format!("lockstep_console={session_cookie}"))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let (_, billing) = server.admin_get("/admin/connectors/billing").await;
    assert_eq!(billing["state"], "active");

    // Sign-out ends the session on the server, not just in this browser.
    b.goto(&console).await;
    b.click_through("form.signout button").await;
    assert!(
        b.url().await.contains("/console/login"),
        "{}",
        b.url().await
    );
    let res = http
        .get(&console)
        .header("cookie", format!("lockstep_console={session_cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()["location"], "/console/login");

    // A key scoped to another realm sees nothing of acme.
    b.delete_cookies().await;
    sign_in(&b, &server, OTHER_KEY).await;
    let overview = b.source().await;
    assert!(overview.contains("beta"), "{overview}");
    assert!(!overview.contains("acme"), "{overview}");
    for path in [
        "sessions?realm=acme&field=userId&value=alice",
        "tree?realm=acme&id=kc-7f3a",
        "receipt?realm=acme&id=kc-7f3a",
        "audit?realm=acme",
        "audit",
        "connectors",
        "deliveries",
    ] {
        b.goto(&format!("{console}{path}")).await;
        let page = b.source().await;
        assert!(page.contains("403 Forbidden"), "{path}: {page}");
        assert!(
            !page.contains("kc-7f3a</") && !page.contains("portal-42"),
            "{path}: {page}"
        );
    }
    b.goto(&format!("{console}sessions")).await;
    let page = b.source().await;
    assert!(
        page.contains("beta-kc-7f3a") && !page.contains("acme"),
        "{page}"
    );
}

/// Signs `username` in through the realm's Keycloak login page; ends on the overview.
async fn keycloak_login(b: &Browser, server: &Server, realm: &str, kc: &str, username: &str) {
    // Keycloak's own session cookies (path /realms/...) would sign the last user in again.
    b.goto(&format!(
        "{}/.well-known/openid-configuration",
        common::keycloak::issuer(kc, realm)
    ))
    .await;
    b.delete_cookies().await;
    b.goto(&format!("{}/console/", server.base)).await;
    b.delete_cookies().await;
    b.goto(&format!("{}/console/login", server.base)).await;
    b.click_through(&format!("a[href='/console/sso/start?realm={realm}']"))
        .await;
    assert!(b.url().await.starts_with(kc), "{}", b.url().await);
    b.type_into("#username", username).await;
    b.type_into("#password", &format!("{username}-password"))
        .await;
    b.click_through("#kc-login").await;
    // Our callback page moves on to the overview by itself.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !b.url().await.ends_with("/console/") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} {}",
            b.url().await,
            b.source().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// "Sign in with Keycloak" through the real login page of the test Keycloak, in a realm made
/// for the test: the console client is public (PKCE), its redirect URI is this server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_sign_in_grants_what_the_api_would() {
    let _room = common::keycloak::room(file!()).await;
    let Some(kc) = std::env::var("LOCKSTEP_TEST_KEYCLOAK_URL")
        .ok()
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .filter(|u| !u.is_empty())
    else {
        eprintln!(
            "LOCKSTEP_TEST_KEYCLOAK_URL is unset: skipping the console's Keycloak sign-in \
             (cargo xtask keycloak start; LOCKSTEP_TEST_KEYCLOAK_URL=$(cargo xtask keycloak url))"
        );
        return;
    };
    let realm = format!(
        "console-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let config = format!(
        "[realms.{realm}]\nissuer = \"{}\"\naudiences = [\"lockstep\"]\nconsole_client_id = \"lockstep-console\"\n",
        common::keycloak::issuer(&kc, &realm)
    );
    let server = Server::start_with(Backend::Sqlite, ServerOptions::with_config(config)).await;
    reference_tree(&server, &realm, "").await;
    reference_tree(&server, "acme", "").await;
    let user = |name: &str, roles: Value| {
        json!({"username": name, "enabled": true, "email": format!("{name}@example.com"),
               "emailVerified": true, "firstName": name, "lastName": "Example",
               "credentials": [{"type": "password", "value": format!("{name}-password"), "temporary": false}],
               "requiredActions": [], "clientRoles": roles})
    };
    let rep = json!({
        "realm": realm, "enabled": true, "sslRequired": "none",
        "roles": {"client": {"lockstep": [{"name": "users:manage"}]}},
        "clients": [
            {"clientId": "lockstep", "enabled": true, "publicClient": false, "secret": "unused-secret",
             "standardFlowEnabled": false, "serviceAccountsEnabled": false},
            {"clientId": "lockstep-console", "enabled": true, "publicClient": true,
             "standardFlowEnabled": true, "directAccessGrantsEnabled": false,
             "redirectUris": [format!("{}/console/sso/callback", server.base)],
             "attributes": {"pkce.code.challenge.method": "S256"},
             // The API's audience and the lockstep client's roles, as the realm's
             // access tokens for Lockstep carry them.
             "protocolMappers": [
                {"name": "lockstep-audience", "protocol": "openid-connect",
                 "protocolMapper": "oidc-audience-mapper",
                 "config": {"included.client.audience": "lockstep", "access.token.claim": "true",
                            "id.token.claim": "false"}},
                {"name": "lockstep-roles", "protocol": "openid-connect",
                 "protocolMapper": "oidc-usermodel-client-role-mapper",
                 "config": {"usermodel.clientRoleMapping.clientId": "lockstep",
                            "claim.name": "resource_access.lockstep.roles", "multivalued": "true",
                            "jsonType.label": "String", "access.token.claim": "true",
                            "id.token.claim": "false"}}
             ]}
        ],
        "users": [
            user("operator", json!({"lockstep": ["users:manage"]})),
            user("visitor", json!({}))
        ]
    });
    let http = reqwest::Client::new();
    let admin = common::keycloak::admin_token(&kc).await;
    let res = http
        .post(format!("{kc}/admin/realms"))
        .bearer_auth(&admin)
        .json(&rep)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::CREATED,
        "{}",
        res.text().await.unwrap()
    );

    let b = Browser::start().await;
    // The operator holds users:manage in that realm (a client role of `lockstep`): the
    // console shows that realm's sessions and nothing of any other.
    keycloak_login(&b, &server, &realm, &kc, "operator").await;
    let overview = b.source().await;
    assert!(
        overview.contains(&realm) && !overview.contains(">acme<"),
        "{overview}"
    );
    b.goto(&format!(
        "{}/console/tree?realm={realm}&id=kc-7f3a",
        server.base
    ))
    .await;
    assert_eq!(b.texts("table.tree td.status").await, ["ACTIVE"; 3]);
    b.goto(&format!(
        "{}/console/tree?realm=acme&id=kc-7f3a",
        server.base
    ))
    .await;
    assert!(b.source().await.contains("403 Forbidden"));
    let cookie = b.cookie("lockstep_console").await.expect("session cookie");
    assert_eq!(cookie["httpOnly"], true);
    assert_eq!(cookie["sameSite"], "Strict");

    // A user without the role signs in but may do nothing, as the API would answer.
    keycloak_login(&b, &server, &realm, &kc, "visitor").await;
    b.goto(&format!(
        "{}/console/tree?realm={realm}&id=kc-7f3a",
        server.base
    ))
    .await;
    assert!(
        b.source().await.contains("403 Forbidden"),
        "{}",
        b.source().await
    );

    // A forged callback (no sign-in started by this browser) is refused.
    b.goto(&format!(
        "{}/console/sso/callback?code=x&state=forged",
        server.base
    ))
    .await;
    assert!(
        b.source().await.contains("state mismatch"),
        "{}",
        b.source().await
    );

    let _ = http
        .delete(format!("{kc}/admin/realms/{realm}"))
        .bearer_auth(common::keycloak::admin_token(&kc).await)
        .send()
        .await;
}

/// The console's reads on PostgreSQL (the browser tests above run on SQLite): every page of
/// a signed-in admin answers 200 with the reference tree in it, over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_read_postgresql_too() {
    if common::skip_postgres() {
        eprintln!("LOCKSTEP_SKIP_POSTGRES=1: skipping the console on PostgreSQL");
        return;
    }
    let server = Server::start(Backend::Postgres).await;
    reference_tree(&server, "acme", "").await;
    // A session delegated by the tree's root (as an impersonation makes one): not in the
    // tree, but a destroy of the tree ends it.
    {
        use sqlx::Connection;
        let mut db = sqlx::PgConnection::connect(&server.database_url)
            .await
            .unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        sqlx::query(
            "INSERT INTO sessions (realm, external_id, kind, user_id, system, delegated_by, \
             status, attributes, created_at, updated_at) \
             VALUES ('acme', 'imp-9', 'FIXED', 'bob', 'portal', 'kc-7f3a', 'ACTIVE', '{}', $1, $1)",
        )
        .bind(now)
        .execute(&mut db)
        .await
        .unwrap();
    }
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let console = format!("{}/console/", server.base);
    let form = http.get(format!("{console}login")).send().await.unwrap();
    let pre = form
        .headers()
        .get_all("set-cookie")
        .iter()
        .find_map(|v| {
            v.to_str()
                .ok()?
                .strip_prefix("lockstep_console_pre=")?
                .split(';')
                .next()
                .map(str::to_owned)
        })
        .unwrap();
    let res = http
        .post(format!("{console}login"))
        .header("cookie", format!("lockstep_console_pre={pre}"))
        .form(&[("token", TOKEN), ("csrf", pre.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let cookie = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .find_map(|v| {
            let v = v.to_str().ok()?;
            v.starts_with("lockstep_console=")
                .then(|| v.split(';').next().unwrap().to_owned())
        })
        .unwrap();
    for (path, expect) in [
        ("", "acme"),
        ("overview/live", "acme"),
        ("sessions?realm=acme&field=userId&value=alice", "billing-17"),
        (
            "sessions?realm=acme&field=keycloakSessionId&value=kc-sid-1",
            "kc-7f3a",
        ),
        ("tree?realm=acme&id=portal-42", "billing-17"),
        ("tree?realm=acme&id=kc-7f3a", "Delegated from this tree"),
        ("tree?realm=acme&id=kc-7f3a", "imp-9"),
        (
            "destroy?realm=acme&kind=parent&id=kc-7f3a",
            "class=\"count\">4<",
        ),
        (
            "destroy?realm=acme&kind=user&id=alice",
            "class=\"count\">4<",
        ),
        ("receipt?realm=acme&id=kc-7f3a", "kc-7f3a"),
        ("receipts?realm=acme&user=alice", "3 sessions in 3 systems"),
        ("deliveries?status=any", "Deliveries"),
        ("audit?realm=acme&action=map-child", "portal-42"),
    ] {
        let res = http
            .get(format!("{console}{path}"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let body = res.text().await.unwrap();
        assert!(
            body.contains(expect),
            "{path}: {expect} missing from {body}"
        );
    }
}
