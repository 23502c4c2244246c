//! Python connectors: the template (`sdk/python/template/` plus the vendored SDK,
//! `sdk/python/lockstep.py`) and the build: componentize-py (the Bytecode Alliance's
//! CPython-based toolchain) turns `app.py` into a component of the
//! `lockstep:connector/connector@0.3.0` world.
//!
//! The component is built without `--stub-wasi`: that flag also stubs wasi:http, which the
//! SDK's `http` needs. CPython then imports wasi:filesystem, wasi:cli/environment and
//! wasi:sockets; the host links them but grants nothing (no preopens, no environment, no
//! sockets), as for every connector.

use std::path::PathBuf;
use std::process::Command;

use super::{DevkitError, Project, TemplateFile, Tools, run};

/// The Python template.
pub const TEMPLATE: &[TemplateFile] = &[
    (
        "app.py",
        include_str!("../../../sdk/python/template/app.py"),
    ),
    ("lockstep.py", SDK),
    (
        "manifest.toml",
        include_str!("../../../sdk/python/template/manifest.toml"),
    ),
    (
        "events.json",
        include_str!("../../../sdk/python/template/events.json"),
    ),
    (
        "README.md",
        include_str!("../../../sdk/python/template/README.md"),
    ),
    (".gitignore", "/build\n*.wasm\n__pycache__\n"),
];

/// The SDK module, given to projects that do not carry their own copy (the examples here).
const SDK: &str = include_str!("../../../sdk/python/lockstep.py");

const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// The folder of this toolchain under the tools directory (a venv, named by its version).
const TOOLCHAIN: &str = "componentize-py-0.25.1";
/// Written last by an install, so a half-finished one is recognised and redone.
const MARKER: &str = ".lockstep-installed";

/// Builds `app.py` into the component the manifest names.
pub fn build(project: &Project, tools: &Tools) -> Result<(), DevkitError> {
    if !project.dir.join("app.py").is_file() {
        return Err(DevkitError::Usage(format!(
            "{} has no app.py (its Hooks class is the connector)",
            project.dir.display()
        )));
    }
    let venv = ensure_toolchain(tools)?;
    let wit = super::wit_dir(project)?;
    let mut cmd = Command::new(venv.join("bin/componentize-py"));
    cmd.arg("--wit-path")
        .arg(&wit)
        .args([
            "--world",
            "lockstep:connector/connector@0.3.0",
            "componentize",
            "app",
        ])
        .arg("--python-path")
        .arg(&project.dir);
    if !project.dir.join("lockstep.py").is_file() {
        let sdk = project.dir.join("build/sdk");
        std::fs::create_dir_all(&sdk).map_err(|source| DevkitError::Io {
            path: sdk.clone(),
            source,
        })?;
        let file = sdk.join("lockstep.py");
        std::fs::write(&file, SDK).map_err(|source| DevkitError::Io { path: file, source })?;
        cmd.arg("--python-path").arg(&sdk);
    }
    cmd.arg("--output").arg(&project.component);
    run(&mut cmd, "componentize-py")
}

/// The toolchain's venv, created and filled on first use.
fn ensure_toolchain(tools: &Tools) -> Result<PathBuf, DevkitError> {
    let venv = tools.dir.join(TOOLCHAIN);
    if venv.join(MARKER).is_file() && venv.join("bin/componentize-py").is_file() {
        return Ok(venv);
    }
    check_python()?;
    // A venv cannot be moved (its scripts name their interpreter by path), so it is made in
    // place and marked complete at the end; anything unmarked is a failed install.
    let _ = std::fs::remove_dir_all(&venv);
    eprintln!("installing {COMPONENTIZE_PY} into {}", venv.display());
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv (the Python toolchain)",
    )?;
    run(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            COMPONENTIZE_PY,
        ]),
        "pip install componentize-py",
    )?;
    let marker = venv.join(MARKER);
    std::fs::write(&marker, COMPONENTIZE_PY).map_err(|source| DevkitError::Io {
        path: marker,
        source,
    })?;
    Ok(venv)
}

fn check_python() -> Result<(), DevkitError> {
    let ok = Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(())
    } else {
        Err(DevkitError::Tool {
            what: "python3 -m venv".into(),
            detail: "Python 3.10 or newer with venv is needed to build Python connectors \
                     (Debian: apt-get install python3 python3-venv)"
                .into(),
        })
    }
}
