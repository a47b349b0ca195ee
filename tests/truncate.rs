//! TRUNCATE of a captured table is an event: `truncated`, with no row, to the subscribers a
//! row of that table could reach; truncating the users table logs everyone out.

use serde_json::json;

use crate::support::{Quill, insert_messages, open_demo};

async fn run(q: &Quill, statement: &'static str) {
    sqlx::query(statement).execute(&q.sql().await).await.expect(statement);
}

#[tokio::test]
async fn a_truncate_is_one_truncated_event_live_and_on_resume() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    insert_messages(&sql, 0, 3).await;
    let since = ws.events(3).await[2]["seq"].as_i64().expect("seq");
    // A subscription with a query still hears of it: its rows are gone too.
    let mut filtered = q.ws().await;
    filtered
        .ok("subscribe", "messages", json!({"query": {"text": "nothing like this"}}))
        .await;
    run(&q, "TRUNCATE messages").await;
    let event = ws.next_event().await;
    let seq = event["seq"].as_i64().expect("seq");
    assert_eq!(event, json!({"event": "truncated", "service": "messages", "seq": seq}));
    assert_eq!(filtered.next_event().await, event);
    // Replayed like any other event.
    let mut back = q.ws().await;
    back.ok("subscribe", "messages", json!({"since": since})).await;
    assert_eq!(back.next_event().await, event);
}

#[tokio::test]
async fn a_truncate_reaches_only_connections_in_channels_a_row_could_reach() {
    let mut config = open_demo();
    if let Some(messages) = config.services.get_mut("messages") {
        messages.publish = Some(vec!["roles/admin".into(), "users/{user_id}".into()]);
    }
    let q = Quill::start_with(config).await;
    let (_, admin_token) = q.user("admin@x.io", true).await;
    let (_, user_token) = q.user("user@x.io", false).await;
    let mut admin = q.ws().await;
    admin.login(&admin_token).await;
    let mut user = q.ws().await;
    user.login(&user_token).await;
    let mut anonymous = q.ws().await;
    for ws in [&mut admin, &mut user, &mut anonymous] {
        ws.subscribe("messages").await;
        ws.subscribe("users").await;
    }
    run(&q, "TRUNCATE messages").await;
    // The sentinel: a users event every connection receives, after the truncate.
    run(&q, "INSERT INTO users (email, password) VALUES ('sentinel@x.io', 'x')").await;
    assert_eq!(admin.next_event().await["event"], "truncated", "roles/admin");
    assert_eq!(user.next_event().await["event"], "truncated", "in a users/ channel");
    assert_eq!(admin.next_event().await["event"], "created");
    assert_eq!(user.next_event().await["event"], "created");
    let first = anonymous.next_event().await;
    assert_eq!(
        first["event"], "created",
        "anonymous is in no channel a message reaches: {first}"
    );
}

#[tokio::test]
async fn truncating_the_users_table_logs_every_connection_out() {
    let q = Quill::start().await;
    let (_, token) = q.user("someone@x.io", false).await;
    let mut ws = q.ws().await;
    ws.login(&token).await;
    run(&q, "TRUNCATE users CASCADE").await;
    let event = ws.next_event().await;
    assert_eq!(event, json!({"event": "logout", "reason": "user removed"}));
    // The token names a user who is gone.
    let reply = ws
        .call(
            "create",
            "authentication",
            json!({"data": {"strategy": "jwt", "accessToken": token}}),
        )
        .await;
    assert_eq!(reply["error"]["name"], "NotAuthenticated", "{reply}");
}
