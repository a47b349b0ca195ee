//! A randomized model test of the delivery promise. Concurrent transactions (committed and
//! rolled back, multi-row statements, a row updated twice) interleave with killed database
//! sessions, quill restarts and clients that disconnect and resume. Oracle: each client's
//! events equal the commit-order projection of what the test committed, through that
//! client's filter, with no gap and no duplicate.
//!
//! Seeded: a failure prints its seed; `QUILL_MODEL_SEED=<seed> cargo test model` replays it.
//! Within one tick quill orders changes by seq, not commit (documented), so the oracle
//! checks: exactly the committed events, each row's changes in commit order, and the whole
//! sequence in the log's tick order.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, Row};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Quill, Rng, WAIT, open_demo, pg::TestDb, seeds};

/// One change as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ev {
    kind: String,
    id: i64,
    text: String,
    user_id: i64,
    /// For a committed update: the row's user before it (the oracle's scope moves).
    /// Never set on what a client received.
    old_user_id: Option<i64>,
}

/// What one statement changed: its events follow commit order, in any order among
/// themselves only when the statement touched several rows.
type Group = Vec<Ev>;

/// What client `client` receives of a committed change, if anything: its query's scope,
/// with an update that moves a row out of it announced as `removed` with the id only.
fn project(client: usize, ev: &Ev) -> Option<Ev> {
    let in_scope = |user: i64| match client {
        1 => user == 1,
        2 => user == 2 || user == 3,
        _ => true,
    };
    let received = || Ev {
        old_user_id: None,
        ..ev.clone()
    };
    match (client, ev.kind.as_str(), ev.old_user_id) {
        (3, "patched", _) => None,
        (1 | 2, "patched", Some(old)) => match (in_scope(old), in_scope(ev.user_id)) {
            (_, true) => Some(received()),
            (true, false) => Some(Ev {
                kind: "removed".into(),
                id: ev.id,
                text: String::new(),
                user_id: 0,
                old_user_id: None,
            }),
            (false, false) => None,
        },
        _ => in_scope(ev.user_id).then(received),
    }
}

fn subscribe_request(client: usize, since: Option<i64>) -> Value {
    let mut request = json!({"ref": 1, "method": "subscribe", "service": "messages"});
    match client {
        1 => request["query"] = json!({"user_id": 1}),
        2 => request["query"] = json!({"user_id": {"$in": [2, 3]}}),
        3 => request["kinds"] = json!(["created", "removed"]),
        _ => {}
    }
    if let Some(since) = since {
        request["since"] = json!(since);
    }
    request
}

const CLIENTS: usize = 4;

/// A client: the events it processed (with seqs) and the task reading its socket.
struct Client {
    seen: Arc<Mutex<Vec<(i64, Ev)>>>,
    reader: Option<JoinHandle<()>>,
}

impl Client {
    fn last_seq(&self) -> Option<i64> {
        self.seen.lock().expect("seen").last().map(|(s, _)| *s)
    }

    fn connected(&self) -> bool {
        self.reader.as_ref().is_some_and(|r| !r.is_finished())
    }

    /// Connects (resuming after its last event if it has one) and reads in the background
    /// until the socket closes. A 503 (a database session of quill's was just killed) is
    /// retried, as a client would.
    async fn connect(&mut self, q: &Quill, client: usize) {
        for _ in 0..20 {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", q.addr))
                .await
                .expect("connect");
            let request = subscribe_request(client, self.last_seq());
            futures::SinkExt::send(&mut ws, Message::text(request.to_string()))
                .await
                .expect("subscribe");
            // The reply first: the subscription is live once it is here.
            let reply = loop {
                let frame = next_text(&mut ws).await.expect("subscribe reply");
                if frame.get("ref").is_some() {
                    break frame;
                }
                record(&self.seen, &frame);
            };
            if reply["error"]["code"] == 503 {
                continue;
            }
            assert!(reply.get("result").is_some(), "subscribe failed: {reply}");
            let seen = self.seen.clone();
            self.reader = Some(tokio::spawn(async move {
                while let Some(frame) = next_text(&mut ws).await {
                    record(&seen, &frame);
                }
            }));
            return;
        }
        panic!("subscribe kept failing with 503");
    }

