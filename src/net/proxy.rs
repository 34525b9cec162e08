//! PROXY protocol v2 (the binary header an AWS Network Load Balancer, HAProxy or a Kubernetes
//! load balancer puts in front of a TCP stream) so the audit trail records the real client
//! address, not the load balancer's.
//!
//! The header is read before anything else, with exact reads (nothing past it is consumed), and
//! parsed by the `ppp` crate. It is honoured only from the listener's trusted networks: a header
//! from anyone else is refused, because it would let a client choose the address it is audited
//! under. A PostgreSQL client's first byte is never `0x0D` (a startup length of 218 MB or more, or a
//! TLS record's 0x16), so `optional` can tell the two apart by one peeked byte.

use std::{borrow::Cow, net::SocketAddr};

use ipnet::IpNet;
use ppp::v2;
use tokio::{io::AsyncReadExt, net::TcpStream};

use crate::error::{sqlstate, ErrorKind, Reportable, UserFacing};

/// The 12-byte PROXY v2 signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Largest address + TLV block accepted (an NLB sends well under 100 bytes).
pub const MAX_PROXY_BODY: usize = 1024;

/// The listener's PROXY protocol mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyMode {
    /// No header is read (a header is then an invalid startup packet).
    #[default]
    Off,
    /// A header is read when a trusted peer sends one; connections without one are served too.
    Optional,
    /// Every connection must start with a header from a trusted peer.
    Required,
}

/// PROXY protocol settings of a listener.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    /// The mode.
    pub mode: ProxyMode,
    /// Peers (load balancers) whose headers are believed.
    pub trusted: Vec<IpNet>,
}

impl ProxySettings {
    fn trusts(&self, peer: SocketAddr) -> bool {
        let ip = peer.ip().to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The peer closed or a read failed.
    #[error("reading the PROXY header: {0}")]
    Io(std::io::Error),
    /// `required`, and the connection did not start with a header.
    #[error("no PROXY protocol v2 header")]
    Missing,
    /// A header (or, with `required`, a connection) from a peer outside the trusted networks.
    #[error("PROXY header from untrusted peer {0}")]
    Untrusted(SocketAddr),
    /// Not a valid v2 header.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    /// The header announces more than [`MAX_PROXY_BODY`] bytes.
    #[error("PROXY header body of {0} bytes is over the limit")]
    TooLong(usize),
}

impl Reportable for ProxyError {
    fn kind(&self) -> ErrorKind {
        match self {
            ProxyError::Io(_) => ErrorKind::ClientDisconnect,
            ProxyError::Missing
            | ProxyError::Untrusted(_)
            | ProxyError::Malformed(_)
            | ProxyError::TooLong(_) => ErrorKind::User,
        }
    }

    fn reason(&self) -> Cow<'static, str> {
        match self {
            ProxyError::Io(_) => "client_disconnected".into(),
            ProxyError::Missing => "proxy_header_missing".into(),
            ProxyError::Untrusted(_) => "proxy_header_untrusted".into(),
            ProxyError::Malformed(_) | ProxyError::TooLong(_) => "proxy_header_malformed".into(),
        }
    }
}

impl UserFacing for ProxyError {
    fn sqlstate(&self) -> &'static str {
        match self {
            ProxyError::Io(_)
            | ProxyError::Missing
            | ProxyError::Untrusted(_)
            | ProxyError::Malformed(_)
            | ProxyError::TooLong(_) => sqlstate::PROTOCOL_VIOLATION,
        }
    }

    fn client_message(&self) -> Cow<'static, str> {
        match self {
            ProxyError::Missing | ProxyError::Untrusted(_) => {
                "this idgate listener accepts connections only through its load balancer; connect to the load balancer's address".into()
            }
            ProxyError::Io(_) | ProxyError::Malformed(_) | ProxyError::TooLong(_) => {
                "invalid PROXY protocol header".into()
            }
        }
    }
}

