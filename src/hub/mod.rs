//! Fan-out: connections, their channels and subscriptions, one bounded queue each.
//!
//! An event goes to the connections that are in one of its channels *and* subscribed to
//! its service, each at most once. The hub walks whichever set is smaller (the channels'
//! members or the service's subscribers), so the cost follows the receivers, not all
//! connections. [`Hub::publish`] never waits; [`Hub::flush`] paces delivery by healthy
//! clients and cuts off stalled ones.

mod member;

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;

pub use crate::event::RenderedEvent;
use member::Member;
pub use member::{Binding, Broadcast, ConnId, Cutoff, Frame, Kick, KindSet, ReplayId, Route, Subscription, Topic};
use member::{Held, Offered, Resuming};

use crate::auth::Principal;
use crate::channel::{self, Prepared};
use crate::event::EventKind;
use crate::metrics::Metrics;

const SLOW_CONSUMER: &str = "slow consumer: outgoing queue full";

#[derive(Default)]
struct State {
    members: HashMap<ConnId, Member>,
    /// channel → members
    channels: HashMap<Arc<str>, HashSet<ConnId>>,
    /// service → subscribers (besides `all_services`)
    by_service: HashMap<Arc<str>, HashSet<ConnId>>,
    /// connections subscribed to every service
    all_services: HashSet<ConnId>,
    /// user id → that user's connections
    by_user: HashMap<String, HashSet<ConnId>>,
    /// broadcast topic → the connections that joined it
    topics: HashMap<Arc<str>, HashSet<ConnId>>,
}

impl State {
    fn join_channel(&mut self, conn: ConnId, channel: &str) {
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        let name: Arc<str> = Arc::from(channel);
        member.channels.insert(name.clone());
        self.channels.entry(name).or_default().insert(conn);
    }

    fn leave_channel(&mut self, conn: ConnId, channel: &str) {
        if let Some(member) = self.members.get_mut(&conn) {
            member.channels.remove(channel);
        }
        unindex(&mut self.channels, channel, conn);
    }

    /// The channels a user's connection belongs to.
    fn user_channels(principal: &Principal) -> Vec<String> {
        let mut names = vec![channel::AUTHENTICATED.to_owned(), channel::user_channel(&principal.id)];
        if let Some(role) = &principal.role {
            names.push(channel::role_channel(role));
        }
        names
    }

    /// The connections logged in as this user.
    fn user_conns(&self, id: &str) -> Vec<ConnId> {
        self.by_user
            .get(id)
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default()
    }

    fn set_principal(&mut self, conn: ConnId, principal: Option<Arc<Principal>>) {
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        let old = std::mem::replace(&mut member.principal, principal.clone());
        if let Some(old) = &old {
            for name in Self::user_channels(old) {
                self.leave_channel(conn, &name);
            }
            unindex(&mut self.by_user, old.id.as_str(), conn);
        }
        match &principal {
            Some(p) => {
                self.leave_channel(conn, channel::ANONYMOUS);
                for name in Self::user_channels(p) {
                    self.join_channel(conn, &name);
                }
                self.by_user.entry(p.id.clone()).or_default().insert(conn);
            }
            None => self.join_channel(conn, channel::ANONYMOUS),
        }
    }
}

/// Whether a member is in a channel the event goes to (for an event without a row: any
/// channel that a row of its service could reach).
fn reached(member: &Member, prepared: &Prepared<'_>) -> bool {
    if prepared.event.kind == EventKind::Truncated {
        member
            .channels
            .iter()
            .any(|c| prepared.reach.iter().any(|p| p.matches(c)))
    } else {
        prepared.channels.iter().any(|c| member.channels.contains(c.as_str()))
    }
}

/// Whether the row, before an update, was in one of the connection's channels.
fn was_reached(member: &Member, prepared: &Prepared<'_>) -> bool {
    prepared
        .old_channels
        .iter()
        .flatten()
        .any(|c| member.channels.contains(c.as_str()))
}

/// Where an event leaves a subscriber's view of the service.
#[derive(Debug, PartialEq, Eq)]
enum Scope {
    /// The row is in scope: the event as it is.
    In,
    /// An update brought the row into scope.
    MovedIn,
    /// An update took the row out of scope: its id, as `removed`.
    MovedOut,
    Out,
}

