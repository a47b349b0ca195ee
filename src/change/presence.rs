//! The reader's side of quiet wake-ups (see `migrations/*_quiet_wakeups.sql`): while the
//! reader is busy it holds its "reading" lock, and writers skip their NOTIFY, which would
//! otherwise make every capturing commit wait for a cluster-wide lock.
//!
//! The lock lives on a session of its own, registered as a reader. If that session dies the
//! lock goes with it and writers notify again, so losing it costs speed, never a change.

use std::sync::Arc;

use sqlx::{Connection, PgConnection, PgPool};

use super::ChangeError;
use crate::metrics::Metrics;

/// The reader's registered session and whether it holds the reading lock.
pub(super) struct Presence {
    session: Option<(PgConnection, i32)>,
    reading: bool,
    /// The reading lock was let go (or lost) and the gate not yet passed: until it is, a
    /// writer that skipped its NOTIFY may still be committing.
    gate_owed: bool,
    metrics: Arc<Metrics>,
}

impl Presence {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            session: None,
            reading: false,
            gate_owed: false,
            metrics,
        }
    }

    fn set_reading(&mut self, reading: bool) {
        self.reading = reading;
        self.metrics.reader_busy.set(i64::from(reading));
    }

    /// Whether the reader must pass the gate and look again before it may wait.
    pub(super) fn must_look_again(&self) -> bool {
        self.reading || self.gate_owed
    }

    pub(super) fn reading(&self) -> bool {
        self.reading
    }

    /// Takes the reading lock if writers let it; on any failure the reader simply stays
    /// notified, so errors are logged, not returned.
    pub(super) async fn start_reading(&mut self, pool: &PgPool) {
        if self.reading {
            return;
        }
        match self.try_start(pool).await {
            Ok(taken) => self.set_reading(taken),
            Err(e) => {
                tracing::debug!(error = %e, "cannot take the reading lock; writers keep notifying");
                self.session = None;
            }
        }
    }

    async fn try_start(&mut self, pool: &PgPool) -> Result<bool, sqlx::Error> {
        let (conn, id) = match &mut self.session {
            Some(session) => session,
            None => self.session.insert(register(pool).await?),
        };
        sqlx::query_scalar("SELECT quill.start_reading($1)")
            .bind(*id)
            .fetch_one(conn)
            .await
    }

    /// Lets the reading lock go and passes the gate: afterwards every change a writer did
    /// not notify about is committed, and one more look at the log finds it.
    pub(super) async fn stop_reading(&mut self, pool: &PgPool) -> Result<(), ChangeError> {
        if self.reading {
            self.set_reading(false);
            self.gate_owed = true;
            let released = match &mut self.session {
                Some((conn, id)) => sqlx::query_scalar::<_, Option<bool>>("SELECT quill.stop_reading($1)")
                    .bind(*id)
                    .fetch_one(conn)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(false),
                None => false,
            };
            if !released {
                // Closing the session releases whatever it still holds.
                if let Some((conn, _)) = self.session.take() {
                    let _ = conn.close().await;
                }
            }
        }
        if self.gate_owed {
            sqlx::query("SELECT quill.pass_gate()").execute(pool).await?;
            self.gate_owed = false;
        }
        Ok(())
    }
}

/// A session of its own (taken out of the pool), registered as a reader.
async fn register(pool: &PgPool) -> Result<(PgConnection, i32), sqlx::Error> {
    let mut conn = pool.acquire().await?.detach();
    let id: i32 = sqlx::query_scalar("SELECT quill.register_reader()")
        .fetch_one(&mut conn)
        .await?;
    Ok((conn, id))
}
