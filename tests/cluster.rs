//! Several instances on NATS JetStream (`[cluster]`): one publisher reads the change log,
//! every instance delivers from the stream. A real `nats-server` per test.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use crate::support::nats::{MAX_PAYLOAD, Nats};
use crate::support::pg::{TestDb, free_port};
use crate::support::{Quill, Rng, WAIT, Ws, http_client, open_demo, seeds};
use quill::Config;
use quill::config::ClusterConfig;

fn clustered(nats: &Nats) -> Config {
    let mut config = open_demo();
    config.cluster = Some(ClusterConfig::new(nats.url()));
    // The tests read their events as fast as they can, but on 2 cores and a debug build
    // a burst of 100 000 must not count as a slow consumer.
    config.outgoing_queue = 200_000;
    config
}

/// Another instance on the database of `first`.
async fn another(first: &Quill, config: Config) -> Quill {
    let db = TestDb {
        name: String::new(),
        url: first.db.url.clone(),
    };
    Quill::start_on(db, config).await
}

async fn gauge(q: &Quill, name: &str) -> i64 {
    let metrics = q.metrics().await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Waits until `check` holds for the instance's metrics.
async fn wait_for_metric(q: &Quill, name: &str, check: impl Fn(i64) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while !check(gauge(q, name).await) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never changed as expected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Event = (i64, String, i64, String);

/// Events of `messages` until the one whose text is `sentinel`: (seq, kind, id, text).
async fn until_sentinel(ws: &mut Ws, sentinel: &str) -> Vec<Event> {
    collect(ws, sentinel, None).await
}

/// [`until_sentinel`], telling `progress` how many have arrived.
async fn collect(ws: &mut Ws, sentinel: &str, progress: Option<tokio::sync::watch::Sender<usize>>) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        if let Some(progress) = &progress {
            progress.send_replace(out.len());
        }
        let event = ws.next_event().await;
        let text = event["data"]["text"].as_str().unwrap_or_default().to_owned();
        if text == sentinel {
            return out;
        }
        out.push((
            event["seq"].as_i64().expect("seq"),
            event["event"].as_str().expect("event name").to_owned(),
            event["data"]["id"].as_i64().expect("id"),
            text,
        ));
    }
}

async fn insert(sql: &PgPool, text: &str) {
    sqlx::query("INSERT INTO messages (text) VALUES ($1)")
        .bind(text)
        .execute(sql)
        .await
        .expect("insert");
}

fn assert_exactly_once(events: &[Event]) {
    let seqs: HashSet<i64> = events.iter().map(|e| e.0).collect();
    assert_eq!(seqs.len(), events.len(), "an event arrived twice");
}

/// Runs `statement` (an UPDATE or DELETE of messages) on one random row; the rows changed.
async fn on_a_random_row(tx: &mut sqlx::PgConnection, statement: &str) -> u64 {
    let sql = format!("{statement} WHERE id = (SELECT id FROM messages ORDER BY random() LIMIT 1)");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(tx)
        .await
        .expect("change a random row")
        .rows_affected()
}

#[tokio::test]
async fn three_instances_deliver_the_same_10000_changes_exactly_once() {
    let nats = Nats::start().await;
    let a = Quill::start_with(clustered(&nats)).await;
    let b = another(&a, clustered(&nats)).await;
    let c = another(&a, clustered(&nats)).await;
    let mut subscribers = Vec::new();
    for q in [&a, &b, &c] {
        let mut ws = q.ws().await;
        ws.subscribe("messages").await;
        subscribers.push(ws);
    }
    let sql = a.sql().await;
    let seed = seeds("QUILL_CLUSTER_SEED", 1)[0];
    let mut rng = Rng(seed);
    // Mixed transactions: inserts, updates and deletes, 1 to 200 changes each.
    let mut changes = 0;
    let mut next_text = 0;
    while changes < 10_000 {
        let size = 1 + rng.below(200).min(10_000 - changes);
        let mut tx = sql.begin().await.expect("begin");
        for _ in 0..size {
            match rng.below(10) {
                0..=6 => {
                    sqlx::query("INSERT INTO messages (text) VALUES ($1)")
                        .bind(next_text.to_string())
                        .execute(&mut *tx)
                        .await
                        .expect("insert");
                    next_text += 1;
                    changes += 1;
                }
                7 | 8 => changes += on_a_random_row(&mut tx, "UPDATE messages SET text = text || '+'").await,
                _ => changes += on_a_random_row(&mut tx, "DELETE FROM messages").await,
            }
        }
        tx.commit().await.expect("commit");
    }
    insert(&sql, "sentinel").await;
    let mut lists = Vec::new();
    for ws in &mut subscribers {
        lists.push(until_sentinel(ws, "sentinel").await);
    }
    assert_eq!(lists[0].len() as u64, changes, "seed {seed}: not every change arrived");
    assert_exactly_once(&lists[0]);
    assert!(lists[1] == lists[0], "seed {seed}: instance b delivered another list");
    assert!(lists[2] == lists[0], "seed {seed}: instance c delivered another list");

    // One publisher; the others read nothing from the change log.
    let publishers = gauge(&a, "quill_cluster_publisher").await
        + gauge(&b, "quill_cluster_publisher").await
        + gauge(&c, "quill_cluster_publisher").await;
    assert_eq!(publishers, 1);
    let readers: i64 = sqlx::query_scalar("SELECT count(*) FROM quill.reader")
        .fetch_one(&sql)
        .await
        .expect("readers");
    assert_eq!(readers, 1, "only the publisher reads the change log");
}

