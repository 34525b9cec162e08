//! Real clients end to end, each running a query that returns data through idgate, and
//! authorization passing through to PostgreSQL's own GRANTs.

use std::process::Command;

use crate::harness::{missing_tool, python, repo_root, sqlstate, Env, ALICE, BOB};

#[tokio::test]
async fn tokio_postgres_reads_rows_as_the_mapped_user() {
    let env = Env::start().await;
    let client = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT current_user::text, session_user::text, count(*) FROM demo",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "aad:alice@contoso.example");
    assert_eq!(rows[0].get::<_, String>(1), "aad:alice@contoso.example");
    assert_eq!(rows[0].get::<_, i64>(2), 2);
    // The backend sees the person, not a service account.
    let backend_users = env.clusters[0]
        .query_in(
            "dev",
            "SELECT usename FROM pg_stat_activity WHERE usename LIKE 'aad:%'",
        )
        .await
        .unwrap();
    assert!(backend_users
        .iter()
        .any(|r| r[0].as_deref() == Some("aad:alice@contoso.example")));
    drop(client);
    let routed = env.wait_event(|e| e["kind"] == "session_routed").await;
    assert_eq!(routed["db_user"], "aad:alice@contoso.example");
    assert_eq!(routed["pool"], "main");
    assert_eq!(routed["tenant"], crate::harness::TENANT);
    assert!(routed["object_id"].as_str().is_some_and(|s| s.len() == 36));
    assert!(routed["token_id"].as_str().is_some());
}

#[tokio::test]
async fn a_token_pasted_into_a_startup_setting_is_never_audited_or_echoed() {
    let env = Env::start().await;
    let token = env.token(ALICE);
    let signature = token.rsplit('.').next().unwrap().to_owned();
    // PostgreSQL itself quotes the bad value back ("invalid value for parameter …").
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .port(env.port())
        .dbname("dev")
        .user(ALICE)
        .password(&token)
        .options(format!("-c DateStyle={token}"))
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*env.client_tls(false)).clone());
    let err = cfg
        .connect(tls)
        .await
        .err()
        .expect("DateStyle=<token> is refused");
    let message = err.as_db_error().map(|d| d.message().to_owned()).unwrap();
    assert!(!message.contains(&signature), "{message}");
    assert!(message.contains("[redacted token]"), "{message}");
    let failed = env
        .wait_event(|e| e["kind"] == "backend_login_failed")
        .await;
    assert!(failed["detail"]
        .as_str()
        .unwrap()
        .contains("[redacted token]"));
    // Nothing in the audit file holds the token's signature.
    let audit = std::fs::read_to_string(&env.audit_path).unwrap();
    assert!(!audit.contains(&signature));
}

#[tokio::test]
async fn a_token_read_from_a_file_with_a_trailing_newline_works() {
    let env = Env::start().await;
    let token = format!("{}\n", env.token(ALICE));
    let client = env.pg_connect(Some(ALICE), &token).await.unwrap();
    assert_eq!(client.query("SELECT 1", &[]).await.unwrap().len(), 1);
}

#[tokio::test]
async fn v1_tokens_and_empty_user_work() {
    let env = Env::start().await;
    let client = env
        .pg_connect(Some("aad:alice@contoso.example"), &env.token_v1(ALICE))
        .await
        .unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM demo", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn authorization_passes_through_to_postgres_grants() {
    let env = Env::start().await;
    let alice = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    assert_eq!(
        alice
            .query("SELECT id FROM demo ORDER BY id", &[])
            .await
            .unwrap()
            .len(),
        2
    );
    let bob = env.pg_connect(Some(BOB), &env.token(BOB)).await.unwrap();
    let who: String = bob
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "aad:bob@contoso.example");
    let err = bob.query("SELECT id FROM demo", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("permission denied"));
}

#[tokio::test]
async fn psql_with_token_as_pgpassword_and_verify_full() {
    let env = Env::start().await;
    let psql = which("psql");
    let Some(psql) = psql else {
        return missing_tool("psql");
    };
    let out = tokio::process::Command::new(psql)
        .env("PGPASSWORD", env.token(ALICE))
        .env("PGSSLROOTCERT", &env.ca_path)
        .env("PGCONNECT_TIMEOUT", "20")
        .arg(format!(
            "host=localhost port={} dbname=dev user={ALICE} sslmode=verify-full",
            env.port()
        ))
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT current_user, note FROM demo ORDER BY id",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "aad:alice@contoso.example|one\naad:alice@contoso.example|two"
    );
}

