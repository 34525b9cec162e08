//! Transport: TLS configuration, the PROXY protocol header and the client stream type.

pub mod proxy;
pub mod stream;
pub mod tls;
