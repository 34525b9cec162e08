//! The admin HTTP API (its own listener; optional bearer token):
//! `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /pools`,
//! `POST /targets/{pool}/{target}/drain`, `POST /targets/{pool}/{target}/undrain`, `POST /reload`.

use std::sync::Arc;

use axum::{
    extract::{Path, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{audit::EventKind, gateway::Gateway};

/// Serve the admin API on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, cancel: CancellationToken) {
    let app = router(gw);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// The admin routes (exposed for tests).
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/pools", get(pools))
        .route("/targets/{pool}/{target}/drain", post(drain))
        .route("/targets/{pool}/{target}/undrain", post(undrain))
        .route("/reload", post(reload))
        .layer(middleware::from_fn_with_state(gw.clone(), bearer))
        .with_state(gw)
}

async fn bearer(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let snapshot = gw.snapshot();
    if let Some(token) = &snapshot.config.admin.bearer_token {
        let sent = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !bool::from(sent.as_bytes().ct_eq(token.expose().as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                "admin API: missing or wrong bearer token\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let body = gw.metrics.render(&gw.snapshot(), &gw.audit.stats()).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn pools(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let snapshot = gw.snapshot();
    let pools: Vec<serde_json::Value> = snapshot
        .pools
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.config.name,
                "kind": p.config.kind,
                "healthy_targets": p.healthy_targets(),
                "targets": p.targets.iter().map(|t| serde_json::json!({
                    "addr": t.config.addr,
                    "weight": t.config.weight,
                    "health": t.state.health(),
                    "draining": t.state.draining(),
                    "active_sessions": t.state.active(),
                    "sessions_total": t.state.sessions_total(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(serde_json::json!({ "pools": pools }))
}

async fn drain(
    State(gw): State<Arc<Gateway>>,
    Path((pool, target)): Path<(String, String)>,
) -> Response {
    set_drain(&gw, &pool, &target, true)
}

async fn undrain(
    State(gw): State<Arc<Gateway>>,
    Path((pool, target)): Path<(String, String)>,
) -> Response {
    set_drain(&gw, &pool, &target, false)
}

fn set_drain(gw: &Gateway, pool: &str, target: &str, draining: bool) -> Response {
    let snapshot = gw.snapshot();
    let Some(t) = snapshot
        .pools
        .iter()
        .find(|p| p.config.name == pool)
        .and_then(|p| p.target(target))
    else {
        return (
            StatusCode::NOT_FOUND,
            format!("no target {target} in pool {pool}\n"),
        )
            .into_response();
    };
    t.state.set_draining(draining);
    tracing::info!(pool, target, draining, "target drain state changed");
    let facts = crate::audit::SessionFacts {
        pool: Some(pool.to_owned()),
        target: Some(target.to_owned()),
        ..Default::default()
    };
    let mut e = crate::audit::system_event(EventKind::TargetDrainChanged, &facts);
    e.detail = Some(if draining { "draining" } else { "undrained" }.to_owned());
    gw.audit.record(e);
    Json(serde_json::json!({ "pool": pool, "target": target, "draining": draining, "active_sessions": t.state.active() }))
        .into_response()
}

async fn reload(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.reload().await {
        Ok(report) => Json(report).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("reload refused, running configuration unchanged:\n{e}"),
        )
            .into_response(),
    }
}
