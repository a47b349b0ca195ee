//! A subscription from a position: replay the missed changes from the log, then hand over to
//! live delivery with nothing lost or repeated. Transports call it; it knows no protocol.
//!
//! The replay chases the live reader: it reads up to the tick the hub last started to
//! publish, and hands over only if no later tick started meanwhile ([`Hub::go_live`]);
//! otherwise it reads the new ticks too. Live events of the service are dropped for the
//! subscriber until then, so memory stays bounded however long the replay runs.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc::Sender;

use crate::change::{self, ChangeError, Replay, ResumeError};
use crate::event::Position;
use crate::hub::{ConnId, Frame, Hub, Subscription};
use crate::pipeline::event_for;
use crate::service::Service;

/// How long a resume waits for this instance's reader to reach a position that another
/// instance already delivered.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Why a resume could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum ResumeFailed {
    #[error(transparent)]
    Position(#[from] ResumeError),
    #[error("position {since} is {behind} changes behind, more than one replay may cover ({limit})")]
    TooFarBehind { since: i64, behind: i64, limit: u64 },
    #[error("this instance has not yet delivered tick {0}")]
    Lagging(i64),
    #[error(transparent)]
    Change(#[from] ChangeError),
}

/// Finds where `since` stands, refusing a replay of more than `limit` changes.
pub async fn locate(pool: &PgPool, since: i64, limit: u64) -> Result<Position, ResumeFailed> {
    let after = change::locate(pool, since).await?;
    let newest = change::newest_seq(pool).await?;
    let behind = newest.saturating_sub(since);
    if u64::try_from(behind).unwrap_or(0) > limit {
        return Err(ResumeFailed::TooFarBehind { since, behind, limit });
    }
    Ok(after)
}

/// Registers the subscription as replaying. Call before the reply is queued, so that the
/// hand-over point is after the registration.
pub fn register(hub: &Hub, conn: ConnId, service: &Service, subscription: Subscription) {
    hub.subscribe_replaying(conn, service.name.clone(), subscription);
}

/// Sends every change of `service` after `after` that the connection may see, through the
/// same channels, filters and stripping as live events, then hands over to live delivery.
/// Returns when the subscription is live, or `Ok` early when the connection went away.
pub async fn replay(
    hub: &Hub,
    pool: PgPool,
    conn: ConnId,
    service: &Service,
    after: Position,
    frames: &Sender<Frame>,
) -> Result<(), ResumeFailed> {
    let table = service.table();
    let mut replay = Replay::new(pool, after).await?;
    loop {
        let until = caught_up_to(hub, after.tick).await?;
        replay.extend_to(until);
        while let Some(page) = replay.next_page().await? {
            for change in page {
                if change.table_schema != table.schema || change.table_name != table.name {
                    continue;
                }
                let event = event_for(&change, service);
                let frame = hub.replay_frame(conn, &mut service.policy.prepare(&event));
                if let Some(frame) = frame
                    && frames.send(frame).await.is_err()
                {
                    return Ok(());
                }
            }
        }
        if hub.go_live(conn, &service.name, until) {
            return Ok(());
        }
    }
}

/// The tick the hub has started publishing, once it is at least `tick` (this instance's
/// reader may be behind the one that delivered the client's position).
async fn caught_up_to(hub: &Hub, tick: i64) -> Result<i64, ResumeFailed> {
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let started = hub.tick_started();
        let until = hub.started_tick();
        if until >= tick {
            return Ok(until);
        }
        if tokio::time::timeout_at(deadline, started).await.is_err() {
            return Err(ResumeFailed::Lagging(tick));
        }
    }
}
