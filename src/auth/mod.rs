//! TEMPORARY interface stub; replaced by the real validator.
#![allow(missing_docs, dead_code)]
use std::{borrow::Cow, sync::Arc, time::{Duration, SystemTime}};

#[derive(Clone, Debug)]
pub struct IssuerSettings {
    pub name: String,
    pub authority: String,
    pub tenants: Vec<String>,
    pub accept_versions: Vec<TokenVersion>,
    pub audiences: Vec<String>,
    pub required_scopes: Vec<String>,
    pub required_app_roles: Vec<String>,
    pub leeway: Duration,
    pub jwks_refetch_floor: Duration,
    pub jwks_refresh: Duration,
    pub jwks_max_stale: Duration,
    pub http_timeout: Duration,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenVersion { V1, V2 }
#[derive(Clone)]
pub struct Authenticator { issuers: Arc<Vec<IssuerSettings>> }
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError { #[error("bad")] Bad }
#[derive(Debug, thiserror::Error)]
pub enum TokenError { #[error("malformed")] Malformed }
impl TokenError {
    pub fn reason(&self) -> &'static str { "malformed_token" }
    pub fn client_message(&self) -> Cow<'static, str> { "authentication failed".into() }
    pub fn sqlstate(&self) -> &'static str { "28000" }
    pub fn is_identity_provider_fault(&self) -> bool { false }
}
pub struct VerifiedClaims { tid: String }
impl VerifiedClaims {
    pub fn issuer_name(&self) -> &str { "" }
    pub fn version(&self) -> TokenVersion { TokenVersion::V2 }
    pub fn tenant_id(&self) -> &str { &self.tid }
    pub fn object_id(&self) -> Option<&str> { None }
    pub fn subject(&self) -> Option<&str> { None }
    pub fn token_id(&self) -> Option<&str> { None }
    pub fn expires_at(&self) -> SystemTime { SystemTime::now() }
    pub fn claim_str(&self, _name: &str) -> Option<&str> { None }
    pub fn groups(&self) -> &[String] { &[] }
    pub fn groups_overage(&self) -> bool { false }
    pub fn app_roles(&self) -> &[String] { &[] }
    pub fn scopes(&self) -> &[String] { &[] }
    pub fn client_app_id(&self) -> Option<&str> { None }
    pub fn is_app_only(&self) -> bool { false }
}
impl Authenticator {
    pub fn new(issuers: Vec<IssuerSettings>) -> Result<Self, AuthSetupError> { Ok(Self { issuers: Arc::new(issuers) }) }
    pub async fn verify(&self, _token: &str) -> Result<Arc<VerifiedClaims>, TokenError> { Err(TokenError::Malformed) }
    pub async fn run_refresh(&self, cancel: tokio_util::sync::CancellationToken) { cancel.cancelled().await }
    pub async fn prefetch(&self) -> Vec<TokenError> { Vec::new() }
}
