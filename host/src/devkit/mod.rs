//! The connector author's local loop: `lockstep connector new|build|test`. Scaffolds a
//! connector from a language template, builds it into a component with that language's
//! toolchain (installed on first use into the tools directory), and runs its hooks against
//! sample events in the host's real sandbox. It knows nothing of the database or the API.

pub mod harness;
pub mod js;
pub mod python;
pub mod rust;

use std::path::{Path, PathBuf};
use std::process::Command;

/// What went wrong in a devkit command; every message tells the author what to do.
#[derive(Debug, thiserror::Error)]
pub enum DevkitError {
    /// Bad input from the author (a name, a flag, a missing file).
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        source: std::io::Error,
    },
    /// The SDK this binary carries cannot be written out (a fault of the build, not of the
    /// author's input).
    #[error("the Lockstep SDK this binary carries: {0}")]
    Sdk(String),
    /// A tool (cargo, npm, node, python, componentize-*) is missing or failed.
    #[error("{what} failed: {detail}")]
    Tool {
        /// The step, e.g. `npm install @bytecodealliance/componentize-js@0.23.0`.
        what: String,
        /// Exit status and the tail of its output, or why it could not start.
        detail: String,
    },
}

/// Connector languages with a template and a build recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with the `lockstep-connector` crate (`sdk/rust`).
    Rust,
    /// JavaScript or TypeScript, built with componentize-js.
    Js,
    /// Python, built with componentize-py.
    Python,
}

impl Lang {
    /// The language of the project in `dir`, from the file its template always has.
    pub fn detect(dir: &Path) -> Option<Lang> {
        if dir.join("Cargo.toml").is_file() {
            Some(Lang::Rust)
        } else if dir.join("package.json").is_file() {
            Some(Lang::Js)
        } else if dir.join("app.py").is_file() {
            Some(Lang::Python)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Lang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lang::Rust => "rust",
            Lang::Js => "js",
            Lang::Python => "python",
        })
    }
}

/// A connector project on disk: its directory, its name and the component its manifest names.
#[derive(Clone, Debug)]
pub struct Project {
    /// The project directory (holds `manifest.toml`).
    pub dir: PathBuf,
    /// The connector's name (`name` in `manifest.toml`).
    pub name: String,
    /// Where the built component goes (`component` in `manifest.toml`, relative to `dir`).
    pub component: PathBuf,
}

/// Where the language toolchains are installed (componentize-js, componentize-py, esbuild):
/// `LOCKSTEP_TOOLS_DIR`, default `~/.cache/lockstep/tools`. Each tool lives in a folder named
/// with its pinned version, so an upgrade never reuses a stale install.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The root folder.
    pub dir: PathBuf,
}

/// A file of a template: its path in the new project and its text, in which `{{name}}`,
/// `{{name_snake}}`, `{{sdk_path}}` and `{{sdk_version}}` are replaced.
pub type TemplateFile = (&'static str, &'static str);

/// Runs `cmd`, passing its output through; a failure names `what`.
pub fn run(cmd: &mut Command, what: &str) -> Result<(), DevkitError> {
    let status = cmd.status().map_err(|e| DevkitError::Tool {
        what: what.to_owned(),
        detail: format!("cannot start {:?}: {e}", cmd.get_program()),
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(DevkitError::Tool {
            what: what.to_owned(),
            detail: format!("{status} (its output is above)"),
        })
    }
}

/// `lockstep connector ...`: the connector author's commands.
#[derive(Debug, clap::Args)]
pub struct ConnectorArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ConnectorCommand,
}

/// The devkit's subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConnectorCommand {
    /// Create a connector project from a language template (with the WIT contract, a manifest,
    /// sample events and a README).
    New {
        /// Template language.
        #[arg(long, value_enum)]
        lang: Lang,
        /// Connector name: 1-64 of [a-z0-9-], starting with a letter. Also the directory.
        name: String,
        /// Where to create the project (default: ./NAME). Must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A Lockstep `sdk/` directory for a Rust project to depend on (`sdk/rust`, by path)
        /// instead of the copy of the `lockstep-connector` crate vendored into the project;
        /// for work on the SDK itself.
        #[arg(long, env = "LOCKSTEP_SDK_DIR")]
        sdk_dir: Option<PathBuf>,
    },
    /// Build the project in DIR (default: the current directory) into the component its
    /// `manifest.toml` names, installing the language's pinned toolchain on first use.
    Build {
        /// The project directory (holds manifest.toml).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Where toolchains are installed (default: ~/.cache/lockstep/tools).
        #[arg(long, env = "LOCKSTEP_TOOLS_DIR")]
        tools_dir: Option<PathBuf>,
    },
    /// Run a component's hooks against sample events in the host's real sandbox (same
    /// limits and allowed_hosts as `serve`) and print each call's result, logs and outgoing
    /// HTTP requests. Exits 1 if any call failed.
    Test(harness::TestArgs),
}

