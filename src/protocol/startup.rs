//! The client's first packets: SSLRequest, GSSENCRequest, CancelRequest and the StartupMessage.
//!
//! Length-capped at [`MAX_STARTUP_PACKET_LEN`] (PostgreSQL's own limit); values are UTF-8; a key
//! with an empty value is treated as absent (the Python Redshift driver sends `user=""`).

use tokio::io::{AsyncRead, AsyncReadExt};

/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// SSLRequest code (1234 << 16 | 5679).
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// GSSENCRequest code.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// CancelRequest code.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: i32 = 196_608;

/// A key identifying one session for CancelRequest (process id and secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    /// The process id the client was given.
    pub process_id: i32,
    /// The secret key the client was given.
    pub secret_key: i32,
}

/// One of the packets a client may send first.
#[derive(Debug)]
pub enum InitialPacket {
    /// Asks for TLS.
    SslRequest,
    /// Asks for GSSAPI encryption (always declined).
    GssEncRequest,
    /// Cancels a running query of another session.
    Cancel(CancelKey),
    /// Starts a session.
    Startup(StartupMessage),
}

/// A parsed StartupMessage.
#[derive(Debug, Clone)]
pub struct StartupMessage {
    /// Requested protocol minor version (major is always 3).
    pub minor_version: u16,
    /// Ordinary parameters (no `_pq_.` options), empty values dropped.
    pub params: StartupParams,
    /// Protocol options (`_pq_.*` keys) as sent.
    pub protocol_options: Vec<(String, String)>,
}

/// Startup parameters in the order the client sent them.
#[derive(Debug, Clone, Default)]
pub struct StartupParams(Vec<(String, String)>);

impl StartupParams {
    /// Build from pairs (tests and the backend side).
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        Self(pairs)
    }

    /// The value of `key` (exact name), if present and non-empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A malformed or unsupported first packet.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The peer closed or the read failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// Declared length below 8.
    #[error("startup packet length {0} is too short")]
    TooShort(i32),
    /// Declared length above the cap.
    #[error("startup packet length {0} exceeds {MAX_STARTUP_PACKET_LEN}")]
    TooLong(i32),
    /// Not protocol 3.x and no known request code.
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol {
        /// Major version sent.
        major: u16,
        /// Minor version sent.
        minor: u16,
    },
    /// The body does not follow the format.
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
    /// A parameter appears twice.
    #[error("startup parameter {0:?} appears more than once")]
    DuplicateKey(String),
}

