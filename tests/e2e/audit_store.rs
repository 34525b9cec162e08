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
    audit::{
        pg::PgSink,
        query::read_path,
        spool::{list_segments, load_cursor, SpoolPos},
    },
    config::{AlertPer, AlertRule, AuditFormat},
    devidp::TokenSpec,
    pgcluster::{ClusterSettings, PgCluster, StopMode},
    types::Secret,
};
use serde_json::{json, Value};

use crate::harness::{
    free_port, metric_value, sqlstate, Env, EnvOptions, ALICE, APP_GUID, BOB, TENANT,
};

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

/// Audit counters from `/metrics`: (spooled, shipped summed over sinks, ship errors).
async fn ship_counters(env: &Env) -> (f64, f64, f64) {
    let (status, body) = env.admin("GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let get = |series: &str| {
        metric_value(&body, series).unwrap_or_else(|| panic!("/metrics has no {series}:\n{body}"))
    };
    (
        get("idgate_audit_events_total{what=\"spooled\"}"),
        get("idgate_audit_events_total{what=\"shipped\"}"),
        get("idgate_audit_errors_total{what=\"ship\"}"),
    )
}

#[tokio::test]
async fn postgres_outage_delays_but_loses_nothing_and_duplicates_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("idgate=info")
        .with_test_writer()
        .try_init();
    let (db, url) = audit_db("audit-outage").await;
    let env = Env::with(EnvOptions {
        admin: true,
        tweak: Box::new(move |c, _| {
            c.audit.postgres_url = Some(Secret::new(url));
            c.audit.postgres_migrate = true;
            c.audit.postgres_batch_size = 200;
        }),
        ..Default::default()
    })
    .await;
    // Two sinks: the harness's file sink and PostgreSQL; `shipped` counts both.
    assert!(env.config.audit.file_path.is_some());
    let spool_dir = env.config.audit.spool_dir.clone();
    let token = env.token(ALICE);
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let env_ref = Arc::new(env);
    let mut tasks = Vec::new();
    // Spooled count and PostgreSQL cursor once the first delivery has failed.
    let mut at_first_error = None;
    for _ in 0..1000 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (env, token, counter) = (env_ref.clone(), token.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client = env.pg_connect(Some(ALICE), &token).await.unwrap();
            drop(client);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(permit);
        }));
        if tasks.len() == 150 {
            // Delivery worked so far (the table is being filled and no delivery failed).
            let deadline = Instant::now() + Duration::from_secs(10);
            while table_count(&db).await == 0 {
                assert!(
                    Instant::now() < deadline,
                    "nothing shipped before the outage"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (_, _, errors) = ship_counters(&env_ref).await;
            assert_eq!(errors, 0.0, "a delivery failed before the outage");
            db.stop(StopMode::Immediate).await.unwrap();
            // Logins go on while deliveries to the stopped store fail.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (spooled, _, errors) = ship_counters(&env_ref).await;
                if errors > 0.0 {
                    at_first_error = Some((spooled, load_cursor(&spool_dir, "postgres")));
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no delivery failed with the audit store stopped"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if tasks.len() == 700 {
            // Still down: 550 more sessions were spooled, none reached PostgreSQL.
            let (spooled_err, cursor_err) = at_first_error.unwrap();
            // Let the sessions in flight end (and the file sink catch up), which only widens
            // the gap a working PostgreSQL shipper would close.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (spooled, shipped, errors) = ship_counters(&env_ref).await;
            assert!(
                spooled >= spooled_err + 1000.0,
                "sessions went on during the outage: spooled {spooled_err} → {spooled}"
            );
            assert!(errors >= 1.0);
            // PostgreSQL's cursor has not moved since its first failure, while the file
            // sink's went on.
            let pg_cursor = load_cursor(&spool_dir, "postgres");
            assert_eq!(
                pg_cursor, cursor_err,
                "the PostgreSQL cursor moved while the store was down"
            );
            assert!(load_cursor(&spool_dir, "file") > pg_cursor);
            // shipped ≤ (file: spooled) + (PostgreSQL: at most what was spooled at its first
            // failure): at least everything spooled since is still waiting for PostgreSQL.
            assert!(
                2.0 * spooled - shipped >= spooled - spooled_err,
                "PostgreSQL deliveries did not lag: spooled {spooled}, shipped {shipped} \
                 (both sinks), spooled at the first failure {spooled_err}"
            );
            eprintln!(
                "outage: spooled {spooled_err} at the first failed delivery, {spooled} at restart; \
                 shipped {shipped} over both sinks; {errors} failed deliveries"
            );
            db.restart().await.unwrap();
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let storm = started.elapsed();
    // Everything spooled reaches the table (and the file) once the shippers have caught up:
    // each event is delivered to the file once and to PostgreSQL at least once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let in_spool = spool_ids(&spool_dir).len();
        let (spooled, shipped, _) = ship_counters(&env_ref).await;
        let in_table = table_count(&db).await;
        if in_spool >= 5000 && in_table >= in_spool && shipped >= 2.0 * spooled {
            assert_eq!(spooled, in_spool as f64);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shippers did not catch up: spool {in_spool} (counter {spooled}), table {in_table}, \
             shipped {shipped} over both sinks"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut env = Arc::try_unwrap(env_ref).ok().unwrap();
    env.stop_gateway().await;
    // Both shippers ended at the same (final) position.
    assert_eq!(
        load_cursor(&spool_dir, "postgres"),
        load_cursor(&spool_dir, "file")
    );
    let spool = spool_ids(&spool_dir);
    let table = table_ids(&db).await;
    // 1000 sessions × (accepted, tls, auth_succeeded, routed, ended).
    assert_eq!(spool.len(), 5000);
    assert_exactly_once(&spool, &table);
    let kinds = db
        .query_strings("SELECT kind, count(*) FROM audit_events GROUP BY kind ORDER BY kind")
        .await
        .unwrap();
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    assert!(
        kinds.iter().all(|r| r[1].as_deref() == Some("1000")),
        "{kinds:?}"
    );
    eprintln!("outage test: 1000 logins in {storm:?}");
}

/// A config file for a separate idgate process on `port`, sharing `env`'s IdP and cluster.
fn process_config(env: &Env, port: u16, admin_port: u16, spool: &str) -> PathBuf {
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

[admin]
addr = "127.0.0.1:{admin_port}"

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

/// Complete events in the spool `dir` before `pos` (what a shipper at `pos` has delivered).
fn events_before(dir: &Path, pos: SpoolPos) -> usize {
    let mut n = 0;
    for (seq, path) in list_segments(dir).unwrap() {
        if seq > pos.seq {
            break;
        }
        let bytes = std::fs::read(&path).unwrap();
        let upto = if seq == pos.seq {
            usize::try_from(pos.offset).unwrap()
        } else {
            bytes.len()
        };
        assert!(
            upto <= bytes.len(),
            "cursor {pos:?} is past the end of {path:?}"
        );
        n += bytes[..upto].iter().filter(|b| **b == b'\n').count();
    }
    n
}

/// One series of the `/metrics` of the idgate process whose admin listener is on `port`.
async fn process_metric(port: u16, series: &str) -> f64 {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_value(&body, series).unwrap_or_else(|| panic!("/metrics has no {series}:\n{body}"))
}

#[tokio::test]
async fn sigkill_during_a_login_storm_loses_no_acknowledged_event() {
    let (db, url) = audit_db("audit-crash").await;
    let env = Arc::new(Env::start().await);
    let (port, admin_port) = (free_port(), free_port());
    let config = process_config(&env, port, admin_port, "crash-spool");
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
    // The shipper persisted its position while the storm ran, and only after delivering:
    // everything before the cursor is in the table already.
    assert!(spool_dir.join("cursors/postgres.json").is_file());
    let killed_at = load_cursor(&spool_dir, "postgres");
    let shipped_before_kill = events_before(&spool_dir, killed_at);
    assert!(
        shipped_before_kill > 0,
        "the shipper saved no position before the SIGKILL ({killed_at:?})"
    );
    let in_table = table_count(&db).await;
    assert!(
        in_table >= shipped_before_kill,
        "the cursor ({shipped_before_kill} events) is ahead of the table ({in_table} rows)"
    );

    // Restart: the shipper resumes from its cursor; a few more logins; then a clean stop.
    let mut child = spawn_idgate(&config, &url, &log);
    wait_listening(port).await;
    for _ in 0..5 {
        env.pg_connect_port(port, Some(ALICE), &token, "dev")
            .await
            .unwrap();
    }
    // The second run delivers exactly what lies after the saved cursor, not the whole spool.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let total = spool_ids(&spool_dir).len();
        let shipped =
            process_metric(admin_port, "idgate_audit_events_total{what=\"shipped\"}").await;
        let in_table = table_count(&db).await;
        if in_table >= total && shipped == (total - shipped_before_kill) as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after restart: {total} events spooled, {shipped_before_kill} shipped before the \
             SIGKILL, {shipped} shipped since the restart (want {}), {in_table} in the table",
            total - shipped_before_kill
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    // The cursor advanced to the end of the spool.
    let final_pos = load_cursor(&spool_dir, "postgres");
    assert!(final_pos > killed_at, "{final_pos:?} after {killed_at:?}");
    let (last_seq, last_path) = list_segments(&spool_dir).unwrap().pop().unwrap();
    assert_eq!(
        final_pos,
        SpoolPos {
            seq: last_seq,
            offset: std::fs::metadata(&last_path).unwrap().len()
        }
    );
    let spool = spool_ids(&spool_dir);
    assert_eq!(events_before(&spool_dir, final_pos), spool.len());
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
        "crash test: {logins} logins before SIGKILL, {} events acknowledged, {shipped_before_kill} \
         shipped before it",
        acknowledged.len()
    );
}

/// `/readyz` (status, body) once it answers `want`, or the last answer after ~10 s.
async fn readyz_until(env: &Env, want: u16) -> (u16, String) {
    let mut last = env.admin("GET", "/readyz").await;
    for _ in 0..100 {
        if last.0 == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = env.admin("GET", "/readyz").await;
    }
    last
}

#[tokio::test]
async fn fail_closed_refuses_sessions_while_the_spool_is_unwritable() {
    let mut env = Env::with(EnvOptions {
        admin: true,
        tweak: Box::new(|c, _| c.audit.fail_closed = true),
        ..Default::default()
    })
    .await;
    let token = env.token(ALICE);
    env.pg_connect(Some(ALICE), &token).await.unwrap();
    // Ready (the pool's target is up, the spool writable) before the spool breaks.
    let (status, body) = readyz_until(&env, 200).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(env.metric("idgate_audit_healthy").await, 1.0);
    assert_eq!(env.metric("idgate_audit_sessions_refused_total").await, 0.0);
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
    // Not ready, and the reason names the audit spool; the gauge says unhealthy.
    let (status, body) = env.admin("GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("audit"), "{body}");
    assert_eq!(env.metric("idgate_audit_healthy").await, 0.0);
    // Still refused a moment later (the writer's retries keep failing).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(env.pg_connect(Some(ALICE), &token).await.is_err());
    assert_eq!(env.admin("GET", "/readyz").await.0, 503);
    assert_eq!(env.metric("idgate_audit_healthy").await, 0.0);
    assert!(env.metric("idgate_audit_sessions_refused_total").await >= 2.0);
    // The refused sessions' own events were tried (and failed) by now: the writer retries
    // every 250 ms.
    assert!(
        env.metric("idgate_audit_errors_total{what=\"spool\"}")
            .await
            >= 1.0
    );
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
    let (status, body) = readyz_until(&env, 200).await;
    assert_eq!(
        status, 200,
        "ready again once the spool is writable: {body}"
    );
    assert_eq!(env.metric("idgate_audit_healthy").await, 1.0);
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
        // One target skipped (not a refusal, no outcome), then the session's final refusal.
        json!({"event_id":"00000000-0000-4000-8000-000000000006","time":recent(8),"kind":"backend_attempt_failed",
               "reason":"backend_refused_53300","session_id":"10000000-0000-4000-8000-000000000006","client_addr":"10.0.0.3:1003",
               "db_user":"aad:alice@contoso.example","tenant":"t1","pool":"main","target":"127.0.0.1:5433"}),
        json!({"event_id":"00000000-0000-4000-8000-000000000007","time":recent(8),"kind":"backend_login_failed","outcome":"failure",
               "reason":"backend_unreachable","session_id":"10000000-0000-4000-8000-000000000006","client_addr":"10.0.0.3:1003",
               "db_user":"aad:alice@contoso.example","tenant":"t1","pool":"main","target":"127.0.0.1:5434"}),
    ]
}

/// The aligned sections of `idgate audit summary` (table format): the first line, then each
/// section's rows (header first) split into cells on runs of two or more spaces.
fn summary_sections(text: &str) -> (String, Vec<Vec<Vec<String>>>) {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default().to_owned();
    let mut sections: Vec<Vec<Vec<String>>> = Vec::new();
    let mut current = Vec::new();
    for line in lines {
        if line.trim().is_empty() {
            if !current.is_empty() {
                sections.push(std::mem::take(&mut current));
            }
            continue;
        }
        current.push(
            line.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect(),
        );
    }
    if !current.is_empty() {
        sections.push(current);
    }
    (first, sections)
}

fn rows(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect()
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
    let mut sink = PgSink::new(Secret::new(url.clone()), false);
    sink.deliver(&events).await.unwrap();
    sink.deliver(&events).await.unwrap();
    assert_eq!(table_count(&db).await, 6);

    let cases: Vec<(Vec<&str>, Vec<u32>)> = vec![
        (vec![], vec![1, 2, 3, 4, 6, 7]),
        (vec!["--since", "1h"], vec![1, 4, 6, 7]),
        (
            vec![
                "--from",
                "2025-01-01T12:00:00Z",
                "--to",
                "2025-01-03T00:00:00Z",
            ],
            vec![3],
        ),
        (vec!["--user", "alice@contoso.example"], vec![1, 4, 6, 7]),
        (vec!["--user", "BOB@contoso.example"], vec![2]),
        (vec!["--tenant", "t2"], vec![3]),
        // A skipped target has no outcome: it is not a failure.
        (vec!["--outcome", "failure"], vec![2, 3, 7]),
        (vec!["--outcome", "success"], vec![1]),
        (vec!["--reason", "token_expired"], vec![2]),
        (vec!["--reason", "backend_refused_53300"], vec![6]),
        (vec!["--pool", "other"], vec![3]),
        (vec!["--pool", "main", "--outcome", "failure"], vec![2, 7]),
        (vec!["--client-addr", "10.0.0.2"], vec![2, 3]),
        (
            vec!["--session", "10000000-0000-4000-8000-000000000001"],
            vec![1, 4],
        ),
        (
            vec!["--session", "10000000-0000-4000-8000-000000000006"],
            vec![6, 7],
        ),
        (vec!["--kind", "backend_attempt_failed"], vec![6]),
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
    let sources = [
        vec!["--file", file_s],
        vec!["--spool", spool_s],
        vec!["--database-url", url.as_str()],
    ];
    // --limit keeps the newest matches and says so on stderr.
    for source in &sources {
        let all = event_ids(&cli(
            &[&["audit", "query", "--format", "json"][..], source].concat(),
            &[],
        ));
        assert_eq!(all.len(), 6, "{source:?}");
        let out = Command::new(env!("CARGO_BIN_EXE_idgate"))
            .args(["audit", "query", "--format", "json", "--limit", "2"])
            .args(source)
            .env_remove("IDGATE_AUDIT_DATABASE_URL")
            .output()
            .unwrap();
        assert!(out.status.success());
        let newest = event_ids(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(newest, all[4..], "{source:?}");
        let note = String::from_utf8_lossy(&out.stderr);
        assert!(
            note.contains("6 events match; showing the newest 2"),
            "{note}"
        );
    }
    for (filter, want) in &cases {
        let want: BTreeSet<String> = want
            .iter()
            .map(|n| format!("00000000-0000-4000-8000-{n:012}"))
            .collect();
        for source in &sources {
            let mut args = vec!["audit", "query", "--format", "json"];
            args.extend(source);
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
    // Table: a header and aligned columns, the same from every source (PostgreSQL included).
    let table = cli(&["audit", "query", "--file", file_s], &[]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 7, "{table}");
    assert!(lines[0].starts_with("TIME") && lines[0].contains("CLIENT_ADDR"));
    for col in ["KIND", "OUTCOME", "USER", "POOL"] {
        let at = lines[0].find(col).unwrap();
        for r in &lines[1..] {
            assert_eq!(
                &r[at - 2..at],
                "  ",
                "column {col} is not aligned:\n{table}"
            );
        }
    }
    let kind_at = lines[0].find("KIND").unwrap();
    let outcome_at = lines[0].find("OUTCOME").unwrap();
    assert_eq!(
        lines[5][kind_at..outcome_at].trim_end(),
        "backend_attempt_failed",
        "{table}"
    );
    for source in &sources[1..] {
        let mut args = vec!["audit", "query", "--format", "table"];
        args.extend(source);
        assert_eq!(cli(&args, &[]), table, "table on {source:?}");
    }
    let failures_db = cli(
        &[
            "audit",
            "query",
            "--database-url",
            &url,
            "--outcome",
            "failure",
        ],
        &[],
    );
    let failures_file = cli(
        &["audit", "query", "--file", file_s, "--outcome", "failure"],
        &[],
    );
    assert_eq!(failures_db.lines().count(), 4, "{failures_db}");
    assert_eq!(failures_db, failures_file);
    assert!(
        failures_db.contains("carol, \"the\" admin") && failures_db.contains("backend_unreachable"),
        "{failures_db}"
    );
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
    assert_eq!(csv_rows.len(), 7);
    assert!(csv.contains("\"carol, \"\"the\"\" admin\""), "{csv}");
    // Summary: logins (session_routed) and refusals (auth_failed, backend_login_failed; a
    // skipped target is neither) per user, reason, pool and client, the same from every source.
    for source in &sources {
        let mut args = vec!["audit", "summary", "--format", "json"];
        args.extend(source);
        let summary: Value = serde_json::from_str(&cli(&args, &[])).unwrap();
        let on = format!("summary on {source:?}: {summary:#}");
        assert_eq!(summary["logins"], 1, "{on}");
        assert_eq!(summary["refusals"], 3, "{on}");
        assert_eq!(summary["alerts"], 0, "{on}");
        assert_eq!(
            summary["per_user"],
            json!({
                "aad:alice@contoso.example": [1, 1],
                "bob@contoso.example": [0, 1],
                "carol, \"the\" admin": [0, 1],
            }),
            "{on}"
        );
        assert_eq!(
            summary["per_reason"],
            json!({"backend_unreachable": 1, "bad_signature": 1, "token_expired": 1}),
            "{on}"
        );
        assert_eq!(
            summary["per_pool"],
            json!({"main": [1, 2], "other": [0, 1]}),
            "{on}"
        );
        assert_eq!(
            summary["top_failing_clients"],
            json!([["10.0.0.2", 2], ["10.0.0.3", 1]]),
            "{on}"
        );
    }
    let recent: Value = serde_json::from_str(&cli(
        &[
            "audit", "summary", "--format", "json", "--since", "24h", "--file", file_s,
        ],
        &[],
    ))
    .unwrap();
    assert_eq!(
        (recent["logins"].as_u64(), recent["refusals"].as_u64()),
        (Some(1), Some(1)),
        "{recent:#}"
    );
    assert_eq!(
        recent["per_user"],
        json!({"aad:alice@contoso.example": [1, 1]})
    );
    assert_eq!(recent["per_pool"], json!({"main": [1, 1]}));
    assert_eq!(recent["per_reason"], json!({"backend_unreachable": 1}));
    assert_eq!(recent["top_failing_clients"], json!([["10.0.0.3", 1]]));
    // The table form: every section's counts, from the spool and from PostgreSQL.
    for source in &sources[1..] {
        let mut args = vec!["audit", "summary"];
        args.extend(source);
        let text = cli(&args, &[]);
        let (first, sections) = summary_sections(&text);
        assert_eq!(first, "logins: 1  refusals: 3  alerts: 0", "{text}");
        assert_eq!(
            sections,
            vec![
                rows(&[
                    &["USER", "LOGINS", "REFUSALS"],
                    &["aad:alice@contoso.example", "1", "1"],
                    &["bob@contoso.example", "0", "1"],
                    &["carol, \"the\" admin", "0", "1"],
                ]),
                rows(&[
                    &["REASON", "REFUSALS"],
                    &["backend_unreachable", "1"],
                    &["bad_signature", "1"],
                    &["token_expired", "1"],
                ]),
                rows(&[
                    &["POOL", "LOGINS", "REFUSALS"],
                    &["main", "1", "2"],
                    &["other", "0", "1"],
                ]),
                rows(&[
                    &["CLIENT_ADDR", "FAILURES"],
                    &["10.0.0.2", "2"],
                    &["10.0.0.3", "1"],
                ]),
            ],
            "summary on {source:?}:\n{text}"
        );
    }

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
    // `idgate audit query --format ocsf` over the spool prints the same events as the sink.
    let spool = env.config.audit.spool_dir.display().to_string();
    let printed: Vec<Value> = cli(
        &["audit", "query", "--format", "ocsf", "--spool", &spool],
        &[],
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let uids = |events: &[Value]| -> Vec<String> {
        let mut v: Vec<String> = events
            .iter()
            .map(|e| e["metadata"]["uid"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(uids(&printed), uids(&ocsf));
    assert!(printed.iter().all(|e| e["class_uid"] == 3002));
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
    // A small threshold and a long window: every bad login below is inside one window, and
    // 25 failures are five times the threshold, so a rule that re-armed after firing (instead of
    // staying quiet for the window) would fire five times.
    const THRESHOLD: u32 = 5;
    const BAD_LOGINS: usize = 25;
    let mut env = Env::with(EnvOptions {
        admin: true,
        tweak: Box::new(move |c, _| {
            c.audit.alerts = vec![
                AlertRule {
                    name: "brute-force-addr".into(),
                    failed_logins: THRESHOLD,
                    within: Duration::from_secs(600),
                    per: AlertPer::ClientAddr,
                    webhook_url: Some(hook),
                },
                // Same failures, per user, threshold above what is sent: must stay silent.
                AlertRule {
                    name: "brute-force-user".into(),
                    failed_logins: BAD_LOGINS as u32 + 1,
                    within: Duration::from_secs(600),
                    per: AlertPer::User,
                    webhook_url: None,
                },
            ]
        }),
        ..Default::default()
    })
    .await;
    assert_eq!(env.metric("idgate_audit_alerts_fired_total").await, 0.0);
    for i in 0..BAD_LOGINS {
        let bad = format!("bad.token.{i}");
        assert!(env.pg_connect(Some(ALICE), &bad).await.is_err());
    }
    for _ in 0..100 {
        if !received.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Room for a second (wrong) webhook call to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.metric("idgate_audit_alerts_fired_total").await, 1.0);
    assert_eq!(
        env.metric("idgate_audit_errors_total{what=\"webhook\"}")
            .await,
        0.0
    );
    env.stop_gateway().await;
    let events = env.audit_events();
    // Every bad login was counted as a failure from the same address.
    let failures = events
        .iter()
        .filter(|e| e["kind"] == "auth_failed")
        .inspect(|e| {
            assert!(
                e["client_addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:")),
                "{e}"
            )
        })
        .count();
    assert_eq!(failures, BAD_LOGINS);
    let alerts: Vec<&Value> = events.iter().filter(|e| e["kind"] == "alert").collect();
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = alerts[0];
    assert_eq!(a["alert"]["rule"], "brute-force-addr");
    assert_eq!(a["alert"]["per"], "client_addr");
    assert_eq!(a["alert"]["key"], "127.0.0.1");
    assert_eq!(a["alert"]["failed_logins"], THRESHOLD);
    assert_eq!(a["alert"]["within_secs"], 600);
    assert_eq!(a["outcome"], "failure");
    // It fired on the THRESHOLD-th failure: exactly that many auth_failed precede it.
    let at = events
        .iter()
        .position(|e| e["event_id"] == a["event_id"])
        .unwrap();
    assert_eq!(
        events[..at]
            .iter()
            .filter(|e| e["kind"] == "auth_failed")
            .count(),
        THRESHOLD as usize
    );
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

#[tokio::test]
async fn failed_logins_for_one_user_fire_the_per_user_alert() {
    let mut env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| {
            c.audit.alerts = vec![AlertRule {
                name: "guessing-user".into(),
                failed_logins: 3,
                within: Duration::from_secs(600),
                per: AlertPer::User,
                webhook_url: None,
            }]
        }),
        ..Default::default()
    })
    .await;
    // Three failures for alice (an expired token of hers, then garbage in her name), two for
    // bob: only alice crosses the threshold; both come from the same address.
    let expired = env.idp.mint(&TokenSpec::user(ALICE).expires_in(-600));
    for token in [expired.as_str(), "garbage-1", "garbage-2"] {
        assert!(env.pg_connect(Some(ALICE), token).await.is_err());
    }
    for token in ["garbage-3", "garbage-4"] {
        assert!(env.pg_connect(Some(BOB), token).await.is_err());
    }
    let alert = env.wait_event(|e| e["kind"] == "alert").await;
    assert_eq!(alert["alert"]["rule"], "guessing-user");
    assert_eq!(alert["alert"]["per"], "user");
    assert_eq!(alert["alert"]["key"], ALICE);
    assert_eq!(alert["alert"]["failed_logins"], 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.stop_gateway().await;
    let alerts = env
        .audit_events()
        .into_iter()
        .filter(|e| e["kind"] == "alert")
        .count();
    assert_eq!(alerts, 1);
}

/// `idgate audit follow --format json` with `source` args, its stdout lines collected as they come.
fn follow_process(source: &[&str]) -> (tokio::process::Child, Arc<Mutex<Vec<Value>>>) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(["audit", "follow", "--format", "json"])
        .args(source)
        .env_remove("IDGATE_AUDIT_DATABASE_URL")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock()
                .unwrap()
                .push(serde_json::from_str(&line).unwrap());
        }
    });
    (child, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_follow_streams_new_events_from_postgres_and_from_the_spool() {
    let (_db, url) = audit_db("audit-follow").await;
    let db_url = url.clone();
    let env = Env::with(EnvOptions {
        tweak: Box::new(move |c, _| {
            c.audit.postgres_url = Some(Secret::new(db_url));
            c.audit.postgres_migrate = true;
        }),
        ..Default::default()
    })
    .await;
    // Before the followers start: a session they must not print (no --from, so no history).
    drop(
        env.pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap(),
    );
    env.wait_event(|e| e["kind"] == "session_ended").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spool = env.config.audit.spool_dir.display().to_string();
    let (_pg_child, from_pg) = follow_process(&["--database-url", &url]);
    let (_spool_child, from_spool) = follow_process(&["--spool", &spool]);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // After: one session of bob's and one refusal.
    let c = env.pg_connect(Some(BOB), &env.token(BOB)).await.unwrap();
    let err = env.pg_connect(Some(ALICE), "garbage").await.err().unwrap();
    assert_eq!(sqlstate(&err), "28000");
    drop(c);
    let ended = env
        .wait_event(|e| e["kind"] == "session_ended" && e["db_user"] == "aad:bob@contoso.example")
        .await;
    for (name, seen) in [("postgres", &from_pg), ("spool", &from_spool)] {
        let mut got = Vec::new();
        for _ in 0..100 {
            got = seen.lock().unwrap().clone();
            let has = |pred: &dyn Fn(&Value) -> bool| got.iter().any(pred);
            if has(&|e| e["event_id"] == ended["event_id"]) && has(&|e| e["kind"] == "auth_failed")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            got.iter().any(|e| e["event_id"] == ended["event_id"]),
            "{name}: bob's session_ended not followed: {got:#?}"
        );
        assert!(
            got.iter().any(|e| e["kind"] == "auth_failed"),
            "{name}: {got:#?}"
        );
        // Nothing from before the follower started, and no event twice.
        assert!(
            got.iter()
                .all(|e| e["db_user"] != "aad:alice@contoso.example" || e["kind"] == "auth_failed"),
            "{name}: history was printed: {got:#?}"
        );
        let mut ids: Vec<&str> = got
            .iter()
            .map(|e| e["event_id"].as_str().unwrap())
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "{name}: an event printed twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_webhooks_are_retried_and_a_dead_one_is_counted() {
    // /flaky answers 503 twice, then 200; /dead always answers 503.
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = calls.clone();
    let app = axum::Router::new().route(
        "/{which}",
        axum::routing::post(
            move |axum::extract::Path(which): axum::extract::Path<String>,
                  axum::Json(body): axum::Json<Value>| {
                let log = log.clone();
                async move {
                    assert_eq!(body["kind"], "alert");
                    let mut calls = log.lock().unwrap();
                    calls.push(which.clone());
                    let n = calls.iter().filter(|w| **w == which).count();
                    if which == "flaky" && n >= 3 {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let rule = |name: &str, path: &str| AlertRule {
        name: name.into(),
        failed_logins: 2,
        within: Duration::from_secs(600),
        per: AlertPer::ClientAddr,
        webhook_url: Some(format!("{base}/{path}")),
    };
    let rules = vec![rule("to-flaky", "flaky"), rule("to-dead", "dead")];
    let env = Env::with(EnvOptions {
        admin: true,
        tweak: Box::new(move |c, _| c.audit.alerts = rules),
        ..Default::default()
    })
    .await;
    for token in ["bad-1", "bad-2"] {
        assert!(env.pg_connect(Some(ALICE), token).await.is_err());
    }
    let mut errors = 0.0;
    for _ in 0..100 {
        errors = env
            .metric("idgate_audit_errors_total{what=\"webhook\"}")
            .await;
        if errors >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Room for a wrong extra call.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(errors, 1.0, "only the dead webhook counts as failed");
    let calls = calls.lock().unwrap().clone();
    let count = |w: &str| calls.iter().filter(|c| *c == w).count();
    assert_eq!((count("flaky"), count("dead")), (3, 3), "{calls:?}");
    assert_eq!(env.metric("idgate_audit_alerts_fired_total").await, 2.0);
}

/// A connection to the audit database (`url` from [`audit_db`]).
async fn audit_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Insert a minimal `auth_failed` event with id `n` (not committed until the caller commits
/// when it is inside a transaction).
async fn insert_event(client: &tokio_postgres::Client, n: u32) {
    let id = format!("00000000-0000-4000-8000-{n:012}");
    let event = json!({"event_id": id, "time": "2026-01-01T00:00:00.000Z", "kind": "auth_failed",
        "outcome": "failure", "session_id": id});
    client
        .execute(
            "INSERT INTO audit_events (event_id, time, kind, outcome, session_id, event) \
             VALUES ($1::text::uuid, now(), 'auth_failed', 'failure', $1::text::uuid, $2::text::jsonb)",
            &[&id, &event.to_string()],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_follow_prints_a_row_that_commits_after_rows_with_a_higher_seq() {
    let (_db, url) = audit_db("audit-follow-late").await;
    cli(&["audit", "migrate", "--database-url", &url], &[]);
    let writer_a = audit_client(&url).await;
    let writer_b = audit_client(&url).await;
    insert_event(&writer_b, 1).await; // visible at the start: never printed
    let (_child, seen) = follow_process(&["--database-url", &url]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Gateway A takes seq n and commits late; gateway B takes n+1 and commits at once.
    writer_a.batch_execute("BEGIN").await.unwrap();
    insert_event(&writer_a, 2).await;
    insert_event(&writer_b, 3).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    writer_a.batch_execute("COMMIT").await.unwrap();
    let ids = || -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    for _ in 0..50 {
        if ids().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        ids(),
        [
            "00000000-0000-4000-8000-000000000003",
            "00000000-0000-4000-8000-000000000002"
        ],
        "each event once, the late commit included, nothing from before the start"
    );
}

/// The `event_id` of each JSON line of `text`, in order.
fn event_ids(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}
