//! The audit trail: typed events, a durable local spool, and shippers that deliver every event at
//! least once to each sink.
//!
//! ```text
//! session ─record()─▶ channel ─▶ spool writer thread (JSON lines, fsync every fsync_interval)
//!                                   │ durable position (watch)
//!                                   ▼
//!                  one shipper per sink: file / stdout (native or OCSF), PostgreSQL
//!                  (cursor file per sink, so a restart resumes where it stopped)
//! ```
//!
//! [`AuditLog::record`] never blocks a session. An event is *acknowledged* once the spool file
//! holding it has been fsynced; from then on a crash cannot lose it, and a sink outage only delays
//! it. If the spool cannot be written, [`AuditLog::healthy`] turns false and, with
//! `fail_closed`, [`AuditLog::refuses_sessions`] tells the session code to refuse new sessions.
//! No event ever carries a token or password; the types below have no field that could hold one.

pub mod alert;
pub mod ocsf;
pub mod otlp;
pub mod pg;
pub mod query;
mod ship;
pub mod spool;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc, Arc,
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::{config::AuditConfig, types::SessionId};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A TCP connection was accepted.
    ConnectionAccepted,
    /// TLS was established with the client.
    TlsEstablished,
    /// The token was valid and mapped to a database identity.
    AuthSucceeded,
    /// Authentication was refused; `reason` says why.
    AuthFailed,
    /// The session was assigned a pool and target.
    SessionRouted,
    /// The backend refused or could not be reached for the login (the session's final answer).
    BackendLoginFailed,
    /// One target failed for a retryable reason and the next one is tried (not a refusal: the
    /// session may still log in; `backend_login_failed` follows only when every try failed).
    BackendAttemptFailed,
    /// The connection ended (exactly once per accepted connection).
    SessionEnded,
    /// A CancelRequest was forwarded to a backend.
    CancelForwarded,
    /// An alert rule fired (brute force).
    Alert,
    /// A statement (simple query or Parse) on a pool with query audit.
    Query,
    /// A target went up or down (gateway-level event: nil session id).
    TargetHealthChanged,
    /// A target was drained or undrained through the admin API (gateway-level event).
    TargetDrainChanged,
    /// The configuration was reloaded, or a reload was refused (gateway-level event).
    ConfigReloaded,
    /// JIT provisioning changed the login role or its namespace role memberships; `detail`
    /// lists what was created, granted, revoked or refused.
    RolesProvisioned,
}

impl EventKind {
    /// `success`, `failure`, or none for events that are not an outcome.
    pub fn outcome(self, has_reason: bool) -> Option<&'static str> {
        match self {
            EventKind::AuthSucceeded | EventKind::SessionRouted => Some("success"),
            EventKind::AuthFailed | EventKind::BackendLoginFailed | EventKind::Alert => {
                Some("failure")
            }
            EventKind::CancelForwarded => Some(if has_reason { "failure" } else { "success" }),
            EventKind::ConfigReloaded => Some(if has_reason { "failure" } else { "success" }),
            EventKind::ConnectionAccepted
            | EventKind::TlsEstablished
            | EventKind::SessionEnded
            | EventKind::Query
            | EventKind::TargetHealthChanged
            | EventKind::TargetDrainChanged
            | EventKind::BackendAttemptFailed
            | EventKind::RolesProvisioned => None,
        }
    }
}

/// One audit record. Optional fields are left out of the JSON when unknown.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// Unique event id.
    pub event_id: uuid::Uuid,
    /// RFC 3339 time with milliseconds, UTC.
    pub time: String,
    /// Event kind.
    pub kind: EventKind,
    /// The connection's session id.
    pub session_id: SessionId,
    /// Client address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// Facts about who connected.
    #[serde(flatten)]
    pub facts: SessionFacts,
    /// Precise refusal or failure reason (snake_case code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Extra detail for the reason (never secret material).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Session duration in milliseconds (session_ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes received from the client (session_ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Bytes sent to the client (session_ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// Why the session ended (session_ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// `success` or `failure` where the kind is an outcome (set by [`AuditLog::record`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// What fired (alert).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<alert::AlertInfo>,
    /// The statement (query), truncated to `query_audit_max_len`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// `simple` ('Q') or `parse` ('P') (query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement_kind: Option<&'static str>,
    /// Whether `statement` was truncated (query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
}

