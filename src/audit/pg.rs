//! The PostgreSQL audit store: a small versioned migration runner over `migrations/*.sql`
//! (recorded in `schema_migrations`, serialized with an advisory lock), the batched idempotent
//! sink (`INSERT … SELECT FROM jsonb_array_elements … ON CONFLICT (event_id) DO NOTHING`), and the
//! reads `idgate audit query|follow|summary` use.
//!
//! The connection URL is a secret: it is never logged, and errors show only PostgreSQL's message.

use std::time::Duration;

use tokio_postgres::{types::ToSql, Client, NoTls};

use crate::types::Secret;

/// Connect / statement time limit.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Advisory lock key that serializes concurrent migrations.
const MIGRATION_LOCK: i64 = 0x6964_6761_7465; // "idgate"

/// One schema version.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version number (the file's numeric prefix).
    pub version: i32,
    /// File name without `.sql`.
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_audit_events",
    sql: include_str!("../../migrations/0001_audit_events.sql"),
}];

/// A failure talking to the audit database.
#[derive(Debug, thiserror::Error)]
pub enum PgAuditError {
    /// Connecting or logging in failed.
    #[error("cannot connect to the audit database: {0}")]
    Connect(tokio_postgres::Error),
    /// A statement failed.
    #[error("audit database: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// Migration `version` failed.
    #[error("migration {version} failed: {source}")]
    Migration {
        /// The version.
        version: i32,
        /// The cause.
        source: tokio_postgres::Error,
    },
    /// The database did not answer in time.
    #[error("the audit database did not answer within {0:?}")]
    Timeout(Duration),
    /// A stored event could not be read.
    #[error("stored event is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Connect to `url` (no TLS in this version) with a time limit.
pub async fn connect(url: &str) -> Result<Client, PgAuditError> {
    let fut = tokio_postgres::connect(url, NoTls);
    let (client, conn) = tokio::time::timeout(TIMEOUT, fut)
        .await
        .map_err(|_| PgAuditError::Timeout(TIMEOUT))?
        .map_err(PgAuditError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "audit database connection ended");
        }
    });
    Ok(client)
}

/// Apply the migrations not yet recorded in `schema_migrations`; returns the versions applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, PgAuditError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        tx.batch_execute(m.sql)
            .await
            .map_err(|source| PgAuditError::Migration {
                version: m.version,
                source,
            })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "audit database migrated"
        );
        applied.push(m.version);
    }
    tx.commit().await?;
    Ok(applied)
}

const INSERT: &str = "INSERT INTO audit_events (event_id, time, kind, outcome, reason, db_user, \
     client_user, tenant, object_id, client_addr, client_port, pool, target, session_id, event) \
     SELECT (r.e->>'event_id')::uuid, (r.e->>'time')::timestamptz, r.e->>'kind', r.e->>'outcome', \
     r.e->>'reason', r.e->>'db_user', r.e->>'client_user', r.e->>'tenant', r.e->>'object_id', \
     (r.x->>'ip')::inet, (r.x->>'port')::integer, r.e->>'pool', r.e->>'target', \
     (r.e->>'session_id')::uuid, r.e \
     FROM (SELECT a->'e' AS e, a AS x FROM jsonb_array_elements(($1::text)::jsonb) AS a) AS r \
     ON CONFLICT (event_id) DO NOTHING";

/// The batched, idempotent sink. Connects lazily and reconnects after any error.
pub struct PgSink {
    url: Secret<String>,
    client: Option<Client>,
    /// Apply pending migrations on the first connection that works (`postgres_migrate`).
    migrate: bool,
}

impl PgSink {
    /// A sink for `url` (not connected yet).
    pub fn new(url: Secret<String>, migrate: bool) -> Self {
        Self {
            url,
            client: None,
            migrate,
        }
    }

    /// Insert `events` in one statement; events already stored are skipped.
    pub async fn deliver(&mut self, events: &[serde_json::Value]) -> Result<(), PgAuditError> {
        if events.is_empty() {
            return Ok(());
        }
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                let mut client = connect(self.url.expose()).await?;
                // Migrating here, not at start, so an audit database that is down when idgate
                // starts delays delivery like any outage instead of stopping the gateway.
                if self.migrate {
                    migrate(&mut client).await?;
                    self.migrate = false;
                }
                client
            }
        };
        let rows: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                let addr = e["client_addr"]
                    .as_str()
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
                serde_json::json!({
                    "e": e,
                    "ip": addr.map(|a| a.ip().to_string()),
                    "port": addr.map(|a| a.port()),
                })
            })
            .collect();
        let body = serde_json::to_string(&rows)?;
        let result = tokio::time::timeout(TIMEOUT, client.execute(INSERT, &[&body])).await;
        match result {
            Ok(Ok(_)) => {
                self.client = Some(client);
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(PgAuditError::Timeout(TIMEOUT)),
        }
    }
}

/// Time limit of one audit query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Stored events matching `where_sql` (parameters `$1…` as text), after `after_seq`, oldest first.
/// Returns `(seq, event)` pairs.
pub async fn fetch(
    client: &Client,
    where_sql: &str,
    params: &[String],
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, serde_json::Value)>, PgAuditError> {
    let n = params.len();
    let sql = format!(
        "SELECT seq, event::text FROM audit_events WHERE seq > ${} AND ({where_sql}) \
         ORDER BY seq LIMIT ${}",
        n + 1,
        n + 2
    );
    let mut args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    args.push(&after_seq);
    args.push(&limit);
    events(client, &sql, &args).await
}

/// The newest `limit` stored events matching `where_sql`, oldest first, and how many match in
/// all.
pub async fn fetch_newest(
    client: &Client,
    where_sql: &str,
    params: &[String],
    limit: i64,
) -> Result<(Vec<(i64, serde_json::Value)>, i64), PgAuditError> {
    let n = params.len();
    let sql = format!(
        "SELECT seq, event::text FROM (SELECT seq, event FROM audit_events WHERE ({where_sql}) \
         ORDER BY seq DESC LIMIT ${}) newest ORDER BY seq",
        n + 1
    );
    let mut args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    args.push(&limit);
    let rows = events(client, &sql, &args).await?;
    let count_sql = format!("SELECT count(*) FROM audit_events WHERE ({where_sql})");
    let count: i64 = tokio::time::timeout(QUERY_TIMEOUT, client.query_one(&count_sql, &args[..n]))
        .await
        .map_err(|_| PgAuditError::Timeout(QUERY_TIMEOUT))??
        .get(0);
    Ok((rows, count))
}

async fn events(
    client: &Client,
    sql: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<Vec<(i64, serde_json::Value)>, PgAuditError> {
    let rows = tokio::time::timeout(QUERY_TIMEOUT, client.query(sql, args))
        .await
        .map_err(|_| PgAuditError::Timeout(QUERY_TIMEOUT))??;
    rows.iter()
        .map(|r| {
            let seq: i64 = r.get(0);
            let text: String = r.get(1);
            Ok((seq, serde_json::from_str(&text)?))
        })
        .collect()
}
