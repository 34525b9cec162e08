//! `idgate audit …`: `migrate`, `query`, `follow` and `summary` for security analysts, over the
//! PostgreSQL store (`--database-url`, better through `IDGATE_AUDIT_DATABASE_URL` so the password
//! stays out of `ps`) or a spool directory / JSON-lines file (`--spool`, `--file`).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use idgate::audit::{
    pg,
    query::{self, Filter, OutputFormat, Tail},
};

/// Rows fetched per query round trip.
const PAGE: i64 = 5000;
/// How far back (in `seq`) `audit follow` looks for rows that committed late.
const FOLLOW_OVERLAP: i64 = 1000;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Create or upgrade the audit tables (migrations/*.sql) in the audit database.
    Migrate {
        /// PostgreSQL URL of the audit database.
        #[arg(long, env = "IDGATE_AUDIT_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Print the events that match the filters (oldest first).
    Query(Box<QueryArgs>),
    /// Print matching events as they arrive (Ctrl-C stops).
    Follow(Box<QueryArgs>),
    /// Logins and refusals per user, per reason, per pool; top client addresses with failures.
    Summary(Box<QueryArgs>),
}

#[derive(Args)]
pub struct QueryArgs {
    /// PostgreSQL URL of the audit store.
    #[arg(long, env = "IDGATE_AUDIT_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Spool directory to read instead of the database.
    #[arg(long, conflicts_with = "file")]
    spool: Option<PathBuf>,
    /// JSON-lines file (the file sink, native format) to read instead of the database.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Only events newer than this (e.g. 1h, 30m, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Only events at or after this RFC 3339 UTC time.
    #[arg(long)]
    from: Option<String>,
    /// Only events before this RFC 3339 UTC time.
    #[arg(long)]
    to: Option<String>,
    /// Database user (with or without the `aad:` namespace) or startup user.
    #[arg(long)]
    user: Option<String>,
    /// Tenant id.
    #[arg(long)]
    tenant: Option<String>,
    /// success or failure.
    #[arg(long)]
    outcome: Option<String>,
    /// Refusal reason, e.g. token_expired.
    #[arg(long)]
    reason: Option<String>,
    /// Pool name.
    #[arg(long)]
    pool: Option<String>,
    /// Client IP address.
    #[arg(long)]
    client_addr: Option<String>,
    /// Session id.
    #[arg(long)]
    session: Option<String>,
    /// Event kind, e.g. auth_failed.
    #[arg(long)]
    kind: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// At most this many events (query): the newest, with a note on stderr when more match.
    #[arg(long, default_value_t = 10_000)]
    limit: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
    /// OCSF Authentication events as JSON lines (query and follow).
    Ocsf,
}

impl From<Format> for OutputFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Table => OutputFormat::Table,
            Format::Json => OutputFormat::Json,
            Format::Csv => OutputFormat::Csv,
            Format::Ocsf => OutputFormat::Ocsf,
        }
    }
}

enum Source {
    Db(tokio_postgres::Client),
    Path(PathBuf),
}

impl QueryArgs {
    fn filter(&self) -> anyhow::Result<Filter> {
        let mut from = self.from.as_deref().map(query::rfc3339).transpose()?;
        if let Some(s) = &self.since {
            let t = query::since(s)?;
            from = Some(from.map_or(t, |f| f.max(t)));
        }
        Ok(Filter {
            from,
            to: self.to.as_deref().map(query::rfc3339).transpose()?,
            user: self.user.clone(),
            tenant: self.tenant.clone(),
            outcome: self.outcome.as_deref().map(query::outcome).transpose()?,
            reason: self.reason.clone(),
            pool: self.pool.clone(),
            client_addr: self.client_addr.clone(),
            session: self.session.clone(),
            kind: self.kind.clone(),
        })
    }

    async fn source(&self) -> anyhow::Result<Source> {
        if let Some(p) = self.spool.as_ref().or(self.file.as_ref()) {
            return Ok(Source::Path(p.clone()));
        }
        match &self.database_url {
            Some(url) => Ok(Source::Db(pg::connect(url).await?)),
            None => bail!("say where the events are: --database-url (or IDGATE_AUDIT_DATABASE_URL), --spool DIR or --file FILE"),
        }
    }
}

/// The matching events, oldest first; past `limit` matches, only the newest `limit` and how
/// many matched in all.
async fn load(
    source: &Source,
    filter: &Filter,
    limit: usize,
) -> anyhow::Result<(Vec<serde_json::Value>, usize)> {
    let mut kept = std::collections::VecDeque::new();
    let mut matched = 0usize;
    let mut keep = |e: serde_json::Value| {
        matched += 1;
        kept.push_back(e);
        if kept.len() > limit {
            kept.pop_front();
        }
    };
    match source {
        Source::Path(p) => {
            query::read_path(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .into_iter()
                .filter(|e| filter.matches(e))
                .for_each(&mut keep);
        }
        Source::Db(client) => {
            let (sql, params) = filter.sql();
            if limit == usize::MAX {
                let mut after = 0i64;
                loop {
                    let page = pg::fetch(client, &sql, &params, after, PAGE).await?;
                    let Some((last, _)) = page.last() else { break };
                    after = *last;
                    let n = page.len();
                    page.into_iter().for_each(|(_, e)| keep(e));
                    if (n as i64) < PAGE {
                        break;
                    }
                }
            } else {
                // The database picks the newest rows; nothing else crosses the network.
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let (rows, count) = pg::fetch_newest(client, &sql, &params, limit).await?;
                let events: Vec<_> = rows.into_iter().map(|(_, e)| e).collect();
                let count = usize::try_from(count)
                    .unwrap_or(usize::MAX)
                    .max(events.len());
                return Ok((events, count));
            }
        }
    }
    Ok((kept.into(), matched))
}

pub async fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Migrate { database_url } => {
            let mut client = pg::connect(&database_url).await?;
            let applied = pg::migrate(&mut client).await?;
            if applied.is_empty() {
                println!("audit database is up to date");
            } else {
                println!("applied migration(s) {applied:?}");
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Query(args) => {
            let filter = args.filter()?;
            let source = args.source().await?;
            let (events, matched) = load(&source, &filter, args.limit).await?;
            if matched > events.len() {
                eprintln!(
                    "idgate: {matched} events match; showing the newest {} (narrow the filters or raise --limit)",
                    events.len()
                );
            }
            print!("{}", query::render(&events, args.format.into()));
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Summary(args) => {
            let filter = args.filter()?;
            let source = args.source().await?;
            let (events, _) = load(&source, &filter, usize::MAX).await?;
            let summary = query::summarize(&events);
            match args.format {
                Format::Json | Format::Ocsf => {
                    println!("{}", serde_json::to_string(&summary)?)
                }
                Format::Table | Format::Csv => print!("{summary}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Follow(args) => follow(args).await,
    }
}

async fn follow(args: Box<QueryArgs>) -> anyhow::Result<ExitCode> {
    let filter = args.filter()?;
    let source = args.source().await?;
    let format: OutputFormat = args.format.into();
    let history = filter.from.is_some();
    let print = |events: &[serde_json::Value], header: bool| {
        let events: Vec<_> = events
            .iter()
            .filter(|e| filter.matches(e))
            .cloned()
            .collect();
        if events.is_empty() && !header {
            return;
        }
        let text = query::render(&events, format);
        // Header once; afterwards only rows.
        let body = if header || matches!(format, OutputFormat::Json | OutputFormat::Ocsf) {
            text
        } else {
            text.split_once('\n')
                .map(|(_, rest)| rest.to_owned())
                .unwrap_or_default()
        };
        print!("{body}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    };
    match source {
        Source::Path(p) => {
            let mut tail =
                Tail::new(&p, history).with_context(|| format!("cannot read {}", p.display()))?;
            let mut header = true;
            loop {
                let events = tail.poll()?;
                print(&events, header);
                header = false;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Source::Db(client) => {
            let (sql, params) = filter.sql();
            let mut after: i64 = if history {
                0
            } else {
                client
                    .query_one("SELECT coalesce(max(seq), 0) FROM audit_events", &[])
                    .await?
                    .get(0)
            };
            // Several gateways insert concurrently, so a row can become visible after rows with
            // a higher `seq`. Each poll re-reads the last FOLLOW_OVERLAP sequence numbers and
            // prints only rows not printed yet (those visible at the start count as printed).
            let mut printed: std::collections::BTreeSet<i64> = std::collections::BTreeSet::new();
            if !history {
                let floor = (after - FOLLOW_OVERLAP).max(0);
                let seen = pg::fetch(&client, &sql, &params, floor, FOLLOW_OVERLAP).await?;
                // Rows past `after` committed after it was read: they are new, not history.
                printed.extend(seen.iter().map(|(seq, _)| *seq).filter(|seq| *seq <= after));
            }
            let mut header = true;
            loop {
                let from = (after - FOLLOW_OVERLAP).max(0);
                let page = pg::fetch(&client, &sql, &params, from, PAGE).await?;
                let mut events = Vec::new();
                for (seq, e) in page {
                    if printed.insert(seq) {
                        after = after.max(seq);
                        events.push(e);
                    }
                }
                let keep_from = after - FOLLOW_OVERLAP;
                printed = printed.split_off(&keep_from);
                print(&events, header);
                header = false;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
