//! Pools at run time: targets with their health, drain flag and session counts, and target
//! selection (round-robin, least sessions, smooth weighted round-robin).
//!
//! Target state lives in an `Arc<TargetState>` keyed by (pool, address) and is carried over
//! configuration reloads, so a reload neither forgets that a target is down nor resets counts.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering},
        Arc,
    },
};

use crate::{
    config::{AllUnhealthy, BackendAuth, BackendTls, Balance, PoolConfig, TargetConfig},
    net::tls,
};

/// Health of a target as the checker and the live connects see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not probed yet; eligible for sessions.
    Unknown,
    /// Healthy.
    Up,
    /// Ejected until `rise` consecutive successful probes.
    Down,
}

/// Shared, lock-free state of one target.
#[derive(Debug, Default)]
pub struct TargetState {
    health: AtomicU8,
    draining: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    active: AtomicUsize,
    sessions_total: AtomicU64,
    /// Smooth weighted round-robin's current weight.
    current_weight: AtomicI64,
}

impl TargetState {
    /// Current health.
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Acquire) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    fn set_health(&self, h: Health) -> Health {
        let v = match h {
            Health::Unknown => 0,
            Health::Up => 1,
            Health::Down => 2,
        };
        match self.health.swap(v, Ordering::AcqRel) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// Whether the target takes no new sessions.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Mark or unmark draining.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// Sessions currently relaying through this target.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Sessions ever routed here.
    pub fn sessions_total(&self) -> u64 {
        self.sessions_total.load(Ordering::Relaxed)
    }

    /// Record a successful probe; returns the new health if it changed.
    pub fn probe_ok(&self, rise: u32) -> Option<Health> {
        self.fail_streak.store(0, Ordering::Release);
        let streak = self.ok_streak.fetch_add(1, Ordering::AcqRel) + 1;
        let now = self.health();
        match now {
            Health::Up => None,
            // The first probe of a new target only establishes its state: not a change to report.
            Health::Unknown => {
                self.set_health(Health::Up);
                None
            }
            Health::Down if streak >= rise && self.set_health(Health::Up) == Health::Down => {
                Some(Health::Up)
            }
            Health::Down => None,
        }
    }

    /// Record a failed probe or live connect; returns the new health if it changed.
    pub fn failure(&self, fall: u32) -> Option<Health> {
        self.ok_streak.store(0, Ordering::Release);
        let streak = self.fail_streak.fetch_add(1, Ordering::AcqRel) + 1;
        if streak >= fall
            && self.health() != Health::Down
            && self.set_health(Health::Down) != Health::Down
        {
            return Some(Health::Down);
        }
        None
    }

    /// A live connect succeeded: clears the failure streak (health changes only via probes).
    pub fn live_ok(&self) {
        self.fail_streak.store(0, Ordering::Release);
    }
}

/// A target and its state.
#[derive(Debug, Clone)]
pub struct Target {
    /// Configuration.
    pub config: TargetConfig,
    /// Shared state.
    pub state: Arc<TargetState>,
}

/// Counts a session on a target while alive.
#[derive(Debug)]
pub struct ActiveSession {
    state: Arc<TargetState>,
}