pub(crate) fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.exists())
}

pub(crate) fn run_python(
    env: &Env,
    script: &str,
    args: &[String],
) -> Option<(bool, String, String)> {
    let Some(py) = python() else {
        missing_tool("python venv with redshift_connector/psycopg (IDGATE_TEST_PYTHON)");
        return None;
    };
    let out = Command::new(py)
        .arg(repo_root().join("tests/clients").join(script))
        .args(args)
        .env("SSL_CERT_FILE", &env.ca_path)
        .output()
        .unwrap();
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn redshift_connector(mode: &str, sslmode: &str, user: Option<&str>) {
    let env = Env::start().await;
    let token_file = env.token_file(&env.token(ALICE));
    let mut args = vec![
        "--host".into(),
        "localhost".into(),
        "--port".into(),
        env.port().to_string(),
        "--database".into(),
        "dev".into(),
        "--mode".into(),
        mode.into(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--sslmode".into(),
        sslmode.into(),
        "--ca-file".into(),
        env.ca_path.display().to_string(),
        "--query".into(),
        "SELECT current_user, note FROM demo ORDER BY id".into(),
    ];
    if let Some(user) = user {
        args.extend(["--user".into(), user.into()]);
    }
    let Some((ok, stdout, stderr)) =
        tokio::task::block_in_place(|| run_python(&env, "rs_connect.py", &args))
    else {
        return;
    };
    assert!(ok, "redshift_connector ({mode}) failed: {stderr}");
    let rows: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(
        rows,
        serde_json::json!([
            ["aad:alice@contoso.example", "one"],
            ["aad:alice@contoso.example", "two"]
        ])
    );
    let ok = env.wait_event(|e| e["kind"] == "auth_succeeded").await;
    let method = if mode == "password" {
        "password"
    } else {
        "redshift_idp"
    };
    assert_eq!(ok["auth_method"], method);
    if mode != "password" {
        assert!(
            ok["plugin_name"]
                .as_str()
                .unwrap_or_default()
                .contains("Plugin")
                || ok["plugin_name"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("Provider")
        );
        assert!(ok["driver_version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Redshift Python Driver"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redshift_connector_idp_token_auth_plugin() {
    redshift_connector("idp_token", "verify-full", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redshift_connector_basic_jwt_credentials_provider() {
    redshift_connector("basic_jwt", "verify-ca", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redshift_connector_token_as_password() {
    redshift_connector("password", "verify-full", Some(ALICE)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg3_token_as_password() {
    let env = Env::start().await;
    let token_file = env.token_file(&env.token(ALICE));
    let args: Vec<String> = [
        "--host",
        "localhost",
        "--port",
        &env.port().to_string(),
        "--database",
        "dev",
        "--user",
        ALICE,
        "--token-file",
        &token_file.display().to_string(),
        "--sslmode",
        "verify-full",
        "--sslrootcert",
        &env.ca_path.display().to_string(),
        "--query",
        "SELECT current_user, note FROM demo ORDER BY id",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let Some((ok, stdout, stderr)) =
        tokio::task::block_in_place(|| run_python(&env, "psycopg_connect.py", &args))
    else {
        return;
    };
    assert!(ok, "psycopg failed: {stderr}");
    assert!(
        stdout.contains("aad:alice@contoso.example") && stdout.contains("two"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pgjdbc_token_as_password() {
    let env = Env::start().await;
    let jar = std::env::var("IDGATE_PGJDBC_JAR")
        .unwrap_or_else(|_| "/usr/share/java/postgresql.jar".into());
    if !std::path::Path::new(&jar).exists() || which("java").is_none() {
        return missing_tool("java and pgjdbc (libpostgresql-jdbc-java)");
    }
    let token_file = env.token_file(&env.token(ALICE));
    let url = format!(
        "jdbc:postgresql://localhost:{}/dev?sslmode=verify-full&sslrootcert={}",
        env.port(),
        env.ca_path.display()
    );
    let out = tokio::task::block_in_place(|| {
        Command::new("java")
            .args(["-cp", &jar])
            .arg(repo_root().join("tests/clients/JdbcConnect.java"))
            .args([
                url.as_str(),
                ALICE,
                &token_file.display().to_string(),
                "SELECT current_user, note FROM demo ORDER BY id",
            ])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "pgjdbc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "aad:alice@contoso.example\tone\naad:alice@contoso.example\ttwo"
    );
}
