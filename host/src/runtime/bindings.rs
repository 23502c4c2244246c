//! The one place that runs `bindgen!` for the `lockstep:connector` world; everything else
//! uses the types generated here.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "connector-core",
    // Host functions (log, config-get) never wait on I/O: sync calls skip the future
    // machinery on every import call.
    exports: { default: async },
});

pub use lockstep::connector::host::Level;
pub use lockstep::connector::session::{EventType, HookError, SessionEvent, SessionKind};
