//! Client resume with `since`: exactly the missed events, then live ones, no gap or repeat.

use std::time::Duration;

use serde_json::json;

use crate::support::{Quill, insert_messages};
use quill::config::Retention;

fn texts(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["data"]["text"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn a_client_that_missed_1000_events_gets_exactly_those_then_live_ones() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut first = q.ws().await;
    first.subscribe("messages").await;
    insert_messages(&sql, 0, 1).await;
    let last_seen = first.next_event().await["seq"].as_i64().expect("seq");
    drop(first);

    insert_messages(&sql, 1, 1001).await;
    // More writes race with the resume itself.
    let racing = {
        let sql = sql.clone();
        tokio::spawn(async move { insert_messages(&sql, 1001, 1301).await })
    };
    let mut back = q.ws().await;
    let reply = back.ok("subscribe", "messages", json!({"since": last_seen})).await;
    assert_eq!(reply, json!({"subscribed": "messages", "since": last_seen}));
    racing.await.expect("racing writer");
    let events = back.events(1300).await;
    let expected: Vec<String> = (1..1301).map(|i| i.to_string()).collect();
    assert!(
        texts(&events) == expected,
        "exactly the 1300 events after {last_seen}, in order"
    );
    back.expect_no_event(Duration::from_millis(300)).await;
    insert_messages(&sql, 1301, 1302).await;
    assert_eq!(back.next_event().await["data"]["text"], "1301");
}

#[tokio::test]
async fn resumed_events_pass_the_same_field_stripping_and_kind_filter() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut ws = q.ws().await;
    ws.subscribe("users").await;
    sqlx::query("INSERT INTO users (email, password) VALUES ('a@x.io', 'pw-a')")
        .execute(&sql)
        .await
        .expect("a");
    let since = ws.next_event().await["seq"].as_i64().expect("seq");
    drop(ws);
    sqlx::query("INSERT INTO users (email, password) VALUES ('b@x.io', 'pw-b')")
        .execute(&sql)
        .await
        .expect("b");
    sqlx::query("UPDATE users SET role = 'admin'")
        .execute(&sql)
        .await
        .expect("patch");
    let mut ws = q.ws().await;
    ws.ok("subscribe", "users", json!({"since": since, "kinds": ["patched"]}))
        .await;
    let events = ws.events(2).await;
    assert!(events.iter().all(|e| e["event"] == "patched"), "{events:?}");
    assert!(!format!("{events:?}").contains("pw-"), "no password in replayed events");
}

#[tokio::test]
async fn a_position_older_than_retention_is_gone_and_an_unknown_one_is_a_bad_request() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    insert_messages(&sql, 0, 1).await;
    let old = ws.next_event().await["seq"].as_i64().expect("seq");
    insert_messages(&sql, 1, 5).await;
    ws.events(4).await;
    q.wait_until_reader_recorded().await;
    let keep_two = Retention {
        max_age_seconds: 3600,
        max_events: 2,
        prune_interval_seconds: 60,
    };
    let removed = quill::change::retention::prune(&sql, keep_two, &Default::default())
        .await
        .expect("prune");
    // By commit order: the tick that delivered the change two before the newest, and
    // everything before it. Each insert was its own transaction, but one tick may deliver
    // several, up to all five.
    assert!((3..=5).contains(&removed), "{removed}");
    let reply = ws.call("subscribe", "messages", json!({"since": old})).await;
    assert_eq!(reply["error"]["name"], "Gone", "{reply}");
    assert_eq!(reply["error"]["code"], 410);
    let reply = ws.call("subscribe", "messages", json!({"since": 1_000_000})).await;
    assert_eq!(reply["error"]["name"], "BadRequest", "{reply}");
    let reply = ws.call("subscribe", "messages", json!({"since": "yesterday"})).await;
    assert_eq!(reply["error"]["name"], "BadRequest", "{reply}");
}

/// A client that subscribed, saw message "0" and left: its position.
async fn seen_one_then_gone(q: &Quill, sql: &sqlx::PgPool) -> i64 {
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    insert_messages(sql, 0, 1).await;
    ws.next_event().await["seq"].as_i64().expect("seq")
}