/// Runs a devkit command.
pub async fn execute(args: ConnectorArgs) -> anyhow::Result<()> {
    match args.command {
        ConnectorCommand::New {
            lang,
            name,
            dir,
            sdk_dir,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            scaffold(lang, &name, &dir, sdk_dir)?;
            println!("created {lang} connector {name} in {}", dir.display());
            println!("next:");
            println!("  cd {}", dir.display());
            println!("  lockstep connector build");
            println!("  lockstep connector test {name}.wasm --events events.json");
            Ok(())
        }
        ConnectorCommand::Build { dir, tools_dir } => {
            let tools = Tools::new(tools_dir)?;
            let project = Project::open(&dir)?;
            let lang = Lang::detect(&project.dir).ok_or_else(|| {
                DevkitError::Usage(format!(
                    "{} is not a connector project: no Cargo.toml, package.json or app.py \
                     (create one with `lockstep connector new`)",
                    project.dir.display()
                ))
            })?;
            let started = std::time::Instant::now();
            match lang {
                Lang::Rust => rust::build(&project, &tools)?,
                Lang::Js => js::build(&project, &tools)?,
                Lang::Python => python::build(&project, &tools)?,
            }
            let size = std::fs::metadata(&project.component)
                .map_err(|source| DevkitError::Io {
                    path: project.component.clone(),
                    source,
                })?
                .len();
            println!(
                "built {} ({lang}): {} ({:.1} KiB) in {:.1} s",
                project.name,
                project.component.display(),
                size as f64 / 1024.0,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        ConnectorCommand::Test(args) => harness::run(args).await,
    }
}

impl Tools {
    /// `dir`, or `LOCKSTEP_TOOLS_DIR`'s default: `$XDG_CACHE_HOME/lockstep/tools` or
    /// `~/.cache/lockstep/tools`.
    pub fn new(dir: Option<PathBuf>) -> Result<Self, DevkitError> {
        let dir = match dir {
            Some(d) => d,
            None => {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .ok_or_else(|| {
                        DevkitError::Usage(
                            "no HOME: set LOCKSTEP_TOOLS_DIR (or --tools-dir) to a writable folder"
                                .into(),
                        )
                    })?;
                cache.join("lockstep/tools")
            }
        };
        std::fs::create_dir_all(&dir).map_err(|source| DevkitError::Io {
            path: dir.clone(),
            source,
        })?;
        let dir = std::path::absolute(&dir).map_err(|source| DevkitError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Tools { dir })
    }
}

impl Project {
    /// The project in `dir`, from its `manifest.toml`; paths are absolute.
    pub fn open(dir: &Path) -> Result<Self, DevkitError> {
        let dir = std::path::absolute(dir).map_err(|source| DevkitError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("manifest.toml");
        if !path.is_file() {
            return Err(DevkitError::Usage(format!(
                "{} has no manifest.toml: run `lockstep connector build` in a project made by \
                 `lockstep connector new`, or pass its directory",
                dir.display()
            )));
        }
        let manifest = crate::runtime::manifest::Manifest::load(&path)
            .map_err(|e| DevkitError::Usage(e.to_string()))?;
        Ok(Project {
            dir,
            name: manifest.name,
            component: manifest.component,
        })
    }
}

/// The rule for names of new projects: they become a file name, a Rust crate, an npm package
/// and a Python-friendly folder, so lower case, digits and dashes.
pub fn check_project_name(name: &str) -> Result<(), DevkitError> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(DevkitError::Usage(format!(
            "connector name {name:?} must be 1-64 characters of [a-z0-9-], start with a letter \
             and not end with '-'"
        )))
    }
}

/// The WIT contract every new project gets a copy of (`wit/`), so it builds without the
/// Lockstep source tree. Its one source is the Rust SDK's `wit/`, which the crate needs inside
/// it to be packaged.
pub const WIT: &[TemplateFile] = &[
    (
        "wit/connector.wit",
        include_str!("../../../sdk/rust/wit/connector.wit"),
    ),
    (
        "wit/deps/lockstep-connector@0.1.0/connector.wit",
        include_str!("../../../sdk/rust/wit/deps/lockstep-connector@0.1.0/connector.wit"),
    ),
    (
        "wit/deps/lockstep-connector@0.2.0/connector.wit",
        include_str!("../../../sdk/rust/wit/deps/lockstep-connector@0.2.0/connector.wit"),
    ),
    (
        "wit/deps/cli/cli.wit",
        include_str!("../../../sdk/rust/wit/deps/cli/cli.wit"),
    ),
    (
        "wit/deps/clocks/clocks.wit",
        include_str!("../../../sdk/rust/wit/deps/clocks/clocks.wit"),
    ),
    (
        "wit/deps/filesystem/filesystem.wit",
        include_str!("../../../sdk/rust/wit/deps/filesystem/filesystem.wit"),
    ),
    (
        "wit/deps/http/http.wit",
        include_str!("../../../sdk/rust/wit/deps/http/http.wit"),
    ),
    (
        "wit/deps/io/io.wit",
        include_str!("../../../sdk/rust/wit/deps/io/io.wit"),
    ),
    (
        "wit/deps/random/random.wit",
        include_str!("../../../sdk/rust/wit/deps/random/random.wit"),
    ),
    (
        "wit/deps/sockets/sockets.wit",
        include_str!("../../../sdk/rust/wit/deps/sockets/sockets.wit"),
    ),
];

/// Writes a new project: the template of `lang` and the WIT contract.
pub fn scaffold(
    lang: Lang,
    name: &str,
    dir: &Path,
    sdk_dir: Option<PathBuf>,
) -> Result<(), DevkitError> {
    check_project_name(name)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DevkitError::Io { path, source }
    };
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
        if entries.next().is_some() {
            return Err(DevkitError::Usage(format!(
                "{} exists and is not empty; choose another name or --dir",
                dir.display()
            )));
        }
    }
    let template = match lang {
        Lang::Rust => rust::TEMPLATE,
        Lang::Js => js::TEMPLATE,
        Lang::Python => python::TEMPLATE,
    };
    // A Rust project depends on the crate by path: its vendored copy, or a checkout given
    // with `--sdk-dir`.
    let vendor_sdk = lang == Lang::Rust && sdk_dir.is_none();
    let (sdk_path, sdk_version) = match (lang, sdk_dir) {
        (Lang::Rust, Some(sdk)) => {
            let sdk = std::fs::canonicalize(&sdk).map_err(io(&sdk))?;
            if !sdk.join("rust/Cargo.toml").is_file() {
                return Err(DevkitError::Usage(format!(
                    "{} has no rust/Cargo.toml: --sdk-dir must be the Lockstep sdk/ folder",
                    sdk.display()
                )));
            }
            (sdk.join("rust").display().to_string(), rust::sdk_version()?)
        }
        (Lang::Rust, None) => (rust::SDK_PATH.to_owned(), rust::sdk_version()?),
        (Lang::Js | Lang::Python, _) => (String::new(), String::new()),
    };
    for (path, text) in template.iter().chain(WIT) {
        let text = text
            .replace("{{name}}", name)
            .replace("{{name_snake}}", &name.replace('-', "_"))
            .replace("{{sdk_path}}", &sdk_path)
            .replace("{{sdk_version}}", &sdk_version);
        write_file(&dir.join(path), &text)?;
    }
    if vendor_sdk {
        rust::vendor_sdk(dir)?;
    }
    Ok(())
}

/// The WIT folder a build uses: the project's `wit/`, or, for a project without one (the
/// examples in this repository), the contract this binary carries, written to `build/wit/`.
pub fn wit_dir(project: &Project) -> Result<PathBuf, DevkitError> {
    let own = project.dir.join("wit");
    if own.join("connector.wit").is_file() {
        return Ok(own);
    }
    let build = project.dir.join("build");
    for (path, text) in WIT {
        write_file(&build.join(path), text)?;
    }
    Ok(build.join("wit"))
}

/// Writes `text` to `path`, creating its folders.
pub fn write_file(path: &Path, text: &str) -> Result<(), DevkitError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DevkitError::Io { path, source }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::write(path, text).map_err(io(path))
}
