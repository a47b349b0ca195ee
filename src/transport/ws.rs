//! The plain JSON WebSocket protocol at `/ws`: one JSON object per text frame.
//!
//! Calls: `{"ref", "method", "service", "id"?, "data"?, "query"?}` → `{"ref", "result"}` or
//! `{"ref", "error"}`; `subscribe`/`unsubscribe` (with `kinds`, `query`, `since`); login with
//! `create` on `authentication`, logout with `remove`; events
//! `{"event", "service", "data", "seq"}`. The session is generic over a Sink/Stream of
//! [`Inbound`]/[`Outbound`] so that it does not depend on axum.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{self, Sender, UnboundedSender};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::session::{Login, sleep_until};
use super::{AppState, MAX_BODY_BYTES};
use crate::change::{self, Replay, ResumeError};
use crate::error::{Error, ErrorKind};
use crate::event::EventKind;
use crate::hub::{ConnId, Frame, KindSet, Subscription};
use crate::pipeline::event_for;
use crate::service::query::Query;
use crate::service::{Method, Service, ServiceCall};

/// Close code for a connection cut off because it did not read fast enough.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code when quill shuts down (RFC 6455 "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Frames written per flush at most.
const BATCH: usize = 64;
/// How long a closing session may spend sending what it has queued.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

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
    Text(Bytes),
    Close { code: u16, reason: &'static str },
}

pub(super) async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    // Small buffers: a connection that is idle should cost kilobytes, not tungstenite's
    // default 128 KiB read buffer. Both still grow for large messages.
    ws.max_message_size(MAX_BODY_BYTES)
        .read_buffer_size(2 * 1024)
        .write_buffer_size(16 * 1024)
        .on_upgrade(move |socket| serve_socket(state, socket, peer.ip()))
}

async fn serve_socket(state: AppState, socket: WebSocket, peer: IpAddr) {
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
    run_session(state, Some(peer), Box::pin(sink), Box::pin(stream)).await;
}

/// Serves one connection until the client leaves, the hub cuts it off or quill shuts down.
pub async fn run_session<Tx, Rx>(state: AppState, peer: Option<IpAddr>, mut tx: Tx, mut rx: Rx)
where
    Tx: Sink<Outbound> + Unpin,
    Rx: Stream<Item = Inbound> + Unpin,
{
    let mut member = state.hub.join(state.outgoing_queue);
    let mut calls = JoinSet::new();
    let (login_tx, mut logins) = mpsc::unbounded_channel();
    let mut expires: Option<Instant> = None;
    let session = Session {
        state: &state,
        conn: member.id,
        peer,
        replies: member.replies.clone(),
        logins: login_tx,
    };
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
                        if tx.send(Outbound::Text(encode(frame))).await.is_err() {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH, flush).await;
                let _ = tx.send(Outbound::Close { code: CLOSE_GOING_AWAY, reason: "server shutting down" }).await;
                break;
            }
            Some(frame) = member.frames.recv() => {
                // Write what is already queued in one go: one flush (one syscall) for a
                // burst, not one per event.
                let mut sent = tx.feed(Outbound::Text(encode(frame))).await.is_ok();
                for _ in 0..BATCH {
                    let Ok(frame) = member.frames.try_recv() else { break };
                    sent = sent && tx.feed(Outbound::Text(encode(frame))).await.is_ok();
                }
                if !sent || tx.flush().await.is_err() {
                    break;
                }
            }
            Some(login) = logins.recv() => expires = login.deadline(),
            _ = sleep_until(expires) => {
                expires = None;
                state.hub.logout(member.id);
                let _ = member.replies.try_send(Frame::Logout { reason: "token expired" });
            }
            inbound = rx.next() => match inbound {
                None | Some(Inbound::Close) => break,
                Some(Inbound::Binary) => {
                    let e = Error::bad_request("binary frames are not supported; send JSON text");
                    session.reply_later(&mut calls, error_frame(&Value::Null, &e));
                }
                Some(Inbound::Text(text)) => session.handle(&mut calls, &text),
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
}

