//! The backend side: connect to a pool's target, log in as the mapped identity, and hand back a
//! connection that sits at ReadyForQuery with the server's ParameterStatus list and key data.
//!
//! Targets are tried round-robin; a target that cannot be reached (refused, timed out) or that
//! refuses the login with a retryable SQLSTATE is skipped before the client sees anything.
//!
//! How idgate proves who it logs in as (`backend_auth`) is per pool: a client certificate minted
//! per user ([`client_cert`]), the client's own token (token as password, or the Redshift native
//! IdP exchange in [`redshift`]), a password, or trust. With `provisioning = "jit"` the login
//! role and its namespace role memberships are brought in step first ([`provision`]).

pub mod client_cert;
pub mod provision;
pub mod redshift;

use std::{borrow::Cow, sync::Arc, time::Duration};

use bytes::BytesMut;
use postgres_protocol::{
    authentication::{md5_hash, sasl},
    message::frontend,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::either::Either;

use crate::{
    config::{BackendAuth, PoolConfig, PoolKind, ProbeCredential, TargetConfig},
    error::{sqlstate, ErrorKind, Reportable, UserFacing},
    net::{stream::BackendStream, tls},
    protocol::{
        frame::{read_frame, FrameError},
        messages::{parse_error_fields, ErrorFields},
        startup::CancelKey,
    },
    routing::pool::{Pool, Target},
    types::Secret,
};

/// Cap on one backend message during login (ParameterStatus, ErrorResponse, SASL data).
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Who to log in as, and the client's token while it is still needed (`backend_auth = "token"`).
pub struct Login<'a> {
    /// The mapped database user (or the probe role).
    pub user: &'a str,
    /// The mapped roles (`<namespace>:<role>`), for JIT provisioning.
    pub roles: &'a [String],
    /// Whether `roles` is the whole truth (false after a groups overage): JIT revokes nothing
    /// when it is not.
    pub roles_complete: bool,
    /// The client's token; kept only until the backend login completes.
    pub token: Option<&'a Secret<String>>,
    /// Health probes log in with their own password, whatever the pool's `backend_auth`.
    pub probe_password: Option<&'a Secret<String>>,
}

/// A logged-in backend connection at ReadyForQuery.
pub struct BackendConnection {
    /// The stream (TLS or plain).
    pub stream: BackendStream,
    /// ParameterStatus pairs in the order received.
    pub params: Vec<(String, String)>,
    /// The backend's cancel key, if it sent one.
    pub key: Option<CancelKey>,
    /// Which target answered.
    pub target: TargetConfig,
    /// The role the session runs as.
    pub login_user: String,
    /// What JIT provisioning changed before this login (empty when nothing changed).
    pub provisioned: provision::RoleChanges,
}

/// A failed backend connect or login.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Target.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// TCP connect or login took too long.
    #[error("{addr}: {phase} timed out")]
    Timeout {
        /// Target.
        addr: String,
        /// `connect` or `login`.
        phase: &'static str,
    },
    /// The backend refused TLS although the pool requires it.
    #[error("{addr} does not accept TLS but the pool requires it")]
    TlsRefused {
        /// Target.
        addr: String,
    },
    /// The TLS handshake with the backend failed (e.g. certificate not trusted).
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        /// Target.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The backend sent an ErrorResponse during login. `raw` is the whole message, forwarded
    /// to the client as is.
    #[error("{addr} refused the login: {} {}", fields.code, fields.message)]
    Refused {
        /// Target.
        addr: String,
        /// Parsed fields.
        fields: ErrorFields,
        /// The message bytes (type, length, body).
        raw: Vec<u8>,
    },
    /// The backend asked for an authentication method idgate cannot answer.
    #[error(
        "{addr} asked for authentication method {code}, which backend_auth = {mode} cannot answer"
    )]
    UnsupportedAuth {
        /// Target.
        addr: String,
        /// The request code.
        code: i32,
        /// Configured mode.
        mode: &'static str,
    },
    /// The backend broke the protocol or closed the connection.
    #[error("{addr}: {message}")]
    Protocol {
        /// Target.
        addr: String,
        /// What happened.
        message: Cow<'static, str>,
    },
    /// The pool has no targets left to try.
    #[error("pool {pool} has no reachable target")]
    NoTarget {
        /// Pool name.
        pool: String,
    },
    /// No client certificate could be minted.
    #[error("client certificate for {addr}: {source}")]
    ClientCert {
        /// Target.
        addr: String,
        /// Cause.
        source: client_cert::ClientCertError,
    },
    /// `backend_auth = "token"` but the client's token was not kept for the login.
    #[error("{addr}: no client token to forward")]
    NoToken {
        /// Target.
        addr: String,
    },
    /// JIT provisioning failed.
    #[error("provisioning on {addr}: {source}")]
    Provision {
        /// Target.
        addr: String,
        /// Cause.
        source: provision::ProvisionError,
    },
}

