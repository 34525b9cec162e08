//! JWKS behaviour seen from the outside: rotation, IdP outage, cold-cache storms.

use std::time::Duration;

use idgate::{auth::TokenVersion, devidp::TokenSpec};

use crate::harness::{Env, EnvOptions, ALICE};

/// Only v2 tokens, so every JWKS fetch hits the one v2 endpoint.
fn v2_only() -> EnvOptions {
    EnvOptions {
        tweak: Box::new(|c, _| c.issuers[0].accept_versions = vec![TokenVersion::V2]),
        ..EnvOptions::default()
    }
}

async fn login(env: &Env, token: &str) {
    let client = env
        .pg_connect(Some(ALICE), token)
        .await
        .unwrap_or_else(|e| panic!("login failed: {e}"));
    client.simple_query("SELECT 1").await.unwrap();
}

async fn settle(env: &Env) {
    // Let the startup prefetch finish so counts are stable.
    for _ in 0..100 {
        if env.idp.jwks_fetch_count() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn key_rotation_is_picked_up_by_exactly_one_fetch() {
    let env = Env::with(v2_only()).await;
    login(&env, &env.token(ALICE)).await;
    settle(&env).await;
    let before = env.idp.jwks_fetch_count();
    env.idp.rotate();
    let rotated = env.idp.mint(&TokenSpec::user(ALICE));
    login(&env, &rotated).await;
    assert_eq!(
        env.idp.jwks_fetch_count(),
        before + 1,
        "one refetch for the new kid"
    );
    for _ in 0..5 {
        login(&env, &env.idp.mint(&TokenSpec::user(ALICE))).await;
    }
    assert_eq!(env.idp.jwks_fetch_count(), before + 1, "no further fetches");
}

#[tokio::test]
async fn logins_keep_working_while_the_idp_is_down() {
    let env = Env::with(v2_only()).await;
    login(&env, &env.token(ALICE)).await;
    env.idp.set_unavailable(true);
    for _ in 0..3 {
        login(&env, &env.idp.mint(&TokenSpec::user(ALICE))).await;
    }
    // An unknown kid while the IdP is down is refused, and says the keys are unknown.
    let since = env.audit_events().len();
    assert!(env
        .pg_connect(
            Some(ALICE),
            &env.idp.sign_with_new_key(&TokenSpec::user(ALICE))
        )
        .await
        .is_err());
    let reason = env.wait_refusal_reason(since).await;
    assert!(
        reason == "unknown_kid" || reason == "jwks_unavailable",
        "{reason}"
    );
    env.idp.set_unavailable(false);
    login(&env, &env.idp.mint(&TokenSpec::user(ALICE))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_cold_logins_cause_one_fetch() {
    // The IdP is down while the gateway starts, so its key prefetch fails and the cache stays
    // cold until the first logins.
    let env = Env::with(EnvOptions {
        tweak: Box::new(|c, env0| {
            c.issuers[0].accept_versions = vec![TokenVersion::V2];
            env0.idp.set_unavailable(true);
        }),
        ..EnvOptions::default()
    })
    .await;
    for _ in 0..250 {
        if env.idp.discovery_fetch_count() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(env.idp.discovery_fetch_count() >= 1, "no prefetch attempt");
    env.idp.set_unavailable(false);
    // Past the floor between attempts on a cold source (refetch_floor = 1s in the test config).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(env.idp.jwks_fetch_count(), 0, "the cache is not cold");
    let discovery_before = env.idp.discovery_fetch_count();
    let env = std::sync::Arc::new(env);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let env = env.clone();
        let token = env.idp.mint(&TokenSpec::user(ALICE));
        tasks.push(tokio::spawn(async move {
            let client = env.pg_connect(Some(ALICE), &token).await?;
            client.simple_query("SELECT 1").await.map(|_| ())
        }));
    }
    let mut failures = 0;
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures += 1;
            eprintln!("login failed: {e}");
        }
    }
    assert_eq!(failures, 0);
    assert_eq!(
        env.idp.jwks_fetch_count(),
        1,
        "one JWKS fetch for 200 cold logins"
    );
    assert_eq!(
        env.idp.discovery_fetch_count(),
        discovery_before + 1,
        "one discovery fetch"
    );
}
