//! Just-in-time role provisioning (`provisioning = "jit"`), as Redshift does for its native IdP
//! users: before a login, make sure the login role exists and that its membership of
//! `<namespace>:<role>` roles matches the token's mapped roles.
//!
//! Rules:
//! - Everything happens through an admin connection (`admin_user`, its own password or a minted
//!   client certificate), in **one transaction**, with every identifier quoted
//!   (`escape_identifier`); names come only from the validated identity.
//! - Only roles whose name starts with `<namespace>:` are ever created, granted or revoked.
//!   Memberships of any other role are never read for change, never revoked.
//! - A missing login role is created `LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
//!   NOBYPASSRLS`; a missing namespace role is created the same way but `NOLOGIN` (Redshift
//!   creates them too), so the membership exists as soon as a DBA grants the role privileges.
//! - Membership of a namespace role is never granted (and is revoked if held) when it, or any
//!   role it belongs to (directly or through other roles), can log in (another person, a service
//!   account), is a superuser, has CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS, or is one of
//!   PostgreSQL's predefined `pg_*` roles (`pg_read_server_files`, `pg_execute_server_program`,
//!   …): a DBA-made `aad:x` cannot become a path to privileges outside the namespace. Such roles
//!   are reported as `refused`.
//! - Concurrent first logins of one person: the transaction takes `pg_advisory_xact_lock` on every
//!   name it may create, in sorted order, then re-reads the catalog; a duplicate-role error from a
//!   writer outside idgate (`42710`/`23505`) is retried once. Within one idgate, concurrent
//!   logins with the same (target, user, roles) share one run, and a run that succeeded is not
//!   repeated for [`DONE_TTL`].

use std::{
    collections::BTreeSet,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use postgres_protocol::escape::escape_identifier;
use tokio::net::TcpStream;

use super::Pool;
use crate::{config::ProvisioningConfig, config::TargetConfig};

/// A successful run is not repeated for the same target, user and roles within this time.
pub const DONE_TTL: Duration = Duration::from_secs(300);

/// What one provisioning run changed (audited as `roles_provisioned`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoleChanges {
    /// The login role was created.
    pub created_login_role: Option<String>,
    /// Namespace roles that were created (NOLOGIN).
    pub created_roles: Vec<String>,
    /// Memberships granted.
    pub granted: Vec<String>,
    /// Memberships revoked.
    pub revoked: Vec<String>,
    /// Token roles whose membership was not granted (login role, superuser or CREATEROLE).
    pub refused: Vec<String>,
}

impl RoleChanges {
    /// Whether nothing changed and nothing was refused.
    pub fn is_empty(&self) -> bool {
        self == &RoleChanges::default()
    }
}

impl fmt::Display for RoleChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(r) = &self.created_login_role {
            parts.push(format!("created login role {r:?}"));
        }
        for (label, list) in [
            ("created roles", &self.created_roles),
            ("granted", &self.granted),
            ("revoked", &self.revoked),
            (
                "not granted (a login role, or one that carries privileges)",
                &self.refused,
            ),
        ] {
            if !list.is_empty() {
                parts.push(format!("{label} {list:?}"));
            }
        }
        f.write_str(&parts.join("; "))
    }
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The admin connection could not be opened (TCP, TLS, certificate).
    #[error("admin connection: {0}")]
    Connect(Box<super::ConnectError>),
    /// The admin login or a statement failed.
    #[error("admin session: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The run took longer than connect_timeout + login_timeout.
    #[error("provisioning timed out")]
    Timeout,
}

impl ProvisionError {
    /// Whether another target may succeed.
    pub fn could_retry(&self) -> bool {
        match self {
            ProvisionError::Connect(e) => e.could_retry(),
            ProvisionError::Sql(_) | ProvisionError::Timeout => false,
        }
    }

    /// Audit reason.
    pub fn reason(&self) -> std::borrow::Cow<'static, str> {
        match self {
            ProvisionError::Connect(_) => "provisioning_connect_failed".into(),
            ProvisionError::Sql(e) => match e.code() {
                Some(code) => format!("provisioning_failed_{}", code.code()).into(),
                None => "provisioning_failed".into(),
            },
            ProvisionError::Timeout => "provisioning_timeout".into(),
        }
    }

    fn sqlstate(&self) -> Option<&str> {
        match self {
            ProvisionError::Sql(e) => e.code().map(|c| c.code()),
            ProvisionError::Connect(_) | ProvisionError::Timeout => None,
        }
    }
}

