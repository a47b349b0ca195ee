//! The FeathersJS socket protocol on socket.io (protocol v5, Engine.IO v4) at `/socket.io/`,
//! as `@feathersjs/socketio-client` and `@feathersjs/authentication-client` 5.x speak it.
//!
//! Calls arrive as `emit(method, path, ...args, ack)` and are answered through the ack as
//! `(error)` or `(null, result)`. A socket is subscribed to every service, as in Feathers;
//! its channels decide what it receives, as `"<path> <event>"` with one data argument.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::Event;
use socketioxide::handler::{ConnectHandler, FromMessageParts, Value as SioValue};
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::Socket;
use socketioxide_core::Str;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_util::sync::CancellationToken;

pub(super) use self::adapter::FeathersAdapter;
use self::adapter::{AdapterHandle, SendFailure};
pub(super) use self::head::detach_head;
use super::session::{Login, SessionAuth};
use super::{AppState, ClientAddr, MAX_BODY_BYTES};
use crate::error::{Error, Result};
use crate::event::RenderedEvent;
use crate::hub::{ConnId, Frame, Membership};
use crate::service::{Method, ServiceCall};

mod adapter;
mod head;

/// The most frames sent per turn of a socket's forwarding loop.
const BATCH: usize = 64;

// socketioxide's extractors, over quill's adapter.
type SocketRef = socketioxide::extract::SocketRef<FeathersAdapter>;
type AckSender = socketioxide::extract::AckSender<FeathersAdapter>;

/// The socket.io layer, with the Feathers namespace registered.
pub(super) fn layer(state: AppState) -> SocketIoLayer<FeathersAdapter> {
    let limits = state.limits;
    let sockets = AdapterHandle::default();
    let (layer, io) = SocketIo::builder()
        .with_adapter::<FeathersAdapter>(sockets.clone())
        .max_payload(MAX_BODY_BYTES as u64)
        .max_buffer_size(state.outgoing_queue.max(128))
        // As `/ws`'s: an idle connection should cost kilobytes; it grows for large messages.
        .ws_read_buffer_size(2 * 1024)
        // A vanished peer is dropped after one missed ping; a socket that never joins the
        // namespace after the handshake, after the handshake timeout.
        .ping_interval(limits.ping_interval())
        .ping_timeout(limits.idle_timeout().saturating_sub(limits.ping_interval()))
        .connect_timeout(limits.handshake_timeout())
        .build_layer();
    let (connections, metrics, prepare_state) = (state.connections.clone(), state.metrics.clone(), state.clone());
    let admit = move |socket: SocketRef| {
        let admitted = connections.admit(peer_of(&socket)).map(|permit| {
            // Dropped with the socket, which frees its place.
            socket.extensions.insert(Arc::new(permit));
            // Here, not in the connect handler: socketioxide queues the client's
            // confirmation (`40`) before it runs that handler, and drops a call that finds
            // no handler, so a call sent as soon as the client is confirmed (Feathers
            // re-authenticates at once) could be lost.
            prepare(&socket, &prepare_state);
        });
        if admitted.is_err() {
            metrics.connections_refused.inc();
        }
        // The client gets a `connect_error` with the reason.
        std::future::ready(admitted)
    };
    let connect = move |socket: SocketRef| {
        start(socket, state.clone(), sockets.clone());
        std::future::ready(())
    };
    io.ns("/", connect.with(admit));
    layer
}

/// What a socket's handlers need: its hub connection and login.
#[derive(Clone)]
struct Conn {
    id: ConnId,
    auth: SessionAuth,
    closed: CancellationToken,
}

/// What the connect handler takes over from [`prepare`]: the hub membership and the
/// logins its forwarding loop watches. Dropped with the socket if it never connects (its
/// confirmation could not be sent), and with it the membership.
#[derive(Clone)]
struct Starting(Arc<Mutex<Option<Forwarded>>>);

/// The connection's hub membership and the logins of its session.
type Forwarded = (Membership, UnboundedReceiver<Login>);

