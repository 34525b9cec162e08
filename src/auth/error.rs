//! Error types of the token validator: one `TokenError` variant per refusal reason, and the
//! `AuthSetupError` returned when the issuer configuration cannot be used.
//!
//! Nothing in here ever holds the token or any part of its signature. Strings that come from the
//! (untrusted) token, such as an `alg` value or a claim name, are shortened and stripped of
//! control characters by [`sanitize`] before they are stored.

use std::borrow::Cow;
use std::time::SystemTime;

/// Why a token was refused.
///
/// `Display` is the detailed reason for the audit log; what the client sees comes from
/// [`TokenError::client_message`], which is deliberately vague for most variants so token
/// probers get no oracle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is longer than [`super::MAX_TOKEN_LEN`].
    #[error("token is {len} bytes, more than the {max} byte limit")]
    TooLarge {
        /// Length of the token in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Five dot-separated segments: an encrypted token (JWE), which we never accept.
    #[error("token is a JWE (5 segments)")]
    Jwe,
    /// Not a compact JWS: wrong charset, wrong segment count, bad base64 or bad JSON.
    #[error("malformed token: {what}")]
    Malformed {
        /// Which structural check failed.
        what: &'static str,
    },
    /// The header `alg` is not RS256.
    #[error("algorithm {alg:?} is not allowed (only RS256)")]
    AlgNotAllowed {
        /// The (sanitized) algorithm the token asked for.
        alg: Box<str>,
    },
    /// The header `typ` is present and not `JWT`.
    #[error("header typ {typ:?} is not allowed")]
    TypNotAllowed {
        /// The (sanitized) `typ` value.
        typ: Box<str>,
    },
    /// The header has no `kid`.
    #[error("header has no kid")]
    KidMissing,
    /// The header `kid` is not 1..=128 base64url characters.
    #[error("header kid is malformed")]
    KidMalformed,
    /// The header carries a member that names or embeds key material, or `crit`.
    #[error("header member {name} is not allowed")]
    ForbiddenHeader {
        /// The header member.
        name: &'static str,
    },
    /// The header has a `nonce`: a Microsoft first-party token (e.g. Graph).
    #[error("header carries a nonce (Microsoft first-party token)")]
    HeaderNonce,
    /// The header JSON has the same member twice.
    #[error("header member {name:?} appears more than once")]
    DuplicateHeader {
        /// The (sanitized) member name.
        name: Box<str>,
    },
    /// The payload JSON has the same top-level claim twice.
    #[error("claim {name:?} appears more than once")]
    DuplicateClaim {
        /// The (sanitized) claim name.
        name: Box<str>,
    },
    /// The payload carries an ID-token-only claim.
    #[error("token is an ID token (has {marker})")]
    IdToken {
        /// The marker claim found (`nonce`, `at_hash` or `c_hash`).
        marker: &'static str,
    },
    /// The audience is a Microsoft first-party resource (Graph, Azure Database, ARM, ...).
    #[error("audience {aud:?} is a Microsoft first-party resource")]
    FirstPartyResource {
        /// The (sanitized) audience.
        aud: Box<str>,
        /// The scope the client should ask for instead.
        scope_hint: Box<str>,
    },
    /// The audience is not one of the configured audiences.
    #[error("audience {aud:?} is not accepted")]
    AudienceMismatch {
        /// The (sanitized) audience, or the JSON shape when it is not a string.
        aud: Box<str>,
        /// The scope the client should ask for instead.
        scope_hint: Box<str>,
    },
    /// A required claim is missing.
    #[error("required claim {claim} is missing")]
    MissingClaim {
        /// The claim.
        claim: &'static str,
    },
    /// A claim has the wrong JSON type or an impossible value.
    #[error("claim {claim} has an invalid value")]
    InvalidClaim {
        /// The claim.
        claim: &'static str,
    },
    /// `iss` is not the exact issuer string for this tenant and version.
    #[error("issuer {iss:?} is not the expected issuer")]
    IssuerMismatch {
        /// The (sanitized) issuer claim.
        iss: Box<str>,
    },
    /// The token version (`ver`) is not accepted by any issuer that trusts this tenant.
    #[error("token version {ver:?} is not accepted")]
    VersionNotAccepted {
        /// The (sanitized) `ver` claim.
        ver: Box<str>,
    },
    /// `tid` is not a canonical lowercase GUID.
    #[error("tid is not a canonical lowercase GUID")]
    TenantMalformed,
    /// `tid` is not on any issuer's allow-list.
    #[error("tenant {tid} is not allowed")]
    TenantNotAllowed {
        /// The tenant GUID (already checked to be a canonical GUID).
        tid: Box<str>,
    },
    /// The tenant inside `iss` differs from the `tid` claim.
    #[error("tenant in iss differs from the tid claim")]
    TidIssMismatch,
    /// The `kid` is not in the key set, even after a refetch.
    #[error("signing key {kid} is unknown")]
    UnknownKid {
        /// The kid (already checked to be short base64url).
        kid: Box<str>,
    },
    /// The signing key's own `issuer` property does not allow this token's issuer.
    #[error("signing key {kid} may not sign for this issuer")]
    KeyIssuerMismatch {
        /// The kid.
        kid: Box<str>,
    },
    /// No keys could be obtained from the identity provider.
    #[error("keys of issuer {issuer} (tenant {tenant}) are unavailable: {detail}")]
    JwksUnavailable {
        /// The configured issuer name.
        issuer: Box<str>,
        /// The tenant.
        tenant: Box<str>,
        /// What went wrong with the fetch.
        detail: Box<str>,
    },
    /// The signature does not verify with the key named by `kid`.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired at {}", humantime::format_rfc3339_seconds(*.expired_at))]
    Expired {
        /// The `exp` claim.
        expired_at: SystemTime,
    },
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not valid before {}", humantime::format_rfc3339_seconds(*.not_before))]
    NotYetValid {
        /// The `nbf` claim.
        not_before: SystemTime,
    },
    /// `iat` is in the future (beyond the leeway).
    #[error("token issued in the future")]
    IatInFuture,
    /// A delegated token whose `scp` has none of the required scopes.
    #[error("delegated token lacks a required scope")]
    ScopeMissing,
    /// An app-only token whose `roles` has none of the required app roles.
    #[error("app-only token lacks a required app role")]
    AppRoleMissing,
    /// The token has neither `scp` nor `roles`.
    #[error("token has neither scp nor roles")]
    NoScopeOrRoles,
}

