//! Write [Lockstep](https://example.invalid/lockstep) connectors in Rust.
//!
//! A connector is a WebAssembly component targeting the `lockstep:connector@0.3.0` world: the
//! host calls its hooks whenever a session begins, ends or is extended, and the connector
//! tells a legacy system about it. This crate gives you the bindings, a [`Connector`] trait
//! whose hooks default to "nothing to do", typed access to the connector's `[config]`,
//! logging, an HTTP client over `wasi:http` that maps failures to the right [`HookError`], and
//! [`signing`]: the current event as a Security Event Token signed by Lockstep.
//!
//! ```no_run
//! use lockstep_connector::{Connector, HookError, SessionEvent, config, http};
//!
//! struct Legacy;
//!
//! impl Connector for Legacy {
//!     fn on_logout(event: SessionEvent) -> Result<(), HookError> {
//!         let base = config::require("url")?;
//!         let url = format!("{base}/sessions/{}", event.external_id);
//!         let response = http::Request::delete(&url).send()?;
//!         match response.status {
//!             200..=299 | 404 => Ok(()),
//!             _ => Err(response.into_hook_error()),
//!         }
//!     }
//! }
//!
//! lockstep_connector::export_connector!(Legacy);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component to load.
#![deny(missing_docs)]

pub mod cache;
pub mod config;
pub mod http;
pub mod json;
pub mod log;
pub mod signing;

/// Generated bindings of the `connector-core` world of `lockstep:connector@0.3.0`. Use the
/// re-exports instead. (`wit/` also holds the frozen 0.1.0 and 0.2.0 packages, so generated
/// module paths carry the version.)
#[doc(hidden)]
#[allow(missing_docs, clippy::all, unsafe_code)]
pub mod wit {
    wit_bindgen::generate!({
        path: "wit",
        world: "lockstep:connector/connector-core@0.3.0",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "lockstep_connector::wit",
        generate_all,
    });
}

pub use wit::lockstep::connector0_3_0::session::{EventType, HookError, SessionEvent, SessionKind};

/// A connector's hooks. Each defaults to doing nothing, so implement only what the legacy
/// system needs. Return [`HookError::Retry`] when trying again can help (the peer is down,
/// timed out or answered 5xx) and [`HookError::Fail`] when it cannot (bad configuration,
/// 4xx); the host applies the connector's failure policy.
pub trait Connector {
    /// A session began.
    fn on_login(event: SessionEvent) -> Result<(), HookError> {
        let _ = event;
        Ok(())
    }

    /// A session ended.
    fn on_logout(event: SessionEvent) -> Result<(), HookError> {
        let _ = event;
        Ok(())
    }

    /// A user's grants were revoked.
    fn revoke(event: SessionEvent) -> Result<(), HookError> {
        let _ = event;
        Ok(())
    }

    /// A session's lifetime was extended; [`SessionEvent::expires_at`] is the new expiry.
    /// Delivered only if the manifest lists `refresh` in `events`.
    fn on_refresh(event: SessionEvent) -> Result<(), HookError> {
        let _ = event;
        Ok(())
    }
}

impl<T: Connector> wit::exports::lockstep::connector0_3_0::hooks::Guest for T {
    fn on_login(event: SessionEvent) -> Result<(), HookError> {
        <T as Connector>::on_login(event)
    }

    fn on_logout(event: SessionEvent) -> Result<(), HookError> {
        <T as Connector>::on_logout(event)
    }

    fn revoke(event: SessionEvent) -> Result<(), HookError> {
        <T as Connector>::revoke(event)
    }

    fn on_refresh(event: SessionEvent) -> Result<(), HookError> {
        <T as Connector>::on_refresh(event)
    }
}

/// Exports a [`Connector`] implementation as the component's hooks. Use it once per crate.
#[macro_export]
macro_rules! export_connector {
    ($connector:ident) => {
        $crate::wit::export!($connector with_types_in $crate::wit);
    };
}

impl SessionEvent {
    /// The value of an attribute, if present.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl EventType {
    /// `login`, `logout`, `revoke` or `refresh`.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventType::Login => "login",
            EventType::Logout => "logout",
            EventType::Revoke => "revoke",
            EventType::Refresh => "refresh",
        }
    }
}

impl SessionKind {
    /// `PARENT`, `CHILD` or `FIXED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionKind::Parent => "PARENT",
            SessionKind::Child => "CHILD",
            SessionKind::Fixed => "FIXED",
        }
    }
}
