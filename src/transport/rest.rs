//! REST, with Feathers' routes and status codes: `GET/POST/PATCH/DELETE /:service` and
//! `GET/PUT/PATCH/DELETE /:service/:id`, plus `POST/DELETE /authentication`. Requests
//! authenticate with `Authorization: Bearer <token>`. Errors are Feathers error JSON with
//! status = code.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::Value;

use super::{AppState, ClientAddr, qs};
use crate::auth::{Principal, logout_result};
use crate::error::{Error, ErrorKind};
use crate::service::{Method, ServiceCall};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/authentication", post(login).delete(logout))
        .route("/authentication/{id}", delete(logout))
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

/// The response header that carries a write's transaction id.
const TXID_HEADER: &str = "x-quill-txid";

/// The request's parts every method needs.
struct Request {
    headers: HeaderMap,
    query: Option<String>,
    address: Option<IpAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for Request {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Request {
            headers: parts.headers.clone(),
            query: parts.uri.query().map(str::to_owned),
            address: parts.extensions.get::<ClientAddr>().map(|c| c.0),
        })
    }
}

async fn find(State(s): State<AppState>, Path(service): Path<String>, request: Request) -> Response {
    run(&s, service, Method::Find, None, None, request).await
}

async fn get_one(State(s): State<AppState>, Path((service, id)): Path<(String, String)>, request: Request) -> Response {
    run(&s, service, Method::Get, Some(id), None, request).await
}

async fn create(State(s): State<AppState>, Path(service): Path<String>, request: Request, body: Bytes) -> Response {
    run(&s, service, Method::Create, None, Some(body), request).await
}

async fn update(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    request: Request,
    body: Bytes,
) -> Response {
    run(&s, service, Method::Update, Some(id), Some(body), request).await
}

async fn patch_one(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    request: Request,
    body: Bytes,
) -> Response {
    run(&s, service, Method::Patch, Some(id), Some(body), request).await
}

async fn patch_many(State(s): State<AppState>, Path(service): Path<String>, request: Request, body: Bytes) -> Response {
    run(&s, service, Method::Patch, None, Some(body), request).await
}

async fn remove_one(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    request: Request,
) -> Response {
    run(&s, service, Method::Remove, Some(id), None, request).await
}

async fn remove_many(State(s): State<AppState>, Path(service): Path<String>, request: Request) -> Response {
    run(&s, service, Method::Remove, None, None, request).await
}

/// `POST /authentication`: local or jwt strategy; answers 201 with the token.
async fn login(State(s): State<AppState>, request: Request, body: Bytes) -> Response {
    let data = match parse_body(Some(body)) {
        Ok(Some(data)) => data,
        Ok(None) => return error_response(&Error::bad_request("authentication needs a JSON body")),
        Err(e) => return error_response(&e),
    };
    match s.services.authenticate(&data, request.address).await {
        Ok(auth) => (StatusCode::CREATED, axum::Json(auth.result)).into_response(),
        Err(e) => error_response(&e),
    }
}

/// `DELETE /authentication`: REST is stateless, so this only confirms the token, as
/// Feathers answers a logout with the authentication it ends.
async fn logout(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let Some(token) = bearer(&headers) else {
        return error_response(&Error::new(ErrorKind::NotAuthenticated, "Not authenticated"));
    };
    match s.services.principal(token).await {
        Ok(principal) => axum::Json(logout_result(Some(token), &principal)).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn run(
    state: &AppState,
    service: String,
    method: Method,
    id: Option<String>,
    body: Option<Bytes>,
    request: Request,
) -> Response {
    let call = async {
        let caller = caller(state, &request.headers).await?;
        let query = match request.query.as_deref() {
            Some(q) if !q.is_empty() => qs::decode(q)?,
            _ => Value::Null,
        };
        let data = match body {
            Some(body) => Some(parse_body(Some(body))?.unwrap_or_else(|| Value::Object(Default::default()))),
            None => None,
        };
        state
            .services
            .call(ServiceCall {
                service,
                method,
                id: id.map(Value::String),
                data,
                query,
                caller,
                address: request.address,
            })
            .await
    };
    match call.await {
        Ok(outcome) => {
            let status = if method == Method::Create {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut response = (status, axum::Json(outcome.result)).into_response();
            // The writing transaction, for a client that waits for its write (see `sync`).
            if let Some(txid) = outcome.txid {
                response.headers_mut().insert(TXID_HEADER, txid.into());
            }
            response
        }
        Err(e) => error_response(&e),
    }
}

/// The caller named by `Authorization: Bearer`; a token that does not check out is a 401,
/// never silently anonymous.
async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Option<Arc<Principal>>, Error> {
    match bearer(headers) {
        None => Ok(None),
        Some(token) => Ok(Some(Arc::new(state.services.principal(token).await?))),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// The JSON body, `None` when empty.
fn parse_body(body: Option<Bytes>) -> Result<Option<Value>, Error> {
    match body {
        Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::bad_request(format!("invalid JSON body: {e}"))),
        _ => Ok(None),
    }
}

pub(super) fn error_response(error: &Error) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(error.to_json())).into_response()
}
