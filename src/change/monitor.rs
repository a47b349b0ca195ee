//! Watches the change feed from the database side: delivery lag and the NOTIFY queue.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

const EVERY: Duration = Duration::from_secs(5);
/// Above this share of the NOTIFY queue, quill warns: at 100 % users' commits fail.
const NOTIFY_QUEUE_WARN: f64 = 0.01;

/// Runs until `shutdown`, sampling every few seconds.
pub async fn run_monitor(pool: PgPool, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Err(e) = sample(&pool, &metrics).await {
            tracing::debug!(error = %e, "cannot sample change-feed metrics");
        }
    }
}

async fn sample(pool: &PgPool, metrics: &Metrics) -> Result<(), sqlx::Error> {
    let (usage, lag, age): (f64, i64, f64) = sqlx::query_as(
        "SELECT pg_notification_queue_usage(), count(c.seq),
                COALESCE(EXTRACT(epoch FROM clock_timestamp() - min(c.changed_at)), 0)::float8
         FROM quill.tick p
         LEFT JOIN quill.change_log c
           ON c.xid >= pg_snapshot_xmin(p.snapshot) AND NOT pg_visible_in_snapshot(c.xid, p.snapshot)
         WHERE p.id = $1",
    )
    .bind(metrics.delivered_tick.get())
    .fetch_optional(pool)
    .await?
    .unwrap_or((0.0, 0, 0.0));
    metrics.notify_queue_usage.set(usage);
    metrics.lag_events.set(lag);
    metrics.lag_seconds.set(age);
    if usage > NOTIFY_QUEUE_WARN {
        tracing::warn!(usage, "the NOTIFY queue is filling: a listening session is not reading");
    }
    Ok(())
}
