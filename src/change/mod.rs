//! Change capture, read side: committed changes from the change log, in commit order.
//!
//! [`listener`] keeps a dedicated LISTEN connection whose only job is to turn notifications
//! into a wake-up flag; [`log::LogReader`] cuts the log into ticks and reads each tick's
//! batch. Nothing downstream sees a notification: the log is the source of truth.

pub mod listener;
pub mod log;
pub mod monitor;
mod presence;
pub mod retention;

use std::future::Future;

use serde_json::Value;

pub use listener::{Wakeups, run_listener};
pub use log::{
    LogReader, Replay, ResumeError, SnapshotPoint, TxDelivery, TxidError, fetch_change, last_seq_of_tick, locate,
    newest_seq, newest_tick, snapshot_point, tx_delivery,
};

use crate::event::EventKind;

/// One logged change to one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub seq: i64,
    /// The tick that delivered it: with `seq`, its place in the delivery order.
    pub tick: i64,
    pub table_schema: String,
    pub table_name: String,
    pub kind: EventKind,
    pub row: Value,
    /// For an update: the row as it was before (absent for changes logged before quill
    /// recorded old rows).
    pub old: Option<Value>,
    /// When the change was written (the trigger's clock, microseconds since the epoch).
    pub written_us: Option<i64>,
}

/// Why the change log could not be read. Always transient from the reader's point of view:
/// its position is kept, and the next call resumes where the failed one started.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("cannot read the change log")]
    Database(#[from] sqlx::Error),
    #[error("the change log holds an unknown kind '{0}'")]
    UnknownKind(String),
    #[error("no randomness for the reader's key")]
    Random,
    /// The stream that carries changes between instances failed.
    #[error("the cluster's change stream failed: {0}")]
    Stream(String),
    /// Changes after `after_tick` were pruned before this reader read them: they are lost
    /// to it. The reader has moved on past the gap; subscribers must reload.
    #[error("the change log was pruned past this reader's position (tick {after_tick}): events were lost")]
    Gap { after_tick: i64 },
}

impl ChangeError {
    /// The ticks being read were pruned (a reader fell behind the whole retention period).
    pub fn is_pruned(&self) -> bool {
        matches!(self, ChangeError::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("QL001"))
    }
}

/// A stream of committed changes.
///
/// Contract: every committed change is returned exactly once and nothing from a rolled-back
/// transaction ever is. Batches follow commit order; within a batch, changes follow `seq`, so
/// changes to one row come in the order they were made. On error nothing is consumed, except
/// [`ChangeError::Gap`]: changes were lost (pruned unread), the source has moved past them,
/// and whoever relied on seeing every change must start over.
pub trait ChangeSource: Send {
    /// The next non-empty batch, waiting as long as needed.
    fn next_batch(&mut self) -> impl Future<Output = Result<Vec<Change>, ChangeError>> + Send;

    /// The tick through which every change has been returned.
    fn read_through(&self) -> i64;

    /// Whether this source has fallen so far behind that its subscribers should resume
    /// elsewhere (a stream other instances read too).
    fn too_far_behind(&self) -> bool {
        false
    }
}
