//! Microsoft Entra ID access-token validation for the gateway.
//!
//! [`Authenticator::verify`] runs the pipeline of entra-tokens.md §0: size and shape, header,
//! payload peek, token kind, issuer/tenant binding, audience, key lookup (cached, single-flight
//! and rate-floored refetch, last-known-good on failure), signature and lifetime with
//! `jsonwebtoken`, `iat`, and scope/app-role authorization. The result is a [`VerifiedClaims`],
//! which nothing outside this module can construct.
//!
//! Tokens that passed are remembered in a validated-token cache keyed by SHA-256 of the token,
//! whose entries never outlive the token's `exp` (and at most 10 minutes); a hit re-checks
//! `exp` against the clock.
//!
//! The token itself never appears in an error, a `Debug` output or a log line.

mod claims;
mod error;
mod jwks;
mod jwt;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use reqwest::Url;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use claims::VerifiedClaims;
pub use error::{AuthSetupError, TokenError};
pub use jwt::{is_canonical_guid, is_first_party_audience};

use jwks::{Counters, Fetcher, KeySource, SourceSettings};

/// Longest token accepted, in bytes (PostgreSQL's own limit for a password packet is 65535).
pub const MAX_TOKEN_LEN: usize = 65536;

/// A validated token is never served from the cache for longer than this, even if its `exp`
/// is later (bounds how long a revoked key or a config change can be ignored).
pub const TOKEN_CACHE_MAX_AGE: Duration = Duration::from_secs(600);

/// Most validated tokens kept.
const TOKEN_CACHE_CAPACITY: u64 = 100_000;

/// Largest leeway accepted; more would make `exp` meaningless.
pub(crate) const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// Shortest background refresh interval.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Longest accepted `jwks_refresh`.
pub(crate) const MAX_REFRESH: Duration = Duration::from_secs(7 * 24 * 3600);

/// Longest accepted `jwks_max_stale`.
pub(crate) const MAX_STALE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Longest accepted `jwks_refetch_floor`.
pub(crate) const MAX_REFETCH_FLOOR: Duration = Duration::from_secs(24 * 3600);

/// Longest accepted `http_timeout`.
pub(crate) const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(300);

/// Entra access-token version (`ver` claim), which also selects the metadata document.
///
/// Serialized as the `ver` claim value (`"1.0"`, `"2.0"`); `"1"`, `"2"`, `"v1"`, `"v2"` are
/// accepted too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TokenVersion {
    /// `ver = "1.0"`, issuer `https://sts.windows.net/{tid}/`.
    #[serde(rename = "1.0", alias = "1", alias = "v1")]
    V1,
    /// `ver = "2.0"`, issuer `{authority}/{tid}/v2.0`.
    #[serde(rename = "2.0", alias = "2", alias = "v2")]
    V2,
}

impl TokenVersion {
    /// The `ver` claim value.
    pub fn as_claim(self) -> &'static str {
        match self {
            TokenVersion::V1 => "1.0",
            TokenVersion::V2 => "2.0",
        }
    }

    /// Path of the tenant's discovery document below the authority.
    fn discovery_path(self, tenant: &str) -> String {
        match self {
            TokenVersion::V1 => format!("/{tenant}/.well-known/openid-configuration"),
            TokenVersion::V2 => format!("/{tenant}/v2.0/.well-known/openid-configuration"),
        }
    }
}

/// One trusted Entra issuer configuration (already validated by the config layer; checked again
/// by [`Authenticator::new`]).
#[derive(Clone, Debug)]
pub struct IssuerSettings {
    /// Label used in logs, audit and metrics, e.g. `contoso`.
    pub name: String,
    /// `https://login.microsoftonline.com` (or a national cloud), or `http://127.0.0.1:PORT` for
    /// the dev IdP. No trailing slash. Plain HTTP only to loopback hosts.
    pub authority: String,
    /// Allow-list of tenant GUIDs (canonical lowercase).
    pub tenants: Vec<String>,
    /// Token versions accepted.
    pub accept_versions: Vec<TokenVersion>,
    /// Accepted `aud` values, compared exactly.
    pub audiences: Vec<String>,
    /// Delegated tokens: `scp` must contain one of these (empty = no requirement).
    pub required_scopes: Vec<String>,
    /// App-only tokens (no `scp`): `roles` must contain one of these (empty = no requirement;
    /// a token with neither `scp` nor `roles` is always refused).
    pub required_app_roles: Vec<String>,
    /// Clock-skew allowance for `exp`, `nbf` and `iat` (whole seconds are used).
    pub leeway: Duration,
    /// Minimum interval between unknown-kid refetches per (issuer, tenant, version).
    pub jwks_refetch_floor: Duration,
    /// Background refresh interval.
    pub jwks_refresh: Duration,
    /// Keys keep serving this long after the last successful fetch that contained them.
    pub jwks_max_stale: Duration,
    /// Connect and total timeout of each discovery/JWKS request.
    pub http_timeout: Duration,
    /// Development only: allow a plain-http authority that is not on loopback (e.g. the dev IdP
    /// service in docker-compose). Never set in production.
    pub allow_http: bool,
}

