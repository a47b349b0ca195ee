//! A subscription from a position: replay the missed changes from the log, then hand over to
//! live delivery with nothing lost or repeated. Transports call it; it knows no protocol.
//!
//! The replay chases the live reader: it reads up to the tick the hub last started to
//! publish, and hands over if no later tick started meanwhile ([`Hub::go_live`]); otherwise
//! it reads the new ticks too. Live events of the service are dropped for the subscriber
//! until then, so memory stays bounded however long the replay runs. After a few passes it
//! stops chasing: live events after the newest started tick are held back (a bounded
//! number), the replay reads up to that tick, and the held events follow it.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc::Sender;

use crate::change::{self, ChangeError, Replay, ResumeError};
use crate::event::Position;
use crate::hub::{ConnId, Frame, HandOver, Hub, Released, ReplayId, Replayed, Subscription};
use crate::pipeline::event_for;
use crate::service::Service;

/// How long a resume waits for this instance's reader to reach a position that another
/// instance already delivered.
const CATCH_UP: Duration = Duration::from_secs(5);

/// How many passes may chase the live reader before the last one holds live events back
/// (so a replay ends under any load, and usually holds nothing).
const FREE_PASSES: u32 = 3;

/// Why a resume could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum ResumeFailed {
    #[error(transparent)]
    Position(#[from] ResumeError),
    #[error("position {since} is {behind} changes behind, more than one replay may cover ({limit})")]
    TooFarBehind { since: i64, behind: i64, limit: u64 },
    #[error("this instance has not yet delivered tick {0}")]
    Lagging(i64),
    #[error("the change log was pruned past the replay while it ran")]
    Overtaken,
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

/// Registers the subscription as replaying (superseding any subscription to the service on
/// this connection, and its replay). Call when the request is read, before anything is
/// queued for it, so that requests take effect in order and the hand-over point is after
/// the registration.
pub fn register(hub: &Hub, conn: ConnId, service: &Service, subscription: Subscription) -> ReplayId {
    hub.subscribe_replaying(conn, service.name.clone(), subscription)
}

/// Sends every change of `service` after `after` that the connection may see, through the
/// same channels, filters and stripping as live events, then hands over to live delivery.
/// Returns when the subscription is live, or `Ok` early when the connection went away or
/// another subscribe superseded this replay.
pub async fn replay(
    hub: &Hub,
    pool: PgPool,
    conn: ConnId,
    service: &Service,
    id: ReplayId,
    after: Position,
    frames: &Sender<Frame>,
) -> Result<(), ResumeFailed> {
    let mut replay = Replay::new(pool, after).await?;
    let mut until = caught_up_to(hub, after.tick).await?;
    let mut pass = 0;
    loop {
        pass += 1;
        replay.extend_to(until);
        if !send_pages(hub, &mut replay, conn, service, id, frames).await? {
            return Ok(());
        }
        match hub.go_live(conn, &service.name, id, until, pass >= FREE_PASSES) {
            HandOver::Live | HandOver::Superseded => return Ok(()),
            HandOver::NotYet => until = hub.started_tick(),
            HandOver::ReadThrough(last) => {
                // Live events after `last` are held meanwhile; this pass is bounded.
                replay.extend_to(last);
                if send_pages(hub, &mut replay, conn, service, id, frames).await? {
                    send_held(hub, conn, service, id, frames).await;
                }
                return Ok(());
            }
        }
    }
}

/// Sends the replay's pages up to its `extend_to` tick; false when it must stop (the
/// connection left, or the subscription is no longer this replay's).
async fn send_pages(
    hub: &Hub,
    replay: &mut Replay,
    conn: ConnId,
    service: &Service,
    id: ReplayId,
    frames: &Sender<Frame>,
) -> Result<bool, ResumeFailed> {
    let table = service.table();
    while let Some(page) = replay.next_page().await.map_err(gone_if_overtaken)? {
        for change in page {
            if change.table_schema != table.schema || change.table_name != table.name {
                continue;
            }
            let event = event_for(&change, service);
            // Room first (the connection's pace), then the check and the send at once.
            let Ok(permit) = frames.reserve().await else {
                return Ok(false);
            };
            match hub.replay_event(conn, id, &mut service.policy.prepare(&event), permit) {
                Replayed::Sent | Replayed::Skip => {}
                Replayed::Stop => return Ok(false),
            }
        }
    }
    Ok(true)
}

/// Sends the live events held during the last pass, at the connection's pace, until none
/// is left and the subscription is live.
async fn send_held(hub: &Hub, conn: ConnId, service: &Service, id: ReplayId, frames: &Sender<Frame>) {
    loop {
        match hub.release(conn, &service.name, id) {
            Released::More(held) => {
                for frame in held {
                    if frames.send(frame).await.is_err() {
                        return;
                    }
                    hub.metrics().events_delivered.inc();
                }
            }
            Released::Live | Released::Gone => return,
        }
    }
}

/// The pruner overtook the replay: what it had yet to send may be gone.
fn gone_if_overtaken(e: ChangeError) -> ResumeFailed {
    match e {
        ChangeError::Gap { .. } => ResumeFailed::Overtaken,
        e => ResumeFailed::Change(e),
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
