//! One client connection, start to end: handshake → token → identity → backend login → relay.
//!
//! This is the one place that writes an error to the client: every phase returns its own error
//! type, and [`handle_client`] turns it into a single FATAL ErrorResponse with a SQLSTATE and a
//! message that says what to do, plus the session id in the detail. The precise reason goes to
//! the audit trail.

pub mod context;
pub mod handshake;
pub mod params;

use std::{borrow::Cow, net::SocketAddr, sync::Arc};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    audit::EventKind,
    auth::TokenError,
    backend::{self, plain_server_version, ConnectError},
    cancel::CancelTarget,
    config::{BackendAuth, PoolKind},
    error::{sqlstate, ErrorKind, Reportable, UserFacing},
    gateway::{Gateway, Snapshot},
    identity::{map_identity, IdentityError},
    metrics::{DirectionLabels, OutcomeLabels, ReasonLabels, RouteLabels},
    net::{
        proxy::{self, ProxyError},
        stream::ClientStream,
    },
    protocol::messages::{self, Severity},
    relay::{query_audit::QueryTap, relay_with_tap, RelayError},
    routing::{self, pool::ActiveSession, RouteError, RouteInput},
    types::redact_tokens,
};
use context::SessionContext;
use handshake::{Handshake, HandshakeError, TokenCarriage};
use params::ParamsError;

/// Every way a session can fail before the relay.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The PROXY protocol header was missing, untrusted or malformed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// Encryption negotiation, startup or token exchange.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The token was refused.
    #[error("token refused: {0}")]
    Token(#[from] TokenError),
    /// The identity could not be mapped.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A startup parameter was refused.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The backend could not be reached or refused the login.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// No pool could be chosen, or the person may not use it.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Every target of the chosen pool is unhealthy and the pool fails closed.
    #[error("every target of pool {0} is unhealthy")]
    AllUnhealthy(String),
    /// The handshake took longer than `handshake_timeout`.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The connection cap was reached.
    #[error("too many connections")]
    TooManyConnections,
    /// idgate is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// `fail_closed` is on and the audit spool cannot be written.
    #[error("the audit trail is unavailable")]
    AuditUnavailable,
}

impl Reportable for SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Proxy(e) => e.kind(),
            SessionError::Handshake(e) => e.kind(),
            SessionError::Token(e) => {
                if e.is_identity_provider_fault() {
                    ErrorKind::IdentityProvider
                } else {
                    ErrorKind::User
                }
            }
            SessionError::Identity(e) => e.kind(),
            SessionError::Params(e) => e.kind(),
            SessionError::Connect(e) => e.kind(),
            SessionError::Route(e) => e.kind(),
            SessionError::AllUnhealthy(_) => ErrorKind::BackendUnavailable,
            // The client stalled; it still gets an ErrorResponse when a stream is open.
            SessionError::HandshakeTimeout => ErrorKind::User,
            SessionError::TooManyConnections => ErrorKind::RateLimit,
            SessionError::Shutdown => ErrorKind::Shutdown,
            SessionError::AuditUnavailable => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> Cow<'static, str> {
        match self {
            SessionError::Proxy(e) => e.reason(),
            SessionError::Handshake(e) => e.reason(),
            SessionError::Token(e) => e.reason().into(),
            SessionError::Identity(e) => e.reason(),
            SessionError::Params(e) => e.reason(),
            SessionError::Connect(e) => e.reason(),
            SessionError::Route(e) => e.reason(),
            SessionError::AllUnhealthy(_) => "all_targets_unhealthy".into(),
            SessionError::HandshakeTimeout => "handshake_timeout".into(),
            SessionError::TooManyConnections => "too_many_connections".into(),
            SessionError::Shutdown => "shutdown".into(),
            SessionError::AuditUnavailable => "audit_unavailable".into(),
        }
    }
}