fn peer_of(socket: &SocketRef) -> Option<IpAddr> {
    socket.req_parts().extensions.get::<ClientAddr>().map(|c| c.0)
}

/// Joins an admitted socket to the hub and registers its handlers, before socketioxide
/// tells the client it is connected.
fn prepare(socket: &SocketRef, state: &AppState) {
    let peer = peer_of(socket);
    let member = state.hub.join(state.outgoing_queue);
    state.hub.subscribe_all(member.id);
    let (logins, login_rx) = mpsc::unbounded_channel();
    let conn = Conn {
        id: member.id,
        auth: SessionAuth::new(member.id, peer, logins),
        closed: CancellationToken::new(),
    };
    socket.extensions.insert(conn);
    socket
        .extensions
        .insert(Starting(Arc::new(Mutex::new(Some((member, login_rx))))));
    let handler_state = state.clone();
    socket.on_fallback(
        move |s: SocketRef, Event(method): Event, RawArgs(args): RawArgs, ack: AckSender| {
            let state = handler_state.clone();
            async move {
                let outcome = match s.extensions.get::<Conn>() {
                    Some(conn) => dispatch(&state, &conn, &method, args).await,
                    None => Err(Error::general("connection state missing")),
                };
                let _ = match outcome {
                    Ok(result) => ack.send(&(Value::Null, result)),
                    Err(e) => ack.send(&e.to_json()),
                };
            }
        },
    );
    socket.on_disconnect(|s: SocketRef| async move {
        if let Some(conn) = s.extensions.get::<Conn>() {
            conn.closed.cancel();
        }
    });
}

/// Starts forwarding the hub's frames to a socket that is now connected.
fn start(socket: SocketRef, state: AppState, sockets: AdapterHandle) {
    let starting = socket.extensions.remove::<Starting>();
    let taken = starting.and_then(|s| s.0.lock().ok()?.take());
    let (Some(conn), Some((member, logins))) = (socket.extensions.get::<Conn>(), taken) else {
        // Not prepared: it cannot be served.
        tracing::warn!(socket = %socket.id, "socket.io socket connected without its hub membership");
        let _ = socket.disconnect();
        return;
    };
    tokio::spawn(forward(socket, sockets, state, member, logins, conn.auth, conn.closed));
}

/// Sends the hub's frames to the socket until it closes; the membership (and so every
/// subscription and channel) ends with it.
async fn forward(
    socket: SocketRef,
    sockets: AdapterHandle,
    state: AppState,
    mut member: Membership,
    mut logins: UnboundedReceiver<Login>,
    auth: SessionAuth,
    closed: CancellationToken,
) {
    // Every future below is made once: a cancellation future registers with a token that
    // all connections share, and a timer registers with the runtime, so making them anew
    // for each event would cost a shared lock and a timer entry per event.
    let cut_off = async {
        let (closing, shutdown, kicked) = (closed.cancelled(), state.shutdown.cancelled(), member.kick.fired());
        let expiry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(closing, shutdown, kicked, expiry);
        let mut expiring = false;
        loop {
            tokio::select! {
                _ = &mut closing => return false,
                _ = &mut shutdown => return true,
                (_, reason) = &mut kicked => {
                    tracing::info!(socket = %socket.id, reason, "disconnecting socket.io client");
                    return true;
                }
                Some(login) = logins.recv() => {
                    expiring = login.deadline().map(|at| expiry.as_mut().reset(at)).is_some();
                }
                // As in Feathers, an expired token logs the connection out; the socket stays.
                _ = &mut expiry, if expiring => {
                    expiring = false;
                    auth.expire(&state);
                }
                Some(first) = member.frames.recv() => {
                    // With a write delay, an event that finds no backlog (less than a batch
                    // queued) waits for others to share its write (Engine.IO writes what it
                    // has queued in one flush); a backlog goes at once. A cut-off or a
                    // shutdown is seen after the delay, at most a second.
                    let delay = state.limits.write_delay();
                    if !delay.is_zero() && matches!(first, Frame::Event(_)) && member.frames.len() < BATCH {
                        tokio::time::sleep(delay).await;
                    }
                    // Send what is already queued in one go: a turn of this select costs
                    // more than a send.
                    let queued = std::iter::once(first)
                        .chain(std::iter::from_fn(|| member.frames.try_recv().ok()).take(BATCH - 1));
                    for frame in queued {
                        if !deliver(&socket, &sockets, &state, frame).await {
                            return true;
                        }
                    }
                }
            }
        }
    }
    .await;
    // Out of the hub at once: it gets nothing more and costs nothing more.
    drop(member);
    if cut_off {
        disconnect(&socket, &closed).await;
    }
}

