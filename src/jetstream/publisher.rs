//! The cluster's one change-log reader. Every instance is a candidate; the one that holds
//! [`LOCK_KEY`] on a session of its own reads the log as a lone instance would and appends
//! each change, in delivery order, to the stream.
//!
//! No gap: a new publisher continues after the stream's last message (in the middle of a
//! tick if the last one died there). No duplicate: every append names the stream sequence
//! it expects to follow (`Nats-Expected-Last-Sequence`), so a publisher whose view is stale
//! (it lost its lock and does not know yet, or another appended first) is refused and
//! reads the stream's end again; `Nats-Msg-Id` deduplicates retries as well.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::wire::{self, SEQ, THROUGH, TICK};
use super::{Cluster, StreamError};
use crate::change::monitor::run_monitor;
use crate::change::retention::run_pruner;
use crate::change::{self, Change, ChangeError, ChangeSource, LogReader, Wakeups, run_listener};
use crate::config::Retention;
use crate::metrics::Metrics;

/// The advisory lock whose holder publishes ("quillPub"; advisory locks are per database,
/// as the stream is).
pub const LOCK_KEY: i64 = 0x7175_696c_6c50_7562;

/// How often a candidate tries for the lock, and the publisher checks its session: a dead
/// publisher is replaced within about this long.
const CANDIDATE_EVERY: Duration = Duration::from_secs(1);
/// A lock session that does not answer this fast counts as lost.
const SESSION_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a candidate needs to publish when elected.
pub struct Candidate {
    pub pool: PgPool,
    pub database_url: String,
    pub cluster: Cluster,
    pub wake: Wakeups,
    pub poll: Duration,
    pub retention: Retention,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

/// Runs until `shutdown`: waits for the lock, publishes while it holds it, steps down when
/// its session is lost, and tries again.
pub async fn run_candidate(candidate: Candidate) {
    loop {
        match try_lock(&candidate.pool).await {
            Ok(Some(session)) => {
                candidate.metrics.cluster_publisher.set(1);
                tracing::info!("this instance is the cluster's publisher");
                candidate.publish(session).await;
                candidate.metrics.cluster_publisher.set(0);
                if !candidate.shutdown.is_cancelled() {
                    tracing::warn!("stepped down as the cluster's publisher");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "cannot try for the publisher lock"),
        }
        tokio::select! {
            _ = candidate.shutdown.cancelled() => return,
            _ = tokio::time::sleep(CANDIDATE_EVERY) => {}
        }
    }
}

/// A session of its own holding the lock, or `None` when another instance holds it.
async fn try_lock(pool: &PgPool) -> Result<Option<PgConnection>, sqlx::Error> {
    let mut session = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut session)
        .await?;
    if locked {
        // If this machine dies, PostgreSQL must notice in seconds, not in the hours of the
        // OS's keepalive defaults: until then the lock stays taken and nobody publishes.
        for setting in [
            "SET tcp_keepalives_idle = 5",
            "SET tcp_keepalives_interval = 2",
            "SET tcp_keepalives_count = 3",
            "SET tcp_user_timeout = 10000",
        ] {
            sqlx::query(setting).execute(&mut session).await?;
        }
        Ok(Some(session))
    } else {
        let _ = session.close().await;
        Ok(None)
    }
}

/// Keeps the lock session alive and checks it; cancels `held` when it is lost. Closing the
/// session (at `held`) releases the lock.
async fn watch_session(mut session: PgConnection, held: CancellationToken) {
    loop {
        tokio::select! {
            _ = held.cancelled() => break,
            _ = tokio::time::sleep(CANDIDATE_EVERY) => {}
        }
        let alive = tokio::time::timeout(SESSION_TIMEOUT, sqlx::query("SELECT 1").execute(&mut session)).await;
        if !matches!(alive, Ok(Ok(_))) {
            tracing::warn!("lost the publisher lock's session");
            held.cancel();
            return;
        }
    }
    let _ = session.close().await;
}

/// Where the stream ends: the sequence and message to append after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEnd {
    /// Which incarnation of the stream (see [`wire::STREAM`]).
    pub stream_id: String,
    pub last_sequence: u64,
    /// The last message's `Nats-Msg-Id`.
    pub last_id: Option<String>,
    /// What the last message says of the log (`None`: the stream holds no quill message,
    /// having none at all, only expired ones, or a stranger's at its end).
    pub last: Option<LastAppended>,
}

/// The position in the log of the stream's last message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastAppended {
    pub tick: i64,
    /// Its change (absent on a start or gap record).
    pub seq: Option<i64>,
    /// Every change of ticks up to this one is in the stream (on a batch's last message).
    pub through: Option<i64>,
}

