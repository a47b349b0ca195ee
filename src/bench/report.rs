//! Results: latency percentiles, a human table, and one JSON line per scenario.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    /// Metric name → value, in the order they were added.
    pub metrics: Map<String, Value>,
}

impl Row {
    pub fn new(scenario: impl Into<String>) -> Self {
        Row {
            scenario: scenario.into(),
            metrics: Map::new(),
        }
    }

    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.metrics.insert(name.to_owned(), value.into());
        self
    }

    /// Adds p50/p95/p99/p99.9/max in milliseconds.
    pub fn latencies(mut self, samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        for (name, q) in [
            ("p50_ms", 0.50),
            ("p95_ms", 0.95),
            ("p99_ms", 0.99),
            ("p999_ms", 0.999),
            ("max_ms", 1.0),
        ] {
            let v = percentile(samples, q).map(|d| round(d.as_secs_f64() * 1000.0, 3));
            self.metrics.insert(name.into(), v.map_or(Value::Null, Value::from));
        }
        self
    }

    /// The share of CPU time stolen by the hypervisor during the measurement.
    pub(super) fn steal(self, steal: &super::server::Steal) -> Self {
        let percent = round(steal.percent(), 1);
        self.with("cpu_steal_pct", percent)
    }

    /// Prints the JSON line right away, so partial runs still leave their numbers.
    pub fn emit(self) -> Self {
        println!("{}", serde_json::to_string(&self).unwrap_or_default());
        self
    }
}

pub(super) fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(index.min(sorted.len() - 1)).copied()
}

pub(super) fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

pub(super) fn print_table(rows: &[Row]) {
    println!();
    println!("{:<34} results", "scenario");
    println!("{}", "-".repeat(100));
    for row in rows {
        let cells: Vec<String> = row.metrics.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{:<34} {}", row.scenario, cells.join("  "));
    }
}