/// In scope means: in one of the connection's channels and matching the subscription's
/// kinds and query. For an update with its old row, a `/ws` subscription also learns when
/// the row entered or left its scope; a socket.io one (every service, no query) and a
/// Supabase-style one get the event where the row now is, as Feathers and Supabase do.
/// `in_view_now`: the row is in one of the connection's channels now and it has a view of it.
fn scope(member: &Member, sub: &Subscription, prepared: &Prepared<'_>, in_view_now: bool) -> Scope {
    let event = prepared.event;
    let now = in_view_now && sub.matches(event.kind, &event.data);
    let before = match (&event.old, sub.moves) {
        (Some(old), true) => {
            was_reached(member, prepared)
                && sub.matches(event.kind, old)
                && prepared.allowed_before(member.principal.as_deref())
        }
        _ => now,
    };
    match (before, now) {
        (true, true) if sub.kinds.contains(event.kind) => Scope::In,
        (false, true) if sub.kinds.contains(event.kind) => Scope::MovedIn,
        (true, false) if sub.kinds.contains(EventKind::Removed) => Scope::MovedOut,
        _ => Scope::Out,
    }
}

/// Removes a connection from one entry of an index, and the entry once it is empty.
fn unindex<K, Q>(index: &mut HashMap<K, HashSet<ConnId>>, key: &Q, conn: ConnId)
where
    K: Borrow<Q> + Hash + Eq,
    Q: Hash + Eq + ?Sized,
{
    if let Some(conns) = index.get_mut(key) {
        conns.remove(&conn);
        if conns.is_empty() {
            index.remove(key);
        }
    }
}

/// The registry of live connections.
pub struct Hub {
    state: RwLock<State>,
    next_id: AtomicU64,
    /// The newest tick whose events have started to be published.
    started_tick: AtomicI64,
    ticks: tokio::sync::Notify,
    /// The newest tick whose events have all been offered to every connection.
    ended_tick: AtomicI64,
    /// Wakes waiters for delivery progress: a tick ended, a replay handed over.
    progress: tokio::sync::Notify,
    /// The connections with parked frames, so that `flush` visits those, not everyone.
    parked: Mutex<Vec<ConnId>>,
    metrics: Arc<Metrics>,
}

/// A connection's end of the hub. Dropping it removes the connection everywhere.
pub struct Membership {
    pub id: ConnId,
    pub frames: mpsc::Receiver<Frame>,
    /// Replies go through the same queue as events, so the socket has a single writer.
    pub replies: mpsc::Sender<Frame>,
    pub kick: Kick,
    hub: Arc<Hub>,
}

impl Membership {
    /// Cuts this connection off, as [`Hub::kick`] does.
    pub fn cut_off(&self, cutoff: Cutoff, reason: &'static str) {
        self.hub.kick(self.id, cutoff, reason);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Self::with_metrics(Arc::default())
    }

    pub fn with_metrics(metrics: Arc<Metrics>) -> Arc<Hub> {
        Arc::new(Hub {
            state: RwLock::default(),
            next_id: AtomicU64::new(0),
            started_tick: AtomicI64::new(0),
            ticks: tokio::sync::Notify::new(),
            ended_tick: AtomicI64::new(0),
            progress: tokio::sync::Notify::new(),
            parked: Mutex::new(Vec::new()),
            metrics,
        })
    }

    /// Registers a connection (in the `anonymous` channel) with a queue of `capacity` frames.
    pub fn join(self: &Arc<Self>, capacity: usize) -> Membership {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let kick = Kick::default();
        {
            let mut state = self.write();
            state.members.insert(id, Member::new(tx.clone(), kick.clone()));
            state.join_channel(id, channel::ANONYMOUS);
        }
        self.metrics.connections.inc();
        Membership {
            id,
            frames: rx,
            replies: tx,
            kick,
            hub: self.clone(),
        }
    }

    fn remove(&self, conn: ConnId) {
        let mut state = self.write();
        state.set_principal(conn, None);
        let Some(member) = state.members.remove(&conn) else {
            return;
        };
        for name in &member.channels {
            unindex(&mut state.channels, &**name, conn);
        }
        for service in member.subscriptions.keys() {
            unindex(&mut state.by_service, &**service, conn);
        }
        for topic in &member.topics {
            unindex(&mut state.topics, &**topic, conn);
        }
        state.all_services.remove(&conn);
        self.metrics.connections.dec();
    }

