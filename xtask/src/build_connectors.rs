//! `cargo xtask build-connectors`: builds every connector component of the workspace (the
//! `cdylib` packages under `connectors/` and `tests/fixtures/`) for `wasm32-wasip2` with the
//! `connector` profile, so each lands at `target/wasm32-wasip2/connector/<name>.wasm`, the
//! path the host's tests and examples load.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{target_dir, workspace_root};
use serde_json::Value;

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "connector";
/// Workspace folders whose `cdylib` packages are connector components.
const COMPONENT_DIRS: [&str; 2] = ["connectors", "tests/fixtures"];

/// Options of `cargo xtask build-connectors`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Build only these packages (default: every component package).
    #[arg(long = "package", short = 'p')]
    packages: Vec<String>,
}

pub fn main(args: Args) -> Result<()> {
    let root = workspace_root()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let packages = if args.packages.is_empty() {
        component_packages(&cargo, &root)?
    } else {
        args.packages
    };
    if packages.is_empty() {
        bail!(
            "no component packages found under {}",
            COMPONENT_DIRS.join(", ")
        );
    }
    ensure_target()?;
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        .args(["build", "--profile", PROFILE, "--target", TARGET]);
    for p in &packages {
        cmd.args(["-p", p]);
    }
    eprintln!(
        "building components: {} (--profile {PROFILE} --target {TARGET})",
        packages.join(", ")
    );
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building the components failed: {status}");
    }
    let out = target_dir(&root).join(TARGET).join(PROFILE);
    let dist = root.join("dist/connectors");
    for p in &packages {
        let wasm = out.join(format!("{}.wasm", p.replace('-', "_")));
        if !wasm.is_file() {
            bail!("{} is missing after the build", wasm.display());
        }
        println!("{}", wasm.display());
        // Bundled connectors (not test fixtures) are also published to dist/connectors/.
        if root.join("connectors").join(p).is_dir() {
            std::fs::create_dir_all(&dist)
                .with_context(|| format!("creating {}", dist.display()))?;
            let to = dist.join(format!("{p}.wasm"));
            std::fs::copy(&wasm, &to)
                .with_context(|| format!("copying {} to {}", wasm.display(), to.display()))?;
            println!("{}", to.display());
        }
    }
    Ok(())
}

/// Workspace members under [`COMPONENT_DIRS`] with a `cdylib` target, from `cargo metadata`.
fn component_packages(cargo: &std::ffi::OsStr, root: &Path) -> Result<Vec<String>> {
    let output = Command::new(cargo)
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let meta: Value =
        serde_json::from_slice(&output.stdout).context("parsing cargo metadata output")?;
    let dirs: Vec<PathBuf> = COMPONENT_DIRS.iter().map(|d| root.join(d)).collect();
    let mut names = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        let manifest = Path::new(pkg["manifest_path"].as_str().unwrap_or_default());
        let is_cdylib = pkg["targets"].as_array().into_iter().flatten().any(|t| {
            t["crate_types"]
                .as_array()
                .is_some_and(|c| c.iter().any(|k| k == "cdylib"))
        });
        if is_cdylib
            && dirs.iter().any(|d| manifest.starts_with(d))
            && let Some(name) = pkg["name"].as_str()
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// `rustup target add wasm32-wasip2` when rustup is there and the target is not.
fn ensure_target() -> Result<()> {
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
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .context("running rustup target add")?;
    if !status.success() {
        bail!("rustup target add {TARGET} failed: {status}");
    }
    Ok(())
}