/// (target, user, wanted roles, whether memberships outside them are revoked).
type DoneKey = (String, String, Vec<String>, bool);
type Pending = Arc<Mutex<Option<RoleChanges>>>;

/// Provisioning for one pool.
pub struct Provisioner {
    config: ProvisioningConfig,
    done: moka::future::Cache<DoneKey, Pending>,
    /// The role set last brought in step per (target, user): a login with another set must run
    /// again even while an older run for its own set is still cached.
    latest: moka::sync::Cache<(String, String), (Vec<String>, bool)>,
}

impl fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioner")
            .field("admin_user", &self.config.admin_user)
            .finish_non_exhaustive()
    }
}

impl Provisioner {
    /// A provisioner with `config`.
    pub fn new(config: ProvisioningConfig) -> Self {
        Self {
            config,
            done: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(DONE_TTL)
                .build(),
            latest: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(DONE_TTL)
                .build(),
        }
    }

    /// Bring `user` and its namespace role memberships in step with `roles` on `target`.
    /// Returns what changed (for the audit trail) to exactly one of the concurrent callers.
    pub async fn ensure(
        &self,
        pool: &Pool,
        target: &TargetConfig,
        user: &str,
        roles: &[String],
        revoke: bool,
    ) -> Result<RoleChanges, ProvisionError> {
        let mut wanted: Vec<String> = roles.to_vec();
        wanted.sort();
        wanted.dedup();
        let person = (target.addr.clone(), user.to_owned());
        let key = (person.0.clone(), person.1.clone(), wanted.clone(), revoke);
        let set = (wanted, revoke);
        // The membership may have moved on since this set was last applied (with G, without G,
        // with G again): then the cached run proves nothing.
        if self.latest.get(&person).is_some_and(|last| last != set) {
            self.done.invalidate(&key).await;
        }
        let pending = match self
            .done
            .try_get_with(key, async {
                self.run(pool, target, user, roles, revoke)
                    .await
                    .map(|c| Arc::new(Mutex::new(Some(c))))
            })
            .await
        {
            Ok(pending) => pending,
            Err(shared) => match Arc::try_unwrap(shared) {
                Ok(e) => return Err(e),
                // A concurrent login's run failed; try once on our own for a precise error.
                Err(_) => return self.run(pool, target, user, roles, revoke).await,
            },
        };
        self.latest.insert(person, set);
        let taken = match pending.lock() {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        Ok(taken.unwrap_or_default())
    }

    /// One provisioning run, without the cache (retries once on a duplicate-role race).
    pub async fn run(
        &self,
        pool: &Pool,
        target: &TargetConfig,
        user: &str,
        roles: &[String],
        revoke: bool,
    ) -> Result<RoleChanges, ProvisionError> {
        let limit = pool.config.connect_timeout + pool.config.login_timeout;
        let work = async {
            let client = self.admin_connect(pool, target).await?;
            match self.apply(&client, user, roles, revoke).await {
                Err(e) if matches!(e.sqlstate(), Some("42710" | "23505")) => {
                    self.apply(&client, user, roles, revoke).await
                }
                other => other,
            }
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| ProvisionError::Timeout)?
    }

    async fn admin_connect(
        &self,
        pool: &Pool,
        target: &TargetConfig,
    ) -> Result<tokio_postgres::Client, ProvisionError> {
        let connect_err = |e: super::ConnectError| ProvisionError::Connect(Box::new(e));
        let tcp = tokio::time::timeout(
            pool.config.connect_timeout,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| {
            connect_err(super::ConnectError::Timeout {
                addr: target.addr.clone(),
                phase: "connect",
            })
        })?
        .map_err(|source| {
            connect_err(super::ConnectError::Connect {
                addr: target.addr.clone(),
                source,
            })
        })?;
        let _ = tcp.set_nodelay(true);
        // Without an admin password a client_cert pool presents a certificate for admin_user.
        let cert = match (&self.config.admin_password, &pool.client_certs) {
            (None, Some(issuer)) => Some(issuer.for_user(&self.config.admin_user).await.map_err(
                |source| {
                    connect_err(super::ConnectError::ClientCert {
                        addr: target.addr.clone(),
                        source,
                    })
                },
            )?),
            _ => None,
        };
        let stream = super::negotiate_tls(pool, target, tcp, cert.as_ref().map(|c| &c.tls))
            .await
            .map_err(connect_err)?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(&self.config.admin_user)
            .dbname(&self.config.admin_database)
            .application_name("idgate-provisioning")
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        if let Some(pw) = &self.config.admin_password {
            cfg.password(pw.expose().as_bytes());
        }
        let (client, connection) = cfg.connect_raw(stream, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "provisioning admin connection ended");
            }
        });
        Ok(client)
    }

    async fn apply(
        &self,
        client: &tokio_postgres::Client,
        user: &str,
        roles: &[String],
        revoke: bool,
    ) -> Result<RoleChanges, ProvisionError> {
        let prefix = format!("{}:", self.config.namespace);
        // Only namespace roles are ever wanted (the identity mapping adds the prefix; anything
        // else is ignored here on principle).
        let wanted: BTreeSet<&str> = roles
            .iter()
            .map(String::as_str)
            .filter(|r| r.starts_with(&prefix) && *r != user)
            .collect();

        // Fast path: nothing to do, no transaction, no lock.
        let plan = |state: &State| {
            let mut changes = state.plan(user, &wanted);
            if !revoke {
                changes.revoked.clear();
            }
            changes
        };
        let state = read_state(client, user, &wanted, &prefix).await?;
        if plan(&state).is_empty() {
            return Ok(RoleChanges::default());
        }

        client.batch_execute("BEGIN").await?;
        let result = async {
            let mut locks: BTreeSet<&str> = wanted.clone();
            locks.insert(user);
            for name in &locks {
                client
                    .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[name])
                    .await?;
            }
            let state = read_state(client, user, &wanted, &prefix).await?;
            let changes = plan(&state);
            let mut sql = Vec::new();
            if let Some(login) = &changes.created_login_role {
                sql.push(format!(
                    "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS",
                    escape_identifier(login)
                ));
            }
            for role in &changes.created_roles {
                sql.push(format!(
                    "CREATE ROLE {} WITH NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS",
                    escape_identifier(role)
                ));
            }
            for role in &changes.granted {
                sql.push(format!(
                    "GRANT {} TO {}",
                    escape_identifier(role),
                    escape_identifier(user)
                ));
            }
            for role in &changes.revoked {
                sql.push(format!(
                    "REVOKE {} FROM {}",
                    escape_identifier(role),
                    escape_identifier(user)
                ));
            }
            for statement in sql {
                client.batch_execute(&statement).await?;
            }
            Ok::<_, ProvisionError>(changes)
        }
        .await;
        match result {
            Ok(changes) => {
                client.batch_execute("COMMIT").await?;
                Ok(changes)
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }
}

