//! OpenTelemetry: one span per session with its phases as child spans, exported over OTLP/HTTP to
//! a real local receiver; an absent collector breaks nothing.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::harness::{free_port, Env, EnvOptions, ALICE};

/// Run `idgate serve` with `otlp_endpoint`, log in once, stop it; returns whether the login worked.
async fn serve_once(env: &Env, endpoint: &str) -> bool {
    serve_once_with(env, |text| {
        text + &format!("\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n")
    })
    .await
    .0
}

/// Run `idgate serve` with the environment's configuration changed by `edit`, log in once and
/// stop it with SIGTERM; returns whether the login worked, and the process's stdout.
pub(crate) async fn serve_once_with(
    env: &Env,
    edit: impl FnOnce(String) -> String,
) -> (bool, String) {
    let port = free_port();
    let text = edit(env.process_config(port)) + "\n[shutdown]\ngrace_period = \"1s\"\n";
    let path = env.dir.path().join(format!("serve-{port}.toml"));
    std::fs::write(&path, text).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut ok = false;
    for _ in 0..100 {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("localhost")
            .port(port)
            .dbname("dev")
            .user(ALICE)
            .password(env.token(ALICE));
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*env.client_tls(false)).clone());
        if let Ok((client, conn)) = cfg.connect(tls).await {
            tokio::spawn(conn);
            ok = client.simple_query("SELECT 1").await.is_ok();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (ok, String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_exported_as_spans_over_otlp() {
    let env = Env::with(EnvOptions::default()).await;
    // A real HTTP receiver for OTLP/HTTP protobuf.
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let store = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                store.lock().unwrap().push(body.to_vec());
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    assert!(
        serve_once(&env, &endpoint).await,
        "login through idgate with OTLP on"
    );
    let all: Vec<u8> = bodies.lock().unwrap().concat();
    assert!(!all.is_empty(), "no OTLP export reached the receiver");
    // Decode the OTLP/HTTP protobuf bodies: the phases are children of the session span.
    use prost::Message;
    let spans: Vec<opentelemetry_proto::tonic::trace::v1::Span> = bodies
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| {
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                &b[..],
            )
            .unwrap()
            .resource_spans
        })
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .collect();
    let session = spans
        .iter()
        .find(|s| s.name == "session")
        .unwrap_or_else(|| panic!("no session span in {:?}", names(&spans)));
    for phase in [
        "handshake",
        "token_exchange",
        "authenticate",
        "backend_login",
        "relay",
    ] {
        let span = spans
            .iter()
            .find(|s| s.name == phase)
            .unwrap_or_else(|| panic!("span {phase} not exported: {:?}", names(&spans)));
        assert_eq!(span.trace_id, session.trace_id, "{phase}: another trace");
        assert_eq!(
            span.parent_span_id, session.span_id,
            "{phase} is not a child of the session span"
        );
        assert!(span.start_time_unix_nano >= session.start_time_unix_nano);
        assert!(span.end_time_unix_nano <= session.end_time_unix_nano);
    }
    assert!(
        all.windows(6).any(|w| w == b"idgate"),
        "service.name idgate"
    );
    // No token in the exported spans.
    let token = env.token(ALICE);
    let sig = token.rsplit('.').next().unwrap();
    assert!(!all.windows(sig.len()).any(|w| w == sig.as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_collector_breaks_nothing() {
    let env = Env::with(EnvOptions::default()).await;
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    assert!(
        serve_once(&env, &endpoint).await,
        "login through idgate with an unreachable collector"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_reach_an_otlp_collector_and_survive_its_outage() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A collector that is down (503) for its first three requests.
    let records: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (store, count) = (records.clone(), calls.clone());
    let app = axum::Router::new().route(
        "/v1/logs",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (store, count) = (store.clone(), count.clone());
            async move {
                if count.fetch_add(1, Ordering::SeqCst) < 3 {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                for rl in v["resourceLogs"].as_array().unwrap() {
                    for sl in rl["scopeLogs"].as_array().unwrap() {
                        store
                            .lock()
                            .unwrap()
                            .extend(sl["logRecords"].as_array().unwrap().iter().cloned());
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let env = Env::with(EnvOptions {
        tweak: Box::new(move |c, _| c.audit.otlp_endpoint = Some(endpoint)),
        ..EnvOptions::default()
    })
    .await;
    let c = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    let bad = env.token(ALICE).replace('.', "");
    assert!(env.pg_connect(Some(ALICE), &bad).await.is_err());
    // Every event in the file sink reaches the collector once it is back (at least once).
    let wanted = env.wait_event(|e| e["kind"] == "auth_failed").await;
    let mut missing = Vec::new();
    for _ in 0..200 {
        let have: Vec<String> = records
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| {
                r["attributes"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["key"] == "idgate.event_id"))
                    .and_then(|x| x["value"]["stringValue"].as_str().map(str::to_owned))
            })
            .collect();
        missing = env
            .audit_events()
            .iter()
            .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
            .filter(|id| !have.contains(id))
            .collect();
        if missing.is_empty() && have.contains(&wanted["event_id"].as_str().unwrap().to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        missing.is_empty(),
        "events never shipped over OTLP: {missing:?}"
    );
    assert!(calls.load(Ordering::SeqCst) > 3, "the outage was retried");
    let recs = records.lock().unwrap();
    let failed = recs
        .iter()
        .find(|r| {
            r["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["value"]["stringValue"] == "auth_failed")
        })
        .unwrap();
    assert_eq!(failed["severityText"], "WARN");
    assert!(failed["body"]["stringValue"]
        .as_str()
        .unwrap()
        .contains("malformed_token"));
    let all = serde_json::to_string(&*recs).unwrap();
    assert!(!all.contains(&bad), "a token reached the collector");
}

fn names(spans: &[opentelemetry_proto::tonic::trace::v1::Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}
