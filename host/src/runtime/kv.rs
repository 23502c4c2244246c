//! A small per-connector cache that outlives a hook call (each call runs in a fresh instance),
//! for values a connector should not fetch every time, such as an OAuth access token until it
//! expires. In memory only (a restart starts empty), scoped to one connector version, and
//! bounded so a connector cannot grow the host's memory through it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Entries one connector version may hold.
pub const MAX_ENTRIES: usize = 64;
/// Longest key.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest value.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// Longest lifetime of an entry.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

type Entries = HashMap<String, (String, Instant)>;

/// The caches of every connector version (cheap to clone).
#[derive(Clone, Default)]
pub struct Kv {
    scopes: Arc<Mutex<HashMap<String, Entries>>>,
}

impl Kv {
    fn with<T>(&self, scope: &str, f: impl FnOnce(&mut Entries) -> T) -> T {
        let mut scopes = match self.scopes.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(scopes.entry(scope.to_owned()).or_default())
    }

    /// The live value of `key` in `scope`.
    pub fn get(&self, scope: &str, key: &str) -> Option<String> {
        let now = Instant::now();
        self.with(scope, |entries| match entries.get(key) {
            Some((value, until)) if *until > now => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        })
    }

    /// Stores `value` under `key` for `ttl` (capped); refuses oversized keys or values, and
    /// evicts expired entries, then the one expiring first, to stay within [`MAX_ENTRIES`].
    pub fn set(&self, scope: &str, key: String, value: String, ttl: Duration) -> bool {
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES || ttl.is_zero() {
            return false;
        }
        let now = Instant::now();
        let until = now + ttl.min(MAX_TTL);
        self.with(scope, |entries| {
            if !entries.contains_key(&key) && entries.len() >= MAX_ENTRIES {
                entries.retain(|_, (_, u)| *u > now);
                if entries.len() >= MAX_ENTRIES
                    && let Some(first) = entries
                        .iter()
                        .min_by_key(|(_, (_, u))| *u)
                        .map(|(k, _)| k.clone())
                {
                    entries.remove(&first);
                }
            }
            entries.insert(key, (value, until));
            true
        })
    }

    /// Forgets a scope (its connector version was replaced or removed).
    pub fn drop_scope(&self, scope: &str) {
        if let Ok(mut scopes) = self.scopes.lock() {
            scopes.remove(scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_expire_are_scoped_and_bounded() {
        let kv = Kv::default();
        assert!(kv.set("a", "token".into(), "t1".into(), Duration::from_secs(60)));
        assert_eq!(kv.get("a", "token").as_deref(), Some("t1"));
        assert_eq!(kv.get("b", "token"), None, "scopes are separate");
        assert!(kv.set("a", "short".into(), "x".into(), Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(kv.get("a", "short"), None);
        assert!(!kv.set(
            "a",
            "k".repeat(MAX_KEY_BYTES + 1),
            "v".into(),
            Duration::from_secs(1)
        ));
        assert!(!kv.set(
            "a",
            "big".into(),
            "v".repeat(MAX_VALUE_BYTES + 1),
            Duration::from_secs(1)
        ));
        for i in 0..(MAX_ENTRIES * 2) {
            assert!(kv.set("a", format!("k{i}"), "v".into(), Duration::from_secs(60)));
        }
        let held = kv.with("a", |e| e.len());
        assert_eq!(held, MAX_ENTRIES);
        kv.drop_scope("a");
        assert_eq!(kv.get("a", "token"), None);
    }
}
