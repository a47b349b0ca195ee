//! `/openapi.json`: the REST surface as OpenAPI, checked for what it must never show, and
//! the whole surface driven from it by schemathesis (no 500, every response as described,
//! and so no hidden column anywhere: row schemas allow no other property).

use serde_json::Value;

use crate::support::Quill;

async fn document(q: &Quill) -> Value {
    let response = q.http.get(q.url("/openapi.json")).send().await.expect("openapi.json");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON")
}

#[tokio::test]
async fn the_document_lists_every_service_and_never_a_hidden_or_server_owned_column() {
    let q = Quill::start_secure().await;
    let doc = document(&q).await;
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/messages",
        "/messages/{id}",
        "/users",
        "/users/{id}",
        "/authentication",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} in {}", doc["paths"]);
    }
    let schemas = &doc["components"]["schemas"];
    assert!(
        schemas["users"]["properties"].get("password").is_none(),
        "{}",
        schemas["users"]
    );
    assert_eq!(schemas["users"]["additionalProperties"], false);
    // Sign-up sends the password (write-only), never the id; messages never send user_id.
    assert_eq!(schemas["users_create"]["properties"]["password"]["writeOnly"], true);
    assert!(schemas["users_create"]["properties"].get("id").is_none());
    assert!(schemas["messages_create"]["properties"].get("user_id").is_none());
    assert_eq!(schemas["messages_create"]["required"], serde_json::json!(["text"]));
    // Sign-up is public; finding messages needs a token.
    assert_eq!(doc["paths"]["/users"]["post"]["security"][0], serde_json::json!({}));
    assert_eq!(
        doc["paths"]["/messages"]["get"]["security"],
        serde_json::json!([{"bearer": []}])
    );
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_off_the_document() {
    let q = Quill::start_secure().await;
    let (_, token) = q.user("fuzzer@x.io", false).await;
    // Async: quill runs on this test's runtime and must answer meanwhile.
    // Run from the temp directory: schemathesis keeps a cache where it runs.
    let out = tokio::process::Command::new("schemathesis")
        .current_dir(std::env::temp_dir())
        .args([
            "run",
            &q.url("/openapi.json"),
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--header",
            &format!("Authorization: Bearer {token}"),
            "--max-examples",
            "25",
            "--seed",
            "7",
            "--generation-deterministic",
            "--request-timeout",
            "10",
            "--phases",
            "examples,coverage,fuzzing",
            "--no-color",
        ])
        .output()
        .await;
    let out = match out {
        Ok(out) => out,
        Err(e) => panic!("cannot run schemathesis ({e}): `pip install schemathesis` (.ci/run does)"),
    };
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(out.status.success(), "schemathesis found problems:\n{report}");
}
