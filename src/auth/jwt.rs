//! The checks of one token, as pure functions, in pipeline order (entra-tokens.md §0):
//! shape → header → payload peek → token kind → issuer/tenant → audience → signature and
//! lifetime (jsonwebtoken) → `iat` → authorization. The network-facing parts (key lookup) live in
//! `jwks.rs` and the orchestration in `mod.rs`; this file is the only place that builds
//! [`VerifiedClaims`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::claims::{JsonObject, VerifiedClaims};
use super::error::{sanitize, TokenError};
use super::{TokenVersion, MAX_TOKEN_LEN};

/// Longest `kid` we look up.
const MAX_KID_LEN: usize = 128;

/// Header members that name or embed key material, or demand extensions we do not implement.
/// Entra access tokens for our API never carry them (RFC 8725 §3.10, CVE-2018-0114 class).
const FORBIDDEN_HEADERS: [&str; 5] = ["jku", "jwk", "x5u", "x5c", "crit"];

/// Claims that only ID tokens carry.
const ID_TOKEN_MARKERS: [&str; 3] = ["nonce", "at_hash", "c_hash"];

/// Audiences of Microsoft first-party resources. A token for one of these was never meant for
/// us (confused deputy), and some of them (Graph) are signed over a transformed header that
/// third parties must not try to validate. Compared case-insensitively, ignoring one trailing
/// slash (this is a deny-list, so lenient matching is the safe side).
const FIRST_PARTY_AUDIENCES: &[&str] = &[
    // Microsoft Graph (global, US Gov, China) and the retired Azure AD Graph.
    "00000003-0000-0000-c000-000000000000",
    "https://graph.microsoft.com",
    "https://graph.microsoft.us",
    "https://dod-graph.microsoft.us",
    "https://microsoftgraph.chinacloudapi.cn",
    "00000002-0000-0000-c000-000000000000",
    "https://graph.windows.net",
    // Azure Database for PostgreSQL / MySQL (the scope drivers use for Azure Postgres).
    "https://ossrdbms-aad.database.windows.net",
    "https://ossrdbms-aad.database.usgovcloudapi.net",
    "https://ossrdbms-aad.database.chinacloudapi.cn",
    "123cd850-d9df-40bd-94d5-c9f07b7fa203",
    // Azure SQL.
    "https://database.windows.net",
    "022907d3-0f1b-48f7-badc-1ba6abab6d66",
    // Azure Resource Manager / Service Management.
    "https://management.azure.com",
    "https://management.core.windows.net",
    "797f4846-ba00-4fd7-ba43-dac1f8f63013",
    // Key Vault, Storage.
    "https://vault.azure.net",
    "cfa8b339-82a2-471a-a3c9-0fc0be7a4093",
    "https://storage.azure.com",
    "e406a681-f3d4-42a8-90b6-c2b029497af1",
    // Exchange Online, SharePoint.
    "00000002-0000-0ff1-ce00-000000000000",
    "https://outlook.office.com",
    "https://outlook.office365.com",
    "00000003-0000-0ff1-ce00-000000000000",
];

/// True if `aud` names a Microsoft first-party resource.
pub fn is_first_party_audience(aud: &str) -> bool {
    let a = aud.strip_suffix('/').unwrap_or(aud);
    FIRST_PARTY_AUDIENCES
        .iter()
        .any(|fp| fp.eq_ignore_ascii_case(a))
}

/// The three base64url segments of a compact JWS.
#[derive(Clone, Copy)]
pub(crate) struct Segments<'a> {
    pub(crate) header: &'a str,
    pub(crate) payload: &'a str,
}

/// Size, charset and segment count, with no decoding at all (§0 step 2).
pub(crate) fn check_shape(token: &str) -> Result<Segments<'_>, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Malformed { what: "empty" });
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(TokenError::Malformed {
            what: "characters outside the base64url alphabet",
        });
    }
    let mut it = token.split('.');
    let (Some(header), Some(payload), Some(_sig)) = (it.next(), it.next(), it.next()) else {
        return Err(TokenError::Malformed {
            what: "not three segments",
        });
    };
    match it.count() {
        0 => {}
        2 => return Err(TokenError::Jwe),
        _ => {
            return Err(TokenError::Malformed {
                what: "not three segments",
            })
        }
    }
    if header.is_empty() || payload.is_empty() {
        return Err(TokenError::Malformed {
            what: "empty segment",
        });
    }
    Ok(Segments { header, payload })
}