    fn disconnect(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

async fn next_text(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn record(seen: &Mutex<Vec<(i64, Ev)>>, frame: &Value) {
    if frame.get("event").is_none() {
        return;
    }
    let seq = frame["seq"].as_i64().expect("seq");
    let data = &frame["data"];
    let ev = Ev {
        kind: frame["event"].as_str().unwrap_or("").to_owned(),
        id: data["id"].as_i64().unwrap_or(-1),
        text: data["text"].as_str().unwrap_or("").to_owned(),
        user_id: data["user_id"].as_i64().unwrap_or(0),
        old_user_id: None,
    };
    seen.lock().expect("seen").push((seq, ev));
}

/// One open transaction on its own session; it touches only rows with `id % SLOTS == slot`,
/// so concurrent transactions never wait on each other's row locks.
const SLOTS: i64 = 3;

struct Slot {
    conn: PgConnection,
    open: Option<(u64, Vec<Group>)>,
    statements: u64,
}

fn evs(kind: &str, rows: &[sqlx::postgres::PgRow]) -> Group {
    rows.iter()
        .map(|r| Ev {
            kind: kind.to_owned(),
            id: r.get("id"),
            text: r.get("text"),
            user_id: r.get::<Option<i64>, _>("user_id").unwrap_or(0),
            old_user_id: r.try_get::<Option<i64>, _>("old_user_id").ok().flatten(),
        })
        .collect()
}

/// Runs one random statement in an open slot and notes what it changed.
async fn statement(rng: &mut Rng, slot: usize, s: &mut Slot) {
    let Some((tx, groups)) = &mut s.open else { return };
    s.statements += 1;
    let text = format!("t{tx}s{}", s.statements);
    let user = 1 + rng.below(3) as i64;
    let part = slot as i64;
    let (kind, sql, n): (&str, &str, i64) = match rng.below(6) {
        0 => (
            "created",
            "INSERT INTO messages (text, user_id) SELECT $1, $2 WHERE $3::bigint >= 0 RETURNING id, text, user_id",
            0,
        ),
        1 => (
            "created",
            "INSERT INTO messages (text, user_id) SELECT $1, $2 FROM generate_series(1, $4::int) WHERE $3::bigint >= 0 RETURNING id, text, user_id",
            2 + rng.below(4) as i64,
        ),
        2 | 3 => (
            "patched",
            // One row of the slot's part, sometimes moved to another user.
            "WITH target AS (SELECT id, user_id AS old_user_id FROM messages WHERE id % 3 = $3 ORDER BY random() LIMIT 1 FOR UPDATE)
             UPDATE messages m SET text = $1, user_id = $2 FROM target WHERE m.id = target.id
             RETURNING m.id, m.text, m.user_id, target.old_user_id",
            0,
        ),
        4 => (
            "patched",
            "UPDATE messages SET text = $1 WHERE id % 3 = $3 AND id % 2 = $4 AND $2::bigint > 0 RETURNING id, text, user_id, user_id AS old_user_id",
            rng.below(2) as i64,
        ),
        _ => (
            "removed",
            "DELETE FROM messages WHERE id = (SELECT id FROM messages WHERE id % 3 = $3 ORDER BY random() LIMIT 1) AND $1::text IS NOT NULL AND $2::bigint > 0 RETURNING id, text, user_id",
            0,
        ),
    };
    let mut query = sqlx::query(sql).bind(&text).bind(user).bind(part);
    if sql.contains("$4") {
        query = query.bind(n);
    }
    let rows = query.fetch_all(&mut s.conn).await.expect("statement");
    let group = evs(kind, &rows);
    // The same row updated again in the same transaction: two events, in order.
    if kind == "patched" && group.len() == 1 && rng.chance(30) {
        s.statements += 1;
        let again = format!("t{tx}s{}", s.statements);
        let rows = sqlx::query(
            "UPDATE messages SET text = $1 WHERE id = $2 RETURNING id, text, user_id, user_id AS old_user_id",
        )
        .bind(&again)
        .bind(group[0].id)
        .fetch_all(&mut s.conn)
        .await
        .expect("second update");
        groups.push(group);
        groups.push(evs("patched", &rows));
        return;
    }
    if !group.is_empty() {
        groups.push(group);
    }
}

async fn run_model(seed: u64) {
    println!("model test seed {seed} (replay: QUILL_MODEL_SEED={seed})");
    let mut rng = Rng(seed);
    let mut q = Quill::start().await;
    let url = q.db.url.clone();
    sqlx::query("INSERT INTO users (id, email) VALUES (1, 'a@x'), (2, 'b@x'), (3, 'c@x')")
        .execute(&q.sql().await)
        .await
        .expect("users");
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|_| Client {
            seen: Arc::default(),
            reader: None,
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.connect(&q, i).await;
    }
    let mut slots = Vec::new();
    for _ in 0..SLOTS {
        let mut conn = PgConnection::connect(&url).await.expect("slot session");
        // The rows `random()` picks follow the seed too.
        sqlx::query("SELECT setseed($1)")
            .bind((rng.below(2_000_000) as f64 / 1_000_000.0) - 1.0)
            .execute(&mut conn)
            .await
            .expect("setseed");
        slots.push(Slot {
            conn,
            open: None,
            statements: 0,
        });
    }
    let mut committed: Vec<Group> = Vec::new();
    let mut next_tx = 0u64;
    let sentinel = async |q: &Quill, committed: &mut Vec<Group>, tag: &str| {
        let rows = sqlx::query(
            "INSERT INTO messages (text, user_id) SELECT $1, u FROM generate_series(1, 3) u RETURNING id, text, user_id",
        )
        .bind(tag)
        .fetch_all(&q.sql().await)
        .await
        .expect("sentinel");
        committed.push(evs("created", &rows));
    };
    // Every client gets a first event, so that it has a position to resume from.
    sentinel(&q, &mut committed, "first").await;
    for (i, c) in clients.iter().enumerate() {
        let expected = if i == 0 {
            3
        } else if i == 1 {
            1
        } else if i == 2 {
            2
        } else {
            3
        };
        wait_for(c, expected).await;
    }
    let mut restarts = 0;
    for _ in 0..300 {
        match rng.below(100) {
            0..=14 => {
                let free: Vec<usize> = (0..slots.len()).filter(|i| slots[*i].open.is_none()).collect();
                if let Some(&i) = free.get(rng.below(free.len().max(1) as u64) as usize) {
                    sqlx::raw_sql("BEGIN").execute(&mut slots[i].conn).await.expect("begin");
                    next_tx += 1;
                    slots[i].open = Some((next_tx, Vec::new()));
                }
            }
            15..=59 => {
                let i = rng.below(slots.len() as u64) as usize;
                statement(&mut rng, i, &mut slots[i]).await;
            }
            60..=79 => {
                let i = rng.below(slots.len() as u64) as usize;
                if let Some((_, groups)) = slots[i].open.take() {
                    if rng.chance(75) {
                        sqlx::raw_sql("COMMIT")
                            .execute(&mut slots[i].conn)
                            .await
                            .expect("commit");
                        committed.extend(groups);
                    } else {
                        sqlx::raw_sql("ROLLBACK")
                            .execute(&mut slots[i].conn)
                            .await
                            .expect("rollback");
                    }
                }
            }
            80..=84 => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name LIKE 'quill%'",
                )
                .execute(&q.sql().await)
                .await
                .expect("terminate quill's sessions");
            }
            85..=86 if restarts < 2 => {
                restarts += 1;
                let db: TestDb = q.shutdown().await;
                q = Quill::start_on(db, open_demo()).await;
                // Every client was closed with 1001: each resumes on the new instance.
                for (i, c) in clients.iter_mut().enumerate() {
                    if let Some(reader) = c.reader.take() {
                        let _ = tokio::time::timeout(WAIT, reader).await;
                    }
                    c.connect(&q, i).await;
                }
            }
            87..=93 => {
                let i = rng.below(CLIENTS as u64) as usize;
                clients[i].disconnect();
            }
            _ => {
                let i = rng.below(CLIENTS as u64) as usize;
                if !clients[i].connected() {
                    clients[i].connect(&q, i).await;
                }
            }
        }
    }
    for s in &mut slots {
        if let Some((_, groups)) = s.open.take() {
            sqlx::raw_sql("COMMIT").execute(&mut s.conn).await.expect("commit");
            committed.extend(groups);
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        if !c.connected() {
            c.connect(&q, i).await;
        }
    }
    sentinel(&q, &mut committed, "last").await;
    let order = delivery_order(&q).await;
    for (i, c) in clients.iter().enumerate() {
        let expected: Vec<Group> = committed
            .iter()
            .map(|g| g.iter().filter_map(|e| project(i, e)).collect::<Group>())
            .filter(|g| !g.is_empty())
            .collect();
        let total: usize = expected.iter().map(Vec::len).sum();
        wait_for(c, total).await;
        let seen = c.seen.lock().expect("seen").clone();
        let seqs: Vec<i64> = seen.iter().map(|(s, _)| *s).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), seqs.len(), "seed {seed}: client {i} got a seq twice");
        // Exactly what was committed, nothing rolled back, nothing twice.
        let mut got_sorted: Vec<Ev> = seen.iter().map(|(_, e)| e.clone()).collect();
        got_sorted.sort();
        let mut want_sorted: Vec<Ev> = expected.iter().flatten().cloned().collect();
        want_sorted.sort();
        assert_eq!(
            got_sorted, want_sorted,
            "seed {seed}: client {i} got other events than were committed"
        );
        // Each row's changes in commit order (the order of the test's commits and statements).
        let by_row =
            |events: Vec<&Ev>, id: i64| -> Vec<Ev> { events.into_iter().filter(|e| e.id == id).cloned().collect() };
        let delivered: Vec<&Ev> = seen.iter().map(|(_, e)| e).collect();
        let committed_order: Vec<&Ev> = expected.iter().flatten().collect();
        for id in got_sorted.iter().map(|e| e.id).collect::<BTreeSet<_>>() {
            assert_eq!(
                by_row(delivered.clone(), id),
                by_row(committed_order.clone(), id),
                "seed {seed}: client {i}, the changes of row {id} out of order"
            );
        }
        // And in the log's delivery order (tick by tick, seq within a tick) throughout.
        let positions: Vec<i64> = seqs
            .iter()
            .map(|s| order.iter().position(|o| o == s).expect("a logged seq") as i64)
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: client {i} out of delivery order"
        );
        assert_eq!(seen.len(), total, "seed {seed}: client {i} got more than was committed");
    }
}

/// Every logged seq in delivery order: tick by tick, by seq within a tick, as the ticks'
/// snapshots cut the log (computed from the database, not from quill's pipeline).
async fn delivery_order(q: &Quill) -> Vec<i64> {
    // The last sentinel must be in a tick: make one (as quill's reader would).
    sqlx::query("SELECT quill.make_tick()")
        .execute(&q.sql().await)
        .await
        .expect("tick");
    sqlx::query_scalar(
        "SELECT b.seq FROM (SELECT id, lag(id) OVER (ORDER BY id) AS prev FROM quill.tick) t,
                LATERAL quill.batch(t.prev, t.id) b
         WHERE t.prev IS NOT NULL ORDER BY t.id, b.seq",
    )
    .fetch_all(&q.sql().await)
    .await
    .expect("delivery order")
}

/// Waits until a client has processed `n` events (each within the wait limit).
async fn wait_for(c: &Client, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while c.seen.lock().expect("seen").len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a client got {} of {n} events",
            c.seen.lock().expect("seen").len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn random_interleavings_with_kills_restarts_and_resumes_deliver_the_commit_order_projection() {
    let seeds = seeds("QUILL_MODEL_SEED", 3);
    for seed in seeds {
        run_model(seed).await;
    }
}
