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

use crate::{
    audit::EventKind,
    auth::TokenError,
    backend::{self, plain_server_version, ConnectError},
    cancel::CancelTarget,
    error::{sqlstate, ErrorKind, Reportable, UserFacing},
    gateway::Gateway,
    identity::{map_identity, IdentityError},
    net::stream::ClientStream,
    protocol::messages::{self, Severity},
    relay::{query_audit::QueryTap, relay_with_tap, RelayError},
};
use context::SessionContext;
use handshake::{Handshake, HandshakeError, TokenCarriage};
use params::ParamsError;

/// Every way a session can fail before the relay.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
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
            SessionError::HandshakeTimeout => ErrorKind::ClientDisconnect,
            SessionError::TooManyConnections => ErrorKind::RateLimit,
            SessionError::Shutdown => ErrorKind::Shutdown,
            SessionError::AuditUnavailable => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> Cow<'static, str> {
        match self {
            SessionError::Handshake(e) => e.reason(),
            SessionError::Token(e) => e.reason().into(),
            SessionError::Identity(e) => e.reason(),
            SessionError::Params(e) => e.reason(),
            SessionError::Connect(e) => e.reason(),
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
            SessionError::Handshake(e) => e.sqlstate(),
            SessionError::Token(e) => e.sqlstate(),
            SessionError::Identity(e) => e.sqlstate(),
            SessionError::Params(e) => e.sqlstate(),
            SessionError::Connect(e) => e.sqlstate(),
            SessionError::HandshakeTimeout => sqlstate::PROTOCOL_VIOLATION,
            SessionError::TooManyConnections => sqlstate::TOO_MANY_CONNECTIONS,
            SessionError::Shutdown => sqlstate::ADMIN_SHUTDOWN,
            SessionError::AuditUnavailable => sqlstate::CONNECTION_FAILURE,
        }
    }

    fn client_message(&self) -> Cow<'static, str> {
        match self {
            SessionError::Handshake(e) => e.client_message(),
            SessionError::Token(e) => e.client_message(),
            SessionError::Identity(e) => e.client_message(),
            SessionError::Params(e) => e.client_message(),
            SessionError::Connect(e) => e.client_message(),
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

/// Serve one accepted connection. Never panics on input; always records `session_ended`.
pub async fn handle_client(
    gw: Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let mut ctx = SessionContext::accepted(gw.audit.clone(), peer);
    // Over the cap, the handshake still runs (bounded by handshake_timeout) so the client gets a
    // readable 53300 instead of a broken TLS negotiation; no token is read and no backend is used.
    let permit = gw.connections.clone().try_acquire_owned().ok();
    let handshake = tokio::time::timeout(
        gw.config.listener.handshake_timeout,
        handshake::negotiate(
            tcp,
            peer,
            gw.tls.as_ref(),
            gw.config.listener.allow_plaintext,
        ),
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
        Handshake::Cancel(key) => {
            ctx.set_end_reason("cancel_request");
            if let Some(target) = gw.cancels.lookup(key) {
                ctx.facts.target = Some(target.target.addr.clone());
                let result = backend::send_cancel(
                    &target.target,
                    target.backend_key,
                    gw.config.listener.handshake_timeout,
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
            // Unknown keys are dropped silently, as PostgreSQL does.
        }
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
                r = session(&gw, &mut ctx, &mut stream, startup) => r,
                _ = shutdown.cancelled() => Err(SessionError::Shutdown),
            };
            match result {
                Ok(Some(backend)) => {
                    let tap = ctx
                        .facts
                        .pool
                        .as_deref()
                        .and_then(|p| gw.audit.query_audit_len(p));
                    let tap = tap.map(|max| {
                        QueryTap::new(gw.audit.clone(), ctx.id, peer, ctx.facts.clone(), max)
                    });
                    run_relay(&mut ctx, stream, backend, &shutdown, tap).await
                }
                Ok(None) => {}
                Err(e) => fail(&mut ctx, Some(&mut stream), &e).await,
            }
        }
    }
}

/// Handshake through backend login. Returns the logged-in backend, ready to relay.
async fn session(
    gw: &Gateway,
    ctx: &mut SessionContext,
    stream: &mut ClientStream,
    startup: crate::protocol::startup::StartupMessage,
) -> Result<Option<Box<LoggedIn>>, SessionError> {
    let params = &startup.params;
    ctx.facts.client_user = params.get("user").map(str::to_owned);
    ctx.facts.database = params.get("database").map(str::to_owned);
    ctx.facts.application_name = params.get("application_name").map(str::to_owned);
    ctx.facts.driver_version = params.get("driver_version").map(str::to_owned);
    ctx.facts.plugin_name = params.get("plugin_name").map(str::to_owned);

    let carriage = if params.get("idp_type").is_some() {
        TokenCarriage::RedshiftIdp
    } else {
        TokenCarriage::Password
    };
    ctx.facts.auth_method = Some(carriage.as_str());
    let mut pending = Vec::new();
    handshake::negotiation_replies(&startup, &mut pending);
    let token = tokio::time::timeout(
        gw.config.listener.handshake_timeout,
        handshake::read_token(stream, carriage, pending),
    )
    .await
    .map_err(|_| SessionError::HandshakeTimeout)??;

    let claims = gw.auth.verify(token.expose()).await;
    drop(token);
    let claims = claims?;
    ctx.facts.issuer = Some(claims.issuer_name().to_owned());
    ctx.facts.tenant = Some(claims.tenant_id().to_owned());
    ctx.facts.object_id = claims.object_id().map(str::to_owned);
    ctx.facts.token_id = claims.token_id().map(str::to_owned);

    let identity = map_identity(&gw.config.identity, &claims, params.get("user"))?;
    ctx.facts.db_user = Some(identity.db_user.clone());
    ctx.facts.roles = identity.roles.clone();

    let pool = gw.default_pool();
    ctx.facts.pool = Some(pool.config.name.clone());
    let backend_params = params::backend_params(params, pool.config.kind)?;
    ctx.emit(EventKind::AuthSucceeded, None, None);

    let backend = backend::connect(pool, &identity.db_user, &backend_params, |target, e| {
        ctx.emit(
            EventKind::BackendLoginFailed,
            Some(e.reason().into_owned()),
            Some(format!("{}: {e}; trying the next target", target.addr)),
        );
    })
    .await?;
    ctx.facts.target = Some(backend.target.addr.clone());
    if backend.login_user != identity.db_user {
        ctx.facts.db_user = Some(backend.login_user.clone());
    }
    ctx.emit(EventKind::SessionRouted, None, None);

    // Hand the client the backend's parameters and idgate's own cancel key.
    let mut out = Vec::with_capacity(512);
    messages::authentication(&mut out, messages::AUTH_OK);
    for (name, value) in &backend.params {
        let value = if name == "server_version" {
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
    })))
}

/// A backend at ReadyForQuery plus the session's cancel registration (removed on drop).
struct LoggedIn {
    backend: backend::BackendConnection,
    _cancel: Option<crate::cancel::CancelRegistration>,
}

async fn run_relay(
    ctx: &mut SessionContext,
    client: ClientStream,
    logged_in: Box<LoggedIn>,
    shutdown: &CancellationToken,
    tap: Option<QueryTap>,
) {
    let LoggedIn { backend, _cancel } = *logged_in;
    let counters = ctx.counters.clone();
    let end = match relay_with_tap(client, backend.stream, &counters, shutdown, tap).await {
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
        SessionError::Token(_) | SessionError::Identity(_) | SessionError::Params(_) => {
            ctx.emit(EventKind::AuthFailed, Some(reason.clone()), detail)
        }
        SessionError::Handshake(h) if h.kind() == ErrorKind::User => {
            ctx.emit(EventKind::AuthFailed, Some(reason.clone()), detail)
        }
        SessionError::Connect(_) => {
            ctx.emit(EventKind::BackendLoginFailed, Some(reason.clone()), detail)
        }
        SessionError::Handshake(_)
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
    messages::error_response(
        &mut out,
        Severity::Fatal,
        &code,
        &e.client_message(),
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
