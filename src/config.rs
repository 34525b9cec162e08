//! Configuration: one TOML file, overridable from the environment as `IDGATE__SECTION__KEY`.
//!
//! Loading has two steps. [`RawConfig`] mirrors the file (serde, durations in humantime form such
//! as `"10s"`); [`Config::from_raw`] checks and cross-references it and gathers *every* problem
//! into one [`ConfigError`] with the path of each, so a bad file is fixed in one pass. The library
//! never reads the process environment itself: the caller passes the variables in.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::auth::{is_canonical_guid, IssuerSettings, TokenVersion};

/// Every problem found in a configuration, each with its path.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file the problems were found in (or `<memory>`).
    pub source_name: String,
    /// The problems.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} problem(s):", self.source_name, self.issues.len())?;
        for issue in &self.issues {
            writeln!(f, "  {}: {}", issue.path, issue.message)?;
        }
        Ok(())
    }
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted path of the offending key, e.g. `pools[0].targets[1].addr`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Raw mirror of the file
// ---------------------------------------------------------------------------------------------

/// The file as written. Every field documents its default.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct RawConfig {
    /// `[listener]`: where clients connect.
    pub listener: RawListener,
    /// `[[issuers]]`: trusted Entra ID issuers. _Default:_ none (required).
    pub issuers: Vec<RawIssuer>,
    /// `[identity]`: how a token becomes a database identity.
    pub identity: RawIdentity,
    /// `[admin]`: the admin HTTP listener.
    pub admin: RawAdmin,
    /// `[routing]`: which pool serves a session.
    pub routing: RawRouting,
    /// `[health]`: active health checks of targets.
    pub health: RawHealth,
    /// `[shutdown]`: graceful shutdown.
    pub shutdown: RawShutdown,
    /// `[[pools]]`: workgroups. _Default:_ none (required).
    pub pools: Vec<RawPool>,
    /// `[audit]`: where audit events go.
    pub audit: RawAudit,
    /// `[telemetry]`: logging.
    pub telemetry: RawTelemetry,
    /// `[ca]`: idgate's own CA for `backend_auth = "client_cert"`.
    pub ca: RawCa,
}

/// `[ca]`.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct RawCa {
    /// PEM CA certificate that backends trust (`ssl_ca_file`). _Default:_ none (required for
    /// `client_cert` pools).
    pub cert_file: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `cert_file`. _Default:_ none.
    pub key_file: Option<PathBuf>,
}

/// `[listener]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawListener {
    /// Address clients connect to. _Default:_ `"0.0.0.0:5439"` (Redshift's port).
    pub addr: String,
    /// PEM certificate chain presented to clients. _Default:_ none (required unless plaintext-only dev).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Dev only: accept a token over plaintext from a loopback client. _Default:_ `false`.
    pub allow_plaintext: bool,
    /// Time allowed from accept until the token is read. _Default:_ `"10s"`.
    pub handshake_timeout: String,
    /// Maximum concurrent client connections. _Default:_ `10000`.
    pub max_connections: usize,
    /// PROXY protocol v2 in front of the listener: `"off"`, `"optional"` or `"required"`.
    /// _Default:_ `"off"`.
    pub proxy_protocol: String,
    /// Networks (CIDR or single addresses) of the load balancers whose PROXY headers are believed.
    pub proxy_protocol_trusted: Vec<String>,
}

impl Default for RawListener {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:5439".into(),
            tls_cert_file: None,
            tls_key_file: None,
            allow_plaintext: false,
            handshake_timeout: "10s".into(),
            max_connections: 10_000,
            proxy_protocol: "off".into(),
            proxy_protocol_trusted: Vec::new(),
        }
    }
}

/// `[[issuers]]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawIssuer {
    /// Label used in audit records. _Default:_ `"entra"`.
    pub name: String,
    /// Authority base URL. _Default:_ `"https://login.microsoftonline.com"`.
    pub authority: String,
    /// Allowed tenant ids (GUIDs). _Default:_ none (required).
    pub tenants: Vec<String>,
    /// Accepted token versions, `"1.0"` and/or `"2.0"`. _Default:_ both.
    pub accept_versions: Vec<String>,
    /// Accepted `aud` values, compared exactly. _Default:_ none (required).
    pub audiences: Vec<String>,
    /// Delegated tokens must carry one of these in `scp`. _Default:_ none (no requirement).
    pub required_scopes: Vec<String>,
    /// App-only tokens must carry one of these in `roles`. _Default:_ none.
    pub required_app_roles: Vec<String>,
    /// Clock skew allowed for `exp`/`nbf`/`iat`. _Default:_ `"60s"`.
    pub leeway: String,
    /// At most one unknown-`kid` JWKS refetch per interval. _Default:_ `"5m"`.
    pub jwks_refetch_floor: String,
    /// Background JWKS refresh interval. _Default:_ `"1h"`.
    pub jwks_refresh: String,
    /// Keys keep serving this long while the IdP is unreachable. _Default:_ `"24h"`.
    pub jwks_max_stale: String,
    /// Timeout of one discovery/JWKS request. _Default:_ `"5s"`.
    pub http_timeout: String,
    /// Development only: accept a plain-http authority that is not loopback (docker-compose's
    /// dev IdP). _Default:_ `false`.
    pub allow_http: bool,
}

impl Default for RawIssuer {
    fn default() -> Self {
        Self {
            name: "entra".into(),
            authority: "https://login.microsoftonline.com".into(),
            tenants: Vec::new(),
            accept_versions: vec!["1.0".into(), "2.0".into()],
            audiences: Vec::new(),
            required_scopes: Vec::new(),
            required_app_roles: Vec::new(),
            leeway: "60s".into(),
            jwks_refetch_floor: "5m".into(),
            jwks_refresh: "1h".into(),
            jwks_max_stale: "24h".into(),
            http_timeout: "5s".into(),
            allow_http: false,
        }
    }
}

/// `[identity]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawIdentity {
    /// Claims tried in order for the user name. _Default:_ `upn, preferred_username, unique_name, email`.
    pub user_claims: Vec<String>,
    /// Prefix of database users and roles (`aad:alice@corp.com`); empty for none. _Default:_ `"aad"`.
    pub namespace: String,
    /// Lower-case the mapped user name. _Default:_ `true`.
    pub lowercase: bool,
    /// `"must_match"`: a non-empty startup `user` must name the token's identity; `"ignore"`. _Default:_ `"must_match"`.
    pub client_user: String,
    /// `"refuse"` or `"ignore_groups"` when the token has a groups overage. _Default:_ `"refuse"`.
    pub groups_overage: String,
    /// Only `"keep"` for now (sessions may outlive the token). _Default:_ `"keep"`.
    pub session_vs_token: String,
    /// Entra group object id → role name (inside the namespace). _Default:_ empty.
    pub groups: BTreeMap<String, String>,
    /// App role value → role name (inside the namespace). _Default:_ empty.
    pub app_roles: BTreeMap<String, String>,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            user_claims: ["upn", "preferred_username", "unique_name", "email"]
                .map(String::from)
                .to_vec(),
            namespace: "aad".into(),
            lowercase: true,
            client_user: "must_match".into(),
            groups_overage: "refuse".into(),
            session_vs_token: "keep".into(),
            groups: BTreeMap::new(),
            app_roles: BTreeMap::new(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct RawAdmin {
    /// Address of the admin HTTP listener (`/healthz`, `/readyz`, `/metrics`, `/pools`, drain,
    /// reload). _Default:_ none (no admin listener).
    pub addr: Option<String>,
    /// File holding a bearer token required on every admin request. _Default:_ none.
    pub bearer_token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token. _Default:_ none.
    pub bearer_token_env: Option<String>,
}

/// `[routing]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawRouting {
    /// Pool used when no other rule matches. _Default:_ the first pool.
    pub default_pool: Option<String>,
    /// SNI host names `<pool><suffix>` select that pool, e.g. `".db.contoso.example"`. _Default:_ none.
    pub sni_suffix: Option<String>,
    /// Startup option naming the pool: `options=-c idgate.workgroup=NAME`. _Default:_ `"idgate.workgroup"`.
    pub startup_option: String,
    /// `database = "NAME<sep>db"` selects pool NAME and database db; empty disables. _Default:_ `"/"`.
    pub database_separator: String,
    /// Claim rules, first match wins. _Default:_ none.
    pub rules: Vec<RawRule>,
}

impl Default for RawRouting {
    fn default() -> Self {
        Self {
            default_pool: None,
            sni_suffix: None,
            startup_option: "idgate.workgroup".into(),
            database_separator: "/".into(),
            rules: Vec::new(),
        }
    }
}

/// One `[[routing.rules]]` entry: a group or app role selects a pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Entra group object id, or the role name it maps to in `[identity.groups]`.
    pub group: Option<String>,
    /// App role value, or the role name it maps to in `[identity.app_roles]`.
    pub app_role: Option<String>,
    /// Pool selected.
    pub pool: String,
}

