//! Every instance's change source in a cluster: the stream, read in order with an ordered
//! consumer, checked for contiguous stream sequences, fed to the pipeline as a log reader
//! would be. It sends PostgreSQL nothing but a lookup of the newest tick at start and the
//! rare change too big for one NATS message.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;

use super::wire::{self, Record, STREAM, THROUGH, TICK};
use super::{Cluster, StreamError};
use crate::change::{self, Change, ChangeError, ChangeSource};
use crate::metrics::Metrics;

/// Most changes in one batch (as the log reader's page).
const PAGE: usize = 1000;

/// How far before its start an instance looks in the stream when the stream's end is
/// already past the ticks it counts as history: covers clock skew between hosts.
const START_MARGIN: Duration = Duration::from_secs(60);

/// How long a reader waits for a message before it checks the stream itself: a consumer
/// can be lost without the client noticing (the stream deleted, a server restarted).
const IDLE_CHECK: Duration = Duration::from_secs(2);

/// Reads the cluster's stream.
pub struct StreamSource {
    cluster: Cluster,
    pool: PgPool,
    metrics: Arc<Metrics>,
    messages: Option<pull::Ordered>,
    /// The incarnation of the stream being read (see [`wire::STREAM`]).
    stream_id: Option<String>,
    /// The stream was made again: read the new one from its start...
    from_start: bool,
    /// ... and the loss is yet to be reported.
    lost: bool,
    /// The stream sequence of the last message taken.
    last: Option<u64>,
    /// A message read but not yet taken (it follows a gap that had to be reported first).
    held: Option<async_nats::jetstream::Message>,
    /// Ticks up to this one were history when the instance started (as a log reader
    /// starts at the newest tick); their messages are skipped.
    history_through: i64,
    started_at: SystemTime,
    read_through: i64,
    /// The most messages the stream held beyond one taken in the last batch.
    behind: u64,
    max_lag: u64,
    connects: tokio::sync::watch::Receiver<u64>,
}

impl StreamSource {
    /// Starts at the newest tick, like a log reader: earlier changes are history (clients
    /// resume through them from the change log).
    pub async fn start(
        cluster: Cluster,
        pool: PgPool,
        metrics: Arc<Metrics>,
        max_lag: u64,
    ) -> Result<Self, ChangeError> {
        let newest = change::newest_tick(&pool).await?;
        let mut connects = cluster.reconnections();
        connects.mark_unchanged();
        Ok(Self {
            connects,
            cluster,
            pool,
            metrics,
            messages: None,
            stream_id: None,
            from_start: false,
            lost: false,
            last: None,
            held: None,
            history_through: newest,
            started_at: SystemTime::now(),
            read_through: newest,
            behind: 0,
            max_lag,
        })
    }

    /// The tick delivery starts after.
    pub fn position(&self) -> i64 {
        self.read_through
    }