fn decode_object(segment: &str, what: &'static str) -> Result<JsonObject, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| TokenError::Malformed { what })?;
    serde_json::from_slice::<JsonObject>(&bytes).map_err(|_| TokenError::Malformed { what })
}

/// Header checks (§0 step 3). Returns the `kid`.
pub(crate) fn check_header(segment: &str) -> Result<Box<str>, TokenError> {
    let header = decode_object(segment, "header is not base64url JSON object")?;
    if let Some(name) = header.duplicate {
        return Err(TokenError::DuplicateHeader {
            name: sanitize(&name),
        });
    }
    let h = header.map;
    match h.get("alg") {
        Some(Value::String(alg)) if alg == "RS256" => {}
        Some(Value::String(alg)) => return Err(TokenError::AlgNotAllowed { alg: sanitize(alg) }),
        Some(_) => {
            return Err(TokenError::AlgNotAllowed {
                alg: "<not a string>".into(),
            })
        }
        None => {
            return Err(TokenError::AlgNotAllowed {
                alg: "<missing>".into(),
            })
        }
    }
    for name in FORBIDDEN_HEADERS {
        if h.contains_key(name) {
            return Err(TokenError::ForbiddenHeader { name });
        }
    }
    if h.contains_key("nonce") {
        return Err(TokenError::HeaderNonce);
    }
    match h.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" => {}
        Some(Value::String(t)) => return Err(TokenError::TypNotAllowed { typ: sanitize(t) }),
        Some(_) => {
            return Err(TokenError::TypNotAllowed {
                typ: "<not a string>".into(),
            })
        }
    }
    match h.get("kid") {
        None => Err(TokenError::KidMissing),
        Some(Value::String(kid)) if is_valid_kid(kid) => Ok(kid.as_str().into()),
        Some(_) => Err(TokenError::KidMalformed),
    }
}

/// 1..=128 characters of the base64url alphabet. The kid is only ever a map key, but a strict
/// format keeps path-traversal and injection payloads out of logs and caches.
pub(crate) fn is_valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Decode the (still untrusted) payload, refusing duplicate claims and ID-token markers.
pub(crate) fn peek_payload(segment: &str) -> Result<Map<String, Value>, TokenError> {
    let payload = decode_object(segment, "payload is not base64url JSON object")?;
    if let Some(name) = payload.duplicate {
        return Err(TokenError::DuplicateClaim {
            name: sanitize(&name),
        });
    }
    let map = payload.map;
    for marker in ID_TOKEN_MARKERS {
        if map.contains_key(marker) {
            return Err(TokenError::IdToken { marker });
        }
    }
    Ok(map)
}

/// Refuse tokens whose audience is a Microsoft first-party resource.
pub(crate) fn check_first_party(
    claims: &Map<String, Value>,
    scope_hint: &str,
) -> Result<(), TokenError> {
    let found = match claims.get("aud") {
        Some(Value::String(a)) => is_first_party_audience(a).then_some(a.as_str()),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .find(|a| is_first_party_audience(a)),
        _ => None,
    };
    match found {
        Some(aud) => Err(TokenError::FirstPartyResource {
            aud: sanitize(aud),
            scope_hint: scope_hint.into(),
        }),
        None => Ok(()),
    }
}

/// Optional string claim; present with another JSON type is an error.
pub(crate) fn opt_str<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(TokenError::InvalidClaim { claim: name }),
    }
}

/// Required string claim.
pub(crate) fn req_str<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, TokenError> {
    opt_str(claims, name)?.ok_or(TokenError::MissingClaim { claim: name })
}

/// Routing hints read from the unverified payload (§0 step 4).
pub(crate) struct Hints<'a> {
    pub(crate) version: TokenVersion,
    pub(crate) tid: &'a str,
    pub(crate) iss: &'a str,
}

/// Read `tid`, `iss` and `ver`; `tid` must be a canonical lowercase GUID.
pub(crate) fn routing_hints(claims: &Map<String, Value>) -> Result<Hints<'_>, TokenError> {
    let tid = req_str(claims, "tid")?;
    if !is_canonical_guid(tid) {
        return Err(TokenError::TenantMalformed);
    }
    let iss = req_str(claims, "iss")?;
    let ver = req_str(claims, "ver")?;
    let version = match ver {
        "1.0" => TokenVersion::V1,
        "2.0" => TokenVersion::V2,
        other => {
            return Err(TokenError::VersionNotAccepted {
                ver: sanitize(other),
            })
        }
    };
    Ok(Hints { version, tid, iss })
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase hex only (no braces, no upper case).
pub fn is_canonical_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// Put `tid` into an issuer that may hold the `{tenantid}` template.
pub(crate) fn expand_issuer(template: &str, tid: &str) -> String {
    template.replace("{tenantid}", tid)
}

