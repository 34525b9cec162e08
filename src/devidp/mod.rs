//! A local, Entra-shaped OpenID Connect issuer for development and tests.
//!
//! It serves v1 and v2 discovery documents and key sets exactly in Entra's shapes (v1 issuer
//! `https://sts.windows.net/{tid}/`, keys without `alg`, v2 keys with the `{tenantid}` issuer
//! template), a token endpoint for the password and client-credentials grants, and knobs for
//! tests: key rotation, keys left out of the published set, an outage switch, fetch counters and
//! raw signing of hand-crafted headers and payloads.
//!
//! Never use it in production: passwords and secrets are plain strings in memory.

mod keys;
mod server;
mod token;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::Algorithm;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenVersion;
use keys::{sign_bytes, DevKey};
pub use token::{guid_from, TokenSpec, DEFAULT_CLIENT_APP_ID, DEFAULT_SCOPE};

/// A user of the password grant.
#[derive(Clone, Debug)]
pub struct DevUser {
    /// User principal name (login name).
    pub upn: String,
    /// Password.
    pub password: String,
    /// Object id.
    pub oid: String,
    /// Group object ids.
    pub groups: Vec<String>,
}

/// A confidential client of the client-credentials grant.
#[derive(Clone, Debug)]
pub struct DevClient {
    /// Application (client) id.
    pub client_id: String,
    /// Client secret.
    pub secret: String,
    /// App roles granted to the client.
    pub roles: Vec<String>,
}

/// Settings of the dev IdP.
#[derive(Clone, Debug)]
pub struct DevIdpSettings {
    /// Tenant GUID served (canonical lowercase).
    pub tenant: String,
    /// App ID URI of the gateway API, the v1 audience (e.g. `api://idgate`).
    pub app_id_uri: String,
    /// Application GUID of the gateway API, the v2 audience.
    pub app_guid: String,
    /// Delegated scope name (e.g. `jdbc_login`).
    pub scope: String,
    /// Password-grant users.
    pub users: Vec<DevUser>,
    /// Client-credentials clients.
    pub clients: Vec<DevClient>,
    /// Lifetime of issued tokens.
    pub token_lifetime: Duration,
    /// Version of tokens from the token endpoint (overridable per request).
    pub default_version: TokenVersion,
    /// Base URL others reach this IdP at, when it differs from the listen address (e.g.
    /// `http://idp:8400` in docker-compose). `None`: `http://<listen address>`.
    pub public_url: Option<String>,
}

impl DevIdpSettings {
    /// Settings with one user (`alice@example.com` / `alice-password`) and one client
    /// (`11111111-2222-3333-4444-555555555555` / `client-secret`, role `Gateway.Connect`).
    pub fn example(tenant: &str) -> Self {
        DevIdpSettings {
            tenant: tenant.to_owned(),
            app_id_uri: "api://idgate".into(),
            app_guid: "6e8f2a1c-3b4d-4c5e-9f60-718293a4b5c6".into(),
            scope: DEFAULT_SCOPE.into(),
            users: vec![DevUser {
                upn: "alice@example.com".into(),
                password: "alice-password".into(),
                oid: guid_from("alice@example.com"),
                groups: vec![guid_from("group:analysts")],
            }],
            clients: vec![DevClient {
                client_id: "11111111-2222-3333-4444-555555555555".into(),
                secret: "client-secret".into(),
                roles: vec!["Gateway.Connect".into()],
            }],
            token_lifetime: Duration::from_secs(3600),
            default_version: TokenVersion::V2,
            public_url: None,
        }
    }
}

/// Errors of the dev IdP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevIdpError {
    /// Socket problem.
    #[error("dev IdP I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Key generation or encoding failed.
    #[error("dev IdP key: {0}")]
    Key(String),
    /// Signing failed.
    #[error("dev IdP signing: {0}")]
    Signing(String),
}

struct Inner {
    settings: DevIdpSettings,
    authority: String,
    /// All keys ever generated; the last one signs. All are published unless
    /// `published` restricts them.
    keys: Mutex<Vec<Arc<DevKey>>>,
    published: Mutex<Option<Vec<String>>>,
    v2_key_issuer: Mutex<Option<String>>,
    jwks_fetches: AtomicU64,
    discovery_fetches: AtomicU64,
    unavailable: AtomicBool,
}

