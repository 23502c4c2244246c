//! The domain: sessions and their rules, the commands that change them, the sync events
//! those changes emit and the audit records that describe them. Every layer uses these
//! types; nothing here knows HTTP, SQL or wasm, and this module imports no other of the
//! crate. Conversions to wire formats (JSON DTOs, SQL rows, WIT records) live at the edges.

pub mod rules;
pub mod session;

pub use session::*;
