//! Every refusal class: the client gets SQLSTATE 28000 with a non-oracular message, and the audit
//! trail gets the precise reason.

use base64::Engine;
use idgate::{auth::TokenVersion, devidp::TokenSpec};
use serde_json::json;

use crate::harness::{sqlstate, Env, EnvOptions, ALICE, BOB, OTHER_TENANT, TENANT};

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// Try to log in with `token`; return (SQLSTATE, message, audit reason).
async fn refuse(env: &Env, user: &str, token: &str) -> (String, String, String) {
    let since = env.audit_events().len();
    let err = match env.pg_connect(Some(user), token).await {
        Ok(_) => panic!("login unexpectedly succeeded"),
        Err(e) => e,
    };
    let message = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    let reason = env.wait_refusal_reason(since).await;
    (sqlstate(&err), message, reason)
}

#[tokio::test]
async fn every_token_refusal_class_has_its_reason() {
    let env = Env::start().await;
    let idp = &env.idp;
    let user = TokenSpec::user(ALICE);
    let base_header = idp.header_for(&user);
    let base_payload = idp.payload_for(&user);

    let mut rs512_header = base_header.clone();
    rs512_header["alg"] = json!("RS512");
    let hs256 = {
        let key = jsonwebtoken::EncodingKey::from_secret(idp.public_key_pem().as_bytes());
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(idp.current_kid());
        jsonwebtoken::encode(&h, &base_payload, &key).unwrap()
    };
    let alg_none = format!(
        "{}.{}.",
        b64(
            json!({"alg": "none", "typ": "JWT", "kid": idp.current_kid()})
                .to_string()
                .as_bytes()
        ),
        b64(base_payload.to_string().as_bytes())
    );
    let tampered = {
        let good = idp.mint(&user);
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut payload = base_payload.clone();
        payload["upn"] = json!("mallory@contoso.example");
        parts[1] = b64(payload.to_string().as_bytes());
        parts.join(".")
    };
    let duplicate_aud = {
        let header = b64(base_header.to_string().as_bytes());
        let body = base_payload.to_string();
        let body = body.replacen('{', "{\"aud\":\"api://evil\",", 1);
        let unsigned = format!("{header}.{}", b64(body.as_bytes()));
        let signed = idp.sign_raw_bytes(
            base_header.to_string().as_bytes(),
            body.as_bytes(),
            jsonwebtoken::Algorithm::RS256,
        );
        assert!(signed.starts_with(&unsigned[..10]));
        signed
    };

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            idp.mint(&user.clone().expires_in(-300)),
            "token_expired",
        ),
        (
            "not yet valid",
            idp.mint(&user.clone().not_before(600)),
            "token_not_yet_valid",
        ),
        (
            "missing aud",
            idp.mint(&user.clone().without("aud")),
            "missing_claim",
        ),
        (
            "missing iss",
            idp.mint(&user.clone().without("iss")),
            "missing_claim",
        ),
        (
            "wrong audience",
            idp.mint(&user.clone().audience("api://someone-else")),
            "audience_mismatch",
        ),
        (
            "graph audience",
            idp.mint(&user.clone().audience("https://graph.microsoft.com")),
            "first_party_resource",
        ),
        (
            "azure postgres audience",
            idp.mint(
                &user
                    .clone()
                    .audience("https://ossrdbms-aad.database.windows.net"),
            ),
            "first_party_resource",
        ),
        (
            "wrong tenant",
            idp.mint(&user.clone().tenant(OTHER_TENANT)),
            "tenant_not_allowed",
        ),
        (
            "tid/iss mismatch",
            idp.mint(&user.clone().tenant(OTHER_TENANT).claim("tid", TENANT)),
            "tid_iss_mismatch",
        ),
        (
            "upper-case tid",
            idp.mint(&user.clone().claim("tid", TENANT.to_uppercase())),
            "tenant_malformed",
        ),
        ("alg none", alg_none, "alg_not_allowed"),
        ("HS256 with the RSA public key", hs256, "alg_not_allowed"),
        (
            "RS512",
            idp.sign_raw_alg(&rs512_header, &base_payload, jsonwebtoken::Algorithm::RS512),
            "alg_not_allowed",
        ),
        ("unknown kid", idp.sign_with_new_key(&user), "unknown_kid"),
        (
            "malformed kid",
            idp.mint(&user.clone().header("kid", "../../etc/passwd")),
            "kid_malformed",
        ),
        (
            "header nonce (Graph-style)",
            idp.mint(&user.clone().header("nonce", "abc")),
            "header_nonce",
        ),
        (
            "jku header",
            idp.mint(&user.clone().header("jku", "https://evil.example/keys")),
            "forbidden_header",
        ),
        (
            "x5c header",
            idp.mint(&user.clone().header("x5c", json!(["MIIB"]))),
            "forbidden_header",
        ),
        (
            "crit header",
            idp.mint(&user.clone().header("crit", json!(["exp"]))),
            "forbidden_header",
        ),
        (
            "ID token",
            idp.mint(&user.clone().claim("nonce", "n-0S6_WzA2Mj")),
            "id_token",
        ),
        (
            "JWE",
            "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d".to_owned(),
            "jwe_token",
        ),
        (
            "garbage",
            "not a token at all".to_owned(),
            "malformed_token",
        ),
        ("bad signature", tampered, "bad_signature"),
        ("duplicate aud", duplicate_aud, "duplicate_claim"),
        (
            "missing scope",
            idp.mint(&user.clone().scp(Some("User.Read"))),
            "scope_missing",
        ),
        (
            "no scp, no roles",
            idp.mint(&user.clone().scp(None)),
            "no_scope_or_roles",
        ),
        (
            "app without the role",
            idp.mint(&TokenSpec::app(
                "11111111-2222-3333-4444-555555555555",
                &["Other.Role"],
            )),
            "app_role_missing",
        ),
        (
            "v1 with v2 audience form",
            idp.mint(
                &user
                    .clone()
                    .version(TokenVersion::V1)
                    .audience("api://other"),
            ),
            "audience_mismatch",
        ),
    ];
    let mut failures = Vec::new();
    for (name, token, want) in &cases {
        let (code, message, reason) = refuse(&env, ALICE, token).await;
        if code != "28000" || reason != *want {
            failures.push(format!(
                "{name}: got {code} / {reason:?} ({message}), want 28000 / {want:?}"
            ));
        }
        // Never an oracle: the message must not echo the token or say which check failed,
        // except for facts the client can see itself (expiry, wrong resource).
        assert!(
            !message.contains(token.as_str()) || token.len() < 8,
            "{name}: token echoed"
        );
        if !matches!(
            *want,
            "token_expired" | "token_not_yet_valid" | "first_party_resource" | "audience_mismatch"
        ) {
            assert!(
                !message.contains("kid") && !message.contains("signature"),
                "{name}: oracular message {message:?}"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "refusals with the wrong code or reason:\n{}",
        failures.join("\n")
    );
    // The audit detail names the missing claim.
    for claim in ["iss", "aud"] {
        let since = env.audit_events().len();
        let (code, message, reason) =
            refuse(&env, ALICE, &idp.mint(&user.clone().without(claim))).await;
        assert_eq!((code.as_str(), reason.as_str()), ("28000", "missing_claim"));
        assert!(
            !message.contains(claim),
            "{claim}: oracular message {message:?}"
        );
        let refused = env
            .audit_events()
            .into_iter()
            .skip(since)
            .find(|e| e["kind"] == "auth_failed")
            .unwrap();
        let detail = refused["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(&format!("claim {claim} ")),
            "{claim}: {refused}"
        );
    }
    // Expiry is explicit for the client.
    let (_, message, _) = refuse(&env, ALICE, &idp.mint(&user.clone().expires_in(-300))).await;
    assert!(message.contains("expired"), "{message}");
    // Wrong resource says which scope to ask for.
    let (_, message, _) = refuse(
        &env,
        ALICE,
        &idp.mint(&user.clone().audience("https://graph.microsoft.com")),
    )
    .await;
    assert!(message.contains("api://idgate"), "{message}");
    // Inside the leeway is accepted.
    env.pg_connect(Some(ALICE), &idp.mint(&user.clone().expires_in(-20)))
        .await
        .unwrap();
}

#[tokio::test]
async fn oversize_token_and_user_mismatch_and_groups_overage() {
    let env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| c.identity.groups_overage = idgate::config::GroupsOverage::Refuse),
        ..EnvOptions::default()
    })
    .await;
    let huge = "a".repeat(70_000);
    let (code, _, reason) = refuse(&env, ALICE, &huge).await;
    assert_eq!(
        (code.as_str(), reason.as_str()),
        ("28000", "token_too_large")
    );

    let (code, message, reason) = refuse(&env, BOB, &env.token(ALICE)).await;
    assert_eq!(
        (code.as_str(), reason.as_str()),
        ("28000", "client_user_mismatch")
    );
    assert!(message.contains("aad:alice@contoso.example"), "{message}");

    let overage = env.idp.mint(
        &TokenSpec::user(ALICE).claim("_claim_names", json!({"groups": "src1"})).claim(
            "_claim_sources",
            json!({"src1": {"endpoint": "https://graph.windows.net/x/users/y/getMemberObjects"}}),
        ),
    );
    let (code, _, reason) = refuse(&env, ALICE, &overage).await;
    assert_eq!(
        (code.as_str(), reason.as_str()),
        ("28000", "groups_overage")
    );

    // An identity-changing option is refused with 42501 before any backend login.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .port(env.port())
        .dbname("dev")
        .user(ALICE)
        .password(env.token(ALICE));
    cfg.options("-c role=postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*env.client_tls(false)).clone());
    let err = cfg.connect(tls).await.err().unwrap();
    assert_eq!(sqlstate(&err), "42501");
}

#[tokio::test]
async fn groups_overage_can_be_ignored_and_groups_map_to_roles() {
    let env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| {
            c.identity.groups_overage = idgate::config::GroupsOverage::IgnoreGroups
        }),
        ..EnvOptions::default()
    })
    .await;
    let with_group = env.idp.mint(&TokenSpec::user(ALICE).groups(&[
        crate::harness::ANALYSTS_GROUP,
        "ffffffff-0000-4000-8000-000000000000",
    ]));
    env.pg_connect(Some(ALICE), &with_group).await.unwrap();
    let ok = env.wait_event(|e| e["kind"] == "auth_succeeded").await;
    assert_eq!(ok["roles"], json!(["aad:analysts"]));
    let overage = env
        .idp
        .mint(&TokenSpec::user(ALICE).claim("_claim_names", json!({"groups": "src1"})));
    env.pg_connect(Some(ALICE), &overage).await.unwrap();
}
