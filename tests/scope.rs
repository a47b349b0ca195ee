//! Old rows in the log and scope moves: a row that leaves a subscription's query or
//! channels is announced (`removed`, id only, `moved: out`), one that enters it arrives
//! whole (`moved: in`); where the row was is known because UPDATE logs the old row.

use serde_json::{Value, json};

use crate::support::{Quill, open_demo};

async fn sql(q: &Quill, statement: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&q.sql().await)
        .await
        .expect(statement);
}

/// Every frame up to and including the event whose row has `text = sentinel`, as raw text.
async fn frames_until(ws: &mut crate::support::Ws, sentinel: &str) -> Vec<String> {
    let mut raw = Vec::new();
    loop {
        let frame = ws.next_event().await;
        let done = frame["data"]["text"] == sentinel;
        raw.push(frame.to_string());
        if done {
            return raw;
        }
    }
}

#[tokio::test]
async fn an_update_logs_the_old_row_and_an_id_change_is_a_removal_then_a_patch() {
    let q = Quill::start().await;
    sql(&q, "INSERT INTO messages (id, text) VALUES (1, 'a'), (2, 'b')").await;
    sql(&q, "UPDATE messages SET text = 'a2' WHERE id = 1").await;
    sql(&q, "UPDATE messages SET id = 20 WHERE id = 2").await;
    let logged: Vec<(String, Value, Option<Value>)> =
        sqlx::query_as::<_, (String, sqlx::types::Json<Value>, Option<sqlx::types::Json<Value>>)>(
            "SELECT kind, row_data, old_data FROM quill.change_log WHERE table_name = 'messages' ORDER BY seq",
        )
        .fetch_all(&q.sql().await)
        .await
        .expect("log")
        .into_iter()
        .map(|(k, r, o)| (k, r.0, o.map(|o| o.0)))
        .collect();
    assert_eq!(logged.len(), 5, "{logged:?}");
    assert_eq!((logged[2].0.as_str(), &logged[2].1["text"]), ("patched", &json!("a2")));
    assert_eq!(
        logged[2].2.as_ref().map(|o| &o["text"]),
        Some(&json!("a")),
        "the old row beside the new"
    );
    // The id changed: the old id is removed, then the row under its new id, in that order.
    assert_eq!((logged[3].0.as_str(), &logged[3].1["id"]), ("removed", &json!(2)));
    assert_eq!((logged[4].0.as_str(), &logged[4].1["id"]), ("patched", &json!(20)));
    assert!(logged[4].2.is_none());
}

#[tokio::test]
async fn rows_moving_out_of_and_into_a_query_are_announced_and_moved_out_values_never_sent() {
    let q = Quill::start().await;
    sql(&q, "INSERT INTO users (id, email) VALUES (5, 'five@x'), (6, 'six@x')").await;
    let mut ws = q.ws().await;
    ws.ok("subscribe", "messages", json!({"query": {"user_id": 5}})).await;
    sql(
        &q,
        "INSERT INTO messages (id, text, user_id) VALUES (101, 'in five', 5), (102, 'in six', 6)",
    )
    .await;
    assert_eq!(ws.next_event().await["data"]["id"], 101, "only the row in scope");
    // Out of scope: the id only, never the new values.
    sql(
        &q,
        "UPDATE messages SET user_id = 6, text = 'SECRET NEW TEXT' WHERE id = 101",
    )
    .await;
    // Into scope: the whole row.
    sql(
        &q,
        "UPDATE messages SET user_id = 5, text = 'moved here' WHERE id = 102",
    )
    .await;
    // Within scope: a plain patch. Outside it: nothing.
    sql(&q, "UPDATE messages SET text = 'still here' WHERE id = 102").await;
    sql(&q, "UPDATE messages SET text = 'elsewhere' WHERE id = 101").await;
    sql(&q, "INSERT INTO messages (text, user_id) VALUES ('sentinel', 5)").await;
    let raw = frames_until(&mut ws, "sentinel").await;
    assert!(!raw.iter().any(|f| f.contains("SECRET")), "{raw:?}");
    let frames: Vec<Value> = raw.iter().map(|f| serde_json::from_str(f).expect("json")).collect();
    assert_eq!(frames.len(), 4, "{frames:?}");
    assert_eq!(frames[0]["event"], "removed");
    assert_eq!(frames[0]["moved"], "out");
    assert_eq!(frames[0]["data"], json!({"id": 101}));
    assert_eq!(frames[1]["event"], "patched");
    assert_eq!(frames[1]["moved"], "in");
    assert_eq!(frames[1]["data"]["text"], "moved here");
    assert_eq!(frames[1]["data"]["user_id"], 5);
    assert_eq!(frames[2]["data"]["text"], "still here");
    assert!(frames[2].get("moved").is_none(), "{}", frames[2]);
    assert_eq!(frames[3]["event"], "created");
}

