//! The client handshake: TLS negotiation (SSLRequest, PostgreSQL 17 direct TLS, GSSENC declined)
//! up to a parsed StartupMessage or a CancelRequest, then the token exchange.
//!
//! Pre-TLS reads are unbuffered and exact, so bytes a client pipelines behind its SSLRequest are
//! fed to the TLS handshake (where they fail) and are never read as protocol messages.

use std::{borrow::Cow, net::SocketAddr, sync::Arc};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_util::either::Either;

use crate::{
    error::{sqlstate, ErrorKind, Reportable, UserFacing},
    net::{stream::ClientStream, tls::ALPN_POSTGRESQL},
    protocol::{
        frame::{read_frame, FrameError},
        messages,
        startup::{read_initial_packet, CancelKey, InitialPacket, StartupError, StartupMessage},
    },
};

/// Largest token accepted (bytes), and so the cap on the `'p'` / `'i'` message.
pub const MAX_TOKEN_MESSAGE: usize = 65_536 + 64;

/// TLS facts for the audit trail.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// Protocol version, e.g. `TLSv1_3`.
    pub version: Option<String>,
    /// SNI host name.
    pub sni: Option<String>,
    /// Whether the client used direct TLS (no SSLRequest).
    pub direct: bool,
}

/// Outcome of the handshake.
pub enum Handshake {
    /// A session start, on its (possibly TLS) stream.
    Startup {
        /// The stream.
        stream: ClientStream,
        /// The startup message.
        startup: StartupMessage,
        /// TLS facts; `None` for plaintext.
        tls: Option<TlsInfo>,
    },
    /// A CancelRequest.
    Cancel(CancelKey),
}

/// A handshake failure. The client-facing text says what to change.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client closed or a read failed.
    #[error("client closed the connection: {0}")]
    Disconnected(std::io::Error),
    /// The first packets were malformed.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// A plaintext startup where TLS is required.
    #[error("plaintext connection refused")]
    TlsRequired,
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// Direct TLS without ALPN `postgresql`.
    #[error("direct TLS without ALPN \"postgresql\"")]
    DirectTlsWithoutAlpn,
    /// A negotiation request where a startup message was expected.
    #[error("unexpected {0} after encryption negotiation")]
    UnexpectedRequest(&'static str),
    /// The client sent another message than the expected authentication answer.
    #[error("expected message {expected:?}, got {got:?}")]
    UnexpectedMessage {
        /// Expected type byte.
        expected: char,
        /// Received type byte.
        got: char,
    },
    /// The authentication message was malformed or too large.
    #[error("authentication message: {0}")]
    Frame(#[from] FrameError),
    /// The token was empty or not UTF-8.
    #[error("token is empty or not UTF-8")]
    BadTokenEncoding,
    /// `handshake_timeout` passed before the startup packet was complete.
    #[error("timed out waiting for the startup packet")]
    StartupTimeout,
}

impl Reportable for HandshakeError {
    fn kind(&self) -> ErrorKind {
        match self {
            HandshakeError::Disconnected(_) | HandshakeError::Tls(_) => ErrorKind::ClientDisconnect,
            HandshakeError::Frame(FrameError::Io(_)) => ErrorKind::ClientDisconnect,
            HandshakeError::Startup(StartupError::Io(_)) => ErrorKind::ClientDisconnect,
            HandshakeError::Startup(_)
            | HandshakeError::TlsRequired
            | HandshakeError::DirectTlsWithoutAlpn
            | HandshakeError::UnexpectedRequest(_)
            | HandshakeError::UnexpectedMessage { .. }
            | HandshakeError::Frame(_)
            | HandshakeError::StartupTimeout
            | HandshakeError::BadTokenEncoding => ErrorKind::User,
        }
    }

    fn reason(&self) -> Cow<'static, str> {
        match self {
            HandshakeError::Disconnected(_) => "client_disconnected".into(),
            HandshakeError::Startup(StartupError::Io(_)) => "client_disconnected".into(),
            HandshakeError::Startup(StartupError::TooLong(_)) => "startup_packet_too_long".into(),
            HandshakeError::Startup(StartupError::TooShort(_)) => "startup_packet_too_short".into(),
            HandshakeError::Startup(StartupError::UnsupportedProtocol { .. }) => {
                "unsupported_protocol".into()
            }
            HandshakeError::Startup(StartupError::Malformed(_) | StartupError::DuplicateKey(_)) => {
                "malformed_startup_packet".into()
            }
            HandshakeError::TlsRequired => "tls_required".into(),
            HandshakeError::Tls(_) => "tls_handshake_failed".into(),
            HandshakeError::DirectTlsWithoutAlpn => "direct_tls_without_alpn".into(),
            HandshakeError::UnexpectedRequest(_) => "unexpected_negotiation".into(),
            HandshakeError::UnexpectedMessage { .. } => "unexpected_message".into(),
            HandshakeError::Frame(FrameError::Io(_)) => "client_disconnected".into(),
            HandshakeError::Frame(FrameError::TooLong { .. }) => "token_too_large".into(),
            HandshakeError::Frame(FrameError::BadLength(_)) => "malformed_message".into(),
            HandshakeError::BadTokenEncoding => "malformed_token".into(),
            HandshakeError::StartupTimeout => "handshake_timeout".into(),
        }
    }
}

