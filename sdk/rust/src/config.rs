//! The connector's `[config]` table from its manifest.

use crate::HookError;
use crate::wit::lockstep::connector0_3_0::host;

/// A config value, if the manifest sets it.
pub fn get(key: &str) -> Option<String> {
    host::config_get(key)
}

/// A config value that must be present; a missing one is a permanent failure (retrying
/// cannot fix a manifest).
pub fn require(key: &str) -> Result<String, HookError> {
    get(key).ok_or_else(|| HookError::Fail(format!("config key `{key}` is not set")))
}

/// A config value parsed as a number, or `default` when absent.
pub fn get_u64(key: &str, default: u64) -> Result<u64, HookError> {
    match get(key) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| {
            HookError::Fail(format!("config key `{key}` must be a number, got {v:?}"))
        }),
    }
}