/// The catalog facts one run needs.
struct State {
    user_exists: bool,
    /// Existing wanted roles with whether they may be granted (NOLOGIN, not super, not createrole).
    existing: Vec<(String, bool)>,
    /// Namespace roles `user` is currently a member of.
    member_of: BTreeSet<String>,
}

impl State {
    fn plan(&self, user: &str, wanted: &BTreeSet<&str>) -> RoleChanges {
        let mut changes = RoleChanges::default();
        if !self.user_exists {
            changes.created_login_role = Some(user.to_owned());
        }
        for role in wanted {
            let grantable = match self.existing.iter().find(|(n, _)| n == role) {
                Some((_, ok)) => *ok,
                None => {
                    changes.created_roles.push((*role).to_owned());
                    true
                }
            };
            if !grantable {
                changes.refused.push((*role).to_owned());
                // It may have become unsafe after it was granted: take it back.
                if self.member_of.contains(*role) {
                    changes.revoked.push((*role).to_owned());
                }
            } else if !self.member_of.contains(*role) {
                changes.granted.push((*role).to_owned());
            }
        }
        for role in &self.member_of {
            if !wanted.contains(role.as_str()) {
                changes.revoked.push(role.clone());
            }
        }
        // A refusal alone changes nothing; report it only alongside real changes.
        if changes.created_login_role.is_none()
            && changes.created_roles.is_empty()
            && changes.granted.is_empty()
            && changes.revoked.is_empty()
        {
            return RoleChanges::default();
        }
        changes
    }
}