/// Facts collected as the session progresses; copied into every event it emits.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionFacts {
    /// The load balancer that sent a PROXY header naming the client (`client_addr`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxied_by: Option<String>,
    /// TLS protocol version with the client, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// SNI host name sent by the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// `token` (Redshift code 14 / 'i') or `password` (token as password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<&'static str>,
    /// Issuer configuration name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Tenant id (`tid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Object id (`oid`): the stable identity key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    /// Token id (`uti` or `jti`), never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// Database user the session runs as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_user: Option<String>,
    /// Database roles mapped from groups and app roles.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Startup `user` as sent by the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_user: Option<String>,
    /// Startup `database`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Startup `application_name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// Startup `driver_version` (Redshift drivers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Startup `plugin_name` (Redshift drivers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    /// Startup `client_protocol_version` (Redshift drivers: the protocol they ask for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_protocol_version: Option<String>,
    /// Pool the session was routed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// How idgate logs in to that pool (`token`, `client_cert`, `password`, `trust`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_auth: Option<&'static str>,
    /// Target (host:port) that served the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The routing rule that chose the pool (`sni`, `startup_option`, `database`, `claim`, `default`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_rule: Option<&'static str>,
    /// Set when every target was unhealthy and `fail_open` tried one anyway.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub route_forced: bool,
    /// Target health (target_health_changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::routing::pool::Health>,
}

/// Counters for metrics and `/readyz` (read with [`AuditLog::stats`]).
#[derive(Debug, Default)]
pub struct AuditCounters {
    /// Events passed to [`AuditLog::record`].
    pub recorded: AtomicU64,
    /// Events fsynced to the spool.
    pub spooled: AtomicU64,
    /// Failed spool writes or fsyncs.
    pub spool_errors: AtomicU64,
    /// Events dropped because the spool was unwritable and the memory buffer was full.
    pub dropped: AtomicU64,
    /// Sessions refused because of `fail_closed`.
    pub sessions_refused: AtomicU64,
    /// Alerts fired.
    pub alerts_fired: AtomicU64,
    /// Webhook deliveries that failed after retries.
    pub webhook_failures: AtomicU64,
    /// Events delivered to sinks (summed over sinks).
    pub shipped: AtomicU64,
    /// Failed sink deliveries (each retried).
    pub ship_errors: AtomicU64,
}

/// A copy of [`AuditCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AuditStats {
    /// See [`AuditCounters::recorded`].
    pub recorded: u64,
    /// See [`AuditCounters::spooled`].
    pub spooled: u64,
    /// See [`AuditCounters::spool_errors`].
    pub spool_errors: u64,
    /// See [`AuditCounters::dropped`].
    pub dropped: u64,
    /// See [`AuditCounters::sessions_refused`].
    pub sessions_refused: u64,
    /// See [`AuditCounters::alerts_fired`].
    pub alerts_fired: u64,
    /// See [`AuditCounters::webhook_failures`].
    pub webhook_failures: u64,
    /// See [`AuditCounters::shipped`].
    pub shipped: u64,
    /// See [`AuditCounters::ship_errors`].
    pub ship_errors: u64,
    /// Whether the spool is writable.
    pub healthy: bool,
}

/// State shared by the handle, the spool writer and the shippers.
#[derive(Debug)]
pub(crate) struct Health {
    pub(crate) healthy: AtomicBool,
    pub(crate) counters: AuditCounters,
}

/// Handle to the audit trail. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: std_mpsc::Sender<AuditEvent>,
    shared: Arc<Shared>,
}

struct Shared {
    health: Arc<Health>,
    fail_closed: bool,
    alerter: alert::Alerter,
    webhooks: mpsc::UnboundedSender<(String, serde_json::Value)>,
    query_audit_pools: Vec<String>,
    query_audit_max_len: usize,
}

