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
    /// Read, follow and summarize the audit trail; migrate the audit database.
    #[command(subcommand)]
    Audit(cli_audit::AuditCommand),
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
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => serve(config).await,
            Command::CheckConfig { file } => check_config(file),
            Command::DevIdp(args) => dev::dev_idp(args).await,
            Command::Dev(args) => dev::dev(args).await,
            Command::DevCerts(args) => dev::dev_certs(args),
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn serve(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = match Config::load(&path, &env_map()) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    init_tracing(config.telemetry.log_format, &config.telemetry.log_level);
    let listener = tokio::net::TcpListener::bind(config.listener.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listener.addr))?;
    tracing::info!(addr = %listener.local_addr()?, "idgate listening");
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    idgate::run(listener, config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM / SIGINT cancel `token`.
pub(crate) fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}
