//! `backend_auth = "password"` against real PostgreSQL: SCRAM-SHA-256, MD5 and cleartext logins
//! as the person with a password from `backend_password_file` (a path relative to the config
//! file), a wrong password, and the shared service role with its startup warning.

use std::{collections::HashMap, time::Duration};

use idgate::config::{BackendAuth, Config};

use crate::harness::{config_toml, sqlstate, Capture, Env, EnvOptions, ALICE, BOB};

const CAROL: &str = "carol@contoso.example";
const PASSWORD: &str = "s3cret-Backend-pw!";

/// An environment whose one pool logs in with `backend_auth = "password"`, the password read
/// from `secrets/backend.pw` (relative to the configuration file's directory) holding
/// `file_password` and a newline. `hba` replaces the harness's trust line; `pool_extra` is
/// more TOML for the pool (e.g. `backend_user`).
async fn password_env(hba: &[&str], file_password: &str, pool_extra: &str) -> Env {
    let file_password = file_password.to_owned();
    let pool_extra = pool_extra.to_owned();
    Env::with(EnvOptions {
        hba: hba.iter().map(|l| l.to_string()).collect(),
        tweak: Box::new(move |c, env0| {
            let dir = env0.dir.path();
            std::fs::create_dir_all(dir.join("secrets")).unwrap();
            std::fs::write(dir.join("secrets/backend.pw"), format!("{file_password}\n")).unwrap();
            let pools = format!(
                "[[pools]]\nname = \"main\"\nbackend_auth = \"password\"\n\
                 backend_password_file = \"secrets/backend.pw\"\n{pool_extra}\
                 targets = [{{ addr = \"{}\" }}]\n",
                env0.clusters[0].addr()
            );
            let toml = config_toml(&env0.idp.authority(), &pools, "");
            std::fs::write(dir.join("idgate.toml"), &toml).unwrap();
            *c = Config::from_toml(&toml, "idgate.toml", dir, &HashMap::new())
                .unwrap_or_else(|e| panic!("{e}"));
        }),
        ..EnvOptions::default()
    })
    .await
}

