//! Pools, routing, health checks, drain, reload, shutdown and the admin API, checked by asking
//! the backend which cluster answered (`whoami`), not by reading idgate's own state.

use std::time::{Duration, Instant};

use idgate::devidp::TokenSpec;

use crate::harness::{free_port, sqlstate, Env, EnvOptions, ALICE, ANALYSTS_GROUP};

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
    let rules: Vec<(String, String)> = env
        .audit_events()
        .iter()
        .filter(|e| e["kind"] == "session_routed")
        .map(|e| {
            (
                e["route_rule"].as_str().unwrap().to_owned(),
                e["pool"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
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
        .wait_event(|e| e["kind"] == "backend_login_failed")
        .await;
    assert_eq!(skipped["reason"], "backend_refused_53300");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_a_pool_and_removes_a_target_without_cutting_sessions() {
    let env = Env::with(two_targets("")).await;
    let open = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    let before = Env::whoami(&open).await;
    // New config: main keeps only wg0; the new pool "extra" gets wg1.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let new_pools = format!(
        "[[pools]]\nname = \"main\"\ntargets = [{{ addr = \"{}\" }}]\n\n[[pools]]\nname = \"extra\"\ntargets = [{{ addr = \"{}\" }}]\n",
        env.clusters[0].addr(),
        env.clusters[1].addr()
    );
    let start = text.find("[[pools]]").unwrap();
    let end = text.find("[audit]").unwrap();
    let updated = format!("{}{}\n{}", &text[..start], new_pools, &text[end..]);
    std::fs::write(&env.config_path, &updated).unwrap();
    let (status, body) = env.admin("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("extra"), "{body}");
    // The open session keeps working on whatever target it had.
    assert_eq!(Env::whoami(&open).await, before);
    for _ in 0..4 {
        let c = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap();
        assert_eq!(Env::whoami(&c).await, "wg0");
    }
    let c = connect_with(&env, &env.token(ALICE), "extra/dev", None)
        .await
        .unwrap();
    assert_eq!(Env::whoami(&c).await, "wg1");
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
    let mut reloads: Vec<serde_json::Value> = Vec::new();
    for _ in 0..100 {
        reloads = env
            .audit_events()
            .into_iter()
            .filter(|e| e["kind"] == "config_reloaded")
            .collect();
        if reloads.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let text = std::fs::read_to_string(&env.config_path).unwrap().replace(
        "addr = \"127.0.0.1:0\"",
        &format!("addr = \"127.0.0.1:{port}\""),
    ) + &format!(
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