/// Read the PROXY header the settings call for. Returns the client's address as the load balancer
/// saw it, or `None` when there is no header (`optional`) or it carries none (a `LOCAL` command,
/// e.g. the load balancer's own health check, or a UNIX-socket source).
///
/// Not cancel safe; the caller bounds it with the handshake timeout.
pub async fn read_header(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    settings: &ProxySettings,
) -> Result<Option<SocketAddr>, ProxyError> {
    if settings.mode == ProxyMode::Off {
        return Ok(None);
    }
    let trusted = settings.trusts(peer);
    if settings.mode == ProxyMode::Required && !trusted {
        return Err(ProxyError::Untrusted(peer));
    }
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.map_err(ProxyError::Io)?;
    if n == 0 {
        return Err(ProxyError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if first[0] != SIGNATURE[0] {
        return match settings.mode {
            ProxyMode::Required => Err(ProxyError::Missing),
            ProxyMode::Optional | ProxyMode::Off => Ok(None),
        };
    }
    if !trusted {
        return Err(ProxyError::Untrusted(peer));
    }
    let mut buf = vec![0u8; 16];
    tcp.read_exact(&mut buf).await.map_err(ProxyError::Io)?;
    if buf[..12] != SIGNATURE {
        return Err(ProxyError::Malformed("bad signature".into()));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_PROXY_BODY {
        return Err(ProxyError::TooLong(len));
    }
    buf.resize(16 + len, 0);
    tcp.read_exact(&mut buf[16..])
        .await
        .map_err(ProxyError::Io)?;
    let header =
        v2::Header::try_from(&buf[..]).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    if header.command == v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    fn header(source: &str) -> Vec<u8> {
        let src: SocketAddr = source.parse().unwrap();
        let dst: SocketAddr = if src.is_ipv4() {
            "192.0.2.1:5439".parse().unwrap()
        } else {
            "[2001:db8::1]:5439".parse().unwrap()
        };
        v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .unwrap()
    }

    async fn read_after(
        bytes: Vec<u8>,
        settings: ProxySettings,
    ) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&bytes).await.unwrap();
            c.write_all(b"rest").await.unwrap();
        });
        let (mut tcp, peer) = listener.accept().await.unwrap();
        let result = read_header(&mut tcp, peer, &settings).await;
        writer.await.unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
        (result, rest)
    }

    fn settings(mode: ProxyMode, trusted: &str) -> ProxySettings {
        ProxySettings {
            mode,
            trusted: vec![trusted.parse().unwrap()],
        }
    }

    #[tokio::test]
    async fn headers_are_read_exactly_and_trusted_only() {
        let required = settings(ProxyMode::Required, "127.0.0.0/8");
        let (r, rest) = read_after(header("203.0.113.7:40000"), required.clone()).await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:40000".parse().unwrap()));
        assert_eq!(rest, b"rest", "nothing after the header is consumed");
        let (r, _) = read_after(header("[2001:db8::7]:40000"), required.clone()).await;
        assert_eq!(r.unwrap(), Some("[2001:db8::7]:40000".parse().unwrap()));
        // LOCAL (a health check) carries no client address.
        let local = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        let (r, _) = read_after(local, required.clone()).await;
        assert_eq!(r.unwrap(), None);
        // No header where one is required; one from an untrusted peer; garbage.
        let (r, rest) = read_after(vec![0, 0, 0, 8, 4, 210, 22, 47], required.clone()).await;
        assert!(matches!(r, Err(ProxyError::Missing)), "{r:?}");
        assert_eq!(
            &rest[..4],
            &[0, 0, 0, 8],
            "a refused startup is not consumed"
        );
        let untrusted = settings(ProxyMode::Required, "10.0.0.0/8");
        let (r, _) = read_after(header("203.0.113.7:1"), untrusted).await;
        assert!(matches!(r, Err(ProxyError::Untrusted(_))), "{r:?}");
        let (r, _) = read_after(
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x01x".to_vec(),
            required.clone(),
        )
        .await;
        assert!(matches!(r, Err(ProxyError::Malformed(_))), "{r:?}");
        let (r, _) = read_after(b"\r\nxxxxxxxxxxxxxxxxxxx".to_vec(), required.clone()).await;
        assert!(matches!(r, Err(ProxyError::Malformed(_))), "{r:?}");
        let (r, _) = read_after(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec(), required).await;
        assert!(matches!(r, Err(ProxyError::TooLong(65535))), "{r:?}");
    }

    #[tokio::test]
    async fn optional_serves_connections_without_a_header_and_refuses_untrusted_ones() {
        let optional = settings(ProxyMode::Optional, "127.0.0.0/8");
        let (r, rest) = read_after(vec![0, 0, 0, 8, 4, 210, 22, 47], optional).await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(&rest[..4], &[0, 0, 0, 8]);
        let optional_untrusted = settings(ProxyMode::Optional, "10.0.0.0/8");
        let (r, _) = read_after(vec![0, 0, 0, 8, 4, 210, 22, 47], optional_untrusted.clone()).await;
        assert_eq!(
            r.unwrap(),
            None,
            "a direct client of an untrusted address is fine"
        );
        let (r, _) = read_after(header("203.0.113.7:1"), optional_untrusted).await;
        assert!(matches!(r, Err(ProxyError::Untrusted(_))), "{r:?}");
    }
}
