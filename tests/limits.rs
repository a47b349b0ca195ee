//! Per-connection and per-process limits: connections per address and in total, calls in
//! flight, the idle timeout and the handshake timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{Quill, WAIT, open_demo};
use quill::Config;
use quill::config::Limits;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn with_limits(limits: Limits) -> Config {
    Config { limits, ..open_demo() }
}

/// A `/ws` connection from a chosen loopback address; the HTTP status if refused.
async fn connect_from(q: &Quill, from: [u8; 4]) -> Result<Socket, u16> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback address");
    let tcp = socket.connect(q.addr).await.expect("tcp connect");
    let url = format!("ws://{}/ws", q.addr);
    match tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

async fn metric(q: &Quill, name: &str) -> f64 {
    let text = q.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[tokio::test]
async fn connections_beyond_the_per_address_and_total_limits_are_refused_with_429_and_503() {
    let q = Quill::start_with(with_limits(Limits {
        max_connections: 3,
        connections_per_address: 2,
        ..Limits::default()
    }))
    .await;
    let _a1 = connect_from(&q, [127, 0, 0, 1]).await.expect("first from .1");
    let _a2 = connect_from(&q, [127, 0, 0, 1]).await.expect("second from .1");
    assert_eq!(connect_from(&q, [127, 0, 0, 1]).await.err(), Some(429));
    let _b1 = connect_from(&q, [127, 0, 0, 2]).await.expect("another address");
    assert_eq!(connect_from(&q, [127, 0, 0, 3]).await.err(), Some(503));
    assert_eq!(metric(&q, "quill_connections_refused_total").await, 2.0);
    // REST is not a long-lived connection and is not counted.
    let (status, _) = q.rest("GET", "/messages", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_client_that_writes_without_reading_has_at_most_its_calls_in_flight_and_loses_no_reply() {
    const CALLS: usize = 500;
    let q = Quill::start_with(Config {
        outgoing_queue: 4,
        limits: Limits {
            calls_in_flight: 2,
            ..Limits::default()
        },
        ..open_demo()
    })
    .await;
    // Replies of 100 KB: a few dozen fill the socket buffers.
    sqlx::query("INSERT INTO messages (text) VALUES (repeat('x', 100000))")
        .execute(&q.sql().await)
        .await
        .expect("insert");
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", q.addr))
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let writer = tokio::spawn(async move {
        for i in 0..CALLS {
            let call = json!({"ref": i, "method": "find", "service": "messages"});
            tx.send(Message::text(call.to_string())).await.expect("send");
        }
        tx
    });
    // The replies fill the socket and the queue (4), the calls behind them stop at 2, and
    // quill stops reading.
    // Without the limit hundreds would be waiting; sample until the backlog shows.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut at_limit = 0;
    while at_limit < 3 {
        let in_flight = metric(&q, "quill_calls_in_flight").await;
        assert!(in_flight <= 2.0, "{in_flight} calls in flight, over the limit of 2");
        if in_flight == 2.0 {
            at_limit += 1;
        }
        assert!(tokio::time::Instant::now() < deadline, "calls never backed up");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Reading again, every call gets its reply, in order of completion.
    let mut seen = vec![false; CALLS];
    for _ in 0..CALLS {
        let msg = tokio::time::timeout(WAIT, rx.next())
            .await
            .expect("a reply")
            .expect("open")
            .expect("healthy");
        let Message::Text(text) = msg else { continue };
        let reply: Value = serde_json::from_str(&text).expect("json");
        let i = reply["ref"].as_u64().expect("ref") as usize;
        assert!(reply.get("result").is_some(), "{reply}");
        assert!(!seen[i], "one reply per call");
        seen[i] = true;
    }
    assert!(seen.iter().all(|s| *s));
    let _sink = writer.await.expect("writer finished once quill read again");
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed_with_4009_and_one_that_answers_stays() {
    let q = Quill::start_with(with_limits(Limits {
        ping_interval_ms: 100,
        idle_timeout_ms: 400,
        ..Limits::default()
    }))
    .await;
    // A raw upgrade, never read again: the peer cannot answer pings.
    let mut vanished = TcpStream::connect(q.addr).await.expect("connect");
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        q.addr
    );
    tokio::io::AsyncWriteExt::write_all(&mut vanished, upgrade.as_bytes())
        .await
        .expect("upgrade");
    let (mut alive, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", q.addr))
        .await
        .expect("connect");
    // The live peer reads (tungstenite answers each ping) until it has seen ten pings,
    // which spans more than two idle timeouts.
    let mut pings = 0;
    while pings < 10 {
        let msg = tokio::time::timeout(WAIT, alive.next())
            .await
            .expect("a ping")
            .expect("open")
            .expect("healthy");
        if matches!(msg, Message::Ping(_)) {
            pings += 1;
        }
    }
    alive
        .send(Message::text(r#"{"ref":1,"method":"find","service":"messages"}"#))
        .await
        .expect("still open");
    loop {
        match tokio::time::timeout(WAIT, alive.next()).await.expect("reply") {
            Some(Ok(Message::Text(t))) => {
                assert!(t.contains(r#""ref":1"#), "{t}");
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("the answering peer was closed: {other:?}"),
        }
    }
    // The other one never read, so it never answered: behind the 101 and the pings it
    // finds a close frame with code 4009 (0x0FA9), and then the end of the stream.
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(WAIT, vanished.read_to_end(&mut bytes))
        .await
        .expect("quill closes the idle connection");
    assert!(bytes.starts_with(b"HTTP/1.1 101"), "upgraded");
    assert!(
        // FIN + close opcode, payload length, then the code in network order
        bytes.windows(4).any(|w| w[0] == 0x88 && w[2..] == [0x0F, 0xA9]),
        "a close frame with 4009"
    );
}

#[tokio::test]
async fn a_client_that_never_sends_its_request_is_disconnected_after_the_handshake_timeout() {
    let q = Quill::start_with(with_limits(Limits {
        handshake_timeout_ms: 200,
        ..Limits::default()
    }))
    .await;
    let mut tcp = TcpStream::connect(q.addr).await.expect("connect");
    // Half a request line, then nothing.
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /ws HT")
        .await
        .expect("write");
    let mut rest = Vec::new();
    // Ends (EOF or reset) when quill closes it.
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest))
        .await
        .expect("quill closes the connection");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test]
async fn a_write_delay_holds_changes_back_and_sends_later_ones_with_them() {
    let delay = Duration::from_millis(1000);
    let limits = Limits {
        write_delay_ms: 1000,
        ..Limits::default()
    };
    let q = Quill::start_with(with_limits(limits)).await;
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let written = Instant::now();
    ws.ok("create", "messages", json!({"data": {"text": "held"}})).await;
    // A change that comes while the first is held goes out with it, in order.
    sqlx::query("INSERT INTO messages (text) VALUES ('with it')")
        .execute(&q.sql().await)
        .await
        .expect("insert");
    let texts: Vec<Value> = ws.events(2).await.iter().map(|e| e["data"]["text"].clone()).collect();
    assert!(written.elapsed() >= delay, "a change went out before the delay");
    assert_eq!(texts, [json!("held"), json!("with it")]);
}
