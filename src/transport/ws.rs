//! The plain JSON WebSocket protocol at `/ws`: one JSON object per text frame.
//!
//! Calls: `{"ref", "method", "service", "id"?, "data"?, "query"?}` → `{"ref", "result"}` or
//! `{"ref", "error"}`; `subscribe`/`unsubscribe` (with `kinds`, `query`, `since`); login with
//! `create` on `authentication`, logout with `remove`; events
//! `{"event", "service", "data", "seq"}`. The session is generic over a Sink/Stream of
//! [`Inbound`]/[`Outbound`] so that it does not depend on axum.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::response::Response;
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tokio::sync::mpsc::{self, Sender, UnboundedReceiver};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::rest::error_response;
use super::session::{Login, SessionAuth, sleep_until};
use super::{AppState, ClientAddr, MAX_BODY_BYTES};
use crate::auth::Principal;
use crate::change::ResumeError;
use crate::config::Limits;
use crate::error::{Error, ErrorKind};
use crate::event::EventKind;
use crate::event::Position;
use crate::hub::{ConnId, Cutoff, Frame, KindSet, Membership, ReplayId, Subscription};
use crate::resume::{self, ResumeFailed, Start, Subscriber, SyncedFrame};
use crate::service::query::Query;
use crate::service::{Method, Outcome, Service, ServiceCall};
use crate::snapshot::Snapshot;
use crate::sync::{self, SyncFailed};

/// Close code for a connection cut off because it did not read fast enough.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a connection that sent nothing, not even a pong, for the idle timeout.
pub const CLOSE_IDLE: u16 = 4009;
/// Close code when quill cannot vouch for what the connection missed: reload, then subscribe
/// without `since`.
pub const CLOSE_RELOAD: u16 = 4010;
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
    Binary(Bytes),
    /// A ping or pong: the peer is there.
    Heartbeat,
    Close,
}

/// A frame to the client.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(Bytes),
    Ping,
    Close { code: u16, reason: &'static str },
}

pub(super) async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    Extension(ClientAddr(peer)): Extension<ClientAddr>,
) -> Response {
    let permit = match state.connections.admit(Some(peer)) {
        Ok(permit) => permit,
        Err(refused) => {
            state.metrics.connections_refused.inc();
            return error_response(&refused.into());
        }
    };
    // Small buffers: a connection that is idle should cost kilobytes, not tungstenite's
    // default 128 KiB read buffer. Both still grow for large messages.
    ws.max_message_size(MAX_BODY_BYTES)
        .read_buffer_size(2 * 1024)
        .write_buffer_size(16 * 1024)
        .on_upgrade(move |socket| async move {
            serve_socket(state, socket, peer).await;
            drop(permit);
        })
}

async fn serve_socket(state: AppState, socket: WebSocket, peer: IpAddr) {
    let (sink, stream) = socket.split();
    let sink = sink.with(|out: Outbound| async move { Ok::<_, axum::Error>(to_message(out)) });
    let stream = stream.map(inbound);
    run_session(state, Some(peer), Box::pin(sink), Box::pin(stream)).await;
}

/// A frame to write as a WebSocket message.
pub(super) fn to_message(out: Outbound) -> Message {
    match out {
        // Frames are built from serde_json output, so they are UTF-8.
        Outbound::Text(bytes) => match Utf8Bytes::try_from(bytes) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Text(Utf8Bytes::from_static("{}")),
        },
        Outbound::Ping => Message::Ping(Bytes::new()),
        Outbound::Close { code, reason } => Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })),
    }
}

/// A WebSocket message (or read error) as the session sees it.
pub(super) fn inbound(message: Result<Message, axum::Error>) -> Inbound {
    match message {
        Ok(Message::Text(t)) => Inbound::Text(t.to_string()),
        Ok(Message::Binary(b)) => Inbound::Binary(b),
        Ok(Message::Ping(_) | Message::Pong(_)) => Inbound::Heartbeat,
        Ok(Message::Close(_)) | Err(_) => Inbound::Close,
    }
}

