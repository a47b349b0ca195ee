//! The scenarios of `quill bench`. Each starts its own quill, measures one phase of
//! `options.seconds` and stops everything it started.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::client::{self, Protocol, Received, Socket, stamp, stamped};
use super::report::{self, Row, round};
use super::server::{Nats, Server, Steal, config};
use super::{BenchError, BenchOptions};

/// How long receivers keep reading after the writers stop.
const DRAIN: Duration = Duration::from_secs(2);

/// Opens `n` logged-in `/ws` subscribers, `timed` of which record latencies.
async fn subscribers(
    server: &Server,
    tokens: &[String],
    n: usize,
    timed: usize,
    stop: &CancellationToken,
) -> Result<JoinSet<Received>, BenchError> {
    subscribers_in(Protocol::Ws, server, tokens, n, timed, stop).await
}

/// `subscribers`, speaking `protocol`.
async fn subscribers_in(
    protocol: Protocol,
    server: &Server,
    tokens: &[String],
    n: usize,
    timed: usize,
    stop: &CancellationToken,
) -> Result<JoinSet<Received>, BenchError> {
    let mut sockets = Vec::with_capacity(n);
    // Connect in waves: a burst of thousands of handshakes at once only measures the
    // kernel's accept queue.
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut wave = JoinSet::new();
        for &i in chunk {
            let url = server.ws.clone();
            let token = tokens[i % tokens.len()].clone();
            wave.spawn(async move { client::subscriber_in(protocol, &url, i, &token).await });
        }
        while let Some(joined) = wave.join_next().await {
            sockets.push(joined.map_err(|e| BenchError::new("subscriber task", e))??);
        }
    }
    let mut set = JoinSet::new();
    for (i, ws) in sockets.into_iter().enumerate() {
        set.spawn(client::receive(ws, i < timed, stop.clone()));
    }
    Ok(set)
}

async fn collect(set: JoinSet<Received>) -> (u64, Vec<Duration>) {
    let all = collect_all(set).await;
    (all.events, all.latencies)
}

/// Every receiver's events, latencies and stamps together.
async fn collect_all(mut set: JoinSet<Received>) -> Received {
    let mut all = Received::default();
    while let Some(Ok(r)) = set.join_next().await {
        all.events += r.events;
        all.latencies.extend(r.latencies);
        all.stamps.extend(r.stamps);
    }
    all
}

async fn pool(server: &Server, size: u32) -> Result<PgPool, BenchError> {
    PgPoolOptions::new()
        .max_connections(size)
        .connect_with((*server.db.connect_options()).clone())
        .await
        .map_err(|e| BenchError::new("writer pool", e))
}

/// Ticks `rate` times a second; a late tick delays the next (no bursts to catch up).
fn every(rate: u32) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// At least 20 s per latency phase: at 200 writes/s and 10 subscribers that is 40 000
/// samples, enough for a p99.9 that is not one unlucky moment.
const LATENCY_PHASE: Duration = Duration::from_secs(20);

