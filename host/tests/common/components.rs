//! Paths of the real connector components the tests load. They are built from
//! `connectors/` and `tests/fixtures/` by `cargo xtask build-connectors` (which
//! `scripts/test.sh` runs first).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use super::receiver::Receiver;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn component(name: &str) -> PathBuf {
    let path = workspace()
        .join("target/wasm32-wasip2/connector")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build-connectors` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Writes a manifest for `component` into `dir` and returns its path.
pub fn write_manifest(
    dir: &std::path::Path,
    name: &str,
    component_name: &str,
    extra: &str,
) -> PathBuf {
    testkit::manifest::write_manifest(dir, name, &component(component_name), extra).unwrap()
}

/// Writes a manifest for a webhook connector `name` in realm `acme` that posts to
/// `receiver` at `/{name}` (signing with the secret `s3cret`), with `extra` settings and a
/// `policy` table (either may be empty).
pub fn webhook_manifest(dir: &Path, name: &str, receiver: &Receiver, extra: &str, policy: &str) {
    webhook_manifest_in(
        dir,
        name,
        &["acme"],
        receiver,
        &format!("timeout_ms = 2000\n{extra}\n{policy}"),
        "secret = \"s3cret\"\n",
    );
}

/// Writes a manifest for an unsigned webhook connector `name` that gets the events of
/// `realms` and posts them to `receiver` at `/{name}`; `extra` goes before `[config]`
/// (top-level settings first, then tables such as `[policy]`).
pub fn unsigned_webhook_manifest(
    dir: &Path,
    name: &str,
    realms: &[&str],
    receiver: &Receiver,
    extra: &str,
) {
    webhook_manifest_in(dir, name, realms, receiver, extra, "");
}

/// A webhook manifest: `extra` before `[config]`, `config` after its `url`.
fn webhook_manifest_in(
    dir: &Path,
    name: &str,
    realms: &[&str],
    receiver: &Receiver,
    extra: &str,
    config: &str,
) {
    let realms: Vec<String> = realms.iter().map(|r| format!("{r:?}")).collect();
    write_manifest(
        dir,
        name,
        "webhook",
        &format!(
            "realms = [{}]\nallowed_hosts = [\"{}\"]\n{extra}\n[config]\nurl = \"{}\"\n{config}",
            realms.join(", "),
            receiver.origin(),
            receiver.url(&format!("/{name}"))
        ),
    );
}
