//! Outgoing wasi:http requests of one connector version over keep-alive connections: a
//! bounded pool of idle HTTP/1.1 connections per destination (scheme and `host:port`) and
//! hook thread, with the limits of the manifest's `[http]` table. Each loaded version owns its pool, so a
//! replacement never sends over its predecessor's connections, and dropping the version
//! closes them. It does not decide where a connector may go: `sandbox::HttpGate` checks the
//! allowlist before a request reaches this module.
//!
//! Timeouts, TLS (rustls with the `ring` provider and the webpki roots) and error mapping are
//! those of wasmtime-wasi-http's `default_send_request`, which opens a connection per request.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::uri::Scheme;
use hyper::client::conn::http1::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, WasiBody};

use super::manifest::HttpPool;

/// Destinations one version keeps idle connections to (a destination reached from two hook
/// threads counts twice); requests to further ones are served without pooling. An allowlist with wildcards could otherwise
/// grow the pool without bound.
pub const MAX_POOLED_DESTINATIONS: usize = 32;

/// Read buffer of a connection, and its write buffer (which may take one body chunk more):
/// hyper's default is about 400 KiB each, which the call's memory budget would have to
/// reserve for every request. Response heads larger than this are refused.
pub(super) const CONNECTION_BUFFER: usize = 64 * 1024;

/// What a request's host memory is accounted to: held by the send, the request body (also
/// while it is drained) and the response body, and given back when the last of them drops.
pub(super) type Held = Arc<dyn Send + Sync>;

/// wasi-http's default when a guest sets no timeout (the gate caps every one anyway).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The per-request timeouts, as wasi:http's `request-options` gives them.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub between_bytes: Duration,
}

impl From<&wasmtime_wasi_http::RequestOptions> for Timeouts {
    fn from(o: &wasmtime_wasi_http::RequestOptions) -> Self {
        Timeouts {
            connect: o.connect_timeout.unwrap_or(DEFAULT_TIMEOUT),
            first_byte: o.first_byte_timeout.unwrap_or(DEFAULT_TIMEOUT),
            between_bytes: o.between_bytes_timeout.unwrap_or(DEFAULT_TIMEOUT),
        }
    }
}

/// Where a connection goes, and the thread whose runtime drives it. The authority always
/// carries its port, so `host` and `host:80` share connections. A connection is handed only
/// to requests on the thread it was opened on: each hook thread runs a runtime of its own,
/// the connection's task stays where it was spawned, and a request from another thread would
/// wake it across threads twice per exchange.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Destination {
    tls: bool,
    authority: String,
    home: std::thread::ThreadId,
}

struct Idle {
    sender: SendRequest<WasiBody>,
    since: Instant,
}

/// The keep-alive connections of one connector version. Cloning shares the pool.
#[derive(Clone)]
pub struct ConnectionPool {
    inner: Arc<Inner>,
}

struct Inner {
    max_idle_per_host: usize,
    idle_timeout: Duration,
    idle: Mutex<Slots>,
    /// Connections opened (tests and benchmarks read it through [`ConnectionPool::opened`]).
    opened: AtomicU64,
}

#[derive(Default)]
struct Slots {
    by_destination: HashMap<Destination, Vec<Idle>>,
    /// Whether a task is closing idle connections past their timeout.
    reaping: bool,
}

impl std::fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("max_idle_per_host", &self.inner.max_idle_per_host)
            .field("idle_timeout", &self.inner.idle_timeout)
            .finish()
    }
}

impl ConnectionPool {
    /// An empty pool with the manifest's limits (`max_idle_per_host = 0`: no pooling).
    pub fn new(limits: &HttpPool) -> Self {
        ConnectionPool {
            inner: Arc::new(Inner {
                max_idle_per_host: limits.max_idle_per_host as usize,
                idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
                idle: Mutex::default(),
                opened: AtomicU64::new(0),
            }),
        }
    }

