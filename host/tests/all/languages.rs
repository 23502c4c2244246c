//! Connectors in every language the SDK serves (Rust, JavaScript/TypeScript, Python), each
//! built from source by `lockstep connector build` with its real toolchain (cargo,
//! componentize-js from npm, componentize-py from PyPI; installed on first use under
//! `target/lockstep-tools`), then:
//! - the example connector (`connectors/legacy-<lang>`) loaded by a real `lockstep serve`
//!   mirrors sessions into the legacy-IAM simulator (`tests/legacy-sim`, a real HTTP server on
//!   127.0.0.1 with Basic auth): map-parent/map-child create legacy sessions, destroy-parent
//!   deletes them, a legacy outage (503) is retried, revoke-user deletes the user's sessions;
//! - a new project goes `lockstep connector new` → `build` → `test` as a user types it;
//! - a new Rust project, made by a copy of the binary outside the source tree, builds there.
//!
//! One test per language, so the three toolchains install and build side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::components::workspace;
use common::{Backend, Server, ServerOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// JavaScript and Python components take seconds to compile in a debug build.
const LOAD_TIMEOUT: Duration = Duration::from_secs(240);
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// The realm's Keycloak event secret (the revoke step posts a signed REVOKE_GRANT).
const EVENTS_SECRET: &str = "whsec_c2VjcmV0LWZvci1sb2Nrc3RlcC1ldmVudC10ZXN0cw==";

fn tools_dir() -> PathBuf {
    workspace().join("target/lockstep-tools")
}

/// Runs the real `lockstep` binary in `cwd`; returns its output (both streams captured).
async fn lockstep(cwd: &Path, args: &[&str]) -> Output {
    lockstep_at(Path::new(env!("CARGO_BIN_EXE_lockstep")), cwd, args).await
}

/// [`lockstep`] with the binary at `bin`.
async fn lockstep_at(bin: &Path, cwd: &Path, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .env("LOCKSTEP_TOOLS_DIR", tools_dir())
        .env("LOCKSTEP_LOG_LEVEL", "warn")
        .env("RUST_BACKTRACE", "0")
        .kill_on_drop(true)
        .output();
    // Bounded: a first build downloads and installs a toolchain.
    tokio::time::timeout(Duration::from_secs(900), out)
        .await
        .unwrap_or_else(|_| panic!("lockstep {args:?} did not finish in 15 minutes"))
        .unwrap()
}

fn must_succeed(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Builds `connectors/legacy-<lang>` with `lockstep connector build`; returns the component.
async fn build_example(lang: &str) -> PathBuf {
    let dir = workspace().join(format!("connectors/legacy-{lang}"));
    let out = lockstep(&workspace(), &["connector", "build", dir.to_str().unwrap()]).await;
    let stdout = must_succeed(&format!("lockstep connector build {}", dir.display()), &out);
    eprintln!("{stdout}");
    let wasm = dir.join(format!("legacy-{lang}.wasm"));
    assert!(wasm.is_file(), "{} missing after the build", wasm.display());
    wasm
}

/// The example's own manifest, pointed at `sim` and `component`.
fn example_manifest(lang: &str, sim: &legacy_sim::Running, component: &Path) -> String {
    let dir = workspace().join(format!("connectors/legacy-{lang}"));
    let text = std::fs::read_to_string(dir.join("manifest.toml")).unwrap();
    assert!(
        text.contains("http://127.0.0.1:9100"),
        "the example manifest should target the simulator's documented port"
    );
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("component") {
            out.push_str(&format!(
                "component = {:?}\n",
                component.display().to_string()
            ));
        } else {
            out.push_str(&line.replace("http://127.0.0.1:9100", &sim.base_url()));
            out.push('\n');
        }
    }
    out
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn example_mirrors_sessions(lang: &str) {
    let component = build_example(lang).await;
    // Compiles the component into the compile cache the test servers share, so the server
    // below starts from a cache hit instead of compiling for seconds before it listens.
    concurrent_fresh_calls(lang, &component).await;
    let sim = legacy_sim::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("legacy-{lang}");
    std::fs::write(
        dir.path().join(format!("{name}.toml")),
        example_manifest(lang, &sim, &component),
    )
    .unwrap();
    let server = Server::start_with(
        Backend::Sqlite,
        ServerOptions {
            connectors_dir: Some(dir.path().to_owned()),
            config: Some(format!(
                "[realms.acme]\nevents_secrets = [\"{EVENTS_SECRET}\"]\n"
            )),
            ..ServerOptions::default()
        },
    )
    .await;

    // Loaded (a JavaScript or Python component compiles for seconds first).
    let deadline = tokio::time::Instant::now() + LOAD_TIMEOUT;
    loop {
        let (code, body) = server.admin_get(&format!("/admin/connectors/{name}")).await;
        if code == StatusCode::OK && body["state"] == "active" {
            // The JS and Python examples serve from warm instances; the Rust one need not.
            assert_eq!(body["reuseInstance"], lang != "rust", "{body}");
            assert_eq!(body["maxCallsPerInstance"], 1000, "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never loaded: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let api = server.api("acme");
    let parent = format!("portal-{lang}-1");
    let child = format!("service-{lang}-1");
    let (code, body) = api
        .post(
            "map-parent",
            json!({"externalId": parent, "keycloakSessionId": format!("kc-{lang}"), "userId": "alice"}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = api.map_child(&child, &parent).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    wait_until("legacy sessions created", SYNC_TIMEOUT, || {
        sim.sim.has(&parent) && sim.sim.has(&child)
    })
    .await;
    let legacy = sim.sim.sessions();
    let p = legacy.iter().find(|s| s.session_id == parent).unwrap();
    assert_eq!(p.user_id.as_deref(), Some("alice"));
    assert_eq!(p.realm.as_deref(), Some("acme"));
    assert_eq!(
        p.idp_session_id.as_deref(),
        Some(format!("kc-{lang}").as_str())
    );

    // Destroying the parent ends the child too, and both legacy sessions go.
    let (code, body) = api
        .post(
            "destroy-parent",
            json!({"externalId": parent, "reason": "logout"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    wait_until("legacy sessions deleted", SYNC_TIMEOUT, || {
        !sim.sim.has(&parent) && !sim.sim.has(&child)
    })
    .await;

    // The legacy system in maintenance (503): the connector asks for a retry, the host
    // retries, and the session arrives once it is back.
    sim.sim.fail_next(1);
    let later = format!("portal-{lang}-2");
    let (code, body) = api
        .post(
            "map-parent",
            json!({"externalId": later, "keycloakSessionId": format!("kc-{lang}-2"), "userId": "bob"}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    wait_until("retried login delivered", SYNC_TIMEOUT, || {
        sim.sim.has(&later)
    })
    .await;
    let deliveries = server
        .wait_deliveries(&format!("connector={name}"), SYNC_TIMEOUT, |items| {
            items
                .iter()
                .any(|d| d["externalId"] == later.as_str() && d["status"] == "delivered")
        })
        .await;
    let retried = deliveries
        .iter()
        .find(|d| d["externalId"] == later.as_str())
        .unwrap();
    assert!(
        retried["attempts"].as_u64().unwrap() >= 2,
        "the 503 should have cost an attempt: {retried}"
    );

    // Keycloak revokes the user's grants (REVOKE_GRANT through the event intake): the
    // connector's revoke hook deletes all of the user's legacy sessions.
    let revoke = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "REVOKE_GRANT",
        "realm": "acme",
        "time": chrono::Utc::now().timestamp_millis(),
        "userId": "bob",
        "clientId": "portal",
    });
    let (code, body) = server.post_event("acme", EVENTS_SECRET, &revoke).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"], 1, "{body}");
    wait_until("revoke reached the legacy system", SYNC_TIMEOUT, || {
        !sim.sim.has(&later)
    })
    .await;
    assert!(
        sim.sim
            .calls()
            .iter()
            .any(|c| c == "DELETE /api/v1/users/bob/sessions"),
        "{:?}",
        sim.sim.calls()
    );
    server.terminate(Duration::from_secs(20)).await;

    sustained_warm_calls(lang, &sim, &component).await;
}

/// As many concurrent calls as the runtime allows, each in a fresh instance: the pooling
/// allocator must hold that many instances of the language's component (a Python component
/// holds more than 16 core instances and tables). The runtime uses the test servers' compile
/// cache, which it fills.
async fn concurrent_fresh_calls(lang: &str, component: &Path) {
    use lockstep::domain::{EventType, SessionKind, SyncEvent};
    use lockstep::runtime::Runtime;
    use lockstep::runtime::manifest::Manifest;

    let runtime = Runtime::new(Some(workspace().join("target/test-compile-cache"))).unwrap();
    let text = format!(
        "name = \"{lang}-concurrent\"\ncomponent = {:?}\nmemory_mb = 64\ntimeout_ms = 60000\n",
        component.display().to_string()
    );
    let manifest = Manifest::parse(&text, Path::new("."), "concurrent").unwrap();
    let connector = runtime.load(manifest).await.unwrap();
    let calls = (0..lockstep::runtime::MAX_CONCURRENT_CALLS).map(|i| {
        let (runtime, connector) = (runtime.clone(), connector.clone());
        tokio::spawn(async move {
            let event = SyncEvent {
                event_id: format!("concurrent-{i}"),
                event_type: EventType::Refresh,
                realm: "acme".into(),
                external_id: format!("s-{i}"),
                kind: SessionKind::Parent,
                idp_session_id: None,
                idp_client_session_id: None,
                user_id: None,
                system: None,
                origin_system: None,
                end_reason: None,
                attributes: Default::default(),
                expires_at: None,
                occurred_at: chrono::Utc::now(),
            };
            runtime.call(&connector, &event).await
        })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(
            call.unwrap(),
            Ok(()),
            "{lang}: a concurrent fresh call failed"
        );
    }
}

/// 400 logins through one connector whose manifest says `reuse_instance = true` (the JS and
/// Python examples): every call succeeds, however much a warm instance keeps between calls
/// (the JavaScript engine leaves fetch handles to its garbage collector; without recycling
/// they filled the resource table after about a hundred calls).
async fn sustained_warm_calls(lang: &str, sim: &legacy_sim::Running, component: &Path) {
    let events: Vec<Value> = (0..400)
        .map(|i| json!({"type": "login", "externalId": format!("warm-{lang}-{i}"), "userId": "carol"}))
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&events).unwrap()).unwrap();
    let base = format!("base_url={}", sim.base_url());
    let out = lockstep(
        &workspace(),
        &[
            "connector",
            "test",
            component.to_str().unwrap(),
            "--events",
            file.path().to_str().unwrap(),
            "--config",
            &base,
            "--allow-host",
            &sim.base_url(),
            "--json",
        ],
    )
    .await;
    let stdout = must_succeed("400 warm calls", &out);
    assert_eq!(stdout.lines().count(), 400);
    assert_eq!(
        sim.sim
            .sessions()
            .iter()
            .filter(|s| s.session_id.starts_with(&format!("warm-{lang}-")))
            .count(),
        400
    );
}

/// `new` → `build` → `test`, typed as a user would in a fresh directory.
async fn new_build_test(lang: &str) {
    let sim = legacy_sim::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let name = format!("my-{lang}-connector");
    let out = lockstep(work.path(), &["connector", "new", "--lang", lang, &name]).await;
    let stdout = must_succeed("lockstep connector new", &out);
    assert!(stdout.contains("lockstep connector build"), "{stdout}");
    let project = work.path().join(&name);
    for file in [
        "manifest.toml",
        "events.json",
        "README.md",
        "wit/connector.wit",
    ] {
        assert!(
            project.join(file).is_file(),
            "{file} missing from the scaffold"
        );
    }
    // A second `new` over it is refused, not merged.
    let again = lockstep(work.path(), &["connector", "new", "--lang", lang, &name]).await;
    assert!(!again.status.success());

    let out = lockstep(&project, &["connector", "build"]).await;
    let stdout = must_succeed("lockstep connector build", &out);
    assert!(stdout.contains(&format!("{name}.wasm")), "{stdout}");

    // The template talks to the simulator at its documented address; point it at this one.
    let base = format!("base_url={}/api/v1", sim.base_url());
    let allow = sim.base_url();
    let wasm = format!("{name}.wasm");
    let test_args = |base: &str| connector_test_args(&wasm, base, &allow);
    // Each hook several times in a row, in a process of its own as a user reruns it: a trap
    // that comes one run in three is still a trap.
    for run in 0..HOOK_RUNS {
        let out = lockstep_owned(&project, &test_args(&base)).await;
        let stdout = must_succeed(&format!("lockstep connector test (run {run})"), &out);
        let calls = json_lines(&stdout);
        assert_eq!(calls.len(), 2, "{stdout}");
        for call in &calls {
            assert_eq!(call["outcome"], "ok", "{lang} run {run}: {call}");
        }
        // The sample login reached the legacy system over HTTP and was reported.
        let requests: Vec<&Value> = calls
            .iter()
            .flat_map(|c| c["requests"].as_array().unwrap())
            .collect();
        assert!(
            requests
                .iter()
                .any(|r| r["method"] == "POST" && r["outcome"] == "201"),
            "{stdout}"
        );
    }
    assert!(!sim.sim.calls().is_empty());

    // A host outside the allowlist is denied in the sandbox and reported as such; the hook
    // gets an error it handles (Rust and Python tell a denial apart and fail; JavaScript's
    // `fetch` only says "network error" and retries), never a trap, body or not.
    let out = lockstep(
        &project,
        &[
            "connector",
            "test",
            &wasm,
            "--events",
            "events.json",
            "--config",
            "base_url=http://127.0.0.1:9/api/v1",
            "--json",
        ],
    )
    .await;
    assert!(!out.status.success(), "a denied request must fail the run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"denied\""), "{stdout}");
    for call in json_lines(&stdout) {
        assert!(
            call["outcome"] == "retry" || call["outcome"] == "fail",
            "{lang}, denied host: {call}"
        );
    }

    // The legacy system goes down: every hook, with a body (the login's POST) or without
    // (the logout's DELETE), asks for a retry in every run, in every language.
    let addr = sim.addr;
    drop(sim);
    wait_until(
        "the legacy system refuses connections",
        SYNC_TIMEOUT,
        || std::net::TcpStream::connect(addr).is_err(),
    )
    .await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for run in 0..HOOK_RUNS {
        let out = lockstep_owned(&project, &test_args(&base)).await;
        assert!(
            !out.status.success(),
            "{lang} run {run}: calls to a system that is down must fail the run"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let calls = json_lines(&stdout);
        assert_eq!(calls.len(), 2, "{stdout}");
        for call in &calls {
            assert_eq!(
                call["outcome"], "retry",
                "{lang} run {run}: a legacy system that is down must mean a retry: {call}"
            );
            *seen
                .entry(call["hook"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(
        seen,
        std::collections::BTreeMap::from([
            ("on-login".to_owned(), HOOK_RUNS),
            ("on-logout".to_owned(), HOOK_RUNS),
        ])
    );

    signing_is_reached_from(lang, &project, &wasm).await;
}

/// The SDK's signing call reaches the host: `connector test` has no transmitter, so the
/// host refuses with its reason, which the SDK turns into a permanent failure.
async fn signing_is_reached_from(lang: &str, project: &Path, wasm: &str) {
    let (file, source) = match lang {
        "rust" => (
            "src/lib.rs",
            "use lockstep_connector::{Connector, HookError, SessionEvent, signing};\n\
             struct Signs;\n\
             impl Connector for Signs {\n\
                 fn on_login(_event: SessionEvent) -> Result<(), HookError> {\n\
                     signing::sign_event(\"urn:test\")?;\n\
                     Ok(())\n\
                 }\n\
             }\n\
             lockstep_connector::export_connector!(Signs);\n",
        ),
        "js" => (
            "src/connector.ts",
            "import { connector, signing } from \"./lockstep\";\n\
             export const hooks = connector({\n\
               async onLogin(_event) {\n\
                 signing.signEvent(\"urn:test\");\n\
               },\n\
             });\n",
        ),
        _ => (
            "app.py",
            "from lockstep import Connector, sign_event\n\n\n\
             class Hooks(Connector):\n\
             \x20   def on_login(self, event):\n\
             \x20       sign_event(\"urn:test\")\n",
        ),
    };
    std::fs::write(project.join(file), source).unwrap();
    let out = lockstep(project, &["connector", "build"]).await;
    must_succeed("lockstep connector build (signing)", &out);
    let out = lockstep(
        project,
        &[
            "connector",
            "test",
            wasm,
            "--events",
            "events.json",
            "--json",
        ],
    )
    .await;
    assert!(!out.status.success(), "an unsigned login must fail the run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let login = json_lines(&stdout)
        .into_iter()
        .find(|c| c["hook"] == "on-login")
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(login["outcome"], "fail", "{lang}: {login}");
    assert!(
        login["error"]
            .as_str()
            .unwrap()
            .contains("signing the event failed: signed events are not available"),
        "{lang}: {login}"
    );
}

/// `lockstep connector test` of `wasm` with the project's sample events, `config` (a
/// `key=value`) and one allowed origin, printing JSON lines.
fn connector_test_args(wasm: &str, config: &str, allow: &str) -> Vec<String> {
    [
        "connector",
        "test",
        wasm,
        "--events",
        "events.json",
        "--config",
        config,
        "--allow-host",
        allow,
        "--json",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// How often `new_build_test` runs each hook against the legacy system up, then down.
const HOOK_RUNS: usize = 5;

/// [`lockstep`] with owned arguments.
async fn lockstep_owned(cwd: &Path, args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lockstep(cwd, &args).await
}

/// The `--json` lines of `lockstep connector test`.
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_example_and_scaffold() {
    example_mirrors_sessions("rust").await;
    new_build_test("rust").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_example_and_scaffold() {
    example_mirrors_sessions("js").await;
    new_build_test("js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_and_scaffold() {
    example_mirrors_sessions("python").await;
    new_build_test("python").await;
}

/// A Rust project made by a copy of the binary in a directory outside the source tree builds
/// and loads: it carries the `lockstep-connector` crate and names no path outside itself, so
/// it builds on a machine that never had the source tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_scaffold_builds_outside_the_source_tree() {
    let work = tempfile::tempdir().unwrap();
    let source_tree = std::fs::canonicalize(workspace()).unwrap();
    let outside = std::fs::canonicalize(work.path()).unwrap();
    assert!(
        !outside.starts_with(&source_tree),
        "{} is inside the source tree",
        outside.display()
    );
    let bin = outside.join("bin/lockstep");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_lockstep"), &bin).unwrap();

    let out = lockstep_at(
        &bin,
        &outside,
        &["connector", "new", "--lang", "rust", "far"],
    )
    .await;
    must_succeed("lockstep connector new", &out);
    let project = outside.join("far");
    let cargo_toml = std::fs::read_to_string(project.join("Cargo.toml")).unwrap();
    assert!(
        cargo_toml.contains(r#"path = "vendor/lockstep-connector""#),
        "{cargo_toml}"
    );
    let mut dirs = vec![project.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    !text.contains(source_tree.to_str().unwrap()),
                    "{} names the source tree",
                    path.display()
                );
            }
        }
    }

    let out = lockstep_at(&bin, &project, &["connector", "build"]).await;
    let stdout = must_succeed("lockstep connector build", &out);
    assert!(stdout.contains("far.wasm"), "{stdout}");

    // Loaded in the sandbox, its hooks run and reach the legacy system.
    let sim = legacy_sim::start().await.unwrap();
    let base = format!("base_url={}/api/v1", sim.base_url());
    let args = connector_test_args("far.wasm", &base, &sim.base_url());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lockstep_at(&bin, &project, &args).await;
    let stdout = must_succeed("lockstep connector test", &out);
    let calls = json_lines(&stdout);
    assert_eq!(calls.len(), 2, "{stdout}");
    for call in &calls {
        assert_eq!(call["outcome"], "ok", "{call}");
    }
}
