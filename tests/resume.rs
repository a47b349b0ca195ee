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
    let keep_two = Retention {
        max_age_seconds: 3600,
        max_events: 2,
        prune_interval_seconds: 60,
    };
    let removed = quill::change::retention::prune(&sql, keep_two, &Default::default())
        .await
        .expect("prune");
    assert_eq!(removed, 3);
    let reply = ws.call("subscribe", "messages", json!({"since": old})).await;
    assert_eq!(reply["error"]["name"], "Gone", "{reply}");
    assert_eq!(reply["error"]["code"], 410);
    let reply = ws.call("subscribe", "messages", json!({"since": 1_000_000})).await;
    assert_eq!(reply["error"]["name"], "BadRequest", "{reply}");
    let reply = ws.call("subscribe", "messages", json!({"since": "yesterday"})).await;
    assert_eq!(reply["error"]["name"], "BadRequest", "{reply}");
}