impl StreamEnd {
    pub async fn read(stream: &mut stream::Stream) -> Result<Self, StreamError> {
        let name = stream.cached_info().config.name.clone();
        let failed = |e: &dyn std::fmt::Display| StreamError::Stream {
            stream: name.clone(),
            reason: e.to_string(),
        };
        let info = stream.info().await.map_err(|e| failed(&e))?;
        let last_sequence = info.state.last_sequence;
        let mut end = Self {
            stream_id: wire::stream_id(info.created),
            last_sequence,
            last_id: None,
            last: None,
        };
        // A stream whose messages all expired keeps its sequence but holds nothing to read.
        if info.state.messages == 0 {
            return Ok(end);
        }
        let last = stream.get_raw_message(last_sequence).await.map_err(|e| failed(&e))?;
        let headers = Some(&last.headers);
        end.last_id = wire::message_id(&last.headers);
        end.last = wire::header(headers, TICK).map(|tick| LastAppended {
            tick,
            seq: wire::header(headers, SEQ),
            through: wire::header(headers, THROUGH),
        });
        Ok(end)
    }

    /// Where the log reader resumes: after which tick, and the last appended change of a
    /// tick the stream holds only part of. `(None, None)`: start at the newest tick, as on
    /// a new stream (also when the stream is a stranger's: its ticks are past this
    /// database's newest, as after the database was made again under the same name).
    async fn resume_point(&self, pool: &PgPool) -> Result<(Option<i64>, Option<(i64, i64)>), ChangeError> {
        let Some(last) = self.last else {
            return Ok((None, None));
        };
        let newest = change::newest_tick(pool).await?;
        if last.tick > newest {
            tracing::error!(
                stream_tick = last.tick,
                newest_tick = newest,
                "the stream is ahead of this database (another database's stream?): starting afresh"
            );
            return Ok((None, None));
        }
        match (last.through, last.seq) {
            (Some(through), _) if through >= last.tick => Ok((Some(through), None)),
            (_, Some(seq)) => {
                // Tick ids can skip (a rolled-back poll): the tick before is the one the log has.
                let before: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM quill.tick WHERE id < $1")
                    .bind(last.tick)
                    .fetch_one(pool)
                    .await?;
                Ok((Some(before.unwrap_or(last.tick - 1)), Some((last.tick, seq))))
            }
            (through, None) => Ok((Some(through.unwrap_or(last.tick)), None)),
        }
    }
}

