//! The dedicated LISTEN connection. It only drains notifications into a wake-up flag, so
//! Postgres' notification queue never fills however slow the rest of quill is, and it
//! reconnects with backoff when the connection dies. The log reader does the real work, so
//! a notification lost while disconnected loses nothing: each (re)connect wakes the reader.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pg_tls;

/// The channel the capture trigger notifies.
pub const CHANNEL: &str = "quill_change";

/// How often the idle connection is checked for being alive (a LISTEN session can die
/// silently, e.g. behind a NAT or after a failover).
const PING_EVERY: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The payload with which quill's DDL event trigger says a captured table changed shape.
pub const SCHEMA_CHANGED: &str = "schema";

/// Where the listener sends what it hears.
#[derive(Clone)]
pub struct Wakeups {
    /// Committed changes may be waiting in the log.
    pub changes: Arc<Notify>,
    /// A captured table was altered, dropped or created.
    pub schema: Arc<Notify>,
}

/// Runs until `shutdown` is cancelled.
pub async fn run_listener(database_url: String, wake: Wakeups, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let session = listen_once(&database_url, &wake, !first, &metrics, &shutdown);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = session => outcome,
        };
        metrics.listener_connected.set(0);
        match outcome {
            Ok(()) => return,
            Err(Lost::AfterConnect(reason)) => {
                tracing::warn!(%reason, "LISTEN connection lost, reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(Lost::Connect(reason)) => {
                tracing::warn!(%reason, retry_in_ms = backoff.as_millis() as u64, "cannot open LISTEN connection");
            }
        }
        if !first {
            metrics.listener_reconnects.inc();
        }
        first = false;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum Lost {
    Connect(String),
    AfterConnect(String),
}

async fn listen_once(
    database_url: &str,
    wake: &Wakeups,
    reconnected: bool,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), Lost> {
    let (mut config, tls) = pg_tls::listener_config(database_url).map_err(|e| Lost::Connect(e.to_string()))?;
    config.application_name("quill listener");
    let (client, mut connection) = config.connect(tls).await.map_err(|e| Lost::Connect(e.to_string()))?;
    // Drive the connection in its own task: it must be polled for the client's queries to
    // make progress, and it drains notifications as fast as they come.
    let drain_wake = wake.clone();
    let drain_metrics = metrics.clone();
    let mut driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) if n.payload() == SCHEMA_CHANGED => {
                    drain_wake.schema.notify_one();
                }
                Ok(AsyncMessage::Notification(_)) => {
                    drain_metrics.notifications.inc();
                    drain_wake.changes.notify_one();
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        "connection closed".to_owned()
    });
    let listen_sql = format!("LISTEN {CHANNEL}");
    let listen = client.batch_execute(&listen_sql);
    tokio::select! {
        r = listen => r.map_err(|e| Lost::Connect(e.to_string()))?,
        r = &mut driver => return Err(Lost::Connect(r.unwrap_or_else(|e| e.to_string()))),
    }
    metrics.listener_connected.set(1);
    tracing::info!("listening for changes");
    // Anything committed while we were not listening is in the log: read it now; and after
    // an outage a table may have changed meanwhile.
    wake.changes.notify_one();
    if reconnected {
        wake.schema.notify_one();
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                driver.abort();
                return Ok(());
            }
            r = &mut driver => return Err(Lost::AfterConnect(r.unwrap_or_else(|e| e.to_string()))),
            _ = ping.tick() => {
                match tokio::time::timeout(PING_TIMEOUT, client.simple_query("")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => { driver.abort(); return Err(Lost::AfterConnect(e.to_string())); }
                    Err(_) => { driver.abort(); return Err(Lost::AfterConnect("ping timed out".into())); }
                }
            }
        }
    }
}
