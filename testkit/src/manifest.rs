//! Connector manifests as files (`--connectors-dir`) or text (`PUT /admin/connectors`).

use std::path::{Path, PathBuf};

use crate::Error;

/// `s` as a TOML basic string, quoted and escaped.
pub fn toml_str(s: &str) -> String {
    // A JSON string literal is one: serde_json escapes only `"`, `\` and control
    // characters, with escapes TOML shares (it never writes `\/`).
    serde_json::Value::String(s.to_owned()).to_string()
}

/// `name = …`, `component = …` and then `extra` (more keys and tables, as TOML).
pub fn manifest(name: &str, component: &Path, extra: &str) -> String {
    format!(
        "name = {}\ncomponent = {}\n{extra}\n",
        toml_str(name),
        toml_str(&component.display().to_string())
    )
}

/// Writes [`manifest`] to `dir/<name>.toml`; returns its path.
pub fn write_manifest(
    dir: &Path,
    name: &str,
    component: &Path,
    extra: &str,
) -> Result<PathBuf, Error> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, manifest(name, component, extra)).map_err(|source| Error::Io {
        what: format!("writing {}", path.display()),
        source,
    })?;
    Ok(path)
}

/// A webhook connector (`connectors/webhook`) as the load harnesses run it: a 2 s hook
/// deadline unless said otherwise, and a retry policy that outlasts a short outage of the
/// receiver (10 attempts, 50 ms to 1 s apart).
#[derive(Clone, Debug)]
pub struct Webhook<'a> {
    pub name: &'a str,
    /// `None` leaves `component` out (an upload carries the component beside the manifest).
    pub component: Option<&'a Path>,
    pub realms: &'a [&'a str],
    pub events: &'a [&'a str],
    pub allowed_hosts: &'a [&'a str],
    pub timeout_ms: u64,
    /// `[config] url`.
    pub url: &'a str,
    /// More `[config]` entries (every value is a string to the connector).
    pub config: &'a [(&'a str, &'a str)],
}

impl Webhook<'_> {
    /// The manifest as TOML.
    pub fn to_toml(&self) -> String {
        let list = |items: &[&str]| {
            items
                .iter()
                .map(|i| toml_str(i))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut text = format!("name = {}\n", toml_str(self.name));
        if let Some(component) = self.component {
            text.push_str(&format!(
                "component = {}\n",
                toml_str(&component.display().to_string())
            ));
        }
        text.push_str(&format!(
            "realms = [{}]\nevents = [{}]\nallowed_hosts = [{}]\ntimeout_ms = {}\n\n\
             [policy]\non_failure = \"retry\"\nmax_attempts = 10\nbackoff_ms = 50\n\
             max_backoff_ms = 1000\n\n[config]\nurl = {}\n",
            list(self.realms),
            list(self.events),
            list(self.allowed_hosts),
            self.timeout_ms,
            toml_str(self.url),
        ));
        for (key, value) in self.config {
            text.push_str(&format!("{key} = {}\n", toml_str(value)));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_manifest_reads_back_as_written() {
        let text = Webhook {
            name: "hook-1",
            component: Some(Path::new("/w/webhook.wasm")),
            realms: &["acme"],
            events: &["login", "logout"],
            allowed_hosts: &["http://127.0.0.1:9"],
            timeout_ms: 2000,
            url: "http://127.0.0.1:9/hook-1",
            config: &[("secret", "s\"1")],
        }
        .to_toml();
        assert_eq!(
            text,
            "name = \"hook-1\"\ncomponent = \"/w/webhook.wasm\"\nrealms = [\"acme\"]\n\
             events = [\"login\", \"logout\"]\nallowed_hosts = [\"http://127.0.0.1:9\"]\n\
             timeout_ms = 2000\n\n[policy]\non_failure = \"retry\"\nmax_attempts = 10\n\
             backoff_ms = 50\nmax_backoff_ms = 1000\n\n[config]\n\
             url = \"http://127.0.0.1:9/hook-1\"\nsecret = \"s\\\"1\"\n"
        );
    }

    #[test]
    fn strings_are_quoted_and_escaped() {
        assert_eq!(toml_str("a"), "\"a\"");
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(
            manifest("hook", Path::new("/x/w.wasm"), "realms = [\"*\"]"),
            "name = \"hook\"\ncomponent = \"/x/w.wasm\"\nrealms = [\"*\"]\n"
        );
    }
}