    /// Connections this pool has opened so far.
    pub fn opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Idle connections held now, over all destinations.
    pub fn idle(&self) -> usize {
        self.inner
            .lock()
            .by_destination
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Sends `request` (absolute URI, already allowed) over an idle connection to its
    /// destination or a new one, and answers with the response head; the body streams
    /// under the between-bytes timeout, and its connection goes back to the pool once the
    /// body has been read to its end. `held` lives as long as the request body and the
    /// response body do.
    pub(super) async fn send(
        &self,
        request: http::Request<WasiBody>,
        timeouts: Timeouts,
        held: Held,
    ) -> Result<http::Response<WasiBody>, Error> {
        let mut request = request.map(|body| drain_when_abandoned(body, Some(held.clone())));
        let uri = request.uri();
        let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
        let tls = uri.scheme() == Some(&Scheme::HTTPS);
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        };
        let destination = Destination {
            tls,
            authority,
            home: std::thread::current().id(),
        };
        // The request line carries only the path: scheme and authority belong in it only
        // when talking to a proxy, and hyper sends the URI as it is.
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = http::Uri::builder()
            .path_and_query(path)
            .build()
            .map_err(|_| Error::HttpRequestUriInvalid)?;

        let mut pooled = self.inner.checkout(&destination, timeouts.connect).await;
        loop {
            let reused = pooled.is_some();
            let mut sender = match pooled.take() {
                Some(sender) => sender,
                None => self.inner.connect(&destination, timeouts.connect).await?,
            };
            let sent = tokio::time::timeout(timeouts.first_byte, sender.try_send_request(request))
                .await
                .map_err(|_| Error::ConnectionReadTimeout)?;
            match sent {
                Ok(response) => {
                    let home = PoolHome {
                        pool: Arc::downgrade(&self.inner),
                        destination,
                        sender: Some(sender),
                    };
                    let between_bytes = timeouts.between_bytes.max(Duration::from_nanos(1));
                    let mut timer = tokio::time::interval(between_bytes);
                    timer.reset();
                    return Ok(response.map(|incoming| {
                        http_body_util::BodyExt::boxed_unsync(ResponseBody {
                            incoming,
                            timer,
                            home,
                            _held: held,
                        })
                    }));
                }
                // A kept connection the server closed before the request went out: the
                // request is intact, so it goes once more on a new connection.
                Err(mut e) if reused && e.message().is_some() => {
                    let Some(back) = e.take_message() else {
                        return Err(Error::from(e.into_error()));
                    };
                    request = back;
                }
                Err(e) => return Err(Error::from(e.into_error())),
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fresh(&self, idle: &Idle) -> bool {
        idle.since.elapsed() < self.idle_timeout && !idle.sender.is_closed()
    }

    /// The most recently used live connection to `destination`, if any is idle.
    async fn checkout(
        &self,
        destination: &Destination,
        wait: Duration,
    ) -> Option<SendRequest<WasiBody>> {
        if self.max_idle_per_host == 0 {
            return None;
        }
        loop {
            let idle = {
                let mut slots = self.lock();
                let list = slots.by_destination.get_mut(destination)?;
                list.retain(|i| self.fresh(i));
                list.pop()?
            };
            let mut sender = idle.sender;
            // An idle connection is ready at once; one the server has closed meanwhile
            // errors here and the next one is tried.
            if let Ok(Ok(())) = tokio::time::timeout(wait, sender.ready()).await {
                return Some(sender);
            }
        }
    }

    /// Keeps `sender` for the next request unless a limit says otherwise (then it is
    /// dropped, which closes its connection).
    fn checkin(self: &Arc<Self>, destination: Destination, sender: SendRequest<WasiBody>) {
        if self.max_idle_per_host == 0 || sender.is_closed() {
            return;
        }
        // The reaper needs a runtime; without one nothing would close idle connections.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut slots = self.lock();
        if !slots.by_destination.contains_key(&destination)
            && slots.by_destination.len() >= MAX_POOLED_DESTINATIONS
        {
            return;
        }
        let list = slots.by_destination.entry(destination).or_default();
        if list.len() >= self.max_idle_per_host {
            return;
        }
        list.push(Idle {
            sender,
            since: Instant::now(),
        });
        if !slots.reaping {
            slots.reaping = true;
            runtime.spawn(reap(Arc::downgrade(self), self.idle_timeout));
        }
    }

    async fn connect(
        &self,
        destination: &Destination,
        timeout: Duration,
    ) -> Result<SendRequest<WasiBody>, Error> {
        let tcp =
            match tokio::time::timeout(timeout, TcpStream::connect(&destination.authority)).await {
                Ok(stream) => stream.map_err(Error::Connect)?,
                Err(_) => return Err(Error::ConnectionTimeout),
            };
        // Small requests on a kept connection would otherwise wait for the peer's delayed
        // ACK of the previous one (Nagle).
        tcp.set_nodelay(true).map_err(Error::Connect)?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        if destination.tls {
            let config = tls_config().ok_or_else(|| {
                Error::InternalError(Some("TLS client configuration unavailable".into()))
            })?;
            let name = server_name(&destination.authority)?;
            let stream = tokio::time::timeout(
                timeout,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(Error::Tls)?;
            handshake(stream, timeout).await
        } else {
            handshake(tcp, timeout).await
        }
    }
}

/// Opens HTTP/1.1 over `io` and leaves the connection to a task of its own, which ends when
/// the server closes it or the last handle to it (in the pool or in a response) is dropped.
async fn handshake<T>(io: T, timeout: Duration) -> Result<SendRequest<WasiBody>, Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = tokio::time::timeout(
        timeout,
        hyper::client::conn::http1::Builder::new()
            .max_buf_size(CONNECTION_BUFFER)
            .handshake(TokioIo::new(io)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "outgoing connection ended with an error");
        }
    });
    Ok(sender)
}

/// Closes idle connections past the idle timeout; ends when the pool is empty or gone.
async fn reap(pool: Weak<Inner>, idle_timeout: Duration) {
    let period = (idle_timeout / 2).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut slots = pool.lock();
        for list in slots.by_destination.values_mut() {
            list.retain(|i| pool.fresh(i));
        }
        slots.by_destination.retain(|_, list| !list.is_empty());
        if slots.by_destination.is_empty() {
            slots.reaping = false;
            return;
        }
    }
}

