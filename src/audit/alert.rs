//! Brute-force alerting: `[[audit.alerts]]` rules count failed logins per user or per client IP
//! in a sliding window: `auth_failed` events, and `backend_login_failed` events in which a
//! `backend_auth = "token"` pool refused the person's own token (`28P01`, `28000`: e.g. a
//! Redshift workgroup). With other modes those codes are about idgate's credential or the
//! server's `pg_hba.conf`, not the person, and do not count. Reaching the threshold emits one `alert` audit event, bumps a
//! counter and (optionally) POSTs the alert as JSON to a webhook; the same rule and key stay quiet
//! for one window after firing. Webhooks run in their own task with a timeout and a few retries,
//! so a slow receiver never delays a session.

use std::{
    collections::{HashMap, VecDeque},
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::mpsc;

use super::{AuditEvent, EventKind, Health};
use crate::config::{AlertPer, AlertRule};

/// Webhook request limit.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Webhook attempts.
const WEBHOOK_ATTEMPTS: u32 = 3;
/// Keys tracked per rule at most (oldest are forgotten first).
const MAX_KEYS: usize = 100_000;

/// What an alert event says fired.
#[derive(Debug, Clone, Serialize)]
pub struct AlertInfo {
    /// Rule name.
    pub rule: String,
    /// `user` or `client_addr`.
    pub per: &'static str,
    /// The user or client IP.
    pub key: String,
    /// Failed logins counted in the window.
    pub failed_logins: u32,
    /// Window in seconds.
    pub within_secs: u64,
}

#[derive(Default)]
struct KeyState {
    failures: VecDeque<Instant>,
    quiet_until: Option<Instant>,
}

/// Backend refusals that count as failed logins of the person.
const FAILED_LOGIN_BACKEND_REASONS: [&str; 2] = ["backend_refused_28P01", "backend_refused_28000"];

/// Whether `event` is a failed login that alert rules count.
fn is_failed_login(event: &AuditEvent) -> bool {
    match event.kind {
        EventKind::AuthFailed => true,
        EventKind::BackendLoginFailed => {
            event.facts.backend_auth == Some("token")
                && event
                    .reason
                    .as_deref()
                    .is_some_and(|r| FAILED_LOGIN_BACKEND_REASONS.contains(&r))
        }
        _ => false,
    }
}

/// Rule state (behind a mutex; observed only for failed logins).
pub struct Alerter {
    rules: Vec<(AlertRule, Mutex<HashMap<String, KeyState>>)>,
}

impl Alerter {
    /// State for `rules`.
    pub fn new(rules: Vec<AlertRule>) -> Self {
        Self {
            rules: rules
                .into_iter()
                .map(|r| (r, Mutex::new(HashMap::new())))
                .collect(),
        }
    }

    /// Count `event`; returns the alert events (and webhook URLs) that fire now.
    pub fn observe(&self, event: &AuditEvent) -> Vec<(AuditEvent, Option<String>)> {
        if self.rules.is_empty() || !is_failed_login(event) {
            return Vec::new();
        }
        let now = Instant::now();
        let mut fired = Vec::new();
        for (rule, state) in &self.rules {
            let key = match rule.per {
                AlertPer::User => event
                    .facts
                    .db_user
                    .clone()
                    .or_else(|| event.facts.client_user.clone().map(|u| u.to_lowercase())),
                AlertPer::ClientAddr => event.client_addr.as_deref().map(|a| {
                    a.parse::<std::net::SocketAddr>()
                        .map(|s| s.ip().to_string())
                        .unwrap_or_else(|_| a.to_owned())
                }),
            };
            let Some(key) = key else { continue };
            let Ok(mut map) = state.lock() else { continue };
            if map.len() >= MAX_KEYS && !map.contains_key(&key) {
                map.retain(|_, s| {
                    s.failures
                        .back()
                        .is_some_and(|t| now.duration_since(*t) < rule.within)
                });
                if map.len() >= MAX_KEYS {
                    continue;
                }
            }
            let s = map.entry(key.clone()).or_default();
            s.failures.push_back(now);
            while s
                .failures
                .front()
                .is_some_and(|t| now.duration_since(*t) > rule.within)
            {
                s.failures.pop_front();
            }
            let quiet = s.quiet_until.is_some_and(|q| now < q);
            if quiet || (s.failures.len() as u32) < rule.failed_logins {
                continue;
            }
            s.quiet_until = Some(now + rule.within);
            let count = s.failures.len() as u32;
            s.failures.clear();
            let mut alert = super::event(
                EventKind::Alert,
                event.session_id,
                None,
                &super::SessionFacts::default(),
            );
            alert.client_addr = event.client_addr.clone();
            alert.outcome = EventKind::Alert.outcome(true);
            alert.reason = Some("failed_logins".into());
            alert.detail = Some(format!(
                "{count} failed logins for {} {key} within {}",
                per_name(rule.per),
                humantime::format_duration(rule.within)
            ));
            if rule.per == AlertPer::User {
                alert.facts.db_user = Some(key.clone());
            }
            alert.alert = Some(AlertInfo {
                rule: rule.name.clone(),
                per: per_name(rule.per),
                key,
                failed_logins: count,
                within_secs: rule.within.as_secs(),
            });
            fired.push((alert, rule.webhook_url.clone()));
        }
        fired
    }
}

fn per_name(per: AlertPer) -> &'static str {
    match per {
        AlertPer::User => "user",
        AlertPer::ClientAddr => "client_addr",
    }
}

