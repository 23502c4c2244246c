//! Rust connectors: the template (a `cdylib` on the `lockstep-connector` crate) and the build
//! (`cargo build --release --target wasm32-wasip2`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{DevkitError, Project, TemplateFile, Tools, run};

/// The Rust template (`sdk/rust/template/`).
pub const TEMPLATE: &[TemplateFile] = &[
    (
        "Cargo.toml",
        include_str!("../../../sdk/rust/template/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../sdk/rust/template/src/lib.rs"),
    ),
    (
        "manifest.toml",
        include_str!("../../../sdk/rust/template/manifest.toml"),
    ),
    (
        "events.json",
        include_str!("../../../sdk/rust/template/events.json"),
    ),
    (
        "README.md",
        include_str!("../../../sdk/rust/template/README.md"),
    ),
    (".gitignore", "/target\n*.wasm\n"),
];

const TARGET: &str = "wasm32-wasip2";

/// Builds the crate for `wasm32-wasip2` (adding the target with rustup when it is missing)
/// and copies the component to where the manifest expects it.
pub fn build(project: &Project, _tools: &Tools) -> Result<(), DevkitError> {
    ensure_target()?;
    let manifest_path = project.dir.join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        // Small components load fast: no debug info or symbols, even where a workspace's
        // release profile keeps them for its native binaries.
        .args(["--config", "profile.release.debug=false"])
        .args(["--config", "profile.release.strip=true"])
        .arg("--manifest-path")
        .arg(&manifest_path)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| DevkitError::Tool {
            what: "cargo build".into(),
            detail: format!("cannot start cargo: {e} (install Rust with rustup)"),
        })?;
    if !output.status.success() {
        return Err(DevkitError::Tool {
            what: "cargo build".into(),
            detail: format!("{} (its output is above)", output.status),
        });
    }
    let wasm =
        built_component(&output.stdout, &manifest_path).ok_or_else(|| DevkitError::Tool {
            what: "cargo build".into(),
            detail: "it reported no .wasm for the crate; is its [lib] crate-type [\"cdylib\"]?"
                .into(),
        })?;
    std::fs::copy(&wasm, &project.component).map_err(|source| DevkitError::Io {
        path: project.component.clone(),
        source,
    })?;
    Ok(())
}

/// The `.wasm` cargo produced for the package of `manifest_path`, from its JSON messages.
fn built_component(messages: &[u8], manifest_path: &std::path::Path) -> Option<PathBuf> {
    let wanted = std::fs::canonicalize(manifest_path).ok()?;
    let mut found = None;
    for line in messages.split(|b| *b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let same = msg["manifest_path"]
            .as_str()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .is_some_and(|p| p == wanted);
        if !same {
            continue;
        }
        for file in msg["filenames"].as_array().into_iter().flatten() {
            if let Some(f) = file.as_str().filter(|f| f.ends_with(".wasm")) {
                found = Some(PathBuf::from(f));
            }
        }
    }
    found
}

/// `rustup target add wasm32-wasip2` when rustup is there and the target is not.
fn ensure_target() -> Result<(), DevkitError> {
    let Ok(out) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        return Ok(()); // no rustup: the toolchain manages its own targets
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    run(
        Command::new("rustup").args(["target", "add", TARGET]),
        "rustup target add wasm32-wasip2",
    )
}