/// Turn on `log_connections`, so the server log says which method authenticated each login.
async fn log_connections(env: &Env) {
    let cluster = &env.clusters[0];
    cluster
        .exec("ALTER SYSTEM SET log_connections = on")
        .await
        .unwrap();
    cluster.exec("SELECT pg_reload_conf()").await.unwrap();
    for _ in 0..100 {
        let rows = cluster.query_strings("SHOW log_connections").await.unwrap();
        if rows[0][0].as_deref() == Some("on") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("log_connections did not turn on");
}

async fn stored_password(env: &Env, role: &str) -> String {
    env.clusters[0]
        .query_strings(&format!(
            "SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"
        ))
        .await
        .unwrap()[0][0]
        .clone()
        .unwrap_or_default()
}

/// `(current_user, session_user)` of a session through idgate as `upn`.
async fn whoami(env: &Env, upn: &str) -> (String, String) {
    let client = env
        .pg_connect(Some(upn), &env.token(upn))
        .await
        .unwrap_or_else(|e| panic!("{upn}: {e} ({})", sqlstate(&e)));
    let row = client
        .query_one("SELECT current_user::text, session_user::text", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn password_mode_logs_in_as_the_person_with_scram_md5_and_cleartext() {
    // One pg_hba line per person, each with a different method, and nothing else for them.
    let env = password_env(
        &[
            r#"host all "aad:alice@contoso.example" 127.0.0.1/32 scram-sha-256"#,
            r#"host all "aad:bob@contoso.example" 127.0.0.1/32 md5"#,
            r#"host all "aad:carol@contoso.example" 127.0.0.1/32 password"#,
        ],
        PASSWORD,
        "",
    )
    .await;
    let cluster = &env.clusters[0];
    cluster
        .exec(&format!(
            r#"ALTER ROLE "aad:alice@contoso.example" PASSWORD '{PASSWORD}'"#
        ))
        .await
        .unwrap();
    // Stored as MD5, so that the md5 line really runs the MD5 exchange (with a SCRAM verifier
    // PostgreSQL would switch the md5 line to SCRAM).
    cluster
        .exec(&format!(
            r#"SET password_encryption = 'md5'; ALTER ROLE "aad:bob@contoso.example" PASSWORD '{PASSWORD}'"#
        ))
        .await
        .unwrap();
    cluster
        .exec(&format!(
            r#"CREATE ROLE "aad:carol@contoso.example" LOGIN PASSWORD '{PASSWORD}'"#
        ))
        .await
        .unwrap();
    assert!(stored_password(&env, "aad:alice@contoso.example")
        .await
        .starts_with("SCRAM-SHA-256$"));
    assert!(stored_password(&env, "aad:bob@contoso.example")
        .await
        .starts_with("md5"));
    log_connections(&env).await;

    for (upn, method) in [(ALICE, "scram-sha-256"), (BOB, "md5"), (CAROL, "password")] {
        let role = format!("aad:{upn}");
        assert_eq!(
            whoami(&env, upn).await,
            (role.clone(), role.clone()),
            "{method}"
        );
        // The server authenticated that person with that method.
        let want = format!("connection authenticated: identity=\"{role}\" method={method}");
        let mut seen = false;
        for _ in 0..100 {
            if std::fs::read_to_string(cluster.log_file())
                .unwrap_or_default()
                .contains(&want)
            {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(seen, "server log lacks {want:?}:\n{}", cluster.log_tail(40));
    }
    let routed = env
        .wait_event(|e| e["kind"] == "session_routed" && e["db_user"] == "aad:bob@contoso.example")
        .await;
    assert_eq!(routed["pool"], "main");
    // The relative path was resolved against the configuration file's directory.
    match &env.config.pools[0].backend_auth {
        BackendAuth::Password { user, password } => {
            assert!(user.is_none());
            assert_eq!(password.expose(), PASSWORD, "trailing newline dropped");
        }
        other => panic!("backend_auth is {}", other.mode()),
    }
    let warnings = env.config.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("backend_auth = \"password\"") && w.contains("development only")),
        "{warnings:?}"
    );
    // The password is never written to the audit trail.
    let audit = std::fs::read_to_string(&env.audit_path).unwrap();
    assert!(!audit.contains(PASSWORD));
}

#[tokio::test]
async fn password_mode_with_a_wrong_password_gives_28p01_and_backend_login_failed() {
    let wrong = "not-the-Backend-pw";
    let env = password_env(
        &[r#"host all "aad:alice@contoso.example" 127.0.0.1/32 scram-sha-256"#],
        wrong,
        "",
    )
    .await;
    env.clusters[0]
        .exec(&format!(
            r#"ALTER ROLE "aad:alice@contoso.example" PASSWORD '{PASSWORD}'"#
        ))
        .await
        .unwrap();
    let err = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .err()
        .unwrap_or_else(|| panic!("a wrong backend password must not log in"));
    assert_eq!(sqlstate(&err), "28P01", "{err}");
    let message = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(!message.contains(wrong) && !message.contains(PASSWORD));
    let failed = env
        .wait_event(|e| e["kind"] == "backend_login_failed")
        .await;
    assert_eq!(failed["reason"], "backend_refused_28P01", "{failed}");
    assert_eq!(failed["db_user"], "aad:alice@contoso.example");
    let ended = env.wait_event(|e| e["kind"] == "session_ended").await;
    assert_eq!(ended["end_reason"], "backend_refused_28P01");
    // 28P01 goes straight to the client: it is not a reason to try another target.
    let events = env.audit_events();
    assert!(
        !events.iter().any(|e| e["kind"] == "backend_attempt_failed"),
        "{events:#?}"
    );
    assert!(!events.iter().any(|e| e["kind"] == "session_routed"));
    let audit = std::fs::read_to_string(&env.audit_path).unwrap();
    assert!(!audit.contains(wrong) && !audit.contains(PASSWORD));
}

#[tokio::test]
async fn password_mode_with_a_shared_service_role_logs_everyone_in_as_it_and_warns_at_start() {
    let capture = Capture::default();
    let writer = capture.clone();
    // nextest runs each test in its own process; under `cargo test` another test may have set
    // the global subscriber first, and then the log check is skipped.
    let captured = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init()
        .is_ok();
    // Only the service role may log in; the people's roles have no pg_hba line at all.
    let env = password_env(
        &["host all svc_reporting 127.0.0.1/32 scram-sha-256"],
        PASSWORD,
        "backend_user = \"svc_reporting\"\n",
    )
    .await;
    env.clusters[0]
        .exec(&format!(
            "CREATE ROLE svc_reporting LOGIN PASSWORD '{PASSWORD}'"
        ))
        .await
        .unwrap();
    for upn in [ALICE, BOB] {
        assert_eq!(
            whoami(&env, upn).await,
            ("svc_reporting".to_owned(), "svc_reporting".to_owned()),
            "{upn}"
        );
    }
    // The audit trail still names the person who authenticated, and the role the database saw.
    let ok = env
        .wait_event(|e| e["kind"] == "auth_succeeded" && e["db_user"] == "aad:bob@contoso.example")
        .await;
    assert!(ok["object_id"].as_str().is_some(), "{ok}");
    let routed = env
        .wait_event(|e| e["kind"] == "session_routed" && e["session_id"] == ok["session_id"])
        .await;
    assert_eq!(routed["db_user"], "svc_reporting", "{routed}");
    assert_eq!(routed["client_user"], BOB);
    assert_eq!(routed["object_id"], ok["object_id"]);

    let warnings = env.config.warnings();
    let warning = warnings
        .iter()
        .find(|w| w.contains("shared service role \"svc_reporting\""))
        .unwrap_or_else(|| panic!("no service-role warning in {warnings:?}"));
    assert!(
        warning.contains("do not carry the person's identity"),
        "{warning}"
    );
    if captured {
        let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
        let line = logs
            .lines()
            .find(|l| l.contains("shared service role"))
            .unwrap_or_else(|| panic!("the warning was not logged at start:\n{logs}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("svc_reporting"), "{line}");
        assert!(!logs.contains(PASSWORD), "the password appears in the logs");
    }
}