impl ConnectError {
    /// Whether another target may succeed where this one failed.
    pub fn could_retry(&self) -> bool {
        match self {
            ConnectError::Connect { .. } | ConnectError::Timeout { .. } => true,
            ConnectError::Refused { fields, .. } => {
                matches!(fields.code.as_str(), "57P01" | "57P02" | "57P03" | "53300")
            }
            ConnectError::Provision { source, .. } => source.could_retry(),
            ConnectError::TlsRefused { .. }
            | ConnectError::Tls { .. }
            | ConnectError::UnsupportedAuth { .. }
            | ConnectError::Protocol { .. }
            | ConnectError::NoTarget { .. }
            | ConnectError::ClientCert { .. }
            | ConnectError::NoToken { .. } => false,
        }
    }
}

impl Reportable for ConnectError {
    fn kind(&self) -> ErrorKind {
        match self {
            ConnectError::Connect { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::TlsRefused { .. }
            | ConnectError::Tls { .. }
            | ConnectError::NoTarget { .. }
            | ConnectError::Protocol { .. } => ErrorKind::BackendUnavailable,
            ConnectError::Refused { .. } | ConnectError::Provision { .. } => ErrorKind::Backend,
            ConnectError::UnsupportedAuth { .. }
            | ConnectError::ClientCert { .. }
            | ConnectError::NoToken { .. } => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> Cow<'static, str> {
        match self {
            ConnectError::Connect { .. } => "backend_connect_failed".into(),
            ConnectError::Timeout { .. } => "backend_timeout".into(),
            ConnectError::TlsRefused { .. } => "backend_tls_refused".into(),
            ConnectError::Tls { .. } => "backend_tls_failed".into(),
            ConnectError::Refused { fields, .. } => {
                format!("backend_refused_{}", fields.code).into()
            }
            ConnectError::UnsupportedAuth { .. } => "backend_auth_unsupported".into(),
            ConnectError::Protocol { .. } => "backend_protocol_error".into(),
            ConnectError::NoTarget { .. } => "no_target_available".into(),
            ConnectError::ClientCert { .. } => "client_cert_failed".into(),
            ConnectError::NoToken { .. } => "backend_token_missing".into(),
            ConnectError::Provision { source, .. } => source.reason(),
        }
    }
}

impl UserFacing for ConnectError {
    fn sqlstate(&self) -> &'static str {
        match self {
            ConnectError::Connect { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::TlsRefused { .. }
            | ConnectError::Tls { .. }
            | ConnectError::Protocol { .. }
            | ConnectError::NoTarget { .. } => sqlstate::CONNECTION_FAILURE,
            // The backend's own message is forwarded raw; this code is only a fallback.
            ConnectError::Refused { .. } => sqlstate::INVALID_PASSWORD,
            ConnectError::UnsupportedAuth { .. }
            | ConnectError::ClientCert { .. }
            | ConnectError::NoToken { .. } => sqlstate::INTERNAL,
            ConnectError::Provision { .. } => sqlstate::CONNECTION_FAILURE,
        }
    }

    fn client_message(&self) -> Cow<'static, str> {
        match self {
            ConnectError::Connect { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::Protocol { .. }
            | ConnectError::NoTarget { .. } => "could not reach the database behind idgate; try again shortly".into(),
            ConnectError::TlsRefused { .. } | ConnectError::Tls { .. } => {
                "idgate could not open a secure connection to the database; ask the operator to check backend_tls".into()
            }
            ConnectError::Refused { fields, .. } => fields.message.clone().into(),
            ConnectError::UnsupportedAuth { .. } => {
                "the database asked for a login method idgate is not configured for; ask the operator to check backend_auth"
                    .into()
            }
            ConnectError::ClientCert { .. } | ConnectError::NoToken { .. } => {
                "idgate could not prepare its login to the database; ask the operator to check backend_auth and [ca]".into()
            }
            ConnectError::Provision { .. } => {
                "idgate could not prepare your database role; try again shortly or ask the operator to check provisioning".into()
            }
        }
    }
}

/// Try `candidates` in order and log in as `login` with `params`. Retryable failures move on to
/// the next target (reported through `on_retry`); the first non-retryable failure is returned.
/// The whole attempt is bounded by the pool's `retry_budget`.
pub async fn connect<'a>(
    pool: &'a Pool,
    candidates: &[&'a Target],
    login: &Login<'_>,
    params: &[(String, String)],
    mut on_retry: impl FnMut(&Target, &ConnectError),
) -> Result<(BackendConnection, &'a Target), ConnectError> {
    let deadline = tokio::time::Instant::now() + pool.config.retry_budget;
    let mut last = None;
    for target in candidates {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            break;
        }
        let attempt = connect_target(pool, &target.config, login, params);
        let result = match tokio::time::timeout(remaining, attempt).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout {
                addr: target.config.addr.clone(),
                phase: "retry budget",
            }),
        };
        match result {
            Ok(conn) => return Ok((conn, target)),
            Err(e) if e.could_retry() => {
                on_retry(target, &e);
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::NoTarget {
        pool: pool.config.name.clone(),
    }))
}

