//! The HTTP API of a Shared Signals (SSF 1.0) transmitter as its receiver uses it: the
//! metadata document, an OAuth access token by the client-credentials grant, stream
//! management (read, create, update, delete), stream status, verification requests, and the
//! poll endpoint (RFC 8936). Plain exchanges with checked answers; what to do with them is
//! `sync::ssf_streams`'. URLs the transmitter names are held to the rule of every IdP URL:
//! `https://`, or `http://` only to a loopback host.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::tls;

/// Bound on each exchange with a transmitter.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from a transmitter.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// A failed exchange with a transmitter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No answer, or an unreadable one.
    #[error("{0}")]
    Transport(String),
    /// An answer that is not what the protocol says (including an error status).
    #[error("{0}")]
    Protocol(String),
    /// The transmitter answered 404 Not Found.
    #[error("{0}")]
    NotFound(String),
}

/// What a transmitter's metadata says (the members a receiver uses), its URLs checked.
#[derive(Clone, Debug, Default)]
pub struct TransmitterMetadata {
    /// `issuer`.
    pub issuer: String,
    /// Its signing keys.
    pub jwks_uri: String,
    /// Stream management.
    pub configuration_endpoint: String,
    /// Stream status, if offered.
    pub status_endpoint: Option<String>,
    /// Verification requests, if offered.
    pub verification_endpoint: Option<String>,
    /// Complex-subject members a receiver must understand.
    pub critical_members: Vec<String>,
    /// Delivery method URNs offered (`None`: not said).
    pub delivery_methods: Option<Vec<String>>,
}

/// An access token for the stream API.
#[derive(Clone, Debug)]
pub struct AccessToken {
    /// The bearer token.
    pub value: String,
    /// Its lifetime as the authorization server gave it (default 60 s).
    pub expires_in: Duration,
}

/// One poll's answer.
#[derive(Clone, Debug, Default)]
pub struct PollAnswer {
    /// SETs by `jti` (a value that is not a string is kept, to be refused).
    pub sets: Map<String, Value>,
    /// Whether more SETs wait.
    pub more_available: bool,
}

/// The HTTP client of the transmitters of every realm.
pub struct SsfClient {
    http: reqwest::Client,
}

fn text(v: &Value, name: &str) -> Option<String> {
    v.get(name).and_then(Value::as_str).map(str::to_owned)
}

fn with_query(url: &str, name: &str, value: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            u.query_pairs_mut().append_pair(name, value);
            u.to_string()
        }
        Err(_) => url.to_owned(),
    }
}

/// Why [`read_capped`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection failed.
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
    /// The body is longer than allowed.
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
}

