//! Signing keys: OIDC discovery and JWKS fetching over HTTP, and the per-(issuer, tenant,
//! version) key cache with single-flight, rate-floored refetches (entra-tokens.md §4, §5).
//!
//! Discovery is a two-field serde struct on purpose: `openidconnect`'s discovery refuses
//! documents whose `issuer` differs from the URL it fetched, which is always the case for Entra
//! v1 metadata (`https://sts.windows.net/{tid}/` served from `login.microsoftonline.com`) and for
//! the `{tenantid}` templates (openidconnect-rs #216), so it cannot be used here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use reqwest::Url;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::TokenError;
use super::jwt::is_valid_kid;
use super::TokenVersion;

/// Largest discovery or JWKS body we read.
pub(crate) const MAX_BODY_LEN: usize = 256 * 1024;

/// Most keys kept per (issuer, tenant, version).
const MAX_KEYS_PER_SOURCE: u64 = 1000;

/// Most unknown kids remembered per (issuer, tenant, version).
const MAX_NEGATIVE_KIDS: u64 = 10_000;

/// Retry interval while a source has never fetched successfully (cold cache, IdP down): each
/// login must not cost an HTTP round trip to an unreachable IdP, but recovery must be quick.
const COLD_RETRY_FLOOR: Duration = Duration::from_secs(5);

/// Counters shared by all sources of one authenticator.
#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub(crate) discovery_fetches: AtomicU64,
    pub(crate) discovery_fetch_failures: AtomicU64,
    pub(crate) jwks_fetches: AtomicU64,
    pub(crate) jwks_fetch_failures: AtomicU64,
    pub(crate) unknown_kid_refetches: AtomicU64,
    pub(crate) negative_kid_hits: AtomicU64,
    pub(crate) token_cache_hits: AtomicU64,
    pub(crate) token_cache_misses: AtomicU64,
    pub(crate) tokens_accepted: AtomicU64,
    pub(crate) tokens_refused: AtomicU64,
}

/// The two fields of an OIDC discovery document we use.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Discovery {
    /// Issuer, possibly with the literal `{tenantid}` template.
    pub(crate) issuer: String,
    /// Where the key set lives.
    pub(crate) jwks_uri: String,
}

/// One verification key and the issuer it is scoped to (v2 key documents only).
pub(crate) struct CachedKey {
    pub(crate) key: DecodingKey,
    pub(crate) issuer: Option<Box<str>>,
}

/// True for hosts we allow plain HTTP to: 127.0.0.0/8, ::1 and `localhost`.
pub(crate) fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// HTTPS, or HTTP to a loopback host (the dev IdP), or any HTTP when the issuer explicitly
/// allows it (`allow_http`, development setups such as docker-compose only).
pub(crate) fn is_allowed_scheme(url: &Url, allow_http: bool) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => allow_http || is_loopback(url),
        _ => false,
    }
}

/// HTTP client for discovery and key documents: timeouts, no redirects, body cap.
#[derive(Clone)]
pub(crate) struct Fetcher {
    client: reqwest::Client,
    counters: Arc<Counters>,
    allow_http: bool,
}

