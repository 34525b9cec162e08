//! `Gateway`: the shared service graph every session uses, and [`run_with`], the accept loop with
//! reload and graceful shutdown.
//!
//! Everything a configuration reload may change (pools and targets, routing rules, issuers, the
//! listener certificate) lives in one immutable [`Snapshot`] behind an `ArcSwap`. A session loads
//! the snapshot once when it starts and keeps it to the end, so a reload never cuts or changes a
//! session in flight. Target health and session counts are carried from snapshot to snapshot.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    audit::{AuditLog, AuditStartError, EventKind, SessionFacts},
    auth::Authenticator,
    cancel::CancelMap,
    config::{Config, ConfigError},
    metrics::{Metrics, OutcomeLabels},
    net::tls,
    routing::pool::{Pool, StateMap},
    session,
};

/// How long cut sessions get to write their 57P01 and close after the grace period.
const HARD_STOP: Duration = Duration::from_secs(5);

/// How many connections past `listener.max_connections` may be in their TLS handshake at once to
/// be told 53300; more than that are closed without a handshake.
pub const OVER_CAP_HANDSHAKES: usize = 32;

/// Why the gateway could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    // The causes are part of each message and deliberately not `source`s: printing the error
    // chain (`{:#}`) would say everything twice.
    /// The client TLS certificate or key is unusable.
    #[error("listener TLS: {0}")]
    Tls(tls::TlsSetupError),
    /// The token validator could not be built.
    #[error("issuers: {0}")]
    Auth(crate::auth::AuthSetupError),
    /// The audit spool or store could not be opened.
    #[error(transparent)]
    Audit(#[from] AuditStartError),
    /// The new configuration is invalid (reload).
    #[error("{0}")]
    Config(ConfigError),
    /// No configuration loader was given (reload).
    #[error("reload is not available: the gateway was started without a configuration file")]
    NoLoader,
}

impl From<tls::TlsSetupError> for RunError {
    fn from(e: tls::TlsSetupError) -> Self {
        RunError::Tls(e)
    }
}

impl From<crate::auth::AuthSetupError> for RunError {
    fn from(e: crate::auth::AuthSetupError) -> Self {
        RunError::Auth(e)
    }
}

impl From<ConfigError> for RunError {
    fn from(e: ConfigError) -> Self {
        RunError::Config(e)
    }
}

/// Re-reads the configuration (the binary's closure reads the file and the environment).
pub type ConfigLoader = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// The reloadable part of the gateway.
pub struct Snapshot {
    /// The configuration.
    pub config: Arc<Config>,
    /// Client-facing TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Token validator.
    pub auth: Authenticator,
    /// Pools in configuration order.
    pub pools: Vec<Arc<Pool>>,
}

impl Snapshot {
    fn build(config: Config, previous: Option<&Snapshot>) -> Result<Snapshot, RunError> {
        let tls = config
            .listener
            .tls
            .as_ref()
            .map(tls::server_config)
            .transpose()?;
        // Keep the validator (and its key and token caches) when the issuers did not change.
        let auth = match previous {
            Some(prev)
                if format!("{:?}", prev.config.issuers) == format!("{:?}", config.issuers) =>
            {
                prev.auth.clone()
            }
            _ => Authenticator::succeeding(config.issuers.clone(), previous.map(|p| &p.auth))?,
        };
        let mut states = StateMap::new();
        if let Some(prev) = previous {
            for pool in &prev.pools {
                for t in &pool.targets {
                    states.insert(
                        (pool.config.name.clone(), t.config.addr.clone()),
                        t.state.clone(),
                    );
                }
            }
        }
        let pools = config
            .pools
            .iter()
            .cloned()
            .map(|p| Pool::new(p, &states).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot {
            config: Arc::new(config),
            tls,
            auth,
            pools,
        })
    }
}