impl UserFacing for SessionError {
    fn sqlstate(&self) -> &'static str {
        match self {
            SessionError::Proxy(e) => e.sqlstate(),
            SessionError::Handshake(e) => e.sqlstate(),
            SessionError::Token(e) => e.sqlstate(),
            SessionError::Identity(e) => e.sqlstate(),
            SessionError::Params(e) => e.sqlstate(),
            SessionError::Connect(e) => e.sqlstate(),
            SessionError::Route(e) => e.sqlstate(),
            SessionError::AllUnhealthy(_) => sqlstate::CONNECTION_FAILURE,
            SessionError::HandshakeTimeout => sqlstate::PROTOCOL_VIOLATION,
            SessionError::TooManyConnections => sqlstate::TOO_MANY_CONNECTIONS,
            SessionError::Shutdown => sqlstate::ADMIN_SHUTDOWN,
            SessionError::AuditUnavailable => sqlstate::CONNECTION_FAILURE,
        }
    }

    fn client_message(&self) -> Cow<'static, str> {
        match self {
            SessionError::Proxy(e) => e.client_message(),
            SessionError::Handshake(e) => e.client_message(),
            SessionError::Token(e) => e.client_message(),
            SessionError::Identity(e) => e.client_message(),
            SessionError::Params(e) => e.client_message(),
            SessionError::Connect(e) => e.client_message(),
            SessionError::Route(e) => e.client_message(),
            SessionError::AllUnhealthy(pool) => format!(
                "workgroup \"{pool}\" has no healthy database target right now; try again shortly"
            )
            .into(),
            SessionError::HandshakeTimeout => "timed out waiting for the login to complete".into(),
            SessionError::TooManyConnections => {
                "too many connections to idgate; try again later".into()
            }
            SessionError::Shutdown => "idgate is shutting down; reconnect".into(),
            SessionError::AuditUnavailable => {
                "the audit trail is unavailable, so idgate accepts no new sessions; try again later"
                    .into()
            }
        }
    }
}