/// One client configuration for the process: building the root store per request (as the
/// default sender does) costs more than the request. `None` if rustls refuses the
/// provider, which it does only for a provider without TLS 1.2/1.3 suites.
fn tls_config() -> Option<Arc<rustls::ClientConfig>> {
    static CONFIG: OnceLock<Option<Arc<rustls::ClientConfig>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.into(),
            };
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .inspect_err(|e| tracing::error!(error = %e, "cannot configure TLS for connectors"))
            .ok()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
        })
        .clone()
}

/// The name the server's certificate must carry: an IP literal (IPv6 in brackets) or the
/// host name without its port.
fn server_name(authority: &str) -> Result<rustls::pki_types::ServerName<'static>, Error> {
    use rustls::pki_types::ServerName;
    if let Ok(addr) = authority.parse::<std::net::SocketAddr>() {
        return Ok(ServerName::from(addr.ip()));
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    Ok(ServerName::try_from(host)?.to_owned())
}

/// Gives up on a request that will not be sent (the gate refused its destination) without
/// failing the guest's writes to its body: see [`GuestBody`].
pub(super) fn abandon(request: http::Request<WasiBody>) {
    drop(request.map(|body| drain_when_abandoned(body, None)));
}

/// The guest's request body, read to its end even when the request fails first.
fn drain_when_abandoned(body: WasiBody, held: Option<Held>) -> WasiBody {
    http_body_util::BodyExt::boxed_unsync(GuestBody {
        body: Some(body),
        held,
    })
}

/// A request body that, dropped before its end (connection refused or reset, a timeout, a
/// refused destination), keeps reading and discarding whatever the guest still writes until
/// the guest finishes it or its instance goes. Without this, the guest's next write or flush
/// of the body stream fails with `closed` while the failure itself is still on its way
/// through the response future: a guest may handle the one and not the other. StarlingMonkey
/// (componentize-js) ends its event loop on a failed body write and aborts the hook, so a
/// JavaScript `fetch` with a body trapped whenever the connection failed before its body was
/// written, instead of rejecting with a network error. Reading the rest is bounded by the
/// call: the guest's end of the channel goes with its instance.
struct GuestBody {
    /// `None` once the body ended (nothing left to drain).
    body: Option<WasiBody>,
    /// Kept while the body is drained: the guest can still fill its buffers until then.
    held: Option<Held>,
}

impl hyper::body::Body for GuestBody {
    type Data = bytes::Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(body).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            self.body = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| hyper::body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for GuestBody {
    fn drop(&mut self) {
        let Some(mut body) = self.body.take() else {
            return;
        };
        if hyper::body::Body::is_end_stream(&body) {
            return;
        }
        // Hook calls run on a Tokio runtime; without one the body just closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let held = self.held.take();
            runtime.spawn(async move {
                while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
                drop(held);
            });
        }
    }
}

/// Where a response's connection goes when its body is done. The pool is held weakly: a
/// body that outlives its connector version closes its connection instead.
struct PoolHome {
    pool: Weak<Inner>,
    destination: Destination,
    sender: Option<SendRequest<WasiBody>>,
}

impl PoolHome {
    fn release(&mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.checkin(self.destination.clone(), sender);
        }
    }
}

/// The response body: hyper's, under the between-bytes timeout, handing its connection back
/// at the end of the stream. Dropped early, it drops the connection (hyper closes it).
struct ResponseBody {
    incoming: hyper::body::Incoming,
    timer: tokio::time::Interval,
    home: PoolHome,
    _held: Held,
}

impl hyper::body::Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => {
                self.home.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(if e.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                Error::from(e)
            }))),
            Poll::Ready(Some(Ok(frame))) => {
                self.timer.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.timer.poll_tick(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for ResponseBody {
    /// A guest may drop a body it had no reason to read (a 204): its connection is as good
    /// as after a read to the end.
    fn drop(&mut self) {
        if hyper::body::Body::is_end_stream(&self.incoming) {
            self.home.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_drop_the_port_and_keep_ip_literals() {
        use rustls::pki_types::ServerName;
        assert_eq!(
            server_name("example.com:443").unwrap(),
            ServerName::try_from("example.com").unwrap()
        );
        assert_eq!(
            server_name("127.0.0.1:80").unwrap(),
            ServerName::from(std::net::Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            server_name("[::1]:443").unwrap(),
            ServerName::from(std::net::Ipv6Addr::LOCALHOST)
        );
    }

    #[test]
    fn the_tls_configuration_builds_with_ring_and_the_webpki_roots() {
        assert!(tls_config().is_some());
    }
}
