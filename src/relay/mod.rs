//! The relay: after login, opaque bytes both ways until either side ends.
//!
//! No message is interpreted (the optional [`query_audit::QueryTap`] only watches the client's
//! bytes go by). Half-close is honoured: EOF from the client shuts down writing to
//! the backend and the backend's answer still flows back. Byte counters are updated as data moves,
//! so the audit trail has them however the session ends. The backend→client direction tracks
//! message boundaries (type byte and length only), so that on shutdown idgate can end the session
//! with a proper `57P01` ErrorResponse between two messages instead of cutting one in half.

use std::{
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::{
    error::sqlstate,
    protocol::messages::{self, Severity},
};

pub mod query_audit;

use query_audit::QueryTap;

/// Buffer size per direction.
const BUF: usize = 16 * 1024;
/// After shutdown is requested, how long to wait for the backend to reach a message boundary.
const BOUNDARY_WAIT: Duration = Duration::from_secs(5);

/// Bytes moved so far, readable while the relay runs.
#[derive(Debug, Default, Clone)]
pub struct ByteCounters {
    /// Client → backend.
    pub from_client: Arc<AtomicU64>,
    /// Backend → client.
    pub to_client: Arc<AtomicU64>,
}

/// How the relay ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading from or writing to the client failed.
    #[error("client connection failed: {0}")]
    Client(io::Error),
    /// Reading from or writing to the backend failed.
    #[error("backend connection failed: {0}")]
    Backend(io::Error),
    /// idgate is shutting down; the client got 57P01.
    #[error("shutdown")]
    Shutdown,
}

/// Where the backend→client stream stands relative to message boundaries.
#[derive(Debug, Default)]
struct Boundary {
    /// Bytes of the current header seen (0..5).
    header: [u8; 5],
    header_len: usize,
    /// Body bytes still to come of the current message.
    remaining: usize,
}

impl Boundary {
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let need = 5 - self.header_len;
            let n = need.min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.remaining = len.saturating_sub(4);
                self.header_len = 0;
            }
        }
    }
}

/// Relay until both directions are done, an error occurs, or `shutdown` fires.
pub async fn relay<C, B>(
    client: C,
    backend: B,
    counters: &ByteCounters,
    shutdown: &CancellationToken,
) -> Result<(), RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_with_tap(client, backend, counters, shutdown, None).await
}

/// [`relay`], with an optional tap that sees every byte the client sends (query audit).
pub async fn relay_with_tap<C, B>(
    client: C,
    backend: B,
    counters: &ByteCounters,
    shutdown: &CancellationToken,
    mut tap: Option<QueryTap>,
) -> Result<(), RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = tokio::io::split(backend);

    let upstream = async {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = client_read
                .read(&mut buf)
                .await
                .map_err(RelayError::Client)?;
            if n == 0 {
                backend_write
                    .shutdown()
                    .await
                    .map_err(RelayError::Backend)?;
                return Ok::<(), RelayError>(());
            }
            counters.from_client.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(t) = tap.as_mut() {
                t.feed(&buf[..n]);
            }
            backend_write
                .write_all(&buf[..n])
                .await
                .map_err(RelayError::Backend)?;
        }
    };

    let downstream = async {
        let mut buf = vec![0u8; BUF];
        let mut boundary = Boundary::default();
        let mut stop_by: Option<tokio::time::Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                let deadline =
                    *stop_by.get_or_insert_with(|| tokio::time::Instant::now() + BOUNDARY_WAIT);
                if boundary.at_boundary() {
                    let mut out = Vec::new();
                    messages::error_response(
                        &mut out,
                        Severity::Fatal,
                        sqlstate::ADMIN_SHUTDOWN,
                        "idgate is shutting down; reconnect",
                        None,
                    );
                    // A client that stopped reading cannot hold the shutdown up.
                    let _ = tokio::time::timeout(BOUNDARY_WAIT, async {
                        client_write.write_all(&out).await?;
                        client_write.flush().await?;
                        client_write.shutdown().await
                    })
                    .await;
                    return Err(RelayError::Shutdown);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(RelayError::Shutdown);
                }
            }
            let n = tokio::select! {
                r = backend_read.read(&mut buf) => r.map_err(RelayError::Backend)?,
                _ = shutdown.cancelled(), if stop_by.is_none() => continue,
                _ = tokio::time::sleep_until(stop_by.unwrap_or_else(tokio::time::Instant::now)), if stop_by.is_some() => continue,
            };
            // Writes to the client wait for it to read (backpressure), but once shutdown has
            // begun, only for BOUNDARY_WAIT: a stalled client cannot keep idgate from exiting.
            let stalled = async {
                shutdown.cancelled().await;
                tokio::time::sleep(BOUNDARY_WAIT).await;
            };
            if n == 0 {
                tokio::select! {
                    r = client_write.shutdown() => r.map_err(RelayError::Client)?,
                    _ = stalled => return Err(RelayError::Shutdown),
                }
                return Ok(());
            }
            boundary.advance(&buf[..n]);
            counters.to_client.fetch_add(n as u64, Ordering::Relaxed);
            tokio::select! {
                r = client_write.write_all(&buf[..n]) => r.map_err(RelayError::Client)?,
                _ = stalled => return Err(RelayError::Shutdown),
            }
        }
    };

    tokio::pin!(upstream, downstream);
    let mut upstream_done = false;
    loop {
        tokio::select! {
            r = &mut upstream, if !upstream_done => {
                r?;
                upstream_done = true;
            }
            r = &mut downstream => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_tracks_split_headers_and_bodies() {
        let mut b = Boundary::default();
        let mut msg = vec![b'D'];
        msg.extend_from_slice(&9u32.to_be_bytes());
        msg.extend_from_slice(b"hello");
        let mut z = vec![b'Z', 0, 0, 0, 5, b'I'];
        let mut all = msg.clone();
        all.append(&mut z);
        for split in 0..all.len() {
            let mut b2 = Boundary::default();
            b2.advance(&all[..split]);
            b2.advance(&all[split..]);
            assert!(b2.at_boundary(), "split at {split}");
        }
        b.advance(&msg[..3]);
        assert!(!b.at_boundary());
        b.advance(&msg[3..7]);
        assert!(!b.at_boundary());
        b.advance(&msg[7..]);
        assert!(b.at_boundary());
    }

    #[tokio::test]
    async fn half_close_lets_the_answer_through() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (backend, mut backend_peer) = tokio::io::duplex(1024);
        let counters = ByteCounters::default();
        let token = CancellationToken::new();
        let task = tokio::spawn(async move {
            relay(client, backend, &counters, &token)
                .await
                .map(|_| counters)
        });
        client_peer.write_all(b"ping").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        backend_peer.write_all(b"pong").await.unwrap();
        backend_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        let counters = task.await.unwrap().unwrap();
        assert_eq!(counters.from_client.load(Ordering::Relaxed), 4);
        assert_eq!(counters.to_client.load(Ordering::Relaxed), 4);
    }
}
