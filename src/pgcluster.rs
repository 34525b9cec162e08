//! Throw-away local PostgreSQL clusters, for `idgate dev` and for the test harness.
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temporary directory, writes a small,
//! fast, unsafe-for-production configuration (no fsync, loopback only, a private unix
//! socket directory), picks a free TCP port and starts the server with `pg_ctl`. The
//! cluster is stopped (`pg_ctl stop -m immediate`) and its directory removed when the
//! [`PgCluster`] is dropped.
//!
//! Layout of the temporary directory (under `/tmp`, so that the unix socket path stays
//! short and the `postgres` OS user can reach it):
//!
//! ```text
//! /tmp/idgate-pg-XXXXXX/      0700, owned by the server's OS user
//! ├── data/                   PGDATA (postgresql.conf includes idgate.conf)
//! ├── sock/                   unix_socket_directories
//! └── server.log              the server's log (pg_ctl -l)
//! ```
//!
//! PostgreSQL refuses to run as root. When this process runs as root (effective uid 0),
//! every `initdb`/`pg_ctl` call runs as the `postgres` OS user through
//! `runuser -u postgres --`, and the directory is chowned to that user.
//!
//! Several clusters may be started concurrently, in one process or in several (cargo
//! nextest runs each test in its own process): a port is picked by binding
//! `127.0.0.1:0`, and if the server then fails to bind it because another process took it
//! in the meantime, the start is retried with a new port.
//!
//! This module reads no environment variables; callers that honour an override such as
//! `IDGATE_PG_BINDIR` pass it in [`ClusterSettings::bindir`] or to [`find_bindir`].

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::{NoTls, SimpleQueryMessage};

/// How many times [`PgCluster::start`] tries a new port when the server cannot bind the
/// one it was given.
const START_ATTEMPTS: usize = 8;
/// `pg_ctl -t` for start and stop, in seconds.
const PG_CTL_TIMEOUT_SECS: u32 = 60;
/// Connect timeout for [`PgCluster::exec`] and [`PgCluster::query_strings`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Lines of command output / server log quoted in error messages.
const ERROR_TAIL_LINES: usize = 30;
/// `sun_path` is 108 bytes on Linux; keep a margin.
const MAX_SOCKET_PATH_BYTES: usize = 100;
/// The OS user that runs the server when this process is root.
const SERVER_OS_USER: &str = "postgres";
/// Parent of the temporary cluster directories.
const TEMP_PARENT: &str = "/tmp";

