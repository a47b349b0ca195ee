//! One connection as the hub sees it: its queue, its user, its channels, its subscriptions.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::event::{ChangeRecord, EventKind, RenderedEvent};
use crate::service::query::Query;

/// Identifies one live connection.
pub type ConnId = u64;

/// What a connection's queue carries; each transport encodes it its own way.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A finished `/ws` text frame (a reply).
    Text(Bytes),
    Event(Arc<RenderedEvent>),
    /// A change for a Supabase-style channel: its record, the channel, and which of the
    /// channel's bindings it matched (bit i: binding i).
    Routed {
        record: Arc<ChangeRecord>,
        topic: Arc<Topic>,
        matched: u64,
    },
    /// A client-to-client message on a topic.
    Broadcast(Arc<Broadcast>),
    /// The connection's user was logged out by the server (removed, token expired).
    Logout {
        reason: &'static str,
    },
}

/// The event kinds a subscription wants, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    pub const ALL: KindSet = KindSet(0b1_1111);

    pub fn of(kinds: &[EventKind]) -> KindSet {
        KindSet(kinds.iter().fold(0, |acc, k| acc | Self::bit(*k)))
    }

    fn bit(kind: EventKind) -> u8 {
        match kind {
            EventKind::Created => 1,
            EventKind::Updated => 2,
            EventKind::Patched => 4,
            EventKind::Removed => 8,
            EventKind::Truncated => 16,
        }
    }

    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & Self::bit(kind) != 0
    }
}

/// A Supabase-style channel a connection joined: each change for it names the channel and
/// the bindings it matched.
#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    /// The bindings' ids, in the order the client gave them.
    pub ids: Vec<i64>,
    /// Set when the client leaves: frames still queued for it are not written.
    left: AtomicBool,
}

impl Topic {
    /// The most bindings one topic may have (a frame's matches are a 64-bit set).
    pub const MAX_BINDINGS: usize = 64;

    pub fn new(name: Arc<str>, ids: Vec<i64>) -> Self {
        Self {
            name,
            ids,
            left: AtomicBool::new(false),
        }
    }

    pub fn leave(&self) {
        self.left.store(true, Ordering::SeqCst);
    }

    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::SeqCst)
    }

    /// The ids of the bindings in `matched`.
    pub fn matched_ids(&self, matched: u64) -> impl Iterator<Item = i64> + '_ {
        self.ids
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i < 64 && matched & (1 << i) != 0)
            .map(|(_, id)| *id)
    }
}

/// One topic's bindings on one service.
pub struct Route {
    pub topic: Arc<Topic>,
    pub bindings: Vec<Binding>,
}

/// A binding: which kinds of change, and which rows (the same operators as `find`).
#[derive(Clone)]
pub struct Binding {
    /// Its place in the topic's list (below [`Topic::MAX_BINDINGS`]).
    pub index: usize,
    pub kinds: KindSet,
    pub query: Option<Arc<Query>>,
}

/// A message one client sends to the others on a topic, as it is written to them.
#[derive(Debug)]
pub struct Broadcast {
    pub topic: Arc<str>,
    /// The message (a JSON object), as the sender gave it.
    pub payload: Bytes,
}

/// One connection's subscription to one service.
pub struct Subscription {
    pub kinds: KindSet,
    /// Only rows matching this query (same operators as `find`).
    pub query: Option<Arc<Query>>,
    /// Supabase-style channels on this service: set, each change goes to each channel whose
    /// bindings it matches, and `kinds` and `query` are only the union.
    pub(super) routes: Vec<Route>,
    /// Whether an update that moves the row into or out of scope is announced as such
    /// (`/ws`); without, the row is judged where it now is.
    pub(super) moves: bool,
    /// Set while a replay sends what the connection missed.
    pub(super) resuming: Option<Resuming>,
    /// Who the query was checked for (id and role; `None`: anonymous). For anyone else the
    /// hub checks again that it may filter on the query's columns.
    querier: Option<(String, Option<String>)>,
}

