//! Retention prunes by commit point and never past a running reader; a gap that somebody
//! else made is reported, and subscribers are told to reload.

use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::support::{Quill, insert_messages};
use quill::config::Retention;

/// Keep nothing that retention alone would let go.
const KEEP_NOTHING: Retention = Retention {
    max_age_seconds: 0,
    max_events: 1,
    prune_interval_seconds: 3600,
};

async fn prune(q: &Quill) -> u64 {
    quill::change::retention::prune(&q.sql().await, KEEP_NOTHING, &Default::default())
        .await
        .expect("prune")
}

async fn logged_messages(q: &Quill) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM quill.change_log WHERE table_name = 'messages'")
        .fetch_one(&q.sql().await)
        .await
        .expect("count")
}

/// Holds the tick lock on a session of the test's own: quill's reader cannot make or read
/// ticks until it is let go, while this session still can (the lock is re-entrant).
async fn hold_ticks(q: &Quill) -> PgConnection {
    let mut conn = PgConnection::connect(&q.db.url).await.expect("connect");
    sqlx::query("SELECT pg_advisory_lock(hashtext('quill.tick'))")
        .execute(&mut conn)
        .await
        .expect("lock");
    conn
}

async fn make_tick(conn: &mut PgConnection) {
    sqlx::query("SELECT quill.make_tick()")
        .execute(&mut *conn)
        .await
        .expect("tick");
}

async fn release_ticks(mut conn: PgConnection) {
    sqlx::query("SELECT pg_advisory_unlock(hashtext('quill.tick'))")
        .execute(&mut conn)
        .await
        .expect("unlock");
}

#[tokio::test]
async fn a_prune_never_deletes_what_a_lagging_reader_has_not_read() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let mut ticks = hold_ticks(&q).await;
    insert_messages(&sql, 0, 10).await;
    // Ticked, so retention alone would delete them; quill has not read them.
    make_tick(&mut ticks).await;
    prune(&q).await;
    assert_eq!(logged_messages(&q).await, 10, "nothing unread was pruned");
    release_ticks(ticks).await;
    let texts: Vec<_> = ws.events(10).await.iter().map(|e| e["data"]["text"].clone()).collect();
    assert_eq!(texts, (0..10).map(|i| json!(i.to_string())).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_transaction_open_across_a_prune_is_delivered_when_it_commits() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    // Written first (lowest seq, oldest write time), committed last.
    let mut open = PgConnection::connect(&q.db.url).await.expect("connect");
    let mut tx = open.begin().await.expect("begin");
    sqlx::query("INSERT INTO messages (text) VALUES ('late')")
        .execute(&mut *tx)
        .await
        .expect("insert");
    insert_messages(&sql, 0, 5).await;
    ws.events(5).await;
    q.wait_until_reader_recorded().await;
    // It commits, and a prune runs before any tick covers it.
    let ticks = hold_ticks(&q).await;
    tx.commit().await.expect("commit");
    assert_eq!(prune(&q).await, 5, "the delivered five are pruned");
    assert_eq!(logged_messages(&q).await, 1, "the late change stays");
    release_ticks(ticks).await;
    assert_eq!(ws.next_event().await["data"]["text"], "late");
}

#[tokio::test]
async fn a_gap_in_the_log_closes_subscribers_with_4010_and_ready_says_why() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let mut ticks = hold_ticks(&q).await;
    insert_messages(&sql, 0, 1).await;
    make_tick(&mut ticks).await;
    insert_messages(&sql, 1, 2).await;
    make_tick(&mut ticks).await;
    // Somebody else (an operator, an old quill) deletes what quill has not read.
    sqlx::query("DELETE FROM quill.change_log")
        .execute(&mut ticks)
        .await
        .expect("delete changes");
    sqlx::query("DELETE FROM quill.tick WHERE id < (SELECT max(id) FROM quill.tick)")
        .execute(&mut ticks)
        .await
        .expect("delete ticks");
    release_ticks(ticks).await;
    let (code, reason) = ws.closed().await;
    assert_eq!(code, 4010, "{reason}");
    assert!(reason.contains("reload"), "{reason}");
    let ready = q.http.get(q.url("/ready")).send().await.expect("ready");
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.expect("body").contains("gap"));
    assert!(q.metrics().await.contains("quill_change_log_gaps_total 1"));
    // Delivery goes on after the gap.
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    insert_messages(&sql, 2, 3).await;
    assert_eq!(ws.next_event().await["data"]["text"], "2");
}

#[tokio::test]
async fn a_prune_within_retention_deletes_nothing_even_behind_the_reader() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    insert_messages(&q.sql().await, 0, 5).await;
    ws.events(5).await;
    q.wait_until_reader_recorded().await;
    let removed = quill::change::retention::prune(&q.sql().await, Retention::default(), &Default::default())
        .await
        .expect("prune");
    assert_eq!(removed, 0, "read by quill, but within retention");
    assert_eq!(logged_messages(&q).await, 5);
}

/// A client's position (after message "0"), then one transaction of `rows` messages with
/// texts `text`, delivered and recorded by the reader. Returns quill and the position.
async fn position_then_one_big_transaction(text: &str, rows: usize) -> (Quill, i64) {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    insert_messages(&sql, 0, 1).await;
    let since = ws.next_event().await["seq"].as_i64().expect("seq");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO messages (text) SELECT {text} FROM generate_series(1, {rows}) i"
    )))
    .execute(&sql)
    .await
    .expect("bulk insert");
    ws.events(rows).await;
    q.wait_until_reader_recorded().await;
    (q, since)
}

#[tokio::test]
async fn a_replay_the_pruner_overtakes_says_so_instead_of_skipping() {
    // One transaction of more than a page: the replay reads it in three.
    let (q, since) = position_then_one_big_transaction("'bulk ' || i", 2500).await;
    let sql = q.sql().await;
    let after = quill::change::locate(&sql, since).await.expect("locate");
    let mut replay = quill::change::Replay::new(sql.clone(), after).await.expect("replay");
    replay.extend_to(i64::MAX);
    let first = replay.next_page().await.expect("first page").expect("a page");
    assert_eq!(first.len(), 1000);
    // The pruner deletes the rest of the tick while the replay is in the middle of it.
    assert!(prune(&q).await >= 2500);
    match replay.next_page().await {
        Err(quill::change::ChangeError::Gap { .. }) => {}
        other => panic!("the replay must say the pruner overtook it, got {other:?}"),
    }
}

#[tokio::test]
async fn a_resume_the_pruner_overtakes_is_told_to_reload() {
    // 40 MB in five pages: more than the queue and socket buffers hold, so the replay
    // cannot finish while its client does not read.
    let (q, since) = position_then_one_big_transaction("repeat('x', 8000)", 5000).await;
    let mut resumed = q.ws().await;
    let reply = resumed.call("subscribe", "messages", json!({ "since": since })).await;
    assert_eq!(reply["result"]["since"], since, "{reply}");
    assert!(prune(&q).await >= 5000);
    // It ends with 4010, never with a live subscription that lacks rows.
    let (code, reason) = resumed.closed().await;
    assert_eq!(code, 4010, "{reason}");
    assert!(reason.contains("reload"), "{reason}");
}
