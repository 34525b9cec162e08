//! Length-capped framed reads of typed protocol messages (`type byte, Int32 length, body`).
//!
//! Reads are unbuffered on purpose: idgate reads exactly the bytes of one message, so nothing a
//! client sent ahead is swallowed or reinterpreted when the stream changes hands (TLS upgrade,
//! relay start).

use tokio::io::{AsyncRead, AsyncReadExt};

/// A framed-read failure.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection or the read failed.
    #[error("connection closed or read failed: {0}")]
    Io(#[from] std::io::Error),
    /// The declared length is below the minimum (4).
    #[error("message length {0} is invalid")]
    BadLength(i32),
    /// The declared length is above the cap for this message.
    #[error("message of {len} bytes exceeds the limit of {cap}")]
    TooLong {
        /// Declared length.
        len: usize,
        /// The cap in force.
        cap: usize,
    },
}

/// One typed message read from a peer.
#[derive(Debug)]
pub struct Frame {
    /// The message type byte.
    pub tag: u8,
    /// The message body (without type and length).
    pub body: Vec<u8>,
}

/// Read one typed message whose total length (excluding the type byte) is at most `cap`.
///
/// Not cancel safe: a partially read message is lost if the future is dropped.
pub async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    cap: usize,
) -> Result<Frame, FrameError> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    let len = len as usize;
    if len > cap {
        return Err(FrameError::TooLong { len, cap });
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    Ok(Frame { tag: head[0], body })
}

/// Encode one typed message into `out`.
pub fn put_frame(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    // Bodies idgate writes are small (error texts, parameter values); saturate rather than wrap.
    let len = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}
