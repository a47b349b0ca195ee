//! REST queries: every operator, pagination, and injection attempts.

use serde_json::{Value, json};

use crate::support::Quill;

async fn seed(q: &Quill) {
    let mut config_ok = true;
    for text in ["apple", "banana", "cherry", "date", "elder"] {
        let (status, _) = q
            .rest("POST", "/messages", Some(json!({"text": text, "user_id": null})))
            .await;
        config_ok &= status == 201;
    }
    assert!(config_ok, "seeding failed");
}

async fn texts(q: &Quill, query: &str) -> Vec<String> {
    let (status, body) = q.rest("GET", &format!("/messages?{query}"), None).await;
    assert_eq!(status, 200, "{query}: {body}");
    let rows = body["data"].as_array().cloned().unwrap_or_default();
    rows.iter()
        .map(|r| r["text"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn every_operator_filters_as_in_feathers() {
    let q = Quill::start().await;
    seed(&q).await;
    let cases: &[(&str, &[&str])] = &[
        ("text=banana", &["banana"]),
        ("id=3", &["cherry"]),
        ("id[$lt]=3", &["apple", "banana"]),
        ("id[$lte]=2", &["apple", "banana"]),
        ("id[$gt]=3", &["date", "elder"]),
        ("id[$gte]=4", &["date", "elder"]),
        ("id[$ne]=1&id[$lt]=4", &["banana", "cherry"]),
        ("text[$in][0]=apple&text[$in][1]=date", &["apple", "date"]),
        ("text[$in][]=elder", &["elder"]),
        ("text[$nin][0]=apple&text[$nin][1]=banana", &["cherry", "date", "elder"]),
        ("$or[0][text]=apple&$or[1][id][$gt]=4", &["apple", "elder"]),
        ("$sort[id]=-1&$limit=2", &["elder", "date"]),
        ("$sort[text]=1&$skip=3", &["date", "elder"]),
        // $ne counts NULL as different (IS DISTINCT FROM), like the in-memory adapter
        ("user_id[$ne]=1", &["apple", "banana", "cherry", "date", "elder"]),
    ];
    for (query, expected) in cases {
        assert_eq!(texts(&q, query).await, *expected, "{query}");
    }
}

#[tokio::test]
async fn select_keeps_the_id_and_the_named_columns() {
    let q = Quill::start().await;
    seed(&q).await;
    let (_, body) = q.rest("GET", "/messages?$select[]=text&id=1", None).await;
    assert_eq!(body["data"], json!([{"id": 1, "text": "apple"}]));
}

#[tokio::test]
async fn pagination_reports_total_limit_and_skip_and_clamps_to_max() {
    let mut config = crate::support::open_demo();
    if let Some(s) = config.services.get_mut("messages") {
        s.paginate = quill::config::Paginate::Sizes { default: 2, max: 3 };
    }
    let q = Quill::start_with(config).await;
    seed(&q).await;
    let (_, page) = q.rest("GET", "/messages", None).await;
    assert_eq!(
        (page["total"].as_i64(), page["limit"].as_i64(), page["skip"].as_i64()),
        (Some(5), Some(2), Some(0))
    );
    assert_eq!(page["data"].as_array().map(Vec::len), Some(2));
    let (_, page) = q.rest("GET", "/messages?$limit=100&$skip=1", None).await;
    assert_eq!(page["limit"], 3);
    assert_eq!(page["data"].as_array().map(Vec::len), Some(3));
    let (_, page) = q.rest("GET", "/messages?$limit=0", None).await;
    assert_eq!(page, json!({"total": 5, "limit": 0, "skip": 0, "data": []}));
}

#[tokio::test]
async fn a_service_without_pagination_returns_a_plain_array() {
    let mut config = crate::support::open_demo();
    if let Some(s) = config.services.get_mut("messages") {
        s.paginate = quill::config::Paginate::Enabled(false);
    }
    let q = Quill::start_with(config).await;
    seed(&q).await;
    let (_, body) = q.rest("GET", "/messages?$limit=2", None).await;
    assert_eq!(body.as_array().map(Vec::len), Some(2), "{body}");
}

#[tokio::test]
async fn injection_attempts_are_rejected_with_400() {
    let q = Quill::start().await;
    seed(&q).await;
    let attacks = [
        "text%22%3B%20drop%20table%20messages%3B--=1",
        "text[$where]=1",
        "text[$regex]=.*",
        "$sort[text%3B%20drop%20table%20messages]=1",
        "$sort[text]=asc;drop",
        "$select[]=text%22%20from%20users--",
        "$or=1",
        "$limit=1;drop",
        "id[$in][0]=1)%20or%20(1=1",
    ];
    for attack in attacks {
        let (status, body) = q.rest("GET", &format!("/messages?{attack}"), None).await;
        assert_eq!(status, 400, "{attack}: {body}");
        assert_eq!(body["name"], "BadRequest");
    }
    // the value-side attack is just a value: it matches nothing and breaks nothing
    let (status, body) = q.rest("GET", "/messages?text=x%27%20or%20%271%27=%271", None).await;
    assert_eq!((status, body["total"].clone()), (200, Value::from(0)));
    let (_, page) = q.rest("GET", "/messages", None).await;
    assert_eq!(page["total"], 5, "the table is intact");
}