/// Health probe: TCP connect, then (with a probe credential) login and `SELECT 1`.
pub async fn probe(
    pool: &Pool,
    target: &TargetConfig,
    credential: Option<&ProbeCredential>,
) -> Result<(), ConnectError> {
    let addr = target.addr.clone();
    let Some(cred) = credential else {
        return match TcpStream::connect((target.host.as_str(), target.port)).await {
            Ok(_) => Ok(()),
            Err(source) => Err(ConnectError::Connect { addr, source }),
        };
    };
    let credentials = Login {
        user: &cred.user,
        roles: &[],
        roles_complete: false,
        token: None,
        probe_password: Some(&cred.password),
    };
    let params = vec![
        ("database".to_owned(), cred.database.clone()),
        ("application_name".to_owned(), "idgate-probe".to_owned()),
    ];
    let mut conn = connect_target(pool, target, &credentials, &params).await?;
    let io = |e: std::io::Error| ConnectError::Protocol {
        addr: addr.clone(),
        message: format!("probe: {e}").into(),
    };
    let mut out = BytesMut::new();
    frontend::query("SELECT 1", &mut out).map_err(io)?;
    conn.stream.write_all(&out).await.map_err(io)?;
    loop {
        let frame = read_frame(&mut conn.stream, MAX_LOGIN_MESSAGE)
            .await
            .map_err(|e| ConnectError::Protocol {
                addr: addr.clone(),
                message: format!("probe: {e}").into(),
            })?;
        match frame.tag {
            b'E' => {
                let fields = parse_error_fields(&frame.body);
                return Err(ConnectError::Refused {
                    addr,
                    fields,
                    raw: Vec::new(),
                });
            }
            b'Z' => break,
            _ => {}
        }
    }
    let mut out = BytesMut::new();
    frontend::terminate(&mut out);
    let _ = conn.stream.write_all(&out).await;
    let _ = conn.stream.shutdown().await;
    Ok(())
}

async fn connect_target(
    pool: &Pool,
    target: &TargetConfig,
    user: &Login<'_>,
    params: &[(String, String)],
) -> Result<BackendConnection, ConnectError> {
    let addr = target.addr.clone();
    let cfg = &pool.config;
    let provisioned = match pool
        .provisioner
        .as_ref()
        .filter(|_| user.probe_password.is_none())
    {
        Some(p) => p
            .ensure(pool, target, user.user, user.roles, user.roles_complete)
            .await
            .map_err(|source| ConnectError::Provision {
                addr: addr.clone(),
                source,
            })?,
        None => provision::RoleChanges::default(),
    };
    let client_tls =
        match pool
            .client_certs
            .as_ref()
            .filter(|_| user.probe_password.is_none())
        {
            Some(issuer) => Some(issuer.for_user(user.user).await.map_err(|source| {
                ConnectError::ClientCert {
                    addr: addr.clone(),
                    source,
                }
            })?),
            None => None,
        };
    let tcp = match tokio::time::timeout(
        cfg.connect_timeout,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(ConnectError::Connect { addr, source }),
        Err(_) => {
            return Err(ConnectError::Timeout {
                addr,
                phase: "connect",
            })
        }
    };
    let _ = tcp.set_nodelay(true);
    let login = async {
        let tls = client_tls.as_ref().map(|c| &c.tls);
        let stream = negotiate_tls(pool, target, tcp, tls).await?;
        let mut conn = login(stream, cfg, target, user, params).await?;
        conn.provisioned = provisioned;
        Ok(conn)
    };
    match tokio::time::timeout(cfg.login_timeout, login).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            addr,
            phase: "login",
        }),
    }
}

