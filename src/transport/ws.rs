//! The plain JSON WebSocket protocol at `/ws`: one JSON object per text frame.
//!
//! Calls: `{"ref", "method", "service", "id"?, "data"?, "query"?}` → `{"ref", "result"}` or
//! `{"ref", "error"}`; `subscribe`/`unsubscribe` with optional `kinds`; events
//! `{"event", "service", "data", "seq"}`. The session is generic over a Sink/Stream of
//! [`Inbound`]/[`Outbound`] so that it does not depend on axum.

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;

use super::{AppState, MAX_BODY_BYTES};
use std::sync::Arc;

use tokio::sync::mpsc::Sender;

use crate::change::{self, Replay, ResumeError};
use crate::error::{Error, ErrorKind};
use crate::event::EventKind;
use crate::hub::{self, ConnId, Frame, KindSet};
use crate::pipeline::event_for;
use crate::service::{Method, Service, ServiceCall};

/// Close code for a connection cut off because it did not read fast enough.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code when quill shuts down (RFC 6455 "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// How long a closing session may spend sending what it has queued.
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(3);

/// A frame from the client.
#[derive(Debug)]
pub enum Inbound {
    Text(String),
    Binary,
    Close,
}

/// A frame to the client.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(Frame),
    Close { code: u16, reason: &'static str },
}

pub(super) async fn upgrade(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    ws.max_message_size(MAX_BODY_BYTES)
        .on_upgrade(move |socket| serve_socket(state, socket))
}

async fn serve_socket(state: AppState, socket: WebSocket) {
    let (sink, stream) = socket.split();
    let sink = sink.with(|out: Outbound| async move {
        Ok::<_, axum::Error>(match out {
            // Frames are built from serde_json output, so they are UTF-8.
            Outbound::Text(bytes) => match Utf8Bytes::try_from(bytes) {
                Ok(text) => Message::Text(text),
                Err(_) => Message::Text(Utf8Bytes::from_static("{}")),
            },
            Outbound::Close { code, reason } => Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            })),
        })
    });
    let stream = stream.filter_map(|m| async move {
        match m {
            Ok(Message::Text(t)) => Some(Inbound::Text(t.to_string())),
            Ok(Message::Binary(_)) => Some(Inbound::Binary),
            Ok(Message::Close(_)) | Err(_) => Some(Inbound::Close),
            Ok(Message::Ping(_) | Message::Pong(_)) => None,
        }
    });
    run_session(state, Box::pin(sink), Box::pin(stream)).await;
}

