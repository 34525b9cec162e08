//! Test harness: a dev IdP on port 0, throw-away PostgreSQL clusters on free ports (run as the
//! `postgres` OS user under root), and idgate in-process on port 0.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use idgate::{
    auth::TokenVersion,
    config::Config,
    devcerts::DevCa,
    devidp::{DevIdp, DevIdpSettings, TokenSpec},
    pgcluster::{ClusterSettings, PgCluster},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const TENANT: &str = "00000000-0000-4000-8000-00000000c0de";
pub const OTHER_TENANT: &str = "11111111-0000-4000-8000-0000000000ff";
pub const APP_GUID: &str = "00000000-0000-4000-8000-0000000a99e5";
pub const ALICE: &str = "alice@contoso.example";
pub const BOB: &str = "bob@contoso.example";
pub const ANALYSTS_GROUP: &str = "0b6a9a3e-6f4a-4c1e-9a7e-0c5d1f7e2a11";

/// A port nothing listens on right now (for processes that must bind a fixed port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a missing tool must fail the test (set by `.ci/run`).
pub fn require_all() -> bool {
    std::env::var("IDGATE_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Skip (or, under `IDGATE_TEST_REQUIRE_ALL=1`, fail) because `what` is missing.
pub fn missing_tool(what: &str) {
    if require_all() {
        panic!("required test tool missing: {what} (IDGATE_TEST_REQUIRE_ALL=1)");
    }
    eprintln!("SKIPPED: {what} is not available");
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// SQL run in the `dev` database of every default cluster.
pub const SETUP_SQL: &str = r#"
CREATE ROLE "aad:alice@contoso.example" LOGIN;
CREATE ROLE "aad:bob@contoso.example" LOGIN;
CREATE TABLE demo (id int PRIMARY KEY, note text);
INSERT INTO demo VALUES (1, 'one'), (2, 'two');
GRANT SELECT ON demo TO "aad:alice@contoso.example";
"#;

/// Start a cluster with the default trust line for 127.0.0.1, a `dev` database and [`SETUP_SQL`].
pub async fn start_cluster(name: &str, hba: Vec<String>) -> PgCluster {
    let mut settings = ClusterSettings::new(name);
    settings.hba = hba;
    settings.bindir = std::env::var_os("IDGATE_PG_BINDIR").map(PathBuf::from);
    let cluster = PgCluster::start(settings)
        .await
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    cluster.exec("CREATE DATABASE dev").await.unwrap();
    cluster.exec_in("dev", SETUP_SQL).await.unwrap();
    cluster
        .exec_in(
            "dev",
            &format!("CREATE TABLE whoami (name text); INSERT INTO whoami VALUES ('{name}'); GRANT SELECT ON whoami TO PUBLIC;"),
        )
        .await
        .unwrap();
    // synchronous_commit is off in test clusters: make the setup survive `stop -m immediate`.
    cluster.exec("CHECKPOINT").await.unwrap();
    cluster
}

/// A change to the generated configuration.
pub type Tweak = Box<dyn FnOnce(&mut Config, &Env0) + Send>;

/// What a test environment should look like.
pub struct EnvOptions {
    /// hba lines of the default cluster (before the harness defaults).
    pub hba: Vec<String>,
    /// Change the generated configuration before the gateway starts.
    pub tweak: Tweak,
    /// Number of clusters (targets of the one pool, unless `pools_toml` is set).
    pub clusters: usize,
    /// `[[pools]]` sections replacing the default pool; `{c0}`, `{c1}`… stand for the clusters'
    /// addresses.
    pub pools_toml: Option<String>,
    /// TOML appended to the generated configuration (e.g. `[routing]`, `[health]`).
    pub extra_toml: String,
    /// Start an admin listener.
    pub admin: bool,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            hba: vec!["host all all 127.0.0.1/32 trust".into()],
            tweak: Box::new(|_, _| {}),
            clusters: 1,
            pools_toml: None,
            extra_toml: String::new(),
            admin: false,
        }
    }
}

/// The parts that exist before the gateway starts (given to `tweak`).
pub struct Env0 {
    pub dir: tempfile::TempDir,
    pub idp: DevIdp,
    pub clusters: Vec<PgCluster>,
    pub ca_path: PathBuf,
}

/// A running environment. Dropping it stops the gateway and the clusters.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub idp: DevIdp,
    pub clusters: Vec<PgCluster>,
    pub ca_path: PathBuf,
    pub ca_pem: String,
    pub addr: SocketAddr,
    pub audit_path: PathBuf,
    #[allow(dead_code)]
    pub config: Config,
    /// `http://127.0.0.1:PORT` of the admin listener, when started.
    pub admin_url: Option<String>,
    /// The configuration file reloads read.
    pub config_path: PathBuf,
    shutdown: CancellationToken,
    gateway: Option<JoinHandle<Result<(), idgate::RunError>>>,
    idp_cancel: CancellationToken,
}

