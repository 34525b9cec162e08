//! `idgate dev-idp` and `idgate dev`: the local issuer and the one-command quickstart.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use idgate::{
    auth::TokenVersion,
    config::Config,
    devcerts::DevCa,
    devidp::{DevClient, DevIdp, DevIdpSettings, DevUser, TokenSpec},
    pgcluster::{find_bindir, ClusterSettings, PgCluster},
};
use tokio_util::sync::CancellationToken;

/// Tenant id used by the dev IdP unless told otherwise.
const DEV_TENANT: &str = "00000000-0000-4000-8000-00000000c0de";
/// App GUID (v2 audience) of the dev gateway registration.
const DEV_APP_GUID: &str = "00000000-0000-4000-8000-0000000a99e5";

/// Options of `idgate dev-idp`.
#[derive(Args, Debug)]
pub struct DevIdpArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8400")]
    addr: String,
    /// Tenant id (GUID).
    #[arg(long, default_value = DEV_TENANT)]
    tenant: String,
    /// Users as `upn:password[:group,group]` (repeatable).
    #[arg(long = "user", default_values = ["alice@contoso.example:dev", "bob@contoso.example:dev"])]
    users: Vec<String>,
    /// App-only clients as `client_id:secret[:role,role]` (repeatable).
    #[arg(long = "client", default_values = ["etl-job:dev-secret:db.connect"])]
    clients: Vec<String>,
    /// Issue v1 access tokens instead of v2.
    #[arg(long)]
    v1: bool,
    /// Base URL clients and idgate use to reach this IdP, when it differs from the listen
    /// address (e.g. `http://idp:8400` in docker-compose).
    #[arg(long)]
    public_url: Option<String>,
}

/// Options of `idgate dev-certs`.
#[derive(Args, Debug)]
pub struct DevCertsArgs {
    /// Directory to write ca.pem, idgate.pem and idgate-key.pem into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// DNS names and IP addresses of the server certificate (repeatable).
    #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
    names: Vec<String>,
    /// Replace files that already exist.
    #[arg(long)]
    force: bool,
}

/// The files `idgate dev-certs` writes.
const DEV_CERT_FILES: [&str; 3] = ["ca.pem", "idgate.pem", "idgate-key.pem"];

