//! Shippers: one task per sink reads the spool from its persisted cursor up to the durable
//! position, delivers a batch, and only then moves and saves its cursor. Delivery is therefore at
//! least once; a sink that is down is retried with backoff (up to 5 s between tries) and never
//! skipped. When the gateway stops, each shipper drains what is durable, giving a failing sink a
//! few seconds before leaving the rest for the next start.

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, sync::watch};

use super::{
    ocsf, otlp, pg,
    spool::{self, Cursors, Durable, SpoolPos},
    Health,
};
use crate::{config::AuditFormat, types::Secret};

/// Longest pause between retries of a failing sink.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// After the writer stops, how long a failing sink is retried before the shipper gives up.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Upper bound on one delivery (connect + insert, or a file write).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a delivery failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The file or stdout write failed.
    #[error("write: {0}")]
    Io(#[from] std::io::Error),
    /// The PostgreSQL store failed.
    #[error(transparent)]
    Postgres(#[from] pg::PgAuditError),
    /// The OTLP collector failed.
    #[error(transparent)]
    Otlp(#[from] otlp::OtlpError),
    /// The delivery took longer than the limit.
    #[error("delivery timed out")]
    Timeout,
}

/// A destination.
pub(crate) enum Sink {
    /// JSON-lines file.
    File {
        path: PathBuf,
        format: AuditFormat,
        file: Option<tokio::fs::File>,
    },
    /// Standard output.
    Stdout { format: AuditFormat },
    /// The PostgreSQL store.
    Postgres(pg::PgSink),
    /// An OpenTelemetry collector (OTLP/HTTP logs).
    Otlp(otlp::OtlpSink),
}

impl Sink {
    pub(crate) fn file(path: PathBuf, format: AuditFormat) -> Self {
        Sink::File {
            path,
            format,
            file: None,
        }
    }

    pub(crate) fn stdout(format: AuditFormat) -> Self {
        Sink::Stdout { format }
    }

    pub(crate) fn postgres(url: Secret<String>, migrate: bool) -> Self {
        Sink::Postgres(pg::PgSink::new(url, migrate))
    }

    pub(crate) fn otlp(endpoint: &str) -> Self {
        Sink::Otlp(otlp::OtlpSink::new(endpoint))
    }

    /// The cursor name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Sink::File { .. } => "file",
            Sink::Stdout { .. } => "stdout",
            Sink::Postgres(_) => "postgres",
            Sink::Otlp(_) => "otlp",
        }
    }

    async fn deliver(&mut self, events: &[serde_json::Value]) -> Result<(), ShipError> {
        match self {
            Sink::File { path, format, file } => {
                let bytes = render(events, *format);
                if file.is_none() {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        super::spool::create_private_dir(dir)?;
                    }
                    *file = Some(
                        tokio::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .mode(super::spool::FILE_MODE)
                            .open(&path)
                            .await?,
                    );
                }
                let Some(f) = file.as_mut() else {
                    return Ok(());
                };
                let result = async {
                    f.write_all(&bytes).await?;
                    f.flush().await
                }
                .await;
                if result.is_err() {
                    *file = None;
                }
                Ok(result?)
            }
            Sink::Stdout { format } => {
                let mut out = tokio::io::stdout();
                out.write_all(&render(events, *format)).await?;
                Ok(out.flush().await?)
            }
            Sink::Postgres(sink) => Ok(sink.deliver(events).await?),
            Sink::Otlp(sink) => Ok(sink.deliver(events).await?),
        }
    }
}

fn render(events: &[serde_json::Value], format: AuditFormat) -> Vec<u8> {
    let mut buf = Vec::with_capacity(events.len() * 512);
    for e in events {
        let mapped;
        let out = match format {
            AuditFormat::Native => e,
            AuditFormat::Ocsf => match ocsf::to_ocsf(e) {
                Some(m) => {
                    mapped = m;
                    &mapped
                }
                None => continue,
            },
        };
        if serde_json::to_writer(&mut buf, out).is_ok() {
            buf.push(b'\n');
        }
    }
    buf
}

/// Ship from the spool in `dir` to `sink` until the writer closes and everything is delivered.
pub(crate) async fn run_shipper(
    mut sink: Sink,
    dir: PathBuf,
    mut durable: watch::Receiver<Durable>,
    cursors: Cursors,
    health: Arc<Health>,
    batch: usize,
) {
    let name = sink.name();
    let mut cursor = spool::load_cursor(&dir, name);
    let mut backoff = Duration::from_millis(100);
    let mut closed_since: Option<Instant> = None;
    let mut failing = false;
    loop {
        let d = *durable.borrow_and_update();
        if d.closed {
            closed_since.get_or_insert_with(Instant::now);
        }
        let read = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || spool::read_batch(&dir, cursor, d.pos, batch)).await
        };
        let (lines, next) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(sink = name, error = %e, "audit shipper cannot read the spool");
                if closed_since.is_some_and(|t| t.elapsed() > DRAIN_GRACE) {
                    return;
                }
                tokio::time::sleep(MAX_BACKOFF.min(Duration::from_secs(1))).await;
                continue;
            }
            Err(_) => return,
        };
        if lines.is_empty() {
            if next != cursor {
                cursor = next;
                persist(&dir, name, cursor, &cursors);
            }
            if d.closed {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), durable.changed()).await;
            continue;
        }
        let events: Vec<serde_json::Value> = lines
            .iter()
            .filter_map(|l| match serde_json::from_slice(l) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(sink = name, error = %e, "audit shipper skips an unreadable spool line");
                    None
                }
            })
            .collect();
        let result = match tokio::time::timeout(DELIVERY_TIMEOUT, sink.deliver(&events)).await {
            Ok(r) => r,
            Err(_) => Err(ShipError::Timeout),
        };
        match result {
            Ok(()) => {
                health
                    .counters
                    .shipped
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                cursor = next;
                persist(&dir, name, cursor, &cursors);
                backoff = Duration::from_millis(100);
                if failing {
                    failing = false;
                    tracing::info!(sink = name, "audit sink delivers again");
                }
            }
            Err(e) => {
                health.counters.ship_errors.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    failing = true;
                    tracing::warn!(sink = name, error = %e, "audit sink failed; events wait in the spool and are retried");
                }
                if closed_since.is_some_and(|t| t.elapsed() > DRAIN_GRACE) {
                    tracing::warn!(sink = name, "audit sink still failing at shutdown; the next start resumes from the spool");
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn persist(dir: &std::path::Path, name: &str, pos: SpoolPos, cursors: &Cursors) {
    if let Err(e) = spool::save_cursor(dir, name, pos) {
        tracing::warn!(sink = name, error = %e, "cannot save the audit shipper position");
    }
    cursors.set(name, pos);
}
