//! The audit trail: exactly one `session_ended` per accepted connection, the fields security
//! teams filter on, and no token anywhere in logs or audit files.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use idgate::devidp::TokenSpec;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    harness::{sqlstate, Capture, Env, EnvOptions, ALICE, BOB},
    raw,
};

#[tokio::test]
async fn exactly_one_session_ended_per_accepted_connection() {
    let mut env = Env::start().await;
    // A good session with traffic.
    let client = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    client.simple_query("SELECT * FROM demo").await.unwrap();
    drop(client);
    // A refused token, a plaintext attempt, garbage, a client that vanishes mid-TLS, a bad cancel.
    assert!(env.pg_connect(Some(BOB), "garbage").await.is_err());
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&raw::startup(&[("user", "x")], 0))
        .await
        .unwrap();
    drop(tcp);
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    drop(tcp);
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&raw::SSL_REQUEST).await.unwrap();
    drop(tcp);
    drop(TcpStream::connect(env.addr).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.stop_gateway().await;

    let events = env.audit_events();
    let (accepted, ended) = accepted_and_ended(&events);
    assert_eq!(accepted.len(), 6, "{events:#?}");
    // The file sink is readable by its owner and group only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&env.audit_path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o137, 0, "{mode:o}");
    assert_eq!(
        accepted, ended,
        "every accepted connection ends exactly once"
    );
    assert!(ended.values().all(|n| *n == 1));
    let good = events
        .iter()
        .find(|e| e["kind"] == "session_ended" && e["db_user"] == "aad:alice@contoso.example")
        .unwrap();
    assert!(good["bytes_in"].as_u64().unwrap() > 0 && good["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(good["end_reason"], "closed");
    assert!(good["duration_ms"].as_u64().is_some());
    assert!(good["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
}

/// The `session_ended` events written so far.
fn ended_events(env: &Env) -> Vec<serde_json::Value> {
    env.audit_events()
        .into_iter()
        .filter(|e| e["kind"] == "session_ended")
        .collect()
}

/// Wait until there are `n` `session_ended` events (up to 15 s) and return the last one.
async fn wait_ended(env: &Env, n: usize) -> serde_json::Value {
    for _ in 0..300 {
        let ended = ended_events(env);
        if ended.len() >= n {
            assert_eq!(ended.len(), n, "one connection ended twice: {ended:#?}");
            return ended[n - 1].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "expected {n} session_ended events; have:\n{:#?}",
        env.audit_events()
    );
}

#[tokio::test]
async fn every_way_a_connection_ends_gives_exactly_one_session_ended() {
    // A 1 s handshake timeout and room for one session at a time.
    let mut env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| {
            c.listener.handshake_timeout = Duration::from_secs(1);
            c.listener.max_connections = 1;
        }),
        ..EnvOptions::default()
    })
    .await;
    let mut want = Vec::new();

    // 1. The backend refuses the login: a database that does not exist.
    let err = env
        .pg_connect_db(Some(ALICE), &env.token(ALICE), "no_such_db")
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "3D000", "{err}");
    want.push("backend_refused_3D000");
    assert_eq!(wait_ended(&env, want.len()).await["end_reason"], want[0]);

    // 2. A TCP connection that never sends a byte: closed by the handshake timeout.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
        .await
        .expect("idgate must close a silent connection")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    want.push("handshake_timeout");
    assert_eq!(wait_ended(&env, want.len()).await["end_reason"], want[1]);

    // 3. A CancelRequest with a key idgate never handed out.
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    let mut req = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    req.extend_from_slice(&4242i32.to_be_bytes());
    req.extend_from_slice(&(-17i32).to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "a cancel gets no answer");
    want.push("cancel_request_unknown_key");
    assert_eq!(wait_ended(&env, want.len()).await["end_reason"], want[2]);

    // 4. A client that vanishes while its query runs (no Terminate, no TLS close_notify).
    let mut tls = raw::tls_connect(env.addr, env.client_tls(false)).await;
    tls.write_all(&raw::startup(&[("user", ALICE), ("database", "dev")], 0))
        .await
        .unwrap();
    let (tag, _) = raw::read_msg(&mut tls).await.unwrap();
    assert_eq!(tag, b'R');
    let mut token = env.token(ALICE).into_bytes();
    token.push(0);
    tls.write_all(&raw::message(b'p', &token)).await.unwrap();
    let msgs = raw::read_until_ready(&mut tls).await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'));
    tls.write_all(&raw::message(b'Q', b"SELECT pg_sleep(5)\0"))
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dropped_at = Instant::now();
    drop(tls);
    let ended = wait_ended(&env, want.len() + 1).await;
    let reason = ended["end_reason"].as_str().unwrap().to_owned();
    assert!(
        reason.starts_with("client_error"),
        "mid-relay disconnect: {ended}"
    );
    assert_eq!(ended["db_user"], "aad:alice@contoso.example");
    assert!(ended["bytes_in"].as_u64().unwrap() > 0);
    assert!(
        dropped_at.elapsed() < Duration::from_secs(4),
        "the session must end when the client goes, not when the query finishes"
    );
    want.push("client_error");

    // 5. The connection cap: one session open, the next gets 53300.
    let first = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    first.simple_query("SELECT 1").await.unwrap();
    let err = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "53300", "{err}");
    want.push("too_many_connections");
    assert_eq!(
        wait_ended(&env, want.len()).await["end_reason"],
        "too_many_connections"
    );
    drop(first);
    want.push("closed");
    assert_eq!(wait_ended(&env, want.len()).await["end_reason"], "closed");

    env.stop_gateway().await;
    let events = env.audit_events();
    let (accepted, ended) = accepted_and_ended(&events);
    assert_eq!(accepted.len(), want.len(), "{events:#?}");
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    assert_eq!(
        accepted, ended,
        "every accepted connection ends exactly once"
    );
    let reasons: Vec<String> = ended_events(&env)
        .iter()
        .map(|e| {
            let r = e["end_reason"].as_str().unwrap();
            if r.starts_with("client_error") {
                "client_error".to_owned()
            } else {
                r.to_owned()
            }
        })
        .collect();
    assert_eq!(reasons, want);
    // The refusals that reach the audit as failures say why.
    let failed = events
        .iter()
        .find(|e| e["kind"] == "backend_login_failed")
        .unwrap();
    assert_eq!(failed["reason"], "backend_refused_3D000");
}

