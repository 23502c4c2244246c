//! Every integration test that needs no Keycloak and no browser, in one test binary: each
//! former `tests/*.rs` file is a module here, so a test is still named and filtered by its
//! file (`cargo test -p lockstep --test all sync_engine::`). One binary links the crate and
//! its dependencies (wasmtime, sqlx...) once instead of once per file.
//!
//! The modules share one process and run side by side: a test must not change anything
//! process-wide (environment variables, the working directory, a fixed port) and names what
//! it creates uniquely (each server gets a fresh SQLite file or PostgreSQL database of its
//! own through `common`).

// `#[macro_use]`: `on_both_backends!` is used by the modules below.
#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod audit;
mod backchannel;
mod external_sessions;
mod handlers;
mod hot_loading;
mod idp_events;
mod languages;
mod limits;
mod observability;
mod otlp;
mod proptest_api;
mod proptest_logout;
mod receipts;
mod runtime;
mod scale_out;
mod ssf;
mod sync_engine;