/// POST each queued alert to its webhook; ends when every sender is gone.
pub(crate) async fn run_webhooks(
    mut rx: mpsc::UnboundedReceiver<(String, serde_json::Value)>,
    health: Arc<Health>,
) {
    let client = match reqwest::Client::builder()
        .timeout(WEBHOOK_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the alert webhook client; webhooks are off");
            while rx.recv().await.is_some() {
                health
                    .counters
                    .webhook_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    while let Some((url, body)) = rx.recv().await {
        let mut delivered = false;
        for attempt in 0..WEBHOOK_ATTEMPTS {
            match client.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => {
                    tracing::warn!(status = %r.status(), attempt, "alert webhook refused the alert")
                }
                Err(e) => tracing::warn!(error = %e.without_url(), attempt, "alert webhook failed"),
            }
            if attempt + 1 < WEBHOOK_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
        }
        if !delivered {
            health
                .counters
                .webhook_failures
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{audit::SessionFacts, types::SessionId};

    fn failure(kind: EventKind, reason: &str, user: &str) -> AuditEvent {
        failure_in(kind, reason, user, "token")
    }

    fn failure_in(
        kind: EventKind,
        reason: &str,
        user: &str,
        backend_auth: &'static str,
    ) -> AuditEvent {
        let facts = SessionFacts {
            db_user: Some(user.into()),
            backend_auth: Some(backend_auth),
            ..SessionFacts::default()
        };
        let mut e = crate::audit::event(
            kind,
            SessionId::new(),
            "127.0.0.1:5000".parse().ok(),
            &facts,
        );
        e.reason = Some(reason.into());
        e
    }

    #[test]
    fn token_refusals_and_backend_credential_refusals_count_others_do_not() {
        let alerter = Alerter::new(vec![AlertRule {
            name: "r".into(),
            failed_logins: 3,
            within: Duration::from_secs(60),
            per: AlertPer::User,
            webhook_url: None,
        }]);
        let u = "aad:alice@x";
        // Not failed logins of the person: the backend was down, the database does not exist,
        // or (not a token pool) idgate's own credential or pg_hba.conf was refused.
        for reason in ["backend_connect_failed", "backend_refused_3D000"] {
            assert!(alerter
                .observe(&failure(EventKind::BackendLoginFailed, reason, u))
                .is_empty());
        }
        for mode in ["password", "client_cert", "trust"] {
            for _ in 0..3 {
                let e = failure_in(
                    EventKind::BackendLoginFailed,
                    "backend_refused_28P01",
                    u,
                    mode,
                );
                assert!(alerter.observe(&e).is_empty(), "{mode}");
            }
        }
        assert!(alerter
            .observe(&failure(EventKind::AuthFailed, "expired", u))
            .is_empty());
        assert!(alerter
            .observe(&failure(
                EventKind::BackendLoginFailed,
                "backend_refused_28P01",
                u
            ))
            .is_empty());
        let fired = alerter.observe(&failure(
            EventKind::BackendLoginFailed,
            "backend_refused_28000",
            u,
        ));
        assert_eq!(fired.len(), 1);
        let info = fired[0].0.alert.as_ref().unwrap();
        assert_eq!((info.key.as_str(), info.failed_logins), (u, 3));
        // Quiet for the window.
        assert!(alerter
            .observe(&failure(EventKind::AuthFailed, "expired", u))
            .is_empty());
    }
}