/// A running dev IdP. Cheap to clone.
#[derive(Clone)]
pub struct DevIdp {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DevIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIdp")
            .field("authority", &self.inner.authority)
            .field("tenant", &self.inner.settings.tenant)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl DevIdp {
    /// Serve on an already-bound listener until `cancel` fires. Generates the first key.
    pub async fn start(
        listener: TcpListener,
        settings: DevIdpSettings,
        cancel: CancellationToken,
    ) -> Result<DevIdp, DevIdpError> {
        let addr = listener.local_addr()?;
        let key = tokio::task::spawn_blocking(DevKey::generate)
            .await
            .map_err(|e| DevIdpError::Key(e.to_string()))??;
        let idp = DevIdp {
            inner: Arc::new(Inner {
                authority: settings
                    .public_url
                    .as_deref()
                    .map(|u| u.trim_end_matches('/').to_owned())
                    .unwrap_or_else(|| format!("http://{addr}")),
                keys: Mutex::new(vec![Arc::new(key)]),
                published: Mutex::new(None),
                v2_key_issuer: Mutex::new(None),
                jwks_fetches: AtomicU64::new(0),
                discovery_fetches: AtomicU64::new(0),
                unavailable: AtomicBool::new(false),
                settings,
            }),
        };
        let app = server::router(idp.clone());
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "dev IdP server stopped");
            }
        });
        Ok(idp)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn authority(&self) -> String {
        self.inner.authority.clone()
    }

    /// The tenant served.
    pub fn tenant(&self) -> &str {
        &self.inner.settings.tenant
    }

    /// The settings.
    pub fn settings(&self) -> &DevIdpSettings {
        &self.inner.settings
    }

    /// The issuer string a token of `version` for `tenant` carries.
    pub fn issuer_for(&self, version: TokenVersion, tenant: &str) -> String {
        match version {
            TokenVersion::V1 => format!("https://sts.windows.net/{tenant}/"),
            TokenVersion::V2 => format!("{}/{tenant}/v2.0", self.inner.authority),
        }
    }

    /// The default audience of a token of `version`.
    pub fn audience_for(&self, version: TokenVersion) -> String {
        match version {
            TokenVersion::V1 => self.inner.settings.app_id_uri.clone(),
            TokenVersion::V2 => self.inner.settings.app_guid.clone(),
        }
    }

    /// A delegated spec for `upn` using the configured scope, default version and, for a
    /// configured user, its oid and groups.
    pub fn user_spec(&self, upn: &str) -> TokenSpec {
        let s = &self.inner.settings;
        let mut spec = TokenSpec::user(upn)
            .version(s.default_version)
            .scp(Some(&s.scope))
            .lifetime(s.token_lifetime);
        if let Some(u) = s.users.iter().find(|u| u.upn.eq_ignore_ascii_case(upn)) {
            spec.oid = u.oid.clone();
            spec.groups = u.groups.clone();
        }
        spec
    }

    fn current_key(&self) -> Option<Arc<DevKey>> {
        lock(&self.inner.keys).last().cloned()
    }

    /// kid of the current signing key.
    pub fn current_kid(&self) -> String {
        self.current_key()
            .map(|k| k.kid.clone())
            .unwrap_or_default()
    }

    /// The JOSE header a minted token gets: `typ`, `alg`, `kid` (+ `x5t` for v1), then
    /// `spec.extra_header`.
    pub fn header_for(&self, spec: &TokenSpec) -> Value {
        let kid = self.current_kid();
        let mut h = Map::new();
        h.insert("typ".into(), "JWT".into());
        h.insert("alg".into(), "RS256".into());
        if spec.version == TokenVersion::V1 {
            h.insert("x5t".into(), kid.clone().into());
        }
        h.insert("kid".into(), kid.into());
        for (k, v) in &spec.extra_header {
            h.insert(k.clone(), v.clone());
        }
        Value::Object(h)
    }

    /// The payload a minted token gets (Entra's v1 or v2 claim set for `spec`).
    pub fn payload_for(&self, spec: &TokenSpec) -> Value {
        let s = &self.inner.settings;
        let now = now_secs();
        let tid = spec.tenant.clone().unwrap_or_else(|| s.tenant.clone());
        let exp = match spec.expires_offset {
            Some(off) => now.saturating_add(off),
            None => now.saturating_add(i64::try_from(spec.lifetime.as_secs()).unwrap_or(i64::MAX)),
        };
        let aud = spec
            .audience
            .clone()
            .unwrap_or_else(|| self.audience_for(spec.version));
        let acr = if spec.scp.is_some() { "0" } else { "1" };
        let mut c = Map::new();
        c.insert("aud".into(), aud.into());
        c.insert("iss".into(), self.issuer_for(spec.version, &tid).into());
        c.insert(
            "iat".into(),
            now.saturating_add(spec.issued_at_offset).into(),
        );
        c.insert(
            "nbf".into(),
            now.saturating_add(spec.not_before_offset).into(),
        );
        c.insert("exp".into(), exp.into());
        c.insert("ver".into(), spec.version.as_claim().into());
        c.insert("tid".into(), tid.into());
        c.insert("oid".into(), spec.oid.clone().into());
        c.insert(
            "sub".into(),
            guid_from(&format!("sub:{}:{}", spec.oid, s.app_guid)).into(),
        );
        c.insert("uti".into(), token::random_uti().into());
        c.insert("rh".into(), "0.dev".into());
        match spec.version {
            TokenVersion::V1 => {
                c.insert("appid".into(), spec.client_app_id.clone().into());
                c.insert("appidacr".into(), acr.into());
                if !spec.upn.is_empty() {
                    c.insert("upn".into(), spec.upn.clone().into());
                    c.insert("unique_name".into(), spec.upn.clone().into());
                    c.insert("amr".into(), json!(["pwd"]));
                }
            }
            TokenVersion::V2 => {
                c.insert("azp".into(), spec.client_app_id.clone().into());
                c.insert("azpacr".into(), acr.into());
                if !spec.upn.is_empty() {
                    c.insert("preferred_username".into(), spec.upn.clone().into());
                }
            }
        }
        if !spec.upn.is_empty() {
            c.insert("name".into(), spec.upn.clone().into());
        }
        if !spec.groups.is_empty() {
            c.insert("groups".into(), json!(spec.groups));
        }
        if let Some(scp) = &spec.scp {
            c.insert("scp".into(), scp.clone().into());
        }
        if !spec.roles.is_empty() {
            c.insert("roles".into(), json!(spec.roles));
        }
        for (k, v) in &spec.extra_claims {
            c.insert(k.clone(), v.clone());
        }
        for k in &spec.remove_claims {
            c.remove(k);
        }
        Value::Object(c)
    }

    /// Mint a token for `spec`, signed RS256 with the current key. (Signing with a freshly
    /// generated RSA key cannot fail in practice; if it ever did, the returned string is not a
    /// valid token and the error is logged.)
    pub fn mint(&self, spec: &TokenSpec) -> String {
        self.sign_raw(&self.header_for(spec), &self.payload_for(spec))
    }

    /// RS256 with the current key over exactly the header and payload given.
    pub fn sign_raw(&self, header: &Value, payload: &Value) -> String {
        self.sign_raw_alg(header, payload, Algorithm::RS256)
    }

    /// Like [`Self::sign_raw`] with any algorithm: RSA/PSS algorithms use the current key, HMAC
    /// algorithms use the current public key PEM as the secret (the key-confusion attack).
    /// The header is not changed (set its `alg` yourself).
    pub fn sign_raw_alg(&self, header: &Value, payload: &Value, alg: Algorithm) -> String {
        self.sign_raw_bytes(
            header.to_string().as_bytes(),
            payload.to_string().as_bytes(),
            alg,
        )
    }

    /// Sign raw JSON bytes (for payloads serde_json cannot represent, e.g. duplicate keys).
    pub fn sign_raw_bytes(&self, header: &[u8], payload: &[u8], alg: Algorithm) -> String {
        let Some(key) = self.current_key() else {
            return "no.signing.key".into();
        };
        sign_bytes(header, payload, &key, alg, key.public_pem.as_bytes()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "dev IdP could not sign");
            "signing.failed.token".into()
        })
    }

    /// A token for `spec` signed by a new key that is NOT published, with a fresh kid.
    pub fn sign_with_new_key(&self, spec: &TokenSpec) -> String {
        let key = match DevKey::generate() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "dev IdP could not generate a key");
                return "keygen.failed.token".into();
            }
        };
        let mut header = self.header_for(spec);
        if let Some(h) = header.as_object_mut() {
            h.insert("kid".into(), key.kid.clone().into());
            if h.contains_key("x5t") {
                h.insert("x5t".into(), key.kid.clone().into());
            }
        }
        let payload = self.payload_for(spec);
        sign_bytes(
            header.to_string().as_bytes(),
            payload.to_string().as_bytes(),
            &key,
            Algorithm::RS256,
            b"",
        )
        .unwrap_or_else(|_| "signing.failed.token".into())
    }

    /// PEM (SPKI) of the current public key.
    pub fn public_key_pem(&self) -> String {
        self.current_key()
            .map(|k| k.public_pem.clone())
            .unwrap_or_default()
    }

    /// New signing key and kid; earlier keys stay published. Returns the new kid. Generates
    /// an RSA key inline (CPU-bound, well under a second with optimized dependencies).
    pub fn rotate(&self) -> String {
        match DevKey::generate() {
            Ok(k) => self.install_key(k),
            Err(e) => {
                tracing::error!(error = %e, "dev IdP could not generate a key");
                self.current_kid()
            }
        }
    }

    /// [`Self::rotate`] off the async worker threads.
    pub async fn rotate_async(&self) -> Result<String, DevIdpError> {
        let key = tokio::task::spawn_blocking(DevKey::generate)
            .await
            .map_err(|e| DevIdpError::Key(e.to_string()))??;
        Ok(self.install_key(key))
    }

    fn install_key(&self, key: DevKey) -> String {
        let kid = key.kid.clone();
        lock(&self.inner.keys).push(Arc::new(key));
        kid
    }

    /// kids of all keys generated so far (oldest first; the last one signs).
    pub fn kids(&self) -> Vec<String> {
        lock(&self.inner.keys)
            .iter()
            .map(|k| k.kid.clone())
            .collect()
    }

    /// Publish only these kids in the key sets (`None` = all keys).
    pub fn set_published_kids(&self, kids: Option<Vec<String>>) {
        *lock(&self.inner.published) = kids;
    }

    /// Override the `issuer` property of every v2 key (`None` = the `{tenantid}` template).
    pub fn set_v2_key_issuer(&self, issuer: Option<String>) {
        *lock(&self.inner.v2_key_issuer) = issuer;
    }

    /// Key-set requests received (both versions, including ones answered 503).
    pub fn jwks_fetch_count(&self) -> u64 {
        self.inner.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Discovery requests received (both versions, including ones answered 503).
    pub fn discovery_fetch_count(&self) -> u64 {
        self.inner.discovery_fetches.load(Ordering::SeqCst)
    }

    /// While `down`, discovery and key sets answer 503.
    pub fn set_unavailable(&self, down: bool) {
        self.inner.unavailable.store(down, Ordering::SeqCst);
    }

    fn is_unavailable(&self) -> bool {
        self.inner.unavailable.load(Ordering::SeqCst)
    }

    fn discovery_doc(&self, version: TokenVersion) -> Value {
        let a = &self.inner.authority;
        let t = &self.inner.settings.tenant;
        match version {
            TokenVersion::V1 => json!({
                "issuer": format!("https://sts.windows.net/{t}/"),
                "jwks_uri": format!("{a}/{t}/discovery/keys"),
                "token_endpoint": format!("{a}/{t}/oauth2/token"),
                "authorization_endpoint": format!("{a}/{t}/oauth2/authorize"),
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
                "subject_types_supported": ["pairwise"],
                "tenant_region_scope": "EU",
            }),
            TokenVersion::V2 => json!({
                "issuer": format!("{a}/{t}/v2.0"),
                "jwks_uri": format!("{a}/{t}/discovery/v2.0/keys"),
                "token_endpoint": format!("{a}/{t}/oauth2/v2.0/token"),
                "authorization_endpoint": format!("{a}/{t}/oauth2/v2.0/authorize"),
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "EU",
            }),
        }
    }

    fn jwks_doc(&self, version: TokenVersion) -> Value {
        let published = lock(&self.inner.published).clone();
        let issuer = match version {
            TokenVersion::V1 => None,
            TokenVersion::V2 => Some(
                lock(&self.inner.v2_key_issuer)
                    .clone()
                    .unwrap_or_else(|| format!("{}/{{tenantid}}/v2.0", self.inner.authority)),
            ),
        };
        let keys: Vec<Value> = lock(&self.inner.keys)
            .iter()
            .filter(|k| published.as_ref().is_none_or(|p| p.contains(&k.kid)))
            .map(|k| k.jwk(issuer.as_deref()))
            .collect();
        json!({ "keys": keys })
    }
}
