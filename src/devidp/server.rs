//! HTTP routes of the dev IdP (axum): discovery, key sets, token endpoint, admin rotation.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::json;

use super::{DevIdp, TokenSpec};
use crate::auth::TokenVersion;

pub(super) fn router(idp: DevIdp) -> Router {
    Router::new()
        .route(
            "/{tenant}/.well-known/openid-configuration",
            get(discovery_v1),
        )
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(discovery_v2),
        )
        .route("/{tenant}/discovery/keys", get(keys_v1))
        .route("/{tenant}/discovery/v2.0/keys", get(keys_v2))
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        // v1 path, same (v2-style, scope-based) semantics; for clients that use it.
        .route("/{tenant}/oauth2/token", post(token))
        .route("/admin/rotate", post(rotate))
        .with_state(idp)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

fn unknown_tenant() -> Response {
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_tenant",
        "AADSTS90002: Tenant not found.",
    )
}

fn unavailable() -> Response {
    oauth_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "dev IdP is switched off",
    )
}

async fn discovery(idp: DevIdp, tenant: String, version: TokenVersion) -> Response {
    idp.inner.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    if idp.is_unavailable() {
        return unavailable();
    }
    if tenant != idp.tenant() {
        return unknown_tenant();
    }
    Json(idp.discovery_doc(version)).into_response()
}

async fn discovery_v1(State(idp): State<DevIdp>, Path(tenant): Path<String>) -> Response {
    discovery(idp, tenant, TokenVersion::V1).await
}

async fn discovery_v2(State(idp): State<DevIdp>, Path(tenant): Path<String>) -> Response {
    discovery(idp, tenant, TokenVersion::V2).await
}

async fn keys(idp: DevIdp, tenant: String, version: TokenVersion) -> Response {
    idp.inner.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    if idp.is_unavailable() {
        return unavailable();
    }
    if tenant != idp.tenant() {
        return unknown_tenant();
    }
    Json(idp.jwks_doc(version)).into_response()
}

async fn keys_v1(State(idp): State<DevIdp>, Path(tenant): Path<String>) -> Response {
    keys(idp, tenant, TokenVersion::V1).await
}

async fn keys_v2(State(idp): State<DevIdp>, Path(tenant): Path<String>) -> Response {
    keys(idp, tenant, TokenVersion::V2).await
}

fn parse_version(v: Option<&String>) -> Option<Option<TokenVersion>> {
    match v.map(String::as_str) {
        None => Some(None),
        Some("1" | "1.0" | "v1") => Some(Some(TokenVersion::V1)),
        Some("2" | "2.0" | "v2") => Some(Some(TokenVersion::V2)),
        Some(_) => None,
    }
}

async fn token(
    State(idp): State<DevIdp>,
    Path(tenant): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if tenant != idp.tenant() {
        return unknown_tenant();
    }
    let s = idp.settings();
    let version = match (
        parse_version(form.get("token_version")),
        parse_version(query.get("ver")),
    ) {
        (Some(Some(v)), _) | (Some(None), Some(Some(v))) => v,
        (Some(None), Some(None)) => s.default_version,
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "token_version must be 1 or 2",
            )
        }
    };
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    let scopes: Vec<&str> = field("scope").split_whitespace().collect();
    let resources = [s.app_id_uri.as_str(), s.app_guid.as_str()];
    let asks_for = |suffix: &str| {
        scopes.iter().any(|sc| {
            resources
                .iter()
                .any(|r| sc.strip_prefix(r).and_then(|x| x.strip_prefix('/')) == Some(suffix))
        })
    };
    let spec = match field("grant_type") {
        "password" => {
            if field("client_id").is_empty() || field("username").is_empty() {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "AADSTS900144: client_id and username are required.",
                );
            }
            let Some(user) = s
                .users
                .iter()
                .find(|u| u.upn.eq_ignore_ascii_case(field("username")))
                .filter(|u| u.password == field("password"))
            else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "AADSTS50126: Error validating credentials due to invalid username or password.",
                );
            };
            if !asks_for(&s.scope) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    "AADSTS70011: The provided value for the input parameter 'scope' is not valid.",
                );
            }
            TokenSpec::user(&user.upn)
                .version(version)
                .oid(&user.oid)
                .scp(Some(&s.scope))
                .lifetime(s.token_lifetime)
                .client_app_id(field("client_id"))
                .groups(&user.groups.iter().map(String::as_str).collect::<Vec<_>>())
        }
        "client_credentials" => {
            let Some(client) = s.clients.iter().find(|c| c.client_id == field("client_id")) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unauthorized_client",
                    "AADSTS700016: Application not found in the directory.",
                );
            };
            if client.secret != field("client_secret") {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "AADSTS7000215: Invalid client secret provided.",
                );
            }
            if !asks_for(".default") {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    "AADSTS1002012: The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
                );
            }
            let roles: Vec<&str> = client.roles.iter().map(String::as_str).collect();
            TokenSpec::app(&client.client_id, &roles)
                .version(version)
                .lifetime(s.token_lifetime)
        }
        "" => return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'grant_type'.",
        ),
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "AADSTS70003: The app requested an unsupported grant type.",
            )
        }
    };
    let access_token = idp.mint(&spec);
    Json(json!({
        "token_type": "Bearer",
        "expires_in": s.token_lifetime.as_secs(),
        "ext_expires_in": s.token_lifetime.as_secs(),
        "access_token": access_token,
    }))
    .into_response()
}

async fn rotate(State(idp): State<DevIdp>) -> Response {
    match idp.rotate_async().await {
        Ok(kid) => Json(json!({ "kid": kid })).into_response(),
        Err(e) => oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &e.to_string(),
        ),
    }
}
