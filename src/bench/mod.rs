//! `quill bench`: measures latency, fan-out, targeted fan-out, the write path, idle
//! connections, capture overhead and replica snapshots against a quill it starts itself (so CPU and memory
//! come from that process's /proc entry). Every scenario is bounded in time; each prints a
//! table row and one JSON line.

mod client;
mod report;
mod scenarios;
mod server;

use std::time::Duration;

pub use report::Row;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BenchError(pub String);

impl BenchError {
    pub(crate) fn new(context: &str, e: impl std::fmt::Display) -> Self {
        BenchError(format!("{context}: {e}"))
    }
}

/// What to run, and how hard.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Admin URL of the PostgreSQL server; the bench creates its own `quill_bench` database.
    pub admin_url: String,
    /// Scenarios to run (latency, fanout, supabase, socketio, targeted, write, connections, isolation,
    /// capture, replica, cluster); empty = all.
    pub only: Vec<String>,
    /// Seconds per measured phase.
    pub seconds: u64,
    /// Subscriber counts for the fan-out scenario.
    pub fanout: Vec<usize>,
    /// Connection counts for the idle-connections scenario.
    pub connections: Vec<usize>,
    /// Latency scenario: subscribers and writes per second.
    pub subscribers: usize,
    pub rate: u32,
}

impl BenchOptions {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }

    fn phase(&self) -> Duration {
        Duration::from_secs(self.seconds.max(1))
    }
}

/// Runs the chosen scenarios and prints their results.
pub async fn run(options: BenchOptions) -> Result<Vec<Row>, BenchError> {
    server::raise_fd_limit();
    let mut rows = Vec::new();
    if options.wants("latency") {
        rows.extend(scenarios::latency(&options).await?);
    }
    if options.wants("fanout") {
        for &n in &options.fanout {
            rows.push(scenarios::fanout(&options, n).await?);
        }
    }
    if options.wants("supabase") {
        // The same load as `fanout`, to Supabase Realtime subscribers, beside `/ws`.
        for &n in &options.fanout {
            rows.push(scenarios::fanout(&options, n).await?);
            rows.push(scenarios::fanout_in(client::Protocol::Phoenix, &options, n).await?);
        }
    }
    if options.wants("socketio") {
        // The same load as `fanout`, to Feathers socket.io subscribers, beside `/ws`.
        for &n in &options.fanout {
            rows.push(scenarios::fanout(&options, n).await?);
            rows.push(scenarios::fanout_in(client::Protocol::SocketIo, &options, n).await?);
        }
    }
    if options.wants("targeted") {
        for n in [1_000, 10_000] {
            rows.push(scenarios::targeted(&options, n).await?);
        }
    }
    if options.wants("write") {
        rows.extend(scenarios::write_path(&options).await?);
    }
    if options.wants("connections") {
        for &n in &options.connections {
            rows.push(scenarios::connections(&options, n).await?);
        }
    }
    if options.wants("isolation") {
        for stalled in [0, 1] {
            rows.push(scenarios::isolation_burst(&options, stalled).await?);
        }
        for stalled in [0, 1, 100] {
            rows.push(scenarios::isolation(&options, stalled).await?);
        }
    }
    if options.wants("capture") {
        rows.extend(scenarios::capture(&options).await?);
    }
    if options.wants("replica") {
        rows.extend(scenarios::replica(&options).await?);
    }
    if options.wants("cluster") {
        rows.extend(scenarios::cluster(&options).await?);
    }
    report::print_table(&rows);
    Ok(rows)
}
