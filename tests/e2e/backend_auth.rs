//! Issue 4: the backend login carries the person. `client_cert` against PostgreSQL configured
//! with `hostssl … cert`, JIT role provisioning, the `token` chain idgate A (redshift pool) →
//! idgate B → PostgreSQL, and upstream `verify-full`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use idgate::{
    ca::IdgateCa,
    config::{BackendAuth, BackendTls, Config, PoolKind, ProvisioningConfig, TargetConfig},
    devcerts::DevCa,
    devidp::TokenSpec,
    pgcluster::{ClusterSettings, ClusterTls, PgCluster},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::{
    clients::{run_python, which},
    harness::{
        read_events, sqlstate, start_cluster, Env, EnvOptions, ALICE, ANALYSTS_GROUP, BOB,
        SETUP_SQL,
    },
    raw,
};

/// A PostgreSQL cluster that accepts only certificate logins over TLS from 127.0.0.1, trusting
/// idgate's CA (`ssl_ca_file`).
struct CertBackend {
    cluster: PgCluster,
    ca: Arc<IdgateCa>,
    /// CA of the server certificate (what idgate's backend_ca_file holds).
    server_ca_pem: String,
}

async fn cert_backend(name: &str, server_names: &[&str], setup: &str) -> CertBackend {
    let ca = Arc::new(IdgateCa::generate("idgate client CA").unwrap());
    let server_ca = DevCa::new("backend server CA").unwrap();
    let server = server_ca.server_cert(server_names).unwrap();
    let mut settings = ClusterSettings::new(name);
    settings.bindir = std::env::var_os("IDGATE_PG_BINDIR").map(PathBuf::from);
    settings.hba = vec!["hostssl all all 127.0.0.1/32 cert".into()];
    settings.ssl = Some(ClusterTls {
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
        ca_pem: Some(ca.cert_pem().to_owned()),
    });
    let cluster = PgCluster::start(settings)
        .await
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    cluster.exec("CREATE DATABASE dev").await.unwrap();
    cluster.exec_in("dev", setup).await.unwrap();
    CertBackend {
        cluster,
        ca,
        server_ca_pem: server_ca.cert_pem(),
    }
}

fn target(host: &str, port: u16) -> TargetConfig {
    TargetConfig {
        addr: format!("{host}:{port}"),
        host: host.into(),
        port,
        weight: 1,
    }
}

/// What a `client_cert` pool needs to reach a [`CertBackend`] (owned, for a `tweak`).
#[derive(Clone)]
struct CertPool {
    ca: Arc<IdgateCa>,
    port: u16,
    server_ca_pem: String,
    lifetime: Duration,
    provisioning: Option<ProvisioningConfig>,
}

impl CertPool {
    fn new(backend: &CertBackend, lifetime: Duration) -> Self {
        Self {
            ca: backend.ca.clone(),
            port: backend.cluster.port(),
            server_ca_pem: backend.server_ca_pem.clone(),
            lifetime,
            provisioning: None,
        }
    }

    /// Point the one pool at the backend with `client_cert`, verify-full against its server CA.
    fn apply(self, cfg: &mut Config) {
        let pool = &mut cfg.pools[0];
        pool.targets = vec![target("127.0.0.1", self.port)];
        pool.backend_auth = BackendAuth::ClientCert {
            ca: self.ca,
            lifetime: self.lifetime,
        };
        pool.backend_tls = BackendTls::VerifyFull {
            ca_pem: Some(self.server_ca_pem.into_bytes()),
        };
        pool.provisioning = self.provisioning;
    }

    async fn env(self) -> Env {
        Env::with(EnvOptions {
            clusters: 0,
            tweak: Box::new(move |cfg, _| self.apply(cfg)),
            ..EnvOptions::default()
        })
        .await
    }
}

async fn cert_env(backend: &CertBackend, lifetime: Duration) -> Env {
    CertPool::new(backend, lifetime).env().await
}

