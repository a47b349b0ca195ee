//! The change reader's database side: quiet wake-ups (writers skip NOTIFY while no reader
//! waits; see `migrations/*_quiet_wakeups.sql`) and the reader's queries staying on the
//! log's indexes.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};

use crate::support::{Quill, WAIT, Ws, open_demo, pg::TestDb};

/// A migrated database with capture on `messages` and no quill running.
async fn captured_db() -> (TestDb, PgPool) {
    let db = Quill::start().await.shutdown().await;
    let pool = PgPool::connect(&db.url).await.expect("connect");
    (db, pool)
}

async fn insert(pool: &PgPool, text: &str) {
    sqlx::query("INSERT INTO messages (text) VALUES ($1)")
        .bind(text)
        .execute(pool)
        .await
        .expect("insert");
}

/// A reader's own session, as quill keeps one.
async fn session(db: &TestDb) -> PgConnection {
    PgConnection::connect(&db.url).await.expect("connect")
}

async fn call(conn: &mut PgConnection, function: &str) -> bool {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT quill.{function}()")))
        .fetch_one(conn)
        .await
        .expect(function)
}

async fn last_tick(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT max(id) FROM quill.tick")
        .fetch_one(conn)
        .await
        .expect("last tick")
}

/// quill with its poll fallback an hour away (so every change must come through a
/// notification or the reader's own looks), a subscriber of `messages`, and a SQL pool.
async fn quill_without_poll_fallback() -> (Quill, Ws, PgPool) {
    let mut config = open_demo();
    config.poll_interval_ms = 3_600_000;
    let q = Quill::start_with(config).await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    (q, ws, sql)
}

async fn notified(listener: &mut PgListener, within: Duration) -> bool {
    let got = tokio::time::timeout(within, listener.recv()).await.is_ok();
    // Drain what else came with it, so that each check starts clean.
    while tokio::time::timeout(Duration::from_millis(50), listener.recv())
        .await
        .is_ok()
    {}
    got
}

#[tokio::test]
async fn writers_skip_notify_only_while_quill_runs_and_no_reader_waits() {
    let (db, pool) = captured_db().await;
    let mut listener = PgListener::connect(&db.url).await.expect("listener");
    listener.listen("quill_change").await.expect("listen");

    insert(&pool, "no quill running").await;
    assert!(
        notified(&mut listener, WAIT).await,
        "without quill, writers notify as always"
    );

    let mut first = session(&db).await;
    assert!(call(&mut first, "hold_alive").await);
    insert(&pool, "one reader, busy").await;
    assert!(!notified(&mut listener, Duration::from_millis(300)).await);

    assert!(call(&mut first, "start_waiting").await);
    insert(&pool, "one reader, waiting").await;
    assert!(notified(&mut listener, WAIT).await, "a waiting reader is woken");

    let mut second = session(&db).await;
    assert!(call(&mut second, "hold_alive").await);
    insert(&pool, "one busy, one waiting").await;
    assert!(notified(&mut listener, WAIT).await, "the waiting one is woken");
    assert!(call(&mut first, "stop_waiting").await);
    insert(&pool, "both busy").await;
    assert!(!notified(&mut listener, Duration::from_millis(300)).await);

    // Sessions that end take their locks along: with no quill alive, writers notify.
    first.close().await.expect("close");
    insert(&pool, "one left, busy").await;
    assert!(!notified(&mut listener, Duration::from_millis(300)).await);
    second.close().await.expect("close");
    insert(&pool, "none left").await;
    assert!(
        notified(&mut listener, WAIT).await,
        "a gone quill must not silence writers"
    );
}