#[tokio::test]
async fn no_token_appears_in_logs_or_audit_files() {
    let capture = Capture::default();
    let writer = capture.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init();
    let (db, url) = crate::audit_store::audit_db("audit-secrets").await;
    let mut env = Env::with(EnvOptions {
        tweak: Box::new(move |c, _| {
            c.audit.postgres_url = Some(idgate::types::Secret::new(url));
            c.audit.postgres_migrate = true;
            c.audit.query_audit_pools = vec!["main".into()];
        }),
        ..Default::default()
    })
    .await;
    let idp = &env.idp;
    let tokens = vec![
        env.token(ALICE),
        env.token_v1(ALICE),
        idp.mint(&TokenSpec::user(ALICE).expires_in(-600)),
        idp.mint(&TokenSpec::user(ALICE).audience("api://nope")),
        idp.sign_with_new_key(&TokenSpec::user(ALICE)),
        idp.mint(&TokenSpec::user(BOB)),
        "header.payload-that-is-not-json.signature".to_owned(),
    ];
    for token in &tokens {
        if let Ok(client) = env.pg_connect(Some(ALICE), token).await {
            let _ = client.simple_query("SELECT 1").await;
        }
    }
    // A token pasted into the user name or the application name is never audited or echoed.
    let err = env
        .pg_connect(Some(&tokens[0]), &tokens[0])
        .await
        .err()
        .unwrap();
    let message = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("[redacted token]"), "{message}");
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .port(env.port())
        .dbname("dev")
        .user(ALICE)
        .password(&tokens[0]);
    cfg.application_name(&tokens[1])
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*env.client_tls(false)).clone());
    let (client, conn) = cfg.connect(tls).await.unwrap();
    tokio::spawn(conn);
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    // Through the Redshift IdP path as well.
    let mut tls = raw::tls_connect(env.addr, env.client_tls(false)).await;
    tls.write_all(&raw::startup(
        &[("database", "dev"), ("idp_type", "AzureAD")],
        0,
    ))
    .await
    .unwrap();
    let _ = raw::read_msg(&mut tls).await;
    tls.write_all(&raw::message(b'i', tokens[0].as_bytes()))
        .await
        .unwrap();
    let _ = raw::read_until_ready(&mut tls).await;
    drop(tls);
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.stop_gateway().await;

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    let audit = std::fs::read_to_string(&env.audit_path).unwrap();
    assert!(logs.len() > 1000, "debug logging must have produced output");
    assert!(audit.contains("auth_succeeded") && audit.contains("auth_failed"));
    let spool: String = idgate::audit::spool::list_segments(&env.config.audit.spool_dir)
        .unwrap()
        .iter()
        .map(|(_, p)| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(spool.contains("auth_succeeded") && spool.contains("\"kind\":\"query\""));
    let table: String = db
        .query_strings("SELECT event::text FROM audit_events")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone().unwrap_or_default() + "\n")
        .collect();
    assert!(
        table.contains("auth_failed"),
        "the table must hold the events"
    );
    let mut secrets = tokens.clone();
    secrets.push(crate::audit_store::AUDIT_DB_PASSWORD.to_owned());
    for token in &secrets {
        for (what, text) in [
            ("logs", &logs),
            ("audit", &audit),
            ("spool", &spool),
            ("table", &table),
        ] {
            assert!(
                !text.contains(token.as_str()),
                "a token or password appears in the {what}"
            );
            // Nor any of its segments (header/payload/signature) on their own.
            for part in token.split('.').filter(|p| p.len() >= 24) {
                assert!(
                    !text.contains(part),
                    "a token segment appears in the {what}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdout_sink_writes_every_event_as_a_json_line_native_or_ocsf() {
    let env = Env::start().await;
    for format in ["native", "ocsf"] {
        let (ok, stdout) = crate::telemetry::serve_once_with(&env, |text| {
            text.replace(
                "[audit]\n",
                &format!("[audit]\nstdout = true\nstdout_format = \"{format}\"\n"),
            )
        })
        .await;
        assert!(ok, "{format}: the login through `idgate serve` failed");
        let events: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{format}: {e}: {l}")))
            .collect();
        let session = |kind: &str| match format {
            "native" => events.iter().any(|e| e["kind"] == kind),
            _ => events.iter().any(|e| e["unmapped"]["idgate_kind"] == kind),
        };
        // The whole session, flushed before the process exited.
        assert!(
            session("session_routed") && session("session_ended"),
            "{format}: {stdout}"
        );
        if format == "native" {
            assert!(
                session("connection_accepted") && session("auth_succeeded"),
                "{stdout}"
            );
        } else {
            assert!(events.iter().all(|e| e["class_uid"] == 3002), "{stdout}");
        }
        assert!(!stdout.contains(&env.token(ALICE)[..40]));
    }
}

/// Per session id, how many `connection_accepted` and how many `session_ended` events there are
/// (every event must carry an id and a time).
fn accepted_and_ended(
    events: &[serde_json::Value],
) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let mut accepted: HashMap<String, usize> = HashMap::new();
    let mut ended: HashMap<String, usize> = HashMap::new();
    for e in events {
        let sid = e["session_id"].as_str().unwrap().to_owned();
        match e["kind"].as_str().unwrap() {
            "connection_accepted" => *accepted.entry(sid).or_default() += 1,
            "session_ended" => *ended.entry(sid).or_default() += 1,
            _ => {}
        }
        assert!(e["event_id"].as_str().is_some() && e["time"].as_str().is_some());
    }
    (accepted, ended)
}
