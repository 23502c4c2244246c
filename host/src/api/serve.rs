//! The HTTP/1.1 server loop under [`super::app`], with the deadlines that keep half-sent
//! requests from holding connections (and the connection permits of
//! [`super::limits::LimitedListener`]) forever: a request's head must arrive within
//! `header_read` of the connection opening or of its first byte, its body within `body_read`
//! of the head, a kept-alive connection may wait `idle` for its next request, and a response
//! the client stops reading is given up after `send`. `axum::serve` sets none of these.
//! Graceful shutdown stops accepting, lets requests in flight finish and closes idle
//! connections.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::serve::Listener;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tower::ServiceExt;

/// The connection deadlines; `None` switches one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From a connection's opening, or the first byte of a later request, to the end of the
    /// request head.
    pub header_read: Option<Duration>,
    /// From the end of the head to the end of the body.
    pub body_read: Option<Duration>,
    /// How long a kept-alive connection waits for its next request.
    pub idle: Option<Duration>,
    /// How long a response may wait for a client that does not read it.
    pub send: Option<Duration>,
}

/// A request body that did not arrive within `body_read` (answered 408 by the extractors).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener<Addr = std::net::SocketAddr>,
{
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut http = hyper::server::conn::http1::Builder::new();
    // The head deadline is `GuardedIo`'s: hyper's own also runs while a kept-alive connection
    // waits for its next request, which would make it the idle timeout too.
    http.timer(TokioTimer::new()).header_read_timeout(None);
    loop {
        let (io, remote) = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut shutdown => break,
        };
        let requests = Arc::new(RequestCount::default());
        let (started, finished) = (requests.clone(), requests.clone());
        let body_read = timeouts.body_read;
        let service = app
            .clone()
            .map_request(move |mut req: hyper::Request<Incoming>| {
                started.started.fetch_add(1, Ordering::SeqCst);
                // The client's address, for the failed-authentication throttle.
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(remote));
                req.map(|body| Body::new(DeadlineBody::new(body, body_read)))
            })
            .map_response(move |res| {
                finished.finished.fetch_add(1, Ordering::SeqCst);
                res
            });
        let io = GuardedIo::new(io, requests, timeouts);
        let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(?remote, error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Requests of one connection that reached the service, and those it answered.
#[derive(Debug, Default)]
struct RequestCount {
    started: AtomicU64,
    finished: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    /// A request is with the service (its body has its own deadline).
    Request,
    /// Answered; waiting for the first byte of the next request.
    Idle,
}

/// A client connection with the read deadline of its phase and a deadline on stalled writes.
struct GuardedIo<I> {
    io: I,
    requests: Arc<RequestCount>,
    /// Requests started when last looked at: a change means one began since.
    seen: u64,
    phase: Phase,
    timeouts: Timeouts,
    read_deadline: Option<Pin<Box<Sleep>>>,
    write_deadline: Option<Pin<Box<Sleep>>>,
}

impl<I> GuardedIo<I> {
    fn new(io: I, requests: Arc<RequestCount>, timeouts: Timeouts) -> Self {
        GuardedIo {
            io,
            requests,
            seen: 0,
            phase: Phase::Head,
            timeouts,
            read_deadline: None,
            write_deadline: None,
        }
    }

    /// Moves to the phase the service's counters say, dropping a deadline that belongs to
    /// the previous one.
    fn update_phase(&mut self) {
        let started = self.requests.started.load(Ordering::SeqCst);
        let finished = self.requests.finished.load(Ordering::SeqCst);
        let phase = if started != finished {
            Phase::Request
        } else if started != self.seen || self.phase == Phase::Request {
            Phase::Idle
        } else {
            self.phase
        };
        self.seen = started;
        if phase != self.phase {
            self.phase = phase;
            self.read_deadline = None;
        }
    }

    fn read_limit(&self) -> Option<Duration> {
        match self.phase {
            Phase::Head => self.timeouts.header_read,
            Phase::Idle => self.timeouts.idle,
            Phase::Request => None,
        }
    }
}

/// `Pending`, or a `TimedOut` error once `deadline` (armed on first use) has passed.
fn wait_or_time_out<T>(
    deadline: &mut Option<Pin<Box<Sleep>>>,
    limit: Option<Duration>,
    cx: &mut Context<'_>,
    what: &str,
) -> Poll<io::Result<T>> {
    let Some(limit) = limit else {
        return Poll::Pending;
    };
    let sleep = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
    match sleep.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} took longer than {limit:?}"),
        ))),
        Poll::Pending => Poll::Pending,
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for GuardedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.update_phase();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle && buf.filled().len() > before {
                    // The next request has begun: its head gets the head deadline.
                    this.phase = Phase::Head;
                    this.read_deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let limit = this.read_limit();
                let what = match this.phase {
                    Phase::Idle => "waiting for the next request",
                    _ => "reading the request head",
                };
                wait_or_time_out(&mut this.read_deadline, limit, cx, what)
            }
        }
    }
}

impl<I> GuardedIo<I> {
    /// A write, flush or vectored write that made no progress starts (or keeps) the send
    /// deadline; one that moved clears it.
    fn sending<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => wait_or_time_out(
                &mut self.write_deadline,
                self.timeouts.send,
                cx,
                "sending the response",
            ),
            ready => {
                self.write_deadline = None;
                ready
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for GuardedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.sending(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.sending(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.sending(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body that must be complete within its deadline, counted from the head.
struct DeadlineBody {
    inner: Incoming,
    limit: Option<Duration>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, limit: Option<Duration>) -> Self {
        DeadlineBody {
            inner,
            limit,
            deadline: limit.map(|d| Box::pin(tokio::time::sleep(d))),
        }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match (&mut this.deadline, this.limit) {
                (Some(sleep), Some(limit)) => match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(limit).into()))),
                    Poll::Pending => Poll::Pending,
                },
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `e` (or what caused it) is a [`BodyTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<BodyTimeout>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn timeouts(ms: u64) -> Timeouts {
        let d = Some(Duration::from_millis(ms));
        Timeouts {
            header_read: d,
            body_read: d,
            idle: Some(Duration::from_millis(ms * 4)),
            send: d,
        }
    }

    #[tokio::test]
    async fn a_head_that_does_not_arrive_times_out_and_an_idle_wait_is_longer() {
        let (client, server) = tokio::io::duplex(64);
        let requests = Arc::new(RequestCount::default());
        let mut io = GuardedIo::new(server, requests.clone(), timeouts(50));
        let mut buf = [0u8; 16];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        // After an answered request the connection may wait `idle`, longer than `header_read`.
        let mut io = GuardedIo::new(client, requests.clone(), timeouts(50));
        requests.started.store(1, Ordering::SeqCst);
        requests.finished.store(1, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_request_with_the_service_has_no_read_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        let requests = Arc::new(RequestCount::default());
        requests.started.store(1, Ordering::SeqCst);
        let mut io = GuardedIo::new(server, requests, timeouts(50));
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.write_all(b"x").await.unwrap();
            client
        });
        let mut buf = [0u8; 4];
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_the_response_is_given_up() {
        let (_client, server) = tokio::io::duplex(16);
        let mut io = GuardedIo::new(server, Arc::default(), timeouts(50));
        let err = io.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