impl Candidate {
    /// Publishes while the lock is held (and until shutdown). Only the publisher listens,
    /// prunes and samples the log.
    async fn publish(&self, session: PgConnection) {
        let held = self.shutdown.child_token();
        let watchdog = tokio::spawn(watch_session(session, held.clone()));
        let tasks = [
            tokio::spawn(run_listener(
                self.database_url.clone(),
                self.wake.clone(),
                self.metrics.clone(),
                held.clone(),
            )),
            tokio::spawn(run_monitor(self.pool.clone(), self.metrics.clone(), held.clone())),
        ];
        let mut backoff = Duration::from_millis(100);
        while !held.is_cancelled() {
            let outcome = self.publish_from_stream_end(&held).await;
            match outcome {
                Ok(()) => break,
                Err(PublishFailed::Stream(StreamError::Fenced { expected })) => {
                    self.metrics.cluster_fenced.inc();
                    tracing::warn!(expected, "another publisher appended: reading the stream's end again");
                    tokio::select! {
                        _ = held.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "publishing the change log failed");
                    tokio::select! {
                        _ = held.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        held.cancel();
        let _ = watchdog.await;
        for task in tasks {
            let _ = task.await;
        }
        // The listener is down with the role: /metrics must not say it is connected.
        self.metrics.listener_connected.set(0);
    }

    /// Reads the stream's end, then the log from there, appending until `held` ends (`Ok`)
    /// or an append or read fails.
    async fn publish_from_stream_end(&self, held: &CancellationToken) -> Result<(), PublishFailed> {
        let (mut appender, end) = Appender::at_end(&self.cluster, &self.metrics).await?;
        let (after_tick, partial) = end.resume_point(&self.pool).await?;
        let mut reader = LogReader::start_after(
            self.pool.clone(),
            self.wake.changes.clone(),
            self.poll,
            self.metrics.clone(),
            after_tick,
        )
        .await?;
        // Until the stream has something, the log is kept from where it ends.
        if let Some(after) = after_tick {
            reader.keep_from(after);
        }
        // Only now: the reader's registration protects what the stream lacks.
        let pruner = held.child_token();
        let _stop_pruner = pruner.clone().drop_guard();
        tokio::spawn(run_pruner(self.pool.clone(), self.retention, pruner));
        tracing::info!(
            last_sequence = end.last_sequence,
            ?after_tick,
            "publishing from the stream's end"
        );
        if after_tick.is_none() {
            appender.append_start(reader.read_through()).await?;
        }
        let mut partial = partial;
        loop {
            let batch = tokio::select! {
                _ = held.cancelled() => return Ok(()),
                batch = reader.next_batch() => batch,
            };
            match batch {
                Ok(mut changes) => {
                    if let Some((tick, seq)) = partial {
                        changes.retain(|c| c.tick != tick || c.seq > seq);
                        if changes.iter().any(|c| c.tick > tick) || reader.read_through() >= tick {
                            partial = None;
                        }
                    }
                    let through = reader.read_through();
                    if !appender.append_until_done(held, &changes, through).await? {
                        return Ok(());
                    }
                    reader.keep_from(through);
                }
                Err(ChangeError::Gap { after_tick }) => {
                    tracing::error!(
                        after_tick,
                        "the change log was pruned past the publisher: events were lost"
                    );
                    appender.append_gap(after_tick, reader.read_through()).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Appends to the stream, fenced by the sequence it expects to follow.
pub struct Appender<'a> {
    cluster: &'a Cluster,
    last: u64,
    last_id: Option<String>,
    stream_id: String,
    metrics: &'a Metrics,
}

impl<'a> Appender<'a> {
    /// An appender after the stream's current end (the stream made if missing).
    pub async fn at_end(cluster: &'a Cluster, metrics: &'a Metrics) -> Result<(Self, StreamEnd), StreamError> {
        let mut stream = cluster.stream().await?;
        let end = StreamEnd::read(&mut stream).await?;
        let appender = Self {
            cluster,
            last: end.last_sequence,
            last_id: end.last_id.clone(),
            stream_id: end.stream_id.clone(),
            metrics,
        };
        Ok((appender, end))
    }

    /// [`Self::append`] until it succeeds: NATS may be down for long, the log is the buffer,
    /// and the reader keeps it from the pruner meanwhile. False when `held` ended first; a
    /// fenced append returns at once (the stream's end must be read again).
    async fn append_until_done(
        &mut self,
        held: &CancellationToken,
        changes: &[Change],
        through: i64,
    ) -> Result<bool, StreamError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.append(changes, through).await {
                Ok(()) => return Ok(true),
                Err(e @ StreamError::Fenced { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "appending to the stream failed");
                }
            }
            tokio::select! {
                _ = held.cancelled() => return Ok(false),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Appends the changes in order, the last one marked complete through `through`.
    /// Pipelined: every publish is sent before the first ack is awaited, so each names what
    /// it must follow: the first the stream's last sequence, every later one also the
    /// previous message's id. Once one is refused every later one is too (by sequence alone
    /// a later one could land after another publisher's), and what lands is always an exact
    /// continuation of the stream.
    pub async fn append(&mut self, changes: &[Change], through: i64) -> Result<(), StreamError> {
        let max_payload = self.cluster.max_payload();
        let mut acks = Vec::with_capacity(changes.len());
        let mut previous = None;
        for (i, change) in changes.iter().enumerate() {
            let last_of_batch = i + 1 == changes.len();
            let (headers, body) =
                wire::change_message(change, last_of_batch.then_some(through), &self.stream_id, max_payload);
            let id = wire::message_id(&headers);
            // The first follows the stream's end by sequence alone: after a restart the
            // server forgets the last id once it is older than the duplicate window.
            let follows = if i == 0 { None } else { previous.take() };
            acks.push(self.send(headers, body, self.last + i as u64, follows).await?);
            previous = id;
        }
        self.confirm(acks).await?;
        self.last_id = previous;
        self.metrics.cluster_published.inc_by(changes.len() as u64);
        Ok(())
    }

    async fn append_start(&mut self, through: i64) -> Result<(), StreamError> {
        self.append_marker(wire::start_message(through, &self.stream_id)).await
    }

    async fn append_gap(&mut self, after_tick: i64, through: i64) -> Result<(), StreamError> {
        self.append_marker(wire::gap_message(after_tick, through, &self.stream_id))
            .await
    }

    async fn append_marker(
        &mut self,
        (headers, body): (async_nats::HeaderMap, bytes::Bytes),
    ) -> Result<(), StreamError> {
        let id = wire::message_id(&headers);
        let ack = self.send(headers, body, self.last, None).await?;
        self.confirm(vec![ack]).await?;
        self.last_id = id;
        Ok(())
    }

    async fn send(
        &self,
        headers: async_nats::HeaderMap,
        body: bytes::Bytes,
        expected: u64,
        follows: Option<String>,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, StreamError> {
        let mut message = PublishMessage::build()
            .headers(headers)
            .payload(body)
            .expected_last_sequence(expected);
        if let Some(follows) = follows {
            message = message.expected_last_message_id(follows);
        }
        self.cluster
            .jetstream
            .send_publish(self.cluster.name.subject.clone(), message)
            .await
            .map_err(|e| StreamError::Append(e.to_string()))
    }

    /// Waits for the acks in order; each must land right after the one before.
    async fn confirm(
        &mut self,
        acks: Vec<async_nats::jetstream::context::PublishAckFuture>,
    ) -> Result<(), StreamError> {
        for ack in acks {
            let expected = self.last;
            let ack = ack.await.map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => {
                    StreamError::Fenced { expected }
                }
                _ => StreamError::Append(e.to_string()),
            })?;
            if ack.duplicate || ack.sequence != expected + 1 {
                // Someone else's append is where this one meant to go.
                return Err(StreamError::Fenced { expected });
            }
            self.last = ack.sequence;
        }
        Ok(())
    }
}

/// Why publishing stopped (the candidate starts again from the stream's end).
#[derive(Debug, thiserror::Error)]
enum PublishFailed {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Log(#[from] ChangeError),
}