#[tokio::test]
async fn rows_moving_between_channels_are_announced_to_the_readers_they_leave() {
    let mut config = open_demo();
    if let Some(messages) = config.services.get_mut("messages") {
        messages.publish = Some(vec!["users/{user_id}".into()]);
    }
    let q = Quill::start_with(config).await;
    let (five, five_token) = q.user("five@x.io", false).await;
    let (six, six_token) = q.user("six@x.io", false).await;
    let mut five_ws = q.ws().await;
    five_ws.login(&five_token).await;
    five_ws.subscribe("messages").await;
    let mut six_ws = q.ws().await;
    six_ws.login(&six_token).await;
    six_ws.subscribe("messages").await;
    sql(
        &q,
        &format!("INSERT INTO messages (id, text, user_id) VALUES (101, 'mine', {five})"),
    )
    .await;
    assert_eq!(five_ws.next_event().await["data"]["text"], "mine");
    // Given to six: five sees it go (id only), six sees it come (whole row).
    sql(
        &q,
        &format!("UPDATE messages SET user_id = {six}, text = 'yours now' WHERE id = 101"),
    )
    .await;
    sql(
        &q,
        &format!("INSERT INTO messages (text, user_id) VALUES ('sentinel', {five}), ('sentinel', {six})"),
    )
    .await;
    let five_frames = frames_until(&mut five_ws, "sentinel").await;
    assert_eq!(five_frames.len(), 2, "{five_frames:?}");
    assert!(!five_frames[0].contains("yours now"), "{five_frames:?}");
    let gone: Value = serde_json::from_str(&five_frames[0]).expect("json");
    assert_eq!(
        (gone["event"].as_str(), gone["moved"].as_str()),
        (Some("removed"), Some("out"))
    );
    assert_eq!(gone["data"], json!({"id": 101}));
    let six_frames = frames_until(&mut six_ws, "sentinel").await;
    let came: Value = serde_json::from_str(&six_frames[0]).expect("json");
    assert_eq!(
        (came["event"].as_str(), came["moved"].as_str()),
        (Some("patched"), Some("in"))
    );
    assert_eq!(came["data"]["text"], "yours now");
}

#[tokio::test]
async fn a_resume_replays_scope_moves_like_live_delivery() {
    let q = Quill::start().await;
    sql(&q, "INSERT INTO users (id, email) VALUES (5, 'five@x'), (6, 'six@x')").await;
    let mut ws = q.ws().await;
    ws.ok("subscribe", "messages", json!({"query": {"user_id": 5}})).await;
    sql(&q, "INSERT INTO messages (id, text, user_id) VALUES (101, 'first', 5)").await;
    let since = ws.next_event().await["seq"].as_i64().expect("seq");
    drop(ws);
    sql(&q, "UPDATE messages SET user_id = 6, text = 'SECRET' WHERE id = 101").await;
    sql(&q, "INSERT INTO messages (text, user_id) VALUES ('sentinel', 5)").await;
    let mut back = q.ws().await;
    back.ok(
        "subscribe",
        "messages",
        json!({"query": {"user_id": 5}, "since": since}),
    )
    .await;
    let raw = frames_until(&mut back, "sentinel").await;
    assert_eq!(raw.len(), 2, "{raw:?}");
    assert!(!raw[0].contains("SECRET"));
    let gone: Value = serde_json::from_str(&raw[0]).expect("json");
    assert_eq!(
        (gone["event"].as_str(), gone["moved"].as_str()),
        (Some("removed"), Some("out"))
    );
}

#[tokio::test]
async fn a_bulk_update_after_many_single_row_ones_is_paired_in_linear_time() {
    let q = Quill::start().await;
    sql(
        &q,
        "INSERT INTO messages (text) SELECT 'row ' || i FROM generate_series(1, 20000) i",
    )
    .await;
    // Plans kept from one-row updates (PostgreSQL switches to a generic plan after five).
    for i in 1..=8 {
        sql(&q, &format!("UPDATE messages SET text = 'single {i}' WHERE id = {i}")).await;
    }
    let pool = q.sql().await;
    let bulk = sqlx::raw_sql("UPDATE messages SET text = text || '!'").execute(&pool);
    let done = tokio::time::timeout(crate::support::WAIT, bulk).await;
    assert!(
        done.is_ok(),
        "pairing 20 000 old and new rows must not take quadratic time"
    );
    let paired: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM quill.change_log WHERE kind = 'patched' AND old_data IS NOT NULL AND row_data->>'text' LIKE '%!'",
    )
    .fetch_one(&q.sql().await)
    .await
    .expect("count");
    assert_eq!(paired, 20000);
}

#[tokio::test]
async fn services_on_one_table_must_share_its_id() {
    let mut config = open_demo();
    // `email` identifies users too (unique, not null), but capture pairs rows by one id.
    let mut by_email = config.services["users"].clone();
    by_email.table = Some("users".into());
    by_email.id = "email".into();
    config.services.insert("users_by_email".into(), by_email);
    let err = Quill::start_error(config).await;
    assert!(err.to_string().contains("different ids"), "{err}");
}

#[tokio::test]
async fn a_multi_row_update_leaves_the_writers_planner_settings_as_they_were() {
    let q = Quill::start().await;
    let mut conn = q.sql().await.acquire().await.expect("connection");
    sqlx::raw_sql("INSERT INTO messages (id, text) VALUES (1, 'a'), (2, 'b')")
        .execute(&mut *conn)
        .await
        .expect("insert");
    for setting in ["on", "off"] {
        let statement = format!(
            "SET enable_nestloop = {setting}; BEGIN; UPDATE messages SET text = text || '!'; \
             UPDATE messages SET text = 'one' WHERE id = 1"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *conn)
            .await
            .expect("updates");
        let inside: String = sqlx::query_scalar("SHOW enable_nestloop")
            .fetch_one(&mut *conn)
            .await
            .expect("show");
        sqlx::raw_sql("COMMIT").execute(&mut *conn).await.expect("commit");
        assert_eq!(inside, setting, "the trigger changed the writer's enable_nestloop");
    }
    let logged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM quill.change_log WHERE kind = 'patched' AND old_data IS NOT NULL")
            .fetch_one(&mut *conn)
            .await
            .expect("log");
    assert_eq!(
        logged, 6,
        "both rows twice and one row twice more, each with its old row"
    );
    sqlx::raw_sql("RESET enable_nestloop")
        .execute(&mut *conn)
        .await
        .expect("reset");
}
