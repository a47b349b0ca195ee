//! Reads the change log tick by tick. See `migrations/*_change_log.sql` for why ticks.
//!
//! A [`TickCursor`] walks ticks in order and returns each tick's changes in pages; the live
//! [`LogReader`] and a client's resume ([`Replay`]) both use it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::presence::{Presence, Settled};
use super::{Change, ChangeError, ChangeSource};
use crate::event::{EventKind, Position};
use crate::metrics::Metrics;

/// How many changes one read returns at most, so a 100 000-row transaction streams through
/// in bounded memory (the tick's seq list aside: 8 bytes a change).
const PAGE: usize = 1000;

/// While busy, the reader looks for new ticks at most this often: each look is a tick (a
/// transaction), and under load fewer, bigger ticks leave the writers more of the machine.
const BUSY_POLL: Duration = Duration::from_millis(1);
/// ... and, when looks get slow (the database is loaded), it starts a look at most every
/// this many times as long as the last look took, up to `BUSY_POLL_MAX`: the reader's share
/// of the database stays bounded, and a light load keeps the 1 ms.
const BUSY_POLL_PER_LOOK: u32 = 4;
const BUSY_POLL_MAX: Duration = Duration::from_millis(5);

/// Walks ticks in order, returning each tick's batch in pages.
struct TickCursor {
    /// Ticks to read: (previous tick, tick).
    pending: VecDeque<(i64, i64)>,
    /// The tick being read, its seqs and how many were returned.
    current: Option<(i64, i64, Vec<i64>, usize)>,
    /// The newest tick id queued into `pending`.
    last_tick: i64,
}

impl TickCursor {
    fn after(tick: i64) -> Self {
        Self {
            pending: VecDeque::new(),
            current: None,
            last_tick: tick,
        }
    }

    /// Queues ticks listed elsewhere, as (previous tick, tick) in order.
    fn queue(&mut self, ticks: Vec<(i64, i64)>) {
        for (prev, tick) in ticks {
            self.pending.push_back((prev, tick));
            self.last_tick = tick;
        }
    }

    /// The next page of changes, or `None` when every queued tick is read. On error nothing
    /// is consumed.
    async fn next_page(&mut self, pool: &PgPool) -> Result<Option<Vec<Change>>, ChangeError> {
        loop {
            if let Some((_, tick, seqs, done)) = &mut self.current
                && *done < seqs.len()
            {
                let end = (*done + PAGE).min(seqs.len());
                let page = fetch(pool, *tick, &seqs[*done..end]).await?;
                *done = end;
                if !page.is_empty() {
                    return Ok(Some(page));
                }
                continue;
            }
            if !self.open_next(pool).await? {
                return Ok(None);
            }
        }
    }

    /// Loads the seq list of the next queued tick; false when none is queued.
    async fn open_next(&mut self, pool: &PgPool) -> Result<bool, ChangeError> {
        let Some(&(prev, tick)) = self.pending.front() else {
            self.current = None;
            return Ok(false);
        };
        let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM quill.batch($1, $2)")
            .bind(prev)
            .bind(tick)
            .fetch_all(pool)
            .await?;
        self.pending.pop_front();
        self.current = Some((prev, tick, seqs, 0));
        Ok(true)
    }

    /// The tick through which every change has been returned: the pruner may go up to it,
    /// and it must keep it (it bounds the next batch from below).
    fn read_through(&self) -> i64 {
        match (&self.current, self.pending.front()) {
            (Some((prev, _, seqs, done)), _) if *done < seqs.len() => *prev,
            (_, Some((prev, _))) => *prev,
            _ => self.last_tick,
        }
    }

