//! Domain rules of session synchronisation: the session model, input limits, and the
//! operations the API offers (map, destroy, query) expressed over the store.
//! It knows nothing of HTTP; the store does the transactional work it asks for.

pub mod admission;
pub mod dispatcher;
pub mod expiry;
pub mod idp_events;
pub mod model;
pub mod receipts;
pub mod reconcile;
pub mod sessions;
pub mod validate;
