//! What a dev-IdP token should contain: [`TokenSpec`] and its builder methods.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::auth::TokenVersion;

/// Default delegated scope name (the dev IdP's default `scope` setting).
pub const DEFAULT_SCOPE: &str = "jdbc_login";

/// Default client application id used as `azp`/`appid` of user tokens.
pub const DEFAULT_CLIENT_APP_ID: &str = "04b07795-8ddb-461a-bbee-02f9e1bf7b46";

/// Description of one token to mint. Start from [`TokenSpec::user`] or [`TokenSpec::app`],
/// then adjust with the builder methods or the public fields.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    /// Token version (`ver`, issuer form, audience form, claim names).
    pub version: TokenVersion,
    /// User principal name; empty for app-only tokens (then no name claims are written).
    pub upn: String,
    /// Object id (`oid`).
    pub oid: String,
    /// `groups` claim (omitted when empty).
    pub groups: Vec<String>,
    /// `scp` claim (omitted when `None`).
    pub scp: Option<String>,
    /// `roles` claim (omitted when empty).
    pub roles: Vec<String>,
    /// `exp - now` (ignored when [`Self::expires_offset`] is set).
    pub lifetime: Duration,
    /// `exp = now + expires_offset` seconds when set (may be negative: expired tokens).
    pub expires_offset: Option<i64>,
    /// `nbf = now + not_before_offset` seconds.
    pub not_before_offset: i64,
    /// `iat = now + issued_at_offset` seconds.
    pub issued_at_offset: i64,
    /// `aud` override (default: App ID URI for v1, app GUID for v2).
    pub audience: Option<String>,
    /// `azp` (v2) / `appid` (v1).
    pub client_app_id: String,
    /// Tenant override for both `tid` and the tenant inside `iss`.
    pub tenant: Option<String>,
    /// Claims added last (they replace generated ones).
    pub extra_claims: Map<String, Value>,
    /// Claims removed at the very end.
    pub remove_claims: Vec<String>,
    /// Header members added (they replace generated ones).
    pub extra_header: Map<String, Value>,
}

impl TokenSpec {
    /// A delegated (user) v2 token with scope [`DEFAULT_SCOPE`], lifetime 1 h.
    pub fn user(upn: &str) -> Self {
        TokenSpec {
            version: TokenVersion::V2,
            upn: upn.to_owned(),
            oid: guid_from(upn),
            groups: Vec::new(),
            scp: Some(DEFAULT_SCOPE.to_owned()),
            roles: Vec::new(),
            lifetime: Duration::from_secs(3600),
            expires_offset: None,
            not_before_offset: 0,
            issued_at_offset: 0,
            audience: None,
            client_app_id: DEFAULT_CLIENT_APP_ID.to_owned(),
            tenant: None,
            extra_claims: Map::new(),
            remove_claims: Vec::new(),
            extra_header: Map::new(),
        }
    }

    /// An app-only (client-credentials) v2 token: no `scp`, the given `roles`, `idtyp: app`.
    pub fn app(client_id: &str, roles: &[&str]) -> Self {
        let mut s = TokenSpec::user("");
        s.oid = guid_from(&format!("sp:{client_id}"));
        s.scp = None;
        s.roles = roles.iter().map(|r| (*r).to_owned()).collect();
        s.client_app_id = client_id.to_owned();
        s.extra_claims.insert("idtyp".into(), "app".into());
        s
    }

    /// Set the version.
    pub fn version(mut self, v: TokenVersion) -> Self {
        self.version = v;
        self
    }

    /// v1 token.
    pub fn v1(self) -> Self {
        self.version(TokenVersion::V1)
    }

    /// v2 token.
    pub fn v2(self) -> Self {
        self.version(TokenVersion::V2)
    }

    /// Set `oid`.
    pub fn oid(mut self, oid: &str) -> Self {
        self.oid = oid.to_owned();
        self
    }

    /// Set `groups`.
    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.groups = groups.iter().map(|g| (*g).to_owned()).collect();
        self
    }

    /// Set `scp` (`None` removes it).
    pub fn scp(mut self, scp: Option<&str>) -> Self {
        self.scp = scp.map(str::to_owned);
        self
    }

    /// Set `roles`.
    pub fn roles(mut self, roles: &[&str]) -> Self {
        self.roles = roles.iter().map(|r| (*r).to_owned()).collect();
        self
    }

    /// Set the lifetime.
    pub fn lifetime(mut self, d: Duration) -> Self {
        self.lifetime = d;
        self.expires_offset = None;
        self
    }

    /// `exp = now + secs` (negative for an expired token).
    pub fn expires_in(mut self, secs: i64) -> Self {
        self.expires_offset = Some(secs);
        self
    }

    /// `nbf = now + secs`.
    pub fn not_before(mut self, secs: i64) -> Self {
        self.not_before_offset = secs;
        self
    }

    /// `iat = now + secs`.
    pub fn issued_at(mut self, secs: i64) -> Self {
        self.issued_at_offset = secs;
        self
    }

    /// Override `aud`.
    pub fn audience(mut self, aud: &str) -> Self {
        self.audience = Some(aud.to_owned());
        self
    }

    /// Override `tid` and the tenant inside `iss`.
    pub fn tenant(mut self, tid: &str) -> Self {
        self.tenant = Some(tid.to_owned());
        self
    }

    /// Set `azp`/`appid`.
    pub fn client_app_id(mut self, id: &str) -> Self {
        self.client_app_id = id.to_owned();
        self
    }

    /// Add or replace a claim.
    pub fn claim(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extra_claims.insert(name.to_owned(), value.into());
        self
    }

    /// Remove a claim from the final payload.
    pub fn without(mut self, name: &str) -> Self {
        self.remove_claims.push(name.to_owned());
        self
    }

    /// Add or replace a header member.
    pub fn header(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extra_header.insert(name.to_owned(), value.into());
        self
    }
}

/// A stable GUID-shaped string derived from `seed` (dev data only).
pub fn guid_from(seed: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(seed.as_bytes());
    let x = hex::encode(&h[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// A random 22-character base64url id, shaped like Entra's `uti`.
pub(crate) fn random_uti() -> String {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}
