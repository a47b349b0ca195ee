//! Transports: REST, the plain JSON WebSocket (`/ws`), and the health endpoints. Each
//! decodes a call into a [`crate::service::ServiceCall`]; none builds SQL or error JSON.

mod qs;
mod rest;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::change::ListenerHealth;
use crate::hub::Hub;
use crate::service::Services;

/// The largest request body or WebSocket frame accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// What every request handler needs.
#[derive(Clone)]
pub struct AppState {
    pub services: Arc<Services>,
    pub hub: Arc<Hub>,
    pub listener: Arc<ListenerHealth>,
    pub outgoing_queue: usize,
    pub shutdown: CancellationToken,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/ws", get(ws::upgrade))
        .merge(rest::routes())
        .fallback(rest::not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::cors::CorsLayer::permissive())
        .with_state(state)
}

/// The process is up.
async fn health() -> &'static str {
    "ok"
}

/// The database and the change listener are connected.
async fn ready(State(state): State<AppState>) -> Response {
    let listening = state.listener.connected.load(Ordering::Relaxed);
    let database = sqlx::query("SELECT 1").execute(state.services.pool()).await.is_ok();
    if listening && database {
        "ready".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: database or change listener disconnected",
        )
            .into_response()
    }
}