    /// Logs a connection in: it leaves `anonymous` and joins `authenticated`,
    /// `users/<id>` and `roles/<role>`.
    pub fn login(&self, conn: ConnId, principal: Principal) {
        self.write().set_principal(conn, Some(Arc::new(principal)));
    }

    /// Logs a connection out: back to `anonymous` only (plus any custom channels).
    pub fn logout(&self, conn: ConnId) {
        self.write().set_principal(conn, None);
    }

    /// `connection.user` of a connection.
    pub fn principal(&self, conn: ConnId) -> Option<Arc<Principal>> {
        self.read().members.get(&conn).and_then(|m| m.principal.clone())
    }

    /// A user's row changed: their live connections take the new role and user at once.
    pub fn update_user(&self, id: &str, role: Option<String>, user: serde_json::Value) {
        let mut state = self.write();
        let conns = state.user_conns(id);
        for conn in conns {
            let Some(old) = state.members.get(&conn).and_then(|m| m.principal.clone()) else {
                continue;
            };
            let updated = Principal {
                role: role.clone(),
                user: user.clone(),
                ..(*old).clone()
            };
            state.set_principal(conn, Some(Arc::new(updated)));
        }
    }

    /// Logs out every connection of a user (the user was removed), telling each why.
    pub fn logout_user(&self, id: &str, reason: &'static str) {
        let mut state = self.write();
        let conns = state.user_conns(id);
        for conn in conns {
            state.set_principal(conn, None);
            if let Some(member) = state.members.get(&conn) {
                self.offer(conn, member, Frame::Logout { reason });
            }
        }
    }

    /// Subscribes a connection to one service. Live as soon as this returns: any batch
    /// published afterwards reaches the connection.
    pub fn subscribe(&self, conn: ConnId, service: Arc<str>, subscription: Subscription) {
        let mut state = self.write();
        let Some(member) = state.members.get_mut(&conn) else {
            return;
        };
        member.subscriptions.insert(service.clone(), subscription);
        state.by_service.entry(service).or_default().insert(conn);
    }

    /// Subscribes a connection to every service, as a Feathers socket is.
    pub fn subscribe_all(&self, conn: ConnId) {
        let mut state = self.write();
        let Some(member) = state.members.get_mut(&conn) else {
            return;
        };
        member.all_services = Some(Subscription::new(KindSet::ALL, None).without_moves());
        state.all_services.insert(conn);
    }

    /// Subscribes a connection that resumes from a position, replacing any subscription
    /// to the service (and superseding its replay, if one runs). Until the replay hands
    /// over ([`Hub::go_live`]), live events of this service are dropped for it: the replay
    /// sends them from the log.
    pub fn subscribe_replaying(&self, conn: ConnId, service: Arc<str>, mut subscription: Subscription) -> ReplayId {
        let replay = self.next_id.fetch_add(1, Ordering::Relaxed);
        subscription.resuming = Some(Resuming::new(replay));
        let mut state = self.write();
        if let Some(member) = state.members.get_mut(&conn) {
            member.subscriptions.insert(service.clone(), subscription);
            state.by_service.entry(service).or_default().insert(conn);
        }
        replay
    }

