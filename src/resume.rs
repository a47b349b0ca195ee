//! A subscription from a position: replay the missed changes from the log, then hand over to
//! live delivery with nothing lost or repeated. Transports call it; it knows no protocol.
//!
//! The replay chases the live reader: it reads up to the tick the hub last started to
//! publish, and hands over if no later tick started meanwhile ([`Hub::go_live`]); otherwise
//! it reads the new ticks too. Live events of the service are dropped for the subscriber
//! until then, so memory stays bounded however long the replay runs. After a few passes it
//! stops chasing: live events after the newest started tick are held back (a bounded
//! number), the replay reads up to that tick, and the held events follow it.

use std::collections::HashSet;
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

/// How long a replay waits for the tick that holds a change its snapshot already has: the
/// reader may be paging through a huge transaction meanwhile.
const SKIPPED_AHEAD: Duration = Duration::from_secs(120);

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
    /// The snapshot read failed (a database error, already made fit for the client).
    #[error("the snapshot read failed: {0}")]
    Read(crate::error::Error),
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

/// Builds the frame that tells the client its copy is complete through a position (the
/// seq it may resume from).
pub type SyncedFrame = dyn Fn(i64) -> Frame + Send + Sync;

/// Where a replay starts: after a position, leaving out changes the client already has.
#[derive(Debug)]
pub struct Start {
    pub after: Position,
    /// Seqs after `after` that the client has from its snapshot.
    pub skip: HashSet<i64>,
}

/// A replaying subscription, where a replay (or a snapshot) sends its frames.
#[derive(Clone, Copy)]
pub struct Subscriber<'a> {
    pub hub: &'a Hub,
    pub conn: ConnId,
    pub service: &'a Service,
    /// The replay the subscription was registered with ([`register`]).
    pub replay: ReplayId,
    /// The connection's queue.
    pub frames: &'a Sender<Frame>,
}

/// Sends every change of the service after `start` that the connection may see, through
/// the same channels, filters and stripping as live events, then hands over to live
/// delivery, queuing `synced` (if given) at the hand-over point, ahead of every live event.
/// Returns when the subscription is live, or `Ok` early when the connection went away or
/// another subscribe superseded this replay.
pub async fn replay(
    to: Subscriber<'_>,
    pool: PgPool,
    start: Start,
    synced: Option<&SyncedFrame>,
) -> Result<(), ResumeFailed> {
    let Subscriber {
        hub,
        conn,
        service,
        replay: id,
        frames,
    } = to;
    let mut replay = Replay::new(pool.clone(), start.after).await?.skipping(start.skip);
    let mut until = caught_up_to(hub, start.after.tick, CATCH_UP).await?;
    let mut pass = 0;
    loop {
        pass += 1;
        replay.extend_to(until);
        if !send_pages(to, &mut replay).await? {
            return Ok(());
        }
        if replay.skips_ahead() {
            // A change the snapshot holds is in a tick not yet read (or made).
            until = caught_up_to(hub, until + 1, SKIPPED_AHEAD).await?;
            continue;
        }
        let marker = match synced {
            Some(synced) => {
                let seq = change::last_seq_of_tick(&pool, until).await?;
                let Ok(permit) = frames.reserve().await else {
                    return Ok(());
                };
                Some((permit, synced(seq)))
            }
            None => None,
        };
        match hub.go_live(conn, &service.name, id, until, pass >= FREE_PASSES, marker) {
            HandOver::Live | HandOver::Superseded => return Ok(()),
            HandOver::NotYet => until = hub.started_tick(),
            HandOver::ReadThrough(last) => {
                // Live events after `last` are held meanwhile; this pass is bounded, and
                // nothing live comes between it, the marker and the held events.
                replay.extend_to(last);
                if !send_pages(to, &mut replay).await? {
                    return Ok(());
                }
                if let Some(synced) = synced {
                    let seq = change::last_seq_of_tick(&pool, last).await?;
                    let Ok(permit) = frames.reserve().await else {
                        return Ok(());
                    };
                    if !hub.replay_frame(conn, &service.name, id, permit, synced(seq)) {
                        return Ok(());
                    }
                }
                send_held(to).await;
                return Ok(());
            }
        }
    }
}

/// Sends the replay's pages up to its `extend_to` tick; false when it must stop (the
/// connection left, or the subscription is no longer this replay's).
async fn send_pages(to: Subscriber<'_>, replay: &mut Replay) -> Result<bool, ResumeFailed> {
    let table = to.service.table();
    while let Some(page) = replay.next_page().await.map_err(gone_if_overtaken)? {
        for change in page {
            if change.table_schema != table.schema || change.table_name != table.name {
                continue;
            }
            let event = event_for(&change, to.service);
            // Room first (the connection's pace), then the check and the send at once.
            let Ok(permit) = to.frames.reserve().await else {
                return Ok(false);
            };
            let mut prepared = to.service.policy.prepare(&event);
            match to.hub.replay_event(to.conn, to.replay, &mut prepared, permit) {
                Replayed::Sent | Replayed::Skip => {}
                Replayed::Stop => return Ok(false),
            }
        }
    }
    Ok(true)
}

/// Sends the live events held during the last pass, at the connection's pace, until none
/// is left and the subscription is live.
async fn send_held(to: Subscriber<'_>) {
    loop {
        match to.hub.release(to.conn, &to.service.name, to.replay) {
            Released::More(held) => {
                for frame in held {
                    // Room first, then the check and the send at once: a subscribe that
                    // supersedes the replay meanwhile is followed by none of them.
                    let Ok(permit) = to.frames.reserve().await else {
                        return;
                    };
                    if !to.hub.replay_frame(to.conn, &to.service.name, to.replay, permit, frame) {
                        return;
                    }
                    to.hub.metrics().events_delivered.inc();
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
async fn caught_up_to(hub: &Hub, tick: i64, wait: Duration) -> Result<i64, ResumeFailed> {
    let deadline = tokio::time::Instant::now() + wait;
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
