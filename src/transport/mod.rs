//! Transports: REST, the plain JSON WebSocket (`/ws`), and the health endpoints. Each
//! decodes a call into a [`crate::service::ServiceCall`]; none builds SQL or error JSON.

mod client_addr;
mod http;
pub mod limits;
pub mod openapi;
mod pages;
mod phoenix;
pub mod qs;
mod rest;
mod session;
mod socketio;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::service::Services;
pub use client_addr::{ClientAddr, TrustedProxies};
pub use http::serve;
use limits::ConnectionLimiter;
pub use socketio::CallArgs;

/// The largest request body or WebSocket frame accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// What every request handler needs.
#[derive(Clone)]
pub struct AppState {
    pub services: Arc<Services>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub outgoing_queue: usize,
    pub slow_consumer_timeout: std::time::Duration,
    pub limits: Limits,
    pub connections: Arc<ConnectionLimiter>,
    /// Turns for snapshot reads (`limits.snapshots_in_flight`).
    pub snapshots: Arc<tokio::sync::Semaphore>,
    /// `[cluster]`: events come from NATS, and only the publisher listens.
    pub clustered: bool,
    pub shutdown: CancellationToken,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/ws", get(ws::upgrade))
        .merge(pages::routes())
        .merge(phoenix::routes())
        .merge(rest::routes())
        .fallback(rest::not_found)
        // After every route and the fallback, so that /socket.io/ requests reach it.
        .layer(socketio::layer(state.clone()))
        // Before socketioxide, which keeps each socket's request head.
        .layer(axum::middleware::map_request(socketio::detach_head))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::cors::CorsLayer::permissive())
        .with_state(state)
}

/// How long `/ready` stays not ready after a gap in the change log, so that monitoring sees
/// it even if it polls slowly.
const GAP_UNREADY_SECONDS: u64 = 60;

/// The process is up.
async fn health() -> &'static str {
    "ok"
}

/// Ready when the database answers, the LISTEN connection is up and the change reader
/// reads without errors (after an outage it has caught up when this turns ready again).
/// In a cluster: NATS instead of LISTEN on every instance but the publisher.
async fn ready(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    let listening = m.listener_connected.get() == 1 || (state.clustered && m.cluster_publisher.get() == 0);
    if state.clustered && m.nats_connected.get() != 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: NATS unreachable (calls work; events resume when it is back)",
        )
            .into_response();
    }
    let reading = state.metrics.reader_up.get() == 1;
    // On the pool service calls use: the one whose health a caller sees.
    let probe = state.services.ping_database();
    let database = tokio::time::timeout(std::time::Duration::from_secs(2), probe)
        .await
        .is_ok_and(|r| r.is_ok());
    let unready = |why: &'static str| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last_gap = u64::try_from(state.metrics.last_gap_unix.get()).unwrap_or(0);
    if last_gap > 0 && now.saturating_sub(last_gap) < GAP_UNREADY_SECONDS {
        return unready("not ready: the change log had a gap, events were lost (see quill_change_log_gaps_total)");
    }
    match (database, listening, reading) {
        (true, true, true) => "ready".into_response(),
        (false, _, _) => unready("not ready: database unreachable"),
        (_, false, _) => unready("not ready: change listener disconnected"),
        (_, _, false) => unready("not ready: change reader failing"),
    }
}

/// Prometheus text exposition.
async fn metrics(State(state): State<AppState>) -> Response {
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    (
        [(axum::http::header::CONTENT_TYPE, content_type)],
        state.metrics.render(),
    )
        .into_response()
}