/// Serves one connection until the client leaves, the hub cuts it off or quill shuts down.
///
/// Reading (calls) and writing (replies and events) run side by side, so a socket that
/// does not take what is written can never hide a cut-off, a shutdown or the idle timeout:
/// every write has a deadline, and the session ends as soon as either side does.
pub async fn run_session<Tx, Rx>(state: AppState, peer: Option<IpAddr>, mut tx: Tx, mut rx: Rx)
where
    Tx: Sink<Outbound> + Unpin,
    Rx: Stream<Item = Inbound> + Unpin,
{
    let mut member = state.hub.join(state.outgoing_queue);
    let (login_tx, logins) = mpsc::unbounded_channel();
    let session = Session {
        state: &state,
        conn: member.id,
        replies: member.replies.clone(),
        auth: SessionAuth::new(member.id, peer, login_tx),
    };
    let writer = write_frames(state.limits, &state.shutdown, &mut member, &mut tx, &encode);
    let reader = session.read_calls(&mut rx, logins);
    tokio::select! {
        () = writer => {}
        () = reader => {}
    }
}

/// Writes queued frames (and pings) until the connection is cut off or quill shuts down;
/// `encode` makes a frame's text in the connection's protocol (`None`: nothing to write).
/// Every WebSocket protocol quill speaks writes through here.
pub(super) async fn write_frames<Tx>(
    limits: Limits,
    shutdown: &CancellationToken,
    member: &mut Membership,
    tx: &mut Tx,
    encode: &(dyn Fn(Frame) -> Option<Bytes> + Sync),
) where
    Tx: Sink<Outbound> + Unpin,
{
    let (frames, kick) = (&mut member.frames, &member.kick);
    let mut ping = tokio::time::interval_at(Instant::now() + limits.ping_interval(), limits.ping_interval());
    // Made once: a cancellation future registers with a token shared by every connection,
    // and making one per turn would take that token's lock for every write.
    let (kicked, shutdown) = (kick.fired(), shutdown.cancelled());
    tokio::pin!(kicked, shutdown);
    loop {
        let (first, pause) = tokio::select! {
            cutoff = &mut kicked => return close(tx, cutoff, limits.write_timeout()).await,
            _ = &mut shutdown => {
                // Deliver what is already queued, within a bound, then say goodbye.
                let flush = async {
                    while let Ok(frame) = frames.try_recv() {
                        let Some(text) = encode(frame) else { continue };
                        if tx.send(Outbound::Text(text)).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(Outbound::Close { code: CLOSE_GOING_AWAY, reason: "server shutting down" }).await;
                };
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH, flush).await;
                return;
            }
            Some(frame) = frames.recv() => {
                // With a write delay, a change that finds no backlog (less than a batch
                // queued) waits for others to share its write; a backlog, a reply or a ping
                // goes at once.
                let delay = limits.write_delay();
                let holds = !delay.is_zero() && matches!(frame, Frame::Event(_) | Frame::Routed { .. });
                let pause = if holds && frames.len() < BATCH { delay } else { Duration::ZERO };
                match encode(frame) {
                    Some(text) => (Outbound::Text(text), pause),
                    None => continue,
                }
            }
            _ = ping.tick() => (Outbound::Ping, Duration::ZERO),
        };
        // Write what is already queued in one go: one flush (one syscall) for a burst,
        // not one per event.
        let write = async {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            tx.feed(first).await.ok()?;
            for _ in 0..BATCH {
                let Ok(frame) = frames.try_recv() else { break };
                let Some(text) = encode(frame) else { continue };
                tx.feed(Outbound::Text(text)).await.ok()?;
            }
            tx.flush().await.ok()
        };
        let written = tokio::select! {
            written = tokio::time::timeout(limits.write_timeout(), write) => written,
            // Cut off mid-write (the hub gave up on it): what was written stays buffered
            // and the close frame goes behind it.
            cutoff = &mut kicked => return close(tx, cutoff, limits.write_timeout()).await,
            // Shutting down and the socket is not taking frames: do not wait for it.
            _ = &mut shutdown => return,
        };
        match written {
            Ok(Some(())) => {}
            Ok(None) => return, // the socket failed
            Err(_) => {
                member.cut_off(Cutoff::SlowConsumer, "slow consumer: write timed out");
                return;
            }
        }
    }
}