    /// Takes the rows of `quill.poll`/`quill.read_ticks`: returns their changes, queues the
    /// ticks to read page by page, and moves past the rest. False when there were no rows.
    fn absorb(&mut self, rows: Vec<Polled>) -> Result<(Vec<Change>, bool), ChangeError> {
        let mut changes = Vec::with_capacity(rows.len());
        let mut later = Vec::new();
        let mut newest = None;
        for row in rows {
            newest = Some(row.tick);
            let old = row.old_data.map(|o| o.0);
            match (row.seq, row.table_schema, row.table_name, row.kind, row.row_data) {
                _ if row.read_later => later.push((row.prev, row.tick)),
                (Some(seq), Some(schema), Some(table), Some(kind), Some(data)) => {
                    let logged = Logged {
                        seq,
                        table_schema: schema,
                        table_name: table,
                        kind,
                        row: data.0,
                        old,
                        written_us: row.written_us,
                    };
                    changes.push(logged.into_change(row.tick)?);
                }
                _ => {} // a tick without changes
            }
        }
        if let Some(newest) = newest
            && later.is_empty()
        {
            self.last_tick = newest;
        }
        self.queue(later);
        Ok((changes, newest.is_some()))
    }
}

/// The newest tick (0 before the first).
pub async fn newest_tick(pool: &PgPool) -> Result<i64, ChangeError> {
    Ok(sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM quill.tick")
        .fetch_one(pool)
        .await?)
}

/// The change with `seq`, delivered in `tick`; `None` once pruned.
pub async fn fetch_change(pool: &PgPool, tick: i64, seq: i64) -> Result<Option<Change>, ChangeError> {
    Ok(fetch(pool, tick, &[seq]).await?.pop())
}

/// Loads the changes with these seqs, in seq order.
async fn fetch(pool: &PgPool, tick: i64, seqs: &[i64]) -> Result<Vec<Change>, ChangeError> {
    type Row = (i64, String, String, String, Json<Value>, Option<Json<Value>>, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, table_schema, table_name, kind, row_data, old_data, quill.unix_us(changed_at)
         FROM quill.change_log WHERE seq = ANY($1) ORDER BY seq",
    )
    .bind(seqs)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(seq, table_schema, table_name, kind, row, old, written_us)| {
            let logged = Logged {
                seq,
                table_schema,
                table_name,
                kind,
                row: row.0,
                old: old.map(|o| o.0),
                written_us: Some(written_us),
            };
            logged.into_change(tick)
        })
        .collect()
}

/// One row of the change log as read.
struct Logged {
    seq: i64,
    table_schema: String,
    table_name: String,
    kind: String,
    row: Value,
    old: Option<Value>,
    written_us: Option<i64>,
}

impl Logged {
    fn into_change(self, tick: i64) -> Result<Change, ChangeError> {
        Ok(Change {
            seq: self.seq,
            tick,
            table_schema: self.table_schema,
            table_name: self.table_name,
            kind: EventKind::parse(&self.kind).ok_or(ChangeError::UnknownKind(self.kind))?,
            row: self.row,
            old: self.old,
            written_us: self.written_us,
        })
    }
}

/// A row of `quill.poll` (see its migration for the three kinds).
#[derive(sqlx::FromRow)]
struct Polled {
    prev: i64,
    tick: i64,
    read_later: bool,
    seq: Option<i64>,
    table_schema: Option<String>,
    table_name: Option<String>,
    kind: Option<String>,
    row_data: Option<Json<Value>>,
    old_data: Option<Json<Value>>,
    written_us: Option<i64>,
}

/// How often a reader records its position in `quill.reader` (the pruner's floor). A
/// record that lags only keeps a little more of the log.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The reader's row in `quill.reader`, held on its own session.
struct Registration {
    key: i32,
    /// The session generation it was recorded on (its lock lives on that session).
    generation: Option<u64>,
    reported: i64,
    at: Instant,
}

/// The live reader: waits for wake-ups, makes ticks, returns their batches.
pub struct LogReader {
    pool: PgPool,
    wake: Arc<Notify>,
    poll: Duration,
    cursor: TickCursor,
    /// Whether to look for new changes before waiting for the next wake-up.
    eager: bool,
    /// When the reader last looked for new ticks.
    last_look: Instant,
    /// How long after the start of a look the next may start while busy (see
    /// [`BUSY_POLL_PER_LOOK`]).
    busy_poll: Duration,
    presence: Presence,
    registration: Registration,
    /// Set by a cluster publisher: the log is kept from here on (see [`Self::keep_from`]).
    keep_from: Option<i64>,
    metrics: Arc<Metrics>,
}

