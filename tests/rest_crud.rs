//! REST: every method, status codes and Feathers error JSON.

use serde_json::{Value, json};

use crate::support::Quill;

async fn user(q: &Quill, email: &str) -> Value {
    let (status, body) = q
        .rest(
            "POST",
            "/users",
            Some(json!({"email": email, "password": "secret", "role": "user"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body
}

#[tokio::test]
async fn create_answers_201_with_the_row_in_column_order() {
    let q = Quill::start().await;
    let (status, body) = q.rest("POST", "/messages", Some(json!({"text": "hello"}))).await;
    assert_eq!(status, 201);
    let keys: Vec<&String> = body.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["id", "text", "user_id", "created_at"]);
    assert_eq!(body["text"], "hello");
}

#[tokio::test]
async fn get_returns_the_row_and_404_for_missing_or_wrongly_typed_ids() {
    let q = Quill::start().await;
    let (_, created) = q.rest("POST", "/messages", Some(json!({"text": "a"}))).await;
    let id = created["id"].as_i64().expect("id");
    let (status, body) = q.rest("GET", &format!("/messages/{id}"), None).await;
    assert_eq!((status, &body), (200, &created));
    for missing in ["999999", "abc", "1.5", "99999999999999999999"] {
        let (status, body) = q.rest("GET", &format!("/messages/{missing}"), None).await;
        assert_eq!(status, 404, "{missing}: {body}");
        assert_eq!(body["name"], "NotFound");
        assert_eq!(body["className"], "not-found");
        assert_eq!(body["code"], 404);
    }
}

#[tokio::test]
async fn update_replaces_the_row_and_patch_merges() {
    let q = Quill::start().await;
    let u = user(&q, "a@x.io").await;
    let (_, m) = q
        .rest("POST", "/messages", Some(json!({"text": "one", "user_id": u["id"]})))
        .await;
    let id = m["id"].as_i64().expect("id");

    let (status, patched) = q
        .rest("PATCH", &format!("/messages/{id}"), Some(json!({"text": "two"})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["text"], "two");
    assert_eq!(patched["user_id"], u["id"], "patch keeps other columns");

    // PUT resets what it does not name: user_id to NULL, created_at to its default.
    let (status, updated) = q
        .rest("PUT", &format!("/messages/{id}"), Some(json!({"text": "three"})))
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["text"], "three");
    assert_eq!(updated["user_id"], Value::Null);
    assert_eq!(updated["id"], id, "the id never changes");

    let (status, _) = q.rest("PATCH", "/messages/424242", Some(json!({"text": "x"}))).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn remove_returns_the_removed_row() {
    let q = Quill::start().await;
    let (_, m) = q.rest("POST", "/messages", Some(json!({"text": "bye"}))).await;
    let path = format!("/messages/{}", m["id"]);
    let (status, removed) = q.rest("DELETE", &path, None).await;
    assert_eq!((status, &removed), (200, &m));
    let (status, _) = q.rest("GET", &path, None).await;
    assert_eq!(status, 404);
    let (status, _) = q.rest("DELETE", &path, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn multi_methods_are_405_unless_the_service_allows_them() {
    let q = Quill::start().await;
    let (status, body) = q
        .rest("POST", "/messages", Some(json!([{"text": "a"}, {"text": "b"}])))
        .await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["name"], "MethodNotAllowed");
    let (status, _) = q.rest("PATCH", "/messages?text=a", Some(json!({"text": "b"}))).await;
    assert_eq!(status, 405);
    let (status, _) = q.rest("DELETE", "/messages?text=a", None).await;
    assert_eq!(status, 405);
    let (count, _) = q.rest("GET", "/messages?$limit=0", None).await;
    assert_eq!(count, 200);
}

#[tokio::test]
async fn multi_create_patch_and_remove_work_when_enabled() {
    let mut config = crate::support::open_demo();
    if let Some(s) = config.services.get_mut("messages") {
        s.multi = quill::config::Multi::All(true);
    }
    let q = Quill::start_with(config).await;
    let (status, rows) = q
        .rest(
            "POST",
            "/messages",
            Some(json!([{"text": "a"}, {"text": "b"}, {"text": "c"}])),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(rows.as_array().map(Vec::len), Some(3));
    let (status, patched) = q
        .rest(
            "PATCH",
            "/messages?text[$in][]=a&text[$in][]=b",
            Some(json!({"text": "z"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched.as_array().map(Vec::len), Some(2));
    let (status, removed) = q.rest("DELETE", "/messages?text=z", None).await;
    assert_eq!(status, 200);
    assert_eq!(removed.as_array().map(Vec::len), Some(2));
    // one bad row rolls back the whole array
    let (status, _) = q
        .rest("POST", "/messages", Some(json!([{"text": "ok"}, {"text": null}])))
        .await;
    assert_eq!(status, 400);
    let (_, page) = q.rest("GET", "/messages", None).await;
    assert_eq!(page["total"], 1, "only 'c' is left: {page}");
}

#[tokio::test]
async fn constraint_violations_are_400_naming_the_field_without_sql() {
    let q = Quill::start().await;
    user(&q, "dup@x.io").await;
    let (status, body) = q
        .rest("POST", "/users", Some(json!({"email": "dup@x.io", "password": "p"})))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["name"], "BadRequest");
    assert_eq!(body["errors"]["email"], "already exists");
    let text = body.to_string().to_lowercase();
    assert!(
        !text.contains("insert") && !text.contains("select"),
        "no SQL in errors: {body}"
    );

    let (status, body) = q.rest("POST", "/messages", Some(json!({"user_id": 1}))).await;
    assert_eq!(status, 400, "not null: {body}");
    let (status, body) = q
        .rest("POST", "/messages", Some(json!({"text": "x", "user_id": "abc"})))
        .await;
    assert_eq!(status, 400, "bad type: {body}");
    let (status, body) = q
        .rest("POST", "/messages", Some(json!({"text": "x", "user_id": 999})))
        .await;
    assert_eq!(status, 400, "foreign key: {body}");
    let (status, body) = q.rest("POST", "/messages", Some(json!({"text": "x", "nope": 1}))).await;
    assert_eq!(status, 400, "unknown column: {body}");
    assert_eq!(body["errors"]["nope"], "no such column");
}

#[tokio::test]
async fn bad_bodies_unknown_services_and_paths_get_feathers_errors() {
    let q = Quill::start().await;
    let resp = q
        .http
        .post(q.url("/messages"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json error");
    assert_eq!(body["name"], "BadRequest");

    let (status, body) = q.rest("POST", "/messages", Some(json!("a string"))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = q.rest("GET", "/nope", None).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (404, Some("Service 'nope' not found"))
    );
    let (status, body) = q.rest("GET", "/a/b/c", None).await;
    assert_eq!((status, body["name"].as_str()), (404, Some("NotFound")));
}

#[tokio::test]
async fn hidden_fields_never_leave_the_server() {
    let q = Quill::start().await;
    let created = user(&q, "h@x.io").await;
    let id = &created["id"];
    let mut bodies = vec![created.clone()];
    for path in [
        format!("/users/{id}"),
        "/users".to_owned(),
        "/users?$select[]=password&$select[]=email".to_owned(),
        "/users?password=secret".to_owned(),
    ] {
        let resp = q.http.get(q.url(&path)).send().await.expect("sent");
        let raw = resp.text().await.expect("body");
        // Filtering on it answers as for a column that does not exist (its key echoed).
        let shown = raw
            .replace("'password': no such column", "")
            .replace(r#""password":"no such column""#, "");
        assert!(
            !shown.contains("password") && !shown.contains("secret"),
            "{path}: {raw}"
        );
        bodies.push(serde_json::from_str(&shown).unwrap_or(Value::Null));
    }
    let (_, patched) = q
        .rest("PATCH", &format!("/users/{id}"), Some(json!({"password": "other"})))
        .await;
    bodies.push(patched);
    for body in bodies {
        assert!(!body.to_string().contains("password"), "{body}");
    }
}