impl TokenError {
    /// Stable snake_case reason code for the audit log and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::TooLarge { .. } => "token_too_large",
            TokenError::Jwe => "jwe_token",
            TokenError::Malformed { .. } => "malformed_token",
            TokenError::AlgNotAllowed { .. } => "alg_not_allowed",
            TokenError::TypNotAllowed { .. } => "typ_not_allowed",
            TokenError::KidMissing => "kid_missing",
            TokenError::KidMalformed => "kid_malformed",
            TokenError::ForbiddenHeader { .. } => "forbidden_header",
            TokenError::HeaderNonce => "header_nonce",
            TokenError::DuplicateHeader { .. } => "duplicate_header",
            TokenError::DuplicateClaim { .. } => "duplicate_claim",
            TokenError::IdToken { .. } => "id_token",
            TokenError::FirstPartyResource { .. } => "first_party_resource",
            TokenError::AudienceMismatch { .. } => "audience_mismatch",
            TokenError::MissingClaim { .. } => "missing_claim",
            TokenError::InvalidClaim { .. } => "invalid_claim",
            TokenError::IssuerMismatch { .. } => "issuer_mismatch",
            TokenError::VersionNotAccepted { .. } => "version_not_accepted",
            TokenError::TenantMalformed => "tenant_malformed",
            TokenError::TenantNotAllowed { .. } => "tenant_not_allowed",
            TokenError::TidIssMismatch => "tid_iss_mismatch",
            TokenError::UnknownKid { .. } => "unknown_kid",
            TokenError::KeyIssuerMismatch { .. } => "key_issuer_mismatch",
            TokenError::JwksUnavailable { .. } => "jwks_unavailable",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired { .. } => "token_expired",
            TokenError::NotYetValid { .. } => "token_not_yet_valid",
            TokenError::IatInFuture => "iat_in_future",
            TokenError::ScopeMissing => "scope_missing",
            TokenError::AppRoleMissing => "app_role_missing",
            TokenError::NoScopeOrRoles => "no_scope_or_roles",
        }
    }

    /// Detail for the audit log: which claim or header member was involved, when there is one.
    pub fn detail(&self) -> Option<&str> {
        match self {
            TokenError::MissingClaim { claim } | TokenError::InvalidClaim { claim } => Some(claim),
            TokenError::ForbiddenHeader { name } => Some(name),
            TokenError::IdToken { marker } => Some(marker),
            TokenError::DuplicateHeader { name } | TokenError::DuplicateClaim { name } => {
                Some(name)
            }
            TokenError::Malformed { what } => Some(what),
            TokenError::AlgNotAllowed { alg } => Some(alg),
            TokenError::TypNotAllowed { typ } => Some(typ),
            TokenError::TooLarge { .. }
            | TokenError::Jwe
            | TokenError::KidMissing
            | TokenError::KidMalformed
            | TokenError::HeaderNonce
            | TokenError::FirstPartyResource { .. }
            | TokenError::AudienceMismatch { .. }
            | TokenError::IssuerMismatch { .. }
            | TokenError::VersionNotAccepted { .. }
            | TokenError::TenantMalformed
            | TokenError::TenantNotAllowed { .. }
            | TokenError::TidIssMismatch
            | TokenError::UnknownKid { .. }
            | TokenError::KeyIssuerMismatch { .. }
            | TokenError::JwksUnavailable { .. }
            | TokenError::BadSignature
            | TokenError::Expired { .. }
            | TokenError::NotYetValid { .. }
            | TokenError::IatInFuture
            | TokenError::ScopeMissing
            | TokenError::AppRoleMissing
            | TokenError::NoScopeOrRoles => None,
        }
    }

    /// The text sent to the client in the ErrorResponse.
    ///
    /// Only facts the client can already read from its own token are spelled out (expiry,
    /// not-yet-valid, wrong resource); everything else is one generic sentence.
    pub fn client_message(&self) -> Cow<'static, str> {
        const GENERIC: &str = "authentication failed: the access token was not accepted";
        match self {
            TokenError::Expired { expired_at } => Cow::Owned(format!(
                "access token expired at {}; get a new token and reconnect",
                humantime::format_rfc3339_seconds(*expired_at)
            )),
            TokenError::NotYetValid { not_before } => Cow::Owned(format!(
                "access token is not valid before {}; check the clock of this machine",
                humantime::format_rfc3339_seconds(*not_before)
            )),
            TokenError::FirstPartyResource { scope_hint, .. }
            | TokenError::AudienceMismatch { scope_hint, .. } => Cow::Owned(format!(
                "this token was issued for another resource; request a token with scope {scope_hint}"
            )),
            TokenError::JwksUnavailable { .. } => Cow::Borrowed(
                "authentication failed: the identity provider's signing keys could not be fetched; try again later",
            ),
            // The client can see both facts itself: no oracle.
            TokenError::TooLarge { .. } => {
                Cow::Borrowed("authentication failed: the access token is larger than 64 KiB")
            }
            TokenError::Malformed { .. } => Cow::Borrowed(
                "authentication failed: what was sent is not an access token; send a Microsoft Entra ID access token issued for this gateway (as the password, or through the Redshift driver's identity provider plugin)",
            ),
            TokenError::Jwe
            | TokenError::AlgNotAllowed { .. }
            | TokenError::TypNotAllowed { .. }
            | TokenError::KidMissing
            | TokenError::KidMalformed
            | TokenError::ForbiddenHeader { .. }
            | TokenError::HeaderNonce
            | TokenError::DuplicateHeader { .. }
            | TokenError::DuplicateClaim { .. }
            | TokenError::IdToken { .. }
            | TokenError::MissingClaim { .. }
            | TokenError::InvalidClaim { .. }
            | TokenError::IssuerMismatch { .. }
            | TokenError::VersionNotAccepted { .. }
            | TokenError::TenantMalformed
            | TokenError::TenantNotAllowed { .. }
            | TokenError::TidIssMismatch
            | TokenError::UnknownKid { .. }
            | TokenError::KeyIssuerMismatch { .. }
            | TokenError::BadSignature
            | TokenError::IatInFuture
            | TokenError::ScopeMissing
            | TokenError::AppRoleMissing
            | TokenError::NoScopeOrRoles => Cow::Borrowed(GENERIC),
        }
    }

    /// SQLSTATE for the ErrorResponse: `08006` when the identity provider is at fault, else `28000`.
    pub fn sqlstate(&self) -> &'static str {
        if self.is_identity_provider_fault() {
            "08006"
        } else {
            "28000"
        }
    }

    /// True when the refusal is caused by the identity provider (keys could not be fetched),
    /// not by the token the user presented.
    pub fn is_identity_provider_fault(&self) -> bool {
        match self {
            TokenError::JwksUnavailable { .. } => true,
            TokenError::TooLarge { .. }
            | TokenError::Malformed { .. }
            | TokenError::Jwe
            | TokenError::AlgNotAllowed { .. }
            | TokenError::TypNotAllowed { .. }
            | TokenError::KidMissing
            | TokenError::KidMalformed
            | TokenError::ForbiddenHeader { .. }
            | TokenError::HeaderNonce
            | TokenError::DuplicateHeader { .. }
            | TokenError::DuplicateClaim { .. }
            | TokenError::IdToken { .. }
            | TokenError::FirstPartyResource { .. }
            | TokenError::AudienceMismatch { .. }
            | TokenError::MissingClaim { .. }
            | TokenError::InvalidClaim { .. }
            | TokenError::IssuerMismatch { .. }
            | TokenError::VersionNotAccepted { .. }
            | TokenError::TenantMalformed
            | TokenError::TenantNotAllowed { .. }
            | TokenError::TidIssMismatch
            | TokenError::UnknownKid { .. }
            | TokenError::KeyIssuerMismatch { .. }
            | TokenError::BadSignature
            | TokenError::Expired { .. }
            | TokenError::NotYetValid { .. }
            | TokenError::IatInFuture
            | TokenError::ScopeMissing
            | TokenError::AppRoleMissing
            | TokenError::NoScopeOrRoles => false,
        }
    }
}