/// Each of the names in `$1` that exists, and whether its membership may be granted: it cannot
/// log in, and neither it nor any role it belongs to, transitively, holds an elevated attribute,
/// is a predefined `pg_*` role, or is a login role (another person or a service account).
const GRANTABLE_SQL: &str = "\
SELECT r.rolname::text, (NOT r.rolcanlogin AND NOT EXISTS ( \
    WITH RECURSIVE up(oid) AS ( \
        SELECT r.oid \
        UNION SELECT m.roleid FROM pg_auth_members m JOIN up ON m.member = up.oid) \
    SELECT 1 FROM up JOIN pg_roles a ON a.oid = up.oid \
    WHERE a.rolsuper OR a.rolcreaterole OR a.rolcreatedb OR a.rolreplication \
        OR a.rolbypassrls OR starts_with(a.rolname, 'pg_') \
        OR (a.oid <> r.oid AND a.rolcanlogin))) \
FROM pg_roles r WHERE r.rolname = ANY($1::text[])";

async fn read_state(
    client: &tokio_postgres::Client,
    user: &str,
    wanted: &BTreeSet<&str>,
    prefix: &str,
) -> Result<State, ProvisionError> {
    let names: Vec<&str> = wanted.iter().copied().chain([user]).collect();
    let rows = client.query(GRANTABLE_SQL, &[&names]).await?;
    let mut user_exists = false;
    let mut existing = Vec::new();
    for row in rows {
        let name: String = row.try_get(0)?;
        let grantable: bool = row.try_get(1)?;
        if name == user {
            user_exists = true;
        }
        if wanted.contains(name.as_str()) {
            existing.push((name, grantable));
        }
    }
    let rows = client
        .query(
            "SELECT r.rolname::text FROM pg_auth_members m \
             JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles u ON u.oid = m.member \
             WHERE u.rolname = $1",
            &[&user],
        )
        .await?;
    let mut member_of = BTreeSet::new();
    for row in rows {
        let name: String = row.try_get(0)?;
        if name.starts_with(prefix) {
            member_of.insert(name);
        }
    }
    Ok(State {
        user_exists,
        existing,
        member_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_grants_new_revokes_gone_and_refuses_unsafe_roles() {
        let state = State {
            user_exists: true,
            existing: vec![
                ("aad:a".into(), true),
                ("aad:bob@x".into(), false),
                ("aad:old".into(), true),
            ],
            member_of: ["aad:old".to_owned()].into_iter().collect(),
        };
        let wanted: BTreeSet<&str> = ["aad:a", "aad:bob@x", "aad:new"].into_iter().collect();
        let c = state.plan("aad:me", &wanted);
        assert_eq!(c.created_login_role, None);
        assert_eq!(c.created_roles, ["aad:new"]);
        assert_eq!(c.granted, ["aad:a", "aad:new"]);
        assert_eq!(c.revoked, ["aad:old"]);
        assert_eq!(c.refused, ["aad:bob@x"]);
        // A role that became unsafe after it was granted is refused and taken back.
        let turned = State {
            user_exists: true,
            existing: vec![("aad:files".into(), false)],
            member_of: ["aad:files".to_owned()].into_iter().collect(),
        };
        let c = turned.plan("aad:me", &["aad:files"].into_iter().collect());
        assert_eq!(c.refused, ["aad:files"]);
        assert_eq!(c.revoked, ["aad:files"]);
        let same = State {
            user_exists: true,
            existing: vec![("aad:a".into(), true)],
            member_of: ["aad:a".to_owned()].into_iter().collect(),
        };
        assert!(same
            .plan("aad:me", &["aad:a"].into_iter().collect())
            .is_empty());
    }
}