async fn negotiate_tls(
    pool: &Pool,
    target: &TargetConfig,
    mut tcp: TcpStream,
    client_tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<BackendStream, ConnectError> {
    let Some(config) = client_tls.or(pool.tls.as_ref()) else {
        return Ok(Either::Left(tcp));
    };
    let addr = target.addr.clone();
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    let io = |source| ConnectError::Protocol {
        addr: target.addr.clone(),
        message: format!("{source}").into(),
    };
    tcp.write_all(&buf).await.map_err(io)?;
    let answer = tcp.read_u8().await.map_err(io)?;
    if answer != b'S' {
        return Err(ConnectError::TlsRefused { addr });
    }
    let name = tls::server_name(&target.host).ok_or_else(|| ConnectError::Protocol {
        addr: addr.clone(),
        message: "target host is not a valid TLS name".into(),
    })?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|source| ConnectError::Tls { addr, source })?;
    Ok(Either::Right(Box::new(stream)))
}

async fn login(
    mut stream: BackendStream,
    cfg: &PoolConfig,
    target: &TargetConfig,
    login: &Login<'_>,
    params: &[(String, String)],
) -> Result<BackendConnection, ConnectError> {
    let addr = target.addr.clone();
    let user = login.user;
    let proto = |message: String| ConnectError::Protocol {
        addr: target.addr.clone(),
        message: message.into(),
    };
    let redshift_idp = login.probe_password.is_none()
        && matches!(
            (&cfg.backend_auth, cfg.kind),
            (BackendAuth::Token, PoolKind::Redshift)
        );
    let (login_user, password): (&str, Option<&Secret<String>>) =
        match (login.probe_password, &cfg.backend_auth) {
            (Some(pw), _) => (user, Some(pw)),
            (None, BackendAuth::Trust | BackendAuth::ClientCert { .. }) => (user, None),
            (None, BackendAuth::Token) => match login.token {
                Some(token) => (user, Some(token)),
                None => return Err(ConnectError::NoToken { addr }),
            },
            (
                None,
                BackendAuth::Password {
                    user: Some(fixed),
                    password,
                },
            ) => (fixed.as_str(), Some(password)),
            (
                None,
                BackendAuth::Password {
                    user: None,
                    password,
                },
            ) => (user, Some(password)),
        };
    let mode = if login.probe_password.is_some() {
        "probe"
    } else {
        cfg.backend_auth.mode()
    };
    let mut buf = BytesMut::new();
    if redshift_idp {
        frontend::startup_message(redshift::startup_pairs(params), &mut buf)
    } else {
        let startup = std::iter::once(("user", login_user))
            .chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(startup, &mut buf)
    }
    .map_err(|e| proto(e.to_string()))?;
    stream
        .write_all(&buf)
        .await
        .map_err(|e| proto(e.to_string()))?;

    let mut scram: Option<sasl::ScramSha256> = None;
    let mut server_params = Vec::new();
    let mut key = None;
    loop {
        let frame = match read_frame(&mut stream, MAX_LOGIN_MESSAGE).await {
            Ok(f) => f,
            Err(FrameError::Io(e)) => {
                return Err(proto(format!("connection closed during login: {e}")))
            }
            Err(e) => return Err(proto(e.to_string())),
        };
        match frame.tag {
            b'R' => {
                let (code, rest) = frame
                    .body
                    .split_at_checked(4)
                    .ok_or_else(|| proto("short authentication request".into()))?;
                let code = i32::from_be_bytes([code[0], code[1], code[2], code[3]]);
                let mut out = BytesMut::new();
                match (code, password) {
                    (0, _) => continue,
                    (14, Some(token)) if redshift_idp => {
                        redshift::idp_token_message(token, &mut out)
                    }
                    (3, Some(pw)) => frontend::password_message(pw.expose().as_bytes(), &mut out)
                        .map_err(|e| proto(e.to_string()))?,
                    (5, Some(pw)) => {
                        let salt: [u8; 4] =
                            rest.try_into().map_err(|_| proto("bad MD5 salt".into()))?;
                        let hash = md5_hash(login_user.as_bytes(), pw.expose().as_bytes(), salt);
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(|e| proto(e.to_string()))?;
                    }
                    (10, Some(pw)) => {
                        let offers_scram = rest.split(|b| *b == 0).any(|m| m == b"SCRAM-SHA-256");
                        if !offers_scram {
                            return Err(ConnectError::UnsupportedAuth { addr, code, mode });
                        }
                        // 'n': idgate does not use channel binding. Claiming support ('y') while
                        // the server offers -PLUS would be refused as a downgrade.
                        let s = sasl::ScramSha256::new(
                            pw.expose().as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)
                            .map_err(|e| proto(e.to_string()))?;
                        scram = Some(s);
                    }
                    (11, Some(_)) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| proto("SASL continue without SASL start".into()))?;
                        s.update(rest).map_err(|e| proto(format!("SCRAM: {e}")))?;
                        frontend::sasl_response(s.message(), &mut out)
                            .map_err(|e| proto(e.to_string()))?;
                    }
                    (12, Some(_)) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| proto("SASL final without SASL start".into()))?;
                        s.finish(rest)
                            .map_err(|e| proto(format!("SCRAM server proof invalid: {e}")))?;
                        continue;
                    }
                    (code, _) => return Err(ConnectError::UnsupportedAuth { addr, code, mode }),
                }
                stream
                    .write_all(&out)
                    .await
                    .map_err(|e| proto(e.to_string()))?;
            }
            b'S' => {
                let mut parts = frame.body.split(|b| *b == 0);
                let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                let value = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                server_params.push((name, value));
            }
            b'K' => {
                let b = &frame.body;
                if b.len() != 8 {
                    return Err(proto("bad BackendKeyData".into()));
                }
                key = Some(CancelKey {
                    process_id: i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    secret_key: i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                });
            }
            b'E' => {
                let fields = parse_error_fields(&frame.body);
                let mut raw = Vec::with_capacity(frame.body.len() + 5);
                crate::protocol::frame::put_frame(&mut raw, b'E', &frame.body);
                return Err(ConnectError::Refused { addr, fields, raw });
            }
            b'N' | b'v' => {}
            b'Z' => {
                return Ok(BackendConnection {
                    stream,
                    params: server_params,
                    key,
                    target: target.clone(),
                    login_user: login_user.to_owned(),
                    provisioned: provision::RoleChanges::default(),
                })
            }
            other => {
                return Err(proto(format!(
                    "unexpected message {:?} during login",
                    other as char
                )))
            }
        }
    }
}

