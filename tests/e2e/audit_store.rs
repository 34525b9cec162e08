//! The durable audit trail: spool + PostgreSQL store through an outage and a SIGKILL,
//! `fail_closed`, the `idgate audit` CLI, OCSF output, brute-force alerts with a webhook, and
//! query audit. Real PostgreSQL clusters, a real HTTP receiver, the real binary where a process
//! must die.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use idgate::{
    audit::{pg::PgSink, query::read_path},
    config::{AlertPer, AlertRule, AuditFormat},
    pgcluster::{ClusterSettings, PgCluster, StopMode},
    types::Secret,
};
use serde_json::{json, Value};

use crate::harness::{free_port, sqlstate, Env, EnvOptions, ALICE, APP_GUID, TENANT};

/// Put in the audit URL (trust auth ignores it) so tests can check it never leaks.
pub const AUDIT_DB_PASSWORD: &str = "audit-db-secret-pw-7f3a";

/// A throw-away PostgreSQL for the audit store; returns it and its URL.
pub async fn audit_db(name: &str) -> (PgCluster, String) {
    let mut settings = ClusterSettings::new(name);
    settings.hba = vec!["host all all 127.0.0.1/32 trust".into()];
    // The harness turns commits asynchronous for speed; an audit store that loses acknowledged
    // commits in a crash-like stop would make the outage test measure PostgreSQL, not idgate.
    settings.conf = vec![("synchronous_commit".into(), "on".into())];
    settings.bindir = std::env::var_os("IDGATE_PG_BINDIR").map(PathBuf::from);
    let cluster = PgCluster::start(settings).await.unwrap();
    let url = format!(
        "postgres://{}:{AUDIT_DB_PASSWORD}@127.0.0.1:{}/postgres?connect_timeout=5",
        cluster.superuser(),
        cluster.port()
    );
    (cluster, url)
}

/// Event ids in the spool directory.
fn spool_ids(dir: &Path) -> Vec<String> {
    read_path(dir)
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Event ids in `audit_events` (asserting the table has no duplicate by construction).
async fn table_ids(db: &PgCluster) -> Vec<String> {
    db.query_strings("SELECT event_id::text FROM audit_events ORDER BY seq")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect()
}

async fn table_count(db: &PgCluster) -> usize {
    match db.query_strings("SELECT count(*) FROM audit_events").await {
        Ok(rows) => rows[0][0].as_deref().unwrap_or("0").parse().unwrap(),
        Err(_) => 0,
    }
}

/// Both sets equal, each id once.
fn assert_exactly_once(spool: &[String], table: &[String]) {
    let spool_set: BTreeSet<&String> = spool.iter().collect();
    let table_set: BTreeSet<&String> = table.iter().collect();
    assert_eq!(
        spool_set.len(),
        spool.len(),
        "the spool holds an event twice"
    );
    assert_eq!(
        table_set.len(),
        table.len(),
        "the table holds an event twice"
    );
    let missing: Vec<_> = spool_set.difference(&table_set).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} spooled events missing from the table, e.g. {missing:?}",
        spool_set.len() - table_set.intersection(&spool_set).count()
    );
    assert_eq!(spool_set, table_set);
}

