//! Reading the trail back: one [`Filter`] that works both on the PostgreSQL store (as SQL) and on
//! spool or file JSON lines (in memory), the output formats of `idgate audit query` (aligned
//! table, JSON lines, CSV), a [`Tail`] for `follow` over files, and the `summary` counts.

use std::borrow::Cow;
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::{self, Read, Seek, SeekFrom},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Serialize;
use serde_json::Value;

use super::spool::list_segments;

/// What to select. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Events at or after this time.
    pub from: Option<SystemTime>,
    /// Events before this time.
    pub to: Option<SystemTime>,
    /// `db_user` (with or without the namespace) or startup `user`, case-insensitive.
    pub user: Option<String>,
    /// Tenant id.
    pub tenant: Option<String>,
    /// `success` or `failure`.
    pub outcome: Option<String>,
    /// Reason code.
    pub reason: Option<String>,
    /// Pool name.
    pub pool: Option<String>,
    /// Client IP (a port, if given, is ignored).
    pub client_addr: Option<String>,
    /// Session id.
    pub session: Option<String>,
    /// Event kind.
    pub kind: Option<String>,
}

/// Why a filter value is not usable.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// `--since` is not a duration.
    #[error("--since {0:?} is not a duration such as 1h or 30m")]
    Since(String),
    /// `--from`/`--to` is not RFC 3339.
    #[error("{0:?} is not an RFC 3339 time such as 2025-01-31T08:00:00Z")]
    Time(String),
    /// `--outcome` is not success or failure.
    #[error("--outcome must be success or failure, not {0:?}")]
    Outcome(String),
}

/// Parse `--since` (relative to now).
pub fn since(value: &str) -> Result<SystemTime, FilterError> {
    humantime::parse_duration(value)
        .ok()
        .and_then(|d| SystemTime::now().checked_sub(d))
        .ok_or_else(|| FilterError::Since(value.to_owned()))
}

/// Parse `--from`/`--to`.
pub fn rfc3339(value: &str) -> Result<SystemTime, FilterError> {
    humantime::parse_rfc3339_weak(value).map_err(|_| FilterError::Time(value.to_owned()))
}

/// Check `--outcome`.
pub fn outcome(value: &str) -> Result<String, FilterError> {
    match value {
        "success" | "failure" => Ok(value.to_owned()),
        other => Err(FilterError::Outcome(other.to_owned())),
    }
}

fn ip_of(addr: &str) -> String {
    addr.parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| addr.to_owned())
}

fn event_time(e: &Value) -> Option<SystemTime> {
    e["time"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
}

impl Filter {
    /// Whether `e` is selected.
    pub fn matches(&self, e: &Value) -> bool {
        let s = |k: &str| e[k].as_str();
        let eq = |want: &Option<String>, k: &str| want.as_ref().is_none_or(|w| s(k) == Some(w));
        if self.from.is_some() || self.to.is_some() {
            let Some(t) = event_time(e) else { return false };
            if self.from.is_some_and(|f| t < f) || self.to.is_some_and(|to| t >= to) {
                return false;
            }
        }
        if let Some(u) = &self.user {
            let u = u.to_lowercase();
            let db = s("db_user").map(str::to_lowercase);
            let by_db = db
                .as_deref()
                .is_some_and(|d| d == u || d.strip_suffix(&u).is_some_and(|p| p.ends_with(':')));
            let by_client = s("client_user").is_some_and(|c| c.to_lowercase() == u);
            if !by_db && !by_client {
                return false;
            }
        }
        if let Some(a) = &self.client_addr {
            if s("client_addr").map(ip_of) != Some(ip_of(a)) {
                return false;
            }
        }
        eq(&self.tenant, "tenant")
            && eq(&self.outcome, "outcome")
            && eq(&self.reason, "reason")
            && eq(&self.pool, "pool")
            && eq(&self.session, "session_id")
            && eq(&self.kind, "kind")
    }

    /// The same selection as SQL over `audit_events`, with text parameters `$1…`.
    pub fn sql(&self) -> (String, Vec<String>) {
        let mut clauses = vec!["true".to_owned()];
        let mut params: Vec<String> = Vec::new();
        let mut add = |clause: &dyn Fn(usize) -> String, value: String| {
            params.push(value);
            clauses.push(clause(params.len()));
        };
        let ts = |t: SystemTime| humantime::format_rfc3339_micros(t).to_string();
        if let Some(f) = self.from {
            add(&|n| format!("time >= ${n}::text::timestamptz"), ts(f));
        }
        if let Some(t) = self.to {
            add(&|n| format!("time < ${n}::text::timestamptz"), ts(t));
        }
        if let Some(u) = &self.user {
            add(
                &|n| {
                    format!(
                        "(lower(db_user) = lower(${n}) OR right(lower(db_user), length(${n}) + 1) = ':' || lower(${n}) OR lower(client_user) = lower(${n}))"
                    )
                },
                u.clone(),
            );
        }
        if let Some(a) = &self.client_addr {
            add(&|n| format!("host(client_addr) = ${n}"), ip_of(a));
        }
        for (value, column) in [
            (&self.tenant, "tenant"),
            (&self.outcome, "outcome"),
            (&self.reason, "reason"),
            (&self.pool, "pool"),
            (&self.session, "session_id::text"),
            (&self.kind, "kind"),
        ] {
            if let Some(v) = value {
                add(&|n| format!("{column} = ${n}"), v.clone());
            }
        }
        (clauses.join(" AND "), params)
    }
}

/// Every event in a spool directory (all segments, oldest first) or a JSON-lines file.
/// Unreadable lines (a torn last line) are skipped.
pub fn read_path(path: &Path) -> io::Result<Vec<Value>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        list_segments(path)?.into_iter().map(|(_, p)| p).collect()
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        out.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
        );
    }
    Ok(out)
}