    /// Hands a replaying subscription over to live delivery once the replay has sent every
    /// event through `replayed_through` (a tick). If a later tick has started publishing,
    /// the replay must read on: with `hold`, live events after the newest started tick are
    /// held back from now on, and the replay reads up to that tick and then calls
    /// [`Hub::release`]; without, nothing changes and the replay may try again. Live events
    /// of ticks up to the hand-over tick stay dropped, so a tick that is half published at
    /// the hand-over is neither lost nor repeated.
    ///
    /// `synced` is queued at the hand-over, ahead of every live event (a snapshot's
    /// `synced` frame, with room for it reserved in the connection's queue).
    pub fn go_live(
        &self,
        conn: ConnId,
        service: &str,
        replay: ReplayId,
        replayed_through: i64,
        hold: bool,
        synced: Option<(mpsc::Permit<'_, Frame>, Frame)>,
    ) -> HandOver {
        // The write lock waits for any publish in flight: no event is being offered while
        // the position is compared and the hand-over point is set.
        let state = self.write();
        let Some(resuming) = resuming(&state, conn, service, replay) else {
            return HandOver::Superseded;
        };
        let started = self.started_tick.load(Ordering::SeqCst);
        if started <= replayed_through {
            resuming.live_after.store(replayed_through, Ordering::SeqCst);
            if let Some((permit, frame)) = synced {
                permit.send(frame);
            }
            self.progress.notify_waiters();
            return HandOver::Live;
        }
        if !hold {
            return HandOver::NotYet;
        }
        resuming.live_after.store(started, Ordering::SeqCst);
        if let Ok(mut held) = resuming.held.lock() {
            held.get_or_insert_with(Vec::new);
        }
        HandOver::ReadThrough(started)
    }

    /// Removes a replay's subscription (its resume could not start), unless a later
    /// subscribe replaced it.
    pub fn cancel_replay(&self, conn: ConnId, service: &str, replay: ReplayId) {
        let mut state = self.write();
        if resuming(&state, conn, service, replay).is_none() {
            return;
        }
        if let Some(member) = state.members.get_mut(&conn) {
            member.subscriptions.remove(service);
        }
        unindex(&mut state.by_service, service, conn);
        self.progress.notify_waiters();
    }

    /// Takes the live events held back during a replay's last pass, in order, for the
    /// replay to send at the connection's pace; events keep being held meanwhile. Once
    /// nothing is held the subscription is live (`Released::Live`) and later events are
    /// queued as usual, behind everything taken before. `Released::Gone` when the replay
    /// was superseded or the connection left.
    pub fn release(&self, conn: ConnId, service: &str, replay: ReplayId) -> Released {
        let state = self.write();
        let Some(resuming) = resuming(&state, conn, service, replay) else {
            return Released::Gone;
        };
        let Ok(mut held) = resuming.held.lock() else {
            return Released::Gone;
        };
        match held.as_mut() {
            Some(frames) if !frames.is_empty() => Released::More(std::mem::take(frames)),
            _ => {
                *held = None;
                self.progress.notify_waiters();
                Released::Live
            }
        }
    }

    /// The metrics the hub counts in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The newest tick whose events have started to be published.
    pub fn started_tick(&self) -> i64 {
        self.started_tick.load(Ordering::SeqCst)
    }

    pub fn unsubscribe(&self, conn: ConnId, service: &str) {
        let mut state = self.write();
        if let Some(member) = state.members.get_mut(&conn) {
            member.subscriptions.remove(service);
        }
        unindex(&mut state.by_service, service, conn);
        // A `sync` waiting on it answers now.
        self.progress.notify_waiters();
    }

    /// Whether the connection has a subscription to the service (live or replaying).
    pub fn is_subscribed(&self, conn: ConnId, service: &str) -> bool {
        self.read()
            .members
            .get(&conn)
            .is_some_and(|m| m.subscriptions.contains_key(service))
    }

    /// Whether the subscription is still `replay`'s (a later subscribe did not replace it).
    pub fn still_replaying(&self, conn: ConnId, service: &str, replay: ReplayId) -> bool {
        resuming(&self.read(), conn, service, replay).is_some()
    }

    /// Cuts a connection off with a reason.
    pub fn kick(&self, conn: ConnId, cutoff: Cutoff, reason: &'static str) {
        if cutoff == Cutoff::SlowConsumer {
            self.metrics.slow_consumer_disconnects.inc();
        }
        if let Some(member) = self.read().members.get(&conn) {
            member.kick.fire(cutoff, reason);
        }
    }

    /// Cuts off every connection with a subscription (all of them must start over).
    pub fn cut_off_subscribers(&self, cutoff: Cutoff, reason: &'static str) {
        let state = self.read();
        for member in state.members.values() {
            if !member.subscriptions.is_empty() || member.all_services.is_some() {
                member.kick.fire(cutoff, reason);
            }
        }
    }

    /// Records that events of `tick` are about to be published (ticks only move forward).
    pub fn begin_tick(&self, tick: i64) {
        if self.started_tick.fetch_max(tick, Ordering::SeqCst) < tick {
            self.ticks.notify_waiters();
        }
    }

    /// Records that every event of the ticks up to `tick` has been offered.
    pub fn end_ticks_through(&self, tick: i64) {
        // Also when the tick is the same: parked frames were just flushed.
        self.ended_tick.fetch_max(tick, Ordering::SeqCst);
        self.progress.notify_waiters();
    }

    /// Resolves when a tick ends or a replay hands over (create it before checking, so
    /// that no progress is missed).
    pub fn progressed(&self) -> tokio::sync::futures::Notified<'_> {
        self.progress.notified()
    }