/// Serves one connection until the client leaves, the hub cuts it off or quill shuts down.
pub async fn run_session<Tx, Rx>(state: AppState, mut tx: Tx, mut rx: Rx)
where
    Tx: Sink<Outbound> + Unpin,
    Rx: Stream<Item = Inbound> + Unpin,
{
    let mut member = state.hub.join(state.outgoing_queue);
    let mut calls = JoinSet::new();
    loop {
        tokio::select! {
            reason = member.kick.fired() => {
                let _ = tx.send(Outbound::Close { code: CLOSE_SLOW_CONSUMER, reason }).await;
                break;
            }
            _ = state.shutdown.cancelled() => {
                // Deliver what is already queued, within a bound, then say goodbye.
                let flush = async {
                    while let Ok(frame) = member.frames.try_recv() {
                        if tx.send(Outbound::Text(frame)).await.is_err() {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH, flush).await;
                let _ = tx.send(Outbound::Close { code: CLOSE_GOING_AWAY, reason: "server shutting down" }).await;
                break;
            }
            Some(frame) = member.frames.recv() => {
                if tx.send(Outbound::Text(frame)).await.is_err() {
                    break;
                }
            }
            inbound = rx.next() => match inbound {
                None | Some(Inbound::Close) => break,
                Some(Inbound::Binary) => {
                    let reply = error_frame(&Value::Null, &Error::bad_request("binary frames are not supported; send JSON text"));
                    send_later(&mut calls, &member.replies, reply);
                }
                Some(Inbound::Text(text)) => handle(&state, member.id, &member.replies, &mut calls, &text),
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
}

fn handle(state: &AppState, conn: ConnId, replies: &Sender<Frame>, calls: &mut JoinSet<()>, text: &str) {
    let mut request = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => obj,
        Ok(_) => {
            let e = Error::bad_request("a message must be a JSON object");
            return send_later(calls, replies, error_frame(&Value::Null, &e));
        }
        Err(e) => {
            let e = Error::bad_request(format!("invalid JSON: {e}"));
            return send_later(calls, replies, error_frame(&Value::Null, &e));
        }
    };
    let reference = request.remove("ref").unwrap_or(Value::Null);
    let method = match request.get("method") {
        Some(Value::String(m)) => m.clone(),
        _ => {
            let e = Error::bad_request("'method' must be a string");
            return send_later(calls, replies, error_frame(&reference, &e));
        }
    };
    let service = match request.get("service") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            let e = Error::bad_request("'service' must be a string");
            return send_later(calls, replies, error_frame(&reference, &e));
        }
    };
    let reply = match method.as_str() {
        "subscribe" => match request.get("since") {
            None | Some(Value::Null) => {
                subscribe(state, conn, &service, &request).map(|()| json!({ "subscribed": service }))
            }
            Some(since) => match resume_request(state, &service, &request, since) {
                Ok((service, kinds, since)) => {
                    let task = resume(state.clone(), conn, service, kinds, since, reference, replies.clone());
                    calls.spawn(task);
                    return;
                }
                Err(e) => Err(e),
            },
        },
        "unsubscribe" => {
            state.hub.unsubscribe(conn, &service);
            Ok(json!({ "unsubscribed": service }))
        }
        other => match Method::parse(other) {
            Some(method) => {
                let call = ServiceCall {
                    service,
                    method,
                    id: request.remove("id"),
                    data: request.remove("data"),
                    query: request.remove("query").unwrap_or(Value::Null),
                };
                let services = state.services.clone();
                let replies = replies.clone();
                calls.spawn(async move {
                    let frame = match services.call(call).await {
                        Ok(result) => result_frame(&reference, result),
                        Err(e) => error_frame(&reference, &e),
                    };
                    let _ = replies.send(frame).await;
                });
                return;
            }
            None => Err(Error::bad_request(format!("unknown method '{other}'"))),
        },
    };
    let frame = match reply {
        Ok(result) => result_frame(&reference, result),
        Err(e) => error_frame(&reference, &e),
    };
    send_later(calls, replies, frame);
}

/// Registers the subscription with the hub before the reply is queued, so any change
/// committed after the client reads the reply is delivered.
fn subscribe(state: &AppState, conn: ConnId, service: &str, request: &Map<String, Value>) -> Result<(), Error> {
    let service = find_service(state, service)?;
    let kinds = parse_kinds(request)?;
    state.hub.subscribe(conn, service.name.clone(), kinds);
    Ok(())
}

fn find_service(state: &AppState, name: &str) -> Result<Arc<Service>, Error> {
    state
        .services
        .get(name)
        .cloned()
        .ok_or_else(|| Error::not_found(format!("Service '{name}' not found")))
}

/// Checks a `subscribe` with `since` before anything is registered.
fn resume_request(
    state: &AppState,
    service: &str,
    request: &Map<String, Value>,
    since: &Value,
) -> Result<(Arc<Service>, KindSet, i64), Error> {
    let service = find_service(state, service)?;
    let kinds = parse_kinds(request)?;
    let since = since
        .as_i64()
        .filter(|s| *s >= 0)
        .ok_or_else(|| Error::bad_request("'since' must be the seq of the last event received"))?;
    Ok((service, kinds, since))
}

/// Subscribes from a position: registers (holding live events back), replies, sends every
/// missed event through the same stripping as live ones, then releases the held events.
async fn resume(
    state: AppState,
    conn: ConnId,
    service: Arc<Service>,
    kinds: KindSet,
    since: i64,
    reference: Value,
    replies: Sender<Frame>,
) {
    let pool = state.services.pool().clone();
    let after = match change::locate(&pool, since).await {
        Ok(after) => after,
        Err(e) => {
            let error = match e {
                ResumeError::Gone(_) => Error::new(
                    ErrorKind::Gone,
                    format!("position {since} is older than the retained change log; reload and subscribe again"),
                ),
                ResumeError::Unknown(_) => {
                    Error::bad_request(format!("position {since} is not the seq of a delivered event"))
                }
                ResumeError::Change(e) => {
                    tracing::warn!(error = %e, "cannot locate a resume position");
                    Error::unavailable("the database is unavailable, try again shortly")
                }
            };
            let _ = replies.send(error_frame(&reference, &error)).await;
            return;
        }
    };
    let until = state.hub.subscribe_after(conn, service.name.clone(), kinds, after);
    let reply = json!({ "subscribed": &*service.name, "since": since });
    if replies.send(result_frame(&reference, reply)).await.is_err() {
        return;
    }
    let table = &service.table;
    let replayed = async {
        let mut replay = Replay::new(pool, after, until).await?;
        while let Some(page) = replay.next_page().await? {
            for change in page {
                let ours = change.table_schema == table.schema && change.table_name == table.name;
                if ours && kinds.contains(change.kind) {
                    let frame = hub::encode(&event_for(&change, &service));
                    if replies.send(frame).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        Ok::<(), change::ChangeError>(())
    };
    match replayed.await {
        Ok(()) => state.hub.finish_replay(conn, &service.name),
        Err(e) => {
            tracing::warn!(error = %e, "resume failed");
            state.hub.kick(conn, "resume failed: subscribe again with since");
        }
    }
}

fn parse_kinds(request: &Map<String, Value>) -> Result<KindSet, Error> {
    let kinds = match request.get("kinds") {
        None | Some(Value::Null) => KindSet::ALL,
        Some(Value::Array(items)) => {
            let kinds = items
                .iter()
                .map(|k| {
                    k.as_str().and_then(EventKind::parse).ok_or_else(|| {
                        Error::bad_request(format!(
                            "unknown event kind {k}; use created, updated, patched or removed"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            KindSet::of(&kinds)
        }
        Some(_) => return Err(Error::bad_request("'kinds' must be a list of event names")),
    };
    Ok(kinds)
}

/// Queues a reply without blocking the session loop (which is what drains the queue).
fn send_later(calls: &mut JoinSet<()>, replies: &Sender<Frame>, frame: Frame) {
    let replies = replies.clone();
    calls.spawn(async move {
        let _ = replies.send(frame).await;
    });
}

fn result_frame(reference: &Value, result: Value) -> Frame {
    to_frame(&json!({ "ref": reference, "result": result }))
}

fn error_frame(reference: &Value, error: &Error) -> Frame {
    to_frame(&json!({ "ref": reference, "error": error.to_json() }))
}

fn to_frame(value: &Value) -> Frame {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}
