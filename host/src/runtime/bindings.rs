//! The one place that runs `bindgen!` for the `lockstep:connector` world; everything else
//! uses the types generated here.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "connector-core",
    imports: { default: async },
    exports: { default: async },
});

pub use lockstep::connector::host::Level;
pub use lockstep::connector::session::{EventType, HookError, SessionEvent, SessionKind};
