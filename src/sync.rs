//! Read your writes: waits until a transaction's changes have been queued for one
//! connection's subscription, then queues a mark behind them, so a client knows its copy
//! reflects its own write (whether or not the write touched rows in its scope). Transports
//! call it; it knows no protocol.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc::Sender;

use crate::change::{self, ChangeError, TxDelivery, TxidError};
use crate::hub::{ConnId, Frame, Hub, Marked};

/// How long a client may wait for one transaction.
const WAIT: Duration = Duration::from_secs(30);

/// Why a transaction cannot be waited for.
#[derive(Debug, thiserror::Error)]
pub enum SyncFailed {
    #[error("transaction {0} has not started yet")]
    Future(u64),
    #[error("this connection is not subscribed to the service")]
    NotSubscribed,
    #[error("transaction {0} was not delivered within {WAIT:?}")]
    Timeout(u64),
    /// The connection went away.
    #[error("the connection is gone")]
    Gone,
    #[error(transparent)]
    Change(#[from] ChangeError),
}

/// Queues `mark` for the connection once every change of transaction `txid` to the
/// subscription's service has been queued before it.
pub async fn wait_for(
    hub: &Hub,
    pool: &PgPool,
    conn: ConnId,
    service: &str,
    txid: u64,
    frames: &Sender<Frame>,
    mark: Frame,
) -> Result<(), SyncFailed> {
    let deadline = tokio::time::Instant::now() + WAIT;
    // Armed before each check, so progress between the check and the wait is not missed.
    let mut progressed = Box::pin(hub.progressed());
    progressed.as_mut().enable();
    let tick = loop {
        if !hub.is_subscribed(conn, service) {
            return Err(SyncFailed::NotSubscribed);
        }
        match change::tx_delivery(pool, txid).await {
            Ok(TxDelivery::Nothing) => break 0,
            Ok(TxDelivery::InTick(tick)) => break tick,
            Ok(TxDelivery::NotYet) => {}
            Err(TxidError::Future(txid)) => return Err(SyncFailed::Future(txid)),
            Err(TxidError::Change(e)) => return Err(e.into()),
        }
        wait(&mut progressed, hub, deadline, txid).await?;
    };
    loop {
        let permit = frames.reserve().await.map_err(|_| SyncFailed::Gone)?;
        match hub.mark_delivered(conn, service, tick, permit, mark.clone()) {
            Marked::Sent => return Ok(()),
            Marked::NotSubscribed => return Err(SyncFailed::NotSubscribed),
            Marked::Gone => return Err(SyncFailed::Gone),
            Marked::NotYet => wait(&mut progressed, hub, deadline, txid).await?,
        }
    }
}

/// Waits for the next progress of delivery (re-arming the notification), or fails at the
/// deadline.
async fn wait<'a>(
    progressed: &mut std::pin::Pin<Box<tokio::sync::futures::Notified<'a>>>,
    hub: &'a Hub,
    deadline: tokio::time::Instant,
    txid: u64,
) -> Result<(), SyncFailed> {
    if tokio::time::timeout_at(deadline, progressed.as_mut()).await.is_err() {
        return Err(SyncFailed::Timeout(txid));
    }
    progressed.set(hub.progressed());
    progressed.as_mut().enable();
    Ok(())
}