/// Another in-process gateway (same TLS files and issuer as `env`), with its own audit file.
struct Gateway {
    port: u16,
    audit_path: PathBuf,
    shutdown: CancellationToken,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn spawn_gateway(env: &Env, mut config: Config, label: &str) -> Gateway {
    let audit_path = env.dir.path().join(format!("audit-{label}.jsonl"));
    config.audit.file_path = Some(audit_path.clone());
    config.audit.spool_dir = env.dir.path().join(format!("spool-{label}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    tokio::spawn(idgate::run(listener, config, shutdown.clone()));
    Gateway {
        port,
        audit_path,
        shutdown,
    }
}

/// idgate A's configuration: a `redshift` pool with `backend_auth = "token"` in front of `port`.
fn redshift_pool_in_front_of(env: &Env, port: u16) -> Config {
    let mut config = env.config.clone();
    let pool = &mut config.pools[0];
    pool.name = "redshift-wg".into();
    pool.kind = PoolKind::Redshift;
    pool.backend_auth = BackendAuth::Token;
    pool.backend_tls = BackendTls::VerifyFull {
        ca_pem: Some(env.ca_pem.clone().into_bytes()),
    };
    pool.targets = vec![target("localhost", port)];
    config
}

async fn wait_events(
    path: &std::path::Path,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..200 {
        if let Some(e) = read_events(path).into_iter().find(|e| pred(e)) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "no matching audit event in {}: {:#?}",
        path.display(),
        read_events(path)
    );
}

async fn psql(env: &Env, port: u16, user: &str, sql: &str) -> Option<(bool, String, String)> {
    let Some(psql) = which("psql") else {
        crate::harness::missing_tool("psql");
        return None;
    };
    let token = env.token(user);
    let out = tokio::process::Command::new(psql)
        .env("PGPASSWORD", token)
        .env("PGSSLROOTCERT", &env.ca_path)
        .env("PGCONNECT_TIMEOUT", "20")
        .arg(format!(
            "host=localhost port={port} dbname=dev user={user} sslmode=verify-full"
        ))
        .args(["-X", "-A", "-t", "-c", sql])
        .output()
        .await
        .unwrap();
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn redshift_args(env: &Env, port: u16, token: &str, query: &str) -> Vec<String> {
    let token_file = env.token_file(token);
    [
        "--host",
        "localhost",
        "--port",
        &port.to_string(),
        "--database",
        "dev",
        "--mode",
        "idp_token",
        "--token-file",
        &token_file.display().to_string(),
        "--sslmode",
        "verify-full",
        "--ca-file",
        &env.ca_path.display().to_string(),
        "--query",
        query,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cert_logs_in_as_the_person_and_grants_decide() {
    let backend = cert_backend("cc-grants", &["localhost", "127.0.0.1"], SETUP_SQL).await;
    let env = cert_env(&backend, Duration::from_secs(3600)).await;

    let alice = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    let row = alice
        .query_one(
            "SELECT current_user::text, session_user::text, count(*), \
             (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) FROM demo",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "aad:alice@contoso.example");
    assert_eq!(row.get::<_, String>(1), "aad:alice@contoso.example");
    assert_eq!(row.get::<_, i64>(2), 2);
    assert!(row.get::<_, bool>(3), "the backend session must be TLS");
    let users = backend
        .cluster
        .query_in(
            "dev",
            "SELECT usename FROM pg_stat_activity WHERE usename LIKE 'aad:%'",
        )
        .await
        .unwrap();
    assert!(users
        .iter()
        .any(|r| r[0].as_deref() == Some("aad:alice@contoso.example")));

    let bob = env.pg_connect(Some(BOB), &env.token(BOB)).await.unwrap();
    let err = bob.query("SELECT id FROM demo", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");

    // psql, token as PGPASSWORD.
    if let Some((ok, out, err)) = psql(
        &env,
        env.port(),
        ALICE,
        "SELECT current_user, note FROM demo ORDER BY id",
    )
    .await
    {
        assert!(ok, "psql: {err}");
        assert_eq!(
            out.trim(),
            "aad:alice@contoso.example|one\naad:alice@contoso.example|two"
        );
    }
    if let Some((ok, _, err)) = psql(&env, env.port(), BOB, "SELECT note FROM demo").await {
        assert!(!ok);
        assert!(err.contains("permission denied"), "{err}");
    }

    // The Python Redshift driver (native IdP exchange on the client side).
    let args = redshift_args(
        &env,
        env.port(),
        &env.token(ALICE),
        "SELECT current_user, session_user, note FROM demo ORDER BY id",
    );
    if let Some((ok, out, err)) =
        tokio::task::block_in_place(|| run_python(&env, "rs_connect.py", &args))
    {
        assert!(ok, "redshift_connector: {err}");
        let rows: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(rows[0][0], "aad:alice@contoso.example");
        assert_eq!(rows[0][1], "aad:alice@contoso.example");
        assert_eq!(rows[1][2], "two");
    }
    let args = redshift_args(&env, env.port(), &env.token(BOB), "SELECT note FROM demo");
    if let Some((ok, _, err)) =
        tokio::task::block_in_place(|| run_python(&env, "rs_connect.py", &args))
    {
        assert!(!ok);
        assert!(err.contains("permission denied"), "{err}");
    }
}

/// Log in to the gateway on `port` as `user` and return the first column of `sql`'s one row.
async fn scalar_at<T>(env: &Env, port: u16, user: &str, sql: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    env.pg_connect_port(port, Some(user), &env.token(user), "dev")
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

async fn client_serial(env: &Env, user: &str) -> String {
    let sql = "SELECT client_serial::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    scalar_at(env, env.port(), user, sql).await
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cert_cache_mints_one_certificate_per_person() {
    let backend = cert_backend("cc-cache", &["localhost", "127.0.0.1"], SETUP_SQL).await;
    let env = cert_env(&backend, Duration::from_secs(3600)).await;
    let first = client_serial(&env, ALICE).await;
    for _ in 1..100 {
        assert_eq!(client_serial(&env, ALICE).await, first);
    }
    // Another person gets their own certificate.
    assert_ne!(client_serial(&env, BOB).await, first);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cert_expired_certificate_is_replaced() {
    let backend = cert_backend("cc-expiry", &["localhost", "127.0.0.1"], SETUP_SQL).await;
    let env = cert_env(&backend, Duration::from_secs(3)).await;
    let first = client_serial(&env, ALICE).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // The first certificate has expired; a login still works, with a new one.
    let second = client_serial(&env, ALICE).await;
    assert_ne!(first, second);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_verify_full_refuses_a_backend_certificate_that_does_not_match() {
    // The server certificate names only "localhost" (no IP address).
    let backend = cert_backend("cc-verify", &["localhost"], SETUP_SQL).await;
    let env = cert_env(&backend, Duration::from_secs(3600)).await;
    // Wrong host name: the pool's target is 127.0.0.1.
    let err = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err}");
    let failed = env
        .wait_event(|e| e["kind"] == "backend_login_failed")
        .await;
    assert_eq!(failed["reason"], "backend_tls_failed");

    // Right name, untrusted CA.
    let mut untrusted = env.config.clone();
    CertPool::new(&backend, Duration::from_secs(3600)).apply(&mut untrusted);
    untrusted.pools[0].targets = vec![target("localhost", backend.cluster.port())];
    untrusted.pools[0].backend_tls = BackendTls::VerifyFull {
        ca_pem: Some(env.ca_pem.clone().into_bytes()),
    };
    let gw = spawn_gateway(&env, untrusted, "untrusted").await;
    let err = env
        .pg_connect_port(gw.port, Some(ALICE), &env.token(ALICE), "dev")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err}");

    // Control: right name and CA.
    let mut good = env.config.clone();
    CertPool::new(&backend, Duration::from_secs(3600)).apply(&mut good);
    good.pools[0].targets = vec![target("localhost", backend.cluster.port())];
    let gw = spawn_gateway(&env, good, "good").await;
    let one: i32 = scalar_at(&env, gw.port, ALICE, "SELECT 1").await;
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_require_encrypts_without_verifying_and_warns() {
    // The server certificate names only "localhost"; the target is 127.0.0.1 (verify-full
    // refuses it, see above).
    let backend = cert_backend("cc-require", &["localhost"], SETUP_SQL).await;
    let env = cert_env(&backend, Duration::from_secs(3600)).await;
    let mut require = env.config.clone();
    require.pools[0].backend_tls = BackendTls::Require;
    let warnings = require.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("backend_tls = \"require\" does not verify")),
        "{warnings:?}"
    );
    let gw = spawn_gateway(&env, require.clone(), "require").await;
    // Logged in over TLS (the server takes only `hostssl … cert`), as the person.
    let ssl: bool = scalar_at(
        &env,
        gw.port,
        ALICE,
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    assert!(ssl);
    let who: String = scalar_at(&env, gw.port, ALICE, "SELECT session_user::text").await;
    assert_eq!(who, "aad:alice@contoso.example");

    // `require` against a server without TLS: refused, 08006, audited as a TLS refusal.
    let plain = start_cluster("require-plain", vec![]).await;
    require.pools[0].targets = vec![target("127.0.0.1", plain.port())];
    let gw = spawn_gateway(&env, require, "require-plain").await;
    let err = env
        .pg_connect_port(gw.port, Some(ALICE), &env.token(ALICE), "dev")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err}");
    let failed = wait_events(&gw.audit_path, |e| e["kind"] == "backend_login_failed").await;
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("backend_tls")),
        "{failed}"
    );
}

const JIT_SETUP: &str = r#"
CREATE ROLE idgate_admin LOGIN CREATEROLE;
CREATE ROLE reporting NOLOGIN;
CREATE ROLE "aad:analysts" NOLOGIN;
CREATE ROLE "aad:stale" NOLOGIN;
CREATE TABLE sales (id int);
INSERT INTO sales VALUES (1), (2), (3);
GRANT SELECT ON sales TO "aad:analysts";
"#;

async fn jit_env(backend: &CertBackend) -> Env {
    jit_env_with(backend, |_| {}).await
}

/// [`jit_env`], with a further change to the configuration.
async fn jit_env_with(
    backend: &CertBackend,
    tweak: impl FnOnce(&mut Config) + Send + 'static,
) -> Env {
    let mut pool = CertPool::new(backend, Duration::from_secs(3600));
    // No password: the admin logs in with a certificate, like everyone else.
    pool.provisioning = Some(ProvisioningConfig {
        admin_user: "idgate_admin".into(),
        admin_password: None,
        admin_database: "dev".into(),
        namespace: "aad".into(),
    });
    Env::with(EnvOptions {
        clusters: 0,
        tweak: Box::new(move |cfg, _| {
            pool.apply(cfg);
            tweak(cfg);
        }),
        ..EnvOptions::default()
    })
    .await
}

/// The session reads the three `sales` rows, and `role` is a member of `aad:analysts` alone.
async fn reads_sales_through_analysts_only(
    client: &tokio_postgres::Client,
    cluster: &PgCluster,
    role: &str,
) {
    let n: i64 = client
        .query_one("SELECT count(*) FROM sales", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    assert_eq!(memberships(cluster, role).await, ["aad:analysts"]);
}

async fn memberships(cluster: &PgCluster, user: &str) -> Vec<String> {
    let rows = cluster
        .query_in(
            "dev",
            &format!(
                "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid \
                 JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = '{user}' ORDER BY 1"
            ),
        )
        .await
        .unwrap();
    rows.into_iter().filter_map(|r| r[0].clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn jit_creates_the_role_and_keeps_group_membership_in_step() {
    let backend = cert_backend("jit", &["localhost", "127.0.0.1"], JIT_SETUP).await;
    let env = jit_env(&backend).await;
    let carol = "carol@contoso.example";
    let role = "aad:carol@contoso.example";

    // First login with group G = analysts: the role is created and joins aad:analysts.
    let token = env
        .idp
        .mint(&TokenSpec::user(carol).groups(&[ANALYSTS_GROUP]));
    let client = env.pg_connect(Some(carol), &token).await.unwrap();
    let row = client
        .query_one("SELECT current_user::text, count(*) FROM sales", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), role);
    assert_eq!(row.get::<_, i64>(1), 3);
    drop(client);
    let provisioned = env.wait_event(|e| e["kind"] == "roles_provisioned").await;
    let detail = provisioned["detail"].as_str().unwrap();
    assert!(
        detail.contains("created login role") && detail.contains("aad:analysts"),
        "{detail}"
    );
    let attrs = backend
        .cluster
        .query_in(
            "dev",
            &format!("SELECT rolsuper, rolcreaterole, rolcanlogin FROM pg_roles WHERE rolname = '{role}'"),
        )
        .await
        .unwrap();
    assert_eq!(
        attrs[0],
        [Some("f".into()), Some("f".into()), Some("t".into())]
    );

    // A DBA adds a role outside the namespace and a stale namespace role.
    backend
        .cluster
        .exec_in(
            "dev",
            &format!(r#"GRANT reporting TO "{role}"; GRANT "aad:stale" TO "{role}";"#),
        )
        .await
        .unwrap();

    // A later token without G: membership of aad:analysts and aad:stale is revoked; reporting stays.
    let client = env
        .pg_connect(Some(carol), &env.token(carol))
        .await
        .unwrap();
    let err = client
        .query("SELECT count(*) FROM sales", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    assert_eq!(memberships(&backend.cluster, role).await, ["reporting"]);
    let reporting = backend
        .cluster
        .query_in(
            "dev",
            "SELECT rolsuper, rolcanlogin FROM pg_roles WHERE rolname = 'reporting'",
        )
        .await
        .unwrap();
    assert_eq!(reporting[0], [Some("f".into()), Some("f".into())]);

    // With G again, then without G again, within minutes: each change is applied, although a
    // run for the same role set was done moments ago.
    for (groups, can_read) in [
        (&[ANALYSTS_GROUP][..], true),
        (&[][..], false),
        (&[ANALYSTS_GROUP][..], true),
    ] {
        let token = env.idp.mint(&TokenSpec::user(carol).groups(groups));
        let client = env.pg_connect(Some(carol), &token).await.unwrap();
        let read = client.query("SELECT count(*) FROM sales", &[]).await;
        assert_eq!(read.is_ok(), can_read, "groups {groups:?}: {read:?}");
    }
}

/// Namespace roles a DBA gave privileges to, directly or through another role.
const PRIVILEGED_SETUP: &str = r#"
CREATE ROLE "aad:files" NOLOGIN;
GRANT pg_read_server_files TO "aad:files";
CREATE ROLE builders NOLOGIN CREATEDB;
CREATE ROLE "aad:builders" NOLOGIN;
GRANT builders TO "aad:builders";
CREATE ROLE "aad:rls" NOLOGIN BYPASSRLS;
CREATE ROLE svc_etl LOGIN;
CREATE ROLE "aad:etl" NOLOGIN;
GRANT svc_etl TO "aad:etl";
"#;

#[tokio::test(flavor = "multi_thread")]
async fn jit_never_grants_a_namespace_role_that_carries_privileges() {
    let setup = format!("{JIT_SETUP}{PRIVILEGED_SETUP}");
    let backend = cert_backend("jit-privileged", &["localhost", "127.0.0.1"], &setup).await;
    const GROUPS: [(&str, &str); 4] = [
        ("6f1c0000-0000-4000-8000-0000000f11e5", "files"),
        ("6f1c0000-0000-4000-8000-0000000b1d25", "builders"),
        ("6f1c0000-0000-4000-8000-000000000215", "rls"),
        ("6f1c0000-0000-4000-8000-0000000e71e7", "etl"),
    ];
    let env = jit_env_with(&backend, |cfg| {
        for (id, role) in GROUPS {
            cfg.identity.groups.insert(id.into(), role.into());
        }
    })
    .await;
    let dave = "dave@contoso.example";
    let role = "aad:dave@contoso.example";
    let mut groups: Vec<&str> = GROUPS.iter().map(|(id, _)| *id).collect();
    groups.push(ANALYSTS_GROUP);
    let token = env.idp.mint(&TokenSpec::user(dave).groups(&groups));
    let client = env.pg_connect(Some(dave), &token).await.unwrap();
    // The harmless namespace role is granted and works; the four others are not granted.
    reads_sales_through_analysts_only(&client, &backend.cluster, role).await;
    let err = client
        .query("SELECT pg_read_file('PG_VERSION')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    let provisioned = env.wait_event(|e| e["kind"] == "roles_provisioned").await;
    let detail = provisioned["detail"].as_str().unwrap();
    for refused in ["aad:files", "aad:builders", "aad:rls", "aad:etl"] {
        assert!(
            detail.contains("not granted") && detail.contains(refused),
            "{refused}: {detail}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jit_revokes_nothing_when_the_token_cannot_list_the_groups() {
    let backend = cert_backend("jit-overage", &["localhost", "127.0.0.1"], JIT_SETUP).await;
    let env = jit_env_with(&backend, |cfg| {
        cfg.identity.groups_overage = idgate::config::GroupsOverage::IgnoreGroups
    })
    .await;
    let erin = "erin@contoso.example";
    let role = "aad:erin@contoso.example";
    let token = env
        .idp
        .mint(&TokenSpec::user(erin).groups(&[ANALYSTS_GROUP]));
    drop(env.pg_connect(Some(erin), &token).await.unwrap());
    assert_eq!(memberships(&backend.cluster, role).await, ["aad:analysts"]);
    // Too many groups for the token: "groups unknown", not "no groups".
    let overage = env
        .idp
        .mint(&TokenSpec::user(erin).claim("_claim_names", serde_json::json!({"groups": "src1"})));
    let client = env.pg_connect(Some(erin), &overage).await.unwrap();
    reads_sales_through_analysts_only(&client, &backend.cluster, role).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jit_concurrent_first_logins_of_one_person_all_succeed() {
    let backend = cert_backend("jit-race", &["localhost", "127.0.0.1"], JIT_SETUP).await;
    let env = jit_env(&backend).await;
    // A second replica provisioning against the same database.
    let replica = spawn_gateway(&env, env.config.clone(), "replica").await;
    let dave = "dave@contoso.example";
    let env = Arc::new(env);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let env = env.clone();
            let port = if i % 2 == 0 { env.port() } else { replica.port };
            tokio::spawn(async move {
                let token = env
                    .idp
                    .mint(&TokenSpec::user(dave).groups(&[ANALYSTS_GROUP]));
                let client = env.pg_connect_port(port, Some(dave), &token, "dev").await?;
                let n: i64 = client
                    .query_one("SELECT count(*) FROM sales", &[])
                    .await?
                    .get(0);
                Ok::<_, tokio_postgres::Error>(n)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 3);
    }
    assert_eq!(
        memberships(&backend.cluster, "aad:dave@contoso.example").await,
        ["aad:analysts"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_chain_redshift_pool_through_a_second_idgate() {
    // B: an ordinary idgate in front of PostgreSQL; A: a redshift pool with backend_auth = token.
    let env = Env::start().await;
    let a = spawn_gateway(&env, redshift_pool_in_front_of(&env, env.port()), "a").await;

    let args = redshift_args(
        &env,
        a.port,
        &env.token(ALICE),
        "SELECT current_user, note FROM demo ORDER BY id",
    );
    if let Some((ok, out, err)) =
        tokio::task::block_in_place(|| run_python(&env, "rs_connect.py", &args))
    {
        assert!(ok, "redshift_connector through A and B: {err}");
        let rows: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            rows,
            serde_json::json!([
                ["aad:alice@contoso.example", "one"],
                ["aad:alice@contoso.example", "two"]
            ])
        );
        // B saw the native IdP exchange and the driver's Redshift keys, never plugin_name.
        let at_b = env.wait_event(|e| e["kind"] == "auth_succeeded").await;
        assert_eq!(at_b["auth_method"], "redshift_idp");
        assert!(at_b["driver_version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Redshift Python Driver"));
        assert!(at_b.get("plugin_name").is_none(), "{at_b}");
        // The driver's protocol version travelled A → B untouched (redshift_connector 2.2.0
        // asks for 2, BINARY).
        let at_a_auth = wait_events(&a.audit_path, |e| e["kind"] == "auth_succeeded").await;
        assert_eq!(at_a_auth["client_protocol_version"], "2", "{at_a_auth}");
        assert_eq!(at_b["client_protocol_version"], "2", "{at_b}");
        let at_a = wait_events(&a.audit_path, |e| e["kind"] == "session_routed").await;
        assert_eq!(at_a["pool"], "redshift-wg");
    }

    // tokio-postgres (token as password to A) also goes through; A uses code 14 upstream.
    let who: String = scalar_at(&env, a.port, ALICE, "SELECT session_user::text").await;
    assert_eq!(who, "aad:alice@contoso.example");

    // A postgres pool with backend_auth = token sends the token as the password.
    let mut as_password = redshift_pool_in_front_of(&env, env.port());
    as_password.pools[0].kind = PoolKind::Postgres;
    let p = spawn_gateway(&env, as_password, "p").await;
    let n: i64 = scalar_at(&env, p.port, ALICE, "SELECT count(*) FROM demo").await;
    assert_eq!(n, 2);

    // B2 accepts another audience only: it refuses the token, and A's client sees 28000.
    let mut b2_config = env.config.clone();
    b2_config.issuers[0].audiences = vec!["api://someone-else".into()];
    let b2 = spawn_gateway(&env, b2_config, "b2").await;
    let a2 = spawn_gateway(&env, redshift_pool_in_front_of(&env, b2.port), "a2").await;
    let err = env
        .pg_connect_port(a2.port, Some(ALICE), &env.token(ALICE), "dev")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "28000", "{err}");
    let refused = wait_events(&b2.audit_path, |e| e["kind"] == "auth_failed").await;
    assert_eq!(refused["reason"], "audience_mismatch");
    let args = redshift_args(&env, a2.port, &env.token(ALICE), "SELECT 1");
    if let Some((ok, _, err)) =
        tokio::task::block_in_place(|| run_python(&env, "rs_connect.py", &args))
    {
        assert!(!ok);
        assert!(err.contains("28000"), "{err}");
    }
}

/// A Redshift stand-in that speaks just the login: records the startup keys, asks for code 14,
/// checks the `'i'` token, and sends Redshift's ParameterStatus set.
async fn fake_redshift(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    expect_token: String,
) -> Vec<(String, String)> {
    // idgate's health checker also connects (TCP only) and closes at once: skip those.
    let mut tcp = loop {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut ssl = [0u8; 8];
        if tcp.read_exact(&mut ssl).await.is_ok() {
            assert_eq!(ssl, raw::SSL_REQUEST);
            break tcp;
        }
    };
    tcp.write_all(b"S").await.unwrap();
    let mut tls = acceptor.accept(tcp).await.unwrap();
    let len = tls.read_u32().await.unwrap() as usize;
    let mut body = vec![0u8; len - 4];
    tls.read_exact(&mut body).await.unwrap();
    let fields: Vec<String> = body[4..]
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let pairs: Vec<(String, String)> = fields
        .chunks(2)
        .filter(|c| c.len() == 2 && !c[0].is_empty())
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect();
    tls.write_all(&raw::message(b'R', &14i32.to_be_bytes()))
        .await
        .unwrap();
    let (tag, token) = raw::read_msg(&mut tls).await.unwrap();
    assert_eq!(tag, b'i');
    assert_eq!(String::from_utf8(token).unwrap(), expect_token);
    let mut out = raw::message(b'R', &0i32.to_be_bytes());
    for (k, v) in [
        ("server_version", "8.0.2"),
        ("server_protocol_version", "2"),
        ("datashare_enabled", "off"),
        ("driver_token", "6c1f0e9a-3f7d-4c4e-9a1e-2d5b7c8e9f01"),
    ] {
        out.extend(raw::message(b'S', format!("{k}\0{v}\0").as_bytes()));
    }
    out.extend(raw::message(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]));
    out.extend(raw::message(b'Z', b"I"));
    tls.write_all(&out).await.unwrap();
    tls.flush().await.unwrap();
    let _ = raw::read_msg(&mut tls).await;
    pairs
}

#[tokio::test(flavor = "multi_thread")]
async fn redshift_pool_forwards_startup_keys_and_parameter_status_untouched() {
    let env = Env::start().await;
    let upstream_ca = DevCa::new("workgroup CA").unwrap();
    let cert = upstream_ca.server_cert(&["localhost"]).unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        idgate::net::tls::parse_certs(cert.cert_pem.as_bytes(), "c").unwrap(),
        <rustls::pki_types::PrivateKeyDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            cert.key_pem.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let token = env.token(ALICE);
    let upstream = tokio::spawn(fake_redshift(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
        token.clone(),
    ));
    let mut config = redshift_pool_in_front_of(&env, port);
    config.pools[0].backend_tls = BackendTls::VerifyFull {
        ca_pem: Some(upstream_ca.cert_pem().into_bytes()),
    };
    let a = spawn_gateway(&env, config, "a").await;

    let mut s = raw::tls_connect(
        format!("127.0.0.1:{}", a.port).parse().unwrap(),
        env.client_tls(false),
    )
    .await;
    s.write_all(&raw::startup(
        &[
            ("user", ""),
            ("database", "dev"),
            ("application_name", "__main__"),
            ("client_protocol_version", "2"),
            ("driver_version", "Redshift Python Driver 2.2.0"),
            ("os_version", "Linux-test"),
            ("driver_discovery_version", "1"),
            (
                "plugin_name",
                "redshift_connector.plugin.IdpTokenAuthPlugin",
            ),
            ("idp_type", "AwsIdc"),
            ("identity_namespace", "aad"),
            ("token_type", "EXT_JWT"),
        ],
        0,
    ))
    .await
    .unwrap();
    let (tag, body) = raw::read_msg(&mut s).await.unwrap();
    assert_eq!((tag, raw::auth_code(&body)), (b'R', 14));
    s.write_all(&raw::message(b'i', token.as_bytes()))
        .await
        .unwrap();
    let messages = raw::read_until_ready(&mut s).await;
    let statuses: Vec<(String, String)> = messages
        .iter()
        .filter(|(t, _)| *t == b'S')
        .map(|(_, b)| {
            let mut parts = b.split(|c| *c == 0);
            let k = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            let v = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            (k, v)
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("server_version".into(), "8.0.2".into()),
            ("server_protocol_version".into(), "2".into()),
            ("datashare_enabled".into(), "off".into()),
            (
                "driver_token".into(),
                "6c1f0e9a-3f7d-4c4e-9a1e-2d5b7c8e9f01".into()
            ),
        ]
    );
    s.write_all(&raw::message(b'X', &[])).await.unwrap();
    let startup = upstream.await.unwrap();
    let keys: Vec<&str> = startup.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "database",
            "application_name",
            "client_protocol_version",
            "driver_version",
            "os_version",
            "driver_discovery_version",
            "idp_type"
        ]
    );
    assert!(startup.contains(&("client_protocol_version".into(), "2".into())));
    assert!(startup.contains(&("idp_type".into(), "AzureAD".into())));
}
