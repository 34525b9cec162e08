//! `SessionContext`: facts about one connection, collected for the audit trail.
//!
//! It is never read by control flow. It emits `session_ended` exactly once, from `Drop`, so the
//! event is written however the session ends (error, disconnect, shutdown, panic).

use std::{net::SocketAddr, sync::atomic::Ordering, time::Instant};

use crate::{
    audit::{event, AuditEvent, AuditLog, EventKind, SessionFacts},
    relay::ByteCounters,
    types::SessionId,
};

/// Facts about one connection.
pub struct SessionContext {
    audit: AuditLog,
    /// This connection's id.
    pub id: SessionId,
    peer: SocketAddr,
    started: Instant,
    /// Facts copied into every event.
    pub facts: SessionFacts,
    end_reason: Option<String>,
    /// Relay byte counters.
    pub counters: ByteCounters,
}

impl SessionContext {
    /// Start a context and record `connection_accepted`.
    /// `proxied` is the client address from a PROXY header; `peer` is then the load balancer.
    pub fn accepted(audit: AuditLog, peer: SocketAddr, proxied: Option<SocketAddr>) -> Self {
        let ctx = Self {
            audit,
            id: SessionId::new(),
            peer: proxied.unwrap_or(peer),
            started: Instant::now(),
            facts: SessionFacts {
                proxied_by: proxied.map(|_| peer.to_string()),
                ..SessionFacts::default()
            },
            end_reason: None,
            counters: ByteCounters::default(),
        };
        ctx.emit(EventKind::ConnectionAccepted, None, None);
        ctx
    }

    /// The client's address (from the PROXY header when there was one).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Record an event with the current facts.
    pub fn emit(&self, kind: EventKind, reason: Option<String>, detail: Option<String>) {
        let mut e = self.event(kind);
        e.reason = reason;
        e.detail = detail;
        self.audit.record(e);
    }

    fn event(&self, kind: EventKind) -> AuditEvent {
        event(kind, self.id, Some(self.peer), &self.facts)
    }

    /// Set why the session ended (the last call wins).
    pub fn set_end_reason(&mut self, reason: impl Into<String>) {
        self.end_reason = Some(reason.into());
    }
}

impl Drop for SessionContext {
    fn drop(&mut self) {
        let mut e = self.event(EventKind::SessionEnded);
        e.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        e.bytes_in = Some(self.counters.from_client.load(Ordering::Relaxed));
        e.bytes_out = Some(self.counters.to_client.load(Ordering::Relaxed));
        e.end_reason = Some(self.end_reason.take().unwrap_or_else(|| "aborted".into()));
        self.audit.record(e);
    }
}
