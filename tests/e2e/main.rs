//! End-to-end tests: real PostgreSQL clusters, the dev IdP over HTTP, idgate in-process, and real
//! clients (tokio-postgres, psql, redshift_connector, psycopg, pgjdbc). One binary, many modules.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

mod audit_logs;
mod audit_store;
mod backend_auth;
mod backend_password;
mod clients;
mod config_files;
mod dev_command;
mod jwks;
mod pools;
mod protocol;
mod raw;
mod refusals;
pub(crate) mod telemetry;