    /// Opens an ordered consumer where this source stands; `Err(Gap)` when the stream is
    /// not the one it read before (deleted and made again: what it held is lost).
    async fn open(&mut self) -> Result<(), ChangeError> {
        let mut stream = self.cluster.stream().await.map_err(stream_failed)?;
        let info = stream.info().await.map_err(|e| stream_failed(e.to_string()))?.clone();
        let stream_id = wire::stream_id(info.created);
        if self.stream_id.as_ref().is_some_and(|id| *id != stream_id) {
            self.stream_made_again();
        }
        let policy = match self.last {
            Some(last) => DeliverPolicy::ByStartSequence {
                start_sequence: last + 1,
            },
            None if self.from_start => DeliverPolicy::All,
            None => {
                first_position(
                    &stream,
                    info.state.last_sequence,
                    info.state.messages,
                    self.history_through,
                    self.started_at,
                )
                .await?
            }
        };
        self.stream_id = Some(stream_id);
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.cluster.name.subject.clone(),
                deliver_policy: policy,
                ..Default::default()
            })
            .await
            .map_err(|e| stream_failed(e.to_string()))?;
        self.messages = Some(consumer.messages().await.map_err(|e| stream_failed(e.to_string()))?);
        Ok(())
    }

    /// Takes one message into `batch`; true when it ends the publisher's batch (or when a
    /// message that must be reported on its own is held for the next call).
    async fn take(
        &mut self,
        message: async_nats::jetstream::Message,
        batch: &mut Vec<Change>,
    ) -> Result<bool, ChangeError> {
        let info = message.info().map_err(|e| stream_failed(e.to_string()))?;
        let sequence = info.stream_sequence;
        self.behind = self.behind.max(info.pending);
        self.metrics
            .cluster_stream_pending
            .set(i64::try_from(info.pending).unwrap_or(i64::MAX));
        let appended_to = message
            .headers
            .as_ref()
            .and_then(|h| h.get(STREAM))
            .map(|v| v.as_str().to_owned());
        if let (Some(appended_to), Some(reading)) = (appended_to, &self.stream_id)
            && appended_to != *reading
        {
            if !batch.is_empty() {
                self.held = Some(message);
                return Ok(true);
            }
            // Read again from the new stream's start.
            self.stream_id = Some(appended_to);
            self.stream_made_again();
            return Ok(false);
        }
        if let Some(last) = self.last
            && sequence != last + 1
        {
            self.held = Some(message);
            if !batch.is_empty() {
                return Ok(true);
            }
            // Retention removed messages this instance had not read.
            tracing::error!(
                after = last,
                next = sequence,
                "the cluster's stream lost messages this instance had not read"
            );
            self.last = Some(sequence - 1);
            let after_tick = self.read_through;
            // What was lost is before the next message's tick: resumes read it from the log.
            if let Some(tick) = self.held.as_ref().and_then(|m| wire::header(m.headers.as_ref(), TICK)) {
                self.read_through = self.read_through.max(tick.saturating_sub(1));
            }
            return Err(ChangeError::Gap { after_tick });
        }
        match self.read(&message, sequence, batch).await {
            Ok(end) => {
                self.last = Some(sequence);
                Ok(end)
            }
            // The batch so far goes first; the message is read again on the next call.
            Err(_) if !batch.is_empty() => {
                self.held = Some(message);
                Ok(true)
            }
            Err(Unread::Again(e)) => {
                self.held = Some(message);
                Err(e)
            }
            Err(Unread::Consumed(e)) => {
                self.last = Some(sequence);
                Err(e)
            }
        }
    }

    async fn read(
        &mut self,
        message: &async_nats::jetstream::Message,
        sequence: u64,
        batch: &mut Vec<Change>,
    ) -> Result<bool, Unread> {
        let headers = message.headers.as_ref();
        let Some(tick) = wire::header(headers, TICK) else {
            return Err(self.malformed(sequence, "no tick header"));
        };
        if self.lost && !matches!(Record::decode(&message.payload), Ok(Record::Start { .. })) {
            self.lost = false;
            self.last = Some(sequence - 1);
            return Err(Unread::Again(ChangeError::Gap {
                after_tick: self.read_through,
            }));
        }
        let through = wire::header(headers, THROUGH);
        if tick > self.history_through {
            let record = Record::decode(&message.payload).map_err(|reason| self.malformed(sequence, &reason))?;
            match record {
                Record::Change(change) => {
                    batch.push(
                        change
                            .into_change()
                            .map_err(|reason| self.malformed(sequence, &reason))?,
                    );
                }
                Record::Reference { seq, tick } => match change::fetch_change(&self.pool, tick, seq).await {
                    Ok(Some(change)) => batch.push(change),
                    Ok(None) => {
                        tracing::error!(seq, "a change too big for NATS was pruned before this instance read it");
                        return Err(Unread::Consumed(ChangeError::Gap {
                            after_tick: self.read_through,
                        }));
                    }
                    Err(e) => return Err(Unread::Again(e)),
                },
                Record::Start { through } => {
                    let lost = std::mem::take(&mut self.lost);
                    let missed = lost || through > self.read_through;
                    let after_tick = self.read_through;
                    self.read_through = self.read_through.max(through);
                    if missed {
                        tracing::error!(
                            after_tick,
                            through,
                            "the cluster's publisher started past this instance: events were lost"
                        );
                        return Err(Unread::Consumed(ChangeError::Gap { after_tick }));
                    }
                }
                Record::Gap { after_tick } => {
                    self.read_through = self.read_through.max(through.unwrap_or(after_tick));
                    return Err(Unread::Consumed(ChangeError::Gap { after_tick }));
                }
            }
        }
        self.read_through = self
            .read_through
            .max(tick.saturating_sub(1))
            .max(through.unwrap_or(i64::MIN));
        Ok(through.is_some())
    }

    /// After a quiet spell: a new stream means a gap; messages this reader has not had
    /// mean its consumer is lost, and it makes a new one.
    async fn check_stream(&mut self) -> Result<(), ChangeError> {
        let mut stream = self.cluster.stream().await.map_err(stream_failed)?;
        let info = stream.info().await.map_err(|e| stream_failed(e.to_string()))?;
        let stream_id = wire::stream_id(info.created);
        if self.stream_id.as_ref().is_some_and(|id| *id != stream_id) {
            self.stream_id = Some(stream_id);
            self.stream_made_again();
            return Ok(());
        }
        if info.state.last_sequence > self.last.unwrap_or(0) && self.last.is_some() {
            tracing::warn!("the cluster's stream has messages its consumer did not deliver: making a new consumer");
            self.messages = None;
        }
        Ok(())
    }

    /// The stream was deleted and made again: what the old one held and this instance had
    /// not read is lost. The new one is read from its start, past what was delivered.
    /// The loss is reported with the new stream's first message, which says where its
    /// publisher started: resumes then replay from the log up to there.
    fn stream_made_again(&mut self) {
        tracing::error!(stream = %self.cluster.name.stream, "the cluster's stream was made again: events were lost");
        self.messages = None;
        self.last = None;
        self.from_start = true;
        self.lost = true;
        self.history_through = self.read_through;
    }

    /// A message no instance can read: what it carried is lost to the subscribers.
    fn malformed(&self, sequence: u64, reason: &str) -> Unread {
        tracing::error!(sequence, %reason, "a malformed message in the cluster's stream");
        Unread::Consumed(ChangeError::Gap {
            after_tick: self.read_through,
        })
    }

    /// Drops the consumer after an error; the next call opens one after the last message.
    fn lose_consumer(&mut self, reason: String) -> ChangeError {
        self.messages = None;
        stream_failed(reason)
    }
}