/// `[health]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawHealth {
    /// Probe interval. _Default:_ `"2s"`.
    pub interval: String,
    /// Probe timeout. _Default:_ `"1s"`.
    pub timeout: String,
    /// Consecutive successes that bring a target back. _Default:_ `2`.
    pub rise: u32,
    /// Consecutive failures (probes or live connects) that take a target out. _Default:_ `2`.
    pub fall: u32,
    /// Role for the PostgreSQL-level probe (`SELECT 1`); without it probes are TCP only. _Default:_ none.
    pub probe_user: Option<String>,
    /// File holding the probe role's password. _Default:_ none.
    pub probe_password_file: Option<PathBuf>,
    /// Environment variable holding the probe role's password. _Default:_ none.
    pub probe_password_env: Option<String>,
    /// Database the probe connects to. _Default:_ `"postgres"`.
    pub probe_database: String,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            interval: "2s".into(),
            timeout: "1s".into(),
            rise: 2,
            fall: 2,
            probe_user: None,
            probe_password_file: None,
            probe_password_env: None,
            probe_database: "postgres".into(),
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawShutdown {
    /// How long sessions may keep running after SIGTERM before they get 57P01. _Default:_ `"30s"`.
    pub grace_period: String,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self {
            grace_period: "30s".into(),
        }
    }
}

/// `[[pools]]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawPool {
    /// Pool name. _Default:_ none (required).
    pub name: String,
    /// `"postgres"` or `"redshift"` (needs `backend_auth = "token"`). _Default:_ `"postgres"`.
    pub kind: String,
    /// `"client_cert"`, `"token"`, `"password"` or `"trust"`. _Default:_ `"trust"`.
    pub backend_auth: String,
    /// With `password`: log in as this fixed role instead of the mapped person. _Default:_ none.
    pub backend_user: Option<String>,
    /// With `password`: file holding the password. _Default:_ none.
    pub backend_password_file: Option<PathBuf>,
    /// With `password`: environment variable holding the password. _Default:_ none.
    pub backend_password_env: Option<String>,
    /// `"disable"`, `"require"` or `"verify-full"`. _Default:_ `"verify-full"` for `client_cert`
    /// and `token`, `"disable"` otherwise.
    pub backend_tls: Option<String>,
    /// CA bundle for `verify-full`. _Default:_ the public web roots.
    pub backend_ca_file: Option<PathBuf>,
    /// Time allowed for TCP connect to one target. _Default:_ `"5s"`.
    pub connect_timeout: String,
    /// Time allowed for the backend login. _Default:_ `"10s"`.
    pub login_timeout: String,
    /// `"round_robin"`, `"least_sessions"` or `"weighted"`. _Default:_ `"round_robin"`.
    pub balance: String,
    /// `"fail_closed"` (08006) or `"fail_open"` (try anyway) when every target is unhealthy.
    /// _Default:_ `"fail_closed"`.
    pub when_all_unhealthy: String,
    /// Groups (object ids or mapped role names) allowed to use the pool; empty with
    /// `allowed_app_roles` empty means anyone who authenticates. _Default:_ empty.
    pub allowed_groups: Vec<String>,
    /// App roles (values or mapped role names) allowed to use the pool. _Default:_ empty.
    pub allowed_app_roles: Vec<String>,
    /// Total time for trying targets (connect + login, with retries). _Default:_ `"15s"`.
    pub retry_budget: String,
    /// Targets. _Default:_ none (required).
    pub targets: Vec<RawTarget>,
    /// With `client_cert`: validity of a minted client certificate. _Default:_ `"1h"`.
    pub client_cert_lifetime: String,
    /// `"none"` or `"jit"` (create login roles, keep namespace role membership in step).
    /// _Default:_ `"none"`.
    pub provisioning: String,
    /// With `jit`: the role idgate provisions as. _Default:_ none (required for `jit`).
    pub admin_user: Option<String>,
    /// With `jit`: file holding the admin role's password. _Default:_ none (a `client_cert` pool
    /// logs the admin in with a certificate instead).
    pub admin_password_file: Option<PathBuf>,
    /// With `jit`: environment variable holding the admin role's password. _Default:_ none.
    pub admin_password_env: Option<String>,
    /// With `jit`: the database the admin connection opens. _Default:_ `"postgres"`.
    pub admin_database: String,
}

impl Default for RawPool {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: "postgres".into(),
            backend_auth: "trust".into(),
            backend_user: None,
            backend_password_file: None,
            backend_password_env: None,
            backend_tls: None,
            backend_ca_file: None,
            connect_timeout: "5s".into(),
            login_timeout: "10s".into(),
            balance: "round_robin".into(),
            when_all_unhealthy: "fail_closed".into(),
            allowed_groups: Vec::new(),
            allowed_app_roles: Vec::new(),
            retry_budget: "15s".into(),
            targets: Vec::new(),
            client_cert_lifetime: "1h".into(),
            provisioning: "none".into(),
            admin_user: None,
            admin_password_file: None,
            admin_password_env: None,
            admin_database: "postgres".into(),
        }
    }
}

/// One `targets` entry.
#[derive(Debug, Deserialize)]
pub struct RawTarget {
    /// `host:port`.
    pub addr: String,
    /// Relative weight (used by weighted balancing later). _Default:_ `1`.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `[audit]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawAudit {
    /// JSON-lines file the events are shipped to (a sink, for SIEM agents). _Default:_ none.
    pub file_path: Option<PathBuf>,
    /// `"native"` (idgate's events) or `"ocsf"` (OCSF Authentication events). _Default:_ `"native"`.
    pub file_format: String,
    /// Also ship events to standard output. _Default:_ `false`.
    pub stdout: bool,
    /// Format of the stdout sink, as `file_format`. _Default:_ `"native"`.
    pub stdout_format: String,
    /// Local spool directory every event is appended to first. _Default:_ `"audit-spool"`.
    pub spool_dir: PathBuf,
    /// Longest time an event waits in memory before the spool is fsynced. _Default:_ `"100ms"`.
    pub fsync_interval: String,
    /// A spool segment is closed and a new one started past this size. _Default:_ 64 MiB.
    pub spool_max_file_bytes: u64,
    /// Shipped segments older than this are deleted. _Default:_ `"7d"`.
    pub spool_retention: String,
    /// Shipped segments beyond this count are deleted, oldest first. _Default:_ `1000`.
    pub spool_max_files: usize,
    /// Refuse new sessions while the spool cannot be written. _Default:_ `false`.
    pub fail_closed: bool,
    /// Name of the environment variable holding the audit PostgreSQL URL. _Default:_ none.
    pub postgres_url_env: Option<String>,
    /// File holding the audit PostgreSQL URL. _Default:_ none.
    pub postgres_url_file: Option<PathBuf>,
    /// Apply the `migrations/` schema to the audit database at start. _Default:_ `false`.
    pub postgres_migrate: bool,
    /// Events per INSERT. _Default:_ `500`.
    pub postgres_batch_size: usize,
    /// Pools whose statements (simple query and Parse) are recorded. _Default:_ none.
    pub query_audit_pools: Vec<String>,
    /// Statement text is truncated to this many bytes. _Default:_ `2048`.
    pub query_audit_max_len: usize,
    /// `[[audit.alerts]]`: brute-force rules. _Default:_ none.
    pub alerts: Vec<RawAlertRule>,
    /// OTLP/HTTP collector base URL for audit events as OpenTelemetry log records
    /// (`{endpoint}/v1/logs`, JSON encoding), e.g. `"http://otel-collector:4318"`. _Default:_ none.
    pub otlp_endpoint: Option<String>,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            file_path: None,
            file_format: "native".into(),
            stdout: false,
            stdout_format: "native".into(),
            spool_dir: PathBuf::from("audit-spool"),
            fsync_interval: "100ms".into(),
            spool_max_file_bytes: 64 * 1024 * 1024,
            spool_retention: "7d".into(),
            spool_max_files: 1000,
            fail_closed: false,
            postgres_url_env: None,
            postgres_url_file: None,
            postgres_migrate: false,
            postgres_batch_size: 500,
            query_audit_pools: Vec::new(),
            query_audit_max_len: 2048,
            alerts: Vec::new(),
            otlp_endpoint: None,
        }
    }
}

/// One `[[audit.alerts]]` rule: `failed_logins` refusals within `within` for one key.
#[derive(Debug, Deserialize)]
pub struct RawAlertRule {
    /// Rule name (in the alert event). _Default:_ none (required).
    pub name: String,
    /// Number of failed logins that raises the alert. _Default:_ none (required).
    pub failed_logins: u32,
    /// Sliding window, e.g. `"5m"`. _Default:_ none (required).
    pub within: String,
    /// `"user"` or `"client_addr"`. _Default:_ `"client_addr"`.
    #[serde(default = "client_addr")]
    pub per: String,
    /// URL the alert JSON is POSTed to. _Default:_ none.
    pub webhook_url: Option<String>,
}

fn client_addr() -> String {
    "client_addr".into()
}

/// `[telemetry]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawTelemetry {
    /// `"text"` or `"json"`. _Default:_ `"text"`.
    pub log_format: String,
    /// tracing filter directive. _Default:_ `"info"`.
    pub log_level: String,
    /// OTLP/HTTP endpoint for traces, e.g. `"http://otel-collector:4318"`; empty disables. _Default:_ `""`.
    pub otlp_endpoint: String,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            log_format: "text".into(),
            log_level: "info".into(),
            otlp_endpoint: String::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------------------------