    /// Queues `frame` for a connection once every event of `tick` and earlier ticks of
    /// `service` has been queued for it, so the client knows its copy reflects them. The
    /// check and the send happen under the hub's lock; `NotYet` when delivery has not got
    /// there (wait for [`Hub::progressed`] and try again).
    pub fn mark_delivered(
        &self,
        conn: ConnId,
        service: &str,
        tick: i64,
        permit: mpsc::Permit<'_, Frame>,
        frame: Frame,
    ) -> Marked {
        let state = self.read();
        let Some(member) = state.members.get(&conn) else {
            return Marked::Gone;
        };
        let Some(sub) = member.subscriptions.get(service) else {
            return Marked::NotSubscribed;
        };
        let live = sub.resuming.as_ref().is_none_or(|r| {
            r.live_after.load(Ordering::SeqCst) != i64::MAX && r.held.lock().is_ok_and(|h| h.is_none())
        });
        // Frames parked in the overflow would come after the mark: wait for the flush.
        let parked = member.overflow.lock().map_or(true, |o| !o.is_empty());
        if !live || parked || self.ended_tick.load(Ordering::SeqCst) < tick {
            return Marked::NotYet;
        }
        permit.send(frame);
        Marked::Sent
    }

    /// Queues a frame of a replay (a held event, its `synced` after the last pass) if the
    /// subscription is still that replay's; false when it is not.
    pub fn replay_frame(
        &self,
        conn: ConnId,
        service: &str,
        replay: ReplayId,
        permit: mpsc::Permit<'_, Frame>,
        frame: Frame,
    ) -> bool {
        let state = self.read();
        if resuming(&state, conn, service, replay).is_none() {
            return false;
        }
        permit.send(frame);
        true
    }

    /// Queues one snapshot page for a connection: the rows it may see (channels, filters,
    /// query and view, as for a live `created`), in the frame `render` makes of them, if the
    /// subscription is still this replay's (checked and sent under the hub's lock).
    pub fn snapshot_page(
        &self,
        conn: ConnId,
        replay: ReplayId,
        service: &str,
        rows: &mut [Prepared<'_>],
        permit: mpsc::Permit<'_, Frame>,
        render: impl FnOnce(Vec<serde_json::Value>) -> Frame,
    ) -> Replayed {
        let state = self.read();
        let Some((member, sub)) = replaying(&state, conn, service, replay) else {
            return Replayed::Stop;
        };
        let user = member.principal.as_deref();
        let visible = rows
            .iter()
            .filter(|prepared| may_filter(member, sub, prepared))
            .filter_map(|prepared| {
                let view = prepared.view_for(user)?;
                (scope(member, sub, prepared, reached(member, prepared)) == Scope::In)
                    .then(|| prepared.row_in_view(view))
            })
            .collect();
        permit.send(render(visible));
        Replayed::Sent
    }

    /// Resolves when a later tick starts publishing (create it before reading
    /// [`Hub::started_tick`], so no start is missed).
    pub fn tick_started(&self) -> tokio::sync::futures::Notified<'_> {
        self.ticks.notified()
    }

