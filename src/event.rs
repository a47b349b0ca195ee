//! A service event: one committed change to one row, as subscribers see it.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use serde::Serialize;
use serde_json::Value;
use socketioxide_core::Str;

/// The Feathers event names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Created,
    Updated,
    Patched,
    Removed,
    /// The whole table was emptied (`TRUNCATE`): the event carries no row.
    Truncated,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Patched => "patched",
            Self::Removed => "removed",
            Self::Truncated => "truncated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(Self::Created),
            "updated" => Some(Self::Updated),
            "patched" => Some(Self::Patched),
            "removed" => Some(Self::Removed),
            "truncated" => Some(Self::Truncated),
            _ => None,
        }
    }
}

/// One change, ready for fan-out: the row is already stripped of hidden fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEvent {
    pub service: Arc<str>,
    pub kind: EventKind,
    /// The new row, or for `removed` the removed row.
    pub data: Value,
    /// For `updated` and `patched`: the row as it was, stripped like `data` (absent when
    /// the log has no old row). Decides which subscribers see the row leave their scope.
    pub old: Option<Value>,
    /// Where the event stands in the delivery order.
    pub position: Position,
    /// When the change was written (microseconds since the epoch; absent for snapshot rows).
    pub written_us: Option<i64>,
}

/// A place in the delivery order: the tick (commit-order batch) that delivered a change, and
/// the change's unique sequence number. Events are delivered in increasing position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub tick: i64,
    pub seq: i64,
}

/// An event rendered for one view, shared by every connection with that view.
#[derive(Debug)]
pub struct RenderedEvent {
    pub service: Arc<str>,
    pub kind: EventKind,
    pub seq: i64,
    /// The row as JSON.
    pub data: Bytes,
    /// The whole `/ws` frame.
    pub ws: Bytes,
    /// The Feathers socket.io payload (`["<service> <kind>", data]`), made by the first
    /// socket.io connection that sends this event and shared by the rest.
    pub socketio: OnceLock<Str>,
}

/// An event as a Supabase Realtime `postgres_changes` record (the `data` of its frame:
/// `schema`, `table`, `commit_timestamp`, `type`, `columns`, `errors`, `record`,
/// `old_record`), rendered for one view and shared by every connection with that view.
#[derive(Debug)]
pub struct ChangeRecord {
    pub seq: i64,
    pub data: Bytes,
}
