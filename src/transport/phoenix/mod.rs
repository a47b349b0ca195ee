//! Supabase Realtime: Phoenix channels over WebSocket at `/realtime/v1/websocket` (and
//! `/socket/websocket`), so that `@supabase/supabase-js` clients subscribe to
//! `postgres_changes` and broadcast through quill unchanged.
//!
//! The socket's `apikey` and each join's `access_token` are JWTs checked like quill's own
//! tokens (see [`crate::auth::KeyHolder`]). A channel's `postgres_changes` bindings become
//! one hub subscription per served table, so channels, `visible_to`, hidden fields and the
//! slow-consumer cut-off apply exactly as on `/ws`; the writer is `/ws`'s, with this
//! protocol's encoding.

mod bindings;
mod codec;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, Query as UrlQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{self, Sender, UnboundedReceiver};
use tokio::time::Instant;

use super::session::sleep_until;
use super::ws::{Inbound, Outbound, inbound, to_message, write_frames};
use super::{AppState, ClientAddr};
use crate::auth::{KeyHolder, KeyRefused};
use crate::hub::{Binding as HubBinding, Broadcast, ConnId, Cutoff, Frame, Route, Subscription, Topic};
use codec::{Message, Vsn};

/// The most channels one socket may join at once.
const MAX_CHANNELS: usize = 100;
/// The longest topic (realtime-js cannot send a longer one in a binary frame either).
const MAX_TOPIC: usize = 255;
/// The longest `filter` of a binding.
const MAX_FILTER: usize = 4096;
/// The largest frame a Supabase client may send (a broadcast message, mostly).
const MAX_FRAME: usize = 256 * 1024;
/// Broadcasts one socket may send per second (a bucket of this many, refilled at this rate).
const BROADCASTS_PER_SECOND: f64 = 100.0;
/// Topics of Supabase channels start with this.
const TOPIC_PREFIX: &str = "realtime:";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/realtime/v1/websocket", get(upgrade))
        .route("/socket/websocket", get(upgrade))
}

/// Refuses an upgrade as Supabase does: JSON `{error}` with the status.
fn refuse(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    Extension(ClientAddr(peer)): Extension<ClientAddr>,
    UrlQuery(params): UrlQuery<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(vsn) = Vsn::parse(params.get("vsn").map(String::as_str)) else {
        return refuse(StatusCode::BAD_REQUEST, "unsupported vsn: use 1.0.0 or 2.0.0");
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let Some(key) = header("x-api-key")
        .or_else(|| header("apikey"))
        .or_else(|| params.get("apikey").cloned())
    else {
        return refuse(StatusCode::UNAUTHORIZED, "API key is missing");
    };
    let Some(auth) = state.services.auth() else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "quill has no [auth] section, so it cannot check API keys: configure one",
        );
    };
    let holder = match auth.key_holder(&key).await {
        Ok(holder) => holder,
        Err(KeyRefused::Unavailable) => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, &KeyRefused::Unavailable.to_string());
        }
        Err(refused) => return refuse(StatusCode::UNAUTHORIZED, &refused.to_string()),
    };
    let permit = match state.connections.admit(Some(peer)) {
        Ok(permit) => permit,
        Err(refused) => {
            state.metrics.connections_refused.inc();
            return refuse(StatusCode::TOO_MANY_REQUESTS, &refused.to_string());
        }
    };
    ws.max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .read_buffer_size(2 * 1024)
        .write_buffer_size(16 * 1024)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = socket.split();
            let sink = sink.with(|out: Outbound| async move { Ok::<_, axum::Error>(to_message(out)) });
            serve(
                state,
                Some(peer),
                vsn,
                holder,
                Box::pin(sink),
                Box::pin(stream.map(inbound)),
            )
            .await;
            drop(permit);
        })
}

