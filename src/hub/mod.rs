//! Fan-out: who is subscribed to what, and one bounded outgoing queue per connection.
//!
//! [`Hub::publish`] never waits: it serializes an event once, offers the shared bytes to each
//! subscriber's queue, and cuts off a connection whose queue is full (it can resume later).
//! The listener therefore never slows down for a slow client.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{EventKind, Position, ServiceEvent};
use crate::metrics::Metrics;

/// Identifies one live connection.
pub type ConnId = u64;

/// A serialized text frame (always UTF-8 JSON), shared by every receiver.
pub type Frame = Bytes;

/// The event kinds a subscription wants, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    pub const ALL: KindSet = KindSet(0b1111);

    pub fn of(kinds: &[EventKind]) -> KindSet {
        KindSet(kinds.iter().fold(0, |acc, k| acc | Self::bit(*k)))
    }

    fn bit(kind: EventKind) -> u8 {
        match kind {
            EventKind::Created => 1,
            EventKind::Updated => 2,
            EventKind::Patched => 4,
            EventKind::Removed => 8,
        }
    }

    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & Self::bit(kind) != 0
    }
}

struct Member {
    tx: mpsc::Sender<Frame>,
    kick: Kick,
    capacity: usize,
    /// Frames that did not fit in the queue during the current page, in order. Drained by
    /// [`Hub::flush`] before the next page, so it never holds more than one page.
    overflow: Mutex<VecDeque<Frame>>,
}

