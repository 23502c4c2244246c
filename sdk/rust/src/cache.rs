//! Values kept between hook calls (each call runs in a fresh instance), such as an access
//! token until it expires. The host keeps them in memory, per connector version, and bounds
//! them (24 h, 256-byte keys, 16 KiB values, 64 entries); treat a miss as normal.

use std::time::Duration;

use crate::wit::lockstep::connector0_3_0::host;

/// The value stored under `key`, unless it expired or was never stored.
pub fn get(key: &str) -> Option<String> {
    host::cache_get(key)
}

/// Stores `value` under `key` for `ttl`.
pub fn set(key: &str, value: &str, ttl: Duration) {
    host::cache_set(
        key,
        value,
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
    );
}