/// Serves one socket until the client leaves, the hub cuts it off or quill shuts down.
async fn serve<Tx, Rx>(state: AppState, _peer: Option<IpAddr>, vsn: Vsn, key: KeyHolder, mut tx: Tx, mut rx: Rx)
where
    Tx: futures::Sink<Outbound> + Unpin,
    Rx: Stream<Item = Inbound> + Unpin,
{
    let mut member = state.hub.join(state.outgoing_queue);
    // The writer tells the session when the hub logged the user out (the user was removed).
    let (notices, logouts) = mpsc::unbounded_channel::<&'static str>();
    let encode = move |frame: Frame| -> Option<Bytes> {
        match frame {
            Frame::Text(bytes) => Some(bytes),
            Frame::Routed { record, topic, matched } => {
                // Queued before the client left the channel: not for it any more.
                (!topic.has_left()).then(|| codec::postgres_changes(vsn, &topic, matched, &record))
            }
            Frame::Broadcast(message) => codec::broadcast(vsn, &message.topic, &message.payload),
            Frame::Logout { reason } => {
                let _ = notices.send(reason);
                None
            }
            Frame::Event(_) => None,
        }
    };
    let mut session = Session {
        state: &state,
        conn: member.id,
        vsn,
        replies: member.replies.clone(),
        key: key.clone(),
        holder: key,
        token: None,
        channels: HashMap::new(),
        broadcasts: (BROADCASTS_PER_SECOND, Instant::now()),
    };
    session.apply_holder();
    let writer = write_frames(state.limits, &state.shutdown, &mut member, &mut tx, &encode);
    let reader = session.read(&mut rx, logouts);
    tokio::select! {
        () = writer => {}
        () = reader => {}
    }
}

/// A channel's bindings per service.
type Routes = HashMap<Arc<str>, Vec<HubBinding>>;

/// A channel the socket joined.
struct Channel {
    join_ref: Option<String>,
    topic: Arc<Topic>,
    /// `config.broadcast.self`: the sender gets its own broadcasts too.
    broadcast_self: bool,
    /// `config.broadcast.ack`: a broadcast is answered once it was sent on.
    broadcast_ack: bool,
    /// The bindings as the client sent them, resolved again whenever the user changes.
    bindings: Vec<bindings::Binding>,
    /// The bindings per service, resolved for the connection's current user (empty when
    /// they did not resolve: a `system` error said why).
    routes: Routes,
}

struct Session<'a> {
    state: &'a AppState,
    conn: ConnId,
    vsn: Vsn,
    replies: Sender<Frame>,
    /// Who the socket's API key stands for: the connection without an access token.
    key: KeyHolder,
    /// Who the connection is now, and the access token that said so (`None`: the key).
    holder: KeyHolder,
    token: Option<String>,
    channels: HashMap<String, Channel>,
    /// The broadcast bucket: tokens left, and when it was last refilled.
    broadcasts: (f64, Instant),
}

