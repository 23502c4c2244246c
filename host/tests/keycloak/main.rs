//! The integration tests that drive the shared test Keycloak of `cargo xtask keycloak start`
//! or a headless Chromium, apart from `tests/all` so that binary runs without either (filter
//! by file: `cargo test -p lockstep --test keycloak keycloak_events::`).
//!
//! There is one Keycloak for the whole binary, and the former test files change it in ways
//! another file's tests would notice (the `acme` realm's keys, its portal client's
//! back-channel logout URL, alice's sessions, a crash and restart). Each test that talks to
//! Keycloak therefore first takes [`common::keycloak::room`] for its file: tests of one file
//! run side by side as before, tests of different files never overlap.

// `#[macro_use]`: `on_both_backends!` is used by the modules below.
#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod console;
mod keycloak;
mod keycloak_connector;
mod keycloak_events;
mod keycloak_logout;
