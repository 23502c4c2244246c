//! A real HTTP server on 127.0.0.1 standing in for a legacy system: records every request
//! and answers with a status the test chooses. Stops when dropped. `testkit::Receiver` with
//! the tests' manners: a failure to start panics, and `wait_for` asserts.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

pub use testkit::Recorded;

pub struct Receiver(testkit::Receiver);

impl std::ops::Deref for Receiver {
    type Target = testkit::Receiver;

    fn deref(&self) -> &testkit::Receiver {
        &self.0
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        Receiver(testkit::Receiver::start().await.unwrap())
    }

    pub async fn start_on(addr: &str) -> Receiver {
        Receiver(testkit::Receiver::start_on(addr).await.unwrap())
    }

    /// Waits (bounded) until at least `n` requests arrived; returns them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let got = self.0.wait_for(n, timeout).await;
        assert!(
            got.len() >= n,
            "expected {n} requests within {timeout:?}, got {}",
            got.len()
        );
        got
    }
}