impl Session<'_> {
    async fn read<Rx>(&mut self, rx: &mut Rx, mut logouts: UnboundedReceiver<&'static str>)
    where
        Rx: Stream<Item = Inbound> + Unpin,
    {
        let idle = self.state.limits.idle_timeout();
        let mut heard = Instant::now();
        loop {
            let expires = self.holder.expires_at().map(super::session::instant_at);
            tokio::select! {
                Some(reason) = logouts.recv() => {
                    // The hub logged the user out already (the user was removed): if the
                    // API key was theirs, it stands for nobody now either.
                    if self.key.principal().is_some() {
                        self.key = KeyHolder::Anonymous { expires_at: self.key.expires_at() };
                    }
                    self.close_all(reason).await;
                    self.holder = KeyHolder::Anonymous { expires_at: None };
                    self.token = None;
                    // A token switched to meanwhile is dropped too: the hub and the session
                    // agree on anonymous.
                    self.apply_holder();
                }
                _ = sleep_until(expires) => {
                    self.close_all("Token has expired 0 seconds ago").await;
                    // Anonymous now; a join without a token of its own checks the key's
                    // expiry (the key may be what expired).
                    if self.token.is_none() {
                        self.key = KeyHolder::Anonymous { expires_at: self.key.expires_at() };
                    }
                    self.holder = KeyHolder::Anonymous { expires_at: None };
                    self.token = None;
                    self.apply_holder();
                }
                _ = tokio::time::sleep_until(heard + idle) => {
                    self.state.hub.kick(self.conn, Cutoff::Idle, "idle timeout: nothing received from the client");
                    // The writer closes the socket; the session ends with it.
                    return std::future::pending().await;
                }
                inbound = rx.next() => {
                    heard = Instant::now();
                    let message = match inbound {
                        None | Some(Inbound::Close) => return,
                        Some(Inbound::Heartbeat) => continue,
                        Some(Inbound::Text(text)) => codec::decode_text(self.vsn, &text),
                        Some(Inbound::Binary(frame)) if self.vsn == Vsn::V2 => codec::decode_binary(&frame),
                        Some(Inbound::Binary(_)) => Err(codec::DecodeError::BinaryKind),
                    };
                    match message {
                        Ok(message) => self.handle(message).await,
                        Err(codec::DecodeError::BinaryPayload(to)) => {
                            if self.channels.get(&to.topic).is_some_and(|c| c.broadcast_ack) {
                                let reason = "a broadcast with a binary payload is not supported; send JSON";
                                self.reply(&to, "error", json!({ "reason": reason })).await;
                            }
                        }
                        // Nothing to answer: without a ref the client could not match a reply.
                        Err(e) => tracing::debug!(error = %e, "ignoring a frame that is not a Phoenix message"),
                    }
                }
            }
        }
    }

    async fn handle(&mut self, message: Message) {
        if message.topic == "phoenix" {
            if message.event == "heartbeat" {
                self.reply(&message, "ok", json!({})).await;
            }
            return;
        }
        if message.event == "phx_join" {
            return self.join(message).await;
        }
        let Some(channel) = self.channels.get(&message.topic) else {
            return match message.event.as_str() {
                "phx_leave" => self.reply(&message, "ok", json!({})).await,
                _ => {
                    let unmatched = Message {
                        join_ref: None,
                        ..message
                    };
                    self.reply(&unmatched, "error", json!({ "reason": "unmatched topic" }))
                        .await
                }
            };
        };
        // A push for an earlier join of this topic.
        if message.join_ref.is_some() && message.join_ref != channel.join_ref {
            return;
        }
        match message.event.as_str() {
            "phx_leave" => {
                let join_ref = channel.join_ref.clone();
                self.leave(&message.topic);
                self.reply(&message, "ok", json!({})).await;
                self.push_close(&message.topic, join_ref.as_deref()).await;
            }
            "access_token" => self.refresh(message).await,
            "broadcast" => self.broadcast(message).await,
            "presence" => {
                let reason = "presence is not supported by quill yet";
                self.reply(&message, "error", json!({ "reason": reason })).await;
            }
            // As on Supabase: other events on a joined channel get no answer.
            _ => {}
        }
    }

    async fn join(&mut self, message: Message) {
        let topic = message.topic.clone();
        let join_error = |reason: String| json!({ "reason": reason });
        if !topic.starts_with(TOPIC_PREFIX) {
            let unmatched = Message {
                join_ref: None,
                ..message
            };
            return self
                .reply(&unmatched, "error", json!({ "reason": "unmatched topic" }))
                .await;
        }
        if topic.len() > MAX_TOPIC {
            let reason = format!("InvalidJoinPayload: a topic is at most {MAX_TOPIC} bytes");
            return self.reply(&message, "error", join_error(reason)).await;
        }
        if topic == TOPIC_PREFIX {
            let reason = "TopicNameRequired: You must provide a topic name".to_owned();
            return self.reply(&message, "error", join_error(reason)).await;
        }
        // Joining a joined topic again replaces the earlier join (Phoenix closes it).
        if let Some(old) = self.channels.get(&topic) {
            let old_ref = old.join_ref.clone();
            self.leave(&topic);
            self.push_close(&topic, old_ref.as_deref()).await;
        }
        if self.channels.len() >= MAX_CHANNELS {
            let reason = "ChannelRateLimitReached: Too many channels".to_owned();
            return self.reply(&message, "error", join_error(reason)).await;
        }
        let empty = Map::new();
        let config = message
            .payload
            .get("config")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        if config.get("private").and_then(Value::as_bool) == Some(true) {
            let reason = "Unauthorized: quill has no private channels; join without `private: true` (quill's channel rules decide who gets which row)";
            return self.reply(&message, "error", join_error(reason.to_owned())).await;
        }
        // The bindings are checked before the token changes anything.
        let bindings = match bindings::parse(config.get("postgres_changes")) {
            Ok(b) if b.len() > Topic::MAX_BINDINGS => {
                let reason = format!(
                    "InvalidJoinPayload: at most {} postgres_changes bindings per channel",
                    Topic::MAX_BINDINGS
                );
                return self.reply(&message, "error", join_error(reason)).await;
            }
            Ok(b) => b,
            Err(e) => {
                return self
                    .reply(&message, "error", join_error(format!("InvalidJoinPayload: {e}")))
                    .await;
            }
        };
        if let Some(b) = bindings
            .iter()
            .find(|b| b.filter.as_ref().is_some_and(|f| f.len() > MAX_FILTER))
        {
            let reason = format!(
                "InvalidJoinPayload: a filter is at most {MAX_FILTER} bytes (binding {})",
                b.id
            );
            return self.reply(&message, "error", join_error(reason)).await;
        }
        // The join's token, else the one the connection has.
        let token = ["access_token", "user_token"]
            .iter()
            .find_map(|k| message.payload.get(*k).and_then(Value::as_str))
            .filter(|t| !t.starts_with("sb_"));
        match token {
            Some(token) if self.token.as_deref() != Some(token) => match self.check(token).await {
                Ok(holder) => self.switch_to(holder, Some(token.to_owned())).await,
                Err(refused) => {
                    let reason = format!("{}: {refused}", refused.code());
                    return self.reply(&message, "error", join_error(reason)).await;
                }
            },
            // Without a token of its own the join stands on the API key.
            None if self.token.is_none() && self.key.expires_at().is_some_and(|exp| exp <= unix_now()) => {
                let reason = format!("{}: {}", KeyRefused::Expired.code(), KeyRefused::Expired);
                return self.reply(&message, "error", join_error(reason)).await;
            }
            _ if self.holder.expires_at().is_some_and(|exp| exp <= unix_now()) => {
                let reason = format!("{}: {}", KeyRefused::Expired.code(), KeyRefused::Expired);
                return self.reply(&message, "error", join_error(reason)).await;
            }
            _ => {}
        }
        let (routes, problem) = match self.resolve(&bindings) {
            Ok(routes) => (routes, None),
            Err(e) => (HashMap::new(), Some(e)),
        };
        let echoed: Vec<Value> = bindings
            .iter()
            .map(|b| {
                let mut params = b.params.clone();
                params.insert("id".into(), Value::from(b.id));
                Value::Object(params)
            })
            .collect();
        self.reply(&message, "ok", json!({ "postgres_changes": echoed })).await;
        let broadcast = config.get("broadcast");
        let flag = |name: &str| broadcast.and_then(|b| b.get(name)).and_then(Value::as_bool) == Some(true);
        let channel = Channel {
            join_ref: message.join_ref.clone(),
            topic: Arc::new(Topic::new(
                Arc::from(topic.as_str()),
                bindings.iter().map(|b| b.id).collect(),
            )),
            broadcast_self: flag("self"),
            broadcast_ack: flag("ack"),
            bindings,
            routes,
        };
        let services: Vec<Arc<str>> = channel.routes.keys().cloned().collect();
        self.channels.insert(topic.clone(), channel);
        self.state.hub.join_topic(self.conn, &topic);
        // Live from here: a change committed after the client reads the next message reaches it.
        self.resubscribe(services);
        self.announce(&topic, problem).await;
    }

    /// Resolves a channel's bindings for the connection's user. Every binding must hold,
    /// or none is registered (as on Supabase); the error is the `system` message.
    fn resolve(&self, bindings: &[bindings::Binding]) -> Result<Routes, String> {
        // The hub's user: it follows the users table (a role change), the session's does not.
        let caller = self.state.hub.principal(self.conn);
        let caller = caller.as_deref();
        let mut routes = Routes::new();
        for (index, binding) in bindings.iter().enumerate() {
            for r in binding.resolve(&self.state.services, caller)? {
                routes.entry(r.service.name.clone()).or_default().push(HubBinding {
                    index,
                    kinds: r.kinds,
                    query: r.query,
                });
            }
        }
        Ok(routes)
    }

    /// Tells a channel with bindings whether its feed is live (`problem`: why not).
    async fn announce(&self, topic: &str, problem: Option<String>) {
        if self.channels.get(topic).is_none_or(|c| c.bindings.is_empty()) {
            return;
        }
        match problem {
            None => {
                self.system(topic, "postgres_changes", "ok", "Subscribed to PostgreSQL")
                    .await
            }
            Some(e) => self.system(topic, "postgres_changes", "error", &e).await,
        }
    }

    /// The connection becomes another user (or anonymous): every channel's bindings are
    /// resolved again for it (a filter it may not use is refused, as at a join), and each
    /// channel with bindings hears whether its feed is live, as on Supabase.
    async fn switch_to(&mut self, holder: KeyHolder, token: Option<String>) {
        self.holder = holder;
        self.token = token;
        self.apply_holder();
        let resolved: Vec<(String, Result<Routes, String>)> = self
            .channels
            .iter()
            .map(|(topic, c)| (topic.clone(), self.resolve(&c.bindings)))
            .collect();
        let mut services: Vec<Arc<str>> = Vec::new();
        let mut outcomes = Vec::new();
        for (topic, result) in resolved {
            let Some(channel) = self.channels.get_mut(&topic) else {
                continue;
            };
            // The services it was on (to drop) and is on now (to register).
            services.extend(channel.routes.keys().cloned());
            let problem = match result {
                Ok(routes) => {
                    channel.routes = routes;
                    None
                }
                Err(e) => {
                    channel.routes.clear();
                    Some(e)
                }
            };
            services.extend(channel.routes.keys().cloned());
            outcomes.push((topic, problem));
        }
        services.sort();
        services.dedup();
        self.resubscribe(services);
        for (topic, problem) in outcomes {
            self.announce(&topic, problem).await;
        }
    }

    /// Leaves a channel: nothing more is written for it from now on, not even what is queued.
    fn leave(&mut self, topic: &str) {
        let Some(channel) = self.channels.remove(topic) else {
            return;
        };
        channel.topic.leave();
        self.state.hub.leave_topic(self.conn, topic);
        self.resubscribe(channel.routes.into_keys().collect());
    }

    /// `access_token`: the connection becomes the token's user. A token that does not hold
    /// closes the channel, as on Supabase; null, `sb_…` and the same token change nothing.
    async fn refresh(&mut self, message: Message) {
        let Some(token) = message.payload.get("access_token").and_then(Value::as_str) else {
            return;
        };
        if token.starts_with("sb_") || self.token.as_deref() == Some(token) {
            return;
        }
        match self.check(token).await {
            Ok(holder) => self.switch_to(holder, Some(token.to_owned())).await,
            Err(refused) => {
                let join_ref = self.channels.get(&message.topic).and_then(|c| c.join_ref.clone());
                self.leave(&message.topic);
                let reason = refused.to_string();
                self.system_with(&message.topic, join_ref.as_deref(), "system", "error", &reason)
                    .await;
                self.push_close(&message.topic, join_ref.as_deref()).await;
                // Back to what the API key allows (if the connection had a token of its
                // own; an expired key leaves nothing to go back to).
                if self.key.expires_at().is_some_and(|exp| exp <= unix_now()) {
                    self.close_all("Token has expired 0 seconds ago").await;
                    self.switch_to(KeyHolder::Anonymous { expires_at: None }, None).await;
                } else if self.token.is_some() {
                    let key = self.key.clone();
                    self.switch_to(key, None).await;
                }
            }
        }
    }

    /// `broadcast`: the message goes to every socket on the topic, unchanged.
    async fn broadcast(&mut self, message: Message) {
        let Some(channel) = self.channels.get(&message.topic) else {
            return;
        };
        let (to_sender, ack, join_ref) = (channel.broadcast_self, channel.broadcast_ack, channel.join_ref.clone());
        let now = Instant::now();
        let (tokens, since) = self.broadcasts;
        let tokens =
            (tokens + now.duration_since(since).as_secs_f64() * BROADCASTS_PER_SECOND).min(BROADCASTS_PER_SECOND);
        self.broadcasts = (tokens - 1.0, now);
        if tokens < 1.0 {
            // As Supabase does: the channel is shut down, the client may join again.
            self.leave(&message.topic);
            let reason = "Too many messages per second";
            self.system_with(&message.topic, join_ref.as_deref(), "system", "error", reason)
                .await;
            return self.push_close(&message.topic, join_ref.as_deref()).await;
        }
        let valid = message.payload.get("type").and_then(Value::as_str) == Some("broadcast")
            && message.payload.get("event").and_then(Value::as_str).is_some();
        if !valid {
            if ack {
                let reason = "a broadcast is {\"type\": \"broadcast\", \"event\": <string>, \"payload\": ...}";
                self.reply(&message, "error", json!({ "reason": reason })).await;
            }
            return;
        }
        let payload = Bytes::from(serde_json::to_vec(&message.payload).unwrap_or_default());
        let topic = Arc::clone(&channel.topic.name);
        self.state
            .hub
            .broadcast(self.conn, Broadcast { topic, payload }, to_sender);
        if ack {
            self.reply(&message, "ok", json!({})).await;
        }
    }

    async fn check(&self, token: &str) -> Result<KeyHolder, KeyRefused> {
        match self.state.services.auth() {
            Some(auth) => auth.key_holder(token).await,
            None => Err(KeyRefused::Signature),
        }
    }

    /// Puts the connection in the hub's channels of its holder.
    fn apply_holder(&self) {
        match self.holder.principal() {
            Some(principal) => self.state.hub.login(self.conn, principal.clone()),
            None => self.state.hub.logout(self.conn),
        }
    }

    /// Registers, for each service, the bindings every joined channel has on it.
    fn resubscribe(&self, services: Vec<Arc<str>>) {
        let caller = self.state.hub.principal(self.conn);
        let caller = caller.as_deref();
        for service in services {
            let routes: Vec<Route> = self
                .channels
                .values()
                .filter_map(|c| {
                    c.routes.get(&service).map(|bindings| Route {
                        topic: c.topic.clone(),
                        bindings: bindings.clone(),
                    })
                })
                .collect();
            if routes.is_empty() {
                self.state.hub.unsubscribe(self.conn, &service);
            } else {
                let subscription = Subscription::routed(routes).for_caller(caller);
                self.state.hub.subscribe(self.conn, service, subscription);
            }
        }
    }

    /// Closes every channel, saying why (the token expired, the user was removed).
    async fn close_all(&mut self, reason: &str) {
        let topics: Vec<(String, Option<String>)> = self
            .channels
            .iter()
            .map(|(t, c)| (t.clone(), c.join_ref.clone()))
            .collect();
        for (topic, join_ref) in topics {
            self.leave(&topic);
            self.system_with(&topic, join_ref.as_deref(), "system", "error", reason)
                .await;
            self.push_close(&topic, join_ref.as_deref()).await;
        }
    }

    async fn reply(&self, to: &Message, status: &str, response: Value) {
        self.send(codec::reply(self.vsn, to, status, response)).await;
    }

    async fn system(&self, topic: &str, extension: &str, status: &str, message: &str) {
        let join_ref = self.channels.get(topic).and_then(|c| c.join_ref.clone());
        self.system_with(topic, join_ref.as_deref(), extension, status, message)
            .await;
    }

    async fn system_with(&self, topic: &str, join_ref: Option<&str>, extension: &str, status: &str, message: &str) {
        let name = topic.strip_prefix(TOPIC_PREFIX).unwrap_or(topic);
        let payload = json!({ "extension": extension, "status": status, "message": message, "channel": name });
        self.send(codec::encode(self.vsn, join_ref, None, topic, "system", &payload))
            .await;
    }

    /// `phx_close` for a join: the client reports the channel `CLOSED`.
    async fn push_close(&self, topic: &str, join_ref: Option<&str>) {
        self.send(codec::encode(
            self.vsn,
            join_ref,
            join_ref,
            topic,
            "phx_close",
            &json!({}),
        ))
        .await;
    }

    /// Queues a frame behind the events already queued (one writer per socket).
    async fn send(&self, frame: Bytes) {
        let _ = self.replies.send(Frame::Text(frame)).await;
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