impl LogReader {
    /// Starts at the newest tick: changes committed before now are history, except those no
    /// tick covers yet, which arrive with the next one.
    pub async fn start(
        pool: PgPool,
        wake: Arc<Notify>,
        poll: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ChangeError> {
        Self::start_after(pool, wake, poll, metrics, None).await
    }

    /// Starts after `tick` (when given; else at the newest tick): a cluster publisher takes
    /// over where the stream ends.
    pub async fn start_after(
        pool: PgPool,
        wake: Arc<Notify>,
        poll: Duration,
        metrics: Arc<Metrics>,
        tick: Option<i64>,
    ) -> Result<Self, ChangeError> {
        let last_tick = match tick {
            Some(tick) => tick,
            None => newest_tick(&pool).await?,
        };
        let mut key = [0u8; 4];
        getrandom::fill(&mut key).map_err(|_| ChangeError::Random)?;
        let mut reader = Self {
            pool,
            wake,
            poll,
            cursor: TickCursor::after(last_tick),
            eager: true,
            last_look: Instant::now(),
            busy_poll: BUSY_POLL,
            presence: Presence::new(metrics.clone()),
            registration: Registration {
                key: i32::from_le_bytes(key),
                generation: None,
                reported: last_tick,
                at: Instant::now(),
            },
            keep_from: tick,
            metrics,
        };
        // Registered before the first read, so that no pruner passes it from the start.
        reader.presence.open(&reader.pool).await?;
        reader.report().await?;
        Ok(reader)
    }

    /// Records where this reader is, so that no pruner deletes what it has not read: at
    /// once on a new session (whose lock marks the reader alive), else at most every
    /// [`REPORT_EVERY`] while it moves.
    async fn report(&mut self) -> Result<(), sqlx::Error> {
        // A cluster publisher's floor is what the stream holds, not what it has read.
        let through = match self.keep_from {
            Some(kept) => kept.min(self.cursor.read_through()),
            None => self.cursor.read_through(),
        };
        let generation = self.presence.generation();
        let new_session = self.registration.generation != Some(generation);
        let due = through != self.registration.reported && self.registration.at.elapsed() >= REPORT_EVERY;
        if !new_session && !due {
            return Ok(());
        }
        // A busy reader never settles (which reopens a lost session): reopen it here, so
        // that it does not drop out of the pruner's floor for as long as the load lasts.
        self.presence.open(&self.pool).await?;
        let generation = self.presence.generation();
        let new_session = self.registration.generation != Some(generation);
        let Some(conn) = self.presence.session() else {
            return Ok(());
        };
        let reported = sqlx::query("SELECT quill.report_reader($1, $2, $3)")
            .bind(self.registration.key)
            .bind(through)
            .bind(new_session)
            .execute(conn)
            .await;
        if let Err(e) = reported {
            self.presence.lose_session();
            return Err(e);
        }
        self.registration = Registration {
            generation: Some(generation),
            reported: through,
            at: Instant::now(),
            ..self.registration
        };
        Ok(())
    }
}

impl LogReader {
    /// Keeps the log after `tick` from the pruner even though this reader has read further:
    /// a cluster publisher says so once the stream holds everything through `tick`.
    pub fn keep_from(&mut self, tick: i64) {
        self.keep_from = Some(tick);
    }

    /// The newest tick this reader has queued (at start: the tick it starts after).
    pub fn position(&self) -> i64 {
        self.cursor.last_tick
    }
}

impl ChangeSource for LogReader {
    fn read_through(&self) -> i64 {
        self.cursor.read_through()
    }

