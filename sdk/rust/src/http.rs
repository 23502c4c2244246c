//! Outgoing HTTP over `wasi:http`, restricted by the host to the manifest's `allowed_hosts`.
//! Failures come back as [`HttpError`], which knows whether a retry can help.

use std::time::Duration;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::StreamError;

use crate::HookError;

/// Most response-body bytes kept (the rest is discarded).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Up to [`MAX_RESPONSE_BYTES`] of the body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The hook error this status deserves: 5xx, 408 and 429 are worth a retry; other
    /// statuses are permanent.
    pub fn into_hook_error(self) -> HookError {
        let mut text = self.text();
        text.truncate(512);
        let msg = format!("HTTP {}: {text}", self.status);
        if self.status >= 500 || self.status == 408 || self.status == 429 {
            HookError::Retry(msg)
        } else {
            HookError::Fail(msg)
        }
    }
}

/// Why a request did not produce a response.
#[derive(Debug, Clone)]
pub enum HttpError {
    /// The host refused it: the destination is not in the manifest's `allowed_hosts`.
    Denied(String),
    /// The network failed (refused, reset, DNS, timeout): transient.
    Transport(String),
    /// The request itself is malformed (bad URL, header).
    Invalid(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Denied(m) => write!(f, "request denied by the host: {m}"),
            HttpError::Transport(m) => write!(f, "transport error: {m}"),
            HttpError::Invalid(m) => write!(f, "invalid request: {m}"),
        }
    }
}

impl From<HttpError> for HookError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Transport(_) => HookError::Retry(e.to_string()),
            HttpError::Denied(_) | HttpError::Invalid(_) => HookError::Fail(e.to_string()),
        }
    }
}

/// A request being built.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

