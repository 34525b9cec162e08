//! Optional query audit: a parser on the client → backend byte stream that records the text of
//! each simple query ('Q') and Parse ('P') message, truncated, as a `query` audit event.
//!
//! It only *observes*: the relay forwards every byte exactly as read, whatever this parser thinks
//! of it. It keeps at most `max_len` (+ a statement name) bytes of one message, skips the rest of
//! long messages (COPY data, big binds) without buffering, and switches itself off for good on a
//! length it cannot believe, so a confused parser can cost an audit record but never a session.

use std::net::SocketAddr;

use crate::{
    audit::{event, AuditLog, EventKind, SessionFacts},
    types::SessionId,
};

/// Extra bytes kept for a Parse message's statement name.
const NAME_ALLOWANCE: usize = 256;

enum State {
    /// Reading the 5-byte header (type + length).
    Header { buf: [u8; 5], have: usize },
    /// Inside a message body.
    Body {
        kind: u8,
        remaining: usize,
        keep: usize,
        captured: Vec<u8>,
    },
    /// Gave up (impossible length); passes bytes without looking.
    Off,
}

/// The parser plus what each `query` event needs.
pub struct QueryTap {
    audit: AuditLog,
    session_id: SessionId,
    peer: SocketAddr,
    facts: SessionFacts,
    max_len: usize,
    state: State,
}

impl QueryTap {
    /// A tap for one session; `max_len` bounds the recorded statement text.
    pub fn new(
        audit: AuditLog,
        session_id: SessionId,
        peer: SocketAddr,
        facts: SessionFacts,
        max_len: usize,
    ) -> Self {
        Self {
            audit,
            session_id,
            peer,
            facts,
            max_len,
            state: State::Header {
                buf: [0; 5],
                have: 0,
            },
        }
    }

    /// Look at bytes that were just read from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Header { buf, have } => {
                    let n = (5 - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have == 5 {
                        let kind = buf[0];
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        if len < 4 {
                            self.state = State::Off;
                            return;
                        }
                        let keep = match kind {
                            b'Q' => self.max_len + 1,
                            b'P' => self.max_len + NAME_ALLOWANCE,
                            _ => 0,
                        };
                        self.state = State::Body {
                            kind,
                            remaining: len - 4,
                            keep,
                            captured: Vec::new(),
                        };
                        self.finish_if_done();
                    }
                }
                State::Body {
                    remaining,
                    keep,
                    captured,
                    ..
                } => {
                    let n = (*remaining).min(bytes.len());
                    let room = keep.saturating_sub(captured.len()).min(n);
                    captured.extend_from_slice(&bytes[..room]);
                    *remaining -= n;
                    bytes = &bytes[n..];
                    self.finish_if_done();
                }
            }
        }
    }

    fn finish_if_done(&mut self) {
        let State::Body {
            kind,
            remaining: 0,
            captured,
            ..
        } = &self.state
        else {
            return;
        };
        let (statement_kind, text) = match kind {
            b'Q' => ("simple", cstr(captured)),
            b'P' => {
                let rest = captured
                    .iter()
                    .position(|b| *b == 0)
                    .map_or(&captured[..0], |i| &captured[i + 1..]);
                ("parse", cstr(rest))
            }
            _ => {
                self.state = State::Header {
                    buf: [0; 5],
                    have: 0,
                };
                return;
            }
        };
        let truncated = text.len() > self.max_len;
        let mut cut = text.len().min(self.max_len);
        let mut statement = String::from_utf8_lossy(&text[..cut]).into_owned();
        if truncated {
            // Do not end inside a multi-byte character.
            while !statement.is_empty() && statement.ends_with('\u{FFFD}') && cut > 0 {
                cut -= 1;
                statement = String::from_utf8_lossy(&text[..cut]).into_owned();
            }
        }
        let mut e = event(
            EventKind::Query,
            self.session_id,
            Some(self.peer),
            &self.facts,
        );
        e.statement = Some(statement);
        e.statement_kind = Some(statement_kind);
        e.truncated = Some(truncated);
        self.audit.record(e);
        self.state = State::Header {
            buf: [0; 5],
            have: 0,
        };
    }
}

/// Bytes up to the first NUL (or all of them).
fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|x| *x == 0).map_or(b, |i| &b[..i])
}
