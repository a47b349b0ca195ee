//! The public surface under attack: sign-up, passwords, login limits behind proxies,
//! columns only some readers see, and writes of what the server owns.

use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
use serde_json::json;

use crate::support::{Quill, open_demo, pg};
use quill::Config;
use quill::config::RateLimit;

/// A user row's stored password.
async fn stored_password(q: &Quill, email: &str) -> Option<String> {
    sqlx::query_scalar("SELECT password FROM users WHERE email = $1")
        .bind(email)
        .fetch_one(&q.sql().await)
        .await
        .expect("stored password")
}

async fn login_status(q: &Quill, email: &str, password: &str, forwarded_for: Option<&str>) -> u16 {
    let mut request = q
        .http
        .post(q.url("/authentication"))
        .json(&json!({"strategy": "local", "email": email, "password": password}));
    if let Some(address) = forwarded_for {
        request = request.header("x-forwarded-for", address);
    }
    request.send().await.expect("login").status().as_u16()
}

fn with_rate_limit(mut config: Config, limits: RateLimit) -> Config {
    if let Some(auth) = &mut config.authentication {
        auth.rate_limit = limits;
    }
    config
}

#[tokio::test]
async fn a_sign_up_cannot_choose_its_id_and_the_next_sign_up_still_works() {
    let q = Quill::start_secure().await;
    let (status, body) = q
        .rest(
            "POST",
            "/users",
            Some(json!({"id": 2, "email": "squatter@x.io", "password": "pw-123456"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"]["id"], "set by the server", "{body}");
    q.signup("first@x.io", "pw-123456").await;
    let second = q.signup("second@x.io", "pw-123456").await;
    assert_eq!(second["id"], 2);
}

#[tokio::test]
async fn a_service_that_takes_client_ids_accepts_them() {
    let mut config = open_demo();
    if let Some(messages) = config.services.get_mut("messages") {
        messages.client_ids = Some(true);
    }
    let q = Quill::start_with(config).await;
    let (status, body) = q
        .rest("POST", "/messages", Some(json!({"id": 42, "text": "mine"})))
        .await;
    assert_eq!((status, &body["id"]), (201, &json!(42)), "{body}");
    // Without the opt-in the same request is refused.
    let q = Quill::start().await;
    let (status, body) = q
        .rest("POST", "/messages", Some(json!({"id": 42, "text": "mine"})))
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_password_is_always_hashed_by_quill_and_must_be_a_sane_string() {
    let q = Quill::start_secure().await;
    // The attacker's own hash, with a cost of their choosing: hashed like any password.
    let chosen = "$argon2id$v=19$m=262144,t=40,p=1$c2FsdHNhbHRzYWx0c2FsdA$0N6ee5gUMhYg7J3ZVBvJgGMRYBOfwi6NrQq8dydJs8Y";
    q.signup("hash@x.io", chosen).await;
    let stored = stored_password(&q, "hash@x.io").await.expect("a hash");
    assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{stored}");
    for bad in [
        json!(12345678),
        json!(""),
        json!(null),
        json!("x".repeat(1025)),
        json!({"$gt": ""}),
    ] {
        let (status, body) = q
            .rest("POST", "/users", Some(json!({"email": "n@x.io", "password": bad})))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE email = 'n@x.io'")
        .fetch_one(&q.sql().await)
        .await
        .expect("count");
    assert_eq!(none, 0, "nothing stored");
}

/// An argon2id hash made elsewhere (as an import through SQL would bring it).
fn foreign_hash(password: &str, time_cost: u32) -> String {
    let params = Params::new(1024, time_cost, 1, None).expect("params");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_with_salt(password.as_bytes(), b"imported-salt-16")
        .expect("hash")
        .to_string()
}

#[tokio::test]
async fn an_imported_hash_verifies_within_the_policy_and_a_costlier_one_is_refused_unrun() {
    let q = Quill::start_secure().await;
    let sql = q.sql().await;
    for (email, time_cost) in [("cheap@x.io", 3), ("costly@x.io", 9)] {
        sqlx::query("INSERT INTO users (email, password) VALUES ($1, $2)")
            .bind(email)
            .bind(foreign_hash("imported-pw", time_cost))
            .execute(&sql)
            .await
            .expect("import");
    }
    assert_eq!(login_status(&q, "cheap@x.io", "imported-pw", None).await, 201);
    // t=9 is over the default policy (8): refused, even with the right password.
    assert_eq!(login_status(&q, "costly@x.io", "imported-pw", None).await, 401);
}

#[tokio::test]
async fn correct_logins_do_not_count_against_the_limit_and_failed_ones_do() {
    let q = Quill::start_secure().await;
    q.signup("devices@x.io", "pw-123456").await;
    for attempt in 0..15 {
        assert_eq!(
            login_status(&q, "devices@x.io", "pw-123456", None).await,
            201,
            "login {attempt}"
        );
    }
    // Attempts that cannot succeed (no password) cost nothing and count for nothing.
    for _ in 0..20 {
        assert_eq!(login_status(&q, "devices@x.io", "", None).await, 401);
    }
    for _ in 0..10 {
        assert_eq!(login_status(&q, "devices@x.io", "wrong", None).await, 401);
    }
    assert_eq!(login_status(&q, "devices@x.io", "wrong", None).await, 429);
    assert_eq!(
        login_status(&q, "devices@x.io", "pw-123456", None).await,
        429,
        "locked for now"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_login_limit() {
    let limits = RateLimit {
        per_address: 3,
        per_username: 1000,
        ..RateLimit::default()
    };
    let mut config = with_rate_limit(Config::demo(), limits);
    config.trusted_proxies = vec!["127.0.0.0/8".into()];
    let q = Quill::start_with(config).await;
    for _ in 0..3 {
        assert_eq!(login_status(&q, "a@x.io", "wrong", Some("198.51.100.1")).await, 401);
    }
    assert_eq!(login_status(&q, "a@x.io", "wrong", Some("198.51.100.1")).await, 429);
    // Another client behind the same proxy is not locked out.
    assert_eq!(login_status(&q, "a@x.io", "wrong", Some("198.51.100.2")).await, 401);
    // A client cannot escape its limit by sending the header itself: the proxy appends.
    let spoofed = "203.0.113.77, 198.51.100.1";
    assert_eq!(login_status(&q, "a@x.io", "wrong", Some(spoofed)).await, 429);
}

#[tokio::test]
async fn without_trusted_proxies_forwarding_headers_are_ignored() {
    let limits = RateLimit {
        per_address: 3,
        per_username: 1000,
        ..RateLimit::default()
    };
    let q = Quill::start_with(with_rate_limit(Config::demo(), limits)).await;
    for i in 0..3 {
        let claimed = format!("198.51.100.{i}");
        assert_eq!(login_status(&q, "a@x.io", "wrong", Some(&claimed)).await, 401);
    }
    assert_eq!(login_status(&q, "a@x.io", "wrong", Some("198.51.100.99")).await, 429);
}

#[tokio::test]
async fn every_account_of_a_multi_create_counts_as_a_sign_up() {
    let limits = RateLimit {
        signups_per_address: 2,
        ..RateLimit::default()
    };
    let mut config = with_rate_limit(Config::demo(), limits);
    if let Some(users) = config.services.get_mut("users") {
        users.multi = quill::config::Multi::All(true);
    }
    let q = Quill::start_with(config).await;
    let accounts: Vec<_> = (0..3)
        .map(|i| json!({"email": format!("bulk{i}@x.io"), "password": "pw-123456"}))
        .collect();
    let (status, body) = q.rest("POST", "/users", Some(json!(accounts))).await;
    assert_eq!(status, 429, "{body}");
}

#[tokio::test]
async fn a_subscription_query_stops_matching_once_its_user_may_no_longer_filter_on_it() {
    let q = Quill::start_with(restricted_users()).await;
    let (_, admin) = q.user("boss@x.io", true).await;
    let mut ws = q.ws().await;
    ws.login(&admin).await;
    // `role` is visible to admins only: an admin may subscribe filtering on it.
    ws.ok("subscribe", "users", json!({"query": {"role": "user"}})).await;
    ws.subscribe("messages").await;
    q.signup("while-admin@x.io", "pw-123456").await;
    assert_eq!(ws.next_event().await["data"]["email"], "while-admin@x.io");
    // Demoted by plain SQL: the role filter must not tell it anything from now on.
    sqlx::query("UPDATE users SET role = 'user' WHERE email = 'boss@x.io'")
        .execute(&q.sql().await)
        .await
        .expect("demote");
    q.signup("after-demotion@x.io", "pw-123456").await;
    // Sentinel: a message, which it still receives.
    let token = q.login("after-demotion@x.io", "pw-123456").await;
    q.rest_as(&token, "POST", "/messages", Some(json!({"text": "sentinel"})))
        .await;
    loop {
        let event = ws.next_event().await;
        assert_ne!(
            event["service"], "users",
            "a users event matched a role filter after demotion: {event}"
        );
        if event["data"]["text"] == "sentinel" {
            break;
        }
    }
}

#[tokio::test]
async fn a_local_user_with_an_external_looking_id_is_nobody() {
    let db = pg::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    quill::gateway::migrate(&pool, true).await.expect("migrate");
    sqlx::raw_sql("CREATE TABLE accounts (id text PRIMARY KEY, email text UNIQUE NOT NULL, password text)")
        .execute(&pool)
        .await
        .expect("accounts");
    pool.close().await;
    let mut config: Config = toml::from_str(
        r#"
        [authentication]
        service = "accounts"
        [authentication.external]
        algorithm = "HS256"
        secret = "the identity provider's shared secret, 32 bytes+"
        audience = "my-app"
        issuer = "https://idp.example"
        [services.accounts]
        hidden = ["password"]
        publish = ["authenticated"]
        "#,
    )
    .expect("config");
    if let Some(auth) = &mut config.authentication {
        auth.rate_limit.signups_per_address = 100;
    }
    let q = Quill::start_on(db, config).await;
    // Text ids without a default: clients choose them. One in the external id space…
    let (status, body) = q
        .rest(
            "POST",
            "/accounts",
            Some(json!({"id": "ext:alice", "email": "a@x.io", "password": "pw-123456"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // …can never log in as that external user.
    assert_eq!(login_status(&q, "a@x.io", "pw-123456", None).await, 401);
    let (status, _) = q
        .rest(
            "POST",
            "/accounts",
            Some(json!({"id": "bob", "email": "b@x.io", "password": "pw-123456"})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(login_status(&q, "b@x.io", "pw-123456", None).await, 201);
}

#[tokio::test]
async fn sign_ups_are_limited_per_client_address() {
    let limits = RateLimit {
        signups_per_address: 2,
        ..RateLimit::default()
    };
    let q = Quill::start_with(with_rate_limit(Config::demo(), limits)).await;
    q.signup("one@x.io", "pw-123456").await;
    q.signup("two@x.io", "pw-123456").await;
    let (status, body) = q
        .rest(
            "POST",
            "/users",
            Some(json!({"email": "three@x.io", "password": "pw-123456"})),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    // A logged-in admin creating users is not a sign-up.
    sqlx::query("UPDATE users SET role = 'admin' WHERE email = 'one@x.io'")
        .execute(&q.sql().await)
        .await
        .expect("admin");
    let token = q.login("one@x.io", "pw-123456").await;
    let (status, body) = q
        .rest_as(
            &token,
            "POST",
            "/users",
            Some(json!({"email": "three@x.io", "password": "pw-123456"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// The demo with `email` visible to its owner and admins, `role` to admins only.
fn restricted_users() -> Config {
    let mut config = Config::demo();
    if let Some(users) = config.services.get_mut("users") {
        users
            .visible_to
            .insert("email".into(), vec!["owner:id".into(), "role:admin".into()]);
        users.visible_to.insert("role".into(), vec!["role:admin".into()]);
    }
    config
}

#[tokio::test]
async fn readers_cannot_filter_or_sort_on_columns_they_do_not_see_everywhere() {
    let q = Quill::start_with(restricted_users()).await;
    let (_, token) = q.user("plain@x.io", false).await;
    let (_, admin) = q.user("boss@x.io", true).await;
    for query in [
        "email[$gt]=m",
        "$sort[email]=1",
        "role=admin",
        "$or[0][email]=boss@x.io",
    ] {
        let (status, body) = q.rest_as(&token, "GET", &format!("/users?{query}"), None).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            !body.to_string().contains("email") && !body.to_string().contains("role"),
            "{body}"
        );
        let (status, body) = q.rest_as(&admin, "GET", &format!("/users?{query}"), None).await;
        assert_eq!(status, 200, "an admin sees them: {query}: {body}");
    }
    // The same holds for a subscription's query.
    let mut ws = q.ws().await;
    ws.login(&token).await;
    let reply = ws
        .call("subscribe", "users", json!({"query": {"email": {"$gt": "m"}}}))
        .await;
    assert_eq!(reply["error"]["code"], 400, "{reply}");
    // $select of such a column is allowed; it is stripped.
    let (status, body) = q.rest_as(&token, "GET", "/users?$select[]=role", None).await;
    assert_eq!(status, 200);
    assert!(
        body["data"]
            .as_array()
            .expect("rows")
            .iter()
            .all(|r| r.get("role").is_none()),
        "{body}"
    );
}

#[tokio::test]
async fn login_results_show_the_user_only_what_they_may_see_of_their_own_row() {
    let q = Quill::start_with(restricted_users()).await;
    q.signup("me@x.io", "pw-123456").await;
    let (status, auth) = q
        .rest(
            "POST",
            "/authentication",
            Some(json!({"strategy": "local", "email": "me@x.io", "password": "pw-123456"})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(auth["user"]["email"], "me@x.io", "their own email: owner:id");
    assert!(auth["user"].get("role").is_none(), "admin-only: {auth}");
    assert!(auth["user"].get("password").is_none());
}

async fn role_of(q: &Quill, id: i64) -> String {
    sqlx::query_scalar("SELECT role FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(&q.sql().await)
        .await
        .expect("role")
}

#[tokio::test]
async fn a_put_keeps_what_the_caller_may_not_write_and_the_password() {
    let q = Quill::start_secure().await;
    let (id, _) = q.user("vip@x.io", false).await;
    sqlx::query("UPDATE users SET role = 'vip' WHERE id = $1")
        .bind(id)
        .execute(&q.sql().await)
        .await
        .expect("vip");
    let token = q.login("vip@x.io", "pw-123456").await;
    let (status, body) = q
        .rest_as(
            &token,
            "PUT",
            &format!("/users/{id}"),
            Some(json!({"email": "vip2@x.io"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let role = role_of(&q, id).await;
    assert_eq!(role, "vip", "only admins write role: a PUT without it keeps it");
    assert_eq!(
        login_status(&q, "vip2@x.io", "pw-123456", None).await,
        201,
        "the password is kept"
    );
    // Naming it is still refused.
    let (status, _) = q
        .rest_as(
            &token,
            "PUT",
            &format!("/users/{id}"),
            Some(json!({"email": "vip2@x.io", "role": "admin"})),
        )
        .await;
    assert_eq!(status, 403);
    // An admin's PUT replaces it.
    let (_, admin) = q.user("root@x.io", true).await;
    let (status, body) = q
        .rest_as(
            &admin,
            "PUT",
            &format!("/users/{id}"),
            Some(json!({"email": "vip2@x.io"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let role = role_of(&q, id).await;
    assert_eq!(role, "user", "an admin's PUT resets it to its default");
}

#[tokio::test]
async fn a_stamp_survives_an_update_by_somebody_else() {
    let q = Quill::start_secure().await;
    let (author, token) = q.user("author@x.io", false).await;
    let (_, admin) = q.user("editor@x.io", true).await;
    let (_, message) = q
        .rest_as(&token, "POST", "/messages", Some(json!({"text": "mine"})))
        .await;
    let (status, body) = q
        .rest_as(
            &admin,
            "PUT",
            &format!("/messages/{}", message["id"]),
            Some(json!({"text": "edited"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], author, "still the author's: {body}");
}

#[tokio::test]
async fn a_unique_violation_never_names_a_hidden_column() {
    let db = pg::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    quill::gateway::migrate(&pool, true).await.expect("migrate");
    sqlx::raw_sql("ALTER TABLE users ADD COLUMN api_key text UNIQUE DEFAULT 'same-for-all'")
        .execute(&pool)
        .await
        .expect("alter");
    pool.close().await;
    let mut config = Config::demo();
    if let Some(users) = config.services.get_mut("users") {
        users.hidden.push("api_key".into());
    }
    let q = Quill::start_on(db, config).await;
    q.signup("first@x.io", "pw-123456").await;
    let (status, body) = q
        .rest(
            "POST",
            "/users",
            Some(json!({"email": "second@x.io", "password": "pw-123456"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.to_string().contains("api_key"), "{body}");
    // Nor can a client write it, or query it: it answers as a column that does not exist.
    let (status, body) = q
        .rest(
            "POST",
            "/users",
            Some(json!({"email": "third@x.io", "password": "pw-123456", "api_key": "mine"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"]["api_key"], "no such column", "{body}");
    let (_, unknown) = q
        .rest(
            "POST",
            "/users",
            Some(json!({"email": "third@x.io", "password": "pw-123456", "nothing": "x"})),
        )
        .await;
    assert_eq!(unknown["errors"]["nothing"], "no such column");
    let token = q.login("first@x.io", "pw-123456").await;
    let (status, body) = q.rest_as(&token, "GET", "/users?password[$gt]=a", None).await;
    assert_eq!(
        (status, &body["errors"]["password"]),
        (400, &json!("no such column")),
        "{body}"
    );
}

#[tokio::test]
async fn a_multi_remove_without_a_query_is_refused_unless_allowed() {
    let mut config = open_demo();
    let messages = config.services.get_mut("messages").expect("messages");
    messages.multi = quill::config::Multi::All(true);
    let q = Quill::start_with(config.clone()).await;
    q.rest("POST", "/messages", Some(json!({"text": "keep me"}))).await;
    let (status, body) = q.rest("DELETE", "/messages", None).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = q.rest("PATCH", "/messages", Some(json!({"text": "all"}))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = q.rest("DELETE", "/messages?text=keep%20me", None).await;
    assert_eq!((status, body.as_array().map(Vec::len)), (200, Some(1)), "{body}");
    if let Some(messages) = config.services.get_mut("messages") {
        messages.multi_all_rows = true;
    }
    let q = Quill::start_with(config).await;
    q.rest("POST", "/messages", Some(json!({"text": "x"}))).await;
    let (status, body) = q.rest("DELETE", "/messages", None).await;
    assert_eq!((status, body.as_array().map(Vec::len)), (200, Some(1)), "{body}");
}

#[tokio::test]
async fn an_unpaginated_find_is_still_bounded() {
    let mut config = open_demo();
    config.limits.max_find_rows = 3;
    if let Some(messages) = config.services.get_mut("messages") {
        messages.paginate = quill::config::Paginate::Enabled(false);
    }
    let q = Quill::start_with(config).await;
    crate::support::insert_messages(&q.sql().await, 0, 5).await;
    let (status, body) = q.rest("GET", "/messages", None).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().map(Vec::len), Some(3), "{body}");
    let (_, body) = q.rest("GET", "/messages?$limit=2", None).await;
    assert_eq!(body.as_array().map(Vec::len), Some(2), "{body}");
}

#[tokio::test]
async fn a_short_jwt_secret_is_refused_at_start_up() {
    let mut config = Config::demo();
    if let Some(auth) = &mut config.authentication {
        auth.jwt_secret = Some("too short".into());
    }
    let err = Quill::start_error(config).await;
    assert!(err.to_string().contains("at least 32"), "{err}");
}
