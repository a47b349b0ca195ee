//! Prunes the change log in the background, within the configured retention.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Retention;

/// Changes deleted per statement: small enough that no transaction runs long.
const BATCH: i32 = 10_000;

/// Runs until `shutdown`. Errors are logged and retried at the next interval.
pub async fn run_pruner(pool: PgPool, retention: Retention, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(retention.prune_interval_seconds));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match prune(&pool, retention, &shutdown).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "pruned the change log"),
            Err(e) => tracing::warn!(error = %e, "pruning the change log failed"),
        }
    }
}

/// Deletes everything beyond the retention limits, batch by batch; returns the count.
pub async fn prune(pool: &PgPool, retention: Retention, shutdown: &CancellationToken) -> Result<u64, sqlx::Error> {
    let max_age = i64::try_from(retention.max_age_seconds).unwrap_or(i64::MAX);
    let max_events = i64::try_from(retention.max_events).unwrap_or(i64::MAX);
    let mut total = 0u64;
    loop {
        let removed: i64 = sqlx::query_scalar("SELECT quill.prune(make_interval(secs => $1), $2, $3)")
            .bind(max_age as f64)
            .bind(max_events)
            .bind(BATCH)
            .fetch_one(pool)
            .await?;
        total += u64::try_from(removed).unwrap_or(0);
        if removed < i64::from(BATCH) || shutdown.is_cancelled() {
            return Ok(total);
        }
    }
}
