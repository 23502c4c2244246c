//! HTTP servers on 127.0.0.1 for a test or a load run: any axum app ([`Loopback`]), and a
//! receiver that records what arrives and answers with a status the caller picks
//! ([`Receiver`]). Each stops when its handle is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use tokio::sync::{Notify, oneshot};

use crate::Error;

/// An axum app served until this is dropped: dropping it starts the graceful shutdown, so the
/// listener closes and kept-alive connections end after their current request.
pub struct Loopback {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Loopback {
    /// Binds 127.0.0.1 on an ephemeral port and serves `app`.
    pub async fn bind(app: axum::Router) -> Result<Loopback, Error> {
        Self::bind_on("127.0.0.1:0", app).await
    }

    /// Binds `addr` (a loopback address; port 0 for any) and serves `app`.
    pub async fn bind_on(addr: &str, app: axum::Router) -> Result<Loopback, Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Io {
                what: format!("binding {addr}"),
                source,
            })?;
        Self::serve(listener, app)
    }

    /// Serves `app` on a listener the caller bound (it may need the address first, or wrap
    /// the socket in TLS).
    pub fn serve<L>(listener: L, app: axum::Router) -> Result<Loopback, Error>
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr().map_err(|source| Error::Io {
            what: "reading a listener's address".to_owned(),
            source,
        })?;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // The error of a server that ends is its listener's: nothing a peer can act on.
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Loopback { addr, _stop: stop })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A request the [`Receiver`] accepted.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The body as JSON; a body that is not JSON comes back as a JSON string of its text, so
    /// an assertion on a field fails and shows what arrived.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&self.body).into_owned())
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    status: AtomicU16,
    delay_ms: AtomicU64,
    arrived: Notify,
    /// Requests received, answered or not yet (a delayed one counts from its arrival).
    received: AtomicUsize,
}

impl Shared {
    /// The list stays whole even if a holder panicked (each update is one push).
    fn requests(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A stand-in for a legacy system or any webhook target: records every request it answers
/// with a 2xx and answers with the status set last (200 at first), after the delay set last.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _server: Loopback,
}

impl Receiver {
    pub async fn start() -> Result<Receiver, Error> {
        Self::start_on("127.0.0.1:0").await
    }

    /// On a given address (say, the one a stopped receiver had).
    pub async fn start_on(addr: &str) -> Result<Receiver, Error> {
        let shared = Arc::new(Shared::default());
        shared.status.store(200, Ordering::SeqCst);
        let app = axum::Router::new()
            .fallback(record)
            .with_state(Arc::clone(&shared));
        let server = Loopback::bind_on(addr, app).await?;
        Ok(Receiver {
            addr: server.addr,
            shared,
            _server: server,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Requests received so far, including those still waiting out the delay and those
    /// answered with a status that is not recorded.
    pub fn received(&self) -> usize {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// Every request recorded so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests().clone()
    }

    /// Waits until at least `n` requests were recorded or `timeout` passed; returns what was
    /// recorded (fewer than `n` on a timeout).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.requests();
            }
        }
    }
}

async fn record(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    shared.received.fetch_add(1, Ordering::SeqCst);
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = shared.status.load(Ordering::SeqCst);
    if (200..300).contains(&status) {
        shared.requests().push(Recorded {
            method: method.to_string(),
            path: uri.path().to_owned(),
            headers,
            body,
        });
        shared.arrived.notify_waiters();
    }
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
