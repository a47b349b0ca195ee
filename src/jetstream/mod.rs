//! Several instances on NATS JetStream: one instance (the holder of a PostgreSQL advisory
//! lock) reads the change log and appends every change, in delivery order, to one stream
//! per database ([`publisher`]); every instance delivers from that stream ([`source`]),
//! through the same pipeline and hub as a change log reader.
//!
//! Clients' positions stay change-log seqs: the same on every instance, and a resume
//! replays from the change log (the source of truth), so nothing a client holds ever
//! refers to a stream sequence that a lost stream could reuse.

pub mod publisher;
pub mod source;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::ClusterConfig;
use crate::metrics::Metrics;

pub use publisher::run_candidate;
pub use source::StreamSource;

/// How long the stream remembers a `Nats-Msg-Id`: a publisher that retries within it cannot
/// append a change twice (fencing by expected last sequence catches the rest).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Why NATS could not be used. Transient: every task that meets one retries.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot reach NATS")]
    Connect(#[from] async_nats::ConnectError),
    #[error("cannot create or read the JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("cannot read from the JetStream stream: {0}")]
    Consume(String),
    #[error("cannot append to the JetStream stream: {0}")]
    Append(String),
    /// Another publisher appended first: this one's view of the stream's end is stale.
    #[error("another publisher appended to the stream (expected last sequence {expected})")]
    Fenced { expected: u64 },
    #[error("a stream message is malformed (sequence {sequence}): {reason}")]
    Malformed { sequence: u64, reason: String },
}

/// The stream and subject of one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamName {
    pub stream: String,
    pub subject: String,
}

impl StreamName {
    /// The configured names, or `quill_<database>` and `quill.<database>.changes`.
    pub fn of(config: &ClusterConfig, database: &str) -> Self {
        let token: String = database
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            stream: config.stream.clone().unwrap_or_else(|| format!("quill_{token}")),
            subject: config
                .subject
                .clone()
                .unwrap_or_else(|| format!("quill.{token}.changes")),
        }
    }
}

/// A NATS connection and the stream quill uses on it.
#[derive(Clone)]
pub struct Cluster {
    pub client: async_nats::Client,
    /// Counts (re)connections: an ordered consumer lives in the server's memory, so a
    /// restarted server has forgotten it and the reader must make a new one.
    connects: tokio::sync::watch::Receiver<u64>,
    pub jetstream: jetstream::Context,
    pub name: StreamName,
    config: ClusterConfig,
}

impl Cluster {
    /// Connects in the background: quill starts (and serves calls) while NATS is down, and
    /// `quill_nats_connected` says whether it is up.
    pub async fn connect(config: &ClusterConfig, name: StreamName, metrics: Arc<Metrics>) -> Result<Self, StreamError> {
        let (connected, connects) = tokio::sync::watch::channel(0u64);
        let connected = Arc::new(connected);
        let mut options = async_nats::ConnectOptions::new()
            .name("quill")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let metrics = metrics.clone();
                let connected = connected.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            metrics.nats_connected.set(1);
                            connected.send_modify(|n| *n += 1);
                            tracing::info!("connected to NATS");
                        }
                        async_nats::Event::Disconnected | async_nats::Event::Closed => {
                            metrics.nats_connected.set(0);
                            tracing::warn!("lost the NATS connection");
                        }
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
            });
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        let urls: Vec<async_nats::ServerAddr> = config
            .nats_url
            .iter()
            .map(|url| url.parse())
            .collect::<Result<_, _>>()
            .map_err(|e: std::io::Error| StreamError::Stream {
                stream: name.stream.clone(),
                reason: format!("bad nats_url: {e}"),
            })?;
        let client = options.connect(urls).await?;
        let jetstream = jetstream::new(client.clone());
        Ok(Self {
            client,
            connects,
            jetstream,
            name,
            config: config.clone(),
        })
    }

    /// The stream, created with the configured limits if it does not exist.
    pub async fn stream(&self) -> Result<stream::Stream, StreamError> {
        let config = stream::Config {
            name: self.name.stream.clone(),
            subjects: vec![self.name.subject.clone()],
            storage: stream::StorageType::File,
            num_replicas: self.config.replicas,
            max_age: Duration::from_secs(self.config.max_age_seconds),
            max_bytes: self.config.max_bytes,
            // The server refuses a window longer than the stream keeps messages.
            duplicate_window: DUPLICATE_WINDOW.min(Duration::from_secs(self.config.max_age_seconds)),
            ..Default::default()
        };
        self.jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|e| StreamError::Stream {
                stream: self.name.stream.clone(),
                reason: e.to_string(),
            })
    }

    /// Resolves at the next (re)connection to NATS after the last call.
    pub(crate) fn reconnections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connects.clone()
    }

    /// The most one message may carry (the server's `max_payload`).
    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => 1 << 20,
            max => max,
        }
    }
}
