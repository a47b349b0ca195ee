//! A client that stops reading is cut off; everyone else gets everything.

use crate::support::Quill;
use quill::Config;

#[tokio::test]
async fn a_stalled_client_is_cut_off_while_others_receive_everything() {
    const N: usize = 20_000;
    let config = Config {
        outgoing_queue: 256,
        slow_consumer_timeout_ms: 500,
        // The close frame waits behind what was queued until the test reads it.
        limits: quill::config::Limits {
            write_timeout_ms: 120_000,
            ..Default::default()
        },
        ..crate::support::open_demo()
    };
    let q = Quill::start_with(config).await;
    // The stalled client subscribes (the reply says it is live) and then never reads again.
    let mut stalled = q.ws().await;
    stalled.subscribe("messages").await;
    let mut healthy = q.ws().await;
    healthy.subscribe("messages").await;

    // 20 000 events of 4 KB: 80 MB if a stalled queue were unbounded.
    let sql = q.sql().await;
    sqlx::query("INSERT INTO messages (text) SELECT g || repeat('x', 4096) FROM generate_series(1, $1) g")
        .bind(N as i32)
        .execute(&sql)
        .await
        .expect("insert");
    let mut received = 0;
    let mut last_seq = 0;
    while received < N {
        let e = healthy.next_event().await;
        let seq = e["seq"].as_i64().expect("seq");
        assert!(seq > last_seq, "in order, no repeats");
        last_seq = seq;
        received += 1;
    }
    // Cut off once (its queue stays bounded by construction; the process's RSS is shared
    // with the tests running beside this one, so it proves nothing here).
    assert!(q.metrics().await.contains("quill_slow_consumer_disconnects_total 1\n"));

    // Reading now, the stalled client finds its close frame behind what was queued.
    let (code, reason) = stalled.closed().await;
    assert_eq!(code, 4008, "{reason}");
    assert!(reason.contains("slow consumer"), "{reason}");
}