impl Subscription {
    pub fn new(kinds: KindSet, query: Option<Arc<Query>>) -> Self {
        Self {
            kinds,
            query,
            routes: Vec::new(),
            moves: true,
            resuming: None,
            querier: None,
        }
    }

    /// The subscription of a connection's Supabase-style channels on one service.
    pub fn routed(routes: Vec<Route>) -> Self {
        let kinds = routes
            .iter()
            .flat_map(|r| r.bindings.iter())
            .fold(0, |acc, b| acc | b.kinds.0);
        Self {
            routes,
            moves: false,
            ..Self::new(KindSet(kinds), None)
        }
    }

    /// Judged where the row now is, never as a scope move (a Feathers socket's view).
    pub(super) fn without_moves(mut self) -> Self {
        self.moves = false;
        self
    }

    /// Records who the query was checked for (see [`Subscription::checked_for`]).
    pub fn for_caller(mut self, caller: Option<&Principal>) -> Self {
        self.querier = caller.map(|c| (c.id.clone(), c.role.clone()));
        self
    }

    /// Whether the query was checked for this caller (same id and role).
    pub(super) fn checked_for(&self, caller: Option<&Principal>) -> bool {
        match (&self.querier, caller) {
            (None, None) => true,
            (Some((id, role)), Some(c)) => *id == c.id && *role == c.role,
            _ => false,
        }
    }

    pub fn wants(&self, kind: EventKind, row: &serde_json::Value) -> bool {
        self.kinds.contains(kind) && self.matches(kind, row)
    }

    /// Whether the row is in the query's scope (any row, without a query).
    pub fn matches(&self, kind: EventKind, row: &serde_json::Value) -> bool {
        // A truncate empties every query's rows: it has no row to match.
        kind == EventKind::Truncated || self.query.as_ref().is_none_or(|q| q.matches(row))
    }
}

/// Names one replay: a later subscribe to the same service supersedes it.
pub type ReplayId = u64;

/// How many live events a subscription holds back while its replay makes its last pass;
/// a replay that cannot finish before more arrive is cut off (it may resume again).
const HELD_LIMIT: usize = 10_000;

/// A subscription that resumes from a position: a replay sends the events it missed, then
/// hands over to live delivery.
pub(super) struct Resuming {
    pub(super) replay: ReplayId,
    /// Live events of ticks up to this one are dropped (the replay sends them); `i64::MAX`
    /// until the hand-over.
    pub(super) live_after: AtomicI64,
    /// During the replay's last pass: the live events after `live_after`, in order, to be
    /// queued when it ends.
    pub(super) held: Mutex<Option<Vec<Frame>>>,
}

impl Resuming {
    pub(super) fn new(replay: ReplayId) -> Self {
        Self {
            replay,
            live_after: AtomicI64::new(i64::MAX),
            held: Mutex::new(None),
        }
    }

    /// Keeps a live event back while the replay finishes.
    pub(super) fn hold(&self, frame: Frame) -> Held {
        let Ok(mut held) = self.held.lock() else {
            return Held::Overflow;
        };
        match held.as_mut() {
            None => Held::NotHolding(frame),
            Some(frames) if frames.len() >= HELD_LIMIT => Held::Overflow,
            Some(frames) => {
                frames.push(frame);
                Held::Kept
            }
        }
    }
}

/// What [`Resuming::hold`] did with a frame.
pub(super) enum Held {
    Kept,
    /// Not in the last pass: deliver it now.
    NotHolding(Frame),
    /// Too many held: the replay falls too far behind.
    Overflow,
}

/// Why quill cut a connection off; each transport says it its own way (a `/ws` close code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutoff {
    /// It did not take what was sent fast enough; it may resume with `since`.
    SlowConsumer,
    /// It sent nothing, not even a pong, for the idle timeout.
    Idle,
    /// quill cannot vouch for what it missed (the change log has a gap): reload, then
    /// subscribe afresh.
    Reload,
}

