//! Start-up: configuration errors name what is wrong; starting twice is harmless.

use serde_json::json;

use crate::support::Quill;
use quill::Config;

#[tokio::test]
async fn a_missing_table_or_column_fails_start_up_with_its_name() {
    let config = Config::from_toml("[services.ghosts]\ntable = \"nowhere\"").expect("valid toml");
    let err = Quill::start_error(config).await;
    assert!(err.to_string().contains("public.nowhere does not exist"), "{err}");

    let mut config = crate::support::open_demo();
    if let Some(s) = config.services.get_mut("users") {
        s.hidden.push("shoe_size".into());
    }
    let err = Quill::start_error(config).await;
    assert!(err.to_string().contains("no column 'shoe_size'"), "{err}");
}

#[tokio::test]
async fn tables_without_a_unique_single_column_id_are_refused_at_start_up_by_name() {
    let db = crate::support::pg::TestDb::create().await;
    let sql = sqlx::PgPool::connect(&db.url).await.expect("connect");
    sqlx::raw_sql(
        "CREATE TABLE keyless (id int, note text);
         CREATE TABLE pairs (a int, b int, note text, PRIMARY KEY (a, b));
         CREATE TABLE keyed (id int PRIMARY KEY, code int);
         CREATE TABLE coded (id int PRIMARY KEY, code int NOT NULL UNIQUE);",
    )
    .execute(&sql)
    .await
    .expect("tables");
    let refused = [
        (
            "[services.keyless]",
            "public.keyless cannot be served safely: it has no primary key",
        ),
        ("[services.pairs]\nid = \"a\"", "primary key (a, b) is composite"),
        ("[services.keyed]\nid = \"code\"", "id column 'code' is not unique"),
    ];
    for (toml, expected) in refused {
        let config = Config::from_toml(toml).expect("valid toml");
        let err = Quill::start_error_on(&db, config).await;
        assert!(err.to_string().contains(expected), "{err}");
    }
    // A unique NOT NULL column other than the primary key is a fine id.
    let config = Config::from_toml("[services.coded]\nid = \"code\"").expect("valid toml");
    let q = Quill::start_on(db, config).await;
    let (status, _) = q.rest("GET", "/coded", None).await;
    assert_eq!(status, 401, "served (and closed to anonymous callers by default)");
}

#[tokio::test]
async fn two_instances_on_one_database_both_deliver_every_change_once() {
    let a = Quill::start().await;
    let db = crate::support::pg::TestDb {
        name: String::new(),
        url: a.db.url.clone(),
    };
    let b = Quill::start_on(db, crate::support::open_demo()).await;
    let mut wa = a.ws().await;
    let mut wb = b.ws().await;
    wa.subscribe("messages").await;
    wb.subscribe("messages").await;
    q_create(&a, "via a").await;
    q_create(&b, "via b").await;
    let sql = a.sql().await;
    sqlx::query("INSERT INTO messages (text) VALUES ('via sql')")
        .execute(&sql)
        .await
        .expect("insert");
    for ws in [&mut wa, &mut wb] {
        let texts: Vec<String> = ws
            .events(3)
            .await
            .iter()
            .map(|e| e["data"]["text"].as_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(texts, ["via a", "via b", "via sql"]);
        ws.expect_no_event(std::time::Duration::from_millis(300)).await;
    }
    let triggers: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'quill_capture_%'")
        .fetch_one(&sql)
        .await
        .expect("count triggers");
    assert_eq!(triggers, 8, "four per table, not duplicated");
}

async fn q_create(q: &Quill, text: &str) {
    let (status, _) = q.rest("POST", "/messages", Some(json!({"text": text}))).await;
    assert_eq!(status, 201);
}
