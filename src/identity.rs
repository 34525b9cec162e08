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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    fn config() -> IdentityConfig {
        IdentityConfig {
            user_claims: ["upn", "preferred_username", "unique_name", "email"]
                .map(String::from)
                .to_vec(),
            namespace: "aad".into(),
            lowercase: true,
            client_user: ClientUserPolicy::MustMatch,
            groups_overage: GroupsOverage::Refuse,
            groups: HashMap::from([(
                "0b6a9a3e-aaaa-4c1e-9a7e-0c5d1f7e2a11".into(),
                "analysts".into(),
            )]),
            app_roles: HashMap::from([("Finance.Read".into(), "finance_readers".into())]),
        }
    }

    fn claims(extra: serde_json::Value) -> VerifiedClaims {
        let mut c = json!({"exp": 4_000_000_000u64, "azp": "client", "scp": "jdbc_login"});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        VerifiedClaims::for_test(c).unwrap()
    }

    fn map(
        config: &IdentityConfig,
        extra: serde_json::Value,
        user: Option<&str>,
    ) -> Result<MappedIdentity, IdentityError> {
        map_identity(config, &claims(extra), user)
    }

    #[test]
    fn the_first_present_non_empty_claim_names_the_user() {
        let c = config();
        let m = map(
            &c,
            json!({"upn": "Alice@Contoso.COM", "email": "x@y"}),
            None,
        )
        .unwrap();
        assert_eq!(m.db_user, "aad:alice@contoso.com");
        // An empty upn is absent: preferred_username is next.
        let m = map(
            &c,
            json!({"upn": "", "preferred_username": "Bob@Contoso.com"}),
            None,
        )
        .unwrap();
        assert_eq!(m.db_user, "aad:bob@contoso.com");
        let m = map(&c, json!({"email": "carol@contoso.com"}), None).unwrap();
        assert_eq!(m.db_user, "aad:carol@contoso.com");
        let err = map(&c, json!({"oid": "x"}), None).unwrap_err();
        assert_eq!(err.reason(), "no_user_claim");
    }

    #[test]
    fn claim_order_namespace_and_case_are_configurable() {
        let mut c = config();
        c.user_claims = vec!["email".into(), "upn".into()];
        c.namespace = "corp".into();
        c.lowercase = false;
        let m = map(
            &c,
            json!({"upn": "alice@contoso.com", "email": "Alice.Smith@Contoso.com"}),
            None,
        )
        .unwrap();
        assert_eq!(m.db_user, "corp:Alice.Smith@Contoso.com");
        c.namespace = String::new();
        let m = map(&c, json!({"upn": "alice@contoso.com"}), None).unwrap();
        assert_eq!(m.db_user, "alice@contoso.com");
    }

    #[test]
    fn the_startup_user_must_match_unless_ignored() {
        let mut c = config();
        let upn = json!({"upn": "alice@contoso.com"});
        for sent in ["alice@contoso.com", "AAD:Alice@Contoso.com"] {
            assert!(map(&c, upn.clone(), Some(sent)).is_ok(), "{sent}");
        }
        let err = map(&c, upn.clone(), Some("bob@contoso.com")).unwrap_err();
        assert_eq!(err.reason(), "client_user_mismatch");
        assert_eq!(err.sqlstate(), "28000");
        assert!(err.client_message().contains("aad:alice@contoso.com"));
        c.client_user = ClientUserPolicy::Ignore;
        let m = map(&c, upn, Some("bob@contoso.com")).unwrap();
        assert_eq!(m.db_user, "aad:alice@contoso.com");
    }

    #[test]
    fn groups_and_app_roles_map_to_namespaced_roles() {
        let c = config();
        let m = map(
            &c,
            json!({
                "upn": "alice@contoso.com",
                "groups": ["0B6A9A3E-AAAA-4C1E-9A7E-0C5D1F7E2A11", "ffffffff-0000-4000-8000-000000000000"],
                "roles": ["Finance.Read", "Unmapped.Role"],
            }),
            None,
        )
        .unwrap();
        assert_eq!(m.roles, ["aad:analysts", "aad:finance_readers"]);
        assert!(m.groups_complete);
        // An app-only token (roles, no scp) maps its app roles.
        let app = VerifiedClaims::for_test(json!({
            "exp": 4_000_000_000u64, "azp": "daemon", "roles": ["Finance.Read"],
            "upn": "etl@contoso.com",
        }))
        .unwrap();
        let m = map_identity(&c, &app, None).unwrap();
        assert_eq!(
            (m.db_user.as_str(), m.roles.as_slice()),
            (
                "aad:etl@contoso.com",
                &["aad:finance_readers".to_owned()][..]
            )
        );
    }

    #[test]
    fn groups_overage_is_refused_or_ignored_by_policy() {
        let mut c = config();
        let overage = json!({
            "upn": "alice@contoso.com",
            "_claim_names": {"groups": "src1"},
            "roles": ["Finance.Read"],
        });
        assert_eq!(
            map(&c, overage.clone(), None).unwrap_err().reason(),
            "groups_overage"
        );
        c.groups_overage = GroupsOverage::IgnoreGroups;
        let m = map(&c, overage, None).unwrap();
        assert!(!m.groups_complete);
        assert_eq!(m.roles, ["aad:finance_readers"]);
    }

    #[test]
    fn names_postgres_cannot_hold_are_refused() {
        let c = config();
        let long = format!("{}@contoso.com", "a".repeat(60));
        assert_eq!(
            map(&c, json!({"upn": long}), None).unwrap_err().reason(),
            "unusable_user_name"
        );
        assert_eq!(
            map(&c, json!({"upn": "a\u{0}b"}), None)
                .unwrap_err()
                .reason(),
            "unusable_user_name"
        );
    }
}