/// `iss` must equal the discovery issuer for this tenant and version, byte for byte (§6).
/// When it has the right shape but another tenant inside, the reason is `tid_iss_mismatch`.
pub(crate) fn check_issuer(
    iss: &str,
    tid: &str,
    expected_template: &str,
) -> Result<(), TokenError> {
    let expected = expand_issuer(expected_template, tid);
    if iss == expected {
        return Ok(());
    }
    if let Some(pos) = expected.find(tid) {
        let (prefix, suffix) = (&expected[..pos], &expected[pos + tid.len()..]);
        if iss.len() > prefix.len() + suffix.len()
            && iss.starts_with(prefix)
            && iss.ends_with(suffix)
        {
            return Err(TokenError::TidIssMismatch);
        }
    }
    Err(TokenError::IssuerMismatch { iss: sanitize(iss) })
}

/// The audience must be exactly one of ours (§7). A single string, or an array with one member;
/// Entra never emits several audiences, so an array of more is refused.
pub(crate) fn check_audience(
    claims: &Map<String, Value>,
    audiences: &[String],
    scope_hint: &str,
) -> Result<(), TokenError> {
    let mismatch = |aud: Box<str>| TokenError::AudienceMismatch {
        aud,
        scope_hint: scope_hint.into(),
    };
    match claims.get("aud") {
        None => Err(TokenError::MissingClaim { claim: "aud" }),
        Some(Value::String(a)) => {
            if audiences.iter().any(|x| x == a) {
                Ok(())
            } else {
                Err(mismatch(sanitize(a)))
            }
        }
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(a)] if audiences.iter().any(|x| x == a) => Ok(()),
            _ => Err(mismatch("<array>".into())),
        },
        Some(_) => Err(TokenError::InvalidClaim { claim: "aud" }),
    }
}

/// A v2 key's own `issuer` property must allow the token's issuer (§4): exact, or the
/// `{tenantid}` template filled with the token's `tid`.
pub(crate) fn check_key_issuer(
    key_issuer: Option<&str>,
    iss: &str,
    tid: &str,
    kid: &str,
) -> Result<(), TokenError> {
    match key_issuer {
        None => Ok(()),
        Some(k) if expand_issuer(k, tid) == iss => Ok(()),
        Some(_) => Err(TokenError::KeyIssuerMismatch { kid: kid.into() }),
    }
}

/// Build the jsonwebtoken validation for one issuer configuration (§0 step 6). The issuer is
/// checked by us (templated, per version), so `iss` is only required here.
pub(crate) fn validation(audiences: &[String], leeway: Duration) -> Validation {
    let mut v = Validation::new(Algorithm::RS256);
    v.leeway = leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = true;
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
    v.set_audience(audiences);
    v
}

/// Seconds since the epoch from a numeric claim.
fn claim_secs(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
                    _ => Err(TokenError::InvalidClaim { claim: name }),
                }
            }
        }
        Some(_) => Err(TokenError::InvalidClaim { claim: name }),
    }
}

fn secs_to_time(secs: u64, claim: &'static str) -> Result<SystemTime, TokenError> {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .ok_or(TokenError::InvalidClaim { claim })
}

/// Signature, `exp`, `nbf`, `aud` and required claims, by jsonwebtoken, with its errors mapped
/// to our reasons.
pub(crate) fn verify_signature(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
    claims: &Map<String, Value>,
    scope_hint: &str,
) -> Result<(), TokenError> {
    let err = match jsonwebtoken::decode::<serde::de::IgnoredAny>(token, key, validation) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    Err(match err.kind() {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => match claim_secs(claims, "exp") {
            Ok(Some(exp)) => TokenError::Expired {
                expired_at: secs_to_time(exp, "exp")?,
            },
            _ => TokenError::InvalidClaim { claim: "exp" },
        },
        ErrorKind::ImmatureSignature => match claim_secs(claims, "nbf") {
            Ok(Some(nbf)) => TokenError::NotYetValid {
                not_before: secs_to_time(nbf, "nbf")?,
            },
            _ => TokenError::InvalidClaim { claim: "nbf" },
        },
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim {
            claim: static_claim(c),
        },
        ErrorKind::InvalidClaimFormat(c) => TokenError::InvalidClaim {
            claim: static_claim(c),
        },
        ErrorKind::InvalidAudience => TokenError::AudienceMismatch {
            aud: "<checked by jsonwebtoken>".into(),
            scope_hint: scope_hint.into(),
        },
        ErrorKind::InvalidIssuer => TokenError::IssuerMismatch {
            iss: "<checked by jsonwebtoken>".into(),
        },
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => TokenError::AlgNotAllowed {
            alg: "<refused by jsonwebtoken>".into(),
        },
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidAlgorithmName => TokenError::Malformed {
            what: "rejected by the JWT decoder",
        },
        // Key construction problems, provider errors and anything added to jsonwebtoken later:
        // the signature could not be verified with this key.
        _ => TokenError::BadSignature,
    })
}

