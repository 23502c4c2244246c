//! Limits at the HTTP edge: a token bucket per caller (429 with `Retry-After`), one of failed
//! authentications per client address, and a listener that keeps at most
//! `max_client_connections` client connections open. All are per instance: with N instances
//! behind a balancer a caller's effective rate is up to N times the setting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Above this many tracked callers, buckets that have refilled completely are forgotten
/// (a full bucket is the same as no bucket), so the map stays as small as the active callers.
const PRUNE_ABOVE: usize = 4_096;

/// A token bucket per caller: `rate` requests per second sustained, `burst` at once.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `rate` requests per second per caller, up to `burst` at once (both at least 1).
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The sustained rate and the burst, as configured.
    pub fn describe(&self) -> String {
        format!("{} requests/s, burst {}", self.rate, self.burst)
    }

    /// Takes one request from `caller`'s budget at `now`; when it is empty, how long until the
    /// next request would be accepted.
    pub fn check(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        // A poisoned lock only means another request panicked mid-update of a counter.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.refilled(now, rate, burst) < burst);
        }
        let bucket = buckets.entry(caller.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = bucket.refilled(now, self.rate, self.burst);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

impl Bucket {
    fn refilled(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

/// Client addresses whose failures [`AuthFailures`] remembers at most: a flood from many
/// addresses costs bounded memory (the least recently failed are forgotten first).
const MAX_FAILING_ADDRESSES: usize = 16_384;

/// Failed authentications per client address: each address may fail `burst` times, then
/// once per `60 / per_minute` seconds. While its budget is empty, every request from it that
/// needs a credential is refused (429) before the credential is looked at, so guessing keys
/// or tokens (and the token verification it costs) is slowed to that rate. Successes cost
/// nothing. IPv6 addresses count per /64, what one host usually holds.
#[derive(Debug)]
pub struct AuthFailures {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl AuthFailures {
    /// `per_minute` failures sustained per address, `burst` at once (both at least 1).
    pub fn new(per_minute: u32, burst: u32) -> Self {
        AuthFailures {
            rate: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The limit, as configured.
    pub fn describe(&self) -> String {
        format!(
            "{} failed authentications at once, then {} per minute",
            self.burst,
            self.rate * 60.0
        )
    }

    /// How long `addr` must wait when it has no failures left at `now`.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match buckets.get(&client_key(addr)) {
            Some(b) => {
                let tokens = b.refilled(now, self.rate, self.burst);
                if tokens >= 1.0 {
                    Ok(())
                } else {
                    Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
                }
            }
            None => Ok(()),
        }
    }

    /// Counts one failed authentication from `addr` at `now`.
    pub fn failed(&self, addr: IpAddr, now: Instant) {
        // A poisoned lock only means another request panicked mid-update of a counter.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = client_key(addr);
        if !buckets.contains_key(&key) && buckets.len() >= MAX_FAILING_ADDRESSES {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.refilled(now, rate, burst) < burst);
            if buckets.len() >= MAX_FAILING_ADDRESSES {
                // Forget the eighth that failed longest ago, so this sort runs once per many
                // new addresses, not for each.
                let mut by_age: Vec<(Instant, IpAddr)> =
                    buckets.iter().map(|(k, b)| (b.at, *k)).collect();
                by_age.sort_unstable();
                for (_, k) in by_age.iter().take(MAX_FAILING_ADDRESSES / 8) {
                    buckets.remove(k);
                }
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        *bucket = Bucket {
            tokens: (bucket.refilled(now, self.rate, self.burst) - 1.0).max(0.0),
            at: now,
        };
    }
}

/// One client address's failed-authentication budget, as every route that takes a credential
/// (the admin API, token revocation, SSF push, the console's sign-in) checks and spends it.
#[derive(Clone, Copy)]
pub struct FailureGate<'a> {
    failures: &'a AuthFailures,
    addr: IpAddr,
}

impl<'a> FailureGate<'a> {
    /// The gate for `addr`; none when the server keeps no budget or the request came over no
    /// socket (in-process tests).
    pub fn new(failures: Option<&'a AuthFailures>, addr: Option<IpAddr>) -> Option<Self> {
        failures
            .zip(addr)
            .map(|(failures, addr)| FailureGate { failures, addr })
    }

    /// The gate for the peer of a request that came through `serve` (which records it).
    pub fn of_request(
        failures: Option<&'a AuthFailures>,
        extensions: &axum::http::Extensions,
    ) -> Option<Self> {
        let peer = extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        FailureGate::new(failures, peer)
    }

    /// Refuses the address while it has no failures left: before its credential is looked at.
    pub fn check(&self) -> Result<(), OverBudget> {
        self.failures
            .check(self.addr, Instant::now())
            .map_err(|wait| OverBudget {
                detail: format!(
                    "too many failed authentications from this address: the limit is {} \
                     ([limits] failed_auth_burst, failed_auth_per_minute)",
                    self.failures.describe()
                ),
                retry_after_secs: retry_after_secs(wait),
            })
    }

    /// Spends one failure: the credential was refused.
    pub fn failed(&self) {
        self.failures.failed(self.addr, Instant::now());
    }
}

/// An address out of failed authentications: why, and when to try again.
#[derive(Debug)]
pub struct OverBudget {
    /// What to tell the caller (the limit and the settings behind it).
    pub detail: String,
    /// Seconds for `Retry-After`.
    pub retry_after_secs: u64,
}

impl From<OverBudget> for super::error::ApiError {
    fn from(o: OverBudget) -> Self {
        super::error::ApiError::RateLimited {
            detail: o.detail,
            retry_after_secs: o.retry_after_secs,
        }
    }
}

/// The address failures are counted under: IPv4 as is (also when mapped into IPv6), IPv6 by
/// its /64 prefix.
fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// A TCP listener that accepts a connection only while fewer than `max` are open; the rest
/// wait in the kernel's listen backlog until one closes.
pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
}

impl LimitedListener {
    /// Wraps `inner`, allowing `max` open connections.
    pub fn new(inner: TcpListener, max: usize) -> Self {
        LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                tracing::warn!(
                    max_client_connections = self.max,
                    "connection limit reached; new connections wait until one closes"
                );
                match self.permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    // The semaphore is never closed; if it were, accept without a limit
                    // rather than stop serving.
                    Err(_) => {
                        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
                        return (
                            LimitedStream {
                                stream,
                                _permit: None,
                            },
                            addr,
                        );
                    }
                }
            }
        };
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            LimitedStream {
                stream,
                _permit: Some(permit),
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A client connection holding its place under the connection limit until dropped.
pub struct LimitedStream {
    stream: TcpStream,
    _permit: Option<OwnedSemaphorePermit>,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("key:a", t0).is_ok());
        }
        let wait = limiter.check("key:a", t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another caller has its own budget.
        assert!(limiter.check("key:b", t0).is_ok());
        // 100 ms later one token has come back, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.check("key:a", t1).is_ok());
        assert!(limiter.check("key:a", t1).is_err());
        // Refilling never goes above the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check("key:a", t2).is_ok());
        }
        assert!(limiter.check("key:a", t2).is_err());
    }

    #[test]
    fn idle_callers_are_forgotten_once_many_are_tracked() {
        let limiter = RateLimiter::new(1, 1);
        let t0 = Instant::now();
        for i in 0..=PRUNE_ABOVE {
            let _ = limiter.check(&format!("token:{i}@r"), t0);
        }
        let later = t0 + Duration::from_secs(5);
        assert!(limiter.check("token:new@r", later).is_ok());
        let kept = limiter.buckets.lock().unwrap().len();
        assert_eq!(kept, 1, "only the caller seen after the refill is tracked");
    }

    #[test]
    fn an_address_that_fails_too_often_waits_and_successes_cost_nothing() {
        let failures = AuthFailures::new(60, 3);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(failures.check(ip, t0).is_ok());
            failures.failed(ip, t0);
        }
        let wait = failures.check(ip, t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Checking is free: a blocked address is not pushed further back by asking.
        assert_eq!(failures.check(ip, t0).unwrap_err(), wait);
        assert!(failures.check("192.0.2.8".parse().unwrap(), t0).is_ok());
        // One failure a second comes back (60 a minute).
        assert!(failures.check(ip, t0 + Duration::from_secs(1)).is_ok());
        // Every address of one IPv6 /64 shares a budget; a mapped IPv4 is that IPv4.
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..3 {
            failures.failed(a, t0);
        }
        assert!(failures.check(b, t0).is_err());
        assert!(
            failures
                .check("::ffff:192.0.2.7".parse().unwrap(), t0)
                .is_err()
        );
    }

    #[test]
    fn failing_addresses_take_bounded_memory() {
        let failures = AuthFailures::new(1, 1);
        let t0 = Instant::now();
        for i in 0..(MAX_FAILING_ADDRESSES as u32 + 1_000) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            failures.failed(ip, t0 + Duration::from_micros(u64::from(i)));
        }
        let tracked = failures.buckets.lock().unwrap().len();
        assert!(tracked <= MAX_FAILING_ADDRESSES, "{tracked}");
        // The latest failures are the ones remembered.
        let last = IpAddr::V4(std::net::Ipv4Addr::from(
            0x0a00_0000 + MAX_FAILING_ADDRESSES as u32 + 999,
        ));
        assert!(failures.check(last, t0 + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
    }
}
