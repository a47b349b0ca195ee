//! The pool service calls run on: it skips sqlx's ping on release, so a call cancelled
//! mid-statement must never hand its connection to the next call.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};

use crate::support::{Quill, WAIT, insert_messages};
use quill::service::query::Query;
use quill::store::{Store, Table};

/// The backends of `application_name = 'quill_pool_test'` that are waiting for a lock.
async fn waiting_for_lock(conn: &mut PgConnection) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'quill_pool_test' AND wait_event_type = 'Lock'",
    )
    .fetch_all(conn)
    .await
    .expect("pg_stat_activity")
}

#[tokio::test]
async fn a_call_cancelled_mid_statement_does_not_hand_its_connection_to_the_next_call() {
    let q = Quill::start().await;
    let sql = q.sql().await;
    insert_messages(&sql, 0, 3).await;
    // One connection for service calls, so the next call would get the cancelled one back.
    let options = (*sql.connect_options()).clone().application_name("quill_pool_test");
    // Lazy: the calls' pool is the only one that connects under this name.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options.clone());
    let store = Store::new(pool).expect("store");
    let table = Table::load(&sql, "messages", "public", "messages", "id", &[])
        .await
        .expect("messages table");

    // Another program holds the table, so the call's SELECT waits on the server.
    let mut locker = PgConnection::connect_with(&options.clone().application_name("locker"))
        .await
        .expect("locker");
    sqlx::query("BEGIN").execute(&mut locker).await.expect("begin");
    sqlx::query("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("lock");
    let mut observer = PgConnection::connect_with(&options.clone().application_name("observer"))
        .await
        .expect("observer");
    let query = Query::default();
    // Boxed, so that dropping it really drops the call.
    let mut call = Box::pin(store.select(&table, &query, None, None));
    // Cancel the call once its statement is known to wait inside PostgreSQL.
    let blocked = tokio::time::timeout(WAIT, async {
        loop {
            tokio::select! {
                outcome = &mut call => panic!("the call finished through the lock: {outcome:?}"),
                pids = waiting_for_lock(&mut observer) => if let [pid] = pids[..] { return pid },
            }
        }
    })
    .await
    .expect("the call's statement never waited for the lock");
    drop(call);
    sqlx::query("ROLLBACK").execute(&mut locker).await.expect("rollback");

    // The next call gets a working connection and its own answer, not the cancelled one's.
    let rows = tokio::time::timeout(WAIT, store.select(&table, &query, None, None))
        .await
        .expect("the next call never got a connection")
        .expect("the next call failed");
    assert_eq!(rows.len(), 3);
    let serving: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = 'quill_pool_test' AND pid <> $1")
            .bind(blocked)
            .fetch_all(&mut observer)
            .await
            .expect("pg_stat_activity");
    assert!(
        !serving.is_empty(),
        "the next call must run on a new connection, not on the cancelled one ({blocked})"
    );
    // The cancelled call's backend goes away once its answer finds no one to read it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let alive: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
            .bind(blocked)
            .fetch_one(&mut observer)
            .await
            .expect("pg_stat_activity");
        if !alive {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancelled call's connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failed_multi_row_create_leaves_no_transaction_open_on_its_connection() {
    let mut config = crate::support::open_demo();
    if let Some(s) = config.services.get_mut("messages") {
        s.multi = quill::config::Multi::All(true);
    }
    let q = Quill::start_with(config).await;
    let sql = q.sql().await;
    // The second row breaks NOT NULL: the first is already inserted in the transaction.
    let (status, _) = q
        .rest(
            "POST",
            "/messages",
            Some(serde_json::json!([{"text": "ok"}, {"text": null}])),
        )
        .await;
    assert_eq!(status, 400);
    // Its connection is back in the pool, idle: not idle in a transaction that still holds
    // the first row's insert, which would wait for that connection's next call.
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(&sql)
    .await
    .expect("pg_stat_activity");
    assert_eq!(open, 0, "a pooled connection holds an open transaction");
}