#[tokio::test]
async fn the_gate_opens_only_when_writers_that_skipped_notify_committed_and_blocks_nobody() {
    let (db, pool) = captured_db().await;
    let mut me = session(&db).await;
    assert!(call(&mut me, "hold_alive").await);
    // A writer runs its trigger while we are busy (so skips its NOTIFY) and commits late.
    let mut writer = pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO messages (text) VALUES ('late')")
        .execute(&mut *writer)
        .await
        .expect("insert");
    assert!(call(&mut me, "start_waiting").await);
    assert!(!call(&mut me, "pass_gate").await, "the late writer has not committed");
    // Trying the gate queues nothing: other writers go on meanwhile.
    tokio::time::timeout(WAIT, insert(&pool, "meanwhile"))
        .await
        .expect("a writer is not held up by the reader at the gate");
    assert!(!call(&mut me, "pass_gate").await);
    writer.commit().await.expect("commit");
    assert!(call(&mut me, "pass_gate").await, "open once the writer committed");
}

/// An idle quill holds "waiting", so that another instance being busy does not silence
/// the writers it needs to hear from.
#[tokio::test]
async fn an_idle_quill_is_woken_while_another_reader_is_busy() {
    let (q, mut ws, sql) = quill_without_poll_fallback().await;
    // Another instance, alive and busy.
    let mut busy = session(&q.db).await;
    assert!(call(&mut busy, "hold_alive").await);
    for i in 0..5 {
        // Idle long enough for quill to have settled into waiting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = format!("while another reads {i}");
        insert(&sql, &text).await;
        assert_eq!(ws.next_event().await["data"]["text"], text.as_str());
    }
}

/// With the poll fallback an hour away, every change must arrive through a notification or
/// the reader's own looks: bursts from concurrent writers put the reader into reading mode
/// (writers skip NOTIFY) and the pauses between them make it stop and wait again.
#[tokio::test]
async fn bursts_from_concurrent_writers_are_delivered_without_the_poll_fallback() {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 40;
    const BURSTS: usize = 15;
    let (q, mut ws, sql) = quill_without_poll_fallback().await;
    for burst in 0..BURSTS {
        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..WRITERS {
            let sql = sql.clone();
            writers.spawn(async move {
                for i in 0..PER_WRITER {
                    insert(&sql, &format!("{burst}/{writer}/{i}")).await;
                }
            });
        }
        while let Some(done) = writers.join_next().await {
            done.expect("writer");
        }
        let events = ws.events(WRITERS * PER_WRITER).await;
        assert!(events.iter().all(|e| {
            e["data"]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with(&format!("{burst}/")))
        }));
        // Let the reader run out of work and go back to waiting.
        tokio::time::sleep(Duration::from_millis(20 + 10 * burst as u64)).await;
    }
    ws.expect_no_event(Duration::from_millis(200)).await;
    // The reader was busy at times (writers skipped NOTIFY) and is waiting again now.
    let metric = |text: &str, name: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics"))
    };
    let text = q.metrics().await;
    let total = (BURSTS * WRITERS * PER_WRITER) as i64;
    assert!(
        metric(&text, "quill_notifications_total") < total,
        "some writers skipped NOTIFY"
    );
    assert_eq!(metric(&text, "quill_reader_busy"), 0, "idle again: writers notify");
}

#[tokio::test]
async fn the_readers_queries_stay_on_the_indexes_when_planned_on_a_small_log() {
    let (db, pool) = captured_db().await;
    let mut session = PgConnection::connect(&db.url).await.expect("connect");
    // PL/pgSQL switches to a cached generic plan after five calls: make it on a small log.
    sqlx::query("INSERT INTO messages (text) SELECT 'seed' FROM generate_series(1, 1000)")
        .execute(&pool)
        .await
        .expect("seed");
    for _ in 0..8 {
        insert(&pool, "small").await;
        let after = last_tick(&mut session).await;
        insert(&pool, "small").await;
        sqlx::query("SELECT count(*) FROM quill.poll($1, 1000)")
            .bind(after)
            .execute(&mut session)
            .await
            .expect("poll");
    }
    sqlx::query("INSERT INTO messages (text) SELECT 'bulk' FROM generate_series(1, 20000)")
        .execute(&pool)
        .await
        .expect("bulk insert");
    sqlx::query("SELECT count(*) FROM quill.poll((SELECT max(id) FROM quill.tick), 1000)")
        .execute(&mut session)
        .await
        .expect("poll past the bulk");
    let after = last_tick(&mut session).await;
    insert(&pool, "after the bulk").await;
    let mut tx = session.begin().await.expect("begin");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM quill.poll($1, 1000)")
        .bind(after)
        .fetch_one(&mut *tx)
        .await
        .expect("poll");
    let seq_scans: i64 =
        sqlx::query_scalar("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = 'quill.change_log'::regclass")
            .fetch_one(&mut *tx)
            .await
            .expect("scan counts");
    tx.commit().await.expect("commit");
    assert_eq!(rows, 1, "one new change");
    assert_eq!(seq_scans, 0, "a poll must not scan the whole change log");
}