/// The `/ws` text of a queued frame.
fn encode(frame: Frame) -> Bytes {
    match frame {
        Frame::Text(bytes) => bytes,
        Frame::Event(event) => event.ws.clone(),
        Frame::Logout { reason } => to_bytes(&json!({ "event": "logout", "reason": reason })),
    }
}

/// What a request handler needs of its session.
struct Session<'a> {
    state: &'a AppState,
    conn: ConnId,
    peer: Option<IpAddr>,
    replies: Sender<Frame>,
    logins: UnboundedSender<Login>,
}

impl Session<'_> {
    fn handle(&self, calls: &mut JoinSet<()>, text: &str) {
        let mut request = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(obj)) => obj,
            Ok(_) => {
                return self.reply_later(
                    calls,
                    error_frame(&Value::Null, &Error::bad_request("a message must be a JSON object")),
                );
            }
            Err(e) => {
                let e = Error::bad_request(format!("invalid JSON: {e}"));
                return self.reply_later(calls, error_frame(&Value::Null, &e));
            }
        };
        let reference = request.remove("ref").unwrap_or(Value::Null);
        let (Some(Value::String(method)), Some(Value::String(service))) =
            (request.remove("method"), request.remove("service"))
        else {
            let e = Error::bad_request("'method' and 'service' must be strings");
            return self.reply_later(calls, error_frame(&reference, &e));
        };
        let reply = match (method.as_str(), service.as_str()) {
            ("create", "authentication") => return self.login(calls, reference, request),
            ("remove", "authentication") => return self.logout(calls, reference),
            ("subscribe", _) => match request.get("since").cloned() {
                None | Some(Value::Null) => self
                    .subscribe(&service, &request)
                    .map(|()| json!({ "subscribed": service })),
                Some(since) => match self.resume_request(&service, &request, &since) {
                    Ok((service, subscription, since)) => {
                        calls.spawn(resume(
                            self.state.clone(),
                            self.conn,
                            service,
                            subscription,
                            since,
                            reference,
                            self.replies.clone(),
                        ));
                        return;
                    }
                    Err(e) => Err(e),
                },
            },
            ("unsubscribe", _) => {
                self.state.hub.unsubscribe(self.conn, &service);
                Ok(json!({ "unsubscribed": service }))
            }
            (other, _) => match Method::parse(other) {
                Some(method) => return self.call(calls, reference, method, service, request),
                None => Err(Error::bad_request(format!("unknown method '{other}'"))),
            },
        };
        let frame = match reply {
            Ok(result) => result_frame(&reference, result),
            Err(e) => error_frame(&reference, &e),
        };
        self.reply_later(calls, frame);
    }

    fn call(
        &self,
        calls: &mut JoinSet<()>,
        reference: Value,
        method: Method,
        service: String,
        mut request: Map<String, Value>,
    ) {
        let call = ServiceCall {
            service,
            method,
            id: request.remove("id"),
            data: request.remove("data"),
            query: request.remove("query").unwrap_or(Value::Null),
            caller: self.state.hub.principal(self.conn),
        };
        let services = self.state.services.clone();
        let replies = self.replies.clone();
        calls.spawn(async move {
            let frame = match services.call(call).await {
                Ok(result) => result_frame(&reference, result),
                Err(e) => error_frame(&reference, &e),
            };
            let _ = replies.send(frame).await;
        });
    }

    /// `create` on `authentication`: the connection is logged in for channels and calls.
    fn login(&self, calls: &mut JoinSet<()>, reference: Value, mut request: Map<String, Value>) {
        let data = request.remove("data").unwrap_or(Value::Null);
        let (state, conn, peer, replies, logins) = (
            self.state.clone(),
            self.conn,
            self.peer,
            self.replies.clone(),
            self.logins.clone(),
        );
        calls.spawn(async move {
            let frame = match state.services.authenticate(&data, peer).await {
                Ok(auth) => {
                    let expires_at = auth.principal.expires_at;
                    state.hub.login(conn, auth.principal);
                    let _ = logins.send(Login::In { expires_at });
                    result_frame(&reference, auth.result)
                }
                Err(e) => error_frame(&reference, &e),
            };
            let _ = replies.send(frame).await;
        });
    }

    /// `remove` on `authentication`: answers with the user and leaves every user channel.
    fn logout(&self, calls: &mut JoinSet<()>, reference: Value) {
        let frame = match self.state.hub.principal(self.conn) {
            Some(principal) => {
                self.state.hub.logout(self.conn);
                let _ = self.logins.send(Login::Out);
                result_frame(
                    &reference,
                    json!({ "authentication": { "strategy": "jwt" }, "user": principal.user }),
                )
            }
            None => error_frame(
                &reference,
                &Error::new(ErrorKind::NotAuthenticated, "Not authenticated"),
            ),
        };
        self.reply_later(calls, frame);
    }

    /// Registers the subscription with the hub before the reply is queued, so any change
    /// committed after the client reads the reply is delivered.
    fn subscribe(&self, service: &str, request: &Map<String, Value>) -> Result<(), Error> {
        let service = find_service(self.state, service)?;
        let subscription = parse_subscription(&service, request)?;
        self.state.hub.subscribe(self.conn, service.name.clone(), subscription);
        Ok(())
    }

    /// Checks a `subscribe` with `since` before anything is registered.
    fn resume_request(
        &self,
        service: &str,
        request: &Map<String, Value>,
        since: &Value,
    ) -> Result<(Arc<Service>, Subscription, i64), Error> {
        let service = find_service(self.state, service)?;
        let subscription = parse_subscription(&service, request)?;
        let since = since
            .as_i64()
            .filter(|s| *s >= 0)
            .ok_or_else(|| Error::bad_request("'since' must be the seq of the last event received"))?;
        Ok((service, subscription, since))
    }

    /// Queues a reply without blocking the session loop (which is what drains the queue).
    fn reply_later(&self, calls: &mut JoinSet<()>, frame: Frame) {
        let replies = self.replies.clone();
        calls.spawn(async move {
            let _ = replies.send(frame).await;
        });
    }
}

