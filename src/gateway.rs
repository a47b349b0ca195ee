//! The composition root: connects, migrates, builds the services, spawns the listener and
//! the delivery pipeline, serves HTTP, and owns shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::change::monitor::run_monitor;
use crate::change::retention::run_pruner;
use crate::change::{ChangeError, ChangeSource, LogReader, Wakeups, run_listener};
use crate::channel::{EventFilter, Publisher};
use crate::config::Config;
use crate::hub::Hub;
use crate::jetstream::publisher::Candidate;
use crate::jetstream::{Cluster, StreamName, StreamSource, run_candidate};
use crate::metrics::Metrics;
use crate::pg_tls::DbTls;
use crate::pipeline;
use crate::service::watch::watch_schema;
use crate::service::{ServiceExtensions, Services, SetupError};
use crate::transport::TrustedProxies;
use crate::transport::limits::ConnectionLimiter;
use crate::transport::{self, AppState, router};

/// How long shutdown waits for tasks and sockets before giving up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why quill could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot connect to the database")]
    Connect(#[source] sqlx::Error),
    #[error("cannot run the migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("cannot read the change log")]
    ChangeLog(#[from] ChangeError),
    #[error("invalid config: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] crate::pg_tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] crate::jetstream::StreamError),
}

/// Connects a pool and runs the migrations (the demo tables too when configured).
pub async fn connect_and_migrate(database_url: &str, config: &Config) -> Result<PgPool, GatewayError> {
    let options = DbTls::from_url(database_url)?.pool_options()?.application_name("quill");
    let pool = PgPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(Duration::from_secs(5))
        // No ping before every query: after a database restart a stale connection fails
        // one query (503) and is replaced, instead of every query paying a round trip.
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(GatewayError::Connect)?;
    migrate(&pool, config.demo_tables).await?;
    Ok(pool)
}

/// Applies quill's migrations. Safe to run from several processes at once: sqlx takes an
/// advisory lock.
pub async fn migrate(pool: &PgPool, demo_tables: bool) -> Result<(), GatewayError> {
    let mut core = sqlx::migrate!("./migrations");
    core.set_ignore_missing(true);
    core.run(pool).await?;
    if demo_tables {
        let mut demo = sqlx::migrate!("./migrations/demo");
        demo.set_ignore_missing(true);
        demo.run(pool).await?;
    }
    Ok(())
}

/// What Rust code embedding quill adds to its services, in the spirit of Feathers'
/// `service.publish(...)` and `channel.filter(...)`:
///
/// ```no_run
/// # use quill::gateway::Extensions;
/// let extensions = Extensions::default()
///     // messages go to their room's channel only
///     .publish("messages", |event: &quill::ServiceEvent| vec![format!("rooms/{}", event.data["room_id"])])
///     // and never to users flagged as muted
///     .filter("messages", |_event: &quill::ServiceEvent, user: Option<&quill::auth::Principal>| {
///         user.is_none_or(|u| u.user["muted"] != true)
///     });
/// ```
#[derive(Default, Clone)]
pub struct Extensions {
    services: HashMap<String, ServiceExtensions>,
}

impl Extensions {
    /// Replaces a service's `publish` rule with code.
    pub fn publish(mut self, service: &str, publisher: impl Publisher + 'static) -> Self {
        self.services.entry(service.to_owned()).or_default().publisher = Some(Arc::new(publisher));
        self
    }

    /// Adds a per-connection filter to a service's events (all filters must allow).
    pub fn filter(mut self, service: &str, filter: impl EventFilter + 'static) -> Self {
        self.services
            .entry(service.to_owned())
            .or_default()
            .filters
            .push(Arc::new(filter));
        self
    }
}

/// Spawns the pipeline from `source`, which starts after tick `position`.
#[allow(clippy::too_many_arguments)]
fn start_delivery<S: ChangeSource + 'static>(
    source: S,
    position: i64,
    services: &Arc<Services>,
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    config: &Config,
    tracker: &TaskTracker,
    token: &CancellationToken,
) {
    metrics.delivered_tick.set(position);
    // Resumes replay up to the tick live delivery starts from.
    hub.begin_tick(position);
    // Everything before the start was delivered (by an earlier run): `sync` need not wait.
    hub.end_ticks_through(position);
    metrics.reader_up.set(1);
    tracker.spawn(pipeline::deliver(
        source,
        services.clone(),
        hub.clone(),
        metrics.clone(),
        config.slow_consumer_timeout(),
        token.clone(),
    ));
}

