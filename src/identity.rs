//! Identity mapping: verified token claims → the database user and roles a session runs as.
//!
//! The user name comes from the first present claim of a configured list (default `upn`,
//! `preferred_username`, `unique_name`, `email`), prefixed with the namespace (`aad:`) and
//! lower-cased, as Redshift names its native-IdP users. Groups and app roles become roles through
//! a table in the configuration. The stable key (`tid`, `oid`) goes to the audit trail.

use std::borrow::Cow;

use crate::{
    auth::VerifiedClaims,
    config::{ClientUserPolicy, GroupsOverage, IdentityConfig},
    error::{sqlstate, ErrorKind, Reportable, UserFacing},
};

/// The database identity of an authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedIdentity {
    /// Database user, e.g. `aad:alice@contoso.com`.
    pub db_user: String,
    /// Database roles, e.g. `aad:analysts`, sorted and de-duplicated.
    pub roles: Vec<String>,
    /// False when the token's group list was incomplete (groups overage with `ignore_groups`):
    /// `roles` then says nothing about the groups the person is *not* in.
    pub groups_complete: bool,
}

/// Why a verified token could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// None of the configured user claims is present.
    #[error("no user claim among {0:?}")]
    NoUserClaim(Vec<String>),
    /// The token's groups did not fit in it and the policy refuses such tokens.
    #[error("groups overage")]
    GroupsOverage,
    /// The startup `user` names someone else.
    #[error("startup user {client:?} does not match {mapped:?}")]
    UserMismatch {
        /// What the client sent.
        client: String,
        /// What the token maps to.
        mapped: String,
    },
    /// The mapped name cannot be a PostgreSQL role name (NUL, too long).
    #[error("mapped user name is not usable: {0}")]
    BadName(&'static str),
}

impl Reportable for IdentityError {
    fn kind(&self) -> ErrorKind {
        match self {
            IdentityError::NoUserClaim(_)
            | IdentityError::GroupsOverage
            | IdentityError::UserMismatch { .. }
            | IdentityError::BadName(_) => ErrorKind::User,
        }
    }

    fn reason(&self) -> Cow<'static, str> {
        match self {
            IdentityError::NoUserClaim(_) => "no_user_claim".into(),
            IdentityError::GroupsOverage => "groups_overage".into(),
            IdentityError::UserMismatch { .. } => "client_user_mismatch".into(),
            IdentityError::BadName(_) => "unusable_user_name".into(),
        }
    }
}

impl UserFacing for IdentityError {
    fn sqlstate(&self) -> &'static str {
        match self {
            IdentityError::NoUserClaim(_)
            | IdentityError::GroupsOverage
            | IdentityError::UserMismatch { .. }
            | IdentityError::BadName(_) => sqlstate::INVALID_AUTHORIZATION,
        }
    }

    fn client_message(&self) -> Cow<'static, str> {
        match self {
            IdentityError::NoUserClaim(_) | IdentityError::BadName(_) => {
                "authentication failed: no database user could be derived from the token".into()
            }
            IdentityError::GroupsOverage => {
                "authentication failed: the token does not list your groups (too many groups); ask the operator to use app roles or groups_overage = \"ignore_groups\"".into()
            }
            // The client already knows both names: the token it sent and the user it asked for.
            IdentityError::UserMismatch { client, mapped } => format!(
                "the user name \"{client}\" does not match the token's identity \"{mapped}\"; leave the user empty or set it to that name"
            )
            .into(),
        }
    }
}

/// Map verified claims to a database identity, applying the startup `user` policy.
pub fn map_identity(
    config: &IdentityConfig,
    claims: &VerifiedClaims,
    client_user: Option<&str>,
) -> Result<MappedIdentity, IdentityError> {
    let name = config
        .user_claims
        .iter()
        .find_map(|c| claims.claim_str(c).filter(|v| !v.is_empty()))
        .ok_or_else(|| IdentityError::NoUserClaim(config.user_claims.clone()))?;
    let name = if config.lowercase {
        name.to_lowercase()
    } else {
        name.to_owned()
    };
    let db_user = qualify(&config.namespace, &name);
    if db_user.contains('\0') {
        return Err(IdentityError::BadName("contains NUL"));
    }
    // PostgreSQL truncates identifiers at 63 bytes; a truncated name could collide with another person's.
    if db_user.len() > 63 {
        return Err(IdentityError::BadName("longer than 63 bytes"));
    }
    if let (ClientUserPolicy::MustMatch, Some(sent)) = (config.client_user, client_user) {
        let matches = sent.eq_ignore_ascii_case(&db_user) || sent.eq_ignore_ascii_case(&name);
        if !matches {
            return Err(IdentityError::UserMismatch {
                client: crate::types::redact_tokens(sent).into_owned(),
                mapped: db_user,
            });
        }
    }
    let mut roles = Vec::new();
    let groups_complete = !claims.groups_overage();
    if !groups_complete {
        match config.groups_overage {
            GroupsOverage::Refuse => return Err(IdentityError::GroupsOverage),
            GroupsOverage::IgnoreGroups => {}
        }
    } else {
        for g in claims.groups() {
            if let Some(role) = config.groups.get(&g.to_ascii_lowercase()) {
                roles.push(qualify(&config.namespace, role));
            }
        }
    }
    for r in claims.app_roles() {
        if let Some(role) = config.app_roles.get(r) {
            roles.push(qualify(&config.namespace, role));
        }
    }
    roles.sort();
    roles.dedup();
    Ok(MappedIdentity {
        db_user,
        roles,
        groups_complete,
    })
}

fn qualify(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}:{name}")
    }
}