/// Inserts `count` messages, each in its own transaction followed by its own tick, as a
/// long stretch of single-row autocommit writes would leave the log.
async fn insert_with_a_tick_each(pool: &sqlx::PgPool, from: usize, count: usize) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DO $$ BEGIN
           PERFORM set_config('synchronous_commit', 'off', false);
           FOR i IN {from}..{last} LOOP
             INSERT INTO messages (text) VALUES (i::text);
             COMMIT;
             PERFORM quill.make_tick();
             COMMIT;
           END LOOP;
         END $$",
        last = from + count - 1
    )))
    .execute(pool)
    .await
    .expect("insert with ticks");
}

#[tokio::test]
async fn a_resume_across_more_than_30000_ticks_delivers_exactly_the_missed_events_in_order() {
    const MISSED: usize = 31_000;
    let q = Quill::start().await;
    let sql = q.sql().await;
    let since = seen_one_then_gone(&q, &sql).await;
    insert_with_a_tick_each(&sql, 1, MISSED).await;
    let ticks: i64 = sqlx::query_scalar("SELECT count(*) FROM quill.tick")
        .fetch_one(&sql)
        .await
        .expect("ticks");
    assert!(ticks > 30_000, "{ticks} ticks");
    let mut back = q.ws().await;
    back.ok("subscribe", "messages", json!({"since": since})).await;
    let events = back.events(MISSED).await;
    let expected: Vec<String> = (1..=MISSED).map(|i| i.to_string()).collect();
    assert!(texts(&events) == expected, "exactly the missed events, in order");
    // Live afterwards, with nothing in between: the sentinel is the next event.
    insert_messages(&sql, 100_000, 100_001).await;
    assert_eq!(back.next_event().await["data"]["text"], "100000");
}

#[tokio::test]
async fn many_clients_resuming_while_writes_race_each_get_every_event_once_in_order() {
    const CLIENTS: usize = 8;
    const BEFORE: usize = 300;
    const DURING: usize = 700;
    let q = Quill::start().await;
    let sql = q.sql().await;
    let since = seen_one_then_gone(&q, &sql).await;
    insert_messages(&sql, 1, BEFORE + 1).await;
    // The writer races every resume and its hand-over to live delivery.
    let writer = {
        let sql = sql.clone();
        tokio::spawn(async move { insert_messages(&sql, BEFORE + 1, BEFORE + DURING + 1).await })
    };
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let url = format!("ws://{}/ws", q.addr);
        clients.push(tokio::spawn(async move {
            let mut ws = crate::support::Ws::connect(&url).await;
            ws.ok("subscribe", "messages", json!({"since": since})).await;
            texts(&ws.events(BEFORE + DURING).await)
        }));
    }
    writer.await.expect("writer");
    let expected: Vec<String> = (1..=BEFORE + DURING).map(|i| i.to_string()).collect();
    for client in clients {
        let got = client.await.expect("client");
        assert!(got == expected, "every event once, in order");
    }
}

/// The seq of the logged message with this text.
async fn seq_of(sql: &sqlx::PgPool, text: &str) -> i64 {
    sqlx::query_scalar("SELECT seq FROM quill.change_log WHERE row_data->>'text' = $1")
        .bind(text)
        .fetch_one(sql)
        .await
        .expect("seq of a message")
}

