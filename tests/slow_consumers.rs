//! A client that stops reading is cut off; everyone else gets everything.

use futures::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::Quill;
use quill::Config;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

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
    // The stalled client subscribes and then never reads again.
    let (mut stalled, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", q.addr))
        .await
        .expect("connect");
    stalled
        .send(Message::text(r#"{"ref":1,"method":"subscribe","service":"messages"}"#))
        .await
        .expect("subscribe");
    let mut healthy = q.ws().await;
    healthy.subscribe("messages").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let rss_before = rss_kib();

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
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 60, "memory stayed bounded: grew {grown_mib} MiB");

    // Reading now, the stalled client finds its close frame behind what was queued.
    let mut stalled = crate::support::Ws::from_stream(stalled);
    let (code, reason) = stalled.closed().await;
    assert_eq!(code, 4008, "{reason}");
    assert!(reason.contains("slow consumer"), "{reason}");
}