/// Queues one hub frame for the socket; false if socket.io's buffer stayed full (the client
/// is not reading: counted as a slow consumer) or the socket is gone.
async fn deliver(socket: &SocketRef, sockets: &AdapterHandle, state: &AppState, frame: Frame) -> bool {
    // Replies go through acks, and a logout is learnt from the next call's 401.
    let Frame::Event(event) = frame else { return true };
    let payload = event.socketio.get_or_init(|| feathers_event(&event));
    match emit_within(socket, sockets, payload, state.slow_consumer_timeout).await {
        Ok(()) => true,
        Err(SendFailure::Full) => {
            state.metrics.slow_consumer_disconnects.inc();
            false
        }
        Err(SendFailure::Closed) => false,
    }
}

/// The event as Feathers emits it, `["<service> <kind>", data]`: the socket.io payload,
/// encoded once per view and shared by every socket that receives it.
fn feathers_event(event: &RenderedEvent) -> Str {
    let (service, kind) = (&*event.service, event.kind.as_str());
    let mut payload = String::with_capacity(event.data.len() + service.len() + kind.len() + 8);
    payload.push_str("[\"");
    // Service names are letters, digits, '_' and '-', kinds are words: nothing to escape.
    payload.push_str(service);
    payload.push(' ');
    payload.push_str(kind);
    payload.push_str("\",");
    // The hub rendered the row with serde_json: it is JSON, and so UTF-8.
    payload.push_str(std::str::from_utf8(&event.data).unwrap_or("null"));
    payload.push(']');
    Str::from(payload)
}