/// One row of `quill.read_ticks`: (prev, tick, read_later, seq, text of the row).
type TickRow = (i64, i64, bool, Option<i64>, Option<String>);

async fn read_ticks(conn: &mut PgConnection, after: i64, max_rows: i32) -> Result<Vec<TickRow>, sqlx::Error> {
    sqlx::query_as("SELECT prev, tick, read_later, seq, row_data->>'text' FROM quill.read_ticks($1, NULL, $2)")
        .bind(after)
        .bind(max_rows)
        .fetch_all(conn)
        .await
}

async fn make_tick(conn: &mut PgConnection) -> Option<i64> {
    sqlx::query_scalar("SELECT quill.make_tick()")
        .fetch_one(conn)
        .await
        .expect("make a tick")
}

#[tokio::test]
async fn read_ticks_chains_ticks_defers_what_does_not_fit_and_reports_a_pruned_start() {
    let (db, pool) = captured_db().await;
    let mut reader = session(&db).await;
    let start = last_tick(&mut reader).await;
    insert(&pool, "a").await;
    let first = make_tick(&mut reader).await.expect("a tick for a");
    // Nothing new, no tick; b and c then share one.
    assert_eq!(make_tick(&mut reader).await, None);
    insert(&pool, "b").await;
    insert(&pool, "c").await;
    let second = make_tick(&mut reader).await.expect("a tick for b and c");
    insert(&pool, "d").await;
    let third = make_tick(&mut reader).await.expect("a tick for d");

    let rows = read_ticks(&mut reader, start, 1000).await.expect("read");
    let seen: Vec<(i64, i64, bool, Option<String>)> = rows
        .iter()
        .map(|(prev, tick, later, _, text)| (*prev, *tick, *later, text.clone()))
        .collect();
    let text = |t: &str| Some(t.to_owned());
    assert_eq!(
        seen,
        [
            (start, first, false, text("a")),
            (first, second, false, text("b")),
            (first, second, false, text("c")),
            (second, third, false, text("d")),
        ]
    );
    let seqs: Vec<i64> = rows.iter().filter_map(|r| r.3).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in log order: {seqs:?}");

    // Room for two rows: the first tick fits, the second does not and is left to read later
    // (whole ticks only), and nothing after it is returned.
    let rows = read_ticks(&mut reader, start, 2).await.expect("read a page");
    let seen: Vec<(i64, i64, bool, Option<String>)> = rows
        .iter()
        .map(|(prev, tick, later, _, text)| (*prev, *tick, *later, text.clone()))
        .collect();
    assert_eq!(seen, [(start, first, false, text("a")), (first, second, true, None)]);

    // Reading on from a tick the pruner has deleted is an error the reader recognizes.
    sqlx::query("DELETE FROM quill.tick WHERE id = $1")
        .bind(first)
        .execute(&pool)
        .await
        .expect("delete a tick");
    let pruned = read_ticks(&mut reader, first, 1000)
        .await
        .expect_err("the start tick is gone");
    let code = pruned
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("QL001"), "{pruned}");
    // With nothing newer than the start there is nothing to read, pruned or not.
    assert!(
        read_ticks(&mut reader, third, 1000)
            .await
            .expect("read past the end")
            .is_empty()
    );
}