fn static_claim(c: &str) -> &'static str {
    match c {
        "exp" => "exp",
        "nbf" => "nbf",
        "iss" => "iss",
        "aud" => "aud",
        "sub" => "sub",
        _ => "unknown",
    }
}

/// `iat` more than `leeway` in the future is refused (§10).
pub(crate) fn check_iat(
    claims: &Map<String, Value>,
    now: SystemTime,
    leeway: Duration,
) -> Result<(), TokenError> {
    let Some(iat) = claim_secs(claims, "iat")? else {
        return Ok(());
    };
    let iat = secs_to_time(iat, "iat")?;
    match iat.duration_since(now) {
        Ok(ahead) if ahead > leeway => Err(TokenError::IatInFuture),
        _ => Ok(()),
    }
}

/// String array claim (absent = empty).
fn str_array(claims: &Map<String, Value>, name: &'static str) -> Result<Vec<String>, TokenError> {
    match claims.get(name) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or(TokenError::InvalidClaim { claim: name })
            })
            .collect(),
        Some(_) => Err(TokenError::InvalidClaim { claim: name }),
    }
}

/// What [`authorize`] needs to know about the issuer that accepted the token.
pub(crate) struct AuthzPolicy<'a> {
    pub(crate) issuer_name: &'a Arc<str>,
    pub(crate) required_scopes: &'a [String],
    pub(crate) required_app_roles: &'a [String],
}