/// Sends the close frame of a cut-off connection, behind whatever is still buffered, if the
/// client takes it within `grace`. The hub no longer offers it anything meanwhile.
async fn close<Tx>(tx: &mut Tx, (cutoff, reason): (Cutoff, &'static str), grace: Duration)
where
    Tx: Sink<Outbound> + Unpin,
{
    let code = match cutoff {
        Cutoff::SlowConsumer => CLOSE_SLOW_CONSUMER,
        Cutoff::Idle => CLOSE_IDLE,
        Cutoff::Reload => CLOSE_RELOAD,
    };
    let _ = tokio::time::timeout(grace, tx.send(Outbound::Close { code, reason })).await;
}

/// The `/ws` text of a queued frame.
fn encode(frame: Frame) -> Option<Bytes> {
    match frame {
        Frame::Text(bytes) => Some(bytes),
        Frame::Event(event) => Some(event.ws.clone()),
        Frame::Logout { reason } => Some(to_bytes(&json!({ "event": "logout", "reason": reason }))),
        // Supabase-style frames: a `/ws` connection joins no topics.
        Frame::Routed { .. } | Frame::Broadcast(_) => None,
    }
}

/// One call counted in a gauge while it lives.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One `/ws` request frame: `{ref, method, service, ...}`.
#[derive(Debug)]
pub struct Request {
    pub reference: Value,
    pub method: String,
    pub service: String,
    /// Everything else (`id`, `data`, `query`, `since`, …).
    pub rest: Map<String, Value>,
}

impl Request {
    /// Decodes a text frame; a bad one gets an error for the reply (with its `ref`, if it
    /// had one). Never panics, whatever the client sends.
    pub fn decode(text: &str) -> Result<Request, Box<(Value, Error)>> {
        let mut request = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(obj)) => obj,
            Ok(_) => {
                return Err(Box::new((
                    Value::Null,
                    Error::bad_request("a message must be a JSON object"),
                )));
            }
            Err(e) => {
                return Err(Box::new((
                    Value::Null,
                    Error::bad_request(format!("invalid JSON: {e}")),
                )));
            }
        };
        let reference = request.remove("ref").unwrap_or(Value::Null);
        match (request.remove("method"), request.remove("service")) {
            (Some(Value::String(method)), Some(Value::String(service))) => Ok(Request {
                reference,
                method,
                service,
                rest: request,
            }),
            _ => Err(Box::new((
                reference,
                Error::bad_request("'method' and 'service' must be strings"),
            ))),
        }
    }
}

/// What a request handler needs of its session.
struct Session<'a> {
    state: &'a AppState,
    conn: ConnId,
    replies: Sender<Frame>,
    auth: SessionAuth,
}

