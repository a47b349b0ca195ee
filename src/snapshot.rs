//! A subscription that starts from a consistent snapshot: the rows that match, read in one
//! REPEATABLE READ transaction, then every change after that read, each exactly once.
//!
//! The read's first statement fixes its snapshot and finds where it stands in the change log
//! ([`change::snapshot_point`]): the newest tick it sees, and the later changes it already
//! holds. The replay that follows ([`resume::replay`]) starts after that tick and leaves
//! those out, so every change is either in the snapshot or sent after it. Transports call
//! it; it knows no protocol.

use serde_json::Value;
use sqlx::PgPool;

use crate::change;
use crate::event::{EventKind, Position, ServiceEvent};
use crate::hub::{Frame, Replayed};
use crate::resume::{ResumeFailed, Start, Subscriber};
use crate::service::Service;
use crate::service::query::Query;
use crate::store;

/// Rows read per page (one frame at most each).
const PAGE_ROWS: u32 = 500;

/// Builds a snapshot frame of rows; `true` for the first page of a snapshot that replaces
/// the client's copy (`"reset"`).
pub type SnapshotFrame = dyn Fn(Vec<Value>, bool) -> Frame + Send + Sync;

/// An open snapshot read: its transaction, its place in the change log and its cursor.
pub struct Snapshot {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    point: change::SnapshotPoint,
}

impl Snapshot {
    /// Starts the read of the rows of `service` matching `query`. Fails (before anything is
    /// sent) when the database cannot be read.
    pub async fn open(pool: &PgPool, service: &Service, query: Option<&Query>) -> Result<Snapshot, ResumeFailed> {
        let table = service.table();
        let mut tx = pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(change::ChangeError::from)?;
        let point = change::snapshot_point(&mut tx, &table.schema, &table.name).await?;
        let filter = query.map(|q| q.filter.as_slice()).unwrap_or_default();
        store::open_scan(&mut tx, &table, filter)
            .await
            .map_err(ResumeFailed::Read)?;
        Ok(Snapshot { tx, point })
    }

    /// Sends the rows the connection may see (as a live `created` of each would reach it),
    /// page by page at the connection's pace, for the replaying subscription `id`. Returns
    /// where the replay after it starts, or `None` when the connection left or a later
    /// subscribe superseded it. At least one frame is sent, so a reset always reaches the
    /// client.
    pub async fn send(
        mut self,
        to: Subscriber<'_>,
        page_frame: &SnapshotFrame,
        reset: bool,
    ) -> Result<Option<Start>, ResumeFailed> {
        let service = to.service;
        let position = Position {
            tick: self.point.tick,
            seq: i64::MAX,
        };
        let mut first = true;
        loop {
            let rows = store::scan_page(&mut self.tx, PAGE_ROWS)
                .await
                .map_err(ResumeFailed::Read)?;
            let last = rows.len() < PAGE_ROWS as usize;
            if rows.is_empty() && !first {
                break;
            }
            let events: Vec<ServiceEvent> = rows
                .into_iter()
                .map(|mut row| {
                    service.strip(&mut row);
                    ServiceEvent {
                        service: service.name.clone(),
                        kind: EventKind::Created,
                        data: row,
                        old: None,
                        position,
                        written_us: None,
                    }
                })
                .collect();
            let mut prepared: Vec<_> = events.iter().map(|e| service.policy.prepare(e)).collect();
            let Ok(permit) = to.frames.reserve().await else {
                return Ok(None);
            };
            let render = |rows| page_frame(rows, reset && first);
            if let Replayed::Stop =
                to.hub
                    .snapshot_page(to.conn, to.replay, &service.name, &mut prepared, permit, render)
            {
                return Ok(None);
            }
            first = false;
            if last {
                break;
            }
        }
        // Read only: nothing to keep.
        self.tx.rollback().await.map_err(change::ChangeError::from)?;
        Ok(Some(Start {
            after: position,
            skip: self.point.skip,
        }))
    }
}
