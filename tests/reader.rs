//! The change reader's database side: quiet wake-ups (writers skip NOTIFY while every reader
//! is busy reading; see `migrations/*_quiet_wakeups.sql`) and the reader's queries staying on
//! the log's indexes.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};

use crate::support::{Quill, WAIT, open_demo, pg::TestDb};

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

/// A registered reader on a session of its own.
async fn reader(db: &TestDb) -> (PgConnection, i32) {
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    let id = sqlx::query_scalar("SELECT quill.register_reader()")
        .fetch_one(&mut conn)
        .await
        .expect("register");
    (conn, id)
}

async fn call(conn: &mut PgConnection, function: &str, id: i32) -> bool {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT quill.{function}($1)")))
        .bind(id)
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
async fn writers_skip_notify_only_while_every_registered_reader_is_reading() {
    let (db, pool) = captured_db().await;
    let mut listener = PgListener::connect(&db.url).await.expect("listener");
    listener.listen("quill_change").await.expect("listen");

    insert(&pool, "no reader registered").await;
    assert!(notified(&mut listener, WAIT).await, "without readers, writers notify");

    let (mut first, first_id) = reader(&db).await;
    insert(&pool, "registered, waiting").await;
    assert!(notified(&mut listener, WAIT).await, "a waiting reader is woken");

    assert!(call(&mut first, "start_reading", first_id).await);
    insert(&pool, "the only reader reads").await;
    assert!(!notified(&mut listener, Duration::from_millis(300)).await);

    let (mut second, second_id) = reader(&db).await;
    insert(&pool, "one of two reads").await;
    assert!(notified(&mut listener, WAIT).await, "the waiting one is woken");
    assert!(call(&mut second, "start_reading", second_id).await);
    insert(&pool, "both read").await;
    assert!(!notified(&mut listener, Duration::from_millis(300)).await);

    // A reader whose session ends loses its lock with it: writers notify again.
    second.close().await.expect("close");
    insert(&pool, "second gone").await;
    assert!(
        notified(&mut listener, WAIT).await,
        "a gone reader's row must not silence writers"
    );

    assert!(call(&mut first, "stop_reading", first_id).await);
    insert(&pool, "first stopped").await;
    assert!(notified(&mut listener, WAIT).await);
}

#[tokio::test]
async fn a_reader_that_stops_reading_waits_at_the_gate_for_writers_that_skipped_notify() {
    let (db, pool) = captured_db().await;
    let (mut me, id) = reader(&db).await;
    assert!(call(&mut me, "start_reading", id).await);
    // A writer runs its trigger while we read (so skips its NOTIFY) and commits late.
    let mut writer = pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO messages (text) VALUES ('late')")
        .execute(&mut *writer)
        .await
        .expect("insert");
    assert!(call(&mut me, "stop_reading", id).await);
    let gate_pool = pool.clone();
    let mut gate = tokio::spawn(async move {
        sqlx::query("SELECT quill.pass_gate()")
            .execute(&gate_pool)
            .await
            .expect("pass the gate")
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut gate)
            .await
            .is_err(),
        "the gate must hold the reader until the writer commits"
    );
    writer.commit().await.expect("commit");
    tokio::time::timeout(WAIT, gate)
        .await
        .expect("the gate opens once the writer committed")
        .expect("gate task");
    // What the reader's last look then finds: the late change, in a new tick.
    let tick: Option<i64> = sqlx::query_scalar("SELECT quill.make_tick()")
        .fetch_one(&pool)
        .await
        .expect("tick");
    assert!(tick.is_some(), "the late change is committed and makes a tick");
}

#[tokio::test]
async fn registering_a_reader_removes_the_rows_of_readers_whose_session_ended() {
    let (db, pool) = captured_db().await;
    let (gone, gone_id) = reader(&db).await;
    let (_alive, alive_id) = reader(&db).await;
    gone.close().await.expect("close");
    let (_new, new_id) = reader(&db).await;
    let mut ids: Vec<i32> = sqlx::query_scalar("SELECT id FROM quill.reader ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("readers");
    ids.sort_unstable();
    assert!(!ids.contains(&gone_id), "{ids:?}");
    assert_eq!(ids, vec![alive_id, new_id]);
}

/// With the poll fallback an hour away, every change must arrive through a notification or
/// the reader's own looks: bursts from concurrent writers put the reader into reading mode
/// (writers skip NOTIFY) and the pauses between them make it stop and wait again.
#[tokio::test]
async fn bursts_from_concurrent_writers_are_delivered_without_the_poll_fallback() {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 40;
    const BURSTS: usize = 15;
    let mut config = open_demo();
    config.poll_interval_ms = 3_600_000;
    let q = Quill::start_with(config).await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
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

/// An idle quill registers itself, so that another instance being busy does not silence
/// the writers it needs to hear from.
#[tokio::test]
async fn an_idle_quill_is_woken_while_another_reader_is_busy() {
    let mut config = open_demo();
    config.poll_interval_ms = 3_600_000;
    let q = Quill::start_with(config).await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let sql = q.sql().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM quill.reader")
        .fetch_one(&sql)
        .await
        .expect("readers")
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "quill registers its reader when idle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another instance, busy reading.
    let (mut busy, id) = reader(&q.db).await;
    assert!(call(&mut busy, "start_reading", id).await);
    insert(&sql, "while another reads").await;
    assert_eq!(ws.next_event().await["data"]["text"], "while another reads");
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