/// Where to start in a stream never read before: right after its end when that is all
/// history to this instance, else from a little before this instance started.
async fn first_position(
    stream: &async_nats::jetstream::stream::Stream,
    last_sequence: u64,
    messages: u64,
    history_through: i64,
    started_at: SystemTime,
) -> Result<DeliverPolicy, ChangeError> {
    if last_sequence == 0 {
        return Ok(DeliverPolicy::All);
    }
    if messages == 0 {
        // Every message expired: whatever comes next is new.
        return Ok(DeliverPolicy::ByStartSequence {
            start_sequence: last_sequence + 1,
        });
    }
    let last = stream
        .get_raw_message(last_sequence)
        .await
        .map_err(|e| stream_failed(e.to_string()))?;
    match wire::header(Some(&last.headers), TICK) {
        Some(tick) if tick <= history_through => Ok(DeliverPolicy::ByStartSequence {
            start_sequence: last_sequence + 1,
        }),
        _ => {
            let since = started_at.checked_sub(START_MARGIN).unwrap_or(started_at);
            let since = time::OffsetDateTime::from(since);
            Ok(DeliverPolicy::ByStartTime { start_time: since })
        }
    }
}

/// Why a message was not taken: to be read again, or passed (its loss reported).
enum Unread {
    Again(ChangeError),
    Consumed(ChangeError),
}

fn stream_failed(e: impl ToString) -> ChangeError {
    ChangeError::Stream(e.to_string())
}

impl From<StreamError> for ChangeError {
    fn from(e: StreamError) -> Self {
        stream_failed(e)
    }
}

impl ChangeSource for StreamSource {
    fn read_through(&self) -> i64 {
        self.read_through
    }

    fn too_far_behind(&self) -> bool {
        self.behind > self.max_lag
    }

    async fn next_batch(&mut self) -> Result<Vec<Change>, ChangeError> {
        loop {
            let mut batch = Vec::new();
            let mut ended = false;
            // How far behind the batch started.
            self.behind = 0;
            if let Some(held) = self.held.take() {
                ended = self.take(held, &mut batch).await?;
            }
            if !ended && self.messages.is_none() {
                self.connects.mark_unchanged();
                self.open().await?;
            }
            if !ended && batch.is_empty() {
                let Some(messages) = self.messages.as_mut() else {
                    continue;
                };
                let next = tokio::select! {
                    next = messages.next() => next,
                    _ = self.connects.changed() => {
                        // The server may have restarted and forgotten the consumer.
                        self.messages = None;
                        continue;
                    }
                    _ = tokio::time::sleep(IDLE_CHECK) => {
                        self.check_stream().await?;
                        continue;
                    }
                };
                ended = match next {
                    Some(Ok(message)) => self.take(message, &mut batch).await?,
                    Some(Err(e)) => return Err(self.lose_consumer(e.to_string())),
                    None => return Err(self.lose_consumer("the consumer ended".into())),
                };
            }
            // Whatever has arrived already joins the batch, up to the publisher's batch end.
            while !ended && batch.len() < PAGE {
                let Some(messages) = self.messages.as_mut() else {
                    break;
                };
                let Some(next) = messages.next().now_or_never() else {
                    break;
                };
                match next {
                    Some(Ok(message)) => ended = self.take(message, &mut batch).await?,
                    Some(Err(e)) => {
                        self.lose_consumer(e.to_string());
                        break;
                    }
                    None => {
                        self.lose_consumer("the consumer ended".into());
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}
