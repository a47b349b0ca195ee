//! Reads the change log tick by tick. See `migrations/*_change_log.sql` for why ticks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use sqlx::types::Json;
use tokio::sync::Notify;

use super::{Change, ChangeError, ChangeSource};
use crate::event::EventKind;

/// How many changes one read returns at most, so a 100 000-row transaction streams through
/// in bounded memory.
const PAGE: i64 = 1000;

/// Reads committed changes from `quill.change_log`, tick by tick.
pub struct LogReader {
    pool: PgPool,
    wake: Arc<Notify>,
    poll: Duration,
    last_tick: i64,
    /// Ticks seen but not fully read: (previous tick, tick).
    pending: VecDeque<(i64, i64)>,
    /// Within the front pending tick, the last seq already returned.
    after_seq: i64,
    /// Whether to look for new changes before waiting for the next wake-up.
    eager: bool,
}

impl LogReader {
    /// Starts at the newest tick: changes committed before now are history, except those no
    /// tick covers yet, which arrive with the next one.
    pub async fn start(
        pool: PgPool,
        wake: Arc<Notify>,
        poll: Duration,
    ) -> Result<Self, ChangeError> {
        let last_tick: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM quill.tick")
            .fetch_one(&pool)
            .await?;
        Ok(Self {
            pool,
            wake,
            poll,
            last_tick,
            pending: VecDeque::new(),
            after_seq: 0,
            eager: true,
        })
    }

    /// The last tick whose batch has been fully returned.
    pub fn position(&self) -> i64 {
        self.pending
            .front()
            .map_or(self.last_tick, |(prev, _)| *prev)
    }

    async fn read_page(&self, prev: i64, tick: i64) -> Result<Vec<Change>, ChangeError> {
        let rows: Vec<(i64, String, String, String, Json<Value>)> = sqlx::query_as(
            "SELECT c.seq, c.table_schema, c.table_name, c.kind, c.row_data
             FROM quill.tick p, quill.tick n, quill.change_log c
             WHERE p.id = $1 AND n.id = $2
               AND c.xid >= pg_snapshot_xmin(p.snapshot)
               AND pg_visible_in_snapshot(c.xid, n.snapshot)
               AND NOT pg_visible_in_snapshot(c.xid, p.snapshot)
               AND c.seq > $3
             ORDER BY c.seq
             LIMIT $4",
        )
        .bind(prev)
        .bind(tick)
        .bind(self.after_seq)
        .bind(PAGE)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(seq, table_schema, table_name, kind, row)| {
                Ok(Change {
                    seq,
                    table_schema,
                    table_name,
                    kind: EventKind::parse(&kind).ok_or(ChangeError::UnknownKind(kind))?,
                    row: row.0,
                })
            })
            .collect()
    }

    async fn fetch_ticks(&mut self) -> Result<(), ChangeError> {
        let ids: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM quill.tick WHERE id > $1 ORDER BY id LIMIT 1000")
                .bind(self.last_tick)
                .fetch_all(&self.pool)
                .await?;
        let mut prev = self.pending.back().map_or(self.last_tick, |(_, t)| *t);
        for id in ids {
            self.pending.push_back((prev, id));
            prev = id;
        }
        self.last_tick = prev;
        Ok(())
    }
}

impl ChangeSource for LogReader {
    async fn next_batch(&mut self) -> Result<Vec<Change>, ChangeError> {
        loop {
            if let Some(&(prev, tick)) = self.pending.front() {
                let page = self.read_page(prev, tick).await?;
                match page.last() {
                    Some(last) if page.len() as i64 == PAGE => self.after_seq = last.seq,
                    _ => {
                        self.pending.pop_front();
                        self.after_seq = 0;
                    }
                }
                if page.is_empty() {
                    continue;
                }
                return Ok(page);
            }
            if !self.eager {
                // A missed notification costs at most one poll interval, never a change.
                let _ = tokio::time::timeout(self.poll, self.wake.notified()).await;
            }
            self.eager = false;
            let made: Option<i64> = sqlx::query_scalar("SELECT quill.make_tick()")
                .fetch_one(&self.pool)
                .await?;
            // Another quill instance may have made the tick; either way, read what is new.
            let _ = made;
            self.fetch_ticks().await?;
            if !self.pending.is_empty() {
                self.eager = true;
            }
        }
    }
}