/// A checked configuration. Relative file paths are resolved against the file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listener settings.
    pub listener: ListenerConfig,
    /// Trusted issuers.
    pub issuers: Vec<IssuerSettings>,
    /// Identity mapping.
    pub identity: IdentityConfig,
    /// Pools; `default_pool` indexes into it.
    pub pools: Vec<PoolConfig>,
    /// Index of the default pool.
    pub default_pool: usize,
    /// Admin listener.
    pub admin: AdminConfig,
    /// Routing rules.
    pub routing: RoutingConfig,
    /// Health checks.
    pub health: HealthConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Audit settings.
    pub audit: AuditConfig,
    /// Telemetry settings.
    pub telemetry: TelemetryConfig,
}

/// Admin listener settings.
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// Address to bind, if any (the binary binds it).
    pub addr: Option<SocketAddr>,
    /// Bearer token required on admin requests.
    pub bearer_token: Option<crate::types::Secret<String>>,
}

/// A claim rule.
#[derive(Debug, Clone)]
pub struct RouteRule {
    /// Group id or mapped role name.
    pub group: Option<String>,
    /// App role value or mapped role name.
    pub app_role: Option<String>,
    /// Index of the pool.
    pub pool: usize,
}

/// Routing settings.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// SNI suffix.
    pub sni_suffix: Option<String>,
    /// Startup option name (`idgate.workgroup`).
    pub startup_option: String,
    /// `database` separator; empty disables.
    pub database_separator: String,
    /// Claim rules in order.
    pub rules: Vec<RouteRule>,
}

/// Health check settings.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Probe interval.
    pub interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Successes to come back.
    pub rise: u32,
    /// Failures to go out.
    pub fall: u32,
    /// PostgreSQL-level probe credential.
    pub probe: Option<ProbeCredential>,
}

/// The probe's login.
#[derive(Debug, Clone)]
pub struct ProbeCredential {
    /// Role.
    pub user: String,
    /// Password.
    pub password: crate::types::Secret<String>,
    /// Database.
    pub database: String,
}

/// Graceful shutdown settings.
#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// Grace period.
    pub grace_period: Duration,
}

/// Listener settings.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind (the binary binds it; the library takes a bound listener).
    pub addr: SocketAddr,
    /// Certificate chain and key, PEM.
    pub tls: Option<TlsFiles>,
    /// Dev only: tokens over plaintext from loopback clients.
    pub allow_plaintext: bool,
    /// Accept → token-read deadline.
    pub handshake_timeout: Duration,
    /// Connection cap.
    pub max_connections: usize,
    /// PROXY protocol v2 (real client addresses behind a load balancer).
    pub proxy: crate::net::proxy::ProxySettings,
}

/// A certificate chain and its key, as PEM bytes (read at load time).
#[derive(Clone)]
pub struct TlsFiles {
    /// Where the chain came from.
    pub cert_file: PathBuf,
    /// Where the key came from.
    pub key_file: PathBuf,
    /// PEM chain.
    pub cert_pem: Vec<u8>,
    /// PEM key.
    pub key_pem: crate::types::Secret<Vec<u8>>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// What a non-empty startup `user` must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientUserPolicy {
    /// It must name the mapped identity (with or without the namespace, case-insensitively).
    MustMatch,
    /// It is ignored.
    Ignore,
}

/// What to do when a token's groups did not fit in it (`_claim_names.groups`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupsOverage {
    /// Refuse the login.
    Refuse,
    /// Log in without group roles.
    IgnoreGroups,
}

/// Identity mapping settings.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Claims tried in order for the user name.
    pub user_claims: Vec<String>,
    /// Namespace prefix without the colon; empty for none.
    pub namespace: String,
    /// Lower-case the user name.
    pub lowercase: bool,
    /// Startup `user` policy.
    pub client_user: ClientUserPolicy,
    /// Overage policy.
    pub groups_overage: GroupsOverage,
    /// Group object id → role name.
    pub groups: HashMap<String, String>,
    /// App role → role name.
    pub app_roles: HashMap<String, String>,
}

/// The kind of database behind a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// Stock PostgreSQL.
    Postgres,
    /// Amazon Redshift.
    Redshift,
}

/// How idgate logs in to a pool's backends.
#[derive(Debug, Clone)]
pub enum BackendAuth {
    /// As the mapped user; the backend trusts idgate's address (development).
    Trust,
    /// With a password from a file or environment variable (SCRAM-SHA-256, MD5 or cleartext).
    Password {
        /// Fixed service role, or `None` to log in as the mapped user.
        user: Option<String>,
        /// The password.
        password: crate::types::Secret<String>,
    },
    /// As the mapped user over TLS with a client certificate minted by idgate's CA (CN = user).
    ClientCert {
        /// idgate's CA.
        ca: std::sync::Arc<crate::ca::IdgateCa>,
        /// Validity of one minted certificate.
        lifetime: Duration,
    },
    /// With the client's own token: Redshift native IdP exchange (`redshift` pools) or token as
    /// password (`postgres` pools).
    Token,
}

impl BackendAuth {
    /// The mode's configuration name.
    pub fn mode(&self) -> &'static str {
        match self {
            BackendAuth::Trust => "trust",
            BackendAuth::Password { .. } => "password",
            BackendAuth::ClientCert { .. } => "client_cert",
            BackendAuth::Token => "token",
        }
    }
}

/// `provisioning = "jit"`: how idgate reaches the backend as its admin role.
#[derive(Debug, Clone)]
pub struct ProvisioningConfig {
    /// The admin role.
    pub admin_user: String,
    /// Its password, or `None` to log in with a minted client certificate.
    pub admin_password: Option<crate::types::Secret<String>>,
    /// The database the admin connection opens.
    pub admin_database: String,
    /// The identity namespace (without colon); only roles `<namespace>:…` are ever touched.
    pub namespace: String,
}

/// TLS towards the backend.
#[derive(Debug, Clone)]
pub enum BackendTls {
    /// Plain TCP.
    Disable,
    /// TLS without certificate verification.
    Require,
    /// TLS with chain and host name verification against `ca` (PEM) or the web roots.
    VerifyFull {
        /// CA bundle (PEM), or `None` for the public web roots.
        ca_pem: Option<Vec<u8>>,
    },
}

/// Target selection within a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// In turn.
    RoundRobin,
    /// Fewest active sessions first.
    LeastSessions,
    /// Smooth weighted round-robin by `weight`.
    Weighted,
}

/// What to do when every target of a pool is unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllUnhealthy {
    /// Refuse with 08006.
    FailClosed,
    /// Try the targets anyway (recorded in the audit trail).
    FailOpen,
}

/// One pool (workgroup).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: PoolKind,
    /// Backend login.
    pub backend_auth: BackendAuth,
    /// Backend TLS.
    pub backend_tls: BackendTls,
    /// TCP connect timeout per target.
    pub connect_timeout: Duration,
    /// Backend login timeout.
    pub login_timeout: Duration,
    /// Target selection.
    pub balance: Balance,
    /// All-unhealthy policy.
    pub when_all_unhealthy: AllUnhealthy,
    /// Allowed groups (ids or role names).
    pub allowed_groups: Vec<String>,
    /// Allowed app roles (values or role names).
    pub allowed_app_roles: Vec<String>,
    /// Total time for trying targets.
    pub retry_budget: Duration,
    /// Targets.
    pub targets: Vec<TargetConfig>,
    /// Just-in-time role provisioning, if enabled.
    pub provisioning: Option<ProvisioningConfig>,
}

/// One target.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// `host:port` as written.
    pub addr: String,
    /// Host part (for TLS server name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Weight.
    pub weight: u32,
}

/// Audit settings (see `RawAudit` for the meaning and defaults of each key).
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// JSON-lines file sink.
    pub file_path: Option<PathBuf>,
    /// Format of the file sink.
    pub file_format: AuditFormat,
    /// Also ship events to stdout.
    pub stdout: bool,
    /// Format of the stdout sink.
    pub stdout_format: AuditFormat,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Bounded fsync delay.
    pub fsync_interval: Duration,
    /// Segment rotation size.
    pub spool_max_file_bytes: u64,
    /// Age after which shipped segments are deleted.
    pub spool_retention: Duration,
    /// Count beyond which shipped segments are deleted.
    pub spool_max_files: usize,
    /// Refuse sessions while the spool cannot be written.
    pub fail_closed: bool,
    /// Audit PostgreSQL URL (from `postgres_url_env` or `postgres_url_file`).
    pub postgres_url: Option<crate::types::Secret<String>>,
    /// Apply migrations at start.
    pub postgres_migrate: bool,
    /// Events per INSERT.
    pub postgres_batch_size: usize,
    /// Pools with query audit.
    pub query_audit_pools: Vec<String>,
    /// Statement truncation length.
    pub query_audit_max_len: usize,
    /// Brute-force alert rules.
    pub alerts: Vec<AlertRule>,
    /// OTLP/HTTP logs endpoint (base URL).
    pub otlp_endpoint: Option<String>,
}

impl AuditConfig {
    /// Defaults with the spool in `spool_dir` (for tests and tools).
    pub fn with_spool(spool_dir: PathBuf) -> Self {
        let raw = RawAudit::default();
        Self {
            file_path: None,
            file_format: AuditFormat::Native,
            stdout: false,
            stdout_format: AuditFormat::Native,
            spool_dir,
            fsync_interval: Duration::from_millis(100),
            spool_max_file_bytes: raw.spool_max_file_bytes,
            spool_retention: Duration::from_secs(7 * 86400),
            spool_max_files: raw.spool_max_files,
            fail_closed: false,
            postgres_url: None,
            postgres_migrate: false,
            postgres_batch_size: raw.postgres_batch_size,
            query_audit_pools: Vec::new(),
            query_audit_max_len: raw.query_audit_max_len,
            alerts: Vec::new(),
            otlp_endpoint: None,
        }
    }
}

