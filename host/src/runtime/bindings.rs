//! The one place that runs `bindgen!` for the `lockstep:connector` worlds; everything else
//! uses the types generated here.
//!
//! The host serves three versions of the world. `sdk/rust/wit/` is 0.3.0 (the newest);
//! 0.2.0 and 0.1.0 are frozen in its `deps/lockstep-connector@0.2.0/` and
//! `deps/lockstep-connector@0.1.0/` and found by their fully qualified world names. All parse
//! the same directory, so the generated module paths carry the version
//! (`lockstep::connector0_3_0`, `lockstep::connector0_2_0`, `lockstep::connector0_1_0`).

/// `lockstep:connector@0.3.0`: 0.2.0 plus the `signing` interface.
pub mod v0_3_0 {
    wasmtime::component::bindgen!({
        path: "../sdk/rust/wit",
        world: "lockstep:connector/connector-core@0.3.0",
        exports: { default: async },
    });

    pub use lockstep::connector0_3_0::host::{Host, Level};
    pub use lockstep::connector0_3_0::session::{EventType, HookError, SessionEvent, SessionKind};
    pub use lockstep::connector0_3_0::signing::Host as SigningHost;
}

/// `lockstep:connector@0.2.0`, frozen: 0.1.0 plus the `on-refresh` hook and `expires-at`.
pub mod v0_2_0 {
    wasmtime::component::bindgen!({
        path: "../sdk/rust/wit",
        world: "lockstep:connector/connector-core@0.2.0",
        // Host functions (log, config-get, cache) never wait on I/O: sync calls skip the
        // future machinery on every import call.
        exports: { default: async },
    });

    pub use lockstep::connector0_2_0::host::{Host, Level};
    pub use lockstep::connector0_2_0::session::{EventType, HookError, SessionEvent, SessionKind};
}

/// `lockstep:connector@0.1.0`, frozen: what older components target.
pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        path: "../sdk/rust/wit",
        world: "lockstep:connector/connector-core@0.1.0",
        exports: { default: async },
    });

    pub use lockstep::connector0_1_0::host::{Host, Level};
    pub use lockstep::connector0_1_0::session::{EventType, HookError, SessionEvent, SessionKind};
}
