//! Fan-out: who is subscribed to what, and one bounded outgoing queue per connection.
//!
//! [`Hub::publish`] never waits: it serializes an event once, offers the shared bytes to each
//! subscriber's queue, and cuts off a connection whose queue is full (it can resume later).
//! The listener therefore never slows down for a slow client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{EventKind, ServiceEvent};

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
    /// service → subscriber → kinds
    subscriptions: HashMap<Arc<str>, HashMap<ConnId, KindSet>>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct HubStats {
    pub delivered: AtomicU64,
    pub slow_consumer_drops: AtomicU64,
}

/// The registry of live connections and their subscriptions.
#[derive(Default)]
pub struct Hub {
    state: RwLock<State>,
    next_id: AtomicU64,
    pub stats: HubStats,
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
        Arc::new(Hub::default())
    }

    /// Registers a connection with an outgoing queue of `capacity` frames.
    pub fn join(self: &Arc<Self>, capacity: usize) -> Membership {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let kick = Kick::default();
        let member = Member {
            tx: tx.clone(),
            kick: kick.clone(),
        };
        self.write().members.insert(id, member);
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
            state
                .subscriptions
                .entry(service)
                .or_default()
                .insert(conn, kinds);
        }
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
        state.members.remove(&conn);
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
            for (conn, kinds) in subs {
                if !kinds.contains(event.kind) {
                    continue;
                }
                let Some(member) = state.members.get(conn) else {
                    continue;
                };
                let bytes = frame.get_or_insert_with(|| encode(event)).clone();
                match member.tx.try_send(bytes) {
                    Ok(()) => {
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => full.push(member.kick.clone()),
                    // the session is already gone; Membership::drop cleans up
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        for kick in full {
            self.stats
                .slow_consumer_drops
                .fetch_add(1, Ordering::Relaxed);
            kick.fire("slow consumer: outgoing queue full");
        }
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

fn encode(event: &ServiceEvent) -> Frame {
    let frame = EventFrame {
        event: event.kind.as_str(),
        service: &event.service,
        data: &event.data,
        seq: event.seq,
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
            seq,
        }
    }

    #[tokio::test]
    async fn a_full_queue_kicks_only_that_connection() {
        let hub = Hub::new();
        let mut fast = hub.join(4);
        let slow = hub.join(2);
        hub.subscribe(fast.id, Arc::from("messages"), KindSet::ALL);
        hub.subscribe(slow.id, Arc::from("messages"), KindSet::ALL);
        for seq in 0..3 {
            hub.publish(&event(seq));
            let frame = fast.frames.recv().await.expect("fast gets every event");
            assert!(
                std::str::from_utf8(&frame)
                    .expect("utf8")
                    .contains(&format!("\"seq\":{seq}"))
            );
        }
        assert_eq!(
            slow.kick.fired().await,
            "slow consumer: outgoing queue full"
        );
        assert!(!fast.kick.token.is_cancelled());
    }

    #[tokio::test]
    async fn kinds_filter_and_drop_unsubscribes() {
        let hub = Hub::new();
        let mut m = hub.join(4);
        hub.subscribe(
            m.id,
            Arc::from("messages"),
            KindSet::of(&[EventKind::Removed]),
        );
        hub.publish(&event(1));
        assert!(m.frames.try_recv().is_err(), "created is not wanted");
        drop(m);
        assert_eq!(hub.connections(), 0);
        assert!(hub.read().subscriptions.is_empty());
    }
}