/// The issuer configuration handed to [`super::Authenticator::new`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthSetupError {
    /// No issuer was configured.
    #[error("no issuer configured")]
    NoIssuers,
    /// Two issuers share a name.
    #[error("issuer name {0:?} is used twice")]
    DuplicateIssuerName(String),
    /// A setting of one issuer is unusable.
    #[error("issuer {issuer:?}: {problem}")]
    Invalid {
        /// The issuer name.
        issuer: String,
        /// What is wrong.
        problem: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
}

/// Longest string taken from a token into an error.
const MAX_ECHO: usize = 64;

/// Shorten an untrusted string for an error or log line and replace anything that is not
/// printable ASCII, so a token cannot inject control characters or huge blobs into the audit log.
pub(crate) fn sanitize(s: &str) -> Box<str> {
    let mut out = String::with_capacity(s.len().min(MAX_ECHO + 3));
    for (i, c) in s.chars().enumerate() {
        if i == MAX_ECHO {
            out.push_str("...");
            break;
        }
        out.push(if c.is_ascii_graphic() || c == ' ' {
            c
        } else {
            '?'
        });
    }
    out.into_boxed_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_truncates_and_strips() {
        assert_eq!(&*sanitize("a\nb"), "a?b");
        let long = "x".repeat(500);
        assert_eq!(sanitize(&long).len(), MAX_ECHO + 3);
    }

    #[test]
    fn client_messages_are_generic_except_visible_facts() {
        let e = TokenError::BadSignature;
        assert_eq!(
            e.client_message(),
            "authentication failed: the access token was not accepted"
        );
        assert_eq!(e.sqlstate(), "28000");
        let e = TokenError::JwksUnavailable {
            issuer: "x".into(),
            tenant: "t".into(),
            detail: "d".into(),
        };
        assert_eq!(e.sqlstate(), "08006");
        assert!(e.is_identity_provider_fault());
        let e = TokenError::AudienceMismatch {
            aud: "other".into(),
            scope_hint: "api://idgate/jdbc_login".into(),
        };
        assert!(e.client_message().contains("api://idgate/jdbc_login"));
        let e = TokenError::Expired {
            expired_at: SystemTime::UNIX_EPOCH,
        };
        assert!(e.client_message().contains("1970-01-01T00:00:00Z"));
    }
}
