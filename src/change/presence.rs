//! The reader's side of quiet wake-ups (see `migrations/*_quiet_wakeups.sql`): while the
//! reader waits for notifications it holds the "waiting" lock; while it is busy it lets it
//! go, and writers skip their NOTIFY, which would otherwise make every capturing commit wait
//! for a cluster-wide lock.
//!
//! The locks live on a session of its own. If that session dies they go with it: writers
//! notify again (no quill "alive"), so losing it costs speed, never a change.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};

use crate::metrics::Metrics;

/// How long the reader waits before it looks again while writers that may have skipped
/// their NOTIFY are still open: doubling from the first to the last.
const PENDING_FIRST: Duration = Duration::from_millis(1);
const PENDING_LAST: Duration = Duration::from_millis(50);

/// What the reader may do next, after [`Presence::settle`].
pub(super) enum Settled {
    /// Wait for a notification (or the poll interval).
    Wait,
    /// Look at the log once more, now.
    LookAgain,
    /// Some writer may still commit without a NOTIFY: look again within this long.
    Pending(Duration),
}

pub(super) struct Presence {
    session: Option<PgConnection>,
    /// Holds "alive": writers know a quill of this kind runs.
    alive: bool,
    /// Holds "waiting": writers notify.
    waiting: bool,
    /// Took "waiting" but has not passed the gate since.
    gate_owed: bool,
    pending: Duration,
    /// Counts the sessions opened, so that what is tied to a session is redone on a new one.
    generation: u64,
    metrics: Arc<Metrics>,
}

impl Presence {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            session: None,
            alive: false,
            waiting: false,
            gate_owed: false,
            pending: PENDING_FIRST,
            generation: 0,
            metrics,
        }
    }

    /// Whether writers may be skipping their NOTIFY because of this reader.
    pub(super) fn busy(&self) -> bool {
        self.alive && !self.waiting
    }

    /// Lets writers skip their NOTIFY: the reader is busy and looks at the log anyway.
    pub(super) async fn start_busy(&mut self) {
        let Some(conn) = &mut self.session else {
            return;
        };
        if !self.waiting {
            return;
        }
        let released = sqlx::query_scalar::<_, Option<bool>>("SELECT quill.stop_waiting()")
            .fetch_one(conn)
            .await;
        match released {
            Ok(_) => {
                self.waiting = false;
                self.show();
            }
            Err(e) => {
                tracing::debug!(error = %e, "the change reader's session failed");
                self.lose_session();
            }
        }
    }

    /// Makes it safe to wait for a notification: alive, waiting, and through the gate. A
    /// database error only means more looking: the session is dropped (its locks with it,
    /// so writers notify) and the next settle opens another.
    pub(super) async fn settle(&mut self, pool: &PgPool) -> Settled {
        let settled = self.try_settle(pool).await;
        self.show();
        match settled {
            Ok(Some(next)) => {
                self.pending = PENDING_FIRST;
                next
            }
            Ok(None) => self.pending(),
            Err(e) => {
                tracing::debug!(error = %e, "the change reader's session failed");
                self.lose_session();
                self.pending()
            }
        }
    }

    fn pending(&mut self) -> Settled {
        let wait = self.pending;
        self.pending = (self.pending * 2).min(PENDING_LAST);
        Settled::Pending(wait)
    }

    /// `None` while the lock it needs is not to be had yet.
    async fn try_settle(&mut self, pool: &PgPool) -> Result<Option<Settled>, sqlx::Error> {
        self.open(pool).await?;
        let Some(conn) = self.session.as_mut() else {
            return Ok(None);
        };
        if !self.alive {
            self.alive = sqlx::query_scalar("SELECT quill.hold_alive()")
                .fetch_one(&mut *conn)
                .await?;
        }
        if !self.waiting {
            let taken: bool = sqlx::query_scalar("SELECT quill.start_waiting()")
                .fetch_one(&mut *conn)
                .await?;
            if !taken {
                return Ok(None);
            }
            self.waiting = true;
            self.gate_owed = true;
        }
        if self.gate_owed {
            let passed: bool = sqlx::query_scalar("SELECT quill.pass_gate()")
                .fetch_one(&mut *conn)
                .await?;
            if !passed {
                return Ok(None);
            }
            self.gate_owed = false;
            return Ok(Some(Settled::LookAgain));
        }
        Ok(Some(Settled::Wait))
    }

    /// After a wait that no notification ended: checks the session is still there (it may
    /// have been closed while idle), so that the next wait starts on a new one.
    pub(super) async fn check(&mut self) {
        if let Some(conn) = &mut self.session
            && conn.ping().await.is_err()
        {
            tracing::warn!("the change reader's session was lost; opening another");
            self.lose_session();
        }
    }

    /// The reader's own session, opened if there is none.
    pub(super) async fn open(&mut self, pool: &PgPool) -> Result<&mut PgConnection, sqlx::Error> {
        if self.session.is_none() {
            self.session = Some(pool.acquire().await?.detach());
            self.generation += 1;
        }
        // Just set when it was missing.
        self.session.as_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// Which session [`Presence::session`] is: a new number after every reconnect.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The reader's own session, for its looks at the log.
    pub(super) fn session(&mut self) -> Option<&mut PgConnection> {
        self.session.as_mut()
    }

    /// Drops the session; its locks go with it.
    pub(super) fn lose_session(&mut self) {
        self.session = None;
        self.alive = false;
        self.waiting = false;
        self.gate_owed = false;
        self.show();
    }

    fn show(&self) {
        self.metrics.reader_busy.set(i64::from(self.busy()));
    }
}