impl UserFacing for HandshakeError {
    fn sqlstate(&self) -> &'static str {
        match self {
            HandshakeError::TlsRequired | HandshakeError::BadTokenEncoding => {
                sqlstate::INVALID_AUTHORIZATION
            }
            HandshakeError::Frame(FrameError::TooLong { .. }) => sqlstate::INVALID_AUTHORIZATION,
            HandshakeError::Disconnected(_)
            | HandshakeError::Startup(_)
            | HandshakeError::Tls(_)
            | HandshakeError::DirectTlsWithoutAlpn
            | HandshakeError::UnexpectedRequest(_)
            | HandshakeError::UnexpectedMessage { .. }
            | HandshakeError::StartupTimeout
            | HandshakeError::Frame(_) => sqlstate::PROTOCOL_VIOLATION,
        }
    }

    fn client_message(&self) -> Cow<'static, str> {
        match self {
            HandshakeError::TlsRequired => {
                "idgate requires TLS: connect with sslmode=require (or verify-full); tokens are never accepted in clear".into()
            }
            HandshakeError::Startup(StartupError::TooLong(_) | StartupError::TooShort(_)) => {
                "invalid startup packet length: this port speaks the PostgreSQL protocol; connect with a PostgreSQL or Redshift driver".into()
            }
            HandshakeError::Startup(StartupError::UnsupportedProtocol { major, minor }) => {
                format!("unsupported frontend protocol {major}.{minor}: idgate speaks protocol 3.0").into()
            }
            HandshakeError::Startup(e) => format!("invalid startup packet: {e}").into(),
            HandshakeError::DirectTlsWithoutAlpn => {
                "direct TLS connections must offer ALPN \"postgresql\" (use sslnegotiation=postgres or a PostgreSQL 17 client)".into()
            }
            HandshakeError::UnexpectedRequest(what) => format!("protocol violation: unexpected {what}").into(),
            HandshakeError::UnexpectedMessage { expected: 'i', .. } => {
                "protocol violation: expected the access token in an 'i' message (Redshift native IdP)".into()
            }
            HandshakeError::UnexpectedMessage { .. } => {
                "protocol violation: expected the access token as the password ('p' message)".into()
            }
            HandshakeError::Frame(FrameError::TooLong { .. }) => {
                "authentication failed: the access token is larger than 64 KiB".into()
            }
            HandshakeError::BadTokenEncoding => {
                "authentication failed: the access token is empty or not text; send a Microsoft Entra ID access token".into()
            }
            HandshakeError::StartupTimeout => {
                "timed out waiting for the startup packet; check that the client speaks the PostgreSQL protocol".into()
            }
            HandshakeError::Frame(_) => {
                "protocol violation: a message during login had an invalid length; connect with a PostgreSQL or Redshift driver".into()
            }
            HandshakeError::Disconnected(_) | HandshakeError::Tls(_) => "protocol violation".into(),
        }
    }
}