/// Token kind and permissions (§8, §9), then the proof object. Call only after the signature,
/// lifetime, issuer and audience checks passed.
pub(crate) fn authorize(
    claims: Map<String, Value>,
    version: TokenVersion,
    tid: &str,
    kid: &str,
    policy: &AuthzPolicy<'_>,
) -> Result<VerifiedClaims, TokenError> {
    let exp = claim_secs(&claims, "exp")?.ok_or(TokenError::MissingClaim { claim: "exp" })?;
    let expires_at = secs_to_time(exp, "exp")?;

    let client_claim = match version {
        TokenVersion::V1 => "appid",
        TokenVersion::V2 => "azp",
    };
    let client_app_id = req_str(&claims, client_claim)?.to_owned();

    let scopes: Vec<String> = opt_str(&claims, "scp")?
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let app_roles = str_array(&claims, "roles")?;
    let groups = str_array(&claims, "groups")?;
    let groups_overage = claims
        .get("_claim_names")
        .and_then(Value::as_object)
        .is_some_and(|o| o.contains_key("groups"))
        || claims.get("hasgroups") == Some(&Value::Bool(true));

    if !scopes.is_empty() {
        if !policy.required_scopes.is_empty()
            && !scopes.iter().any(|s| policy.required_scopes.contains(s))
        {
            return Err(TokenError::ScopeMissing);
        }
    } else if app_roles.is_empty() {
        return Err(TokenError::NoScopeOrRoles);
    } else if !policy.required_app_roles.is_empty()
        && !app_roles
            .iter()
            .any(|r| policy.required_app_roles.contains(r))
    {
        return Err(TokenError::AppRoleMissing);
    }

    Ok(VerifiedClaims {
        issuer_name: Arc::clone(policy.issuer_name),
        version,
        tenant_id: tid.to_owned(),
        kid: kid.to_owned(),
        expires_at,
        groups,
        groups_overage,
        app_roles,
        scopes,
        client_app_id: Some(client_app_id),
        claims,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn shape_err(t: &str) -> &'static str {
        check_shape(t).err().map_or("ok", |e| e.reason())
    }

    #[test]
    fn shape() {
        assert_eq!(shape_err(""), "malformed_token");
        assert_eq!(shape_err("a.b"), "malformed_token");
        assert_eq!(shape_err("a.b.c.d.e"), "jwe_token");
        assert_eq!(shape_err("a.b.c.d"), "malformed_token");
        assert_eq!(shape_err("a+b.c.d"), "malformed_token");
        assert_eq!(shape_err("a.b.c="), "malformed_token");
        let big = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(shape_err(&big), "token_too_large");
        assert!(check_shape("a.b.").is_ok());
    }

    #[test]
    fn header_rules() {
        let h = |j: &str| check_header(&b64(j)).map_err(|e| e.reason());
        assert_eq!(h(r#"{"alg":"RS256","kid":"abc"}"#), Ok("abc".into()));
        assert_eq!(
            h(r#"{"alg":"RS256","typ":"JWT","kid":"a-b_c"}"#),
            Ok("a-b_c".into())
        );
        assert_eq!(h(r#"{"alg":"none","kid":"a"}"#), Err("alg_not_allowed"));
        assert_eq!(h(r#"{"alg":"rs256","kid":"a"}"#), Err("alg_not_allowed"));
        assert_eq!(h(r#"{"kid":"a"}"#), Err("alg_not_allowed"));
        assert_eq!(h(r#"{"alg":"RS256"}"#), Err("kid_missing"));
        assert_eq!(h(r#"{"alg":"RS256","kid":""}"#), Err("kid_malformed"));
        assert_eq!(
            h(r#"{"alg":"RS256","kid":"../../etc/passwd"}"#),
            Err("kid_malformed")
        );
        assert_eq!(
            h(r#"{"alg":"RS256","kid":"' OR 1=1 --"}"#),
            Err("kid_malformed")
        );
        assert_eq!(h(r#"{"alg":"RS256","kid":7}"#), Err("kid_malformed"));
        let long = format!(r#"{{"alg":"RS256","kid":"{}"}}"#, "a".repeat(129));
        assert_eq!(h(&long), Err("kid_malformed"));
        assert_eq!(
            h(r#"{"alg":"RS256","kid":"a","typ":"at+jwt"}"#),
            Err("typ_not_allowed")
        );
        for m in ["jku", "jwk", "x5u", "x5c", "crit"] {
            let j = format!(r#"{{"alg":"RS256","kid":"a","{m}":"x"}}"#);
            assert_eq!(h(&j), Err("forbidden_header"), "{m}");
        }
        assert_eq!(
            h(r#"{"alg":"RS256","kid":"a","nonce":"x"}"#),
            Err("header_nonce")
        );
        assert_eq!(
            h(r#"{"alg":"RS256","kid":"a","kid":"b"}"#),
            Err("duplicate_header")
        );
        assert_eq!(h("[1,2]"), Err("malformed_token"));
        assert_eq!(h("not json"), Err("malformed_token"));
    }

    #[test]
    fn guid_and_issuer() {
        assert!(is_canonical_guid("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(!is_canonical_guid("72F988BF-86F1-41AF-91AB-2D7CD011DB47"));
        assert!(!is_canonical_guid("{72f988bf-86f1-41af-91ab-2d7cd011db47}"));
        assert!(!is_canonical_guid("72f988bf86f141af91ab2d7cd011db47"));
        let t = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        let o = "11111111-1111-1111-1111-111111111111";
        let tpl = "https://login.microsoftonline.com/{tenantid}/v2.0";
        assert!(check_issuer(
            &format!("https://login.microsoftonline.com/{t}/v2.0"),
            t,
            tpl
        )
        .is_ok());
        assert_eq!(
            check_issuer(
                &format!("https://login.microsoftonline.com/{o}/v2.0"),
                t,
                tpl
            )
            .unwrap_err()
            .reason(),
            "tid_iss_mismatch"
        );
        assert_eq!(
            check_issuer(&format!("https://sts.windows.net/{t}/"), t, tpl)
                .unwrap_err()
                .reason(),
            "issuer_mismatch"
        );
        let concrete = format!("https://sts.windows.net/{t}/");
        assert_eq!(
            check_issuer(&format!("https://sts.windows.net/{o}/"), t, &concrete)
                .unwrap_err()
                .reason(),
            "tid_iss_mismatch"
        );
    }

    #[test]
    fn first_party() {
        assert!(is_first_party_audience("https://graph.microsoft.com/"));
        assert!(is_first_party_audience(
            "00000003-0000-0000-C000-000000000000"
        ));
        assert!(!is_first_party_audience("api://idgate"));
    }
}