/// Shared state of one running gateway.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// CancelRequest key map.
    pub cancels: CancelMap,
    /// Audit writer.
    pub audit: AuditLog,
    /// Connection cap (fixed at start; a reload reports a change as needing a restart).
    pub connections: Arc<Semaphore>,
    /// Handshakes that run past the connection cap only to answer 53300
    /// ([`OVER_CAP_HANDSHAKES`] at once).
    pub over_cap_handshakes: Arc<Semaphore>,
    /// Metrics.
    pub metrics: Metrics,
    /// Set once shutdown began: `/readyz` answers 503.
    pub draining: AtomicBool,
    loader: Option<ConfigLoader>,
    reload_lock: tokio::sync::Mutex<()>,
    refresh: tokio::sync::Mutex<Option<CancellationToken>>,
}

/// What a reload did.
#[derive(Debug, serde::Serialize)]
pub struct ReloadReport {
    /// Pools now configured.
    pub pools: Vec<String>,
    /// Settings that changed but need a restart to take effect.
    pub needs_restart: Vec<String>,
}

impl Gateway {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Re-read the configuration and swap it in atomically. An invalid file changes nothing.
    pub async fn reload(self: &Arc<Self>) -> Result<ReloadReport, RunError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let loader = self.loader.as_ref().ok_or(RunError::NoLoader)?;
        let result = loader().map_err(RunError::from).and_then(|config| {
            let current = self.snapshot();
            let mut needs_restart = Vec::new();
            if config.listener.addr != current.config.listener.addr {
                needs_restart.push("listener.addr".to_owned());
            }
            if config.listener.max_connections != current.config.listener.max_connections {
                needs_restart.push("listener.max_connections".to_owned());
            }
            if config.admin.addr != current.config.admin.addr {
                needs_restart.push("admin.addr".to_owned());
            }
            if format!("{:?}", config.audit) != format!("{:?}", current.config.audit) {
                needs_restart.push("audit".to_owned());
            }
            let next = Snapshot::build(config, Some(&current))?;
            Ok((next, needs_restart))
        });
        match result {
            Ok((next, needs_restart)) => {
                let report = ReloadReport {
                    pools: next.pools.iter().map(|p| p.config.name.clone()).collect(),
                    needs_restart,
                };
                self.snapshot.store(Arc::new(next));
                self.restart_refresh().await;
                self.metrics
                    .reloads
                    .get_or_create(&OutcomeLabels {
                        outcome: "ok".into(),
                    })
                    .inc();
                tracing::info!(pools = ?report.pools, needs_restart = ?report.needs_restart, "configuration reloaded");
                let mut e =
                    crate::audit::system_event(EventKind::ConfigReloaded, &SessionFacts::default());
                if !report.needs_restart.is_empty() {
                    e.detail = Some(format!(
                        "changed but needs a restart: {}",
                        report.needs_restart.join(", ")
                    ));
                }
                self.audit.record(e);
                Ok(report)
            }
            Err(err) => {
                self.metrics
                    .reloads
                    .get_or_create(&OutcomeLabels {
                        outcome: "invalid".into(),
                    })
                    .inc();
                tracing::error!(error = %err, "configuration reload refused; the running configuration is unchanged");
                let mut e =
                    crate::audit::system_event(EventKind::ConfigReloaded, &SessionFacts::default());
                e.reason = Some("reload_invalid".into());
                e.detail = Some(err.to_string());
                self.audit.record(e);
                Err(err)
            }
        }
    }

    /// (Re)start the JWKS background refresh for the current validator.
    async fn restart_refresh(&self) {
        let mut slot = self.refresh.lock().await;
        if let Some(old) = slot.take() {
            old.cancel();
        }
        let token = CancellationToken::new();
        let auth = self.snapshot().auth.clone();
        let t = token.clone();
        tokio::spawn(async move { auth.run_refresh(t).await });
        let auth = self.snapshot().auth.clone();
        tokio::spawn(async move {
            for e in auth.prefetch().await {
                tracing::warn!(reason = e.reason(), error = %e, "could not prefetch issuer keys; will retry on first login");
            }
        });
        *slot = Some(token);
    }

    /// Whether `/readyz` should answer 200, and if not, why.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Acquire) {
            return Err("shutting down");
        }
        if !self.audit.healthy() {
            return Err("the audit spool cannot be written");
        }
        if !self
            .snapshot()
            .pools
            .iter()
            .any(|p| p.healthy_targets() > 0)
        {
            return Err("no pool has a healthy target yet");
        }
        Ok(())
    }
}