fn find_service(state: &AppState, name: &str) -> Result<Arc<Service>, Error> {
    state
        .services
        .get(name)
        .cloned()
        .ok_or_else(|| Error::not_found(format!("Service '{name}' not found")))
}

/// `kinds` and `query` of a subscribe request. A query may not read hidden columns.
fn parse_subscription(service: &Service, request: &Map<String, Value>) -> Result<Subscription, Error> {
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
    let query = match request.get("query") {
        None | Some(Value::Null) => None,
        Some(q) => {
            let query = Query::parse(q, &service.table)?;
            service.check_queryable(&query)?;
            Some(Arc::new(query))
        }
    };
    Ok(Subscription::new(kinds, query))
}

/// Subscribes from a position: registers (holding live events back), replies, sends every
/// missed event through the same channels, filters and stripping as live ones, then
/// releases the held events.
async fn resume(
    state: AppState,
    conn: ConnId,
    service: Arc<Service>,
    subscription: Subscription,
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
    let until = state
        .hub
        .subscribe_after(conn, service.name.clone(), subscription, after);
    let reply = json!({ "subscribed": &*service.name, "since": since });
    if replies.send(result_frame(&reference, reply)).await.is_err() {
        return;
    }
    let table = &service.table;
    let replayed = async {
        let mut replay = Replay::new(pool, after, until).await?;
        while let Some(page) = replay.next_page().await? {
            for change in page {
                if change.table_schema != table.schema || change.table_name != table.name {
                    continue;
                }
                let event = event_for(&change, &service);
                let frame = state.hub.replay_frame(conn, &mut service.policy.prepare(&event));
                if let Some(frame) = frame
                    && replies.send(frame).await.is_err()
                {
                    return Ok(());
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

fn result_frame(reference: &Value, result: Value) -> Frame {
    Frame::Text(to_bytes(&json!({ "ref": reference, "result": result })))
}

fn error_frame(reference: &Value, error: &Error) -> Frame {
    Frame::Text(to_bytes(&json!({ "ref": reference, "error": error.to_json() })))
}

fn to_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}
