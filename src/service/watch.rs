//! Keeps the services' catalogs in step with the database while quill runs: a check every
//! `schema_check_interval_ms`, and at once when the DDL event trigger (or a change whose row
//! does not fit the catalog) says a table changed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Services;
use crate::metrics::Metrics;

/// Runs until `shutdown`.
pub async fn watch_schema(
    services: Arc<Services>,
    changed: Arc<Notify>,
    every: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    // The catalogs were just read at start-up: the first check is one interval away.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = changed.notified() => {}
        }
        let misfits = services.refresh_all().await;
        metrics.schema_checks.inc();
        metrics.services_misfit.set(misfits as i64);
    }
}
