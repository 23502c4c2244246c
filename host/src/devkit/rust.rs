//! Rust connectors: the template (a `cdylib` on the `lockstep-connector` crate, vendored into
//! the project) and the build (`cargo build --release --target wasm32-wasip2`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{DevkitError, Project, TemplateFile, Tools, WIT, run, write_file};

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

/// Where a new project gets its copy of the `lockstep-connector` crate. Until the crate has a
/// registry release, a project that named a version alone would not resolve, and one that
/// pointed at the source tree this binary was built from would build on that machine only.
pub const SDK_PATH: &str = "vendor/lockstep-connector";

/// The crate's sources; its WIT is [`WIT`], which is read from the crate's own `wit/`.
const SDK_SOURCES: &[TemplateFile] = &[
    ("src/lib.rs", include_str!("../../../sdk/rust/src/lib.rs")),
    (
        "src/cache.rs",
        include_str!("../../../sdk/rust/src/cache.rs"),
    ),
    (
        "src/config.rs",
        include_str!("../../../sdk/rust/src/config.rs"),
    ),
    ("src/http.rs", include_str!("../../../sdk/rust/src/http.rs")),
    ("src/json.rs", include_str!("../../../sdk/rust/src/json.rs")),
    ("src/log.rs", include_str!("../../../sdk/rust/src/log.rs")),
    (
        "src/signing.rs",
        include_str!("../../../sdk/rust/src/signing.rs"),
    ),
];

/// The crate's manifest inherits from the workspace, which a vendored copy does not have.
const SDK_MANIFEST: &str = include_str!("../../../sdk/rust/Cargo.toml");
const WORKSPACE_MANIFEST: &str = include_str!("../../../Cargo.toml");

/// The version of the vendored crate, which the template's dependency names.
pub fn sdk_version() -> Result<String, DevkitError> {
    let manifest = vendored_manifest()?;
    manifest
        .get("package")
        .and_then(|p| p.get("version"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| DevkitError::Sdk("its manifest has no package.version".into()))
}

/// Writes the `lockstep-connector` crate under `dir/`[`SDK_PATH`].
pub fn vendor_sdk(dir: &std::path::Path) -> Result<(), DevkitError> {
    let root = dir.join(SDK_PATH);
    let manifest = toml::to_string(&vendored_manifest()?)
        .map_err(|e| DevkitError::Sdk(format!("cannot write its manifest: {e}")))?;
    let manifest = format!(
        "# The lockstep-connector crate, vendored by `lockstep connector new`.\n\n{manifest}"
    );
    let files = SDK_SOURCES
        .iter()
        .chain(WIT)
        .copied()
        .chain([("Cargo.toml", manifest.as_str())]);
    for (path, text) in files {
        write_file(&root.join(path), text)?;
    }
    Ok(())
}

/// The crate's manifest with what it inherits from the workspace written out (package keys
/// and dependencies, as `cargo package` does) and without `[lints]`, which only the workspace
/// defines.
fn vendored_manifest() -> Result<toml::Table, DevkitError> {
    let parse = |text: &str, which: &str| {
        text.parse::<toml::Table>()
            .map_err(|e| DevkitError::Sdk(format!("{which} is not TOML: {e}")))
    };
    let mut crate_manifest = parse(SDK_MANIFEST, "sdk/rust/Cargo.toml")?;
    let workspace = parse(WORKSPACE_MANIFEST, "the workspace's Cargo.toml")?;
    let workspace = workspace.get("workspace").and_then(toml::Value::as_table);
    let inherited = |section: &str| {
        workspace
            .and_then(|w| w.get(section))
            .and_then(toml::Value::as_table)
    };
    crate_manifest.remove("lints");
    if let Some(package) = crate_manifest
        .get_mut("package")
        .and_then(toml::Value::as_table_mut)
    {
        for (key, value) in package.iter_mut() {
            if inherits(value) {
                *value = inherited("package")
                    .and_then(|p| p.get(key.as_str()))
                    .cloned()
                    .ok_or_else(|| {
                        DevkitError::Sdk(format!("the workspace has no package.{key}"))
                    })?;
            }
        }
    }
    for section in ["dependencies", "build-dependencies", "dev-dependencies"] {
        let Some(deps) = crate_manifest
            .get_mut(section)
            .and_then(toml::Value::as_table_mut)
        else {
            continue;
        };
        for (name, value) in deps.iter_mut() {
            if !inherits(value) {
                continue;
            }
            let mut dep = match inherited("dependencies").and_then(|d| d.get(name.as_str())) {
                Some(toml::Value::String(version)) => {
                    toml::Table::from_iter([("version".to_owned(), version.clone().into())])
                }
                Some(toml::Value::Table(dep)) => dep.clone(),
                _ => {
                    return Err(DevkitError::Sdk(format!(
                        "the workspace has no dependency {name}"
                    )));
                }
            };
            // The member's own keys add to the workspace's (`features`) or set their own.
            for (key, own) in value.as_table().into_iter().flatten() {
                match (key.as_str(), dep.get_mut(key.as_str()), own) {
                    ("workspace", _, _) => {}
                    ("features", Some(toml::Value::Array(all)), toml::Value::Array(more)) => {
                        all.extend(more.iter().cloned());
                    }
                    _ => {
                        dep.insert(key.clone(), own.clone());
                    }
                }
            }
            *value = toml::Value::Table(dep);
        }
    }
    Ok(crate_manifest)
}

/// `{ workspace = true }`, the value of a key inherited from the workspace.
fn inherits(value: &toml::Value) -> bool {
    value.get("workspace").and_then(toml::Value::as_bool) == Some(true)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of the crate is vendored: a file added to `sdk/rust/src/` or its `wit/` and
    /// not listed here would leave new projects without it.
    #[test]
    fn vendored_sdk_lists_every_file_of_the_crate() {
        let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/rust");
        let mut on_disk = Vec::new();
        let mut dirs = vec![sdk.join("src"), sdk.join("wit")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let rel = path.strip_prefix(&sdk).unwrap();
                    on_disk.push(rel.to_str().unwrap().replace('\\', "/"));
                }
            }
        }
        let mut listed: Vec<String> = SDK_SOURCES
            .iter()
            .chain(WIT)
            .map(|(path, _)| (*path).to_owned())
            .collect();
        on_disk.sort();
        listed.sort();
        assert_eq!(listed, on_disk);
    }

    #[test]
    fn vendored_manifest_stands_alone() {
        let manifest = vendored_manifest().unwrap();
        let text = toml::to_string(&manifest).unwrap();
        assert!(!text.contains("workspace"), "{text}");
        assert_eq!(
            manifest["package"]["name"].as_str(),
            Some("lockstep-connector")
        );
        assert_eq!(sdk_version().unwrap(), env!("CARGO_PKG_VERSION"));
        for dep in ["wit-bindgen", "serde_json", "wasip2"] {
            assert!(
                manifest["dependencies"][dep]["version"].is_str(),
                "{dep}: {text}"
            );
        }
    }
}
