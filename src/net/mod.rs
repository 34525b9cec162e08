//! Transport: TLS configuration and the client stream type.

pub mod stream;
pub mod tls;
