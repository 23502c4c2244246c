//! Logging through the host (tagged there with the connector and event; length- and
//! count-capped per call).

use crate::wit::lockstep::connector0_3_0::host::{self, Level};

/// Debug detail.
pub fn debug(message: &str) {
    host::log(Level::Debug, message);
}

/// Normal operation.
pub fn info(message: &str) {
    host::log(Level::Info, message);
}

/// Something odd that did not fail the hook.
pub fn warn(message: &str) {
    host::log(Level::Warn, message);
}

/// A failure.
pub fn error(message: &str) {
    host::log(Level::Error, message);
}