/// Queues an event, waiting up to `grace` for room in socket.io's buffer (the same grace a
/// `/ws` client gets: meanwhile the hub queue fills and delivery waits for this client as
/// for any slow one).
async fn emit_within(
    socket: &SocketRef,
    sockets: &AdapterHandle,
    payload: &Str,
    grace: Duration,
) -> Result<(), SendFailure> {
    // Timed from the first full buffer: reading the clock for every event that fits costs
    // more than the grace is worth.
    let mut deadline = None;
    loop {
        match sockets.send(socket.id, payload) {
            Err(SendFailure::Full) => {}
            sent => return sent,
        }
        if !socket.connected() {
            return Err(SendFailure::Closed);
        }
        let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + grace);
        if tokio::time::Instant::now() >= deadline {
            return Err(SendFailure::Full);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Disconnects a socket. The disconnect packet needs room in socket.io's buffer, which a
/// client that does not read keeps full: retry until it fits or the socket closes (the
/// engine's next ping finds the buffer full and closes it), so a client is never left
/// connected without events.
async fn disconnect(socket: &SocketRef, closed: &CancellationToken) {
    let mut retry = tokio::time::interval(Duration::from_millis(50));
    while socket.clone().disconnect().is_err() {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = retry.tick() => {}
        }
    }
}

/// A Feathers call as the socket.io client sends it: `(method, path, ...args)`.
#[derive(Debug, PartialEq)]
pub struct CallArgs {
    pub method: Method,
    pub path: String,
    pub id: Option<Value>,
    pub data: Option<Value>,
    pub query: Value,
}

impl CallArgs {
    /// Puts the arguments where Feathers' client puts them. Never panics, whatever the
    /// client sends.
    pub fn decode(event: &str, args: Result<Vec<Value>, String>) -> Result<CallArgs> {
        let mut args = args.map_err(|e| Error::bad_request(format!("invalid arguments: {e}")))?;
        let method =
            Method::parse(event).ok_or_else(|| Error::method_not_allowed(format!("Method '{event}' not allowed")))?;
        let path = match (!args.is_empty()).then(|| args.remove(0)) {
            Some(Value::String(path)) => path.trim_matches('/').to_owned(),
            _ => return Err(Error::not_found("Invalid service path")),
        };
        // Where params.query sits; anything past it is one argument too many.
        let query_at = match method {
            Method::Find => 0,
            Method::Get | Method::Remove | Method::Create => 1,
            Method::Update | Method::Patch => 2,
        };
        if args.len() > query_at + 1 {
            return Err(Error::bad_request(format!("Too many arguments for '{event}' method")));
        }
        args.resize(query_at + 1, Value::Null);
        let query = args.pop().unwrap_or(Value::Null);
        let mut args = args.into_iter();
        let mut next = || args.next().unwrap_or(Value::Null);
        let (id, data) = match method {
            Method::Find => (None, None),
            Method::Get | Method::Remove => (Some(next()), None),
            Method::Create => (None, Some(next())),
            Method::Update | Method::Patch => (Some(next()), Some(next())),
        };
        Ok(CallArgs {
            method,
            path,
            id,
            data,
            query,
        })
    }
}

/// Runs one Feathers call: `(path, ...args)` in the client's order.
async fn dispatch(state: &AppState, conn: &Conn, event: &str, args: Result<Vec<Value>, String>) -> Result<Value> {
    let CallArgs {
        method,
        path,
        id,
        data,
        query,
    } = CallArgs::decode(event, args)?;
    if path == "authentication" {
        return match method {
            // create('authentication', data) and remove('authentication', token)
            Method::Create => conn.auth.login(state, data.as_ref().unwrap_or(&Value::Null)).await,
            Method::Remove => conn.auth.logout(state, id.as_ref().unwrap_or(&Value::Null)),
            _ => Err(Error::method_not_allowed(format!(
                "Method '{event}' not allowed on service 'authentication'"
            ))),
        };
    }
    state
        .services
        .call(ServiceCall {
            service: path,
            method,
            id,
            data,
            query,
            caller: state.hub.principal(conn.id),
            address: conn.auth.peer(),
        })
        .await
        .map(|outcome| outcome.result)
}

/// All the arguments of an event as loose JSON. Never fails, so every call gets an ack:
/// socketioxide skips a handler whose extractor fails, and the client would hang.
struct RawArgs(Result<Vec<Value>, String>);

impl<A: Adapter> FromMessageParts<A> for RawArgs {
    type Error = Infallible;

    fn from_message_parts(_: &Arc<Socket<A>>, value: &mut SioValue, _: &Option<i64>) -> Result<Self, Infallible> {
        let args = match value.as_str() {
            Some(text) => serde_json::from_str::<Vec<Value>>(text.as_str())
                .map(|mut all| {
                    // the first element is the event name
                    if !all.is_empty() {
                        all.remove(0);
                    }
                    all
                })
                .map_err(|e| e.to_string()),
            None => Err("binary payloads are not supported".to_owned()),
        };
        Ok(RawArgs(args))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::event::EventKind;

    #[test]
    fn the_event_payload_is_the_feathers_name_and_the_row_as_one_json_array() {
        let row = json!({"id": 7, "text": "a \"quote\", a \\ and ünïcödé\u{2028}"});
        let event = RenderedEvent {
            service: Arc::from("chat-rooms_2"),
            kind: EventKind::Patched,
            seq: 1,
            data: Bytes::from(serde_json::to_vec(&row).expect("serializable")),
            ws: Bytes::new(),
            socketio: OnceLock::new(),
        };
        let payload = feathers_event(&event);
        let parsed: Value = serde_json::from_str(payload.as_str()).expect("valid JSON");
        assert_eq!(parsed, json!(["chat-rooms_2 patched", row]));
    }
}
