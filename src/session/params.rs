//! Which startup parameters reach the backend.
//!
//! Redshift IdP keys (`idp_type`, `plugin_name`, `provider_name`, `token_type`,
//! `identity_namespace`, …) are never forwarded. Every Redshift-only key is stripped for a
//! PostgreSQL backend, which would refuse it as an unknown setting. Identity-changing settings
//! (`role`, `session_authorization`, as a key or inside `options`) and replication are refused.

use std::borrow::Cow;

use crate::{
    config::PoolKind,
    error::{sqlstate, ErrorKind, Reportable, UserFacing},
    protocol::startup::StartupParams,
};

/// Keys used by idgate itself and never forwarded.
pub const NEVER_FORWARD: &[&str] = &[
    "user",
    "idp_type",
    "plugin_name",
    "provider_name",
    "token_type",
    "identity_namespace",
    "idc_client_display_name",
];

/// Keys only Redshift understands (redshift-wire.md §2.4).
const REDSHIFT_ONLY: &[&str] = &[
    "client_protocol_version",
    "driver_version",
    "os_version",
    "driver_discovery_version",
    "compression",
];

/// Settings that would change who the session runs as.
const IDENTITY_CHANGING: &[&str] = &["role", "session_authorization"];

/// A startup parameter idgate refuses.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// `role` / `session_authorization` as a key or in `options`.
    #[error("identity-changing setting {0:?}")]
    IdentityChanging(String),
    /// `replication` was requested.
    #[error("replication connection requested")]
    Replication,
}

impl Reportable for ParamsError {
    fn kind(&self) -> ErrorKind {
        match self {
            ParamsError::IdentityChanging(_) | ParamsError::Replication => ErrorKind::User,
        }
    }

    fn reason(&self) -> Cow<'static, str> {
        match self {
            ParamsError::IdentityChanging(_) => "identity_changing_option".into(),
            ParamsError::Replication => "replication_refused".into(),
        }
    }
}

impl UserFacing for ParamsError {
    fn sqlstate(&self) -> &'static str {
        match self {
            ParamsError::IdentityChanging(_) => sqlstate::INSUFFICIENT_PRIVILEGE,
            ParamsError::Replication => sqlstate::FEATURE_NOT_SUPPORTED,
        }
    }

    fn client_message(&self) -> Cow<'static, str> {
        match self {
            ParamsError::IdentityChanging(name) => format!(
                "idgate does not allow setting {name} at login: the session runs as the token's identity; remove it from the connection options"
            )
            .into(),
            ParamsError::Replication => "replication connections are not supported through idgate".into(),
        }
    }
}

/// The parameters to send to a backend of `kind` (without `user`, which the backend login adds).
pub fn backend_params(
    params: &StartupParams,
    kind: PoolKind,
) -> Result<Vec<(String, String)>, ParamsError> {
    backend_params_routed(params, kind, None, None)
}

/// [`backend_params`] after routing: `route_option` is removed from `options`, and `database`
/// replaces the startup database (the `NAME/db` form).
pub fn backend_params_routed(
    params: &StartupParams,
    kind: PoolKind,
    route_option: Option<&str>,
    database: Option<&str>,
) -> Result<Vec<(String, String)>, ParamsError> {
    let mut out = Vec::new();
    for (key, value) in params.iter() {
        let lower = key.to_ascii_lowercase();
        if IDENTITY_CHANGING.contains(&lower.as_str()) {
            return Err(ParamsError::IdentityChanging(lower));
        }
        if lower == "replication" {
            // PostgreSQL treats false/off/no/0 as an ordinary connection.
            if matches!(
                value.to_ascii_lowercase().as_str(),
                "false" | "off" | "no" | "0"
            ) {
                continue;
            }
            return Err(ParamsError::Replication);
        }
        if NEVER_FORWARD.contains(&lower.as_str()) {
            continue;
        }
        if REDSHIFT_ONLY.contains(&lower.as_str()) && kind == PoolKind::Postgres {
            continue;
        }
        if lower == "options" {
            for name in option_names(value) {
                if IDENTITY_CHANGING.contains(&name.as_str()) {
                    return Err(ParamsError::IdentityChanging(name));
                }
            }
            let rest = match route_option {
                Some(opt) => take_option(value, opt).1,
                None => value.to_owned(),
            };
            if !rest.is_empty() {
                out.push((key.to_owned(), rest));
            }
            continue;
        }
        if lower == "database" {
            out.push((key.to_owned(), database.unwrap_or(value).to_owned()));
            continue;
        }
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// Split an `options` value into words, keeping each word's raw text (with its escapes) and its
/// unescaped value. Backslash escapes the next character, as PostgreSQL's `pg_split_opts`.
fn option_words(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let (mut raw, mut word) = (String::new(), String::new());
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                raw.push(c);
                if let Some(n) = chars.next() {
                    raw.push(n);
                    word.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !raw.is_empty() {
                    words.push((std::mem::take(&mut raw), std::mem::take(&mut word)));
                }
            }
            c => {
                raw.push(c);
                word.push(c);
            }
        }
    }
    if !raw.is_empty() {
        words.push((raw, word));
    }
    words
}