#[tokio::test]
async fn a_later_subscribe_supersedes_a_running_replay_and_its_events_stop_at_once() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let since = seen_one_then_gone(&q, &sql).await;
    insert_with_a_tick_each(&sql, 1, 3000).await;
    let later = seq_of(&sql, "2000").await;
    let mut back = q.ws().await;
    // Both requests at once: the second must win, whatever the first has sent by then.
    for (reference, since) in [(1, since), (2, later)] {
        let request = json!({"ref": reference, "method": "subscribe", "service": "messages", "since": since});
        back.send_text(&request.to_string()).await;
    }
    loop {
        let frame = back.next_frame().await;
        if frame["ref"] == 2 {
            assert_eq!(frame["result"]["since"], later, "{frame}");
            break;
        }
    }
    // From the second reply on: exactly what follows `later`, then live events.
    insert_messages(&sql, 5000, 5001).await;
    let mut after = Vec::new();
    while after.last().is_none_or(|t| t != "5000") {
        let frame = back.next_frame().await;
        if frame.get("event").is_some() {
            after.push(frame["data"]["text"].as_str().unwrap_or("").to_owned());
        }
    }
    let expected: Vec<String> = (2001..=3000).map(|i| i.to_string()).chain(["5000".into()]).collect();
    assert!(
        after == expected,
        "only the second replay's events, then live: {:?}",
        &after[..after.len().min(5)]
    );
}

#[tokio::test]
async fn an_unsubscribe_right_after_a_resume_ends_it() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let since = seen_one_then_gone(&q, &sql).await;
    insert_with_a_tick_each(&sql, 1, 2000).await;
    let mut back = q.ws().await;
    back.send_text(&json!({"ref": 1, "method": "subscribe", "service": "messages", "since": since}).to_string())
        .await;
    for request in [
        json!({"ref": 2, "method": "unsubscribe", "service": "messages"}),
        json!({"ref": 3, "method": "subscribe", "service": "users"}),
    ] {
        back.send_text(&request.to_string()).await;
    }
    // Replayed events may come before the unsubscribe's reply, none after it. Sentinel: an
    // event of another service, after a message that must not come.
    let mut unsubscribed = false;
    let mut sentinel_sent = false;
    loop {
        let frame = back.next_frame().await;
        if frame["ref"] == 2 {
            unsubscribed = true;
        }
        if frame["ref"] == 3 && !sentinel_sent {
            insert_messages(&sql, 5000, 5001).await;
            q.signup("sentinel@x.io", "pw-sentinel-1").await;
            sentinel_sent = true;
        }
        if frame["service"] == "messages" {
            assert!(!unsubscribed, "an event after the unsubscribe: {frame}");
        }
        if frame["service"] == "users" {
            assert!(unsubscribed && sentinel_sent);
            break;
        }
    }
}

#[tokio::test]
async fn positions_are_found_across_gaps_in_tick_ids() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    // Ticks made in transactions that roll back leave gaps in the ids, of every width.
    for i in 0..40 {
        insert_messages(&sql, i, i + 1).await;
        let mut tx = sql.begin().await.expect("begin");
        for _ in 0..(i % 5) {
            sqlx::query("SELECT quill.make_tick()")
                .execute(&mut *tx)
                .await
                .expect("tick");
        }
        tx.rollback().await.expect("rollback");
        sqlx::query("SELECT quill.make_tick()")
            .execute(&sql)
            .await
            .expect("tick");
    }
    let seqs: Vec<i64> = ws
        .events(40)
        .await
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    let mut conn = sql.acquire().await.expect("connection");
    sqlx::query("SET statement_timeout = '5s'")
        .execute(&mut *conn)
        .await
        .expect("timeout");
    for seq in seqs {
        let tick: Option<i64> = sqlx::query_scalar("SELECT quill.tick_of($1)")
            .bind(seq)
            .fetch_one(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("tick_of({seq}) must end: {e}"));
        let delivered: bool = sqlx::query_scalar(
            "SELECT pg_visible_in_snapshot(c.xid, t.snapshot)
                    AND NOT EXISTS (SELECT 1 FROM quill.tick p WHERE p.id < t.id AND pg_visible_in_snapshot(c.xid, p.snapshot))
             FROM quill.change_log c, quill.tick t WHERE c.seq = $1 AND t.id = $2",
        )
        .bind(seq)
        .bind(tick.expect("a tick"))
        .fetch_one(&mut *conn)
        .await
        .expect("check");
        assert!(
            delivered,
            "tick_of({seq}) = {tick:?} is not the first tick that shows it"
        );
    }
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await
        .expect("reset");
}
