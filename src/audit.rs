//! Audit events (first form): typed events written as JSON lines to a file and/or stdout.
//!
//! [`AuditLog::record`] never blocks a session: events go through a channel to one writer task,
//! which flushes after every batch and is drained before [`crate::run`] returns. No event ever
//! carries a token or password; the types below have no field that could hold one.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::SystemTime,
};

use serde::Serialize;
use tokio::{io::AsyncWriteExt, sync::mpsc};

use crate::types::SessionId;

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
    /// The backend refused or could not be reached for the login.
    BackendLoginFailed,
    /// The connection ended (exactly once per accepted connection).
    SessionEnded,
    /// A CancelRequest was forwarded to a backend.
    CancelForwarded,
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
}

/// Facts collected as the session progresses; copied into every event it emits.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionFacts {
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
    /// Pool the session was routed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
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

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<AuditEvent>,
    written: Arc<AtomicU64>,
}

/// Where the writer sends events.
#[derive(Debug, Clone, Default)]
pub struct AuditSinks {
    /// JSON-lines file, appended to.
    pub file: Option<PathBuf>,
    /// Also to stdout.
    pub stdout: bool,
}

impl AuditLog {
    /// Start the writer task. It ends, after writing everything queued, once every `AuditLog`
    /// clone is dropped; await the returned handle to be sure everything is on disk.
    pub async fn start(
        sinks: AuditSinks,
    ) -> std::io::Result<(AuditLog, tokio::task::JoinHandle<()>)> {
        let mut file = match &sinks.file {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    if !dir.as_os_str().is_empty() {
                        tokio::fs::create_dir_all(dir).await?;
                    }
                }
                Some(
                    tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .await?,
                )
            }
            None => None,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<AuditEvent>();
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        let stdout = sinks.stdout;
        let task = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                buf.clear();
                for event in &batch {
                    if serde_json::to_writer(&mut buf, event).is_ok() {
                        buf.push(b'\n');
                    }
                }
                if let Some(f) = file.as_mut() {
                    if let Err(e) = f.write_all(&buf).await {
                        tracing::error!(error = %e, "audit file write failed");
                    }
                    let _ = f.flush().await;
                }
                if stdout {
                    let mut out = tokio::io::stdout();
                    let _ = out.write_all(&buf).await;
                    let _ = out.flush().await;
                }
                counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        });
        Ok((AuditLog { tx, written }, task))
    }

    /// Queue an event. Never blocks.
    pub fn record(&self, event: AuditEvent) {
        if self.tx.send(event).is_err() {
            tracing::error!("audit writer is gone; event lost");
        }
    }

    /// Number of events written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
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
    }
}
