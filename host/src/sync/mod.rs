//! The services of session synchronisation over the store and the runtime: the operations
//! the API offers (map, destroy, query), what each Keycloak event does, termination
//! receipts, the dispatcher, expiry and reconciliation. The types and rules they apply are
//! [`crate::domain`]'s. It knows nothing of HTTP; the store does the transactional work it
//! asks for.

pub mod admission;
pub mod dispatcher;
pub mod expiry;
pub mod idp_events;
pub mod receipts;
pub mod reconcile;
pub mod sessions;
pub mod ssf_streams;
pub mod ssf_transmit;