/// Remove the setting `name` (`-c name=v`, `-cname=v`, `--name=v`) from `options`; returns its
/// value and the remaining options (raw text preserved).
pub fn take_option(options: &str, name: &str) -> (Option<String>, String) {
    let words = option_words(options);
    let mut kept: Vec<&str> = Vec::new();
    let mut value = None;
    let prefix = format!("{name}=");
    let mut i = 0;
    while i < words.len() {
        let (raw, word) = &words[i];
        let (setting, consumed) = if word == "-c" {
            (words.get(i + 1).map(|w| w.1.as_str()), 2)
        } else if let Some(rest) = word.strip_prefix("--") {
            (Some(rest), 1)
        } else {
            (word.strip_prefix("-c"), 1)
        };
        match setting.and_then(|s| s.strip_prefix(prefix.as_str())) {
            Some(v) => {
                value = Some(v.to_owned());
                i += consumed;
            }
            None => {
                kept.push(raw);
                i += 1;
            }
        }
    }
    (value, kept.join(" "))
}

/// The setting names in an `options` value (`-c name=value`, `-cname=value`, `--name=value`),
/// normalized as PostgreSQL does (lower case, `-` → `_`). Backslash escapes a space.
pub fn option_names(options: &str) -> Vec<String> {
    let words: Vec<String> = option_words(options).into_iter().map(|(_, w)| w).collect();
    let mut names = Vec::new();
    let mut iter = words.into_iter();
    while let Some(w) = iter.next() {
        let setting = if w == "-c" {
            iter.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("-c").map(str::to_owned)
        };
        if let Some(setting) = setting {
            let name = setting.split('=').next().unwrap_or_default();
            names.push(name.to_ascii_lowercase().replace('-', "_"));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> StartupParams {
        StartupParams::from_pairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn redshift_and_idp_keys_are_stripped_for_postgres() {
        let p = params(&[
            ("user", "x"),
            ("database", "dev"),
            ("application_name", "app"),
            ("client_protocol_version", "2"),
            ("driver_version", "Redshift Python Driver 2.2.0"),
            ("idp_type", "AwsIdc"),
            (
                "plugin_name",
                "redshift_connector.plugin.IdpTokenAuthPlugin",
            ),
            ("token_type", "EXT_JWT"),
            ("TimeZone", "UTC"),
        ]);
        let out = backend_params(&p, PoolKind::Postgres).unwrap();
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["database", "application_name", "TimeZone"]);
        let out = backend_params(&p, PoolKind::Redshift).unwrap();
        assert!(out.iter().any(|(k, _)| k == "client_protocol_version"));
        assert!(!out
            .iter()
            .any(|(k, _)| k == "idp_type" || k == "token_type" || k == "plugin_name"));
    }

    #[test]
    fn identity_changing_settings_are_refused() {
        for opts in [
            "-c role=admin",
            "-crole=admin",
            "--session-authorization=x",
            "-c search_path=a -c ROLE=x",
        ] {
            let p = params(&[("options", opts)]);
            assert!(
                matches!(
                    backend_params(&p, PoolKind::Postgres),
                    Err(ParamsError::IdentityChanging(_))
                ),
                "{opts}"
            );
        }
        assert!(backend_params(&params(&[("Role", "x")]), PoolKind::Postgres).is_err());
        assert!(matches!(
            backend_params(&params(&[("replication", "true")]), PoolKind::Postgres),
            Err(ParamsError::Replication)
        ));
        let plain = backend_params(
            &params(&[("replication", "false"), ("database", "d")]),
            PoolKind::Postgres,
        );
        assert_eq!(
            plain.unwrap(),
            vec![("database".to_owned(), "d".to_owned())]
        );
        let ok = params(&[("options", "-c search_path=a\\ b -c statement_timeout=5s")]);
        assert!(backend_params(&ok, PoolKind::Postgres).is_ok());
        assert_eq!(
            option_names("-c search_path=a\\ b --work-mem=1MB"),
            ["search_path", "work_mem"]
        );
    }

    #[test]
    fn the_routing_option_is_taken_out_and_the_database_rewritten() {
        let (v, rest) = take_option(
            "-c search_path=a\\ b -c idgate.workgroup=wg-b --x=1",
            "idgate.workgroup",
        );
        assert_eq!(
            (v.as_deref(), rest.as_str()),
            (Some("wg-b"), "-c search_path=a\\ b --x=1")
        );
        let (v, rest) = take_option("-cidgate.workgroup=a", "idgate.workgroup");
        assert_eq!((v.as_deref(), rest.as_str()), (Some("a"), ""));
        let p = params(&[
            ("database", "wg-b/dev"),
            ("options", "-c idgate.workgroup=wg-b"),
        ]);
        let out = backend_params_routed(
            &p,
            PoolKind::Postgres,
            Some("idgate.workgroup"),
            Some("dev"),
        )
        .unwrap();
        assert_eq!(out, vec![("database".to_owned(), "dev".to_owned())]);
    }
}