#[tokio::test]
async fn postgres_outage_delays_but_loses_nothing_and_duplicates_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("idgate=info")
        .with_test_writer()
        .try_init();
    let (db, url) = audit_db("audit-outage").await;
    let env = Env::with(EnvOptions {
        tweak: Box::new(move |c, _| {
            c.audit.postgres_url = Some(Secret::new(url));
            c.audit.postgres_migrate = true;
            c.audit.postgres_batch_size = 200;
        }),
        ..Default::default()
    })
    .await;
    let token = env.token(ALICE);
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let env_ref = Arc::new(env);
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (env, token, counter) = (env_ref.clone(), token.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client = env.pg_connect(Some(ALICE), &token).await.unwrap();
            drop(client);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(permit);
        }));
        let n = done.load(std::sync::atomic::Ordering::SeqCst);
        if tasks.len() == 150 {
            db.stop(StopMode::Immediate).await.unwrap();
        }
        if tasks.len() == 700 {
            assert!(n < 1000);
            db.restart().await.unwrap();
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let storm = started.elapsed();
    // Everything spooled reaches the table once the shipper has caught up.
    let spool_dir = env_ref.config.audit.spool_dir.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let spooled = spool_ids(&spool_dir).len();
        if spooled >= 5000 && table_count(&db).await >= spooled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shipper did not catch up: spool {spooled}, table {}",
            table_count(&db).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut env = Arc::try_unwrap(env_ref).ok().unwrap();
    env.stop_gateway().await;
    let spool = spool_ids(&spool_dir);
    let table = table_ids(&db).await;
    // 1000 sessions × (accepted, tls, auth_succeeded, routed, ended).
    assert_eq!(spool.len(), 5000);
    assert_exactly_once(&spool, &table);
    let kinds = db
        .query_strings("SELECT kind, count(*) FROM audit_events GROUP BY kind ORDER BY kind")
        .await
        .unwrap();
    assert!(
        kinds.iter().all(|r| r[1].as_deref() == Some("1000")),
        "{kinds:?}"
    );
    eprintln!("outage test: 1000 logins in {storm:?}");
}