/// Counters of an [`Authenticator`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthStats {
    /// Discovery documents requested.
    pub discovery_fetches: u64,
    /// Discovery requests that failed.
    pub discovery_fetch_failures: u64,
    /// Key sets requested.
    pub jwks_fetches: u64,
    /// Key-set requests that failed (transport, status, body or no usable key).
    pub jwks_fetch_failures: u64,
    /// Refetches caused by an unknown `kid`.
    pub unknown_kid_refetches: u64,
    /// Unknown kids answered from the negative cache.
    pub negative_kid_hits: u64,
    /// Tokens answered from the validated-token cache.
    pub token_cache_hits: u64,
    /// Well-formed tokens not found in the validated-token cache.
    pub token_cache_misses: u64,
    /// Tokens accepted.
    pub tokens_accepted: u64,
    /// Tokens refused.
    pub tokens_refused: u64,
    /// Entries in the validated-token cache (approximate).
    pub token_cache_entries: u64,
}

/// One configured issuer, prepared for validation.
struct IssuerRuntime {
    name: Arc<str>,
    settings: IssuerSettings,
    validation: jsonwebtoken::Validation,
    /// `<first audience>/<first required scope>`, told to clients with a token for another
    /// resource.
    scope_hint: String,
}

/// A key source that may validate tokens of one tenant.
struct Candidate {
    issuer: usize,
    version: TokenVersion,
    source: Arc<KeySource>,
}

/// Per-entry expiry of the validated-token cache: never past `exp`, at most
/// [`TOKEN_CACHE_MAX_AGE`].
struct UntilExp;

fn remaining_life(claims: &VerifiedClaims) -> Duration {
    claims
        .expires_at()
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .min(TOKEN_CACHE_MAX_AGE)
}

impl moka::Expiry<[u8; 32], Arc<VerifiedClaims>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<VerifiedClaims>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(remaining_life(value))
    }

    fn expire_after_update(
        &self,
        _key: &[u8; 32],
        value: &Arc<VerifiedClaims>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(remaining_life(value))
    }
}

struct Inner {
    issuers: Vec<IssuerRuntime>,
    sources: Vec<Arc<KeySource>>,
    /// tid → the key sources (issuer × version) that trust it.
    by_tenant: HashMap<String, Vec<Candidate>>,
    token_cache: moka::sync::Cache<[u8; 32], Arc<VerifiedClaims>>,
    counters: Arc<Counters>,
    /// Every issuer's audiences (the tenant-independent first audience check).
    audiences: Vec<String>,
    /// When this validator was built (the age of keys that were never fetched).
    created: Instant,
}

