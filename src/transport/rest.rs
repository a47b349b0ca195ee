//! REST, with Feathers' routes and status codes: `GET/POST/PATCH/DELETE /:service` and
//! `GET/PUT/PATCH/DELETE /:service/:id`. Errors are Feathers error JSON with status = code.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;

use super::{AppState, qs};
use crate::error::Error;
use crate::service::{Method, ServiceCall};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/{service}",
            get(find).post(create).patch(patch_many).delete(remove_many),
        )
        .route(
            "/{service}/{id}",
            get(get_one).put(update).patch(patch_one).delete(remove_one),
        )
}

pub(super) async fn not_found() -> Response {
    error_response(&Error::not_found("Page not found"))
}

async fn find(State(s): State<AppState>, Path(service): Path<String>, RawQuery(q): RawQuery) -> Response {
    run(&s, service, Method::Find, None, None, q).await
}

async fn get_one(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    run(&s, service, Method::Get, Some(id), None, q).await
}

async fn create(
    State(s): State<AppState>,
    Path(service): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    run(&s, service, Method::Create, None, Some(body), q).await
}

async fn update(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    run(&s, service, Method::Update, Some(id), Some(body), q).await
}

async fn patch_one(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    run(&s, service, Method::Patch, Some(id), Some(body), q).await
}

async fn patch_many(
    State(s): State<AppState>,
    Path(service): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    run(&s, service, Method::Patch, None, Some(body), q).await
}

async fn remove_one(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    run(&s, service, Method::Remove, Some(id), None, q).await
}

async fn remove_many(State(s): State<AppState>, Path(service): Path<String>, RawQuery(q): RawQuery) -> Response {
    run(&s, service, Method::Remove, None, None, q).await
}

async fn run(
    state: &AppState,
    service: String,
    method: Method,
    id: Option<String>,
    body: Option<Bytes>,
    raw_query: Option<String>,
) -> Response {
    let call = match decode(service, method, id, body, raw_query) {
        Ok(call) => call,
        Err(e) => return error_response(&e),
    };
    match state.services.call(call).await {
        Ok(result) => {
            let status = if method == Method::Create {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(result)).into_response()
        }
        Err(e) => error_response(&e),
    }
}

fn decode(
    service: String,
    method: Method,
    id: Option<String>,
    body: Option<Bytes>,
    raw_query: Option<String>,
) -> Result<ServiceCall, Error> {
    let query = match raw_query.as_deref() {
        Some(q) if !q.is_empty() => qs::decode(q)?,
        _ => Value::Null,
    };
    let data = match body {
        Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => {
            Some(serde_json::from_slice(&bytes).map_err(|e| Error::bad_request(format!("invalid JSON body: {e}")))?)
        }
        Some(_) => Some(Value::Object(Default::default())),
        None => None,
    };
    Ok(ServiceCall {
        service,
        method,
        id: id.map(Value::String),
        data,
        query,
    })
}

pub(super) fn error_response(error: &Error) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(error.to_json())).into_response()
}
