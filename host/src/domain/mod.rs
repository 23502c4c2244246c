//! The domain: sessions and their rules, the commands that change them, the sync events
//! those changes emit and the audit records that describe them. Every layer uses these
//! types; nothing here knows HTTP, SQL or wasm, and this module imports no other of the
//! crate. Conversions to wire formats (JSON DTOs, SQL rows, WIT records) live at the edges.

/// Declares a closed string enum with a canonical spelling, used in SQL, JSON and logs alike.
///
/// The spelling is taken as a `tt`, not a `literal`: a `literal` fragment reaches derive macros
/// wrapped in an invisible group, which serde unwraps but utoipa's `ToSchema` does not — the
/// OpenAPI document then listed the Rust names (`Active`) instead of the wire names (`ACTIVE`).
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:tt),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical spelling (SQL, JSON, logs).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::domain::UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err($crate::domain::UnknownValue { kind: stringify!($name), value: other.to_owned() }),
                }
            }
        }
    };
}

pub mod audit;
pub mod command;
pub mod event;
pub mod problem;
pub mod rules;
pub mod session;

pub use audit::{AuditAction, AuditEntry, AuditOutcome};
pub use command::{
    DestroyCommand, DestroyTarget, IdpChange, IdpCommand, IdpOutcome, MapCommand, ReplayGuard,
    ReplayKind,
};
pub use event::{EventType, SyncEvent};
pub use problem::ProblemCode;
pub use session::{
    Attributes, DEFAULT_IDP_SYSTEM, EndReason, NewSession, Session, SessionKind, SessionStatus,
};

/// A string that is not one of an enum's spellings (a corrupt row or bad input).
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} value {value:?}")]
pub struct UnknownValue {
    /// The enum that was being parsed.
    pub kind: &'static str,
    /// The offending text.
    pub value: String,
}