/// Validates Entra access tokens. Cheap to clone (shares its caches).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "issuers",
                &self
                    .inner
                    .issuers
                    .iter()
                    .map(|i| &*i.name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn invalid(issuer: &str, problem: impl Into<String>) -> AuthSetupError {
    AuthSetupError::Invalid {
        issuer: issuer.to_owned(),
        problem: problem.into(),
    }
}

impl Authenticator {
    /// Check the issuer settings and build the (cold) caches. Does no network I/O; call
    /// [`Self::prefetch`] to warm up.
    pub fn new(issuers: Vec<IssuerSettings>) -> Result<Self, AuthSetupError> {
        Self::succeeding(issuers, None)
    }

    /// A validator for changed issuers that carries on `previous`'s counters, so the totals that
    /// metrics mirror keep counting across a reload.
    pub fn succeeding(
        issuers: Vec<IssuerSettings>,
        previous: Option<&Authenticator>,
    ) -> Result<Self, AuthSetupError> {
        if issuers.is_empty() {
            return Err(AuthSetupError::NoIssuers);
        }
        let counters = previous.map_or_else(
            || Arc::new(Counters::default()),
            |p| Arc::clone(&p.inner.counters),
        );
        let mut runtimes = Vec::with_capacity(issuers.len());
        let mut sources = Vec::new();
        let mut by_tenant: HashMap<String, Vec<Candidate>> = HashMap::new();

        for (idx, s) in issuers.into_iter().enumerate() {
            if s.name.is_empty() {
                return Err(invalid("", "empty issuer name"));
            }
            if runtimes.iter().any(|r: &IssuerRuntime| *r.name == *s.name) {
                return Err(AuthSetupError::DuplicateIssuerName(s.name));
            }
            let authority_str = s.authority.trim_end_matches('/');
            let authority = Url::parse(authority_str)
                .map_err(|e| invalid(&s.name, format!("authority is not a URL: {e}")))?;
            if !jwks::is_allowed_scheme(&authority, s.allow_http) {
                return Err(invalid(
                    &s.name,
                    "authority must be https (plain http only to a loopback host)",
                ));
            }
            if authority.query().is_some()
                || authority.fragment().is_some()
                || !authority.username().is_empty()
                || authority.password().is_some()
            {
                return Err(invalid(
                    &s.name,
                    "authority must not carry credentials, a query or a fragment",
                ));
            }
            if s.tenants.is_empty() {
                return Err(invalid(&s.name, "no tenant allowed"));
            }
            if let Some(t) = s.tenants.iter().find(|t| !is_canonical_guid(t)) {
                return Err(invalid(
                    &s.name,
                    format!("tenant {t:?} is not a canonical lowercase GUID"),
                ));
            }
            if s.accept_versions.is_empty() {
                return Err(invalid(&s.name, "no token version accepted"));
            }
            if s.audiences.is_empty() || s.audiences.iter().any(String::is_empty) {
                return Err(invalid(&s.name, "audiences must be non-empty strings"));
            }
            if let Some(a) = s.audiences.iter().find(|a| is_first_party_audience(a)) {
                return Err(invalid(
                    &s.name,
                    format!("audience {a:?} is a Microsoft first-party resource"),
                ));
            }
            if s.leeway > MAX_LEEWAY {
                return Err(invalid(&s.name, "leeway is longer than one hour"));
            }
            if s.jwks_max_stale.is_zero() || s.http_timeout.is_zero() {
                return Err(invalid(
                    &s.name,
                    "jwks_max_stale and http_timeout must be positive",
                ));
            }
            // Upper bounds keep timer and cache arithmetic far from overflow.
            for (what, value, max) in [
                ("jwks_max_stale", s.jwks_max_stale, MAX_STALE),
                ("jwks_refresh", s.jwks_refresh, MAX_REFRESH),
                (
                    "jwks_refetch_floor",
                    s.jwks_refetch_floor,
                    MAX_REFETCH_FLOOR,
                ),
                ("http_timeout", s.http_timeout, MAX_HTTP_TIMEOUT),
            ] {
                if value > max {
                    return Err(invalid(
                        &s.name,
                        format!("{what} is longer than {}", humantime::format_duration(max)),
                    ));
                }
            }
            let fetcher = Fetcher::new(
                s.http_timeout,
                jwks::is_loopback(&authority),
                s.allow_http,
                Arc::clone(&counters),
            )
            .map_err(AuthSetupError::HttpClient)?;

            let name: Arc<str> = Arc::from(s.name.as_str());
            let mut versions: Vec<TokenVersion> = Vec::new();
            for v in &s.accept_versions {
                if !versions.contains(v) {
                    versions.push(*v);
                }
            }
            let mut tenants = s.tenants.clone();
            tenants.sort();
            tenants.dedup();
            for tenant in &tenants {
                for &version in &versions {
                    let discovery_url = Url::parse(&format!(
                        "{authority_str}{}",
                        version.discovery_path(tenant)
                    ))
                    .map_err(|e| invalid(&s.name, format!("discovery URL: {e}")))?;
                    let source = Arc::new(KeySource::new(
                        SourceSettings {
                            issuer_name: Arc::clone(&name),
                            tenant: tenant.as_str().into(),
                            version,
                            discovery_url,
                            refetch_floor: s.jwks_refetch_floor,
                            max_stale: s.jwks_max_stale,
                        },
                        fetcher.clone(),
                        Arc::clone(&counters),
                    ));
                    sources.push(Arc::clone(&source));
                    by_tenant
                        .entry(tenant.clone())
                        .or_default()
                        .push(Candidate {
                            issuer: idx,
                            version,
                            source,
                        });
                }
            }
            let scope_hint = format!(
                "{}/{}",
                s.audiences[0].trim_end_matches('/'),
                s.required_scopes
                    .first()
                    .map(String::as_str)
                    .unwrap_or(".default")
            );
            runtimes.push(IssuerRuntime {
                validation: jwt::validation(&s.audiences, s.leeway),
                name,
                settings: s,
                scope_hint,
            });
        }

        let token_cache = moka::sync::Cache::builder()
            .max_capacity(TOKEN_CACHE_CAPACITY)
            .expire_after(UntilExp)
            .build();
        let mut audiences: Vec<String> = runtimes
            .iter()
            .flat_map(|r| r.settings.audiences.iter().cloned())
            .collect();
        audiences.sort();
        audiences.dedup();
        Ok(Authenticator {
            inner: Arc::new(Inner {
                audiences,
                issuers: runtimes,
                sources,
                by_tenant,
                token_cache,
                counters,
                created: Instant::now(),
            }),
        })
    }

    /// Validate one token.
    ///
    /// No network call on the hot path unless the source is cold or the `kid` is unknown (then
    /// one shared, rate-floored refetch). Cancel safe: dropping the future abandons at most an
    /// in-flight key fetch, which the next caller redoes.
    pub async fn verify(&self, token: &str) -> Result<VerifiedClaims, TokenError> {
        let r = self.verify_inner(token).await;
        let c = &self.inner.counters;
        match &r {
            Ok(_) => c.tokens_accepted.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.tokens_refused.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    async fn verify_inner(&self, token: &str) -> Result<VerifiedClaims, TokenError> {
        let inner = &*self.inner;
        let segments = jwt::check_shape(token)?;

        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = inner.token_cache.get(&hash) {
            // moka's expiry is not exact: never trust it for `exp`.
            if SystemTime::now() < hit.expires_at() {
                inner
                    .counters
                    .token_cache_hits
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(VerifiedClaims::clone(&hit));
            }
            inner.token_cache.invalidate(&hash);
        }
        inner
            .counters
            .token_cache_misses
            .fetch_add(1, Ordering::Relaxed);

        let kid = jwt::check_header(segments.header)?;
        let claims = jwt::peek_payload(segments.payload)?;
        jwt::check_first_party(&claims, self.scope_hint_for(&claims))?;
        // Before anything depends on the tenant: a token for another resource gets the same
        // answer whether its tenant is trusted or not, so the answer reveals no configuration.
        jwt::check_audience(&claims, &inner.audiences, self.scope_hint_for(&claims))?;
        let hints = jwt::routing_hints(&claims)?;

        let Some(candidates) = inner.by_tenant.get(hints.tid) else {
            return Err(TokenError::TenantNotAllowed {
                tid: hints.tid.into(),
            });
        };
        let mut first_err = None;
        let mut chosen = None;
        for c in candidates.iter().filter(|c| c.version == hints.version) {
            let outcome = match c.source.issuer_template().await {
                Ok(d) => jwt::check_issuer(hints.iss, hints.tid, &d.issuer),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    chosen = Some(c);
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some(c) = chosen else {
            return Err(first_err.unwrap_or_else(|| TokenError::VersionNotAccepted {
                ver: hints.version.as_claim().into(),
            }));
        };
        let issuer = &inner.issuers[c.issuer];
        jwt::check_audience(&claims, &issuer.settings.audiences, &issuer.scope_hint)?;

        let key = c.source.key(&kid).await?;
        jwt::check_key_issuer(key.issuer.as_deref(), hints.iss, hints.tid, &kid)?;
        jwt::verify_signature(
            token,
            &key.key,
            &issuer.validation,
            &claims,
            &issuer.scope_hint,
        )?;
        jwt::check_iat(&claims, SystemTime::now(), issuer.settings.leeway)?;

        let tid = hints.tid.to_owned();
        let version = hints.version;
        let verified = jwt::authorize(
            claims,
            version,
            &tid,
            &kid,
            &jwt::AuthzPolicy {
                issuer_name: &issuer.name,
                required_scopes: &issuer.settings.required_scopes,
                required_app_roles: &issuer.settings.required_app_roles,
            },
        )?;
        if !remaining_life(&verified).is_zero() {
            inner.token_cache.insert(hash, Arc::new(verified.clone()));
        }
        Ok(verified)
    }

    /// The scope hint of the first issuer that trusts the token's (claimed) tenant, else of the
    /// first issuer.
    fn scope_hint_for(&self, claims: &serde_json::Map<String, serde_json::Value>) -> &str {
        let inner = &*self.inner;
        let by_tid = claims
            .get("tid")
            .and_then(serde_json::Value::as_str)
            .and_then(|t| inner.by_tenant.get(t))
            .and_then(|c| c.first())
            .map(|c| c.issuer);
        inner
            .issuers
            .get(by_tid.unwrap_or(0))
            .map(|i| i.scope_hint.as_str())
            .unwrap_or_default()
    }

    /// Refresh every (issuer, tenant, version) key set every `jwks_refresh` (± 10 % jitter)
    /// until `cancel` fires. Fetch failures keep the cached keys.
    pub async fn run_refresh(&self, cancel: CancellationToken) {
        use rand::Rng as _;
        let inner = &*self.inner;
        let interval_of = |src: &KeySource| {
            inner
                .issuers
                .iter()
                .find(|i| i.name == src.cfg.issuer_name)
                .map(|i| i.settings.jwks_refresh)
                .unwrap_or(MIN_REFRESH)
                .max(MIN_REFRESH)
        };
        let jittered = |d: Duration| d.mul_f64(rand::thread_rng().gen_range(0.9..1.1));
        let start = tokio::time::Instant::now();
        let mut due: Vec<tokio::time::Instant> = inner
            .sources
            .iter()
            .map(|s| start + jittered(interval_of(s)))
            .collect();
        loop {
            let Some(next) = due.iter().min().copied() else {
                cancel.cancelled().await;
                return;
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = tokio::time::Instant::now();
            let mut work = Vec::new();
            for (i, src) in inner.sources.iter().enumerate() {
                if due[i] <= now {
                    due[i] = now + jittered(interval_of(src));
                    work.push(src.refresh());
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = join_all(work) => {}
            }
        }
    }

    /// Fetch discovery and keys for every configured (issuer, tenant, version). Errors are
    /// returned (and logged) but are not fatal: the hot path retries a cold source.
    pub async fn prefetch(&self) -> Vec<TokenError> {
        join_all(self.inner.sources.iter().map(|s| s.refresh()))
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    /// Age of the oldest "last successful key fetch" over all sources (a source that never
    /// fetched counts from the validator's start). For a staleness metric.
    pub async fn oldest_key_fetch_age(&self) -> Duration {
        let mut oldest = Duration::ZERO;
        for s in &self.inner.sources {
            // A key set never fetched is as old as the validator: it grows while the IdP is
            // unreachable, so an alert on key age fires for it too.
            let age = s
                .since_last_success()
                .await
                .unwrap_or_else(|| self.inner.created.elapsed());
            oldest = oldest.max(age);
        }
        oldest
    }

    /// Counters.
    pub fn stats(&self) -> AuthStats {
        let c = &self.inner.counters;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        AuthStats {
            discovery_fetches: l(&c.discovery_fetches),
            discovery_fetch_failures: l(&c.discovery_fetch_failures),
            jwks_fetches: l(&c.jwks_fetches),
            jwks_fetch_failures: l(&c.jwks_fetch_failures),
            unknown_kid_refetches: l(&c.unknown_kid_refetches),
            negative_kid_hits: l(&c.negative_kid_hits),
            token_cache_hits: l(&c.token_cache_hits),
            token_cache_misses: l(&c.token_cache_misses),
            tokens_accepted: l(&c.tokens_accepted),
            tokens_refused: l(&c.tokens_refused),
            token_cache_entries: self.inner.token_cache.entry_count(),
        }
    }
}

#[cfg(test)]
mod tests;