/// Ports handed out to clusters of this process that are still alive, so that two
/// concurrent starts in one process never try the same port.
static PORTS_IN_USE: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Errors from creating, starting, stopping or querying a [`PgCluster`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`) were found.
    #[error(
        "PostgreSQL server binaries not found: {detail}. Install them with \
         `apt-get install postgresql` (Debian/Ubuntu; the binaries land in \
         /usr/lib/postgresql/<version>/bin), or point IDGATE_PG_BINDIR at a directory \
         holding initdb and pg_ctl, or run the databases with docker-compose instead \
         (`docker compose up`)"
    )]
    BinariesNotFound {
        /// What was looked at.
        detail: String,
    },
    /// This process runs as root, but the `postgres` OS user that must run the server
    /// could not be resolved.
    #[error(
        "running as root, so the server must run as the OS user `{user}`, but that user \
         could not be resolved: {detail} (apt-get install postgresql creates it)"
    )]
    NoServerUser {
        /// The OS user name.
        user: String,
        /// Why it could not be resolved.
        detail: String,
    },
    /// A file-system operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done, including the path.
        action: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An external command (`initdb`, `pg_ctl`, …) failed.
    #[error(
        "command `{command}` failed ({status}){}",
        tail_section("output", output)
    )]
    Command {
        /// The command line.
        command: String,
        /// Exit status, or why it could not be run.
        status: String,
        /// The tail of its stdout/stderr, and of the server log where relevant.
        output: String,
    },
    /// The server could not be started on a free port after several attempts.
    #[error(
        "cluster `{name}`: the server failed to bind a free port {attempts} times; last \
         command `{command}`{}",
        tail_section("server log", log)
    )]
    NoFreePort {
        /// Cluster name.
        name: String,
        /// Number of attempts made.
        attempts: usize,
        /// The last `pg_ctl start` command line.
        command: String,
        /// The tail of the server log.
        log: String,
    },
    /// Connecting to the cluster over its unix socket failed.
    #[error(
        "cluster `{name}`: cannot connect as `{user}` through {socket}: {message}{}",
        tail_section("server log", log)
    )]
    Connect {
        /// Cluster name.
        name: String,
        /// The superuser.
        user: String,
        /// The socket directory.
        socket: String,
        /// The client's error text.
        message: String,
        /// The tail of the server log.
        log: String,
    },
    /// A SQL statement failed.
    #[error("cluster `{name}`: SQL failed: {message}\n--- SQL ---\n{sql}")]
    Sql {
        /// Cluster name.
        name: String,
        /// The SQL text that was sent.
        sql: String,
        /// The server's error (severity, SQLSTATE, message, detail, hint).
        message: String,
    },
}

fn tail_section(title: &str, text: &str) -> String {
    if text.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- {title} (tail) ---\n{}", text.trim_end())
    }
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let action = action.into();
    move |source| ClusterError::Io { action, source }
}

/// TLS material for the server (`ssl = on`).
#[derive(Clone)]
pub struct ClusterTls {
    /// Server certificate chain, PEM (`ssl_cert_file`).
    pub cert_pem: String,
    /// Server private key, PEM (`ssl_key_file`).
    pub key_pem: String,
    /// CA certificates trusted for client certificates, PEM (`ssl_ca_file`); needed for
    /// `hostssl … cert` lines in [`ClusterSettings::hba`].
    pub ca_pem: Option<String>,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterTls")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .finish()
    }
}

/// What [`PgCluster::start`] creates.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// A label for messages and the temp dir name (e.g. `"wg-a"`).
    pub name: String,
    /// Bootstrap superuser (`initdb -U`); default `"postgres"`. It may connect without a
    /// password over the unix socket and from 127.0.0.1.
    pub superuser: String,
    /// `pg_hba.conf` lines placed **before** the defaults (`local all all trust`,
    /// `host all <superuser> 127.0.0.1/32 trust`). Anything that matches no line is refused.
    pub hba: Vec<String>,
    /// Extra `postgresql.conf` settings, written after the defaults (so they override
    /// them). Give values unquoted: they are written as quoted string literals, which
    /// PostgreSQL accepts for every parameter type.
    pub conf: Vec<(String, String)>,
    /// Server TLS; `None` leaves `ssl = off`.
    pub ssl: Option<ClusterTls>,
    /// Directory holding `initdb`/`pg_ctl`/`postgres`; `None` searches as [`find_bindir`]
    /// does.
    pub bindir: Option<PathBuf>,
}

impl ClusterSettings {
    /// Settings with the given name and all defaults.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            name: "idgate".to_owned(),
            superuser: "postgres".to_owned(),
            hba: Vec::new(),
            conf: Vec::new(),
            ssl: None,
            bindir: None,
        }
    }
}

/// How [`PgCluster::stop`] shuts the server down (`pg_ctl stop -m …`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Roll back open transactions, disconnect clients, shut down cleanly.
    Fast,
    /// Kill everything at once, like a crash; the next start runs recovery.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// The OS user the server runs as when this process is root.
#[derive(Clone, Debug)]
struct RunAs {
    user: String,
    uid: u32,
    gid: u32,
}

/// A running throw-away PostgreSQL cluster. Dropping it stops the server
/// (`pg_ctl stop -m immediate`) and removes its directory.
#[derive(Debug)]
pub struct PgCluster {
    name: String,
    superuser: String,
    bindir: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    /// Whether the server may be running (cleared by a successful stop).
    running: AtomicBool,
    /// Declared last: removed after `Drop::drop` has stopped the server.
    root: tempfile::TempDir,
}

impl PgCluster {
    /// Create and start a cluster.
    ///
    /// Runs `initdb` into a fresh temp dir, picks a free port (bind `127.0.0.1:0`, read,
    /// close), writes `postgresql.conf` (listen on 127.0.0.1 only, a private unix socket
    /// directory, `fsync`/`synchronous_commit`/`full_page_writes` off, small
    /// `shared_buffers`, `max_connections = 200`, plus [`ClusterSettings::conf`]) and
    /// `pg_hba.conf` ([`ClusterSettings::hba`], then trust for local connections and for
    /// the superuser from 127.0.0.1), and starts the server with `pg_ctl -w -t 60`. If the
    /// server cannot bind the port (another process took it), it retries with a new port,
    /// up to 8 times.
    pub async fn start(settings: ClusterSettings) -> Result<PgCluster, ClusterError> {
        Self::start_with_first_ports(settings, Vec::new()).await
    }

    /// [`PgCluster::start`], trying the given ports before free ones (tests use this to
    /// exercise the retry on a taken port).
    async fn start_with_first_ports(
        settings: ClusterSettings,
        first_ports: Vec<u16>,
    ) -> Result<PgCluster, ClusterError> {
        let mut first_ports = first_ports.into_iter();
        let bindir = find_bindir(settings.bindir.as_deref())?;
        let run_as = if running_as_root()? {
            Some(resolve_server_user().await?)
        } else {
            None
        };

        let root = tempfile::Builder::new()
            .prefix(&format!("idgate-pg-{}-", sanitize_label(&settings.name)))
            .tempdir_in(TEMP_PARENT)
            .map_err(io_err(format!("creating a temp dir in {TEMP_PARENT}")))?;
        let root_path = root.path().to_path_buf();
        set_mode(&root_path, 0o700)?;
        chown_to(&root_path, run_as.as_ref())?;

        let socket_dir = root_path.join("sock");
        std::fs::create_dir(&socket_dir)
            .map_err(io_err(format!("creating {}", socket_dir.display())))?;
        set_mode(&socket_dir, 0o700)?;
        chown_to(&socket_dir, run_as.as_ref())?;
        // ".s.PGSQL.65535" is the longest socket file name.
        let socket_path_len = socket_dir.as_os_str().len() + "/.s.PGSQL.65535".len();
        if socket_path_len >= MAX_SOCKET_PATH_BYTES {
            return Err(ClusterError::Io {
                action: format!("choosing a unix socket directory ({})", socket_dir.display()),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("socket path would be {socket_path_len} bytes, limit {MAX_SOCKET_PATH_BYTES}"),
                ),
            });
        }

        let data_dir = root_path.join("data");
        let log_file = root_path.join("server.log");

        let mut cluster = PgCluster {
            name: settings.name.clone(),
            superuser: settings.superuser.clone(),
            bindir,
            run_as,
            port: 0,
            data_dir,
            socket_dir,
            log_file,
            running: AtomicBool::new(false),
            root,
        };

        cluster.initdb().await?;
        cluster.write_static_files(&settings)?;

        let mut last_command = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = match first_ports.next() {
                Some(port) => port,
                None => reserve_free_port()?,
            };
            cluster.port = port;
            cluster.write_conf(&settings)?;
            match cluster.pg_ctl_start().await {
                Ok(()) => return Ok(cluster),
                Err(StartFailure::PortTaken { command }) => {
                    release_port(port);
                    cluster.port = 0;
                    last_command = command;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(StartFailure::Other(e)) => {
                    release_port(port);
                    cluster.port = 0;
                    return Err(e);
                }
            }
        }
        Err(ClusterError::NoFreePort {
            name: cluster.name.clone(),
            attempts: START_ATTEMPTS,
            command: last_command,
            log: cluster.log_tail(ERROR_TAIL_LINES),
        })
    }

    /// The cluster's label.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bootstrap superuser.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// The directory holding the server's unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// PGDATA.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Run SQL (one or more statements) as the superuser over the unix socket
    /// (`batch_execute`, simple query protocol). On failure the error carries the
    /// server's message.
    pub async fn exec(&self, sql: &str) -> Result<(), ClusterError> {
        self.exec_in("postgres", sql).await
    }

    /// [`PgCluster::exec`] in database `dbname`.
    pub async fn exec_in(&self, dbname: &str, sql: &str) -> Result<(), ClusterError> {
        let client = self.connect(dbname).await?;
        client
            .batch_execute(sql)
            .await
            .map_err(|e| ClusterError::Sql {
                name: self.name.clone(),
                sql: sql.to_owned(),
                message: pg_error_text(&e),
            })
    }

    /// Run SQL as the superuser over the unix socket (simple query protocol) and return
    /// the rows of all result sets as text (`None` for NULL).
    pub async fn query_strings(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ClusterError> {
        self.query_in("postgres", sql).await
    }

    /// [`PgCluster::query_strings`] in database `dbname`.
    pub async fn query_in(
        &self,
        dbname: &str,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ClusterError> {
        let client = self.connect(dbname).await?;
        let messages = client
            .simple_query(sql)
            .await
            .map_err(|e| ClusterError::Sql {
                name: self.name.clone(),
                sql: sql.to_owned(),
                message: pg_error_text(&e),
            })?;
        let mut rows = Vec::new();
        for message in messages {
            if let SimpleQueryMessage::Row(row) = message {
                let row: Vec<Option<String>> = (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect();
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// Stop the server (`pg_ctl stop -m fast|immediate -w`). The data directory stays; see
    /// [`PgCluster::restart`].
    pub async fn stop(&self, mode: StopMode) -> Result<(), ClusterError> {
        let args = self.pg_ctl_args(&["stop", "-m", mode.as_arg()]);
        let (command, output) = self.run_server_cmd("pg_ctl", &args).await?;
        if output.status.success() {
            self.running.store(false, Ordering::SeqCst);
            Ok(())
        } else {
            Err(self.command_error(command, &output))
        }
    }

    /// Start the server again, on the same port, after [`PgCluster::stop`]. Fails if the
    /// port was taken in the meantime.
    pub async fn restart(&self) -> Result<(), ClusterError> {
        match self.pg_ctl_start().await {
            Ok(()) => Ok(()),
            Err(StartFailure::PortTaken { command }) => Err(ClusterError::Command {
                command,
                status: format!("port {} is taken by another process", self.port),
                output: self.log_tail(ERROR_TAIL_LINES),
            }),
            Err(StartFailure::Other(e)) => Err(e),
        }
    }

    /// The last `n` lines of the server log (empty if there is none yet), for test
    /// failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        match std::fs::read(&self.log_file) {
            Ok(bytes) => last_lines(&String::from_utf8_lossy(&bytes), n),
            Err(_) => String::new(),
        }
    }

    async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client, ClusterError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.superuser)
            .dbname(dbname)
            .application_name("idgate-pgcluster")
            .connect_timeout(CONNECT_TIMEOUT);
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|e| ClusterError::Connect {
                    name: self.name.clone(),
                    user: self.superuser.clone(),
                    socket: self.socket_dir.display().to_string(),
                    message: pg_error_text(&e),
                    log: self.log_tail(ERROR_TAIL_LINES),
                })?;
        tokio::spawn(async move {
            // Errors surface through the client's calls; nothing to do here.
            let _ = connection.await;
        });
        Ok(client)
    }

    async fn initdb(&self) -> Result<(), ClusterError> {
        let data = self.data_dir.display().to_string();
        let args = vec![
            "-D".to_owned(),
            data,
            "-U".to_owned(),
            self.superuser.clone(),
            "-A".to_owned(),
            "trust".to_owned(),
            "-E".to_owned(),
            "UTF8".to_owned(),
            "--locale=C".to_owned(),
            "--no-sync".to_owned(),
        ];
        let (command, output) = self.run_server_cmd("initdb", &args).await?;
        if output.status.success() {
            Ok(())
        } else {
            Err(self.command_error(command, &output))
        }
    }

    /// Files that do not depend on the port: pg_hba.conf, TLS material, the include line.
    fn write_static_files(&self, settings: &ClusterSettings) -> Result<(), ClusterError> {
        let mut hba = String::from("# written by idgate pgcluster\n");
        for line in &settings.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str("local all all trust\n");
        hba.push_str(&format!(
            "host all {} 127.0.0.1/32 trust\n",
            hba_quote(&self.superuser)
        ));
        self.write_server_file("pg_hba.conf", &hba, 0o600)?;

        if let Some(tls) = &settings.ssl {
            self.write_server_file("server.crt", &tls.cert_pem, 0o600)?;
            self.write_server_file("server.key", &tls.key_pem, 0o600)?;
            if let Some(ca) = &tls.ca_pem {
                self.write_server_file("root.crt", ca, 0o600)?;
            }
        }

        let conf_path = self.data_dir.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path)
            .map_err(io_err(format!("reading {}", conf_path.display())))?;
        conf.push_str("\n# idgate pgcluster settings\ninclude 'idgate.conf'\n");
        self.write_server_file("postgresql.conf", &conf, 0o600)?;
        Ok(())
    }

    /// `idgate.conf`: the defaults, the port, TLS, then the caller's settings.
    fn write_conf(&self, settings: &ClusterSettings) -> Result<(), ClusterError> {
        let mut entries: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("port".into(), self.port.to_string()),
            (
                "unix_socket_directories".into(),
                self.socket_dir.display().to_string(),
            ),
            ("fsync".into(), "off".into()),
            ("synchronous_commit".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("shared_buffers".into(), "16MB".into()),
            ("max_connections".into(), "200".into()),
            ("logging_collector".into(), "off".into()),
            ("log_destination".into(), "stderr".into()),
            ("log_line_prefix".into(), "%m [%p] %q%u@%d ".into()),
            ("lc_messages".into(), "C".into()),
        ];
        if let Some(tls) = &settings.ssl {
            entries.push(("ssl".into(), "on".into()));
            entries.push(("ssl_cert_file".into(), "server.crt".into()));
            entries.push(("ssl_key_file".into(), "server.key".into()));
            if tls.ca_pem.is_some() {
                entries.push(("ssl_ca_file".into(), "root.crt".into()));
            }
        } else {
            entries.push(("ssl".into(), "off".into()));
        }
        entries.extend(settings.conf.iter().cloned());

        let mut text = String::from("# written by idgate pgcluster\n");
        for (key, value) in &entries {
            text.push_str(&format!("{key} = {}\n", conf_quote(value)));
        }
        self.write_server_file("idgate.conf", &text, 0o600)
    }

    fn write_server_file(&self, name: &str, contents: &str, mode: u32) -> Result<(), ClusterError> {
        let path = self.data_dir.join(name);
        std::fs::write(&path, contents).map_err(io_err(format!("writing {}", path.display())))?;
        set_mode(&path, mode)?;
        chown_to(&path, self.run_as.as_ref())
    }

    fn pg_ctl_args(&self, action: &[&str]) -> Vec<String> {
        let mut args = vec![
            "-D".to_owned(),
            self.data_dir.display().to_string(),
            "-w".to_owned(),
            "-t".to_owned(),
            PG_CTL_TIMEOUT_SECS.to_string(),
        ];
        args.extend(action.iter().map(|s| (*s).to_owned()));
        args
    }

    async fn pg_ctl_start(&self) -> Result<(), StartFailure> {
        let log_offset = std::fs::metadata(&self.log_file)
            .map(|m| m.len())
            .unwrap_or(0);
        let mut args = self.pg_ctl_args(&["start"]);
        args.push("-l".to_owned());
        args.push(self.log_file.display().to_string());
        // Mark as possibly running before the attempt, so Drop stops a half-started server.
        self.running.store(true, Ordering::SeqCst);
        let (command, output) = self
            .run_server_cmd("pg_ctl", &args)
            .await
            .map_err(StartFailure::Other)?;
        if output.status.success() {
            return Ok(());
        }
        let new_log = read_from(&self.log_file, log_offset);
        // The postmaster exits by itself when it cannot bind; make sure nothing is left.
        self.stop_blocking_quiet();
        if port_taken(&new_log) {
            return Err(StartFailure::PortTaken { command });
        }
        Err(StartFailure::Other(self.command_error(command, &output)))
    }

    async fn run_server_cmd(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<(String, Output), ClusterError> {
        let (cmd, command) = self.server_command(program, args);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        match cmd.output().await {
            Ok(output) => Ok((command, output)),
            Err(e) => Err(ClusterError::Command {
                command,
                status: format!("could not run: {e}"),
                output: String::new(),
            }),
        }
    }

    /// A command that runs `program` from the bindir, as the server's OS user.
    fn server_command(&self, program: &str, args: &[String]) -> (std::process::Command, String) {
        let exe = self.bindir.join(program);
        let mut cmd = match &self.run_as {
            Some(run_as) => {
                let mut c = std::process::Command::new(runuser_path());
                c.arg("-u").arg(&run_as.user).arg("--").arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
        };
        cmd.args(args)
            .current_dir(self.root.path())
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut line = String::new();
        if let Some(run_as) = &self.run_as {
            line.push_str(&format!("runuser -u {} -- ", run_as.user));
        }
        line.push_str(&exe.display().to_string());
        for a in args {
            line.push(' ');
            line.push_str(a);
        }
        (cmd, line)
    }

    fn command_error(&self, command: String, output: &Output) -> ClusterError {
        let mut text = String::new();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let combined = format!("{stdout}{stderr}");
        text.push_str(&last_lines(&combined, ERROR_TAIL_LINES));
        let log = self.log_tail(ERROR_TAIL_LINES);
        if !log.trim().is_empty() {
            text.push_str("\n--- server log (tail) ---\n");
            text.push_str(&log);
        }
        ClusterError::Command {
            command,
            status: output.status.to_string(),
            output: text,
        }
    }

    /// `pg_ctl stop -m immediate`, synchronously, ignoring errors (for Drop and cleanup).
    fn stop_blocking_quiet(&self) {
        let args = self.pg_ctl_args(&["stop", "-m", "immediate"]);
        let (mut cmd, _) = self.server_command("pg_ctl", &args);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if let Ok(status) = cmd.status() {
            if status.success() {
                self.running.store(false, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running.load(Ordering::SeqCst) && self.data_dir.join("postmaster.pid").exists() {
            self.stop_blocking_quiet();
        }
        if self.port != 0 {
            release_port(self.port);
        }
        // `root` (the TempDir) is dropped after this and removes the directory.
    }
}

enum StartFailure {
    /// The server could not bind its port; try another.
    PortTaken {
        command: String,
    },
    Other(ClusterError),
}

/// Locate the PostgreSQL server binaries (a directory holding `initdb`, `pg_ctl` and
/// `postgres`).
///
/// Order: `override_dir` if given (it must hold them; no fallback), then
/// `pg_config --bindir`, then the highest version of `/usr/lib/postgresql/*/bin`.
pub fn find_bindir(override_dir: Option<&Path>) -> Result<PathBuf, ClusterError> {
    if let Some(dir) = override_dir {
        return if has_server_binaries(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(ClusterError::BinariesNotFound {
                detail: format!(
                    "the configured directory {} does not hold initdb, pg_ctl and postgres",
                    dir.display()
                ),
            })
        };
    }
    let mut looked = Vec::new();
    match std::process::Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            looked.push(format!(
                "`pg_config --bindir` = {} (no server binaries there; only the client package?)",
                dir.display()
            ));
        }
        Ok(out) => looked.push(format!("`pg_config --bindir` failed ({})", out.status)),
        Err(e) => looked.push(format!("`pg_config` not runnable ({e})")),
    }
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = version_key(&name) else {
                continue;
            };
            let bin = entry.path().join("bin");
            if has_server_binaries(&bin) {
                versions.push((key, bin));
            }
        }
    }
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    looked.push(format!("no {}/<version>/bin with initdb", base.display()));
    Err(ClusterError::BinariesNotFound {
        detail: looked.join("; "),
    })
}

fn version_key(name: &str) -> Option<Vec<u64>> {
    name.split('.').map(|p| p.parse::<u64>().ok()).collect()
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"].iter().all(|b| {
        std::fs::metadata(dir.join(b))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

fn running_as_root() -> Result<bool, ClusterError> {
    // /proc/self is owned by the process's effective uid.
    let meta = std::fs::metadata("/proc/self").map_err(io_err("reading /proc/self"))?;
    Ok(meta.uid() == 0)
}

fn runuser_path() -> &'static str {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("runuser")
}

async fn resolve_server_user() -> Result<RunAs, ClusterError> {
    let id = |flag: &'static str| async move {
        let out = tokio::process::Command::new("id")
            .arg(flag)
            .arg(SERVER_OS_USER)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("`id {flag} {SERVER_OS_USER}` could not run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`id {flag} {SERVER_OS_USER}`: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .map_err(|e| format!("`id {flag} {SERVER_OS_USER}` printed no number: {e}"))
    };
    let no_user = |detail: String| ClusterError::NoServerUser {
        user: SERVER_OS_USER.to_owned(),
        detail,
    };
    let uid = id("-u").await.map_err(no_user)?;
    let gid = id("-g").await.map_err(no_user)?;
    Ok(RunAs {
        user: SERVER_OS_USER.to_owned(),
        uid,
        gid,
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ClusterError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {mode:o} {}", path.display())))
}

fn chown_to(path: &Path, run_as: Option<&RunAs>) -> Result<(), ClusterError> {
    match run_as {
        Some(r) => std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid)).map_err(io_err(
            format!("chown {}:{} {}", r.uid, r.gid, path.display()),
        )),
        None => Ok(()),
    }
}

/// Bind 127.0.0.1:0, read the port, close. Skips ports already handed to live clusters
/// of this process.
fn reserve_free_port() -> Result<u16, ClusterError> {
    for _ in 0..64 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("binding 127.0.0.1:0 to find a free port"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading the bound port"))?
            .port();
        drop(listener);
        let mut guard = PORTS_IN_USE.lock().unwrap_or_else(|p| p.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    Err(ClusterError::Io {
        action: "finding a free port on 127.0.0.1".to_owned(),
        source: io::Error::new(io::ErrorKind::AddrInUse, "every port tried was taken"),
    })
}

fn release_port(port: u16) {
    let mut guard = PORTS_IN_USE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(set) = guard.as_mut() {
        set.remove(&port);
    }
}

/// Whether a server log excerpt says the TCP port could not be bound.
fn port_taken(log: &str) -> bool {
    log.contains("could not bind IPv4 address")
        || log.contains("could not bind IPv6 address")
        || log.contains("Address already in use")
        || log.contains("could not create any TCP/IP sockets")
}

fn read_from(path: &Path, offset: u64) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(_) => String::new(),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// A postgresql.conf string literal.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A pg_hba.conf user name: bare if simple, else double-quoted.
fn hba_quote(name: &str) -> String {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// A short, path-safe version of a cluster name for the temp dir prefix.
fn sanitize_label(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(16)
        .collect();
    if s.is_empty() {
        "cluster".to_owned()
    } else {
        s
    }
}

/// Severity, SQLSTATE, message, detail and hint of a server error; else the client error
/// with its sources.
fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(&format!("\nDETAIL: {detail}"));
        }
        if let Some(hint) = db.hint() {
            s.push_str(&format!("\nHINT: {hint}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(name: &str) -> ClusterSettings {
        ClusterSettings::new(name)
    }

    /// Whether any process's command line mentions `needle` (a data dir path).
    fn processes_mentioning(needle: &str) -> Vec<String> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return found;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{pid}: {cmdline}"));
            }
        }
        found
    }

    #[test]
    fn quoting() {
        assert_eq!(conf_quote("a'b\\c"), "'a''b\\\\c'");
        assert_eq!(hba_quote("postgres"), "postgres");
        assert_eq!(hba_quote("aad:alice@x"), "\"aad:alice@x\"");
        assert_eq!(sanitize_label("wg a/b"), "wg_a_b");
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert!(port_taken(
            "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
        ));
        assert_eq!(version_key("15"), Some(vec![15]));
        assert_eq!(version_key("9.6"), Some(vec![9, 6]));
        assert_eq!(version_key("x"), None);
    }

    #[test]
    fn find_bindir_override_must_hold_binaries() {
        let err = find_bindir(Some(Path::new("/nonexistent/pg/bin"))).unwrap_err();
        let text = err.to_string();
        eprintln!("{text}");
        assert!(text.contains("apt-get install postgresql"), "{text}");
        assert!(
            text.contains("docker-compose") || text.contains("docker compose"),
            "{text}"
        );
        let found = find_bindir(None).expect("PostgreSQL server binaries must be installed");
        assert!(found.join("initdb").exists());
        assert_eq!(find_bindir(Some(&found)).unwrap(), found);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_clusters_concurrently_exec_and_query() {
        let (a, b) = tokio::join!(
            PgCluster::start(settings("wg-a")),
            PgCluster::start(settings("wg-b"))
        );
        let a = a.unwrap_or_else(|e| panic!("start a: {e}"));
        let b = b.unwrap_or_else(|e| panic!("start b: {e}"));
        assert_ne!(a.port(), b.port());
        assert_ne!(a.data_dir(), b.data_dir());
        assert!(a.socket_dir().as_os_str().len() < MAX_SOCKET_PATH_BYTES);

        a.exec("CREATE TABLE t (id int, v text); INSERT INTO t VALUES (1, 'one'), (2, NULL);")
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", a.log_tail(20)));
        let rows = a
            .query_strings("SELECT id, v FROM t ORDER BY id")
            .await
            .unwrap();
        assert_eq!(
            rows,
            vec![
                vec![Some("1".to_owned()), Some("one".to_owned())],
                vec![Some("2".to_owned()), None]
            ]
        );
        // b is a separate cluster: no table t there.
        let err = b.query_strings("SELECT * FROM t").await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("42P01") && text.contains("SELECT * FROM t"),
            "{text}"
        );

        // Settings took effect; TCP on 127.0.0.1 works for the superuser.
        let rows = b
            .query_strings("SHOW max_connections; SHOW fsync; SHOW listen_addresses")
            .await
            .unwrap();
        assert_eq!(
            rows,
            vec![
                vec![Some("200".to_owned())],
                vec![Some("off".to_owned())],
                vec![Some("127.0.0.1".to_owned())]
            ]
        );
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                a.port()
            ),
            NoTls,
        )
        .await
        .unwrap_or_else(|e| panic!("tcp connect: {e}\n{}", a.log_tail(20)));
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_clusters_concurrently_with_hba_and_conf() {
        let mk = |i: usize| {
            let mut s = settings(&format!("c{i}"));
            s.hba = vec!["host all alice 127.0.0.1/32 password".to_owned()];
            s.conf = vec![
                ("cluster_name".to_owned(), format!("it's {i}")),
                ("work_mem".to_owned(), "8MB".to_owned()),
            ];
            PgCluster::start(s)
        };
        let (c0, c1, c2, c3) = tokio::join!(mk(0), mk(1), mk(2), mk(3));
        let clusters: Vec<PgCluster> = [c0, c1, c2, c3]
            .into_iter()
            .map(|c| c.unwrap_or_else(|e| panic!("start: {e}")))
            .collect();
        let mut ports: Vec<u16> = clusters.iter().map(|c| c.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 4);

        let c = &clusters[2];
        c.exec("CREATE ROLE alice LOGIN PASSWORD 'secret'")
            .await
            .unwrap();
        // password auth for alice from the hba line given first.
        let url = |pw: &str| {
            format!(
                "host=127.0.0.1 port={} user=alice password={pw} dbname=postgres",
                c.port()
            )
        };
        let (client, conn) = tokio_postgres::connect(&url("secret"), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "alice");
        let err = tokio_postgres::connect(&url("wrong"), NoTls)
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
        );
        // Roles other than the superuser get no trust line over TCP.
        c.exec("CREATE ROLE bob LOGIN").await.unwrap();
        let err = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=bob dbname=postgres", c.port()),
            NoTls,
        )
        .await
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("pg_hba.conf") || format!("{err:?}").contains("28000"),
            "{err:?}"
        );
        let rows = c
            .query_strings("SHOW cluster_name; SHOW work_mem")
            .await
            .unwrap();
        assert_eq!(
            rows,
            vec![
                vec![Some("it's 2".to_owned())],
                vec![Some("8MB".to_owned())]
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_immediate_and_restart_on_same_port() {
        let c = PgCluster::start(settings("restart")).await.unwrap();
        let port = c.port();
        c.exec("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42);")
            .await
            .unwrap();
        // Make the data durable before the crash-like stop (fsync is off).
        c.exec("CHECKPOINT").await.unwrap();
        c.stop(StopMode::Immediate).await.unwrap();
        let err = c.exec("SELECT 1").await.unwrap_err();
        assert!(matches!(err, ClusterError::Connect { .. }), "{err}");
        c.restart().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.port(), port);
        let rows = c.query_strings("SELECT x FROM kept").await.unwrap();
        assert_eq!(rows, vec![vec![Some("42".to_owned())]]);
        c.stop(StopMode::Fast).await.unwrap();
        c.restart().await.unwrap();
        assert_eq!(c.query_strings("SELECT 1").await.unwrap().len(), 1);
        assert!(!c.log_tail(5).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_stops_server_and_removes_dir() {
        let c = PgCluster::start(settings("drop")).await.unwrap();
        let data_dir = c.data_dir().to_path_buf();
        let root = data_dir.parent().unwrap().to_path_buf();
        let needle = data_dir.display().to_string();
        assert!(
            !processes_mentioning(&needle).is_empty(),
            "postmaster should be running"
        );
        c.exec("SELECT 1").await.unwrap();
        drop(c);
        assert!(!root.exists(), "{} should be removed", root.display());
        let left = processes_mentioning(&needle);
        assert!(left.is_empty(), "processes left: {left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_settings_are_applied() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::NoCa;
        let cert = params.self_signed(&key).unwrap();
        let mut s = settings("tls");
        s.ssl = Some(ClusterTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: Some(cert.pem()),
        });
        let c = PgCluster::start(s).await.unwrap_or_else(|e| panic!("{e}"));
        let rows = c.query_strings("SHOW ssl; SHOW ssl_ca_file").await.unwrap();
        assert_eq!(
            rows,
            vec![
                vec![Some("on".to_owned())],
                vec![Some("root.crt".to_owned())]
            ]
        );
    }

    #[tokio::test]
    async fn retries_with_a_new_port_when_the_port_is_taken() {
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = held.local_addr().unwrap().port();
        let c = PgCluster::start_with_first_ports(settings("retry"), vec![taken, taken])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(c.port(), taken);
        assert!(
            c.log_tail(100).contains("could not bind"),
            "{}",
            c.log_tail(100)
        );
        c.exec("SELECT 1").await.unwrap();
        drop(held);
    }

    #[tokio::test]
    async fn start_failure_reports_command_and_log() {
        let mut s = settings("bad");
        s.conf = vec![("no_such_setting".to_owned(), "1".to_owned())];
        let err = PgCluster::start(s).await.unwrap_err();
        let text = err.to_string();
        eprintln!("{text}");
        assert!(text.contains("pg_ctl"), "{text}");
        assert!(text.contains("no_such_setting"), "{text}");
    }
}
