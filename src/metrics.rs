//! Prometheus metrics (`/metrics` on the admin listener), through `prometheus-client`.
//!
//! Counters and histograms are updated where things happen; gauges that mirror state (active
//! sessions, healthy targets, JWKS key age) are refreshed from the current snapshot at scrape time,
//! so nothing has to be kept in step by hand.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::gateway::Snapshot;

/// `{pool, target}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// Pool name.
    pub pool: String,
    /// Target address.
    pub target: String,
}

/// `{pool}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Pool name.
    pub pool: String,
}

/// `{outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `relayed`, `auth_failed`, `backend_failed`, `refused`, `cancel`, `disconnected`.
    pub outcome: String,
}

/// `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Audit reason code.
    pub reason: String,
}

/// `{direction}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `in` (from clients) or `out` (to clients).
    pub direction: String,
}

/// `{rule, pool}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Routing rule.
    pub rule: String,
    /// Pool chosen.
    pub pool: String,
}

/// `{state}` / `{kind}` for audit counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    /// `recorded`, `spooled`, `shipped`, `dropped` (events) or `spool`, `ship`, `webhook` (errors).
    pub what: String,
}

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric idgate exports.
pub struct Metrics {
    registry: Registry,
    /// Sessions that ended, by outcome.
    pub sessions: Family<OutcomeLabels, Counter>,
    /// Relay bytes.
    pub bytes: Family<DirectionLabels, Counter>,
    /// Accept → token read.
    pub handshake_seconds: Histogram,
    /// Backend connect + login.
    pub backend_login_seconds: Histogram,
    /// Authentication refusals by reason.
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// Routing decisions.
    pub routes: Family<RouteLabels, Counter>,
    /// Configuration reloads by outcome (`ok`, `invalid`).
    pub reloads: Family<OutcomeLabels, Counter>,
    active: Family<TargetLabels, Gauge>,
    target_up: Family<TargetLabels, Gauge>,
    healthy: Family<PoolLabels, Gauge>,
    jwks_fetches: Counter,
    jwks_failures: Counter,
    jwks_key_age: Gauge,
    token_cache_hits: Counter,
    audit_events: Family<AuditLabels, Counter>,
    audit_errors: Family<AuditLabels, Counter>,
    audit_alerts: Counter,
    audit_refused: Counter,
    audit_healthy: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("idgate");
        let m = Metrics {
            sessions: Family::default(),
            bytes: Family::default(),
            handshake_seconds: latency(),
            backend_login_seconds: latency(),
            auth_failures: Family::default(),
            routes: Family::default(),
            reloads: Family::default(),
            active: Family::default(),
            target_up: Family::default(),
            healthy: Family::default(),
            jwks_fetches: Counter::default(),
            jwks_failures: Counter::default(),
            jwks_key_age: Gauge::default(),
            token_cache_hits: Counter::default(),
            audit_events: Family::default(),
            audit_errors: Family::default(),
            audit_alerts: Counter::default(),
            audit_refused: Counter::default(),
            audit_healthy: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sessions",
            "Client sessions that ended, by outcome",
            m.sessions.clone(),
        );
        registry.register(
            "relay_bytes",
            "Bytes relayed, by direction",
            m.bytes.clone(),
        );
        registry.register(
            "handshake_seconds",
            "Accept to token read",
            m.handshake_seconds.clone(),
        );
        registry.register(
            "backend_login_seconds",
            "Backend connect and login",
            m.backend_login_seconds.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused logins by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "routing_decisions",
            "Pool choices by rule",
            m.routes.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome",
            m.reloads.clone(),
        );
        registry.register(
            "sessions_active",
            "Sessions being relayed, per target",
            m.active.clone(),
        );
        registry.register(
            "target_up",
            "1 when a target is healthy and not draining",
            m.target_up.clone(),
        );
        registry.register(
            "pool_healthy_targets",
            "Healthy, non-draining targets per pool",
            m.healthy.clone(),
        );
        registry.register(
            "jwks_fetches",
            "Discovery and JWKS documents requested",
            m.jwks_fetches.clone(),
        );
        registry.register(
            "jwks_fetch_failures",
            "Discovery and JWKS requests that failed",
            m.jwks_failures.clone(),
        );
        registry.register(
            "jwks_key_age_seconds",
            "Seconds since the oldest key set was last fetched (since start when never fetched)",
            m.jwks_key_age.clone(),
        );
        registry.register(
            "token_cache_hits",
            "Logins answered from the validated-token cache",
            m.token_cache_hits.clone(),
        );
        registry.register(
            "audit_events",
            "Audit events by state (recorded, spooled, shipped, dropped)",
            m.audit_events.clone(),
        );
        registry.register(
            "audit_errors",
            "Audit errors by kind (spool, ship, webhook)",
            m.audit_errors.clone(),
        );
        registry.register(
            "audit_alerts_fired",
            "Alert rules that fired",
            m.audit_alerts.clone(),
        );
        registry.register(
            "audit_sessions_refused",
            "Sessions refused because the audit spool could not be written (fail_closed)",
            m.audit_refused.clone(),
        );
        registry.register(
            "audit_healthy",
            "1 while the audit spool can be written",
            m.audit_healthy.clone(),
        );
        // Known label values start at zero, so dashboards show them before the first event.
        for outcome in ["ok", "invalid"] {
            m.reloads
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.into(),
                })
                .inc_by(0);
        }
        Metrics { registry, ..m }
    }

    /// Render the text exposition, refreshing state gauges from `snapshot` first.
    pub async fn render(&self, snapshot: &Snapshot, audit: &crate::audit::AuditStats) -> String {
        for (what, total) in [
            ("recorded", audit.recorded),
            ("spooled", audit.spooled),
            ("shipped", audit.shipped),
            ("dropped", audit.dropped),
        ] {
            catch_up(
                &self
                    .audit_events
                    .get_or_create(&AuditLabels { what: what.into() }),
                total,
            );
        }
        for (what, total) in [
            ("spool", audit.spool_errors),
            ("ship", audit.ship_errors),
            ("webhook", audit.webhook_failures),
        ] {
            catch_up(
                &self
                    .audit_errors
                    .get_or_create(&AuditLabels { what: what.into() }),
                total,
            );
        }
        catch_up(&self.audit_alerts, audit.alerts_fired);
        catch_up(&self.audit_refused, audit.sessions_refused);
        self.audit_healthy.set(i64::from(audit.healthy));
        self.active.clear();
        self.target_up.clear();
        self.healthy.clear();
        for pool in &snapshot.pools {
            let name = pool.config.name.clone();
            self.healthy
                .get_or_create(&PoolLabels { pool: name.clone() })
                .set(pool.healthy_targets() as i64);
            for t in &pool.targets {
                let labels = TargetLabels {
                    pool: name.clone(),
                    target: t.config.addr.clone(),
                };
                self.active
                    .get_or_create(&labels)
                    .set(t.state.active() as i64);
                let up =
                    t.state.health() == crate::routing::pool::Health::Up && !t.state.draining();
                self.target_up.get_or_create(&labels).set(i64::from(up));
            }
        }
        let stats = snapshot.auth.stats();
        catch_up(
            &self.jwks_fetches,
            stats.jwks_fetches + stats.discovery_fetches,
        );
        catch_up(
            &self.jwks_failures,
            stats.jwks_fetch_failures + stats.discovery_fetch_failures,
        );
        catch_up(&self.token_cache_hits, stats.token_cache_hits);
        let age = snapshot.auth.oldest_key_fetch_age().await;
        self.jwks_key_age.set(age.as_secs() as i64);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Counters mirrored from the validator's own totals.
fn catch_up(counter: &Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}