/// Why and when a connection was cut off by the hub.
#[derive(Clone, Default)]
pub struct Kick {
    pub(super) token: CancellationToken,
    /// Set before the token is cancelled: the hub asks for every frame it offers, and asking
    /// the token takes its lock.
    fired: Arc<AtomicBool>,
    reason: Arc<Mutex<Option<(Cutoff, &'static str)>>>,
}

impl Kick {
    pub fn fire(&self, cutoff: Cutoff, reason: &'static str) {
        if let Ok(mut slot) = self.reason.lock() {
            slot.get_or_insert((cutoff, reason));
        }
        self.fired.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether the connection has been cut off.
    pub(super) fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Resolves when the connection must close; gives the reason.
    pub async fn fired(&self) -> (Cutoff, &'static str) {
        self.token.cancelled().await;
        self.reason
            .lock()
            .ok()
            .and_then(|r| *r)
            .unwrap_or((Cutoff::SlowConsumer, "closed by the server"))
    }
}

pub(super) struct Member {
    pub(super) tx: mpsc::Sender<Frame>,
    pub(super) kick: Kick,
    /// Frames that did not fit in the queue during the current page, in order. Drained by
    /// `Hub::flush` before the next page, so it never holds more than one page.
    pub(super) overflow: Mutex<VecDeque<Frame>>,
    pub(super) principal: Option<Arc<Principal>>,
    pub(super) channels: HashSet<Arc<str>>,
    /// The broadcast topics it joined.
    pub(super) topics: HashSet<Arc<str>>,
    pub(super) subscriptions: HashMap<Arc<str>, Subscription>,
    /// Subscribed to every service (socket.io connections, as in Feathers).
    pub(super) all_services: Option<Subscription>,
}

impl Member {
    pub(super) fn new(tx: mpsc::Sender<Frame>, kick: Kick) -> Self {
        Self {
            tx,
            kick,
            overflow: Mutex::new(VecDeque::new()),
            principal: None,
            channels: HashSet::new(),
            topics: HashSet::new(),
            subscriptions: HashMap::new(),
            all_services: None,
        }
    }

    pub(super) fn subscription(&self, service: &str) -> Option<&Subscription> {
        self.subscriptions.get(service).or(self.all_services.as_ref())
    }

    /// Queues a frame only while the queue is at most a quarter full and nothing is
    /// parked; false otherwise. Best-effort frames (broadcasts) never fill a queue that
    /// events need, and a client that stopped reading holds few of them.
    pub(super) fn offer_if_room(&self, frame: Frame) -> bool {
        if self.kick.is_fired() || self.tx.capacity() * 4 < self.tx.max_capacity() * 3 {
            return false;
        }
        match self.overflow.lock() {
            Ok(overflow) if overflow.is_empty() => self.tx.try_send(frame).is_ok(),
            _ => false,
        }
    }

    /// Queues a frame, or parks it in the overflow (behind any frame already parked, so the
    /// order holds).
    pub(super) fn offer(&self, frame: Frame) -> Offered {
        // Cut off: it gets nothing more and costs nothing more.
        if self.kick.is_fired() {
            return Offered::Gone;
        }
        let Ok(mut overflow) = self.overflow.lock() else {
            return Offered::Gone;
        };
        if !overflow.is_empty() {
            overflow.push_back(frame);
            return Offered::Parked { first: false };
        }
        match self.tx.try_send(frame) {
            Ok(()) => Offered::Queued,
            Err(mpsc::error::TrySendError::Full(frame)) => {
                overflow.push_back(frame);
                Offered::Parked { first: true }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Offered::Gone,
        }
    }
}

/// What became of an offered frame.
pub(super) enum Offered {
    Queued,
    /// In the overflow; `first` if it was empty before.
    Parked {
        first: bool,
    },
    Gone,
}