impl Fetcher {
    pub(crate) fn new(
        timeout: Duration,
        loopback_only: bool,
        allow_http: bool,
        counters: Arc<Counters>,
    ) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("idgate/", env!("CARGO_PKG_VERSION")));
        if loopback_only {
            // A proxy from the environment must not see dev-IdP traffic to 127.0.0.1.
            b = b.no_proxy();
        }
        let client = b.build().map_err(|e| e.to_string())?;
        Ok(Fetcher {
            client,
            counters,
            allow_http,
        })
    }

    async fn get_json<T: DeserializeOwned>(&self, url: &Url) -> Result<T, String> {
        if !is_allowed_scheme(url, self.allow_http) {
            return Err(format!("refusing non-https URL {url}"));
        }
        let mut resp = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_BODY_LEN as u64)
        {
            return Err(format!("GET {url}: body larger than {MAX_BODY_LEN} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_BODY_LEN {
                return Err(format!("GET {url}: body larger than {MAX_BODY_LEN} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: bad JSON: {e}"))
    }

    async fn discovery(&self, url: &Url) -> Result<Discovery, String> {
        self.counters
            .discovery_fetches
            .fetch_add(1, Ordering::Relaxed);
        let r = self.get_json::<Discovery>(url).await;
        if r.is_err() {
            self.counters
                .discovery_fetch_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn jwks(&self, url: &Url) -> Result<Vec<(Box<str>, CachedKey)>, String> {
        self.counters.jwks_fetches.fetch_add(1, Ordering::Relaxed);
        let r = self.get_json::<JwksDoc>(url).await.and_then(|doc| {
            let keys = parse_keys(doc.keys);
            if keys.is_empty() {
                Err(format!("GET {url}: no usable RSA signing key"))
            } else {
                Ok(keys)
            }
        });
        if r.is_err() {
            self.counters
                .jwks_fetch_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[derive(Deserialize)]
struct JwksDoc {
    keys: Vec<Value>,
}

/// Convert each JWK on its own and skip what we cannot use: one odd key must never fail the
/// whole set (jsonwebtoken #252, #529). Entra keys carry no `alg`; the algorithm comes from our
/// allow-list (RS256), never from the key.
pub(crate) fn parse_keys(keys: Vec<Value>) -> Vec<(Box<str>, CachedKey)> {
    keys.into_iter().filter_map(|k| parse_key(&k)).collect()
}

fn parse_key(k: &Value) -> Option<(Box<str>, CachedKey)> {
    let o = k.as_object()?;
    if o.get("kty")?.as_str()? != "RSA" {
        return None;
    }
    match o.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(_) => return None,
    }
    let kid = o.get("kid")?.as_str()?;
    if !is_valid_kid(kid) {
        return None;
    }
    let n = o.get("n")?.as_str()?;
    let e = o.get("e")?.as_str()?;
    // Refuse moduli the rsa crate would refuse at verification time, so a broken key is skipped
    // here instead of turning every token it signed into `bad_signature`.
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (nb, eb) = (engine.decode(n).ok()?, engine.decode(e).ok()?);
    rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&nb),
        rsa::BigUint::from_bytes_be(&eb),
    )
    .ok()?;
    let key = DecodingKey::from_rsa_raw_components(&nb, &eb);
    let issuer = o
        .get("issuer")
        .and_then(Value::as_str)
        .map(|s| s.to_owned().into_boxed_str());
    Some((kid.into(), CachedKey { key, issuer }))
}

/// Mutable fetch bookkeeping; only touched with the source's fetch lock held.
#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    last_forced: Option<Instant>,
    last_success: Option<Instant>,
    jwks_ok_once: bool,
    last_error: Option<Box<str>>,
}

/// Static settings of one key source.
pub(crate) struct SourceSettings {
    pub(crate) issuer_name: Arc<str>,
    pub(crate) tenant: Box<str>,
    pub(crate) version: TokenVersion,
    pub(crate) discovery_url: Url,
    pub(crate) refetch_floor: Duration,
    pub(crate) max_stale: Duration,
}

/// Keys of one (issuer, tenant, version): the cache, the negative cache, the last discovery
/// document, and a lock that makes every fetch single-flight.
pub(crate) struct KeySource {
    pub(crate) cfg: SourceSettings,
    fetcher: Fetcher,
    counters: Arc<Counters>,
    /// kid → key. TTL = max_stale: a successful fetch re-inserts (resets the TTL of) every key it
    /// returns and deletes nothing, so a key absent from one response lives on until it has
    /// been missing for max_stale (Entra's common endpoint returns varying sets, §4).
    keys: moka::sync::Cache<Box<str>, Arc<CachedKey>>,
    /// kids that were still unknown after a fetch; answered without touching the lock.
    negative: moka::sync::Cache<Box<str>, ()>,
    discovery: RwLock<Option<Arc<Discovery>>>,
    /// Bumped after every fetch attempt, so waiters on the lock can tell that someone else
    /// fetched while they waited and must not fetch again.
    generation: AtomicU64,
    fetch: tokio::sync::Mutex<FetchState>,
}

impl KeySource {
    pub(crate) fn new(cfg: SourceSettings, fetcher: Fetcher, counters: Arc<Counters>) -> Self {
        let keys = moka::sync::Cache::builder()
            .max_capacity(MAX_KEYS_PER_SOURCE)
            .time_to_live(cfg.max_stale)
            .build();
        let negative = moka::sync::Cache::builder()
            .max_capacity(MAX_NEGATIVE_KIDS)
            .time_to_live(cfg.refetch_floor.max(Duration::from_millis(1)))
            .build();
        KeySource {
            cfg,
            fetcher,
            counters,
            keys,
            negative,
            discovery: RwLock::new(None),
            generation: AtomicU64::new(0),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
        }
    }

    fn cached_discovery(&self) -> Option<Arc<Discovery>> {
        match self.discovery.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn store_discovery(&self, d: Discovery) -> Arc<Discovery> {
        let d = Arc::new(d);
        match self.discovery.write() {
            Ok(mut g) => *g = Some(Arc::clone(&d)),
            Err(poisoned) => *poisoned.into_inner() = Some(Arc::clone(&d)),
        }
        d
    }

    fn unavailable(&self, detail: Option<&str>) -> TokenError {
        TokenError::JwksUnavailable {
            issuer: self.cfg.issuer_name.as_ref().into(),
            tenant: self.cfg.tenant.clone(),
            detail: detail.unwrap_or("no successful fetch yet").into(),
        }
    }

    fn cold_floor(&self) -> Duration {
        self.cfg.refetch_floor.min(COLD_RETRY_FLOOR)
    }

    /// The issuer (template) from discovery; fetches discovery + JWKS if the source is cold.
    pub(crate) async fn issuer_template(&self) -> Result<Arc<Discovery>, TokenError> {
        if let Some(d) = self.cached_discovery() {
            return Ok(d);
        }
        let gen = self.generation.load(Ordering::Acquire);
        let mut st = self.fetch.lock().await;
        if let Some(d) = self.cached_discovery() {
            return Ok(d);
        }
        let someone_tried = self.generation.load(Ordering::Acquire) != gen;
        let may_retry = st
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.cold_floor());
        if !someone_tried && may_retry {
            self.fetch_locked(&mut st, true).await;
        }
        self.cached_discovery()
            .ok_or_else(|| self.unavailable(st.last_error.as_deref()))
    }

    /// The key for `kid`. Unknown kid → at most one JWKS refetch per `refetch_floor`, shared by
    /// all concurrent callers; still unknown → `unknown_kid` (remembered in the negative cache).
    pub(crate) async fn key(&self, kid: &str) -> Result<Arc<CachedKey>, TokenError> {
        if let Some(k) = self.keys.get(kid) {
            return Ok(k);
        }
        if self.negative.contains_key(kid) {
            self.counters
                .negative_kid_hits
                .fetch_add(1, Ordering::Relaxed);
            return Err(TokenError::UnknownKid { kid: kid.into() });
        }
        let gen = self.generation.load(Ordering::Acquire);
        let mut st = self.fetch.lock().await;
        if let Some(k) = self.keys.get(kid) {
            return Ok(k);
        }
        if self.generation.load(Ordering::Acquire) != gen {
            // Someone fetched while we waited for the lock. If that fetch failed, the kid may
            // be a key we simply could not see: the IdP's fault, not remembered as unknown.
            if let Some(e) = &st.last_error {
                return Err(self.unavailable(Some(e)));
            }
        } else {
            let now = Instant::now();
            let allowed = if st.jwks_ok_once {
                st.last_forced
                    .is_none_or(|t| now.duration_since(t) >= self.cfg.refetch_floor)
            } else {
                st.last_attempt
                    .is_none_or(|t| now.duration_since(t) >= self.cold_floor())
            };
            if allowed {
                if st.jwks_ok_once {
                    st.last_forced = Some(now);
                    self.counters
                        .unknown_kid_refetches
                        .fetch_add(1, Ordering::Relaxed);
                }
                let need_discovery = self.cached_discovery().is_none();
                self.fetch_locked(&mut st, need_discovery).await;
                if let Some(k) = self.keys.get(kid) {
                    return Ok(k);
                }
                // The IdP could not be asked: the kid may well be a freshly rotated key, so
                // this is the IdP's fault, and the kid is not remembered as unknown.
                if let Some(e) = &st.last_error {
                    return Err(self.unavailable(Some(e)));
                }
            }
        }
        if !st.jwks_ok_once {
            return Err(self.unavailable(st.last_error.as_deref()));
        }
        self.negative.insert(kid.into(), ());
        Err(TokenError::UnknownKid { kid: kid.into() })
    }

    /// Background refresh / prefetch: discovery + JWKS, single-flight with the hot path.
    pub(crate) async fn refresh(&self) -> Result<(), TokenError> {
        let mut st = self.fetch.lock().await;
        self.fetch_locked(&mut st, true).await;
        match &st.last_error {
            None => Ok(()),
            Some(e) => Err(self.unavailable(Some(e))),
        }
    }

    /// Time since the last successful JWKS fetch (for staleness metrics).
    pub(crate) async fn since_last_success(&self) -> Option<Duration> {
        self.fetch.lock().await.last_success.map(|t| t.elapsed())
    }

    /// Fetch discovery (if asked or unknown) and then the key set; upsert every key. Failures
    /// keep whatever is cached (last known good). Call with the fetch lock held.
    async fn fetch_locked(&self, st: &mut FetchState, with_discovery: bool) {
        st.last_attempt = Some(Instant::now());
        let result = self.fetch_inner(with_discovery).await;
        match result {
            Ok(()) => {
                st.jwks_ok_once = true;
                st.last_success = Some(Instant::now());
                st.last_error = None;
            }
            Err(e) => {
                tracing::warn!(
                    issuer = %self.cfg.issuer_name,
                    tenant = %self.cfg.tenant,
                    version = ?self.cfg.version,
                    error = %e,
                    "signing key fetch failed; keeping the cached keys"
                );
                st.last_error = Some(e.into_boxed_str());
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    async fn fetch_inner(&self, with_discovery: bool) -> Result<(), String> {
        let cached = self.cached_discovery();
        let discovery = match (with_discovery, cached) {
            (false, Some(d)) => d,
            (_, cached) => match self.fetcher.discovery(&self.cfg.discovery_url).await {
                Ok(d) => {
                    let d = self.validate_discovery(d)?;
                    self.store_discovery(d)
                }
                // Keep using the last good document's jwks_uri when discovery alone fails.
                Err(e) => match cached {
                    Some(d) => {
                        tracing::warn!(issuer = %self.cfg.issuer_name, tenant = %self.cfg.tenant,
                            error = %e, "discovery failed; using the cached jwks_uri");
                        d
                    }
                    None => return Err(e),
                },
            },
        };
        let jwks_url = Url::parse(&discovery.jwks_uri)
            .map_err(|e| format!("discovery jwks_uri is not a URL: {e}"))?;
        let keys = self.fetcher.jwks(&jwks_url).await?;
        for (kid, key) in keys {
            self.negative.invalidate(&kid);
            self.keys.insert(kid, Arc::new(key));
        }
        Ok(())
    }

    /// The jwks_uri must be on the same origin as the discovery document (a fixed host
    /// allow-list), and the issuer must name this tenant or carry the template.
    fn validate_discovery(&self, d: Discovery) -> Result<Discovery, String> {
        let jwks =
            Url::parse(&d.jwks_uri).map_err(|e| format!("discovery jwks_uri is not a URL: {e}"))?;
        if jwks.origin() != self.cfg.discovery_url.origin()
            || !is_allowed_scheme(&jwks, self.fetcher.allow_http)
        {
            return Err(format!(
                "discovery jwks_uri {jwks} is not on the authority's origin"
            ));
        }
        if !d.issuer.contains(self.cfg.tenant.as_ref()) && !d.issuer.contains("{tenantid}") {
            return Err(format!(
                "discovery issuer {:?} names neither tenant {} nor {{tenantid}}",
                d.issuer, self.cfg.tenant
            ));
        }
        Ok(d)
    }
}
