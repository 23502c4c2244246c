//! JavaScript/TypeScript connectors: the template (`sdk/js/template/` plus the vendored SDK,
//! `sdk/js/src/`) and the build: esbuild bundles `src/connector.ts` (or `.js`) into one ES
//! module, and componentize-js (the Bytecode Alliance's SpiderMonkey-based toolchain) turns
//! it into a component of the `lockstep:connector/connector@0.3.0` world.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{DevkitError, Project, TemplateFile, Tools, run};

/// The JavaScript/TypeScript template.
pub const TEMPLATE: &[TemplateFile] = &[
    (
        "package.json",
        include_str!("../../../sdk/js/template/package.json"),
    ),
    (
        "tsconfig.json",
        include_str!("../../../sdk/js/template/tsconfig.json"),
    ),
    (
        "src/connector.ts",
        include_str!("../../../sdk/js/template/src/connector.ts"),
    ),
    (
        "src/lockstep.ts",
        include_str!("../../../sdk/js/src/lockstep.ts"),
    ),
    (
        "src/host.d.ts",
        include_str!("../../../sdk/js/src/host.d.ts"),
    ),
    (
        "manifest.toml",
        include_str!("../../../sdk/js/template/manifest.toml"),
    ),
    (
        "events.json",
        include_str!("../../../sdk/js/template/events.json"),
    ),
    (
        "README.md",
        include_str!("../../../sdk/js/template/README.md"),
    ),
    (".gitignore", "/build\n*.wasm\nnode_modules\n"),
];

/// Pinned toolchain: componentize-js (which builds with its bundled StarlingMonkey engine and
/// wizer) and esbuild (bundling and TypeScript stripping).
const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";
const ESBUILD: &str = "esbuild@0.25.12";
/// The folder of this toolchain under the tools directory (named by its versions).
const TOOLCHAIN: &str = "componentize-js-0.23.0-esbuild-0.25.12";

/// WASI features the component does not need: no stdio (logs go through `host.log`), no
/// randomness, no incoming-HTTP handler. `http` stays: `fetch` runs over wasi:http, which
/// the host filters by `allowed_hosts`.
const DISABLED_FEATURES: [&str; 3] = ["stdio", "random", "fetch-event"];

/// Bundles and componentizes the project.
pub fn build(project: &Project, tools: &Tools) -> Result<(), DevkitError> {
    let toolchain = ensure_toolchain(tools)?;
    let entry = ["src/connector.ts", "src/connector.js"]
        .iter()
        .map(|p| project.dir.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            DevkitError::Usage(format!(
                "{} has no src/connector.ts or src/connector.js",
                project.dir.display()
            ))
        })?;
    let wit = super::wit_dir(project)?;
    let bundle = project.dir.join("build/connector.js");
    run(
        // The native binary once esbuild's install step placed it, else a node shim with a
        // shebang: either runs directly.
        Command::new(toolchain.join("node_modules/esbuild/bin/esbuild"))
            .arg(&entry)
            .args([
                "--bundle",
                "--format=esm",
                "--platform=neutral",
                "--target=es2022",
                // Resolved by componentize-js against the WIT world, not bundled.
                "--external:lockstep:*",
                "--log-level=warning",
            ])
            .arg(format!("--outfile={}", bundle.display())),
        "esbuild (bundling the connector)",
    )?;
    let mut componentize = Command::new("node");
    componentize
        .arg(toolchain.join("node_modules/@bytecodealliance/componentize-js/src/cli.js"))
        .arg(&bundle)
        .arg("--wit")
        .arg(&wit)
        .args([
            "--world-name",
            "lockstep:connector/connector@0.3.0",
            "--disable",
        ])
        .args(DISABLED_FEATURES)
        .arg("--out")
        .arg(&project.component);
    run(&mut componentize, "componentize-js")
}

/// The installed toolchain folder, installing it first if it is not there. The install goes
/// to a temporary folder renamed into place, so an interrupted or concurrent install never
/// leaves a half-installed toolchain behind.
fn ensure_toolchain(tools: &Tools) -> Result<PathBuf, DevkitError> {
    let dir = tools.dir.join(TOOLCHAIN);
    if installed(&dir) {
        return Ok(dir);
    }
    check_node()?;
    let staging = tools
        .dir
        .join(format!("{TOOLCHAIN}.installing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|source| DevkitError::Io {
        path: staging.clone(),
        source,
    })?;
    eprintln!(
        "installing {COMPONENTIZE_JS} and {ESBUILD} into {}",
        dir.display()
    );
    let installed_ok = run(
        Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
            ])
            .arg(&staging)
            .args([COMPONENTIZE_JS, ESBUILD]),
        "npm install (the JavaScript toolchain)",
    );
    if let Err(e) = installed_ok {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    match std::fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        // Someone else finished first: use theirs.
        Err(_) if installed(&dir) => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(dir)
        }
        Err(source) => Err(DevkitError::Io { path: dir, source }),
    }
}

fn installed(dir: &Path) -> bool {
    dir.join("node_modules/@bytecodealliance/componentize-js/src/cli.js")
        .is_file()
        && dir.join("node_modules/esbuild/bin/esbuild").is_file()
}

fn check_node() -> Result<(), DevkitError> {
    for tool in ["node", "npm"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(DevkitError::Tool {
                what: format!("{tool} --version"),
                detail: format!(
                    "{tool} is needed to build JavaScript connectors: install Node.js 20 or \
                     newer with npm (Debian: apt-get install nodejs npm)"
                ),
            });
        }
    }
    Ok(())
}