/// Run encryption negotiation up to a StartupMessage or CancelRequest.
///
/// On failure, returns the stream (when it can still carry an ErrorResponse) with the error.
/// A startup packet still incomplete at `deadline` is answered with an ErrorResponse; the caller
/// bounds the whole call (the TLS handshake included) by the same deadline.
/// Not cancel safe.
pub async fn negotiate(
    mut tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<&Arc<rustls::ServerConfig>>,
    allow_plaintext: bool,
    deadline: tokio::time::Instant,
) -> Result<Handshake, (Option<ClientStream>, HandshakeError)> {
    // PostgreSQL 17 direct TLS: the first byte is a TLS handshake record.
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => {
            return Err((
                None,
                HandshakeError::Disconnected(std::io::ErrorKind::UnexpectedEof.into()),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err((None, HandshakeError::Disconnected(e))),
    }
    if first[0] == 0x16 {
        let Some(config) = tls else {
            return Err((None, HandshakeError::TlsRequired));
        };
        let (stream, info) = accept_tls(tcp, config, true).await?;
        return after_tls(stream, info, deadline).await;
    }
    let mut gss_declined = false;
    loop {
        let packet = match tokio::time::timeout_at(deadline, read_initial_packet(&mut tcp)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err((Some(Either::Left(tcp)), e.into())),
            Err(_) => return Err((Some(Either::Left(tcp)), HandshakeError::StartupTimeout)),
        };
        match packet {
            InitialPacket::SslRequest => match tls {
                Some(config) => {
                    if let Err(e) = tcp.write_all(b"S").await {
                        return Err((None, HandshakeError::Disconnected(e)));
                    }
                    let (stream, info) = accept_tls(tcp, config, false).await?;
                    return after_tls(stream, info, deadline).await;
                }
                None => {
                    if let Err(e) = tcp.write_all(b"N").await {
                        return Err((None, HandshakeError::Disconnected(e)));
                    }
                }
            },
            InitialPacket::GssEncRequest if !gss_declined => {
                gss_declined = true;
                if let Err(e) = tcp.write_all(b"N").await {
                    return Err((None, HandshakeError::Disconnected(e)));
                }
            }
            InitialPacket::GssEncRequest => {
                return Err((
                    Some(Either::Left(tcp)),
                    HandshakeError::UnexpectedRequest("second GSSENCRequest"),
                ))
            }
            InitialPacket::Cancel(key) => return Ok(Handshake::Cancel(key)),
            InitialPacket::Startup(startup) => {
                if allow_plaintext && peer.ip().is_loopback() {
                    return Ok(Handshake::Startup {
                        stream: Either::Left(tcp),
                        startup,
                        tls: None,
                    });
                }
                return Err((Some(Either::Left(tcp)), HandshakeError::TlsRequired));
            }
        }
    }
}

async fn accept_tls(
    tcp: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    direct: bool,
) -> Result<(ClientStream, TlsInfo), (Option<ClientStream>, HandshakeError)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
    let stream = acceptor
        .accept(tcp)
        .await
        .map_err(|e| (None, HandshakeError::Tls(e)))?;
    let conn = stream.get_ref().1;
    let info = TlsInfo {
        version: conn.protocol_version().map(|v| format!("{v:?}")),
        sni: conn.server_name().map(str::to_owned),
        direct,
    };
    let alpn_ok = conn.alpn_protocol() == Some(ALPN_POSTGRESQL);
    let stream: ClientStream = Either::Right(Box::new(stream));
    if direct && !alpn_ok {
        return Err((Some(stream), HandshakeError::DirectTlsWithoutAlpn));
    }
    Ok((stream, info))
}

async fn after_tls(
    mut stream: ClientStream,
    info: TlsInfo,
    deadline: tokio::time::Instant,
) -> Result<Handshake, (Option<ClientStream>, HandshakeError)> {
    let packet = tokio::time::timeout_at(deadline, read_initial_packet(&mut stream)).await;
    let Ok(packet) = packet else {
        return Err((Some(stream), HandshakeError::StartupTimeout));
    };
    match packet {
        Ok(InitialPacket::Startup(startup)) => Ok(Handshake::Startup {
            stream,
            startup,
            tls: Some(info),
        }),
        Ok(InitialPacket::Cancel(key)) => Ok(Handshake::Cancel(key)),
        Ok(InitialPacket::SslRequest) => Err((
            Some(stream),
            HandshakeError::UnexpectedRequest("SSLRequest inside TLS"),
        )),
        Ok(InitialPacket::GssEncRequest) => Err((
            Some(stream),
            HandshakeError::UnexpectedRequest("GSSENCRequest inside TLS"),
        )),
        Err(e) => Err((Some(stream), e.into())),
    }
}

/// Protocol negotiation answers owed before authentication: CompressionAck for
/// `_pq_.compression` (redshift-wire.md §4.5), NegotiateProtocolVersion for a newer minor version
/// or other `_pq_.*` options.
pub fn negotiation_replies(startup: &StartupMessage, out: &mut Vec<u8>) {
    let mut unrecognized = Vec::new();
    let mut compression = false;
    for (key, _) in &startup.protocol_options {
        if key == "_pq_.compression" {
            compression = true;
        } else {
            unrecognized.push(key.clone());
        }
    }
    if compression {
        messages::compression_ack_none(out);
    }
    if startup.minor_version > 0 || !unrecognized.is_empty() {
        messages::negotiate_protocol_version(out, 0, &unrecognized);
    }
}

/// How the client sends its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCarriage {
    /// Redshift native IdP: AuthenticationRequest 14, `'i'` message.
    RedshiftIdp,
    /// AuthenticationCleartextPassword, `'p'` message.
    Password,
}

