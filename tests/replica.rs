//! Snapshot subscribe and read-your-writes: the rows that match in one consistent read, then
//! `synced`, then live events, so that a copy kept from them is exactly the rows that match;
//! write replies carry their transaction id, and `sync` says when it has been delivered.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::support::{Quill, Rng, Ws, open_demo, seeds};

async fn sql(q: &Quill, statement: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&q.sql().await)
        .await
        .expect(statement);
}

/// A local copy of a service's rows, kept from snapshot frames and events.
#[derive(Default, Debug)]
struct Copy {
    rows: BTreeMap<i64, Value>,
    synced: Option<i64>,
    snapshot_frames: usize,
    reset: bool,
    /// Every frame applied, for the failure message.
    log: Vec<Value>,
}

impl Copy {
    /// Applies one frame (a snapshot page or an event) to the copy.
    fn apply(&mut self, frame: &Value) {
        let id = |row: &Value| row["id"].as_i64().expect("rows have ids");
        self.log.push(frame.clone());
        match frame["event"].as_str() {
            Some("snapshot") => {
                if frame["reset"] == true {
                    self.rows.clear();
                    self.reset = true;
                }
                self.snapshot_frames += 1;
                for row in frame["rows"].as_array().expect("rows") {
                    self.rows.insert(id(row), row.clone());
                }
            }
            Some("synced") => {
                if let Some(seq) = frame["seq"].as_i64() {
                    self.synced = Some(seq);
                }
            }
            // Each event must change the copy as it claims: a row created or moved in
            // is new to it, one edited or removed is in it. A change sent twice (in the
            // snapshot and again after it) or never fails here, not only at the end.
            Some("created" | "updated" | "patched") => {
                let row = id(&frame["data"]);
                let new = frame["event"] == "created" || frame["moved"] == "in";
                let had = self.rows.insert(row, frame["data"].clone());
                assert_eq!(
                    had.is_none(),
                    new,
                    "row {row}: {frame} (had {had:?})\n{}",
                    self.history(row)
                );
            }
            Some("removed") => {
                let row = id(&frame["data"]);
                assert!(
                    self.rows.remove(&row).is_some(),
                    "row {row} removed but not in the copy: {frame}\n{}",
                    self.history(row)
                );
            }
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
    }

    /// The frames that mentioned a row, one per line.
    fn history(&self, row: i64) -> String {
        let mentions = |f: &Value| {
            f["data"]["id"] == row
                || f["rows"]
                    .as_array()
                    .is_some_and(|rows| rows.iter().any(|r| r["id"] == row))
        };
        let lines: Vec<String> = self
            .log
            .iter()
            .filter(|f| mentions(f) || f["event"] == "synced")
            .map(|f| match f["event"].as_str() {
                Some("snapshot") => format!("snapshot page holding row {row}"),
                _ => f.to_string(),
            })
            .collect();
        lines.join("\n")
    }

    /// Reads frames until the snapshot's `synced`.
    async fn until_synced(&mut self, ws: &mut Ws) {
        while self.synced.is_none() {
            let frame = ws.next_event().await;
            self.apply(&frame);
        }
    }

    /// Reads frames until the `synced` mark of `txid`.
    async fn until_txid(&mut self, ws: &mut Ws, txid: &str) {
        loop {
            let frame = ws.next_event().await;
            if frame["event"] == "synced" && frame["txid"] == txid {
                return;
            }
            self.apply(&frame);
        }
    }
}

/// The rows of `messages` where `user_id = user`, as the database has them now.
async fn rows_of(q: &Quill, user: i64) -> BTreeMap<i64, Value> {
    let rows: Vec<sqlx::types::Json<Value>> =
        sqlx::query_scalar("SELECT row_to_json(m) FROM messages m WHERE user_id = $1")
            .bind(user)
            .fetch_all(&q.sql().await)
            .await
            .expect("rows");
    rows.into_iter()
        .map(|r| (r.0["id"].as_i64().expect("id"), r.0))
        .collect()
}

async fn users(q: &Quill, ids: &[i64]) {
    for id in ids {
        sql(q, &format!("INSERT INTO users (id, email) VALUES ({id}, 'u{id}@x')")).await;
    }
}

#[tokio::test]
async fn a_snapshot_subscribe_sends_the_matching_rows_then_synced_then_live_events() {
    let q = Quill::start().await;
    users(&q, &[5, 6]).await;
    sql(
        &q,
        "INSERT INTO messages (id, text, user_id) VALUES (1, 'a', 5), (2, 'b', 6), (3, 'c', 5)",
    )
    .await;
    let mut ws = q.ws().await;
    let reply = ws
        .ok(
            "subscribe",
            "messages",
            json!({"query": {"user_id": 5}, "snapshot": true}),
        )
        .await;
    assert_eq!(reply, json!({"subscribed": "messages", "snapshot": true}));
    let snapshot = ws.next_event().await;
    assert_eq!(snapshot["event"], "snapshot");
    assert_eq!(snapshot["service"], "messages");
    assert!(
        snapshot.get("reset").is_none(),
        "a first snapshot is no reset: {snapshot}"
    );
    let ids: Vec<&Value> = snapshot["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| &r["id"])
        .collect();
    assert_eq!(ids, [&json!(1), &json!(3)], "the matching rows, in id order");
    let synced = ws.next_event().await;
    assert_eq!(synced["event"], "synced", "{synced}");
    let seq = synced["seq"].as_i64().expect("synced has a seq");
    assert!(seq > 0, "the seq of the last change the snapshot holds: {synced}");
    sql(&q, "INSERT INTO messages (id, text, user_id) VALUES (4, 'd', 5)").await;
    let live = ws.next_event().await;
    assert_eq!(
        (live["event"].as_str(), &live["data"]["id"]),
        (Some("created"), &json!(4))
    );

    // Seqs are resume positions: a snapshot subscribe from the last one received gets what
    // came after it (and a synced), no rows again.
    let seq = live["seq"].as_i64().expect("seq");
    sql(&q, "UPDATE messages SET text = 'a2' WHERE id = 1").await;
    let mut again = q.ws().await;
    let reply = again
        .ok(
            "subscribe",
            "messages",
            json!({"query": {"user_id": 5}, "snapshot": true, "since": seq}),
        )
        .await;
    assert_eq!(reply, json!({"subscribed": "messages", "since": seq}));
    // The copy as the first client kept it.
    let mut copy = Copy::default();
    for frame in [&snapshot, &synced, &live] {
        copy.apply(frame);
    }
    copy.synced = None;
    copy.until_synced(&mut again).await;
    assert_eq!(copy.snapshot_frames, 1, "a resumable position sends no snapshot");
    let missed: Vec<&Value> = copy.log[3..].iter().map(|f| &f["event"]).collect();
    assert_eq!(
        missed,
        [&json!("patched"), &json!("synced")],
        "exactly the missed changes"
    );
    assert_eq!(copy.rows, rows_of(&q, 5).await);
}

#[tokio::test]
async fn a_big_snapshot_comes_in_pages_and_an_empty_one_in_one_frame() {
    let q = Quill::start().await;
    users(&q, &[5]).await;
    sql(
        &q,
        "INSERT INTO messages (text, user_id) SELECT 'row ' || g, 5 FROM generate_series(1, 1234) g",
    )
    .await;
    let mut ws = q.ws().await;
    ws.ok("subscribe", "messages", json!({"snapshot": true})).await;
    let mut copy = Copy::default();
    let mut sizes = Vec::new();
    while copy.synced.is_none() {
        let frame = ws.next_event().await;
        if frame["event"] == "snapshot" {
            sizes.push(frame["rows"].as_array().map_or(0, Vec::len));
        }
        copy.apply(&frame);
    }
    assert_eq!(sizes, [500, 500, 234], "bounded pages");
    assert_eq!(copy.rows, rows_of(&q, 5).await);

    let mut empty = q.ws().await;
    empty
        .ok(
            "subscribe",
            "messages",
            json!({"query": {"user_id": 99}, "snapshot": true}),
        )
        .await;
    let frame = empty.next_event().await;
    assert_eq!(frame, json!({"event": "snapshot", "service": "messages", "rows": []}));
    assert_eq!(empty.next_event().await["event"], "synced");
}

#[tokio::test]
async fn a_position_past_what_may_be_replayed_gets_a_fresh_snapshot_marked_reset() {
    let mut config = open_demo();
    config.limits.max_replay_changes = 2;
    let q = Quill::start_with(config).await;
    users(&q, &[5]).await;
    let mut ws = q.ws().await;
    ws.ok("subscribe", "messages", json!({"snapshot": true})).await;
    let mut copy = Copy::default();
    copy.until_synced(&mut ws).await;
    let since = copy.synced.expect("synced");
    sql(
        &q,
        "INSERT INTO messages (text, user_id) SELECT 'row ' || g, 5 FROM generate_series(1, 5) g",
    )
    .await;
    for _ in 0..5 {
        copy.apply(&ws.next_event().await);
    }
    let mut again = q.ws().await;
    let reply = again
        .ok("subscribe", "messages", json!({"snapshot": true, "since": since}))
        .await;
    assert_eq!(reply, json!({"subscribed": "messages", "snapshot": true}));
    let mut fresh = Copy::default();
    // What the client had must go: a copy with a stale row proves the reset clears it.
    fresh.rows.insert(-1, json!({"id": -1}));
    fresh.until_synced(&mut again).await;
    assert!(fresh.reset, "the first frame says reset");
    assert_eq!(fresh.rows, rows_of(&q, 5).await);

    // A seq quill never gave is a client error, not a snapshot.
    let mut wrong = q.ws().await;
    let reply = wrong
        .call("subscribe", "messages", json!({"snapshot": true, "since": 1_000_000}))
        .await;
    assert_eq!(reply["error"]["code"], 400, "{reply}");
    let reply = wrong.call("subscribe", "messages", json!({"snapshot": "yes"})).await;
    assert_eq!(reply["error"]["code"], 400, "{reply}");
}

#[tokio::test]
async fn a_snapshot_holds_only_what_the_reader_may_see_and_needs_find_access() {
    let mut config = open_demo();
    if let Some(messages) = config.services.get_mut("messages") {
        messages.publish = Some(vec!["users/{user_id}".into()]);
        messages.access = Some(quill::config::Access::All(quill::config::Rules::One(
            "authenticated".into(),
        )));
    }
    let q = Quill::start_with(config).await;
    let (five, five_token) = q.user("five@x.io", false).await;
    let (six, _) = q.user("six@x.io", false).await;
    sql(
        &q,
        &format!("INSERT INTO messages (id, text, user_id) VALUES (1, 'mine', {five}), (2, 'theirs', {six})"),
    )
    .await;
    // Anonymous: find is for the authenticated, so no rows at all.
    let mut anonymous = q.ws().await;
    let reply = anonymous.call("subscribe", "messages", json!({"snapshot": true})).await;
    assert_eq!(reply["error"]["code"], 401, "{reply}");

    let mut ws = q.ws().await;
    ws.login(&five_token).await;
    ws.ok("subscribe", "messages", json!({"snapshot": true})).await;
    let mut copy = Copy::default();
    copy.until_synced(&mut ws).await;
    assert_eq!(
        copy.rows.keys().collect::<Vec<_>>(),
        [&1],
        "only the reader's channel's rows"
    );

    // Hidden fields never leave: the users' snapshot has no password.
    let mut users_ws = q.ws().await;
    users_ws.login(&five_token).await;
    users_ws.ok("subscribe", "users", json!({"snapshot": true})).await;
    let frame = users_ws.next_event().await;
    let rows = frame["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{frame}");
    assert!(rows.iter().all(|r| r.get("password").is_none()), "{frame}");
}

#[tokio::test]
async fn write_replies_carry_the_txid_and_sync_marks_when_it_was_delivered() {
    let q = Quill::start().await;
    users(&q, &[5, 6]).await;
    let mut ws = q.ws().await;
    ws.ok(
        "subscribe",
        "messages",
        json!({"query": {"user_id": 5}, "snapshot": true}),
    )
    .await;
    let mut copy = Copy::default();
    copy.until_synced(&mut ws).await;

    // In scope: after the mark, the copy has the row.
    let reply = ws
        .call("create", "messages", json!({"data": {"text": "mine", "user_id": 5}}))
        .await;
    let txid = reply["txid"].as_str().expect("a write reply has a txid").to_owned();
    let sync = ws.call("sync", "messages", json!({"txid": txid})).await;
    assert_eq!(sync["result"], json!({"synced": "messages", "txid": txid}), "{sync}");
    copy.until_txid(&mut ws, &txid).await;
    assert_eq!(copy.rows, rows_of(&q, 5).await);

    // Out of scope: nothing arrives, and the mark still does.
    let reply = ws
        .call("create", "messages", json!({"data": {"text": "theirs", "user_id": 6}}))
        .await;
    let txid = reply["txid"].as_str().expect("txid").to_owned();
    ws.ok("sync", "messages", json!({"txid": txid})).await;
    copy.until_txid(&mut ws, &txid).await;
    assert_eq!(copy.rows, rows_of(&q, 5).await);

    // REST writes say it in a header.
    let resp = q
        .http
        .post(q.url("/messages"))
        .json(&json!({"text": "rest", "user_id": 5}))
        .send()
        .await
        .expect("post");
    let header = resp
        .headers()
        .get("x-quill-txid")
        .expect("txid header")
        .to_str()
        .expect("text")
        .to_owned();
    ws.ok("sync", "messages", json!({"txid": header})).await;
    copy.until_txid(&mut ws, &header).await;
    assert_eq!(copy.rows, rows_of(&q, 5).await);

    // Reads have none; bad and future txids and unsubscribed services are client errors.
    let reply = ws.call("find", "messages", json!({})).await;
    assert!(reply.get("txid").is_none(), "{reply}");
    for bad in [json!("x"), json!(-1), json!(null)] {
        let reply = ws.call("sync", "messages", json!({"txid": bad})).await;
        assert_eq!(reply["error"]["code"], 400, "{reply}");
    }
    let reply = ws.call("sync", "messages", json!({"txid": "99999999999"})).await;
    assert_eq!(reply["error"]["code"], 400, "{reply}");
    let reply = ws.call("sync", "users", json!({"txid": txid})).await;
    assert_eq!(reply["error"]["code"], 400, "{reply}");
}

/// One random write: through quill (REST) or plain SQL, inserting, editing, moving rows
/// between users 5 and 6 (in and out of the readers' scope), deleting, several at once.
async fn random_write(q: &Quill, pool: &sqlx::PgPool, rng: &mut Rng) {
    let id = 1 + rng.below(60) as i64;
    let user = 5 + rng.below(2) as i64;
    match rng.below(8) {
        0 => {
            q.rest("POST", "/messages", Some(json!({"text": "rest", "user_id": user})))
                .await;
        }
        1 => {
            q.rest(
                "PATCH",
                &format!("/messages/{id}"),
                Some(json!({"user_id": user, "text": "moved"})),
            )
            .await;
        }
        2 => {
            q.rest("DELETE", &format!("/messages/{id}"), None).await;
        }
        3 => {
            let statement = format!(
                "INSERT INTO messages (id, text, user_id) VALUES ({id}, 'sql', {user}) ON CONFLICT (id) DO UPDATE SET text = 'upsert'"
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(pool)
                .await
                .expect("insert");
        }
        4 => {
            // Many rows change scope in one statement.
            let statement = format!(
                "UPDATE messages SET user_id = 11 - user_id WHERE id % 7 = {}",
                rng.below(7)
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(pool)
                .await
                .expect("swap");
        }
        5 => {
            let statement = format!("DELETE FROM messages WHERE id = {id}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(pool)
                .await
                .expect("delete");
        }
        6 => {
            // One transaction, several kinds.
            let statement = format!(
                "BEGIN; UPDATE messages SET text = 'tx' WHERE id = {id}; \
                 INSERT INTO messages (text, user_id) VALUES ('tx', {user}); \
                 UPDATE messages SET user_id = {user} WHERE id = {other}; COMMIT",
                other = 1 + rng.below(60)
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(pool)
                .await
                .expect("transaction");
        }
        _ => {
            let statement = format!("UPDATE messages SET text = 'edit' WHERE id = {id}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(pool)
                .await
                .expect("edit");
        }
    }
}

/// A reader that starts its snapshot subscribe once the writers are `after` writes in, and
/// keeps its copy until it is given the txid to sync to; returns the copy at that mark.
async fn reader(
    q: &Quill,
    mut progress: tokio::sync::watch::Receiver<u64>,
    after: u64,
    mut done: tokio::sync::oneshot::Receiver<String>,
) -> Copy {
    let _ = progress.wait_for(|n| *n >= after).await;
    let mut ws = q.ws().await;
    let reply = ws
        .call(
            "subscribe",
            "messages",
            json!({"query": {"user_id": 5}, "snapshot": true}),
        )
        .await;
    assert!(reply.get("error").is_none(), "{reply}");
    let mut copy = Copy::default();
    let txid = loop {
        tokio::select! {
            txid = &mut done => break txid.expect("the test sends the final txid"),
            frame = ws.next_event() => copy.apply(&frame),
        }
    };
    ws.ok("sync", "messages", json!({"txid": txid})).await;
    copy.until_txid(&mut ws, &txid).await;
    copy
}

#[tokio::test]
async fn snapshots_started_under_concurrent_writes_and_moves_equal_the_database_at_quiescence() {
    for seed in seeds("QUILL_REPLICA_SEED", 2) {
        println!("replica test seed {seed} (replay: QUILL_REPLICA_SEED={seed})");
        let mut rng = Rng(seed);
        let q = Quill::start().await;
        users(&q, &[5, 6]).await;
        sql(
            &q,
            "INSERT INTO messages (id, text, user_id) SELECT g, 'start', 5 + g % 2 FROM generate_series(1, 40) g",
        )
        .await;
        sql(&q, "SELECT setval(pg_get_serial_sequence('messages', 'id'), 1000)").await;
        let (progress_tx, progress) = tokio::sync::watch::channel(0u64);
        const WRITES: u64 = 240;
        let mut readers = Vec::new();
        let mut finals = Vec::new();
        for i in 0..6 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            finals.push(tx);
            let after = i * WRITES / 6 + rng.below(WRITES / 6);
            readers.push(reader(&q, progress.clone(), after, rx));
        }
        let writers = async {
            let pool = q.sql().await;
            let mut streams: Vec<Rng> = (0..3).map(|_| Rng(rng.next())).collect();
            let mut written = 0;
            while written < WRITES {
                // Three writers at once, each its own seeded stream.
                let [a, b, c] = &mut streams[..] else { unreachable!() };
                tokio::join!(
                    random_write(&q, &pool, a),
                    random_write(&q, &pool, b),
                    random_write(&q, &pool, c)
                );
                written += 3;
                let _ = progress_tx.send(written);
            }
            // The last write; every reader syncs to it.
            let resp = q
                .http
                .post(q.url("/messages"))
                .json(&json!({"text": "last", "user_id": 5}))
                .send()
                .await
                .expect("post");
            let txid = resp.headers()["x-quill-txid"].to_str().expect("txid").to_owned();
            for tx in finals {
                let _ = tx.send(txid.clone());
            }
        };
        let (copies, ()) = tokio::join!(futures::future::join_all(readers), writers);
        let expected = rows_of(&q, 5).await;
        for (i, copy) in copies.iter().enumerate() {
            assert!(copy.synced.is_some(), "seed {seed}: reader {i} never synced");
            assert_eq!(
                copy.rows, expected,
                "seed {seed}: reader {i}'s copy differs from the database"
            );
        }
    }
}

#[tokio::test]
async fn a_reader_who_may_find_only_its_own_rows_must_pin_its_snapshot_to_them() {
    let mut config = open_demo();
    if let Some(messages) = config.services.get_mut("messages") {
        messages.access = Some(quill::config::Access::PerMethod(quill::config::MethodRules {
            find: Some(quill::config::Rules::One("owner:user_id".into())),
            ..Default::default()
        }));
    }
    let q = Quill::start_with(config).await;
    let (five, token) = q.user("five@x.io", false).await;
    let (six, _) = q.user("six@x.io", false).await;
    sql(
        &q,
        &format!("INSERT INTO messages (id, text, user_id) VALUES (1, 'mine', {five}), (2, 'theirs', {six})"),
    )
    .await;
    let mut ws = q.ws().await;
    ws.login(&token).await;
    // Every row the channels reach would include others' rows: refused, saying what to do.
    for query in [json!(null), json!({"user_id": six})] {
        let reply = ws
            .call("subscribe", "messages", json!({"query": query, "snapshot": true}))
            .await;
        assert_eq!(reply["error"]["code"], 403, "{reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("user_id")),
            "{reply}"
        );
    }
    ws.ok(
        "subscribe",
        "messages",
        json!({"query": {"user_id": five}, "snapshot": true}),
    )
    .await;
    let mut copy = Copy::default();
    copy.until_synced(&mut ws).await;
    assert_eq!(copy.rows.keys().collect::<Vec<_>>(), [&1]);
}

#[tokio::test]
async fn a_sync_waits_for_a_running_transaction_and_ends_when_the_subscription_does() {
    let q = Quill::start().await;
    users(&q, &[5]).await;
    let mut ws = q.ws().await;
    ws.ok("subscribe", "messages", json!({})).await;
    // A transaction left open: its changes are not visible yet, so its sync waits.
    let mut open = q.sql().await.begin().await.expect("begin");
    let txid: String = sqlx::query_scalar(
        "WITH w AS (INSERT INTO messages (text, user_id) VALUES ('pending', 5)) SELECT pg_current_xact_id()::text",
    )
    .fetch_one(&mut *open)
    .await
    .expect("write in an open transaction");
    ws.send_text(&json!({"ref": "s", "method": "sync", "service": "messages", "txid": txid}).to_string())
        .await;
    // A later call is answered while the sync waits (it is not a timeout that ends it).
    ws.send_text(&json!({"ref": "f", "method": "find", "service": "messages"}).to_string())
        .await;
    let found = ws.next_frame().await;
    assert_eq!(found["ref"], "f", "the find is answered first: {found}");
    // Then the unsubscribe ends the wait at once.
    ws.send_text(&json!({"ref": "u", "method": "unsubscribe", "service": "messages"}).to_string())
        .await;
    let mut replies = BTreeMap::new();
    while replies.len() < 2 {
        let frame = ws.next_frame().await;
        replies.insert(frame["ref"].as_str().unwrap_or_default().to_owned(), frame);
    }
    let reply = &replies["s"];
    assert_eq!(reply["error"]["code"], 400, "not a timeout: {reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not subscribed")),
        "{reply}"
    );
    open.rollback().await.expect("rollback");
}
