//! The plain JSON WebSocket protocol: calls, refs, errors, malformed frames.

use serde_json::{Value, json};

use crate::support::Quill;

#[tokio::test]
async fn every_method_works_over_the_socket_with_refs_echoed() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    let created = ws.ok("create", "messages", json!({"data": {"text": "a"}})).await;
    let id = created["id"].clone();
    assert_eq!(ws.ok("get", "messages", json!({"id": id})).await, created);
    let page = ws
        .ok("find", "messages", json!({"query": {"text": "a", "$limit": 5}}))
        .await;
    assert_eq!(page["total"], 1);
    assert_eq!(
        ws.ok("update", "messages", json!({"id": id, "data": {"text": "b"}}))
            .await["text"],
        "b"
    );
    assert_eq!(
        ws.ok("patch", "messages", json!({"id": id, "data": {"text": "c"}}))
            .await["text"],
        "c"
    );
    assert_eq!(ws.ok("remove", "messages", json!({"id": id})).await["text"], "c");
    // string refs are echoed too
    ws.send_text(r#"{"ref": "abc", "method": "find", "service": "messages"}"#)
        .await;
    let reply = ws.reply_to(json!("abc")).await;
    assert_eq!(reply["result"]["total"], 0);
}

#[tokio::test]
async fn errors_are_feathers_errors_with_the_callers_ref() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    let reply = ws.call("get", "messages", json!({"id": 12345})).await;
    assert_eq!(reply["error"]["name"], "NotFound");
    assert_eq!(reply["error"]["code"], 404);
    let reply = ws.call("find", "nope", json!({})).await;
    assert_eq!(reply["error"]["message"], "Service 'nope' not found");
    let reply = ws.call("frobnicate", "messages", json!({})).await;
    assert_eq!(reply["error"]["name"], "BadRequest");
    let reply = ws.call("subscribe", "messages", json!({"kinds": ["exploded"]})).await;
    assert_eq!(reply["error"]["name"], "BadRequest");
    let reply = ws.call("find", "messages", json!({"query": {"bad column": 1}})).await;
    assert_eq!(reply["error"]["code"], 400);
}

#[tokio::test]
async fn malformed_frames_get_an_error_with_a_null_ref_and_the_socket_stays_open() {
    let q = Quill::start().await;
    let mut ws = q.ws().await;
    for bad in [
        "{not json",
        "[1,2,3]",
        "42",
        r#"{"ref": 1}"#,
        r#"{"ref": 2, "method": 5, "service": "messages"}"#,
    ] {
        ws.send_text(bad).await;
        let frame = ws.next_frame().await;
        assert_eq!(frame["error"]["name"], "BadRequest", "{bad}: {frame}");
        if !bad.contains("ref") {
            assert_eq!(frame["ref"], Value::Null);
        }
    }
    let page = ws.ok("find", "messages", json!({})).await;
    assert_eq!(page["total"], 0, "the connection still works");
}