/// A config file for a separate idgate process on `port`, sharing `env`'s IdP and cluster.
fn process_config(env: &Env, port: u16, spool: &str) -> PathBuf {
    let toml = format!(
        r#"
[listener]
addr = "127.0.0.1:{port}"
tls_cert_file = "idgate.pem"
tls_key_file = "idgate-key.pem"

[[issuers]]
name = "test-idp"
authority = "{authority}"
tenants = ["{TENANT}"]
audiences = ["api://idgate", "{APP_GUID}"]
required_scopes = ["jdbc_login"]

[[pools]]
name = "main"
targets = [{{ addr = "{target}" }}]

[audit]
spool_dir = "{spool}"
fsync_interval = "20ms"
postgres_url_env = "IDGATE_TEST_AUDIT_URL"
postgres_migrate = true
"#,
        authority = env.idp.authority(),
        target = env.clusters[0].addr(),
    );
    let path = env.dir.path().join(format!("{spool}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

fn spawn_idgate(config: &Path, url: &str, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(["serve", "--config"])
        .arg(config)
        .env("IDGATE_TEST_AUDIT_URL", url)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("idgate did not start listening on {port}");
}

#[tokio::test]
async fn sigkill_during_a_login_storm_loses_no_acknowledged_event() {
    let (db, url) = audit_db("audit-crash").await;
    let env = Arc::new(Env::start().await);
    let port = free_port();
    let config = process_config(&env, port, "crash-spool");
    let log = env.dir.path().join("crash-idgate.log");
    let mut child = spawn_idgate(&config, &url, &log);
    wait_listening(port).await;
    let token = env.token(ALICE);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut storm = Vec::new();
    for _ in 0..8 {
        let (env, token, stop) = (env.clone(), token.clone(), stop.clone());
        storm.push(tokio::spawn(async move {
            let mut ok = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(c) = env.pg_connect_port(port, Some(ALICE), &token, "dev").await {
                    let _ = c.simple_query("SELECT 1").await;
                    ok += 1;
                }
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut logins = 0;
    for t in storm {
        logins += t.await.unwrap();
    }
    assert!(logins > 20, "the storm must have run ({logins} logins)");
    let spool_dir = env.dir.path().join("crash-spool");
    let acknowledged = spool_ids(&spool_dir);
    assert!(!acknowledged.is_empty());

    // Restart: the shipper resumes from its cursor; a few more logins; then a clean stop.
    let mut child = spawn_idgate(&config, &url, &log);
    wait_listening(port).await;
    for _ in 0..5 {
        env.pg_connect_port(port, Some(ALICE), &token, "dev")
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while table_count(&db).await < spool_ids(&spool_dir).len() {
        assert!(
            Instant::now() < deadline,
            "shipper did not catch up after restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let spool = spool_ids(&spool_dir);
    let table = table_ids(&db).await;
    let table_set: BTreeSet<&String> = table.iter().collect();
    assert!(
        acknowledged.iter().all(|id| table_set.contains(id)),
        "an event acknowledged before the SIGKILL is missing"
    );
    assert_exactly_once(&spool, &table);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("idgate listening"));
    assert!(!logs.contains(&token) && !logs.contains(AUDIT_DB_PASSWORD));
    eprintln!(
        "crash test: {logins} logins before SIGKILL, {} events acknowledged",
        acknowledged.len()
    );
}

#[tokio::test]
async fn fail_closed_refuses_sessions_while_the_spool_is_unwritable() {
    let mut env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| c.audit.fail_closed = true),
        ..Default::default()
    })
    .await;
    let token = env.token(ALICE);
    env.pg_connect(Some(ALICE), &token).await.unwrap();
    let spool = env.config.audit.spool_dir.clone();
    let moved = env.dir.path().join("spool-moved");
    std::fs::rename(&spool, &moved).unwrap();
    std::fs::write(&spool, b"a file where the spool directory was").unwrap();
    let mut refused = None;
    for _ in 0..100 {
        match env.pg_connect(Some(ALICE), &token).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("sessions must be refused while the spool is unwritable");
    assert_eq!(sqlstate(&e), "08006");
    let msg = e.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("audit trail is unavailable"), "{msg}");
    // Still refused a moment later.
    assert!(env.pg_connect(Some(ALICE), &token).await.is_err());
    // Writable again → accepted.
    std::fs::remove_file(&spool).unwrap();
    std::fs::rename(&moved, &spool).unwrap();
    let mut accepted = false;
    for _ in 0..100 {
        if env.pg_connect(Some(ALICE), &token).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        accepted,
        "sessions must be accepted once the spool is writable"
    );
    env.stop_gateway().await;
    // The refusals themselves were kept in memory and spooled once possible.
    let events = read_path(&spool).unwrap();
    assert!(events
        .iter()
        .any(|e| e["kind"] == "session_ended" && e["end_reason"] == "audit_unavailable"));
}

fn known_events() -> Vec<Value> {
    let recent = |mins: u64| {
        humantime::format_rfc3339_millis(
            std::time::SystemTime::now() - Duration::from_secs(mins * 60),
        )
        .to_string()
    };
    vec![
        json!({"event_id":"00000000-0000-4000-8000-000000000001","time":recent(10),"kind":"session_routed","outcome":"success",
               "session_id":"10000000-0000-4000-8000-000000000001","client_addr":"10.0.0.1:1000","db_user":"aad:alice@contoso.example",
               "tenant":"t1","object_id":"o1","pool":"main","target":"127.0.0.1:5432"}),
        json!({"event_id":"00000000-0000-4000-8000-000000000002","time":"2025-01-01T10:00:00.000Z","kind":"auth_failed","outcome":"failure",
               "reason":"token_expired","session_id":"10000000-0000-4000-8000-000000000002","client_addr":"10.0.0.2:1001",
               "client_user":"bob@contoso.example","tenant":"t1","pool":"main"}),
        json!({"event_id":"00000000-0000-4000-8000-000000000003","time":"2025-01-02T10:00:00.000Z","kind":"auth_failed","outcome":"failure",
               "reason":"bad_signature","session_id":"10000000-0000-4000-8000-000000000003","client_addr":"10.0.0.2:1002",
               "client_user":"carol, \"the\" admin","tenant":"t2","pool":"other"}),
        json!({"event_id":"00000000-0000-4000-8000-000000000004","time":recent(9),"kind":"session_ended",
               "session_id":"10000000-0000-4000-8000-000000000001","client_addr":"10.0.0.1:1000","db_user":"aad:alice@contoso.example",
               "tenant":"t1","pool":"main","end_reason":"closed"}),
    ]
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(args)
        .env_remove("IDGATE_AUDIT_DATABASE_URL")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "idgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn audit_cli_every_filter_and_format_on_files_and_postgres() {
    let (db, url) = audit_db("audit-cli").await;
    let dir = tempfile::tempdir().unwrap();
    let events = known_events();
    let lines: String = events.iter().map(|e| format!("{e}\n")).collect();
    let file = dir.path().join("audit.jsonl");
    std::fs::write(&file, &lines).unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::write(spool.join(idgate::audit::spool::segment_name(1)), &lines).unwrap();

    // Migration runner: applies once, then nothing.
    let first = cli(
        &["audit", "migrate"],
        &[("IDGATE_AUDIT_DATABASE_URL", &url)],
    );
    assert!(first.contains("[1]"), "{first}");
    let second = cli(&["audit", "migrate", "--database-url", &url], &[]);
    assert!(second.contains("up to date"), "{second}");
    let versions = db
        .query_strings("SELECT version, name FROM schema_migrations")
        .await
        .unwrap();
    assert_eq!(
        versions,
        vec![vec![Some("1".into()), Some("0001_audit_events".into())]]
    );
    // Idempotent, batched sink: delivering twice stores each event once.
    let mut sink = PgSink::new(Secret::new(url.clone()));
    sink.deliver(&events).await.unwrap();
    sink.deliver(&events).await.unwrap();
    assert_eq!(table_count(&db).await, 4);

    let cases: Vec<(Vec<&str>, Vec<u32>)> = vec![
        (vec![], vec![1, 2, 3, 4]),
        (vec!["--since", "1h"], vec![1, 4]),
        (
            vec![
                "--from",
                "2025-01-01T12:00:00Z",
                "--to",
                "2025-01-03T00:00:00Z",
            ],
            vec![3],
        ),
        (vec!["--user", "alice@contoso.example"], vec![1, 4]),
        (vec!["--user", "BOB@contoso.example"], vec![2]),
        (vec!["--tenant", "t2"], vec![3]),
        (vec!["--outcome", "failure"], vec![2, 3]),
        (vec!["--outcome", "success"], vec![1]),
        (vec!["--reason", "token_expired"], vec![2]),
        (vec!["--pool", "other"], vec![3]),
        (vec!["--client-addr", "10.0.0.2"], vec![2, 3]),
        (
            vec!["--session", "10000000-0000-4000-8000-000000000001"],
            vec![1, 4],
        ),
        (
            vec![
                "--kind",
                "auth_failed",
                "--client-addr",
                "10.0.0.2",
                "--tenant",
                "t1",
            ],
            vec![2],
        ),
    ];
    let file_s = file.to_str().unwrap();
    let spool_s = spool.to_str().unwrap();
    for (filter, want) in &cases {
        let want: BTreeSet<String> = want
            .iter()
            .map(|n| format!("00000000-0000-4000-8000-{n:012}"))
            .collect();
        for source in [
            vec!["--file", file_s],
            vec!["--spool", spool_s],
            vec!["--database-url", url.as_str()],
        ] {
            let mut args = vec!["audit", "query", "--format", "json"];
            args.extend(&source);
            args.extend(filter);
            let got: BTreeSet<String> = cli(&args, &[])
                .lines()
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["event_id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            assert_eq!(got, want, "filter {filter:?} on {source:?}");
        }
    }
    // Table: a header and aligned columns.
    let table = cli(&["audit", "query", "--file", file_s], &[]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 5, "{table}");
    assert!(rows[0].starts_with("TIME") && rows[0].contains("CLIENT_ADDR"));
    for col in ["KIND", "OUTCOME", "USER", "POOL"] {
        let at = rows[0].find(col).unwrap();
        for r in &rows[1..] {
            assert_eq!(
                &r[at - 2..at],
                "  ",
                "column {col} is not aligned:\n{table}"
            );
        }
    }
    // CSV: header + one row per event, RFC 4180 quoting.
    let csv = cli(
        &["audit", "query", "--format", "csv", "--database-url", &url],
        &[],
    );
    let csv_rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        csv_rows[0],
        "time,kind,outcome,user,client_addr,pool,target,reason,session_id,event_id"
    );
    assert_eq!(csv_rows.len(), 5);
    assert!(csv.contains("\"carol, \"\"the\"\" admin\""), "{csv}");
    // Summary.
    let summary: Value = serde_json::from_str(&cli(
        &[
            "audit",
            "summary",
            "--format",
            "json",
            "--database-url",
            &url,
        ],
        &[],
    ))
    .unwrap();
    assert_eq!(summary["logins"], 1);
    assert_eq!(summary["refusals"], 2);
    assert_eq!(summary["per_reason"]["token_expired"], 1);
    assert_eq!(summary["top_failing_clients"][0], json!(["10.0.0.2", 2]));
    let recent: Value = serde_json::from_str(&cli(
        &[
            "audit", "summary", "--format", "json", "--since", "24h", "--file", file_s,
        ],
        &[],
    ))
    .unwrap();
    assert_eq!(
        (recent["logins"].as_u64(), recent["refusals"].as_u64()),
        (Some(1), Some(0))
    );
    let text = cli(&["audit", "summary", "--spool", spool_s], &[]);
    assert!(
        text.contains("REASON") && text.contains("bad_signature") && text.contains("10.0.0.2"),
        "{text}"
    );

    // follow: new events appear as they are appended.
    let mut child = Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args([
            "audit",
            "follow",
            "--format",
            "json",
            "--outcome",
            "failure",
            "--file",
            file_s,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut more = events[1].clone();
    more["event_id"] = json!("00000000-0000-4000-8000-000000000005");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{}\n{}\n", events[0], more).as_bytes()).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let followed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(followed.lines().count(), 1, "{followed}");
    assert!(followed.contains("000000000005"));
}

#[tokio::test]
async fn ocsf_file_output_field_by_field() {
    let mut env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| c.audit.file_format = AuditFormat::Ocsf),
        ..Default::default()
    })
    .await;
    let client = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    assert!(env.pg_connect(Some(ALICE), "not-a-token").await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.stop_gateway().await;
    let native: HashMap<String, Value> = read_path(&env.config.audit.spool_dir)
        .unwrap()
        .into_iter()
        .map(|e| (e["event_id"].as_str().unwrap().to_owned(), e))
        .collect();
    let ocsf = env.audit_events();
    assert!(!ocsf.is_empty());
    for e in &ocsf {
        assert_eq!(e["class_uid"], 3002);
        assert_eq!(e["category_uid"], 3);
        assert_eq!(e["class_name"], "Authentication");
        assert_eq!(e["metadata"]["product"]["name"], "idgate");
        assert_eq!(e["metadata"]["product"]["vendor_name"], "idgate");
        assert_eq!(e["metadata"]["version"], "1.1.0");
        let n = &native[e["metadata"]["uid"].as_str().unwrap()];
        assert_eq!(e["session"]["uid"], n["session_id"]);
        assert_eq!(e["time"].as_u64().unwrap(), {
            let t = humantime::parse_rfc3339(n["time"].as_str().unwrap()).unwrap();
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
        });
        let src = n["client_addr"]
            .as_str()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap();
        assert_eq!(e["src_endpoint"]["ip"], "127.0.0.1");
        assert_eq!(e["src_endpoint"]["port"], src.port());
        assert_eq!(e["type_uid"], 300200 + e["activity_id"].as_u64().unwrap());
    }
    let success = ocsf
        .iter()
        .find(|e| e["activity_id"] == 1 && e["status_id"] == 1)
        .expect("a successful logon");
    assert_eq!(success["status"], "Success");
    assert_eq!(success["activity_name"], "Logon");
    assert_eq!(success["severity_id"], 1);
    assert_eq!(success["user"]["name"], "aad:alice@contoso.example");
    assert!(success["user"]["uid"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(success["user"]["org"]["uid"], TENANT);
    assert_eq!(success["auth_protocol"], "OAUTH 2.0");
    assert_eq!(success["auth_protocol_id"], 6);
    assert_eq!(success["dst_endpoint"]["port"], env.clusters[0].port());
    assert_eq!(success["dst_endpoint"]["svc_name"], "main");
    assert!(success.get("status_detail").is_none());
    let refusal = ocsf
        .iter()
        .find(|e| e["activity_id"] == 1 && e["status_id"] == 2)
        .expect("a refused logon");
    assert_eq!(refusal["status"], "Failure");
    assert_eq!(refusal["severity_id"], 3);
    let native_refusal = &native[refusal["metadata"]["uid"].as_str().unwrap()];
    assert_eq!(native_refusal["kind"], "auth_failed");
    assert_eq!(refusal["status_detail"], native_refusal["reason"]);
    assert!(refusal["status_detail"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    assert_eq!(refusal["user"]["name"], ALICE);
    assert!(refusal.get("dst_endpoint").is_none());
    let logoff = ocsf
        .iter()
        .find(|e| e["activity_id"] == 2 && e["session"]["uid"] == success["session"]["uid"])
        .expect("a logoff for the session");
    assert_eq!(logoff["type_uid"], 300202);
    assert!(logoff["duration"].as_u64().is_some());
    // Connection-level events have no OCSF Authentication meaning and are not written.
    assert!(!ocsf
        .iter()
        .any(|e| e["unmapped"]["idgate_kind"] == "connection_accepted"));
}

#[tokio::test]
async fn ten_bad_tokens_from_one_address_fire_one_alert_and_one_webhook() {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut env = Env::with(EnvOptions {
        tweak: Box::new(move |c, _| {
            c.audit.alerts = vec![
                AlertRule {
                    name: "brute-force-addr".into(),
                    failed_logins: 10,
                    within: Duration::from_secs(60),
                    per: AlertPer::ClientAddr,
                    webhook_url: Some(hook),
                },
                AlertRule {
                    name: "brute-force-user".into(),
                    failed_logins: 50,
                    within: Duration::from_secs(60),
                    per: AlertPer::User,
                    webhook_url: None,
                },
            ]
        }),
        ..Default::default()
    })
    .await;
    for i in 0..14 {
        let bad = format!("bad.token.{i}");
        assert!(env.pg_connect(Some(ALICE), &bad).await.is_err());
    }
    for _ in 0..100 {
        if !received.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.stop_gateway().await;
    let alerts: Vec<Value> = env
        .audit_events()
        .into_iter()
        .filter(|e| e["kind"] == "alert")
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = &alerts[0];
    assert_eq!(a["alert"]["rule"], "brute-force-addr");
    assert_eq!(a["alert"]["key"], "127.0.0.1");
    assert_eq!(a["alert"]["failed_logins"], 10);
    assert_eq!(a["outcome"], "failure");
    let calls = received.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0]["event_id"], a["event_id"]);
    assert_eq!(calls[0]["alert"]["rule"], "brute-force-addr");
}

#[tokio::test]
async fn query_audit_records_statements_and_leaves_the_session_unchanged() {
    let mut env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| {
            c.audit.query_audit_pools = vec!["main".into()];
            c.audit.query_audit_max_len = 24;
        }),
        ..Default::default()
    })
    .await;
    let client = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    let rows = client
        .simple_query("SELECT note FROM demo ORDER BY id")
        .await
        .unwrap();
    assert_eq!(
        rows.iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count(),
        2
    );
    let row = client
        .query_one("SELECT note FROM demo WHERE id = $1", &[&2i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "two");
    let long = format!("SELECT '{}' AS x", "é".repeat(4000));
    let got = client.query_one(long.as_str(), &[]).await.unwrap();
    assert_eq!(got.get::<_, String>(0).chars().count(), 4000);
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.stop_gateway().await;
    let events = env.audit_events();
    let session = events
        .iter()
        .find(|e| e["kind"] == "session_routed")
        .unwrap()["session_id"]
        .clone();
    let queries: Vec<&Value> = events.iter().filter(|e| e["kind"] == "query").collect();
    assert!(queries
        .iter()
        .all(|q| q["session_id"] == session && q["db_user"] == "aad:alice@contoso.example"));
    let simple = queries
        .iter()
        .find(|q| q["statement_kind"] == "simple")
        .unwrap();
    assert_eq!(simple["statement"], "SELECT note FROM demo OR");
    assert_eq!(simple["truncated"], true);
    let parses: Vec<&&Value> = queries
        .iter()
        .filter(|q| q["statement_kind"] == "parse")
        .collect();
    assert!(parses
        .iter()
        .any(|q| q["statement"] == "SELECT note FROM demo WH"));
    let long_q = parses
        .iter()
        .find(|q| q["statement"].as_str().unwrap().starts_with("SELECT '"))
        .unwrap();
    assert_eq!(long_q["truncated"], true);
    assert!(long_q["statement"].as_str().unwrap().len() <= 24);
    assert!(!long_q["statement"].as_str().unwrap().contains('\u{FFFD}'));
    // Off by default: no query events without the pool setting (checked by the other tests'
    // event counts, e.g. the outage test's exact 5000).
}