impl TokenCarriage {
    /// For the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenCarriage::RedshiftIdp => "redshift_idp",
            TokenCarriage::Password => "password",
        }
    }
}

/// Ask for the token and read it. Strips one trailing NUL.
///
/// Not cancel safe.
pub async fn read_token(
    stream: &mut ClientStream,
    carriage: TokenCarriage,
    mut pending: Vec<u8>,
) -> Result<crate::types::Secret<String>, HandshakeError> {
    let (code, tag) = match carriage {
        TokenCarriage::RedshiftIdp => (messages::AUTH_REDSHIFT_IDP, b'i'),
        TokenCarriage::Password => (messages::AUTH_CLEARTEXT_PASSWORD, b'p'),
    };
    messages::authentication(&mut pending, code);
    stream
        .write_all(&pending)
        .await
        .map_err(HandshakeError::Disconnected)?;
    stream.flush().await.map_err(HandshakeError::Disconnected)?;
    let frame = read_frame(stream, MAX_TOKEN_MESSAGE).await?;
    if frame.tag != tag {
        return Err(HandshakeError::UnexpectedMessage {
            expected: tag as char,
            got: frame.tag as char,
        });
    }
    let mut body = frame.body;
    if body.last() == Some(&0) {
        body.pop();
    }
    let mut token = String::from_utf8(body).map_err(|_| HandshakeError::BadTokenEncoding)?;
    // A token read from a file often ends in a newline (`az … -o tsv > f`); a JWT never
    // contains whitespace, so trailing whitespace is dropped rather than refused.
    let trimmed = token.trim_end().len();
    token.truncate(trimmed);
    if token.is_empty() {
        return Err(HandshakeError::BadTokenEncoding);
    }
    Ok(crate::types::Secret::new(token))
}