    async fn next_batch(&mut self) -> Result<Vec<Change>, ChangeError> {
        loop {
            match self.cursor.next_page(&self.pool).await {
                Ok(Some(page)) => return Ok(page),
                Ok(None) => {}
                Err(e) if e.is_pruned() => {
                    return Err(self.skip_pruned().await);
                }
                Err(e) => return Err(e),
            }
            if self.eager {
                if self.presence.busy() {
                    tokio::time::sleep_until(self.last_look + self.busy_poll).await;
                }
            } else {
                match self.presence.settle(&self.pool).await {
                    // Every writer that may have skipped its NOTIFY has committed.
                    Settled::LookAgain => {}
                    // Some have not: keep looking until they have.
                    Settled::Pending(within) => {
                        let _ = tokio::time::timeout(within, self.wake.notified()).await;
                    }
                    Settled::Wait => {
                        // A missed notification costs at most one poll interval, never a change.
                        let notified = tokio::time::timeout(self.poll, self.wake.notified()).await.is_ok();
                        if !notified {
                            self.presence.check().await;
                        }
                    }
                }
            }
            self.last_look = Instant::now();
            let busy_before = self.eager;
            // Until a look succeeds, the next call looks before it waits: a look that failed
            // may have been the one owed to writers that skipped their NOTIFY.
            self.eager = true;
            let (changes, new_ticks) = match self.poll().await {
                Err(e) if e.is_pruned() => {
                    return Err(self.skip_pruned().await);
                }
                polled => polled?,
            };
            self.busy_poll = (self.last_look.elapsed() * BUSY_POLL_PER_LOOK).clamp(BUSY_POLL, BUSY_POLL_MAX);
            // Reading works (again): the pipeline only hears of non-empty batches.
            self.metrics.reader_up.set(1);
            if let Err(e) = self.report().await {
                tracing::debug!(error = %e, "cannot record the reader's position");
            }
            if new_ticks && busy_before {
                // New ticks twice in a row: busy, so writers need not wake us.
                self.presence.start_busy().await;
            }
            self.eager = new_ticks;
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }
}

impl LogReader {
    /// Makes a tick (or finds the one another quill instance made) and reads the new ticks'
    /// changes, in one round trip. Ticks too big for one page are queued on the cursor.
    /// Returns the changes read and whether there were new ticks.
    async fn poll(&mut self) -> Result<(Vec<Change>, bool), ChangeError> {
        let query = sqlx::query_as::<_, Polled>(
            "SELECT prev, tick, read_later, seq, table_schema, table_name, kind, row_data, old_data, written_us FROM quill.poll($1, $2)",
        )
        .bind(self.cursor.last_tick)
        .bind(PAGE as i32);
        // On the reader's own session when it has one: a pooled connection costs a ping
        // round trip each time it goes back to the pool, and the reader looks up to 1000
        // times a second.
        let rows = match self.presence.session() {
            Some(conn) => {
                let rows = query.fetch_all(conn).await;
                if rows.is_err() {
                    self.presence.lose_session();
                }
                rows?
            }
            None => query.fetch_all(&self.pool).await?,
        };
        self.cursor.absorb(rows)
    }