/// New complete lines in a spool directory or file since the last poll.
pub struct Tail {
    path: PathBuf,
    offsets: HashMap<PathBuf, u64>,
}

impl Tail {
    /// Start at the current end (`from_start` = false) or at the beginning.
    pub fn new(path: &Path, from_start: bool) -> io::Result<Tail> {
        let mut tail = Tail {
            path: path.to_path_buf(),
            offsets: HashMap::new(),
        };
        if !from_start {
            for f in tail.files()? {
                let len = std::fs::metadata(&f)?.len();
                tail.offsets.insert(f, len);
            }
        }
        Ok(tail)
    }

    fn files(&self) -> io::Result<Vec<PathBuf>> {
        if self.path.is_dir() {
            Ok(list_segments(&self.path)?
                .into_iter()
                .map(|(_, p)| p)
                .collect())
        } else {
            Ok(vec![self.path.clone()])
        }
    }

    /// Events appended since the last call.
    pub fn poll(&mut self) -> io::Result<Vec<Value>> {
        let mut out = Vec::new();
        for f in self.files()? {
            let offset = self.offsets.get(&f).copied().unwrap_or(0);
            let Ok(mut file) = std::fs::File::open(&f) else {
                continue;
            };
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            for line in buf[..complete].split(|b| *b == b'\n') {
                if let Ok(v) = serde_json::from_slice::<Value>(line) {
                    out.push(v);
                }
            }
            self.offsets.insert(f, offset + complete as u64);
        }
        Ok(out)
    }
}

/// `idgate audit query` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns with a header.
    Table,
    /// The full events, one JSON object per line.
    Json,
    /// The table's columns (plus target and event id) as RFC 4180 CSV with a header.
    Csv,
    /// OCSF Authentication events (logins, refusals, logoffs), one JSON object per line; events
    /// with no OCSF form are left out.
    Ocsf,
}

const TABLE_COLUMNS: [&str; 8] = [
    "time",
    "kind",
    "outcome",
    "user",
    "client_addr",
    "pool",
    "reason",
    "session_id",
];
const CSV_COLUMNS: [&str; 10] = [
    "time",
    "kind",
    "outcome",
    "user",
    "client_addr",
    "pool",
    "target",
    "reason",
    "session_id",
    "event_id",
];

