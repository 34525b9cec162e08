//! The byte streams on both sides: plain TCP or TLS over TCP.

use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A client connection after TLS negotiation.
pub type ClientStream = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// A backend connection after TLS negotiation.
pub type BackendStream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;
