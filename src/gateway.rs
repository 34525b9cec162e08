//! `Gateway`: the shared service graph every session uses (configuration snapshot, TLS, token
//! validator, pools, cancel map, audit), and [`run`], the accept loop.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    audit::{AuditLog, AuditStartError},
    auth::Authenticator,
    backend::Pool,
    cancel::CancelMap,
    config::Config,
    net::tls,
    session,
};

/// How long sessions get to finish after shutdown is requested before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The client TLS certificate or key is unusable.
    #[error("listener TLS: {0}")]
    Tls(#[from] tls::TlsSetupError),
    /// The token validator could not be built.
    #[error("issuers: {0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    /// The audit spool or store could not be opened.
    #[error(transparent)]
    Audit(#[from] AuditStartError),
}

/// Shared state of one running gateway.
pub struct Gateway {
    /// The configuration this gateway runs with.
    pub config: Arc<Config>,
    /// Client-facing TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Token validator.
    pub auth: Authenticator,
    /// Pools, in configuration order.
    pub pools: Vec<Pool>,
    /// CancelRequest key map.
    pub cancels: CancelMap,
    /// Audit writer.
    pub audit: AuditLog,
    /// Connection cap.
    pub connections: Arc<Semaphore>,
}

impl Gateway {
    /// The pool every session uses (routing by SNI/option/claims comes later).
    pub fn default_pool(&self) -> &Pool {
        &self.pools[self.config.default_pool]
    }
}

/// Serve clients from `listener` until `shutdown` is cancelled, then stop accepting, give
/// sessions a short grace period, cut the rest, and flush the audit trail before returning.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let tls = config
        .listener
        .tls
        .as_ref()
        .map(tls::server_config)
        .transpose()?;
    let auth = Authenticator::new(config.issuers.clone())?;
    let pools = config
        .pools
        .iter()
        .cloned()
        .map(Pool::new)
        .collect::<Result<Vec<_>, _>>()?;
    let (audit, audit_task) = AuditLog::start(&config.audit).await?;
    let gw = Arc::new(Gateway {
        connections: Arc::new(Semaphore::new(config.listener.max_connections)),
        config: Arc::new(config),
        tls,
        auth,
        pools,
        cancels: CancelMap::default(),
        audit,
    });
    let background = TaskTracker::new();
    {
        let auth = gw.auth.clone();
        let token = shutdown.clone();
        background.spawn(async move { auth.run_refresh(token).await });
        let auth = gw.auth.clone();
        background.spawn(async move {
            for e in auth.prefetch().await {
                tracing::warn!(reason = e.reason(), error = %e, "could not prefetch issuer keys; will retry on first login");
            }
        });
    }
    let sessions = TaskTracker::new();
    let session_token = CancellationToken::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let gw = gw.clone();
                    let token = session_token.clone();
                    sessions.spawn(session::handle_client(gw, tcp, peer, token));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    sessions.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
        .await
        .is_err()
    {
        session_token.cancel();
        sessions.wait().await;
    }
    background.close();
    background.wait().await;
    drop(gw);
    let _ = audit_task.await;
    Ok(())
}