/// Reads a response body of at most `max` bytes, chunk by chunk: a peer announcing or
/// sending more is cut off there rather than buffered.
pub async fn read_capped(mut res: reqwest::Response, max: usize) -> Result<Vec<u8>, ReadError> {
    if res.content_length().is_some_and(|n| n > max as u64) {
        return Err(ReadError::TooLarge(max));
    }
    let mut out = Vec::new();
    while let Some(chunk) = res.chunk().await? {
        if out.len() + chunk.len() > max {
            return Err(ReadError::TooLarge(max));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn read_json(res: reqwest::Response, url: &str) -> Result<Value, ClientError> {
    let status = res.status();
    let bytes = read_capped(res, MAX_BODY).await.map_err(|e| match e {
        ReadError::Transport(e) => ClientError::Transport(format!("{url}: {e}")),
        ReadError::TooLarge(_) => ClientError::Protocol(format!("{url}: {e}")),
    })?;
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(ClientError::NotFound(format!("{url} answered {status}")));
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        return Err(ClientError::Protocol(format!(
            "{url} answered {status}: {text}"
        )));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Protocol(format!("{url}: not JSON: {e}")))
}

impl SsfClient {
    /// A client whose HTTPS connections trust the bundled roots and `roots`.
    pub fn new(roots: &tls::TrustRoots) -> Result<Self, String> {
        let http = roots
            .apply(reqwest::Client::builder())
            .timeout(HTTP_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(SsfClient { http })
    }

    async fn get(&self, url: &str, bearer: Option<&str>) -> Result<Value, ClientError> {
        let mut req = self.http.get(url).header("accept", "application/json");
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        let res = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(format!("GET {url}: {e}")))?;
        read_json(res, url).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        bearer: &str,
        body: &Value,
    ) -> Result<Value, ClientError> {
        let res = self
            .http
            .request(method.clone(), url)
            .bearer_auth(bearer)
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Transport(format!("{method} {url}: {e}")))?;
        read_json(res, url).await
    }

    /// The metadata at `url`, which must name `issuer`.
    pub async fn metadata(
        &self,
        url: &str,
        issuer: &str,
    ) -> Result<TransmitterMetadata, ClientError> {
        let doc = self.get(url, None).await?;
        let named = text(&doc, "issuer");
        if named.as_deref() != Some(issuer) {
            return Err(ClientError::Protocol(format!(
                "the metadata at {url} names issuer {named:?}, not the configured {issuer:?}"
            )));
        }
        let endpoint = |name: &str| -> Result<Option<String>, ClientError> {
            match text(&doc, name) {
                Some(u) => {
                    tls::check_url(&u).map_err(|e| ClientError::Protocol(format!("{name} {e}")))?;
                    Ok(Some(u))
                }
                None => Ok(None),
            }
        };
        let strings = |name: &str| {
            doc.get(name).and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
        };
        Ok(TransmitterMetadata {
            issuer: issuer.to_owned(),
            jwks_uri: endpoint("jwks_uri")?
                .ok_or_else(|| ClientError::Protocol("the metadata names no jwks_uri".into()))?,
            configuration_endpoint: endpoint("configuration_endpoint")?.ok_or_else(|| {
                ClientError::Protocol("the metadata names no configuration_endpoint".into())
            })?,
            status_endpoint: endpoint("status_endpoint")?,
            verification_endpoint: endpoint("verification_endpoint")?,
            critical_members: strings("critical_subject_members").unwrap_or_default(),
            delivery_methods: strings("delivery_methods_supported"),
        })
    }

    /// An access token by the client-credentials grant at `token_url`, or at the
    /// `token_endpoint` of `issuer`'s OpenID discovery document.
    pub async fn token(
        &self,
        issuer: &str,
        token_url: Option<&str>,
        client_id: &str,
        client_secret: &str,
        scope: &str,
    ) -> Result<AccessToken, ClientError> {
        let token_url = match token_url {
            Some(u) => u.to_owned(),
            None => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc = self.get(&discovery, None).await?;
                let url = text(&doc, "token_endpoint").ok_or_else(|| {
                    ClientError::Protocol(format!("{discovery} names no token_endpoint"))
                })?;
                tls::check_url(&url)
                    .map_err(|e| ClientError::Protocol(format!("token_endpoint {e}")))?;
                url
            }
        };
        let mut form = vec![("grant_type", "client_credentials")];
        if !scope.is_empty() {
            form.push(("scope", scope));
        }
        let res = self
            .http
            .post(&token_url)
            .basic_auth(client_id, Some(client_secret))
            .form(&form)
            .send()
            .await
            .map_err(|e| ClientError::Transport(format!("POST {token_url}: {e}")))?;
        let body = read_json(res, &token_url).await?;
        let value = text(&body, "access_token")
            .ok_or_else(|| ClientError::Protocol("the token answer has no access_token".into()))?;
        let lifetime = body.get("expires_in").and_then(Value::as_u64).unwrap_or(60);
        Ok(AccessToken {
            value,
            expires_in: Duration::from_secs(lifetime),
        })
    }

    /// The stream this client already has at the transmitter, if any.
    pub async fn existing_stream(
        &self,
        m: &TransmitterMetadata,
        bearer: &str,
    ) -> Result<Option<Value>, ClientError> {
        let answer = match self.get(&m.configuration_endpoint, Some(bearer)).await {
            // No stream yet: some transmitters answer 404 rather than an empty list.
            Err(ClientError::NotFound(_)) => Value::Null,
            other => other?,
        };
        Ok(match answer {
            Value::Array(items) => items.into_iter().next(),
            Value::Object(o) if o.contains_key("stream_id") => Some(Value::Object(o)),
            _ => None,
        })
    }

    /// Creates a stream (`body`: delivery, events_requested, description).
    pub async fn create_stream(
        &self,
        m: &TransmitterMetadata,
        bearer: &str,
        body: &Value,
    ) -> Result<Value, ClientError> {
        self.send(
            reqwest::Method::POST,
            &m.configuration_endpoint,
            bearer,
            body,
        )
        .await
    }

    /// Updates a stream (`body` names its `stream_id`).
    pub async fn update_stream(
        &self,
        m: &TransmitterMetadata,
        bearer: &str,
        body: &Value,
    ) -> Result<Value, ClientError> {
        self.send(
            reqwest::Method::PATCH,
            &m.configuration_endpoint,
            bearer,
            body,
        )
        .await
    }

    /// Deletes a stream (already gone is fine).
    pub async fn delete_stream(
        &self,
        m: &TransmitterMetadata,
        bearer: &str,
        stream_id: &str,
    ) -> Result<(), ClientError> {
        let url = with_query(&m.configuration_endpoint, "stream_id", stream_id);
        let res = self
            .http
            .delete(&url)
            .bearer_auth(bearer)
            .send()
            .await
            .map_err(|e| ClientError::Transport(format!("DELETE {url}: {e}")))?;
        match read_json(res, &url).await {
            Ok(_) | Err(ClientError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A stream's status and the reason given for it (`None`: no status endpoint).
    pub async fn status(
        &self,
        m: &TransmitterMetadata,
        bearer: &str,
        stream_id: &str,
    ) -> Result<Option<(String, Option<String>)>, ClientError> {
        let Some(endpoint) = &m.status_endpoint else {
            return Ok(None);
        };
        let answer = self
            .get(&with_query(endpoint, "stream_id", stream_id), Some(bearer))
            .await?;
        let status = text(&answer, "status")
            .ok_or_else(|| ClientError::Protocol("the status answer has no status".into()))?;
        Ok(Some((status, text(&answer, "reason"))))
    }

    /// Asks for a verification event carrying `state` (nothing when not offered).
    pub async fn request_verification(
        &self,
        m: &TransmitterMetadata,
        bearer: &str,
        stream_id: &str,
        state: &str,
    ) -> Result<(), ClientError> {
        if let Some(url) = &m.verification_endpoint {
            let body = json!({"stream_id": stream_id, "state": state});
            self.send(reqwest::Method::POST, url, bearer, &body).await?;
        }
        Ok(())
    }

    /// One poll (RFC 8936): acknowledges `ack`, reports `set_errs`, asks for up to
    /// `max_events` SETs without waiting.
    pub async fn poll(
        &self,
        url: &str,
        bearer: &str,
        ack: &[String],
        set_errs: &Map<String, Value>,
        max_events: u32,
    ) -> Result<PollAnswer, ClientError> {
        let body = json!({
            "maxEvents": max_events,
            "returnImmediately": true,
            "ack": ack,
            "setErrs": set_errs,
        });
        let answer = self.send(reqwest::Method::POST, url, bearer, &body).await?;
        Ok(PollAnswer {
            sets: answer
                .get("sets")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            more_available: answer
                .get("moreAvailable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }
}
