//! `lockstep connectors ...`: a thin client of the admin API for operators (list, show,
//! load, remove, enable, disable). It talks HTTP to a running instance and prints what the
//! API answers; the rules live on the server.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::runtime::manifest::Manifest;

/// Where the service is and who is asking.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Base URL of a running Lockstep.
    #[arg(
        long,
        env = "LOCKSTEP_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Bearer token with `connectors:manage` (falls back to `LOCKSTEP_ADMIN_TOKEN`).
    #[arg(long, env = "LOCKSTEP_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: ConnectorsCommand,
}

/// `connectors` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConnectorsCommand {
    /// List loaded connectors with state, version and delivery counts.
    List,
    /// Show one connector in full.
    Show {
        /// Connector name.
        name: String,
    },
    /// Upload a connector (add or replace): a manifest and its component.
    Load {
        /// The manifest (TOML); `name` says which connector.
        manifest: PathBuf,
        /// The component; defaults to the manifest's `component` path.
        #[arg(long)]
        component: Option<PathBuf>,
    },
    /// Unload and forget a connector uploaded through the API.
    Remove {
        /// Connector name.
        name: String,
    },
    /// Call a connector again; deliveries held while it was disabled go out.
    Enable {
        /// Connector name.
        name: String,
    },
    /// Stop calling a connector; its deliveries are held.
    Disable {
        /// Connector name.
        name: String,
    },
}

/// Runs one `connectors` subcommand.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var("LOCKSTEP_ADMIN_TOKEN").ok())
        .filter(|t| !t.is_empty())
        .context("no token: pass --token or set LOCKSTEP_TOKEN (or LOCKSTEP_ADMIN_TOKEN)")?;
    let base = args.url.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()
        .context("cannot build the HTTP client")?;
    let url = |path: &str| format!("{base}/admin/connectors{path}");
    let request = match &args.command {
        ConnectorsCommand::List => client.get(url("")),
        ConnectorsCommand::Show { name } => client.get(url(&format!("/{name}"))),
        ConnectorsCommand::Remove { name } => client.delete(url(&format!("/{name}"))),
        ConnectorsCommand::Enable { name } => client.post(url(&format!("/{name}/enable"))),
        ConnectorsCommand::Disable { name } => client.post(url(&format!("/{name}/disable"))),
        ConnectorsCommand::Load {
            manifest,
            component,
        } => {
            let (name, form) = upload_form(manifest, component.as_deref())?;
            client.put(url(&format!("/{name}"))).multipart(form)
        }
    };
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach Lockstep at {base}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !status.is_success() {
        let detail = body["detail"].as_str().unwrap_or(text.as_str());
        bail!("{status}: {detail}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    match &args.command {
        ConnectorsCommand::List => print_table(body["items"].as_array().map_or(&[][..], |v| v)),
        ConnectorsCommand::Remove { name } => println!("removed {name}"),
        ConnectorsCommand::Load { .. } => println!(
            "{} {} version {}{}",
            body["outcome"].as_str().unwrap_or("?"),
            body["connector"]["name"].as_str().unwrap_or("?"),
            body["connector"]["version"].as_str().unwrap_or("?"),
            body["previousVersion"]
                .as_str()
                .map(|p| format!(" (was {p})"))
                .unwrap_or_default()
        ),
        _ => println!("{}", serde_json::to_string_pretty(&body)?),
    }
    Ok(())
}

/// The multipart form of an upload and the connector's name.
fn upload_form(
    manifest: &Path,
    component: Option<&Path>,
) -> anyhow::Result<(String, reqwest::multipart::Form)> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let dir = manifest.parent().unwrap_or(Path::new("."));
    // Parse locally first: a typo is reported before anything is sent.
    let parsed = Manifest::parse(&text, dir, &manifest.display().to_string())
        .or_else(|_| Manifest::parse_uploaded(&text, &manifest.display().to_string()))?;
    let component = match component {
        Some(c) => c.to_owned(),
        None if parsed.component.as_os_str().is_empty() => {
            bail!(
                "{} names no component; pass --component FILE",
                manifest.display()
            )
        }
        None => parsed.component.clone(),
    };
    let bytes = std::fs::read(&component)
        .with_context(|| format!("cannot read component {}", component.display()))?;
    let form = reqwest::multipart::Form::new()
        .part(
            "manifest",
            reqwest::multipart::Part::text(text).file_name("manifest.toml"),
        )
        .part(
            "component",
            reqwest::multipart::Part::bytes(bytes).file_name("component.wasm"),
        );
    Ok((parsed.name, form))
}

fn print_table(items: &[Value]) {
    println!(
        "{:<24} {:<16} {:<9} {:<8} {:>8} {:>6} {:>9} {:>9}",
        "NAME", "VERSION", "SOURCE", "STATE", "PENDING", "DEAD", "P50_MS", "P99_MS"
    );
    let ms = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    for c in items {
        println!(
            "{:<24} {:<16} {:<9} {:<8} {:>8} {:>6} {:>9} {:>9}",
            c["name"].as_str().unwrap_or("?"),
            // A connector that failed to load serves no version.
            c["version"].as_str().unwrap_or("-"),
            c["source"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            c["deliveries"]["pending"].as_i64().unwrap_or(0),
            c["deliveries"]["dead"].as_i64().unwrap_or(0),
            ms(&c["hookLatency"]["p50Ms"]),
            ms(&c["hookLatency"]["p99Ms"]),
        );
    }
}