    /// Offers an event to every connection that may have it. Never blocks.
    pub fn publish(&self, prepared: &mut Prepared<'_>) {
        if prepared.event.kind == EventKind::Truncated {
            return self.publish_rowless(prepared);
        }
        {
            let state = self.read();
            let service: &str = &prepared.event.service;
            // The row's channels, then, for an update, the ones it left: a subscriber there
            // may see it leave. A connection found in the first part is in a channel the row
            // is in now.
            let lookup = |c: &String| state.channels.get(c.as_str());
            let mut channel_sets: Vec<&HashSet<ConnId>> = prepared.channels.iter().filter_map(lookup).collect();
            let now_sets = channel_sets.len();
            let left = prepared
                .old_channels
                .iter()
                .flatten()
                .filter(|c| !prepared.channels.contains(c));
            channel_sets.extend(left.filter_map(lookup));
            let in_channels: usize = channel_sets.iter().map(|s| s.len()).sum();
            let subscribers = state.by_service.get(service);
            let subscribed = subscribers.map_or(0, HashSet::len) + state.all_services.len();
            if in_channels <= subscribed {
                // Walk the channels' members, each connection once (where it is first found,
                // so in a channel the row is in now if it is in any).
                let mut seen = HashSet::new();
                let found = channel_sets
                    .iter()
                    .enumerate()
                    .flat_map(|(i, s)| s.iter().map(move |c| (c, i < now_sets)));
                for (conn, reached_now) in found {
                    if channel_sets.len() > 1 && !seen.insert(*conn) {
                        continue;
                    }
                    if let Some(member) = state.members.get(conn)
                        && let Some(sub) = member.subscription(service)
                    {
                        self.offer_to(*conn, member, sub, prepared, reached_now);
                    }
                }
            } else {
                // Walk the service's subscribers; keep those in one of the channels.
                let conns = subscribers.into_iter().flatten().chain(state.all_services.iter());
                for conn in conns {
                    let Some(member) = state.members.get(conn) else {
                        continue;
                    };
                    let reached_now = reached(member, prepared);
                    if let (true, Some(sub)) = (
                        reached_now || was_reached(member, prepared),
                        member.subscription(service),
                    ) {
                        self.offer_to(*conn, member, sub, prepared, reached_now);
                    }
                }
            }
        }
    }

    /// An event without a row (a truncate) goes to the service's subscribers that are in a
    /// channel any of its rows could reach.
    fn publish_rowless(&self, prepared: &mut Prepared<'_>) {
        let state = self.read();
        let service: &str = &prepared.event.service;
        let subscribers = state.by_service.get(service).into_iter().flatten();
        for conn in subscribers.chain(state.all_services.iter()) {
            let Some(member) = state.members.get(conn) else {
                continue;
            };
            if let (true, Some(sub)) = (reached(member, prepared), member.subscription(service)) {
                self.offer_to(*conn, member, sub, prepared, true);
            }
        }
    }

    /// Logs out every logged-in connection, telling each why (the users table was emptied).
    pub fn logout_everyone(&self, reason: &'static str) {
        let mut state = self.write();
        let conns: Vec<ConnId> = state.by_user.values().flatten().copied().collect();
        for conn in conns {
            state.set_principal(conn, None);
            if let Some(member) = state.members.get(&conn) {
                self.offer(conn, member, Frame::Logout { reason });
            }
        }
    }

    /// Joins a connection to a broadcast topic (apart from the channels events go to: a
    /// client names its topics, never its channels).
    pub fn join_topic(&self, conn: ConnId, topic: &str) {
        let mut state = self.write();
        let name: Arc<str> = Arc::from(topic);
        let Some(member) = state.members.get_mut(&conn) else {
            return;
        };
        member.topics.insert(name.clone());
        state.topics.entry(name).or_default().insert(conn);
    }

    pub fn leave_topic(&self, conn: ConnId, topic: &str) {
        let mut state = self.write();
        if let Some(member) = state.members.get_mut(&conn) {
            member.topics.remove(topic);
        }
        unindex(&mut state.topics, topic, conn);
    }

    /// Sends a message to every connection on the topic (the sender too, with `to_sender`).
    /// Best effort, as on Supabase: a connection whose queue is full misses it (counted in
    /// `quill_broadcasts_dropped_total`); it never waits.
    pub fn broadcast(&self, from: ConnId, message: Broadcast, to_sender: bool) {
        let state = self.read();
        let Some(conns) = state.topics.get(&message.topic) else {
            return;
        };
        let message = Arc::new(message);
        for conn in conns {
            if *conn == from && !to_sender {
                continue;
            }
            if let Some(member) = state.members.get(conn) {
                if member.offer_if_room(Frame::Broadcast(message.clone())) {
                    self.metrics.broadcasts_delivered.inc();
                } else {
                    self.metrics.broadcasts_dropped.inc();
                }
            }
        }
    }