/// `idgate dev-certs`. Never overwrites a file unless `--force`: when all three exist they are
/// kept (so docker-compose can run it on every start); when only some do, it refuses.
pub fn dev_certs(args: DevCertsArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let existing: Vec<&str> = DEV_CERT_FILES
        .into_iter()
        .filter(|f| args.dir.join(f).exists())
        .collect();
    if !args.force && existing.len() == DEV_CERT_FILES.len() {
        println!(
            "kept the existing {}/{{ca.pem,idgate.pem,idgate-key.pem}} (--force replaces them)",
            args.dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !args.force && !existing.is_empty() {
        eprintln!(
            "{} already holds {} (another CA, e.g. from `idgate ca init`?); not overwriting it: use another --dir, or --force",
            args.dir.display(),
            existing.join(", ")
        );
        return Ok(ExitCode::from(2));
    }
    let ca = DevCa::new("idgate dev CA")?;
    let names: Vec<&str> = args.names.iter().map(String::as_str).collect();
    let server = ca.server_cert(&names)?;
    write(&args.dir.join("ca.pem"), &ca.cert_pem())?;
    write(&args.dir.join("idgate.pem"), &server.cert_pem)?;
    write(&args.dir.join("idgate-key.pem"), &server.key_pem)?;
    println!(
        "wrote {}/{{ca.pem,idgate.pem,idgate-key.pem}} for {} (development only)",
        args.dir.display(),
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// Options of `idgate dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// Port of the gateway on 127.0.0.1.
    #[arg(long, default_value_t = 5439)]
    port: u16,
    /// PostgreSQL server binaries (default: `pg_config --bindir`, then /usr/lib/postgresql/*/bin).
    #[arg(long, env = "IDGATE_PG_BINDIR")]
    pg_bindir: Option<PathBuf>,
}

fn dev_settings(
    tenant: &str,
    users: &[String],
    clients: &[String],
    v1: bool,
    public_url: Option<String>,
) -> anyhow::Result<DevIdpSettings> {
    let mut dev_users = Vec::new();
    for (i, spec) in users.iter().enumerate() {
        let mut parts = spec.splitn(3, ':');
        let upn = parts.next().unwrap_or_default().to_owned();
        let password = parts
            .next()
            .context("--user needs upn:password")?
            .to_owned();
        let groups = parts
            .next()
            .map(|g| g.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        dev_users.push(DevUser {
            upn,
            password,
            oid: format!("00000000-0000-4000-a000-{:012x}", i + 1),
            groups,
        });
    }
    let mut dev_clients = Vec::new();
    for spec in clients {
        let mut parts = spec.splitn(3, ':');
        let client_id = parts.next().unwrap_or_default().to_owned();
        let secret = parts
            .next()
            .context("--client needs client_id:secret")?
            .to_owned();
        let roles = parts
            .next()
            .map(|g| g.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        dev_clients.push(DevClient {
            client_id,
            secret,
            roles,
        });
    }
    Ok(DevIdpSettings {
        tenant: tenant.to_owned(),
        app_id_uri: "api://idgate".into(),
        app_guid: DEV_APP_GUID.into(),
        scope: "jdbc_login".into(),
        users: dev_users,
        clients: dev_clients,
        token_lifetime: Duration::from_secs(3600),
        default_version: if v1 {
            TokenVersion::V1
        } else {
            TokenVersion::V2
        },
        public_url,
    })
}

/// `idgate dev-idp`.
pub async fn dev_idp(args: DevIdpArgs) -> anyhow::Result<ExitCode> {
    crate::init_tracing(idgate::config::LogFormat::Text, "info");
    let settings = dev_settings(
        &args.tenant,
        &args.users,
        &args.clients,
        args.v1,
        args.public_url.clone(),
    )?;
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let cancel = CancellationToken::new();
    crate::spawn_signal_handler(cancel.clone());
    let idp = DevIdp::start(listener, settings, cancel.clone()).await?;
    let authority = idp.authority();
    let tenant = idp.tenant().to_owned();
    println!("dev IdP (development only) at {authority}, tenant {tenant}");
    println!("  v2 discovery: {authority}/{tenant}/v2.0/.well-known/openid-configuration");
    println!("  v1 discovery: {authority}/{tenant}/.well-known/openid-configuration");
    println!("get a user token:");
    println!(
        "  curl -s -d grant_type=password -d client_id=cli -d username=alice@contoso.example -d password=dev \
         -d scope=api://idgate/jdbc_login {authority}/{tenant}/oauth2/v2.0/token"
    );
    println!("get an app-only token:");
    println!(
        "  curl -s -d grant_type=client_credentials -d client_id=etl-job -d client_secret=dev-secret \
         -d scope=api://idgate/.default {authority}/{tenant}/oauth2/v2.0/token"
    );
    println!("rotate the signing key: curl -s -X POST {authority}/admin/rotate");
    cancel.cancelled().await;
    Ok(ExitCode::SUCCESS)
}

/// `idgate dev`.
pub async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    crate::init_tracing(idgate::config::LogFormat::Text, "info,idgate=info");
    let bindir = match find_bindir(args.pg_bindir.as_deref()) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("idgate dev needs PostgreSQL's server binaries: {e}");
            eprintln!("Install them (Debian/Ubuntu: apt-get install postgresql) or run the same setup with `docker compose up` (see README).");
            return Ok(ExitCode::from(3));
        }
    };
    let work = tempfile::Builder::new()
        .prefix("idgate-dev-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let dir = work.path().to_path_buf();

    // Certificates: a throw-away CA and a server certificate for localhost.
    let ca = DevCa::new("idgate dev CA")?;
    let server = ca.server_cert(&["localhost", "127.0.0.1", "::1"])?;
    write(&dir.join("ca.pem"), &ca.cert_pem())?;
    write(&dir.join("idgate.pem"), &server.cert_pem)?;
    write(&dir.join("idgate-key.pem"), &server.key_pem)?;

    let cancel = CancellationToken::new();
    let fast = CancellationToken::new();
    crate::spawn_signal_handler_two_stage(cancel.clone(), fast.clone());
    let idp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let idp = DevIdp::start(
        idp_listener,
        dev_settings(
            DEV_TENANT,
            &[
                "alice@contoso.example:dev".into(),
                "bob@contoso.example:dev".into(),
            ],
            &[],
            false,
            None,
        )?,
        cancel.clone(),
    )
    .await?;

    println!("starting a throw-away PostgreSQL cluster ...");
    let cluster = PgCluster::start(ClusterSettings {
        name: "wg-demo".into(),
        hba: vec!["host all all 127.0.0.1/32 trust".into()],
        bindir: Some(bindir),
        ..ClusterSettings::default()
    })
    .await?;
    cluster.exec(r#"CREATE DATABASE dev;"#).await?;
    cluster
        .exec_in(
            "dev",
            r#"CREATE ROLE "aad:alice@contoso.example" LOGIN;
               CREATE ROLE "aad:bob@contoso.example" LOGIN;
               CREATE TABLE demo (id int PRIMARY KEY, note text);
               INSERT INTO demo VALUES (1, 'hello from behind idgate'), (2, 'bob has no SELECT on this table');
               GRANT SELECT ON demo TO "aad:alice@contoso.example";"#,
        )
        .await?;

    let audit_path = dir.join("audit.jsonl");
    let config_text = format!(
        r#"# written by `idgate dev`
[listener]
addr = "127.0.0.1:{port}"
tls_cert_file = "idgate.pem"
tls_key_file = "idgate-key.pem"

[[issuers]]
name = "dev-idp"
authority = "{authority}"
tenants = ["{tenant}"]
audiences = ["api://idgate", "{guid}"]
required_scopes = ["jdbc_login"]
required_app_roles = ["db.connect"]

[[pools]]
name = "wg-demo"
backend_auth = "trust"
targets = [{{ addr = "{pg}" }}]

[audit]
file_path = "audit.jsonl"
"#,
        port = args.port,
        authority = idp.authority(),
        tenant = DEV_TENANT,
        guid = DEV_APP_GUID,
        pg = cluster.addr(),
    );
    let config_path = dir.join("idgate.toml");
    write(&config_path, &config_text)?;
    let config = Config::load(&config_path, &HashMap::new()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind(config.listener.addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another idgate running? use --port)",
                config.listener.addr
            )
        })?;

    let token = idp.mint(
        &TokenSpec::user("alice@contoso.example").oid("00000000-0000-4000-a000-000000000001"),
    );
    let token_file = dir.join("alice.token");
    write(&token_file, &token)?;
    let ca_path = dir.join("ca.pem");
    println!();
    println!("idgate dev is running (Ctrl-C stops it and removes everything).");
    println!(
        "  gateway:  127.0.0.1:{}   dev IdP: {}   PostgreSQL: {}",
        args.port,
        idp.authority(),
        cluster.addr()
    );
    println!("  config:   {}", config_path.display());
    println!("  audit:    {}", audit_path.display());
    println!();
    println!("psql as alice (a fresh dev token, valid 1h):");
    println!(
        "PGPASSWORD=\"$(cat {tok})\" PGSSLROOTCERT={ca} psql \"host=localhost port={port} dbname=dev user=alice@contoso.example sslmode=verify-full\" -c 'SELECT current_user, * FROM demo'",
        tok = token_file.display(),
        ca = ca_path.display(),
        port = args.port
    );
    println!();
    println!("redshift_connector (pip install redshift_connector==2.2.0 boto3):");
    println!(
        "SSL_CERT_FILE={ca} python3 -c \"import redshift_connector as r; c = r.connect(host='localhost', port={port}, database='dev', credentials_provider='IdpTokenAuthPlugin', token=open('{tok}').read(), token_type='EXT_JWT', sslmode='verify-full'); cur = c.cursor(); cur.execute('select * from demo'); print(cur.fetchall())\"",
        ca = ca_path.display(),
        tok = token_file.display(),
        port = args.port
    );
    println!();
    let bob_token = dir.join("bob.token");
    println!("bob is not granted SELECT on demo; a token for him from the dev IdP's token endpoint, then psql as bob:");
    println!(
        "curl -s -d grant_type=password -d client_id=cli -d username=bob@contoso.example -d password=dev -d scope=api://idgate/jdbc_login {}/{}/oauth2/v2.0/token | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])' > {bob}",
        idp.authority(),
        DEV_TENANT,
        bob = bob_token.display(),
    );
    println!(
        "PGPASSWORD=\"$(cat {bob})\" PGSSLROOTCERT={ca} psql \"host=localhost port={port} dbname=dev user=bob@contoso.example sslmode=verify-full\" -c 'SELECT current_user, * FROM demo'",
        bob = bob_token.display(),
        ca = ca_path.display(),
        port = args.port
    );

    let options = idgate::RunOptions {
        fast_shutdown: fast,
        ..Default::default()
    };
    idgate::run_with(
        idgate::Listeners {
            client: listener,
            admin: None,
        },
        config,
        options,
        cancel.clone(),
    )
    .await?;
    drop(cluster);
    drop(work);
    println!("stopped; temporary files removed");
    Ok(ExitCode::SUCCESS)
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    // Keys and tokens stay private to the user, even in a shared /tmp.
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with("key.pem") || name.ends_with(".token") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    Ok(())
}
