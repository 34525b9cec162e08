//! End-to-end tests of the validator against the dev IdP on 127.0.0.1:0: the happy paths, every
//! applicable refusal of entra-tokens.md §11 with its exact reason code, and the key-cache
//! behaviour (rotation, outage, single flight, refetch floor, omitted keys, token-cache expiry).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::devidp::{DevIdp, DevIdpSettings, TokenSpec};

const TENANT: &str = "6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f";
const OTHER_TENANT: &str = "0a0b0c0d-1111-4222-8333-444455556666";
const MSA_TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";

struct Harness {
    idp: DevIdp,
    auth: Authenticator,
    _cancel: tokio_util::sync::DropGuard,
}

fn settings_for(idp: &DevIdp) -> IssuerSettings {
    let s = idp.settings();
    IssuerSettings {
        name: "dev".into(),
        authority: idp.authority(),
        tenants: vec![TENANT.into()],
        accept_versions: vec![TokenVersion::V1, TokenVersion::V2],
        audiences: vec![s.app_id_uri.clone(), s.app_guid.clone()],
        required_scopes: vec!["jdbc_login".into()],
        required_app_roles: vec!["Gateway.Connect".into()],
        leeway: Duration::from_secs(60),
        jwks_refetch_floor: Duration::from_secs(300),
        jwks_refresh: Duration::from_secs(3600),
        jwks_max_stale: Duration::from_secs(24 * 3600),
        http_timeout: Duration::from_secs(5),
        allow_http: false,
    }
}

async fn start_idp() -> (DevIdp, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cancel = CancellationToken::new();
    let idp = DevIdp::start(listener, DevIdpSettings::example(TENANT), cancel.clone())
        .await
        .unwrap();
    (idp, cancel)
}

async fn harness_with(tweak: impl FnOnce(&mut IssuerSettings)) -> Harness {
    let (idp, cancel) = start_idp().await;
    let mut s = settings_for(&idp);
    tweak(&mut s);
    let auth = Authenticator::new(vec![s]).unwrap();
    Harness {
        idp,
        auth,
        _cancel: cancel.drop_guard(),
    }
}

async fn harness() -> Harness {
    harness_with(|_| {}).await
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

impl Harness {
    async fn reason(&self, token: &str) -> &'static str {
        match self.auth.verify(token).await {
            Ok(c) => panic!("token unexpectedly accepted: {:?}", c.object_id()),
            Err(e) => e.reason(),
        }
    }

    async fn refuse(&self, spec: &TokenSpec) -> TokenError {
        let token = self.idp.mint(spec);
        self.auth.verify(&token).await.expect_err("must be refused")
    }

    async fn reason_of(&self, spec: &TokenSpec) -> &'static str {
        self.refuse(spec).await.reason()
    }

    fn user(&self) -> TokenSpec {
        self.idp.user_spec("alice@example.com")
    }

    /// A token with a crafted header (merged over the normal one) and the normal payload.
    fn with_header(&self, extra: serde_json::Value, alg: Algorithm) -> String {
        let spec = self.user();
        let mut h = self.idp.header_for(&spec);
        for (k, v) in extra.as_object().unwrap() {
            h.as_object_mut().unwrap().insert(k.clone(), v.clone());
        }
        self.idp.sign_raw_alg(&h, &self.idp.payload_for(&spec), alg)
    }
}

// ---------------------------------------------------------------- happy paths

#[tokio::test]
async fn happy_v2_delegated() {
    let h = harness().await;
    let token = h.idp.mint(&h.user().v2());
    let c = h.auth.verify(&token).await.unwrap();
    assert_eq!(c.issuer_name(), "dev");
    assert_eq!(c.version(), TokenVersion::V2);
    assert_eq!(c.tenant_id(), TENANT);
    assert_eq!(c.issuer(), format!("{}/{TENANT}/v2.0", h.idp.authority()));
    assert_eq!(c.object_id(), Some(h.idp.settings().users[0].oid.as_str()));
    assert!(c.subject().is_some());
    assert!(c.token_id().is_some());
    assert_eq!(c.claim_str("preferred_username"), Some("alice@example.com"));
    assert_eq!(c.claim_str("upn"), None);
    assert_eq!(c.scopes(), ["jdbc_login".to_owned()]);
    assert!(!c.is_app_only());
    assert_eq!(c.groups(), h.idp.settings().users[0].groups.as_slice());
    assert!(!c.groups_overage());
    assert_eq!(
        c.client_app_id(),
        Some(crate::devidp::DEFAULT_CLIENT_APP_ID)
    );
    assert_eq!(c.key_id(), h.idp.current_kid());
    assert!(c.expires_at() > std::time::SystemTime::now());
    let st = h.auth.stats();
    assert_eq!((st.discovery_fetches, st.jwks_fetches), (1, 1));
}

