//! Who receives which event, and who may call which method.

use std::time::Duration;

use serde_json::json;

use crate::support::Quill;
use quill::Config;
use quill::auth::Principal;
use quill::{Extensions, ServiceEvent};

const QUIET: Duration = Duration::from_millis(400);

/// The demo, with messages published to their author and to admins.
fn per_user_config() -> Config {
    let mut config = Config::demo();
    if let Some(s) = config.services.get_mut("messages") {
        s.publish = Some(vec!["users/{user_id}".into(), "roles/admin".into()]);
    }
    config
}

#[tokio::test]
async fn anonymous_subscribers_get_no_users_or_messages_events_but_authenticated_ones_do() {
    let q = Quill::start_secure().await;
    let (_, token) = q.user("a@x.io", false).await;
    let mut anonymous = q.ws().await;
    anonymous.subscribe("users").await;
    anonymous.subscribe("messages").await;
    let mut member = q.ws().await;
    member.login(&token).await;
    member.subscribe("users").await;
    member.subscribe("messages").await;
    q.signup("b@x.io", "pw-123456").await;
    q.rest_as(&token, "POST", "/messages", Some(json!({"text": "hi"})))
        .await;
    sqlx::query("INSERT INTO messages (text) VALUES ('from sql')")
        .execute(&q.sql().await)
        .await
        .expect("sql");
    let got: Vec<String> = member
        .events(3)
        .await
        .iter()
        .map(|e| e["service"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(got, ["users", "messages", "messages"]);
    anonymous.expect_no_event(QUIET).await;
}

#[tokio::test]
async fn per_user_and_per_role_channels_deliver_only_to_the_right_connections() {
    let q = Quill::start_with(per_user_config()).await;
    let (alice_id, alice) = q.user("alice@x.io", false).await;
    let (_, bob) = q.user("bob@x.io", false).await;
    let (_, admin) = q.user("root@x.io", true).await;
    let mut sockets = Vec::new();
    for token in [&alice, &bob, &admin] {
        let mut ws = q.ws().await;
        ws.login(token).await;
        ws.subscribe("messages").await;
        sockets.push(ws);
    }
    let (status, m) = q
        .rest_as(&alice, "POST", "/messages", Some(json!({"text": "mine"})))
        .await;
    assert_eq!(status, 201, "{m}");
    assert_eq!(m["user_id"], alice_id, "stamped with the caller");
    assert_eq!(sockets[0].next_event().await["data"]["text"], "mine");
    assert_eq!(
        sockets[2].next_event().await["data"]["text"],
        "mine",
        "admins see every message"
    );
    sockets[1].expect_no_event(QUIET).await;
    // the removal is filtered with the removed row: it reaches the same connections
    q.rest_as(&alice, "DELETE", &format!("/messages/{}", m["id"]), None)
        .await;
    assert_eq!(sockets[0].next_event().await["event"], "removed");
    assert_eq!(sockets[2].next_event().await["event"], "removed");
    sockets[1].expect_no_event(QUIET).await;
}

#[tokio::test]
async fn owner_rules_stop_users_touching_others_rows_or_making_themselves_admin() {
    let q = Quill::start_secure().await;
    let (alice_id, alice) = q.user("alice@x.io", false).await;
    let (bob_id, bob) = q.user("bob@x.io", false).await;
    let (_, admin) = q.user("root@x.io", true).await;
    let bob_path = format!("/users/{bob_id}");
    let (status, err) = q
        .rest_as(&alice, "PATCH", &bob_path, Some(json!({"email": "stolen@x.io"})))
        .await;
    assert_eq!((status, err["name"].as_str()), (403, Some("Forbidden")));
    assert_eq!(q.rest_as(&alice, "DELETE", &bob_path, None).await.0, 403);
    assert_eq!(
        q.rest_as(&alice, "PUT", &bob_path, Some(json!({"email": "x@x.io"})))
            .await
            .0,
        403
    );
    // self-promotion and signing up as admin
    let (status, _) = q
        .rest_as(
            &alice,
            "PATCH",
            &format!("/users/{alice_id}"),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = q
        .rest(
            "POST",
            "/users",
            Some(json!({"email": "evil@x.io", "password": "p", "role": "admin"})),
        )
        .await;
    assert_eq!(status, 403);
    // nothing was written
    let (_, bob_row) = q.rest_as(&bob, "GET", &bob_path, None).await;
    assert_eq!(bob_row["email"], "bob@x.io");
    let roles: Vec<String> = sqlx::query_scalar("SELECT role FROM users ORDER BY id")
        .fetch_all(&q.sql().await)
        .await
        .expect("roles");
    assert_eq!(roles, ["user", "user", "admin"]);
    // own rows and admins are fine; anonymous is 401, a missing row 404
    assert_eq!(
        q.rest_as(
            &alice,
            "PATCH",
            &format!("/users/{alice_id}"),
            Some(json!({"email": "a2@x.io"}))
        )
        .await
        .0,
        200
    );
    assert_eq!(
        q.rest_as(&admin, "PATCH", &bob_path, Some(json!({"role": "admin"})))
            .await
            .0,
        200
    );
    assert_eq!(q.rest("GET", &bob_path, None).await.0, 401);
    assert_eq!(q.rest_as(&alice, "DELETE", "/users/999999", None).await.0, 404);
}

#[tokio::test]
async fn a_stamped_owner_column_cannot_be_forged() {
    let q = Quill::start_secure().await;
    let (alice_id, alice) = q.user("alice@x.io", false).await;
    let (bob_id, bob) = q.user("bob@x.io", false).await;
    let (_, m) = q
        .rest_as(
            &alice,
            "POST",
            "/messages",
            Some(json!({"text": "x", "user_id": bob_id})),
        )
        .await;
    assert_eq!(m["user_id"], alice_id, "user_id is the caller's, whatever was sent");
    let path = format!("/messages/{}", m["id"]);
    let (status, _) = q.rest_as(&bob, "PATCH", &path, Some(json!({"text": "hijacked"}))).await;
    assert_eq!(status, 403);
    let (_, patched) = q
        .rest_as(&alice, "PATCH", &path, Some(json!({"text": "y", "user_id": bob_id})))
        .await;
    assert_eq!(patched["user_id"], alice_id, "a patch cannot move ownership");
}

#[tokio::test]
async fn demoting_an_admin_through_plain_sql_stops_admin_only_events_at_once() {
    let q = Quill::start_with(per_user_config()).await;
    let (admin_id, admin) = q.user("root@x.io", true).await;
    let (_, alice) = q.user("alice@x.io", false).await;
    let mut ws = q.ws().await;
    ws.login(&admin).await;
    ws.subscribe("messages").await;
    q.rest_as(&alice, "POST", "/messages", Some(json!({"text": "before"})))
        .await;
    assert_eq!(ws.next_event().await["data"]["text"], "before");
    let sql = q.sql().await;
    sqlx::query("UPDATE users SET role = 'user' WHERE id = $1")
        .bind(admin_id)
        .execute(&sql)
        .await
        .expect("demote");
    // Written after the demotion commits: it must not reach the former admin.
    sqlx::query("INSERT INTO messages (text, user_id) SELECT 'after', id FROM users WHERE email = 'alice@x.io'")
        .execute(&sql)
        .await
        .expect("insert");
    ws.expect_no_event(QUIET).await;
}

#[tokio::test]
async fn a_removed_user_is_logged_out_and_an_expired_token_logs_out_at_expiry() {
    let mut config = Config::demo();
    if let Some(auth) = &mut config.authentication {
        auth.expires_in_seconds = 2;
    }
    let q = Quill::start_with(config).await;
    let (id, token) = q.user("gone@x.io", false).await;
    let mut ws = q.ws().await;
    ws.login(&token).await;
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id)
        .execute(&q.sql().await)
        .await
        .expect("delete");
    let notice = ws.next_frame().await;
    assert_eq!(notice, json!({"event": "logout", "reason": "user removed"}));
    let reply = ws.call("find", "messages", json!({})).await;
    assert_eq!(reply["error"]["code"], 401, "logged out: {reply}");

    let (_, token) = q.user("short@x.io", false).await;
    let mut ws = q.ws().await;
    ws.login(&token).await;
    let notice = ws.next_frame().await;
    assert_eq!(notice, json!({"event": "logout", "reason": "token expired"}));
    assert_eq!(ws.call("find", "messages", json!({})).await["error"]["code"], 401);
}

#[tokio::test]
async fn a_subscription_query_narrows_events_with_find_operators() {
    let q = Quill::start_secure().await;
    let (alice_id, alice) = q.user("alice@x.io", false).await;
    let (_, bob) = q.user("bob@x.io", false).await;
    let mut ws = q.ws().await;
    ws.login(&alice).await;
    let reply = ws
        .call(
            "subscribe",
            "messages",
            json!({"query": {"user_id": alice_id, "text": {"$ne": "skip"}}}),
        )
        .await;
    assert!(reply.get("error").is_none(), "{reply}");
    q.rest_as(&bob, "POST", "/messages", Some(json!({"text": "bob's"})))
        .await;
    q.rest_as(&alice, "POST", "/messages", Some(json!({"text": "skip"})))
        .await;
    q.rest_as(&alice, "POST", "/messages", Some(json!({"text": "alice's"})))
        .await;
    assert_eq!(ws.next_event().await["data"]["text"], "alice's");
    ws.expect_no_event(QUIET).await;
    let bad = ws.call("subscribe", "users", json!({"query": {"password": "x"}})).await;
    assert_eq!(bad["error"]["name"], "BadRequest");
}

#[tokio::test]
async fn fields_visible_to_owner_and_admin_are_hidden_from_others_in_responses_and_events() {
    let mut config = Config::demo();
    if let Some(s) = config.services.get_mut("users") {
        s.visible_to
            .insert("email".into(), vec!["owner:id".into(), "role:admin".into()]);
    }
    let q = Quill::start_with(config).await;
    let (alice_id, alice) = q.user("alice@x.io", false).await;
    let (_, bob) = q.user("bob@x.io", false).await;
    let (_, admin) = q.user("root@x.io", true).await;
    let path = format!("/users/{alice_id}");
    assert_eq!(q.rest_as(&alice, "GET", &path, None).await.1["email"], "alice@x.io");
    assert_eq!(q.rest_as(&admin, "GET", &path, None).await.1["email"], "alice@x.io");
    assert!(q.rest_as(&bob, "GET", &path, None).await.1.get("email").is_none());
    let mut as_bob = q.ws().await;
    as_bob.login(&bob).await;
    as_bob.subscribe("users").await;
    let mut as_admin = q.ws().await;
    as_admin.login(&admin).await;
    as_admin.subscribe("users").await;
    q.rest_as(&alice, "PATCH", &path, Some(json!({"email": "alice2@x.io"})))
        .await;
    assert!(as_bob.next_event().await["data"].get("email").is_none());
    assert_eq!(as_admin.next_event().await["data"]["email"], "alice2@x.io");
}

#[tokio::test]
async fn unauthorized_calls_are_401_when_anonymous_and_403_when_not_allowed() {
    let mut config = Config::demo();
    if let Some(s) = config.services.get_mut("messages") {
        s.access = Some(quill::config::Access::All(quill::config::Rules::One(
            "role:admin".into(),
        )));
    }
    let q = Quill::start_with(config).await;
    let (_, user) = q.user("u@x.io", false).await;
    let (status, err) = q.rest("GET", "/messages", None).await;
    assert_eq!((status, err["name"].as_str()), (401, Some("NotAuthenticated")));
    let (status, err) = q.rest_as(&user, "POST", "/messages", Some(json!({"text": "x"}))).await;
    assert_eq!((status, err["name"].as_str()), (403, Some("Forbidden")));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&q.sql().await)
        .await
        .expect("count");
    assert_eq!(count, 0, "nothing written");
}

#[tokio::test]
async fn code_defined_publishers_and_filters_decide_delivery() {
    let extensions = Extensions::default()
        .publish("messages", |_: &ServiceEvent| vec!["authenticated".to_owned()])
        .filter("messages", |event: &ServiceEvent, user: Option<&Principal>| {
            // nobody sees messages that mention them by email
            user.is_none_or(|u| {
                !event.data["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains(u.user["email"].as_str().unwrap_or("?"))
            })
        });
    let db = crate::support::pg::TestDb::create().await;
    let q = Quill::start_on_with(db, Config::demo(), extensions).await;
    let (_, alice) = q.user("alice@x.io", false).await;
    let mut ws = q.ws().await;
    ws.login(&alice).await;
    ws.subscribe("messages").await;
    q.rest_as(&alice, "POST", "/messages", Some(json!({"text": "about alice@x.io"})))
        .await;
    q.rest_as(&alice, "POST", "/messages", Some(json!({"text": "about the weather"})))
        .await;
    assert_eq!(ws.next_event().await["data"]["text"], "about the weather");
    ws.expect_no_event(QUIET).await;
}
