//! quill under database trouble: a Postgres restart, shutdown, health and metrics.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use crate::support::{Quill, WAIT, insert_messages, pg};
use quill::cluster::LocalCluster;

async fn start_cluster(dir: std::path::PathBuf, port: u16) -> LocalCluster {
    tokio::task::spawn_blocking(move || LocalCluster::start(&dir, port))
        .await
        .expect("join")
        .expect("start a dedicated PostgreSQL")
}

async fn ready_status(q: &Quill) -> u16 {
    match q.http.get(q.url("/ready")).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

async fn wait_for_ready_status(q: &Quill, wanted: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready_status(q).await != wanted {
        assert!(tokio::time::Instant::now() < deadline, "/ready never became {wanted}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn quill_rides_out_a_postgres_restart_and_loses_no_change() {
    let dir = std::env::temp_dir().join(format!("quill-restart-{}", std::process::id()));
    let port = pg::free_port();
    let cluster = start_cluster(dir.clone(), port).await;
    let admin = PgPool::connect(&cluster.url("postgres")).await.expect("admin");
    sqlx::query("CREATE DATABASE quill")
        .execute(&admin)
        .await
        .expect("create db");
    admin.close().await;
    let url = cluster.url("quill");
    let q = Quill::start_on(
        pg::TestDb {
            name: String::new(),
            url: url.clone(),
        },
        crate::support::open_demo(),
    )
    .await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    // A Supabase Realtime client beside it: the same guarantee on that protocol.
    let auth = crate::support::open_demo().authentication.expect("the demo has auth");
    let key = quill::auth::issue_api_key(&auth, crate::support::TEST_SECRET, "anon", 3600).expect("key");
    let mut supabase =
        crate::support::ws::Ws::connect(&format!("ws://{}/realtime/v1/websocket?apikey={key}&vsn=2.0.0", q.addr)).await;
    let join = json!(["1", "1", "realtime:feed", "phx_join",
        {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "messages"}]}}]);
    supabase.send_text(&join.to_string()).await;
    assert_eq!(supabase.next_frame().await[4]["status"], "ok");
    assert_eq!(supabase.next_frame().await[4]["message"], "Subscribed to PostgreSQL");

    let sql = PgPool::connect(&url).await.expect("sql");
    insert_messages(&sql, 0, 100).await;
    // Committed right before the stop: quill may not have read these yet.
    insert_messages(&sql, 100, 150).await;
    sql.close().await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stop PostgreSQL");

    // Down: quill stays up, the socket stays open, readiness and calls say so.
    wait_for_ready_status(&q, 503).await;
    let (status, body) = q.rest("GET", "/messages", None).await;
    assert_eq!((status, body["name"].as_str()), (503, Some("Unavailable")), "{body}");
    let reply = ws.call("find", "messages", json!({})).await;
    assert_eq!(reply["error"]["code"], 503, "{reply}");

    let cluster = start_cluster(dir.clone(), port).await;
    // Ready again without any new write: the reader reads, even with nothing to deliver.
    wait_for_ready_status(&q, 200).await;
    let sql = PgPool::connect(&url).await.expect("sql after restart");
    insert_messages(&sql, 150, 200).await;
    let texts: Vec<String> = ws
        .events(200)
        .await
        .iter()
        .map(|e| e["data"]["text"].as_str().unwrap_or("").to_owned())
        .collect();
    let expected: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert!(texts == expected, "all 200 changes, once each, in order: {texts:?}");
    let mut via_supabase = Vec::new();
    while via_supabase.len() < 200 {
        let frame = supabase.next_frame().await;
        assert_eq!(frame[3], "postgres_changes", "{frame}");
        via_supabase.push(frame[4]["data"]["record"]["text"].as_str().unwrap_or("").to_owned());
    }
    assert!(
        via_supabase == expected,
        "the same on Supabase Realtime: {via_supabase:?}"
    );
    ws.expect_no_event(Duration::from_millis(500)).await;
    wait_for_ready_status(&q, 200).await;
    sql.close().await;
    q.shutdown().await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shutdown_delivers_what_is_queued_and_closes_sockets_with_going_away() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    sqlx::query("INSERT INTO messages (text) VALUES ('last words')")
        .execute(&sql)
        .await
        .expect("insert");
    assert_eq!(ws.next_event().await["data"]["text"], "last words");
    let stopping = tokio::spawn(q.shutdown());
    let (code, reason) = ws.closed().await;
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("stops in time")
        .expect("clean stop");
}

#[tokio::test]
async fn health_ready_and_metrics_report_the_feed() {
    let q = Quill::start().await;
    let resp = q.http.get(q.url("/health")).send().await.expect("health");
    assert_eq!(resp.status(), 200);
    assert_eq!(ready_status(&q).await, 200);
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    sqlx::query("INSERT INTO messages (text) SELECT 'm' FROM generate_series(1, 3)")
        .execute(&sql)
        .await
        .expect("insert");
    ws.events(3).await;
    let text = q.metrics().await;
    for line in [
        "quill_changes_read_total 3",
        "quill_events_delivered_total 3",
        "quill_connections 1",
        "quill_listener_connected 1",
        "quill_reader_up 1",
        "quill_notify_queue_usage",
        "quill_listener_lag_events",
        "quill_listener_lag_seconds",
        "quill_slow_consumer_disconnects_total 0",
        "quill_listener_reconnects_total 0",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "missing '{line}' in:\n{text}"
        );
    }
}
