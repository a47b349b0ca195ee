//! The change feed: commit order, rollbacks, and a lost listener, with exact counts.

use std::time::Duration;

use crate::support::Quill;

#[tokio::test]
async fn a_transaction_that_commits_after_a_later_sequence_number_is_not_skipped() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    let mut first = sql.begin().await.expect("begin A");
    sqlx::query("INSERT INTO messages (text) VALUES ('A')")
        .execute(&mut *first)
        .await
        .expect("A");
    let mut second = sql.begin().await.expect("begin B");
    sqlx::query("INSERT INTO messages (text) VALUES ('B')")
        .execute(&mut *second)
        .await
        .expect("B");
    second.commit().await.expect("commit B");
    let b = ws.next_event().await;
    assert_eq!(b["data"]["text"], "B");
    first.commit().await.expect("commit A");
    let a = ws.next_event().await;
    assert_eq!(
        a["data"]["text"], "A",
        "A has the lower seq but commits last: delivered, not skipped"
    );
    assert!(a["seq"].as_i64() < b["seq"].as_i64());
    ws.expect_no_event(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_rolled_back_transaction_delivers_nothing() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    let mut tx = sql.begin().await.expect("begin");
    sqlx::query("INSERT INTO messages (text) SELECT 'ghost' FROM generate_series(1, 10)")
        .execute(&mut *tx)
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");
    sqlx::query("INSERT INTO messages (text) VALUES ('real')")
        .execute(&sql)
        .await
        .expect("insert");
    assert_eq!(ws.next_event().await["data"]["text"], "real");
    ws.expect_no_event(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_100k_row_transaction_delivers_100k_events_in_order_and_multi_megabyte_rows_work() {
    const N: i32 = 100_000;
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    let mut tx = sql.begin().await.expect("begin");
    sqlx::query("INSERT INTO messages (text) SELECT g::text FROM generate_series(1, $1) g")
        .bind(N)
        .execute(&mut *tx)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    let mut expected = 1;
    let mut last_seq = 0;
    while expected <= N {
        let e = ws.next_event().await;
        assert_eq!(e["data"]["text"], expected.to_string());
        let seq = e["seq"].as_i64().expect("seq");
        assert!(seq > last_seq);
        last_seq = seq;
        expected += 1;
    }
    let big = "y".repeat(5 * 1024 * 1024);
    sqlx::query("INSERT INTO messages (text) VALUES ($1)")
        .bind(&big)
        .execute(&sql)
        .await
        .expect("5 MB row");
    assert_eq!(
        ws.next_event().await["data"]["text"].as_str().map(str::len),
        Some(big.len())
    );
    ws.expect_no_event(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn killing_quills_database_sessions_mid_stream_loses_and_repeats_nothing() {
    const N: usize = 10_000;
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    let writer_pool = sql.clone();
    let writer = tokio::spawn(async move {
        for i in 0..N {
            sqlx::query("INSERT INTO messages (text) VALUES ($1)")
                .bind(i.to_string())
                .execute(&writer_pool)
                .await
                .expect("insert");
        }
    });
    // Let part of the stream through, then cut every quill session (listener and pool).
    let before = ws.events(500).await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'quill%') t",
    )
    .fetch_one(&sql)
    .await
    .expect("terminate");
    assert!(killed >= 1, "the listener session was found and terminated");
    writer.await.expect("writer finished");
    let mut texts: Vec<String> = before
        .iter()
        .map(|e| e["data"]["text"].as_str().unwrap_or("").to_owned())
        .collect();
    for e in ws.events(N - 500).await {
        texts.push(e["data"]["text"].as_str().unwrap_or("").to_owned());
    }
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert!(texts == expected, "all {N} events, once each, in order");
    ws.expect_no_event(Duration::from_millis(500)).await;
}