impl Request {
    fn new(method: Method, url: &str) -> Self {
        Request {
            method,
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// `GET url`.
    pub fn get(url: &str) -> Self {
        Self::new(Method::Get, url)
    }

    /// `POST url`.
    pub fn post(url: &str) -> Self {
        Self::new(Method::Post, url)
    }

    /// `PUT url`.
    pub fn put(url: &str) -> Self {
        Self::new(Method::Put, url)
    }

    /// `DELETE url`.
    pub fn delete(url: &str) -> Self {
        Self::new(Method::Delete, url)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets a JSON body (and its content type).
    pub fn json(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self.header("content-type", "application/json")
    }

    /// Sets an `application/x-www-form-urlencoded` body (an OAuth token request, say) from
    /// name/value pairs, each [`percent_encode`]d.
    pub fn form(mut self, pairs: &[(&str, &str)]) -> Self {
        self.body = form_body(pairs).into_bytes();
        self.header("content-type", "application/x-www-form-urlencoded")
    }

    /// Sets a raw body.
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }

    /// Bounds connecting, the first response byte, and the gaps between body bytes.
    /// (The host also caps every request at the hook's own deadline.)
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the response (blocking the hook, which is what a hook is
    /// for: the host runs many hook calls concurrently).
    pub fn send(self) -> Result<Response, HttpError> {
        let (scheme, authority, path) = split_url(&self.url)?;
        let mut fields: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
            .collect();
        // A declared length, even 0: a body of unknown length goes out chunked, and a server
        // that answers without reading it (a DELETE handler) may close the connection while
        // the final chunk is in flight, which resets it and loses the answer.
        if !fields.iter().any(|(k, _)| k == "content-length") {
            fields.push((
                "content-length".into(),
                self.body.len().to_string().into_bytes(),
            ));
        }
        let headers = Fields::from_list(&fields)
            .map_err(|e| HttpError::Invalid(format!("header rejected: {e:?}")))?;
        let request = OutgoingRequest::new(headers);
        let invalid = |what: &str| HttpError::Invalid(format!("{what} rejected: {}", self.url));
        request
            .set_method(&self.method)
            .map_err(|()| invalid("method"))?;
        request
            .set_scheme(Some(&scheme))
            .map_err(|()| invalid("scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(|()| invalid("authority"))?;
        request
            .set_path_with_query(Some(path))
            .map_err(|()| invalid("path"))?;
        let options = RequestOptions::new();
        if let Some(t) = self.timeout {
            let ns = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
            // A host may not support a timeout; its own deadline still applies.
            let _ = options.set_connect_timeout(Some(ns));
            let _ = options.set_first_byte_timeout(Some(ns));
            let _ = options.set_between_bytes_timeout(Some(ns));
        }
        let body = request
            .body()
            .map_err(|()| HttpError::Invalid("request body unavailable".into()))?;
        let pending = outgoing_handler::handle(request, Some(options)).map_err(classify)?;
        // Write the body; if the host refused or failed the request the stream is closed,
        // and the authoritative reason arrives through the response future below.
        if let Ok(stream) = body.write() {
            for chunk in self.body.chunks(4096) {
                if stream.blocking_write_and_flush(chunk).is_err() {
                    break;
                }
            }
            drop(stream);
        }
        let _ = OutgoingBody::finish(body, None);
        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(classify(code)),
            Some(Err(())) | None => {
                return Err(HttpError::Transport("response future unusable".into()));
            }
        };
        let status = response.status();
        let mut bytes = Vec::new();
        if let Ok(incoming) = response.consume()
            && let Ok(stream) = incoming.stream()
        {
            while bytes.len() < MAX_RESPONSE_BYTES {
                match stream.blocking_read(16 * 1024) {
                    Ok(chunk) => bytes.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(HttpError::Transport(format!(
                            "reading the response body: {}",
                            e.to_debug_string()
                        )));
                    }
                }
            }
            bytes.truncate(MAX_RESPONSE_BYTES);
        }
        Ok(Response {
            status,
            body: bytes,
        })
    }
}

/// Percent-encodes every byte of `text` except the RFC 3986 unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`), so the result is safe as one URL path segment, a query value or a
/// form value: `/`, `?`, `#`, `&`, `=`, `+`, `%` and spaces cannot change the URL's meaning.
pub fn percent_encode(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// `name=value&...` with every name and value [`percent_encode`]d.
pub fn form_body(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Splits `scheme://authority/path?query`.
fn split_url(url: &str) -> Result<(Scheme, &str, &str), HttpError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| HttpError::Invalid(format!("not an absolute URL: {url:?}")))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(HttpError::Invalid(format!("unsupported scheme {other:?}"))),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() {
        return Err(HttpError::Invalid(format!("no host in {url:?}")));
    }
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
}

fn classify(code: ErrorCode) -> HttpError {
    match code {
        ErrorCode::HttpRequestDenied => {
            HttpError::Denied("destination not in the connector's allowed_hosts".into())
        }
        ErrorCode::HttpRequestUriInvalid | ErrorCode::HttpRequestMethodInvalid => {
            HttpError::Invalid(format!("{code:?}"))
        }
        other => HttpError::Transport(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encode_keeps_only_unreserved_characters() {
        assert_eq!(percent_encode("AZaz09-._~"), "AZaz09-._~");
        assert_eq!(
            percent_encode("a/b?c#d&e=f+g h%"),
            "a%2Fb%3Fc%23d%26e%3Df%2Bg%20h%25"
        );
        assert_eq!(percent_encode("../x"), "..%2Fx");
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_encode(""), "");
    }

    #[test]
    fn form_body_encodes_names_and_values() {
        assert_eq!(
            form_body(&[
                ("grant_type", "client_credentials"),
                ("client_secret", "s3&=+ /")
            ]),
            "grant_type=client_credentials&client_secret=s3%26%3D%2B%20%2F"
        );
        assert_eq!(form_body(&[]), "");
    }

    #[test]
    fn split_url_separates_scheme_authority_and_path() {
        let (scheme, authority, path) = split_url("http://127.0.0.1:18180/a/b?x=1").unwrap();
        assert!(matches!(scheme, Scheme::Http));
        assert_eq!((authority, path), ("127.0.0.1:18180", "/a/b?x=1"));
        let (_, authority, path) = split_url("https://kc.example").unwrap();
        assert_eq!((authority, path), ("kc.example", "/"));
        assert!(split_url("kc.example/x").is_err());
        assert!(split_url("ftp://kc.example/").is_err());
    }
}