/// How long a connection past the cap and past the over-cap handshakes may take to show a
/// CancelRequest.
const OVER_CAP_CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Forward a CancelRequest to the backend of the session holding `key` (unknown keys are
/// dropped silently, as PostgreSQL does; the audit trail says so).
async fn forward_cancel(
    gw: &Gateway,
    snap: &Snapshot,
    ctx: &mut SessionContext,
    key: crate::protocol::startup::CancelKey,
) {
    ctx.set_end_reason("cancel_request");
    let Some(target) = gw.cancels.lookup(key) else {
        ctx.set_end_reason("cancel_request_unknown_key");
        return;
    };
    ctx.facts.target = Some(target.target.addr.clone());
    let result = backend::send_cancel(
        &target.target,
        target.backend_key,
        snap.config.listener.handshake_timeout,
    )
    .await;
    let detail = format!("cancelled session {}", target.session_id);
    match result {
        Ok(()) => ctx.emit(EventKind::CancelForwarded, None, Some(detail)),
        Err(e) => ctx.emit(
            EventKind::CancelForwarded,
            Some("cancel_send_failed".into()),
            Some(format!("{detail}: {e}")),
        ),
    }
}

/// Serve one accepted connection. Never panics on input; always records `session_ended`.
pub async fn handle_client(
    gw: Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let accepted_at = std::time::Instant::now();
    // One configuration snapshot for the whole session: a reload never changes it mid-way.
    let snap = gw.snapshot();
    let listener = &snap.config.listener;
    let deadline = tokio::time::Instant::now() + listener.handshake_timeout;
    let mut tcp = tcp;
    // Behind a load balancer, the client is the one its PROXY header names.
    let proxied = tokio::time::timeout_at(
        deadline,
        proxy::read_header(&mut tcp, peer, &listener.proxy),
    )
    .await;
    let (client_addr, proxy_error) = match proxied {
        Ok(Ok(Some(addr))) => (Some(addr), None),
        Ok(Ok(None)) => (None, None),
        Ok(Err(e)) => (None, Some(SessionError::Proxy(e))),
        Err(_) => (None, Some(SessionError::HandshakeTimeout)),
    };
    let mut ctx = SessionContext::accepted(gw.audit.clone(), peer, client_addr);
    let client_addr = ctx.peer();
    if let Some(e) = proxy_error {
        let mut stream: ClientStream = tokio_util::either::Either::Left(tcp);
        fail(&mut ctx, Some(&mut stream), &e).await;
        return;
    }
    // Over the cap, the handshake still runs (bounded by handshake_timeout) so the client gets a
    // readable 53300 instead of a broken TLS negotiation; no token is read and no backend is used.
    // Only OVER_CAP_HANDSHAKES such handshakes run at once: past that, a flood of connections is
    // closed before any TLS work (the audit trail still records each one).
    let permit = gw.connections.clone().try_acquire_owned().ok();
    let _over_cap = match &permit {
        Some(_) => None,
        None => match gw.over_cap_handshakes.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                // No TLS work, but a plaintext CancelRequest is still served: at the cap is when
                // people need to cancel runaway queries.
                let mut tcp = tcp;
                let first = tokio::time::timeout(
                    OVER_CAP_CANCEL_WAIT,
                    crate::protocol::startup::read_initial_packet(&mut tcp),
                )
                .await;
                if let Ok(Ok(crate::protocol::startup::InitialPacket::Cancel(key))) = first {
                    forward_cancel(&gw, &snap, &mut ctx, key).await;
                } else {
                    fail(&mut ctx, None, &SessionError::TooManyConnections).await;
                }
                return;
            }
        },
    };
    // The inner deadline answers a stalled startup with an ErrorResponse; this one bounds the
    // TLS handshake too, a moment later so the inner one wins a tie.
    let handshake = tokio::time::timeout_at(
        deadline + std::time::Duration::from_millis(100),
        handshake::negotiate(
            tcp,
            client_addr,
            snap.tls.as_ref(),
            listener.allow_plaintext,
            deadline,
        )
        .instrument(tracing::info_span!("handshake")),
    )
    .await;
    let handshake = match handshake {
        Err(_) => {
            fail(&mut ctx, None, &SessionError::HandshakeTimeout).await;
            return;
        }
        Ok(Err((mut stream, e))) => {
            fail(&mut ctx, stream.as_mut(), &SessionError::Handshake(e)).await;
            return;
        }
        Ok(Ok(h)) => h,
    };
    match handshake {
        Handshake::Cancel(key) => forward_cancel(&gw, &snap, &mut ctx, key).await,
        Handshake::Startup {
            mut stream,
            startup,
            tls,
        } => {
            if let Some(info) = &tls {
                ctx.facts.tls = info.version.clone();
                ctx.facts.sni = info.sni.clone();
                ctx.emit(EventKind::TlsEstablished, None, None);
            }
            let Some(_permit) = permit else {
                fail(
                    &mut ctx,
                    Some(&mut stream),
                    &SessionError::TooManyConnections,
                )
                .await;
                return;
            };
            if gw.audit.refuses_sessions() {
                fail(&mut ctx, Some(&mut stream), &SessionError::AuditUnavailable).await;
                return;
            }
            let result = tokio::select! {
                r = session(&gw, &snap, &mut ctx, &mut stream, startup, accepted_at, deadline) => r,
                _ = shutdown.cancelled() => Err(SessionError::Shutdown),
            };
            let outcome = match result {
                Ok(Some(backend)) => {
                    let tap = ctx
                        .facts
                        .pool
                        .as_deref()
                        .and_then(|p| gw.audit.query_audit_len(p));
                    let tap = tap.map(|max| {
                        QueryTap::new(
                            gw.audit.clone(),
                            ctx.id,
                            client_addr,
                            ctx.facts.clone(),
                            max,
                        )
                    });
                    run_relay(&mut ctx, stream, backend, &shutdown, tap).await;
                    let m = &gw.metrics.bytes;
                    m.get_or_create(&DirectionLabels {
                        direction: "in".into(),
                    })
                    .inc_by(
                        ctx.counters
                            .from_client
                            .load(std::sync::atomic::Ordering::Relaxed),
                    );
                    m.get_or_create(&DirectionLabels {
                        direction: "out".into(),
                    })
                    .inc_by(
                        ctx.counters
                            .to_client
                            .load(std::sync::atomic::Ordering::Relaxed),
                    );
                    "relayed"
                }
                Ok(None) => "disconnected",
                Err(e) => {
                    let outcome = match &e {
                        SessionError::Token(_)
                        | SessionError::Identity(_)
                        | SessionError::Params(_)
                        | SessionError::Route(_) => {
                            gw.metrics
                                .auth_failures
                                .get_or_create(&ReasonLabels {
                                    reason: e.reason().into_owned(),
                                })
                                .inc();
                            "auth_failed"
                        }
                        SessionError::Connect(_) | SessionError::AllUnhealthy(_) => {
                            "backend_failed"
                        }
                        SessionError::Handshake(_)
                        | SessionError::Proxy(_)
                        | SessionError::HandshakeTimeout
                        | SessionError::TooManyConnections
                        | SessionError::AuditUnavailable
                        | SessionError::Shutdown => "refused",
                    };
                    fail(&mut ctx, Some(&mut stream), &e).await;
                    outcome
                }
            };
            gw.metrics
                .sessions
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.into(),
                })
                .inc();
        }
    }
}