/// How a file or stdout sink writes events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditFormat {
    /// idgate's own JSON events.
    Native,
    /// OCSF-shaped JSON (Authentication class 3002 for logins, refusals and logoffs).
    Ocsf,
}

/// What an alert rule counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertPer {
    /// Per user (`db_user`, else the startup `user`).
    User,
    /// Per client IP address.
    ClientAddr,
}

/// A checked `[[audit.alerts]]` rule.
#[derive(Debug, Clone)]
pub struct AlertRule {
    /// Rule name.
    pub name: String,
    /// Threshold.
    pub failed_logins: u32,
    /// Window.
    pub within: Duration,
    /// Key.
    pub per: AlertPer,
    /// Webhook URL.
    pub webhook_url: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// JSON lines.
    Json,
}

/// Telemetry settings.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Output format.
    pub log_format: LogFormat,
    /// Filter directive.
    pub log_level: String,
    /// OTLP/HTTP endpoint; `None` disables.
    pub otlp_endpoint: Option<String>,
}

impl Config {
    /// Things an operator should know at startup: pools whose sessions do not carry the person's
    /// identity or whose backend login is weakly protected. Logged as warnings by [`crate::run`].
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for issuer in &self.issuers {
            if issuer.required_scopes.is_empty() && issuer.required_app_roles.is_empty() {
                out.push(format!(
                    "issuer {:?}: no required_scopes and no required_app_roles; any access token issued for this gateway's audience is accepted, whatever its scope or app role (set required_scopes = [\"jdbc_login\"] or required_app_roles)",
                    issuer.name
                ));
            }
        }
        for pool in &self.pools {
            let name = &pool.name;
            match &pool.backend_auth {
                BackendAuth::Password { user: Some(role), .. } => out.push(format!(
                    "pool {name}: backend_auth = \"password\" logs every session in as the shared service role {role:?}; sessions do not carry the person's identity, so the database's GRANTs, row-level security and logs see {role:?} (development only; use client_cert or token)"
                )),
                BackendAuth::Trust => out.push(format!(
                    "pool {name}: backend_auth = \"trust\" presents no credential; anyone who can reach the database from idgate's address can log in as any user (development only; use client_cert or token)"
                )),
                BackendAuth::Password { user: None, .. } => out.push(format!(
                    "pool {name}: backend_auth = \"password\" shares one password among all mapped users (development only; use client_cert or token)"
                )),
                BackendAuth::ClientCert { .. } | BackendAuth::Token => {
                    if matches!(pool.backend_tls, BackendTls::Require) {
                        out.push(format!(
                            "pool {name}: backend_tls = \"require\" does not verify the backend's certificate; the {} login can be intercepted (use verify-full)",
                            pool.backend_auth.mode()
                        ));
                    }
                }
            }
        }
        out
    }

    /// Load `path`, apply `IDGATE__SECTION__KEY` overrides from `env`, and validate.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| single(&name, "", format!("cannot read the file: {e}")))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, &name, &base, env)
    }

    /// Parse and validate TOML text. `base` resolves relative paths; `env` supplies overrides and
    /// `*_env` secrets.
    pub fn from_toml(
        text: &str,
        name: &str,
        base: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        // `IDGATE__LISTENER__MAX_CONNECTIONS` → `listener.max_connections`. Entries of arrays of
        // tables (`[[pools]]`, `[[issuers]]` …) cannot be addressed this way: say so instead of
        // letting the merge fail with a type error.
        let mut env_issues = Vec::new();
        let mut from_env: Vec<(String, String)> = Vec::new();
        let mut overrides = config::Map::new();
        for (k, v) in env.iter().filter(|(k, _)| k.starts_with("IDGATE__")) {
            let path = k["IDGATE__".len()..].to_lowercase().replace("__", ".");
            if path
                .split('.')
                .any(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            {
                env_issues.push(ConfigIssue {
                    path: bracket_indices(&path),
                    message: format!(
                        "set by the environment variable {k}, but entries of an array of tables cannot be overridden from the environment; change the file instead"
                    ),
                });
                continue;
            }
            from_env.push((path, k.clone()));
            overrides.insert(k.clone(), v.clone());
        }
        if !env_issues.is_empty() {
            return Err(ConfigError {
                source_name: name.to_owned(),
                issues: env_issues,
            });
        }
        let env_note = |path: &str, message: String| match from_env.iter().find(|(p, _)| p == path)
        {
            Some((_, var)) => {
                format!("{message} (the value comes from the environment variable {var})")
            }
            None => message,
        };
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("IDGATE")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(overrides)),
            )
            .build()
            .map_err(|e| single(name, "", format!("not valid TOML: {e}")))?;
        let value: serde_json::Value = built
            .try_deserialize()
            .map_err(|e| single(name, "", format!("cannot read the file: {e}")))?;
        let mut issues = Vec::new();
        let mut unknown = Vec::new();
        let raw: RawConfig = {
            let mut track =
                |path: serde_ignored::Path<'_>| unknown.push(bracket_indices(&path.to_string()));
            let de = serde_ignored::Deserializer::new(value, &mut track);
            match serde_path_to_error::deserialize(de) {
                Ok(raw) => raw,
                Err(e) => {
                    let path = bracket_indices(&e.path().to_string());
                    let message = env_note(&path, e.into_inner().to_string());
                    return Err(single(name, &path, message));
                }
            }
        };
        for path in unknown {
            issues.push(ConfigIssue {
                path,
                message: "unknown key (check the spelling against the README)".into(),
            });
        }
        let mut v = Validator {
            issues,
            base: base.to_path_buf(),
            env,
        };
        let config = v.config(raw);
        if v.issues.is_empty() {
            if let Some(config) = config {
                return Ok(config);
            }
        }
        Err(ConfigError {
            source_name: name.to_owned(),
            issues: v
                .issues
                .into_iter()
                .map(|i| ConfigIssue {
                    message: env_note(&i.path, i.message),
                    path: i.path,
                })
                .collect(),
        })
    }
}

/// `pools.0.targets.1.addr` → `pools[0].targets[1].addr`.
fn bracket_indices(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.') {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

fn single(name: &str, path: &str, message: String) -> ConfigError {
    ConfigError {
        source_name: name.to_owned(),
        issues: vec![ConfigIssue {
            path: if path.is_empty() {
                "(file)".into()
            } else {
                path.into()
            },
            message,
        }],
    }
}

struct Validator<'a> {
    issues: Vec<ConfigIssue>,
    base: PathBuf,
    env: &'a HashMap<String, String>,
}

