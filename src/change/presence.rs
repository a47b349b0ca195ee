//! The reader's side of quiet wake-ups (see `migrations/*_quiet_wakeups.sql`): while the
//! reader is busy it holds its "reading" lock, and writers skip their NOTIFY, which would
//! otherwise make every capturing commit wait for a cluster-wide lock.
//!
//! The lock lives on a session of its own, registered as a reader before the reader first
//! waits. If that session dies, the lock goes with it and writers notify again, so losing
//! it costs speed, never a change.

use std::sync::Arc;

use sqlx::{Connection, PgConnection, PgPool};

use super::ChangeError;
use crate::metrics::Metrics;

/// The reader's registered session and whether it holds the reading lock.
pub(super) struct Presence {
    session: Option<(PgConnection, i32)>,
    reading: bool,
    /// The gate must be passed before the reader waits: it let the reading lock go (or lost
    /// it), or it just registered, so a writer that skipped its NOTIFY (or did not see the
    /// new registration) may still be committing.
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

    pub(super) fn reading(&self) -> bool {
        self.reading
    }

    /// Takes the reading lock if writers let it; on any failure the reader simply stays
    /// notified, so errors are logged, not returned.
    pub(super) async fn start_reading(&mut self) {
        let Some((conn, id)) = &mut self.session else {
            return; // not registered yet: it registers before it first waits
        };
        if self.reading {
            return;
        }
        match sqlx::query_scalar("SELECT quill.start_reading($1)")
            .bind(*id)
            .fetch_one(conn)
            .await
        {
            Ok(taken) => self.set_reading(taken),
            Err(e) => {
                tracing::debug!(error = %e, "cannot take the reading lock; writers keep notifying");
                self.lose_session();
            }
        }
    }

    /// Makes it safe to wait for a notification: registered, not reading, gate passed.
    /// Returns true if that took a step after which the reader must look at the log once
    /// more before it waits; false if it may wait now.
    pub(super) async fn settle(&mut self, pool: &PgPool) -> Result<bool, ChangeError> {
        let mut look_again = false;
        if self.session.is_none() {
            match register(pool).await {
                Ok(session) => {
                    self.session = Some(session);
                    self.gate_owed = true;
                }
                // Unregistered, it may miss wake-ups while another quill reads; the poll
                // interval bounds that. The next wait tries again.
                Err(e) => tracing::warn!(error = %e, "cannot register the change reader"),
            }
        }
        if self.reading {
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
                self.lose_session();
            }
            self.set_reading(false);
            self.gate_owed = true;
        }
        if self.gate_owed {
            sqlx::query("SELECT quill.pass_gate()").execute(pool).await?;
            self.gate_owed = false;
            look_again = true;
        }
        Ok(look_again)
    }

    /// After a wait that no notification ended: checks the session is still there (it may
    /// have been closed while idle), so that the reader re-registers before it waits again.
    pub(super) async fn check(&mut self) {
        if let Some((conn, _)) = &mut self.session
            && conn.ping().await.is_err()
        {
            tracing::warn!("the change reader's session was lost; registering again");
            self.lose_session();
        }
    }

    /// Drops the session; closing it releases whatever locks it still holds.
    fn lose_session(&mut self) {
        self.session = None;
        self.set_reading(false);
        self.gate_owed = true;
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
