//! Live events on `/ws` for writes through quill and through plain SQL.

use std::time::Duration;

use serde_json::json;

use crate::support::Quill;

#[tokio::test]
async fn sql_insert_update_and_delete_become_created_patched_and_removed() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    let id: i64 = sqlx::query_scalar("INSERT INTO messages (text) VALUES ('hi') RETURNING id")
        .fetch_one(&sql)
        .await
        .expect("insert");
    sqlx::query("UPDATE messages SET text = 'edited' WHERE id = $1")
        .bind(id)
        .execute(&sql)
        .await
        .expect("update");
    sqlx::query("DELETE FROM messages WHERE id = $1")
        .bind(id)
        .execute(&sql)
        .await
        .expect("delete");

    let events = ws.events(3).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["created", "patched", "removed"]);
    assert!(
        events
            .iter()
            .all(|e| e["service"] == "messages" && e["data"]["id"] == id)
    );
    assert_eq!(events[0]["data"]["text"], "hi");
    assert_eq!(events[1]["data"]["text"], "edited");
    assert_eq!(events[2]["data"]["text"], "edited", "removed carries the removed row");
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().expect("seq")).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[tokio::test]
async fn put_is_updated_and_patch_is_patched() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let (_, m) = q.rest("POST", "/messages", Some(json!({"text": "a"}))).await;
    let path = format!("/messages/{}", m["id"]);
    q.rest("PUT", &path, Some(json!({"text": "b"}))).await;
    q.rest("PATCH", &path, Some(json!({"text": "c"}))).await;
    q.rest("DELETE", &path, None).await;
    let kinds: Vec<String> = ws
        .events(4)
        .await
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(kinds, ["created", "updated", "patched", "removed"]);
}

#[tokio::test]
async fn a_multi_row_statement_gives_one_event_per_row() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    sqlx::query("INSERT INTO messages (text) SELECT 'row ' || g FROM generate_series(1, 50) g")
        .execute(&sql)
        .await
        .expect("insert");
    let events = ws.events(50).await;
    let texts: Vec<String> = events
        .iter()
        .map(|e| e["data"]["text"].as_str().unwrap_or("").to_owned())
        .collect();
    let expected: Vec<String> = (1..=50).map(|i| format!("row {i}")).collect();
    assert_eq!(texts, expected);
    sqlx::query("UPDATE messages SET text = upper(text)")
        .execute(&sql)
        .await
        .expect("update");
    assert!(ws.events(50).await.iter().all(|e| e["event"] == "patched"));
    ws.expect_no_event(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_one_megabyte_row_inserts_and_its_event_arrives() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    let big = "x".repeat(1024 * 1024);
    sqlx::query("INSERT INTO messages (text) VALUES ($1)")
        .bind(&big)
        .execute(&sql)
        .await
        .expect("1 MB insert");
    let event = ws.next_event().await;
    assert_eq!(event["data"]["text"].as_str().map(str::len), Some(big.len()));
}

#[tokio::test]
async fn subscription_kinds_and_unsubscribe_narrow_what_arrives() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    let r = ws.ok("subscribe", "messages", json!({"kinds": ["removed"]})).await;
    assert_eq!(r, json!({"subscribed": "messages"}));
    let sql = q.sql().await;
    sqlx::query("INSERT INTO messages (text) VALUES ('a')")
        .execute(&sql)
        .await
        .expect("insert");
    sqlx::query("DELETE FROM messages").execute(&sql).await.expect("delete");
    assert_eq!(ws.next_event().await["event"], "removed");
    ws.ok("unsubscribe", "messages", json!({})).await;
    sqlx::query("INSERT INTO messages (text) VALUES ('b')")
        .execute(&sql)
        .await
        .expect("insert");
    sqlx::query("DELETE FROM messages").execute(&sql).await.expect("delete");
    ws.expect_no_event(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn events_strip_hidden_fields() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    ws.subscribe("users").await;
    let sql = q.sql().await;
    sqlx::query("INSERT INTO users (email, password) VALUES ('s@x.io', 'plain-secret')")
        .execute(&sql)
        .await
        .expect("insert");
    let event = ws.next_event().await;
    assert_eq!(event["data"]["email"], "s@x.io");
    assert!(!event.to_string().contains("password") && !event.to_string().contains("plain-secret"));
}

#[tokio::test]
async fn a_write_committed_right_after_the_subscribe_reply_is_delivered() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    for i in 0..20 {
        let mut ws = q.ws().await;
        ws.subscribe("messages").await;
        sqlx::query("INSERT INTO messages (text) VALUES ($1)")
            .bind(format!("m{i}"))
            .execute(&sql)
            .await
            .expect("insert");
        assert_eq!(ws.next_event().await["data"]["text"], format!("m{i}"));
    }
}

#[tokio::test]
async fn a_table_with_columns_named_like_the_triggers_aliases_is_captured() {
    // The capture triggers once wrote `row_to_json(r)` and `row_to_json(n)`, and the update
    // trigger's variables `key` and `update_kind` clashed with columns of those names: every
    // write to such a table failed ("column reference is ambiguous").
    let db = crate::support::pg::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    quill::gateway::migrate(&pool, false).await.expect("migrate");
    sqlx::raw_sql("CREATE TABLE letters (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n int, o int, r int, key int, update_kind int)")
        .execute(&pool)
        .await
        .expect("table");
    pool.close().await;
    let config: quill::Config = toml::from_str(
        r#"
        [services.letters]
        publish = ["anonymous"]
        access = "public"
        "#,
    )
    .expect("config");
    let q = Quill::start_on(db, config).await;
    let mut ws = q.ws().await;
    ws.subscribe("letters").await;
    let sql = q.sql().await;
    sqlx::raw_sql(
        "INSERT INTO letters (n, o, r) VALUES (1, 2, 3), (4, 5, 6);
         UPDATE letters SET n = n + 10 WHERE n = 1;
         UPDATE letters SET o = o + 10;
         DELETE FROM letters WHERE n = 4;",
    )
    .execute(&sql)
    .await
    .expect("every write goes through");
    let events = ws.events(6).await;
    let seen: Vec<(String, i64, i64)> = events
        .iter()
        .map(|e| {
            let kind = e["event"].as_str().unwrap_or_default().to_owned();
            (
                kind,
                e["data"]["n"].as_i64().unwrap_or(-1),
                e["data"]["o"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let event = |kind: &str, n: i64, o: i64| (kind.to_owned(), n, o);
    assert_eq!(
        seen[..3],
        [event("created", 1, 2), event("created", 4, 5), event("patched", 11, 2)]
    );
    // One statement's rows, in the order the statement wrote them.
    let mut both = seen[3..5].to_vec();
    both.sort();
    assert_eq!(both, [event("patched", 4, 15), event("patched", 11, 12)]);
    assert_eq!(seen[5], event("removed", 4, 15));
}
