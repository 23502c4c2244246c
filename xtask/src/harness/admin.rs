//! The admin API of the server under test, as the harnesses call it: connectors (state,
//! upload, enable and disable, their delivery counts) and the delivery queue.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::http::StatusCode;
use serde_json::Value;

/// Admin calls and the first load: a cold compile of the component takes seconds on a busy
/// two-core machine.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often [`Admin::wait_loaded`] asks again.
const LOAD_POLL: Duration = Duration::from_millis(50);

/// Delivery counts of the connectors, from the database.
#[derive(Default)]
pub(crate) struct QueueCounts {
    pub pending: i64,
    pub dead: i64,
    pub dropped: i64,
}

impl QueueCounts {
    pub(crate) fn sum(counts: &[QueueCounts]) -> QueueCounts {
        counts
            .iter()
            .fold(QueueCounts::default(), |acc, c| QueueCounts {
                pending: acc.pending + c.pending,
                dead: acc.dead + c.dead,
                dropped: acc.dropped + c.dropped,
            })
    }

    pub(crate) fn all(&self) -> usize {
        usize::try_from(self.pending + self.dead + self.dropped).unwrap_or(0)
    }
}

/// The admin API: connectors and deliveries.
pub(crate) struct Admin {
    client: reqwest::Client,
    /// `http://{addr}`.
    root: String,
    base: String,
    token: String,
}

impl Admin {
    pub(crate) fn new(addr: SocketAddr, token: &str) -> Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(ADMIN_TIMEOUT)
            .build()
            .context("building the admin HTTP client")?;
        Ok(Admin {
            client,
            root: format!("http://{addr}"),
            base: format!("http://{addr}/admin"),
            token: token.to_owned(),
        })
    }

    /// The hook calls that delivered since the server started, summed over `names`, from
    /// `GET /metrics` (`lockstep_hook_calls_total{outcome="delivered"}`): one request, and
    /// one count of the queue in the database for all of them, where each connector's page
    /// counts its own (at a backlog of 80,000 rows, 17 ms of the database's time a page).
    pub(crate) async fn delivered_calls(&self, names: &[String]) -> Result<usize> {
        let resp = self
            .client
            .get(format!("{}/metrics", self.root))
            .send()
            .await
            .context("GET /metrics")?;
        if !resp.status().is_success() {
            bail!("GET /metrics answered {}", resp.status());
        }
        let text = resp.text().await.context("reading /metrics")?;
        let mut sum = 0usize;
        for name in names {
            let series =
                format!("lockstep_hook_calls_total{{connector=\"{name}\",outcome=\"delivered\"}} ");
            // A connector that has delivered nothing yet has no series.
            if let Some(value) = text.lines().find_map(|l| l.strip_prefix(series.as_str())) {
                let n: f64 = value
                    .trim()
                    .parse()
                    .with_context(|| format!("/metrics: {series}{value}"))?;
                // Counters are whole numbers far below 2^53.
                sum += n as usize;
            }
        }
        Ok(sum)
    }

    /// `GET /admin/connectors/{name}`; `None` when it is not loaded.
    pub(crate) async fn connector(&self, name: &str) -> Result<Option<Value>> {
        let resp = self
            .client
            .get(format!("{}/connectors/{name}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET connector {name}"))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        json_body(resp, &format!("GET connector {name}"))
            .await
            .map(|(_, v)| Some(v))
    }

    /// The version serving, if the connector is loaded.
    pub(crate) async fn version(&self, name: &str) -> Result<Option<String>> {
        match self.connector(name).await? {
            None => Ok(None),
            Some(c) => c
                .get("version")
                .and_then(Value::as_str)
                .map(|v| Some(v.to_owned()))
                .with_context(|| format!("connector {name} has no version: {c}")),
        }
    }

    /// Waits (bounded) until the directory connector has been loaded.
    pub(crate) async fn wait_loaded(&self, name: &str) -> Result<()> {
        let start = Instant::now();
        while self.version(name).await?.is_none() {
            if start.elapsed() >= ADMIN_TIMEOUT {
                bail!("connector {name} was not loaded within {ADMIN_TIMEOUT:?}");
            }
            tokio::time::sleep(LOAD_POLL).await;
        }
        Ok(())
    }

    pub(crate) async fn queue_counts(&self, name: &str) -> Result<QueueCounts> {
        let c = self
            .connector(name)
            .await?
            .with_context(|| format!("connector {name} is not loaded"))?;
        let count = |key: &str| {
            c.pointer(&format!("/deliveries/{key}"))
                .and_then(Value::as_i64)
                .with_context(|| format!("connector {name} has no deliveries.{key}: {c}"))
        };
        Ok(QueueCounts {
            pending: count("pending")?,
            dead: count("dead")?,
            dropped: count("dropped")?,
        })
    }

    /// `PUT /admin/connectors/{name}` (multipart); non-2xx is an error.
    pub(crate) async fn put(
        &self,
        name: &str,
        manifest: String,
        component: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Value)> {
        let mut form = reqwest::multipart::Form::new().text("manifest", manifest);
        if let Some(bytes) = component {
            let part = reqwest::multipart::Part::bytes(bytes)
                .file_name("webhook.wasm")
                .mime_str("application/wasm")
                .context("building the component part")?;
            form = form.part("component", part);
        }
        let resp = self
            .client
            .put(format!("{}/connectors/{name}", self.base))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await
            .with_context(|| format!("PUT connector {name}"))?;
        json_body(resp, &format!("PUT connector {name}")).await
    }

    /// `POST /admin/connectors/{name}/enable` or `.../disable`; non-2xx is an error.
    pub(crate) async fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let verb = if enabled { "enable" } else { "disable" };
        let what = format!("POST {verb} {name}");
        let resp = self
            .client
            .post(format!("{}/connectors/{name}/{verb}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| what.clone())?;
        json_body(resp, &what).await.map(|_| ())
    }

    /// Whether `GET /admin/deliveries?status={status}&limit=1` lists anything.
    pub(crate) async fn any_delivery(&self, status: &str) -> Result<bool> {
        let what = format!("GET deliveries ({status})");
        let resp = self
            .client
            .get(format!("{}/deliveries", self.base))
            .query(&[("status", status), ("limit", "1")])
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| what.clone())?;
        let (_, page) = json_body(resp, &what).await?;
        let items = page
            .get("items")
            .and_then(Value::as_array)
            .with_context(|| format!("{what}: no `items` array: {page}"))?;
        Ok(!items.is_empty())
    }
}

/// The JSON body of a 2xx response; anything else is an error carrying the body.
async fn json_body(resp: reqwest::Response, what: &str) -> Result<(StatusCode, Value)> {
    let status = resp.status();
    let text = resp
        .text()
        .await
        .with_context(|| format!("{what}: reading the body"))?;
    if !status.is_success() {
        bail!("{what}: HTTP {status}: {text}");
    }
    let value = serde_json::from_str(&text)
        .with_context(|| format!("{what}: HTTP {status} with a body that is not JSON: {text}"))?;
    Ok((status, value))
}