/// The sockets a gateway serves.
pub struct Listeners {
    /// Client connections.
    pub client: TcpListener,
    /// The admin HTTP listener, if configured.
    pub admin: Option<TcpListener>,
}

/// Extra run-time wiring from the binary.
#[derive(Default)]
pub struct RunOptions {
    /// Re-reads the configuration for reloads (SIGHUP, `POST /reload`).
    pub loader: Option<ConfigLoader>,
    /// Each message triggers a reload (the binary sends one per SIGHUP).
    pub reload_requests: Option<tokio::sync::mpsc::Receiver<()>>,
    /// Cancelled on a second signal: skip the rest of the grace period.
    pub fast_shutdown: CancellationToken,
}

/// Serve clients from `listener` until `shutdown` is cancelled (no admin listener, no reload).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_with(
        Listeners {
            client: listener,
            admin: None,
        },
        config,
        RunOptions::default(),
        shutdown,
    )
    .await
}

/// Serve until `shutdown` is cancelled. Then: stop accepting and answer `/readyz` with 503, give
/// sessions `shutdown.grace_period` to finish, send the rest 57P01 and close them, and flush the
/// audit trail before returning.
pub async fn run_with(
    listeners: Listeners,
    config: Config,
    mut options: RunOptions,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let (audit, audit_task) = AuditLog::start(&config.audit).await?;
    let grace = config.shutdown.grace_period;
    let max_connections = config.listener.max_connections;
    let snapshot = Snapshot::build(config, None)?;
    let gw = Arc::new(Gateway {
        snapshot: ArcSwap::from_pointee(snapshot),
        cancels: CancelMap::default(),
        audit,
        connections: Arc::new(Semaphore::new(max_connections)),
        over_cap_handshakes: Arc::new(Semaphore::new(OVER_CAP_HANDSHAKES)),
        metrics: Metrics::new(),
        draining: AtomicBool::new(false),
        loader: options.loader.take(),
        reload_lock: tokio::sync::Mutex::new(()),
        refresh: tokio::sync::Mutex::new(None),
    });
    gw.restart_refresh().await;
    let background = TaskTracker::new();
    let background_token = CancellationToken::new();
    background.spawn(crate::routing::health::run(
        gw.clone(),
        background_token.clone(),
    ));
    if let Some(admin) = listeners.admin {
        background.spawn(crate::admin::serve(
            admin,
            gw.clone(),
            background_token.clone(),
        ));
    }
    if let Some(mut requests) = options.reload_requests.take() {
        let gw = gw.clone();
        let token = background_token.clone();
        background.spawn(async move {
            loop {
                tokio::select! {
                    r = requests.recv() => match r {
                        Some(()) => { let _ = gw.reload().await; }
                        None => return,
                    },
                    _ = token.cancelled() => return,
                }
            }
        });
    }

    let sessions = TaskTracker::new();
    let session_token = CancellationToken::new();
    let listener = listeners.client;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let gw = gw.clone();
                    let token = session_token.clone();
                    let span = tracing::info_span!("session", peer = %peer);
                    sessions.spawn(tracing::Instrument::instrument(session::handle_client(gw, tcp, peer, token), span));
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
    gw.draining.store(true, Ordering::Release);
    sessions.close();
    tracing::info!(sessions = sessions.len(), grace = ?grace, "shutting down: no new connections; waiting for sessions (a second signal skips the wait)");
    tokio::select! {
        _ = sessions.wait() => {}
        _ = tokio::time::sleep(grace) => {}
        _ = options.fast_shutdown.cancelled() => {}
    }
    if !sessions.is_empty() {
        tracing::info!(
            sessions = sessions.len(),
            "grace period over: closing the remaining sessions with 57P01"
        );
        session_token.cancel();
        let _ = tokio::time::timeout(HARD_STOP, sessions.wait()).await;
    }
    background_token.cancel();
    if let Some(t) = gw.refresh.lock().await.take() {
        t.cancel();
    }
    background.close();
    let _ = tokio::time::timeout(HARD_STOP, background.wait()).await;
    drop(gw);
    let _ = audit_task.await;
    Ok(())
}