/// Handshake through backend login. Returns the logged-in backend, ready to relay.
async fn session(
    gw: &Gateway,
    snap: &Snapshot,
    ctx: &mut SessionContext,
    stream: &mut ClientStream,
    startup: crate::protocol::startup::StartupMessage,
    accepted_at: std::time::Instant,
    deadline: tokio::time::Instant,
) -> Result<Option<Box<LoggedIn>>, SessionError> {
    let params = &startup.params;
    // Client-supplied values are audited, so a token pasted into the wrong field is redacted.
    let fact = |key: &str| params.get(key).map(|v| redact_tokens(v).into_owned());
    ctx.facts.client_user = fact("user");
    ctx.facts.database = fact("database");
    ctx.facts.application_name = fact("application_name");
    ctx.facts.driver_version = fact("driver_version");
    ctx.facts.plugin_name = fact("plugin_name");
    ctx.facts.client_protocol_version = fact("client_protocol_version");

    let carriage = if params.get("idp_type").is_some() {
        TokenCarriage::RedshiftIdp
    } else {
        TokenCarriage::Password
    };
    ctx.facts.auth_method = Some(carriage.as_str());
    let mut pending = Vec::new();
    handshake::negotiation_replies(&startup, &mut pending);
    // One deadline from accept to the token (handshake_timeout), not one per phase.
    let token = tokio::time::timeout_at(
        deadline,
        handshake::read_token(stream, carriage, pending).instrument(tracing::info_span!(
            "token_exchange",
            method = carriage.as_str()
        )),
    )
    .await
    .map_err(|_| SessionError::HandshakeTimeout)??;
    gw.metrics
        .handshake_seconds
        .observe(accepted_at.elapsed().as_secs_f64());

    let claims = snap
        .auth
        .verify(token.expose())
        .instrument(tracing::info_span!("authenticate"))
        .await;
    // Without a valid token there is nothing to forward.
    let claims = match claims {
        Ok(c) => c,
        Err(e) => {
            drop(token);
            return Err(e.into());
        }
    };
    ctx.facts.issuer = Some(claims.issuer_name().to_owned());
    ctx.facts.tenant = Some(claims.tenant_id().to_owned());
    ctx.facts.object_id = claims.object_id().map(str::to_owned);
    ctx.facts.token_id = claims.token_id().map(str::to_owned);

    let config = &snap.config;
    let identity = map_identity(&config.identity, &claims, params.get("user"))?;
    ctx.facts.db_user = Some(identity.db_user.clone());
    ctx.facts.roles = identity.roles.clone();

    let route_option = params
        .get("options")
        .and_then(|o| params::take_option(o, &config.routing.startup_option).0);
    let decision = routing::route(
        config,
        &RouteInput {
            sni: ctx.facts.sni.as_deref(),
            option: route_option.as_deref(),
            database: params.get("database"),
            claims: &claims,
        },
    );
    // A refusal for a pool is audited with that pool, so per-pool queries see it.
    if let Err(RouteError::NotAllowed { pool, rule }) = &decision {
        ctx.facts.pool = Some(pool.clone());
        ctx.facts.route_rule = Some(rule.as_str());
    }
    let decision = decision?;
    let pool = &snap.pools[decision.pool];
    // The token is kept only when the pool forwards it, and only until the backend login.
    let token = match pool.config.backend_auth {
        BackendAuth::Token => Some(token),
        BackendAuth::Trust | BackendAuth::Password { .. } | BackendAuth::ClientCert { .. } => {
            drop(token);
            None
        }
    };
    ctx.facts.pool = Some(pool.config.name.clone());
    ctx.facts.backend_auth = Some(pool.config.backend_auth.mode());
    ctx.facts.route_rule = Some(decision.rule.as_str());
    if decision.database.is_some() {
        ctx.facts.database = decision.database.clone();
    }
    gw.metrics
        .routes
        .get_or_create(&RouteLabels {
            rule: decision.rule.as_str().into(),
            pool: pool.config.name.clone(),
        })
        .inc();
    let backend_params = params::backend_params_routed(
        params,
        pool.config.kind,
        Some(&config.routing.startup_option),
        decision.database.as_deref(),
    )?;
    ctx.emit(EventKind::AuthSucceeded, None, None);

    let (candidates, forced) = pool.candidates();
    if candidates.is_empty() {
        return Err(SessionError::AllUnhealthy(pool.config.name.clone()));
    }
    ctx.facts.route_forced = forced;
    let fall = config.health.fall;
    let login_started = std::time::Instant::now();
    let login_span = tracing::info_span!("backend_login", pool = %pool.config.name);
    let login = backend::Login {
        user: &identity.db_user,
        roles: &identity.roles,
        roles_complete: identity.groups_complete,
        token: token.as_ref(),
        probe_password: None,
    };
    let connected = backend::connect(pool, &candidates, &login, &backend_params, |target, e| {
        ctx.emit(
            EventKind::BackendAttemptFailed,
            Some(e.reason().into_owned()),
            Some(format!("{}: {e}", target.config.addr)),
        );
        // Passive ejection: live connect failures count towards `fall`.
        if let Some(h) = target.state.failure(fall) {
            routing::health::report(gw, &pool.config.name, target, h, &e.to_string());
        }
    })
    .instrument(login_span)
    .await;
    drop(token);
    let (backend, target) = connected?;
    if !backend.provisioned.is_empty() {
        ctx.facts.target = Some(backend.target.addr.clone());
        ctx.emit(
            EventKind::RolesProvisioned,
            None,
            Some(backend.provisioned.to_string()),
        );
    }
    gw.metrics
        .backend_login_seconds
        .observe(login_started.elapsed().as_secs_f64());
    target.state.live_ok();
    let active = ActiveSession::new(target);
    ctx.facts.target = Some(backend.target.addr.clone());
    if backend.login_user != identity.db_user {
        ctx.facts.db_user = Some(backend.login_user.clone());
    }
    ctx.emit(EventKind::SessionRouted, None, None);

    // Hand the client the backend's parameters and idgate's own cancel key.
    let mut out = Vec::with_capacity(512);
    messages::authentication(&mut out, messages::AUTH_OK);
    for (name, value) in &backend.params {
        // In front of stock PostgreSQL only: a Redshift workgroup's value goes through as is.
        let value = if name == "server_version" && pool.config.kind == PoolKind::Postgres {
            plain_server_version(value)
        } else {
            value.as_str()
        };
        messages::parameter_status(&mut out, name, value);
    }
    let registration = backend.key.map(|backend_key| {
        gw.cancels.register(CancelTarget {
            target: backend.target.clone(),
            backend_key,
            session_id: ctx.id,
        })
    });
    if let Some((key, _)) = &registration {
        messages::backend_key_data(&mut out, key.process_id, key.secret_key);
    }
    messages::ready_for_query(&mut out);
    if let Err(e) = write_flush(stream, &out).await {
        ctx.set_end_reason("client_disconnected");
        tracing::debug!(session = %ctx.id, error = %e, "client went away before ReadyForQuery");
        return Ok(None);
    }
    Ok(Some(Box::new(LoggedIn {
        backend,
        _cancel: registration.map(|(_, r)| r),
        _active: active,
    })))
}