    /// Moves past ticks that were pruned before this reader read them, and says so.
    async fn skip_pruned(&mut self) -> ChangeError {
        let oldest: Option<i64> = match sqlx::query_scalar("SELECT min(id) FROM quill.tick")
            .fetch_one(&self.pool)
            .await
        {
            Ok(oldest) => oldest,
            Err(e) => return e.into(),
        };
        let after_tick = self.cursor.last_tick;
        // Never backwards: that would deliver again what was delivered.
        self.cursor = TickCursor::after(oldest.unwrap_or(0).max(after_tick));
        ChangeError::Gap { after_tick }
    }
}

/// Why a client cannot resume from a position.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("position {0} is older than the retained change log")]
    Gone(i64),
    #[error("position {0} is not a delivered change")]
    Unknown(i64),
    #[error(transparent)]
    Change(#[from] ChangeError),
}

/// Finds where the change with `seq` stands in the delivery order.
pub async fn locate(pool: &PgPool, seq: i64) -> Result<Position, ResumeError> {
    // Pruning goes by commit order, so what is gone is not a seq range: the pruner keeps
    // the newest seq it deleted. A seq a client was given and no longer in the log at or
    // below it was pruned; above it, it was never delivered.
    let (tick, pruned): (Option<i64>, i64) =
        sqlx::query_as("SELECT quill.tick_of($1), (SELECT max_seq FROM quill.pruned)")
            .bind(seq)
            .fetch_one(pool)
            .await
            .map_err(ChangeError::from)?;
    match tick {
        Some(tick) => Ok(Position { tick, seq }),
        None if seq <= pruned => Err(ResumeError::Gone(seq)),
        None => Err(ResumeError::Unknown(seq)),
    }
}

/// The newest seq in the change log (0 when it is empty).
pub async fn newest_seq(pool: &PgPool) -> Result<i64, ChangeError> {
    Ok(sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM quill.change_log")
        .fetch_one(pool)
        .await?)
}

/// Where a consistent read of the data tables stands in the change log. Taken as the first
/// statement of a REPEATABLE READ transaction, whose snapshot `S` every later read shares.
///
/// Every tick the transaction sees was taken before `S`, so every change of ticks up to
/// [`SnapshotPoint::tick`] is in the read. A later tick may hold changes that committed
/// between that tick's snapshot and `S`: those are in the read too, and [`SnapshotPoint::skip`]
/// lists them, so that a replay from the tick sends each change exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPoint {
    pub tick: i64,
    /// Seqs of the table's changes that are in the read but delivered after `tick`.
    pub skip: HashSet<i64>,
}

/// Takes the snapshot point of the transaction on `conn` (see [`SnapshotPoint`]) for one
/// table's changes. Must be the transaction's first statement.
pub async fn snapshot_point(conn: &mut PgConnection, schema: &str, table: &str) -> Result<SnapshotPoint, ChangeError> {
    let tick: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM quill.tick")
        .fetch_one(&mut *conn)
        .await?;
    // Committed after the tick's snapshot and before the read's: not in the tick, yet
    // visible here (this statement sees exactly the read's snapshot).
    let skip: Vec<i64> = sqlx::query_scalar(
        "SELECT c.seq FROM quill.change_log c, quill.tick t
         WHERE t.id = $1
           AND c.xid >= pg_snapshot_xmin(t.snapshot)
           AND c.xid < pg_snapshot_xmax(pg_current_snapshot())
           AND NOT pg_visible_in_snapshot(c.xid, t.snapshot)
           AND c.table_schema = $2 AND c.table_name = $3",
    )
    .bind(tick)
    .bind(schema)
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    Ok(SnapshotPoint {
        tick,
        skip: skip.into_iter().collect(),
    })
}

/// The resume position of "every change through `tick`": the newest seq of its batch, or 0
/// when the tick holds none any more (a resume from 0 gets a fresh snapshot).
pub async fn last_seq_of_tick(pool: &PgPool, tick: i64) -> Result<i64, ChangeError> {
    let seq: Option<i64> = sqlx::query_scalar("SELECT quill.last_seq_of_tick($1)")
        .bind(tick)
        .fetch_one(pool)
        .await?;
    Ok(seq.unwrap_or(0))
}

/// Where a transaction stands for delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDelivery {
    /// Nothing of it is to be delivered (it logged no change, rolled back, or its changes
    /// were delivered long ago and pruned).
    Nothing,
    /// Its changes are in this tick.
    InTick(i64),
    /// Still running, or committed and not yet in a tick.
    NotYet,
}