impl ActiveSession {
    /// Count a session on `target`.
    pub fn new(target: &Target) -> Self {
        target.state.active.fetch_add(1, Ordering::AcqRel);
        target.state.sessions_total.fetch_add(1, Ordering::Relaxed);
        Self {
            state: target.state.clone(),
        }
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pool at run time.
#[derive(Debug)]
pub struct Pool {
    /// Configuration.
    pub config: PoolConfig,
    /// Targets with state.
    pub targets: Vec<Target>,
    /// Backend TLS client configuration.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Client certificates (`backend_auth = "client_cert"`).
    pub client_certs: Option<crate::backend::client_cert::ClientCertIssuer>,
    /// JIT provisioning (`provisioning = "jit"`).
    pub provisioner: Option<crate::backend::provision::Provisioner>,
    cursor: AtomicUsize,
}

/// State carried across reloads: (pool, target address) → state.
pub type StateMap = HashMap<(String, String), Arc<TargetState>>;

impl Pool {
    /// Build a pool, reusing target state from `previous` where the (pool, address) matches.
    pub fn new(config: PoolConfig, previous: &StateMap) -> Result<Self, tls::TlsSetupError> {
        let tls = match &config.backend_tls {
            BackendTls::Disable => None,
            BackendTls::Require => Some(tls::backend_client_config(false, None)?),
            BackendTls::VerifyFull { ca_pem } => {
                Some(tls::backend_client_config(true, ca_pem.as_deref())?)
            }
        };
        let targets = config
            .targets
            .iter()
            .map(|t| Target {
                config: t.clone(),
                state: previous
                    .get(&(config.name.clone(), t.addr.clone()))
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        let client_certs = match &config.backend_auth {
            BackendAuth::ClientCert { ca, lifetime } => {
                Some(crate::backend::client_cert::ClientCertIssuer::new(
                    ca.clone(),
                    *lifetime,
                    &config.backend_tls,
                ))
            }
            BackendAuth::Trust | BackendAuth::Password { .. } | BackendAuth::Token => None,
        };
        let provisioner = config
            .provisioning
            .clone()
            .map(crate::backend::provision::Provisioner::new);
        Ok(Self {
            config,
            targets,
            tls,
            client_certs,
            provisioner,
            cursor: AtomicUsize::new(0),
        })
    }

    /// Targets in the order to try them for the next session, skipping draining and unhealthy
    /// ones. When every non-draining target is down, `fail_open` returns them anyway with
    /// `forced = true`; `fail_closed` returns none.
    pub fn candidates(&self) -> (Vec<&Target>, bool) {
        let eligible: Vec<&Target> = self
            .targets
            .iter()
            .filter(|t| !t.state.draining() && t.state.health() != Health::Down)
            .collect();
        if !eligible.is_empty() {
            return (self.order(eligible), false);
        }
        match self.config.when_all_unhealthy {
            AllUnhealthy::FailClosed => (Vec::new(), false),
            AllUnhealthy::FailOpen => {
                let all: Vec<&Target> = self
                    .targets
                    .iter()
                    .filter(|t| !t.state.draining())
                    .collect();
                let forced = !all.is_empty();
                (self.order(all), forced)
            }
        }
    }

    fn order<'a>(&self, mut list: Vec<&'a Target>) -> Vec<&'a Target> {
        if list.len() <= 1 {
            return list;
        }
        match self.config.balance {
            Balance::RoundRobin => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed) % list.len();
                list.rotate_left(start);
                list
            }
            Balance::LeastSessions => {
                // Ties broken round-robin so equal targets share the load.
                let start = self.cursor.fetch_add(1, Ordering::Relaxed) % list.len();
                list.rotate_left(start);
                list.sort_by_key(|t| t.state.active());
                list
            }
            Balance::Weighted => {
                // Smooth weighted round-robin (nginx): pick the highest current weight, then
                // lower it by the total. Races between sessions only perturb the order slightly.
                let total: i64 = list.iter().map(|t| i64::from(t.config.weight)).sum();
                for t in &list {
                    t.state
                        .current_weight
                        .fetch_add(i64::from(t.config.weight), Ordering::AcqRel);
                }
                let best = list
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, t)| t.state.current_weight.load(Ordering::Acquire))
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                list[best]
                    .state
                    .current_weight
                    .fetch_sub(total, Ordering::AcqRel);
                let first = list.remove(best);
                list.insert(0, first);
                list
            }
        }
    }

    /// Number of targets currently eligible (not down, not draining).
    pub fn healthy_targets(&self) -> usize {
        self.targets
            .iter()
            .filter(|t| t.state.health() == Health::Up && !t.state.draining())
            .count()
    }

    /// Find a target by address.
    pub fn target(&self, addr: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.config.addr == addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendAuth, PoolKind};
    use std::time::Duration;

    fn pool(balance: Balance, weights: &[u32], policy: AllUnhealthy) -> Pool {
        let targets = weights
            .iter()
            .enumerate()
            .map(|(i, w)| TargetConfig {
                addr: format!("h{i}:1"),
                host: format!("h{i}"),
                port: 1,
                weight: *w,
            })
            .collect();
        let config = PoolConfig {
            name: "p".into(),
            kind: PoolKind::Postgres,
            backend_auth: BackendAuth::Trust,
            backend_tls: BackendTls::Disable,
            connect_timeout: Duration::from_secs(1),
            login_timeout: Duration::from_secs(1),
            balance,
            when_all_unhealthy: policy,
            allowed_groups: vec![],
            allowed_app_roles: vec![],
            retry_budget: Duration::from_secs(1),
            provisioning: None,
            targets,
        };
        Pool::new(config, &StateMap::new()).unwrap()
    }

    fn first(p: &Pool) -> String {
        p.candidates().0[0].config.addr.clone()
    }

    #[test]
    fn round_robin_rotates_and_skips_down_and_draining() {
        let p = pool(Balance::RoundRobin, &[1, 1, 1], AllUnhealthy::FailClosed);
        let firsts: Vec<String> = (0..3).map(|_| first(&p)).collect();
        assert_eq!(firsts, ["h0:1", "h1:1", "h2:1"]);
        p.targets[1].state.failure(1);
        p.targets[2].state.set_draining(true);
        for _ in 0..4 {
            assert_eq!(p.candidates().0.len(), 1);
            assert_eq!(first(&p), "h0:1");
        }
    }

    #[test]
    fn weighted_follows_weights() {
        let p = pool(Balance::Weighted, &[3, 1], AllUnhealthy::FailClosed);
        let picks: Vec<String> = (0..8).map(|_| first(&p)).collect();
        assert_eq!(
            picks.iter().filter(|a| *a == "h0:1").count(),
            6,
            "{picks:?}"
        );
    }

    #[test]
    fn least_sessions_prefers_the_idle_target() {
        let p = pool(Balance::LeastSessions, &[1, 1], AllUnhealthy::FailClosed);
        let _busy = ActiveSession::new(&p.targets[0]);
        for _ in 0..4 {
            assert_eq!(first(&p), "h1:1");
        }
    }

    #[test]
    fn all_unhealthy_policies() {
        let closed = pool(Balance::RoundRobin, &[1, 1], AllUnhealthy::FailClosed);
        let open = pool(Balance::RoundRobin, &[1, 1], AllUnhealthy::FailOpen);
        for p in [&closed, &open] {
            for t in &p.targets {
                t.state.failure(1);
            }
        }
        assert!(closed.candidates().0.is_empty());
        let (c, forced) = open.candidates();
        assert_eq!((c.len(), forced), (2, true));
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let s = TargetState::default();
        assert_eq!(
            s.probe_ok(2),
            None,
            "the first success brings an unknown target up silently"
        );
        assert_eq!(s.health(), Health::Up);
        assert_eq!(s.failure(2), None);
        assert_eq!(s.failure(2), Some(Health::Down));
        assert_eq!(s.probe_ok(2), None);
        assert_eq!(s.probe_ok(2), Some(Health::Up));
    }
}