impl Validator<'_> {
    fn issue(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, value: &str) -> Duration {
        match humantime::parse_duration(value) {
            Ok(d) => d,
            Err(e) => {
                self.issue(
                    path,
                    format!("{value:?} is not a duration such as \"10s\" or \"5m\": {e}"),
                );
                Duration::ZERO
            }
        }
    }

    /// A duration no longer than `max` (and, with `positive`, greater than zero): the bounds the
    /// token validator enforces, reported here with their path like every other problem.
    fn at_most(&mut self, path: &str, value: &str, max: Duration, positive: bool) -> Duration {
        let d = if positive {
            self.positive_duration(path, value)
        } else {
            self.duration(path, value)
        };
        if d > max {
            self.issue(
                path,
                format!("must be at most {}", humantime::format_duration(max)),
            );
        }
        d
    }

    /// A duration that must be greater than zero (a zero timeout would refuse everything).
    fn positive_duration(&mut self, path: &str, value: &str) -> Duration {
        let d = self.duration(path, value);
        if d.is_zero() && humantime::parse_duration(value).is_ok() {
            self.issue(path, "must be greater than zero");
        }
        d
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn read_file(&mut self, path: &str, file: &Path) -> Option<Vec<u8>> {
        let full = self.resolve(file);
        match std::fs::read(&full) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                self.issue(path, format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let listener = self.listener(raw.listener);
        if raw.issuers.is_empty() {
            self.issue("issuers", "at least one [[issuers]] entry is required");
        }
        let issuers: Vec<_> = raw
            .issuers
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.issuer(i, r))
            .collect();
        let identity = self.identity(raw.identity);
        let ca = self.ca(raw.ca);
        if raw.pools.is_empty() {
            self.issue("pools", "at least one [[pools]] entry is required");
        }
        let mut names: Vec<String> = Vec::new();
        let mut pools = Vec::new();
        for (i, r) in raw.pools.into_iter().enumerate() {
            if names.contains(&r.name) {
                self.issue(
                    format!("pools[{i}].name"),
                    format!("pool name {:?} is used twice", r.name),
                );
            }
            names.push(r.name.clone());
            pools.push(self.pool(i, r, ca.as_ref(), &identity.namespace));
        }
        let default_pool = match &raw.routing.default_pool {
            None => 0,
            Some(name) => match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    self.issue("routing.default_pool", format!("no pool is named {name:?}"));
                    0
                }
            },
        };
        let telemetry = TelemetryConfig {
            log_format: match raw.telemetry.log_format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    self.issue(
                        "telemetry.log_format",
                        format!("{other:?} is not one of \"text\", \"json\""),
                    );
                    LogFormat::Text
                }
            },
            log_level: raw.telemetry.log_level,
            otlp_endpoint: Some(raw.telemetry.otlp_endpoint).filter(|e| !e.is_empty()),
        };
        let admin = self.admin(raw.admin);
        let health = self.health(raw.health);
        let shutdown = ShutdownConfig {
            grace_period: self.duration("shutdown.grace_period", &raw.shutdown.grace_period),
        };
        let mut rules = Vec::new();
        for (i, r) in raw.routing.rules.iter().enumerate() {
            if r.group.is_some() == r.app_role.is_some() {
                self.issue(
                    format!("routing.rules[{i}]"),
                    "set exactly one of group, app_role",
                );
            }
            match names.iter().position(|n| *n == r.pool) {
                Some(pool) => rules.push(RouteRule {
                    group: r.group.clone(),
                    app_role: r.app_role.clone(),
                    pool,
                }),
                None => self.issue(
                    format!("routing.rules[{i}].pool"),
                    format!("no pool is named {:?}", r.pool),
                ),
            }
        }
        let routing = RoutingConfig {
            sni_suffix: raw
                .routing
                .sni_suffix
                .clone()
                .filter(|s| !s.is_empty())
                .map(|s| s.to_ascii_lowercase()),
            startup_option: raw.routing.startup_option.clone(),
            database_separator: raw.routing.database_separator.clone(),
            rules,
        };
        let audit = self.audit(raw.audit);
        for (i, pool) in audit.query_audit_pools.iter().enumerate() {
            if !names.contains(pool) {
                self.issue(
                    format!("audit.query_audit_pools[{i}]"),
                    format!("no pool is named {pool:?}"),
                );
            }
        }
        Some(Config {
            listener: listener?,
            issuers: issuers.into_iter().collect::<Option<Vec<_>>>()?,
            identity,
            pools: pools.into_iter().collect::<Option<Vec<_>>>()?,
            default_pool,
            admin,
            routing,
            health,
            shutdown,
            audit,
            telemetry,
        })
    }

    /// A secret from exactly one of a file or an environment variable (or neither: `None`).
    fn secret(
        &mut self,
        path: &str,
        file: Option<&PathBuf>,
        env: Option<&String>,
    ) -> Option<crate::types::Secret<String>> {
        match (file, env) {
            (Some(file), None) => self
                .read_file(&format!("{path}_file"), file)
                .and_then(|b| String::from_utf8(b).ok())
                .map(|s| crate::types::Secret::new(s.trim_end_matches(['\r', '\n']).to_owned())),
            (None, Some(var)) => match self.env.get(var) {
                Some(v) => Some(crate::types::Secret::new(v.clone())),
                None => {
                    self.issue(
                        format!("{path}_env"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            (Some(_), Some(_)) => {
                self.issue(path, format!("set only one of {path}_file, {path}_env"));
                None
            }
            (None, None) => None,
        }
    }

    fn admin(&mut self, raw: RawAdmin) -> AdminConfig {
        let addr = raw
            .addr
            .as_ref()
            .and_then(|a| match a.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    self.issue(
                        "admin.addr",
                        format!("{a:?} is not an address such as \"127.0.0.1:9439\": {e}"),
                    );
                    None
                }
            });
        let bearer_token = self.secret(
            "admin.bearer_token",
            raw.bearer_token_file.as_ref(),
            raw.bearer_token_env.as_ref(),
        );
        AdminConfig { addr, bearer_token }
    }

    fn health(&mut self, raw: RawHealth) -> HealthConfig {
        let interval = self.duration("health.interval", &raw.interval);
        let timeout = self.duration("health.timeout", &raw.timeout);
        if interval.is_zero() {
            self.issue("health.interval", "must be positive");
        }
        if raw.rise == 0 || raw.fall == 0 {
            self.issue("health.rise", "rise and fall must be at least 1");
        }
        let password = self.secret(
            "health.probe_password",
            raw.probe_password_file.as_ref(),
            raw.probe_password_env.as_ref(),
        );
        let probe = match (raw.probe_user, password) {
            (Some(user), Some(password)) => Some(ProbeCredential {
                user,
                password,
                database: raw.probe_database,
            }),
            (Some(_), None) => {
                self.issue(
                    "health.probe_user",
                    "needs probe_password_file or probe_password_env",
                );
                None
            }
            (None, Some(_)) => {
                self.issue(
                    "health.probe_user",
                    "a probe password is set but probe_user is not",
                );
                None
            }
            (None, None) => None,
        };
        HealthConfig {
            interval,
            timeout,
            rise: raw.rise,
            fall: raw.fall,
            probe,
        }
    }

    fn audit_format(&mut self, path: &str, value: &str) -> AuditFormat {
        match value {
            "native" => AuditFormat::Native,
            "ocsf" => AuditFormat::Ocsf,
            other => {
                self.issue(path, format!("{other:?} is not \"native\" or \"ocsf\""));
                AuditFormat::Native
            }
        }
    }

    fn audit(&mut self, raw: RawAudit) -> AuditConfig {
        let postgres_url = match (&raw.postgres_url_env, &raw.postgres_url_file) {
            (None, None) => None,
            (Some(var), None) => match self.env.get(var) {
                Some(v) => Some(v.trim().to_owned()),
                None => {
                    self.issue(
                        "audit.postgres_url_env",
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            (None, Some(file)) => self
                .read_file("audit.postgres_url_file", file)
                .and_then(|b| String::from_utf8(b).ok())
                .map(|s| s.trim().to_owned()),
            (Some(_), Some(_)) => {
                self.issue(
                    "audit.postgres_url_env",
                    "set one of postgres_url_env, postgres_url_file, not both",
                );
                None
            }
        };
        if raw.postgres_migrate && postgres_url.is_none() {
            self.issue(
                "audit.postgres_migrate",
                "needs postgres_url_env or postgres_url_file",
            );
        }
        if raw.postgres_batch_size == 0 {
            self.issue("audit.postgres_batch_size", "must be at least 1");
        }
        if raw.spool_max_file_bytes < 4096 {
            self.issue("audit.spool_max_file_bytes", "must be at least 4096");
        }
        let mut alerts = Vec::new();
        for (i, r) in raw.alerts.into_iter().enumerate() {
            let p = format!("audit.alerts[{i}]");
            if r.name.is_empty() {
                self.issue(format!("{p}.name"), "a rule needs a name");
            }
            if r.failed_logins == 0 {
                self.issue(format!("{p}.failed_logins"), "must be at least 1");
            }
            let within = self.duration(&format!("{p}.within"), &r.within);
            let per = match r.per.as_str() {
                "user" => AlertPer::User,
                "client_addr" => AlertPer::ClientAddr,
                other => {
                    self.issue(
                        format!("{p}.per"),
                        format!("{other:?} is not \"user\" or \"client_addr\""),
                    );
                    AlertPer::ClientAddr
                }
            };
            if let Some(url) = &r.webhook_url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    self.issue(format!("{p}.webhook_url"), "must be an http(s) URL");
                }
            }
            alerts.push(AlertRule {
                name: r.name,
                failed_logins: r.failed_logins,
                within,
                per,
                webhook_url: r.webhook_url,
            });
        }
        if let Some(url) = raw.otlp_endpoint.as_deref().filter(|u| !u.is_empty()) {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                self.issue(
                    "audit.otlp_endpoint",
                    "must be an http(s) URL such as \"http://otel-collector:4318\"",
                );
            }
        }
        AuditConfig {
            file_path: raw.file_path.map(|p| self.resolve(&p)),
            file_format: self.audit_format("audit.file_format", &raw.file_format),
            stdout: raw.stdout,
            stdout_format: self.audit_format("audit.stdout_format", &raw.stdout_format),
            spool_dir: self.resolve(&raw.spool_dir),
            fsync_interval: self.duration("audit.fsync_interval", &raw.fsync_interval),
            spool_max_file_bytes: raw.spool_max_file_bytes,
            spool_retention: self.duration("audit.spool_retention", &raw.spool_retention),
            spool_max_files: raw.spool_max_files.max(1),
            fail_closed: raw.fail_closed,
            postgres_url: postgres_url.map(crate::types::Secret::new),
            postgres_migrate: raw.postgres_migrate,
            postgres_batch_size: raw.postgres_batch_size.max(1),
            query_audit_pools: raw.query_audit_pools,
            query_audit_max_len: raw.query_audit_max_len,
            alerts,
            otlp_endpoint: raw.otlp_endpoint.filter(|e| !e.is_empty()),
        }
    }

    fn listener(&mut self, raw: RawListener) -> Option<ListenerConfig> {
        let addr = raw.addr.parse::<SocketAddr>().map_err(|e| {
            self.issue(
                "listener.addr",
                format!(
                    "{:?} is not an address such as \"0.0.0.0:5439\": {e}",
                    raw.addr
                ),
            )
        });
        let handshake_timeout =
            self.positive_duration("listener.handshake_timeout", &raw.handshake_timeout);
        if raw.max_connections == 0 {
            self.issue("listener.max_connections", "must be at least 1");
        }
        let tls = match (raw.tls_cert_file, raw.tls_key_file) {
            (Some(cert), Some(key)) => {
                let cert_pem = self.read_file("listener.tls_cert_file", &cert);
                let key_pem = self.read_file("listener.tls_key_file", &key);
                match (cert_pem, key_pem) {
                    (Some(cert_pem), Some(key_pem)) => {
                        let files = TlsFiles {
                            cert_file: self.resolve(&cert),
                            key_file: self.resolve(&key),
                            cert_pem,
                            key_pem: crate::types::Secret::new(key_pem),
                        };
                        if let Err(e) = crate::net::tls::server_config(&files) {
                            self.issue("listener.tls_cert_file", e.to_string());
                        }
                        Some(files)
                    }
                    _ => None,
                }
            }
            (None, None) => {
                if !raw.allow_plaintext {
                    self.issue(
                        "listener.tls_cert_file",
                        "TLS is required: set tls_cert_file and tls_key_file (or allow_plaintext = true for local development)",
                    );
                }
                None
            }
            (Some(_), None) => {
                self.issue(
                    "listener.tls_key_file",
                    "tls_cert_file is set but tls_key_file is not",
                );
                None
            }
            (None, Some(_)) => {
                self.issue(
                    "listener.tls_cert_file",
                    "tls_key_file is set but tls_cert_file is not",
                );
                None
            }
        };
        let proxy = self.proxy_settings(&raw.proxy_protocol, &raw.proxy_protocol_trusted);
        Some(ListenerConfig {
            addr: addr.ok()?,
            tls,
            allow_plaintext: raw.allow_plaintext,
            handshake_timeout,
            max_connections: raw.max_connections,
            proxy,
        })
    }

    fn proxy_settings(
        &mut self,
        mode: &str,
        trusted: &[String],
    ) -> crate::net::proxy::ProxySettings {
        use crate::net::proxy::{ProxyMode, ProxySettings};
        let mode = match mode {
            "off" => ProxyMode::Off,
            "optional" => ProxyMode::Optional,
            "required" => ProxyMode::Required,
            other => {
                self.issue(
                    "listener.proxy_protocol",
                    format!("{other:?} is not one of \"off\", \"optional\", \"required\""),
                );
                ProxyMode::Off
            }
        };
        let mut nets = Vec::new();
        for (j, t) in trusted.iter().enumerate() {
            let parsed = t
                .parse::<ipnet::IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => nets.push(net),
                Err(_) => self.issue(
                    format!("listener.proxy_protocol_trusted[{j}]"),
                    format!("{t:?} is not a network such as \"10.0.0.0/16\" or an address"),
                ),
            }
        }
        if mode != ProxyMode::Off && trusted.is_empty() {
            self.issue(
                "listener.proxy_protocol_trusted",
                "list the load balancers' networks (e.g. the VPC subnets of the NLB); a PROXY header from anyone else is refused",
            );
        }
        ProxySettings {
            mode,
            trusted: nets,
        }
    }

    fn issuer(&mut self, i: usize, raw: RawIssuer) -> Option<IssuerSettings> {
        let p = format!("issuers[{i}]");
        let authority = raw.authority.trim_end_matches('/').to_owned();
        match reqwest::Url::parse(&authority) {
            Ok(url) => {
                let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
                    || url.host_str().is_some_and(|h| h.starts_with("127."));
                if url.scheme() != "https"
                    && !(url.scheme() == "http" && (loopback || raw.allow_http))
                {
                    self.issue(
                        format!("{p}.authority"),
                        "must be an https:// URL (http:// only for a loopback dev IdP)",
                    );
                }
            }
            Err(e) => self.issue(
                format!("{p}.authority"),
                format!("{authority:?} is not a URL: {e}"),
            ),
        }
        if raw.tenants.is_empty() {
            self.issue(
                format!("{p}.tenants"),
                "list at least one tenant id (GUID); any-tenant is never accepted",
            );
        }
        for (j, t) in raw.tenants.iter().enumerate() {
            if !is_canonical_guid(t) {
                self.issue(
                    format!("{p}.tenants[{j}]"),
                    format!("{t:?} is not a lower-case GUID"),
                );
            }
        }
        if raw.audiences.is_empty() {
            self.issue(
                format!("{p}.audiences"),
                "list the accepted audiences (api://<app> and/or the app's GUID)",
            );
        }
        for (j, a) in raw.audiences.iter().enumerate() {
            if a.trim().is_empty() {
                self.issue(format!("{p}.audiences[{j}]"), "an audience cannot be empty");
            }
        }
        let mut versions = Vec::new();
        for (j, v) in raw.accept_versions.iter().enumerate() {
            match v.as_str() {
                "1.0" => versions.push(TokenVersion::V1),
                "2.0" => versions.push(TokenVersion::V2),
                other => self.issue(
                    format!("{p}.accept_versions[{j}]"),
                    format!("{other:?} is not \"1.0\" or \"2.0\""),
                ),
            }
        }
        if versions.is_empty() {
            self.issue(
                format!("{p}.accept_versions"),
                "accept at least one of \"1.0\", \"2.0\"",
            );
        }
        Some(IssuerSettings {
            name: raw.name,
            authority,
            tenants: raw.tenants,
            accept_versions: versions,
            audiences: raw.audiences,
            required_scopes: raw.required_scopes,
            required_app_roles: raw.required_app_roles,
            leeway: self.at_most(
                &format!("{p}.leeway"),
                &raw.leeway,
                crate::auth::MAX_LEEWAY,
                false,
            ),
            jwks_refetch_floor: self.at_most(
                &format!("{p}.jwks_refetch_floor"),
                &raw.jwks_refetch_floor,
                crate::auth::MAX_REFETCH_FLOOR,
                false,
            ),
            jwks_refresh: self.at_most(
                &format!("{p}.jwks_refresh"),
                &raw.jwks_refresh,
                crate::auth::MAX_REFRESH,
                false,
            ),
            jwks_max_stale: self.at_most(
                &format!("{p}.jwks_max_stale"),
                &raw.jwks_max_stale,
                crate::auth::MAX_STALE,
                true,
            ),
            http_timeout: self.at_most(
                &format!("{p}.http_timeout"),
                &raw.http_timeout,
                crate::auth::MAX_HTTP_TIMEOUT,
                true,
            ),
            allow_http: raw.allow_http,
        })
    }

    fn identity(&mut self, raw: RawIdentity) -> IdentityConfig {
        if raw.user_claims.is_empty() {
            self.issue(
                "identity.user_claims",
                "list at least one claim, e.g. [\"upn\", \"preferred_username\"]",
            );
        }
        if raw.namespace.contains(':') {
            self.issue(
                "identity.namespace",
                "write the namespace without the colon, e.g. \"aad\"",
            );
        }
        let client_user = match raw.client_user.as_str() {
            "must_match" => ClientUserPolicy::MustMatch,
            "ignore" => ClientUserPolicy::Ignore,
            other => {
                self.issue(
                    "identity.client_user",
                    format!("{other:?} is not \"must_match\" or \"ignore\""),
                );
                ClientUserPolicy::MustMatch
            }
        };
        let groups_overage = match raw.groups_overage.as_str() {
            "refuse" => GroupsOverage::Refuse,
            "ignore_groups" => GroupsOverage::IgnoreGroups,
            other => {
                self.issue(
                    "identity.groups_overage",
                    format!("{other:?} is not \"refuse\" or \"ignore_groups\""),
                );
                GroupsOverage::Refuse
            }
        };
        if raw.session_vs_token != "keep" {
            self.issue(
                "identity.session_vs_token",
                "only \"keep\" is supported in this version",
            );
        }
        for (k, v) in raw.groups.iter().chain(raw.app_roles.iter()) {
            if v.is_empty() || v.contains(':') {
                self.issue(
                    format!("identity.groups.{k}"),
                    "role names must be non-empty and written without the namespace",
                );
            }
        }
        IdentityConfig {
            user_claims: raw.user_claims,
            namespace: raw.namespace,
            lowercase: raw.lowercase,
            client_user,
            groups_overage,
            groups: raw
                .groups
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            app_roles: raw.app_roles.into_iter().collect(),
        }
    }

    fn ca(&mut self, raw: RawCa) -> Option<std::sync::Arc<crate::ca::IdgateCa>> {
        let (cert, key) = match (raw.cert_file, raw.key_file) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => return None,
            (Some(_), None) => {
                self.issue("ca.key_file", "ca.cert_file is set but ca.key_file is not");
                return None;
            }
            (None, Some(_)) => {
                self.issue("ca.cert_file", "ca.key_file is set but ca.cert_file is not");
                return None;
            }
        };
        let cert_pem = self.read_file("ca.cert_file", &cert)?;
        let key_pem = self.read_file("ca.key_file", &key)?;
        let (Ok(cert_pem), Ok(key_pem)) = (String::from_utf8(cert_pem), String::from_utf8(key_pem))
        else {
            self.issue("ca.cert_file", "the CA files must be PEM text");
            return None;
        };
        match crate::ca::IdgateCa::from_pem(&cert_pem, &crate::types::Secret::new(key_pem)) {
            Ok(ca) => Some(std::sync::Arc::new(ca)),
            Err(e) => {
                let path = match e {
                    crate::ca::CaError::Key(_) => "ca.key_file",
                    crate::ca::CaError::Certificate(_)
                    | crate::ca::CaError::Issue(_)
                    | crate::ca::CaError::Write { .. } => "ca.cert_file",
                };
                self.issue(path, e.to_string());
                None
            }
        }
    }

    /// A secret from `*_file` or `*_env` (exactly one), or `None` with an issue recorded.
    fn required_secret(
        &mut self,
        path: &str,
        file: Option<&PathBuf>,
        env: Option<&String>,
        what: &str,
    ) -> Option<String> {
        if file.is_none() && env.is_none() {
            self.issue(
                format!("{path}_file"),
                format!("{what} needs exactly one of {path}_file, {path}_env (never the password itself)"),
            );
            return None;
        }
        self.secret(path, file, env).map(|s| s.expose().clone())
    }

    fn pool(
        &mut self,
        i: usize,
        raw: RawPool,
        ca: Option<&std::sync::Arc<crate::ca::IdgateCa>>,
        namespace: &str,
    ) -> Option<PoolConfig> {
        let p = format!("pools[{i}]");
        if raw.name.is_empty() {
            self.issue(format!("{p}.name"), "every pool needs a name");
        }
        let kind = match raw.kind.as_str() {
            "postgres" => PoolKind::Postgres,
            "redshift" => {
                if raw.backend_auth != "token" {
                    self.issue(
                        format!("{p}.backend_auth"),
                        "\"redshift\" pools log in with the client's token: set backend_auth = \"token\"",
                    );
                }
                PoolKind::Redshift
            }
            other => {
                self.issue(
                    format!("{p}.kind"),
                    format!("{other:?} is not \"postgres\" or \"redshift\""),
                );
                PoolKind::Postgres
            }
        };
        let backend_auth = match raw.backend_auth.as_str() {
            "trust" => Some(BackendAuth::Trust),
            "password" => {
                if raw.backend_password_file.is_none() && raw.backend_password_env.is_none() {
                    self.issue(
                        format!("{p}.backend_auth"),
                        "\"password\" needs exactly one of backend_password_file, backend_password_env (never the password itself)",
                    );
                    None
                } else {
                    self.required_secret(
                        &format!("{p}.backend_password"),
                        raw.backend_password_file.as_ref(),
                        raw.backend_password_env.as_ref(),
                        "\"password\"",
                    )
                    .map(|pw| BackendAuth::Password {
                        user: raw.backend_user.clone(),
                        password: crate::types::Secret::new(pw),
                    })
                }
            }
            "client_cert" => {
                let lifetime = self.duration(
                    &format!("{p}.client_cert_lifetime"),
                    &raw.client_cert_lifetime,
                );
                if lifetime < std::time::Duration::from_secs(1) {
                    self.issue(format!("{p}.client_cert_lifetime"), "must be at least 1s");
                }
                match ca {
                    Some(ca) => Some(BackendAuth::ClientCert {
                        ca: ca.clone(),
                        lifetime,
                    }),
                    None => {
                        self.issue(
                            format!("{p}.backend_auth"),
                            "\"client_cert\" needs idgate's CA: set [ca] cert_file and key_file (idgate ca init --dir DIR creates a development pair)",
                        );
                        None
                    }
                }
            }
            "token" => Some(BackendAuth::Token),
            other => {
                self.issue(
                    format!("{p}.backend_auth"),
                    format!(
                        "{other:?} is not \"client_cert\", \"token\", \"password\" or \"trust\""
                    ),
                );
                None
            }
        };
        let sends_credential = matches!(raw.backend_auth.as_str(), "client_cert" | "token");
        if raw.backend_user.is_some() && raw.backend_auth != "password" {
            self.issue(
                format!("{p}.backend_user"),
                "backend_user only applies to backend_auth = \"password\"",
            );
        }
        let tls_mode = raw.backend_tls.clone().unwrap_or_else(|| {
            if sends_credential {
                "verify-full".into()
            } else {
                "disable".into()
            }
        });
        if tls_mode == "disable" && sends_credential {
            self.issue(
                format!("{p}.backend_tls"),
                format!(
                    "backend_auth = {:?} sends a token or certificate and needs TLS: use \"verify-full\" (the default) or \"require\"",
                    raw.backend_auth
                ),
            );
        }
        let provisioning = match raw.provisioning.as_str() {
            "none" => None,
            "jit" => self.provisioning(&p, &raw, kind, namespace),
            other => {
                self.issue(
                    format!("{p}.provisioning"),
                    format!("{other:?} is not \"none\" or \"jit\""),
                );
                None
            }
        };
        if raw.provisioning != "jit"
            && (raw.admin_user.is_some()
                || raw.admin_password_file.is_some()
                || raw.admin_password_env.is_some())
        {
            self.issue(
                format!("{p}.admin_user"),
                "admin_user and admin_password_* only apply to provisioning = \"jit\"",
            );
        }
        let backend_tls = match tls_mode.as_str() {
            "disable" => BackendTls::Disable,
            "require" => BackendTls::Require,
            "verify-full" => BackendTls::VerifyFull {
                ca_pem: raw
                    .backend_ca_file
                    .as_ref()
                    .and_then(|f| self.read_file(&format!("{p}.backend_ca_file"), f)),
            },
            other => {
                self.issue(
                    format!("{p}.backend_tls"),
                    format!("{other:?} is not \"disable\", \"require\" or \"verify-full\""),
                );
                BackendTls::Disable
            }
        };
        if raw.targets.is_empty() {
            self.issue(
                format!("{p}.targets"),
                "list at least one target, e.g. { addr = \"10.0.1.10:5432\" }",
            );
        }
        let mut targets = Vec::new();
        for (j, t) in raw.targets.into_iter().enumerate() {
            match split_host_port(&t.addr) {
                Some((host, port)) => targets.push(TargetConfig {
                    host,
                    port,
                    addr: t.addr,
                    weight: t.weight,
                }),
                None => self.issue(
                    format!("{p}.targets[{j}].addr"),
                    format!("{:?} is not host:port", t.addr),
                ),
            }
        }
        let balance = match raw.balance.as_str() {
            "round_robin" => Balance::RoundRobin,
            "least_sessions" => Balance::LeastSessions,
            "weighted" => Balance::Weighted,
            other => {
                self.issue(
                    format!("{p}.balance"),
                    format!("{other:?} is not \"round_robin\", \"least_sessions\" or \"weighted\""),
                );
                Balance::RoundRobin
            }
        };
        let when_all_unhealthy = match raw.when_all_unhealthy.as_str() {
            "fail_closed" => AllUnhealthy::FailClosed,
            "fail_open" => AllUnhealthy::FailOpen,
            other => {
                self.issue(
                    format!("{p}.when_all_unhealthy"),
                    format!("{other:?} is not \"fail_closed\" or \"fail_open\""),
                );
                AllUnhealthy::FailClosed
            }
        };
        for (j, t) in targets.iter().enumerate() {
            if targets[..j].iter().any(|o| o.addr == t.addr) {
                self.issue(
                    format!("{p}.targets[{j}].addr"),
                    format!("{} is listed twice", t.addr),
                );
            }
        }
        Some(PoolConfig {
            name: raw.name,
            kind,
            backend_auth: backend_auth?,
            backend_tls,
            connect_timeout: self
                .positive_duration(&format!("{p}.connect_timeout"), &raw.connect_timeout),
            login_timeout: self
                .positive_duration(&format!("{p}.login_timeout"), &raw.login_timeout),
            balance,
            when_all_unhealthy,
            allowed_groups: raw.allowed_groups,
            allowed_app_roles: raw.allowed_app_roles,
            retry_budget: self.positive_duration(&format!("{p}.retry_budget"), &raw.retry_budget),
            targets,
            provisioning,
        })
    }

    fn provisioning(
        &mut self,
        p: &str,
        raw: &RawPool,
        kind: PoolKind,
        namespace: &str,
    ) -> Option<ProvisioningConfig> {
        if kind == PoolKind::Redshift {
            self.issue(
                format!("{p}.provisioning"),
                "Redshift creates native-IdP users and roles itself; \"jit\" is for postgres pools",
            );
        }
        if namespace.is_empty() {
            self.issue(
                format!("{p}.provisioning"),
                "\"jit\" only manages roles inside identity.namespace, which is empty",
            );
        }
        let Some(admin_user) = raw.admin_user.clone().filter(|u| !u.is_empty()) else {
            self.issue(
                format!("{p}.admin_user"),
                "provisioning = \"jit\" needs admin_user (a role with CREATEROLE, never a superuser)",
            );
            return None;
        };
        let admin_password = if raw.admin_password_file.is_none()
            && raw.admin_password_env.is_none()
            && raw.backend_auth == "client_cert"
        {
            None
        } else {
            Some(crate::types::Secret::new(self.required_secret(
                &format!("{p}.admin_password"),
                raw.admin_password_file.as_ref(),
                raw.admin_password_env.as_ref(),
                "provisioning = \"jit\"",
            )?))
        };
        Some(ProvisioningConfig {
            admin_user,
            admin_password,
            admin_database: raw.admin_database.clone(),
            namespace: namespace.to_owned(),
        })
    }
}

fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[listener]
addr = "127.0.0.1:0"
allow_plaintext = true

[[issuers]]
authority = "http://127.0.0.1:1"
tenants = ["00000000-0000-4000-8000-00000000c0de"]
audiences = ["api://idgate"]
required_scopes = ["jdbc_login"]

[identity.groups]
"0B6A9A3E-6F4A-4C1E-9A7E-0C5D1F7E2A11" = "analysts"

[identity.app_roles]
"db.read" = "readers"

[[pools]]
name = "main"
targets = [{ addr = "127.0.0.1:5432" }]
"#;

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = Config::from_toml(MINIMAL, "t", Path::new("."), &HashMap::new()).unwrap();
        assert_eq!(c.listener.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.identity.namespace, "aad");
        assert_eq!(
            c.identity.app_roles.get("db.read").map(String::as_str),
            Some("readers")
        );
        assert_eq!(
            c.identity
                .groups
                .get("0b6a9a3e-6f4a-4c1e-9a7e-0c5d1f7e2a11")
                .map(String::as_str),
            Some("analysts")
        );
        assert_eq!(c.pools[0].targets[0].port, 5432);
    }

    #[test]
    fn an_issuer_that_requires_no_scope_or_app_role_is_warned_about() {
        let c = Config::from_toml(MINIMAL, "t", Path::new("."), &HashMap::new()).unwrap();
        let open_warning = |c: &Config| {
            c.warnings()
                .iter()
                .any(|w| w.contains("no required_scopes"))
        };
        assert!(!open_warning(&c));
        let open = MINIMAL.replace("required_scopes = [\"jdbc_login\"]\n", "");
        let c = Config::from_toml(&open, "t", Path::new("."), &HashMap::new()).unwrap();
        assert!(open_warning(&c), "{:?}", c.warnings());
    }

    #[test]
    fn env_override_problems_name_the_variable() {
        let env = HashMap::from([(
            "IDGATE__LISTENER__MAX_CONNECTIONS".to_owned(),
            "abc".to_owned(),
        )]);
        let err = Config::from_toml(MINIMAL, "t", Path::new("."), &env).unwrap_err();
        assert_eq!(err.issues[0].path, "listener.max_connections");
        assert!(
            err.issues[0]
                .message
                .contains("environment variable IDGATE__LISTENER__MAX_CONNECTIONS"),
            "{err}"
        );
        let env = HashMap::from([(
            "IDGATE__LISTENER__MAX_CONNECTIONS".to_owned(),
            "0".to_owned(),
        )]);
        let err = Config::from_toml(MINIMAL, "t", Path::new("."), &env).unwrap_err();
        assert!(err
            .issues
            .iter()
            .any(|i| i.path == "listener.max_connections"
                && i.message.contains("IDGATE__LISTENER__MAX_CONNECTIONS")));
        let env = HashMap::from([("IDGATE__ISSUERS__0__LEEWAY".to_owned(), "5s".to_owned())]);
        let err = Config::from_toml(MINIMAL, "t", Path::new("."), &env).unwrap_err();
        assert_eq!(err.issues[0].path, "issuers[0].leeway");
        assert!(err.issues[0].message.contains("array of tables"), "{err}");
    }

    #[test]
    fn env_overrides_apply() {
        let env = HashMap::from([(
            "IDGATE__LISTENER__HANDSHAKE_TIMEOUT".to_owned(),
            "3s".to_owned(),
        )]);
        let c = Config::from_toml(MINIMAL, "t", Path::new("."), &env).unwrap();
        assert_eq!(c.listener.handshake_timeout, Duration::from_secs(3));
    }

    #[test]
    fn backend_auth_modes_defaults_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        crate::ca::IdgateCa::write_new(dir.path(), "test CA").unwrap();
        let base = MINIMAL.replace(
            "[[pools]]",
            "[ca]\ncert_file = \"ca.pem\"\nkey_file = \"ca-key.pem\"\n\n[[pools]]",
        );
        let good = format!(
            "{base}backend_auth = \"client_cert\"\nclient_cert_lifetime = \"10m\"\nprovisioning = \"jit\"\nadmin_user = \"idgate_admin\"\n\n[[pools]]\nname = \"rs\"\nkind = \"redshift\"\nbackend_auth = \"token\"\ntargets = [{{ addr = \"wg.example:5439\" }}]\n"
        );
        let c = Config::from_toml(&good, "t", dir.path(), &HashMap::new()).unwrap();
        assert!(matches!(
            c.pools[0].backend_auth,
            BackendAuth::ClientCert { lifetime, .. } if lifetime == Duration::from_secs(600)
        ));
        assert!(matches!(
            c.pools[0].backend_tls,
            BackendTls::VerifyFull { .. }
        ));
        let jit = c.pools[0].provisioning.as_ref().unwrap();
        assert!(jit.admin_password.is_none());
        assert_eq!(jit.namespace, "aad");
        assert!(matches!(c.pools[1].backend_auth, BackendAuth::Token));
        assert!(matches!(
            c.pools[1].backend_tls,
            BackendTls::VerifyFull { .. }
        ));
        assert!(c.warnings().is_empty());

        let trust = Config::from_toml(MINIMAL, "t", Path::new("."), &HashMap::new()).unwrap();
        assert!(matches!(trust.pools[0].backend_tls, BackendTls::Disable));
        assert!(trust.warnings()[0].contains("trust"));

        let bad = format!(
            "{}backend_auth = \"token\"\nbackend_tls = \"disable\"\nprovisioning = \"jit\"\n\n[[pools]]\nname = \"rs\"\nkind = \"redshift\"\ntargets = [{{ addr = \"wg.example:5439\" }}]\n\n[[pools]]\nname = \"cc\"\nbackend_auth = \"client_cert\"\ntargets = [{{ addr = \"db:5432\" }}]\n",
            MINIMAL
        );
        let err = Config::from_toml(&bad, "t", Path::new("."), &HashMap::new()).unwrap_err();
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "pools[0].backend_tls",
            "pools[0].admin_user",
            "pools[1].backend_auth",
            "pools[2].backend_auth",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn proxy_protocol_needs_trusted_networks() {
        use crate::net::proxy::ProxyMode;
        let on = MINIMAL.replace(
            "allow_plaintext = true",
            "allow_plaintext = true\nproxy_protocol = \"required\"\nproxy_protocol_trusted = [\"10.0.0.0/16\", \"192.0.2.7\"]",
        );
        let c = Config::from_toml(&on, "t", Path::new("."), &HashMap::new()).unwrap();
        assert_eq!(c.listener.proxy.mode, ProxyMode::Required);
        assert_eq!(c.listener.proxy.trusted.len(), 2);
        let bad = MINIMAL.replace(
            "allow_plaintext = true",
            "allow_plaintext = true\nproxy_protocol = \"sometimes\"\nproxy_protocol_trusted = [\"10.0.0.0/99\"]",
        );
        let err = Config::from_toml(&bad, "t", Path::new("."), &HashMap::new()).unwrap_err();
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        assert!(paths.contains(&"listener.proxy_protocol"), "{paths:?}");
        assert!(
            paths.contains(&"listener.proxy_protocol_trusted[0]"),
            "{paths:?}"
        );
        let untrusted = MINIMAL.replace(
            "allow_plaintext = true",
            "allow_plaintext = true\nproxy_protocol = \"optional\"",
        );
        let err = Config::from_toml(&untrusted, "t", Path::new("."), &HashMap::new()).unwrap_err();
        assert!(err
            .issues
            .iter()
            .any(|i| i.path == "listener.proxy_protocol_trusted"));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let bad = r#"
[listener]
addr = "nope"
handshake_timeout = "soon"
colour = "blue"

[[issuers]]
authority = "http://example.com"
tenants = ["ABC"]
audiences = []

[[pools]]
name = "a"
backend_auth = "password"
targets = [{ addr = "no-port" }]
"#;
        let err = Config::from_toml(bad, "t", Path::new("."), &HashMap::new()).unwrap_err();
        let zero = MINIMAL.replace(
            "allow_plaintext = true",
            "allow_plaintext = true\nhandshake_timeout = \"0s\"",
        );
        let zero_err = Config::from_toml(&zero, "t", Path::new("."), &HashMap::new()).unwrap_err();
        assert!(zero_err
            .issues
            .iter()
            .any(|i| i.path == "listener.handshake_timeout"));
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "listener.colour",
            "listener.addr",
            "listener.handshake_timeout",
            "listener.tls_cert_file",
            "issuers[0].authority",
            "issuers[0].tenants[0]",
            "issuers[0].audiences",
            "pools[0].backend_auth",
            "pools[0].targets[0].addr",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn issuer_timing_bounds_are_reported_at_load_with_their_paths() {
        let bad = MINIMAL.replace(
            "audiences = [\"api://idgate\"]",
            "audiences = [\"api://idgate\"]\nleeway = \"100years\"\nhttp_timeout = \"0s\"\n\
             jwks_max_stale = \"0s\"\njwks_refresh = \"30d\"",
        );
        let err = Config::from_toml(&bad, "t", Path::new("."), &HashMap::new()).unwrap_err();
        let issues: Vec<(&str, &str)> = err
            .issues
            .iter()
            .map(|i| (i.path.as_str(), i.message.as_str()))
            .collect();
        for (path, says) in [
            ("issuers[0].leeway", "at most 1h"),
            ("issuers[0].http_timeout", "greater than zero"),
            ("issuers[0].jwks_max_stale", "greater than zero"),
            ("issuers[0].jwks_refresh", "at most 7days"),
        ] {
            assert!(
                issues.iter().any(|(p, m)| *p == path && m.contains(says)),
                "{path}: {says} missing in {issues:?}"
            );
        }
    }
}