/// K subscribers; a writer at a fixed rate through SQL, REST and `/ws`; time from the
/// write to receipt.
pub(super) async fn latency(options: &BenchOptions) -> Result<Vec<Row>, BenchError> {
    let phase = options.phase().max(LATENCY_PHASE);
    let server = Server::start(options, &config(r#"["authenticated"]"#)).await?;
    let ids = server.users(options.subscribers + 1).await?;
    let tokens: Vec<String> = ids.iter().map(|id| Server::token(*id)).collect();
    let writer_token = tokens[tokens.len() - 1].clone();
    let sql = pool(&server, 1).await?;
    let http = reqwest::Client::new();
    let mut writer_ws = client::connect(&server.ws, 0).await?;
    let login = format!(
        r#"{{"ref":0,"method":"create","service":"authentication","data":{{"strategy":"jwt","accessToken":"{writer_token}"}}}}"#
    );
    client::request(&mut writer_ws, &[login]).await?;
    let (mut ws_tx, mut ws_rx) = writer_ws.split();
    // The /ws writer's replies are read and dropped so that its socket never backs up.
    let drain = tokio::spawn(async move { while ws_rx.next().await.is_some() {} });
    let mut rows = Vec::new();
    for path in ["sql", "rest", "ws"] {
        let stop = CancellationToken::new();
        let set = subscribers(&server, &tokens, options.subscribers, options.subscribers, &stop).await?;
        let steal = Steal::start();
        let mut tick = every(options.rate);
        let start = Instant::now();
        let mut writes = 0u64;
        // How long each write call took (to the commit for SQL and REST; the send for /ws):
        // a tail here is the database's or the machine's, not delivery's.
        let mut write_times = Vec::new();
        // Each write's call time by its stamp. What an event took after its write call
        // returned (just after the commit, for SQL and REST) is about quill's part of the
        // latency; the call's own time is the database's.
        let mut call_time_of = HashMap::new();
        while start.elapsed() < phase {
            tick.tick().await;
            let (sent, text) = stamped();
            let call_start = Instant::now();
            let written = match path {
                "sql" => sqlx::query("INSERT INTO messages (text) VALUES ($1)")
                    .bind(&text)
                    .execute(&sql)
                    .await
                    .is_ok(),
                "rest" => http
                    .post(format!("{}/messages", server.base))
                    .bearer_auth(&writer_token)
                    .json(&serde_json::json!({"text": text}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                _ => {
                    let call =
                        format!(r#"{{"ref":1,"method":"create","service":"messages","data":{{"text":"{text}"}}}}"#);
                    ws_tx.send(Message::text(call)).await.is_ok()
                }
            };
            let call_time = call_start.elapsed();
            write_times.push(call_time);
            call_time_of.insert(sent, call_time);
            writes += u64::from(written);
        }
        tokio::time::sleep(DRAIN).await;
        stop.cancel();
        let Received {
            events,
            mut latencies,
            stamps,
        } = collect_all(set).await;
        let mut after_commit: Vec<Duration> = match path {
            "ws" => Vec::new(),
            _ => (latencies.iter().zip(&stamps))
                .filter_map(|(age, sent)| Some(age.saturating_sub(*call_time_of.get(sent)?)))
                .collect(),
        };
        after_commit.sort_unstable();
        let after_ms = |q: f64| report::percentile(&after_commit, q).map(|d| round(d.as_secs_f64() * 1e3, 3));
        let expected = writes * options.subscribers as u64;
        write_times.sort_unstable();
        let write_ms = |q: f64| report::percentile(&write_times, q).map_or(0.0, |d| round(d.as_secs_f64() * 1e3, 3));
        rows.push(
            Row::new(format!("latency/{path}"))
                .with("subscribers", options.subscribers)
                .with("rate_per_s", options.rate)
                .with("writes", writes)
                .with("delivered_share", round(events as f64 / expected.max(1) as f64, 4))
                .latencies(&mut latencies)
                .with("write_p999_ms", write_ms(0.999))
                .with("write_max_ms", write_ms(1.0))
                .with("after_commit_p99_ms", after_ms(0.99))
                .with("after_commit_p999_ms", after_ms(0.999))
                .steal(&steal)
                .emit(),
        );
    }
    drain.abort();
    server.stop().await;
    Ok(rows)
}

/// N subscribers of one service; writers insert as fast as they can.
pub(super) async fn fanout(options: &BenchOptions, n: usize) -> Result<Row, BenchError> {
    fanout_in(Protocol::Ws, options, n).await
}

/// The fan-out to N subscribers, speaking `protocol` (`supabase`: Supabase Realtime
/// subscribers, `socketio`: Feathers socket.io clients, to compare with `fanout`'s `/ws` on
/// the same load).
pub(super) async fn fanout_in(protocol: Protocol, options: &BenchOptions, n: usize) -> Result<Row, BenchError> {
    let server = Server::start(options, &config(r#"["authenticated"]"#)).await?;
    let ids = server.users(1).await?;
    let tokens = vec![Server::token(ids[0])];
    let stop = CancellationToken::new();
    let set = subscribers_in(protocol, &server, &tokens, n, n.min(50), &stop).await?;
    let sql = pool(&server, 4).await?;
    let steal = Steal::start();
    let (cpu0, writes, elapsed) = write_for(&server, &sql, 4, options.phase()).await;
    tokio::time::sleep(DRAIN).await;
    let cpu = server.cpu_seconds() - cpu0;
    stop.cancel();
    let (events, mut latencies) = collect(set).await;
    let (_, peak) = server.rss_kib();
    let name = match protocol {
        Protocol::Ws => "fanout",
        Protocol::Phoenix => "supabase",
        Protocol::SocketIo => "socketio",
    };
    let row = Row::new(format!("{name}/{n}"))
        .with("subscribers", n)
        .with("writes_per_s", round(writes as f64 / elapsed, 1))
        .with(
            "delivered_per_s",
            round(events as f64 / (elapsed + DRAIN.as_secs_f64()), 0),
        )
        .with("lost", (writes * n as u64).saturating_sub(events))
        .with("quill_cpu_s", round(cpu, 2))
        .with("quill_cpu_us_per_event", round(cpu * 1e6 / events.max(1) as f64, 2))
        .with("quill_peak_rss_mib", round(peak as f64 / 1024.0, 1))
        .latencies(&mut latencies)
        .steal(&steal)
        .emit();
    server.stop().await;
    Ok(row)
}

/// Inserts single rows from `writers` tasks for `phase`; returns (cpu before, rows, secs).
async fn write_for(server: &Server, sql: &PgPool, writers: usize, phase: Duration) -> (f64, u64, f64) {
    let count = Arc::new(AtomicU64::new(0));
    let cpu0 = server.cpu_seconds();
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..writers {
        let (sql, count) = (sql.clone(), count.clone());
        set.spawn(async move {
            while start.elapsed() < phase {
                if sqlx::query("INSERT INTO messages (text) VALUES ($1)")
                    .bind(stamp())
                    .execute(&sql)
                    .await
                    .is_ok()
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    (cpu0, count.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

/// N connections, each its own user; each message goes to its author's channel only.
pub(super) async fn targeted(options: &BenchOptions, n: usize) -> Result<Row, BenchError> {
    let server = Server::start(options, &config(r#"["users/{user_id}"]"#)).await?;
    let ids = server.users(n).await?;
    let tokens: Vec<String> = ids.iter().map(|id| Server::token(*id)).collect();
    let stop = CancellationToken::new();
    let set = subscribers(&server, &tokens, n, n, &stop).await?;
    let sql = pool(&server, 4).await?;
    let count = Arc::new(AtomicU64::new(0));
    let steal = Steal::start();
    let cpu0 = server.cpu_seconds();
    let start = Instant::now();
    let mut writers = JoinSet::new();
    for w in 0..4usize {
        let (sql, count, ids) = (sql.clone(), count.clone(), ids.clone());
        let phase = options.phase();
        writers.spawn(async move {
            let mut i = w;
            while start.elapsed() < phase {
                let user = ids[i % ids.len()];
                i += 4;
                let insert = sqlx::query("INSERT INTO messages (text, user_id) VALUES ($1, $2)")
                    .bind(stamp())
                    .bind(user);
                if insert.execute(&sql).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while writers.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    tokio::time::sleep(DRAIN).await;
    let cpu = server.cpu_seconds() - cpu0;
    stop.cancel();
    let (events, mut latencies) = collect(set).await;
    let writes = count.load(Ordering::Relaxed);
    let row = Row::new(format!("targeted/{n}"))
        .with("connections", n)
        .with("delivered_per_s", round(events as f64 / elapsed, 1))
        .with("lost", writes.saturating_sub(events))
        .with("quill_cpu_us_per_event", round(cpu * 1e6 / events.max(1) as f64, 1))
        .latencies(&mut latencies)
        .steal(&steal)
        .emit();
    server.stop().await;
    Ok(row)
}

/// Rounds of the write-path and capture scenarios. Each round measures every path one
/// after the other; the medians are compared, so that a drift of the machine (CPU steal
/// comes and goes within a minute here) does not land on one path alone.
const WRITE_ROUNDS: usize = 3;

/// Creates per second through REST and `/ws`, against plain single-row SQL inserts into the
/// same (captured) table.
pub(super) async fn write_path(options: &BenchOptions) -> Result<Vec<Row>, BenchError> {
    const CLIENTS: usize = 8;
    let server = Server::start(options, &config(r#"["authenticated"]"#)).await?;
    let ids = server.users(1).await?;
    let token = Server::token(ids[0]);
    let sql = pool(&server, CLIENTS as u32).await?;
    let steal = Steal::start();
    let mut rates: [Vec<f64>; 3] = Default::default();
    for _ in 0..WRITE_ROUNDS {
        let (_, sql_writes, sql_secs) = write_for(&server, &sql, CLIENTS, options.phase()).await;
        rates[0].push(sql_writes as f64 / sql_secs);
        rates[1].push(rest_creates(&server, &token, CLIENTS, options.phase()).await);
        rates[2].push(ws_rate(&server, &token, CLIENTS, options.phase()).await?);
    }
    server.stop().await;
    let [sql_rate, rest_rate, ws_rate] = rates.map(|mut r| median(&mut r));
    let row = |path: &str, rate: f64| {
        Row::new(format!("write/{path}"))
            .with("clients", CLIENTS)
            .with("rounds", WRITE_ROUNDS)
            .with("creates_per_s", round(rate, 1))
            .with("ratio_to_sql", round(rate / sql_rate.max(1.0), 3))
            .steal(&steal)
            .emit()
    };
    Ok(vec![row("sql", sql_rate), row("rest", rest_rate), row("ws", ws_rate)])
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// `POST /messages` from `clients` HTTP clients for `phase`: creates per second.
async fn rest_creates(server: &Server, token: &str, clients: usize, phase: Duration) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let (count, token, url) = (count.clone(), token.to_owned(), format!("{}/messages", server.base));
        let http = reqwest::Client::new();
        set.spawn(async move {
            while start.elapsed() < phase {
                let body = serde_json::json!({"text": stamp()});
                if http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// `create` over `/ws` from `clients` logged-in connections for `phase`: creates per second.
async fn ws_rate(server: &Server, token: &str, clients: usize, phase: Duration) -> Result<f64, BenchError> {
    let count = Arc::new(AtomicU64::new(0));
    let mut sockets = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut ws = client::connect(&server.ws, i).await?;
        let login = format!(
            r#"{{"ref":0,"method":"create","service":"authentication","data":{{"strategy":"jwt","accessToken":"{token}"}}}}"#
        );
        client::request(&mut ws, &[login]).await?;
        sockets.push(ws);
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for ws in sockets {
        set.spawn(ws_creates(ws, count.clone(), start, phase));
    }
    while set.join_next().await.is_some() {}
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Creates over one `/ws` connection, one at a time, until `phase` is over.
async fn ws_creates(mut ws: Socket, count: Arc<AtomicU64>, start: Instant, phase: Duration) {
    let mut reference = 1u64;
    while start.elapsed() < phase {
        let call = format!(
            r#"{{"ref":{reference},"method":"create","service":"messages","data":{{"text":"{}"}}}}"#,
            stamp()
        );
        if client::request(&mut ws, &[call]).await.is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
        reference += 1;
    }
}

/// C idle `/ws` connections: quill's memory per connection.
pub(super) async fn connections(options: &BenchOptions, n: usize) -> Result<Row, BenchError> {
    let server = Server::start(options, &config(r#"["authenticated"]"#)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, _) = server.rss_kib();
    let start = Instant::now();
    let mut sockets = Vec::with_capacity(n);
    let mut failed = 0usize;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut wave = JoinSet::new();
        for &i in chunk {
            let url = server.ws.clone();
            wave.spawn(async move { client::connect(&url, i).await });
        }
        while let Some(joined) = wave.join_next().await {
            match joined {
                Ok(Ok(ws)) => sockets.push(ws),
                _ => failed += 1,
            }
        }
        // Past the file-descriptor limit every further connect only times out.
        if start.elapsed() > Duration::from_secs(180) || failed > 100 {
            break;
        }
    }
    let opened = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (after, peak) = server.rss_kib();
    let held = sockets.len();
    let row = Row::new(format!("connections/{n}"))
        .with("held", held)
        .with("failed", failed)
        .with("open_s", round(opened, 1))
        .with("quill_rss_mib", round(after as f64 / 1024.0, 1))
        .with("quill_peak_rss_mib", round(peak as f64 / 1024.0, 1))
        .with(
            "kib_per_connection",
            round(after.saturating_sub(before) as f64 / held.max(1) as f64, 2),
        )
        .with("fd_limit", super::server::fd_limit())
        .emit();
    drop(sockets);
    server.stop().await;
    Ok(row)
}

/// Single-row inserts and updates with and without quill's capture trigger, 1 and 4
/// writers (each updater keeps to its own row, so they never wait on each other's locks).
pub(super) async fn capture(options: &BenchOptions) -> Result<Vec<Row>, BenchError> {
    let server = Server::start(options, &config(r#"["authenticated"]"#)).await?;
    for statement in [
        "CREATE TABLE bench_plain (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, text text NOT NULL)",
        "CREATE TABLE bench_captured (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, text text NOT NULL)",
    ] {
        sqlx::query(statement)
            .execute(&server.db)
            .await
            .map_err(|e| BenchError::new("creating bench tables", e))?;
    }
    let table = crate::store::Table::load(&server.db, "bench", "public", "bench_captured", "id", &[])
        .await
        .map_err(|e| BenchError::new("reading the bench table", e))?;
    crate::store::install_capture(&server.db, &table)
        .await
        .map_err(|e| BenchError::new("installing capture", e))?;
    let mut rows = Vec::new();
    let statements: [(&str, [&'static str; 2]); 2] = [
        (
            "capture",
            [
                "INSERT INTO bench_plain (text) VALUES ('x')",
                "INSERT INTO bench_captured (text) VALUES ('x')",
            ],
        ),
        (
            "capture_update",
            [
                "UPDATE bench_plain SET text = md5(random()::text) WHERE id = $1",
                "UPDATE bench_captured SET text = md5(random()::text) WHERE id = $1",
            ],
        ),
    ];
    for (name, [plain_sql, captured_sql]) in statements {
        for writers in [1usize, 4] {
            let sql = pool(&server, writers as u32).await?;
            let rate = |statement: &'static str| {
                let sql = sql.clone();
                let phase = options.phase();
                async move {
                    let count = Arc::new(AtomicU64::new(0));
                    let start = Instant::now();
                    let mut set = JoinSet::new();
                    for worker in 0..writers {
                        let (sql, count) = (sql.clone(), count.clone());
                        // Updates touch the worker's own row (the inserts made rows 1..).
                        let row = worker as i64 + 1;
                        set.spawn(async move {
                            while start.elapsed() < phase {
                                let query = sqlx::query(statement);
                                let query = if statement.contains("$1") {
                                    query.bind(row)
                                } else {
                                    query
                                };
                                if query.execute(&sql).await.is_ok() {
                                    count.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        });
                    }
                    while set.join_next().await.is_some() {}
                    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
                }
            };
            let steal = Steal::start();
            // Plain and captured in turn, medians compared, as in `write_path`.
            let (mut plain, mut captured) = (Vec::new(), Vec::new());
            for _ in 0..WRITE_ROUNDS {
                plain.push(rate(plain_sql).await);
                captured.push(rate(captured_sql).await);
            }
            let (plain, captured) = (median(&mut plain), median(&mut captured));
            rows.push(
                Row::new(format!("{name}/{writers}_writers"))
                    .with("rounds", WRITE_ROUNDS)
                    .with("plain_per_s", round(plain, 0))
                    .with("captured_per_s", round(captured, 0))
                    .with("ratio", round(captured / plain.max(1.0), 3))
                    .steal(&steal)
                    .emit(),
            );
        }
    }
    server.stop().await;
    Ok(rows)
}

/// Healthy subscribers beside `stalled` ones that subscribe and never read again; writers
/// insert as fast as they can. The healthy ones' rate and latency must not depend on the
/// stalled ones (each costs at most one `slow_consumer_timeout_ms`, once).
pub(super) async fn isolation(options: &BenchOptions, stalled: usize) -> Result<Row, BenchError> {
    const HEALTHY: usize = 10;
    let server = Server::start(options, &config(r#"["authenticated"]"#)).await?;
    let ids = server.users(1).await?;
    let token = Server::token(ids[0]);
    let mut parked = Vec::with_capacity(stalled);
    for i in 0..stalled {
        parked.push(client::stalled_subscriber(&server.ws, HEALTHY + i, &token).await?);
    }
    let stop = CancellationToken::new();
    let set = subscribers(&server, std::slice::from_ref(&token), HEALTHY, HEALTHY, &stop).await?;
    let sql = pool(&server, 4).await?;
    let steal = Steal::start();
    let (_, writes, elapsed) = write_for(&server, &sql, 4, options.phase()).await;
    tokio::time::sleep(DRAIN).await;
    stop.cancel();
    let (events, mut latencies) = collect(set).await;
    let row = Row::new(format!("isolation/{stalled}"))
        .with("healthy", HEALTHY)
        .with("stalled", stalled)
        .with("writes_per_s", round(writes as f64 / elapsed, 1))
        .with(
            "healthy_delivered_per_s",
            round(events as f64 / (elapsed + DRAIN.as_secs_f64()), 0),
        )
        .with("lost", (writes * HEALTHY as u64).saturating_sub(events))
        .latencies(&mut latencies)
        .steal(&steal)
        .emit();
    drop(parked);
    server.stop().await;
    Ok(row)
}

/// The case of the isolation issue: one `INSERT … SELECT` of 20 000 rows of 4 KB; how long
/// one healthy subscriber takes to receive them all, beside `stalled` peers.
pub(super) async fn isolation_burst(options: &BenchOptions, stalled: usize) -> Result<Row, BenchError> {
    const ROWS: u64 = 20_000;
    let server = Server::start(options, &config(r#"["authenticated"]"#)).await?;
    let ids = server.users(1).await?;
    let token = Server::token(ids[0]);
    let mut parked = Vec::with_capacity(stalled);
    for i in 0..stalled {
        parked.push(client::stalled_subscriber(&server.ws, 1 + i, &token).await?);
    }
    let mut healthy = client::subscriber(&server.ws, 0, &token).await?;
    let sql = pool(&server, 1).await?;
    let start = Instant::now();
    let insert = sqlx::query("INSERT INTO messages (text) SELECT g || repeat('x', 4096) FROM generate_series(1, $1) g")
        .bind(ROWS as i64)
        .execute(&sql);
    let receive = async {
        let mut got = 0u64;
        while got < ROWS {
            match tokio::time::timeout(Duration::from_secs(120), healthy.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.starts_with("{\"event\"") => got += 1,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        got
    };
    let (inserted, got) = tokio::join!(insert, receive);
    inserted.map_err(|e| BenchError::new("insert", e))?;
    let row = Row::new(format!("isolation_burst/{stalled}"))
        .with("stalled", stalled)
        .with("rows", ROWS)
        .with("received", got)
        .with("seconds", round(start.elapsed().as_secs_f64(), 2))
        .emit();
    drop(parked);
    server.stop().await;
    Ok(row)
}

/// Rows in the replica scenario's table.
const REPLICA_ROWS: i64 = 100_000;

/// A snapshot subscribe to every message: seconds from the request to `synced`, the rows
/// and frames received.
async fn snapshot_to_synced(server: &Server, token: &str) -> Result<(f64, u64, u64), BenchError> {
    let mut ws = client::connect(&server.ws, 0).await?;
    let login = format!(
        r#"{{"ref":1,"method":"create","service":"authentication","data":{{"strategy":"jwt","accessToken":"{token}"}}}}"#
    );
    client::request(&mut ws, &[login]).await?;
    let start = Instant::now();
    ws.send(Message::text(
        r#"{"ref":2,"method":"subscribe","service":"messages","snapshot":true}"#,
    ))
    .await
    .map_err(|e| BenchError::new("ws send", e))?;
    let (mut rows, mut frames) = (0u64, 0u64);
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(120), ws.next())
            .await
            .map_err(|_| BenchError("no synced within 120 s".into()))?;
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            other => return Err(BenchError(format!("socket closed: {other:?}"))),
        };
        if text.starts_with(r#"{"event":"synced""#) {
            return Ok((start.elapsed().as_secs_f64(), rows, frames));
        }
        if text.starts_with(r#"{"event":"snapshot""#) {
            let page: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| BenchError::new("snapshot frame", e))?;
            rows += page["rows"].as_array().map_or(0, |r| r.len() as u64);
            frames += 1;
        } else if text.contains(r#""error""#) {
            return Err(BenchError(format!("snapshot refused: {text}")));
        }
    }
}

/// A 100 000-row snapshot, idle and while 1 000 changes/s are written: time to `synced`
/// and quill's peak RSS.
pub(super) async fn replica(options: &BenchOptions) -> Result<Vec<Row>, BenchError> {
    let server = Server::start(options, &config(r#"["authenticated"]"#)).await?;
    let ids = server.users(1).await?;
    let token = Server::token(ids[0]);
    sqlx::query(
        "INSERT INTO messages (text, user_id) SELECT 'message number ' || g || repeat(' lorem ipsum', 6), $1 \
         FROM generate_series(1, $2) g",
    )
    .bind(ids[0])
    .bind(REPLICA_ROWS)
    .execute(&server.db)
    .await
    .map_err(|e| BenchError::new("filling the table", e))?;
    let mut rows = Vec::new();
    let (rss_before, _) = server.rss_kib();
    let cpu0 = server.cpu_seconds();
    let (seconds, got, frames) = snapshot_to_synced(&server, &token).await?;
    let (_, peak) = server.rss_kib();
    rows.push(
        Row::new(format!("replica/snapshot_{REPLICA_ROWS}"))
            .with("rows", got)
            .with("frames", frames)
            .with("to_synced_s", round(seconds, 2))
            .with("rows_per_s", round(got as f64 / seconds, 0))
            .with("quill_cpu_s", round(server.cpu_seconds() - cpu0, 2))
            .with("quill_rss_before_mib", round(rss_before as f64 / 1024.0, 1))
            .with("quill_peak_rss_mib", round(peak as f64 / 1024.0, 1))
            .emit(),
    );

    // 1 000 changes/s (5 rows every 5 ms) while new snapshots start, one after another.
    let sql = pool(&server, 2).await?;
    let stop = CancellationToken::new();
    let writer = {
        let (sql, stop) = (sql.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut written = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                let insert = "INSERT INTO messages (text) SELECT 'under load' FROM generate_series(1, 5)";
                if sqlx::query(insert).execute(&sql).await.is_ok() {
                    written += 5;
                }
            }
            written
        })
    };
    let started = Instant::now();
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(snapshot_to_synced(&server, &token).await?.0);
    }
    stop.cancel();
    let written = writer.await.map_err(|e| BenchError::new("writer", e))?;
    let rate = written as f64 / started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let (_, peak) = server.rss_kib();
    rows.push(
        Row::new(format!("replica/snapshot_{REPLICA_ROWS}_under_writes"))
            .with("changes_per_s", round(rate, 0))
            .with("to_synced_min_s", round(times[0], 2))
            .with("to_synced_median_s", round(times[1], 2))
            .with("to_synced_max_s", round(times[2], 2))
            .with("quill_peak_rss_mib", round(peak as f64 / 1024.0, 1))
            .emit(),
    );
    server.stop().await;
    Ok(rows)
}

/// Four instances on one database, subscribers on three of them, a SQL writer at `rate`:
/// first on NATS JetStream (the fourth is the publisher), then each reading the log itself.
pub(super) async fn cluster(options: &BenchOptions) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for clustered in [true, false] {
        rows.push(cluster_phase(options, clustered).await?);
    }
    Ok(rows)
}

async fn cluster_phase(options: &BenchOptions, clustered: bool) -> Result<Row, BenchError> {
    let nats = match clustered {
        true => Some(Nats::start().await?),
        false => None,
    };
    let mut config = config(r#"["authenticated"]"#);
    if let Some(nats) = &nats {
        config.push_str(&format!("\n[cluster]\nnats_url = \"{}\"\n", nats.url));
    }
    let first = Server::start(options, &config).await?;
    if clustered {
        let start = Instant::now();
        while !first.metrics().await.contains("quill_cluster_publisher 1") {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(BenchError("the first instance never became the publisher".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut edges = Vec::new();
    for _ in 0..3 {
        edges.push(Server::join(options, &config).await?);
    }
    let per_edge = options.subscribers.div_ceil(3).max(1);
    let ids = first.users(per_edge * 3).await?;
    let tokens: Vec<String> = ids.iter().map(|id| Server::token(*id)).collect();
    let stop = CancellationToken::new();
    let mut sets = Vec::new();
    for (i, edge) in edges.iter().enumerate() {
        let mine = &tokens[i * per_edge..(i + 1) * per_edge];
        sets.push(subscribers(edge, mine, per_edge, per_edge, &stop).await?);
    }
    let sql = pool(&first, 1).await?;
    let cpu_before: Vec<f64> = std::iter::once(&first).chain(&edges).map(Server::cpu_seconds).collect();
    let transactions_before = database_transactions(&sql).await?;
    let steal = Steal::start();
    let mut tick = every(options.rate);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < options.phase() {
        tick.tick().await;
        let written = sqlx::query("INSERT INTO messages (text) VALUES ($1)")
            .bind(stamp())
            .execute(&sql)
            .await
            .is_ok();
        sent += u64::from(written);
    }
    let elapsed = start.elapsed().as_secs_f64();
    // PostgreSQL publishes a backend's counts at most once a second.
    tokio::time::sleep(DRAIN).await;
    let transactions = database_transactions(&sql).await? - transactions_before;
    stop.cancel();
    let mut events = 0;
    let mut latencies = Vec::new();
    for set in sets {
        let (n, mut l) = collect(set).await;
        events += n;
        latencies.append(&mut l);
    }
    let cpu: Vec<f64> = std::iter::once(&first)
        .chain(&edges)
        .zip(&cpu_before)
        .map(|(server, before)| round(server.cpu_seconds() - before, 2))
        .collect();
    // Everything but the writer's own inserts (and the two counting queries).
    let quill_transactions = (transactions - sent as i64 - 2).max(0) as f64 / (elapsed + DRAIN.as_secs_f64());
    let expected = sent * (per_edge * 3) as u64;
    let row = Row::new(if clustered {
        "cluster/stream"
    } else {
        "cluster/4-readers"
    })
    .with("instances", 4)
    .with("subscribers", per_edge * 3)
    .with("rate_per_s", options.rate)
    .with("writes", sent)
    .with("delivered_per_s", round(events as f64 / elapsed, 0))
    .with("delivered_share", round(events as f64 / expected.max(1) as f64, 4))
    .with("quill_db_tx_per_s", round(quill_transactions, 1))
    .with("cpu_s_first", cpu[0])
    .with("cpu_s_edges", round(cpu[1..].iter().sum::<f64>(), 2))
    .latencies(&mut latencies)
    .steal(&steal)
    .emit();
    for server in edges {
        server.stop().await;
    }
    first.stop().await;
    Ok(row)
}

/// Transactions committed or rolled back in the bench database so far.
async fn database_transactions(sql: &PgPool) -> Result<i64, BenchError> {
    sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(sql)
    .await
    .map_err(|e| BenchError::new("reading pg_stat_database", e))
}