impl Member {
    /// Queues a frame, or parks it in the overflow (behind any frame already parked, so the
    /// order holds). Returns false when the connection is gone.
    fn offer(&self, frame: Frame) -> bool {
        let Ok(mut overflow) = self.overflow.lock() else {
            return false;
        };
        if !overflow.is_empty() {
            overflow.push_back(frame);
            return true;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(frame)) => {
                overflow.push_back(frame);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// One connection's subscription to one service.
struct Subscription {
    kinds: KindSet,
    /// Set when the subscription resumed from a position.
    resume: Option<Mutex<Resume>>,
}

/// A resumed subscription: events up to `skip_through` come from the replay, and live events
/// are held back in `held` until the replay has been sent.
struct Resume {
    skip_through: Position,
    held: Option<Vec<Frame>>,
}

/// Why and when a connection was cut off by the hub.
#[derive(Clone, Default)]
pub struct Kick {
    token: CancellationToken,
    reason: Arc<Mutex<Option<&'static str>>>,
}

impl Kick {
    fn fire(&self, reason: &'static str) {
        if let Ok(mut slot) = self.reason.lock() {
            slot.get_or_insert(reason);
        }
        self.token.cancel();
    }

    /// Resolves when the connection must close; gives the reason.
    pub async fn fired(&self) -> &'static str {
        self.token.cancelled().await;
        self.reason
            .lock()
            .ok()
            .and_then(|r| *r)
            .unwrap_or("closed by the server")
    }
}

#[derive(Default)]
struct State {
    members: HashMap<ConnId, Member>,
    /// service → subscriber → subscription
    subscriptions: HashMap<Arc<str>, HashMap<ConnId, Subscription>>,
}

/// The registry of live connections and their subscriptions.
pub struct Hub {
    state: RwLock<State>,
    next_id: AtomicU64,
    /// The newest tick whose events have started to be published.
    started_tick: AtomicI64,
    metrics: Arc<Metrics>,
}

/// A connection's end of the hub: its outgoing queue and its kick signal. Dropping it
/// removes the connection and all its subscriptions.
pub struct Membership {
    pub id: ConnId,
    pub frames: mpsc::Receiver<Frame>,
    /// Replies go through the same queue as events, so the socket has a single writer.
    pub replies: mpsc::Sender<Frame>,
    pub kick: Kick,
    hub: Arc<Hub>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

/// The wire form of an event on `/ws`.
#[derive(Serialize)]
struct EventFrame<'a> {
    event: &'static str,
    service: &'a str,
    data: &'a serde_json::Value,
    seq: i64,
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
            metrics,
        })
    }

    /// Registers a connection with an outgoing queue of `capacity` frames.
    pub fn join(self: &Arc<Self>, capacity: usize) -> Membership {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let kick = Kick::default();
        let member = Member {
            tx: tx.clone(),
            kick: kick.clone(),
            capacity: capacity.max(1),
            overflow: Mutex::new(VecDeque::new()),
        };
        self.write().members.insert(id, member);
        self.metrics.connections.inc();
        Membership {
            id,
            frames: rx,
            replies: tx,
            kick,
            hub: self.clone(),
        }
    }

    /// Subscribes a connection to a service's events. Live as soon as this returns: any
    /// batch published afterwards reaches the connection.
    pub fn subscribe(&self, conn: ConnId, service: Arc<str>, kinds: KindSet) {
        let mut state = self.write();
        if state.members.contains_key(&conn) {
            let sub = Subscription { kinds, resume: None };
            state.subscriptions.entry(service).or_default().insert(conn, sub);
        }
    }

    /// Subscribes a connection that resumes after `after`. Returns the tick the caller must
    /// replay up to (inclusive); live events up to there are dropped for this subscriber, and
    /// later ones are held until [`Hub::finish_replay`], so nothing is missed or repeated.
    pub fn subscribe_after(&self, conn: ConnId, service: Arc<str>, kinds: KindSet, after: Position) -> i64 {
        let mut state = self.write();
        // Read under the write lock: publishing takes the read lock, so no event of a later
        // tick can slip between this read and the registration.
        let until = self.started_tick.load(Ordering::SeqCst);
        if state.members.contains_key(&conn) {
            let skip_through = after.max(Position {
                tick: until,
                seq: i64::MAX,
            });
            let resume = Resume {
                skip_through,
                held: Some(Vec::new()),
            };
            let sub = Subscription {
                kinds,
                resume: Some(Mutex::new(resume)),
            };
            state.subscriptions.entry(service).or_default().insert(conn, sub);
        }
        until
    }

    /// Ends a replay: queues the live events held meanwhile and goes live.
    pub fn finish_replay(&self, conn: ConnId, service: &str) {
        let state = self.write();
        let (Some(member), Some(sub)) = (
            state.members.get(&conn),
            state.subscriptions.get(service).and_then(|subs| subs.get(&conn)),
        ) else {
            return;
        };
        let held = sub
            .resume
            .as_ref()
            .and_then(|r| r.lock().ok().and_then(|mut r| r.held.take()))
            .unwrap_or_default();
        for frame in held {
            if member.tx.try_send(frame).is_err() {
                self.metrics.slow_consumer_disconnects.inc();
                member.kick.fire(SLOW_CONSUMER);
                return;
            }
            self.metrics.events_delivered.inc();
        }
    }

    /// Cuts a connection off with a reason.
    pub fn kick(&self, conn: ConnId, reason: &'static str) {
        if let Some(member) = self.read().members.get(&conn) {
            member.kick.fire(reason);
        }
    }

    /// Records that events of `tick` are about to be published (ticks only move forward).
    pub fn begin_tick(&self, tick: i64) {
        self.started_tick.fetch_max(tick, Ordering::SeqCst);
    }

    pub fn unsubscribe(&self, conn: ConnId, service: &str) {
        let mut state = self.write();
        if let Some(subs) = state.subscriptions.get_mut(service) {
            subs.remove(&conn);
            if subs.is_empty() {
                state.subscriptions.remove(service);
            }
        }
    }

    fn remove(&self, conn: ConnId) {
        let mut state = self.write();
        if state.members.remove(&conn).is_some() {
            self.metrics.connections.dec();
        }
        state.subscriptions.retain(|_, subs| {
            subs.remove(&conn);
            !subs.is_empty()
        });
    }

    /// Offers an event to every subscriber. Serializes it once; never blocks.
    pub fn publish(&self, event: &ServiceEvent) {
        let mut frame: Option<Frame> = None;
        let mut full = Vec::new();
        {
            let state = self.read();
            let Some(subs) = state.subscriptions.get(&*event.service) else {
                return;
            };
            for (conn, sub) in subs {
                if !sub.kinds.contains(event.kind) {
                    self.metrics.events_filtered.inc();
                    continue;
                }
                let Some(member) = state.members.get(conn) else {
                    continue;
                };
                let bytes = frame.get_or_insert_with(|| encode(event)).clone();
                if let Some(resume) = &sub.resume
                    && let Ok(mut resume) = resume.lock()
                {
                    if event.position <= resume.skip_through {
                        continue;
                    }
                    if let Some(held) = &mut resume.held {
                        if held.len() >= member.capacity {
                            full.push(member.kick.clone());
                        } else {
                            held.push(bytes);
                        }
                        continue;
                    }
                }
                if member.offer(bytes) {
                    self.metrics.events_delivered.inc();
                }
            }
        }
        for kick in full {
            self.metrics.slow_consumer_disconnects.inc();
            kick.fire(SLOW_CONSUMER);
        }
    }

    /// Waits until every connection with parked frames has taken them, for at most
    /// `timeout`; a connection that has not by then is cut off as a slow consumer. The
    /// pipeline calls this after each page, so healthy clients set the pace and a stalled
    /// one delays the others by at most `timeout`, once.
    pub async fn flush(&self, timeout: Duration) {
        let pending: Vec<(mpsc::Sender<Frame>, Kick, VecDeque<Frame>)> = {
            let state = self.read();
            state
                .members
                .values()
                .filter_map(|m| {
                    let mut overflow = m.overflow.lock().ok()?;
                    (!overflow.is_empty()).then(|| (m.tx.clone(), m.kick.clone(), std::mem::take(&mut *overflow)))
                })
                .collect()
        };
        if pending.is_empty() {
            return;
        }
        let drains = pending.into_iter().map(|(tx, kick, frames)| async move {
            let drained = tokio::time::timeout(timeout, async {
                for frame in frames {
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if drained.is_err() {
                self.metrics.slow_consumer_disconnects.inc();
                kick.fire(SLOW_CONSUMER);
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

const SLOW_CONSUMER: &str = "slow consumer: outgoing queue full";

/// The `/ws` frame of an event.
pub fn encode(event: &ServiceEvent) -> Frame {
    let frame = EventFrame {
        event: event.kind.as_str(),
        service: &event.service,
        data: &event.data,
        seq: event.position.seq,
    };
    // Serializing a Value into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&frame).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(seq: i64) -> ServiceEvent {
        ServiceEvent {
            service: Arc::from("messages"),
            kind: EventKind::Created,
            data: json!({"id": seq}),
            position: Position { tick: seq, seq },
        }
    }

    #[tokio::test]
    async fn a_connection_that_stays_full_is_cut_off_at_flush_and_others_keep_everything() {
        let hub = Hub::new();
        let mut fast = hub.join(2);
        let slow = hub.join(2);
        hub.subscribe(fast.id, Arc::from("messages"), KindSet::ALL);
        hub.subscribe(slow.id, Arc::from("messages"), KindSet::ALL);
        for seq in 0..5 {
            hub.publish(&event(seq));
        }
        let reader = tokio::spawn(async move {
            let mut seqs = Vec::new();
            for _ in 0..5 {
                let frame = fast.frames.recv().await.expect("fast gets every event");
                let v: serde_json::Value = serde_json::from_slice(&frame).expect("json");
                seqs.push(v["seq"].as_i64().expect("seq"));
            }
            (fast, seqs)
        });
        hub.flush(Duration::from_millis(200)).await;
        let (fast, seqs) = reader.await.expect("reader");
        assert_eq!(seqs, [0, 1, 2, 3, 4], "parked frames keep their order");
        assert_eq!(slow.kick.fired().await, SLOW_CONSUMER);
        assert!(!fast.kick.token.is_cancelled());
    }

    #[tokio::test]
    async fn a_resumed_subscription_drops_replayed_events_and_holds_later_ones() {
        let hub = Hub::new();
        let mut m = hub.join(8);
        hub.begin_tick(5);
        let until = hub.subscribe_after(m.id, Arc::from("messages"), KindSet::ALL, Position { tick: 3, seq: 30 });
        assert_eq!(until, 5);
        hub.publish(&ServiceEvent {
            position: Position { tick: 5, seq: 51 },
            ..event(51)
        });
        hub.begin_tick(6);
        hub.publish(&ServiceEvent {
            position: Position { tick: 6, seq: 60 },
            ..event(60)
        });
        assert!(m.frames.try_recv().is_err(), "held during the replay");
        hub.finish_replay(m.id, "messages");
        let frame = m.frames.try_recv().expect("released after the replay");
        assert!(std::str::from_utf8(&frame).expect("utf8").contains("\"seq\":60"));
        assert!(m.frames.try_recv().is_err(), "tick 5 was the replay's, not live");
    }

    #[tokio::test]
    async fn kinds_filter_and_drop_unsubscribes() {
        let hub = Hub::new();
        let mut m = hub.join(4);
        hub.subscribe(m.id, Arc::from("messages"), KindSet::of(&[EventKind::Removed]));
        hub.publish(&event(1));
        assert!(m.frames.try_recv().is_err(), "created is not wanted");
        drop(m);
        assert_eq!(hub.connections(), 0);
        assert!(hub.read().subscriptions.is_empty());
    }
}