/// Why the audit trail could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditStartError {
    /// The spool directory could not be created or recovered.
    #[error("audit spool {dir}: {cause}")]
    Spool {
        /// The directory.
        dir: String,
        /// The cause (in the message, not a `source`: printing the chain would say it twice).
        cause: std::io::Error,
    },
    /// The spool writer thread could not be started.
    #[error("audit spool writer thread: {0}")]
    Thread(std::io::Error),
}

/// Longest `detail` kept in an audit event (characters).
pub const MAX_DETAIL_CHARS: usize = 1024;

/// `detail` with JWT-shaped text redacted and at most [`MAX_DETAIL_CHARS`] characters.
pub fn bounded_detail(detail: &str) -> String {
    let redacted = crate::types::redact_tokens(detail);
    match redacted.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((cut, _)) => format!("{}… (truncated)", &redacted[..cut]),
        None => redacted.into_owned(),
    }
}

/// How many times (100 ms apart) a start waits for the spool lock.
const SPOOL_LOCK_TRIES: u32 = 50;

impl AuditLog {
    /// Open (and recover) the spool, start the writer thread and one shipper per sink. The
    /// returned task ends, after everything queued is fsynced and shipped (sinks that are down get
    /// a few seconds), once every `AuditLog` clone is dropped.
    pub async fn start(
        config: &AuditConfig,
    ) -> Result<(AuditLog, tokio::task::JoinHandle<()>), AuditStartError> {
        let spool_err = |cause| AuditStartError::Spool {
            dir: config.spool_dir.display().to_string(),
            cause,
        };
        // A writer of this process that is shutting down (a restart in one process) releases
        // the spool within moments; another process holding it is an error.
        let mut attempts = 0;
        let (writer, durable) = loop {
            match spool::SpoolWriter::open(&config.spool_dir, config.spool_max_file_bytes) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && attempts < SPOOL_LOCK_TRIES =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other.map_err(spool_err)?,
            }
        };
        let health = Arc::new(Health {
            healthy: AtomicBool::new(true),
            counters: AuditCounters::default(),
        });
        let mut sinks = Vec::new();
        if let Some(path) = &config.file_path {
            sinks.push(ship::Sink::file(path.clone(), config.file_format));
        }
        if config.stdout {
            sinks.push(ship::Sink::stdout(config.stdout_format));
        }
        if let Some(url) = &config.postgres_url {
            sinks.push(ship::Sink::postgres(url.clone(), config.postgres_migrate));
        }
        if let Some(endpoint) = &config.otlp_endpoint {
            sinks.push(ship::Sink::otlp(endpoint));
        }
        let cursors = spool::Cursors::default();
        for sink in &sinks {
            let pos = spool::load_cursor(&config.spool_dir, sink.name());
            cursors.set(sink.name(), pos);
        }
        let (durable_tx, durable_rx) = watch::channel(spool::Durable {
            pos: durable,
            closed: false,
        });
        let (tx, rx) = std_mpsc::channel::<AuditEvent>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let settings = spool::WriterSettings {
            fsync_interval: config.fsync_interval,
            retention: config.spool_retention,
            max_files: config.spool_max_files,
        };
        {
            let health = health.clone();
            let cursors = cursors.clone();
            std::thread::Builder::new()
                .name("idgate-audit-spool".into())
                .spawn(move || {
                    spool::run_writer(rx, writer, settings, health, cursors, durable_tx);
                    let _ = done_tx.send(());
                })
                .map_err(AuditStartError::Thread)?;
        }
        let mut shippers = Vec::new();
        for sink in sinks {
            shippers.push(tokio::spawn(ship::run_shipper(
                sink,
                config.spool_dir.clone(),
                durable_rx.clone(),
                cursors.clone(),
                health.clone(),
                config.postgres_batch_size,
            )));
        }
        let (webhook_tx, webhook_rx) = mpsc::unbounded_channel();
        let webhook_task = tokio::spawn(alert::run_webhooks(webhook_rx, health.clone()));
        let task = tokio::spawn(async move {
            let _ = done_rx.await;
            for s in shippers {
                let _ = s.await;
            }
            let _ = webhook_task.await;
        });
        let log = AuditLog {
            tx,
            shared: Arc::new(Shared {
                health,
                fail_closed: config.fail_closed,
                alerter: alert::Alerter::new(config.alerts.clone()),
                webhooks: webhook_tx,
                query_audit_pools: config.query_audit_pools.clone(),
                query_audit_max_len: config.query_audit_max_len,
            }),
        };
        Ok((log, task))
    }

    /// Queue an event. Never blocks. Alert rules see it here, before it reaches the spool.
    pub fn record(&self, mut event: AuditEvent) {
        event.outcome = event.kind.outcome(event.reason.is_some());
        // Details quote clients and backends ("invalid command-line argument: …"): whatever a
        // client put in a startup field is echoed there, so JWT-shaped text is redacted and the
        // length capped, whatever path produced the text.
        if let Some(detail) = event.detail.as_mut() {
            *detail = bounded_detail(detail);
        }
        let counters = &self.shared.health.counters;
        let fired = self.shared.alerter.observe(&event);
        self.send(event);
        for (alert_event, webhook) in fired {
            counters.alerts_fired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                rule = alert_event.alert.as_ref().map(|a| a.rule.as_str()),
                key = alert_event.alert.as_ref().map(|a| a.key.as_str()),
                "audit alert fired"
            );
            if let Some(url) = webhook {
                if let Ok(json) = serde_json::to_value(&alert_event) {
                    let _ = self.shared.webhooks.send((url, json));
                }
            }
            self.send(alert_event);
        }
    }

    fn send(&self, event: AuditEvent) {
        self.shared
            .health
            .counters
            .recorded
            .fetch_add(1, Ordering::Relaxed);
        if self.tx.send(event).is_err() {
            tracing::error!("audit spool writer is gone; event lost");
        }
    }

    /// Whether the spool is writable (for `/readyz`).
    pub fn healthy(&self) -> bool {
        self.shared.health.healthy.load(Ordering::Relaxed)
    }

    /// With `fail_closed`, whether a new session must be refused now (counts the refusal).
    pub fn refuses_sessions(&self) -> bool {
        let refuse = self.shared.fail_closed && !self.healthy();
        if refuse {
            self.shared
                .health
                .counters
                .sessions_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        refuse
    }

    /// Current counters.
    pub fn stats(&self) -> AuditStats {
        let c = &self.shared.health.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AuditStats {
            recorded: get(&c.recorded),
            spooled: get(&c.spooled),
            spool_errors: get(&c.spool_errors),
            dropped: get(&c.dropped),
            sessions_refused: get(&c.sessions_refused),
            alerts_fired: get(&c.alerts_fired),
            webhook_failures: get(&c.webhook_failures),
            shipped: get(&c.shipped),
            ship_errors: get(&c.ship_errors),
            healthy: self.healthy(),
        }
    }

    /// Number of events fsynced to the spool so far.
    pub fn written(&self) -> u64 {
        self.stats().spooled
    }

    /// The statement-text limit when `pool` has query audit, else `None`.
    pub fn query_audit_len(&self, pool: &str) -> Option<usize> {
        self.shared
            .query_audit_pools
            .iter()
            .any(|p| p == pool)
            .then_some(self.shared.query_audit_max_len)
    }
}

/// A gateway-level event (health, drain, reload): its session id is the nil UUID.
pub fn system_event(kind: EventKind, facts: &SessionFacts) -> AuditEvent {
    event(kind, SessionId::nil(), None, facts)
}

/// Build an event with a fresh id and the current time.
pub fn event(
    kind: EventKind,
    session_id: SessionId,
    client_addr: Option<SocketAddr>,
    facts: &SessionFacts,
) -> AuditEvent {
    AuditEvent {
        event_id: uuid::Uuid::new_v4(),
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        kind,
        session_id,
        client_addr: client_addr.map(|a| a.to_string()),
        facts: facts.clone(),
        reason: None,
        detail: None,
        duration_ms: None,
        bytes_in: None,
        bytes_out: None,
        end_reason: None,
        outcome: None,
        alert: None,
        statement: None,
        statement_kind: None,
        truncated: None,
    }
}