#[tokio::test]
async fn happy_v1_delegated() {
    let h = harness().await;
    let token = h.idp.mint(&h.user().v1());
    let c = h.auth.verify(&token).await.unwrap();
    assert_eq!(c.version(), TokenVersion::V1);
    assert_eq!(c.issuer(), format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(c.claim_str("upn"), Some("alice@example.com"));
    assert_eq!(c.claim_str("unique_name"), Some("alice@example.com"));
    assert_eq!(c.claim_str("aud"), Some("api://idgate"));
    assert_eq!(
        c.client_app_id(),
        Some(crate::devidp::DEFAULT_CLIENT_APP_ID)
    );
}

#[tokio::test]
async fn happy_app_only_and_app_role_missing() {
    let h = harness().await;
    let ok = TokenSpec::app("11111111-2222-3333-4444-555555555555", &["Gateway.Connect"]);
    let c = h.auth.verify(&h.idp.mint(&ok)).await.unwrap();
    assert!(c.is_app_only());
    assert_eq!(c.app_roles(), ["Gateway.Connect".to_owned()]);
    assert_eq!(
        c.client_app_id(),
        Some("11111111-2222-3333-4444-555555555555")
    );
    let bad = TokenSpec::app("11111111-2222-3333-4444-555555555555", &["Other.Role"]);
    assert_eq!(h.reason_of(&bad).await, "app_role_missing");
}

#[tokio::test]
async fn token_endpoint_grants_produce_accepted_tokens() {
    let h = harness().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{}/{TENANT}/oauth2/v2.0/token", h.idp.authority());

    for ver in ["1", "2"] {
        let r: serde_json::Value = http
            .post(&url)
            .form(&[
                ("grant_type", "password"),
                ("client_id", "04b07795-8ddb-461a-bbee-02f9e1bf7b46"),
                ("username", "alice@example.com"),
                ("password", "alice-password"),
                ("scope", "api://idgate/jdbc_login openid"),
                ("token_version", ver),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["token_type"], "Bearer");
        let c = h
            .auth
            .verify(r["access_token"].as_str().unwrap())
            .await
            .unwrap();
        assert_eq!(c.version().as_claim(), format!("{ver}.0"));
        assert!(!c.is_app_only());
    }

    let r: serde_json::Value = http
        .post(&url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "11111111-2222-3333-4444-555555555555"),
            ("client_secret", "client-secret"),
            ("scope", "api://idgate/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let c = h
        .auth
        .verify(r["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert!(c.is_app_only());

    let bad_pw = http
        .post(&url)
        .form(&[
            ("grant_type", "password"),
            ("client_id", "x"),
            ("username", "alice@example.com"),
            ("password", "wrong"),
            ("scope", "api://idgate/jdbc_login"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_pw.status(), 400);
    let body: serde_json::Value = bad_pw.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");

    let bad_secret = http
        .post(&url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "11111111-2222-3333-4444-555555555555"),
            ("client_secret", "nope"),
            ("scope", "api://idgate/.default"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_secret.status(), 401);

    let rotated: serde_json::Value = http
        .post(format!("{}/admin/rotate", h.idp.authority()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rotated["kid"], h.idp.current_kid());
}

// ---------------------------------------------------------------- lifetime (§10, §11 #8, #9)

#[tokio::test]
async fn expired_and_leeway() {
    let h = harness().await;
    let e = h.refuse(&h.user().expires_in(-61)).await;
    assert_eq!(e.reason(), "token_expired");
    assert!(e.client_message().starts_with("access token expired at "));
    assert_eq!(e.sqlstate(), "28000");
    // Inside the 60 s leeway: accepted.
    h.auth
        .verify(&h.idp.mint(&h.user().expires_in(-30)))
        .await
        .unwrap();
}

#[tokio::test]
async fn not_yet_valid_and_iat_in_future() {
    let h = harness().await;
    let e = h.refuse(&h.user().not_before(600)).await;
    assert_eq!(e.reason(), "token_not_yet_valid");
    assert!(e.client_message().contains("not valid before"));
    assert_eq!(h.reason_of(&h.user().issued_at(600)).await, "iat_in_future");
    h.auth
        .verify(&h.idp.mint(&h.user().issued_at(30)))
        .await
        .unwrap();
}

// ---------------------------------------------------------------- required claims (§11 #16)

#[tokio::test]
async fn missing_claims() {
    let h = harness().await;
    for claim in ["aud", "iss", "exp", "nbf", "tid", "ver", "azp"] {
        let e = h.refuse(&h.user().without(claim)).await;
        assert_eq!(e.reason(), "missing_claim", "{claim}");
        assert_eq!(e.detail(), Some(claim), "{claim}");
    }
    let e = h.refuse(&h.user().v1().without("appid")).await;
    assert_eq!((e.reason(), e.detail()), ("missing_claim", Some("appid")));
}

// ---------------------------------------------------------------- audience (§7, §11 #13, #14, #17)

#[tokio::test]
async fn wrong_audience_tells_the_right_scope() {
    let h = harness().await;
    let e = h.refuse(&h.user().audience("api://some-other-api")).await;
    assert_eq!(e.reason(), "audience_mismatch");
    assert_eq!(
        e.client_message(),
        "this token was issued for another resource; request a token with scope api://idgate/jdbc_login"
    );
    // Exact comparison: no trailing-slash or case folding.
    assert_eq!(
        h.reason_of(&h.user().audience("api://idgate/")).await,
        "audience_mismatch"
    );
    assert_eq!(
        h.reason_of(&h.user().audience("API://idgate")).await,
        "audience_mismatch"
    );
    // The same answer for a tenant that is not trusted: the refusal reveals no configuration.
    let untrusted = h
        .refuse(
            &h.user()
                .audience("api://some-other-api")
                .tenant(OTHER_TENANT),
        )
        .await;
    assert_eq!(untrusted.reason(), "audience_mismatch");
    assert_eq!(untrusted.client_message(), e.client_message());
    // Several audiences: refused even if one is ours.
    let spec = h
        .user()
        .claim("aud", json!(["other", h.idp.settings().app_guid]));
    assert_eq!(h.reason_of(&spec).await, "audience_mismatch");
}

#[tokio::test]
async fn first_party_audiences() {
    let h = harness().await;
    for aud in [
        "https://graph.microsoft.com",
        "00000003-0000-0000-c000-000000000000",
        "https://ossrdbms-aad.database.windows.net",
        "https://management.azure.com/",
    ] {
        let e = h.refuse(&h.user().audience(aud)).await;
        assert_eq!(e.reason(), "first_party_resource", "{aud}");
        assert!(e.client_message().contains("api://idgate/jdbc_login"));
    }
    // A Graph token also carries a header nonce: refused for that first.
    let graph = h
        .user()
        .audience("00000003-0000-0000-c000-000000000000")
        .header("nonce", "AbCdEf");
    assert_eq!(h.reason_of(&graph).await, "header_nonce");
}

// ---------------------------------------------------------------- issuer / tenant (§6, §11 #10, #11, #12, #20)

#[tokio::test]
async fn tenant_rules() {
    let h = harness().await;
    assert_eq!(
        h.reason_of(&h.user().tenant(OTHER_TENANT)).await,
        "tenant_not_allowed"
    );
    assert_eq!(
        h.reason_of(&h.user().tenant(&TENANT.to_uppercase())).await,
        "tenant_malformed"
    );
    assert_eq!(
        h.reason_of(&h.user().tenant(&format!("{{{TENANT}}}")))
            .await,
        "tenant_malformed"
    );
    // v2: tid ours, iss names another tenant.
    let v2 = h
        .user()
        .v2()
        .claim("iss", format!("{}/{OTHER_TENANT}/v2.0", h.idp.authority()));
    assert_eq!(h.reason_of(&v2).await, "tid_iss_mismatch");
    let v1 = h
        .user()
        .v1()
        .claim("iss", format!("https://sts.windows.net/{OTHER_TENANT}/"));
    assert_eq!(h.reason_of(&v1).await, "tid_iss_mismatch");
    // ver and iss disagree.
    let mixed = h
        .user()
        .v2()
        .claim("iss", format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(h.reason_of(&mixed).await, "issuer_mismatch");
    let foreign = h
        .user()
        .claim("iss", format!("https://evil.example/{TENANT}/v2.0/x"));
    assert_eq!(h.reason_of(&foreign).await, "issuer_mismatch");
    assert_eq!(
        h.reason_of(&h.user().claim("ver", "3.0")).await,
        "version_not_accepted"
    );
}

#[tokio::test]
async fn version_not_accepted() {
    let h = harness_with(|s| s.accept_versions = vec![TokenVersion::V2]).await;
    assert_eq!(h.reason_of(&h.user().v1()).await, "version_not_accepted");
    h.auth.verify(&h.idp.mint(&h.user().v2())).await.unwrap();
}

#[tokio::test]
async fn key_scoped_to_another_issuer() {
    let h = harness().await;
    h.idp
        .set_v2_key_issuer(Some(format!("{}/{MSA_TENANT}/v2.0", h.idp.authority())));
    assert_eq!(h.reason_of(&h.user().v2()).await, "key_issuer_mismatch");
    // v1 key documents carry no issuer property.
    h.auth.verify(&h.idp.mint(&h.user().v1())).await.unwrap();
}

// ---------------------------------------------------------------- header (§11 #1 - #6)

#[tokio::test]
async fn alg_none() {
    let h = harness().await;
    let spec = h.user();
    let header = json!({"alg": "none", "typ": "JWT", "kid": h.idp.current_kid()});
    let token = format!("{}.{}.", b64(&header), b64(&h.idp.payload_for(&spec)));
    assert_eq!(h.reason(&token).await, "alg_not_allowed");
    assert_eq!(h.auth.stats().jwks_fetches, 0, "refused before key lookup");
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key() {
    let h = harness().await;
    // Warm the key cache so the attack token meets a real, cached RSA key.
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
    let token = h.with_header(json!({"alg": "HS256"}), Algorithm::HS256);
    assert_eq!(h.reason(&token).await, "alg_not_allowed");
    // And the library's own family check refuses it as well.
    let pem = h.idp.public_key_pem();
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let err = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &key,
        &jsonwebtoken::Validation::new(Algorithm::RS256),
    )
    .unwrap_err();
    assert_eq!(
        err.kind(),
        &jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
    );
}

#[tokio::test]
async fn other_rsa_algorithms() {
    let h = harness().await;
    for alg in [Algorithm::RS512, Algorithm::PS256, Algorithm::RS384] {
        let name = format!("{alg:?}");
        let token = h.with_header(json!({ "alg": name }), alg);
        assert_eq!(h.reason(&token).await, "alg_not_allowed", "{name}");
    }
}

#[tokio::test]
async fn kid_rules() {
    let h = harness().await;
    for kid in [
        json!("../../etc/passwd"),
        json!("' OR 1=1 --"),
        json!("k".repeat(10 * 1024)),
        json!(""),
        json!(42),
    ] {
        let token = h.with_header(json!({ "kid": kid }), Algorithm::RS256);
        assert_eq!(h.reason(&token).await, "kid_malformed");
    }
    let spec = h.user();
    let mut header = h.idp.header_for(&spec);
    header.as_object_mut().unwrap().remove("kid");
    let token = h.idp.sign_raw(&header, &h.idp.payload_for(&spec));
    assert_eq!(h.reason(&token).await, "kid_missing");
}

#[tokio::test]
async fn forbidden_headers_and_nonce() {
    let h = harness().await;
    let cases = [
        ("jku", json!("https://attacker.example/keys")),
        ("x5u", json!("https://attacker.example/cert.pem")),
        ("jwk", json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})),
        ("x5c", json!(["MIIBIjANBg"])),
        ("crit", json!(["exp"])),
    ];
    for (name, value) in cases {
        let token = h.with_header(json!({ name: value }), Algorithm::RS256);
        let e = h.auth.verify(&token).await.unwrap_err();
        assert_eq!((e.reason(), e.detail()), ("forbidden_header", Some(name)));
    }
    let token = h.with_header(json!({"nonce": "abc"}), Algorithm::RS256);
    assert_eq!(h.reason(&token).await, "header_nonce");
    let token = h.with_header(json!({"typ": "at+jwt"}), Algorithm::RS256);
    assert_eq!(h.reason(&token).await, "typ_not_allowed");
    assert_eq!(
        h.auth.stats().jwks_fetches,
        0,
        "all refused before key lookup"
    );
}

// ---------------------------------------------------------------- token kind / shape (§9, §11 #15, #18, #19)

#[tokio::test]
async fn id_tokens() {
    let h = harness().await;
    for marker in ["nonce", "at_hash", "c_hash"] {
        let spec = h.user().claim(marker, "xyz").scp(None);
        let e = h.refuse(&spec).await;
        assert_eq!((e.reason(), e.detail()), ("id_token", Some(marker)));
    }
}

#[tokio::test]
async fn shape_rules() {
    let h = harness().await;
    assert_eq!(h.reason("a.b.c.d.e").await, "jwe_token");
    assert_eq!(
        h.reason(&"a".repeat(MAX_TOKEN_LEN + 1)).await,
        "token_too_large"
    );
    // A real, signed token that is simply too big (huge claim).
    let big = h
        .idp
        .mint(&h.user().claim("filler", "x".repeat(MAX_TOKEN_LEN)));
    assert_eq!(h.reason(&big).await, "token_too_large");
    assert_eq!(h.reason("garbage").await, "malformed_token");
    assert_eq!(h.reason("").await, "malformed_token");
    assert_eq!(h.reason("abc.def.ghi").await, "malformed_token");
    assert_eq!(h.reason("a b.c.d").await, "malformed_token");
    assert_eq!(h.reason("eyJh+.eyJ/.sig=").await, "malformed_token");
    assert_eq!(h.auth.stats().jwks_fetches, 0);
}

#[tokio::test]
async fn duplicate_claims_are_refused() {
    let h = harness().await;
    let header = h.idp.header_for(&h.user()).to_string();
    let payload = h.idp.payload_for(&h.user()).to_string();
    // Append a second `aud` member: the second copy is another resource.
    let dup = format!(
        "{},\"aud\":\"https://graph.microsoft.com\"}}",
        payload.strip_suffix('}').unwrap()
    );
    let token = h
        .idp
        .sign_raw_bytes(header.as_bytes(), dup.as_bytes(), Algorithm::RS256);
    let e = h.auth.verify(&token).await.unwrap_err();
    assert_eq!((e.reason(), e.detail()), ("duplicate_claim", Some("aud")));
}

#[tokio::test]
async fn bad_signature() {
    let h = harness().await;
    let a = h.idp.mint(&h.user());
    let b = h
        .idp
        .mint(&h.user().oid("00000000-0000-0000-0000-000000000001"));
    let (a_msg, _) = a.rsplit_once('.').unwrap();
    let (_, b_sig) = b.rsplit_once('.').unwrap();
    let spliced = format!("{a_msg}.{b_sig}");
    let e = h.auth.verify(&spliced).await.unwrap_err();
    assert_eq!(e.reason(), "bad_signature");
    // Neither Debug nor Display of any error carries the signature.
    let text = format!("{e:?} {e} {}", e.client_message());
    assert!(!text.contains(b_sig));
    let empty_sig = format!("{a_msg}.");
    assert_eq!(h.reason(&empty_sig).await, "bad_signature");
}

// ---------------------------------------------------------------- authorization (§8, §11 #21, #22)

#[tokio::test]
async fn scopes_and_roles() {
    let h = harness().await;
    assert_eq!(
        h.reason_of(&h.user().scp(Some("User.Read"))).await,
        "scope_missing"
    );
    assert_eq!(h.reason_of(&h.user().scp(None)).await, "no_scope_or_roles");
    assert_eq!(
        h.reason_of(&h.user().scp(Some("  "))).await,
        "no_scope_or_roles"
    );
    let ok = h.user().scp(Some("openid jdbc_login profile"));
    let c = h.auth.verify(&h.idp.mint(&ok)).await.unwrap();
    assert_eq!(c.scopes().len(), 3);
    // A client-credentials token for an API without assignment: neither scp nor roles.
    let bare = TokenSpec::app("11111111-2222-3333-4444-555555555555", &[]);
    assert_eq!(h.reason_of(&bare).await, "no_scope_or_roles");
}

#[tokio::test]
async fn no_requirements_configured() {
    let h = harness_with(|s| {
        s.required_scopes.clear();
        s.required_app_roles.clear();
    })
    .await;
    h.auth
        .verify(&h.idp.mint(&h.user().scp(Some("anything"))))
        .await
        .unwrap();
    h.auth
        .verify(&h.idp.mint(&TokenSpec::app("c", &["Any.Role"])))
        .await
        .unwrap();
    assert_eq!(h.reason_of(&h.user().scp(None)).await, "no_scope_or_roles");
    // The hint falls back to /.default.
    let e = h.refuse(&h.user().audience("nope")).await;
    assert!(e.client_message().ends_with("api://idgate/.default"));
}

#[tokio::test]
async fn groups_overage_is_flagged() {
    let h = harness().await;
    let spec = h
        .user()
        .groups(&[])
        .claim("_claim_names", json!({"groups": "src1"}))
        .claim(
            "_claim_sources",
            json!({"src1": {"endpoint": "https://graph.windows.net/x/users/y/getMemberObjects"}}),
        );
    let c = h.auth.verify(&h.idp.mint(&spec)).await.unwrap();
    assert!(c.groups_overage());
    assert!(c.groups().is_empty());
    let c = h
        .auth
        .verify(&h.idp.mint(&h.user().claim("hasgroups", true)))
        .await
        .unwrap();
    assert!(c.groups_overage());
}

// ---------------------------------------------------------------- keys (§5, §11 #7)

#[tokio::test]
async fn unknown_kid_and_refetch_floor() {
    let h = harness().await;
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
    assert_eq!(h.idp.jwks_fetch_count(), 1);

    let stranger = h.idp.sign_with_new_key(&h.user());
    assert_eq!(h.reason(&stranger).await, "unknown_kid");
    assert_eq!(h.idp.jwks_fetch_count(), 2, "one forced refetch");

    // A second unknown kid inside the floor: no fetch.
    let stranger2 = h.idp.sign_with_new_key(&h.user());
    assert_eq!(h.reason(&stranger2).await, "unknown_kid");
    assert_eq!(h.idp.jwks_fetch_count(), 2);

    // The first one again: negative cache.
    let again = h.idp.sign_with_new_key(&h.user()); // fresh kid, still within the floor
    assert_eq!(h.reason(&again).await, "unknown_kid");
    assert_eq!(h.reason(&stranger).await, "unknown_kid");
    let st = h.auth.stats();
    assert_eq!(h.idp.jwks_fetch_count(), 2);
    assert_eq!(st.unknown_kid_refetches, 1);
    assert!(st.negative_kid_hits >= 1);

    // Legit tokens are unaffected.
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
}

#[tokio::test]
async fn random_kid_burst_costs_one_fetch() {
    let h = harness().await;
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
    let spec = h.user();
    let payload = h.idp.payload_for(&spec);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..500 {
        let mut header = h.idp.header_for(&spec);
        header["kid"] = json!(format!("random-kid-{i}"));
        let token = h.idp.sign_raw(&header, &payload);
        let auth = h.auth.clone();
        set.spawn(async move { auth.verify(&token).await.unwrap_err().reason() });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap(), "unknown_kid");
    }
    assert_eq!(h.idp.jwks_fetch_count(), 2);
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
}

#[tokio::test]
async fn rotation_is_picked_up_by_exactly_one_fetch() {
    let h = harness().await;
    let old = h.idp.mint(&h.user());
    let old_unverified = h.idp.mint(&h.user());
    h.auth.verify(&old).await.unwrap();
    assert_eq!(h.idp.jwks_fetch_count(), 1);
    let old_kid = h.idp.current_kid();

    let new_kid = h.idp.rotate();
    assert_ne!(new_kid, old_kid);
    let c = h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
    assert_eq!(c.key_id(), new_kid);
    assert_eq!(h.idp.jwks_fetch_count(), 2);
    h.auth.verify(&h.idp.mint(&h.user().v2())).await.unwrap();
    assert_eq!(h.idp.jwks_fetch_count(), 2);
    // Old key still published and cached.
    let c = h.auth.verify(&old_unverified).await.unwrap();
    assert_eq!(c.key_id(), old_kid);
    assert_eq!(h.idp.jwks_fetch_count(), 2);
    assert_eq!(
        h.idp.discovery_fetch_count(),
        1,
        "refetch uses the cached jwks_uri"
    );
}

#[tokio::test]
async fn idp_down_with_warm_cache_still_verifies() {
    let h = harness_with(|s| s.jwks_refetch_floor = Duration::ZERO).await;
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
    h.idp.set_unavailable(true);

    // Background refresh fails, keys stay (last known good).
    let errs = h.auth.prefetch().await;
    assert_eq!(errs.len(), 2);
    assert!(errs.iter().all(|e| e.reason() == "jwks_unavailable"));
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();

    // An unknown kid while the IdP is down is the IdP's fault, not the user's.
    let stranger = h.idp.sign_with_new_key(&h.user());
    let e = h.auth.verify(&stranger).await.unwrap_err();
    assert_eq!(e.reason(), "jwks_unavailable");
    assert!(e.is_identity_provider_fault());
    assert_eq!(e.sqlstate(), "08006");
    assert!(h.auth.stats().jwks_fetch_failures >= 1);

    h.idp.set_unavailable(false);
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
}

#[tokio::test]
async fn cold_cache_with_idp_down() {
    let h = harness_with(|s| s.jwks_refetch_floor = Duration::ZERO).await;
    h.idp.set_unavailable(true);
    let errs = h.auth.prefetch().await;
    assert_eq!(errs.len(), 2);
    let e = h.refuse(&h.user()).await;
    assert_eq!(e.reason(), "jwks_unavailable");
    assert!(e.client_message().contains("could not be fetched"));
    h.idp.set_unavailable(false);
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_cache_concurrent_logins_share_one_fetch_per_version() {
    let h = harness().await;
    let mut tokens = Vec::new();
    for i in 0..200 {
        let upn = format!("user{i}@example.com");
        tokens.push(h.idp.mint(&TokenSpec::user(&upn).v1()));
        tokens.push(h.idp.mint(&TokenSpec::user(&upn).v2()));
    }
    let mut set = tokio::task::JoinSet::new();
    for t in tokens {
        let auth = h.auth.clone();
        set.spawn(async move { auth.verify(&t).await.map(|c| c.version()) });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
        n += 1;
    }
    assert_eq!(n, 400);
    assert_eq!(h.idp.jwks_fetch_count(), 2, "one JWKS fetch per version");
    assert_eq!(
        h.idp.discovery_fetch_count(),
        2,
        "one discovery fetch per version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_kid_refetch_is_single_flight_even_without_a_floor() {
    let h = harness_with(|s| s.jwks_refetch_floor = Duration::ZERO).await;
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
    h.idp.rotate_async().await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200 {
        let token = h.idp.mint(&TokenSpec::user(&format!("u{i}@example.com")));
        let auth = h.auth.clone();
        set.spawn(async move { auth.verify(&token).await.map(|_| ()) });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    assert_eq!(h.idp.jwks_fetch_count(), 2);
    assert_eq!(h.auth.stats().unknown_kid_refetches, 1);
}

#[tokio::test]
async fn keys_missing_from_one_response_are_kept() {
    let h = harness().await;
    let k1 = h.idp.current_kid();
    let signed_by_k1 = h.idp.mint(&h.user());
    let k2 = h.idp.rotate();
    assert!(h.auth.prefetch().await.is_empty());
    assert_eq!(h.idp.jwks_fetch_count(), 2);

    // The IdP now answers without k1 (as Entra's endpoints sometimes do).
    h.idp.set_published_kids(Some(vec![k2.clone()]));
    assert!(h.auth.prefetch().await.is_empty());
    let stranger = h.idp.sign_with_new_key(&h.user());
    assert_eq!(h.reason(&stranger).await, "unknown_kid");
    assert_eq!(h.idp.jwks_fetch_count(), 5);

    let c = h.auth.verify(&signed_by_k1).await.unwrap();
    assert_eq!(c.key_id(), k1);
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
}

#[tokio::test]
async fn background_refresh_picks_up_rotation_without_a_forced_fetch() {
    let h = harness_with(|s| s.jwks_refresh = Duration::from_secs(1)).await;
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let auth = h.auth.clone();
        let cancel = cancel.clone();
        async move { auth.run_refresh(cancel).await }
    });
    h.idp.rotate_async().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(h.idp.jwks_fetch_count() >= 3);
    h.auth.verify(&h.idp.mint(&h.user())).await.unwrap();
    assert_eq!(h.auth.stats().unknown_kid_refetches, 0);
    // The background refresh runs every second: the keys are never older than a few seconds.
    assert!(h.auth.oldest_key_fetch_age().await < Duration::from_secs(2));
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------- validated-token cache (§5)

#[tokio::test]
async fn token_cache_hits_and_never_outlives_exp() {
    let h = harness_with(|s| s.leeway = Duration::ZERO).await;
    let token = h.idp.mint(&h.user().expires_in(2));
    h.auth.verify(&token).await.unwrap();
    h.auth.verify(&token).await.unwrap();
    assert_eq!(h.auth.stats().token_cache_hits, 1);

    tokio::time::sleep(Duration::from_millis(3200)).await;
    let e = h.auth.verify(&token).await.unwrap_err();
    assert_eq!(e.reason(), "token_expired");
    assert_eq!(h.auth.stats().token_cache_hits, 1);
}

#[tokio::test]
async fn token_inside_leeway_is_not_cached() {
    let h = harness().await;
    let token = h.idp.mint(&h.user().expires_in(-5));
    h.auth.verify(&token).await.unwrap();
    h.auth.verify(&token).await.unwrap();
    assert_eq!(h.auth.stats().token_cache_hits, 0);
}

// ---------------------------------------------------------------- setup

#[test]
fn setup_errors() {
    let base = IssuerSettings {
        name: "x".into(),
        authority: "https://login.microsoftonline.com".into(),
        tenants: vec![TENANT.into()],
        accept_versions: vec![TokenVersion::V2],
        audiences: vec!["api://idgate".into()],
        required_scopes: vec![],
        required_app_roles: vec![],
        leeway: Duration::from_secs(60),
        jwks_refetch_floor: Duration::from_secs(300),
        jwks_refresh: Duration::from_secs(3600),
        jwks_max_stale: Duration::from_secs(86400),
        http_timeout: Duration::from_secs(5),
        allow_http: false,
    };
    assert!(Authenticator::new(vec![base.clone()]).is_ok());
    assert!(Authenticator::new(vec![]).is_err());
    let bad = |f: &dyn Fn(&mut IssuerSettings)| {
        let mut s = base.clone();
        f(&mut s);
        Authenticator::new(vec![s]).is_err()
    };
    assert!(bad(
        &|s| s.authority = "http://login.microsoftonline.com".into()
    ));
    assert!(bad(&|s| s.authority = "ftp://127.0.0.1".into()));
    assert!(bad(&|s| s.tenants = vec![TENANT.to_uppercase()]));
    assert!(bad(&|s| s.tenants.clear()));
    assert!(bad(
        &|s| s.audiences = vec!["https://graph.microsoft.com".into()]
    ));
    assert!(bad(&|s| s.audiences.clear()));
    assert!(bad(&|s| s.accept_versions.clear()));
    assert!(bad(&|s| s.leeway = Duration::from_secs(7200)));
    assert!(bad(&|s| s.jwks_refresh = Duration::MAX));
    assert!(bad(&|s| s.jwks_max_stale = Duration::ZERO));
    assert!(bad(
        &|s| s.authority = "https://user:pw@login.microsoftonline.com".into()
    ));
    assert!(!bad(&|s| s.authority = "http://127.0.0.1:1".into()));
    assert!(!bad(&|s| s.authority = "http://[::1]:1/".into()));
    assert!(
        Authenticator::new(vec![base.clone(), base]).is_err(),
        "duplicate name"
    );
}

#[test]
fn token_version_serde() {
    let v: Vec<TokenVersion> = serde_json::from_str(r#"["1.0","2.0","1","v2"]"#).unwrap();
    assert_eq!(
        v,
        [
            TokenVersion::V1,
            TokenVersion::V2,
            TokenVersion::V1,
            TokenVersion::V2
        ]
    );
    assert_eq!(serde_json::to_string(&TokenVersion::V1).unwrap(), "\"1.0\"");
}