impl Env {
    pub async fn start() -> Env {
        Self::with(EnvOptions::default()).await
    }

    pub async fn with(opts: EnvOptions) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("idgate-test-")
            .tempdir()
            .unwrap();
        let ca = DevCa::new("idgate test CA").unwrap();
        let server = ca
            .server_cert(&[
                "localhost",
                "127.0.0.1",
                "wg0.db.idgate.test",
                "wg1.db.idgate.test",
                "wg2.db.idgate.test",
            ])
            .unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("idgate.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.path().join("idgate-key.pem"), &server.key_pem).unwrap();

        let idp_cancel = CancellationToken::new();
        let idp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut settings = DevIdpSettings::example(TENANT);
        settings.app_guid = APP_GUID.into();
        let idp = DevIdp::start(idp_listener, settings, idp_cancel.clone())
            .await
            .unwrap();

        let mut clusters = Vec::new();
        let starts =
            (0..opts.clusters).map(|i| start_cluster_named(format!("wg{i}"), opts.hba.clone()));
        for c in futures_util::future::join_all(starts).await {
            clusters.push(c);
        }
        let mut targets: Vec<String> = clusters
            .iter()
            .map(|c| format!("{{ addr = \"{}\" }}", c.addr()))
            .collect();
        if targets.is_empty() {
            // `clusters: 0`: the test brings its own backend and sets the targets in `tweak`.
            targets.push("{ addr = \"127.0.0.1:1\" }".into());
        }
        let mut pools = opts.pools_toml.clone().unwrap_or_else(|| {
            format!(
                "[[pools]]\nname = \"main\"\ntargets = [{}]\n",
                targets.join(", ")
            )
        });
        for (i, c) in clusters.iter().enumerate() {
            pools = pools.replace(&format!("{{c{i}}}"), &c.addr().to_string());
        }
        let toml = config_toml(&idp.authority(), &pools, &opts.extra_toml);
        let config_path = dir.path().join("idgate.toml");
        std::fs::write(&config_path, &toml).unwrap();
        let mut config = Config::from_toml(&toml, "test", dir.path(), &HashMap::new())
            .unwrap_or_else(|e| panic!("{e}"));
        let env0 = Env0 {
            dir,
            idp,
            clusters,
            ca_path,
        };
        (opts.tweak)(&mut config, &env0);
        let Env0 {
            dir,
            idp,
            clusters,
            ca_path,
        } = env0;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (admin, admin_url) = if opts.admin {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", l.local_addr().unwrap());
            (Some(l), Some(url))
        } else {
            (None, None)
        };
        let shutdown = CancellationToken::new();
        let audit_path = config
            .audit
            .file_path
            .clone()
            .unwrap_or_else(|| dir.path().join("audit.jsonl"));
        let path = config_path.clone();
        let base = dir.path().to_path_buf();
        let loader: idgate::ConfigLoader = Arc::new(move || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            Config::from_toml(&text, "idgate.toml", &base, &HashMap::new())
        });
        let options = idgate::RunOptions {
            loader: Some(loader),
            ..Default::default()
        };
        let gateway = tokio::spawn(idgate::run_with(
            idgate::Listeners {
                client: listener,
                admin,
            },
            config.clone(),
            options,
            shutdown.clone(),
        ));
        Env {
            dir,
            idp,
            clusters,
            ca_path,
            ca_pem: ca.cert_pem(),
            addr,
            audit_path,
            config,
            admin_url,
            config_path,
            shutdown,
            gateway: Some(gateway),
            idp_cancel,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A fresh v2 user token for `upn` with the required scope.
    pub fn token(&self, upn: &str) -> String {
        self.idp.mint(&TokenSpec::user(upn))
    }

    pub fn token_v1(&self, upn: &str) -> String {
        self.idp
            .mint(&TokenSpec::user(upn).version(TokenVersion::V1))
    }

    /// Write `token` to a file (clients read tokens from files, never argv).
    pub fn token_file(&self, token: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("token-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, token).unwrap();
        path
    }

    /// Stop the gateway and wait until the audit trail is flushed.
    /// Begin shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Wait for the gateway to finish (after [`Env::begin_shutdown`]).
    pub async fn wait_gateway(&mut self) {
        if let Some(handle) = self.gateway.take() {
            tokio::time::timeout(Duration::from_secs(60), handle)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    /// GET or POST on the admin API; returns (status, body).
    pub async fn admin(&self, method: &str, path: &str) -> (u16, String) {
        let url = format!(
            "{}{path}",
            self.admin_url.as_ref().expect("admin listener not started")
        );
        let client = reqwest::Client::new();
        let req = if method == "POST" {
            client.post(url)
        } else {
            client.get(url)
        };
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    /// One series of the admin `/metrics`, e.g. `idgate_audit_events_total{what="spooled"}`
    /// (panics when the listener answers an error or the series is missing).
    pub async fn metric(&self, series: &str) -> f64 {
        let (status, body) = self.admin("GET", "/metrics").await;
        assert_eq!(status, 200, "{body}");
        metric_value(&body, series).unwrap_or_else(|| panic!("/metrics has no {series}:\n{body}"))
    }

    /// This environment's configuration file for an `idgate serve` process listening on `port`,
    /// with an audit file and spool of its own (a spool has one writer).
    pub fn process_config(&self, port: u16) -> String {
        std::fs::read_to_string(&self.config_path)
            .unwrap()
            .replace(
                "addr = \"127.0.0.1:0\"",
                &format!("addr = \"127.0.0.1:{port}\""),
            )
            .replace(
                "[audit]\nfile_path = \"audit.jsonl\"",
                &format!(
                    "[audit]\nfile_path = \"audit-{port}.jsonl\"\nspool_dir = \"spool-{port}\""
                ),
            )
    }

    /// Which cluster answers a session (the `whoami` marker table).
    pub async fn whoami(client: &tokio_postgres::Client) -> String {
        let rows = client
            .simple_query("SELECT name FROM whoami")
            .await
            .unwrap();
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap()
    }

    pub async fn stop_gateway(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.gateway.take() {
            tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    /// All audit events written so far.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        read_events(&self.audit_path)
    }

    /// Wait until an audit event matches `pred`, and return it.
    pub async fn wait_event(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        for _ in 0..200 {
            if let Some(e) = self.audit_events().into_iter().find(|e| pred(e)) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no matching audit event; have:\n{:#?}", self.audit_events());
    }

    /// Wait until at least `n` audit events of `kind` are written (up to 5 s), and return all
    /// events of that kind (the caller asserts how many there are).
    pub async fn wait_kind(&self, kind: &str, n: usize) -> Vec<serde_json::Value> {
        let of_kind = || -> Vec<serde_json::Value> {
            self.audit_events()
                .into_iter()
                .filter(|e| e["kind"] == kind)
                .collect()
        };
        for _ in 0..200 {
            let events = of_kind();
            if events.len() >= n {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        of_kind()
    }

    /// Wait for the `auth_failed` event of a refused login and return its reason.
    pub async fn wait_refusal_reason(&self, since: usize) -> String {
        for _ in 0..200 {
            let events = self.audit_events();
            if let Some(e) = events
                .iter()
                .skip(since)
                .find(|e| e["kind"] == "auth_failed")
            {
                return e["reason"].as_str().unwrap_or_default().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "no auth_failed event after index {since}; have:\n{:#?}",
            self.audit_events()
        );
    }

    /// rustls client config trusting the test CA.
    pub fn client_tls(&self, alpn: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in idgate::net::tls::parse_certs(self.ca_pem.as_bytes(), "ca").unwrap() {
            roots.add(cert).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        if alpn {
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        Arc::new(config)
    }

    /// tokio-postgres through idgate with `token` as the password (verify-full via rustls).
    pub async fn pg_connect(
        &self,
        user: Option<&str>,
        token: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.pg_connect_db(user, token, "dev").await
    }

    pub async fn pg_connect_db(
        &self,
        user: Option<&str>,
        token: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.pg_connect_port(self.port(), user, token, db).await
    }

    /// Like [`Env::pg_connect_db`], to another gateway on `port` that uses this env's TLS files.
    pub async fn pg_connect_port(
        &self,
        port: u16,
        user: Option<&str>,
        token: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("localhost")
            .port(port)
            .dbname(db)
            .password(token)
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        cfg.user(user.unwrap_or(ALICE));
        cfg.connect_timeout(Duration::from_secs(20));
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*self.client_tls(false)).clone());
        let (client, conn) = cfg.connect(tls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// The generated configuration: listener, issuer, identity, `pools`, audit, then `extra`.
pub fn config_toml(authority: &str, pools: &str, extra: &str) -> String {
    format!(
        r#"
[listener]
addr = "127.0.0.1:0"
tls_cert_file = "idgate.pem"
tls_key_file = "idgate-key.pem"
handshake_timeout = "10s"

[[issuers]]
name = "test-idp"
authority = "{authority}"
tenants = ["{TENANT}"]
audiences = ["api://idgate", "{APP_GUID}"]
required_scopes = ["jdbc_login"]
required_app_roles = ["Gateway.Connect"]
jwks_refetch_floor = "1s"

[identity.groups]
"{ANALYSTS_GROUP}" = "analysts"

{pools}

[audit]
file_path = "audit.jsonl"

{extra}
"#
    )
}

async fn start_cluster_named(name: String, hba: Vec<String>) -> PgCluster {
    start_cluster(&name, hba).await
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.idp_cancel.cancel();
    }
}

pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The value of `series` (a metric name with its labels exactly as rendered, e.g.
/// `idgate_audit_healthy` or `idgate_audit_errors_total{what="ship"}`) in a Prometheus text
/// exposition; `None` when no line is exactly that series.
pub fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        if name == series {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// The string fields `a` and `b` (missing: empty) of every event of `kind`.
pub fn field_pairs(
    events: &[serde_json::Value],
    kind: &str,
    a: &str,
    b: &str,
) -> Vec<(String, String)> {
    let field = |e: &serde_json::Value, f: &str| e[f].as_str().unwrap_or_default().to_owned();
    events
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| (field(e, a), field(e, b)))
        .collect()
}

/// The error of a connect that must be refused with `code` and a server message containing
/// `fragment`.
pub fn refused<T>(
    result: Result<T, tokio_postgres::Error>,
    code: &str,
    fragment: &str,
) -> tokio_postgres::Error {
    let Err(err) = result else {
        panic!("expected a refusal with {code} ({fragment:?}), the connect succeeded");
    };
    assert_eq!(sqlstate(&err), code, "{err}");
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains(fragment), "{fragment:?} not in {err}");
    err
}

/// The SQLSTATE of a tokio-postgres error.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("<no db error: {e}>"))
}

/// The Python interpreter with the client drivers installed, if available.
pub fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("IDGATE_TEST_PYTHON") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Some(p);
        }
    }
    let venv = repo_root().join(".venv/bin/python");
    venv.exists().then_some(venv)
}

/// A `Write` that appends to a shared buffer: a log capture for `tracing_subscriber`.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
