//! The example pages of the Feathers real-time guide, with the client JavaScript they need
//! built into the binary (from the `@feathersjs/client` 5.0.50 and `socket.io-client`
//! 4.8.4 npm packages, and quill's own client from `clients/js`), so they work on closed
//! networks.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/listener.html",
            get(|| serve(HTML, include_str!("pages/listener.html"))),
        )
        .route(
            "/socketio.html",
            get(|| serve(HTML, include_str!("pages/socketio.html"))),
        )
        .route("/replica.html", get(|| serve(HTML, include_str!("pages/replica.html"))))
        .route(
            "/vendor/quill-client.js",
            get(|| serve(JS, include_str!("pages/vendor/quill-client.js"))),
        )
        .route(
            "/vendor/feathers.min.js",
            get(|| serve(JS, include_str!("pages/vendor/feathers.min.js"))),
        )
        .route(
            "/vendor/socket.io.min.js",
            get(|| serve(JS, include_str!("pages/vendor/socket.io.min.js"))),
        )
}

async fn serve(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
}