fn cell(e: &Value, column: &str) -> String {
    let v = if column == "user" {
        e.get("db_user")
            .filter(|v| v.is_string())
            .or_else(|| e.get("client_user"))
            .cloned()
            .unwrap_or(Value::Null)
    } else {
        e[column].clone()
    };
    match v {
        Value::Null => String::new(),
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Render events in `format` (the header is written even with no event, except for JSON).
pub fn render(events: &[Value], format: OutputFormat) -> String {
    let mut out = String::new();
    match format {
        OutputFormat::Json => {
            for e in events {
                out.push_str(&e.to_string());
                out.push('\n');
            }
        }
        OutputFormat::Ocsf => {
            for e in events.iter().filter_map(super::ocsf::to_ocsf) {
                out.push_str(&e.to_string());
                out.push('\n');
            }
        }
        OutputFormat::Csv => {
            out.push_str(&CSV_COLUMNS.join(","));
            out.push('\n');
            for e in events {
                let row: Vec<String> = CSV_COLUMNS.iter().map(|c| csv_field(&cell(e, c))).collect();
                out.push_str(&row.join(","));
                out.push('\n');
            }
        }
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = events
                .iter()
                .map(|e| TABLE_COLUMNS.iter().map(|c| cell(e, c)).collect())
                .collect();
            let header: Vec<String> = TABLE_COLUMNS.iter().map(|c| c.to_uppercase()).collect();
            table(&mut out, &header, &rows);
        }
    }
    out
}

/// A value as it may reach a terminal: control characters (newlines, escape sequences) that a
/// client put into its startup values are shown escaped (`\n`, `\u{1b}`), so no cell can forge a
/// row or drive the terminal.
fn printable(s: &str) -> Cow<'_, str> {
    if s.chars().any(is_unsafe_for_terminal) {
        Cow::Owned(
            s.chars()
                .map(|c| {
                    if is_unsafe_for_terminal(c) {
                        c.escape_unicode().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

/// Control characters, bidirectional overrides and isolates (which reorder what a terminal
/// shows), and zero-width characters (which hide text).
fn is_unsafe_for_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

fn table(out: &mut String, header: &[String], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// An RFC 4180 field. Control characters are escaped as in the table, and a value a spreadsheet
/// would run as a formula (`=`, `+`, `-`, `@` first) is prefixed with `'`.
fn csv_field(s: &str) -> String {
    let s = printable(s);
    let s = if s.starts_with(['=', '+', '-', '@']) {
        Cow::Owned(format!("'{s}"))
    } else {
        s
    };
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

/// Counts for `idgate audit summary`.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Completed logins (`session_routed`).
    pub logins: u64,
    /// Refusals (`auth_failed` and `backend_login_failed`).
    pub refusals: u64,
    /// Alerts fired.
    pub alerts: u64,
    /// user → (logins, refusals).
    pub per_user: BTreeMap<String, (u64, u64)>,
    /// reason → refusals.
    pub per_reason: BTreeMap<String, u64>,
    /// pool → (logins, refusals).
    pub per_pool: BTreeMap<String, (u64, u64)>,
    /// Client IPs with failures, most first (at most 10).
    pub top_failing_clients: Vec<(String, u64)>,
}

/// Count logins and refusals in `events`.
pub fn summarize(events: &[Value]) -> Summary {
    let mut s = Summary::default();
    let mut clients: HashMap<String, u64> = HashMap::new();
    for e in events {
        let (login, refusal) = match e["kind"].as_str() {
            Some("session_routed") => (1, 0),
            Some("auth_failed" | "backend_login_failed") => (0, 1),
            Some("alert") => {
                s.alerts += 1;
                continue;
            }
            _ => continue,
        };
        s.logins += login;
        s.refusals += refusal;
        let user = cell(e, "user");
        let u = s
            .per_user
            .entry(if user.is_empty() {
                "(unknown)".into()
            } else {
                user
            })
            .or_default();
        u.0 += login;
        u.1 += refusal;
        if let Some(pool) = e["pool"].as_str() {
            let p = s.per_pool.entry(pool.to_owned()).or_default();
            p.0 += login;
            p.1 += refusal;
        }
        if refusal == 1 {
            let reason = e["reason"].as_str().unwrap_or("(none)").to_owned();
            *s.per_reason.entry(reason).or_default() += 1;
            if let Some(a) = e["client_addr"].as_str() {
                *clients.entry(ip_of(a)).or_default() += 1;
            }
        }
    }
    let mut top: Vec<(String, u64)> = clients.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(10);
    s.top_failing_clients = top;
    s
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "logins: {}  refusals: {}  alerts: {}\n",
            self.logins, self.refusals, self.alerts
        );
        let pairs = |m: &BTreeMap<String, (u64, u64)>| -> Vec<Vec<String>> {
            m.iter()
                .map(|(k, (l, r))| vec![k.clone(), l.to_string(), r.to_string()])
                .collect()
        };
        let counts = |m: &mut dyn Iterator<Item = (&String, &u64)>| -> Vec<Vec<String>> {
            m.map(|(k, n)| vec![k.clone(), n.to_string()]).collect()
        };
        let sections: [(&[&str], Vec<Vec<String>>); 4] = [
            (&["USER", "LOGINS", "REFUSALS"], pairs(&self.per_user)),
            (&["REASON", "REFUSALS"], counts(&mut self.per_reason.iter())),
            (&["POOL", "LOGINS", "REFUSALS"], pairs(&self.per_pool)),
            (
                &["CLIENT_ADDR", "FAILURES"],
                counts(&mut self.top_failing_clients.iter().map(|(k, n)| (k, n))),
            ),
        ];
        for (i, (header, rows)) in sections.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let header: Vec<String> = header.iter().map(|c| c.to_string()).collect();
            table(&mut out, &header, rows);
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_values_cannot_forge_rows_or_drive_the_terminal() {
        let forged = "mallory\n2026-12-04T09:00:00.000Z  auth_succeeded  success  aad:ceo\u{1b}[8m";
        let events = vec![
            json!({"time":"2025-01-01T11:00:00.000Z","kind":"auth_failed","outcome":"failure","client_user":forged,"session_id":"s9"}),
            json!({"time":"2025-01-01T11:00:01.000Z","kind":"auth_failed","outcome":"failure","client_user":"=HYPERLINK(\"x\")","session_id":"s10"}),
            json!({"time":"2025-01-01T11:00:02.000Z","kind":"auth_failed","outcome":"failure","client_user":"eve\u{202e}nimda\u{200b}","session_id":"s11"}),
        ];
        let table = render(&events, OutputFormat::Table);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(!table.contains('\u{1b}'));
        assert!(table.contains("mallory\\u{a}2026"), "{table}");
        assert!(table.contains("\\u{1b}[8m"), "{table}");
        assert!(table.contains("eve\\u{202e}nimda\\u{200b}"), "{table}");
        let csv = render(&events, OutputFormat::Csv);
        assert_eq!(csv.lines().count(), 4, "{csv}");
        assert!(!csv.contains('\u{1b}') && !csv.contains('\u{202e}'));
        assert!(csv.contains("\"'=HYPERLINK(\"\"x\"\")\""), "{csv}");
        let summary = summarize(&events).to_string();
        assert!(!summary.contains('\u{1b}'), "{summary}");
        assert!(
            !summary.lines().any(|l| l.starts_with("2026-12-04")),
            "{summary}"
        );
        // JSON lines stay exact (they are escaped by JSON itself).
        let json = render(&events, OutputFormat::Json);
        let back: Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
        assert_eq!(back["client_user"], forged);
    }

    fn events() -> Vec<Value> {
        vec![
            json!({"time":"2025-01-01T10:00:00.000Z","kind":"session_routed","outcome":"success","db_user":"aad:alice@x.example","client_addr":"10.0.0.1:5000","pool":"main","session_id":"s1","tenant":"t1"}),
            json!({"time":"2025-01-01T11:00:00.000Z","kind":"auth_failed","outcome":"failure","reason":"bad_signature","client_user":"Bob@x.example","client_addr":"10.0.0.2:5001","session_id":"s2"}),
            json!({"time":"2025-01-01T12:00:00.000Z","kind":"auth_failed","outcome":"failure","reason":"token_expired","client_user":"x, \"y\"","client_addr":"10.0.0.2:5002","session_id":"s3","pool":"main"}),
        ]
    }

    #[test]
    fn filters_match_in_memory() {
        let ev = events();
        let count = |f: Filter| ev.iter().filter(|e| f.matches(e)).count();
        let by = |set: fn(&mut Filter)| {
            let mut f = Filter::default();
            set(&mut f);
            f
        };
        let cases: [(Filter, usize); 6] = [
            (Filter::default(), 3),
            (by(|f| f.user = Some("alice@x.example".into())), 1),
            (by(|f| f.user = Some("bob@x.example".into())), 1),
            (by(|f| f.outcome = Some("failure".into())), 2),
            (by(|f| f.client_addr = Some("10.0.0.2".into())), 2),
            (
                by(|f| {
                    f.from = rfc3339("2025-01-01T10:30:00Z").ok();
                    f.to = rfc3339("2025-01-01T12:00:00Z").ok();
                }),
                1,
            ),
        ];
        for (filter, want) in cases {
            assert_eq!(count(filter.clone()), want, "{filter:?}");
        }
        let (sql, params) = Filter {
            user: Some("a".into()),
            pool: Some("p".into()),
            ..Default::default()
        }
        .sql();
        assert!(sql.contains("$1") && sql.contains("pool = $2"), "{sql}");
        assert_eq!(params, vec!["a".to_owned(), "p".to_owned()]);
    }

    #[test]
    fn formats_and_summary() {
        let ev = events();
        let csv = render(&ev, OutputFormat::Csv);
        assert!(csv.contains("\"x, \"\"y\"\"\""), "{csv}");
        let table = render(&ev, OutputFormat::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        let col = lines[0].find("KIND").unwrap();
        assert!(lines[1..]
            .iter()
            .all(|l| l.len() > col && &l[col - 2..col] == "  "));
        let s = summarize(&ev);
        assert_eq!((s.logins, s.refusals), (1, 2));
        assert_eq!(s.top_failing_clients, vec![("10.0.0.2".to_owned(), 2)]);
    }
}
