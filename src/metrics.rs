//! Prometheus metrics, one registry per quill instance (no global recorder, so several
//! instances in one process, as in the tests, keep their own counts).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every metric quill exports at `/metrics`.
pub struct Metrics {
    registry: Registry,
    /// Changes read from the change log.
    pub changes_read: Counter,
    /// Event frames queued to connections.
    pub events_delivered: Counter,
    /// Events a subscriber did not get because its filter (kinds) excluded them.
    pub events_filtered: Counter,
    /// Connections cut off because they did not read fast enough.
    pub slow_consumer_disconnects: Counter,
    /// Broadcast messages queued to receivers, and those a full queue made them miss.
    pub broadcasts_delivered: Counter,
    pub broadcasts_dropped: Counter,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// 1 while the LISTEN connection is up.
    pub listener_connected: Gauge,
    pub listener_reconnects: Counter,
    /// NOTIFY wake-ups received.
    pub notifications: Counter,
    /// 1 while the change reader reads without errors.
    pub reader_up: Gauge,
    /// 1 while the reader is busy and holds its reading lock, so writers skip NOTIFY.
    pub reader_busy: Gauge,
    /// The newest tick whose events were delivered.
    pub delivered_tick: Gauge,
    /// Committed changes not yet delivered, and the age of the oldest of them.
    pub lag_events: Gauge,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    /// `pg_notification_queue_usage()`: at 1.0 every notifying commit fails.
    pub notify_queue_usage: Gauge<f64, AtomicU64>,
    /// Calls running on behalf of WebSocket connections.
    pub calls_in_flight: Gauge,
    /// WebSocket and socket.io connections refused by the connection limits.
    pub connections_refused: Counter,
    /// Times the reader found changes missing from the log (pruned before it read them).
    pub change_log_gaps: Counter,
    /// Unix time of the last gap (0: none since start); `/ready` is not ready for a while
    /// after one.
    pub last_gap_unix: Gauge,
    /// Times the services' catalogs were read again (a DDL, a row that did not fit, the
    /// periodic check).
    pub schema_checks: Counter,
    /// Services whose table no longer fits their configuration (their calls fail with 503).
    pub services_misfit: Gauge,
    /// `[cluster]`: 1 while this instance publishes the change log to the stream.
    pub cluster_publisher: Gauge,
    /// `[cluster]`: 1 while connected to NATS.
    pub nats_connected: Gauge,
    /// `[cluster]`: changes this instance appended to the stream.
    pub cluster_published: Counter,
    /// `[cluster]`: appends refused because another publisher appended first.
    pub cluster_fenced: Counter,
    /// `[cluster]`: messages in the stream this instance has yet to deliver.
    pub cluster_stream_pending: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("quill");
        let m = Metrics {
            changes_read: Counter::default(),
            events_delivered: Counter::default(),
            events_filtered: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            broadcasts_delivered: Counter::default(),
            broadcasts_dropped: Counter::default(),
            connections: Gauge::default(),
            listener_connected: Gauge::default(),
            listener_reconnects: Counter::default(),
            notifications: Counter::default(),
            reader_up: Gauge::default(),
            reader_busy: Gauge::default(),
            delivered_tick: Gauge::default(),
            lag_events: Gauge::default(),
            lag_seconds: Gauge::default(),
            notify_queue_usage: Gauge::default(),
            calls_in_flight: Gauge::default(),
            connections_refused: Counter::default(),
            change_log_gaps: Counter::default(),
            last_gap_unix: Gauge::default(),
            schema_checks: Counter::default(),
            services_misfit: Gauge::default(),
            cluster_publisher: Gauge::default(),
            nats_connected: Gauge::default(),
            cluster_published: Counter::default(),
            cluster_fenced: Counter::default(),
            cluster_stream_pending: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "changes_read",
            "Changes read from the change log",
            m.changes_read.clone(),
        );
        registry.register(
            "events_delivered",
            "Event frames queued to connections",
            m.events_delivered.clone(),
        );
        registry.register(
            "events_filtered",
            "Events withheld from a subscriber by its filter",
            m.events_filtered.clone(),
        );
        registry.register(
            "slow_consumer_disconnects",
            "Connections cut off for not reading fast enough",
            m.slow_consumer_disconnects.clone(),
        );
        registry.register(
            "broadcasts_delivered",
            "Broadcast messages queued to receivers",
            m.broadcasts_delivered.clone(),
        );
        registry.register(
            "broadcasts_dropped",
            "Broadcast messages a receiver missed because its queue was full",
            m.broadcasts_dropped.clone(),
        );
        registry.register("connections", "Open WebSocket connections", m.connections.clone());
        registry.register(
            "listener_connected",
            "1 while the LISTEN connection is up",
            m.listener_connected.clone(),
        );
        registry.register(
            "listener_reconnects",
            "LISTEN reconnects",
            m.listener_reconnects.clone(),
        );
        registry.register("notifications", "NOTIFY wake-ups received", m.notifications.clone());
        registry.register(
            "reader_up",
            "1 while the change reader reads without errors",
            m.reader_up.clone(),
        );
        registry.register(
            "reader_busy",
            "1 while the change reader is busy and writers skip their NOTIFY",
            m.reader_busy.clone(),
        );
        registry.register(
            "delivered_tick",
            "Newest tick whose events were delivered",
            m.delivered_tick.clone(),
        );
        registry.register(
            "listener_lag_events",
            "Committed changes not yet delivered",
            m.lag_events.clone(),
        );
        registry.register(
            "listener_lag_seconds",
            "Age of the oldest committed change not yet delivered",
            m.lag_seconds.clone(),
        );
        registry.register(
            "notify_queue_usage",
            "pg_notification_queue_usage(): share of the NOTIFY queue in use",
            m.notify_queue_usage.clone(),
        );
        registry.register(
            "calls_in_flight",
            "Calls running for WebSocket connections",
            m.calls_in_flight.clone(),
        );
        registry.register(
            "connections_refused",
            "WebSocket and socket.io connections refused by the connection limits",
            m.connections_refused.clone(),
        );
        registry.register(
            "change_log_gaps",
            "Times the reader found changes pruned before it read them (events lost)",
            m.change_log_gaps.clone(),
        );
        registry.register(
            "change_log_last_gap_unix",
            "Unix time of the last change-log gap (0: none since start)",
            m.last_gap_unix.clone(),
        );
        registry.register(
            "schema_checks",
            "Times the services' catalogs were read again",
            m.schema_checks.clone(),
        );
        registry.register(
            "services_misfit",
            "Services whose table no longer fits their configuration",
            m.services_misfit.clone(),
        );
        registry.register(
            "cluster_publisher",
            "1 while this instance publishes the change log to the cluster's stream",
            m.cluster_publisher.clone(),
        );
        registry.register("nats_connected", "1 while connected to NATS", m.nats_connected.clone());
        registry.register(
            "cluster_published",
            "Changes this instance appended to the cluster's stream",
            m.cluster_published.clone(),
        );
        registry.register(
            "cluster_fenced",
            "Appends refused because another publisher appended first",
            m.cluster_fenced.clone(),
        );
        registry.register(
            "cluster_stream_pending",
            "Messages in the cluster's stream this instance has yet to deliver",
            m.cluster_stream_pending.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
