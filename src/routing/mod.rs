//! Routing: which pool (workgroup) serves a session, and whether the person may use it.
//!
//! First match wins: SNI host name (`<pool><sni_suffix>`) → explicit startup option
//! (`options=-c idgate.workgroup=NAME`) or `database = "NAME/db"` → claim rules (group or app
//! role → pool) → the default pool. The rule that chose is recorded in the audit trail. Clients
//! that send no SNI (the Python and ODBC Redshift drivers often send none) reach every pool by the
//! other means.

pub mod health;
pub mod pool;

use std::borrow::Cow;

use crate::{
    auth::VerifiedClaims,
    config::Config,
    error::{sqlstate, ErrorKind, Reportable, UserFacing},
};

/// Which rule chose the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteRule {
    /// The SNI host name.
    Sni,
    /// The `idgate.workgroup` startup option.
    StartupOption,
    /// The `NAME/db` database form.
    Database,
    /// A claim rule.
    Claim,
    /// The default pool.
    Default,
}

impl RouteRule {
    /// Label for metrics and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteRule::Sni => "sni",
            RouteRule::StartupOption => "startup_option",
            RouteRule::Database => "database",
            RouteRule::Claim => "claim",
            RouteRule::Default => "default",
        }
    }
}

/// The routing outcome.
#[derive(Debug, Clone)]
pub struct RouteDecision {
    /// Index of the pool in the configuration.
    pub pool: usize,
    /// The rule that chose it.
    pub rule: RouteRule,
    /// Database to use at the backend when the `NAME/db` form stripped the pool name.
    pub database: Option<String>,
}

/// Why a session could not be routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// An explicit selection named a pool that does not exist.
    #[error("no workgroup named {name:?} (selected by {rule:?})")]
    UnknownPool {
        /// Requested name.
        name: String,
        /// The rule that named it.
        rule: RouteRule,
    },
    /// The person is not in the pool's allowed groups or app roles.
    #[error("not allowed to use workgroup {pool} (selected by {rule:?})")]
    NotAllowed {
        /// The pool.
        pool: String,
        /// The rule that chose it.
        rule: RouteRule,
    },
}

impl Reportable for RouteError {
    fn kind(&self) -> ErrorKind {
        match self {
            RouteError::UnknownPool { .. } | RouteError::NotAllowed { .. } => ErrorKind::User,
        }
    }

    fn reason(&self) -> Cow<'static, str> {
        match self {
            RouteError::UnknownPool { .. } => "unknown_pool".into(),
            RouteError::NotAllowed { .. } => "pool_not_allowed".into(),
        }
    }
}

impl UserFacing for RouteError {
    fn sqlstate(&self) -> &'static str {
        match self {
            RouteError::UnknownPool { .. } => "3D000",
            RouteError::NotAllowed { .. } => sqlstate::INVALID_AUTHORIZATION,
        }
    }

    fn client_message(&self) -> Cow<'static, str> {
        match self {
            RouteError::UnknownPool { name, .. } => {
                format!("idgate has no workgroup named \"{name}\"; check the host name, the idgate.workgroup option or the database name").into()
            }
            RouteError::NotAllowed { pool, .. } => format!(
                "you are not allowed to use workgroup \"{pool}\"; ask for membership of one of its groups or app roles"
            )
            .into(),
        }
    }
}

/// What the router looks at.
pub struct RouteInput<'a> {
    /// SNI host name, if the client sent one.
    pub sni: Option<&'a str>,
    /// The workgroup named by the startup option, if any.
    pub option: Option<&'a str>,
    /// The startup `database`.
    pub database: Option<&'a str>,
    /// The verified claims.
    pub claims: &'a VerifiedClaims,
}

/// Choose the pool for a session and check the person may use it.
pub fn route(config: &Config, input: &RouteInput<'_>) -> Result<RouteDecision, RouteError> {
    let by_name = |name: &str, rule: RouteRule| {
        config
            .pools
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| RouteError::UnknownPool {
                name: crate::types::redact_tokens(name).into_owned(),
                rule,
            })
    };
    let mut decision = None;
    if let (Some(sni), Some(suffix)) = (input.sni, &config.routing.sni_suffix) {
        let host = sni.to_ascii_lowercase();
        if let Some(name) = host.strip_suffix(suffix.as_str()).filter(|n| !n.is_empty()) {
            decision = Some(RouteDecision {
                pool: by_name(name, RouteRule::Sni)?,
                rule: RouteRule::Sni,
                database: None,
            });
        }
    }
    if decision.is_none() {
        if let Some(name) = input.option {
            decision = Some(RouteDecision {
                pool: by_name(name, RouteRule::StartupOption)?,
                rule: RouteRule::StartupOption,
                database: None,
            });
        }
    }
    // The database form is stripped even when an earlier rule chose, so the backend never sees it.
    let mut database = None;
    let sep = &config.routing.database_separator;
    if let Some(db) = input.database.filter(|_| !sep.is_empty()) {
        if let Some((name, rest)) = db.split_once(sep.as_str()) {
            database = Some(rest.to_owned());
            if decision.is_none() {
                decision = Some(RouteDecision {
                    pool: by_name(name, RouteRule::Database)?,
                    rule: RouteRule::Database,
                    database: None,
                });
            }
        }
    }
    if decision.is_none() {
        for rule in &config.routing.rules {
            let hit = rule
                .group
                .as_deref()
                .is_some_and(|g| has_group(config, input, g))
                || rule
                    .app_role
                    .as_deref()
                    .is_some_and(|r| has_app_role(config, input, r));
            if hit {
                decision = Some(RouteDecision {
                    pool: rule.pool,
                    rule: RouteRule::Claim,
                    database: None,
                });
                break;
            }
        }
    }
    let mut decision = decision.unwrap_or(RouteDecision {
        pool: config.default_pool,
        rule: RouteRule::Default,
        database: None,
    });
    decision.database = database;
    let pool = &config.pools[decision.pool];
    let open = pool.allowed_groups.is_empty() && pool.allowed_app_roles.is_empty();
    let allowed = open
        || pool
            .allowed_groups
            .iter()
            .any(|g| has_group(config, input, g))
        || pool
            .allowed_app_roles
            .iter()
            .any(|r| has_app_role(config, input, r));
    if !allowed {
        return Err(RouteError::NotAllowed {
            pool: pool.name.clone(),
            rule: decision.rule,
        });
    }
    Ok(decision)
}

/// The token has group `g`: by object id, or by the role name it maps to.
fn has_group(config: &Config, input: &RouteInput<'_>, g: &str) -> bool {
    if input.claims.groups_overage() {
        return false;
    }
    input.claims.groups().iter().any(|id| {
        id.eq_ignore_ascii_case(g)
            || config
                .identity
                .groups
                .get(&id.to_ascii_lowercase())
                .is_some_and(|role| role == g)
    })
}

/// The token has app role `r`: by value, or by the role name it maps to.
fn has_app_role(config: &Config, input: &RouteInput<'_>, r: &str) -> bool {
    input.claims.app_roles().iter().any(|v| {
        v == r
            || config
                .identity
                .app_roles
                .get(v)
                .is_some_and(|role| role == r)
    })
}