/// Read one initial packet. Exactly its bytes are consumed; nothing is buffered.
///
/// Not cancel safe.
pub async fn read_initial_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<InitialPacket, StartupError> {
    let mut len_buf = [0u8; 4];
    stream.read_exact(&mut len_buf).await?;
    let len = i32::from_be_bytes(len_buf);
    if len < 8 {
        return Err(StartupError::TooShort(len));
    }
    if len as usize > MAX_STARTUP_PACKET_LEN {
        return Err(StartupError::TooLong(len));
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    parse_initial_packet(&body)
}

/// Parse the body of an initial packet (everything after the length word).
pub fn parse_initial_packet(body: &[u8]) -> Result<InitialPacket, StartupError> {
    let (code, rest) = body
        .split_at_checked(4)
        .ok_or(StartupError::Malformed("missing code"))?;
    let code = i32::from_be_bytes([code[0], code[1], code[2], code[3]]);
    match code {
        SSL_REQUEST_CODE => Ok(InitialPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(InitialPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            if rest.len() != 8 {
                return Err(StartupError::Malformed(
                    "cancel request must carry exactly 8 bytes",
                ));
            }
            Ok(InitialPacket::Cancel(CancelKey {
                process_id: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                secret_key: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
            }))
        }
        _ => {
            let major = (code as u32 >> 16) as u16;
            let minor = (code as u32 & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            parse_startup_params(rest, minor).map(InitialPacket::Startup)
        }
    }
}

fn parse_startup_params(
    mut rest: &[u8],
    minor_version: u16,
) -> Result<StartupMessage, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    let mut protocol_options = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let (key, tail) = take_cstr(rest)?;
        if key.is_empty() {
            if !tail.is_empty() {
                return Err(StartupError::Malformed("bytes after the terminating NUL"));
            }
            break;
        }
        let (value, tail) = take_cstr(tail)?;
        rest = tail;
        if seen.iter().any(|k| k == key) {
            return Err(StartupError::DuplicateKey(key.to_owned()));
        }
        seen.push(key.to_owned());
        if key.starts_with("_pq_.") {
            protocol_options.push((key.to_owned(), value.to_owned()));
        } else if !value.is_empty() {
            params.push((key.to_owned(), value.to_owned()));
        }
    }
    Ok(StartupMessage {
        minor_version,
        params: StartupParams(params),
        protocol_options,
    })
}

fn take_cstr(buf: &[u8]) -> Result<(&str, &[u8]), StartupError> {
    let end = buf
        .iter()
        .position(|b| *b == 0)
        .ok_or(StartupError::Malformed("missing terminating NUL"))?;
    let s = std::str::from_utf8(&buf[..end])
        .map_err(|_| StartupError::Malformed("parameter is not UTF-8"))?;
    Ok((s, &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_body(pairs: &[(&str, &str)], minor: u16) -> Vec<u8> {
        let mut body = ((3u32 << 16) | minor as u32).to_be_bytes().to_vec();
        for (k, v) in pairs {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn empty_values_are_absent_and_pq_options_separate() {
        let body = startup_body(
            &[
                ("user", ""),
                ("database", "dev"),
                ("_pq_.compression", "lz4"),
            ],
            0,
        );
        let InitialPacket::Startup(msg) = parse_initial_packet(&body).unwrap() else {
            panic!()
        };
        assert_eq!(msg.params.get("user"), None);
        assert_eq!(msg.params.get("database"), Some("dev"));
        assert_eq!(
            msg.protocol_options,
            vec![("_pq_.compression".to_owned(), "lz4".to_owned())]
        );
    }

    #[test]
    fn rejects_duplicates_missing_nul_and_trailing_bytes() {
        let body = startup_body(&[("user", "a"), ("user", "b")], 0);
        assert!(matches!(
            parse_initial_packet(&body),
            Err(StartupError::DuplicateKey(_))
        ));
        let mut body = startup_body(&[("user", "a")], 0);
        body.pop();
        body.pop();
        assert!(matches!(
            parse_initial_packet(&body),
            Err(StartupError::Malformed(_))
        ));
        let mut body = startup_body(&[("user", "a")], 0);
        body.push(b'x');
        assert!(matches!(
            parse_initial_packet(&body),
            Err(StartupError::Malformed(_))
        ));
    }

    #[test]
    fn request_codes_and_versions() {
        assert!(matches!(
            parse_initial_packet(&SSL_REQUEST_CODE.to_be_bytes()),
            Ok(InitialPacket::SslRequest)
        ));
        assert!(matches!(
            parse_initial_packet(&GSSENC_REQUEST_CODE.to_be_bytes()),
            Ok(InitialPacket::GssEncRequest)
        ));
        let mut cancel = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        cancel.extend_from_slice(&7i32.to_be_bytes());
        cancel.extend_from_slice(&9i32.to_be_bytes());
        let Ok(InitialPacket::Cancel(key)) = parse_initial_packet(&cancel) else {
            panic!()
        };
        assert_eq!((key.process_id, key.secret_key), (7, 9));
        let v2 = (2u32 << 16).to_be_bytes();
        assert!(matches!(
            parse_initial_packet(&v2),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        let InitialPacket::Startup(m) = parse_initial_packet(&startup_body(&[], 2)).unwrap() else {
            panic!()
        };
        assert_eq!(m.minor_version, 2);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 7) as u8 // small alphabet: many NULs and 3s
                })
                .collect();
            let _ = parse_initial_packet(&body);
        }
    }
}