/// Runs quill on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    database_url: String,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    run_with(config, Extensions::default(), database_url, listener, shutdown).await
}

/// [`run`], with code-defined publishers and filters.
pub async fn run_with(
    config: Config,
    extensions: Extensions,
    database_url: String,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let proxies = TrustedProxies::parse(&config.trusted_proxies, config.proxy_header).map_err(GatewayError::Config)?;
    // The LISTEN connection's TLS settings, checked before anything starts.
    DbTls::from_url(&database_url)?.listener()?;
    let pool = connect_and_migrate(&database_url, &config).await?;
    let services = Arc::new(Services::build(pool.clone(), &config, extensions.services).await?);
    let metrics = Arc::new(Metrics::default());
    let hub = Hub::with_metrics(metrics.clone());
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();

    let wake = Wakeups {
        changes: Arc::new(Notify::new()),
        schema: services.schema_changed(),
    };
    tracker.spawn(watch_schema(
        services.clone(),
        wake.schema.clone(),
        config.schema_check_interval(),
        metrics.clone(),
        token.clone(),
    ));
    match &config.cluster {
        None => {
            tracker.spawn(run_listener(database_url, wake.clone(), metrics.clone(), token.clone()));
            let reader = LogReader::start(pool.clone(), wake.changes, config.poll_interval(), metrics.clone()).await?;
            let position = reader.position();
            start_delivery(reader, position, &services, &hub, &metrics, &config, &tracker, &token);
            tracker.spawn(run_pruner(pool.clone(), config.retention, token.clone()));
            tracker.spawn(run_monitor(pool.clone(), metrics.clone(), token.clone()));
        }
        Some(cluster_config) => {
            let database: String = sqlx::query_scalar("SELECT current_database()")
                .fetch_one(&pool)
                .await
                .map_err(GatewayError::Connect)?;
            let name = StreamName::of(cluster_config, &database);
            let cluster = Cluster::connect(cluster_config, name, metrics.clone()).await?;
            tracker.spawn(run_candidate(Candidate {
                pool: pool.clone(),
                database_url,
                cluster: cluster.clone(),
                wake,
                poll: config.poll_interval(),
                retention: config.retention,
                metrics: metrics.clone(),
                shutdown: token.clone(),
            }));
            let source = StreamSource::start(cluster, pool.clone(), metrics.clone(), cluster_config.max_lag).await?;
            let position = source.position();
            start_delivery(source, position, &services, &hub, &metrics, &config, &tracker, &token);
        }
    }

    let state = AppState {
        services,
        hub,
        metrics,
        outgoing_queue: config.outgoing_queue,
        slow_consumer_timeout: config.slow_consumer_timeout(),
        limits: config.limits,
        connections: ConnectionLimiter::new(&config.limits),
        // Leave the pool a connection for everything else.
        snapshots: Arc::new(tokio::sync::Semaphore::new(
            config
                .limits
                .snapshots_in_flight
                .min(config.pool_size.saturating_sub(1) as usize)
                .max(1),
        )),
        clustered: config.cluster.is_some(),
        shutdown: token.clone(),
    };
    let app = router(state);
    let stop = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "quill is serving");
    }
    transport::serve(listener, app, config.limits.handshake_timeout(), proxies, token.clone()).await;
    token.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop in time");
    }
    pool.close().await;
    Ok(())
}
