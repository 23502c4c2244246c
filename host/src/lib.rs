//! Lockstep keeps login sessions consistent between a modern identity provider (Keycloak)
//! and the legacy IAM systems that run beside it. This crate is the host service; `main.rs`
//! is a thin wrapper over [`cli::run`].

pub mod admin_client;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
pub mod devkit;
pub mod domain;
pub mod lifecycle;
pub mod oidc;
pub mod runtime;
pub mod store;
pub mod sync;
pub mod telemetry;