/// A quill process (not a task of the test's), so that it can be `kill -9`ed.
struct QuillProcess {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl QuillProcess {
    async fn start(database_url: &str, nats: &Nats) -> QuillProcess {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("quill-proc-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("config directory");
        let config = dir.join("quill.toml");
        std::fs::write(
            &config,
            "demo_tables = true\npoll_interval_ms = 500\noutgoing_queue = 200000\n\
             [services.messages]\naccess = \"public\"\npublish = [\"anonymous\", \"authenticated\"]\n",
        )
        .expect("config file");
        let child = Command::new(env!("CARGO_BIN_EXE_quill"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("DATABASE_URL", database_url)
            .env("PORT", port.to_string())
            .env("QUILL_NATS_URL", nats.url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the quill binary");
        let process = QuillProcess { child, port, dir };
        let client = http_client();
        let deadline = tokio::time::Instant::now() + WAIT * 3;
        loop {
            if let Ok(r) = client.get(process.url("/metrics")).send().await
                && r.text().await.is_ok_and(|m| m.contains("quill_cluster_publisher 1"))
            {
                return process;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the quill process never published"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for QuillProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn killing_the_publisher_mid_transaction_of_100000_rows_loses_and_repeats_nothing() {
    let nats = Nats::start().await;
    let db = TestDb::create().await;
    let url = db.url.clone();
    // The publisher first, so that it holds the lock; then two instances that deliver.
    let publisher = QuillProcess::start(&url, &nats).await;
    let b = Quill::start_on(db, clustered(&nats)).await;
    let c = another(&b, clustered(&nats)).await;
    assert_eq!(gauge(&b, "quill_cluster_publisher").await, 0);
    let mut wb = b.ws().await;
    wb.subscribe("messages").await;
    let mut wc = c.ws().await;
    wc.subscribe("messages").await;

    // Both read all along (a socket nobody reads is cut off); b reports its progress.
    let (progress, mut seen) = tokio::sync::watch::channel(0usize);
    let collect_b = tokio::spawn(async move { collect(&mut wb, "sentinel", Some(progress)).await });
    let collect_c = tokio::spawn(async move { collect(&mut wc, "sentinel", None).await });
    let sql = b.sql().await;
    sqlx::query("INSERT INTO messages (text) SELECT i::text FROM generate_series(0, 99999) i")
        .execute(&sql)
        .await
        .expect("one transaction of 100 000 rows");
    // Part of the transaction is in the stream when the publisher dies.
    tokio::time::timeout(WAIT * 3, seen.wait_for(|n| *n >= 5_000))
        .await
        .expect("5 000 events within the wait limit")
        .expect("b's collector");
    drop(publisher); // kill -9
    // b or c takes over within seconds.
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        if gauge(&b, "quill_cluster_publisher").await + gauge(&c, "quill_cluster_publisher").await == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    insert(&sql, "sentinel").await;
    let from_b = collect_b.await.expect("b's collector");
    let from_c = collect_c.await.expect("c's collector");
    assert_eq!(from_b.len(), 100_000, "b: not every row arrived exactly once");
    assert_exactly_once(&from_b);
    let texts: HashSet<&str> = from_b.iter().map(|e| e.3.as_str()).collect();
    assert_eq!(texts.len(), 100_000);
    assert!(from_c == from_b, "c delivered another list than b");
}

/// A logged insert into messages, for tests that append to the stream directly.
fn created(seq: i64, tick: i64) -> quill::change::Change {
    quill::change::Change {
        seq,
        tick,
        table_schema: "public".into(),
        table_name: "messages".into(),
        kind: quill::EventKind::Created,
        row: json!({"id": seq}),
        old: None,
        written_us: None,
    }
}

#[tokio::test]
async fn a_stale_publisher_cannot_append() {
    use quill::jetstream::publisher::Appender;
    use quill::jetstream::{Cluster, StreamName};

    let nats = Nats::start().await;
    let config = ClusterConfig::new(nats.url());
    let metrics = std::sync::Arc::new(quill::metrics::Metrics::default());
    let name = StreamName::of(&config, "stale_test");
    let cluster = Cluster::connect(&config, name, metrics.clone()).await.expect("connect");
    let change = |seq: i64| created(seq, seq);
    // Both believe they may append after the same end of the stream.
    let (mut stale, _) = Appender::at_end(&cluster, &metrics).await.expect("stale publisher");
    let (mut current, _) = Appender::at_end(&cluster, &metrics).await.expect("current publisher");
    current
        .append(&[change(1)], 1)
        .await
        .expect("the current publisher appends");
    let refused = stale.append(&[change(2), change(3)], 3).await;
    assert!(
        matches!(refused, Err(quill::jetstream::StreamError::Fenced { .. })),
        "the stale publisher appended: {refused:?}"
    );
    let mut stream = cluster.stream().await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(
        info.state.messages, 1,
        "the stream holds only the current publisher's change"
    );
    assert_eq!(metrics.cluster_published.get(), 1);
}

#[tokio::test]
async fn nats_killed_and_restarted_mid_burst_loses_nothing_and_calls_keep_working() {
    let mut nats = Nats::start().await;
    let a = Quill::start_with(clustered(&nats)).await;
    let b = another(&a, clustered(&nats)).await;
    let mut wa = a.ws().await;
    wa.subscribe("messages").await;
    let mut wb = b.ws().await;
    wb.subscribe("messages").await;
    let sql = a.sql().await;
    let writer = {
        let sql = sql.clone();
        tokio::spawn(async move {
            for i in 0..2000 {
                insert(&sql, &i.to_string()).await;
            }
        })
    };
    // Some of the burst is delivered, then NATS dies.
    let first = wa.next_event().await;
    assert_eq!(first["event"], "created");
    nats.kill();
    wait_for_metric(&b, "quill_nats_connected", |v| v == 0).await;
    let (status, body) = b.rest_raw("GET", "/ready", None, None).await;
    assert_eq!(status, 503);
    assert!(body.contains("NATS"), "{body}");
    // Calls do not need NATS.
    let (status, _) = b
        .rest("POST", "/messages", Some(json!({"text": "while NATS is down"})))
        .await;
    assert_eq!(status, 201);
    nats.restart().await;
    writer.await.expect("writer");
    insert(&sql, "sentinel").await;
    let mut from_a = vec![(
        first["seq"].as_i64().expect("seq"),
        "created".to_owned(),
        first["data"]["id"].as_i64().expect("id"),
        first["data"]["text"].as_str().unwrap_or_default().to_owned(),
    )];
    from_a.extend(until_sentinel(&mut wa, "sentinel").await);
    let from_b = until_sentinel(&mut wb, "sentinel").await;
    assert_eq!(from_a.len(), 2001, "a: not every change arrived exactly once");
    assert_exactly_once(&from_a);
    assert!(from_b == from_a, "b delivered another list than a");
    wait_for_metric(&b, "quill_nats_connected", |v| v == 1).await;
}

#[tokio::test]
async fn a_client_resumes_on_another_instance_with_since_and_big_rows_arrive_whole() {
    let nats = Nats::start().await;
    let a = Quill::start_with(clustered(&nats)).await;
    let b = another(&a, clustered(&nats)).await;
    let sql = a.sql().await;
    let mut on_a = a.ws().await;
    on_a.subscribe("messages").await;
    insert(&sql, "seen").await;
    let seen = on_a.next_event().await["seq"].as_i64().expect("seq");
    drop(on_a); // instance a "goes away" for this client
    let big = "x".repeat(MAX_PAYLOAD * 2);
    for text in ["missed 1", big.as_str(), "missed 2"] {
        insert(&sql, text).await;
    }
    let mut on_b = b.ws().await;
    let reply = on_b.ok("subscribe", "messages", json!({"since": seen})).await;
    assert_eq!(reply, json!({"subscribed": "messages", "since": seen}));
    insert(&sql, big.as_str()).await; // live, larger than a NATS message
    insert(&sql, "sentinel").await;
    let texts: Vec<String> = until_sentinel(&mut on_b, "sentinel")
        .await
        .into_iter()
        .map(|e| e.3)
        .collect();
    assert_eq!(
        texts,
        vec!["missed 1".to_owned(), big.clone(), "missed 2".to_owned(), big]
    );
}

#[tokio::test]
async fn a_lost_stream_makes_subscribers_reload_and_resume_stays_exact() {
    let nats = Nats::start().await;
    let a = Quill::start_with(clustered(&nats)).await;
    let sql = a.sql().await;
    let mut ws = a.ws().await;
    ws.subscribe("messages").await;
    insert(&sql, "before").await;
    let before = ws.next_event().await["seq"].as_i64().expect("seq");
    // The stream's data is lost (deleted, as by an operator or a NATS disaster).
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let config = ClusterConfig::new(nats.url());
    let name = quill::jetstream::StreamName::of(&config, &a.db.name);
    js.delete_stream(&name.stream).await.expect("delete the stream");
    insert(&sql, "after").await;
    // The instance cannot vouch for what the subscriber missed: reload.
    let (code, _) = ws.closed().await;
    assert_eq!(code, 4010);
    // A position is a change-log seq, never a stream sequence: resuming is still exact.
    let mut back = a.ws().await;
    back.ok("subscribe", "messages", json!({"since": before})).await;
    insert(&sql, "sentinel").await;
    let texts: Vec<String> = until_sentinel(&mut back, "sentinel")
        .await
        .into_iter()
        .map(|e| e.3)
        .collect();
    assert_eq!(texts, vec!["after".to_owned()]);
}

#[tokio::test]
async fn an_instance_far_behind_the_stream_says_so() {
    use quill::change::ChangeSource;
    use quill::jetstream::publisher::Appender;
    use quill::jetstream::{Cluster, StreamName, StreamSource};

    let nats = Nats::start().await;
    let db = TestDb::create().await;
    let pool = PgPool::connect(&db.url).await.expect("connect");
    quill::gateway::migrate(&pool, false).await.expect("migrate");
    let config = ClusterConfig::new(nats.url());
    let metrics = std::sync::Arc::new(quill::metrics::Metrics::default());
    let name = StreamName::of(&config, &db.name);
    let cluster = Cluster::connect(&config, name, metrics.clone()).await.expect("connect");
    // 100 changes in the stream before this instance reads any (ticks after its start).
    let (mut appender, _) = Appender::at_end(&cluster, &metrics).await.expect("appender");
    let changes: Vec<quill::change::Change> = (1..=100).map(|seq| created(seq, 1_000 + seq)).collect();
    appender.append(&changes, 1_100).await.expect("append");
    let mut source = StreamSource::start(cluster.clone(), pool, metrics.clone(), 10)
        .await
        .expect("source");
    let mut read = 0;
    let batch = source.next_batch().await.expect("a batch");
    read += batch.len();
    assert!(source.too_far_behind(), "99 messages behind, max_lag 10");
    while read < 100 {
        read += source.next_batch().await.expect("a batch").len();
    }
    // One more, read as it comes: caught up.
    let mut one = changes[99].clone();
    one.seq = 101;
    one.tick = 1_101;
    appender.append(&[one], 1_101).await.expect("append");
    assert_eq!(source.next_batch().await.expect("a batch").len(), 1);
    assert!(!source.too_far_behind(), "caught up, yet still behind");
    assert_eq!(source.read_through(), 1_101);
}

#[tokio::test]
async fn a_stream_whose_messages_all_expired_is_taken_over_and_read() {
    let nats = Nats::start().await;
    let short = || {
        let mut config = clustered(&nats);
        if let Some(cluster) = &mut config.cluster {
            cluster.max_age_seconds = 1;
        }
        config
    };
    let a = Quill::start_with(short()).await;
    let sql = a.sql().await;
    let mut ws = a.ws().await;
    ws.subscribe("messages").await;
    insert(&sql, "expires").await;
    ws.next_event().await;
    // Wait for the server to expire everything (the stream keeps its last sequence).
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let name = quill::jetstream::StreamName::of(&ClusterConfig::new(nats.url()), &a.db.name);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = js.get_stream(&name.stream).await.expect("stream");
        let state = stream.info().await.expect("info").state.clone();
        if state.messages == 0 && state.last_sequence > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stream never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new publisher and a new reader start on the emptied stream.
    let db = a.shutdown().await;
    let b = Quill::start_on(db, short()).await;
    wait_for_metric(&b, "quill_cluster_publisher", |v| v == 1).await;
    let mut ws = b.ws().await;
    ws.subscribe("messages").await;
    insert(&sql, "after expiry").await;
    assert_eq!(ws.next_event().await["data"]["text"], "after expiry");
}