    /// Offers an event to a connection's Supabase-style channels on the service: one frame
    /// per channel whose bindings it matches, naming those bindings.
    fn offer_routes(
        &self,
        conn: ConnId,
        member: &Member,
        sub: &Subscription,
        prepared: &mut Prepared<'_>,
        reached_now: bool,
    ) {
        let user = member.principal.as_deref();
        let event = prepared.event;
        let Some(view) = prepared.view_for(user).filter(|_| reached_now) else {
            self.metrics.events_filtered.inc();
            return;
        };
        // The old row of an update only for a reader who could see it before.
        let old_view = prepared.old_view_for(user, was_reached(member, prepared));
        // A filter on a column the user can no longer see (a new login) would reveal it.
        let checked = sub.checked_for(user);
        let mut delivered = false;
        for route in &sub.routes {
            let matched = route
                .bindings
                .iter()
                .filter(|b| b.kinds.contains(event.kind))
                .filter(|b| {
                    b.query
                        .as_ref()
                        .is_none_or(|q| (checked || prepared.may_filter_on(user, q)) && q.matches(&event.data))
                })
                .fold(0u64, |acc, b| acc | (1 << b.index));
            if matched == 0 {
                continue;
            }
            let Some(record) = prepared.record(view, old_view) else {
                break;
            };
            let frame = Frame::Routed {
                record,
                topic: route.topic.clone(),
                matched,
            };
            delivered |= self.offer(conn, member, frame);
        }
        if delivered {
            self.metrics.events_delivered.inc();
        } else {
            self.metrics.events_filtered.inc();
        }
    }

    /// Offers the event to one subscriber; `reached_now` says whether the row is in one of
    /// its channels now (the caller knows, and asking again costs a lookup per channel).
    fn offer_to(
        &self,
        conn: ConnId,
        member: &Member,
        sub: &Subscription,
        prepared: &mut Prepared<'_>,
        reached_now: bool,
    ) {
        if !sub.routes.is_empty() {
            return self.offer_routes(conn, member, sub, prepared, reached_now);
        }
        let event = prepared.event;
        let view = prepared.view_for(member.principal.as_deref());
        let scope = match may_filter(member, sub, prepared) {
            true => scope(member, sub, prepared, view.is_some() && reached_now),
            false => Scope::Out,
        };
        let mut frame = match (scope, view) {
            (Scope::In, Some(view)) => Frame::Event(prepared.frame(view)),
            (Scope::MovedIn, Some(view)) => Frame::Event(prepared.moved_in_frame(view)),
            (Scope::MovedOut, _) => Frame::Event(prepared.moved_out_frame()),
            _ => {
                self.metrics.events_filtered.inc();
                return;
            }
        };
        if let Some(resuming) = &sub.resuming {
            if event.position.tick <= resuming.live_after.load(Ordering::SeqCst) {
                return; // the replay sends it
            }
            frame = match resuming.hold(frame) {
                Held::Kept => return,
                Held::NotHolding(live) => live,
                Held::Overflow => {
                    if !member.kick.is_fired() {
                        self.metrics.slow_consumer_disconnects.inc();
                        member
                            .kick
                            .fire(Cutoff::SlowConsumer, "slow consumer: resume fell behind live delivery");
                    }
                    return;
                }
            };
        }
        if self.offer(conn, member, frame) {
            self.metrics.events_delivered.inc();
        }
    }

    /// Offers a frame to a member; false when the connection is gone.
    fn offer(&self, conn: ConnId, member: &Member, frame: Frame) -> bool {
        match member.offer(frame) {
            Offered::Queued => true,
            Offered::Parked { first } => {
                if first {
                    self.parked.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
                }
                true
            }
            Offered::Gone => false,
        }
    }

    /// Queues a replayed event for one connection, if it may have it now (same channels,
    /// filters and view as a live event) and the subscription is still this replay's. The
    /// check and the send happen under the hub's lock, so a subscribe that supersedes the
    /// replay is never followed by one of its events.
    pub fn replay_event(
        &self,
        conn: ConnId,
        replay: ReplayId,
        prepared: &mut Prepared<'_>,
        permit: mpsc::Permit<'_, Frame>,
    ) -> Replayed {
        let state = self.read();
        let Some((member, sub)) = replaying(&state, conn, &prepared.event.service, replay) else {
            return Replayed::Stop;
        };
        if !may_filter(member, sub, prepared) {
            return Replayed::Skip;
        }
        let view = prepared.view_for(member.principal.as_deref());
        let frame = match (
            scope(member, sub, prepared, view.is_some() && reached(member, prepared)),
            view,
        ) {
            (Scope::In, Some(view)) => prepared.frame(view),
            (Scope::MovedIn, Some(view)) => prepared.moved_in_frame(view),
            (Scope::MovedOut, _) => prepared.moved_out_frame(),
            _ => return Replayed::Skip,
        };
        permit.send(Frame::Event(frame));
        Replayed::Sent
    }

