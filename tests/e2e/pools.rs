//! Pools, routing, health checks, drain, reload, shutdown and the admin API, checked by asking
//! the backend which cluster answered (`whoami`), not by reading idgate's own state.

use std::time::{Duration, Instant};

use idgate::devidp::TokenSpec;

use crate::harness::{
    field_pairs, free_port, refused, sqlstate, Env, EnvOptions, ALICE, ANALYSTS_GROUP, BOB,
};

fn three_pools() -> EnvOptions {
    EnvOptions {
        clusters: 3,
        pools_toml: Some(
            r#"
[[pools]]
name = "wg0"
targets = [{ addr = "{c0}" }]

[[pools]]
name = "wg1"
targets = [{ addr = "{c1}" }]

[[pools]]
name = "wg2"
targets = [{ addr = "{c2}" }]
"#
            .into(),
        ),
        extra_toml: r#"
[routing]
default_pool = "wg0"
sni_suffix = ".db.idgate.test"

[[routing.rules]]
group = "analysts"
pool = "wg2"
"#
        .into(),
        ..EnvOptions::default()
    }
}

async fn connect_with(
    env: &Env,
    token: &str,
    db: &str,
    options: Option<&str>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .port(env.port())
        .dbname(db)
        .user(ALICE)
        .password(token);
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    if let Some(o) = options {
        cfg.options(o);
    }
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*env.client_tls(false)).clone());
    let (client, conn) = cfg.connect(tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[tokio::test]
async fn each_routing_path_lands_in_the_expected_pool() {
    let env = Env::with(three_pools()).await;
    let token = env.token(ALICE);
    // Default.
    let c = env.pg_connect(Some(ALICE), &token).await.unwrap();
    assert_eq!(Env::whoami(&c).await, "wg0");
    // Startup option (and it is not forwarded: PostgreSQL would show it in SHOW).
    let c = connect_with(
        &env,
        &token,
        "dev",
        Some("-c idgate.workgroup=wg1 -c statement_timeout=5s"),
    )
    .await
    .unwrap();
    assert_eq!(Env::whoami(&c).await, "wg1");
    let rows = c.simple_query("SHOW statement_timeout").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("5s"))
    );
    // Database form.
    let c = connect_with(&env, &token, "wg2/dev", None).await.unwrap();
    assert_eq!(Env::whoami(&c).await, "wg2");
    let db: String = c
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "dev");
    // Claim rule: a token with the analysts group.
    let grouped = env
        .idp
        .mint(&TokenSpec::user(ALICE).groups(&[ANALYSTS_GROUP]));
    let c = env.pg_connect(Some(ALICE), &grouped).await.unwrap();
    assert_eq!(Env::whoami(&c).await, "wg2");
    // SNI from a libpq client (psql): host names the pool, hostaddr says where to connect.
    let out = tokio::process::Command::new("psql")
        .env("PGPASSWORD", &token)
        .env("PGSSLROOTCERT", &env.ca_path)
        .arg(format!(
            "host=wg1.db.idgate.test hostaddr=127.0.0.1 port={} dbname=dev user={ALICE} sslmode=verify-full",
            env.port()
        ))
        .args(["-X", "-A", "-t", "-c", "SELECT name FROM whoami"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "wg1");
    // An unknown pool named explicitly is refused.
    let err = connect_with(&env, &token, "dev", Some("-c idgate.workgroup=nope"))
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "3D000");
    // The audit trail records which rule chose.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rules = field_pairs(&env.audit_events(), "session_routed", "route_rule", "pool");
    for want in [
        ("default", "wg0"),
        ("startup_option", "wg1"),
        ("database", "wg2"),
        ("claim", "wg2"),
        ("sni", "wg1"),
    ] {
        assert!(
            rules.iter().any(|(r, p)| r == want.0 && p == want.1),
            "{want:?} missing in {rules:?}"
        );
    }
}

#[tokio::test]
async fn a_pool_refuses_people_outside_its_groups() {
    let env = Env::with(EnvOptions {
        clusters: 2,
        pools_toml: Some(
            r#"
[[pools]]
name = "open"
targets = [{ addr = "{c0}" }]

[[pools]]
name = "finance"
allowed_groups = ["analysts"]
targets = [{ addr = "{c1}" }]
"#
            .into(),
        ),
        ..EnvOptions::default()
    })
    .await;
    let plain = env.token(ALICE);
    let err = connect_with(&env, &plain, "finance/dev", None)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "28000");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("not allowed to use workgroup \"finance\""));
    let reason = env.wait_refusal_reason(0).await;
    assert_eq!(reason, "pool_not_allowed");
    let refused = env
        .wait_event(|e| e["kind"] == "auth_failed" && e["reason"] == "pool_not_allowed")
        .await;
    assert_eq!(
        refused["pool"], "finance",
        "the refusal is audited with its pool"
    );
    assert_eq!(refused["route_rule"], "database");
    // The same token is fine for the open pool; a token with the group gets in.
    let c = connect_with(&env, &plain, "open/dev", None).await.unwrap();
    assert_eq!(Env::whoami(&c).await, "wg0");
    let grouped = env
        .idp
        .mint(&TokenSpec::user(ALICE).groups(&[ANALYSTS_GROUP]));
    let c = connect_with(&env, &grouped, "finance/dev", None)
        .await
        .unwrap();
    assert_eq!(Env::whoami(&c).await, "wg1");
}

fn two_targets(extra: &str) -> EnvOptions {
    EnvOptions {
        clusters: 2,
        pools_toml: Some(
            "[[pools]]\nname = \"main\"\ntargets = [{ addr = \"{c0}\" }, { addr = \"{c1}\" }]\n"
                .into(),
        ),
        extra_toml: format!(
            "[health]\ninterval = \"200ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n{extra}"
        ),
        admin: true,
        ..EnvOptions::default()
    }
}

