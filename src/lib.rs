//! idgate: an identity-aware gateway for the PostgreSQL / Amazon Redshift wire protocol.
//!
//! ```text
//! client ─TCP─▶ handshake (SSLRequest/direct TLS, GSSENC → N, CancelRequest)
//!        ─▶ token exchange (Redshift code 14 + 'i', or token as password)
//!        ─▶ auth (JWKS-cached Entra validation) ─▶ identity (aad:alice@corp.com + roles)
//!        ─▶ backend login as that identity ─▶ relay bytes ─▶ session_ended audit event
//! ```
//!
//! The library binds no port and reads no environment: [`run`] takes a bound listener, a
//! validated [`config::Config`] and a cancellation token, so tests can start many gateways in one
//! process.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::todo,
    clippy::dbg_macro,
    clippy::panic
)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod ca;
pub mod cancel;
pub mod config;
pub mod devcerts;
pub mod devidp;
pub mod error;
pub mod gateway;
pub mod identity;
pub mod metrics;
pub mod net;
pub mod pgcluster;
pub mod protocol;
pub mod relay;
pub mod routing;
pub mod session;
pub mod types;

pub use gateway::{run, run_with, ConfigLoader, Listeners, RunError, RunOptions};
