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
    write_manifest(
        dir,
        name,
        "webhook",
        &format!(
            "realms = [\"acme\"]\nallowed_hosts = [\"{}\"]\ntimeout_ms = 2000\n{extra}\n{policy}\n[config]\nurl = \"{}\"\nsecret = \"s3cret\"\n",
            receiver.origin(),
            receiver.url(&format!("/{name}"))
        ),
    );
}