async fn wait_health(env: &Env, target: &str, want: &str) {
    for _ in 0..150 {
        let (_, body) = env.admin("GET", "/pools").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let t = v["pools"][0]["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["addr"] == target)
            .cloned()
            .unwrap();
        if t["health"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{target} never became {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_ejects_a_dead_target_and_takes_it_back_after_rise_probes() {
    let env = Env::with(two_targets("")).await;
    let c1 = env.clusters[1].addr().to_string();
    wait_health(&env, &c1, "up").await;
    env.clusters[1]
        .stop(idgate::pgcluster::StopMode::Immediate)
        .await
        .unwrap();
    wait_health(&env, &c1, "down").await;
    // While it is down, 100 consecutive connects all succeed, all on wg0.
    for i in 0..100 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap_or_else(|e| panic!("connect {i} failed: {e}"));
        assert_eq!(Env::whoami(&c).await, "wg0");
    }
    env.clusters[1].restart().await.unwrap();
    wait_health(&env, &c1, "up").await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap();
        seen.insert(Env::whoami(&c).await);
    }
    assert!(
        seen.contains("wg1"),
        "the restarted target takes sessions again: {seen:?}"
    );
    // The health change reaches the audit file through the spool shortly after /pools shows it.
    env.wait_event(|e| {
        e["kind"] == "target_health_changed" && e["target"] == c1.as_str() && e["health"] == "up"
    })
    .await;
    let changes: Vec<String> = env
        .audit_events()
        .iter()
        .filter(|e| e["kind"] == "target_health_changed" && e["target"] == c1.as_str())
        .map(|e| e["health"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        changes.windows(2).any(|w| w == ["down", "up"]),
        "{changes:?}"
    );
}

#[tokio::test]
async fn a_target_refusing_logins_with_53300_is_skipped_transparently() {
    let env = Env::with(EnvOptions {
        clusters: 2,
        pools_toml: Some(
            "[[pools]]\nname = \"main\"\ntargets = [{ addr = \"{c1}\" }, { addr = \"{c0}\" }]\n"
                .into(),
        ),
        ..EnvOptions::default()
    })
    .await;
    // Fill wg1 to its connection limit with superuser sessions: new logins get 53300.
    env.clusters[1]
        .exec("ALTER SYSTEM SET max_connections = 4")
        .await
        .unwrap();
    env.clusters[1]
        .exec("ALTER SYSTEM SET superuser_reserved_connections = 0")
        .await
        .unwrap();
    env.clusters[1]
        .stop(idgate::pgcluster::StopMode::Fast)
        .await
        .unwrap();
    env.clusters[1].restart().await.unwrap();
    let mut hogs = Vec::new();
    for _ in 0..4 {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(env.clusters[1].port())
            .user("postgres")
            .dbname("postgres");
        if let Ok((client, conn)) = cfg.connect(tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            hogs.push(client);
        }
    }
    assert!(!hogs.is_empty());
    for _ in 0..6 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap();
        assert_eq!(Env::whoami(&c).await, "wg0");
    }
    let skipped = env
        .wait_event(|e| e["kind"] == "backend_attempt_failed")
        .await;
    assert_eq!(skipped["reason"], "backend_refused_53300");
    // Skipped targets are not refusals: every session above logged in.
    assert!(!env
        .audit_events()
        .iter()
        .any(|e| e["kind"] == "backend_login_failed" || e["outcome"] == "failure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_open_sessions_and_takes_no_new_ones() {
    let env = Env::with(two_targets("")).await;
    wait_health(&env, &env.clusters[0].addr().to_string(), "up").await;
    wait_health(&env, &env.clusters[1].addr().to_string(), "up").await;
    assert_eq!(env.admin("GET", "/readyz").await.0, 200);
    let open = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    let name = Env::whoami(&open).await;
    let idx: usize = name.trim_start_matches("wg").parse().unwrap();
    let addr = env.clusters[idx].addr().to_string();
    let (status, _) = env
        .admin("POST", &format!("/targets/main/{addr}/drain"))
        .await;
    assert_eq!(status, 200);
    // The open session keeps running a query loop.
    let looping = tokio::spawn(async move {
        for _ in 0..20 {
            open.simple_query("SELECT count(*) FROM demo")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Env::whoami(&open).await
    });
    for _ in 0..8 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap();
        assert_ne!(
            Env::whoami(&c).await,
            name,
            "a draining target took a new session"
        );
    }
    assert_eq!(looping.await.unwrap(), name);
    let (_, pools) = env.admin("GET", "/pools").await;
    assert!(pools.contains("\"draining\":true"), "{pools}");
    // Draining every target makes /readyz fail; undrain brings it back.
    let other = env.clusters[1 - idx].addr().to_string();
    env.admin("POST", &format!("/targets/main/{other}/drain"))
        .await;
    assert_eq!(env.admin("GET", "/readyz").await.0, 503);
    env.admin("POST", &format!("/targets/main/{other}/undrain"))
        .await;
    env.admin("POST", &format!("/targets/main/{addr}/undrain"))
        .await;
    assert_eq!(env.admin("GET", "/readyz").await.0, 200);
    assert_eq!(
        env.admin("POST", "/targets/main/nowhere:1/drain").await.0,
        404
    );
}

/// The single value of a one-row, one-column simple query.
async fn scalar(client: &tokio_postgres::Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap()
}

/// Connect (default route) until a session lands on cluster `want`; the other sessions are kept
/// open too and returned alongside.
async fn session_on(
    env: &Env,
    want: &str,
) -> (tokio_postgres::Client, Vec<tokio_postgres::Client>) {
    let mut others = Vec::new();
    for _ in 0..6 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap();
        if Env::whoami(&c).await == want {
            return (c, others);
        }
        others.push(c);
    }
    panic!("no session landed on {want}");
}

/// The pool named `name` in `GET /pools`.
async fn pool_status(env: &Env, name: &str) -> serde_json::Value {
    let (status, body) = env.admin("GET", "/pools").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no pool {name} in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_a_pool_and_removes_a_target_without_cutting_sessions() {
    let env = Env::with(two_targets(
        "\n[routing]\ndefault_pool = \"main\"\n\n[[routing.rules]]\ngroup = \"analysts\"\npool = \"main\"\n",
    ))
    .await;
    let (c0, c1) = (
        env.clusters[0].addr().to_string(),
        env.clusters[1].addr().to_string(),
    );
    // A session open on wg1, the target the reload removes from "main" (and one on wg0).
    let (open, mut others) = session_on(&env, "wg1").await;
    let (kept, more) = session_on(&env, "wg0").await;
    others.extend(more);
    let pid = scalar(&open, "SELECT pg_backend_pid()").await;
    let open_session = env
        .wait_event(|e| e["kind"] == "session_routed" && e["target"] == c1.as_str())
        .await["session_id"]
        .clone();
    // Before the reload the analysts rule names "main".
    let grouped = || {
        env.idp
            .mint(&TokenSpec::user(ALICE).groups(&[ANALYSTS_GROUP]))
    };
    let g = env.pg_connect(Some(ALICE), &grouped()).await.unwrap();
    let g_name = Env::whoami(&g).await;
    assert!(g_name == "wg0" || g_name == "wg1", "{g_name}");
    drop(g);
    let first = env
        .wait_event(|e| e["kind"] == "session_routed" && e["route_rule"] == "claim")
        .await;
    assert_eq!(first["pool"], "main");

    // New config: main keeps only wg0; the new pool "extra" gets wg1; the rule now names "extra".
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let new_pools = format!(
        "[[pools]]\nname = \"main\"\ntargets = [{{ addr = \"{c0}\" }}]\n\n[[pools]]\nname = \"extra\"\ntargets = [{{ addr = \"{c1}\" }}]\n",
    );
    let start = text.find("[[pools]]").unwrap();
    let end = text.find("[audit]").unwrap();
    let rule = "group = \"analysts\"\npool = \"main\"";
    assert!(text.contains(rule));
    let updated = format!("{}{}\n{}", &text[..start], new_pools, &text[end..])
        .replace(rule, "group = \"analysts\"\npool = \"extra\"");
    std::fs::write(&env.config_path, &updated).unwrap();
    let (status, body) = env.admin("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("extra"), "{body}");
    let main = pool_status(&env, "main").await;
    let addrs: Vec<&str> = main["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["addr"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, [c0.as_str()], "{main}");

    // The session on the removed target keeps its backend connection and keeps working.
    for _ in 0..10 {
        assert_eq!(scalar(&open, "SELECT count(*) FROM demo").await, "2");
    }
    assert_eq!(Env::whoami(&open).await, "wg1");
    assert_eq!(scalar(&open, "SELECT pg_backend_pid()").await, pid);
    assert_eq!(Env::whoami(&kept).await, "wg0");
    for c in &others {
        c.simple_query("SELECT 1").await.unwrap();
    }
    // The backend agrees: that process is still alive, logged in as the person.
    let alive = env.clusters[1]
        .query_strings(&format!(
            "SELECT usename FROM pg_stat_activity WHERE pid = {pid}"
        ))
        .await
        .unwrap();
    assert_eq!(
        alive,
        vec![vec![Some("aad:alice@contoso.example".to_owned())]]
    );
    // New sessions of "main" never land on the removed target.
    for i in 0..6 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap_or_else(|e| panic!("connect {i} after the reload failed: {e}"));
        assert_eq!(Env::whoami(&c).await, "wg0", "connect {i} after the reload");
    }
    // The changed rule takes effect for new sessions: analysts now reach "extra" (wg1 only).
    let g = env.pg_connect(Some(ALICE), &grouped()).await.unwrap();
    assert_eq!(Env::whoami(&g).await, "wg1");
    drop(g);
    let routed = env
        .wait_event(|e| {
            e["kind"] == "session_routed" && e["route_rule"] == "claim" && e["pool"] == "extra"
        })
        .await;
    assert_eq!(routed["target"], c1.as_str());
    let c = connect_with(&env, &env.token(ALICE), "extra/dev", None)
        .await
        .unwrap();
    assert_eq!(Env::whoami(&c).await, "wg1");
    // The open session ends normally when its client closes it, audited on its old target.
    drop(open);
    let ended = env
        .wait_event(|e| e["kind"] == "session_ended" && e["session_id"] == open_session)
        .await;
    assert_eq!(ended["target"], c1.as_str());
    assert_eq!(ended["pool"], "main");
    assert_eq!(ended["end_reason"], "closed");

    // An invalid file changes nothing.
    std::fs::write(
        &env.config_path,
        updated.replace("[[pools]]", "[[pools]]\nbalance = \"random\""),
    )
    .unwrap();
    let (status, body) = env.admin("POST", "/reload").await;
    assert_eq!(status, 400);
    assert!(body.contains("pools[0].balance"), "{body}");
    let c = connect_with(&env, &env.token(ALICE), "extra/dev", None)
        .await
        .unwrap();
    assert_eq!(Env::whoami(&c).await, "wg1");
    let g = env.pg_connect(Some(ALICE), &grouped()).await.unwrap();
    assert_eq!(Env::whoami(&g).await, "wg1");
    let reloads = env.wait_kind("config_reloaded", 2).await;
    assert_eq!(reloads.len(), 2);
    assert_eq!(reloads[1]["reason"], "reload_invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_queries_finish_then_sends_57p01() {
    let mut env = Env::with(two_targets("[shutdown]\ngrace_period = \"3s\"\n")).await;
    // An idle session whose connection task we watch.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .port(env.port())
        .dbname("dev")
        .user(ALICE)
        .password(env.token(ALICE));
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*env.client_tls(false)).clone());
    let (idle, conn) = cfg.connect(tls).await.unwrap();
    let idle_conn = tokio::spawn(conn);
    idle.simple_query("SELECT 1").await.unwrap();
    let busy = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    let started = Instant::now();
    let running =
        tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    env.begin_shutdown();
    assert_eq!(env.admin("GET", "/readyz").await.0, 503);
    // No new connections during the grace period.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .is_err());
    running
        .await
        .unwrap()
        .expect("the running query finishes inside the grace period");
    let result = tokio::time::timeout(Duration::from_secs(15), idle_conn)
        .await
        .unwrap()
        .unwrap();
    let err = result.expect_err("the idle session is closed by idgate");
    assert_eq!(sqlstate(&err), "57P01", "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "57P01 came before the grace period ended"
    );
    env.wait_gateway().await;
    let ended = env
        .audit_events()
        .into_iter()
        .filter(|e| e["kind"] == "session_ended" && e["end_reason"] == "shutdown")
        .count();
    assert!(ended >= 1);
}

#[tokio::test]
async fn metrics_move_as_sessions_come_and_go() {
    let env = Env::with(two_targets("")).await;
    let (status, _) = env.admin("GET", "/healthz").await;
    assert_eq!(status, 200);
    let metric = |body: &str, name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    let (_, before) = env.admin("GET", "/metrics").await;
    let c = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    c.simple_query("SELECT * FROM demo").await.unwrap();
    let (_, during) = env.admin("GET", "/metrics").await;
    assert_eq!(metric(&during, "idgate_sessions_active"), 1.0, "{during}");
    drop(c);
    assert!(env.pg_connect(Some(ALICE), "not-a-token").await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, after) = env.admin("GET", "/metrics").await;
    assert_eq!(metric(&after, "idgate_sessions_active"), 0.0);
    assert!(
        metric(&after, "idgate_sessions_total{outcome=\"relayed\"}")
            > metric(&before, "idgate_sessions_total{outcome=\"relayed\"}")
    );
    assert!(metric(&after, "idgate_relay_bytes_total{direction=\"out\"}") > 0.0);
    assert_eq!(
        metric(
            &after,
            "idgate_auth_failures_total{reason=\"malformed_token\"}"
        ),
        1.0,
        "{after}"
    );
    assert!(metric(&after, "idgate_routing_decisions_total") >= 1.0);
    assert!(metric(&after, "idgate_handshake_seconds_count") >= 1.0);
    assert!(metric(&after, "idgate_backend_login_seconds_count") >= 1.0);
    assert!(after.contains("idgate_pool_healthy_targets{pool=\"main\"}"));
    assert!(metric(&after, "idgate_jwks_fetches_total") >= 1.0);
    assert_eq!(metric(&after, "idgate_audit_healthy"), 1.0);
    // Every metric the shipped Grafana dashboard queries exists.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::harness::repo_root().join("docs/grafana-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("idgate_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.push(name);
            }
        }
    }
    assert!(queried.len() > 10);
    for name in queried {
        let base = name.trim_end_matches("_bucket");
        assert!(
            after.lines().any(|l| l.starts_with(base)),
            "dashboard queries {name}, which /metrics lacks"
        );
    }
    assert!(
        metric(&after, "idgate_audit_events_total{what=\"spooled\"}") >= 5.0,
        "{after}"
    );
}

#[tokio::test]
async fn the_admin_api_requires_the_bearer_token_when_configured() {
    let env = Env::with(EnvOptions {
        admin: true,
        tweak: Box::new(|c, _| {
            c.admin.bearer_token = Some(idgate::types::Secret::new("s3cret".to_owned()))
        }),
        ..EnvOptions::default()
    })
    .await;
    assert_eq!(env.admin("GET", "/pools").await.0, 401);
    let url = format!("{}/pools", env.admin_url.as_ref().unwrap());
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_on_sighup_and_stops_gracefully_on_sigterm() {
    let env = Env::with(EnvOptions {
        clusters: 2,
        ..EnvOptions::default()
    })
    .await;
    let (port, admin_port) = (free_port(), free_port());
    let text = env.process_config(port)
        + &format!(
            "\n[admin]\naddr = \"127.0.0.1:{admin_port}\"\n\n[shutdown]\ngrace_period = \"60s\"\n"
        );
    let path = env.dir.path().join("serve.toml");
    std::fs::write(&path, &text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{admin}/readyz")).send().await {
            if r.status().as_u16() == 200 {
                up = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the binary never became ready");
    let pools = http
        .get(format!("{admin}/pools"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!pools.contains("\"extra\""));
    // Add a pool and send SIGHUP.
    let with_pool = text.replace(
        "[audit]",
        &format!(
            "[[pools]]\nname = \"extra\"\ntargets = [{{ addr = \"{}\" }}]\n\n[audit]",
            env.clusters[1].addr()
        ),
    );
    std::fs::write(&path, with_pool).unwrap();
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let mut reloaded = false;
    for _ in 0..50 {
        let pools = http
            .get(format!("{admin}/pools"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if pools.contains("\"extra\"") {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "SIGHUP did not reload the configuration");
    // A session through the reloaded pool.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .port(port)
        .dbname("extra/dev")
        .user(ALICE)
        .password(env.token(ALICE));
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*env.client_tls(false)).clone());
    let (client, conn) = cfg.connect(tls).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(Env::whoami(&client).await, "wg1");
    // SIGTERM: /readyz turns 503 at once; the open session would get the 60 s grace period,
    // but a second signal skips ahead: the process exits 0 well before that.
    let stopped = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = http
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert!(matches!(ready, Ok(503)), "{ready:?}");
    assert!(
        client.simple_query("SELECT 1").await.is_ok(),
        "sessions keep working during the grace period"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(stopped.elapsed() < Duration::from_secs(20));
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "the session was closed"
    );
}

async fn connect_trusting(
    env: &Env,
    ca_pem: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in idgate::net::tls::parse_certs(ca_pem.as_bytes(), "ca").unwrap() {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .port(env.port())
        .dbname("dev")
        .user(ALICE)
        .password(env.token(ALICE));
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, conn) = cfg
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(config))
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test]
async fn reload_swaps_the_listener_certificate_and_reports_settings_that_need_a_restart() {
    let env = Env::with(EnvOptions {
        admin: true,
        ..EnvOptions::default()
    })
    .await;
    let old_ca = env.ca_pem.clone();
    assert!(connect_trusting(&env, &old_ca).await.is_ok());
    let ca2 = idgate::devcerts::DevCa::new("rotated CA").unwrap();
    let leaf = ca2.server_cert(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(env.dir.path().join("idgate2.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(env.dir.path().join("idgate2-key.pem"), &leaf.key_pem).unwrap();
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("\"idgate.pem\"", "\"idgate2.pem\"")
        .replace("\"idgate-key.pem\"", "\"idgate2-key.pem\"")
        .replace("addr = \"127.0.0.1:0\"", "addr = \"127.0.0.1:1\"");
    std::fs::write(&env.config_path, text).unwrap();
    let (status, body) = env.admin("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        report["needs_restart"],
        serde_json::json!(["listener.addr"])
    );
    // New connections see the new certificate; the old CA no longer verifies it.
    let c = connect_trusting(&env, &ca2.cert_pem()).await.unwrap();
    assert_eq!(Env::whoami(&c).await, "wg0");
    assert!(connect_trusting(&env, &old_ca).await.is_err());
}

/// A file in a directory of its own, for secrets the configuration reads (`*_file` keys) before
/// the environment's directory exists.
fn secret_file(name: &str, contents: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("idgate-secret-")
        .tempdir()
        .unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    (dir, path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_probe_ejects_a_target_that_accepts_tcp_but_refuses_the_probe_login() {
    let (_secret_dir, pw_file) = secret_file("probe.pw", "probe-s3cret\n");
    let env = Env::with(EnvOptions {
        hba: vec![
            "host all idgate_probe 127.0.0.1/32 scram-sha-256".into(),
            "host all all 127.0.0.1/32 trust".into(),
        ],
        ..two_targets(&format!(
            "probe_user = \"idgate_probe\"\nprobe_password_file = \"{pw_file}\"\n"
        ))
    })
    .await;
    let (c0, c1) = (
        env.clusters[0].addr().to_string(),
        env.clusters[1].addr().to_string(),
    );
    // Without the role, the login probe fails although both clusters accept TCP and logins.
    wait_health(&env, &c1, "down").await;
    for c in &env.clusters {
        c.exec("CREATE ROLE idgate_probe LOGIN PASSWORD 'probe-s3cret'")
            .await
            .unwrap();
    }
    wait_health(&env, &c0, "up").await;
    wait_health(&env, &c1, "up").await;
    for addr in [&c0, &c1] {
        env.wait_event(|e| {
            e["kind"] == "target_health_changed"
                && e["target"] == addr.as_str()
                && e["health"] == "up"
        })
        .await;
    }
    let mark = env.audit_events().len();
    // The probe logged in with the file's password (scram-sha-256 is the only way in for it).
    let probed = env
        .wait_event(|e| {
            e["kind"] == "target_health_changed"
                && e["target"] == c1.as_str()
                && e["health"] == "down"
        })
        .await;
    let why = probed["detail"].as_str().unwrap_or_default();
    assert!(why.contains("28P01") || why.contains("28000"), "{probed}");

    // wg1 changes the probe role's password: its probe login fails from now on.
    env.clusters[1]
        .exec("ALTER ROLE idgate_probe PASSWORD 'changed'")
        .await
        .unwrap();
    wait_health(&env, &c1, "down").await;
    // wg1 itself is fine: TCP connects and the person's own login still work there...
    tokio::net::TcpStream::connect(env.clusters[1].addr())
        .await
        .expect("wg1 accepts TCP");
    let mut direct = tokio_postgres::Config::new();
    direct
        .host("127.0.0.1")
        .port(env.clusters[1].port())
        .user("aad:alice@contoso.example")
        .dbname("dev");
    let (client, conn) = direct.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(Env::whoami(&client).await, "wg1");
    drop(client);
    // ...but idgate sends it no sessions.
    for i in 0..6 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap_or_else(|e| panic!("connect {i} failed: {e}"));
        assert_eq!(Env::whoami(&c).await, "wg0", "connect {i}");
    }
    let down = env
        .wait_event(|e| {
            e["kind"] == "target_health_changed"
                && e["target"] == c1.as_str()
                && e["health"] == "down"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("password authentication failed"))
        })
        .await;
    assert_eq!(down["pool"], "main");
    assert!(down["detail"].as_str().unwrap().contains("28P01"), "{down}");
    // wg0 stayed up the whole time.
    assert!(!env.audit_events()[mark..]
        .iter()
        .any(|e| e["kind"] == "target_health_changed" && e["target"] == c0.as_str()));

    // Fixing the password brings wg1 back, and it takes sessions again.
    env.clusters[1]
        .exec("ALTER ROLE idgate_probe PASSWORD 'probe-s3cret'")
        .await
        .unwrap();
    wait_health(&env, &c1, "up").await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap();
        seen.insert(Env::whoami(&c).await);
    }
    assert!(seen.contains("wg1"), "wg1 takes sessions again: {seen:?}");
    // The audit file sink may trail the health state by a moment.
    let want = ["down", "up", "down", "up"].map(String::from);
    let mut changes = Vec::new();
    for _ in 0..200 {
        changes = env
            .audit_events()
            .iter()
            .filter(|e| e["kind"] == "target_health_changed" && e["target"] == c1.as_str())
            .map(|e| e["health"].as_str().unwrap().to_owned())
            .collect();
        if changes.ends_with(&want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(changes.ends_with(&want), "{changes:?}");
}

/// A stand-in "PostgreSQL server" that accepts TCP, reads the startup packet (answering an
/// SSLRequest or GSSENCRequest with `N`), then refuses the login with a FATAL ErrorResponse
/// carrying `code` and closes. Returns its address and the `user` of every startup it read.
async fn refusing_server(
    code: &'static str,
    message: &'static str,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let users = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = users.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    // Health probes connect and close: nothing to read is fine.
                    let Ok(len) = sock.read_u32().await else {
                        return;
                    };
                    let mut body = vec![0; (len as usize).saturating_sub(4)];
                    if sock.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let version = u32::from_be_bytes(body[..4].try_into().unwrap());
                    if version == 80877103 || version == 80877104 {
                        let _ = sock.write_all(b"N").await;
                        continue;
                    }
                    let mut parts = body[4..].split(|b| *b == 0);
                    while let Some(k) = parts.next() {
                        let v = parts.next().unwrap_or_default();
                        if k == b"user" {
                            seen.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(v).into_owned());
                        }
                    }
                    let mut fields = Vec::new();
                    for (tag, value) in [
                        (b'S', "FATAL"),
                        (b'V', "FATAL"),
                        (b'C', code),
                        (b'M', message),
                    ] {
                        fields.push(tag);
                        fields.extend_from_slice(value.as_bytes());
                        fields.push(0);
                    }
                    fields.push(0);
                    let mut msg = vec![b'E'];
                    msg.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
                    msg.extend_from_slice(&fields);
                    let _ = sock.write_all(&msg).await;
                    let _ = sock.shutdown().await;
                    return;
                }
            });
        }
    });
    (addr, users)
}

#[tokio::test]
async fn targets_refusing_logins_with_57p01_or_57p03_are_skipped_transparently() {
    let (terminating, terminating_users) = refusing_server(
        "57P01",
        "terminating connection due to administrator command",
    )
    .await;
    let (starting, starting_users) =
        refusing_server("57P03", "the database system is starting up").await;
    let env = Env::with(EnvOptions {
        clusters: 1,
        pools_toml: Some(format!(
            "[[pools]]\nname = \"main\"\ntargets = [{{ addr = \"{terminating}\" }}, {{ addr = \"{starting}\" }}, {{ addr = \"{{c0}}\" }}]\n"
        )),
        // Probes are TCP connects, which the stand-ins accept: they stay eligible.
        extra_toml: "[health]\ninterval = \"200ms\"\nfall = 1000\n".into(),
        ..EnvOptions::default()
    })
    .await;
    for i in 0..6 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap_or_else(|e| panic!("connect {i} failed: {e}"));
        assert_eq!(Env::whoami(&c).await, "wg0", "connect {i}");
    }
    // Each stand-in was really asked to log the person in, and refused.
    for users in [&terminating_users, &starting_users] {
        let users = users.lock().unwrap().clone();
        assert!(!users.is_empty(), "a stand-in was never tried");
        assert!(
            users.iter().all(|u| u == "aad:alice@contoso.example"),
            "{users:?}"
        );
    }
    assert_eq!(env.wait_kind("session_routed", 6).await.len(), 6);
    let events = env.audit_events();
    let skipped = field_pairs(&events, "backend_attempt_failed", "reason", "detail");
    for (reason, addr) in [
        ("backend_refused_57P01", terminating),
        ("backend_refused_57P03", starting),
    ] {
        assert!(
            skipped
                .iter()
                .any(|(r, d)| r == reason && d.starts_with(&addr.to_string())),
            "{reason} from {addr} missing in {skipped:?}"
        );
    }
    assert_eq!(
        skipped.len(),
        terminating_users.lock().unwrap().len() + starting_users.lock().unwrap().len(),
        "one backend_attempt_failed per refused attempt: {skipped:?}"
    );
    // Skipped targets are not refusals: no session failed, none has an outcome of failure.
    assert!(
        !events
            .iter()
            .any(|e| e["kind"] == "backend_login_failed" || e["outcome"] == "failure"),
        "{events:#?}"
    );
    assert!(events
        .iter()
        .filter(|e| e["kind"] == "session_routed")
        .all(|e| e["target"] == env.clusters[0].addr().to_string().as_str()));
}

/// The session id idgate puts in the detail of every refusal (`session id <uuid>`).
fn refusal_session_id(err: &tokio_postgres::Error) -> String {
    let detail = err
        .as_db_error()
        .and_then(|d| d.detail())
        .unwrap_or_else(|| panic!("no detail in {err:?}"));
    detail
        .split("session id ")
        .nth(1)
        .unwrap_or_else(|| panic!("no session id in {detail:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// How often `needle` occurs in the server logs of all `env`'s clusters.
fn in_server_logs(env: &Env, needle: &str) -> usize {
    env.clusters
        .iter()
        .map(|c| {
            std::fs::read_to_string(c.log_file())
                .unwrap_or_default()
                .matches(needle)
                .count()
        })
        .sum()
}

/// Wait until `needle` occurs at least `n` times in the server logs; return the count a moment
/// later (so a count above `n` shows too).
async fn wait_server_logs(env: &Env, needle: &str, n: usize) -> usize {
    for _ in 0..100 {
        if in_server_logs(env, needle) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    in_server_logs(env, needle)
}

#[tokio::test]
async fn a_non_retryable_refusal_goes_straight_to_the_client_without_trying_the_other_target() {
    let (_secrets, wrong) = secret_file("wrong.pw", "not-the-password\n");
    let right = _secrets.path().join("right.pw");
    std::fs::write(&right, "the-password\n").unwrap();
    let env = Env::with(EnvOptions {
        clusters: 2,
        hba: vec![
            "host all \"aad:alice@contoso.example\" 127.0.0.1/32 scram-sha-256".into(),
            "host all all 127.0.0.1/32 trust".into(),
        ],
        pools_toml: Some(format!(
            r#"
[[pools]]
name = "main"
targets = [{{ addr = "{{c0}}" }}, {{ addr = "{{c1}}" }}]

[[pools]]
name = "wrong"
backend_auth = "password"
backend_password_file = "{wrong}"
targets = [{{ addr = "{{c0}}" }}, {{ addr = "{{c1}}" }}]

[[pools]]
name = "right"
backend_auth = "password"
backend_password_file = "{}"
targets = [{{ addr = "{{c0}}" }}, {{ addr = "{{c1}}" }}]
"#,
            right.display()
        )),
        ..EnvOptions::default()
    })
    .await;
    for c in &env.clusters {
        c.exec("ALTER ROLE \"aad:alice@contoso.example\" PASSWORD 'the-password'")
            .await
            .unwrap();
    }
    // Control: with the right password both targets let alice in.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2 {
        let c = connect_with(&env, &env.token(ALICE), "right/dev", None)
            .await
            .unwrap();
        seen.insert(Env::whoami(&c).await);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // 28P01: twice, so that each target is the first one tried once (round-robin).
    let auth_failed =
        "FATAL:  password authentication failed for user \"aad:alice@contoso.example\"";
    assert_eq!(in_server_logs(&env, auth_failed), 0);
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let err = refused(
            connect_with(&env, &env.token(ALICE), "wrong/dev", None).await,
            "28P01",
            "password authentication failed",
        );
        sessions.push(refusal_session_id(&err));
    }
    // 3D000 (a trust pool, bob, a database neither cluster has): also final at the first target.
    for _ in 0..2 {
        let err = env
            .pg_connect_db(Some(BOB), &env.token(BOB), "main/nosuchdb")
            .await
            .err()
            .unwrap_or_else(|| panic!("an unknown database is refused"));
        assert_eq!(sqlstate(&err), "3D000", "{err}");
        sessions.push(refusal_session_id(&err));
    }
    for (i, id) in sessions.iter().enumerate() {
        let want = if i < 2 {
            "backend_refused_28P01"
        } else {
            "backend_refused_3D000"
        };
        env.wait_event(|e| e["kind"] == "session_ended" && e["session_id"] == id.as_str())
            .await;
        let events: Vec<serde_json::Value> = env
            .audit_events()
            .into_iter()
            .filter(|e| e["session_id"] == id.as_str())
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert!(
            !kinds.contains(&"backend_attempt_failed"),
            "the other target was tried: {events:#?}"
        );
        let failed: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e["kind"] == "backend_login_failed")
            .collect();
        assert_eq!(failed.len(), 1, "{events:#?}");
        assert_eq!(failed[0]["reason"], want);
        assert_eq!(failed[0]["outcome"], "failure");
    }
    // The backends agree: one refused login per connect, not two.
    assert_eq!(wait_server_logs(&env, auth_failed, 2).await, 2);
    assert_eq!(
        wait_server_logs(&env, "FATAL:  database \"nosuchdb\" does not exist", 2).await,
        2
    );
    // Non-retryable answers are not health failures: both targets stay in rotation.
    assert!(!env
        .audit_events()
        .iter()
        .any(|e| e["kind"] == "target_health_changed"));
}

fn one_target(when_all_unhealthy: &str, extra: &str) -> EnvOptions {
    EnvOptions {
        clusters: 1,
        pools_toml: Some(format!(
            "[[pools]]\nname = \"main\"\nwhen_all_unhealthy = \"{when_all_unhealthy}\"\ntargets = [{{ addr = \"{{c0}}\" }}]\n"
        )),
        ..two_targets(extra)
    }
}

/// Rewrite the pool's `when_all_unhealthy` in the configuration file and reload.
async fn reload_when_all_unhealthy(env: &Env, from: &str, to: &str) {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let key = format!("when_all_unhealthy = \"{from}\"");
    assert!(text.contains(&key));
    std::fs::write(
        &env.config_path,
        text.replace(&key, &format!("when_all_unhealthy = \"{to}\"")),
    )
    .unwrap();
    let (status, body) = env.admin("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
}

/// The audit events of one session, once its `session_ended` is there.
async fn session_events(env: &Env, id: &str) -> Vec<serde_json::Value> {
    env.wait_event(|e| e["kind"] == "session_ended" && e["session_id"] == id)
        .await;
    env.audit_events()
        .into_iter()
        .filter(|e| e["session_id"] == id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_target_is_down_fail_closed_refuses_and_fail_open_still_tries() {
    let env = Env::with(one_target("fail_closed", "")).await;
    let c0 = env.clusters[0].addr().to_string();
    wait_health(&env, &c0, "up").await;
    let c = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    assert_eq!(Env::whoami(&c).await, "wg0");
    drop(c);
    env.clusters[0]
        .stop(idgate::pgcluster::StopMode::Immediate)
        .await
        .unwrap();
    wait_health(&env, &c0, "down").await;
    assert_eq!(env.admin("GET", "/readyz").await.0, 503);

    // fail_closed: refused by idgate without trying the target.
    let err = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .err()
        .unwrap_or_else(|| panic!("no healthy target"));
    assert_eq!(sqlstate(&err), "08006", "{err}");
    let message = err.as_db_error().unwrap().message().to_owned();
    assert!(
        message.contains("no healthy database target") && message.contains("\"main\""),
        "{message}"
    );
    let events = session_events(&env, &refusal_session_id(&err)).await;
    let failed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "backend_login_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{events:#?}");
    assert_eq!(failed[0]["reason"], "all_targets_unhealthy");
    assert_eq!(failed[0]["pool"], "main");
    assert!(failed[0].get("route_forced").is_none(), "{}", failed[0]);
    assert!(
        !events.iter().any(|e| e["kind"] == "backend_attempt_failed"),
        "fail_closed tried a target: {events:#?}"
    );

    // fail_open (health carries over the reload): the dead target is tried anyway, and the
    // audit says the route was forced.
    reload_when_all_unhealthy(&env, "fail_closed", "fail_open").await;
    wait_health(&env, &c0, "down").await;
    let err = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .err()
        .unwrap_or_else(|| panic!("the only target is stopped"));
    assert_eq!(sqlstate(&err), "08006", "{err}");
    assert!(
        !err.as_db_error()
            .unwrap()
            .message()
            .contains("no healthy database target"),
        "{err}"
    );
    let events = session_events(&env, &refusal_session_id(&err)).await;
    let failed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "backend_login_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{events:#?}");
    assert_eq!(failed[0]["route_forced"], true, "{}", failed[0]);
    assert_eq!(failed[0]["reason"], "backend_connect_failed");
    assert!(
        failed[0]["detail"].as_str().unwrap().contains(&c0),
        "{}",
        failed[0]
    );
    let ended = events
        .iter()
        .find(|e| e["kind"] == "session_ended")
        .unwrap();
    assert_eq!(ended["route_forced"], true, "{ended}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_forces_a_session_onto_a_target_that_only_its_probe_calls_down() {
    let (_secret_dir, pw_file) = secret_file("probe.pw", "probe-s3cret\n");
    let env = Env::with(EnvOptions {
        hba: vec![
            "host all idgate_probe 127.0.0.1/32 scram-sha-256".into(),
            "host all all 127.0.0.1/32 trust".into(),
        ],
        ..one_target(
            "fail_closed",
            &format!("probe_user = \"idgate_probe\"\nprobe_password_file = \"{pw_file}\"\n"),
        )
    })
    .await;
    let c0 = env.clusters[0].addr().to_string();
    // No probe role: the cluster is running, but its probe login fails.
    wait_health(&env, &c0, "down").await;
    refused(
        env.pg_connect(Some(ALICE), &env.token(ALICE)).await,
        "08006",
        "no healthy database target",
    );
    reload_when_all_unhealthy(&env, "fail_closed", "fail_open").await;
    let c = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .expect("fail_open tries the down target, which logs the person in");
    assert_eq!(Env::whoami(&c).await, "wg0");
    let user = scalar(&c, "SELECT current_user").await;
    assert_eq!(user, "aad:alice@contoso.example");
    let routed = env.wait_event(|e| e["kind"] == "session_routed").await;
    assert_eq!(routed["route_forced"], true, "{routed}");
    assert_eq!(routed["target"], c0.as_str());
    // A successful forced session does not bring the target back: only probes do.
    wait_health(&env, &c0, "down").await;
    // Once the probe can log in, the target is up and routes are no longer forced.
    env.clusters[0]
        .exec("CREATE ROLE idgate_probe LOGIN PASSWORD 'probe-s3cret'")
        .await
        .unwrap();
    wait_health(&env, &c0, "up").await;
    let c = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    assert_eq!(Env::whoami(&c).await, "wg0");
    let normal = env.wait_kind("session_routed", 2).await;
    assert_eq!(normal.len(), 2);
    assert!(normal[1].get("route_forced").is_none(), "{}", normal[1]);
}

/// Two targets behind one pool with `balance = <balance>`, probed every 200 ms.
fn balanced(balance: &str, weights: [u32; 2]) -> EnvOptions {
    EnvOptions {
        pools_toml: Some(format!(
            "[[pools]]\nname = \"main\"\nbalance = \"{balance}\"\n\
             targets = [{{ addr = \"{{c0}}\", weight = {} }}, {{ addr = \"{{c1}}\", weight = {} }}]\n",
            weights[0], weights[1]
        )),
        ..two_targets("")
    }
}

/// `active_sessions` of the target serving cluster `addr`, as `GET /pools` reports it.
async fn active_sessions(env: &Env, addr: &str) -> u64 {
    pool_status(env, "main").await["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["addr"] == addr)
        .unwrap()["active_sessions"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_sessions_sends_new_sessions_to_the_target_with_fewer_open_ones() {
    let env = Env::with(balanced("least_sessions", [1, 1])).await;
    let addrs = [
        env.clusters[0].addr().to_string(),
        env.clusters[1].addr().to_string(),
    ];
    wait_health(&env, &addrs[0], "up").await;
    wait_health(&env, &addrs[1], "up").await;
    let token = env.token(ALICE);
    let connect = || env.pg_connect(Some(ALICE), &token);
    // One session stays open on one target ("busy"); the other target is "idle".
    let held = connect().await.unwrap();
    let busy = Env::whoami(&held).await;
    let (idle, idle_addr) = if busy == "wg0" {
        ("wg1", &addrs[1])
    } else {
        ("wg0", &addrs[0])
    };
    // Round-robin would alternate; least sessions picks the idle target every time.
    for i in 0..4 {
        let c = connect().await.unwrap();
        assert_eq!(Env::whoami(&c).await, idle, "session {i}");
        drop(c);
        for _ in 0..100 {
            if active_sessions(&env, idle_addr).await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(Env::whoami(&held).await, busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_balancing_spreads_sessions_by_weight() {
    let env = Env::with(balanced("weighted", [3, 1])).await;
    wait_health(&env, &env.clusters[0].addr().to_string(), "up").await;
    wait_health(&env, &env.clusters[1].addr().to_string(), "up").await;
    let mut on_wg0 = 0;
    for _ in 0..40 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap();
        if Env::whoami(&c).await == "wg0" {
            on_wg0 += 1;
        }
    }
    // Smooth weighted round-robin gives 30 of 40 to weight 3 (round-robin would give 20).
    assert!(
        (28..=32).contains(&on_wg0),
        "{on_wg0} of 40 on the weight-3 target"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_send_no_sni_reach_every_pool() {
    let env = Env::with(three_pools()).await;
    // The Python Redshift driver, to 127.0.0.1 (an address: TLS carries no SNI), native IdP.
    let run = |token: &str, database: &str| {
        let args: Vec<String> = [
            "--host",
            "127.0.0.1",
            "--port",
            &env.port().to_string(),
            "--database",
            database,
            "--mode",
            "idp_token",
            "--token-file",
            &env.token_file(token).display().to_string(),
            "--sslmode",
            "verify-ca",
            "--query",
            "SELECT name FROM whoami",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        tokio::task::block_in_place(|| crate::clients::run_python(&env, "rs_connect.py", &args))
    };
    let grouped = env
        .idp
        .mint(&TokenSpec::user(ALICE).groups(&[ANALYSTS_GROUP]));
    for (token, database, pool, rule) in [
        (env.token(ALICE), "wg1/dev", "wg1", "database"),
        (grouped, "dev", "wg2", "claim"),
        (env.token(ALICE), "dev", "wg0", "default"),
    ] {
        let Some((ok, out, err)) = run(&token, database) else {
            return;
        };
        assert!(ok, "{database}: {err}");
        let rows: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(rows, serde_json::json!([[pool]]), "{database}");
        let routed = env
            .wait_event(|e| e["kind"] == "session_routed" && e["pool"] == pool)
            .await;
        assert_eq!(routed["route_rule"], rule, "{routed}");
        assert!(routed["sni"].is_null(), "the driver sent SNI: {routed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_issuers() {
    let env = Env::with(EnvOptions {
        admin: true,
        ..EnvOptions::default()
    })
    .await;
    let token = env.token(ALICE);
    drop(env.pg_connect(Some(ALICE), &token).await.unwrap());
    // The issuer now accepts another audience only: the same token is refused.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let audiences = text
        .lines()
        .find(|l| l.starts_with("audiences = "))
        .unwrap()
        .to_owned();
    let other = text.replace(&audiences, "audiences = [\"api://someone-else\"]");
    std::fs::write(&env.config_path, &other).unwrap();
    let (status, body) = env.admin("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let since = env.audit_events().len();
    let err = env.pg_connect(Some(ALICE), &token).await.err().unwrap();
    assert_eq!(sqlstate(&err), "28000", "{err}");
    assert_eq!(env.wait_refusal_reason(since).await, "audience_mismatch");
    // Back to the original issuer settings: the token works again.
    std::fs::write(&env.config_path, &text).unwrap();
    let (status, body) = env.admin("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let c = env.pg_connect(Some(ALICE), &token).await.unwrap();
    assert_eq!(Env::whoami(&c).await, "wg0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_connect_failures_eject_a_target_without_waiting_for_a_probe() {
    // Probes run at start and then not for an hour: only live connects can eject wg1.
    let env = Env::with(EnvOptions {
        extra_toml: "[health]\ninterval = \"1h\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n".into(),
        ..two_targets("")
    })
    .await;
    let c1 = env.clusters[1].addr().to_string();
    wait_health(&env, &c1, "up").await;
    env.clusters[1]
        .stop(idgate::pgcluster::StopMode::Immediate)
        .await
        .unwrap();
    // Every connect succeeds (the refused attempt is retried on wg0 before the client sees it).
    for i in 0..20 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap_or_else(|e| panic!("connect {i} failed: {e}"));
        assert_eq!(Env::whoami(&c).await, "wg0", "connect {i}");
    }
    wait_health(&env, &c1, "down").await;
    let down = env
        .wait_event(|e| {
            e["kind"] == "target_health_changed"
                && e["target"] == c1.as_str()
                && e["health"] == "down"
        })
        .await;
    assert_eq!(down["pool"], "main");
    // `fall = 2`: after two failed live attempts wg1 is skipped and never tried again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let attempts = env
        .audit_events()
        .iter()
        .filter(|e| e["kind"] == "backend_attempt_failed")
        .inspect(|e| assert_eq!(e["reason"], "backend_connect_failed", "{e}"))
        .count();
    assert_eq!(attempts, 2);
}

/// A TCP server that accepts connections and never answers (a hung backend).
async fn silent_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_target_times_out_into_the_next_one_within_the_retry_budget() {
    let (hung, _server) = silent_server().await;
    let (hung2, _server2) = silent_server().await;
    let env = Env::with(EnvOptions {
        clusters: 1,
        pools_toml: Some(format!(
            "[[pools]]\nname = \"main\"\nlogin_timeout = \"500ms\"\nretry_budget = \"3s\"\n\
             targets = [{{ addr = \"{hung}\" }}, {{ addr = \"{{c0}}\" }}]\n\n\
             [[pools]]\nname = \"hung\"\nlogin_timeout = \"2s\"\nretry_budget = \"1s\"\n\
             targets = [{{ addr = \"{hung}\" }}, {{ addr = \"{hung2}\" }}]\n"
        )),
        extra_toml: "[routing]\ndefault_pool = \"main\"\n".into(),
        ..EnvOptions::default()
    })
    .await;
    // Round-robin puts the hung target first for every other session: each still lands on wg0.
    for i in 0..4 {
        let started = Instant::now();
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap_or_else(|e| panic!("connect {i} failed: {e}"));
        assert_eq!(Env::whoami(&c).await, "wg0");
        assert!(started.elapsed() < Duration::from_secs(3), "connect {i}");
    }
    let timed_out = env
        .wait_event(|e| e["kind"] == "backend_attempt_failed" && e["reason"] == "backend_timeout")
        .await;
    assert!(
        timed_out["detail"].as_str().unwrap().contains(&hung),
        "{timed_out}"
    );
    // Both targets hang: the budget (1 s) ends the attempt long before the login timeouts
    // would (2 s + 2 s), and the client gets 08006.
    let started = Instant::now();
    let err = connect_with(&env, &env.token(ALICE), "hung/dev", None)
        .await
        .err()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(sqlstate(&err), "08006", "{err}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let failed = env
        .wait_event(|e| e["kind"] == "backend_login_failed" && e["pool"] == "hung")
        .await;
    assert_eq!(failed["reason"], "backend_timeout", "{failed}");
}
