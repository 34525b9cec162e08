//! The relay: after login, opaque bytes both ways until either side ends.
//!
//! No message is parsed here (the optional [`query_audit::QueryTap`] only watches the client's
//! bytes go by). Half-close is honoured (EOF on one side shuts down writing on the
//! other, and the other direction keeps flowing until it ends too). Byte counters are updated as
//! data moves, so the audit trail has them however the session ends.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

pub mod query_audit;

use query_audit::QueryTap;

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
    /// idgate is shutting down.
    #[error("shutdown")]
    Shutdown,
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
    tap: Option<QueryTap>,
) -> Result<(), RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Counted {
        inner: client,
        read: counters.from_client.clone(),
        failed: false,
        tap,
    };
    let mut backend = Counted {
        inner: backend,
        read: counters.to_client.clone(),
        failed: false,
        tap: None,
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut backend, 16 * 1024, 16 * 1024) => {
            // Blame the side whose socket reported the error.
            result.map(|_| ()).map_err(|e| if backend.failed && !client.failed { RelayError::Backend(e) } else { RelayError::Client(e) })
        }
        _ = shutdown.cancelled() => Err(RelayError::Shutdown),
    }
}

/// A stream that counts the bytes read from it and remembers whether it failed.
struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
    failed: bool,
    tap: Option<QueryTap>,
}

impl<S> Counted<S> {
    fn note<T>(&mut self, p: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &p {
            self.failed = true;
        }
        p
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            let this = &mut *self;
            if let Some(tap) = this.tap.as_mut() {
                tap.feed(&buf.filled()[before..]);
            }
        }
        self.note(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(p)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(p)
    }
}