/// A backend at ReadyForQuery plus the session's cancel registration and its count on the
/// target (both released on drop).
struct LoggedIn {
    backend: backend::BackendConnection,
    _cancel: Option<crate::cancel::CancelRegistration>,
    _active: ActiveSession,
}

async fn run_relay(
    ctx: &mut SessionContext,
    client: ClientStream,
    logged_in: Box<LoggedIn>,
    shutdown: &CancellationToken,
    tap: Option<QueryTap>,
) {
    let LoggedIn {
        backend,
        _cancel,
        _active,
    } = *logged_in;
    let counters = ctx.counters.clone();
    let end = match relay_with_tap(client, backend.stream, &counters, shutdown, tap)
        .instrument(tracing::info_span!("relay"))
        .await
    {
        Ok(()) => "closed".to_owned(),
        Err(RelayError::Client(e)) => format!("client_error: {}", e.kind()),
        Err(RelayError::Backend(e)) => format!("backend_error: {}", e.kind()),
        Err(RelayError::Shutdown) => "shutdown".to_owned(),
    };
    ctx.set_end_reason(end);
}

/// Record a failure and send the client one FATAL ErrorResponse (when a stream is available).
async fn fail(ctx: &mut SessionContext, stream: Option<&mut ClientStream>, e: &SessionError) {
    let reason = e.reason().into_owned();
    let detail = Some(e.to_string());
    match e {
        SessionError::Token(_)
        | SessionError::Identity(_)
        | SessionError::Params(_)
        | SessionError::Route(_) => ctx.emit(EventKind::AuthFailed, Some(reason.clone()), detail),
        // A stall is not a failed login (as for the token stage): no auth_failed, so idle
        // connections do not count towards brute-force alerts.
        SessionError::Handshake(HandshakeError::StartupTimeout) => {}
        SessionError::Handshake(h) if h.kind() == ErrorKind::User => {
            ctx.emit(EventKind::AuthFailed, Some(reason.clone()), detail)
        }
        SessionError::Proxy(p) if p.kind() == ErrorKind::User => {
            ctx.emit(EventKind::AuthFailed, Some(reason.clone()), detail)
        }
        SessionError::Connect(_) | SessionError::AllUnhealthy(_) => {
            ctx.emit(EventKind::BackendLoginFailed, Some(reason.clone()), detail)
        }
        SessionError::Handshake(_)
        | SessionError::Proxy(_)
        | SessionError::HandshakeTimeout
        | SessionError::TooManyConnections
        | SessionError::AuditUnavailable
        | SessionError::Shutdown => {}
    }
    tracing::info!(session = %ctx.id, peer = %ctx.peer(), reason = %reason, "session refused");
    ctx.set_end_reason(reason);
    let Some(stream) = stream else { return };
    if e.kind() == ErrorKind::ClientDisconnect {
        return;
    }
    let code = match e {
        SessionError::Connect(ConnectError::Refused { fields, .. }) if !fields.code.is_empty() => {
            fields.code.clone()
        }
        _ => e.sqlstate().to_owned(),
    };
    let mut out = Vec::new();
    let detail = format!("session id {}", ctx.id);
    // Messages may quote the client's own startup values back (a backend's "invalid value
    // for parameter …"): a token pasted there is not echoed.
    let message = e.client_message();
    messages::error_response(
        &mut out,
        Severity::Fatal,
        &code,
        &redact_tokens(&message),
        Some(&detail),
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let _ = write_flush(stream, &out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn write_flush(stream: &mut ClientStream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}
