//! Paths of the real connector components the tests load. They are built from
//! `connectors/` and `tests/fixtures/` by `cargo xtask build-connectors` (which
//! `scripts/test.sh` runs first).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

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