    /// Waits until every connection with parked frames has taken them, for at most
    /// `timeout`; a connection that has not by then is cut off as a slow consumer. The
    /// pipeline calls this after each page, so healthy clients set the pace and a stalled
    /// one delays the others by at most `timeout`, once.
    pub async fn flush(&self, timeout: Duration) {
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|p| p.into_inner()));
        if parked.is_empty() {
            return;
        }
        let pending: Vec<(mpsc::Sender<Frame>, Kick, Vec<Frame>)> = {
            let state = self.read();
            parked
                .iter()
                .filter_map(|conn| state.members.get(conn))
                .filter(|m| !m.kick.is_fired())
                .filter_map(|m| {
                    let mut overflow = m.overflow.lock().ok()?;
                    (!overflow.is_empty()).then(|| (m.tx.clone(), m.kick.clone(), overflow.drain(..).collect()))
                })
                .collect()
        };
        if pending.is_empty() {
            return;
        }
        let drains = pending.into_iter().map(|(tx, kick, frames)| async move {
            let send_all = async {
                for frame in frames {
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
            };
            let drained = tokio::select! {
                drained = tokio::time::timeout(timeout, send_all) => drained,
                // Cut off meanwhile (the socket's write deadline): stop waiting for it.
                _ = kick.token.cancelled() => Ok(()),
            };
            if drained.is_err() {
                self.metrics.slow_consumer_disconnects.inc();
                kick.fire(Cutoff::SlowConsumer, SLOW_CONSUMER);
            }
        });
        futures::future::join_all(drains).await;
    }

    /// The number of live connections.
    pub fn connections(&self) -> usize {
        self.read().members.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A poisoned lock means a panic mid-update elsewhere; the maps are still usable.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests;

/// What [`Hub::go_live`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum HandOver {
    /// Live from now on.
    Live,
    /// Read up to this tick, then [`Hub::release`]; later live events are held meanwhile.
    ReadThrough(i64),
    /// A later tick started: read on and try again.
    NotYet,
    /// Another subscribe replaced this replay's subscription, or the connection left.
    Superseded,
}

/// What [`Hub::release`] hands back.
pub enum Released {
    /// Held events to send, in order; call again afterwards.
    More(Vec<Frame>),
    /// Nothing was held: live from now on.
    Live,
    /// The replay's subscription is gone.
    Gone,
}

/// What [`Hub::mark_delivered`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Marked {
    Sent,
    NotYet,
    /// The connection has no subscription to the service.
    NotSubscribed,
    /// The connection left.
    Gone,
}

/// What a replayed event makes for its connection.
pub enum Replayed {
    Sent,
    /// Not for this connection (channels, filters, view).
    Skip,
    /// The replay's subscription is gone: stop.
    Stop,
}

/// Whether the connection's user may still filter on the subscription's query: it was
/// checked at subscribe time, and the user may have logged in or out or changed role since
/// (a filter on a column it cannot see would tell it that column's values).
fn may_filter(member: &Member, sub: &Subscription, prepared: &Prepared<'_>) -> bool {
    let user = member.principal.as_deref();
    match &sub.query {
        Some(query) if !sub.checked_for(user) => prepared.may_filter_on(user, query),
        _ => true,
    }
}

/// A connection and its subscription to `service`, if that is still `replay`'s.
fn replaying<'s>(
    state: &'s State,
    conn: ConnId,
    service: &str,
    replay: ReplayId,
) -> Option<(&'s Member, &'s Subscription)> {
    let member = state.members.get(&conn)?;
    let sub = member.subscriptions.get(service)?;
    sub.resuming
        .as_ref()
        .is_some_and(|r| r.replay == replay)
        .then_some((member, sub))
}

/// The resume state of a replay's subscription, if it is still that replay's.
fn resuming<'s>(state: &'s State, conn: ConnId, service: &str, replay: ReplayId) -> Option<&'s Resuming> {
    replaying(state, conn, service, replay).and_then(|(_, sub)| sub.resuming.as_ref())
}