/// Why a transaction id cannot be waited for.
#[derive(Debug, thiserror::Error)]
pub enum TxidError {
    #[error("transaction {0} has not started yet")]
    Future(u64),
    #[error(transparent)]
    Change(#[from] ChangeError),
}

/// Finds the tick that delivers the changes of transaction `txid`.
pub async fn tx_delivery(pool: &PgPool, txid: u64) -> Result<TxDelivery, TxidError> {
    // pg_xact_status fails for a transaction id not yet assigned; NULL for one too old to
    // know (delivered long ago). A snapshot's xmax is no test: it is one past the newest
    // completed transaction, so running ones may be above it.
    let row: Result<(Option<String>, bool, Option<i64>), sqlx::Error> = sqlx::query_as(
        "SELECT pg_xact_status($1::text::xid8),
                EXISTS (SELECT 1 FROM quill.change_log WHERE xid = $1::text::xid8),
                quill.tick_of_xid($1::text::xid8)",
    )
    .bind(txid.to_string())
    .fetch_one(pool)
    .await;
    let (status, logged, tick) = match row {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("22023") => {
            return Err(TxidError::Future(txid));
        }
        row => row.map_err(ChangeError::from)?,
    };
    Ok(match (status.as_deref(), logged, tick) {
        // Its log rows are invisible until it commits.
        (Some("in progress"), _, _) => TxDelivery::NotYet,
        (_, false, _) => TxDelivery::Nothing,
        (_, true, Some(tick)) => TxDelivery::InTick(tick),
        (_, true, None) => TxDelivery::NotYet,
    })
}

/// The changes after a position, in delivery order: what a resuming client missed. It reads
/// up to a tick that the caller moves forward ([`Replay::extend_to`]) until it meets live
/// delivery: many small ticks in one round trip, a big one page by page, so any span
/// replays in bounded memory.
pub struct Replay {
    pool: PgPool,
    cursor: TickCursor,
    after: Position,
    until: i64,
    /// Changes the client already has (they were in its snapshot).
    skip: HashSet<i64>,
}

impl Replay {
    pub async fn new(pool: PgPool, after: Position) -> Result<Replay, ChangeError> {
        // The tick before `after.tick` bounds its batch from below.
        let prev: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM quill.tick WHERE id < $1")
            .bind(after.tick)
            .fetch_one(&pool)
            .await?;
        // After the whole of a tick (a snapshot's position): its batch need not be read.
        let prev = if after.seq == i64::MAX {
            after.tick
        } else {
            prev.unwrap_or(0)
        };
        Ok(Replay {
            pool,
            cursor: TickCursor::after(prev),
            after,
            until: prev,
            skip: HashSet::new(),
        })
    }

    /// Leaves out these changes (the client has them from a snapshot).
    pub fn skipping(mut self, skip: HashSet<i64>) -> Self {
        self.skip = skip;
        self
    }

    /// Whether some change to leave out has not been read yet: it is in a later tick, so
    /// the replay must read on before handing over, or live delivery would send it.
    pub fn skips_ahead(&self) -> bool {
        !self.skip.is_empty()
    }

    /// Lets the replay read up to and including `tick`.
    pub fn extend_to(&mut self, tick: i64) {
        self.until = self.until.max(tick);
    }

    /// The next page, or `None` once every change up to the `extend_to` tick was returned.
    /// [`ChangeError::Gap`] when the pruner overtook the replay: changes it had yet to
    /// return may be gone.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Change>>, ChangeError> {
        let read_through = self.cursor.read_through();
        let page = match self.read_page().await {
            Err(e) if e.is_pruned() => {
                return Err(ChangeError::Gap {
                    after_tick: read_through,
                });
            }
            page => page?,
        };
        // The pruner records its cut in the transaction that deletes: read after the page,
        // a cut past what was read through means the page may lack deleted changes.
        let cut: i64 = sqlx::query_scalar("SELECT cut_tick FROM quill.pruned")
            .fetch_one(&self.pool)
            .await?;
        if cut > read_through {
            return Err(ChangeError::Gap {
                after_tick: read_through,
            });
        }
        Ok(page)
    }

    async fn read_page(&mut self) -> Result<Option<Vec<Change>>, ChangeError> {
        loop {
            let mut page = match self.cursor.next_page(&self.pool).await? {
                Some(page) => page,
                None if self.cursor.last_tick >= self.until => return Ok(None),
                None => {
                    let rows = sqlx::query_as::<_, Polled>(
                        "SELECT prev, tick, read_later, seq, table_schema, table_name, kind, row_data, old_data, written_us
                         FROM quill.read_ticks($1, $2, $3)",
                    )
                    .bind(self.cursor.last_tick)
                    .bind(self.until)
                    .bind(PAGE as i32)
                    .fetch_all(&self.pool)
                    .await?;
                    let (changes, any) = self.cursor.absorb(rows)?;
                    if !any {
                        // No tick left up to `until`: nothing more to read.
                        self.cursor.last_tick = self.until;
                    }
                    changes
                }
            };
            // The client has everything up to `after`.
            let after = self.after;
            page.retain(|c| {
                Position {
                    tick: c.tick,
                    seq: c.seq,
                } > after
                    && !self.skip.remove(&c.seq)
            });
            if !page.is_empty() {
                return Ok(Some(page));
            }
        }
    }
}