impl Session<'_> {
    /// Reads and runs calls until the client leaves. At most `calls_in_flight` run at once:
    /// past that the socket is not read, so a client that only writes is held back by TCP.
    async fn read_calls<Rx>(&self, rx: &mut Rx, mut logins: UnboundedReceiver<Login>)
    where
        Rx: Stream<Item = Inbound> + Unpin,
    {
        let limits = self.state.limits;
        let mut calls = JoinSet::new();
        let mut expires: Option<Instant> = None;
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                Some(login) = logins.recv() => expires = login.deadline(),
                _ = sleep_until(expires) => {
                    expires = None;
                    self.auth.expire(self.state);
                    let _ = self.replies.try_send(Frame::Logout { reason: "token expired" });
                }
                _ = tokio::time::sleep_until(heard + limits.idle_timeout()) => {
                    self.state.hub.kick(self.conn, Cutoff::Idle, "idle timeout: nothing received from the client");
                    // The writer closes the socket; the session ends with it.
                    return std::future::pending().await;
                }
                inbound = rx.next(), if calls.len() < limits.calls_in_flight => {
                    heard = Instant::now();
                    match inbound {
                        None | Some(Inbound::Close) => return,
                        Some(Inbound::Heartbeat) => {}
                        Some(Inbound::Binary(_)) => {
                            let e = Error::bad_request("binary frames are not supported; send JSON text");
                            self.reply_later(&mut calls, error_frame(&Value::Null, &e));
                        }
                        Some(Inbound::Text(text)) => self.handle(&mut calls, &text),
                    }
                }
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
            }
        }
    }

    fn handle(&self, calls: &mut JoinSet<()>, text: &str) {
        let Request {
            reference,
            method,
            service,
            rest: request,
        } = match Request::decode(text) {
            Ok(request) => request,
            Err(refused) => return self.reply_later(calls, error_frame(&refused.0, &refused.1)),
        };
        let reply = match (method.as_str(), service.as_str()) {
            ("create", "authentication") => return self.login(calls, reference, request),
            ("remove", "authentication") => return self.logout(calls, reference, &request),
            ("subscribe", _) => match self.replaying_request(&service, &request) {
                Ok(None) => self
                    .subscribe(&service, &request)
                    .map(|()| json!({ "subscribed": service })),
                Ok(Some(replaying)) => {
                    // Registered here, in the order of the client's requests: a later
                    // subscribe or unsubscribe of the service supersedes it.
                    let query = replaying.subscription.query.clone();
                    let id = resume::register(&self.state.hub, self.conn, &replaying.service, replaying.subscription);
                    let task = Replaying {
                        state: self.state.clone(),
                        conn: self.conn,
                        service: replaying.service,
                        id,
                        reference,
                        replies: self.replies.clone(),
                    };
                    match replaying.snapshot {
                        true => self.spawn(calls, task.snapshot(query, replaying.since)),
                        false => self.spawn(calls, task.resume(replaying.since.unwrap_or_default())),
                    }
                    return;
                }
                Err(e) => Err(e),
            },
            ("sync", _) => return self.sync(calls, reference, service, &request),
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
            address: self.auth.peer(),
        };
        let services = self.state.services.clone();
        let replies = self.replies.clone();
        self.spawn(calls, async move {
            let frame = match services.call(call).await {
                Ok(Outcome { result, txid: None }) => result_frame(&reference, result),
                // The writing transaction: `sync` with it waits until the write is delivered.
                Ok(Outcome {
                    result,
                    txid: Some(txid),
                }) => Frame::Text(to_bytes(
                    &json!({ "ref": reference, "result": result, "txid": txid.to_string() }),
                )),
                Err(e) => error_frame(&reference, &e),
            };
            let _ = replies.send(frame).await;
        });
    }

    /// `create` on `authentication`: the connection is logged in for channels and calls.
    fn login(&self, calls: &mut JoinSet<()>, reference: Value, mut request: Map<String, Value>) {
        let data = request.remove("data").unwrap_or(Value::Null);
        let (state, auth, replies) = (self.state.clone(), self.auth.clone(), self.replies.clone());
        self.spawn(calls, async move {
            let frame = match auth.login(&state, &data).await {
                Ok(result) => result_frame(&reference, result),
                Err(e) => error_frame(&reference, &e),
            };
            let _ = replies.send(frame).await;
        });
    }

    /// `remove` on `authentication`: answers with the user and leaves every user channel.
    fn logout(&self, calls: &mut JoinSet<()>, reference: Value, request: &Map<String, Value>) {
        let named = request.get("id").cloned().unwrap_or(Value::Null);
        let frame = match self.auth.logout(self.state, &named) {
            Ok(result) => result_frame(&reference, result),
            Err(e) => error_frame(&reference, &e),
        };
        self.reply_later(calls, frame);
    }

    /// Registers the subscription with the hub before the reply is queued, so any change
    /// committed after the client reads the reply is delivered.
    fn subscribe(&self, service: &str, request: &Map<String, Value>) -> Result<(), Error> {
        let service = find_service(self.state, service)?;
        let caller = self.state.hub.principal(self.conn);
        let subscription = parse_subscription(&service, request, caller.as_deref())?;
        self.state.hub.subscribe(self.conn, service.name.clone(), subscription);
        Ok(())
    }

    /// Checks a `subscribe` with `since` or `snapshot` before anything is registered;
    /// `None` for a plain subscribe.
    fn replaying_request(
        &self,
        service: &str,
        request: &Map<String, Value>,
    ) -> Result<Option<ReplayingRequest>, Error> {
        let snapshot = match request.get("snapshot") {
            None | Some(Value::Null | Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(_) => return Err(Error::bad_request("'snapshot' must be true or false")),
        };
        let since = match request.get("since") {
            None | Some(Value::Null) => None,
            Some(since) => Some(
                since
                    .as_i64()
                    .filter(|s| *s >= 0)
                    .ok_or_else(|| Error::bad_request("'since' must be the seq of the last event received"))?,
            ),
        };
        if !snapshot && since.is_none() {
            return Ok(None);
        }
        let service = find_service(self.state, service)?;
        let caller = self.state.hub.principal(self.conn);
        let subscription = parse_subscription(&service, request, caller.as_deref())?;
        if snapshot {
            // The rows themselves: only for a caller that may find them.
            service.check_readable(caller.as_deref(), subscription.query.as_deref())?;
        }
        Ok(Some(ReplayingRequest {
            service,
            subscription,
            since,
            snapshot,
        }))
    }

    /// `sync` with a `txid`: once every change of that transaction has been queued for the
    /// connection's subscription to the service, a `synced` event (then the reply) says so.
    fn sync(&self, calls: &mut JoinSet<()>, reference: Value, service: String, request: &Map<String, Value>) {
        let txid = match request.get("txid") {
            Some(Value::String(s)) => s.parse::<u64>().ok(),
            Some(Value::Number(n)) => n.as_u64(),
            _ => None,
        };
        let Some(txid) = txid else {
            let e = Error::bad_request("'txid' must be the transaction id a write reply gave");
            return self.reply_later(calls, error_frame(&reference, &e));
        };
        let (state, conn, replies) = (self.state.clone(), self.conn, self.replies.clone());
        self.spawn(calls, async move {
            let mark = Frame::Text(to_bytes(
                &json!({ "event": "synced", "service": service, "txid": txid.to_string() }),
            ));
            let pool = state.services.pool();
            let frame = match sync::wait_for(&state.hub, pool, conn, &service, txid, &replies, mark).await {
                Ok(()) => result_frame(&reference, json!({ "synced": service, "txid": txid.to_string() })),
                Err(SyncFailed::Gone) => return,
                Err(e) => error_frame(&reference, &sync_error(e)),
            };
            let _ = replies.send(frame).await;
        });
    }

    /// Queues a reply without blocking the session loop (which is what drains the queue).
    fn reply_later(&self, calls: &mut JoinSet<()>, frame: Frame) {
        let replies = self.replies.clone();
        self.spawn(calls, async move {
            let _ = replies.send(frame).await;
        });
    }

    /// Runs a call beside the session loop, counted in `quill_calls_in_flight` until it
    /// ends or is dropped with the session.
    fn spawn(&self, calls: &mut JoinSet<()>, call: impl Future<Output = ()> + Send + 'static) {
        let in_flight = InFlight::new(self.state.metrics.calls_in_flight.clone());
        calls.spawn(async move {
            let _in_flight = in_flight;
            call.await;
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

/// `kinds` and `query` of a subscribe request. A query may not read columns the caller
/// cannot see in every row.
fn parse_subscription(
    service: &Service,
    request: &Map<String, Value>,
    caller: Option<&Principal>,
) -> Result<Subscription, Error> {
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
            let query = Query::parse(q, &service.table())?;
            service.check_queryable(&query, caller)?;
            // Decided in quill for every event: only what it decides as PostgreSQL would.
            query.check_matchable()?;
            Some(Arc::new(query))
        }
    };
    Ok(Subscription::new(kinds, query).for_caller(caller))
}

/// A checked `subscribe` with `since` or `snapshot`.
struct ReplayingRequest {
    service: Arc<Service>,
    subscription: Subscription,
    since: Option<i64>,
    snapshot: bool,
}

/// A subscription registered as replaying, and what its replay needs.
struct Replaying {
    state: AppState,
    conn: ConnId,
    service: Arc<Service>,
    id: ReplayId,
    reference: Value,
    replies: Sender<Frame>,
}

impl Replaying {
    fn subscriber(&self) -> Subscriber<'_> {
        Subscriber {
            hub: &self.state.hub,
            conn: self.conn,
            service: &self.service,
            replay: self.id,
            frames: &self.replies,
        }
    }

    /// Finds the position, replies, then replays every missed event and hands over to live
    /// delivery.
    async fn resume(self, since: i64) {
        let pool = self.state.services.pool().clone();
        match resume::locate(&pool, since, self.state.limits.max_replay_changes).await {
            Ok(after) => self.replay_after(pool, since, after, None).await,
            Err(e) => self.refuse(resume_error(since, e)).await,
        }
    }

    /// Replies that the subscription resumes from `since`, then replays what came after it.
    async fn replay_after(self, pool: PgPool, since: i64, after: Position, synced: Option<&SyncedFrame>) {
        let reply = json!({ "subscribed": &*self.service.name, "since": since });
        if self.replies.send(result_frame(&self.reference, reply)).await.is_err() {
            return;
        }
        let start = Start {
            after,
            skip: HashSet::new(),
        };
        let replayed = resume::replay(self.subscriber(), pool, start, synced).await;
        self.end(replayed);
    }

    /// A snapshot subscribe: the matching rows, then `synced`, then live events. With
    /// `since`, only what was missed if that position can be resumed, else a fresh snapshot
    /// that says `reset`.
    async fn snapshot(self, query: Option<Arc<Query>>, since: Option<i64>) {
        let pool = self.state.services.pool().clone();
        let name = self.service.name.clone();
        let synced =
            move |seq: i64| Frame::Text(to_bytes(&json!({ "event": "synced", "service": &*name, "seq": seq })));
        let mut reset = false;
        if let Some(since) = since {
            match resume::locate(&pool, since, self.state.limits.max_replay_changes).await {
                Ok(after) => return self.replay_after(pool, since, after, Some(&synced)).await,
                Err(ResumeFailed::Position(ResumeError::Gone(_)) | ResumeFailed::TooFarBehind { .. }) => reset = true,
                Err(e) => return self.refuse(resume_error(since, e)).await,
            }
        }
        // Bounded: each snapshot holds a database connection while it is read.
        let Ok(turn) = self.state.snapshots.clone().acquire_owned().await else {
            return;
        };
        // Replaced while it waited for its turn: read nothing.
        if !self.state.hub.still_replaying(self.conn, &self.service.name, self.id) {
            return;
        }
        let snapshot = match Snapshot::open(&pool, &self.service, query.as_deref()).await {
            Ok(snapshot) => snapshot,
            Err(e) => return self.refuse(resume_error(since.unwrap_or_default(), e)).await,
        };
        let reply = json!({ "subscribed": &*self.service.name, "snapshot": true });
        if self.replies.send(result_frame(&self.reference, reply)).await.is_err() {
            return;
        }
        let service = self.service.name.clone();
        let page = move |rows: Vec<Value>, reset: bool| {
            let mut frame = json!({ "event": "snapshot", "service": &*service, "rows": rows });
            if reset {
                frame["reset"] = Value::Bool(true);
            }
            Frame::Text(to_bytes(&frame))
        };
        let sent = snapshot.send(self.subscriber(), &page, reset).await;
        drop(turn);
        let replayed = match sent {
            Ok(Some(start)) => resume::replay(self.subscriber(), pool, start, Some(&synced)).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.end(replayed);
    }

    /// The replay could not start: the subscription is removed and the client told why.
    async fn refuse(self, e: Error) {
        self.state.hub.cancel_replay(self.conn, &self.service.name, self.id);
        let _ = self.replies.send(error_frame(&self.reference, &e)).await;
    }

    /// After the reply: a replay that failed cuts the connection off, saying what to do.
    fn end(&self, replayed: Result<(), ResumeFailed>) {
        match replayed {
            Ok(()) => {}
            Err(ResumeFailed::Overtaken) => self.state.hub.kick(
                self.conn,
                Cutoff::Reload,
                "the change log was pruned past this resume: reload, then subscribe again",
            ),
            Err(e) => {
                tracing::warn!(error = %e, "resume failed");
                self.state.hub.kick(
                    self.conn,
                    Cutoff::SlowConsumer,
                    "resume failed: subscribe again with since",
                );
            }
        }
    }
}

/// The reply to a `sync` that cannot be answered.
fn sync_error(e: SyncFailed) -> Error {
    match e {
        SyncFailed::Future(_) | SyncFailed::NotSubscribed => Error::bad_request(e.to_string()),
        SyncFailed::Timeout(_) => Error::new(ErrorKind::Timeout, e.to_string()),
        SyncFailed::Gone | SyncFailed::Change(_) => {
            tracing::warn!(error = %e, "cannot wait for a transaction");
            Error::unavailable("the database is unavailable, try again shortly")
        }
    }
}

/// The reply to a resume that cannot start.
fn resume_error(since: i64, e: ResumeFailed) -> Error {
    match e {
        ResumeFailed::Position(ResumeError::Gone(_)) => Error::new(
            ErrorKind::Gone,
            format!("position {since} is older than the retained change log; reload and subscribe again"),
        ),
        ResumeFailed::TooFarBehind { .. } => Error::new(ErrorKind::Gone, format!("{e}; reload and subscribe again")),
        ResumeFailed::Position(ResumeError::Unknown(_)) => {
            Error::bad_request(format!("position {since} is not the seq of a delivered event"))
        }
        ResumeFailed::Lagging(_) => Error::unavailable("this instance is catching up; try again shortly"),
        ResumeFailed::Overtaken => Error::new(ErrorKind::Gone, format!("{e}; reload and subscribe again")),
        ResumeFailed::Read(e) => e,
        ResumeFailed::Position(ResumeError::Change(e)) | ResumeFailed::Change(e) => {
            tracing::warn!(error = %e, "cannot locate a resume position");
            Error::unavailable("the database is unavailable, try again shortly")
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

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::event::RenderedEvent;
    use crate::hub::Hub;

    /// What the writer wrote next, as text, and when.
    async fn next_text(written: &mut futures::channel::mpsc::UnboundedReceiver<Outbound>) -> (Bytes, Instant) {
        loop {
            match written.next().await {
                Some(Outbound::Text(text)) => return (text, Instant::now()),
                Some(_) => continue,
                None => panic!("the writer stopped"),
            }
        }
    }

    // Time is paused and only moves when every task waits for a timer, so "at once" is
    // exact: a reply that waited for the delay would arrive with the clock moved.
    #[tokio::test(start_paused = true)]
    async fn a_write_delay_holds_a_change_but_not_a_reply() {
        let limits = Limits {
            write_delay_ms: 50,
            ..Limits::default()
        };
        let delay = limits.write_delay();
        let hub = Hub::new();
        let mut member = hub.join(16);
        let queue = member.replies.clone();
        let (mut sink, mut written) = futures::channel::mpsc::unbounded::<Outbound>();
        let shutdown = CancellationToken::new();
        let encode = |frame: Frame| match frame {
            Frame::Text(text) => Some(text),
            Frame::Event(event) => Some(event.ws.clone()),
            _ => None,
        };
        let writer = write_frames(limits, &shutdown, &mut member, &mut sink, &encode);
        let checks = async {
            let start = Instant::now();
            queue
                .send(Frame::Text(Bytes::from_static(b"reply")))
                .await
                .expect("queued");
            let (text, at) = next_text(&mut written).await;
            assert_eq!(
                (&*String::from_utf8_lossy(&text), at - start),
                ("reply", Duration::ZERO)
            );

            let change = RenderedEvent {
                service: Arc::from("messages"),
                kind: EventKind::Created,
                seq: 1,
                data: Bytes::from_static(b"{}"),
                ws: Bytes::from_static(b"change"),
                socketio: OnceLock::new(),
            };
            let queued_at = Instant::now();
            queue.send(Frame::Event(Arc::new(change))).await.expect("queued");
            let (text, at) = next_text(&mut written).await;
            assert_eq!(String::from_utf8_lossy(&text), "change");
            assert!(
                at - queued_at >= delay,
                "the change went out after {:?}",
                at - queued_at
            );
        };
        tokio::select! {
            () = writer => panic!("the writer stopped"),
            () = checks => {}
        }
    }
}
