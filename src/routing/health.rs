//! Active health checks: every `interval`, each target of the current configuration snapshot is
//! probed (TCP connect, then a PostgreSQL login and `SELECT 1` when a probe credential is
//! configured) within `timeout`. `rise` consecutive successes bring a target up, `fall`
//! consecutive failures (probes or live connects) take it down. Changes are logged and audited.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::pool::{Health, Target};
use crate::{audit::EventKind, backend, gateway::Gateway};

/// Run the checker until `cancel` fires.
pub async fn run(gw: Arc<Gateway>, cancel: CancellationToken) {
    loop {
        let snapshot = gw.snapshot();
        let health = snapshot.config.health.clone();
        let mut probes = Vec::new();
        for pool in &snapshot.pools {
            for target in &pool.targets {
                let pool = pool.clone();
                let target = target.clone();
                let gw = gw.clone();
                let credential = health.probe.clone();
                probes.push(async move {
                    let result = tokio::time::timeout(
                        health.timeout,
                        backend::probe(&pool, &target.config, credential.as_ref()),
                    )
                    .await;
                    let outcome = match result {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("probe timed out after {:?}", health.timeout)),
                    };
                    match outcome {
                        Ok(()) => {
                            if let Some(h) = target.state.probe_ok(health.rise) {
                                report(&gw, &pool.config.name, &target, h, "probe succeeded");
                            }
                        }
                        Err(why) => {
                            if let Some(h) = target.state.failure(health.fall) {
                                report(&gw, &pool.config.name, &target, h, &why);
                            }
                        }
                    }
                });
            }
        }
        futures_util::future::join_all(probes).await;
        tokio::select! {
            _ = tokio::time::sleep(health.interval) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Log and audit a health change (also used by passive ejection on live connect failures).
pub fn report(gw: &Gateway, pool: &str, target: &Target, health: Health, why: &str) {
    match health {
        Health::Down => {
            tracing::warn!(pool, target = %target.config.addr, reason = why, "target is down")
        }
        Health::Up | Health::Unknown => {
            tracing::info!(pool, target = %target.config.addr, "target is up")
        }
    }
    let mut facts = crate::audit::SessionFacts {
        pool: Some(pool.to_owned()),
        target: Some(target.config.addr.clone()),
        ..Default::default()
    };
    facts.health = Some(health);
    let mut e = crate::audit::system_event(EventKind::TargetHealthChanged, &facts);
    e.detail = Some(why.to_owned());
    gw.audit.record(e);
}
