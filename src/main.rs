//! The `idgate` binary: command line, environment, port binding and signals. Everything else is
//! in the library.

mod cli_audit;
mod dev;

use std::{collections::HashMap, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use idgate::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "idgate",
    version,
    about = "Identity-aware gateway for PostgreSQL / Amazon Redshift (Microsoft Entra ID tokens)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file (TOML). Values can be overridden as IDGATE__SECTION__KEY.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and report every problem at once.
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Run a local Entra-shaped OIDC issuer for development and tests (never for production).
    DevIdp(dev::DevIdpArgs),
    /// Quickstart: dev IdP + throw-away PostgreSQL + idgate on 127.0.0.1:5439, with a ready psql line.
    Dev(dev::DevArgs),
    /// Write a throw-away CA and a server certificate for development (docker-compose uses it).
    DevCerts(dev::DevCertsArgs),
    /// idgate's own CA for backend_auth = "client_cert".
    #[command(subcommand)]
    Ca(CaCommand),
    /// Read, follow and summarize the audit trail; migrate the audit database.
    #[command(subcommand)]
    Audit(cli_audit::AuditCommand),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA certificate (ca.pem) and key (ca-key.pem, mode 0600) in DIR, for development.
    /// Point [ca] cert_file/key_file at them and PostgreSQL's ssl_ca_file at ca.pem.
    Init {
        /// Directory to write into (created if missing; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Subject common name of the CA.
        #[arg(long, default_value = "idgate client CA")]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `serve` loads its configuration and installs tracing before the runtime starts: the OTLP
    // exporter's blocking HTTP client must be created and dropped outside async code.
    if let Command::Serve { config } = &cli.command {
        let loaded = match Config::load(config, &env_map()) {
            Ok(c) => c,
            Err(e) => {
                eprint!("{e}");
                return ExitCode::from(2);
            }
        };
        let provider = init_tracing_with_otlp(
            loaded.telemetry.log_format,
            &loaded.telemetry.log_level,
            loaded.telemetry.otlp_endpoint.as_deref(),
        );
        let result = runtime.block_on(serve(config.clone(), loaded));
        drop(runtime);
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("idgate: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { .. } => Ok(ExitCode::SUCCESS),
            Command::CheckConfig { file } => check_config(file),
            Command::DevIdp(args) => dev::dev_idp(args).await,
            Command::Dev(args) => dev::dev(args).await,
            Command::DevCerts(args) => dev::dev_certs(args),
            Command::Ca(CaCommand::Init { dir, name }) => ca_init(dir, name),
            Command::Audit(cmd) => cli_audit::run(cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn env_map() -> HashMap<String, String> {
    std::env::vars().collect()
}

fn ca_init(dir: PathBuf, name: String) -> anyhow::Result<ExitCode> {
    let (cert, key) = idgate::ca::IdgateCa::write_new(&dir, &name)?;
    println!(
        "wrote {} and {}\n[ca]\ncert_file = {:?}\nkey_file = {:?}\n# PostgreSQL: ssl_ca_file = '{}' and in pg_hba.conf: hostssl all all <idgate-ip>/32 cert",
        cert.display(),
        key.display(),
        cert.display().to_string(),
        key.display().to_string(),
        cert.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn check_config(file: PathBuf) -> anyhow::Result<ExitCode> {
    match Config::load(&file, &env_map()) {
        Ok(config) => {
            println!(
                "{}: ok ({} issuer(s), {} pool(s), listener {})",
                file.display(),
                config.issuers.len(),
                config.pools.len(),
                config.listener.addr
            );
            // The same warnings `serve` logs at start.
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprint!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// Install the tracing subscriber (`RUST_LOG` overrides the configured level).
pub(crate) fn init_tracing(format: LogFormat, level: &str) {
    let _ = init_tracing_with_otlp(format, level, None);
}

/// Install the tracing subscriber, with an OTLP/HTTP trace exporter when `otlp_endpoint` is set:
/// one span per session with its phases (handshake, token_exchange, authenticate, backend_login,
/// relay) as child spans. An unreachable collector only costs dropped spans.
fn init_tracing_with_otlp(
    format: LogFormat,
    level: &str,
    otlp_endpoint: Option<&str>,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rustls logs what a client sent (a 60 KB "illegal SNI" name) at warn: an unauthenticated
        // client could flood the log. Its failures reach the audit trail as handshake errors.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},rustls=error")));
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours only on a terminal: a redirected log stays plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    };
    let provider = otlp_endpoint.and_then(|endpoint| {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .with_timeout(std::time::Duration::from_secs(5))
            .build();
        match exporter {
            Ok(exporter) => Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name("idgate")
                            .build(),
                    )
                    .build(),
            ),
            Err(e) => {
                eprintln!("idgate: OTLP exporter disabled: {e}");
                None
            }
        }
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("idgate")));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    provider
}

async fn serve(path: PathBuf, config: Config) -> anyhow::Result<ExitCode> {
    let client = tokio::net::TcpListener::bind(config.listener.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listener.addr))?;
    let admin = match config.admin.addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on admin address {addr}"))?,
        ),
        None => None,
    };
    tracing::info!(addr = %client.local_addr()?, admin = ?admin.as_ref().and_then(|a| a.local_addr().ok()), "idgate listening");
    let shutdown = CancellationToken::new();
    let fast = CancellationToken::new();
    spawn_signal_handler_two_stage(shutdown.clone(), fast.clone());
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    spawn_sighup(reload_tx);
    // Reloads re-read the same file with the environment as it is at reload time.
    let loader: idgate::ConfigLoader = std::sync::Arc::new(move || Config::load(&path, &env_map()));
    let options = idgate::RunOptions {
        loader: Some(loader),
        reload_requests: Some(reload_rx),
        fast_shutdown: fast,
    };
    idgate::run_with(
        idgate::Listeners { client, admin },
        config,
        options,
        shutdown,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// First SIGTERM/SIGINT cancels `graceful`; a second one cancels `fast` (skip the grace period).
pub(crate) fn spawn_signal_handler_two_stage(graceful: CancellationToken, fast: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGTERM handler");
                    return;
                }
            };
        for token in [graceful, fast] {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutdown signal received");
            token.cancel();
        }
    });
}

/// SIGHUP asks for a configuration reload.
fn spawn_sighup(tx: tokio::sync::mpsc::Sender<()>) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot install SIGHUP handler; reload only through the admin API");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
}

/// SIGTERM / SIGINT cancel `token` (a second signal is ignored: there is no grace period to skip).
pub(crate) fn spawn_signal_handler(token: CancellationToken) {
    spawn_signal_handler_two_stage(token, CancellationToken::new());
}