/// Send a CancelRequest for `key` to `target` (plain TCP, as PostgreSQL accepts it).
pub async fn send_cancel(
    target: &TargetConfig,
    key: CancelKey,
    timeout: Duration,
) -> std::io::Result<()> {
    let work = async {
        let mut tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        let mut buf = BytesMut::new();
        frontend::cancel_request(key.process_id, key.secret_key, &mut buf);
        tcp.write_all(&buf).await?;
        // PostgreSQL closes the connection after reading the request; wait for that.
        let mut sink = [0u8; 1];
        let _ = tcp.read(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "cancel timed out",
            ))
        })
}

/// `server_version` in its plain numeric form: `"15.19 (Debian 15.19-0+deb12u1)"` → `"15.19"`.
/// The Python Redshift driver parses it with `packaging.version` and crashes on the long form.
pub fn plain_server_version(value: &str) -> &str {
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let numeric = value[..end].trim_end_matches('.');
    if numeric.is_empty() {
        value
    } else {
        numeric
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_version_is_made_numeric() {
        assert_eq!(
            plain_server_version("15.19 (Debian 15.19-0+deb12u1)"),
            "15.19"
        );
        assert_eq!(plain_server_version("16.4"), "16.4");
        assert_eq!(plain_server_version("17devel"), "17");
        assert_eq!(plain_server_version("weird"), "weird");
    }
}
